//! Real-kernel tests of the iptables executor: every test programs rules inside network namespaces it
//! creates (through `ip netns exec`), never the host's. They need root; without it they print why they
//! skip (CI runs them as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::{ConnectError, EchoServer, NetNs, NodeTopology, Proto, request};
use switchyard_agent::iptables::exec::{
    Backend, BackendChoice, DetectionReason, Iptables, IptablesRestore, JumpRule, Position, Table, Tools,
};
use switchyard_agent::model::IpFamily;

const CANARY: &str = "SWYD-PROXY-CANARY";
const BACKENDS: [Backend; 2] = [Backend::Nft, Backend::Legacy];

fn executor(ns: &NetNs, backend: Backend) -> IptablesRestore {
    let ipt = IptablesRestore::builder()
        .backend(BackendChoice::Force(backend))
        .command_prefix(ns.exec_prefix())
        .build();
    assert!(
        ipt.available(),
        "{backend} binaries are installed (make setup-apt)"
    );
    ipt
}

/// Runs `case` once per backend and family, each in a fresh namespace.
fn for_each_backend_and_family(
    label: &str,
    mut case: impl FnMut(&NetNs, &IptablesRestore, Backend, IpFamily),
) {
    for backend in BACKENDS {
        for family in IpFamily::ALL {
            eprintln!("case: {backend} {family}");
            let ns = NetNs::new(&format!("{label}-{backend}-{}", short(family))).unwrap();
            let ipt = executor(&ns, backend);
            case(&ns, &ipt, backend, family);
        }
    }
}

fn short(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

/// The plain `iptables` binary of a backend and family, to play another tool in a test.
fn iptables_bin(backend: Backend, family: IpFamily) -> String {
    Tools::standard(backend, family)
        .iptables
        .to_string_lossy()
        .into_owned()
}

fn other_tool(ns: &NetNs, backend: Backend, family: IpFamily, args: &[&str]) {
    let bin = iptables_bin(backend, family);
    let mut argv = vec![bin.as_str(), "-w"];
    argv.extend_from_slice(args);
    ns.run(&argv).unwrap();
}

fn ip(family: IpFamily, v4: &str, v6: &str) -> IpAddr {
    match family {
        IpFamily::V4 => v4.parse().unwrap(),
        IpFamily::V6 => v6.parse().unwrap(),
    }
}

fn host_cidr(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn endpoint(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// Service addresses used by the rule sets: one DNATed to `pod`, one rejected, one dropped.
struct Vips {
    dnat: IpAddr,
    reject: IpAddr,
    drop: IpAddr,
}

fn vips(family: IpFamily) -> Vips {
    Vips {
        dnat: ip(family, "10.96.0.10", "fd00:96::10"),
        reject: ip(family, "10.96.0.11", "fd00:96::11"),
        drop: ip(family, "10.96.0.12", "fd00:96::12"),
    }
}

/// A small rule set in our chains, in the shape the renderer produces (chains declared, then rules).
fn owned_rules(family: IpFamily, pod: SocketAddr) -> String {
    let v = vips(family);
    let (dnat, reject, drop) = (host_cidr(v.dnat), host_cidr(v.reject), host_cidr(v.drop));
    let pod = endpoint(pod);
    format!(
        "*nat\n\
         :SWYD-SERVICES - [0:0]\n\
         :SWYD-POSTROUTING - [0:0]\n\
         :{CANARY} - [0:0]\n\
         -A SWYD-SERVICES -d {dnat} -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j DNAT --to-destination {pod}\n\
         -A SWYD-SERVICES -d {dnat} -p udp -m comment --comment \"default/web:dns\" -m udp --dport 53 -j DNAT --to-destination {pod}\n\
         -A SWYD-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n\
         COMMIT\n\
         *filter\n\
         :SWYD-FILTER-SERVICES - [0:0]\n\
         :{CANARY} - [0:0]\n\
         -A SWYD-FILTER-SERVICES -d {reject} -p tcp -m tcp --dport 80 -j REJECT\n\
         -A SWYD-FILTER-SERVICES -d {drop} -p tcp -m tcp --dport 80 -j DROP\n\
         COMMIT\n"
    )
}

fn pod_endpoint(family: IpFamily) -> SocketAddr {
    SocketAddr::new(ip(family, "10.244.1.10", "fd00:244:1::a"), 8080)
}

fn jump(table: Table, chain: &'static str, args: &[&str], position: Position) -> JumpRule {
    JumpRule {
        table,
        chain,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        position,
    }
}

/// Jump rules like the renderer's: first in their chains, one appended, one into a chain the rule set
/// does not create (ensure_jumps must create it).
fn jumps() -> Vec<JumpRule> {
    let services = [
        "-m",
        "comment",
        "--comment",
        "switchyard service portals",
        "-j",
        "SWYD-SERVICES",
    ];
    let filter_services = [
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        "switchyard service portals",
        "-j",
        "SWYD-FILTER-SERVICES",
    ];
    vec![
        jump(Table::Nat, "PREROUTING", &services, Position::First),
        jump(Table::Nat, "OUTPUT", &services, Position::First),
        jump(
            Table::Nat,
            "POSTROUTING",
            &[
                "-m",
                "comment",
                "--comment",
                "switchyard postrouting rules",
                "-j",
                "SWYD-POSTROUTING",
            ],
            Position::First,
        ),
        jump(Table::Filter, "FORWARD", &filter_services, Position::First),
        jump(Table::Filter, "OUTPUT", &filter_services, Position::First),
        jump(
            Table::Filter,
            "INPUT",
            &[
                "-m",
                "comment",
                "--comment",
                "switchyard health check service ports",
                "-j",
                "SWYD-FILTER-NODEPORTS",
            ],
            Position::Append,
        ),
    ]
}

/// Save output without comment lines and counters, so two dumps of the same rules compare equal.
fn normalised(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            if line.starts_with(':') {
                line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn snapshot(ipt: &IptablesRestore, family: IpFamily, table: Table) -> String {
    normalised(&ipt.save(family, table).unwrap())
}

fn snapshot_all(ipt: &IptablesRestore, family: IpFamily) -> String {
    Table::ALL
        .iter()
        .map(|&t| snapshot(ipt, family, t))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rules of a built-in chain as `iptables -S` prints them (without the policy line).
fn chain_rules(ns: &NetNs, backend: Backend, family: IpFamily, table: Table, chain: &str) -> Vec<String> {
    let bin = iptables_bin(backend, family);
    ns.run(&[&bin, "-w", "-t", table.as_str(), "-S", chain])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// What `iptables -S` prints for a jump rule.
fn printed(rule: &JumpRule) -> String {
    let args: Vec<String> = rule
        .args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect();
    format!("-A {} {}", rule.chain, args.join(" "))
}

/// Cleanup as the agent does it: jumps first, then flush and delete every owned chain in one restore.
fn cleanup(ipt: &IptablesRestore, family: IpFamily) {
    ipt.remove_jumps(family, &jumps()).unwrap();
    let mut input = String::new();
    for table in Table::ALL {
        let chains = ipt.list_owned_chains(family, table).unwrap();
        if chains.is_empty() {
            continue;
        }
        input.push_str(&format!("*{table}\n"));
        for chain in &chains {
            input.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &chains {
            input.push_str(&format!("-X {chain}\n"));
        }
        input.push_str("COMMIT\n");
    }
    if !input.is_empty() {
        ipt.restore(family, &input).unwrap();
    }
}

/// Another tool's chain and rules: a chain and a jump in nat PREROUTING, a rule in filter FORWARD.
fn add_foreign_rules(ns: &NetNs, backend: Backend, family: IpFamily) {
    let net = match family {
        IpFamily::V4 => "10.9.9.0/24",
        IpFamily::V6 => "fd00:9:9::/64",
    };
    other_tool(ns, backend, family, &["-t", "nat", "-N", "OTHER-TOOL"]);
    other_tool(
        ns,
        backend,
        family,
        &[
            "-t",
            "nat",
            "-A",
            "OTHER-TOOL",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "RETURN",
        ],
    );
    other_tool(
        ns,
        backend,
        family,
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "other tool",
            "-j",
            "OTHER-TOOL",
        ],
    );
    other_tool(
        ns,
        backend,
        family,
        &["-t", "filter", "-A", "FORWARD", "-s", net, "-j", "ACCEPT"],
    );
}

fn foreign_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.contains("OTHER-TOOL") || l.contains("10.9.9.0/24") || l.contains("fd00:9:9::/64"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn restore_applies_owned_chains_and_save_shows_them() {
    if !support::require_root("restore_applies_owned_chains_and_save_shows_them") {
        return;
    }
    for_each_backend_and_family("restore", |_ns, ipt, _backend, family| {
        assert!(
            !ipt.canary_present(family, CANARY).unwrap(),
            "no canary before the first restore"
        );
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();

        let nat = ipt.save(family, Table::Nat).unwrap();
        let dnat = format!(
            "-A SWYD-SERVICES -d {} -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 80 -j DNAT --to-destination {}",
            host_cidr(vips(family).dnat),
            endpoint(pod_endpoint(family))
        );
        assert!(nat.lines().any(|l| l == dnat), "{dnat} missing from\n{nat}");
        let owned = |chains: &[&str]| chains.iter().map(|c| (*c).to_owned()).collect::<BTreeSet<_>>();
        assert_eq!(
            ipt.list_owned_chains(family, Table::Nat).unwrap(),
            owned(&[CANARY, "SWYD-POSTROUTING", "SWYD-SERVICES"])
        );
        assert_eq!(
            ipt.list_owned_chains(family, Table::Filter).unwrap(),
            owned(&[CANARY, "SWYD-FILTER-SERVICES"])
        );
        assert!(ipt.canary_present(family, CANARY).unwrap());

        // A second restore of the same input replaces the chains' content instead of adding to it.
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        let nat = ipt.save(family, Table::Nat).unwrap();
        assert_eq!(nat.lines().filter(|l| *l == dnat).count(), 1, "{nat}");
    });
}

#[test]
fn ensure_jumps_twice_installs_each_jump_exactly_once() {
    if !support::require_root("ensure_jumps_twice_installs_each_jump_exactly_once") {
        return;
    }
    for_each_backend_and_family("jumps", |ns, ipt, backend, family| {
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        let first = ipt.ensure_jumps(family, &jumps()).unwrap();
        assert_eq!(first.inserted, jumps().len(), "{first:?}");
        let second = ipt.ensure_jumps(family, &jumps()).unwrap();
        assert!(second.is_empty(), "second ensure changed something: {second:?}");

        for rule in jumps() {
            let rules = chain_rules(ns, backend, family, rule.table, rule.chain);
            let ours = printed(&rule);
            assert_eq!(
                rules.iter().filter(|r| **r == ours).count(),
                1,
                "{ours} in {rules:?}"
            );
            if rule.position == Position::First {
                assert_eq!(
                    rules.first(),
                    Some(&ours),
                    "{} must start with our jump",
                    rule.chain
                );
            }
        }
        // The target the rule set did not create was created (empty) with its jump.
        assert!(
            ipt.chain_exists(family, Table::Filter, "SWYD-FILTER-NODEPORTS")
                .unwrap()
        );
    });
}

#[test]
fn ensure_jumps_puts_a_displaced_jump_back_first_and_removes_duplicates() {
    if !support::require_root("ensure_jumps_puts_a_displaced_jump_back_first_and_removes_duplicates") {
        return;
    }
    for_each_backend_and_family("displaced", |ns, ipt, backend, family| {
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        ipt.ensure_jumps(family, &jumps()).unwrap();
        add_foreign_rules(ns, backend, family);
        // Another tool inserts its jump ahead of ours, and someone appends a second copy of ours.
        other_tool(
            ns,
            backend,
            family,
            &[
                "-t",
                "nat",
                "-I",
                "PREROUTING",
                "1",
                "-m",
                "comment",
                "--comment",
                "other first",
                "-j",
                "OTHER-TOOL",
            ],
        );
        let services = &jumps()[0];
        let mut duplicate = vec!["-t", "nat", "-A", "PREROUTING"];
        duplicate.extend(services.args.iter().map(String::as_str));
        other_tool(ns, backend, family, &duplicate);

        let changes = ipt.ensure_jumps(family, &jumps()).unwrap();
        assert_eq!(
            (changes.inserted, changes.rewritten, changes.duplicates_removed),
            (0, 1, 1),
            "{changes:?}"
        );
        let rules = chain_rules(ns, backend, family, Table::Nat, "PREROUTING");
        assert_eq!(
            rules,
            vec![
                printed(services),
                "-A PREROUTING -m comment --comment \"other first\" -j OTHER-TOOL".to_owned(),
                "-A PREROUTING -m comment --comment \"other tool\" -j OTHER-TOOL".to_owned(),
            ]
        );
        assert!(ipt.ensure_jumps(family, &jumps()).unwrap().is_empty());
    });
}

#[test]
fn foreign_rules_survive_restore_resync_and_cleanup() {
    if !support::require_root("foreign_rules_survive_restore_resync_and_cleanup") {
        return;
    }
    for_each_backend_and_family("foreign", |ns, ipt, backend, family| {
        add_foreign_rules(ns, backend, family);
        let before = snapshot_all(ipt, family);
        let foreign = foreign_lines(&before);
        assert_eq!(foreign.len(), 4, "{before}");

        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        ipt.ensure_jumps(family, &jumps()).unwrap();
        assert_eq!(
            foreign_lines(&snapshot_all(ipt, family)),
            foreign,
            "after the first restore"
        );

        let other_pod = SocketAddr::new(ip(family, "10.244.1.11", "fd00:244:1::b"), 8080);
        ipt.restore(family, &owned_rules(family, other_pod)).unwrap();
        ipt.ensure_jumps(family, &jumps()).unwrap();
        assert_eq!(
            foreign_lines(&snapshot_all(ipt, family)),
            foreign,
            "after a second restore"
        );

        cleanup(ipt, family);
        assert_eq!(
            foreign_lines(&snapshot_all(ipt, family)),
            foreign,
            "after cleanup"
        );
        assert_eq!(snapshot_all(ipt, family), before);
    });
}

#[test]
fn failing_restore_reports_the_line_and_leaves_previous_rules_in_place() {
    if !support::require_root("failing_restore_reports_the_line_and_leaves_previous_rules_in_place") {
        return;
    }
    for_each_backend_and_family("failing", |_ns, ipt, _backend, family| {
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        ipt.ensure_jumps(family, &jumps()).unwrap();
        let before = snapshot_all(ipt, family);

        // A syntax error in the first table: nothing is applied.
        let bad = "*nat\n:SWYD-SERVICES - [0:0]\n-A SWYD-SERVICES -j RETURN\n-A SWYD-SERVICES --bogus-option\nCOMMIT\n\
                   *filter\n:SWYD-FILTER-SERVICES - [0:0]\nCOMMIT\n";
        let err = ipt.restore(family, bad).unwrap_err();
        assert_eq!(err.category(), "restore_failed", "{err}");
        let switchyard_agent::iptables::exec::ExecError::RestoreFailed { line, line_text, .. } = &err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!(*line, Some(4), "{err}");
        assert_eq!(line_text.as_deref(), Some("-A SWYD-SERVICES --bogus-option"));
        assert!(err.to_string().contains("--bogus-option"), "{err}");
        assert_eq!(
            snapshot_all(ipt, family),
            before,
            "a failed restore changed the rules"
        );

        // A rule the kernel refuses (jump to a chain that does not exist) in the second table: that
        // table is untouched; the first, committed before, is applied (atomic per table).
        let nat_changed = "*nat\n:SWYD-POSTROUTING - [0:0]\nCOMMIT\n";
        let bad_filter = format!(
            "{nat_changed}*filter\n:SWYD-FILTER-SERVICES - [0:0]\n-A SWYD-FILTER-SERVICES -j SWYD-NOWHERE\nCOMMIT\n"
        );
        let filter_before = snapshot(ipt, family, Table::Filter);
        let err = ipt.restore(family, &bad_filter).unwrap_err();
        assert_eq!(err.category(), "restore_failed", "{err}");
        assert_eq!(snapshot(ipt, family, Table::Filter), filter_before);
        let nat = snapshot(ipt, family, Table::Nat);
        assert!(
            !nat.contains("-A SWYD-POSTROUTING"),
            "nat was committed before filter failed:\n{nat}"
        );
    });
}

#[test]
fn missing_binary_is_reported_as_binary_missing() {
    if !support::require_root("missing_binary_is_reported_as_binary_missing") {
        return;
    }
    let ns = NetNs::new("missing").unwrap();
    let nowhere = Tools {
        iptables: "/nonexistent/iptables".into(),
        save: "/nonexistent/iptables-save".into(),
        restore: "/nonexistent/iptables-restore".into(),
    };
    for family in IpFamily::ALL {
        let ipt = IptablesRestore::builder()
            .backend(BackendChoice::Force(Backend::Nft))
            .tools(Backend::Nft, family, nowhere.clone())
            .command_prefix(ns.exec_prefix())
            .build();
        assert!(!ipt.available());
        let errors = [
            ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
                .unwrap_err(),
            ipt.save(family, Table::Nat).unwrap_err(),
            ipt.ensure_jumps(family, &jumps()).unwrap_err(),
            ipt.chain_exists(family, Table::Nat, CANARY).unwrap_err(),
        ];
        for err in errors {
            assert_eq!(err.category(), "binary_missing", "{err}");
            assert!(err.to_string().contains("/nonexistent/"), "{err}");
        }
    }
    // The prefix program itself missing is reported the same way.
    let ipt = IptablesRestore::builder()
        .backend(BackendChoice::Force(Backend::Nft))
        .command_prefix(["/nonexistent/ip", "netns", "exec", ns.name()])
        .build();
    assert_eq!(
        ipt.save(IpFamily::V4, Table::Nat).unwrap_err().category(),
        "binary_missing"
    );

    // Detection with no binaries at all does not fail; it falls back to nft.
    let mut builder = IptablesRestore::builder().command_prefix(ns.exec_prefix());
    for backend in BACKENDS {
        for family in IpFamily::ALL {
            builder = builder.tools(backend, family, nowhere.clone());
        }
    }
    let detection = builder.build().detection();
    assert_eq!(detection.backend, Backend::Nft);
    assert_eq!(detection.reason, DetectionReason::Entries { legacy: 0, nft: 0 });
}

#[test]
fn cleanup_leaves_nat_and_filter_exactly_as_before() {
    if !support::require_root("cleanup_leaves_nat_and_filter_exactly_as_before") {
        return;
    }
    for_each_backend_and_family("cleanup", |ns, ipt, backend, family| {
        // Once from an untouched namespace, once with another tool's rules around.
        for with_foreign in [false, true] {
            if with_foreign {
                add_foreign_rules(ns, backend, family);
            }
            let before = snapshot_all(ipt, family);
            ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
                .unwrap();
            ipt.ensure_jumps(family, &jumps()).unwrap();
            assert_ne!(snapshot_all(ipt, family), before);

            cleanup(ipt, family);
            assert_eq!(
                snapshot_all(ipt, family),
                before,
                "with foreign rules: {with_foreign}"
            );
            for table in Table::ALL {
                assert!(ipt.list_owned_chains(family, table).unwrap().is_empty());
            }
            assert!(!ipt.canary_present(family, CANARY).unwrap());
            assert_eq!(
                ipt.remove_jumps(family, &jumps()).unwrap(),
                0,
                "nothing left to remove"
            );
        }
    });
}

fn detect(ns: &NetNs) -> (Backend, DetectionReason) {
    let ipt = IptablesRestore::builder()
        .command_prefix(ns.exec_prefix())
        .build();
    let detection = ipt.detection();
    assert_eq!(ipt.backend(), detection.backend);
    (detection.backend, detection.reason)
}

#[test]
fn backend_detection_picks_legacy_only_when_only_legacy_has_rules() {
    if !support::require_root("backend_detection_picks_legacy_only_when_only_legacy_has_rules") {
        return;
    }
    // Both empty: nft.
    let ns = NetNs::new("detect-empty").unwrap();
    assert_eq!(
        detect(&ns),
        (Backend::Nft, DetectionReason::Entries { legacy: 0, nft: 0 })
    );

    for family in IpFamily::ALL {
        // Only legacy has something (a rule, in one family): legacy, and the executor then writes there.
        let ns = NetNs::new(&format!("detect-legacy-{}", short(family))).unwrap();
        other_tool(&ns, Backend::Legacy, family, &["-A", "FORWARD", "-j", "ACCEPT"]);
        assert_eq!(
            detect(&ns),
            (Backend::Legacy, DetectionReason::Entries { legacy: 1, nft: 0 })
        );
        let ipt = IptablesRestore::builder()
            .command_prefix(ns.exec_prefix())
            .build();
        ipt.restore(family, &owned_rules(family, pod_endpoint(family)))
            .unwrap();
        let legacy_save = Tools::standard(Backend::Legacy, family)
            .save
            .to_string_lossy()
            .into_owned();
        assert!(
            ns.run(&[&legacy_save, "-t", "nat"])
                .unwrap()
                .contains(":SWYD-SERVICES")
        );
        let nft_save = Tools::standard(Backend::Nft, family)
            .save
            .to_string_lossy()
            .into_owned();
        assert!(!ns.run(&[&nft_save, "-t", "nat"]).unwrap().contains("SWYD-"));

        // Both have something: nft.
        other_tool(&ns, Backend::Nft, family, &["-A", "FORWARD", "-j", "ACCEPT"]);
        let (backend, _) = detect(&ns);
        assert_eq!(backend, Backend::Nft);
    }

    // A user-defined chain alone counts too; empty built-in chains do not.
    let ns = NetNs::new("detect-chain").unwrap();
    ns.run(&["iptables-legacy-save"]).unwrap();
    assert_eq!(
        detect(&ns).0,
        Backend::Nft,
        "listing legacy tables (empty built-in chains) does not count"
    );
    other_tool(
        &ns,
        Backend::Legacy,
        IpFamily::V4,
        &["-t", "nat", "-N", "OTHER-TOOL"],
    );
    assert_eq!(
        detect(&ns),
        (Backend::Legacy, DetectionReason::Entries { legacy: 1, nft: 0 })
    );

    // kubelet's hint chain wins over counts, in either direction.
    let ns = NetNs::new("detect-hint-nft").unwrap();
    other_tool(
        &ns,
        Backend::Legacy,
        IpFamily::V4,
        &["-A", "FORWARD", "-j", "ACCEPT"],
    );
    other_tool(
        &ns,
        Backend::Nft,
        IpFamily::V4,
        &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    );
    assert_eq!(detect(&ns), (Backend::Nft, DetectionReason::KubeletHint));
    let ns = NetNs::new("detect-hint-legacy").unwrap();
    other_tool(
        &ns,
        Backend::Nft,
        IpFamily::V4,
        &["-A", "FORWARD", "-j", "ACCEPT"],
    );
    other_tool(
        &ns,
        Backend::Legacy,
        IpFamily::V4,
        &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    );
    assert_eq!(detect(&ns), (Backend::Legacy, DetectionReason::KubeletHint));

    // Forcing skips detection.
    let ipt = IptablesRestore::builder()
        .backend(BackendChoice::Force(Backend::Legacy))
        .command_prefix(ns.exec_prefix())
        .build();
    assert_eq!(ipt.detection().reason, DetectionReason::Forced);
    assert_eq!(ipt.backend(), Backend::Legacy);
}

#[test]
fn restored_rules_carry_real_traffic_and_cleanup_stops_it() {
    if !support::require_root("restored_rules_carry_real_traffic_and_cleanup_stops_it") {
        return;
    }
    let timeout = Duration::from_millis(700);
    // See support::request: an IPv6 refusal may only show at the SYN retransmission.
    let refused_timeout = Duration::from_secs(2);
    for backend in BACKENDS {
        let topo = NodeTopology::new(&format!("traffic-{backend}"), 1).unwrap();
        let ipt = executor(&topo.node, backend);
        for family in IpFamily::ALL {
            eprintln!("case: {backend} {family}");
            let pod = &topo.pods[0];
            let pod_ep = pod_endpoint(family);
            assert_eq!(
                pod.ip_like(pod_ep.ip()),
                pod_ep.ip(),
                "topology and rule set agree on the pod"
            );
            let _tcp = EchoServer::start(&pod.ns, Proto::Tcp, pod_ep, "pod0").unwrap();
            let _udp = EchoServer::start(&pod.ns, Proto::Udp, pod_ep, "pod0-udp").unwrap();
            let v = vips(family);
            let client = &topo.client;
            let service = SocketAddr::new(v.dnat, 80);

            // Before: nobody owns the service address; the packets go nowhere.
            assert_eq!(
                request(client, Proto::Tcp, service, timeout),
                Err(ConnectError::Timeout)
            );

            ipt.restore(family, &owned_rules(family, pod_ep)).unwrap();
            ipt.ensure_jumps(family, &jumps()).unwrap();
            let reply = request(client, Proto::Tcp, service, timeout).unwrap();
            assert_eq!(reply.server, "pod0");
            assert_eq!(
                reply.peer.ip(),
                topo.client_ip_like(v.dnat),
                "no masquerade without the mark"
            );
            let reply = request(client, Proto::Udp, SocketAddr::new(v.dnat, 53), timeout).unwrap();
            assert_eq!(reply.server, "pod0-udp");
            assert_eq!(
                request(client, Proto::Tcp, SocketAddr::new(v.reject, 80), refused_timeout),
                Err(ConnectError::Refused)
            );
            assert_eq!(
                request(client, Proto::Tcp, SocketAddr::new(v.drop, 80), timeout),
                Err(ConnectError::Timeout)
            );

            cleanup(&ipt, family);
            assert_eq!(
                request(client, Proto::Tcp, service, timeout),
                Err(ConnectError::Timeout)
            );
            assert_eq!(
                request(client, Proto::Tcp, SocketAddr::new(v.reject, 80), timeout),
                Err(ConnectError::Timeout),
                "the REJECT went away with our chains"
            );
        }
    }
}

#[test]
fn harness_client_tells_replies_refusals_and_timeouts_apart() {
    if !support::require_root("harness_client_tells_replies_refusals_and_timeouts_apart") {
        return;
    }
    let a = NetNs::new("client").unwrap();
    let b = NetNs::new("server").unwrap();
    support::veth(&a, "eth0", &b, "eth0").unwrap();
    for (cidr_a, cidr_b) in [("10.1.0.1/24", "10.1.0.2/24"), ("fd00:1::1/64", "fd00:1::2/64")] {
        a.add_addr("eth0", cidr_a).unwrap();
        b.add_addr("eth0", cidr_b).unwrap();
    }
    let timeout = Duration::from_millis(500);
    for (client_ip, server_ip) in [("10.1.0.1", "10.1.0.2"), ("fd00:1::1", "fd00:1::2")] {
        let client_ip: IpAddr = client_ip.parse().unwrap();
        let server_ip: IpAddr = server_ip.parse().unwrap();
        let family = IpFamily::of(&server_ip);
        for proto in [Proto::Tcp, Proto::Udp] {
            let addr = SocketAddr::new(server_ip, 7000);
            let server = EchoServer::start(&b, proto, addr, "srv-b").unwrap();
            let reply = request(&a, proto, addr, timeout).unwrap();
            assert_eq!(reply.server, "srv-b");
            assert_eq!(reply.peer.ip(), client_ip);
            drop(server);
            assert_eq!(
                request(&a, proto, addr, timeout),
                Err(ConnectError::Refused),
                "{proto:?} nobody listening"
            );

            let _server = EchoServer::start(&b, proto, addr, "srv-b").unwrap();
            let p = if proto == Proto::Tcp { "tcp" } else { "udp" };
            other_tool(
                &b,
                Backend::Nft,
                family,
                &["-I", "INPUT", "-p", p, "--dport", "7000", "-j", "DROP"],
            );
            assert_eq!(
                request(&a, proto, addr, timeout),
                Err(ConnectError::Timeout),
                "{proto:?} dropped"
            );
            other_tool(
                &b,
                Backend::Nft,
                family,
                &["-D", "INPUT", "-p", p, "--dport", "7000", "-j", "DROP"],
            );
        }
    }
}

#[test]
fn harness_deletes_namespaces_and_their_processes_on_drop_even_on_panic() {
    if !support::require_root("harness_deletes_namespaces_and_their_processes_on_drop_even_on_panic") {
        return;
    }
    let mut name = String::new();
    let mut sleeper = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = NetNs::new("panics").unwrap();
        name = ns.name().to_owned();
        // Started without a guard: the namespace's drop must kill it.
        sleeper = Some(ns.command("sleep").arg("600").spawn().unwrap());
        assert!(!ns.pids().is_empty());
        panic!("test failure inside a namespace");
    }));
    assert!(result.is_err());
    assert!(name.starts_with(support::NETNS_PREFIX));
    let list = support::run(&["ip", "netns", "list"]).unwrap();
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "{name} left in {list}"
    );
    let status = sleeper.unwrap().wait().unwrap();
    assert!(!status.success(), "the process in the namespace was killed");
}

#[test]
fn harness_removes_leftover_namespaces_of_dead_runs_only() {
    if !support::require_root("harness_removes_leftover_namespaces_of_dead_runs_only") {
        return;
    }
    let live = NetNs::new("live").unwrap();
    // A pid that does not exist stands for a crashed earlier run.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dead = (2..pid_max)
        .rev()
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .unwrap();
    let leftover = format!("{}{dead}-0-leftover", support::NETNS_PREFIX);
    support::run(&["ip", "netns", "add", &leftover]).unwrap();

    let failed = support::remove_leftovers();
    assert!(failed.is_empty(), "{failed:?}");
    let list = support::run(&["ip", "netns", "list"]).unwrap();
    let names: Vec<&str> = list.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(!names.contains(&leftover.as_str()), "{leftover} still there");
    assert!(names.contains(&live.name()), "a live run's namespace was removed");
}
