//! Changes while traffic flows, with real packets: a long-lived allowed connection survives
//! unrelated changes; a change that denies a peer refuses its new connections at once; a pod
//! IP taken over by another pod carries the new pod's identity. Privileged (root).
#[path = "common/support.rs"]
mod support;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use support::pod;

use npm_agent::enforcer::Enforcer;
use npm_agent::lab::{Lab, LabSpec};
use npm_agent::model::{ObjRef, Peer, Pod, Policy, PortRef, PortSpec, Protocol, Rule, Selector};
use npm_agent::state::ClusterSnapshot;

fn sel(app: &str) -> Selector {
    Selector {
        match_labels: [("app".to_string(), app.to_string())].into(),
        ..Default::default()
    }
}

/// db accepts 7000/TCP only from app=api.
fn db_policy() -> Policy {
    Policy {
        namespace: "default".into(),
        name: "db-from-api".into(),
        pod_selector: sel("db"),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespace_selector: None,
                pod_selector: Some(sel("api")),
            }],
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortRef::Number(7000)),
                end_port: None,
            }],
        }]),
        egress: None,
    }
}

struct Rig {
    lab: Lab,
    enforcer: Enforcer,
    snapshot: ClusterSnapshot,
}

impl Rig {
    fn apply(&mut self) {
        let r = self.enforcer.apply(&self.snapshot);
        assert_eq!(r.sync.failed, 0);
        assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
    }
    fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.snapshot
            .pods
            .get_mut(&ObjRef::new("default", name))
            .expect("pod")
    }
    /// A new TCP connection from `from`'s netns to db:7000 within 1 s.
    fn connects(&self, from: &str) -> bool {
        let ns = self
            .lab
            .netns_of(&format!("default/{from}"))
            .expect("netns");
        ns.run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from(([10, 248, 0, 2], 7000)),
                Duration::from_secs(1),
            )
            .is_ok()
        })
    }
}

fn echo(stream: &mut TcpStream, byte: u8) -> bool {
    let mut b = [0u8; 1];
    stream.write_all(&[byte]).is_ok() && stream.read_exact(&mut b).is_ok() && b[0] == byte
}

#[test]
fn connections_and_identities_while_the_cluster_changes() {
    let pods = vec![
        pod("db", "db", "10.248.0.2"),
        pod("api", "api", "10.248.0.3"),
        pod("web", "web", "10.248.0.4"),
    ];
    let lab = Lab::build(LabSpec {
        pods: pods.clone(),
        externals: vec![],
    })
    .expect("lab");
    let mut snapshot = ClusterSnapshot::default();
    for p in &pods {
        snapshot.pods.insert(p.obj_ref(), p.clone());
    }
    snapshot.namespaces.insert(
        "default".into(),
        npm_agent::model::Namespace {
            name: "default".into(),
            labels: Default::default(),
        },
    );
    snapshot.policies.insert(db_policy().obj_ref(), db_policy());
    let interfaces = lab.pod_interfaces();
    snapshot.local = interfaces
        .iter()
        .map(|(k, (_, i))| (k.clone(), *i))
        .collect();
    snapshot.node_ips = lab.node_ips();
    let mut enforcer = Enforcer::new(None).expect("datapath");
    lab.node().run(|| {
        for (name, _) in interfaces.values() {
            enforcer.attach(name).expect("attach");
        }
    });
    let mut rig = Rig {
        lab,
        enforcer,
        snapshot,
    };
    rig.apply();

    // An echo server on db:7000 (not a declared port: policies speak of numbers).
    let db_ns = rig.lab.netns_of("default/db").expect("db netns");
    let listener = db_ns.run(|| TcpListener::bind("0.0.0.0:7000").expect("bind"));
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        // Accept until told to stop (bounded by a 60 s deadline as well).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    std::thread::spawn(move || {
                        let mut b = [0u8; 1];
                        while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });

    assert!(!rig.connects("web"), "web is not allowed");
    let api_ns = rig.lab.netns_of("default/api").expect("api netns");
    let mut conn = api_ns.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::from(([10, 248, 0, 2], 7000)),
            Duration::from_secs(1),
        )
        .expect("api connects")
    });
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert!(echo(&mut conn, 1));

    // Unrelated changes: a new policy for web, a label on web. The connection lives on.
    rig.snapshot.policies.insert(
        ObjRef::new("default", "web-deny"),
        Policy {
            namespace: "default".into(),
            name: "web-deny".into(),
            pod_selector: sel("web"),
            ingress: Some(vec![]),
            egress: None,
        },
    );
    rig.pod_mut("web")
        .labels
        .insert("tier".into(), "front".into());
    rig.apply();
    assert!(
        echo(&mut conn, 2),
        "the long-lived connection survives unrelated changes"
    );
    assert!(
        rig.connects("api"),
        "new connections from api still allowed"
    );

    // api is relabelled: its NEW connections are refused at once. (Its established connection
    // keeps flowing: conntrack, as with iptables-based enforcers; documented.)
    rig.pod_mut("api")
        .labels
        .insert("app".into(), "retired".into());
    rig.apply();
    assert!(
        !rig.connects("api"),
        "a newly denied peer is refused right after the change"
    );
    assert!(echo(&mut conn, 3), "established connection keeps its state");

    // web's address is taken over by a new pod `api2` with app=api (web is gone): traffic from
    // that address now carries api2's identity and is allowed.
    let web = rig
        .snapshot
        .pods
        .remove(&ObjRef::new("default", "web"))
        .expect("web");
    let iface = rig
        .snapshot
        .local
        .remove(&web.obj_ref())
        .expect("web iface");
    let mut api2 = pod("api2", "api", "10.248.0.4");
    api2.labels.insert("generation".into(), "2".into());
    rig.snapshot.local.insert(api2.obj_ref(), iface);
    rig.snapshot.pods.insert(api2.obj_ref(), api2);
    rig.apply();
    assert!(
        rig.connects("web"),
        "the reused IP (web's netns) now has api2's identity"
    );

    drop(conn);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    drop(rig);
}
