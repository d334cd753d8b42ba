//! Times the incremental compiler on a synthetic cluster: `cargo run --release -p npm-agent
//! --example incremental_probe [PODS] [POLICIES] [NAMESPACES] [EVENTS]`.
//!
//! Builds the cluster through a [`Pipeline`] over the fake backend (compile + plan + apply),
//! then times single events one at a time: the figure is `Pipeline::apply_changes`, from
//! the change to the (fake) maps updated. p50/p99/max over EVENTS events of each kind, as
//! wall time and as the thread's CPU time (on a shared machine the wall p99 includes waiting
//! for a core). Events: a pod added with labels an existing identity has, or new ones; a pod's
//! labels changed (any pod, or a local one: its identity's entries are compiled); a policy
//! added (about a fifth select a local pod); a namespace relabelled (all its pods change identity).
use std::time::{Duration, Instant};

use npm_agent::compiler::{IdAllocator, Incremental};
use npm_agent::enforcer::Pipeline;
use npm_agent::model::ObjRef;
use npm_agent::programmer::fake::FakeBackend;
use npm_agent::state::{Change, ClusterSnapshot};
use npm_agent::synth::{synthetic_cluster, synthetic_namespace, synthetic_pod, synthetic_policy};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread (excludes time the thread waited for a core: this machine
/// is shared, and wall-clock p99s include preemption).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let (pods, policies, namespaces, events) =
        (arg(1, 10_000), arg(2, 1_000), arg(3, 100), arg(4, 300));
    let local = 110;
    let s = synthetic_cluster(pods, policies, namespaces, local);

    let t = Instant::now();
    let inc = Incremental::new(&s, IdAllocator::default());
    let compile_only = t.elapsed();
    drop(inc);

    let t = Instant::now();
    let mut pipe = Pipeline::new(FakeBackend::default()).expect("fake backend");
    let r = pipe.apply_changes(&ClusterSnapshot::default().diff(&s));
    let build = t.elapsed();
    assert_eq!(r.sync.failed, 0);
    let m = pipe.compiler().maps();
    println!(
        "cluster: {pods} pods, {policies} policies, {namespaces} namespaces, {local} local; entries: endpoints {} identities {} cidrs {} policy {}",
        m.endpoints.len(),
        m.identities.len(),
        m.cidrs.len(),
        m.policy.len()
    );
    println!(
        "initial build: compile {compile_only:?}; compile + plan + program (fake) {build:?} ({} ops)",
        r.sync.upserts
    );

    type Make = Box<dyn Fn(usize, &ClusterSnapshot) -> Vec<Change>>;
    let kinds: Vec<(&str, Make)> = vec![
        (
            "pod added (existing identity)",
            Box::new(move |k, _| {
                let p = synthetic_pod(pods + k, namespaces);
                vec![Change::Pod(p.obj_ref(), Some(p))]
            }),
        ),
        (
            "pod added (new identity)",
            Box::new(move |k, _| {
                let mut p = synthetic_pod(pods + events + k, namespaces);
                p.labels.insert("rev".into(), format!("r{k}"));
                vec![Change::Pod(p.obj_ref(), Some(p))]
            }),
        ),
        (
            "pod label changed (new identity)",
            Box::new(move |k, s| {
                let obj = ObjRef::new(format!("ns{}", k % namespaces), format!("p{}", k % pods));
                let mut p = s
                    .pods
                    .get(&obj)
                    .cloned()
                    .unwrap_or_else(|| synthetic_pod(k % pods, namespaces));
                p.labels.insert("version".into(), format!("v{k}"));
                vec![Change::Pod(obj, Some(p))]
            }),
        ),
        (
            "pod label changed (local pod)",
            Box::new(move |k, s| {
                let i = k % local;
                let obj = ObjRef::new(format!("ns{}", i % namespaces), format!("p{i}"));
                let mut p = s
                    .pods
                    .get(&obj)
                    .cloned()
                    .unwrap_or_else(|| synthetic_pod(i, namespaces));
                p.labels.insert("version".into(), format!("v{k}"));
                vec![Change::Pod(obj, Some(p))]
            }),
        ),
        (
            "policy added",
            Box::new(move |k, _| {
                let p = synthetic_policy(policies + k, namespaces);
                vec![Change::Policy(p.obj_ref(), Some(p))]
            }),
        ),
        (
            "namespace relabelled",
            Box::new(move |k, _| {
                let mut ns = synthetic_namespace(k % namespaces);
                ns.labels.insert("rev".into(), format!("r{k}"));
                vec![Change::Namespace(ns.name.clone(), Some(ns))]
            }),
        ),
    ];
    println!(
        "{:<34} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>7}",
        "event (apply_changes)",
        "wall p50",
        "wall p99",
        "wall max",
        "cpu p50",
        "cpu p99",
        "cpu max",
        "ops p50"
    );
    for (name, make) in &kinds {
        let mut times = Vec::with_capacity(events);
        let mut cpu = Vec::with_capacity(events);
        let mut ops = Vec::with_capacity(events);
        for k in 0..events {
            let changes = make(k, pipe.compiler().snapshot());
            let (t, c) = (Instant::now(), thread_cpu());
            let r = pipe.apply_changes(&changes);
            times.push(t.elapsed());
            cpu.push(thread_cpu() - c);
            ops.push(r.sync.upserts + r.sync.deletes);
            assert_eq!(r.sync.failed, 0);
        }
        times.sort();
        cpu.sort();
        ops.sort();
        println!(
            "{:<34} {:>9.2?} {:>9.2?} {:>9.2?} | {:>9.2?} {:>9.2?} {:>9.2?} | {:>7}",
            name,
            pct(&times, 0.5),
            pct(&times, 0.99),
            times[times.len() - 1],
            pct(&cpu, 0.5),
            pct(&cpu, 0.99),
            cpu[cpu.len() - 1],
            ops[ops.len() / 2]
        );
    }
    // The fake maps hold exactly what the compiler wants after all those plans.
    assert_eq!(&pipe.programmer().backend().maps, pipe.compiler().maps());
    println!("checked: the fake backend holds exactly the compiler's maps after every plan");
}
