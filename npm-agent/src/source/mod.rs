//! Cluster-state sources. Each produces a [`ClusterSnapshot`] (without the node-local facts,
//! which the caller adds) plus diagnostics for the objects it could not use; none fails as a
//! whole because of one bad object.
pub mod kube;
pub mod manifests;

use std::path::PathBuf;

use crate::model::Diagnostic;
use crate::state::ClusterSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Manifests(#[from] manifests::ManifestsError),
}

/// Where the agent learns the cluster's namespaces, pods and policies.
pub trait ClusterSource: Send {
    /// A short name for logs (`manifests /etc/npm`, `kubernetes api`).
    fn describe(&self) -> String;
    /// The cluster as the source sees it now. Called whenever the agent reconciles; a source
    /// that cannot yet give a complete view must return an error rather than a partial one.
    fn snapshot(&mut self) -> Result<(ClusterSnapshot, Vec<Diagnostic>), SourceError>;
}

/// The standalone source: a directory of YAML manifests, re-read on every call.
pub struct ManifestsSource {
    pub dir: PathBuf,
}

impl ClusterSource for ManifestsSource {
    fn describe(&self) -> String {
        format!("manifests {}", self.dir.display())
    }

    fn snapshot(&mut self) -> Result<(ClusterSnapshot, Vec<Diagnostic>), SourceError> {
        Ok(manifests::load_dir(&self.dir)?)
    }
}
