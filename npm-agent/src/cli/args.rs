//! Command-line arguments (clap).
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::Protocol;

#[derive(Debug, Parser)]
#[command(
    name = "npm-agent",
    version,
    about = "eBPF Kubernetes NetworkPolicy enforcer"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `npm_agent=debug`.
    #[arg(long, global = true, env = "NPM_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enforce policies on this node (the DaemonSet's job).
    Run(RunArgs),
    /// Build a throw-away node in network namespaces, enforce the manifests' policies there
    /// and probe every pod and port with real packets.
    Lab(LabArgs),
    /// Compile manifests offline, as if every pod were on this node (pods without a status IP
    /// get placeholder addresses): report problems and what the maps would hold.
    Compile(CompileArgs),
    /// Whether a new flow from one pod (or address) to another is allowed, and why: the
    /// policies isolating each side, the rule and peer that allow it. Evaluated on the
    /// compiled maps as the datapath decides, offline on manifests (every pod local) or by a
    /// running agent (`--url`, its /debug/explain; EnableHTTPDebugAPI on). Exit 0 when
    /// evaluated (allowed or denied), 2 for bad input.
    Explain(ExplainArgs),
    /// Remove npm from this node: detach every program of ours from every interface (tcx
    /// programs and cls_bpf filters, found by name, priority and handle; other tools' are
    /// kept), remove a clsact qdisc our filters leave empty, and remove the pinned maps of
    /// every ABI version. Run it as root in the node's network namespace after the DaemonSet
    /// is gone (a running agent attaches again). Idempotent; exit 1 if anything failed.
    Uninstall(UninstallArgs),
    /// What npm enforces on this node, from the pinned maps and the interfaces (works without
    /// a running agent), plus the agent's own view when its HTTP endpoint answers.
    Status(StatusArgs),
    /// Stream the datapath's drop events (rate-limited per CPU) with pod names, peer, port,
    /// protocol, direction and the policies isolating the pod (names from the agent's
    /// /debug/explain when it answers). One monitor at a time sees the events.
    Monitor(MonitorArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Standalone source: a directory of Kubernetes YAML (Namespaces, Pods, NetworkPolicies),
    /// re-read when it changes. Without it, the Kubernetes API is the source.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubernetes API source: the kubeconfig to use. Without it (and without --manifests):
    /// KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name; pods whose spec.nodeName names another node are never local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// bpffs directory for pinned maps (a version subdirectory is added).
    #[arg(long, default_value = "/sys/fs/bpf/npm", value_name = "DIR")]
    pub bpffs_dir: PathBuf,
    /// How often to look for new pod interfaces (and, with --manifests, changed manifests), in
    /// milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Full re-read of the kernel maps and repair of any drift, in minutes (Azure NPM's
    /// ResyncPeriodInMinutes); the API source also re-lists every object this often
    /// [default: the config file's, else 15; env
    /// NPM_RESYNC_PERIOD_MINUTES].
    #[arg(long, value_name = "MINUTES")]
    pub resync_period_minutes: Option<u64>,
    /// Agent configuration in Azure NPM's azure-npm.json format (ResyncPeriodInMinutes,
    /// ListeningAddress, ListeningPort, Toggles). Environment variables (NPM_*) override it,
    /// flags override both.
    #[arg(long, env = "NPM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP endpoints (/healthz, /readyz, /node-metrics, /cluster-metrics,
    /// /debug/state) [default: ListeningAddress, else 0.0.0.0; env NPM_LISTEN_ADDRESS].
    #[arg(long, value_name = "IP")]
    pub listen_address: Option<IpAddr>,
    /// Port of the HTTP endpoints [default: ListeningPort, else 10091; env NPM_LISTEN_PORT].
    #[arg(long, value_name = "PORT")]
    pub listen_port: Option<u16>,
    /// A Service range of the cluster (kube-apiserver's --service-cluster-ip-range), IPv4 or
    /// IPv6; repeatable. Egress to it that the pod's policy denies before kube-proxy's DNAT is
    /// checked again after it, against the backend [default: ServiceCIDRs, else none; env
    /// NPM_SERVICE_CIDRS, comma separated].
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Entries of each conntrack map (IPv4 flows, IPv6 flows), from 64 to 4194304; applies
    /// when the maps are created (pinned maps keep their size) [default: MaxConntrackEntries,
    /// else 262144; env NPM_MAX_CONNTRACK_ENTRIES].
    #[arg(long, value_name = "ENTRIES")]
    pub max_conntrack_entries: Option<u32>,
    /// The POLICY entries one NetworkPolicy may add on this node; a policy above it fails
    /// closed (keeps isolating its pods, allows nothing) and is reported. When the policies
    /// within it together would overfill the POLICY map, the largest fail closed first
    /// [default: MaxPolicyEntries, else 65536; env NPM_MAX_POLICY_ENTRIES].
    #[arg(long, value_name = "ENTRIES")]
    pub max_policy_entries: Option<usize>,
    /// Serve /node-metrics and /cluster-metrics [default: Toggles.EnablePrometheusMetrics,
    /// else true; env NPM_ENABLE_PROMETHEUS_METRICS].
    #[arg(long, value_name = "BOOL")]
    pub enable_prometheus_metrics: Option<bool>,
    /// Serve /debug/state [default: Toggles.EnableHTTPDebugAPI, else true; env
    /// NPM_ENABLE_HTTP_DEBUG_API].
    #[arg(long, value_name = "BOOL")]
    pub enable_http_debug_api: Option<bool>,
    /// Apply once and exit (enforcement stays in place; no HTTP endpoints).
    #[arg(long)]
    pub once: bool,
    /// Name prefix of the host-side veth a CNI creates for a pod; a new veth with one of
    /// these prefixes gets the programs and a default-deny (for the directions a pod coming
    /// to this node is isolated in) the moment it appears. Repeatable; an empty prefix takes
    /// every veth. Default: azv, cali, veth, lxc, eni.
    #[arg(long = "pod-interface-prefix", value_name = "PREFIX",
          default_values_t = crate::node::links::DEFAULT_POD_PREFIXES.map(String::from))]
    pub pod_interface_prefixes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// A directory of Kubernetes YAML (Namespaces, Pods, NetworkPolicies).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "steps",
        conflicts_with = "steps"
    )]
    pub manifests: Option<PathBuf>,
    /// Ordered steps instead of one set of manifests: each subdirectory of DIR (in name order)
    /// applies its YAML files (create or replace), deletes the objects listed in its `delete`
    /// file (`Kind namespace/name`, or `Namespace name`), then probes, and checks its `expect`
    /// file when it has one.
    #[arg(long, value_name = "DIR")]
    pub steps: Option<PathBuf>,
    /// A host outside the node: `IP` or `IP=PORT/PROTO,...` (PROTO: TCP, UDP or SCTP; default
    /// TCP). Without ports it serves every port/protocol any pod declares. Repeatable.
    #[arg(long = "external", value_name = "IP[=PORT/PROTO,...]", value_parser = parse_external)]
    pub externals: Vec<ExternalArg>,
    /// Print the results as JSON: a list of {from, to, port, protocol, allowed}.
    #[arg(long)]
    pub json: bool,
    /// Check the results against an expectation file (`external` and `allow|deny FROM -> TO
    /// PORT/PROTO` lines, the last matching line wins); exit 1 on any mismatch. Its `external`
    /// lines add to --external.
    #[arg(long, value_name = "FILE")]
    pub expect: Option<PathBuf>,
    /// Probe over IPv6 between endpoints that both have an IPv6 address (default: IPv4 when
    /// both have one).
    #[arg(long)]
    pub prefer_ipv6: bool,
    /// Also ping: one ICMP echo probe from every source to every destination (results with
    /// protocol "ICMP" and port 0; expectation lines `*/ICMP`).
    #[arg(long)]
    pub icmp: bool,
}

impl LabArgs {
    /// How the lab probes, from the flags.
    pub fn probe_options(&self) -> ProbeOptions {
        ProbeOptions {
            prefer_ipv6: self.prefer_ipv6,
            icmp: self.icmp,
        }
    }
}

/// How a lab probes (`lab --prefer-ipv6`, `lab --icmp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeOptions {
    pub prefer_ipv6: bool,
    pub icmp: bool,
}

#[derive(Debug, Args)]
pub struct CompileArgs {
    /// A directory of Kubernetes YAML.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// The POLICY entries one NetworkPolicy may add (as `run --max-policy-entries`); a policy
    /// above it is reported and compiled as failing closed [env NPM_MAX_POLICY_ENTRIES,
    /// default 65536].
    #[arg(long, env = "NPM_MAX_POLICY_ENTRIES", value_name = "ENTRIES",
          default_value_t = crate::compiler::DEFAULT_MAX_POLICY_ENTRIES as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::config::MAX_MAX_POLICY_ENTRIES as u64))]
    pub max_policy_entries: u64,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Offline: a directory of Kubernetes YAML, compiled as `compile` does (every pod on one
    /// node; pods without a status IP get placeholder addresses).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "url",
        required_unless_present = "url"
    )]
    pub manifests: Option<PathBuf>,
    /// Ask a running agent instead (`http://HOST:PORT`, its /debug/explain): the answer is
    /// that node's, from the maps it enforces.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The source: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub from: String,
    /// The destination: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub to: String,
    /// Destination port (required for TCP, UDP, SCTP; none for ICMP).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// TCP, UDP, SCTP, or ICMP (echo).
    #[arg(long, default_value = "TCP", value_name = "PROTO")]
    pub protocol: String,
    /// Print the answer as JSON (fields documented in README.md, "Using it").
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// bpffs directory of the pinned maps (`run --bpffs-dir`): every `v<N>` directory in it
    /// is removed, then the directory itself when empty. Refused unless it is on a bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/npm", value_name = "DIR")]
    pub bpffs_dir: PathBuf,
    /// List what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON: {dry_run, bpffs_dir, interfaces: [{name, ifindex, removed,
    /// kept}], pin_dirs, bpffs_dir_removed, errors}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// bpffs directory of the pinned maps (`run --bpffs-dir`).
    #[arg(long, default_value = "/sys/fs/bpf/npm", value_name = "DIR")]
    pub bpffs_dir: PathBuf,
    /// The agent's HTTP endpoints (`/readyz`, `/debug/state`); unreachable is reported, not
    /// an error (the pins and interfaces are shown anyway).
    #[arg(long, default_value = "http://127.0.0.1:10091", value_name = "URL")]
    pub url: String,
    /// Print the result as JSON (field names are documented in README.md, "Using it").
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventType {
    Drop,
    /// Not produced by this datapath (refused with an error).
    Flow,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// bpffs directory of the pinned maps (`run --bpffs-dir`).
    #[arg(long, default_value = "/sys/fs/bpf/npm", value_name = "DIR")]
    pub bpffs_dir: PathBuf,
    /// The agent's HTTP endpoint, for pod names and policies (`/debug/explain`).
    #[arg(long, default_value = "http://127.0.0.1:10091", value_name = "URL")]
    pub url: String,
    /// Which events.
    #[arg(long = "type", value_enum, default_value = "drop")]
    pub r#type: EventType,
    /// Only events of pods in this namespace (needs the agent for names).
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Only events of pods with this name (needs the agent for names).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// One JSON object per line (fields in README.md, "Using it").
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
}

/// One `--external` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalArg {
    pub ip: IpAddr,
    pub ports: Vec<(u16, Protocol)>,
}

pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!(
            "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
        )),
    }
}

/// Parses `IP` or `IP=PORT/PROTO,PORT,...`.
pub fn parse_external(s: &str) -> Result<ExternalArg, String> {
    let (ip, ports) = match s.split_once('=') {
        Some((ip, ports)) => (ip, Some(ports)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|e| format!("external {s:?}: bad IP: {e}"))?;
    let mut out = Vec::new();
    for item in ports
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (port, proto) = match item.split_once('/') {
            Some((p, proto)) => (
                p,
                parse_protocol(proto).map_err(|e| format!("external {s:?}: {e}"))?,
            ),
            None => (item, Protocol::Tcp),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("external {s:?}: bad port {port:?}"))?;
        if port == 0 {
            return Err(format!("external {s:?}: port 0 is not a port"));
        }
        out.push((port, proto));
    }
    Ok(ExternalArg { ip, ports: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_forms() {
        assert_eq!(
            parse_external("169.254.169.254").expect("ok"),
            ExternalArg {
                ip: "169.254.169.254".parse().expect("ip"),
                ports: vec![]
            }
        );
        assert_eq!(
            parse_external("fd00::9=80,53/udp,9000/SCTP")
                .expect("ok")
                .ports,
            vec![
                (80, Protocol::Tcp),
                (53, Protocol::Udp),
                (9000, Protocol::Sctp)
            ]
        );
        assert!(
            parse_external("10.0.0.1=80/icmp")
                .unwrap_err()
                .contains("unknown protocol")
        );
        assert!(parse_external("nope").unwrap_err().contains("bad IP"));
        assert!(
            parse_external("10.0.0.1=99999")
                .unwrap_err()
                .contains("bad port")
        );
    }
}
