//! Names, addresses and paths of one local cluster: pure functions of its [`ClusterSpec`].
//!
//! Everything the harness creates on the host carries the cluster's prefix `swyd-<name>-` (network
//! namespaces) or lives under its state folder `<root>/swyd-cluster-<name>` (files, logs, etcd data), so
//! `cluster down` can find leftovers of a crashed run by name alone. Addresses exist only inside the
//! cluster's own network namespaces:
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | node network (shared bridge) | 172.31.0.0/24: gateway .1, control plane .2, node *i* .(10+*i*) | fd00:172:31::/64, same host parts |
//! | pod CIDR of node *i* | 10.244.*i*.0/24 (gateway .1 on the node's `cbr0`) | fd00:10:244:*i*::/64 |
//! | Services | 10.96.0.0/16 (`kubernetes` is 10.96.0.1) | fd00:10:96::/112 |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Prefix of every network namespace and state folder the harness creates.
pub const PREFIX: &str = "swyd-";
/// The IPv4 Service range given to the API server.
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
/// The IPv6 Service range given to the API server.
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";
/// ClusterIP of the `default/kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// All pod CIDRs of the cluster, IPv4.
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
/// All pod CIDRs of the cluster, IPv6.
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
/// Port of the API server inside the control-plane namespace.
pub const APISERVER_PORT: u16 = 6443;
/// Most nodes a cluster can have (host parts .11 to .(10+N) of the node network).
pub const MAX_NODES: u8 = 100;
/// Zones assigned round-robin to the nodes (`topology.kubernetes.io/zone`).
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// What to start: everything the supervisor needs, written to the state folder as `spec.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Cluster name: 1 to 10 of `[a-z0-9]`, starting with a letter.
    pub name: String,
    /// Number of simulated nodes.
    pub nodes: u8,
    /// Give nodes and pods IPv6 addresses too, and the API server an IPv6 Service range.
    pub dual_stack: bool,
    /// Host loopback port for the API server (0: any free port).
    pub api_port: u16,
    /// Folder of the upstream binaries (etcd, kube-apiserver, ...).
    pub upstream_bin: PathBuf,
    /// This harness's binary (the supervisor, the echo server and pod wrapper run from it).
    pub harness_bin: PathBuf,
    /// Binary run for images whose name contains `switchyard-agent`.
    pub agent_bin: PathBuf,
    /// Binary run for images whose name contains `switchyard-operator`.
    pub operator_bin: PathBuf,
    /// Folder holding the cluster's state folder.
    pub state_root: PathBuf,
    /// When set, the cluster tears itself down once this process is gone (tests set their own pid).
    pub owner_pid: Option<u32>,
}

impl ClusterSpec {
    /// A spec with the defaults: binaries from `$SWITCHYARD_CACHE` (default `~/.cache/switchyard`),
    /// the agent and operator from `$SWITCHYARD_AGENT_BIN` / `$SWITCHYARD_OPERATOR_BIN` or
    /// `$CARGO_TARGET_DIR/debug`, state under `$SWITCHYARD_CLUSTER_ROOT` (default `/tmp`).
    pub fn new(name: &str, nodes: u8, harness_bin: PathBuf) -> Result<Self> {
        validate_name(name)?;
        if nodes > MAX_NODES {
            return Err(Error::Invalid(format!("at most {MAX_NODES} nodes, not {nodes}")));
        }
        let env_path = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = env_path("HOME").unwrap_or_else(|| PathBuf::from("/root"));
        let cache = env_path("SWITCHYARD_CACHE").unwrap_or_else(|| home.join(".cache/switchyard"));
        let target = env_path("CARGO_TARGET_DIR").unwrap_or_else(|| cache.join("target"));
        Ok(ClusterSpec {
            name: name.to_owned(),
            nodes,
            dual_stack: true,
            api_port: 0,
            upstream_bin: cache.join("bin"),
            harness_bin,
            agent_bin: env_path("SWITCHYARD_AGENT_BIN")
                .unwrap_or_else(|| target.join("debug/switchyard-agent")),
            operator_bin: env_path("SWITCHYARD_OPERATOR_BIN")
                .unwrap_or_else(|| target.join("debug/switchyard-operator")),
            state_root: env_path("SWITCHYARD_CLUSTER_ROOT").unwrap_or_else(|| PathBuf::from("/tmp")),
            owner_pid: None,
        })
    }

    /// The names, paths and addresses derived from this spec.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.name, &self.state_root, self.nodes, self.dual_stack)
    }
}

/// Checks a cluster name: it becomes part of namespace names, so it stays short and plain.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=10).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "cluster name {name:?}: use 1 to 10 lowercase letters or digits, starting with a letter"
        )))
    }
}

/// One simulated node's identity and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeLayout {
    /// 1-based index.
    pub index: u8,
    /// Node object name.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// Node IPs (IPv4 first).
    pub ips: Vec<IpAddr>,
    /// Pod CIDRs (IPv4 first).
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeLayout {
    /// The node's address on its pod bridge in each family (the pods' default gateway).
    pub fn gateways(&self) -> Vec<IpAddr> {
        self.pod_cidrs.iter().filter_map(|c| host_in(c, 1)).collect()
    }

    /// Pod IPs for host part `host` of the node's pod CIDRs (same host part in both families).
    pub fn pod_ips(&self, host: u8) -> Vec<IpAddr> {
        self.pod_cidrs.iter().filter_map(|c| host_in(c, host)).collect()
    }
}

/// Names, paths and addresses of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Cluster name.
    pub name: String,
    /// The state folder: `<root>/swyd-cluster-<name>`.
    pub state_dir: PathBuf,
    /// Whether nodes and pods get IPv6 addresses.
    pub dual_stack: bool,
    /// The simulated nodes.
    pub nodes: Vec<NodeLayout>,
}

impl Layout {
    /// Derives the layout.
    pub fn new(name: &str, state_root: &Path, nodes: u8, dual_stack: bool) -> Self {
        let prefix = netns_prefix(name);
        let nodes = (1..=nodes)
            .map(|index| {
                let name = format!("node-{index}");
                let mut ips = vec![IpAddr::V4(node_net_v4(10 + index))];
                let mut pod_cidrs = vec![IpNet::V4(pod_cidr_v4(index))];
                if dual_stack {
                    ips.push(IpAddr::V6(node_net_v6(10 + index)));
                    pod_cidrs.push(IpNet::V6(pod_cidr_v6(index)));
                }
                NodeLayout {
                    index,
                    netns: format!("{prefix}{name}"),
                    zone: ZONES[usize::from(index - 1) % ZONES.len()].to_owned(),
                    name,
                    ips,
                    pod_cidrs,
                }
            })
            .collect();
        Layout {
            name: name.to_owned(),
            state_dir: state_dir(state_root, name),
            dual_stack,
            nodes,
        }
    }

    /// Prefix of every network namespace of this cluster.
    pub fn netns_prefix(&self) -> String {
        netns_prefix(&self.name)
    }
    /// Namespace holding the shared bridge `br0` that connects the control plane and the nodes.
    pub fn bridge_netns(&self) -> String {
        format!("{}net", self.netns_prefix())
    }
    /// Namespace of etcd and the Kubernetes control plane.
    pub fn cp_netns(&self) -> String {
        format!("{}cp", self.netns_prefix())
    }
    /// Namespace of a pod (not used for host-network pods, which run in their node's namespace).
    pub fn pod_netns(&self, pod_uid: &str) -> String {
        format!("{}pod-{}", self.netns_prefix(), short_uid(pod_uid))
    }
    /// The node network's gateway (on `br0` in the bridge namespace, which does not forward): nodes have a
    /// default route like real ones, so host-network clients can reach Service IPs, and traffic to
    /// anywhere else ends there.
    pub fn gateway_ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(node_net_v4(1))];
        if self.dual_stack {
            ips.push(IpAddr::V6(node_net_v6(1)));
        }
        ips
    }
    /// Control-plane addresses (IPv4 first).
    pub fn cp_ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(node_net_v4(2))];
        if self.dual_stack {
            ips.push(IpAddr::V6(node_net_v6(2)));
        }
        ips
    }
    /// The API server's address as pods and nodes reach it.
    pub fn apiserver_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(node_net_v4(2)), APISERVER_PORT)
    }
    /// The `--service-cluster-ip-range` value.
    pub fn service_cidrs(&self) -> String {
        if self.dual_stack {
            format!("{SERVICE_CIDR_V4},{SERVICE_CIDR_V6}")
        } else {
            SERVICE_CIDR_V4.to_owned()
        }
    }
    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeLayout> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The spec the supervisor reads.
    pub fn spec_file(&self) -> PathBuf {
        self.state_dir.join("spec.json")
    }
    /// Written by the supervisor once the cluster is ready: a [`crate::cluster::ReadyInfo`].
    pub fn ready_file(&self) -> PathBuf {
        self.state_dir.join("ready.json")
    }
    /// Written by the supervisor when bringing the cluster up failed.
    pub fn failed_file(&self) -> PathBuf {
        self.state_dir.join("failed.txt")
    }
    /// The supervisor's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.state_dir.join("supervisor.pid")
    }
    /// Certificates and keys.
    pub fn pki_dir(&self) -> PathBuf {
        self.state_dir.join("pki")
    }
    /// Logs of the supervisor, the control plane and the pods.
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    /// The admin kubeconfig for the host (server on a loopback port).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }
    /// Kubeconfigs used inside the control-plane namespace and by the node simulators.
    pub fn kubeconfigs_dir(&self) -> PathBuf {
        self.state_dir.join("kubeconfigs")
    }
    /// etcd's data.
    pub fn etcd_dir(&self) -> PathBuf {
        self.state_dir.join("etcd")
    }
    /// Per-pod folders (volumes, mount scratch space).
    pub fn pods_dir(&self) -> PathBuf {
        self.state_dir.join("pods")
    }
}

/// Whether `ns` is a namespace this harness creates — `swyd-<cluster>-` followed by `net`, `cp`,
/// `node-<n>` or `pod-<11 hex digits>` — of `cluster`, or of any cluster when `None`. Other namespaces
/// that merely share the prefix (other tools use `swyd-` too) are never touched.
pub fn is_harness_netns(ns: &str, cluster: Option<&str>) -> bool {
    let Some((name, suffix)) = ns.strip_prefix(PREFIX).and_then(|rest| rest.split_once('-')) else {
        return false;
    };
    if validate_name(name).is_err() || cluster.is_some_and(|c| c != name) {
        return false;
    }
    let all = |s: &str, f: fn(&char) -> bool| !s.is_empty() && s.chars().all(|c| f(&c));
    suffix == "net"
        || suffix == "cp"
        || suffix
            .strip_prefix("node-")
            .is_some_and(|n| all(n, char::is_ascii_digit))
        || suffix
            .strip_prefix("pod-")
            .is_some_and(|u| u.len() == 11 && all(u, char::is_ascii_hexdigit))
}

/// `swyd-<name>-`.
pub fn netns_prefix(name: &str) -> String {
    format!("{PREFIX}{name}-")
}

/// `<root>/swyd-cluster-<name>`.
pub fn state_dir(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{PREFIX}cluster-{name}"))
}

/// The first 11 hex digits of a pod UID: unique enough within a cluster, and `veth` + 11 characters
/// fits Linux's 15-character interface names.
pub fn short_uid(uid: &str) -> String {
    uid.chars().filter(char::is_ascii_alphanumeric).take(11).collect()
}

/// Node-side name of a pod's veth (on the node's `cbr0` bridge).
pub fn pod_veth(pod_uid: &str) -> String {
    format!("veth{}", short_uid(pod_uid))
}

fn node_net_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, host)
}

/// IPv6 host parts read like the IPv4 ones: host 11 is `fd00:172:31::11`.
fn node_net_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, decimal_as_hex(host))
}

fn pod_cidr_v4(index: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(10, 244, index, 0), 24)
}

fn pod_cidr_v6(index: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(0xfd00, 0x10, 0x244, decimal_as_hex(index), 0, 0, 0, 0),
        64,
    )
}

/// 11 -> 0x11, so the IPv6 address shows the same digits as the IPv4 one.
fn decimal_as_hex(n: u8) -> u16 {
    let (h, t, o) = (u16::from(n / 100), u16::from(n / 10 % 10), u16::from(n % 10));
    (h << 8) | (t << 4) | o
}

/// Host part `host` of `net`, using the same decimal-looking digits for IPv6.
fn host_in(net: &IpNet, host: u8) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let o = n.network().octets();
            Some(IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], host)))
        }
        IpNet::V6(n) => {
            let mut s = n.network().segments();
            s[7] = decimal_as_hex(host);
            Some(IpAddr::V6(Ipv6Addr::from(s)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_short_and_plain() {
        assert!(validate_name("dev").is_ok());
        assert!(validate_name("e2e1").is_ok());
        for bad in ["", "Dev", "1dev", "a-b", "abcdefghijk", "a_b"] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn nodes_get_addresses_pod_cidrs_and_zones_by_index() {
        let layout = Layout::new("dev", Path::new("/tmp"), 4, true);
        let n1 = &layout.nodes[0];
        assert_eq!(n1.name, "node-1");
        assert_eq!(n1.netns, "swyd-dev-node-1");
        assert_eq!(n1.zone, "zone-a");
        assert_eq!(
            n1.ips,
            vec![
                "172.31.0.11".parse::<IpAddr>().unwrap(),
                "fd00:172:31::11".parse().unwrap()
            ]
        );
        assert_eq!(
            n1.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(n1.gateways()[1], "fd00:10:244:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            n1.pod_ips(25),
            vec![
                "10.244.1.25".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::25".parse().unwrap()
            ]
        );
        assert_eq!(layout.nodes[3].zone, "zone-a");
        assert_eq!(layout.nodes[2].zone, "zone-c");
        assert_eq!(layout.state_dir, Path::new("/tmp/swyd-cluster-dev"));
        assert_eq!(layout.cp_netns(), "swyd-dev-cp");
        assert_eq!(layout.apiserver_addr().to_string(), "172.31.0.2:6443");
    }

    #[test]
    fn only_namespaces_of_the_harness_shape_are_ours() {
        let layout = Layout::new("dev", Path::new("/tmp"), 2, true);
        for ns in [
            layout.bridge_netns(),
            layout.cp_netns(),
            layout.nodes[1].netns.clone(),
            layout.pod_netns("3f2a1b2c-9d8e"),
        ] {
            assert!(is_harness_netns(&ns, Some("dev")), "{ns}");
            assert!(is_harness_netns(&ns, None), "{ns}");
            assert!(!is_harness_netns(&ns, Some("other")), "{ns}");
        }
        for foreign in [
            "swyd-bench-0",
            "swyd-dev-client",
            "swyd-dev-node-",
            "swyd-dev-pod-xyz",
            "swyd-Dev-cp",
            "other-dev-cp",
        ] {
            assert!(!is_harness_netns(foreign, None), "{foreign}");
        }
    }

    #[test]
    fn single_stack_layout_has_no_ipv6() {
        let layout = Layout::new("v4", Path::new("/tmp"), 2, false);
        assert!(
            layout
                .nodes
                .iter()
                .all(|n| n.ips.len() == 1 && n.pod_cidrs.len() == 1)
        );
        assert_eq!(layout.service_cidrs(), SERVICE_CIDR_V4);
    }

    #[test]
    fn pod_interface_names_fit_the_kernel_limit() {
        let uid = "3f2a1b2c-9d8e-4f00-a1b2-c3d4e5f60718";
        assert_eq!(short_uid(uid), "3f2a1b2c9d8");
        assert_eq!(pod_veth(uid).len(), 15);
        assert_eq!(
            Layout::new("dev", Path::new("/tmp"), 1, true).pod_netns(uid),
            "swyd-dev-pod-3f2a1b2c9d8"
        );
    }
}
