//! Reading the datapath's per-CPU verdict counters (`NPM_METRICS`) for the metrics endpoint.
//!
//! METRICS is a per-CPU array of (slot, direction, reason) counters
//! (`npm_common::metrics::counter_index`). Only slots that can hold counts are read: the
//! unmanaged and retired slots and the slots of the interfaces in ENDPOINTS (a freed slot's
//! counts are moved to the retired slot by the programmer), so a scrape costs
//! `(2 + endpoints) * COUNTER_STRIDE` lookups, not the whole array.
//!
//! Conntrack occupancy (`NPM_CT4`, `NPM_CT`): the kernel keeps no element count a program
//! outside a BPF iterator can read, so entries are counted by walking the keys, one
//! `BPF_MAP_GET_NEXT_KEY` syscall per entry (at the default 262 144 entries per map, full:
//! about half a million syscalls, a fraction of a second of one core). So a count is reused for
//! [`CONNTRACK_RECOUNT`] = 30 s, and the walk stops after `max_entries` keys. Under churn the
//! count is approximate (a key deleted during the walk restarts it from the first key; the
//! result is clamped to the capacity).
//!
//! The other maps only the kernel writes, `NPM_DEFERRED` and `NPM_FRAGS`, are counted the
//! same way and as rarely ([`MapFill`]); the maps the agent writes are counted by the compiler
//! (`npm_map_entries`), and every map's `max_entries` is read once, at load.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use npm_common::maps::{
    COUNTER_SLOTS, CtKey, CtKey4, CtValue, EndpointInfo, EventStats, MAP_CONNTRACK, MAP_CONNTRACK4,
    MAP_ENDPOINTS, MAP_EVENT_STATS, MAP_METRICS,
};
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

/// One counter slot's packets and bytes for one (direction, reason), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCount {
    /// `EndpointInfo::slot` (`npm_common::metrics::SLOT_*` for the shared ones).
    pub slot: u32,
    pub count: PacketCount,
}

/// Sizes of the datapath's maps and the occupancy of those only the kernel writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    /// `max_entries` of every map (by its name in `npm_common::maps`).
    pub capacity: Vec<(&'static str, u32)>,
    /// Entries of the kernel-written hash maps (conntrack, deferred, fragments), counted by
    /// walking their keys at most every [`CONNTRACK_RECOUNT`].
    pub entries: Vec<(&'static str, u32)>,
}

/// How long a conntrack count is reused before the maps are walked again.
pub const CONNTRACK_RECOUNT: Duration = Duration::from_secs(30);

/// Entries and `max_entries` of the two conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackCount {
    /// Entries of `NPM_CT4` (IPv4 flows).
    pub ipv4: u32,
    /// Entries of `NPM_CT` (IPv6 flows).
    pub ipv6: u32,
    /// `max_entries` of `NPM_CT4`, as the kernel has it (an adopted pin keeps its size).
    pub ipv4_capacity: u32,
    /// `max_entries` of `NPM_CT`.
    pub ipv6_capacity: u32,
}

/// Something that can read the verdict counters (the kernel map, or a fake in tests).
pub trait CounterReader: Send + Sync + 'static {
    /// The counters now, one entry per (dir, reason) seen, in (dir, reason) order.
    fn read(&self) -> Result<Vec<PacketCount>, DatapathError>;

    /// Conntrack occupancy, at most [`CONNTRACK_RECOUNT`] old; `None` when this reader has no
    /// conntrack maps.
    fn conntrack(&self) -> Result<Option<ConntrackCount>, DatapathError> {
        Ok(None)
    }

    /// The counters per slot, one entry per (slot, dir, reason) with counts. The default puts
    /// everything [`CounterReader::read`] gives under the unmanaged slot (no pod's own).
    fn read_slots(&self) -> Result<Vec<SlotCount>, DatapathError> {
        Ok(self
            .read()?
            .into_iter()
            .map(|count| SlotCount {
                slot: SLOT_UNMANAGED,
                count,
            })
            .collect())
    }

    /// Map sizes and the kernel-written maps' occupancy; `None` when this reader has no maps.
    fn map_fill(&self) -> Result<Option<MapFill>, DatapathError> {
        Ok(None)
    }

    /// The drop-event counters (`NPM_EVENT_STATS`) summed over CPUs; `None` when this reader
    /// has no such map.
    fn events(&self) -> Result<Option<EventCounts>, DatapathError> {
        Ok(None)
    }
}

/// Drop events since the map was created (`NPM_EVENT_STATS`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub written: u64,
    /// Not written: the CPU's token bucket was empty.
    pub rate_limited: u64,
    /// Not written: the ring buffer was full.
    pub ring_full: u64,
}

/// The two conntrack maps and their last count.
struct Conntrack {
    ct4: HashMap<MapData, CtKey4, CtValue>,
    ct6: HashMap<MapData, CtKey, CtValue>,
    ipv4_capacity: u32,
    ipv6_capacity: u32,
    last: Mutex<Option<(Instant, ConntrackCount)>>,
}

/// `max_entries` of a map as the kernel has it.
fn capacity(map: &Map, name: &str) -> Result<u32, DatapathError> {
    let data = match map {
        Map::LruHashMap(d) | Map::HashMap(d) => d,
        _ => {
            return Err(DatapathError::MapMissing {
                map: name.to_owned(),
            });
        }
    };
    Ok(data.info().map_err(map_err(name))?.max_entries())
}

/// Keys of `map`, walking at most `limit` of them.
fn count_keys<K: aya::Pod>(
    map: &HashMap<MapData, K, CtValue>,
    limit: u32,
    name: &str,
) -> Result<u32, DatapathError> {
    let mut n = 0u32;
    for key in map.keys().take(limit as usize) {
        key.map_err(map_err(name))?;
        n += 1;
    }
    Ok(n)
}

impl Conntrack {
    fn count(&self, max_age: Duration) -> Result<ConntrackCount, DatapathError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, count)) = *last
            && at.elapsed() < max_age
        {
            return Ok(count);
        }
        let count = ConntrackCount {
            ipv4: count_keys(&self.ct4, self.ipv4_capacity, MAP_CONNTRACK4)?,
            ipv6: count_keys(&self.ct6, self.ipv6_capacity, MAP_CONNTRACK)?,
            ipv4_capacity: self.ipv4_capacity,
            ipv6_capacity: self.ipv6_capacity,
        };
        *last = Some((Instant::now(), count));
        Ok(count)
    }
}

/// The `NPM_METRICS` map (and `NPM_ENDPOINTS`, for the slots in use), opened for reading;
/// with [`DatapathCounters::with_conntrack`], the conntrack maps too.
pub struct DatapathCounters {
    metrics: PerCpuArray<MapData, MetricsValue>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    conntrack: Option<Conntrack>,
    /// `max_entries` of every map ([`DatapathCounters::with_capacities`]).
    capacities: Vec<(&'static str, u32)>,
    /// Other kernel-written maps to count: (name, map, key size, max_entries).
    counted: Vec<(&'static str, MapData, u32, u32)>,
    last_counted: Mutex<Option<(Instant, MapCounts)>>,
    /// `NPM_EVENT_STATS` ([`DatapathCounters::with_events`]).
    events: Option<PerCpuArray<MapData, EventStats>>,
}

/// Entries per map name.
type MapCounts = Vec<(&'static str, u32)>;

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
            conntrack: None,
            capacities: Vec::new(),
            counted: Vec::new(),
            last_counted: Mutex::new(None),
            events: None,
        })
    }

    /// Adds `NPM_EVENT_STATS` (a second handle from `Datapath::map_handle`) for
    /// [`CounterReader::events`].
    pub fn with_events(mut self, stats: Map) -> Result<Self, DatapathError> {
        self.events = Some(PerCpuArray::try_from(stats).map_err(map_err(MAP_EVENT_STATS))?);
        Ok(self)
    }

    /// The maps' sizes (`Datapath::map_capacities`), reported by [`CounterReader::map_fill`].
    pub fn with_capacities(mut self, capacities: Vec<(&'static str, u32)>) -> Self {
        self.capacities = capacities;
        self
    }

    /// Adds a kernel-written hash map (`NPM_DEFERRED`, `NPM_FRAGS`; a second handle from
    /// `Datapath::map_handle`) whose keys [`CounterReader::map_fill`] counts.
    pub fn with_counted(mut self, name: &'static str, map: Map) -> Result<Self, DatapathError> {
        let data = match map {
            Map::LruHashMap(d) | Map::HashMap(d) => d,
            _ => {
                return Err(DatapathError::MapMissing {
                    map: format!("{name} (not a hash map)"),
                });
            }
        };
        let info = data.info().map_err(map_err(name))?;
        let (key_size, max_entries) = (info.key_size(), info.max_entries());
        self.counted.push((name, data, key_size, max_entries));
        Ok(self)
    }

    /// Entries of the [`DatapathCounters::with_counted`] maps, reusing a count younger than
    /// `max_age`.
    fn counted_entries(
        &self,
        max_age: Duration,
    ) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        use std::os::fd::AsFd as _;
        let mut last = self.last_counted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, counts)) = last.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(counts.clone());
        }
        let mut counts = Vec::with_capacity(self.counted.len());
        for (name, data, key_size, max_entries) in &self.counted {
            let n = super::sys::count_keys(data.fd().as_fd(), *key_size, *max_entries).map_err(
                |io_error| DatapathError::Map {
                    map: (*name).to_owned(),
                    source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_get_next_key",
                        io_error,
                    })),
                },
            )?;
            counts.push((*name, n));
        }
        *last = Some((Instant::now(), counts.clone()));
        Ok(counts)
    }

    /// Adds the conntrack maps (`NPM_CT4`, `NPM_CT`; second handles from
    /// `Datapath::map_handle`) for [`CounterReader::conntrack`].
    pub fn with_conntrack(mut self, ct4: Map, ct6: Map) -> Result<Self, DatapathError> {
        let ipv4_capacity = capacity(&ct4, MAP_CONNTRACK4)?;
        let ipv6_capacity = capacity(&ct6, MAP_CONNTRACK)?;
        self.conntrack = Some(Conntrack {
            ct4: HashMap::try_from(ct4).map_err(map_err(MAP_CONNTRACK4))?,
            ct6: HashMap::try_from(ct6).map_err(map_err(MAP_CONNTRACK))?,
            ipv4_capacity,
            ipv6_capacity,
            last: Mutex::new(None),
        });
        Ok(self)
    }

    /// Conntrack occupancy, reusing a count younger than `max_age` (`Duration::ZERO`: count
    /// now). `None` without conntrack maps.
    pub fn conntrack_count(
        &self,
        max_age: Duration,
    ) -> Result<Option<ConntrackCount>, DatapathError> {
        self.conntrack
            .as_ref()
            .map(|c| c.count(max_age))
            .transpose()
    }

    /// Opens the maps pinned as `pin_dir/NPM_METRICS`, `pin_dir/NPM_ENDPOINTS` and the two
    /// conntrack maps by a running agent.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let metrics = MapData::from_pin(pin_dir.join(MAP_METRICS)).map_err(map_err(MAP_METRICS))?;
        let endpoints =
            MapData::from_pin(pin_dir.join(MAP_ENDPOINTS)).map_err(map_err(MAP_ENDPOINTS))?;
        let counters = Self::from_maps(Map::PerCpuArray(metrics), Map::HashMap(endpoints))?;
        let ct4 =
            MapData::from_pin(pin_dir.join(MAP_CONNTRACK4)).map_err(map_err(MAP_CONNTRACK4))?;
        let ct6 = MapData::from_pin(pin_dir.join(MAP_CONNTRACK)).map_err(map_err(MAP_CONNTRACK))?;
        counters.with_conntrack(Map::LruHashMap(ct4), Map::LruHashMap(ct6))
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
        for SlotCount { count: c, .. } in self.read_slots()? {
            let sum = sums
                .entry((c.dir, c.reason))
                .or_insert_with(|| PacketCount {
                    dir: c.dir,
                    reason: c.reason,
                    ..PacketCount::default()
                });
            sum.packets = sum.packets.wrapping_add(c.packets);
            sum.bytes = sum.bytes.wrapping_add(c.bytes);
        }
        Ok(sums.into_values().collect())
    }

    fn read_slots(&self) -> Result<Vec<SlotCount>, DatapathError> {
        let mut out = Vec::new();
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
                out.push(SlotCount {
                    slot,
                    count: PacketCount {
                        dir: (i / COUNTER_REASONS) as u8,
                        reason: reason_of_index(i % COUNTER_REASONS),
                        packets,
                        bytes,
                    },
                });
            }
        }
        Ok(out)
    }

    fn conntrack(&self) -> Result<Option<ConntrackCount>, DatapathError> {
        self.conntrack_count(CONNTRACK_RECOUNT)
    }

    fn map_fill(&self) -> Result<Option<MapFill>, DatapathError> {
        if self.capacities.is_empty() && self.counted.is_empty() {
            return Ok(None);
        }
        let mut entries = self.counted_entries(CONNTRACK_RECOUNT)?;
        if let Some(c) = self.conntrack_count(CONNTRACK_RECOUNT)? {
            entries.push((MAP_CONNTRACK4, c.ipv4));
            entries.push((MAP_CONNTRACK, c.ipv6));
        }
        Ok(Some(MapFill {
            capacity: self.capacities.clone(),
            entries,
        }))
    }

    fn events(&self) -> Result<Option<EventCounts>, DatapathError> {
        let Some(map) = &self.events else {
            return Ok(None);
        };
        let values = map.get(&0, 0).map_err(map_err(MAP_EVENT_STATS))?;
        Ok(Some(values.iter().fold(EventCounts::default(), |t, v| {
            EventCounts {
                written: t.written.wrapping_add(v.written),
                rate_limited: t.rate_limited.wrapping_add(v.suppressed),
                ring_full: t.ring_full.wrapping_add(v.lost),
            }
        })))
    }
}
