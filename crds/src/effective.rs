//! The agent's effective configuration: a ProxyConfig spec with every default applied, and its hash.
//!
//! The operator renders it into the agent's ConfigMap and puts the hash on the DaemonSet's pod template
//! (so any change rolls the agents); the agent reads it back and reports the hash in its ProxyNode. Both
//! sides must compute the same thing, so this is the only place defaults are decided.

use std::net::SocketAddr;
use std::time::Duration as StdDuration;

use ipnet::IpNet;
use kube::core::Duration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::proxyconfig::{DetectLocalMode, IpvsScheduler, LogLevel, ProxyConfigSpec, ProxyMode};

/// Default `syncPeriod`.
pub const DEFAULT_SYNC_PERIOD: StdDuration = StdDuration::from_secs(30);
/// Default `minSyncPeriod`.
pub const DEFAULT_MIN_SYNC_PERIOD: StdDuration = StdDuration::from_secs(1);
/// Default `masqueradeBit` (0x4000, as kube-proxy).
pub const DEFAULT_MASQUERADE_BIT: u8 = 14;
/// Default health server address.
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
/// Default metrics server address.
pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

/// Why a spec cannot be turned into an agent configuration. The schema refuses all of these already;
/// this is the second line of defence for objects stored before a schema change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A field holds a value the agent cannot use.
    #[error("spec.{field}: {message}")]
    Invalid {
        /// JSON path below `spec`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Everything an agent needs to program its node, defaults applied. Field order is the serialization
/// order, which the hash depends on: append new fields at the end.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Dataplane mode.
    pub mode: ProxyMode,
    /// Pod CIDRs of the cluster, at most one per family.
    #[serde(rename = "clusterCIDRs")]
    pub cluster_cidrs: Vec<IpNet>,
    /// Local traffic detection, resolved.
    pub detect_local: DetectLocalConfig,
    /// Masquerade every packet sent to a service address.
    pub masquerade_all: bool,
    /// Mark bit that flags a packet for masquerading.
    pub masquerade_bit: u8,
    /// Where NodePorts answer.
    pub node_port_addresses: NodePortAddresses,
    /// Interval of the lost-rules check, and the longest retry backoff.
    pub sync_period: Duration,
    /// Shortest time between syncs.
    pub min_sync_period: Duration,
    /// Conntrack sysctls.
    pub conntrack: ConntrackConfig,
    /// IPVS settings, present only in IPVS mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipvs: Option<IpvsConfig>,
    /// Health server address.
    pub healthz_bind_address: SocketAddr,
    /// Metrics server address.
    pub metrics_bind_address: SocketAddr,
    /// Proxy name this agent serves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_name: Option<String>,
    /// Log verbosity.
    pub log_level: LogLevel,
}

/// Resolved local-traffic detection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "mode")]
pub enum DetectLocalConfig {
    /// Source inside the cluster CIDRs.
    ClusterCIDR,
    /// Source inside this node's podCIDRs, read from the Node object.
    NodeCIDR,
    /// Arrived on this bridge.
    BridgeInterface {
        /// Bridge name.
        #[serde(rename = "bridgeInterface")]
        bridge_interface: String,
    },
    /// Arrived on an interface with this name prefix.
    InterfaceNamePrefix {
        /// Interface name prefix.
        #[serde(rename = "interfaceNamePrefix")]
        interface_name_prefix: String,
    },
}

/// Node addresses NodePorts answer on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", content = "cidrs")]
pub enum NodePortAddresses {
    /// Every local address.
    All,
    /// The node's primary address per family (from the Node object).
    Primary,
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// Resolved conntrack settings; `None` or 0 means "leave the kernel's value".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackConfig {
    /// Entries per core.
    pub max_per_core: u32,
    /// Lower bound of nf_conntrack_max.
    pub min: u32,
    /// Established TCP timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_established_timeout: Option<Duration>,
    /// CLOSE_WAIT TCP timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_close_wait_timeout: Option<Duration>,
    /// nf_conntrack_tcp_be_liberal.
    pub tcp_be_liberal: bool,
    /// One-direction UDP timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<Duration>,
    /// Two-direction UDP timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_stream_timeout: Option<Duration>,
}

/// Resolved IPVS settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpvsConfig {
    /// Scheduler.
    pub scheduler: IpvsScheduler,
    /// Strict ARP on the node.
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    /// TCP session timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_timeout: Option<Duration>,
    /// TCP FIN timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_fin_timeout: Option<Duration>,
    /// UDP timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<Duration>,
    /// Virtual servers in these CIDRs belong to someone else.
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Vec<IpNet>,
}

impl AgentConfig {
    /// Applies every default to `spec` and checks what the schema may not have caught.
    pub fn from_spec(spec: &ProxyConfigSpec) -> Result<Self, ConfigError> {
        let cluster_cidrs = parse_cidrs("clusterCIDRs", &spec.cluster_cidrs)?;
        if cluster_cidrs.len() == 2 && cluster_cidrs[0].addr().is_ipv4() == cluster_cidrs[1].addr().is_ipv4()
        {
            return Err(ConfigError::invalid(
                "clusterCIDRs",
                "at most one CIDR per IP family",
            ));
        }
        let detect_local = resolve_detect_local(spec, !cluster_cidrs.is_empty())?;

        let sync_period = positive("syncPeriod", spec.sync_period, DEFAULT_SYNC_PERIOD)?;
        let min_sync_period = match spec.min_sync_period {
            None => DEFAULT_MIN_SYNC_PERIOD.into(),
            Some(d) if d.is_negative() => {
                return Err(ConfigError::invalid("minSyncPeriod", "must not be negative"));
            }
            Some(d) => d,
        };
        if StdDuration::from(min_sync_period) > StdDuration::from(sync_period) {
            return Err(ConfigError::invalid(
                "minSyncPeriod",
                "must not be longer than syncPeriod",
            ));
        }

        let masquerade_bit = match spec.masquerade_bit {
            None => DEFAULT_MASQUERADE_BIT,
            Some(bit @ 0..=31) => bit as u8,
            Some(_) => return Err(ConfigError::invalid("masqueradeBit", "must be between 0 and 31")),
        };

        let ipvs = match (spec.mode, &spec.ipvs) {
            (ProxyMode::Ipvs, ipvs) => {
                let ipvs = ipvs.clone().unwrap_or_default();
                Some(IpvsConfig {
                    scheduler: ipvs.scheduler.unwrap_or(IpvsScheduler::Rr),
                    strict_arp: ipvs.strict_arp.unwrap_or(false),
                    tcp_timeout: non_zero("ipvs.tcpTimeout", ipvs.tcp_timeout)?,
                    tcp_fin_timeout: non_zero("ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout)?,
                    udp_timeout: non_zero("ipvs.udpTimeout", ipvs.udp_timeout)?,
                    exclude_cidrs: parse_cidrs("ipvs.excludeCIDRs", &ipvs.exclude_cidrs)?,
                })
            }
            (_, Some(_)) => return Err(ConfigError::invalid("ipvs", "only allowed when mode is ipvs")),
            (_, None) => None,
        };

        let conntrack = spec.conntrack.clone().unwrap_or_default();
        let conntrack = ConntrackConfig {
            max_per_core: non_negative("conntrack.maxPerCore", conntrack.max_per_core, 32 * 1024)?,
            min: non_negative("conntrack.min", conntrack.min, 128 * 1024)?,
            tcp_established_timeout: non_zero(
                "conntrack.tcpEstablishedTimeout",
                Some(
                    conntrack
                        .tcp_established_timeout
                        .unwrap_or(StdDuration::from_secs(24 * 3600).into()),
                ),
            )?,
            tcp_close_wait_timeout: non_zero(
                "conntrack.tcpCloseWaitTimeout",
                Some(
                    conntrack
                        .tcp_close_wait_timeout
                        .unwrap_or(StdDuration::from_secs(3600).into()),
                ),
            )?,
            tcp_be_liberal: conntrack.tcp_be_liberal.unwrap_or(false),
            udp_timeout: non_zero("conntrack.udpTimeout", conntrack.udp_timeout)?,
            udp_stream_timeout: non_zero("conntrack.udpStreamTimeout", conntrack.udp_stream_timeout)?,
        };

        let log_level = spec.agent.as_ref().and_then(|a| a.log_level).unwrap_or_default();

        Ok(Self {
            mode: spec.mode,
            cluster_cidrs,
            detect_local,
            masquerade_all: spec.masquerade_all.unwrap_or(false),
            masquerade_bit,
            node_port_addresses: resolve_node_port_addresses(&spec.node_port_addresses)?,
            sync_period,
            min_sync_period,
            conntrack,
            ipvs,
            healthz_bind_address: bind_address(
                "healthzBindAddress",
                spec.healthz_bind_address.as_deref(),
                DEFAULT_HEALTHZ_BIND_ADDRESS,
            )?,
            metrics_bind_address: bind_address(
                "metricsBindAddress",
                spec.metrics_bind_address.as_deref(),
                DEFAULT_METRICS_BIND_ADDRESS,
            )?,
            proxy_name: spec.proxy_name.clone(),
            log_level,
        })
    }

    /// Stable hash of this configuration: the first 16 hex digits of the SHA-256 of its canonical JSON.
    /// Equal configurations hash equal on every platform and in every process.
    pub fn hash(&self) -> String {
        // Serializing a struct of plain data into JSON cannot fail; an empty string would only make every
        // node look out of date, never hide a change.
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The configuration as the YAML document the operator puts into the agent's ConfigMap.
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::ser::Error> {
        serde_saphyr::to_string(self)
    }

    /// Reads the YAML document written by [`AgentConfig::to_yaml`].
    pub fn from_yaml(text: &str) -> Result<Self, serde_saphyr::Error> {
        serde_saphyr::from_str(text)
    }
}

fn parse_cidrs(field: &str, values: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpNet>()
                .map_err(|_| ConfigError::invalid(format!("{field}[{i}]"), format!("{v:?} is not a CIDR")))
        })
        .collect()
}

fn resolve_detect_local(
    spec: &ProxyConfigSpec,
    have_cluster_cidrs: bool,
) -> Result<DetectLocalConfig, ConfigError> {
    let detect = spec.detect_local.clone().unwrap_or_default();
    let mode = detect.mode.unwrap_or(if have_cluster_cidrs {
        DetectLocalMode::ClusterCIDR
    } else {
        DetectLocalMode::NodeCIDR
    });
    Ok(match mode {
        DetectLocalMode::ClusterCIDR if !have_cluster_cidrs => {
            return Err(ConfigError::invalid(
                "detectLocal.mode",
                "ClusterCIDR needs spec.clusterCIDRs",
            ));
        }
        DetectLocalMode::ClusterCIDR => DetectLocalConfig::ClusterCIDR,
        DetectLocalMode::NodeCIDR => DetectLocalConfig::NodeCIDR,
        DetectLocalMode::BridgeInterface => DetectLocalConfig::BridgeInterface {
            bridge_interface: detect.bridge_interface.filter(|s| !s.is_empty()).ok_or_else(|| {
                ConfigError::invalid(
                    "detectLocal.bridgeInterface",
                    "required with mode BridgeInterface",
                )
            })?,
        },
        DetectLocalMode::InterfaceNamePrefix => DetectLocalConfig::InterfaceNamePrefix {
            interface_name_prefix: detect
                .interface_name_prefix
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "detectLocal.interfaceNamePrefix",
                        "required with mode InterfaceNamePrefix",
                    )
                })?,
        },
    })
}

fn resolve_node_port_addresses(values: &[String]) -> Result<NodePortAddresses, ConfigError> {
    match values {
        [] => Ok(NodePortAddresses::All),
        [only] if only == "primary" => Ok(NodePortAddresses::Primary),
        _ if values.iter().any(|v| v == "primary") => Err(ConfigError::invalid(
            "nodePortAddresses",
            "primary cannot be combined with CIDRs",
        )),
        _ => Ok(NodePortAddresses::Cidrs(parse_cidrs(
            "nodePortAddresses",
            values,
        )?)),
    }
}

fn positive(field: &str, value: Option<Duration>, default: StdDuration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default.into()),
        Some(d) if d.is_negative() || StdDuration::from(d).is_zero() => {
            Err(ConfigError::invalid(field, "must be a positive duration"))
        }
        Some(d) => Ok(d),
    }
}

/// A zero duration means "leave the kernel's value", so it resolves to `None`.
fn non_zero(field: &str, value: Option<Duration>) -> Result<Option<Duration>, ConfigError> {
    match value {
        Some(d) if d.is_negative() => Err(ConfigError::invalid(field, "must not be negative")),
        Some(d) if StdDuration::from(d).is_zero() => Ok(None),
        other => Ok(other),
    }
}

fn non_negative(field: &str, value: Option<i32>, default: u32) -> Result<u32, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => u32::try_from(v).map_err(|_| ConfigError::invalid(field, "must not be negative")),
    }
}

fn bind_address(field: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or(default);
    // An empty host (":10256") means every address, as in kube-proxy.
    let text = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_owned()
    };
    text.parse()
        .map_err(|_| ConfigError::invalid(field, format!("{text:?} is not an ip:port address")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxyconfig::{ConntrackSpec, DetectLocal, IpvsSpec};

    fn spec(mode: ProxyMode) -> ProxyConfigSpec {
        ProxyConfigSpec {
            mode,
            node_selector: None,
            rollout: None,
            agent: None,
            cluster_cidrs: vec![],
            detect_local: None,
            masquerade_all: None,
            masquerade_bit: None,
            node_port_addresses: vec![],
            sync_period: None,
            min_sync_period: None,
            conntrack: None,
            ipvs: None,
            healthz_bind_address: None,
            metrics_bind_address: None,
            proxy_name: None,
        }
    }

    #[test]
    fn empty_spec_gets_kube_proxy_defaults() {
        let cfg = AgentConfig::from_spec(&spec(ProxyMode::Iptables)).unwrap();
        assert_eq!(cfg.mode, ProxyMode::Iptables);
        assert_eq!(cfg.masquerade_bit, 14);
        assert!(!cfg.masquerade_all);
        assert_eq!(cfg.detect_local, DetectLocalConfig::NodeCIDR);
        assert_eq!(cfg.node_port_addresses, NodePortAddresses::All);
        assert_eq!(StdDuration::from(cfg.sync_period), StdDuration::from_secs(30));
        assert_eq!(StdDuration::from(cfg.min_sync_period), StdDuration::from_secs(1));
        assert_eq!(cfg.conntrack.max_per_core, 32768);
        assert_eq!(cfg.conntrack.min, 131072);
        assert_eq!(
            cfg.conntrack.tcp_established_timeout.map(StdDuration::from),
            Some(StdDuration::from_secs(86400))
        );
        assert_eq!(
            cfg.conntrack.tcp_close_wait_timeout.map(StdDuration::from),
            Some(StdDuration::from_secs(3600))
        );
        assert_eq!(cfg.conntrack.udp_timeout, None);
        assert_eq!(cfg.ipvs, None);
        assert_eq!(cfg.healthz_bind_address, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(cfg.metrics_bind_address, "127.0.0.1:10249".parse().unwrap());
        assert_eq!(cfg.log_level, LogLevel::Info);
    }

    #[test]
    fn cluster_cidrs_make_cluster_cidr_the_default_detection() {
        let mut s = spec(ProxyMode::Iptables);
        s.cluster_cidrs = vec!["10.244.0.0/16".into(), "fd00:10:244::/56".into()];
        let cfg = AgentConfig::from_spec(&s).unwrap();
        assert_eq!(cfg.detect_local, DetectLocalConfig::ClusterCIDR);
        assert_eq!(cfg.cluster_cidrs.len(), 2);
    }

    #[test]
    fn ipvs_mode_gets_ipvs_defaults() {
        let cfg = AgentConfig::from_spec(&spec(ProxyMode::Ipvs)).unwrap();
        let ipvs = cfg.ipvs.unwrap();
        assert_eq!(ipvs.scheduler, IpvsScheduler::Rr);
        assert!(!ipvs.strict_arp);
        assert!(ipvs.exclude_cidrs.is_empty());
    }

    #[test]
    fn zero_conntrack_timeouts_leave_the_kernel_alone() {
        let mut s = spec(ProxyMode::Iptables);
        s.conntrack = Some(ConntrackSpec {
            tcp_established_timeout: Some(StdDuration::ZERO.into()),
            max_per_core: Some(0),
            ..Default::default()
        });
        let cfg = AgentConfig::from_spec(&s).unwrap();
        assert_eq!(cfg.conntrack.tcp_established_timeout, None);
        assert_eq!(cfg.conntrack.max_per_core, 0);
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field_named() {
        type Mutation = Box<dyn Fn(&mut ProxyConfigSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("spec.masqueradeBit", Box::new(|s| s.masquerade_bit = Some(32))),
            (
                "spec.minSyncPeriod",
                Box::new(|s| s.min_sync_period = Some(StdDuration::from_secs(60).into())),
            ),
            (
                "spec.syncPeriod",
                Box::new(|s| s.sync_period = Some(StdDuration::ZERO.into())),
            ),
            (
                "spec.clusterCIDRs[0]",
                Box::new(|s| s.cluster_cidrs = vec!["10.0.0.0/33".into()]),
            ),
            (
                "spec.clusterCIDRs",
                Box::new(|s| s.cluster_cidrs = vec!["10.0.0.0/8".into(), "11.0.0.0/8".into()]),
            ),
            ("spec.ipvs", Box::new(|s| s.ipvs = Some(IpvsSpec::default()))),
            (
                "spec.detectLocal.mode",
                Box::new(|s| {
                    s.detect_local = Some(DetectLocal {
                        mode: Some(DetectLocalMode::ClusterCIDR),
                        ..Default::default()
                    })
                }),
            ),
            (
                "spec.detectLocal.bridgeInterface",
                Box::new(|s| {
                    s.detect_local = Some(DetectLocal {
                        mode: Some(DetectLocalMode::BridgeInterface),
                        ..Default::default()
                    })
                }),
            ),
            (
                "spec.nodePortAddresses",
                Box::new(|s| s.node_port_addresses = vec!["primary".into(), "10.0.0.0/8".into()]),
            ),
            (
                "spec.healthzBindAddress",
                Box::new(|s| s.healthz_bind_address = Some("localhost".into())),
            ),
            (
                "spec.conntrack.min",
                Box::new(|s| {
                    s.conntrack = Some(ConntrackSpec {
                        min: Some(-1),
                        ..Default::default()
                    })
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec(ProxyMode::Iptables);
            mutate(&mut s);
            let err = AgentConfig::from_spec(&s).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{field}:")),
                "expected an error about {field}, got {err:?}"
            );
        }
    }

    #[test]
    fn hash_is_stable_and_tracks_every_change() {
        let base = AgentConfig::from_spec(&spec(ProxyMode::Iptables)).unwrap();
        // Pinned: a change here means every running agent would be rolled on upgrade. Update it only on
        // purpose, together with the note in docs/operations.md.
        assert_eq!(base.hash(), "30ffbb06b740b5ee");
        assert_eq!(
            base.hash(),
            AgentConfig::from_spec(&spec(ProxyMode::Iptables)).unwrap().hash()
        );
        assert_eq!(base.hash().len(), 16);

        let mut explicit = spec(ProxyMode::Iptables);
        explicit.masquerade_bit = Some(14);
        explicit.sync_period = Some(StdDuration::from_secs(30).into());
        assert_eq!(
            AgentConfig::from_spec(&explicit).unwrap().hash(),
            base.hash(),
            "defaults spelled out hash the same"
        );

        let mut changed = spec(ProxyMode::Iptables);
        changed.masquerade_all = Some(true);
        assert_ne!(AgentConfig::from_spec(&changed).unwrap().hash(), base.hash());
        assert_ne!(
            AgentConfig::from_spec(&spec(ProxyMode::Nftables)).unwrap().hash(),
            base.hash()
        );
    }

    #[test]
    fn yaml_round_trips() {
        let mut s = spec(ProxyMode::Ipvs);
        s.cluster_cidrs = vec!["10.244.0.0/16".into()];
        s.node_port_addresses = vec!["192.168.0.0/16".into()];
        s.detect_local = Some(DetectLocal {
            mode: Some(DetectLocalMode::InterfaceNamePrefix),
            interface_name_prefix: Some("veth".into()),
            ..Default::default()
        });
        let cfg = AgentConfig::from_spec(&s).unwrap();
        let yaml = cfg.to_yaml().unwrap();
        let back = AgentConfig::from_yaml(&yaml).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.hash(), cfg.hash());
    }
}
