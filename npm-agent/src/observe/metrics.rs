//! Prometheus metrics (prometheus-client), in two registries as Azure NPM splits them:
//! `/node-metrics` (this agent and its datapath) and `/cluster-metrics` (what the agent sees of
//! the cluster). Every name starts with `npm_`. deploy/README.md maps each Azure NPM metric to
//! ours.
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use npm_common::verdict::{
    DIR_EGRESS, DIR_INGRESS, REASON_DEFERRED, REASON_DROP_MALFORMED, REASON_DROP_POLICY,
    REASON_DROP_SPOOFED, REASON_DROP_UNKNOWN_SOURCE, REASON_ESTABLISHED, REASON_HOST,
    REASON_NOT_ISOLATED, REASON_NOT_MANAGED, REASON_POLICY_ALLOW, REASON_REPLY, REASON_SELF,
    is_allow,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::datapath::{ConntrackCount, CounterReader, PacketCount};
use crate::enforcer::ApplyReport;
use crate::state::ClusterSnapshot;

/// Content type of [`Metrics::encode_node`] / [`Metrics::encode_cluster`] output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    direction: &'static str,
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why the HTTP server closed a connection without answering it (`observe::http`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpDrop {
    /// Its source address already held the most connections allowed per source.
    PeerLimit,
    /// The server held the most connections allowed in total.
    TotalLimit,
    /// No complete request head in time.
    HeadTimeout,
    /// The answer was not written in time.
    AnswerTimeout,
}

impl HttpDrop {
    const ALL: [Self; 4] = [
        Self::PeerLimit,
        Self::TotalLimit,
        Self::HeadTimeout,
        Self::AnswerTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::PeerLimit => "peer_limit",
            Self::TotalLimit => "total_limit",
            Self::HeadTimeout => "head_timeout",
            Self::AnswerTimeout => "answer_timeout",
        }
    }
}

/// Why the run loop applied: a changed snapshot or the periodic resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Change,
    Resync,
}

/// The agent's metrics. Cheap to update from the run loop; encoded on each scrape.
#[derive(Debug)]
pub struct Metrics {
    node: Registry,
    cluster: Registry,
    compile_seconds: Histogram,
    program_seconds: Histogram,
    applies: Family<TriggerLabels, Counter>,
    map_operations: Family<OpLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    local_endpoints: Gauge,
    policy_problems: Gauge,
    source_connected: Gauge,
    last_sync: Gauge<f64, AtomicU64>,
    errors: Family<KindLabels, Counter>,
    http_dropped: Family<ReasonLabels, Counter>,
    num_policies: Gauge,
    num_pods: Gauge,
    num_namespaces: Gauge,
    datapath: Arc<DatapathCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // 100 us .. ~26 s.
        let buckets = || exponential_buckets(0.0001, 4.0, 10);
        let mut m = Self {
            compile_seconds: Histogram::new(buckets()),
            program_seconds: Histogram::new(buckets()),
            applies: Family::default(),
            map_operations: Family::default(),
            map_entries: Family::default(),
            local_endpoints: Gauge::default(),
            policy_problems: Gauge::default(),
            source_connected: Gauge::default(),
            last_sync: Gauge::default(),
            errors: Family::default(),
            http_dropped: Family::default(),
            num_policies: Gauge::default(),
            num_pods: Gauge::default(),
            num_namespaces: Gauge::default(),
            datapath: Arc::new(DatapathCollector::default()),
            node: Registry::with_prefix("npm"),
            cluster: Registry::with_prefix("npm"),
        };
        m.node.register_with_unit(
            "compile_duration",
            "Time to compile the cluster snapshot into desired map contents (Azure NPM: \
             npm_add_policy_exec_time, npm_controller_*_exec_time)",
            Unit::Seconds,
            m.compile_seconds.clone(),
        );
        m.node.register_with_unit(
            "program_duration",
            "Time to bring the kernel maps to the compiled contents (Azure NPM: \
             npm_add_iptables_rule_exec_time, npm_add_ipset_exec_time)",
            Unit::Seconds,
            m.program_seconds.clone(),
        );
        m.node.register(
            "applies",
            "Compile-and-program runs, by trigger (change or periodic resync)",
            m.applies.clone(),
        );
        m.node.register(
            "map_operations",
            "Kernel map updates by outcome: upsert, delete, failed",
            m.map_operations.clone(),
        );
        m.node.register(
            "map_entries",
            "Entries the agent keeps in each policy map (Azure NPM: npm_num_iptables_rules, \
             npm_num_ipset_entries)",
            m.map_entries.clone(),
        );
        m.node.register(
            "local_endpoints",
            "Pods on this node whose interface carries the npm programs",
            m.local_endpoints.clone(),
        );
        m.node.register(
            "policy_problems",
            "Problems reported by the last compile (rules dropped, policies failed closed)",
            m.policy_problems.clone(),
        );
        m.node.register(
            "source_connected",
            "1 while the cluster source (API server or manifests) answers; 0 while it does \
             not, during which the last enforcement is kept",
            m.source_connected.clone(),
        );
        m.node.register_with_unit(
            "last_sync_timestamp",
            "Unix time of the last run that brought every map to the compiled contents",
            Unit::Seconds,
            m.last_sync.clone(),
        );
        m.node.register(
            "enforcement_errors",
            "Errors of the enforcement loop, by kind",
            m.errors.clone(),
        );
        m.node.register(
            "http_connections_dropped",
            "Connections to the HTTP endpoints closed without an answer, by reason: \
             peer_limit, total_limit (refused at accept), head_timeout (no request within 1 s), \
             answer_timeout",
            m.http_dropped.clone(),
        );
        for why in HttpDrop::ALL {
            let _ = m.http_dropped.get_or_create(&ReasonLabels {
                reason: why.label(),
            });
        }
        m.node.register_collector(Box::new(Arc::clone(&m.datapath)));
        m.cluster.register(
            "num_policies",
            "Network policies in the cluster as this agent sees them",
            m.num_policies.clone(),
        );
        m.cluster.register(
            "num_pods",
            "Pods in the cluster as this agent sees them",
            m.num_pods.clone(),
        );
        m.cluster.register(
            "num_namespaces",
            "Namespaces in the cluster as this agent sees them",
            m.num_namespaces.clone(),
        );
        m.source_connected.set(1);
        m.datapath.set_errors(m.errors.clone());
        m
    }

    /// Gives the collector of `npm_datapath_packets_total` / `npm_datapath_bytes_total` its
    /// source, read (and summed over CPUs) on every scrape.
    pub fn set_counter_reader(&self, reader: Box<dyn CounterReader>) {
        self.datapath.set_reader(reader);
    }

    /// Records one compile-and-program run.
    pub fn observe_apply(&self, report: &ApplyReport, trigger: Trigger) {
        self.compile_seconds
            .observe(report.compile_time.as_secs_f64());
        self.program_seconds
            .observe(report.sync.elapsed.as_secs_f64());
        let trigger = match trigger {
            Trigger::Change => "change",
            Trigger::Resync => "resync",
        };
        self.applies.get_or_create(&TriggerLabels { trigger }).inc();
        for (op, n) in [
            ("upsert", report.sync.upserts),
            ("delete", report.sync.deletes),
            ("failed", report.sync.failed),
        ] {
            self.map_operations
                .get_or_create(&OpLabels { op })
                .inc_by(n as u64);
        }
        for (map, n) in report.map_entries.by_name() {
            self.map_entries
                .get_or_create(&MapLabels { map })
                .set(gauge_value(n));
        }
        self.policy_problems
            .set(gauge_value(report.diagnostics.len()));
        if report.sync.failed == 0 {
            self.last_sync.set(unix_seconds(SystemTime::now()));
        } else {
            self.errors
                .get_or_create(&KindLabels { kind: "map_update" })
                .inc_by(report.sync.failed as u64);
        }
    }

    /// Records what the agent sees of the cluster (the snapshot it enforces).
    pub fn observe_snapshot(&self, snapshot: &ClusterSnapshot) {
        self.num_policies.set(gauge_value(snapshot.policies.len()));
        self.num_pods.set(gauge_value(snapshot.pods.len()));
        self.num_namespaces
            .set(gauge_value(snapshot.namespaces.len()));
        self.local_endpoints.set(gauge_value(snapshot.local.len()));
    }

    pub fn set_source_connected(&self, connected: bool) {
        self.source_connected.set(i64::from(connected));
    }

    /// Counts one error of the enforcement loop; `kind` is a short stable label
    /// (`source`, `attach`, `node_tables`, `resync`, ... or an error's `metric_label()`).
    pub fn record_error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts one connection the HTTP server closed without an answer.
    pub fn http_dropped(&self, why: HttpDrop) {
        self.http_dropped
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
    }

    /// `/node-metrics`: OpenMetrics text.
    pub fn encode_node(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.node)?;
        Ok(out)
    }

    /// `/cluster-metrics`: OpenMetrics text.
    pub fn encode_cluster(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.cluster)?;
        Ok(out)
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Label values for a verdict reason code (`npm_common::verdict`).
fn reason_label(reason: u8) -> &'static str {
    match reason {
        REASON_NOT_MANAGED => "not_managed",
        REASON_NOT_ISOLATED => "not_isolated",
        REASON_ESTABLISHED => "established",
        REASON_REPLY => "reply",
        REASON_POLICY_ALLOW => "policy_allow",
        REASON_HOST => "host",
        REASON_SELF => "self",
        REASON_DEFERRED => "deferred",
        REASON_DROP_POLICY => "policy_deny",
        REASON_DROP_MALFORMED => "malformed",
        REASON_DROP_UNKNOWN_SOURCE => "unknown_source",
        REASON_DROP_SPOOFED => "spoofed",
        _ => "unknown",
    }
}

/// Every reason the datapath has, so each series exists (at 0) before its first packet.
const REASONS: [u8; 12] = [
    REASON_NOT_MANAGED,
    REASON_NOT_ISOLATED,
    REASON_ESTABLISHED,
    REASON_REPLY,
    REASON_POLICY_ALLOW,
    REASON_HOST,
    REASON_SELF,
    REASON_DEFERRED,
    REASON_DROP_POLICY,
    REASON_DROP_MALFORMED,
    REASON_DROP_UNKNOWN_SOURCE,
    REASON_DROP_SPOOFED,
];

fn direction_label(dir: u8) -> &'static str {
    match dir {
        DIR_INGRESS => "ingress",
        DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

/// Reads the datapath's per-CPU counters at scrape time.
#[derive(Default)]
struct DatapathCollector {
    reader: RwLock<Option<Box<dyn CounterReader>>>,
    errors: RwLock<Option<Family<KindLabels, Counter>>>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

impl DatapathCollector {
    fn set_reader(&self, reader: Box<dyn CounterReader>) {
        if let Ok(mut r) = self.reader.write() {
            *r = Some(reader);
        }
    }

    fn set_errors(&self, errors: Family<KindLabels, Counter>) {
        if let Ok(mut e) = self.errors.write() {
            *e = Some(errors);
        }
    }

    /// The counters by label set, with every known (direction, reason) present.
    fn samples(&self) -> Option<Vec<(PacketLabels, PacketCount)>> {
        let guard = self.reader.read().ok()?;
        let reader = guard.as_ref()?;
        let counts = match reader.read() {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(error = %error, "reading the datapath counters");
                if let Ok(e) = self.errors.read()
                    && let Some(e) = e.as_ref()
                {
                    e.get_or_create(&KindLabels {
                        kind: "datapath_counters",
                    })
                    .inc();
                }
                return None;
            }
        };
        let mut all: std::collections::BTreeMap<(u8, u8), PacketCount> = [DIR_INGRESS, DIR_EGRESS]
            .into_iter()
            .flat_map(|dir| {
                REASONS.into_iter().map(move |reason| {
                    (
                        (dir, reason),
                        PacketCount {
                            dir,
                            reason,
                            ..PacketCount::default()
                        },
                    )
                })
            })
            .collect();
        for c in counts {
            let slot = all.entry((c.dir, c.reason)).or_insert(PacketCount {
                packets: 0,
                bytes: 0,
                ..c
            });
            slot.packets = slot.packets.wrapping_add(c.packets);
            slot.bytes = slot.bytes.wrapping_add(c.bytes);
        }
        Some(
            all.into_values()
                .map(|c| {
                    (
                        PacketLabels {
                            direction: direction_label(c.dir),
                            verdict: if is_allow(c.reason) { "allow" } else { "drop" },
                            reason: reason_label(c.reason),
                        },
                        c,
                    )
                })
                .collect(),
        )
    }
}

impl DatapathCollector {
    /// Conntrack occupancy (cached by the reader, see `datapath::counters`).
    fn conntrack(&self) -> Option<ConntrackCount> {
        let guard = self.reader.read().ok()?;
        match guard.as_ref()?.conntrack() {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(error = %error, "counting the conntrack entries");
                if let Ok(e) = self.errors.read()
                    && let Some(e) = e.as_ref()
                {
                    e.get_or_create(&KindLabels {
                        kind: "datapath_conntrack",
                    })
                    .inc();
                }
                None
            }
        }
    }

    fn encode_conntrack(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.conntrack() else {
            return Ok(());
        };
        for (name, help, v4, v6) in [
            (
                "conntrack_entries",
                "Flows in the conntrack maps (NPM_CT4 for ipv4, NPM_CT for ipv6), shared by all \
                 pods of the node; counted at most every 30 s",
                c.ipv4,
                c.ipv6,
            ),
            (
                "conntrack_capacity",
                "max_entries of each conntrack map (MaxConntrackEntries, or the size of the \
                 adopted pin); when full, the kernel's LRU evicts the least recently used flows",
                c.ipv4_capacity,
                c.ipv6_capacity,
            ),
        ] {
            let mut metric =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (family, v) in [("ipv4", v4), ("ipv6", v6)] {
                ConstGauge::new(i64::from(v))
                    .encode(metric.encode_family(&FamilyLabels { family })?)?;
            }
        }
        Ok(())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_conntrack(&mut encoder)?;
        let Some(samples) = self.samples() else {
            return Ok(());
        };
        // Unknown reason codes map to one label set: merge before encoding so no series repeats.
        let mut merged: Vec<(PacketLabels, u64, u64)> = Vec::with_capacity(samples.len());
        for (labels, c) in samples {
            match merged.iter_mut().find(|(l, _, _)| *l == labels) {
                Some((_, p, b)) => {
                    *p = p.wrapping_add(c.packets);
                    *b = b.wrapping_add(c.bytes);
                }
                None => merged.push((labels, c.packets, c.bytes)),
            }
        }
        for (name, help, pick) in [
            (
                "datapath_packets",
                "Packets judged by the TC programs, by direction (of the pod), verdict and reason",
                0usize,
            ),
            (
                "datapath_bytes",
                "Bytes judged by the TC programs, by direction (of the pod), verdict and reason",
                1,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (labels, packets, bytes) in &merged {
                let v = if pick == 0 { *packets } else { *bytes };
                ConstCounter::new(v).encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::datapath::DatapathError;
    use crate::programmer::SyncStats;

    struct Fake(Vec<PacketCount>);
    impl CounterReader for Fake {
        fn read(&self) -> Result<Vec<PacketCount>, DatapathError> {
            Ok(self.0.clone())
        }
    }

    /// The value of the sample line `series` (name plus labels, exactly as encoded).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    #[test]
    fn apply_and_snapshot_show_up_under_npm_names() {
        let m = Metrics::new();
        let mut report = ApplyReport::default();
        report.map_entries.endpoints = 1;
        report.sync = SyncStats {
            upserts: 3,
            deletes: 1,
            failed: 0,
            elapsed: Duration::from_millis(2),
            ..SyncStats::default()
        };
        report.compile_time = Duration::from_millis(5);
        m.observe_apply(&report, Trigger::Change);
        m.observe_apply(&report, Trigger::Resync);
        let mut loader = crate::source::manifests::Loader::default();
        for i in 0..3 {
            loader.add_text(
                "test",
                &format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {{name: p{i}, namespace: default}}\nspec: {{podSelector: {{}}}}\n"
                ),
            );
        }
        let (snap, problems) = loader.finish();
        assert!(problems.is_empty(), "{problems:?}");
        m.observe_snapshot(&snap);

        let node = m.encode_node().expect("encode");
        assert_eq!(
            sample(&node, "npm_map_entries{map=\"endpoints\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&node, "npm_map_entries{map=\"policy\"}"), Some(0.0));
        assert_eq!(
            sample(&node, "npm_map_operations_total{op=\"upsert\"}"),
            Some(6.0)
        );
        assert_eq!(
            sample(&node, "npm_applies_total{trigger=\"resync\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&node, "npm_compile_duration_seconds_count"),
            Some(2.0)
        );
        let sum = sample(&node, "npm_compile_duration_seconds_sum").expect("sum");
        assert!((sum - 0.010).abs() < 1e-9, "{sum}");
        assert_eq!(sample(&node, "npm_source_connected"), Some(1.0));
        let last = sample(&node, "npm_last_sync_timestamp_seconds").expect("last sync");
        assert!(last > 1.7e9, "{last}");
        assert!(node.ends_with("# EOF\n"));
        assert!(
            !node.contains("npm_num_policies"),
            "cluster gauge on the node page"
        );

        let cluster = m.encode_cluster().expect("encode");
        assert_eq!(sample(&cluster, "npm_num_policies"), Some(3.0));
        assert_eq!(sample(&cluster, "npm_num_pods"), Some(0.0));
    }

    #[test]
    fn failed_map_updates_are_errors_and_do_not_count_as_a_sync() {
        let m = Metrics::new();
        let mut report = ApplyReport::default();
        report.sync.failed = 2;
        m.observe_apply(&report, Trigger::Change);
        m.set_source_connected(false);
        m.record_error("source");
        let node = m.encode_node().expect("encode");
        assert_eq!(
            sample(&node, "npm_enforcement_errors_total{kind=\"map_update\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&node, "npm_enforcement_errors_total{kind=\"source\"}"),
            Some(1.0)
        );
        assert_eq!(sample(&node, "npm_source_connected"), Some(0.0));
        assert_eq!(sample(&node, "npm_last_sync_timestamp_seconds"), Some(0.0));
    }

    #[test]
    fn datapath_counters_are_labelled_and_every_known_series_exists() {
        let m = Metrics::new();
        assert!(
            !m.encode_node()
                .expect("encode")
                .contains("npm_datapath_packets"),
            "no reader, no series"
        );
        m.set_counter_reader(Box::new(Fake(vec![
            PacketCount {
                dir: DIR_INGRESS,
                reason: REASON_DROP_POLICY,
                packets: 5,
                bytes: 300,
            },
            PacketCount {
                dir: DIR_EGRESS,
                reason: REASON_POLICY_ALLOW,
                packets: 2,
                bytes: 120,
            },
            PacketCount {
                dir: DIR_EGRESS,
                reason: 200,
                packets: 1,
                bytes: 60,
            },
            PacketCount {
                dir: DIR_EGRESS,
                reason: 201,
                packets: 1,
                bytes: 60,
            },
        ])));
        let node = m.encode_node().expect("encode");
        assert_eq!(
            sample(
                &node,
                "npm_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_deny\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &node,
                "npm_datapath_bytes_total{direction=\"egress\",verdict=\"allow\",reason=\"policy_allow\"}"
            ),
            Some(120.0)
        );
        assert_eq!(
            sample(
                &node,
                "npm_datapath_packets_total{direction=\"egress\",verdict=\"drop\",reason=\"unknown\"}"
            ),
            Some(2.0),
            "unknown codes merge into one series"
        );
        assert_eq!(
            sample(
                &node,
                "npm_datapath_packets_total{direction=\"egress\",verdict=\"allow\",reason=\"reply\"}"
            ),
            Some(0.0)
        );
        // One TYPE line per family, every series once.
        assert_eq!(
            node.matches("# TYPE npm_datapath_packets counter").count(),
            1
        );
        let series: Vec<&str> = node
            .lines()
            .filter(|l| l.starts_with("npm_datapath_packets_total{"))
            .collect();
        let unique: std::collections::BTreeSet<&str> = series
            .iter()
            .map(|l| l.rsplit_once(' ').map_or(*l, |(s, _)| s))
            .collect();
        assert_eq!(series.len(), unique.len(), "{series:#?}");
        assert_eq!(series.len(), 2 * REASONS.len() + 1);
    }
}
