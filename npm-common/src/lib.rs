//! The ABI between the npm eBPF datapath (`npm-ebpf`) and the agent (`npm-agent`).
//!
//! Everything here is `#[repr(C)]`, has no implicit padding (explicit `_pad` fields, zeroed),
//! and is checked by a `const` size assertion, because the same bytes are read by the kernel
//! program and written by userspace. Change a layout only together with [`ABI_VERSION`]: the
//! version is part of the pin path, so an agent never adopts maps of another layout.
#![no_std]

pub mod maps;
pub mod metrics;
pub mod verdict;

#[cfg(feature = "user")]
mod pod;

/// Bumped on any change of a map's name, type, key, value or meaning.
///
/// A build may be given another number through the environment variable
/// `NPM_ABI_VERSION_OVERRIDE` at compile time: the upgrade test (`npm-agent/tests/upgrade.rs`)
/// builds a second agent that way to play the next release (same layouts, another pin
/// directory). Release builds never set it.
pub const ABI_VERSION: u32 = match option_env!("NPM_ABI_VERSION_OVERRIDE") {
    Some(v) => parse_version(v),
    None => 7,
};

/// The oldest `ABI_VERSION` whose conntrack maps (`NPM_CT4`, `NPM_CT`: keys, values, flags
/// and the jiffies-based clock of their deadlines) have the layout and meaning of this one,
/// so an agent upgrading from it carries the tracked flows over (`Datapath::carry_conntrack`).
/// Raise it to the new `ABI_VERSION` with any change to those maps.
pub const CONNTRACK_COMPATIBLE_SINCE: u32 = 3;

/// A decimal `u32` at compile time (a bad one fails the build).
const fn parse_version(s: &str) -> u32 {
    let b = s.as_bytes();
    assert!(!b.is_empty(), "NPM_ABI_VERSION_OVERRIDE is empty");
    let mut i = 0;
    let mut v: u32 = 0;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "NPM_ABI_VERSION_OVERRIDE is not a decimal number"
        );
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}
