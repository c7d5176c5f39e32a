//! A two-node cluster in namespaces: the node under test with local pods, a second node with remote
//! pods, and an external client.
//!
//! ```text
//!  client (eth0 192.168.50.2, fd00:50::2; default via node)
//!     |  veth
//!  node   (eth0 192.168.50.1, fd00:50::1; eth1 192.168.60.1, fd00:60::1;
//!          br0 10.244.1.1/24, fd00:244:1::1/64 with the local pods; forwarding on;
//!          10.244.2.0/24 and fd00:244:2::/64 via the remote node; default via client)
//!     |  veth                                   |  br0
//!  remote (eth0 192.168.60.2, fd00:60::2;     pod<i> (10.244.1.<10+i>, fd00:244:1::<10+i>)
//!          br0 10.244.2.1/24, fd00:244:2::1/64; default via node)
//!     |  br0
//!  remote pod<i> (10.244.2.<10+i>, fd00:244:2::<10+i>)
//! ```
//! The node is where the proxy's rules go; its podCIDRs are 10.244.1.0/24 and fd00:244:1::/64, the
//! cluster's 10.244.0.0/16 and fd00:244::/32. Bridged traffic passes the node's iptables
//! (`bridge-nf-call-iptables`), as Kubernetes requires, so a pod's reply to a pod on the same bridge is
//! un-NATed, and every pod's bridge port is in hairpin mode (as the bridge CNI plugin's `hairpinMode`),
//! so a pod's packet DNATed back to itself can leave through the port it came in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::cmd::CmdError;
use super::netns::{NetNs, veth};
use super::topology::{NodeTopology, Pod};

/// Lets frames leave a bridge port through which they arrived.
fn hairpin(ns: &NetNs, port: &str) -> Result<(), CmdError> {
    ns.ip(&["link", "set", port, "type", "bridge_slave", "hairpin", "on"])
        .map(drop)
}

/// Client, node, remote node and their pods, all deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    /// The external client.
    pub client: NetNs,
    /// The node under test.
    pub node: NetNs,
    /// Pods on the node under test.
    pub pods: Vec<Pod>,
    /// The other node.
    pub remote_node: NetNs,
    /// Pods on the other node.
    pub remote_pods: Vec<Pod>,
}

impl Cluster {
    /// Client IPv4 address.
    pub const CLIENT_V4: Ipv4Addr = NodeTopology::CLIENT_V4;
    /// Client IPv6 address.
    pub const CLIENT_V6: Ipv6Addr = NodeTopology::CLIENT_V6;
    /// The node's IPv4 address on the client link (its InternalIP).
    pub const NODE_V4: Ipv4Addr = NodeTopology::NODE_V4;
    /// The node's IPv6 address on the client link (its InternalIP).
    pub const NODE_V6: Ipv6Addr = NodeTopology::NODE_V6;
    /// The node's IPv4 address on the pod bridge.
    pub const BRIDGE_V4: Ipv4Addr = NodeTopology::BRIDGE_V4;
    /// The node's IPv6 address on the pod bridge.
    pub const BRIDGE_V6: Ipv6Addr = NodeTopology::BRIDGE_V6;
    /// The node's IPv4 address towards the remote node.
    pub const NODE_LINK_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);
    /// The node's IPv6 address towards the remote node.
    pub const NODE_LINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 1);
    /// The remote node's IPv4 address.
    pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
    /// The remote node's IPv6 address.
    pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 2);
    /// The remote node's IPv4 address on its pod bridge.
    pub const REMOTE_BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
    /// The remote node's IPv6 address on its pod bridge.
    pub const REMOTE_BRIDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 1);
    /// The node's podCIDRs.
    pub const POD_CIDRS: [&'static str; 2] = ["10.244.1.0/24", "fd00:244:1::/64"];
    /// The cluster's pod CIDRs.
    pub const CLUSTER_CIDRS: [&'static str; 2] = ["10.244.0.0/16", "fd00:244::/32"];

    /// Builds the cluster with `local` pods on the node and `remote` pods on the other node; namespace
    /// labels start with `label`.
    pub fn new(label: &str, local: usize, remote: usize) -> Result<Self, CmdError> {
        let NodeTopology { client, node, pods } = NodeTopology::new(label, local)?;
        // Kubernetes needs bridged traffic to pass iptables (replies between pods of one bridge are
        // un-NATed there); new namespaces usually have it on already.
        node.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
        node.sysctl("net.bridge.bridge-nf-call-ip6tables", "1")?;
        // As the bridge CNI plugin with hairpinMode: with bridged traffic passing iptables, a pod's
        // packet DNATed back to itself leaves through the port it arrived on.
        for i in 0..pods.len() {
            hairpin(&node, &format!("vp{i}"))?;
        }

        let remote_node = NetNs::new(&format!("{label}-remote"))?;
        remote_node.enable_forwarding()?;
        veth(&node, "eth1", &remote_node, "eth0")?;
        node.add_addr("eth1", &format!("{}/24", Self::NODE_LINK_V4))?;
        node.add_addr("eth1", &format!("{}/64", Self::NODE_LINK_V6))?;
        remote_node.add_addr("eth0", &format!("{}/24", Self::REMOTE_V4))?;
        remote_node.add_addr("eth0", &format!("{}/64", Self::REMOTE_V6))?;
        node.add_route("10.244.2.0/24", IpAddr::V4(Self::REMOTE_V4))?;
        node.add_route("fd00:244:2::/64", IpAddr::V6(Self::REMOTE_V6))?;
        remote_node.add_route("default", IpAddr::V4(Self::NODE_LINK_V4))?;
        remote_node.add_route("default", IpAddr::V6(Self::NODE_LINK_V6))?;

        remote_node.add_bridge("br0")?;
        remote_node.add_addr("br0", &format!("{}/24", Self::REMOTE_BRIDGE_V4))?;
        remote_node.add_addr("br0", &format!("{}/64", Self::REMOTE_BRIDGE_V6))?;
        let mut remote_pods = Vec::with_capacity(remote);
        for i in 0..remote {
            let host = u8::try_from(10 + i).map_err(|_| CmdError {
                command: "Cluster::new".into(),
                code: None,
                stdout: String::new(),
                stderr: format!("too many remote pods: {remote}"),
            })?;
            let ns = NetNs::new(&format!("{label}-rpod{i}"))?;
            let node_dev = format!("vp{i}");
            veth(&ns, "eth0", &remote_node, &node_dev)?;
            remote_node.attach(&node_dev, "br0")?;
            hairpin(&remote_node, &node_dev)?;
            let ipv4 = Ipv4Addr::new(10, 244, 2, host);
            let ipv6 = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, u16::from(host));
            ns.add_addr("eth0", &format!("{ipv4}/24"))?;
            ns.add_addr("eth0", &format!("{ipv6}/64"))?;
            ns.add_route("default", IpAddr::V4(Self::REMOTE_BRIDGE_V4))?;
            ns.add_route("default", IpAddr::V6(Self::REMOTE_BRIDGE_V6))?;
            remote_pods.push(Pod { ns, ipv4, ipv6 });
        }
        Ok(Self {
            client,
            node,
            pods,
            remote_node,
            remote_pods,
        })
    }

    /// The client's address of the family of `like`.
    pub fn client_ip_like(like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            IpAddr::V4(Self::CLIENT_V4)
        } else {
            IpAddr::V6(Self::CLIENT_V6)
        }
    }

    /// The node's InternalIP of the family of `like`.
    pub fn node_ip_like(like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            IpAddr::V4(Self::NODE_V4)
        } else {
            IpAddr::V6(Self::NODE_V6)
        }
    }

    /// The node's bridge address (what local pods see when the node masquerades) of the family of
    /// `like`.
    pub fn bridge_ip_like(like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            IpAddr::V4(Self::BRIDGE_V4)
        } else {
            IpAddr::V6(Self::BRIDGE_V6)
        }
    }

    /// Every address of the node under test.
    pub fn node_addresses() -> [IpAddr; 6] {
        [
            IpAddr::V4(Self::NODE_V4),
            IpAddr::V6(Self::NODE_V6),
            IpAddr::V4(Self::BRIDGE_V4),
            IpAddr::V6(Self::BRIDGE_V6),
            IpAddr::V4(Self::NODE_LINK_V4),
            IpAddr::V6(Self::NODE_LINK_V6),
        ]
    }
}
