//! The flow cache: a per-CPU, direct-mapped copy of recent conntrack hits (`NPM_FLOWS`), so
//! the next packet of a flow in the same direction on the same CPU passes after an inlined
//! array lookup and a compare instead of the conntrack map's kernel hash lookup.
//!
//! It answers only what [`crate::conntrack::lookup`] would answer, without doing anything the
//! conntrack path would do (`npm_common::maps`, "FLOWS"):
//! - the slot holds the full conntrack key, the packet's direction and side of the key, and
//!   the answer (reason and counter slot) the conntrack path gave;
//! - it is a hit only until the conntrack path would next rewrite the entry (`until_ns`: its
//!   deadline due for a refresh), and only for packets that cannot change the entry's state
//!   ([`cacheable`]: TCP without SYN, FIN or RST, and UDP);
//! - userspace changes the generation (`NPM_CLOCK[FLOWS_GEN_ACTIVE]`) whenever it removes or
//!   rewrites conntrack entries.
//!
//! So an entry outlives its conntrack entry only when the kernel's LRU evicts that one, by at
//! most the refresh slack (1 s). Per CPU, so no entry is shared or read half-written (TC
//! programs run with migration disabled, and a CPU's TC runs do not nest).

use aya_ebpf::maps::PerCpuArray;
use npm_common::maps::{
    FLOW_SRC_IS_LO, FLOW_V4, FLOWS_BITS, FLOWS_GEN_ACTIVE, FLOWS_MAX, FlowEntry, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    CLOCK,
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

#[aya_ebpf::macros::map(name = "NPM_FLOWS")]
static FLOWS: PerCpuArray<FlowEntry> = PerCpuArray::with_max_entries(FLOWS_MAX, 0);

/// The active generation (`NPM_CLOCK[FLOWS_GEN_ACTIVE]`, in the map of the clock factor every
/// packet reads); 0 when the cache is off (or not set up yet).
#[inline(always)]
pub(crate) fn generation() -> u32 {
    // Userspace keeps it below 2³².
    CLOCK.get(FLOWS_GEN_ACTIVE).copied().unwrap_or(0) as u32
}

/// Whether `pkt` may be answered from the cache, and its conntrack answer copied into it: a
/// packet that cannot change its entry's state (TCP SYN, FIN and RST do; ICMP answers depend
/// on the message type, which the key does not hold).
#[inline(always)]
pub(crate) fn cacheable(pkt: &Packet) -> bool {
    pkt.proto == PROTO_UDP
        || (pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
}

/// Word 0 of an entry's key: what the answer depends on besides the conntrack key.
#[inline(always)]
pub(crate) fn tag(dir: u8, src_is_lo: bool, v4: bool) -> u32 {
    u32::from(dir) | if src_is_lo { FLOW_SRC_IS_LO } else { 0 } | if v4 { FLOW_V4 } else { 0 }
}

/// The slot of (`tag`, `words`): the words folded pairwise into one u64, one multiply, the
/// top `FLOWS_BITS` bits. A collision only costs a miss.
#[inline(always)]
pub(crate) fn slot_of<const N: usize>(tag: u32, words: &[u32; N]) -> u32 {
    let mut x = u64::from(tag) << 32;
    let mut i = 0;
    while i < N {
        let w = u64::from(words[i]);
        x ^= if i % 2 == 0 { w } else { w << 32 };
        // Rotate between pairs so equal words of the two addresses do not cancel.
        if i % 2 == 1 {
            x = x.rotate_left(23);
        }
        i += 1;
    }
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FLOWS_BITS)) as u32
}

/// The cached answer (reason, counter slot) for (`tag`, `words`) at `slot`, if the slot holds
/// this flow, of `generation`, still valid at `now`.
#[inline(always)]
pub(crate) fn get<const N: usize>(
    slot: u32,
    generation: u32,
    tag: u32,
    words: &[u32; N],
    now: u64,
) -> Option<(u8, u32)> {
    const { assert!(N < 12) };
    // SAFETY: a pointer from a successful lookup of this CPU's element; only this CPU writes
    // it, and not while this program runs (see the module doc).
    let e = unsafe { &*FLOWS.get_ptr(slot)? };
    if e.generation != generation || e.key[0] != tag || now >= e.until_ns {
        return None;
    }
    let mut i = 0;
    while i < N {
        if e.key[i + 1] != words[i] {
            return None;
        }
        i += 1;
    }
    Some((e.reason, u32::from(e.slot)))
}

/// Copies a conntrack answer into `slot` (replacing whatever flow held it).
#[inline(always)]
pub(crate) fn put<const N: usize>(
    slot: u32,
    generation: u32,
    tag: u32,
    words: &[u32; N],
    until_ns: u64,
    reason: u8,
    counter_slot: u32,
) {
    const { assert!(N < 12) };
    let Some(e) = FLOWS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: as in `get`.
    let e = unsafe { &mut *e };
    e.key[0] = tag;
    let mut i = 0;
    while i < N {
        e.key[i + 1] = words[i];
        i += 1;
    }
    e.until_ns = until_ns;
    e.generation = generation;
    e.slot = counter_slot as u16;
    e.reason = reason;
}
