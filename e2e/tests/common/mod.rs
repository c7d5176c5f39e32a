//! Helpers shared by the e2e test binaries.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod chart;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchyard_e2e::testing::eventually;

/// The harness binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard-e2e");
/// Field manager of test writes.
pub const MANAGER: &str = "switchyard-e2e-test";
/// How long pods get to become ready.
pub const POD_TIMEOUT: Duration = Duration::from_secs(60);

/// Skips (returns) unless root; fails when SWITCHYARD_REQUIRE_PRIVILEGED=1 and not root.
#[macro_export]
macro_rules! require_root {
    ($name:expr) => {
        if !switchyard_e2e::testing::privileged($name).unwrap() {
            return;
        }
    };
}

/// Server-side applies `object` through `api`.
pub async fn apply<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"))
}

/// A pod running the echo image, optionally pinned to a node.
pub fn echo_pod(name: &str, node: Option<&str>, grace_seconds: i64) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": grace_seconds,
            "containers": [{
                "name": "echo",
                "image": "switchyard.dev/echo:test",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}, {"containerPort": 8080, "protocol": "UDP"}],
            }],
        },
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

/// Whether the pod is Running with its Ready condition True and a pod IP.
pub fn running_and_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return false };
    status.phase.as_deref() == Some("Running")
        && status.pod_ip.is_some()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Waits until exactly `count` pods match `selector` and all are Running and Ready.
pub async fn ready_pods(api: &Api<Pod>, selector: &str, count: usize) -> Vec<Pod> {
    eventually(&format!("{count} ready pods {selector}"), POD_TIMEOUT, || async {
        let pods = api
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(|e| switchyard_e2e::Error::Failed(e.to_string()))?;
        let live: Vec<Pod> = pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        Ok((live.len() == count && live.iter().all(running_and_ready)).then_some(live))
    })
    .await
    .unwrap()
}

/// Waits until the named pod is Running and Ready.
pub async fn ready_pod(api: &Api<Pod>, name: &str) -> Pod {
    eventually(&format!("pod {name} ready"), POD_TIMEOUT, || async {
        let pod = api
            .get_opt(name)
            .await
            .map_err(|e| switchyard_e2e::Error::Failed(e.to_string()))?;
        Ok(pod.filter(running_and_ready))
    })
    .await
    .unwrap()
}

/// A pod's IPs (IPv4 first).
pub fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.parse().unwrap()).collect())
        .unwrap_or_default()
}
