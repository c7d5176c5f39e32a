//! Pure status logic: which ProxyConfig owns which node, and the roll-up of nodes into a ProxyConfig's
//! status with conditions from a fixed list of reasons.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use switchyard_api::proxyconfig::{ProxyConfigStatus, SyncDurationSummary};
use switchyard_api::{ProxyConfig, ProxyNode};

use crate::build::selects;

/// Condition reasons (documented in docs/operations.md).
pub mod reason {
    /// Available: every selected node is ready.
    pub const ALL_NODES_READY: &str = "AllNodesReady";
    /// Available: some selected nodes are ready.
    pub const SOME_NODES_READY: &str = "SomeNodesReady";
    /// Available false: no selected node is ready.
    pub const NO_NODES_READY: &str = "NoNodesReady";
    /// Available: the selector matches no node.
    pub const NO_NODES_SELECTED: &str = "NoNodesSelected";
    /// Progressing: agents are being rolled.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Progressing false: every node runs the current configuration.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// Degraded false.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Degraded: the spec cannot be turned into an agent configuration.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Degraded: an older ProxyConfig selects some of the same nodes and keeps them.
    pub const NODE_CONFLICT: &str = "NodeConflict";
    /// Degraded: agents have been failing for a while.
    pub const AGENTS_FAILING: &str = "AgentsFailing";
    /// Degraded: no progress for progressDeadlineSeconds.
    pub const ROLLOUT_HUNG: &str = "RolloutHung";
    /// Degraded: the ProxyConfig is being deleted and agents are still removing their rules.
    pub const CLEANUP_PENDING: &str = "CleanupPending";
    /// Ready.
    pub const READY: &str = "Ready";
    /// Ready false.
    pub const NOT_READY: &str = "NotReady";
}

/// How long an agent may be failing before the ProxyConfig reports it (one restart is not a failure).
pub const AGENT_FAILURE_GRACE_SECONDS: i64 = 120;
/// Default progressDeadlineSeconds.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i64 = 600;

fn created(pc: &ProxyConfig) -> (i64, String) {
    let t = pc
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second());
    (t, pc.name_any())
}

/// For each node, the ProxyConfig that keeps it: the oldest one selecting it (by creation time, then
/// name), so adding a ProxyConfig never takes nodes away from a running one.
pub fn node_owners(configs: &[&ProxyConfig], nodes: &[&Node]) -> BTreeMap<String, String> {
    // A ProxyConfig being deleted keeps its nodes until it is gone: its agents are still removing
    // their rules, and a node never runs two agents.
    let mut ordered: Vec<&ProxyConfig> = configs.to_vec();
    ordered.sort_by_key(|pc| created(pc));
    let mut owners = BTreeMap::new();
    for node in nodes {
        let labels = node.labels();
        if let Some(pc) = ordered
            .iter()
            .find(|pc| selects(pc.spec.node_selector.as_ref(), labels))
        {
            owners.insert(node.name_any(), pc.name_any());
        }
    }
    owners
}

/// Nodes `pc` selects but another ProxyConfig keeps.
pub fn conflicting_nodes(
    pc: &ProxyConfig,
    nodes: &[&Node],
    owners: &BTreeMap<String, String>,
) -> Vec<String> {
    let name = pc.name_any();
    nodes
        .iter()
        .filter(|n| selects(pc.spec.node_selector.as_ref(), n.labels()))
        .map(|n| n.name_any())
        .filter(|n| owners.get(n).is_some_and(|owner| *owner != name))
        .collect()
}

fn condition_status(node: &ProxyNode, kind: &str) -> Option<(bool, Option<i64>)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)?;
    Some((c.status == "True", Some(c.last_transition_time.0.as_second())))
}

/// Everything the roll-up looks at.
#[derive(Debug)]
pub struct Observed<'a> {
    /// The ProxyConfig.
    pub pc: &'a ProxyConfig,
    /// Hash of its effective configuration, or the reason it is invalid.
    pub config: Result<String, String>,
    /// Its DaemonSet, if it exists.
    pub daemon_set: Option<&'a DaemonSet>,
    /// ProxyNodes reporting for this ProxyConfig.
    pub proxy_nodes: Vec<&'a ProxyNode>,
    /// Nodes an older ProxyConfig keeps.
    pub conflicts: Vec<String>,
    /// Being deleted, waiting for agents to clean up.
    pub cleaning_up: bool,
    /// Now, in seconds since the epoch.
    pub now: i64,
}

fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: i64,
) -> Condition {
    Condition {
        type_: kind.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::from_second(now).unwrap_or_default()),
    }
}

/// Keeps lastTransitionTime of conditions whose status did not change, so the status does not churn.
fn carry_transition_times(new: &mut [Condition], old: &[Condition]) {
    for c in new {
        if let Some(prev) = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = prev.last_transition_time.clone();
        }
    }
}

/// The status of a ProxyConfig, from what is observed. Pure and deterministic for a given `now`.
pub fn roll_up(o: &Observed<'_>) -> ProxyConfigStatus {
    let old = o.pc.status.clone().unwrap_or_default();
    let generation = o.pc.metadata.generation;
    let ds_status = o.daemon_set.and_then(|d| d.status.as_ref());
    let desired = ds_status.map_or(0, |s| s.desired_number_scheduled);
    let hash = o.config.as_ref().ok();

    let mut updated = 0;
    let mut ready = 0;
    // Agents serving traffic, on any configuration (during a rollout the old ones still serve).
    let mut serving = 0;
    let mut degraded = 0;
    let mut durations: Vec<i64> = vec![];
    for node in &o.proxy_nodes {
        let status = node.status.clone().unwrap_or_default();
        let is_updated = hash.is_some() && status.applied_config_hash.as_ref() == hash;
        let node_ready = condition_status(node, "Ready");
        if node_ready.is_some_and(|(r, _)| r) {
            serving += 1;
        }
        if is_updated {
            updated += 1;
            if node_ready.is_some_and(|(r, _)| r) {
                ready += 1;
            }
        }
        // A node counts as degraded once it has not been ready for the grace period.
        if let Some((false, Some(since))) = node_ready
            && o.now - since >= AGENT_FAILURE_GRACE_SECONDS
        {
            degraded += 1;
        }
        if let Some(ms) = status.last_sync_duration_millis {
            durations.push(ms);
        }
    }
    durations.sort_unstable();
    let sync_duration = (!durations.is_empty()).then(|| SyncDurationSummary {
        median_millis: durations[durations.len() / 2],
        max_millis: durations[durations.len() - 1],
    });

    let progress = (updated, ready);
    let old_progress = (old.updated_nodes, old.ready_nodes);
    let last_progress_time = if progress != old_progress || old.last_progress_time.is_none() {
        Some(Time(Timestamp::from_second(o.now).unwrap_or_default()))
    } else {
        old.last_progress_time.clone()
    };
    let last_progress = last_progress_time.as_ref().map_or(o.now, |t| t.0.as_second());
    let deadline =
        o.pc.spec
            .rollout
            .as_ref()
            .and_then(|r| r.progress_deadline_seconds)
            .map_or(DEFAULT_PROGRESS_DEADLINE_SECONDS, i64::from);

    let (available, available_reason, available_msg) = if desired == 0 {
        (true, reason::NO_NODES_SELECTED, "no node is selected".to_owned())
    } else if serving >= desired {
        (
            true,
            reason::ALL_NODES_READY,
            format!("{serving}/{desired} nodes ready"),
        )
    } else if serving > 0 {
        (
            true,
            reason::SOME_NODES_READY,
            format!("{serving}/{desired} nodes ready"),
        )
    } else {
        (false, reason::NO_NODES_READY, format!("0/{desired} nodes ready"))
    };
    let rolling = hash.is_some() && (updated < desired || ready < desired);
    let (progressing_reason, progressing_msg) = if rolling {
        (
            reason::ROLLING_OUT,
            format!("{updated}/{desired} nodes updated, {ready} ready"),
        )
    } else {
        (
            reason::ROLLOUT_COMPLETE,
            format!("{desired} nodes run the current configuration"),
        )
    };

    let (degraded_now, degraded_reason, degraded_msg) = if o.cleaning_up {
        (
            true,
            reason::CLEANUP_PENDING,
            "waiting for agents to remove their rules".to_owned(),
        )
    } else if let Err(message) = &o.config {
        (true, reason::INVALID_SPEC, message.clone())
    } else if !o.conflicts.is_empty() {
        (
            true,
            reason::NODE_CONFLICT,
            format!("nodes kept by an older ProxyConfig: {}", o.conflicts.join(", ")),
        )
    } else if rolling && o.now - last_progress >= deadline {
        (
            true,
            reason::ROLLOUT_HUNG,
            format!("no progress for {}s: {progressing_msg}", o.now - last_progress),
        )
    } else if degraded > 0 {
        (
            true,
            reason::AGENTS_FAILING,
            format!("{degraded} agents not ready for over {AGENT_FAILURE_GRACE_SECONDS}s"),
        )
    } else {
        (false, reason::AS_EXPECTED, "no problem found".to_owned())
    };

    let is_ready = available && available_reason != reason::SOME_NODES_READY && !rolling && !degraded_now;
    let mut conditions = vec![
        condition(
            "Available",
            available,
            available_reason,
            available_msg,
            generation,
            o.now,
        ),
        condition(
            "Progressing",
            rolling,
            progressing_reason,
            progressing_msg,
            generation,
            o.now,
        ),
        condition(
            "Degraded",
            degraded_now,
            degraded_reason,
            degraded_msg.clone(),
            generation,
            o.now,
        ),
        condition(
            "Ready",
            is_ready,
            if is_ready {
                reason::READY
            } else {
                reason::NOT_READY
            },
            if is_ready {
                format!("{ready}/{desired} nodes ready")
            } else {
                degraded_msg
            },
            generation,
            o.now,
        ),
    ];
    carry_transition_times(&mut conditions, &old.conditions);

    let mut conflicting: Vec<String> = o
        .conflicts
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    conflicting.truncate(20);
    ProxyConfigStatus {
        observed_generation: generation,
        conditions,
        desired_nodes: desired,
        updated_nodes: updated,
        ready_nodes: ready,
        degraded_nodes: degraded,
        ready: Some(format!("{ready}/{desired}")),
        effective_config_hash: hash.cloned(),
        conflicting_nodes: conflicting,
        sync_duration,
        last_progress_time,
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
