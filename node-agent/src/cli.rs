//! Command line of `switchyard-agent`: `run` programs this node until stopped, `cleanup` removes every
//! rule the agent ever programmed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use prometheus_client::registry::Registry;
use switchyard_api::proxyconfig::ProxyMode;
use switchyard_api::{AgentConfig, ProxyConfig, ProxyConfigSpec};

use crate::conntrack::ConntrackTool;
use crate::iptables::backend::IptablesBackend;
use crate::iptables::exec::{Backend as XtablesBackend, IptablesRestore};
use crate::leftovers;
use crate::metrics::Metrics;
use crate::server::{self, Health};
use crate::sync::{self, Backend, Proxier};
use crate::watch::{self, Changes};

/// Switchyard node agent: programs Service rules on this node.
#[derive(Debug, Parser)]
#[command(name = "switchyard-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SWITCHYARD_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which iptables implementation to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IptablesFlavor {
    /// Use whichever already holds rules on this node (nft when neither does), like kube-proxy's wrapper.
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch Services and EndpointSlices and program this node's rules until stopped (SIGTERM/SIGINT).
    Run(RunArgs),
    /// Remove every chain, rule and jump the agent ever programmed, in every mode and both IP families.
    /// Leaves everything else untouched; safe to run twice.
    Cleanup(CleanupArgs),
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration: the YAML the operator renders (AgentConfig), or a ProxyConfig manifest whose
    /// spec is used. Without it the defaults apply (iptables mode, kube-proxy's defaults).
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Kubeconfig to reach the API server. Without it: in-cluster configuration, then $KUBECONFIG and
    /// ~/.kube/config.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Name of this node as registered in the API (endpoints with this nodeName are local). Defaults to
    /// the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// iptables implementation.
    #[arg(long, value_enum, default_value_t = IptablesFlavor::Auto)]
    pub iptables: IptablesFlavor,

    /// Name of the ProxyConfig this agent serves (set by the operator). With it the agent reports its
    /// state in the ProxyNode named after this node, and removes its rules when the ProxyConfig is deleted.
    #[arg(long, env = "SWITCHYARD_PROXY_CONFIG")]
    pub proxy_config: Option<String>,
}

/// Arguments of `cleanup`.
#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// iptables implementation (auto cleans both nft and legacy).
    #[arg(long, value_enum, default_value_t = IptablesFlavor::Auto)]
    pub iptables: IptablesFlavor,
}

/// Reads `--config`: an AgentConfig document, or a ProxyConfig manifest.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<AgentConfig> {
    let Some(path) = path else {
        let spec: ProxyConfigSpec = serde_json::from_value(serde_json::json!({"mode": "iptables"}))?;
        return Ok(AgentConfig::from_spec(&spec)?);
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.lines().any(|l| l.trim() == "kind: ProxyConfig") {
        let object: ProxyConfig = serde_saphyr::from_str(&text)
            .with_context(|| format!("{} is not a valid ProxyConfig", path.display()))?;
        return Ok(AgentConfig::from_spec(&object.spec)?);
    }
    AgentConfig::from_yaml(&text)
        .with_context(|| format!("{} is not a valid agent configuration", path.display()))
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},kube=warn,hyper=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn xtables(flavor: IptablesFlavor) -> Vec<IptablesRestore> {
    match flavor {
        IptablesFlavor::Nft => vec![IptablesRestore::new(XtablesBackend::Nft)],
        IptablesFlavor::Legacy => vec![IptablesRestore::new(XtablesBackend::Legacy)],
        IptablesFlavor::Auto => vec![IptablesRestore::detect()],
    }
}

async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

async fn run(args: RunArgs, format: LogFormat) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref())?;
    init_logging(format, config.log_level.as_str());
    let node_name = args.node_name.unwrap_or_else(host_name);
    anyhow::ensure!(
        !node_name.is_empty(),
        "cannot tell this node's name: pass --node-name"
    );
    tracing::info!(node = %node_name, mode = %config.mode, config_hash = %config.hash(), "starting");

    let backend: Box<dyn Backend> = match config.mode {
        ProxyMode::Iptables => {
            let exec = xtables(args.iptables)
                .into_iter()
                .next()
                .context("no iptables implementation")?;
            tracing::info!(iptables = ?exec.backend(), "using iptables");
            Box::new(IptablesBackend::new(exec, config.clone()))
        }
        other => anyhow::bail!("mode {other} is not available in this version of the agent; use iptables"),
    };

    crate::conntrack::apply_sysctls(&config.conntrack);

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let health = Arc::new(Health::new(config.sync_period.into()));
    let _health_server = server::serve_health(config.healthz_bind_address, health.clone())
        .await
        .with_context(|| format!("cannot listen on {}", config.healthz_bind_address))?;
    let _metrics_server = server::serve_metrics(
        config.metrics_bind_address,
        Arc::new(registry),
        config.mode.as_str(),
    )
    .await
    .with_context(|| format!("cannot listen on {}", config.metrics_bind_address))?;

    let client = client(args.kubeconfig.as_deref()).await?;
    let changes = Arc::new(Changes::default());
    let (stores, watches) = watch::start(client.clone(), &node_name, changes.clone());
    let watches = tokio::spawn(watches);
    let writer = args
        .proxy_config
        .clone()
        .map(|pc| crate::status::Writer::new(client.clone(), node_name.clone(), pc));
    let mut cleanup_writer = args
        .proxy_config
        .clone()
        .map(|pc| crate::status::Writer::new(client.clone(), node_name.clone(), pc));
    // After a mode switch, the previous mode's objects go once this mode's rules are in place.
    let proxier = Proxier::new(
        backend,
        Arc::new(ConntrackTool::default()),
        metrics.clone(),
        health,
        config.clone(),
        node_name,
    )
    .with_leftovers(leftovers::other_modes(config.mode, &config, &[]));
    let syncing = tokio::spawn(sync::run(proxier, stores.clone(), changes, metrics, writer));

    let deleted = async {
        match &args.proxy_config {
            Some(name) => crate::status::wait_for_deletion(client.clone(), name.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown_signal() => {
            // Rules stay in place on exit: the next agent takes them over without a gap (never flush on restart).
            tracing::info!("stopping; rules stay in place");
            syncing.abort();
            watches.abort();
        }
        () = deleted => {
            tracing::info!("ProxyConfig deleted: removing every Switchyard rule from this node");
            syncing.abort();
            let detected = xtables(args.iptables)
                .into_iter()
                .next()
                .context("no iptables implementation")?
                .backend();
            let cleaned = tokio::task::block_in_place(|| {
                leftovers::every_mode(&config, &[], &[detected])
                    .into_iter()
                    .try_for_each(|mut mode| mode.remove().map(drop))
            });
            let report = crate::status::Report {
                mode: Some(config.mode),
                config_hash: config.hash(),
                cleaned_up: cleaned.is_ok(),
                last_error: cleaned.err().map(|e| e.to_string()),
                ..crate::status::Report::default()
            };
            if let Some(writer) = cleanup_writer.as_mut() {
                let node = stores.node.state().into_iter().next();
                writer.update(&report, node.as_deref()).await;
            }
            // Stay up (idle) until the operator deletes the DaemonSet, so the pod does not restart and
            // program the rules again.
            shutdown_signal().await;
            watches.abort();
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn cleanup(args: CleanupArgs, format: LogFormat) -> anyhow::Result<()> {
    init_logging(format, "info");
    let config = load_config(None)?;
    let mut failures = vec![];
    // `--iptables nft|legacy` limits the iptables part to one implementation.
    let iptables = match args.iptables {
        IptablesFlavor::Auto => leftovers::BOTH_IPTABLES.to_vec(),
        IptablesFlavor::Nft => vec![XtablesBackend::Nft],
        IptablesFlavor::Legacy => vec![XtablesBackend::Legacy],
    };
    for mut mode in leftovers::every_mode(&config, &[], &iptables) {
        match mode.remove() {
            Ok(removed) => tracing::info!(mode = %mode.mode(), ?removed, "cleaned"),
            Err(error) => {
                tracing::error!(mode = %mode.mode(), %error, "cleanup failed");
                failures.push(error.to_string());
            }
        }
    }
    anyhow::ensure!(failures.is_empty(), "cleanup failed: {}", failures.join("; "));
    tracing::info!("removed every Switchyard rule");
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(args, cli.log_format)),
        Command::Cleanup(args) => cleanup(args, cli.log_format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_explains_every_flag() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        cmd.build();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{} has no help",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn config_is_read_from_agent_config_or_proxy_config() {
        let dir = std::env::temp_dir().join(format!("swyd-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let manifest = dir.join("pc.yaml");
        std::fs::write(
            &manifest,
            include_str!("../../examples/proxyconfig-iptables.yaml"),
        )
        .unwrap();
        let from_manifest = load_config(Some(&manifest)).unwrap();
        assert_eq!(from_manifest.cluster_cidrs.len(), 1);

        let rendered = dir.join("agent.yaml");
        std::fs::write(&rendered, from_manifest.to_yaml().unwrap()).unwrap();
        assert_eq!(load_config(Some(&rendered)).unwrap(), from_manifest);

        std::fs::write(&rendered, "mode: [").unwrap();
        assert!(
            load_config(Some(&rendered))
                .unwrap_err()
                .to_string()
                .contains("not a valid agent configuration")
        );
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(load_config(None).unwrap().mode, ProxyMode::Iptables);
    }
}
