//! Later fragments of a datagram (`NPM_FRAGS`): they carry no L4 header, so neither
//! conntrack nor a port rule can recognise them. The first fragment (offset 0, more
//! fragments set) has the ports and is judged like any packet; when it passes, its verdict
//! (reason and counter slot) is recorded under the datagram's identity at this interface and
//! direction ([`record`]), and a later fragment (offset > 0) with a live record passes with
//! it ([`later`]). Records are never refreshed and die after `FRAG_TIMEOUT_NS`; the LRU
//! evicts the oldest when full.
//!
//! A later fragment without a record (its first fragment was dropped, not seen yet, or the
//! record expired or was evicted) is judged as before: with ports 0, so in an isolated
//! direction it passes only through an any-port or any-protocol rule. Fragments that arrive
//! before their first fragment are therefore dropped in an isolated direction (the
//! receiver's reassembly then fails and the sender retransmits the datagram, if its protocol
//! does); Linux sends a datagram's fragments in order, and so does the node when it
//! refragments a forwarded datagram.
//!
//! Safety: a record is keyed by the interface, the direction and both addresses, and written
//! only for a first fragment that passed at that interface in that direction (the source
//! check included, or a conntrack hit, which implies it), so a later fragment that finds it
//! carries the same pod-side address. A record cannot open anything but the rest of one
//! datagram whose first fragment passed: without its first fragment, a receiver cannot
//! reassemble a datagram.

use aya_ebpf::{bindings::BPF_ANY, macros::map, maps::LruHashMap};
use npm_common::maps::{FRAG_TIMEOUT_NS, FRAGS_MAX, FragKey, FragValue};

use crate::{now_ns, parse::Packet};

#[map(name = "NPM_FRAGS")]
static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAGS_MAX, 0);

#[inline(always)]
fn key(pkt: &Packet, ifindex: u32, dir: u8) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        ifindex,
        proto: pkt.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The recorded verdict of the later fragment `pkt`'s datagram at `ifindex` in `dir`, as
/// reason << 32 | counter slot; 0 when there is no live record (a record never holds reason
/// 0, `REASON_NOT_MANAGED`). Not inlined: the key gets its own stack frame.
#[inline(never)]
pub(crate) fn later(pkt: &Packet, ifindex: u32, dir: u8) -> u64 {
    // SAFETY: plain-integer values; a concurrent update can at worst give a mix of old and
    // new fields for this one packet.
    match unsafe { FRAGS.get(key(pkt, ifindex, dir)) } {
        Some(v) if v.expires_ns > now_ns() => u64::from(v.reason) << 32 | u64::from(v.slot),
        _ => 0,
    }
}

/// Records the passing verdict `verdict` (reason << 32 | counter slot) of the first fragment
/// `pkt` at `ifindex` in `dir` for its datagram's later fragments. A failed insert only means
/// they are judged without ports. Not inlined: the key and value get their own stack frame.
#[inline(never)]
pub(crate) fn record(pkt: &Packet, ifindex: u32, dir: u8, verdict: u64) {
    let value = FragValue {
        expires_ns: now_ns() + FRAG_TIMEOUT_NS,
        // Slots are below COUNTER_SLOTS (2048).
        slot: verdict as u16,
        reason: (verdict >> 32) as u8,
        _pad: [0; 5],
    };
    let _ = FRAGS.insert(key(pkt, ifindex, dir), value, u64::from(BPF_ANY));
}
