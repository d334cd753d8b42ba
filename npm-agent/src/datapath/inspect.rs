//! Reading the pinned maps of an agent, running or not (`npm-agent status`). Read-only: maps
//! are opened from their pins and their keys walked; nothing is written.
use std::os::fd::AsFd as _;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapType};
use npm_common::maps::{
    Addr16, EndpointInfo, Event, EventStats, MAP_ENDPOINTS, MAP_EVENT_STATS, MAP_EVENTS,
    MAP_IDENTITIES, PeerInfo,
};

use super::loader::{DatapathError, map_error};
use super::sys;

/// Every map the agent pins (the loader's list), in the order `status` shows them.
pub const PINNED_MAPS: [&str; 15] = super::loader::MAPS;

/// One pinned map's occupancy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapOccupancy {
    pub name: &'static str,
    /// `hash`, `lru_hash`, `lpm_trie`, `array`, `percpu_array`, `ringbuf` (or the kernel's type number).
    pub kind: String,
    /// Keys present; `None` for arrays (every index exists).
    pub entries: Option<u32>,
    /// `max_entries` as the kernel has it (an adopted pin keeps the size it was created with).
    pub max_entries: u32,
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData, DatapathError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).map_err(map_error(&path.display().to_string()))
}

/// The pinned drop-event ring buffer (`NPM_EVENTS`), read by `npm-agent monitor`. A record
/// read here is consumed: with two readers, each sees only part of the events.
pub struct EventReader {
    ring: aya::maps::RingBuf<MapData>,
}

impl EventReader {
    pub fn open(pin_dir: &Path) -> Result<EventReader, DatapathError> {
        let data = open(pin_dir, MAP_EVENTS)?;
        let ring = Map::from_map_data(data)
            .and_then(aya::maps::RingBuf::try_from)
            .map_err(map_error(MAP_EVENTS))?;
        Ok(EventReader { ring })
    }

    /// The next event waiting, if any (never blocks). A record of another size (not this
    /// build's `Event`) is skipped.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = event_from_bytes(&item) {
                return Some(e);
            }
        }
    }
}

/// An `Event` from its record bytes (native order, `#[repr(C)]` offsets); `None` for a record
/// of another size.
pub fn event_from_bytes(b: &[u8]) -> Option<Event> {
    if b.len() != std::mem::size_of::<Event>() {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[0..8]);
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    src.copy_from_slice(&b[8..24]);
    dst.copy_from_slice(&b[24..40]);
    Some(Event {
        time_ns: u64::from_ne_bytes(t),
        src,
        dst,
        ifindex: u32_at(40),
        slot: u32_at(44),
        sport_be: u16_at(48),
        dport_be: u16_at(50),
        proto: b[52],
        dir: b[53],
        reason: b[54],
        kind: b[55],
        len: u32_at(56),
        _pad: [0; 4],
    })
}

/// `NPM_EVENT_STATS` summed over CPUs (`credit_ns` and `last_ns` are per CPU: left 0).
pub fn pinned_event_stats(pin_dir: &Path) -> Result<EventStats, DatapathError> {
    let data = open(pin_dir, MAP_EVENT_STATS)?;
    let map: aya::maps::PerCpuArray<MapData, EventStats> = Map::from_map_data(data)
        .and_then(aya::maps::PerCpuArray::try_from)
        .map_err(map_error(MAP_EVENT_STATS))?;
    let values = map.get(&0, 0).map_err(map_error(MAP_EVENT_STATS))?;
    Ok(values.iter().fold(EventStats::default(), |mut t, v| {
        t.written += v.written;
        t.suppressed += v.suppressed;
        t.lost += v.lost;
        t
    }))
}

/// The occupancy of map `name` pinned in `pin_dir`. Hash, LRU and LPM maps are counted key
/// by key (one syscall per entry: a full 262 144-entry conntrack map takes a fraction of a
/// second).
pub fn map_occupancy(pin_dir: &Path, name: &'static str) -> Result<MapOccupancy, DatapathError> {
    let data = open(pin_dir, name)?;
    let info = data.info().map_err(map_error(name))?;
    let max_entries = info.max_entries();
    let (kind, counted) = match info.map_type() {
        Ok(MapType::Hash) => ("hash".to_owned(), true),
        Ok(MapType::LruHash) => ("lru_hash".to_owned(), true),
        Ok(MapType::LpmTrie) => ("lpm_trie".to_owned(), true),
        Ok(MapType::Array) => ("array".to_owned(), false),
        Ok(MapType::PerCpuArray) => ("percpu_array".to_owned(), false),
        Ok(other) => (format!("{other:?}").to_lowercase(), false),
        Err(_) => ("unknown".to_owned(), false),
    };
    let entries = if counted {
        let fd = data.fd().as_fd();
        Some(
            sys::count_keys(fd, info.key_size(), max_entries).map_err(|source| {
                DatapathError::Map {
                    map: name.to_owned(),
                    source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_get_next_key",
                        io_error: source,
                    })),
                }
            })?,
        )
    } else {
        None
    };
    Ok(MapOccupancy {
        name,
        kind,
        entries,
        max_entries,
    })
}

/// The entries of `NPM_ENDPOINTS` pinned in `pin_dir`: ifindex → endpoint, by ifindex.
pub fn pinned_endpoints(pin_dir: &Path) -> Result<Vec<(u32, EndpointInfo)>, DatapathError> {
    let data = open(pin_dir, MAP_ENDPOINTS)?;
    let map = Map::HashMap(data);
    let endpoints: HashMap<MapData, u32, EndpointInfo> =
        HashMap::try_from(map).map_err(map_error(MAP_ENDPOINTS))?;
    let mut out = endpoints
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error(MAP_ENDPOINTS))?;
    out.sort();
    Ok(out)
}

/// The entries of `NPM_IDENTITIES` pinned in `pin_dir`: address → peer.
pub fn pinned_identities(pin_dir: &Path) -> Result<Vec<(Addr16, PeerInfo)>, DatapathError> {
    let data = open(pin_dir, MAP_IDENTITIES)?;
    let identities: HashMap<MapData, Addr16, PeerInfo> =
        HashMap::try_from(Map::HashMap(data)).map_err(map_error(MAP_IDENTITIES))?;
    let mut out = identities
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error(MAP_IDENTITIES))?;
    out.sort();
    Ok(out)
}

/// The name of interface `ifindex` in the calling thread's network namespace, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    sys::if_indextoname(ifindex).ok()
}
