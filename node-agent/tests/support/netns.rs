//! Network namespaces owned by a test, and the plumbing between them.

use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::cmd::{self, CmdError, Process};

/// Every namespace a test creates starts with this; `remove_leftovers` relies on it.
pub const NETNS_PREFIX: &str = "swyd-t-";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static LEFTOVERS: Once = Once::new();

/// A network namespace created for a test, deleted (with every process still in it) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `swyd-t-<pid>-<n>-<label>` with loopback up and IPv6 duplicate address detection off
    /// (addresses are usable at once). The first call of a process removes leftovers of dead runs.
    pub fn new(label: &str) -> Result<Self, CmdError> {
        LEFTOVERS.call_once(|| {
            for (name, err) in remove_leftovers() {
                eprintln!("could not remove leftover namespace {name}: {err}");
            }
        });
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{}-{n}-{label}", std::process::id());
        cmd::run(&["ip", "netns", "add", &name])?;
        // From here on the guard deletes the namespace, also when the setup below fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        // Tests send bursts of requests that end in ICMP errors (REJECT, closed UDP ports); the default
        // per-peer rate limit would turn some of them into timeouts.
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        ns.sysctl("net.ipv6.icmp.ratelimit", "0")?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `["ip", "netns", "exec", <name>]`: prefix a command with it to run it inside.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }

    /// A `Command` that runs `program` inside the namespace; add arguments and run it yourself.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn argv_command(&self, argv: &[&str]) -> Result<Command, CmdError> {
        let (program, args) = argv.split_first().ok_or_else(|| CmdError {
            command: format!("(in {})", self.name),
            code: None,
            stdout: String::new(),
            stderr: "empty command".into(),
        })?;
        let mut command = self.command(program);
        command.args(args);
        Ok(command)
    }

    /// Runs `argv` inside; its stdout, or an error with the command line, status and stderr.
    pub fn run(&self, argv: &[&str]) -> Result<String, CmdError> {
        cmd::finish(self.argv_command(argv)?, None)
    }

    /// [`NetNs::run`] with `input` on stdin.
    pub fn run_with_input(&self, argv: &[&str], input: &str) -> Result<String, CmdError> {
        cmd::finish(self.argv_command(argv)?, Some(input))
    }

    /// Runs `argv` inside and returns its output whatever the exit status (error only if it could not
    /// start).
    pub fn output(&self, argv: &[&str]) -> Result<Output, CmdError> {
        cmd::output_of(&mut self.argv_command(argv)?, None)
    }

    /// Starts `argv` inside in the background; it is killed when the returned guard drops (and in any
    /// case when the namespace is deleted).
    pub fn spawn(&self, argv: &[&str]) -> Result<Process, CmdError> {
        Process::spawn(self.argv_command(argv)?)
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, CmdError> {
        let mut command = Command::new("ip");
        command.args(["-n", &self.name]).args(args);
        cmd::finish(command, None)
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), CmdError> {
        self.run(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Turns on IPv4 and IPv6 forwarding (a router or node namespace), without IPv4 redirects: a test
    /// router often sends a packet back out the interface it came from, and the redirects would only
    /// add noise (call before creating interfaces, so they inherit it).
    pub fn enable_forwarding(&self) -> Result<(), CmdError> {
        self.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        self.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    /// Adds `cidr` (e.g. `10.0.0.1/24`, `fd00::1/64`) to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<(), CmdError> {
        let mut args = vec!["addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// Sets `dev` up.
    pub fn link_up(&self, dev: &str) -> Result<(), CmdError> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Adds a route to `dst` (a CIDR or `default`) via `gateway`.
    pub fn add_route(&self, dst: &str, gateway: IpAddr) -> Result<(), CmdError> {
        let family = if gateway.is_ipv4() { "-4" } else { "-6" };
        self.ip(&[family, "route", "add", dst, "via", &gateway.to_string()])
            .map(drop)
    }

    /// Creates bridge `name` and sets it up.
    pub fn add_bridge(&self, name: &str) -> Result<(), CmdError> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.link_up(name)
    }

    /// Attaches `dev` to `bridge`.
    pub fn attach(&self, dev: &str, bridge: &str) -> Result<(), CmdError> {
        self.ip(&["link", "set", dev, "master", bridge]).map(drop)
    }

    /// Processes still running inside.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = delete(&self.name) {
            eprintln!("could not delete network namespace {}: {err}", self.name);
        }
    }
}

/// A veth pair: `a_dev` in `a`, `b_dev` in `b`, both up. Created inside `a` (never in the host's
/// namespace), so deleting either namespace removes the pair.
pub fn veth(a: &NetNs, a_dev: &str, b: &NetNs, b_dev: &str) -> Result<(), CmdError> {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ])?;
    a.link_up(a_dev)?;
    b.link_up(b_dev)
}

fn pids_in(name: &str) -> Vec<u32> {
    cmd::run(&["ip", "netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what runs inside `name` (processes our tests started there), then deletes it.
fn delete(name: &str) -> Result<(), CmdError> {
    for _ in 0..3 {
        let pids = pids_in(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = cmd::run(&["kill", "-KILL", &pid.to_string()]);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cmd::run(&["ip", "netns", "delete", name]).map(drop)
}

/// Deletes namespaces named with [`NETNS_PREFIX`] whose creating process is gone (a crashed or killed
/// earlier run). Namespaces of test processes still running (other test binaries) are left alone.
/// Returns those that could not be deleted.
pub fn remove_leftovers() -> Vec<(String, CmdError)> {
    let mut failed = Vec::new();
    let Ok(list) = cmd::run(&["ip", "netns", "list"]) else {
        return failed;
    };
    for name in list.lines().filter_map(|line| line.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            continue;
        }
        if let Err(err) = delete(name) {
            failed.push((name.to_owned(), err));
        }
    }
    failed
}
