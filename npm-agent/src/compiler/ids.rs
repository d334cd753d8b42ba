//! Stable numbering of pod identities and CIDR classes across compiles.
//!
//! Ids are handed out from monotonic counters and never reused: the same identity keeps its
//! id from one compile to the next, and a retired id can never come back with another meaning
//! while a stale kernel entry may still hold it. At start-up the agent reserves every id the
//! (adopted, pinned) maps still hold, so the counters start above them.
use std::collections::{BTreeMap, BTreeSet};

use npm_common::maps::{CIDR_CLASS_BIT, POD_ID_MAX};

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
            } else if id != 0 {
                self.next_pod = self.next_pod.max(id.saturating_add(1));
            }
        }
    }

    pub fn pod(&mut self, key: &IdentityKey) -> u32 {
        if let Some(id) = self.pods.get(key) {
            return *id;
        }
        let id = self.next_pod.min(POD_ID_MAX);
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

    pub fn live_pod_identities(&self) -> usize {
        self.pods.len()
    }
}
