//! `npm-agent run`: enforce on this node, from the standalone manifests source.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use npm_common::ABI_VERSION;

use super::args::RunArgs;
use crate::enforcer::Enforcer;
use crate::node::discovery::{self, NodeTables};
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
    let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
    let mut enforcer = Enforcer::new(Some(&pin_dir)).with_context(|| {
        format!(
            "loading the datapath with maps pinned in {}",
            pin_dir.display()
        )
    })?;
    tracing::info!(pin_dir = %pin_dir.display(), source = %source.describe(), "npm-agent started");

    let mut attached: BTreeMap<String, u32> = BTreeMap::new();
    let mut last_applied: Option<crate::state::ClusterSnapshot> = None;
    let mut last_resync = Instant::now();
    let resync_every = Duration::from_secs(args.resync_period_minutes.max(1) * 60);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        let (mut snapshot, diagnostics) = match source.snapshot() {
            Ok(s) => s,
            Err(e) if last_applied.is_some() => {
                // Keep what is enforced; never flush because the source is unhappy.
                tracing::error!(error = %format!("{e:#}"), "cluster source failed; enforcement unchanged");
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
                        tracing::error!(%pod, interface = %iface.name, error = %format!("{e:#}"), "attach failed")
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
            let report = if last_resync.elapsed() >= resync_every {
                last_resync = Instant::now();
                enforcer
                    .resync(&snapshot)
                    .context("re-reading the kernel maps")?
            } else {
                enforcer.apply(&snapshot)
            };
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
    tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
    Ok(())
}
