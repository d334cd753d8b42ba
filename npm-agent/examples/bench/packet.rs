//! Part 1: per-packet cost of the classifier through `BPF_PROG_TEST_RUN`.
//!
//! For each (pods, policies) size the synthetic cluster is compiled and programmed into fresh
//! maps by the real [`Enforcer`]; then one TCP packet from a peer to the local pod `p0`
//! (ingress, `npm_to_pod`, ifindex 1) is run through the classifier:
//! - new connection, denied: a SYN from the denied peer, `repeat` times in one call (a denied
//!   packet creates no conntrack entry, so every repetition takes the full path);
//! - new connection, allowed (the targeted figure): a SYN from the allowed peer through
//!   `npm_bench_new`, which bumps the source port before running `npm_to_pod`'s code, so each
//!   of the `flows` repetitions of one call is a new flow (miss, policy path, insert); the
//!   conntrack maps are emptied before each call and must hold `flows` entries after it. The
//!   bump's own cost (`npm_bench_bump` − pass-only) is taken off;
//! - new connection, allowed, single-run method: the same SYN through `npm_to_pod`, one
//!   repetition per call with the conntrack entry it created removed (one delete by key)
//!   before the next call. A single repetition carries the kernel's timer overhead and
//!   follows two syscalls, so the figure reported is the median of those single runs minus
//!   (pass-only single run − pass-only repeated run), the pass-only single runs being
//!   measured the same way (same delete syscall between runs);
//! - established: the allowed SYN once (creates the entry), then an ACK `repeat` times: the
//!   first repetition is a conntrack hit that fills the flow cache, the rest are flow-cache
//!   hits (what a flow's packets on one CPU pay); and the same with the flow cache off
//!   (every repetition a conntrack hit: what a cache miss pays). A denied flow never gets an
//!   entry, so "established, denied" does not exist;
//! - new connection, allowed, without the conntrack insert: a SYN-ACK from the allowed peer
//!   `repeat` times in one call against a live entry of the same tuple that it does not match
//!   (recorded as originating in the other direction): every repetition takes the conntrack
//!   lookup and the whole allowed policy path and creates nothing. It shows what the
//!   single-run method adds (the insert, and the cache cooling of two syscalls per run);
//! - new connection, allowed, SYN on a tracked tuple: the allowed SYN once (creates the
//!   entry), then the same SYN `repeat` times, each a conntrack hit: what a SYN pays whose
//!   tuple still has an entry (a retransmission, or a client reusing a source port within
//!   the closing timeout, which short connections at a few thousand per second do);
//! - pass-only: the same packet through `npm_pass` (returns `TC_ACT_PIPE`, touches nothing).
//!
//! Every verdict is checked (allowed = `TC_ACT_PIPE`, denied = `TC_ACT_SHOT`), so a
//! misconfigured size fails instead of timing the wrong path.
use std::net::{Ipv4Addr, Ipv6Addr};

use npm_agent::enforcer::Enforcer;
use npm_common::maps::{
    CtKey, CtKey4, CtValue, MAP_CONNTRACK, MAP_CONNTRACK4, PROG_BENCH_BUMP, PROG_BENCH_NEW,
    PROG_PASS, PROG_TO_POD,
};
use npm_common::verdict::DIR_EGRESS;

use crate::report::{Row, Sink};
use crate::synth;

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

pub(crate) struct Params {
    pub(crate) pods: Vec<usize>,
    pub(crate) policies: Vec<usize>,
    /// Repetitions per `BPF_PROG_TEST_RUN` call for the repeated figures.
    pub(crate) repeat: u32,
    /// Calls per repeated figure (the median is reported).
    pub(crate) rounds: usize,
    /// Single-repetition calls for the single-run new-allowed figure (the median is reported).
    pub(crate) singles: usize,
    /// Repetitions per call of the new-flow program (each a new flow; below 25 535, so the
    /// source ports 40 001.. do not wrap).
    pub(crate) flows: u32,
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).expect("small packet");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(l4);
    eth(0x0800, &ip)
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(l4.len()).expect("small").to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(l4);
    eth(0x86dd, &ip)
}

/// A TCP packet from pod `peer` to `p0`'s service port.
fn packet(v6: bool, peer: usize, flags: u8) -> Vec<u8> {
    let l4 = tcp(40_000, synth::SERVICE_PORT, flags);
    if v6 {
        ipv6(synth::v6(peer), synth::v6(0), &l4)
    } else {
        ipv4(synth::v4(peer), synth::v4(0), &l4)
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median over `rounds` calls of `repeat` repetitions, after one untimed warm-up call (the
/// first call after a size's maps were programmed measured up to 1.4x the rest); checks the
/// verdict of each call.
fn repeated(e: &Enforcer, prog: &str, pkt: &[u8], repeat: u32, rounds: usize, want: u32) -> f64 {
    let warm = e
        .datapath()
        .test_run(prog, pkt, 1, repeat)
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(warm.retval, want, "{prog}: unexpected verdict");
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let r = e
                .datapath()
                .test_run(prog, pkt, 1, repeat)
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.retval, want, "{prog}: unexpected verdict");
            f64::from(r.duration_ns)
        })
        .collect();
    median(&mut v)
}

/// The conntrack maps (IPv6 flows, IPv4 flows), taken from the datapath so single entries
/// can be removed.
struct CtMap {
    v6: aya::maps::HashMap<aya::maps::MapData, CtKey, CtValue>,
    v4: aya::maps::HashMap<aya::maps::MapData, CtKey4, CtValue>,
}

impl CtMap {
    /// Every key of both maps, as full keys.
    fn keys(&self) -> Vec<CtKey> {
        let v4 = self.v4.keys().map(|k| k.map(|k| k.to_full()));
        self.v6
            .keys()
            .chain(v4)
            .collect::<Result<_, _>>()
            .expect("conntrack keys")
    }

    fn get(&self, key: &CtKey) -> CtValue {
        match key.to_v4() {
            Some(k4) => self.v4.get(&k4, 0),
            None => self.v6.get(key, 0),
        }
        .expect("conntrack entry")
    }

    fn insert(&mut self, key: &CtKey, v: CtValue) {
        match key.to_v4() {
            Some(k4) => self.v4.insert(k4, v, 0),
            None => self.v6.insert(key, v, 0),
        }
        .expect("conntrack insert");
    }

    /// Removes flow `key` from the map of its family; true when it was there.
    fn remove(&mut self, key: &CtKey) -> bool {
        match key.to_v4() {
            Some(k4) => self.v4.remove(&k4).is_ok(),
            None => self.v6.remove(key).is_ok(),
        }
    }
}

fn take_ct(e: &mut Enforcer) -> CtMap {
    let mut take = |name| {
        e.datapath_mut()
            .take_map(name)
            .unwrap_or_else(|e| panic!("map {name}: {e}"))
    };
    let (v6, v4) = (take(MAP_CONNTRACK), take(MAP_CONNTRACK4));
    CtMap {
        v6: aya::maps::HashMap::try_from(v6).expect("conntrack map type"),
        v4: aya::maps::HashMap::try_from(v4).expect("conntrack map type"),
    }
}

/// Removes every entry (walks the whole map: only between measurements, never inside one).
fn ct_clear(ct: &mut CtMap) -> usize {
    let keys = ct.keys();
    keys.iter().filter(|k| ct.remove(k)).count()
}

/// Runs the allowed SYN once and returns the conntrack key it created (then removes it).
fn ct_key_of(e: &Enforcer, ct: &mut CtMap, pkt: &[u8]) -> CtKey {
    ct_clear(ct);
    let r = e
        .datapath()
        .test_run(PROG_TO_POD, pkt, 1, 1)
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.retval, TC_ACT_PIPE, "the allowed SYN passes");
    let keys = ct.keys();
    assert_eq!(keys.len(), 1, "an allowed new connection creates one entry");
    assert!(ct.remove(&keys[0]), "remove the entry");
    keys[0]
}

/// Median of `n` single runs, each followed by the removal of conntrack entry `key`, which
/// must have been `created` by the run (true for an allowed new connection, false for the
/// pass-only baseline: the baseline makes the same syscall between runs, so both start from
/// the same cache state).
#[allow(clippy::too_many_arguments)]
fn singles(
    e: &Enforcer,
    ct: &mut CtMap,
    key: &CtKey,
    prog: &str,
    pkt: &[u8],
    n: usize,
    want: u32,
    created: bool,
) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let r = e
            .datapath()
            .test_run(prog, pkt, 1, 1)
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.retval, want, "{prog}: unexpected verdict");
        v.push(f64::from(r.duration_ns));
        let removed = ct.remove(key);
        assert_eq!(
            removed, created,
            "{prog}: conntrack entry created by one run"
        );
    }
    median(&mut v)
}

/// The new-flow figures: the median over `rounds` calls of `flows` repetitions of
/// `PROG_BENCH_NEW` (the source port bumped, then `npm_to_pod`: every repetition a new flow
/// with its conntrack insert; the map emptied before each call and checked to hold `flows`
/// entries after it), and the same of `PROG_BENCH_BUMP` (the bump alone). Each after one
/// untimed warm-up call.
fn new_flows(e: &Enforcer, ct: &mut CtMap, pkt: &[u8], flows: u32, rounds: usize) -> (f64, f64) {
    let mut run = || {
        ct_clear(ct);
        let r = e
            .datapath()
            .test_run(PROG_BENCH_NEW, pkt, 1, flows)
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            r.retval, TC_ACT_PIPE,
            "{PROG_BENCH_NEW}: the allowed SYNs pass"
        );
        let tracked = ct.keys().len();
        assert_eq!(
            tracked, flows as usize,
            "{PROG_BENCH_NEW}: one conntrack entry per repetition"
        );
        f64::from(r.duration_ns)
    };
    run();
    let mut v: Vec<f64> = (0..rounds).map(|_| run()).collect();
    ct_clear(ct);
    let bump = repeated(e, PROG_BENCH_BUMP, pkt, flows, rounds, TC_ACT_PIPE);
    assert_eq!(ct_clear(ct), 0, "{PROG_BENCH_BUMP} tracks nothing");
    (median(&mut v), bump)
}

/// For profiling (`perf record -a` around it): runs one path at pods=10000 policies=1000 for
/// about `seconds` (kind: `established`, `established-ct` (flow cache off), `denied`, `new`
/// (single runs), `new-flows` (a new flow per repetition), `syn-tracked` (an allowed SYN whose
/// tuple has a live entry) or `pass`, IPv4).
pub(crate) fn spin(kind: &str, seconds: u64) {
    let snapshot = synth::cluster(10_000, 1_000, 100);
    let mut e = Enforcer::new(None).expect("load the datapath (root required)");
    assert_eq!(e.apply(&snapshot).sync.failed, 0);
    let allowed = packet(false, synth::ALLOWED_PEER, TCP_SYN);
    let (prog, pkt, want) = match kind {
        "established" | "established-ct" => {
            if kind == "established-ct" {
                e.datapath_mut()
                    .set_flow_cache(false)
                    .expect("flow cache off");
            }
            let r = e
                .datapath()
                .test_run(PROG_TO_POD, &allowed, 1, 1)
                .expect("run");
            assert_eq!(r.retval, TC_ACT_PIPE);
            (
                PROG_TO_POD,
                packet(false, synth::ALLOWED_PEER, TCP_ACK),
                TC_ACT_PIPE,
            )
        }
        "denied" => (
            PROG_TO_POD,
            packet(false, synth::DENIED_PEER, TCP_SYN),
            TC_ACT_SHOT,
        ),
        "syn-tracked" => {
            let r = e
                .datapath()
                .test_run(PROG_TO_POD, &allowed, 1, 1)
                .expect("run");
            assert_eq!(r.retval, TC_ACT_PIPE);
            (PROG_TO_POD, allowed, TC_ACT_PIPE)
        }
        "new-flows" => {
            e.datapath_mut()
                .load_bench_programs()
                .expect("load the benchmark programs");
            let mut ct = take_ct(&mut e);
            let start = std::time::Instant::now();
            while start.elapsed().as_secs() < seconds {
                let (ns, bump) = new_flows(&e, &mut ct, &allowed, 25_000, 5);
                eprintln!("new-flows: {ns} ns, bump alone {bump} ns");
            }
            return;
        }
        "new" => {
            let mut ct = take_ct(&mut e);
            let key = ct_key_of(&e, &mut ct, &allowed);
            let start = std::time::Instant::now();
            while start.elapsed().as_secs() < seconds {
                let ns = singles(
                    &e,
                    &mut ct,
                    &key,
                    PROG_TO_POD,
                    &allowed,
                    10_000,
                    TC_ACT_PIPE,
                    true,
                );
                eprintln!("new (single runs, raw): {ns} ns");
            }
            return;
        }
        _ => (PROG_PASS, allowed, TC_ACT_PIPE),
    };
    let start = std::time::Instant::now();
    while start.elapsed().as_secs() < seconds {
        let ns = repeated(&e, prog, &pkt, 1_000_000, 1, want);
        eprintln!("{kind}: {ns} ns");
    }
}

pub(crate) fn run(p: &Params, sink: &mut Sink) {
    for &pods in &p.pods {
        for &policies in &p.policies {
            let snapshot = synth::cluster(pods, policies, 100);
            let mut e = Enforcer::new(None).expect("load the datapath (root required)");
            let report = e.apply(&snapshot);
            assert_eq!(report.sync.failed, 0, "programming the maps failed");
            e.datapath_mut()
                .load_bench_programs()
                .expect("load the benchmark programs");
            let mut ct = take_ct(&mut e);
            let size = format!("pods={pods} policies={policies}");
            eprintln!(
                "per-packet {size}: {} policy entries, {} identities",
                report.map_entries.policy, report.map_entries.identities
            );
            for v6 in [false, true] {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                let denied = packet(v6, synth::DENIED_PEER, TCP_SYN);
                let allowed = packet(v6, synth::ALLOWED_PEER, TCP_SYN);
                let est = packet(v6, synth::ALLOWED_PEER, TCP_ACK);
                // A SYN-ACK for the row without the insert (a SYN would do as well).
                let syn_ack = packet(v6, synth::ALLOWED_PEER, TCP_SYN | TCP_ACK);

                let key = ct_key_of(&e, &mut ct, &allowed);
                let new_denied =
                    repeated(&e, PROG_TO_POD, &denied, p.repeat, p.rounds, TC_ACT_SHOT);
                let pass_rep = repeated(&e, PROG_PASS, &allowed, p.repeat, p.rounds, TC_ACT_PIPE);
                let pass_one = singles(
                    &e,
                    &mut ct,
                    &key,
                    PROG_PASS,
                    &allowed,
                    p.singles,
                    TC_ACT_PIPE,
                    false,
                );
                let new_allowed_raw = singles(
                    &e,
                    &mut ct,
                    &key,
                    PROG_TO_POD,
                    &allowed,
                    p.singles,
                    TC_ACT_PIPE,
                    true,
                );
                let new_allowed_single = new_allowed_raw - (pass_one - pass_rep);
                let (new_flows_raw, bump) = new_flows(&e, &mut ct, &allowed, p.flows, p.rounds);
                // The bump's own cost (bump program − pass-only) taken off.
                let new_allowed = new_flows_raw - (bump - pass_rep);
                // A live entry for the tuple that the SYN-ACK does not match (as if the flow had
                // been opened the other way): the conntrack lookup and the whole allowed
                // policy path, no insert, no refresh.
                let first = e
                    .datapath()
                    .test_run(PROG_TO_POD, &allowed, 1, 1)
                    .expect("BPF_PROG_TEST_RUN");
                assert_eq!(first.retval, TC_ACT_PIPE);
                let mut v = ct.get(&key);
                v.origin_dir = DIR_EGRESS;
                v.expires_ns = u64::MAX / 2;
                ct.insert(&key, v);
                let new_allowed_no_insert =
                    repeated(&e, PROG_TO_POD, &syn_ack, p.repeat, p.rounds, TC_ACT_PIPE);
                assert_eq!(ct.get(&key), v, "the mismatching entry is left alone");
                assert!(ct.remove(&key), "remove the entry");
                // Create the entry, then time the hits.
                let first = e
                    .datapath()
                    .test_run(PROG_TO_POD, &allowed, 1, 1)
                    .expect("BPF_PROG_TEST_RUN");
                assert_eq!(first.retval, TC_ACT_PIPE);
                let syn_tracked =
                    repeated(&e, PROG_TO_POD, &allowed, p.repeat, p.rounds, TC_ACT_PIPE);
                let established = repeated(&e, PROG_TO_POD, &est, p.repeat, p.rounds, TC_ACT_PIPE);
                // The same packets through the conntrack lookup: what a flow pays on a flow-
                // cache miss (first packet on a CPU, a slot taken by another flow, once per
                // second for the refresh).
                e.datapath_mut()
                    .set_flow_cache(false)
                    .expect("flow cache off");
                let established_ct =
                    repeated(&e, PROG_TO_POD, &est, p.repeat, p.rounds, TC_ACT_PIPE);
                assert_eq!(ct_clear(&mut ct), 1, "one tracked flow");
                // On again, with a fresh generation (the entry it copied is gone).
                e.datapath_mut()
                    .set_flow_cache(true)
                    .expect("flow cache on");

                let mut row = |figure: &str, value: f64, target: Option<f64>| {
                    sink.push(Row {
                        section: "1 per-packet".into(),
                        figure: format!("{figure}, {fam}"),
                        size: size.clone(),
                        pods: Some(pods),
                        policies: Some(policies),
                        value: Some(value),
                        unit: "ns".into(),
                        target_max: target,
                        note: None,
                    });
                };
                row("new connection, allowed", new_allowed, Some(150.0));
                row(
                    "new connection, allowed, single-run method",
                    new_allowed_single,
                    None,
                );
                row(
                    "new connection, allowed, new-flow program raw",
                    new_flows_raw,
                    None,
                );
                row("source-port bump program", bump, None);
                row("new connection, denied", new_denied, Some(150.0));
                row("established (flow-cache hit)", established, Some(60.0));
                row(
                    "established, flow cache off (conntrack hit)",
                    established_ct,
                    Some(60.0),
                );
                row(
                    "new connection, allowed, without the conntrack insert (repeated)",
                    new_allowed_no_insert,
                    None,
                );
                row(
                    "new connection, allowed, SYN on a tracked tuple (repeated)",
                    syn_tracked,
                    None,
                );
                row("pass-only program", pass_rep, None);
                // The enforcement's own share: what the classifier adds to the harness floor.
                row(
                    "established, net of the pass-only program",
                    established - pass_rep,
                    None,
                );
                row(
                    "established, flow cache off, net of the pass-only program",
                    established_ct - pass_rep,
                    None,
                );
                row(
                    "new connection, denied, net of the pass-only program",
                    new_denied - pass_rep,
                    None,
                );
                row(
                    "new connection, allowed, single-run raw",
                    new_allowed_raw,
                    None,
                );
                row("pass-only program, single-run raw", pass_one, None);
            }
        }
    }
}

/// The machine's floor under any per-flow state: the time of one load from a random cache
/// line of a buffer of each size, when its address depends on the previous load (a pointer
/// chase through every line once, in a random order), in ns per load, median of `rounds`
/// passes. The buffer has 4 KiB pages where transparent huge pages are madvise-only (this
/// machine's setting); the page size of the kernel's conntrack maps (`NPM_CT4` 26 MiB,
/// `NPM_CT` 32 MiB) was not checked. A new flow's entry lands on such a line, so the line's miss is what an insert
/// costs at the least once the flows in use outgrow the caches. This is measured in
/// userspace: it stands for the kernel's memory, it is not a run of the classifier.
pub(crate) fn memory_floor(full: bool, sink: &mut Sink) {
    let (sizes_mib, rounds): (&[usize], usize) = if full {
        (&[1, 8, 32, 64], 5)
    } else {
        (&[1, 32], 3)
    };
    for &mib in sizes_mib {
        let ns = dependent_load_ns(mib, rounds);
        sink.push(Row {
            section: "1 per-packet".into(),
            figure: "machine: one dependent load from a random cache line (userspace)".into(),
            size: format!("buffer={mib} MiB"),
            pods: None,
            policies: None,
            value: Some(ns),
            unit: "ns".into(),
            target_max: None,
            note: None,
        });
    }
}

fn dependent_load_ns(mib: usize, rounds: usize) -> f64 {
    const WORDS_PER_LINE: usize = 64 / std::mem::size_of::<usize>();
    let lines = (mib << 20) / 64;
    // A random cyclic order of the lines (Fisher–Yates, xorshift64 with a fixed seed).
    let mut order: Vec<usize> = (0..lines).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut buf = vec![0usize; lines * WORDS_PER_LINE];
    for (w, &line) in order.iter().enumerate() {
        buf[line * WORDS_PER_LINE] = order[(w + 1) % lines] * WORDS_PER_LINE;
    }
    let mut at = order[0] * WORDS_PER_LINE;
    // One untimed pass, so every page is mapped and the caches hold what they will.
    for _ in 0..lines {
        at = buf[at];
    }
    let loads = lines.max(4_000_000);
    let mut per_load = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        for _ in 0..loads {
            at = std::hint::black_box(buf[at]);
        }
        per_load.push(t.elapsed().as_nanos() as f64 / loads as f64);
    }
    std::hint::black_box(at);
    median(&mut per_load)
}
