//! Helpers for the e2e tests: the root check, a cluster shared by the tests of one test binary (torn
//! down when the last of them drops it, and by the supervisor itself if the test process dies), a
//! namespace guard, and polling.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::kubeconfig;
use crate::layout::ClusterSpec;

/// Set to `1` (CI does) to make tests fail instead of skipping when not root.
pub const REQUIRE_PRIVILEGED: &str = "SWITCHYARD_REQUIRE_PRIVILEGED";

/// Whether `test` can run: true as root; false with a printed reason otherwise; an error when not root
/// and [`REQUIRE_PRIVILEGED`] is `1`.
pub fn privileged(test: &str) -> Result<bool> {
    if nix::unistd::geteuid().is_root() {
        return Ok(true);
    }
    if std::env::var(REQUIRE_PRIVILEGED).is_ok_and(|v| v == "1") {
        return Err(Error::Failed(format!(
            "{test} needs root (network namespaces and a control plane), and {REQUIRE_PRIVILEGED}=1 forbids skipping it"
        )));
    }
    // Straight to the stderr handle: the test harness captures `eprintln!`, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "skipping {test}: needs root (network namespaces and a control plane)"
    );
    Ok(false)
}

/// A spec for tests: owned by this process, so the cluster also goes away if the test process dies.
pub fn spec(name: &str, nodes: u8, harness_bin: &str) -> Result<ClusterSpec> {
    let mut spec = ClusterSpec::new(name, nodes, PathBuf::from(harness_bin))?;
    spec.owner_pid = Some(std::process::id());
    Ok(spec)
}

/// A cluster shared by the tests of one binary.
#[derive(Debug)]
pub struct SharedCluster {
    slot: tokio::sync::Mutex<Weak<Cluster>>,
}

impl SharedCluster {
    /// An empty slot, for a `static`.
    pub const fn new() -> Self {
        SharedCluster {
            slot: tokio::sync::Mutex::const_new(Weak::new()),
        }
    }

    /// The shared cluster, started by the first caller. It is torn down when the last test holding it
    /// drops it (so tests run one at a time each start their own).
    pub async fn get(&self, spec: impl FnOnce() -> Result<ClusterSpec>) -> Result<Arc<Cluster>> {
        let mut slot = self.slot.lock().await;
        if let Some(cluster) = slot.upgrade() {
            return Ok(cluster);
        }
        let cluster = Arc::new(Cluster::up(spec()?, Duration::from_secs(300)).await?);
        *slot = Arc::downgrade(&cluster);
        Ok(cluster)
    }
}

impl Default for SharedCluster {
    fn default() -> Self {
        Self::new()
    }
}

/// A namespace that is deleted when the guard drops (also when the test fails).
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates namespace `name`.
    pub async fn create(cluster: &Cluster, name: &str) -> Result<TestNamespace> {
        let api = Api::<Namespace>::all(cluster.client().await?);
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).map_err(|source| {
                Error::Json {
                    context: "namespace".into(),
                    source,
                }
            })?;
        api.create(&PostParams::default(), &ns)
            .await
            .map_err(|e| Error::kube(format!("creating namespace {name}"), e))?;
        Ok(TestNamespace {
            name: name.to_owned(),
            kubeconfig: cluster.kubeconfig().to_owned(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        // Drop cannot await, and the test's runtime may be shutting down: use a runtime of our own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = kubeconfig::client(&kubeconfig).await {
                    let _ = Api::<Namespace>::all(client)
                        .delete(&name, &DeleteParams::background())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Polls `f` every 250 ms until it returns `Ok(Some(value))`; errors are retried and the last one is
/// reported on timeout.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("condition not met");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() > timeout {
            return Err(Error::Failed(format!(
                "timed out after {}s waiting for {what}: {last}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
