//! `cluster down` after the supervisor crashed: the control plane and pod processes it left running,
//! and their namespaces, are found by name and removed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{BIN, apply, echo_pod, ready_pod};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use switchyard_e2e::cleanup;
use switchyard_e2e::cluster::{down, scope};
use switchyard_e2e::{Cluster, testing};

#[tokio::test]
async fn cluster_down_after_a_supervisor_crash_leaves_nothing_behind() {
    require_root!("cluster_down_after_a_supervisor_crash_leaves_nothing_behind");
    let spec = testing::spec("e2ecrash", 1, BIN).unwrap();
    let (root, name) = (spec.state_root.clone(), spec.name.clone());
    let cluster = Cluster::up(spec, Duration::from_secs(300)).await.unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client().await.unwrap(), "default");
    apply(&pods, echo_pod("echo", Some("node-1"), 30)).await;
    ready_pod(&pods, "echo").await;

    let supervisor = cluster.info().supervisor_pid;
    nix::sys::signal::kill(Pid::from_raw(supervisor as i32), Signal::SIGKILL).unwrap();
    testing::eventually("the supervisor to die", Duration::from_secs(10), || async {
        Ok((!cleanup::alive(supervisor)).then_some(()))
    })
    .await
    .unwrap();
    let orphans = cleanup::find(&scope(&root, &name));
    assert!(
        orphans
            .processes
            .iter()
            .any(|(_, cmd)| cmd.contains("kube-apiserver")),
        "the control plane outlives its crashed supervisor: {orphans}"
    );

    down(&root, &name).unwrap();
    for (pid, cmdline) in &orphans.processes {
        assert!(!cleanup::alive(*pid), "process {pid} ({cmdline}) survived");
    }
    let after = cleanup::find(&scope(&root, &name));
    assert!(after.is_empty(), "left behind: {after}");
    drop(cluster);
}
