//! Part 2: real traffic between two lab pods (network namespaces behind veths on a lab node),
//! with enforcement off and on.
//!
//! Pods: `default/server` and `bench-client/client`. Configurations:
//! - `off`: no program attached;
//! - `pass-only program`: `npm_pass` (returns at once) on both hooks of both pods: what the TC
//!   hook costs by itself, the floor under any TC-based enforcer (its ratios carry no target);
//! - `kube-router`: the seed document's performance scenario: policy `default/npd` (all pods
//!   of `default`, three ipBlock 14.215.0.0/16 ingress rules on 9090, 8080, 80), 1,000
//!   services' pods (2, 6, 8 pods in turn: 5,332 remote pods) and `allow-client` (the client
//!   may reach the server, else npd would deny the measured traffic);
//! - `kube-router + 1000 policies`: the same plus 1,000 synthetic policies (synth.rs) in 100
//!   other namespaces.
//!
//! Within a round each tool runs once per configuration, the configurations back to back
//! (each round starting with the next one), and rounds repeat (12 short ones in `full`); the median per
//! figure is reported, and each on/off ratio is the median of the per-round (paired) ratios.
//! The client side runs on CPU 0 and the server side on CPU 1 (`CLIENT_CPU`, `SERVER_CPU`).
//! Each enforcing configuration has its own datapath (maps and programs), programmed once
//! before the first round; switching configurations only replaces the TC filters (or
//! removes them, for `off`), in milliseconds.
//!
//! Tools: sockperf ping-pong over TCP (latency p50/p99), iperf3 (TCP throughput), and for new
//! connections a small Rust load generator in this file (each worker connects, sends a
//! one-line HTTP/1.0 request, reads the response to EOF, closes; concurrency 1, 8, 32) against
//! a small Rust HTTP responder in the server pod: ab is not used. Processes we start are ended
//! by pid (Drop guard); the lab removes its namespaces on drop, also on panic.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use npm_agent::enforcer::Enforcer;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{Namespace, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule, Selector};
use npm_agent::netns::NetNs;
use npm_agent::state::ClusterSnapshot;
use npm_common::maps::{PROG_FROM_POD, PROG_PASS, PROG_TO_POD};

use crate::packet::median;
use crate::report::{Row, Sink};
use crate::synth;

const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 8080;

/// CPUs the client and the server side run on (every tool, thread and process of each side),
/// when the machine has two or more: unpinned, the scheduler placed them on one CPU in some
/// runs and on two in others, and iperf3 and sockperf were bimodal (first full run of
/// 2026-12-04: 11 or 16-19 Gbit/s, p50 8 or 10.5 µs, off and on alike).
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

fn pinning() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// Pins the calling thread to `cpu` (no-op on a single-CPU machine).
fn pin_thread(cpu: usize) {
    if !pinning() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays inside it (cpu < 1024),
    // and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `args` prefixed with `taskset -c cpu` when pinning.
fn on_cpu<'a>(cpu: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    if pinning() {
        v.extend(["taskset", "-c", cpu]);
    }
    v.extend_from_slice(args);
    v
}

/// A process started in a pod; killed (by its pid) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &NetNs, args: &[&str]) -> Proc {
    let child = ns.run(|| {
        Command::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    });
    Proc(child.unwrap_or_else(|e| panic!("starting {}: {e}", args[0])))
}

/// Waits (at most 10 s) until every port has a TCP listener in `ns`.
fn wait_listening(ns: &NetNs, ports: &[u16]) {
    for _ in 0..100 {
        let out = ns.exec(&["ss", "-Hltn"]).unwrap_or_default();
        let listening = |p: &u16| {
            out.lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|local| local.ends_with(&format!(":{p}")))
            })
        };
        if ports.iter().all(listening) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("servers did not start listening on {ports:?} within 10 s");
}

/// A tiny HTTP/1.0 responder in the server pod; stops when dropped.
struct Http {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Http {
    fn start(ns: &NetNs) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // The listener is created inside the namespace; the serving thread only uses its fd.
        let listener = ns
            .run(|| TcpListener::bind(("0.0.0.0", HTTP_PORT)))
            .expect("bind the HTTP responder");
        // A blocking accept, woken by each connection as a real server's accept (or epoll)
        // is, with a receive timeout (honoured by accept) only to notice `stop`. (It used to
        // poll a nonblocking accept with 200 µs sleeps: at concurrency 1 every connection
        // waited out a sleep, so the rate measured the sleep, about 3 950/s, whatever the
        // datapath did.)
        set_accept_timeout(&listener, Duration::from_millis(50));
        let thread = std::thread::spawn(move || {
            pin_thread(SERVER_CPU);
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                // An error is the timeout (EAGAIN): look at `stop` again.
                if let Ok((mut s, _)) = listener.accept() {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(
                        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    );
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// `SO_RCVTIMEO` on a listening socket: `accept` gives up after `timeout`.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO on the HTTP listener");
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Completed request/response connections per second at `concurrency`, for `secs`.
fn conn_rate(client: &NetNs, server: SocketAddr, concurrency: usize, secs: f64) -> f64 {
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    client.run(|| {
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| {
                    pin_thread(CLIENT_CPU);
                    let mut buf = [0u8; 256];
                    while Instant::now() < deadline {
                        let ok = (|| -> std::io::Result<()> {
                            let mut c =
                                TcpStream::connect_timeout(&server, Duration::from_secs(1))?;
                            c.set_read_timeout(Some(Duration::from_secs(1)))?;
                            c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                            let mut got = 0;
                            loop {
                                let n = c.read(&mut buf)?;
                                if n == 0 {
                                    break;
                                }
                                got += n;
                            }
                            if got == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            Ok(())
                        })();
                        match ok {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                });
            }
        });
    });
    let failed = failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "{failed} HTTP connections failed");
    done.load(Ordering::Relaxed) as f64 / secs
}

/// sockperf ping-pong over TCP: (p50, p99) one-way latency in µs as sockperf reports it.
fn latency(client: &NetNs, server: IpAddr, secs: u32) -> (f64, f64) {
    let (server, port, secs) = (
        server.to_string(),
        SOCKPERF_PORT.to_string(),
        secs.to_string(),
    );
    let args = [
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &server,
        "-p",
        &port,
        "-t",
        &secs,
    ];
    let cpu = CLIENT_CPU.to_string();
    let out = client
        .exec(&on_cpu(&cpu, &args))
        .expect("sockperf ping-pong");
    let pct = |p: &str| -> f64 {
        out.lines()
            .find(|l| l.contains("percentile") && l.contains(p))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no percentile {p} in sockperf output:\n{out}"))
    };
    (pct("50.000"), pct("99.000"))
}

/// iperf3 TCP throughput in Gbit/s (receiver side).
fn throughput(client: &NetNs, server: IpAddr, secs: u32) -> f64 {
    let (server, port, secs) = (server.to_string(), IPERF_PORT.to_string(), secs.to_string());
    let args = ["iperf3", "-c", &server, "-p", &port, "-t", &secs, "-J"];
    let cpu = CLIENT_CPU.to_string();
    let out = client.exec(&on_cpu(&cpu, &args)).expect("iperf3 client");
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 bits_per_second")
        / 1e9
}

fn sel(k: &str, v: &str) -> Selector {
    Selector {
        match_labels: [(k.to_string(), v.to_string())].into(),
        ..Default::default()
    }
}

fn lab_pod(ns: &str, name: &str, app: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![],
    }
}

/// The kube-router scenario around the two lab pods; with `extra_policies`, that many
/// synthetic policies (and their 100 namespaces) on top.
fn scenario(lab_pods: &[Pod], extra_policies: usize) -> ClusterSnapshot {
    let mut s = ClusterSnapshot::default();
    for (name, role) in [("default", "server"), ("bench-client", "client")] {
        s.namespaces.insert(
            name.into(),
            Namespace {
                name: name.into(),
                labels: [("role".to_string(), role.to_string())].into(),
            },
        );
    }
    for p in lab_pods {
        s.pods.insert(p.obj_ref(), p.clone());
    }
    // 1,000 services of 2, 6 and 8 pods in turn, remote (addresses 10.128.0.0/9).
    let mut n = 0u32;
    for svc in 0..1000 {
        for k in 0..[2, 6, 8][svc % 3] {
            n += 1;
            let mut p = lab_pod(
                "default",
                &format!("nginx-{svc}-{k}"),
                &format!("nginx-{svc}"),
            );
            p.ips = vec![IpAddr::from(std::net::Ipv4Addr::from(0x0a80_0000 + n))];
            s.pods.insert(p.obj_ref(), p);
        }
    }
    let block = |port: u16| Rule {
        peers: vec![Peer::IpBlock {
            cidr: "14.215.0.0/16".parse().expect("CIDR"),
            except: vec![],
        }],
        ports: vec![PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(port)),
            end_port: None,
        }],
    };
    let npd = Policy {
        namespace: "default".into(),
        name: "npd".into(),
        pod_selector: Selector::default(),
        ingress: Some(vec![block(9090), block(8080), block(80)]),
        egress: None,
    };
    let allow = Policy {
        namespace: "default".into(),
        name: "allow-client".into(),
        pod_selector: sel("app", "server"),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: Some(sel("role", "client")),
                pod_selector: None,
            }],
            ports: vec![],
        }]),
        egress: None,
    };
    for p in [npd, allow] {
        s.policies.insert(p.obj_ref(), p);
    }
    if extra_policies > 0 {
        for n in 0..100 {
            let ns = synth::synthetic_namespace(n);
            s.namespaces.insert(ns.name.clone(), ns);
        }
        for j in 0..extra_policies {
            let p = synth::synthetic_policy(j, 100);
            s.policies.insert(p.obj_ref(), p);
        }
    }
    s
}

struct Durations {
    rounds: usize,
    latency_s: u32,
    iperf_s: u32,
    conn_s: f64,
}

/// The two-pod lab (`default/server`, `bench-client/client`).
fn two_pod_lab() -> Lab {
    Lab::build(LabSpec {
        pods: vec![
            lab_pod("default", "server", "server"),
            lab_pod("bench-client", "client", "client"),
        ],
        externals: vec![],
    })
    .expect("build the lab (root required)")
}

/// The server's IPv4 address and the server's and the client's namespaces.
fn server_and_client(lab: &Lab) -> (IpAddr, &NetNs, &NetNs) {
    let pods = lab.pods();
    let server_ip = *pods[0]
        .ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .expect("server has an IPv4 address");
    let ns_of = |p: &Pod| {
        lab.netns_of(&format!("{}/{}", p.namespace, p.name))
            .unwrap_or_else(|| panic!("namespace of {}", p.name))
    };
    (server_ip, ns_of(&pods[0]), ns_of(&pods[1]))
}

/// A datapath programmed with the kube-router scenario plus `extra` policies around the
/// lab's pods (not attached anywhere yet).
fn programmed(lab: &Lab, extra: usize) -> Enforcer {
    let mut snapshot = scenario(lab.pods(), extra);
    snapshot.local = lab
        .pod_interfaces()
        .iter()
        .map(|(k, (_, ifindex))| (k.clone(), *ifindex))
        .collect();
    snapshot.node_ips = lab.node_ips();
    let mut enforcer = Enforcer::new(None).expect("load the datapath");
    let report = enforcer.apply(&snapshot);
    assert_eq!(report.sync.failed, 0, "programming the maps failed");
    enforcer
}

/// The kernel's run statistics of `progs` summed: total run time and number of runs.
fn run_stats(dp: &npm_agent::datapath::Datapath, progs: &[&str]) -> (Duration, u64) {
    progs.iter().fold((Duration::ZERO, 0u64), |(t, n), p| {
        let (pt, pn) = dp.prog_stats(p).expect("program statistics");
        (t + pt, n + pn)
    })
}

/// For profiling (`perf record -a` around it): short HTTP connections at concurrency 1 for
/// about `seconds`, enforcing the kube-router scenario (`enforce`; with the flow cache off
/// when `no_flow_cache`) or with nothing attached.
pub(crate) fn spin(enforce: bool, no_flow_cache: bool, seconds: u64) {
    let lab = two_pod_lab();
    let (server_ip, server_ns, client_ns) = server_and_client(&lab);
    let _http = Http::start(server_ns);
    wait_listening(server_ns, &[HTTP_PORT]);
    let _no_halt = CpuLatencyZero::hold();
    let interfaces = lab.pod_interfaces();
    let mut enforcer = if enforce {
        let mut enforcer = programmed(&lab, 0);
        enforcer
            .datapath_mut()
            .set_flow_cache(!no_flow_cache)
            .expect("flow cache on or off");
        lab.node().run(|| {
            for (ifname, _) in interfaces.values() {
                enforcer.attach(ifname).expect("attach");
            }
        });
        enforcer
    } else {
        Enforcer::new(None).expect("load the datapath")
    };
    // Enforcing, the classifiers' run time per run in flight is printed too (kernel run
    // statistics, as the "in flight" row of the full run: two clock reads per run included).
    let _stats = enforce.then(|| {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (run time)")
    });
    let stats = || run_stats(enforcer.datapath(), &[PROG_FROM_POD, PROG_TO_POD]);
    let start = Instant::now();
    while start.elapsed().as_secs() < seconds {
        let before = stats();
        let rate = conn_rate(client_ns, SocketAddr::new(server_ip, HTTP_PORT), 1, 1.0);
        let after = stats();
        let runs = after.1 - before.1;
        if runs > 0 {
            let ns = (after.0 - before.0).as_nanos() as f64 / runs as f64;
            eprintln!(
                "connections/s (concurrency 1): {rate:.0}; in flight {ns:.1} ns per run ({runs} runs)"
            );
        } else {
            eprintln!("connections/s (concurrency 1): {rate:.0}");
        }
    }
    lab.node().run(|| {
        for (ifname, _) in interfaces.values() {
            let _ = enforcer.datapath_mut().detach(ifname);
        }
    });
}

/// The configuration with `npm_pass` attached instead of the classifiers.
const PASS_ONLY: &str = "pass-only program";

pub(crate) fn run(full: bool, sink: &mut Sink) {
    let d = if full {
        Durations {
            // Many short rounds rather than a few long ones: this VM switches between two
            // speeds every few tens of seconds, and a pair (on, off) measured seconds apart
            // is less likely to straddle a switch; the median of 12 paired ratios is
            // reported (each configuration first in three rounds).
            rounds: 12,
            latency_s: 2,
            iperf_s: 2,
            conn_s: 1.5,
        }
    } else {
        Durations {
            rounds: 1,
            latency_s: 1,
            iperf_s: 1,
            conn_s: 0.5,
        }
    };
    let lab = two_pod_lab();
    let (server_ip, server_ns, client_ns) = server_and_client(&lab);
    let server_cpu = SERVER_CPU.to_string();
    let (sockperf_port, iperf_port) = (SOCKPERF_PORT.to_string(), IPERF_PORT.to_string());
    let _sockperf = spawn_in(
        server_ns,
        &on_cpu(
            &server_cpu,
            &["sockperf", "server", "--tcp", "-p", &sockperf_port],
        ),
    );
    let _iperf = spawn_in(
        server_ns,
        &on_cpu(&server_cpu, &["iperf3", "-s", "-p", &iperf_port]),
    );
    let _http = Http::start(server_ns);
    wait_listening(server_ns, &[SOCKPERF_PORT, IPERF_PORT, HTTP_PORT]);

    // On an idle VM the vCPUs halt between packets and a ping-pong's p50 is their wake-up
    // (measured: 40-45 µs in some rounds, 5.7 µs in others, off and on alike). Hold the PM QoS
    // CPU latency request at 0 while measuring, as latency benchmarks do (tuned's
    // latency-performance profile): the idle governor then polls instead of halting.
    let _no_halt = CpuLatencyZero::hold();
    let ifnames: Vec<String> = lab
        .pod_interfaces()
        .into_values()
        .map(|(ifname, _)| ifname)
        .collect();
    // `Some(n)`: enforcing the kube-router scenario plus n policies; `None`: no filter
    // ("off") or the pass-only program on both hooks (PASS_ONLY: what the TC hook itself
    // costs, the floor of any TC-based enforcer).
    let configs: [(&str, Option<usize>); 4] = [
        ("off", None),
        (PASS_ONLY, None),
        ("kube-router", Some(0)),
        ("kube-router + 1000 policies", Some(1000)),
    ];
    // One datapath per enforcing configuration, programmed once: switching configurations
    // is then only replacing the TC filters (milliseconds), so the rounds can be short.
    // The pass-only program comes from the first one's object.
    let mut enforcers: Vec<Option<Enforcer>> = configs
        .iter()
        .map(|(_, extra)| extra.map(|extra| programmed(&lab, extra)))
        .collect();
    let first_enforcing = enforcers
        .iter()
        .position(Option::is_some)
        .expect("an enforcing configuration");
    // (config, figure, unit) -> one value per round, in round order. Within a round each tool
    // runs once per configuration, the configurations back to back (seconds apart), the next
    // tool after them; the first configuration rotates from round to round, so none is always
    // first (the connection rates drift down through a run as TIME_WAIT sockets pile up, off
    // and on alike). This VM also switches between two speeds for tens of seconds at a time
    // (1.4-1.8x apart, every tool and configuration alike: first full run of 2026-12-04), so
    // the ratios below are paired: on/off within one round and tool, then the median over
    // the rounds.
    let mut results: Vec<((String, String, String), Vec<f64>)> = Vec::new();
    let mut applied: Option<usize> = None;
    #[derive(Clone, Copy)]
    enum Tool {
        Latency,
        Throughput,
        Connections(usize),
    }
    let tools = [
        Tool::Latency,
        Tool::Throughput,
        Tool::Connections(1),
        Tool::Connections(8),
        Tool::Connections(32),
    ];
    for round in 0..d.rounds {
        for tool in tools {
            for i in 0..configs.len() {
                let at = (round + i) % configs.len();
                let name = configs[at].0;
                if applied != Some(at) {
                    apply_config(&lab, &ifnames, &mut enforcers, first_enforcing, at, name);
                    applied = Some(at);
                }
                let r: Vec<(String, f64, &str)> = match tool {
                    Tool::Latency => {
                        eprintln!("traffic round {round}: {name}");
                        let (p50, p99) = latency(client_ns, server_ip, d.latency_s);
                        vec![
                            ("TCP latency p50 (sockperf)".to_string(), p50, "µs"),
                            ("TCP latency p99 (sockperf)".to_string(), p99, "µs"),
                        ]
                    }
                    Tool::Throughput => {
                        let gbps = throughput(client_ns, server_ip, d.iperf_s);
                        vec![("TCP throughput (iperf3)".to_string(), gbps, "Gbit/s")]
                    }
                    Tool::Connections(c) => {
                        let rate = conn_rate(
                            client_ns,
                            SocketAddr::new(server_ip, HTTP_PORT),
                            c,
                            d.conn_s,
                        );
                        vec![(
                            format!("new HTTP connections/s, concurrency {c}"),
                            rate,
                            "conn/s",
                        )]
                    }
                };
                for (figure, value, unit) in r {
                    let key = (name.to_string(), figure, unit.to_string());
                    match results.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(value),
                        None => results.push((key, vec![value])),
                    }
                }
            }
        }
    }
    // In flight: the kernel's run statistics of the attached programs over short
    // connections at concurrency 1, for each enforcing configuration and the pass-only
    // program. Statistics cost every program run two clock reads, so they are on only here,
    // after the rounds, never while the ratios are measured; the pass-only row carries that
    // cost too, so enforcing − pass-only is the classifiers' own share.
    {
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (run time)");
        for (at, (name, _)) in configs.iter().enumerate() {
            if *name == "off" {
                continue;
            }
            apply_config(&lab, &ifnames, &mut enforcers, first_enforcing, at, name);
            let (dp, progs): (&npm_agent::datapath::Datapath, &[&str]) = match &enforcers[at] {
                Some(e) => (e.datapath(), &[PROG_FROM_POD, PROG_TO_POD]),
                None => (
                    enforcers[first_enforcing]
                        .as_ref()
                        .expect("enforcing configuration")
                        .datapath(),
                    &[PROG_PASS],
                ),
            };
            let stats = || run_stats(dp, progs);
            let before = stats();
            let rate = conn_rate(
                client_ns,
                SocketAddr::new(server_ip, HTTP_PORT),
                1,
                d.conn_s,
            );
            let after = stats();
            let runs = after.1 - before.1;
            assert!(runs > 0, "{name}: the attached programs ran");
            let ns = (after.0 - before.0).as_nanos() as f64 / runs as f64;
            sink.push(Row {
                section: "2 traffic".into(),
                figure: "program run time in flight (kernel run statistics), short connections at concurrency 1".into(),
                size: format!("enforcement {name}"),
                pods: None,
                policies: None,
                value: Some(ns),
                unit: "ns".into(),
                target_max: None,
                note: Some(format!(
                    "{runs} runs of {} at {rate:.0} conn/s; includes the statistics' own clock reads",
                    progs.join(" + ")
                )),
            });
        }
    }
    // Per-round values, for the paired ratios.
    let per_round = results.clone();
    let rounds_of: Vec<String> = results
        .iter()
        .map(|(_, v)| {
            let v: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
            v.join(", ")
        })
        .collect();
    let results: Vec<(String, String, f64, String)> = results
        .into_iter()
        .map(|((name, figure, unit), mut v)| (name, figure, median(&mut v), unit))
        .collect();
    for ((name, figure, value, unit), rounds) in results.iter().zip(&rounds_of) {
        sink.push(Row {
            section: "2 traffic".into(),
            figure: figure.clone(),
            size: format!("enforcement {name}"),
            pods: None,
            policies: None,
            value: Some(*value),
            unit: unit.clone(),
            target_max: None,
            note: Some(format!("median of rounds: {rounds}")),
        });
    }
    // Remove our filters before the lab goes (the lab deletes the interfaces anyway).
    lab.node().run(|| {
        for ifname in &ifnames {
            if let Some(enforcer) = enforcers[first_enforcing].as_mut() {
                let _ = enforcer.datapath_mut().detach(ifname);
                let _ = enforcer.datapath_mut().detach_baseline(ifname);
            }
        }
    });
    // Ratios on/off, written so that "cost" is above 1: latency on/off, rates off/on; the
    // median of the per-round ratios (paired, see above).
    for ((name, figure, _), values) in per_round.iter().filter(|r| r.0.0 != "off") {
        let Some((_, base)) = per_round
            .iter()
            .find(|((n, f, _), _)| n == "off" && f == figure)
        else {
            continue;
        };
        let lower_is_better = figure.starts_with("TCP latency");
        let mut ratios: Vec<f64> = values
            .iter()
            .zip(base)
            .map(|(on, off)| if lower_is_better { on / off } else { off / on })
            .collect();
        let each: Vec<String> = ratios.iter().map(|x| format!("{x:.3}")).collect();
        let what = if lower_is_better { "on/off" } else { "off/on" };
        sink.push(Row {
            section: "2 traffic".into(),
            figure: format!("{figure}: cost ratio {what}"),
            size: format!("enforcement {name}"),
            pods: None,
            policies: None,
            value: Some(median(&mut ratios)),
            unit: "×".into(),
            // The target is the enforcement's; the pass-only program is its floor.
            target_max: (name != PASS_ONLY).then_some(1.03),
            note: Some(format!("median of per-round ratios: {}", each.join(", "))),
        });
    }
}

/// Puts configuration `at` (`name`) on every pod interface of the lab: its enforcer's
/// programs, or the pass-only program, or nothing ("off"); the pass-only program and the
/// detach come from the first enforcing configuration's datapath.
fn apply_config(
    lab: &Lab,
    ifnames: &[String],
    enforcers: &mut [Option<Enforcer>],
    first_enforcing: usize,
    at: usize,
    name: &str,
) {
    lab.node().run(|| {
        for ifname in ifnames {
            if let Some(enforcer) = enforcers[at].as_mut() {
                enforcer.attach(ifname).expect("attach");
                continue;
            }
            let dp = enforcers[first_enforcing]
                .as_mut()
                .expect("enforcing configuration")
                .datapath_mut();
            if name == PASS_ONLY {
                dp.attach_baseline(ifname)
                    .expect("attach the pass-only program");
            } else {
                dp.detach(ifname).expect("detach");
                dp.detach_baseline(ifname)
                    .expect("detach the pass-only program");
            }
        }
    });
}

/// Holds `/dev/cpu_dma_latency` at 0 µs (PM QoS) while alive; the kernel drops the request
/// when the file is closed. Best effort: without the file the figures carry the wake-up
/// noise, and a line on stderr says so.
struct CpuLatencyZero {
    _file: Option<std::fs::File>,
}

impl CpuLatencyZero {
    fn hold() -> Self {
        use std::io::Write as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
        match file {
            Ok(f) => Self { _file: Some(f) },
            Err(e) => {
                eprintln!(
                    "traffic: /dev/cpu_dma_latency not held ({e}): idle wake-ups stay in the figures"
                );
                Self { _file: None }
            }
        }
    }
}
