//! Per-CPU packet and byte counters: a per-CPU array indexed by endpoint slot, direction and
//! verdict reason ([`counter_index`]).
//!
//! Each local endpoint (host-side interface in ENDPOINTS) owns a small stable slot
//! (`EndpointInfo::slot`, allocated by the compiler); slot [`SLOT_UNMANAGED`] counts packets
//! of interfaces npm does not manage (and endpoints beyond [`crate::maps::COUNTER_SLOTS`]),
//! slot [`SLOT_RETIRED`] is written by userspace only: when a slot is freed or handed to a new
//! interface, its counts are added there and the slot is zeroed, so the totals over all slots
//! never go down.
use crate::verdict::{DIR_COUNT, REASON_DROP_FIRST};

/// Slot of unmanaged interfaces (and of endpoints beyond the slot count).
pub const SLOT_UNMANAGED: u32 = 0;
/// Slot holding the counts of freed slots (userspace only; the datapath never writes it).
pub const SLOT_RETIRED: u32 = 1;
/// First slot handed to endpoints.
pub const SLOT_FIRST: u32 = 2;

/// Reason indexes per direction: pass reasons `0..8` take indexes `0..8`, drop reasons
/// `128..136` take `8..16`.
pub const COUNTER_REASONS: u32 = 16;
/// Counters per slot: every (direction, reason index).
pub const COUNTER_STRIDE: u32 = DIR_COUNT as u32 * COUNTER_REASONS;

/// The reason index of a `REASON_*` code (see [`COUNTER_REASONS`]).
#[inline(always)]
pub const fn reason_index(reason: u8) -> u32 {
    (reason as u32 & 7) | ((reason as u32 >> 7) << 3)
}

/// The `REASON_*` code of a reason index (inverse of [`reason_index`]).
pub const fn reason_of_index(index: u32) -> u8 {
    if index < 8 {
        index as u8
    } else {
        REASON_DROP_FIRST + (index as u8 - 8)
    }
}

/// Index in METRICS of the counter (slot, direction, reason).
#[inline(always)]
pub const fn counter_index(slot: u32, dir: u8, reason: u8) -> u32 {
    slot * COUNTER_STRIDE + dir as u32 * COUNTER_REASONS + reason_index(reason)
}

/// Value of [`crate::maps::MAP_METRICS`] (one per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricsValue>() == 16);

// Every reason code has its own index: pass reasons below 8, drop reasons in 128..136.
const _: () = {
    use crate::verdict::*;
    let pass = [
        REASON_NOT_MANAGED,
        REASON_NOT_ISOLATED,
        REASON_ESTABLISHED,
        REASON_REPLY,
        REASON_POLICY_ALLOW,
        REASON_HOST,
        REASON_SELF,
        REASON_DEFERRED,
    ];
    let mut i = 0;
    while i < pass.len() {
        assert!(pass[i] < 8);
        i += 1;
    }
    let drop = [
        REASON_DROP_POLICY,
        REASON_DROP_MALFORMED,
        REASON_DROP_UNKNOWN_SOURCE,
        REASON_DROP_SPOOFED,
    ];
    let mut i = 0;
    while i < drop.len() {
        assert!(drop[i] >= REASON_DROP_FIRST && drop[i] < REASON_DROP_FIRST + 8);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_indexes_are_dense_distinct_and_invertible() {
        let mut seen = [false; COUNTER_REASONS as usize];
        for r in (0u8..8).chain(REASON_DROP_FIRST..REASON_DROP_FIRST + 8) {
            let i = reason_index(r);
            assert!(i < COUNTER_REASONS);
            assert!(!seen[i as usize], "reason {r} shares index {i}");
            seen[i as usize] = true;
            assert_eq!(reason_of_index(i), r);
        }
        assert_eq!(counter_index(0, 0, 0), 0);
        assert_eq!(
            counter_index(crate::maps::COUNTER_SLOTS - 1, 1, REASON_DROP_FIRST + 7),
            crate::maps::METRICS_MAX - 1
        );
    }
}
