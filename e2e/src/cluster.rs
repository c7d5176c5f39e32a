//! The public face of the harness: start a cluster (`Cluster::up`, which spawns the supervisor and
//! waits for `ready.json`), use it (kubeconfig, clients, namespaces of pods and nodes), and tear it
//! down (`down`, also after a crash; the guard does it on drop).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cleanup::{self, Leftovers, Scope};
use crate::controlplane;
use crate::error::{Error, IoContext, Result};
use crate::kubeconfig;
use crate::layout::{self, ClusterSpec, Layout, NodeLayout, PREFIX};

/// What the supervisor writes once the cluster is ready.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReadyInfo {
    /// Cluster name.
    pub name: String,
    /// Admin kubeconfig for the host.
    pub kubeconfig: PathBuf,
    /// API server URL on the host.
    pub server: String,
    /// Its loopback port.
    pub api_port: u16,
    /// Supervisor pid.
    pub supervisor_pid: u32,
    /// The nodes.
    pub nodes: Vec<NodeLayout>,
    /// Seconds from the supervisor's start to every node Ready.
    pub start_seconds: f64,
}

/// The leftovers scope of one cluster.
pub fn scope(state_root: &Path, name: &str) -> Scope {
    Scope {
        cluster: Some(name.to_owned()),
        state_dirs: vec![layout::state_dir(state_root, name)],
    }
}

/// The leftovers scope of every cluster under `state_root`.
pub fn scope_all(state_root: &Path) -> Scope {
    let marker = format!("{PREFIX}cluster-");
    let state_dirs = std::fs::read_dir(state_root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&marker))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    Scope {
        cluster: None,
        state_dirs,
    }
}

/// Fails unless running as root (namespaces, mounts and the control plane need it).
pub fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::Failed(
            "the local cluster needs root (network namespaces, mounts)".into(),
        ))
    }
}

/// A running cluster. Dropping the value tears the cluster down when this value started it.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    layout: Layout,
    info: ReadyInfo,
    supervisor: Option<std::process::Child>,
    owned: bool,
}

/// The supervisor pid of a running cluster, if any.
fn running_supervisor(layout: &Layout) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(layout.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cleanup::alive(pid)
        && cmdline.contains("supervise")
        && cmdline.contains(&layout.state_dir.display().to_string()))
    .then_some(pid)
}

fn read_ready(layout: &Layout) -> Option<ReadyInfo> {
    serde_json::from_slice(&std::fs::read(layout.ready_file()).ok()?).ok()
}

/// The last lines of the supervisor's log, for error messages.
pub fn log_tail(layout: &Layout, lines: usize) -> String {
    let path = layout.logs_dir().join("supervisor.log");
    let Ok(file) = std::fs::File::open(&path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(file)
        .lines()
        .map_while(std::result::Result::ok)
        .collect();
    let start = all.len().saturating_sub(lines);
    format!("last lines of {}:\n{}", path.display(), all[start..].join("\n"))
}

impl Cluster {
    /// Starts the cluster described by `spec` and waits until every node is Ready. If a cluster of that
    /// name is already running with the same shape it is reused (and not torn down on drop); leftovers of
    /// a crashed one are removed first.
    pub async fn up(spec: ClusterSpec, timeout: Duration) -> Result<Cluster> {
        require_root()?;
        layout::validate_name(&spec.name)?;
        controlplane::check_binaries(&spec.upstream_bin)?;
        let layout = spec.layout();
        if running_supervisor(&layout).is_some()
            && let Some(info) = read_ready(&layout)
        {
            let existing: Option<ClusterSpec> = std::fs::read(layout.spec_file())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let same = existing.is_some_and(|e| e.nodes == spec.nodes && e.dual_stack == spec.dual_stack);
            if !same {
                return Err(Error::Failed(format!(
                    "cluster {} is already running with another shape; run `switchyard-e2e cluster down --name {}` first",
                    spec.name, spec.name
                )));
            }
            return Ok(Cluster {
                spec,
                layout,
                info,
                supervisor: None,
                owned: false,
            });
        }
        down(&spec.state_root, &spec.name)?;

        std::fs::create_dir_all(layout.logs_dir())
            .ctx(|| format!("creating {}", layout.logs_dir().display()))?;
        let spec_json = serde_json::to_vec_pretty(&spec).ctx(|| "encoding spec.json".into())?;
        std::fs::write(layout.spec_file(), spec_json).ctx(|| "writing spec.json".into())?;
        let log_path = layout.logs_dir().join("supervisor.log");
        let log = std::fs::File::create(&log_path).ctx(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().ctx(|| "opening the supervisor log".into())?;
        let child = std::process::Command::new(&spec.harness_bin)
            .arg("supervise")
            .arg("--state-dir")
            .arg(&layout.state_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C meant for `make cluster-up` does not stop the cluster.
            .process_group(0)
            .spawn()
            .ctx(|| format!("starting the supervisor {}", spec.harness_bin.display()))?;
        let mut cluster = Cluster {
            info: ReadyInfo {
                name: spec.name.clone(),
                kubeconfig: layout.admin_kubeconfig(),
                server: String::new(),
                api_port: 0,
                supervisor_pid: child.id(),
                nodes: layout.nodes.clone(),
                start_seconds: 0.0,
            },
            spec,
            layout,
            supervisor: Some(child),
            owned: true,
        };
        let start = Instant::now();
        loop {
            if let Some(info) = read_ready(&cluster.layout) {
                cluster.info = info;
                return Ok(cluster);
            }
            let failed = std::fs::read_to_string(cluster.layout.failed_file()).ok();
            let exited = cluster
                .supervisor
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if failed.is_some() || exited.is_some() || start.elapsed() > timeout {
                let why = match (failed, exited) {
                    (Some(f), _) => f,
                    (None, Some(status)) => format!("the supervisor exited ({status})"),
                    (None, None) => format!("not ready after {}s", timeout.as_secs()),
                };
                let tail = log_tail(&cluster.layout, 40);
                // The guard's drop tears down what was started.
                drop(cluster);
                return Err(Error::Failed(format!(
                    "starting the cluster failed: {why}\n{tail}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Attaches to a running cluster without owning it (not torn down on drop).
    pub fn attach(state_root: &Path, name: &str) -> Result<Cluster> {
        layout::validate_name(name)?;
        let dir = layout::state_dir(state_root, name);
        let spec: ClusterSpec = serde_json::from_slice(
            &std::fs::read(dir.join("spec.json"))
                .ctx(|| format!("cluster {name} is not running ({})", dir.display()))?,
        )
        .ctx(|| "parsing spec.json".into())?;
        let layout = spec.layout();
        let info = read_ready(&layout)
            .filter(|_| running_supervisor(&layout).is_some())
            .ok_or_else(|| Error::Failed(format!("cluster {name} is not running")))?;
        Ok(Cluster {
            spec,
            layout,
            info,
            supervisor: None,
            owned: false,
        })
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }
    /// Names, addresses and paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// What the supervisor reported.
    pub fn info(&self) -> &ReadyInfo {
        &self.info
    }
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.info.kubeconfig
    }
    /// Whether this value started the cluster (and tears it down on drop).
    pub fn owned(&self) -> bool {
        self.owned
    }

    /// A new admin client. Make one per async runtime: a client's connections belong to the runtime
    /// that created it.
    pub async fn client(&self) -> Result<kube::Client> {
        kubeconfig::client(self.kubeconfig()).await
    }

    /// The network namespace a pod runs in (its node's for host-network pods).
    pub fn pod_netns(&self, pod: &Pod) -> Option<String> {
        let spec = pod.spec.as_ref()?;
        if spec.host_network.unwrap_or(false) {
            return self.node_netns(spec.node_name.as_deref()?);
        }
        Some(self.layout.pod_netns(pod.metadata.uid.as_deref()?))
    }

    /// The network namespace of a node.
    pub fn node_netns(&self, node: &str) -> Option<String> {
        self.layout.node(node).map(|n| n.netns.clone())
    }

    /// Tears the cluster down now and reports what was removed.
    pub fn down(mut self) -> Result<Leftovers> {
        self.owned = false;
        let result = down(&self.spec.state_root, &self.spec.name);
        self.reap();
        result
    }

    /// Leaves the cluster running when this value drops (the CLI's `up` returns while it keeps running).
    pub fn detach(mut self) {
        self.owned = false;
        self.supervisor = None;
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            let _ = child.try_wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            if std::thread::panicking() {
                eprintln!("{}", log_tail(&self.layout, 30));
                keep_logs(&self.layout);
            } else if std::env::var_os("SWITCHYARD_E2E_KEEP_LOGS").is_some() {
                keep_logs(&self.layout);
            }
            if let Err(e) = down(&self.spec.state_root, &self.spec.name) {
                eprintln!("tearing down cluster {}: {e}", self.spec.name);
            }
        }
        self.reap();
    }
}

/// Copies a failed run's logs out of the state folder (which `down` removes) to
/// `$CARGO_TARGET_DIR/e2e-logs/<cluster>` or `/tmp/switchyard-e2e-logs/<cluster>`.
fn keep_logs(layout: &Layout) {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| PathBuf::from(d).join("e2e-logs"))
        .unwrap_or_else(|| PathBuf::from("/tmp/switchyard-e2e-logs"));
    let dest = base.join(&layout.name);
    let _ = std::fs::remove_dir_all(&dest);
    if crate::netns::run_sync(
        "cp",
        [
            std::ffi::OsStr::new("-r"),
            layout.logs_dir().as_os_str(),
            dest.as_os_str(),
        ],
    )
    .is_ok()
    {
        eprintln!("cluster logs kept in {}", dest.display());
    }
}

/// Stops the cluster `name` (SIGTERM to its supervisor, which stops the components in order) and
/// removes every leftover. Safe to run when nothing is running, and after a crash.
pub fn down(state_root: &Path, name: &str) -> Result<Leftovers> {
    require_root()?;
    layout::validate_name(name)?;
    let layout = Layout::new(name, state_root, 0, false);
    if let Some(pid) = running_supervisor(&layout)
        && let Ok(p) = i32::try_from(pid)
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(90);
        while cleanup::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    cleanup::remove(&scope(state_root, name))
}

/// [`down`] for every cluster under `state_root` (and any `swyd-` namespace).
pub fn down_all(state_root: &Path) -> Result<Leftovers> {
    require_root()?;
    let scope = scope_all(state_root);
    let mut removed = Leftovers::default();
    for dir in &scope.state_dirs {
        if let Some(name) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(&format!("{PREFIX}cluster-")))
            && layout::validate_name(name).is_ok()
            && let Ok(one) = down(state_root, name)
        {
            removed.merge(one);
        }
    }
    removed.merge(cleanup::remove(&scope)?);
    Ok(removed)
}
