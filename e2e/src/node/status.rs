//! Pod status as the simulated kubelet reports it: pure functions from the runner's view of its
//! containers to the server-side-apply body of `pods/status`.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// A container's state.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Not running, with a reason such as `ContainerCreating`, `ErrImagePull` or `CrashLoopBackOff`.
    Waiting {
        /// Short reason.
        reason: String,
        /// Human-readable detail.
        message: String,
    },
    /// Running since.
    Running {
        /// Start time.
        started_at: Timestamp,
    },
    /// Exited.
    Terminated {
        /// Exit code (128 + signal for a signal).
        exit_code: i32,
        /// `Completed` or `Error`.
        reason: String,
        /// Start time.
        started_at: Timestamp,
        /// Exit time.
        finished_at: Timestamp,
    },
}

/// One container as reported.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// Image as in the spec.
    pub image: String,
    /// Passes readiness.
    pub ready: bool,
    /// Restarts so far.
    pub restart_count: i32,
    /// Current state.
    pub state: State,
    /// Previous termination.
    pub last: Option<State>,
}

/// A pod condition and when its status last changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    /// `Ready`, `ContainersReady`, `Initialized`, `PodReadyToStartContainers`.
    pub type_: String,
    /// Holds.
    pub status: bool,
    /// Last change.
    pub since: Timestamp,
    /// Reason when false.
    pub reason: Option<String>,
}

/// Everything the status body is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    pub phase: String,
    /// Conditions.
    pub conditions: Vec<Condition>,
    /// Pod IPs (IPv4 first); empty until the network is set up.
    pub pod_ips: Vec<IpAddr>,
    /// Node IPs.
    pub host_ips: Vec<IpAddr>,
    /// When the node accepted the pod.
    pub start_time: Timestamp,
    /// Init containers.
    pub init_containers: Vec<ContainerView>,
    /// Containers.
    pub containers: Vec<ContainerView>,
}

fn time(t: Timestamp) -> Value {
    serde_json::to_value(Time(t)).unwrap_or(Value::Null)
}

fn state(s: &State) -> Value {
    match s {
        State::Waiting { reason, message } => json!({"waiting": {"reason": reason, "message": message}}),
        State::Running { started_at } => json!({"running": {"startedAt": time(*started_at)}}),
        State::Terminated {
            exit_code,
            reason,
            started_at,
            finished_at,
        } => json!({"terminated": {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": time(*started_at),
            "finishedAt": time(*finished_at),
        }}),
    }
}

fn container(pod_uid: &str, c: &ContainerView) -> Value {
    let mut v = json!({
        "name": c.name,
        "image": c.image,
        "imageID": format!("switchyard-e2e://{}", c.image),
        "ready": c.ready,
        "started": matches!(c.state, State::Running { .. }),
        "restartCount": c.restart_count,
        "state": state(&c.state),
        "lastState": c.last.as_ref().map(state).unwrap_or_else(|| json!({})),
    });
    if !matches!(c.state, State::Waiting { .. }) || c.restart_count > 0 {
        v["containerID"] = json!(format!(
            "switchyard-e2e://{}-{}-{}",
            pod_uid, c.name, c.restart_count
        ));
    }
    v
}

/// The server-side-apply body for `pods/status`.
pub fn apply_body(namespace: &str, name: &str, uid: &str, view: &PodView) -> Value {
    let ips = |ips: &[IpAddr]| {
        ips.iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect::<Vec<_>>()
    };
    let mut status = json!({
        "phase": view.phase,
        "conditions": view.conditions.iter().map(|c| {
            let mut cond = json!({
                "type": c.type_,
                "status": if c.status { "True" } else { "False" },
                "lastTransitionTime": time(c.since),
            });
            if let Some(reason) = &c.reason {
                cond["reason"] = json!(reason);
            }
            cond
        }).collect::<Vec<_>>(),
        "hostIP": view.host_ips.first().map(ToString::to_string),
        "hostIPs": ips(&view.host_ips),
        "startTime": time(view.start_time),
        "containerStatuses": view.containers.iter().map(|c| container(uid, c)).collect::<Vec<_>>(),
    });
    if !view.init_containers.is_empty() {
        status["initContainerStatuses"] = json!(
            view.init_containers
                .iter()
                .map(|c| container(uid, c))
                .collect::<Vec<_>>()
        );
    }
    if let Some(first) = view.pod_ips.first() {
        status["podIP"] = json!(first.to_string());
        status["podIPs"] = json!(ips(&view.pod_ips));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_ready_pod_reports_ips_conditions_and_container_state() {
        let t = Timestamp::from_second(1_700_000_000).unwrap();
        let view = PodView {
            phase: "Running".into(),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: true,
                since: t,
                reason: None,
            }],
            pod_ips: vec!["10.244.1.5".parse().unwrap(), "fd00:10:244:1::5".parse().unwrap()],
            host_ips: vec!["172.31.0.11".parse().unwrap()],
            start_time: t,
            init_containers: vec![],
            containers: vec![ContainerView {
                name: "echo".into(),
                image: "switchyard.dev/echo:test".into(),
                ready: true,
                restart_count: 0,
                state: State::Running { started_at: t },
                last: None,
            }],
        };
        let body = apply_body("ns", "p", "uid-1", &view);
        let s = &body["status"];
        assert_eq!(s["podIP"], "10.244.1.5");
        assert_eq!(s["podIPs"][1]["ip"], "fd00:10:244:1::5");
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["conditions"][0]["lastTransitionTime"], "2023-11-14T22:13:20Z");
        assert_eq!(
            s["containerStatuses"][0]["state"]["running"]["startedAt"],
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            s["containerStatuses"][0]["containerID"],
            "switchyard-e2e://uid-1-echo-0"
        );
    }

    #[test]
    fn image_pull_failure_is_a_waiting_state_without_container_id() {
        let c = ContainerView {
            name: "web".into(),
            image: "nginx".into(),
            ready: false,
            restart_count: 0,
            state: State::Waiting {
                reason: "ErrImagePull".into(),
                message: "no runtime".into(),
            },
            last: None,
        };
        let v = container("u", &c);
        assert_eq!(v["state"]["waiting"]["reason"], "ErrImagePull");
        assert!(v.get("containerID").is_none());
    }
}
