//! Stable numbering of pod identities and CIDR classes across compiles.
//!
//! Ids are handed out from monotonic counters and never reused: the same identity keeps its
//! id from one compile to the next, and a retired id can never come back with another meaning
//! while a stale kernel entry may still hold it. At start-up the agent reserves every id the
//! (adopted, pinned) maps still hold, so the counters start above them, and offers those ids
//! back to what they stood for ([`IdAllocator::adopt`]): on the first compile that places
//! pods, an identity whose pods' addresses (IDENTITIES) and interfaces (ENDPOINTS) carried id
//! X gets X again, and a CIDR class whose prefixes (CIDRS) carried X gets X, so a restarted
//! agent rewrites nothing that did not change.
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use npm_common::maps::{Addr16, CIDR_CLASS_BIT, COUNTER_SLOTS, ID_PENDING, PEER_HOST};
use npm_common::metrics::{SLOT_FIRST, SLOT_UNMANAGED};

use super::desired::{DesiredMaps, Lpm};
use super::peers::Block;
use crate::model::{ContainerPort, Labels};

/// What makes two pods interchangeable for policy: namespace (and its labels), labels, and
/// named ports (which resolve on the destination pod).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub labels: Labels,
    pub named_ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdAllocator {
    pods: BTreeMap<IdentityKey, u32>,
    classes: BTreeMap<BTreeSet<Block>, u32>,
    next_pod: u32,
    next_class: u32,
    /// Endpoints' counter slots.
    pub slots: SlotAllocator,
    /// What adopted maps said each id stood for, until the first compile takes it.
    adopted: Adopted,
}

/// The ids of adopted maps by what they were attached to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Adopted {
    /// Pod address -> pod identity (IDENTITIES).
    addrs: BTreeMap<Addr16, u32>,
    /// Host-side ifindex -> pod identity (ENDPOINTS).
    ifindexes: BTreeMap<u32, u32>,
    /// CIDRS prefix -> class.
    prefixes: BTreeMap<Lpm<Addr16>, u32>,
}

/// A pod identity id (not the host's 0, not pending, not a class).
fn is_pod_id(id: u32) -> bool {
    id != 0 && id < ID_PENDING && id & CIDR_CLASS_BIT == 0
}

/// Gives each key at most one of the ids it voted for and each id to at most one key: the
/// (key, id) pairs with the most votes first (ties: key order, then the lower id); ids in
/// `taken` are never given. Deterministic, whatever order the votes came in.
fn resolve<K: Ord + Clone>(
    votes: &BTreeMap<K, BTreeMap<u32, usize>>,
    taken: &BTreeSet<u32>,
) -> Vec<(K, u32)> {
    let mut cands: Vec<(Reverse<usize>, &K, u32)> = votes
        .iter()
        .flat_map(|(k, ids)| ids.iter().map(move |(id, n)| (Reverse(*n), k, *id)))
        .collect();
    cands.sort();
    let mut keys: BTreeSet<&K> = BTreeSet::new();
    let mut ids: BTreeSet<u32> = taken.clone();
    let mut out = Vec::new();
    for (_, k, id) in cands {
        if !keys.contains(k) && !ids.contains(&id) {
            keys.insert(k);
            ids.insert(id);
            out.push((k.clone(), id));
        }
    }
    out
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
            classes: BTreeMap::new(),
            next_pod: 1,
            next_class: 1,
            slots: SlotAllocator::default(),
            adopted: Adopted::default(),
        }
    }
}

impl IdAllocator {
    /// Makes sure no id in `ids` is ever handed out (ids found in adopted kernel maps).
    pub fn reserve(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if id & CIDR_CLASS_BIT != 0 {
                self.next_class = self
                    .next_class
                    .max((id & !CIDR_CLASS_BIT).saturating_add(1));
            } else if id != 0 && id != ID_PENDING {
                self.next_pod = self.next_pod.max(id.saturating_add(1));
            }
        }
    }

    /// Adopts the maps a previous agent left: reserves every id they hold, keeps each
    /// interface's counter slot, and remembers which address, interface and CIDRS prefix
    /// carried which id, for the first compile that places pods to give those ids back
    /// (see [`Self::seed_pods`], [`Self::seed_classes`]).
    pub fn adopt(&mut self, maps: &DesiredMaps) {
        self.reserve(
            maps.endpoints
                .values()
                .map(|e| e.id)
                .chain(maps.identities.values().map(|p| p.id))
                .chain(maps.cidrs.values().copied())
                .chain(
                    maps.policy
                        .keys()
                        .flat_map(|(_, k)| [k.local_id, k.peer_id]),
                ),
        );
        self.slots
            .reserve(maps.endpoints.iter().map(|(i, e)| (*i, e.slot)));
        self.adopted = Adopted {
            addrs: maps
                .identities
                .iter()
                .filter(|(_, p)| p.flags & PEER_HOST == 0 && is_pod_id(p.id))
                .map(|(a, p)| (*a, p.id))
                .collect(),
            ifindexes: maps
                .endpoints
                .iter()
                .filter(|(_, e)| is_pod_id(e.id))
                .map(|(i, e)| (*i, e.id))
                .collect(),
            prefixes: maps
                .cidrs
                .iter()
                .filter(|(_, id)| *id & CIDR_CLASS_BIT != 0)
                .map(|(k, id)| (*k, *id))
                .collect(),
        };
    }

    /// Adopted ids are still on offer.
    pub fn has_adopted(&self) -> bool {
        self.adopted != Adopted::default()
    }

    /// The pod identity adopted maps gave address `a`.
    pub fn adopted_addr(&self, a: &Addr16) -> Option<u32> {
        self.adopted.addrs.get(a).copied()
    }

    /// The pod identity adopted maps gave interface `ifindex`.
    pub fn adopted_ifindex(&self, ifindex: u32) -> Option<u32> {
        self.adopted.ifindexes.get(&ifindex).copied()
    }

    /// The class adopted maps gave CIDRS prefix `p`.
    pub fn adopted_prefix(&self, p: &Lpm<Addr16>) -> Option<u32> {
        self.adopted.prefixes.get(p).copied()
    }

    /// No more adopted ids on offer (after the first compile that placed pods: an id freed
    /// later is never handed out again).
    pub fn forget_adopted(&mut self) {
        self.adopted = Adopted::default();
    }

    /// Gives identities not yet numbered the adopted ids their pods voted for (one vote per
    /// address and interface): see [`resolve`]. Losers get new ids later, as usual.
    pub fn seed_pods(&mut self, votes: &BTreeMap<IdentityKey, BTreeMap<u32, usize>>) {
        let votes: BTreeMap<IdentityKey, BTreeMap<u32, usize>> = votes
            .iter()
            .filter(|(k, _)| !self.pods.contains_key(*k))
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter()
                        .filter(|(id, _)| is_pod_id(**id))
                        .map(|(a, b)| (*a, *b))
                        .collect(),
                )
            })
            .collect();
        let taken: BTreeSet<u32> = self.pods.values().copied().collect();
        for (k, id) in resolve(&votes, &taken) {
            self.pods.insert(k, id);
        }
    }

    /// Gives classes not yet numbered the adopted ids their prefixes voted for.
    pub fn seed_classes(&mut self, votes: &BTreeMap<BTreeSet<Block>, BTreeMap<u32, usize>>) {
        let votes: BTreeMap<BTreeSet<Block>, BTreeMap<u32, usize>> = votes
            .iter()
            .filter(|(k, _)| !self.classes.contains_key(*k))
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter()
                        .filter(|(id, _)| **id & CIDR_CLASS_BIT != 0)
                        .map(|(a, b)| (*a, *b))
                        .collect(),
                )
            })
            .collect();
        let taken: BTreeSet<u32> = self.classes.values().copied().collect();
        for (k, id) in resolve(&votes, &taken) {
            self.classes.insert(k, id);
        }
    }

    /// The identity has an id already.
    pub fn knows_pod(&self, key: &IdentityKey) -> bool {
        self.pods.contains_key(key)
    }

    pub fn pod(&mut self, key: &IdentityKey) -> u32 {
        if let Some(id) = self.pods.get(key) {
            return *id;
        }
        // The last pod id is ID_PENDING (pending endpoints); pod identities stop below it.
        let id = self.next_pod.min(ID_PENDING - 1);
        self.next_pod = self.next_pod.saturating_add(1);
        self.pods.insert(key.clone(), id);
        id
    }

    pub fn class(&mut self, blocks: &BTreeSet<Block>) -> u32 {
        if let Some(id) = self.classes.get(blocks) {
            return *id;
        }
        let id = CIDR_CLASS_BIT | self.next_class.min(!CIDR_CLASS_BIT);
        self.next_class = self.next_class.saturating_add(1);
        self.classes.insert(blocks.clone(), id);
        id
    }

    /// Forgets identities and classes not in use (their ids are not reused).
    pub fn retain_used(&mut self, pods: &BTreeSet<u32>, classes: &BTreeSet<u32>) {
        self.pods.retain(|_, id| pods.contains(id));
        self.classes.retain(|_, id| classes.contains(id));
    }

    /// Forgets one identity (no pod has it any more); its id is not reused.
    pub fn forget_pod(&mut self, key: &IdentityKey) {
        self.pods.remove(key);
    }

    /// Forgets one CIDR class (no prefix has it any more); its id is not reused.
    pub fn forget_class(&mut self, blocks: &BTreeSet<Block>) {
        self.classes.remove(blocks);
    }

    /// Every live identity and its id.
    pub fn pod_ids(&self) -> impl Iterator<Item = (&IdentityKey, u32)> {
        self.pods.iter().map(|(k, v)| (k, *v))
    }

    /// Every live CIDR class (its set of ipBlocks) and its id.
    pub fn class_ids(&self) -> impl Iterator<Item = (&BTreeSet<Block>, u32)> {
        self.classes.iter().map(|(k, v)| (k, *v))
    }

    pub fn live_pod_identities(&self) -> usize {
        self.pods.len()
    }
}

/// Counter slots of local endpoints (`EndpointInfo::slot`), one per host-side interface in
/// ENDPOINTS, stable while the interface stays there.
///
/// A new interface gets, in this order: the slot adopted maps gave it (start-up), a slot never
/// handed out, the slot freed longest ago, a slot reserved for an interface that has not come
/// back, and when all [`COUNTER_SLOTS`] are taken [`SLOT_UNMANAGED`] (it then counts together
/// with unmanaged interfaces; the exposed counters are summed over interfaces anyway). The
/// programmer zeroes a slot before an interface is published with it (`Op::ResetCounters`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotAllocator {
    /// ifindex -> its slot, for every interface in ENDPOINTS (overflowed ones hold
    /// `SLOT_UNMANAGED`).
    by_if: BTreeMap<u32, u32>,
    /// Slots held (`by_if` values other than `SLOT_UNMANAGED`).
    held: BTreeSet<u32>,
    /// ifindex -> the slot adopted maps gave it, until the interface comes back.
    reserved: BTreeMap<u32, u32>,
    /// Freed slots, oldest first.
    free: VecDeque<u32>,
    /// Slots from here on were never handed out.
    next: u32,
}

impl Default for SlotAllocator {
    fn default() -> Self {
        Self {
            by_if: BTreeMap::new(),
            held: BTreeSet::new(),
            reserved: BTreeMap::new(),
            free: VecDeque::new(),
            next: SLOT_FIRST,
        }
    }
}

impl SlotAllocator {
    /// Slots found in adopted ENDPOINTS (ifindex -> slot): each interface gets its slot back
    /// if it is still an endpoint, so its counters carry on. Slots out of range, slot 0 and
    /// slots claimed twice are ignored.
    pub fn reserve(&mut self, slots: impl IntoIterator<Item = (u32, u32)>) {
        let mut taken: BTreeSet<u32> = self.reserved.values().copied().collect();
        for (ifindex, slot) in slots {
            if (SLOT_FIRST..COUNTER_SLOTS).contains(&slot)
                && !self.held.contains(&slot)
                && taken.insert(slot)
            {
                self.reserved.insert(ifindex, slot);
            }
        }
        let top = taken.last().map_or(SLOT_FIRST, |s| s + 1).max(self.next);
        // Slots below the highest reserved one that nobody reserved are free to hand out.
        for s in self.next..top {
            if !taken.contains(&s) && !self.held.contains(&s) {
                self.free.push_back(s);
            }
        }
        self.next = top;
    }

    /// The slot of `ifindex` (allocated if it has none).
    pub fn get_or_alloc(&mut self, ifindex: u32) -> u32 {
        if let Some(s) = self.by_if.get(&ifindex) {
            return *s;
        }
        let slot = self.pick(ifindex);
        self.by_if.insert(ifindex, slot);
        if slot != SLOT_UNMANAGED {
            self.held.insert(slot);
        }
        slot
    }

    fn pick(&mut self, ifindex: u32) -> u32 {
        if let Some(s) = self.reserved.remove(&ifindex) {
            return s;
        }
        if self.next < COUNTER_SLOTS {
            self.next += 1;
            return self.next - 1;
        }
        if let Some(s) = self.free.pop_front() {
            return s;
        }
        // Last resort: a slot kept for an interface that has not come back.
        if let Some((i, s)) = self.reserved.pop_first() {
            debug_assert!(!self.held.contains(&s), "reserved slot {s} of #{i} is held");
            return s;
        }
        SLOT_UNMANAGED
    }

    /// `ifindex` left ENDPOINTS: its slot can go to another interface (after the others).
    pub fn release(&mut self, ifindex: u32) {
        if let Some(s) = self.by_if.remove(&ifindex)
            && s != SLOT_UNMANAGED
        {
            self.held.remove(&s);
            self.free.push_back(s);
        }
    }

    /// The slot of `ifindex`, if it has one.
    pub fn get(&self, ifindex: u32) -> Option<u32> {
        self.by_if.get(&ifindex).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_reused_oldest_first_and_adopted_back() {
        let mut a = SlotAllocator::default();
        assert_eq!(a.get_or_alloc(10), SLOT_FIRST);
        assert_eq!(a.get_or_alloc(11), SLOT_FIRST + 1);
        assert_eq!(a.get_or_alloc(10), SLOT_FIRST, "stable while held");
        a.release(10);
        // Never-used slots come before freed ones.
        assert_eq!(a.get_or_alloc(12), SLOT_FIRST + 2);
        assert_eq!(a.get(10), None);

        // Adopted maps: interfaces get their slots back, gaps are free, new ones go above.
        let mut a = SlotAllocator::default();
        a.reserve([(7, 9), (8, 4), (9, 4), (5, 0), (6, COUNTER_SLOTS)]);
        assert_eq!(a.get_or_alloc(8), 4);
        assert_eq!(a.get_or_alloc(7), 9);
        assert_eq!(
            a.get_or_alloc(9),
            10,
            "slot 4 was claimed twice: #9 gets a new one"
        );
        assert_eq!(a.get_or_alloc(5), 11);

        // Exhausted: freed slots oldest first, then slots kept for interfaces that did not
        // come back, then the unmanaged slot.
        let mut a = SlotAllocator::default();
        a.reserve([(1000, SLOT_FIRST)]);
        for i in 0..COUNTER_SLOTS - SLOT_FIRST - 1 {
            let s = a.get_or_alloc(10_000 + i);
            assert!(s > SLOT_FIRST && s < COUNTER_SLOTS, "#{i}: {s}");
        }
        a.release(10_003);
        a.release(10_001);
        let (s3, s1) = (SLOT_FIRST + 1 + 3, SLOT_FIRST + 1 + 1);
        assert_eq!(a.get_or_alloc(5000), s3);
        assert_eq!(a.get_or_alloc(5001), s1);
        assert_eq!(a.get_or_alloc(5002), SLOT_FIRST, "the reservation of #1000");
        assert_eq!(a.get_or_alloc(5003), SLOT_UNMANAGED);
        assert_eq!(a.get_or_alloc(1000), SLOT_UNMANAGED);
        a.release(5003);
        a.release(5000);
        a.release(1000);
        assert_eq!(a.get_or_alloc(1000), s3);
    }
}
