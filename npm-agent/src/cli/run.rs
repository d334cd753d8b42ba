//! `npm-agent run`: enforce on this node, from the standalone manifests source.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use npm_common::ABI_VERSION;

use super::args::RunArgs;
use crate::config::{self, FileConfig, Overrides, Resolved};
use crate::datapath::DatapathCounters;
use crate::enforcer::Enforcer;
use crate::node::discovery::{self, NodeTables};
use crate::observe::{Observer, Trigger, http};
use crate::source::{ClusterSource, ManifestsSource};

/// Runs until SIGINT/SIGTERM (or once with `--once`). Exits without detaching: the pinned maps
/// and attached programs keep enforcing until the next agent adopts them.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = ManifestsSource {
        dir: args.manifests.clone(),
    };
    enforce(Box::new(source), &args).await
}

/// The agent loop over any [`ClusterSource`].
pub async fn enforce(mut source: Box<dyn ClusterSource>, args: &RunArgs) -> anyhow::Result<()> {
    let (config, config_view) = load_config(args)?;
    let settings = &config.settings;
    // Liveness: the loop ticks every poll interval; allow slow applies on big clusters.
    let stall_after =
        Duration::from_millis(args.poll_interval_ms.max(50) * 10).max(Duration::from_secs(60));
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
    let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
    let mut enforcer = Enforcer::new(Some(&pin_dir)).with_context(|| {
        format!(
            "loading the datapath with maps pinned in {}",
            pin_dir.display()
        )
    })?;
    tracing::info!(pin_dir = %pin_dir.display(), source = %source.describe(), "npm-agent started");
    match enforcer
        .datapath_mut()
        .take_map(npm_common::maps::MAP_METRICS)
        .and_then(DatapathCounters::from_map)
    {
        Ok(counters) => observer.metrics.set_counter_reader(Box::new(counters)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "datapath counters unavailable");
            observer.error(e.metric_label(), &e);
        }
    }

    let mut attached: BTreeMap<String, u32> = BTreeMap::new();
    let mut last_applied: Option<crate::state::ClusterSnapshot> = None;
    let mut last_resync = Instant::now();
    let resync_every = Duration::from_secs(settings.resync_period_minutes * 60);
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
        let tables = NodeTables::read().context("reading the node's links and routes")?;
        let local =
            discovery::local_pods(&tables, snapshot.pods.values(), args.node_name.as_deref());
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
            for d in &report.compiled.diagnostics {
                tracing::warn!(problem = %d, "policy problem");
            }
            tracing::info!(
                pods = snapshot.pods.len(),
                local = snapshot.local.len(),
                policies = snapshot.policies.len(),
                entries = report.compiled.maps.total_entries(),
                upserts = report.sync.upserts,
                deletes = report.sync.deletes,
                failed = report.sync.failed,
                compile_us = report.compile_time.as_micros() as u64,
                program_us = report.sync.elapsed.as_micros() as u64,
                "maps in step"
            );
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
    if let Some(server) = server {
        server.abort();
    }
    tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
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
