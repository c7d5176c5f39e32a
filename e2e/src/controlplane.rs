//! The Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler, the
//! upstream binaries built by `e2e/upstream/build.sh`, run in the control-plane namespace. Argument
//! lists are built by pure functions; starting waits for each component to be healthy.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::layout::{APISERVER_PORT, Layout};
use crate::pki::Pki;
use crate::probe;
use crate::process::{self, Command, Process};

/// Upstream binaries the control plane needs.
pub const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];
/// Issuer of service-account tokens.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";
const ETCD_PEER: &str = "http://127.0.0.1:2380";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// etcd: one member on the control plane's loopback; fsync off (test data, and much faster).
pub fn etcd_args(layout: &Layout) -> Vec<String> {
    vec![
        "--name=swyd".into(),
        format!("--data-dir={}", path(&layout.etcd_dir())),
        format!("--listen-client-urls={ETCD_CLIENT}"),
        format!("--advertise-client-urls={ETCD_CLIENT}"),
        format!("--listen-peer-urls={ETCD_PEER}"),
        format!("--initial-advertise-peer-urls={ETCD_PEER}"),
        format!("--initial-cluster=swyd={ETCD_PEER}"),
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

/// kube-apiserver: TLS with client certificates, Node and RBAC authorization, service-account token
/// signing, the default admission plugins plus NodeRestriction.
pub fn apiserver_args(layout: &Layout, pki: &Pki) -> Vec<String> {
    let cp_ip = layout.apiserver_addr().ip();
    vec![
        format!("--advertise-address={cp_ip}"),
        "--bind-address=0.0.0.0".into(),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--etcd-servers={ETCD_CLIENT}"),
        format!("--tls-cert-file={}", path(&pki.apiserver.cert)),
        format!("--tls-private-key-file={}", path(&pki.apiserver.key)),
        format!("--client-ca-file={}", path(&pki.ca.cert)),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-key-file={}", path(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", path(&pki.sa_key)),
        format!("--service-cluster-ip-range={}", layout.service_cidrs()),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

/// kube-controller-manager: every default controller (EndpointSlice, DaemonSet, Deployment/ReplicaSet,
/// garbage collector, namespace, service accounts and their tokens, node lifecycle, ...) except node IPAM,
/// since the harness assigns pod CIDRs itself.
pub fn controller_manager_args(layout: &Layout, pki: &Pki, kubeconfig: &Path) -> Vec<String> {
    let kc = path(kubeconfig);
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        format!("--client-ca-file={}", path(&pki.ca.cert)),
        format!("--root-ca-file={}", path(&pki.ca.cert)),
        format!("--service-account-private-key-file={}", path(&pki.sa_key)),
        format!("--cluster-signing-cert-file={}", path(&pki.ca.cert)),
        format!("--cluster-signing-key-file={}", path(&pki.ca.key)),
        format!("--cluster-name=swyd-{}", layout.name),
        "--controllers=*,-nodeipam".into(),
        "--allocate-node-cidrs=false".into(),
        "--use-service-account-credentials=true".into(),
        "--leader-elect=false".into(),
        // Nodes register Ready; checking every second lets the lifecycle controller lift the not-ready
        // taint (and so allow scheduling) within a second instead of five.
        "--node-monitor-period=1s".into(),
        "--v=1".into(),
    ]
}

/// kube-scheduler with the default profile.
pub fn scheduler_args(kubeconfig: &Path) -> Vec<String> {
    let kc = path(kubeconfig);
    vec![
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        "--v=1".into(),
    ]
}

/// Checks that every upstream binary is there, with the command that builds them otherwise.
pub fn check_binaries(bin_dir: &Path) -> Result<()> {
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !bin_dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "upstream binaries missing from {}: {}; build them with `make setup-e2e` (e2e/upstream/build.sh)",
            bin_dir.display(),
            missing.join(", ")
        )))
    }
}

/// The running control plane.
#[derive(Debug, Default)]
pub struct ControlPlane {
    etcd: Option<Process>,
    apiserver: Option<Process>,
    controller_manager: Option<Process>,
    scheduler: Option<Process>,
}

fn command(layout: &Layout, bin_dir: &Path, name: &str, args: Vec<String>) -> Command {
    Command {
        program: bin_dir.join(name),
        args,
        netns: Some(layout.cp_netns()),
        ..Command::default()
    }
}

impl ControlPlane {
    /// Starts etcd and waits until it answers `/health`.
    pub async fn start_etcd(&mut self, layout: &Layout, bin_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(layout.etcd_dir()).map_err(|source| Error::Io {
            context: "creating the etcd folder".into(),
            source,
        })?;
        let log = layout.logs_dir().join("etcd.log");
        let etcd = Process::spawn("etcd", &command(layout, bin_dir, "etcd", etcd_args(layout)), &log)?;
        let addr: SocketAddr = ([127, 0, 0, 1], 2379).into();
        let ns = layout.cp_netns();
        self.etcd = Some(etcd);
        wait_until("etcd /health", Duration::from_secs(60), Some(self), || async {
            matches!(probe::http_get(&ns, addr, "/health", Duration::from_secs(2)).await, Ok((200, body)) if body.contains("true"))
        })
        .await
    }

    /// Starts kube-apiserver (readiness is checked through the API by the caller).
    pub fn start_apiserver(&mut self, layout: &Layout, bin_dir: &Path, pki: &Pki) -> Result<()> {
        let log = layout.logs_dir().join("kube-apiserver.log");
        let cmd = command(layout, bin_dir, "kube-apiserver", apiserver_args(layout, pki));
        self.apiserver = Some(Process::spawn("kube-apiserver", &cmd, &log)?);
        Ok(())
    }

    /// Starts the controller manager and the scheduler.
    pub fn start_controllers(
        &mut self,
        layout: &Layout,
        bin_dir: &Path,
        pki: &Pki,
        cm_kubeconfig: &Path,
        scheduler_kubeconfig: &Path,
    ) -> Result<()> {
        let logs = layout.logs_dir();
        let cm = command(
            layout,
            bin_dir,
            "kube-controller-manager",
            controller_manager_args(layout, pki, cm_kubeconfig),
        );
        self.controller_manager = Some(Process::spawn(
            "kube-controller-manager",
            &cm,
            &logs.join("kube-controller-manager.log"),
        )?);
        let sched = command(
            layout,
            bin_dir,
            "kube-scheduler",
            scheduler_args(scheduler_kubeconfig),
        );
        self.scheduler = Some(Process::spawn(
            "kube-scheduler",
            &sched,
            &logs.join("kube-scheduler.log"),
        )?);
        Ok(())
    }

    /// The first component that has exited, with its exit status.
    pub fn exited(&self) -> Option<String> {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.apiserver),
            ("kube-controller-manager", &self.controller_manager),
            ("kube-scheduler", &self.scheduler),
        ]
        .into_iter()
        .find_map(|(name, p)| {
            let status = p.as_ref()?.exit_status()?;
            Some(format!("{name} exited ({})", process::describe_exit(status)))
        })
    }

    /// Stops the components in reverse order; the API server strictly before etcd (with etcd gone first
    /// it hangs on SIGTERM).
    pub async fn stop(&mut self) {
        let grace = Duration::from_secs(10);
        for p in [
            &mut self.scheduler,
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            if let Some(mut process) = p.take() {
                process.stop(grace).await;
            }
        }
    }
}

/// Polls `check` every 250 ms until it holds, failing early when a component of `control_plane` exits.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    control_plane: Option<&ControlPlane>,
    check: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "{what} ready");
            return Ok(());
        }
        if let Some(exited) = control_plane.and_then(ControlPlane::exited) {
            return Err(Error::Failed(format!(
                "waiting for {what}: {exited}; see its log"
            )));
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_owned(),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_runs_with_tls_rbac_service_accounts_and_both_service_ranges() {
        let layout = Layout::new("dev", Path::new("/tmp"), 1, true);
        let args = apiserver_args(&layout, &Pki::paths(&layout));
        for want in [
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/112",
            "--advertise-address=172.31.0.2",
            "--service-account-signing-key-file=/tmp/swyd-cluster-dev/pki/sa.key",
            "--client-ca-file=/tmp/swyd-cluster-dev/pki/ca.crt",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
        }
    }

    #[test]
    fn controller_manager_leaves_pod_cidrs_to_the_harness() {
        let layout = Layout::new("dev", Path::new("/tmp"), 1, true);
        let args = controller_manager_args(&layout, &Pki::paths(&layout), Path::new("/k"));
        assert!(args.contains(&"--allocate-node-cidrs=false".to_owned()));
        assert!(args.contains(&"--controllers=*,-nodeipam".to_owned()));
    }
}
