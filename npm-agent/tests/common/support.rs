//! Scaffolding the process and lab tests share: cleanup guards, bounded waits, a pod builder.
// Each test file uses a part of it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Child;
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
