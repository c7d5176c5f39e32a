//! Switchyard itself on the local cluster (issue 5's e2e scenarios): the chart installed with the real
//! `helm`, the operator and the agents running as the locally built binaries on three simulated nodes.
//!
//! - a ProxyConfig puts an agent on every node and turns Ready 3/3; a ClusterIP and a NodePort Service then
//!   balance TCP and UDP traffic from a pod on another node, from a node's own namespace and from outside the
//!   nodes (the node network's gateway namespace);
//! - an invalid ProxyConfig (new or as an update) is refused with the API server's message and nothing
//!   changes on the nodes;
//! - two ProxyConfigs selecting the same node: the newer reports the conflict and no node runs two agents;
//! - deleting the ProxyConfig removes every SWYD- rule from every node, and `helm uninstall` leaves no
//!   Switchyard object.
//!
//! The tests share one cluster and one release, so they take turns ([`SERIAL`]); each one installs the
//! chart if an earlier test uninstalled it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::chart::{
    self, RELEASE, SYSTEM_NS, condition, example_proxyconfig, helm, installed, kerr, node_names,
    proxyconfigs, proxynodes,
};
use common::{MANAGER, apply, echo_pod, ready_pod, ready_pods};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use switchyard_e2e::echo::{EchoReply, tcp_request, udp_request};
use switchyard_e2e::testing::{SharedCluster, TestNamespace, eventually};
use switchyard_e2e::{Cluster, Error};
use tokio::sync::{Mutex, OnceCell};

static CLUSTER: SharedCluster = SharedCluster::new();
/// The tests change cluster-wide state (the release, ProxyConfigs): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());
static BUILT: OnceCell<()> = OnceCell::const_new();

const NODES: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits until the ProxyConfig has acted on its last change and reports `ready` and Ready=True.
async fn proxyconfig_ready(client: &Client, name: &str, ready: &str) -> DynamicObject {
    chart::proxyconfig_ready(client, name, ready, READY_TIMEOUT).await
}

/// The cluster of this file's tests.
async fn cluster() -> Arc<Cluster> {
    chart::cluster(&CLUSTER, &BUILT, "e2eswyd", NODES as u8).await
}

/// Applies the example ProxyConfig (named `default`) and waits until it is Ready on every node.
async fn default_proxyconfig_ready(client: &Client) -> DynamicObject {
    proxyconfigs(client.clone())
        .patch(
            "default",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(example_proxyconfig()),
        )
        .await
        .unwrap();
    proxyconfig_ready(client, "default", &format!("{NODES}/{NODES}")).await
}

/// The agent pods that exist now (not yet deleted), by node.
async fn agents_by_node(client: &Client) -> BTreeMap<String, Vec<Pod>> {
    let pods = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in pods.items {
        let spec = pod.spec.as_ref().unwrap();
        let is_agent = spec.containers.iter().any(|c| {
            c.image
                .as_deref()
                .unwrap_or_default()
                .contains("switchyard-agent")
        });
        if is_agent && let Some(node) = spec.node_name.clone() {
            by_node.entry(node).or_default().push(pod);
        }
    }
    by_node
}

/// Every SWYD- line of every ruleset on a node (both iptables variants, both families).
fn swyd_rules(cluster: &Cluster, node: &str) -> Vec<String> {
    let netns = cluster.node_netns(node).unwrap();
    let mut lines = vec![];
    for tool in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns, tool])
            .output()
            .unwrap_or_else(|e| panic!("{tool} in {netns}: {e}"));
        assert!(
            out.status.success(),
            "{tool} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("SWYD-"))
                // Chain declarations carry packet counters; the rules themselves do not.
                .filter(|l| !l.starts_with(':'))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    lines
}

fn node_ip(cluster: &Cluster, node: &str) -> IpAddr {
    cluster.layout().node(node).unwrap().ips[0]
}

/// Sends `count` requests to `addr` from `netns` (waiting first until the Service answers at all, since
/// the agents program a new Service within their minSyncPeriod); every one must succeed. Returns the pods
/// that answered, with how often.
async fn spread(netns: &str, addr: SocketAddr, udp: bool, count: usize) -> BTreeMap<String, usize> {
    let ask = || async {
        if udp {
            udp_request(netns, addr, REQUEST_TIMEOUT).await
        } else {
            tcp_request(netns, addr, REQUEST_TIMEOUT).await
        }
    };
    let proto = if udp { "udp" } else { "tcp" };
    eventually(
        &format!("a first {proto} answer from {addr} in {netns}"),
        Duration::from_secs(30),
        || async { ask().await.map(Some) },
    )
    .await
    .unwrap();
    let mut answers = BTreeMap::new();
    for i in 0..count {
        let reply: EchoReply = ask()
            .await
            .unwrap_or_else(|e| panic!("{proto} request {i} to {addr} from {netns} failed: {e}"));
        *answers.entry(reply.pod).or_insert(0) += 1;
    }
    answers
}

fn assert_spread(what: &str, answers: &BTreeMap<String, usize>, pods: &BTreeSet<String>) {
    let answered: BTreeSet<String> = answers.keys().cloned().collect();
    assert_eq!(
        &answered, pods,
        "{what}: every echo pod should answer some of the requests: {answers:?}"
    );
}

// Scenario 1.
#[tokio::test]
async fn helm_install_and_a_proxyconfig_proxy_every_node_and_services_balance_traffic() {
    require_root!("helm_install_and_a_proxyconfig_proxy_every_node_and_services_balance_traffic");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    let pc = default_proxyconfig_ready(&client).await;
    let status = &pc.data["status"];
    assert_eq!(status["desiredNodes"], NODES);
    assert_eq!(status["readyNodes"], NODES);
    assert_eq!(status["updatedNodes"], NODES);
    assert_eq!(status["degradedNodes"], 0);
    for (type_, want) in [
        ("Available", "True"),
        ("Progressing", "False"),
        ("Degraded", "False"),
    ] {
        let c = condition(&pc, type_).unwrap_or_else(|| panic!("no {type_} condition: {status}"));
        assert_eq!(c["status"], want, "{type_}: {c}");
    }

    // One agent on every node, and one ProxyNode per node reporting the applied configuration.
    let agents = agents_by_node(&client).await;
    assert_eq!(
        agents.keys().cloned().collect::<Vec<_>>(),
        node_names(&cluster),
        "an agent per node"
    );
    for (node, pods) in &agents {
        assert_eq!(pods.len(), 1, "{node} runs {} agents", pods.len());
        let spec = pods[0].spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true), "the agent uses the node's network");
    }
    let hash = status["effectiveConfigHash"].as_str().unwrap().to_owned();
    let nodes = proxynodes(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let names: Vec<String> = nodes
        .items
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, node_names(&cluster));
    for node in &nodes.items {
        assert_eq!(node.data["status"]["mode"], "iptables");
        assert_eq!(node.data["status"]["appliedConfigHash"], hash.as_str());
    }

    // Echo pods on node-2 and node-3 only; the client pod on node-1, so every request crosses nodes.
    let ns = TestNamespace::create(&cluster, "balance").await.unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns.name());
    apply(&deployments, json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{
                            "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-1"],
                        }]}],
                    }}},
                    "containers": [{
                        "name": "echo",
                        "image": "switchyard.dev/echo:test",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}, {"containerPort": 8080, "protocol": "UDP"}],
                    }],
                },
            },
        },
    })).await;
    let services = Api::<Service>::namespaced(client.clone(), ns.name());
    let ports = json!([
        {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "udp", "port": 80, "targetPort": 8080, "protocol": "UDP"},
    ]);
    let cluster_ip = apply(
        &services,
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
            "spec": {"selector": {"app": "echo"}, "ports": ports},
        }),
    )
    .await;
    let node_port = apply(
        &services,
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo-np"},
            "spec": {"type": "NodePort", "selector": {"app": "echo"}, "ports": [
                {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            ]},
        }),
    )
    .await;
    let pods_api = Api::<Pod>::namespaced(client.clone(), ns.name());
    apply(&pods_api, echo_pod("client", Some("node-1"), 1)).await;
    let echo_pods = ready_pods(&pods_api, "app=echo", 3).await;
    let client_pod = ready_pod(&pods_api, "client").await;
    let want: BTreeSet<String> = echo_pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    for pod in &echo_pods {
        assert_ne!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("node-1"));
    }

    let vip: IpAddr = cluster_ip.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    let vip = SocketAddr::new(vip, 80);
    let np = node_port.spec.unwrap().ports.unwrap()[0].node_port.unwrap() as u16;
    let from_pod = cluster.pod_netns(&client_pod).unwrap();
    let from_node = cluster.node_netns("node-1").unwrap();
    let outside = cluster.layout().bridge_netns();

    // ClusterIP: from a pod on another node (TCP and UDP), and from a node's own network namespace.
    assert_spread(
        "ClusterIP tcp from pod client",
        &spread(&from_pod, vip, false, 30).await,
        &want,
    );
    assert_spread(
        "ClusterIP udp from pod client",
        &spread(&from_pod, vip, true, 30).await,
        &want,
    );
    assert_spread(
        "ClusterIP tcp from node-1",
        &spread(&from_node, vip, false, 30).await,
        &want,
    );

    // NodePort: from outside the nodes to every node's address (node-1 has no echo pod, so its traffic is
    // forwarded to another node), and from the client pod to another node's address.
    for node in node_names(&cluster) {
        let addr = SocketAddr::new(node_ip(&cluster, &node), np);
        let answers = spread(&outside, addr, false, 30).await;
        assert_spread(&format!("NodePort {addr} from outside"), &answers, &want);
    }
    let addr = SocketAddr::new(node_ip(&cluster, "node-3"), np);
    assert_spread(
        "NodePort from pod client",
        &spread(&from_pod, addr, false, 30).await,
        &want,
    );
}

// Scenario 5.
#[tokio::test]
async fn an_invalid_proxyconfig_is_refused_with_its_message_and_nothing_changes_on_the_nodes() {
    require_root!("an_invalid_proxyconfig_is_refused_with_its_message_and_nothing_changes_on_the_nodes");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    let before = default_proxyconfig_ready(&client).await;
    let rules_before: Vec<Vec<String>> = node_names(&cluster)
        .iter()
        .map(|n| swyd_rules(&cluster, n))
        .collect();
    assert!(
        rules_before.iter().all(|r| !r.is_empty()),
        "the agents have programmed their rules"
    );
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), SYSTEM_NS);
    let ds_before: Vec<(String, Option<i64>)> = daemonsets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| (d.metadata.name.unwrap(), d.metadata.generation))
        .collect();

    let api = proxyconfigs(client.clone());
    // A new invalid ProxyConfig, and an invalid change to the running one.
    let mut new = example_proxyconfig();
    new["metadata"]["name"] = json!("invalid");
    new["spec"]["mode"] = json!("userspace");
    let err = api
        .patch(
            "invalid",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&new),
        )
        .await
        .expect_err("mode userspace must be refused");
    assert!(
        err.to_string()
            .contains(r#"spec.mode: Unsupported value: "userspace""#),
        "{err}"
    );
    let mut change = example_proxyconfig();
    change["spec"]["clusterCIDRs"] = json!(["banana"]);
    let err = api
        .patch(
            "default",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&change),
        )
        .await
        .expect_err("a CIDR that is not one must be refused");
    assert!(err.to_string().contains("must be a CIDR"), "{err}");
    let mut change = example_proxyconfig();
    change["spec"]["syncPeriod"] = json!("10s");
    change["spec"]["minSyncPeriod"] = json!("20s");
    let err = api
        .patch(
            "default",
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&change),
        )
        .await
        .expect_err("minSyncPeriod over syncPeriod must be refused");
    assert!(
        err.to_string()
            .contains("minSyncPeriod must not be longer than spec.syncPeriod"),
        "{err}"
    );

    // Give the operator and the agents time to (wrongly) react, then compare.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(api.get_opt("invalid").await.unwrap().is_none());
    let after = proxyconfig_ready(&client, "default", &format!("{NODES}/{NODES}")).await;
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "the spec is unchanged"
    );
    assert_eq!(after.data["spec"], before.data["spec"]);
    assert_eq!(
        after.data["status"]["effectiveConfigHash"],
        before.data["status"]["effectiveConfigHash"]
    );
    let ds_after: Vec<(String, Option<i64>)> = daemonsets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|d| (d.metadata.name.unwrap(), d.metadata.generation))
        .collect();
    assert_eq!(ds_after, ds_before, "the DaemonSets are unchanged");
    let rules_after: Vec<Vec<String>> = node_names(&cluster)
        .iter()
        .map(|n| swyd_rules(&cluster, n))
        .collect();
    assert_eq!(rules_after, rules_before, "the nodes' rules are unchanged");
}

// Scenario 3.
#[tokio::test]
async fn overlapping_proxyconfigs_report_the_conflict_and_no_node_runs_two_agents() {
    require_root!("overlapping_proxyconfigs_report_the_conflict_and_no_node_runs_two_agents");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    default_proxyconfig_ready(&client).await;
    let zone = cluster.layout().node("node-2").unwrap().zone.clone();

    // A newer ProxyConfig selecting node-2 (by its zone), which `default` already holds.
    let api = proxyconfigs(client.clone());
    let overlap = json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": "overlap"},
        "spec": {
            "mode": "iptables",
            "nodeSelector": {"matchLabels": {"topology.kubernetes.io/zone": zone}},
        },
    });
    api.patch(
        "overlap",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&overlap),
    )
    .await
    .unwrap();
    let reported = eventually(
        "ProxyConfig overlap reports the conflict",
        READY_TIMEOUT,
        || async {
            let pc = api.get("overlap").await.map_err(kerr)?;
            let degraded = condition(&pc, "Degraded")
                .is_some_and(|c| c["status"] == "True" && c["reason"] == "NodeConflict");
            Ok(degraded.then_some(pc))
        },
    )
    .await
    .unwrap();
    let conflicting = &reported.data["status"]["conflictingNodes"];
    assert_eq!(conflicting, &json!(["node-2"]), "{}", reported.data["status"]);
    let message = condition(&reported, "Degraded").unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("node-2"),
        "the condition names the node: {message}"
    );

    // The older one keeps every node, and for a while no node ever has two agents.
    for _ in 0..20 {
        let pc = api.get("default").await.unwrap();
        assert_eq!(
            pc.data["status"]["ready"],
            format!("{NODES}/{NODES}"),
            "{}",
            pc.data["status"]
        );
        for (node, pods) in agents_by_node(&client).await {
            let names: Vec<_> = pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
            assert_eq!(pods.len(), 1, "{node} runs more than one agent: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let owners: BTreeSet<String> = proxynodes(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| {
            n.data["status"]["appliedConfigHash"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        owners.len(),
        1,
        "every node runs the configuration of default: {owners:?}"
    );

    api.delete("overlap", &DeleteParams::default()).await.unwrap();
    eventually("ProxyConfig overlap gone", READY_TIMEOUT, || async {
        Ok(api
            .get_opt("overlap")
            .await
            .map_err(kerr)?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap();
    proxyconfig_ready(&client, "default", &format!("{NODES}/{NODES}")).await;
}

// Scenario 6.
#[tokio::test]
async fn deleting_the_proxyconfig_removes_every_rule_and_helm_uninstall_leaves_no_switchyard_object() {
    require_root!(
        "deleting_the_proxyconfig_removes_every_rule_and_helm_uninstall_leaves_no_switchyard_object"
    );
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    default_proxyconfig_ready(&client).await;

    // A Service with endpoints, so the nodes hold per-Service rules too.
    let ns = TestNamespace::create(&cluster, "cleanup").await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    apply(&pods, echo_pod("echo", Some("node-2"), 1)).await;
    ready_pod(&pods, "echo").await;
    let services = Api::<Service>::namespaced(client.clone(), ns.name());
    apply(&services, json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"type": "NodePort", "selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .await;
    for node in node_names(&cluster) {
        eventually(
            &format!("Service rules on {node}"),
            Duration::from_secs(30),
            || async {
                let rules = swyd_rules(&cluster, &node);
                Ok(rules.iter().any(|r| r.contains("SWYD-SVC-")).then_some(()))
            },
        )
        .await
        .unwrap();
    }

    let api = proxyconfigs(client.clone());
    api.delete("default", &DeleteParams::default()).await.unwrap();
    eventually("ProxyConfig default gone", READY_TIMEOUT, || async {
        Ok(api
            .get_opt("default")
            .await
            .map_err(kerr)?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap();
    for node in node_names(&cluster) {
        let left = swyd_rules(&cluster, &node);
        assert!(
            left.is_empty(),
            "{node} still has Switchyard rules:\n{}",
            left.join("\n")
        );
    }
    eventually(
        "agents, DaemonSets, ConfigMaps and ProxyNodes gone",
        READY_TIMEOUT,
        || async {
            let agents = agents_by_node(&client).await;
            let ds = Api::<DaemonSet>::namespaced(client.clone(), SYSTEM_NS)
                .list(&ListParams::default())
                .await
                .map_err(kerr)?;
            let cms = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM_NS)
                .list(&ListParams::default())
                .await
                .map_err(kerr)?;
            let agent_cms = cms.items.iter().filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .unwrap_or_default()
                    .starts_with("switchyard-agent")
            });
            let nodes = proxynodes(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(kerr)?;
            Ok(
                (agents.is_empty()
                    && ds.items.is_empty()
                    && agent_cms.count() == 0
                    && nodes.items.is_empty())
                .then_some(()),
            )
        },
    )
    .await
    .unwrap();

    // helm uninstall with a ProxyConfig present: the pre-delete hook deletes it, then helm removes the rest.
    default_proxyconfig_ready(&client).await;
    let (ok, out) = helm(
        &cluster,
        &["uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "5m"],
    )
    .await;
    assert!(ok, "helm uninstall failed:\n{out}");
    for node in node_names(&cluster) {
        let left = swyd_rules(&cluster, &node);
        assert!(
            left.is_empty(),
            "{node} still has Switchyard rules after helm uninstall:\n{}",
            left.join("\n")
        );
    }
    eventually("no Switchyard object left", Duration::from_secs(60), || async {
        let left = switchyard_objects(&client).await?;
        if left.is_empty() {
            Ok(Some(()))
        } else {
            Err(Error::Failed(format!("left: {left:?}")))
        }
    })
    .await
    .unwrap();
    // Helm keeps the CRDs on purpose (docs/operations.md); the next test installs the chart again.
}

/// Every object Switchyard (the chart, the operator, the agents) may have left, as kind/name.
async fn switchyard_objects(client: &Client) -> Result<Vec<String>, Error> {
    let mut left = vec![];
    let named = |kind: &str, name: Option<String>| {
        let name = name.unwrap_or_default();
        name.contains("switchyard").then(|| format!("{kind}/{name}"))
    };
    let pcs = proxyconfigs(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kerr)?;
    left.extend(
        pcs.items
            .into_iter()
            .map(|o| format!("ProxyConfig/{}", o.metadata.name.unwrap_or_default())),
    );
    let pns = proxynodes(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kerr)?;
    left.extend(
        pns.items
            .into_iter()
            .map(|o| format!("ProxyNode/{}", o.metadata.name.unwrap_or_default())),
    );
    let lp = ListParams::default();
    macro_rules! scan {
        ($kind:ty, $api:expr) => {
            for o in $api.list(&lp).await.map_err(kerr)?.items {
                left.extend(named(stringify!($kind), o.metadata.name));
            }
        };
    }
    scan!(ClusterRole, Api::<ClusterRole>::all(client.clone()));
    scan!(ClusterRoleBinding, Api::<ClusterRoleBinding>::all(client.clone()));
    let ns = |c: &Client| c.clone();
    scan!(Role, Api::<Role>::namespaced(ns(client), SYSTEM_NS));
    scan!(RoleBinding, Api::<RoleBinding>::namespaced(ns(client), SYSTEM_NS));
    scan!(
        ServiceAccount,
        Api::<ServiceAccount>::namespaced(ns(client), SYSTEM_NS)
    );
    scan!(ConfigMap, Api::<ConfigMap>::namespaced(ns(client), SYSTEM_NS));
    scan!(Deployment, Api::<Deployment>::namespaced(ns(client), SYSTEM_NS));
    scan!(DaemonSet, Api::<DaemonSet>::namespaced(ns(client), SYSTEM_NS));
    scan!(Pod, Api::<Pod>::namespaced(ns(client), SYSTEM_NS));
    scan!(Service, Api::<Service>::namespaced(ns(client), SYSTEM_NS));
    scan!(Job, Api::<Job>::namespaced(ns(client), SYSTEM_NS));
    // The operator's leader Lease: created by the operator, not by helm, so the operator must remove it.
    scan!(Lease, Api::<Lease>::namespaced(ns(client), SYSTEM_NS));
    Ok(left)
}
