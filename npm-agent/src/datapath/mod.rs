//! The kernel datapath: loading the embedded eBPF object, pinning its maps, attaching its
//! two TC classifiers to pod interfaces, and running them under `BPF_PROG_TEST_RUN`.
//!
//! Only this module (and the map programmer's backend) touches aya; only [`sys`] holds
//! `unsafe` code. The programs' semantics are documented in `npm-ebpf/src/main.rs`.

pub mod attachments;
mod counters;
pub mod inspect;
mod loader;
mod sys;
mod upgrade;

pub use counters::{
    CONNTRACK_RECOUNT, ConntrackCount, CounterReader, DatapathCounters, EventCounts, MapFill,
    PacketCount, SlotCount,
};
pub use loader::{
    Datapath, DatapathError, LoadOptions, TC_HANDLE, TC_PRIORITY, TcMode, TestRunResult,
    tcx_programs,
};
pub use upgrade::{on_bpffs, pin_dirs, previous_pin_dirs, remove_pin_dir};
