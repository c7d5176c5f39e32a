//! Micro-benchmarks of the pure parts at scale: building the model from 10k Services × 10 endpoints, and
//! rendering it (full and partial). Run with `make bench-micro`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use switchyard_agent::iptables::render::{RenderInput, render, render_into};
use switchyard_agent::model::{IpFamily, NodeInfo, build};
use switchyard_api::{AgentConfig, ProxyConfigSpec};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(SERVICES as usize);
    let mut slices = Vec::with_capacity(SERVICES as usize);
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let node_port = 30000 + (i % 2000);
        let kind = if i % 10 == 0 { "NodePort" } else { "ClusterIP" };
        let mut spec = json!({"type": kind, "clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
        if kind == "NodePort" {
            spec["ports"][0]["nodePort"] = json!(node_port);
        }
        services.push(
            serde_json::from_value(json!({"metadata": {"namespace": "bench", "name": name}, "spec": spec}))
                .unwrap(),
        );
        let endpoints: Vec<_> = (0..ENDPOINTS)
            .map(|e| {
                let n = i * ENDPOINTS + e;
                json!({"addresses": [format!("10.{}.{}.{}", 128 + n / 65536, (n / 256) % 256, n % 256)],
                       "nodeName": format!("node-{}", e % 3), "conditions": {"ready": true}})
            })
            .collect();
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"namespace": "bench", "name": format!("{name}-abc"),
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .unwrap(),
        );
    }
    (services, slices)
}

fn pipeline(c: &mut Criterion) {
    let (services, slices) = objects();
    let node = NodeInfo {
        name: "node-0".into(),
        pod_cidrs: vec!["10.128.0.0/24".parse().unwrap()],
        ..Default::default()
    };
    let spec: ProxyConfigSpec =
        serde_json::from_value(json!({"mode": "iptables", "clusterCIDRs": ["10.128.0.0/9"]})).unwrap();
    let config = AgentConfig::from_spec(&spec).unwrap();

    let mut group = c.benchmark_group("10k_services_x10_endpoints");
    group.sample_size(10);
    group.bench_function("model_build", |b| {
        b.iter(|| black_box(build(services.iter(), slices.iter(), &node, None)))
    });

    let (model, _) = build(services.iter(), slices.iter(), &node, None);
    let state = model.family(IpFamily::V4);
    let input = RenderInput {
        family: IpFamily::V4,
        state,
        config: &config,
        node: &node,
    };
    group.bench_function("render_full", |b| {
        b.iter(|| black_box(render(&input, None, None)))
    });
    let mut buffer = render(&input, None, None).restore;
    group.bench_function("render_full_reusing_buffer", |b| {
        b.iter(|| {
            let rendered = render_into(&input, None, None, std::mem::take(&mut buffer));
            buffer = rendered.restore;
        })
    });
    let previous = render(&input, None, None).chains;
    let changed: BTreeSet<_> = state.services.keys().take(1).cloned().collect();
    group.bench_function("render_partial_one_service", |b| {
        b.iter(|| black_box(render(&input, Some(&previous), Some(&changed))))
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
