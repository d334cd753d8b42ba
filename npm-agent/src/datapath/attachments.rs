//! What of ours is attached where on this node, and its removal (`npm-agent status`,
//! `npm-agent uninstall`).
//!
//! Ours, on a TC hook of any interface of the calling thread's network namespace:
//! - a tcx program whose name is one of [`OUR_PROGS`];
//! - a cls_bpf filter at [`TC_PRIORITY`] / [`TC_HANDLE`] whose program's name is one of
//!   [`OUR_PROGS`] (both conditions: a filter of ours always has both; a program of that name
//!   elsewhere, or another program at our place, belongs to someone else).
//!
//! Everything else on the hooks (other tools' tcx programs, filters, qdiscs) is reported as
//! foreign and never touched. tcx is queried with `BPF_PROG_QUERY`; cls_bpf filters and clsact
//! qdiscs are listed with iproute2's `tc -j` (which the image ships for node discovery), and
//! a clsact qdisc is removed with `tc qdisc del`, since aya has no call for either.
use std::process::Command;

use aya::programs::TcAttachType;
use serde::{Deserialize, Serialize};

use super::loader::{DatapathError, OUR_PROGS, TC_HANDLE, TC_PRIORITY, remove_our_filter};
use super::sys;

/// A TC hook of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }

    fn tcx(self) -> sys::TcxHook {
        match self {
            Hook::Ingress => sys::TcxHook::Ingress,
            Hook::Egress => sys::TcxHook::Egress,
        }
    }
}

/// How a program is attached to a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    /// `BPF_PROG_ATTACH` on the tcx hook (`TcMode::Tcx`).
    Tcx,
    /// A cls_bpf filter on the clsact qdisc (`TcMode::Netlink`).
    ClsBpf,
    /// A filter of another classifier on the clsact qdisc (never ours; its kind, e.g. `u32`,
    /// is the attachment's `prog`).
    OtherFilter,
}

impl AttachKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachKind::Tcx => "tcx",
            AttachKind::ClsBpf => "cls_bpf",
            AttachKind::OtherFilter => "filter",
        }
    }
}

/// One program or filter on a hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    pub hook: Hook,
    pub kind: AttachKind,
    /// The program's name as the kernel keeps it (first 15 bytes); a foreign filter that is
    /// not cls_bpf has its classifier's kind here (e.g. `u32`).
    pub prog: String,
    /// The kernel's program id (0 for a filter that runs no program).
    pub prog_id: u32,
    /// cls_bpf only: the filter's priority and handle.
    pub pref: Option<u16>,
    pub handle: Option<u32>,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.kind.as_str(),
            self.hook.as_str(),
            self.prog
        )?;
        match (self.pref, self.handle) {
            (Some(pref), Some(handle)) => write!(f, " (pref {pref} handle {handle:#x})"),
            (Some(pref), None) => write!(f, " (pref {pref})"),
            _ => Ok(()),
        }
    }
}

/// What is on the TC hooks of one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceHooks {
    pub name: String,
    pub ifindex: u32,
    /// Ours, tcx first, ingress first.
    pub ours: Vec<Attachment>,
    /// Everything else on the two hooks (tcx programs and clsact filters).
    pub foreign: Vec<Attachment>,
    /// The interface has a clsact qdisc.
    pub clsact: bool,
}

impl InterfaceHooks {
    /// How ours are attached: `"tcx"`, `"cls_bpf"`, `"tcx+cls_bpf"` (both at once: the
    /// new-pod fast path before its move to tcx, or an interrupted upgrade), or `None`.
    pub fn mode(&self) -> Option<&'static str> {
        let tcx = self.ours.iter().any(|a| a.kind == AttachKind::Tcx);
        let cls = self.ours.iter().any(|a| a.kind == AttachKind::ClsBpf);
        match (tcx, cls) {
            (true, true) => Some("tcx+cls_bpf"),
            (true, false) => Some("tcx"),
            (false, true) => Some("cls_bpf"),
            (false, false) => None,
        }
    }
}

fn is_ours(name: &str) -> bool {
    OUR_PROGS.contains(&name)
}

/// Every interface of the calling thread's network namespace, as (ifindex, name).
pub fn interfaces() -> Result<Vec<(u32, String)>, DatapathError> {
    sys::interfaces().map_err(|source| DatapathError::Interface {
        iface: "(listing the interfaces)".to_owned(),
        source,
    })
}

/// The interfaces that have a clsact qdisc (`tc -j qdisc show`, all interfaces at once).
pub fn clsact_interfaces() -> Result<Vec<String>, DatapathError> {
    #[derive(Deserialize)]
    struct Qdisc {
        kind: String,
        #[serde(default)]
        dev: String,
    }
    let text = tc(&["-j", "qdisc", "show"], "(all interfaces)")?;
    let list: Vec<Qdisc> = parse_tc(&text, "tc -j qdisc show", "(all interfaces)")?;
    Ok(list
        .into_iter()
        .filter(|q| q.kind == "clsact")
        .map(|q| q.dev)
        .collect())
}

/// What is on the hooks of interface `name` (#`ifindex`); `clsact`: whether it has a clsact
/// qdisc ([`clsact_interfaces`]), so `tc` runs only where there can be filters.
pub fn interface_hooks(
    name: &str,
    ifindex: u32,
    clsact: bool,
) -> Result<InterfaceHooks, DatapathError> {
    let mut out = InterfaceHooks {
        name: name.to_owned(),
        ifindex,
        clsact,
        ..InterfaceHooks::default()
    };
    for hook in Hook::BOTH {
        for p in super::loader::tcx_query(name, hook.attach_type())? {
            let prog = p.name_as_str().unwrap_or("").to_owned();
            let a = Attachment {
                hook,
                kind: AttachKind::Tcx,
                prog_id: p.id(),
                prog,
                pref: None,
                handle: None,
            };
            if is_ours(&a.prog) {
                out.ours.push(a);
            } else {
                out.foreign.push(a);
            }
        }
    }
    if clsact {
        for hook in Hook::BOTH {
            for a in clsact_filters(name, hook)? {
                let ours = a.pref == Some(TC_PRIORITY)
                    && a.handle == Some(TC_HANDLE)
                    && a.kind == AttachKind::ClsBpf
                    && is_ours(&a.prog);
                if ours {
                    out.ours.push(a);
                } else {
                    out.foreign.push(a);
                }
            }
        }
    }
    Ok(out)
}

/// The filters on clsact `hook` of `name` (`tc -j filter show dev NAME ingress|egress`).
fn clsact_filters(name: &str, hook: Hook) -> Result<Vec<Attachment>, DatapathError> {
    #[derive(Deserialize)]
    struct Prog {
        #[serde(default)]
        id: u32,
        #[serde(default)]
        name: String,
    }
    #[derive(Deserialize)]
    struct Options {
        handle: Option<String>,
        bpf_name: Option<String>,
        prog: Option<Prog>,
        fh: Option<String>,
    }
    #[derive(Deserialize)]
    struct Filter {
        kind: String,
        pref: u16,
        /// Absent on the header entry tc prints per priority.
        options: Option<Options>,
    }
    let command = format!("tc -j filter show dev {name} {}", hook.as_str());
    let text = tc(&["-j", "filter", "show", "dev", name, hook.as_str()], name)?;
    let list: Vec<Filter> = parse_tc(&text, &command, name)?;
    Ok(list
        .into_iter()
        .filter_map(|f| {
            let o = f.options?;
            let handle = o
                .handle
                .or(o.fh)
                .and_then(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).ok());
            let (kind, prog, prog_id) = if f.kind == "bpf" {
                let (name, id) = match o.prog {
                    Some(p) if !p.name.is_empty() => (p.name, p.id),
                    Some(p) => (o.bpf_name.unwrap_or_default(), p.id),
                    None => (o.bpf_name.unwrap_or_default(), 0),
                };
                (AttachKind::ClsBpf, name, id)
            } else {
                (AttachKind::OtherFilter, f.kind, 0)
            };
            Some(Attachment {
                hook,
                kind,
                prog,
                prog_id,
                pref: Some(f.pref),
                handle,
            })
        })
        .collect())
}

/// Runs `tc ARGS` (iproute2) and returns its standard output.
fn tc(args: &[&str], iface: &str) -> Result<String, DatapathError> {
    let err = |source| DatapathError::Interface {
        iface: iface.to_owned(),
        source,
    };
    let out = Command::new("tc").args(args).output().map_err(|e| {
        err(std::io::Error::new(
            e.kind(),
            format!("running `tc {}` (iproute2): {e}", args.join(" ")),
        ))
    })?;
    if !out.status.success() {
        return Err(err(std::io::Error::other(format!(
            "`tc {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_tc<T: for<'de> Deserialize<'de>>(
    text: &str,
    command: &str,
    iface: &str,
) -> Result<Vec<T>, DatapathError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| DatapathError::Interface {
        iface: iface.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("`{command}` printed JSON this version does not understand: {e}"),
        ),
    })
}

/// Removes one of ours (an entry of [`InterfaceHooks::ours`]) from interface `name`
/// (#`ifindex`). Already gone is not an error.
pub fn remove(name: &str, ifindex: u32, a: &Attachment) -> Result<(), DatapathError> {
    match a.kind {
        AttachKind::Tcx => {
            let Some(p) = super::loader::tcx_query(name, a.hook.attach_type())?
                .into_iter()
                .find(|p| p.id() == a.prog_id)
            else {
                return Ok(());
            };
            let fd = p.fd().map_err(|source| DatapathError::Program {
                prog: a.prog.clone(),
                source: Box::new(source),
            })?;
            match sys::tcx_detach(ifindex, a.hook.tcx(), std::os::fd::AsFd::as_fd(&fd)) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                Err(source) => Err(DatapathError::DetachTcx {
                    iface: name.to_owned(),
                    prog: a.prog.clone(),
                    source,
                }),
            }
        }
        AttachKind::ClsBpf => remove_our_filter(name, &a.prog, a.hook.attach_type()),
        // Never ours (`interface_hooks`).
        AttachKind::OtherFilter => Ok(()),
    }
}

/// Removes the clsact qdisc of `name` (`tc qdisc del dev NAME clsact`). The caller checks it
/// holds no filter first.
pub fn remove_clsact(name: &str) -> Result<(), DatapathError> {
    tc(&["qdisc", "del", "dev", name, "clsact"], name).map(|_| ())
}

/// The filters on both clsact hooks of `name`, whoever's (for the "is it empty" check before
/// [`remove_clsact`]).
pub fn clsact_filter_count(name: &str) -> Result<usize, DatapathError> {
    let mut n = 0;
    for hook in Hook::BOTH {
        n += clsact_filters(name, hook)?.len();
    }
    Ok(n)
}
