//! npm datapath: two TC classifiers on the host-side interface (veth) of every local pod,
//! and one on the node's other links when Service ranges are configured.
//!
//! - `npm_from_pod` (TC ingress of the host-side veth): packets leaving the pod, checked
//!   against the pod's EGRESS policy; the peer is the destination address. A denied new flow
//!   to a Service range is deferred past kube-proxy's DNAT instead ([`service`]).
//! - `npm_to_pod` (TC egress of the host-side veth): packets entering the pod, checked
//!   against the pod's INGRESS policy; the peer is the source address. A deferred packet is
//!   first checked against its source pod's egress policy.
//! - `npm_host_egress` (TC egress of other links): the post-DNAT check of deferred packets.
//!
//! Verdicts: allow → `TC_ACT_PIPE` (let later filters run, then pass), drop → `TC_ACT_SHOT`.
//! Per packet: parse → (flow cache →) CONNTRACK → ENDPOINTS → IDENTITIES of the pod-side
//! address (the source check, `spoofed`) → IDENTITIES → POLICY (peer
//! identity) → POLICY (the peer's CIDR class, from its IDENTITIES entry; from the CIDRS trie
//! only for an address IDENTITIES does not know), a fixed number of lookups and no loops over
//! rules. A conntrack key holds the ifindex, so a hit means this interface's endpoint allowed
//! the flow: an established packet costs one hash lookup (or a flow-cache hit), and counts
//! under the slot stored in the entry. Every verdict is counted in the
//! METRICS per-CPU array under (endpoint slot, dir, reason); unmanaged interfaces count under
//! slot 0. The class lookups run only for endpoints whose identity has ipBlock or "any peer"
//! rules in that direction (`EP_CLASS_*`, set by the compiler).
//!
//! Maps are declared unpinned here; the loader pins them by name in its pin directory
//! (`EbpfLoader::map_pin_path`), so a test load with no pin directory leaves nothing behind.
//!
//! Spoofing: a new flow leaving a managed endpoint from an address that is not its pod's, or
//! entering one for an address of another interface or of the node, drops as
//! `REASON_DROP_SPOOFED`, isolated or not (`spoofed`); so does an ARP packet or neighbour
//! discovery leaving it that claims such an address (`claims_foreign`). Established packets
//! are not checked again (a conntrack key holds the ifindex; see `classify`).
//!
//! Reasons: non-IP frames pass as `REASON_NOT_MANAGED` (counted under the real ifindex when
//! the interface is managed), and so does IPv6's ARP: ICMPv6 neighbour and router discovery
//! and MLD that meet their RFCs' link-local checks (`L4Kind::LinkControl`: ND and RD with
//! hop limit 255, MLD with hop limit 1 from fe80::/10 or ::), in both directions, before
//! conntrack and policy, untracked; an IP packet we cannot parse drops as
//! `REASON_DROP_MALFORMED` in an isolated direction and passes untracked as
//! `REASON_NOT_ISOLATED` otherwise.
//!
//! ICMP errors (destination unreachable, fragmentation needed / packet too big, time
//! exceeded, parameter problem) take their own path (`error_verdict`): after the source
//! check, in an isolated direction, one that quotes a packet of a live, confirmed flow of
//! this endpoint passes as a reply of it (`conntrack::related`, read only); any other is
//! judged by the policy. Later fragments of a datagram pass on the verdict of its first
//! fragment at this interface and direction (`frags`, `NPM_FRAGS`).
//!
//! Known limits: a later fragment whose first fragment did not pass here first (out of order,
//! or its record expired or was evicted) is judged with ports 0 (it matches only any-port /
//! any-protocol entries); an ICMPv6 error is related only when the packet it quotes has no
//! extension headers, and a fragmented ICMP error never; IPv6 AH/ESP and more than 4
//! extension headers are not walked (malformed); headers must lie in the first 512 bytes. Link control passes on its hop
//! limit alone, whatever its destination: an egress-isolated pod can send ND-typed ICMPv6 at
//! hop limit 255 to any address, which the node routes on at 254 (every ND receiver discards
//! it; a raw ICMPv6 socket there would read it). The source check: a pending endpoint may
//! use a remote pod's address (its own pod's may be one of them until it is placed); an IP
//! packet we cannot parse, in a direction that is not isolated, passes unchecked; router
//! advertisements and redirects from a pod are link control like the rest.
#![no_std]
#![no_main]

mod conntrack;
mod flows;
mod frags;
mod parse;
mod service;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_PIPE, TC_ACT_SHOT},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use npm_common::{
    maps::{
        Addr16, CIDRS_MAX, CLOCK_ENTRIES, CLOCK_NS_PER_JIFFY, CONNTRACK_MAX, CtKey, CtKey4,
        CtValue, ENDPOINTS_MAX, EP_CLASS_EGRESS, EP_CLASS_INGRESS, EP_ISOLATE_EGRESS,
        EP_ISOLATE_INGRESS, EVENT_COST_NS, EVENT_DROP, EVENTS_BURST, EVENTS_BYTES, EndpointInfo,
        Event, EventStats, ID_PENDING, IDENTITIES_MAX, METRICS_MAX, PAIR_TRIE, PAIRS_MAX,
        PEER_HOST, POLICY_MAX, POLICY_PREFIX_FULL, PairKey, PairValue, PeerInfo, PolicyKey,
        PolicyValue,
    },
    metrics::{MetricsValue, SLOT_UNMANAGED, counter_index},
    verdict::{
        DIR_EGRESS, DIR_INGRESS, REASON_DEFERRED, REASON_DROP_MALFORMED, REASON_DROP_POLICY,
        REASON_DROP_SPOOFED, REASON_HOST, REASON_NOT_ISOLATED, REASON_NOT_MANAGED,
        REASON_POLICY_ALLOW, REASON_REPLY, REASON_SELF, is_allow,
    },
};

use crate::{
    conntrack::Ct,
    parse::{L4Kind, Packet},
};

/// Bytes of headers we make sure are linear (Ethernet + IPv6 + a few extension headers +
/// the L4 header in the common case).
const PULL_LEN: u32 = 128;

/// Prefix length of a full 16-byte address in the CIDRS trie.
pub(crate) const ADDR_PREFIX_FULL: u32 = 128;

#[map(name = "NPM_ENDPOINTS")]
pub(crate) static ENDPOINTS: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(ENDPOINTS_MAX, 0);

#[map(name = "NPM_IDENTITIES")]
pub(crate) static IDENTITIES: HashMap<Addr16, PeerInfo> =
    HashMap::with_max_entries(IDENTITIES_MAX, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC` is added by aya-ebpf for every LPM trie (the kernel requires it).
#[map(name = "NPM_CIDRS")]
static CIDRS: LpmTrie<Addr16, u32> = LpmTrie::with_max_entries(CIDRS_MAX, 0);

#[map(name = "NPM_POLICY")]
static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(POLICY_MAX, 0);

#[map(name = "NPM_PAIRS")]
static PAIRS: HashMap<PairKey, PairValue> = HashMap::with_max_entries(PAIRS_MAX, BPF_F_NO_PREALLOC);

/// IPv6 flows (`CtKey`).
#[map(name = "NPM_CT")]
pub(crate) static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_MAX, 0);

/// IPv4 flows: the same entries under the 20-byte `CtKey4` (half the hashing of the
/// established path's one lookup).
#[map(name = "NPM_CT4")]
pub(crate) static CONNTRACK4: LruHashMap<CtKey4, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_MAX, 0);

/// Nanoseconds per jiffy (10⁹ / HZ) at `CLOCK_NS_PER_JIFFY`, written by the loader at start-up
/// (it measures HZ with `npm_clock`); 0 until then. See [`now_ns`]. Also the flow cache's
/// generation ([`flows::generation`]) and userspace's last generation handed out.
#[map(name = "NPM_CLOCK")]
pub(crate) static CLOCK: Array<u64> = Array::with_max_entries(CLOCK_ENTRIES, 0);

#[map(name = "NPM_METRICS")]
static METRICS: PerCpuArray<MetricsValue> = PerCpuArray::with_max_entries(METRICS_MAX, 0);

/// Drop events (`Event`), one consumer: `npm-agent monitor`. Written only through [`emit`].
#[map(name = "NPM_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per CPU: the event rate limit's bucket and the written / suppressed / lost counters.
#[map(name = "NPM_EVENT_STATS")]
static EVENT_STATS: PerCpuArray<EventStats> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn npm_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn npm_to_pod(ctx: TcContext) -> i32 {
    to_pod(&ctx)
}

#[inline(always)]
fn to_pod(ctx: &TcContext) -> i32 {
    // A packet whose egress check was deferred past the Service DNAT (local backend): the
    // source pod's egress policy first, then this pod's ingress policy as for any packet.
    if service::deferred_denied(ctx) {
        return TC_ACT_SHOT;
    }
    handle(ctx, DIR_INGRESS)
}

/// TC egress of the node's other links (not loopback, not a managed pod interface), attached
/// only when Service ranges are configured: the post-DNAT egress check of deferred packets
/// leaving for a remote backend (or to a Service address nothing translated). Unmarked
/// packets pass at once and are not counted.
#[classifier]
pub fn npm_host_egress(ctx: TcContext) -> i32 {
    if service::deferred_denied(&ctx) {
        TC_ACT_SHOT
    } else {
        TC_ACT_PIPE
    }
}

/// The benchmark's baseline: no parsing, no maps, always `TC_ACT_PIPE` (`PROG_PASS`). Not
/// attached by the agent; it exists so `BPF_PROG_TEST_RUN` of the same packet through it
/// shows what the test harness itself costs.
#[classifier]
pub fn npm_pass(_ctx: TcContext) -> i32 {
    TC_ACT_PIPE
}

/// The benchmark's new-flow path (`PROG_BENCH_NEW`): adds one to the packet's TCP or UDP
/// source port, then runs `npm_to_pod`. Under `BPF_PROG_TEST_RUN` the repetitions of one call
/// share the packet, so each repetition is a new flow (a conntrack miss, the policy path and
/// the insert) until the port wraps. Loaded only by the benchmark, never attached.
#[classifier]
pub fn npm_bench_new(ctx: TcContext) -> i32 {
    bump_source_port(&ctx);
    to_pod(&ctx)
}

/// [`npm_bench_new`]'s baseline (`PROG_BENCH_BUMP`): the port bump alone, then
/// `TC_ACT_PIPE`. Loaded only by the benchmark, never attached.
#[classifier]
pub fn npm_bench_bump(ctx: TcContext) -> i32 {
    bump_source_port(&ctx);
    TC_ACT_PIPE
}

/// Adds one (wrapping) to the source port of an Ethernet + IPv4 (without options) or IPv6
/// (without extension headers) packet; leaves anything shorter alone. Benchmark only.
#[inline(always)]
fn bump_source_port(ctx: &TcContext) {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 > end {
        return;
    }
    // SAFETY: bytes 12..14 are within the packet (checked above).
    let ethertype = unsafe { ((data + 12) as *const u16).read_unaligned() };
    let at = if ethertype == 0x86dd_u16.to_be() {
        14 + 40
    } else {
        14 + 20
    };
    if data + at + 2 > end {
        return;
    }
    // SAFETY: bytes at..at + 2 are within the packet (checked above); TC programs may write
    // the packet directly.
    unsafe {
        let port = (data + at) as *mut u16;
        port.write_unaligned(u16::from_be(port.read_unaligned()).wrapping_add(1).to_be());
    }
}

/// The loader's HZ probe: returns the low 31 bits of `jiffies` (`BPF_PROG_TEST_RUN` twice,
/// some time apart, gives HZ). Never attached.
#[classifier]
pub fn npm_clock(_ctx: TcContext) -> i32 {
    // SAFETY: helper without preconditions.
    (unsafe { bpf_jiffies64() } & 0x7fff_ffff) as i32
}

/// The datapath's clock for conntrack and deferred-flow timeouts, in nanoseconds at tick
/// resolution: `jiffies` × [`CLOCK`]. The verifier inlines `bpf_jiffies64` into one load, and
/// the array lookup into a few instructions, where `bpf_ktime_get_coarse_ns` is a helper call
/// through three kernel functions (perf: it, `ktime_get_coarse_ts64`,
/// `set_normalized_timespec64`; measured: ~11 of 83 ns of an established packet, `bench
/// --spin established`). 0 (not written yet) falls back to the coarse clock; the loader writes the
/// factor before it attaches any program, and the map is pinned, so the programs of an agent
/// and of its successor read the same clock.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    match CLOCK.get(CLOCK_NS_PER_JIFFY) {
        // SAFETY: helper without preconditions.
        Some(&ns) if ns != 0 => unsafe { bpf_jiffies64() }.wrapping_mul(ns),
        // SAFETY: as above.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Classifies, counts and turns the reason into a TC action. Nothing here can fail: every
/// error path inside [`classify`] already chose a reason.
#[inline(always)]
fn handle(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut pkt = Packet::new();
    let (reason, slot) = classify(ctx, &mut pkt, ifindex, dir);
    // A first fragment that passed at a managed endpoint (or on a conntrack hit) leaves its
    // verdict for the rest of its datagram (crate::frags). Not a deferred one: the post-DNAT
    // check judges it again, after kube-proxy reassembled the datagram.
    if pkt.first_fragment()
        && is_allow(reason)
        && reason != REASON_NOT_MANAGED
        && reason != REASON_DEFERRED
    {
        frags::record(
            &pkt,
            ifindex,
            dir,
            u64::from(reason) << 32 | u64::from(slot),
        );
    }
    count(slot, dir, reason, ctx.len());
    if is_allow(reason) {
        TC_ACT_PIPE
    } else {
        // The verdict is taken: the event path only reads it.
        emit(
            &pkt,
            ifindex,
            u32::from(dir) << 8 | u32::from(reason),
            slot,
            ctx.len(),
        );
        TC_ACT_SHOT
    }
}

/// Writes a drop event to `NPM_EVENTS` if this CPU's token bucket has the credit (else
/// counts it `suppressed`); a full ring buffer fails the reserve (`lost`). The bucket holds
/// at most `EVENTS_BURST` events' worth of credit (`EVENT_COST_NS` each) and refills with the
/// datapath clock, so a CPU writes at most `EVENTS_BURST` at once and `EVENTS_PER_SEC`
/// sustained whatever the drop rate: a flood costs a per-CPU array lookup and a few
/// arithmetic instructions per packet. `dir_reason`: dir << 8 | reason (five arguments at
/// most). Not inlined: its own frame, and nothing of it on the paths that pass.
#[inline(never)]
fn emit(pkt: &Packet, ifindex: u32, dir_reason: u32, slot: u32, len: u32) {
    let Some(st) = EVENT_STATS.get_ptr_mut(0) else {
        return;
    };
    let now = now_ns();
    let cap = EVENTS_BURST * EVENT_COST_NS;
    // SAFETY: this CPU's element from a successful lookup; only this CPU writes it (a nested
    // run on the same CPU could at worst miscount one event).
    let st = unsafe { &mut *st };
    let elapsed = now.wrapping_sub(st.last_ns);
    st.last_ns = now;
    let credit = if elapsed >= cap || st.credit_ns >= cap - elapsed {
        cap
    } else {
        st.credit_ns + elapsed
    };
    if credit < EVENT_COST_NS {
        st.credit_ns = credit;
        st.suppressed += 1;
        return;
    }
    st.credit_ns = credit - EVENT_COST_NS;
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        st.lost += 1;
        return;
    };
    entry.write(Event {
        time_ns: now,
        src: pkt.src,
        dst: pkt.dst,
        ifindex,
        slot,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        dir: (dir_reason >> 8) as u8,
        reason: dir_reason as u8,
        kind: EVENT_DROP,
        len,
        _pad: [0; 4],
    });
    entry.submit(0);
    st.written += 1;
}

/// Returns the verdict reason and the counter slot to count it under; leaves the parsed
/// packet in `pkt` (`Packet::new()` on entry; `frag` is 0 unless the packet was classified
/// as IP).
#[inline(always)]
fn classify(ctx: &TcContext, pkt: &mut Packet, ifindex: u32, dir: u8) -> (u8, u32) {
    // Headers are read with direct packet access, which sees only the linear part of the
    // skb. Only when they are not all there is the packet pulled (up to PULL_LEN) and parsed
    // again: rare, the stack and veth keep the headers linear. Pulling on demand matters: a
    // TCP segment the local stack sends is a clone with its payload in page fragments, and
    // pulling any of the payload reallocates the clone's head (`pskb_expand_head`), which
    // pulling up front did for every data segment.
    // The second parse needs no fresh `pkt`: parsing is a function of the packet's bytes,
    // which the pull does not change, so the first (cut short) wrote a subset of the same
    // fields with the same values.
    let mut parsed = parse::parse(ctx, pkt);
    if !matches!(parsed, Ok(true)) && pull_headers(ctx) {
        parsed = parse::parse(ctx, pkt);
    }
    // Neighbour discovery, router discovery and MLD on the link pass like ARP (not IP to
    // policy): without them an isolated pod cannot resolve its IPv6 gateway or peers. No
    // pass reason of its own: the eight pass indexes of a counter slot are all taken
    // (`npm_common::metrics::reason_index`), so a new one would change the METRICS layout
    // (`ABI_VERSION`) and the agent's reason labels; `REASON_NOT_MANAGED` is what ARP
    // counts under.
    if !matches!(parsed, Ok(true)) || pkt.kind == L4Kind::LinkControl {
        pkt.frag = 0;
        let v = unparsed(ctx, pkt, ifindex, dir, parsed.is_err());
        return ((v >> 32) as u8, v as u32);
    }
    let pkt: &Packet = pkt;
    // ICMP errors take a path of their own (`error_verdict`): nothing to look up in conntrack
    // or the flow cache for them, nothing to track, nothing to defer.
    if pkt.inner_off != 0 {
        let v = error_verdict(ctx, pkt, ifindex, dir);
        return ((v >> 32) as u8, v as u32);
    }
    // A later fragment of a datagram whose first fragment passed here: the same verdict.
    if pkt.later_fragment() {
        let v = frags::later(pkt, ifindex, dir);
        if v != 0 {
            return ((v >> 32) as u8, v as u32);
        }
    }

    // Tick resolution is plenty for timeouts of seconds (see `now_ns`).
    let now = now_ns();
    let src_is_lo = conntrack::src_is_lo(pkt);
    // Conntrack first: the key holds the ifindex, so a hit is a flow this interface's
    // endpoint allowed, and the entry holds the endpoint's counter slot.
    let live = match conntrack::lookup(pkt, ifindex, src_is_lo, dir, now) {
        Ct::Hit(reason, slot) => return (reason, slot),
        Ct::LiveMismatch => true,
        // A pending (deferred) flow's entry may be overwritten by this packet's verdict.
        Ct::Miss | Ct::Pending => false,
    };

    // SAFETY: hash map values are plain integers; a concurrent update can at worst give a
    // mix of old and new flags for this one packet.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        return (REASON_NOT_MANAGED, SLOT_UNMANAGED);
    };
    // A new flow's pod-side address must be the pod's, isolated or not (`spoofed`). Only new
    // flows pay the lookup: a conntrack (or flow-cache) hit returned above, and a hit is
    // safe because the key holds the ifindex: every entry at this interface was created
    // here by a packet of the flow that passed this check (leaving the pod with its source
    // checked, or entering it with a destination that is no other interface's or the
    // node's), or by the deferred-Service path, which runs after it. A packet matching the
    // entry carries the same two addresses, so its pod-side address is one this check
    // already let through at this interface.
    if spoofed(pkt, ifindex, ep.id, dir) {
        return (REASON_DROP_SPOOFED, ep.slot);
    }
    let (isolate_bit, class_bit) = if dir == DIR_INGRESS {
        (EP_ISOLATE_INGRESS, EP_CLASS_INGRESS)
    } else {
        (EP_ISOLATE_EGRESS, EP_CLASS_EGRESS)
    };
    let reason = if ep.flags & isolate_bit != 0 {
        policy_verdict(ep.id, pkt, ifindex, dir, ep.flags & class_bit != 0)
    } else {
        REASON_NOT_ISOLATED
    };
    // Egress to a Service range: judged again after the DNAT (crate::service).
    if reason == REASON_DROP_POLICY
        && dir == DIR_EGRESS
        && service::defer(ctx, pkt, ifindex, src_is_lo, live)
    {
        return (REASON_DEFERRED, ep.slot);
    }
    // A later fragment (ports 0) tracks nothing: its entry would be another flow's.
    if is_allow(reason) && !live && !pkt.later_fragment() {
        conntrack::create(pkt, ifindex, src_is_lo, dir, now, ep.slot);
    }
    (reason, ep.slot)
}

/// The verdict of an ICMP error (`Packet::inner_off` set) as reason << 32 | counter slot.
/// At a managed endpoint the source check comes first, as for any new flow (`spoofed`: a
/// pod's error leaves from its own address); then, in an isolated direction, an error about
/// a flow this endpoint tracks passes as a reply of that flow (`conntrack::related`; no pass
/// reason of its own: the eight pass indexes of a counter slot are taken, see `classify`),
/// and one about anything else is judged by the policy as any ICMP message is (only a rule
/// allowing every protocol lets it in). Never tracked, never deferred to the post-DNAT
/// check. Not inlined: the verifier walks it only for the parser's ICMP error paths, which
/// then skip the rest of `classify`.
#[inline(never)]
fn error_verdict(ctx: &TcContext, pkt: &Packet, ifindex: u32, dir: u8) -> u64 {
    // SAFETY: plain-integer values, see `classify`.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        return u64::from(REASON_NOT_MANAGED) << 32 | u64::from(SLOT_UNMANAGED);
    };
    let (isolate_bit, class_bit) = if dir == DIR_INGRESS {
        (EP_ISOLATE_INGRESS, EP_CLASS_INGRESS)
    } else {
        (EP_ISOLATE_EGRESS, EP_CLASS_EGRESS)
    };
    let reason = if spoofed(pkt, ifindex, ep.id, dir) {
        REASON_DROP_SPOOFED
    } else if ep.flags & isolate_bit == 0 {
        REASON_NOT_ISOLATED
    } else if conntrack::related(ctx, pkt, ifindex, dir, now_ns()) {
        REASON_REPLY
    } else {
        policy_verdict(ep.id, pkt, ifindex, dir, ep.flags & class_bit != 0)
    };
    u64::from(reason) << 32 | u64::from(ep.slot)
}

/// Makes the first `PULL_LEN` bytes (or the whole packet, if shorter) linear when they are
/// not; true when it did. On failure the parse finds the headers missing again: malformed.
#[inline(always)]
pub(crate) fn pull_headers(ctx: &TcContext) -> bool {
    let len = ctx.len();
    let want = if len < PULL_LEN { len } else { PULL_LEN };
    ctx.data_end() - ctx.data() < want as usize && ctx.pull_data(want).is_ok()
}

/// The verdict of a frame that is not IP or is IPv6 link control (`malformed` false: passes
/// untouched, unless it leaves the pod claiming another's address: `claims_foreign`) or of
/// an IP packet we cannot parse (dropped in an isolated direction, else passed untracked).
/// Not inlined: the rare path keeps its own frame. Returns the reason and the counter slot
/// in one register (reason << 32 | slot): a returned pair would be passed by a pointer, a
/// sixth argument, and BPF has five.
#[inline(never)]
fn unparsed(ctx: &TcContext, pkt: &Packet, ifindex: u32, dir: u8, malformed: bool) -> u64 {
    // SAFETY: plain-integer values, see `classify`.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        return u64::from(REASON_NOT_MANAGED) << 32 | u64::from(SLOT_UNMANAGED);
    };
    let isolate_bit = if dir == DIR_INGRESS {
        EP_ISOLATE_INGRESS
    } else {
        EP_ISOLATE_EGRESS
    };
    let reason = if !malformed {
        if dir == DIR_EGRESS && claims_foreign(ctx, pkt, ifindex, ep.id != ID_PENDING) {
            REASON_DROP_SPOOFED
        } else {
            REASON_NOT_MANAGED
        }
    } else if ep.flags & isolate_bit != 0 {
        REASON_DROP_MALFORMED
    } else {
        REASON_NOT_ISOLATED
    };
    u64::from(reason) << 32 | u64::from(ep.slot)
}

/// Whether a new flow at the endpoint of `ifindex` (identity `ep_id`) has a pod-side address
/// that is not the endpoint's (Cilium's "invalid source"): leaving the pod (`DIR_EGRESS`) the
/// source, entering it the destination. Dropped when IDENTITIES gives that address to
/// another interface or to the node ([`foreign`]). Leaving a placed pod, an address
/// IDENTITIES does not know is dropped too: the compiler writes every address of a placed
/// endpoint pod with its ifindex (a shared address only for its owner, so the other pod's
/// use of it drops here), the only exception being IPv6 link-local sources (fe80::/10, never
/// a pod IP), which pass only towards a link-local or multicast destination: such packets
/// stay on the link (the kernel does not forward a link-local source), so they cannot pose
/// as the pod anywhere else. Entering a pod, an unknown destination (broadcast, multicast,
/// an address outside the cluster) is left to the policy. A pending endpoint (`ID_PENDING`)
/// has no address IDENTITIES gives its ifindex yet, and its pod's own address may already be
/// there with ifindex 0 (known, not yet placed), so it is held to the first rule only, with
/// ifindex 0 counting as unknown. Not inlined: its own frame.
#[inline(never)]
fn spoofed(pkt: &Packet, ifindex: u32, ep_id: u32, dir: u8) -> bool {
    let placed = ep_id != ID_PENDING;
    let own = if dir == DIR_EGRESS {
        &pkt.src
    } else {
        &pkt.dst
    };
    // SAFETY: plain-integer values, see `classify`.
    match unsafe { IDENTITIES.get(own) } {
        Some(id) => foreign(id, ifindex, placed),
        None => {
            dir == DIR_EGRESS
                && placed
                && !(parse::link_local(&pkt.src) && parse::link_scoped(&pkt.dst))
        }
    }
}

/// Whether the known address `id` is not the endpoint's at `ifindex`: the node's, or another
/// interface's. For a pending endpoint (`placed` false) ifindex 0 (a pod not placed on this
/// node: remote, or maybe this endpoint's own pod) is not another interface.
#[inline(always)]
fn foreign(id: &PeerInfo, ifindex: u32, placed: bool) -> bool {
    if id.flags & PEER_HOST != 0 {
        return true;
    }
    id.ifindex != ifindex && (placed || id.ifindex != 0)
}

/// Whether an ARP packet or IPv6 neighbour discovery leaving the pod claims an address of
/// another interface or of the node ([`foreign`]), which would bind it to this pod's MAC in
/// the node's (or, on a bridge, other pods') neighbour cache: an ARP sender protocol address
/// ([`parse::arp_sender`]), or what link control claims (`Packet::dst` of
/// `L4Kind::LinkControl`: an advertisement's target, a solicitation's source). Unknown
/// addresses pass (ARP probes from 0.0.0.0, the pod's link-local address).
#[inline(always)]
fn claims_foreign(ctx: &TcContext, pkt: &Packet, ifindex: u32, placed: bool) -> bool {
    let claim = if pkt.kind == L4Kind::LinkControl {
        pkt.dst
    } else {
        match parse::arp_sender(ctx) {
            Some(a) => a,
            None => return false,
        }
    };
    // SAFETY: plain-integer values, see `classify`.
    match unsafe { IDENTITIES.get(claim) } {
        Some(id) => foreign(id, ifindex, placed),
        None => false,
    }
}

/// The verdict for a new flow in an isolated direction. Not inlined: its lookup keys get
/// their own stack frame instead of adding to the (tight, 512-byte) frame of `classify`.
/// `classes`: the identity has rules naming CIDR classes in this direction (`EP_CLASS_*`);
/// without them no (local, class) entry exists and the CIDRS lookup is skipped.
#[inline(never)]
pub(crate) fn policy_verdict(
    local_id: u32,
    pkt: &Packet,
    ifindex: u32,
    dir: u8,
    classes: bool,
) -> u8 {
    // The peer is the remote side: the source of traffic entering the pod, else the
    // destination. The port is always the destination port (the service port of a new flow).
    let peer = if dir == DIR_INGRESS {
        &pkt.src
    } else {
        &pkt.dst
    };
    let (proto, dport_be) = (pkt.proto, pkt.dport_be);
    // SAFETY: plain-integer values, see `classify`.
    if let Some(id) = (unsafe { IDENTITIES.get(peer) }).copied() {
        if id.flags & PEER_HOST != 0 {
            return REASON_HOST;
        }
        if id.ifindex == ifindex {
            return REASON_SELF;
        }
        if policy_allows(local_id, id.id, dir, proto, dport_be) {
            return REASON_POLICY_ALLOW;
        }
        // A known address carries its CIDR class: no CIDRS lookup (flat in the number of
        // ipBlocks).
        if classes && id.class != 0 && policy_allows(local_id, id.class, dir, proto, dport_be) {
            return REASON_POLICY_ALLOW;
        }
        return REASON_DROP_POLICY;
    }
    if !classes {
        return REASON_DROP_POLICY;
    }
    let key = Key::new(ADDR_PREFIX_FULL, *peer);
    if let Some(class) = CIDRS.get(&key).copied()
        && policy_allows(local_id, class, dir, proto, dport_be)
    {
        return REASON_POLICY_ALLOW;
    }
    REASON_DROP_POLICY
}

/// Whether POLICY allows (local, peer, dir, proto, port): the pair first (a hash lookup; no
/// entry: nothing allowed), then its inline entries, or the POLICY trie when it has more.
#[inline(always)]
fn policy_allows(local_id: u32, peer_id: u32, dir: u8, proto: u8, dport_be: u16) -> bool {
    let pair = PairKey {
        local_id,
        peer_id,
        dir,
        _pad: [0; 3],
    };
    // SAFETY: plain-integer values, see `classify`.
    let Some(v) = (unsafe { PAIRS.get(pair) }) else {
        return false;
    };
    if v.flags & PAIR_TRIE == 0 {
        let port = u16::from_be(dport_be);
        let p = &v.ports;
        const _: () = assert!(npm_common::maps::PAIR_PORTS == 4);
        return p[0].matches(proto, port)
            || p[1].matches(proto, port)
            || p[2].matches(proto, port)
            || p[3].matches(proto, port);
    }
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey {
            local_id,
            peer_id,
            dir,
            proto,
            dport_be,
        },
    );
    POLICY.get(&key).is_some()
}

/// Adds one packet of `bytes` to this CPU's counter (slot, dir, reason). A slot out of range
/// (never handed out) counts nowhere.
#[inline(always)]
pub(crate) fn count(slot: u32, dir: u8, reason: u8, bytes: u32) {
    let Some(v) = METRICS.get_ptr_mut(counter_index(slot, dir, reason)) else {
        return;
    };
    // SAFETY: the pointer is this CPU's element from a successful lookup. Only this CPU writes
    // it; a nested run on the same CPU could at worst lose one increment (counters only).
    unsafe {
        (*v).packets += 1;
        (*v).bytes += u64::from(bytes);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the verifier rejects a program that can reach this loop.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
