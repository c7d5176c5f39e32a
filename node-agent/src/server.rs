//! The agent's HTTP servers: health (`/healthz`, `/livez`), metrics (`/metrics`, `/proxyMode`), and one
//! health-check server per `externalTrafficPolicy: Local` LoadBalancer service (its healthCheckNodePort),
//! which load balancers probe to learn whether this node has a local endpoint.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Sync health as the health server reports it.
#[derive(Debug)]
pub struct Health {
    sync_period: Duration,
    last_success: Mutex<Option<SystemTime>>,
}

impl Health {
    /// Healthy means a successful sync within two sync periods, as upstream.
    pub fn new(sync_period: Duration) -> Self {
        Self {
            sync_period,
            last_success: Mutex::new(None),
        }
    }

    /// Records a successful sync.
    pub fn synced(&self, at: SystemTime) {
        if let Ok(mut last) = self.last_success.lock() {
            *last = Some(at);
        }
    }

    /// Time of the last successful sync.
    pub fn last_success(&self) -> Option<SystemTime> {
        self.last_success.lock().ok().and_then(|l| *l)
    }

    /// Whether the agent is healthy at `now`.
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        self.last_success()
            .and_then(|last| now.duration_since(last).ok().or(Some(Duration::ZERO)))
            .is_some_and(|age| age <= 2 * self.sync_period)
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let now = SystemTime::now();
    let healthy = health.is_healthy(now);
    let body = serde_json::json!({
        "lastUpdated": health.last_success().map(unix_seconds),
        "currentTime": unix_seconds(now),
        "healthy": healthy,
    });
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body.to_string())
}

/// Binds the health server and serves it until the task is dropped.
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<JoinHandle<()>> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(health);
    serve(addr, app).await
}

/// Binds the metrics server and serves it until the task is dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    mode: &'static str,
) -> std::io::Result<JoinHandle<()>> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(registry): State<Arc<Registry>>| async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::metrics::encode(&registry),
                )
            }),
        )
        .route("/proxyMode", get(move || async move { mode }))
        .with_state(registry);
    serve(addr, app).await
}

async fn serve(addr: SocketAddr, app: Router) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%addr, %error, "HTTP server stopped");
        }
    }))
}

/// What a health-check server answers from: the local endpoint count and the service's name.
type HealthCheckState = (Arc<AtomicUsize>, Arc<Mutex<(String, String)>>);

/// One service's health-check server.
#[derive(Debug)]
struct HealthCheck {
    local_endpoints: Arc<AtomicUsize>,
    service: Arc<Mutex<(String, String)>>,
    task: JoinHandle<()>,
}

/// What a health-check node port should report: (namespace, name) and the local ready endpoint count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckTarget {
    /// Service namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Local endpoints this node sends the service's external traffic to.
    pub local_endpoints: usize,
}

/// The set of health-check node port servers, reconciled after each sync.
#[derive(Debug, Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, HealthCheck>,
}

async fn health_check(State((count, service)): State<HealthCheckState>) -> impl IntoResponse {
    let local = count.load(Ordering::Relaxed);
    let (namespace, name) = service.lock().map(|s| s.clone()).unwrap_or_default();
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    });
    let status = if local > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body.to_string())
}

impl HealthCheckServers {
    /// Starts servers for new ports, updates counts, and stops servers of ports no longer wanted.
    /// A port that cannot be bound is logged and retried on the next call.
    pub async fn reconcile(&mut self, wanted: &BTreeMap<u16, HealthCheckTarget>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
            }
            keep
        });
        for (port, target) in wanted {
            if let Some(server) = self.servers.get(port) {
                server
                    .local_endpoints
                    .store(target.local_endpoints, Ordering::Relaxed);
                if let Ok(mut s) = server.service.lock() {
                    *s = (target.namespace.clone(), target.name.clone());
                }
                continue;
            }
            let count = Arc::new(AtomicUsize::new(target.local_endpoints));
            let service = Arc::new(Mutex::new((target.namespace.clone(), target.name.clone())));
            let app = Router::new()
                .fallback(health_check)
                .with_state((count.clone(), service.clone()));
            // Dual-stack socket: one listener answers on every local address of both families.
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, *port));
            let bound = match serve(addr, app.clone()).await {
                Ok(task) => Ok(task),
                Err(_) => serve(SocketAddr::from(([0, 0, 0, 0], *port)), app).await,
            };
            match bound {
                Ok(task) => {
                    self.servers.insert(
                        *port,
                        HealthCheck {
                            local_endpoints: count,
                            service,
                            task,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(port, %error, service = %target.name, "cannot bind healthCheckNodePort")
                }
            }
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_expires_after_two_sync_periods() {
        let health = Health::new(Duration::from_secs(30));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(!health.is_healthy(t0), "unhealthy before the first sync");
        health.synced(t0);
        assert!(health.is_healthy(t0 + Duration::from_secs(60)));
        assert!(!health.is_healthy(t0 + Duration::from_secs(61)));
    }

    async fn get_status(port: u16) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, response)
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn health_check_node_port_reports_local_endpoints() {
        let port = free_port();
        let mut servers = HealthCheckServers::default();
        let target = |n| HealthCheckTarget {
            namespace: "ns".into(),
            name: "lb".into(),
            local_endpoints: n,
        };

        servers.reconcile(&BTreeMap::from([(port, target(2))])).await;
        let (status, body) = get_status(port).await;
        assert_eq!(status, 200);
        assert!(body.contains("\"localEndpoints\":2"), "{body}");

        servers.reconcile(&BTreeMap::from([(port, target(0))])).await;
        assert_eq!(get_status(port).await.0, 503);

        servers.reconcile(&BTreeMap::new()).await;
        assert!(servers.ports().is_empty());
        // The listener is closed once its task is aborted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
    }
}
