//! Named network namespaces (`/run/netns/<name>`) as guard objects.
//!
//! [`NetNs::create`] runs `ip netns add`; dropping the guard runs `ip netns del`. Code runs
//! inside a namespace through [`NetNs::run`]: a scoped thread enters the namespace with
//! `setns(2)` (which changes only the calling thread) and runs the closure there. Sockets
//! created by that closure stay in the namespace for their whole life, whichever thread
//! later drives them, and child processes spawned from it start in the namespace.
//!
//! Inside [`NetNs::run`], mind what is per thread: sockets, netlink, `/proc/sys/net/*` and
//! `/proc/thread-self/net/*` follow the thread's namespace; `/proc/net` (= `/proc/self/net`,
//! the thread group leader's) and `/sys/class/net` (tied to the mount namespace) do not.
//!
//! The only `unsafe` of this module is `enter_netns`.
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// Longest name accepted (a file name under /run/netns; kept short for readability).
const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("invalid network namespace name {name:?}")]
    InvalidName { name: String },
    #[error("not creating {name}: the process is shutting down")]
    ShuttingDown { name: String },
    #[error("could not run {command:?}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command:?} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setns into {name} failed")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("writing sysctl {key} in {name}")]
    Sysctl {
        name: String,
        key: String,
        #[source]
        source: io::Error,
    },
}

impl NetNsError {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            NetNsError::InvalidName { .. } => "invalid_name",
            NetNsError::ShuttingDown { .. } => "shutting_down",
            NetNsError::Spawn { .. } => "spawn",
            NetNsError::Command { .. } => "command",
            NetNsError::Open { .. } => "open",
            NetNsError::Setns { .. } => "setns",
            NetNsError::Sysctl { .. } => "sysctl",
        }
    }
}

pub type Result<T, E = NetNsError> = std::result::Result<T, E>;

/// A named network namespace this process created. Dropping it deletes the namespace
/// (idempotent: a namespace already gone is not an error).
///
/// The kernel frees the namespace (and the veth ends inside it) only once nothing refers to
/// it any more: close sockets created inside it before dropping the guard if you need the
/// interfaces gone at once.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    deleted: bool,
}

/// Set on Ctrl-C: no new namespace is created after it, so a cleanup that runs next sees
/// every namespace this process will ever have made.
static SHUTTING_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Refuses every later [`NetNs::create`] in this process.
pub fn stop_creating() {
    SHUTTING_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl NetNs {
    /// `ip netns add <name>`. Fails if the name exists already.
    pub fn create(name: &str) -> Result<NetNs> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !name.starts_with('.');
        if !valid {
            return Err(NetNsError::InvalidName {
                name: name.to_owned(),
            });
        }
        if SHUTTING_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NetNsError::ShuttingDown {
                name: name.to_owned(),
            });
        }
        run_command(Command::new("ip").args(["netns", "add", name]))?;
        Ok(NetNs {
            name: name.to_owned(),
            path: PathBuf::from("/run/netns").join(name),
            deleted: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: open it to get a namespace file descriptor.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that entered this namespace, and returns its result.
    ///
    /// Panics if the namespace cannot be entered (it was created by this guard, so that means
    /// it was removed behind our back) or if `f` panics; use [`NetNs::try_run`] to get an
    /// error instead.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match self.try_run(f) {
            Ok(t) => t,
            Err(e) => panic!("cannot enter network namespace {}: {e}", self.name),
        }
    }

    /// Like [`NetNs::run`], but returns an error when the namespace cannot be entered.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(&self.path).map_err(|source| NetNsError::Open {
            path: self.path.clone(),
            source,
        })?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                enter_netns(&file).map_err(|source| NetNsError::Setns {
                    name: self.name.clone(),
                    source,
                })?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `args[0]` with the remaining arguments inside the namespace (the child is
    /// forked from a thread that entered it; no `ip netns exec`, so no mount namespace
    /// games) and returns its stdout. A non-zero exit is an error carrying stderr.
    ///
    /// For `ip` itself prefer [`NetNs::ip`].
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let Some((program, rest)) = args.split_first() else {
            return Err(NetNsError::Spawn {
                command: String::new(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "empty command"),
            });
        };
        let out = self.try_run(|| run_command(Command::new(program).args(rest)))??;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <name> <args>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run_command(Command::new("ip").arg("-n").arg(&self.name).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n <name> -batch -`: many `ip` commands (one a line, without the leading `ip`) in
    /// one process. Stops at the first failing line.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut input = lines.join("\n");
        input.push('\n');
        let command = format!("ip -n {} -batch - <<{} lines>>", self.name, lines.len());
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NetNsError::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|source| NetNsError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let out = child
            .wait_with_output()
            .map_err(|source| NetNsError::Spawn {
                command: command.clone(),
                source,
            })?;
        check_output(command, out).map(|_| ())
    }

    /// Writes `/proc/sys/<key with dots as slashes>` inside the namespace, e.g.
    /// `net.ipv4.ip_forward`. Only `net.*` keys are per namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(key, value)])
    }

    /// Several [`NetNs::sysctl`] writes from one thread, in order.
    pub fn sysctls(&self, pairs: &[(&str, &str)]) -> Result<()> {
        self.try_run(|| {
            for (key, value) in pairs {
                let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value).map_err(|source| NetNsError::Sysctl {
                    name: self.name.clone(),
                    key: (*key).to_owned(),
                    source,
                })?;
            }
            Ok(())
        })?
    }

    /// Deletes the namespace now (what Drop does), reporting failure. Idempotent.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        if !self.path.exists() {
            return Ok(());
        }
        run_command(Command::new("ip").args(["netns", "del", &self.name])).map(|_| ())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            tracing::warn!(netns = %self.name, error = %e, "could not delete network namespace");
        }
    }
}

/// Names of the namespaces under /run/netns (what `ip netns list` shows).
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Deletes a namespace by name that no guard owns (leftovers of a killed run).
pub fn delete_by_name(name: &str) -> Result<()> {
    run_command(Command::new("ip").args(["netns", "del", name])).map(|_| ())
}

fn run_command(cmd: &mut Command) -> Result<Output> {
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetNsError::Spawn {
            command: command.clone(),
            source,
        })?;
    check_output(command, out)
}

fn check_output(command: String, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetNsError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Moves the calling thread into the network namespace `file` refers to.
#[allow(unsafe_code)]
fn enter_netns(file: &File) -> io::Result<()> {
    // SAFETY: setns only reads its two integer arguments; `file` is an open descriptor that
    // outlives the call. It changes the network namespace of the calling thread alone, which
    // is a thread we spawned for this purpose and that ends after the closure it runs.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
