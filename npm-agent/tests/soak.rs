//! The soak: `npm-agent run --kubeconfig` as a process in a lab node's network namespace,
//! against the in-test API server, SIGKILLed at seeded random points while a seeded random
//! sequence of API changes runs and real traffic flows (issue 22). `cargo xtask soak`.
//!
//! The invariants come from the policies' meaning, never from a run's output. The fixed
//! policies (`fixed_objects`) make:
//! - pairs denied in every state (`DENIED`): their target is isolated in that direction and
//!   no policy, fixed or churned, ever admits the source to it;
//! - pairs allowed in every state (`ALLOWED`);
//! - two established TCP connections of ingress-isolated clients (`TALKS`), on which the
//!   server sends a message every 100 ms: they reach the client only as a tracked flow's
//!   replies (see `push`).
//!
//! The churn (`Churn::change`) only ever touches what cannot change those: policies that
//! select the spare pods, or that admit only `kind=remote` pods (node-2, never local) and
//! the remote pods' range to the invariant pods; the invariant pods' own policies rewritten
//! with more ports (PAIRS inline and trie forms) but the same meaning for the probed ports;
//! spare and remote pods created, deleted, relabelled; the namespaces' `team` label (new
//! identities for every pod of the namespace, invariant pods included).
//!
//! Each round: the agent is ready (`/readyz` 200); every allowed pair connects (first try
//! counted, a bounded retry asserted); churn, and at a seeded random point SIGKILL the agent
//! (by the pid of the child we started; nsenter execs it) and start it again at once, in some
//! rounds killing it again during its start-up. Throughout: denied probers (a TCP connect
//! every ~50 ms per pair; a connection or a refusal is a packet that got through) and the
//! talkers. Asserted: no denied probe passed, no established connection missed a message,
//! every allowed pair connects within `ALLOWED_WITHIN` of each ready. Privileged (root).
//! Checked by hand: deleting every `NPM_CT4` entry (bpftool) during a run makes it fail with
//! both connections' next message missing.
//!
//! `soak_smoke` runs in `cargo test` (CI: a few kills within ~60-90 s); `soak_full` is
//! ignored and run by `cargo xtask soak --size full`. `NPM_SOAK_SEED` fixes the seed (the
//! churn and kill schedule; where a kill lands in the agent's work still depends on timing);
//! `NPM_SOAK_KEEP_LOGS=1` keeps the agents' logs (their directory is printed).
#[path = "common/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "common/http.rs"]
mod http;
#[path = "common/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApi;
use http::http_get;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{ContainerPort, Pod, Protocol};
use serde_json::{Value, json};
use support::{KillOnDrop, RemoveOnDrop, log_tail, require_root};

/// The lab's pods: (namespace, name, app label, last octet of 10.249.0.x, TCP ports served).
/// web, api, db, mon and intruder are the invariant pods; s1..s4 are the spares.
const LOCAL: &[(&str, &str, &str, u8, &[u16])] = &[
    ("prod", "web", "web", 2, &[80]),
    ("prod", "api", "api", 3, &[80]),
    ("prod", "db", "db", 4, &[5432]),
    ("ops", "mon", "mon", 5, &[80]),
    ("dev", "intruder", "intruder", 6, &[80]),
    ("dev", "s1", "spare-1", 7, &[80]),
    ("dev", "s2", "spare-2", 8, &[80]),
    ("prod", "s3", "spare-3", 9, &[80]),
    ("ops", "s4", "spare-4", 10, &[80]),
];
const SPARES: &[&str] = &["dev/s1", "dev/s2", "prod/s3", "ops/s4"];
const NAMESPACES: &[&str] = &["prod", "dev", "ops"];
/// Pods of node-2 (10.249.9.x: no interface here, peers only), labelled kind=remote.
const REMOTES: usize = 8;
/// Servers this test runs itself, pushing a message every 100 ms: (pod, port).
const PUSH: &[(&str, u16)] = &[("prod/web", 8080), ("prod/db", 9000)];

/// Denied in every state: (from, to, port).
const DENIED: &[(&str, &str, u16)] = &[
    // db admits api on 5432 and ops/mon on 9000, nothing else.
    ("dev/intruder", "prod/db", 5432),
    ("dev/s1", "prod/db", 5432),
    // api is ingress-isolated with no rule.
    ("dev/intruder", "prod/api", 80),
    // mon is egress-isolated to namespace prod on 80 and 9000.
    ("ops/mon", "dev/intruder", 80),
    // mon is ingress-isolated with no rule.
    ("dev/s2", "ops/mon", 80),
];
/// Allowed in every state: (from, to, port).
const ALLOWED: &[(&str, &str, u16)] = &[
    ("prod/api", "prod/db", 5432),
    ("ops/mon", "prod/db", 9000),
    ("prod/api", "prod/web", 8080),
    ("dev/intruder", "prod/web", 80),
    ("ops/mon", "prod/web", 80),
];
/// Established connections of ingress-isolated clients: (client, server, port of a `PUSH`
/// server).
const TALKS: &[(&str, &str, u16)] = &[("prod/api", "prod/web", 8080), ("ops/mon", "prod/db", 9000)];
/// An allowed pair must connect within this long after each ready.
const ALLOWED_WITHIN: Duration = Duration::from_secs(5);
/// A restarted agent must be ready within this long.
const READY_WITHIN: Duration = Duration::from_secs(90);

fn ip_of(pod: &str) -> [u8; 4] {
    let (ns, name) = pod.split_once('/').expect("ns/name");
    let (_, _, _, octet, _) = LOCAL
        .iter()
        .find(|p| p.0 == ns && p.1 == name)
        .unwrap_or_else(|| panic!("no lab pod {pod}"));
    [10, 249, 0, *octet]
}

fn remote_ip(i: usize) -> String {
    format!("10.249.9.{}", 10 + i)
}

/// A small deterministic generator (xorshift64*), so a seed replays the same schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..hi (hi exclusive, hi > lo).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next() % den < num
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, Debug)]
struct Size {
    name: &'static str,
    /// Rounds, one churn kill each.
    rounds: usize,
    /// The soak stops starting rounds after this long.
    budget: Duration,
    /// API changes per round (lo..hi).
    changes: (u64, u64),
}

const SMOKE: Size = Size {
    name: "smoke",
    rounds: 6,
    budget: Duration::from_secs(75),
    changes: (6, 14),
};
const FULL: Size = Size {
    name: "full",
    rounds: 50,
    budget: Duration::from_secs(25 * 60),
    changes: (8, 24),
};

fn seed() -> u64 {
    match std::env::var("NPM_SOAK_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("NPM_SOAK_SEED={s:?} is not a u64")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ u64::from(std::process::id()).rotate_left(32)
        }
    }
}

#[test]
fn soak_smoke() {
    soak(SMOKE);
}

#[test]
#[ignore = "the full soak (a few minutes): cargo xtask soak --size full"]
fn soak_full() {
    soak(FULL);
}

// ---------------------------------------------------------------------------------------
// Objects

fn namespace(name: &str, team: Option<&str>) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name, "env": name});
    if let Some(t) = team {
        labels["team"] = json!(t);
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod_object(ns: &str, name: &str, labels: Value, ip: &str, node: &str, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn local_pod_object(ns: &str, name: &str, labels: Value) -> Value {
    let (.., octet, ports) = LOCAL
        .iter()
        .find(|p| p.0 == ns && p.1 == name)
        .expect("lab pod");
    pod_object(
        ns,
        name,
        labels,
        &format!("10.249.0.{octet}"),
        "node-1",
        ports,
    )
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn ports(list: &[u16]) -> Vec<Value> {
    list.iter().map(|p| json!({"port": p})).collect()
}

/// db's policy: api on 5432, ops/mon on 9000; `extra` adds ports to api's rule (more than
/// PAIR_PORTS entries: the pair is decided by the POLICY trie) without changing 5432/9000.
fn db_policy(extra: u16) -> Value {
    let mut api_ports = ports(&[5432]);
    for i in 0..extra {
        api_ports.push(json!({"port": 6000 + 10 * i, "endPort": 6000 + 10 * i + 3}));
    }
    policy(
        "prod",
        "db-ingress",
        json!({"podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": api_ports},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
                           "podSelector": {"matchLabels": {"app": "mon"}}}],
                 "ports": ports(&[9000])}]}),
    )
}

/// The objects whose meaning the invariants come from (plus the initial spares and remotes).
fn fixed_objects() -> Vec<Value> {
    let mut out: Vec<Value> = NAMESPACES.iter().map(|n| namespace(n, None)).collect();
    for (ns, name, app, _, _) in LOCAL {
        out.push(local_pod_object(ns, name, json!({"app": app})));
    }
    out.push(policy(
        "prod",
        "web-ingress",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": ports(&[80])},
                {"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": ports(&[8080])}]}),
    ));
    out.push(policy(
        "prod",
        "api-isolated",
        json!({"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"]}),
    ));
    out.push(db_policy(0));
    out.push(policy(
        "ops",
        "mon",
        json!({"podSelector": {"matchLabels": {"app": "mon"}},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}}}],
                        "ports": ports(&[80, 9000])}]}),
    ));
    for i in 0..REMOTES {
        out.push(remote_pod(i, "a"));
    }
    out
}

fn remote_pod(i: usize, role: &str) -> Value {
    let ns = NAMESPACES[i % NAMESPACES.len()];
    pod_object(
        ns,
        &format!("r{i}"),
        json!({"kind": "remote", "role": role}),
        &remote_ip(i),
        "node-2",
        &[80, 7000 + i as u16],
    )
}

/// The seeded churn: every change leaves `DENIED`, `ALLOWED` and `TALKS` as they are.
struct Churn {
    rng: Rng,
    /// Churned policies present: "namespace/name".
    policies: BTreeSet<String>,
    spares_present: [bool; 4],
    remotes_present: [bool; REMOTES],
    changes: u64,
}

const ROLES: &[&str] = &["a", "b", "c"];
const TEAMS: &[&str] = &["red", "blue", "green"];

impl Churn {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            policies: BTreeSet::new(),
            spares_present: [true; 4],
            remotes_present: [true; REMOTES],
            changes: 0,
        }
    }

    /// Ports for a churned rule: none (all ports) to 12, some of them ranges.
    fn rule_ports(&mut self) -> Option<Vec<Value>> {
        if self.rng.chance(1, 5) {
            return None;
        }
        let n = self.rng.range(1, 13);
        Some(
            (0..n)
                .map(|_| {
                    let port = self.rng.range(1000, 1200);
                    let proto = *self.rng.pick(&["TCP", "UDP", "TCP"]);
                    if self.rng.chance(1, 4) {
                        json!({"port": port, "endPort": port + self.rng.range(1, 40), "protocol": proto})
                    } else {
                        json!({"port": port, "protocol": proto})
                    }
                })
                .collect(),
        )
    }

    /// A peer that can never be a lab pod: kind=remote pods (node-2) or their range.
    fn remote_peer(&mut self) -> Value {
        match self.rng.range(0, 4) {
            0 => json!({"podSelector": {"matchLabels": {"kind": "remote"}}}),
            1 => {
                json!({"podSelector": {"matchLabels": {"kind": "remote", "role": self.rng.pick(ROLES)}}})
            }
            2 => json!({"namespaceSelector": {"matchLabels": {"team": self.rng.pick(TEAMS)}},
                        "podSelector": {"matchLabels": {"kind": "remote"}}}),
            _ => json!({"ipBlock": {"cidr": "10.249.9.0/24", "except": ["10.249.9.128/25"]}}),
        }
    }

    /// Any peer at all (for policies that select only spares).
    fn any_peer(&mut self) -> Value {
        match self.rng.range(0, 5) {
            0 => json!({"podSelector": {"matchLabels": {"role": self.rng.pick(ROLES)}}}),
            1 => json!({"namespaceSelector": {"matchLabels": {"team": self.rng.pick(TEAMS)}}}),
            2 => json!({"namespaceSelector": {}}),
            3 => json!({"ipBlock": {"cidr": "10.249.0.0/16", "except": ["10.249.0.0/29"]}}),
            _ => self.remote_peer(),
        }
    }

    fn rules(&mut self, remote_only: bool, key: &str) -> Vec<Value> {
        let n = self.rng.range(1, 4);
        (0..n)
            .map(|_| {
                let peers: Vec<Value> = (0..self.rng.range(1, 3))
                    .map(|_| {
                        if remote_only {
                            self.remote_peer()
                        } else {
                            self.any_peer()
                        }
                    })
                    .collect();
                let mut rule = serde_json::Map::new();
                rule.insert(key.to_string(), json!(peers));
                let mut rule = Value::Object(rule);
                if let Some(p) = self.rule_ports() {
                    rule["ports"] = json!(p);
                }
                rule
            })
            .collect()
    }

    /// A churned policy: selecting spares (any rules), or an invariant pod with rules that
    /// admit only remote peers (ingress; egress too for mon, whose egress is isolated already).
    fn churned_policy(&mut self, ns: &str, name: &str) -> Value {
        let ns_pods: Vec<&str> = match ns {
            "prod" => vec!["web", "api", "db"],
            "ops" => vec!["mon"],
            _ => vec![],
        };
        let spec = if ns_pods.is_empty() || self.rng.chance(1, 2) {
            // Spares (by role: also selects remote pods of that role, harmless).
            let selector = json!({"matchLabels": {"role": self.rng.pick(ROLES)}});
            let types = *self.rng.pick(&[
                &["Ingress"][..],
                &["Egress"][..],
                &["Ingress", "Egress"][..],
            ]);
            let mut spec = json!({"podSelector": selector, "policyTypes": types});
            if types.contains(&"Ingress") {
                spec["ingress"] = json!(self.rules(false, "from"));
            }
            if types.contains(&"Egress") {
                spec["egress"] = json!(self.rules(false, "to"));
            }
            spec
        } else {
            let app = *self.rng.pick(&ns_pods);
            let mut spec = json!({"podSelector": {"matchLabels": {"app": app}},
                "ingress": self.rules(true, "from")});
            if app == "mon" && self.rng.chance(1, 2) {
                spec["policyTypes"] = json!(["Ingress", "Egress"]);
                spec["egress"] = json!(self.rules(true, "to"));
            }
            spec
        };
        policy(ns, name, spec)
    }

    /// One API change, applied; returns what it was (for the timeline).
    fn change(&mut self, api: &FakeApi) -> String {
        self.changes += 1;
        match self.rng.range(0, 10) {
            0..=3 => {
                let ns = *self.rng.pick(NAMESPACES);
                let name = format!("churn-{}", self.rng.range(0, 6));
                let key = format!("{ns}/{name}");
                if self.policies.contains(&key) && self.rng.chance(1, 3) {
                    self.policies.remove(&key);
                    api.delete("NetworkPolicy", ns, &name);
                    format!("delete policy {key}")
                } else {
                    let verb = if !self.policies.insert(key.clone()) {
                        "modify"
                    } else {
                        "create"
                    };
                    api.apply(self.churned_policy(ns, &name));
                    format!("{verb} policy {key}")
                }
            }
            4 => {
                let extra = if self.rng.chance(1, 2) {
                    0
                } else {
                    self.rng.range(4, 12) as u16
                };
                api.apply(db_policy(extra));
                format!("rewrite prod/db-ingress with {extra} extra port ranges")
            }
            5 | 6 => {
                let i = self.rng.range(0, SPARES.len() as u64) as usize;
                let (ns, name) = SPARES[i].split_once('/').expect("ns/name");
                let app = LOCAL
                    .iter()
                    .find(|p| p.0 == ns && p.1 == name)
                    .expect("spare")
                    .2;
                if self.spares_present[i] && self.rng.chance(1, 3) {
                    self.spares_present[i] = false;
                    api.delete("Pod", ns, name);
                    format!("delete pod {ns}/{name}")
                } else {
                    let role = *self.rng.pick(ROLES);
                    let verb = if self.spares_present[i] {
                        "relabel"
                    } else {
                        "create"
                    };
                    self.spares_present[i] = true;
                    api.apply(local_pod_object(
                        ns,
                        name,
                        json!({"app": app, "role": role}),
                    ));
                    format!("{verb} pod {ns}/{name} role={role}")
                }
            }
            7 | 8 => {
                let i = self.rng.range(0, REMOTES as u64) as usize;
                let ns = NAMESPACES[i % NAMESPACES.len()];
                if self.remotes_present[i] && self.rng.chance(1, 3) {
                    self.remotes_present[i] = false;
                    api.delete("Pod", ns, &format!("r{i}"));
                    format!("delete remote pod {ns}/r{i}")
                } else {
                    let role = *self.rng.pick(ROLES);
                    self.remotes_present[i] = true;
                    api.apply(remote_pod(i, role));
                    format!("set remote pod {ns}/r{i} role={role}")
                }
            }
            _ => {
                let ns = *self.rng.pick(NAMESPACES);
                let team = if self.rng.chance(1, 4) {
                    None
                } else {
                    Some(*self.rng.pick(TEAMS))
                };
                api.apply(namespace(ns, team));
                format!("namespace {ns} team={team:?}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Traffic

/// What happened when (for the failure report): seconds since the start, incarnation, text.
struct Timeline {
    start: Instant,
    events: Mutex<Vec<(f64, usize, String)>>,
    /// The agent incarnation running (or starting) now.
    incarnation: AtomicU64,
}

impl Timeline {
    fn note(&self, what: impl Into<String>) {
        let t = self.start.elapsed().as_secs_f64();
        let inc = self.incarnation.load(Ordering::Relaxed) as usize;
        self.events
            .lock()
            .expect("timeline")
            .push((t, inc, what.into()));
    }
    /// Events within `around` seconds of `t`.
    fn near(&self, t: f64, around: f64) -> String {
        self.events
            .lock()
            .expect("timeline")
            .iter()
            .filter(|(at, _, _)| (at - t).abs() <= around)
            .map(|(at, inc, what)| format!("  {at:8.3}s agent#{inc} {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A violation: when, which agent incarnation, what.
#[derive(Clone, Debug)]
struct Violation {
    at: f64,
    incarnation: usize,
    what: String,
}

#[derive(Default)]
struct Counts {
    denied_tries: AtomicU64,
    messages: AtomicU64,
    /// Gaps between two messages over 300 ms (a lost segment retransmitted): reported, not
    /// failed.
    slow_gaps: AtomicU64,
    max_gap_us: AtomicU64,
    violations: Mutex<Vec<Violation>>,
}

impl Counts {
    fn violation(&self, tl: &Timeline, what: String) {
        let v = Violation {
            at: tl.start.elapsed().as_secs_f64(),
            incarnation: tl.incarnation.load(Ordering::Relaxed) as usize,
            what,
        };
        tl.note(format!("VIOLATION {}", v.what));
        self.violations.lock().expect("violations").push(v);
    }
}

/// A TCP connect to `to` from the calling thread's namespace (accepted, or the error:
/// a refusal means the SYN reached the target too).
fn connects(to: SocketAddr, timeout: Duration) -> Result<(), std::io::Error> {
    TcpStream::connect_timeout(&to, timeout).map(drop)
}

/// The server side of an established connection: an 8-byte counter every 100 ms until
/// `stop` or a failed write. The server speaks and the client only acknowledges: were the
/// messages requests' answers, each request would make a new conntrack entry at the client's
/// interface (its egress is allowed) just before the answer needs one, and a lost entry would
/// go unseen. Here a lost entry drops the next message at the ingress-isolated client, whose
/// retransmissions are dropped too, and the client, with nothing to acknowledge, sends nothing
/// that could track the flow again.
fn push(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(&n.to_be_bytes()).is_err() {
            return;
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// The agent

struct Agents<'a> {
    node: String,
    kubeconfig: &'a Path,
    bpffs: &'a Path,
    logs: &'a Path,
    started: usize,
}

impl Agents<'_> {
    fn log(&self, n: usize) -> PathBuf {
        self.logs.join(format!("agent-{n}.log"))
    }

    fn spawn(&mut self, tl: &Timeline) -> KillOnDrop {
        let n = self.started;
        self.started += 1;
        tl.incarnation.store(n as u64, Ordering::Relaxed);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg(env!("CARGO_BIN_EXE_npm-agent"))
            .args([
                "run",
                "--poll-interval-ms",
                "200",
                "--node-name",
                "node-1",
                "--kubeconfig",
            ])
            .arg(self.kubeconfig)
            .arg("--bpffs-dir")
            .arg(self.bpffs)
            .env("NPM_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log(n)).expect("agent log file"))
            .spawn()
            .expect("spawn agent");
        tl.note(format!("spawned pid {}", child.id()));
        KillOnDrop(child)
    }

    /// SIGKILL by the pid of the child we started (nsenter execs the agent), then reaps it.
    /// Returns whether it had finished its first apply (its log says it enforces).
    fn kill(&self, mut agent: KillOnDrop, tl: &Timeline) -> bool {
        let pid = agent.0.id();
        agent.0.kill().expect("SIGKILL the agent");
        let status = agent.0.wait().expect("reap the agent");
        let n = tl.incarnation.load(Ordering::Relaxed) as usize;
        let log = std::fs::read_to_string(self.log(n)).unwrap_or_default();
        let enforcing = log.contains("programs attached; enforcing");
        tl.note(format!(
            "SIGKILL pid {pid} ({status}); {}",
            if enforcing {
                "after its first apply"
            } else {
                "before its first apply finished"
            }
        ));
        enforcing
    }

    fn tails(&self, incarnations: impl IntoIterator<Item = usize>) -> String {
        incarnations
            .into_iter()
            .filter(|n| *n < self.started)
            .map(|n| format!("--- agent#{n} log (tail) ---\n{}", log_tail(&self.log(n))))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn ready(lab: &Lab) -> bool {
    matches!(http_get(lab.node(), 10091, "/readyz"), Ok((200, _)))
}

/// Waits for `/readyz` 200 (polling every 50 ms); the time it took.
fn wait_ready(lab: &Lab, agent: &mut KillOnDrop, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Ok(Some(status)) = agent.0.try_wait() {
            return Err(format!("the agent exited on its own: {status}"));
        }
        if ready(lab) {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("not ready within {within:?}"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

// ---------------------------------------------------------------------------------------
// The soak

fn soak(size: Size) {
    require_root("the soak (netns, BPF, bpffs)");
    let seed = seed();
    eprintln!(
        "soak {}: seed {seed} (replay with NPM_SOAK_SEED={seed})",
        size.name
    );
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-soak-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let kubeconfig = std::env::temp_dir().join(format!("npm-soak-{pid}.yaml"));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    let logs = std::env::temp_dir().join(format!("npm-soak-{pid}-logs"));
    std::fs::create_dir_all(&logs).expect("log directory");
    let keep_logs = std::env::var_os("NPM_SOAK_KEEP_LOGS").is_some_and(|v| v == "1");
    let _logs = (!keep_logs).then(|| RemoveOnDrop(logs.clone()));
    if keep_logs {
        eprintln!("soak: agent logs kept in {}", logs.display());
    }

    let pods: Vec<Pod> = LOCAL
        .iter()
        .map(|(ns, name, app, octet, served)| Pod {
            namespace: (*ns).into(),
            name: (*name).into(),
            labels: [("app".to_string(), (*app).to_string())].into(),
            ips: vec![format!("10.249.0.{octet}").parse().expect("ip")],
            node_name: Some("node-1".into()),
            host_network: false,
            terminating: false,
            finished: false,
            ports: served
                .iter()
                .map(|p| ContainerPort {
                    name: None,
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
        })
        .collect();
    let lab = Lab::build(LabSpec {
        pods,
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node().name().to_string();
    let listener = lab
        .node()
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_on(listener);
    api.write_kubeconfig(&kubeconfig);
    for obj in fixed_objects() {
        api.apply(obj);
    }
    let push_listeners: Vec<TcpListener> = PUSH
        .iter()
        .map(|(pod, port)| {
            let l = lab
                .netns_of(pod)
                .expect("server pod netns")
                .run(|| TcpListener::bind(("0.0.0.0", *port)))
                .expect("push listener");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect();

    let tl = Timeline {
        start: Instant::now(),
        events: Mutex::new(Vec::new()),
        incarnation: AtomicU64::new(0),
    };
    let counts = Counts::default();
    let stop = AtomicBool::new(false);
    let mut agents = Agents {
        node,
        kubeconfig: &kubeconfig,
        bpffs: &bpffs,
        logs: &logs,
        started: 0,
    };
    let mut churn = Churn::new(seed);
    let mut rng = Rng::new(seed ^ 0x5eed_0fc1_11ed);
    let (mut kills, mut startup_kills_before, mut startup_kills_after) = (0usize, 0usize, 0usize);
    let mut rounds = 0usize;
    let mut to_ready = Vec::new();
    let (mut allowed_checks, mut allowed_first_fail) = (0usize, 0usize);
    let mut first_fail_what = Vec::new();
    let mut first_ready = Duration::ZERO;

    /// Stops the test's threads when the scope ends, also on a failed assertion (the scope
    /// joins them before it unwinds).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        for l in &push_listeners {
            let stop = &stop;
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            scope.spawn(move || push(s, stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }

        let mut agent = agents.spawn(&tl);
        let took = wait_ready(&lab, &mut agent, READY_WITHIN)
            .unwrap_or_else(|e| panic!("the first agent: {e}\n{}", agents.tails([0])));
        tl.note(format!("ready after {took:?}"));
        first_ready = took;

        // The established connections, then the talkers and the denied probers.
        let mut conns = Vec::new();
        for (client, server, port) in TALKS {
            let to = SocketAddr::from((ip_of(server), *port));
            let conn = lab
                .netns_of(client)
                .expect("client netns")
                .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
                .unwrap_or_else(|e| panic!("{client} connects to {server}:{port}: {e}"));
            conn.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            conn.set_write_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            conns.push(((*client, *server, *port), conn));
        }
        for ((client, server, port), mut conn) in conns {
            let (stop, counts, tl) = (&stop, &counts, &tl);
            scope.spawn(move || {
                let mut n = 0u64;
                let mut last = Instant::now();
                let mut buf = [0u8; 8];
                while !stop.load(Ordering::Relaxed) {
                    let got = conn.read_exact(&mut buf).map(|()| u64::from_be_bytes(buf));
                    // At the end the servers stop and close first.
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if got.as_ref().ok() != Some(&n) {
                        counts.violation(
                            tl,
                            format!(
                                "established {client} <- {server}:{port}: message {n} not \
                                 received within 1 s ({got:?}); the connection is given up"
                            ),
                        );
                        return;
                    }
                    let gap = last.elapsed();
                    last = Instant::now();
                    counts.messages.fetch_add(1, Ordering::Relaxed);
                    if gap > Duration::from_millis(300) {
                        counts.slow_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    counts
                        .max_gap_us
                        .fetch_max(gap.as_micros() as u64, Ordering::Relaxed);
                    n += 1;
                }
            });
        }
        for (from, to, port) in DENIED {
            let ns = lab.netns_of(from).expect("prober netns");
            let (stop, counts, tl) = (&stop, &counts, &tl);
            scope.spawn(move || {
                ns.run(|| {
                    let addr = SocketAddr::from((ip_of(to), *port));
                    while !stop.load(Ordering::Relaxed) {
                        counts.denied_tries.fetch_add(1, Ordering::Relaxed);
                        match connects(addr, Duration::from_millis(150)) {
                            Ok(()) => counts
                                .violation(tl, format!("denied {from} -> {to}:{port} connected")),
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => counts
                                .violation(
                                    tl,
                                    format!("denied {from} -> {to}:{port} got a refusal (its SYN got through)"),
                                ),
                            Err(_) => {}
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            });
        }

        let mut check_allowed = |when: &str| {
            for (from, to, port) in ALLOWED {
                allowed_checks += 1;
                let addr = SocketAddr::from((ip_of(to), *port));
                let ns = lab.netns_of(from).expect("netns");
                let t0 = Instant::now();
                let mut tries = 0;
                let ok = loop {
                    tries += 1;
                    if ns
                        .run(|| connects(addr, Duration::from_millis(500)))
                        .is_ok()
                    {
                        break true;
                    }
                    if t0.elapsed() > ALLOWED_WITHIN {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                };
                if tries > 1 {
                    allowed_first_fail += 1;
                    first_fail_what.push(format!("{when}: {from} -> {to}:{port} ({tries} tries)"));
                    tl.note(format!(
                        "allowed {from} -> {to}:{port} failed its first try"
                    ));
                }
                if !ok {
                    counts.violation(
                        &tl,
                        format!(
                            "allowed {from} -> {to}:{port} did not connect within {ALLOWED_WITHIN:?} \
                             of the agent's ready ({when})"
                        ),
                    );
                }
            }
        };
        check_allowed("first ready");

        while rounds < size.rounds && tl.start.elapsed() < size.budget {
            let round = rounds;
            rounds += 1;
            let n = churn.rng.range(size.changes.0, size.changes.1);
            let kill_after = rng.range(0, n);
            // In some rounds (always in the second), kill the restarted agent again during
            // its start-up, at a random point of the time a restart takes.
            let startup_kill = round == 1 || rng.chance(1, 3);
            tl.note(format!(
                "round {round}: {n} changes, SIGKILL after change {kill_after}{}",
                if startup_kill {
                    ", and again during the start-up"
                } else {
                    ""
                }
            ));
            for i in 0..n {
                let what = churn.change(&api);
                tl.note(what);
                std::thread::sleep(Duration::from_millis(rng.range(0, 60)));
                if i != kill_after {
                    continue;
                }
                // Most kills land while the agent works on the changes just made.
                std::thread::sleep(Duration::from_millis(rng.range(0, 40)));
                agents.kill(agent, &tl);
                kills += 1;
                agent = agents.spawn(&tl);
                if startup_kill {
                    // Up to the median restart so far: most of these land before the
                    // first apply (the first start, with empty maps, takes longer).
                    let mut so_far = to_ready.clone();
                    so_far.sort();
                    let typical = so_far.get(so_far.len() / 2).copied().unwrap_or(first_ready);
                    let upto = typical.as_millis().max(100) as u64;
                    std::thread::sleep(Duration::from_millis(rng.range(0, upto)));
                    if agents.kill(agent, &tl) {
                        startup_kills_after += 1;
                    } else {
                        startup_kills_before += 1;
                    }
                    agent = agents.spawn(&tl);
                }
            }
            let took = wait_ready(&lab, &mut agent, READY_WITHIN).unwrap_or_else(|e| {
                panic!(
                    "round {round}: the restarted agent: {e}\n{}",
                    agents.tails([agents.started - 2, agents.started - 1])
                )
            });
            tl.note(format!("ready after {took:?}"));
            to_ready.push(took);
            check_allowed(&format!("round {round}"));
            // Traffic on the settled state for a while (the probers and talkers run on).
            std::thread::sleep(Duration::from_millis(rng.range(300, 1500)));
        }
        // Let the probers and talkers see the last state for a moment, then stop them.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        drop(agent);
    });

    to_ready.sort();
    let violations = counts.violations.lock().expect("violations").clone();
    let report = format!(
        "soak {size}: seed {seed}, {rounds} rounds in {secs:.1}s, {changes} API changes\n\
         kills: {kills} during churn, {sb} during start-up before the first apply, {sa} during \
         start-up after it; {started} agents started\n\
         restart to ready: p50 {p50:?}, max {max:?} (first start: {first:?})\n\
         denied probes: {dt} tries, {dp} passed\n\
         established: {msgs} messages (server to ingress-isolated client, every 100 ms) on \
         {talks} connections, {slow} gaps over 300 ms, max gap {maxgap} ms, {missed} missed\n\
         allowed after ready: {ac} checks, {af} needed more than one try{ff}, {an} failed within \
         {ALLOWED_WITHIN:?}",
        size = size.name,
        secs = tl.start.elapsed().as_secs_f64(),
        changes = churn.changes,
        sb = startup_kills_before,
        sa = startup_kills_after,
        started = agents.started,
        p50 = percentile(&to_ready, 0.5),
        max = to_ready.last().copied().unwrap_or_default(),
        first = first_ready,
        dt = counts.denied_tries.load(Ordering::Relaxed),
        dp = violations
            .iter()
            .filter(|v| v.what.starts_with("denied"))
            .count(),
        msgs = counts.messages.load(Ordering::Relaxed),
        talks = TALKS.len(),
        slow = counts.slow_gaps.load(Ordering::Relaxed),
        maxgap = counts.max_gap_us.load(Ordering::Relaxed) / 1000,
        missed = violations
            .iter()
            .filter(|v| v.what.starts_with("established"))
            .count(),
        ac = allowed_checks,
        af = allowed_first_fail,
        ff = if first_fail_what.is_empty() {
            String::new()
        } else {
            format!(" ({})", first_fail_what.join("; "))
        },
        an = violations
            .iter()
            .filter(|v| v.what.starts_with("allowed"))
            .count(),
    );
    eprintln!("{report}");
    if !violations.is_empty() {
        let mut detail = String::new();
        for v in violations.iter().take(3) {
            detail.push_str(&format!(
                "\n== at {:.3}s (agent#{}): {}\ntimeline around it:\n{}\n{}\n",
                v.at,
                v.incarnation,
                v.what,
                tl.near(v.at, 3.0),
                agents.tails(v.incarnation.saturating_sub(1)..=v.incarnation)
            ));
        }
        panic!(
            "{} violation(s) of the soak's invariants (seed {seed}):{detail}\n{report}",
            violations.len()
        );
    }
    assert!(
        kills >= 2,
        "only {kills} kills within the budget ({:?}): the soak showed too little\n{report}",
        size.budget
    );
    assert!(
        counts.denied_tries.load(Ordering::Relaxed) > 100,
        "the denied probers barely probed\n{report}"
    );
}
