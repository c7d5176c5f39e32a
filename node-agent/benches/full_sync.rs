//! Full sync against `iptables-restore` alone, on the real kernel, at 1k/5k/10k services × 10 endpoints.
//! Needs root; runs in a network namespace of its own. Run with `make bench-sync`.
//!
//! For each size it measures, in a fresh namespace each time:
//! - `restore alone`: `iptables-restore --noflush` of the exact rule set the agent renders (read from memory);
//! - `agent full sync`: `IptablesBackend::sync(full)` — reading owned chains, rendering, restoring, and
//!   ensuring the jump rules — i.e. everything a periodic full resync does;
//! - `agent partial sync`: one endpoint of one service changed, on top of the loaded rule set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_agent::iptables::backend::IptablesBackend;
use switchyard_agent::iptables::exec::{Backend as Flavor, BackendChoice, IptablesRestore};
use switchyard_agent::iptables::render::{RenderInput, render};
use switchyard_agent::model::{IpFamily, NodeInfo, build};
use switchyard_agent::sync::Backend;
use switchyard_api::{AgentConfig, ProxyConfigSpec};

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", name])
                .status()
                .unwrap()
                .success()
        );
        Self(name.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn objects(
    n: u32,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let mut services = vec![];
    let mut slices = vec![];
    for i in 0..n {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        services.push(
            serde_json::from_value(json!({"metadata": {"namespace": "bench", "name": name},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}))
            .unwrap(),
        );
        let endpoints: Vec<_> = (0..10u32)
            .map(|e| {
                let k = i * 10 + e;
                json!({"addresses": [format!("10.{}.{}.{}", 128 + k / 65536, (k / 256) % 256, k % 256)],
                       "nodeName": "node-0"})
            })
            .collect();
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": "bench", "name": format!("{name}-x"),
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints}))
            .unwrap(),
        );
    }
    (services, slices)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !is_root {
        eprintln!("full_sync bench needs root (network namespaces); skipped");
        return;
    }
    let sizes: Vec<u32> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let legacy = std::env::var("BENCH_IPTABLES").as_deref() == Ok("legacy");
    let (flavor, restore_binary) = if legacy {
        (Flavor::Legacy, "iptables-legacy-restore")
    } else {
        (Flavor::Nft, "iptables-nft-restore")
    };
    println!("iptables implementation: {restore_binary}, {runs} runs per size");
    let spec: ProxyConfigSpec = serde_json::from_value(json!({"mode": "iptables"})).unwrap();
    let config = AgentConfig::from_spec(&spec).unwrap();
    let node = NodeInfo {
        name: "node-0".into(),
        ..Default::default()
    };

    println!(
        "| services | endpoints | rules | restore alone | agent first sync | agent full resync | resync / restore | agent partial sync |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let (services, slices) = objects(n);
        let (model, _) = build(services.iter(), slices.iter(), &node, None);
        let input = RenderInput {
            family: IpFamily::V4,
            state: model.family(IpFamily::V4),
            config: &config,
            node: &node,
        };
        let rendered = render(&input, None, None);
        if let Ok(dir) = std::env::var("BENCH_DUMP") {
            std::fs::write(format!("{dir}/restore-{n}.txt"), &rendered.restore).unwrap();
        }

        let (mut alone, mut first, mut full, mut partial) = (vec![], vec![], vec![], vec![]);
        for run in 0..runs {
            let ns = Netns::new(&format!("swyd-bench-{run}"));
            let t = Instant::now();
            let mut child = Command::new("ip")
                .args(["netns", "exec", &ns.0, restore_binary, "--noflush"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(rendered.restore.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
            alone.push(t.elapsed());
            drop(ns);

            let ns = Netns::new(&format!("swyd-bench-{run}"));
            let exec = IptablesRestore::builder()
                .backend(BackendChoice::Force(flavor))
                .command_prefix(["ip", "netns", "exec", ns.0.as_str()])
                .build();
            let mut backend = IptablesBackend::new(exec, config.clone());
            let t = Instant::now();
            backend.sync(&model, &node, true).unwrap();
            first.push(t.elapsed());
            // The periodic resync: same model, full rewrite.
            let t = Instant::now();
            backend.sync(&model, &node, true).unwrap();
            full.push(t.elapsed());

            // One endpoint of one service replaced.
            let mut changed = slices.clone();
            changed[0].endpoints[0].addresses = vec!["10.255.255.1".into()];
            let (next, _) = build(services.iter(), changed.iter(), &node, None);
            let t = Instant::now();
            backend.sync(&next, &node, false).unwrap();
            partial.push(t.elapsed());
        }
        let (a, s, f, p) = (median(alone), median(first), median(full), median(partial));
        println!(
            "| {n} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2}× | {:.0} ms |",
            n * 10,
            rendered.rule_count,
            a.as_secs_f64(),
            s.as_secs_f64(),
            f.as_secs_f64(),
            f.as_secs_f64() / a.as_secs_f64(),
            p.as_secs_f64() * 1000.0
        );
    }
}
