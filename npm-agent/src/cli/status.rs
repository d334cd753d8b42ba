//! `npm-agent status`: what npm enforces on this node, for the operator on it.
//!
//! Sources of truth, in this order:
//! - the pinned maps of this build's ABI (`<bpffs-dir>/v<ABI_VERSION>`), read-only: the
//!   endpoints by interface with their identity and isolation flags, every map's entries
//!   against its capacity (conntrack occupancy among them). They are what the datapath uses,
//!   agent running or not;
//! - the interfaces of the calling process's network namespace: where our programs are
//!   attached and how (tcx, cls_bpf or both), as `uninstall` finds them;
//! - the bpffs directory: which ABI versions' pins are there;
//! - the agent's HTTP endpoint when it answers (`/readyz`, `/debug/state`): readiness, the
//!   last sync, the source, recent errors, and per policy the generation its maps hold.
//!
//! Exit 0 when everything could be read (an agent that does not answer is reported, not an
//! error: the pins are the enforcement); 1 when something could not (each named in `errors`).
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::time::Duration;

use npm_common::ABI_VERSION;
use npm_common::maps::{
    EP_CLASS_EGRESS, EP_CLASS_INGRESS, EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, ID_PENDING,
    MAP_ENDPOINTS, MAP_IDENTITIES,
};
use serde::Serialize;

use super::args::StatusArgs;
use crate::datapath::attachments;
use crate::datapath::inspect::{self, PINNED_MAPS};
use crate::datapath::pin_dirs;

/// How long the agent's HTTP endpoint may take to answer, per request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read from it.
const HTTP_MAX: u64 = 8 << 20;

/// The `--json` output. Field names are a contract: extend, never rename.
#[derive(Debug, Default, Serialize)]
struct Output {
    bpffs_dir: String,
    /// This build's ABI version; its pins are `<bpffs_dir>/v<abi_version>`.
    abi_version: u32,
    /// That directory, when it exists (null: no pins of this ABI, nothing below is from maps).
    pin_dir: Option<String>,
    /// Pin directories of other ABI versions (a rolling update in progress, or left behind).
    other_pin_dirs: Vec<PinDir>,
    /// Every pinned map of this ABI: entries against capacity.
    maps: Vec<MapOut>,
    /// Maps of this ABI not pinned in `pin_dir` (an agent starting up, or pins of another
    /// build of the same ABI); not an error.
    missing_maps: Vec<&'static str>,
    /// `NPM_ENDPOINTS`: the interfaces the datapath manages, by ifindex.
    endpoints: Vec<Endpoint>,
    /// The interfaces that carry our programs, by ifindex.
    interfaces: Vec<Interface>,
    agent: Agent,
    /// What could not be read, each naming its map, interface or URL.
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct PinDir {
    version: u32,
    path: String,
}

#[derive(Debug, Serialize)]
struct MapOut {
    name: &'static str,
    /// `hash`, `lru_hash`, `lpm_trie`, `array`, `percpu_array`, `ringbuf` (`NPM_EVENTS`).
    kind: String,
    /// Keys present; null for arrays (every index exists).
    entries: Option<u32>,
    max_entries: u32,
}

#[derive(Debug, Serialize)]
struct Endpoint {
    ifindex: u32,
    /// Null when no interface has that index in this network namespace (a stale entry).
    interface: Option<String>,
    /// The pod's addresses (`NPM_IDENTITIES` entries that name this ifindex).
    addresses: Vec<std::net::IpAddr>,
    /// The pod's identity (`EndpointInfo::id`); `pending` for a new interface whose pod is
    /// not known yet (default-deny in the directions such a pod is isolated in).
    identity: u32,
    pending: bool,
    isolated_ingress: bool,
    isolated_egress: bool,
    /// Some ingress (egress) rule of the identity names ipBlocks or any peer (`EP_CLASS_*`).
    cidr_classes_ingress: bool,
    cidr_classes_egress: bool,
    /// The raw `EP_*` bits.
    flags: u32,
    /// The endpoint's counter slot in `NPM_METRICS`.
    slot: u32,
    /// How our programs are attached to its interface: `tcx`, `cls_bpf`, `tcx+cls_bpf`, or
    /// null (none: it is not enforced).
    attach: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct Interface {
    name: String,
    ifindex: u32,
    /// `tcx`, `cls_bpf` or `tcx+cls_bpf`.
    mode: &'static str,
    /// `tcx ingress npm_from_pod`, `cls_bpf egress npm_to_pod (pref 10 handle 0x4e50)`.
    programs: Vec<String>,
    /// Whether the interface is in `NPM_ENDPOINTS` (a pod's, or a pending link's); false for
    /// a node link with `npm_host_egress` only.
    endpoint: bool,
}

#[derive(Debug, Default, Serialize)]
struct Agent {
    url: String,
    /// The HTTP endpoint answered `/readyz`.
    reachable: bool,
    /// `/readyz` said 200.
    ready: Option<bool>,
    /// `/readyz`'s text.
    readyz: Option<String>,
    /// `/debug/state` as the agent serves it (its own contract: `ready_since`, `last_sync`,
    /// `source_connected`, `last_errors`, `counts`, `policies`, `config`, ...); null when
    /// unreachable or turned off (EnableHTTPDebugAPI).
    debug_state: Option<serde_json::Value>,
    /// Why the endpoint could not be read.
    error: Option<String>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<i32> {
    let mut out = Output {
        bpffs_dir: args.bpffs_dir.display().to_string(),
        abi_version: ABI_VERSION,
        ..Output::default()
    };
    let pin_dir = args.bpffs_dir.join(format!("v{ABI_VERSION}"));
    for (version, path) in pin_dirs(&args.bpffs_dir) {
        if version != ABI_VERSION {
            out.other_pin_dirs.push(PinDir {
                version,
                path: path.display().to_string(),
            });
        }
    }
    let mut endpoints = Vec::new();
    let mut identities = Vec::new();
    if pin_dir.is_dir() {
        out.pin_dir = Some(pin_dir.display().to_string());
        read_maps(&pin_dir, &mut out);
        if !out.missing_maps.contains(&MAP_ENDPOINTS) {
            match inspect::pinned_endpoints(&pin_dir) {
                Ok(e) => endpoints = e,
                Err(e) => out.errors.push(format!("{:#}", anyhow::Error::from(e))),
            }
        }
        if !out.missing_maps.contains(&MAP_IDENTITIES) {
            match inspect::pinned_identities(&pin_dir) {
                Ok(i) => identities = i,
                Err(e) => out.errors.push(format!("{:#}", anyhow::Error::from(e))),
            }
        }
    }
    let hooks = read_hooks(&mut out);
    for (ifindex, ep) in endpoints {
        let attach = hooks
            .iter()
            .find(|h| h.ifindex == ifindex)
            .and_then(attachments::InterfaceHooks::mode);
        out.endpoints.push(Endpoint {
            ifindex,
            interface: inspect::interface_name(ifindex),
            addresses: identities
                .iter()
                .filter(|(_, p)| p.ifindex == ifindex)
                .map(|(a, _)| {
                    let v6 = std::net::Ipv6Addr::from(*a);
                    v6.to_ipv4_mapped()
                        .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
                })
                .collect(),
            identity: ep.id,
            pending: ep.id == ID_PENDING,
            isolated_ingress: ep.flags & EP_ISOLATE_INGRESS != 0,
            isolated_egress: ep.flags & EP_ISOLATE_EGRESS != 0,
            cidr_classes_ingress: ep.flags & EP_CLASS_INGRESS != 0,
            cidr_classes_egress: ep.flags & EP_CLASS_EGRESS != 0,
            flags: ep.flags,
            slot: ep.slot,
            attach,
        });
    }
    for h in hooks {
        if let Some(mode) = h.mode() {
            out.interfaces.push(Interface {
                endpoint: out.endpoints.iter().any(|e| e.ifindex == h.ifindex),
                name: h.name.clone(),
                ifindex: h.ifindex,
                mode,
                programs: h.ours.iter().map(ToString::to_string).collect(),
            });
        }
    }
    out.agent = read_agent(&args.url);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_human(&out);
    }
    Ok(if out.errors.is_empty() { 0 } else { 1 })
}

fn read_maps(pin_dir: &Path, out: &mut Output) {
    for name in PINNED_MAPS {
        if !pin_dir.join(name).exists() {
            out.missing_maps.push(name);
            continue;
        }
        match inspect::map_occupancy(pin_dir, name) {
            Ok(m) => out.maps.push(MapOut {
                name: m.name,
                kind: m.kind,
                entries: m.entries,
                max_entries: m.max_entries,
            }),
            Err(e) => out.errors.push(format!("{:#}", anyhow::Error::from(e))),
        }
    }
}

/// What is on the hooks of every interface (errors go to `out.errors`, the rest is read).
fn read_hooks(out: &mut Output) -> Vec<attachments::InterfaceHooks> {
    let interfaces = match attachments::interfaces() {
        Ok(list) => list,
        Err(e) => {
            out.errors.push(format!("{:#}", anyhow::Error::from(e)));
            return Vec::new();
        }
    };
    let clsact = attachments::clsact_interfaces().unwrap_or_else(|e| {
        out.errors.push(format!(
            "listing clsact qdiscs (cls_bpf filters not shown): {:#}",
            anyhow::Error::from(e)
        ));
        Vec::new()
    });
    let mut hooks = Vec::new();
    for (ifindex, name) in interfaces {
        match attachments::interface_hooks(&name, ifindex, clsact.contains(&name)) {
            Ok(h) => hooks.push(h),
            Err(e) => out
                .errors
                .push(format!("{name} (#{ifindex}): {:#}", anyhow::Error::from(e))),
        }
    }
    hooks
}

fn read_agent(url: &str) -> Agent {
    let mut agent = Agent {
        url: url.to_owned(),
        ..Agent::default()
    };
    match http_get(url, "/readyz") {
        Ok((code, body)) => {
            agent.reachable = true;
            agent.ready = Some(code == 200);
            agent.readyz = Some(body.trim_end().to_owned());
        }
        Err(e) => {
            agent.error = Some(e);
            return agent;
        }
    }
    match http_get(url, "/debug/state") {
        Ok((200, body)) => match serde_json::from_str(&body) {
            Ok(v) => agent.debug_state = Some(v),
            Err(e) => agent.error = Some(format!("{url}/debug/state: not JSON: {e}")),
        },
        Ok((code, _)) => {
            agent.error = Some(format!(
                "{url}/debug/state: HTTP {code} (EnableHTTPDebugAPI off?)"
            ));
        }
        Err(e) => agent.error = Some(e),
    }
    agent
}

/// A plain HTTP/1.1 GET of `path` on `base` (`http://HOST:PORT`): (status, body).
pub(crate) fn http_get(base: &str, path: &str) -> Result<(u16, String), String> {
    let what = format!("{}{path}", base.trim_end_matches('/'));
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// URLs are supported"))?
        .trim_end_matches('/');
    if authority.contains('/') {
        return Err(format!(
            "{base}: give the endpoint's root (http://HOST:PORT)"
        ));
    }
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{what}: {e}"))?
        .next()
        .ok_or_else(|| format!("{what}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(|e| format!("{what}: {e}"))?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
        .map_err(|e| format!("{what}: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{what}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .take(HTTP_MAX)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{what}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{what}: no HTTP answer"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{what}: bad status line"))?;
    Ok((code, body.to_owned()))
}

fn print_human(out: &Output) {
    match &out.pin_dir {
        Some(p) => println!("pins: {p} (ABI v{})", out.abi_version),
        None => println!(
            "pins: none of ABI v{} under {} (no agent of this version ran here)",
            out.abi_version, out.bpffs_dir
        ),
    }
    if !out.missing_maps.is_empty() {
        println!(
            "pins: not pinned: {} (an agent starting up?)",
            out.missing_maps.join(", ")
        );
    }
    for d in &out.other_pin_dirs {
        println!("pins: also ABI v{} at {}", d.version, d.path);
    }
    let a = &out.agent;
    match (&a.readyz, &a.error) {
        (Some(r), _) => println!("agent: {} {}", a.url, r.replace('\n', "; ")),
        (None, Some(e)) => println!("agent: not answering ({e}); the pins keep enforcing"),
        (None, None) => {}
    }
    if let Some(d) = &a.debug_state {
        let field = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
        let errors = d
            .get("last_errors")
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len);
        println!(
            "agent: last sync {}, source {}, {errors} recent errors",
            field("last_sync"),
            if d.get("source_connected").and_then(|v| v.as_bool()) == Some(true) {
                "connected".to_owned()
            } else {
                format!("disconnected since {}", field("source_disconnected_since"))
            },
        );
        if let Some(e) = d
            .get("last_errors")
            .and_then(|v| v.as_array())
            .and_then(|l| l.last())
        {
            println!("agent: last error: {e}");
        }
    }
    if !out.endpoints.is_empty() {
        println!();
        println!(
            "{:<8} {:<16} {:<10} {:<9} {:<9} {:<5} {:<12} ADDRESSES",
            "IFINDEX", "INTERFACE", "IDENTITY", "INGRESS", "EGRESS", "SLOT", "ATTACH"
        );
        let dir = |isolated: bool| if isolated { "isolated" } else { "open" };
        for e in &out.endpoints {
            println!(
                "{:<8} {:<16} {:<10} {:<9} {:<9} {:<5} {:<12} {}",
                e.ifindex,
                e.interface.as_deref().unwrap_or("(gone)"),
                if e.pending {
                    "pending".to_owned()
                } else {
                    e.identity.to_string()
                },
                dir(e.isolated_ingress),
                dir(e.isolated_egress),
                e.slot,
                e.attach.unwrap_or("NOT ATTACHED"),
                e.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    let hosts: Vec<_> = out.interfaces.iter().filter(|i| !i.endpoint).collect();
    if !hosts.is_empty() {
        println!();
        for i in hosts {
            println!(
                "{} (#{}) {}: {}",
                i.name,
                i.ifindex,
                i.mode,
                i.programs.join(", ")
            );
        }
    }
    if !out.maps.is_empty() {
        println!();
        println!("{:<14} {:>9} {:>9}", "MAP", "ENTRIES", "MAX");
        for m in &out.maps {
            let entries = m.entries.map_or("-".to_owned(), |n| n.to_string());
            println!("{:<14} {:>9} {:>9}", m.name, entries, m.max_entries);
        }
    }
    if let Some(policies) = a
        .debug_state
        .as_ref()
        .and_then(|d| d.get("policies"))
        .and_then(|p| p.as_object())
        .filter(|p| !p.is_empty())
    {
        println!();
        println!("{:<40} {:>4}  REALIZED", "POLICY", "GEN");
        for (name, p) in policies {
            println!(
                "{:<40} {:>4}  {}",
                name,
                p.get("generation").and_then(|g| g.as_u64()).unwrap_or(0),
                p.get("realized_at")
                    .and_then(|r| r.as_str())
                    .unwrap_or("not yet (map writes failing)")
            );
        }
    }
    for e in &out.errors {
        println!("error: {e}");
    }
}
