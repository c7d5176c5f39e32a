//! What the other modes left behind. Every mode owns objects no other mode touches: the iptables mode its
//! `SWYD-` chains and their jump rules, the nftables mode its tables named [`NFT_TABLE`]. When a node
//! switches mode (the agent restarts with the new configuration), the agent removes the other modes'
//! objects only after the new mode's first successful sync, so Service traffic never goes unproxied;
//! connections already established keep their conntrack entries through the switch.
//!
//! `switchyard-agent cleanup` removes the objects of every mode, the same way.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use switchyard_api::AgentConfig;
use switchyard_api::proxyconfig::ProxyMode;

use crate::iptables::backend::IptablesBackend;
use crate::iptables::exec::{Backend as XtablesBackend, ExecError, IptablesRestore, Runner};
use crate::sync::{Backend, BackendError};

/// Name of the nftables mode's tables (one per family it programs: `ip`, `ip6`, or `inet`).
pub const NFT_TABLE: &str = "switchyard";
/// The nftables families the nftables mode may program; a table of that name in another family
/// (`bridge`, `arp`, `netdev`) is not ours.
const NFT_FAMILIES: [&str; 3] = ["ip", "ip6", "inet"];

/// A remover of one mode's objects.
pub trait Leftovers: Send {
    /// The mode whose objects this removes.
    fn mode(&self) -> ProxyMode;
    /// Removes them; returns what it removed (for the log), empty when there was nothing. Safe to run
    /// again after a failure.
    fn remove(&mut self) -> Result<Vec<String>, BackendError>;
}

/// Both iptables implementations.
pub const BOTH_IPTABLES: [XtablesBackend; 2] = [XtablesBackend::Nft, XtablesBackend::Legacy];

/// Removers for every mode but `mode`: what the agent runs after its first successful sync in `mode`.
/// `prefix` runs each command through a wrapper (tests use `ip netns exec <name>`).
pub fn other_modes(mode: ProxyMode, config: &AgentConfig, prefix: &[OsString]) -> Vec<Box<dyn Leftovers>> {
    every_mode(config, prefix, &BOTH_IPTABLES)
        .into_iter()
        .filter(|l| l.mode() != mode)
        .collect()
}

/// Removers for every mode, the iptables mode's in the `iptables` implementations: what
/// `switchyard-agent cleanup` runs.
pub fn every_mode(
    config: &AgentConfig,
    prefix: &[OsString],
    iptables: &[XtablesBackend],
) -> Vec<Box<dyn Leftovers>> {
    vec![
        Box::new(IptablesLeftovers {
            config: config.clone(),
            prefix: prefix.to_vec(),
            flavors: iptables.to_vec(),
        }),
        Box::new(NftablesLeftovers::new(prefix.to_vec())),
    ]
}

/// The iptables mode's chains and jumps, in the given iptables implementations.
#[derive(Debug)]
struct IptablesLeftovers {
    config: AgentConfig,
    prefix: Vec<OsString>,
    flavors: Vec<XtablesBackend>,
}

impl Leftovers for IptablesLeftovers {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }

    fn remove(&mut self) -> Result<Vec<String>, BackendError> {
        let mut removed = Vec::new();
        for &flavor in &self.flavors {
            let exec = IptablesRestore::builder()
                .backend(crate::iptables::exec::BackendChoice::Force(flavor))
                .command_prefix(self.prefix.clone())
                .build();
            if !exec.available() {
                tracing::debug!(iptables = %flavor, "not installed; nothing to clean");
                continue;
            }
            // Listing a chain creates its table, so an implementation holding no table at all is left
            // alone (the legacy tables must not appear on an nft node).
            if !exec.has_tables() {
                continue;
            }
            IptablesBackend::new(exec, self.config.clone()).cleanup()?;
            removed.push(format!("iptables-{flavor} chains and jumps"));
        }
        Ok(removed)
    }
}

/// The nftables mode's tables.
#[derive(Debug)]
struct NftablesLeftovers {
    runner: Runner,
}

/// The nftables command-line tool.
const NFT: &str = "nft";

impl NftablesLeftovers {
    fn new(prefix: Vec<OsString>) -> Self {
        Self {
            runner: Runner::new(prefix, Duration::from_secs(30)),
        }
    }
}

fn nft_error(error: &ExecError) -> BackendError {
    BackendError {
        category: "leftovers_failed",
        message: format!("removing the nftables mode's tables: {error}"),
    }
}

/// The tables of `nft list tables` output that the nftables mode owns, as `<family> <name>`.
pub fn owned_nft_tables(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("table"), Some(family), Some(NFT_TABLE), None) if NFT_FAMILIES.contains(&family) => {
                    Some(format!("{family} {NFT_TABLE}"))
                }
                _ => None,
            }
        })
        .collect()
}

impl Leftovers for NftablesLeftovers {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Nftables
    }

    fn remove(&mut self) -> Result<Vec<String>, BackendError> {
        let nft = Path::new(NFT);
        let run = |args: &[&str], input: Option<&str>| -> Result<String, ExecError> {
            let finished = self.runner.run(nft, args, input)?;
            if finished.status.success() {
                Ok(finished.stdout)
            } else {
                Err(finished.failed(nft, args))
            }
        };
        let list = match run(&["list", "tables"], None) {
            // Without the nft tool on the node, the nftables mode never ran here.
            Err(ExecError::BinaryMissing { .. }) => return Ok(Vec::new()),
            listed => listed.map_err(|e| nft_error(&e))?,
        };
        let tables = owned_nft_tables(&list);
        if !tables.is_empty() {
            // One transaction: every table goes, or none does.
            let script: String = tables.iter().map(|t| format!("delete table {t}\n")).collect();
            run(&["-f", "-"], Some(&script)).map_err(|e| nft_error(&e))?;
        }
        Ok(tables
            .into_iter()
            .map(|t| format!("nftables table {t}"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tables_named_switchyard_are_ours() {
        let list = "table ip filter\ntable ip switchyard\ntable ip6 switchyard\ntable inet switchyard-extra\n\
                    table inet kube-proxy\ntable ip nat\ntable bridge switchyard\n";
        assert_eq!(
            owned_nft_tables(list),
            ["ip switchyard", "ip6 switchyard"],
            "a bridge table of that name is not ours"
        );
        assert!(owned_nft_tables("").is_empty());
    }

    #[test]
    fn a_mode_never_removes_its_own_objects() {
        let spec = serde_json::from_value(serde_json::json!({"mode": "iptables"})).unwrap();
        let config = AgentConfig::from_spec(&spec).unwrap();
        for mode in [ProxyMode::Iptables, ProxyMode::Nftables, ProxyMode::Ipvs] {
            let others = other_modes(mode, &config, &[]);
            assert!(others.iter().all(|l| l.mode() != mode), "{mode}");
        }
        assert_eq!(other_modes(ProxyMode::Iptables, &config, &[]).len(), 1);
        assert_eq!(every_mode(&config, &[], &BOTH_IPTABLES).len(), 2);
    }
}
