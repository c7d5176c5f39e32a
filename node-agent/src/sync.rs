//! The sync loop: turns the watched objects into a model, hands it to the dataplane backend, then cleans
//! stale conntrack entries, updates health-check servers, metrics and health.
//!
//! Bursts of changes are coalesced (at most one sync per minSyncPeriod); while nothing changes the
//! agent checks every syncPeriod that its rules are still in the kernel (a full sync when they are not)
//! and rewrites everything once an hour; a failed sync is retried with exponential backoff as a full
//! sync. A failed apply
//! leaves the previous rules in place (the backend applies atomically).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use switchyard_api::AgentConfig;
use switchyard_api::proxyconfig::ProxyMode;

use crate::conntrack::{Conntrack, stale_flows};
use crate::leftovers::Leftovers;
use crate::metrics::{CategoryLabel, Metrics, PolicyLabel, SkippedLabels, TableLabel};
use crate::model::{IpFamily, Model, NodeInfo, build};
use crate::server::{Health, HealthCheckServers, HealthCheckTarget};
use crate::watch::{Changes, Pending, Stores};

/// What a backend reports after a successful sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Rules (or equivalent objects) programmed, by table.
    pub rules: BTreeMap<&'static str, usize>,
    /// Whether the sync rewrote everything.
    pub full: bool,
}

/// A failed sync. The previous rules are still in place.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Short stable category for metrics (`restore_failed`, `binary_missing`, ...).
    pub category: &'static str,
    /// What went wrong.
    pub message: String,
}

/// A dataplane mode. Implementations apply atomically: after an error the kernel holds the previous rules.
pub trait Backend: Send {
    /// The mode this backend programs.
    fn mode(&self) -> ProxyMode;
    /// Programs `model`. `full` asks for a complete rewrite (first sync, hourly resync, lost rules, after a failure).
    fn sync(&mut self, model: &Model, node: &NodeInfo, full: bool) -> Result<SyncStats, BackendError>;
    /// Whether the rules of the last sync are still in the kernel (nobody flushed a table). Checked every
    /// syncPeriod while nothing changes; `false` makes the next sync full.
    fn rules_intact(&mut self) -> bool;
    /// Removes everything this backend ever programmed. Safe to run twice.
    fn cleanup(&mut self) -> Result<(), BackendError>;
}

/// Reads what the sync needs from the Node object.
pub fn node_info(name: &str, node: Option<&Node>) -> NodeInfo {
    let mut info = NodeInfo {
        name: name.to_owned(),
        ..NodeInfo::default()
    };
    let Some(node) = node else { return info };
    info.zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned();
    if let Some(spec) = &node.spec {
        let cidrs = spec
            .pod_cidrs
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| spec.pod_cidr.clone().map(|c| vec![c]));
        info.pod_cidrs = cidrs
            .into_iter()
            .flatten()
            .filter_map(|c| c.parse().ok())
            .collect();
    }
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for kind in ["InternalIP", "ExternalIP"] {
        for address in addresses.into_iter().flatten().filter(|a| a.type_ == kind) {
            if let Ok(ip) = address.address.parse::<IpAddr>()
                && !info
                    .primary_ips
                    .iter()
                    .any(|p| IpFamily::of(p) == IpFamily::of(&ip))
            {
                info.primary_ips.push(ip);
            }
        }
    }
    info
}

/// Everything one sync needs besides the objects.
pub struct Proxier {
    backend: Box<dyn Backend>,
    conntrack: Arc<dyn Conntrack>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    config: AgentConfig,
    node_name: String,
    /// The model the kernel holds (also after a failed apply, which leaves the previous rules in place).
    previous: Option<Model>,
    /// The last apply failed: the next sync must be full.
    force_full: bool,
    health_checks: HealthCheckServers,
    skipped: BTreeSet<(String, String, &'static str)>,
    /// Other modes' objects still to remove: after the first successful sync, retried after each later
    /// one until removed.
    leftovers: Vec<Box<dyn Leftovers>>,
}

impl std::fmt::Debug for Proxier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxier")
            .field("mode", &self.backend.mode())
            .field("node", &self.node_name)
            .finish()
    }
}

/// Result of one successful sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Backend statistics.
    pub stats: SyncStats,
    /// Service ports programmed over both families.
    pub services: usize,
    /// Endpoints programmed over both families.
    pub endpoints: usize,
    /// How long the sync took.
    pub duration: Duration,
}

impl Proxier {
    /// A proxier for `node_name` with the given backend.
    pub fn new(
        backend: Box<dyn Backend>,
        conntrack: Arc<dyn Conntrack>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        config: AgentConfig,
        node_name: String,
    ) -> Self {
        Self {
            backend,
            conntrack,
            metrics,
            health,
            config,
            node_name,
            previous: None,
            force_full: false,
            health_checks: HealthCheckServers::default(),
            skipped: BTreeSet::new(),
            leftovers: Vec::new(),
        }
    }

    /// Removes what other modes left behind, once this proxier's rules are in place (see
    /// [`crate::leftovers`]).
    pub fn with_leftovers(mut self, leftovers: Vec<Box<dyn Leftovers>>) -> Self {
        self.leftovers = leftovers;
        self
    }

    /// Modes whose leftovers are still to be removed.
    pub fn pending_leftovers(&self) -> Vec<ProxyMode> {
        self.leftovers.iter().map(|l| l.mode()).collect()
    }

    fn remove_leftovers(&mut self) {
        let mode = self.backend.mode();
        self.leftovers.retain_mut(
            |leftovers| match tokio::task::block_in_place(|| leftovers.remove()) {
                Ok(removed) => {
                    if !removed.is_empty() {
                        tracing::info!(%mode, previous = %leftovers.mode(), ?removed,
                            "removed what another mode left behind");
                    }
                    false
                }
                Err(error) => {
                    tracing::warn!(%mode, previous = %leftovers.mode(), %error,
                        "cannot remove what another mode left behind; will retry");
                    true
                }
            },
        );
    }

    /// The backend, for cleanup at shutdown.
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    /// Whether the next sync must be full.
    pub fn needs_full_sync(&self) -> bool {
        self.previous.is_none() || self.force_full
    }

    /// The periodic check while nothing changes: whether the kernel still holds our last rules. When it
    /// does, the agent counts as freshly synced (for /healthz); when it does not, the next sync is full.
    pub fn check_rules(&mut self) -> bool {
        if self.needs_full_sync() {
            return false;
        }
        if tokio::task::block_in_place(|| self.backend.rules_intact()) {
            self.health.synced(SystemTime::now());
            self.remove_leftovers();
            true
        } else {
            tracing::warn!("our rules are gone from the kernel (flushed by someone else?): full resync");
            self.force_full = true;
            false
        }
    }

    /// Builds the model from the objects and programs it.
    pub async fn sync(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: Option<&Node>,
        full: bool,
    ) -> Result<SyncOutcome, BackendError> {
        let start = Instant::now();
        let node = node_info(&self.node_name, node);
        let (model, report) = build(
            services.iter().map(AsRef::as_ref),
            slices.iter().map(AsRef::as_ref),
            &node,
            self.config.proxy_name.as_deref(),
        );
        self.report_skipped(&report.skipped);

        let full = full || self.previous.is_none() || self.force_full;
        let result = tokio::task::block_in_place(|| self.backend.sync(&model, &node, full));
        let stats = match result {
            Ok(stats) => stats,
            Err(error) => {
                self.metrics
                    .sync_failures
                    .get_or_create(&CategoryLabel {
                        category: error.category.into(),
                    })
                    .inc();
                if error.category.starts_with("restore") || error.category == "binary_missing" {
                    self.metrics.iptables_restore_failures.inc();
                }
                // The kernel still holds the previous rules (so `previous` stays, and the stale flows of
                // endpoints removed meanwhile are cleaned after the next good sync); the retry is full.
                self.force_full = true;
                return Err(error);
            }
        };

        if let Some(previous) = &self.previous {
            for family in IpFamily::ALL {
                self.delete_stale_flows(previous, &model, family);
            }
        }
        self.health_checks.reconcile(&health_check_targets(&model)).await;
        self.update_gauges(&model, &stats);

        let duration = start.elapsed();
        let seconds = duration.as_secs_f64();
        self.metrics.sync_duration.observe(seconds);
        if stats.full {
            self.metrics.sync_full_duration.observe(seconds);
        } else {
            self.metrics.sync_partial_duration.observe(seconds);
        }
        let now = SystemTime::now();
        self.metrics.last_sync_timestamp.set(unix_seconds(now));
        self.health.synced(now);

        let outcome = SyncOutcome {
            services: model.v4.services.len() + model.v6.services.len(),
            endpoints: model.v4.endpoint_count() + model.v6.endpoint_count(),
            stats,
            duration,
        };
        self.previous = Some(model);
        self.force_full = false;
        self.remove_leftovers();
        Ok(outcome)
    }

    fn delete_stale_flows(&self, previous: &Model, model: &Model, family: IpFamily) {
        for filter in stale_flows(previous.family(family), model.family(family)) {
            match tokio::task::block_in_place(|| self.conntrack.delete_udp(&filter)) {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.conntrack_deleted.inc_by(n);
                    tracing::debug!(?filter, deleted = n, "deleted stale UDP conntrack entries");
                }
                Err(error) => tracing::warn!(?filter, %error, "cannot delete stale UDP conntrack entries"),
            }
        }
    }

    fn report_skipped(&mut self, skipped: &[crate::model::Skipped]) {
        let mut now = BTreeSet::new();
        for s in skipped {
            let key = (s.kind.to_owned(), s.object.clone(), s.reason);
            if !self.skipped.contains(&key) {
                tracing::warn!(kind = s.kind, object = %s.object, reason = s.reason, detail = %s.detail,
                    "skipping malformed object; other services are not affected");
            }
            now.insert(key);
        }
        let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for (kind, _, reason) in self.skipped.iter().chain(&now) {
            counts.entry((kind.clone(), reason)).or_default();
        }
        for (kind, _, reason) in &now {
            *counts.entry((kind.clone(), reason)).or_default() += 1;
        }
        for ((kind, reason), count) in counts {
            self.metrics
                .skipped_objects
                .get_or_create(&SkippedLabels {
                    kind,
                    reason: reason.into(),
                })
                .set(count);
        }
        self.skipped = now;
    }

    fn update_gauges(&self, model: &Model, stats: &SyncStats) {
        for (table, count) in &stats.rules {
            let count = i64::try_from(*count).unwrap_or(i64::MAX);
            self.metrics
                .iptables_total
                .get_or_create(&TableLabel {
                    table: (*table).into(),
                })
                .set(count);
        }
        let (mut internal, mut external) = (0, 0);
        for svc in model.v4.services.values().chain(model.v6.services.values()) {
            if svc.internal_policy_local && svc.has_any_endpoints && svc.local_endpoints.is_empty() {
                internal += 1;
            }
            if svc.external_policy_local
                && svc.externally_accessible()
                && svc.has_any_endpoints
                && svc.local_endpoints.is_empty()
            {
                external += 1;
            }
        }
        let policy = |p: &str| PolicyLabel {
            traffic_policy: p.into(),
        };
        self.metrics
            .no_local_endpoints
            .get_or_create(&policy("internal"))
            .set(internal);
        self.metrics
            .no_local_endpoints
            .get_or_create(&policy("external"))
            .set(external);
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Health-check servers wanted by the model: one per healthCheckNodePort, counting local ready endpoints
/// over both families.
pub fn health_check_targets(model: &Model) -> BTreeMap<u16, HealthCheckTarget> {
    let mut out: BTreeMap<u16, HealthCheckTarget> = BTreeMap::new();
    for svc in model.v4.services.values().chain(model.v6.services.values()) {
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        let target = out.entry(port).or_insert_with(|| HealthCheckTarget {
            namespace: svc.name.namespace.clone(),
            name: svc.name.name.clone(),
            local_endpoints: 0,
        });
        let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
        target.local_endpoints += svc
            .local_endpoints
            .iter()
            .filter(|e| e.ready && seen.insert(e.ip))
            .count();
    }
    out
}

/// Longest time between two full syncs while the rules stay intact (upstream's FullSyncPeriod): a full
/// sync rewrites every table, which takes seconds at 10k services, so it is not done every syncPeriod.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Drives syncs until the task is dropped, reporting each outcome through `writer` (the node's ProxyNode)
/// when there is one.
pub async fn run(
    mut proxier: Proxier,
    stores: Stores,
    changes: Arc<Changes>,
    metrics: Arc<Metrics>,
    mut writer: Option<crate::status::Writer>,
) {
    if let Err(error) = stores.wait_until_ready().await {
        tracing::error!(%error, "watches stopped before their first list");
        return;
    }
    let sync_period: Duration = proxier.config.sync_period.into();
    let min_sync_period: Duration = proxier.config.min_sync_period.into();
    let max_backoff = sync_period.max(Duration::from_secs(1));

    let mut next_full = tokio::time::Instant::now();
    let mut next_check = next_full + sync_period;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_secs(1);
    let mut last_start: Option<tokio::time::Instant> = None;
    let mut carried = Pending::default();
    let mut first = true;
    let mut report = crate::status::Report {
        mode: Some(proxier.backend.mode()),
        config_hash: proxier.config.hash(),
        ..crate::status::Report::default()
    };

    loop {
        if !first {
            let deadline = retry_at.map_or(next_full, |r| r.min(next_full)).min(next_check);
            let woken_by_change = tokio::select! {
                () = changes.changed() => true,
                () = tokio::time::sleep_until(deadline) => false,
            };
            let now = tokio::time::Instant::now();
            let due = now >= next_full || retry_at.is_some_and(|r| now >= r);
            if !woken_by_change && !due {
                // The periodic check: nothing changed, so only verify that our rules are still there (as
                // upstream's canary monitor does) instead of rewriting every table each syncPeriod.
                next_check = now + sync_period;
                if proxier.check_rules() {
                    continue;
                }
            }
        }
        first = false;
        if let Some(last) = last_start {
            // Coalesce: changes arriving within minSyncPeriod of the last sync wait for the next one.
            tokio::time::sleep_until(last + min_sync_period).await;
        }
        let now = tokio::time::Instant::now();
        last_start = Some(now);
        metrics.last_queued_timestamp.set(unix_seconds(SystemTime::now()));

        let mut pending = changes.take();
        pending.trigger_times.append(&mut carried.trigger_times);
        metrics.service_changes_total.inc_by(pending.services);
        metrics.endpoint_changes_total.inc_by(pending.endpoints);

        let full = now >= next_full || retry_at.is_some_and(|r| now >= r) || proxier.needs_full_sync();
        let services = stores.services.state();
        let slices = stores.slices.state();
        let node = stores.node.state().into_iter().next();
        match proxier.sync(&services, &slices, node.as_deref(), full).await {
            Ok(outcome) => {
                let synced_at = SystemTime::now();
                for trigger in &pending.trigger_times {
                    if let Ok(latency) = synced_at.duration_since(*trigger) {
                        metrics
                            .network_programming_duration
                            .observe(latency.as_secs_f64());
                    }
                }
                tracing::info!(
                    full = outcome.stats.full,
                    services = outcome.services,
                    endpoints = outcome.endpoints,
                    duration_ms = outcome.duration.as_millis() as u64,
                    "synced rules"
                );
                if outcome.stats.full {
                    next_full = now + FULL_SYNC_PERIOD;
                }
                next_check = now + sync_period;
                let rules: usize = outcome.stats.rules.values().sum();
                report.last_sync = Some((k8s_openapi::jiff::Timestamp::now().as_second(), outcome.duration));
                report.counts = (outcome.services as i64, outcome.endpoints as i64, rules as i64);
                report.last_error = None;
                retry_at = None;
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                tracing::error!(category = error.category, %error, retry_in_ms = backoff.as_millis() as u64,
                    "sync failed; previous rules stay in place");
                carried.trigger_times = pending.trigger_times;
                report.last_error = Some(format!("{}: {error}", error.category));
                retry_at = Some(now + backoff);
                backoff = (backoff * 2).min(max_backoff);
            }
        }
        if let Some(writer) = writer.as_mut() {
            writer.update(&report, node.as_deref()).await;
        }
        let (svc_pending, ep_pending) = changes.pending_counts();
        metrics
            .service_changes_pending
            .set(i64::try_from(svc_pending).unwrap_or(i64::MAX));
        metrics
            .endpoint_changes_pending
            .set(i64::try_from(ep_pending).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
