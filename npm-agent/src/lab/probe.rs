//! The prober: many probes at once, each from a socket opened inside the source's netns.
//!
//! Probes run in batches of at most [`MAX_IN_FLIGHT`] (fewer when the open-files limit is
//! low: a quarter of it, at least 64); for each batch every source netns is
//! entered once to open that batch's sockets, then all of them are driven concurrently on
//! the lab's runtime. A probe that gets no answer within its timeout is denied (a policy
//! drop looks exactly like that).
//!
//! - TCP: allowed = connected and read the responder's byte. A refusal (RST) is denied with
//!   [`Outcome::Refused`], which should not happen: every declared port is served.
//! - UDP: a connected socket sends a token up to [`ATTEMPTS`] times, spread over the timeout;
//!   allowed = the token came back. An ICMP port unreachable is [`Outcome::Refused`].
//! - SCTP: a raw socket sends an INIT up to [`ATTEMPTS`] times; allowed = an INIT ACK came
//!   back from the destination address, with the ports swapped and our initiate tag as its
//!   verification tag.
//! - ICMP: a ping socket (`SOCK_DGRAM`, `IPPROTO_ICMP`/`IPPROTO_ICMPV6`; the kernel picks the
//!   echo identifier and fills the checksum) sends an echo request with a token up to
//!   [`ATTEMPTS`] times; allowed = an echo reply with our sequence number and token came
//!   back. The lab opens ping sockets to every group (`net.ipv4.ping_group_range`, which
//!   also governs ICMPv6) in each of its namespaces.
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, UdpSocket};

use crate::netns::NetNs;

use super::sctp::{self, CHUNK_INIT_ACK, Packet};
use super::{Outcome, ProbeProtocol, ProbeResult};

/// Default time a probe waits for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1200);
/// Sends per UDP/SCTP probe, spread evenly over the timeout.
pub const ATTEMPTS: u32 = 3;
/// At most this many probe sockets are open at once.
pub const MAX_IN_FLIGHT: usize = 2048;

/// When attempt `attempt` (of [`ATTEMPTS`]) stops waiting for its reply: one `interval` from
/// now, and the last attempt waits for the rest of the timeout (never past `deadline`).
fn attempt_deadline(
    attempt: u32,
    interval: Duration,
    deadline: tokio::time::Instant,
) -> tokio::time::Instant {
    if attempt + 1 == ATTEMPTS {
        deadline
    } else {
        (tokio::time::Instant::now() + interval).min(deadline)
    }
}

/// How many probes one batch may hold: [`MAX_IN_FLIGHT`], or a quarter of the soft
/// open-files limit if that is smaller (responders and the rest of the process need fds too).
fn batch_size() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            match line.split_whitespace().nth(3)? {
                "unlimited" => Some(usize::MAX),
                n => n.parse::<usize>().ok(),
            }
        })
        .unwrap_or(1024);
    (soft / 4).clamp(64, MAX_IN_FLIGHT)
}

/// One probe to run: indices into the lab's endpoints, and the addresses chosen.
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub from: String,
    pub to: String,
    pub src: usize,
    pub dst_ip: Option<IpAddr>,
    pub port: u16,
    pub protocol: ProbeProtocol,
}

impl Task {
    fn result(&self, outcome: Outcome) -> ProbeResult {
        ProbeResult {
            from: self.from.clone(),
            to: self.to.clone(),
            port: self.port,
            protocol: self.protocol,
            allowed: outcome == Outcome::Allowed,
            outcome,
        }
    }
}

/// A socket opened in the source netns, ready to be driven.
enum Prepared {
    Tcp(TcpSocket),
    Udp(std::net::UdpSocket),
    Sctp(std::net::UdpSocket),
    /// A ping socket, wrapped like the raw SCTP one (plain `sendto`/`recvfrom`).
    Icmp(std::net::UdpSocket),
}

/// An unprivileged ICMP echo ("ping") socket for `dst`'s family.
fn ping_socket(dst: IpAddr) -> io::Result<std::net::UdpSocket> {
    let (domain, proto) = match dst {
        IpAddr::V4(_) => (socket2::Domain::IPV4, socket2::Protocol::ICMPV4),
        IpAddr::V6(_) => (socket2::Domain::IPV6, socket2::Protocol::ICMPV6),
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(proto))?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn prepare(dst: IpAddr, proto: ProbeProtocol) -> io::Result<Prepared> {
    let unspecified: SocketAddr = match dst {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    Ok(match proto {
        ProbeProtocol::Tcp => Prepared::Tcp(match dst {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        }),
        ProbeProtocol::Udp => {
            let s = std::net::UdpSocket::bind(unspecified)?;
            s.set_nonblocking(true)?;
            Prepared::Udp(s)
        }
        ProbeProtocol::Sctp => Prepared::Sctp(super::responder::raw_sctp_socket(match dst {
            IpAddr::V4(_) => socket2::Domain::IPV4,
            IpAddr::V6(_) => socket2::Domain::IPV6,
        })?),
        ProbeProtocol::Icmp => Prepared::Icmp(ping_socket(dst)?),
    })
}

/// Runs `tasks` (sources given as netns handles by index) and returns one result per task,
/// in the order of `tasks`. Call from a thread that is not a runtime worker.
pub(crate) fn run(
    handle: &tokio::runtime::Handle,
    sources: &[&NetNs],
    tasks: &[Task],
    timeout: Duration,
) -> Vec<ProbeResult> {
    let mut results = Vec::with_capacity(tasks.len());
    let mut seed = seed();
    for batch in tasks.chunks(batch_size()) {
        // Open the sockets, one visit per source netns.
        let mut by_src: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, t) in batch.iter().enumerate() {
            by_src.entry(t.src).or_default().push(i);
        }
        let mut prepared: Vec<Option<io::Result<Prepared>>> =
            (0..batch.len()).map(|_| None).collect();
        for (src, idxs) in by_src {
            let Some(ns) = sources.get(src) else {
                continue;
            };
            let opened = ns.try_run(|| {
                idxs.iter()
                    .map(|&i| {
                        let t = &batch[i];
                        t.dst_ip.map(|ip| (i, prepare(ip, t.protocol)))
                    })
                    .collect::<Vec<_>>()
            });
            match opened {
                Ok(list) => {
                    for (i, sock) in list.into_iter().flatten() {
                        prepared[i] = Some(sock);
                    }
                }
                Err(e) => {
                    for &i in &idxs {
                        prepared[i] = Some(Err(io::Error::other(e.to_string())));
                    }
                }
            }
        }
        let futures: Vec<_> = batch
            .iter()
            .zip(prepared)
            .map(|(task, sock)| {
                seed = xorshift(seed);
                let tag = (seed >> 32) as u32 | 1;
                let task = task.clone();
                async move {
                    let outcome = match (task.dst_ip, sock) {
                        (None, _) => Outcome::NoCommonFamily,
                        (_, None) => Outcome::Error("source netns missing".into()),
                        (_, Some(Err(e))) => Outcome::Error(format!("socket: {e}")),
                        (Some(ip), Some(Ok(sock))) => {
                            let dst = SocketAddr::new(ip, task.port);
                            probe_one(sock, dst, tag, timeout).await
                        }
                    };
                    if outcome == Outcome::Refused {
                        tracing::warn!(from = %task.from, to = %task.to, port = task.port,
                            protocol = %task.protocol, "lab probe refused (port not served?)");
                    }
                    task.result(outcome)
                }
            })
            .collect();
        let handles: Vec<_> = futures.into_iter().map(|f| handle.spawn(f)).collect();
        let batch_results = handle.block_on(async {
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(h.await);
            }
            out
        });
        for (task, r) in batch.iter().zip(batch_results) {
            results.push(match r {
                Ok(r) => r,
                Err(e) => task.result(Outcome::Error(format!("probe task: {e}"))),
            });
        }
    }
    results
}

async fn probe_one(sock: Prepared, dst: SocketAddr, tag: u32, timeout: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + timeout;
    match sock {
        Prepared::Tcp(s) => tcp(s, dst, deadline).await,
        Prepared::Udp(s) => match UdpSocket::from_std(s) {
            Ok(s) => udp(s, dst, tag, timeout, deadline).await,
            Err(e) => Outcome::Error(format!("udp socket: {e}")),
        },
        Prepared::Sctp(s) => match UdpSocket::from_std(s) {
            Ok(s) => sctp_probe(s, dst, tag, timeout, deadline).await,
            Err(e) => Outcome::Error(format!("raw socket: {e}")),
        },
        Prepared::Icmp(s) => match UdpSocket::from_std(s) {
            Ok(s) => icmp_probe(s, dst.ip(), tag, timeout, deadline).await,
            Err(e) => Outcome::Error(format!("ping socket: {e}")),
        },
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Outcome::Refused,
        // No route, host unreachable (ICMP from the node): the packet did not get through.
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Outcome::Unreachable,
        _ => Outcome::Error(e.to_string()),
    }
}

async fn tcp(s: TcpSocket, dst: SocketAddr, deadline: tokio::time::Instant) -> Outcome {
    let attempt = async {
        let mut stream = s.connect(dst).await?;
        let mut b = [0u8; 1];
        let n = stream.read(&mut b).await?;
        Ok::<_, io::Error>(n == 1 && b[0] == super::responder::TCP_GREETING)
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Err(_) => Outcome::Timeout,
        Ok(Ok(true)) => Outcome::Allowed,
        Ok(Ok(false)) => Outcome::Error("connection closed without the greeting".into()),
        Ok(Err(e)) => classify(&e),
    }
}

async fn udp(
    s: UdpSocket,
    dst: SocketAddr,
    tag: u32,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Outcome {
    if let Err(e) = s.connect(dst).await {
        return classify(&e);
    }
    let token = format!("npmlab {tag:08x}");
    let interval = timeout / ATTEMPTS;
    let mut buf = [0u8; 256];
    for attempt in 0..ATTEMPTS {
        if let Err(e) = s.send(token.as_bytes()).await {
            return classify(&e);
        }
        let wait_until = attempt_deadline(attempt, interval, deadline);
        loop {
            match tokio::time::timeout_at(wait_until, s.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(n)) if &buf[..n] == token.as_bytes() => return Outcome::Allowed,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return classify(&e),
            }
        }
    }
    Outcome::Timeout
}

async fn sctp_probe(
    s: UdpSocket,
    dst: SocketAddr,
    tag: u32,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Outcome {
    // Source ports from the ephemeral range, spread by the tag; never equal to the target.
    let mut src_port = 32768 + u16::try_from(tag % 28000).unwrap_or(0);
    if src_port == dst.port() {
        src_port += 1;
    }
    let init = Packet::init(src_port, dst.port(), tag).encode();
    let raw_dst = SocketAddr::new(dst.ip(), 0);
    let ipv4 = dst.is_ipv4();
    let interval = timeout / ATTEMPTS;
    let mut buf = [0u8; 2048];
    for attempt in 0..ATTEMPTS {
        if let Err(e) = s.send_to(&init, raw_dst).await {
            return classify(&e);
        }
        let wait_until = attempt_deadline(attempt, interval, deadline);
        loop {
            let (n, from) = match tokio::time::timeout_at(wait_until, s.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::trace!(error = %e, "lab sctp probe recv");
                    continue;
                }
            };
            if from.ip() != dst.ip() {
                continue;
            }
            let payload = if ipv4 {
                match sctp::strip_ipv4_header(&buf[..n]) {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                &buf[..n]
            };
            if let Some(p) = Packet::decode(payload)
                && p.chunk_type == CHUNK_INIT_ACK
                && p.src_port == dst.port()
                && p.dst_port == src_port
                && p.vtag == tag
            {
                return Outcome::Allowed;
            }
        }
    }
    Outcome::Timeout
}

/// ICMP echo request / reply types, per family.
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// An echo request: type, code 0, checksum and identifier 0 (a ping socket fills both in),
/// the sequence number, then `payload`.
fn echo_request(ipv4: bool, seq: u16, payload: &[u8]) -> Vec<u8> {
    let ty = if ipv4 {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    let mut m = vec![ty, 0, 0, 0, 0, 0];
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// Whether `msg` (as a ping socket delivers it: ICMP header, no IP header) is the echo reply
/// to our request `seq` carrying `payload`. The identifier is the socket's own: the kernel
/// only delivers replies that carry it.
fn is_echo_reply(ipv4: bool, msg: &[u8], seq: u16, payload: &[u8]) -> bool {
    let want = if ipv4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    msg.len() == 8 + payload.len()
        && msg[0] == want
        && msg[1] == 0
        && msg[6..8] == seq.to_be_bytes()
        && &msg[8..] == payload
}

async fn icmp_probe(
    s: UdpSocket,
    dst: IpAddr,
    tag: u32,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Outcome {
    let ipv4 = dst.is_ipv4();
    let token = format!("npmlab {tag:08x}");
    let to = SocketAddr::new(dst, 0);
    let interval = timeout / ATTEMPTS;
    let mut buf = [0u8; 512];
    for attempt in 0..ATTEMPTS {
        // The sequence number tells this attempt's reply from an earlier one's.
        let seq = (tag as u16).wrapping_add(attempt as u16);
        let request = echo_request(ipv4, seq, token.as_bytes());
        if let Err(e) = s.send_to(&request, to).await {
            return classify(&e);
        }
        let wait_until = attempt_deadline(attempt, interval, deadline);
        loop {
            match tokio::time::timeout_at(wait_until, s.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Ok((n, from))) => {
                    // Any of our attempts' replies will do: a late one still proves the path.
                    let ours = (0..=attempt).any(|a| {
                        let seq = (tag as u16).wrapping_add(a as u16);
                        is_echo_reply(ipv4, &buf[..n], seq, token.as_bytes())
                    });
                    if from.ip() == dst && ours {
                        return Outcome::Allowed;
                    }
                }
                Ok(Err(e)) => return classify(&e),
            }
        }
    }
    Outcome::Timeout
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mixed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    xorshift(mixed | 1)
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Wall time of a closure, for logs.
pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let t = f();
    (t, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_messages() {
        let req = echo_request(true, 0x1234, b"tok");
        assert_eq!(req, [8, 0, 0, 0, 0, 0, 0x12, 0x34, b't', b'o', b'k']);
        assert_eq!(echo_request(false, 1, b"")[0], 128);
        let mut reply = req.clone();
        reply[0] = 0;
        reply[4] = 0x77; // the identifier the kernel chose
        assert!(is_echo_reply(true, &reply, 0x1234, b"tok"));
        assert!(
            !is_echo_reply(true, &reply, 0x1235, b"tok"),
            "other sequence"
        );
        assert!(!is_echo_reply(true, &reply, 0x1234, b"tak"), "other token");
        assert!(
            !is_echo_reply(false, &reply, 0x1234, b"tok"),
            "v4 reply type on v6"
        );
        assert!(
            !is_echo_reply(true, &req, 0x1234, b"tok"),
            "a request is no reply"
        );
    }
}
