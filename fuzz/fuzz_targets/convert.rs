//! k8s-openapi → model conversion (`k8s::convert`) on any object the API could hand over:
//! the input is JSON (the API server's wire format), deserialized as a Pod, a NetworkPolicy,
//! a Namespace and a Service in turn; each one that deserializes is converted.
#![no_main]

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use libfuzzer_sys::fuzz_target;
use npm_agent::k8s::convert;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<core::Pod>(data) {
        let _ = convert::pod(&p);
    }
    if let Ok(np) = serde_json::from_slice::<net::NetworkPolicy>(data) {
        let _ = convert::policy(&np);
    }
    if let Ok(ns) = serde_json::from_slice::<core::Namespace>(data) {
        let _ = convert::namespace(&ns);
    }
    if let Ok(s) = serde_json::from_slice::<core::Service>(data) {
        let _ = convert::service(&s);
    }
});
