//! The agent's Prometheus metrics. Names follow upstream kube-proxy (`kubeproxy_*`) so existing dashboards
//! and alerts keep working; Switchyard-only metrics are prefixed `switchyard_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set with the iptables table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `nat` or `filter`.
    pub table: String,
}

/// Label set of skipped objects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkippedLabels {
    /// `Service` or `EndpointSlice`.
    pub kind: String,
    /// Short reason (`invalid_ip`, ...).
    pub reason: String,
}

/// Label set of sync failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    /// Short stable error category.
    pub category: String,
}

/// Label set of the traffic policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// `internal` or `external`.
    pub traffic_policy: String,
}

fn sync_buckets() -> Histogram {
    // 1 ms .. ~16 s, as upstream's sync histograms.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// Duration of every sync (full and partial).
    pub sync_duration: Histogram,
    /// Duration of full syncs.
    pub sync_full_duration: Histogram,
    /// Duration of partial syncs.
    pub sync_partial_duration: Histogram,
    /// From an endpoint change (its trigger time) to the rules being programmed.
    pub network_programming_duration: Histogram,
    /// Unix time of the last successful sync.
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    /// Unix time a sync was last queued.
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    /// Endpoint changes waiting for a sync.
    pub endpoint_changes_pending: Gauge,
    /// Endpoint changes seen.
    pub endpoint_changes_total: Counter,
    /// Service changes waiting for a sync.
    pub service_changes_pending: Gauge,
    /// Service changes seen.
    pub service_changes_total: Counter,
    /// Failed iptables-restore runs.
    pub iptables_restore_failures: Counter,
    /// Rules programmed per table by the last sync.
    pub iptables_total: Family<TableLabel, Gauge>,
    /// Service ports with a Local policy and no local endpoint.
    pub no_local_endpoints: Family<PolicyLabel, Gauge>,
    /// Objects currently left out of the model because they are malformed.
    pub skipped_objects: Family<SkippedLabels, Gauge>,
    /// Failed syncs by category.
    pub sync_failures: Family<CategoryLabel, Counter>,
    /// Stale UDP conntrack entries deleted.
    pub conntrack_deleted: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            network_programming_duration: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            iptables_restore_failures: Counter::default(),
            iptables_total: Family::default(),
            no_local_endpoints: Family::default(),
            skipped_objects: Family::default(),
            sync_failures: Family::default(),
            conntrack_deleted: Counter::default(),
        };
        let r = registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "Latency of full syncs",
            m.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "Latency of partial syncs",
            m.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency: from an endpoint change to its rules being programmed",
            m.network_programming_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of rules was queued",
            m.last_queued_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative service changes",
            m.service_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative iptables restore failures",
            m.iptables_restore_failures.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Rules programmed by the last sync, per table",
            m.iptables_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no local endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register(
            "switchyard_skipped_objects",
            "Services and EndpointSlices currently left out because they are malformed",
            m.skipped_objects.clone(),
        );
        r.register(
            "switchyard_sync_failures",
            "Failed rule syncs by category",
            m.sync_failures.clone(),
        );
        r.register(
            "switchyard_conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted",
            m.conntrack_deleted.clone(),
        );
        m
    }
}

/// Renders `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_metric_names_are_exported() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.iptables_restore_failures.inc();
        metrics.sync_duration.observe(0.2);
        let text = encode(&registry);
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_network_programming_duration_seconds_count",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
