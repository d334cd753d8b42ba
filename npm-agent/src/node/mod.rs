//! Node-local facts: which pods sit on this node, behind which host-side interface, and the
//! node's own addresses; and the links appearing and going as pods start and stop.
pub mod discovery;
pub mod links;
