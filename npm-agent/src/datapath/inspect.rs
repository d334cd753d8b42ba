//! Reading the pinned maps of an agent, running or not (`npm-agent status`). Read-only: maps
//! are opened from their pins and their keys walked; nothing is written.
use std::os::fd::AsFd as _;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapType};
use npm_common::maps::{Addr16, EndpointInfo, MAP_ENDPOINTS, MAP_IDENTITIES, PeerInfo};

use super::loader::{DatapathError, map_error};
use super::sys;

/// Every map the agent pins (the loader's list), in the order `status` shows them.
pub const PINNED_MAPS: [&str; 13] = super::loader::MAPS;

/// One pinned map's occupancy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapOccupancy {
    pub name: &'static str,
    /// `hash`, `lru_hash`, `lpm_trie`, `array`, `percpu_array` (or the kernel's type number).
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
