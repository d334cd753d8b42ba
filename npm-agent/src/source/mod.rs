//! Cluster-state sources (to be written)
