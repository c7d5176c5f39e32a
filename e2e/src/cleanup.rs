//! Finding and removing what a cluster left on the host, by name alone: its network namespaces
//! (`swyd-<name>-*`), the processes inside them or started from its state folder, mounts under either,
//! and the state folder itself. Works after a crash of the supervisor, and twice in a row.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::layout::{PREFIX, is_harness_netns};
use crate::netns;

/// Which clusters to look for.
#[derive(Clone, Debug)]
pub struct Scope {
    /// Cluster name; `None` for every cluster.
    pub cluster: Option<String>,
    /// State folders.
    pub state_dirs: Vec<PathBuf>,
}

/// What is left on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Leftovers {
    /// Network namespaces.
    pub namespaces: Vec<String>,
    /// Processes: pid and command line.
    pub processes: Vec<(u32, String)>,
    /// Mount points.
    pub mounts: Vec<String>,
    /// Files and folders.
    pub files: Vec<PathBuf>,
}

impl Leftovers {
    /// Adds what `other` found.
    pub fn merge(&mut self, other: Leftovers) {
        self.namespaces.extend(other.namespaces);
        self.processes.extend(other.processes);
        self.mounts.extend(other.mounts);
        self.files.extend(other.files);
    }

    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.processes.is_empty()
            && self.mounts.is_empty()
            && self.files.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} namespaces {:?}, {} processes {:?}, {} mounts {:?}, {} files {:?}",
            self.namespaces.len(),
            self.namespaces,
            self.processes.len(),
            self.processes,
            self.mounts.len(),
            self.mounts,
            self.files.len(),
            self.files
        )
    }
}

/// Pids of this process and its ancestors, which are never killed (the caller may have been started
/// from a path inside the state folder).
fn protected_pids() -> HashSet<u32> {
    let mut pids = HashSet::new();
    let mut pid = std::process::id();
    while pid > 1 && pids.insert(pid) {
        pid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
            })
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
    }
    pids
}

/// Whether a pid is running (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// Looks for leftovers.
pub fn find(scope: &Scope) -> Leftovers {
    let namespaces: Vec<String> = netns::list(PREFIX)
        .into_iter()
        .filter(|ns| is_harness_netns(ns, scope.cluster.as_deref()))
        .collect();
    let inodes: HashSet<u64> = namespaces
        .iter()
        .filter_map(|ns| std::fs::metadata(netns::path(ns)).ok().map(|m| m.ino()))
        .collect();
    let dirs: Vec<String> = scope.state_dirs.iter().map(|d| d.display().to_string()).collect();
    let protected = protected_pids();
    let mut processes = vec![];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if protected.contains(&pid) || !alive(pid) {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_owned())
                .unwrap_or_default();
            let in_namespace = std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("net:[")?.strip_suffix(']')?.parse::<u64>().ok()
                })
                .is_some_and(|ino| inodes.contains(&ino));
            let from_state = dirs.iter().any(|d| {
                cmdline.contains(&format!("{d}/"))
                    || cmdline.contains(&format!("{d} "))
                    || cmdline.ends_with(d.as_str())
            });
            if in_namespace || from_state {
                processes.push((pid, cmdline));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| {
            m.strip_prefix(&format!("{}/", netns::NETNS_DIR))
                .is_some_and(|ns| is_harness_netns(ns, scope.cluster.as_deref()))
                || dirs.iter().any(|d| m == d || m.starts_with(&format!("{d}/")))
        })
        .collect();
    let files = scope.state_dirs.iter().filter(|d| d.exists()).cloned().collect();
    Leftovers {
        namespaces,
        processes,
        mounts,
        files,
    }
}

/// Removes leftovers: kills the processes, deletes the namespaces, unmounts, deletes the folders. Returns
/// what was found, or an error naming what could not be removed.
pub fn remove(scope: &Scope) -> Result<Leftovers> {
    let found = find(scope);
    for (pid, _) in &found.processes {
        if let Ok(p) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.processes.iter().any(|(pid, _)| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in &found.namespaces {
        let _ = netns::delete_sync(ns);
    }
    // Deepest first.
    let mut mounts = find(scope).mounts;
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &mounts {
        let _ = nix::mount::umount2(Path::new(m), nix::mount::MntFlags::MNT_DETACH);
        if m.starts_with(netns::NETNS_DIR) {
            let _ = std::fs::remove_file(m);
        }
    }
    for dir in &scope.state_dirs {
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing the state folder");
        }
    }
    let left = find(scope);
    if left.is_empty() {
        Ok(found)
    } else {
        Err(Error::Failed(format!("could not remove everything: {left}")))
    }
}
