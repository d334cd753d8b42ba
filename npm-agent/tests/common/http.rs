//! A minimal HTTP/1.1 GET for tests that read the agent's endpoints inside a network namespace.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use npm_agent::netns::NetNs;

/// `GET path` on 127.0.0.1:port inside `ns`: (status, body), or the I/O error as text.
pub(crate) fn http_get(ns: &NetNs, port: u16, path: &str) -> Result<(u16, String), String> {
    let path = path.to_owned();
    ns.run(move || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no end of head in {raw:?}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
        if length != body.len() {
            return Err(format!(
                "Content-Length {length} but {} body bytes",
                body.len()
            ));
        }
        Ok((status, body.to_owned()))
    })
}
