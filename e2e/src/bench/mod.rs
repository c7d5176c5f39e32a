//! `switchyard-e2e bench`: Switchyard's agent and upstream kube-proxy side by side on the local
//! cluster, fed the same selector-less Services and EndpointSlices, each on its own simulated node, at
//! the same time. Everything is measured from outside the processes: rules in the kernel, real TCP
//! connections through the VIP, /proc. Method and results: docs/benchmarks.md.

pub mod objects;
pub mod plot;
pub mod proxies;
pub mod report;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::cluster::Cluster;
use crate::echo::EchoReply;
use crate::layout::ClusterSpec;
use crate::pki::Pki;
use objects::{NAMESPACE, PROBE, SERVICE_PORT, TARGET_PORT};
use proxies::{Flavor, Kind, Running, Setup};
use report::{Point, ProxyFigures, Run, Summary};

/// Options of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Numbers of services to measure at, ascending (the probe service included).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,5000,10000")]
    pub sizes: Vec<usize>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// Endpoint changes timed per size.
    #[arg(long, default_value_t = 100)]
    pub changes: usize,
    /// Background EndpointSlice updates per second while changes are timed.
    #[arg(long, default_value_t = 2.0)]
    pub churn: f64,
    /// New TCP connections timed per target for the data-plane figures.
    #[arg(long, default_value_t = 500)]
    pub connects: usize,
    /// minSyncPeriod of both proxies (kube-proxy's default).
    #[arg(long, default_value = "1s")]
    pub min_sync_period: String,
    /// iptables flavour of both proxies.
    #[arg(long, value_enum, default_value_t = Flavor::Legacy)]
    pub iptables: Flavor,
    /// The agent binary (a release build).
    #[arg(long)]
    pub agent_bin: PathBuf,
    /// Folder for results.json, results.md and plot.svg.
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
    /// Cluster name.
    #[arg(long, default_value = "bench")]
    pub cluster: String,
    /// Fail when a change was never seen through the VIP or a figure is missing (for CI's quick run).
    #[arg(long)]
    pub strict: bool,
}

/// Longest wait for a proxy's first complete rule set.
const COLD_START_LIMIT: Duration = Duration::from_secs(900);
/// Longest wait for one change to show through the VIP.
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for a full resync after the canary is deleted (syncPeriod 10 s plus the sync).
const RESYNC_LIMIT: Duration = Duration::from_secs(300);
/// Connect limit of one data-plane sample (a lost SYN is retried after 1 s: counted, not fatal).
const DATA_PLANE_LIMIT: Duration = Duration::from_secs(5);
/// Connect limit of one change-latency probe.
const CONNECT_LIMIT: Duration = Duration::from_millis(500);

/// The echo pods the probe service points at, in turn.
struct Target {
    name: String,
    ip: Ipv4Addr,
}

/// Runs the bench and writes its results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.sizes.is_empty() || args.sizes.windows(2).any(|w| w[0] >= w[1]) || args.sizes[0] == 0 {
        bail!("--sizes must be ascending and positive");
    }
    if !args.agent_bin.exists() {
        bail!(
            "no agent binary at {} (cargo build --release -p switchyard-agent)",
            args.agent_bin.display()
        );
    }
    let started = Instant::now();
    let started_at = k8s_openapi::jiff::Timestamp::now().to_string();
    let exe = std::env::current_exe()?;
    let mut spec = ClusterSpec::new(&args.cluster, 3, exe)?;
    spec.dual_stack = false;
    spec.owner_pid = Some(std::process::id());
    let kube_proxy_bin = spec.upstream_bin.join("kube-proxy");
    eprintln!("bench: starting cluster {} (3 nodes)", spec.name);
    let cluster = Cluster::up(spec, Duration::from_secs(300)).await?;
    let result = run_on(&cluster, &args, kube_proxy_bin, started, started_at).await;
    if let Ok(client) = cluster.client().await {
        let _ = objects::delete_all(&client).await;
    }
    drop(cluster);
    result
}

async fn run_on(
    cluster: &Cluster,
    args: &BenchArgs,
    kube_proxy_bin: PathBuf,
    started: Instant,
    started_at: String,
) -> anyhow::Result<()> {
    let layout = cluster.layout();
    let [n1, n2, n3] = [0, 1, 2].map(|i| layout.nodes[i].clone());
    let client = cluster.client().await?;
    let dir = layout.state_dir.join("bench");
    std::fs::create_dir_all(&dir)?;

    // A kubeconfig that works from inside the nodes (the API server's own address).
    let pki = Pki::paths(layout);
    let kubeconfig = dir.join("kubeconfig");
    crate::kubeconfig::write(
        &kubeconfig,
        &crate::kubeconfig::render(
            &format!("swyd-{}", layout.name),
            &format!("https://{}", layout.apiserver_addr()),
            &pki.ca.cert,
            "admin",
            &pki.admin,
        ),
    )?;

    let setups: Vec<Setup> = [
        (Kind::Switchyard, &n1, &args.agent_bin),
        (Kind::KubeProxy, &n2, &kube_proxy_bin),
    ]
    .into_iter()
    .map(|(kind, node, program)| Setup {
        kind,
        node: node.name.clone(),
        netns: node.netns.clone(),
        program: program.clone(),
        dir: dir.join(kind.label()),
        kubeconfig: kubeconfig.clone(),
        flavor: args.iptables,
        cluster_cidr: crate::layout::CLUSTER_CIDR_V4.into(),
        min_sync_period: args.min_sync_period.clone(),
    })
    .collect();
    for setup in &setups {
        std::fs::create_dir_all(&setup.dir)?;
        setup.prepare()?;
    }

    eprintln!("bench: echo pods on {}", n3.name);
    let targets = echo_pods(&client, &n3.name).await?;
    let vip = objects::create_probe(&client, targets[0].ip, &n3.name).await?;
    let vip = SocketAddr::V4(SocketAddrV4::new(vip, SERVICE_PORT));
    let pod_addr = SocketAddr::V4(SocketAddrV4::new(targets[0].ip, TARGET_PORT));

    let mut run = Run {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        iptables: format!("{:?}", args.iptables).to_lowercase(),
        min_sync_period: args.min_sync_period.clone(),
        started: started_at,
        ..Run::default()
    };
    let mut created = 1; // the probe
    let mut probe_at = 0; // which target the probe service points at
    let mut running: Vec<Option<Running>> = setups.iter().map(|_| None).collect();
    for &size in &args.sizes {
        let t = Instant::now();
        objects::create_fillers(&client, created - 1, size - 1, args.endpoints, &n3.name).await?;
        eprintln!(
            "bench: {size} services ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        created = size;
        let point = measure_size(
            &client,
            args,
            &setups,
            &mut running,
            size,
            vip,
            pod_addr,
            &targets,
            &n3.name,
            &mut probe_at,
        )
        .await?;
        if args.strict {
            check_complete(&point)?;
        }
        run.points.push(point);
        run.duration_s = started.elapsed().as_secs_f64();
        write_results(&args.out, &run)?;
    }
    for (setup, slot) in setups.iter().zip(running.iter_mut()) {
        if let Some(mut r) = slot.take() {
            r.process.stop(Duration::from_secs(10)).await;
        }
        setup.cleanup().await?;
    }
    eprintln!(
        "bench: done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Every figure of `point` is there and every change was seen by both proxies.
fn check_complete(point: &Point) -> anyhow::Result<()> {
    for kind in Kind::ALL {
        let f = point
            .proxies
            .get(kind.label())
            .with_context(|| format!("no figures for {}", kind.label()))?;
        let missing = [
            ("cold start", f.cold_start_s),
            ("first full sync", f.first_full_sync_s),
            ("full resync", f.full_sync_s),
            ("restore alone", f.restore_alone_s),
            ("change latency", f.change_latency_ms.p50),
            ("VIP connect", f.connect_vip_us.p50),
            ("pod connect", f.connect_pod_us.p50),
            ("peak RSS", f.usage.peak_rss_mib),
            ("CPU", f.usage.cpu_seconds),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_nan() || *v <= 0.0)
        .map(|(name, _)| name)
        .collect::<Vec<_>>();
        if !missing.is_empty() || f.change_timeouts > 0 {
            bail!(
                "{} at {} services: missing {missing:?}, {} changes never seen through the VIP",
                kind.label(),
                point.services,
                f.change_timeouts
            );
        }
    }
    Ok(())
}

fn write_results(out: &std::path::Path, run: &Run) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(run)?)?;
    std::fs::write(out.join("results.md"), report::markdown(run))?;
    std::fs::write(out.join("plot.svg"), report::plot(run))?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} CPUs ({cpu}), {mem_gib:.0} GiB, kernel {}", kernel.trim())
}

async fn echo_pods(client: &Client, node: &str) -> anyhow::Result<Vec<Target>> {
    objects::create_namespace(client).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let mut out = Vec::new();
    for name in ["echo-a", "echo-b"] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "echo", "image": "switchyard.dev/echo:bench",
                                "ports": [{"containerPort": TARGET_PORT}]}],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    for name in ["echo-a", "echo-b"] {
        let limit = Instant::now() + Duration::from_secs(120);
        loop {
            let pod = pods.get(name).await?;
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if let (true, Some(ip)) = (ready, ip) {
                out.push(Target {
                    name: name.into(),
                    ip: ip.parse()?,
                });
                break;
            }
            if Instant::now() > limit {
                bail!("echo pod {name} not ready in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn measure_size(
    client: &Client,
    args: &BenchArgs,
    setups: &[Setup],
    running: &mut [Option<Running>],
    size: usize,
    vip: SocketAddr,
    pod_addr: SocketAddr,
    targets: &[Target],
    endpoint_node: &str,
    probe_at: &mut usize,
) -> anyhow::Result<Point> {
    let mut figures: Vec<ProxyFigures> = setups.iter().map(|_| ProxyFigures::default()).collect();

    // Cold start: no rules, both started together, polled until every service is in the kernel.
    for (setup, slot) in setups.iter().zip(running.iter_mut()) {
        if let Some(mut r) = slot.take() {
            r.process.stop(Duration::from_secs(10)).await;
        }
        setup.cleanup().await?;
    }
    for (setup, slot) in setups.iter().zip(running.iter_mut()) {
        *slot = Some(setup.start(&format!("{}-{size}.log", setup.kind.label()))?);
    }
    let mut done: Vec<Option<f64>> = setups.iter().map(|_| None).collect();
    let poll_start = Instant::now();
    while done.iter().any(Option::is_none) {
        for (i, setup) in setups.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let r = running[i].as_ref().context("started")?;
            if let Some(status) = r.process.exit_status() {
                bail!(
                    "{} exited during its cold start ({status}); see {}",
                    setup.kind.label(),
                    setup.dir.display()
                );
            }
            if setup.service_rules().await? >= size {
                done[i] = Some(r.started.elapsed().as_secs_f64());
                eprintln!(
                    "bench: {size}: {} cold start {:.2} s",
                    setup.kind.label(),
                    done[i].unwrap_or(0.0)
                );
            }
        }
        if poll_start.elapsed() > COLD_START_LIMIT {
            bail!("cold start at {size} services took longer than {COLD_START_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (f, d) in figures.iter_mut().zip(&done) {
        f.cold_start_s = d.unwrap_or_default();
    }
    // Let the proxies finish what follows their first restore (metrics, conntrack) before reading.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The first full sync (both proxies starting together), as each reports it.
    let mut first_syncs = Vec::new();
    for (i, setup) in setups.iter().enumerate() {
        let series = setup.full_syncs().await?;
        let (mean, count) = proxies::mean_since(&proxies::Series::new(), &series);
        figures[i].first_full_sync_s = mean;
        figures[i].full_syncs = count as u64;
        first_syncs.push(series);
    }
    // A full resync of each proxy alone: its canary chains deleted (as a flush would), then the next
    // full sync it reports; then iptables-restore alone loading the same rules, also alone.
    for (i, setup) in setups.iter().enumerate() {
        setup.delete_canary().await?;
        let limit = Instant::now() + RESYNC_LIMIT;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = setup.full_syncs().await?;
            let (mean, count) = proxies::mean_since(&first_syncs[i], &now);
            // Done once the IPv4 family (whose canary went) has synced again: kube-proxy's IPv6 resync
            // alone (milliseconds) is not the figure.
            let main = proxies::main_series(&first_syncs[i]);
            let main_synced = main.is_none_or(|labels| {
                let count_of = |s: &proxies::Series| s.get(&labels).map_or(0.0, |v| v.1);
                count_of(&now) > count_of(&first_syncs[i])
            });
            if count > 0.0 && main_synced {
                figures[i].full_sync_s = mean;
                break;
            }
            if Instant::now() > limit {
                bail!(
                    "{} made no full resync {RESYNC_LIMIT:?} after its canary was deleted",
                    setup.kind.label()
                );
            }
        }
        // Let the other families' resync (kube-proxy's IPv6) finish before the next measurement.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rules = setup.save().await?;
        figures[i].rules = rules.lines().filter(|l| l.starts_with("-A ")).count();
        figures[i].restore_alone_s = proxies::restore_alone(args.iptables, &rules, &setup.dir)
            .await?
            .as_secs_f64();
        eprintln!(
            "bench: {size}: {} first full sync {:.2} s, resync alone {:.2} s, restore alone {:.2} s, {} rules",
            setup.kind.label(),
            figures[i].first_full_sync_s,
            figures[i].full_sync_s,
            figures[i].restore_alone_s,
            figures[i].rules
        );
    }

    // Data plane: new connections from each node to the VIP and to a pod IP.
    for (i, setup) in setups.iter().enumerate() {
        let (vip_times, vip_failed) = connect_times(&setup.netns, vip, args.connects).await?;
        let (pod_times, pod_failed) = connect_times(&setup.netns, pod_addr, args.connects).await?;
        figures[i].connect_vip_us = Summary::of(&vip_times);
        figures[i].connect_pod_us = Summary::of(&pod_times);
        figures[i].connect_failures = vip_failed + pod_failed;
    }

    // Change latency, with background churn on the filler services.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = tokio::spawn(churn_loop(
        client.clone(),
        stop.clone(),
        args.churn,
        size,
        args.endpoints,
        endpoint_node.to_owned(),
    ));
    let mut samples: Vec<Vec<f64>> = setups.iter().map(|_| Vec::new()).collect();
    for change in 0..args.changes {
        *probe_at = (*probe_at + 1) % targets.len();
        let target = &targets[*probe_at];
        let t0 = Instant::now();
        objects::apply_slice(client, &objects::slice(PROBE, &[target.ip], endpoint_node)).await?;
        let waits = setups
            .iter()
            .map(|s| wait_for_target(s.netns.clone(), vip, target.name.clone(), t0));
        let seen = futures::future::join_all(waits).await;
        for (i, result) in seen.into_iter().enumerate() {
            match result? {
                Some(d) => samples[i].push(d.as_secs_f64() * 1000.0),
                None => figures[i].change_timeouts += 1,
            }
        }
        if change % 10 == 9 {
            eprintln!("bench: {size}: {} changes timed", change + 1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churn.await;
    for (i, setup) in setups.iter().enumerate() {
        figures[i].change_latency_ms = Summary::of(&samples[i]);
        let r = running[i].as_ref().context("started")?;
        // `ip netns exec` execs the proxy, so the spawned pid is the proxy's own.
        figures[i].usage = proxies::usage(r.process.pid())?;
        figures[i].syncs = setup.syncs().await?;
        eprintln!(
            "bench: {size}: {} change p50 {:.0} ms p99 {:.0} ms, peak RSS {:.1} MiB, CPU {:.1} s",
            setup.kind.label(),
            figures[i].change_latency_ms.p50,
            figures[i].change_latency_ms.p99,
            figures[i].usage.peak_rss_mib,
            figures[i].usage.cpu_seconds
        );
    }
    // Stop both before the next size's objects are written (they would sync all the while).
    for slot in running.iter_mut() {
        if let Some(mut r) = slot.take() {
            r.process.stop(Duration::from_secs(10)).await;
        }
    }
    let proxies: BTreeMap<String, ProxyFigures> = setups
        .iter()
        .zip(figures)
        .map(|(s, f)| (s.kind.label().to_owned(), f))
        .collect();
    Ok(Point {
        services: size,
        endpoints_per_service: args.endpoints,
        churn_per_second: args.churn,
        proxies,
    })
}

/// Updates one endpoint of a random filler service `rate` times per second until `stop`.
async fn churn_loop(
    client: Client,
    stop: Arc<AtomicBool>,
    rate: f64,
    size: usize,
    per_service: usize,
    node: String,
) {
    if rate <= 0.0 || size < 2 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut k: u64 = 0;
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // A simple LCG spreads the updates over the fillers without a dependency.
        let i = usize::try_from((k.wrapping_mul(2_654_435_761)) % (size as u64 - 1)).unwrap_or(0);
        let mut ips: Vec<Ipv4Addr> = (0..per_service)
            .map(|j| objects::filler_ip(i, j, per_service))
            .collect();
        if let Some(first) = ips.first_mut() {
            *first = objects::churn_ip(k);
        }
        let slice = objects::slice(&objects::filler_name(i), &ips, &node);
        if let Err(error) = objects::apply_slice(&client, &slice).await {
            eprintln!("bench: churn write failed: {error}");
        }
        k += 1;
        next += period;
        tokio::time::sleep_until(next).await;
    }
}

/// Connect times (µs) of `count` new TCP connections from inside `ns` to `addr`, and how many attempts
/// failed (no answer within [`DATA_PLANE_LIMIT`], or refused).
async fn connect_times(ns: &str, addr: SocketAddr, count: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    let times = crate::netns::in_netns_async(ns, move || {
        let mut out = Vec::with_capacity(count);
        let mut failed = 0;
        for _ in 0..count {
            let start = Instant::now();
            match std::net::TcpStream::connect_timeout(&addr, DATA_PLANE_LIMIT) {
                Ok(stream) => {
                    out.push(start.elapsed().as_secs_f64() * 1e6);
                    drop(stream);
                }
                Err(_) => failed += 1,
            }
        }
        Ok((out, failed))
    })
    .await?;
    Ok(times)
}

/// Opens connections to `vip` from inside `ns` until `target` answers; the time since `t0`, or `None`
/// after [`CHANGE_LIMIT`].
async fn wait_for_target(
    ns: String,
    vip: SocketAddr,
    target: String,
    t0: Instant,
) -> anyhow::Result<Option<Duration>> {
    let seen = crate::netns::in_netns_async(&ns, move || {
        while t0.elapsed() < CHANGE_LIMIT {
            if let Ok(mut stream) = std::net::TcpStream::connect_timeout(&vip, CONNECT_LIMIT) {
                let _ = stream.set_read_timeout(Some(CONNECT_LIMIT));
                let mut text = String::new();
                if stream.read_to_string(&mut text).is_ok()
                    && EchoReply::parse(text.trim()).is_ok_and(|r| r.pod == target)
                {
                    return Ok(Some(t0.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(None)
    })
    .await?;
    Ok(seen)
}
