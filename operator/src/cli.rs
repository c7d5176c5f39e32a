//! Command line of `switchyard-operator`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use switchyard_api::ProxyConfig;

use crate::build::Settings;
use crate::controller::{self, Context, Metrics};
use crate::leader::{self, LeaseSettings};

/// Switchyard operator: rolls out node agents from ProxyConfig objects.
#[derive(Debug, Parser)]
#[command(name = "switchyard-operator", version, about)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info", env = "SWITCHYARD_LOG_LEVEL")]
    pub log_level: String,

    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,

    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Settings of `run` (also accepted without the subcommand).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reconcile ProxyConfigs until stopped.
    Run,
    /// Delete every ProxyConfig and wait until they are gone (their agents remove their rules first).
    /// Used by the chart's pre-delete hook.
    DeleteAll {
        /// Longest wait.
        #[arg(long, default_value = "300s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    text.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// Settings of the reconcile loop.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Namespace of the agents' DaemonSets and ConfigMaps (the release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "switchyard-system")]
    pub namespace: String,
    /// Agent image used when a ProxyConfig does not name one.
    #[arg(long, default_value = concat!("switchyard.dev/switchyard-agent:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    /// ServiceAccount of the agent pods.
    #[arg(long, default_value = "switchyard-agent")]
    pub agent_service_account: String,
    /// API server address the agents use (they cannot rely on the kubernetes Service, which they
    /// implement).
    #[arg(long, default_value = "")]
    pub api_server_host: String,
    /// API server port the agents use.
    #[arg(long, default_value_t = 6443)]
    pub api_server_port: u16,
    /// Take a Lease before reconciling, so several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "switchyard-operator")]
    pub identity: String,
    /// Address of /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub health_bind_address: SocketAddr,
    /// Address of /metrics.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub metrics_bind_address: SocketAddr,
    /// Longest wait for agents to remove their rules when a ProxyConfig is deleted.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub cleanup_timeout: Duration,
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},kube=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// Waits until the ProxyConfig CRD is served, saying what to do meanwhile.
async fn wait_for_crds(client: &Client) {
    let api = Api::<ProxyConfig>::all(client.clone());
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => tracing::error!(
                "the ProxyConfig CRD is not installed: kubectl apply --server-side -f charts/switchyard/crds/ (retrying)"
            ),
            Err(error) => tracing::warn!(%error, "cannot list ProxyConfigs (retrying)"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("cannot configure the API client")?;
    let ready = Arc::new(AtomicBool::new(false));
    let readyz = ready.clone();
    serve(
        args.health_bind_address,
        Router::new().route("/healthz", get(|| async { "ok" })).route(
            "/readyz",
            get(move || {
                let ready = readyz.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        ),
    )
    .await?;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);
    serve(
        args.metrics_bind_address,
        Router::new().route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    out
                }
            }),
        ),
    )
    .await?;

    wait_for_crds(&client).await;
    // A standby replica is ready: it serves health and takes over when the leader goes.
    ready.store(true, Ordering::Relaxed);
    let lease = LeaseSettings::new("switchyard-operator", &args.namespace, &args.identity);
    let acquired = if args.leader_election {
        leader::acquire(&client, &lease).await
    } else {
        tokio::time::Instant::now()
    };
    if args.api_server_host.is_empty() {
        tracing::warn!(
            "--api-server-host is empty: agents will rely on the kubernetes Service, which they implement"
        );
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: Settings {
            namespace: args.namespace,
            agent_image: args.agent_image,
            agent_service_account: args.agent_service_account,
            api_server_host: args.api_server_host,
            api_server_port: args.api_server_port,
        },
        cleanup_timeout: args.cleanup_timeout,
        metrics,
    });
    if args.leader_election {
        // Renewals run in a task of their own, so a busy reconcile never delays them.
        let holding = tokio::spawn({
            let (client, lease) = (client.clone(), lease.clone());
            async move { leader::hold(&client, &lease, acquired).await }
        });
        tokio::select! {
            // The controller returns on SIGTERM/SIGINT.
            () = controller::run(ctx) => leader::release(&client, &lease).await,
            _ = holding => anyhow::bail!("lost leadership; exiting so a new leader takes over"),
        }
    } else {
        controller::run(ctx).await;
    }
    Ok(())
}

async fn delete_all(timeout: Duration) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let api = Api::<ProxyConfig>::all(client);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            // No CRD: nothing to delete.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if list.items.is_empty() {
            tracing::info!("no ProxyConfig left");
            return Ok(());
        }
        for pc in list
            .items
            .iter()
            .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        {
            tracing::info!(proxyconfig = %pc.name_any(), "deleting");
            api.delete(&pc.name_any(), &DeleteParams::default()).await?;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "ProxyConfigs still present after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        None | Some(Command::Run) => runtime.block_on(run(cli.run)),
        Some(Command::DeleteAll { timeout }) => runtime.block_on(delete_all(timeout)),
    }
}
