//! Requests from a fixed source port: repeated, they are one flow for conntrack (same 5-tuple), which is
//! what a long-lived UDP client (a DNS resolver, a game, a VPN) looks like to the node.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use super::netns::NetNs;
use super::traffic::{ConnectError, Proto, Reply};

/// Like [`super::request`], but sent from `source_port`, so every call with the same arguments belongs
/// to the same conntrack entry (for UDP, as long as the entry has not timed out).
pub fn request_from_port(
    ns: &NetNs,
    proto: Proto,
    target: SocketAddr,
    source_port: u16,
    timeout: Duration,
) -> Result<Reply, ConnectError> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let (kind, host) = match (proto, target.ip()) {
        (Proto::Tcp, IpAddr::V4(ip)) => ("TCP4", ip.to_string()),
        (Proto::Tcp, IpAddr::V6(ip)) => ("TCP6", format!("[{ip}]")),
        (Proto::Udp, IpAddr::V4(ip)) => ("UDP4", ip.to_string()),
        (Proto::Udp, IpAddr::V6(ip)) => ("UDP6", format!("[{ip}]")),
    };
    let mut address = format!(
        "{kind}:{host}:{},sourceport={source_port},reuseaddr",
        target.port()
    );
    if proto == Proto::Tcp {
        address.push_str(&format!(",connect-timeout={secs}"));
    }
    let mut command = ns.command("socat");
    command
        .args(["-T", &secs, "-t", &secs, "STDIO", &address])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|err| ConnectError::Other(format!("cannot start socat: {err}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, b"ping\n");
    }
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        if let Some(stdout) = stdout {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = lines.send(line);
        }
    });
    let line = received
        .recv_timeout(timeout + Duration::from_secs(1))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !line.trim().is_empty() {
        return parse(&line).ok_or_else(|| ConnectError::Other(format!("unexpected reply {line:?}")));
    }
    Err(if stderr.contains("Connection refused") {
        ConnectError::Refused
    } else if stderr.contains("No route to host") || stderr.contains("Network is unreachable") {
        ConnectError::Unreachable
    } else if stderr.trim().is_empty() || stderr.contains("timed out") {
        ConnectError::Timeout
    } else {
        ConnectError::Other(stderr.trim().to_owned())
    })
}

/// `<name> <peer address> <peer port>`, as the echo server answers.
fn parse(line: &str) -> Option<Reply> {
    let mut words = line.split_whitespace().rev();
    let port: u16 = words.next()?.parse().ok()?;
    let ip: IpAddr = words
        .next()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    let server = words.rev().collect::<Vec<_>>().join(" ");
    Some(Reply {
        server,
        peer: SocketAddr::new(ip, port),
    })
}
