//! Cluster-state sources. Each produces a [`crate::state::ClusterSnapshot`] plus diagnostics
//! for the objects it could not use; none fails as a whole because of one bad object.
pub mod manifests;
