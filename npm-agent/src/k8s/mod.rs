//! The only code that knows the Kubernetes wire types (k8s-openapi) and the kube client.
pub mod client;
pub mod convert;
pub mod watch;
