//! Network namespaces and the commands that shape them. The harness drives iproute2 (`ip`) and
//! `sysctl`, and opens sockets inside a namespace from a short-lived thread that joined it (`setns`),
//! so the host's own namespace is never changed.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sched::CloneFlags;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, IoContext, Result};

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The bind-mounted namespace file of `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Whether the namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Namespaces whose name starts with `prefix`, sorted.
pub fn list(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Creates a namespace with its loopback up.
pub async fn add(name: &str) -> Result<()> {
    run("ip", ["netns", "add", name]).await?;
    run("ip", ["-n", name, "link", "set", "lo", "up"]).await.map(drop)
}

/// Deletes a namespace (and with it every interface inside); a missing namespace is fine.
pub fn delete_sync(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    run_sync("ip", ["netns", "delete", name]).map(drop)
}

/// Runs `ip -n <ns> -batch -` with one command per line.
pub async fn ip_batch(ns: &str, commands: &[String]) -> Result<()> {
    let script = commands.join("\n") + "\n";
    let mut child = tokio::process::Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .ctx(|| "starting ip -batch".to_owned())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .ctx(|| "writing to ip -batch".to_owned())?;
    }
    let out = child
        .wait_with_output()
        .await
        .ctx(|| "running ip -batch".to_owned())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip -n {ns} -batch: {}", commands.join("; ")),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// Sets sysctls inside a namespace (`net.*` keys are per namespace).
pub async fn sysctl(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        ns.into(),
        "sysctl".into(),
        "-qw".into(),
    ];
    args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
    run("ip", args).await.map(drop)
}

/// Runs a command to completion; its stdout on success.
pub async fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let line = describe(program, cmd.as_std().get_args());
    let out = cmd.output().await.ctx(|| format!("starting {line}"))?;
    finish(line, out)
}

/// Blocking [`run`], for teardown paths that run outside any runtime (drop guards).
pub fn run_sync<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let line = describe(program, cmd.get_args());
    let out = cmd.output().ctx(|| format!("starting {line}"))?;
    finish(line, out)
}

fn describe<'a>(program: &str, args: impl Iterator<Item = &'a OsStr>) -> String {
    std::iter::once(program.to_owned())
        .chain(args.map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn finish(line: String, out: std::process::Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: line,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// Runs `f` on a new thread that has joined namespace `ns`; sockets it creates stay in that namespace
/// and can be used from any thread afterwards.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let file = std::fs::File::open(path(ns)).ctx(|| format!("opening network namespace {ns}"))?;
    let name = ns.to_owned();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).ctx(|| format!("joining {name}"))?;
            f().ctx(|| format!("in network namespace {name}"))
        })
        .ctx(|| "starting a thread".to_owned())?;
    handle
        .join()
        .map_err(|_| Error::Failed(format!("thread in network namespace {ns} panicked")))?
}

/// [`in_netns`] without blocking the async runtime.
pub async fn in_netns_async<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    // A fresh thread joins the namespace; the blocking pool only waits for it, so its threads never
    // change namespace.
    tokio::task::spawn_blocking(move || in_netns(&ns, f))
        .await
        .map_err(|e| Error::Failed(format!("namespace task failed: {e}")))?
}

/// Opens a TCP connection from inside namespace `ns`.
pub async fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream> {
    let stream = in_netns_async(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    tokio::net::TcpStream::from_std(stream).ctx(|| format!("registering a connection to {addr}"))
}

/// Binds a UDP socket inside namespace `ns` (port 0: any).
pub async fn bind_udp(ns: &str, addr: SocketAddr) -> Result<tokio::net::UdpSocket> {
    let socket = in_netns_async(ns, move || {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    tokio::net::UdpSocket::from_std(socket).ctx(|| format!("registering a UDP socket on {addr}"))
}
