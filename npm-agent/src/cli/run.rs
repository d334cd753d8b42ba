//! `npm-agent run`: enforce on this node.
//!
//! One loop, three inputs, one [`Enforcer`] (an incremental compiler and the map programmer):
//! - **the cluster**: the Kubernetes API (default): `Change`s as they happen, applied
//!   incrementally once Namespaces, Pods and NetworkPolicies have all been listed; or a
//!   manifests directory (`--manifests`), re-read every poll interval on a blocking thread and
//!   diffed into changes;
//! - **the node**: rtnetlink link events drive the fast path (a new candidate pod interface gets
//!   the programs and its pending, default-deny endpoint at once, before the pod's IP is
//!   known); node passes read routes, neighbours and addresses on a blocking thread and tie
//!   interfaces to pods (`Local`, `PendingLink`, `NodeIps` changes), every poll interval and
//!   soon after a link, route or neighbour change or a change to one of this node's pods;
//!   with Service ranges configured, every other link (not `lo`, not a pod interface) gets
//!   `npm_host_egress`, and the ranges reach the datapath only while all of them carry it;
//! - **the periodic resync** (ResyncPeriodInMinutes): the kernel maps compared in full with
//!   the compiler's and repaired.
//!
//! Nothing is applied before the cluster view is complete (the first apply carries the whole
//! cluster and the node's placement together, so maps adopted from a previous agent never pass
//! through a half state), and a lost source removes nothing.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use npm_common::ABI_VERSION;

use super::args::RunArgs;
use crate::config::{self, FileConfig, Overrides, Resolved};
use crate::datapath::{self, TcMode};
use crate::enforcer::{ApplyReport, Enforcer, EnforcerError};
use crate::k8s::client::error_chain;
use crate::model::Diagnostic;
use crate::node::discovery::{self, NodeTables};
use crate::node::links::{self, LinkEvent, LinkFilter, LinkWatcher, PodLinkDelta, PodLinks};
use crate::observe::{Observer, Trigger, http};
use crate::source::kube::{
    KubeHandle, KubeSource, KubeSourceConfig, SourceEvent, SourceState, SourceTask,
};
use crate::source::{ClusterSource, ManifestsSource, SourceError};
use crate::state::{Change, ClusterSnapshot};

/// After a route or neighbour change, the next node pass waits at least this long after the
/// previous one (a busy node changes neighbour entries often).
const TABLES_DEBOUNCE: Duration = Duration::from_millis(100);
/// How long to keep collecting API events that arrive together before compiling.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// At most this many API events go into one batch (a re-list is one event already).
const BATCH_MAX: usize = 256;
/// A new pod interface stays on the fast path's cls_bpf filters this long before it moves to
/// tcx. The move waits for an RCU grace period while holding the RTNL lock (~13 ms per hook
/// here), which the CNI and our next fast-path attach also need: not while a pod is being
/// set up.
const TCX_MOVE_AFTER: Duration = Duration::from_secs(2);
/// At most one move to tcx per this long (a burst of new pods does not hold RTNL for long).
const TCX_MOVE_GAP: Duration = Duration::from_millis(100);

/// Runs until SIGINT/SIGTERM (or once with `--once`). Exits without detaching: the pinned maps
/// and attached programs keep enforcing until the next agent adopts them.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let agent = Agent::start(&args).await?;
    let feed = match &args.manifests {
        Some(dir) => Feed::Manifests(Some(Box::new(ManifestsSource { dir: dir.clone() }))),
        None => {
            let config = KubeSourceConfig {
                relist_every: Some(agent.resync_every()),
                ..KubeSourceConfig::default()
            };
            let source = KubeSource::connect(args.kubeconfig.as_deref(), config)
                .await
                .context("connecting to the Kubernetes API")?;
            Feed::Api(Box::new(ApiFeed::new(source)))
        }
    };
    let enforcer = agent.load_enforcer(&args)?;
    if args.node_name.is_none() {
        tracing::warn!(
            "no --node-name: new pod interfaces are not isolated before discovery ties them to their pod"
        );
    }
    let result = Loop::new(&agent, enforcer, feed, &args).run().await;
    agent.stop();
    result
}

/// What the loop shares with the outside: the resolved configuration, the observer (metrics,
/// health) and the HTTP endpoints serving it.
struct Agent {
    settings: config::Settings,
    observer: Arc<Observer>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    async fn start(args: &RunArgs) -> anyhow::Result<Self> {
        let (config, config_view) = load_config(args)?;
        let settings = config.settings;
        // Liveness: the loop ticks every poll interval; allow slow applies on big clusters.
        let stall_after =
            Duration::from_millis(args.poll_interval_ms.max(50) * 10).max(Duration::from_secs(60));
        let observer = Arc::new(
            Observer::new(stall_after, config_view)
                .with_explain(settings.enable_http_debug_api && !args.once),
        );
        let server = if args.once {
            None
        } else {
            let addr = SocketAddr::new(settings.listen_address, settings.listen_port);
            let listener = http::bind(addr).await?;
            let endpoints = http::Endpoints {
                metrics: settings.enable_prometheus_metrics,
                debug: settings.enable_http_debug_api,
            };
            tracing::info!(%addr, metrics = endpoints.metrics, debug = endpoints.debug, "HTTP endpoints");
            Some(tokio::spawn(http::serve(
                listener,
                Arc::clone(&observer),
                endpoints,
            )))
        };
        Ok(Self {
            settings,
            observer,
            server,
        })
    }

    fn resync_every(&self) -> Duration {
        Duration::from_secs(self.settings.resync_period_minutes * 60)
    }

    /// Loads the datapath (adopting pinned maps) and hands its counters to the metrics.
    fn load_enforcer(&self, args: &RunArgs) -> anyhow::Result<Enforcer> {
        let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
        let options = crate::datapath::LoadOptions {
            conntrack_entries: self.settings.max_conntrack_entries,
        };
        let limits = crate::compiler::Limits {
            max_policy_entries: self.settings.max_policy_entries,
            ..Default::default()
        };
        let mut enforcer = Enforcer::load_with_limits(Some(&pin_dir), options, limits)
            .with_context(|| {
                format!(
                    "loading the datapath with maps pinned in {}",
                    pin_dir.display()
                )
            })?;
        tracing::info!(pin_dir = %pin_dir.display(), "datapath loaded");
        match enforcer.counters() {
            Ok(counters) => self.observer.metrics.set_counter_reader(Box::new(counters)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "datapath counters unavailable");
                self.observer.error(e.metric_label(), &e);
            }
        }
        Ok(enforcer)
    }

    fn stop(&self) {
        if let Some(server) = &self.server {
            server.abort();
        }
        tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
    }
}

/// Where the cluster's objects come from.
enum Feed {
    /// Re-read on a blocking thread; `None` while a read is running.
    Manifests(Option<Box<dyn ClusterSource>>),
    Api(Box<ApiFeed>),
}

/// The Kubernetes API source as the loop consumes it.
struct ApiFeed {
    /// Taken by the loop (its own borrow in `select!`).
    events: Option<tokio::sync::mpsc::Receiver<SourceEvent>>,
    state: Option<tokio::sync::watch::Receiver<SourceState>>,
    _task: SourceTask,
    /// Every kind has been listed once.
    synced: bool,
    /// Changes received before the loop's first apply.
    buffered: Vec<Change>,
}

impl ApiFeed {
    fn new(source: KubeSource) -> Self {
        let KubeHandle {
            events,
            state,
            task,
        } = source.spawn();
        Self {
            events: Some(events),
            state: Some(state),
            _task: task,
            synced: false,
            buffered: Vec::new(),
        }
    }
}

/// What a node pass read on its blocking thread.
struct Gathered {
    /// The manifests source travels with the read and comes back.
    source: Option<Box<dyn ClusterSource>>,
    cluster: Option<Result<(ClusterSnapshot, Vec<Diagnostic>), SourceError>>,
    node: anyhow::Result<(NodeTables, Vec<IpAddr>)>,
}

fn gather(mut source: Option<Box<dyn ClusterSource>>) -> Gathered {
    let cluster = source.as_mut().map(|s| s.snapshot());
    let node = (|| {
        let tables = NodeTables::read().context("reading the node's links and routes")?;
        let ips = discovery::node_addresses().context("reading the node's addresses")?;
        Ok((tables, ips))
    })();
    Gathered {
        source,
        cluster,
        node,
    }
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn next_link_event(w: &mut Option<LinkWatcher>) -> Result<links::Received, links::LinkError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn next_api_event(
    rx: &mut Option<tokio::sync::mpsc::Receiver<SourceEvent>>,
) -> Option<SourceEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn api_state_changed(
    rx: &mut Option<tokio::sync::watch::Receiver<SourceState>>,
) -> SourceState {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => rx.borrow_and_update().clone(),
            // The source is gone; `next_api_event` reports it.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

struct Loop<'a> {
    args: &'a RunArgs,
    observer: Arc<Observer>,
    enforcer: Enforcer,
    feed: Feed,
    /// ifindex -> name, for every interface carrying our programs.
    attached: BTreeMap<u32, String>,
    /// Attached interfaces whose programs are cls_bpf filters put on by the fast path, to be
    /// moved to tcx (see `Datapath::attach_index_quick`): ifindex -> when it is due.
    to_tcx: BTreeMap<u32, Instant>,
    /// The earliest the next move to tcx may start.
    next_move: Instant,
    pod_links: PodLinks,
    /// The first apply happened and our programs are on: the maps follow the cluster from
    /// here on. Until then nothing is attached by link events or passes (`first_apply`
    /// attaches): the programs already there (a previous agent's, with its pinned maps, of
    /// this ABI or another) keep enforcing, and ours, whose maps may be empty (a new ABI
    /// version's pin directory), would pass everything as not managed.
    ready: bool,
    /// Where the pin directories of every ABI version live (`--bpffs-dir`).
    bpffs_dir: std::path::PathBuf,
    resync_every: Duration,
    last_resync: Instant,
    poll: Duration,
    /// When the next node pass starts (it also re-reads the manifests).
    next_pass: Instant,
    last_pass: Instant,
    /// A pass asked for while one was reading (it may have read too early).
    again: Option<Duration>,
    /// The configured Service ranges (ServiceCIDRs); empty: no post-DNAT check.
    service_cidrs: Vec<ipnet::IpNet>,
    /// Which links are pod interfaces (they get the pod programs, not the host one).
    pod_filter: LinkFilter,
    /// ifindex -> name of the node's other links carrying `npm_host_egress`.
    host_attached: BTreeMap<u32, String>,
    /// Other links whose attach failed (retried every pass). While any is left, the Service
    /// ranges are withheld from the datapath: a deferred packet leaving by such a link would
    /// go unchecked, so nothing is deferred (fail closed: the documented gap).
    host_failed: BTreeMap<u32, String>,
    /// The "egress to ClusterIPs is checked pre-DNAT" warning was logged.
    warned_gap: bool,
    /// The placement conflicts of the last node pass (each is logged when it appears).
    conflicts: Vec<discovery::PlacementConflict>,
}

impl<'a> Loop<'a> {
    fn new(agent: &Agent, enforcer: Enforcer, feed: Feed, args: &'a RunArgs) -> Self {
        let now = Instant::now();
        Self {
            args,
            observer: Arc::clone(&agent.observer),
            enforcer,
            feed,
            attached: BTreeMap::new(),
            to_tcx: BTreeMap::new(),
            next_move: now,
            pod_links: PodLinks::new(LinkFilter {
                prefixes: args.pod_interface_prefixes.clone(),
            }),
            ready: false,
            bpffs_dir: args.bpffs_dir.clone(),
            resync_every: agent.resync_every(),
            last_resync: now,
            poll: Duration::from_millis(args.poll_interval_ms.max(50)),
            next_pass: now,
            last_pass: now,
            again: None,
            service_cidrs: agent.settings.service_cidrs.clone(),
            pod_filter: LinkFilter {
                prefixes: args.pod_interface_prefixes.clone(),
            },
            host_attached: BTreeMap::new(),
            host_failed: BTreeMap::new(),
            warned_gap: false,
            conflicts: Vec::new(),
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        // Subscribe before listing, so no link falls between the two.
        let mut watcher = if self.args.once {
            None
        } else {
            match LinkWatcher::open() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot watch links; new pods wait for the next poll");
                    self.observer.error(e.metric_label(), &e);
                    None
                }
            }
        };
        // The candidate pod interfaces as they are now; nothing is attached before the first
        // apply has filled the maps (`ready`).
        match links::dump_links() {
            Ok(all) => {
                self.pod_links.relist(&all);
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "listing links"),
        }
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut gathering: Option<tokio::task::JoinHandle<Gathered>> = None;
        let (mut api_events, mut api_state) = match &mut self.feed {
            Feed::Api(api) => (api.events.take(), api.state.take()),
            Feed::Manifests(_) => (None, None),
        };

        loop {
            self.observer.tick();
            if self.ready {
                // A change the last copy missed (copies are rate-limited).
                self.observer.publish_explain(None, || {
                    crate::explain::State::of_node(self.enforcer.compiler())
                });
            }
            if gathering.is_none() && Instant::now() >= self.next_pass {
                let source = match &mut self.feed {
                    Feed::Manifests(s) => s.take(),
                    Feed::Api(_) => None,
                };
                self.last_pass = Instant::now();
                gathering = Some(tokio::task::spawn_blocking(move || gather(source)));
            }
            let tick = self.next_pass.min(self.last_resync + self.resync_every);
            tokio::select! {
                g = async { gathering.as_mut().expect("guarded").await }, if gathering.is_some() => {
                    gathering = None;
                    let g = g.context("the node pass's reader thread")?;
                    self.next_pass = self.last_pass + self.poll;
                    if let Some(d) = self.again.take() {
                        self.next_pass = self.next_pass.min(Instant::now() + d);
                    }
                    self.on_gathered(g)?;
                    if self.args.once && self.ready {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(tick.into()) => {
                    if self.ready && self.last_resync.elapsed() >= self.resync_every {
                        self.resync()?;
                    }
                }
                ev = next_api_event(&mut api_events) => {
                    let Some(ev) = ev else {
                        anyhow::bail!("the Kubernetes API source stopped");
                    };
                    let arrived = Instant::now();
                    let mut events = vec![ev];
                    // Batch what arrives together (a burst of pod events) into one compile.
                    if let Some(rx) = api_events.as_mut() {
                        while events.len() < BATCH_MAX {
                            match tokio::time::timeout(BATCH_WINDOW, rx.recv()).await {
                                Ok(Some(ev)) => events.push(ev),
                                _ => break,
                            }
                        }
                    }
                    let pass = self.on_api_events(events, arrived);
                    if let Some(d) = pass {
                        self.request_pass(d, gathering.is_some());
                    }
                }
                st = api_state_changed(&mut api_state) => {
                    match st {
                        SourceState::Disconnected { error, .. } => {
                            tracing::warn!(%error, "Kubernetes API unreachable; enforcement unchanged until it is back");
                            self.observer.source_failed(&format!("Kubernetes API unreachable: {error}"));
                        }
                        SourceState::Synced => {
                            tracing::info!("Kubernetes API source synced");
                            self.observer.source_ok();
                        }
                        SourceState::Syncing { waiting_for, last_error } => tracing::info!(
                            ?waiting_for, ?last_error, "waiting for the first complete list"),
                    }
                }
                r = next_link_event(&mut watcher) => {
                    let mut batches = Vec::new();
                    match r {
                        Ok(b) => batches.push(b),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "link watcher stopped; falling back to polling");
                            self.observer.error(e.metric_label(), &e);
                            watcher = None;
                        }
                    }
                    // Drain a burst: one compile for all of it.
                    while let Some(Ok(b)) = watcher.as_mut().and_then(LinkWatcher::try_next) {
                        batches.push(b);
                    }
                    let Some(first_at) = batches.first().map(|b| b.at) else { continue };
                    // When each link's first notification was read (a drained burst spans many).
                    let mut seen_at: BTreeMap<u32, Instant> = BTreeMap::new();
                    for b in &batches {
                        for e in &b.events {
                            if let LinkEvent::Link(l) = e {
                                seen_at.entry(l.ifindex).or_insert(b.at);
                            }
                        }
                    }
                    let events: Vec<LinkEvent> = batches.into_iter().flat_map(|b| b.events).collect();
                    let (new, written_at, pass) = self.on_link_events(&events);
                    if !new.is_empty() {
                        self.fast_path(&new, written_at, |i| {
                            seen_at.get(&i).copied().unwrap_or(first_at)
                        });
                    }
                    if let Some(d) = pass {
                        self.request_pass(d, gathering.is_some());
                    }
                }
                _ = tokio::time::sleep_until(self.next_tcx_move().into()), if !self.to_tcx.is_empty() => {
                    self.move_one_to_tcx();
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
        Ok(())
    }

    /// Schedules a node pass `d` from the last one (now at the earliest).
    fn request_pass(&mut self, d: Duration, running: bool) {
        if running {
            self.again = Some(self.again.map_or(d, |a| a.min(d)));
        } else {
            self.next_pass = self.next_pass.min((self.last_pass + d).max(Instant::now()));
        }
    }

    /// Applies API events (after the first apply) or buffers them (before it). Returns when a
    /// node pass is wanted: at sync, and when one of this node's pods changed (its IP may now
    /// tie an interface to it).
    fn on_api_events(&mut self, events: Vec<SourceEvent>, arrived: Instant) -> Option<Duration> {
        let Feed::Api(api) = &mut self.feed else {
            return None;
        };
        let mut changes = Vec::new();
        let mut pass = None;
        for ev in events {
            match ev {
                SourceEvent::Changes(c) => changes.extend(c),
                SourceEvent::Problems { object, problems } => {
                    if problems.is_empty() {
                        tracing::info!(%object, "object problems resolved");
                    }
                    for d in problems {
                        tracing::warn!(problem = %d, "object problem (the message says what was skipped, failed closed or only warned)");
                    }
                }
                SourceEvent::Synced => {
                    api.synced = true;
                    pass = Some(Duration::ZERO);
                }
            }
        }
        let node = self.args.node_name.as_deref();
        let touches_node = |c: &Change| match c {
            Change::Pod(obj, pod) => {
                pod.as_ref().is_some_and(|p| p.node_name.as_deref() == node)
                    || self.enforcer.compiler().snapshot().local.contains_key(obj)
            }
            _ => false,
        };
        if changes.iter().any(touches_node) {
            pass = Some(Duration::ZERO);
        }
        if !self.ready {
            api.buffered.extend(changes);
        } else if !changes.is_empty() {
            let report = self.enforcer.apply_changes(&changes);
            self.report(&report, Trigger::Change);
            self.observer.event_applied(arrived, &report);
        }
        pass
    }

    /// A node pass came back: (with manifests) the cluster's changes, and this node's
    /// placement. The first time the cluster view is complete, both go in one apply.
    fn on_gathered(&mut self, g: Gathered) -> anyhow::Result<()> {
        self.retry_host_links();
        self.sync_service_ranges();
        let mut cluster_changes = Vec::new();
        let mut complete = self.ready;
        if let Feed::Manifests(slot) = &mut self.feed {
            *slot = g.source;
            match g.cluster {
                Some(Ok((snapshot, diagnostics))) => {
                    self.observer.source_ok();
                    let current = self.enforcer.compiler().snapshot();
                    let target = ClusterSnapshot {
                        local: current.local.clone(),
                        pending_links: current.pending_links.clone(),
                        node_ips: current.node_ips.clone(),
                        node_name: current.node_name.clone(),
                        generation: current.generation,
                        ..snapshot
                    };
                    cluster_changes = current.diff(&target);
                    if !cluster_changes.is_empty() || !self.ready {
                        for d in &diagnostics {
                            tracing::warn!(problem = %d, "manifest problem (the message says what was skipped, failed closed or only warned)");
                        }
                    }
                    complete = true;
                }
                Some(Err(e)) if self.ready => {
                    // Keep what is enforced; never flush because the source is unhappy.
                    tracing::error!(error = %format!("{e:#}"), "cluster source failed; enforcement unchanged");
                    self.observer.source_failed(&format!("{e:#}"));
                }
                Some(Err(e)) => return Err(e).context("reading the cluster state"),
                None => {}
            }
        }
        if let Feed::Api(api) = &mut self.feed
            && !self.ready
            && api.synced
        {
            cluster_changes = std::mem::take(&mut api.buffered);
            complete = true;
        }
        if !complete {
            return Ok(());
        }
        let (tables, node_ips) = match g.node {
            Ok(n) => n,
            Err(e) if !self.ready => {
                // Without the node's placement a first apply would compare the adopted maps
                // with a node of no pods and delete every endpoint: wait, keep what enforces
                // now, and say why on /readyz. The cluster's changes wait with us.
                tracing::error!(error = %format!("{e:#}"), "reading the node's tables failed before the first enforcement; nothing applied, retrying on the next pass");
                self.observer.error("node_tables", &format!("{e:#}"));
                self.observer
                    .waiting(Some(format!("the node's tables cannot be read: {e:#}")));
                if let Feed::Api(api) = &mut self.feed {
                    cluster_changes.append(&mut api.buffered);
                    api.buffered = cluster_changes;
                }
                return Ok(());
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the node's tables failed; placement unchanged");
                self.observer.error("node_tables", &format!("{e:#}"));
                if !cluster_changes.is_empty() {
                    let report = self.enforcer.apply_changes(&cluster_changes);
                    self.report(&report, Trigger::Change);
                }
                return Ok(());
            }
        };
        // Placement is computed against the cluster as it will be after `cluster_changes`.
        let mut base = self.enforcer.compiler().snapshot().clone();
        for c in &cluster_changes {
            base.apply(c);
        }
        if !self.ready {
            return self.first_apply(base, &tables, node_ips);
        }
        let from_cluster = !cluster_changes.is_empty();
        let mut changes = cluster_changes;
        changes.extend(self.place(&base, &tables, node_ips));
        if changes.is_empty() {
            return Ok(());
        }
        let report = self.enforcer.apply_changes(&changes);
        self.report(&report, Trigger::Change);
        if from_cluster {
            // The manifests' changes arrived with the pass that read them.
            self.observer.event_applied(self.last_pass, &report);
        }
        self.sync_service_ranges();
        Ok(())
    }

    /// The first apply: the whole view at once (maps adopted from a previous agent of this
    /// ABI are compared in full), then our programs go on, then the previous ABI's pins go.
    ///
    /// 1. The maps are filled with the cluster and the node's placement as if every candidate
    ///    and discovered pod interface carried our programs (entries before programs: a
    ///    program that meets a packet first finds its endpoint). The Service ranges wait
    ///    (step 4).
    /// 2. If a previous agent of another ABI version left pins and a write failed, nothing is
    ///    switched: its programs keep enforcing with its complete maps, and the next pass
    ///    tries again (not ready meanwhile). With nothing to keep, we go on: what was written
    ///    enforces, and a refused allow entry only denies.
    /// 3. Its tracked flows are copied into our conntrack maps, our programs replace its
    ///    programs on every pod interface (atomically per hook), the entries of interfaces
    ///    whose attach failed are dropped again, the flows its programs tracked until the
    ///    switch are copied once more, and its pin directories are removed.
    /// 4. The node's other links get the post-DNAT check, then the Service ranges go in.
    fn first_apply(
        &mut self,
        mut base: ClusterSnapshot,
        tables: &NodeTables,
        node_ips: Vec<IpAddr>,
    ) -> anyhow::Result<()> {
        let node_name = self.args.node_name.clone();
        let discovered = discovery::local_pods(tables, base.pods.values(), node_name.as_deref());
        let live: BTreeSet<u32> = self.pod_links.links().keys().copied().collect();
        let local: BTreeMap<_, _> = discovered
            .iter()
            .map(|(p, i)| (p.clone(), i.ifindex))
            .collect();
        let mut node_changes = links::node_changes(&base, &live, &local);
        if base.node_ips != node_ips {
            node_changes.push(Change::NodeIps(node_ips));
        }
        for c in &node_changes {
            base.apply(c);
        }
        base.node_name = node_name;
        base.service_cidrs = Vec::new();
        let report = self.enforcer.apply(&base);

        let previous = datapath::previous_pin_dirs(&self.bpffs_dir);
        if report.sync.failed > 0 && !previous.is_empty() {
            // Not ready: the report carries the failure (/readyz 503 naming it).
            self.report(&report, Trigger::Change);
            tracing::error!(
                failed = report.sync.failed,
                previous = ?previous.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
                "our maps could not be filled; the previous agent's programs keep enforcing with its maps until a run succeeds"
            );
            return Ok(());
        }

        // The switch.
        self.carry_conntrack(&previous);
        let mut targets: BTreeMap<u32, String> = self
            .pod_links
            .links()
            .iter()
            .map(|(i, l)| (*i, l.name.clone()))
            .collect();
        for iface in discovered.values() {
            targets.insert(iface.ifindex, iface.name.clone());
        }
        for (ifindex, name) in targets {
            match self.enforcer.attach_index(ifindex) {
                Ok(now) => {
                    self.attached.insert(ifindex, now);
                }
                Err(e) => {
                    tracing::error!(ifindex, interface = %name, error = %error_chain(&e), "attach failed");
                    self.observer.error(
                        "attach",
                        &format!("{name} ({ifindex}): {}", error_chain(&e)),
                    );
                }
            }
        }
        // Ready (and counted as applied) only now that the programs are on: reported before
        // the attach, /readyz said ready while a fresh node's interfaces carried nothing yet
        // (~13 ms per tcx hook), and the soak's denied probes passed in that window.
        self.report(&report, Trigger::Change);
        let attached_local: BTreeMap<_, _> = local
            .into_iter()
            .filter(|(_, i)| self.attached.contains_key(i))
            .collect();
        let current = self.enforcer.compiler().snapshot();
        let undo = links::node_changes(current, &self.live(), &attached_local);
        if !undo.is_empty() {
            let report = self.enforcer.apply_changes(&undo);
            self.report(&report, Trigger::Change);
        }
        self.carry_conntrack(&previous);
        for (version, dir) in &previous {
            match datapath::remove_pin_dir(dir) {
                Ok(()) => {
                    tracing::info!(version, dir = %dir.display(), "removed the pins of a previous ABI")
                }
                Err(e) => {
                    tracing::warn!(version, error = %error_chain(&e), "removing the pins of a previous ABI");
                    self.observer.error(e.metric_label(), &error_chain(&e));
                }
            }
        }
        self.ready = true;
        tracing::info!(
            interfaces = self.attached.len(),
            "programs attached; enforcing"
        );

        match links::dump_links() {
            Ok(all) => {
                for link in &all {
                    self.host_link(link);
                }
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "listing links"),
        }
        self.sync_service_ranges();
        Ok(())
    }

    /// Copies the tracked flows of every previous ABI's conntrack maps into ours (see
    /// [`crate::datapath::Datapath::carry_conntrack`]); errors are logged and reported, the
    /// switch goes on (those flows are judged as new).
    fn carry_conntrack(&mut self, previous: &[(u32, std::path::PathBuf)]) {
        for (version, dir) in previous {
            let maps = self.enforcer.compiler().maps();
            let endpoints = maps.endpoints.clone();
            let identities = maps.identities.clone();
            let slot_of = |ifindex: u32| endpoints.get(&ifindex).map(|e| e.slot as u16);
            let owner_of = |a: &npm_common::maps::Addr16| {
                identities.get(a).map(|p| p.ifindex).filter(|i| *i != 0)
            };
            match self
                .enforcer
                .datapath_mut()
                .carry_conntrack(dir, *version, slot_of, owner_of)
            {
                Ok(n) => {
                    tracing::info!(
                        version,
                        flows = n,
                        "tracked flows carried over from a previous ABI"
                    )
                }
                Err(e) => {
                    tracing::warn!(version, error = %error_chain(&e), "carrying tracked flows over from a previous ABI");
                    self.observer.error(e.metric_label(), &error_chain(&e));
                }
            }
        }
    }

    /// With Service ranges configured, attaches `npm_host_egress` to `link` when it is one of
    /// the node's other links: not loopback, not a (candidate or attached) pod interface.
    fn host_link(&mut self, link: &links::Link) {
        if !self.ready
            || self.service_cidrs.is_empty()
            || link.name == "lo"
            || self.attached.contains_key(&link.ifindex)
            || self.pod_filter.is_pod_interface(link)
            || self.host_attached.get(&link.ifindex) == Some(&link.name)
        {
            return;
        }
        match self.enforcer.attach_host(&link.name) {
            Ok(ifindex) if ifindex == link.ifindex => {
                tracing::info!(interface = %link.name, ifindex, "post-DNAT check attached");
                self.host_failed.remove(&link.ifindex);
                self.host_attached.insert(link.ifindex, link.name.clone());
            }
            Ok(now) => {
                tracing::warn!(interface = %link.name, ifindex = link.ifindex, now, "link renamed while attaching; retrying");
                self.host_failed.insert(link.ifindex, link.name.clone());
            }
            Err(e) => {
                tracing::error!(interface = %link.name, error = %error_chain(&e),
                    "attaching the post-DNAT check failed; Service ranges withheld (egress to ClusterIPs checked before the DNAT) until it succeeds");
                self.observer.error(
                    "attach",
                    &format!("{} (host link): {}", link.name, error_chain(&e)),
                );
                self.host_failed.insert(link.ifindex, link.name.clone());
            }
        }
        self.sync_service_ranges();
    }

    /// The configured ranges once every other link carries the post-DNAT check, else none.
    fn wanted_service_ranges(&self) -> Vec<ipnet::IpNet> {
        if self.host_failed.is_empty() {
            self.service_cidrs.clone()
        } else {
            Vec::new()
        }
    }

    /// Retries the other links whose attach failed.
    fn retry_host_links(&mut self) {
        let failed: Vec<(u32, String)> = self
            .host_failed
            .iter()
            .map(|(i, n)| (*i, n.clone()))
            .collect();
        for (ifindex, name) in failed {
            self.host_failed.remove(&ifindex);
            self.host_link(&links::Link {
                ifindex,
                name,
                kind: None,
                master: None,
            });
        }
    }

    /// Brings the datapath's Service ranges to the configured ones once every other link
    /// carries the post-DNAT check (else to none), after the first apply. Warns once when
    /// egress is enforced without them.
    fn sync_service_ranges(&mut self) {
        if !self.ready {
            return;
        }
        let want = self.wanted_service_ranges();
        let snapshot = self.enforcer.compiler().snapshot();
        if self.service_cidrs.is_empty()
            && !self.warned_gap
            && snapshot.policies.values().any(|p| p.egress.is_some())
        {
            tracing::warn!(
                "egress policies are enforced but no Service ranges are configured (ServiceCIDRs, NPM_SERVICE_CIDRS, --service-cidr): egress to a ClusterIP is checked against the ClusterIP, not the backend pod, so egress rules naming pods do not match Service traffic"
            );
            self.warned_gap = true;
        }
        if snapshot.service_cidrs != want {
            let report = self.enforcer.set_service_cidrs(want.clone());
            tracing::info!(ranges = ?want, "Service ranges in the datapath");
            self.report(&report, Trigger::Change);
        }
    }

    /// Ties interfaces to this node's pods (attaching to new ones) and returns the `Local`,
    /// `PendingLink` and `NodeIps` changes that bring `base` to what the node shows.
    fn place(
        &mut self,
        base: &ClusterSnapshot,
        tables: &NodeTables,
        node_ips: Vec<IpAddr>,
    ) -> Vec<Change> {
        // Candidate links whose attach failed when they appeared: try again.
        let missing: Vec<PodLinkDelta> = self
            .pod_links
            .links()
            .values()
            .filter(|l| !self.attached.contains_key(&l.ifindex))
            .cloned()
            .map(PodLinkDelta::Appeared)
            .collect();
        self.on_deltas(missing, false);
        // The current placement keeps a pod on its veth against a bridge entry that now
        // points elsewhere (which a pod's own frames can cause): reported, not followed.
        let placement = discovery::place_pods(
            tables,
            base.pods.values(),
            self.args.node_name.as_deref(),
            &base.local,
        );
        for c in &placement.conflicts {
            if !self.conflicts.contains(c) {
                tracing::warn!(pod = %c.pod, "{c}");
            }
        }
        self.conflicts = placement.conflicts;
        let discovered = placement.pods;
        for (pod, iface) in &discovered {
            if self.attached.get(&iface.ifindex) != Some(&iface.name) {
                match self.enforcer.attach(&iface.name) {
                    Ok(ifindex) => {
                        tracing::info!(%pod, interface = %iface.name, ifindex, "attached");
                        self.attached.insert(ifindex, iface.name.clone());
                        // Its TC egress filter is npm_to_pod now (same priority and handle).
                        self.host_attached.remove(&ifindex);
                        self.host_failed.remove(&ifindex);
                    }
                    Err(e) => {
                        tracing::error!(%pod, interface = %iface.name, error = %error_chain(&e), "attach failed");
                        self.observer.error(
                            "attach",
                            &format!("{pod} on {}: {}", iface.name, error_chain(&e)),
                        );
                    }
                }
            }
        }
        let local: BTreeMap<_, _> = discovered
            .iter()
            .filter(|(_, i)| self.attached.get(&i.ifindex) == Some(&i.name))
            .map(|(p, i)| (p.clone(), i.ifindex))
            .collect();
        let mut changes = links::node_changes(base, &self.live(), &local);
        if base.node_ips != node_ips {
            changes.push(Change::NodeIps(node_ips));
        }
        changes
    }

    /// Candidate pod interfaces that carry our programs.
    fn live(&self) -> BTreeSet<u32> {
        self.pod_links
            .links()
            .keys()
            .filter(|i| self.attached.contains_key(i))
            .copied()
            .collect()
    }

    /// Attaches to appeared links, forgets gone ones. Returns the ifindexes newly attached.
    /// `quick`: links that just appeared (link events), attached as fast as the kernel allows
    /// and moved to tcx later (`Datapath::attach_index_quick`); else by the datapath's mode.
    fn on_deltas(&mut self, deltas: Vec<PodLinkDelta>, quick: bool) -> Vec<(u32, String)> {
        let mut new = Vec::new();
        for d in deltas {
            match d {
                // Before the first apply: attached by it (`first_apply`).
                PodLinkDelta::Appeared(_) if !self.ready => {}
                PodLinkDelta::Appeared(link) => match self.attach_appeared(link.ifindex, quick) {
                    Ok((name, mode)) => {
                        self.attached.insert(link.ifindex, name.clone());
                        if mode != self.enforcer.datapath().tc_mode() {
                            self.to_tcx
                                .insert(link.ifindex, Instant::now() + TCX_MOVE_AFTER);
                        }
                        new.push((link.ifindex, name));
                    }
                    Err(e) => {
                        tracing::error!(ifindex = link.ifindex, interface = %link.name,
                            error = %error_chain(&e), "attach to new interface failed");
                        self.observer.error(
                            "attach",
                            &format!("{} ({}): {}", link.name, link.ifindex, error_chain(&e)),
                        );
                    }
                },
                PodLinkDelta::Gone(link) => {
                    self.attached.remove(&link.ifindex);
                    self.to_tcx.remove(&link.ifindex);
                    tracing::info!(ifindex = link.ifindex, interface = %link.name, "pod interface gone");
                }
            }
        }
        new
    }

    fn attach_appeared(
        &mut self,
        ifindex: u32,
        quick: bool,
    ) -> Result<(String, TcMode), EnforcerError> {
        if quick {
            self.enforcer.attach_index_quick(ifindex)
        } else {
            let mode = self.enforcer.datapath().tc_mode();
            Ok((self.enforcer.attach_index(ifindex)?, mode))
        }
    }

    /// When the next move to tcx may start: the earliest due one, spaced by `TCX_MOVE_GAP`.
    fn next_tcx_move(&self) -> Instant {
        let due = self
            .to_tcx
            .values()
            .min()
            .copied()
            .unwrap_or(self.next_move);
        due.max(self.next_move)
    }

    /// Moves one interface the fast path attached by cls_bpf to tcx (its filters go once the
    /// tcx programs are on). On failure the filters stay and keep enforcing; a renamed link
    /// comes back through its link event.
    fn move_one_to_tcx(&mut self) {
        let now = Instant::now();
        let Some((&ifindex, _)) = self.to_tcx.iter().find(|(_, due)| **due <= now) else {
            return;
        };
        self.to_tcx.remove(&ifindex);
        self.next_move = Instant::now() + TCX_MOVE_GAP;
        if !self.attached.contains_key(&ifindex) {
            return;
        }
        match self.enforcer.attach_index(ifindex) {
            Ok(name) => {
                tracing::debug!(ifindex, interface = %name, "moved to tcx");
                self.attached.insert(ifindex, name);
            }
            Err(e) => {
                let name = self.attached.get(&ifindex).cloned().unwrap_or_default();
                tracing::warn!(ifindex, interface = %name, error = %error_chain(&e),
                    "moving to tcx failed; its cls_bpf filters keep enforcing");
                self.observer.error(
                    "attach",
                    &format!("{name} ({ifindex}) to tcx: {}", error_chain(&e)),
                );
            }
        }
    }

    /// Handles one batch of link watcher events; returns the newly attached interfaces, when
    /// their pending entries were written (before the attach) and whether anything calls for
    /// a node pass (and how soon).
    #[allow(clippy::type_complexity)]
    fn on_link_events(
        &mut self,
        events: &[LinkEvent],
    ) -> (
        Vec<(u32, String)>,
        Option<(Instant, SystemTime)>,
        Option<Duration>,
    ) {
        let mut deltas = Vec::new();
        let mut pass: Option<Duration> = None;
        for e in events {
            match e {
                LinkEvent::Overflow => {
                    tracing::warn!("rtnetlink notifications lost; relisting links");
                    match links::dump_links() {
                        Ok(all) => {
                            deltas.extend(self.pod_links.relist(&all));
                            for link in &all {
                                self.host_link(link);
                            }
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "relisting links"),
                    }
                    pass = Some(Duration::ZERO);
                }
                LinkEvent::Tables => {
                    pass = Some(pass.map_or(TABLES_DEBOUNCE, |f| f.min(TABLES_DEBOUNCE)));
                }
                LinkEvent::Gone(i) => {
                    // Any interface, candidate or not (discovery may have attached it).
                    self.to_tcx.remove(i);
                    if self.attached.remove(i).is_some() {
                        pass = Some(Duration::ZERO);
                    }
                    self.host_attached.remove(i);
                    self.host_failed.remove(i);
                    deltas.extend(self.pod_links.on_event(e));
                }
                LinkEvent::Link(link) => {
                    self.host_link(link);
                    deltas.extend(self.pod_links.on_event(e));
                }
            }
        }
        if !deltas.is_empty() {
            pass = Some(Duration::ZERO);
        }
        let written_at = self.pending_first(&deltas);
        (self.on_deltas(deltas, true), written_at, pass)
    }

    /// The fast path, first half: links about to get our programs become pending endpoints
    /// before the programs go on. Without an ENDPOINTS entry the programs pass a packet as not
    /// managed, so writing the entry first leaves no moment in which a new pod's interface
    /// carries our programs unenforced. A link whose attach then fails loses its entry again
    /// in [`Self::fast_path`]. Returns when the entries were written (`None`: nothing to write).
    fn pending_first(&mut self, deltas: &[PodLinkDelta]) -> Option<(Instant, SystemTime)> {
        if !self.ready {
            return None;
        }
        let mut live = self.live();
        live.extend(deltas.iter().filter_map(|d| match d {
            PodLinkDelta::Appeared(link) => Some(link.ifindex),
            PodLinkDelta::Gone(_) => None,
        }));
        let current = self.enforcer.compiler().snapshot();
        let changes = links::node_changes(current, &live, &current.local.clone());
        if changes.is_empty() {
            return None;
        }
        let report = self.enforcer.apply_changes(&changes);
        if report.sync.failed > 0 {
            tracing::error!(
                failed = report.sync.failed,
                "writing pending endpoints failed"
            );
        }
        let written_at = (Instant::now(), SystemTime::now());
        self.report(&report, Trigger::Change);
        Some(written_at)
    }

    /// The fast path, second half: after the attach, drops the pending entries of links whose
    /// attach failed (and writes any [`Self::pending_first`] did not). Logs how long the
    /// attach and the entry took from the moment each link's notification was read.
    fn fast_path(
        &mut self,
        new: &[(u32, String)],
        written_at: Option<(Instant, SystemTime)>,
        seen_at: impl Fn(u32) -> Instant,
    ) {
        let attached_at = (Instant::now(), SystemTime::now());
        if !self.ready {
            return;
        }
        let current = self.enforcer.compiler().snapshot();
        let changes = links::node_changes(current, &self.live(), &current.local.clone());
        let report = (!changes.is_empty()).then(|| self.enforcer.apply_changes(&changes));
        if report.as_ref().is_some_and(|r| r.sync.failed > 0) {
            tracing::error!(
                failed = report.as_ref().map_or(0, |r| r.sync.failed),
                "writing pending endpoints failed"
            );
        }
        let Some(written_at) = written_at.or_else(|| {
            report
                .is_some()
                .then(|| (Instant::now(), SystemTime::now()))
        }) else {
            return;
        };
        for (ifindex, name) in new {
            let ep = self.enforcer.compiler().maps().endpoints.get(ifindex);
            tracing::info!(
                ifindex,
                interface = %name,
                pending = ep.is_some_and(|e| e.id == npm_common::maps::ID_PENDING),
                flags = ep.map_or(0, |e| e.flags),
                attach_us = (attached_at.0 - seen_at(*ifindex)).as_micros() as u64,
                endpoint_us = (written_at.0 - seen_at(*ifindex)).as_micros() as u64,
                attached_unix_us = unix_us(attached_at.1),
                endpoint_unix_us = unix_us(written_at.1),
                "new pod interface enforced"
            );
        }
        if let Some(report) = &report {
            self.report(report, Trigger::Change);
        }
    }

    /// Re-reads the kernel maps and repairs any drift from the compiler's.
    fn resync(&mut self) -> anyhow::Result<()> {
        self.last_resync = Instant::now();
        let snapshot = self.enforcer.compiler().snapshot().clone();
        let report = self
            .enforcer
            .resync(&snapshot)
            .context("re-reading the kernel maps")?;
        self.report(&report, Trigger::Resync);
        Ok(())
    }

    fn report(&self, report: &ApplyReport, trigger: Trigger) {
        let snapshot = self.enforcer.compiler().snapshot();
        self.observer.applied(snapshot, report, trigger);
        self.observer.publish_explain(Some(report), || {
            crate::explain::State::of_node(self.enforcer.compiler())
        });
        for d in &report.diagnostics {
            tracing::debug!(problem = %d, "policy problem");
        }
        tracing::info!(
            changes = report.changes,
            pods = snapshot.pods.len(),
            local = snapshot.local.len(),
            pending = snapshot.pending_links.len(),
            policies = snapshot.policies.len(),
            problems = report.diagnostics.len(),
            entries = report.entries,
            upserts = report.sync.upserts,
            deletes = report.sync.deletes,
            failed = report.sync.failed,
            compile_us = report.compile_time.as_micros() as u64,
            program_us = report.sync.elapsed.as_micros() as u64,
            "maps in step"
        );
    }
}

/// Defaults < `--config` file < `NPM_*` environment < flags (see [`crate::config`]). Returns
/// the settings and the view of them that `/debug/state` shows.
fn load_config(args: &RunArgs) -> anyhow::Result<(Resolved, serde_json::Value)> {
    let file = args.config.as_deref().map(FileConfig::load).transpose()?;
    if let (Some(path), Some(f)) = (&args.config, &file) {
        for (key, reason) in &f.ignored {
            tracing::info!(file = %path.display(), key, reason, "config key ignored");
        }
        for key in &f.unknown {
            tracing::warn!(file = %path.display(), key, "unknown config key ignored (not an Azure NPM key either; a typo?)");
        }
    }
    let env = Overrides::from_env(|k| std::env::var(k).ok())?;
    let flags = Overrides {
        resync_period_minutes: args.resync_period_minutes,
        listen_address: args.listen_address,
        listen_port: args.listen_port,
        enable_prometheus_metrics: args.enable_prometheus_metrics,
        enable_http_debug_api: args.enable_http_debug_api,
        service_cidrs: (!args.service_cidrs.is_empty()).then(|| {
            let mut v = args.service_cidrs.clone();
            v.sort();
            v.dedup();
            v
        }),
        max_conntrack_entries: args.max_conntrack_entries,
        max_policy_entries: args.max_policy_entries,
    };
    flags.validate_flags()?;
    let resolved = config::resolve(file.as_ref(), &env, &flags);
    tracing::info!(settings = ?resolved.settings, "configuration");
    let view = serde_json::json!({
        "file": args.config,
        "effective": resolved.settings,
        "origins": resolved.origins,
        "ignored_keys": file.as_ref().map(|f| f.ignored.iter().map(|(k, r)| serde_json::json!({"key": k, "reason": r})).collect::<Vec<_>>()).unwrap_or_default(),
        "unknown_keys": file.as_ref().map(|f| f.unknown.clone()).unwrap_or_default(),
    });
    Ok((resolved, view))
}
