//! Conntrack sizing and occupancy on the real kernel: the maps sized from the configuration
//! (`LoadOptions::conntrack_entries`, the config's MaxConntrackEntries), their occupancy and
//! capacity as the metrics report them, and what happens when the shared table is full.
//!
//! Packets go through `BPF_PROG_TEST_RUN` as if they crossed interface 1 (`lo`); maps are
//! unpinned except in `pinned_maps_keep_their_size`, which uses a private bpffs directory
//! removed on drop. Requires root (CAP_BPF, CAP_NET_ADMIN); tests panic rather than skip.
#[path = "common/support.rs"]
mod support;
use support::RemoveOnDrop;

use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use npm_agent::datapath::{CounterReader, Datapath, DatapathCounters, LoadOptions};
use npm_agent::observe::Metrics;
use npm_common::maps::{
    Addr16, CtKey, CtKey4, CtValue, EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, EndpointInfo,
    MAP_CONNTRACK, MAP_CONNTRACK4, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS,
    MAP_POLICY, PAIR_TRIE, POLICY_PREFIX_FULL, PROG_FROM_POD, PROG_TO_POD, PROTO_TCP, PairKey,
    PairValue, PeerInfo, PolicyKey, PolicyValue, addr_from_v4,
};
use npm_common::verdict::DIR_EGRESS;

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_PIPE: u32 = 3;
const IFINDEX: u32 = 1;
const LOCAL_ID: u32 = 100;
const PEER_ID: u32 = 200;
const POD: [u8; 4] = [10, 0, 0, 1];
const PEER: [u8; 4] = [10, 0, 0, 2];
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The configured size of each conntrack map in these tests.
const SMALL: u32 = 64;

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, PROTO_TCP, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// The IPv4 conntrack key of the flow POD:`sport` -> PEER:80 (the datapath's sorted pair).
fn key(sport: u16) -> CtKey4 {
    let (a, b): (Addr16, Addr16) = (addr_from_v4(POD), addr_from_v4(PEER));
    let ((addr_lo, port_lo), (addr_hi, port_hi)) = if (a, sport) <= (b, 80) {
        ((a, sport), (b, 80))
    } else {
        ((b, 80), (a, sport))
    };
    CtKey {
        addr_lo,
        addr_hi,
        ifindex: IFINDEX,
        port_lo_be: port_lo.to_be(),
        port_hi_be: port_hi.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
    .to_v4()
    .expect("IPv4 flow")
}

/// Keeps this thread on one CPU: the kernel's LRU keeps free lists per CPU, and the fill
/// below must use one of them to be deterministic.
fn stay_on_this_cpu() {
    // SAFETY: plain syscalls on a zeroed cpu_set_t of the right size.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

struct Env {
    dp: Datapath,
    ct4: HashMap<MapData, CtKey4, CtValue>,
    ct6: HashMap<MapData, CtKey, CtValue>,
    /// Checks the count against the map.
    counters: DatapathCounters,
    /// Handed to a `Metrics` (a second reader of the same maps).
    for_metrics: Option<DatapathCounters>,
}

impl Env {
    /// The datapath with `SMALL`-entry conntrack maps and one pod at `IFINDEX`, isolated both
    /// ways, allowed egress to PEER on TCP/80 only: replies come back through conntrack alone.
    fn new() -> Self {
        let mut dp = Datapath::load_with(
            None,
            LoadOptions {
                conntrack_entries: SMALL,
            },
        )
        .expect("load the datapath (root required)");
        let reader = |dp: &Datapath| {
            let handle = |name: &str| dp.map_handle(name).expect("map handle");
            DatapathCounters::from_maps(handle(MAP_METRICS), handle(MAP_ENDPOINTS))
                .and_then(|c| c.with_conntrack(handle(MAP_CONNTRACK4), handle(MAP_CONNTRACK)))
                .expect("counters")
        };
        let (counters, for_metrics) = (reader(&dp), Some(reader(&dp)));
        let mut take = |name: &str| dp.take_map(name).expect("map in object");
        let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
            HashMap::try_from(take(MAP_ENDPOINTS)).expect("endpoints");
        let mut identities: HashMap<MapData, Addr16, PeerInfo> =
            HashMap::try_from(take(MAP_IDENTITIES)).expect("identities");
        let mut policy: LpmTrie<MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(take(MAP_POLICY)).expect("policy");
        let mut pairs: HashMap<MapData, PairKey, PairValue> =
            HashMap::try_from(take(MAP_PAIRS)).expect("pairs");
        let ct4 = HashMap::try_from(take(MAP_CONNTRACK4)).expect("ct4");
        let ct6 = HashMap::try_from(take(MAP_CONNTRACK)).expect("ct");
        endpoints
            .insert(
                IFINDEX,
                EndpointInfo {
                    id: LOCAL_ID,
                    flags: EP_ISOLATE_INGRESS | EP_ISOLATE_EGRESS,
                    slot: 5,
                },
                0,
            )
            .expect("endpoint");
        identities
            .insert(
                addr_from_v4(PEER),
                PeerInfo {
                    id: PEER_ID,
                    ifindex: 0,
                    flags: 0,
                    class: 0,
                },
                0,
            )
            .expect("identity");
        // The pod's own address, on its interface, as the compiler writes it (the datapath
        // drops a new flow whose source is not the sending endpoint's).
        identities
            .insert(
                addr_from_v4(POD),
                PeerInfo {
                    id: LOCAL_ID,
                    ifindex: IFINDEX,
                    flags: 0,
                    class: 0,
                },
                0,
            )
            .expect("own identity");
        let pk = PolicyKey {
            local_id: LOCAL_ID,
            peer_id: PEER_ID,
            dir: DIR_EGRESS,
            proto: PROTO_TCP,
            dport_be: 80u16.to_be(),
        };
        policy
            .insert(&Key::new(POLICY_PREFIX_FULL, pk), PolicyValue::default(), 0)
            .expect("policy");
        pairs
            .insert(
                PairKey {
                    local_id: LOCAL_ID,
                    peer_id: PEER_ID,
                    dir: DIR_EGRESS,
                    _pad: [0; 3],
                },
                PairValue {
                    flags: PAIR_TRIE,
                    ports: Default::default(),
                },
                0,
            )
            .expect("pair");
        Self {
            dp,
            ct4,
            ct6,
            counters,
            for_metrics,
        }
    }

    fn run(&self, prog: &str, packet: &[u8]) -> u32 {
        self.dp
            .test_run(prog, packet, IFINDEX, 1)
            .expect("BPF_PROG_TEST_RUN")
            .retval
    }

    /// The pod opens POD:`sport` -> PEER:80 (egress allowed: a conntrack entry).
    fn open(&self, sport: u16) {
        let syn = tcp4(POD, PEER, sport, 80, TCP_SYN);
        assert_eq!(self.run(PROG_FROM_POD, &syn), TC_ACT_PIPE, "SYN {sport}");
    }

    /// What the map holds, walked here (independently of the metrics' reader).
    fn entries(&self) -> (u32, u32) {
        let (mut n4, mut n6) = (0u32, 0u32);
        for k in self.ct4.keys().take(10_000) {
            k.expect("IPv4 key");
            n4 += 1;
        }
        for k in self.ct6.keys().take(10_000) {
            k.expect("IPv6 key");
            n6 += 1;
        }
        (n4, n6)
    }

    fn tracked(&self, sport: u16) -> bool {
        match self.ct4.get(&key(sport), 0) {
            Ok(_) => true,
            Err(aya::maps::MapError::KeyNotFound) => false,
            Err(e) => panic!("reading conntrack: {e}"),
        }
    }

    /// What the metrics report (a fresh count), checked against the map.
    fn check_reported(&self) -> (u32, u32) {
        let c = self
            .counters
            .conntrack_count(Duration::ZERO)
            .expect("count")
            .expect("conntrack maps");
        assert_eq!((c.ipv4_capacity, c.ipv6_capacity), (SMALL, SMALL));
        let (n4, n6) = self.entries();
        assert_eq!((c.ipv4, c.ipv6), (n4, n6), "reported = in the map");
        (n4, n6)
    }
}

/// The value of sample `series` in OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn a_full_conntrack_table_evicts_the_oldest_flows_and_their_replies_are_then_judged_anew() {
    stay_on_this_cpu();
    let mut env = Env::new();
    assert_eq!(env.check_reported(), (0, 0), "empty at load");

    // Flow 0 is established: the reply passes through conntrack alone (ingress is isolated
    // and allows nothing).
    env.open(1000);
    let syn_ack = tcp4(PEER, POD, 80, 1000, TCP_SYN | TCP_ACK);
    let ack_back = tcp4(PEER, POD, 80, 1000, TCP_ACK);
    assert_eq!(env.run(PROG_TO_POD, &syn_ack), TC_ACT_PIPE, "reply passes");
    assert!(env.tracked(1000));

    // Fill the table exactly: 64 flows, all tracked, reported as such.
    for i in 1..SMALL {
        env.open(1000 + u16::try_from(i).expect("small"));
    }
    assert_eq!(env.check_reported(), (SMALL, 0), "full");

    // The metrics page says the same (a reader counting for the first time).
    let metrics = Metrics::new();
    metrics.set_counter_reader(Box::new(env.for_metrics.take().expect("reader")));
    let page = metrics.encode_node().expect("encode");
    assert_eq!(
        sample(&page, "npm_conntrack_entries{family=\"ipv4\"}"),
        Some(f64::from(SMALL)),
        "{page}"
    );
    assert_eq!(
        sample(&page, "npm_conntrack_entries{family=\"ipv6\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "npm_conntrack_capacity{family=\"ipv4\"}"),
        Some(f64::from(SMALL))
    );
    assert_eq!(
        sample(&page, "npm_conntrack_capacity{family=\"ipv6\"}"),
        Some(f64::from(SMALL))
    );

    // A scan: 4 x 64 new flows that are never answered, through the same shared table. The
    // table never holds more than its size; unanswered flows are evicted first, the
    // established flow 0 stays (the kernel's LRU keeps an entry looked up since it was
    // written on its active list, and evicts from the inactive one).
    let mut low_water = SMALL;
    let mut sport = 1000 + u16::try_from(SMALL).expect("small");
    for _ in 0..4 * SMALL {
        env.open(sport);
        sport += 1;
        let (n4, _) = env.entries();
        assert!(n4 <= SMALL, "{n4} entries in a {SMALL}-entry map");
        low_water = low_water.min(n4);
    }
    assert!(env.tracked(sport - 1), "the newest flow is tracked");
    assert!(!env.tracked(1001), "the oldest unanswered flow was evicted");
    assert!(env.tracked(1000), "the established flow survives a scan");
    env.check_reported();

    // A noisy neighbour with real connections: 4 x 64 answered flows. Now flow 0, idle, is
    // evicted too.
    for _ in 0..4 * SMALL {
        env.open(sport);
        let reply = tcp4(PEER, POD, 80, sport, TCP_SYN | TCP_ACK);
        assert_eq!(env.run(PROG_TO_POD, &reply), TC_ACT_PIPE, "reply {sport}");
        sport += 1;
        let (n4, _) = env.entries();
        assert!(n4 <= SMALL, "{n4} entries in a {SMALL}-entry map");
        low_water = low_water.min(n4);
    }
    assert!(env.tracked(sport - 1), "the newest flow is tracked");
    assert!(!env.tracked(1000), "the idle established flow was evicted");
    env.check_reported();
    eprintln!(
        "a full {SMALL}-entry table went down to {low_water} entries at most while new flows \
         came in (the kernel's LRU evicts in batches)"
    );

    // Flow 0's entry is gone: its replies are judged as new ingress flows now, and the pod's
    // ingress allows nothing, so they are dropped. A SYN-ACK never comes from the flow cache;
    // a plain ACK may, for at most ~1 s (the cache's bound), then it is dropped too.
    assert_eq!(
        env.run(PROG_TO_POD, &syn_ack),
        TC_ACT_SHOT,
        "the evicted flow's reply is dropped"
    );
    let tick = env.dp.clock_ns_per_jiffy().expect("NPM_CLOCK");
    std::thread::sleep(Duration::from_secs(1) + Duration::from_nanos(2 * tick));
    assert_eq!(env.run(PROG_TO_POD, &ack_back), TC_ACT_SHOT);
    // The pod's own next segment re-creates the entry (egress allows it), and replies pass
    // again: the flow recovers when the pod sends, not when the peer does.
    let ack_out = tcp4(POD, PEER, 1000, 80, TCP_ACK);
    assert_eq!(env.run(PROG_FROM_POD, &ack_out), TC_ACT_PIPE);
    assert!(env.tracked(1000), "re-created by the pod's packet");
    assert_eq!(env.run(PROG_TO_POD, &ack_back), TC_ACT_PIPE);
}

#[test]
fn pinned_maps_keep_their_size() {
    let pid = std::process::id();
    let dir = PathBuf::from(format!("/sys/fs/bpf/npm-ctcap-{pid}"));
    let _pins = RemoveOnDrop(dir.clone());
    let capacity = |dp: &Datapath| {
        DatapathCounters::from_maps(
            dp.map_handle(MAP_METRICS).expect("metrics"),
            dp.map_handle(MAP_ENDPOINTS).expect("endpoints"),
        )
        .and_then(|c| {
            c.with_conntrack(
                dp.map_handle(MAP_CONNTRACK4).expect("ct4"),
                dp.map_handle(MAP_CONNTRACK).expect("ct"),
            )
        })
        .expect("counters")
        .conntrack()
        .expect("count")
        .map(|c| (c.ipv4_capacity, c.ipv6_capacity))
    };
    let first = Datapath::load_with(
        Some(&dir.join("v1")),
        LoadOptions {
            conntrack_entries: SMALL,
        },
    )
    .expect("first load");
    assert_eq!(capacity(&first), Some((SMALL, SMALL)));
    drop(first);
    // A restart configured larger adopts the pinned maps, which keep their size (a warning
    // says so); fresh pins take the new size.
    let second = Datapath::load_with(
        Some(&dir.join("v1")),
        LoadOptions {
            conntrack_entries: 4 * SMALL,
        },
    )
    .expect("second load");
    assert_eq!(capacity(&second), Some((SMALL, SMALL)), "adopted pins");
    drop(second);
    let _ = std::fs::remove_dir_all(dir.join("v1"));
    let third = Datapath::load_with(
        Some(&dir.join("v1")),
        LoadOptions {
            conntrack_entries: 4 * SMALL,
        },
    )
    .expect("third load");
    assert_eq!(capacity(&third), Some((4 * SMALL, 4 * SMALL)), "fresh pins");
}
