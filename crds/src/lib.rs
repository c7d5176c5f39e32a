//! Switchyard's API: the `ProxyConfig` and `ProxyNode` custom resources (group `switchyard.dev`,
//! version `v1alpha1`), the CRD manifests generated from them, and the agent's effective configuration.
//!
//! This crate holds data types and pure functions only; it never talks to an API server.

pub mod crd;
pub mod effective;
pub mod proxyconfig;
pub mod proxynode;

pub use effective::{AgentConfig, ConfigError};
pub use proxyconfig::{ProxyConfig, ProxyConfigSpec, ProxyConfigStatus, ProxyMode};
pub use proxynode::{ProxyNode, ProxyNodeSpec, ProxyNodeStatus};

/// API group of every Switchyard resource.
pub const GROUP: &str = "switchyard.dev";
/// Field manager used by the operator for server-side apply.
pub const OPERATOR_FIELD_MANAGER: &str = "switchyard-operator";
/// Field manager used by node agents for server-side apply.
pub const AGENT_FIELD_MANAGER: &str = "switchyard-agent";
/// Label that restricts a Service to one service proxy (upstream convention).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
