//! The Kubernetes API source: watchers for Namespaces, Pods (all of them: any pod can be a
//! peer) and NetworkPolicies, turned into [`Change`]s on a channel.
//!
//! - Only what changed is sent: an event whose converted object equals the cached one (pod
//!   status churn, resourceVersion bumps) sends nothing.
//! - A (re-)list (`Init`, `InitApply`..., `InitDone`) is buffered and, at `InitDone`, diffed
//!   against the cache: sets for new or changed objects, removals for objects that vanished
//!   while the watch was down. The diff is sent as one batch.
//! - [`SourceEvent::Synced`] is sent once, after the first complete list of all three kinds
//!   (and after its changes): never enforce before it, or an empty cache would be enforced.
//! - Errors are retried with backoff (`k8s::watch`); a 410 Gone re-lists. The last complete
//!   view stays in the cache: a lost API server never sends removals, so nothing is flushed.
//! - Every `relist_every` the three watchers are restarted (a full list each), which repairs
//!   any drift from a missed event.
//! - [`SourceState`] (a `tokio::sync::watch`) says whether the source is still syncing, synced,
//!   or synced-then-disconnected (since when, why), for the health endpoint.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::stream::SelectAll;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::k8s::client::{self as kclient, ClientError, Liveness};
use crate::k8s::watch::{self as kwatch, Converted, Kind, Model, WatchConfig, WatchEvent};
use crate::model::{Diagnostic, ObjRef};
use crate::state::Change;

/// What the source sends, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// Changes from one watch event, or the whole diff of one (re-)list.
    Changes(Vec<Change>),
    /// The problems of one object, replacing those sent before for it; empty when it has none
    /// any more (fixed or deleted).
    Problems {
        object: String,
        problems: Vec<Diagnostic>,
    },
    /// All three kinds have been listed once: the changes sent so far are a complete view.
    Synced,
}

/// The source's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Not every kind has been listed yet: nothing may be enforced from this source.
    Syncing {
        waiting_for: Vec<Kind>,
        last_error: Option<String>,
    },
    /// Listed, and the API server answers.
    Synced,
    /// Was synced; the API server stopped answering (or a watch failed and has not been
    /// re-established). The last complete view stays enforced.
    Disconnected { since: SystemTime, error: String },
}

impl SourceState {
    pub fn is_synced(&self) -> bool {
        matches!(self, SourceState::Synced)
    }
    /// A short word for logs and the health endpoint.
    pub fn label(&self) -> &'static str {
        match self {
            SourceState::Syncing { .. } => "syncing",
            SourceState::Synced => "synced",
            SourceState::Disconnected { .. } => "disconnected",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Tuning of the API source.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    pub watch: WatchConfig,
    /// Restart the watchers (full list) this often; `None`: only when the API requires it.
    pub relist_every: Option<Duration>,
    /// Capacity of the event channel (the source waits when the consumer falls behind).
    pub channel: usize,
    /// How often the state is re-evaluated when no event arrives.
    pub state_tick: Duration,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            watch: WatchConfig::default(),
            relist_every: Some(Duration::from_secs(15 * 60)),
            channel: 1024,
            state_tick: Duration::from_millis(500),
        }
    }
}

/// The API source, not yet started.
pub struct KubeSource {
    client: kube::Client,
    liveness: Arc<Liveness>,
    config: KubeSourceConfig,
}

/// A running [`KubeSource`]. Dropping it (its `task`) stops the watchers.
pub struct KubeHandle {
    pub events: mpsc::Receiver<SourceEvent>,
    pub state: watch::Receiver<SourceState>,
    pub task: SourceTask,
}

/// The watchers' task: aborted when dropped.
pub struct SourceTask(JoinHandle<()>);

impl Drop for SourceTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KubeSource {
    /// A client from `kubeconfig` (or inferred: `KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        config: KubeSourceConfig,
    ) -> Result<Self, KubeSourceError> {
        let liveness = Arc::new(Liveness::default());
        let cfg = kclient::config(kubeconfig).await?;
        let client = kclient::client(cfg, liveness.clone())?;
        Ok(Self {
            client,
            liveness,
            config,
        })
    }

    /// Starts the watchers on the current tokio runtime.
    pub fn spawn(self) -> KubeHandle {
        let (tx, events) = mpsc::channel(self.config.channel.max(1));
        let (state_tx, state) = watch::channel(SourceState::Syncing {
            waiting_for: Kind::ALL.to_vec(),
            last_error: None,
        });
        let task = tokio::spawn(self.run(tx, state_tx));
        KubeHandle {
            events,
            state,
            task: SourceTask(task),
        }
    }

    async fn run(self, tx: mpsc::Sender<SourceEvent>, state_tx: watch::Sender<SourceState>) {
        let streams = || -> SelectAll<kwatch::WatchStream> {
            futures::stream::select_all(kwatch::watch_all(&self.client, &self.config.watch))
        };
        let mut watchers = streams();
        let mut tracker = Tracker::default();
        let mut health = Health::default();
        let mut tick = tokio::time::interval(self.config.state_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let relist_every = self.config.relist_every;
        let mut next_relist = relist_every.map(|d| tokio::time::Instant::now() + jittered(d));
        loop {
            let relist_at = next_relist;
            tokio::select! {
                item = watchers.next() => {
                    let Some((kind, result)) = item else { break };
                    match result {
                        Ok(ev) => {
                            for out in tracker.on_event(kind, ev) {
                                if tx.send(out).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                            let error = format!("{} watch: {}", kind.as_str(), kclient::error_chain(&e));
                            if gone {
                                tracing::info!(%error, "resource version expired; re-listing");
                            } else {
                                tracing::warn!(%error, "watch failed; retrying with backoff");
                                health.watch_failed(error);
                            }
                        }
                    }
                }
                _ = tick.tick() => {}
                _ = async {
                    match relist_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::info!("periodic full re-list of namespaces, pods and policies");
                    watchers = streams();
                    next_relist = relist_every.map(|d| tokio::time::Instant::now() + jittered(d));
                }
                _ = tx.closed() => return,
            }
            let state = health.state(&tracker, &self.liveness);
            state_tx.send_if_modified(|cur| {
                if *cur != state {
                    tracing::info!(
                        from = cur.label(),
                        to = state.label(),
                        ?state,
                        "API source state"
                    );
                    *cur = state;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// `d` plus up to 10%: the agents of a cluster, started together, do not all re-list at the
/// same instant.
fn jittered(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 10_000.0)
}

/// Turns liveness and watch errors into a [`SourceState`].
#[derive(Default)]
struct Health {
    last_watch_failure: Option<kclient::Failure>,
    disconnected_since: Option<SystemTime>,
}

impl Health {
    fn watch_failed(&mut self, error: String) {
        self.last_watch_failure = Some(kclient::Failure {
            at: Instant::now(),
            wall: SystemTime::now(),
            error,
        });
    }

    fn state(&mut self, tracker: &Tracker, liveness: &Liveness) -> SourceState {
        let failure = [liveness.last_failure(), self.last_watch_failure.clone()]
            .into_iter()
            .flatten()
            .max_by_key(|f| f.at);
        let failing = match (&failure, liveness.last_answer()) {
            (Some(f), Some(ok)) => f.at >= ok,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !tracker.all_synced() {
            return SourceState::Syncing {
                waiting_for: tracker.waiting_for(),
                last_error: failure.filter(|_| failing).map(|f| f.error),
            };
        }
        match failure.filter(|_| failing) {
            Some(f) => {
                let since = *self.disconnected_since.get_or_insert(f.wall);
                SourceState::Disconnected {
                    since,
                    error: f.error,
                }
            }
            None => {
                self.disconnected_since = None;
                SourceState::Synced
            }
        }
    }
}

/// The per-kind caches of converted objects and the logic that turns watcher events into
/// [`SourceEvent`]s. No I/O: tested on its own.
#[derive(Debug, Default)]
pub struct Tracker {
    kinds: BTreeMap<Kind, KindCache>,
    synced_sent: bool,
}

#[derive(Debug, Default)]
struct KindCache {
    objects: BTreeMap<ObjRef, Model>,
    problems: BTreeMap<ObjRef, Vec<String>>,
    /// Objects listed since `Init`, until `InitDone`.
    relisting: Option<BTreeMap<ObjRef, Converted>>,
    synced: bool,
}

fn change(kind: Kind, key: &ObjRef, model: Option<Model>) -> Change {
    match (kind, model) {
        (Kind::Namespace, Some(Model::Namespace(n))) => {
            Change::Namespace(key.name.clone(), Some(n))
        }
        (Kind::Pod, Some(Model::Pod(p))) => Change::Pod(key.clone(), Some(p)),
        (Kind::NetworkPolicy, Some(Model::Policy(p))) => Change::Policy(key.clone(), Some(p)),
        (Kind::Namespace, _) => Change::Namespace(key.name.clone(), None),
        (Kind::Pod, _) => Change::Pod(key.clone(), None),
        (Kind::NetworkPolicy, _) => Change::Policy(key.clone(), None),
    }
}

impl Tracker {
    pub fn all_synced(&self) -> bool {
        Kind::ALL
            .iter()
            .all(|k| self.kinds.get(k).is_some_and(|c| c.synced))
    }

    pub fn waiting_for(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| !self.kinds.get(k).is_some_and(|c| c.synced))
            .collect()
    }

    /// The events one watcher event leads to (none when nothing the compiler sees changed).
    pub fn on_event(&mut self, kind: Kind, ev: WatchEvent) -> Vec<SourceEvent> {
        let mut changes = Vec::new();
        let mut out = Vec::new();
        let cache = self.kinds.entry(kind).or_default();
        match ev {
            WatchEvent::Apply(c) => cache.set(c, &mut changes, &mut out),
            WatchEvent::Delete(c) => cache.remove(kind, &c.key, &mut changes, &mut out),
            WatchEvent::Init => cache.relisting = Some(BTreeMap::new()),
            WatchEvent::InitApply(c) => {
                cache
                    .relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(c.key.clone(), c);
            }
            WatchEvent::InitDone => {
                let listed = cache.relisting.take().unwrap_or_default();
                let gone: Vec<ObjRef> = cache
                    .objects
                    .keys()
                    .chain(cache.problems.keys())
                    .filter(|k| !listed.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    cache.remove(kind, &k, &mut changes, &mut out);
                }
                for (_, c) in listed {
                    cache.set(c, &mut changes, &mut out);
                }
                cache.synced = true;
            }
        }
        if !changes.is_empty() {
            out.insert(0, SourceEvent::Changes(changes));
        }
        if !self.synced_sent && self.all_synced() {
            self.synced_sent = true;
            out.push(SourceEvent::Synced);
        }
        out
    }
}

impl KindCache {
    fn set(&mut self, c: Converted, changes: &mut Vec<Change>, out: &mut Vec<SourceEvent>) {
        let Converted {
            kind,
            key,
            model,
            problems,
        } = c;
        self.note_problems(kind, &key, problems, out);
        match model {
            Some(m) => {
                if self.objects.get(&key) != Some(&m) {
                    self.objects.insert(key.clone(), m.clone());
                    changes.push(change(kind, &key, Some(m)));
                }
            }
            // Unusable now: as if absent.
            None => {
                if self.objects.remove(&key).is_some() {
                    changes.push(change(kind, &key, None));
                }
            }
        }
    }

    fn remove(
        &mut self,
        kind: Kind,
        key: &ObjRef,
        changes: &mut Vec<Change>,
        out: &mut Vec<SourceEvent>,
    ) {
        self.note_problems(kind, key, vec![], out);
        if self.objects.remove(key).is_some() {
            changes.push(change(kind, key, None));
        }
    }

    fn note_problems(
        &mut self,
        kind: Kind,
        key: &ObjRef,
        problems: Vec<String>,
        out: &mut Vec<SourceEvent>,
    ) {
        let before = self
            .problems
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if before == problems.as_slice() {
            return;
        }
        let object = kind.describe(key);
        let diags = problems
            .iter()
            .map(|m| Diagnostic {
                source: Some("api".into()),
                object: object.clone(),
                message: m.clone(),
            })
            .collect();
        if problems.is_empty() {
            self.problems.remove(key);
        } else {
            self.problems.insert(key.clone(), problems);
        }
        out.push(SourceEvent::Problems {
            object,
            problems: diags,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Namespace, Pod};

    fn ns(name: &str) -> Converted {
        Converted {
            kind: Kind::Namespace,
            key: ObjRef::new("", name),
            model: Some(Model::Namespace(Namespace {
                name: name.into(),
                labels: Default::default(),
            })),
            problems: vec![],
        }
    }

    fn pod(name: &str, ip: &str) -> Converted {
        Converted {
            kind: Kind::Pod,
            key: ObjRef::new("a", name),
            model: Some(Model::Pod(Pod {
                namespace: "a".into(),
                name: name.into(),
                labels: Default::default(),
                ips: vec![ip.parse().expect("ip")],
                node_name: None,
                host_network: false,
                terminating: false,
                finished: false,
                ports: vec![],
            })),
            problems: vec![],
        }
    }

    fn changes(out: &[SourceEvent]) -> Vec<Change> {
        out.iter()
            .flat_map(|e| match e {
                SourceEvent::Changes(c) => c.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn synced_only_after_all_three_lists_and_after_their_changes() {
        let mut t = Tracker::default();
        let mut all = Vec::new();
        for (kind, items) in [
            (Kind::Namespace, vec![ns("a")]),
            (Kind::Pod, vec![pod("p", "10.0.0.1")]),
            (Kind::NetworkPolicy, vec![]),
        ] {
            assert!(!all.contains(&SourceEvent::Synced));
            // Nothing leaves before InitDone.
            assert!(t.on_event(kind, WatchEvent::Init).is_empty());
            for c in items {
                assert!(t.on_event(kind, WatchEvent::InitApply(c)).is_empty());
            }
            all.extend(t.on_event(kind, WatchEvent::InitDone));
        }
        assert_eq!(all.last(), Some(&SourceEvent::Synced));
        assert_eq!(all.iter().filter(|e| **e == SourceEvent::Synced).count(), 1);
        assert_eq!(changes(&all).len(), 2);
        // A later re-list does not announce Synced again.
        assert!(t.on_event(Kind::Namespace, WatchEvent::Init).is_empty());
        let out = t.on_event(Kind::Namespace, WatchEvent::InitDone);
        assert_eq!(
            changes(&out),
            vec![Change::Namespace("a".into(), None)],
            "namespace not re-listed: removed"
        );
        assert!(!out.contains(&SourceEvent::Synced));
    }

    #[test]
    fn unchanged_model_sends_nothing_and_bad_objects_are_reported_then_cleared() {
        let mut t = Tracker::default();
        let out = t.on_event(Kind::Pod, WatchEvent::Apply(pod("p", "10.0.0.1")));
        assert_eq!(changes(&out).len(), 1);
        assert!(
            t.on_event(Kind::Pod, WatchEvent::Apply(pod("p", "10.0.0.1")))
                .is_empty()
        );
        let mut bad = pod("p", "10.0.0.1");
        bad.model = None;
        bad.problems = vec!["status.podIPs[0]: nope".into()];
        let out = t.on_event(Kind::Pod, WatchEvent::Apply(bad.clone()));
        assert_eq!(
            changes(&out),
            vec![Change::Pod(ObjRef::new("a", "p"), None)]
        );
        assert!(matches!(&out[1], SourceEvent::Problems { object, problems }
            if object == "Pod a/p" && problems.len() == 1));
        // Same problem again: not repeated.
        assert!(
            t.on_event(Kind::Pod, WatchEvent::Apply(bad.clone()))
                .is_empty()
        );
        // Deleted: its problems are cleared.
        let out = t.on_event(Kind::Pod, WatchEvent::Delete(bad));
        assert_eq!(
            out,
            vec![SourceEvent::Problems {
                object: "Pod a/p".into(),
                problems: vec![]
            }]
        );
    }
}
