//! The test workload: an echo server for TCP and UDP that answers every connection or datagram with
//! one line naming the pod, its node and the client address it saw, e.g.
//! `pod=echo-7d9c-abcde node=node-2 client=10.244.1.7:40312 proto=tcp`. Plain HTTP requests get the
//! same line as a `200 OK` body, so HTTP readiness probes and `curl` work too. The client side
//! ([`tcp_request`], [`udp_request`]) connects from inside a network namespace.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::error::{Error, IoContext, Result};
use crate::netns;

/// Repository of the echo image: `switchyard.dev/echo:<any tag>`.
pub const ECHO_IMAGE: &str = "switchyard.dev/echo";
/// Port the echo server listens on when the container declares none.
pub const DEFAULT_PORT: u16 = 8080;

/// What the echo server said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoReply {
    /// The pod that answered.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// The client address the pod saw (after any NAT).
    pub client: SocketAddr,
    /// `tcp` or `udp`.
    pub proto: String,
}

impl EchoReply {
    /// Parses a reply line.
    pub fn parse(line: &str) -> Result<Self> {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| Error::Invalid(format!("echo reply {line:?} has no {key}")))
        };
        let client = field("client")?;
        Ok(EchoReply {
            pod: field("pod")?,
            node: field("node")?,
            client: client
                .parse()
                .map_err(|_| Error::Invalid(format!("echo reply {line:?}: bad client address")))?,
            proto: field("proto")?,
        })
    }

    /// The reply line (with its newline).
    pub fn line(&self) -> String {
        format!(
            "pod={} node={} client={} proto={}\n",
            self.pod, self.node, self.client, self.proto
        )
    }
}

/// Runs the echo server on `ports` (TCP and UDP each) until killed.
pub async fn serve(pod: &str, node: &str, ports: &[u16]) -> Result<()> {
    let ports = if ports.is_empty() {
        vec![DEFAULT_PORT]
    } else {
        ports.to_vec()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports {
        let (tcp, udp) = bind(port).await?;
        let (p, n) = (pod.to_owned(), node.to_owned());
        tasks.spawn(async move { serve_tcp(tcp, p, n).await });
        let (p, n) = (pod.to_owned(), node.to_owned());
        tasks.spawn(async move { serve_udp(udp, p, n).await });
    }
    tracing::info!(pod, node, "echo server ready");
    while let Some(res) = tasks.join_next().await {
        res.map_err(|e| Error::Failed(format!("echo task failed: {e}")))??;
    }
    Ok(())
}

/// Binds `[::]` (both families) and falls back to `0.0.0.0` where IPv6 is off.
async fn bind(port: u16) -> Result<(TcpListener, UdpSocket)> {
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let v4 = SocketAddr::from(([0, 0, 0, 0], port));
    let tcp = match TcpListener::bind(v6).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind(v4)
            .await
            .ctx(|| format!("binding TCP port {port}"))?,
    };
    let udp = match UdpSocket::bind(v6).await {
        Ok(s) => s,
        Err(_) => UdpSocket::bind(v4)
            .await
            .ctx(|| format!("binding UDP port {port}"))?,
    };
    Ok((tcp, udp))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn reply(pod: &str, node: &str, client: SocketAddr, proto: &str) -> String {
    EchoReply {
        pod: pod.to_owned(),
        node: node.to_owned(),
        client: canonical(client),
        proto: proto.to_owned(),
    }
    .line()
}

async fn serve_tcp(listener: TcpListener, pod: String, node: String) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await.ctx(|| "accepting".to_owned())?;
        let line = reply(&pod, &node, peer, "tcp");
        tokio::spawn(async move {
            let _ = answer_tcp(stream, line).await;
        });
    }
}

/// Raw clients that send nothing (or a line) get the line; HTTP requests get it as a response body.
async fn answer_tcp(mut stream: TcpStream, line: String) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
        len = n;
    }
    let is_http = ["GET ", "HEAD ", "POST ", "PUT ", "OPTIONS "]
        .iter()
        .any(|m| buf[..len].starts_with(m.as_bytes()));
    if is_http {
        // Read the rest of the request head (bounded) so the client sees a clean response.
        while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf[len..])).await {
                Ok(Ok(n)) if n > 0 => len += n,
                _ => break,
            }
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            line.len()
        );
        stream.write_all(head.as_bytes()).await?;
        if !buf.starts_with(b"HEAD ") {
            stream.write_all(line.as_bytes()).await?;
        }
    } else {
        stream.write_all(line.as_bytes()).await?;
    }
    stream.shutdown().await
}

async fn serve_udp(socket: UdpSocket, pod: String, node: String) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    loop {
        let (_, peer) = socket.recv_from(&mut buf).await.ctx(|| "receiving".to_owned())?;
        let line = reply(&pod, &node, peer, "udp");
        let _ = socket.send_to(line.as_bytes(), peer).await;
    }
}

/// Connects over TCP from inside `ns` and returns the echo reply.
pub async fn tcp_request(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let stream = tokio::time::timeout(timeout, netns::connect(ns, addr, timeout))
        .await
        .map_err(|_| timeout_error(addr, timeout))??;
    read_reply(stream, addr, timeout).await
}

/// Connects over TCP from the current namespace (the `echo-client` command).
pub async fn tcp_request_here(addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| timeout_error(addr, timeout))?
        .ctx(|| format!("connecting to {addr}"))?;
    read_reply(stream, addr, timeout).await
}

async fn read_reply(mut stream: TcpStream, addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let mut text = String::new();
    tokio::time::timeout(timeout, stream.read_to_string(&mut text))
        .await
        .map_err(|_| timeout_error(addr, timeout))?
        .ctx(|| format!("reading from {addr}"))?;
    EchoReply::parse(text.trim())
}

/// Sends one UDP datagram from inside `ns` and returns the echo reply.
pub async fn udp_request(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let socket = netns::bind_udp(ns, unspecified_like(addr)).await?;
    udp_exchange(socket, addr, timeout).await
}

/// Sends one UDP datagram from the current namespace.
pub async fn udp_request_here(addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    let socket = UdpSocket::bind(unspecified_like(addr))
        .await
        .ctx(|| "binding UDP".to_owned())?;
    udp_exchange(socket, addr, timeout).await
}

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

async fn udp_exchange(socket: UdpSocket, addr: SocketAddr, timeout: Duration) -> Result<EchoReply> {
    socket
        .connect(addr)
        .await
        .ctx(|| format!("connecting UDP to {addr}"))?;
    socket
        .send(b"hello\n")
        .await
        .ctx(|| format!("sending to {addr}"))?;
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(timeout, socket.recv(&mut buf))
        .await
        .map_err(|_| timeout_error(addr, timeout))?
        .ctx(|| format!("receiving from {addr}"))?;
    EchoReply::parse(String::from_utf8_lossy(&buf[..n]).trim())
}

fn timeout_error(addr: SocketAddr, timeout: Duration) -> Error {
    Error::Timeout {
        what: format!("an echo reply from {addr}"),
        secs: timeout.as_secs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_round_trip() {
        let reply = EchoReply {
            pod: "echo-1".into(),
            node: "node-2".into(),
            client: "[fd00:10:244:1::7]:40312".parse().unwrap(),
            proto: "udp".into(),
        };
        assert_eq!(EchoReply::parse(reply.line().trim()).unwrap(), reply);
        assert!(EchoReply::parse("nonsense").is_err());
    }

    #[test]
    fn mapped_ipv4_clients_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.244.1.7]:1234".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "10.244.1.7:1234");
    }

    #[tokio::test]
    async fn echo_server_answers_raw_tcp_http_and_udp_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (tcp_addr, udp_addr) = (listener.local_addr().unwrap(), udp.local_addr().unwrap());
        tokio::spawn(serve_tcp(listener, "p".into(), "n".into()));
        tokio::spawn(serve_udp(udp, "p".into(), "n".into()));

        let r = tcp_request_here(tcp_addr, Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            (r.pod.as_str(), r.node.as_str(), r.proto.as_str()),
            ("p", "n", "tcp")
        );
        assert_eq!(r.client.ip().to_string(), "127.0.0.1");

        let mut s = TcpStream::connect(tcp_addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("proto=tcp\n"), "{text}");

        let r = udp_request_here(udp_addr, Duration::from_secs(2)).await.unwrap();
        assert_eq!(r.proto, "udp");
    }
}
