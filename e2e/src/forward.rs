//! The loopback forwarder: the API server lives in the control-plane namespace, and the host reaches it
//! through a TCP listener on 127.0.0.1 whose connections are opened from inside that namespace. TLS
//! passes through untouched (client certificates still authenticate).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{IoContext, Result};
use crate::netns;

/// Binds 127.0.0.1:`port` (0: any free port).
pub async fn listen(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .ctx(|| format!("binding 127.0.0.1:{port} for the API server forwarder"))
}

/// Forwards every connection on `listener` to `target` inside namespace `ns`, until aborted.
pub fn serve(listener: TcpListener, ns: String, target: SocketAddr) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (mut inbound, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarder accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ns = ns.clone();
            tokio::spawn(async move {
                match netns::connect(&ns, target, Duration::from_secs(5)).await {
                    Ok(mut outbound) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "forwarder could not reach the API server"),
                }
            });
        }
    })
}
