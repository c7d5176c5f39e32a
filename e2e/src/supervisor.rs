//! The supervisor: the long-lived process behind one cluster (`switchyard-e2e supervise`). It builds
//! the network, the certificates and the kubeconfigs, starts the control plane, serves the loopback
//! forwarder, runs the node simulators, writes `ready.json`, and tears everything down on SIGTERM or
//! SIGINT, when a control-plane component dies, or when its owner process (a test binary) is gone.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::Api;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::cleanup;
use crate::cluster::{ReadyInfo, scope};
use crate::controlplane::{self, ControlPlane, wait_until};
use crate::error::{Error, IoContext, Result};
use crate::forward;
use crate::kubeconfig;
use crate::layout::{ClusterSpec, Layout};
use crate::network;
use crate::node::pod::NodeCtx;
use crate::node::{self, NodeHandle};
use crate::pki::{self, Pki};

#[derive(Debug, Default)]
struct Running {
    control_plane: ControlPlane,
    forwarder: Option<JoinHandle<()>>,
    nodes: Vec<NodeHandle>,
}

impl Running {
    async fn teardown(&mut self, layout: &Layout) {
        for node in self.nodes.drain(..) {
            node.stop().await;
        }
        self.control_plane.stop().await;
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
        if let Err(e) = network::delete(layout) {
            tracing::warn!(error = %e, "deleting namespaces");
        }
        tracing::info!(cluster = %layout.name, "torn down");
    }
}

/// Runs the cluster whose `spec.json` is in `state_dir` until told to stop.
pub async fn run(state_dir: &Path) -> Result<()> {
    let spec_path = state_dir.join("spec.json");
    let text = std::fs::read(&spec_path).ctx(|| format!("reading {}", spec_path.display()))?;
    let spec: ClusterSpec =
        serde_json::from_slice(&text).ctx(|| format!("parsing {}", spec_path.display()))?;
    let layout = Arc::new(spec.layout());
    std::fs::write(layout.pid_file(), std::process::id().to_string())
        .ctx(|| "writing the pid file".into())?;

    // Signals are caught from the start, so a stop during bring-up still tears down.
    let mut term = signal(SignalKind::terminate()).ctx(|| "catching SIGTERM".into())?;
    let mut int = signal(SignalKind::interrupt()).ctx(|| "catching SIGINT".into())?;
    let mut hup = signal(SignalKind::hangup()).ctx(|| "catching SIGHUP".into())?;

    let mut running = Running::default();
    let started = Instant::now();
    let up = tokio::select! {
        r = bring_up(&spec, &layout, &mut running, started) => r,
        _ = term.recv() => Err(Error::Failed("stopped (SIGTERM) while starting".into())),
        _ = int.recv() => Err(Error::Failed("stopped (SIGINT) while starting".into())),
    };
    let info = match up {
        Ok(info) => info,
        Err(e) => {
            tracing::error!(error = %e, "bringing the cluster up failed");
            let _ = std::fs::write(layout.failed_file(), e.to_string());
            running.teardown(&layout).await;
            if spec.owner_pid.is_some_and(|owner| !cleanup::alive(owner)) {
                cleanup::remove(&scope(&spec.state_root, &spec.name))?;
            }
            return Err(e);
        }
    };
    let json = serde_json::to_vec_pretty(&info).ctx(|| "encoding ready.json".into())?;
    std::fs::write(layout.ready_file(), json).ctx(|| "writing ready.json".into())?;
    tracing::info!(cluster = %layout.name, seconds = info.start_seconds, kubeconfig = %info.kubeconfig.display(), "cluster ready");

    let mut check = tokio::time::interval(Duration::from_secs(1));
    let mut owner_gone = false;
    let reason = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM".to_owned(),
            _ = int.recv() => break "SIGINT".to_owned(),
            _ = hup.recv() => {}
            _ = check.tick() => {
                if let Some(owner) = spec.owner_pid && !cleanup::alive(owner) {
                    owner_gone = true;
                    break format!("owner process {owner} is gone");
                }
                if let Some(exited) = running.control_plane.exited() {
                    break exited;
                }
            }
        }
    };
    tracing::info!(%reason, "stopping");
    running.teardown(&layout).await;
    if owner_gone {
        // Nobody will run `cluster down`: remove the rest (the state folder) ourselves.
        cleanup::remove(&scope(&spec.state_root, &spec.name))?;
    }
    Ok(())
}

async fn bring_up(
    spec: &ClusterSpec,
    layout: &Arc<Layout>,
    running: &mut Running,
    started: Instant,
) -> Result<ReadyInfo> {
    controlplane::check_binaries(&spec.upstream_bin)?;
    for dir in [layout.logs_dir(), layout.kubeconfigs_dir(), layout.pods_dir()] {
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    let step = |what: &str| tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "{what}");

    let pki = pki::generate(layout)?;
    step("certificates generated");
    network::create(layout).await?;
    step("network created");

    let listener = forward::listen(spec.api_port).await?;
    let port = listener
        .local_addr()
        .ctx(|| "reading the forwarder's port".into())?
        .port();
    let host_server = format!("https://127.0.0.1:{port}");
    let cp_server = format!("https://{}", layout.apiserver_addr());
    let cluster_name = format!("swyd-{}", layout.name);
    let kc_dir = layout.kubeconfigs_dir();
    kubeconfig::write(
        &layout.admin_kubeconfig(),
        &kubeconfig::render(&cluster_name, &host_server, &pki.ca.cert, "admin", &pki.admin),
    )?;
    let cm_kc = kc_dir.join("controller-manager.conf");
    kubeconfig::write(
        &cm_kc,
        &kubeconfig::render(
            &cluster_name,
            &cp_server,
            &pki.ca.cert,
            "controller-manager",
            &pki.controller_manager,
        ),
    )?;
    let sched_kc = kc_dir.join("scheduler.conf");
    kubeconfig::write(
        &sched_kc,
        &kubeconfig::render(
            &cluster_name,
            &cp_server,
            &pki.ca.cert,
            "scheduler",
            &pki.scheduler,
        ),
    )?;
    for n in &layout.nodes {
        let user = format!("system:node:{}", n.name);
        let text = kubeconfig::render(
            &cluster_name,
            &host_server,
            &pki.ca.cert,
            &user,
            &Pki::node(layout, &n.name),
        );
        kubeconfig::write(&kc_dir.join(format!("{}.conf", n.name)), &text)?;
    }

    running
        .control_plane
        .start_etcd(layout, &spec.upstream_bin)
        .await?;
    step("etcd healthy");
    running
        .control_plane
        .start_apiserver(layout, &spec.upstream_bin, &pki)?;
    running.forwarder = Some(forward::serve(
        listener,
        layout.cp_netns(),
        layout.apiserver_addr(),
    ));
    let admin = kubeconfig::client(&layout.admin_kubeconfig()).await?;
    let readyz = || async {
        let req = http::Request::get("/readyz").body(Vec::new());
        match req {
            Ok(req) => matches!(admin.request_text(req).await, Ok(body) if body.trim() == "ok"),
            Err(_) => false,
        }
    };
    wait_until(
        "kube-apiserver /readyz",
        Duration::from_secs(120),
        Some(&running.control_plane),
        readyz,
    )
    .await?;
    step("kube-apiserver ready");
    // Only now: the controller manager exits at start if the API server's bootstrap RBAC is not there yet.
    running
        .control_plane
        .start_controllers(layout, &spec.upstream_bin, &pki, &cm_kc, &sched_kc)?;

    let spec_arc = Arc::new(spec.clone());
    for n in &layout.nodes {
        let client = kubeconfig::client(&kc_dir.join(format!("{}.conf", n.name))).await?;
        let ctx = Arc::new(NodeCtx {
            spec: spec_arc.clone(),
            layout: layout.clone(),
            node: n.clone(),
            client,
            apiserver: layout.apiserver_addr(),
            used_ips: Mutex::new(BTreeSet::new()),
        });
        running.nodes.push(node::start(ctx).await?);
    }
    step("nodes registered");

    let nodes_api = Api::<Node>::all(admin.clone());
    let expected = layout.nodes.len();
    wait_until(
        "every node Ready and schedulable",
        Duration::from_secs(120),
        Some(&running.control_plane),
        || async {
            let Ok(list) = nodes_api.list(&Default::default()).await else {
                return false;
            };
            list.items.len() == expected && list.items.iter().all(node_ready_and_untainted)
        },
    )
    .await?;
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), "default");
    wait_until(
        "the default ServiceAccount",
        Duration::from_secs(60),
        Some(&running.control_plane),
        || async { matches!(sa.get_opt("default").await, Ok(Some(_))) },
    )
    .await?;
    if let Some(exited) = running.control_plane.exited() {
        return Err(Error::Failed(exited));
    }
    step("nodes Ready");
    Ok(ReadyInfo {
        name: layout.name.clone(),
        kubeconfig: layout.admin_kubeconfig(),
        server: host_server,
        api_port: port,
        supervisor_pid: std::process::id(),
        nodes: layout.nodes.clone(),
        start_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Ready, and without the `node.kubernetes.io/not-ready` taint the API server adds at registration
/// (the node lifecycle controller removes it), so pods can be scheduled.
pub fn node_ready_and_untainted(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.key.starts_with("node.kubernetes.io/not-ready"))
        });
    ready && !tainted
}
