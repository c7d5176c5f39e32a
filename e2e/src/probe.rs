//! HTTP and TCP checks made from inside a network namespace: etcd's health, and pods' readiness and
//! liveness probes. A minimal HTTP/1.0 GET is enough for both.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, IoContext, Result};
use crate::netns;

/// `GET path` on `addr` from inside `ns`: the status code and body.
pub async fn http_get(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = netns::connect(ns, addr, timeout).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: switchyard-e2e\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .ctx(|| format!("sending to {addr}"))?;
        let mut raw = Vec::new();
        stream
            .take(1 << 20)
            .read_to_end(&mut raw)
            .await
            .ctx(|| format!("reading from {addr}"))?;
        parse_response(&String::from_utf8_lossy(&raw))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("GET {addr}{path}"),
            secs: timeout.as_secs(),
        })?
}

/// Whether a TCP connection to `addr` from inside `ns` succeeds.
pub async fn tcp_open(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, netns::connect(ns, addr, timeout)).await,
        Ok(Ok(_))
    )
}

fn parse_response(text: &str) -> Result<(u16, String)> {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| text.starts_with("HTTP/"))
        .ok_or_else(|| Error::Invalid(format!("not an HTTP response: {:?}", text.lines().next())))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_are_parsed() {
        assert_eq!(
            parse_response("HTTP/1.1 200 OK\r\nA: b\r\n\r\nok").unwrap(),
            (200, "ok".into())
        );
        assert_eq!(parse_response("HTTP/1.0 503 Unavailable\r\n\r\n").unwrap().0, 503);
        assert!(parse_response("SSH-2.0").is_err());
    }
}
