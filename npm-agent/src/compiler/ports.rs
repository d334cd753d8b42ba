//! Ports and port ranges as POLICY trie prefixes.
use npm_common::maps::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL};

/// One (protocol, port prefix) of a POLICY key: `(proto, prefix_len, first port)`.
pub type PortPrefix = (u8, u32, u16);

/// Every protocol and port (a rule without `ports`).
pub const ANY: PortPrefix = (0, POLICY_PREFIX_ANY_PROTO, 0);

pub fn any_port(proto: u8) -> PortPrefix {
    (proto, POLICY_PREFIX_ANY_PORT, 0)
}

pub fn exact(proto: u8, port: u16) -> PortPrefix {
    (proto, POLICY_PREFIX_FULL, port)
}

/// The fewest aligned power-of-two blocks that cover `lo..=hi` exactly.
pub fn range(proto: u8, lo: u16, hi: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest k such that lo is 2^k-aligned and lo + 2^k - 1 <= hi.
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((proto, POLICY_PREFIX_ANY_PORT + 16 - k, lo as u16));
        lo += 1 << k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(blocks: &[PortPrefix]) -> Vec<u32> {
        let mut ports: Vec<u32> = blocks
            .iter()
            .flat_map(|(_, len, start)| {
                let size = 1u32 << (POLICY_PREFIX_FULL - len);
                assert_eq!(
                    u32::from(*start) % size,
                    0,
                    "block {start}/{len} is aligned"
                );
                (u32::from(*start)..u32::from(*start) + size).collect::<Vec<_>>()
            })
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn ranges_are_covered_exactly() {
        for lo in 0..70u16 {
            for hi in lo..70u16 {
                let want: Vec<u32> = (u32::from(lo)..=u32::from(hi)).collect();
                assert_eq!(covered(&range(6, lo, hi)), want, "range {lo}..={hi}");
            }
        }
        assert_eq!(
            covered(&range(6, 32000, 32768)),
            (32000..=32768).collect::<Vec<_>>()
        );
        assert_eq!(range(6, 0, 65535), vec![(6, POLICY_PREFIX_ANY_PORT, 0)]);
        assert_eq!(range(17, 80, 80), vec![exact(17, 80)]);
        assert!(range(6, 1, 65535).len() <= 16);
    }
}
