//! Connection tracking: stale UDP flows and the conntrack sysctls.
//!
//! UDP has no connection teardown, so a conntrack entry NATed to an endpoint that went away keeps sending
//! a client's packets into the void until it times out. After each successful sync the agent deletes the
//! entries that point at endpoints no longer used by a service, and the entries created for a service
//! while it had no endpoints. Only UDP flows to service addresses are touched.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use switchyard_api::effective::ConntrackConfig;

use crate::model::{Endpoint, IpFamily, Protocol, ProxyState, ServicePort};

/// Which conntrack entries to delete (fields that are `None` match anything).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowFilter {
    /// Family of the entries.
    pub family: IpFamily,
    /// Original destination (the service address).
    pub orig_dst: Option<IpAddr>,
    /// Original destination port (service port or NodePort).
    pub orig_dport: u16,
    /// Reply source (the endpoint the flow was DNATed to).
    pub reply_src: Option<IpAddr>,
    /// Reply source port (the endpoint's port).
    pub reply_sport: Option<u16>,
}

/// Errors of the conntrack tool.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The binary could not be started.
    #[error("cannot run {binary}: {source}")]
    Spawn {
        /// Binary path.
        binary: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The tool failed.
    #[error("conntrack failed: {0}")]
    Failed(String),
}

/// Deletes conntrack entries. A trait so the sync logic is testable without root.
pub trait Conntrack: Send + Sync {
    /// Deletes the UDP entries matching `filter`; returns how many were deleted.
    fn delete_udp(&self, filter: &FlowFilter) -> Result<u64, ConntrackError>;
}

/// [`Conntrack`] through the `conntrack` command of conntrack-tools.
#[derive(Clone, Debug)]
pub struct ConntrackTool {
    binary: PathBuf,
    prefix: Vec<String>,
}

impl Default for ConntrackTool {
    fn default() -> Self {
        Self::new("conntrack")
    }
}

impl ConntrackTool {
    /// Uses the given binary.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            prefix: vec![],
        }
    }

    /// Runs the binary through a prefix command, e.g. `ip netns exec <ns>` in tests.
    pub fn with_prefix(mut self, prefix: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.prefix = prefix.into_iter().map(Into::into).collect();
        self
    }
}

fn args_for(filter: &FlowFilter) -> Vec<String> {
    let family = match filter.family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    let mut args: Vec<String> = vec!["-D".into(), "-f".into(), family.into(), "-p".into(), "udp".into()];
    if let Some(dst) = filter.orig_dst {
        args.extend(["--orig-dst".into(), dst.to_string()]);
    }
    args.extend(["--orig-port-dst".into(), filter.orig_dport.to_string()]);
    if let Some(src) = filter.reply_src {
        args.extend(["--reply-src".into(), src.to_string()]);
    }
    if let Some(port) = filter.reply_sport {
        args.extend(["--reply-port-src".into(), port.to_string()]);
    }
    args
}

impl Conntrack for ConntrackTool {
    fn delete_udp(&self, filter: &FlowFilter) -> Result<u64, ConntrackError> {
        let mut command = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        let output = command
            .args(args_for(filter))
            .output()
            .map_err(|source| ConntrackError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        // conntrack prints "N flow entries have been deleted." on stderr, and exits 1 when N is 0.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let deleted = stderr
            .lines()
            .find(|l| l.contains("flow entries have been deleted"))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()));
        match deleted {
            Some(n) => Ok(n),
            None if output.status.success() => Ok(0),
            None => Err(ConntrackError::Failed(stderr.trim().to_owned())),
        }
    }
}

fn service_addresses(svc: &ServicePort) -> impl Iterator<Item = IpAddr> + '_ {
    std::iter::once(svc.cluster_ip)
        .chain(svc.external_ips.iter().copied())
        .chain(svc.load_balancer_ips.iter().copied())
}

fn filters_to(svc: &ServicePort, family: IpFamily, endpoint: Option<&Endpoint>) -> Vec<FlowFilter> {
    let reply_src = endpoint.map(|e| e.ip);
    let reply_sport = endpoint.map(|e| e.port);
    let mut out: Vec<FlowFilter> = service_addresses(svc)
        .map(|vip| FlowFilter {
            family,
            orig_dst: Some(vip),
            orig_dport: svc.port,
            reply_src,
            reply_sport,
        })
        .collect();
    if let Some(node_port) = svc.node_port {
        out.push(FlowFilter {
            family,
            orig_dst: None,
            orig_dport: node_port,
            reply_src,
            reply_sport,
        });
    }
    out
}

/// The UDP flows made stale by going from `old` to `new` (pure).
pub fn stale_flows(old: &ProxyState, new: &ProxyState) -> Vec<FlowFilter> {
    let Some(family) = new.family.or(old.family) else {
        return vec![];
    };
    let mut out = vec![];
    for (name, before) in old.services.iter().filter(|(n, _)| n.protocol == Protocol::Udp) {
        let after = new.services.get(name);
        let still_used = |e: &Endpoint| {
            after.is_some_and(|a| a.all_endpoints().iter().any(|x| x.ip == e.ip && x.port == e.port))
        };
        for gone in before.all_endpoints().into_iter().filter(|e| !still_used(e)) {
            out.extend(filters_to(before, family, Some(gone)));
        }
    }
    for (name, after) in new.services.iter().filter(|(n, _)| n.protocol == Protocol::Udp) {
        let had_none = old
            .services
            .get(name)
            .is_none_or(|b| b.all_endpoints().is_empty());
        if had_none && !after.all_endpoints().is_empty() {
            // Packets sent while there was no endpoint left entries without NAT that would keep
            // swallowing the client's traffic.
            out.extend(filters_to(after, family, None));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The sysctls to write for `config` on a node with `cpus` cores: (path under /proc/sys, value).
pub fn sysctls(config: &ConntrackConfig, cpus: usize) -> Vec<(&'static str, String)> {
    let mut out = vec![];
    if config.max_per_core > 0 {
        let max = u64::from(config.max_per_core)
            .saturating_mul(cpus as u64)
            .max(u64::from(config.min));
        out.push(("net/netfilter/nf_conntrack_max", max.to_string()));
    }
    let secs = |d: kube::core::Duration| std::time::Duration::from(d).as_secs().to_string();
    if let Some(d) = config.tcp_established_timeout {
        out.push(("net/netfilter/nf_conntrack_tcp_timeout_established", secs(d)));
    }
    if let Some(d) = config.tcp_close_wait_timeout {
        out.push(("net/netfilter/nf_conntrack_tcp_timeout_close_wait", secs(d)));
    }
    if config.tcp_be_liberal {
        out.push(("net/netfilter/nf_conntrack_tcp_be_liberal", "1".into()));
    }
    if let Some(d) = config.udp_timeout {
        out.push(("net/netfilter/nf_conntrack_udp_timeout", secs(d)));
    }
    if let Some(d) = config.udp_stream_timeout {
        out.push(("net/netfilter/nf_conntrack_udp_timeout_stream", secs(d)));
    }
    out
}

/// Writes the conntrack sysctls, skipping values that are already set. Failures (for example
/// nf_conntrack_max outside the initial network namespace) are logged, not fatal, as upstream.
pub fn apply_sysctls(config: &ConntrackConfig) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for (path, value) in sysctls(config, cpus) {
        let full = format!("/proc/sys/{path}");
        let current = std::fs::read_to_string(&full).unwrap_or_default();
        if current.trim() == value {
            continue;
        }
        match std::fs::write(&full, &value) {
            Ok(()) => tracing::info!(sysctl = path, value, "set conntrack sysctl"),
            Err(error) => tracing::warn!(sysctl = path, value, %error, "cannot set conntrack sysctl"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::ServicePortName;

    fn ep(ip: &str) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 5353,
            is_local: false,
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn dns(endpoints: Vec<Endpoint>, protocol: Protocol) -> ServicePort {
        ServicePort {
            name: ServicePortName {
                namespace: "ns".into(),
                name: "dns".into(),
                port: String::new(),
                protocol,
            },
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 53,
            protocol,
            node_port: Some(30053),
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            session_affinity_seconds: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            has_any_endpoints: !endpoints.is_empty(),
            cluster_endpoints: endpoints,
            local_endpoints: vec![],
        }
    }

    fn state(ports: Vec<ServicePort>) -> ProxyState {
        ProxyState {
            family: Some(IpFamily::V4),
            services: ports
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn removed_udp_endpoint_flows_are_deleted_for_vip_and_node_port() {
        let old = state(vec![dns(vec![ep("10.244.1.1"), ep("10.244.2.2")], Protocol::Udp)]);
        let new = state(vec![dns(vec![ep("10.244.1.1")], Protocol::Udp)]);
        let flows = stale_flows(&old, &new);
        let gone: IpAddr = "10.244.2.2".parse().unwrap();
        assert_eq!(flows.len(), 2, "{flows:?}");
        assert!(
            flows
                .iter()
                .all(|f| f.reply_src == Some(gone) && f.reply_sport == Some(5353))
        );
        assert!(
            flows
                .iter()
                .any(|f| f.orig_dst == Some("10.96.0.10".parse().unwrap()) && f.orig_dport == 53)
        );
        assert!(
            flows
                .iter()
                .any(|f| f.orig_dst.is_none() && f.orig_dport == 30053)
        );
    }

    #[test]
    fn deleted_udp_service_flows_are_deleted() {
        let old = state(vec![dns(vec![ep("10.244.1.1")], Protocol::Udp)]);
        assert_eq!(stale_flows(&old, &ProxyState::empty(IpFamily::V4)).len(), 2);
    }

    #[test]
    fn udp_service_getting_its_first_endpoint_clears_flows_to_it() {
        let old = state(vec![dns(vec![], Protocol::Udp)]);
        let new = state(vec![dns(vec![ep("10.244.1.1")], Protocol::Udp)]);
        let flows = stale_flows(&old, &new);
        assert_eq!(flows.len(), 2);
        assert!(flows.iter().all(|f| f.reply_src.is_none()));
    }

    #[test]
    fn tcp_services_and_unchanged_udp_services_leave_conntrack_alone() {
        let old = state(vec![dns(vec![ep("10.244.1.1"), ep("10.244.2.2")], Protocol::Tcp)]);
        let new = state(vec![dns(vec![ep("10.244.1.1")], Protocol::Tcp)]);
        assert!(stale_flows(&old, &new).is_empty());
        let same = state(vec![dns(vec![ep("10.244.1.1")], Protocol::Udp)]);
        assert!(stale_flows(&same, &same).is_empty());
    }

    #[test]
    fn conntrack_arguments_name_every_filter_field() {
        let filter = FlowFilter {
            family: IpFamily::V6,
            orig_dst: Some("fd00::10".parse().unwrap()),
            orig_dport: 53,
            reply_src: Some("fd00:244::1".parse().unwrap()),
            reply_sport: Some(5353),
        };
        assert_eq!(
            args_for(&filter).join(" "),
            "-D -f ipv6 -p udp --orig-dst fd00::10 --orig-port-dst 53 --reply-src fd00:244::1 --reply-port-src 5353"
        );
    }

    #[test]
    fn sysctls_follow_the_config() {
        let config = ConntrackConfig {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: Some(std::time::Duration::from_secs(86400).into()),
            tcp_close_wait_timeout: None,
            tcp_be_liberal: true,
            udp_timeout: None,
            udp_stream_timeout: Some(std::time::Duration::from_secs(120).into()),
        };
        let got = sysctls(&config, 2);
        assert_eq!(
            got,
            vec![
                ("net/netfilter/nf_conntrack_max", "131072".to_owned()),
                (
                    "net/netfilter/nf_conntrack_tcp_timeout_established",
                    "86400".to_owned()
                ),
                ("net/netfilter/nf_conntrack_tcp_be_liberal", "1".to_owned()),
                ("net/netfilter/nf_conntrack_udp_timeout_stream", "120".to_owned()),
            ]
        );
        assert_eq!(sysctls(&config, 8)[0].1, "262144");
    }
}
