//! Builds the per-family [`ProxyState`] from Services, EndpointSlices and what the node knows about itself.
//!
//! A malformed object (bad IP, port or protocol) is skipped as a whole and reported in [`BuildReport`];
//! it never stops the build or affects another service.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort as ApiServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::endpoints::categorize;
use super::{Endpoint, IpFamily, NodeInfo, Protocol, ProxyState, ServicePort, ServicePortName};

/// Label naming the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label upstream sets on headless services; kube-proxy ignores them.
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Default ClientIP affinity timeout (3 hours), as the API defaults it.
const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

/// An object left out of the model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub object: String,
    /// Short stable reason for metrics (`invalid_ip`, `invalid_port`, `invalid_protocol`, `invalid_cidr`).
    pub reason: &'static str,
    /// Human-readable detail for the log line.
    pub detail: String,
}

/// What the build left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Malformed objects that were skipped.
    pub skipped: Vec<Skipped>,
}

/// The model of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// IPv4 state.
    pub v4: ProxyState,
    /// IPv6 state.
    pub v6: ProxyState,
}

impl Model {
    /// State of one family.
    pub fn family(&self, family: IpFamily) -> &ProxyState {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    fn family_mut(&mut self, family: IpFamily) -> &mut ProxyState {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

fn object_name(namespace: Option<&String>, name: Option<&String>) -> String {
    format!(
        "{}/{}",
        namespace.map_or("", String::as_str),
        name.map_or("", String::as_str)
    )
}

/// One endpoint of a slice before it is matched to a service port.
#[derive(Debug)]
struct SliceEndpoint {
    ip: IpAddr,
    is_local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

#[derive(Debug)]
struct ParsedSlice {
    family: IpFamily,
    /// (port name, protocol, port number)
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

fn parse_slice(slice: &EndpointSlice, node: &NodeInfo) -> Result<Option<ParsedSlice>, Skipped> {
    let object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
    let skip = |reason, detail: String| Skipped {
        kind: "EndpointSlice",
        object: object.clone(),
        reason,
        detail,
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        // FQDN slices are not proxied.
        _ => return Ok(None),
    };
    let mut ports = vec![];
    for port in slice.ports.iter().flatten() {
        let protocol = Protocol::from_api(port.protocol.as_deref())
            .ok_or_else(|| skip("invalid_protocol", format!("port protocol {:?}", port.protocol)))?;
        let Some(number) = port.port else { continue };
        let number = u16::try_from(number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| skip("invalid_port", format!("port {number}")))?;
        ports.push((port.name.clone().unwrap_or_default(), protocol, number));
    }
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for ep in &slice.endpoints {
        // Upstream uses the first address only; the API requires exactly one in practice.
        let Some(address) = ep.addresses.first() else {
            continue;
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| skip("invalid_ip", format!("endpoint address {address:?}")))?;
        if !family.contains(&ip) {
            return Err(skip(
                "invalid_ip",
                format!("endpoint address {address} in a {family} slice"),
            ));
        }
        let conditions = ep.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let hints = ep.hints.as_ref();
        endpoints.push(SliceEndpoint {
            ip,
            is_local: ep.node_name.as_deref() == Some(node.name.as_str()) && !node.name.is_empty(),
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
    }
    Ok(Some(ParsedSlice {
        family,
        ports,
        endpoints,
    }))
}

/// The parts of a Service shared by all its ports, parsed and checked.
#[derive(Debug)]
struct ParsedService {
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    source_ranges: Vec<IpNet>,
    affinity: Option<u32>,
    external_local: bool,
    internal_local: bool,
    health_check_node_port: Option<u16>,
    node_ports_allowed: bool,
    /// (name, protocol, port, node port)
    ports: Vec<(String, Protocol, u16, Option<u16>)>,
}

fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// `Ok(None)`: not something this proxy handles (ExternalName, headless, another proxy's, no cluster IP yet).
fn parse_service(svc: &Service, proxy_name: Option<&str>) -> Result<Option<ParsedService>, Skipped> {
    let object = object_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
    let skip = |reason, detail: String| Skipped {
        kind: "Service",
        object: object.clone(),
        reason,
        detail,
    };
    let labels = svc.metadata.labels.as_ref();
    if let Some(owner) = labels.and_then(|l| l.get(switchyard_api::SERVICE_PROXY_NAME_LABEL))
        && Some(owner.as_str()) != proxy_name
    {
        return Ok(None);
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok(None);
    }
    let raw_ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().collect(),
        (_, Some(ip)) => vec![ip],
        _ => vec![],
    };
    if raw_ips.is_empty() || raw_ips.iter().any(|ip| ip.is_empty() || ip.as_str() == "None") {
        return Ok(None);
    }
    let parse_ip = |text: &String, what: &str| -> Result<IpAddr, Skipped> {
        text.trim()
            .parse()
            .map_err(|_| skip("invalid_ip", format!("{what} {text:?}")))
    };
    let cluster_ips = raw_ips
        .into_iter()
        .map(|ip| parse_ip(ip, "clusterIP"))
        .collect::<Result<Vec<_>, _>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| parse_ip(ip, "externalIP"))
        .collect::<Result<Vec<_>, _>>()?;

    let is_load_balancer = service_type == "LoadBalancer";
    let mut load_balancer_ips = vec![];
    if is_load_balancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer delivers to the node with its own address, not the VIP.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &entry.ip {
                load_balancer_ips.push(parse_ip(ip, "load balancer ingress IP")?);
            }
        }
    }
    let source_ranges = if is_load_balancer {
        spec.load_balancer_source_ranges
            .iter()
            .flatten()
            .map(|r| {
                r.trim()
                    .parse::<IpNet>()
                    .map_err(|_| skip("invalid_cidr", format!("loadBalancerSourceRange {r:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![]
    };

    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_SECONDS)
    });

    let node_ports_allowed = matches!(service_type, "NodePort" | "LoadBalancer");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if is_load_balancer && external_local {
        spec.health_check_node_port.and_then(port_number)
    } else {
        None
    };

    let mut ports = vec![];
    for port in spec.ports.iter().flatten() {
        ports.push(parse_port(port).map_err(|(reason, detail)| skip(reason, detail))?);
    }
    Ok(Some(ParsedService {
        cluster_ips,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity,
        external_local,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
        node_ports_allowed,
        ports,
    }))
}

type PortParse = Result<(String, Protocol, u16, Option<u16>), (&'static str, String)>;

fn parse_port(port: &ApiServicePort) -> PortParse {
    let protocol = Protocol::from_api(port.protocol.as_deref())
        .ok_or(("invalid_protocol", format!("port protocol {:?}", port.protocol)))?;
    let number = port_number(port.port).ok_or(("invalid_port", format!("port {}", port.port)))?;
    let node_port = match port.node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(n).ok_or(("invalid_port", format!("nodePort {n}")))?),
    };
    Ok((port.name.clone().unwrap_or_default(), protocol, number, node_port))
}

/// Builds the model of both families. `proxy_name` is the `service.kubernetes.io/service-proxy-name` this
/// agent serves (services labelled for another proxy are left out).
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    proxy_name: Option<&str>,
) -> (Model, BuildReport) {
    let mut report = BuildReport::default();

    // Slices grouped by their service, parsed once.
    let mut slices_by_service: HashMap<(&str, &str), Vec<ParsedSlice>> = HashMap::new();
    for slice in slices {
        let (Some(namespace), Some(service)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str),
        ) else {
            continue;
        };
        match parse_slice(slice, node) {
            Ok(Some(parsed)) => slices_by_service
                .entry((namespace, service))
                .or_default()
                .push(parsed),
            Ok(None) => {}
            Err(skipped) => report.skipped.push(skipped),
        }
    }

    let mut model = Model {
        v4: ProxyState::empty(IpFamily::V4),
        v6: ProxyState::empty(IpFamily::V6),
    };
    for svc in services {
        let parsed = match parse_service(svc, proxy_name) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => continue,
            Err(skipped) => {
                report.skipped.push(skipped);
                continue;
            }
        };
        let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let slices = slices_by_service
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for family in IpFamily::ALL {
            let Some(cluster_ip) = parsed.cluster_ips.iter().copied().find(|ip| family.contains(ip)) else {
                continue;
            };
            for (port_name, protocol, port, node_port) in &parsed.ports {
                let mut service_port = ServicePort {
                    name: ServicePortName {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        port: port_name.clone(),
                        protocol: *protocol,
                    },
                    cluster_ip,
                    port: *port,
                    protocol: *protocol,
                    node_port: node_port.filter(|_| parsed.node_ports_allowed),
                    external_ips: parsed
                        .external_ips
                        .iter()
                        .copied()
                        .filter(|ip| family.contains(ip))
                        .collect(),
                    load_balancer_ips: parsed
                        .load_balancer_ips
                        .iter()
                        .copied()
                        .filter(|ip| family.contains(ip))
                        .collect(),
                    load_balancer_source_ranges: parsed
                        .source_ranges
                        .iter()
                        .copied()
                        .filter(|r| family.contains(&r.addr()))
                        .collect(),
                    session_affinity_seconds: parsed.affinity,
                    external_policy_local: parsed.external_local,
                    internal_policy_local: parsed.internal_local,
                    health_check_node_port: parsed.health_check_node_port,
                    cluster_endpoints: vec![],
                    local_endpoints: vec![],
                    has_any_endpoints: false,
                };
                let endpoints = endpoints_for(slices, family, port_name, *protocol);
                let categorized = categorize(
                    &endpoints,
                    node,
                    service_port.uses_cluster_endpoints(),
                    service_port.uses_local_endpoints(),
                );
                service_port.cluster_endpoints = categorized.cluster;
                service_port.local_endpoints = categorized.local;
                service_port.has_any_endpoints = categorized.has_any;
                model
                    .family_mut(family)
                    .services
                    .insert(service_port.name.clone(), service_port);
            }
        }
    }
    (model, report)
}

/// Endpoints of one service port: slices of the family whose port matches by name and protocol,
/// deduplicated by address and port (an endpoint may briefly appear in two slices), sorted.
fn endpoints_for(
    slices: &[ParsedSlice],
    family: IpFamily,
    port_name: &str,
    protocol: Protocol,
) -> Vec<Endpoint> {
    let mut seen = HashSet::new();
    let mut out = vec![];
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some((_, _, port)) = slice
            .ports
            .iter()
            .find(|(n, p, _)| n == port_name && *p == protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if !seen.insert((ep.ip, *port)) {
                continue;
            }
            out.push(Endpoint {
                ip: ep.ip,
                port: *port,
                is_local: ep.is_local,
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                zone_hints: ep.zone_hints.clone(),
                node_hints: ep.node_hints.clone(),
            });
        }
    }
    out.sort();
    out
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
