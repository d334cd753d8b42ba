//! The only code that knows the Kubernetes wire types (k8s-openapi).
pub mod convert;
