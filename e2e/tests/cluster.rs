//! The local cluster with three simulated nodes: nodes, scheduling, pod networking, the EndpointSlice
//! and DaemonSet controllers, the pod lifecycle (graceful deletion, restarts, unknown images) and the
//! service-account machinery the agent relies on. All tests share one cluster, torn down when the last
//! one finishes (or by the supervisor if this process dies).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BIN, apply, echo_pod, pod_ips, ready_pod, ready_pods};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use switchyard_e2e::echo::{tcp_request, udp_request};
use switchyard_e2e::supervisor::node_ready_and_untainted;
use switchyard_e2e::testing::{self, SharedCluster, TestNamespace, eventually};
use switchyard_e2e::{Cluster, Error};

static CLUSTER: SharedCluster = SharedCluster::new();
const TIMEOUT: Duration = Duration::from_secs(5);

async fn cluster() -> Arc<Cluster> {
    CLUSTER.get(|| testing::spec("e2ework", 3, BIN)).await.unwrap()
}

fn kerr(e: kube::Error) -> Error {
    Error::Failed(e.to_string())
}

#[tokio::test]
async fn nodes_register_ready_with_pod_cidrs_zones_addresses_and_leases() {
    require_root!("nodes_register_ready_with_pod_cidrs_zones_addresses_and_leases");
    let cluster = cluster().await;
    let client = cluster.client().await.unwrap();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(nodes.len(), 3);
    for layout in &cluster.layout().nodes {
        let node = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(&layout.name))
            .unwrap();
        assert!(node_ready_and_untainted(node), "{} is not Ready", layout.name);
        let cidrs = node.spec.as_ref().unwrap().pod_cidrs.clone().unwrap();
        let want: Vec<String> = layout.pod_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, want);
        let labels = node.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["topology.kubernetes.io/zone"], layout.zone);
        assert_eq!(labels["kubernetes.io/hostname"], layout.name);
        let internal: Vec<String> = node
            .status
            .as_ref()
            .unwrap()
            .addresses
            .iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
            .collect();
        assert_eq!(
            internal,
            layout.ips.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
        let lease = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
            .get(&layout.name)
            .await
            .unwrap();
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some(layout.name.as_str())
        );
    }
}

#[tokio::test]
async fn echo_deployment_spreads_over_the_nodes_and_its_pods_are_published_in_endpointslices() {
    require_root!("echo_deployment_spreads_over_the_nodes_and_its_pods_are_published_in_endpointslices");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "spread").await.unwrap();
    let client = cluster.client().await.unwrap();
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
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": "echo"}},
                    }],
                    "containers": [{"name": "echo", "image": "switchyard.dev/echo:test", "ports": [{"containerPort": 8080}]}],
                },
            },
        },
    })).await;
    let services = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns.name());
    apply(
        &services,
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo"},
            "spec": {
                "selector": {"app": "echo"},
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }),
    )
    .await;

    let pods = ready_pods(&Api::namespaced(client.clone(), ns.name()), "app=echo", 3).await;
    let nodes: BTreeSet<String> = pods
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    assert_eq!(
        nodes.len(),
        3,
        "pods should spread over the three nodes: {nodes:?}"
    );
    for pod in &pods {
        let node = cluster
            .layout()
            .node(pod.spec.as_ref().unwrap().node_name.as_deref().unwrap())
            .unwrap();
        let ips = pod_ips(pod);
        assert_eq!(ips.len(), 2, "dual-stack pod IPs");
        for (ip, cidr) in ips.iter().zip(&node.pod_cidrs) {
            assert!(cidr.contains(ip), "{ip} is outside {cidr} of {}", node.name);
        }
    }

    let want: BTreeSet<IpAddr> = pods.iter().flat_map(pod_ips).collect();
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns.name());
    eventually(
        "EndpointSlices listing every pod IP as ready",
        Duration::from_secs(30),
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=echo"))
                .await
                .map_err(kerr)?;
            let ready: BTreeSet<IpAddr> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.iter().map(|a| a.parse::<IpAddr>().unwrap()))
                .collect();
            Ok((ready == want).then_some(()))
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn pod_reaches_a_pod_on_another_node_by_pod_ip_over_tcp_and_udp() {
    require_root!("pod_reaches_a_pod_on_another_node_by_pod_ip_over_tcp_and_udp");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "podnet").await.unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), ns.name());
    apply(&pods, echo_pod("client", Some("node-1"), 1)).await;
    apply(&pods, echo_pod("server", Some("node-2"), 1)).await;
    let client = ready_pod(&pods, "client").await;
    let server = ready_pod(&pods, "server").await;
    let from = cluster.pod_netns(&client).unwrap();
    let client_ips = pod_ips(&client);
    for (i, ip) in pod_ips(&server).into_iter().enumerate() {
        let addr = SocketAddr::new(ip, 8080);
        for reply in [
            tcp_request(&from, addr, TIMEOUT).await.unwrap(),
            udp_request(&from, addr, TIMEOUT).await.unwrap(),
        ] {
            assert_eq!(reply.pod, "server");
            assert_eq!(reply.node, "node-2");
            assert_eq!(
                reply.client.ip(),
                client_ips[i],
                "the server sees the client's pod IP (no NAT)"
            );
        }
    }
}

#[tokio::test]
async fn daemonset_runs_one_ready_pod_per_node() {
    require_root!("daemonset_runs_one_ready_pod_per_node");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "daemons").await.unwrap();
    let client = cluster.client().await.unwrap();
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), ns.name());
    apply(
        &daemonsets,
        json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "echo"},
            "spec": {
                "selector": {"matchLabels": {"app": "ds-echo"}},
                "template": {
                    "metadata": {"labels": {"app": "ds-echo"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "echo", "image": "switchyard.dev/echo:test"}],
                    },
                },
            },
        }),
    )
    .await;
    let pods = ready_pods(&Api::namespaced(client.clone(), ns.name()), "app=ds-echo", 3).await;
    let nodes: BTreeSet<String> = pods
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["node-1".into(), "node-2".into(), "node-3".into()])
    );
    eventually(
        "the DaemonSet status to count 3 ready pods",
        Duration::from_secs(30),
        || async {
            let ds = daemonsets.get("echo").await.map_err(kerr)?;
            let s = ds.status.unwrap_or_default();
            Ok((s.desired_number_scheduled == 3 && s.number_ready == 3).then_some(()))
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn pod_with_an_unknown_image_waits_with_err_image_pull() {
    require_root!("pod_with_an_unknown_image_waits_with_err_image_pull");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "images").await.unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), ns.name());
    let mut pod = echo_pod("nginx", Some("node-3"), 0);
    pod["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    apply(&pods, pod).await;
    let (phase, reason, message) = eventually("an ErrImagePull status", Duration::from_secs(30), || async {
        let pod = pods.get("nginx").await.map_err(kerr)?;
        let status = pod.status.unwrap_or_default();
        let waiting = status
            .container_statuses
            .iter()
            .flatten()
            .find_map(|c| c.state.as_ref()?.waiting.clone());
        Ok(waiting.map(|w| {
            (
                status.phase.unwrap_or_default(),
                w.reason.unwrap_or_default(),
                w.message.unwrap_or_default(),
            )
        }))
    })
    .await
    .unwrap();
    assert_eq!((phase.as_str(), reason.as_str()), ("Pending", "ErrImagePull"));
    assert!(
        message.contains("nginx:1.27") && message.contains("no container runtime"),
        "{message}"
    );
}

#[tokio::test]
async fn deleted_echo_pod_stays_a_serving_terminating_endpoint_for_its_grace_period() {
    require_root!("deleted_echo_pod_stays_a_serving_terminating_endpoint_for_its_grace_period");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "graceful").await.unwrap();
    let client = cluster.client().await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    let grace = 6;
    apply(&pods, echo_pod("leaving", Some("node-2"), grace)).await;
    apply(&pods, echo_pod("prober", Some("node-1"), 0)).await;
    apply(
        &Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns.name()),
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "leaving"},
            "spec": {"selector": {"app": "leaving"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }),
    )
    .await;
    let leaving = ready_pod(&pods, "leaving").await;
    let prober = ready_pod(&pods, "prober").await;
    let ip = pod_ips(&leaving)[0];
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns.name());
    let conditions = || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=leaving"))
            .await
            .map_err(kerr)?;
        Ok::<_, Error>(
            list.items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .find(|e| e.addresses.contains(&ip.to_string()))
                .and_then(|e| e.conditions.clone()),
        )
    };
    eventually("a ready endpoint", Duration::from_secs(30), || async {
        Ok(conditions().await?.filter(|c| c.ready == Some(true)))
    })
    .await
    .unwrap();

    let deleted_at = Instant::now();
    pods.delete("leaving", &DeleteParams::default()).await.unwrap();
    let c = eventually(
        "a serving, terminating endpoint",
        Duration::from_secs(10),
        || async { Ok(conditions().await?.filter(|c| c.terminating == Some(true))) },
    )
    .await
    .unwrap();
    assert_eq!(
        (c.ready, c.serving, c.terminating),
        (Some(false), Some(true), Some(true))
    );
    // Still answering while it drains.
    let reply = tcp_request(
        &cluster.pod_netns(&prober).unwrap(),
        SocketAddr::new(ip, 8080),
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(reply.pod, "leaving");

    eventually("the pod object to go", Duration::from_secs(30), || async {
        Ok(pods
            .get_opt("leaving")
            .await
            .map_err(kerr)?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap();
    let took = deleted_at.elapsed();
    assert!(
        took >= Duration::from_secs(grace as u64 - 1),
        "removed after {took:?}, before its grace period"
    );
    assert!(!switchyard_e2e::netns::exists(
        &cluster
            .layout()
            .pod_netns(leaving.metadata.uid.as_deref().unwrap())
    ));
}

#[tokio::test]
async fn crashing_container_restarts_under_always_and_fails_the_pod_under_never() {
    require_root!("crashing_container_restarts_under_always_and_fails_the_pod_under_never");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "crashes").await.unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), ns.name());
    for (name, policy) in [("always", "Always"), ("never", "Never")] {
        apply(
            &pods,
            json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {
                    "restartPolicy": policy,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "tool",
                        "image": "switchyard.dev/e2e:test",
                        // Nothing listens there: the tool exits with an error at once.
                        "args": ["echo-client", "--tcp", "127.0.0.1:1", "--timeout-seconds", "1"],
                    }],
                },
            }),
        )
        .await;
    }
    let status = eventually("two restarts", Duration::from_secs(30), || async {
        let s = pods.get("always").await.map_err(kerr)?.status.unwrap_or_default();
        let c = s.container_statuses.unwrap_or_default().into_iter().next();
        Ok(c.filter(|c| c.restart_count >= 2))
    })
    .await
    .unwrap();
    let last = status.last_state.and_then(|s| s.terminated).unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));

    let phase = eventually("the Never pod to fail", Duration::from_secs(30), || async {
        let s = pods.get("never").await.map_err(kerr)?.status.unwrap_or_default();
        Ok(s.phase.filter(|p| p == "Failed"))
    })
    .await
    .unwrap();
    assert_eq!(phase, "Failed");
}

#[tokio::test]
async fn tool_pod_authenticates_with_its_service_account_token_and_sees_its_config_map() {
    require_root!("tool_pod_authenticates_with_its_service_account_token_and_sees_its_config_map");
    let cluster = cluster().await;
    let ns = TestNamespace::create(&cluster, "identity").await.unwrap();
    let client = cluster.client().await.unwrap();
    apply(
        &Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns.name()),
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "inspector"},
        }),
    )
    .await;
    apply(
        &Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns.name()),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
            "data": {"config.yaml": "mode: iptables\n"},
        }),
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    let host_paths = ["/etc/switchyard/config.yaml", "/var/run/secrets/kubernetes.io"];
    let existed: Vec<bool> = host_paths
        .iter()
        .map(|p| std::path::Path::new(p).exists())
        .collect();
    for (name, host_network) in [("inspect", false), ("inspect-host", true)] {
        let port = if host_network { 9100 } else { 9000 };
        apply(&pods, json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "serviceAccountName": "inspector",
                "hostNetwork": host_network,
                "nodeName": "node-3",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "tool",
                    "image": "switchyard.dev/e2e:test",
                    "args": ["inspect-pod", "--listen", format!("0.0.0.0:{port}"),
                             "--file", "/etc/switchyard/config.yaml",
                             "--file", "/var/run/secrets/kubernetes.io/serviceaccount/namespace"],
                    "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "settings", "mountPath": "/etc/switchyard"}],
                }],
                "volumes": [{"name": "settings", "configMap": {"name": "settings"}}],
            },
        })).await;
        // Ready only once the readiness probe saw the identity.
        let pod = ready_pod(&pods, name).await;
        let ip = pod_ips(&pod)[0];
        if host_network {
            assert_eq!(
                ip.to_string(),
                "172.31.0.13",
                "a host-network pod has its node's IP"
            );
        }
        let (code, body) = switchyard_e2e::probe::http_get(
            &cluster.pod_netns(&pod).unwrap(),
            SocketAddr::new(ip, port),
            "/",
            TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
        let seen: switchyard_e2e::tools::Inspection = serde_json::from_str(&body).unwrap();
        assert_eq!(
            seen.user.as_deref(),
            Some("system:serviceaccount:identity:inspector"),
            "{seen:?}"
        );
        assert_eq!(seen.files["/etc/switchyard/config.yaml"], "mode: iptables\n");
        assert_eq!(
            seen.files["/var/run/secrets/kubernetes.io/serviceaccount/namespace"],
            "identity"
        );
        assert_eq!(seen.env["KUBERNETES_SERVICE_HOST"], "172.31.0.2");
        assert_eq!(seen.env["NODE_NAME"], "node-3");
    }
    // The mounts stayed in the containers' own mount namespaces.
    let exist: Vec<bool> = host_paths
        .iter()
        .map(|p| std::path::Path::new(p).exists())
        .collect();
    assert_eq!(exist, existed, "the host's {host_paths:?} changed");
}
