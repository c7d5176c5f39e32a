//! Checks of the generated CRDs: committed YAML matches the types, every field is documented, the schema is
//! structural, the examples are valid, and invalid objects are refused by the schema (OpenAPI keywords and
//! CEL rules, evaluated client-side; the real API server's check is in the e2e suite).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use serde_json::{Value, json};
use switchyard_api::{AgentConfig, ProxyConfig, crd};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn proxyconfig_schema() -> Value {
    let crd = ProxyConfig::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// Every message the schema refuses `object` with, OpenAPI keywords first, then CEL rules.
fn refusals(object: &Value) -> Vec<String> {
    let schema = proxyconfig_schema();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .unwrap();
    let mut messages: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {}", e.instance_path(), e))
        .collect();
    if messages.is_empty()
        && let Err(errors) = kube_cel::Validator::new().validate(&schema, object, None)
    {
        messages.extend(errors.into_vec().into_iter().map(|e| e.to_string()));
    }
    messages
}

fn proxyconfig(spec: Value) -> Value {
    json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": "test"},
        "spec": spec,
    })
}

#[test]
fn committed_crds_match_the_types() {
    for (file, crd) in crd::all() {
        let path = repo_root().join("crds").join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd::to_yaml(&crd).unwrap();
        assert!(
            committed == generated,
            "{} is out of date: run `make crds` and commit the result",
            path.display()
        );
    }
}

fn walk<'a>(path: String, schema: &'a Value, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(&path, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            walk(format!("{path}.{name}"), sub, visit);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(format!("{path}[]"), items, visit);
    }
    if let Some(additional) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(format!("{path}{{}}"), additional, visit);
    }
}

#[test]
fn every_field_has_a_description() {
    for (_, crd) in crd::all() {
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let mut missing = vec![];
        for top in ["spec", "status"] {
            walk(top.to_owned(), &schema["properties"][top], &mut |path, node| {
                // Map values and list items are described by their field.
                let is_element = path.ends_with("[]") || path.ends_with("{}");
                if !is_element
                    && node
                        .get("description")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    missing.push(path.to_owned());
                }
            });
        }
        assert!(
            missing.is_empty(),
            "{}: fields without a description: {missing:?}",
            crd.metadata.name.unwrap()
        );
    }
}

#[test]
fn schemas_are_structural() {
    // The API server refuses non-structural schemas: every node needs a type (unless it is int-or-string or
    // preserves unknown fields), and $ref, or types inside anyOf/oneOf/allOf, are not allowed.
    for (_, crd) in crd::all() {
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let mut problems = vec![];
        walk("".to_owned(), &schema, &mut |path, node| {
            let exempt = node.get("x-kubernetes-int-or-string") == Some(&json!(true))
                || node.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if node.get("type").is_none() && !exempt {
                problems.push(format!("{path}: no type"));
            }
            if node.get("$ref").is_some() {
                problems.push(format!("{path}: $ref"));
            }
            for combinator in ["anyOf", "oneOf", "allOf"] {
                let branches = node.get(combinator).and_then(Value::as_array);
                let typed = |b: &Value| b.get("type").is_some() || b.get("description").is_some();
                if !exempt && branches.is_some_and(|bs| bs.iter().any(typed)) {
                    problems.push(format!("{path}: {combinator} carries types"));
                }
            }
        });
        assert!(
            problems.is_empty(),
            "{}: {problems:?}",
            crd.metadata.name.unwrap()
        );
    }
}

#[test]
fn every_example_deserializes_validates_and_resolves() {
    let dir = repo_root().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("proxyconfig-") || !name.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let typed: ProxyConfig = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let untyped: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            refusals(&untyped),
            Vec::<String>::new(),
            "{name} is refused by the schema"
        );
        AgentConfig::from_spec(&typed.spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
    }
    assert!(seen >= 3, "expected an example per mode, found {seen}");
}

#[test]
fn minimal_proxyconfig_is_accepted() {
    assert_eq!(
        refusals(&proxyconfig(json!({"mode": "iptables"}))),
        Vec::<String>::new()
    );
}

#[test]
fn invalid_proxyconfigs_are_refused_with_a_clear_message() {
    let cases = [
        (json!({}), "\"mode\" is a required property"),
        (json!({"mode": "userspace"}), "is not one of"),
        (
            json!({"mode": "iptables", "masqueradeBit": 32}),
            "32 is greater than the maximum of 31",
        ),
        (
            json!({"mode": "iptables", "masqueradeBit": -1}),
            "-1 is less than the minimum of 0",
        ),
        (json!({"mode": "iptables", "syncPeriod": "-5s"}), "does not match"),
        (
            json!({"mode": "iptables", "syncPeriod": "soon"}),
            "does not match",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "0s"}),
            "must be a positive duration",
        ),
        (
            json!({"mode": "iptables", "syncPeriod": "10s", "minSyncPeriod": "20s"}),
            "minSyncPeriod must not be longer than spec.syncPeriod",
        ),
        (
            json!({"mode": "iptables", "minSyncPeriod": "45s"}),
            "minSyncPeriod must not be longer",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["10.244.0.0/33"]}),
            "must be a CIDR",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["banana"]}),
            "must be a CIDR",
        ),
        (
            json!({"mode": "iptables", "clusterCIDRs": ["10.0.0.0/8", "11.0.0.0/8"]}),
            "at most one CIDR per IP family",
        ),
        (
            json!({"mode": "iptables", "nodePortAddresses": ["primary", "10.0.0.0/8"]}),
            "primary cannot be combined",
        ),
        (
            json!({"mode": "iptables", "nodePortAddresses": ["eth0"]}),
            "must be a CIDR or the word primary",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": 0}}),
            "must be an integer of at least 1",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": "0%"}}),
            "or a percentage from 1% to 100%",
        ),
        (
            json!({"mode": "iptables", "rollout": {"maxUnavailable": "150%"}}),
            "or a percentage from 1% to 100%",
        ),
        (
            json!({"mode": "iptables", "rollout": {"progressDeadlineSeconds": 0}}),
            "less than the minimum of 1",
        ),
        (
            json!({"mode": "iptables", "ipvs": {"scheduler": "rr"}}),
            "spec.ipvs is only allowed when spec.mode is ipvs",
        ),
        (
            json!({"mode": "ipvs", "ipvs": {"scheduler": "fastest"}}),
            "is not one of",
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "ClusterCIDR"}}),
            "ClusterCIDR needs spec.clusterCIDRs",
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "BridgeInterface"}}),
            "bridgeInterface is required",
        ),
        (
            json!({"mode": "iptables", "detectLocal": {"mode": "NodeCIDR", "interfaceNamePrefix": "veth"}}),
            "interfaceNamePrefix is required with mode InterfaceNamePrefix and only allowed with it",
        ),
        (
            json!({"mode": "iptables", "healthzBindAddress": "localhost:10256"}),
            "does not match",
        ),
        (
            json!({"mode": "iptables", "conntrack": {"maxPerCore": -1}}),
            "less than the minimum of 0",
        ),
        (
            json!({"mode": "iptables", "conntrack": {"tcpEstablishedTimeout": "1 day"}}),
            "does not match",
        ),
        (
            json!({"mode": "iptables", "proxyName": "Not_A_Label"}),
            "does not match",
        ),
        (
            json!({"mode": "iptables", "agent": {"logLevel": "verbose"}}),
            "is not one of",
        ),
    ];
    for (spec, expected) in cases {
        let messages = refusals(&proxyconfig(spec.clone()));
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "spec {spec} should be refused with {expected:?}, got {messages:?}"
        );
    }
}

#[test]
fn long_names_are_refused() {
    let mut object = proxyconfig(json!({"mode": "iptables"}));
    object["metadata"]["name"] = json!("x".repeat(51));
    let messages = refusals(&object);
    assert!(
        messages
            .iter()
            .any(|m| m.contains("name must be at most 50 characters")),
        "{messages:?}"
    );
}
