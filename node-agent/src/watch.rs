//! Watches Services, EndpointSlices and this node's Node with kube-runtime reflectors, and tells the sync
//! loop when something changed (with the change's trigger time, for the network programming latency).
//!
//! Owns the local caches; never writes to the API server.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;

/// Annotation the EndpointSlice controller sets to when the change that produced the slice happened.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Changes seen since the last sync.
#[derive(Debug, Default)]
pub struct Pending {
    /// Service events.
    pub services: u64,
    /// EndpointSlice events.
    pub endpoints: u64,
    /// The Node changed (labels, podCIDRs, addresses).
    pub node: bool,
    /// Trigger times of the endpoint changes, for the network programming latency.
    pub trigger_times: Vec<SystemTime>,
    /// When the first pending change arrived.
    pub first_queued: Option<SystemTime>,
}

/// Shared between the watchers (producers) and the sync loop (consumer).
#[derive(Debug, Default)]
pub struct Changes {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Changes {
    /// Records a change and wakes the sync loop.
    pub fn record(&self, update: impl FnOnce(&mut Pending)) {
        if let Ok(mut pending) = self.pending.lock() {
            update(&mut pending);
            pending.first_queued.get_or_insert_with(SystemTime::now);
        }
        self.notify.notify_one();
    }

    /// Takes every pending change.
    pub fn take(&self) -> Pending {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Counts of pending (service, endpoint) changes, for metrics.
    pub fn pending_counts(&self) -> (u64, u64) {
        self.pending
            .lock()
            .map(|p| (p.services, p.endpoints))
            .unwrap_or_default()
    }

    /// Waits until a change is recorded.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// Read handles on the caches.
#[derive(Clone, Debug)]
pub struct Stores {
    /// Every Service.
    pub services: Store<Service>,
    /// Every EndpointSlice (except headless services').
    pub slices: Store<EndpointSlice>,
    /// This node (at most one object).
    pub node: Store<Node>,
}

impl Stores {
    /// Waits until each cache holds a complete initial list.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.node.wait_until_ready().await
    }
}

fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice.annotations().get(TRIGGER_TIME_ANNOTATION)?;
    let parsed: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(parsed))
}

/// Drops managed fields before caching: they are large and the agent never reads them.
fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

fn reflect<K, F>(
    api: Api<K>,
    config: watcher::Config,
    changes: Arc<Changes>,
    on_change: F,
) -> (Store<K>, impl Stream<Item = ()> + Send)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    F: Fn(&mut Pending, &K) + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&());
    let stream =
        reflector::reflector(writer, watcher(api, config).default_backoff().modify(slim)).map(move |event| {
            match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => {
                    changes.record(|p| on_change(p, &obj));
                }
                Ok(watcher::Event::InitDone) => changes.record(|_| {}),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying with backoff"),
            }
        });
    (reader, stream)
}

/// Starts the watches. The returned future drives them and never ends; spawn it.
pub fn start(
    client: Client,
    node_name: &str,
    changes: Arc<Changes>,
) -> (Stores, impl std::future::Future<Output = ()> + Send + use<>) {
    let (services, service_stream) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        changes.clone(),
        |p, _| p.services += 1,
    );
    let (slices, slice_stream) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels("!service.kubernetes.io/headless"),
        changes.clone(),
        |p, slice| {
            p.endpoints += 1;
            if let Some(t) = trigger_time(slice) {
                p.trigger_times.push(t);
            }
        },
    );
    let (node, node_stream) = reflect(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        changes,
        |p, _| p.node = true,
    );
    let drive = async move {
        let all = futures::stream::select(futures::stream::select(service_stream, slice_stream), node_stream);
        all.for_each(|()| async {}).await;
    };
    (
        Stores {
            services,
            slices,
            node,
        },
        drive,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_time_is_read_from_the_slice_annotation() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "annotations": {TRIGGER_TIME_ANNOTATION: "2026-11-22T10:00:00Z"}},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap();
        let t = trigger_time(&slice).unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_795_341_600
        );
    }

    #[test]
    fn changes_accumulate_until_taken() {
        let changes = Changes::default();
        changes.record(|p| p.services += 1);
        changes.record(|p| p.endpoints += 2);
        assert_eq!(changes.pending_counts(), (1, 2));
        let taken = changes.take();
        assert_eq!((taken.services, taken.endpoints), (1, 2));
        assert!(taken.first_queued.is_some());
        assert_eq!(changes.pending_counts(), (0, 0));
    }
}
