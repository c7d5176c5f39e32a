//! Leader election on a coordination.k8s.io Lease, so two operator replicas never reconcile at once.
//!
//! Writes go through replace with the Lease's resourceVersion: two candidates racing for an expired
//! Lease cannot both win (the API server refuses the stale write).
//!
//! Timing follows client-go's leader election. A candidate judges a Lease expired by its own clock: only
//! when it has seen the same record (holder and renewal) for a whole lease duration, never by comparing
//! the holder's `renewTime` with its own clock. The holder steps down when it has not renewed for the
//! renew deadline, which is shorter than the lease duration, so it has stopped before anyone may take
//! over. Every call is bounded by a timeout: a request stalled on a dead connection fails and is retried
//! on a new one instead of silently stopping the renewals.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long the other candidates wait, without seeing a renewal, before taking the Lease.
    pub duration: Duration,
    /// The holder steps down when it has not renewed for this long. Shorter than `duration`.
    pub renew_deadline: Duration,
    /// Pause between two attempts to take or renew the Lease.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, a try every 2 s.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The longest a single Lease request may take.
    fn call_timeout(&self) -> Duration {
        self.retry_period * 2
    }
}

/// A renewal slower than this is logged.
const SLOW_RENEWAL: Duration = Duration::from_secs(1);

/// The record a candidate last saw on the Lease, and when it saw it change (by its own clock).
#[derive(Debug, Default)]
pub struct Observation {
    record: Option<(Option<String>, Option<MicroTime>, Option<i32>)>,
    changed_at: Option<Instant>,
}

impl Observation {
    /// Whether `lease` may be taken by `identity` at `now`: it is unheld, held by us, or its record has
    /// not changed for its whole lease duration since we first saw it.
    pub fn may_take(&mut self, lease: &LeaseSpec, identity: &str, now: Instant) -> bool {
        let holder = lease.holder_identity.as_deref().unwrap_or_default();
        if holder.is_empty() || holder == identity {
            return true;
        }
        let record = Some((
            lease.holder_identity.clone(),
            lease.renew_time.clone(),
            lease.lease_duration_seconds,
        ));
        let changed_at = match self.changed_at {
            Some(at) if self.record == record => at,
            _ => {
                self.record = record;
                self.changed_at = Some(now);
                return false;
            }
        };
        let duration = u64::try_from(lease.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
        now.duration_since(changed_at) > Duration::from_secs(duration)
    }
}

/// `call`, given up after `limit`: the outer error is the timeout, the inner one the API's.
async fn timed<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, String> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| format!("no answer within {} ms", limit.as_millis()))
}

/// `call`, given up after `limit`, with any failure as a message.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    timed(limit, call).await?.map_err(|e| e.to_string())
}

/// One attempt to take or renew the Lease within `limit`: `Ok(true)` when we hold it, `Ok(false)` when
/// someone else does or won a race for it.
async fn try_acquire(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    seen: &mut Observation,
    limit: Duration,
) -> Result<bool, String> {
    let started = Instant::now();
    let left = || limit.saturating_sub(started.elapsed());
    let duration = i32::try_from(settings.duration.as_secs()).unwrap_or(15);
    let current = bounded(left(), api.get_opt(&settings.name)).await?;
    let now = Timestamp::now();
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(settings.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            timed(left(), api.create(&PostParams::default(), &lease)).await?
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if !seen.may_take(spec, &settings.identity, Instant::now()) {
                return Ok(false);
            }
            if spec.holder_identity.as_deref() != Some(&settings.identity) {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.holder_identity = Some(settings.identity.clone());
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration);
            timed(
                left(),
                api.replace(&settings.name, &PostParams::default(), &lease),
            )
            .await?
        }
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until this candidate holds the Lease; returns when the winning attempt started (the holder's
/// renew deadline counts from there).
pub async fn acquire(client: &Client, settings: &LeaseSettings) -> Instant {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let mut seen = Observation::default();
    let mut logged = false;
    loop {
        let started = Instant::now();
        match try_acquire(&api, settings, &mut seen, settings.call_timeout()).await {
            Ok(true) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return started;
            }
            Ok(false) if !logged => {
                tracing::info!(lease = %settings.name, "another replica leads; standing by");
                logged = true;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot read the leader Lease"),
        }
        tokio::time::sleep(settings.retry_period).await;
    }
}

/// Renews the Lease every retry period. Returns when it has not been renewed for the renew deadline, or
/// another replica holds it: the caller must stop reconciling at once.
pub async fn hold(client: &Client, settings: &LeaseSettings, acquired: Instant) {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let mut seen = Observation::default();
    let mut last_renewed = acquired;
    loop {
        tokio::time::sleep(settings.retry_period).await;
        let started = Instant::now();
        let left = settings
            .renew_deadline
            .saturating_sub(started.duration_since(last_renewed));
        match try_acquire(&api, settings, &mut seen, left.min(settings.call_timeout())).await {
            Ok(true) => {
                let took = started.elapsed();
                if took > SLOW_RENEWAL {
                    tracing::warn!(millis = took.as_millis(), "slow leader Lease renewal");
                }
                last_renewed = started;
            }
            Ok(false) => {
                // A write conflict (another writer touched the Lease between our read and write) is not a
                // loss while we are still its holder: try again at the next renewal.
                let holder = bounded(settings.call_timeout(), api.get_opt(&settings.name))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.holder_identity);
                if holder.as_deref() != Some(settings.identity.as_str()) {
                    tracing::error!(holder = ?holder, "lost the leader Lease");
                    return;
                }
                tracing::debug!("leader Lease renewal conflicted; still the holder");
            }
            Err(error) => tracing::warn!(%error, "cannot renew the leader Lease"),
        }
        let since = last_renewed.elapsed();
        if since >= settings.renew_deadline {
            tracing::error!(
                millis = since.as_millis(),
                "leader Lease not renewed within the renew deadline; stepping down"
            );
            return;
        }
    }
}

/// Gives the Lease up at shutdown by clearing its holder, so a successor takes over at once. The Lease
/// itself belongs to the Helm release (deleted by `helm uninstall`).
pub async fn release(client: &Client, settings: &LeaseSettings) {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let limit = settings.call_timeout();
    let mut lease = match bounded(limit, api.get_opt(&settings.name)).await {
        Ok(Some(lease)) => lease,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "cannot read the leader Lease to release it");
            return;
        }
    };
    let Some(spec) = lease.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match bounded(limit, api.replace(&settings.name, &PostParams::default(), &lease)).await {
        Ok(_) => tracing::info!(lease = %settings.name, "released the leader Lease"),
        Err(error) => tracing::warn!(lease = %settings.name, %error, "cannot release the leader Lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_free_or_own_lease_is_taken_at_once() {
        let now = Instant::now();
        let mut seen = Observation::default();
        assert!(seen.may_take(&LeaseSpec::default(), "a", now));
        assert!(seen.may_take(&lease("", 100), "a", now), "released: no holder");
        assert!(seen.may_take(&lease("a", 100), "a", now), "our own lease");
    }

    #[test]
    fn a_held_lease_is_taken_only_after_a_whole_duration_without_a_change() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut seen = Observation::default();
        // First sight: the clock starts now, whatever renewTime says (the holder's clock may differ).
        assert!(!seen.may_take(&lease("b", 0), "a", at(0)));
        assert!(
            !seen.may_take(&lease("b", 0), "a", at(15)),
            "15 s is not more than the duration"
        );
        // b renews: the wait starts again.
        assert!(!seen.may_take(&lease("b", 10), "a", at(10)), "renewed");
        assert!(
            !seen.may_take(&lease("b", 10), "a", at(20)),
            "10 s since the renewal was seen"
        );
        assert!(
            seen.may_take(&lease("b", 10), "a", at(26)),
            "16 s without a renewal"
        );
        // A new holder is a change too.
        assert!(!seen.may_take(&lease("c", 10), "a", at(27)));
    }

    #[test]
    fn the_holder_steps_down_before_anyone_may_take_over() {
        let s = LeaseSettings::new("l", "ns", "a");
        assert!(s.renew_deadline < s.duration);
        assert!(s.call_timeout() < s.renew_deadline);
    }

    // ----- hold() against a scripted API server (tower-test), on tokio's paused clock -----

    use http::{Method, Request, Response};
    use kube::client::Body;
    use tower_test::mock::{self, Handle};

    type ApiHandle = Handle<Request<Body>, Response<Body>>;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l";

    fn held_by(identity: &str) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": identity, "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.000000Z"},
        }))
        .unwrap()
    }

    fn ok(lease: &Lease) -> Response<Body> {
        Response::new(Body::from(serde_json::to_vec(lease).unwrap()))
    }

    /// Answers one renewal (a read, then the write) as the API server would.
    async fn renewal(handle: &mut ApiHandle) {
        let (request, send) = handle.next_request().await.expect("a read of the Lease");
        assert_eq!((request.method(), request.uri().path()), (&Method::GET, PATH));
        send.send_response(ok(&held_by("a")));
        let (request, send) = handle.next_request().await.expect("a write of the Lease");
        assert_eq!((request.method(), request.uri().path()), (&Method::PUT, PATH));
        send.send_response(ok(&held_by("a")));
    }

    fn holder() -> (impl std::future::Future<Output = ()>, ApiHandle, LeaseSettings) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let settings = LeaseSettings::new("l", "ns", "a");
        let hold_settings = settings.clone();
        let fut = async move { hold(&client, &hold_settings, Instant::now()).await };
        (fut, handle, settings)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_renewal_makes_the_holder_step_down_before_the_lease_expires() {
        let (fut, mut handle, settings) = holder();
        let started = Instant::now();
        let holding = tokio::spawn(fut);
        renewal(&mut handle).await;
        let renewed = Instant::now();
        // From now on the API server takes every request and never answers.
        let mut stalled = Vec::new();
        let collect_stalled = async {
            loop {
                match handle.next_request().await {
                    Some(pending) => stalled.push(pending),
                    // The holder returned and dropped its client.
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let outcome = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::select! {
                _ = holding => {}
                _ = collect_stalled => {}
            }
        });
        outcome
            .await
            .expect("the holder steps down instead of waiting forever on a stalled request");
        let held_for = renewed.duration_since(started);
        let after_last_renewal = Instant::now().duration_since(renewed);
        assert_eq!(
            held_for, settings.retry_period,
            "the first renewal came one retry period in"
        );
        assert!(
            after_last_renewal <= settings.renew_deadline + settings.retry_period,
            "stepped down {after_last_renewal:?} after the last renewal"
        );
        // The renewal written at `renewed` expires for the others a lease duration later: by then the
        // holder must have stopped.
        assert!(after_last_renewal < settings.duration);
        assert!(
            stalled.len() >= 2,
            "a stalled request is retried: {} attempts",
            stalled.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_is_retried_and_the_holder_keeps_the_lease() {
        let (fut, mut handle, settings) = holder();
        let holding = tokio::spawn(fut);
        let script = async {
            renewal(&mut handle).await;
            // One read that never gets an answer: it times out and the next try succeeds.
            let stalled = handle.next_request().await.unwrap();
            for _ in 0..20 {
                renewal(&mut handle).await;
            }
            stalled
        };
        let _stalled = tokio::time::timeout(Duration::from_secs(120), script)
            .await
            .expect("the holder renews again after a stalled request");
        assert!(!holding.is_finished(), "still the leader after 20 more renewals");
        holding.abort();
        assert!(settings.call_timeout() < settings.renew_deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_by_another_replica_ends_the_hold() {
        let (fut, mut handle, _) = holder();
        let holding = tokio::spawn(fut);
        let script = async {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(ok(&held_by("b")));
            // The renewal reads b as holder, the check reads it again: lost.
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(ok(&held_by("b")));
            holding.await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(60), script)
            .await
            .expect("the hold ends when another replica holds the Lease");
    }
}
