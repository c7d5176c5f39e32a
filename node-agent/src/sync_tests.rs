use std::sync::Mutex;

use prometheus_client::registry::Registry;
use serde_json::json;
use switchyard_api::ProxyConfigSpec;

use super::*;
use crate::conntrack::{ConntrackError, FlowFilter};

/// Records what the proxier asked of the dataplane; fails when told to.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(usize, bool)>>,
    fail_next: Mutex<bool>,
    rules_lost: Mutex<bool>,
}

struct RecordingBackend(Arc<Recorder>);

impl Backend for RecordingBackend {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }
    fn sync(&mut self, model: &Model, _: &NodeInfo, full: bool) -> Result<SyncStats, BackendError> {
        if std::mem::take(&mut *self.0.fail_next.lock().unwrap()) {
            return Err(BackendError {
                category: "restore_failed",
                message: "forced".into(),
            });
        }
        self.0.calls.lock().unwrap().push((model.v4.services.len(), full));
        Ok(SyncStats {
            rules: BTreeMap::from([("nat", 3)]),
            full,
        })
    }
    fn rules_intact(&mut self) -> bool {
        !std::mem::take(&mut *self.0.rules_lost.lock().unwrap())
    }
    fn cleanup(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[derive(Default)]
struct RecordingConntrack(Mutex<Vec<FlowFilter>>);

impl Conntrack for RecordingConntrack {
    fn delete_udp(&self, filter: &FlowFilter) -> Result<u64, ConntrackError> {
        self.0.lock().unwrap().push(filter.clone());
        Ok(1)
    }
}

struct Fixture {
    proxier: Proxier,
    recorder: Arc<Recorder>,
    conntrack: Arc<RecordingConntrack>,
    registry: Registry,
    health: Arc<Health>,
}

fn fixture() -> Fixture {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let recorder = Arc::new(Recorder::default());
    let conntrack = Arc::new(RecordingConntrack::default());
    let health = Arc::new(Health::new(Duration::from_secs(30)));
    let spec: ProxyConfigSpec = serde_json::from_value(json!({"mode": "iptables"})).unwrap();
    let proxier = Proxier::new(
        Box::new(RecordingBackend(recorder.clone())),
        conntrack.clone(),
        metrics,
        health.clone(),
        AgentConfig::from_spec(&spec).unwrap(),
        "node-a".into(),
    );
    Fixture {
        proxier,
        recorder,
        conntrack,
        registry,
        health,
    }
}

fn service(name: &str, ip: &str, protocol: &str) -> Arc<Service> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 53, "protocol": protocol}]},
        }))
        .unwrap(),
    )
}

fn slice(service: &str, ips: &[&str]) -> Arc<EndpointSlice> {
    let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": format!("{service}-x"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn first_sync_is_full_and_marks_the_agent_healthy() {
    let mut f = fixture();
    assert!(!f.health.is_healthy(SystemTime::now()));
    let outcome = f
        .proxier
        .sync(&[service("dns", "10.96.0.10", "UDP")], &[], None, false)
        .await
        .unwrap();
    assert!(outcome.stats.full);
    assert_eq!(outcome.services, 1);
    assert_eq!(*f.recorder.calls.lock().unwrap(), [(1, true)]);
    assert!(f.health.is_healthy(SystemTime::now()));
    let text = crate::metrics::encode(&f.registry);
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_sync_counts_a_restore_failure_and_forces_a_full_retry() {
    let mut f = fixture();
    let services = [service("dns", "10.96.0.10", "UDP")];
    f.proxier.sync(&services, &[], None, false).await.unwrap();
    *f.recorder.fail_next.lock().unwrap() = true;
    let error = f.proxier.sync(&services, &[], None, false).await.unwrap_err();
    assert_eq!(error.category, "restore_failed");
    assert!(
        f.proxier.needs_full_sync(),
        "after a failure the next sync is full"
    );
    f.proxier.sync(&services, &[], None, false).await.unwrap();
    assert_eq!(f.recorder.calls.lock().unwrap().last(), Some(&(1, true)));
    let text = crate::metrics::encode(&f.registry);
    assert!(
        text.contains("kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1"),
        "{text}"
    );
    assert!(
        text.contains("switchyard_sync_failures_total{category=\"restore_failed\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_periodic_check_keeps_partial_syncs_until_the_rules_are_lost() {
    let mut f = fixture();
    let services = [service("dns", "10.96.0.10", "UDP")];
    assert!(!f.proxier.check_rules(), "nothing to check before the first sync");
    f.proxier.sync(&services, &[], None, false).await.unwrap();
    assert!(f.proxier.check_rules(), "rules intact");
    assert!(!f.proxier.needs_full_sync());
    f.proxier.sync(&services, &[], None, false).await.unwrap();
    *f.recorder.rules_lost.lock().unwrap() = true;
    assert!(!f.proxier.check_rules(), "the canary is gone");
    assert!(f.proxier.needs_full_sync(), "lost rules make the next sync full");
    f.proxier.sync(&services, &[], None, false).await.unwrap();
    assert_eq!(
        *f.recorder.calls.lock().unwrap(),
        [(1, true), (1, false), (1, true)],
        "first sync full, then partial, then full after the loss"
    );
    assert!(f.proxier.check_rules());
}

/// Another mode's objects: removal is recorded; fails while told to.
struct RecordingLeftovers {
    recorder: Arc<Recorder>,
    removals: Arc<Mutex<usize>>,
    failures_left: Arc<Mutex<usize>>,
}

impl crate::leftovers::Leftovers for RecordingLeftovers {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }
    fn remove(&mut self) -> Result<Vec<String>, BackendError> {
        let mut left = self.failures_left.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return Err(BackendError {
                category: "leftovers_failed",
                message: "forced".into(),
            });
        }
        // Removal must come after this mode's rules are programmed: at least one sync happened.
        assert!(
            !self.recorder.calls.lock().unwrap().is_empty(),
            "removed before any rule was in place"
        );
        *self.removals.lock().unwrap() += 1;
        Ok(vec!["nftables table ip switchyard".into()])
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_modes_objects_are_removed_only_after_a_successful_sync_and_retried_on_failure() {
    let f = fixture();
    let removals = Arc::new(Mutex::new(0));
    let failures_left = Arc::new(Mutex::new(1));
    let mut proxier = f.proxier.with_leftovers(vec![Box::new(RecordingLeftovers {
        recorder: f.recorder.clone(),
        removals: removals.clone(),
        failures_left: failures_left.clone(),
    })]);
    let services = [service("dns", "10.96.0.10", "UDP")];

    // The new mode's first sync fails: the old mode's objects still carry the traffic, nothing goes.
    *f.recorder.fail_next.lock().unwrap() = true;
    assert!(proxier.sync(&services, &[], None, false).await.is_err());
    assert_eq!(
        *failures_left.lock().unwrap(),
        1,
        "no removal attempted after a failed sync"
    );
    assert_eq!(proxier.pending_leftovers(), [ProxyMode::Nftables]);

    // It succeeds; the removal fails once and stays pending.
    proxier.sync(&services, &[], None, false).await.unwrap();
    assert_eq!(*failures_left.lock().unwrap(), 0);
    assert_eq!(*removals.lock().unwrap(), 0);
    assert_eq!(proxier.pending_leftovers(), [ProxyMode::Nftables]);

    // The next periodic check (nothing changed) retries it, and then it is done for good.
    assert!(proxier.check_rules());
    assert_eq!(*removals.lock().unwrap(), 1);
    assert!(proxier.pending_leftovers().is_empty());
    proxier.sync(&services, &[], None, false).await.unwrap();
    assert!(proxier.check_rules());
    assert_eq!(*removals.lock().unwrap(), 1, "removed once");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_objects_are_counted_while_other_services_sync() {
    let mut f = fixture();
    let services = [
        service("dns", "10.96.0.10", "UDP"),
        service("bad", "10.96.0.999", "UDP"),
    ];
    let outcome = f.proxier.sync(&services, &[], None, false).await.unwrap();
    assert_eq!(outcome.services, 1);
    let text = crate::metrics::encode(&f.registry);
    assert!(
        text.contains("switchyard_skipped_objects{kind=\"Service\",reason=\"invalid_ip\"} 1"),
        "{text}"
    );

    // Fixed: the gauge drops back to zero.
    f.proxier.sync(&services[..1], &[], None, false).await.unwrap();
    let text = crate::metrics::encode(&f.registry);
    assert!(
        text.contains("switchyard_skipped_objects{kind=\"Service\",reason=\"invalid_ip\"} 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_udp_endpoint_has_its_conntrack_entries_deleted_after_the_sync() {
    let mut f = fixture();
    let services = [service("dns", "10.96.0.10", "UDP")];
    f.proxier
        .sync(
            &services,
            &[slice("dns", &["10.244.1.1", "10.244.2.2"])],
            None,
            false,
        )
        .await
        .unwrap();
    assert!(f.conntrack.0.lock().unwrap().is_empty());
    f.proxier
        .sync(&services, &[slice("dns", &["10.244.1.1"])], None, false)
        .await
        .unwrap();
    let deleted = f.conntrack.0.lock().unwrap().clone();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].reply_src, Some("10.244.2.2".parse().unwrap()));
}

#[test]
fn node_info_reads_zone_pod_cidrs_and_primary_addresses() {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]},
        "status": {"addresses": [
            {"type": "Hostname", "address": "node-a"},
            {"type": "ExternalIP", "address": "203.0.113.5"},
            {"type": "InternalIP", "address": "192.168.1.5"},
            {"type": "InternalIP", "address": "fd00:1::5"}]},
    }))
    .unwrap();
    let info = node_info("node-a", Some(&node));
    assert_eq!(info.zone.as_deref(), Some("zone-a"));
    assert_eq!(info.pod_cidrs.len(), 2);
    let primary: Vec<String> = info.primary_ips.iter().map(ToString::to_string).collect();
    assert_eq!(primary, ["192.168.1.5", "fd00:1::5"]);
    assert_eq!(node_info("node-b", None).name, "node-b");
}
