//! Scaffolding the process and lab tests share: cleanup guards, bounded waits, a pod builder.
// Each test file uses a part of it.
#![allow(dead_code)]
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use npm_agent::model::{ContainerPort, Pod, Protocol};

/// Removes a directory tree (or a file) on drop, also when the test fails.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kills and reaps the process we started, on drop.
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd.output()` bounded by `within`: stdin is null, stdout and stderr are read on threads
/// while the child runs in a [`KillOnDrop`]. Past `within` the child is killed by its own pid
/// and this panics with the command and what it wrote to stderr.
pub(crate) fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let what = format!("{cmd:?}");
    let deadline = Instant::now() + within;
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}")),
    );
    let stdout = read_on_thread(child.0.stdout.take());
    let stderr = read_on_thread(child.0.stderr.take());
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.0.kill();
                let _ = child.0.wait();
                let stderr = join_within(stderr, Duration::from_secs(1)).unwrap_or_default();
                panic!(
                    "{what} still ran after {within:?}; killed it (pid {}). Its stderr:\n{}",
                    child.0.id(),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("wait for {what}: {e}"),
        }
    };
    // The pipes close when the child exits (unless it left a process holding them).
    let grace = Duration::from_secs(5);
    let read = |h, name| {
        join_within(h, grace)
            .unwrap_or_else(|| panic!("{what} exited ({status}) but its {name} stayed open"))
    };
    Output {
        status,
        stdout: read(stdout, "stdout"),
        stderr: read(stderr, "stderr"),
    }
}

fn read_on_thread(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    let mut pipe = pipe.expect("piped");
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        pipe.read_to_end(&mut buf).expect("read the child's pipe");
        buf
    })
}

/// The reader's bytes if it finished within `within`.
fn join_within(handle: JoinHandle<Vec<u8>>, within: Duration) -> Option<Vec<u8>> {
    eventually_every(within, Duration::from_millis(10), || handle.is_finished())
        .then(|| handle.join().expect("pipe reader"))
}

/// Panics unless the effective uid is 0, naming `who` and what to run: a missing
/// prerequisite fails a test, never skips it.
pub(crate) fn require_root(who: &str) {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{who} need root (effective uid 0, for CAP_NET_ADMIN and setns; this is {euid}): run \
         scripts/setup.sh as root and the tests as root"
    );
}

/// Polls `f` every `every` until it holds or `within` has passed.
pub(crate) fn eventually_every(
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

/// Polls `f` every 100 ms for up to `secs` seconds.
pub(crate) fn eventually(secs: u64, f: impl FnMut() -> bool) -> bool {
    eventually_every(Duration::from_secs(secs), Duration::from_millis(100), f)
}

/// Polls `f` every 200 ms for up to `secs` seconds; its first `Some`.
pub(crate) fn eventually_some<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A pod of namespace `default` labelled `app`, serving TCP 80.
pub(crate) fn pod(name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().expect("ip")],
        node_name: None,
        host_network: false,
        terminating: false,
        finished: false,
        ports: vec![ContainerPort {
            name: None,
            port: 80,
            protocol: Protocol::Tcp,
        }],
    }
}

/// The last 40 lines of a log file (for failure messages).
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Entries of a pinned map as `bpftool map dump pinned PATH` lists them (independent of the
/// agent's code).
pub(crate) fn pinned_entries(path: &Path) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().map(Vec::len).unwrap_or(0)
}

/// `bin run --kubeconfig KUBECONFIG` as node-1 (200 ms polls, info log to `log`) in the
/// network namespace `node`, through nsenter (not `ip netns exec`, which remounts /sys and
/// would hide bpffs). `path`: the `PATH` the agent sees, when given (an agent without
/// iproute2 on it cannot read the node's tables).
pub(crate) fn spawn_kube_agent(
    bin: &Path,
    node: &str,
    kubeconfig: &Path,
    bpffs: &Path,
    log: &Path,
    path: Option<&str>,
) -> KillOnDrop {
    // nsenter itself is found on our PATH (a child's PATH would be searched for it).
    let nsenter = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("nsenter"))
        .find(|p| p.exists())
        .expect("nsenter on PATH (util-linux; scripts/setup.sh installs it)");
    let mut cmd = Command::new(nsenter);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let child = cmd
        .arg(format!("--net=/run/netns/{node}"))
        .arg(bin)
        .args([
            "run",
            "--poll-interval-ms",
            "200",
            "--node-name",
            "node-1",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .arg("--bpffs-dir")
        .arg(bpffs)
        .env("NPM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn agent");
    KillOnDrop(child)
}

/// SIGTERM to an agent we started (nsenter execs it: same pid), then waits for it (bounded).
pub(crate) fn stop_agent(mut agent: KillOnDrop) {
    let pid = agent.0.id().to_string();
    let ok = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
    assert!(
        eventually(10, || matches!(agent.0.try_wait(), Ok(Some(_)))),
        "agent did not stop on SIGTERM"
    );
}

/// `npm-agent run --manifests DIR` in the network namespace `node` (through nsenter), its
/// HTTP endpoints on 127.0.0.1:10091 with the debug API on or off, 200 ms polls, output
/// dropped; configuration from the environment cleared so only these flags count.
pub(crate) fn spawn_manifests_agent(
    node: &str,
    manifests: &Path,
    bpffs: &Path,
    debug_api: bool,
) -> KillOnDrop {
    KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .arg(env!("CARGO_BIN_EXE_npm-agent"))
            .args(["run", "--poll-interval-ms", "200"])
            .args(["--listen-address", "127.0.0.1", "--listen-port", "10091"])
            .args([
                "--enable-http-debug-api",
                if debug_api { "true" } else { "false" },
            ])
            .arg("--manifests")
            .arg(manifests)
            .arg("--bpffs-dir")
            .arg(bpffs)
            .env_remove("NPM_CONFIG")
            .env_remove("NPM_ENABLE_HTTP_DEBUG_API")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent"),
    )
}
