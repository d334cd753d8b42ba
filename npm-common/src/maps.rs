//! Map names, sizes, keys and values of the datapath.
//!
//! Addresses are always 16 bytes in network byte order: IPv6 as is, IPv4 as an IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`), so one map and one code path serve both families. An IPv4
//! CIDR `a.b.c.d/n` is stored with prefix length `96 + n`. (The compiler keeps IPv6 CIDRs such
//! as `::/0` from matching IPv4 traffic by excluding `::ffff:0:0/96` from them.)
//!
//! Lookups per packet are fixed: `CONNTRACK` (one lookup; a hit ends the packet's path),
//! `ENDPOINTS` (by interface), `IDENTITIES` (peer IP; its entry also holds the address's CIDR
//! class), `CIDRS` (LPM, only for an address IDENTITIES does not know), at most two `PAIRS`
//! hash lookups (peer identity, peer class), each followed by a `POLICY` LPM lookup only when
//! the pair holds more entries than it carries inline, and one `METRICS` array slot.

/// A 16-byte address in network byte order (IPv4 mapped into IPv6).
pub type Addr16 = [u8; 16];

/// The IPv4-mapped prefix `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// Prefix length of `::ffff:0:0/96`: an IPv4 `/n` becomes `/(96 + n)`.
pub const V4_MAPPED_PREFIX_LEN: u32 = 96;

/// Maps an IPv4 address given as its four bytes (network order) into an [`Addr16`].
#[inline(always)]
pub const fn addr_from_v4(b: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// True when `a` is an IPv4-mapped address.
#[inline(always)]
pub const fn is_v4_mapped(a: &Addr16) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

// ---- map names (also the pin file names under the pin directory) ----
pub const MAP_ENDPOINTS: &str = "NPM_ENDPOINTS";
pub const MAP_IDENTITIES: &str = "NPM_IDENTITIES";
pub const MAP_CIDRS: &str = "NPM_CIDRS";
pub const MAP_POLICY: &str = "NPM_POLICY";
pub const MAP_PAIRS: &str = "NPM_PAIRS";
pub const MAP_CONNTRACK: &str = "NPM_CT";
pub const MAP_CONNTRACK4: &str = "NPM_CT4";
pub const MAP_METRICS: &str = "NPM_METRICS";
/// Array of three u64, the first two read by the datapath on every packet: nanoseconds per
/// jiffy (10⁹ / HZ, `CLOCK_NS_PER_JIFFY`), the datapath's clock factor; the flow cache's
/// generation (`FLOWS_GEN_ACTIVE`, 0 = cache off), a logical clock userspace advances; and the
/// last generation handed out (`FLOWS_GEN_LAST`, userspace's bookkeeping).
pub const MAP_CLOCK: &str = "NPM_CLOCK";
/// `NPM_CLOCK` entries.
pub const CLOCK_ENTRIES: u32 = 3;
/// `NPM_CLOCK` index of the nanoseconds per jiffy.
pub const CLOCK_NS_PER_JIFFY: u32 = 0;
/// Per-CPU array of [`FlowEntry`]: the established-flow cache in front of the conntrack maps.
pub const MAP_FLOWS: &str = "NPM_FLOWS";
pub const MAP_SERVICES: &str = "NPM_SERVICES";
pub const MAP_DEFERRED: &str = "NPM_DEFERRED";
/// LRU hash of [`FragKey`] → [`FragValue`]: the verdict of a fragmented datagram's first
/// fragment, for its later fragments (which carry no ports).
pub const MAP_FRAGS: &str = "NPM_FRAGS";

/// Program names in the object file.
pub const PROG_FROM_POD: &str = "npm_from_pod";
pub const PROG_TO_POD: &str = "npm_to_pod";
/// A classifier that touches nothing and returns `TC_ACT_PIPE`: the baseline the benchmark
/// runs the same packet through, so the enforcement's own cost is visible. Never attached.
pub const PROG_PASS: &str = "npm_pass";
/// The post-DNAT egress check for deferred packets leaving the node (TC egress of every host
/// link that is neither loopback nor a managed pod interface); unmarked packets pass at once.
pub const PROG_HOST_EGRESS: &str = "npm_host_egress";
/// Returns the low 31 bits of `jiffies`: the loader's HZ probe. Never attached.
pub const PROG_CLOCK: &str = "npm_clock";
/// The benchmark's new-flow path: bumps the packet's source port, then runs `npm_to_pod`, so
/// each repetition of one `BPF_PROG_TEST_RUN` call is a new flow. Loaded only on request
/// (`Datapath::load_bench_programs`), never attached.
pub const PROG_BENCH_NEW: &str = "npm_bench_new";
/// [`PROG_BENCH_NEW`]'s baseline: the source-port bump alone. Loaded only on request.
pub const PROG_BENCH_BUMP: &str = "npm_bench_bump";

// ---- sizes ----
pub const ENDPOINTS_MAX: u32 = 16_384;
pub const IDENTITIES_MAX: u32 = 262_144;
pub const CIDRS_MAX: u32 = 65_536;
pub const POLICY_MAX: u32 = 1_048_576;
/// At most one pair per POLICY entry.
pub const PAIRS_MAX: u32 = POLICY_MAX;
/// Entries of each conntrack map (`NPM_CT4` for IPv4 flows, `NPM_CT` for IPv6 flows; Cilium
/// too keeps separate v4 and v6 tables).
pub const CONNTRACK_MAX: u32 = 262_144;
/// log2 of the flow cache's slots per CPU.
pub const FLOWS_BITS: u32 = 11;
/// Slots per CPU of the flow cache (`NPM_FLOWS`, 64 bytes each: 128 KiB per CPU).
pub const FLOWS_MAX: u32 = 1 << FLOWS_BITS;
/// Counter slots of [`crate::metrics`]: one per local endpoint (host-side interface in
/// ENDPOINTS), sized for the pods one node runs (kubelet's default is 110, AKS allows 250)
/// with room for pending interfaces and churn. An endpoint beyond it counts under
/// [`crate::metrics::SLOT_UNMANAGED`].
pub const COUNTER_SLOTS: u32 = 2_048;
pub const METRICS_MAX: u32 = COUNTER_SLOTS * crate::metrics::COUNTER_STRIDE;
pub const SERVICES_MAX: u32 = 256;
pub const DEFERRED_MAX: u32 = 65_536;
/// Fragmented datagrams remembered at once (Cilium's fragment map has as many); the LRU
/// evicts the oldest, whose later fragments are then judged without ports.
pub const FRAGS_MAX: u32 = 8_192;

// ---- ENDPOINTS: host-side ifindex (u32) -> EndpointInfo ----

/// The endpoint is isolated for ingress: new inbound connections need a POLICY entry.
pub const EP_ISOLATE_INGRESS: u32 = 1 << 0;
/// The endpoint is isolated for egress: new outbound connections need a POLICY entry.
pub const EP_ISOLATE_EGRESS: u32 = 1 << 1;
/// Some POLICY entry of the endpoint's identity for ingress may name a CIDR class (it has an
/// ipBlock or "any peer" ingress rule); without it the CIDRS lookup and its POLICY lookup are
/// skipped. Set by the compiler; never set without `EP_ISOLATE_INGRESS`.
pub const EP_CLASS_INGRESS: u32 = 1 << 2;
/// As [`EP_CLASS_INGRESS`], for egress.
pub const EP_CLASS_EGRESS: u32 = 1 << 3;

/// A local pod, found by the host-side interface its traffic crosses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointInfo {
    /// The pod's identity (namespace, labels, named ports): the `local_id` of its POLICY entries.
    pub id: u32,
    /// `EP_ISOLATE_*` and `EP_CLASS_*` bits.
    pub flags: u32,
    /// The endpoint's counter slot in METRICS ([`crate::metrics::counter_index`]): stable
    /// while the interface is in ENDPOINTS, zeroed before it is handed to a new interface.
    /// 0 ([`crate::metrics::SLOT_UNMANAGED`]) when the slots ran out.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 12);

// ---- IDENTITIES: pod or node IP (Addr16) -> PeerInfo ----

/// The address belongs to this node: traffic from/to it is always allowed.
pub const PEER_HOST: u32 = 1 << 0;

/// What an IP address is, as a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerInfo {
    /// Pod identity (1..`POD_ID_MAX`), or 0 for a node address.
    pub id: u32,
    /// Host-side ifindex when the pod is local to this node, else 0 (used to let a pod reach itself).
    pub ifindex: u32,
    /// `PEER_*` bits.
    pub flags: u32,
    /// The CIDR class of this address: what a CIDRS lookup of it returns (the class of the
    /// longest ipBlock prefix containing it), 0 when no prefix does. Kept in step with CIDRS by
    /// the compiler, so the datapath never needs the CIDRS trie for a known address.
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<PeerInfo>() == 16);

/// Pod identities are `1..POD_ID_MAX` (`POD_ID_MAX` itself is [`ID_PENDING`]); CIDR classes have `CIDR_CLASS_BIT` set. 0 is "none".
pub const POD_ID_MAX: u32 = 0x7fff_ffff;
/// Set on every CIDR class id so the two id spaces never collide in POLICY keys.
pub const CIDR_CLASS_BIT: u32 = 0x8000_0000;
/// The identity of a pending endpoint: a new host-side interface whose pod is not known yet.
/// No POLICY entry ever uses it, so every isolated direction of such an interface drops new
/// flows, and it never appears in IDENTITIES (so no pending interface is "itself" to another).
/// Pod identities are handed out below it.
pub const ID_PENDING: u32 = POD_ID_MAX;

// ---- CIDRS: LPM trie, Addr16 -> CIDR class id (u32, with CIDR_CLASS_BIT) ----
// The class of an address is the set of ipBlock peers (cidr minus excepts) that contain it; the
// compiler assigns one id per distinct set, so a single longest-prefix match gives it exactly.

// ---- POLICY: LPM trie, PolicyKey -> PolicyValue ----

/// Key of the POLICY trie. Fixed fields first and protocol, then port last, so the trie can
/// wildcard "any protocol" (prefix `POLICY_PREFIX_ANY_PROTO`), "any port of one protocol"
/// (`POLICY_PREFIX_ANY_PORT`), and port ranges (split into power-of-two blocks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Identity of the local (selected) pod.
    pub local_id: u32,
    /// Pod identity or CIDR class of the remote side.
    pub peer_id: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    /// Destination port in network byte order (0 for protocols without ports).
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// Prefix length that matches every protocol and port (local_id, peer_id, dir).
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length that matches every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of an exact key.
pub const POLICY_PREFIX_FULL: u32 = (core::mem::size_of::<PolicyKey>() * 8) as u32;
const _: () = assert!(POLICY_PREFIX_FULL == 96);

/// Value of a POLICY entry: presence means "allow".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    /// Stable number of the first policy rule, in (policy, direction, index) order, that
    /// produced the entry (userspace table, for explain).
    pub rule_ref: u32,
    /// Reserved, zero.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

// ---- PAIRS: hash, PairKey -> PairValue ----

/// Key of PAIRS: one (local identity, peer identity or class, direction) that POLICY holds
/// at least one entry for. Looked up before POLICY: a peer no rule names costs one hash
/// lookup, whatever the size of the POLICY trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub local_id: u32,
    pub peer_id: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PairKey>() == 12);

/// How many (protocol, port block) entries a pair holds inline ([`PairValue::ports`]).
pub const PAIR_PORTS: usize = 4;
/// The pair has more than [`PAIR_PORTS`] POLICY entries in this direction: the POLICY trie
/// decides, and [`PairValue::ports`] is unused.
pub const PAIR_TRIE: u32 = 1 << 0;

/// One POLICY entry of a pair, inline: the entry's prefix length (`POLICY_PREFIX_ANY_PROTO`:
/// every protocol and port; `POLICY_PREFIX_ANY_PORT + k`: protocol `proto`, ports whose top `k`
/// bits equal those of `port`), 0 for an unused slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairPort {
    pub prefix_len: u8,
    pub proto: u8,
    /// First port of the block, host byte order.
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<PairPort>() == 4);

/// Value of PAIRS: with up to [`PAIR_PORTS`] entries the pair's whole POLICY content for
/// the direction (so an allowed new flow needs no trie walk either), else [`PAIR_TRIE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairValue {
    /// `PAIR_*` bits.
    pub flags: u32,
    pub ports: [PairPort; PAIR_PORTS],
}
const _: () = assert!(core::mem::size_of::<PairValue>() == 20);

impl PairPort {
    /// Whether a packet of `proto` to `port` (host order) matches this entry.
    #[inline(always)]
    pub const fn matches(&self, proto: u8, port: u16) -> bool {
        let len = self.prefix_len as u32;
        if len == POLICY_PREFIX_ANY_PROTO {
            return true;
        }
        if len < POLICY_PREFIX_ANY_PORT || len > POLICY_PREFIX_FULL || self.proto != proto {
            return false;
        }
        let bits = len - POLICY_PREFIX_ANY_PORT;
        let mask: u16 = if bits == 0 { 0 } else { !0u16 << (16 - bits) };
        port & mask == self.port & mask
    }
}

// ---- CONNTRACK: LRU hashes, CtKey4 (IPv4 flows) / CtKey (IPv6 flows) -> CtValue ----

/// A flow as seen at one endpoint. Both directions of a flow share one key: the two
/// (address, port) pairs are stored in sorted order (`lo` <= `hi`), so one lookup finds the
/// entry for the original direction and for replies alike.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey {
    pub addr_lo: Addr16,
    pub addr_hi: Addr16,
    /// Host-side ifindex of the endpoint that tracked the flow.
    pub ifindex: u32,
    /// Ports in network byte order; for ICMP echo both are the echo identifier.
    pub port_lo_be: u16,
    pub port_hi_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

/// The key of an IPv4 flow (both addresses IPv4-mapped) in `NPM_CT4`: [`CtKey`] with the
/// addresses' last 4 bytes only. Same fields and order, 20 bytes instead of 44, so the
/// kernel's hash and compare of the most common key cost less than half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtKey4 {
    pub addr_lo: [u8; 4],
    pub addr_hi: [u8; 4],
    pub ifindex: u32,
    pub port_lo_be: u16,
    pub port_hi_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 20);

impl CtKey {
    /// The [`CtKey4`] of an IPv4 flow (both addresses IPv4-mapped), else `None` (the flow
    /// lives in `NPM_CT`).
    pub fn to_v4(&self) -> Option<CtKey4> {
        if !is_v4_mapped(&self.addr_lo) || !is_v4_mapped(&self.addr_hi) {
            return None;
        }
        let [_, _, _, _, _, _, _, _, _, _, _, _, a, b, c, d] = self.addr_lo;
        let [_, _, _, _, _, _, _, _, _, _, _, _, e, f, g, h] = self.addr_hi;
        Some(CtKey4 {
            addr_lo: [a, b, c, d],
            addr_hi: [e, f, g, h],
            ifindex: self.ifindex,
            port_lo_be: self.port_lo_be,
            port_hi_be: self.port_hi_be,
            proto: self.proto,
            _pad: [0; 3],
        })
    }
}

impl CtKey4 {
    /// The [`CtKey`] of the same flow (addresses IPv4-mapped).
    pub const fn to_full(&self) -> CtKey {
        CtKey {
            addr_lo: addr_from_v4(self.addr_lo),
            addr_hi: addr_from_v4(self.addr_hi),
            ifindex: self.ifindex,
            port_lo_be: self.port_lo_be,
            port_hi_be: self.port_hi_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `CtValue::flags`: the originator of the flow is the `lo` side of the key.
pub const CT_ORIGIN_LO: u8 = 1 << 0;
/// `CtValue::flags`: a TCP FIN or RST was seen; the entry lives only `CT_TIMEOUT_TCP_CLOSING_NS`.
pub const CT_TCP_CLOSING: u8 = 1 << 1;
/// `CtValue::flags`: a packet was seen in the reply direction (TCP: the flow leaves the SYN
/// timeout for the established one). Set and read only by the datapath.
pub const CT_SEEN_REPLY: u8 = 1 << 2;

/// `CtValue::flags`: the flow's egress check was deferred to after the Service DNAT
/// ([`MARK_DEFERRED`]) and has not passed it yet. A pending entry lets nothing through: packets
/// of the originator are deferred again, packets towards it are judged as new. The post-DNAT
/// check clears the bit when the translated packet is allowed. Set and read only by the datapath.
pub const CT_PENDING: u8 = 1 << 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` after which the entry is dead.
    pub expires_ns: u64,
    /// Direction the flow was first seen in at this endpoint (`DIR_*`).
    pub origin_dir: u8,
    /// `CT_*` bits.
    pub flags: u8,
    /// The counter slot of the endpoint that tracked the flow (its `EndpointInfo::slot` when
    /// the entry was created), so a conntrack hit counts without an ENDPOINTS lookup.
    pub slot: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 16);

pub const CT_TIMEOUT_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 30 * 1_000_000_000;

// ---- FLOWS: per-CPU, direct-mapped cache of conntrack hits ----
//
// A conntrack hit whose entry would not be rewritten (no state change, deadline not due for a
// refresh) is copied here, and the next packet of the flow in the same direction on the same
// CPU passes on it without the conntrack lookup (a kernel hash lookup: `bench --spin
// established` 70-73 ns with it, 43-47 ns from the cache), until the entry's next refresh
// would be due (at most 1 s, the datapath's refresh slack, after its last rewrite) or the
// generation changes. It caches only what the conntrack
// path would have answered: the flow's full key, the direction and side, and the answer;
// TCP packets with SYN, FIN or RST and every non-TCP/UDP packet take the conntrack path.
// Per CPU, so nothing is shared and no entry can be read half-written.

/// `NPM_CLOCK` index of the generation the datapath reads: entries of another generation are
/// misses; 0 turns the cache off. Userspace changes it whenever it removes or rewrites
/// conntrack entries, so nothing cached outlives them. Always below 2³² (`FlowEntry::generation`).
pub const FLOWS_GEN_ACTIVE: u32 = 1;
/// `NPM_CLOCK` index of the last generation handed out (kept while the cache is off, so
/// turning it on again never revives old entries).
pub const FLOWS_GEN_LAST: u32 = 2;

/// `FlowEntry::key[0]` bits besides the direction (bits 0..8).
pub const FLOW_SRC_IS_LO: u32 = 1 << 8;
/// `FlowEntry::key[0]`: an IPv4 flow (`key[1..6]` is its `CtKey4`; else `key[1..12]` is its
/// `CtKey`).
pub const FLOW_V4: u32 = 1 << 9;

/// One slot of the flow cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// Word 0: the packet's direction | `FLOW_SRC_IS_LO` | `FLOW_V4`; then the conntrack
    /// key's bytes as native-order words (`CtKey4`: words 1..6, `CtKey`: words 1..12).
    pub key: [u32; 12],
    /// Datapath clock (ns) from which the entry is a miss: when the conntrack path would
    /// next refresh the entry's deadline.
    pub until_ns: u64,
    /// `NPM_CLOCK[FLOWS_GEN_ACTIVE]` when the entry was written.
    pub generation: u32,
    /// The endpoint's counter slot (`CtValue::slot`).
    pub slot: u16,
    /// The verdict reason (`REASON_ESTABLISHED` or `REASON_REPLY`).
    pub reason: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 64);

// ---- Services: the egress check after kube-proxy's DNAT ----

/// `skb->mark` bit set by `npm_from_pod` on a packet whose egress check is deferred until
/// after the Service DNAT (its destination is in a Service range and the pre-DNAT lookup
/// denied it). Chosen clear of kube-proxy's bits (0x4000 masquerade, 0x8000 drop) and of
/// Calico's (0xffff0000); every other bit of the mark is preserved. `npm_to_pod` and
/// `npm_host_egress` check such a packet against the source pod's egress policy with the
/// translated destination, then clear the bit (allowed) or drop it.
pub const MARK_DEFERRED: u32 = 0x0000_2000;

// SERVICES: LPM trie, Addr16 -> u32 (1): the cluster's Service ranges (config `ServiceCIDRs`).
// Empty: nothing is deferred (egress is checked against the ClusterIP, the documented gap).

/// Key of DEFERRED: a deferred flow by its source (which the DNAT leaves alone), so the
/// post-DNAT check, which sees only the translated destination, finds the original one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeferKey {
    pub src: Addr16,
    pub sport_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<DeferKey>() == 20);

/// Value of DEFERRED: the original (pre-DNAT) destination of the deferred flow and the
/// interface it was recorded at, i.e. what the pending conntrack entry is keyed on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferValue {
    /// Dead after this `bpf_ktime_get_coarse_ns()` (the flow's pending timeout).
    pub expires_ns: u64,
    pub orig_dst: Addr16,
    pub ifindex: u32,
    pub orig_dport_be: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DeferValue>() == 32);

// ---- FRAGS: the first fragment's verdict for the later fragments of its datagram ----

/// How long a first fragment's verdict holds for the rest of its datagram (never refreshed).
/// A datagram's fragments leave their sender back to back; Linux gives up reassembling after
/// 30 s (`ipfrag_time`), and the short window keeps a reused IPv4 ID (16 bits) from finding
/// an old datagram's verdict.
pub const FRAG_TIMEOUT_NS: u64 = 5 * 1_000_000_000;

/// One fragmented datagram at one endpoint in one direction: what RFC 791 §3.2 and RFC 8200
/// §4.5 identify a datagram's fragments by (source, destination, protocol, identification),
/// plus the interface and direction it was judged at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FragKey {
    pub src: Addr16,
    pub dst: Addr16,
    /// The identification's wire bytes read as a native-order word: IPv6's 4 bytes, IPv4's
    /// 2 bytes followed by two zero bytes.
    pub id: u32,
    pub ifindex: u32,
    pub proto: u8,
    /// `DIR_*` of the fragments.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Datapath clock (ns, as `CtValue::expires_ns`) after which the entry is dead: the first
    /// fragment's time plus [`FRAG_TIMEOUT_NS`].
    pub expires_ns: u64,
    /// The counter slot the first fragment was counted under.
    pub slot: u16,
    /// The first fragment's (passing) verdict reason; never `REASON_NOT_MANAGED`.
    pub reason: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 16);

// ---- drop events (`NPM_EVENTS`, `NPM_EVENT_STATS`) ----

/// Ring buffer of [`Event`]s: one per dropped packet (`handle` in the datapath), written only
/// when this CPU's token bucket ([`EventStats`]) allows it. One consumer at a time
/// (`npm-agent monitor`): a record read by one reader is gone for every other.
pub const MAP_EVENTS: &str = "NPM_EVENTS";
/// Bytes of `NPM_EVENTS` (a power of two, a multiple of the page size): about 3,600 events
/// of 72 bytes (64 + the ring's 8-byte header).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Per-CPU array of one [`EventStats`]: the rate limit's bucket and the event counters.
pub const MAP_EVENT_STATS: &str = "NPM_EVENT_STATS";
/// Events a CPU may write per second, sustained.
pub const EVENTS_PER_SEC: u64 = 1_000;
/// Events a CPU may write at once after a quiet spell (the bucket's depth).
pub const EVENTS_BURST: u64 = 128;
/// The bucket's credit one event costs (ns of the datapath clock).
pub const EVENT_COST_NS: u64 = 1_000_000_000 / EVENTS_PER_SEC;
/// `Event::kind` of a dropped packet.
pub const EVENT_DROP: u8 = 1;

/// One dropped packet, as the datapath judged it. Addresses as in the maps (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The datapath clock (`now_ns`: jiffies × ns per jiffy) when it was judged.
    pub time_ns: u64,
    pub src: Addr16,
    pub dst: Addr16,
    /// The interface the program ran on: a pod's host-side veth (the ENDPOINTS key).
    pub ifindex: u32,
    /// The counter slot the drop was counted under (0: unmanaged).
    pub slot: u32,
    /// Ports in network byte order; 0 for protocols without.
    pub sport_be: u16,
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `DIR_*`: egress = leaving the pod, ingress = entering it.
    pub dir: u8,
    /// `REASON_DROP_*`.
    pub reason: u8,
    /// `EVENT_DROP`.
    pub kind: u8,
    /// The packet's length in bytes.
    pub len: u32,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);
// Userspace decodes the record by these offsets (`inspect::event_from_bytes`).
const _: () = assert!(core::mem::offset_of!(Event, src) == 8);
const _: () = assert!(core::mem::offset_of!(Event, ifindex) == 40);
const _: () = assert!(core::mem::offset_of!(Event, sport_be) == 48);
const _: () = assert!(core::mem::offset_of!(Event, proto) == 52);
const _: () = assert!(core::mem::offset_of!(Event, len) == 56);

/// One CPU's event bucket and counters (`NPM_EVENT_STATS`, index 0). Written only by the
/// datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// The bucket: credit in ns, at most `EVENTS_BURST × EVENT_COST_NS`.
    pub credit_ns: u64,
    /// The datapath clock of the last drop seen on this CPU.
    pub last_ns: u64,
    /// Events written to `NPM_EVENTS`.
    pub written: u64,
    /// Drops with no event because the bucket was empty.
    pub suppressed: u64,
    /// Drops with no event because the ring buffer was full (no reader, or a slow one).
    pub lost: u64,
}
const _: () = assert!(core::mem::size_of::<EventStats>() == 40);

// ---- IP protocol numbers ----
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_flow_key_shrinks_to_ct_key4_and_back() {
        let full = CtKey {
            addr_lo: addr_from_v4([10, 0, 0, 1]),
            addr_hi: addr_from_v4([10, 0, 0, 2]),
            ifindex: 7,
            port_lo_be: 80u16.to_be(),
            port_hi_be: 40000u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let small = full.to_v4().expect("both addresses are IPv4");
        assert_eq!(small.addr_lo, [10, 0, 0, 1]);
        assert_eq!(small.addr_hi, [10, 0, 0, 2]);
        assert_eq!(small.to_full(), full);
        let mut v6 = full;
        v6.addr_hi = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(v6.to_v4(), None, "an IPv6 flow stays in NPM_CT");
    }

    #[test]
    fn ipv4_maps_into_the_v4_mapped_range() {
        let a = addr_from_v4([10, 1, 2, 3]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[..12], &V4_MAPPED_PREFIX);
        assert_eq!(&a[12..], &[10, 1, 2, 3]);
        let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(!is_v4_mapped(&v6));
    }

    #[test]
    fn policy_prefixes_cover_the_key_fields_in_order() {
        // local_id (32) + peer_id (32) + dir (8) = 72; + proto (8) = 80; + port (16) = 96.
        assert_eq!(POLICY_PREFIX_ANY_PROTO, 72);
        assert_eq!(POLICY_PREFIX_ANY_PORT, 80);
        assert_eq!(
            core::mem::offset_of!(PolicyKey, proto) * 8,
            POLICY_PREFIX_ANY_PROTO as usize
        );
        assert_eq!(
            core::mem::offset_of!(PolicyKey, dport_be) * 8,
            POLICY_PREFIX_ANY_PORT as usize
        );
    }
}
