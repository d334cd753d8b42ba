//! The agent's configuration, in Azure NPM's `azure-npm.json` format so an operator's existing
//! file carries over.
//!
//! Layers, each overriding the one before: built-in defaults < the JSON file (`--config` or
//! `NPM_CONFIG`) < environment variables (`NPM_*`) < command-line flags. Keys are matched
//! case-insensitively, as Azure NPM (viper) does. Keys Azure NPM knows but an eBPF enforcer has
//! no use for (iptables/ipset batching, the Windows dataplane, gRPC transport, pprof) are
//! accepted and reported as ignored; keys nobody knows are reported as unknown, never fatal. A
//! value of the wrong type or out of range is an error naming the key and what was expected.
//!
//! No I/O besides [`FileConfig::load`]; the environment is passed in as a lookup function.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::Value;

/// Azure NPM's default ResyncPeriodInMinutes.
pub const DEFAULT_RESYNC_PERIOD_MINUTES: u64 = 15;
/// Azure NPM's default ListeningPort (metrics, health and debug endpoints).
pub const DEFAULT_LISTEN_PORT: u16 = 10091;
/// Azure NPM's default ListeningAddress.
pub const DEFAULT_LISTEN_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default MaxConntrackEntries: the size the datapath was built with.
pub const DEFAULT_MAX_CONNTRACK_ENTRIES: u32 = npm_common::maps::CONNTRACK_MAX;
/// Smallest accepted MaxConntrackEntries: below this the kernel's LRU, which evicts in
/// batches per CPU, keeps too few flows to be of use.
pub const MIN_CONNTRACK_ENTRIES: u32 = 64;
/// Largest accepted MaxConntrackEntries (4 Mi per map: about 0.9 GiB of kernel memory for the
/// two maps, charged to the agent's memory cgroup); more is almost surely a mistake.
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 22;
/// Longest accepted resync period (one week): a larger value is almost surely a unit mistake.
pub const MAX_RESYNC_PERIOD_MINUTES: u64 = 7 * 24 * 60;

/// Environment variable naming the config file (Azure NPM's `ConfigEnvPath`).
pub const ENV_CONFIG: &str = "NPM_CONFIG";
pub const ENV_RESYNC_PERIOD_MINUTES: &str = "NPM_RESYNC_PERIOD_MINUTES";
pub const ENV_LISTEN_ADDRESS: &str = "NPM_LISTEN_ADDRESS";
pub const ENV_LISTEN_PORT: &str = "NPM_LISTEN_PORT";
pub const ENV_ENABLE_PROMETHEUS_METRICS: &str = "NPM_ENABLE_PROMETHEUS_METRICS";
pub const ENV_ENABLE_HTTP_DEBUG_API: &str = "NPM_ENABLE_HTTP_DEBUG_API";
pub const ENV_MAX_CONNTRACK_ENTRIES: &str = "NPM_MAX_CONNTRACK_ENTRIES";
/// Comma-separated Service ranges (`ServiceCIDRs`).
pub const ENV_SERVICE_CIDRS: &str = "NPM_SERVICE_CIDRS";
/// Per-policy POLICY entry budget (`MaxPolicyEntries`).
pub const ENV_MAX_POLICY_ENTRIES: &str = "NPM_MAX_POLICY_ENTRIES";
/// The largest MaxPolicyEntries: the POLICY map's size.
pub const MAX_MAX_POLICY_ENTRIES: usize = npm_common::maps::POLICY_MAX as usize;

/// Azure NPM keys accepted and ignored, with the reason (dotted paths, canonical spelling).
pub const IGNORED_KEYS: [(&str, &str); 14] = [
    (
        "Transport",
        "gRPC between Azure NPM's controller and daemons; every npm agent watches the API itself",
    ),
    ("WindowsNetworkName", "Windows (HNS) dataplane only"),
    ("ApplyDataPlaneMaxBatches", "Windows (HNS) batching only"),
    (
        "ApplyDataPlaneMaxWaitInMilliseconds",
        "Windows (HNS) batching only",
    ),
    ("MaxBatchedACLsPerPod", "Windows (HNS) ACL batching only"),
    (
        "IPTablesMaxBatches",
        "iptables batching; npm programs BPF maps",
    ),
    (
        "IPTablesMaxPendingPolicies",
        "iptables batching; npm programs BPF maps",
    ),
    (
        "IPTablesIntervalInMilliseconds",
        "iptables batching; npm programs BPF maps",
    ),
    (
        "Toggles.EnablePprof",
        "Go profiler; npm is not a Go program",
    ),
    (
        "Toggles.EnableV2NPM",
        "selects Azure NPM's dataplane generation; npm has one (eBPF)",
    ),
    (
        "Toggles.PlaceAzureChainFirst",
        "iptables chain order; npm adds no iptables chains",
    ),
    ("Toggles.ApplyIPSetsOnNeed", "ipsets; npm uses BPF maps"),
    ("Toggles.ApplyInBackground", "Windows (HNS) batching only"),
    (
        "Toggles.IPTablesInBackground",
        "iptables batching; npm programs BPF maps",
    ),
];

/// The effective settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    /// ResyncPeriodInMinutes: full re-read of the kernel maps and repair of drift.
    pub resync_period_minutes: u64,
    /// ListeningAddress of the HTTP endpoints.
    pub listen_address: IpAddr,
    /// ListeningPort of the HTTP endpoints.
    pub listen_port: u16,
    /// Toggles.EnablePrometheusMetrics: `/node-metrics` and `/cluster-metrics` (404 when off).
    pub enable_prometheus_metrics: bool,
    /// Toggles.EnableHTTPDebugAPI: `/debug/state` (404 when off).
    pub enable_http_debug_api: bool,
    /// ServiceCIDRs (npm's own key): the cluster's Service ranges (IPv4 and/or IPv6). Egress
    /// to them that the pre-DNAT lookup denies is checked again after kube-proxy's DNAT.
    /// Empty (the default): egress is checked against the ClusterIP (the documented gap).
    pub service_cidrs: Vec<IpNet>,
    /// MaxConntrackEntries (npm's own key): `max_entries` of each conntrack map (IPv4 flows,
    /// IPv6 flows), shared by every pod of the node. Applies when the maps are created; maps
    /// adopted from pins keep their size until a restart with fresh pins.
    pub max_conntrack_entries: u32,
    /// MaxPolicyEntries (npm's own key): the POLICY entries one NetworkPolicy may add on this
    /// node; a policy above it fails closed (isolates, allows nothing) and is reported.
    pub max_policy_entries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync_period_minutes: DEFAULT_RESYNC_PERIOD_MINUTES,
            listen_address: DEFAULT_LISTEN_ADDRESS,
            listen_port: DEFAULT_LISTEN_PORT,
            enable_prometheus_metrics: true,
            enable_http_debug_api: true,
            service_cidrs: Vec::new(),
            max_conntrack_entries: DEFAULT_MAX_CONNTRACK_ENTRIES,
            max_policy_entries: crate::compiler::DEFAULT_MAX_POLICY_ENTRIES,
        }
    }
}

/// One layer's values; `None` leaves the lower layer's value in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub resync_period_minutes: Option<u64>,
    pub listen_address: Option<IpAddr>,
    pub listen_port: Option<u16>,
    pub enable_prometheus_metrics: Option<bool>,
    pub enable_http_debug_api: Option<bool>,
    pub service_cidrs: Option<Vec<IpNet>>,
    pub max_conntrack_entries: Option<u32>,
    pub max_policy_entries: Option<usize>,
}

/// What a config file said: the values npm uses, and what it ignored or did not know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub values: Overrides,
    /// Azure NPM keys present in the file that npm ignores: (key as written, reason).
    pub ignored: Vec<(String, &'static str)>,
    /// Keys neither npm nor Azure NPM knows (dotted paths, as written): typos, most likely.
    pub unknown: Vec<String>,
}

/// Where an effective value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Default,
    File,
    Env,
    Flag,
}

/// The settings with the origin of each value (keyed by the Azure NPM key name).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub settings: Settings,
    pub origins: BTreeMap<&'static str, Origin>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not valid JSON")]
    Syntax {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{origin}: {key} is {got}; expected {expected}")]
    Invalid {
        /// The file, environment variable or flag the value came from.
        origin: String,
        key: String,
        got: String,
        expected: &'static str,
    },
}

impl ConfigError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "config_read",
            Self::Syntax { .. } => "config_syntax",
            Self::Invalid { .. } => "config_value",
        }
    }
}

const EXPECT_MINUTES: &str = "a whole number of minutes from 1 to 10080";
const EXPECT_PORT: &str = "a port number from 1 to 65535";
const EXPECT_ADDRESS: &str = "an IPv4 or IPv6 address such as 0.0.0.0 or ::";
const EXPECT_BOOL: &str = "true or false";
const EXPECT_OBJECT: &str = "a JSON object";
const EXPECT_CONNTRACK: &str =
    "a whole number of entries per conntrack map from 64 to 4194304 (default 262144)";
const EXPECT_ENTRIES: &str = "a whole number of POLICY entries from 1 to 1048576";
const EXPECT_CIDRS: &str = "a list of CIDRs such as [\"10.96.0.0/12\", \"fd00:10:96::/112\"] (network addresses, no host bits)";

/// A CIDR as written in ServiceCIDRs: a network address (host bits zero) with a prefix length.
fn cidr(s: &str) -> Option<IpNet> {
    let net: IpNet = s.trim().parse().ok()?;
    (net.trunc() == net).then_some(net)
}

/// Sorted and deduplicated, so equal sets compare equal whatever their order.
fn cidr_list<'a>(items: impl Iterator<Item = Option<&'a str>>) -> Option<Vec<IpNet>> {
    let mut out = items
        .map(|s| s.and_then(cidr))
        .collect::<Option<Vec<_>>>()?;
    out.sort();
    out.dedup();
    Some(out)
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of an `azure-npm.json`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Syntax {
            origin: origin.to_owned(),
            source,
        })?;
        let invalid = |key: &str, got: &Value, expected: &'static str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            got: got.to_string(),
            expected,
        };
        let Value::Object(top) = &value else {
            return Err(invalid("the top level", &value, EXPECT_OBJECT));
        };
        let mut out = FileConfig::default();
        for (key, v) in top {
            match key.to_ascii_lowercase().as_str() {
                "resyncperiodinminutes" => {
                    out.values.resync_period_minutes =
                        Some(minutes(v.as_u64()).ok_or_else(|| invalid(key, v, EXPECT_MINUTES))?);
                }
                "listeningport" => {
                    out.values.listen_port =
                        Some(port(v.as_u64()).ok_or_else(|| invalid(key, v, EXPECT_PORT))?);
                }
                "listeningaddress" => {
                    out.values.listen_address = Some(
                        v.as_str()
                            .and_then(|s| s.trim().parse().ok())
                            .ok_or_else(|| invalid(key, v, EXPECT_ADDRESS))?,
                    );
                }
                "maxconntrackentries" => {
                    out.values.max_conntrack_entries = Some(
                        conntrack_entries(v.as_u64())
                            .ok_or_else(|| invalid(key, v, EXPECT_CONNTRACK))?,
                    );
                }
                "servicecidrs" => {
                    let list = v
                        .as_array()
                        .and_then(|a| cidr_list(a.iter().map(Value::as_str)))
                        .ok_or_else(|| invalid(key, v, EXPECT_CIDRS))?;
                    out.values.service_cidrs = Some(list);
                }
                "maxpolicyentries" => {
                    out.values.max_policy_entries =
                        Some(entries(v.as_u64()).ok_or_else(|| invalid(key, v, EXPECT_ENTRIES))?);
                }
                "toggles" => {
                    let Value::Object(toggles) = v else {
                        return Err(invalid(key, v, EXPECT_OBJECT));
                    };
                    for (t, tv) in toggles {
                        let path = format!("{key}.{t}");
                        let flag = || tv.as_bool().ok_or_else(|| invalid(&path, tv, EXPECT_BOOL));
                        match t.to_ascii_lowercase().as_str() {
                            "enableprometheusmetrics" => {
                                out.values.enable_prometheus_metrics = Some(flag()?)
                            }
                            "enablehttpdebugapi" => {
                                out.values.enable_http_debug_api = Some(flag()?)
                            }
                            _ => out.classify(path),
                        }
                    }
                }
                _ => out.classify(key.clone()),
            }
        }
        Ok(out)
    }

    /// Files a key npm does not use under ignored (Azure NPM knows it) or unknown.
    fn classify(&mut self, path: String) {
        match IGNORED_KEYS
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&path))
        {
            Some((_, reason)) => self.ignored.push((path, reason)),
            None => self.unknown.push(path),
        }
    }
}

fn minutes(v: Option<u64>) -> Option<u64> {
    v.filter(|m| (1..=MAX_RESYNC_PERIOD_MINUTES).contains(m))
}

fn conntrack_entries(v: Option<u64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
        .filter(|n| (MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(n))
}

fn entries(v: Option<u64>) -> Option<usize> {
    v.and_then(|n| usize::try_from(n).ok())
        .filter(|n| (1..=MAX_MAX_POLICY_ENTRIES).contains(n))
}

fn port(v: Option<u64>) -> Option<u16> {
    v.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

impl Overrides {
    /// The `NPM_*` environment variables, through `lookup` (e.g. `|k| std::env::var(k).ok()`).
    /// Empty values count as unset.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let invalid = |name: &str, got: &str, expected: &'static str| ConfigError::Invalid {
            origin: format!("environment variable {name}"),
            key: name.to_owned(),
            got: format!("{got:?}"),
            expected,
        };
        let parse_bool = |name: &str| -> Result<Option<bool>, ConfigError> {
            get(name)
                .map(|v| match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Ok(true),
                    "false" | "0" | "no" => Ok(false),
                    _ => Err(invalid(name, &v, EXPECT_BOOL)),
                })
                .transpose()
        };
        let n = ENV_RESYNC_PERIOD_MINUTES;
        let resync_period_minutes = get(n)
            .map(|v| minutes(v.trim().parse().ok()).ok_or_else(|| invalid(n, &v, EXPECT_MINUTES)))
            .transpose()?;
        let n = ENV_LISTEN_PORT;
        let listen_port = get(n)
            .map(|v| port(v.trim().parse().ok()).ok_or_else(|| invalid(n, &v, EXPECT_PORT)))
            .transpose()?;
        let n = ENV_LISTEN_ADDRESS;
        let listen_address = get(n)
            .map(|v| v.trim().parse().map_err(|_| invalid(n, &v, EXPECT_ADDRESS)))
            .transpose()?;
        let n = ENV_MAX_CONNTRACK_ENTRIES;
        let max_conntrack_entries = get(n)
            .map(|v| {
                conntrack_entries(v.trim().parse().ok())
                    .ok_or_else(|| invalid(n, &v, EXPECT_CONNTRACK))
            })
            .transpose()?;
        let n = ENV_SERVICE_CIDRS;
        let service_cidrs = get(n)
            .map(|v| {
                cidr_list(v.split(',').filter(|s| !s.trim().is_empty()).map(Some))
                    .ok_or_else(|| invalid(n, &v, EXPECT_CIDRS))
            })
            .transpose()?;
        let n = ENV_MAX_POLICY_ENTRIES;
        let max_policy_entries = get(n)
            .map(|v| entries(v.trim().parse().ok()).ok_or_else(|| invalid(n, &v, EXPECT_ENTRIES)))
            .transpose()?;
        Ok(Self {
            resync_period_minutes,
            listen_address,
            listen_port,
            enable_prometheus_metrics: parse_bool(ENV_ENABLE_PROMETHEUS_METRICS)?,
            enable_http_debug_api: parse_bool(ENV_ENABLE_HTTP_DEBUG_API)?,
            service_cidrs,
            max_conntrack_entries,
            max_policy_entries,
        })
    }

    /// Checks values that the flag parser lets through but npm refuses (e.g. a zero period).
    pub fn validate_flags(&self) -> Result<(), ConfigError> {
        let invalid = |flag: &str, got: String, expected| ConfigError::Invalid {
            origin: format!("flag --{flag}"),
            key: format!("--{flag}"),
            got,
            expected,
        };
        if let Some(m) = self.resync_period_minutes
            && minutes(Some(m)).is_none()
        {
            return Err(invalid(
                "resync-period-minutes",
                m.to_string(),
                EXPECT_MINUTES,
            ));
        }
        if let Some(n) = self.max_conntrack_entries
            && conntrack_entries(Some(u64::from(n))).is_none()
        {
            return Err(invalid(
                "max-conntrack-entries",
                n.to_string(),
                EXPECT_CONNTRACK,
            ));
        }
        if self.listen_port == Some(0) {
            return Err(invalid("listen-port", "0".into(), EXPECT_PORT));
        }
        if let Some(list) = &self.service_cidrs
            && let Some(bad) = list.iter().find(|n| n.trunc() != **n)
        {
            return Err(invalid("service-cidr", bad.to_string(), EXPECT_CIDRS));
        }
        if let Some(n) = self.max_policy_entries
            && entries(Some(n as u64)).is_none()
        {
            return Err(invalid("max-policy-entries", n.to_string(), EXPECT_ENTRIES));
        }
        Ok(())
    }
}

/// Defaults < file < environment < flags.
pub fn resolve(file: Option<&FileConfig>, env: &Overrides, flags: &Overrides) -> Resolved {
    let mut settings = Settings::default();
    let mut origins: BTreeMap<&'static str, Origin> = [
        "ResyncPeriodInMinutes",
        "ListeningAddress",
        "ListeningPort",
        "Toggles.EnablePrometheusMetrics",
        "Toggles.EnableHTTPDebugAPI",
        "ServiceCIDRs",
        "MaxConntrackEntries",
        "MaxPolicyEntries",
    ]
    .into_iter()
    .map(|k| (k, Origin::Default))
    .collect();
    let layers = [
        (file.map(|f| &f.values), Origin::File),
        (Some(env), Origin::Env),
        (Some(flags), Origin::Flag),
    ];
    for (layer, origin) in layers {
        let Some(l) = layer else { continue };
        let mut set = |key: &'static str, present: bool| {
            if present {
                origins.insert(key, origin);
            }
        };
        if let Some(v) = l.resync_period_minutes {
            settings.resync_period_minutes = v;
        }
        set("ResyncPeriodInMinutes", l.resync_period_minutes.is_some());
        if let Some(v) = l.listen_address {
            settings.listen_address = v;
        }
        set("ListeningAddress", l.listen_address.is_some());
        if let Some(v) = l.listen_port {
            settings.listen_port = v;
        }
        set("ListeningPort", l.listen_port.is_some());
        if let Some(v) = l.enable_prometheus_metrics {
            settings.enable_prometheus_metrics = v;
        }
        set(
            "Toggles.EnablePrometheusMetrics",
            l.enable_prometheus_metrics.is_some(),
        );
        if let Some(v) = l.enable_http_debug_api {
            settings.enable_http_debug_api = v;
        }
        set(
            "Toggles.EnableHTTPDebugAPI",
            l.enable_http_debug_api.is_some(),
        );
        if let Some(v) = &l.service_cidrs {
            settings.service_cidrs = v.clone();
        }
        set("ServiceCIDRs", l.service_cidrs.is_some());
        if let Some(v) = l.max_conntrack_entries {
            settings.max_conntrack_entries = v;
        }
        set("MaxConntrackEntries", l.max_conntrack_entries.is_some());
        if let Some(v) = l.max_policy_entries {
            settings.max_policy_entries = v;
        }
        set("MaxPolicyEntries", l.max_policy_entries.is_some());
    }
    Resolved { settings, origins }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const AZURE_NPM_NODE_FILE: &str = r#"{
        "ResyncPeriodInMinutes": 15,
        "ListeningPort": 10091,
        "ListeningAddress": "0.0.0.0",
        "Toggles": {
            "EnablePrometheusMetrics": true,
            "EnablePprof": true,
            "EnableHTTPDebugAPI": true,
            "EnableV2NPM": false,
            "PlaceAzureChainFirst": false
        },
        "Transport": {
            "Address": "azure-npm.kube-system.svc.cluster.local",
            "Port": 19002,
            "ServicePort": 9001
        }
    }"#;

    #[test]
    fn a_real_azure_npm_file_parses_with_its_iptables_and_grpc_keys_ignored() {
        let f = FileConfig::parse(AZURE_NPM_NODE_FILE, "azure-npm.json").expect("parses");
        assert_eq!(
            f.values,
            Overrides {
                resync_period_minutes: Some(15),
                listen_address: Some(DEFAULT_LISTEN_ADDRESS),
                listen_port: Some(10091),
                enable_prometheus_metrics: Some(true),
                enable_http_debug_api: Some(true),
                service_cidrs: None,
                max_conntrack_entries: None,
                max_policy_entries: None,
            }
        );
        let ignored: Vec<&str> = f.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            ignored,
            [
                "Toggles.EnablePprof",
                "Toggles.EnableV2NPM",
                "Toggles.PlaceAzureChainFirst",
                "Transport"
            ]
        );
        assert!(f.unknown.is_empty(), "{:?}", f.unknown);
    }

    #[test]
    fn unknown_keys_are_named_not_fatal_and_keys_match_case_insensitively() {
        let f = FileConfig::parse(
            r#"{"listeningport": 9000, "ListenPort": 1, "Toggles": {"enablehttpdebugapi": false, "EnableMagic": true}}"#,
            "f",
        )
        .expect("parses");
        assert_eq!(f.values.listen_port, Some(9000));
        assert_eq!(f.values.enable_http_debug_api, Some(false));
        assert_eq!(f.unknown, ["ListenPort", "Toggles.EnableMagic"]);
        assert!(f.ignored.is_empty());
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let cases = [
            (
                r#"{"ListeningPort": 70000}"#,
                "ListeningPort",
                "port number",
            ),
            (
                r#"{"ListeningPort": "10091"}"#,
                "ListeningPort",
                "port number",
            ),
            (r#"{"ListeningPort": 0}"#, "ListeningPort", "port number"),
            (
                r#"{"ResyncPeriodInMinutes": 0}"#,
                "ResyncPeriodInMinutes",
                "minutes",
            ),
            (
                r#"{"ResyncPeriodInMinutes": -5}"#,
                "ResyncPeriodInMinutes",
                "minutes",
            ),
            (
                r#"{"ResyncPeriodInMinutes": 1.5}"#,
                "ResyncPeriodInMinutes",
                "minutes",
            ),
            (
                r#"{"ListeningAddress": "localhost:80"}"#,
                "ListeningAddress",
                "IPv4 or IPv6",
            ),
            (
                r#"{"Toggles": {"EnablePrometheusMetrics": "yes"}}"#,
                "Toggles.EnablePrometheusMetrics",
                "true or false",
            ),
            (r#"{"Toggles": true}"#, "Toggles", "JSON object"),
            (r#"[1, 2]"#, "the top level", "JSON object"),
        ];
        for (text, key, reason) in cases {
            let err = FileConfig::parse(text, "cfg.json").expect_err(text);
            let msg = err.to_string();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
                "{text}: {msg}"
            );
            assert!(
                msg.starts_with("cfg.json: ") && msg.contains(reason),
                "{text}: {msg}"
            );
        }
        let err = FileConfig::parse("{\"ListeningPort\": 10091,}", "cfg.json").expect_err("syntax");
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn layers_override_in_order_defaults_file_env_flags() {
        let file = FileConfig::parse(
            r#"{"ResyncPeriodInMinutes": 5, "ListeningPort": 1111, "ListeningAddress": "10.0.0.1",
                "Toggles": {"EnablePrometheusMetrics": false}}"#,
            "f",
        )
        .expect("parses");
        let envs = Overrides::from_env(env(&[
            (ENV_LISTEN_PORT, "2222"),
            (ENV_LISTEN_ADDRESS, "::1"),
            (ENV_ENABLE_HTTP_DEBUG_API, "false"),
        ]))
        .expect("env");
        let flags = Overrides {
            listen_port: Some(3333),
            ..Overrides::default()
        };

        // Defaults alone.
        let r = resolve(None, &Overrides::default(), &Overrides::default());
        assert_eq!(r.settings, Settings::default());
        assert_eq!(r.settings.listen_port, 10091);
        assert!(r.origins.values().all(|o| *o == Origin::Default));

        // File over defaults.
        let r = resolve(Some(&file), &Overrides::default(), &Overrides::default());
        assert_eq!(r.settings.resync_period_minutes, 5);
        assert_eq!(r.settings.listen_port, 1111);
        assert!(!r.settings.enable_prometheus_metrics);
        assert!(r.settings.enable_http_debug_api, "default kept");
        assert_eq!(r.origins["ListeningPort"], Origin::File);
        assert_eq!(r.origins["Toggles.EnableHTTPDebugAPI"], Origin::Default);

        // Environment over file; flags over both.
        let r = resolve(Some(&file), &envs, &flags);
        assert_eq!(
            r.settings,
            Settings {
                resync_period_minutes: 5,
                listen_address: "::1".parse().expect("ip"),
                listen_port: 3333,
                enable_prometheus_metrics: false,
                enable_http_debug_api: false,
                service_cidrs: Vec::new(),
                max_conntrack_entries: DEFAULT_MAX_CONNTRACK_ENTRIES,
                max_policy_entries: crate::compiler::DEFAULT_MAX_POLICY_ENTRIES,
            }
        );
        assert_eq!(r.origins["ResyncPeriodInMinutes"], Origin::File);
        assert_eq!(r.origins["ListeningAddress"], Origin::Env);
        assert_eq!(r.origins["ListeningPort"], Origin::Flag);
        assert_eq!(r.origins["Toggles.EnableHTTPDebugAPI"], Origin::Env);

        // A flag for the resync period beats the file's.
        let flags = Overrides {
            resync_period_minutes: Some(30),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(Some(&file), &Overrides::default(), &flags)
                .settings
                .resync_period_minutes,
            30
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        for (name, value) in [
            (ENV_LISTEN_PORT, "http"),
            (ENV_LISTEN_PORT, "65536"),
            (ENV_RESYNC_PERIOD_MINUTES, "0"),
            (ENV_LISTEN_ADDRESS, "0.0.0.0:80"),
            (ENV_ENABLE_PROMETHEUS_METRICS, "maybe"),
        ] {
            let err = Overrides::from_env(env(&[(name, value)])).expect_err(value);
            assert!(
                err.to_string()
                    .starts_with(&format!("environment variable {name}: ")),
                "{err}"
            );
        }
        // Empty means unset; 1/0 are booleans.
        let o = Overrides::from_env(env(&[
            (ENV_LISTEN_PORT, " "),
            (ENV_ENABLE_PROMETHEUS_METRICS, "0"),
        ]))
        .expect("env");
        assert_eq!(o.listen_port, None);
        assert_eq!(o.enable_prometheus_metrics, Some(false));
    }

    #[test]
    fn flags_refuse_a_zero_resync_period_or_port() {
        let o = Overrides {
            resync_period_minutes: Some(0),
            ..Overrides::default()
        };
        let err = o.validate_flags().expect_err("zero period");
        assert!(err.to_string().contains("--resync-period-minutes"), "{err}");
        let o = Overrides {
            listen_port: Some(0),
            ..Overrides::default()
        };
        assert!(o.validate_flags().is_err());
        assert!(Overrides::default().validate_flags().is_ok());
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("CIDR")).collect()
    }

    #[test]
    fn service_cidrs_come_from_file_env_or_flags_sorted_and_checked() {
        // File: both families, any key case, sorted and deduplicated.
        let f = FileConfig::parse(
            r#"{"servicecidrs": ["fd00:10:96::/112", "10.96.0.0/12", "10.96.0.0/12"]}"#,
            "cfg.json",
        )
        .expect("parses");
        assert_eq!(
            f.values.service_cidrs,
            Some(nets(&["10.96.0.0/12", "fd00:10:96::/112"]))
        );
        assert!(f.unknown.is_empty() && f.ignored.is_empty());
        let r = resolve(Some(&f), &Overrides::default(), &Overrides::default());
        assert_eq!(
            r.settings.service_cidrs,
            nets(&["10.96.0.0/12", "fd00:10:96::/112"])
        );
        assert_eq!(r.origins["ServiceCIDRs"], Origin::File);

        // Environment: comma separated, spaces and empty items tolerated; beats the file.
        let e = Overrides::from_env(env(&[(ENV_SERVICE_CIDRS, " 10.0.0.0/16, ,fd00::/108 ")]))
            .expect("env");
        assert_eq!(e.service_cidrs, Some(nets(&["10.0.0.0/16", "fd00::/108"])));
        let r = resolve(Some(&f), &e, &Overrides::default());
        assert_eq!(
            r.settings.service_cidrs,
            nets(&["10.0.0.0/16", "fd00::/108"])
        );
        assert_eq!(r.origins["ServiceCIDRs"], Origin::Env);

        // Flags beat both; an explicit empty file list clears nothing below it but sets [].
        let flags = Overrides {
            service_cidrs: Some(nets(&["172.16.0.0/16"])),
            ..Overrides::default()
        };
        assert!(flags.validate_flags().is_ok());
        let r = resolve(Some(&f), &e, &flags);
        assert_eq!(r.settings.service_cidrs, nets(&["172.16.0.0/16"]));
        assert_eq!(r.origins["ServiceCIDRs"], Origin::Flag);
        let empty = FileConfig::parse(r#"{"ServiceCIDRs": []}"#, "cfg.json").expect("parses");
        assert_eq!(empty.values.service_cidrs, Some(vec![]));

        // Unset everywhere: none (the documented gap).
        let r = resolve(None, &Overrides::default(), &Overrides::default());
        assert!(r.settings.service_cidrs.is_empty());
        assert_eq!(r.origins["ServiceCIDRs"], Origin::Default);

        // Bad values name the key and what was expected.
        for bad in [
            r#"{"ServiceCIDRs": "10.96.0.0/12"}"#,
            r#"{"ServiceCIDRs": ["10.96.0.1/12"]}"#,
            r#"{"ServiceCIDRs": ["10.96.0.0"]}"#,
            r#"{"ServiceCIDRs": [12]}"#,
        ] {
            let err = FileConfig::parse(bad, "cfg.json").expect_err(bad);
            assert!(
                err.to_string().contains("ServiceCIDRs") && err.to_string().contains("CIDRs"),
                "{err}"
            );
        }
        for bad in ["10.96.0.0/33", "10.96.0.1/12", "10.96.0.0/12,nope"] {
            let err = Overrides::from_env(env(&[(ENV_SERVICE_CIDRS, bad)])).expect_err(bad);
            assert!(err.to_string().contains(ENV_SERVICE_CIDRS), "{err}");
        }
        let flags = Overrides {
            service_cidrs: Some(nets(&["10.96.0.1/12"])),
            ..Overrides::default()
        };
        let err = flags.validate_flags().expect_err("host bits");
        assert!(err.to_string().contains("--service-cidr"), "{err}");
    }

    #[test]
    fn max_conntrack_entries_layers_and_is_bounded() {
        let f = FileConfig::parse(r#"{"maxConntrackEntries": 65536}"#, "cfg.json").expect("parses");
        assert!(f.unknown.is_empty() && f.ignored.is_empty());
        let r = resolve(Some(&f), &Overrides::default(), &Overrides::default());
        assert_eq!(r.settings.max_conntrack_entries, 65536);
        assert_eq!(r.origins["MaxConntrackEntries"], Origin::File);
        let e = Overrides::from_env(env(&[(ENV_MAX_CONNTRACK_ENTRIES, " 64 ")])).expect("env");
        let r = resolve(Some(&f), &e, &Overrides::default());
        assert_eq!(r.settings.max_conntrack_entries, 64);
        assert_eq!(r.origins["MaxConntrackEntries"], Origin::Env);
        let flags = Overrides {
            max_conntrack_entries: Some(1 << 20),
            ..Overrides::default()
        };
        assert!(flags.validate_flags().is_ok());
        let r = resolve(Some(&f), &e, &flags);
        assert_eq!(r.settings.max_conntrack_entries, 1 << 20);
        assert_eq!(r.origins["MaxConntrackEntries"], Origin::Flag);
        let r = resolve(None, &Overrides::default(), &Overrides::default());
        assert_eq!(
            r.settings.max_conntrack_entries,
            npm_common::maps::CONNTRACK_MAX
        );

        for bad in ["63", "0", "4194305", "-1", "1.5", "\"1000\"", "true"] {
            let text = format!(r#"{{"MaxConntrackEntries": {bad}}}"#);
            let err = FileConfig::parse(&text, "cfg.json").expect_err(&text);
            assert_eq!(
                err.to_string(),
                format!("cfg.json: MaxConntrackEntries is {bad}; expected {EXPECT_CONNTRACK}")
            );
        }
        assert!(
            FileConfig::parse(r#"{"MaxConntrackEntries": 4194304}"#, "f").is_ok(),
            "the upper bound itself"
        );
        let err =
            Overrides::from_env(env(&[(ENV_MAX_CONNTRACK_ENTRIES, "lots")])).expect_err("env");
        assert!(
            err.to_string()
                .starts_with("environment variable NPM_MAX_CONNTRACK_ENTRIES: "),
            "{err}"
        );
        let flags = Overrides {
            max_conntrack_entries: Some(10),
            ..Overrides::default()
        };
        let err = flags.validate_flags().expect_err("too small");
        assert!(
            err.to_string().contains("--max-conntrack-entries")
                && err.to_string().contains("from 64"),
            "{err}"
        );
    }

    #[test]
    fn max_policy_entries_comes_from_file_env_or_flags_and_is_checked() {
        let r = resolve(None, &Overrides::default(), &Overrides::default());
        assert_eq!(r.settings.max_policy_entries, 65_536);
        assert_eq!(r.origins["MaxPolicyEntries"], Origin::Default);
        let f = FileConfig::parse(r#"{"maxPolicyEntries": 5000}"#, "cfg.json").expect("parses");
        assert!(f.unknown.is_empty() && f.ignored.is_empty());
        let e = Overrides::from_env(env(&[(ENV_MAX_POLICY_ENTRIES, " 7000 ")])).expect("env");
        let flags = Overrides {
            max_policy_entries: Some(9000),
            ..Overrides::default()
        };
        assert!(flags.validate_flags().is_ok());
        let r = resolve(Some(&f), &Overrides::default(), &Overrides::default());
        assert_eq!(
            (r.settings.max_policy_entries, r.origins["MaxPolicyEntries"]),
            (5000, Origin::File)
        );
        let r = resolve(Some(&f), &e, &Overrides::default());
        assert_eq!(
            (r.settings.max_policy_entries, r.origins["MaxPolicyEntries"]),
            (7000, Origin::Env)
        );
        let r = resolve(Some(&f), &e, &flags);
        assert_eq!(
            (r.settings.max_policy_entries, r.origins["MaxPolicyEntries"]),
            (9000, Origin::Flag)
        );
        for bad in [
            r#"{"MaxPolicyEntries": 0}"#,
            r#"{"MaxPolicyEntries": 1048577}"#,
            r#"{"MaxPolicyEntries": "10"}"#,
        ] {
            let err = FileConfig::parse(bad, "cfg.json").expect_err(bad);
            assert!(
                err.to_string().contains("MaxPolicyEntries") && err.to_string().contains("1048576"),
                "{err}"
            );
        }
        for bad in ["0", "-1", "lots", "2000000"] {
            let err = Overrides::from_env(env(&[(ENV_MAX_POLICY_ENTRIES, bad)])).expect_err(bad);
            assert!(err.to_string().contains(ENV_MAX_POLICY_ENTRIES), "{err}");
        }
        let flags = Overrides {
            max_policy_entries: Some(0),
            ..Overrides::default()
        };
        assert!(
            flags
                .validate_flags()
                .expect_err("zero")
                .to_string()
                .contains("--max-policy-entries")
        );
    }

    /// The ConfigMap the DaemonSet mounts holds a config npm reads completely.
    #[test]
    fn deploy_configmap_parses_with_no_unknown_or_ignored_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configmap.yaml");
        let text = std::fs::read_to_string(&path).expect("read deploy/configmap.yaml");
        let cm: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        let json = cm["data"]["azure-npm.json"]
            .as_str()
            .expect("data.azure-npm.json is a string");
        let f = FileConfig::parse(json, "deploy/configmap.yaml").expect("parses");
        assert!(f.unknown.is_empty(), "unknown keys: {:?}", f.unknown);
        assert!(f.ignored.is_empty(), "ignored keys: {:?}", f.ignored);
        let r = resolve(Some(&f), &Overrides::default(), &Overrides::default());
        assert_eq!(r.settings.listen_port, DEFAULT_LISTEN_PORT);
        assert!(r.origins.values().all(|o| *o == Origin::File), "{r:?}");
    }
}
