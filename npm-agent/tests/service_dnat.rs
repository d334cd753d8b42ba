//! Egress to a Service's ClusterIP with REAL packets and a REAL DNAT: the lab's node namespace
//! gets nftables DNAT rules like kube-proxy's (ClusterIP:port -> pod:targetPort), the client
//! pod's egress policy allows the `app=db` pods on 5432 and one external host (ipBlock) on
//! 443, and TCP connections go through the ClusterIPs from the client's namespace.
//!
//! With the Service range configured, a ClusterIP that maps to an allowed backend (a local pod,
//! or a remote host reached through the node's uplink) connects and the backend's greeting
//! comes back (the client is ingress-isolated too, so the reply passes only as the reply of
//! the verified flow); a ClusterIP that maps to a denied pod or host times out. Without the
//! range, the same allowed ClusterIPs time out (the documented pre-DNAT gap), which shows the
//! test can fail. Needs root and `nft` (scripts/setup.sh installs nftables).
#[path = "common/support.rs"]
mod support;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use aya::programs::TcAttachType;
use npm_agent::datapath::tcx_programs;
use npm_agent::enforcer::Enforcer;
use npm_agent::lab::{External, Lab, LabSpec};
use npm_agent::model::{ContainerPort, Pod, Protocol};
use npm_agent::source::manifests::Loader;
use npm_agent::state::ClusterSnapshot;
use support::output_within;

const SERVICE_RANGE: &str = "10.96.0.0/16";
/// ClusterIPs (port 80) and where kube-proxy would send them.
const SVC_DB: &str = "10.96.0.10";
const SVC_OTHER: &str = "10.96.0.11";
/// ClusterIPs (port 443) of Services backed by hosts outside the node (e.g. selector-less
/// Services with manual Endpoints).
const SVC_REMOTE_OK: &str = "10.96.0.12";
const SVC_REMOTE_DENIED: &str = "10.96.0.13";
const EXT_OK: &str = "203.0.113.10";
const EXT_DENIED: &str = "203.0.113.20";

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress:
  - to:
    - podSelector: {matchLabels: {app: db}}
    ports: [{port: 5432, protocol: TCP}]
  - to:
    - ipBlock: {cidr: 203.0.113.10/32}
    ports: [{port: 443, protocol: TCP}]
"#;

/// Panics unless this runs as root with `nft` installed: a missing prerequisite fails the
/// test, never skips it.
fn require_root_and_nft() {
    support::require_root("service_dnat tests");
    let nft = std::process::Command::new("nft").arg("--version").output();
    assert!(
        nft.as_ref().is_ok_and(|o| o.status.success()),
        "service_dnat needs nft (nftables) for its DNAT rules: run scripts/setup.sh as root ({:?})",
        nft.map(|o| o.status)
    );
    let stale = npm_agent::lab::cleanup_stale();
    if !stale.is_empty() {
        eprintln!("removed stale lab namespaces: {stale:?}");
    }
}

fn pod(name: &str, app: &str, ports: &[u16]) -> Pod {
    Pod {
        namespace: "default".into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![],
        node_name: Some("lab".into()),
        host_network: false,
        terminating: false,
        finished: false,
        ports: ports
            .iter()
            .map(|&port| ContainerPort {
                name: None,
                port,
                protocol: Protocol::Tcp,
            })
            .collect(),
    }
}

fn ipv4_of(lab: &Lab, name: &str) -> IpAddr {
    lab.pods()
        .iter()
        .find(|p| p.name == name)
        .and_then(|p| p.ips.iter().copied().find(IpAddr::is_ipv4))
        .unwrap_or_else(|| panic!("pod {name} has an IPv4 address"))
}

/// Connects from the client's namespace to `ip:port` and reads the responder's one-byte
/// greeting (which only arrives if replies pass). Bounded: 1 s to connect, 1 s to read.
fn reaches(lab: &Lab, ip: &str, port: u16) -> Result<(), String> {
    let ns = lab.netns_of("default/client").expect("client netns");
    let addr = SocketAddr::new(ip.parse().expect("ip"), port);
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .map_err(|e| format!("read greeting from {addr}: {e}"))
    })
}

/// kube-proxy's part: DNAT in PREROUTING (ClusterIP:80 -> pod:5432, ClusterIP:443 ->
/// host:443). The table lives in the lab's node namespace and goes with it.
fn install_dnat(lab: &Lab, db: IpAddr, other: IpAddr) {
    let rules = format!(
        "table ip npmtest {{\n\
         chain prerouting {{\n\
         type nat hook prerouting priority dstnat; policy accept;\n\
         ip daddr {SVC_DB} tcp dport 80 dnat to {db}:5432\n\
         ip daddr {SVC_OTHER} tcp dport 80 dnat to {other}:5432\n\
         ip daddr {SVC_REMOTE_OK} tcp dport 443 dnat to {EXT_OK}:443\n\
         ip daddr {SVC_REMOTE_DENIED} tcp dport 443 dnat to {EXT_DENIED}:443\n\
         }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!(
        "npm-svc-dnat-{}-{}.nft",
        std::process::id(),
        lab.prefix()
    ));
    std::fs::write(&file, rules).expect("write nft rules");
    let loaded = lab
        .node()
        .exec(&["nft", "-f", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&file);
    loaded.expect("nft -f in the node netns");
}

fn externals() -> Vec<External> {
    [EXT_OK, EXT_DENIED]
        .iter()
        .map(|ip| External {
            ip: ip.parse().expect("ip"),
            ports: vec![(443, Protocol::Tcp)],
        })
        .collect()
}

#[test]
fn clusterip_egress_is_checked_against_the_backend_after_a_real_dnat() {
    require_root_and_nft();
    let spec = LabSpec {
        pods: vec![
            pod("client", "client", &[]),
            pod("db", "db", &[5432]),
            pod("other", "other", &[5432]),
        ],
        externals: externals(),
    };
    let lab = Lab::build(spec).expect("build lab");
    let (db, other) = (ipv4_of(&lab, "db"), ipv4_of(&lab, "other"));

    install_dnat(&lab, db, other);

    // Before enforcement everything connects (the DNAT and the responders work).
    for (ip, port) in [
        (SVC_DB, 80),
        (SVC_OTHER, 80),
        (SVC_REMOTE_OK, 443),
        (SVC_REMOTE_DENIED, 443),
    ] {
        reaches(&lab, ip, port).unwrap_or_else(|e| panic!("without enforcement: {e}"));
    }

    // Enforcement: pod programs on the pods' veths, npm_host_egress on the uplinks.
    let mut enforcer = Enforcer::new(None).expect("load the datapath");
    let interfaces = lab.pod_interfaces();
    let uplinks = lab.external_interfaces();
    lab.node().run(|| {
        for (pod, (ifname, _)) in &interfaces {
            enforcer
                .attach(ifname)
                .unwrap_or_else(|e| panic!("attach {ifname} ({pod}): {e:#}"));
        }
        for (_, ifname) in &uplinks {
            enforcer
                .attach_host(ifname)
                .unwrap_or_else(|e| panic!("attach_host {ifname}: {e:#}"));
        }
    });
    let mut loader = Loader::default();
    loader.add_text("policies.yaml", POLICIES);
    let (policies, problems) = loader.finish_raw();
    assert!(problems.is_empty(), "{problems:?}");
    let mut snapshot = ClusterSnapshot {
        policies: policies.policies,
        pods: lab
            .pods()
            .iter()
            .map(|p| (p.obj_ref(), p.clone()))
            .collect(),
        local: interfaces
            .iter()
            .map(|(k, (_, ifindex))| (k.clone(), *ifindex))
            .collect(),
        node_ips: lab.node_ips(),
        ..ClusterSnapshot::default()
    };
    npm_agent::source::manifests::add_implicit_namespaces(&mut snapshot);

    // 1. Without the Service range: the gap. The pre-DNAT check sees only the ClusterIP,
    //    which no rule names, so even the allowed backends are unreachable through it.
    let report = enforcer.apply(&snapshot);
    assert_eq!(report.sync.failed, 0);
    for (ip, port) in [(SVC_DB, 80), (SVC_REMOTE_OK, 443)] {
        assert!(
            reaches(&lab, ip, port).is_err(),
            "{ip}:{port} connected without Service ranges (the gap should show)"
        );
    }
    // Direct connections follow the policy.
    reaches(&lab, &db.to_string(), 5432).expect("client -> db directly");
    assert!(reaches(&lab, &other.to_string(), 5432).is_err());

    // 2. With the range: the check runs on the translated packet.
    snapshot.service_cidrs = vec![SERVICE_RANGE.parse().expect("cidr")];
    let report = enforcer.apply(&snapshot);
    assert_eq!(report.sync.failed, 0);
    assert_eq!(report.map_entries.services, 1);
    enforcer
        .datapath_mut()
        .flush_conntrack()
        .expect("flush conntrack");
    for round in 0..2 {
        // Local backend allowed by podSelector; remote one by ipBlock. Replies come back.
        reaches(&lab, SVC_DB, 80)
            .unwrap_or_else(|e| panic!("round {round}: ClusterIP -> allowed local pod: {e}"));
        reaches(&lab, SVC_REMOTE_OK, 443)
            .unwrap_or_else(|e| panic!("round {round}: ClusterIP -> allowed remote host: {e}"));
        // The same through ClusterIPs that map to a denied pod / host.
        let e = reaches(&lab, SVC_OTHER, 80).expect_err("ClusterIP -> denied local pod");
        assert!(e.contains("connect"), "refused at connect: {e}");
        let e = reaches(&lab, SVC_REMOTE_DENIED, 443).expect_err("ClusterIP -> denied host");
        assert!(e.contains("connect"), "refused at connect: {e}");
        // A ClusterIP port nothing translates: the packet reaches no backend.
        assert!(reaches(&lab, SVC_DB, 81).is_err());
    }
    // Direct connections are unchanged.
    reaches(&lab, &db.to_string(), 5432).expect("client -> db directly");
    assert!(reaches(&lab, &other.to_string(), 5432).is_err());
    assert!(reaches(&lab, EXT_DENIED, 443).is_err());

    // 3. Range removed again: back to the gap, nothing left open by stale state.
    enforcer
        .datapath_mut()
        .flush_conntrack()
        .expect("flush conntrack");
    snapshot.service_cidrs.clear();
    let report = enforcer.apply(&snapshot);
    assert_eq!(report.map_entries.services, 0);
    assert!(reaches(&lab, SVC_DB, 80).is_err());
    assert!(reaches(&lab, SVC_OTHER, 80).is_err());
}

/// Removes a directory or file (a bpffs pin directory, a manifests directory) on drop.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const AGENT_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: c, image: busybox}]}
status: {podIP: 10.247.0.2, podIPs: [{ip: 10.247.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default, labels: {app: db}}
spec: {containers: [{name: db, image: postgres, ports: [{containerPort: 5432}]}]}
status: {podIP: 10.247.0.3, podIPs: [{ip: 10.247.0.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {containers: [{name: db, image: postgres, ports: [{containerPort: 5432}]}]}
status: {podIP: 10.247.0.4, podIPs: [{ip: 10.247.0.4}]}
"#;

/// `npm-agent run --once` in the lab's node, with or without `--service-cidr`.
fn agent_once(node_netns: &str, manifests: &std::path::Path, bpffs: &std::path::Path, svc: bool) {
    let mut cmd = std::process::Command::new("nsenter");
    // nsenter (not `ip netns exec`, which remounts /sys and would hide bpffs).
    cmd.arg(format!("--net=/run/netns/{node_netns}"))
        .arg(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["run", "--once", "--manifests"])
        .arg(manifests)
        .arg("--bpffs-dir")
        .arg(bpffs);
    if svc {
        cmd.args(["--service-cidr", SERVICE_RANGE]);
    }
    // Bounded: `--once` loads, applies and exits in seconds.
    let out = output_within(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "npm-agent run failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Entries of the pinned NPM_SERVICES map.
fn pinned_services(bpffs: &std::path::Path) -> usize {
    use aya::maps::{Map, MapData, lpm_trie::LpmTrie};
    let data = MapData::from_pin(
        bpffs
            .join(format!("v{}", npm_common::ABI_VERSION))
            .join(npm_common::maps::MAP_SERVICES),
    )
    .expect("NPM_SERVICES is pinned");
    let trie: LpmTrie<MapData, [u8; 16], u32> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("an LPM trie");
    trie.iter().take(1000).count()
}

#[test]
fn agent_attaches_the_post_dnat_check_to_uplinks_and_programs_the_ranges() {
    require_root_and_nft();
    let pid = std::process::id();
    let bpffs = std::path::PathBuf::from(format!("/sys/fs/bpf/npm-svctest-{pid}"));
    let _pins = RemoveOnDrop(bpffs.clone());
    let manifests = std::env::temp_dir().join(format!("npm-svctest-{pid}"));
    let _dir = RemoveOnDrop(manifests.clone());
    std::fs::create_dir_all(&manifests).expect("mkdir");
    std::fs::write(manifests.join("pods.yaml"), AGENT_PODS).expect("write pods");
    std::fs::write(manifests.join("policy.yaml"), POLICIES).expect("write policy");

    let with_ip = |mut p: Pod, ip: &str| {
        p.ips = vec![ip.parse().expect("ip")];
        p
    };
    let lab = Lab::build(LabSpec {
        pods: vec![
            with_ip(pod("client", "client", &[]), "10.247.0.2"),
            with_ip(pod("db", "db", &[5432]), "10.247.0.3"),
            with_ip(pod("other", "other", &[5432]), "10.247.0.4"),
        ],
        externals: externals(),
    })
    .expect("lab");
    install_dnat(
        &lab,
        "10.247.0.3".parse().expect("ip"),
        "10.247.0.4".parse().expect("ip"),
    );
    let node = lab.node().name().to_string();

    agent_once(&node, &manifests, &bpffs, true);
    // Every uplink carries the post-DNAT check; the pod veths carry the pod programs.
    for (_, ifname) in lab.external_interfaces() {
        let programs = lab
            .node()
            .run(|| tcx_programs(&ifname, TcAttachType::Egress))
            .expect("tcx programs");
        assert_eq!(programs, ["npm_host_egress"], "{ifname}");
    }
    for (ifname, _) in lab.pod_interfaces().values() {
        let programs = lab
            .node()
            .run(|| tcx_programs(ifname, TcAttachType::Egress))
            .expect("tcx programs");
        assert_eq!(programs, ["npm_to_pod"], "{ifname}");
    }
    assert_eq!(pinned_services(&bpffs), 1);
    // The agent has exited; its programs and maps enforce through the ClusterIPs.
    reaches(&lab, SVC_DB, 80).expect("ClusterIP -> allowed local pod");
    reaches(&lab, SVC_REMOTE_OK, 443).expect("ClusterIP -> allowed remote host");
    assert!(reaches(&lab, SVC_OTHER, 80).is_err());
    assert!(reaches(&lab, SVC_REMOTE_DENIED, 443).is_err());

    // A restarted agent without the range adopts the maps and removes it: the gap again.
    agent_once(&node, &manifests, &bpffs, false);
    assert_eq!(pinned_services(&bpffs), 0);
    assert!(reaches(&lab, SVC_DB, 80).is_err());
    reaches(&lab, "10.247.0.3", 5432).expect("client -> db directly");
}
