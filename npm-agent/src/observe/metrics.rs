//! Prometheus metrics (prometheus-client), in two registries as Azure NPM splits them:
//! `/node-metrics` (this agent and its datapath) and `/cluster-metrics` (what the agent sees of
//! the cluster). Every name starts with `npm_`. deploy/README.md maps each Azure NPM metric to
//! ours.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

use crate::compiler::LocalView;
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
struct PodLabels {
    namespace: String,
    pod: String,
    direction: &'static str,
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    namespace: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
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
    event_to_maps_seconds: Histogram,
    add_policy_exec_time: Arc<WindowSummary>,
    local_endpoints: Gauge,
    policy_problems: Gauge,
    source_connected: Gauge,
    ready: Gauge,
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
            // 0.5 ms .. ~16 s, doubling.
            event_to_maps_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            add_policy_exec_time: Arc::new(WindowSummary::default()),
            local_endpoints: Gauge::default(),
            policy_problems: Gauge::default(),
            source_connected: Gauge::default(),
            ready: Gauge::default(),
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
        m.node.register_with_unit(
            "event_to_maps",
            "Time from a cluster event's arrival in the run loop (a batch of API watch events, \
             or a manifests pass that found changes) to the maps holding its result; batches \
             whose map writes failed are not observed",
            Unit::Seconds,
            m.event_to_maps_seconds.clone(),
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
        m.node.register(
            "ready",
            "1 while /readyz answers 200 (enforcing from a complete view, every map write of \
             the last run done), else 0",
            m.ready.clone(),
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
        // The kinds the run loop names itself exist from the start (at 0), so a rate over
        // them has a first sample; others (an error's metric_label) appear when they happen.
        for kind in ["source", "map_update", "attach", "node_tables"] {
            let _ = m.errors.get_or_create(&KindLabels { kind });
        }
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
        self.datapath.set_compiled(report);
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

    /// What `/readyz` answers now (`npm_ready`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// A cluster event (or batch) that arrived at `arrived` is now in the maps.
    pub fn observe_event_to_maps(&self, elapsed: Duration) {
        self.event_to_maps_seconds.observe(elapsed.as_secs_f64());
    }

    /// `added` policies new to this agent were realized by a run that took `took` to compile
    /// and program: one `npm_add_policy_exec_time` observation (milliseconds) per policy.
    pub fn observe_policies_added(&self, added: usize, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        for _ in 0..added {
            self.add_policy_exec_time.observe(ms, Instant::now());
        }
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
        prometheus_client::encoding::text::encode_registry(&mut out, &self.node)?;
        self.add_policy_exec_time.encode(
            &mut out,
            "npm_add_policy_exec_time",
            "Execution time in milliseconds for adding a network policy (Azure NPM's name and \
             meaning): per policy new to this agent, the compile and program time of the run \
             that realized it; quantiles over the last 10 minutes (at most 1024 observations)",
            Instant::now(),
        )?;
        prometheus_client::encoding::text::encode_eof(&mut out)?;
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
pub(crate) fn reason_label(reason: u8) -> &'static str {
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

/// The per-pod (verdict, reason) label pairs: the datapath's reasons collapsed so a pod has
/// 6 series per direction and metric.
const POD_REASONS: [(&str, &str); 6] = [
    ("allow", "policy_allow"),
    ("allow", "tracked"),
    ("allow", "not_isolated"),
    ("allow", "other"),
    ("drop", "policy_deny"),
    ("drop", "invalid"),
];

/// Index in [`POD_REASONS`] of a reason code.
fn pod_reason(reason: u8) -> usize {
    match reason {
        REASON_POLICY_ALLOW => 0,
        REASON_ESTABLISHED | REASON_REPLY => 1,
        REASON_NOT_ISOLATED => 2,
        REASON_DROP_POLICY => 4,
        r if is_allow(r) => 3,
        _ => 5,
    }
}

/// The `map` label of a map (its `npm_common::maps` name), as `npm_map_entries` has always
/// named the agent's six.
fn map_label(name: &str) -> &'static str {
    use npm_common::maps::{
        MAP_CIDRS, MAP_CLOCK, MAP_CONNTRACK, MAP_CONNTRACK4, MAP_DEFERRED, MAP_ENDPOINTS,
        MAP_FLOWS, MAP_FRAGS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS, MAP_POLICY, MAP_SERVICES,
    };
    match name {
        MAP_ENDPOINTS => "endpoints",
        MAP_IDENTITIES => "identities",
        MAP_CIDRS => "cidrs",
        MAP_POLICY => "policy",
        MAP_PAIRS => "pairs",
        MAP_SERVICES => "services",
        MAP_CONNTRACK4 => "conntrack_ipv4",
        MAP_CONNTRACK => "conntrack_ipv6",
        MAP_DEFERRED => "deferred",
        MAP_FRAGS => "frags",
        MAP_FLOWS => "flows",
        MAP_METRICS => "metrics",
        MAP_CLOCK => "clock",
        _ => "unknown",
    }
}

/// How long an observation stays in a [`WindowSummary`]'s quantiles (Prometheus's Go client's
/// default `MaxAge`, which Azure NPM's summaries used).
pub const SUMMARY_MAX_AGE: Duration = Duration::from_secs(600);
/// The most observations a [`WindowSummary`] keeps (the newest).
pub const SUMMARY_MAX_SAMPLES: usize = 1024;
/// The quantiles a [`WindowSummary`] reports (Azure NPM's).
pub const SUMMARY_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// A summary, which prometheus-client 0.25 does not have (its `MetricType` lists it as not
/// supported): the observations of the last [`SUMMARY_MAX_AGE`] (at most
/// [`SUMMARY_MAX_SAMPLES`], the newest) kept, and the [`SUMMARY_QUANTILES`] computed exactly
/// from them at scrape time (nearest rank; NaN when there are none, as the Go client writes);
/// `_sum` and `_count` cover every observation since the start. Encoded as the OpenMetrics
/// `summary` type.
#[derive(Debug, Default)]
pub struct WindowSummary {
    state: Mutex<SummaryState>,
}

#[derive(Debug, Default)]
struct SummaryState {
    window: VecDeque<(Instant, f64)>,
    sum: f64,
    count: u64,
}

impl SummaryState {
    fn prune(&mut self, now: Instant) {
        while self
            .window
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > SUMMARY_MAX_AGE)
        {
            self.window.pop_front();
        }
    }
}

impl WindowSummary {
    pub fn observe(&self, value: f64, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.sum += value;
        s.count += 1;
        if s.window.len() == SUMMARY_MAX_SAMPLES {
            s.window.pop_front();
        }
        s.window.push_back((now, value));
        s.prune(now);
    }

    /// (quantile, value) for each of [`SUMMARY_QUANTILES`], the sum and the count.
    pub fn snapshot(&self, now: Instant) -> ([(f64, f64); 3], f64, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.prune(now);
        let mut values: Vec<f64> = s.window.iter().map(|(_, v)| *v).collect();
        values.sort_by(f64::total_cmp);
        let q = SUMMARY_QUANTILES.map(|q| {
            let v = if values.is_empty() {
                f64::NAN
            } else {
                // Nearest rank: the smallest value with at least q of them at or below it.
                let rank = (q * values.len() as f64).ceil() as usize;
                values[rank.clamp(1, values.len()) - 1]
            };
            (q, v)
        });
        (q, s.sum, s.count)
    }

    /// Writes the metric family `name` in OpenMetrics text.
    fn encode(&self, out: &mut String, name: &str, help: &str, now: Instant) -> std::fmt::Result {
        use std::fmt::Write as _;
        let (quantiles, sum, count) = self.snapshot(now);
        writeln!(out, "# HELP {name} {help}.")?;
        writeln!(out, "# TYPE {name} summary")?;
        for (q, v) in quantiles {
            writeln!(out, "{name}{{quantile=\"{q}\"}} {}", float_text(v))?;
        }
        writeln!(out, "{name}_sum {}", float_text(sum))?;
        writeln!(out, "{name}_count {count}")
    }
}

/// An OpenMetrics float (`NaN`, `+Inf`, `-Inf` spelled as the format wants them).
fn float_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v:?}")
    }
}

fn direction_label(dir: u8) -> &'static str {
    match dir {
        DIR_INGRESS => "ingress",
        DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

/// Reads the datapath's per-CPU counters and map sizes at scrape time; holds what the last
/// apply said about the maps, the local pods' slots and the policies.
#[derive(Default)]
struct DatapathCollector {
    reader: RwLock<Option<Box<dyn CounterReader>>>,
    errors: RwLock<Option<Family<KindLabels, Counter>>>,
    /// Entries per compiler-written map after the last apply (`None` before it).
    compiled: RwLock<Option<[(&'static str, usize); 6]>>,
    /// Local pods' counter slots and per-policy counts after the last apply.
    local: RwLock<LocalView>,
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

    fn set_compiled(&self, report: &ApplyReport) {
        if let Ok(mut c) = self.compiled.write() {
            *c = Some(report.map_entries.by_name());
        }
        if let Ok(mut l) = self.local.write() {
            l.clone_from(&report.local);
        }
    }

    fn count_error(&self, kind: &'static str) {
        if let Ok(e) = self.errors.read()
            && let Some(e) = e.as_ref()
        {
            e.get_or_create(&KindLabels { kind }).inc();
        }
    }

    fn set_errors(&self, errors: Family<KindLabels, Counter>) {
        if let Ok(mut e) = self.errors.write() {
            *e = Some(errors);
        }
    }

    /// The counters per slot (summed over CPUs), read once per scrape.
    fn slot_counts(&self) -> Option<Vec<crate::datapath::SlotCount>> {
        let guard = self.reader.read().ok()?;
        let reader = guard.as_ref()?;
        match reader.read_slots() {
            Ok(c) => Some(c),
            Err(error) => {
                tracing::warn!(error = %error, "reading the datapath counters");
                self.count_error("datapath_counters");
                None
            }
        }
    }

    /// The node's totals by label set, with every known (direction, reason) present.
    fn samples(counts: &[crate::datapath::SlotCount]) -> Vec<(PacketLabels, PacketCount)> {
        let mut all: BTreeMap<(u8, u8), PacketCount> = [DIR_INGRESS, DIR_EGRESS]
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
        for c in counts.iter().map(|s| s.count) {
            let slot = all.entry((c.dir, c.reason)).or_insert(PacketCount {
                packets: 0,
                bytes: 0,
                ..c
            });
            slot.packets = slot.packets.wrapping_add(c.packets);
            slot.bytes = slot.bytes.wrapping_add(c.bytes);
        }
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
            .collect()
    }

    /// `npm_pod_packets_total` / `npm_pod_bytes_total`: every local pod with a slot of its
    /// own, every (direction, collapsed reason) present.
    fn encode_pods(
        &self,
        encoder: &mut DescriptorEncoder,
        counts: &[crate::datapath::SlotCount],
    ) -> Result<(), std::fmt::Error> {
        let Ok(local) = self.local.read() else {
            return Ok(());
        };
        if local.pods.is_empty() {
            return Ok(());
        }
        // slot -> [dir][collapsed reason] -> (packets, bytes)
        let mut by_slot: BTreeMap<u32, [[(u64, u64); POD_REASONS.len()]; 2]> = BTreeMap::new();
        for c in counts {
            let Some(dir) = [DIR_INGRESS, DIR_EGRESS]
                .iter()
                .position(|d| *d == c.count.dir)
            else {
                continue;
            };
            let r = pod_reason(c.count.reason);
            let cell = &mut by_slot.entry(c.slot).or_default()[dir][r];
            cell.0 = cell.0.wrapping_add(c.count.packets);
            cell.1 = cell.1.wrapping_add(c.count.bytes);
        }
        for (name, help, bytes) in [
            (
                "pod_packets",
                "Packets judged by the TC programs for each pod of this node, by direction (of \
                 the pod), verdict and reason (collapsed: tracked = established or reply, other \
                 = host, self, deferred; invalid = malformed, spoofed)",
                false,
            ),
            (
                "pod_bytes",
                "Bytes judged by the TC programs for each pod of this node, by direction, \
                 verdict and collapsed reason (as npm_pod_packets_total)",
                true,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (obj, slot) in &local.pods {
                let cells = by_slot.get(slot);
                for (d, dir) in [DIR_INGRESS, DIR_EGRESS].into_iter().enumerate() {
                    for (r, (verdict, reason)) in POD_REASONS.iter().enumerate() {
                        let (p, b) = cells.map_or((0, 0), |c| c[d][r]);
                        let labels = PodLabels {
                            namespace: obj.namespace.clone(),
                            pod: obj.name.clone(),
                            direction: direction_label(dir),
                            verdict,
                            reason,
                        };
                        ConstCounter::new(if bytes { b } else { p })
                            .encode(metric.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `npm_policy_isolated_pods` / `npm_policy_entries` of the policies selecting a local
    /// identity.
    fn encode_policies(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(local) = self.local.read() else {
            return Ok(());
        };
        if local.policies.is_empty() {
            return Ok(());
        }
        for (name, help, entries) in [
            (
                "policy_isolated_pods",
                "Pods of this node that the policy selects (so isolates in its directions)",
                false,
            ),
            (
                "policy_entries",
                "POLICY map entries the policy's rules give this node's pods (before the merge \
                 with other policies' entries; the count its MaxPolicyEntries budget is checked \
                 against)",
                true,
            ),
        ] {
            let mut metric =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for (obj, p) in &local.policies {
                let labels = PolicyLabels {
                    namespace: obj.namespace.clone(),
                    policy: obj.name.clone(),
                };
                let v = if entries { p.entries } else { p.isolated_pods };
                ConstGauge::new(gauge_value(v)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    /// `npm_map_entries` (the compiler's counts of the maps the agent writes, counted keys of
    /// those only the kernel writes) and `npm_map_capacity` (every map's `max_entries`).
    fn encode_maps(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let compiled = self.compiled.read().ok().and_then(|c| *c);
        let fill = {
            let guard = self.reader.read().ok();
            match guard
                .as_ref()
                .and_then(|g| g.as_ref())
                .map(|r| r.map_fill())
            {
                Some(Ok(f)) => f,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "counting the kernel-written maps");
                    self.count_error("datapath_maps");
                    None
                }
                None => None,
            }
        };
        let mut entries: Vec<(&'static str, i64)> = compiled
            .into_iter()
            .flatten()
            .map(|(m, n)| (m, gauge_value(n)))
            .collect();
        if let Some(f) = &fill {
            entries.extend(f.entries.iter().map(|(m, n)| (map_label(m), i64::from(*n))));
        }
        if !entries.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "map_entries",
                "Entries in each map: those the agent writes as it keeps them (Azure NPM: \
                 npm_num_iptables_rules, npm_num_ipset_entries), the conntrack, deferred and \
                 frags maps counted by walking their keys at most every 30 s",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (map, n) in entries {
                ConstGauge::new(n).encode(metric.encode_family(&MapLabels { map })?)?;
            }
        }
        if let Some(f) = fill.filter(|f| !f.capacity.is_empty()) {
            let mut metric = encoder.encode_descriptor(
                "map_capacity",
                "max_entries of each map as the kernel has it (an adopted pin keeps its size); \
                 a hash or trie map refuses new entries when full, an LRU map evicts",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (m, n) in f.capacity {
                ConstGauge::new(i64::from(n))
                    .encode(metric.encode_family(&MapLabels { map: map_label(m) })?)?;
            }
        }
        Ok(())
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

impl DatapathCollector {
    /// `npm_events_suppressed_total{cause}`: drops with no event (`rate_limit`: the CPU's
    /// bucket was empty; `ring_full`: no room in `NPM_EVENTS`).
    fn encode_events(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = {
            let guard = self.reader.read().ok();
            match guard.as_ref().and_then(|g| g.as_ref()).map(|r| r.events()) {
                Some(Ok(Some(c))) => c,
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "reading the event counters");
                    self.count_error("datapath_events");
                    return Ok(());
                }
                _ => return Ok(()),
            }
        };
        let mut metric = encoder.encode_descriptor(
            "events_suppressed",
            "Dropped packets with no drop event (npm-agent monitor): rate_limit (the CPU's token \
             bucket, 128 at once and 1000/s per CPU, was empty) or ring_full (no room in the ring \
             buffer: no reader, or a slow one); verdicts are not affected",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (cause, v) in [
            ("rate_limit", counts.rate_limited),
            ("ring_full", counts.ring_full),
        ] {
            ConstCounter::new(v).encode(metric.encode_family(&CauseLabels { cause })?)?;
        }
        Ok(())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_conntrack(&mut encoder)?;
        self.encode_events(&mut encoder)?;
        self.encode_maps(&mut encoder)?;
        self.encode_policies(&mut encoder)?;
        let Some(counts) = self.slot_counts() else {
            return Ok(());
        };
        self.encode_pods(&mut encoder, &counts)?;
        let samples = Self::samples(&counts);
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

    /// A reader with per-slot counts and map sizes.
    struct SlotFake(Vec<crate::datapath::SlotCount>);
    impl CounterReader for SlotFake {
        fn read(&self) -> Result<Vec<PacketCount>, DatapathError> {
            Ok(self.0.iter().map(|s| s.count).collect())
        }
        fn read_slots(&self) -> Result<Vec<crate::datapath::SlotCount>, DatapathError> {
            Ok(self.0.clone())
        }
        fn map_fill(&self) -> Result<Option<crate::datapath::MapFill>, DatapathError> {
            use npm_common::maps::{MAP_CONNTRACK4, MAP_FRAGS, MAP_POLICY};
            Ok(Some(crate::datapath::MapFill {
                capacity: vec![(MAP_POLICY, 1_048_576), (MAP_FRAGS, 8192)],
                entries: vec![(MAP_FRAGS, 3), (MAP_CONNTRACK4, 7)],
            }))
        }
    }

    fn slot(slot: u32, dir: u8, reason: u8, packets: u64) -> crate::datapath::SlotCount {
        crate::datapath::SlotCount {
            slot,
            count: PacketCount {
                dir,
                reason,
                packets,
                bytes: packets * 100,
            },
        }
    }

    #[test]
    fn per_pod_counters_come_from_each_pods_slot_with_reasons_collapsed() {
        use crate::model::ObjRef;
        let m = Metrics::new();
        m.set_counter_reader(Box::new(SlotFake(vec![
            slot(2, DIR_INGRESS, REASON_DROP_POLICY, 5),
            slot(2, DIR_INGRESS, REASON_ESTABLISHED, 3),
            slot(2, DIR_INGRESS, REASON_REPLY, 4),
            slot(3, DIR_EGRESS, REASON_DROP_SPOOFED, 1),
            slot(3, DIR_EGRESS, REASON_DROP_MALFORMED, 1),
            slot(3, DIR_EGRESS, REASON_POLICY_ALLOW, 9),
            // Not a pod's: the unmanaged slot and a slot no pod holds.
            slot(0, DIR_INGRESS, REASON_DROP_POLICY, 100),
            slot(7, DIR_INGRESS, REASON_DROP_POLICY, 1000),
        ])));
        let mut report = ApplyReport::default();
        report.local.pods = vec![
            (ObjRef::new("default", "web"), 2),
            (ObjRef::new("shop", "client"), 3),
        ];
        m.observe_apply(&report, Trigger::Change);
        let node = m.encode_node().expect("encode");
        let pod = |ns: &str, name: &str, dir: &str, verdict: &str, reason: &str| {
            sample(
                &node,
                &format!(
                    "npm_pod_packets_total{{namespace=\"{ns}\",pod=\"{name}\",direction=\"{dir}\",verdict=\"{verdict}\",reason=\"{reason}\"}}"
                ),
            )
        };
        assert_eq!(
            pod("default", "web", "ingress", "drop", "policy_deny"),
            Some(5.0)
        );
        assert_eq!(
            pod("default", "web", "ingress", "allow", "tracked"),
            Some(7.0)
        );
        assert_eq!(
            pod("default", "web", "egress", "drop", "policy_deny"),
            Some(0.0)
        );
        assert_eq!(
            pod("shop", "client", "egress", "drop", "invalid"),
            Some(2.0)
        );
        assert_eq!(
            pod("shop", "client", "egress", "allow", "policy_allow"),
            Some(9.0)
        );
        assert_eq!(
            sample(
                &node,
                "npm_pod_bytes_total{namespace=\"shop\",pod=\"client\",direction=\"egress\",verdict=\"allow\",reason=\"policy_allow\"}"
            ),
            Some(900.0)
        );
        // Two pods, 2 directions x 6 collapsed reasons each, nothing for other slots.
        let series = node
            .lines()
            .filter(|l| l.starts_with("npm_pod_packets_total{"))
            .count();
        assert_eq!(series, 2 * 2 * POD_REASONS.len(), "{node}");
        // The node's totals still hold every slot.
        assert_eq!(
            sample(
                &node,
                "npm_datapath_packets_total{direction=\"ingress\",verdict=\"drop\",reason=\"policy_deny\"}"
            ),
            Some(1105.0)
        );
        // A pod that left takes its series with it.
        report.local.pods.truncate(1);
        m.observe_apply(&report, Trigger::Change);
        let node = m.encode_node().expect("encode");
        assert!(!node.contains("pod=\"client\""), "{node}");
    }

    #[test]
    fn map_entries_and_capacity_cover_the_agents_and_the_kernels_maps() {
        let m = Metrics::new();
        m.set_counter_reader(Box::new(SlotFake(vec![])));
        let mut report = ApplyReport::default();
        report.map_entries.policy = 42;
        report.local.policies = vec![(
            crate::model::ObjRef::new("default", "web-from-client"),
            crate::compiler::PolicyLocal {
                isolated_pods: 2,
                entries: 40,
            },
        )];
        m.observe_apply(&report, Trigger::Change);
        let node = m.encode_node().expect("encode");
        assert_eq!(sample(&node, "npm_map_entries{map=\"policy\"}"), Some(42.0));
        assert_eq!(sample(&node, "npm_map_entries{map=\"frags\"}"), Some(3.0));
        assert_eq!(
            sample(&node, "npm_map_entries{map=\"conntrack_ipv4\"}"),
            Some(7.0)
        );
        assert_eq!(
            sample(&node, "npm_map_capacity{map=\"policy\"}"),
            Some(1_048_576.0)
        );
        assert_eq!(
            sample(&node, "npm_map_capacity{map=\"frags\"}"),
            Some(8192.0)
        );
        assert_eq!(node.matches("# TYPE npm_map_entries gauge").count(), 1);
        assert_eq!(
            sample(
                &node,
                "npm_policy_isolated_pods{namespace=\"default\",policy=\"web-from-client\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &node,
                "npm_policy_entries{namespace=\"default\",policy=\"web-from-client\"}"
            ),
            Some(40.0)
        );
    }

    #[test]
    fn the_summary_reports_exact_quantiles_of_its_window_and_all_time_sum_and_count() {
        let s = WindowSummary::default();
        let t0 = Instant::now();
        let (q, sum, count) = s.snapshot(t0);
        assert!(q.iter().all(|(_, v)| v.is_nan()), "{q:?}");
        assert_eq!((sum, count), (0.0, 0));
        // 1..=100 in shuffled order.
        for i in 0..100u32 {
            s.observe(f64::from((i * 37) % 100 + 1), t0);
        }
        let (q, sum, count) = s.snapshot(t0);
        assert_eq!(q, [(0.5, 50.0), (0.9, 90.0), (0.99, 99.0)]);
        assert_eq!((sum, count), (5050.0, 100));
        // Ten minutes later they have left the quantiles, not the sum and count.
        let later = t0 + SUMMARY_MAX_AGE + Duration::from_secs(1);
        s.observe(1000.0, later);
        let (q, sum, count) = s.snapshot(later);
        assert_eq!(q, [(0.5, 1000.0), (0.9, 1000.0), (0.99, 1000.0)]);
        assert_eq!((sum, count), (6050.0, 101));
        // At most SUMMARY_MAX_SAMPLES kept: the oldest go first.
        for _ in 0..SUMMARY_MAX_SAMPLES {
            s.observe(2.0, later);
        }
        assert_eq!(s.snapshot(later).0[2], (0.99, 2.0));
    }

    #[test]
    fn add_policy_exec_time_is_a_summary_in_milliseconds_and_event_latency_a_histogram() {
        let m = Metrics::new();
        m.observe_policies_added(2, Duration::from_millis(3));
        m.observe_event_to_maps(Duration::from_millis(20));
        let node = m.encode_node().expect("encode");
        assert_eq!(
            node.matches("# TYPE npm_add_policy_exec_time summary")
                .count(),
            1
        );
        assert_eq!(
            sample(&node, "npm_add_policy_exec_time{quantile=\"0.9\"}"),
            Some(3.0)
        );
        assert_eq!(sample(&node, "npm_add_policy_exec_time_count"), Some(2.0));
        assert_eq!(sample(&node, "npm_add_policy_exec_time_sum"), Some(6.0));
        assert_eq!(sample(&node, "npm_event_to_maps_seconds_count"), Some(1.0));
        assert_eq!(
            sample(&node, "npm_event_to_maps_seconds_bucket{le=\"0.016\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&node, "npm_event_to_maps_seconds_bucket{le=\"0.032\"}"),
            Some(1.0)
        );
        // The summary sits inside the exposition, which still ends with its EOF marker once.
        assert!(node.ends_with("# EOF\n"));
        assert_eq!(node.matches("# EOF").count(), 1);
    }
}
