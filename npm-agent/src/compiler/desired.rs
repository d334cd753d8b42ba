//! The desired contents of every policy map: the compiler's output and the programmer's input.
use std::collections::BTreeMap;

use npm_common::maps::{
    Addr16, EndpointInfo, PAIR_PORTS, PAIR_TRIE, PairKey, PairPort, PairValue, PeerInfo, PolicyKey,
    PolicyValue,
};

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
    /// (local identity, peer, direction) of the POLICY entries -> those entries inline (up to
    /// `PAIR_PORTS`) or `PAIR_TRIE`: a pure function of `policy` ([`pairs_of`]).
    pub pairs: BTreeMap<PairKey, PairValue>,
    /// Service range -> 1 (egress to it is checked again after the DNAT).
    pub services: BTreeMap<Lpm<Addr16>, u32>,
}

impl DesiredMaps {
    pub fn total_entries(&self) -> usize {
        self.endpoints.len()
            + self.identities.len()
            + self.cidrs.len()
            + self.policy.len()
            + self.pairs.len()
            + self.services.len()
    }

    /// Entries per map.
    pub fn counts(&self) -> MapCounts {
        MapCounts {
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            cidrs: self.cidrs.len(),
            policy: self.policy.len(),
            pairs: self.pairs.len(),
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
    pub pairs: usize,
    pub services: usize,
}

impl MapCounts {
    /// (map name, entries), in a fixed order, for metrics and logs.
    pub fn by_name(&self) -> [(&'static str, usize); 6] {
        [
            ("endpoints", self.endpoints),
            ("identities", self.identities),
            ("cidrs", self.cidrs),
            ("policy", self.policy),
            ("pairs", self.pairs),
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

/// The PAIRS entries of some POLICY entries: one per (local, peer, direction) they name, with
/// the entries inline when there are at most `PAIR_PORTS` of them, else `PAIR_TRIE`.
pub fn pairs_of<'a>(
    entries: impl IntoIterator<Item = &'a Lpm<PolicyKey>>,
) -> BTreeMap<PairKey, PairValue> {
    let mut out: BTreeMap<PairKey, (PairValue, usize)> = BTreeMap::new();
    for (len, k) in entries {
        let key = PairKey {
            local_id: k.local_id,
            peer_id: k.peer_id,
            dir: k.dir,
            _pad: [0; 3],
        };
        let (v, n) = out.entry(key).or_default();
        if *n < PAIR_PORTS {
            v.ports[*n] = PairPort {
                prefix_len: u8::try_from(*len).expect("POLICY prefixes are at most 96 bits"),
                proto: k.proto,
                port: u16::from_be(k.dport_be),
            };
        } else {
            *v = PairValue {
                flags: PAIR_TRIE,
                ports: Default::default(),
            };
        }
        *n += 1;
    }
    out.into_iter().map(|(k, (v, _))| (k, v)).collect()
}

#[cfg(test)]
mod tests {
    use npm_common::maps::{POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL};

    use super::*;

    fn key(peer_id: u32, dir: u8, port: u16) -> Lpm<PolicyKey> {
        (
            POLICY_PREFIX_FULL,
            PolicyKey {
                local_id: 1,
                peer_id,
                dir,
                proto: 6,
                dport_be: port.to_be(),
            },
        )
    }

    #[test]
    fn pairs_hold_up_to_four_entries_inline_and_send_more_to_the_trie() {
        let mut keys: Vec<Lpm<PolicyKey>> = (0..4).map(|i| key(2, 0, 80 + i)).collect();
        keys.push((
            POLICY_PREFIX_ANY_PROTO,
            PolicyKey {
                local_id: 1,
                peer_id: 3,
                dir: 1,
                proto: 0,
                dport_be: 0,
            },
        ));
        let pairs = pairs_of(&keys);
        assert_eq!(pairs.len(), 2, "one pair per (local, peer, dir)");
        let p = pairs[&PairKey {
            local_id: 1,
            peer_id: 2,
            dir: 0,
            _pad: [0; 3],
        }];
        assert_eq!(p.flags, 0);
        for port in 80..84 {
            assert!(p.ports.iter().any(|e| e.matches(6, port)), "port {port}");
        }
        assert!(
            !p.ports
                .iter()
                .any(|e| e.matches(6, 84) || e.matches(17, 80))
        );
        let any = pairs[&PairKey {
            local_id: 1,
            peer_id: 3,
            dir: 1,
            _pad: [0; 3],
        }];
        assert!(any.ports[0].matches(1, 0) && any.ports[1..].iter().all(|e| e.prefix_len == 0));
        // A fifth entry of the same pair: the trie decides.
        keys.push(key(2, 0, 9000));
        let p = pairs_of(&keys)[&PairKey {
            local_id: 1,
            peer_id: 2,
            dir: 0,
            _pad: [0; 3],
        }];
        assert_eq!(
            p,
            PairValue {
                flags: PAIR_TRIE,
                ports: Default::default(),
            }
        );
    }
}
