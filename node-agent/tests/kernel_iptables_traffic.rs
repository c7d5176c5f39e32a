//! Real-kernel, real-traffic tests of the whole iptables pipeline: Services, EndpointSlices and the Node
//! built as the API server would serve them, the agent's model, renderer, executor (`iptables-nft-restore`
//! run inside the node's namespace), conntrack clean-up and the kernel, with TCP and UDP traffic between
//! network namespaces (see `support::cluster` for the topology). Only the API server is replaced.
//!
//! They need root; without it they print why they skip (CI runs them as root). Everything they create
//! lives in namespaces deleted on drop, also when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use support::cluster::Cluster;
use support::flow::request_from_port;
use support::{ConnectError, EchoServer, NetNs, Pod, Proto, Reply, request};
use switchyard_agent::conntrack::ConntrackTool;
use switchyard_agent::iptables::backend::IptablesBackend;
use switchyard_agent::iptables::exec::{
    Backend, BackendChoice, ExecError, Iptables, IptablesRestore, JumpChanges, JumpRule, Table, Tools,
};
use switchyard_agent::leftovers;
use switchyard_agent::metrics::{Metrics, SkippedLabels};
use switchyard_agent::model::IpFamily;
use switchyard_agent::server::Health;
use switchyard_agent::sync::{BackendError, Proxier, SyncOutcome};
use switchyard_api::proxyconfig::ProxyMode;
use switchyard_api::{AgentConfig, ProxyConfigSpec};

/// Name of the node under test (endpoints with it are local).
const NODE_NAME: &str = "node-a";
/// Name of the other node.
const REMOTE_NAME: &str = "node-b";
/// Where the pods' TCP echo servers listen (service port `http`, 80).
const TCP_TARGET: u16 = 8080;
/// Where the pods' UDP echo servers listen (service port `dns`, 53).
const UDP_TARGET: u16 = 5353;
/// Limit for a request that must be answered: generous, an answer comes in milliseconds.
const ANSWER: Duration = Duration::from_secs(3);
/// Limit for a request that must be refused: an IPv6 TCP refusal may only show at the SYN
/// retransmission one second later (see `support::request`).
const REFUSAL: Duration = Duration::from_secs(3);
/// Limit for a request that must get no answer at all.
const SILENCE: Duration = Duration::from_millis(800);
/// Upper bound of requests sent to see every endpoint of a service answer. With three endpoints the
/// chance that one of them is never picked in 60 random choices is below 1e-9.
const SPREAD_LIMIT: usize = 60;

// ---------------------------------------------------------------------------------------------------
// Objects, as the API server would serve them.

fn short(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

/// Cluster IP number `n` of a family: 10.96.0.n or fd00:96::n.
fn vip(n: u8, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => format!("10.96.0.{n}"),
        IpFamily::V6 => format!("fd00:96::{n}"),
    }
    .parse()
    .unwrap()
}

/// Service port of a protocol: `http` 80/TCP, `dns` 53/UDP.
fn service_port(proto: Proto) -> u16 {
    match proto {
        Proto::Tcp => 80,
        Proto::Udp => 53,
    }
}

/// The cluster IP and port of service `n`.
fn cluster_addr(n: u8, family: IpFamily, proto: Proto) -> SocketAddr {
    SocketAddr::new(vip(n, family), service_port(proto))
}

/// NodePort of service `n` (both protocols use the same number).
fn node_port(n: u8) -> u16 {
    30000 + u16::from(n)
}

/// The node's InternalIP and the NodePort of service `n`.
fn node_port_addr(n: u8, family: IpFamily) -> SocketAddr {
    SocketAddr::new(Cluster::node_ip_like(vip(n, family)), node_port(n))
}

/// Shallow merge of `extra`'s keys into the object `base`.
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

/// Service type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    NodePort,
}

/// A dual-stack Service `default/<name>` with cluster IPs number `n`, ports `http` (80/TCP -> 8080) and
/// `dns` (53/UDP -> 5353), NodePorts 30000+n when `kind` is NodePort; `extra` is merged into its spec.
fn service(name: &str, n: u8, kind: Kind, extra: Value) -> Arc<Service> {
    let mut http = json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": TCP_TARGET});
    let mut dns = json!({"name": "dns", "protocol": "UDP", "port": 53, "targetPort": UDP_TARGET});
    if kind == Kind::NodePort {
        http = merged(http, json!({"nodePort": node_port(n)}));
        dns = merged(dns, json!({"nodePort": node_port(n)}));
    }
    let (v4, v6) = (vip(n, IpFamily::V4).to_string(), vip(n, IpFamily::V6).to_string());
    let spec = merged(
        json!({
            "type": if kind == Kind::NodePort { "NodePort" } else { "ClusterIP" },
            "clusterIP": v4,
            "clusterIPs": [v4, v6],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [http, dns],
        }),
        extra,
    );
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .unwrap(),
    )
}

/// An endpoint: a pod's name (what its echo servers answer), addresses and node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ep {
    name: String,
    v4: IpAddr,
    v6: IpAddr,
    node: &'static str,
}

impl Ep {
    fn ip(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.v4,
            IpFamily::V6 => self.v6,
        }
    }
}

fn endpoint(pod: &Pod, name: String, node: &'static str) -> Ep {
    Ep {
        name,
        v4: IpAddr::V4(pod.ipv4),
        v6: IpAddr::V6(pod.ipv6),
        node,
    }
}

/// Local pod `i` as an endpoint.
fn local(c: &Cluster, i: usize) -> Ep {
    endpoint(&c.pods[i], format!("pod{i}"), NODE_NAME)
}

/// Remote pod `i` as an endpoint.
fn remote(c: &Cluster, i: usize) -> Ep {
    endpoint(&c.remote_pods[i], format!("rpod{i}"), REMOTE_NAME)
}

/// One EndpointSlice of `service` and `family` named `name`, with the given endpoints (all ready) and
/// the ports `http` (TCP 8080) and `dns` (UDP 5353).
fn slice_named(service: &str, name: &str, family: IpFamily, endpoints: Vec<Value>) -> Arc<EndpointSlice> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": family.api_name(),
            "ports": [
                {"name": "http", "protocol": "TCP", "port": TCP_TARGET},
                {"name": "dns", "protocol": "UDP", "port": UDP_TARGET},
            ],
            "endpoints": endpoints,
        }))
        .unwrap(),
    )
}

fn endpoint_json(address: &str, node: &str) -> Value {
    json!({"addresses": [address], "conditions": {"ready": true}, "nodeName": node})
}

/// The IPv4 and IPv6 slices of `service` with `endpoints`.
fn slices(service: &str, endpoints: &[Ep]) -> Vec<Arc<EndpointSlice>> {
    IpFamily::ALL
        .into_iter()
        .map(|family| {
            let eps = endpoints
                .iter()
                .map(|e| endpoint_json(&e.ip(family).to_string(), e.node))
                .collect();
            slice_named(service, &format!("{service}-{}", short(family)), family, eps)
        })
        .collect()
}

/// The node under test as the API serves it: podCIDRs and InternalIPs of both families.
fn node_object() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME},
        "spec": {"podCIDR": Cluster::POD_CIDRS[0], "podCIDRs": Cluster::POD_CIDRS},
        "status": {"addresses": [
            {"type": "InternalIP", "address": Cluster::NODE_V4.to_string()},
            {"type": "InternalIP", "address": Cluster::NODE_V6.to_string()},
            {"type": "Hostname", "address": NODE_NAME},
        ]},
    }))
    .unwrap()
}

/// An agent configuration: iptables mode with the cluster's pod CIDRs, `extra` merged into the spec.
fn config(extra: Value) -> AgentConfig {
    let spec = merged(
        json!({"mode": "iptables", "clusterCIDRs": Cluster::CLUSTER_CIDRS}),
        extra,
    );
    let spec: ProxyConfigSpec = serde_json::from_value(spec).unwrap();
    AgentConfig::from_spec(&spec).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// The agent, programming the node's namespace.

/// The executor the agent uses, running `iptables-nft-*` inside `ns`.
fn executor(ns: &NetNs) -> IptablesRestore {
    let ipt = IptablesRestore::builder()
        .backend(BackendChoice::Force(Backend::Nft))
        .command_prefix(ns.exec_prefix())
        .build();
    assert!(
        ipt.available(),
        "iptables-nft binaries are installed (make setup-apt)"
    );
    ipt
}

/// A `Proxier` with the real iptables backend and conntrack tool, both run inside the node namespace.
struct Agent {
    proxier: Proxier,
    metrics: Arc<Metrics>,
    node: Node,
}

impl Agent {
    fn new(ns: &NetNs, config: AgentConfig) -> Self {
        Self::with_executor(ns, executor(ns), config)
    }

    fn with_executor<E: Iptables + 'static>(ns: &NetNs, exec: E, config: AgentConfig) -> Self {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let proxier = Proxier::new(
            Box::new(IptablesBackend::new(exec, config.clone())),
            Arc::new(ConntrackTool::new("conntrack").with_prefix(ns.exec_prefix())),
            metrics.clone(),
            Arc::new(Health::new(Duration::from_secs(30))),
            config,
            NODE_NAME.into(),
        );
        Self {
            proxier,
            metrics,
            node: node_object(),
        }
    }

    /// One sync as the sync loop runs it (`full` as the loop would ask).
    async fn try_sync(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        full: bool,
    ) -> Result<SyncOutcome, BackendError> {
        self.proxier.sync(services, slices, Some(&self.node), full).await
    }

    /// A sync that must succeed.
    async fn sync(&mut self, services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> SyncOutcome {
        self.try_sync(services, slices, false)
            .await
            .unwrap_or_else(|e| panic!("sync failed ({}): {e}", e.category))
    }
}

// ---------------------------------------------------------------------------------------------------
// Traffic.

/// TCP and UDP echo servers of both families on every pod of the cluster, answering with the pod's
/// name (`pod<i>`, `rpod<i>`). Stopped on drop.
fn serve_everywhere(c: &Cluster) -> Vec<EchoServer> {
    let named = c
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p, format!("pod{i}")))
        .chain(
            c.remote_pods
                .iter()
                .enumerate()
                .map(|(i, p)| (p, format!("rpod{i}"))),
        );
    let mut servers = vec![];
    for (pod, name) in named {
        for ip in [IpAddr::V4(pod.ipv4), IpAddr::V6(pod.ipv6)] {
            for (proto, port) in [(Proto::Tcp, TCP_TARGET), (Proto::Udp, UDP_TARGET)] {
                servers.push(EchoServer::start(&pod.ns, proto, SocketAddr::new(ip, port), &name).unwrap());
            }
        }
    }
    servers
}

/// One request that must be answered.
fn ask(from: &NetNs, proto: Proto, target: SocketAddr) -> Reply {
    request(from, proto, target, ANSWER)
        .unwrap_or_else(|e| panic!("{proto:?} {target} from {}: {e}", from.name()))
}

/// Sends requests until every server in `expected` answered (at most [`SPREAD_LIMIT`]); each must be
/// answered. Returns every server that answered.
fn spread(from: &NetNs, proto: Proto, target: SocketAddr, expected: &BTreeSet<String>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..SPREAD_LIMIT {
        seen.insert(ask(from, proto, target).server);
        if seen.is_superset(expected) {
            break;
        }
    }
    seen
}

fn names<const N: usize>(names: [&str; N]) -> BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

fn names_of(eps: &[Ep]) -> BTreeSet<String> {
    eps.iter().map(|e| e.name.clone()).collect()
}

// ---------------------------------------------------------------------------------------------------
// iptables-save of the node.

/// `iptables-nft-save -t <table>` of a family inside `ns`, without comment lines and counters.
fn save(ns: &NetNs, family: IpFamily, table: Table) -> String {
    let binary = Tools::standard(Backend::Nft, family).save;
    let out = ns
        .run(&[&binary.to_string_lossy(), "-t", table.as_str()])
        .unwrap();
    normalised(&out)
}

/// Save output without comment lines and counters, so two dumps of the same rules compare equal.
fn normalised(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            if line.starts_with(':') {
                line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// nat and filter of both families.
fn save_all(ns: &NetNs) -> String {
    let mut out = String::new();
    for family in IpFamily::ALL {
        for table in Table::ALL {
            out.push_str(&format!("## {family} {table}\n{}\n", save(ns, family, table)));
        }
    }
    out
}

/// What is not ours in [`save_all`]: every line that does not name one of our chains.
fn not_ours(all: &str) -> String {
    all.lines()
        .filter(|l| !l.contains("SWYD-"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Another tool's rules, added before the agent runs: a chain in nat reached from PREROUTING that DNATs
/// 10.99.0.1:80 (fd00:99::1) to pod 2, and a chain in filter reached from FORWARD that drops TCP to
/// port 9999.
fn add_foreign_rules(c: &Cluster) {
    for family in IpFamily::ALL {
        let bin = Tools::standard(Backend::Nft, family).iptables;
        let bin = bin.to_string_lossy();
        let (dst, to) = match family {
            IpFamily::V4 => ("10.99.0.1".to_owned(), format!("{}:{TCP_TARGET}", c.pods[2].ipv4)),
            IpFamily::V6 => (
                "fd00:99::1".to_owned(),
                format!("[{}]:{TCP_TARGET}", c.pods[2].ipv6),
            ),
        };
        let rules: [&[&str]; 6] = [
            &["-t", "nat", "-N", "FOREIGN-NAT"],
            &[
                "-t",
                "nat",
                "-A",
                "FOREIGN-NAT",
                "-d",
                &dst,
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ],
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "foreign tool",
                "-j",
                "FOREIGN-NAT",
            ],
            &["-t", "filter", "-N", "FOREIGN-FWD"],
            &[
                "-t",
                "filter",
                "-A",
                "FOREIGN-FWD",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "DROP",
            ],
            &["-t", "filter", "-A", "FORWARD", "-j", "FOREIGN-FWD"],
        ];
        for rule in rules {
            let mut argv = vec![&*bin, "-w"];
            argv.extend_from_slice(rule);
            c.node.run(&argv).unwrap();
        }
    }
}

/// The foreign rules work: the DNAT answers from pod 2, the DROP makes port 9999 silent (without it,
/// the pod would refuse the connection).
fn assert_foreign_rules_work(c: &Cluster, stage: &str) {
    for (family, dst) in [(IpFamily::V4, "10.99.0.1"), (IpFamily::V6, "fd00:99::1")] {
        let dst: IpAddr = dst.parse().unwrap();
        let reply = ask(&c.client, Proto::Tcp, SocketAddr::new(dst, 80));
        assert_eq!(reply.server, "pod2", "{stage}: foreign DNAT ({family})");
        let pod2 = c.pods[2].ip_like(dst);
        assert_eq!(
            request(&c.client, Proto::Tcp, SocketAddr::new(pod2, 9999), SILENCE),
            Err(ConnectError::Timeout),
            "{stage}: foreign DROP ({family})"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// An executor that fails when told to.

/// How [`Faulty`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Works.
    None,
    /// Every binary is missing (the executor points at paths that do not exist).
    MissingBinary,
    /// `iptables-restore` runs, and refuses its input: a bad line at the end of the nat section.
    RefusedInput,
}

/// The real executor, or one whose binaries are missing, or the real one fed a broken input.
#[derive(Debug)]
struct Faulty {
    good: IptablesRestore,
    missing: IptablesRestore,
    fault: Arc<Mutex<Fault>>,
}

impl Faulty {
    fn new(ns: &NetNs) -> (Self, Arc<Mutex<Fault>>) {
        let mut missing = IptablesRestore::builder()
            .backend(BackendChoice::Force(Backend::Nft))
            .command_prefix(ns.exec_prefix());
        for family in IpFamily::ALL {
            missing = missing.tools(
                Backend::Nft,
                family,
                Tools {
                    iptables: "/nonexistent/iptables".into(),
                    save: "/nonexistent/iptables-save".into(),
                    restore: "/nonexistent/iptables-restore".into(),
                },
            );
        }
        let fault = Arc::new(Mutex::new(Fault::None));
        let faulty = Self {
            good: executor(ns),
            missing: missing.build(),
            fault: fault.clone(),
        };
        (faulty, fault)
    }

    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }

    fn current(&self) -> &IptablesRestore {
        match self.fault() {
            Fault::MissingBinary => &self.missing,
            Fault::None | Fault::RefusedInput => &self.good,
        }
    }
}

impl Iptables for Faulty {
    fn restore(&self, family: IpFamily, input: &str) -> Result<(), ExecError> {
        if self.fault() == Fault::RefusedInput {
            let broken = input.replacen("COMMIT\n", "-A SWYD-SERVICES --bogus-option\nCOMMIT\n", 1);
            return self.good.restore(family, &broken);
        }
        self.current().restore(family, input)
    }

    fn save(&self, family: IpFamily, table: Table) -> Result<String, ExecError> {
        self.current().save(family, table)
    }

    fn ensure_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<JumpChanges, ExecError> {
        self.current().ensure_jumps(family, rules)
    }

    fn remove_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<usize, ExecError> {
        self.current().remove_jumps(family, rules)
    }

    fn chain_exists(&self, family: IpFamily, table: Table, chain: &str) -> Result<bool, ExecError> {
        self.current().chain_exists(family, table, chain)
    }
}

// ---------------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread")]
async fn cluster_ip_spreads_connections_over_every_endpoint_from_pods_and_the_host() {
    if !support::require_root("cluster_ip_spreads_connections_over_every_endpoint_from_pods_and_the_host") {
        return;
    }
    let c = Cluster::new("balance", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 1), local(&c, 2), remote(&c, 0)];
    let services = [service("web", 10, Kind::ClusterIp, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    let outcome = agent.sync(&services, &slices("web", &eps)).await;
    assert!(outcome.stats.full, "the first sync is full");
    assert_eq!(outcome.services, 4, "2 ports x 2 families");

    let expected = names_of(&eps);
    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let target = cluster_addr(10, family, proto);
            for (who, from) in [("pod0", &c.pods[0].ns), ("the host", &c.node)] {
                assert_eq!(
                    spread(from, proto, target, &expected),
                    expected,
                    "{proto:?} {target} from {who}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_from_outside_reaches_every_endpoint() {
    if !support::require_root("node_port_from_outside_reaches_every_endpoint") {
        return;
    }
    let c = Cluster::new("nodeport", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 0), local(&c, 1), remote(&c, 0)];
    let services = [service("web", 20, Kind::NodePort, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("web", &eps)).await;

    let expected = names_of(&eps);
    for family in IpFamily::ALL {
        let target = node_port_addr(20, family);
        for proto in [Proto::Tcp, Proto::Udp] {
            for (who, from) in [
                ("the client", &c.client),
                ("a local pod", &c.pods[2].ns),
                ("the host", &c.node),
            ] {
                assert_eq!(
                    spread(from, proto, target, &expected),
                    expected,
                    "{proto:?} NodePort {target} from {who}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_with_local_policy_keeps_the_client_ip_and_never_uses_remote_endpoints() {
    if !support::require_root(
        "node_port_with_local_policy_keeps_the_client_ip_and_never_uses_remote_endpoints",
    ) {
        return;
    }
    let c = Cluster::new("etplocal", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 0), local(&c, 1), remote(&c, 0)];
    let services = [service(
        "web",
        30,
        Kind::NodePort,
        json!({"externalTrafficPolicy": "Local"}),
    )];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("web", &eps)).await;

    let locals = names_of(&eps[..2]);
    for family in IpFamily::ALL {
        let target = node_port_addr(30, family);
        let client_ip = Cluster::client_ip_like(target.ip());
        for proto in [Proto::Tcp, Proto::Udp] {
            let mut seen = BTreeSet::new();
            for _ in 0..30 {
                let reply = ask(&c.client, proto, target);
                assert_eq!(
                    reply.peer.ip(),
                    client_ip,
                    "{proto:?} {target}: the client's address is preserved"
                );
                seen.insert(reply.server);
            }
            assert_eq!(
                seen, locals,
                "{proto:?} {target}: only, and every, local endpoint"
            );
        }
        // Traffic from inside the cluster keeps the Cluster policy and reaches the remote pod too.
        let expected = names_of(&eps);
        let target = cluster_addr(30, family, Proto::Tcp);
        assert_eq!(
            spread(&c.pods[2].ns, Proto::Tcp, target, &expected),
            expected,
            "cluster IP {target} from a pod"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_with_local_policy_drops_when_no_local_endpoints() {
    if !support::require_root("node_port_with_local_policy_drops_when_no_local_endpoints") {
        return;
    }
    let c = Cluster::new("etpdrop", 1, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let services = [service(
        "web",
        31,
        Kind::NodePort,
        json!({"externalTrafficPolicy": "Local"}),
    )];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("web", &[remote(&c, 0)])).await;

    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            // Dropped, not refused: a load balancer's health check steers clients to other nodes.
            let target = node_port_addr(31, family);
            assert_eq!(
                request(&c.client, proto, target, SILENCE),
                Err(ConnectError::Timeout),
                "{proto:?} NodePort {target} without a local endpoint"
            );
            // Pods still reach the remote endpoint through the cluster IP.
            let reply = ask(&c.pods[0].ns, proto, cluster_addr(31, family, proto));
            assert_eq!(reply.server, "rpod0");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_ip_affinity_keeps_every_request_of_a_client_on_one_pod() {
    if !support::require_root("client_ip_affinity_keeps_every_request_of_a_client_on_one_pod") {
        return;
    }
    let c = Cluster::new("affinity", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 1), local(&c, 2), remote(&c, 0)];
    let services = [service(
        "sticky",
        40,
        Kind::NodePort,
        json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
    )];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("sticky", &eps)).await;

    let all = names_of(&eps);
    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let targets = [
                ("pod0", &c.pods[0].ns, cluster_addr(40, family, proto)),
                ("the host", &c.node, cluster_addr(40, family, proto)),
                ("the client", &c.client, node_port_addr(40, family)),
            ];
            for (who, from, target) in targets {
                let servers: BTreeSet<String> = (0..20).map(|_| ask(from, proto, target).server).collect();
                assert_eq!(
                    servers.len(),
                    1,
                    "{proto:?} {target} from {who}: one pod for every request, got {servers:?}"
                );
                assert!(servers.is_subset(&all), "{servers:?}");
            }
        }
    }
}

/// The request was refused, not left to time out. A packet the host itself sends and the filter
/// OUTPUT chain REJECTs fails `send()` with EPERM at once (UDP; a TCP connect sees the ICMP error): that
/// is a refusal too.
fn refused_at_once(result: &Result<Reply, ConnectError>) -> bool {
    match result {
        Err(ConnectError::Refused) => true,
        Err(ConnectError::Other(message)) => message.contains("Operation not permitted"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn service_without_endpoints_refuses_connections_instead_of_timing_out() {
    if !support::require_root("service_without_endpoints_refuses_connections_instead_of_timing_out") {
        return;
    }
    let c = Cluster::new("reject", 2, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let services = [service("empty", 50, Kind::NodePort, json!({}))];
    // A slice without endpoints, as the EndpointSlice controller writes for a service selecting nothing.
    let empty: Vec<Arc<EndpointSlice>> = IpFamily::ALL
        .into_iter()
        .map(|f| slice_named("empty", &format!("empty-{}", short(f)), f, vec![]))
        .collect();
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &empty).await;

    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let targets = [
                ("pod0", &c.pods[0].ns, cluster_addr(50, family, proto)),
                ("the host", &c.node, cluster_addr(50, family, proto)),
                ("the client", &c.client, node_port_addr(50, family)),
            ];
            for (who, from, target) in targets {
                let result = request(from, proto, target, REFUSAL);
                assert!(
                    refused_at_once(&result),
                    "{proto:?} {target} from {who}: {result:?}"
                );
            }
        }
    }

    // A UDP client that kept sending while there was no endpoint is answered once there is one.
    let flows: Vec<(IpFamily, SocketAddr, u16)> = IpFamily::ALL
        .into_iter()
        .zip([41000, 41001])
        .map(|(f, port)| (f, cluster_addr(50, f, Proto::Udp), port))
        .collect();
    for &(_, target, port) in &flows {
        assert_eq!(
            request_from_port(&c.pods[0].ns, Proto::Udp, target, port, REFUSAL),
            Err(ConnectError::Refused)
        );
    }
    agent.sync(&services, &slices("empty", &[local(&c, 1)])).await;
    for (family, target, port) in flows {
        let reply = request_from_port(&c.pods[0].ns, Proto::Udp, target, port, ANSWER)
            .unwrap_or_else(|e| panic!("{family} UDP flow to {target} after the endpoint appeared: {e}"));
        assert_eq!(reply.server, "pod1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn masquerade_follows_detect_local_and_masquerade_all() {
    if !support::require_root("masquerade_follows_detect_local_and_masquerade_all") {
        return;
    }
    let c = Cluster::new("masq", 2, 1).unwrap();
    let _servers = serve_everywhere(&c);
    // One service on a local pod (the node masquerades to its bridge address), one on a remote pod.
    let services = [
        service("near", 60, Kind::NodePort, json!({})),
        service("far", 61, Kind::ClusterIp, json!({})),
    ];
    let objects: Vec<Arc<EndpointSlice>> = slices("near", &[local(&c, 1)])
        .into_iter()
        .chain(slices("far", &[remote(&c, 0)]))
        .collect();

    let pod0 = &c.pods[0];
    for (case, cfg, pods_masqueraded) in [
        ("detectLocal ClusterCIDR", config(json!({})), false),
        (
            "detectLocal NodeCIDR",
            config(json!({"detectLocal": {"mode": "NodeCIDR"}})),
            false,
        ),
        ("masqueradeAll", config(json!({"masqueradeAll": true})), true),
    ] {
        // A new agent, as after a configuration change: its first sync rewrites everything.
        let mut agent = Agent::new(&c.node, cfg);
        agent.sync(&services, &objects).await;
        for family in IpFamily::ALL {
            for proto in [Proto::Tcp, Proto::Udp] {
                let near = cluster_addr(60, family, proto);
                let far = cluster_addr(61, family, proto);
                let bridge = Cluster::bridge_ip_like(near.ip());
                let link = match family {
                    IpFamily::V4 => IpAddr::V4(Cluster::NODE_LINK_V4),
                    IpFamily::V6 => IpAddr::V6(Cluster::NODE_LINK_V6),
                };

                // From outside to a NodePort with Cluster policy: always masqueraded.
                let reply = ask(&c.client, proto, node_port_addr(60, family));
                assert_eq!(reply.peer.ip(), bridge, "{case}: {proto:?} NodePort from outside");
                // From outside the pod network to a cluster IP: masqueraded.
                let reply = ask(&c.client, proto, near);
                assert_eq!(reply.peer.ip(), bridge, "{case}: {proto:?} {near} from outside");

                // From a local pod to a cluster IP: masqueraded only with masqueradeAll.
                let own = pod0.ip_like(near.ip());
                let reply = ask(&pod0.ns, proto, near);
                let want = if pods_masqueraded { bridge } else { own };
                assert_eq!(reply.peer.ip(), want, "{case}: {proto:?} {near} from pod0");
                let reply = ask(&pod0.ns, proto, far);
                assert_eq!(reply.server, "rpod0");
                let want = if pods_masqueraded { link } else { own };
                assert_eq!(
                    reply.peer.ip(),
                    want,
                    "{case}: {proto:?} {far} (remote endpoint) from pod0"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hairpin_pod_balanced_to_itself_through_its_service_is_answered_masqueraded() {
    if !support::require_root("hairpin_pod_balanced_to_itself_through_its_service_is_answered_masqueraded") {
        return;
    }
    let c = Cluster::new("hairpin", 2, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 0), local(&c, 1)];
    let services = [service("loop", 70, Kind::ClusterIp, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("loop", &eps)).await;

    let pod0 = &c.pods[0];
    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let target = cluster_addr(70, family, proto);
            let mut seen = BTreeSet::new();
            for _ in 0..SPREAD_LIMIT {
                let reply = ask(&pod0.ns, proto, target);
                let want = if reply.server == "pod0" {
                    // Hairpin: without masquerade pod0 would answer itself directly and the client
                    // would never see a reply from the service address.
                    Cluster::bridge_ip_like(target.ip())
                } else {
                    pod0.ip_like(target.ip())
                };
                assert_eq!(
                    reply.peer.ip(),
                    want,
                    "{proto:?} {target} answered by {}",
                    reply.server
                );
                seen.insert(reply.server);
                if seen.len() == 2 {
                    break;
                }
            }
            assert_eq!(seen, names_of(&eps), "{proto:?} {target}");
        }
    }
}

/// A UDP flow: requests from one source port of `from` to `target`, so conntrack keeps them on one
/// endpoint.
struct Flow<'a> {
    what: String,
    from: &'a NetNs,
    target: SocketAddr,
    port: u16,
    /// The endpoint it is on.
    server: String,
}

impl Flow<'_> {
    fn ask(&self) -> Reply {
        request_from_port(self.from, Proto::Udp, self.target, self.port, ANSWER)
            .unwrap_or_else(|e| panic!("{}: {e}", self.what))
    }
}

/// Opens UDP flows from `from` to `target` from source ports `first_port`, `first_port + 1`, ...
/// until one lands on an endpoint that `wanted` accepts, and checks that it stays there.
fn pin_flow<'a>(
    what: &str,
    from: &'a NetNs,
    target: SocketAddr,
    first_port: u16,
    wanted: impl Fn(&str) -> bool,
) -> Flow<'a> {
    for port in first_port..first_port + SPREAD_LIMIT as u16 {
        let mut flow = Flow {
            what: format!("{what} ({target} from port {port})"),
            from,
            target,
            port,
            server: String::new(),
        };
        flow.server = flow.ask().server;
        if !wanted(&flow.server) {
            continue;
        }
        for _ in 0..3 {
            assert_eq!(
                flow.ask().server,
                flow.server,
                "{}: a UDP flow stays on its endpoint",
                flow.what
            );
        }
        return flow;
    }
    panic!("{what}: no flow to {target} landed on the wanted endpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_endpoint_gets_no_new_connections_and_its_stale_udp_flows_move() {
    if !support::require_root("removed_endpoint_gets_no_new_connections_and_its_stale_udp_flows_move") {
        return;
    }
    let c = Cluster::new("shrink", 4, 1).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = vec![local(&c, 1), local(&c, 2), local(&c, 3), remote(&c, 0)];
    let services = [service("shrink", 80, Kind::NodePort, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("shrink", &eps)).await;

    let pod0 = &c.pods[0].ns;
    let any = |_: &str| true;
    // The endpoint to remove: wherever the first flow lands. Its pod keeps running (and answering), as
    // a terminating pod would: only the conntrack clean-up can move the flows.
    let first = pin_flow(
        "pod0 v4",
        pod0,
        cluster_addr(80, IpFamily::V4, Proto::Udp),
        40000,
        any,
    );
    let gone = first.server.clone();
    let on_gone = |s: &str| s == gone;
    let moving = [
        first,
        pin_flow(
            "pod0 v6",
            pod0,
            cluster_addr(80, IpFamily::V6, Proto::Udp),
            40100,
            on_gone,
        ),
        pin_flow(
            "client NodePort v4",
            &c.client,
            node_port_addr(80, IpFamily::V4),
            40200,
            on_gone,
        ),
        pin_flow(
            "client NodePort v6",
            &c.client,
            node_port_addr(80, IpFamily::V6),
            40300,
            on_gone,
        ),
    ];
    let not_gone = |s: &str| s != gone;
    let staying = [
        pin_flow(
            "pod0 v4",
            pod0,
            cluster_addr(80, IpFamily::V4, Proto::Udp),
            40400,
            not_gone,
        ),
        pin_flow(
            "client NodePort v6",
            &c.client,
            node_port_addr(80, IpFamily::V6),
            40500,
            not_gone,
        ),
    ];

    let remaining: Vec<Ep> = eps.into_iter().filter(|e| e.name != gone).collect();
    let outcome = agent.sync(&services, &slices("shrink", &remaining)).await;
    assert!(!outcome.stats.full, "an endpoint change is a partial sync");

    let remaining = names_of(&remaining);
    for flow in &moving {
        let now = flow.ask().server;
        assert!(
            remaining.contains(&now),
            "{}: was on {gone}, which was removed; still answered by {now} (stale conntrack entry kept)",
            flow.what
        );
    }
    for flow in &staying {
        assert_eq!(
            flow.ask().server,
            flow.server,
            "{}: a flow to a remaining endpoint stays",
            flow.what
        );
    }
    for family in IpFamily::ALL {
        for (from, target) in [
            (pod0, cluster_addr(80, family, Proto::Tcp)),
            (&c.client, node_port_addr(80, family)),
        ] {
            for _ in 0..20 {
                let reply = ask(from, Proto::Tcp, target);
                assert_ne!(
                    reply.server, gone,
                    "new TCP connection to {target} went to the removed endpoint"
                );
            }
        }
    }
    assert!(
        agent.metrics.conntrack_deleted.get() >= 4,
        "deleted entries are counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_flow_to_an_endpoint_removed_during_a_failed_sync_moves_after_the_next_good_sync() {
    if !support::require_root(
        "udp_flow_to_an_endpoint_removed_during_a_failed_sync_moves_after_the_next_good_sync",
    ) {
        return;
    }
    let c = Cluster::new("shrinkfail", 4, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = vec![local(&c, 1), local(&c, 2), local(&c, 3)];
    let services = [service("shrink", 81, Kind::ClusterIp, json!({}))];
    let (exec, fault) = Faulty::new(&c.node);
    let mut agent = Agent::with_executor(&c.node, exec, config(json!({})));
    agent.sync(&services, &slices("shrink", &eps)).await;

    let pod0 = &c.pods[0].ns;
    let first = pin_flow(
        "pod0 v4",
        pod0,
        cluster_addr(81, IpFamily::V4, Proto::Udp),
        40000,
        |_| true,
    );
    let gone = first.server.clone();
    let flows = [
        first,
        pin_flow(
            "pod0 v6",
            pod0,
            cluster_addr(81, IpFamily::V6, Proto::Udp),
            40100,
            |s| s == gone,
        ),
    ];
    let remaining: Vec<Ep> = eps.into_iter().filter(|e| e.name != gone).collect();
    let shrunk = slices("shrink", &remaining);

    // The endpoint goes away while iptables-restore fails: the kernel keeps the previous rules.
    *fault.lock().unwrap() = Fault::RefusedInput;
    let err = agent.try_sync(&services, &shrunk, false).await.unwrap_err();
    assert_eq!(err.category, "restore_failed", "{err}");
    // The next sync (the loop's retry) works: the endpoint is gone from the rules, and its flows must
    // go too.
    *fault.lock().unwrap() = Fault::None;
    agent.try_sync(&services, &shrunk, true).await.unwrap();

    let remaining = names_of(&remaining);
    for flow in &flows {
        let now = flow.ask().server;
        assert!(
            remaining.contains(&now),
            "{}: was on {gone}, removed during a failed sync; after the next good sync still answered \
             by {now} (stale conntrack entry kept)",
            flow.what
        );
    }
}

/// Services of every kind, for the tests that look at the rules as a whole.
fn assorted(c: &Cluster) -> (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>) {
    let services = vec![
        service("web", 90, Kind::NodePort, json!({})),
        service(
            "local",
            91,
            Kind::NodePort,
            json!({"externalTrafficPolicy": "Local"}),
        ),
        service(
            "sticky",
            92,
            Kind::ClusterIp,
            json!({"sessionAffinity": "ClientIP"}),
        ),
        service("empty", 93, Kind::NodePort, json!({})),
    ];
    let slices = [
        slices("web", &[local(c, 0), local(c, 1), remote(c, 0)]),
        slices("local", &[local(c, 1), remote(c, 0)]),
        slices("sticky", &[local(c, 0), remote(c, 0)]),
    ]
    .concat();
    (services, slices)
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_rules_survive_full_and_partial_syncs_and_cleanup() {
    if !support::require_root("foreign_rules_survive_full_and_partial_syncs_and_cleanup") {
        return;
    }
    let c = Cluster::new("foreign", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    add_foreign_rules(&c);
    let before = save_all(&c.node);
    assert!(
        before.contains("FOREIGN-NAT") && before.contains("FOREIGN-FWD"),
        "{before}"
    );
    assert_foreign_rules_work(&c, "before the agent");

    let (services, objects) = assorted(&c);
    let mut agent = Agent::new(&c.node, config(json!({})));
    let check = |stage: &str| {
        let now = save_all(&c.node);
        assert_ne!(now, before, "{stage}: our rules are there");
        assert_eq!(
            not_ours(&now),
            not_ours(&before),
            "{stage}: foreign rules untouched"
        );
        assert_foreign_rules_work(&c, stage);
        let reply = ask(&c.client, Proto::Tcp, node_port_addr(90, IpFamily::V4));
        assert!(
            reply.server.contains("pod"),
            "{stage}: the agent's NodePort answers"
        );
    };

    let outcome = agent.sync(&services, &objects).await;
    assert!(outcome.stats.full);
    check("first (full) sync");
    agent.sync(&services, &objects).await;
    check("sync without changes");

    // One endpoint less for one service: a partial sync.
    let objects = [
        slices("web", &[local(&c, 0), remote(&c, 0)]),
        objects[2..].to_vec(),
    ]
    .concat();
    let outcome = agent.sync(&services, &objects).await;
    assert!(!outcome.stats.full, "partial sync");
    check("partial sync");

    let outcome = agent.try_sync(&services, &objects, true).await.unwrap();
    assert!(outcome.stats.full);
    check("periodic full sync");

    agent.proxier.backend_mut().cleanup().unwrap();
    assert_eq!(save_all(&c.node), before, "after cleanup");
    assert_foreign_rules_work(&c, "after cleanup");
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_leaves_nat_and_filter_exactly_as_before_and_runs_twice() {
    if !support::require_root("cleanup_leaves_nat_and_filter_exactly_as_before_and_runs_twice") {
        return;
    }
    let c = Cluster::new("cleanup", 3, 1).unwrap();
    let _servers = serve_everywhere(&c);
    add_foreign_rules(&c);
    let before = save_all(&c.node);
    let (services, objects) = assorted(&c);
    let web = cluster_addr(90, IpFamily::V4, Proto::Tcp);
    let web6 = cluster_addr(90, IpFamily::V6, Proto::Tcp);

    // The backend's cleanup, as `run` would call it.
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &objects).await;
    assert_ne!(save_all(&c.node), before);
    ask(&c.pods[2].ns, Proto::Tcp, web);
    for round in ["first", "second"] {
        agent.proxier.backend_mut().cleanup().unwrap();
        assert_eq!(save_all(&c.node), before, "{round} IptablesBackend::cleanup");
    }
    for target in [web, web6] {
        assert_eq!(
            request(&c.pods[2].ns, Proto::Tcp, target, SILENCE),
            Err(ConnectError::Timeout),
            "{target} is gone with our rules"
        );
    }
    assert_foreign_rules_work(&c, "after IptablesBackend::cleanup");

    // The same agent programs the node again after a cleanup.
    agent.sync(&services, &objects).await;
    ask(&c.pods[2].ns, Proto::Tcp, web);
    ask(&c.pods[2].ns, Proto::Tcp, web6);

    // The binary, as an operator runs it on the node.
    let binary = env!("CARGO_BIN_EXE_switchyard-agent");
    for (round, args) in [
        ("first", vec![binary, "cleanup"]),
        ("second", vec![binary, "cleanup"]),
        ("nft only", vec![binary, "cleanup", "--iptables", "nft"]),
    ] {
        c.node.run(&args).unwrap();
        assert_eq!(save_all(&c.node), before, "{round} switchyard-agent cleanup");
    }
    assert_eq!(
        request(&c.pods[2].ns, Proto::Tcp, web, SILENCE),
        Err(ConnectError::Timeout)
    );
    assert_foreign_rules_work(&c, "after switchyard-agent cleanup");
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_binary_leaves_the_legacy_tables_of_an_nft_node_alone() {
    if !support::require_root("cleanup_binary_leaves_the_legacy_tables_of_an_nft_node_alone") {
        return;
    }
    let c = Cluster::new("cleanuplegacy", 1, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let services = [service("web", 95, Kind::NodePort, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("web", &[local(&c, 0)])).await;

    let legacy_save = |family: IpFamily| {
        let binary = Tools::standard(Backend::Legacy, family).save;
        normalised(&c.node.run(&[&binary.to_string_lossy()]).unwrap())
    };
    // What an operator sees: iptables-nft-save warns on stderr when legacy tables exist.
    let nft_save_warnings = |family: IpFamily| {
        let binary = Tools::standard(Backend::Nft, family).save;
        let out = c.node.output(&[&binary.to_string_lossy()]).unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let legacy_before: Vec<String> = IpFamily::ALL.into_iter().map(legacy_save).collect();
    assert!(
        legacy_before.iter().all(String::is_empty),
        "an nft-only node has no legacy tables: {legacy_before:?}"
    );
    for family in IpFamily::ALL {
        assert!(!nft_save_warnings(family).contains("legacy"));
    }

    c.node
        .run(&[env!("CARGO_BIN_EXE_switchyard-agent"), "cleanup"])
        .unwrap();
    let legacy_after: Vec<String> = IpFamily::ALL.into_iter().map(legacy_save).collect();
    assert_eq!(
        legacy_after, legacy_before,
        "`switchyard-agent cleanup` created iptables-legacy tables on a node that had none"
    );
    for family in IpFamily::ALL {
        let warnings = nft_save_warnings(family);
        assert!(
            !warnings.contains("iptables-legacy tables present"),
            "iptables-nft-save now warns about legacy tables ({family}): {warnings}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_service_and_slice_are_skipped_while_other_services_keep_answering() {
    if !support::require_root("malformed_service_and_slice_are_skipped_while_other_services_keep_answering") {
        return;
    }
    let c = Cluster::new("badinput", 3, 0).unwrap();
    let _servers = serve_everywhere(&c);

    let bad_ip = service(
        "bad-ip",
        101,
        Kind::ClusterIp,
        json!({"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300", "fd00:96::101"]}),
    );
    let bad_protocol = {
        let mut s = (*service("bad-proto", 102, Kind::ClusterIp, json!({}))).clone();
        let spec = s.spec.as_mut().unwrap();
        spec.ports.as_mut().unwrap()[0].protocol = Some("TCPX".into());
        Arc::new(s)
    };
    let services = [
        service("good", 100, Kind::NodePort, json!({})),
        bad_ip,
        bad_protocol,
        service("mixed", 103, Kind::ClusterIp, json!({})),
    ];
    // "mixed" has a good slice per family and a malformed IPv4 slice; the malformed one is skipped as a
    // whole.
    let bad_slice = slice_named(
        "mixed",
        "mixed-bad",
        IpFamily::V4,
        vec![
            endpoint_json("10.244.1.999", NODE_NAME),
            endpoint_json(&c.pods[2].ipv4.to_string(), NODE_NAME),
        ],
    );
    let objects: Vec<Arc<EndpointSlice>> = [
        slices("good", &[local(&c, 0), local(&c, 1)]),
        slices("bad-ip", &[local(&c, 0)]),
        slices("bad-proto", &[local(&c, 0)]),
        slices("mixed", &[local(&c, 1)]),
        vec![bad_slice],
    ]
    .concat();

    let mut agent = Agent::new(&c.node, config(json!({})));
    let outcome = agent.sync(&services, &objects).await;
    // good and mixed: 2 ports x 2 families each.
    assert_eq!(outcome.services, 8, "{outcome:?}");
    let skipped = |kind: &str, reason: &str| {
        agent
            .metrics
            .skipped_objects
            .get_or_create(&SkippedLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .get()
    };
    assert_eq!(skipped("Service", "invalid_ip"), 1);
    assert_eq!(skipped("Service", "invalid_protocol"), 1);
    assert_eq!(skipped("EndpointSlice", "invalid_ip"), 1);

    let good = names(["pod0", "pod1"]);
    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let target = cluster_addr(100, family, proto);
            assert_eq!(spread(&c.pods[2].ns, proto, target, &good), good, "{target}");
            let target = node_port_addr(100, family);
            assert_eq!(spread(&c.client, proto, target, &good), good, "{target}");
            // Only the good slice of "mixed" is used.
            for _ in 0..10 {
                let reply = ask(&c.pods[0].ns, proto, cluster_addr(103, family, proto));
                assert_eq!(reply.server, "pod1", "mixed {family} {proto:?}");
            }
        }
    }
    // The bad service's valid IPv6 address is not programmed either: the object is skipped whole.
    assert_eq!(
        request(
            &c.pods[0].ns,
            Proto::Tcp,
            cluster_addr(101, IpFamily::V6, Proto::Tcp),
            SILENCE
        ),
        Err(ConnectError::Timeout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_apply_keeps_the_previous_rules_working_and_the_next_good_sync_applies() {
    if !support::require_root("failed_apply_keeps_the_previous_rules_working_and_the_next_good_sync_applies")
    {
        return;
    }
    let c = Cluster::new("failapply", 3, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let (exec, fault) = Faulty::new(&c.node);
    let mut agent = Agent::with_executor(&c.node, exec, config(json!({})));

    let first = [service("web", 110, Kind::NodePort, json!({}))];
    agent.sync(&first, &slices("web", &[local(&c, 1)])).await;
    let applied = save_all(&c.node);

    // The change: web moves to pod2, and a new service appears.
    let services = [
        service("web", 110, Kind::NodePort, json!({})),
        service("new", 111, Kind::ClusterIp, json!({})),
    ];
    let objects = [slices("web", &[local(&c, 2)]), slices("new", &[local(&c, 2)])].concat();

    let mut failures = 0;
    for (bad, category) in [
        (Fault::MissingBinary, "binary_missing"),
        (Fault::RefusedInput, "restore_failed"),
    ] {
        *fault.lock().unwrap() = bad;
        let err = agent.try_sync(&services, &objects, false).await.unwrap_err();
        assert_eq!(err.category, category, "{err}");
        failures += 1;
        assert_eq!(agent.metrics.iptables_restore_failures.get(), failures);
        assert_eq!(
            save_all(&c.node),
            applied,
            "{bad:?}: the kernel keeps the previous rules"
        );
        for family in IpFamily::ALL {
            for proto in [Proto::Tcp, Proto::Udp] {
                let reply = ask(&c.pods[0].ns, proto, cluster_addr(110, family, proto));
                assert_eq!(reply.server, "pod1", "{bad:?}: previous rules still answer");
                let reply = ask(&c.client, proto, node_port_addr(110, family));
                assert_eq!(reply.server, "pod1", "{bad:?}: previous NodePort still answers");
            }
        }
    }

    *fault.lock().unwrap() = Fault::None;
    let outcome = agent.try_sync(&services, &objects, false).await.unwrap();
    assert!(outcome.stats.full, "the sync after a failure is full");
    for family in IpFamily::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                ask(&c.pods[0].ns, proto, cluster_addr(110, family, proto)).server,
                "pod2"
            );
            assert_eq!(ask(&c.client, proto, node_port_addr(110, family)).server, "pod2");
            assert_eq!(
                ask(&c.pods[0].ns, proto, cluster_addr(111, family, proto)).server,
                "pod2"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_flushed_by_someone_else_are_noticed_by_the_periodic_check_and_restored() {
    if !support::require_root("rules_flushed_by_someone_else_are_noticed_by_the_periodic_check_and_restored")
    {
        return;
    }
    let c = Cluster::new("flushed", 2, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 0), local(&c, 1)];
    let services = [service("web", 10, Kind::ClusterIp, json!({}))];
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &slices("web", &eps)).await;
    assert!(agent.proxier.check_rules(), "rules in place after the sync");
    assert!(!agent.proxier.needs_full_sync());
    let target = cluster_addr(10, IpFamily::V4, Proto::Tcp);
    ask(&c.pods[0].ns, Proto::Tcp, target);

    // Someone flushes and deletes every nat chain in this (test-only) namespace.
    let bin = Tools::standard(Backend::Nft, IpFamily::V4).iptables;
    let bin = bin.to_string_lossy();
    c.node.run(&[&bin, "-t", "nat", "-F"]).unwrap();
    c.node.run(&[&bin, "-t", "nat", "-X"]).unwrap();
    assert!(
        request(&c.pods[0].ns, Proto::Tcp, target, ANSWER).is_err(),
        "the ClusterIP stops answering without its nat rules"
    );
    assert!(!agent.proxier.check_rules(), "the canary is gone");
    assert!(agent.proxier.needs_full_sync());
    let outcome = agent.sync(&services, &slices("web", &eps)).await;
    assert!(outcome.stats.full, "the sync after a lost canary is full");
    assert_eq!(
        spread(&c.pods[0].ns, Proto::Tcp, target, &names_of(&eps)),
        names_of(&eps),
        "the ClusterIP answers again from every endpoint"
    );
    assert!(agent.proxier.check_rules());
}

#[tokio::test(flavor = "multi_thread")]
async fn crossing_the_large_cluster_threshold_rewrites_every_endpoint_rule() {
    if !support::require_root("crossing_the_large_cluster_threshold_rewrites_every_endpoint_rule") {
        return;
    }
    let c = Cluster::new("large", 2, 0).unwrap();
    let _servers = serve_everywhere(&c);
    let eps = [local(&c, 0), local(&c, 1)];
    let mut services = vec![service("web", 10, Kind::ClusterIp, json!({}))];
    let mut all_slices = slices("web", &eps);
    let mut agent = Agent::new(&c.node, config(json!({})));
    agent.sync(&services, &all_slices).await;
    let with_comments = |save: &str| {
        save.lines()
            .filter(|l| l.starts_with("-A SWYD-SEP-"))
            .all(|l| l.contains("--comment"))
    };
    assert!(with_comments(&save(&c.node, IpFamily::V4, Table::Nat)));

    // 60 more services of 20 IPv4 endpoints each (addresses nothing answers on): past 1,000 endpoints.
    for n in 0..60u8 {
        let name = format!("bulk{n}");
        services.push(service(&name, 100 + n, Kind::ClusterIp, json!({})));
        let endpoints = (0..20u8)
            .map(|i| endpoint_json(&format!("10.99.{n}.{}", i + 1), "other-node"))
            .collect();
        all_slices.push(slice_named(&name, &format!("{name}-v4"), IpFamily::V4, endpoints));
    }
    agent.sync(&services, &all_slices).await;
    let save_v4 = save(&c.node, IpFamily::V4, Table::Nat);
    assert!(
        save_v4
            .lines()
            .filter(|l| l.starts_with("-A SWYD-SEP-"))
            .all(|l| !l.contains("--comment")),
        "no endpoint rule keeps its comment"
    );
    let target = cluster_addr(10, IpFamily::V4, Proto::Tcp);
    assert_eq!(
        spread(&c.pods[0].ns, Proto::Tcp, target, &names_of(&eps)),
        names_of(&eps)
    );

    // And back under the threshold.
    agent.sync(&services[..1], &all_slices[..2]).await;
    assert!(with_comments(&save(&c.node, IpFamily::V4, Table::Nat)));
    assert_eq!(
        spread(&c.pods[0].ns, Proto::Tcp, target, &names_of(&eps)),
        names_of(&eps)
    );
}

/// `nft list tables` inside `ns`, one table per line.
fn nft_tables(ns: &NetNs) -> BTreeSet<String> {
    ns.run(&["nft", "list", "tables"])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_switch_to_iptables_removes_the_nftables_modes_tables_once_its_rules_are_in_place() {
    if !support::require_root(
        "a_switch_to_iptables_removes_the_nftables_modes_tables_once_its_rules_are_in_place",
    ) {
        return;
    }
    let c = Cluster::new("modeswitch", 2, 0).unwrap();
    let _servers = serve_everywhere(&c);
    // What an agent in nftables mode left on the node (its `switchyard` tables), beside another tool's
    // table and a bridge table that happens to share the name.
    c.node
        .run_with_input(
            &["nft", "-f", "-"],
            "table ip switchyard {\n chain services { type nat hook prerouting priority dstnat; policy accept; }\n}\n\
             table ip6 switchyard {\n chain services { type nat hook prerouting priority dstnat; policy accept; }\n}\n\
             table inet other-tool {\n chain input { type filter hook input priority 0; policy accept; }\n}\n\
             table bridge switchyard {\n}\n",
        )
        .unwrap();
    let ours = ["table ip switchyard", "table ip6 switchyard"];
    let others = ["table inet other-tool", "table bridge switchyard"];
    assert!(nft_tables(&c.node).is_superset(&names(ours)));

    let eps = [local(&c, 0), local(&c, 1)];
    let services = [service("web", 10, Kind::ClusterIp, json!({}))];
    let config = config(json!({}));
    let prefix: Vec<std::ffi::OsString> = c.node.exec_prefix().into_iter().map(Into::into).collect();
    let (exec, fault) = Faulty::new(&c.node);
    let mut agent = Agent::with_executor(&c.node, exec, config.clone());
    agent.proxier =
        agent
            .proxier
            .with_leftovers(leftovers::other_modes(ProxyMode::Iptables, &config, &prefix));

    // The first iptables sync fails: the old mode's tables stay, they are all that proxies the node.
    *fault.lock().unwrap() = Fault::MissingBinary;
    agent
        .try_sync(&services, &slices("web", &eps), false)
        .await
        .unwrap_err();
    assert!(
        nft_tables(&c.node).is_superset(&names(ours)),
        "nothing removed before a good sync"
    );
    assert_eq!(agent.proxier.pending_leftovers(), [ProxyMode::Nftables]);

    // It succeeds: the ClusterIP answers from the iptables rules, and only our nftables tables are gone.
    *fault.lock().unwrap() = Fault::None;
    agent.sync(&services, &slices("web", &eps)).await;
    let tables = nft_tables(&c.node);
    assert!(tables.is_disjoint(&names(ours)), "{tables:?}");
    assert!(tables.is_superset(&names(others)), "{tables:?}");
    assert!(agent.proxier.pending_leftovers().is_empty());
    for family in IpFamily::ALL {
        let target = cluster_addr(10, family, Proto::Tcp);
        assert_eq!(
            spread(&c.pods[0].ns, Proto::Tcp, target, &names_of(&eps)),
            names_of(&eps)
        );
    }

    // `switchyard-agent cleanup` removes every mode's objects: the iptables chains, and a table of the
    // nftables mode that came back; still nothing of anyone else.
    c.node
        .run_with_input(&["nft", "-f", "-"], "table inet switchyard {\n}\n")
        .unwrap();
    for mut mode in leftovers::every_mode(&config, &prefix, &leftovers::BOTH_IPTABLES) {
        mode.remove().unwrap();
    }
    assert!(
        !save_all(&c.node).contains("SWYD-"),
        "no iptables chain of ours left"
    );
    let tables = nft_tables(&c.node);
    assert!(
        !tables.iter().any(|t| [
            "table ip switchyard",
            "table ip6 switchyard",
            "table inet switchyard"
        ]
        .contains(&t.as_str())),
        "{tables:?}"
    );
    assert!(tables.is_superset(&names(others)), "{tables:?}");
}
