//! Per-endpoint connection tracking in the `NPM_CT4` (IPv4 flows, 20-byte key) and `NPM_CT`
//! (IPv6 flows) LRU hashes: one lookup per packet, after the per-CPU flow cache
//! ([`crate::flows`]) when the packet is one it may answer.
//!
//! Key: the two (address, port) pairs sorted so both directions share one entry. The order is
//! lexicographic on the 16 address bytes (network order), then on the port as a number
//! (host order of the big-endian wire value); equal pairs put the source first.
//!
//! Entries are created for every allowed, untracked packet except ICMP that is not an echo
//! request (echo replies and ICMP errors would create entries nothing can ever match) and
//! later fragments (ports 0: an entry would be the wrong flow's). An ICMP error about a flow
//! is related to its entry without touching it ([`related`]).
//! Creation overwrites (`BPF_ANY`) an absent or expired entry and never a live one, so a
//! packet that does not match a live entry (e.g. a spoofed direction) cannot steal it.

use aya_ebpf::{bindings::BPF_ANY, maps::LruHashMap, programs::TcContext};
use npm_common::{
    maps::{
        CT_ORIGIN_LO, CT_PENDING, CT_SEEN_REPLY, CT_TCP_CLOSING, CT_TIMEOUT_OTHER_NS,
        CT_TIMEOUT_TCP_CLOSING_NS, CT_TIMEOUT_TCP_ESTABLISHED_NS, CT_TIMEOUT_TCP_SYN_NS,
        CT_TIMEOUT_UDP_NS, CtKey, CtKey4, CtValue, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    },
    verdict::{DIR_EGRESS, DIR_INGRESS, REASON_ESTABLISHED, REASON_REPLY},
};

use crate::{
    CONNTRACK, CONNTRACK4, flows,
    parse::{self, L4Kind, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, be_words},
};

/// Do not rewrite an entry only to move its deadline by less than this (saves cache-line
/// traffic on every packet of a busy flow).
const REFRESH_SLACK_NS: u64 = 1_000_000_000;

/// The result of the conntrack lookup.
pub(crate) enum Ct {
    /// The packet belongs to a tracked flow: pass with this reason (entry already refreshed),
    /// counted under the endpoint counter slot stored in the entry.
    Hit(u8, u32),
    /// A live entry exists but this packet does not match it as established or reply.
    LiveMismatch,
    /// No live entry: the packet is a new flow.
    Miss,
    /// A live entry whose egress check is deferred (`CT_PENDING`), and this packet is sent by
    /// its originator: judged (and deferred) again as a new flow, which may overwrite it.
    Pending,
}

/// True when pair `a` sorts before or equal to pair `b` (addresses of a [`Packet`]). The
/// addresses are compared as two big-endian words each, which is their byte order, instead
/// of byte by byte (12 equal bytes for every IPv4-mapped pair).
#[inline(always)]
fn pair_le(a: &[u8; 16], a_port_be: u16, b: &[u8; 16], b_port_be: u16) -> bool {
    let (a0, a1) = be_words(a);
    let (b0, b1) = be_words(b);
    if a0 != b0 {
        return a0 < b0;
    }
    if a1 != b1 {
        return a1 < b1;
    }
    u16::from_be(a_port_be) <= u16::from_be(b_port_be)
}

/// [`pair_le`] for addresses of any alignment (map keys and values), byte by byte.
#[inline(always)]
pub(crate) fn pair_le_bytes(a: &[u8; 16], a_port_be: u16, b: &[u8; 16], b_port_be: u16) -> bool {
    for (x, y) in a.iter().zip(b.iter()) {
        if x != y {
            return x < y;
        }
    }
    u16::from_be(a_port_be) <= u16::from_be(b_port_be)
}

/// Whether `pkt`'s source is the `lo` side of its flow's key.
#[inline(always)]
pub(crate) fn src_is_lo(pkt: &Packet) -> bool {
    pair_le(&pkt.src, pkt.sport_be, &pkt.dst, pkt.dport_be)
}

/// The last four bytes of an address of a [`Packet`], in one 4-byte read (built byte by
/// byte, the key took eight loads and eight stores).
#[inline(always)]
fn v4_bytes(a: &[u8; 16]) -> [u8; 4] {
    // SAFETY: callers pass `Packet::src` or `Packet::dst`, 8-byte aligned 16-byte arrays, so
    // bytes 12..16 are in bounds and 4-byte aligned.
    unsafe { a.as_ptr().add(12).cast::<u32>().read() }.to_ne_bytes()
}

/// The `NPM_CT4` key of `pkt`'s flow at `ifindex` (`pkt.v4`).
#[inline(always)]
fn key4(pkt: &Packet, ifindex: u32, src_is_lo: bool) -> CtKey4 {
    let (src, dst) = (v4_bytes(&pkt.src), v4_bytes(&pkt.dst));
    let (addr_lo, addr_hi, port_lo_be, port_hi_be) = if src_is_lo {
        (src, dst, pkt.sport_be, pkt.dport_be)
    } else {
        (dst, src, pkt.dport_be, pkt.sport_be)
    };
    CtKey4 {
        addr_lo,
        addr_hi,
        ifindex,
        port_lo_be,
        port_hi_be,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

/// The `NPM_CT` key of `pkt`'s flow at `ifindex` (not `pkt.v4`).
#[inline(always)]
fn key6(pkt: &Packet, ifindex: u32, src_is_lo: bool) -> CtKey {
    let mut key = CtKey {
        addr_lo: pkt.dst,
        addr_hi: pkt.src,
        ifindex,
        port_lo_be: pkt.dport_be,
        port_hi_be: pkt.sport_be,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    if src_is_lo {
        key.addr_lo = pkt.src;
        key.addr_hi = pkt.dst;
        key.port_lo_be = pkt.sport_be;
        key.port_hi_be = pkt.dport_be;
    }
    key
}

#[inline(always)]
fn tcp_closing(flags: u8) -> bool {
    flags & (TCP_FIN | TCP_RST) != 0
}

/// `key` as the native-order words the flow cache stores.
#[inline(always)]
fn words4(key: &CtKey4) -> &[u32; 5] {
    // SAFETY: `CtKey4` is `repr(C)`, 20 bytes, 4-byte aligned, without implicit padding.
    unsafe { &*(key as *const CtKey4).cast::<[u32; 5]>() }
}

/// [`words4`] for a [`CtKey`].
#[inline(always)]
fn words6(key: &CtKey) -> &[u32; 11] {
    // SAFETY: `CtKey` is `repr(C)`, 44 bytes, 4-byte aligned, without implicit padding.
    unsafe { &*(key as *const CtKey).cast::<[u32; 11]>() }
}

/// Looks `pkt`'s flow at `ifindex` up: in the flow cache ([`crate::flows`]) when the packet
/// is cacheable, else (or on a miss) in the conntrack map of its family, refreshing the entry
/// in place on a hit and copying the answer into the cache.
#[inline(always)]
pub(crate) fn lookup(pkt: &Packet, ifindex: u32, src_is_lo: bool, dir: u8, now: u64) -> Ct {
    let generation = if flows::cacheable(pkt) {
        flows::generation()
    } else {
        0
    };
    let tag = flows::tag(dir, src_is_lo, pkt.v4);
    // Each family's path is whole (lookup, judge, cache fill): had the two shared the map
    // lookup, LLVM could merge the two calls into one whose map is not known, which the
    // verifier cannot inline (measured: 16 ns more per conntrack hit).
    let at = At {
        generation,
        tag,
        now,
    };
    if pkt.v4 {
        lookup_in(
            &CONNTRACK4,
            || key4(pkt, ifindex, src_is_lo),
            words4,
            &at,
            pkt,
            src_is_lo,
            dir,
        )
    } else {
        lookup_in(
            &CONNTRACK,
            || key6(pkt, ifindex, src_is_lo),
            words6,
            &at,
            pkt,
            src_is_lo,
            dir,
        )
    }
}

/// What [`lookup_in`] needs besides the key: the flow cache's generation (0: not used for
/// this packet), the packet's cache tag, and the clock.
struct At {
    generation: u32,
    tag: u32,
    now: u64,
}

/// [`lookup`] in one family's conntrack map; `key_of` builds the flow's key, `words_of` views
/// it as the flow cache's words. The key is built twice (for the lookups, then for the cache
/// fill) rather than kept alive across [`judge`]: the frame of `classify` is tight.
#[inline(always)]
fn lookup_in<K, const N: usize>(
    map: &LruHashMap<K, CtValue>,
    key_of: impl Fn() -> K,
    words_of: fn(&K) -> &[u32; N],
    at: &At,
    pkt: &Packet,
    src_is_lo: bool,
    dir: u8,
) -> Ct {
    let mut slot = 0;
    let found = {
        let key = key_of();
        if at.generation != 0 {
            slot = flows::slot_of(at.tag, words_of(&key));
            if let Some((reason, counter)) =
                flows::get(slot, at.generation, at.tag, words_of(&key), at.now)
            {
                return Ct::Hit(reason, counter);
            }
        }
        map.get_ptr_mut(&key)
    };
    let Some(ptr) = found else {
        return Ct::Miss;
    };
    let (ct, until) = judge(ptr, pkt, src_is_lo, dir, at.now);
    if at.generation != 0
        && let Ct::Hit(reason, counter) = ct
    {
        let key = key_of();
        flows::put(
            slot,
            at.generation,
            at.tag,
            words_of(&key),
            until,
            reason,
            counter,
        );
    }
    ct
}

/// The answer for `pkt` given its flow's live-or-dead entry `ptr`, refreshing the entry on a
/// hit; with a hit, also the clock time from which the entry is due for its next refresh
/// (how long the flow cache may repeat the answer).
#[inline(always)]
fn judge(ptr: *mut CtValue, pkt: &Packet, src_is_lo: bool, dir: u8, now: u64) -> (Ct, u64) {
    // SAFETY: the pointer comes from a successful map lookup and stays valid for this
    // program run (RCU); concurrent writers only ever store whole u64/u8 fields.
    let v = unsafe { &mut *ptr };
    if v.expires_ns <= now {
        return (Ct::Miss, 0);
    }
    let origin_lo = v.flags & CT_ORIGIN_LO != 0;
    if v.flags & CT_PENDING != 0 {
        // Not verified after the DNAT yet: nothing passes on its account (crate::service).
        let ct = if dir == v.origin_dir && src_is_lo == origin_lo {
            Ct::Pending
        } else {
            Ct::LiveMismatch
        };
        return (ct, 0);
    }
    let reason = if dir == v.origin_dir && src_is_lo == origin_lo {
        // Sent by the originator, in the direction it was allowed in.
        if pkt.kind == L4Kind::EchoReply || pkt.kind == L4Kind::IcmpOther {
            return (Ct::LiveMismatch, 0);
        }
        REASON_ESTABLISHED
    } else if dir != v.origin_dir && src_is_lo != origin_lo {
        // Sent to the originator, in the other direction.
        if pkt.kind == L4Kind::EchoRequest || pkt.kind == L4Kind::IcmpOther {
            return (Ct::LiveMismatch, 0);
        }
        REASON_REPLY
    } else {
        return (Ct::LiveMismatch, 0);
    };

    let mut flags = v.flags;
    let timeout = if pkt.proto == PROTO_TCP {
        let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if syn_only && reason == REASON_ESTABLISHED && flags & CT_TCP_CLOSING != 0 {
            // A new connection reusing the tuple of a closing one: start over.
            flags &= !(CT_TCP_CLOSING | CT_SEEN_REPLY);
        }
        if reason == REASON_REPLY {
            flags |= CT_SEEN_REPLY;
        }
        if tcp_closing(pkt.tcp_flags) {
            flags |= CT_TCP_CLOSING;
        }
        tcp_timeout(flags)
    } else {
        other_timeout(pkt.proto)
    };
    let expires = now + timeout;
    // Rewrite when the state changed, when the deadline moves earlier (closing), or when it
    // moves later by more than the slack.
    if flags != v.flags || expires < v.expires_ns || expires > v.expires_ns + REFRESH_SLACK_NS {
        v.flags = flags;
        v.expires_ns = expires;
    }
    // Until then, a packet that changes no state (flows::cacheable) would leave the entry
    // as it is: `now + timeout <= expires_ns + slack`.
    let until = v
        .expires_ns
        .saturating_add(REFRESH_SLACK_NS)
        .saturating_sub(timeout);
    (Ct::Hit(reason, u32::from(v.slot)), until)
}

/// Whether the ICMP error `pkt` (an `IcmpOther` with `inner_off`), seen at `ifindex` in
/// `dir`, reports on a flow this endpoint tracks. The embedded packet ([`parse::embedded`]) travelled the other way through this
/// interface, towards the error's sender, and the error goes back to that packet's source;
/// so:
/// - entering the pod, the error's destination must be the embedded packet's source (the
///   pod: the error reports on a packet the pod sent); its source is free (any router on the
///   path may send it);
/// - leaving the pod, its two addresses must be the embedded packet's, swapped (the pod
///   reports on a packet it received, to that packet's sender: a pod is not a router, and
///   the error may not reach a third party the pod's policy does not allow);
/// - the embedded packet's flow at this interface must have a live entry that is not pending
///   (a deferred flow's not yet confirmed after the DNAT) and that packet must match it as a
///   packet of that flow in its own direction: sent by the originator in the direction the
///   flow was allowed in, or towards it in the other (an echo request only the former, an
///   echo reply only the latter).
///
/// Read only: the entry is not refreshed (an error does not keep a flow alive) and nothing
/// is created. Not inlined: the inner packet and its key get their own stack frame.
#[inline(never)]
pub(crate) fn related(ctx: &TcContext, pkt: &Packet, ifindex: u32, dir: u8, now: u64) -> bool {
    let mut inner = Packet::new();
    if !parse::embedded(ctx, pkt, &mut inner) {
        return false;
    }
    let addresses = if dir == DIR_INGRESS {
        parse::same_addr(&inner.src, &pkt.dst)
    } else {
        parse::same_addr(&inner.src, &pkt.dst) && parse::same_addr(&inner.dst, &pkt.src)
    };
    if !addresses {
        return false;
    }
    let inner_dir = if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    };
    let lo = src_is_lo(&inner);
    // SAFETY: plain-integer values, read once each; a concurrent update can at worst give a
    // mix of old and new fields for this one packet.
    let found = if inner.v4 {
        unsafe { CONNTRACK4.get(key4(&inner, ifindex, lo)) }.copied()
    } else {
        unsafe { CONNTRACK.get(key6(&inner, ifindex, lo)) }.copied()
    };
    let Some(v) = found else {
        return false;
    };
    if v.expires_ns <= now || v.flags & CT_PENDING != 0 {
        return false;
    }
    let origin_lo = v.flags & CT_ORIGIN_LO != 0;
    if inner_dir == v.origin_dir && lo == origin_lo {
        inner.kind != L4Kind::EchoReply
    } else if inner_dir != v.origin_dir && lo != origin_lo {
        inner.kind != L4Kind::EchoRequest
    } else {
        false
    }
}

#[inline(always)]
fn tcp_timeout(flags: u8) -> u64 {
    if flags & CT_TCP_CLOSING != 0 {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if flags & CT_SEEN_REPLY != 0 {
        CT_TIMEOUT_TCP_ESTABLISHED_NS
    } else {
        CT_TIMEOUT_TCP_SYN_NS
    }
}

/// UDP and SCTP get the UDP timeout (SCTP heartbeats default to 30 s, so the 30 s "other"
/// timeout would race them); everything else (ICMP echo, other protocols) the short one.
#[inline(always)]
fn other_timeout(proto: u8) -> u64 {
    if proto == PROTO_UDP || proto == PROTO_SCTP {
        CT_TIMEOUT_UDP_NS
    } else {
        CT_TIMEOUT_OTHER_NS
    }
}

/// Tracks a new allowed flow whose originator is this packet's source, at the endpoint of
/// `ifindex` whose counter slot is `slot`.
#[inline(always)]
pub(crate) fn create(pkt: &Packet, ifindex: u32, src_is_lo: bool, dir: u8, now: u64, slot: u32) {
    create_flags(pkt, ifindex, src_is_lo, dir, now, slot, 0);
}

/// The timeout of a flow's first packet (what [`create`] gives a new entry).
#[inline(always)]
pub(crate) fn new_flow_timeout(pkt: &Packet) -> u64 {
    if pkt.proto == PROTO_TCP {
        tcp_timeout(if tcp_closing(pkt.tcp_flags) {
            CT_TCP_CLOSING
        } else {
            0
        })
    } else {
        other_timeout(pkt.proto)
    }
}

/// Clears `CT_PENDING` of the live entry `key`, if it has it: the deferred flow passed its
/// post-DNAT check, so its packets are established and replies pass from now on. The entry
/// is in the map of the key's family (`CtKey::to_v4`, as for `Packet::v4`).
#[inline(always)]
pub(crate) fn confirm(key: &CtKey, now: u64, slot: u32) {
    let found = match key.to_v4() {
        Some(key4) => CONNTRACK4.get_ptr_mut(key4),
        None => CONNTRACK.get_ptr_mut(key),
    };
    let Some(ptr) = found else {
        return;
    };
    // SAFETY: as in `lookup`.
    let v = unsafe { &mut *ptr };
    if v.expires_ns > now && v.flags & CT_PENDING != 0 {
        v.flags &= !CT_PENDING;
        v.slot = slot as u16;
    }
}

/// [`create`] with `extra` `CT_*` bits (`CT_PENDING` for a deferred flow).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn create_flags(
    pkt: &Packet,
    ifindex: u32,
    src_is_lo: bool,
    dir: u8,
    now: u64,
    slot: u32,
    extra: u8,
) {
    if pkt.kind == L4Kind::EchoReply || pkt.kind == L4Kind::IcmpOther {
        return;
    }
    let mut flags = extra | if src_is_lo { CT_ORIGIN_LO } else { 0 };
    let timeout = if pkt.proto == PROTO_TCP {
        if tcp_closing(pkt.tcp_flags) {
            flags |= CT_TCP_CLOSING;
        }
        tcp_timeout(flags)
    } else {
        other_timeout(pkt.proto)
    };
    let value = CtValue {
        expires_ns: now + timeout,
        origin_dir: dir,
        flags,
        // Slots are below COUNTER_SLOTS (2048); a larger value could only be a slot that
        // counts nowhere anyway.
        slot: slot as u16,
        _pad: [0; 4],
    };
    // Failure (e.g. -ENOMEM) only means the flow is re-evaluated on its next packet.
    if pkt.v4 {
        let _ = CONNTRACK4.insert(key4(pkt, ifindex, src_is_lo), value, u64::from(BPF_ANY));
    } else {
        let _ = CONNTRACK.insert(key6(pkt, ifindex, src_is_lo), value, u64::from(BPF_ANY));
    }
}
