//! `switchyard-e2e inspect-pod`: a test tool run as a pod (image `switchyard.dev/e2e`). It loads the
//! in-cluster configuration exactly as the agent does (environment, token and CA at
//! `/var/run/secrets/kubernetes.io/serviceaccount`), asks the API server who it is
//! (SelfSubjectReview), and serves what it found as JSON on `/`, with `/healthz` passing once the
//! identity is known. Tests use it to check the pod machinery the agent relies on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::Api;
use kube::api::PostParams;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::RwLock;

use crate::error::{Error, IoContext, Result};

/// What the tool reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// The user the API server authenticated, e.g. `system:serviceaccount:ns:sa`.
    pub user: Option<String>,
    /// Why the identity is unknown, if it is.
    pub error: Option<String>,
    /// Contents of the files it was asked to read (missing files are left out).
    pub files: BTreeMap<String, String>,
    /// The in-cluster environment it saw.
    pub env: BTreeMap<String, String>,
    /// Its command line.
    pub args: Vec<String>,
}

async fn whoami() -> Result<String> {
    let config = kube::Config::incluster().map_err(|e| Error::Failed(format!("in-cluster config: {e}")))?;
    let client = kube::Client::try_from(config).map_err(|e| Error::kube("building a client", e))?;
    let review = Api::<SelfSubjectReview>::all(client)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|e| Error::kube("SelfSubjectReview", e))?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .ok_or_else(|| Error::Failed("SelfSubjectReview returned no user".into()))
}

/// Runs the tool until killed.
pub async fn inspect_pod(listen: SocketAddr, files: Vec<PathBuf>) -> Result<()> {
    let mut inspection = Inspection {
        args: std::env::args().collect(),
        ..Inspection::default()
    };
    for f in &files {
        if let Ok(text) = std::fs::read_to_string(f) {
            inspection.files.insert(f.display().to_string(), text);
        }
    }
    for key in [
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "HOSTNAME",
        "NODE_NAME",
        "POD_NAMESPACE",
    ] {
        if let Ok(v) = std::env::var(key) {
            inspection.env.insert(key.into(), v);
        }
    }
    let state = Arc::new(RwLock::new(inspection));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .ctx(|| format!("binding {listen}"))?;
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let result = whoami().await;
            let done = result.is_ok();
            {
                let mut st = s.write().await;
                match result {
                    Ok(user) => (st.user, st.error) = (Some(user), None),
                    Err(e) => st.error = Some(e.to_string()),
                }
            }
            if done {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    loop {
        let (mut stream, _) = listener.accept().await.ctx(|| "accepting".into())?;
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let st = state.read().await.clone();
            let (code, body) = if path == "/healthz" {
                if st.user.is_some() {
                    (200, "ok".to_owned())
                } else {
                    (503, "identity unknown".to_owned())
                }
            } else {
                (200, serde_json::to_string(&st).unwrap_or_default())
            };
            let response = format!(
                "HTTP/1.0 {code} {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                if code == 200 { "OK" } else { "Service Unavailable" },
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
