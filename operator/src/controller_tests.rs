//! Reconcile scenarios against a mocked API server (tower-test). Each test scripts the exact requests one
//! reconcile must make, in order (method, path with query, content type, the parts of the body that
//! matter), answers them as the API server would, and then checks what the reconcile returned. A request
//! the script does not expect, a missing one, or a hang fails the test.

use std::future::Future;

use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use serde_json::{Value, json};
use switchyard_api::{AgentConfig, ProxyConfigStatus};
use tokio::sync::oneshot;
use tower_test::mock::{self, Handle, SendResponse};

use super::*;
use crate::build::{CONFIG_HASH_ANNOTATION, CONFIG_KEY};

/// Longest a reconcile or its script may take; a scenario never hangs the test run.
const TIMEOUT: Duration = Duration::from_secs(5);
const NS: &str = "switchyard-system";
const APPLY_QUERY: &str = "?&force=true&fieldManager=switchyard-operator";
const APPLY_PATCH: &str = "application/apply-patch+yaml";
const JSON_PATCH: &str = "application/json-patch+json";
const PROXYCONFIGS: &str = "/apis/switchyard.dev/v1alpha1/proxyconfigs";
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Spelled out rather than taken from `FINALIZER`: it is stored in every ProxyConfig, so renaming it
/// would strand existing objects with a finalizer nobody removes.
const STORED_FINALIZER: &str = "switchyard.dev/agent-cleanup";

// ----- fixtures -----

fn settings() -> Settings {
    Settings {
        namespace: NS.into(),
        agent_image: "switchyard.dev/switchyard-agent:0.1.0".into(),
        agent_service_account: "switchyard-agent".into(),
        api_server_host: "172.31.0.2".into(),
        api_server_port: 6443,
    }
}

fn timestamp(seconds: i64) -> String {
    Timestamp::from_second(seconds).unwrap().to_string()
}

/// A stored ProxyConfig without finalizer or status, created `age` seconds ago.
fn proxy_config(name: &str, age: i64, spec: Value) -> ProxyConfig {
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {
            "name": name,
            "uid": format!("0d5c6f1e-0000-0000-0000-{:012}", name.len()),
            "generation": 1,
            "resourceVersion": "100",
            "creationTimestamp": timestamp(now() - age),
        },
        "spec": spec,
    }))
    .unwrap()
}

fn finalized(mut pc: ProxyConfig) -> ProxyConfig {
    pc.metadata.finalizers = Some(vec![STORED_FINALIZER.into()]);
    pc
}

/// Marks `pc` deleted `ago` seconds ago (the finalizer holds it).
fn deleted(mut pc: ProxyConfig, ago: i64) -> ProxyConfig {
    pc.metadata.deletion_timestamp = serde_json::from_value(json!(timestamp(now() - ago))).unwrap();
    pc
}

fn with_status(mut pc: ProxyConfig, status: ProxyConfigStatus) -> ProxyConfig {
    pc.status = Some(status);
    pc
}

fn node(name: &str, pool: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": pool, "kubernetes.io/hostname": name}},
    }))
    .unwrap()
}

fn three_nodes() -> Vec<Node> {
    vec![node("n1", "a"), node("n2", "b"), node("n3", "b")]
}

/// What a node's agent reports: the hash it runs, whether it is Ready, whether it removed its rules.
fn proxy_node(name: &str, pc: &str, hash: &str, ready: bool, cleaned_up: bool) -> ProxyNode {
    let since = timestamp(now() - 60);
    let flag = |b: bool| if b { "True" } else { "False" };
    let mut conditions = vec![json!({"type": "Ready", "status": flag(ready), "reason": "Synced",
                                     "message": "", "lastTransitionTime": since})];
    if cleaned_up {
        conditions.push(
            json!({"type": "CleanedUp", "status": "True", "reason": "RulesRemoved",
                               "message": "", "lastTransitionTime": since}),
        );
    }
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyNode",
        "metadata": {"name": name, "labels": {PROXYCONFIG_LABEL: pc}},
        "spec": {"proxyConfig": pc},
        "status": {"mode": "iptables", "appliedConfigHash": hash, "lastSyncDurationMillis": 12,
                   "conditions": conditions},
    }))
    .unwrap()
}

/// The agents of `pc` on `nodes`, all on `hash`.
fn proxy_nodes(pc: &str, nodes: &[&str], hash: &str, ready: bool) -> Vec<ProxyNode> {
    nodes
        .iter()
        .map(|n| proxy_node(n, pc, hash, ready, false))
        .collect()
}

/// The DaemonSet the API server holds after `applied`, with the controller's counts filled in.
fn daemon_set_with_status(applied: &Value, desired: i32) -> DaemonSet {
    let mut ds = applied.clone();
    ds["status"] = json!({
        "desiredNumberScheduled": desired, "currentNumberScheduled": desired,
        "updatedNumberScheduled": desired, "numberReady": desired, "numberMisscheduled": 0,
    });
    serde_json::from_value(ds).unwrap()
}

/// The hash the operator must put on the pod template for `pc`, computed without the build step.
fn expected_hash(pc: &ProxyConfig) -> String {
    AgentConfig::from_spec(&pc.spec).unwrap().hash()
}

fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "100"}, "items": items})
}

fn to_values<T: serde::Serialize>(items: &[T]) -> Vec<Value> {
    items.iter().map(|i| serde_json::to_value(i).unwrap()).collect()
}

/// (status, reason, message) of condition `kind`.
fn condition<'a>(status: &'a ProxyConfigStatus, kind: &str) -> (&'a str, &'a str, &'a str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"));
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn pod_template_hash(applied_daemon_set: &Value) -> &str {
    applied_daemon_set["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        .as_str()
        .unwrap_or_else(|| panic!("no config hash annotation in {applied_daemon_set}"))
}

fn applied_agent_config(applied_config_map: &Value) -> AgentConfig {
    let yaml = applied_config_map["data"][CONFIG_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("no {CONFIG_KEY} in {applied_config_map}"));
    AgentConfig::from_yaml(yaml).unwrap()
}

// ----- the mocked API server -----

fn mock_context() -> (Arc<Context>, Handle<Request<Body>, Response<Body>>, Registry) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let mut registry = Registry::default();
    let ctx = Context {
        client: Client::new(service, "default"),
        settings: settings(),
        cleanup_timeout: CLEANUP_TIMEOUT,
        metrics: Metrics::new(&mut registry),
    };
    (Arc::new(ctx), handle, registry)
}

/// Plays the API server for one reconcile: every `expect` takes the next request and checks it.
struct ApiServerVerifier {
    handle: Handle<Request<Body>, Response<Body>>,
    /// Fires when the reconcile has returned: any request still expected is then missing.
    reconcile_done: oneshot::Receiver<()>,
}

type Reply = SendResponse<Response<Body>>;

fn respond(send: Reply, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn ok(send: Reply, body: &Value) {
    respond(send, StatusCode::OK, body);
}

fn api_error(send: Reply, code: u16, reason: &str, message: &str) {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": message, "reason": reason, "code": code});
    respond(send, StatusCode::from_u16(code).unwrap(), &status);
}

impl ApiServerVerifier {
    /// Takes the next request; checks its method, path and query, and content type (for writes).
    /// Returns its JSON body (null when empty) and the way to answer it.
    async fn expect(&mut self, method: Method, uri: &str, content_type: Option<&str>) -> (Value, Reply) {
        let next = tokio::select! {
            next = self.handle.next_request() => next,
            _ = &mut self.reconcile_done => None,
        };
        let Some((request, send)) = next else {
            panic!("the reconcile ended without the expected request {method} {uri}");
        };
        assert_eq!(
            (request.method(), request.uri().to_string().as_str()),
            (&method, uri),
            "unexpected request (left: made, right: expected)"
        );
        let made_type = request
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        if let Some(expected) = content_type {
            assert_eq!(
                made_type.as_deref(),
                Some(expected),
                "content type of {method} {uri}"
            );
        }
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (body, send)
    }

    /// After the script: the reconcile must return without making any further request.
    async fn expect_no_more_requests(mut self) {
        tokio::select! {
            next = self.handle.next_request() => {
                if let Some((request, _)) = next {
                    panic!("unexpected extra request {} {}", request.method(), request.uri());
                }
            }
            _ = &mut self.reconcile_done => {}
        }
    }

    async fn list_nodes(&mut self, nodes: &[Node]) {
        let (_, send) = self.expect(Method::GET, "/api/v1/nodes?", None).await;
        ok(send, &list("v1", "Node", to_values(nodes)));
    }

    async fn list_proxy_configs(&mut self, configs: &[&ProxyConfig]) {
        let (_, send) = self.expect(Method::GET, &format!("{PROXYCONFIGS}?"), None).await;
        ok(
            send,
            &list("switchyard.dev/v1alpha1", "ProxyConfig", to_values(configs)),
        );
    }

    /// Checks what every server-side apply of the operator carries, and answers with the object.
    async fn server_side_apply(
        &mut self,
        uri: &str,
        api_version: &str,
        kind: &str,
        pc: &ProxyConfig,
    ) -> Value {
        let (body, send) = self.expect(Method::PATCH, uri, Some(APPLY_PATCH)).await;
        assert_eq!(body["apiVersion"], api_version, "{body}");
        assert_eq!(body["kind"], kind, "{body}");
        assert_eq!(body["metadata"]["name"], agent_name(&pc.name_any()), "{body}");
        assert_eq!(body["metadata"]["namespace"], NS, "{body}");
        assert_eq!(
            body["metadata"]["labels"][PROXYCONFIG_LABEL],
            pc.name_any(),
            "{body}"
        );
        assert_eq!(
            body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "switchyard.dev/v1alpha1", "kind": "ProxyConfig", "name": pc.name_any(),
                    "uid": pc.metadata.uid, "controller": true}]),
            "{kind} must be owned by its ProxyConfig"
        );
        assert!(
            body.get("status").is_none(),
            "an apply never carries status: {body}"
        );
        ok(send, &body);
        body
    }

    /// The agent ConfigMap apply; returns its body.
    async fn apply_config_map(&mut self, pc: &ProxyConfig) -> Value {
        let uri = format!(
            "/api/v1/namespaces/{NS}/configmaps/{}{APPLY_QUERY}",
            agent_name(&pc.name_any())
        );
        self.server_side_apply(&uri, "v1", "ConfigMap", pc).await
    }

    fn daemon_set_uri(pc: &ProxyConfig, query: &str) -> String {
        format!(
            "/apis/apps/v1/namespaces/{NS}/daemonsets/{}{query}",
            agent_name(&pc.name_any())
        )
    }

    /// The agent DaemonSet apply; returns its body.
    async fn apply_daemon_set(&mut self, pc: &ProxyConfig) -> Value {
        let uri = Self::daemon_set_uri(pc, APPLY_QUERY);
        self.server_side_apply(&uri, "apps/v1", "DaemonSet", pc).await
    }

    /// The agent DaemonSet apply, answered with an API server error.
    async fn fail_daemon_set_apply(&mut self, pc: &ProxyConfig, code: u16, message: &str) {
        let uri = Self::daemon_set_uri(pc, APPLY_QUERY);
        let (body, send) = self.expect(Method::PATCH, &uri, Some(APPLY_PATCH)).await;
        assert_eq!(body["kind"], "DaemonSet", "{body}");
        api_error(send, code, "InternalError", message);
    }

    /// A read of the DaemonSet, answered with `daemon_set` or 404.
    async fn get_daemon_set(&mut self, pc: &ProxyConfig, daemon_set: Option<&DaemonSet>) {
        let uri = Self::daemon_set_uri(pc, "");
        let (_, send) = self.expect(Method::GET, &uri, None).await;
        match daemon_set {
            Some(ds) => ok(send, &serde_json::to_value(ds).unwrap()),
            None => api_error(send, 404, "NotFound", "daemonsets.apps not found"),
        }
    }

    /// The list of `pc`'s ProxyNodes, by label.
    async fn list_proxy_nodes(&mut self, pc: &ProxyConfig, nodes: &[ProxyNode]) {
        let uri = format!(
            "/apis/switchyard.dev/v1alpha1/proxynodes?&labelSelector=switchyard.dev%2Fproxyconfig%3D{}",
            pc.name_any()
        );
        let (_, send) = self.expect(Method::GET, &uri, None).await;
        ok(
            send,
            &list("switchyard.dev/v1alpha1", "ProxyNode", to_values(nodes)),
        );
    }

    /// The status apply; returns the status written.
    async fn patch_status(&mut self, pc: &ProxyConfig) -> ProxyConfigStatus {
        let uri = format!("{PROXYCONFIGS}/{}/status{APPLY_QUERY}", pc.name_any());
        let (body, send) = self.expect(Method::PATCH, &uri, Some(APPLY_PATCH)).await;
        assert_eq!(body["apiVersion"], "switchyard.dev/v1alpha1", "{body}");
        assert_eq!(body["kind"], "ProxyConfig", "{body}");
        assert!(
            body.get("spec").is_none(),
            "the operator never writes spec: {body}"
        );
        let status: ProxyConfigStatus = serde_json::from_value(body["status"].clone()).unwrap();
        ok(
            send,
            &serde_json::to_value(with_status(pc.clone(), status.clone())).unwrap(),
        );
        status
    }

    /// The JSON patch that adds the finalizer to a ProxyConfig without finalizers.
    async fn add_finalizer(&mut self, pc: &ProxyConfig) {
        let uri = format!("{PROXYCONFIGS}/{}?", pc.name_any());
        let (body, send) = self.expect(Method::PATCH, &uri, Some(JSON_PATCH)).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [STORED_FINALIZER]},
            ])
        );
        ok(send, &serde_json::to_value(finalized(pc.clone())).unwrap());
    }

    /// The JSON patch that removes the finalizer (the only one, at index 0).
    async fn remove_finalizer(&mut self, pc: &ProxyConfig) {
        let uri = format!("{PROXYCONFIGS}/{}?", pc.name_any());
        let (body, send) = self.expect(Method::PATCH, &uri, Some(JSON_PATCH)).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": STORED_FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        let mut gone = pc.clone();
        gone.metadata.finalizers = None;
        ok(send, &serde_json::to_value(gone).unwrap());
    }

    /// A background delete of `uri`, answered with `object` (what the API server returns while the
    /// garbage collector works).
    async fn delete(&mut self, uri: &str, object: Value) {
        let (body, send) = self.expect(Method::DELETE, uri, None).await;
        assert_eq!(body["propagationPolicy"], "Background", "{body}");
        ok(send, &object);
    }
}

/// Runs one reconcile of `pc` while `script` plays the API server; returns the reconcile's result and
/// what the script captured. Fails on a hang, on an unexpected or missing request, or when the
/// reconcile makes a request after the script's last one.
async fn reconcile_with<T, Fut>(
    ctx: &Arc<Context>,
    handle: Handle<Request<Body>, Response<Body>>,
    pc: &ProxyConfig,
    script: impl FnOnce(ApiServerVerifier) -> Fut,
) -> (Result<Action, Error>, T)
where
    Fut: Future<Output = (ApiServerVerifier, T)> + Send + 'static,
    T: Send + 'static,
{
    let (done, reconcile_done) = oneshot::channel();
    let server = script(ApiServerVerifier {
        handle,
        reconcile_done,
    });
    let server = tokio::spawn(async move {
        let (verifier, captured) = server.await;
        verifier.expect_no_more_requests().await;
        captured
    });
    let result = tokio::time::timeout(TIMEOUT, reconcile(Arc::new(pc.clone()), ctx.clone())).await;
    let _ = done.send(());
    let captured = match tokio::time::timeout(TIMEOUT, server).await {
        Ok(Ok(captured)) => captured,
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => panic!("the mocked API server did not finish within {TIMEOUT:?}"),
    };
    let result = result.unwrap_or_else(|_| panic!("the reconcile did not finish within {TIMEOUT:?}"));
    (result, captured)
}

/// What one apply pass wrote.
struct Applied {
    config_map: Value,
    daemon_set: Value,
    status: ProxyConfigStatus,
}

/// The full apply pass of `pc`: nodes and ProxyConfigs listed, ConfigMap and DaemonSet applied, the
/// DaemonSet read back with `desired` scheduled, `agents` listed, status written.
async fn apply_pass(
    mut api: ApiServerVerifier,
    pc: ProxyConfig,
    nodes: Vec<Node>,
    configs: Vec<ProxyConfig>,
    desired: i32,
    agents: Vec<ProxyNode>,
) -> (ApiServerVerifier, Applied) {
    api.list_nodes(&nodes).await;
    api.list_proxy_configs(&configs.iter().collect::<Vec<_>>()).await;
    let config_map = api.apply_config_map(&pc).await;
    let daemon_set = api.apply_daemon_set(&pc).await;
    api.get_daemon_set(&pc, Some(&daemon_set_with_status(&daemon_set, desired)))
        .await;
    api.list_proxy_nodes(&pc, &agents).await;
    let status = api.patch_status(&pc).await;
    (
        api,
        Applied {
            config_map,
            daemon_set,
            status,
        },
    )
}

// ----- scenarios -----

#[tokio::test]
async fn new_proxyconfig_gets_the_finalizer_before_anything_is_applied() {
    let (ctx, handle, _registry) = mock_context();
    let pc = proxy_config("default", 60, json!({"mode": "iptables"}));

    let script_pc = pc.clone();
    let (result, ()) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.add_finalizer(&script_pc).await;
        (api, ())
    })
    .await;

    // The finalizer patch triggers the next reconcile; nothing else happens now.
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn finalized_proxyconfig_applies_agents_and_reports_ready_when_every_node_runs_its_hash() {
    let (ctx, handle, _registry) = mock_context();
    let pc = finalized(proxy_config("default", 60, json!({"mode": "iptables"})));
    let hash = expected_hash(&pc);
    let agents = proxy_nodes("default", &["n1", "n2", "n3"], &hash, true);

    let (script_pc, script_hash) = (pc.clone(), hash.clone());
    let (result, applied) = reconcile_with(&ctx, handle, &pc, |api| {
        apply_pass(api, script_pc.clone(), three_nodes(), vec![script_pc], 3, agents)
    })
    .await;

    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        applied_agent_config(&applied.config_map),
        AgentConfig::from_spec(&pc.spec).unwrap(),
        "the ConfigMap carries the effective configuration"
    );
    assert_eq!(pod_template_hash(&applied.daemon_set), script_hash);
    let ds_spec = &applied.daemon_set["spec"];
    assert_eq!(ds_spec["template"]["spec"]["hostNetwork"], true);
    assert_eq!(
        ds_spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1,
        "default maxUnavailable"
    );
    assert!(
        ds_spec["template"]["spec"].get("affinity").is_none(),
        "no selector, no conflict: every node: {ds_spec}"
    );

    let status = applied.status;
    assert_eq!(
        condition(&status, "Available"),
        ("True", "AllNodesReady", "3/3 nodes ready")
    );
    assert_eq!(
        condition(&status, "Progressing"),
        (
            "False",
            "RolloutComplete",
            "3 nodes run the current configuration"
        )
    );
    assert_eq!(
        condition(&status, "Degraded"),
        ("False", "AsExpected", "no problem found")
    );
    assert_eq!(condition(&status, "Ready"), ("True", "Ready", "3/3 nodes ready"));
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    assert_eq!(
        (
            status.desired_nodes,
            status.updated_nodes,
            status.ready_nodes,
            status.degraded_nodes
        ),
        (3, 3, 3, 0)
    );
    assert_eq!(status.effective_config_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(status.observed_generation, Some(1));
    assert!(
        status.conditions.iter().all(|c| c.observed_generation == Some(1)),
        "{status:?}"
    );
    assert!(status.conflicting_nodes.is_empty());
}

#[tokio::test]
async fn steady_state_reconcile_does_not_rewrite_an_unchanged_status() {
    let pc = finalized(proxy_config("default", 60, json!({"mode": "iptables"})));
    let hash = expected_hash(&pc);
    let agents = proxy_nodes("default", &["n1", "n2", "n3"], &hash, true);

    let (ctx, handle, _registry) = mock_context();
    let (script_pc, script_agents) = (pc.clone(), agents.clone());
    let (result, first) = reconcile_with(&ctx, handle, &pc, |api| {
        apply_pass(
            api,
            script_pc.clone(),
            three_nodes(),
            vec![script_pc],
            3,
            script_agents,
        )
    })
    .await;
    result.unwrap();

    // The API server now holds that status; the next reconcile sees the same world.
    let pc = with_status(pc, first.status);
    let (ctx, handle, _registry) = mock_context();
    let script_pc = pc.clone();
    let (result, ()) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_nodes(&three_nodes()).await;
        api.list_proxy_configs(&[&script_pc]).await;
        api.apply_config_map(&script_pc).await;
        let ds = api.apply_daemon_set(&script_pc).await;
        api.get_daemon_set(&script_pc, Some(&daemon_set_with_status(&ds, 3)))
            .await;
        api.list_proxy_nodes(&script_pc, &agents).await;
        // No status write: a reconcile must not re-trigger itself through timestamps.
        (api, ())
    })
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn spec_change_applies_a_new_config_hash_and_reports_the_rollout() {
    let old = finalized(proxy_config("default", 600, json!({"mode": "iptables"})));
    let old_hash = expected_hash(&old);
    let agents = proxy_nodes("default", &["n1", "n2", "n3"], &old_hash, true);

    let (ctx, handle, _registry) = mock_context();
    let (script_pc, script_agents) = (old.clone(), agents.clone());
    let (result, before) = reconcile_with(&ctx, handle, &old, |api| {
        apply_pass(
            api,
            script_pc.clone(),
            three_nodes(),
            vec![script_pc],
            3,
            script_agents,
        )
    })
    .await;
    result.unwrap();

    // The user sets masqueradeAll; the agents still run the old configuration.
    let mut new = with_status(old.clone(), before.status);
    new.spec.masquerade_all = Some(true);
    new.metadata.generation = Some(2);
    let new_hash = expected_hash(&new);
    let (ctx, handle, _registry) = mock_context();
    let script_pc = new.clone();
    let (result, after) = reconcile_with(&ctx, handle, &new, |api| {
        apply_pass(api, script_pc.clone(), three_nodes(), vec![script_pc], 3, agents)
    })
    .await;

    assert_eq!(pod_template_hash(&before.daemon_set), old_hash);
    assert_eq!(pod_template_hash(&after.daemon_set), new_hash);
    assert_ne!(
        pod_template_hash(&before.daemon_set),
        pod_template_hash(&after.daemon_set),
        "a spec change must change the pod template so the agents roll"
    );
    assert!(applied_agent_config(&after.config_map).masquerade_all);
    assert!(!applied_agent_config(&before.config_map).masquerade_all);

    // Rolling: come back soon to notice a hung rollout.
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(15)));
    let status = after.status;
    assert_eq!(status.effective_config_hash.as_deref(), Some(new_hash.as_str()));
    assert_eq!(status.observed_generation, Some(2));
    assert_eq!(
        condition(&status, "Progressing"),
        ("True", "RollingOut", "0/3 nodes updated, 0 ready")
    );
    assert_eq!(condition(&status, "Ready").0, "False");
    assert_eq!((status.updated_nodes, status.ready_nodes), (0, 0));
}

#[tokio::test]
async fn newer_proxyconfig_excludes_nodes_an_older_one_keeps_and_reports_the_conflict() {
    let older = finalized(proxy_config(
        "pool-a",
        7200,
        json!({"mode": "iptables", "nodeSelector": {"matchLabels": {"pool": "a"}}}),
    ));
    let newer = finalized(proxy_config("everywhere", 60, json!({"mode": "nftables"})));
    let hash = expected_hash(&newer);
    let agents = proxy_nodes("everywhere", &["n2", "n3"], &hash, true);

    let (ctx, handle, _registry) = mock_context();
    let (script_pc, script_older) = (newer.clone(), older.clone());
    let (result, applied) = reconcile_with(&ctx, handle, &newer, |api| {
        // Listed newest first: ownership must follow creation time, not list order.
        apply_pass(
            api,
            script_pc.clone(),
            three_nodes(),
            vec![script_pc, script_older],
            2,
            agents,
        )
    })
    .await;

    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let terms = &applied.daemon_set["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms,
        &json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]}]),
        "its agents must never run on n1"
    );
    let status = applied.status;
    let (degraded, reason, message) = condition(&status, "Degraded");
    assert_eq!((degraded, reason), ("True", "NodeConflict"));
    assert!(message.contains("n1"), "{message}");
    assert!(!message.contains("n2") && !message.contains("n3"), "{message}");
    assert_eq!(status.conflicting_nodes, vec!["n1".to_owned()]);
    assert_eq!(condition(&status, "Ready").0, "False");
    assert_eq!(
        condition(&status, "Available"),
        ("True", "AllNodesReady", "2/2 nodes ready")
    );
}

#[tokio::test]
async fn older_proxyconfig_keeps_its_nodes_without_a_conflict() {
    let older = finalized(proxy_config(
        "pool-a",
        7200,
        json!({"mode": "iptables", "nodeSelector": {"matchLabels": {"pool": "a"}}}),
    ));
    let newer = finalized(proxy_config("everywhere", 60, json!({"mode": "nftables"})));
    let agents = proxy_nodes("pool-a", &["n1"], &expected_hash(&older), true);

    let (ctx, handle, _registry) = mock_context();
    let (script_pc, script_newer) = (older.clone(), newer.clone());
    let (result, applied) = reconcile_with(&ctx, handle, &older, |api| {
        apply_pass(
            api,
            script_pc.clone(),
            three_nodes(),
            vec![script_newer, script_pc],
            1,
            agents,
        )
    })
    .await;

    result.unwrap();
    let terms = &applied.daemon_set["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms,
        &json!([{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}]),
        "only its selector, nothing excluded"
    );
    assert_eq!(
        condition(&applied.status, "Degraded"),
        ("False", "AsExpected", "no problem found")
    );
    assert_eq!(
        condition(&applied.status, "Ready"),
        ("True", "Ready", "1/1 nodes ready")
    );
    assert!(applied.status.conflicting_nodes.is_empty());
}

#[tokio::test]
async fn invalid_stored_spec_applies_nothing_and_reports_invalid_spec() {
    // Stored before the schema refused it: the operator is the second line of defence.
    let pc = finalized(proxy_config(
        "bad",
        60,
        json!({"mode": "iptables", "masqueradeBit": 40}),
    ));
    // Agents from an earlier valid spec keep running untouched.
    let running: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "switchyard-agent-bad", "namespace": NS},
        "status": {"desiredNumberScheduled": 3, "currentNumberScheduled": 3, "numberMisscheduled": 0,
                   "numberReady": 3},
    }))
    .unwrap();
    let agents = proxy_nodes("bad", &["n1", "n2", "n3"], "0123456789abcdef", true);

    let (ctx, handle, _registry) = mock_context();
    let script_pc = pc.clone();
    let (result, status) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_nodes(&three_nodes()).await;
        api.list_proxy_configs(&[&script_pc]).await;
        // No ConfigMap or DaemonSet apply: straight to reading what runs.
        api.get_daemon_set(&script_pc, Some(&running)).await;
        api.list_proxy_nodes(&script_pc, &agents).await;
        let status = api.patch_status(&script_pc).await;
        (api, status)
    })
    .await;

    // Not an error: retrying cannot help until the spec changes.
    result.unwrap();
    let message = "spec.masqueradeBit: must be between 0 and 31";
    assert_eq!(condition(&status, "Degraded"), ("True", "InvalidSpec", message));
    assert_eq!(condition(&status, "Ready"), ("False", "NotReady", message));
    assert_eq!(condition(&status, "Progressing").0, "False");
    assert_eq!(status.effective_config_hash, None);
}

#[tokio::test]
async fn deletion_waits_for_every_agent_to_report_cleanup_before_removing_anything() {
    let pc = deleted(
        finalized(proxy_config("default", 600, json!({"mode": "iptables"}))),
        10,
    );
    let hash = expected_hash(&pc);
    let agents = vec![
        proxy_node("n1", "default", &hash, true, true),
        proxy_node("n2", "default", &hash, true, false),
        proxy_node("n3", "default", &hash, true, false),
    ];
    let running: DaemonSet = daemon_set_with_status(
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "switchyard-agent-default", "namespace": NS}}),
        3,
    );

    let (ctx, handle, _registry) = mock_context();
    let script_pc = pc.clone();
    let (result, status) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_proxy_nodes(&script_pc, &agents).await;
        api.get_daemon_set(&script_pc, Some(&running)).await;
        let status = api.patch_status(&script_pc).await;
        // No delete and no finalizer removal yet.
        (api, status)
    })
    .await;

    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    assert_eq!(
        condition(&status, "Degraded"),
        (
            "True",
            "CleanupPending",
            "waiting for agents to remove their rules"
        )
    );
    assert_eq!(condition(&status, "Ready").0, "False");
}

#[tokio::test]
async fn deletion_removes_agents_config_and_proxynodes_then_the_finalizer_once_every_agent_cleaned_up() {
    let pc = deleted(
        finalized(proxy_config("default", 600, json!({"mode": "iptables"}))),
        10,
    );
    let hash = expected_hash(&pc);
    let agents: Vec<ProxyNode> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| proxy_node(n, "default", &hash, true, true))
        .collect();

    let (ctx, handle, _registry) = mock_context();
    let script_pc = pc.clone();
    let (result, ()) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_proxy_nodes(&script_pc, &agents).await;
        let name = agent_name("default");
        api.delete(
            &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/{name}?"),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": NS}}),
        )
        .await;
        api.delete(
            &format!("/api/v1/namespaces/{NS}/configmaps/{name}?"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}}),
        )
        .await;
        for agent in &agents {
            api.delete(
                &format!("/apis/switchyard.dev/v1alpha1/proxynodes/{}?", agent.name_any()),
                serde_json::to_value(agent).unwrap(),
            )
            .await;
        }
        api.remove_finalizer(&script_pc).await;
        (api, ())
    })
    .await;

    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn deletion_proceeds_without_cleanup_reports_once_the_cleanup_timeout_has_passed() {
    let ago = i64::try_from(CLEANUP_TIMEOUT.as_secs()).unwrap() + 30;
    let pc = deleted(
        finalized(proxy_config("default", 6000, json!({"mode": "iptables"}))),
        ago,
    );
    // The agent on n1 never reports (its node is gone, say).
    let agents = vec![proxy_node("n1", "default", "0123456789abcdef", false, false)];

    let (ctx, handle, _registry) = mock_context();
    let script_pc = pc.clone();
    let (result, ()) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_proxy_nodes(&script_pc, &agents).await;
        let name = agent_name("default");
        api.delete(
            &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/{name}?"),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name}}),
        )
        .await;
        api.delete(
            &format!("/api/v1/namespaces/{NS}/configmaps/{name}?"),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
        )
        .await;
        api.delete(
            "/apis/switchyard.dev/v1alpha1/proxynodes/n1?",
            serde_json::to_value(&agents[0]).unwrap(),
        )
        .await;
        api.remove_finalizer(&script_pc).await;
        (api, ())
    })
    .await;

    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn api_error_on_daemonset_apply_fails_the_reconcile_and_requeues_with_a_counted_failure() {
    let (ctx, handle, registry) = mock_context();
    let pc = finalized(proxy_config("default", 60, json!({"mode": "iptables"})));

    let script_pc = pc.clone();
    let (result, ()) = reconcile_with(&ctx, handle, &pc, |mut api| async move {
        api.list_nodes(&three_nodes()).await;
        api.list_proxy_configs(&[&script_pc]).await;
        api.apply_config_map(&script_pc).await;
        api.fail_daemon_set_apply(&script_pc, 500, "etcdserver: request timed out")
            .await;
        // Nothing after the failure: no status write on a half-applied state.
        (api, ())
    })
    .await;

    let error = result.unwrap_err();
    assert_eq!(error.category(), "apply_daemonset");
    assert!(
        error.to_string().contains("etcdserver: request timed out"),
        "{error}"
    );
    assert!(
        matches!(&error, Error::Kube { source: kube::Error::Api(status), .. } if status.code == 500),
        "{error:?}"
    );

    let action = error_policy(Arc::new(pc), &error, ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(ctx.metrics.reconciles.get(), 1);
    assert_eq!(
        ctx.metrics
            .failures
            .get_or_create(&ErrorLabel {
                category: "apply_daemonset".into()
            })
            .get(),
        1
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"switchyard_operator_reconcile_failures_total{category="apply_daemonset"} 1"#),
        "{text}"
    );
}
