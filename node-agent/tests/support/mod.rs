//! Test support shared by the kernel tests (and later e2e): network namespaces that clean up after
//! themselves, veth/bridge/address plumbing, and tiny echo servers and clients for real traffic.
//!
//! Everything here runs commands inside namespaces the test created (`ip netns exec`, `ip -n`); nothing
//! touches the host's own interfaces or rules. Namespaces are named `swyd-t-<pid>-<n>-<label>` and
//! deleted on drop (also when the test panics); leftovers of a crashed earlier run are found by that
//! prefix and removed when the next run creates its first namespace.
//!
//! Use from a test file with `mod support;`. Each test binary uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod cluster;
mod cmd;
pub mod flow;
mod netns;
mod topology;
mod traffic;

use std::io::Write as _;

pub use cmd::{CmdError, Process, run, run_with_input};
pub use netns::{NETNS_PREFIX, NetNs, remove_leftovers, veth};
pub use topology::{NodeTopology, Pod};
pub use traffic::{ConnectError, EchoServer, Proto, Reply, request};

/// Whether this process runs as root (effective uid 0), read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Marker printed by a skipped test; CI (which runs as root) fails when it finds it in the output.
pub const SKIP_MARKER: &str = "SWYD-TEST-SKIPPED";

/// Returns true when the test can run; otherwise prints why it is skipped (with [`SKIP_MARKER`]) and
/// returns false. Call first in every kernel test: `if !support::require_root("name") { return; }`.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    // CI sets this: there a skipped kernel test is a failure, not a pass.
    assert!(
        std::env::var_os("SWITCHYARD_REQUIRE_PRIVILEGED").is_none(),
        "{test} needs root and SWITCHYARD_REQUIRE_PRIVILEGED is set"
    );
    // Written to the process's stderr directly: libtest captures `println!`/`eprintln!` of passing
    // tests, and CI must see the marker.
    let _ = writeln!(
        std::io::stderr(),
        "{SKIP_MARKER}: {test}: needs root (network namespaces, iptables); CI runs it as root"
    );
    false
}
