//! The ProxyConfig controller: fetch → validate → build → apply → status, plus a finalizer that lets the
//! agents remove their rules before their DaemonSet goes away.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use switchyard_api::{OPERATOR_FIELD_MANAGER, ProxyConfig, ProxyNode};

use crate::build::{PROXYCONFIG_LABEL, Settings, agent_name, build};
use crate::status::{Observed, conflicting_nodes, node_owners, roll_up};

/// Finalizer on every ProxyConfig: the agents clean up before the DaemonSet is deleted.
pub const FINALIZER: &str = "switchyard.dev/agent-cleanup";

/// Errors of a reconcile. All are transient (retried); an invalid spec is not an error but a status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Agents are still removing their rules: the finalizer must stay. Not a failure; never leaves
    /// `reconcile`.
    #[error("waiting for agents to remove their rules")]
    CleanupPending,
}

impl Error {
    /// Short stable category for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube { action, .. } => action,
            Self::Finalizer(_) => "finalizer",
            Self::CleanupPending => "cleanup_pending",
        }
    }
}

fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// Label set of reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// Error category.
    pub category: String,
}

/// Operator metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Counter,
    /// Failed reconciles by category.
    pub failures: Family<ErrorLabel, Counter>,
    /// Reconcile durations.
    pub duration: Histogram,
}

impl Metrics {
    /// Registers the metrics.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        };
        registry.register(
            "switchyard_operator_reconciles",
            "ProxyConfig reconciles",
            m.reconciles.clone(),
        );
        registry.register(
            "switchyard_operator_reconcile_failures",
            "Failed reconciles",
            m.failures.clone(),
        );
        registry.register(
            "switchyard_operator_reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        m
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Install-time settings.
    pub settings: Settings,
    /// Longest wait for agents to report their cleanup before the DaemonSet is deleted anyway.
    pub cleanup_timeout: Duration,
    /// Metrics.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

async fn proxy_nodes_of(ctx: &Context, name: &str) -> Result<Vec<ProxyNode>, Error> {
    let api = Api::<ProxyNode>::all(ctx.client.clone());
    let list = api
        .list(&ListParams::default().labels(&format!("{PROXYCONFIG_LABEL}={name}")))
        .await;
    Ok(list.map_err(kube("list_proxynodes"))?.items)
}

async fn apply(pc: Arc<ProxyConfig>, ctx: &Context) -> Result<Action, Error> {
    let name = pc.name_any();
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube("list_nodes"))?;
    let configs = Api::<ProxyConfig>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube("list_proxyconfigs"))?;
    let node_refs: Vec<&Node> = nodes.items.iter().collect();
    let config_refs: Vec<&ProxyConfig> = configs.items.iter().collect();
    let owners = node_owners(&config_refs, &node_refs);
    let conflicts = conflicting_nodes(&pc, &node_refs, &owners);

    let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
    let daemon_sets = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let config = match build(&pc, &ctx.settings, &conflicts) {
        Ok(built) => {
            let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
            let cm_name = agent_name(&name);
            config_maps
                .patch(
                    &cm_name,
                    &params,
                    &Patch::Apply(with_type_meta(&built.config_map, "v1", "ConfigMap")),
                )
                .await
                .map_err(kube("apply_configmap"))?;
            daemon_sets
                .patch(
                    &cm_name,
                    &params,
                    &Patch::Apply(with_type_meta(&built.daemon_set, "apps/v1", "DaemonSet")),
                )
                .await
                .map_err(kube("apply_daemonset"))?;
            Ok(built.config_hash)
        }
        Err(error) => {
            // Permanent until the spec changes: reported in status, the running agents are left alone.
            tracing::warn!(proxyconfig = %name, %error, "invalid spec");
            Err(error.to_string())
        }
    };

    let daemon_set = daemon_sets
        .get_opt(&agent_name(&name))
        .await
        .map_err(kube("get_daemonset"))?;
    let proxy_nodes = proxy_nodes_of(ctx, &name).await?;
    let status = roll_up(&Observed {
        pc: &pc,
        config,
        daemon_set: daemon_set.as_ref(),
        proxy_nodes: proxy_nodes.iter().collect(),
        conflicts,
        cleaning_up: false,
        now: now(),
    });
    let rolling = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "True");
    write_status(&pc, status, ctx).await?;
    // While rolling, come back to notice a hung rollout even if nothing else happens.
    Ok(Action::requeue(if rolling {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(300)
    }))
}

fn with_type_meta<T: serde::Serialize>(object: &T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
        map.remove("status");
    }
    value
}

async fn write_status(
    pc: &ProxyConfig,
    status: switchyard_api::ProxyConfigStatus,
    ctx: &Context,
) -> Result<(), Error> {
    if pc.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api = Api::<ProxyConfig>::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "status": status,
    });
    api.patch_status(
        &pc.name_any(),
        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(kube("patch_status"))?;
    Ok(())
}

async fn cleanup(pc: Arc<ProxyConfig>, ctx: &Context) -> Result<Action, Error> {
    let name = pc.name_any();
    let proxy_nodes = proxy_nodes_of(ctx, &name).await?;
    let cleaned = |n: &ProxyNode| {
        n.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "CleanedUp" && c.status == "True")
        })
    };
    let pending: Vec<String> = proxy_nodes
        .iter()
        .filter(|n| !cleaned(n))
        .map(|n| n.name_any())
        .collect();
    let deleting_for = pc
        .metadata
        .deletion_timestamp
        .as_ref()
        .map_or(0, |t| now() - t.0.as_second());
    if !pending.is_empty() && deleting_for < ctx.cleanup_timeout.as_secs() as i64 {
        tracing::info!(proxyconfig = %name, pending = ?pending, "waiting for agents to remove their rules");
        let daemon_sets = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        let daemon_set = daemon_sets
            .get_opt(&agent_name(&name))
            .await
            .map_err(kube("get_daemonset"))?;
        let status = roll_up(&Observed {
            pc: &pc,
            config: Err("being deleted".into()),
            daemon_set: daemon_set.as_ref(),
            proxy_nodes: proxy_nodes.iter().collect(),
            conflicts: vec![],
            cleaning_up: true,
            now: now(),
        });
        write_status(&pc, status, ctx).await?;
        // An Ok from the cleanup closure makes kube's finalizer() remove the finalizer right away.
        return Err(Error::CleanupPending);
    }
    if !pending.is_empty() {
        tracing::warn!(proxyconfig = %name, pending = ?pending, "cleanup timed out; deleting the agents anyway");
    }
    let dp = DeleteParams::background();
    let daemon_sets = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let _ = daemon_sets.delete(&agent_name(&name), &dp).await;
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let _ = config_maps.delete(&agent_name(&name), &dp).await;
    let api = Api::<ProxyNode>::all(ctx.client.clone());
    for node in proxy_nodes {
        match api.delete(&node.name_any(), &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(Error::Kube {
                    action: "delete_proxynode",
                    source: e,
                });
            }
        }
    }
    Ok(Action::await_change())
}

/// Reconciles one ProxyConfig.
pub async fn reconcile(pc: Arc<ProxyConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let api = Api::<ProxyConfig>::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, pc, |event| async {
        match event {
            Finalizer::Apply(pc) => apply(pc, &ctx).await,
            Finalizer::Cleanup(pc) => cleanup(pc, &ctx).await,
        }
    })
    .await;
    let result = match result {
        Ok(action) => Ok(action),
        Err(kube::runtime::finalizer::Error::CleanupFailed(Error::CleanupPending)) => {
            Ok(Action::requeue(Duration::from_secs(3)))
        }
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e),
        Err(other) => Err(Error::Finalizer(other.to_string())),
    };
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    result
}

/// Transient errors are retried soon; they never stop the controller.
pub fn error_policy(pc: Arc<ProxyConfig>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(proxyconfig = %pc.name_any(), %error, "reconcile failed; retrying");
    ctx.metrics
        .failures
        .get_or_create(&ErrorLabel {
            category: error.category().into(),
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until the stream ends.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let configs = Api::<ProxyConfig>::all(client.clone());
    let controller = Controller::new(configs, watcher::Config::default());
    let store = controller.store();
    let all_configs = move || {
        store
            .state()
            .iter()
            .map(|pc| ObjectRef::from_obj(&**pc))
            .collect::<Vec<_>>()
    };
    let on_node = all_configs.clone();
    controller
        .owns(
            Api::<DaemonSet>::namespaced(client.clone(), &ctx.settings.namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=switchyard-operator"),
        )
        .owns(
            Api::<ConfigMap>::namespaced(client.clone(), &ctx.settings.namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=switchyard-operator"),
        )
        .watches(
            Api::<ProxyNode>::all(client.clone()),
            watcher::Config::default(),
            |node| Some(ObjectRef::<ProxyConfig>::new(&node.spec.proxy_config)),
        )
        // Node labels decide selection and conflicts: any node change may concern every ProxyConfig.
        .watches(Api::<Node>::all(client), watcher::Config::default(), move |_| {
            on_node()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile error");
            }
        })
        .await;
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
