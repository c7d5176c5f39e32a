use serde_json::json;

use super::*;

fn settings() -> Settings {
    Settings {
        namespace: "switchyard-system".into(),
        agent_image: "switchyard.dev/switchyard-agent:0.1.0".into(),
        agent_service_account: "switchyard-agent".into(),
        api_server_host: "172.31.0.2".into(),
        api_server_port: 6443,
    }
}

fn proxy_config(name: &str, spec: serde_json::Value) -> ProxyConfig {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": name, "uid": "0d5c6f1e-0000-0000-0000-000000000001", "generation": 1},
        "spec": spec,
    }))
    .unwrap()
}

fn pod_spec(built: &Built) -> &PodSpec {
    built
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

#[test]
fn iptables_config_builds_a_host_network_daemon_set_with_least_capabilities() {
    let pc = proxy_config("default", json!({"mode": "iptables"}));
    let built = build(&pc, &settings(), &[]).unwrap();

    assert_eq!(
        built.daemon_set.metadata.name.as_deref(),
        Some("switchyard-agent-default")
    );
    assert_eq!(
        built.daemon_set.metadata.namespace.as_deref(),
        Some("switchyard-system")
    );
    let owner = &built.daemon_set.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ProxyConfig", "default", Some(true))
    );

    let pod = pod_spec(&built);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name.as_deref(), Some("switchyard-agent"));
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    assert!(pod.affinity.is_none(), "no selector: every node");
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("switchyard.dev/switchyard-agent:0.1.0")
    );
    let caps = container
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
    let env: BTreeMap<_, _> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
        .collect();
    assert_eq!(env["KUBERNETES_SERVICE_HOST"], "172.31.0.2");
    assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(mounts, ["/etc/switchyard", "/run/xtables.lock", "/lib/modules"]);
    let probe = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::Int(10256));

    let strategy = built
        .daemon_set
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap();
    assert_eq!(
        strategy.rolling_update.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );

    let yaml = &built.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    assert_eq!(AgentConfig::from_yaml(yaml).unwrap().hash(), built.config_hash);
}

#[test]
fn ipvs_mode_adds_module_loading_only_there() {
    let built = build(&proxy_config("ipvs", json!({"mode": "ipvs"})), &settings(), &[]).unwrap();
    let caps = pod_spec(&built).containers[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .clone()
        .unwrap();
    assert!(caps.add.unwrap().contains(&"SYS_MODULE".to_owned()));
}

#[test]
fn every_config_change_changes_the_pod_template_hash() {
    let hash = |spec| {
        let built = build(&proxy_config("p", spec), &settings(), &[]).unwrap();
        built
            .daemon_set
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let base = hash(json!({"mode": "iptables"}));
    assert_eq!(
        base,
        hash(json!({"mode": "iptables", "masqueradeBit": 14})),
        "defaults spelled out are no change"
    );
    assert_ne!(base, hash(json!({"mode": "iptables", "masqueradeAll": true})));
    assert_ne!(base, hash(json!({"mode": "iptables", "minSyncPeriod": "2s"})));
    assert_ne!(base, hash(json!({"mode": "nftables"})));
}

#[test]
fn rollout_and_agent_settings_are_honoured() {
    let pc = proxy_config(
        "pool",
        json!({"mode": "iptables", "rollout": {"maxUnavailable": "25%"},
               "agent": {"image": "registry.example/agent:dev", "priorityClassName": "infra",
                         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "net"}],
                         "podLabels": {"team": "net"},
                         "resources": {"requests": {"cpu": "50m"}}}}),
    );
    let built = build(&pc, &settings(), &[]).unwrap();
    let spec = built.daemon_set.spec.as_ref().unwrap();
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap()
            .max_unavailable,
        Some(IntOrString::String("25%".into()))
    );
    let pod = pod_spec(&built);
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/agent:dev")
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("infra"));
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert!(pod.containers[0].resources.is_some());
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["team"], "net");
    assert_eq!(labels[PROXYCONFIG_LABEL], "pool");
    // The selector must stay immutable: extra pod labels never enter it.
    assert!(!spec.selector.match_labels.as_ref().unwrap().contains_key("team"));
}

#[test]
fn node_selector_and_conflicting_nodes_become_node_affinity() {
    let pc = proxy_config(
        "pool",
        json!({"mode": "iptables", "nodeSelector": {"matchLabels": {"pool": "a"},
               "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["z9"]}]}}),
    );
    let built = build(&pc, &settings(), &["node-2".into(), "node-1".into()]).unwrap();
    let term = &pod_spec(&built)
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms[0];
    let exprs: Vec<(String, String)> = term
        .match_expressions
        .iter()
        .flatten()
        .map(|e| (e.key.clone(), e.operator.clone()))
        .collect();
    assert_eq!(
        exprs,
        [
            ("zone".to_owned(), "NotIn".to_owned()),
            ("pool".to_owned(), "In".to_owned())
        ]
    );
    let fields = &term.match_fields.as_ref().unwrap()[0];
    assert_eq!(fields.key, "metadata.name");
    assert_eq!(fields.operator, "NotIn");
    assert_eq!(fields.values.as_deref().unwrap(), ["node-1", "node-2"]);
}

#[test]
fn invalid_spec_is_refused_with_the_field_named() {
    let err = build(
        &proxy_config("bad", json!({"mode": "iptables", "masqueradeBit": 40})),
        &settings(),
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("spec.masqueradeBit"), "{err}");
}

#[test]
fn selectors_match_like_the_api_server() {
    let labels = BTreeMap::from([
        ("pool".to_owned(), "a".to_owned()),
        ("zone".to_owned(), "z1".to_owned()),
    ]);
    let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
    assert!(selects(None, &labels));
    assert!(selects(Some(&sel(json!({}))), &labels));
    assert!(selects(
        Some(&sel(json!({"matchLabels": {"pool": "a"}}))),
        &labels
    ));
    assert!(!selects(
        Some(&sel(json!({"matchLabels": {"pool": "b"}}))),
        &labels
    ));
    assert!(selects(
        Some(&sel(
            json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1", "z2"]}]})
        )),
        &labels
    ));
    assert!(!selects(
        Some(&sel(
            json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["z1"]}]})
        )),
        &labels
    ));
    assert!(selects(
        Some(&sel(
            json!({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]})
        )),
        &labels
    ));
    assert!(!selects(
        Some(&sel(
            json!({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]})
        )),
        &labels
    ));
}
