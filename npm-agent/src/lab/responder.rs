//! Servers for every declared port of every pod and external.
//!
//! Sockets are opened inside the endpoint's netns (through [`NetNs::try_run`]) and then
//! served by tasks of the lab's tokio runtime; a socket keeps its namespace whichever thread
//! drives it. Shutting the runtime down closes them all.
//!
//! - TCP: a dual-stack listener on `[::]:port`; each connection gets one byte (`k`), then
//!   is closed.
//! - UDP: a dual-stack socket on `[::]:port` echoing each datagram to its sender.
//! - SCTP: one raw socket per family (protocol 132) per namespace answering an INIT to any
//!   declared SCTP port with an INIT ACK (ports swapped), see [`super::sctp`].
use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;

use crate::model::Protocol;
use crate::netns::NetNs;

use super::LabError;
use super::sctp::{self, CHUNK_INIT, IPPROTO_SCTP, Packet};

/// The byte a TCP responder writes to each connection.
pub(crate) const TCP_GREETING: u8 = b'k';

/// Opened sockets of one namespace, not yet served.
pub(crate) struct Sockets {
    label: String,
    tcp: Vec<(u16, std::net::TcpListener)>,
    udp: Vec<(u16, std::net::UdpSocket)>,
    sctp_ports: BTreeSet<u16>,
    sctp_raw: Vec<(Domain, std::net::UdpSocket)>,
}

/// Opens the listening sockets for `ports`; call it inside the endpoint's netns.
pub(crate) fn open(label: &str, ports: &[(u16, Protocol)]) -> io::Result<Sockets> {
    let mut s = Sockets {
        label: label.to_owned(),
        tcp: Vec::new(),
        udp: Vec::new(),
        sctp_ports: BTreeSet::new(),
        sctp_raw: Vec::new(),
    };
    let any = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0));
    for &(port, proto) in ports {
        let mut addr = any;
        addr.set_port(port);
        match proto {
            Protocol::Tcp => {
                let sock = Socket::new(Domain::IPV6, Type::STREAM, None)?;
                sock.set_only_v6(false)?;
                sock.set_reuse_address(true)?;
                sock.bind(&addr.into())?;
                sock.listen(1024)?;
                sock.set_nonblocking(true)?;
                s.tcp.push((port, sock.into()));
            }
            Protocol::Udp => {
                let sock = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
                sock.set_only_v6(false)?;
                sock.bind(&addr.into())?;
                sock.set_nonblocking(true)?;
                s.udp.push((port, sock.into()));
            }
            Protocol::Sctp => {
                s.sctp_ports.insert(port);
            }
        }
    }
    if !s.sctp_ports.is_empty() {
        for domain in [Domain::IPV4, Domain::IPV6] {
            s.sctp_raw.push((domain, raw_sctp_socket(domain)?));
        }
    }
    Ok(s)
}

/// A raw IP socket for protocol 132, wrapped as a `std::net::UdpSocket`: its
/// `send_to`/`recv_from` are plain `sendto(2)`/`recvfrom(2)`, which is all a raw socket
/// needs, and it lets tokio drive the socket without any `unsafe`. Port numbers in the
/// addresses are meaningless (0) for raw sockets.
pub(crate) fn raw_sctp_socket(domain: Domain) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(
        domain,
        Type::from(libc::SOCK_RAW),
        Some(socket2::Protocol::from(IPPROTO_SCTP)),
    )?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Starts serving `sockets` on the runtime behind `handle`. Must be called from outside the
/// runtime or inside it; the tasks end when the runtime shuts down.
pub(crate) fn serve(handle: &Handle, sockets: Sockets) -> Result<(), LabError> {
    let _guard = handle.enter();
    let label = sockets.label;
    for (port, l) in sockets.tcp {
        let l = tokio::net::TcpListener::from_std(l).map_err(|source| LabError::Socket {
            what: format!("tcp responder {label}:{port}"),
            source,
        })?;
        handle.spawn(serve_tcp(l));
    }
    for (port, u) in sockets.udp {
        let u = tokio::net::UdpSocket::from_std(u).map_err(|source| LabError::Socket {
            what: format!("udp responder {label}:{port}"),
            source,
        })?;
        handle.spawn(serve_udp(u));
    }
    let ports = Arc::new(sockets.sctp_ports);
    for (domain, raw) in sockets.sctp_raw {
        let raw = tokio::net::UdpSocket::from_std(raw).map_err(|source| LabError::Socket {
            what: format!("sctp responder {label}"),
            source,
        })?;
        handle.spawn(serve_sctp(raw, domain == Domain::IPV4, Arc::clone(&ports)));
    }
    Ok(())
}

async fn serve_tcp(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                tokio::spawn(async move {
                    // The peer may be gone already (a timed-out probe): nothing to do then.
                    let _ = stream.write_all(&[TCP_GREETING]).await;
                    let _ = stream.shutdown().await;
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "lab tcp accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_udp(sock: tokio::net::UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from).await;
            }
            Err(e) => {
                // ICMP errors of earlier replies surface here; keep serving.
                tracing::trace!(error = %e, "lab udp recv failed");
            }
        }
    }
}

async fn serve_sctp(sock: tokio::net::UdpSocket, ipv4: bool, ports: Arc<BTreeSet<u16>>) {
    let mut buf = [0u8; 2048];
    let mut own_tag: u32 = 0x6e70_6d00;
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(error = %e, "lab sctp recv failed");
                continue;
            }
        };
        let payload = if ipv4 {
            match sctp::strip_ipv4_header(&buf[..n]) {
                Some(p) => p,
                None => continue,
            }
        } else {
            &buf[..n]
        };
        let Some(pkt) = Packet::decode(payload) else {
            continue;
        };
        if pkt.chunk_type != CHUNK_INIT || !ports.contains(&pkt.dst_port) {
            continue;
        }
        own_tag = own_tag.wrapping_add(1);
        let reply = pkt.init_ack(own_tag).encode();
        let mut to = from;
        to.set_port(0);
        let _ = sock.send_to(&reply, to).await;
    }
}

/// Opens the sockets of `ports` inside `ns` and serves them on `handle`.
pub(crate) fn start(
    handle: &Handle,
    ns: &NetNs,
    label: &str,
    ports: &[(u16, Protocol)],
) -> Result<(), LabError> {
    if ports.is_empty() {
        return Ok(());
    }
    let sockets = ns
        .try_run(|| open(label, ports))?
        .map_err(|source| LabError::Socket {
            what: format!("responders of {label}"),
            source,
        })?;
    serve(handle, sockets)
}
