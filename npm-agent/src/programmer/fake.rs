//! An in-memory backend for tests of the programmer and of anything above it.
use super::backend::{MapBackend, ProgrammerError};
use super::plan::Op;
use crate::compiler::DesiredMaps;

/// Holds the maps in memory and records every operation it was given.
#[derive(Debug, Default)]
pub struct FakeBackend {
    pub maps: DesiredMaps,
    pub log: Vec<Op>,
    /// Maps (`MAP_*`) with a capacity: an insert of a new key into a map holding this many
    /// entries is refused with E2BIG, as the kernel refuses it for a full hash map.
    pub capacity: std::collections::BTreeMap<&'static str, usize>,
}

impl MapBackend for FakeBackend {
    fn dump(&self) -> Result<DesiredMaps, ProgrammerError> {
        Ok(self.maps.clone())
    }

    fn apply(&mut self, op: &Op) -> Result<(), ProgrammerError> {
        if let Some(&cap) = self.capacity.get(op.map()) {
            let mut after = self.maps.clone();
            op.apply_to(&mut after);
            if entries(&after, op.map()) > cap {
                return Err(ProgrammerError::Update {
                    map: op.map(),
                    op: "insert",
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_elem",
                        io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
                    }),
                });
            }
            self.maps = after;
        } else {
            op.apply_to(&mut self.maps);
        }
        self.log.push(op.clone());
        Ok(())
    }
}

/// Entries of map `name` (`MAP_*`) in `maps`.
fn entries(maps: &DesiredMaps, name: &str) -> usize {
    use npm_common::maps::{
        MAP_CIDRS, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_PAIRS, MAP_POLICY, MAP_SERVICES,
    };
    match name {
        MAP_ENDPOINTS => maps.endpoints.len(),
        MAP_IDENTITIES => maps.identities.len(),
        MAP_CIDRS => maps.cidrs.len(),
        MAP_POLICY => maps.policy.len(),
        MAP_PAIRS => maps.pairs.len(),
        MAP_SERVICES => maps.services.len(),
        _ => 0,
    }
}
