//! Command line of `switchyard-e2e`: `cluster up|down|status` for people and Make, and the internal
//! commands the harness runs as processes (`supervise`, `echo-server`, `pod-exec`, `inspect-pod`) or
//! that help by hand inside a namespace (`echo-client`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::cluster::{self, Cluster};
use crate::layout::ClusterSpec;
use crate::node::volumes::Mount;
use crate::{echo, podexec, supervisor, tools};

/// Switchyard's local cluster: a real Kubernetes control plane and simulated nodes in network namespaces.
#[derive(Debug, Parser)]
#[command(name = "switchyard-e2e", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start, stop or inspect a local cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a cluster in the foreground (started by `cluster up`).
    #[command(hide = true)]
    Supervise {
        /// The cluster's state folder (holding spec.json).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Serve the echo protocol on TCP and UDP (what `switchyard.dev/echo` pods run).
    EchoServer {
        /// Pod name to answer with.
        #[arg(long)]
        pod: String,
        /// Node name to answer with.
        #[arg(long, default_value = "")]
        node: String,
        /// Ports (TCP and UDP each); 8080 when none is given.
        #[arg(long = "port")]
        ports: Vec<u16>,
    },
    /// Ask an echo server once and print its reply (run it inside a namespace with `ip netns exec`).
    EchoClient {
        /// Connect over TCP to this address.
        #[arg(long, conflicts_with = "udp", required_unless_present = "udp")]
        tcp: Option<SocketAddr>,
        /// Send a UDP datagram to this address.
        #[arg(long)]
        udp: Option<SocketAddr>,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 5)]
        timeout_seconds: u64,
    },
    /// Mount a pod's volumes in this private mount namespace and exec its program (the container wrapper).
    #[command(hide = true)]
    PodExec {
        /// Folder for overlay scratch layers.
        #[arg(long)]
        scratch: PathBuf,
        /// The mounts, as JSON.
        #[arg(long)]
        mounts: String,
        /// Working directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Switchyard's agent and upstream kube-proxy side by side on a local cluster (docs/benchmarks.md).
    Bench(crate::bench::BenchArgs),
    /// Test tool run as a pod: report the in-cluster identity and some files over HTTP.
    InspectPod {
        /// Address to serve on.
        #[arg(long, default_value = "0.0.0.0:9000")]
        listen: SocketAddr,
        /// Files to report.
        #[arg(long = "file")]
        files: Vec<PathBuf>,
    },
}

/// Where cluster state lives and which cluster.
#[derive(Debug, Args)]
pub struct Target {
    /// Cluster name (1-10 of a-z0-9).
    #[arg(long, default_value = "dev", env = "SWITCHYARD_CLUSTER")]
    pub name: String,
    /// Folder holding the state folder swyd-cluster-<name>.
    #[arg(long, default_value = "/tmp", env = "SWITCHYARD_CLUSTER_ROOT")]
    pub state_root: PathBuf,
}

/// `cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a cluster and wait until every node is Ready (does nothing if it is already running).
    Up {
        #[command(flatten)]
        target: Target,
        /// Number of simulated nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        /// IPv4 only (default: dual-stack nodes, pods and Service ranges).
        #[arg(long)]
        single_stack: bool,
        /// Host loopback port for the API server (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
    /// Stop a cluster and remove every namespace, process, mount and file it left (also after a crash).
    Down {
        #[command(flatten)]
        target: Target,
        /// Every cluster (anything named swyd-*), not just --name.
        #[arg(long)]
        all: bool,
    },
    /// Show whether a cluster runs, and its nodes.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

/// Entry point.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The container wrapper execs before any runtime or thread exists.
    if let Command::PodExec {
        scratch,
        mounts,
        workdir,
        command,
    } = &cli.command
    {
        let mounts: Vec<Mount> = serde_json::from_str(mounts).context("--mounts is not valid JSON")?;
        podexec::run(scratch, &mounts, workdir.as_deref(), command)?;
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_client::client::builder=off,hyper=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Cluster(c) => run_cluster(c).await,
        Command::Supervise { state_dir } => Ok(supervisor::run(&state_dir).await?),
        Command::EchoServer { pod, node, ports } => Ok(echo::serve(&pod, &node, &ports).await?),
        Command::EchoClient {
            tcp,
            udp,
            timeout_seconds,
        } => {
            let timeout = Duration::from_secs(timeout_seconds);
            let reply = match (tcp, udp) {
                (Some(addr), _) => echo::tcp_request_here(addr, timeout).await?,
                (None, Some(addr)) => echo::udp_request_here(addr, timeout).await?,
                (None, None) => anyhow::bail!("give --tcp or --udp"),
            };
            print!("{}", reply.line());
            Ok(())
        }
        Command::PodExec { .. } => Ok(()),
        Command::InspectPod { listen, files } => Ok(tools::inspect_pod(listen, files).await?),
        Command::Bench(args) => crate::bench::run(args).await,
    }
}

async fn run_cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Up {
            target,
            nodes,
            single_stack,
            port,
            timeout_seconds,
        } => {
            let exe = std::env::current_exe().context("locating this binary")?;
            let mut spec = ClusterSpec::new(&target.name, nodes, exe)?;
            spec.state_root = target.state_root;
            spec.dual_stack = !single_stack;
            spec.api_port = port;
            let cluster = Cluster::up(spec, Duration::from_secs(timeout_seconds)).await?;
            let kubeconfig = cluster.kubeconfig().display().to_string();
            let verb = if cluster.owned() {
                format!("is ready ({:.1} s)", cluster.info().start_seconds)
            } else {
                "was already running".to_owned()
            };
            println!(
                "cluster {} {verb}: {} nodes, API server {}",
                cluster.info().name,
                cluster.info().nodes.len(),
                cluster.info().server
            );
            println!("  export KUBECONFIG={kubeconfig}");
            println!("  kubectl get nodes -o wide");
            println!("  logs:  {}", cluster.layout().logs_dir().display());
            println!(
                "  stop:  make cluster-down   (or: switchyard-e2e cluster down --name {})",
                cluster.info().name
            );
            cluster.detach();
            Ok(())
        }
        ClusterCommand::Down { target, all } => {
            let removed = if all {
                cluster::down_all(&target.state_root)?
            } else {
                cluster::down(&target.state_root, &target.name)?
            };
            if removed.is_empty() {
                println!("nothing to remove");
            } else {
                println!(
                    "removed {} namespaces, {} processes, {} mounts, {} folders",
                    removed.namespaces.len(),
                    removed.processes.len(),
                    removed.mounts.len(),
                    removed.files.len()
                );
            }
            Ok(())
        }
        ClusterCommand::Status { target } => {
            let cluster = match Cluster::attach(&target.state_root, &target.name) {
                Ok(c) => c,
                Err(e) => {
                    let left = crate::cleanup::find(&cluster::scope(&target.state_root, &target.name));
                    if !left.is_empty() {
                        println!("leftovers: {left}");
                    }
                    anyhow::bail!("{e}");
                }
            };
            let info = cluster.info();
            println!(
                "cluster {} running (supervisor pid {}), API server {}",
                info.name, info.supervisor_pid, info.server
            );
            println!("kubeconfig: {}", info.kubeconfig.display());
            let nodes = Api::<Node>::all(cluster.client().await?)
                .list(&Default::default())
                .await?;
            for n in nodes.items {
                let ready = crate::supervisor::node_ready_and_untainted(&n);
                let spec = n.spec.unwrap_or_default();
                let zone = n
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .get("topology.kubernetes.io/zone")
                    .cloned()
                    .unwrap_or_default();
                println!(
                    "  {:<8} {:<9} {:<8} {}",
                    n.metadata.name.unwrap_or_default(),
                    if ready { "Ready" } else { "NotReady" },
                    zone,
                    spec.pod_cidrs.unwrap_or_default().join(",")
                );
            }
            cluster.detach();
            Ok(())
        }
    }
}
