//! Test support: a model of the kernel's nat and filter tables that loads `iptables-restore --noflush`
//! input and the [`jump_rules`](super::render::jump_rules), and a packet tracer that walks a packet
//! through them, like upstream's `tracePacket` tests (our own code).
//!
//! The model is strict on purpose: an option or target it does not understand, a rule appended to a
//! chain that does not exist, a jump to a missing chain, a chain declared twice in one restore, or a
//! `-X` of a chain that is still referenced or not empty is an error, so the tracer cannot silently pass
//! a rule it does not understand and a restore the kernel would refuse fails here too.
//!
//! Branches the kernel takes at random (`-m statistic`) or by history (`-m recent --rcheck`) are both
//! followed, so a trace is the set of every place the packet can end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::CHAIN_PREFIX;
use super::render::{JumpPosition, JumpRule, MAX_CHAIN_NAME_LEN, OwnedChains, Table};
use crate::model::Protocol;

/// Why a restore or a trace failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError(pub String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

type Result<T, E = TraceError> = std::result::Result<T, E>;

fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(TraceError(message.into()))
}

const NAT_BUILTINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];
const FILTER_BUILTINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];
const TARGETS: [&str; 8] = [
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "DNAT",
    "MASQUERADE",
    "MARK",
    "SNAT",
];

/// Where a traced packet comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Arrives from another host on `in_interface` (nat PREROUTING).
    FromOutside {
        /// Incoming interface.
        in_interface: String,
    },
    /// Sent by a pod on this node, arriving on `in_interface` (its veth, or the bridge).
    FromLocalPod {
        /// Incoming interface.
        in_interface: String,
    },
    /// Sent by a process in the host network namespace (nat OUTPUT, no incoming interface).
    FromHost,
}

/// The first packet of a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// L4 protocol.
    pub protocol: Protocol,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Where it comes from.
    pub origin: Origin,
}

/// Where a packet ends, over every branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten to one of these `ip:port` (`[ip]:port` for IPv6) and let through.
    Dnat(BTreeSet<String>),
    /// Refused (`REJECT`).
    Reject,
    /// Silently dropped.
    Drop,
    /// Let through untouched: not service traffic.
    Accept,
}

/// Result of [`Ruleset::trace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// Where the packet ends.
    pub verdict: Verdict,
    /// Its source is masqueraded (the same on every branch).
    pub masquerade: bool,
}

/// How one branch ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathVerdict {
    /// DNATed to `ip:port`.
    Dnat(String),
    /// `REJECT`.
    Reject,
    /// `DROP`.
    Drop,
    /// Let through without DNAT.
    Accept,
}

/// One branch of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTrace {
    /// How it ends.
    pub verdict: PathVerdict,
    /// Masqueraded in nat POSTROUTING.
    pub masquerade: bool,
    /// Chains entered, in order (`table:chain`).
    pub chains: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MarkOp {
    Or(u32),
    Xor(u32),
    /// `--set-xmark value/mask`: zero the mask bits, then xor the value.
    SetX(u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// No `-j`: the rule only counts.
    None,
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(IpAddr, u16),
    Masquerade,
    Mark(MarkOp),
    Jump(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Cond {
    Source(IpNet),
    Destination(IpNet),
    Protocol(Protocol),
    InInterface(String),
    DestinationPort(u16),
    /// `--src-type LOCAL` (true) or `--dst-type LOCAL` (false).
    AddrTypeLocal {
        source: bool,
    },
    Mark {
        value: u32,
        mask: u32,
    },
    /// `-m statistic --mode random`: either way.
    Random,
    /// `-m recent --rcheck`: either way (affinity may or may not be recorded).
    RecentCheck,
    /// `-m conntrack --ctstate`: the traced packet is always NEW.
    CtState(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Matcher {
    cond: Cond,
    negated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// The line as written, for messages and dumps.
    text: String,
    matchers: Vec<Matcher>,
    action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Chain {
    builtin: bool,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TableState {
    chains: BTreeMap<String, Chain>,
}

impl TableState {
    fn new(builtins: &[&str]) -> Self {
        let chains = builtins
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    Chain {
                        builtin: true,
                        rules: Vec::new(),
                    },
                )
            })
            .collect();
        Self { chains }
    }

    fn references(&self, chain: &str) -> usize {
        self.chains
            .values()
            .flat_map(|c| &c.rules)
            .filter(|r| matches!(&r.action, Action::Jump(t) if t == chain))
            .count()
    }
}

/// The nat and filter tables of one family, as the kernel would hold them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    nat: TableState,
    filter: TableState,
}

impl Default for Ruleset {
    fn default() -> Self {
        Self::new()
    }
}

impl Ruleset {
    /// Empty tables: only the built-in chains, with policy ACCEPT.
    pub fn new() -> Self {
        Self {
            nat: TableState::new(&NAT_BUILTINS),
            filter: TableState::new(&FILTER_BUILTINS),
        }
    }

    /// A fresh ruleset with `restore` applied and then the jump rules ensured, as the executor does on
    /// a first sync.
    pub fn load(restore: &str, jumps: &[JumpRule]) -> Result<Self> {
        let mut ruleset = Self::new();
        ruleset.restore(restore)?;
        ruleset.ensure_jump_rules(jumps)?;
        Ok(ruleset)
    }

    fn table(&self, table: Table) -> &TableState {
        match table {
            Table::Nat => &self.nat,
            Table::Filter => &self.filter,
        }
    }

    fn table_mut(&mut self, table: Table) -> &mut TableState {
        match table {
            Table::Nat => &mut self.nat,
            Table::Filter => &mut self.filter,
        }
    }

    /// Applies `iptables-restore --noflush` input. Each table section is all-or-nothing, as in the
    /// kernel: on error, the tables committed before stay, the failing one is unchanged.
    pub fn restore(&mut self, text: &str) -> Result<()> {
        struct Open {
            table: Table,
            state: TableState,
            declared: BTreeSet<String>,
        }
        let mut open: Option<Open> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let at = |message: String| TraceError(format!("line {}: {message}: {line:?}", index + 1));
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if open.is_some() {
                    return Err(at("table opened before the previous one was committed".into()));
                }
                let table = match name {
                    "nat" => Table::Nat,
                    "filter" => Table::Filter,
                    other => return Err(at(format!("table {other} is not modelled"))),
                };
                open = Some(Open {
                    table,
                    state: self.table(table).clone(),
                    declared: BTreeSet::new(),
                });
                continue;
            }
            let Some(current) = open.as_mut() else {
                return Err(at("outside of a table section".into()));
            };
            if line == "COMMIT" {
                if let Some(done) = open.take() {
                    *self.table_mut(done.table) = done.state;
                }
                continue;
            }
            if let Some(declaration) = line.strip_prefix(':') {
                let mut parts = declaration.split_whitespace();
                let (Some(name), Some(policy), Some(_counters), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Err(at("malformed chain declaration".into()));
                };
                if policy != "-" {
                    return Err(at("built-in chain policies are never ours to set".into()));
                }
                check_chain_name(name).map_err(|e| at(e.0))?;
                if !current.declared.insert(name.to_string()) {
                    return Err(at("chain declared twice in one restore".into()));
                }
                match current.state.chains.get_mut(name) {
                    Some(chain) if chain.builtin => {
                        return Err(at("declaring a built-in chain would flush it".into()));
                    }
                    // --noflush: declaring an existing chain flushes it.
                    Some(chain) => chain.rules.clear(),
                    None => {
                        current.state.chains.insert(
                            name.to_string(),
                            Chain {
                                builtin: false,
                                rules: Vec::new(),
                            },
                        );
                    }
                }
                continue;
            }
            let tokens = tokenize(line).map_err(|e| at(e.0))?;
            match tokens.first().map(String::as_str) {
                Some("-A") => {
                    let Some(chain) = tokens.get(1) else {
                        return Err(at("-A without a chain".into()));
                    };
                    let rule = parse_rule(current.table, line, &tokens[2..]).map_err(|e| at(e.0))?;
                    check_jump(&current.state, &rule).map_err(|e| at(e.0))?;
                    let Some(target) = current.state.chains.get_mut(chain.as_str()) else {
                        return Err(at(format!("no chain {chain}")));
                    };
                    target.rules.push(rule);
                }
                Some("-X") => {
                    let [_, chain] = tokens.as_slice() else {
                        return Err(at("-X takes exactly one chain".into()));
                    };
                    match current.state.chains.get(chain.as_str()) {
                        None => return Err(at(format!("no chain {chain} to delete"))),
                        Some(c) if c.builtin => return Err(at("cannot delete a built-in chain".into())),
                        Some(c) if !c.rules.is_empty() => {
                            return Err(at(format!("chain {chain} is not empty")));
                        }
                        Some(_) => {}
                    }
                    let references = current.state.references(chain);
                    if references > 0 {
                        return Err(at(format!(
                            "chain {chain} is still referenced by {references} rules"
                        )));
                    }
                    current.state.chains.remove(chain.as_str());
                }
                _ => return Err(at("unsupported command".into())),
            }
        }
        if open.is_some() {
            return fail("restore input ends without COMMIT");
        }
        Ok(())
    }

    /// Ensures `rules` as the executor does: creates a missing target chain, adds a missing rule at its
    /// position. `First` rules end up at the top of their built-in chain, in list order.
    pub fn ensure_jump_rules(&mut self, rules: &[JumpRule]) -> Result<()> {
        let mut inserted: BTreeMap<(Table, &str), usize> = BTreeMap::new();
        for jump in rules {
            let text = format!("-A {} {}", jump.chain, jump.spec());
            let tokens = tokenize(&text)?;
            let rule = parse_rule(jump.table, &text, &tokens[2..])?;
            let state = self.table_mut(jump.table);
            let target = jump.target();
            check_chain_name(target)?;
            state.chains.entry(target.to_string()).or_insert(Chain {
                builtin: false,
                rules: Vec::new(),
            });
            let Some(chain) = state.chains.get_mut(jump.chain) else {
                return fail(format!(
                    "no built-in chain {} in {}",
                    jump.chain,
                    jump.table.as_str()
                ));
            };
            if !chain.builtin {
                return fail(format!("{} is not a built-in chain", jump.chain));
            }
            if chain.rules.contains(&rule) {
                continue;
            }
            match jump.position {
                JumpPosition::First => {
                    let position = inserted.entry((jump.table, jump.chain)).or_default();
                    let at = (*position).min(chain.rules.len());
                    chain.rules.insert(at, rule);
                    *position += 1;
                }
                JumpPosition::Last => chain.rules.push(rule),
            }
        }
        Ok(())
    }

    /// Deletes `rules` from their built-in chains, as the executor does before cleanup.
    pub fn delete_jump_rules(&mut self, rules: &[JumpRule]) -> Result<()> {
        for jump in rules {
            let text = format!("-A {} {}", jump.chain, jump.spec());
            let tokens = tokenize(&text)?;
            let rule = parse_rule(jump.table, &text, &tokens[2..])?;
            if let Some(chain) = self.table_mut(jump.table).chains.get_mut(jump.chain) {
                chain.rules.retain(|r| *r != rule);
            }
        }
        Ok(())
    }

    /// Chains whose name starts with [`CHAIN_PREFIX`].
    pub fn owned_chains(&self) -> OwnedChains {
        OwnedChains::from_names(
            self.nat.chains.keys().cloned(),
            self.filter.chains.keys().cloned(),
        )
    }

    /// Rules in owned chains, both tables.
    pub fn owned_rule_count(&self) -> usize {
        [&self.nat, &self.filter]
            .iter()
            .flat_map(|t| t.chains.iter())
            .filter(|(name, _)| name.starts_with(CHAIN_PREFIX))
            .map(|(_, chain)| chain.rules.len())
            .sum()
    }

    /// The tables in an `iptables-save`-like form, for assertion messages.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for (name, table) in [("nat", &self.nat), ("filter", &self.filter)] {
            out.push_str(&format!("*{name}\n"));
            for (chain, c) in &table.chains {
                out.push_str(&format!(":{chain} {}\n", if c.builtin { "ACCEPT" } else { "-" }));
            }
            for c in table.chains.values() {
                for rule in &c.rules {
                    out.push_str(&rule.text);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Every way `packet` can go, one entry per branch.
    pub fn trace_paths(&self, packet: &Packet, local_addresses: &[IpAddr]) -> Result<Vec<PathTrace>> {
        let (in_interface, from_host) = match &packet.origin {
            Origin::FromOutside { in_interface } | Origin::FromLocalPod { in_interface } => {
                (Some(in_interface.clone()), false)
            }
            Origin::FromHost => (None, true),
        };
        let start = Pkt {
            src: packet.src,
            dst: packet.dst,
            dport: packet.dport,
            protocol: packet.protocol,
            in_interface,
            mark: 0,
            dnat: None,
            masquerade: false,
            chains: Vec::new(),
        };
        let walker = Walker {
            ruleset: self,
            local: local_addresses,
        };
        let nat_hook = if from_host { "OUTPUT" } else { "PREROUTING" };
        let mut paths = Vec::new();
        for (pkt, exit) in walker.run(Table::Nat, nat_hook, start, 0)? {
            if let Some(verdict) = exit.final_verdict(Table::Nat)? {
                paths.push(PathTrace {
                    verdict,
                    masquerade: pkt.masquerade,
                    chains: pkt.chains,
                });
                continue;
            }
            let to_local = local_addresses.contains(&pkt.dst);
            // Filter hooks, then nat POSTROUTING for packets that leave through it.
            let hooks: &[(Table, &str)] = match (from_host, to_local) {
                (true, true) => &[
                    (Table::Filter, "OUTPUT"),
                    (Table::Nat, "POSTROUTING"),
                    (Table::Filter, "INPUT"),
                ],
                (true, false) => &[(Table::Filter, "OUTPUT"), (Table::Nat, "POSTROUTING")],
                (false, true) => &[(Table::Filter, "INPUT")],
                (false, false) => &[(Table::Filter, "FORWARD"), (Table::Nat, "POSTROUTING")],
            };
            let mut live = vec![pkt];
            for &(table, hook) in hooks {
                let mut next = Vec::new();
                for pkt in live {
                    for (pkt, exit) in walker.run(table, hook, pkt, 0)? {
                        match exit.final_verdict(table)? {
                            Some(verdict) => paths.push(PathTrace {
                                verdict,
                                masquerade: pkt.masquerade,
                                chains: pkt.chains,
                            }),
                            None => next.push(pkt),
                        }
                    }
                }
                live = next;
            }
            for pkt in live {
                let verdict = match pkt.dnat {
                    Some((ip, port)) => PathVerdict::Dnat(socket_text(ip, port)),
                    None => PathVerdict::Accept,
                };
                paths.push(PathTrace {
                    verdict,
                    masquerade: pkt.masquerade,
                    chains: pkt.chains,
                });
            }
        }
        Ok(paths)
    }

    /// Where `packet` ends. Fails when branches disagree on the kind of verdict or on masquerading
    /// (use [`Ruleset::trace_paths`] to look at branches one by one).
    pub fn trace(&self, packet: &Packet, local_addresses: &[IpAddr]) -> Result<Trace> {
        let paths = self.trace_paths(packet, local_addresses)?;
        let Some(first) = paths.first() else {
            return fail("no path");
        };
        let masquerade = first.masquerade;
        if paths.iter().any(|p| p.masquerade != masquerade) {
            return fail(format!("branches disagree on masquerading: {paths:#?}"));
        }
        let same_kind =
            |a: &PathVerdict, b: &PathVerdict| std::mem::discriminant(a) == std::mem::discriminant(b);
        if paths.iter().any(|p| !same_kind(&p.verdict, &first.verdict)) {
            return fail(format!("branches disagree on the verdict: {paths:#?}"));
        }
        let verdict = match &first.verdict {
            PathVerdict::Dnat(_) => Verdict::Dnat(
                paths
                    .iter()
                    .filter_map(|p| match &p.verdict {
                        PathVerdict::Dnat(to) => Some(to.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            PathVerdict::Reject => Verdict::Reject,
            PathVerdict::Drop => Verdict::Drop,
            PathVerdict::Accept => Verdict::Accept,
        };
        Ok(Trace { verdict, masquerade })
    }
}

fn socket_text(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    }
}

fn check_chain_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_CHAIN_NAME_LEN {
        return fail(format!(
            "chain name {name:?} must have 1 to {MAX_CHAIN_NAME_LEN} characters"
        ));
    }
    if name.starts_with('-') || name.chars().any(|c| c.is_whitespace() || c == '"') || TARGETS.contains(&name)
    {
        return fail(format!("invalid chain name {name:?}"));
    }
    Ok(())
}

fn check_jump(state: &TableState, rule: &Rule) -> Result<()> {
    if let Action::Jump(target) = &rule.action {
        match state.chains.get(target) {
            None => return fail(format!("jump to missing chain {target}")),
            Some(c) if c.builtin => return fail(format!("jump to built-in chain {target}")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Splits a restore line into arguments; double quotes group words and are removed.
fn tokenize(line: &str) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    tokens.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            '\\' | '\'' => {
                return fail(format!(
                    "unexpected {c:?}: escapes are not produced by the renderer"
                ));
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if in_quotes {
        return fail("unterminated quote");
    }
    if started {
        tokens.push(current);
    }
    Ok(tokens)
}

fn parse_net(text: &str) -> Result<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => fail(format!("not an address or CIDR: {text:?}")),
    }
}

fn parse_u32(text: &str) -> Result<u32> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| TraceError(format!("not a number: {text:?}")))
}

fn parse_mark(text: &str) -> Result<(u32, u32)> {
    match text.split_once('/') {
        Some((value, mask)) => Ok((parse_u32(value)?, parse_u32(mask)?)),
        None => Ok((parse_u32(text)?, u32::MAX)),
    }
}

fn parse_socket(text: &str) -> Result<(IpAddr, u16)> {
    let (ip, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return fail(format!("bad [ip]:port {text:?}"));
        };
        (ip, port)
    } else {
        let Some((ip, port)) = text.rsplit_once(':') else {
            return fail(format!("DNAT without a port is not modelled: {text:?}"));
        };
        (ip, port)
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| TraceError(format!("bad address in {text:?}")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| TraceError(format!("bad port in {text:?}")))?;
    Ok((ip, port))
}

fn parse_protocol(text: &str) -> Result<Protocol> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        other => fail(format!("protocol {other:?} is not modelled")),
    }
}

const MODULES: [&str; 9] = [
    "tcp",
    "udp",
    "sctp",
    "comment",
    "addrtype",
    "mark",
    "statistic",
    "recent",
    "conntrack",
];

/// Parses the arguments of a rule (after `-A CHAIN`).
fn parse_rule(table: Table, text: &str, args: &[String]) -> Result<Rule> {
    let mut matchers = Vec::new();
    let mut modules: Vec<&str> = Vec::new();
    let mut protocol: Option<Protocol> = None;
    let mut negate = false;
    let mut action = Action::None;
    let mut statistic_random = false;
    let mut statistic_probability = false;
    let mut recent_name = false;
    let mut recent_check = false;
    let mut recent_set = false;
    let mut recent_seconds = false;
    let mut recent_reap = false;

    let mut i = 0;
    let value = |i: &mut usize, option: &str| -> Result<String> {
        *i += 1;
        match args.get(*i) {
            Some(v) => Ok(v.clone()),
            None => fail(format!("{option} needs a value")),
        }
    };
    let need = |modules: &[&str], wanted: &[&str], option: &str| -> Result<()> {
        if wanted.iter().any(|m| modules.contains(m)) {
            Ok(())
        } else {
            fail(format!("{option} without -m {}", wanted.join("|")))
        }
    };

    while i < args.len() {
        let option = args[i].as_str();
        let negated = std::mem::take(&mut negate);
        let mut push = |cond: Cond| matchers.push(Matcher { cond, negated });
        match option {
            "!" => {
                if negated {
                    return fail("double negation");
                }
                negate = true;
            }
            "-s" | "--source" => push(Cond::Source(parse_net(&value(&mut i, option)?)?)),
            "-d" | "--destination" => push(Cond::Destination(parse_net(&value(&mut i, option)?)?)),
            "-p" | "--protocol" => {
                let p = parse_protocol(&value(&mut i, option)?)?;
                if !negated {
                    protocol = Some(p);
                }
                push(Cond::Protocol(p));
            }
            "-i" | "--in-interface" => push(Cond::InInterface(value(&mut i, option)?)),
            "-m" | "--match" => {
                let module = value(&mut i, option)?;
                let Some(known) = MODULES.iter().find(|m| **m == module) else {
                    return fail(format!("match module {module:?} is not modelled"));
                };
                if negated {
                    return fail("! before -m");
                }
                modules.push(known);
            }
            "--comment" => {
                need(&modules, &["comment"], option)?;
                if negated {
                    return fail("! --comment");
                }
                value(&mut i, option)?;
            }
            "--dport" | "--destination-port" => {
                let port_modules = ["tcp", "udp", "sctp"];
                if protocol.is_none() {
                    return fail(format!("{option} without -p"));
                }
                need(&modules, &port_modules, option)?;
                let v = value(&mut i, option)?;
                let port = v
                    .parse()
                    .map_err(|_| TraceError(format!("port ranges are not modelled: {v:?}")))?;
                push(Cond::DestinationPort(port));
            }
            "--src-type" | "--dst-type" => {
                need(&modules, &["addrtype"], option)?;
                let v = value(&mut i, option)?;
                if v != "LOCAL" {
                    return fail(format!("address type {v:?} is not modelled"));
                }
                push(Cond::AddrTypeLocal {
                    source: option == "--src-type",
                });
            }
            "--mark" => {
                need(&modules, &["mark"], option)?;
                let (value, mask) = parse_mark(&value(&mut i, option)?)?;
                push(Cond::Mark { value, mask });
            }
            "--mode" => {
                need(&modules, &["statistic"], option)?;
                let v = value(&mut i, option)?;
                if v != "random" {
                    return fail(format!("statistic mode {v:?} is not modelled"));
                }
                statistic_random = true;
            }
            "--probability" => {
                need(&modules, &["statistic"], option)?;
                let v = value(&mut i, option)?;
                let p: f64 = v
                    .parse()
                    .map_err(|_| TraceError(format!("bad probability {v:?}")))?;
                if !(p > 0.0 && p < 1.0) {
                    return fail(format!("probability {v} is not strictly between 0 and 1"));
                }
                statistic_probability = true;
                push(Cond::Random);
            }
            "--name" => {
                need(&modules, &["recent"], option)?;
                check_chain_name(&value(&mut i, option)?)?;
                recent_name = true;
            }
            "--rcheck" => {
                need(&modules, &["recent"], option)?;
                recent_check = true;
                push(Cond::RecentCheck);
            }
            "--set" => {
                need(&modules, &["recent"], option)?;
                recent_set = true;
            }
            "--seconds" => {
                need(&modules, &["recent"], option)?;
                parse_u32(&value(&mut i, option)?)?;
                recent_seconds = true;
            }
            "--reap" => {
                need(&modules, &["recent"], option)?;
                recent_reap = true;
            }
            "--ctstate" => {
                need(&modules, &["conntrack"], option)?;
                let v = value(&mut i, option)?;
                let states: Vec<String> = v.split(',').map(str::to_owned).collect();
                for s in &states {
                    if ![
                        "NEW",
                        "ESTABLISHED",
                        "RELATED",
                        "INVALID",
                        "UNTRACKED",
                        "DNAT",
                        "SNAT",
                    ]
                    .contains(&s.as_str())
                    {
                        return fail(format!("conntrack state {s:?} is not modelled"));
                    }
                }
                push(Cond::CtState(states));
            }
            "-j" | "--jump" => {
                if negated {
                    return fail("! before -j");
                }
                let target = value(&mut i, option)?;
                action = parse_target(table, &target, &args[i + 1..])?;
                i = args.len();
                continue;
            }
            other => return fail(format!("option {other:?} is not modelled")),
        }
        i += 1;
    }
    if negate {
        return fail("trailing !");
    }
    if modules.contains(&"statistic") && !(statistic_random && statistic_probability) {
        return fail("-m statistic needs --mode random --probability");
    }
    if modules.contains(&"recent") {
        if !recent_name || recent_check == recent_set {
            return fail("-m recent needs --name and exactly one of --rcheck or --set");
        }
        if recent_reap && !recent_seconds {
            return fail("--reap needs --seconds");
        }
    }
    Ok(Rule {
        text: text.to_string(),
        matchers,
        action,
    })
}

fn parse_target(table: Table, target: &str, options: &[String]) -> Result<Action> {
    let opts: Vec<&str> = options.iter().map(String::as_str).collect();
    let only_in = |wanted: Table| -> Result<()> {
        if table == wanted {
            Ok(())
        } else {
            fail(format!("{target} is not valid in the {} table", table.as_str()))
        }
    };
    let action = match (target, opts.as_slice()) {
        ("ACCEPT", []) => Action::Accept,
        ("DROP", []) => Action::Drop,
        ("RETURN", []) => Action::Return,
        ("REJECT", []) | ("REJECT", ["--reject-with", _]) => {
            only_in(Table::Filter)?;
            Action::Reject
        }
        ("DNAT", ["--to-destination", to]) => {
            only_in(Table::Nat)?;
            let (ip, port) = parse_socket(to)?;
            Action::Dnat(ip, port)
        }
        ("MASQUERADE", []) | ("MASQUERADE", ["--random-fully"]) => {
            only_in(Table::Nat)?;
            Action::Masquerade
        }
        ("MARK", ["--or-mark", v]) => Action::Mark(MarkOp::Or(parse_u32(v)?)),
        ("MARK", ["--xor-mark", v]) => Action::Mark(MarkOp::Xor(parse_u32(v)?)),
        ("MARK", ["--set-xmark", v]) => {
            let (value, mask) = parse_mark(v)?;
            Action::Mark(MarkOp::SetX(value, mask))
        }
        (t, []) if !TARGETS.contains(&t) => {
            check_chain_name(t)?;
            Action::Jump(t.to_string())
        }
        (t, opts) => return fail(format!("target {t} with options {opts:?} is not modelled")),
    };
    Ok(action)
}

/// A packet on one branch of the walk.
#[derive(Clone, Debug)]
struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    protocol: Protocol,
    in_interface: Option<String>,
    mark: u32,
    dnat: Option<(IpAddr, u16)>,
    masquerade: bool,
    chains: Vec<String>,
}

/// How a walk through a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// Fell off the end, or RETURN.
    Return,
    Accept,
    Drop,
    Reject,
    /// A nat target (DNAT, MASQUERADE) decided: the nat hook is done.
    Nat,
}

impl Exit {
    /// The final verdict this exit is, if any (`None`: the packet goes on to the next hook).
    fn final_verdict(self, table: Table) -> Result<Option<PathVerdict>> {
        match self {
            Exit::Return | Exit::Accept | Exit::Nat => Ok(None),
            Exit::Drop => Ok(Some(PathVerdict::Drop)),
            Exit::Reject if table == Table::Filter => Ok(Some(PathVerdict::Reject)),
            Exit::Reject => fail("REJECT outside the filter table"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tri {
    Yes,
    No,
    Maybe,
}

fn interface_matches(pattern: &str, name: Option<&str>) -> bool {
    let Some(name) = name else { return false };
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

struct Walker<'a> {
    ruleset: &'a Ruleset,
    local: &'a [IpAddr],
}

impl Walker<'_> {
    fn eval(&self, matcher: &Matcher, pkt: &Pkt) -> Tri {
        let yes = match &matcher.cond {
            Cond::Source(net) => net.contains(&pkt.src),
            Cond::Destination(net) => net.contains(&pkt.dst),
            Cond::Protocol(p) => pkt.protocol == *p,
            Cond::InInterface(pattern) => interface_matches(pattern, pkt.in_interface.as_deref()),
            Cond::DestinationPort(port) => pkt.dport == *port,
            Cond::AddrTypeLocal { source } => self.local.contains(if *source { &pkt.src } else { &pkt.dst }),
            Cond::Mark { value, mask } => pkt.mark & mask == *value,
            Cond::Random | Cond::RecentCheck => return Tri::Maybe,
            Cond::CtState(states) => states.iter().any(|s| s == "NEW"),
        };
        if yes != matcher.negated { Tri::Yes } else { Tri::No }
    }

    fn matches(&self, rule: &Rule, pkt: &Pkt) -> Tri {
        let mut result = Tri::Yes;
        for m in &rule.matchers {
            match self.eval(m, pkt) {
                Tri::No => return Tri::No,
                Tri::Maybe => result = Tri::Maybe,
                Tri::Yes => {}
            }
        }
        result
    }

    /// Walks `pkt` through `chain`, returning every branch with how it left the chain.
    fn run(&self, table: Table, chain: &str, mut pkt: Pkt, depth: usize) -> Result<Vec<(Pkt, Exit)>> {
        if depth > 16 {
            return fail(format!("jumps nested too deep at {chain} (loop?)"));
        }
        let Some(rules) = self.ruleset.table(table).chains.get(chain) else {
            return fail(format!("no chain {chain} in {}", table.as_str()));
        };
        pkt.chains.push(format!("{}:{chain}", table.as_str()));
        let mut done = Vec::new();
        let mut pending = vec![(pkt, 0usize)];
        while let Some((mut pkt, mut next)) = pending.pop() {
            loop {
                let Some(rule) = rules.rules.get(next) else {
                    done.push((pkt, Exit::Return));
                    break;
                };
                next += 1;
                match self.matches(rule, &pkt) {
                    Tri::No => continue,
                    // The kernel may or may not take this rule: follow both.
                    Tri::Maybe => pending.push((pkt.clone(), next)),
                    Tri::Yes => {}
                }
                let exit = match &rule.action {
                    Action::None => continue,
                    Action::Mark(op) => {
                        pkt.mark = match *op {
                            MarkOp::Or(v) => pkt.mark | v,
                            MarkOp::Xor(v) => pkt.mark ^ v,
                            MarkOp::SetX(v, mask) => (pkt.mark & !mask) ^ v,
                        };
                        continue;
                    }
                    Action::Accept => Exit::Accept,
                    Action::Drop => Exit::Drop,
                    Action::Reject => Exit::Reject,
                    Action::Return => Exit::Return,
                    Action::Dnat(ip, port) => {
                        pkt.dnat = Some((*ip, *port));
                        pkt.dst = *ip;
                        pkt.dport = *port;
                        Exit::Nat
                    }
                    Action::Masquerade => {
                        pkt.masquerade = true;
                        Exit::Nat
                    }
                    Action::Jump(target) => {
                        for (sub, exit) in self.run(table, target, pkt, depth + 1)? {
                            match exit {
                                Exit::Return => pending.push((sub, next)),
                                other => done.push((sub, other)),
                            }
                        }
                        break;
                    }
                };
                done.push((pkt, exit));
                break;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Ruleset> {
        let mut r = Ruleset::new();
        r.restore(text)?;
        Ok(r)
    }

    fn packet(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: src.parse().unwrap(),
            protocol: Protocol::Tcp,
            dst: dst.parse().unwrap(),
            dport,
            origin: Origin::FromOutside {
                in_interface: "eth0".into(),
            },
        }
    }

    #[test]
    fn unknown_match_options_fail_loudly() {
        for rule in [
            "-A SWYD-X -m tcp -p tcp --sport 80 -j ACCEPT",
            "-A SWYD-X -m multiport -p tcp --dports 80,81 -j ACCEPT",
            "-A SWYD-X -o eth0 -j ACCEPT",
            "-A SWYD-X -p tcp --dport 80 -j ACCEPT",
            "-A SWYD-X -m statistic --mode nth --every 2 -j ACCEPT",
            "-A SWYD-X -j LOG --log-prefix x",
            "-A SWYD-X -m addrtype --dst-type UNICAST -j ACCEPT",
            "-A SWYD-X -m recent --name SWYD-X -j ACCEPT",
        ] {
            let text = format!("*filter\n:SWYD-X - [0:0]\n{rule}\nCOMMIT\n");
            assert!(load(&text).is_err(), "accepted {rule:?}");
        }
    }

    #[test]
    fn restore_refuses_what_the_kernel_refuses() {
        let cases = [
            (
                "append to a missing chain",
                "*nat\n-A SWYD-NOPE -j RETURN\nCOMMIT\n",
            ),
            (
                "jump to a missing chain",
                "*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j SWYD-B\nCOMMIT\n",
            ),
            (
                "declared twice",
                "*nat\n:SWYD-A - [0:0]\n:SWYD-A - [0:0]\nCOMMIT\n",
            ),
            (
                "name too long",
                "*nat\n:SWYD-AAAAAAAAAAAAAAAAAAAAAAAAAA - [0:0]\nCOMMIT\n",
            ),
            (
                "delete referenced",
                "*nat\n:SWYD-A - [0:0]\n:SWYD-B - [0:0]\n-A SWYD-A -j SWYD-B\n-X SWYD-B\nCOMMIT\n",
            ),
            (
                "delete non-empty",
                "*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j RETURN\n-X SWYD-A\nCOMMIT\n",
            ),
            (
                "REJECT in nat",
                "*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j REJECT\nCOMMIT\n",
            ),
            (
                "DNAT in filter",
                "*filter\n:SWYD-A - [0:0]\n-A SWYD-A -j DNAT --to-destination 1.2.3.4:80\nCOMMIT\n",
            ),
            ("missing COMMIT", "*nat\n:SWYD-A - [0:0]\n"),
            ("declaring a built-in", "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
        ];
        for (what, text) in cases {
            assert!(load(text).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn noflush_restore_keeps_undeclared_chains_and_flushes_declared_ones() {
        let mut r = load(
            "*nat\n:SWYD-A - [0:0]\n:SWYD-B - [0:0]\n-A SWYD-A -j RETURN\n-A SWYD-B -j RETURN\nCOMMIT\n",
        )
        .unwrap();
        r.restore("*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j SWYD-B\nCOMMIT\n")
            .unwrap();
        assert_eq!(r.nat.chains["SWYD-A"].rules.len(), 1);
        assert_eq!(r.nat.chains["SWYD-B"].rules.len(), 1);
    }

    #[test]
    fn a_failed_table_is_left_unchanged() {
        let mut r = load("*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j RETURN\nCOMMIT\n").unwrap();
        let before = r.clone();
        assert!(
            r.restore("*nat\n:SWYD-A - [0:0]\n-A SWYD-A -j SWYD-MISSING\nCOMMIT\n")
                .is_err()
        );
        assert_eq!(r, before);
    }

    #[test]
    fn walk_follows_matches_negation_interfaces_and_both_random_branches() {
        let text = "*nat\n\
            :SWYD-S - [0:0]\n:SWYD-A - [0:0]\n:SWYD-B - [0:0]\n\
            -A PREROUTING -j SWYD-S\n\
            -A SWYD-S ! -i veth+ -d 10.0.0.1 -j MARK --or-mark 0x4000\n\
            -A SWYD-S -m tcp -p tcp -d 10.0.0.1 --dport 80 -m statistic --mode random --probability 0.5000000000 -j SWYD-A\n\
            -A SWYD-S -m tcp -p tcp -d 10.0.0.1 --dport 80 -j SWYD-B\n\
            -A SWYD-A -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:8080\n\
            -A SWYD-B -m tcp -p tcp -j DNAT --to-destination 10.1.0.2:8080\n\
            -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n\
            COMMIT\n";
        let r = load(text).unwrap();
        let t = r.trace(&packet("192.0.2.1", "10.0.0.1", 80), &[]).unwrap();
        assert_eq!(
            t,
            Trace {
                verdict: Verdict::Dnat(["10.1.0.1:8080".to_string(), "10.1.0.2:8080".to_string()].into()),
                masquerade: true
            }
        );
        let mut from_pod = packet("10.1.0.9", "10.0.0.1", 80);
        from_pod.origin = Origin::FromLocalPod {
            in_interface: "veth12".into(),
        };
        assert!(!r.trace(&from_pod, &[]).unwrap().masquerade);
        let other_port = r.trace(&packet("192.0.2.1", "10.0.0.1", 81), &[]).unwrap();
        assert_eq!(other_port.verdict, Verdict::Accept);
    }

    #[test]
    fn trace_fails_when_branches_disagree() {
        let text = "*nat\n:SWYD-S - [0:0]\n-A PREROUTING -j SWYD-S\n\
            -A SWYD-S -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.1.0.1:80\n\
            COMMIT\n";
        let r = load(text).unwrap();
        assert!(r.trace(&packet("192.0.2.1", "10.0.0.1", 80), &[]).is_err());
        assert_eq!(
            r.trace_paths(&packet("192.0.2.1", "10.0.0.1", 80), &[])
                .unwrap()
                .len(),
            2
        );
    }
}
