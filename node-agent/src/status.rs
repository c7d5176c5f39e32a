//! The node's ProxyNode: what this agent reports about itself (server-side apply, rate-limited), and the
//! watch on its ProxyConfig that tells it to remove its rules when the ProxyConfig is deleted.
//!
//! Writes only the ProxyNode named after this node; never the ProxyConfig.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use switchyard_api::proxyconfig::ProxyMode;
use switchyard_api::{AGENT_FIELD_MANAGER, ProxyNodeStatus};

/// Label on ProxyNodes naming their ProxyConfig (the operator lists by it).
pub const PROXYCONFIG_LABEL: &str = "switchyard.dev/proxyconfig";

/// What the agent knows about its own state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Mode programmed.
    pub mode: Option<ProxyMode>,
    /// Effective configuration hash.
    pub config_hash: String,
    /// Last successful sync: end time (seconds since the epoch) and duration.
    pub last_sync: Option<(i64, Duration)>,
    /// Service ports, endpoints and rules programmed.
    pub counts: (i64, i64, i64),
    /// Last sync error (cleared by a successful sync).
    pub last_error: Option<String>,
    /// Rules were removed because the ProxyConfig is being deleted.
    pub cleaned_up: bool,
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, now: i64, old: &[Condition]) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::from_second(now).unwrap_or_default()));
    Condition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: since,
    }
}

/// The ProxyNode status for `report` (pure). Unchanged conditions keep their transition time.
pub fn status_for(report: &Report, now: i64, old: &[Condition]) -> ProxyNodeStatus {
    let synced = report.last_sync.is_some() && report.last_error.is_none();
    let mut conditions = vec![
        condition(
            "Synced",
            synced,
            if synced { "RulesSynced" } else { "SyncFailed" },
            report.last_error.as_deref().unwrap_or(if synced {
                "rules match the API"
            } else {
                "no sync yet"
            }),
            now,
            old,
        ),
        condition(
            "Ready",
            synced,
            if synced { "AgentReady" } else { "AgentNotReady" },
            "",
            now,
            old,
        ),
    ];
    if report.cleaned_up {
        conditions.push(condition(
            "CleanedUp",
            true,
            "RulesRemoved",
            "every Switchyard rule was removed",
            now,
            old,
        ));
    }
    ProxyNodeStatus {
        mode: report.mode,
        applied_config_hash: Some(report.config_hash.clone()),
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        last_sync_time: report
            .last_sync
            .and_then(|(t, _)| Timestamp::from_second(t).ok())
            .map(Time),
        last_sync_duration_millis: report
            .last_sync
            .map(|(_, d)| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        services: Some(report.counts.0),
        endpoints: Some(report.counts.1),
        rules: Some(report.counts.2),
        last_error: report.last_error.clone(),
        conditions,
    }
}

/// Whether `new` differs from what was last written in a way worth a write now. Sync times alone are
/// refreshed at most every `heartbeat`, so a busy node does not flood the API server.
pub fn worth_writing(
    new: &Report,
    written: Option<&Report>,
    since_write: Duration,
    heartbeat: Duration,
) -> bool {
    let Some(old) = written else { return true };
    let significant = new.mode != old.mode
        || new.config_hash != old.config_hash
        || new.last_error != old.last_error
        || new.cleaned_up != old.cleaned_up
        || new.counts != old.counts
        || new.last_sync.is_some() != old.last_sync.is_some();
    significant || (new != old && since_write >= heartbeat)
}

/// Writes the ProxyNode of one node.
pub struct Writer {
    client: Client,
    node: String,
    proxy_config: String,
    written: Option<(Report, Instant)>,
    old_conditions: Vec<Condition>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("node", &self.node)
            .field("proxy_config", &self.proxy_config)
            .finish()
    }
}

impl Writer {
    /// A writer for `node`, serving `proxy_config`.
    pub fn new(client: Client, node: String, proxy_config: String) -> Self {
        Self {
            client,
            node,
            proxy_config,
            written: None,
            old_conditions: vec![],
        }
    }

    /// Writes `report` if worth it (see [`worth_writing`]). Errors are logged and retried next time.
    pub async fn update(&mut self, report: &Report, node: Option<&Node>) {
        let since = self
            .written
            .as_ref()
            .map_or(Duration::MAX, |(_, at)| at.elapsed());
        if !worth_writing(
            report,
            self.written.as_ref().map(|(r, _)| r),
            since,
            Duration::from_secs(300),
        ) {
            return;
        }
        match self.write(report, node).await {
            Ok(()) => self.written = Some((report.clone(), Instant::now())),
            Err(error) => tracing::warn!(%error, "cannot write ProxyNode status"),
        }
    }

    async fn write(&mut self, report: &Report, node: Option<&Node>) -> Result<(), kube::Error> {
        let api = Api::<switchyard_api::ProxyNode>::all(self.client.clone());
        let params = PatchParams::apply(AGENT_FIELD_MANAGER).force();
        // Owned by the Node, so it is garbage-collected with it.
        let owner = node.and_then(|n| n.controller_owner_ref(&())).map(|mut o| {
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            o
        });
        let object = serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ProxyNode",
            "metadata": {
                "name": self.node,
                "labels": {PROXYCONFIG_LABEL: self.proxy_config},
                "ownerReferences": owner.map(|o| vec![o]).unwrap_or_default(),
            },
            "spec": {"proxyConfig": self.proxy_config},
        });
        api.patch(&self.node, &params, &Patch::Apply(object)).await?;
        let now = Timestamp::now().as_second();
        let status = status_for(report, now, &self.old_conditions);
        let patch = serde_json::json!({
            "apiVersion": "switchyard.dev/v1alpha1",
            "kind": "ProxyNode",
            "status": status,
        });
        api.patch_status(&self.node, &params, &Patch::Apply(patch))
            .await?;
        self.old_conditions = status.conditions;
        Ok(())
    }
}

/// Waits until the ProxyConfig `name` is being deleted (or is gone after having existed).
pub async fn wait_for_deletion(client: Client, name: String) {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let api = Api::<switchyard_api::ProxyConfig>::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut seen = false;
    let mut events = std::pin::pin!(watcher::watcher(api, config));
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pc) | watcher::Event::InitApply(pc)) => {
                seen = true;
                if pc.metadata.deletion_timestamp.is_some() {
                    return;
                }
            }
            Ok(watcher::Event::Delete(_)) if seen => return,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "ProxyConfig watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> Report {
        Report {
            mode: Some(ProxyMode::Iptables),
            config_hash: "h1".into(),
            last_sync: Some((1_800_000_000, Duration::from_millis(42))),
            counts: (10, 20, 300),
            last_error: None,
            cleaned_up: false,
        }
    }

    #[test]
    fn synced_agent_reports_ready_with_its_counts() {
        let status = status_for(&synced(), 1_800_000_001, &[]);
        assert_eq!(status.applied_config_hash.as_deref(), Some("h1"));
        assert_eq!(status.last_sync_duration_millis, Some(42));
        assert_eq!(
            (status.services, status.endpoints, status.rules),
            (Some(10), Some(20), Some(300))
        );
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn failing_agent_reports_the_error_and_keeps_transition_times() {
        let mut report = synced();
        report.last_error = Some("iptables-restore failed: line 3".into());
        let first = status_for(&report, 100, &[]);
        let synced_cond = first.conditions.iter().find(|c| c.type_ == "Synced").unwrap();
        assert_eq!(
            (synced_cond.status.as_str(), synced_cond.message.as_str()),
            ("False", "iptables-restore failed: line 3")
        );
        let later = status_for(&report, 200, &first.conditions);
        assert_eq!(
            later.conditions, first.conditions,
            "no churn while nothing changes"
        );
    }

    #[test]
    fn writes_are_rate_limited_to_significant_changes() {
        let old = synced();
        let mut later_sync = synced();
        later_sync.last_sync = Some((1_800_000_030, Duration::from_millis(40)));
        assert!(worth_writing(
            &old,
            None,
            Duration::ZERO,
            Duration::from_secs(300)
        ));
        assert!(!worth_writing(
            &later_sync,
            Some(&old),
            Duration::from_secs(30),
            Duration::from_secs(300)
        ));
        assert!(worth_writing(
            &later_sync,
            Some(&old),
            Duration::from_secs(301),
            Duration::from_secs(300)
        ));
        let mut failed = synced();
        failed.last_error = Some("boom".into());
        assert!(worth_writing(
            &failed,
            Some(&old),
            Duration::ZERO,
            Duration::from_secs(300)
        ));
    }
}
