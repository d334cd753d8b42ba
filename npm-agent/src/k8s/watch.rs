//! kube-runtime watchers for the three kinds the agent needs, already converted to the model:
//! the rest of the agent never sees a k8s-openapi type.
//!
//! Each stream is `kube::runtime::watcher` (list, then watch from the list's resourceVersion;
//! re-watch from the last seen version after a dropped connection; full re-list after 410
//! Gone) behind a [`StreamBackoff`] so errors are retried with exponential backoff and jitter.
use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::runtime::utils::{Backoff, StreamBackoff};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::convert;
use crate::model::{Namespace, ObjRef, Pod, Policy};

/// The kinds the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// `Kind namespace/name`, or `Namespace name`: how diagnostics name an object.
    pub fn describe(self, key: &ObjRef) -> String {
        match self {
            Kind::Namespace => format!("Namespace {}", key.name),
            k => format!("{} {key}", k.as_str()),
        }
    }
}

/// One object converted to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Model {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Policy),
}

/// An object as the watcher saw it, converted. `model` is `None` when the object cannot be
/// used at all (it then counts as absent); `problems` lists what is wrong with it, also when a
/// policy is kept with a rule dropped (fail closed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub kind: Kind,
    /// namespace/name; the namespace is empty for Namespaces.
    pub key: ObjRef,
    pub model: Option<Model>,
    pub problems: Vec<String>,
}

/// A watcher event with the object converted (`kube::runtime::watcher::Event`, same meaning).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Apply(Converted),
    Delete(Converted),
    /// A (re-)list starts: `InitApply` events follow, then `InitDone`.
    Init,
    InitApply(Converted),
    /// The list is complete: anything not listed since `Init` is gone.
    InitDone,
}

pub type WatchStream = BoxStream<'static, (Kind, Result<WatchEvent, watcher::Error>)>;

/// Tuning of the watch streams.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Objects per list page (`limit`); `None` lists in one response.
    pub page_size: Option<u32>,
    /// Server-side timeout of one watch request, seconds (the client gives up on a silent
    /// connection 5 s after it).
    pub watch_timeout_secs: u32,
    /// First and largest delay between retries after an error.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        // kube's DefaultBackoff: 0.8 s doubling up to 30 s.
        Self {
            page_size: Some(500),
            watch_timeout_secs: 290,
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Exponential backoff with up to 25% jitter (so the nodes of a cluster do not all re-list at
/// the same instant after an API server restart). Reset by the stream on every success.
#[derive(Clone, Debug)]
pub struct ExpBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl ExpBackoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }
}

impl Iterator for ExpBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(base + jitter)
    }
}

impl Backoff for ExpBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The three watch streams (Namespaces, Pods, NetworkPolicies), cluster-wide.
pub fn watch_all(client: &Client, cfg: &WatchConfig) -> [WatchStream; 3] {
    [
        stream::<core::Namespace>(Api::all(client.clone()), Kind::Namespace, cfg),
        stream::<core::Pod>(Api::all(client.clone()), Kind::Pod, cfg),
        stream::<net::NetworkPolicy>(Api::all(client.clone()), Kind::NetworkPolicy, cfg),
    ]
}

fn stream<K>(api: Api<K>, kind: Kind, cfg: &WatchConfig) -> WatchStream
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static + Convert,
{
    let mut wc = watcher::Config::default().timeout(cfg.watch_timeout_secs);
    wc.page_size = cfg.page_size;
    let backoff = ExpBackoff::new(cfg.backoff_min, cfg.backoff_max);
    StreamBackoff::new(watcher(api, wc), backoff)
        .map(move |r| {
            let ev = r.map(|e| match e {
                Event::Apply(o) => WatchEvent::Apply(o.convert()),
                Event::Delete(o) => WatchEvent::Delete(o.convert()),
                Event::Init => WatchEvent::Init,
                Event::InitApply(o) => WatchEvent::InitApply(o.convert()),
                Event::InitDone => WatchEvent::InitDone,
            });
            (kind, ev)
        })
        .boxed()
}

/// A watched k8s-openapi type and its conversion.
pub trait Convert {
    fn convert(&self) -> Converted;
}

fn key_of(namespace: Option<&String>, name: Option<&String>, kind: Kind) -> ObjRef {
    let ns = match kind {
        Kind::Namespace => String::new(),
        _ => namespace.cloned().unwrap_or_else(|| "default".into()),
    };
    ObjRef::new(ns, name.cloned().unwrap_or_default())
}

impl Convert for core::Namespace {
    fn convert(&self) -> Converted {
        let kind = Kind::Namespace;
        let key = key_of(None, self.metadata.name.as_ref(), kind);
        let (model, problems) = match convert::namespace(self) {
            Ok(n) => (Some(Model::Namespace(n)), vec![]),
            Err(e) => (None, vec![e.to_string()]),
        };
        Converted {
            kind,
            key,
            model,
            problems,
        }
    }
}

impl Convert for core::Pod {
    fn convert(&self) -> Converted {
        let kind = Kind::Pod;
        let m = &self.metadata;
        let key = key_of(m.namespace.as_ref(), m.name.as_ref(), kind);
        let (model, problems) = match convert::pod(self) {
            Ok((p, problems)) => (
                Some(Model::Pod(p)),
                problems.iter().map(ToString::to_string).collect(),
            ),
            Err(e) => (None, vec![format!("{e}; pod skipped")]),
        };
        Converted {
            kind,
            key,
            model,
            problems,
        }
    }
}

impl Convert for net::NetworkPolicy {
    fn convert(&self) -> Converted {
        let kind = Kind::NetworkPolicy;
        let m = &self.metadata;
        let key = key_of(m.namespace.as_ref(), m.name.as_ref(), kind);
        let (policy, problems) = convert::policy(self);
        let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        if policy.is_none() {
            problems.push("policy skipped: it has no name".into());
        }
        Converted {
            kind,
            key,
            model: policy.map(Model::Policy),
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut b = ExpBackoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let got: Vec<Duration> = (0..5).map(|_| b.next().expect("endless")).collect();
        let bases = [100, 200, 400, 400, 400];
        for (d, base) in got.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(*d >= base && *d <= base.mul_f64(1.25), "{d:?} vs {base:?}");
        }
        b.reset();
        assert!(b.next().expect("endless") <= Duration::from_millis(125));
    }

    #[test]
    fn bad_pod_field_is_left_out_with_a_reason_and_bad_policy_rule_fails_closed() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "a"},
            "status": {"podIP": "not-an-ip"}
        }))
        .expect("pod");
        let c = pod.convert();
        assert_eq!(c.key, ObjRef::new("a", "p"));
        // Kept without the address: a pod left out would leave its interface unenforced.
        match &c.model {
            Some(Model::Pod(p)) => assert!(p.ips.is_empty(), "{p:?}"),
            other => panic!("the pod is kept: {other:?}"),
        }
        assert!(c.problems[0].contains("not-an-ip"), "{:?}", c.problems);
        assert!(
            c.problems[0].contains("kept without it"),
            "{:?}",
            c.problems
        );

        let np: net::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "np", "namespace": "a"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}
        }))
        .expect("policy");
        let c = np.convert();
        match &c.model {
            Some(Model::Policy(p)) => {
                assert_eq!(p.ingress.as_deref(), Some(&[][..]), "bad rule dropped")
            }
            other => panic!("policy kept, got {other:?}"),
        }
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    }
}
