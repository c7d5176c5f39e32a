//! The node simulator: plays the kubelet for one simulated node. It registers the Node (labels, pod
//! CIDRs, addresses, Ready), renews its Lease in `kube-node-lease`, and runs the pods bound to it
//! ([`pod`]). It authenticates as `system:node:<name>`, so the API server's Node authorizer and
//! NodeRestriction admission apply to it as they would to a kubelet.

pub mod env;
pub mod images;
pub mod pod;
pub mod status;
pub mod volumes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::node::pod::{FIELD_MANAGER, NodeCtx, PodEvent};

/// Kubelet version the simulated nodes report (the control plane's version).
pub const KUBELET_VERSION: &str = "v1.35.4";
const LEASE_SECONDS: i32 = 40;
const LEASE_RENEW: Duration = Duration::from_secs(10);
const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// Node labels: hostname, OS/arch and zone.
pub fn labels(ctx: &NodeCtx) -> Value {
    json!({
        "kubernetes.io/hostname": ctx.node.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "topology.kubernetes.io/zone": ctx.node.zone,
        "topology.kubernetes.io/region": "local",
    })
}

/// The Node as registered: labels and pod CIDRs.
pub fn node_body(ctx: &NodeCtx) -> Value {
    let cidrs: Vec<String> = ctx.node.pod_cidrs.iter().map(ToString::to_string).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": ctx.node.name, "labels": labels(ctx)},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
    })
}

/// The Node's status: addresses, capacity, Ready and the pressure conditions, node info.
pub fn status_body(ctx: &NodeCtx, since: Timestamp, heartbeat: Timestamp) -> Value {
    let time = |t: Timestamp| serde_json::to_value(Time(t)).unwrap_or(Value::Null);
    let mut addresses: Vec<Value> = ctx
        .node
        .ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": ctx.node.name}));
    let condition = |ty: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": ty, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": time(heartbeat), "lastTransitionTime": time(since),
        })
    };
    let resources = json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"});
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": ctx.node.name},
        "status": {
            "addresses": addresses,
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated node"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated node"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "simulated node"),
                condition("Ready", "True", "KubeletReady", "switchyard e2e node simulator is ready"),
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": format!("swyd-{}-{}", ctx.layout.name, ctx.node.name),
                "systemUUID": format!("swyd-{}-{}", ctx.layout.name, ctx.node.name),
                "bootID": format!("swyd-{}-{}", ctx.layout.name, ctx.node.index),
                "kernelVersion": kernel_version(),
                "osImage": "Switchyard e2e simulated node",
                "containerRuntimeVersion": "switchyard-e2e://0.1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    })
}

/// Node status goes as a merge patch, not server-side apply: the apply schema keys `status.addresses`
/// by type alone, so a dual-stack node's two InternalIPs are refused as duplicates (as the kubelet
/// also patches node status rather than applying it).
fn status_patch(ctx: &NodeCtx, since: Timestamp) -> Patch<Value> {
    Patch::Merge(status_body(ctx, since, Timestamp::now()))
}

fn status_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A running node simulator.
#[derive(Debug)]
pub struct NodeHandle {
    /// Node name.
    pub name: String,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl NodeHandle {
    /// Stops the node: every pod's processes and namespaces go; the API is left alone.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Registers the node and starts its simulator.
pub async fn start(ctx: Arc<NodeCtx>) -> Result<NodeHandle> {
    let since = Timestamp::now();
    let nodes = Api::<Node>::all(ctx.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let node = nodes
        .patch(&ctx.node.name, &params, &Patch::Apply(node_body(&ctx)))
        .await
        .map_err(|e| Error::kube(format!("registering node {}", ctx.node.name), e))?;
    let uid = node.metadata.uid.clone().unwrap_or_default();
    nodes
        .patch_status(&ctx.node.name, &status_params(), &status_patch(&ctx, since))
        .await
        .map_err(|e| Error::kube(format!("reporting node {} Ready", ctx.node.name), e))?;
    renew_lease(&ctx, &uid).await?;

    let (shutdown, rx) = watch::channel(false);
    let name = ctx.node.name.clone();
    let task = tokio::spawn(run(ctx, uid, since, rx));
    Ok(NodeHandle { name, shutdown, task })
}

async fn renew_lease(ctx: &NodeCtx, node_uid: &str) -> Result<()> {
    let leases = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease");
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": ctx.node.name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": ctx.node.name, "uid": node_uid}],
        },
        "spec": {
            "holderIdentity": ctx.node.name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": serde_json::to_value(MicroTime(Timestamp::now())).unwrap_or(Value::Null),
        },
    });
    leases
        .patch(
            &ctx.node.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(drop)
        .map_err(|e| Error::kube(format!("renewing the lease of {}", ctx.node.name), e))
}

async fn run(ctx: Arc<NodeCtx>, node_uid: String, since: Timestamp, mut shutdown: watch::Receiver<bool>) {
    let mut pods: HashMap<String, (watch::Sender<PodEvent>, JoinHandle<()>)> = HashMap::new();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node.name));
    let mut stream = watcher::watcher(Api::<Pod>::all(ctx.client.clone()), config)
        .default_backoff()
        .boxed();
    let mut lease = tokio::time::interval(LEASE_RENEW);
    let mut status = tokio::time::interval(STATUS_REFRESH);
    let mut listed: Option<Vec<String>> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = lease.tick() => {
                if let Err(e) = renew_lease(&ctx, &node_uid).await {
                    tracing::warn!(node = %ctx.node.name, error = %e, "lease renewal failed");
                }
            }
            _ = status.tick() => {
                let nodes = Api::<Node>::all(ctx.client.clone());
                if let Err(e) = nodes.patch_status(&ctx.node.name, &status_params(), &status_patch(&ctx, since)).await {
                    tracing::warn!(node = %ctx.node.name, error = %e, "node status update failed");
                }
            }
            event = stream.next() => match event {
                Some(Ok(Event::Init)) => listed = Some(vec![]),
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some(uid) = pod.metadata.uid.clone() {
                        listed.get_or_insert_with(Vec::new).push(uid);
                    }
                    dispatch(&ctx, &mut pods, pod);
                }
                Some(Ok(Event::InitDone)) => {
                    // Pods that vanished while the watch was down.
                    let seen = listed.take().unwrap_or_default();
                    for (uid, (tx, _)) in pods.iter() {
                        if !seen.contains(uid) {
                            let _ = tx.send(PodEvent::Gone);
                        }
                    }
                }
                Some(Ok(Event::Apply(pod))) => dispatch(&ctx, &mut pods, pod),
                Some(Ok(Event::Delete(pod))) => {
                    if let Some((tx, _)) = pod.metadata.uid.as_ref().and_then(|uid| pods.get(uid)) {
                        let _ = tx.send(PodEvent::Gone);
                    }
                }
                Some(Err(e)) => tracing::warn!(node = %ctx.node.name, error = %e, "pod watch error"),
                None => break,
            },
        }
        pods.retain(|_, (_, task)| !task.is_finished());
    }
    for (_, (tx, task)) in pods.drain() {
        let _ = tx.send(PodEvent::Shutdown);
        let _ = task.await;
    }
}

fn dispatch(
    ctx: &Arc<NodeCtx>,
    pods: &mut HashMap<String, (watch::Sender<PodEvent>, JoinHandle<()>)>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let pod = Arc::new(pod);
    match pods.get(&uid) {
        Some((tx, task)) if !task.is_finished() => {
            let _ = tx.send(PodEvent::Present(pod));
        }
        Some(_) => {}
        None => {
            // Terminal pods left from before (none on a fresh node) and pods already gone are not started.
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded") | Some("Failed"))
                && pod.metadata.deletion_timestamp.is_none()
            {
                return;
            }
            tracing::info!(node = %ctx.node.name, pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")), "pod bound");
            let (tx, rx) = watch::channel(PodEvent::Present(pod));
            let task = tokio::spawn(pod::run(ctx.clone(), rx));
            pods.insert(uid, (tx, task));
        }
    }
}
