use serde_json::json;

use super::*;

const NOW: i64 = 1_800_000_000;

fn pc(name: &str, created: i64, selector: serde_json::Value, status: serde_json::Value) -> ProxyConfig {
    let created = Timestamp::from_second(created).unwrap().to_string();
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyConfig",
        "metadata": {"name": name, "generation": 2, "creationTimestamp": created},
        "spec": {"mode": "iptables", "nodeSelector": selector, "rollout": {"progressDeadlineSeconds": 300}},
        "status": status,
    }))
    .unwrap()
}

fn node(name: &str, pool: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"pool": pool}}})).unwrap()
}

fn proxy_node(name: &str, hash: &str, ready: bool, since: i64) -> ProxyNode {
    let since = Timestamp::from_second(since).unwrap().to_string();
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyNode",
        "metadata": {"name": name},
        "spec": {"proxyConfig": "a"},
        "status": {"appliedConfigHash": hash, "lastSyncDurationMillis": 40,
                   "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                                   "reason": "x", "message": "", "lastTransitionTime": since}]},
    }))
    .unwrap()
}

fn daemon_set(desired: i32) -> DaemonSet {
    serde_json::from_value(json!({"metadata": {"name": "ds"}, "status": {
        "desiredNumberScheduled": desired, "currentNumberScheduled": desired, "numberMisscheduled": 0,
        "numberReady": 0}}))
    .unwrap()
}

fn cond<'a>(status: &'a ProxyConfigStatus, kind: &str) -> (&'a str, &'a str) {
    let c = status.conditions.iter().find(|c| c.type_ == kind).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

fn observed<'a>(pc: &'a ProxyConfig, ds: &'a DaemonSet, nodes: Vec<&'a ProxyNode>, now: i64) -> Observed<'a> {
    Observed {
        pc,
        config: Ok("h1".into()),
        daemon_set: Some(ds),
        proxy_nodes: nodes,
        conflicts: vec![],
        cleaning_up: false,
        now,
    }
}

#[test]
fn older_proxy_config_keeps_shared_nodes() {
    let old = pc("old", 100, json!({"matchLabels": {"pool": "a"}}), json!({}));
    let new = pc("new", 200, json!({}), json!({}));
    let (n1, n2) = (node("n1", "a"), node("n2", "b"));
    let owners = node_owners(&[&new, &old], &[&n1, &n2]);
    assert_eq!(owners["n1"], "old");
    assert_eq!(owners["n2"], "new");
    assert_eq!(conflicting_nodes(&new, &[&n1, &n2], &owners), ["n1"]);
    assert!(conflicting_nodes(&old, &[&n1, &n2], &owners).is_empty());
}

#[test]
fn all_nodes_updated_and_ready_is_ready() {
    let p = pc("a", 100, json!({}), json!({}));
    let ds = daemon_set(3);
    let nodes: Vec<ProxyNode> = (0..3)
        .map(|i| proxy_node(&format!("n{i}"), "h1", true, NOW - 10))
        .collect();
    let status = roll_up(&observed(&p, &ds, nodes.iter().collect(), NOW));
    assert_eq!(
        (status.desired_nodes, status.updated_nodes, status.ready_nodes),
        (3, 3, 3)
    );
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    assert_eq!(cond(&status, "Available"), ("True", "AllNodesReady"));
    assert_eq!(cond(&status, "Progressing"), ("False", "RolloutComplete"));
    assert_eq!(cond(&status, "Degraded"), ("False", "AsExpected"));
    assert_eq!(cond(&status, "Ready"), ("True", "Ready"));
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(status.sync_duration.as_ref().unwrap().median_millis, 40);
}

#[test]
fn nodes_on_an_old_hash_are_rolling_out() {
    let p = pc("a", 100, json!({}), json!({}));
    let ds = daemon_set(3);
    let nodes = [
        proxy_node("n0", "h1", true, NOW),
        proxy_node("n1", "h0", true, NOW),
        proxy_node("n2", "h0", true, NOW),
    ];
    let status = roll_up(&observed(&p, &ds, nodes.iter().collect(), NOW));
    assert_eq!((status.updated_nodes, status.ready_nodes), (1, 1));
    assert_eq!(cond(&status, "Progressing"), ("True", "RollingOut"));
    // The agents on the old configuration still serve: the ProxyConfig stays available meanwhile.
    assert_eq!(cond(&status, "Available"), ("True", "AllNodesReady"));
    assert_eq!(cond(&status, "Ready"), ("False", "NotReady"));
}

#[test]
fn agents_that_never_start_hang_the_rollout_after_the_deadline() {
    let ds = daemon_set(3);
    // First reconcile: nothing yet, progress clock starts.
    let p = pc("a", 100, json!({}), json!({}));
    let first = roll_up(&observed(&p, &ds, vec![], NOW));
    assert_eq!(cond(&first, "Progressing"), ("True", "RollingOut"));
    assert_eq!(cond(&first, "Degraded"), ("False", "AsExpected"));

    // Still nothing 301 s later: hung (the deadline is 300 s).
    let p = pc("a", 100, json!({}), serde_json::to_value(&first).unwrap());
    let later = roll_up(&observed(&p, &ds, vec![], NOW + 301));
    assert_eq!(cond(&later, "Progressing"), ("True", "RollingOut"));
    assert_eq!(cond(&later, "Degraded"), ("True", "RolloutHung"));
    assert_eq!(
        later.last_progress_time, first.last_progress_time,
        "no progress, no new timestamp"
    );
}

#[test]
fn a_restarting_agent_degrades_only_after_the_grace_period() {
    let p = pc("a", 100, json!({}), json!({}));
    let ds = daemon_set(1);
    let just_failed = [proxy_node("n0", "h1", false, NOW - 5)];
    let status = roll_up(&observed(&p, &ds, just_failed.iter().collect(), NOW));
    assert_eq!(cond(&status, "Degraded"), ("False", "AsExpected"));
    let failing = [proxy_node("n0", "h1", false, NOW - 200)];
    let status = roll_up(&observed(&p, &ds, failing.iter().collect(), NOW));
    assert_eq!(cond(&status, "Degraded"), ("True", "AgentsFailing"));
    assert_eq!(status.degraded_nodes, 1);
}

#[test]
fn conflicts_and_invalid_specs_are_reported() {
    let p = pc("a", 100, json!({}), json!({}));
    let ds = daemon_set(1);
    let mut o = observed(&p, &ds, vec![], NOW);
    o.conflicts = vec!["n2".into(), "n1".into()];
    let status = roll_up(&o);
    assert_eq!(cond(&status, "Degraded"), ("True", "NodeConflict"));
    assert_eq!(status.conflicting_nodes, ["n1", "n2"]);
    let msg = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .message;
    assert!(msg.contains("n1, n2") || msg.contains("n2, n1"), "{msg}");

    o.conflicts = vec![];
    o.config = Err("spec.masqueradeBit: must be between 0 and 31".into());
    let status = roll_up(&o);
    assert_eq!(cond(&status, "Degraded"), ("True", "InvalidSpec"));
    assert_eq!(cond(&status, "Ready"), ("False", "NotReady"));
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let p = pc("a", 100, json!({}), json!({}));
    let ds = daemon_set(0);
    let first = roll_up(&observed(&p, &ds, vec![], NOW));
    let p = pc("a", 100, json!({}), serde_json::to_value(&first).unwrap());
    let second = roll_up(&observed(&p, &ds, vec![], NOW + 60));
    assert_eq!(first, second, "a reconcile without change writes the same status");
    assert_eq!(cond(&second, "Available"), ("True", "NoNodesSelected"));
}
