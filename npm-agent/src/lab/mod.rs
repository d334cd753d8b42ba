//! The lab: a throw-away Kubernetes-like node made of network namespaces, with real
//! responders on every declared port and a parallel prober. Enforcement is not part of it:
//! attach it in [`Lab::node`].
//!
//! ```text
//! Lab::build(spec)      namespaces <prefix>-node, <prefix>-p<i> (pods), <prefix>-x<j> (externals)
//!   topology.rs         names, addresses, MACs, `ip -batch` commands (pure)
//!   responder.rs        TCP/UDP/raw-SCTP servers on the lab's tokio runtime
//!   probe.rs            batched, concurrent probes from sockets opened in the source netns
//!   report.rs           ProbeResult (JSON contract) and render_matrix
//!   services.rs         kube-proxy emulation: Services -> nftables DNAT in the node (pure plan)
//! ```
//!
//! `<prefix>` is `npmlab-<pid>-<n>` (n counts labs built by this process), so several labs
//! can coexist, e.g. in parallel tests. Dropping the [`Lab`] stops the responders, then
//! deletes every namespace; the veths die with them. Nothing is created in the caller's
//! namespace.
//!
//! A hostNetwork pod runs in the node netns with the node's addresses (as on a real node,
//! where it is one more process of the host): probes from it are node-originated traffic,
//! like kubelet's health checks, and nothing is enforced on it.
//!
//! Address families: a probe goes over IPv4 when source and destination both have an IPv4
//! address, else over IPv6 when both have one, else it is not sent
//! ([`Outcome::NoCommonFamily`], counted as denied). [`Lab::set_prefer_ipv6`] swaps the
//! order, to exercise the IPv6 path between dual-stack pods. Either way a result stays one
//! row per (from, to, port, protocol).
//!
//! Services ([`Lab::set_services`]): each ClusterIP port is DNAT'd by nftables in the node (as
//! kube-proxy does) to one backend pod, and probed from every pod as `svc:ns/name`.
mod probe;
mod report;
mod responder;
mod sctp;
mod services;
pub(crate) mod topology;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use probe::{ATTEMPTS, DEFAULT_TIMEOUT, MAX_IN_FLIGHT};
pub use report::{Outcome, ProbeProtocol, ProbeResult, render_matrix};

use crate::model::{ObjRef, Pod, Protocol};
use crate::netns::{self, NetNs, NetNsError};

/// What to build: the pods of the node and the hosts outside it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabSpec {
    pub pods: Vec<Pod>,
    pub externals: Vec<External>,
}

/// A host outside the node, reachable through it (its own netns and veth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub ip: IpAddr,
    /// The ports it serves. Empty: it serves nothing (and is only probed from).
    pub ports: Vec<(u16, Protocol)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("pod {pod} appears twice")]
    DuplicatePod { pod: String },
    #[error("address {ip} is used twice (pods, externals and the node's own addresses)")]
    DuplicateIp { ip: IpAddr },
    #[error(
        "hostNetwork pod {pod}: {port}/{protocol} is already taken on the node by another hostNetwork pod"
    )]
    HostPortConflict {
        pod: String,
        port: u16,
        protocol: Protocol,
    },
    #[error("the pod address pool is exhausted")]
    PoolExhausted,
    #[error("interface {name} not found in the node namespace")]
    MissingInterface { name: String },
    #[error("{what}")]
    Socket {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start the lab runtime")]
    Runtime(#[source] std::io::Error),
}

impl LabError {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LabError::NetNs(e) => e.metric_label(),
            LabError::DuplicatePod { .. } => "duplicate_pod",
            LabError::DuplicateIp { .. } => "duplicate_ip",
            LabError::HostPortConflict { .. } => "host_port_conflict",
            LabError::PoolExhausted => "pool_exhausted",
            LabError::MissingInterface { .. } => "missing_interface",
            LabError::Socket { .. } => "socket",
            LabError::Runtime(_) => "runtime",
        }
    }
}

/// Counts labs built by this process, for unique prefixes.
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A running lab. Owns every namespace, veth, socket and thread it made; Drop removes all.
pub struct Lab {
    // Drop order matters: the runtime (and with it every socket) goes first, then the
    // endpoint namespaces, then the node. See `Drop`.
    runtime: Option<tokio::runtime::Runtime>,
    /// One per endpoint, in plan order; None for a hostNetwork pod (it runs in the node).
    endpoints_ns: Vec<Option<NetNs>>,
    node: Option<NetNs>,
    prefix: String,
    plan: topology::Plan,
    interfaces: BTreeMap<ObjRef, (String, u32)>,
    timeout: Duration,
    prefer_ipv6: bool,
    icmp: bool,
    /// ClusterIP targets of the Services set with [`Lab::set_services`].
    services: Vec<services::Target>,
}

/// What [`Lab::set_services`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabServices {
    /// The ClusterIPs as host prefixes: enforce with these as the Service ranges
    /// (`ClusterSnapshot::service_cidrs`), and attach `npm_host_egress` to
    /// [`Lab::external_interfaces`].
    pub ranges: Vec<ipnet::IpNet>,
    /// Services or ports the lab cannot translate (headless, no selector, SCTP).
    pub problems: Vec<crate::model::Diagnostic>,
}

impl Lab {
    /// Builds the node, one netns per pod and per external, and starts the responders.
    /// On error, everything created so far is removed again.
    pub fn build(spec: LabSpec) -> Result<Lab, LabError> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("npmlab-{}-{seq}", std::process::id());
        let plan = topology::plan(&spec, &prefix)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("npmlab")
            .enable_all()
            .build()
            .map_err(LabError::Runtime)?;
        let mut lab = Lab {
            runtime: Some(runtime),
            endpoints_ns: Vec::with_capacity(plan.endpoints.len()),
            node: None,
            prefix,
            plan,
            interfaces: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            prefer_ipv6: false,
            icmp: false,
            services: Vec::new(),
        };
        let (res, took) = probe::timed(|| lab.wire());
        res?;
        tracing::info!(prefix = %lab.prefix, endpoints = lab.plan.endpoints.len(),
            ms = took.as_millis() as u64, "lab built");
        Ok(lab)
    }

    fn wire(&mut self) -> Result<(), LabError> {
        let node = NetNs::create(&self.plan.node_netns)?;
        node.sysctls(&topology::node_sysctls())?;
        let node = self.node.insert(node);
        for ep in &self.plan.endpoints {
            if ep.in_node {
                self.endpoints_ns.push(None);
                continue;
            }
            let ns = NetNs::create(&ep.netns)?;
            // Push first so a failing sysctl still leaves the guard to clean up.
            self.endpoints_ns.push(Some(ns));
            if let Some(Some(ns)) = self.endpoints_ns.last() {
                ns.sysctls(&topology::endpoint_sysctls())?;
            }
        }
        node.ip_batch(&topology::node_commands(&self.plan))?;
        for (ep, ns) in self.plan.endpoints.iter().zip(&self.endpoints_ns) {
            if let Some(ns) = ns {
                ns.ip_batch(&topology::endpoint_commands(ep))?;
            }
        }
        let links: BTreeMap<String, u32> =
            topology::parse_link_list(&node.ip(&["-o", "link", "show"])?)
                .into_iter()
                .collect();
        for (pod, ep) in self.plan.pods.iter().zip(&self.plan.endpoints) {
            if ep.in_node {
                continue;
            }
            let index = *links
                .get(&ep.host_if)
                .ok_or_else(|| LabError::MissingInterface {
                    name: ep.host_if.clone(),
                })?;
            self.interfaces
                .insert(pod.obj_ref(), (ep.host_if.clone(), index));
        }
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        for (i, ep) in self.plan.endpoints.iter().enumerate() {
            responder::start(runtime.handle(), self.ns_at(i), &ep.label, &ep.ports)?;
        }
        Ok(())
    }

    /// The netns endpoint `i` runs in: its own, or the node's for a hostNetwork pod.
    fn ns_at(&self, i: usize) -> &NetNs {
        match self.endpoints_ns.get(i) {
            Some(Some(ns)) => ns,
            _ => self.node(),
        }
    }

    /// The pods, with their IPs filled in where the spec had none.
    pub fn pods(&self) -> &[Pod] {
        &self.plan.pods
    }

    /// The externals, as given.
    pub fn externals(&self) -> Vec<External> {
        self.plan.endpoints[self.plan.pod_count..]
            .iter()
            .filter_map(|ep| {
                Some(External {
                    ip: *ep.ips.first()?,
                    ports: ep.ports.clone(),
                })
            })
            .collect()
    }

    /// Per external (by its first IP), the node-side interface it is reached through: the
    /// node's "uplinks", which carry `npm_host_egress` when Service ranges are enforced.
    pub fn external_interfaces(&self) -> Vec<(IpAddr, String)> {
        self.plan.endpoints[self.plan.pod_count..]
            .iter()
            .filter_map(|ep| Some((*ep.ips.first()?, ep.host_if.clone())))
            .collect()
    }

    /// Plays kube-proxy for `services`: replaces the lab's nftables DNAT rules in the node
    /// (each ClusterIP port to its first backend pod by name, see `services.rs`) and adds
    /// every ClusterIP port to what [`Lab::probe_all`] probes from each pod (`svc:ns/name`).
    /// Needs `nft` (scripts/setup.sh installs nftables).
    pub fn set_services(
        &mut self,
        services: &[crate::model::Service],
    ) -> Result<LabServices, LabError> {
        let node = (IpAddr::V4(topology::NODE_V4), IpAddr::V6(topology::NODE_V6));
        let plan = services::plan(services, &self.plan.pods, node);
        let script = if plan.script.is_empty() {
            // Nothing to translate: an empty table replaces any earlier rules.
            format!(
                "table inet {t}\ndelete table inet {t}\n",
                t = services::TABLE
            )
        } else {
            plan.script.clone()
        };
        let file = std::env::temp_dir().join(format!("{}-services.nft", self.prefix));
        std::fs::write(&file, script).map_err(|source| LabError::Socket {
            what: format!("writing {}", file.display()),
            source,
        })?;
        let loaded = self
            .node()
            .exec(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        loaded?;
        self.services = plan.targets;
        Ok(LabServices {
            ranges: plan.ranges,
            problems: plan.problems,
        })
    }

    /// The node netns: attach enforcement here (`lab.node().run(|| ...)`).
    pub fn node(&self) -> &NetNs {
        match &self.node {
            Some(n) => n,
            // `build` returns a Lab only after the node exists; Drop is the only taker.
            None => unreachable!("lab node namespace missing outside Drop"),
        }
    }

    /// The netns of a pod ("ns/name") or external (its IP), e.g. to run a command there (the
    /// node's for a hostNetwork pod).
    pub fn netns_of(&self, endpoint: &str) -> Option<&NetNs> {
        let i = self.endpoint_index(endpoint)?;
        Some(self.ns_at(i))
    }

    /// Per pod, its host-side interface in the node netns and that interface's ifindex
    /// (hostNetwork pods have none).
    pub fn pod_interfaces(&self) -> BTreeMap<ObjRef, (String, u32)> {
        self.interfaces.clone()
    }

    /// The node netns's own addresses (192.0.2.1 and 2001:db8::1, on its `lo`).
    pub fn node_ips(&self) -> Vec<IpAddr> {
        topology::node_ips()
    }

    /// `npmlab-<pid>-<n>`: every namespace of this lab starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of every namespace this lab owns (node first).
    pub fn namespaces(&self) -> Vec<String> {
        self.node
            .iter()
            .chain(self.endpoints_ns.iter().flatten())
            .map(|n| n.name().to_owned())
            .collect()
    }

    /// How long a probe waits for an answer (default [`DEFAULT_TIMEOUT`]).
    pub fn set_probe_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Probe over IPv6 when source and destination both have it (default: IPv4 first).
    pub fn set_prefer_ipv6(&mut self, prefer: bool) {
        self.prefer_ipv6 = prefer;
    }

    /// Also ping every destination (one ICMP echo probe per source and destination, port 0,
    /// after the destination's ports) in [`Lab::probe_all`] and [`Lab::probe_among`].
    /// Default: off.
    pub fn set_probe_icmp(&mut self, icmp: bool) {
        self.icmp = icmp;
    }

    /// Every source (each pod, each external) × every destination (each pod, each external)
    /// × each of the destination's ports (and ICMP echo, see [`Lab::set_probe_icmp`]), all at
    /// once. Sources and destinations in spec order (pods, then externals), ports in
    /// declaration order.
    pub fn probe_all(&self) -> Vec<ProbeResult> {
        let all: Vec<usize> = (0..self.plan.endpoints.len()).collect();
        self.probe_indices(&all)
    }

    fn probe_indices(&self, keep: &[usize]) -> Vec<ProbeResult> {
        let eps = &self.plan.endpoints;
        let mut tasks = Vec::new();
        for &src in keep {
            for &dst in keep {
                for &(port, protocol) in &eps[dst].ports {
                    tasks.push(self.task(src, dst, port, protocol.into()));
                }
                if self.icmp {
                    tasks.push(self.task(src, dst, 0, ProbeProtocol::Icmp));
                }
            }
            if src < self.plan.pod_count {
                tasks.extend(self.service_tasks(src));
            }
        }
        self.run(&tasks)
    }

    /// Like [`Lab::probe_all`], limited to the endpoints whose labels (`ns/pod` or the
    /// external's IP) are in `present` (for steps where some pods do not exist yet).
    pub fn probe_among(&self, present: &std::collections::BTreeSet<String>) -> Vec<ProbeResult> {
        let eps = &self.plan.endpoints;
        let keep: Vec<usize> = (0..eps.len())
            .filter(|i| present.contains(&eps[*i].label))
            .collect();
        self.probe_indices(&keep)
    }

    /// One probe. `from` and `to` are "namespace/name" for pods and the IP for externals;
    /// an unknown name gives a denied result with [`Outcome::Error`]. `proto` is a
    /// [`Protocol`] or [`ProbeProtocol::Icmp`] (then `port` is ignored; use 0).
    pub fn probe(
        &self,
        from: &str,
        to: &str,
        port: u16,
        proto: impl Into<ProbeProtocol>,
    ) -> ProbeResult {
        let proto = proto.into();
        match (self.endpoint_index(from), self.endpoint_index(to)) {
            (Some(src), Some(dst)) => {
                let task = self.task(src, dst, port, proto);
                self.run(std::slice::from_ref(&task))
                    .pop()
                    .unwrap_or_else(|| unknown(from, to, port, proto, "no result"))
            }
            _ => unknown(from, to, port, proto, "unknown endpoint"),
        }
    }

    fn endpoint_index(&self, label: &str) -> Option<usize> {
        self.plan.endpoints.iter().position(|e| e.label == label)
    }

    /// One task per Service port from pod `src`, to the ClusterIP of the family a probe
    /// between endpoints would use (IPv4 first unless IPv6 is preferred).
    fn service_tasks(&self, src: usize) -> Vec<probe::Task> {
        let s = &self.plan.endpoints[src];
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        let families: [bool; 2] = if self.prefer_ipv6 {
            [false, true]
        } else {
            [true, false]
        };
        for t in &self.services {
            if !seen.insert((t.label.clone(), t.port, t.protocol)) {
                continue;
            }
            let pick = families.iter().find_map(|v4| {
                let src_has = if *v4 { s.ipv4() } else { s.ipv6() };
                src_has?;
                self.services
                    .iter()
                    .find(|o| {
                        o.label == t.label
                            && o.port == t.port
                            && o.protocol == t.protocol
                            && o.ip.is_ipv4() == *v4
                    })
                    .map(|o| o.ip)
            });
            out.push(probe::Task {
                from: s.label.clone(),
                to: t.label.clone(),
                src,
                dst_ip: pick,
                port: t.port,
                protocol: t.protocol.into(),
            });
        }
        out
    }

    fn task(&self, src: usize, dst: usize, port: u16, protocol: ProbeProtocol) -> probe::Task {
        let (s, d) = (&self.plan.endpoints[src], &self.plan.endpoints[dst]);
        let v4 = s.ipv4().and(d.ipv4());
        let v6 = s.ipv6().and(d.ipv6());
        let dst_ip = if self.prefer_ipv6 {
            v6.or(v4)
        } else {
            v4.or(v6)
        };
        probe::Task {
            from: s.label.clone(),
            to: d.label.clone(),
            src,
            dst_ip,
            port,
            protocol,
        }
    }

    fn run(&self, tasks: &[probe::Task]) -> Vec<ProbeResult> {
        let Some(runtime) = &self.runtime else {
            return Vec::new();
        };
        let handle = runtime.handle();
        let sources: Vec<&NetNs> = (0..self.endpoints_ns.len())
            .map(|i| self.ns_at(i))
            .collect();
        // A thread of our own, so callers inside an async context can use the lab too.
        let (results, took) = probe::timed(|| {
            std::thread::scope(|s| {
                s.spawn(|| probe::run(handle, &sources, tasks, self.timeout))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        });
        tracing::debug!(
            probes = tasks.len(),
            ms = took.as_millis() as u64,
            "lab probes done"
        );
        results
    }
}

fn unknown(from: &str, to: &str, port: u16, protocol: ProbeProtocol, why: &str) -> ProbeResult {
    ProbeResult {
        from: from.to_owned(),
        to: to.to_owned(),
        port,
        protocol,
        allowed: false,
        outcome: Outcome::Error(why.to_owned()),
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stop every responder and close its sockets before the namespaces go, so the kernel
        // frees them (and their veths) right away. On a thread of its own: dropping a
        // runtime inside an async context panics.
        if let Some(rt) = self.runtime.take() {
            let stopped = std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(2)));
            if stopped.join().is_err() {
                tracing::warn!(prefix = %self.prefix, "lab runtime shutdown panicked");
            }
        }
        for mut ns in self.endpoints_ns.drain(..).rev().flatten() {
            if let Err(e) = ns.delete() {
                tracing::warn!(netns = ns.name(), error = %e, "could not delete lab namespace");
            }
        }
        if let Some(mut node) = self.node.take()
            && let Err(e) = node.delete()
        {
            tracing::warn!(netns = node.name(), error = %e, "could not delete lab namespace");
        }
    }
}

/// Deletes lab namespaces (`npmlab-<pid>-...`) left behind by processes that no longer run
/// (killed before their Drop). Returns the names removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in netns::list() {
        let Some(pid) = name
            .strip_prefix("npmlab-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match netns::delete_by_name(&name) {
            Ok(()) => removed.push(name),
            Err(e) => {
                tracing::warn!(netns = %name, error = %e, "could not delete stale lab namespace")
            }
        }
    }
    removed
}
