//! Switchyard's operator: reconciles each ProxyConfig into the agents' ConfigMap and DaemonSet, and rolls
//! its nodes' ProxyNodes up into the ProxyConfig's status. Never writes into a ProxyConfig's spec.

pub mod build;
pub mod cli;
pub mod controller;
pub mod leader;
pub mod status;
