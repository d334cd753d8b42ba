//! A rolling update across ABI versions, with real packets: an agent of this build's ABI
//! enforces, stops, and an agent built with the next ABI version (a second build of this
//! source with `NPM_ABI_VERSION_OVERRIDE`, so another pin directory and empty maps) takes
//! over, first while the API server is down, then after it is back.
//!
//! Throughout, a denied client probes every 50 ms and must never get through, and on an
//! established connection the server pushes a message every 100 ms to an ingress-isolated
//! client (they pass only as a tracked flow's packets; the client sends nothing but ACKs, so
//! a lost conntrack entry is not re-created by a request of its own) that must never miss
//! one. At the end the previous
//! ABI's pins are gone and a policy deletion is enforced by the new agent's programs.
//! Privileged (root), as CI runs; the second build goes to `target/abi-next`.
#[path = "common/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "common/http.rs"]
mod http;
#[path = "common/objects.rs"]
mod objects;
#[path = "common/support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApi;
use http::http_get;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::Protocol;
use objects::{api_pod, lab_pod};
use serde_json::json;
use support::{
    KillOnDrop, RemoveOnDrop, eventually, log_tail, output_within, pinned_entries, require_root,
    spawn_kube_agent, stop_agent,
};

const WEB: &str = "10.246.0.2";
const PUSH_PORT: u16 = 8080;

/// Builds this package's agent with the next ABI version (once; later runs are incremental).
fn next_abi_agent() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let target = root.join("target").join("abi-next");
    let next = (npm_common::ABI_VERSION + 1).to_string();
    let out = output_within(
        Command::new(env!("CARGO"))
            .args(["build", "--package", "npm-agent", "--bin", "npm-agent"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .env("NPM_ABI_VERSION_OVERRIDE", &next),
        Duration::from_secs(40 * 60),
    );
    assert!(
        out.status.success(),
        "building the next-ABI agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("debug").join("npm-agent")
}

fn spawn_agent(bin: &Path, node: &str, kubeconfig: &Path, bpffs: &Path, log: &Path) -> KillOnDrop {
    spawn_kube_agent(bin, node, kubeconfig, bpffs, log, None)
}

/// The next pushed message, within 1 s: true when it is message `n`.
fn next_message(conn: &mut TcpStream, n: u64) -> bool {
    let mut got = [0u8; 8];
    conn.read_exact(&mut got).is_ok() && u64::from_be_bytes(got) == n
}

#[test]
fn an_upgrade_to_another_abi_never_opens_a_gap_nor_breaks_a_tracked_flow() {
    require_root("the ABI upgrade test (netns, BPF, bpffs)");
    let next_bin = next_abi_agent();
    let pid = std::process::id();
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-upgrade-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let kubeconfig = std::env::temp_dir().join(format!("npm-upgrade-{pid}.yaml"));
    let _kc = RemoveOnDrop(kubeconfig.clone());
    let log_old = std::env::temp_dir().join(format!("npm-upgrade-{pid}-old.log"));
    let _l1 = RemoveOnDrop(log_old.clone());
    let log_new = std::env::temp_dir().join(format!("npm-upgrade-{pid}-new.log"));
    let _l2 = RemoveOnDrop(log_new.clone());
    let old_dir = bpffs.join(format!("v{}", npm_common::ABI_VERSION));
    let new_dir = bpffs.join(format!("v{}", npm_common::ABI_VERSION + 1));

    let mut lab = Lab::build(LabSpec {
        pods: vec![
            lab_pod("web", "web", WEB),
            lab_pod("client", "client", "10.246.0.3"),
            lab_pod("intruder", "intruder", "10.246.0.4"),
        ],
        externals: vec![],
    })
    .expect("lab");
    lab.set_probe_timeout(Duration::from_millis(300));
    let node = lab.node().name().to_string();
    let listener = lab
        .node()
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .expect("bind in node netns");
    let api = FakeApi::start_on(listener);
    api.write_kubeconfig(&kubeconfig);
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}}));
    for (name, app, ip) in [
        ("web", "web", WEB),
        ("client", "client", "10.246.0.3"),
        ("intruder", "intruder", "10.246.0.4"),
    ] {
        api.apply(api_pod(name, app, ip, "node-1"));
    }
    // web admits client on 80 and on the echo port; client admits nothing (ingress
    // isolated), so web's answers reach it only as replies of a tracked flow.
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"port": 80}, {"port": PUSH_PORT}]}]}}),
    );
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "client-isolated", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Ingress"]}}),
    );

    // The pushing server in web's namespace (the socket keeps it; served from this process).
    let echo = lab
        .netns_of("default/web")
        .expect("web netns")
        .run(|| TcpListener::bind(("0.0.0.0", PUSH_PORT)))
        .expect("echo listener");
    let stop = AtomicBool::new(false);
    let intruder_passed = AtomicUsize::new(0);
    let intruder_tries = AtomicUsize::new(0);

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
        scope.spawn(|| {
            echo.set_nonblocking(true).expect("nonblocking");
            while !stop.load(Ordering::Relaxed) {
                match echo.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).expect("blocking");
                        let stop = &stop;
                        scope.spawn(move || {
                            let mut n = 0u64;
                            while !stop.load(Ordering::Relaxed)
                                && s.write_all(&n.to_be_bytes()).is_ok()
                            {
                                n += 1;
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });

        // 1. The agent of this ABI enforces.
        let old = spawn_agent(
            Path::new(env!("CARGO_BIN_EXE_npm-agent")),
            &node,
            &kubeconfig,
            &bpffs,
            &log_old,
        );
        let allowed = |from: &str| lab.probe(from, "default/web", 80, Protocol::Tcp).allowed;
        assert!(
            eventually(30, || !allowed("default/intruder")
                && allowed("default/client")),
            "the first agent never enforced:\n{}",
            log_tail(&log_old)
        );
        let mut conn = lab
            .netns_of("default/client")
            .expect("client netns")
            .run(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::from(([10, 246, 0, 2], PUSH_PORT)),
                    Duration::from_secs(2),
                )
            })
            .expect("client connects to web's echo port");
        conn.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        assert!(next_message(&mut conn, 0), "the established connection");

        // The denied client, throughout: TCP connects to web:80 every 50 ms.
        let intruder = lab.netns_of("default/intruder").expect("intruder netns");
        scope.spawn(|| {
            intruder.run(|| {
                let to = SocketAddr::from(([10, 246, 0, 2], 80));
                while !stop.load(Ordering::Relaxed) {
                    intruder_tries.fetch_add(1, Ordering::Relaxed);
                    if TcpStream::connect_timeout(&to, Duration::from_millis(150)).is_ok() {
                        intruder_passed.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        let mut sent = 1u64;
        let mut missed = Vec::new();
        let mut talk_for = |conn: &mut TcpStream, d: Duration, missed: &mut Vec<u64>| {
            let until = Instant::now() + d;
            while Instant::now() < until && missed.is_empty() {
                if !next_message(conn, sent) {
                    // A lost message leaves the stream out of step: stop reading it.
                    missed.push(sent);
                    return;
                }
                sent += 1;
            }
        };
        talk_for(&mut conn, Duration::from_secs(1), &mut missed);

        // 2. A rolling update while the API server is down: the next-ABI agent starts with
        // empty maps in its own pin directory and cannot list anything.
        stop_agent(old);
        api.set_down(true);
        let new = spawn_agent(&next_bin, &node, &kubeconfig, &bpffs, &log_new);
        let new_endpoints = new_dir.join(npm_common::maps::MAP_ENDPOINTS);
        assert!(
            eventually(30, || new_endpoints.exists()),
            "the next-ABI agent never pinned its maps:\n{}",
            log_tail(&log_new)
        );
        talk_for(&mut conn, Duration::from_secs(4), &mut missed);
        assert_eq!(
            pinned_entries(&new_endpoints),
            0,
            "enforced without a list:\n{}",
            log_tail(&log_new)
        );
        assert!(old_dir.exists(), "the previous pins went before the switch");
        let ready = http_get(lab.node(), 10091, "/readyz");
        assert!(
            matches!(&ready, Ok((503, _))),
            "ready before its first enforcement: {ready:?}"
        );

        // 3. The API is back: the new agent fills its maps, takes over, removes the old pins.
        api.set_down(false);
        assert!(
            eventually(30, || http_get(lab.node(), 10091, "/readyz")
                .is_ok_and(|(code, _)| code == 200)),
            "the next-ABI agent never became ready:\n{}",
            log_tail(&log_new)
        );
        talk_for(&mut conn, Duration::from_secs(2), &mut missed);
        assert!(
            allowed("default/client"),
            "client lost web:80 after the switch"
        );
        assert!(!allowed("default/intruder"));
        stop.store(true, Ordering::Relaxed);
        drop(conn);
        assert!(
            intruder_tries.load(Ordering::Relaxed) > 25,
            "the denied client barely probed"
        );
        assert_eq!(
            intruder_passed.load(Ordering::Relaxed),
            0,
            "the denied client got through during the upgrade:\nold agent:\n{}\nnew agent:\n{}",
            log_tail(&log_old),
            log_tail(&log_new)
        );
        assert!(
            missed.is_empty() && sent > 40,
            "the established connection missed message {missed:?} after {sent} round trips:\n{}",
            log_tail(&log_new)
        );

        let log = std::fs::read_to_string(&log_new).unwrap_or_default();
        let carried = log
            .lines()
            .find(|l| l.contains("tracked flows carried over"))
            .unwrap_or_else(|| panic!("no conntrack carry-over logged:\n{}", log_tail(&log_new)));
        assert!(
            !carried.contains("flows=0 "),
            "nothing carried over: {carried}"
        );
        assert!(
            eventually(10, || !old_dir.exists()),
            "the previous ABI's pins were not removed:\n{}",
            log_tail(&log_new)
        );

        // 4. The new agent's programs (reading its maps) enforce: a deletion opens web.
        api.delete("NetworkPolicy", "default", "web-from-client");
        assert!(
            eventually(20, || allowed("default/intruder")),
            "policy deletion not enforced by the new agent's programs:\n{}",
            log_tail(&log_new)
        );
        drop(new);
    });
}
