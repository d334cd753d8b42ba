//! Times one full compile of a synthetic cluster: `cargo run --release -p npm-agent --example
//! scale_probe [PODS] [POLICIES]`. A first measurement for the benchmark issue, not the harness
//! it asks for (no map programming, one size per run, no table).
use std::time::Instant;

use npm_agent::compiler::{IdAllocator, compile};
use npm_agent::model::*;
use npm_agent::state::ClusterSnapshot;

fn main() {
    let pods_n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let pols_n: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000);
    let mut s = ClusterSnapshot::default();
    for n in 0..100 {
        let name = format!("ns{n}");
        s.namespaces.insert(
            name.clone(),
            Namespace {
                name,
                labels: [("team".to_string(), format!("t{}", n % 10))].into(),
            },
        );
    }
    for i in 0..pods_n {
        let p = Pod {
            namespace: format!("ns{}", i % 100),
            name: format!("p{i}"),
            labels: [
                ("app".to_string(), format!("app{}", i % 500)),
                ("tier".to_string(), format!("t{}", i % 3)),
            ]
            .into(),
            ips: vec![std::net::IpAddr::from(std::net::Ipv4Addr::from(
                0x0a00_0000u32 + i as u32 + 1,
            ))],
            node_name: None,
            host_network: false,
            terminating: false,
            ports: vec![ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        };
        if i < 110 {
            s.local.insert(p.obj_ref(), 100 + i as u32);
        }
        s.pods.insert(p.obj_ref(), p);
    }
    for j in 0..pols_n {
        let sel = |k: &str, v: String| Selector {
            match_labels: [(k.to_string(), v)].into(),
            ..Default::default()
        };
        let p = Policy {
            namespace: format!("ns{}", j % 100),
            name: format!("pol{j}"),
            pod_selector: sel("app", format!("app{}", j % 500)),
            ingress: Some(vec![
                Rule {
                    peers: vec![Peer::Pods {
                        namespace_selector: Some(sel("team", format!("t{}", j % 10))),
                        pod_selector: Some(sel("tier", "t1".into())),
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Name("http".into())),
                        end_port: None,
                    }],
                },
                Rule {
                    peers: vec![Peer::IpBlock {
                        cidr: format!("172.{}.0.0/16", j % 256).parse().unwrap(),
                        except: vec![format!("172.{}.1.0/24", j % 256).parse().unwrap()],
                    }],
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        port: Some(PortRef::Number(443)),
                        end_port: Some(450),
                    }],
                },
            ]),
            egress: None,
        };
        s.policies.insert(p.obj_ref(), p);
    }
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
