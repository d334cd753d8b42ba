//! `npm-agent uninstall` on real kernel state: a node namespace whose interfaces carry our
//! programs in both attach modes next to other tools' programs and filters, and pinned maps
//! of two ABI versions. The real binary runs in that namespace (nsenter), then the test reads
//! the hooks itself (`BPF_PROG_QUERY`, `tc -j`) and the bpffs. Privileged (root).
#[path = "common/support.rs"]
mod support;

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use npm_agent::datapath::{Datapath, TcMode};
use npm_common::ABI_VERSION;
use serde_json::Value;
use support::{RemoveOnDrop, output_within, require_root};

/// Interfaces of the node namespace: ours by tcx (+ a foreign tcx program), ours by cls_bpf
/// alone, ours by both (+ foreign filters on the same qdisc), and foreign only.
const TCX: &str = "u-tcx";
const CLS: &str = "u-cls";
const MIX: &str = "u-mix";
const FOREIGN: &str = "u-foreign";
const IFACES: [&str; 4] = [TCX, CLS, MIX, FOREIGN];
/// The name of the foreign BPF program (not one of ours).
const FOREIGN_PROG: &str = "foreign_tc";

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must(args: &[&str]) -> String {
    let (ok, text) = sh(args);
    assert!(ok, "{args:?} failed: {text}");
    text
}

/// A network namespace, deleted on drop (with every interface in it, and so every tcx
/// program and filter on them).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let (ok, text) = sh(&["ip", "netns", "del", &self.0]);
        if !ok {
            eprintln!("cleanup: ip netns del {}: {text}", self.0);
        }
    }
}

/// `tc ARGS` inside `ns` (nsenter, so bpffs under /sys stays visible).
fn tc(ns: &str, args: &[&str]) -> String {
    let netns = format!("--net=/run/netns/{ns}");
    let mut all = vec!["nsenter", netns.as_str(), "tc"];
    all.extend_from_slice(args);
    must(&all)
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file =
                std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // SAFETY: setns on a valid namespace fd; it changes only this thread's network
            // namespace, and this thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Loads a two-instruction sched_cls program named [`FOREIGN_PROG`] (`r0 = -1; exit`:
/// TC_ACT_UNSPEC, "next") with `BPF_PROG_LOAD`: another tool's program.
fn load_foreign_prog() -> std::os::fd::OwnedFd {
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    // mov64 r0, -1; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: 3, // BPF_PROG_TYPE_SCHED_CLS
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoad::default()
    };
    attr.prog_name[..FOREIGN_PROG.len()].copy_from_slice(FOREIGN_PROG.as_bytes());
    // SAFETY: a valid, initialised prefix of `union bpf_attr` for BPF_PROG_LOAD (5); the
    // pointers reference `insns` and `license`, which outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5,
            &raw mut attr,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel returned a new fd that nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) }
}

/// `BPF_OBJ_PIN` (6) of `fd` at `path`.
fn pin(fd: &std::os::fd::OwnedFd, path: &Path) {
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: a valid `bpf_attr` for BPF_OBJ_PIN; `c` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &raw mut attr,
            std::mem::size_of::<ObjPin>(),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

/// `BPF_PROG_ATTACH` (8) of `fd` to tcx ingress (46) of `ifindex`, after the hook's others.
fn tcx_attach_ingress(fd: &std::os::fd::OwnedFd, ifindex: u32) {
    #[repr(C)]
    #[derive(Default)]
    struct Attach {
        target: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
        relative_fd: u32,
        expected_revision: u64,
    }
    let mut attr = Attach {
        target: ifindex,
        attach_bpf_fd: fd.as_raw_fd() as u32,
        attach_type: 46,
        ..Attach::default()
    };
    // SAFETY: a valid `bpf_attr` for BPF_PROG_ATTACH; no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            8,
            &raw mut attr,
            std::mem::size_of::<Attach>(),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_ATTACH: {}",
        std::io::Error::last_os_error()
    );
}

/// Every interface's hooks as the kernel reports them: tcx program names per hook, clsact
/// filters per hook (pref, kind, handle, program name) and whether there is a clsact qdisc.
#[derive(Debug, PartialEq, Eq)]
struct Hooks {
    tcx_ingress: Vec<String>,
    tcx_egress: Vec<String>,
    clsact: bool,
    filters: Vec<(String, u64, String, String, String)>,
}

fn hooks(ns: &str, iface: &str) -> Hooks {
    let tcx = |hook| -> Vec<String> {
        let (_, progs) =
            in_netns(ns, || SchedClassifier::query_tcx(iface, hook)).expect("query tcx");
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let qdiscs: Value =
        serde_json::from_str(&tc(ns, &["-j", "qdisc", "show", "dev", iface])).expect("json");
    let clsact = qdiscs
        .as_array()
        .expect("list")
        .iter()
        .any(|q| q["kind"] == "clsact");
    let mut filters = Vec::new();
    if clsact {
        for hook in ["ingress", "egress"] {
            let text = tc(ns, &["-j", "filter", "show", "dev", iface, hook]);
            let list: Value =
                serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
                    .expect("json");
            for f in list.as_array().expect("list") {
                let Some(o) = f.get("options") else { continue };
                filters.push((
                    hook.to_owned(),
                    f["pref"].as_u64().expect("pref"),
                    f["kind"].as_str().expect("kind").to_owned(),
                    o["handle"].as_str().unwrap_or("").to_owned(),
                    o["prog"]["name"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
    }
    Hooks {
        tcx_ingress: tcx(TcAttachType::Ingress),
        tcx_egress: tcx(TcAttachType::Egress),
        clsact,
        filters,
    }
}

fn all_hooks(ns: &str) -> Vec<Hooks> {
    IFACES.iter().map(|i| hooks(ns, i)).collect()
}

/// `npm-agent uninstall ARGS` in `ns`: (exit code, stdout).
fn uninstall(ns: &str, args: &[&str]) -> (i32, String) {
    let out = output_within(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(env!("CARGO_BIN_EXE_npm-agent"))
            .arg("uninstall")
            .args(args),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "uninstall {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn interface<'a>(out: &'a Value, name: &str) -> &'a Value {
    out["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {out:#}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

#[test]
fn uninstall_removes_ours_in_both_modes_keeps_others_and_is_idempotent() {
    require_root("the uninstall tests");
    let pid = std::process::id();
    let ns = Netns(format!("npm-uninst-{pid}"));
    must(&["ip", "netns", "add", &ns.0]);
    for iface in IFACES {
        must(&[
            "ip",
            "-n",
            &ns.0,
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{iface}-p"),
        ]);
    }
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/npm-uninst-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let foreign_pin = PathBuf::from(format!("/sys/fs/bpf/npm-uninst-foreign-{pid}"));
    let _foreign_pin = RemoveOnDrop(foreign_pin.clone());

    // Ours: the agent's datapath with pinned maps (this ABI), and an older ABI's pins.
    let mut dp = Datapath::load(Some(&bpffs.join(format!("v{ABI_VERSION}")))).expect("load");
    assert_eq!(dp.tc_mode(), TcMode::Tcx, "kernel 6.18 has tcx");
    let old = Datapath::load(Some(&bpffs.join("v1"))).expect("load the old ABI's pins");
    drop(old);
    in_netns(&ns.0, || {
        dp.attach(TCX).expect("attach tcx");
        dp.attach_host(MIX).expect("attach the host program by tcx");
        dp.set_tc_mode(TcMode::Netlink);
        dp.attach(CLS).expect("attach cls_bpf");
        dp.attach(MIX).expect("attach cls_bpf");
        dp.set_tc_mode(TcMode::Tcx);
    });
    // Another tool's: a tcx program after ours on u-tcx, a cls_bpf filter at our priority
    // (another handle) and a u32 filter on u-mix, a clsact with a u32 filter on u-foreign.
    let foreign = load_foreign_prog();
    pin(&foreign, &foreign_pin);
    let tcx_index = in_netns(&ns.0, || {
        npm_agent::datapath::attachments::interfaces()
            .expect("interfaces")
            .into_iter()
            .find(|(_, n)| n == TCX)
            .expect("u-tcx")
            .0
    });
    in_netns(&ns.0, || tcx_attach_ingress(&foreign, tcx_index));
    let pinned = foreign_pin.display().to_string();
    tc(
        &ns.0,
        &[
            "filter",
            "add",
            "dev",
            MIX,
            "egress",
            "pref",
            "10",
            "handle",
            "7",
            "bpf",
            "da",
            "object-pinned",
            &pinned,
        ],
    );
    tc(
        &ns.0,
        &[
            "filter", "add", "dev", MIX, "ingress", "pref", "20", "u32", "match", "u32", "0", "0",
        ],
    );
    tc(&ns.0, &["qdisc", "add", "dev", FOREIGN, "clsact"]);
    tc(
        &ns.0,
        &[
            "filter", "add", "dev", FOREIGN, "ingress", "pref", "20", "u32", "match", "u32", "0",
            "0",
        ],
    );

    let before = all_hooks(&ns.0);
    eprintln!("before: {before:#?}");
    assert_eq!(before[0].tcx_ingress, ["npm_from_pod", FOREIGN_PROG]);
    assert_eq!(before[0].tcx_egress, ["npm_to_pod"]);
    assert_eq!(before[2].tcx_egress, ["npm_host_egress"]);
    assert_eq!(before[1].filters.len(), 2, "{:?}", before[1]);
    // Ours on both hooks, the foreign bpf filter, and the u32 filter (tc shows its hash table
    // and its node).
    assert_eq!(before[2].filters.len(), 5, "{:?}", before[2]);
    let bpffs_arg = bpffs.display().to_string();

    // Dry run: lists everything, changes nothing.
    let (code, text) = uninstall(&ns.0, &["--bpffs-dir", &bpffs_arg, "--dry-run", "--json"]);
    assert_eq!(code, 0, "{text}");
    let dry = json(&text);
    assert_eq!(dry["dry_run"], true);
    let names: Vec<&str> = dry["interfaces"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, [TCX, CLS, MIX], "{dry:#}");
    assert_eq!(
        strings(&interface(&dry, TCX)["removed"]),
        ["tcx ingress npm_from_pod", "tcx egress npm_to_pod"]
    );
    assert_eq!(
        strings(&interface(&dry, TCX)["kept"]),
        [format!("tcx ingress {FOREIGN_PROG}")]
    );
    assert_eq!(
        strings(&interface(&dry, CLS)["removed"]),
        [
            "cls_bpf ingress npm_from_pod (pref 10 handle 0x4e50)",
            "cls_bpf egress npm_to_pod (pref 10 handle 0x4e50)",
            "qdisc clsact"
        ]
    );
    let mix = strings(&interface(&dry, MIX)["removed"]);
    assert_eq!(
        mix,
        [
            "tcx egress npm_host_egress",
            "cls_bpf ingress npm_from_pod (pref 10 handle 0x4e50)",
            "cls_bpf egress npm_to_pod (pref 10 handle 0x4e50)",
        ],
        "the clsact with foreign filters stays"
    );
    let kept = strings(&interface(&dry, MIX)["kept"]);
    assert_eq!(
        kept,
        [
            "filter ingress u32 (pref 20)".to_owned(),
            format!("cls_bpf egress {FOREIGN_PROG} (pref 10 handle 0x7)"),
            "qdisc clsact (other filters on it)".to_owned()
        ],
    );
    assert_eq!(
        strings(&dry["pin_dirs"]),
        [
            bpffs.join("v1").display().to_string(),
            bpffs.join(format!("v{ABI_VERSION}")).display().to_string()
        ]
    );
    assert_eq!(dry["bpffs_dir_removed"], true);
    assert_eq!(dry["errors"].as_array().map(Vec::len), Some(0));
    assert_eq!(all_hooks(&ns.0), before, "the dry run changed the hooks");
    assert!(
        bpffs.join("v1").join("NPM_POLICY").exists()
            && bpffs
                .join(format!("v{ABI_VERSION}"))
                .join("NPM_POLICY")
                .exists()
    );
    // The human form of the same.
    let (code, human) = uninstall(&ns.0, &["--bpffs-dir", &bpffs_arg, "--dry-run"]);
    assert_eq!(code, 0);
    assert!(
        human.contains("u-cls (#") && human.contains("would remove cls_bpf ingress npm_from_pod"),
        "{human}"
    );

    // The real run.
    let (code, text) = uninstall(&ns.0, &["--bpffs-dir", &bpffs_arg, "--json"]);
    assert_eq!(code, 0, "{text}");
    let done = json(&text);
    assert_eq!(done["dry_run"], false);
    for name in [TCX, CLS, MIX] {
        assert_eq!(
            interface(&done, name)["removed"],
            interface(&dry, name)["removed"],
            "the run did what the dry run said"
        );
    }
    assert_eq!(done["pin_dirs"], dry["pin_dirs"]);
    let after = all_hooks(&ns.0);
    eprintln!("after: {after:#?}");
    for (iface, h) in IFACES.iter().zip(&after) {
        for name in h.tcx_ingress.iter().chain(&h.tcx_egress) {
            assert!(!name.starts_with("npm_"), "{iface}: tcx {name} left");
        }
        for f in &h.filters {
            assert!(!f.4.starts_with("npm_"), "{iface}: filter {f:?} left");
        }
    }
    assert_eq!(
        after[0].tcx_ingress,
        [FOREIGN_PROG],
        "the foreign tcx program stays"
    );
    assert!(!after[1].clsact, "the clsact qdisc only ours used is gone");
    assert!(after[2].clsact, "the clsact with foreign filters stays");
    let mut mix_filters: Vec<_> = after[2]
        .filters
        .iter()
        .map(|f| (f.0.as_str(), f.1, f.2.as_str(), f.4.as_str()))
        .collect();
    mix_filters.sort();
    assert_eq!(
        mix_filters,
        [
            ("egress", 10, "bpf", FOREIGN_PROG),
            ("ingress", 20, "u32", ""),
            ("ingress", 20, "u32", ""),
        ],
        "{:?}",
        after[2].filters
    );
    assert_eq!(
        after[3], before[3],
        "the foreign-only interface is untouched"
    );
    assert!(!bpffs.exists(), "pins and the bpffs directory are gone");
    assert!(foreign_pin.exists(), "another tool's pin stays");

    // Again: nothing to do.
    let (code, text) = uninstall(&ns.0, &["--bpffs-dir", &bpffs_arg, "--json"]);
    assert_eq!(code, 0, "{text}");
    let again = json(&text);
    assert_eq!(
        again["interfaces"].as_array().map(Vec::len),
        Some(0),
        "{again:#}"
    );
    assert_eq!(again["pin_dirs"].as_array().map(Vec::len), Some(0));
    assert_eq!(again["bpffs_dir_removed"], false);
    let (code, human) = uninstall(&ns.0, &["--bpffs-dir", &bpffs_arg]);
    assert_eq!(code, 0);
    assert!(human.contains("nothing to do"), "{human}");
    assert_eq!(all_hooks(&ns.0), after);
    drop(dp);
}

/// A `--bpffs-dir` that is not on a bpffs is refused, named, and nothing in it is removed;
/// the exit code says so.
#[test]
fn uninstall_refuses_a_pin_directory_outside_bpffs() {
    require_root("the uninstall tests");
    let pid = std::process::id();
    let ns = Netns(format!("npm-uninst-nobpf-{pid}"));
    must(&["ip", "netns", "add", &ns.0]);
    let dir = std::env::temp_dir().join(format!("npm-uninst-notbpffs-{pid}"));
    let _dir = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(dir.join("v1")).expect("mkdir");
    std::fs::write(dir.join("v1").join("NPM_POLICY"), b"not a pin").expect("write");
    let arg = dir.display().to_string();
    let (code, text) = uninstall(&ns.0, &["--bpffs-dir", &arg, "--json"]);
    assert_eq!(code, 1, "{text}");
    let out = json(&text);
    let errors = strings(&out["errors"]);
    assert!(
        errors.len() == 1 && errors[0].contains(&arg) && errors[0].contains("not on a bpffs"),
        "{errors:?}"
    );
    assert!(
        dir.join("v1").join("NPM_POLICY").exists(),
        "nothing removed"
    );
}
