//! Objects shared by the tests that run the agent against the in-test API server: a lab pod
//! scheduled to node-1, its API form, and the policy admitting app=client to app=web on 80.
#![allow(dead_code)]
use npm_agent::model::Pod;
use serde_json::{Value, json};

use crate::support::pod;

pub(crate) fn lab_pod(name: &str, app: &str, ip: &str) -> Pod {
    Pod {
        node_name: Some("node-1".into()),
        ..pod(name, app, ip)
    }
}

pub(crate) fn api_pod(name: &str, app: &str, ip: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx",
            "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub(crate) fn web_from_client() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"port": 80}]}]}})
}
