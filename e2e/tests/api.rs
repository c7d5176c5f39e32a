//! The Switchyard API on the real API server: the generated CRDs become Established, every example
//! ProxyConfig is accepted, and invalid ProxyConfigs are refused by the server's own schema and CEL
//! validation, each with the message a user sees from `kubectl apply` (the client-side check of the
//! same cases is crds/tests/schema.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{BIN, MANAGER};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use switchyard_api::ProxyConfig;
use switchyard_e2e::testing::{self, SharedCluster, eventually};
use switchyard_e2e::{Cluster, Error};

static CLUSTER: SharedCluster = SharedCluster::new();

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A cluster with the CRDs applied and Established (no nodes needed).
async fn cluster() -> Arc<Cluster> {
    let cluster = CLUSTER.get(|| testing::spec("e2eapi", 0, BIN)).await.unwrap();
    install_crds(&cluster).await;
    cluster
}

fn crd_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

async fn install_crds(cluster: &Cluster) -> Vec<String> {
    let crds = Api::<CustomResourceDefinition>::all(cluster.client().await.unwrap());
    let mut names = vec![];
    for file in crd_files() {
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("{} is refused: {e}", file.display()));
        names.push(name);
    }
    for name in &names {
        eventually(
            &format!("{name} Established"),
            Duration::from_secs(30),
            || async {
                let crd = crds.get(name).await.map_err(|e| Error::Failed(e.to_string()))?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            },
        )
        .await
        .unwrap();
    }
    names
}

fn proxyconfigs(client: kube::Client) -> Api<DynamicObject> {
    Api::all_with(client, &ApiResource::erase::<ProxyConfig>(&()))
}

fn proxyconfig(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn crds_become_established_on_the_real_api_server() {
    require_root!("crds_become_established_on_the_real_api_server");
    let cluster = CLUSTER.get(|| testing::spec("e2eapi", 0, BIN)).await.unwrap();
    let names = install_crds(&cluster).await;
    assert_eq!(
        names,
        ["proxyconfigs.switchyard.dev", "proxynodes.switchyard.dev"]
    );
}

#[tokio::test]
async fn every_example_proxyconfig_is_accepted() {
    require_root!("every_example_proxyconfig_is_accepted");
    let cluster = cluster().await;
    let api = proxyconfigs(cluster.client().await.unwrap());
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("proxyconfig-") || !name.ends_with(".yaml") {
            continue;
        }
        let object: DynamicObject = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{name} is refused: {e}"));
        api.delete(&created.metadata.name.unwrap(), &DeleteParams::default())
            .await
            .unwrap();
        seen += 1;
    }
    assert!(seen >= 3, "expected an example per mode, found {seen}");
}

#[tokio::test]
async fn invalid_proxyconfigs_are_refused_with_a_clear_message() {
    require_root!("invalid_proxyconfigs_are_refused_with_a_clear_message");
    let cluster = cluster().await;
    let api = proxyconfigs(cluster.client().await.unwrap());
    // The cases of crds/tests/schema.rs, with the API server's wording for OpenAPI checks (CEL rules
    // carry our own messages).
    let cases = [
        (json!({}), "spec.mode: Required value"),
        (
            json!({"mode": "userspace"}),
            r#"spec.mode: Unsupported value: "userspace""#,
        ),
        (
            json!({"mode": "iptables", "masqueradeBit": 32}),
            "spec.masqueradeBit in body should be less than or equal to 31",
        ),
        (
            json!({"mode": "iptables", "masqueradeBit": -1}),
            "spec.masqueradeBit in body should be greater than or equal to 0",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "-5s"}),
            "spec.syncPeriod in body should match",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "soon"}),
            "spec.syncPeriod in body should match",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "0s"}),
            "must be a positive duration",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "10s", "minSyncPeriod": "20s"}),
            "minSyncPeriod must not be longer than spec.syncPeriod",
        ),
        (
            json!({"mode": "iptables", "minSyncPeriod": "45s"}),
            "minSyncPeriod must not be longer",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["10.244.0.0/33"]}),
            "must be a CIDR",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["banana"]}),
            "must be a CIDR",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["10.0.0.0/8", "11.0.0.0/8"]}),
            "at most one CIDR per IP family",
        ),
        (
            json!({"mode": "iptables", "nodePortAddresses": ["primary", "10.0.0.0/8"]}),
            "primary cannot be combined",
        ),
        (
            json!({"mode": "iptables", "nodePortAddresses": ["eth0"]}),
            "must be a CIDR or the word primary",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": 0}}),
            "must be an integer of at least 1",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": "0%"}}),
            "or a percentage from 1% to 100%",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": "150%"}}),
            "or a percentage from 1% to 100%",
        ),
        (
            json!({"mode": "iptables", "rollout": {"progressDeadlineSeconds": 0}}),
            "spec.rollout.progressDeadlineSeconds in body should be greater than or equal to 1",
        ),
        (
            json!({"mode": "iptables", "ipvs": {"scheduler": "rr"}}),
            "spec.ipvs is only allowed when spec.mode is ipvs",
        ),
        (
            json!({"mode": "ipvs", "ipvs": {"scheduler": "fastest"}}),
            r#"spec.ipvs.scheduler: Unsupported value: "fastest""#,
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "ClusterCIDR"}}),
            "ClusterCIDR needs spec.clusterCIDRs",
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "BridgeInterface"}}),
            "bridgeInterface is required",
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "NodeCIDR", "interfaceNamePrefix": "veth"}}),
            "interfaceNamePrefix is required with mode InterfaceNamePrefix and only allowed with it",
        ),
        (
            json!({"mode": "iptables", "healthzBindAddress": "localhost:10256"}),
            "spec.healthzBindAddress in body should match",
        ),
        (
            json!({"mode": "iptables", "conntrack": {"maxPerCore": -1}}),
            "spec.conntrack.maxPerCore in body should be greater than or equal to 0",
        ),
        (
            json!({"mode": "iptables", "conntrack": {"tcpEstablishedTimeout": "1 day"}}),
            "spec.conntrack.tcpEstablishedTimeout in body should match",
        ),
        (
            json!({"mode": "iptables", "proxyName": "Not_A_Label"}),
            "spec.proxyName in body should match",
        ),
        (
            json!({"mode": "iptables", "agent": {"logLevel": "verbose"}}),
            r#"spec.agent.logLevel: Unsupported value: "verbose""#,
        ),
    ];
    let mut wrong = vec![];
    for (spec, expected) in cases {
        match api
            .create(&PostParams::default(), &proxyconfig("invalid", spec.clone()))
            .await
        {
            Ok(_) => {
                api.delete("invalid", &DeleteParams::default()).await.unwrap();
                wrong.push(format!("{spec} was accepted; expected {expected:?}"));
            }
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(expected) => {}
            Err(e) => wrong.push(format!("{spec}: expected {expected:?}, got {e}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn long_proxyconfig_names_are_refused() {
    require_root!("long_proxyconfig_names_are_refused");
    let cluster = cluster().await;
    let api = proxyconfigs(cluster.client().await.unwrap());
    let err = api
        .create(
            &PostParams::default(),
            &proxyconfig(&"x".repeat(51), json!({"mode": "iptables"})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("name must be at most 50 characters"),
        "{err}"
    );
}
