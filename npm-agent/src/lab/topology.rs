//! The lab's layout, planned without touching the kernel: names, addresses, MACs and the
//! `ip` commands that build it.
//!
//! A Calico-like routed node:
//!
//! ```text
//!   pod netns <prefix>-p<i>                node netns <prefix>-node               external netns <prefix>-x<j>
//!   eth0  10.244.0.10/32  ---- veth ----  lxc<i>   (route 10.244.0.10/32 dev lxc<i>)
//!         fd00:10:244::a/128               fe80::1, proxy_arp, forwarding on
//!   default via 169.254.1.1 onlink         lo 192.0.2.1/32, 2001:db8::1/128      eth0 <ip>/32
//!   default via fe80::1                    ext<j>  (route <ip>/32 dev ext<j>)  -- veth --
//! ```
//!
//! A hostNetwork pod is a process of the node: it lives in the node netns, its addresses are
//! the node's, and it has no veth (so nothing can ever be enforced on it, as on a real node).
//!
//! `ip -batch` lines take no global options such as `-6`: the family follows from the
//! addresses. Neighbour entries are static on both sides (MACs are chosen here), so no probe waits for
//! ARP or neighbour discovery and none is lost in an unresolved-neighbour queue.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Pod, Protocol};

use super::{External, LabError, LabSpec};

/// The node netns's own addresses (on its `lo`). TEST-NET-1 and the documentation prefix:
/// they exist only inside the lab's namespaces.
pub(crate) const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub(crate) const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The gateway the pods route through (Calico's choice); answered by static neighbours.
pub(crate) const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub(crate) const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Where pods without IPs get theirs: 10.244.0.0/16 and fd00:10:244::/64, from host 10 up.
const POOL_V4: [u8; 2] = [10, 244];
const POOL_V6: [u16; 4] = [0xfd00, 0x10, 0x244, 0];
const FIRST_HOST: u32 = 10;

/// What sits behind one veth of the node: a pod or an external host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// "ns/name" for pods, the IP for externals: the label in probe results.
    pub label: String,
    pub netns: String,
    /// A hostNetwork pod: it runs in the node netns (`netns` is the node's) and has no veth.
    pub in_node: bool,
    /// Interface name in the node netns (empty for a hostNetwork pod).
    pub host_if: String,
    pub host_mac: String,
    pub peer_mac: String,
    pub ips: Vec<IpAddr>,
    /// Deduplicated, in declaration order.
    pub ports: Vec<(u16, Protocol)>,
}

impl Endpoint {
    pub(crate) fn ipv4(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv4)
    }
    pub(crate) fn ipv6(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv6)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub node_netns: String,
    /// Pods (in spec order) then externals.
    pub endpoints: Vec<Endpoint>,
    pub pod_count: usize,
    /// The pods with their IPs filled in.
    pub pods: Vec<Pod>,
}

pub(crate) fn node_ips() -> Vec<IpAddr> {
    vec![IpAddr::V4(NODE_V4), IpAddr::V6(NODE_V6)]
}

/// Plans the lab for `spec`, naming everything under `prefix` (e.g. `npmlab-123-0`).
pub(crate) fn plan(spec: &LabSpec, prefix: &str) -> Result<Plan, LabError> {
    let mut seen_pods = BTreeSet::new();
    let mut used: BTreeSet<IpAddr> = node_ips().into_iter().collect();
    let mut host_ports = BTreeSet::new();
    for pod in &spec.pods {
        if pod.host_network {
            // They share the node's addresses, so they cannot share a port.
            for (port, protocol) in dedup(pod.ports.iter().map(|p| (p.port, p.protocol))) {
                if !host_ports.insert((port, protocol)) {
                    return Err(LabError::HostPortConflict {
                        pod: pod.obj_ref().to_string(),
                        port,
                        protocol,
                    });
                }
            }
        }
        if !seen_pods.insert(pod.obj_ref()) {
            return Err(LabError::DuplicatePod {
                pod: pod.obj_ref().to_string(),
            });
        }
    }
    // A hostNetwork pod's own IPs are ignored: in the lab it has the node's.
    let given = spec
        .pods
        .iter()
        .filter(|p| !p.host_network)
        .flat_map(|p| p.ips.iter().copied())
        .chain(spec.externals.iter().map(|e| e.ip));
    for ip in given {
        if !used.insert(ip) {
            return Err(LabError::DuplicateIp { ip });
        }
    }
    let mut next_v4 = FIRST_HOST;
    let mut next_v6 = FIRST_HOST;
    let mut endpoints = Vec::with_capacity(spec.pods.len() + spec.externals.len());
    let mut pods = Vec::with_capacity(spec.pods.len());
    for (i, pod) in spec.pods.iter().enumerate() {
        let mut pod = pod.clone();
        if pod.host_network {
            pod.ips = node_ips();
        } else if pod.ips.is_empty() {
            let v4 = allocate(&mut used, &mut next_v4, v4_host)?;
            let v6 = allocate(&mut used, &mut next_v6, v6_host)?;
            pod.ips = vec![v4, v6];
        }
        let ports = dedup(pod.ports.iter().map(|p| (p.port, p.protocol)));
        let (netns, host_if) = if pod.host_network {
            (format!("{prefix}-node"), String::new())
        } else {
            (format!("{prefix}-p{i}"), format!("lxc{i}"))
        };
        endpoints.push(Endpoint {
            label: pod.obj_ref().to_string(),
            netns,
            in_node: pod.host_network,
            host_if,
            host_mac: mac(0x6f, endpoints.len()),
            peer_mac: mac(0x70, endpoints.len()),
            ips: pod.ips.clone(),
            ports,
        });
        pods.push(pod);
    }
    for (j, ext) in spec.externals.iter().enumerate() {
        endpoints.push(external_endpoint(prefix, j, ext, endpoints.len()));
    }
    Ok(Plan {
        node_netns: format!("{prefix}-node"),
        endpoints,
        pod_count: spec.pods.len(),
        pods,
    })
}

fn external_endpoint(prefix: &str, j: usize, ext: &External, index: usize) -> Endpoint {
    Endpoint {
        label: ext.ip.to_string(),
        netns: format!("{prefix}-x{j}"),
        in_node: false,
        host_if: format!("ext{j}"),
        host_mac: mac(0x6f, index),
        peer_mac: mac(0x70, index),
        ips: vec![ext.ip],
        ports: dedup(ext.ports.iter().copied()),
    }
}

fn dedup(ports: impl Iterator<Item = (u16, Protocol)>) -> Vec<(u16, Protocol)> {
    let mut seen = BTreeSet::new();
    ports.filter(|p| seen.insert(*p)).collect()
}

fn allocate(
    used: &mut BTreeSet<IpAddr>,
    next: &mut u32,
    host: fn(u32) -> IpAddr,
) -> Result<IpAddr, LabError> {
    while *next < 0xffff {
        let ip = host(*next);
        *next += 1;
        if used.insert(ip) {
            return Ok(ip);
        }
    }
    Err(LabError::PoolExhausted)
}

fn v4_host(n: u32) -> IpAddr {
    let [.., hi, lo] = n.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(POOL_V4[0], POOL_V4[1], hi, lo))
}

fn v6_host(n: u32) -> IpAddr {
    let [a, b, c, d] = POOL_V6;
    // n < 0xffff (see allocate), so it fits the last group.
    let last = u16::try_from(n).unwrap_or(u16::MAX);
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, last))
}

/// Locally administered unicast MAC `02:6e:<kind>:00:<index>`.
fn mac(kind: u8, index: usize) -> String {
    let [.., hi, lo] = index.to_be_bytes();
    format!("02:6e:{kind:02x}:00:{hi:02x}:{lo:02x}")
}

/// `net.*` sysctls for the node netns, written before any interface exists so every veth
/// inherits the `default` values.
pub(crate) fn node_sysctls() -> Vec<(&'static str, &'static str)> {
    vec![
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.default.proxy_arp", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv6.conf.default.forwarding", "1"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_ra", "0"),
        ("net.ipv6.conf.default.router_solicitations", "0"),
        PING_GROUPS,
    ]
}

/// Ping sockets (the ICMP probes) for every group, the prober's included.
const PING_GROUPS: (&str, &str) = ("net.ipv4.ping_group_range", "0 2147483647");

/// `net.*` sysctls for pod and external namespaces.
pub(crate) fn endpoint_sysctls() -> Vec<(&'static str, &'static str)> {
    vec![
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_ra", "0"),
        ("net.ipv6.conf.default.router_solicitations", "0"),
        PING_GROUPS,
    ]
}

/// `ip -batch` lines run in the node netns: its own addresses, one veth per endpoint (the
/// peer created directly in the endpoint's netns as `eth0`), routes and static neighbours.
pub(crate) fn node_commands(plan: &Plan) -> Vec<String> {
    let mut lines = vec![
        "link set lo up".to_owned(),
        format!("addr add {NODE_V4}/32 dev lo"),
        format!("addr add {NODE_V6}/128 dev lo nodad"),
    ];
    for ep in plan.endpoints.iter().filter(|e| !e.in_node) {
        lines.push(format!(
            "link add {} address {} type veth peer name eth0 address {} netns {}",
            ep.host_if, ep.host_mac, ep.peer_mac, ep.netns
        ));
        lines.push(format!("link set {} up", ep.host_if));
        lines.push(format!("addr add {GATEWAY_V6}/64 dev {} nodad", ep.host_if));
    }
    for ep in plan.endpoints.iter().filter(|e| !e.in_node) {
        for ip in &ep.ips {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            lines.push(format!("route add {ip}/{len} dev {}", ep.host_if));
            lines.push(format!(
                "neigh replace {ip} lladdr {} dev {} nud permanent",
                ep.peer_mac, ep.host_if
            ));
        }
    }
    lines
}

/// `ip -batch` lines run in an endpoint's netns once its `eth0` exists.
pub(crate) fn endpoint_commands(ep: &Endpoint) -> Vec<String> {
    let mut lines = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
    for ip in &ep.ips {
        match ip {
            IpAddr::V4(_) => lines.push(format!("addr add {ip}/32 dev eth0")),
            IpAddr::V6(_) => lines.push(format!("addr add {ip}/128 dev eth0 nodad")),
        }
    }
    if ep.ipv4().is_some() {
        lines.push(format!(
            "neigh replace {GATEWAY_V4} lladdr {} dev eth0 nud permanent",
            ep.host_mac
        ));
        lines.push(format!(
            "route add 0.0.0.0/0 via {GATEWAY_V4} dev eth0 onlink"
        ));
    }
    if ep.ipv6().is_some() {
        lines.push(format!(
            "neigh replace {GATEWAY_V6} lladdr {} dev eth0 nud permanent",
            ep.host_mac
        ));
        lines.push(format!("route add ::/0 via {GATEWAY_V6} dev eth0"));
    }
    lines
}

/// Parses `ip -o link show` output into (name, ifindex) pairs (`5: lxc0@if2: <...`).
pub(crate) fn parse_link_list(out: &str) -> Vec<(String, u32)> {
    out.lines()
        .filter_map(|line| {
            let mut parts = line.split(": ");
            let index = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.split('@').next()?.to_owned();
            Some((name, index))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ContainerPort;

    fn pod(name: &str, ips: Vec<IpAddr>) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: Default::default(),
            ips,
            node_name: None,
            host_network: false,
            terminating: false,
            finished: false,
            ports: vec![
                ContainerPort {
                    name: None,
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("dup".into()),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
            ],
        }
    }

    #[test]
    fn assigns_both_families_and_skips_given_ips() {
        let given: IpAddr = "10.244.0.10".parse().unwrap();
        let spec = LabSpec {
            pods: vec![pod("a", vec![]), pod("b", vec![given])],
            externals: vec![External {
                ip: "203.0.113.7".parse().unwrap(),
                ports: vec![],
            }],
        };
        let plan = plan(&spec, "npmlab-1-0").unwrap();
        assert_eq!(
            plan.pods[0].ips,
            vec![
                "10.244.0.11".parse::<IpAddr>().unwrap(),
                "fd00:10:244::a".parse().unwrap()
            ]
        );
        assert_eq!(plan.pods[1].ips, vec![given]);
        assert_eq!(plan.endpoints[0].ports, vec![(80, Protocol::Tcp)]);
        assert_eq!(plan.endpoints[2].label, "203.0.113.7");
        assert_eq!(plan.endpoints[2].netns, "npmlab-1-0-x0");
        assert_eq!(plan.endpoints[2].host_if, "ext0");
        assert_eq!(plan.endpoints[1].host_mac, "02:6e:6f:00:00:01");
        assert!(plan.endpoints.iter().all(|e| e.host_if.len() <= 15));
    }

    #[test]
    fn rejects_duplicates() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let spec = LabSpec {
            pods: vec![pod("a", vec![ip]), pod("b", vec![ip])],
            externals: vec![],
        };
        assert!(matches!(
            plan(&spec, "x"),
            Err(LabError::DuplicateIp { .. })
        ));
        let spec = LabSpec {
            pods: vec![pod("a", vec![]), pod("a", vec![])],
            externals: vec![],
        };
        assert!(matches!(
            plan(&spec, "x"),
            Err(LabError::DuplicatePod { .. })
        ));
    }

    #[test]
    fn host_network_pods_live_in_the_node() {
        let mut h = pod("h", vec!["10.1.2.3".parse().unwrap()]);
        h.host_network = true;
        let spec = LabSpec {
            pods: vec![pod("a", vec![]), h.clone()],
            externals: vec![],
        };
        let p = plan(&spec, "npmlab-1-0").unwrap();
        let ep = &p.endpoints[1];
        assert!(ep.in_node && ep.host_if.is_empty());
        assert_eq!(ep.netns, p.node_netns);
        assert_eq!(
            ep.ips,
            node_ips(),
            "the node's addresses, not the manifest's"
        );
        assert_eq!(p.pods[1].ips, node_ips());
        let cmds = node_commands(&p).join("\n");
        assert_eq!(cmds.matches("type veth").count(), 1, "{cmds}");
        assert!(!cmds.contains("10.1.2.3"), "{cmds}");
        // Two hostNetwork pods on one port of the node cannot both bind it.
        let mut h2 = h.clone();
        h2.name = "h2".into();
        let spec = LabSpec {
            pods: vec![h, h2],
            externals: vec![],
        };
        assert!(matches!(
            plan(&spec, "x"),
            Err(LabError::HostPortConflict { port: 80, .. })
        ));
    }

    #[test]
    fn parses_links() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536\n7: lxc0@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(
            parse_link_list(out),
            vec![("lo".to_owned(), 1), ("lxc0".to_owned(), 7)]
        );
    }
}
