//! A new pod is isolated from its very first packet (issue #4): `npm-agent run` watches links
//! appear, attaches to a new pod interface and default-denies what a pod coming to this node
//! is isolated in, before the API (here: the manifests) knows the pod's IP. Real packets, the
//! real binary in a lab node's network namespace; a CNI is simulated with `ip`. Also measures
//! the time from interface creation to enforcement. Privileged (root), as CI runs.
#[path = "common/support.rs"]
mod support;
use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use support::{KillOnDrop, RemoveOnDrop, eventually_every};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::TcAttachType;
use npm_agent::datapath::tcx_programs;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{ContainerPort, Pod, Protocol};
use npm_agent::netns::NetNs;
use npm_common::maps::ID_PENDING;
use npm_common::maps::{EP_ISOLATE_INGRESS, EndpointInfo, MAP_ENDPOINTS};

/// Sets a flag on drop: stops our sender/responder threads, also when the test fails.
struct StopOnDrop(Arc<AtomicBool>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn spawn_agent(node: &str, manifests: &Path, bpffs: &Path, prefix: &str, log: &Path) -> KillOnDrop {
    let log = std::fs::File::create(log).expect("log file");
    // nsenter (not `ip netns exec`, which remounts /sys and would hide bpffs).
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--node-name", "n1", "--poll-interval-ms", "200"])
        .args(["--pod-interface-prefix", prefix, "--manifests"])
        .arg(manifests)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn agent");
    KillOnDrop(child)
}

fn endpoints(bpffs: &Path) -> Option<HashMap<MapData, u32, EndpointInfo>> {
    let data = MapData::from_pin(
        bpffs
            .join(format!("v{}", npm_common::ABI_VERSION))
            .join(MAP_ENDPOINTS),
    )
    .ok()?;
    HashMap::try_from(Map::HashMap(data)).ok()
}

/// The endpoint of `ifindex`, its counter slot checked (every endpoint has one of its own
/// kind) and then shown as 0, since its number is the agent's choice.
fn entry(map: &HashMap<MapData, u32, EndpointInfo>, ifindex: u32) -> Option<EndpointInfo> {
    map.get(&ifindex, 0).ok().map(|e| {
        assert!(
            e.slot >= npm_common::metrics::SLOT_FIRST,
            "#{ifindex} has a counter slot: {e:?}"
        );
        EndpointInfo { slot: 0, ..e }
    })
}

/// The agent's "new pod interface enforced" lines, as key -> value maps.
fn enforced_lines(log: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("new pod interface enforced"))
        .map(|l| {
            strip_ansi(l)
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// What a pod's responder saw: UDP datagrams and TCP connections on port 9000, and when the
/// first of either arrived.
struct Responder {
    udp: Arc<AtomicU64>,
    tcp: Arc<AtomicU64>,
    first: Arc<std::sync::Mutex<Option<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Responder {
    /// Stops and joins the threads (they poll the flag every 50 ms at most).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Responder {
    /// Binds in `ns` (before its interface exists: a real listener waiting for traffic).
    fn start(ns: &NetNs, stop: &Arc<AtomicBool>) -> Responder {
        let (udp_sock, tcp_sock) = ns.run(|| {
            (
                UdpSocket::bind("0.0.0.0:9000").expect("udp bind"),
                TcpListener::bind("0.0.0.0:9000").expect("tcp bind"),
            )
        });
        let r = Responder {
            udp: Arc::default(),
            tcp: Arc::default(),
            first: Arc::default(),
            threads: Vec::new(),
            stop: stop.clone(),
        };
        udp_sock
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tcp_sock.set_nonblocking(true).expect("nonblocking");
        let (udp, first, stop1) = (r.udp.clone(), r.first.clone(), stop.clone());
        let t1 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            // Bounded by the stop flag (set on drop) and a hard cap of 10 minutes.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop1.load(Ordering::SeqCst) && Instant::now() < deadline {
                if udp_sock.recv(&mut buf).is_ok() {
                    first.lock().expect("lock").get_or_insert_with(Instant::now);
                    udp.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let (tcp, first, stop2) = (r.tcp.clone(), r.first.clone(), stop.clone());
        let t2 = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match tcp_sock.accept() {
                    Ok(_) => {
                        first.lock().expect("lock").get_or_insert_with(Instant::now);
                        tcp.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let mut r = r;
        r.threads = vec![t1, t2];
        r
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.udp.load(Ordering::SeqCst),
            self.tcp.load(Ordering::SeqCst),
        )
    }

    fn first(&self) -> Option<Instant> {
        *self.first.lock().expect("lock")
    }
}

/// Sends UDP datagrams (one per ms) and TCP connection attempts (one at a time, 100 ms
/// timeout) to `dst:9000` from `ns` until `stop`, on threads of scope `scope`. Returns the
/// count of datagrams the kernel accepted for sending.
fn start_sender<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    ns: &'scope NetNs,
    dst: [u8; 4],
    stop: &Arc<AtomicBool>,
) -> Arc<AtomicU64> {
    let to = SocketAddr::from((dst, 9000));
    let udp = ns.run(|| UdpSocket::bind("0.0.0.0:0").expect("udp bind"));
    let sent = Arc::new(AtomicU64::new(0));
    let (sent1, stop1) = (sent.clone(), stop.clone());
    scope.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop1.load(Ordering::SeqCst) && Instant::now() < deadline {
            // Before the route exists the node answers "unreachable": not counted as sent.
            if udp.send_to(b"x", to).is_ok() {
                sent1.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let stop2 = stop.clone();
    scope.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
            let _ = ns.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(100)));
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    sent
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-ingress, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#;

/// `a/new` (isolated by `deny-all-ingress`) and `b/free` (no policy) are scheduled to n1 but
/// have no IP yet; `b/client` runs (its IP is known).
fn pods_yaml(new_ip: Option<&str>) -> String {
    let status = new_ip
        .map(|ip| format!("status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: b, labels: {{app: client}}}}
spec: {{containers: [{{name: c, image: busybox}}]}}
status: {{podIP: 10.247.0.3, podIPs: [{{ip: 10.247.0.3}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: new, namespace: a, labels: {{app: db}}}}
spec: {{nodeName: n1, containers: [{{name: db, image: db, ports: [{{containerPort: 9000}}]}}]}}
{status}
---
apiVersion: v1
kind: Pod
metadata: {{name: free, namespace: b, labels: {{app: free}}}}
spec: {{nodeName: n1, containers: [{{name: f, image: f, ports: [{{containerPort: 9000}}]}}]}}
"#
    )
}

/// What a CNI does for a pod: a veth pair with the pod end moved into the pod's netns, the
/// pod's address and default route, the node's host route and neighbour entry. Two `ip
/// -batch` runs, back to back. Returns when the link was created (the node batch returned).
fn cni_add(node: &NetNs, pod: &NetNs, host_if: &str, ip: &str, n: u8) -> Instant {
    let host_mac = format!("02:6e:71:00:00:{n:02x}");
    let pod_mac = format!("02:6e:72:00:00:{n:02x}");
    node.ip_batch(&[
        format!(
            "link add {host_if} address {host_mac} type veth peer name eth0 address {pod_mac} netns {}",
            pod.name()
        ),
        format!("link set {host_if} up"),
        format!("route add {ip}/32 dev {host_if}"),
        format!("neigh replace {ip} lladdr {pod_mac} dev {host_if} nud permanent"),
    ])
    .expect("node side of the CNI");
    let created = Instant::now();
    pod.ip_batch(&[
        "link set lo up".to_owned(),
        "link set eth0 up".to_owned(),
        format!("addr add {ip}/32 dev eth0"),
        format!("neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"),
        "route add 0.0.0.0/0 via 169.254.1.1 dev eth0 onlink".to_owned(),
    ])
    .expect("pod side of the CNI");
    created
}

/// The hooks of pod interface `name` in `ns`: the tcx programs on ingress and egress, and
/// `tc filter show` of both hooks (cls_bpf filters). Panics when `tc` fails (it cannot be
/// run, or exits non-zero): an empty listing must mean no filter, not no answer.
fn hooks_of(ns: &NetNs, name: &str) -> (Vec<String>, Vec<String>, String) {
    let tcx = |hook| ns.run(|| tcx_programs(name, hook)).expect("tcx programs");
    let filters = ["ingress", "egress"]
        .iter()
        .map(|h| {
            // NetNs::exec is an error on a non-zero exit status (with tc's stderr).
            ns.exec(&["tc", "filter", "show", "dev", name, h])
                .unwrap_or_else(|e| panic!("tc filter show dev {name} {h}: {e}"))
        })
        .collect::<String>();
    (
        tcx(TcAttachType::Ingress),
        tcx(TcAttachType::Egress),
        filters,
    )
}

/// Our two programs are on tcx, one on each hook, and no cls_bpf filter runs ours.
fn on_tcx_only(ns: &NetNs, name: &str) -> bool {
    let (ingress, egress, filters) = hooks_of(ns, name);
    ingress == ["npm_from_pod"] && egress == ["npm_to_pod"] && !filters.contains("npm_")
}

fn ifindex_in(ns: &NetNs, name: &str) -> u32 {
    let out = ns
        .ip(&["-o", "link", "show", "dev", name])
        .expect("ip link");
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("ifindex")
}

#[test]
fn new_pod_is_isolated_from_its_first_packet_and_an_unisolated_one_is_not_stalled() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm{pid}-newpod"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm{pid}-newpod"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), pods_yaml(None)).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");
    let log = std::env::temp_dir().join(format!("npm{pid}-newpod.log"));
    let _log = RemoveOnDrop(log.clone());

    let lab = Lab::build(LabSpec {
        pods: vec![Pod {
            namespace: "b".into(),
            name: "client".into(),
            labels: [("app".to_string(), "client".to_string())].into(),
            ips: vec!["10.247.0.3".parse().expect("ip")],
            node_name: None,
            host_network: false,
            terminating: false,
            finished: false,
            ports: vec![ContainerPort {
                name: None,
                port: 80,
                protocol: Protocol::Tcp,
            }],
        }],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node();
    let client = lab.netns_of("b/client").expect("client netns");
    let prefix = format!("npm{pid}");
    let _agent = spawn_agent(node.name(), &manifests, &bpffs, &prefix, &log);

    // Ready: the client's interface has its endpoint.
    let (_, client_if) = lab
        .pod_interfaces()
        .into_values()
        .next()
        .expect("client if");
    assert!(
        eventually_every(Duration::from_secs(20), Duration::from_millis(50), || {
            endpoints(&bpffs).is_some_and(|m| entry(&m, client_if).is_some())
        }),
        "agent up and enforcing"
    );
    let map = endpoints(&bpffs).expect("endpoints map");

    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let new_ns = NetNs::create(&format!("npm{pid}-new")).expect("pod netns");
    new_ns
        .sysctl("net.ipv4.conf.all.rp_filter", "0")
        .expect("sysctl");
    let free_ns = NetNs::create(&format!("npm{pid}-free")).expect("pod netns");
    let new_rx = Responder::start(&new_ns, &stop);
    let free_rx = Responder::start(&free_ns, &stop);

    std::thread::scope(|scope| {
        let _stop = StopOnDrop(stop.clone());
        // The peer fires at the new pod's address before the pod even exists.
        let sent = start_sender(scope, client, [10, 247, 1, 10], &stop);
        std::thread::sleep(Duration::from_millis(100));
        let host_if = format!("{prefix}n");
        let created = cni_add(node, &new_ns, &host_if, "10.247.1.10", 1);
        let cni_done = created.elapsed();
        let ifindex = ifindex_in(node, &host_if);

        // 1. The API does not know the pod's IP yet: the pending endpoint denies ingress.
        let sent_before = sent.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1500));
        let sent_pending = sent.load(Ordering::SeqCst) - sent_before;
        assert!(
            sent_pending > 500,
            "the peer kept sending once the route existed ({sent_pending})"
        );
        assert_eq!(
            new_rx.counts(),
            (0, 0),
            "nothing reaches the new pod while it is pending ({sent_pending} datagrams sent)"
        );
        let e = entry(&map, ifindex).expect("pending endpoint written");
        assert_eq!(
            e,
            EndpointInfo {
                id: ID_PENDING,
                flags: EP_ISOLATE_INGRESS,
                slot: 0,
            }
        );

        // 2. The manifests gain the pod's IP: discovery ties the link to a/new, whose own
        // identity replaces the pending one, still denying ingress.
        std::fs::write(manifests.join("pods.yaml"), pods_yaml(Some("10.247.1.10")))
            .expect("rewrite pods");
        assert!(
            eventually_every(Duration::from_secs(10), Duration::from_millis(20), || {
                entry(&map, ifindex).is_some_and(|e| e.id != ID_PENDING)
            }),
            "the pod's identity replaced the pending one"
        );
        let placed = entry(&map, ifindex).expect("entry");
        assert_eq!(placed.flags, EP_ISOLATE_INGRESS);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            new_rx.counts(),
            (0, 0),
            "nothing reached the new pod, before or after its IP was known"
        );
        println!(
            "isolated pod: CNI simulation took {cni_done:?}; {} datagrams + TCP attempts sent, 0 received",
            sent.load(Ordering::SeqCst)
        );

        // 3. A pod no policy isolates (b/free, the only pod still coming): its pending
        // endpoint isolates nothing, so its traffic flows at once.
        let sent_free = start_sender(scope, client, [10, 247, 1, 11], &stop);
        std::thread::sleep(Duration::from_millis(100));
        let free_if = format!("{prefix}f");
        let created = cni_add(node, &free_ns, &free_if, "10.247.1.11", 2);
        assert!(
            eventually_every(Duration::from_secs(5), Duration::from_millis(1), || free_rx
                .first()
                .is_some()),
            "traffic reaches the unisolated new pod ({} sent)",
            sent_free.load(Ordering::SeqCst)
        );
        let first = free_rx.first().expect("first packet");
        let delay = first.saturating_duration_since(created);
        let free_index = ifindex_in(node, &free_if);
        assert_eq!(
            entry(&map, free_index),
            Some(EndpointInfo {
                id: ID_PENDING,
                flags: 0,
                slot: 0,
            }),
            "its interface is managed (pending, not isolated)"
        );
        println!("unisolated pod: first packet received {delay:?} after its link was created");
        assert!(delay < Duration::from_secs(1), "no stall: {delay:?}");
        assert_eq!(new_rx.counts(), (0, 0));
        stop.store(true, Ordering::SeqCst);
    });

    let lines = enforced_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l.get("interface") == Some(&format!("{prefix}n"))
                && l.get("flags").map(String::as_str) == Some("1")),
        "the agent logged the fast path for the new pod: {lines:?}"
    );
    for l in &lines {
        println!(
            "agent: {} attached {} us and endpoint written {} us after the RTM_NEWLINK",
            l["interface"], l["attach_us"], l["endpoint_us"]
        );
    }
    drop(new_rx);
    drop(free_rx);
    drop(new_ns);
    drop(free_ns);
    drop(lab);
}

#[test]
fn time_from_link_creation_to_enforcement() {
    const LINKS: u32 = 60;
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm{pid}-linktime"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm{pid}-linktime"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), pods_yaml(None)).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");
    let log = std::env::temp_dir().join(format!("npm{pid}-linktime.log"));
    let _log = RemoveOnDrop(log.clone());
    let node = NetNs::create(&format!("npm{pid}-lt")).expect("netns");
    let prefix = format!("npm{pid}");
    let agent = spawn_agent(node.name(), &manifests, &bpffs, &prefix, &log);
    assert!(
        eventually_every(Duration::from_secs(20), Duration::from_millis(50), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("maps in step"))
        }),
        "agent up"
    );
    let map = endpoints(&bpffs).expect("endpoints map");

    let mut to_entry = Vec::new();
    let mut created_at = BTreeMap::new();
    for i in 0..LINKS {
        let name = format!("{prefix}m{i}");
        // A fixed ifindex, so the test polls the map without asking the kernel first.
        let ifindex = 5000 + i;
        node.ip(&[
            "link",
            "add",
            &name,
            "index",
            &ifindex.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            &format!("x{pid}m{i}"),
        ])
        .expect("link add");
        let t0 = Instant::now();
        created_at.insert(name.clone(), unix_us(SystemTime::now()));
        let mut seen = None;
        // Bounded: 2 s per link.
        while t0.elapsed() < Duration::from_secs(2) {
            if let Some(e) = entry(&map, ifindex) {
                seen = Some((t0.elapsed(), e));
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let (took, e) = seen.unwrap_or_else(|| panic!("no endpoint for {name} within 2 s"));
        // The pending entry goes in first, then the programs (the agent logs when): wait for
        // them before the link goes. The fast path puts cls_bpf filters on; the agent then
        // moves the link to tcx and removes them.
        assert!(
            eventually_every(Duration::from_secs(2), Duration::from_millis(1), || {
                let (ingress, egress, filters) = hooks_of(&node, &name);
                (ingress == ["npm_from_pod"] || filters.contains("npm_from_pod"))
                    && (egress == ["npm_to_pod"] || filters.contains("npm_to_pod"))
            }),
            "programs on {name}: {:?}",
            hooks_of(&node, &name)
        );
        if i == 0 {
            assert!(
                eventually_every(Duration::from_secs(10), Duration::from_millis(10), || {
                    on_tcx_only(&node, &name)
                }),
                "{name} moved to tcx, filters removed: {:?}",
                hooks_of(&node, &name)
            );
        }
        assert_eq!(
            e,
            EndpointInfo {
                id: ID_PENDING,
                flags: EP_ISOLATE_INGRESS,
                slot: 0,
            }
        );
        to_entry.push(took.as_micros() as i64);
        node.ip(&["link", "del", &name]).expect("link del");
        assert!(
            eventually_every(Duration::from_secs(5), Duration::from_millis(1), || entry(
                &map, ifindex
            )
            .is_none()),
            "the pending endpoint of {name} goes with its link"
        );
    }

    // A burst (a node starting many pods at once): one `ip -batch` adds them all.
    const BURST: u32 = 50;
    let burst: Vec<(String, u32)> = (0..BURST)
        .map(|i| (format!("{prefix}b{i}"), 6000 + i))
        .collect();
    let add: Vec<String> = burst
        .iter()
        .enumerate()
        .map(|(i, (name, index))| {
            format!("link add {name} index {index} type veth peer name y{pid}b{i}")
        })
        .collect();
    let started = Instant::now();
    node.ip_batch(&add).expect("burst add");
    let t0 = Instant::now();
    assert!(
        eventually_every(Duration::from_secs(10), Duration::from_micros(100), || {
            burst.iter().all(|(_, i)| entry(&map, *i).is_some())
        }),
        "every link of the burst gets its pending endpoint"
    );
    println!(
        "burst of {BURST} links: all pending endpoints written {} us after `ip -batch` returned \
         ({} us after it started)",
        t0.elapsed().as_micros(),
        started.elapsed().as_micros()
    );
    let del: Vec<String> = burst
        .iter()
        .map(|(name, _)| format!("link del {name}"))
        .collect();
    node.ip_batch(&del).expect("burst del");
    assert!(
        eventually_every(Duration::from_secs(10), Duration::from_millis(1), || burst
            .iter()
            .all(|(_, i)| entry(&map, *i).is_none())),
        "and loses it with its link"
    );

    // A link made while no agent runs is pending for the next agent (listed at start).
    drop(agent);
    node.ip(&[
        "link",
        "add",
        &format!("{prefix}r"),
        "index",
        "7000",
        "type",
        "veth",
        "peer",
        "name",
        &format!("z{pid}r"),
    ])
    .expect("link add");
    assert_eq!(entry(&map, 7000), None, "no agent, no entry yet");
    let log2 = std::env::temp_dir().join(format!("npm{pid}-linktime2.log"));
    let _log2 = RemoveOnDrop(log2.clone());
    let agent = spawn_agent(node.name(), &manifests, &bpffs, &prefix, &log2);
    assert!(
        eventually_every(
            Duration::from_secs(20),
            Duration::from_millis(10),
            || entry(&map, 7000)
                == Some(EndpointInfo {
                    id: ID_PENDING,
                    flags: EP_ISOLATE_INGRESS,
                    slot: 0,
                })
        ),
        "the restarted agent isolates the link that appeared while it was away"
    );
    // Listed at start, not a link event: attached by tcx at once.
    assert!(
        on_tcx_only(&node, &format!("{prefix}r")),
        "programs attached: {:?}",
        hooks_of(&node, &format!("{prefix}r"))
    );
    drop(agent);

    let lines = enforced_lines(&log);
    let mut from_event_attach = Vec::new();
    let mut from_event_entry = Vec::new();
    let mut from_add_attach = Vec::new();
    for l in &lines {
        let Some(t0) = l.get("interface").and_then(|n| created_at.get(n)) else {
            continue;
        };
        let num = |k: &str| l.get(k).and_then(|v| v.parse::<i64>().ok()).expect(k);
        from_event_attach.push(num("attach_us"));
        from_event_entry.push(num("endpoint_us"));
        from_add_attach.push(num("attached_unix_us") - t0);
    }
    let logged: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.get("interface").map(String::as_str))
        .collect();
    let unlogged: Vec<&String> = created_at
        .keys()
        .filter(|n| !logged.contains(n.as_str()))
        .collect();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let about: Vec<&str> = text
        .lines()
        .filter(|l| unlogged.iter().any(|n| l.contains(n.as_str())))
        .collect();
    assert_eq!(
        from_event_attach.len(),
        LINKS as usize,
        "one fast-path line per link; none for {unlogged:?}; the agent's lines on them: {about:#?}"
    );
    for (what, v) in [
        (
            "`ip link add` returned -> ENDPOINTS entry seen by the test",
            &mut to_entry,
        ),
        (
            "`ip link add` returned -> programs attached (agent clock)",
            &mut from_add_attach,
        ),
        (
            "RTM_NEWLINK read -> programs attached",
            &mut from_event_attach,
        ),
        (
            "RTM_NEWLINK read -> ENDPOINTS entry written",
            &mut from_event_entry,
        ),
    ] {
        v.sort();
        println!(
            "{what}: p50 {} us, p99 {} us, max {} us (n={})",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1],
            v.len()
        );
    }
    drop(node);
}

/// A bridged CNI (kube-router, Azure CNI bridge mode): the pod's veth is a port of the node's
/// bridge, and discovery finds it through the bridge's neighbour and forwarding tables once
/// the pod's IP is known. The new port is isolated from its first packet all the same; once
/// the policy goes, the same path carries the peer's traffic (the path worked all along).
#[test]
fn new_pod_on_a_bridge_is_isolated_from_its_first_packet() {
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm{pid}-bridged"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm{pid}-bridged"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    let pods = |ip: Option<&str>| pods_yaml(ip).replace("10.247.1.10", "10.246.0.10");
    std::fs::write(manifests.join("pods.yaml"), pods(None)).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICY).expect("write policy");
    let log = std::env::temp_dir().join(format!("npm{pid}-bridged.log"));
    let _log = RemoveOnDrop(log.clone());

    let lab = Lab::build(LabSpec {
        pods: vec![Pod {
            namespace: "b".into(),
            name: "client".into(),
            labels: [("app".to_string(), "client".to_string())].into(),
            ips: vec!["10.247.0.3".parse().expect("ip")],
            node_name: None,
            host_network: false,
            terminating: false,
            finished: false,
            ports: vec![],
        }],
        externals: vec![],
    })
    .expect("lab");
    let node = lab.node();
    let client = lab.netns_of("b/client").expect("client netns");
    let prefix = format!("npm{pid}");
    let bridge = format!("{prefix}br");
    node.ip_batch(&[
        format!("link add {bridge} type bridge"),
        format!("addr add 10.246.0.1/24 dev {bridge}"),
        format!("link set {bridge} up"),
    ])
    .expect("bridge");
    let _agent = spawn_agent(node.name(), &manifests, &bpffs, &prefix, &log);
    let (_, client_if) = lab
        .pod_interfaces()
        .into_values()
        .next()
        .expect("client if");
    assert!(
        eventually_every(Duration::from_secs(20), Duration::from_millis(50), || {
            endpoints(&bpffs).is_some_and(|m| entry(&m, client_if).is_some())
        }),
        "agent up and enforcing"
    );
    let map = endpoints(&bpffs).expect("endpoints map");

    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let pod_ns = NetNs::create(&format!("npm{pid}-bnew")).expect("pod netns");
    let rx = Responder::start(&pod_ns, &stop);

    std::thread::scope(|scope| {
        let _stop = StopOnDrop(stop.clone());
        let sent = start_sender(scope, client, [10, 246, 0, 10], &stop);
        std::thread::sleep(Duration::from_millis(100));
        let port = format!("{prefix}b");
        node.ip_batch(&[
            format!(
                "link add {port} address 02:6e:73:00:00:01 type veth peer name eth0 address 02:6e:74:00:00:01 netns {}",
                pod_ns.name()
            ),
            format!("link set {port} master {bridge}"),
            format!("link set {port} up"),
        ])
        .expect("node side of the CNI");
        pod_ns
            .ip_batch(&[
                "link set lo up".to_owned(),
                "addr add 10.246.0.10/24 dev eth0".to_owned(),
                "link set eth0 up".to_owned(),
                "route add 0.0.0.0/0 via 10.246.0.1 dev eth0".to_owned(),
            ])
            .expect("pod side of the CNI");
        let ifindex = ifindex_in(node, &port);

        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(rx.counts(), (0, 0), "nothing reaches the pending port");
        assert_eq!(
            entry(&map, ifindex),
            Some(EndpointInfo {
                id: ID_PENDING,
                flags: EP_ISOLATE_INGRESS,
                slot: 0,
            })
        );

        // The IP becomes known: discovery goes bridge -> neighbour -> fdb -> this port.
        std::fs::write(manifests.join("pods.yaml"), pods(Some("10.246.0.10"))).expect("pods");
        assert!(
            eventually_every(Duration::from_secs(10), Duration::from_millis(20), || {
                entry(&map, ifindex).is_some_and(|e| e.id != ID_PENDING)
            }),
            "discovery tied the bridge port to a/new"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            rx.counts(),
            (0, 0),
            "nothing reached the pod, pending or placed"
        );

        // Control: without the policy the same path delivers at once.
        std::fs::remove_file(manifests.join("policy.yaml")).expect("rm policy");
        assert!(
            eventually_every(Duration::from_secs(10), Duration::from_millis(10), || rx
                .counts()
                .0
                > 0),
            "packets flow once nothing isolates the pod ({} sent)",
            sent.load(Ordering::SeqCst)
        );
        stop.store(true, Ordering::SeqCst);
    });
    drop(rx);
    drop(pod_ns);
    drop(lab);
}
