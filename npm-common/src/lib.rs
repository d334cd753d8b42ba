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
pub const ABI_VERSION: u32 = 4;
