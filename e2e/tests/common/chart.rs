//! Helpers of the tests that install the Helm chart on a local cluster (switchyard.rs and
//! switchyard_rollout.rs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::{Api, Client};
use serde_json::Value;
use switchyard_api::{ProxyConfig, ProxyNode};
use switchyard_e2e::testing::{self, SharedCluster, eventually};
use switchyard_e2e::{Cluster, Error};
use tokio::sync::OnceCell;

use super::{BIN, ready_pods};

/// The Helm release.
pub const RELEASE: &str = "switchyard";
/// Its namespace.
pub const SYSTEM_NS: &str = "switchyard-system";
/// Label selector of the operator pods.
pub const OPERATOR_SELECTOR: &str = "app.kubernetes.io/component=operator";

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A kube error as the harness's error (for `eventually` closures).
pub fn kerr(e: kube::Error) -> Error {
    Error::Failed(e.to_string())
}

/// The shared cluster `name` of `nodes` nodes, with the agent and operator the simulated nodes run built
/// first (once per test binary, unless `SWITCHYARD_AGENT_BIN`/`SWITCHYARD_OPERATOR_BIN` name prebuilt
/// ones).
pub async fn cluster(slot: &SharedCluster, built: &OnceCell<()>, name: &str, nodes: u8) -> Arc<Cluster> {
    built
        .get_or_init(|| async {
            let spec = testing::spec(name, nodes, BIN).unwrap();
            if std::env::var_os("SWITCHYARD_AGENT_BIN").is_some()
                && std::env::var_os("SWITCHYARD_OPERATOR_BIN").is_some()
            {
                return;
            }
            // The harness runs $CARGO_TARGET_DIR/debug/switchyard-{agent,operator}: build exactly those.
            let target = spec.agent_bin.parent().unwrap().parent().unwrap().to_owned();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--locked", "-p", "switchyard-agent"])
                .args(["-p", "switchyard-operator"])
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(repo_root())
                .status()
                .expect("running cargo build");
            assert!(status.success(), "cargo build of the agent and operator failed");
        })
        .await;
    slot.get(|| testing::spec(name, nodes, BIN)).await.unwrap()
}

fn helm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_HELM") {
        return path.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cache = std::env::var_os("SWITCHYARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(home).join(".cache/switchyard"));
    cache.join("bin/helm")
}

/// Runs helm against the cluster; returns (success, stdout + stderr).
pub async fn helm(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(helm_bin())
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .current_dir(repo_root())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", helm_bin().display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Installs the chart (unless the release is there) and waits for the operator; the API server address
/// is the control plane's node-network address, as `apiServer.host` would be on a real cluster.
pub async fn installed(cluster: &Cluster) {
    if helm(cluster, &["status", RELEASE, "-n", SYSTEM_NS]).await.0 {
        return;
    }
    let host = format!("apiServer.host={}", cluster.layout().cp_ips()[0]);
    let (ok, out) = helm(
        cluster,
        &[
            "install",
            RELEASE,
            "charts/switchyard",
            "-n",
            SYSTEM_NS,
            "--create-namespace",
            "--set",
            &host,
            "--set",
            "apiServer.port=6443",
            "--wait",
            "--timeout",
            "3m",
        ],
    )
    .await;
    assert!(ok, "helm install failed:\n{out}");
    assert!(
        out.contains("kubectl get proxyconfig"),
        "the release notes tell what to run next:\n{out}"
    );
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), SYSTEM_NS);
    ready_pods(&pods, OPERATOR_SELECTOR, 1).await;
}

/// ProxyConfigs, untyped (status is read as JSON).
pub fn proxyconfigs(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<ProxyConfig>(&()))
}

/// ProxyNodes, untyped.
pub fn proxynodes(client: Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<ProxyNode>(&()))
}

/// The status condition `type_` of `object`.
pub fn condition<'a>(object: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// The example ProxyConfig of the README, as JSON.
pub fn example_proxyconfig() -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples/proxyconfig-iptables.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// The names of the cluster's nodes.
pub fn node_names(cluster: &Cluster) -> Vec<String> {
    cluster.layout().nodes.iter().map(|n| n.name.clone()).collect()
}

/// Whether the ProxyConfig has acted on its last change and reports `ready` and Ready=True.
pub fn is_ready(pc: &DynamicObject, ready: &str) -> bool {
    let status = &pc.data["status"];
    status["observedGeneration"].as_i64() == pc.metadata.generation
        && status["ready"] == ready
        && condition(pc, "Ready").is_some_and(|c| c["status"] == "True")
}

/// Waits (at most `timeout`) until the ProxyConfig has acted on its last change and reports `ready` and
/// Ready=True.
pub async fn proxyconfig_ready(client: &Client, name: &str, ready: &str, timeout: Duration) -> DynamicObject {
    let api = proxyconfigs(client.clone());
    eventually(&format!("ProxyConfig {name} Ready {ready}"), timeout, || async {
        let Some(pc) = api.get_opt(name).await.map_err(kerr)? else {
            return Ok(None);
        };
        Ok(is_ready(&pc, ready).then_some(pc))
    })
    .await
    .unwrap()
}
