//! `npm-agent run`: enforce on this node, from the standalone manifests source.
//!
//! Two paths feed the maps:
//! - the full pass (on start, every poll interval, and soon after a route or neighbour
//!   change): read the source, discover local pods from the node's tables, attach, compile,
//!   program;
//! - the fast path (the moment rtnetlink reports a new candidate pod interface): attach the
//!   programs to it and compile the last snapshot plus `PendingLink(ifindex, true)`, so the
//!   interface default-denies what a pod coming to this node would be isolated in before the
//!   pod can send or receive. Discovery later ties it to its pod (`Local`) and the pending
//!   entry goes.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use npm_common::ABI_VERSION;

use super::args::RunArgs;
use crate::enforcer::Enforcer;
use crate::node::discovery::{self, NodeTables};
use crate::node::links::{self, LinkEvent, LinkFilter, LinkWatcher, PodLinkDelta, PodLinks};
use crate::source::{ClusterSource, ManifestsSource};
use crate::state::ClusterSnapshot;

/// After a route or neighbour change, the next full pass waits at least this long after the
/// previous one (a busy node changes neighbour entries often).
const TABLES_DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs until SIGINT/SIGTERM (or once with `--once`). Exits without detaching: the pinned maps
/// and attached programs keep enforcing until the next agent adopts them.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = ManifestsSource {
        dir: args.manifests.clone(),
    };
    enforce(Box::new(source), &args).await
}

/// Node-side state of the loop: which interfaces carry our programs, which candidate pod
/// interfaces are live.
struct Node {
    enforcer: Enforcer,
    /// ifindex -> name, for every interface we attached to.
    attached: BTreeMap<u32, String>,
    pod_links: PodLinks,
    last_applied: Option<ClusterSnapshot>,
}

impl Node {
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
    fn on_deltas(&mut self, deltas: Vec<PodLinkDelta>) -> Vec<(u32, String)> {
        let mut new = Vec::new();
        for d in deltas {
            match d {
                PodLinkDelta::Appeared(link) => match self.enforcer.attach_index(link.ifindex) {
                    Ok(name) => {
                        self.attached.insert(link.ifindex, name.clone());
                        new.push((link.ifindex, name));
                    }
                    Err(e) => tracing::error!(ifindex = link.ifindex, interface = %link.name,
                        error = %format!("{e:#}"), "attach to new interface failed"),
                },
                PodLinkDelta::Gone(link) => {
                    self.attached.remove(&link.ifindex);
                    tracing::info!(ifindex = link.ifindex, interface = %link.name, "pod interface gone");
                }
            }
        }
        new
    }

    /// Handles one batch of watcher events; returns the newly attached interfaces and whether
    /// anything calls for a full pass (and how soon).
    fn on_events(&mut self, events: &[LinkEvent]) -> (Vec<(u32, String)>, Option<Duration>) {
        let mut deltas = Vec::new();
        let mut full: Option<Duration> = None;
        for e in events {
            match e {
                LinkEvent::Overflow => {
                    tracing::warn!("rtnetlink notifications lost; relisting links");
                    match links::dump_links() {
                        Ok(all) => deltas.extend(self.pod_links.relist(&all)),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "relisting links"),
                    }
                    full = Some(Duration::ZERO);
                }
                LinkEvent::Tables => {
                    full = Some(full.map_or(TABLES_DEBOUNCE, |f| f.min(TABLES_DEBOUNCE)));
                }
                LinkEvent::Gone(i) => {
                    // Any interface, candidate or not (discovery may have attached it).
                    if self.attached.remove(i).is_some() {
                        full = Some(Duration::ZERO);
                    }
                    deltas.extend(self.pod_links.on_event(e));
                }
                LinkEvent::Link(_) => deltas.extend(self.pod_links.on_event(e)),
            }
        }
        if !deltas.is_empty() {
            full = Some(Duration::ZERO);
        }
        (self.on_deltas(deltas), full)
    }

    /// The fast path: the last applied snapshot with the live links' pending entries.
    fn apply_pending(&mut self) -> Option<crate::enforcer::ApplyReport> {
        let mut s = self.last_applied.clone()?;
        let local = s.local.clone();
        let changes = links::node_changes(&s, &self.live(), &local);
        if changes.is_empty() {
            return None;
        }
        for c in &changes {
            s.apply(c);
        }
        s.generation = 0;
        let report = self.enforcer.apply(&s);
        if report.sync.failed > 0 {
            tracing::error!(
                failed = report.sync.failed,
                "writing pending endpoints failed"
            );
        }
        self.last_applied = Some(s);
        Some(report)
    }
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

async fn next_event(w: &mut Option<LinkWatcher>) -> Result<links::Received, links::LinkError> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// The agent loop over any [`ClusterSource`].
pub async fn enforce(source: Box<dyn ClusterSource>, args: &RunArgs) -> anyhow::Result<()> {
    let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
    let enforcer = Enforcer::new(Some(&pin_dir)).with_context(|| {
        format!(
            "loading the datapath with maps pinned in {}",
            pin_dir.display()
        )
    })?;
    tracing::info!(pin_dir = %pin_dir.display(), source = %source.describe(), "npm-agent started");
    if args.node_name.is_none() {
        tracing::warn!(
            "no --node-name: new pod interfaces are not isolated before discovery ties them to their pod"
        );
    }

    let filter = LinkFilter {
        prefixes: args.pod_interface_prefixes.clone(),
    };
    // Subscribe before listing, so no link falls between the two.
    let mut watcher = if args.once {
        None
    } else {
        match LinkWatcher::open() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot watch links; new pods wait for the next poll");
                None
            }
        }
    };
    let mut node = Node {
        enforcer,
        attached: BTreeMap::new(),
        pod_links: PodLinks::new(filter),
        last_applied: None,
    };
    match links::dump_links() {
        Ok(all) => {
            let deltas = node.pod_links.relist(&all);
            node.on_deltas(deltas);
        }
        Err(e) => tracing::error!(error = %format!("{e:#}"), "listing links"),
    }

    let mut last_resync = Instant::now();
    let resync_every = Duration::from_secs(args.resync_period_minutes.max(1) * 60);
    let poll = Duration::from_millis(args.poll_interval_ms.max(50));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut next_full = Instant::now();
    let mut last_full = Instant::now();
    // The slow half of a full pass (source, `ip` commands) runs on a blocking thread, so link
    // events are handled while it runs; the source travels with it and comes back.
    let mut source = Some(source);
    let mut gathering: Option<tokio::task::JoinHandle<Gathered>> = None;
    // A full pass asked for while one was already reading (it may have read too early).
    let mut again: Option<Duration> = None;

    loop {
        if gathering.is_none()
            && Instant::now() >= next_full
            && let Some(src) = source.take()
        {
            last_full = Instant::now();
            gathering = Some(tokio::task::spawn_blocking(move || gather(src)));
        }
        tokio::select! {
            g = async { gathering.as_mut().expect("guarded").await }, if gathering.is_some() => {
                gathering = None;
                let g = g.context("the full pass's reader thread")?;
                source = Some(g.source);
                next_full = last_full + poll;
                if let Some(d) = again.take() {
                    next_full = next_full.min(Instant::now() + d);
                }
                full_pass(&mut node, g.result, args, &mut last_resync, resync_every)?;
                if args.once {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(next_full.into()), if gathering.is_none() => {}
            r = next_event(&mut watcher) => {
                let mut batches = Vec::new();
                match r {
                    Ok(b) => batches.push(b),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "link watcher stopped; falling back to polling");
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
                let (new, full) = node.on_events(&events);
                if !new.is_empty() {
                    fast_path(&mut node, &new, |i| seen_at.get(&i).copied().unwrap_or(first_at));
                }
                if let Some(d) = full {
                    if gathering.is_some() {
                        again = Some(again.map_or(d, |a| a.min(d)));
                    } else {
                        next_full = next_full.min((last_full + d).max(Instant::now()));
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping; enforcement stays in place (pinned maps, attached programs)");
    Ok(())
}

/// Writes the pending endpoints of newly attached interfaces and logs how long it took
/// from the moment the link notification was read.
fn fast_path(node: &mut Node, new: &[(u32, String)], seen_at: impl Fn(u32) -> Instant) {
    let attached_at = (Instant::now(), SystemTime::now());
    let Some(report) = node.apply_pending() else {
        return;
    };
    let written_at = (Instant::now(), SystemTime::now());
    for (ifindex, name) in new {
        let ep = report.compiled.maps.endpoints.get(ifindex);
        tracing::info!(
            ifindex,
            interface = %name,
            pending = ep.is_some_and(|e| e.id == crate::compiler::ID_PENDING),
            flags = ep.map_or(0, |e| e.flags),
            attach_us = (attached_at.0 - seen_at(*ifindex)).as_micros() as u64,
            endpoint_us = (written_at.0 - seen_at(*ifindex)).as_micros() as u64,
            attached_unix_us = unix_us(attached_at.1),
            endpoint_unix_us = unix_us(written_at.1),
            "new pod interface enforced"
        );
    }
}

type Facts = (
    (ClusterSnapshot, Vec<crate::model::Diagnostic>),
    NodeTables,
    Vec<std::net::IpAddr>,
);

/// The slow, blocking half of a full pass.
struct Gathered {
    source: Box<dyn ClusterSource>,
    result: anyhow::Result<Facts>,
}

fn gather(mut source: Box<dyn ClusterSource>) -> Gathered {
    let result = (|| {
        let snapshot = source.snapshot().context("reading the cluster state");
        let tables = NodeTables::read().context("reading the node's links and routes")?;
        let ips = discovery::node_addresses().context("reading the node's addresses")?;
        Ok((snapshot?, tables, ips))
    })();
    Gathered { source, result }
}

/// One full pass: source, discovery, attach, compile, program (when anything changed, or a
/// resync is due).
fn full_pass(
    node: &mut Node,
    facts: anyhow::Result<Facts>,
    args: &RunArgs,
    last_resync: &mut Instant,
    resync_every: Duration,
) -> anyhow::Result<()> {
    let ((mut snapshot, diagnostics), tables, node_ips) = match facts {
        Ok(f) => f,
        Err(e) if node.last_applied.is_some() => {
            // Keep what is enforced; never flush because the source is unhappy.
            tracing::error!(error = %format!("{e:#}"), "cluster source or node tables failed; enforcement unchanged");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Candidate links whose attach failed when they appeared: try again.
    let missing: Vec<PodLinkDelta> = node
        .pod_links
        .links()
        .values()
        .filter(|l| !node.attached.contains_key(&l.ifindex))
        .cloned()
        .map(PodLinkDelta::Appeared)
        .collect();
    node.on_deltas(missing);
    let discovered =
        discovery::local_pods(&tables, snapshot.pods.values(), args.node_name.as_deref());
    for (pod, iface) in &discovered {
        if node.attached.get(&iface.ifindex) != Some(&iface.name) {
            match node.enforcer.attach(&iface.name) {
                Ok(ifindex) => {
                    tracing::info!(%pod, interface = %iface.name, ifindex, "attached");
                    node.attached.insert(ifindex, iface.name.clone());
                }
                Err(e) => {
                    tracing::error!(%pod, interface = %iface.name, error = %format!("{e:#}"), "attach failed")
                }
            }
        }
    }
    let local: BTreeMap<_, _> = discovered
        .iter()
        .filter(|(_, i)| node.attached.get(&i.ifindex) == Some(&i.name))
        .map(|(p, i)| (p.clone(), i.ifindex))
        .collect();
    snapshot.node_name = args.node_name.clone();
    snapshot.local.clear();
    snapshot.pending_links.clear();
    for c in links::node_changes(&snapshot, &node.live(), &local) {
        snapshot.apply(&c);
    }
    snapshot.node_ips = node_ips;

    snapshot.generation = 0;
    let changed = node.last_applied.as_ref() != Some(&snapshot);
    if changed || last_resync.elapsed() >= resync_every {
        for d in &diagnostics {
            tracing::warn!(problem = %d, "manifest problem; object skipped or failed closed");
        }
        let report = if last_resync.elapsed() >= resync_every {
            *last_resync = Instant::now();
            node.enforcer
                .resync(&snapshot)
                .context("re-reading the kernel maps")?
        } else {
            node.enforcer.apply(&snapshot)
        };
        for d in &report.compiled.diagnostics {
            tracing::warn!(problem = %d, "policy problem");
        }
        tracing::info!(
            pods = snapshot.pods.len(),
            local = snapshot.local.len(),
            pending = snapshot.pending_links.len(),
            policies = snapshot.policies.len(),
            entries = report.compiled.maps.total_entries(),
            upserts = report.sync.upserts,
            deletes = report.sync.deletes,
            failed = report.sync.failed,
            compile_us = report.compile_time.as_micros() as u64,
            program_us = report.sync.elapsed.as_micros() as u64,
            "maps in step"
        );
        node.last_applied = Some(snapshot);
    }
    Ok(())
}
