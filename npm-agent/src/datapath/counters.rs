//! Reading the datapath's per-CPU verdict counters (`NPM_METRICS`) for the metrics endpoint.
use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{Map, MapData, PerCpuHashMap};
use npm_common::maps::MAP_METRICS;
use npm_common::metrics::{MetricsKey, MetricsValue};

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

/// The `NPM_METRICS` map, opened for reading.
pub struct DatapathCounters {
    map: PerCpuHashMap<MapData, MetricsKey, MetricsValue>,
}

impl std::fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCounters").finish_non_exhaustive()
    }
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        map: MAP_METRICS.to_owned(),
        source: Box::new(source),
    }
}

impl DatapathCounters {
    /// Wraps the map taken from a loaded datapath (`Datapath::take_map(MAP_METRICS)`).
    pub fn from_map(map: Map) -> Result<Self, DatapathError> {
        Ok(Self {
            map: PerCpuHashMap::try_from(map).map_err(map_err)?,
        })
    }

    /// Opens the map pinned as `pin_dir/NPM_METRICS` by a running agent.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = MapData::from_pin(pin_dir.join(MAP_METRICS)).map_err(map_err)?;
        Self::from_map(Map::PerCpuHashMap(data))
    }
}

impl CounterReader for DatapathCounters {
    fn read(&self) -> Result<Vec<PacketCount>, DatapathError> {
        let mut sums: BTreeMap<(u8, u8), PacketCount> = BTreeMap::new();
        for item in self.map.iter() {
            let (key, per_cpu) = item.map_err(map_err)?;
            let sum = sums
                .entry((key.dir, key.reason))
                .or_insert_with(|| PacketCount {
                    dir: key.dir,
                    reason: key.reason,
                    ..PacketCount::default()
                });
            for v in per_cpu.iter() {
                sum.packets = sum.packets.wrapping_add(v.packets);
                sum.bytes = sum.bytes.wrapping_add(v.bytes);
            }
        }
        Ok(sums.into_values().collect())
    }
}
