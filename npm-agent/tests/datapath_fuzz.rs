//! Fuzz of the real classifiers against the isolation invariant (`BPF_PROG_TEST_RUN`).
//!
//! A small cluster (manifests below) is compiled and programmed through the real `Enforcer`
//! into fresh, unpinned maps; the pod `a/web` sits behind interface 1 (`lo`, present in every
//! network namespace), isolated for ingress and egress. Seeded random frames, well-formed and
//! malformed, go through `npm_to_pod` and `npm_from_pod` at that interface, with conntrack
//! flushed after every run, so every frame is a new flow.
//!
//! The oracle is written here from the policies' meaning, not from the program: `allowed`
//! says which (peer, protocol, destination port) each direction admits, and `reading` reads a
//! frame's peer, protocol and port with its own parser. A pass (`TC_ACT_PIPE`) must then be
//! justified: a frame that is not IP (its EtherType is neither IPv4 nor IPv6), ICMPv6 link
//! control under the rules `npm-ebpf/src/main.rs` documents (neighbour and router discovery
//! with hop limit 255, MLD with hop limit 1 from `fe80::/10` or `::`), or an IP packet whose
//! reading the oracle allows. Every verdict must be `TC_ACT_PIPE` or `TC_ACT_SHOT`. Frames
//! built well-formed (the `exact` cases) must also pass when allowed: the test fails if the
//! program drops what the policy admits, so it cannot pass by dropping everything.
//!
//! `NPM_FUZZ_SEED` (decimal or 0x-hex) replays a run; `NPM_FUZZ_CASES` (default 20 000)
//! sets how many frames each program sees. The seed is printed (`--nocapture` shows it; a
//! failure names it). Requires root (CAP_BPF).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use npm_agent::enforcer::Enforcer;
use npm_agent::source::manifests::Loader;
use npm_common::{
    maps::{PROG_FROM_POD, PROG_TO_POD},
    verdict::{
        DIR_EGRESS, DIR_INGRESS, REASON_DEFERRED, REASON_ESTABLISHED, REASON_NOT_MANAGED,
        REASON_REPLY,
    },
};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;
/// `lo`: exists in every network namespace, as `BPF_PROG_TEST_RUN` requires.
const IFINDEX: u32 = 1;
const ETH_HLEN: usize = 14;
/// Wall-time bound of a default run, against a hang: a debug build takes about 10 s on 2
/// cores (40 s seen with other builds and fuzzers running); a longer run (`NPM_FUZZ_CASES`)
/// gets the same per frame.
const TIME_LIMIT: Duration = Duration::from_secs(120);
const DEFAULT_CASES: usize = 20_000;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const AH: u8 = 51;
const ESP: u8 = 50;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
const NO_NEXT: u8 = 59;

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

/// `a/web` (10.0.0.1, fd00::1) is the local pod. Both directions are isolated by
/// `web-policy`; `web-extra` adds one ingress rule (policies add up).
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {team: b}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
spec:
  nodeName: node
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client}}
spec: {nodeName: other, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: a, labels: {app: other}}
spec: {nodeName: other, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.0.3, podIPs: [{ip: 10.0.0.3}, {ip: "fd00::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: b, labels: {app: db}}
spec: {nodeName: other, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.1.4, podIPs: [{ip: 10.0.1.4}, {ip: "fd00::1:4"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: x, namespace: b, labels: {app: x}}
spec: {nodeName: other, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.1.5, podIPs: [{ip: 10.0.1.5}, {ip: "fd00::1:5"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-policy, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 53}]
  - from: [{namespaceSelector: {matchLabels: {team: b}}}]
    ports: [{protocol: TCP, port: 5000, endPort: 5100}]
  - from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.16.5.0/24]}}]
    ports: [{protocol: TCP, port: 443}, {protocol: SCTP, port: 9000}]
  - from: [{ipBlock: {cidr: "fd10::/16", except: ["fd10:0:5::/48"]}}]
    ports: [{protocol: UDP}]
  - from: [{podSelector: {matchLabels: {app: other}}}]
  - from: [{ipBlock: {cidr: 203.0.113.0/24}}]
    ports: [{port: http}]
  egress:
  - to: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 8080, endPort: 8090}]
  - to: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: db}}}]
    ports: [{protocol: TCP, port: 5432}]
  - to: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - to: [{ipBlock: {cidr: "2001:db8::/32", except: ["2001:db8:1::/48"]}}]
  - ports: [{protocol: TCP, port: 7777}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-extra, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}]
    ports: [{protocol: UDP, port: 6000, endPort: 6001}]
"#;

const NODE_IPS: [&str; 2] = ["192.168.0.10", "fd00:ff::10"];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// `a` is inside `net/len` (same family).
fn within(a: IpAddr, net: &str, len: u8) -> bool {
    match (a, ip(net)) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn one_of(a: IpAddr, list: &[&str]) -> bool {
    list.iter().any(|s| ip(s) == a)
}

/// What the policies admit, written from their meaning (not from the compiler's output):
/// may a new flow with this remote `peer`, `proto` and destination `port` (`None`: the packet
/// has no port, e.g. a non-first fragment or ICMP) enter (`DIR_INGRESS`) or leave
/// (`DIR_EGRESS`) `a/web`? Traffic from or to the pod itself and the node always passes.
fn allowed(dir: u8, peer: IpAddr, proto: u8, port: Option<u16>) -> bool {
    // An IPv4-mapped IPv6 address is the IPv4 address (the datapath's one address space).
    let peer = match peer {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if one_of(peer, &["10.0.0.1", "fd00::1"]) || one_of(peer, &NODE_IPS) {
        return true;
    }
    let tcp = |lo: u16, hi: u16| proto == TCP && port.is_some_and(|p| (lo..=hi).contains(&p));
    let udp = |lo: u16, hi: u16| proto == UDP && port.is_some_and(|p| (lo..=hi).contains(&p));
    let sctp = |lo: u16, hi: u16| proto == SCTP && port.is_some_and(|p| (lo..=hi).contains(&p));
    let client = one_of(peer, &["10.0.0.2", "fd00::2"]);
    let other = one_of(peer, &["10.0.0.3", "fd00::3"]);
    let db = one_of(peer, &["10.0.1.4", "fd00::1:4"]);
    let x = one_of(peer, &["10.0.1.5", "fd00::1:5"]);
    if dir == DIR_INGRESS {
        (client && (tcp(80, 80) || udp(53, 53)))
            || ((db || x) && tcp(5000, 5100))
            || (within(peer, "172.16.0.0", 12)
                && !within(peer, "172.16.5.0", 24)
                && (tcp(443, 443) || sctp(9000, 9000)))
            || (within(peer, "fd10::", 16) && !within(peer, "fd10:0:5::", 48) && proto == UDP)
            || other
            // The named port `http` resolves on web: TCP 8080.
            || (within(peer, "203.0.113.0", 24) && tcp(8080, 8080))
            || (x && udp(6000, 6001))
    } else {
        (client && tcp(8080, 8090))
            || (db && tcp(5432, 5432))
            || (within(peer, "198.51.100.0", 24)
                && !within(peer, "198.51.100.128", 25)
                && (udp(53, 53) || tcp(53, 53)))
            || (within(peer, "2001:db8::", 32) && !within(peer, "2001:db8:1::", 48))
            || tcp(7777, 7777)
    }
}

// ---------------------------------------------------------------------------------------
// The oracle's reading of a frame
// ---------------------------------------------------------------------------------------

/// How the test reads a frame, independently of `npm-ebpf/src/parse.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reading {
    /// EtherType neither IPv4 nor IPv6 (ARP, VLAN tags, LLDP, ...): passes untouched.
    NotIp,
    /// ICMPv6 neighbour/router discovery or MLD with the hop limit (and source) their RFCs
    /// require: IPv6's ARP, passes untouched.
    LinkControl,
    /// An IP packet that cannot be read (no room for the IP header, bad IPv4 version/IHL).
    Malformed,
    /// An IP packet: source, destination, upper-layer protocol and destination port.
    Ip {
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        port: Option<u16>,
    },
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// What the upper-layer header at `l4` says: whether it is ICMPv6 link control (IPv6 only:
/// `hop_limit` is `None` for IPv4) and its destination port (TCP, UDP and SCTP start with
/// both ports; other protocols have none).
fn upper(
    f: &[u8],
    l4: usize,
    proto: u8,
    hop_limit: Option<u8>,
    src: IpAddr,
) -> (bool, Option<u16>) {
    let port = match proto {
        TCP | UDP | SCTP => be16(f, l4 + 2),
        _ => None,
    };
    let mut link_control = false;
    if let (ICMPV6, Some(hops)) = (proto, hop_limit)
        // ND and MLD messages are at least 8 bytes (type, code, checksum, 4 more).
        && f.len() >= l4 + 8
    {
        let ty = f[l4];
        let link_local_or_unspecified = match src {
            IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80 || a.is_unspecified(),
            IpAddr::V4(_) => false,
        };
        link_control = ((133..=137).contains(&ty) && hops == 255)
            || (matches!(ty, 130..=132 | 143) && hops == 1 && link_local_or_unspecified);
    }
    (link_control, port)
}

fn reading(f: &[u8]) -> Reading {
    let Some(ethertype) = be16(f, 12) else {
        return Reading::NotIp;
    };
    let ip = &f[ETH_HLEN..];
    match ethertype {
        0x0800 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 || (ip[0] & 0x0f) < 5 {
                return Reading::Malformed;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).expect("4 bytes"));
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).expect("4 bytes"));
            let proto = ip[9];
            // Fragment offset (13 bits): a non-first fragment carries no upper-layer header.
            let first = be16(ip, 6).expect("in header") & 0x1fff == 0;
            let port = if first {
                upper(f, ETH_HLEN + ihl, proto, None, src).1
            } else {
                None
            };
            Reading::Ip {
                src,
                dst,
                proto,
                port,
            }
        }
        0x86dd => {
            if ip.len() < 40 {
                return Reading::Malformed;
            }
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
            let hop_limit = ip[7];
            let (mut next, mut off) = (ip[6], ETH_HLEN + 40);
            // Walk the extension headers (RFC 8200 §4) as far as the frame goes. AH (RFC 4302)
            // is walked too: what it protects is the real upper layer.
            let (proto, port) = loop {
                match next {
                    HOPOPTS | ROUTING | DSTOPTS | AH => {
                        let (Some(&n), Some(&len)) = (f.get(off), f.get(off + 1)) else {
                            // The upper layer cannot be found: no port to read.
                            break (next, None);
                        };
                        off += if next == AH {
                            (usize::from(len) + 2) * 4
                        } else {
                            (usize::from(len) + 1) * 8
                        };
                        next = n;
                    }
                    FRAGMENT => {
                        let (Some(&n), Some(offset)) = (f.get(off), be16(f, off + 2)) else {
                            break (next, None);
                        };
                        if offset >> 3 != 0 {
                            // A non-first fragment: what follows is the middle of the
                            // fragmentable part, not headers. Its protocol is the one the
                            // fragment header names, and it has no port.
                            break (n, None);
                        }
                        off += 8;
                        next = n;
                    }
                    proto => {
                        let (link_control, port) = upper(f, off, proto, Some(hop_limit), src);
                        if link_control {
                            return Reading::LinkControl;
                        }
                        break (proto, port);
                    }
                }
            };
            Reading::Ip {
                src,
                dst,
                proto,
                port,
            }
        }
        _ => Reading::NotIp,
    }
}

/// Whether a pass of frame `f` in direction `dir` is justified.
fn justified(dir: u8, f: &[u8]) -> bool {
    justified_reading(dir, &reading(f))
}

fn justified_reading(dir: u8, r: &Reading) -> bool {
    match *r {
        Reading::NotIp | Reading::LinkControl => true,
        Reading::Malformed => false,
        Reading::Ip {
            src,
            dst,
            proto,
            port,
        } => {
            let peer = if dir == DIR_INGRESS { src } else { dst };
            allowed(dir, peer, proto, port)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Frame generators
// ---------------------------------------------------------------------------------------

/// Peers worth hitting: every pod, the node, the edges of each ipBlock and its except,
/// IPv4-mapped forms, link-local, loopback, multicast and unspecified.
const PEERS: [&str; 36] = [
    "10.0.0.1",
    "fd00::1",
    "10.0.0.2",
    "fd00::2",
    "10.0.0.3",
    "fd00::3",
    "10.0.1.4",
    "fd00::1:4",
    "10.0.1.5",
    "fd00::1:5",
    "192.168.0.10",
    "fd00:ff::10",
    "172.16.0.1",
    "172.31.255.255",
    "172.16.5.7",
    "172.32.0.0",
    "fd10::1",
    "fd10:0:5::1",
    "fd10:ffff::1",
    "203.0.113.9",
    "198.51.100.1",
    "198.51.100.127",
    "198.51.100.128",
    "2001:db8::5",
    "2001:db8:1::5",
    "2001:db9::1",
    "8.8.8.8",
    "::ffff:10.0.0.2",
    "::ffff:172.16.0.1",
    "::ffff:198.51.100.1",
    "fe80::1",
    "::",
    "::1",
    "127.0.0.1",
    "0.0.0.0",
    "ff02::1",
];

/// Ports worth hitting: every allowed port and range edge, their neighbours, 0 and 65535.
const PORTS: [u16; 22] = [
    80, 53, 443, 4999, 5000, 5050, 5100, 5101, 8080, 8079, 8090, 8091, 9000, 5432, 7777, 6000,
    6001, 6002, 0, 65535, 1, 22,
];

/// The shortest valid ICMPv6 message of type `ty`, as its RFC requires (RFC 4861 §6.1.1,
/// §6.1.2, §7.1.1, §7.1.2, §8.1; RFC 2710 §3, RFC 3810 §5.2): receivers discard shorter ones,
/// and the classifier reads a neighbour advertisement's target (bytes 8..24).
fn icmpv6_min_len(ty: u8) -> usize {
    match ty {
        130..=132 | 135 | 136 => 24,
        134 => 16,
        137 => 40,
        _ => 8,
    }
}

struct Gen {
    rng: fastrand::Rng,
}

/// One generated frame and whether it is well-formed (its verdict must equal the oracle's).
struct Case {
    frame: Vec<u8>,
    exact: bool,
    what: &'static str,
}

impl Gen {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    /// Between `lo` and `hi` (exclusive) random bytes.
    fn some_bytes(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.rng.usize(lo..hi);
        self.bytes(n)
    }

    fn peer(&mut self, v6: bool) -> IpAddr {
        if self.rng.u8(..10) == 0 {
            return if v6 {
                IpAddr::V6(Ipv6Addr::from(self.rng.u128(..)))
            } else {
                IpAddr::V4(Ipv4Addr::from(self.rng.u32(..)))
            };
        }
        loop {
            let a = ip(PEERS[self.rng.usize(..PEERS.len())]);
            if a.is_ipv6() == v6 {
                return a;
            }
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.u8(..5) == 0 {
            self.rng.u16(..)
        } else {
            PORTS[self.rng.usize(..PORTS.len())]
        }
    }

    fn proto(&mut self, v6: bool) -> u8 {
        match self.rng.u8(..10) {
            0..=2 => TCP,
            3..=4 => UDP,
            5 => SCTP,
            6 => {
                if v6 {
                    ICMPV6
                } else {
                    ICMP
                }
            }
            7 => [AH, ESP, NO_NEXT, 47, 0, 255][self.rng.usize(..6)],
            _ => self.rng.u8(..),
        }
    }

    /// A full upper-layer header for `proto` (with random flags/types), or random bytes.
    fn l4(&mut self, proto: u8, dport: u16) -> Vec<u8> {
        let sport = self.rng.u16(..);
        let mut h = Vec::new();
        match proto {
            TCP => {
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend(self.bytes(8));
                h.push(0x50);
                h.push(self.rng.u8(..)); // flags
                h.extend(self.bytes(6));
            }
            UDP | SCTP => {
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend(self.bytes(if proto == UDP { 4 } else { 8 }));
            }
            ICMP | ICMPV6 => {
                let ty = match self.rng.u8(..4) {
                    0 => [0, 8, 128, 129][self.rng.usize(..4)],
                    1 => self.rng.u8(130..=137),
                    2 => 143,
                    _ => self.rng.u8(..),
                };
                h.push(ty);
                let n = if proto == ICMPV6 {
                    icmpv6_min_len(ty)
                } else {
                    8
                } - 1;
                h.extend(self.bytes(n));
            }
            _ => h.extend(self.some_bytes(0, 24)),
        }
        h.extend(self.some_bytes(0, 16));
        h
    }

    fn eth(&mut self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A well-formed IPv4 packet between web (10.0.0.1) and a peer, in `dir`'s orientation;
    /// random options, TOS, TTL, flags and (sometimes) a non-first fragment offset.
    fn ipv4(&mut self, dir: u8) -> Vec<u8> {
        let peer = match self.peer(false) {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => unreachable!("asked for IPv4"),
        };
        let web = [10, 0, 0, 1];
        let (src, dst) = if dir == DIR_INGRESS {
            (peer, web)
        } else {
            (web, peer)
        };
        let proto = self.proto(false);
        let port = self.port();
        let l4 = self.l4(proto, port);
        let opt_words = if self.rng.u8(..4) == 0 {
            self.rng.usize(..=10)
        } else {
            0
        };
        let frag: u16 = match self.rng.u8(..6) {
            0 => self.rng.u16(1..0x2000) | (u16::from(self.rng.bool()) << 13), // non-first
            1 => 0x2000,                                                       // first, MF
            2 => 0x4000,                                                       // DF
            _ => 0,
        };
        let mut ip = vec![
            0x40 | u8::try_from(5 + opt_words).expect("IHL"),
            self.rng.u8(..),
        ];
        let total = u16::try_from(20 + opt_words * 4 + l4.len()).expect("small");
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend(self.bytes(2));
        ip.extend_from_slice(&frag.to_be_bytes());
        ip.push(self.rng.u8(1..));
        ip.push(proto);
        ip.extend(self.bytes(2));
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        // Options: NOPs (1) and random bytes; the classifier must skip them by IHL.
        for _ in 0..opt_words {
            ip.extend_from_slice(&[1, 1, self.rng.u8(..), self.rng.u8(..)]);
        }
        ip.extend(l4);
        self.eth(0x0800, &ip)
    }

    /// Extension header `ty` of 8 × (1 + `len8`) bytes, next header `next` (for a fragment
    /// header: `frag_off` in 8-byte units, random M flag).
    fn ext(&mut self, ty: u8, next: u8, len8: u8, frag_off: u16) -> Vec<u8> {
        if ty == FRAGMENT {
            let v = (frag_off << 3) | u16::from(self.rng.bool());
            let mut h = vec![next, 0];
            h.extend_from_slice(&v.to_be_bytes());
            h.extend(self.bytes(4));
            return h;
        }
        let mut h = vec![next, len8];
        h.extend(self.bytes(6 + 8 * usize::from(len8)));
        h
    }

    /// A well-formed IPv6 packet between web (fd00::1) and a peer, with 0 to 3 extension
    /// headers (hop-by-hop, routing, destination options, at most one fragment header, which
    /// is sometimes a non-first fragment), random hop limit and flow label.
    fn ipv6(&mut self, dir: u8) -> Vec<u8> {
        let peer = match self.peer(true) {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!("asked for IPv6"),
        };
        let web = ip("fd00::1");
        let web = match web {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!("IPv6 literal"),
        };
        let (src, dst) = if dir == DIR_INGRESS {
            (peer, web)
        } else {
            (web, peer)
        };
        // The upper layer is never an extension header or AH here (`ext_chain` does those).
        let proto = loop {
            let p = self.proto(true);
            if !matches!(p, HOPOPTS | ROUTING | FRAGMENT | DSTOPTS | AH) {
                break p;
            }
        };
        let port = self.port();
        let mut chain: Vec<u8> = Vec::new();
        let mut fragmented = false;
        for _ in 0..self.rng.usize(..=3) {
            let ty = [HOPOPTS, ROUTING, DSTOPTS, FRAGMENT][self.rng.usize(..4)];
            if ty == FRAGMENT && fragmented {
                continue;
            }
            fragmented |= ty == FRAGMENT;
            chain.push(ty);
        }
        let non_first = fragmented && self.rng.bool();
        let mut body = Vec::new();
        for (i, &ty) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied().unwrap_or(proto);
            let off = if non_first {
                self.rng.u16(1..0x2000)
            } else {
                0
            };
            let len8 = self.rng.u8(..3);
            body.extend(self.ext(ty, next, len8, off));
            if ty == FRAGMENT && non_first {
                // After a non-first fragment header comes the middle of the payload.
                body.extend(self.some_bytes(8, 40));
                break;
            }
        }
        if !non_first {
            body.extend(self.l4(proto, port));
        }
        let first = chain.first().copied().unwrap_or(proto);
        let hop_limit = match self.rng.u8(..4) {
            0 => 255,
            1 => 1,
            _ => self.rng.u8(..),
        };
        let mut ip = vec![0x60 | self.rng.u8(..16), self.rng.u8(..), self.rng.u8(..)];
        ip.push(self.rng.u8(..));
        ip.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
        ip.extend_from_slice(&[first, hop_limit]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend(body);
        self.eth(0x86dd, &ip)
    }

    /// ND or MLD, from a link-local, unspecified or other source, to any destination, with a
    /// hop limit that is sometimes the one its RFC requires; sometimes behind a hop-by-hop
    /// header (MLD's router alert).
    fn link_control(&mut self, dir: u8) -> Vec<u8> {
        let ty = [130, 131, 132, 143, 133, 134, 135, 136, 137, 128, 1][self.rng.usize(..11)];
        let other = match self.rng.u8(..4) {
            0 => ip("fe80::1"),
            1 => ip("::"),
            2 => ip("febf::1"),
            _ => self.peer(true),
        };
        let web = ip("fd00::1");
        let (src, dst) = if dir == DIR_INGRESS {
            (other, web)
        } else {
            // From web's own address, or from a link-local one (ND uses both).
            (if self.rng.bool() { web } else { ip("fe80::2") }, other)
        };
        let hops = match self.rng.u8(..3) {
            0 => 255,
            1 => 1,
            _ => self.rng.u8(..),
        };
        let min = icmpv6_min_len(ty);
        let mut icmp = vec![ty];
        let n = min - 1 + 8 * self.rng.usize(..3);
        icmp.extend(self.bytes(n));
        let (first, mut body) = if self.rng.bool() {
            (HOPOPTS, vec![ICMPV6, 0, 5, 2, 0, 0, 1, 0])
        } else {
            (ICMPV6, Vec::new())
        };
        body.extend(icmp);
        let mut f = vec![0x60, 0, 0, 0];
        f.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
        f.extend_from_slice(&[first, hops]);
        for a in [src, dst] {
            match a {
                IpAddr::V6(a) => f.extend_from_slice(&a.octets()),
                IpAddr::V4(a) => f.extend_from_slice(&a.to_ipv6_mapped().octets()),
            }
        }
        f.extend(body);
        self.eth(0x86dd, &f)
    }

    /// A long or unusual IPv6 extension-header chain: up to 7 headers of any kind (AH, ESP,
    /// unknown types included), random lengths, sometimes pointing past the frame.
    fn ext_chain(&mut self, dir: u8) -> Vec<u8> {
        let mut f = self.ipv6(dir);
        let n = self.rng.usize(1..=7);
        let types: Vec<u8> = (0..n)
            .map(|_| [HOPOPTS, ROUTING, DSTOPTS, FRAGMENT, AH, ESP, NO_NEXT][self.rng.usize(..7)])
            .collect();
        let proto = self.proto(true);
        let mut body = Vec::new();
        for (i, &ty) in types.iter().enumerate() {
            let next = types.get(i + 1).copied().unwrap_or(proto);
            match ty {
                AH => {
                    let len = self.rng.u8(1..6);
                    body.extend([next, len]);
                    body.extend(self.bytes((usize::from(len) + 2) * 4 - 2));
                }
                ESP | NO_NEXT => body.extend(self.bytes(16)),
                _ => {
                    let off = if self.rng.u8(..4) == 0 {
                        self.rng.u16(..0x2000)
                    } else {
                        0
                    };
                    // Sometimes long (up to 640 bytes): past the 512 bytes parse.rs reads.
                    let len8 = if self.rng.u8(..8) == 0 {
                        self.rng.u8(..80)
                    } else {
                        self.rng.u8(..2)
                    };
                    let h = self.ext(ty, next, len8, off);
                    body.extend(h);
                }
            }
        }
        let port = self.port();
        body.extend(self.l4(proto, port));
        // Replace what follows the fixed header.
        f.truncate(ETH_HLEN + 40);
        f[ETH_HLEN + 6] = types[0];
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());
        f.extend(body);
        // An Ethernet MTU's worth at most (BPF_PROG_TEST_RUN takes up to about a page).
        f.truncate(1514);
        f
    }

    /// An ARP request or reply (which must pass: an isolated pod needs its neighbours). One
    /// leaving web gives web's address as its sender (one claiming another pod's or the
    /// node's address drops as spoofed: main.rs, `claims_foreign`).
    fn arp(&mut self, dir: u8) -> Vec<u8> {
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, self.rng.u8(1..3)];
        arp.extend(self.bytes(6));
        if dir == DIR_EGRESS {
            arp.extend_from_slice(&[10, 0, 0, 1]);
        } else {
            arp.extend(self.bytes(4));
        }
        arp.extend(self.bytes(10));
        self.eth(0x0806, &arp)
    }

    /// A frame of the other kinds the classifier treats as not IP (main.rs: they pass):
    /// VLAN-tagged IP (802.1Q and 802.1ad), LLDP, IPX, MPLS, random EtherTypes.
    fn not_ip(&mut self, dir: u8) -> Vec<u8> {
        match self.rng.u8(..5) {
            0 => self.arp(dir),
            1 | 2 => {
                let inner = if self.rng.bool() {
                    self.ipv4(dir)
                } else {
                    self.ipv6(dir)
                };
                let tpid: u16 = if self.rng.bool() { 0x8100 } else { 0x88a8 };
                let mut f = inner[..12].to_vec();
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&self.rng.u16(..0x1000).to_be_bytes());
                f.extend_from_slice(&inner[12..]);
                f
            }
            3 => {
                let n = self.rng.usize(..64);
                let payload = self.bytes(n);
                let ty = [0x88cc, 0x8137, 0x88e5, 0x8847][self.rng.usize(..4)];
                self.eth(ty, &payload)
            }
            _ => {
                let ty = loop {
                    let t = self.rng.u16(..);
                    if t != 0x0800 && t != 0x86dd {
                        break t;
                    }
                };
                let n = self.rng.usize(..80);
                let payload = self.bytes(n);
                self.eth(ty, &payload)
            }
        }
    }

    /// Flips 1 to 4 random bytes (after the MAC addresses).
    fn flip(&mut self, mut f: Vec<u8>) -> Vec<u8> {
        if f.len() > 12 {
            for _ in 0..self.rng.usize(1..=4) {
                let i = self.rng.usize(12..f.len());
                f[i] = self.rng.u8(..);
            }
        }
        f
    }

    fn case(&mut self, dir: u8) -> Case {
        let ip = |g: &mut Self| {
            if g.rng.bool() {
                g.ipv4(dir)
            } else {
                g.ipv6(dir)
            }
        };
        match self.rng.u8(..20) {
            0..=5 => Case {
                frame: ip(self),
                exact: true,
                what: "well-formed IP",
            },
            6 => Case {
                frame: self.link_control(dir),
                exact: true,
                what: "ND/MLD",
            },
            7 => {
                let n = self.rng.usize(..200);
                Case {
                    frame: self.bytes(n),
                    exact: false,
                    what: "random bytes",
                }
            }
            8 => {
                let ty = if self.rng.bool() { 0x0800 } else { 0x86dd };
                let n = self.rng.usize(..120);
                let payload = self.bytes(n);
                Case {
                    frame: self.eth(ty, &payload),
                    exact: false,
                    what: "IP EtherType, random payload",
                }
            }
            9..=10 => {
                let f = ip(self);
                Case {
                    frame: self.flip(f),
                    exact: false,
                    what: "IP with flipped bytes",
                }
            }
            11 => {
                // Bad version, IHL or total length.
                let mut f = self.ipv4(dir);
                match self.rng.u8(..3) {
                    0 => f[ETH_HLEN] = (self.rng.u8(..16) << 4) | (f[ETH_HLEN] & 0x0f),
                    1 => f[ETH_HLEN] = 0x40 | self.rng.u8(..16),
                    _ => {
                        let t = self.rng.u16(..);
                        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&t.to_be_bytes());
                    }
                }
                Case {
                    frame: f,
                    exact: false,
                    what: "IPv4 with bad version/IHL/total length",
                }
            }
            12..=13 => Case {
                frame: self.ext_chain(dir),
                exact: false,
                what: "IPv6 extension-header chain",
            },
            14..=15 => {
                let f = match self.rng.u8(..3) {
                    0 => self.ipv4(dir),
                    1 => self.ipv6(dir),
                    _ => self.link_control(dir),
                };
                let n = self.rng.usize(..=f.len());
                Case {
                    frame: f[..n].to_vec(),
                    exact: false,
                    what: "truncated",
                }
            }
            16 => Case {
                frame: self.arp(dir),
                exact: true,
                what: "ARP",
            },
            17 => Case {
                frame: self.not_ip(dir),
                exact: false,
                what: "not IP",
            },
            _ => {
                let f = self.link_control(dir);
                Case {
                    frame: self.flip(f),
                    exact: false,
                    what: "ND/MLD with flipped bytes",
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn seed() -> u64 {
    match std::env::var("NPM_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("NPM_FUZZ_SEED={s:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            (t.as_nanos() as u64) ^ u64::from(std::process::id()) << 32
        }
    }
}

fn cases() -> usize {
    std::env::var("NPM_FUZZ_CASES").map_or(DEFAULT_CASES, |s| {
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("NPM_FUZZ_CASES={s:?}: {e}"))
    })
}

/// Frames `BPF_PROG_TEST_RUN` refuses (EINVAL) before any program runs: shorter than an
/// Ethernet header, or with an IPv4 or IPv6 EtherType and shorter than that IP header (seen
/// on 6.18). A real interface can hand the classifier such frames; parse.rs treats them as
/// malformed (`ptr_at` fails), which `malformed_packets` in tests/datapath.rs cannot reach
/// either.
fn kernel_refuses(f: &[u8]) -> bool {
    match be16(f, 12) {
        None => true,
        Some(0x0800) => f.len() < ETH_HLEN + 20,
        Some(0x86dd) => f.len() < ETH_HLEN + 40,
        Some(_) => false,
    }
}

fn hex(f: &[u8]) -> String {
    let mut s = String::new();
    for b in f {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn programmed_enforcer() -> Enforcer {
    let mut loader = Loader::default();
    loader.add_text("datapath_fuzz.rs", MANIFESTS);
    let (mut snapshot, diagnostics) = loader.finish();
    assert!(diagnostics.is_empty(), "manifests: {diagnostics:?}");
    assert_eq!(snapshot.pods.len(), 5, "every pod was read");
    let web = snapshot
        .pods
        .keys()
        .find(|p| p.name == "web")
        .expect("web")
        .clone();
    snapshot.local.insert(web, IFINDEX);
    snapshot.node_ips = NODE_IPS.iter().map(|s| ip(s)).collect();
    let mut e = Enforcer::new(None).expect("load the datapath (root required)");
    let r = e.apply(&snapshot);
    assert_eq!(r.sync.failed, 0, "every map write succeeded");
    assert!(r.diagnostics.is_empty(), "compiler: {:?}", r.diagnostics);
    e
}

#[test]
fn random_and_malformed_frames_never_pass_what_the_policy_denies() {
    let seed = seed();
    let n = cases();
    println!("datapath fuzz: seed {seed:#x}, {n} frames per program (NPM_FUZZ_SEED to replay)");
    let mut e = programmed_enforcer();
    let mut g = Gen {
        rng: fastrand::Rng::with_seed(seed),
    };
    let started = Instant::now();
    let limit = TIME_LIMIT * u32::try_from(n.div_ceil(DEFAULT_CASES).max(1)).unwrap_or(u32::MAX);
    // Per direction: runs, passes, exact cases that passed and that were dropped, not IP.
    let mut stats = [[0usize; 5]; 2];
    let (mut runs, mut refused) = (0u64, 0u64);
    for i in 0..n {
        for (prog, dir) in [(PROG_TO_POD, DIR_INGRESS), (PROG_FROM_POD, DIR_EGRESS)] {
            let case = g.case(dir);
            let f = &case.frame;
            let result = e.datapath().test_run(prog, f, IFINDEX, 1);
            let retval = match result {
                Ok(r) => r.retval,
                Err(npm_agent::datapath::DatapathError::TestRun { source, .. })
                    if kernel_refuses(f) && source.raw_os_error() == Some(22) =>
                {
                    refused += 1;
                    continue;
                }
                Err(err) => panic!(
                    "seed {seed:#x} case {i} ({}): {prog} test run failed: {err:?} on {}",
                    case.what,
                    hex(f)
                ),
            };
            runs += 1;
            let s = &mut stats[usize::from(dir)];
            s[0] += 1;
            let read = reading(f);
            let context = || {
                format!(
                    "seed {seed:#x} case {i} ({}, {prog}): frame {} read as {:?}",
                    case.what,
                    hex(f),
                    read
                )
            };
            assert!(
                retval == TC_ACT_PIPE || retval == TC_ACT_SHOT,
                "verdict {retval} is neither TC_ACT_PIPE nor TC_ACT_SHOT; {}",
                context()
            );
            let pass = retval == TC_ACT_PIPE;
            let ok = justified_reading(dir, &read);
            assert!(
                !pass || ok,
                "passed a new flow the policy does not allow; {}",
                context()
            );
            // Exactness is asked only of frames whose local side is web's own address (a
            // check of the pod's source or destination address may drop the others).
            let local_is_web = match read {
                Reading::Ip { src, dst, .. } => {
                    let local = if dir == DIR_INGRESS { dst } else { src };
                    one_of(local, &["10.0.0.1", "fd00::1"])
                }
                _ => true,
            };
            if case.exact && local_is_web {
                assert_eq!(
                    pass,
                    ok,
                    "a well-formed frame's verdict differs from the policy's; {}",
                    context()
                );
                s[if pass { 2 } else { 3 }] += 1;
            }
            if pass {
                s[1] += 1;
            }
            if read == Reading::NotIp {
                s[4] += 1;
            }
            // Every frame is a new flow: forget what an allowed one created.
            if pass {
                e.datapath_mut().flush_conntrack().expect("flush conntrack");
            }
            assert!(
                started.elapsed() < limit,
                "seed {seed:#x}: still running after {limit:?} at case {i}"
            );
        }
    }
    let elapsed = started.elapsed();
    for (name, s) in ["ingress", "egress"].iter().zip(stats) {
        println!(
            "{name}: {} runs, {} passed; well-formed: {} passed, {} dropped; {} not IP",
            s[0], s[1], s[2], s[3], s[4]
        );
        // The mix reached both verdicts of the policy (at the default size; a tiny
        // NPM_FUZZ_CASES may not).
        if n >= 2_000 {
            assert!(
                s[2] > 50 && s[3] > 50,
                "{name}: too few allowed or denied well-formed frames ({s:?}); seed {seed:#x}"
            );
        }
    }
    println!("{runs} runs in {elapsed:?} ({refused} frames too short for BPF_PROG_TEST_RUN)");

    // The counters saw every run once, and nothing was established or a reply (conntrack
    // was flushed after every pass); non-IP frames counted as not managed.
    let counters = e.counters().expect("counters");
    use npm_agent::datapath::CounterReader as _;
    let all = counters.read().expect("read counters");
    let sum = |dir: u8, pred: &dyn Fn(u8) -> bool| -> u64 {
        all.iter()
            .filter(|c| c.dir == dir && pred(c.reason))
            .map(|c| c.packets)
            .sum()
    };
    for (d, dir) in [DIR_INGRESS, DIR_EGRESS].into_iter().enumerate() {
        let s = stats[d];
        assert_eq!(
            sum(dir, &|_| true),
            s[0] as u64,
            "dir {dir}: every run counted once"
        );
        assert_eq!(
            sum(dir, &|r| r == REASON_ESTABLISHED || r == REASON_REPLY),
            0,
            "dir {dir}: no frame was taken for an established flow or a reply"
        );
        assert_eq!(
            sum(dir, &|r| r == REASON_DEFERRED),
            0,
            "no Service ranges: nothing deferred"
        );
        assert!(
            sum(dir, &|r| r == REASON_NOT_MANAGED) >= s[4] as u64,
            "dir {dir}: every non-IP frame counted as not managed"
        );
    }
}

/// Found by the fuzz above (seed 0x1): after the fragment header of a non-first fragment,
/// the classifier kept walking "extension headers" through the fragment's payload, so the
/// protocol it judged came from payload bytes. `fd10::/16` may send web any UDP port, nothing
/// else; a non-first fragment whose fragment header names destination options (60), with
/// payload bytes shaped like a destination-options header naming UDP, passed as UDP.
/// And to `2001:db8::5`, where web may send anything, a non-first fragment whose payload
/// looked like a chain of more than four headers was dropped as malformed.
#[test]
fn a_non_first_fragment_is_judged_by_its_fragment_header_not_its_payload() {
    let mut e = programmed_enforcer();
    let v6 = |s: &str| match ip(s) {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(_) => unreachable!("IPv6 literal"),
    };
    // IPv6 + fragment header (offset `off` in 8-byte units, next header `next`) + payload.
    let fragment = |src: &str, dst: &str, next: u8, off: u16, payload: &[u8]| {
        let mut body = vec![next, 0];
        body.extend_from_slice(&(off << 3).to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 9]);
        body.extend_from_slice(payload);
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
        f.extend_from_slice(&[FRAGMENT, 64]);
        f.extend_from_slice(&v6(src));
        f.extend_from_slice(&v6(dst));
        f.extend(body);
        f
    };
    let mut run = |prog: &str, f: &[u8]| {
        let r = e
            .datapath()
            .test_run(prog, f, IFINDEX, 1)
            .expect("test run")
            .retval;
        e.datapath_mut().flush_conntrack().expect("flush");
        r
    };
    // Payload that reads as destination options (8 bytes) naming UDP, then UDP to port 53.
    let mut looks_like_udp = vec![UDP, 0, 1, 4, 0, 0, 0, 0];
    looks_like_udp.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
    let dstopts_fragment = fragment("fd10::1", "fd00::1", DSTOPTS, 100, &looks_like_udp);
    assert!(!justified(DIR_INGRESS, &dstopts_fragment));
    assert_eq!(
        run(PROG_TO_POD, &dstopts_fragment),
        TC_ACT_SHOT,
        "a non-first fragment of protocol 60 from fd10::/16 (UDP only) is denied"
    );
    // The same fragment naming UDP itself passes (any UDP port; a fragment has port 0).
    let udp_fragment = fragment("fd10::1", "fd00::1", UDP, 100, &looks_like_udp);
    assert!(justified(DIR_INGRESS, &udp_fragment));
    assert_eq!(run(PROG_TO_POD, &udp_fragment), TC_ACT_PIPE);
    // Payload shaped like six hop-by-hop headers: to a peer allowed every protocol, the
    // fragment passes (it was dropped as malformed).
    let chain: Vec<u8> = (0..6)
        .flat_map(|_| [HOPOPTS, 0, 1, 4, 0, 0, 0, 0])
        .collect();
    let egress = fragment("fd00::1", "2001:db8::5", DSTOPTS, 7, &chain);
    assert!(justified(DIR_EGRESS, &egress));
    assert_eq!(
        run(PROG_FROM_POD, &egress),
        TC_ACT_PIPE,
        "a non-first fragment to a peer allowed every protocol passes"
    );
}
