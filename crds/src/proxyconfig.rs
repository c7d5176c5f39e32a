//! The `ProxyConfig` custom resource: how a pool of nodes is proxied.
//!
//! Validation lives in the schema (types, enums, ranges, CEL rules) so the API server refuses a bad object
//! with a message. Defaults are not written into the stored object by any controller: they are computed
//! by [`crate::effective`] so GitOps tools never see drift.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go-style duration (`300ms`, `30s`, `1h30m`), strictly positive.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// `host:port` where host is an IPv4 address, a bracketed IPv6 address, or empty (all addresses).
const BIND_ADDRESS_PATTERN: &str = r"^(([0-9]{1,3}\.){3}[0-9]{1,3}|\[[0-9a-fA-F:.]+\])?:[0-9]{1,5}$";

/// Desired configuration of Switchyard's node agents on a pool of nodes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "ProxyConfig",
    doc = "ProxyConfig selects a pool of nodes and says how Switchyard proxies Services on them: the dataplane mode, the agent's pod and the proxy settings.",
    plural = "proxyconfigs",
    shortname = "pxc",
    category = "switchyard",
    status = "ProxyConfigStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updatedNodes"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("self.metadata.name.size() <= 50")
        .message("name must be at most 50 characters (it prefixes the agent's DaemonSet and ConfigMap)")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.ipvs) || self.mode == 'ipvs'", "message": "spec.ipvs is only allowed when spec.mode is ipvs"},
    {"rule": "duration(has(self.minSyncPeriod) ? self.minSyncPeriod : '1s') <= duration(has(self.syncPeriod) ? self.syncPeriod : '30s')",
     "message": "spec.minSyncPeriod must not be longer than spec.syncPeriod (defaults: 1s and 30s)"},
    {"rule": "!has(self.detectLocal) || !has(self.detectLocal.mode) || self.detectLocal.mode != 'ClusterCIDR' || (has(self.clusterCIDRs) && size(self.clusterCIDRs) > 0)",
     "message": "spec.detectLocal.mode ClusterCIDR needs spec.clusterCIDRs"},
    {"rule": "!has(self.clusterCIDRs) || size(self.clusterCIDRs) < 2 || cidr(self.clusterCIDRs[0]).ip().family() != cidr(self.clusterCIDRs[1]).ip().family()",
     "message": "spec.clusterCIDRs holds at most one CIDR per IP family"},
    {"rule": "!has(self.nodePortAddresses) || !self.nodePortAddresses.exists(a, a == 'primary') || size(self.nodePortAddresses) == 1",
     "message": "spec.nodePortAddresses: primary cannot be combined with CIDRs"}
]))]
pub struct ProxyConfigSpec {
    /// Dataplane the agents program: `iptables`, `nftables` or `ipvs`. Changing it rolls the agents node by
    /// node; each agent removes the previous mode's rules after the new mode is programmed.
    pub mode: ProxyMode,

    /// Nodes this ProxyConfig applies to (empty or absent: every node). When two ProxyConfigs select the
    /// same node, the older one keeps it and the newer one reports the conflict in its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// How configuration changes roll out across the selected nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// The node agent's pod: image, resources, scheduling and logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,

    /// Pod CIDRs of the cluster, at most one per IP family. Traffic from outside these ranges to a
    /// service is masqueraded when detectLocal.mode is ClusterCIDR.
    #[serde(default, rename = "clusterCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 64,
        "x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "must be a CIDR such as 10.244.0.0/16 or fd00:10:244::/56"}]}))]
    pub cluster_cidrs: Vec<String>,

    /// How the agent tells traffic from local pods apart from other traffic (for masquerading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_local: Option<DetectLocal>,

    /// Masquerade (SNAT) all traffic sent to service addresses, not only traffic from outside the
    /// cluster. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade_all: Option<bool>,

    /// Bit of the packet mark used to flag packets for masquerading, 0 to 31. Default 14 (0x4000), the
    /// same bit as kube-proxy so the two never disagree during a migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31))]
    pub masquerade_bit: Option<i32>,

    /// Node addresses NodePorts answer on: CIDRs, or the single word `primary` for the node's primary
    /// addresses. Empty or absent: every local address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 64,
        "x-kubernetes-validations": [{"rule": "self == 'primary' || isCIDR(self)", "message": "must be a CIDR or the word primary"}]}))]
    pub node_port_addresses: Vec<String>,

    /// How often, while nothing changes, the agent checks that its rules are still in the kernel (a full
    /// resync follows when they are not; otherwise everything is rewritten once an hour, as upstream
    /// does), and the longest retry interval after a failure. A duration (`30s`, `1m`). Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "duration(self) > duration('0s')", "message": "must be a positive duration"}]))]
    pub sync_period: Option<Duration>,

    /// Shortest time between two syncs: bursts of changes within it are coalesced into one sync.
    /// Default 1s; 0s syncs on every change; must not exceed syncPeriod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub min_sync_period: Option<Duration>,

    /// Connection-tracking settings the agent applies to the node (sysctls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackSpec>,

    /// IPVS settings; only allowed when mode is ipvs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipvs: Option<IpvsSpec>,

    /// Address of the health server (`/healthz`, `/livez`) as `ip:port`; an empty ip means every address.
    /// Default 0.0.0.0:10256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BIND_ADDRESS_PATTERN), length(max = 64))]
    pub healthz_bind_address: Option<String>,

    /// Address of the metrics server (`/metrics`) as `ip:port`. Default 127.0.0.1:10249.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BIND_ADDRESS_PATTERN), length(max = 64))]
    pub metrics_bind_address: Option<String>,

    /// Value of the `service.kubernetes.io/service-proxy-name` label this proxy serves. Services without
    /// the label are always served; services labelled for another proxy are skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub proxy_name: Option<String>,
}

// Dataplane mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// Rules in the iptables nat and filter tables, loaded with iptables-restore.
    Iptables,
    /// Rules in Switchyard's own nftables tables, loaded in one transaction.
    Nftables,
    /// IPVS virtual servers, with ipsets and a few iptables rules.
    Ipvs,
}

impl ProxyMode {
    /// The name used in the API and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rollout of agent changes across nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Most agents that may be unavailable at once during a rollout: a count (at least 1) or a percentage
    /// of the selected nodes (`10%`). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "string(self).matches('^([1-9][0-9]*|([1-9][0-9]?|100)%)$')",
        "message": "must be an integer of at least 1 or a percentage from 1% to 100%"}]))]
    pub max_unavailable: Option<IntOrString>,

    /// Seconds a rollout may go without progress before the ProxyConfig reports Degraded with reason
    /// RolloutHung. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,
}

/// The node agent's pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image of the agent. Default: the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// CPU and memory requests and limits of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra tolerations. The agent already tolerates every taint, as kube-proxy does; set this to
    /// replace that with a narrower list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Priority class of the agent pods. Default system-node-critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Log verbosity of the agent. Default info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,

    /// Extra labels on the agent pods (for example for a network policy or a cost report).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
}

// Agent log verbosity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: one line per sync and per notable event.
    #[default]
    Info,
    /// Per-service detail.
    Debug,
    /// Everything, including rendered rules.
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// How local traffic is told apart from other traffic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.mode) && self.mode == 'BridgeInterface') == has(self.bridgeInterface)",
     "message": "bridgeInterface is required with mode BridgeInterface and only allowed with it"},
    {"rule": "(has(self.mode) && self.mode == 'InterfaceNamePrefix') == has(self.interfaceNamePrefix)",
     "message": "interfaceNamePrefix is required with mode InterfaceNamePrefix and only allowed with it"}
]))]
pub struct DetectLocal {
    /// ClusterCIDR (source in spec.clusterCIDRs), NodeCIDR (source in the node's podCIDRs), BridgeInterface
    /// (arrives on bridgeInterface) or InterfaceNamePrefix (arrives on an interface whose name starts with
    /// interfaceNamePrefix). Default: ClusterCIDR when clusterCIDRs is set, otherwise NodeCIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<DetectLocalMode>,

    /// Bridge that local pods are attached to (mode BridgeInterface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub bridge_interface: Option<String>,

    /// Name prefix of local pods' interfaces (mode InterfaceNamePrefix), e.g. `veth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub interface_name_prefix: Option<String>,
}

// Local traffic detection mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum DetectLocalMode {
    /// Source address inside spec.clusterCIDRs.
    ClusterCIDR,
    /// Source address inside the node's podCIDRs (from the Node object).
    NodeCIDR,
    /// Packet arrived on the bridge named by bridgeInterface.
    BridgeInterface,
    /// Packet arrived on an interface whose name starts with interfaceNamePrefix.
    InterfaceNamePrefix,
}

/// Connection-tracking settings (sysctls on the node). A zero leaves the kernel's value as it is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackSpec {
    /// Conntrack entries to allow per CPU core (nf_conntrack_max = maxPerCore × cores, at least min).
    /// Default 32768; 0 leaves nf_conntrack_max alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_per_core: Option<i32>,

    /// Lower bound of nf_conntrack_max. Default 131072.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min: Option<i32>,

    /// Idle timeout of established TCP flows. Default 24h; 0s leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tcp_established_timeout: Option<Duration>,

    /// Timeout of TCP flows in CLOSE_WAIT. Default 1h; 0s leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tcp_close_wait_timeout: Option<Duration>,

    /// Set nf_conntrack_tcp_be_liberal so out-of-window packets are not marked INVALID. When false the agent
    /// drops INVALID packets instead, as kube-proxy does. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_be_liberal: Option<bool>,

    /// Timeout of UDP flows seen in one direction. Default: leave the kernel's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub udp_timeout: Option<Duration>,

    /// Timeout of UDP flows seen in both directions. Default: leave the kernel's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub udp_stream_timeout: Option<Duration>,
}

/// IPVS mode settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpvsSpec {
    /// IPVS scheduler. Default rr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<IpvsScheduler>,

    /// Stop nodes from answering ARP for service addresses held on the IPVS interface (arp_ignore=1,
    /// arp_announce=2), needed with MetalLB-style L2 load balancers. Default false.
    #[serde(default, rename = "strictARP", skip_serializing_if = "Option::is_none")]
    pub strict_arp: Option<bool>,

    /// IPVS timeout of idle TCP sessions. Default: leave the kernel's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tcp_timeout: Option<Duration>,

    /// IPVS timeout of TCP sessions after a FIN. Default: leave the kernel's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub tcp_fin_timeout: Option<Duration>,

    /// IPVS timeout of UDP sessions. Default: leave the kernel's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub udp_timeout: Option<Duration>,

    /// CIDRs whose IPVS virtual servers the agent must leave alone (owned by other software).
    #[serde(default, rename = "excludeCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 64,
        "x-kubernetes-validations": [{"rule": "isCIDR(self)", "message": "must be a CIDR"}]}))]
    pub exclude_cidrs: Vec<String>,
}

// IPVS scheduling algorithm.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpvsScheduler {
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Locality-based least connections.
    Lblc,
    /// Locality-based least connections with replication.
    Lblcr,
    /// Source hashing.
    Sh,
    /// Destination hashing.
    Dh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Maglev hashing.
    Mh,
}

/// Observed state of a ProxyConfig, rolled up from its nodes' ProxyNodes and its DaemonSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfigStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Available, Progressing, Degraded and Ready, with reasons from a fixed list (see docs/operations.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Nodes selected by this ProxyConfig.
    #[serde(default)]
    pub desired_nodes: i32,

    /// Nodes whose agent runs the current configuration.
    #[serde(default)]
    pub updated_nodes: i32,

    /// Nodes whose agent runs the current configuration and has synced its rules.
    #[serde(default)]
    pub ready_nodes: i32,

    /// Nodes whose agent reports an error.
    #[serde(default)]
    pub degraded_nodes: i32,

    /// readyNodes/desiredNodes, for display (for example `3/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Hash of the effective agent configuration (spec with defaults applied); nodes whose ProxyNode
    /// reports the same hash are up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_config_hash: Option<String>,

    /// Nodes selected by this ProxyConfig and also by an older one (which keeps them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicting_nodes: Vec<String>,

    /// Duration of the last rule sync across nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_duration: Option<SyncDurationSummary>,

    /// When the rollout last made progress (a node became updated or ready); a rollout without progress
    /// for spec.rollout.progressDeadlineSeconds is reported as Degraded/RolloutHung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Summary of the last sync duration across the nodes of a ProxyConfig, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncDurationSummary {
    /// Median over nodes of the last sync duration, in milliseconds.
    pub median_millis: i64,
    /// Largest last sync duration over nodes, in milliseconds.
    pub max_millis: i64,
}
