//! Switchyard rollouts and operator restarts on the local cluster (issue 5's e2e scenarios 2, 4 and 7): the
//! chart installed with the real `helm`, the operator and the agents running as the locally built binaries on
//! three simulated nodes.
//!
//! - a spec change rolls the agents with at most maxUnavailable (1) agent down at a time, every node ends on
//!   the new configuration, and a TCP client connecting to a ClusterIP the whole time sees no failure;
//! - an agent image that cannot run: Progressing=True, then Degraded=True with reason RolloutHung after
//!   progressDeadlineSeconds;
//! - the operator killed and restarted converges to the same state without restarting any agent; with two
//!   replicas exactly one holds the Lease and status still converges after a spec change, also after the
//!   leader is killed.
//!
//! The tests share one cluster and one release, so they take turns ([`SERIAL`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::chart::{
    self, OPERATOR_SELECTOR, RELEASE, SYSTEM_NS, condition, example_proxyconfig, helm, installed, kerr,
    node_names, proxyconfigs, proxynodes,
};
use common::{MANAGER, apply, echo_pod, ready_pod, ready_pods, running_and_ready};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use switchyard_e2e::echo::tcp_request;
use switchyard_e2e::testing::{SharedCluster, TestNamespace, eventually};
use switchyard_e2e::{Cluster, Error};
use tokio::sync::{Mutex, OnceCell};

static CLUSTER: SharedCluster = SharedCluster::new();
/// The tests change cluster-wide state (the release, ProxyConfigs): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());
static BUILT: OnceCell<()> = OnceCell::const_new();

const CLUSTER_NAME: &str = "e2eroll";
const NODES: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const LEASE: &str = "switchyard-operator";
/// Label of the node pool of scenario 4.
const POOL_LABEL: &str = "switchyard.dev/e2e-pool";

/// Waits until the ProxyConfig has acted on its last change and reports `ready` and Ready=True.
async fn proxyconfig_ready(client: &Client, name: &str, ready: &str) -> DynamicObject {
    chart::proxyconfig_ready(client, name, ready, READY_TIMEOUT).await
}

/// The cluster of this file's tests.
async fn cluster() -> Arc<Cluster> {
    chart::cluster(&CLUSTER, &BUILT, CLUSTER_NAME, NODES as u8).await
}

/// `helm upgrade --reuse-values --set operator.replicas=<n>`, then waits for that many ready operators.
async fn operator_replicas(cluster: &Cluster, replicas: usize) -> Vec<Pod> {
    let set = format!("operator.replicas={replicas}");
    let (ok, out) = helm(
        cluster,
        &[
            "upgrade",
            RELEASE,
            "charts/switchyard",
            "-n",
            SYSTEM_NS,
            "--reuse-values",
            "--set",
            &set,
            "--wait",
            "--timeout",
            "3m",
        ],
    )
    .await;
    assert!(ok, "helm upgrade to {set} failed:\n{out}");
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), SYSTEM_NS);
    eventually(&format!("{replicas} ready operators"), READY_TIMEOUT, || async {
        let live: Vec<Pod> = pods
            .list(&ListParams::default().labels(OPERATOR_SELECTOR))
            .await
            .map_err(kerr)?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        Ok((live.len() == replicas && live.iter().all(running_and_ready)).then_some(live))
    })
    .await
    .unwrap()
}

fn hash_of(pc: &DynamicObject) -> String {
    pc.data["status"]["effectiveConfigHash"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn all_ready() -> String {
    format!("{NODES}/{NODES}")
}

/// Applies the example ProxyConfig (named `default`) with `change` merged into its spec.
async fn apply_default(client: &Client, change: Value) -> DynamicObject {
    let mut pc = example_proxyconfig();
    for (k, v) in change.as_object().unwrap() {
        pc["spec"][k] = v.clone();
    }
    proxyconfigs(client.clone())
        .patch("default", &PatchParams::apply(MANAGER).force(), &Patch::Apply(pc))
        .await
        .unwrap()
}

/// Applies the example ProxyConfig as it is and waits until it is Ready on every node.
async fn default_proxyconfig_ready(client: &Client) -> DynamicObject {
    apply_default(client, json!({})).await;
    proxyconfig_ready(client, "default", &all_ready()).await
}

/// The agent pods that exist now (deleted ones included), by node; pods not yet bound are left out.
async fn agents_by_node(client: &Client) -> Result<BTreeMap<String, Vec<Pod>>, Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .list(&ListParams::default())
        .await
        .map_err(kerr)?;
    let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in pods.items {
        // Agents are the pods of the operator's DaemonSets (by owner: scenario 4's image is not an agent's).
        let is_agent = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "DaemonSet");
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if is_agent && let Some(node) = node {
            by_node.entry(node).or_default().push(pod);
        }
    }
    Ok(by_node)
}

/// Every agent pod as (uid, node, container restarts).
async fn agent_identities(client: &Client) -> BTreeSet<(String, String, i32)> {
    agents_by_node(client)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|(node, pods)| {
            pods.into_iter().map(move |p| {
                let restarts = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
                (p.metadata.uid.unwrap(), node.clone(), restarts)
            })
        })
        .collect()
}

/// The applied config hash of every ProxyNode, by node.
async fn applied_hashes(client: &Client) -> BTreeMap<String, String> {
    proxynodes(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| {
            let hash = n.data["status"]["appliedConfigHash"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (n.metadata.name.unwrap(), hash)
        })
        .collect()
}

async fn lease_holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), SYSTEM_NS)
        .get_opt(LEASE)
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// The Lease and the operator pods' logs, for a failure message.
fn leader_diagnostics(cluster: &Cluster, lease: Option<&Lease>) -> String {
    let mut out = format!(
        "Lease: {}\n",
        serde_json::to_string_pretty(&lease).unwrap_or_default()
    );
    let dir = cluster.layout().logs_dir().join("pods");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{SYSTEM_NS}_")) || !name.contains("operator") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        out.push_str(&format!("--- {name} (last 30 lines)\n{tail}\n"));
    }
    out
}

/// Waits until the Lease is held by one of `candidates` and stays with it for a few renewals; returns it.
async fn stable_leader(cluster: &Cluster, client: &Client, candidates: &BTreeSet<String>) -> String {
    let holder = eventually(
        &format!("the Lease {LEASE} held by one of {candidates:?}"),
        READY_TIMEOUT,
        || async { Ok(lease_holder(client).await.filter(|h| candidates.contains(h))) },
    )
    .await
    .unwrap();
    let leases = Api::<Lease>::namespaced(client.clone(), SYSTEM_NS);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lease = leases.get_opt(LEASE).await.unwrap();
        let now = lease
            .as_ref()
            .and_then(|l| l.spec.as_ref()?.holder_identity.clone());
        assert_eq!(
            now.as_deref(),
            Some(holder.as_str()),
            "the Lease changed hands with every replica running\n{}",
            leader_diagnostics(cluster, lease.as_ref())
        );
    }
    holder
}

fn pod_names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.metadata.name.clone().unwrap()).collect()
}

/// Applies a spec change to `default` and waits until every node runs it: a new hash, Ready 3/3, every
/// ProxyNode on that hash. Returns the new hash.
async fn change_converges(client: &Client, change: Value, old_hash: &str) -> String {
    apply_default(client, change.clone()).await;
    let pc = proxyconfig_ready(client, "default", &all_ready()).await;
    let hash = hash_of(&pc);
    assert_ne!(hash, old_hash, "{change} changes the configuration hash");
    let hashes = applied_hashes(client).await;
    assert_eq!(hashes.len(), NODES, "{hashes:?}");
    assert!(
        hashes.values().all(|h| *h == hash),
        "every ProxyNode applies {hash}: {hashes:?}"
    );
    hash
}

// Scenario 2.
#[tokio::test]
async fn a_spec_change_rolls_the_agents_one_at_a_time_and_a_client_sees_no_failure() {
    require_root!("a_spec_change_rolls_the_agents_one_at_a_time_and_a_client_sees_no_failure");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    let before = default_proxyconfig_ready(&client).await;
    let old_hash = hash_of(&before);

    // One echo pod per node behind a ClusterIP, and a client pod on node-1. The echo pods are Ready only
    // once they accept connections (a pod without a probe is Ready as soon as its process starts, which
    // on a loaded machine can be seconds before it listens).
    let ns = TestNamespace::create(&cluster, "rollout").await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    for (i, node) in node_names(&cluster).iter().enumerate() {
        let mut pod = echo_pod(&format!("echo-{i}"), Some(node), 1);
        pod["metadata"]["labels"] = json!({"app": "echo"});
        pod["spec"]["containers"][0]["readinessProbe"] =
            json!({"tcpSocket": {"port": 8080}, "periodSeconds": 1});
        apply(&pods, pod).await;
    }
    apply(&pods, echo_pod("client", Some("node-1"), 1)).await;
    ready_pods(&pods, "app=echo", NODES).await;
    let client_pod = ready_pod(&pods, "client").await;
    let services = Api::<Service>::namespaced(client.clone(), ns.name());
    let service = apply(&services, json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .await;
    let vip: IpAddr = service.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    let vip = SocketAddr::new(vip, 80);
    let from_pod = cluster.pod_netns(&client_pod).unwrap();
    eventually(
        &format!("a first answer from {vip}"),
        Duration::from_secs(60),
        || async { tcp_request(&from_pod, vip, REQUEST_TIMEOUT).await.map(Some) },
    )
    .await
    .unwrap();

    // The client: a new TCP connection every ~100 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let requests = tokio::spawn({
        let stop = stop.clone();
        let from_pod = from_pod.clone();
        async move {
            let start = Instant::now();
            let (mut ok, mut failed) = (0usize, vec![]);
            while !stop.load(Ordering::Relaxed) {
                match tcp_request(&from_pod, vip, REQUEST_TIMEOUT).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("at {:?}: {e}", start.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ok, failed)
        }
    });
    // Some requests before the change, so a failure at its start would show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agents_before = agent_identities(&client).await;
    let changed = apply_default(&client, json!({"masqueradeAll": true})).await;
    let generation = changed.metadata.generation;

    // Watch the agents every ~200 ms until the ProxyConfig is Ready on the new configuration.
    let api = proxyconfigs(client.clone());
    let deadline = Instant::now() + ROLLOUT_TIMEOUT;
    let mut most_unavailable = 0;
    let mut worst = String::new();
    let done = loop {
        let by_node = agents_by_node(&client).await.unwrap();
        let unavailable: Vec<String> = node_names(&cluster)
            .into_iter()
            .filter(|node| {
                !by_node.get(node).is_some_and(|pods| {
                    pods.iter()
                        .any(|p| p.metadata.deletion_timestamp.is_none() && running_and_ready(p))
                })
            })
            .collect();
        if unavailable.len() > most_unavailable {
            most_unavailable = unavailable.len();
            worst = format!("{unavailable:?}");
        }
        let pc = api.get("default").await.unwrap();
        if pc.metadata.generation == generation
            && chart::is_ready(&pc, &all_ready())
            && hash_of(&pc) != old_hash
        {
            break pc;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish in {ROLLOUT_TIMEOUT:?}: {}",
            pc.data["status"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Some requests after the rollout too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = requests.await.unwrap();

    eprintln!(
        "rollout: at most {most_unavailable} agents down at once {worst}, {ok} requests ok, {} failed",
        failed.len()
    );
    assert!(
        most_unavailable <= 1,
        "more than maxUnavailable (1) agents were down at once: {worst}"
    );
    let new_hash = hash_of(&done);
    let hashes = applied_hashes(&client).await;
    assert_eq!(hashes.len(), NODES, "{hashes:?}");
    assert!(
        hashes.values().all(|h| *h == new_hash),
        "every ProxyNode applies {new_hash}: {hashes:?}"
    );
    let agents_after = agent_identities(&client).await;
    let uids = |s: &BTreeSet<(String, String, i32)>| -> BTreeSet<String> {
        s.iter().map(|(u, _, _)| u.clone()).collect()
    };
    assert_eq!(agents_after.len(), NODES, "{agents_after:?}");
    assert!(
        uids(&agents_before).is_disjoint(&uids(&agents_after)),
        "every agent was replaced: before {agents_before:?}, after {agents_after:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests to {vip} failed during the rollout:\n{}",
        failed.len(),
        ok + failed.len(),
        failed.join("\n")
    );
    assert!(ok >= 20, "the client kept sending requests: {ok}");

    // Back to the example, for the next test.
    default_proxyconfig_ready(&client).await;
}

// Scenario 4.
#[tokio::test]
async fn an_agent_that_cannot_start_keeps_progressing_then_reports_rollout_hung() {
    require_root!("an_agent_that_cannot_start_keeps_progressing_then_reports_rollout_hung");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    let api = proxyconfigs(client.clone());

    // The oldest ProxyConfig selecting a node keeps it (scenario 3): with `default` (every node) present, a
    // new ProxyConfig would only report NodeConflict. So the pool here is a node no ProxyConfig holds.
    if api.get_opt("default").await.unwrap().is_some() {
        api.delete("default", &DeleteParams::default()).await.unwrap();
    }
    eventually("no ProxyConfig and no agent", READY_TIMEOUT, || async {
        let pcs = api.list(&ListParams::default()).await.map_err(kerr)?;
        let agents = agents_by_node(&client).await?;
        Ok((pcs.items.is_empty() && agents.is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let nodes = Api::<Node>::all(client.clone());
    nodes
        .patch(
            "node-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {POOL_LABEL: "hung"}}})),
        )
        .await
        .unwrap();

    let hung = json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": "hung"},
        "spec": {
            "mode": "iptables",
            "nodeSelector": {"matchLabels": {POOL_LABEL: "hung"}},
            "agent": {"image": "registry.example/nope:1"},
            "rollout": {"maxUnavailable": 1, "progressDeadlineSeconds": 20},
        },
    });
    let created = Instant::now();
    api.patch("hung", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&hung))
        .await
        .unwrap();

    // First Progressing=True while not yet degraded.
    let progressing = eventually("ProxyConfig hung Progressing", READY_TIMEOUT, || async {
        let pc = api.get("hung").await.map_err(kerr)?;
        let current = pc.data["status"]["observedGeneration"].as_i64() == pc.metadata.generation;
        let p = condition(&pc, "Progressing").is_some_and(|c| c["status"] == "True");
        Ok((current && p).then_some(pc))
    })
    .await
    .unwrap();
    let seen_after = created.elapsed();
    let degraded = condition(&progressing, "Degraded").cloned().unwrap_or_default();
    if seen_after < Duration::from_secs(15) {
        // Well before the deadline, the rollout must not be reported hung yet.
        assert_ne!(
            degraded["reason"], "RolloutHung",
            "RolloutHung after {seen_after:?}, before the 20 s deadline: {}",
            progressing.data["status"]
        );
    }
    assert_eq!(
        progressing.data["status"]["desiredNodes"], 1,
        "{}",
        progressing.data["status"]
    );

    // The agent pod is there and cannot pull its image.
    eventually(
        "the agent on node-3 waiting on its image",
        READY_TIMEOUT,
        || async {
            let agents = agents_by_node(&client).await?;
            let waiting = agents.get("node-3").is_some_and(|pods| {
                pods.iter().any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| {
                                c.state
                                    .as_ref()
                                    .and_then(|s| s.waiting.as_ref())
                                    .is_some_and(|w| {
                                        w.reason.as_deref().unwrap_or_default().contains("Err")
                                            || w.reason.as_deref() == Some("ImagePullBackOff")
                                    })
                            })
                        })
                })
            });
            Ok((waiting && agents.len() == 1).then_some(()))
        },
    )
    .await
    .unwrap();

    // Then Degraded/RolloutHung, with Progressing still True.
    let hung_pc = eventually("ProxyConfig hung Degraded/RolloutHung", READY_TIMEOUT, || async {
        let pc = api.get("hung").await.map_err(kerr)?;
        let d =
            condition(&pc, "Degraded").is_some_and(|c| c["status"] == "True" && c["reason"] == "RolloutHung");
        Ok(d.then_some(pc))
    })
    .await
    .unwrap();
    let status = &hung_pc.data["status"];
    assert!(
        created.elapsed() >= Duration::from_secs(20),
        "RolloutHung before the deadline: {status}"
    );
    assert!(
        condition(&hung_pc, "Progressing").is_some_and(|c| c["status"] == "True"),
        "Progressing stays True: {status}"
    );
    assert!(
        condition(&hung_pc, "Ready").is_some_and(|c| c["status"] == "False"),
        "not Ready: {status}"
    );

    // Clean up: the ProxyConfig (its agent never ran) and the label.
    api.delete("hung", &DeleteParams::default()).await.unwrap();
    eventually("ProxyConfig hung gone", Duration::from_secs(600), || async {
        Ok(api.get_opt("hung").await.map_err(kerr)?.is_none().then_some(()))
    })
    .await
    .unwrap();
    nodes
        .patch(
            "node-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {POOL_LABEL: null}}})),
        )
        .await
        .unwrap();
}

// Scenario 7.
#[tokio::test]
async fn a_restarted_operator_and_two_replicas_converge_to_the_same_state() {
    require_root!("a_restarted_operator_and_two_replicas_converge_to_the_same_state");
    let cluster = cluster().await;
    let _serial = SERIAL.lock().await;
    installed(&cluster).await;
    let client = cluster.client().await.unwrap();
    let operators = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS);
    let before = default_proxyconfig_ready(&client).await;
    let hash = hash_of(&before);
    // Let the agents settle (a first restart would otherwise show as one caused by the operator).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let agents = agent_identities(&client).await;
    let hashes = applied_hashes(&client).await;
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), SYSTEM_NS);
    let ds_generations = |list: Vec<DaemonSet>| -> Vec<(String, Option<i64>)> {
        list.into_iter()
            .map(|d| (d.metadata.name.unwrap(), d.metadata.generation))
            .collect()
    };
    let ds_before = ds_generations(daemonsets.list(&ListParams::default()).await.unwrap().items);

    // Kill the operator; the Deployment brings up a new one, which takes the Lease.
    let old = ready_pods(&operators, OPERATOR_SELECTOR, 1).await;
    let old_name = old[0].metadata.name.clone().unwrap();
    operators
        .delete(&old_name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let new = eventually("a new operator ready", READY_TIMEOUT, || async {
        let pods = operators
            .list(&ListParams::default().labels(OPERATOR_SELECTOR))
            .await
            .map_err(kerr)?;
        Ok(pods.items.into_iter().find(|p| {
            p.metadata.name.as_deref() != Some(old_name.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && running_and_ready(p)
        }))
    })
    .await
    .unwrap();
    let new_name = new.metadata.name.clone().unwrap();
    stable_leader(&cluster, &client, &BTreeSet::from([new_name.clone()])).await;
    // Give the new leader time to reconcile (it would roll or touch what it disagrees with).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = proxyconfig_ready(&client, "default", &all_ready()).await;
    assert_eq!(after.metadata.generation, before.metadata.generation);
    assert_eq!(hash_of(&after), hash, "same configuration hash");
    assert_eq!(applied_hashes(&client).await, hashes, "same hash on every node");
    assert_eq!(
        agent_identities(&client).await,
        agents,
        "no agent restarted or replaced"
    );
    assert_eq!(
        ds_generations(daemonsets.list(&ListParams::default()).await.unwrap().items),
        ds_before,
        "the DaemonSets are unchanged"
    );

    // Two replicas: exactly one holds the Lease; a spec change still converges.
    let pods = operator_replicas(&cluster, 2).await;
    let names = pod_names(&pods);
    let leader = stable_leader(&cluster, &client, &names).await;
    let hash_2s = change_converges(&client, json!({"minSyncPeriod": "2s"}), &hash).await;

    // The leader killed: the standby takes over, and a further change converges.
    operators.delete(&leader, &DeleteParams::default()).await.unwrap();
    let standby: BTreeSet<String> = names.iter().filter(|n| **n != leader).cloned().collect();
    let next = eventually("the Lease taken by another replica", READY_TIMEOUT, || async {
        Ok(lease_holder(&client).await.filter(|h| *h != leader))
    })
    .await
    .unwrap();
    let pods = ready_pods(&operators, OPERATOR_SELECTOR, 2).await;
    assert!(
        pod_names(&pods).contains(&next),
        "the new leader {next} is a running replica (standby was {standby:?})"
    );
    let back = change_converges(&client, json!({"minSyncPeriod": "1s"}), &hash_2s).await;
    assert_eq!(back, hash, "the example's configuration again");

    // Back to one replica for the other tests.
    operator_replicas(&cluster, 1).await;
    proxyconfig_ready(&client, "default", &all_ready()).await;
}
