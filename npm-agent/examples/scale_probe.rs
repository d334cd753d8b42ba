//! Times one full compile of a synthetic cluster: `cargo run --release -p npm-agent --example
//! scale_probe [PODS] [POLICIES]`. A first measurement for the benchmark issue, not the harness
//! it asks for (no map programming, one size per run, no table). See `incremental_probe` for
//! per-event times.
use std::time::Instant;

use npm_agent::compiler::{IdAllocator, compile};
use npm_agent::synth::synthetic_cluster;

fn main() {
    let pods_n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let pols_n: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000);
    let s = synthetic_cluster(pods_n, pols_n, 100, 110);
    let mut ids = IdAllocator::default();
    let t = Instant::now();
    let c = compile(&s, &mut ids);
    let first = t.elapsed();
    let t = Instant::now();
    let c2 = compile(&s, &mut ids);
    let second = t.elapsed();
    assert_eq!(c.maps, c2.maps);
    println!(
        "pods {pods_n} policies {pols_n} local 110: compile {first:?} (again {second:?}); entries: endpoints {} identities {} cidrs {} policy {}",
        c.maps.endpoints.len(),
        c.maps.identities.len(),
        c.maps.cidrs.len(),
        c.maps.policy.len()
    );
}
