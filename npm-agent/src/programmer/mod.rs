//! The map programmer: brings the kernel maps from what they hold to what the compiler wants,
//! changing only the difference, in an order that never opens a denied path nor cuts an
//! allowed one mid-update (see [`plan`]).
pub mod backend;
pub mod fake;
pub mod plan;

use std::time::{Duration, Instant};

pub use backend::{AyaBackend, MapBackend, ProgrammerError};
pub use plan::{Op, Plan};

use crate::compiler::DesiredMaps;

/// What one [`Programmer::sync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
    /// Counter slots reset (`Op::ResetCounters`), counted apart from map entries.
    pub resets: usize,
    /// Operations the kernel refused (logged; the rest of the plan still ran).
    pub failed: usize,
    /// The first refusal, with its map and the kernel's reason (e.g. a full map), for the
    /// readiness answer and the log.
    pub first_failure: Option<String>,
    pub elapsed: Duration,
}

/// At most this many refused operations are logged one by one per run; the rest are summed
/// up in one line (a full map refuses every insert of a big plan).
const FAILURES_LOGGED: usize = 5;

/// Owns a backend and a cache of what the maps hold.
pub struct Programmer<B: MapBackend> {
    backend: B,
    current: DesiredMaps,
}

impl<B: MapBackend> Programmer<B> {
    /// Reads the maps' present contents (a restarted agent adopts pinned maps this way).
    pub fn new(backend: B) -> Result<Self, ProgrammerError> {
        let current = backend.dump()?;
        Ok(Self { backend, current })
    }

    /// What the programmer believes the maps hold.
    pub fn current(&self) -> &DesiredMaps {
        &self.current
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend itself; writing through it bypasses the cache (tests use it to simulate
    /// drift).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Applies the difference between the cached contents and `desired`.
    pub fn sync(&mut self, desired: &DesiredMaps) -> SyncStats {
        let start = Instant::now();
        let plan = plan::plan(&self.current, desired);
        let mut stats = self.apply_plan(&plan);
        stats.elapsed = start.elapsed();
        stats
    }

    /// Applies a plan made elsewhere (by the incremental compiler), in its order, and keeps the
    /// cache in step. An operation the kernel refuses is counted and logged; the rest still run.
    pub fn apply_plan(&mut self, plan: &Plan) -> SyncStats {
        let start = Instant::now();
        let mut stats = SyncStats::default();
        for op in &plan.ops {
            match self.backend.apply(op) {
                Ok(()) => {
                    if matches!(op, Op::ResetCounters(_)) {
                        stats.resets += 1;
                    } else if op.is_delete() {
                        stats.deletes += 1;
                    } else {
                        stats.upserts += 1;
                    }
                    op.apply_to(&mut self.current);
                }
                Err(e) => {
                    stats.failed += 1;
                    if stats.failed <= FAILURES_LOGGED {
                        tracing::warn!(error = %crate::error_chain(&e), ?op, "map update failed");
                    }
                    if stats.first_failure.is_none() {
                        stats.first_failure = Some(crate::error_chain(&e));
                    }
                }
            }
        }
        if stats.failed > FAILURES_LOGGED {
            tracing::warn!(
                failed = stats.failed,
                first = stats.first_failure.as_deref().unwrap_or_default(),
                "map updates failed (only the first {FAILURES_LOGGED} logged one by one)"
            );
        }
        stats.elapsed = start.elapsed();
        stats
    }

    /// Re-reads the kernel maps and repairs any drift from the cache (periodic resync).
    pub fn resync(&mut self, desired: &DesiredMaps) -> Result<SyncStats, ProgrammerError> {
        self.current = self.backend.dump()?;
        Ok(self.sync(desired))
    }
}

#[cfg(test)]
mod tests {
    use npm_common::maps::{EndpointInfo, PeerInfo, addr_from_v4};

    use super::fake::FakeBackend;
    use super::*;

    #[test]
    fn sync_reaches_desired_and_resync_repairs_drift() {
        let mut desired = DesiredMaps::default();
        desired.endpoints.insert(
            3,
            EndpointInfo {
                id: 1,
                flags: 1,
                slot: 0,
            },
        );
        desired.identities.insert(
            addr_from_v4([10, 1, 0, 1]),
            PeerInfo {
                id: 1,
                ifindex: 3,
                flags: 0,
                class: 0,
            },
        );
        let mut p = Programmer::new(FakeBackend::default()).expect("fake dump");
        let stats = p.sync(&desired);
        assert_eq!((stats.upserts, stats.deletes, stats.failed), (2, 0, 0));
        assert_eq!(p.backend().maps, desired);
        // A second sync with nothing changed does nothing.
        assert_eq!(p.sync(&desired).upserts, 0);

        // Someone deletes an entry behind our back and adds a stray one.
        let mut drifted = desired.clone();
        drifted.endpoints.clear();
        drifted.endpoints.insert(
            99,
            EndpointInfo {
                id: 5,
                flags: 0,
                slot: 0,
            },
        );
        let mut p = Programmer {
            backend: FakeBackend {
                maps: drifted,
                ..FakeBackend::default()
            },
            current: desired.clone(),
        };
        let stats = p.resync(&desired).expect("resync");
        assert_eq!((stats.upserts, stats.deletes), (1, 1));
        assert_eq!(p.backend().maps, desired);
    }
}
