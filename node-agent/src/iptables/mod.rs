//! The iptables backend: renders the model into `iptables-restore` input (pure), and applies it.
//!
//! Owns only chains whose names start with [`CHAIN_PREFIX`] in the nat and filter tables, plus the jump
//! rules into them from the built-in chains (each tagged with a comment naming Switchyard). It never
//! flushes, edits or deletes anything else.

pub mod backend;
pub mod exec;
pub mod render;
#[cfg(test)]
pub mod trace;

/// Prefix of every chain Switchyard creates.
pub const CHAIN_PREFIX: &str = "SWYD-";
