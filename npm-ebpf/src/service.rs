//! The egress check of traffic to a Service, after kube-proxy's DNAT.
//!
//! `npm_from_pod` runs at TC ingress of the pod's host-side veth, before netfilter's
//! PREROUTING, so it sees a packet to a Service's ClusterIP before kube-proxy translates it to
//! a backend pod. Kubernetes evaluates egress policy on the translated packet. So:
//!
//! - **pre-DNAT** ([`defer`], from `classify`): a new flow of an egress-isolated pod that the
//!   policy lookup denies, to an address in a Service range (`NPM_SERVICES`), is not dropped:
//!   it gets [`MARK_DEFERRED`] in `skb->mark`, a conntrack entry with `CT_PENDING` keyed on
//!   the original tuple at the client's interface, and a `NPM_DEFERRED` entry keyed on its
//!   source (which the DNAT keeps) that remembers the original destination;
//! - **post-DNAT** ([`deferred_denied`]): `npm_to_pod` (local backend) and `npm_host_egress`
//!   (every other host link: remote backend, or a ClusterIP nothing translated) check a
//!   marked packet against the *source* pod's egress policy (source address → IDENTITIES →
//!   its local interface → ENDPOINTS) with the translated destination. Denied: dropped and
//!   counted as an egress policy drop of the source pod. Allowed: the bit is cleared and the
//!   pending entry confirmed, so later packets are established and replies pass.
//!
//! A pending entry lets nothing through: the originator's packets are deferred again, and
//! packets towards the originator do not match it (judged as new, `Ct::LiveMismatch`). It is
//! confirmed by the forward packet before that packet reaches the backend, so a genuine reply
//! never finds it pending. A source that is not a local pod's (masqueraded, gone) fails
//! closed (`REASON_DROP_UNKNOWN_SOURCE`). Two deferred flows of one source address, port and
//! protocol to different destinations at once cannot be told apart after the DNAT: the second
//! is dropped while the first is pending (it retransmits).

use aya_ebpf::{
    bindings::BPF_ANY,
    macros::map,
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use npm_common::{
    maps::{
        Addr16, CT_PENDING, CtKey, DEFERRED_MAX, DeferKey, DeferValue, EP_CLASS_EGRESS,
        EP_ISOLATE_EGRESS, MARK_DEFERRED, PEER_HOST, SERVICES_MAX,
    },
    metrics::SLOT_UNMANAGED,
    verdict::{
        DIR_EGRESS, REASON_DROP_MALFORMED, REASON_DROP_UNKNOWN_SOURCE, REASON_NOT_ISOLATED,
        is_allow,
    },
};

use crate::{
    ADDR_PREFIX_FULL, ENDPOINTS, IDENTITIES, conntrack, count, now_ns,
    parse::{self, Packet},
    policy_verdict, pull_headers,
};

/// The cluster's Service ranges (value unused, 1).
#[map(name = "NPM_SERVICES")]
static SERVICES: LpmTrie<Addr16, u32> = LpmTrie::with_max_entries(SERVICES_MAX, 0);

/// Deferred flows by source: the original destination, for the post-DNAT confirmation.
#[map(name = "NPM_DEFERRED")]
static DEFERRED: LruHashMap<DeferKey, DeferValue> = LruHashMap::with_max_entries(DEFERRED_MAX, 0);

#[inline(always)]
fn addr_eq(a: &Addr16, b: &Addr16) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

#[inline(always)]
fn defer_key(pkt: &Packet) -> DeferKey {
    DeferKey {
        src: pkt.src,
        sport_be: pkt.sport_be,
        proto: pkt.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).mark }
}

/// Pre-DNAT, for a new (or pending) egress flow at `ifindex` that the policy lookup
/// denied: defers it when its destination is in a Service range. `live`: a live conntrack
/// entry that this packet does not match exists (it is left alone). False: not deferred, drop
/// as before. (Five arguments at most: BPF passes no arguments on the stack.)
#[inline(never)]
pub(crate) fn defer(
    ctx: &TcContext,
    pkt: &Packet,
    ifindex: u32,
    src_is_lo: bool,
    live: bool,
) -> bool {
    if SERVICES.get(Key::new(ADDR_PREFIX_FULL, pkt.dst)).is_none() {
        return false;
    }
    let now = now_ns();
    let key = defer_key(pkt);
    // SAFETY: plain-integer values.
    if let Some(v) = unsafe { DEFERRED.get(key) }
        && v.expires_ns > now
        && (!addr_eq(&v.orig_dst, &pkt.dst)
            || v.orig_dport_be != pkt.dport_be
            || v.ifindex != ifindex)
    {
        // Another pending flow from the same source address, port and protocol: after the
        // DNAT the two could not be told apart. Fail closed for this one.
        return false;
    }
    let value = DeferValue {
        expires_ns: now + conntrack::new_flow_timeout(pkt),
        orig_dst: pkt.dst,
        ifindex,
        orig_dport_be: pkt.dport_be,
        _pad: [0; 2],
    };
    if DEFERRED.insert(key, value, u64::from(BPF_ANY)).is_err() {
        return false;
    }
    if !live {
        // The pending entry counts nothing until `confirm` gives it the endpoint's slot.
        conntrack::create_flags(
            pkt,
            ifindex,
            src_is_lo,
            DIR_EGRESS,
            now,
            SLOT_UNMANAGED,
            CT_PENDING,
        );
    }
    ctx.set_mark(mark(ctx) | MARK_DEFERRED);
    true
}

/// Post-DNAT: true when `ctx` carries [`MARK_DEFERRED`] and the source pod's egress policy
/// denies it with its translated destination (drop it). Otherwise the bit is cleared and the
/// packet goes on. Costs one read of `skb->mark` for unmarked packets.
#[inline(always)]
pub(crate) fn deferred_denied(ctx: &TcContext) -> bool {
    let m = mark(ctx);
    m & MARK_DEFERRED != 0 && !check_deferred(ctx, m)
}

/// The post-DNAT check of a marked packet; true when allowed (bit cleared, flow confirmed).
/// Its callees run one after the other, never nested, so that under `npm_to_pod` (whose own
/// frame holds the inlined classifier) the deepest chain stays well inside the 512-byte
/// stack all frames share.
#[inline(never)]
fn check_deferred(ctx: &TcContext, m: u32) -> bool {
    let mut pkt = Packet::new();
    match read_packet(ctx, &mut pkt) {
        PARSED => {}
        // We mark only IP packets; someone else's use of the bit is not ours to judge.
        NOT_IP => return true,
        _ => {
            count(SLOT_UNMANAGED, DIR_EGRESS, REASON_DROP_MALFORMED, ctx.len());
            return false;
        }
    }
    let src = judge(&pkt, ctx.len());
    if src != 0 {
        ctx.set_mark(m & !MARK_DEFERRED);
    }
    // Confirms the flow (allowed), forgets the side entry either way.
    confirm(&pkt, src);
    src != 0
}

const PARSED: u8 = 0;
const NOT_IP: u8 = 1;
const MALFORMED: u8 = 2;

/// Makes the headers linear if needed and parses them into `pkt`. Unlike `classify` it pulls
/// up front: it runs only for marked packets (a deferred flow's first packets, without
/// payload), and a second inlined parse would not fit the stack of its call chain.
#[inline(never)]
fn read_packet(ctx: &TcContext, pkt: &mut Packet) -> u8 {
    let _ = pull_headers(ctx);
    match parse::parse(ctx, pkt) {
        Ok(true) => PARSED,
        Ok(false) => NOT_IP,
        Err(parse::Malformed) => MALFORMED,
    }
}

/// The source pod's egress verdict for the translated packet, counted under the source pod's
/// slot (or the unmanaged slot when there is no local source pod). Returns the source pod's
/// interface and counter slot packed by [`pack_src`] when allowed, 0 when denied.
#[inline(never)]
fn judge(pkt: &Packet, len: u32) -> u64 {
    // The source pod: a local pod's address, its interface, its endpoint.
    // SAFETY: plain-integer values, see `classify`.
    let src = unsafe { IDENTITIES.get(pkt.src) }.copied();
    let src_ifindex = match src {
        Some(p) if p.flags & PEER_HOST == 0 => p.ifindex,
        _ => 0,
    };
    // SAFETY: as above.
    let ep = if src_ifindex == 0 {
        None
    } else {
        unsafe { ENDPOINTS.get(src_ifindex) }.copied()
    };
    let Some(ep) = ep else {
        count(SLOT_UNMANAGED, DIR_EGRESS, REASON_DROP_UNKNOWN_SOURCE, len);
        return 0;
    };
    let reason = if ep.flags & EP_ISOLATE_EGRESS != 0 {
        let classes = ep.flags & EP_CLASS_EGRESS != 0;
        policy_verdict(ep.id, pkt, src_ifindex, DIR_EGRESS, classes)
    } else {
        REASON_NOT_ISOLATED
    };
    count(ep.slot, DIR_EGRESS, reason, len);
    if is_allow(reason) {
        pack_src(src_ifindex, ep.slot)
    } else {
        0
    }
}

/// An interface index and a counter slot in one register (non-zero: ifindexes start at 1).
#[inline(always)]
fn pack_src(ifindex: u32, slot: u32) -> u64 {
    u64::from(ifindex) << 32 | u64::from(slot)
}

/// Confirms the pending conntrack entry of the deferred flow of `pkt` (its `NPM_DEFERRED`
/// entry names the original tuple at the client's interface), giving it the client
/// endpoint's counter slot, and forgets the side entry. `src`: the client's interface and
/// slot ([`pack_src`]), 0 when the post-DNAT check denied the packet (then only the side
/// entry goes). Lean on purpose: it runs two calls deep under `npm_to_pod`, whose frames
/// share the 512-byte stack; the key is built here, not in the caller's frame.
#[inline(never)]
fn confirm(pkt: &Packet, src: u64) {
    let key = &defer_key(pkt);
    if src == 0 {
        let _ = DEFERRED.remove(key);
        return;
    }
    let (src_ifindex, slot) = ((src >> 32) as u32, src as u32);
    let Some(v) = DEFERRED.get_ptr(key) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid for this run (RCU).
    let v = unsafe { &*v };
    let now = now_ns();
    if v.expires_ns > now && v.ifindex == src_ifindex {
        // The key `conntrack::lookup` built for the original packet (src -> orig_dst).
        let mut ct_key = CtKey {
            addr_lo: key.src,
            addr_hi: v.orig_dst,
            ifindex: src_ifindex,
            port_lo_be: key.sport_be,
            port_hi_be: v.orig_dport_be,
            proto: key.proto,
            _pad: [0; 3],
        };
        if !conntrack::pair_le_bytes(&key.src, key.sport_be, &v.orig_dst, v.orig_dport_be) {
            ct_key.addr_lo = v.orig_dst;
            ct_key.addr_hi = key.src;
            ct_key.port_lo_be = v.orig_dport_be;
            ct_key.port_hi_be = key.sport_be;
        }
        conntrack::confirm(&ct_key, now, slot);
    }
    let _ = DEFERRED.remove(key);
}
