//! `npm-agent uninstall`: leave the node as npm found it.
//!
//! In the calling process's network namespace: every interface's tcx programs and cls_bpf
//! filters of ours are detached (`datapath::attachments` says what is ours; nothing else on
//! the hooks is touched); then the pinned maps of every ABI version and the bpffs directory.
//!
//! **The clsact qdisc.** Nothing records who added a clsact qdisc (tc keeps no owner), and
//! the agent adds one for its cls_bpf filters (the netlink mode, and the new-pod fast path on
//! tcx kernels, whose filters later give way to tcx). So the qdisc of an interface is removed
//! only when this run removed a cls_bpf filter of ours from it and it then holds no filter at
//! all, on either hook: an empty clsact runs nothing, and one with another tool's filters
//! stays. A clsact that another tool added before ours and left empty goes too; that tool
//! adds it again with its next filter (`tc qdisc add ... clsact` is how every tool starts).
//!
//! Each failure names the interface, program or path, and the run goes on with the rest;
//! exit 1 if anything failed. A second run finds nothing to do and exits 0.
use std::path::Path;

use serde::Serialize;

use super::args::UninstallArgs;
use crate::datapath::attachments::{self, AttachKind};
use crate::datapath::{on_bpffs, pin_dirs, remove_pin_dir};

/// The `--json` output. Field names are a contract: extend, never rename.
#[derive(Debug, Default, Serialize)]
struct Output {
    dry_run: bool,
    bpffs_dir: String,
    /// The interfaces that had something of ours, by ifindex.
    interfaces: Vec<Interface>,
    /// The pin directories (`<bpffs_dir>/v<N>`) removed (or, with `dry_run`, to remove).
    pin_dirs: Vec<String>,
    /// `bpffs_dir` itself was (would be) removed: it held nothing else.
    bpffs_dir_removed: bool,
    /// What failed, each naming its interface, program or path.
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Interface {
    name: String,
    ifindex: u32,
    /// What was (would be) removed: `tcx ingress npm_from_pod`, `cls_bpf egress npm_to_pod
    /// (pref 10 handle 0x4e50)`, `qdisc clsact`.
    removed: Vec<String>,
    /// Other tools' programs and filters on the same hooks, left in place.
    kept: Vec<String>,
}

/// Returns the process exit code: 0 when everything of ours is gone (or, with `--dry-run`,
/// could be listed), 1 when anything failed.
pub fn run(args: UninstallArgs) -> anyhow::Result<i32> {
    let mut out = Output {
        dry_run: args.dry_run,
        bpffs_dir: args.bpffs_dir.display().to_string(),
        ..Output::default()
    };
    detach_all(args.dry_run, &mut out);
    remove_pins(&args.bpffs_dir, args.dry_run, &mut out);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_human(&out);
    }
    Ok(if out.errors.is_empty() { 0 } else { 1 })
}

fn detach_all(dry_run: bool, out: &mut Output) {
    let interfaces = match attachments::interfaces() {
        Ok(list) => list,
        Err(e) => {
            out.errors.push(format!("{:#}", anyhow::Error::from(e)));
            return;
        }
    };
    let clsact = match attachments::clsact_interfaces() {
        Ok(list) => list,
        Err(e) => {
            // tcx programs can still be found and removed; our filters, if any, cannot.
            out.errors.push(format!(
                "listing clsact qdiscs (cls_bpf filters not checked): {:#}",
                anyhow::Error::from(e)
            ));
            Vec::new()
        }
    };
    for (ifindex, name) in interfaces {
        let hooks = match attachments::interface_hooks(&name, ifindex, clsact.contains(&name)) {
            Ok(h) => h,
            Err(e) => {
                out.errors
                    .push(format!("{name} (#{ifindex}): {:#}", anyhow::Error::from(e)));
                continue;
            }
        };
        if hooks.ours.is_empty() {
            continue;
        }
        let mut iface = Interface {
            name: name.clone(),
            ifindex,
            removed: Vec::new(),
            kept: Vec::new(),
        };
        for a in &hooks.foreign {
            // Some classifiers show one filter as several entries (u32: its hash table too).
            let shown = a.to_string();
            if !iface.kept.contains(&shown) {
                iface.kept.push(shown);
            }
        }
        let mut removed_filter = false;
        for a in &hooks.ours {
            let done = if dry_run {
                Ok(())
            } else {
                attachments::remove(&name, ifindex, a)
            };
            match done {
                Ok(()) => {
                    removed_filter |= a.kind == AttachKind::ClsBpf;
                    iface.removed.push(a.to_string());
                }
                Err(e) => out.errors.push(format!(
                    "{name} (#{ifindex}): removing {a}: {:#}",
                    anyhow::Error::from(e)
                )),
            }
        }
        if hooks.clsact && removed_filter {
            // Empty once ours are gone: in a dry run, when every filter on it is ours.
            let empty = if dry_run {
                Ok(!hooks.foreign.iter().any(|a| a.kind != AttachKind::Tcx))
            } else {
                attachments::clsact_filter_count(&name).map(|n| n == 0)
            };
            let removed = match empty {
                Ok(true) if dry_run => Ok(true),
                Ok(true) => attachments::remove_clsact(&name).map(|()| true),
                Ok(false) => Ok(false),
                Err(e) => Err(e),
            };
            match removed {
                Ok(true) => iface.removed.push("qdisc clsact".to_owned()),
                Ok(false) => iface
                    .kept
                    .push("qdisc clsact (other filters on it)".to_owned()),
                Err(e) => out.errors.push(format!(
                    "{name} (#{ifindex}): the clsact qdisc: {:#}",
                    anyhow::Error::from(e)
                )),
            }
        }
        out.interfaces.push(iface);
    }
}

fn remove_pins(dir: &Path, dry_run: bool, out: &mut Output) {
    if !dir.exists() {
        return;
    }
    match on_bpffs(dir) {
        Ok(true) => {}
        Ok(false) => {
            out.errors.push(format!(
                "{} is not on a bpffs: not a pin directory of ours, nothing removed there",
                dir.display()
            ));
            return;
        }
        Err(e) => {
            out.errors.push(format!("{:#}", anyhow::Error::from(e)));
            return;
        }
    }
    let versions = pin_dirs(dir);
    for (_, path) in &versions {
        let done = if dry_run {
            Ok(())
        } else {
            remove_pin_dir(path)
        };
        match done {
            Ok(()) => out.pin_dirs.push(path.display().to_string()),
            Err(e) => out.errors.push(format!("{:#}", anyhow::Error::from(e))),
        }
    }
    let others = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| !(dry_run && versions.iter().any(|(_, p)| *p == e.path())))
            .count(),
        Err(e) => {
            out.errors.push(format!("reading {}: {e}", dir.display()));
            return;
        }
    };
    if others > 0 {
        return;
    }
    if dry_run {
        out.bpffs_dir_removed = true;
        return;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => out.bpffs_dir_removed = true,
        Err(e) => out.errors.push(format!("removing {}: {e}", dir.display())),
    }
}

fn print_human(out: &Output) {
    let verb = if out.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for i in &out.interfaces {
        if !i.removed.is_empty() {
            println!(
                "{} (#{}): {verb} {}",
                i.name,
                i.ifindex,
                i.removed.join(", ")
            );
        }
        if !i.kept.is_empty() {
            println!("{} (#{}): kept {}", i.name, i.ifindex, i.kept.join(", "));
        }
    }
    for p in &out.pin_dirs {
        println!("pins: {verb} {p}");
    }
    if out.bpffs_dir_removed {
        println!("pins: {verb} {}", out.bpffs_dir);
    }
    for e in &out.errors {
        println!("error: {e}");
    }
    let nothing = out.interfaces.iter().all(|i| i.removed.is_empty())
        && out.pin_dirs.is_empty()
        && !out.bpffs_dir_removed;
    if nothing && out.errors.is_empty() {
        println!(
            "nothing to do: no program of ours on any interface of this network namespace, no pins under {}",
            out.bpffs_dir
        );
    }
}
