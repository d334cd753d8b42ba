//! The policy compiler: [`ClusterSnapshot`] -> [`DesiredMaps`]. Pure: no I/O, no clock.
//!
//! 1. Every endpoint pod of the cluster gets an identity (namespace + labels + named ports,
//!    see [`ids::IdentityKey`]); its IPs map to it in IDENTITIES, node IPs map to "host".
//! 2. For each identity of a *local* pod, every policy of its namespace that selects it makes
//!    it isolated in that policy's directions, and each rule adds allow entries: pod peers by
//!    identity, ipBlock peers (and "any peer", as 0.0.0.0/0 + ::/0) through CIDR classes.
//! 3. Ports become POLICY prefixes: any protocol, any port of one protocol, one port, or the
//!    power-of-two blocks of an endPort range. Named ports resolve on the destination pod: the
//!    local pod for ingress (whatever the peer), each selected peer pod for egress. In egress
//!    rules, a named port never matches through an ipBlock peer (the destination's ports are
//!    not known for an address range; Cilium does the same).
pub mod desired;
pub mod ids;
pub mod peers;
pub mod ports;
pub mod selector;

use std::collections::{BTreeMap, BTreeSet};

pub use desired::{DesiredMaps, RuleRef};
pub use ids::IdAllocator;
use ids::IdentityKey;
use npm_common::maps::{
    Addr16, CIDR_CLASS_BIT, EP_ISOLATE_EGRESS, EP_ISOLATE_INGRESS, EndpointInfo, PEER_HOST,
    PeerInfo, PolicyKey, PolicyValue,
};
use npm_common::verdict::{DIR_EGRESS, DIR_INGRESS};
use peers::{Block, Prefix};
use ports::PortPrefix;

use crate::model::{ContainerPort, Diagnostic, Labels, Peer, PortRef, PortSpec, Rule};
use crate::state::ClusterSnapshot;

/// The compiler's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub maps: DesiredMaps,
    /// `PolicyValue::rule_ref` indexes this table.
    pub rules: Vec<RuleRef>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Converts an IP address to the maps' 16-byte form.
pub fn addr16(ip: std::net::IpAddr) -> Addr16 {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

struct Identity<'a> {
    namespace: &'a str,
    namespace_labels: &'a Labels,
    labels: &'a Labels,
    ports: &'a [ContainerPort],
}

/// An ipBlock allow waiting for the CIDR classes: (local id, dir, block, ports, rule_ref).
struct BlockAllow<'a> {
    local: u32,
    dir: u8,
    block: usize,
    ports: &'a [PortSpec],
    /// Where named ports resolve: the local pod for ingress; nowhere for egress to an ipBlock.
    dest_ports: Option<&'a [ContainerPort]>,
    rule_ref: u32,
}

fn insert_policy(
    maps: &mut DesiredMaps,
    local: u32,
    peer: u32,
    dir: u8,
    p: PortPrefix,
    rule_ref: u32,
) {
    let (proto, len, port) = p;
    let key = PolicyKey {
        local_id: local,
        peer_id: peer,
        dir,
        proto,
        dport_be: port.to_be(),
    };
    maps.policy
        .entry((len, key))
        .and_modify(|v| v.rule_ref = v.rule_ref.min(rule_ref))
        .or_insert(PolicyValue { rule_ref, flags: 0 });
}

/// The POLICY port prefixes of `ports` towards a destination whose declared ports are
/// `dest_ports` (None: not a pod, so named ports match nothing).
fn port_prefixes(ports: &[PortSpec], dest_ports: Option<&[ContainerPort]>) -> Vec<PortPrefix> {
    if ports.is_empty() {
        return vec![ports::ANY];
    }
    let mut out = Vec::new();
    for spec in ports {
        let proto = spec.protocol.number();
        match (&spec.port, spec.end_port) {
            (None, _) => out.push(ports::any_port(proto)),
            (Some(PortRef::Number(p)), None) => out.push(ports::exact(proto, *p)),
            (Some(PortRef::Number(p)), Some(end)) => {
                out.extend(ports::range(proto, *p, end.max(*p)))
            }
            (Some(PortRef::Name(name)), _) => out.extend(
                dest_ports
                    .unwrap_or_default()
                    .iter()
                    .filter(|c| {
                        c.protocol == spec.protocol && c.name.as_deref() == Some(name.as_str())
                    })
                    .map(|c| ports::exact(proto, c.port)),
            ),
        }
    }
    out
}

/// Compiles a snapshot. `ids` keeps identity and CIDR-class numbers stable across calls, so
/// that successive outputs differ only where the cluster changed.
pub fn compile(snapshot: &ClusterSnapshot, ids: &mut IdAllocator) -> Compiled {
    let mut out = Compiled::default();
    let empty = Labels::new();

    // 1. Identities of every endpoint pod, and the addresses that carry them.
    let mut identities: BTreeMap<u32, Identity<'_>> = BTreeMap::new();
    let mut pod_id: BTreeMap<&crate::model::ObjRef, u32> = BTreeMap::new();
    let mut ip_owner: BTreeMap<Addr16, String> = BTreeMap::new();
    for (obj, pod) in &snapshot.pods {
        if !pod.is_endpoint() {
            continue;
        }
        let namespace_labels = snapshot
            .namespaces
            .get(&pod.namespace)
            .map(|n| &n.labels)
            .unwrap_or(&empty);
        let mut named: Vec<ContainerPort> = pod
            .ports
            .iter()
            .filter(|p| p.name.is_some())
            .cloned()
            .collect();
        named.sort();
        named.dedup();
        let key = IdentityKey {
            namespace: pod.namespace.clone(),
            namespace_labels: namespace_labels.clone(),
            labels: pod.labels.clone(),
            named_ports: named,
        };
        let id = ids.pod(&key);
        identities.entry(id).or_insert(Identity {
            namespace: &pod.namespace,
            namespace_labels,
            labels: &pod.labels,
            ports: &pod.ports,
        });
        pod_id.insert(obj, id);
        let ifindex = snapshot.local.get(obj).copied().unwrap_or(0);
        for ip in &pod.ips {
            let a = addr16(*ip);
            if let Some(first) = ip_owner.get(&a) {
                out.diagnostics.push(Diagnostic {
                    source: None,
                    object: format!("Pod {obj}"),
                    message: format!(
                        "IP {ip} is already used by pod {first}; this pod is ignored as its owner"
                    ),
                });
                continue;
            }
            ip_owner.insert(a, obj.to_string());
            out.maps.identities.insert(
                a,
                PeerInfo {
                    id,
                    ifindex,
                    flags: 0,
                },
            );
        }
    }
    for ip in &snapshot.node_ips {
        out.maps.identities.insert(
            addr16(*ip),
            PeerInfo {
                id: 0,
                ifindex: 0,
                flags: PEER_HOST,
            },
        );
    }

    // Rule table, in policy order, so rule_ref is deterministic.
    let mut rule_base: BTreeMap<(&crate::model::ObjRef, u8), u32> = BTreeMap::new();
    for (obj, policy) in &snapshot.policies {
        for (dir, rules) in [(DIR_INGRESS, &policy.ingress), (DIR_EGRESS, &policy.egress)] {
            if let Some(rules) = rules {
                rule_base.insert((obj, dir), out.rules.len() as u32);
                out.rules.extend((0..rules.len()).map(|index| RuleRef {
                    policy: obj.clone(),
                    dir,
                    index,
                }));
            }
        }
    }

    // 2. Local identities and their rules.
    let local_ids: BTreeSet<u32> = snapshot
        .local
        .keys()
        .filter_map(|obj| pod_id.get(obj).copied())
        .collect();
    let mut blocks: Vec<Block> = Vec::new();
    let mut block_index: BTreeMap<Block, usize> = BTreeMap::new();
    let mut block_of = |b: Block| -> usize {
        *block_index.entry(b.clone()).or_insert_with(|| {
            blocks.push(b);
            blocks.len() - 1
        })
    };
    let mut pending: Vec<BlockAllow<'_>> = Vec::new();
    let mut flags: BTreeMap<u32, u32> = BTreeMap::new();
    for &local in &local_ids {
        let me = &identities[&local];
        let f = flags.entry(local).or_insert(0);
        for (obj, policy) in snapshot
            .policies
            .range(crate::model::ObjRef::new(me.namespace, "")..)
        {
            if obj.namespace != me.namespace {
                break;
            }
            if !policy.pod_selector.matches(me.labels) {
                continue;
            }
            for (dir, rules, bit) in [
                (DIR_INGRESS, &policy.ingress, EP_ISOLATE_INGRESS),
                (DIR_EGRESS, &policy.egress, EP_ISOLATE_EGRESS),
            ] {
                let Some(rules) = rules else { continue };
                *f |= bit;
                let base = rule_base[&(obj, dir)];
                for (i, rule) in rules.iter().enumerate() {
                    let rule_ref = base + i as u32;
                    add_rule(
                        &mut out.maps,
                        &identities,
                        me,
                        local,
                        dir,
                        rule,
                        &policy.namespace,
                        rule_ref,
                        &mut |b| block_of(b),
                        &mut pending,
                    );
                }
            }
        }
    }

    // 3. CIDR classes, and the ipBlock allows through them.
    let classes = peers::classes(&blocks);
    let mut class_ids: BTreeMap<Prefix, u32> = BTreeMap::new();
    let mut members: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (prefix, set) in &classes {
        let key: BTreeSet<Block> = set.iter().map(|i| blocks[*i].clone()).collect();
        let id = ids.class(&key);
        class_ids.insert(*prefix, id);
        out.maps.cidrs.insert((prefix.len, prefix.addr16()), id);
        for b in set {
            members.entry(*b).or_default().push(id);
        }
    }
    for m in &mut members {
        m.1.sort();
        m.1.dedup();
    }
    for allow in &pending {
        for class in members.get(&allow.block).into_iter().flatten() {
            for p in port_prefixes(allow.ports, allow.dest_ports) {
                insert_policy(
                    &mut out.maps,
                    allow.local,
                    *class,
                    allow.dir,
                    p,
                    allow.rule_ref,
                );
            }
        }
    }

    // Endpoints: every local endpoint pod, isolated or not (the datapath tracks its flows).
    for (obj, ifindex) in &snapshot.local {
        if let Some(id) = pod_id.get(obj) {
            out.maps.endpoints.insert(
                *ifindex,
                EndpointInfo {
                    id: *id,
                    flags: flags[id],
                },
            );
        }
    }

    // Pending links (new interfaces not yet tied to a pod): default-deny where a new pod of
    // this node would be isolated. A local pod's entry wins if both name one ifindex.
    for (ifindex, ep) in pending_endpoints(snapshot, |pod| isolation_flags(snapshot, pod)) {
        out.maps.endpoints.entry(ifindex).or_insert(ep);
    }

    let used_pods: BTreeSet<u32> = identities.keys().copied().collect();
    let used_classes: BTreeSet<u32> = class_ids.values().copied().collect();
    debug_assert!(used_classes.iter().all(|c| c & CIDR_CLASS_BIT != 0));
    ids.retain_used(&used_pods, &used_classes);
    out
}

/// The identity of a pending link's endpoint (a new interface whose pod is not known yet). No
/// POLICY entry uses it, so its isolated directions default-deny; its IP has no IDENTITIES
/// entry, so no peer sees it either. The allocator never reaches it in practice (2^31 - 1
/// pod identities).
// TODO(lead, at merge): the compiler branch defines `npm_common::maps::ID_PENDING`; use that.
pub const ID_PENDING: u32 = npm_common::maps::POD_ID_MAX;

/// The isolation flags (`EP_ISOLATE_*`) the policies of its namespace give `pod`.
fn isolation_flags(snapshot: &ClusterSnapshot, pod: &crate::model::Pod) -> u32 {
    let mut flags = 0;
    for (obj, policy) in snapshot
        .policies
        .range(crate::model::ObjRef::new(&pod.namespace, "")..)
    {
        if obj.namespace != pod.namespace {
            break;
        }
        if !policy.pod_selector.matches(&pod.labels) {
            continue;
        }
        if policy.ingress.is_some() {
            flags |= EP_ISOLATE_INGRESS;
        }
        if policy.egress.is_some() {
            flags |= EP_ISOLATE_EGRESS;
        }
    }
    flags
}

/// ENDPOINTS entries for `snapshot.pending_links` not used by a local pod: `{ID_PENDING,
/// flags}`, flags being the union of `flags_of` over this node's not-yet-placed pods (their
/// `node_name` is `snapshot.node_name`, not host-network, not terminating, not in
/// `snapshot.local`; they may have no IP yet). Any of them may be the one behind the new
/// interface, so each direction that would isolate one of them is closed until discovery
/// ties the interface to its pod. Without a node name no pod is known to be coming: 0.
pub fn pending_endpoints(
    snapshot: &ClusterSnapshot,
    flags_of: impl Fn(&crate::model::Pod) -> u32,
) -> BTreeMap<u32, EndpointInfo> {
    let used: BTreeSet<u32> = snapshot.local.values().copied().collect();
    let flags = match snapshot.node_name.as_deref() {
        None => 0,
        Some(node) => snapshot
            .pods
            .iter()
            .filter(|(obj, pod)| {
                pod.node_name.as_deref() == Some(node)
                    && !pod.host_network
                    && !pod.terminating
                    && !snapshot.local.contains_key(*obj)
            })
            .fold(0, |acc, (_, pod)| acc | flags_of(pod)),
    };
    snapshot
        .pending_links
        .iter()
        .filter(|i| !used.contains(i))
        .map(|&i| {
            (
                i,
                EndpointInfo {
                    id: ID_PENDING,
                    flags,
                },
            )
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn add_rule<'a>(
    maps: &mut DesiredMaps,
    identities: &BTreeMap<u32, Identity<'a>>,
    me: &Identity<'a>,
    local: u32,
    dir: u8,
    rule: &'a Rule,
    policy_namespace: &str,
    rule_ref: u32,
    block_of: &mut dyn FnMut(Block) -> usize,
    pending: &mut Vec<BlockAllow<'a>>,
) {
    let dest_ports = (dir == DIR_INGRESS).then_some(me.ports);
    let mut pend = |block: Block| {
        pending.push(BlockAllow {
            local,
            dir,
            block: block_of(block),
            ports: &rule.ports,
            dest_ports,
            rule_ref,
        });
    };
    if rule.peers.is_empty() {
        // Any peer: every address, through the classes of 0.0.0.0/0 and ::/0. Egress named
        // ports resolve on each destination pod, so pods also get identity entries.
        for b in Block::any() {
            pend(b);
        }
        if dir == DIR_EGRESS
            && rule
                .ports
                .iter()
                .any(|p| matches!(p.port, Some(PortRef::Name(_))))
        {
            for (peer, id) in identities {
                add_pod_peer(maps, me, local, *peer, id, dir, &rule.ports, rule_ref);
            }
        }
        return;
    }
    for peer in &rule.peers {
        match peer {
            Peer::IpBlock { cidr, except } => pend(Block::new(*cidr, except)),
            Peer::Pods {
                namespace_selector,
                pod_selector,
            } => {
                for (peer_id, other) in identities {
                    let ns_ok = match namespace_selector {
                        None => other.namespace == policy_namespace,
                        Some(sel) => sel.matches(other.namespace_labels),
                    };
                    let pod_ok = pod_selector
                        .as_ref()
                        .is_none_or(|s| s.matches(other.labels));
                    if ns_ok && pod_ok {
                        add_pod_peer(maps, me, local, *peer_id, other, dir, &rule.ports, rule_ref);
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn add_pod_peer(
    maps: &mut DesiredMaps,
    me: &Identity<'_>,
    local: u32,
    peer: u32,
    other: &Identity<'_>,
    dir: u8,
    ports: &[PortSpec],
    rule_ref: u32,
) {
    let dest = if dir == DIR_INGRESS {
        me.ports
    } else {
        other.ports
    };
    for p in port_prefixes(ports, Some(dest)) {
        insert_policy(maps, local, peer, dir, p, rule_ref);
    }
}

#[cfg(test)]
mod pending_tests;
#[cfg(test)]
mod tests;
