//! The enforcement pipeline that `run` and `lab` share: snapshot -> compile -> program maps.
use std::path::Path;
use std::time::{Duration, Instant};

use crate::compiler::{self, Compiled, IdAllocator};
use crate::datapath::{Datapath, DatapathError};
use crate::programmer::{AyaBackend, MapBackend, Programmer, ProgrammerError, SyncStats};
use crate::state::ClusterSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("loading the datapath")]
    Datapath(#[from] DatapathError),
    #[error("opening the policy maps")]
    Programmer(#[from] ProgrammerError),
}

/// What one [`Enforcer::apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub compiled: Compiled,
    pub compile_time: Duration,
    pub sync: SyncStats,
}

/// Owns the loaded datapath, the map programmer and the id allocator.
pub struct Enforcer {
    datapath: Datapath,
    programmer: Programmer<AyaBackend>,
    ids: IdAllocator,
}

impl Enforcer {
    /// Loads the datapath (pinning/adopting its maps under `pin_dir` when given) and reads
    /// what the maps already hold, so ids still in use are never handed out again.
    pub fn new(pin_dir: Option<&Path>) -> Result<Self, EnforcerError> {
        use npm_common::maps::{MAP_CIDRS, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_POLICY};
        let mut datapath = Datapath::load(pin_dir)?;
        let backend = AyaBackend::new(
            datapath.take_map(MAP_ENDPOINTS)?,
            datapath.take_map(MAP_IDENTITIES)?,
            datapath.take_map(MAP_CIDRS)?,
            datapath.take_map(MAP_POLICY)?,
        )?;
        let present = backend.dump()?;
        let mut ids = IdAllocator::default();
        ids.reserve(
            present
                .endpoints
                .values()
                .map(|e| e.id)
                .chain(present.identities.values().map(|p| p.id))
                .chain(present.cidrs.values().copied())
                .chain(
                    present
                        .policy
                        .keys()
                        .flat_map(|(_, k)| [k.local_id, k.peer_id]),
                ),
        );
        let programmer = Programmer::new(backend)?;
        Ok(Self {
            datapath,
            programmer,
            ids,
        })
    }

    /// Attaches the classifiers to a host-side interface in the calling thread's netns.
    pub fn attach(&mut self, ifname: &str) -> Result<u32, EnforcerError> {
        Ok(self.datapath.attach(ifname)?)
    }

    /// Attaches the classifiers to interface `ifindex` (calling thread's netns); returns
    /// its name.
    pub fn attach_index(&mut self, ifindex: u32) -> Result<String, EnforcerError> {
        Ok(self.datapath.attach_index(ifindex)?)
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// Compiles `snapshot` and brings the maps to the result.
    pub fn apply(&mut self, snapshot: &ClusterSnapshot) -> ApplyReport {
        let start = Instant::now();
        let compiled = compiler::compile(snapshot, &mut self.ids);
        let compile_time = start.elapsed();
        let sync = self.programmer.sync(&compiled.maps);
        ApplyReport {
            compiled,
            compile_time,
            sync,
        }
    }

    /// Re-reads the kernel maps and repairs drift against the last compile.
    pub fn resync(&mut self, snapshot: &ClusterSnapshot) -> Result<ApplyReport, EnforcerError> {
        let start = Instant::now();
        let compiled = compiler::compile(snapshot, &mut self.ids);
        let compile_time = start.elapsed();
        let sync = self.programmer.resync(&compiled.maps)?;
        Ok(ApplyReport {
            compiled,
            compile_time,
            sync,
        })
    }
}
