//! Stable numbering of pod identities and CIDR classes across compiles.
//!
//! Ids are handed out from monotonic counters and never reused: the same identity keeps its
//! id from one compile to the next, and a retired id can never come back with another meaning
//! while a stale kernel entry may still hold it. At start-up the agent reserves every id the
//! (adopted, pinned) maps still hold, so the counters start above them.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use npm_common::maps::{CIDR_CLASS_BIT, COUNTER_SLOTS, ID_PENDING};
use npm_common::metrics::{SLOT_FIRST, SLOT_UNMANAGED};

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
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
            classes: BTreeMap::new(),
            next_pod: 1,
            next_class: 1,
            slots: SlotAllocator::default(),
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
