//! Observability, to the side of the data flow: Prometheus metrics ([`metrics`]), liveness /
//! readiness / debug state ([`health`]) and the HTTP server that serves them ([`http`]).
//!
//! The run loop reports through one [`Observer`]; nothing here feeds back into enforcement.
pub mod health;
pub mod http;
pub mod metrics;

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use health::{Counts, Health};
pub use metrics::{Metrics, Trigger};

use crate::enforcer::ApplyReport;
use crate::state::ClusterSnapshot;

/// What the run loop tells the outside world about itself.
#[derive(Debug)]
pub struct Observer {
    pub metrics: Metrics,
    pub health: Health,
    /// Shown under `config` in `/debug/state` (effective settings, ignored/unknown keys).
    config: serde_json::Value,
    /// Whether the loop publishes [`Observer::explain`]'s state (EnableHTTPDebugAPI).
    explain_on: bool,
    /// The compiler's state as of the last apply, for `/debug/explain`: an `Arc` swapped in
    /// by the loop, cloned out by a request; the lock is held for neither the copy nor the
    /// evaluation.
    explain: Mutex<Option<Arc<crate::explain::State>>>,
    /// When the state was last published, and whether an apply changed the maps since.
    explain_stale: Mutex<(Option<std::time::Instant>, bool)>,
}

/// `/debug/explain`'s copy of the compiler's state costs O(map entries): it is taken at most
/// this often (and at the first apply), so a busy cluster's events keep costing what they
/// touch; an answer may lag the maps by this much.
pub const EXPLAIN_PUBLISH_EVERY: Duration = Duration::from_secs(2);

impl Observer {
    /// `stall_after`: liveness fails after this long without a [`Observer::tick`].
    pub fn new(stall_after: Duration, config: serde_json::Value) -> Self {
        Self {
            metrics: Metrics::new(),
            health: Health::new(stall_after),
            config,
            explain_on: false,
            explain: Mutex::new(None),
            explain_stale: Mutex::new((None, false)),
        }
    }

    /// Keep a copy of the compiler's state for `/debug/explain` (on with the debug API).
    pub fn with_explain(mut self, on: bool) -> Self {
        self.explain_on = on;
        self
    }

    /// After an apply, and on every turn of the loop: publishes `make()` (a copy of the
    /// compiler's state, O(entries)) when explain is on and nothing is published yet, or an
    /// apply changed something and the last copy is [`EXPLAIN_PUBLISH_EVERY`] old. `report`:
    /// the apply just made (`None`: a turn of the loop).
    pub fn publish_explain(
        &self,
        report: Option<&ApplyReport>,
        make: impl FnOnce() -> crate::explain::State,
    ) {
        if !self.explain_on {
            return;
        }
        let now = std::time::Instant::now();
        {
            let mut stale = self.explain_stale.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = report
                && (r.changes > 0 || r.sync.upserts > 0 || r.sync.deletes > 0)
            {
                stale.1 = true;
            }
            let due = match stale.0 {
                None => report.is_some(),
                Some(at) => stale.1 && now.duration_since(at) >= EXPLAIN_PUBLISH_EVERY,
            };
            if !due {
                return;
            }
            *stale = (Some(now), false);
        }
        let state = Arc::new(make());
        *self.explain.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    /// The last published state (None before the first apply, or with explain off).
    pub fn explain(&self) -> Option<Arc<crate::explain::State>> {
        self.explain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Once per loop iteration.
    pub fn tick(&self) {
        self.health.tick();
    }

    /// After every compile-and-program run of `snapshot`.
    pub fn applied(&self, snapshot: &ClusterSnapshot, report: &ApplyReport, trigger: Trigger) {
        self.metrics.observe_snapshot(snapshot);
        self.metrics.observe_apply(report, trigger);
        let counts = Counts {
            policies: snapshot.policies.len(),
            pods: snapshot.pods.len(),
            namespaces: snapshot.namespaces.len(),
            local_endpoints: snapshot.local.len(),
            map_entries: report.map_entries.by_name().into(),
            policy_problems: report.diagnostics.len(),
        };
        let failure = (report.sync.failed > 0).then(|| {
            format!(
                "{} of {} map updates failed, first: {}",
                report.sync.failed,
                report.sync.failed + report.sync.upserts + report.sync.deletes,
                report
                    .sync
                    .first_failure
                    .as_deref()
                    .unwrap_or("(no reason kept)")
            )
        });
        if let Some(f) = &failure {
            tracing::error!(failure = %f, "maps not in step; not ready until a run succeeds");
            self.health
                .record_error("map_update", format!("{f}; the next run retries them"));
        }
        let added = self
            .health
            .track_policies(&snapshot.policies, failure.is_none());
        if added > 0 {
            // Azure NPM's npm_add_policy_exec_time: the time of the run that added them. A
            // failed run still counts: its policies are added (the refused writes are retried).
            self.metrics
                .observe_policies_added(added, report.compile_time + report.sync.elapsed);
        }
        self.health.set_ready(counts, failure);
        self.metrics.set_ready(self.health.readiness().ok);
    }

    /// A cluster event (or a batch of them) that arrived at `arrived` was applied with
    /// `report`: observed in `npm_event_to_maps_seconds` when every map write succeeded.
    pub fn event_applied(&self, arrived: std::time::Instant, report: &ApplyReport) {
        if report.sync.failed == 0 {
            self.metrics.observe_event_to_maps(arrived.elapsed());
        }
    }

    /// Before the first enforcement: what the loop waits for (shown by `/readyz`).
    pub fn waiting(&self, why: Option<String>) {
        self.health.set_waiting(why);
    }

    /// The cluster source gave a complete view.
    pub fn source_ok(&self) {
        if self.health.set_source(None) {
            tracing::info!("cluster source answers again");
        }
        self.metrics.set_source_connected(true);
    }

    /// The cluster source failed; enforcement stays as it is.
    pub fn source_failed(&self, error: &dyn Display) {
        let message = error.to_string();
        self.health.set_source(Some(message.clone()));
        self.metrics.set_source_connected(false);
        self.metrics.record_error("source");
        self.health.record_error("source", message);
    }

    /// Any other error of the enforcement loop (`kind`: a short stable label).
    pub fn error(&self, kind: &'static str, error: &dyn Display) {
        self.metrics.record_error(kind);
        self.health.record_error(kind, error.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforcer::Pipeline;
    use crate::programmer::fake::FakeBackend;
    use crate::synth::synthetic_cluster;

    #[test]
    fn a_full_map_makes_the_agent_unready_naming_the_map_until_a_run_succeeds() {
        let s = synthetic_cluster(50, 5, 5, 5);
        let mut fake = FakeBackend::default();
        // Room for a few POLICY entries only: the kernel refuses the rest with E2BIG.
        fake.capacity.insert(npm_common::maps::MAP_POLICY, 3);
        let mut pipe = Pipeline::new(fake).expect("fake");
        let report = pipe.apply(&s);
        assert!(report.sync.failed > 0, "the capacity was not hit");
        let first = report.sync.first_failure.clone().expect("a reason kept");
        assert!(
            first.contains("NPM_POLICY") && first.contains("Argument list too long"),
            "{first}"
        );

        let observer = Observer::new(Duration::from_secs(60), serde_json::Value::Null);
        observer.applied(pipe.compiler().snapshot(), &report, Trigger::Change);
        let r = observer.health.readiness();
        assert!(!r.ok, "ready with a full map: {}", r.body);
        let ready = |o: &Observer| {
            o.metrics
                .encode_node()
                .expect("encode")
                .lines()
                .find_map(|l| l.strip_prefix("npm_ready ").map(str::to_owned))
        };
        assert_eq!(ready(&observer).as_deref(), Some("0"));
        assert!(
            r.body.contains("map updates failed") && r.body.contains("NPM_POLICY"),
            "{}",
            r.body
        );
        assert_eq!(
            observer
                .health
                .debug_state()
                .last_errors
                .last()
                .map(|e| e.kind),
            Some("map_update")
        );

        // Room again: the next run compares in full, writes what was refused, and is ready.
        pipe.programmer_mut().backend_mut().capacity.clear();
        let report = pipe.apply(&s);
        assert_eq!(report.sync.failed, 0);
        assert!(
            report.sync.upserts > 0,
            "the refused entries were not retried"
        );
        observer.applied(pipe.compiler().snapshot(), &report, Trigger::Change);
        assert!(observer.health.readiness().ok);
        assert_eq!(ready(&observer).as_deref(), Some("1"));
        assert_eq!(
            &pipe.programmer().backend().maps,
            pipe.compiler().maps(),
            "the maps hold the compiled contents"
        );
    }

    #[test]
    fn the_explain_copy_is_rate_limited_and_a_missed_change_is_published_later() {
        let o = Observer::new(Duration::from_secs(60), serde_json::Value::Null).with_explain(true);
        let copies = std::cell::Cell::new(0);
        let make = || {
            copies.set(copies.get() + 1);
            crate::explain::State::of_node(&crate::compiler::Incremental::new(
                &ClusterSnapshot::default(),
                crate::compiler::IdAllocator::default(),
            ))
        };
        let changed = ApplyReport {
            changes: 1,
            ..ApplyReport::default()
        };
        o.publish_explain(None, make);
        assert_eq!(
            copies.get(),
            0,
            "a turn of the loop before any apply copies nothing"
        );
        o.publish_explain(Some(&ApplyReport::default()), make);
        assert_eq!(copies.get(), 1, "the first apply is published at once");
        o.publish_explain(Some(&changed), make);
        o.publish_explain(None, make);
        assert_eq!(copies.get(), 1, "a change within the window waits");
        std::thread::sleep(EXPLAIN_PUBLISH_EVERY + Duration::from_millis(50));
        o.publish_explain(None, make);
        assert_eq!(
            copies.get(),
            2,
            "the loop publishes the missed change once due"
        );
        o.publish_explain(None, make);
        std::thread::sleep(EXPLAIN_PUBLISH_EVERY + Duration::from_millis(50));
        o.publish_explain(None, make);
        assert_eq!(copies.get(), 2, "nothing changed: no copy");
        assert!(o.explain().is_some());
    }
}
