//! The kernel edge of the iptables backend: applies rendered rule text with `iptables-restore`, reads it
//! back with `iptables-save`, and keeps the jump rules from the built-in chains into our chains in place.
//!
//! Everything above this module talks to the [`Iptables`] trait, so it can be tested without root;
//! [`IptablesRestore`] is the real implementation and stays small: it runs the `iptables-nft-*` or
//! `iptables-legacy-*` binaries (chosen explicitly, see [`BackendChoice`]) and never edits a rule it does
//! not own. Rules are owned when they live in a chain named with [`CHAIN_PREFIX`], or are one of the
//! [`JumpRule`]s the renderer hands to [`Iptables::ensure_jumps`] (recognised by their comment and target).
//!
//! Calls block: the sync loop runs them on a blocking thread.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::CHAIN_PREFIX;
use crate::model::IpFamily;

/// An iptables table Switchyard programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// The `nat` table (DNAT to endpoints, masquerade).
    Nat,
    /// The `filter` table (reject/drop for services without endpoints, firewall, forwarding).
    Filter,
}

impl Table {
    /// Both tables, in the order rule sets are rendered.
    pub const ALL: [Table; 2] = [Table::Nat, Table::Filter];

    /// The name iptables uses (`nat`, `filter`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Filter => "filter",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a jump rule sits in its built-in chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    /// At the head of the chain. When several jump rules of one chain are `First`, they form the head
    /// of the chain in the order they are given.
    First,
    /// Anywhere; appended when missing, never moved.
    Append,
}

/// A rule in a built-in chain that jumps into one of our chains.
///
/// `args` is the rule without the `-A <chain>` part, one argument per element (no shell quoting), e.g.
/// `["-m", "comment", "--comment", "switchyard service portals", "-j", "SWYD-SERVICES"]`. Every jump
/// rule must carry a `-m comment --comment` tag that is unique within its chain: the tag and the
/// target identify the rule when it has to be moved, de-duplicated or removed, also when an older agent
/// rendered it with different matches. Write the arguments the way `iptables -S` prints them (e.g.
/// `10.0.0.1/32`, not `10.0.0.1`): otherwise each [`Iptables::ensure_jumps`] pays for an extra `-C` check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct JumpRule {
    /// Table of the built-in chain.
    pub table: Table,
    /// The built-in chain (`PREROUTING`, `OUTPUT`, `FORWARD`, …).
    pub chain: &'static str,
    /// Rule arguments, including the comment tag and `-j <our chain>`.
    pub args: Vec<String>,
    /// Head of the chain, or anywhere.
    pub position: Position,
}

impl JumpRule {
    /// The value of `--comment`, if the rule has one.
    pub fn comment(&self) -> Option<&str> {
        value_after(&self.args, "--comment")
    }

    /// The jump target (`-j`/`--jump`), if any.
    pub fn target(&self) -> Option<&str> {
        value_after(&self.args, "-j").or_else(|| value_after(&self.args, "--jump"))
    }

    /// Whether an existing rule (its arguments after `-A <chain>`) is a version of this one: same
    /// comment and target, or (for a rule without comment) the same text.
    fn identifies(&self, existing: &[String]) -> bool {
        match self.comment() {
            Some(comment) => {
                value_after(existing, "--comment") == Some(comment)
                    && (value_after(existing, "-j").or_else(|| value_after(existing, "--jump")))
                        == self.target()
            }
            None => existing == self.args.as_slice(),
        }
    }
}

fn value_after<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// What [`Iptables::ensure_jumps`] had to change; all zero when everything was in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JumpChanges {
    /// Rules that were missing and were added.
    pub inserted: usize,
    /// Rules that existed but out of place (a `First` rule not at the head) or as a stale version
    /// (same comment and target, other matches), and were rewritten.
    pub rewritten: usize,
    /// Extra copies that were deleted.
    pub duplicates_removed: usize,
}

impl JumpChanges {
    /// Nothing had to change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The kernel boundary of the iptables backend.
///
/// Every method blocks until the command finished. Implementations must only touch chains named with
/// [`CHAIN_PREFIX`] and the jump rules they are given.
pub trait Iptables: Send + Sync {
    /// Applies `input` (the `iptables-restore` format, one or more `*table … COMMIT` sections) without
    /// flushing anything that is not named in it. Each table is applied atomically: on error the failing
    /// table and those after it are left untouched, the tables committed before it stay applied.
    fn restore(&self, family: IpFamily, input: &str) -> Result<(), ExecError>;

    /// The `iptables-save` output of one table.
    fn save(&self, family: IpFamily, table: Table) -> Result<String, ExecError>;

    /// Makes each jump rule exist exactly once, `First` rules at the head of their chain in the given
    /// order; rewrites an existing version of a rule (same comment and target) whose matches differ.
    /// Repairs of one table happen in one atomic `iptables-restore`, so a jump is never missing while it
    /// is moved. Our target chains are created (empty) when they do not exist yet.
    fn ensure_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<JumpChanges, ExecError>;

    /// Deletes every copy (any version) of the given jump rules; absent rules are fine. Returns how many
    /// rules were deleted.
    fn remove_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<usize, ExecError>;

    /// Whether `chain` exists in `table`.
    fn chain_exists(&self, family: IpFamily, table: Table, chain: &str) -> Result<bool, ExecError>;

    /// Whether the canary chain exists in both nat and filter. Our rule set declares it and only cleanup
    /// removes it, so its absence means someone flushed or deleted our chains and a full resync is due.
    fn canary_present(&self, family: IpFamily, canary: &str) -> Result<bool, ExecError> {
        for table in Table::ALL {
            if !self.chain_exists(family, table, canary)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Chains of `table` whose names start with [`CHAIN_PREFIX`] (leftovers at start, cleanup).
    fn list_owned_chains(&self, family: IpFamily, table: Table) -> Result<BTreeSet<String>, ExecError> {
        Ok(owned_chains(&self.save(family, table)?))
    }
}

/// Chains named with [`CHAIN_PREFIX`] declared in `iptables-save` output.
pub fn owned_chains(save_output: &str) -> BTreeSet<String> {
    save_output
        .lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|chain| chain.starts_with(CHAIN_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Which iptables implementation programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// `iptables-nft`: xtables rules stored in nf_tables.
    Nft,
    /// `iptables-legacy`: the old xtables kernel tables.
    Legacy,
}

impl Backend {
    /// `nft` or `legacy`, as in the binary names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to choose the [`Backend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Look at what the node already uses, as kube-proxy's iptables wrapper does (see [`Detection`]).
    #[default]
    Detect,
    /// Use this backend without looking.
    Force(Backend),
}

/// Why a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectionReason {
    /// Forced by configuration.
    Forced,
    /// kubelet's hint chain (`KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY`) exists in this backend.
    KubeletHint,
    /// Decided on what each backend holds (rules plus user-defined chains, v4 and v6 together):
    /// legacy when only legacy holds something, nft otherwise.
    Entries {
        /// Entries in the legacy tables.
        legacy: usize,
        /// Entries in the nft-backed tables.
        nft: usize,
    },
}

/// The backend in use and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The chosen backend.
    pub backend: Backend,
    /// Why.
    pub reason: DetectionReason,
}

/// The three binaries of one backend and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tools {
    /// `iptables-nft`, `ip6tables-legacy`, …
    pub iptables: PathBuf,
    /// `iptables-nft-save`, …
    pub save: PathBuf,
    /// `iptables-nft-restore`, …
    pub restore: PathBuf,
}

impl Tools {
    /// The standard binary names (looked up in `PATH`).
    pub fn standard(backend: Backend, family: IpFamily) -> Self {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let backend = backend.as_str();
        Self {
            iptables: PathBuf::from(format!("{base}-{backend}")),
            save: PathBuf::from(format!("{base}-{backend}-save")),
            restore: PathBuf::from(format!("{base}-{backend}-restore")),
        }
    }
}

/// Errors of the iptables kernel edge.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A binary is not installed (or not where configured).
    #[error("{binary} not found")]
    BinaryMissing {
        /// The binary as configured.
        binary: PathBuf,
        /// The lookup or spawn error.
        #[source]
        source: io::Error,
    },
    /// A binary exists but could not be started, or talking to it failed.
    #[error("running {binary} failed")]
    Io {
        /// The binary.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command did not finish in time and was killed.
    #[error("{binary} did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The binary.
        binary: PathBuf,
        /// The configured limit.
        timeout: Duration,
    },
    /// `iptables-restore` refused the input; the failing table and those after it are unchanged.
    #[error("{binary} ({family}) failed with {status}{}: {stderr}", failing_line(*.line, .line_text.as_deref()))]
    RestoreFailed {
        /// Family of the rule set.
        family: IpFamily,
        /// The restore binary.
        binary: PathBuf,
        /// Exit status.
        status: ExitStatus,
        /// 1-based input line iptables-restore reported, if any.
        line: Option<usize>,
        /// That line of the input.
        line_text: Option<String>,
        /// What the command wrote to stderr (trimmed).
        stderr: String,
    },
    /// Another iptables command failed.
    #[error("{binary} {args} failed with {status}: {stderr}")]
    CommandFailed {
        /// The binary.
        binary: PathBuf,
        /// Its arguments, space separated.
        args: String,
        /// Exit status.
        status: ExitStatus,
        /// What the command wrote to stderr (trimmed).
        stderr: String,
    },
}

fn failing_line(line: Option<usize>, text: Option<&str>) -> String {
    match (line, text) {
        (Some(n), Some(text)) => format!(" at line {n} ({text})"),
        (Some(n), None) => format!(" at line {n}"),
        _ => String::new(),
    }
}

impl ExecError {
    /// Short stable name for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Self::BinaryMissing { .. } => "binary_missing",
            Self::Io { .. } => "io",
            Self::Timeout { .. } => "timeout",
            Self::RestoreFailed { .. } => "restore_failed",
            Self::CommandFailed { .. } => "command_failed",
        }
    }
}

/// Default limit for one command; a full restore of 10k services takes a few seconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default wait for the xtables lock (legacy backend; nft ignores it), as upstream.
const DEFAULT_LOCK_WAIT_SECONDS: u32 = 5;

/// Builds an [`IptablesRestore`].
#[derive(Clone, Debug, Default)]
pub struct IptablesRestoreBuilder {
    backend: BackendChoice,
    overrides: Vec<(Backend, IpFamily, Tools)>,
    command_prefix: Vec<OsString>,
    timeout: Option<Duration>,
    lock_wait_seconds: Option<u32>,
}

impl IptablesRestoreBuilder {
    /// Detect the backend (default) or force one.
    pub fn backend(mut self, choice: BackendChoice) -> Self {
        self.backend = choice;
        self
    }

    /// Uses these binaries for one backend and family instead of the standard names.
    pub fn tools(mut self, backend: Backend, family: IpFamily, tools: Tools) -> Self {
        self.overrides.retain(|(b, f, _)| (*b, *f) != (backend, family));
        self.overrides.push((backend, family, tools));
        self
    }

    /// Runs every command through this prefix, e.g. `ip netns exec <name>`. The agent itself runs in
    /// the node's namespace and needs none; tests and tools that program another network namespace do.
    pub fn command_prefix<I, S>(mut self, prefix: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.command_prefix = prefix.into_iter().map(Into::into).collect();
        self
    }

    /// Kills a command that runs longer than this (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long the legacy backend waits for the xtables lock (default 5 s).
    pub fn lock_wait_seconds(mut self, seconds: u32) -> Self {
        self.lock_wait_seconds = Some(seconds);
        self
    }

    /// Chooses the backend (running the save binaries of both when detecting) and returns the executor.
    /// Missing binaries are not an error here: they surface as [`ExecError::BinaryMissing`] on use.
    pub fn build(self) -> IptablesRestore {
        let tools_for = |backend: Backend, family: IpFamily| {
            self.overrides
                .iter()
                .find(|(b, f, _)| (*b, *f) == (backend, family))
                .map(|(_, _, tools)| tools.clone())
                .unwrap_or_else(|| Tools::standard(backend, family))
        };
        let runner = Runner {
            prefix: self.command_prefix,
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
        };
        let detection = match self.backend {
            BackendChoice::Force(backend) => Detection {
                backend,
                reason: DetectionReason::Forced,
            },
            BackendChoice::Detect => detect(&runner, &tools_for),
        };
        tracing::info!(
            backend = %detection.backend,
            reason = ?detection.reason,
            "iptables backend chosen"
        );
        IptablesRestore {
            detection,
            v4: tools_for(detection.backend, IpFamily::V4),
            v6: tools_for(detection.backend, IpFamily::V6),
            lock_wait: self
                .lock_wait_seconds
                .unwrap_or(DEFAULT_LOCK_WAIT_SECONDS)
                .to_string(),
            runner,
        }
    }
}

/// The real [`Iptables`]: runs `iptables-restore`, `iptables-save` and `iptables` of one backend.
#[derive(Debug)]
pub struct IptablesRestore {
    detection: Detection,
    v4: Tools,
    v6: Tools,
    lock_wait: String,
    runner: Runner,
}

impl IptablesRestore {
    /// Uses `backend` with the standard binaries.
    pub fn new(backend: Backend) -> Self {
        Self::builder().backend(BackendChoice::Force(backend)).build()
    }

    /// Detects the backend (see [`BackendChoice::Detect`]) and uses the standard binaries.
    pub fn detect() -> Self {
        Self::builder().build()
    }

    /// A builder for everything configurable.
    pub fn builder() -> IptablesRestoreBuilder {
        IptablesRestoreBuilder::default()
    }

    /// The backend in use and why it was chosen.
    pub fn detection(&self) -> Detection {
        self.detection
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.detection.backend
    }

    /// Whether every binary this executor runs (both families, and the command prefix) is installed.
    /// `cleanup` uses it to skip a backend that cannot have rules.
    pub fn available(&self) -> bool {
        let prefix = self.runner.prefix.first().map(Path::new);
        [&self.v4, &self.v6]
            .into_iter()
            .flat_map(|t| [&t.iptables, &t.save, &t.restore])
            .map(PathBuf::as_path)
            .chain(prefix)
            .all(|binary| resolve(binary).is_ok())
    }

    /// Whether this implementation holds any table at all, in either family (`*-save` without `-t`
    /// prints only the tables that exist, and creates none).
    pub fn has_tables(&self) -> bool {
        IpFamily::ALL.into_iter().any(|family| {
            self.runner
                .run(&self.tools(family).save, &[], None)
                .is_ok_and(|out| out.stdout.lines().any(|l| l.starts_with('*')))
        })
    }

    /// The binaries used for `family`.
    pub fn tools(&self, family: IpFamily) -> &Tools {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    /// Runs the `iptables` binary with `-w <secs> -t <table>` and `args`.
    fn iptables(&self, family: IpFamily, table: Table, args: &[&str]) -> Result<Finished, ExecError> {
        let mut all = vec!["-w", self.lock_wait.as_str(), "-t", table.as_str()];
        all.extend_from_slice(args);
        self.runner.run(&self.tools(family).iptables, &all, None)
    }

    /// The rules of a built-in chain, each as its arguments after `-A <chain>`.
    fn list_chain(&self, family: IpFamily, table: Table, chain: &str) -> Result<Vec<Vec<String>>, ExecError> {
        let out = self.iptables(family, table, &["-S", chain])?;
        if !out.status.success() {
            return Err(out.failed(&self.tools(family).iptables, &["-t", table.as_str(), "-S", chain]));
        }
        Ok(chain_rules(&out.stdout, chain))
    }

    /// Whether `args` exist in `chain` (iptables compares semantically, e.g. `/32` or not).
    fn check_rule(
        &self,
        family: IpFamily,
        table: Table,
        chain: &str,
        args: &[String],
    ) -> Result<bool, ExecError> {
        let mut all = vec!["-C", chain];
        all.extend(args.iter().map(String::as_str));
        let out = self.iptables(family, table, &all)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(out.failed(&self.tools(family).iptables, &all)),
        }
    }

    /// Applies a repair script of one table (`-N`, `-D`, `-I`, `-A` lines).
    fn restore_table(&self, family: IpFamily, table: Table, lines: &[String]) -> Result<(), ExecError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut input = format!("*{table}\n");
        for line in lines {
            input.push_str(line);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
        self.restore(family, &input)
    }
}

impl Iptables for IptablesRestore {
    fn restore(&self, family: IpFamily, input: &str) -> Result<(), ExecError> {
        let binary = &self.tools(family).restore;
        let wait = format!("--wait={}", self.lock_wait);
        let started = Instant::now();
        let out = self.runner.run(binary, &["--noflush", &wait], Some(input))?;
        if out.status.success() {
            tracing::debug!(%family, bytes = input.len(), elapsed = ?started.elapsed(), "iptables-restore applied");
            return Ok(());
        }
        let line = reported_line(&out.stderr);
        let line_text = line
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| input.lines().nth(i))
            .map(|text| truncate(text, 200));
        Err(ExecError::RestoreFailed {
            family,
            binary: binary.clone(),
            status: out.status,
            line,
            line_text,
            stderr: out.stderr.trim().to_owned(),
        })
    }

    fn save(&self, family: IpFamily, table: Table) -> Result<String, ExecError> {
        let binary = &self.tools(family).save;
        let args = ["-t", table.as_str()];
        let out = self.runner.run(binary, &args, None)?;
        if !out.status.success() {
            return Err(out.failed(binary, &args));
        }
        Ok(out.stdout)
    }

    fn ensure_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<JumpChanges, ExecError> {
        let mut changes = JumpChanges::default();
        for table in Table::ALL {
            let mut script = Vec::new();
            let mut new_targets = BTreeSet::new();
            for chain in chains_of(rules, table) {
                let wanted: Vec<&JumpRule> = rules
                    .iter()
                    .filter(|r| r.table == table && r.chain == chain)
                    .collect();
                let existing = self.list_chain(family, table, chain)?;
                let plan = plan_chain(chain, &existing, &wanted, |rule| {
                    self.check_rule(family, table, chain, &rule.args)
                })?;
                if plan.inserted > 0 {
                    new_targets.extend(
                        wanted
                            .iter()
                            .filter_map(|r| r.target())
                            .filter(|t| t.starts_with(CHAIN_PREFIX)),
                    );
                }
                changes.inserted += plan.inserted;
                changes.rewritten += plan.rewritten;
                changes.duplicates_removed += plan.duplicates_removed;
                script.extend(plan.lines);
            }
            if script.is_empty() {
                continue;
            }
            // A jump to a chain that does not exist is refused; create ours (empty) in the same transaction.
            let mut create = Vec::new();
            for target in new_targets {
                if !self.chain_exists(family, table, target)? {
                    create.push(format!("-N {}", quote_arg(target)));
                }
            }
            create.extend(script);
            tracing::info!(%family, %table, ?changes, "repairing jump rules");
            self.restore_table(family, table, &create)?;
        }
        Ok(changes)
    }

    fn remove_jumps(&self, family: IpFamily, rules: &[JumpRule]) -> Result<usize, ExecError> {
        let mut removed = 0;
        for table in Table::ALL {
            let mut script = Vec::new();
            for chain in chains_of(rules, table) {
                let existing = self.list_chain(family, table, chain)?;
                for rule_args in &existing {
                    let ours = rules
                        .iter()
                        .any(|r| r.table == table && r.chain == chain && r.identifies(rule_args));
                    if ours {
                        script.push(rule_line("-D", chain, rule_args));
                    }
                }
            }
            removed += script.len();
            self.restore_table(family, table, &script)?;
        }
        Ok(removed)
    }

    fn chain_exists(&self, family: IpFamily, table: Table, chain: &str) -> Result<bool, ExecError> {
        let out = self.iptables(family, table, &["-S", chain])?;
        match out.status.code() {
            Some(0) => Ok(true),
            // iptables exits 1 for "no such chain" (nft words it as "incompatible").
            Some(1) => Ok(false),
            _ => Err(out.failed(&self.tools(family).iptables, &["-t", table.as_str(), "-S", chain])),
        }
    }
}

/// The distinct built-in chains of `table` the rules use, in first-use order.
fn chains_of(rules: &[JumpRule], table: Table) -> Vec<&'static str> {
    let mut chains: Vec<&'static str> = Vec::new();
    for rule in rules.iter().filter(|r| r.table == table) {
        if !chains.contains(&rule.chain) {
            chains.push(rule.chain);
        }
    }
    chains
}

/// The repair of one built-in chain: restore lines and what they change.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChainPlan {
    lines: Vec<String>,
    inserted: usize,
    rewritten: usize,
    duplicates_removed: usize,
}

/// Plans the repair of one chain. `existing` is the chain's rules in order (arguments after `-A chain`);
/// `wanted` its jump rules. A rule is in place when exactly one version of it exists and it is the
/// wanted text (or `check` — iptables `-C` — says the wanted rule exists, for non-canonical spellings).
/// `First` rules must be the head of the chain in order; when they are not, all of them are deleted
/// and re-inserted at the head. Deletions name the existing text, so stale versions go too.
fn plan_chain<F>(
    chain: &str,
    existing: &[Vec<String>],
    wanted: &[&JumpRule],
    mut check: F,
) -> Result<ChainPlan, ExecError>
where
    F: FnMut(&JumpRule) -> Result<bool, ExecError>,
{
    let mut plan = ChainPlan::default();
    let versions = |rule: &JumpRule| -> Vec<usize> {
        existing
            .iter()
            .enumerate()
            .filter(|(_, args)| rule.identifies(args))
            .map(|(i, _)| i)
            .collect()
    };
    let mut in_place = Vec::with_capacity(wanted.len());
    for rule in wanted {
        let place = match versions(rule).as_slice() {
            [only] if existing[*only] == rule.args || check(rule)? => Some(*only),
            _ => None,
        };
        in_place.push(place);
    }

    let first: Vec<usize> = (0..wanted.len())
        .filter(|&i| wanted[i].position == Position::First)
        .collect();
    let head_ok = first
        .iter()
        .enumerate()
        .all(|(slot, &i)| in_place[i] == Some(slot));
    let mut deletions = Vec::new();
    let mut insertions = Vec::new();
    let mut slot = 0;
    for (i, rule) in wanted.iter().enumerate() {
        let (rewrite, moved) = match rule.position {
            Position::First => {
                slot += 1;
                (!head_ok, in_place[i] != Some(slot - 1))
            }
            Position::Append => (in_place[i].is_none(), true),
        };
        if !rewrite {
            continue;
        }
        let found = versions(rule);
        match found.len() {
            0 => plan.inserted += 1,
            n => {
                plan.duplicates_removed += n - 1;
                // Duplicates of an appended rule are only de-duplicated, not moved.
                plan.rewritten += usize::from(moved && !(rule.position == Position::Append && n > 1));
            }
        }
        deletions.extend(found);
        insertions.push(*rule);
    }
    deletions.sort_unstable();
    deletions.dedup();
    for i in deletions {
        plan.lines.push(rule_line("-D", chain, &existing[i]));
    }
    let mut head = 0;
    for rule in insertions {
        match rule.position {
            Position::First => {
                head += 1;
                plan.lines.push(rule_line(
                    &format!("-I {} {head}", quote_arg(chain)),
                    "",
                    &rule.args,
                ));
            }
            Position::Append => plan.lines.push(rule_line("-A", chain, &rule.args)),
        }
    }
    Ok(plan)
}

/// `<command> <chain> <args…>` quoted for iptables-restore (an empty chain is left out).
fn rule_line(command: &str, chain: &str, args: &[String]) -> String {
    let mut line = command.to_owned();
    if !chain.is_empty() {
        line.push(' ');
        line.push_str(&quote_arg(chain));
    }
    for arg in args {
        line.push(' ');
        line.push_str(&quote_arg(arg));
    }
    line
}

/// Quotes one argument for `iptables-restore` input the way `iptables-save` does: in double quotes,
/// with `"` and `\` escaped, when it is empty or contains whitespace, quotes or backslashes.
pub fn quote_arg(arg: &str) -> String {
    let plain = !arg.is_empty()
        && !arg
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '\\');
    if plain {
        return arg.to_owned();
    }
    let mut quoted = String::with_capacity(arg.len() + 2);
    quoted.push('"');
    for c in arg.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Splits one line of `iptables-save`/`iptables -S` output into arguments (inverse of [`quote_arg`]).
pub fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut in_arg = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut current));
                    in_arg = false;
                }
            }
            c => {
                current.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(current);
    }
    args
}

/// The rules of `chain` in `iptables -S` (or save) output, as arguments after `-A <chain>`.
fn chain_rules(output: &str, chain: &str) -> Vec<Vec<String>> {
    output
        .lines()
        .filter(|line| line.starts_with("-A "))
        .map(split_rule)
        .filter(|args| args.get(1).map(String::as_str) == Some(chain))
        .map(|args| args.into_iter().skip(2).collect())
        .collect()
}

/// The input line iptables-restore blames: "Error occurred at line: 7", "line 4 failed",
/// "COMMIT expected at line 4".
fn reported_line(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(at) = rest.find("line") {
        rest = &rest[at + "line".len()..];
        let digits: String = rest
            .trim_start_matches(':')
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    None
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Entries of `iptables-save` output that show a backend is in use: rules and user-defined chains.
/// Built-in chains do not count: listing the legacy tables creates them empty.
fn count_entries(save_output: &str) -> usize {
    save_output
        .lines()
        .filter(|line| {
            line.starts_with("-A ")
                || line
                    .strip_prefix(':')
                    .is_some_and(|rest| rest.split_whitespace().nth(1) == Some("-"))
        })
        .count()
}

/// kubelet creates these in the backend it uses; kube-proxy's iptables wrapper trusts them first.
fn has_kubelet_hint(save_output: &str) -> bool {
    save_output
        .lines()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|rest| rest.split_whitespace().next())
        .any(|chain| chain == "KUBE-IPTABLES-HINT" || chain == "KUBE-KUBELET-CANARY")
}

/// Chooses the backend like kube-proxy's iptables wrapper: a kubelet hint chain wins; otherwise legacy
/// when only legacy holds rules (v4 or v6), nft in every other case. A backend whose save binary is
/// missing or fails counts as empty.
fn detect(runner: &Runner, tools_for: &dyn Fn(Backend, IpFamily) -> Tools) -> Detection {
    let dump = |backend: Backend| -> String {
        let mut all = String::new();
        for family in IpFamily::ALL {
            let save = tools_for(backend, family).save;
            match runner.run(&save, &[], None) {
                Ok(out) if out.status.success() => all.push_str(&out.stdout),
                Ok(out) => {
                    tracing::warn!(binary = %save.display(), stderr = out.stderr.trim(), "save failed while detecting the backend")
                }
                Err(err) => {
                    tracing::warn!(binary = %save.display(), error = %err, "save failed while detecting the backend")
                }
            }
        }
        all
    };
    let nft = dump(Backend::Nft);
    let legacy = dump(Backend::Legacy);
    if has_kubelet_hint(&nft) {
        Detection {
            backend: Backend::Nft,
            reason: DetectionReason::KubeletHint,
        }
    } else if has_kubelet_hint(&legacy) {
        Detection {
            backend: Backend::Legacy,
            reason: DetectionReason::KubeletHint,
        }
    } else {
        let (legacy, nft) = (count_entries(&legacy), count_entries(&nft));
        let backend = if legacy > 0 && nft == 0 {
            Backend::Legacy
        } else {
            Backend::Nft
        };
        Detection {
            backend,
            reason: DetectionReason::Entries { legacy, nft },
        }
    }
}

/// Runs commands (through an optional prefix) with a time limit. Shared with the other tools the agent
/// runs (`nft` for leftovers of the nftables mode).
#[derive(Clone, Debug)]
pub(crate) struct Runner {
    prefix: Vec<OsString>,
    timeout: Duration,
}

/// A finished command.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    pub(crate) fn failed(&self, binary: &Path, args: &[&str]) -> ExecError {
        ExecError::CommandFailed {
            binary: binary.to_path_buf(),
            args: args.join(" "),
            status: self.status,
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

impl Runner {
    /// A runner with `prefix` (e.g. `ip netns exec <name>`) that kills commands after `timeout`.
    pub(crate) fn new(prefix: Vec<OsString>, timeout: Duration) -> Self {
        Self { prefix, timeout }
    }

    pub(crate) fn run(
        &self,
        binary: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<Finished, ExecError> {
        let resolved = resolve(binary)?;
        let mut command = match self.prefix.split_first() {
            Some((wrapper, rest)) => {
                let mut command = Command::new(resolve(Path::new(wrapper))?);
                command.args(rest).arg(&resolved);
                command
            }
            None => Command::new(&resolved),
        };
        command
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let io_err = |source| ExecError::Io {
            binary: binary.to_path_buf(),
            source,
        };
        let mut child = command.spawn().map_err(|source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => ExecError::BinaryMissing {
                binary: binary.to_path_buf(),
                source,
            },
            _ => io_err(source),
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // Feed stdin and drain both pipes on their own threads so a large input or a chatty command
        // cannot deadlock on a full pipe.
        let (status, written, stdout, stderr) = thread::scope(|scope| {
            let writer = scope.spawn(move || write_input(stdin, input));
            let out = scope.spawn(move || read_all(stdout));
            let err = scope.spawn(move || read_all(stderr));
            let status = wait_with_timeout(&mut child, self.timeout);
            let joined = |r: thread::Result<io::Result<String>>| {
                r.unwrap_or_else(|_| Err(io::Error::other("pipe thread panicked")))
            };
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("stdin thread panicked")));
            (status, written, joined(out.join()), joined(err.join()))
        });
        let status = match status.map_err(io_err)? {
            Some(status) => status,
            None => {
                return Err(ExecError::Timeout {
                    binary: binary.to_path_buf(),
                    timeout: self.timeout,
                });
            }
        };
        // The command may exit (refusing the input) before reading all of it; its status tells.
        match written {
            Err(err) if err.kind() != io::ErrorKind::BrokenPipe && status.success() => {
                return Err(io_err(err));
            }
            _ => {}
        }
        Ok(Finished {
            status,
            stdout: stdout.map_err(io_err)?,
            stderr: stderr.map_err(io_err)?,
        })
    }
}

fn write_input(stdin: Option<std::process::ChildStdin>, input: Option<&str>) -> io::Result<()> {
    match (stdin, input) {
        (Some(mut stdin), Some(input)) => stdin.write_all(input.as_bytes()),
        _ => Ok(()),
    }
}

fn read_all<R: Read>(pipe: Option<R>) -> io::Result<String> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut buf)?;
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Waits for the child; kills it after `timeout` and returns `None`.
fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // Killing is safe: both backends commit a table in one kernel call, so a killed restore has
            // either applied a table fully or not at all.
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Finds `binary` (a path, or a bare name looked up in `PATH`) so a missing one is reported as such
/// also when it runs behind a prefix.
fn resolve(binary: &Path) -> Result<PathBuf, ExecError> {
    let missing = |detail: &str| ExecError::BinaryMissing {
        binary: binary.to_path_buf(),
        source: io::Error::new(io::ErrorKind::NotFound, detail.to_owned()),
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if binary.is_file() {
            Ok(binary.to_path_buf())
        } else {
            Err(missing("no such file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| missing("not found in PATH"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        split_rule(text)
    }

    fn jump(chain: &'static str, comment: &str, target: &str, position: Position) -> JumpRule {
        JumpRule {
            table: Table::Nat,
            chain,
            args: vec![
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                comment.into(),
                "-j".into(),
                target.into(),
            ],
            position,
        }
    }

    fn never_checked(_: &JumpRule) -> Result<bool, ExecError> {
        panic!("-C should not be needed")
    }

    #[test]
    fn quoting_round_trips_through_the_save_tokenizer() {
        for arg in [
            "plain",
            "two words",
            "",
            "quote \" and \\ backslash",
            "tab\there",
            "it's",
        ] {
            let line = format!("-A X --comment {} -j Y", quote_arg(arg));
            assert_eq!(
                split_rule(&line),
                vec!["-A", "X", "--comment", arg, "-j", "Y"],
                "{line}"
            );
        }
        assert_eq!(quote_arg("SWYD-SERVICES"), "SWYD-SERVICES");
        assert_eq!(quote_arg("a b"), "\"a b\"");
    }

    #[test]
    fn tokenizer_reads_iptables_save_quoting() {
        let line = r#"-A PREROUTING -m comment --comment "sw \"q\" \\x" -j SWYD-A"#;
        assert_eq!(split_rule(line)[5], r#"sw "q" \x"#);
    }

    #[test]
    fn owned_chains_lists_only_prefixed_chain_declarations() {
        let save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:SWYD-SERVICES - [0:0]\n\
                    :KUBE-SERVICES - [0:0]\n:SWYD-SVC-ABC - [3:180]\n-A SWYD-SERVICES -j SWYD-FAKE\nCOMMIT\n";
        let chains: Vec<_> = owned_chains(save).into_iter().collect();
        assert_eq!(chains, vec!["SWYD-SERVICES", "SWYD-SVC-ABC"]);
    }

    #[test]
    fn reported_line_understands_every_iptables_restore_message() {
        assert_eq!(
            reported_line("unknown option \"--bogus\"\nError occurred at line: 7\nTry"),
            Some(7)
        );
        assert_eq!(
            reported_line("iptables-nft-restore: line 4 failed: No chain"),
            Some(4)
        );
        assert_eq!(reported_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(
            reported_line("iptables-nft-restore: COMMIT expected at line 4"),
            Some(4)
        );
        assert_eq!(
            reported_line("iptables-restore: unable to initialize table 'nat'"),
            None
        );
    }

    #[test]
    fn detection_counts_rules_and_user_chains_but_not_builtin_chains() {
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(count_entries(empty), 0);
        let used =
            "*filter\n:INPUT ACCEPT [0:0]\n:OTHER - [0:0]\n-A INPUT -j OTHER\n-A OTHER -j ACCEPT\nCOMMIT\n";
        assert_eq!(count_entries(used), 3);
        assert!(has_kubelet_hint("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"));
        assert!(!has_kubelet_hint(used));
    }

    #[test]
    fn error_categories_are_stable() {
        let missing = resolve(Path::new("/nonexistent/iptables-restore")).unwrap_err();
        assert_eq!(missing.category(), "binary_missing");
        let missing = resolve(Path::new("swyd-no-such-binary-anywhere")).unwrap_err();
        assert_eq!(missing.category(), "binary_missing");
    }

    #[test]
    fn plan_is_empty_when_jumps_are_in_place() {
        let a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::First);
        let b = jump("PREROUTING", "switchyard b", "SWYD-B", Position::First);
        let c = jump("PREROUTING", "switchyard c", "SWYD-C", Position::Append);
        let existing = vec![
            a.args.clone(),
            b.args.clone(),
            args("-j OTHER"),
            c.args.clone(),
            args("-j LAST"),
        ];
        let plan = plan_chain("PREROUTING", &existing, &[&a, &b, &c], never_checked).unwrap();
        assert_eq!(plan, ChainPlan::default());
    }

    #[test]
    fn plan_inserts_missing_jumps_at_the_head_in_order_and_appends_the_rest() {
        let a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::First);
        let b = jump("PREROUTING", "switchyard b", "SWYD-B", Position::First);
        let c = jump("PREROUTING", "switchyard c", "SWYD-C", Position::Append);
        let existing = vec![args("-j OTHER")];
        let plan = plan_chain("PREROUTING", &existing, &[&a, &b, &c], never_checked).unwrap();
        assert_eq!(
            plan.lines,
            vec![
                r#"-I PREROUTING 1 -m comment --comment "switchyard a" -j SWYD-A"#,
                r#"-I PREROUTING 2 -m comment --comment "switchyard b" -j SWYD-B"#,
                r#"-A PREROUTING -m comment --comment "switchyard c" -j SWYD-C"#,
            ]
        );
        assert_eq!(
            (plan.inserted, plan.rewritten, plan.duplicates_removed),
            (3, 0, 0)
        );
    }

    #[test]
    fn plan_moves_a_first_jump_back_to_the_head_and_drops_duplicates() {
        let a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::First);
        let existing = vec![args("-j OTHER"), a.args.clone(), a.args.clone()];
        let plan = plan_chain("PREROUTING", &existing, &[&a], never_checked).unwrap();
        assert_eq!(
            plan.lines,
            vec![
                r#"-D PREROUTING -m comment --comment "switchyard a" -j SWYD-A"#,
                r#"-D PREROUTING -m comment --comment "switchyard a" -j SWYD-A"#,
                r#"-I PREROUTING 1 -m comment --comment "switchyard a" -j SWYD-A"#,
            ]
        );
        assert_eq!(
            (plan.inserted, plan.rewritten, plan.duplicates_removed),
            (0, 1, 1)
        );
    }

    #[test]
    fn plan_replaces_a_stale_version_of_a_jump() {
        let a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::Append);
        let stale = args(r#"-m addrtype --dst-type LOCAL -m comment --comment "switchyard a" -j SWYD-A"#);
        let existing = vec![args("-j OTHER"), stale];
        let plan = plan_chain("PREROUTING", &existing, &[&a], |_| Ok(false)).unwrap();
        assert_eq!(
            plan.lines,
            vec![
                r#"-D PREROUTING -m addrtype --dst-type LOCAL -m comment --comment "switchyard a" -j SWYD-A"#,
                r#"-A PREROUTING -m comment --comment "switchyard a" -j SWYD-A"#,
            ]
        );
        assert_eq!(
            (plan.inserted, plan.rewritten, plan.duplicates_removed),
            (0, 1, 0)
        );
    }

    #[test]
    fn plan_accepts_a_non_canonical_spelling_when_iptables_says_it_matches() {
        let mut a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::First);
        a.args.splice(0..0, ["-d".to_owned(), "10.0.0.1".to_owned()]);
        let existing = vec![args(
            r#"-d 10.0.0.1/32 -m comment --comment "switchyard a" -j SWYD-A"#,
        )];
        let plan = plan_chain("PREROUTING", &existing, &[&a], |_| Ok(true)).unwrap();
        assert_eq!(plan, ChainPlan::default());
    }

    #[test]
    fn jump_rule_identity_is_comment_and_target() {
        let a = jump("PREROUTING", "switchyard a", "SWYD-A", Position::First);
        assert_eq!(a.comment(), Some("switchyard a"));
        assert_eq!(a.target(), Some("SWYD-A"));
        assert!(a.identifies(&args(
            r#"-m comment --comment "switchyard a" -m addrtype --dst-type LOCAL -j SWYD-A"#
        )));
        assert!(!a.identifies(&args(r#"-m comment --comment "switchyard a" -j SWYD-B"#)));
        assert!(!a.identifies(&args(r#"-m comment --comment "other" -j SWYD-A"#)));
    }
}
