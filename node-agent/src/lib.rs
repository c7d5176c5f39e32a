//! Switchyard's node agent: watches Services and EndpointSlices, models what this node must proxy, and
//! programs the chosen dataplane.

pub mod cli;
pub mod conntrack;
pub mod iptables;
pub mod leftovers;
pub mod metrics;
pub mod model;
pub mod server;
pub mod status;
pub mod sync;
pub mod watch;
