//! The `ProxyNode` custom resource: what one node's agent reports about itself.
//!
//! Written only by the agent of the node it is named after (server-side apply); the operator reads it to
//! roll node state up into its ProxyConfig's status. Agents never write to the ProxyConfig itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::proxyconfig::ProxyMode;

/// Identity of a node's agent: which ProxyConfig it serves.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "switchyard.dev",
    version = "v1alpha1",
    kind = "ProxyNode",
    doc = "ProxyNode is written by the Switchyard agent of the node it is named after and reports what that agent has programmed.",
    plural = "proxynodes",
    shortname = "pxn",
    category = "switchyard",
    status = "ProxyNodeStatus",
    printcolumn = r#"{"name":"Config","type":"string","jsonPath":".spec.proxyConfig"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.services"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.rules"}"#,
    printcolumn = r#"{"name":"Last-Sync","type":"date","jsonPath":".status.lastSyncTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeSpec {
    /// Name of the ProxyConfig whose agent runs on this node.
    #[schemars(length(max = 253))]
    pub proxy_config: String,
}

/// State of the agent on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNodeStatus {
    /// Dataplane mode the agent has programmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ProxyMode>,

    /// Hash of the effective configuration the agent runs (compare with the ProxyConfig's
    /// status.effectiveConfigHash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config_hash: Option<String>,

    /// Version of the agent binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// End of the last successful rule sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,

    /// Duration of the last successful rule sync, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration_millis: Option<i64>,

    /// Service ports programmed on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<i64>,

    /// Endpoints programmed on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<i64>,

    /// Rules (or IPVS destinations) programmed on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<i64>,

    /// Last sync error, cleared by the next successful sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// Ready (agent healthy and synced) and Synced (rules match the API state), plus CleanedUp once the
    /// agent removed its rules on request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
