//! Observability, to the side of the data flow: Prometheus metrics ([`metrics`]), liveness /
//! readiness / debug state ([`health`]) and the HTTP server that serves them ([`http`]).
//!
//! The run loop reports through one [`Observer`]; nothing here feeds back into enforcement.
pub mod health;
pub mod http;
pub mod metrics;

use std::fmt::Display;
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
}

impl Observer {
    /// `stall_after`: liveness fails after this long without a [`Observer::tick`].
    pub fn new(stall_after: Duration, config: serde_json::Value) -> Self {
        Self {
            metrics: Metrics::new(),
            health: Health::new(stall_after),
            config,
        }
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
        if report.sync.failed > 0 {
            self.health.record_error(
                "map_update",
                format!(
                    "{} map updates failed; the next run retries them",
                    report.sync.failed
                ),
            );
        }
        self.health.set_ready(counts, report.sync.failed == 0);
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
