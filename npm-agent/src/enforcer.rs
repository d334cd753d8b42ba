//! The enforcement pipeline that `run` and `lab` share: changes -> incremental compile ->
//! program maps.
//!
//! [`Pipeline`] is the compile-and-program half over any [`MapBackend`] (the fake one in tests
//! and probes); [`Enforcer`] adds the loaded datapath and its kernel maps.
use std::path::Path;
use std::time::{Duration, Instant};

use crate::compiler::{IdAllocator, Incremental, Limits};
use crate::datapath::{Datapath, DatapathCounters, DatapathError, TcMode};
use crate::model::Diagnostic;
use crate::programmer::{AyaBackend, MapBackend, Programmer, ProgrammerError, SyncStats};
use crate::state::{Change, ClusterSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    /// Loading, attaching or running the datapath (the error says which).
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("opening the policy maps")]
    Programmer(#[from] ProgrammerError),
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Changes that were applied (after diffing, for a snapshot).
    pub changes: usize,
    /// The compiler's diagnostics after the apply (all of them, not only new ones).
    pub diagnostics: Vec<Diagnostic>,
    /// Entries the maps hold now, all maps together.
    pub entries: usize,
    /// Entries the maps hold now, per map.
    pub map_entries: crate::compiler::desired::MapCounts,
    /// Time to compile the changes into a plan.
    pub compile_time: Duration,
    pub sync: SyncStats,
    /// Local pods' counter slots and per-policy local counts, for the metrics.
    pub local: crate::compiler::LocalView,
}

/// The incremental compiler and the map programmer, kept in step.
pub struct Pipeline<B: MapBackend> {
    compiler: Incremental,
    programmer: Programmer<B>,
    /// The maps may hold what the compiler never wrote (adopted at start-up, or a refused
    /// operation): the next apply compares them in full instead of applying only the plan.
    full_sync: bool,
}

impl<B: MapBackend> Pipeline<B> {
    /// Reads what the maps hold, and reserves every id found there so it is never handed out
    /// again with another meaning.
    pub fn new(backend: B) -> Result<Self, ProgrammerError> {
        Self::with_limits(backend, Limits::default())
    }

    /// [`Self::new`] with explicit limits on what policies may add (`MaxPolicyEntries`).
    pub fn with_limits(backend: B, limits: Limits) -> Result<Self, ProgrammerError> {
        let present = backend.dump()?;
        // Ids found there are never handed out with another meaning; the first compile gives
        // each identity and class the id its addresses, interfaces and prefixes carried, and
        // each interface its counter slot (so a restart rewrites nothing that did not change).
        let mut ids = IdAllocator::default();
        ids.adopt(&present);
        let full_sync = present.total_entries() > 0;
        Ok(Self {
            compiler: Incremental::with_limits(&ClusterSnapshot::default(), ids, limits),
            programmer: Programmer::new(backend)?,
            full_sync,
        })
    }

    pub fn compiler(&self) -> &Incremental {
        &self.compiler
    }

    pub fn programmer(&self) -> &Programmer<B> {
        &self.programmer
    }

    /// The programmer itself (tests reach its backend through it to simulate the kernel).
    pub fn programmer_mut(&mut self) -> &mut Programmer<B> {
        &mut self.programmer
    }

    /// Compiles `changes` and applies the resulting plan to the maps.
    pub fn apply_changes(&mut self, changes: &[Change]) -> ApplyReport {
        let start = Instant::now();
        let plan = self.compiler.apply(changes);
        let compile_time = start.elapsed();
        let sync = self.program(&plan);
        self.report(changes.len(), compile_time, sync)
    }

    /// Sets this node's name (which pods count as "not yet placed" for pending links); the
    /// change-driven path has no other way to learn it (`Change` does not carry it).
    pub fn set_node_name(&mut self, name: Option<String>) -> ApplyReport {
        let start = Instant::now();
        let plan = self.compiler.set_node_name(name);
        let compile_time = start.elapsed();
        let sync = self.program(&plan);
        self.report(0, compile_time, sync)
    }

    /// Sets the cluster's Service ranges (configuration; `Change` does not carry them).
    pub fn set_service_cidrs(&mut self, cidrs: Vec<ipnet::IpNet>) -> ApplyReport {
        let start = Instant::now();
        let plan = self.compiler.set_service_cidrs(cidrs);
        let compile_time = start.elapsed();
        let sync = self.program(&plan);
        self.report(0, compile_time, sync)
    }

    /// Brings the compiler to `snapshot` (by the changes between the two) and the maps along.
    pub fn apply(&mut self, snapshot: &ClusterSnapshot) -> ApplyReport {
        let start = Instant::now();
        let mut plan = self.compiler.set_node_name(snapshot.node_name.clone());
        plan.ops.extend(
            self.compiler
                .set_service_cidrs(snapshot.service_cidrs.clone())
                .ops,
        );
        let changes = self.compiler.snapshot().diff(snapshot);
        plan.ops.extend(self.compiler.apply(&changes).ops);
        let compile_time = start.elapsed();
        let sync = self.program(&plan);
        self.report(changes.len(), compile_time, sync)
    }

    /// Like [`Self::apply`], then re-reads the maps and repairs any drift from the compiler's
    /// maps (a full compare).
    pub fn resync(&mut self, snapshot: &ClusterSnapshot) -> Result<ApplyReport, ProgrammerError> {
        let mut report = self.apply(snapshot);
        let repair = self.programmer.resync(self.compiler.maps())?;
        report.sync.upserts += repair.upserts;
        report.sync.deletes += repair.deletes;
        report.sync.failed += repair.failed;
        if report.sync.first_failure.is_none() {
            report.sync.first_failure = repair.first_failure;
        }
        report.sync.elapsed += repair.elapsed;
        self.full_sync = repair.failed > 0;
        Ok(report)
    }

    fn program(&mut self, plan: &crate::programmer::Plan) -> SyncStats {
        if self.full_sync {
            let stats = self.programmer.sync(self.compiler.maps());
            self.full_sync = stats.failed > 0;
            return stats;
        }
        let stats = self.programmer.apply_plan(plan);
        self.full_sync = stats.failed > 0;
        stats
    }

    fn report(&self, changes: usize, compile_time: Duration, sync: SyncStats) -> ApplyReport {
        ApplyReport {
            changes,
            diagnostics: self.compiler.diagnostics(),
            entries: self.compiler.maps().total_entries(),
            map_entries: self.compiler.maps().counts(),
            compile_time,
            sync,
            local: self.compiler.local_view(),
        }
    }
}

/// Owns the loaded datapath and the pipeline that programs its maps.
pub struct Enforcer {
    datapath: Datapath,
    pipeline: Pipeline<AyaBackend>,
    /// A second ENDPOINTS handle for [`Enforcer::counters`] (the backend owns the map).
    endpoints_handle: Option<aya::maps::Map>,
    /// `max_entries` of every map, read at load (before the backend takes its maps).
    capacities: Vec<(&'static str, u32)>,
}

impl Enforcer {
    /// Loads the datapath (pinning/adopting its maps under `pin_dir` when given) and reads
    /// what the maps already hold, so ids still in use are never handed out again.
    pub fn new(pin_dir: Option<&Path>) -> Result<Self, EnforcerError> {
        Self::load(pin_dir, crate::datapath::LoadOptions::default())
    }

    /// [`Enforcer::new`] with the datapath's sizes (`Datapath::load_with`).
    pub fn load(
        pin_dir: Option<&Path>,
        options: crate::datapath::LoadOptions,
    ) -> Result<Self, EnforcerError> {
        Self::load_with_limits(pin_dir, options, Limits::default())
    }

    /// [`Self::load`] with explicit limits on what policies may add (`MaxPolicyEntries`).
    pub fn load_with_limits(
        pin_dir: Option<&Path>,
        options: crate::datapath::LoadOptions,
        limits: Limits,
    ) -> Result<Self, EnforcerError> {
        use npm_common::maps::{
            MAP_CIDRS, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS, MAP_POLICY,
            MAP_SERVICES,
        };
        let mut datapath = Datapath::load_with(pin_dir, options)?;
        let capacities = datapath.map_capacities()?;
        let endpoints_handle = Some(datapath.map_handle(MAP_ENDPOINTS)?);
        let backend = AyaBackend::new(
            datapath.take_map(MAP_ENDPOINTS)?,
            datapath.take_map(MAP_IDENTITIES)?,
            datapath.take_map(MAP_CIDRS)?,
            datapath.take_map(MAP_POLICY)?,
            datapath.take_map(MAP_PAIRS)?,
            datapath.take_map(MAP_SERVICES)?,
            // A second handle: the metrics reader takes the map itself.
            datapath.map_handle(MAP_METRICS)?,
        )?;
        Ok(Self {
            datapath,
            pipeline: Pipeline::with_limits(backend, limits)?,
            endpoints_handle,
            capacities,
        })
    }

    /// The verdict counters, the maps' sizes and the occupancy of the kernel-written maps, for
    /// the metrics (takes the METRICS map: once).
    pub fn counters(&mut self) -> Result<DatapathCounters, DatapathError> {
        let metrics = self.datapath.take_map(npm_common::maps::MAP_METRICS)?;
        let endpoints = self
            .endpoints_handle
            .take()
            .ok_or_else(|| DatapathError::MapMissing {
                map: npm_common::maps::MAP_ENDPOINTS.to_owned(),
            })?;
        use npm_common::maps::{
            MAP_CONNTRACK, MAP_CONNTRACK4, MAP_DEFERRED, MAP_EVENT_STATS, MAP_FRAGS,
        };
        DatapathCounters::from_maps(metrics, endpoints)?
            .with_conntrack(
                self.datapath.map_handle(MAP_CONNTRACK4)?,
                self.datapath.map_handle(MAP_CONNTRACK)?,
            )?
            .with_capacities(self.capacities.clone())
            .with_counted(MAP_DEFERRED, self.datapath.map_handle(MAP_DEFERRED)?)?
            .with_counted(MAP_FRAGS, self.datapath.map_handle(MAP_FRAGS)?)?
            .with_events(self.datapath.map_handle(MAP_EVENT_STATS)?)
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

    /// See [`Datapath::attach_index_quick`]: the fast path's attach, and how it attached.
    pub fn attach_index_quick(&mut self, ifindex: u32) -> Result<(String, TcMode), EnforcerError> {
        Ok(self.datapath.attach_index_quick(ifindex)?)
    }

    /// Attaches the post-DNAT program (`npm_host_egress`) to a node link that is neither
    /// loopback nor a pod interface (calling thread's netns); returns its ifindex.
    pub fn attach_host(&mut self, ifname: &str) -> Result<u32, EnforcerError> {
        Ok(self.datapath.attach_host(ifname)?)
    }

    /// Sets the cluster's Service ranges (SERVICES). Attach `npm_host_egress` to the node's
    /// other links first: a deferred packet leaving by a link without it is not checked.
    pub fn set_service_cidrs(&mut self, cidrs: Vec<ipnet::IpNet>) -> ApplyReport {
        self.pipeline.set_service_cidrs(cidrs)
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    pub fn compiler(&self) -> &Incremental {
        self.pipeline.compiler()
    }

    /// Applies changes from a source: compiles only what they affect and applies that plan.
    pub fn apply_changes(&mut self, changes: &[Change]) -> ApplyReport {
        self.pipeline.apply_changes(changes)
    }

    /// Brings the maps to `snapshot` (diffed against what was compiled last).
    pub fn apply(&mut self, snapshot: &ClusterSnapshot) -> ApplyReport {
        self.pipeline.apply(snapshot)
    }

    /// Sets this node's name, for sources that send changes (see [`Pipeline::set_node_name`]).
    pub fn set_node_name(&mut self, name: Option<String>) -> ApplyReport {
        self.pipeline.set_node_name(name)
    }

    /// Applies `snapshot`, then re-reads the kernel maps and repairs drift.
    pub fn resync(&mut self, snapshot: &ClusterSnapshot) -> Result<ApplyReport, EnforcerError> {
        Ok(self.pipeline.resync(snapshot)?)
    }
}

#[cfg(test)]
mod tests {
    use npm_common::maps::{EndpointInfo, PeerInfo, addr_from_v4};

    use super::*;
    use crate::programmer::fake::FakeBackend;
    use crate::synth::{synthetic_cluster, synthetic_policy};

    #[test]
    fn snapshots_and_changes_reach_the_same_maps() {
        let s = synthetic_cluster(300, 40, 10, 20);
        let mut by_snapshot = Pipeline::new(FakeBackend::default()).expect("fake");
        let mut by_changes = Pipeline::new(FakeBackend::default()).expect("fake");
        let r = by_snapshot.apply(&s);
        assert!(r.sync.upserts > 0 && r.sync.failed == 0);
        by_changes.apply_changes(&ClusterSnapshot::default().diff(&s));
        assert_eq!(by_snapshot.compiler().maps(), by_changes.compiler().maps());
        assert_eq!(
            &by_snapshot.programmer().backend().maps,
            by_snapshot.compiler().maps()
        );

        // One policy more, both ways.
        let mut t = s.clone();
        let p = synthetic_policy(7, 10);
        let mut p2 = p.clone();
        p2.name = "extra".into();
        t.policies.insert(p2.obj_ref(), p2.clone());
        let r = by_snapshot.apply(&t);
        assert_eq!(r.changes, 1);
        by_changes.apply_changes(&[Change::Policy(p2.obj_ref(), Some(p2))]);
        assert_eq!(by_snapshot.compiler().maps(), by_changes.compiler().maps());
        for pipe in [&by_snapshot, &by_changes] {
            assert_eq!(&pipe.programmer().backend().maps, pipe.compiler().maps());
        }
        // Nothing changed: nothing to do.
        let r = by_snapshot.apply(&t);
        assert_eq!((r.changes, r.sync.upserts, r.sync.deletes), (0, 0, 0));
    }

    #[test]
    fn adopted_maps_are_reconciled_in_full_and_their_ids_never_reused() {
        // Maps left by a previous agent: a stale endpoint and identity with id 40.
        let mut fake = FakeBackend::default();
        fake.maps.endpoints.insert(
            9999,
            EndpointInfo {
                id: 40,
                flags: 1,
                slot: 0,
            },
        );
        fake.maps.identities.insert(
            addr_from_v4([10, 99, 0, 1]),
            PeerInfo {
                id: 40,
                ifindex: 9999,
                flags: 0,
                class: 0,
            },
        );
        let mut pipe = Pipeline::new(fake).expect("fake");
        let s = synthetic_cluster(50, 5, 5, 5);
        let r = pipe.apply(&s);
        assert_eq!(r.sync.failed, 0);
        // The first apply compared the maps in full: the stale entries are gone.
        assert_eq!(&pipe.programmer().backend().maps, pipe.compiler().maps());
        assert!(!pipe.compiler().maps().endpoints.contains_key(&9999));
        // Ids found in the adopted maps are not handed out again.
        assert!(
            pipe.compiler()
                .maps()
                .identities
                .values()
                .all(|p| p.id == 0 || p.id > 40)
        );
    }

    #[test]
    fn resync_repairs_drift_behind_the_programmers_back() {
        let s = synthetic_cluster(50, 5, 5, 5);
        let mut pipe = Pipeline::new(FakeBackend::default()).expect("fake");
        pipe.apply(&s);
        // Someone deletes every endpoint.
        pipe.programmer.backend_mut().maps.endpoints.clear();
        let r = pipe.resync(&s).expect("resync");
        assert_eq!(r.sync.upserts, 5);
        assert_eq!(&pipe.programmer().backend().maps, pipe.compiler().maps());
    }
}
