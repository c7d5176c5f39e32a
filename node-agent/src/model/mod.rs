//! The proxy model: pure data describing, per IP family, every service port this node proxies and the
//! endpoints it sends each kind of traffic to.
//!
//! Built from Services, EndpointSlices and this node's Node by [`build`]; consumed by the backends'
//! render functions. Nothing here talks to the API server or the kernel.

mod build;
mod endpoints;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub use build::{BuildReport, Model, Skipped, build};
pub use endpoints::categorize;

/// IP family: one proxier (rule set) per family, as upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4 (iptables).
    V4,
    /// IPv6 (ip6tables).
    V6,
}

impl IpFamily {
    /// Both families, v4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// Family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// Whether `ip` belongs to this family.
    pub fn contains(self, ip: &IpAddr) -> bool {
        Self::of(ip) == self
    }

    /// `IPv4` or `IPv6`, as in Service.spec.ipFamilies and EndpointSlice.addressType.
    pub fn api_name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn from_api(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lower-case name as iptables and nftables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a service port: `namespace/name:port-name/protocol`. Chain names are derived from it, so
/// they stay stable while the service exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Name of the port in the Service (may be empty for a single unnamed port).
    pub port: String,
    /// Protocol of the port.
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// An endpoint as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Pod (or other backend) address.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// The endpoint runs on this node.
    pub is_local: bool,
    /// conditions.ready (absent counts as true).
    pub ready: bool,
    /// conditions.serving (absent: same as ready).
    pub serving: bool,
    /// conditions.terminating (absent counts as false).
    pub terminating: bool,
    /// hints.forZones.
    pub zone_hints: Vec<String>,
    /// hints.forNodes.
    pub node_hints: Vec<String>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Everything about one service port in one family, with the endpoints this node uses for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Identity.
    pub name: ServicePortName,
    /// Cluster IP of this family.
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol (same as `name.protocol`).
    pub protocol: Protocol,
    /// NodePort, for NodePort and LoadBalancer services that allocate one.
    pub node_port: Option<u16>,
    /// spec.externalIPs of this family.
    pub external_ips: Vec<IpAddr>,
    /// status.loadBalancer.ingress IPs of this family, except those with `ipMode: Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// spec.loadBalancerSourceRanges of this family (empty: no firewall).
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// ClientIP session affinity timeout in seconds, when affinity is on.
    pub session_affinity_seconds: Option<u32>,
    /// externalTrafficPolicy: Local (only meaningful for externally reachable traffic).
    pub external_policy_local: bool,
    /// internalTrafficPolicy: Local.
    pub internal_policy_local: bool,
    /// healthCheckNodePort (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// Endpoints for traffic whose policy is Cluster: ready ones (topology applied), or serving-terminating
    /// ones when none is ready. Empty when no traffic of this service uses Cluster policy.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Local endpoints for traffic whose policy is Local: ready ones, or serving-terminating ones when
    /// none is ready. Empty when no traffic uses Local policy.
    pub local_endpoints: Vec<Endpoint>,
    /// Some usable (ready, or serving and terminating) endpoint exists anywhere. When false, traffic is
    /// rejected; when true but the policy's set is empty, it is dropped.
    pub has_any_endpoints: bool,
}

impl ServicePort {
    /// Reachable from outside the cluster (NodePort, external IP or load balancer IP).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }

    /// Some traffic of this service uses Cluster endpoints: internal traffic with Cluster policy, or any
    /// externally reachable service (even with externalTrafficPolicy Local, traffic from pods and the
    /// node to its NodePort or load balancer IP short-circuits to every endpoint, as upstream).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Some traffic of this service uses Local policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }

    /// Endpoints used for traffic from inside the cluster (to the cluster IP).
    pub fn internal_endpoints(&self) -> &[Endpoint] {
        if self.internal_policy_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// Endpoints used for traffic from outside (NodePort, external and load balancer IPs).
    pub fn external_endpoints(&self) -> &[Endpoint] {
        if self.external_policy_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// Every endpoint some traffic of this service may reach, without duplicates, sorted.
    pub fn all_endpoints(&self) -> Vec<&Endpoint> {
        let mut all: Vec<&Endpoint> = self
            .cluster_endpoints
            .iter()
            .chain(&self.local_endpoints)
            .collect();
        all.sort();
        all.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        all
    }
}

/// What this node knows about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (endpoints with this nodeName are local).
    pub name: String,
    /// topology.kubernetes.io/zone label.
    pub zone: Option<String>,
    /// spec.podCIDRs (for detectLocal NodeCIDR).
    pub pod_cidrs: Vec<IpNet>,
    /// InternalIP addresses, one per family at most (the primary addresses).
    pub primary_ips: Vec<IpAddr>,
}

/// The model of one family: every service port to program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyState {
    /// Family of every address in this state.
    pub family: Option<IpFamily>,
    /// Service ports by name.
    pub services: BTreeMap<ServicePortName, ServicePort>,
}

impl ProxyState {
    /// An empty state of `family`.
    pub fn empty(family: IpFamily) -> Self {
        Self {
            family: Some(family),
            services: BTreeMap::new(),
        }
    }

    /// Number of endpoints programmed, over all service ports.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.all_endpoints().len()).sum()
    }

    /// Names of the service ports that differ between `self` and `previous` (added, removed or changed).
    pub fn changed_since(&self, previous: &ProxyState) -> std::collections::BTreeSet<ServicePortName> {
        let mut changed = std::collections::BTreeSet::new();
        for (name, svc) in &self.services {
            if previous.services.get(name) != Some(svc) {
                changed.insert(name.clone());
            }
        }
        for name in previous.services.keys() {
            if !self.services.contains_key(name) {
                changed.insert(name.clone());
            }
        }
        changed
    }
}
