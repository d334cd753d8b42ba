//! Stable numbering of pod identities and CIDR classes across compiles.
//!
//! Ids are handed out from monotonic counters and never reused: the same identity keeps its
//! id from one compile to the next, and a retired id can never come back with another meaning
//! while a stale kernel entry may still hold it. At start-up the agent reserves every id the
//! (adopted, pinned) maps still hold, so the counters start above them.
use std::collections::{BTreeMap, BTreeSet};

use npm_common::maps::{CIDR_CLASS_BIT, ID_PENDING};

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
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self {
            pods: BTreeMap::new(),
            classes: BTreeMap::new(),
            next_pod: 1,
            next_class: 1,
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
