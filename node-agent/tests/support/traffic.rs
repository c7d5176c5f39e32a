//! Real traffic between namespaces: an echo server that answers with its name and the address it saw,
//! and a client that reports the reply or how the connection failed.
//!
//! Both are `socat` processes run inside a namespace with `ip netns exec` (no `setns` needed).

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::cmd::{CmdError, Process};
use super::netns::NetNs;

/// Transport protocol of test traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn socat(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// `addr:port` as socat spells it (`[v6]:port`).
fn socat_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// An echo server inside a namespace. Every TCP connection or UDP datagram carrying one request line
/// (what [`request`] sends) is answered with one line `<name> <peer address> <peer port>`, then (TCP)
/// the connection is closed. Stopped on drop.
#[derive(Debug)]
pub struct EchoServer {
    name: String,
    addr: SocketAddr,
    proto: Proto,
    _process: Process,
}

impl EchoServer {
    /// Starts the server on `addr` in `ns` and waits until it listens. `name` (no spaces) is what it
    /// answers with, so a test can tell which endpoint got the connection.
    pub fn start(ns: &NetNs, proto: Proto, addr: SocketAddr, name: &str) -> Result<Self, CmdError> {
        let family = if addr.is_ipv4() { "4" } else { "6" };
        let bind = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let listen = match proto {
            Proto::Tcp => format!("TCP{family}-LISTEN:{},bind={bind},reuseaddr,fork", addr.port()),
            Proto::Udp => format!("UDP{family}-RECVFROM:{},bind={bind},reuseaddr,fork", addr.port()),
        };
        // The name travels in the environment, so it is never parsed by the shell. The request line is
        // read first: a shell that exits with unread input makes the kernel reset the socket pair to
        // socat, which then loses the answer.
        let reply = r#"SYSTEM:read -r request; echo "$SWYD_ECHO_NAME $SOCAT_PEERADDR $SOCAT_PEERPORT""#;
        let mut command = ns.command("socat");
        command.env("SWYD_ECHO_NAME", name).args([listen.as_str(), reply]);
        let mut process = Process::spawn(command)?;
        let ss_flags = match proto {
            Proto::Tcp => "-Hltn",
            Proto::Udp => "-Hlun",
        };
        let sport = format!("sport = :{}", addr.port());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            process.check_running()?;
            if !ns.run(&["ss", ss_flags, &sport])?.trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CmdError {
                    command: format!("socat {listen} (in {})", ns.name()),
                    code: None,
                    stdout: String::new(),
                    stderr: "not listening after 5 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Self {
            name: name.to_owned(),
            addr,
            proto,
            _process: process,
        })
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }
}

/// An echo server's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Name of the server that answered.
    pub server: String,
    /// The client address and port as the server saw them (after any NAT).
    pub peer: SocketAddr,
}

/// Why a request got no reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// Actively refused: TCP RST or ICMP port unreachable (REJECT, or nobody listening).
    Refused,
    /// Nothing came back in time (DROP, or a black hole).
    Timeout,
    /// ICMP host/network unreachable or no route.
    Unreachable,
    /// Anything else, with the client's message.
    Other(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("refused"),
            Self::Timeout => f.write_str("timed out"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Other(message) => write!(f, "failed: {message}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Sends one request from `ns` to `target` and returns the echo server's reply, or how it failed
/// within `timeout`.
///
/// Expecting [`ConnectError::Refused`] over IPv6 TCP, give it more than a second: on a veth path the
/// ICMPv6 error of a REJECT arrives while `connect()` still holds the socket, the kernel only notes it
/// (`TcpExtLockDroppedIcmps`), and the refusal shows at the SYN retransmission one second later.
pub fn request(
    ns: &NetNs,
    proto: Proto,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Reply, ConnectError> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let mut address = format!("{}:{}", proto.socat(), socat_addr(target));
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
        // Dropping stdin sends EOF: socat then waits at most -t for the answer.
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
    // socat gives up by itself after the timeout; the extra second only guards against a hang.
    let line = received
        .recv_timeout(timeout + Duration::from_secs(1))
        .unwrap_or_default();
    // One answer is all we want (UDP would otherwise wait for the idle timeout).
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !line.trim().is_empty() {
        return parse_reply(&line).ok_or_else(|| ConnectError::Other(format!("unexpected reply {line:?}")));
    }
    Err(classify(&stderr))
}

fn parse_reply(line: &str) -> Option<Reply> {
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

fn classify(stderr: &str) -> ConnectError {
    if stderr.contains("Connection refused") {
        ConnectError::Refused
    } else if stderr.contains("No route to host") || stderr.contains("Network is unreachable") {
        ConnectError::Unreachable
    } else if stderr.trim().is_empty() || stderr.contains("timed out") {
        // UDP without answer: socat ends quietly at its idle timeout.
        ConnectError::Timeout
    } else {
        ConnectError::Other(stderr.trim().to_owned())
    }
}
