//! npm-agent: the userspace half of the npm NetworkPolicy enforcer.
//!
//! Data flows one way: source (`source/`, `k8s/`) -> [`state::ClusterSnapshot`] ->
//! [`compiler`] (pure) -> [`programmer`] (diff + apply) -> the eBPF maps of [`datapath`].
//! See ARCHITECTURE.md.
#![deny(unsafe_code)]

pub mod cli;
pub mod compiler;
pub mod config;
pub mod datapath;
pub mod enforcer;
pub mod expect;
pub mod explain;
pub mod k8s;
pub mod lab;
pub mod model;
pub mod netns;
pub mod node;
pub mod observe;
pub mod programmer;
pub mod source;
pub mod state;
pub mod synth;

/// `error: cause: cause`, for logs and the health endpoint.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}
