//! `explain`: whether one new flow (from, to, protocol, port) is allowed, and why, evaluated on
//! the compiled maps exactly as the datapath decides a new flow's first packet. Pure: no I/O.
//!
//! A flow between two pods meets two checks (a conntrack key holds the ifindex, so each
//! endpoint judges the flow on its own): egress at the source's host-side interface
//! (`npm_from_pod`), ingress at the destination's (`npm_to_pod`). Each is the datapath's
//! procedure for a new flow, transcribed from `npm-ebpf/src/main.rs` (`classify`, `spoofed`,
//! `policy_verdict`, `policy_allows`) and reading the same maps ([`DesiredMaps`]):
//!
//! 1. ENDPOINTS by ifindex: none is `not_managed` (passes).
//! 2. The source check: the pod-side address (the source leaving the pod, the destination
//!    entering it) must not be the node's or another interface's in IDENTITIES (`spoofed`).
//! 3. Not isolated in this direction: `not_isolated`.
//! 4. The peer's IDENTITIES entry: the node's is `host`, this interface's own is `self`; then
//!    PAIRS (local identity, peer identity, dir) with its inline entries
//!    ([`PairPort::matches`]) or, for `PAIR_TRIE`, a longest-prefix match in POLICY (the
//!    trie's semantics: protocol and port prefixes); then, when the endpoint has class rules
//!    (`EP_CLASS_*`), the same with the address's CIDR class (from its IDENTITIES entry, or
//!    a longest-prefix match in CIDRS for an address IDENTITIES does not know).
//!
//! Not modelled, because they do not decide a new flow between two addresses: conntrack (an
//! established flow passes whatever the policy says now), fragments and ICMP errors, and the
//! post-DNAT check of Services (a destination inside a Service range is refused: explain the
//! backend pod instead).
//!
//! An allow names the POLICY entry's `rule_ref` (the first rule, in (policy, direction, index)
//! order, that produced the entry), the rule it stands for, and that rule's peers which match
//! the remote side (pod and namespace selectors for an identity, ipBlocks for a CIDR class).
//!
//! **Point of view.** The maps are one node's: only its pods have endpoints. [`View::Node`]
//! (the live agent) explains from that node: a pod of another node is `remote` (its node checks
//! that side; the answer is then not `complete`). [`View::AllPodsLocal`] (offline manifests,
//! compiled as `npm-agent compile` does) gives every pod an endpoint, so both sides of every
//! pod-to-pod flow are checked, as on a single node holding all of them.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use npm_common::maps::{
    Addr16, EP_CLASS_EGRESS, EP_CLASS_INGRESS, EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, ID_PENDING,
    PAIR_TRIE, PEER_HOST, PROTO_ICMP, PROTO_ICMPV6, PairKey, PolicyKey, PolicyValue,
};
use npm_common::verdict::{DIR_EGRESS, DIR_INGRESS};
use serde::{Deserialize, Serialize};

use crate::compiler::desired::Lpm;
use crate::compiler::{Closed, Compiled, DesiredMaps, Incremental, RuleRef, addr16};
use crate::lab::ProbeProtocol;
use crate::model::{ObjRef, Peer, Pod, Selector, SelectorOp};
use crate::state::ClusterSnapshot;

/// Whose maps these are (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Offline: every endpoint pod has an interface (one node holding every pod).
    AllPodsLocal,
    /// A running agent's node: only its pods have endpoints.
    Node,
}

/// What explain reads: the compiled maps, the rule table, the ground state they came from.
/// Built once per compile (the agent publishes it behind an `Arc` after each apply).
#[derive(Clone, Debug)]
pub struct State {
    pub maps: DesiredMaps,
    /// `PolicyValue::rule_ref` -> the rule.
    pub rules: BTreeMap<u32, RuleRef>,
    pub snapshot: ClusterSnapshot,
    /// Policies that fail closed for exceeding a limit.
    pub closed: BTreeMap<ObjRef, Closed>,
    pub view: View,
}

impl State {
    /// The running compiler's state, from its node's point of view (a copy: O(entries)).
    pub fn of_node(compiler: &Incremental) -> Self {
        Self {
            maps: compiler.maps().clone(),
            rules: compiler.rules().clone(),
            snapshot: compiler.snapshot().clone(),
            closed: compiler.closed_policies().clone(),
            view: View::Node,
        }
    }

    /// An offline compile of `snapshot` in which every endpoint pod is local
    /// ([`View::AllPodsLocal`]).
    pub fn offline(compiled: Compiled, snapshot: ClusterSnapshot) -> Self {
        Self {
            closed: compiled
                .policy_entries
                .iter()
                .filter_map(|(o, c)| Some((o.clone(), c.closed?)))
                .collect(),
            maps: compiled.maps,
            rules: compiled.rules,
            snapshot,
            view: View::AllPodsLocal,
        }
    }
}

/// One question: `from` and `to` are `NAMESPACE/POD` or an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub from: String,
    pub to: String,
    pub protocol: ProbeProtocol,
    /// Required for TCP, UDP and SCTP; none for ICMP (echo: only rules without ports allow it).
    pub port: Option<u16>,
}

/// Bad input: the question cannot be evaluated. Each names what is wrong.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("{which} {text:?}: expected NAMESPACE/POD or an IP address")]
    BadEndpoint { which: &'static str, text: String },
    #[error("{which} {pod}: no such pod")]
    UnknownPod { which: &'static str, pod: String },
    #[error("{which} {pod}: the pod has no IP address")]
    NoAddress { which: &'static str, pod: String },
    #[error("{from} and {to} have no address family in common")]
    NoCommonFamily { from: String, to: String },
    #[error("a port is required for {protocol}")]
    MissingPort { protocol: &'static str },
    #[error("ICMP has no port (leave --port out)")]
    PortWithIcmp,
    #[error("protocol {0:?}: expected TCP, UDP, SCTP or ICMP")]
    BadProtocol(String),
    #[error("query parameter {0:?} is missing")]
    MissingParameter(&'static str),
    #[error("query parameter {0:?}: unknown (expected from, to, port, protocol)")]
    UnknownParameter(String),
    #[error("port {0:?}: expected a number from 0 to 65535")]
    BadPort(String),
    #[error(
        "{to} is inside a Service range: egress to it is judged after kube-proxy's DNAT, against the backend; explain the backend pod instead"
    )]
    ServiceAddress { to: IpAddr },
}

/// TCP, UDP, SCTP or ICMP, any case.
pub fn parse_protocol(s: &str) -> Result<ProbeProtocol, ExplainError> {
    match s.to_ascii_uppercase().as_str() {
        "TCP" => Ok(ProbeProtocol::Tcp),
        "UDP" => Ok(ProbeProtocol::Udp),
        "SCTP" => Ok(ProbeProtocol::Sctp),
        "ICMP" => Ok(ProbeProtocol::Icmp),
        _ => Err(ExplainError::BadProtocol(s.to_owned())),
    }
}

impl Query {
    /// From a URL query (`from=NS/POD&to=10.0.0.5&port=80&protocol=TCP`, values
    /// percent-encoded; protocol defaults to TCP): the `/debug/explain` parameters.
    pub fn parse_url_query(query: &str) -> Result<Query, ExplainError> {
        let (mut from, mut to, mut port, mut protocol) = (None, None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "from" => from = Some(v),
                "to" => to = Some(v),
                "port" => port = Some(v.parse::<u16>().map_err(|_| ExplainError::BadPort(v))?),
                "protocol" => protocol = Some(parse_protocol(&v)?),
                other => return Err(ExplainError::UnknownParameter(other.to_owned())),
            }
        }
        Ok(Query {
            from: from.ok_or(ExplainError::MissingParameter("from"))?,
            to: to.ok_or(ExplainError::MissingParameter("to"))?,
            protocol: protocol.unwrap_or(ProbeProtocol::Tcp),
            port,
        })
    }

    /// The inverse of [`Query::parse_url_query`].
    pub fn to_url_query(&self) -> String {
        let mut q = format!(
            "from={}&to={}&protocol={}",
            percent_encode(&self.from),
            percent_encode(&self.to),
            self.protocol.as_str()
        );
        if let Some(p) = self.port {
            q.push_str(&format!("&port={p}"));
        }
        q
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `%XX` decoded (a malformed escape is kept as written); `+` is a space.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 3 <= b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer. Field names are a contract (`--json`, `/debug/explain`): extend, never rename.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub view: View,
    /// The node whose maps answered (`View::Node`), when it has a name.
    pub node: Option<String>,
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: ProbeProtocol,
    /// 0 for ICMP.
    pub port: u16,
    /// `denied` when either check denies, else `allowed`.
    pub verdict: Verdict,
    /// False when a side is a pod of another node (`remote`): its node checks that side too.
    pub complete: bool,
    /// The source's egress check.
    pub egress: Check,
    /// The destination's ingress check.
    pub ingress: Check,
}

/// One side of the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// As asked (`NAMESPACE/POD` or an IP).
    pub given: String,
    /// The address the flow uses (IPv4 when both sides have one).
    pub ip: IpAddr,
    /// The endpoint pod with that address, if any (`NAMESPACE/POD`).
    pub pod: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
        }
    }
}

/// What one direction's check gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckVerdict {
    /// Isolated, and a rule allows the peer on this protocol and port.
    Allowed,
    /// Isolated, and no rule allows it.
    Denied,
    /// No policy isolates the endpoint in this direction.
    NotIsolated,
    /// The peer is an address of the node: always allowed.
    Host,
    /// The peer is the endpoint itself: always allowed.
    #[serde(rename = "self")]
    SelfPeer,
    /// The endpoint's own address in the flow is another interface's or the node's.
    Spoofed,
    /// The pod has an interface, but no ENDPOINTS entry (not an endpoint: e.g. finished).
    NotManaged,
    /// A pod of another node: that node checks this side.
    Remote,
    /// Not a pod's address (outside the cluster, the node's, a hostNetwork pod's): nothing
    /// checks this side.
    NoEndpoint,
}

impl CheckVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckVerdict::Allowed => "allowed",
            CheckVerdict::Denied => "denied",
            CheckVerdict::NotIsolated => "not_isolated",
            CheckVerdict::Host => "host",
            CheckVerdict::SelfPeer => "self",
            CheckVerdict::Spoofed => "spoofed",
            CheckVerdict::NotManaged => "not_managed",
            CheckVerdict::Remote => "remote",
            CheckVerdict::NoEndpoint => "no_endpoint",
        }
    }
    /// Whether the datapath drops the flow here.
    pub fn drops(self) -> bool {
        matches!(self, CheckVerdict::Denied | CheckVerdict::Spoofed)
    }
}

/// One direction's check at one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub verdict: CheckVerdict,
    /// The pod whose policy this direction checks (`NAMESPACE/POD`), if any.
    pub pod: Option<String>,
    /// Its host-side interface (the ENDPOINTS key), if it has one here.
    pub ifindex: Option<u32>,
    /// The policies that isolate it in this direction (name order).
    pub isolated_by: Vec<Isolating>,
    /// For `allowed`: the rule of the POLICY entry that matched.
    pub rule: Option<RuleView>,
    /// For `allowed`: how the peer matched.
    pub peer: Option<PeerMatch>,
    /// One sentence.
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolating {
    /// `NAMESPACE/NAME`.
    pub policy: String,
    /// null; "over_budget" or "over_total": it isolates but allows nothing (as `compile`).
    pub fails_closed: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    /// `NAMESPACE/NAME`.
    pub policy: String,
    /// "ingress" or "egress".
    pub direction: String,
    /// Index in the policy's ingress or egress list (from 0).
    pub index: usize,
    /// The POLICY value's `rule_ref`.
    pub rule_ref: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMatch {
    /// "identity" (the peer's pod identity) or "cidr_class" (the address's CIDR class).
    pub via: String,
    /// The identity or class id (the POLICY key's `peer_id`).
    pub id: u32,
    /// The rule's peers (`from`/`to` entries) that match the remote side.
    pub matched: Vec<RulePeer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulePeer {
    /// Index in the rule's `from`/`to` list; null for a rule without one (any peer).
    pub index: Option<usize>,
    /// E.g. `podSelector {app=web}`, `namespaceSelector {team=a} podSelector {}`,
    /// `ipBlock 10.0.0.0/8 except 10.1.0.0/16`, `any peer`.
    pub peer: String,
}

/// The flow as the datapath sees its first packet.
struct Flow {
    src: Addr16,
    dst: Addr16,
    proto: u8,
    /// Destination port, host order (0 for ICMP: only any-protocol entries match it).
    port: u16,
}

/// The POLICY entry that allowed, as the datapath found it.
struct Hit {
    peer_id: u32,
    via_class: bool,
    /// Its value (None only if PAIRS named an entry POLICY lacks: never, by construction).
    value: Option<PolicyValue>,
}

/// The datapath's answer before it is described.
enum Raw {
    NotManaged,
    Spoofed,
    NotIsolated,
    Host,
    SelfPeer,
    Allowed(Hit),
    /// Which peer ids were looked up (identity, class).
    Denied(Option<u32>, Option<u32>),
}

/// A resolved side.
struct Side<'a> {
    given: String,
    pod: Option<&'a Pod>,
    addrs: Vec<IpAddr>,
}

impl State {
    /// Evaluates `q`. Errors only for bad input.
    pub fn explain(&self, q: &Query) -> Result<Explanation, ExplainError> {
        let port = match (q.protocol, q.port) {
            (ProbeProtocol::Icmp, None) => 0,
            (ProbeProtocol::Icmp, Some(_)) => return Err(ExplainError::PortWithIcmp),
            (_, Some(n)) => n,
            (p, None) => {
                return Err(ExplainError::MissingPort {
                    protocol: p.as_str(),
                });
            }
        };
        let from = self.resolve("--from", &q.from)?;
        let to = self.resolve("--to", &q.to)?;
        let (src, dst) = [true, false]
            .into_iter()
            .find_map(|v4| {
                let pick = |s: &Side<'_>| s.addrs.iter().copied().find(|a| a.is_ipv4() == v4);
                Some((pick(&from)?, pick(&to)?))
            })
            .ok_or_else(|| ExplainError::NoCommonFamily {
                from: from.given.clone(),
                to: to.given.clone(),
            })?;
        if lpm_addr(&self.maps.services, &addr16(dst)).is_some() {
            return Err(ExplainError::ServiceAddress { to: dst });
        }
        let proto = match q.protocol {
            ProbeProtocol::Icmp if src.is_ipv4() => PROTO_ICMP,
            ProbeProtocol::Icmp => PROTO_ICMPV6,
            ProbeProtocol::Tcp => npm_common::maps::PROTO_TCP,
            ProbeProtocol::Udp => npm_common::maps::PROTO_UDP,
            ProbeProtocol::Sctp => npm_common::maps::PROTO_SCTP,
        };
        let flow = Flow {
            src: addr16(src),
            dst: addr16(dst),
            proto,
            port,
        };
        // Each side's pod as the datapath knows it: the endpoint pod owning the address.
        let from_pod = self.owner(&from, src);
        let to_pod = self.owner(&to, dst);
        let egress = self.side_check(DIR_EGRESS, from_pod, to_pod, &flow, q.protocol, dst);
        let ingress = self.side_check(DIR_INGRESS, to_pod, from_pod, &flow, q.protocol, src);
        let verdict = if egress.verdict.drops() || ingress.verdict.drops() {
            Verdict::Denied
        } else {
            Verdict::Allowed
        };
        let complete =
            egress.verdict != CheckVerdict::Remote && ingress.verdict != CheckVerdict::Remote;
        Ok(Explanation {
            view: self.view,
            node: match self.view {
                View::Node => self.snapshot.node_name.clone(),
                View::AllPodsLocal => None,
            },
            from: Endpoint {
                given: from.given,
                ip: src,
                pod: from_pod.map(|p| p.obj_ref().to_string()),
            },
            to: Endpoint {
                given: to.given,
                ip: dst,
                pod: to_pod.map(|p| p.obj_ref().to_string()),
            },
            protocol: q.protocol,
            port,
            verdict,
            complete,
            egress,
            ingress,
        })
    }

    fn resolve<'a>(&'a self, which: &'static str, text: &str) -> Result<Side<'a>, ExplainError> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Side {
                given: text.to_owned(),
                pod: None,
                addrs: vec![ip],
            });
        }
        let bad = || ExplainError::BadEndpoint {
            which,
            text: text.to_owned(),
        };
        let (ns, name) = text.split_once('/').ok_or_else(bad)?;
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        let pod = self
            .snapshot
            .pods
            .get(&ObjRef::new(ns, name))
            .ok_or_else(|| ExplainError::UnknownPod {
                which,
                pod: text.to_owned(),
            })?;
        if pod.ips.is_empty() {
            return Err(ExplainError::NoAddress {
                which,
                pod: text.to_owned(),
            });
        }
        Ok(Side {
            given: text.to_owned(),
            pod: Some(pod),
            addrs: pod.ips.clone(),
        })
    }

    /// The pod a side stands for: the named one (an endpoint or not), else the endpoint pod
    /// the address belongs to: the local one IDENTITIES gives it to, else the first endpoint
    /// pod in name order holding it (a running one before a terminating one).
    fn owner<'a>(&'a self, side: &Side<'a>, ip: IpAddr) -> Option<&'a Pod> {
        if side.pod.is_some() {
            return side.pod;
        }
        if let Some(info) = self.maps.identities.get(&addr16(ip))
            && info.ifindex != 0
            && let Some((obj, _)) = self
                .snapshot
                .local
                .iter()
                .find(|(_, i)| **i == info.ifindex)
            && let Some(p) = self.snapshot.pods.get(obj)
        {
            return Some(p);
        }
        let holders = || {
            self.snapshot
                .pods
                .values()
                .filter(move |p| p.is_endpoint() && p.ips.contains(&ip))
        };
        holders()
            .find(|p| !p.terminating)
            .or_else(|| holders().next())
    }

    /// The check of `dir` at `me`'s endpoint (`other` is the remote side's pod, if any;
    /// `peer_ip` its address).
    fn side_check(
        &self,
        dir: u8,
        me: Option<&Pod>,
        other: Option<&Pod>,
        flow: &Flow,
        protocol: ProbeProtocol,
        peer_ip: IpAddr,
    ) -> Check {
        let dir_word = dir_name(dir);
        let ifindex = me.and_then(|p| self.snapshot.local.get(&p.obj_ref()).copied());
        let mut check = Check {
            verdict: CheckVerdict::NoEndpoint,
            pod: me.map(|p| p.obj_ref().to_string()),
            ifindex,
            isolated_by: me.map(|p| self.isolating(p, dir)).unwrap_or_default(),
            rule: None,
            peer: None,
            why: String::new(),
        };
        let port_text = if protocol == ProbeProtocol::Icmp {
            "ICMP".to_owned()
        } else {
            format!("{}/{}", flow.port, protocol.as_str())
        };
        let Some(ifindex) = ifindex else {
            (check.verdict, check.why) = match me {
                Some(p) if p.is_endpoint() => (
                    CheckVerdict::Remote,
                    format!(
                        "{} is a pod of another node{}: its node checks {dir_word}",
                        p.obj_ref(),
                        p.node_name
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ),
                ),
                Some(p) if p.host_network => (
                    CheckVerdict::NoEndpoint,
                    format!(
                        "{} is a hostNetwork pod (the node's addresses, no interface of its own): nothing checks {dir_word}",
                        p.obj_ref()
                    ),
                ),
                Some(p) => (
                    CheckVerdict::NoEndpoint,
                    format!(
                        "{} is not an endpoint (finished or without an address): nothing checks {dir_word}",
                        p.obj_ref()
                    ),
                ),
                None => (
                    CheckVerdict::NoEndpoint,
                    format!(
                        "{} is no pod's address: nothing checks {dir_word} on this side",
                        if dir == DIR_EGRESS {
                            flow_ip(flow.src)
                        } else {
                            flow_ip(flow.dst)
                        }
                    ),
                ),
            };
            return check;
        };
        let names = |v: &[Isolating]| {
            v.iter()
                .map(|i| match &i.fails_closed {
                    Some(c) => format!("{} (fails closed: {c})", i.policy),
                    None => i.policy.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.datapath_check(ifindex, dir, flow) {
            Raw::NotManaged => {
                check.verdict = CheckVerdict::NotManaged;
                check.why =
                    format!("interface {ifindex} has no ENDPOINTS entry: passes as not managed");
            }
            Raw::Spoofed => {
                check.verdict = CheckVerdict::Spoofed;
                check.why = format!(
                    "{} is not this endpoint's address in IDENTITIES (another interface's or the node's): dropped as spoofed",
                    if dir == DIR_EGRESS {
                        flow_ip(flow.src)
                    } else {
                        flow_ip(flow.dst)
                    }
                );
            }
            Raw::NotIsolated => {
                check.verdict = CheckVerdict::NotIsolated;
                check.why = format!("no policy selects it for {dir_word}");
            }
            Raw::Host => {
                check.verdict = CheckVerdict::Host;
                check.why = format!("{peer_ip} is an address of the node: always allowed");
            }
            Raw::SelfPeer => {
                check.verdict = CheckVerdict::SelfPeer;
                check.why = "the peer is the pod itself: always allowed".to_owned();
            }
            Raw::Allowed(hit) => {
                check.verdict = CheckVerdict::Allowed;
                let rule = hit
                    .value
                    .and_then(|v| Some((v.rule_ref, self.rules.get(&v.rule_ref)?)));
                let matched = rule
                    .map(|(_, r)| self.matched_peers(r, other, peer_ip, hit.via_class))
                    .unwrap_or_default();
                let via = if hit.via_class {
                    "cidr_class"
                } else {
                    "identity"
                };
                check.why = match rule {
                    Some((_, r)) => format!(
                        "{} {} rule {} (peer {}) allows {port_text}; isolated by {}",
                        r.policy,
                        dir_name(r.dir),
                        r.index,
                        if matched.is_empty() {
                            format!("{via} {}", hit.peer_id)
                        } else {
                            matched
                                .iter()
                                .map(|m| m.peer.clone())
                                .collect::<Vec<_>>()
                                .join(" | ")
                        },
                        names(&check.isolated_by)
                    ),
                    None => format!(
                        "a POLICY entry without a known rule ({via} {}) allows it; isolated by {}",
                        hit.peer_id,
                        names(&check.isolated_by)
                    ),
                };
                check.rule = rule.map(|(n, r)| RuleView {
                    policy: r.policy.to_string(),
                    direction: dir_name(r.dir).to_owned(),
                    index: r.index,
                    rule_ref: n,
                });
                check.peer = Some(PeerMatch {
                    via: via.to_owned(),
                    id: hit.peer_id,
                    matched,
                });
            }
            Raw::Denied(identity, class) => {
                check.verdict = CheckVerdict::Denied;
                let looked = match (identity, class) {
                    (Some(i), Some(c)) => format!("identity {i} nor CIDR class {c:#x}"),
                    (Some(i), None) => format!("identity {i}"),
                    (None, Some(c)) => format!("CIDR class {c:#x}"),
                    (None, None) => "an address no pod or ipBlock rule names".to_owned(),
                };
                check.why = format!(
                    "isolated by {}; no rule allows {peer_ip} ({looked}) on {port_text}",
                    names(&check.isolated_by)
                );
            }
        }
        check
    }

    /// The policies of `pod`'s namespace that select it and have `dir` (as the compiler
    /// isolates).
    fn isolating(&self, pod: &Pod, dir: u8) -> Vec<Isolating> {
        self.snapshot
            .policies
            .range(ObjRef::new(&pod.namespace, "")..)
            .take_while(|(o, _)| o.namespace == pod.namespace)
            .filter(|(_, p)| p.pod_selector.matches(&pod.labels))
            .filter(|(_, p)| {
                if dir == DIR_INGRESS {
                    p.ingress.is_some()
                } else {
                    p.egress.is_some()
                }
            })
            .map(|(o, _)| Isolating {
                policy: o.to_string(),
                fails_closed: self.closed.get(o).map(|c| {
                    match c {
                        Closed::OverBudget => "over_budget",
                        Closed::OverTotal => "over_total",
                    }
                    .to_owned()
                }),
            })
            .collect()
    }

    /// The peers of rule `r` that match the remote side: pod and namespace selectors against
    /// `other` (identity matches), ipBlocks containing `ip` (class matches).
    fn matched_peers(
        &self,
        r: &RuleRef,
        other: Option<&Pod>,
        ip: IpAddr,
        via_class: bool,
    ) -> Vec<RulePeer> {
        let Some(policy) = self.snapshot.policies.get(&r.policy) else {
            return Vec::new();
        };
        let rules = if r.dir == DIR_INGRESS {
            &policy.ingress
        } else {
            &policy.egress
        };
        let Some(rule) = rules.as_ref().and_then(|v| v.get(r.index)) else {
            return Vec::new();
        };
        if rule.peers.is_empty() {
            return vec![RulePeer {
                index: None,
                peer: "any peer".to_owned(),
            }];
        }
        let ns_labels = other.and_then(|p| self.snapshot.namespaces.get(&p.namespace));
        rule.peers
            .iter()
            .enumerate()
            .filter(|(_, peer)| match peer {
                Peer::Pods {
                    namespace_selector,
                    pod_selector,
                } => {
                    !via_class
                        && other.is_some_and(|o| {
                            let ns_ok = match namespace_selector {
                                None => o.namespace == policy.namespace,
                                Some(sel) => ns_labels.is_some_and(|n| sel.matches(&n.labels)),
                            };
                            ns_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&o.labels))
                        })
                }
                Peer::IpBlock { cidr, except } => {
                    via_class && cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
                }
            })
            .map(|(i, peer)| RulePeer {
                index: Some(i),
                peer: peer_text(peer),
            })
            .collect()
    }

    /// The datapath's decision for a new flow at the endpoint of `ifindex` in `dir`
    /// (`classify` after the conntrack miss).
    fn datapath_check(&self, ifindex: u32, dir: u8, f: &Flow) -> Raw {
        let Some(ep) = self.maps.endpoints.get(&ifindex) else {
            return Raw::NotManaged;
        };
        if self.spoofed(f, ifindex, ep.id, dir) {
            return Raw::Spoofed;
        }
        let (isolate_bit, class_bit) = if dir == DIR_INGRESS {
            (EP_ISOLATE_INGRESS, EP_CLASS_INGRESS)
        } else {
            (EP_ISOLATE_EGRESS, EP_CLASS_EGRESS)
        };
        if ep.flags & isolate_bit == 0 {
            return Raw::NotIsolated;
        }
        self.policy_verdict(ep.id, f, ifindex, dir, ep.flags & class_bit != 0)
    }

    /// `spoofed` in the datapath.
    fn spoofed(&self, f: &Flow, ifindex: u32, ep_id: u32, dir: u8) -> bool {
        let placed = ep_id != ID_PENDING;
        let own = if dir == DIR_EGRESS { &f.src } else { &f.dst };
        match self.maps.identities.get(own) {
            Some(id) => {
                id.flags & PEER_HOST != 0 || (id.ifindex != ifindex && (placed || id.ifindex != 0))
            }
            None => dir == DIR_EGRESS && placed && !(link_local(&f.src) && link_scoped(&f.dst)),
        }
    }

    /// `policy_verdict` in the datapath.
    fn policy_verdict(&self, local: u32, f: &Flow, ifindex: u32, dir: u8, classes: bool) -> Raw {
        let peer = if dir == DIR_INGRESS { &f.src } else { &f.dst };
        if let Some(id) = self.maps.identities.get(peer) {
            if id.flags & PEER_HOST != 0 {
                return Raw::Host;
            }
            if id.ifindex == ifindex {
                return Raw::SelfPeer;
            }
            if let Some(hit) = self.policy_allows(local, id.id, dir, f, false) {
                return Raw::Allowed(hit);
            }
            if classes
                && id.class != 0
                && let Some(hit) = self.policy_allows(local, id.class, dir, f, true)
            {
                return Raw::Allowed(hit);
            }
            return Raw::Denied(Some(id.id), (classes && id.class != 0).then_some(id.class));
        }
        if !classes {
            return Raw::Denied(None, None);
        }
        let class = lpm_addr(&self.maps.cidrs, peer);
        if let Some(class) = class
            && let Some(hit) = self.policy_allows(local, class, dir, f, true)
        {
            return Raw::Allowed(hit);
        }
        Raw::Denied(None, class)
    }

    /// `policy_allows` in the datapath: PAIRS, then its inline entries or the POLICY trie.
    fn policy_allows(&self, local: u32, peer: u32, dir: u8, f: &Flow, class: bool) -> Option<Hit> {
        let pair = self.maps.pairs.get(&PairKey {
            local_id: local,
            peer_id: peer,
            dir,
            _pad: [0; 3],
        })?;
        let value = if pair.flags & PAIR_TRIE == 0 {
            // The first inline entry that matches, in slot order (the datapath's `||`), is
            // the POLICY entry it stands for.
            let p = pair.ports.iter().find(|p| p.matches(f.proto, f.port))?;
            let key = PolicyKey {
                local_id: local,
                peer_id: peer,
                dir,
                proto: p.proto,
                dport_be: p.port.to_be(),
            };
            self.maps
                .policy
                .get(&(u32::from(p.prefix_len), key))
                .copied()
        } else {
            Some(lpm_policy(
                &self.maps.policy,
                &PolicyKey {
                    local_id: local,
                    peer_id: peer,
                    dir,
                    proto: f.proto,
                    dport_be: f.port.to_be(),
                },
            )?)
        };
        Some(Hit {
            peer_id: peer,
            via_class: class,
            value,
        })
    }
}

fn dir_name(dir: u8) -> &'static str {
    if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn flow_ip(a: Addr16) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// fe80::/10 (`parse::link_local` in the datapath).
fn link_local(a: &Addr16) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// fe80::/10 or ff00::/8 (`parse::link_scoped`).
fn link_scoped(a: &Addr16) -> bool {
    link_local(a) || a[0] == 0xff
}

/// Zeroes every bit of `bytes` past the first `len`.
fn mask(bytes: &mut [u8], len: u32) {
    for (i, b) in bytes.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if start >= len {
            *b = 0;
        } else if start + 8 > len {
            *b &= 0xffu8 << (8 - (len - start));
        }
    }
}

/// The kernel LPM trie's lookup: the entry with the longest prefix whose first `len` bits
/// equal the key's (entries have every bit past their prefix zeroed, [`Lpm`]).
fn lpm_addr(map: &BTreeMap<Lpm<Addr16>, u32>, addr: &Addr16) -> Option<u32> {
    (0..=128u32).rev().find_map(|len| {
        let mut k = *addr;
        mask(&mut k, len);
        map.get(&(len, k)).copied()
    })
}

/// [`lpm_addr`] for POLICY: the key's bytes as the kernel sees them (`#[repr(C)]`, native
/// integers, the port in network order), so protocol and port prefixes wildcard as there.
fn lpm_policy(map: &BTreeMap<Lpm<PolicyKey>, PolicyValue>, key: &PolicyKey) -> Option<PolicyValue> {
    let mut bytes = [0u8; 12];
    bytes[0..4].copy_from_slice(&key.local_id.to_ne_bytes());
    bytes[4..8].copy_from_slice(&key.peer_id.to_ne_bytes());
    bytes[8] = key.dir;
    bytes[9] = key.proto;
    bytes[10..12].copy_from_slice(&key.dport_be.to_ne_bytes());
    (0..=npm_common::maps::POLICY_PREFIX_FULL)
        .rev()
        .find_map(|len| {
            let mut b = bytes;
            mask(&mut b, len);
            let k = PolicyKey {
                local_id: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                peer_id: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                dir: b[8],
                proto: b[9],
                dport_be: u16::from_ne_bytes([b[10], b[11]]),
            };
            map.get(&(len, k)).copied()
        })
}

/// A peer as the manifest reads.
fn peer_text(peer: &Peer) -> String {
    match peer {
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => match (namespace_selector, pod_selector) {
            (None, p) => format!("podSelector {}", SelectorText(p.as_ref())),
            (Some(n), None) => format!("namespaceSelector {}", SelectorText(Some(n))),
            (Some(n), Some(p)) => format!(
                "namespaceSelector {} podSelector {}",
                SelectorText(Some(n)),
                SelectorText(Some(p))
            ),
        },
        Peer::IpBlock { cidr, except } => {
            if except.is_empty() {
                format!("ipBlock {cidr}")
            } else {
                let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
                format!("ipBlock {cidr} except {}", ex.join(", "))
            }
        }
    }
}

/// `{app=web, tier in (a, b), env notin (x), team, !legacy}`; `{}` matches everything.
struct SelectorText<'a>(Option<&'a Selector>);

impl fmt::Display for SelectorText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(s) = self.0 else {
            return f.write_str("{}");
        };
        let mut parts: Vec<String> = s
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &s.match_expressions {
            let vals = || r.values.iter().cloned().collect::<Vec<_>>().join(", ");
            parts.push(match r.op {
                SelectorOp::In => format!("{} in ({})", r.key, vals()),
                SelectorOp::NotIn => format!("{} notin ({})", r.key, vals()),
                SelectorOp::Exists => r.key.clone(),
                SelectorOp::DoesNotExist => format!("!{}", r.key),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests;
