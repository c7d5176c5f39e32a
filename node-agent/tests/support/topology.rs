//! A ready-made dual-stack topology: a client namespace, a node namespace that routes, and pod
//! namespaces on a bridge in the node.
//!
//! ```text
//!  client (eth0 192.168.50.2, fd00:50::2)
//!     |  veth
//!  node   (eth0 192.168.50.1, fd00:50::1; br0 10.244.1.1/24, fd00:244:1::1/64; forwarding on)
//!     |  br0 + one veth per pod (node side "vp<i>")
//!  pod<i> (eth0 10.244.1.<10+i>, fd00:244:1::<10+i>; default route via br0)
//! ```
//! The client's default routes point at the node, so any service address a test programs on the node
//! is reachable from the client. The node's default routes point back at the client (its "upstream
//! router"), so a packet to an address nobody owns is routed, passes the node's FORWARD chain (where
//! REJECT and DROP rules act) and is then dropped by the client: the client sees a timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::cmd::CmdError;
use super::netns::{NetNs, veth};

/// A pod: its namespace and addresses.
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace (its interface is `eth0`).
    pub ns: NetNs,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
}

impl Pod {
    /// The pod's address of the family of `like`.
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            IpAddr::V4(self.ipv4)
        } else {
            IpAddr::V6(self.ipv6)
        }
    }
}

/// Client, node and pods, all deleted on drop.
#[derive(Debug)]
pub struct NodeTopology {
    /// The client namespace.
    pub client: NetNs,
    /// The node namespace (where the proxy's rules go).
    pub node: NetNs,
    /// The pods.
    pub pods: Vec<Pod>,
}

impl NodeTopology {
    /// Client IPv4 address.
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
    /// Client IPv6 address.
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
    /// Node IPv4 address on the client link.
    pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
    /// Node IPv6 address on the client link.
    pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
    /// Node IPv4 address on the pod bridge (pods' gateway).
    pub const BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    /// Node IPv6 address on the pod bridge (pods' gateway).
    pub const BRIDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 1);

    /// Builds the topology with `pods` pods; namespace labels start with `label`.
    pub fn new(label: &str, pods: usize) -> Result<Self, CmdError> {
        let client = NetNs::new(&format!("{label}-client"))?;
        let node = NetNs::new(&format!("{label}-node"))?;
        node.enable_forwarding()?;
        veth(&client, "eth0", &node, "eth0")?;
        client.add_addr("eth0", &format!("{}/24", Self::CLIENT_V4))?;
        client.add_addr("eth0", &format!("{}/64", Self::CLIENT_V6))?;
        node.add_addr("eth0", &format!("{}/24", Self::NODE_V4))?;
        node.add_addr("eth0", &format!("{}/64", Self::NODE_V6))?;
        client.add_route("default", IpAddr::V4(Self::NODE_V4))?;
        client.add_route("default", IpAddr::V6(Self::NODE_V6))?;
        node.add_route("default", IpAddr::V4(Self::CLIENT_V4))?;
        node.add_route("default", IpAddr::V6(Self::CLIENT_V6))?;

        node.add_bridge("br0")?;
        node.add_addr("br0", &format!("{}/24", Self::BRIDGE_V4))?;
        node.add_addr("br0", &format!("{}/64", Self::BRIDGE_V6))?;
        let mut all = Vec::with_capacity(pods);
        for i in 0..pods {
            let host = u8::try_from(10 + i).map_err(|_| CmdError {
                command: "NodeTopology::new".into(),
                code: None,
                stdout: String::new(),
                stderr: format!("too many pods: {pods}"),
            })?;
            let ns = NetNs::new(&format!("{label}-pod{i}"))?;
            let node_dev = format!("vp{i}");
            veth(&ns, "eth0", &node, &node_dev)?;
            node.attach(&node_dev, "br0")?;
            let ipv4 = Ipv4Addr::new(10, 244, 1, host);
            let ipv6 = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, u16::from(host));
            ns.add_addr("eth0", &format!("{ipv4}/24"))?;
            ns.add_addr("eth0", &format!("{ipv6}/64"))?;
            ns.add_route("default", IpAddr::V4(Self::BRIDGE_V4))?;
            ns.add_route("default", IpAddr::V6(Self::BRIDGE_V6))?;
            all.push(Pod { ns, ipv4, ipv6 });
        }
        Ok(Self {
            client,
            node,
            pods: all,
        })
    }

    /// The client's address of the family of `like`.
    pub fn client_ip_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            IpAddr::V4(Self::CLIENT_V4)
        } else {
            IpAddr::V6(Self::CLIENT_V6)
        }
    }
}
