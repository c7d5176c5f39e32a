//! The two proxies under test, run as plain processes in their own simulated node's network namespace,
//! and what the bench reads from outside them: the rules in the kernel, their metrics, their /proc
//! figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::{Command, Process};

/// Which proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    /// Switchyard's agent.
    Switchyard,
    /// Upstream kube-proxy.
    KubeProxy,
}

impl Kind {
    /// Both, in report order.
    pub const ALL: [Kind; 2] = [Kind::Switchyard, Kind::KubeProxy];

    /// Display name.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Switchyard => "switchyard",
            Kind::KubeProxy => "kube-proxy",
        }
    }

    /// The nat chain that holds one jump per service port.
    pub fn services_chain(self) -> &'static str {
        match self {
            Kind::Switchyard => "SWYD-SERVICES",
            Kind::KubeProxy => "KUBE-SERVICES",
        }
    }
}

/// The iptables flavour both proxies use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Flavor {
    /// iptables-legacy.
    Legacy,
    /// iptables-nft.
    Nft,
}

impl Flavor {
    /// The multi-call binary.
    pub fn multi(self) -> &'static str {
        match self {
            Flavor::Legacy => "/usr/sbin/xtables-legacy-multi",
            Flavor::Nft => "/usr/sbin/xtables-nft-multi",
        }
    }

    /// Name of the flavour for our agent's `--iptables`.
    pub fn arg(self) -> &'static str {
        match self {
            Flavor::Legacy => "legacy",
            Flavor::Nft => "nft",
        }
    }
}

/// Where one proxy runs and with what.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Which proxy.
    pub kind: Kind,
    /// Node name (the Node object it serves).
    pub node: String,
    /// The node's network namespace.
    pub netns: String,
    /// The program.
    pub program: PathBuf,
    /// Folder for its configuration, lock and logs.
    pub dir: PathBuf,
    /// Kubeconfig reaching the API server from the node.
    pub kubeconfig: PathBuf,
    /// iptables flavour.
    pub flavor: Flavor,
    /// Pod CIDR of the cluster (local-traffic detection).
    pub cluster_cidr: String,
    /// minSyncPeriod, as a duration string.
    pub min_sync_period: String,
}

impl Setup {
    /// The xtables lock this node's processes share (each simulated node gets its own, as each real
    /// node has its own `/run/xtables.lock`; on one host they would otherwise serialise each other).
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("xtables.lock")
    }

    /// A folder of `iptables*` names pointing at the chosen flavour, first on kube-proxy's PATH (it
    /// runs `iptables-restore` and friends by name).
    fn shim_dir(&self) -> PathBuf {
        self.dir.join("shims")
    }

    fn env(&self) -> Vec<(String, String)> {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        vec![
            ("XTABLES_LOCKFILE".into(), self.lock_file().display().to_string()),
            ("PATH".into(), format!("{}:{path}", self.shim_dir().display())),
        ]
    }

    /// Writes the configuration files and the PATH shims.
    pub fn prepare(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.shim_dir())?;
        for name in [
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
        ] {
            let link = self.shim_dir().join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(self.flavor.multi(), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        let config = match self.kind {
            Kind::Switchyard => format!(
                "apiVersion: switchyard.dev/v1alpha1\nkind: ProxyConfig\nmetadata:\n  name: bench\nspec:\n  \
                 mode: iptables\n  clusterCIDRs: [\"{cidr}\"]\n  syncPeriod: 10s\n  minSyncPeriod: {min}\n  \
                 metricsBindAddress: 127.0.0.1:10249\n  healthzBindAddress: 127.0.0.1:10256\n  \
                 conntrack:\n    maxPerCore: 0\n    tcpEstablishedTimeout: 0s\n    tcpCloseWaitTimeout: 0s\n",
                cidr = self.cluster_cidr,
                min = self.min_sync_period,
            ),
            Kind::KubeProxy => format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 clientConnection:\n  kubeconfig: {kc}\nhostnameOverride: {node}\nmode: iptables\n\
                 clusterCIDR: {cidr}\niptables:\n  syncPeriod: 10s\n  minSyncPeriod: {min}\n\
                 metricsBindAddress: 127.0.0.1:10249\nhealthzBindAddress: 127.0.0.1:10256\n\
                 conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n",
                kc = self.kubeconfig.display(),
                node = self.node,
                cidr = self.cluster_cidr,
                min = self.min_sync_period,
            ),
        };
        std::fs::write(self.config_file(), config)?;
        Ok(())
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn command(&self, args: Vec<String>) -> Command {
        Command {
            program: self.program.clone(),
            args,
            env: self.env(),
            clear_env: false,
            netns: Some(self.netns.clone()),
            cwd: Some(self.dir.clone()),
        }
    }

    /// Starts the proxy.
    pub fn start(&self, log_name: &str) -> anyhow::Result<Running> {
        let config = self.config_file().display().to_string();
        let args = match self.kind {
            Kind::Switchyard => vec![
                "run".into(),
                "--config".into(),
                config,
                "--kubeconfig".into(),
                self.kubeconfig.display().to_string(),
                "--node-name".into(),
                self.node.clone(),
                "--iptables".into(),
                self.flavor.arg().into(),
            ],
            Kind::KubeProxy => vec!["--config".into(), config, "--v=1".into()],
        };
        let started = Instant::now();
        let process = Process::spawn(self.kind.label(), &self.command(args), &self.dir.join(log_name))?;
        Ok(Running { process, started })
    }

    /// Removes every rule the proxy owns, with the proxy's own cleanup command.
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        let args: Vec<String> = match self.kind {
            Kind::Switchyard => vec!["cleanup".into(), "--iptables".into(), self.flavor.arg().into()],
            Kind::KubeProxy => vec!["--cleanup".into(), "--v=0".into()],
        };
        let mut process = Process::spawn("cleanup", &self.command(args), &self.dir.join("cleanup.log"))?;
        let status = tokio::time::timeout(Duration::from_secs(600), process.wait())
            .await
            .context("cleanup did not finish in 10 minutes")?;
        // kube-proxy --cleanup exits 1 when some table had nothing to clean; what matters is the check.
        let left = self.service_rules().await?;
        if left > 0 {
            bail!(
                "{} cleanup ({status}) left {left} service rules",
                self.kind.label()
            );
        }
        Ok(())
    }

    /// Runs `tool` (`iptables`, `iptables-save`) of the chosen flavour inside the node, under `lock`.
    async fn xtables(&self, tool: &str, args: &[&str], lock: &Path) -> anyhow::Result<std::process::Output> {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, self.flavor.multi(), tool])
            .args(args)
            .env("XTABLES_LOCKFILE", lock)
            .output()
            .await
            .with_context(|| format!("running {tool} {}", args.join(" ")))
    }

    /// The lock file of the bench's own reads (never the node's, so reading never delays the proxy).
    fn reader_lock(&self) -> PathBuf {
        self.dir.join("reader.lock")
    }

    /// Number of service-port jumps in the nat table's services chain, read from outside the proxy.
    pub async fn service_rules(&self) -> anyhow::Result<usize> {
        let chain = self.kind.services_chain();
        let out = self
            .xtables("iptables", &["-w", "-t", "nat", "-S", chain], &self.reader_lock())
            .await?;
        if !out.status.success() {
            // The chain does not exist yet.
            return Ok(0);
        }
        let prefix = format!("-A {chain} -d ");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .count())
    }

    /// The node's tables as `iptables-save` prints them.
    pub async fn save(&self) -> anyhow::Result<String> {
        let out = self.xtables("iptables-save", &[], &self.reader_lock()).await?;
        if !out.status.success() {
            bail!("iptables-save: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Deletes the proxy's canary chains (empty chains it keeps to notice a flush), as a flush of its
    /// tables would: both proxies check them every syncPeriod and answer with a full resync.
    pub async fn delete_canary(&self) -> anyhow::Result<()> {
        let (chain, tables): (&str, &[&str]) = match self.kind {
            Kind::Switchyard => ("SWYD-PROXY-CANARY", &["nat", "filter"]),
            Kind::KubeProxy => ("KUBE-PROXY-CANARY", &["mangle", "nat", "filter"]),
        };
        for table in tables {
            let out = self
                .xtables("iptables", &["-w", "-t", table, "-X", chain], &self.lock_file())
                .await?;
            if !out.status.success() {
                bail!(
                    "deleting {chain} from {table}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// The proxy's full-sync histogram.
    pub async fn full_syncs(&self) -> anyhow::Result<Series> {
        self.histogram("kubeproxy_sync_full_proxy_rules_duration_seconds")
            .await
    }

    /// Syncs of the IPv4 rules so far (`kubeproxy_sync_proxy_rules_duration_seconds`).
    pub async fn syncs(&self) -> anyhow::Result<u64> {
        let series = self
            .histogram("kubeproxy_sync_proxy_rules_duration_seconds")
            .await?;
        let count = main_series(&series)
            .and_then(|l| series.get(&l))
            .map_or(0.0, |v| v.1);
        Ok(count as u64)
    }

    async fn histogram(&self, name: &str) -> anyhow::Result<Series> {
        let (_, text) = crate::probe::http_get(
            &self.netns,
            self.metrics_addr(),
            "/metrics",
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("{} metrics", self.kind.label()))?;
        Ok(histogram(&text, name))
    }

    /// Address of the proxy's metrics inside its node.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10249))
    }
}

/// A started proxy.
#[derive(Debug)]
pub struct Running {
    /// The process.
    pub process: Process,
    /// When it was started.
    pub started: Instant,
}

/// CPU and memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Usage {
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// User + system CPU seconds, including waited-for children (the iptables processes it runs).
    pub cpu_seconds: f64,
}

/// Reads `pid`'s usage.
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) };
    // utime, stime, cutime, cstime are fields 14-17, i.e. 11-14 after the name.
    let clock = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(Usage {
        peak_rss_mib: hwm_kib / 1024.0,
        cpu_seconds: (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / clock,
    })
}

/// A histogram's `(sum, count)` per label set (`le` aside), from Prometheus text.
pub type Series = BTreeMap<String, (f64, f64)>;

/// Reads the `<name>_sum` and `<name>_count` lines of a histogram.
pub fn histogram(text: &str, name: &str) -> Series {
    let mut per_labels = Series::new();
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, labels) = key.split_once('{').unwrap_or((key, ""));
        let value: f64 = value.parse().unwrap_or(0.0);
        if metric == sum_name {
            per_labels.entry(labels.to_owned()).or_default().0 += value;
        } else if metric == count_name {
            per_labels.entry(labels.to_owned()).or_default().1 += value;
        }
    }
    per_labels
}

/// The label set of the family whose canary the bench deletes (IPv4): kube-proxy's `ip_family="IPv4"`,
/// or Switchyard's single unlabelled series.
pub fn main_series(series: &Series) -> Option<String> {
    series
        .keys()
        .find(|labels| labels.contains("IPv4"))
        .or_else(|| series.keys().next().filter(|_| series.len() == 1))
        .cloned()
}

/// Mean duration of one sync of every IP family observed between `before` and `after`: the mean of each
/// label set that got new observations, added up (kube-proxy labels its syncs by IP family, one sync per
/// family; Switchyard syncs both families at once). Also the number of new observations.
pub fn mean_since(before: &Series, after: &Series) -> (f64, f64) {
    after
        .iter()
        .map(|(labels, (sum, count))| {
            let (s0, c0) = before.get(labels).copied().unwrap_or_default();
            (sum - s0, count - c0)
        })
        .filter(|(_, count)| *count > 0.0)
        .fold((0.0, 0.0), |(mean, total), (sum, count)| {
            (mean + sum / count, total + count)
        })
}

/// Time to load `rules` (an `iptables-save` dump) into an empty network namespace with
/// `iptables-restore --noflush`, as the proxies load theirs. Rules matching nfacct counters are left
/// out (kube-proxy creates those counter objects through netlink first; they are two rules).
pub async fn restore_alone(flavor: Flavor, rules: &str, dir: &Path) -> anyhow::Result<Duration> {
    let rules: String = rules
        .lines()
        .filter(|l| !l.contains("-m nfacct"))
        .flat_map(|l| [l, "\n"])
        .collect();
    let rules = rules.as_str();
    let ns = format!("swyd-benchrestore-{}", std::process::id());
    let _ = crate::netns::delete_sync(&ns);
    crate::netns::add(&ns).await?;
    let file = dir.join("restore-alone.rules");
    std::fs::write(&file, rules)?;
    let input = std::fs::File::open(&file)?;
    let start = Instant::now();
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            flavor.multi(),
            "iptables-restore",
            "-w",
            "--noflush",
        ])
        .env("XTABLES_LOCKFILE", dir.join("restore-alone.lock"))
        .stdin(input)
        .output()
        .await;
    let elapsed = start.elapsed();
    let _ = crate::netns::delete_sync(&ns);
    let out = out.context("running iptables-restore")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .split("line ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next()?.parse::<usize>().ok())
            .and_then(|n| rules.lines().nth(n.saturating_sub(1)))
            .unwrap_or_default();
        bail!(
            "iptables-restore of {}: {} (the line: {line})",
            file.display(),
            err.trim()
        );
    }
    Ok(elapsed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_means_add_up_over_label_sets_that_changed() {
        let name = "kubeproxy_sync_full_proxy_rules_duration_seconds";
        let text = |v4: (f64, u32), v6: (f64, u32)| {
            format!(
                "# HELP x\n{name}_sum{{ip_family=\"IPv4\"}} {}\n{name}_count{{ip_family=\"IPv4\"}} {}\n\
                 {name}_sum{{ip_family=\"IPv6\"}} {}\n{name}_count{{ip_family=\"IPv6\"}} {}\n\
                 {name}_bucket{{ip_family=\"IPv6\",le=\"1\"}} 2\n",
                v4.0, v4.1, v6.0, v6.1
            )
        };
        let start = histogram(&text((3.0, 2), (0.5, 2)), name);
        assert_eq!(mean_since(&Series::new(), &start), (1.75, 4.0));
        let later = histogram(&text((7.0, 3), (0.5, 2)), name);
        assert_eq!(mean_since(&start, &later), (4.0, 1.0), "only IPv4 synced again");
        let ours = histogram(&format!("{name}_sum 2\n{name}_count 4\n"), name);
        assert_eq!(mean_since(&Series::new(), &ours), (0.5, 4.0));
        assert!(histogram("", name).is_empty());
        assert_eq!(main_series(&start).as_deref(), Some("ip_family=\"IPv4\"}"));
        assert_eq!(main_series(&Series::new()), None);
        assert_eq!(main_series(&ours).as_deref(), Some(""));
    }

    #[test]
    fn usage_of_this_process_is_positive() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.peak_rss_mib > 1.0, "{u:?}");
    }
}
