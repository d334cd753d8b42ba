//! `npm-agent monitor`: streams the datapath's drop events (`NPM_EVENTS`) with names.
//!
//! Sources: the pinned ring buffer of this build's ABI (`<bpffs-dir>/v<ABI_VERSION>`; the
//! agent creates and pins it), the only source of events; for names, the agent's
//! `/debug/explain` (EnableHTTPDebugAPI on), asked once per distinct (source, destination,
//! protocol, port), which gives both sides' pods and the policies isolating the dropping pod
//! in that direction. Without the agent every event is still printed, with the pod-side
//! address, the interface and `null` names and `isolated_by` (unknown).
//!
//! One consumer at a time: reading a record removes it, so two monitors each see part of the
//! events. The datapath writes at most `EVENTS_BURST` events at once and `EVENTS_PER_SEC`
//! sustained per CPU; the rest are counted (`suppressed`, and `lost` when the ring buffer was
//! full), which the monitor reports on stderr at the end. Only drops at a pod's interface
//! (`npm_from_pod` / `npm_to_pod`) are events; the post-DNAT check's drops (deferred Service
//! flows) are not, and there are no flow events (`--type flow` is refused).
//!
//! Exit 0 after `--count` events or `--duration` (or never, without either); 1 when the ring
//! buffer cannot be opened.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use npm_common::ABI_VERSION;
use npm_common::maps::{
    Addr16, Event, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, is_v4_mapped,
};
use npm_common::verdict::DIR_EGRESS;
use serde::Serialize;

use super::args::{EventType, MonitorArgs};
use super::status::http_get;
use crate::datapath::inspect::{self, EventReader};
use crate::explain::Explanation;

/// How long the monitor sleeps when the ring buffer is empty.
const POLL: Duration = Duration::from_millis(20);
/// Distinct flows whose explanation is kept (then the cache starts over).
const CACHE_MAX: usize = 4096;

/// One `--json` line. Field names are a contract: extend, never rename.
#[derive(Debug, Serialize)]
struct Line {
    /// When the monitor read it (RFC 3339, UTC, milliseconds).
    time: String,
    /// `drop`.
    r#type: &'static str,
    /// `ingress` (entering the pod) or `egress` (leaving it).
    direction: &'static str,
    /// `policy_deny`, `spoofed`, `malformed` (the metrics' reason labels).
    reason: &'static str,
    /// The pod whose interface dropped it; null when unknown (agent unreachable).
    namespace: Option<String>,
    pod: Option<String>,
    /// The pod-side address of the packet.
    pod_address: IpAddr,
    /// The host-side interface (null: no such interface here any more) and its index.
    interface: Option<String>,
    ifindex: u32,
    peer: Peer,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or the protocol number.
    protocol: String,
    /// Destination port (null for protocols without ports).
    port: Option<u16>,
    source_port: Option<u16>,
    /// Packet length in bytes.
    length: u32,
    /// The policies that isolate the pod in this direction (`NAMESPACE/NAME`); null when
    /// unknown (the agent's debug API did not answer).
    isolated_by: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct Peer {
    address: IpAddr,
    namespace: Option<String>,
    pod: Option<String>,
}

fn addr(a: &Addr16) -> IpAddr {
    if is_v4_mapped(a) {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

fn protocol(p: u8) -> String {
    match p {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

fn has_ports(p: u8) -> bool {
    matches!(p, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// `NAMESPACE/POD` split in two.
fn split(pod: Option<&str>) -> (Option<String>, Option<String>) {
    match pod.and_then(|p| p.split_once('/')) {
        Some((ns, name)) => (Some(ns.to_owned()), Some(name.to_owned())),
        None => (None, None),
    }
}

/// RFC 3339 (UTC, milliseconds) of a system time: the health view's seconds, plus milliseconds.
fn rfc3339(t: SystemTime) -> String {
    let secs = crate::observe::health::rfc3339(t);
    let millis = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_millis();
    format!("{}.{millis:03}Z", secs.trim_end_matches('Z'))
}

struct Resolver {
    url: String,
    cache: HashMap<(Addr16, Addr16, u8, u16), Option<Explanation>>,
}

impl Resolver {
    /// The agent's explanation of the event's flow, if it gives one.
    fn explain(&mut self, e: &Event) -> Option<&Explanation> {
        let port = u16::from_be(e.dport_be);
        let key = (e.src, e.dst, e.proto, port);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        let url = &self.url;
        self.cache
            .entry(key)
            .or_insert_with(|| {
                let proto = match e.proto {
                    PROTO_TCP => "TCP",
                    PROTO_UDP => "UDP",
                    PROTO_SCTP => "SCTP",
                    PROTO_ICMP | PROTO_ICMPV6 => "ICMP",
                    _ => return None,
                };
                let mut path = format!(
                    "/debug/explain?from={}&to={}&protocol={proto}",
                    addr(&e.src),
                    addr(&e.dst)
                );
                if has_ports(e.proto) {
                    path.push_str(&format!("&port={port}"));
                }
                match http_get(url, &path) {
                    Ok((200, body)) => serde_json::from_str(&body).ok(),
                    Ok((code, body)) => {
                        tracing::debug!(code, body = body.trim(), "{url}{path}");
                        None
                    }
                    Err(error) => {
                        tracing::debug!(%error, "agent unreachable");
                        None
                    }
                }
            })
            .as_ref()
    }

    fn line(&mut self, e: &Event) -> Line {
        let egress = e.dir == DIR_EGRESS;
        let (pod_addr, peer_addr) = if egress {
            (addr(&e.src), addr(&e.dst))
        } else {
            (addr(&e.dst), addr(&e.src))
        };
        let x = self.explain(e);
        let (pod_name, peer_name, isolated_by) = match x {
            Some(x) => {
                let (pod, peer, check) = if egress {
                    (&x.from, &x.to, &x.egress)
                } else {
                    (&x.to, &x.from, &x.ingress)
                };
                (
                    pod.pod.clone(),
                    peer.pod.clone(),
                    Some(check.isolated_by.iter().map(|i| i.policy.clone()).collect()),
                )
            }
            None => (None, None, None),
        };
        let (namespace, pod) = split(pod_name.as_deref());
        let (peer_ns, peer_pod) = split(peer_name.as_deref());
        let ports = has_ports(e.proto);
        Line {
            time: rfc3339(SystemTime::now()),
            r#type: "drop",
            direction: if egress { "egress" } else { "ingress" },
            reason: crate::observe::metrics::reason_label(e.reason),
            namespace,
            pod,
            pod_address: pod_addr,
            interface: inspect::interface_name(e.ifindex),
            ifindex: e.ifindex,
            peer: Peer {
                address: peer_addr,
                namespace: peer_ns,
                pod: peer_pod,
            },
            protocol: protocol(e.proto),
            port: ports.then(|| u16::from_be(e.dport_be)),
            source_port: ports.then(|| u16::from_be(e.sport_be)),
            length: e.len,
            isolated_by,
        }
    }
}

fn text(l: &Line) -> String {
    let who = |ns: &Option<String>, pod: &Option<String>, a: &IpAddr| match (ns, pod) {
        (Some(ns), Some(p)) => format!("{ns}/{p} ({a})"),
        _ => a.to_string(),
    };
    let port = l.port.map(|p| format!("/{p}")).unwrap_or_default();
    let (from, to) = (
        who(&l.namespace, &l.pod, &l.pod_address),
        who(&l.peer.namespace, &l.peer.pod, &l.peer.address),
    );
    let (from, to) = if l.direction == "egress" {
        (from, to)
    } else {
        (to, from)
    };
    let iso = match &l.isolated_by {
        Some(v) if !v.is_empty() => v.join(","),
        Some(_) => "none".into(),
        None => "unknown".into(),
    };
    format!(
        "{} DROP {} {} {from} -> {to} {}{port} isolated_by={iso}",
        l.time, l.direction, l.reason, l.protocol
    )
}

fn wanted(args: &MonitorArgs, l: &Line) -> bool {
    args.namespace
        .as_ref()
        .is_none_or(|ns| l.namespace.as_ref() == Some(ns))
        && args.pod.as_ref().is_none_or(|p| l.pod.as_ref() == Some(p))
}

pub fn run(args: MonitorArgs) -> anyhow::Result<i32> {
    if args.r#type == EventType::Flow {
        anyhow::bail!(
            "--type flow: this datapath writes drop events only (allowed flows are counted in the metrics, not streamed)"
        );
    }
    let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
    let mut reader = EventReader::open(&pin_dir).with_context(|| {
        format!(
            "{}: cannot open the drop-event ring buffer (is an agent of ABI {ABI_VERSION} running on this node?)",
            pin_dir.display()
        )
    })?;
    let before = inspect::pinned_event_stats(&pin_dir).ok();
    let mut resolver = Resolver {
        url: args.url.clone(),
        cache: HashMap::new(),
    };
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut printed = 0u64;
    'outer: loop {
        while let Some(e) = reader.next_event() {
            let line = resolver.line(&e);
            if !wanted(&args, &line) {
                continue;
            }
            if args.json {
                println!("{}", serde_json::to_string(&line)?);
            } else {
                println!("{}", text(&line));
            }
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                break 'outer;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        std::thread::sleep(POLL);
    }
    if let (Some(b), Ok(a)) = (before, inspect::pinned_event_stats(&pin_dir)) {
        eprintln!(
            "{printed} events printed; meanwhile the datapath suppressed {} (rate limit) and lost {} (ring buffer full)",
            a.suppressed.saturating_sub(b.suppressed),
            a.lost.saturating_sub(b.lost)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ns: Option<&str>, pod: Option<&str>) -> Line {
        Line {
            time: String::new(),
            r#type: "drop",
            direction: "ingress",
            reason: "policy_deny",
            namespace: ns.map(str::to_owned),
            pod: pod.map(str::to_owned),
            pod_address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            interface: None,
            ifindex: 2,
            peer: Peer {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                namespace: None,
                pod: None,
            },
            protocol: "TCP".into(),
            port: Some(80),
            source_port: Some(40000),
            length: 60,
            isolated_by: None,
        }
    }

    fn args(ns: Option<&str>, pod: Option<&str>) -> MonitorArgs {
        MonitorArgs {
            bpffs_dir: "/x".into(),
            url: String::new(),
            r#type: EventType::Drop,
            namespace: ns.map(str::to_owned),
            pod: pod.map(str::to_owned),
            json: true,
            count: None,
            duration: None,
        }
    }

    #[test]
    fn namespace_and_pod_filters_match_the_dropping_pod_and_unknown_names_never() {
        let web = line(Some("default"), Some("web"));
        assert!(wanted(&args(None, None), &web));
        assert!(wanted(&args(Some("default"), None), &web));
        assert!(wanted(&args(Some("default"), Some("web")), &web));
        assert!(!wanted(&args(Some("kube-system"), None), &web));
        assert!(!wanted(&args(None, Some("db")), &web));
        let unknown = line(None, None);
        assert!(wanted(&args(None, None), &unknown));
        assert!(!wanted(&args(Some("default"), None), &unknown));
    }

    #[test]
    fn addresses_and_protocols_print_as_users_know_them() {
        assert_eq!(
            addr(&npm_common::maps::addr_from_v4([10, 1, 2, 3])),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
        let v6: Addr16 = "fd00::1".parse::<Ipv6Addr>().expect("ip").octets();
        assert_eq!(addr(&v6), "fd00::1".parse::<IpAddr>().expect("ip"));
        assert_eq!(protocol(PROTO_ICMPV6), "ICMPv6");
        assert_eq!(protocol(47), "47");
        assert_eq!(split(Some("ns/p")), (Some("ns".into()), Some("p".into())));
        assert_eq!(split(None), (None, None));
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_765_152_000_123);
        assert_eq!(rfc3339(t), "2025-12-08T00:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
