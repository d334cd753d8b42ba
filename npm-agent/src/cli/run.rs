//! `npm-agent run`: enforce on this node, from the Kubernetes API (default) or from the
//! standalone manifests source (`--manifests`).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use npm_common::ABI_VERSION;

use super::args::RunArgs;
use crate::config::{self, FileConfig, Overrides, Resolved};
use crate::datapath::DatapathCounters;
use crate::enforcer::{ApplyReport, Enforcer};
use crate::node::discovery::{self, NodeTables};
use crate::observe::{Observer, Trigger, http};
use crate::source::kube::{KubeSource, KubeSourceConfig, SourceEvent, SourceState};
use crate::source::{ClusterSource, ManifestsSource};
use crate::state::ClusterSnapshot;

/// Runs until SIGINT/SIGTERM (or once with `--once`). Exits without detaching: the pinned maps
/// and attached programs keep enforcing until the next agent adopts them.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    match &args.manifests {
        Some(dir) => {
            let source = ManifestsSource { dir: dir.clone() };
            enforce(Box::new(source), &args).await
        }
        None => enforce_api(&args).await,
    }
}

/// What both loops share: the resolved configuration, the observer (metrics, health) and the
/// HTTP endpoints serving it.
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
        let stall_after = Duration::from_millis(args.poll_interval_ms.max(50) * 10)
            .max(Duration::from_secs(60));
        let observer = Arc::new(Observer::new(stall_after, config_view));
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
        let mut enforcer = Enforcer::new(Some(&pin_dir)).with_context(|| {
            format!(
                "loading the datapath with maps pinned in {}",
                pin_dir.display()
            )
        })?;
        tracing::info!(pin_dir = %pin_dir.display(), "datapath loaded");
        match enforcer
            .datapath_mut()
            .take_map(npm_common::maps::MAP_METRICS)
            .and_then(DatapathCounters::from_map)
        {
            Ok(counters) => self.observer.metrics.set_counter_reader(Box::new(counters)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "datapath counters unavailable");
                self.observer.error(e.metric_label(), &e);
            }
        }
        Ok(enforcer)
    }

    fn stop(self) {
        if let Some(server) = self.server {
            server.abort();
        }
        tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
    }
}

/// Finds this node's pods behind their host-side interfaces, attaches the classifiers to new
/// ones, and sets `snapshot.local` (attached interfaces only) and `snapshot.node_ips`.
fn place_local_pods(
    enforcer: &mut Enforcer,
    observer: &Observer,
    attached: &mut BTreeMap<String, u32>,
    snapshot: &mut ClusterSnapshot,
    node_name: Option<&str>,
) -> anyhow::Result<()> {
    let tables = NodeTables::read().context("reading the node's links and routes")?;
    let local = discovery::local_pods(&tables, snapshot.pods.values(), node_name);
    for (pod, iface) in &local {
        if attached.get(&iface.name) != Some(&iface.ifindex) {
            match enforcer.attach(&iface.name) {
                Ok(ifindex) => {
                    tracing::info!(%pod, interface = %iface.name, ifindex, "attached");
                    attached.insert(iface.name.clone(), ifindex);
                }
                Err(e) => {
                    tracing::error!(%pod, interface = %iface.name, error = %format!("{e:#}"), "attach failed");
                    observer.error("attach", &format!("{pod} on {}: {e:#}", iface.name));
                }
            }
        }
    }
    snapshot.local = local
        .iter()
        .filter(|(_, i)| attached.get(&i.name) == Some(&i.ifindex))
        .map(|(p, i)| (p.clone(), i.ifindex))
        .collect();
    snapshot.node_ips = discovery::node_addresses().context("reading the node's addresses")?;
    Ok(())
}

fn log_report(snapshot: &ClusterSnapshot, report: &ApplyReport) {
    for d in &report.diagnostics {
        tracing::warn!(problem = %d, "policy problem");
    }
    tracing::info!(
        pods = snapshot.pods.len(),
        local = snapshot.local.len(),
        policies = snapshot.policies.len(),
        entries = report.entries,
        upserts = report.sync.upserts,
        deletes = report.sync.deletes,
        failed = report.sync.failed,
        compile_us = report.compile_time.as_micros() as u64,
        program_us = report.sync.elapsed.as_micros() as u64,
        "maps in step"
    );
}

/// The agent loop over any [`ClusterSource`].
pub async fn enforce(mut source: Box<dyn ClusterSource>, args: &RunArgs) -> anyhow::Result<()> {
    let agent = Agent::start(args).await?;
    let observer = Arc::clone(&agent.observer);
    let mut enforcer = agent.load_enforcer(args)?;
    tracing::info!(source = %source.describe(), "npm-agent started");

    let mut attached: BTreeMap<String, u32> = BTreeMap::new();
    let mut last_applied: Option<ClusterSnapshot> = None;
    let mut last_resync = Instant::now();
    let resync_every = agent.resync_every();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        observer.tick();
        let (mut snapshot, diagnostics) = match source.snapshot() {
            Ok(s) => {
                observer.source_ok();
                s
            }
            Err(e) if last_applied.is_some() => {
                // Keep what is enforced; never flush because the source is unhappy.
                tracing::error!(error = %format!("{e:#}"), "cluster source failed; enforcement unchanged");
                observer.source_failed(&format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(args.poll_interval_ms.max(50))).await;
                continue;
            }
            Err(e) => return Err(e).context("reading the cluster state"),
        };
        snapshot.node_name = args.node_name.clone();
        place_local_pods(
            &mut enforcer,
            &observer,
            &mut attached,
            &mut snapshot,
            args.node_name.as_deref(),
        )?;

        snapshot.generation = 0;
        let changed = last_applied.as_ref() != Some(&snapshot);
        if changed || last_resync.elapsed() >= resync_every {
            for d in &diagnostics {
                tracing::warn!(problem = %d, "manifest problem; object skipped or failed closed");
            }
            let (report, trigger) = if last_resync.elapsed() >= resync_every {
                last_resync = Instant::now();
                let report = enforcer
                    .resync(&snapshot)
                    .context("re-reading the kernel maps")?;
                (report, Trigger::Resync)
            } else {
                (enforcer.apply(&snapshot), Trigger::Change)
            };
            observer.applied(&snapshot, &report, trigger);
            log_report(&snapshot, &report);
            last_applied = Some(snapshot);
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.poll_interval_ms.max(50))) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    agent.stop();
    Ok(())
}

/// How long to keep collecting changes that arrive together before compiling.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// At most this many events go into one batch (a re-list is one event already).
const BATCH_MAX: usize = 256;

fn take_event(snapshot: &mut ClusterSnapshot, ev: SourceEvent, synced: &mut bool) -> bool {
    match ev {
        SourceEvent::Changes(changes) => {
            let mut changed = false;
            for c in &changes {
                changed |= snapshot.apply(c);
            }
            changed
        }
        SourceEvent::Problems { object, problems } => {
            if problems.is_empty() {
                tracing::info!(%object, "object problems resolved");
            }
            for d in problems {
                tracing::warn!(problem = %d, "object skipped or failed closed");
            }
            false
        }
        SourceEvent::Synced => {
            *synced = true;
            true
        }
    }
}

/// The agent loop over the Kubernetes API: waits until Namespaces, Pods and NetworkPolicies
/// have all been listed, then compiles after every batch of changes. A lost API server changes
/// nothing that is enforced (the source sends no removals); its state and `/readyz` say so.
pub async fn enforce_api(args: &RunArgs) -> anyhow::Result<()> {
    let agent = Agent::start(args).await?;
    let observer = Arc::clone(&agent.observer);
    let resync_every = agent.resync_every();
    let config = KubeSourceConfig {
        relist_every: Some(resync_every),
        ..KubeSourceConfig::default()
    };
    let source = KubeSource::connect(args.kubeconfig.as_deref(), config)
        .await
        .context("connecting to the Kubernetes API")?;
    let mut enforcer = agent.load_enforcer(args)?;
    let mut handle = source.spawn();
    tracing::info!(node = ?args.node_name, "npm-agent started; source: kubernetes api");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    let mut snapshot = ClusterSnapshot {
        node_name: args.node_name.clone(),
        ..ClusterSnapshot::default()
    };
    let mut synced = false;
    let mut dirty = false;
    let mut attached: BTreeMap<String, u32> = BTreeMap::new();
    let mut last_applied: Option<ClusterSnapshot> = None;
    let mut last_resync = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(args.poll_interval_ms.max(50)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = handle.state.clone();

    loop {
        observer.tick();
        let mut resync = false;
        tokio::select! {
            ev = handle.events.recv() => {
                let Some(ev) = ev else {
                    anyhow::bail!("the Kubernetes API source stopped");
                };
                dirty |= take_event(&mut snapshot, ev, &mut synced);
                // Batch what arrives together (a burst of pod events) into one compile.
                for _ in 0..BATCH_MAX {
                    match tokio::time::timeout(BATCH_WINDOW, handle.events.recv()).await {
                        Ok(Some(ev)) => dirty |= take_event(&mut snapshot, ev, &mut synced),
                        _ => break,
                    }
                }
            }
            _ = poll.tick() => {
                // New pod interfaces, node addresses; and the periodic repair.
                dirty = true;
                resync = last_resync.elapsed() >= resync_every;
            }
            r = state.changed() => {
                if r.is_ok() {
                    let st = state.borrow_and_update().clone();
                    match &st {
                        SourceState::Disconnected { error, .. } => {
                            tracing::warn!(%error, "Kubernetes API unreachable; enforcement unchanged until it is back");
                            observer.source_failed(&format!("Kubernetes API unreachable: {error}"));
                        }
                        SourceState::Synced => {
                            tracing::info!("Kubernetes API source synced");
                            observer.source_ok();
                        }
                        SourceState::Syncing { waiting_for, last_error } => tracing::info!(
                            ?waiting_for, ?last_error, "waiting for the first complete list"),
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        // Never enforce a partial view: nothing before every kind has been listed once.
        if !synced || !dirty {
            continue;
        }
        dirty = false;
        place_local_pods(
            &mut enforcer,
            &observer,
            &mut attached,
            &mut snapshot,
            args.node_name.as_deref(),
        )?;
        let mut current = snapshot.clone();
        current.generation = 0;
        if resync {
            last_resync = Instant::now();
            let report = enforcer
                .resync(&current)
                .context("re-reading the kernel maps")?;
            observer.applied(&current, &report, Trigger::Resync);
            log_report(&current, &report);
            last_applied = Some(current);
        } else if last_applied.as_ref() != Some(&current) {
            let report = enforcer.apply(&current);
            observer.applied(&current, &report, Trigger::Change);
            log_report(&current, &report);
            last_applied = Some(current);
        }
        if args.once {
            break;
        }
    }
    agent.stop();
    Ok(())
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
