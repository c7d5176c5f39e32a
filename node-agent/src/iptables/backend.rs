//! The iptables mode as a [`Backend`]: renders each family's model and applies it with the executor.
//!
//! Full syncs rewrite every owned chain and delete leftovers found in the kernel; partial syncs rewrite
//! the top-level chains and the chains of the services that changed since the last successful sync.
//! Jump rules from the built-in chains are ensured after the chains they point to exist.

use std::collections::BTreeSet;

use switchyard_api::AgentConfig;
use switchyard_api::proxyconfig::ProxyMode;

use super::exec::{self, ExecError, Iptables};
use super::render::{self, CANARY_CHAIN, OwnedChains, RenderInput};
use crate::model::{IpFamily, Model, NodeInfo, ProxyState};
use crate::sync::{Backend, BackendError, SyncStats};

#[derive(Debug, Default)]
struct FamilyState {
    /// Model of the last successful sync.
    applied: Option<ProxyState>,
    /// Owned chains in the kernel after the last successful sync.
    chains: Option<OwnedChains>,
    /// Buffer reused between renderings (large at scale; fresh memory costs page faults).
    buffer: String,
}

/// The iptables backend over an executor.
#[derive(Debug)]
pub struct IptablesBackend<E> {
    exec: E,
    config: AgentConfig,
    families: [FamilyState; 2],
}

fn index(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

fn to_error(error: ExecError) -> BackendError {
    BackendError {
        category: error.category(),
        message: error.to_string(),
    }
}

/// The renderer's jump rules in the executor's terms.
pub fn jump_rules() -> Vec<exec::JumpRule> {
    render::jump_rules()
        .into_iter()
        .map(|rule| exec::JumpRule {
            table: match rule.table {
                render::Table::Nat => exec::Table::Nat,
                render::Table::Filter => exec::Table::Filter,
            },
            chain: rule.chain,
            args: rule.args.iter().map(|a| (*a).to_owned()).collect(),
            position: exec::Position::First,
        })
        .collect()
}

impl<E: Iptables> IptablesBackend<E> {
    /// A backend applying through `exec`.
    pub fn new(exec: E, config: AgentConfig) -> Self {
        Self {
            exec,
            config,
            families: Default::default(),
        }
    }

    /// The executor.
    pub fn exec(&self) -> &E {
        &self.exec
    }

    fn kernel_chains(&self, family: IpFamily) -> Result<OwnedChains, ExecError> {
        Ok(OwnedChains::from_names(
            self.exec.list_owned_chains(family, exec::Table::Nat)?,
            self.exec.list_owned_chains(family, exec::Table::Filter)?,
        ))
    }

    fn sync_family(
        &mut self,
        family: IpFamily,
        state: &ProxyState,
        node: &NodeInfo,
        full: bool,
    ) -> Result<(usize, bool), BackendError> {
        let slot = &self.families[index(family)];
        // Crossing the large-cluster threshold restyles every endpoint rule: only a full sync does that.
        let restyled = slot
            .applied
            .as_ref()
            .is_some_and(|applied| render::large_cluster(applied) != render::large_cluster(state));
        let full = full || restyled || slot.applied.is_none() || slot.chains.is_none();
        let changed: Option<BTreeSet<_>> = match (&slot.applied, full) {
            (Some(applied), false) => Some(state.changed_since(applied)),
            _ => None,
        };
        if let (Some(changed), Some(chains)) = (&changed, &slot.chains)
            && changed.is_empty()
        {
            // Nothing changed for this family: the kernel already holds these rules.
            return Ok((chains.len(), false));
        }
        // A full sync trusts its own record of our chains while the canary shows nobody flushed the
        // tables; otherwise (first sync, restart, flush) it reads them from the kernel, so leftovers are
        // deleted, and re-creates the jump rules. Reading a large table is as slow as writing it.
        let trusted =
            full && slot.chains.is_some() && self.exec.canary_present(family, CANARY_CHAIN).unwrap_or(false);
        let previous = if full && !trusted {
            Some(self.kernel_chains(family).map_err(to_error)?)
        } else {
            slot.chains.clone()
        };
        let input = RenderInput {
            family,
            state,
            config: &self.config,
            node,
        };
        let buffer = std::mem::take(&mut self.families[index(family)].buffer);
        let rendered = render::render_into(&input, previous.as_ref(), changed.as_ref(), buffer);
        tracing::trace!(%family, rules = %rendered.restore, "applying");
        // Jumps go first, while the tables are small (listing a chain reads its whole table); they point at
        // our chains, which exist (possibly empty) until the restore fills them.
        let applied = if full && !trusted {
            self.exec.ensure_jumps(family, &jump_rules()).map(|_| ())
        } else {
            Ok(())
        }
        .and_then(|()| self.exec.restore(family, &rendered.restore));
        let slot = &mut self.families[index(family)];
        match applied {
            Ok(()) => {
                slot.applied = Some(state.clone());
                slot.chains = Some(rendered.chains);
                slot.buffer = rendered.restore;
                Ok((rendered.rule_count, full))
            }
            Err(error) => {
                // Unknown kernel state for the failed table: the retry is a full sync.
                slot.applied = None;
                slot.chains = None;
                Err(to_error(error))
            }
        }
    }
}

impl<E: Iptables> Backend for IptablesBackend<E> {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }

    fn sync(&mut self, model: &Model, node: &NodeInfo, full: bool) -> Result<SyncStats, BackendError> {
        let mut stats = SyncStats {
            full: true,
            ..SyncStats::default()
        };
        for family in IpFamily::ALL {
            let (rules, was_full) = self.sync_family(family, model.family(family), node, full)?;
            let table = match family {
                IpFamily::V4 => "iptables",
                IpFamily::V6 => "ip6tables",
            };
            stats.rules.insert(table, rules);
            stats.full &= was_full;
        }
        Ok(stats)
    }

    fn rules_intact(&mut self) -> bool {
        // Reads each table once per family we programmed (every syncPeriod while nothing changes).
        IpFamily::ALL.into_iter().all(|family| {
            self.families[index(family)].chains.is_none()
                || self.exec.canary_present(family, CANARY_CHAIN).unwrap_or(false)
        })
    }

    fn cleanup(&mut self) -> Result<(), BackendError> {
        for family in IpFamily::ALL {
            self.exec.remove_jumps(family, &jump_rules()).map_err(to_error)?;
            let chains = self.kernel_chains(family).map_err(to_error)?;
            let input = render::render_cleanup(&chains);
            if !input.is_empty() {
                self.exec.restore(family, &input).map_err(to_error)?;
            }
            self.families[index(family)] = FamilyState::default();
        }
        Ok(())
    }
}
