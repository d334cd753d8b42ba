//! The only place that declares map types plain-old-data for aya (userspace side).
//!
//! SAFETY (all impls): every type is `#[repr(C)]`, `Copy`, made only of integers and byte
//! arrays, has no implicit padding (checked by the size assertions next to each type), and
//! every bit pattern is a valid value.
use crate::maps::{
    CtKey, CtKey4, CtValue, DeferKey, DeferValue, EndpointInfo, Event, EventStats, FlowEntry,
    FragKey, FragValue, PairKey, PairValue, PeerInfo, PolicyKey, PolicyValue,
};
use crate::metrics::MetricsValue;

unsafe impl aya::Pod for EndpointInfo {}
unsafe impl aya::Pod for PeerInfo {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for PairKey {}
unsafe impl aya::Pod for PairValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtKey4 {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for FlowEntry {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for DeferKey {}
unsafe impl aya::Pod for DeferValue {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragValue {}
unsafe impl aya::Pod for Event {}
unsafe impl aya::Pod for EventStats {}
