//! `cluster down` leaves nothing behind: no network namespace, process, mount or file of the cluster,
//! with pods running (their namespaces and private mounts included).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{BIN, apply, echo_pod, ready_pod};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;
use std::time::Duration;
use switchyard_e2e::cleanup;
use switchyard_e2e::cluster::scope;
use switchyard_e2e::testing;
use switchyard_e2e::{Cluster, netns};

#[tokio::test]
async fn cluster_down_leaves_no_namespace_process_mount_or_file_behind() {
    require_root!("cluster_down_leaves_no_namespace_process_mount_or_file_behind");
    let spec = testing::spec("e2edown", 2, BIN).unwrap();
    let (root, name) = (spec.state_root.clone(), spec.name.clone());
    let cluster = Cluster::up(spec, Duration::from_secs(300)).await.unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), "default");
    apply(&pods, echo_pod("echo", Some("node-2"), 30)).await;
    apply(
        &pods,
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tool"},
            "spec": {
                "nodeName": "node-1",
                "hostNetwork": true,
                "containers": [{
                    "name": "tool", "image": "switchyard.dev/e2e:test",
                    "args": ["inspect-pod", "--listen", "0.0.0.0:9000"],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 9000}, "periodSeconds": 1},
                }],
            },
        }),
    )
    .await;
    let echo = ready_pod(&pods, "echo").await;
    ready_pod(&pods, "tool").await;

    let before = cleanup::find(&scope(&root, &name));
    assert!(netns::exists(
        &cluster.layout().pod_netns(echo.metadata.uid.as_deref().unwrap())
    ));
    assert!(
        before.namespaces.len() >= 5,
        "bridge, control plane, 2 nodes, 1 pod: {before}"
    );
    assert!(
        before.processes.len() >= 6,
        "etcd, control plane, supervisor, pods: {before}"
    );
    assert_eq!(before.files, vec![cluster.layout().state_dir.clone()]);

    let removed = cluster.down().unwrap();
    assert!(!removed.files.is_empty());
    let after = cleanup::find(&scope(&root, &name));
    assert!(after.is_empty(), "left behind: {after}");
    for (pid, cmdline) in before.processes {
        assert!(!cleanup::alive(pid), "process {pid} ({cmdline}) survived");
    }
    // A second down finds nothing to do.
    assert!(switchyard_e2e::cluster::down(&root, &name).unwrap().is_empty());
}
