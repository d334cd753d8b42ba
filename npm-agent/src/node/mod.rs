//! Node-local facts: which pods sit on this node, behind which host-side interface, and the
//! node's own addresses.
pub mod discovery;
