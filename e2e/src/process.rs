//! Long-running child processes (control-plane components, pod containers): started inside a network
//! namespace with their output in a log file, watched for exit, stopped with SIGTERM then SIGKILL.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::error::{Error, IoContext, Result};

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct Command {
    /// Program path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment; when `clear_env` is set, the only variables the process sees.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment.
    pub clear_env: bool,
    /// Network namespace to run in (through `ip netns exec`, which also gives the process a mount
    /// namespace of its own).
    pub netns: Option<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

/// A running (or exited) child process.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Process {
    /// Starts `command`, appending its stdout and stderr to `log`.
    pub fn spawn(name: &str, command: &Command, log: &Path) -> Result<Process> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .ctx(|| format!("opening {}", log.display()))?;
        let err = out.try_clone().ctx(|| format!("opening {}", log.display()))?;
        let mut cmd = match &command.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&command.program);
                c
            }
            None => tokio::process::Command::new(&command.program),
        };
        cmd.args(&command.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        if command.clear_env {
            cmd.env_clear();
        }
        cmd.envs(command.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &command.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .ctx(|| format!("starting {name} ({})", command.program.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Failed(format!("{name} exited before it could be watched")))?;
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child
                .wait()
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(255 << 8));
            let _ = tx.send(Some(status));
        });
        tracing::debug!(process = name, pid, "started");
        Ok(Process {
            name: name.to_owned(),
            pid,
            exit,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = *self.exit.borrow_and_update() {
                return status;
            }
            if self.exit.changed().await.is_err() {
                return self
                    .exit_status()
                    .unwrap_or_else(|| ExitStatus::from_raw(255 << 8));
            }
        }
    }

    /// A receiver that sees the exit status once the process exits.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.clone()
    }

    /// Sends a signal (ignored once the process has exited).
    pub fn signal(&self, signal: Signal) {
        if self.exit_status().is_none()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(process = %self.name, pid = self.pid, "did not stop on SIGTERM, killing");
                self.signal(Signal::SIGKILL);
                self.wait().await
            }
        }
    }
}

/// `exit code 1` / `signal 9` (for logs and container statuses).
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// The exit code Kubernetes reports: the code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
