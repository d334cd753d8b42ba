//! Reading the datapath's per-CPU verdict counters (`NPM_METRICS`) for the metrics endpoint.
//!
//! METRICS is a per-CPU array of (slot, direction, reason) counters
//! (`npm_common::metrics::counter_index`). Only slots that can hold counts are read: the
//! unmanaged and retired slots and the slots of the interfaces in ENDPOINTS (a freed slot's
//! counts are moved to the retired slot by the programmer), so a scrape costs
//! `(2 + endpoints) * COUNTER_STRIDE` lookups, not the whole array.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use npm_common::maps::{COUNTER_SLOTS, EndpointInfo, MAP_ENDPOINTS, MAP_METRICS};
use npm_common::metrics::{
    COUNTER_REASONS, COUNTER_STRIDE, MetricsValue, SLOT_RETIRED, SLOT_UNMANAGED, reason_of_index,
};

use super::DatapathError;

/// Packets and bytes for one (direction, reason), summed over interfaces and CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    /// `npm_common::verdict::DIR_*`.
    pub dir: u8,
    /// `npm_common::verdict::REASON_*`.
    pub reason: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// Something that can read the verdict counters (the kernel map, or a fake in tests).
pub trait CounterReader: Send + Sync + 'static {
    /// The counters now, one entry per (dir, reason) seen, in (dir, reason) order.
    fn read(&self) -> Result<Vec<PacketCount>, DatapathError>;
}

/// The `NPM_METRICS` map (and `NPM_ENDPOINTS`, for the slots in use), opened for reading.
pub struct DatapathCounters {
    metrics: PerCpuArray<MapData, MetricsValue>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
}

impl std::fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCounters").finish_non_exhaustive()
    }
}

fn map_err(map: &str) -> impl Fn(aya::maps::MapError) -> DatapathError + '_ {
    move |source| DatapathError::Map {
        map: map.to_owned(),
        source: Box::new(source),
    }
}

impl DatapathCounters {
    /// Wraps METRICS and ENDPOINTS maps of a loaded datapath (taken, or second handles from
    /// `Datapath::map_handle`).
    pub fn from_maps(metrics: Map, endpoints: Map) -> Result<Self, DatapathError> {
        Ok(Self {
            metrics: PerCpuArray::try_from(metrics).map_err(map_err(MAP_METRICS))?,
            endpoints: HashMap::try_from(endpoints).map_err(map_err(MAP_ENDPOINTS))?,
        })
    }

    /// Opens the maps pinned as `pin_dir/NPM_METRICS` and `pin_dir/NPM_ENDPOINTS` by a
    /// running agent.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let metrics = MapData::from_pin(pin_dir.join(MAP_METRICS)).map_err(map_err(MAP_METRICS))?;
        let endpoints =
            MapData::from_pin(pin_dir.join(MAP_ENDPOINTS)).map_err(map_err(MAP_ENDPOINTS))?;
        Self::from_maps(Map::PerCpuArray(metrics), Map::HashMap(endpoints))
    }

    /// The slots that can hold counts.
    fn slots(&self) -> Result<BTreeSet<u32>, DatapathError> {
        let mut slots: BTreeSet<u32> = [SLOT_UNMANAGED, SLOT_RETIRED].into();
        for item in self.endpoints.iter() {
            let (_, ep) = item.map_err(map_err(MAP_ENDPOINTS))?;
            if ep.slot < COUNTER_SLOTS {
                slots.insert(ep.slot);
            }
        }
        Ok(slots)
    }
}

impl CounterReader for DatapathCounters {
    fn read(&self) -> Result<Vec<PacketCount>, DatapathError> {
        let mut sums: BTreeMap<(u8, u8), PacketCount> = BTreeMap::new();
        for slot in self.slots()? {
            for i in 0..COUNTER_STRIDE {
                let per_cpu = self
                    .metrics
                    .get(&(slot * COUNTER_STRIDE + i), 0)
                    .map_err(map_err(MAP_METRICS))?;
                let (mut packets, mut bytes) = (0u64, 0u64);
                for v in per_cpu.iter() {
                    packets = packets.wrapping_add(v.packets);
                    bytes = bytes.wrapping_add(v.bytes);
                }
                if packets == 0 && bytes == 0 {
                    continue;
                }
                // COUNTER_STRIDE is 2 * COUNTER_REASONS: both fit a u8.
                let dir = (i / COUNTER_REASONS) as u8;
                let reason = reason_of_index(i % COUNTER_REASONS);
                let sum = sums.entry((dir, reason)).or_insert_with(|| PacketCount {
                    dir,
                    reason,
                    ..PacketCount::default()
                });
                sum.packets = sum.packets.wrapping_add(packets);
                sum.bytes = sum.bytes.wrapping_add(bytes);
            }
        }
        Ok(sums.into_values().collect())
    }
}
