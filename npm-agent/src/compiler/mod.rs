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
//! 4. Host-side interfaces not yet tied to a pod (`pending_links`) get the endpoint
//!    `{ID_PENDING, flags}`: the isolation directions of this node's pods not yet placed.
//!
//! [`Incremental`] does all of this from changes and returns, per batch, the ordered map
//! operations for what changed; [`compile`] is a fresh `Incremental` over a whole snapshot.
pub mod desired;
pub mod ids;
pub mod incremental;
pub mod peers;
pub mod ports;
pub mod selector;

use std::collections::{BTreeMap, BTreeSet};

pub use desired::{DesiredMaps, RuleRef};
pub use ids::IdAllocator;
pub use incremental::Incremental;

use npm_common::maps::Addr16;
use ports::PortPrefix;

use crate::model::{ContainerPort, Diagnostic, PortRef, PortSpec};
use crate::state::ClusterSnapshot;

/// The default per-policy budget ([`Limits::max_policy_entries`]): 65 536, 1/16 of the
/// POLICY map, so at least 16 policies at the limit fit beside each other. A policy's POLICY
/// entries are (selected local identities) × (peers) × (port prefixes): even 64 local
/// identities × 64 peer identities × 16 ports stays below it, where one policy with 2 000
/// ports towards every pod of a large cluster is far above.
pub const DEFAULT_MAX_POLICY_ENTRIES: usize = 65_536;

/// Bounds on what policies may add to the POLICY map. Configuration, passed in (the compiler
/// reads nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// At most this many POLICY entries per NetworkPolicy (counted before the merge with other
    /// policies' entries; see [`incremental`]). A policy above it fails closed: it keeps
    /// isolating the pods it selects and allows nothing.
    pub max_policy_entries: usize,
    /// The policies within budget together: at most this many entries (the POLICY map's
    /// size). Above it the largest fail closed first.
    pub max_total_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_policy_entries: DEFAULT_MAX_POLICY_ENTRIES,
            max_total_entries: npm_common::maps::POLICY_MAX as usize,
        }
    }
}

/// The compiler's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub maps: DesiredMaps,
    /// `PolicyValue::rule_ref` -> the rule. Numbers are stable per (policy, direction,
    /// index): adding a policy never renumbers another's rules (so the table has holes).
    pub rules: BTreeMap<u32, RuleRef>,
    pub diagnostics: Vec<Diagnostic>,
    /// Per policy: its POLICY entries on this node (before the merge), and whether it fails
    /// closed for exceeding a limit.
    pub policy_entries: BTreeMap<crate::model::ObjRef, PolicyCount>,
}

/// One policy's entry count and whether it is over a limit (and so fails closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCount {
    pub entries: usize,
    pub closed: Option<Closed>,
}

/// What this node's agent enforces, per local pod and per policy, for the metrics
/// ([`Incremental::local_view`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalView {
    /// Each local endpoint pod (the owner of an interface in ENDPOINTS) with its own counter
    /// slot (`npm_common::metrics::SLOT_FIRST..COUNTER_SLOTS`), in pod order. Pods beyond the
    /// slot count share the unmanaged slot and are not listed.
    pub pods: Vec<(crate::model::ObjRef, u32)>,
    /// Each policy that selects a local identity: the local endpoint pods it isolates (in at
    /// least one direction) and its POLICY entries on this node (before the merge, as
    /// [`PolicyCount::entries`]), in policy order.
    pub policies: Vec<(crate::model::ObjRef, PolicyLocal)>,
}

/// One policy's share of this node ([`LocalView::policies`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyLocal {
    pub isolated_pods: usize,
    pub entries: usize,
}

/// Why a policy fails closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Its entries exceed [`Limits::max_policy_entries`].
    OverBudget,
    /// Within budget, but the policies within budget together exceed
    /// [`Limits::max_total_entries`], and it is among the largest.
    OverTotal,
}

/// Converts an IP address to the maps' 16-byte form.
pub fn addr16(ip: std::net::IpAddr) -> Addr16 {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
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

/// Compiles a snapshot from scratch. `ids` keeps identity and CIDR-class numbers stable
/// across calls, so that successive outputs differ only where the cluster changed. A thin
/// wrapper over [`Incremental`]: there is one compiler.
pub fn compile(snapshot: &ClusterSnapshot, ids: &mut IdAllocator) -> Compiled {
    compile_with(snapshot, ids, Limits::default())
}

/// [`compile`] with explicit [`Limits`].
pub fn compile_with(snapshot: &ClusterSnapshot, ids: &mut IdAllocator, limits: Limits) -> Compiled {
    let inc = Incremental::with_limits(snapshot, std::mem::take(ids), limits);
    let (compiled, mut allocator) = inc.into_parts();
    let used_pods: BTreeSet<u32> = compiled
        .maps
        .identities
        .values()
        .map(|p| p.id)
        .chain(compiled.maps.endpoints.values().map(|e| e.id))
        .filter(|id| *id != 0)
        .collect();
    let used_classes: BTreeSet<u32> = compiled.maps.cidrs.values().copied().collect();
    allocator.retain_used(&used_pods, &used_classes);
    *ids = allocator;
    compiled
}

#[cfg(test)]
mod pending_tests;
#[cfg(test)]
mod tests;
