//! Which endpoints a service port uses on this node: readiness, the serving-terminating fallback
//! (KEP-1669), topology hints (zones and nodes), and the Local traffic policies. Same semantics as
//! upstream kube-proxy's endpoint categorisation.

use super::{Endpoint, NodeInfo};

/// Result of [`categorize`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints for Cluster-policy traffic (empty when nothing uses Cluster policy).
    pub cluster: Vec<Endpoint>,
    /// Local endpoints for Local-policy traffic (empty when nothing uses Local policy).
    pub local: Vec<Endpoint>,
    /// Some ready or serving-terminating endpoint exists anywhere.
    pub has_any: bool,
}

/// Topology filter in force for a service on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint is a candidate.
    Any,
    /// Only endpoints hinted for this node (trafficDistribution PreferSameNode).
    SameNode,
    /// Only endpoints hinted for this node's zone (PreferSameZone, PreferClose, topology-mode Auto).
    SameZone,
}

/// Hints are honoured only when every ready endpoint carries them and at least one names us; otherwise
/// they are ignored altogether, so a half-hinted slice never blackholes traffic.
fn topology(endpoints: &[Endpoint], node: &NodeInfo) -> Topology {
    let ready = || endpoints.iter().filter(|e| e.ready);
    let all_node_hints = ready().all(|e| !e.node_hints.is_empty());
    let for_node = ready().any(|e| e.node_hints.contains(&node.name));
    if all_node_hints && for_node {
        return Topology::SameNode;
    }
    let all_zone_hints = ready().all(|e| !e.zone_hints.is_empty());
    let for_zone = node
        .zone
        .as_ref()
        .is_some_and(|z| ready().any(|e| e.zone_hints.contains(z)));
    if all_zone_hints && for_zone {
        return Topology::SameZone;
    }
    Topology::Any
}

fn allowed(endpoint: &Endpoint, topology: Topology, node: &NodeInfo) -> bool {
    match topology {
        Topology::Any => true,
        Topology::SameNode => endpoint.node_hints.contains(&node.name),
        Topology::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| endpoint.zone_hints.contains(z)),
    }
}

fn serving_terminating(e: &Endpoint) -> bool {
    e.serving && e.terminating
}

/// Splits `endpoints` into what Cluster- and Local-policy traffic use.
pub fn categorize(
    endpoints: &[Endpoint],
    node: &NodeInfo,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized {
    let mut out = Categorized {
        has_any: endpoints.iter().any(|e| e.ready || serving_terminating(e)),
        ..Categorized::default()
    };

    if uses_cluster {
        let topo = topology(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|e| e.ready && allowed(e, topo, node))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            // No ready endpoint anywhere (hints are ignored when none is ready for us): fall back to
            // endpoints that are terminating but still serving, so connections drain instead of failing.
            out.cluster = endpoints
                .iter()
                .filter(|e| serving_terminating(e) && allowed(e, topo, node))
                .cloned()
                .collect();
        }
    }

    if uses_local {
        let local = || endpoints.iter().filter(|e| e.is_local);
        out.local = if local().any(|e| e.ready) {
            local().filter(|e| e.ready).cloned().collect()
        } else {
            local().filter(|e| serving_terminating(e)).cloned().collect()
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            ip: format!("10.0.0.{last}").parse().unwrap(),
            port: 80,
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }
    fn local(mut e: Endpoint) -> Endpoint {
        e.is_local = true;
        e
    }
    fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
        e.ready = false;
        e.serving = serving;
        e.terminating = true;
        e
    }
    fn zones(mut e: Endpoint, z: &[&str]) -> Endpoint {
        e.zone_hints = z.iter().map(|s| s.to_string()).collect();
        e
    }
    fn nodes(mut e: Endpoint, n: &[&str]) -> Endpoint {
        e.node_hints = n.iter().map(|s| s.to_string()).collect();
        e
    }
    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            zone: Some("zone-a".into()),
            ..Default::default()
        }
    }
    fn last_octets(eps: &[Endpoint]) -> Vec<u8> {
        eps.iter()
            .map(|e| match e.ip {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            })
            .collect()
    }

    struct Case {
        name: &'static str,
        endpoints: Vec<Endpoint>,
        uses_cluster: bool,
        uses_local: bool,
        cluster: Vec<u8>,
        local: Vec<u8>,
        has_any: bool,
    }

    #[test]
    fn categorize_follows_upstream_semantics() {
        let cases = vec![
            Case {
                name: "ready endpoints are all used",
                endpoints: vec![ep(1), ep(2), local(ep(3))],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1, 2, 3],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "terminating endpoints are ignored while a ready one exists",
                endpoints: vec![ep(1), terminating(ep(2), true)],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "serving terminating endpoints are used when none is ready",
                endpoints: vec![terminating(ep(1), true), terminating(ep(2), false)],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "not serving terminating endpoints leave nothing",
                endpoints: vec![terminating(ep(1), false)],
                uses_cluster: true,
                uses_local: true,
                cluster: vec![],
                local: vec![],
                has_any: false,
            },
            Case {
                name: "not ready and not terminating is unusable",
                endpoints: vec![Endpoint {
                    ready: false,
                    serving: false,
                    ..ep(1)
                }],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![],
                local: vec![],
                has_any: false,
            },
            Case {
                name: "local policy uses only local ready endpoints",
                endpoints: vec![ep(1), local(ep(2)), local(terminating(ep(3), true))],
                uses_cluster: false,
                uses_local: true,
                cluster: vec![],
                local: vec![2],
                has_any: true,
            },
            Case {
                name: "local policy falls back to local serving terminating endpoints",
                endpoints: vec![ep(1), local(terminating(ep(2), true))],
                uses_cluster: false,
                uses_local: true,
                cluster: vec![],
                local: vec![2],
                has_any: true,
            },
            Case {
                name: "local policy with no local endpoints is empty but endpoints exist",
                endpoints: vec![ep(1), ep(2)],
                uses_cluster: false,
                uses_local: true,
                cluster: vec![],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "both policies computed for ETP Local with ITP Cluster",
                endpoints: vec![ep(1), local(ep(2))],
                uses_cluster: true,
                uses_local: true,
                cluster: vec![1, 2],
                local: vec![2],
                has_any: true,
            },
            Case {
                name: "zone hints keep endpoints of this zone",
                endpoints: vec![
                    zones(ep(1), &["zone-a"]),
                    zones(ep(2), &["zone-b"]),
                    zones(ep(3), &["zone-a"]),
                ],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1, 3],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "zone hints are ignored when one ready endpoint has none",
                endpoints: vec![zones(ep(1), &["zone-a"]), ep(2)],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "zone hints are ignored when none names this zone",
                endpoints: vec![zones(ep(1), &["zone-b"]), zones(ep(2), &["zone-c"])],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1, 2],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "node hints keep endpoints for this node",
                endpoints: vec![
                    nodes(zones(local(ep(1)), &["zone-a"]), &["node-a"]),
                    nodes(zones(ep(2), &["zone-a"]), &["node-b"]),
                ],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "node hints not naming this node fall back to zone hints",
                endpoints: vec![
                    nodes(zones(ep(1), &["zone-a"]), &["node-b"]),
                    nodes(zones(ep(2), &["zone-b"]), &["node-c"]),
                ],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
            Case {
                name: "hints on not-ready endpoints do not count",
                endpoints: vec![
                    zones(ep(1), &["zone-b"]),
                    Endpoint {
                        ready: false,
                        serving: false,
                        ..ep(2)
                    },
                ],
                uses_cluster: true,
                uses_local: false,
                cluster: vec![1],
                local: vec![],
                has_any: true,
            },
        ];
        for c in cases {
            let got = categorize(&c.endpoints, &node(), c.uses_cluster, c.uses_local);
            assert_eq!(last_octets(&got.cluster), c.cluster, "{}: cluster", c.name);
            assert_eq!(last_octets(&got.local), c.local, "{}: local", c.name);
            assert_eq!(got.has_any, c.has_any, "{}: has_any", c.name);
        }
    }

    #[test]
    fn zone_hints_are_ignored_on_a_node_without_a_zone_label() {
        let eps = vec![zones(ep(1), &["zone-a"]), zones(ep(2), &["zone-b"])];
        let node = NodeInfo {
            name: "node-a".into(),
            ..Default::default()
        };
        let got = categorize(&eps, &node, true, false);
        assert_eq!(last_octets(&got.cluster), vec![1, 2]);
    }
}
