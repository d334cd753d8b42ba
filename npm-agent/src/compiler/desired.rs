//! The desired contents of every policy map: the compiler's output and the programmer's input.
use std::collections::BTreeMap;

use npm_common::maps::{Addr16, EndpointInfo, PeerInfo, PolicyKey, PolicyValue};

use crate::model::ObjRef;

/// An LPM key as (prefix length in bits, data); `data` has every bit past the prefix zeroed.
pub type Lpm<K> = (u32, K);

/// What each map must hold. BTreeMaps, so the output is deterministic and diffs are cheap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    /// host-side ifindex -> local endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// pod/node address -> peer identity.
    pub identities: BTreeMap<Addr16, PeerInfo>,
    /// CIDR prefix -> CIDR class id (with `CIDR_CLASS_BIT`).
    pub cidrs: BTreeMap<Lpm<Addr16>, u32>,
    /// (local identity, peer, direction, protocol, port prefix) -> allow.
    pub policy: BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    /// Service range -> 1 (egress to it is checked again after the DNAT).
    pub services: BTreeMap<Lpm<Addr16>, u32>,
}

impl DesiredMaps {
    pub fn total_entries(&self) -> usize {
        self.endpoints.len()
            + self.identities.len()
            + self.cidrs.len()
            + self.policy.len()
            + self.services.len()
    }

    /// Entries per map.
    pub fn counts(&self) -> MapCounts {
        MapCounts {
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            cidrs: self.cidrs.len(),
            policy: self.policy.len(),
            services: self.services.len(),
        }
    }
}

/// How many entries each map holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounts {
    pub endpoints: usize,
    pub identities: usize,
    pub cidrs: usize,
    pub policy: usize,
    pub services: usize,
}

impl MapCounts {
    /// (map name, entries), in a fixed order, for metrics and logs.
    pub fn by_name(&self) -> [(&'static str, usize); 5] {
        [
            ("endpoints", self.endpoints),
            ("identities", self.identities),
            ("cidrs", self.cidrs),
            ("policy", self.policy),
            ("services", self.services),
        ]
    }
}

/// Which rule a `PolicyValue::rule_ref` points at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjRef,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
    /// Index of the rule in the policy's ingress or egress list.
    pub index: usize,
}
