//! The pure build step: a ProxyConfig (and what the operator knows) in, the agent's ConfigMap and
//! DaemonSet out. No client, no I/O: everything here is unit-tested as data.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use switchyard_api::proxyconfig::ProxyMode;
use switchyard_api::{AgentConfig, ConfigError, ProxyConfig};

/// Label every object built for a ProxyConfig carries, with the ProxyConfig's name.
pub const PROXYCONFIG_LABEL: &str = "switchyard.dev/proxyconfig";
/// Pod template annotation with the effective configuration hash: any change rolls the agents.
pub const CONFIG_HASH_ANNOTATION: &str = "switchyard.dev/config-hash";
/// Key of the agent configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where the ConfigMap is mounted in the agent container.
pub const CONFIG_DIR: &str = "/etc/switchyard";

/// What the operator was installed with (from its command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Namespace the agents' DaemonSets and ConfigMaps live in.
    pub namespace: String,
    /// Agent image used when the ProxyConfig does not name one.
    pub agent_image: String,
    /// ServiceAccount of the agent pods (created by the chart, with its RBAC).
    pub agent_service_account: String,
    /// Address of the API server the agents use (not the `kubernetes` Service's ClusterIP, which the
    /// agents themselves make work).
    pub api_server_host: String,
    /// Port of the API server.
    pub api_server_port: u16,
}

/// The objects built for one ProxyConfig.
#[derive(Clone, Debug, PartialEq)]
pub struct Built {
    /// Effective configuration hash.
    pub config_hash: String,
    /// The agent configuration.
    pub config_map: ConfigMap,
    /// The agents.
    pub daemon_set: DaemonSet,
}

/// Name of the ConfigMap and DaemonSet of a ProxyConfig.
pub fn agent_name(proxy_config: &str) -> String {
    format!("switchyard-agent-{proxy_config}")
}

fn labels(pc: &ProxyConfig) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "switchyard-agent".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "switchyard-operator".to_owned(),
        ),
        (PROXYCONFIG_LABEL.to_owned(), pc.name_any()),
    ])
}

fn owner(pc: &ProxyConfig) -> Option<OwnerReference> {
    pc.controller_owner_ref(&())
}

/// Node affinity: the ProxyConfig's selector, minus the nodes an older ProxyConfig keeps.
fn affinity(pc: &ProxyConfig, excluded_nodes: &[String]) -> Option<Affinity> {
    let selector = pc.spec.node_selector.clone().unwrap_or_default();
    let mut expressions: Vec<NodeSelectorRequirement> = selector
        .match_expressions
        .unwrap_or_default()
        .into_iter()
        .map(|e| NodeSelectorRequirement {
            key: e.key,
            operator: e.operator,
            values: e.values,
        })
        .collect();
    for (key, value) in selector.match_labels.unwrap_or_default() {
        expressions.push(NodeSelectorRequirement {
            key,
            operator: "In".into(),
            values: Some(vec![value]),
        });
    }
    if !excluded_nodes.is_empty() {
        let mut values = excluded_nodes.to_vec();
        values.sort();
        // metadata.name is always set, unlike the hostname label.
        return Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: (!expressions.is_empty()).then_some(expressions),
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".into(),
                            operator: "NotIn".into(),
                            values: Some(values),
                        }]),
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        });
    }
    if expressions.is_empty() {
        return None;
    }
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(expressions),
                    match_fields: None,
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    })
}

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Volume::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// Builds the ConfigMap and DaemonSet of `pc`. `excluded_nodes` are nodes it selects but an older
/// ProxyConfig keeps: its agents must never run there.
pub fn build(pc: &ProxyConfig, settings: &Settings, excluded_nodes: &[String]) -> Result<Built, ConfigError> {
    let config = AgentConfig::from_spec(&pc.spec)?;
    let config_hash = config.hash();
    let name = agent_name(&pc.name_any());
    let labels = labels(pc);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(settings.namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: owner(pc).map(|o| vec![o]),
        ..ObjectMeta::default()
    };

    let yaml = config.to_yaml().map_err(|e| ConfigError::Invalid {
        field: "(all)".into(),
        message: format!("cannot render: {e}"),
    })?;
    let config_map = ConfigMap {
        metadata: meta.clone(),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), yaml)])),
        ..ConfigMap::default()
    };

    let agent = pc.spec.agent.clone().unwrap_or_default();
    let mut capabilities = vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()];
    if config.mode == ProxyMode::Ipvs {
        capabilities.push("SYS_MODULE".into());
    }
    let health_port = i32::from(config.healthz_bind_address.port());
    let container = Container {
        name: "agent".into(),
        image: Some(
            agent
                .image
                .clone()
                .unwrap_or_else(|| settings.agent_image.clone()),
        ),
        args: Some(vec![
            "run".into(),
            format!("--config={CONFIG_DIR}/{CONFIG_KEY}"),
            "--node-name=$(NODE_NAME)".into(),
        ]),
        env: Some(
            [
                EnvVar {
                    name: "NODE_NAME".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "spec.nodeName".into(),
                            ..Default::default()
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                },
                env("SWITCHYARD_PROXY_CONFIG", &pc.name_any()),
            ]
            .into_iter()
            // Without an explicit address the agents fall back to the kubernetes Service (which works only
            // while another proxy serves it); an empty value would break their in-cluster configuration.
            .chain(
                (!settings.api_server_host.is_empty())
                    .then(|| {
                        [
                            env("KUBERNETES_SERVICE_HOST", &settings.api_server_host),
                            env("KUBERNETES_SERVICE_PORT", &settings.api_server_port.to_string()),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("healthz".into()),
            container_port: health_port,
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(health_port),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: agent.resources.clone(),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(capabilities),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "xtables-lock".into(),
                mount_path: "/run/xtables.lock".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "lib-modules".into(),
                mount_path: "/lib/modules".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Container::default()
    };

    let mut pod_labels = agent.pod_labels.clone();
    pod_labels.extend(labels.clone());
    let max_unavailable = pc
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::Int(1));
    let daemon_set = DaemonSet {
        metadata: meta,
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(max_unavailable),
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        config_hash.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    service_account_name: Some(settings.agent_service_account.clone()),
                    priority_class_name: Some(
                        agent
                            .priority_class_name
                            .clone()
                            .unwrap_or_else(|| "system-node-critical".into()),
                    ),
                    tolerations: Some(agent.tolerations.clone().unwrap_or_else(|| {
                        vec![Toleration {
                            operator: Some("Exists".into()),
                            ..Default::default()
                        }]
                    })),
                    affinity: affinity(pc, excluded_nodes),
                    // Agents must stop promptly so the next one takes over; rules stay in place meanwhile.
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: name.clone(),
                                ..Default::default()
                            }),
                            ..Volume::default()
                        },
                        host_path("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
                        host_path("lib-modules", "/lib/modules", "Directory"),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    };
    Ok(Built {
        config_hash,
        config_map,
        daemon_set,
    })
}

/// Whether `labels` match `selector` (matchLabels and matchExpressions; empty selects everything).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else { return true };
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
