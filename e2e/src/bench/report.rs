//! Figures of a bench run: summaries, the JSON record, the Markdown tables and the plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::plot::{Chart, Series, render_svg};
use super::proxies::{Kind, Usage};

/// Median and tail of a sample.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarises `samples` (nearest-rank percentiles); all zero when empty.
    pub fn of(samples: &[f64]) -> Summary {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let Some((&min, &max)) = sorted.first().zip(sorted.last()) else {
            return Summary::default();
        };
        let rank = |p: f64| {
            let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted
                .get(i.saturating_sub(1).min(sorted.len() - 1))
                .copied()
                .unwrap_or(max)
        };
        Summary {
            n: sorted.len(),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            min,
            max,
        }
    }
}

/// What one proxy did at one size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxyFigures {
    /// Process start to the complete rule set in the kernel, seconds.
    pub cold_start_s: f64,
    /// Full syncs the proxy reported after its cold start (its
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`; kube-proxy counts one per IP family).
    pub full_syncs: u64,
    /// Duration of the first full sync, both proxies starting at once, as each reports it, seconds.
    pub first_full_sync_s: f64,
    /// Duration of a full resync with the machine otherwise quiet (after the proxy's canary chains were
    /// deleted), as the proxy reports it (kube-proxy's families added up), seconds.
    pub full_sync_s: f64,
    /// `iptables-restore --noflush` alone loading this proxy's rules into an empty namespace, seconds.
    pub restore_alone_s: f64,
    /// Lines in `iptables-save` (nat and filter) after the first sync.
    pub rules: usize,
    /// EndpointSlice write to the new endpoint answering through the VIP, milliseconds.
    pub change_latency_ms: Summary,
    /// Changes that were not seen within the limit.
    pub change_timeouts: usize,
    /// TCP connect time to the VIP from the node, microseconds.
    pub connect_vip_us: Summary,
    /// TCP connect time to a pod IP from the node, microseconds.
    pub connect_pod_us: Summary,
    /// Data-plane connections that failed (not in the summaries).
    pub connect_failures: usize,
    /// Peak RSS and CPU over this size's run.
    pub usage: Usage,
    /// Syncs of the IPv4 rules over this size's run, as the proxy counts them.
    pub syncs: u64,
}

/// One size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Point {
    /// Services (the probe included).
    pub services: usize,
    /// Endpoints per filler service.
    pub endpoints_per_service: usize,
    /// Background EndpointSlice updates per second during the change-latency run.
    pub churn_per_second: f64,
    /// Per proxy.
    pub proxies: BTreeMap<String, ProxyFigures>,
}

/// A whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Run {
    /// The command line.
    pub command: String,
    /// Machine description.
    pub machine: String,
    /// iptables flavour.
    pub iptables: String,
    /// minSyncPeriod of both proxies.
    pub min_sync_period: String,
    /// Start time (UTC, RFC 3339).
    pub started: String,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
    /// The sizes.
    pub points: Vec<Point>,
}

fn figures(p: &Point, kind: Kind) -> Option<&ProxyFigures> {
    p.proxies.get(kind.label())
}

fn ratio(upstream: f64, ours: f64) -> String {
    if ours > 0.0 && upstream > 0.0 {
        format!("{:.2}×", upstream / ours)
    } else {
        "–".into()
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The tables of `run` in Markdown. Ratios are kube-proxy ÷ Switchyard (above 1: Switchyard is
/// faster or smaller).
pub fn markdown(run: &Run) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Command: `{}`  ", run.command);
    let _ = writeln!(md, "Machine: {}  ", run.machine);
    let _ = writeln!(
        md,
        "Started {} UTC, {:.0} s; iptables {}; minSyncPeriod {} for both proxies.\n",
        run.started, run.duration_s, run.iptables, run.min_sync_period
    );
    let row_start = |p: &Point| {
        format!(
            "| {} | {} ",
            thousands(p.services),
            thousands(p.services * p.endpoints_per_service)
        )
    };
    let pair = |p: &Point, f: &dyn Fn(&ProxyFigures) -> f64, digits: usize| -> String {
        let ours = figures(p, Kind::Switchyard).map_or(0.0, f);
        let theirs = figures(p, Kind::KubeProxy).map_or(0.0, f);
        format!(
            "| {ours:.digits$} | {theirs:.digits$} | {} |",
            ratio(theirs, ours)
        )
    };

    md.push_str("### Cold start and full sync (seconds)\n\n");
    md.push_str(
        "| services | endpoints | cold start: switchyard | kube-proxy | ratio | first full sync: switchyard | kube-proxy | ratio | full resync alone: switchyard | kube-proxy | ratio | restore alone: switchyard's rules | kube-proxy's | switchyard resync ÷ its restore |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &run.points {
        let ours = figures(p, Kind::Switchyard).cloned().unwrap_or_default();
        let theirs = figures(p, Kind::KubeProxy).cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "{}{}{}{} {:.2} | {:.2} | {:.2}× |",
            row_start(p),
            pair(p, &|f| f.cold_start_s, 2),
            pair(p, &|f| f.first_full_sync_s, 2).trim_start_matches('|'),
            pair(p, &|f| f.full_sync_s, 2).trim_start_matches('|'),
            ours.restore_alone_s,
            theirs.restore_alone_s,
            if ours.restore_alone_s > 0.0 {
                ours.full_sync_s / ours.restore_alone_s
            } else {
                0.0
            },
        );
    }

    md.push_str("\n### Change latency (ms, EndpointSlice write → new endpoint answers through the VIP)\n\n");
    md.push_str(
        "| services | endpoints | changes | switchyard p50 | p90 | p99 | kube-proxy p50 | p90 | p99 | p50 ratio | timeouts (s/k) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &run.points {
        let ours = figures(p, Kind::Switchyard).cloned().unwrap_or_default();
        let theirs = figures(p, Kind::KubeProxy).cloned().unwrap_or_default();
        let (o, t) = (ours.change_latency_ms, theirs.change_latency_ms);
        let _ = writeln!(
            md,
            "{}| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {}/{} |",
            row_start(p),
            o.n.max(t.n),
            o.p50,
            o.p90,
            o.p99,
            t.p50,
            t.p90,
            t.p99,
            ratio(t.p50, o.p50),
            ours.change_timeouts,
            theirs.change_timeouts,
        );
    }

    md.push_str("\n### Node cost (over each size's run: cold start, measurements, changes)\n\n");
    md.push_str(
        "| services | endpoints | peak RSS MiB: switchyard | kube-proxy | ratio | CPU s: switchyard | kube-proxy | ratio | syncs: switchyard | kube-proxy |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &run.points {
        let _ = writeln!(
            md,
            "{}{}{} {} | {} |",
            row_start(p),
            pair(p, &|f| f.usage.peak_rss_mib, 1),
            pair(p, &|f| f.usage.cpu_seconds, 1).trim_start_matches('|'),
            figures(p, Kind::Switchyard).map_or(0, |f| f.syncs),
            figures(p, Kind::KubeProxy).map_or(0, |f| f.syncs),
        );
    }

    md.push_str("\n### Data plane (µs per new TCP connection from the node)\n\n");
    md.push_str(
        "| services | endpoints | to the VIP: switchyard p50 | p99 | kube-proxy p50 | p99 | to a pod IP: switchyard p50 | p99 | kube-proxy p50 | p99 | failed (s/k) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in &run.points {
        let ours = figures(p, Kind::Switchyard).cloned().unwrap_or_default();
        let theirs = figures(p, Kind::KubeProxy).cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "{}| {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {}/{} |",
            row_start(p),
            ours.connect_vip_us.p50,
            ours.connect_vip_us.p99,
            theirs.connect_vip_us.p50,
            theirs.connect_vip_us.p99,
            ours.connect_pod_us.p50,
            ours.connect_pod_us.p99,
            theirs.connect_pod_us.p50,
            theirs.connect_pod_us.p99,
            ours.connect_failures,
            theirs.connect_failures,
        );
    }
    md
}

/// Change latency and full-sync time against the number of services, both proxies.
pub fn plot(run: &Run) -> String {
    let series = |f: &dyn Fn(&ProxyFigures) -> f64| -> Vec<Series> {
        Kind::ALL
            .iter()
            .map(|&kind| Series {
                label: kind.label().into(),
                points: run
                    .points
                    .iter()
                    .filter_map(|p| figures(p, kind).map(|fig| (p.services as f64, f(fig))))
                    .collect(),
            })
            .collect()
    };
    let mut latency = series(&|f| f.change_latency_ms.p50);
    for s in series(&|f| f.change_latency_ms.p99) {
        latency.push(Series {
            label: format!("{} p99", s.label),
            points: s.points,
        });
    }
    for s in latency.iter_mut().take(2) {
        s.label = format!("{} p50", s.label);
    }
    render_svg(&[
        Chart {
            title: "Change latency (EndpointSlice write → VIP answers)".into(),
            x_label: "services (10 endpoints each)".into(),
            y_label: "ms".into(),
            log_y: true,
            series: latency,
        },
        Chart {
            title: "Full resync and cold start".into(),
            x_label: "services (10 endpoints each)".into(),
            y_label: "seconds".into(),
            log_y: true,
            series: {
                let mut s = series(&|f| f.full_sync_s);
                for x in &mut s {
                    x.label = format!("{} full resync", x.label);
                }
                for mut x in series(&|f| f.cold_start_s) {
                    x.label = format!("{} cold start", x.label);
                    s.push(x);
                }
                s
            },
        },
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&samples);
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.min, s.max),
            (100, 50.0, 90.0, 99.0, 1.0, 100.0)
        );
        assert_eq!(Summary::of(&[]), Summary::default());
        assert_eq!(Summary::of(&[3.0]).p99, 3.0);
    }

    #[test]
    fn markdown_has_a_row_per_size_with_ratios() {
        let mut p = Point {
            services: 1000,
            endpoints_per_service: 10,
            ..Point::default()
        };
        let ours = ProxyFigures {
            cold_start_s: 1.0,
            change_latency_ms: Summary::of(&[100.0]),
            ..ProxyFigures::default()
        };
        let theirs = ProxyFigures {
            cold_start_s: 3.0,
            change_latency_ms: Summary::of(&[1000.0]),
            ..ProxyFigures::default()
        };
        p.proxies.insert("switchyard".into(), ours);
        p.proxies.insert("kube-proxy".into(), theirs);
        let run = Run {
            points: vec![p],
            ..Run::default()
        };
        let md = markdown(&run);
        assert!(md.contains("| 1,000 | 10,000 | 1.00 | 3.00 | 3.00× |"), "{md}");
        assert!(md.contains("| 10.00× |"), "{md}");
        assert!(plot(&run).starts_with("<svg"));
    }
}
