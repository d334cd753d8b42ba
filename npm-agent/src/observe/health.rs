//! Liveness, readiness and the debug view of the agent, fed by the run loop.
//!
//! - Live: the enforcement loop ticked recently (it ticks every poll interval, also while the
//!   source is failing).
//! - Ready: the first enforcement was applied and the last run brought every map to the
//!   compiled contents. It stays ready when the cluster source is lost (the maps keep
//!   enforcing the last good state, and the body says since when the source is gone), and it
//!   is not ready while map writes fail (a full map: the body names the map and the kernel's
//!   reason; the next run retries) or while the loop says what it waits for before its first
//!   enforcement (e.g. the node's tables cannot be read).
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use std::collections::BTreeMap;

use crate::model::{ObjRef, Policy};

/// How many recent errors the debug view keeps.
pub const RECENT_ERRORS: usize = 20;

/// A probe's answer: HTTP 200 when `ok`, 503 otherwise, with `body` as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub ok: bool,
    pub body: String,
}

/// One recorded error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorRecord {
    /// RFC 3339, UTC.
    pub at: String,
    pub kind: &'static str,
    pub message: String,
}

/// What the agent enforces, by the numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub policies: usize,
    pub pods: usize,
    pub namespaces: usize,
    pub local_endpoints: usize,
    /// Entries per policy map (endpoints, identities, cidrs, policy).
    pub map_entries: std::collections::BTreeMap<&'static str, usize>,
    pub policy_problems: usize,
}

/// The debug view (`/debug/state`). Field names are a contract: extend, never rename.
#[derive(Clone, Debug, Serialize)]
pub struct DebugState {
    pub live: bool,
    pub ready: bool,
    /// RFC 3339 (UTC) of the first enforcement, if any.
    pub ready_since: Option<String>,
    /// RFC 3339 (UTC) of the last run that brought every map to the compiled contents.
    pub last_sync: Option<String>,
    pub seconds_since_last_tick: Option<f64>,
    pub source_connected: bool,
    /// RFC 3339 (UTC) since when the source fails, while it does.
    pub source_disconnected_since: Option<String>,
    pub source_error: Option<String>,
    pub counts: Counts,
    /// Oldest first, at most [`RECENT_ERRORS`].
    pub last_errors: Vec<ErrorRecord>,
    /// RFC 3339 (UTC) since when map writes fail, while they do (not ready meanwhile).
    pub maps_failing_since: Option<String>,
    /// What failed, while map writes fail: how many writes and the first one's map and reason.
    pub maps_error: Option<String>,
    /// Before the first enforcement: what the agent waits for, when it knows.
    pub waiting_for: Option<String>,
    /// Per NetworkPolicy (`namespace/name`) the agent knows: which version of its content the
    /// maps hold, and since when.
    pub policies: std::collections::BTreeMap<String, PolicyRealized>,
}

/// Where one NetworkPolicy stands (`/debug/state` `policies`). Field names are a contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyRealized {
    /// This agent process's count of the policy's contents: 1 for the first it saw, +1 each
    /// time its spec (selector, rules, policy types) changed. Not the object's
    /// `metadata.generation` (the model keeps no metadata); a restarted agent starts at 1.
    pub generation: u64,
    /// RFC 3339 (UTC): when this agent first saw this generation.
    pub seen_at: String,
    /// RFC 3339 (UTC): the first run after `seen_at` that brought every map to the compiled
    /// contents, so the datapath enforces this generation (its entries, or its failing closed
    /// when over a limit); null while map writes fail since the change.
    pub realized_at: Option<String>,
}

/// What the agent keeps per policy to tell [`PolicyRealized`].
#[derive(Debug)]
struct PolicyTrack {
    spec: Policy,
    generation: u64,
    seen_at: SystemTime,
    realized_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    last_tick: Option<Instant>,
    ready_since: Option<SystemTime>,
    last_sync: Option<SystemTime>,
    disconnected: Option<(SystemTime, String)>,
    /// Since when map writes fail, and what failed last.
    failing: Option<(SystemTime, String)>,
    waiting: Option<String>,
    counts: Counts,
    errors: VecDeque<ErrorRecord>,
    policies: BTreeMap<ObjRef, PolicyTrack>,
}

/// Shared between the run loop (writer) and the HTTP server (reader).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    stall_after: Duration,
    state: Mutex<State>,
}

impl Health {
    /// `stall_after`: how long without a tick before the agent counts as not live.
    pub fn new(stall_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            stall_after,
            state: Mutex::new(State::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            // A panic elsewhere while holding the lock: the data is plain values, still usable.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The enforcement loop went round once.
    pub fn tick(&self) {
        self.with(|s| s.last_tick = Some(Instant::now()));
    }

    /// An enforcement was applied; `failure` says what failed when some map update did
    /// (not ready until a later run succeeds), `None` when every one succeeded.
    pub fn set_ready(&self, counts: Counts, failure: Option<String>) {
        let now = SystemTime::now();
        self.with(|s| {
            s.ready_since.get_or_insert(now);
            s.waiting = None;
            match failure {
                None => {
                    s.last_sync = Some(now);
                    s.failing = None;
                }
                Some(f) => {
                    let since = s.failing.as_ref().map_or(now, |(t, _)| *t);
                    s.failing = Some((since, f));
                }
            }
            s.counts = counts;
        });
    }

    /// After a run over `policies` (the cluster's, as compiled); `in_step`: every map write
    /// of it succeeded. A policy whose spec differs from the last one seen gets the next
    /// generation, unrealized until a run is in step. One comparison per policy per run.
    /// Returns how many of `policies` are new to this agent (not tracked before).
    pub fn track_policies(&self, policies: &BTreeMap<ObjRef, Policy>, in_step: bool) -> usize {
        let now = SystemTime::now();
        let mut added = 0;
        self.with(|s| {
            s.policies.retain(|k, _| policies.contains_key(k));
            for (k, p) in policies {
                match s.policies.get_mut(k) {
                    Some(t) if t.spec == *p => {}
                    Some(t) => {
                        t.spec = p.clone();
                        t.generation += 1;
                        t.seen_at = now;
                        t.realized_at = None;
                    }
                    None => {
                        added += 1;
                        s.policies.insert(
                            k.clone(),
                            PolicyTrack {
                                spec: p.clone(),
                                generation: 1,
                                seen_at: now,
                                realized_at: None,
                            },
                        );
                    }
                }
            }
            if in_step {
                for t in s.policies.values_mut() {
                    t.realized_at.get_or_insert(now);
                }
            }
        });
        added
    }

    /// Before the first enforcement: what the agent waits for (`None`: nothing said).
    pub fn set_waiting(&self, why: Option<String>) {
        self.with(|s| {
            if s.ready_since.is_none() {
                s.waiting = why;
            }
        });
    }

    /// The source answered (`None`) or failed (`Some(error)`). Returns true when this changes
    /// the connected state.
    pub fn set_source(&self, error: Option<String>) -> bool {
        let now = SystemTime::now();
        self.with(|s| match (error, &mut s.disconnected) {
            (None, d) => d.take().is_some(),
            (Some(e), Some((_, last))) => {
                *last = e;
                false
            }
            (Some(e), d @ None) => {
                *d = Some((now, e));
                true
            }
        })
    }

    pub fn record_error(&self, kind: &'static str, message: String) {
        let at = rfc3339(SystemTime::now());
        self.with(|s| {
            if s.errors.len() == RECENT_ERRORS {
                s.errors.pop_front();
            }
            s.errors.push_back(ErrorRecord { at, kind, message });
        });
    }

    /// `/healthz`.
    pub fn liveness(&self) -> ProbeAnswer {
        let since = self.with(|s| s.last_tick).unwrap_or(self.started).elapsed();
        if since <= self.stall_after {
            ProbeAnswer {
                ok: true,
                body: format!(
                    "ok: enforcement loop ticked {:.1}s ago\n",
                    since.as_secs_f64()
                ),
            }
        } else {
            ProbeAnswer {
                ok: false,
                body: format!(
                    "stalled: enforcement loop last ticked {:.0}s ago (limit {}s)\n",
                    since.as_secs_f64(),
                    self.stall_after.as_secs()
                ),
            }
        }
    }

    /// `/readyz`.
    pub fn readiness(&self) -> ProbeAnswer {
        self.with(|s| {
            let Some(since) = s.ready_since else {
                let why = match (&s.disconnected, &s.waiting) {
                    (Some((at, e)), _) => format!("source failing since {}: {e}", rfc3339(*at)),
                    (None, Some(w)) => format!("first enforcement not applied yet: {w}"),
                    (None, None) => "first enforcement not applied yet".to_owned(),
                };
                return ProbeAnswer {
                    ok: false,
                    body: format!("not ready: {why}\n"),
                };
            };
            if let Some((at, f)) = &s.failing {
                return ProbeAnswer {
                    ok: false,
                    body: format!(
                        "not ready: map writes failing since {}: {f}; the next run retries them (enforcing since {})\n",
                        rfc3339(*at),
                        rfc3339(since)
                    ),
                };
            }
            let mut body = format!("ready: enforcing since {}", rfc3339(since));
            if let Some(t) = s.last_sync {
                body.push_str(&format!(", maps in step at {}", rfc3339(t)));
            }
            match &s.disconnected {
                Some((at, e)) => body.push_str(&format!(
                    "\nsource disconnected since {}, enforcement kept: {e}\n",
                    rfc3339(*at)
                )),
                None => body.push_str("\nsource connected\n"),
            }
            ProbeAnswer { ok: true, body }
        })
    }

    /// `/debug/state`.
    pub fn debug_state(&self) -> DebugState {
        let live = self.liveness().ok;
        let ready = self.readiness().ok;
        self.with(|s| DebugState {
            live,
            ready,
            ready_since: s.ready_since.map(rfc3339),
            last_sync: s.last_sync.map(rfc3339),
            seconds_since_last_tick: s.last_tick.map(|t| t.elapsed().as_secs_f64()),
            source_connected: s.disconnected.is_none(),
            source_disconnected_since: s.disconnected.as_ref().map(|(t, _)| rfc3339(*t)),
            source_error: s.disconnected.as_ref().map(|(_, e)| e.clone()),
            counts: s.counts.clone(),
            last_errors: s.errors.iter().cloned().collect(),
            maps_failing_since: s.failing.as_ref().map(|(t, _)| rfc3339(*t)),
            maps_error: s.failing.as_ref().map(|(_, e)| e.clone()),
            waiting_for: s.waiting.clone(),
            policies: s
                .policies
                .iter()
                .map(|(k, t)| {
                    (
                        k.to_string(),
                        PolicyRealized {
                            generation: t.generation,
                            seen_at: rfc3339(t.seen_at),
                            realized_at: t.realized_at.map(rfc3339),
                        },
                    )
                })
                .collect(),
        })
    }
}

/// `t` as RFC 3339 in UTC with second precision, e.g. `2026-11-23T09:13:53Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(1_795_426_433), "2026-11-23T09:33:53Z");
    }

    #[test]
    fn ready_after_first_apply_and_stays_ready_without_source() {
        let h = Health::new(Duration::from_secs(60));
        let r = h.readiness();
        assert!(!r.ok);
        assert!(r.body.contains("not applied yet"), "{}", r.body);

        // Source failing before anything was applied: still not ready, and says why.
        assert!(h.set_source(Some("connection refused".into())));
        let r = h.readiness();
        assert!(!r.ok && r.body.contains("connection refused"), "{}", r.body);
        assert!(h.set_source(None));

        h.set_ready(Counts::default(), None);
        let r = h.readiness();
        assert!(r.ok);
        assert!(r.body.contains("source connected"), "{}", r.body);

        assert!(h.set_source(Some("api down".into())));
        assert!(!h.set_source(Some("api still down".into())), "no change");
        let r = h.readiness();
        assert!(r.ok, "losing the source keeps enforcement and readiness");
        assert!(
            r.body.contains("source disconnected since ")
                && r.body.contains("enforcement kept: api still down"),
            "{}",
            r.body
        );
        let d = h.debug_state();
        assert!(!d.source_connected);
        assert_eq!(d.source_error.as_deref(), Some("api still down"));

        assert!(h.set_source(None));
        assert!(h.readiness().body.contains("source connected"));
        assert!(h.debug_state().source_disconnected_since.is_none());
    }

    #[test]
    fn failing_map_writes_make_it_unready_until_a_run_succeeds() {
        let h = Health::new(Duration::from_secs(60));
        h.set_waiting(Some("the node's tables cannot be read: boom".into()));
        let r = h.readiness();
        assert!(
            !r.ok && r.body.contains("tables cannot be read: boom"),
            "{}",
            r.body
        );
        assert_eq!(
            h.debug_state().waiting_for.as_deref(),
            Some("the node's tables cannot be read: boom")
        );

        let full = "3 of 10 map writes failed, first: map NPM_POLICY: insert failed: E2BIG";
        h.set_ready(Counts::default(), Some(full.into()));
        let r = h.readiness();
        assert!(!r.ok, "a failed write is not ready");
        assert!(
            r.body.contains("map writes failing since") && r.body.contains("NPM_POLICY"),
            "{}",
            r.body
        );
        let d = h.debug_state();
        assert!(!d.ready && d.waiting_for.is_none());
        assert_eq!(d.maps_error.as_deref(), Some(full));
        let since = d.maps_failing_since.clone();
        // Still failing: the first failure's time stays.
        h.set_ready(Counts::default(), Some("again".into()));
        assert_eq!(h.debug_state().maps_failing_since, since);

        h.set_ready(Counts::default(), None);
        assert!(h.readiness().ok);
        let d = h.debug_state();
        assert!(d.ready && d.maps_error.is_none() && d.maps_failing_since.is_none());
        // Waiting reasons no longer apply once enforcing.
        h.set_waiting(Some("late".into()));
        assert!(h.debug_state().waiting_for.is_none());
    }

    #[test]
    fn a_policy_is_realized_by_the_first_run_in_step_after_its_change() {
        use crate::model::Selector;
        let h = Health::new(Duration::from_secs(60));
        let policy = |rules: usize| Policy {
            namespace: "ns".into(),
            name: "p".into(),
            pod_selector: Selector::default(),
            ingress: Some(vec![Default::default(); rules]),
            egress: None,
        };
        let set = |p: Policy| BTreeMap::from([(p.obj_ref(), p)]);
        let state = |h: &Health| h.debug_state().policies.get("ns/p").cloned();

        h.track_policies(&set(policy(0)), false);
        let s = state(&h).expect("tracked");
        assert_eq!(
            (s.generation, s.realized_at.is_some()),
            (1, false),
            "a failed run"
        );
        h.track_policies(&set(policy(0)), true);
        let s = state(&h).expect("tracked");
        assert_eq!((s.generation, s.realized_at.is_some()), (1, true));
        let realized = s.realized_at.clone();
        // Unchanged: the same generation and time.
        h.track_policies(&set(policy(0)), true);
        assert_eq!(state(&h).expect("tracked").realized_at, realized);
        // Changed, and the run failed: the next generation, not realized.
        h.track_policies(&set(policy(1)), false);
        let s = state(&h).expect("tracked");
        assert_eq!((s.generation, s.realized_at), (2, None));
        h.track_policies(&set(policy(1)), true);
        assert!(state(&h).expect("tracked").realized_at.is_some());
        // Deleted: gone.
        h.track_policies(&BTreeMap::new(), true);
        assert!(state(&h).is_none());
    }

    #[test]
    fn liveness_fails_when_the_loop_stops_ticking() {
        let h = Health::new(Duration::from_millis(50));
        h.tick();
        assert!(h.liveness().ok);
        std::thread::sleep(Duration::from_millis(120));
        let l = h.liveness();
        assert!(!l.ok);
        assert!(l.body.starts_with("stalled"), "{}", l.body);
        h.tick();
        assert!(h.liveness().ok);
    }

    #[test]
    fn error_ring_keeps_the_most_recent() {
        let h = Health::new(Duration::from_secs(60));
        for i in 0..(RECENT_ERRORS + 5) {
            h.record_error("attach", format!("e{i}"));
        }
        let errors = h.debug_state().last_errors;
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert_eq!(errors[0].message, "e5");
        assert_eq!(
            errors.last().map(|e| e.message.as_str()),
            Some(format!("e{}", RECENT_ERRORS + 4).as_str())
        );
    }
}
