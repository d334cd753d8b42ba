//! ipBlock peers as CIDR classes for the CIDRS longest-prefix-match trie.
//!
//! Every cidr and except prefix of every ipBlock is inserted in the trie. For an address `a`
//! the datapath finds the most specific inserted prefix `P` containing it; since inserted
//! prefixes nest or are disjoint, `a` lies in an inserted prefix `Q` exactly when `P ⊆ Q`.
//! So the set of ipBlocks matching `a` (cidr contains it, no except does) is a function of
//! `P` alone: `{B : P ⊆ B.cidr, P ⊄ e for all e in B.except}`. That set is `P`'s class.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use npm_common::maps::{Addr16, V4_MAPPED_PREFIX_LEN};

/// A prefix in the 16-byte address space (IPv4 mapped), host bits zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: u128,
    pub len: u32,
}

fn mask(addr: u128, len: u32) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (!0u128 << (128 - len))
    }
}

impl Prefix {
    pub fn new(addr: u128, len: u32) -> Self {
        Prefix {
            addr: mask(addr, len),
            len,
        }
    }

    pub fn from_net(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => {
                let mapped = n.network().to_ipv6_mapped();
                Prefix::new(
                    u128::from(mapped),
                    V4_MAPPED_PREFIX_LEN + u32::from(n.prefix_len()),
                )
            }
            IpNet::V6(n) => Prefix::new(u128::from(n.network()), u32::from(n.prefix_len())),
        }
    }

    /// `other ⊆ self`.
    pub fn contains(&self, other: &Prefix) -> bool {
        other.len >= self.len && mask(other.addr, self.len) == self.addr
    }

    pub fn addr16(&self) -> Addr16 {
        self.addr.to_be_bytes()
    }
}

/// `::ffff:0:0/96`, where IPv4 addresses live in this address space.
pub fn v4_mapped_range() -> Prefix {
    Prefix::new(0xffff_u128 << 32, V4_MAPPED_PREFIX_LEN)
}

/// An ipBlock in the 16-byte space.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub cidr: Prefix,
    pub except: Vec<Prefix>,
}

impl Block {
    /// Converts an ipBlock. An IPv6 cidr that covers `::ffff:0:0/96` gets it as an extra
    /// except, so `::/0` never matches IPv4 traffic. Excepts of the other family are dropped
    /// (they can never match an address inside the cidr).
    pub fn new(cidr: IpNet, except: &[IpNet]) -> Self {
        let c = Prefix::from_net(cidr);
        let mut ex: Vec<Prefix> = except
            .iter()
            .filter(|e| {
                matches!(
                    (cidr, e),
                    (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
                )
            })
            .map(|e| Prefix::from_net(*e))
            .collect();
        if matches!(cidr, IpNet::V6(_)) && c.contains(&v4_mapped_range()) {
            ex.push(v4_mapped_range());
        }
        ex.sort();
        ex.dedup();
        Block {
            cidr: c,
            except: ex,
        }
    }

    /// "Every peer": 0.0.0.0/0 and ::/0.
    pub fn any() -> [Block; 2] {
        [
            Block::new("0.0.0.0/0".parse().expect("literal"), &[]),
            Block::new("::/0".parse().expect("literal"), &[]),
        ]
    }

    pub fn matches(&self, p: &Prefix) -> bool {
        self.cidr.contains(p) && !self.except.iter().any(|e| e.contains(p))
    }
}

/// Every prefix the trie needs, with the indexes (into `blocks`) of the blocks its addresses
/// match. Prefixes with an empty set are kept: they stop a shorter prefix from matching.
///
/// `P ⊆ X` exactly when `X` is `P` cut to `X.len`, so a prefix's matching blocks are found
/// among its own ancestors (one lookup per distinct prefix length) instead of by testing every
/// block: the cost is (prefixes × distinct lengths) lookups plus the size of the output.
pub fn classes(blocks: &[Block]) -> BTreeMap<Prefix, BTreeSet<usize>> {
    let mut by_cidr: HashMap<Prefix, Vec<usize>> = HashMap::new();
    let mut by_except: HashMap<Prefix, Vec<usize>> = HashMap::new();
    for (i, b) in blocks.iter().enumerate() {
        by_cidr.entry(b.cidr).or_default().push(i);
        for e in &b.except {
            by_except.entry(*e).or_default().push(i);
        }
    }
    let prefixes: BTreeSet<Prefix> = by_cidr.keys().chain(by_except.keys()).copied().collect();
    let lens: BTreeSet<u32> = prefixes.iter().map(|p| p.len).collect();
    prefixes
        .into_iter()
        .map(|p| {
            let mut set = BTreeSet::new();
            let mut excluded = BTreeSet::new();
            for len in lens.range(..=p.len) {
                let a = Prefix::new(p.addr, *len);
                if let Some(v) = by_cidr.get(&a) {
                    set.extend(v.iter().copied());
                }
                if let Some(v) = by_except.get(&a) {
                    excluded.extend(v.iter().copied());
                }
            }
            set.retain(|i| !excluded.contains(i));
            debug_assert!(set.iter().all(|i| blocks[*i].matches(&p)));
            (p, set)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    /// What the datapath does: longest inserted prefix containing the address.
    fn lookup(classes: &BTreeMap<Prefix, BTreeSet<usize>>, ip: &str) -> BTreeSet<usize> {
        let ip: IpAddr = ip.parse().expect("ip");
        let full = match ip {
            IpAddr::V4(v4) => Prefix::new(u128::from(v4.to_ipv6_mapped()), 128),
            IpAddr::V6(v6) => Prefix::new(u128::from(v6), 128),
        };
        classes
            .iter()
            .filter(|(p, _)| p.contains(&full))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// The definition, block by block.
    fn brute(blocks: &[Block]) -> BTreeMap<Prefix, BTreeSet<usize>> {
        let prefixes: BTreeSet<Prefix> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        prefixes
            .into_iter()
            .map(|p| {
                let set = blocks
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.matches(&p))
                    .map(|(i, _)| i)
                    .collect();
                (p, set)
            })
            .collect()
    }

    #[test]
    fn classes_equal_the_definition_on_nested_blocks() {
        let mut blocks = Vec::new();
        for a in 0..6u8 {
            for len in [8u8, 16, 24, 32] {
                let cidr = net(&format!("10.{a}.{}.0/{len}", a % 3));
                let cidr = cidr.trunc();
                let except: Vec<IpNet> = if len < 24 {
                    vec![net(&format!("10.{a}.{}.0/{}", a % 3, len + 8)).trunc()]
                } else {
                    vec![]
                };
                blocks.push(Block::new(cidr, &except));
            }
        }
        blocks.push(Block::new(net("0.0.0.0/0"), &[net("10.1.0.0/16")]));
        blocks.push(Block::new(net("::/0"), &[]));
        blocks.push(Block::new(net("fd00::/8"), &[net("fd00:1::/32")]));
        assert_eq!(classes(&blocks), brute(&blocks));
    }

    #[test]
    fn except_is_exact() {
        let blocks = vec![
            Block::new(net("0.0.0.0/0"), &[net("169.254.169.254/32")]),
            Block::new(net("10.0.0.0/8"), &[net("10.1.0.0/16")]),
            Block::new(net("10.1.2.0/24"), &[]),
        ];
        let c = classes(&blocks);
        assert_eq!(lookup(&c, "169.254.169.254"), BTreeSet::new());
        assert_eq!(lookup(&c, "169.254.169.253"), [0].into());
        assert_eq!(lookup(&c, "10.9.9.9"), [0, 1].into());
        assert_eq!(lookup(&c, "10.1.9.9"), [0].into());
        assert_eq!(lookup(&c, "10.1.2.3"), [0, 2].into());
        assert_eq!(lookup(&c, "fd00::1"), BTreeSet::new());
    }

    #[test]
    fn ipv6_any_never_matches_ipv4_and_v6_excepts_work() {
        let blocks = vec![
            Block::new(net("::/0"), &[net("fd00:bad::/32")]),
            Block::new(net("192.0.2.0/24"), &[]),
        ];
        let c = classes(&blocks);
        assert_eq!(lookup(&c, "2001:db8::1"), [0].into());
        assert_eq!(lookup(&c, "fd00:bad::1"), BTreeSet::new());
        assert_eq!(lookup(&c, "192.0.2.1"), [1].into());
        assert_eq!(
            lookup(&c, "198.51.100.1"),
            BTreeSet::new(),
            "::/0 must not match IPv4"
        );
    }
}
