//! Per-CPU packet and byte counters, keyed by endpoint, direction and verdict reason.

/// Key of [`crate::maps::METRICS`]: one counter per (interface, direction, reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricsKey {
    /// Host-side interface index of the local endpoint (0 for unmanaged interfaces).
    pub ifindex: u32,
    /// [`crate::verdict::DIR_INGRESS`] or [`crate::verdict::DIR_EGRESS`].
    pub dir: u8,
    /// A `REASON_*` code from [`crate::verdict`].
    pub reason: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<MetricsKey>() == 8);

/// Value of [`crate::maps::METRICS`] (one per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<MetricsValue>() == 16);
