//! The Kubernetes API source (`source::kube`) with the real kube client against an in-test API
//! server (`common/fake_apiserver.rs`) speaking list/watch over HTTP: start-up sync, events in
//! every order, disconnects, 410 Gone and re-list, bookmarks, a slow list, invalid objects, and
//! the periodic re-list. Every test asserts the resulting `ClusterSnapshot`; one also the
//! compiled map contents. No privileges needed.
#[path = "common/fake_apiserver.rs"]
mod fake_apiserver;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fake_apiserver::{FakeApi, Res};
use npm_agent::compiler::{self, IdAllocator, addr16};
use npm_agent::k8s::watch::{Kind, WatchConfig};
use npm_agent::model::{Diagnostic, ObjRef};
use npm_agent::source::kube::{KubeHandle, KubeSource, KubeSourceConfig, SourceEvent, SourceState};
use npm_agent::state::ClusterSnapshot;
use npm_common::maps::{EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS};
use serde_json::{Value, json};

// ---- realistic objects ----

fn namespace(name: &str, labels: Value) -> Value {
    let mut l = labels;
    l["kubernetes.io/metadata.name"] = json!(name);
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": l, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn pod(ns: &str, name: &str, labels: Value, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-rs"), "uid": "x", "controller": true}]},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx:1.27",
            "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}],
            "restartPolicy": "Always", "serviceAccountName": "default"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.10",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}],
            "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "nginx:1.27", "imageID": "sha256:1", "started": true, "state": {"running": {"startedAt": "2026-01-01T00:00:04Z"}}}]}})
}

/// Ingress to `app=<target>` from `app=<from>` on TCP 80.
fn policy(ns: &str, name: &str, target: &str, from: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                         "ports": [{"protocol": "TCP", "port": 80}]}]}})
}

// ---- harness ----

static SEQ: AtomicU32 = AtomicU32::new(0);

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The source under test and what it has sent so far, applied as the agent applies it.
struct Harness {
    handle: KubeHandle,
    snapshot: ClusterSnapshot,
    synced: bool,
    events: Vec<SourceEvent>,
    problems: BTreeMap<String, Vec<Diagnostic>>,
    _kubeconfig: RemoveOnDrop,
}

fn fast(page_size: Option<u32>) -> KubeSourceConfig {
    KubeSourceConfig {
        watch: WatchConfig {
            page_size,
            watch_timeout_secs: 30,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
        },
        relist_every: None,
        channel: 64,
        state_tick: Duration::from_millis(50),
    }
}

async fn start(api: &FakeApi, config: KubeSourceConfig) -> Harness {
    // NPM_TEST_LOG=debug shows the source's and kube's logs when a test fails.
    if let Ok(filter) = std::env::var("NPM_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let path = std::env::temp_dir().join(format!(
        "npm-kubetest-{}-{}.yaml",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    api.write_kubeconfig(&path);
    let source = KubeSource::connect(Some(&path), config)
        .await
        .expect("client from kubeconfig");
    Harness {
        handle: source.spawn(),
        snapshot: ClusterSnapshot::default(),
        synced: false,
        events: Vec::new(),
        problems: BTreeMap::new(),
        _kubeconfig: RemoveOnDrop(path),
    }
}

impl Harness {
    fn take(&mut self, ev: SourceEvent) {
        match &ev {
            SourceEvent::Changes(cs) => {
                for c in cs {
                    self.snapshot.apply(c);
                }
            }
            SourceEvent::Problems { object, problems } => {
                if problems.is_empty() {
                    self.problems.remove(object);
                } else {
                    self.problems.insert(object.clone(), problems.clone());
                }
            }
            SourceEvent::Synced => {
                assert!(!self.synced, "Synced sent twice");
                self.synced = true;
            }
        }
        self.events.push(ev);
    }

    /// Receives events until `done` holds (true) or `secs` pass (false).
    async fn until(&mut self, secs: u64, done: impl Fn(&Harness) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.handle.events.recv()).await {
                Ok(Some(ev)) => self.take(ev),
                Ok(None) => panic!("source stopped"),
                Err(_) => return done(self),
            }
        }
    }

    /// Receives whatever arrives within `ms`.
    async fn settle(&mut self, ms: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.handle.events.recv()).await
        {
            self.take(ev);
        }
    }

    async fn state_until(&mut self, secs: u64, want: impl Fn(&SourceState) -> bool) -> SourceState {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let cur = self.handle.state.borrow().clone();
            if want(&cur) {
                return cur;
            }
            // Keep the channel drained so the source is never blocked on it.
            self.settle(50).await;
            if tokio::time::Instant::now() > deadline {
                return self.handle.state.borrow().clone();
            }
        }
    }

    fn pod_labels(&self, ns: &str, name: &str) -> Option<String> {
        self.snapshot
            .pods
            .get(&ObjRef::new(ns, name))
            .map(|p| format!("{:?}", p.labels))
    }
}

fn obj(ns: &str, name: &str) -> ObjRef {
    ObjRef::new(ns, name)
}

fn lists_of(api: &FakeApi, res: Res) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.res == Some(res) && r.is_list())
        .count()
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_every_list_then_compiles_the_complete_view() {
    let api = FakeApi::start();
    api.apply(namespace("shop", json!({"team": "shop"})));
    api.apply(namespace("ops", json!({})));
    api.apply(pod(
        "shop",
        "web",
        json!({"app": "web"}),
        "10.1.0.2",
        "node-1",
    ));
    api.apply(pod(
        "shop",
        "client",
        json!({"app": "client"}),
        "10.1.0.3",
        "node-1",
    ));
    api.apply(pod(
        "shop",
        "other",
        json!({"app": "other"}),
        "10.1.0.4",
        "node-2",
    ));
    api.apply(pod(
        "ops",
        "tool",
        json!({"app": "client"}),
        "10.1.0.5",
        "node-2",
    ));
    api.apply(policy("shop", "web-from-client", "web", "client"));
    // The policy list is slow: enforcing before it arrives would leave `web` open.
    api.set_list_delay(Res::NetworkPolicies, Duration::from_millis(1500));

    // Pages of 2: the pod list takes several requests.
    let mut h = start(&api, fast(Some(2))).await;
    h.settle(900).await;
    assert!(!h.synced, "synced before the policy list arrived");
    match h.handle.state.borrow().clone() {
        SourceState::Syncing { waiting_for, .. } => {
            assert_eq!(waiting_for, vec![Kind::NetworkPolicy])
        }
        other => panic!("expected Syncing, got {other:?}"),
    }
    assert!(h.snapshot.policies.is_empty());
    assert_eq!(h.snapshot.pods.len(), 4, "pods listed (all pages) already");

    assert!(h.until(10, |h| h.synced).await, "never synced");
    // Synced comes after the last list's changes.
    assert_eq!(h.events.last(), Some(&SourceEvent::Synced));
    assert!(h.state_until(5, SourceState::is_synced).await.is_synced());
    assert_eq!(
        h.snapshot.namespaces.keys().collect::<Vec<_>>(),
        ["ops", "shop"]
    );
    assert_eq!(h.snapshot.namespaces["shop"].labels["team"], "shop");
    assert_eq!(h.snapshot.pods.len(), 4);
    let web = &h.snapshot.pods[&obj("shop", "web")];
    assert_eq!(
        web.ips,
        vec!["10.1.0.2".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(web.node_name.as_deref(), Some("node-1"));
    assert_eq!(web.ports[0].name.as_deref(), Some("http"));
    assert!(
        h.snapshot
            .policies
            .contains_key(&obj("shop", "web-from-client"))
    );
    let pod_lists = api
        .requests()
        .iter()
        .filter(|r| r.res == Some(Res::Pods) && r.is_list())
        .map(|r| r.query.get("continue").cloned())
        .collect::<Vec<_>>();
    assert_eq!(pod_lists.len(), 2, "4 pods in pages of 2: {pod_lists:?}");
    assert!(pod_lists[1].is_some(), "second page asked with continue");

    // The compiled maps: node-1's pods are local (ifindex 11, 12); web is isolated for
    // ingress and admits client's identity on TCP 80 only; `ops/tool` (app=client in another
    // namespace) is not admitted.
    let mut snap = h.snapshot.clone();
    snap.local = [(obj("shop", "web"), 11), (obj("shop", "client"), 12)].into();
    let compiled = compiler::compile(&snap, &mut IdAllocator::default());
    let maps = &compiled.maps;
    assert_eq!(maps.endpoints.len(), 2);
    assert_eq!(maps.endpoints[&11].flags, EP_ISOLATE_INGRESS);
    assert_eq!(
        maps.endpoints[&12].flags & (EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS),
        0
    );
    let id = |ip: &str| maps.identities[&addr16(ip.parse().expect("ip"))].id;
    let web_id = maps.endpoints[&11].id;
    let allowed: Vec<_> = maps
        .policy
        .iter()
        .filter(|((_, k), _)| k.local_id == web_id)
        .map(|((_, k), _)| (k.peer_id, k.proto, u16::from_be(k.dport_be)))
        .collect();
    assert_eq!(
        allowed,
        vec![(id("10.1.0.3"), 6, 80)],
        "only client on TCP 80"
    );
    assert_ne!(
        id("10.1.0.5"),
        id("10.1.0.3"),
        "ops/tool is another identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_any_order_reach_the_right_view_and_churn_sends_nothing() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    let mut h = start(&api, fast(None)).await;
    assert!(h.until(10, |h| h.synced).await);

    // A policy and a pod before their namespace exists.
    api.apply(policy("late", "p", "web", "client"));
    api.apply(pod("late", "web", json!({"app": "web"}), "10.2.0.2", "n"));
    assert!(
        h.until(10, |h| h.snapshot.policies.contains_key(&obj("late", "p"))
            && h.snapshot.pods.contains_key(&obj("late", "web")))
            .await
    );
    assert!(!h.snapshot.namespaces.contains_key("late"));
    api.apply(namespace("late", json!({"env": "prod"})));
    assert!(
        h.until(10, |h| h.snapshot.namespaces.contains_key("late"))
            .await
    );
    assert_eq!(h.snapshot.namespaces["late"].labels["env"], "prod");

    // Status churn that does not change the model: nothing sent. A namespace change after it
    // marks the end.
    let before = h.events.len();
    let mut churn = pod("late", "web", json!({"app": "web"}), "10.2.0.2", "n");
    churn["status"]["conditions"][0]["lastTransitionTime"] = json!("2026-01-01T01:00:00Z");
    churn["status"]["containerStatuses"][0]["restartCount"] = json!(3);
    api.apply(churn);
    api.apply(namespace("marker", json!({})));
    assert!(
        h.until(10, |h| h.snapshot.namespaces.contains_key("marker"))
            .await
    );
    let sent: Vec<_> = h.events[before..].to_vec();
    assert_eq!(
        sent,
        vec![SourceEvent::Changes(vec![
            npm_agent::state::Change::Namespace(
                "marker".into(),
                Some(h.snapshot.namespaces["marker"].clone())
            )
        ])],
        "pod churn sent something"
    );

    // Relabel, then delete the namespace's objects in the reverse order of creation.
    api.apply(pod(
        "late",
        "web",
        json!({"app": "web", "v": "2"}),
        "10.2.0.2",
        "n",
    ));
    assert!(
        h.until(10, |h| h
            .pod_labels("late", "web")
            .is_some_and(|l| l.contains("\"v\"")))
            .await
    );
    // A pod going terminating (deletionTimestamp) is a model change.
    let mut term = pod(
        "late",
        "web",
        json!({"app": "web", "v": "2"}),
        "10.2.0.2",
        "n",
    );
    term["metadata"]["deletionTimestamp"] = json!("2026-01-01T02:00:00Z");
    api.apply(term);
    assert!(
        h.until(10, |h| h
            .snapshot
            .pods
            .get(&obj("late", "web"))
            .is_some_and(|p| p.terminating))
            .await
    );
    api.delete("Namespace", "", "late");
    api.delete("Pod", "late", "web");
    api.delete("NetworkPolicy", "late", "p");
    assert!(
        h.until(10, |h| !h.snapshot.namespaces.contains_key("late")
            && h.snapshot.pods.is_empty()
            && h.snapshot.policies.is_empty())
            .await
    );
    assert_eq!(
        h.snapshot.namespaces.keys().collect::<Vec<_>>(),
        ["a", "marker"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_from_its_version_and_a_lost_server_flushes_nothing() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(pod("a", "p1", json!({"app": "x"}), "10.3.0.1", "n"));
    api.apply(policy("a", "pol", "x", "y"));
    let mut h = start(&api, fast(None)).await;
    assert!(h.until(10, |h| h.synced).await);
    let full = h.snapshot.clone();
    let lists_before = lists_of(&api, Res::Pods);

    // The watch connections break; a pod added meanwhile arrives through the resumed watch.
    api.drop_watches();
    api.apply(pod("a", "p2", json!({"app": "x"}), "10.3.0.2", "n"));
    assert!(
        h.until(10, |h| h.snapshot.pods.contains_key(&obj("a", "p2")))
            .await
    );
    assert_eq!(
        lists_of(&api, Res::Pods),
        lists_before,
        "no re-list after a plain disconnect"
    );
    let last_pod_watch = api
        .requests()
        .into_iter()
        .rfind(|r| r.res == Some(Res::Pods) && r.is_watch())
        .expect("pod watch");
    assert!(
        last_pod_watch.resource_version().expect("rv") < api.resource_version(),
        "resumed from the version it had seen"
    );

    // The API server goes away: state says so, the view stays, nothing is removed.
    let with_p2 = h.snapshot.clone();
    api.set_down(true);
    let st = h
        .state_until(10, |s| matches!(s, SourceState::Disconnected { .. }))
        .await;
    let SourceState::Disconnected { since, error } = st else {
        panic!("expected Disconnected, got {st:?}");
    };
    assert!(since <= std::time::SystemTime::now());
    assert!(!error.is_empty());
    h.settle(1000).await;
    assert_eq!(
        h.snapshot, with_p2,
        "nothing changed while the server was down"
    );
    assert!(
        h.snapshot.policies.len() == full.policies.len() && h.snapshot.pods.len() == 2,
        "no flush"
    );
    // Still disconnected, same `since`.
    match h.handle.state.borrow().clone() {
        SourceState::Disconnected { since: s2, .. } => assert_eq!(s2, since),
        other => panic!("expected Disconnected, got {other:?}"),
    }

    // Back: a change made just before is delivered, and the state recovers.
    api.set_down(false);
    api.apply(pod("a", "p1", json!({"app": "moved"}), "10.3.0.1", "n"));
    assert!(
        h.until(15, |h| h
            .pod_labels("a", "p1")
            .is_some_and(|l| l.contains("moved")))
            .await
    );
    assert!(h.state_until(10, SourceState::is_synced).await.is_synced());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_forces_a_relist_that_removes_what_vanished() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(namespace("b", json!({})));
    for i in 1..=3 {
        api.apply(pod(
            "a",
            &format!("p{i}"),
            json!({"app": "x"}),
            &format!("10.4.0.{i}"),
            "n",
        ));
    }
    api.apply(policy("a", "pol", "x", "y"));
    let mut h = start(&api, fast(None)).await;
    assert!(h.until(10, |h| h.synced).await);
    assert_eq!(h.snapshot.pods.len(), 3);

    // While the watches are down, the cluster changes and its history is compacted away.
    api.set_down(true);
    h.state_until(10, |s| matches!(s, SourceState::Disconnected { .. }))
        .await;
    api.delete("Pod", "a", "p2");
    api.apply(pod("a", "p3", json!({"app": "y"}), "10.4.0.3", "n"));
    api.apply(pod("a", "p4", json!({"app": "x"}), "10.4.0.4", "n"));
    api.delete("NetworkPolicy", "a", "pol");
    api.delete("Namespace", "", "b");
    api.compact();
    // The first re-list attempt is itself answered 410 (expired continue); it is retried.
    api.expire_next_lists(1);
    let lists_before: usize = [Res::Namespaces, Res::Pods, Res::NetworkPolicies]
        .iter()
        .map(|r| lists_of(&api, *r))
        .sum();
    api.set_down(false);

    let want_pods = [obj("a", "p1"), obj("a", "p3"), obj("a", "p4")];
    assert!(
        h.until(15, |h| h.snapshot.pods.keys().eq(want_pods.iter())
            && h.snapshot.policies.is_empty()
            && !h.snapshot.namespaces.contains_key("b"))
            .await,
        "after the re-list: {:?}\nevents: {:#?}\nrequests: {:#?}",
        h.snapshot,
        h.events,
        api.requests()
    );
    assert!(h.pod_labels("a", "p3").expect("p3").contains("\"y\""));
    let lists_after: usize = [Res::Namespaces, Res::Pods, Res::NetworkPolicies]
        .iter()
        .map(|r| lists_of(&api, *r))
        .sum();
    assert!(
        lists_after >= lists_before + 4,
        "3 re-lists + the expired one: {lists_before} -> {lists_after}"
    );
    // The removals came as one batch with the re-list's other changes, never as a flush:
    // p1 was never removed.
    let p1_removed = h.events.iter().any(|e| {
        matches!(e, SourceEvent::Changes(cs)
        if cs.iter().any(|c| *c == npm_agent::state::Change::Pod(obj("a", "p1"), None)))
    });
    assert!(!p1_removed, "an unchanged pod was removed and re-added");
    assert!(h.state_until(10, SourceState::is_synced).await.is_synced());

    // A 410 on an open watch (the server expires it) also re-lists, and objects changed in
    // between arrive.
    api.expire_watches();
    api.apply(pod("a", "p5", json!({"app": "x"}), "10.4.0.5", "n"));
    assert!(
        h.until(10, |h| h.snapshot.pods.contains_key(&obj("a", "p5")))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_let_a_quiet_watch_resume_after_compaction_without_relisting() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(pod("a", "p1", json!({"app": "x"}), "10.5.0.1", "n"));
    let mut h = start(&api, fast(None)).await;
    assert!(h.until(10, |h| h.synced).await);
    // Other kinds move the global resourceVersion on; the pod watch sees none of it...
    for i in 0..5 {
        api.apply(namespace(&format!("n{i}"), json!({})));
    }
    assert!(h.until(10, |h| h.snapshot.namespaces.len() == 6).await);
    // ...until a bookmark carries the current version to it.
    let bm = api.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.compact();
    let pod_lists = lists_of(&api, Res::Pods);
    api.drop_watches();
    api.apply(pod("a", "p2", json!({"app": "x"}), "10.5.0.2", "n"));
    assert!(
        h.until(10, |h| h.snapshot.pods.contains_key(&obj("a", "p2")))
            .await
    );
    assert_eq!(
        lists_of(&api, Res::Pods),
        pod_lists,
        "the pod watch re-listed"
    );
    let watches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.res == Some(Res::Pods) && r.is_watch())
        .collect();
    let last = watches.last().expect("pod watch");
    assert_eq!(
        last.resource_version(),
        Some(bm),
        "resumed from the bookmark"
    );
    assert_eq!(
        last.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_reported_and_never_stop_the_rest() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(pod("a", "good", json!({"app": "x"}), "10.6.0.1", "n"));
    api.apply(pod("a", "bad", json!({"app": "x"}), "10.6.0.999", "n"));
    // One rule uses ICMP as a port protocol: dropped, the policy still isolates (fail closed).
    let mut half = policy("a", "half", "x", "y");
    half["spec"]["ingress"]
        .as_array_mut()
        .expect("rules")
        .push(json!({"ports": [{"protocol": "ICMP", "port": 1}]}));
    api.apply(half);
    // An invalid podSelector: cannot say whom it isolates, so it isolates the whole
    // namespace both ways (fail closed).
    let mut broken = policy("a", "broken", "x", "y");
    broken["spec"]["podSelector"] =
        json!({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]});
    api.apply(broken);
    let mut h = start(&api, fast(None)).await;
    assert!(h.until(10, |h| h.synced).await);

    assert!(h.snapshot.pods.contains_key(&obj("a", "good")));
    // Kept without the address it cannot read (left out, its interface would be unenforced).
    assert!(h.snapshot.pods[&obj("a", "bad")].ips.is_empty());
    let half = &h.snapshot.policies[&obj("a", "half")];
    assert_eq!(
        half.ingress.as_ref().expect("isolates ingress").len(),
        1,
        "bad rule dropped"
    );
    // An unreadable podSelector fails closed: the whole namespace, isolated both ways.
    let broken = &h.snapshot.policies[&obj("a", "broken")];
    assert_eq!(broken.ingress.as_deref(), Some(&[][..]));
    assert_eq!(broken.egress.as_deref(), Some(&[][..]));
    assert!(broken.pod_selector.match_labels.is_empty());
    assert!(broken.pod_selector.match_expressions.is_empty());
    let bad = &h.problems["Pod a/bad"];
    assert!(bad[0].message.contains("10.6.0.999"), "{bad:?}");
    assert_eq!(bad[0].source.as_deref(), Some("api"));
    assert!(
        h.problems["NetworkPolicy a/half"][0]
            .message
            .contains("ICMP")
    );
    assert!(
        h.problems["NetworkPolicy a/broken"]
            .iter()
            .any(|d| d.message.contains("Near"))
    );

    // Fixed: the pod gets its address and its problem is withdrawn.
    api.apply(pod("a", "bad", json!({"app": "x"}), "10.6.0.9", "n"));
    let fixed: Vec<IpAddr> = vec!["10.6.0.9".parse().expect("ip")];
    assert!(
        h.until(10, |h| h
            .snapshot
            .pods
            .get(&obj("a", "bad"))
            .is_some_and(|p| p.ips == fixed)
            && !h.problems.contains_key("Pod a/bad"))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_relist_repairs_a_missed_event() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(pod("a", "p1", json!({"app": "x"}), "10.7.0.1", "n"));
    let mut cfg = fast(None);
    cfg.relist_every = Some(Duration::from_millis(1500));
    let mut h = start(&api, cfg).await;
    assert!(h.until(10, |h| h.synced).await);
    let lists = lists_of(&api, Res::Pods);
    // An event the watch never delivers (lost): only a full list can find it.
    api.apply_silently(pod("a", "p1", json!({"app": "drifted"}), "10.7.0.1", "n"));
    assert!(
        h.until(10, |h| h
            .pod_labels("a", "p1")
            .is_some_and(|l| l.contains("drifted")))
            .await,
        "periodic re-list did not repair"
    );
    assert!(lists_of(&api, Res::Pods) > lists);
    assert!(h.synced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_at_start_keeps_syncing_with_the_error_then_syncs() {
    let api = FakeApi::start();
    api.apply(namespace("a", json!({})));
    api.apply(pod("a", "p1", json!({"app": "x"}), "10.8.0.1", "n"));
    api.set_down(true);
    let mut h = start(&api, fast(None)).await;
    let st = h
        .state_until(10, |s| {
            matches!(
                s,
                SourceState::Syncing {
                    last_error: Some(_),
                    ..
                }
            )
        })
        .await;
    match st {
        SourceState::Syncing {
            waiting_for,
            last_error: Some(e),
        } => {
            assert_eq!(waiting_for.len(), 3, "{waiting_for:?}");
            assert!(e.contains("watch"), "{e}");
        }
        other => panic!("expected Syncing with an error, got {other:?}"),
    }
    h.settle(500).await;
    assert!(
        !h.synced && h.snapshot.pods.is_empty(),
        "nothing before the first list"
    );
    api.set_down(false);
    assert!(h.until(10, |h| h.synced).await);
    assert!(h.snapshot.pods.contains_key(&obj("a", "p1")));
    assert!(h.state_until(5, SourceState::is_synced).await.is_synced());
}

/// Sizes and timings, printed (debug build): 5000 pods listed in pages of 500, then 200 pod
/// events one after another, each waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pods_sync_and_each_event_arrives() {
    let api = FakeApi::start();
    for n in 0..50 {
        api.apply(namespace(&format!("ns{n}"), json!({})));
    }
    for i in 0..5000u32 {
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        api.apply(pod(
            &format!("ns{}", i % 50),
            &format!("p{i}"),
            json!({"app": format!("a{}", i % 7)}),
            &ip,
            "n",
        ));
    }
    for n in 0..50 {
        api.apply(policy(&format!("ns{n}"), "pol", "a1", "a2"));
    }
    let t0 = std::time::Instant::now();
    let mut h = start(&api, fast(Some(500))).await;
    assert!(h.until(60, |h| h.synced).await);
    let sync = t0.elapsed();
    assert_eq!(h.snapshot.pods.len(), 5000);
    assert_eq!(h.snapshot.policies.len(), 50);
    assert_eq!(lists_of(&api, Res::Pods), 10, "5000 pods in pages of 500");

    let mut worst = Duration::ZERO;
    let t1 = std::time::Instant::now();
    for i in 0..200u32 {
        let t = std::time::Instant::now();
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        api.apply(pod(
            &format!("ns{}", i % 50),
            &format!("p{i}"),
            json!({"app": "moved"}),
            &ip,
            "n",
        ));
        let key = obj(&format!("ns{}", i % 50), &format!("p{i}"));
        assert!(
            h.until(10, |h| h
                .snapshot
                .pods
                .get(&key)
                .is_some_and(|p| p.labels["app"] == "moved"))
                .await
        );
        worst = worst.max(t.elapsed());
    }
    let events = t1.elapsed();
    eprintln!(
        "kube source: 5000 pods + 50 ns + 50 policies synced in {} ms; 200 pod events one by one: {} us mean, {} us worst (debug build)",
        sync.as_millis(),
        events.as_micros() / 200,
        worst.as_micros()
    );
}

/// Every order of creating a namespace, two pods and a policy, then every order of deleting
/// them, each through the watch (one event per object): the source's view after the last event
/// is the same whatever the order, and equals the view a fresh list of the same objects gives.
/// (The compiler turns equal views into equal maps: `incremental_equals_a_fresh_compile_after_
/// every_random_change` in `compiler/tests/incremental.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_of_creation_and_deletion_gives_the_same_view() {
    let objects = [
        namespace("o", json!({"env": "prod"})),
        pod("o", "web", json!({"app": "web"}), "10.12.0.2", "n"),
        pod("o", "client", json!({"app": "client"}), "10.12.0.3", "n"),
        policy("o", "p", "web", "client"),
    ];
    let key = |o: &Value| {
        (
            o["kind"].as_str().unwrap_or_default().to_string(),
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    // The reference: everything listed at start-up.
    let listed = {
        let api = FakeApi::start();
        for o in &objects {
            api.apply(o.clone());
        }
        let mut h = start(&api, fast(None)).await;
        assert!(h.until(10, |h| h.synced).await);
        h.snapshot.clone()
    };
    assert_eq!(listed.pods.len(), 2);
    assert_eq!(listed.policies.len(), 1);
    assert!(listed.namespaces.contains_key("o"));
    assert!(
        listed
            .pods
            .values()
            .all(|p| p.node_name.as_deref() == Some("n"))
    );

    // The objects (not the snapshot's change counter).
    let view = |s: &ClusterSnapshot| (s.namespaces.clone(), s.pods.clone(), s.policies.clone());
    let listed = view(&listed);
    let empty = view(&ClusterSnapshot::default());
    let mut orders = 0;
    let mut perm = [0usize, 1, 2, 3];
    loop {
        let api = FakeApi::start();
        let mut h = start(&api, fast(None)).await;
        assert!(h.until(10, |h| h.synced).await);
        for &i in &perm {
            api.apply(objects[i].clone());
        }
        assert!(
            h.until(10, |h| view(&h.snapshot) == listed).await,
            "created in order {perm:?}: {:?}\nexpected {listed:?}",
            h.snapshot
        );
        // Deleted in the same order (the namespace first in 6 of them).
        for &i in &perm {
            let (kind, ns, name) = key(&objects[i]);
            api.delete(&kind, &ns, &name);
        }
        assert!(
            h.until(10, |h| view(&h.snapshot) == empty).await,
            "deleted in order {perm:?}: {:?}",
            h.snapshot
        );
        orders += 1;
        // Next permutation in lexicographic order.
        let Some(i) = (0..perm.len() - 1).rev().find(|&i| perm[i] < perm[i + 1]) else {
            break;
        };
        let j = (i + 1..perm.len())
            .rev()
            .find(|&j| perm[j] > perm[i])
            .expect("a larger element");
        perm.swap(i, j);
        perm[i + 1..].reverse();
    }
    assert_eq!(orders, 24);
}
