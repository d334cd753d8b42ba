//! A pure diff between two [`DesiredMaps`], ordered make-before-break.
//!
//! Order, and why:
//! 1. POLICY upserts, then PAIRS upserts: allow entries for identities/classes that are about
//!    to appear exist before anything points at them. A pair is what the datapath reads first
//!    (its inline entries, or "ask the trie"), so it is written after the trie entries it may
//!    send the datapath to; a changed pair switches in one atomic map update.
//! 2. CIDRS upserts, 3. IDENTITIES upserts: an address switches to its new class/identity in
//!    one atomic map update, and the entries of the new one are already there.
//! 4. ENDPOINTS upserts: isolation flags and local identities switch last, when every entry
//!    they need is present (a newly isolated pod never loses an allowed path mid-update).
//! 5. ENDPOINTS, 6. IDENTITIES, 7. CIDRS, 8. PAIRS, then POLICY deletes: nothing points at
//!    what is removed (a pair goes before the trie entries it may send the datapath to).
//!
//! SERVICES (the Service ranges) are independent of the rest: removals first, then additions,
//! after everything else. (The agent attaches the post-DNAT program before it adds a range.)
//!
//! Counter slots: an ENDPOINTS upsert that gives an interface a slot it did not hold is
//! preceded by `ResetCounters(slot)` (its counts move to the retired slot, and it starts from
//! zero before anything counts under it for this interface); a slot that no interface holds
//! any more is reset after the deletes, so its counts stay in the totals.
//!
//! Identity and class ids are never reused while an entry may still hold them (the compiler's
//! allocator guarantees it), so stale entries left during the window never grant anything new.
use std::collections::{BTreeMap, BTreeSet};

use npm_common::maps::{
    Addr16, EndpointInfo, PairKey, PairValue, PeerInfo, PolicyKey, PolicyValue,
};
use npm_common::metrics::SLOT_FIRST;

use crate::compiler::DesiredMaps;
use crate::compiler::desired::Lpm;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertPolicy(Lpm<PolicyKey>, PolicyValue),
    UpsertPair(PairKey, PairValue),
    UpsertCidr(Lpm<Addr16>, u32),
    UpsertIdentity(Addr16, PeerInfo),
    UpsertEndpoint(u32, EndpointInfo),
    DeleteEndpoint(u32),
    DeleteIdentity(Addr16),
    DeleteCidr(Lpm<Addr16>),
    DeletePair(PairKey),
    DeletePolicy(Lpm<PolicyKey>),
    UpsertService(Lpm<Addr16>, u32),
    DeleteService(Lpm<Addr16>),
    /// Adds the counters of a slot to `SLOT_RETIRED` and zeroes them (METRICS; nothing in
    /// [`DesiredMaps`]).
    ResetCounters(u32),
}

impl Op {
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::DeleteEndpoint(_)
                | Op::DeleteIdentity(_)
                | Op::DeleteCidr(_)
                | Op::DeletePair(_)
                | Op::DeletePolicy(_)
                | Op::DeleteService(_)
        )
    }

    /// The name of the map the operation writes (`npm_common::maps::MAP_*`).
    pub fn map(&self) -> &'static str {
        use npm_common::maps::{
            MAP_CIDRS, MAP_ENDPOINTS, MAP_IDENTITIES, MAP_METRICS, MAP_PAIRS, MAP_POLICY,
            MAP_SERVICES,
        };
        match self {
            Op::UpsertPolicy(..) | Op::DeletePolicy(_) => MAP_POLICY,
            Op::UpsertPair(..) | Op::DeletePair(_) => MAP_PAIRS,
            Op::UpsertCidr(..) | Op::DeleteCidr(_) => MAP_CIDRS,
            Op::UpsertIdentity(..) | Op::DeleteIdentity(_) => MAP_IDENTITIES,
            Op::UpsertEndpoint(..) | Op::DeleteEndpoint(_) => MAP_ENDPOINTS,
            Op::UpsertService(..) | Op::DeleteService(_) => MAP_SERVICES,
            Op::ResetCounters(_) => MAP_METRICS,
        }
    }

    /// Applies the operation to an in-memory copy of the maps.
    pub fn apply_to(&self, maps: &mut DesiredMaps) {
        match self {
            Op::UpsertPolicy(k, v) => {
                maps.policy.insert(*k, *v);
            }
            Op::UpsertPair(k, v) => {
                maps.pairs.insert(*k, *v);
            }
            Op::DeletePair(k) => {
                maps.pairs.remove(k);
            }
            Op::UpsertCidr(k, v) => {
                maps.cidrs.insert(*k, *v);
            }
            Op::UpsertIdentity(k, v) => {
                maps.identities.insert(*k, *v);
            }
            Op::UpsertEndpoint(k, v) => {
                maps.endpoints.insert(*k, *v);
            }
            Op::DeleteEndpoint(k) => {
                maps.endpoints.remove(k);
            }
            Op::DeleteIdentity(k) => {
                maps.identities.remove(k);
            }
            Op::DeleteCidr(k) => {
                maps.cidrs.remove(k);
            }
            Op::DeletePolicy(k) => {
                maps.policy.remove(k);
            }
            Op::UpsertService(k, v) => {
                maps.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                maps.services.remove(k);
            }
            Op::ResetCounters(_) => {}
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Entries of `desired` that `current` lacks or holds with another value, and keys of
/// `current` that `desired` lacks.
fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let upserts = desired
        .iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let deletes = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    (upserts, deletes)
}

/// The ordered operations that turn `current` into `desired`.
pub fn plan(current: &DesiredMaps, desired: &DesiredMaps) -> Plan {
    let (pol_up, pol_del) = diff(&current.policy, &desired.policy);
    let (pair_up, pair_del) = diff(&current.pairs, &desired.pairs);
    let (cidr_up, cidr_del) = diff(&current.cidrs, &desired.cidrs);
    let (id_up, id_del) = diff(&current.identities, &desired.identities);
    let (ep_up, ep_del) = diff(&current.endpoints, &desired.endpoints);
    let (svc_up, svc_del) = diff(&current.services, &desired.services);

    let mut ops = Vec::with_capacity(
        pol_up.len()
            + pol_del.len()
            + pair_up.len()
            + pair_del.len()
            + cidr_up.len()
            + cidr_del.len()
            + id_up.len()
            + id_del.len()
            + ep_up.len()
            + ep_del.len()
            + svc_up.len()
            + svc_del.len(),
    );
    ops.extend(pol_up.into_iter().map(|(k, v)| Op::UpsertPolicy(k, v)));
    ops.extend(pair_up.into_iter().map(|(k, v)| Op::UpsertPair(k, v)));
    ops.extend(cidr_up.into_iter().map(|(k, v)| Op::UpsertCidr(k, v)));
    ops.extend(id_up.into_iter().map(|(k, v)| Op::UpsertIdentity(k, v)));
    for (k, v) in ep_up {
        if v.slot >= SLOT_FIRST && current.endpoints.get(&k).map(|c| c.slot) != Some(v.slot) {
            ops.push(Op::ResetCounters(v.slot));
        }
        ops.push(Op::UpsertEndpoint(k, v));
    }
    // Slots that no interface holds any more: their counts go to the retired slot.
    let held: BTreeSet<u32> = desired.endpoints.values().map(|e| e.slot).collect();
    let mut freed: BTreeSet<u32> = BTreeSet::new();
    for (k, c) in &current.endpoints {
        if c.slot >= SLOT_FIRST
            && desired.endpoints.get(k).map(|d| d.slot) != Some(c.slot)
            && !held.contains(&c.slot)
        {
            freed.insert(c.slot);
        }
    }
    ops.extend(ep_del.into_iter().map(Op::DeleteEndpoint));
    ops.extend(freed.into_iter().map(Op::ResetCounters));
    ops.extend(id_del.into_iter().map(Op::DeleteIdentity));
    ops.extend(cidr_del.into_iter().map(Op::DeleteCidr));
    ops.extend(pair_del.into_iter().map(Op::DeletePair));
    ops.extend(pol_del.into_iter().map(Op::DeletePolicy));
    ops.extend(svc_del.into_iter().map(Op::DeleteService));
    ops.extend(svc_up.into_iter().map(|(k, v)| Op::UpsertService(k, v)));
    Plan { ops }
}

#[cfg(test)]
mod tests {
    use npm_common::maps::{EP_ISOLATE_INGRESS, POLICY_PREFIX_FULL, addr_from_v4};

    use super::*;

    fn pkey(local: u32, peer: u32, port: u16) -> Lpm<PolicyKey> {
        (
            POLICY_PREFIX_FULL,
            PolicyKey {
                local_id: local,
                peer_id: peer,
                dir: 0,
                proto: 6,
                dport_be: port.to_be(),
            },
        )
    }

    fn sample() -> DesiredMaps {
        let mut m = DesiredMaps::default();
        m.endpoints.insert(
            7,
            EndpointInfo {
                id: 1,
                flags: EP_ISOLATE_INGRESS,
                slot: 0,
            },
        );
        m.identities.insert(
            addr_from_v4([10, 0, 0, 1]),
            PeerInfo {
                id: 1,
                ifindex: 7,
                flags: 0,
                class: 0,
            },
        );
        m.identities.insert(
            addr_from_v4([10, 0, 0, 2]),
            PeerInfo {
                id: 2,
                ifindex: 0,
                flags: 0,
                class: 0,
            },
        );
        m.policy.insert(pkey(1, 2, 80), PolicyValue::default());
        with_pairs(m)
    }

    /// `m` with its PAIRS derived from its POLICY, as the compiler keeps them.
    fn with_pairs(mut m: DesiredMaps) -> DesiredMaps {
        m.pairs = crate::compiler::desired::pairs_of(m.policy.keys());
        m
    }

    fn pair(local: u32, peer: u32) -> PairKey {
        PairKey {
            local_id: local,
            peer_id: peer,
            dir: 0,
            _pad: [0; 3],
        }
    }

    #[test]
    fn identical_maps_give_an_empty_plan() {
        assert!(plan(&sample(), &sample()).is_empty());
    }

    #[test]
    fn applying_the_plan_reaches_the_desired_state() {
        let current = sample();
        let mut desired = sample();
        desired.policy.remove(&pkey(1, 2, 80));
        desired
            .policy
            .insert(pkey(1, 3, 443), PolicyValue::default());
        desired.identities.insert(
            addr_from_v4([10, 0, 0, 2]),
            PeerInfo {
                id: 3,
                ifindex: 0,
                flags: 0,
                class: 0,
            },
        );
        desired.endpoints.insert(
            8,
            EndpointInfo {
                id: 3,
                flags: 0,
                slot: 0,
            },
        );
        let p = plan(&current, &desired);
        let mut state = current.clone();
        for op in &p.ops {
            op.apply_to(&mut state);
        }
        assert_eq!(state, desired);
    }

    #[test]
    fn new_allow_entries_come_before_the_identity_switch_and_deletes_come_last() {
        // 10.0.0.2 changes identity 2 -> 3: the entry for 3 must exist before the address
        // points at 3, and the entry for 2 may only go after.
        let current = sample();
        let mut desired = sample();
        desired.policy.remove(&pkey(1, 2, 80));
        desired
            .policy
            .insert(pkey(1, 3, 80), PolicyValue::default());
        desired.identities.insert(
            addr_from_v4([10, 0, 0, 2]),
            PeerInfo {
                id: 3,
                ifindex: 0,
                flags: 0,
                class: 0,
            },
        );
        let desired = with_pairs(desired);
        let ops = plan(&current, &desired).ops;
        let pos = |want: &Op| ops.iter().position(|o| o == want).expect("op present");
        let add = pos(&Op::UpsertPolicy(pkey(1, 3, 80), PolicyValue::default()));
        let pair_add = pos(&Op::UpsertPair(pair(1, 3), desired.pairs[&pair(1, 3)]));
        let pair_del = pos(&Op::DeletePair(pair(1, 2)));
        let switch = pos(&Op::UpsertIdentity(
            addr_from_v4([10, 0, 0, 2]),
            PeerInfo {
                id: 3,
                ifindex: 0,
                flags: 0,
                class: 0,
            },
        ));
        let del = pos(&Op::DeletePolicy(pkey(1, 2, 80)));
        assert!(add < switch && switch < del, "order was {ops:?}");
        // The pair that sends the datapath to the new entry comes after the entry and before
        // the switch; the old pair goes after the switch, before its trie entry.
        assert!(
            add < pair_add && pair_add < switch && switch < pair_del && pair_del < del,
            "order was {ops:?}"
        );
    }

    #[test]
    fn isolation_is_switched_on_only_after_its_allow_entries() {
        let mut current = sample();
        current.endpoints.insert(
            7,
            EndpointInfo {
                id: 1,
                flags: 0,
                slot: 0,
            },
        );
        current.policy.clear();
        let desired = sample();
        let ops = plan(&current, &desired).ops;
        let add = ops
            .iter()
            .position(|o| matches!(o, Op::UpsertPolicy(..)))
            .expect("add");
        let iso = ops
            .iter()
            .position(|o| matches!(o, Op::UpsertEndpoint(..)))
            .expect("iso");
        assert!(add < iso, "order was {ops:?}");
    }
}
