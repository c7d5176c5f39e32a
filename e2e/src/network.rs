//! The cluster's network, all of it inside namespaces the harness owns: a bridge namespace with `br0`,
//! the control-plane namespace and one namespace per node attached to it by veth pairs, a `cbr0`
//! bridge per node for its pods, and routes between the nodes' pod CIDRs (the harness plays the CNI
//! plugin). Nothing is added to the host's own namespace.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::Result;
use crate::layout::{Layout, NodeLayout, is_harness_netns, pod_veth};
use crate::netns;

/// Prefix length of the node network in each family.
fn node_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 24 } else { 64 }
}

/// `addr add` for an address, without duplicate address detection for IPv6 (no waiting).
fn addr_add(ip: &IpAddr, prefix: u8, dev: &str) -> String {
    match ip {
        IpAddr::V4(_) => format!("addr add {ip}/{prefix} dev {dev}"),
        IpAddr::V6(_) => format!("addr add {ip}/{prefix} dev {dev} nodad"),
    }
}

/// `br0` with the node network's gateway addresses (forwarding stays off in this namespace).
fn bridge_commands(layout: &Layout) -> Vec<String> {
    let mut cmds = vec!["link add br0 type bridge".to_owned()];
    for ip in layout.gateway_ips() {
        cmds.push(addr_add(&ip, node_prefix(&ip), "br0"));
    }
    cmds.push("link set br0 up".into());
    cmds
}

/// Creates the bridge, control-plane and node namespaces and wires them up.
pub async fn create(layout: &Layout) -> Result<()> {
    let bridge = layout.bridge_netns();
    netns::add(&bridge).await?;
    netns::ip_batch(&bridge, &bridge_commands(layout)).await?;
    let ipv6_quiet = [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    netns::sysctl(&bridge, &ipv6_quiet).await?;

    // Control plane: one leg on the bridge, routes to every pod CIDR through its node.
    let cp = layout.cp_netns();
    attach_to_bridge(layout, &cp, "vcp").await?;
    let mut cmds = vec![];
    for ip in layout.cp_ips() {
        cmds.push(addr_add(&ip, node_prefix(&ip), "eth0"));
    }
    cmds.push("link set eth0 up".into());
    cmds.extend(pod_routes(layout, None));
    netns::ip_batch(&cp, &cmds).await?;

    for node in &layout.nodes {
        create_node(layout, node).await?;
    }
    Ok(())
}

async fn attach_to_bridge(layout: &Layout, ns: &str, bridge_leg: &str) -> Result<()> {
    netns::add(ns).await?;
    let bridge = layout.bridge_netns();
    netns::ip_batch(
        &bridge,
        &[
            format!("link add {bridge_leg} type veth peer name eth0 netns {ns}"),
            format!("link set {bridge_leg} master br0 up"),
        ],
    )
    .await
}

/// Routes to the pod CIDRs of every node except `except`, via that node's address.
fn pod_routes(layout: &Layout, except: Option<u8>) -> Vec<String> {
    layout
        .nodes
        .iter()
        .filter(|n| Some(n.index) != except)
        .flat_map(|n| {
            n.pod_cidrs.iter().filter_map(move |cidr| {
                let via = n
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == matches!(cidr, IpNet::V4(_)))?;
                Some(format!("route add {cidr} via {via}"))
            })
        })
        .collect()
}

async fn create_node(layout: &Layout, node: &NodeLayout) -> Result<()> {
    attach_to_bridge(layout, &node.netns, &format!("vn{}", node.index)).await?;
    netns::sysctl(
        &node.netns,
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ],
    )
    .await?;
    let mut cmds = vec![];
    for ip in &node.ips {
        cmds.push(addr_add(ip, node_prefix(ip), "eth0"));
    }
    cmds.push("link set eth0 up".into());
    cmds.push("link add cbr0 type bridge".into());
    for (gw, cidr) in node.gateways().iter().zip(&node.pod_cidrs) {
        cmds.push(addr_add(gw, cidr.prefix_len(), "cbr0"));
    }
    cmds.push("link set cbr0 up".into());
    cmds.extend(pod_routes(layout, Some(node.index)));
    for gw in layout.gateway_ips() {
        cmds.push(format!("route add default via {gw}"));
    }
    netns::ip_batch(&node.netns, &cmds).await
}

/// Gives a pod its own namespace behind its node's `cbr0`, with `ips` on its `eth0`.
pub async fn attach_pod(node: &NodeLayout, pod_ns: &str, pod_uid: &str, ips: &[IpAddr]) -> Result<()> {
    netns::add(pod_ns).await?;
    let veth = pod_veth(pod_uid);
    netns::ip_batch(
        &node.netns,
        &[
            format!("link add {veth} type veth peer name eth0 netns {pod_ns}"),
            format!("link set {veth} master cbr0 up"),
        ],
    )
    .await?;
    netns::sysctl(
        pod_ns,
        &[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ],
    )
    .await?;
    let mut cmds = vec![];
    for (ip, cidr) in ips.iter().zip(&node.pod_cidrs) {
        cmds.push(addr_add(ip, cidr.prefix_len(), "eth0"));
    }
    cmds.push("link set eth0 up".into());
    for gw in node.gateways() {
        cmds.push(format!("route add default via {gw}"));
    }
    netns::ip_batch(pod_ns, &cmds).await
}

/// Removes a pod's namespace (its veth pair goes with it).
pub fn detach_pod(pod_ns: &str) -> Result<()> {
    netns::delete_sync(pod_ns)
}

/// Deletes every namespace of the cluster (pods, nodes, control plane, bridge).
pub fn delete(layout: &Layout) -> Result<()> {
    let mut first_error = None;
    let ours = netns::list(&layout.netns_prefix())
        .into_iter()
        .filter(|ns| is_harness_netns(ns, Some(&layout.name)));
    for ns in ours {
        if let Err(e) = netns::delete_sync(&ns) {
            tracing::warn!(netns = ns, error = %e, "deleting namespace");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn nodes_route_to_other_nodes_pod_cidrs_through_their_node_ip() {
        let layout = Layout::new("dev", Path::new("/tmp"), 3, true);
        let routes = pod_routes(&layout, Some(2));
        assert_eq!(
            routes,
            vec![
                "route add 10.244.1.0/24 via 172.31.0.11",
                "route add fd00:10:244:1::/64 via fd00:172:31::11",
                "route add 10.244.3.0/24 via 172.31.0.13",
                "route add fd00:10:244:3::/64 via fd00:172:31::13",
            ]
        );
        assert_eq!(pod_routes(&layout, None).len(), 6);
    }
}
