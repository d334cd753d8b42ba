//! Stable numbering of pod identities and CIDR classes across compiles.

/// Placeholder; the compiler work fills this in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdAllocator {}
