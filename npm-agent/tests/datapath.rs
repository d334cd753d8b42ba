//! Privileged datapath tests: the real eBPF programs on the running kernel.
//!
//! Most tests load the object unpinned, write map entries through aya's typed maps, craft
//! Ethernet frames and run the classifiers with `BPF_PROG_TEST_RUN` as if the packet crossed
//! interface 1 (`lo`, which exists in every namespace). Each test has its own maps.
//! `pinned_maps_are_adopted` uses a private bpffs directory; `attach_*` creates its own
//! network namespaces and veth pair. Everything is removed by guards, also on failure.
//! Requires root (CAP_BPF, CAP_NET_ADMIN); tests panic rather than skip.

use std::{
    fs,
    net::Ipv6Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType},
};
use npm_agent::datapath::{Datapath, TcMode};
use npm_common::{
    maps::{
        Addr16, CIDR_CLASS_BIT, CT_ORIGIN_LO, CT_PENDING, CT_SEEN_REPLY, CT_TCP_CLOSING,
        CT_TIMEOUT_TCP_CLOSING_NS, CT_TIMEOUT_TCP_ESTABLISHED_NS, CT_TIMEOUT_TCP_SYN_NS, CtKey,
        CtKey4, CtValue, DeferKey, DeferValue, EP_CLASS_EGRESS, EP_CLASS_INGRESS,
        EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, EVENT_DROP, EVENTS_BURST, EVENTS_PER_SEC,
        EndpointInfo, Event, EventStats, FragKey, FragValue, MAP_CIDRS, MAP_CLOCK, MAP_CONNTRACK,
        MAP_CONNTRACK4, MAP_DEFERRED, MAP_ENDPOINTS, MAP_EVENT_STATS, MAP_EVENTS, MAP_FLOWS,
        MAP_FRAGS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS, MAP_POLICY, MAP_SERVICES, MARK_DEFERRED,
        PAIR_TRIE, PEER_HOST, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
        PROG_BENCH_BUMP, PROG_BENCH_NEW, PROG_CLOCK, PROG_FROM_POD, PROG_HOST_EGRESS, PROG_PASS,
        PROG_TO_POD, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PairKey, PairPort,
        PairValue, PeerInfo, PolicyKey, PolicyValue, V4_MAPPED_PREFIX_LEN, addr_from_v4,
    },
    metrics::{COUNTER_STRIDE, MetricsValue, SLOT_UNMANAGED, counter_index},
    verdict::{
        DIR_EGRESS, DIR_INGRESS, REASON_DEFERRED, REASON_DROP_MALFORMED, REASON_DROP_POLICY,
        REASON_DROP_SPOOFED, REASON_DROP_UNKNOWN_SOURCE, REASON_ESTABLISHED, REASON_HOST,
        REASON_NOT_ISOLATED, REASON_NOT_MANAGED, REASON_POLICY_ALLOW, REASON_REPLY, REASON_SELF,
    },
};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;
/// `lo`: exists in every network namespace, as `BPF_PROG_TEST_RUN` requires.
const IFINDEX: u32 = 1;
const LOCAL_ID: u32 = 100;
/// The local pod's counter slot.
const SLOT: u32 = 5;
const PEER_ID: u32 = 200;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

/// The local pod (behind ifindex 1).
const POD: [u8; 4] = [10, 0, 0, 1];
/// A remote pod with identity `PEER_ID`.
const PEER: [u8; 4] = [10, 0, 0, 2];

fn v4(a: [u8; 4]) -> Addr16 {
    addr_from_v4(a)
}

fn v6(s: &str) -> Addr16 {
    s.parse::<Ipv6Addr>().expect("valid IPv6 literal").octets()
}

// ---------------------------------------------------------------------------------------
// Packet builders (checksums are irrelevant to the classifier)
// ---------------------------------------------------------------------------------------

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_frag(src, dst, proto, 0, l4)
}

fn ipv4_frag(src: [u8; 4], dst: [u8; 4], proto: u8, frag_off: u16, l4: &[u8]) -> Vec<u8> {
    ipv4_frag_id(src, dst, proto, frag_off, 1, l4)
}

/// IPv4 with identification `id` and `frag_off` (flags and offset, as on the wire: 0x2000
/// is "more fragments", the low 13 bits the offset in 8-byte units).
fn ipv4_frag_id(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    frag_off: u16,
    id: u16,
    l4: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).expect("small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&id.to_be_bytes());
    ip.extend_from_slice(&frag_off.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(l4);
    eth(0x0800, &ip)
}

/// IPv6 with the given extension headers (each `(type, bytes)`, bytes without next-header)
/// chained before the L4 header of protocol `proto`.
fn ipv6_ext(src: Addr16, dst: Addr16, ext: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(t, _)| *t);
        body.push(next);
        body.extend_from_slice(bytes);
    }
    body.extend_from_slice(l4);
    let first = ext.first().map_or(proto, |(t, _)| *t);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
    ip.extend_from_slice(&[first, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&body);
    eth(0x86dd, &ip)
}

fn ipv6(src: Addr16, dst: Addr16, proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_ext(src, dst, &[], proto, l4)
}

/// Hop-by-hop / dest-opts header of 8 bytes (length field 0, PadN option).
fn ext_opts8() -> Vec<u8> {
    vec![0, 1, 4, 0, 0, 0, 0]
}

/// Fragment header: offset in 8-byte units, more-fragments flag, identification 7.
fn ext_frag(offset: u16, more: bool) -> Vec<u8> {
    ext_frag_id(offset, more, 7)
}

/// Fragment header with identification `id`.
fn ext_frag_id(offset: u16, more: bool, id: u32) -> Vec<u8> {
    let v = (offset << 3) | u16::from(more);
    let mut b = vec![0];
    b.extend_from_slice(&v.to_be_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    b
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    u
}

fn sctp(sport: u16, dport: u16) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    s
}

fn icmp(ty: u8, id: u16) -> Vec<u8> {
    let mut i = vec![ty, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&[0, 1, 0xde, 0xad]);
    i
}

/// An ICMP or ICMPv6 error of type `ty` and code `code` (bytes 4..8: `mtu` as ICMP's
/// next-hop MTU or ICMPv6's MTU field) embedding `frame`'s IP packet (the Ethernet header
/// left off) cut to its first `keep` bytes, as a router or host sends it.
fn icmp_error(ty: u8, code: u8, mtu: u16, frame: &[u8], keep: usize) -> Vec<u8> {
    let mut e = vec![ty, code, 0, 0, 0, 0];
    e.extend_from_slice(&mtu.to_be_bytes());
    let ip = &frame[14..];
    e.extend_from_slice(&ip[..keep.min(ip.len())]);
    e
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct Env {
    dp: Datapath,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    identities: HashMap<MapData, Addr16, PeerInfo>,
    cidrs: LpmTrie<MapData, Addr16, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pairs: HashMap<MapData, PairKey, PairValue>,
    /// IPv6 flows.
    ct: HashMap<MapData, CtKey, CtValue>,
    /// IPv4 flows.
    ct4: HashMap<MapData, CtKey4, CtValue>,
    metrics: PerCpuArray<MapData, MetricsValue>,
    services: LpmTrie<MapData, Addr16, u32>,
    deferred: HashMap<MapData, DeferKey, DeferValue>,
    frags: HashMap<MapData, FragKey, FragValue>,
}

impl Env {
    fn new() -> Self {
        let mut dp = Datapath::load(None).expect("load the datapath (root required)");
        let mut take = |name: &str| dp.take_map(name).expect("map in object");
        let endpoints = HashMap::try_from(take(MAP_ENDPOINTS)).expect("endpoints map");
        let identities = HashMap::try_from(take(MAP_IDENTITIES)).expect("identities map");
        let cidrs = LpmTrie::try_from(take(MAP_CIDRS)).expect("cidrs map");
        let policy = LpmTrie::try_from(take(MAP_POLICY)).expect("policy map");
        let pairs = HashMap::try_from(take(MAP_PAIRS)).expect("pairs map");
        let ct = HashMap::try_from(take(MAP_CONNTRACK)).expect("conntrack map");
        let ct4 = HashMap::try_from(take(MAP_CONNTRACK4)).expect("IPv4 conntrack map");
        let metrics = PerCpuArray::try_from(take(MAP_METRICS)).expect("metrics map");
        let services = LpmTrie::try_from(take(MAP_SERVICES)).expect("services map");
        let deferred = HashMap::try_from(take(MAP_DEFERRED)).expect("deferred map");
        let frags = HashMap::try_from(take(MAP_FRAGS)).expect("fragments map");
        Self {
            dp,
            endpoints,
            identities,
            cidrs,
            policy,
            pairs,
            ct,
            ct4,
            metrics,
            services,
            deferred,
            frags,
        }
    }

    /// An endpoint (the local pod) at `IFINDEX` with `LOCAL_ID`, isolation `flags` and
    /// counter slot `SLOT`, and the pod's own addresses (`POD`, `POD6`) in IDENTITIES with
    /// that ifindex, as the compiler writes a placed pod's.
    fn endpoint(mut self, flags: u32) -> Self {
        self.endpoints
            .insert(
                IFINDEX,
                EndpointInfo {
                    id: LOCAL_ID,
                    flags,
                    slot: SLOT,
                },
                0,
            )
            .expect("insert endpoint");
        self.identity(v4(POD), LOCAL_ID, IFINDEX, 0);
        self.identity(v6(POD6), LOCAL_ID, IFINDEX, 0);
        self
    }

    fn identity(&mut self, addr: Addr16, id: u32, ifindex: u32, flags: u32) {
        self.identities
            .insert(
                addr,
                PeerInfo {
                    id,
                    ifindex,
                    flags,
                    class: 0,
                },
                0,
            )
            .expect("insert identity");
    }

    /// A remote pod address with identity `id` whose CIDR class (`PeerInfo::class`, what
    /// the compiler derives from CIDRS) is `class`.
    fn identity_in_class(&mut self, addr: Addr16, id: u32, class: u32) {
        self.identities
            .insert(
                addr,
                PeerInfo {
                    id,
                    ifindex: 0,
                    flags: 0,
                    class,
                },
                0,
            )
            .expect("insert identity");
    }

    fn cidr(&mut self, addr: Addr16, prefix: u32, class: u32) {
        self.cidrs
            .insert(&Key::new(prefix, addr), class, 0)
            .expect("insert cidr");
    }

    fn allow(&mut self, peer_id: u32, dir: u8, proto: u8, dport: u16, prefix: u32) {
        let key = PolicyKey {
            local_id: LOCAL_ID,
            peer_id,
            dir,
            proto,
            dport_be: dport.to_be(),
        };
        self.policy
            .insert(&Key::new(prefix, key), PolicyValue::default(), 0)
            .expect("insert policy");
        // The pair sends the datapath to the trie (the inline entries have tests of their
        // own), so these tests keep covering the POLICY walk.
        self.pair(
            peer_id,
            dir,
            PairValue {
                flags: PAIR_TRIE,
                ports: Default::default(),
            },
        );
    }

    /// Sets the PAIRS entry (LOCAL_ID, `peer_id`, `dir`).
    fn pair(&mut self, peer_id: u32, dir: u8, value: PairValue) {
        self.pairs
            .insert(pair_key(peer_id, dir), value, 0)
            .expect("insert pair");
    }

    /// Removes the PAIRS entry (LOCAL_ID, `peer_id`, `dir`): the peer is granted nothing.
    fn remove_pair(&mut self, peer_id: u32, dir: u8) {
        self.pairs
            .remove(&pair_key(peer_id, dir))
            .expect("remove pair");
    }

    fn run(&self, prog: &str, packet: &[u8]) -> u32 {
        self.dp
            .test_run(prog, packet, IFINDEX, 1)
            .expect("BPF_PROG_TEST_RUN")
            .retval
    }

    /// Runs `packet` through `prog` and asserts the verdict and that the counter for
    /// `{ifindex, dir, reason}` grew by one packet of `packet.len()` bytes.
    fn expect(&self, prog: &str, packet: &[u8], reason: u8, metric_ifindex: u32) {
        let dir = if prog == PROG_TO_POD {
            DIR_INGRESS
        } else {
            DIR_EGRESS
        };
        let before = self.counter(metric_ifindex, dir, reason);
        let retval = self.run(prog, packet);
        let want = if reason >= 128 {
            TC_ACT_SHOT
        } else {
            TC_ACT_PIPE
        };
        assert_eq!(
            retval, want,
            "{prog}: want reason {reason} (retval {want}), got retval {retval}"
        );
        let after = self.counter(metric_ifindex, dir, reason);
        let len = u64::try_from(packet.len()).expect("len");
        assert_eq!(
            (after.packets - before.packets, after.bytes - before.bytes),
            (1, len),
            "{prog}: counter {{ifindex {metric_ifindex}, dir {dir}, reason {reason}}}"
        );
    }

    fn pass(&self, prog: &str, packet: &[u8], reason: u8) {
        self.expect(prog, packet, reason, IFINDEX);
    }

    fn deny(&self, prog: &str, packet: &[u8], reason: u8) {
        self.expect(prog, packet, reason, IFINDEX);
    }

    /// The counter of the endpoint at `ifindex` (the slot its ENDPOINTS entry names; 0, the
    /// unmanaged slot, for 0 or an interface without an entry).
    fn counter(&self, ifindex: u32, dir: u8, reason: u8) -> MetricsValue {
        let slot = match self.endpoints.get(&ifindex, 0) {
            Ok(ep) if ifindex != 0 => ep.slot,
            _ => SLOT_UNMANAGED,
        };
        self.slot_counter(slot, dir, reason)
    }

    fn slot_counter(&self, slot: u32, dir: u8, reason: u8) -> MetricsValue {
        match self.metrics.get(&counter_index(slot, dir, reason), 0) {
            Ok(values) => values
                .iter()
                .fold(MetricsValue::default(), |acc, v| MetricsValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                }),
            Err(e) => panic!("reading metrics: {e}"),
        }
    }

    /// The entry of flow `key`, from the map of its family (`NPM_CT4` for IPv4 flows).
    fn ct_entry(&self, key: &CtKey) -> Option<CtValue> {
        let got = match key.to_v4() {
            Some(k4) => self.ct4.get(&k4, 0),
            None => self.ct.get(key, 0),
        };
        match got {
            Ok(v) => Some(v),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("reading conntrack: {e}"),
        }
    }

    /// Writes the entry of flow `key` into the map of its family (and invalidates the flow
    /// cache, as every userspace writer of conntrack entries must).
    fn ct_insert(&mut self, key: CtKey, value: CtValue) {
        match key.to_v4() {
            Some(k4) => self.ct4.insert(k4, value, 0),
            None => self.ct.insert(key, value, 0),
        }
        .expect("insert ct");
        self.dp
            .invalidate_flow_cache()
            .expect("invalidate the flow cache");
    }

    /// Removes the entry of flow `key` *without* invalidating the flow cache: what the
    /// kernel's LRU eviction does.
    fn ct_evict(&mut self, key: &CtKey) {
        match key.to_v4() {
            Some(k4) => self.ct4.remove(&k4),
            None => self.ct.remove(key),
        }
        .expect("remove ct");
    }

    /// Entries of both conntrack maps: (IPv4, IPv6).
    fn ct_lens(&self) -> (usize, usize) {
        (
            self.ct4.keys().take(10_000).count(),
            self.ct.keys().take(10_000).count(),
        )
    }

    fn ct_len(&self) -> usize {
        let (v4, v6) = self.ct_lens();
        v4 + v6
    }
}

/// The PAIRS key of (LOCAL_ID, `peer_id`, `dir`).
fn pair_key(peer_id: u32, dir: u8) -> PairKey {
    PairKey {
        local_id: LOCAL_ID,
        peer_id,
        dir,
        _pad: [0; 3],
    }
}

/// The conntrack key the datapath builds (pairs sorted by address bytes, then port).
fn ct_key(src: Addr16, sport: u16, dst: Addr16, dport: u16, proto: u8) -> (CtKey, bool) {
    let src_is_lo = (src, sport) <= (dst, dport);
    let ((addr_lo, port_lo), (addr_hi, port_hi)) = if src_is_lo {
        ((src, sport), (dst, dport))
    } else {
        ((dst, dport), (src, sport))
    };
    (
        CtKey {
            addr_lo,
            addr_hi,
            ifindex: IFINDEX,
            port_lo_be: port_lo.to_be(),
            port_hi_be: port_hi.to_be(),
            proto,
            _pad: [0; 3],
        },
        src_is_lo,
    )
}

// ---------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------

#[test]
fn unmanaged_ifindex_passes() {
    let env = Env::new();
    let p = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.expect(PROG_TO_POD, &p, REASON_NOT_MANAGED, 0);
    let p = ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.expect(PROG_FROM_POD, &p, REASON_NOT_MANAGED, 0);
    assert_eq!(env.ct_len(), 0, "unmanaged traffic is not tracked");
}

#[test]
fn not_isolated_passes_and_is_tracked() {
    let env = Env::new().endpoint(0);
    let p = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.pass(PROG_TO_POD, &p, REASON_NOT_ISOLATED);
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let ct = env.ct_entry(&key).expect("allowed packet creates an entry");
    assert_eq!(ct.origin_dir, DIR_INGRESS);
    // Egress isolation only: ingress still passes, egress new flows drop.
    let env = Env::new().endpoint(EP_ISOLATE_EGRESS);
    env.pass(PROG_TO_POD, &p, REASON_NOT_ISOLATED);
    let p = ipv4(POD, PEER, PROTO_UDP, &udp(5000, 53));
    env.deny(PROG_FROM_POD, &p, REASON_DROP_POLICY);
}

#[test]
fn non_ip_passes_on_managed_isolated_endpoint() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    let arp = eth(
        0x0806,
        &[0, 1, 8, 0, 6, 4, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2],
    );
    env.pass(PROG_TO_POD, &arp, REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &arp, REASON_NOT_MANAGED);
}

// ---------------------------------------------------------------------------------------
// IPv6 link control: neighbour and router discovery, MLD
// ---------------------------------------------------------------------------------------

/// The local pod's IPv6 addresses in the link-control tests.
const POD6: &str = "fd00::1";
const POD6_LL: &str = "fe80::1";
/// The gateway's (the node side of the veth) link-local address.
const GW6_LL: &str = "fe80::2";
/// The solicited-node multicast group of fd00::1 (RFC 4291 §2.7.1).
const SOLICITED: &str = "ff02::1:ff00:1";

/// `packet` (Ethernet + IPv6) with its hop limit set to `hops`.
fn hop_limit(mut packet: Vec<u8>, hops: u8) -> Vec<u8> {
    if let Some(b) = packet.get_mut(14 + 7) {
        *b = hops;
    }
    packet
}

/// An ND message (RFC 4861 §4): type, code 0, checksum, 4 bytes of flags/reserved, and
/// (for types other than 133/134) the target address.
fn nd(ty: u8, target: Addr16) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target);
    m
}

/// An MLDv2 report (RFC 3810 §5.2) with no records, or any MLD message of type `ty` with
/// a 20-byte body.
fn mld(ty: u8) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&[0; 16]);
    m
}

/// Hop-by-hop header with the Router Alert option (RFC 2711, value 0: MLD), as every MLD
/// message carries.
fn ext_router_alert() -> Vec<u8> {
    vec![0, 5, 2, 0, 0, 1, 0]
}

/// An ND message of type `ty` from `src` to `dst` with hop limit `hops`.
fn nd_packet(src: &str, dst: &str, ty: u8, hops: u8) -> Vec<u8> {
    hop_limit(
        ipv6(v6(src), v6(dst), PROTO_ICMPV6, &nd(ty, v6(POD6))),
        hops,
    )
}

/// An MLD message of type `ty` from `src` to `dst` (Router Alert) with hop limit `hops`.
fn mld_packet(src: &str, dst: &str, ty: u8, hops: u8) -> Vec<u8> {
    let ext = [(0u8, ext_router_alert())];
    hop_limit(
        ipv6_ext(v6(src), v6(dst), &ext, PROTO_ICMPV6, &mld(ty)),
        hops,
    )
}

#[test]
fn neighbour_discovery_with_hop_limit_255_passes_an_isolated_endpoint_untracked() {
    // Isolated both ways, no allow rule, no IDENTITIES entry for any address involved.
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    // (a) Address resolution of the gateway: NS to the solicited-node group.
    env.pass(
        PROG_FROM_POD,
        &nd_packet(POD6, SOLICITED, 135, 255),
        REASON_NOT_MANAGED,
    );
    // (b) The answer, and a unicast NA (NUD) from a same-link peer's global address.
    env.pass(
        PROG_TO_POD,
        &nd_packet(GW6_LL, POD6, 136, 255),
        REASON_NOT_MANAGED,
    );
    env.pass(
        PROG_TO_POD,
        &nd_packet("fd00::2", POD6, 136, 255),
        REASON_NOT_MANAGED,
    );
    // Every ND and RD type, both directions (RS to all-routers, RA to all-nodes, NS, NA,
    // redirect): RFC 4861 gives them all hop limit 255.
    for ty in 133..=137 {
        env.pass(
            PROG_FROM_POD,
            &nd_packet(POD6_LL, "ff02::2", ty, 255),
            REASON_NOT_MANAGED,
        );
        env.pass(
            PROG_TO_POD,
            &nd_packet(GW6_LL, "ff02::1", ty, 255),
            REASON_NOT_MANAGED,
        );
    }
    // DAD: NS from the unspecified address.
    env.pass(
        PROG_FROM_POD,
        &nd_packet("::", SOLICITED, 135, 255),
        REASON_NOT_MANAGED,
    );
    assert_eq!(
        env.ct_lens(),
        (0, 0),
        "link control creates no conntrack entry"
    );
}

#[test]
fn neighbour_discovery_with_another_hop_limit_is_policed() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    // (c) The same NS with hop limit 64: a receiver would discard it as ND, so it is data.
    env.deny(
        PROG_FROM_POD,
        &nd_packet(POD6, SOLICITED, 135, 64),
        REASON_DROP_POLICY,
    );
    // An NA that crossed a router (255 decremented): off-link, policed.
    env.deny(
        PROG_TO_POD,
        &nd_packet(GW6_LL, POD6, 136, 254),
        REASON_DROP_POLICY,
    );
    for ty in 133..=137 {
        env.deny(
            PROG_TO_POD,
            &nd_packet(GW6_LL, "ff02::1", ty, 1),
            REASON_DROP_POLICY,
        );
    }
    // (d) Other ICMPv6 to the solicited-node group, even at hop limit 255: an echo request,
    // and the types just outside the ND range (MLD-typed at 255 is not MLD either).
    env.deny(
        PROG_FROM_POD,
        &hop_limit(
            ipv6(v6(POD6), v6(SOLICITED), PROTO_ICMPV6, &icmp(128, 7)),
            255,
        ),
        REASON_DROP_POLICY,
    );
    for ty in [132, 138, 143] {
        env.deny(
            PROG_FROM_POD,
            &nd_packet(POD6, SOLICITED, ty, 255),
            REASON_DROP_POLICY,
        );
    }
    // The ND type numbers over IPv4 (protocol 58, TTL 255) are not ND.
    let mut v4_nd = ipv4(POD, PEER, PROTO_ICMPV6, &nd(135, v6(POD6)));
    if let Some(ttl) = v4_nd.get_mut(14 + 8) {
        *ttl = 255;
    }
    env.deny(PROG_FROM_POD, &v4_nd, REASON_DROP_POLICY);
    assert_eq!(env.ct_lens(), (0, 0));
}

#[test]
fn mld_with_hop_limit_1_from_a_link_local_source_passes_an_isolated_endpoint() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    // (e) An MLDv2 report to ff02::16 from the pod's link-local address, hop limit 1.
    env.pass(
        PROG_FROM_POD,
        &mld_packet(POD6_LL, "ff02::16", 143, 1),
        REASON_NOT_MANAGED,
    );
    // Before the pod has a link-local address: from :: (RFC 3810 §5.2.13).
    env.pass(
        PROG_FROM_POD,
        &mld_packet("::", "ff02::16", 143, 1),
        REASON_NOT_MANAGED,
    );
    // MLDv1 report and done, and a query from the gateway (fe80::/10 is wider than fe80::/64).
    env.pass(
        PROG_FROM_POD,
        &mld_packet(POD6_LL, SOLICITED, 131, 1),
        REASON_NOT_MANAGED,
    );
    env.pass(
        PROG_FROM_POD,
        &mld_packet(POD6_LL, "ff02::2", 132, 1),
        REASON_NOT_MANAGED,
    );
    env.pass(
        PROG_TO_POD,
        &mld_packet(GW6_LL, "ff02::1", 130, 1),
        REASON_NOT_MANAGED,
    );
    env.pass(
        PROG_TO_POD,
        &mld_packet("febf::1", "ff02::1", 130, 1),
        REASON_NOT_MANAGED,
    );
    // The same report with hop limit 64, or from a global or a non-link-local address.
    env.deny(
        PROG_FROM_POD,
        &mld_packet(POD6_LL, "ff02::16", 143, 64),
        REASON_DROP_POLICY,
    );
    env.deny(
        PROG_FROM_POD,
        &mld_packet(POD6, "ff02::16", 143, 1),
        REASON_DROP_POLICY,
    );
    env.deny(
        PROG_TO_POD,
        &mld_packet("fec0::1", "ff02::1", 130, 1),
        REASON_DROP_POLICY,
    );
    assert_eq!(env.ct_lens(), (0, 0));
}

#[test]
fn link_control_is_not_tracked_in_a_direction_that_is_not_isolated() {
    let env = Env::new().endpoint(0);
    env.pass(
        PROG_FROM_POD,
        &nd_packet(POD6, SOLICITED, 135, 255),
        REASON_NOT_MANAGED,
    );
    env.pass(
        PROG_TO_POD,
        &mld_packet(GW6_LL, "ff02::1", 130, 1),
        REASON_NOT_MANAGED,
    );
    // The NS with another hop limit is ordinary ICMPv6: not isolated, passed (and, as any
    // ICMPv6 that is not an echo, never tracked).
    env.pass(
        PROG_FROM_POD,
        &nd_packet(POD6, SOLICITED, 135, 64),
        REASON_NOT_ISOLATED,
    );
    assert_eq!(env.ct_lens(), (0, 0));
}

// ---------------------------------------------------------------------------------------
// Source spoofing: a new flow's pod-side address must be the pod's
// ---------------------------------------------------------------------------------------

/// The node's address (IDENTITIES: `PEER_HOST`).
const NODE: [u8; 4] = [10, 0, 0, 254];
const NODE6: &str = "fd00::fe";
/// The node's link-local address on some interface (node addresses include them).
const NODE6_LL: &str = "fe80::fe";
/// Another local pod, behind `OTHER_IF`.
const OTHER: [u8; 4] = [10, 0, 0, 3];
const OTHER6: &str = "fd00::3";
const OTHER_IF: u32 = 7;
const OTHER_ID: u32 = 300;
/// An address IDENTITIES does not know.
const STRANGER: [u8; 4] = [192, 168, 9, 9];

/// The addresses of the spoofing tests: the node's, another local pod's (`OTHER_IF`), and
/// a remote pod (`PEER`, ifindex 0).
fn spoof_env(flags: u32) -> Env {
    let mut env = Env::new().endpoint(flags);
    env.identity(v4(NODE), 0, 0, PEER_HOST);
    env.identity(v6(NODE6), 0, 0, PEER_HOST);
    env.identity(v6(NODE6_LL), 0, 0, PEER_HOST);
    env.identity(v4(OTHER), OTHER_ID, OTHER_IF, 0);
    env.identity(v6(OTHER6), OTHER_ID, OTHER_IF, 0);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.identity(v6("fd00::2"), PEER_ID, 0, 0);
    env
}

#[test]
fn a_pod_sends_only_from_its_own_addresses() {
    // Not isolated at all: the check does not depend on policy.
    let env = spoof_env(0);
    // Its own IPv4 and IPv6 addresses pass (and are tracked), to a pod, the node, anywhere.
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_NOT_ISOLATED,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, NODE, PROTO_UDP, &udp(40001, 53)),
        REASON_NOT_ISOLATED,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv6(v6(POD6), v6("2001:db8::1"), PROTO_UDP, &udp(40002, 53)),
        REASON_NOT_ISOLATED,
    );
    assert_eq!(env.ct_lens(), (2, 1));
    // The node's addresses, another local pod's, a remote pod's, one nobody has: dropped,
    // counted as spoofed under this endpoint's slot, nothing tracked.
    for src in [NODE, OTHER, PEER, STRANGER, [0, 0, 0, 0]] {
        env.deny(
            PROG_FROM_POD,
            &ipv4(src, [10, 0, 0, 9], PROTO_UDP, &udp(40003, 53)),
            REASON_DROP_SPOOFED,
        );
        env.deny(
            PROG_FROM_POD,
            &ipv4(src, POD, PROTO_TCP, &tcp(40004, 80, TCP_SYN)),
            REASON_DROP_SPOOFED,
        );
    }
    for src in [NODE6, OTHER6, "fd00::2", "2001:db8::77", "::"] {
        env.deny(
            PROG_FROM_POD,
            &ipv6(v6(src), v6("fd00::9"), PROTO_TCP, &tcp(40005, 80, TCP_SYN)),
            REASON_DROP_SPOOFED,
        );
    }
    assert_eq!(env.ct_lens(), (2, 1), "a spoofed packet creates no entry");
    // The receiver's view of the node address: an isolated endpoint would pass it as host.
    let env = spoof_env(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.deny(
        PROG_FROM_POD,
        &ipv4(NODE, PEER, PROTO_TCP, &tcp(40006, 80, TCP_SYN)),
        REASON_DROP_SPOOFED,
    );
}

#[test]
fn the_loser_of_a_shared_address_may_not_send_from_it() {
    // Two local pods claim 10.0.0.8; the compiler gives it to the one behind OTHER_IF.
    use npm_agent::compiler::{IdAllocator, compile};
    use npm_agent::model::{Namespace, ObjRef, Pod};
    use npm_agent::state::ClusterSnapshot;
    let mut s = ClusterSnapshot {
        node_name: Some("node".into()),
        ..Default::default()
    };
    s.namespaces.insert(
        "a".into(),
        Namespace {
            name: "a".into(),
            labels: Default::default(),
        },
    );
    let pod = |name: &str, ips: &[&str]| Pod {
        namespace: "a".into(),
        name: name.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        node_name: Some("node".into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    };
    // "a/first" sorts first and owns the shared address; "a/second" is dual-stack.
    for p in [
        pod("first", &["10.0.0.8"]),
        pod("second", &["10.0.0.8", "10.0.0.1", "fd00::1"]),
    ] {
        s.pods.insert(p.obj_ref(), p);
    }
    s.local.insert(ObjRef::new("a", "first"), OTHER_IF);
    s.local.insert(ObjRef::new("a", "second"), IFINDEX);
    let maps = compile(&s, &mut IdAllocator::default()).maps;
    let mut env = Env::new();
    for (k, v) in &maps.endpoints {
        env.endpoints.insert(*k, *v, 0).expect("endpoint");
    }
    for (k, v) in &maps.identities {
        env.identities.insert(*k, *v, 0).expect("identity");
    }
    // The compiler wrote both of the second pod's own addresses with its ifindex...
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_UDP, &udp(1000, 53)),
        REASON_NOT_ISOLATED,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv6(v6("fd00::1"), v6("fd00::2"), PROTO_UDP, &udp(1001, 53)),
        REASON_NOT_ISOLATED,
    );
    // ... and the shared one with the owner's.
    env.deny(
        PROG_FROM_POD,
        &ipv4([10, 0, 0, 8], PEER, PROTO_UDP, &udp(1002, 53)),
        REASON_DROP_SPOOFED,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, [10, 0, 0, 8], PROTO_UDP, &udp(1003, 53)),
        REASON_DROP_SPOOFED,
    );
}

#[test]
fn a_pod_receives_new_flows_only_for_its_own_or_unknown_addresses() {
    let env = spoof_env(0);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_NOT_ISOLATED,
    );
    env.pass(
        PROG_TO_POD,
        &ipv6(v6("fd00::2"), v6(POD6), PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_NOT_ISOLATED,
    );
    // Hairpin traffic the node masqueraded: from the node to the pod itself.
    env.pass(
        PROG_TO_POD,
        &ipv4(NODE, POD, PROTO_TCP, &tcp(40001, 80, TCP_SYN)),
        REASON_NOT_ISOLATED,
    );
    // Broadcast and multicast (no IDENTITIES entry) are left to the policy.
    for dst in [[255, 255, 255, 255], [10, 0, 0, 255], [224, 0, 0, 251]] {
        env.pass(
            PROG_TO_POD,
            &ipv4(PEER, dst, PROTO_UDP, &udp(5353, 5353)),
            REASON_NOT_ISOLATED,
        );
    }
    let before = env.ct_lens();
    // Traffic for another local pod, a remote pod or the node delivered to this interface
    // (stolen at L2): dropped before it can create conntrack state.
    for dst in [OTHER, PEER, NODE] {
        env.deny(
            PROG_TO_POD,
            &ipv4([10, 0, 0, 9], dst, PROTO_TCP, &tcp(40002, 80, TCP_SYN)),
            REASON_DROP_SPOOFED,
        );
    }
    env.deny(
        PROG_TO_POD,
        &ipv6(
            v6("fd00::9"),
            v6(OTHER6),
            PROTO_TCP,
            &tcp(40002, 80, TCP_SYN),
        ),
        REASON_DROP_SPOOFED,
    );
    assert_eq!(env.ct_lens(), before);
}

#[test]
fn established_and_reply_packets_skip_the_source_check() {
    let env = spoof_env(EP_ISOLATE_EGRESS);
    // A datagram to this interface for an address nobody has (a subnet broadcast) creates
    // an entry at this ifindex; the pod's answer from that address is its reply. The check
    // ran on the packet that created the entry: the destination was no other interface's.
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, [10, 0, 0, 255], PROTO_UDP, &udp(6000, 7000)),
        REASON_NOT_ISOLATED,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4([10, 0, 0, 255], PEER, PROTO_UDP, &udp(7000, 6000)),
        REASON_REPLY,
    );
    // A new flow from that address is not a reply: dropped.
    env.deny(
        PROG_FROM_POD,
        &ipv4([10, 0, 0, 255], PEER, PROTO_UDP, &udp(7001, 6000)),
        REASON_DROP_SPOOFED,
    );
}

#[test]
fn a_pending_endpoint_may_not_use_a_placed_pods_or_the_nodes_address() {
    let mut env = spoof_env(0);
    // The interface is pending: its pod is not placed, so no address carries its ifindex,
    // and its own pod's address (if the API already gave it one) is in IDENTITIES with
    // ifindex 0, as every remote pod's.
    env.endpoints
        .insert(
            IFINDEX,
            EndpointInfo {
                id: npm_common::maps::ID_PENDING,
                flags: 0,
                slot: SLOT,
            },
            0,
        )
        .expect("pending endpoint");
    env.identities.remove(&v4(POD)).expect("remove");
    env.identities.remove(&v6(POD6)).expect("remove");
    for src in [PEER, STRANGER] {
        env.pass(
            PROG_FROM_POD,
            &ipv4(src, [10, 0, 0, 9], PROTO_UDP, &udp(1000, 53)),
            REASON_NOT_ISOLATED,
        );
    }
    for src in [NODE, OTHER] {
        env.deny(
            PROG_FROM_POD,
            &ipv4(src, [10, 0, 0, 9], PROTO_UDP, &udp(1000, 53)),
            REASON_DROP_SPOOFED,
        );
    }
    env.deny(
        PROG_FROM_POD,
        &ipv6(v6(OTHER6), v6("fd00::9"), PROTO_UDP, &udp(1000, 53)),
        REASON_DROP_SPOOFED,
    );
    // Entering: for its (maybe) own pod's or an unknown address, yes; another local pod's or
    // the node's, no.
    env.pass(
        PROG_TO_POD,
        &ipv4([10, 0, 0, 9], PEER, PROTO_UDP, &udp(1001, 53)),
        REASON_NOT_ISOLATED,
    );
    for dst in [NODE, OTHER] {
        env.deny(
            PROG_TO_POD,
            &ipv4([10, 0, 0, 9], dst, PROTO_UDP, &udp(1001, 53)),
            REASON_DROP_SPOOFED,
        );
    }
}

#[test]
fn ipv6_link_local_sources_pass_only_within_the_link() {
    let env = spoof_env(0);
    // To a link-local or multicast destination (mDNS, LLMNR, a same-link peer): passes.
    for dst in ["ff02::fb", "ff02::1:3", "ff05::2", GW6_LL] {
        env.pass(
            PROG_FROM_POD,
            &ipv6(v6(POD6_LL), v6(dst), PROTO_UDP, &udp(5353, 5353)),
            REASON_NOT_ISOLATED,
        );
    }
    env.pass(
        PROG_FROM_POD,
        &ipv6(v6("febf::1"), v6(GW6_LL), PROTO_ICMPV6, &icmp(128, 1)),
        REASON_NOT_ISOLATED,
    );
    // To a global address, a unique-local one or the node's: not the pod's address.
    for dst in ["2001:db8::1", "fd00::2", NODE6] {
        env.deny(
            PROG_FROM_POD,
            &ipv6(v6(POD6_LL), v6(dst), PROTO_UDP, &udp(5353, 5353)),
            REASON_DROP_SPOOFED,
        );
    }
    // fec0::/10 is not link-local.
    env.deny(
        PROG_FROM_POD,
        &ipv6(v6("fec0::1"), v6("ff02::fb"), PROTO_UDP, &udp(5353, 5353)),
        REASON_DROP_SPOOFED,
    );
    // The node's own link-local address is a known address of something else.
    env.deny(
        PROG_FROM_POD,
        &ipv6(v6(NODE6_LL), v6("ff02::fb"), PROTO_UDP, &udp(5353, 5353)),
        REASON_DROP_SPOOFED,
    );
}

/// An ARP packet (IPv4 over Ethernet) of operation `op` with sender address `spa`.
fn arp(op: u8, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, op, 0x02, 0, 0, 0, 0, 0x01];
    a.extend_from_slice(&spa);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa);
    eth(0x0806, &a)
}

#[test]
fn arp_leaving_a_pod_may_not_claim_another_pods_or_the_nodes_address() {
    let env = spoof_env(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    // Requests and replies for its own address, and a probe from 0.0.0.0: pass.
    env.pass(PROG_FROM_POD, &arp(1, POD, NODE), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &arp(2, POD, NODE), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &arp(1, [0; 4], POD), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &arp(1, STRANGER, NODE), REASON_NOT_MANAGED);
    // Gratuitous ARP or a reply claiming the node's or another pod's address: dropped.
    for spa in [NODE, OTHER, PEER] {
        env.deny(PROG_FROM_POD, &arp(2, spa, spa), REASON_DROP_SPOOFED);
        env.deny(PROG_FROM_POD, &arp(1, spa, POD), REASON_DROP_SPOOFED);
    }
    // Entering the pod, the node answers for its own address: not checked.
    env.pass(PROG_TO_POD, &arp(2, NODE, POD), REASON_NOT_MANAGED);
    // A truncated ARP packet is not read (its receivers discard it).
    let short = arp(2, NODE, NODE);
    env.pass(PROG_FROM_POD, &short[..14 + 20], REASON_NOT_MANAGED);
}

#[test]
fn neighbour_discovery_leaving_a_pod_may_not_claim_another_pods_or_the_nodes_address() {
    let env = spoof_env(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    let na = |src: &str, target: &str| {
        hop_limit(
            ipv6(v6(src), v6("ff02::1"), PROTO_ICMPV6, &nd(136, v6(target))),
            255,
        )
    };
    let ns = |src: &str, target: &str| {
        hop_limit(
            ipv6(v6(src), v6(SOLICITED), PROTO_ICMPV6, &nd(135, v6(target))),
            255,
        )
    };
    // Its own addresses, DAD from ::, a solicitation for anyone's address: pass.
    env.pass(PROG_FROM_POD, &na(POD6_LL, POD6), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &na(POD6, POD6_LL), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &ns(POD6, NODE6), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &ns("::", POD6), REASON_NOT_MANAGED);
    env.pass(PROG_FROM_POD, &ns(POD6_LL, OTHER6), REASON_NOT_MANAGED);
    // An advertisement for another pod's or the node's address, whatever its source, and a
    // solicitation from one (its receivers learn the source's link-layer address): dropped.
    for claimed in [OTHER6, NODE6, NODE6_LL, "fd00::2"] {
        env.deny(PROG_FROM_POD, &na(POD6_LL, claimed), REASON_DROP_SPOOFED);
        env.deny(PROG_FROM_POD, &ns(claimed, POD6), REASON_DROP_SPOOFED);
    }
    // Entering the pod, the node advertises its own address: not checked.
    env.pass(
        PROG_TO_POD,
        &hop_limit(
            ipv6(v6(NODE6_LL), v6(POD6), PROTO_ICMPV6, &nd(136, v6(NODE6))),
            255,
        ),
        REASON_NOT_MANAGED,
    );
    assert_eq!(env.ct_lens(), (0, 0));
}

#[test]
fn isolated_without_entry_drops_and_creates_no_entry() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    let p = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.deny(PROG_TO_POD, &p, REASON_DROP_POLICY);
    assert_eq!(
        env.ct_len(),
        0,
        "a denied packet creates no conntrack entry"
    );
}

#[test]
fn a_policy_entry_without_its_pair_allows_nothing() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let syn = |sport| ipv4(PEER, POD, PROTO_TCP, &tcp(sport, 80, TCP_SYN));
    env.pass(PROG_TO_POD, &syn(40100), REASON_POLICY_ALLOW);
    // The datapath asks PAIRS first: without the pair the trie entry is never reached.
    env.remove_pair(PEER_ID, DIR_INGRESS);
    env.deny(PROG_TO_POD, &syn(40101), REASON_DROP_POLICY);
}

#[test]
fn inline_pair_entries_decide_without_the_trie() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    let port = |prefix_len: u32, proto, port| PairPort {
        prefix_len: u8::try_from(prefix_len).expect("prefix"),
        proto,
        port,
    };
    // TCP 80 exactly, UDP 1000-1003 (one 4-port block: 14 of 16 port bits fixed), every
    // SCTP port, one unused slot. No POLICY entry at all.
    env.pair(
        PEER_ID,
        DIR_INGRESS,
        PairValue {
            flags: 0,
            ports: [
                port(POLICY_PREFIX_FULL, PROTO_TCP, 80),
                port(POLICY_PREFIX_ANY_PORT + 14, PROTO_UDP, 1000),
                port(POLICY_PREFIX_ANY_PORT, PROTO_SCTP, 0),
                PairPort::default(),
            ],
        },
    );
    let tcp_to = |p| ipv4(PEER, POD, PROTO_TCP, &tcp(40200 + p, p, TCP_SYN));
    let udp_to = |p| ipv4(PEER, POD, PROTO_UDP, &udp(40300 + p, p));
    env.pass(PROG_TO_POD, &tcp_to(80), REASON_POLICY_ALLOW);
    env.deny(PROG_TO_POD, &tcp_to(81), REASON_DROP_POLICY);
    for p in 1000..=1003 {
        env.pass(PROG_TO_POD, &udp_to(p), REASON_POLICY_ALLOW);
    }
    env.deny(PROG_TO_POD, &udp_to(999), REASON_DROP_POLICY);
    env.deny(PROG_TO_POD, &udp_to(1004), REASON_DROP_POLICY);
    // UDP 80 is not TCP 80.
    env.deny(PROG_TO_POD, &udp_to(80), REASON_DROP_POLICY);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_SCTP, &sctp(5000, 36412)),
        REASON_POLICY_ALLOW,
    );
    // The unused slot (prefix 0) matches nothing: ICMP has no entry.
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 9)),
        REASON_DROP_POLICY,
    );
    // An any-protocol entry allows it.
    env.pair(
        PEER_ID,
        DIR_INGRESS,
        PairValue {
            flags: 0,
            ports: [
                port(POLICY_PREFIX_ANY_PROTO, 0, 0),
                PairPort::default(),
                PairPort::default(),
                PairPort::default(),
            ],
        },
    );
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 10)),
        REASON_POLICY_ALLOW,
    );
    // PAIR_TRIE: the inline slots are ignored and the (empty) trie decides.
    env.pair(
        PEER_ID,
        DIR_INGRESS,
        PairValue {
            flags: PAIR_TRIE,
            ports: [port(POLICY_PREFIX_ANY_PROTO, 0, 0); 4],
        },
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 11)),
        REASON_DROP_POLICY,
    );
}

#[test]
fn allow_by_pod_identity_exact_port() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40001, 81, TCP_SYN)),
        REASON_DROP_POLICY,
    );
    // Same port, UDP: not allowed.
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_UDP, &udp(40002, 80)),
        REASON_DROP_POLICY,
    );
    // The ingress entry does not allow egress to the same peer and port.
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(40003, 80, TCP_SYN)),
        REASON_DROP_POLICY,
    );
    // An unknown peer without CIDR class is dropped.
    env.deny(
        PROG_TO_POD,
        &ipv4([10, 0, 0, 3], POD, PROTO_TCP, &tcp(40004, 80, TCP_SYN)),
        REASON_DROP_POLICY,
    );
}

#[test]
fn cidr_classes_are_looked_up_only_with_the_class_flag() {
    // Class entries for ingress exist, but the endpoint says it has no ingress class rules:
    // the CIDRS lookup is skipped and the SYN is dropped. With EP_CLASS_INGRESS it passes.
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_CLASS_EGRESS);
    let class = CIDR_CLASS_BIT | 1;
    env.cidr(v4([192, 168, 0, 0]), V4_MAPPED_PREFIX_LEN + 16, class);
    env.allow(class, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let syn = ipv4([192, 168, 3, 3], POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.deny(PROG_TO_POD, &syn, REASON_DROP_POLICY);
    let env = env.endpoint(EP_ISOLATE_INGRESS | EP_CLASS_INGRESS);
    env.pass(PROG_TO_POD, &syn, REASON_POLICY_ALLOW);
    // The pod-identity path does not depend on the flag.
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40001, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
}

#[test]
fn ipv4_flows_are_tracked_in_ct4_and_ipv6_flows_in_ct() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let peer6 = v6("fd00::2");
    // Written as IPv4-mapped IPv6 addresses, 10.0.0.2 and 10.0.0.1 are the same peer and pod.
    let (mapped_peer, mapped_pod) = (v4(PEER), v4(POD));
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.identity(peer6, PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);

    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    assert_eq!(env.ct_lens(), (1, 0), "an IPv4 flow goes to NPM_CT4 only");
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let key4 = key.to_v4().expect("IPv4 flow");
    assert!(env.ct4.get(&key4, 0).is_ok(), "under its 20-byte key");
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(80, 40000, TCP_SYN | TCP_ACK)),
        REASON_REPLY,
    );

    env.pass(
        PROG_TO_POD,
        &ipv6(peer6, v6("fd00::1"), PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    assert_eq!(env.ct_lens(), (1, 1), "an IPv6 flow goes to NPM_CT");
    env.pass(
        PROG_FROM_POD,
        &ipv6(
            v6("fd00::1"),
            peer6,
            PROTO_TCP,
            &tcp(80, 40000, TCP_SYN | TCP_ACK),
        ),
        REASON_REPLY,
    );

    // An IPv6 packet whose two addresses are IPv4-mapped is the IPv4 flow's key (CtKey::to_v4):
    // its ACK finds the IPv4 SYN's entry.
    env.pass(
        PROG_TO_POD,
        &ipv6(mapped_peer, mapped_pod, PROTO_TCP, &tcp(40000, 80, TCP_ACK)),
        REASON_ESTABLISHED,
    );
    assert_eq!(env.ct_lens(), (1, 1), "and creates nothing");
}

#[test]
fn conntrack_hit_counts_under_the_slot_the_entry_holds() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let entry = env.ct_entry(&key).expect("tracked");
    assert_eq!(
        u32::from(entry.slot),
        SLOT,
        "the entry holds the endpoint's slot"
    );
    // The established path reads no ENDPOINTS entry: with the endpoint's slot changed behind
    // its back, the ACK still counts under the slot of the entry.
    env.endpoints
        .insert(
            IFINDEX,
            EndpointInfo {
                id: LOCAL_ID,
                flags: EP_ISOLATE_INGRESS,
                slot: SLOT + 1,
            },
            0,
        )
        .expect("endpoint");
    let ack = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_ACK));
    let before = env.slot_counter(SLOT, DIR_INGRESS, REASON_ESTABLISHED);
    assert_eq!(env.run(PROG_TO_POD, &ack), TC_ACT_PIPE);
    let after = env.slot_counter(SLOT, DIR_INGRESS, REASON_ESTABLISHED);
    assert_eq!(after.packets - before.packets, 1);
    assert_eq!(
        env.slot_counter(SLOT + 1, DIR_INGRESS, REASON_ESTABLISHED),
        MetricsValue::default()
    );
}

#[test]
fn allow_by_cidr_class() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS | EP_CLASS_EGRESS);
    let class = CIDR_CLASS_BIT | 1;
    // 192.168.0.0/16 → class 1
    env.cidr(v4([192, 168, 0, 0]), V4_MAPPED_PREFIX_LEN + 16, class);
    env.allow(class, DIR_EGRESS, PROTO_UDP, 53, POLICY_PREFIX_FULL);
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, [192, 168, 7, 9], PROTO_UDP, &udp(5353, 53)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, [192, 169, 0, 1], PROTO_UDP, &udp(5354, 53)),
        REASON_DROP_POLICY,
    );
    // A known address (in IDENTITIES) whose identity has no entry falls back to the CIDR
    // class its IDENTITIES entry carries; the CIDRS trie is not consulted for it: without the
    // class in the entry the same packet is denied although CIDRS maps it to the class.
    let known = [192, 168, 1, 1];
    env.identity(v4(known), PEER_ID, 0, 0);
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, known, PROTO_UDP, &udp(5355, 53)),
        REASON_DROP_POLICY,
    );
    env.identity_in_class(v4(known), PEER_ID, class);
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, known, PROTO_UDP, &udp(5356, 53)),
        REASON_POLICY_ALLOW,
    );
    // And the class it carries wins over the trie: a known address outside every prefix.
    let outside = [10, 9, 9, 9];
    env.identity_in_class(v4(outside), PEER_ID, class);
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, outside, PROTO_UDP, &udp(5357, 53)),
        REASON_POLICY_ALLOW,
    );
}

#[test]
fn any_proto_entry_is_needed_for_icmp() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    // "All ports of TCP" does not allow ICMP.
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 0, POLICY_PREFIX_ANY_PORT);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 12345, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    let ping = ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 77));
    env.deny(PROG_TO_POD, &ping, REASON_DROP_POLICY);
    // An any-protocol entry (no port restriction) allows it.
    env.allow(PEER_ID, DIR_INGRESS, 0, 0, POLICY_PREFIX_ANY_PROTO);
    env.pass(PROG_TO_POD, &ping, REASON_POLICY_ALLOW);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_SCTP, &sctp(1, 2)),
        REASON_POLICY_ALLOW,
    );
}

#[test]
fn port_range_via_lpm_block() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    // 8080-8087: one block of 8 ports = prefix 96 - 3.
    env.allow(
        PEER_ID,
        DIR_INGRESS,
        PROTO_TCP,
        8080,
        POLICY_PREFIX_FULL - 3,
    );
    for (i, port) in (8080..=8087).enumerate() {
        let sport = 30000 + u16::try_from(i).expect("small");
        env.pass(
            PROG_TO_POD,
            &ipv4(PEER, POD, PROTO_TCP, &tcp(sport, port, TCP_SYN)),
            REASON_POLICY_ALLOW,
        );
    }
    for port in [8079, 8088, 80, 0] {
        env.deny(
            PROG_TO_POD,
            &ipv4(PEER, POD, PROTO_TCP, &tcp(31000, port, TCP_SYN)),
            REASON_DROP_POLICY,
        );
    }
}

#[test]
fn sctp_ports() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_SCTP, 3868, POLICY_PREFIX_FULL);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_SCTP, &sctp(5000, 3868)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_SCTP, &sctp(5000, 3869)),
        REASON_DROP_POLICY,
    );
}

#[test]
fn ipv6_identity_cidr_exthdrs_and_fragments() {
    let pod = v6("fd00::1");
    let peer = v6("fd00::2");
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS | EP_CLASS_EGRESS);
    env.identity(peer, PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 443, POLICY_PREFIX_FULL);
    let class = CIDR_CLASS_BIT | 2;
    env.cidr(v6("2001:db8::"), 32, class);
    env.allow(class, DIR_EGRESS, PROTO_ICMPV6, 0, POLICY_PREFIX_ANY_PORT);

    env.pass(
        PROG_TO_POD,
        &ipv6(peer, pod, PROTO_TCP, &tcp(50000, 443, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv6(peer, pod, PROTO_TCP, &tcp(50001, 444, TCP_SYN)),
        REASON_DROP_POLICY,
    );
    // Hop-by-hop + dest-opts + first fragment before TCP: the port is still found.
    let ext = [
        (0u8, ext_opts8()),
        (60, ext_opts8()),
        (44, ext_frag(0, true)),
    ];
    env.pass(
        PROG_TO_POD,
        &ipv6_ext(peer, pod, &ext, PROTO_TCP, &tcp(50002, 443, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    // A non-first fragment of a datagram whose first fragment was not seen (another
    // identification) has no L4 header: port 0, not allowed by the port-443 entry.
    let ext = [(44u8, ext_frag_id(100, false, 8))];
    env.deny(
        PROG_TO_POD,
        &ipv6_ext(peer, pod, &ext, PROTO_TCP, &[0; 16]),
        REASON_DROP_POLICY,
    );
    // Too many extension headers to walk: malformed.
    let ext: Vec<(u8, Vec<u8>)> = (0..5).map(|_| (60u8, ext_opts8())).collect();
    env.deny(
        PROG_TO_POD,
        &ipv6_ext(peer, pod, &ext, PROTO_TCP, &tcp(50003, 443, TCP_SYN)),
        REASON_DROP_MALFORMED,
    );
    // ICMPv6 echo to 2001:db8::/32 by CIDR class, any port of ICMPv6.
    env.pass(
        PROG_FROM_POD,
        &ipv6(pod, v6("2001:db8::53"), PROTO_ICMPV6, &icmp(128, 9)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_FROM_POD,
        &ipv6(pod, v6("2001:db9::53"), PROTO_ICMPV6, &icmp(128, 9)),
        REASON_DROP_POLICY,
    );
    // An IPv4 peer in the same range of bits is not matched by the IPv6 CIDR.
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, [32, 1, 13, 184], PROTO_ICMP, &icmp(8, 9)),
        REASON_DROP_POLICY,
    );
}

#[test]
fn ipv4_non_first_fragment_uses_port_zero() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_UDP, 0, POLICY_PREFIX_ANY_PORT);
    // Offset 185 (×8 bytes): no UDP header; allowed only because all UDP ports are.
    env.pass(
        PROG_TO_POD,
        &ipv4_frag(PEER, POD, PROTO_UDP, 185, &[0xaa; 8]),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4_frag(PEER, POD, PROTO_TCP, 185, &[0xaa; 8]),
        REASON_DROP_POLICY,
    );
}

#[test]
fn host_peer_always_allowed() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    let node = [10, 0, 0, 254];
    env.identity(v4(node), 0, 0, PEER_HOST);
    env.pass(
        PROG_TO_POD,
        &ipv4(node, POD, PROTO_TCP, &tcp(33000, 8080, TCP_SYN)),
        REASON_HOST,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, node, PROTO_UDP, &udp(33001, 53)),
        REASON_HOST,
    );
}

#[test]
fn self_peer_always_allowed() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(POD), LOCAL_ID, IFINDEX, 0);
    env.pass(
        PROG_TO_POD,
        &ipv4(POD, POD, PROTO_TCP, &tcp(33000, 8080, TCP_SYN)),
        REASON_SELF,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, POD, PROTO_TCP, &tcp(33001, 8080, TCP_SYN)),
        REASON_SELF,
    );
}

#[test]
fn malformed_packets() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let full = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    // (An IP header cut short cannot be tested here: since 6.x BPF_PROG_TEST_RUN itself
    // rejects IP frames shorter than the minimal IP header with EINVAL.)
    // IHL claims 60 bytes of header in a 54-byte frame: no room for the L4 header.
    let mut long_ihl = full.clone();
    if let Some(b) = long_ihl.get_mut(14) {
        *b = 0x4f;
    }
    env.deny(PROG_TO_POD, &long_ihl, REASON_DROP_MALFORMED);
    // TCP header cut to 8 bytes.
    let short_tcp = full.get(..14 + 20 + 8).expect("len").to_vec();
    env.deny(PROG_TO_POD, &short_tcp, REASON_DROP_MALFORMED);
    // Bad IHL (4 words).
    let mut bad_ihl = full.clone();
    if let Some(b) = bad_ihl.get_mut(14) {
        *b = 0x44;
    }
    env.deny(PROG_TO_POD, &bad_ihl, REASON_DROP_MALFORMED);
    // IPv6 ethertype with an IPv4 header.
    let mut bad_ver = full.clone();
    if let Some(b) = bad_ver.get_mut(12..14) {
        b.copy_from_slice(&[0x86, 0xdd]);
    }
    env.deny(PROG_TO_POD, &bad_ver, REASON_DROP_MALFORMED);
    // Truncated ICMP.
    let ping = ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 1));
    env.deny(
        PROG_TO_POD,
        ping.get(..14 + 20 + 4).expect("len"),
        REASON_DROP_MALFORMED,
    );
    // The same truncation in the non-isolated direction passes, untracked.
    let short_out = ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.pass(
        PROG_FROM_POD,
        short_out.get(..14 + 20 + 8).expect("len"),
        REASON_NOT_ISOLATED,
    );
    assert_eq!(env.ct_len(), 0);
}

// ---------------------------------------------------------------------------------------
// Conntrack
// ---------------------------------------------------------------------------------------

#[test]
fn conntrack_reply_passes_through_isolated_direction() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);

    let syn = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    let synack = ipv4(POD, PEER, PROTO_TCP, &tcp(80, 40000, TCP_SYN | TCP_ACK));
    let ack = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_ACK));

    // Before the SYN, the reply direction (egress, no entries) drops.
    env.deny(PROG_FROM_POD, &synack, REASON_DROP_POLICY);
    assert_eq!(env.ct_len(), 0);

    env.pass(PROG_TO_POD, &syn, REASON_POLICY_ALLOW);
    let (key, src_is_lo) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let ct = env.ct_entry(&key).expect("SYN creates an entry");
    assert_eq!(ct.origin_dir, DIR_INGRESS);
    assert_eq!(ct.flags & CT_ORIGIN_LO != 0, src_is_lo);
    assert_eq!(ct.flags & (CT_SEEN_REPLY | CT_TCP_CLOSING), 0);
    let syn_expires = ct.expires_ns;

    env.pass(PROG_FROM_POD, &synack, REASON_REPLY);
    let ct = env.ct_entry(&key).expect("entry");
    assert_ne!(ct.flags & CT_SEEN_REPLY, 0, "reply seen");
    let est = ct.expires_ns - syn_expires;
    let want = CT_TIMEOUT_TCP_ESTABLISHED_NS - CT_TIMEOUT_TCP_SYN_NS;
    assert!(
        est.abs_diff(want) < 5_000_000_000,
        "established timeout replaces the SYN one: {est} vs {want}"
    );

    env.pass(PROG_TO_POD, &ack, REASON_ESTABLISHED);
    // The tracked flow does not open other ports or the reverse new direction.
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_DROP_POLICY,
    );
    assert_eq!(env.ct_len(), 1);
}

#[test]
fn conntrack_entry_from_non_isolated_direction_lets_replies_in() {
    // Egress not isolated, ingress isolated with nothing allowed: replies still come in.
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let out = ipv4(POD, PEER, PROTO_UDP, &udp(5000, 53));
    let back = ipv4(PEER, POD, PROTO_UDP, &udp(53, 5000));
    env.deny(PROG_TO_POD, &back, REASON_DROP_POLICY);
    env.pass(PROG_FROM_POD, &out, REASON_NOT_ISOLATED);
    env.pass(PROG_TO_POD, &back, REASON_REPLY);
    env.pass(PROG_FROM_POD, &out, REASON_ESTABLISHED);
}

#[test]
fn conntrack_expired_entry_counts_as_absent() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    let (key, src_is_lo) = ct_key(v4(POD), 5000, v4(PEER), 53, PROTO_UDP);
    let stale = CtValue {
        expires_ns: 1,
        origin_dir: DIR_EGRESS,
        flags: if src_is_lo { CT_ORIGIN_LO } else { 0 },
        slot: SLOT as u16,
        _pad: [0; 4],
    };
    env.ct_insert(key, stale);
    let back = ipv4(PEER, POD, PROTO_UDP, &udp(53, 5000));
    env.deny(PROG_TO_POD, &back, REASON_DROP_POLICY);
    // Made live, the same entry lets the reply in.
    let live = CtValue {
        expires_ns: u64::MAX,
        ..stale
    };
    env.ct_insert(key, live);
    env.pass(PROG_TO_POD, &back, REASON_REPLY);
}

/// A SYN without ACK takes the conntrack path like any packet: an expired entry of its tuple
/// is replaced, a live one answers (even for a SYN the policy now denies) or, when the SYN
/// does not match it, is left alone.
#[test]
fn a_syn_never_replaces_a_live_entry() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let syn = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    let (key, src_is_lo) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let origin = if src_is_lo { CT_ORIGIN_LO } else { 0 };

    // An expired entry of the tuple: the SYN is allowed and replaces it.
    let stale = CtValue {
        expires_ns: 1,
        origin_dir: DIR_EGRESS,
        flags: CT_SEEN_REPLY | if src_is_lo { 0 } else { CT_ORIGIN_LO },
        slot: 0,
        _pad: [0; 4],
    };
    env.ct_insert(key, stale);
    env.pass(PROG_TO_POD, &syn, REASON_POLICY_ALLOW);
    let ct = env.ct_entry(&key).expect("entry");
    assert!(ct.expires_ns > 1, "the expired entry is replaced");
    assert_eq!(ct.origin_dir, DIR_INGRESS);
    assert_eq!(ct.flags, origin, "a fresh entry: this side, nothing seen");
    assert_eq!(u32::from(ct.slot), SLOT);

    // A retransmission hits the live entry.
    env.pass(PROG_TO_POD, &syn, REASON_ESTABLISHED);
    assert_eq!(env.ct_len(), 1);

    // A live entry answers a SYN the policy denies (port 81 is not allowed).
    let syn81 = ipv4(PEER, POD, PROTO_TCP, &tcp(40001, 81, TCP_SYN));
    env.deny(PROG_TO_POD, &syn81, REASON_DROP_POLICY);
    assert_eq!(env.ct_len(), 1, "a denied SYN creates nothing");
    let (key81, lo81) = ct_key(v4(PEER), 40001, v4(POD), 81, PROTO_TCP);
    let live81 = CtValue {
        expires_ns: u64::MAX / 2,
        origin_dir: DIR_INGRESS,
        flags: if lo81 { CT_ORIGIN_LO } else { 0 },
        slot: SLOT as u16,
        _pad: [0; 4],
    };
    env.ct_insert(key81, live81);
    env.pass(PROG_TO_POD, &syn81, REASON_ESTABLISHED);

    // A live entry the allowed SYN does not match (opened the other way) is left alone.
    let other = CtValue {
        expires_ns: u64::MAX / 2,
        origin_dir: DIR_EGRESS,
        flags: origin,
        slot: SLOT as u16,
        _pad: [0; 4],
    };
    env.ct_insert(key, other);
    env.pass(PROG_TO_POD, &syn, REASON_POLICY_ALLOW);
    assert_eq!(
        env.ct_entry(&key),
        Some(other),
        "the live entry is not replaced"
    );
    assert_eq!(env.ct_len(), 2);
}

// ---------------------------------------------------------------------------------------
// Flow cache
// ---------------------------------------------------------------------------------------

/// Pins the calling thread to the CPU it runs on, so its test runs share one CPU's flow
/// cache (`NPM_FLOWS` is per CPU).
fn stay_on_this_cpu() {
    // SAFETY: plain syscalls on a zeroed cpu_set_t of the right size.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// A TCP flow from PEER to POD:80 allowed at ingress (egress isolated, nothing allowed), set
/// up through SYN, SYN-ACK, ACK and one data segment back, IPv4 or IPv6. Returns the env,
/// the flow's key and its (ACK from the peer, data segment from the pod) packets.
fn established_flow(v6_flow: bool) -> (Env, CtKey, Vec<u8>, Vec<u8>) {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    let (pod, peer) = if v6_flow {
        (v6("fd00::1"), v6("fd00::2"))
    } else {
        (v4(POD), v4(PEER))
    };
    let pkt = |src: Addr16, dst: Addr16, sport: u16, dport: u16, flags: u8| {
        let l4 = tcp(sport, dport, flags);
        if v6_flow {
            ipv6(src, dst, PROTO_TCP, &l4)
        } else {
            let b = |a: Addr16| [a[12], a[13], a[14], a[15]];
            ipv4(b(src), b(dst), PROTO_TCP, &l4)
        }
    };
    env.identity(peer, PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let ack = pkt(peer, pod, 40000, 80, TCP_ACK);
    let data_back = pkt(pod, peer, 80, 40000, TCP_ACK);
    env.pass(
        PROG_TO_POD,
        &pkt(peer, pod, 40000, 80, TCP_SYN),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_FROM_POD,
        &pkt(pod, peer, 80, 40000, TCP_SYN | TCP_ACK),
        REASON_REPLY,
    );
    env.pass(PROG_TO_POD, &ack, REASON_ESTABLISHED);
    env.pass(PROG_FROM_POD, &data_back, REASON_REPLY);
    let (key, _) = ct_key(peer, 40000, pod, 80, PROTO_TCP);
    assert!(env.ct_entry(&key).is_some(), "the flow is tracked");
    (env, key, ack, data_back)
}

#[test]
fn established_packets_are_answered_from_the_flow_cache_until_it_is_invalidated() {
    stay_on_this_cpu();
    for v6_flow in [false, true] {
        let (mut env, key, ack, data_back) = established_flow(v6_flow);
        // Evicted as the kernel's LRU does it: the cached answers still pass both directions,
        // with their own reasons, counted under the endpoint's slot (`pass` checks).
        env.ct_evict(&key);
        env.pass(PROG_TO_POD, &ack, REASON_ESTABLISHED);
        env.pass(PROG_FROM_POD, &data_back, REASON_REPLY);
        assert_eq!(env.ct_len(), 0, "cache hits create nothing");
        // A SYN, FIN or RST is never answered from the cache: the RST back takes the
        // conntrack path, finds nothing, and egress allows nothing.
        let rst_back = {
            let mut p = data_back.clone();
            let flags_at = p.len() - 20 + 13;
            p[flags_at] = TCP_RST | TCP_ACK;
            p
        };
        env.deny(PROG_FROM_POD, &rst_back, REASON_DROP_POLICY);
        // A userspace change of conntrack invalidates every cached answer: the data segment
        // back is a new egress flow now (denied), the ACK a new ingress one (allowed again).
        env.dp
            .invalidate_flow_cache()
            .expect("invalidate the flow cache");
        env.deny(PROG_FROM_POD, &data_back, REASON_DROP_POLICY);
        env.pass(PROG_TO_POD, &ack, REASON_POLICY_ALLOW);
    }
}

#[test]
fn a_cached_answer_lasts_at_most_until_the_entrys_next_refresh() {
    stay_on_this_cpu();
    let (mut env, key, ack, _) = established_flow(false);
    let filled = std::time::Instant::now();
    // Evicted, and the policy gone: only the cache still passes the flow.
    env.ct_evict(&key);
    env.remove_pair(PEER_ID, DIR_INGRESS);
    env.pass(PROG_TO_POD, &ack, REASON_ESTABLISHED);
    // The conntrack path would have refreshed the entry 1 s (REFRESH_SLACK) after the last
    // rewrite (the SYN-ACK's); from then on the cache must not answer. Two ticks of margin.
    let tick = env.dp.clock_ns_per_jiffy().expect("NPM_CLOCK");
    std::thread::sleep(
        std::time::Duration::from_secs(1) + std::time::Duration::from_nanos(2 * tick)
            - filled.elapsed().min(std::time::Duration::from_millis(500)),
    );
    env.deny(PROG_TO_POD, &ack, REASON_DROP_POLICY);
}

#[test]
fn the_flow_cache_can_be_turned_off_and_its_generations_never_repeat() {
    stay_on_this_cpu();
    let (mut env, key, ack, _) = established_flow(false);
    let g1 = env.dp.flow_cache_generation().expect("generation");
    assert_ne!(g1, 0, "on after load");
    env.dp.set_flow_cache(false).expect("off");
    assert_eq!(env.dp.flow_cache_generation().expect("generation"), 0);
    // Off: the evicted flow is judged as new at once (allowed again by the ingress policy).
    env.ct_evict(&key);
    env.pass(PROG_TO_POD, &ack, REASON_POLICY_ALLOW);
    env.dp.set_flow_cache(true).expect("on");
    let g2 = env.dp.flow_cache_generation().expect("generation");
    assert!(g2 > g1, "a fresh generation: {g2} after {g1}");
    env.dp.invalidate_flow_cache().expect("invalidate");
    let g3 = env.dp.flow_cache_generation().expect("generation");
    assert!(
        g3 > g2,
        "invalidating takes a fresh generation: {g3} after {g2}"
    );
}

/// `jiffies` now, read by the loader's probe program (low 31 bits).
fn jiffies(env: &Env) -> u64 {
    let r = env
        .dp
        .test_run(PROG_CLOCK, &[0u8; 14], IFINDEX, 1)
        .expect("npm_clock");
    u64::from(r.retval)
}

#[test]
fn the_datapath_clock_is_jiffies_times_the_measured_tick() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let ns = env.dp.clock_ns_per_jiffy().expect("NPM_CLOCK");
    assert!(
        [10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&ns),
        "one jiffy is {ns} ns: not a HZ Linux offers"
    );
    // Where the kernel says its HZ, the measurement agrees.
    if let Ok(out) = std::process::Command::new("sh")
        .args(["-c", "zcat /proc/config.gz | grep '^CONFIG_HZ='"])
        .output()
        && let Some(hz) = String::from_utf8_lossy(&out.stdout)
            .trim()
            .strip_prefix("CONFIG_HZ=")
            .and_then(|v| v.parse::<u64>().ok())
    {
        assert_eq!(ns, 1_000_000_000 / hz, "CONFIG_HZ={hz}");
    }
    // A new flow's entry expires one SYN timeout after jiffies × the factor.
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let before = jiffies(&env);
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    let after = jiffies(&env);
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    let created = env.ct_entry(&key).expect("entry").expires_ns - CT_TIMEOUT_TCP_SYN_NS;
    // The probe sees 31 bits of jiffies; the entry all of them.
    let at = (created / ns) & 0x7fff_ffff;
    assert!(
        (before..=after).contains(&at),
        "created at jiffy {at}, between {before} and {after}"
    );
    assert_eq!(created % ns, 0, "a whole number of jiffies");
}

#[test]
fn conntrack_tcp_rst_shortens_timeout() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);

    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(80, 40000, TCP_SYN | TCP_ACK)),
        REASON_REPLY,
    );
    let before = env.ct_entry(&key).expect("entry");
    assert_ne!(before.flags & CT_SEEN_REPLY, 0);

    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(80, 40000, TCP_RST | TCP_ACK)),
        REASON_REPLY,
    );
    let after = env.ct_entry(&key).expect("entry");
    assert_ne!(after.flags & CT_TCP_CLOSING, 0, "RST marks closing");
    let shrink = before.expires_ns - after.expires_ns;
    let want = CT_TIMEOUT_TCP_ESTABLISHED_NS - CT_TIMEOUT_TCP_CLOSING_NS;
    assert!(
        shrink.abs_diff(want) < 5_000_000_000,
        "closing timeout: shrank by {shrink}, want about {want}"
    );
    // FIN on a fresh flow also marks it closing.
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40001, 80, TCP_FIN | TCP_ACK)),
        REASON_POLICY_ALLOW,
    );
    let (key, _) = ct_key(v4(PEER), 40001, v4(POD), 80, PROTO_TCP);
    let fin = env.ct_entry(&key).expect("entry");
    assert_ne!(fin.flags & CT_TCP_CLOSING, 0);
}

#[test]
fn icmp_echo_reply_allowed_only_after_request() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_EGRESS, PROTO_ICMP, 0, POLICY_PREFIX_ANY_PORT);
    let request = ipv4(POD, PEER, PROTO_ICMP, &icmp(8, 4242));
    let reply = ipv4(PEER, POD, PROTO_ICMP, &icmp(0, 4242));

    env.deny(PROG_TO_POD, &reply, REASON_DROP_POLICY);
    assert_eq!(env.ct_len(), 0, "a dropped reply creates nothing");
    env.pass(PROG_FROM_POD, &request, REASON_POLICY_ALLOW);
    env.pass(PROG_TO_POD, &reply, REASON_REPLY);
    env.pass(PROG_FROM_POD, &request, REASON_ESTABLISHED);
    // Another identifier is another flow.
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(0, 4243)),
        REASON_DROP_POLICY,
    );
    // An echo *request* from the peer on the same identifier is not a reply.
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(8, 4242)),
        REASON_DROP_POLICY,
    );
    // Other ICMP types never match conntrack (port 0).
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_ICMP, &icmp(3, 0)),
        REASON_DROP_POLICY,
    );
}

#[test]
fn test_run_repeat_counts_every_run() {
    let env = Env::new().endpoint(0);
    let p = ipv4(PEER, POD, PROTO_UDP, &udp(1, 2));
    let res = env
        .dp
        .test_run(PROG_TO_POD, &p, IFINDEX, 10)
        .expect("test run");
    assert_eq!(res.retval, TC_ACT_PIPE);
    assert_eq!(res.data_out, p, "the packet is not modified");
    // The first run creates the entry; the other nine match it in the same direction.
    assert_eq!(
        env.counter(IFINDEX, DIR_INGRESS, REASON_NOT_ISOLATED)
            .packets,
        1
    );
    assert_eq!(
        env.counter(IFINDEX, DIR_INGRESS, REASON_ESTABLISHED)
            .packets,
        9
    );
}

/// The benchmark's baseline passes everything and touches no map, even for a packet the
/// classifier drops.
#[test]
fn pass_only_program_passes_and_touches_nothing() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let p = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    env.deny(PROG_TO_POD, &p, REASON_DROP_POLICY);
    let res = env
        .dp
        .test_run(PROG_PASS, &p, IFINDEX, 100)
        .expect("test run");
    assert_eq!(res.retval, TC_ACT_PIPE);
    assert_eq!(res.data_out, p, "the packet is not modified");
    assert_eq!(env.ct_len(), 0);
    assert_eq!(
        env.counter(IFINDEX, DIR_INGRESS, REASON_DROP_POLICY)
            .packets,
        1,
        "only the classifier's run was counted"
    );
}

/// The benchmark's new-flow program (BENCHMARKS.md, "new connection, allowed"): the
/// repetitions of one call share the packet, so each bumps the source port once more and is
/// a new flow with its own conntrack entry, in both families; the classifier's verdict and
/// counters are those of `npm_to_pod`. The bump alone tracks and counts nothing. Not loaded
/// with the datapath: `test_run` fails until the benchmark loads it.
#[test]
fn bench_new_flow_program_makes_a_new_flow_per_repetition() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let p4 = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    assert!(
        env.dp.test_run(PROG_BENCH_NEW, &p4, IFINDEX, 1).is_err(),
        "not loaded by Datapath::load"
    );
    env.dp.load_bench_programs().expect("load");
    env.dp
        .load_bench_programs()
        .expect("loading again is a no-op");
    let peer6 = v6("fd00::2");
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.identity(peer6, PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);

    let bump = env
        .dp
        .test_run(PROG_BENCH_BUMP, &p4, IFINDEX, 7)
        .expect("test run");
    assert_eq!(bump.retval, TC_ACT_PIPE);
    assert_eq!(
        bump.data_out[34..36],
        40007_u16.to_be_bytes(),
        "the source port, bumped once per repetition"
    );
    assert_eq!(bump.data_out[36..], p4[36..], "nothing else changed");
    assert_eq!(env.ct_len(), 0, "the bump alone tracks nothing");

    let r = env
        .dp
        .test_run(PROG_BENCH_NEW, &p4, IFINDEX, 100)
        .expect("test run");
    assert_eq!(r.retval, TC_ACT_PIPE);
    assert_eq!(env.ct_lens(), (100, 0), "one IPv4 entry per repetition");
    for sport in [40001, 40100] {
        let (key, _) = ct_key(v4(PEER), sport, v4(POD), 80, PROTO_TCP);
        assert!(env.ct_entry(&key).is_some(), "the flow from port {sport}");
    }
    let (key, _) = ct_key(v4(PEER), 40000, v4(POD), 80, PROTO_TCP);
    assert!(
        env.ct_entry(&key).is_none(),
        "the unbumped port was never sent"
    );
    assert_eq!(
        env.counter(IFINDEX, DIR_INGRESS, REASON_POLICY_ALLOW)
            .packets,
        100,
        "counted as npm_to_pod counts"
    );

    let p6 = ipv6(peer6, v6("fd00::1"), PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    let r = env
        .dp
        .test_run(PROG_BENCH_NEW, &p6, IFINDEX, 50)
        .expect("test run");
    assert_eq!(r.retval, TC_ACT_PIPE);
    assert_eq!(r.data_out[54..56], 40050_u16.to_be_bytes());
    assert_eq!(env.ct_lens(), (100, 50), "one IPv6 entry per repetition");

    // A denied peer: every repetition dropped, nothing tracked.
    let denied = ipv4([10, 0, 0, 9], POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    let r = env
        .dp
        .test_run(PROG_BENCH_NEW, &denied, IFINDEX, 20)
        .expect("test run");
    assert_eq!(r.retval, TC_ACT_SHOT);
    assert_eq!(env.ct_lens(), (100, 50));
}

// ---------------------------------------------------------------------------------------
// Pinning
// ---------------------------------------------------------------------------------------

/// Removes a directory tree on drop (also when the test panics).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
}

#[test]
fn pinned_maps_are_adopted() {
    let dir = PathBuf::from(format!("/sys/fs/bpf/npm-test-{}", std::process::id()));
    let _guard = DirGuard(dir.clone());
    let v1 = dir.join("v1");

    {
        let mut dp = Datapath::load(Some(&v1)).expect("first load");
        for name in [
            MAP_ENDPOINTS,
            MAP_IDENTITIES,
            MAP_CIDRS,
            MAP_POLICY,
            MAP_PAIRS,
            MAP_CONNTRACK,
            MAP_CONNTRACK4,
            MAP_METRICS,
            MAP_CLOCK,
            MAP_FLOWS,
            MAP_SERVICES,
            MAP_DEFERRED,
            MAP_FRAGS,
        ] {
            assert!(v1.join(name).exists(), "{name} is pinned");
        }
        let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
            HashMap::try_from(dp.take_map(MAP_ENDPOINTS).expect("map")).expect("typed");
        endpoints
            .insert(
                IFINDEX,
                EndpointInfo {
                    id: 7,
                    flags: 0,
                    slot: 0,
                },
                0,
            )
            .expect("insert");
    }

    // The first Datapath is gone; the pins kept the maps, and a new load adopts them.
    let mut dp = Datapath::load(Some(&v1)).expect("second load");
    let p = ipv4(PEER, POD, PROTO_UDP, &udp(1, 2));
    let res = dp.test_run(PROG_TO_POD, &p, IFINDEX, 1).expect("test run");
    assert_eq!(res.retval, TC_ACT_PIPE);
    let endpoints: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(dp.take_map(MAP_ENDPOINTS).expect("map")).expect("typed");
    assert_eq!(
        endpoints.get(&IFINDEX, 0).expect("entry survives"),
        EndpointInfo {
            id: 7,
            flags: 0,
            slot: 0
        }
    );
    let metrics: PerCpuArray<MapData, MetricsValue> =
        PerCpuArray::try_from(dp.take_map(MAP_METRICS).expect("map")).expect("typed");
    let n: u64 = metrics
        .get(&counter_index(0, DIR_INGRESS, REASON_NOT_ISOLATED), 0)
        .expect("counted")
        .iter()
        .map(|v| v.packets)
        .sum();
    assert_eq!(n, 1, "the reloaded program uses the adopted endpoint map");
}

// ---------------------------------------------------------------------------------------
// Attaching (network namespaces)
// ---------------------------------------------------------------------------------------

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args.first().copied().expect("program"))
        .args(args.get(1..).unwrap_or_default())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must(args: &[&str]) -> String {
    let (ok, text) = sh(args);
    assert!(ok, "{args:?} failed: {text}");
    text
}

/// Two namespaces joined by a veth pair; deleted on drop (deleting a namespace deletes the
/// veth end inside it, and with it the pair).
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn new() -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        // Unique per pair: tests of this binary run in parallel.
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pair = Self {
            a: format!("npmtest-{pid}-{seq}-a"),
            b: format!("npmtest-{pid}-{seq}-b"),
        };
        must(&["ip", "netns", "add", &pair.a]);
        must(&["ip", "netns", "add", &pair.b]);
        must(&[
            "ip", "-n", &pair.a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
            "netns", &pair.b,
        ]);
        for (ns, dev, addr) in [
            (&pair.a, "veth-a", "10.213.0.1/24"),
            (&pair.b, "veth-b", "10.213.0.2/24"),
        ] {
            must(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let (ok, text) = sh(&["ip", "netns", "del", ns]);
            if !ok {
                eprintln!("cleanup: ip netns del {ns}: {text}");
            }
        }
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // SAFETY: setns on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn filters(ns: &str, hook: &str) -> String {
    must(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "veth-a", hook,
    ])
}

/// Number of cls_bpf filters (lines with a handle) running program `prog`.
fn count_filters(text: &str, prog: &str) -> usize {
    text.lines()
        .filter(|l| l.contains("handle") && l.contains(prog))
        .count()
}

/// The programs on tcx `hook` of veth-a in `ns`, as (name, program id), in run order.
fn tcx(ns: &str, hook: TcAttachType) -> Vec<(String, u32)> {
    let (_, programs) =
        in_netns(ns, || SchedClassifier::query_tcx("veth-a", hook)).expect("query the tcx hook");
    programs
        .iter()
        .map(|p| (p.name_as_str().unwrap_or("?").to_owned(), p.id()))
        .collect()
}

fn names(programs: &[(String, u32)]) -> Vec<&str> {
    programs.iter().map(|(n, _)| n.as_str()).collect()
}

fn ping(ns: &str, addr: &str) -> bool {
    sh(&[
        "ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "-q", addr,
    ])
    .0
}

/// Isolates veth-a (both ways, no policy) and checks that the echo request is dropped, then
/// unmanages it again and checks that it passes.
fn isolation_enforced(
    pair: &NetnsPair,
    endpoints: &mut HashMap<MapData, u32, EndpointInfo>,
    ifindex: u32,
) {
    assert!(ping(&pair.b, "10.213.0.1"), "unmanaged: ping passes");
    endpoints
        .insert(
            ifindex,
            EndpointInfo {
                id: LOCAL_ID,
                flags: EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS,
                slot: SLOT,
            },
            0,
        )
        .expect("insert endpoint");
    assert!(!ping(&pair.b, "10.213.0.1"), "isolated: ping dropped");
    endpoints.remove(&ifindex).expect("remove endpoint");
    assert!(ping(&pair.b, "10.213.0.1"), "unmanaged again: ping passes");
}

#[test]
fn attach_replace_detach_in_netns() {
    let pair = NetnsPair::new();
    let mut dp = Datapath::load(None).expect("load");
    assert_eq!(dp.tc_mode(), TcMode::Tcx, "kernel 6.18 has tcx");
    let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(dp.take_map(MAP_ENDPOINTS).expect("map")).expect("typed");

    assert!(ping(&pair.b, "10.213.0.1"), "baseline ping works");

    let ifindex = in_netns(&pair.a, || dp.attach("veth-a").expect("attach"));
    assert!(ifindex > 0);
    let ingress = tcx(&pair.a, TcAttachType::Ingress);
    assert_eq!(names(&ingress), ["npm_from_pod"]);
    assert_eq!(names(&tcx(&pair.a, TcAttachType::Egress)), ["npm_to_pod"]);
    assert_eq!(
        in_netns(&pair.a, || npm_agent::datapath::tcx_programs(
            "veth-a",
            TcAttachType::Egress
        ))
        .expect("list"),
        ["npm_to_pod"]
    );
    // tcx only: no qdisc filter of ours.
    assert_eq!(count_filters(&filters(&pair.a, "ingress"), "npm_"), 0);

    // Attaching again (as a restarted agent would) keeps the one program, never stacks.
    let again = in_netns(&pair.a, || dp.attach("veth-a").expect("attach again"));
    assert_eq!(again, ifindex);
    assert_eq!(tcx(&pair.a, TcAttachType::Ingress), ingress);
    assert_eq!(names(&tcx(&pair.a, TcAttachType::Egress)), ["npm_to_pod"]);

    isolation_enforced(&pair, &mut endpoints, ifindex);

    // The programs outlive the Datapath (the agent exits without detaching).
    drop(endpoints);
    drop(dp);
    assert_eq!(tcx(&pair.a, TcAttachType::Ingress), ingress);

    // A new agent's Datapath replaces the old programs in place (new program ids, still one
    // each)...
    let mut dp = Datapath::load(None).expect("load");
    in_netns(&pair.a, || {
        dp.attach("veth-a").expect("attach by a new datapath")
    });
    let now = tcx(&pair.a, TcAttachType::Ingress);
    assert_eq!(names(&now), ["npm_from_pod"]);
    assert_ne!(now, ingress, "the hook now runs the new program");
    // ...and detaches them whatever program instance they are.
    in_netns(&pair.a, || dp.detach("veth-a").expect("detach"));
    assert!(tcx(&pair.a, TcAttachType::Ingress).is_empty());
    assert!(tcx(&pair.a, TcAttachType::Egress).is_empty());
    // Detaching again is a no-op.
    in_netns(&pair.a, || dp.detach("veth-a").expect("detach again"));
}

/// The cls_bpf fallback (kernels without tcx) enforces and replaces in place like tcx; an
/// agent with tcx takes over from it (its filters removed once the tcx programs are on), and
/// detaching removes both kinds.
#[test]
fn netlink_fallback_and_the_upgrade_to_tcx() {
    let pair = NetnsPair::new();
    let mut dp = Datapath::load(None).expect("load");
    dp.set_tc_mode(TcMode::Netlink);
    let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(dp.take_map(MAP_ENDPOINTS).expect("map")).expect("typed");
    let ifindex = in_netns(&pair.a, || dp.attach("veth-a").expect("attach"));
    in_netns(&pair.a, || dp.attach("veth-a").expect("attach again"));
    let ingress = filters(&pair.a, "ingress");
    assert_eq!(count_filters(&ingress, "npm_from_pod"), 1, "{ingress}");
    assert!(ingress.contains("direct-action"), "{ingress}");
    let egress = filters(&pair.a, "egress");
    assert_eq!(count_filters(&egress, "npm_to_pod"), 1, "{egress}");
    assert!(tcx(&pair.a, TcAttachType::Ingress).is_empty());
    isolation_enforced(&pair, &mut endpoints, ifindex);
    drop(endpoints);
    drop(dp);

    // The upgrade: a tcx agent replaces the cls_bpf filters.
    let mut dp = Datapath::load(None).expect("load");
    in_netns(&pair.a, || dp.attach("veth-a").expect("attach with tcx"));
    assert_eq!(
        names(&tcx(&pair.a, TcAttachType::Ingress)),
        ["npm_from_pod"]
    );
    assert_eq!(names(&tcx(&pair.a, TcAttachType::Egress)), ["npm_to_pod"]);
    assert_eq!(count_filters(&filters(&pair.a, "ingress"), "npm_"), 0);
    assert_eq!(count_filters(&filters(&pair.a, "egress"), "npm_"), 0);

    // Both kinds at once (a cls_bpf agent attached after it): detach removes both.
    let mut old = Datapath::load(None).expect("load");
    old.set_tc_mode(TcMode::Netlink);
    in_netns(&pair.a, || old.attach("veth-a").expect("attach cls_bpf"));
    assert_eq!(
        count_filters(&filters(&pair.a, "ingress"), "npm_from_pod"),
        1
    );
    in_netns(&pair.a, || dp.detach("veth-a").expect("detach"));
    assert!(tcx(&pair.a, TcAttachType::Ingress).is_empty());
    assert!(tcx(&pair.a, TcAttachType::Egress).is_empty());
    assert_eq!(count_filters(&filters(&pair.a, "ingress"), "npm_"), 0);
    assert_eq!(count_filters(&filters(&pair.a, "egress"), "npm_"), 0);
}

/// The new-pod fast path on a tcx kernel: a link without our programs gets cls_bpf filters
/// (no RCU grace period to wait for), which enforce; the later move to tcx removes them; once
/// on tcx, the quick attach replaces the tcx programs in place instead of adding filters.
#[test]
fn quick_attach_uses_cls_bpf_until_the_link_is_on_tcx() {
    let pair = NetnsPair::new();
    let mut dp = Datapath::load(None).expect("load");
    assert_eq!(dp.tc_mode(), TcMode::Tcx, "kernel 6.18 has tcx");
    let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(dp.take_map(MAP_ENDPOINTS).expect("map")).expect("typed");
    // SAFETY: a NUL-terminated name; the call reads it and returns an integer.
    let ifindex = in_netns(&pair.a, || unsafe {
        libc::if_nametoindex(c"veth-a".as_ptr())
    });
    assert_ne!(ifindex, 0, "veth-a exists");
    let t = std::time::Instant::now();
    let (name, mode) = in_netns(&pair.a, || dp.attach_index_quick(ifindex)).expect("quick");
    let quick = t.elapsed();
    assert_eq!((name.as_str(), mode), ("veth-a", TcMode::Netlink));
    assert_eq!(
        count_filters(&filters(&pair.a, "ingress"), "npm_from_pod"),
        1
    );
    assert_eq!(count_filters(&filters(&pair.a, "egress"), "npm_to_pod"), 1);
    assert!(tcx(&pair.a, TcAttachType::Ingress).is_empty());
    assert!(tcx(&pair.a, TcAttachType::Egress).is_empty());
    isolation_enforced(&pair, &mut endpoints, ifindex);

    // The move: tcx programs on, then the filters go.
    let t = std::time::Instant::now();
    in_netns(&pair.a, || dp.attach_index(ifindex)).expect("to tcx");
    // Printed, not asserted (no timed tests): the grace period the quick attach avoids.
    println!(
        "quick attach (cls_bpf) {quick:?}; move to tcx (both hooks, filters removed) {:?}",
        t.elapsed()
    );
    let on_tcx = |ns: &str| {
        let owned = |hook| {
            names(&tcx(ns, hook))
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        (owned(TcAttachType::Ingress), owned(TcAttachType::Egress))
    };
    assert_eq!(
        on_tcx(&pair.a),
        (
            vec!["npm_from_pod".to_owned()],
            vec!["npm_to_pod".to_owned()]
        )
    );
    assert_eq!(count_filters(&filters(&pair.a, "ingress"), "npm_"), 0);
    assert_eq!(count_filters(&filters(&pair.a, "egress"), "npm_"), 0);
    isolation_enforced(&pair, &mut endpoints, ifindex);

    // On tcx already (a new agent's fast path after a restart): replaced in place.
    drop(endpoints);
    let ids = tcx(&pair.a, TcAttachType::Ingress);
    let mut dp2 = Datapath::load(None).expect("load");
    let (_, mode) = in_netns(&pair.a, || dp2.attach_index_quick(ifindex)).expect("quick");
    assert_eq!(mode, TcMode::Tcx);
    assert_eq!(
        on_tcx(&pair.a),
        (
            vec!["npm_from_pod".to_owned()],
            vec!["npm_to_pod".to_owned()]
        )
    );
    assert_ne!(
        tcx(&pair.a, TcAttachType::Ingress),
        ids,
        "a new program, in place"
    );
    assert_eq!(count_filters(&filters(&pair.a, "ingress"), "npm_"), 0);
    in_netns(&pair.a, || dp2.detach("veth-a")).expect("detach");
    assert!(tcx(&pair.a, TcAttachType::Ingress).is_empty());
    assert!(tcx(&pair.a, TcAttachType::Egress).is_empty());
}

/// The compiler's output for a pending link (a new interface whose pod is not known yet),
/// written to the real maps: the isolated direction drops every new flow, from pods, from
/// addresses in an allowed ipBlock and from another pending interface's pod alike; the other
/// direction passes untouched.
#[test]
fn pending_link_denies_the_isolated_direction_on_the_real_datapath() {
    use npm_agent::compiler::{IdAllocator, compile};
    use npm_agent::model::{Namespace, ObjRef, Peer, Pod, Policy, Rule, Selector};
    use npm_agent::state::ClusterSnapshot;
    use npm_common::maps::ID_PENDING;

    let mut s = ClusterSnapshot {
        node_name: Some("node".into()),
        ..Default::default()
    };
    s.namespaces.insert(
        "a".into(),
        Namespace {
            name: "a".into(),
            labels: Default::default(),
        },
    );
    let pod = |name: &str, ip: Option<&str>, node: &str| Pod {
        namespace: "a".into(),
        name: name.into(),
        labels: [("app".to_string(), name.to_string())].into(),
        ips: ip.map(|i| i.parse().expect("ip")).into_iter().collect(),
        node_name: Some(node.into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    };
    // A running local pod, a remote pod, and this node's new pod without an IP yet.
    for p in [
        pod("web", Some("10.0.0.2"), "node"),
        pod("remote", Some("10.0.0.3"), "other"),
        pod("new", None, "node"),
    ] {
        s.pods.insert(p.obj_ref(), p);
    }
    s.local.insert(ObjRef::new("a", "web"), 50);
    // Every pod of the namespace: ingress only from 10.0.0.0/8 (any port).
    let pol = Policy {
        namespace: "a".into(),
        name: "from-ten".into(),
        pod_selector: Selector::default(),
        ingress: Some(vec![Rule {
            peers: vec![Peer::IpBlock {
                cidr: "10.0.0.0/8".parse().expect("net"),
                except: vec![],
            }],
            ports: vec![],
        }]),
        egress: None,
    };
    s.policies.insert(pol.obj_ref(), pol);
    s.pending_links.insert(IFINDEX);
    let maps = compile(&s, &mut IdAllocator::default()).maps;
    assert_eq!(
        maps.endpoints[&IFINDEX],
        EndpointInfo {
            id: ID_PENDING,
            flags: EP_ISOLATE_INGRESS,
            slot: maps.endpoints[&IFINDEX].slot,
        }
    );

    let mut env = Env::new();
    for (k, v) in &maps.endpoints {
        env.endpoints.insert(*k, *v, 0).expect("endpoint");
    }
    for (k, v) in &maps.identities {
        env.identities.insert(*k, *v, 0).expect("identity");
    }
    for ((len, k), v) in &maps.cidrs {
        env.cidrs.insert(&Key::new(*len, *k), *v, 0).expect("cidr");
    }
    for ((len, k), v) in &maps.policy {
        env.policy
            .insert(&Key::new(*len, *k), *v, 0)
            .expect("policy");
    }
    for (k, v) in &maps.pairs {
        env.pairs.insert(*k, *v, 0).expect("pair");
    }
    // The pending link refuses new inbound flows: from a local pod, a remote pod, an address
    // in the ipBlock that admits the namespace's pods, and any other.
    for src in [
        [10, 0, 0, 2],
        [10, 0, 0, 3],
        [10, 9, 9, 9],
        [192, 168, 1, 1],
    ] {
        env.deny(
            PROG_TO_POD,
            &ipv4(src, [10, 0, 0, 77], PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
            REASON_DROP_POLICY,
        );
    }
    // Not even "to itself": the pending interface's address is in no IDENTITIES entry.
    env.deny(
        PROG_TO_POD,
        &ipv4([10, 0, 0, 77], [10, 0, 0, 77], PROTO_UDP, &udp(1, 2)),
        REASON_DROP_POLICY,
    );
    // Egress is not isolated for any not-yet-placed pod: passes (and is tracked).
    env.pass(
        PROG_FROM_POD,
        &ipv4(
            [10, 0, 0, 77],
            [10, 0, 0, 2],
            PROTO_TCP,
            &tcp(40001, 80, TCP_SYN),
        ),
        REASON_NOT_ISOLATED,
    );
    // The same interface as the running pod's endpoint: the ipBlock admits 10/8 (so the
    // denials above come from the pending identity, not from missing entries). Its address
    // moves with it, as the compiler would write it.
    env.endpoints
        .insert(IFINDEX, maps.endpoints[&50], 0)
        .expect("endpoint");
    let web = v4([10, 0, 0, 2]);
    let mut info = maps.identities[&web];
    info.ifindex = IFINDEX;
    env.identities.insert(web, info, 0).expect("identity");
    env.pass(
        PROG_TO_POD,
        &ipv4(
            [10, 9, 9, 9],
            [10, 0, 0, 2],
            PROTO_TCP,
            &tcp(40002, 80, TCP_SYN),
        ),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(
            [192, 168, 1, 1],
            [10, 0, 0, 2],
            PROTO_TCP,
            &tcp(40003, 80, TCP_SYN),
        ),
        REASON_DROP_POLICY,
    );
}

// ---------------------------------------------------------------------------------------
// Services: the egress check after kube-proxy's DNAT
// ---------------------------------------------------------------------------------------
//
// The client pod sits behind `lo` (ifindex 1), the backend pod behind a veth of a test
// namespace (its own ifindex), so the post-DNAT check can tell the two endpoints apart. The
// DNAT itself is what the test does between the two runs: it rewrites the destination.

/// The Service range and two ClusterIPs in it.
const SVC_RANGE: [u8; 4] = [10, 96, 0, 0];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const CLUSTER_IP_2: [u8; 4] = [10, 96, 0, 20];
/// A local backend the client's egress policy allows (TCP 8080), with identity `BACKEND_ID`.
const BACKEND: [u8; 4] = [10, 0, 0, 5];
const BACKEND_ID: u32 = 300;
/// The backend endpoint's counter slot (the client's is `SLOT`).
const BACKEND_SLOT: u32 = 6;
/// A remote pod the client's egress policy does not allow.
const DENIED: [u8; 4] = [10, 0, 0, 6];
const DENIED_ID: u32 = 400;
/// A remote address in an ipBlock the client may reach (CIDR class), TCP 8080.
const REMOTE_OK: [u8; 4] = [192, 168, 7, 7];
const REMOTE_CLASS: u32 = CIDR_CLASS_BIT | 7;
/// Bits of someone else's (kube-proxy's masquerade bit and a low one) that must survive.
const OTHER_MARK: u32 = 0x4000 | 0x1;

struct SvcEnv {
    env: Env,
    client_if: u32,
}

impl SvcEnv {
    /// Client at `lo`, isolated both ways (so a reply must earn its way in), allowed egress
    /// to the backend and to REMOTE_OK on TCP 8080; backend at `backend_if`, not isolated.
    fn new(backend_if: u32, with_range: bool) -> Self {
        let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS | EP_CLASS_EGRESS);
        env.endpoints
            .insert(
                backend_if,
                EndpointInfo {
                    id: BACKEND_ID,
                    flags: 0,
                    slot: BACKEND_SLOT,
                },
                0,
            )
            .expect("backend endpoint");
        env.identity(v4(POD), LOCAL_ID, IFINDEX, 0);
        env.identity(v4(BACKEND), BACKEND_ID, backend_if, 0);
        env.identity(v4(DENIED), DENIED_ID, 0, 0);
        env.cidr(
            v4([192, 168, 7, 0]),
            V4_MAPPED_PREFIX_LEN + 24,
            REMOTE_CLASS,
        );
        env.allow(BACKEND_ID, DIR_EGRESS, PROTO_TCP, 8080, POLICY_PREFIX_FULL);
        env.allow(
            REMOTE_CLASS,
            DIR_EGRESS,
            PROTO_TCP,
            8080,
            POLICY_PREFIX_FULL,
        );
        if with_range {
            env.services
                .insert(&Key::new(V4_MAPPED_PREFIX_LEN + 12, v4(SVC_RANGE)), 1, 0)
                .expect("service range");
        }
        Self {
            env,
            client_if: IFINDEX,
        }
    }

    /// Runs `packet` through `prog` at `ifindex` with `mark`; asserts the TC action (from
    /// `allowed`) and that counter `{count_if, dir, reason}` grew by one packet. Returns the
    /// mark the program left.
    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        prog: &str,
        packet: &[u8],
        ifindex: u32,
        mark: u32,
        allowed: bool,
        counted: (u32, u8, u8),
    ) -> u32 {
        let (count_if, dir, reason) = counted;
        let before = self.env.counter(count_if, dir, reason).packets;
        let r = self
            .env
            .dp
            .test_run_mark(prog, packet, ifindex, mark)
            .expect("BPF_PROG_TEST_RUN");
        let want = if allowed { TC_ACT_PIPE } else { TC_ACT_SHOT };
        assert_eq!(
            r.retval, want,
            "{prog} at #{ifindex}: want retval {want} (counted as {counted:?})"
        );
        assert_eq!(
            self.env.counter(count_if, dir, reason).packets - before,
            1,
            "{prog} at #{ifindex}: counter {counted:?}"
        );
        r.mark_out
    }

    fn pending_entry(&self, sport: u16, dst: [u8; 4], dport: u16) -> Option<CtValue> {
        let (mut key, _) = ct_key(v4(POD), sport, v4(dst), dport, PROTO_TCP);
        key.ifindex = self.client_if;
        self.env.ct_entry(&key)
    }

    fn side_entry(&self, sport: u16) -> Option<DeferValue> {
        let key = DeferKey {
            src: v4(POD),
            sport_be: sport.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        };
        match self.env.deferred.get(&key, 0) {
            Ok(v) => Some(v),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("reading NPM_DEFERRED: {e}"),
        }
    }
}

/// Runs `f` in a fresh namespace with a veth (`veth-a`), passing that veth's ifindex (a
/// second interface for `BPF_PROG_TEST_RUN`, besides `lo`).
fn with_second_ifindex(f: impl FnOnce(u32) + Send) {
    let pair = NetnsPair::new();
    in_netns(&pair.a, || {
        let name = std::ffi::CString::new("veth-a").expect("name");
        // SAFETY: a valid NUL-terminated name, only read.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 1, "veth-a: {}", std::io::Error::last_os_error());
        f(index);
    });
}

#[test]
fn service_egress_deferred_then_allowed_after_dnat_to_a_local_backend() {
    with_second_ifindex(|backend_if| {
        let svc = SvcEnv::new(backend_if, true);
        let c = svc.client_if;
        let syn = ipv4(POD, CLUSTER_IP, PROTO_TCP, &tcp(40000, 80, TCP_SYN));

        // Pre-DNAT: denied by the lookup (the ClusterIP is nobody), but in a Service range:
        // passed with the bit set, other bits kept, counted as deferred.
        let mark = svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            OTHER_MARK,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        assert_eq!(mark, OTHER_MARK | MARK_DEFERRED);
        let ct = svc
            .pending_entry(40000, CLUSTER_IP, 80)
            .expect("pending entry");
        assert_eq!(ct.flags & CT_PENDING, CT_PENDING);
        assert_eq!(ct.origin_dir, DIR_EGRESS);
        let side = svc.side_entry(40000).expect("side entry");
        assert_eq!(
            (side.orig_dst, side.orig_dport_be, side.ifindex),
            (v4(CLUSTER_IP), 80u16.to_be(), c)
        );

        // While pending, a "reply" (after the reverse NAT) does not pass on its account, and
        // the client's next packet is deferred again, not established.
        let reply = ipv4(
            CLUSTER_IP,
            POD,
            PROTO_TCP,
            &tcp(80, 40000, TCP_SYN | TCP_ACK),
        );
        svc.check(
            PROG_TO_POD,
            &reply,
            c,
            0,
            false,
            (c, DIR_INGRESS, REASON_DROP_POLICY),
        );
        let ack = ipv4(POD, CLUSTER_IP, PROTO_TCP, &tcp(40000, 80, TCP_ACK));
        let mark = svc.check(
            PROG_FROM_POD,
            &ack,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        assert_eq!(mark, MARK_DEFERRED);

        // Post-DNAT at the backend's interface: the client's egress policy allows the
        // backend on 8080. Counted as the client's egress allow; the bit is cleared (the
        // rest kept); then the backend's own ingress check runs as for any packet.
        let translated = ipv4(POD, BACKEND, PROTO_TCP, &tcp(40000, 8080, TCP_SYN));
        let before_ingress = svc
            .env
            .counter(backend_if, DIR_INGRESS, REASON_NOT_ISOLATED)
            .packets;
        let mark = svc.check(
            PROG_TO_POD,
            &translated,
            backend_if,
            OTHER_MARK | MARK_DEFERRED,
            true,
            (c, DIR_EGRESS, REASON_POLICY_ALLOW),
        );
        assert_eq!(
            mark, OTHER_MARK,
            "the deferred bit is cleared, nothing else"
        );
        assert_eq!(
            svc.env
                .counter(backend_if, DIR_INGRESS, REASON_NOT_ISOLATED)
                .packets
                - before_ingress,
            1,
            "the backend's ingress check ran too"
        );
        let ct = svc.pending_entry(40000, CLUSTER_IP, 80).expect("entry");
        assert_eq!(ct.flags & CT_PENDING, 0, "confirmed");
        assert!(svc.side_entry(40000).is_none(), "side entry consumed");

        // Confirmed: replies pass, the client's packets are established and unmarked.
        svc.check(
            PROG_TO_POD,
            &reply,
            c,
            0,
            true,
            (c, DIR_INGRESS, REASON_REPLY),
        );
        let mark = svc.check(
            PROG_FROM_POD,
            &ack,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_ESTABLISHED),
        );
        assert_eq!(mark, 0);
    });
}

#[test]
fn service_egress_denied_after_dnat_is_dropped_and_counted_for_the_client() {
    with_second_ifindex(|backend_if| {
        let svc = SvcEnv::new(backend_if, true);
        let c = svc.client_if;
        let syn = ipv4(POD, CLUSTER_IP_2, PROTO_TCP, &tcp(40001, 80, TCP_SYN));
        svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        // The ClusterIP maps to a remote pod the policy does not allow: the uplink's
        // npm_host_egress drops it as the client's egress policy drop.
        let translated = ipv4(POD, DENIED, PROTO_TCP, &tcp(40001, 8080, TCP_SYN));
        svc.check(
            PROG_HOST_EGRESS,
            &translated,
            backend_if,
            MARK_DEFERRED,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
        // The flow stays pending (nothing confirmed it): replies do not pass, the next
        // packet is deferred (and dropped) again.
        let ct = svc.pending_entry(40001, CLUSTER_IP_2, 80).expect("entry");
        assert_eq!(ct.flags & CT_PENDING, CT_PENDING);
        let reply = ipv4(
            CLUSTER_IP_2,
            POD,
            PROTO_TCP,
            &tcp(80, 40001, TCP_SYN | TCP_ACK),
        );
        svc.check(
            PROG_TO_POD,
            &reply,
            c,
            0,
            false,
            (c, DIR_INGRESS, REASON_DROP_POLICY),
        );
        // Same port, 8080 but a denied *local* backend's port: allowed pod, wrong port.
        svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        let wrong_port = ipv4(POD, BACKEND, PROTO_TCP, &tcp(40001, 9090, TCP_SYN));
        svc.check(
            PROG_TO_POD,
            &wrong_port,
            backend_if,
            MARK_DEFERRED,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
        // A Service address nothing translated leaves by the uplink as is: denied.
        svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        svc.check(
            PROG_HOST_EGRESS,
            &syn,
            backend_if,
            MARK_DEFERRED,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
    });
}

#[test]
fn service_egress_to_a_remote_backend_allowed_by_ip_block_confirms_the_flow() {
    with_second_ifindex(|uplink_if| {
        let svc = SvcEnv::new(uplink_if, true);
        let c = svc.client_if;
        let syn = ipv4(POD, CLUSTER_IP, PROTO_TCP, &tcp(40002, 80, TCP_SYN));
        svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        let translated = ipv4(POD, REMOTE_OK, PROTO_TCP, &tcp(40002, 8080, TCP_SYN));
        let mark = svc.check(
            PROG_HOST_EGRESS,
            &translated,
            uplink_if,
            MARK_DEFERRED | OTHER_MARK,
            true,
            (c, DIR_EGRESS, REASON_POLICY_ALLOW),
        );
        assert_eq!(mark, OTHER_MARK);
        let ct = svc.pending_entry(40002, CLUSTER_IP, 80).expect("entry");
        assert_eq!(ct.flags & CT_PENDING, 0, "confirmed");
        let reply = ipv4(
            CLUSTER_IP,
            POD,
            PROTO_TCP,
            &tcp(80, 40002, TCP_SYN | TCP_ACK),
        );
        svc.check(
            PROG_TO_POD,
            &reply,
            c,
            0,
            true,
            (c, DIR_INGRESS, REASON_REPLY),
        );
    });
}

#[test]
fn only_denied_flows_to_service_ranges_are_deferred() {
    with_second_ifindex(|backend_if| {
        // No Service range configured: today's behaviour, dropped pre-DNAT, no mark.
        let svc = SvcEnv::new(backend_if, false);
        let c = svc.client_if;
        let syn = ipv4(POD, CLUSTER_IP, PROTO_TCP, &tcp(40003, 80, TCP_SYN));
        let mark = svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            OTHER_MARK,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
        assert_eq!(mark, OTHER_MARK);
        assert_eq!(svc.env.ct_len(), 0);

        let svc = SvcEnv::new(backend_if, true);
        // Outside the ranges: dropped as before.
        let other = ipv4(POD, [10, 200, 0, 1], PROTO_TCP, &tcp(40004, 80, TCP_SYN));
        let mark = svc.check(
            PROG_FROM_POD,
            &other,
            c,
            0,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
        assert_eq!(mark, 0);
        // Allowed before the DNAT already (to the backend directly): passed unmarked.
        let direct = ipv4(POD, BACKEND, PROTO_TCP, &tcp(40005, 8080, TCP_SYN));
        let mark = svc.check(
            PROG_FROM_POD,
            &direct,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_POLICY_ALLOW),
        );
        assert_eq!(mark, 0);
        // Not isolated for egress: nothing to defer.
        let mut svc = svc;
        svc.env
            .endpoints
            .insert(
                IFINDEX,
                EndpointInfo {
                    id: LOCAL_ID,
                    flags: EP_ISOLATE_INGRESS,
                    slot: SLOT,
                },
                0,
            )
            .expect("endpoint");
        let mark = svc.check(
            PROG_FROM_POD,
            &syn,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_NOT_ISOLATED),
        );
        assert_eq!(mark, 0);
    });
}

#[test]
fn deferred_packets_without_a_local_source_pod_fail_closed_and_unmarked_ones_pass() {
    with_second_ifindex(|uplink_if| {
        let mut svc = SvcEnv::new(uplink_if, true);
        // kube-proxy masqueraded the source to the node's address.
        let node = [192, 0, 2, 1];
        svc.env.identity(v4(node), 0, 0, PEER_HOST);
        for src in [node, [10, 0, 0, 99]] {
            let p = ipv4(src, BACKEND, PROTO_TCP, &tcp(40006, 8080, TCP_SYN));
            svc.check(
                PROG_HOST_EGRESS,
                &p,
                uplink_if,
                MARK_DEFERRED,
                false,
                (0, DIR_EGRESS, REASON_DROP_UNKNOWN_SOURCE),
            );
            svc.check(
                PROG_TO_POD,
                &p,
                uplink_if,
                MARK_DEFERRED,
                false,
                (0, DIR_EGRESS, REASON_DROP_UNKNOWN_SOURCE),
            );
        }
        // Unmarked traffic on the host program passes untouched and uncounted.
        let p = ipv4(DENIED, [10, 200, 0, 1], PROTO_TCP, &tcp(1, 2, TCP_SYN));
        let r = svc
            .env
            .dp
            .test_run_mark(PROG_HOST_EGRESS, &p, uplink_if, OTHER_MARK)
            .expect("run");
        assert_eq!((r.retval, r.mark_out), (TC_ACT_PIPE, OTHER_MARK));
        // Only the unknown-source counter moved: every counter of the slots in use (the
        // unmanaged one, the client's and the backend's) adds up to its 4 packets.
        let all: u64 = [SLOT_UNMANAGED, SLOT, BACKEND_SLOT]
            .into_iter()
            .flat_map(|slot| (0..COUNTER_STRIDE).map(move |i| slot * COUNTER_STRIDE + i))
            .map(|i| {
                let v = svc.env.metrics.get(&i, 0).expect("read metrics");
                v.iter().map(|c| c.packets).sum::<u64>()
            })
            .sum();
        assert_eq!(all, 4, "only the unknown-source counter counts");
        assert_eq!(
            svc.env
                .counter(0, DIR_EGRESS, REASON_DROP_UNKNOWN_SOURCE)
                .packets,
            4
        );
    });
}

#[test]
fn a_second_pending_flow_from_the_same_source_port_is_refused() {
    with_second_ifindex(|backend_if| {
        let svc = SvcEnv::new(backend_if, true);
        let c = svc.client_if;
        let a = ipv4(POD, CLUSTER_IP, PROTO_TCP, &tcp(40007, 80, TCP_SYN));
        let b = ipv4(POD, CLUSTER_IP_2, PROTO_TCP, &tcp(40007, 80, TCP_SYN));
        svc.check(
            PROG_FROM_POD,
            &a,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
        // After the DNAT the two would look alike (same source): the second fails closed.
        svc.check(
            PROG_FROM_POD,
            &b,
            c,
            0,
            false,
            (c, DIR_EGRESS, REASON_DROP_POLICY),
        );
        assert!(svc.pending_entry(40007, CLUSTER_IP_2, 80).is_none());
        // Once the first is confirmed, the second may be deferred.
        let translated = ipv4(POD, BACKEND, PROTO_TCP, &tcp(40007, 8080, TCP_SYN));
        svc.check(
            PROG_TO_POD,
            &translated,
            backend_if,
            MARK_DEFERRED,
            true,
            (c, DIR_EGRESS, REASON_POLICY_ALLOW),
        );
        svc.check(
            PROG_FROM_POD,
            &b,
            c,
            0,
            true,
            (c, DIR_EGRESS, REASON_DEFERRED),
        );
    });
}

/// Total packets of (dir, reason) over every slot, as the metrics see them.
fn total(counters: &npm_agent::datapath::DatapathCounters, dir: u8, reason: u8) -> u64 {
    use npm_agent::datapath::CounterReader as _;
    counters
        .read()
        .expect("read counters")
        .iter()
        .filter(|c| c.dir == dir && c.reason == reason)
        .map(|c| c.packets)
        .sum()
}

fn slot_packets(
    metrics: &PerCpuArray<MapData, MetricsValue>,
    slot: u32,
    dir: u8,
    reason: u8,
) -> u64 {
    metrics
        .get(&counter_index(slot, dir, reason), 0)
        .expect("read slot")
        .iter()
        .map(|v| v.packets)
        .sum()
}

#[test]
fn counter_slots_start_from_zero_and_totals_survive_reuse_removal_and_restart() {
    use aya::maps::PerCpuValues;
    use npm_agent::enforcer::Enforcer;
    use npm_agent::model::{Namespace, Pod, Policy, Selector};
    use npm_agent::state::ClusterSnapshot;
    use npm_common::metrics::SLOT_RETIRED;

    let dir = PathBuf::from(format!("/sys/fs/bpf/npm-test-slots-{}", std::process::id()));
    let _guard = DirGuard(dir.clone());
    let pin = dir.join("v");

    // One local pod on IFINDEX, isolated for ingress with no rule: every new flow is dropped.
    let mut s = ClusterSnapshot::default();
    s.namespaces.insert(
        "a".into(),
        Namespace {
            name: "a".into(),
            labels: Default::default(),
        },
    );
    let web = Pod {
        namespace: "a".into(),
        name: "web".into(),
        labels: Default::default(),
        ips: vec!["10.0.0.1".parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    };
    s.local.insert(web.obj_ref(), IFINDEX);
    s.pods.insert(web.obj_ref(), web.clone());
    let deny = Policy {
        namespace: "a".into(),
        name: "deny".into(),
        pod_selector: Selector::default(),
        ingress: Some(vec![]),
        egress: None,
    };
    s.policies.insert(deny.obj_ref(), deny);
    let syn = ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN));
    let drop_syns = |e: &Enforcer, n: usize| {
        for _ in 0..n {
            let r = e
                .datapath()
                .test_run(PROG_TO_POD, &syn, IFINDEX, 1)
                .expect("test run");
            assert_eq!(r.retval, TC_ACT_SHOT);
        }
    };
    let (dirn, why) = (DIR_INGRESS, REASON_DROP_POLICY);

    let mut with_link = s.clone();
    with_link.pending_links.insert(4242);
    let slot = {
        let mut e = Enforcer::new(Some(&pin)).expect("load (root required)");
        assert_eq!(e.apply(&s).sync.failed, 0);
        let slot = e.compiler().maps().endpoints[&IFINDEX].slot;
        assert!(slot >= npm_common::metrics::SLOT_FIRST);
        drop_syns(&e, 3);
        let mut metrics: PerCpuArray<MapData, MetricsValue> = PerCpuArray::try_from(
            e.datapath()
                .map_handle(MAP_METRICS)
                .expect("metrics handle"),
        )
        .expect("typed");
        let counters = e.counters().expect("counters");
        assert_eq!(slot_packets(&metrics, slot, dirn, why), 3);
        assert_eq!(total(&counters, dirn, why), 3);

        // Left-over counts in the slot the next interface gets (the lowest never handed out).
        let next = slot + 1;
        let n = aya::util::nr_cpus().expect("cpus");
        let mut stale = vec![MetricsValue::default(); n];
        stale[0] = MetricsValue {
            packets: 1000,
            bytes: 1,
        };
        metrics
            .set(
                counter_index(next, dirn, why),
                PerCpuValues::try_from(stale).expect("values"),
                0,
            )
            .expect("prefill");
        let r = e.apply(&with_link);
        assert_eq!((r.sync.failed, r.sync.resets), (0, 1));
        assert_eq!(e.compiler().maps().endpoints[&4242].slot, next);
        assert_eq!(
            slot_packets(&metrics, next, dirn, why),
            0,
            "a slot handed to a new interface starts from zero"
        );
        assert_eq!(slot_packets(&metrics, SLOT_RETIRED, dirn, why), 1000);
        assert_eq!(total(&counters, dirn, why), 1003, "totals never go down");
        slot
    };

    // A new agent adopts the pinned maps: the interfaces keep their slots, nothing is reset,
    // and the counts carry on.
    let mut e = Enforcer::new(Some(&pin)).expect("reload");
    let r = e.apply(&with_link);
    assert_eq!((r.sync.failed, r.sync.resets), (0, 0));
    assert_eq!(e.compiler().maps().endpoints[&IFINDEX].slot, slot);
    drop_syns(&e, 1);
    let metrics: PerCpuArray<MapData, MetricsValue> =
        PerCpuArray::try_from(e.datapath().map_handle(MAP_METRICS).expect("handle"))
            .expect("typed");
    let counters = e.counters().expect("counters");
    assert_eq!(slot_packets(&metrics, slot, dirn, why), 4);
    assert_eq!(total(&counters, dirn, why), 1004);

    // The pod goes: its slot's counts move to the retired slot, the total stays.
    let mut gone = with_link.clone();
    gone.pods.remove(&web.obj_ref());
    gone.local.remove(&web.obj_ref());
    let r = e.apply(&gone);
    assert_eq!((r.sync.failed, r.sync.resets), (0, 1));
    assert!(!e.compiler().maps().endpoints.contains_key(&IFINDEX));
    assert_eq!(slot_packets(&metrics, slot, dirn, why), 0);
    assert_eq!(total(&counters, dirn, why), 1004);
}

// ---------------------------------------------------------------------------------------
// ICMP errors related to their flow; later fragments of an allowed datagram
// ---------------------------------------------------------------------------------------

/// A router on the path (an address nothing in IDENTITIES knows, so no policy names it).
const ROUTER: [u8; 4] = [192, 0, 2, 1];
const ROUTER6: &str = "2001:db8::1";
const PEER6: &str = "fd00::2";
/// ICMP destination unreachable / fragmentation needed, time exceeded.
const ICMP_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv6 destination unreachable, packet too big.
const ICMPV6_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// The embedded IP header plus the 8 bytes of L4 header every error carries.
const KEEP4: usize = 28;
const KEEP6: usize = 48;

/// Both directions isolated; the pod may open TCP 80 to the peer (both families) and the
/// peer may open TCP 443 to the pod. Nothing allows ICMP, in either direction.
fn icmp_env() -> Env {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.identity(v6(PEER6), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_EGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 443, POLICY_PREFIX_FULL);
    env
}

/// The pod's connection to peer:80 from port 40000 and the peer's to pod:443 from port
/// 50000, tracked at the pod's interface (their SYNs allowed).
fn open_flows(env: &Env) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let out4 = ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_ACK));
    let out6 = ipv6(v6(POD6), v6(PEER6), PROTO_TCP, &tcp(40000, 80, TCP_ACK));
    // The pod's answers on the connections the peer opened.
    let answer4 = ipv4(POD, PEER, PROTO_TCP, &tcp(443, 50000, TCP_ACK));
    let answer6 = ipv6(v6(POD6), v6(PEER6), PROTO_TCP, &tcp(443, 50000, TCP_ACK));
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv6(v6(POD6), v6(PEER6), PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(50000, 443, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_TO_POD,
        &ipv6(v6(PEER6), v6(POD6), PROTO_TCP, &tcp(50000, 443, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    assert_eq!(env.ct_lens(), (2, 2));
    (out4, out6, answer4, answer6)
}

/// Path MTU discovery to and from an isolated pod: a router's Fragmentation Needed (IPv4) or
/// Packet Too Big (IPv6) about a segment the pod sent, on a connection it opened or one it
/// accepted, reaches the pod (counted as a reply of that flow), as do other errors about
/// those flows; nothing is tracked or refreshed for them.
#[test]
fn icmp_errors_about_a_tracked_flow_reach_an_isolated_pod() {
    let env = icmp_env();
    let (out4, out6, answer4, answer6) = open_flows(&env);
    let entries = |env: &Env| {
        [
            ct_key(v4(POD), 40000, v4(PEER), 80, PROTO_TCP).0,
            ct_key(v6(POD6), 40000, v6(PEER6), 80, PROTO_TCP).0,
        ]
        .map(|k| env.ct_entry(&k).expect("tracked"))
    };
    let before = entries(&env);

    for segment in [&out4, &answer4] {
        let err = icmp_error(ICMP_UNREACH, ICMP_FRAG_NEEDED, 1400, segment, KEEP4);
        env.pass(
            PROG_TO_POD,
            &ipv4(ROUTER, POD, PROTO_ICMP, &err),
            REASON_REPLY,
        );
        // Linux quotes up to 576 bytes: a longer quote is the same error.
        let err = icmp_error(ICMP_TIME_EXCEEDED, 0, 0, segment, 200);
        env.pass(
            PROG_TO_POD,
            &ipv4(ROUTER, POD, PROTO_ICMP, &err),
            REASON_REPLY,
        );
    }
    for segment in [&out6, &answer6] {
        let err = icmp_error(ICMPV6_PACKET_TOO_BIG, 0, 1280, segment, KEEP6);
        let pkt = ipv6(v6(ROUTER6), v6(POD6), PROTO_ICMPV6, &err);
        env.pass(PROG_TO_POD, &pkt, REASON_REPLY);
        // From the peer itself (port unreachable), as well as from a router.
        let err = icmp_error(ICMPV6_UNREACH, 4, 0, segment, KEEP6);
        let pkt = ipv6(v6(PEER6), v6(POD6), PROTO_ICMPV6, &err);
        env.pass(PROG_TO_POD, &pkt, REASON_REPLY);
    }
    assert_eq!(env.ct_lens(), (2, 2), "errors create no entries");
    assert_eq!(entries(&env), before, "errors refresh nothing");

    // An echo the pod sent, allowed by an any-protocol rule to a second peer: a host
    // unreachable about it comes back.
    let mut env = env;
    let other = [10, 0, 0, 9];
    env.identity(v4(other), PEER_ID + 1, 0, 0);
    env.allow(PEER_ID + 1, DIR_EGRESS, 0, 0, POLICY_PREFIX_ANY_PROTO);
    let echo = ipv4(POD, other, PROTO_ICMP, &icmp(8, 77));
    env.pass(PROG_FROM_POD, &echo, REASON_POLICY_ALLOW);
    let err = icmp_error(ICMP_UNREACH, 1, 0, &echo, KEEP4);
    env.pass(
        PROG_TO_POD,
        &ipv4(ROUTER, POD, PROTO_ICMP, &err),
        REASON_REPLY,
    );
}

/// An error a pod sends about a packet of a flow it tracks (port unreachable for a datagram
/// it accepted) goes back to that packet's sender; to anyone else, or from an address that
/// is not the pod's, it is judged as any new ICMP flow (dropped by the isolated egress, or
/// as spoofed).
#[test]
fn icmp_errors_a_pod_sends_go_only_to_the_flows_peer() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.identity(v4([10, 0, 0, 254]), 0, 0, PEER_HOST);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_UDP, 53, POLICY_PREFIX_FULL);
    let query = ipv4(PEER, POD, PROTO_UDP, &udp(5000, 53));
    env.pass(PROG_TO_POD, &query, REASON_POLICY_ALLOW);
    let err = icmp_error(ICMP_UNREACH, 3, 0, &query, KEEP4);
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_ICMP, &err),
        REASON_REPLY,
    );
    // To a third address: not the sender of the datagram it reports on.
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, [10, 0, 0, 77], PROTO_ICMP, &err),
        REASON_DROP_POLICY,
    );
    // From an address that is not the pod's (the node's, another pod's): the source rule.
    env.deny(
        PROG_FROM_POD,
        &ipv4([10, 0, 0, 254], PEER, PROTO_ICMP, &err),
        REASON_DROP_SPOOFED,
    );
    // About a datagram the pod never received (another port).
    let other = ipv4(PEER, POD, PROTO_UDP, &udp(5000, 54));
    let err = icmp_error(ICMP_UNREACH, 3, 0, &other, KEEP4);
    env.deny(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_ICMP, &err),
        REASON_DROP_POLICY,
    );
    assert_eq!(env.ct_len(), 1, "errors create no entries");
}

/// Errors about anything but a live, confirmed flow of this pod, in the direction the quoted
/// packet claims, are judged as new ICMP flows: dropped by the isolated ingress.
#[test]
fn icmp_errors_about_unknown_foreign_pending_or_truncated_flows_are_dropped() {
    let mut env = icmp_env();
    let (out4, out6, _, _) = open_flows(&env);
    let deny4 = |env: &Env, embedded: &[u8], keep: usize, what: &str| {
        let err = icmp_error(ICMP_UNREACH, ICMP_FRAG_NEEDED, 1400, embedded, keep);
        let pkt = ipv4(ROUTER, POD, PROTO_ICMP, &err);
        assert_eq!(env.run(PROG_TO_POD, &pkt), TC_ACT_SHOT, "{what}");
    };
    let deny6 = |env: &Env, embedded: &[u8], keep: usize, what: &str| {
        let err = icmp_error(ICMPV6_PACKET_TOO_BIG, 0, 1280, embedded, keep);
        let pkt = ipv6(v6(ROUTER6), v6(POD6), PROTO_ICMPV6, &err);
        assert_eq!(env.run(PROG_TO_POD, &pkt), TC_ACT_SHOT, "{what}");
    };
    // Counted as policy drops.
    let err = icmp_error(ICMP_UNREACH, ICMP_FRAG_NEEDED, 1400, &out4, KEEP4 - 1);
    env.deny(
        PROG_TO_POD,
        &ipv4(ROUTER, POD, PROTO_ICMP, &err),
        REASON_DROP_POLICY,
    );

    // Untracked: another source port, another destination.
    deny4(
        &env,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(40001, 80, 0)),
        KEEP4,
        "untracked port",
    );
    deny4(
        &env,
        &ipv4(POD, [10, 0, 0, 3], PROTO_TCP, &tcp(40000, 80, 0)),
        KEEP4,
        "untracked peer",
    );
    deny6(
        &env,
        &ipv6(v6(POD6), v6(PEER6), PROTO_TCP, &tcp(40001, 80, 0)),
        KEEP6,
        "untracked IPv6 port",
    );
    deny4(
        &env,
        &ipv4(POD, PEER, PROTO_UDP, &udp(40000, 80)),
        KEEP4,
        "another protocol",
    );
    // The quoted packet claims the other direction (the peer's to the pod): the error would
    // go to the peer, not the pod.
    deny4(
        &env,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(80, 40000, 0)),
        KEEP4,
        "reversed",
    );
    // Truncated: the embedded IP header without the 8 bytes of ports.
    deny4(&env, &out4, KEEP4 - 1, "truncated");
    deny4(&env, &out4, 20, "only the IP header");
    deny6(&env, &out6, KEEP6 - 1, "truncated IPv6");
    deny6(&env, &out6, 40, "only the IPv6 header");
    // A mismatched family (IPv6 quoted in ICMPv4).
    deny4(&env, &out6, KEEP6, "IPv6 in ICMP");

    // Another pod's flow: the same tuple tracked at another interface only, and a flow of
    // another pod's address.
    let other_pod = [10, 0, 0, 3];
    let mut foreign = ct_key(v4(other_pod), 40000, v4(PEER), 80, PROTO_TCP).0;
    foreign.ifindex = 7;
    let live = CtValue {
        expires_ns: u64::MAX,
        origin_dir: DIR_EGRESS,
        flags: CT_SEEN_REPLY
            | if ct_key(v4(other_pod), 40000, v4(PEER), 80, PROTO_TCP).1 {
                CT_ORIGIN_LO
            } else {
                0
            },
        slot: 9,
        _pad: [0; 4],
    };
    env.ct_insert(foreign, live);
    let theirs = ipv4(other_pod, PEER, PROTO_TCP, &tcp(40000, 80, 0));
    deny4(
        &env,
        &theirs,
        KEEP4,
        "another pod's flow, error to this pod",
    );
    let mut here = foreign;
    here.ifindex = IFINDEX;
    // Even with an entry for that tuple at this interface, the error is not to its source.
    env.ct_insert(here, live);
    deny4(
        &env,
        &theirs,
        KEEP4,
        "a flow of another address, error to this pod",
    );
    env.ct_evict(&here);

    // Pending (deferred, not confirmed after the DNAT) and expired entries relate nothing.
    let (key, src_is_lo) = ct_key(v4(POD), 41000, v4(PEER), 80, PROTO_TCP);
    let flags = if src_is_lo { CT_ORIGIN_LO } else { 0 };
    env.ct_insert(
        key,
        CtValue {
            expires_ns: u64::MAX,
            origin_dir: DIR_EGRESS,
            flags: flags | CT_PENDING,
            slot: SLOT as u16,
            _pad: [0; 4],
        },
    );
    let pending = ipv4(POD, PEER, PROTO_TCP, &tcp(41000, 80, 0));
    deny4(&env, &pending, KEEP4, "pending");
    env.ct_insert(
        key,
        CtValue {
            expires_ns: 1,
            origin_dir: DIR_EGRESS,
            flags,
            slot: SLOT as u16,
            _pad: [0; 4],
        },
    );
    deny4(&env, &pending, KEEP4, "expired");
    // Made live and confirmed, the same entry relates the same error.
    env.ct_insert(
        key,
        CtValue {
            expires_ns: u64::MAX,
            origin_dir: DIR_EGRESS,
            flags,
            slot: SLOT as u16,
            _pad: [0; 4],
        },
    );
    let err = icmp_error(ICMP_UNREACH, ICMP_FRAG_NEEDED, 1400, &pending, KEEP4);
    env.pass(
        PROG_TO_POD,
        &ipv4(ROUTER, POD, PROTO_ICMP, &err),
        REASON_REPLY,
    );
    // The four flows, the foreign entry and the pending-then-confirmed one.
    assert_eq!(env.ct_lens(), (4, 2), "errors create no entries");
}

/// The pod's DNS query to the peer (egress not isolated) and the peer's answer in three
/// fragments (as a 4096-byte EDNS answer arrives): the first has the ports and passes as a
/// reply; the later ones carry no ports and pass on the first one's verdict. A datagram
/// whose first fragment was not seen (another identification, another source, fragments
/// that arrive before their first) is judged without ports: dropped by the isolated ingress.
#[test]
fn later_fragments_of_a_passed_datagram_pass_an_isolated_pod() {
    let env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    let query = ipv4(POD, PEER, PROTO_UDP, &udp(5353, 53));
    env.pass(PROG_FROM_POD, &query, REASON_NOT_ISOLATED);
    const MF: u16 = 0x2000;
    let first = |id| ipv4_frag_id(PEER, POD, PROTO_UDP, MF, id, &udp(53, 5353));
    let middle = |id| ipv4_frag_id(PEER, POD, PROTO_UDP, MF | 185, id, &[0xaa; 64]);
    let last = |id| ipv4_frag_id(PEER, POD, PROTO_UDP, 370, id, &[0xbb; 64]);

    // Before its first fragment, a later one finds nothing: dropped (out of order).
    env.deny(PROG_TO_POD, &middle(0x1234), REASON_DROP_POLICY);
    env.pass(PROG_TO_POD, &first(0x1234), REASON_REPLY);
    env.pass(PROG_TO_POD, &middle(0x1234), REASON_REPLY);
    env.pass(PROG_TO_POD, &last(0x1234), REASON_REPLY);
    // Another datagram's later fragments.
    env.deny(PROG_TO_POD, &last(0x1235), REASON_DROP_POLICY);
    // The same identification from another source, or in the other direction.
    let other = ipv4_frag_id([10, 0, 0, 3], POD, PROTO_UDP, 370, 0x1234, &[0xbb; 64]);
    env.deny(PROG_TO_POD, &other, REASON_DROP_POLICY);
    let tcp_frag = ipv4_frag_id(PEER, POD, PROTO_TCP, 370, 0x1234, &[0xbb; 64]);
    env.deny(PROG_TO_POD, &tcp_frag, REASON_DROP_POLICY);
    assert_eq!(env.frags.keys().count(), 1, "one datagram recorded");
    assert_eq!(env.ct_len(), 1, "fragments track nothing");

    // IPv6: the fragment header's 32-bit identification.
    let pod = v6(POD6);
    let peer = v6(PEER6);
    env.pass(
        PROG_FROM_POD,
        &ipv6(pod, peer, PROTO_UDP, &udp(5353, 53)),
        REASON_NOT_ISOLATED,
    );
    let frag6 = |offset, more, id, l4: &[u8]| {
        ipv6_ext(
            peer,
            pod,
            &[(44, ext_frag_id(offset, more, id))],
            PROTO_UDP,
            l4,
        )
    };
    env.deny(
        PROG_TO_POD,
        &frag6(185, false, 0xdead_beef, &[0; 64]),
        REASON_DROP_POLICY,
    );
    env.pass(
        PROG_TO_POD,
        &frag6(0, true, 0xdead_beef, &udp(53, 5353)),
        REASON_REPLY,
    );
    env.pass(
        PROG_TO_POD,
        &frag6(185, false, 0xdead_beef, &[0; 64]),
        REASON_REPLY,
    );
    env.deny(
        PROG_TO_POD,
        &frag6(185, false, 0xdead_bef0, &[0; 64]),
        REASON_DROP_POLICY,
    );
    assert_eq!(env.ct_len(), 2, "fragments track nothing");
}

/// A first fragment allowed by policy as a new flow passes its later fragments under the
/// same verdict; a denied first fragment records nothing; an expired record is ignored.
#[test]
fn later_fragments_follow_the_policy_verdict_of_their_first_fragment() {
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_UDP, 53, POLICY_PREFIX_FULL);
    const MF: u16 = 0x2000;
    let first = |dport, id| ipv4_frag_id(PEER, POD, PROTO_UDP, MF, id, &udp(5000, dport));
    let later = |id| ipv4_frag_id(PEER, POD, PROTO_UDP, 185, id, &[0xaa; 64]);
    env.pass(PROG_TO_POD, &first(53, 7), REASON_POLICY_ALLOW);
    env.pass(PROG_TO_POD, &later(7), REASON_POLICY_ALLOW);
    // A first fragment to a port the policy does not allow: its datagram stays out.
    env.deny(PROG_TO_POD, &first(54, 8), REASON_DROP_POLICY);
    env.deny(PROG_TO_POD, &later(8), REASON_DROP_POLICY);
    // The record of datagram 7 dies after FRAG_TIMEOUT_NS: made expired, it is ignored.
    let keys: Vec<FragKey> = env.frags.keys().map(|k| k.expect("key")).collect();
    assert_eq!(keys.len(), 1);
    let mut value = env.frags.get(&keys[0], 0).expect("record");
    assert_eq!(
        (value.reason, u32::from(value.slot)),
        (REASON_POLICY_ALLOW, SLOT)
    );
    value.expires_ns = 1;
    env.frags
        .insert(keys[0], value, 0)
        .expect("expire the record");
    env.deny(PROG_TO_POD, &later(7), REASON_DROP_POLICY);
}

/// Reads every event waiting in the ring buffer.
fn drain_events(ring: &mut aya::maps::RingBuf<MapData>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(npm_agent::datapath::inspect::event_from_bytes(&item).expect("an Event record"));
    }
    out
}

fn event_stats(stats: &PerCpuArray<MapData, EventStats>) -> (u64, u64, u64) {
    let v = stats.get(&0, 0).expect("event stats");
    v.iter().fold((0, 0, 0), |(w, s, l), e| {
        (w + e.written, s + e.suppressed, l + e.lost)
    })
}

#[test]
fn drops_write_events_passes_none_and_a_flood_is_rate_limited_without_changing_verdicts() {
    use std::time::Instant;
    let mut env = Env::new().endpoint(EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS);
    env.identity(v4(PEER), PEER_ID, 0, 0);
    env.allow(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_PREFIX_FULL);
    let mut ring = aya::maps::RingBuf::try_from(env.dp.take_map(MAP_EVENTS).expect("events map"))
        .expect("ring buffer");
    let stats: PerCpuArray<MapData, EventStats> =
        PerCpuArray::try_from(env.dp.take_map(MAP_EVENT_STATS).expect("event stats map"))
            .expect("per-CPU array");

    // Allowed packets write nothing.
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40000, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.pass(
        PROG_FROM_POD,
        &ipv4(POD, PEER, PROTO_TCP, &tcp(80, 40000, TCP_ACK)),
        REASON_REPLY,
    );
    assert!(
        drain_events(&mut ring).is_empty(),
        "an allowed packet wrote an event"
    );

    // A denied one writes one event with what the datapath judged.
    let denied = ipv4(PEER, POD, PROTO_UDP, &udp(40001, 53));
    env.deny(PROG_TO_POD, &denied, REASON_DROP_POLICY);
    let ev = drain_events(&mut ring);
    assert_eq!(ev.len(), 1, "one drop, one event: {ev:?}");
    let e = ev[0];
    assert_eq!(
        (e.kind, e.dir, e.reason, e.ifindex, e.slot),
        (EVENT_DROP, DIR_INGRESS, REASON_DROP_POLICY, IFINDEX, SLOT)
    );
    assert_eq!((e.src, e.dst, e.proto), (v4(PEER), v4(POD), PROTO_UDP));
    assert_eq!(
        (u16::from_be(e.sport_be), u16::from_be(e.dport_be)),
        (40001, 53)
    );
    assert_eq!(e.len as usize, denied.len());
    assert_ne!(e.time_ns, 0);
    // Egress, IPv6: the direction and the 16-byte addresses.
    env.deny(
        PROG_FROM_POD,
        &ipv6(
            v6(POD6),
            v6("fd00::99"),
            PROTO_TCP,
            &tcp(40002, 8443, TCP_SYN),
        ),
        REASON_DROP_POLICY,
    );
    let ev = drain_events(&mut ring);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (
            ev[0].dir,
            ev[0].src,
            ev[0].dst,
            ev[0].proto,
            u16::from_be(ev[0].dport_be)
        ),
        (DIR_EGRESS, v6(POD6), v6("fd00::99"), PROTO_TCP, 8443)
    );
    assert_eq!(event_stats(&stats), (2, 0, 0));

    // A flood: every packet still dropped, at most the buckets' allowance written, the
    // rest counted as suppressed.
    const FLOOD: u64 = 3_000;
    let start = Instant::now();
    for i in 0..FLOOD {
        let p = ipv4(PEER, POD, PROTO_TCP, &tcp(1024 + i as u16, 81, TCP_SYN));
        let r = env
            .dp
            .test_run(PROG_TO_POD, &p, IFINDEX, 1)
            .expect("test run");
        assert_eq!(r.retval, TC_ACT_SHOT, "packet {i} of the flood");
    }
    let secs = start.elapsed().as_secs_f64();
    let cpus = aya::util::nr_cpus().expect("cpus") as u64;
    // Each CPU the test ran on: its bucket (at most full) plus what refilled while it ran
    // (the datapath clock ticks in jiffies: one more tick's worth, 10 ms at HZ=100).
    let allowance = cpus * (EVENTS_BURST + ((secs + 0.01) * EVENTS_PER_SEC as f64).ceil() as u64);
    let (written, suppressed, lost) = event_stats(&stats);
    let flood_written = written - 2;
    assert_eq!(
        flood_written + suppressed + lost,
        FLOOD,
        "every drop is accounted for"
    );
    assert_eq!(lost, 0, "the ring buffer has room for the allowance");
    assert!(
        flood_written <= allowance,
        "{flood_written} events written in {secs:.3} s, allowance {allowance}"
    );
    assert!(
        flood_written >= EVENTS_BURST.min(FLOOD),
        "the burst is written: {flood_written}"
    );
    assert!(suppressed >= FLOOD - allowance, "suppressed {suppressed}");
    let ev = drain_events(&mut ring);
    assert_eq!(ev.len() as u64, flood_written, "read what was written");
    assert!(
        ev.iter()
            .all(|e| e.reason == REASON_DROP_POLICY && u16::from_be(e.dport_be) == 81)
    );
    // An empty bucket changes no verdict: allowed still passes, denied still drops.
    env.pass(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40003, 80, TCP_SYN)),
        REASON_POLICY_ALLOW,
    );
    env.deny(
        PROG_TO_POD,
        &ipv4(PEER, POD, PROTO_TCP, &tcp(40004, 82, TCP_SYN)),
        REASON_DROP_POLICY,
    );
    assert_eq!(
        env.counter(IFINDEX, DIR_INGRESS, REASON_DROP_POLICY)
            .packets,
        FLOOD + 2
    );
}
