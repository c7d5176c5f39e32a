//! Leader election on a coordination.k8s.io Lease, so two operator replicas never reconcile at once.
//!
//! Writes go through replace with the Lease's resourceVersion: two candidates racing for an expired
//! Lease cannot both win (the API server refuses the stale write).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
}

/// Whether `lease` is free for `identity` at `now` (unheld, held by us, or expired).
pub fn can_take(lease: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = lease.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = i64::from(lease.lease_duration_seconds.unwrap_or(15));
    let renewed = lease.renew_time.as_ref().map_or(0, |t| t.0.as_second());
    now.as_second() > renewed + duration
}

async fn try_acquire(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let duration = i32::try_from(settings.duration.as_secs()).unwrap_or(15);
    match api.get_opt(&settings.name).await? {
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
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if !can_take(spec, &settings.identity, now) {
                return Ok(false);
            }
            if spec.holder_identity.as_deref() != Some(&settings.identity) {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.holder_identity = Some(settings.identity.clone());
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(duration);
            match api.replace(&settings.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this candidate holds the Lease.
pub async fn acquire(client: &Client, settings: &LeaseSettings) {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let mut logged = false;
    loop {
        match try_acquire(&api, settings).await {
            Ok(true) => {
                tracing::info!(lease = %settings.name, identity = %settings.identity, "became leader");
                return;
            }
            Ok(false) if !logged => {
                tracing::info!(lease = %settings.name, "another replica leads; standing by");
                logged = true;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot read the leader Lease"),
        }
        tokio::time::sleep(settings.renew_every).await;
    }
}

/// Renews the Lease until renewal fails for longer than the lease duration; then returns (the caller
/// must stop reconciling: another replica may take over).
pub async fn hold(client: &Client, settings: &LeaseSettings) {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let mut last_renewed = std::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew_every).await;
        match try_acquire(&api, settings).await {
            Ok(true) => last_renewed = std::time::Instant::now(),
            Ok(false) => {
                // A write conflict (another writer touched the Lease between our read and write) is not a
                // loss while we are still its holder: try again at the next renewal.
                let holder = api
                    .get_opt(&settings.name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec?.holder_identity);
                if holder.as_deref() == Some(settings.identity.as_str()) {
                    tracing::debug!("leader Lease renewal conflicted; still the holder");
                    continue;
                }
                tracing::error!(holder = ?holder, "lost the leader Lease");
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot renew the leader Lease"),
        }
        if last_renewed.elapsed() > settings.duration {
            tracing::error!("could not renew the leader Lease in time");
            return;
        }
    }
}

/// Gives the Lease up at shutdown by clearing its holder, so a successor takes over at once. The Lease
/// itself belongs to the Helm release (deleted by `helm uninstall`).
pub async fn release(client: &Client, settings: &LeaseSettings) {
    let api = Api::<Lease>::namespaced(client.clone(), &settings.namespace);
    let lease = match api.get_opt(&settings.name).await {
        Ok(Some(lease)) => lease,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "cannot read the leader Lease to release it");
            return;
        }
    };
    let mut lease = lease;
    let Some(spec) = lease.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(&settings.name, &PostParams::default(), &lease).await {
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
    fn a_held_lease_is_taken_only_once_expired() {
        let at = |s| Timestamp::from_second(s).unwrap();
        assert!(can_take(&LeaseSpec::default(), "a", at(100)));
        assert!(can_take(&lease("a", 100), "a", at(101)), "our own lease");
        assert!(!can_take(&lease("b", 100), "a", at(110)), "b renewed 10 s ago");
        assert!(can_take(&lease("b", 100), "a", at(116)), "b's lease expired");
    }
}
