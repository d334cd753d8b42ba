//! The incremental compiler: owns the ground state ([`ClusterSnapshot`]), the id allocator and
//! the derived indexes, and turns each batch of [`Change`]s into the ordered map operations
//! for exactly what changed.
//!
//! Why this can be exact and cheap: POLICY keys start with (local identity L, peer P), so the
//! POLICY map is a disjoint union over (L, P) of `entries(L, P)`, and `entries(L, P)` is a pure
//! function of L's and P's identity attributes (an id is keyed by its [`IdentityKey`], so its
//! attributes never change), the policies of L's namespace, and (for class peers) the CIDR
//! classes. Hence:
//! - a pod event whose identity already exists touches only IDENTITIES (and ENDPOINTS if the
//!   pod is local);
//! - a new identity P adds `entries(L, P)` for each local L (and `entries(P, *)` if P is
//!   local); a vanished one removes them;
//! - a policy event recomputes only the local identities of its namespace that the old or the
//!   new version selects;
//! - a change of the set of ipBlocks in use recomputes the CIDR classes and the class entries
//!   only; a namespace relabel changes the identities of its pods.
//!
//! Each map write goes through a journal that remembers the first old value of every key
//! touched in the batch; the batch's [`Plan`] is the make-before-break diff of those keys only
//! ([`plan::plan`] on the touched subsets).
//!
//! Pending links (`ClusterSnapshot::pending_links`) get an ENDPOINTS entry
//! `{id: ID_PENDING, flags}` where `flags` is the union of the isolation directions of this
//! node's not-yet-placed pods (`node_name` is this node, not host network, not terminating or
//! finished, not in `local`; they may have no IP yet). A local endpoint pod on the same ifindex wins.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::mem;
use std::net::IpAddr;

use ipnet::IpNet;
use npm_common::maps::{
    Addr16, CIDR_CLASS_BIT, EP_CLASS_EGRESS, EP_CLASS_INGRESS, EP_ISOLATE_EGRESS,
    EP_ISOLATE_INGRESS, EndpointInfo, ID_PENDING, PEER_HOST, PairKey, PairValue, PeerInfo,
    PolicyKey, PolicyValue,
};
use npm_common::verdict::{DIR_EGRESS, DIR_INGRESS};

use super::desired::{DesiredMaps, Lpm, RuleRef, pairs_of};
use super::ids::{IdAllocator, IdentityKey};
use super::peers::{self, Block, Prefix};
use super::ports::PortPrefix;
use super::{Closed, Limits, PolicyCount, addr16, port_prefixes};
use crate::model::{
    ContainerPort, Diagnostic, Labels, ObjRef, Peer, Pod, Policy, PortRef, PortSpec, Rule,
};
use crate::programmer::plan::{self, Plan};
use crate::state::{Change, ClusterSnapshot};

/// The POLICY entries of one (local, peer) pair.
type Entries = BTreeMap<Lpm<PolicyKey>, PolicyValue>;

/// An endpoint pod as last compiled.
struct PodState {
    id: u32,
    addrs: Vec<Addr16>,
    /// Host-side ifindex when the pod is local.
    ifindex: Option<u32>,
}

struct IdentityInfo {
    key: IdentityKey,
    /// Endpoint pods with this identity.
    pods: usize,
    /// Local ones: (ifindex, pod).
    local: BTreeSet<(u32, ObjRef)>,
}

/// One rule that applies to a local identity.
struct RuleUse {
    dir: u8,
    rule_ref: u32,
    policy_ns: String,
    rule: Rule,
    /// "Any peer" in an egress rule with named ports: every pod identity gets entries (the
    /// named ports resolve on each destination pod).
    any_peer_named: bool,
    /// Can match pods (has pod peers, or `any_peer_named`).
    pod_peers: bool,
    /// Can match pods of other namespaces (a namespaceSelector, or `any_peer_named`).
    all_namespaces: bool,
}

/// An ipBlock (or "any peer") allow, entered through the CIDR classes.
struct BlockAllow {
    block: Block,
    dir: u8,
    rule_ref: u32,
    ports: Vec<PortSpec>,
}

/// The rules of one policy that selects a local identity.
struct PolicyRules {
    policy: ObjRef,
    /// `EP_ISOLATE_*` of the directions it has.
    isolate: u32,
    rules: Vec<RuleUse>,
    blocks: Vec<BlockAllow>,
    /// Within its limits: its rules add entries (else it only isolates).
    open: bool,
}

/// What a local identity compiles to.
#[derive(Default)]
struct LocalState {
    flags: u32,
    /// Every policy selecting it, in name order, open or closed.
    groups: Vec<PolicyRules>,
    /// peer (pod identity or CIDR class) -> entries(L, peer); never empty values.
    entries: BTreeMap<u32, Entries>,
}

impl LocalState {
    /// The rules that add entries (those of open policies), in (policy, direction, index)
    /// order.
    fn rules(&self) -> impl Iterator<Item = &RuleUse> + '_ {
        self.groups
            .iter()
            .filter(|g| g.open)
            .flat_map(|g| g.rules.iter())
    }

    /// The block allows of open policies.
    fn blocks(&self) -> impl Iterator<Item = &BlockAllow> + '_ {
        self.groups
            .iter()
            .filter(|g| g.open)
            .flat_map(|g| g.blocks.iter())
    }
}

/// Stable rule numbers: one per (policy, direction, index), never renumbered while the rule
/// exists, never reused.
#[derive(Default)]
struct RuleTable {
    by_rule: BTreeMap<(ObjRef, u8, usize), u32>,
    refs: BTreeMap<u32, RuleRef>,
    next: u32,
}

impl RuleTable {
    fn sync(&mut self, obj: &ObjRef, policy: Option<&Policy>) {
        let want: BTreeSet<(u8, usize)> = policy
            .map(|p| {
                [(DIR_INGRESS, &p.ingress), (DIR_EGRESS, &p.egress)]
                    .into_iter()
                    .flat_map(|(d, r)| (0..r.as_ref().map_or(0, Vec::len)).map(move |i| (d, i)))
                    .collect()
            })
            .unwrap_or_default();
        let have: Vec<(u8, usize)> = self
            .by_rule
            .range((obj.clone(), 0, 0)..=(obj.clone(), u8::MAX, usize::MAX))
            .map(|((_, d, i), _)| (*d, *i))
            .collect();
        for (d, i) in have {
            if !want.contains(&(d, i))
                && let Some(r) = self.by_rule.remove(&(obj.clone(), d, i))
            {
                self.refs.remove(&r);
            }
        }
        for (dir, index) in want {
            self.by_rule
                .entry((obj.clone(), dir, index))
                .or_insert_with(|| {
                    let r = self.next;
                    self.next += 1;
                    self.refs.insert(
                        r,
                        RuleRef {
                            policy: obj.clone(),
                            dir,
                            index,
                        },
                    );
                    r
                });
        }
    }

    fn get(&self, obj: &ObjRef, dir: u8, index: usize) -> u32 {
        *self
            .by_rule
            .get(&(obj.clone(), dir, index))
            .expect("every policy in the snapshot has its rules numbered")
    }
}

/// First old value of every key written since the last plan.
#[derive(Default)]
struct Journal {
    endpoints: BTreeMap<u32, Option<EndpointInfo>>,
    identities: BTreeMap<Addr16, Option<PeerInfo>>,
    cidrs: BTreeMap<Lpm<Addr16>, Option<u32>>,
    policy: BTreeMap<Lpm<PolicyKey>, Option<PolicyValue>>,
    pairs: BTreeMap<PairKey, Option<PairValue>>,
    services: BTreeMap<Lpm<Addr16>, Option<u32>>,
}

fn put<K: Ord + Copy, V: Copy>(
    map: &mut BTreeMap<K, V>,
    journal: Option<&mut BTreeMap<K, Option<V>>>,
    k: K,
    v: Option<V>,
) {
    let old = match v {
        Some(v) => map.insert(k, v),
        None => map.remove(&k),
    };
    if let Some(j) = journal {
        j.entry(k).or_insert(old);
    }
}

/// The maps and the journal of writes to them.
struct Out {
    maps: DesiredMaps,
    journal: Journal,
    /// Off while building from scratch (nothing to diff against).
    record: bool,
}

impl Out {
    fn endpoint(&mut self, k: u32, v: Option<EndpointInfo>) {
        if self.maps.endpoints.get(&k).copied() != v {
            put(
                &mut self.maps.endpoints,
                self.record.then_some(&mut self.journal.endpoints),
                k,
                v,
            );
        }
    }

    fn identity(&mut self, k: Addr16, v: Option<PeerInfo>) {
        if self.maps.identities.get(&k).copied() != v {
            put(
                &mut self.maps.identities,
                self.record.then_some(&mut self.journal.identities),
                k,
                v,
            );
        }
    }

    fn cidr(&mut self, k: Lpm<Addr16>, v: Option<u32>) {
        if self.maps.cidrs.get(&k).copied() != v {
            put(
                &mut self.maps.cidrs,
                self.record.then_some(&mut self.journal.cidrs),
                k,
                v,
            );
        }
    }

    fn service(&mut self, k: Lpm<Addr16>, v: Option<u32>) {
        if self.maps.services.get(&k).copied() != v {
            put(
                &mut self.maps.services,
                self.record.then_some(&mut self.journal.services),
                k,
                v,
            );
        }
    }

    /// Replaces one (local, peer) pair's entries, and its PAIRS entries with them.
    fn replace(&mut self, old: Option<&Entries>, new: Option<&Entries>) {
        let old_pairs = pairs_of(old.into_iter().flat_map(|o| o.keys()));
        let new_pairs = pairs_of(new.into_iter().flat_map(|n| n.keys()));
        for k in old_pairs.keys() {
            if !new_pairs.contains_key(k) {
                put(
                    &mut self.maps.pairs,
                    self.record.then_some(&mut self.journal.pairs),
                    *k,
                    None,
                );
            }
        }
        for (k, v) in new_pairs {
            if self.maps.pairs.get(&k) != Some(&v) {
                put(
                    &mut self.maps.pairs,
                    self.record.then_some(&mut self.journal.pairs),
                    k,
                    Some(v),
                );
            }
        }
        if let Some(old) = old {
            for k in old.keys() {
                if new.is_none_or(|n| !n.contains_key(k)) {
                    put(
                        &mut self.maps.policy,
                        self.record.then_some(&mut self.journal.policy),
                        *k,
                        None,
                    );
                }
            }
        }
        if let Some(new) = new {
            for (k, v) in new {
                if old.and_then(|o| o.get(k)) != Some(v) {
                    put(
                        &mut self.maps.policy,
                        self.record.then_some(&mut self.journal.policy),
                        *k,
                        Some(*v),
                    );
                }
            }
        }
    }

    /// The ordered operations for everything written since the last call.
    fn take_plan(&mut self) -> Plan {
        fn split<K: Ord + Copy, V: Copy>(
            journal: BTreeMap<K, Option<V>>,
            now: &BTreeMap<K, V>,
            old: &mut BTreeMap<K, V>,
            new: &mut BTreeMap<K, V>,
        ) {
            for (k, was) in journal {
                if let Some(v) = was {
                    old.insert(k, v);
                }
                if let Some(v) = now.get(&k) {
                    new.insert(k, *v);
                }
            }
        }
        let j = mem::take(&mut self.journal);
        let (mut old, mut new) = (DesiredMaps::default(), DesiredMaps::default());
        split(
            j.endpoints,
            &self.maps.endpoints,
            &mut old.endpoints,
            &mut new.endpoints,
        );
        split(
            j.identities,
            &self.maps.identities,
            &mut old.identities,
            &mut new.identities,
        );
        split(j.cidrs, &self.maps.cidrs, &mut old.cidrs, &mut new.cidrs);
        split(
            j.policy,
            &self.maps.policy,
            &mut old.policy,
            &mut new.policy,
        );
        split(j.pairs, &self.maps.pairs, &mut old.pairs, &mut new.pairs);
        split(
            j.services,
            &self.maps.services,
            &mut old.services,
            &mut new.services,
        );
        plan::plan(&old, &new)
    }
}

/// What one batch of changes touched, before the derived state is brought up to date.
#[derive(Default)]
struct Dirty {
    pods: BTreeSet<ObjRef>,
    namespaces: BTreeSet<String>,
    /// The version of each changed policy before the batch.
    policies: BTreeMap<ObjRef, Option<Policy>>,
    old_node_ips: Option<Vec<IpAddr>>,
    links: BTreeSet<u32>,
    /// The node name changed: every pod's "not yet placed" status is recomputed.
    all_unplaced: bool,
    /// Building from scratch: every pod of the snapshot is dirty (as if listed in `pods`).
    all_pods: bool,
}

/// The incremental policy compiler. See the module documentation.
pub struct Incremental {
    snap: ClusterSnapshot,
    ids: IdAllocator,
    out: Out,
    rules: RuleTable,
    pods: BTreeMap<ObjRef, PodState>,
    identities: BTreeMap<u32, IdentityInfo>,
    /// namespace -> identities of its pods.
    ns_ids: BTreeMap<String, BTreeSet<u32>>,
    /// address -> endpoint pods claiming it (the first owns it).
    ip_claims: BTreeMap<Addr16, BTreeSet<ObjRef>>,
    /// Addresses claimed by more than one pod.
    dup_addrs: BTreeSet<Addr16>,
    /// ifindex -> local endpoint pods on it (the first owns it).
    if_claims: BTreeMap<u32, BTreeSet<ObjRef>>,
    locals: BTreeMap<u32, LocalState>,
    /// ipBlocks in use by local identities' rules, with their use counts.
    blocks: BTreeMap<Block, usize>,
    /// ipBlock -> the CIDR classes whose addresses it matches.
    block_classes: BTreeMap<Block, Vec<u32>>,
    /// The prefix lengths in CIDRS, longest first (for [`class_of`]).
    class_lens: Vec<u32>,
    /// This node's pods not yet placed (no interface known), with their isolation flags.
    unplaced: BTreeMap<ObjRef, u32>,
    /// Union of `unplaced` flags: the flags of every pending link.
    pending_flags: u32,
    limits: Limits,
    /// policy -> local identity it selects -> the POLICY entries its rules give that
    /// identity (towards every peer, before the merge with other policies' entries; ipBlocks
    /// counted over the policy's own CIDR classes). Every selected local identity has a key.
    counts: BTreeMap<ObjRef, BTreeMap<u32, usize>>,
    /// policy -> the sum of its `counts`.
    totals: BTreeMap<ObjRef, usize>,
    /// Policies over a limit (they isolate, and add no entries).
    closed: BTreeMap<ObjRef, Closed>,
}

impl Incremental {
    /// Compiles `base` (its `node_name` included) with `ids`, which may hold ids reserved from
    /// adopted maps, and the default [`Limits`].
    pub fn new(base: &ClusterSnapshot, ids: IdAllocator) -> Self {
        Self::with_limits(base, ids, Limits::default())
    }

    /// [`Self::new`] with explicit limits on what policies may add.
    pub fn with_limits(base: &ClusterSnapshot, ids: IdAllocator, limits: Limits) -> Self {
        let mut me = Self {
            snap: base.clone(),
            ids,
            out: Out {
                maps: DesiredMaps::default(),
                journal: Journal::default(),
                record: false,
            },
            rules: RuleTable::default(),
            pods: BTreeMap::new(),
            identities: BTreeMap::new(),
            ns_ids: BTreeMap::new(),
            ip_claims: BTreeMap::new(),
            dup_addrs: BTreeSet::new(),
            if_claims: BTreeMap::new(),
            locals: BTreeMap::new(),
            blocks: BTreeMap::new(),
            block_classes: BTreeMap::new(),
            class_lens: Vec::new(),
            unplaced: BTreeMap::new(),
            pending_flags: 0,
            limits,
            counts: BTreeMap::new(),
            totals: BTreeMap::new(),
            closed: BTreeMap::new(),
        };
        // Everything is new: every object is dirty, every policy was absent.
        let d = Dirty {
            all_pods: true,
            all_unplaced: true,
            policies: base.policies.keys().map(|k| (k.clone(), None)).collect(),
            old_node_ips: Some(Vec::new()),
            links: base.pending_links.clone(),
            ..Default::default()
        };
        // The first plan is the caller's to make (against what its maps hold), not a
        // journal of the build.
        me.reconcile(d);
        me.program_services();
        me.out.record = true;
        me
    }

    /// Sets the cluster's Service ranges (SERVICES: egress to them is checked again after the
    /// DNAT). Configuration: no policy entry depends on it.
    pub fn set_service_cidrs(&mut self, cidrs: Vec<IpNet>) -> Plan {
        if self.snap.service_cidrs != cidrs {
            self.snap.service_cidrs = cidrs;
            self.program_services();
        }
        self.out.take_plan()
    }

    fn program_services(&mut self) {
        let want: BTreeMap<Lpm<Addr16>, u32> = self
            .snap
            .service_cidrs
            .iter()
            .map(|net| {
                let p = Prefix::from_net(*net);
                ((p.len, p.addr16()), 1)
            })
            .collect();
        let stale: Vec<Lpm<Addr16>> = self
            .out
            .maps
            .services
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.out.service(k, None);
        }
        for (k, v) in want {
            self.out.service(k, Some(v));
        }
    }

    /// The ground state compiled so far.
    pub fn snapshot(&self) -> &ClusterSnapshot {
        &self.snap
    }

    /// What every map must hold.
    pub fn maps(&self) -> &DesiredMaps {
        &self.out.maps
    }

    /// `PolicyValue::rule_ref` -> the rule it stands for.
    pub fn rules(&self) -> &BTreeMap<u32, RuleRef> {
        &self.rules.refs
    }

    pub fn ids(&self) -> &IdAllocator {
        &self.ids
    }

    /// The owner of an address several pods claim: the first, in namespace/name order, that
    /// is not terminating (a pod being deleted may still hold an address a new pod was
    /// given), else the first.
    fn owner<'a>(&self, claims: &'a BTreeSet<ObjRef>) -> Option<&'a ObjRef> {
        claims
            .iter()
            .find(|o| self.snap.pods.get(*o).is_some_and(|p| !p.terminating))
            .or_else(|| claims.first())
    }

    /// Problems found while compiling (two pods claiming one IP), in a stable order.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for a in &self.dup_addrs {
            let Some(claims) = self.ip_claims.get(a) else {
                continue;
            };
            let Some(first) = self.owner(claims) else {
                continue;
            };
            for obj in claims.iter().filter(|o| *o != first) {
                let ip = self
                    .snap
                    .pods
                    .get(obj)
                    .and_then(|p| p.ips.iter().find(|ip| addr16(**ip) == *a).copied())
                    .unwrap_or_else(|| IpAddr::from(*a));
                out.push(Diagnostic {
                    source: None,
                    object: format!("Pod {obj}"),
                    message: format!(
                        "IP {ip} is already used by pod {first}; this pod is ignored as its owner"
                    ),
                });
            }
        }
        for (obj, why) in &self.closed {
            let n = self.totals.get(obj).copied().unwrap_or(0);
            let message = match why {
                Closed::OverBudget => format!(
                    "needs {n} POLICY entries on this node, over the budget of {} per policy \
                     (MaxPolicyEntries); fails closed: it keeps isolating the pods it selects \
                     and allows nothing",
                    self.limits.max_policy_entries
                ),
                Closed::OverTotal => format!(
                    "needs {n} POLICY entries on this node; with the other policies within \
                     budget that is over the {} the POLICY map holds, and it is among the \
                     largest; fails closed: it keeps isolating the pods it selects and allows \
                     nothing",
                    self.limits.max_total_entries
                ),
            };
            out.push(Diagnostic {
                source: None,
                object: format!("NetworkPolicy {obj}"),
                message,
            });
        }
        out.sort();
        out
    }

    /// Per policy with entries or selected local identities: its entry count and whether it
    /// fails closed.
    pub fn policy_counts(&self) -> BTreeMap<ObjRef, PolicyCount> {
        self.snap
            .policies
            .keys()
            .map(|obj| {
                (
                    obj.clone(),
                    PolicyCount {
                        entries: self.totals.get(obj).copied().unwrap_or(0),
                        closed: self.closed.get(obj).copied(),
                    },
                )
            })
            .collect()
    }

    /// Per local endpoint pod its counter slot, per policy selecting a local identity the
    /// local pods it isolates and its entries: O(local pods x their policies + policies
    /// selecting local identities), no walk over the cluster.
    pub fn local_view(&self) -> super::LocalView {
        use npm_common::maps::COUNTER_SLOTS;
        use npm_common::metrics::SLOT_FIRST;
        let mut pods = Vec::new();
        let mut isolated: BTreeMap<&ObjRef, usize> = BTreeMap::new();
        for (ifindex, claims) in &self.if_claims {
            let Some(obj) = claims.first() else { continue };
            let Some(ep) = self.out.maps.endpoints.get(ifindex) else {
                continue;
            };
            if (SLOT_FIRST..COUNTER_SLOTS).contains(&ep.slot) {
                pods.push((obj.clone(), ep.slot));
            }
            if let Some(st) = self.locals.get(&ep.id) {
                for g in st.groups.iter().filter(|g| g.isolate != 0) {
                    *isolated.entry(&g.policy).or_default() += 1;
                }
            }
        }
        pods.sort();
        let mut policies: BTreeMap<ObjRef, super::PolicyLocal> = self
            .totals
            .iter()
            .map(|(obj, n)| {
                (
                    obj.clone(),
                    super::PolicyLocal {
                        isolated_pods: 0,
                        entries: *n,
                    },
                )
            })
            .collect();
        for (obj, n) in isolated {
            policies.entry(obj.clone()).or_default().isolated_pods = n;
        }
        super::LocalView {
            pods,
            policies: policies.into_iter().collect(),
        }
    }

    /// The policies that fail closed for exceeding a limit.
    pub fn closed_policies(&self) -> &BTreeMap<ObjRef, Closed> {
        &self.closed
    }

    /// Sets (n: Some) or removes one (policy, local identity) count.
    fn set_count(&mut self, obj: &ObjRef, l: u32, n: Option<usize>) {
        let per = self.counts.entry(obj.clone()).or_default();
        let old = match n {
            Some(n) => per.insert(l, n),
            None => per.remove(&l),
        }
        .unwrap_or(0);
        if per.is_empty() {
            self.counts.remove(obj);
        }
        let t = self.totals.entry(obj.clone()).or_insert(0);
        *t = *t - old + n.unwrap_or(0);
        if !self.counts.contains_key(obj) {
            self.totals.remove(obj);
        }
    }

    /// Which policies fail closed, from the counts: those over the per-policy budget, then,
    /// while the rest together exceed the total, the largest of them (ties: the later name).
    fn decide_closed(&self) -> BTreeMap<ObjRef, Closed> {
        let mut closed = BTreeMap::new();
        let mut within: Vec<(usize, &ObjRef)> = Vec::new();
        for (obj, n) in &self.totals {
            if *n > self.limits.max_policy_entries {
                closed.insert(obj.clone(), Closed::OverBudget);
            } else {
                within.push((*n, obj));
            }
        }
        let sum: usize = within.iter().map(|(n, _)| n).sum();
        if sum > self.limits.max_total_entries {
            // Smallest first (ties: name order); from the first that does not fit on, every
            // policy fails closed (they are larger, or as large and later).
            within.sort();
            let (mut used, mut full) = (0usize, false);
            for (n, obj) in within {
                if !full && used + n <= self.limits.max_total_entries {
                    used += n;
                } else {
                    full = true;
                    closed.insert(obj.clone(), Closed::OverTotal);
                }
            }
        }
        closed
    }

    /// Gives the maps, the rule table and the diagnostics, and the allocator back.
    pub fn into_parts(self) -> (super::Compiled, IdAllocator) {
        let diagnostics = self.diagnostics();
        (
            super::Compiled {
                policy_entries: self.policy_counts(),
                maps: self.out.maps,
                rules: self.rules.refs,
                diagnostics,
            },
            self.ids,
        )
    }

    /// Applies a batch of changes and returns the ordered operations that bring maps holding
    /// the previous [`Self::maps`] to the new one. Changes that change nothing are ignored.
    pub fn apply(&mut self, changes: &[Change]) -> Plan {
        self.apply_quiet(changes);
        self.out.take_plan()
    }

    /// Sets this node's name (which pods are "not yet placed" here).
    pub fn set_node_name(&mut self, name: Option<String>) -> Plan {
        if self.snap.node_name != name {
            self.snap.node_name = name;
            self.reconcile(Dirty {
                all_unplaced: true,
                ..Default::default()
            });
        }
        self.out.take_plan()
    }

    fn apply_quiet(&mut self, changes: &[Change]) {
        let mut d = Dirty::default();
        for c in changes {
            match c {
                Change::Policy(obj, _) if !d.policies.contains_key(obj) => {
                    let old = self.snap.policies.get(obj).cloned();
                    d.policies.insert(obj.clone(), old);
                }
                Change::NodeIps(_) if d.old_node_ips.is_none() => {
                    d.old_node_ips = Some(self.snap.node_ips.clone());
                }
                _ => {}
            }
            if !self.snap.apply(c) {
                continue;
            }
            match c {
                Change::Namespace(name, _) => {
                    d.namespaces.insert(name.clone());
                }
                Change::Pod(obj, _) | Change::Local(obj, _) => {
                    d.pods.insert(obj.clone());
                }
                Change::PendingLink(i, _) => {
                    d.links.insert(*i);
                }
                Change::Policy(..) | Change::NodeIps(_) => {}
            }
        }
        self.reconcile(d);
    }

    fn reconcile(&mut self, mut d: Dirty) {
        // A namespace's labels are part of its pods' identities.
        for ns in &d.namespaces {
            d.pods.extend(
                self.snap
                    .pods
                    .range(ObjRef::new(ns.as_str(), "")..)
                    .take_while(|(o, _)| &o.namespace == ns)
                    .map(|(o, _)| o.clone()),
            );
        }

        // 1. Pods: identities, addresses, interfaces.
        // id -> (existed, was local) before this batch.
        let mut touched: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
        let mut addrs: BTreeSet<Addr16> = BTreeSet::new();
        let mut ifs: BTreeSet<u32> = mem::take(&mut d.links);
        let any_pods = !d.pods.is_empty() || (d.all_pods && !self.snap.pods.is_empty());
        if any_pods && self.ids.has_adopted() {
            self.seed_adopted_ids(&d);
        }
        let dirty_pods: Box<dyn Iterator<Item = &ObjRef>> = if d.all_pods {
            Box::new(self.snap.pods.keys().chain(d.pods.iter()))
        } else {
            Box::new(d.pods.iter())
        };
        for obj in dirty_pods {
            if let Some(old) = self.pods.remove(obj) {
                let info = self
                    .identities
                    .get_mut(&old.id)
                    .expect("a compiled pod's identity is known");
                touched
                    .entry(old.id)
                    .or_insert((true, !info.local.is_empty()));
                info.pods -= 1;
                if let Some(i) = old.ifindex {
                    info.local.remove(&(i, obj.clone()));
                    release(&mut self.if_claims, i, obj);
                    ifs.insert(i);
                }
                for a in old.addrs {
                    release(&mut self.ip_claims, a, obj);
                    addrs.insert(a);
                }
            }
            let Some(pod) = self.snap.pods.get(obj).filter(|p| p.is_endpoint()) else {
                continue;
            };
            let key = identity_key(pod, &self.snap);
            let id = self.ids.pod(&key);
            touched.entry(id).or_insert_with(|| {
                self.identities
                    .get(&id)
                    .map_or((false, false), |i| (true, !i.local.is_empty()))
            });
            let info = self.identities.entry(id).or_insert_with(|| IdentityInfo {
                key,
                pods: 0,
                local: BTreeSet::new(),
            });
            info.pods += 1;
            let ifindex = self.snap.local.get(obj).copied();
            if let Some(i) = ifindex {
                info.local.insert((i, obj.clone()));
                self.if_claims.entry(i).or_default().insert(obj.clone());
                ifs.insert(i);
            }
            let mut pa: Vec<Addr16> = pod.ips.iter().map(|ip| addr16(*ip)).collect();
            pa.sort_unstable();
            pa.dedup();
            for a in &pa {
                self.ip_claims.entry(*a).or_default().insert(obj.clone());
                addrs.insert(*a);
            }
            self.pods.insert(
                obj.clone(),
                PodState {
                    id,
                    addrs: pa,
                    ifindex,
                },
            );
        }

        // 2. Identities that appeared, vanished, became local or stopped being local.
        let mut appeared = Vec::new();
        let mut vanished = Vec::new();
        // The keys of vanished identities (their counts towards each local identity go).
        let mut vanished_keys: BTreeMap<u32, IdentityKey> = BTreeMap::new();
        let mut counts_changed = false;
        let mut recompute: BTreeSet<u32> = BTreeSet::new();
        let mut blocks_changed = false;
        for (&id, &(existed, was_local)) in &touched {
            let (exists, is_local) = self
                .identities
                .get(&id)
                .map_or((false, false), |i| (i.pods > 0, !i.local.is_empty()));
            if !exists {
                if let Some(info) = self.identities.remove(&id) {
                    self.ids.forget_pod(&info.key);
                    if let Some(s) = self.ns_ids.get_mut(&info.key.namespace) {
                        s.remove(&id);
                        if s.is_empty() {
                            self.ns_ids.remove(&info.key.namespace);
                        }
                    }
                    if existed {
                        vanished_keys.insert(id, info.key);
                    }
                }
                if existed {
                    vanished.push(id);
                }
            } else if !existed {
                appeared.push(id);
                let ns = self.identities[&id].key.namespace.clone();
                self.ns_ids.entry(ns).or_default().insert(id);
            }
            if was_local && !is_local {
                if let Some(st) = self.locals.remove(&id) {
                    for e in st.entries.values() {
                        self.out.replace(Some(e), None);
                    }
                    for b in st.blocks() {
                        blocks_changed |= unref_block(&mut self.blocks, &b.block);
                    }
                    for g in &st.groups {
                        self.set_count(&g.policy, id, None);
                        counts_changed = true;
                    }
                }
            } else if !was_local && is_local {
                recompute.insert(id);
            }
        }

        // 3. Policies: renumber their rules; their namespace's selected local identities
        //    (by the old or the new version) recompile.
        let mut policy_namespaces: BTreeSet<String> = BTreeSet::new();
        for (obj, old) in &d.policies {
            let new = self.snap.policies.get(obj);
            if old.as_ref() == new {
                continue;
            }
            self.rules.sync(obj, new);
            policy_namespaces.insert(obj.namespace.clone());
            for id in self.ns_ids.get(&obj.namespace).into_iter().flatten() {
                if !self.locals.contains_key(id) {
                    continue;
                }
                let labels = &self.identities[id].key.labels;
                if old.as_ref().is_some_and(|p| p.pod_selector.matches(labels))
                    || new.is_some_and(|p| p.pod_selector.matches(labels))
                {
                    recompute.insert(*id);
                }
            }
        }
        // The open policies' blocks of each local identity whose rules are replaced or whose
        // policies open or close, as they were (their uses are given back below).
        let mut old_blocks: BTreeMap<u32, Vec<Block>> = BTreeMap::new();
        for id in &recompute {
            let key = &self.identities[id].key;
            let groups = local_rules(&self.snap, &self.rules, key);
            let counted: Vec<(ObjRef, usize)> = groups
                .iter()
                .map(|g| {
                    let n = count_entries(g, key, &self.identities, &self.ns_ids);
                    (g.policy.clone(), n)
                })
                .collect();
            let st = self.locals.entry(*id).or_default();
            old_blocks.insert(*id, st.blocks().map(|b| b.block.clone()).collect());
            let old: Vec<ObjRef> = mem::replace(&mut st.groups, groups)
                .into_iter()
                .map(|g| g.policy)
                .collect();
            for obj in old {
                self.set_count(&obj, *id, None);
            }
            for (obj, n) in counted {
                self.set_count(&obj, *id, Some(n));
            }
            counts_changed = true;
        }
        // Identities that appeared or vanished change the counts of the other local
        // identities' policies that match them.
        if !appeared.is_empty() || !vanished_keys.is_empty() {
            let mut delta: BTreeMap<(ObjRef, u32), (usize, usize)> = BTreeMap::new();
            for (l, st) in &self.locals {
                if recompute.contains(l) {
                    continue;
                }
                let me = &self.identities[l].key;
                for g in st
                    .groups
                    .iter()
                    .filter(|g| g.rules.iter().any(|r| r.pod_peers))
                {
                    let (mut add, mut sub) = (0, 0);
                    for p in &appeared {
                        add += count_pod_entries(&g.rules, me, &self.identities[p].key);
                    }
                    for other in vanished_keys.values() {
                        sub += count_pod_entries(&g.rules, me, other);
                    }
                    if add != sub {
                        delta.insert((g.policy.clone(), *l), (add, sub));
                    }
                }
            }
            for ((obj, l), (add, sub)) in delta {
                let n = (self.counts[&obj][&l] + add).saturating_sub(sub);
                self.set_count(&obj, l, Some(n));
                counts_changed = true;
            }
        }
        // Policies that open or close: the local identities they select recompile.
        if counts_changed {
            let closed = self.decide_closed();
            let flipped: Vec<ObjRef> = closed
                .keys()
                .filter(|o| !self.closed.contains_key(*o))
                .chain(self.closed.keys().filter(|o| !closed.contains_key(*o)))
                .cloned()
                .collect();
            self.closed = closed;
            for obj in flipped {
                for l in self.counts.get(&obj).into_iter().flat_map(|c| c.keys()) {
                    if let Some(st) = self.locals.get(l)
                        && !old_blocks.contains_key(l)
                    {
                        old_blocks.insert(*l, st.blocks().map(|b| b.block.clone()).collect());
                        recompute.insert(*l);
                    }
                }
            }
        }
        for id in &recompute {
            let info = &self.identities[id];
            let st = self
                .locals
                .get_mut(id)
                .expect("recomputed identities are local");
            let mut flags = 0;
            for g in &mut st.groups {
                g.open = !self.closed.contains_key(&g.policy);
                flags |= g.isolate;
            }
            // Class entries exist only in the directions that have block allows.
            for b in st.blocks() {
                flags |= if b.dir == DIR_INGRESS {
                    EP_CLASS_INGRESS
                } else {
                    EP_CLASS_EGRESS
                };
            }
            for b in old_blocks.remove(id).unwrap_or_default() {
                blocks_changed |= unref_block(&mut self.blocks, &b);
            }
            for b in st.blocks() {
                let n = self.blocks.entry(b.block.clone()).or_insert(0);
                *n += 1;
                blocks_changed |= *n == 1;
            }
            if st.flags != flags {
                ifs.extend(info.local.iter().map(|(i, _)| *i));
            }
            st.flags = flags;
        }

        // 4. CIDR classes, when the set of ipBlocks in use changed.
        let mut class_dirty: Vec<u32> = Vec::new();
        if blocks_changed {
            self.recompute_classes();
            class_dirty = self
                .locals
                .iter()
                .filter(|(id, st)| st.blocks().next().is_some() && !recompute.contains(id))
                .map(|(id, _)| *id)
                .collect();
        }

        // 5. POLICY entries.
        for id in &recompute {
            self.full_entries(*id);
        }
        for id in &class_dirty {
            self.class_entries(*id);
        }
        for p in &vanished {
            for (l, st) in &mut self.locals {
                if recompute.contains(l) {
                    continue;
                }
                if let Some(old) = st.entries.remove(p) {
                    self.out.replace(Some(&old), None);
                }
            }
        }
        for p in &appeared {
            let other = &self.identities[p].key;
            for (l, st) in &mut self.locals {
                if recompute.contains(l) {
                    continue;
                }
                let me = &self.identities[l].key;
                let e = pod_entries(st.rules(), *l, me, *p, other);
                if !e.is_empty() {
                    self.out.replace(None, Some(&e));
                    st.entries.insert(*p, e);
                }
            }
        }

        // 6. This node's not-yet-placed pods and the pending links' flags.
        if d.all_unplaced {
            self.unplaced.clear();
            for (obj, p) in &self.snap.pods {
                if is_unplaced(&self.snap, p) {
                    let f = isolation(&self.snap, &p.namespace, &p.labels);
                    self.unplaced.insert(obj.clone(), f);
                }
            }
        } else {
            let mut unplaced_dirty: BTreeSet<ObjRef> = mem::take(&mut d.pods);
            for ns in &policy_namespaces {
                unplaced_dirty.extend(
                    self.unplaced
                        .range(ObjRef::new(ns.as_str(), "")..)
                        .take_while(|(o, _)| &o.namespace == ns)
                        .map(|(o, _)| o.clone()),
                );
            }
            for obj in unplaced_dirty {
                match self
                    .snap
                    .pods
                    .get(&obj)
                    .filter(|p| is_unplaced(&self.snap, p))
                {
                    Some(p) => {
                        let f = isolation(&self.snap, &p.namespace, &p.labels);
                        self.unplaced.insert(obj, f);
                    }
                    None => {
                        self.unplaced.remove(&obj);
                    }
                }
            }
        }
        let pending_flags = self.unplaced.values().fold(0, |a, f| a | f);
        if pending_flags != self.pending_flags {
            self.pending_flags = pending_flags;
            ifs.extend(self.snap.pending_links.iter().copied());
        }

        // 7. ENDPOINTS of the touched interfaces; each interface in ENDPOINTS holds a counter
        //    slot from when it appears until it goes.
        for i in ifs {
            let v = match self.if_claims.get(&i).and_then(|s| s.first()) {
                Some(obj) => {
                    let id = self.pods[obj].id;
                    Some((id, self.locals.get(&id).map_or(0, |s| s.flags)))
                }
                None if self.snap.pending_links.contains(&i) => {
                    Some((ID_PENDING, self.pending_flags))
                }
                None => None,
            };
            let v = match v {
                Some((id, flags)) => Some(EndpointInfo {
                    id,
                    flags,
                    slot: self.ids.slots.get_or_alloc(i),
                }),
                None => {
                    self.ids.slots.release(i);
                    None
                }
            };
            self.out.endpoint(i, v);
        }

        // 8. IDENTITIES of the touched addresses.
        if let Some(old) = d.old_node_ips.take() {
            addrs.extend(old.iter().map(|ip| addr16(*ip)));
            addrs.extend(self.snap.node_ips.iter().map(|ip| addr16(*ip)));
        }
        let node: BTreeSet<Addr16> = self.snap.node_ips.iter().map(|ip| addr16(*ip)).collect();
        for a in addrs {
            let claims = self.ip_claims.get(&a);
            if claims.is_some_and(|c| c.len() > 1) {
                self.dup_addrs.insert(a);
            } else {
                self.dup_addrs.remove(&a);
            }
            let v = if node.contains(&a) {
                Some(PeerInfo {
                    id: 0,
                    ifindex: 0,
                    flags: PEER_HOST,
                    // Host traffic is allowed before any class is looked at.
                    class: 0,
                })
            } else {
                claims.and_then(|c| self.owner(c)).map(|o| {
                    let p = &self.pods[o];
                    PeerInfo {
                        id: p.id,
                        ifindex: p.ifindex.unwrap_or(0),
                        flags: 0,
                        class: class_of(&self.out.maps.cidrs, &self.class_lens, a),
                    }
                })
            };
            self.out.identity(a, v);
        }
        // Adopted ids are offered to the first compile that places pods only.
        if any_pods {
            self.ids.forget_adopted();
        }
    }

    /// Offers the adopted ids to the identities of the dirty pods that have none yet: each
    /// address votes for the id IDENTITIES gave it, each interface for the id ENDPOINTS gave
    /// it, both on behalf of the pod that owns it now (the same rules as the maps': the first
    /// claimant in name order, not terminating first). See [`IdAllocator::seed_pods`].
    fn seed_adopted_ids(&mut self, d: &Dirty) {
        let objs: Box<dyn Iterator<Item = &ObjRef>> = if d.all_pods {
            Box::new(self.snap.pods.keys().chain(d.pods.iter()))
        } else {
            Box::new(d.pods.iter())
        };
        let mut keys: BTreeMap<&ObjRef, IdentityKey> = BTreeMap::new();
        let mut addr_claims: BTreeMap<Addr16, BTreeSet<ObjRef>> = BTreeMap::new();
        let mut if_claims: BTreeMap<u32, &ObjRef> = BTreeMap::new();
        for obj in objs {
            let Some(pod) = self.snap.pods.get(obj).filter(|p| p.is_endpoint()) else {
                continue;
            };
            if keys.contains_key(obj) {
                continue;
            }
            keys.insert(obj, identity_key(pod, &self.snap));
            for ip in &pod.ips {
                addr_claims
                    .entry(addr16(*ip))
                    .or_default()
                    .insert(obj.clone());
            }
            if let Some(i) = self.snap.local.get(obj) {
                if_claims
                    .entry(*i)
                    .and_modify(|o| *o = (*o).min(obj))
                    .or_insert(obj);
            }
        }
        let mut votes: BTreeMap<IdentityKey, BTreeMap<u32, usize>> = BTreeMap::new();
        let mut vote = |owner: &ObjRef, id: Option<u32>| {
            if let (Some(id), Some(key)) = (id, keys.get(owner))
                && !self.ids.knows_pod(key)
            {
                *votes.entry(key.clone()).or_default().entry(id).or_default() += 1;
            }
        };
        for (a, claims) in &addr_claims {
            if let Some(owner) = self.owner(claims) {
                vote(owner, self.ids.adopted_addr(a));
            }
        }
        for (i, owner) in &if_claims {
            vote(owner, self.ids.adopted_ifindex(*i));
        }
        self.ids.seed_pods(&votes);
    }

    /// Recomputes the CIDR classes of the ipBlocks in use, the CIDRS map and which classes
    /// each block matches.
    fn recompute_classes(&mut self) {
        let blocks: Vec<Block> = self.blocks.keys().cloned().collect();
        let classes = peers::classes(&blocks);
        if self.ids.has_adopted() {
            // Each prefix votes for the class id adopted CIDRS gave it.
            let mut votes: BTreeMap<BTreeSet<Block>, BTreeMap<u32, usize>> = BTreeMap::new();
            for (prefix, set) in &classes {
                let key: BTreeSet<Block> = set.iter().map(|i| blocks[*i].clone()).collect();
                let v = votes.entry(key).or_default();
                if let Some(id) = self.ids.adopted_prefix(&(prefix.len, prefix.addr16())) {
                    *v.entry(id).or_default() += 1;
                }
            }
            self.ids.seed_classes(&votes);
        }
        let mut cidrs: BTreeMap<Lpm<Addr16>, u32> = BTreeMap::new();
        let mut members: BTreeMap<Block, Vec<u32>> = BTreeMap::new();
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for (prefix, set) in &classes {
            let key: BTreeSet<Block> = set.iter().map(|i| blocks[*i].clone()).collect();
            let id = self.ids.class(&key);
            debug_assert!(id & CIDR_CLASS_BIT != 0);
            used.insert(id);
            cidrs.insert((prefix.len, prefix.addr16()), id);
            for i in set {
                members.entry(blocks[*i].clone()).or_default().push(id);
            }
        }
        for m in members.values_mut() {
            m.sort_unstable();
            m.dedup();
        }
        let stale: Vec<BTreeSet<Block>> = self
            .ids
            .class_ids()
            .filter(|(_, id)| !used.contains(id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            self.ids.forget_class(k);
        }
        let gone: Vec<Lpm<Addr16>> = self
            .out
            .maps
            .cidrs
            .keys()
            .filter(|k| !cidrs.contains_key(k))
            .copied()
            .collect();
        // Prefixes whose class changed (gone, new, or another id): the addresses inside them
        // may have another class now.
        let mut changed: Vec<Lpm<Addr16>> = gone.clone();
        for k in gone {
            self.out.cidr(k, None);
        }
        for (k, v) in &cidrs {
            if self.out.maps.cidrs.get(k) != Some(v) {
                changed.push(*k);
            }
            self.out.cidr(*k, Some(*v));
        }
        self.block_classes = members;
        let mut lens: Vec<u32> = cidrs.keys().map(|(len, _)| *len).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
        self.class_lens = lens;
        self.refresh_peer_classes(&changed);
    }

    /// Rewrites `PeerInfo::class` of every known address inside one of `prefixes` (CIDRS
    /// entries that changed), from the current CIDRS. Touches only those addresses: each
    /// prefix is one contiguous range of the address-ordered IDENTITIES.
    fn refresh_peer_classes(&mut self, prefixes: &[Lpm<Addr16>]) {
        let mut addrs: BTreeSet<Addr16> = BTreeSet::new();
        for (len, p) in prefixes {
            let lo = u128::from_be_bytes(*p);
            let host = if *len >= 128 { 0 } else { u128::MAX >> len };
            let (lo, hi) = ((lo & !host).to_be_bytes(), (lo | host).to_be_bytes());
            addrs.extend(self.out.maps.identities.range(lo..=hi).map(|(a, _)| *a));
        }
        for a in addrs {
            let Some(mut v) = self.out.maps.identities.get(&a).copied() else {
                continue;
            };
            if v.flags & PEER_HOST != 0 {
                continue;
            }
            v.class = class_of(&self.out.maps.cidrs, &self.class_lens, a);
            self.out.identity(a, Some(v));
        }
    }

    /// Recomputes every entry of local identity `l`.
    fn full_entries(&mut self, l: u32) {
        let Some(st) = self.locals.get_mut(&l) else {
            return;
        };
        let me = &self.identities[&l].key;
        let mut new: BTreeMap<u32, Entries> = BTreeMap::new();
        if st.rules().any(|r| r.pod_peers) {
            let all = st.rules().any(|r| r.all_namespaces);
            let candidates: Box<dyn Iterator<Item = &u32>> = if all {
                Box::new(self.identities.keys())
            } else {
                Box::new(self.ns_ids.get(&me.namespace).into_iter().flatten())
            };
            for p in candidates {
                let e = pod_entries(st.rules(), l, me, *p, &self.identities[p].key);
                if !e.is_empty() {
                    new.insert(*p, e);
                }
            }
        }
        new.extend(class_entries(st.blocks(), l, me, &self.block_classes));
        let old = mem::take(&mut st.entries);
        for (peer, e) in &old {
            self.out.replace(Some(e), new.get(peer));
        }
        for (peer, e) in &new {
            if !old.contains_key(peer) {
                self.out.replace(None, Some(e));
            }
        }
        st.entries = new;
    }

    /// Recomputes the class entries of local identity `l` (the classes changed).
    fn class_entries(&mut self, l: u32) {
        let Some(st) = self.locals.get_mut(&l) else {
            return;
        };
        let me = &self.identities[&l].key;
        let new = class_entries(st.blocks(), l, me, &self.block_classes);
        let old: Vec<u32> = st
            .entries
            .range(CIDR_CLASS_BIT..)
            .map(|(c, _)| *c)
            .collect();
        for c in old {
            if !new.contains_key(&c)
                && let Some(e) = st.entries.remove(&c)
            {
                self.out.replace(Some(&e), None);
            }
        }
        for (c, e) in new {
            self.out.replace(st.entries.get(&c), Some(&e));
            st.entries.insert(c, e);
        }
    }
}

/// Removes `obj` from the claims on `k`.
fn release<K: Ord>(claims: &mut BTreeMap<K, BTreeSet<ObjRef>>, k: K, obj: &ObjRef) {
    if let Some(s) = claims.get_mut(&k) {
        s.remove(obj);
        if s.is_empty() {
            claims.remove(&k);
        }
    }
}

/// Drops one use of a block; true when it was the last.
fn unref_block(blocks: &mut BTreeMap<Block, usize>, b: &Block) -> bool {
    match blocks.get_mut(b) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            blocks.remove(b);
            true
        }
        None => false,
    }
}

fn identity_key(pod: &Pod, snap: &ClusterSnapshot) -> IdentityKey {
    let mut named: Vec<_> = pod
        .ports
        .iter()
        .filter(|p| p.name.is_some())
        .cloned()
        .collect();
    named.sort();
    named.dedup();
    IdentityKey {
        namespace: pod.namespace.clone(),
        namespace_labels: snap
            .namespaces
            .get(&pod.namespace)
            .map(|n| n.labels.clone())
            .unwrap_or_default(),
        labels: pod.labels.clone(),
        named_ports: named,
    }
}

/// A pod of this node that has no known interface yet (it may have no IP yet).
fn is_unplaced(snap: &ClusterSnapshot, pod: &Pod) -> bool {
    snap.node_name.is_some()
        && pod.node_name == snap.node_name
        && !pod.host_network
        && !pod.terminating
        && !pod.finished
        && !snap.local.contains_key(&pod.obj_ref())
}

/// The policies of `ns` that select `labels`, in name order.
fn selecting<'a>(
    snap: &'a ClusterSnapshot,
    ns: &'a str,
    labels: &'a Labels,
) -> impl Iterator<Item = (&'a ObjRef, &'a Policy)> + 'a {
    snap.policies
        .range(ObjRef::new(ns, "")..)
        .take_while(move |(o, _)| o.namespace == ns)
        .filter(move |(_, p)| p.pod_selector.matches(labels))
}

/// The isolation flags of a pod with `labels` in `ns`.
fn isolation(snap: &ClusterSnapshot, ns: &str, labels: &Labels) -> u32 {
    selecting(snap, ns, labels).fold(0, |f, (_, p)| {
        f | if p.ingress.is_some() {
            EP_ISOLATE_INGRESS
        } else {
            0
        } | if p.egress.is_some() {
            EP_ISOLATE_EGRESS
        } else {
            0
        }
    })
}

/// The rules and block allows of every policy selecting a local identity, per policy in name
/// order (all open: the caller decides).
fn local_rules(snap: &ClusterSnapshot, table: &RuleTable, key: &IdentityKey) -> Vec<PolicyRules> {
    let mut groups = Vec::new();
    for (obj, policy) in selecting(snap, &key.namespace, &key.labels) {
        let mut flags = 0;
        let mut uses = Vec::new();
        let mut blocks = Vec::new();
        for (dir, rules, bit) in [
            (DIR_INGRESS, &policy.ingress, EP_ISOLATE_INGRESS),
            (DIR_EGRESS, &policy.egress, EP_ISOLATE_EGRESS),
        ] {
            let Some(rules) = rules else { continue };
            flags |= bit;
            for (i, rule) in rules.iter().enumerate() {
                let rule_ref = table.get(obj, dir, i);
                let named = rule
                    .ports
                    .iter()
                    .any(|p| matches!(p.port, Some(PortRef::Name(_))));
                let any_peer_named = rule.peers.is_empty() && dir == DIR_EGRESS && named;
                if rule.peers.is_empty() {
                    // Any peer: every address, through the classes of 0.0.0.0/0 and ::/0.
                    for block in Block::any() {
                        blocks.push(BlockAllow {
                            block,
                            dir,
                            rule_ref,
                            ports: rule.ports.clone(),
                        });
                    }
                }
                for peer in &rule.peers {
                    if let Peer::IpBlock { cidr, except } = peer {
                        blocks.push(BlockAllow {
                            block: Block::new(*cidr, except),
                            dir,
                            rule_ref,
                            ports: rule.ports.clone(),
                        });
                    }
                }
                uses.push(RuleUse {
                    dir,
                    rule_ref,
                    policy_ns: policy.namespace.clone(),
                    pod_peers: any_peer_named
                        || rule.peers.iter().any(|p| matches!(p, Peer::Pods { .. })),
                    all_namespaces: any_peer_named
                        || rule.peers.iter().any(|p| {
                            matches!(
                                p,
                                Peer::Pods {
                                    namespace_selector: Some(_),
                                    ..
                                }
                            )
                        }),
                    any_peer_named,
                    rule: rule.clone(),
                });
            }
        }
        groups.push(PolicyRules {
            policy: obj.clone(),
            isolate: flags,
            rules: uses,
            blocks,
            open: true,
        });
    }
    groups
}

/// Adds an entry unless the key is already there (the first rule in order names it).
fn insert_first(e: &mut Entries, local: u32, peer: u32, dir: u8, p: PortPrefix, rule_ref: u32) {
    let (proto, len, port) = p;
    let key = PolicyKey {
        local_id: local,
        peer_id: peer,
        dir,
        proto,
        dport_be: port.to_be(),
    };
    e.entry((len, key))
        .or_insert(PolicyValue { rule_ref, flags: 0 });
}

/// Does rule `ru` allow pod identity `other` as a peer?
fn hits(ru: &RuleUse, other: &IdentityKey) -> bool {
    ru.pod_peers
        && (ru.any_peer_named
            || ru.rule.peers.iter().any(|peer| match peer {
                Peer::Pods {
                    namespace_selector,
                    pod_selector,
                } => {
                    let ns_ok = match namespace_selector {
                        None => other.namespace == ru.policy_ns,
                        Some(sel) => sel.matches(&other.namespace_labels),
                    };
                    ns_ok
                        && pod_selector
                            .as_ref()
                            .is_none_or(|s| s.matches(&other.labels))
                }
                Peer::IpBlock { .. } => false,
            }))
}

/// entries(L, P) for a pod identity P, from `rules` (in order: the first names an entry).
fn pod_entries<'a>(
    rules: impl Iterator<Item = &'a RuleUse>,
    l: u32,
    me: &IdentityKey,
    p: u32,
    other: &IdentityKey,
) -> Entries {
    let mut e = Entries::new();
    for ru in rules {
        if !hits(ru, other) {
            continue;
        }
        // Named ports resolve on the destination: the local pod for ingress, the peer for egress.
        let dest = if ru.dir == DIR_INGRESS {
            &me.named_ports
        } else {
            &other.named_ports
        };
        for pp in port_prefixes(&ru.rule.ports, Some(dest)) {
            insert_first(&mut e, l, p, ru.dir, pp, ru.rule_ref);
        }
    }
    e
}

/// The CIDR class of `a`: the class of the longest prefix in `cidrs` that contains it (what
/// the datapath's CIDRS lookup returns), 0 when none does. `lens`: the prefix lengths in
/// `cidrs`, longest first.
fn class_of(cidrs: &BTreeMap<Lpm<Addr16>, u32>, lens: &[u32], a: Addr16) -> u32 {
    let addr = u128::from_be_bytes(a);
    lens.iter()
        .find_map(|&len| {
            let host = if len >= 128 { 0 } else { u128::MAX >> len };
            cidrs.get(&(len, (addr & !host).to_be_bytes())).copied()
        })
        .unwrap_or(0)
}

/// entries(L, C) for every CIDR class C, from `blocks`.
fn class_entries<'a>(
    blocks: impl Iterator<Item = &'a BlockAllow>,
    l: u32,
    me: &IdentityKey,
    block_classes: &BTreeMap<Block, Vec<u32>>,
) -> BTreeMap<u32, Entries> {
    let mut out: BTreeMap<u32, Entries> = BTreeMap::new();
    for ba in blocks {
        // Named ports: the local pod's for ingress; an address range has none (egress).
        let dest = (ba.dir == DIR_INGRESS).then_some(me.named_ports.as_slice());
        let prefixes = port_prefixes(&ba.ports, dest);
        if prefixes.is_empty() {
            continue;
        }
        for c in block_classes.get(&ba.block).into_iter().flatten() {
            let e = out.entry(*c).or_default();
            for pp in &prefixes {
                insert_first(e, l, *c, ba.dir, *pp, ba.rule_ref);
            }
        }
    }
    out
}

/// The POLICY entries one policy's `rules` give local identity `me` towards pod identity
/// `other`: |entries(L, P)| of this policy alone. Counts distinct (direction, port prefix)
/// without building the entries.
fn count_pod_entries(rules: &[RuleUse], me: &IdentityKey, other: &IdentityKey) -> usize {
    let mut seen: BTreeSet<(u8, PortPrefix)> = BTreeSet::new();
    for ru in rules.iter().filter(|ru| hits(ru, other)) {
        let dest = if ru.dir == DIR_INGRESS {
            &me.named_ports
        } else {
            &other.named_ports
        };
        seen.extend(
            port_prefixes(&ru.rule.ports, Some(dest))
                .into_iter()
                .map(|p| (ru.dir, p)),
        );
    }
    seen.len()
}

/// The POLICY entries of one policy for local identity `l`: towards every pod identity, and
/// towards the CIDR classes its own ipBlocks make (so the count does not depend on other
/// policies' ipBlocks). Deterministic; the work grows with (peers × rules), not with the
/// entries: peers whose matching rules and destination ports are alike are counted once.
fn count_entries(
    g: &PolicyRules,
    me: &IdentityKey,
    identities: &BTreeMap<u32, IdentityInfo>,
    ns_ids: &BTreeMap<String, BTreeSet<u32>>,
) -> usize {
    let mut n = 0usize;
    if g.rules.iter().any(|r| r.pod_peers) {
        let all = g.rules.iter().any(|r| r.all_namespaces);
        let candidates: Box<dyn Iterator<Item = &u32>> = if all {
            Box::new(identities.keys())
        } else {
            Box::new(ns_ids.get(&me.namespace).into_iter().flatten())
        };
        // (rules hit, the destination's named ports when an egress rule hit names ports)
        let mut memo: HashMap<(Vec<usize>, Option<&[ContainerPort]>), usize> = HashMap::new();
        for p in candidates {
            let other = &identities[p].key;
            let hit: Vec<usize> = (0..g.rules.len())
                .filter(|i| hits(&g.rules[*i], other))
                .collect();
            if hit.is_empty() {
                continue;
            }
            let named_egress = hit.iter().any(|i| {
                let ru = &g.rules[*i];
                ru.dir == DIR_EGRESS
                    && ru
                        .rule
                        .ports
                        .iter()
                        .any(|p| matches!(p.port, Some(PortRef::Name(_))))
            });
            let dest = named_egress.then_some(other.named_ports.as_slice());
            n += *memo
                .entry((hit, dest))
                .or_insert_with(|| count_pod_entries(&g.rules, me, other));
        }
    }
    if !g.blocks.is_empty() {
        let mut own: Vec<Block> = g.blocks.iter().map(|b| b.block.clone()).collect();
        own.sort();
        own.dedup();
        // own block -> the allows with that block.
        let mut allows_of: Vec<Vec<usize>> = vec![Vec::new(); own.len()];
        for (i, b) in g.blocks.iter().enumerate() {
            if let Ok(k) = own.binary_search(&b.block) {
                allows_of[k].push(i);
            }
        }
        let mut memo: HashMap<Vec<usize>, usize> = HashMap::new();
        // A class is a set of blocks (prefixes with the same set share one class id).
        let sets: BTreeSet<BTreeSet<usize>> = peers::classes(&own).into_values().collect();
        for set in sets {
            // The allows whose block matches this class.
            let mut allows: Vec<usize> = set
                .iter()
                .flat_map(|b| allows_of[*b].iter().copied())
                .collect();
            if allows.is_empty() {
                continue;
            }
            allows.sort_unstable();
            n += *memo.entry(allows).or_insert_with_key(|allows| {
                let mut seen: BTreeSet<(u8, PortPrefix)> = BTreeSet::new();
                for ba in allows.iter().map(|i| &g.blocks[*i]) {
                    let dest = (ba.dir == DIR_INGRESS).then_some(me.named_ports.as_slice());
                    seen.extend(
                        port_prefixes(&ba.ports, dest)
                            .into_iter()
                            .map(|p| (ba.dir, p)),
                    );
                }
                seen.len()
            });
        }
    }
    n
}
