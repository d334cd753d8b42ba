//! The lab's kube-proxy: `kind: Service` manifests with a clusterIP become nftables DNAT rules
//! in the lab's node (PREROUTING, as kube-proxy's), and ClusterIP:port targets the prober
//! connects to (labelled `svc:ns/name`).
//!
//! Pure: [`plan`] turns Services and the built pods into the nft script and the targets; the
//! lab runs `nft -f`. Each Service port is translated to ONE backend, the first ready pod by
//! name that the selector matches in the Service's namespace (kube-proxy balances; one backend
//! keeps the lab's results deterministic). A named `targetPort` resolves on that pod. As
//! kube-proxy does, a backend's hairpin (a pod reaching itself through its Service) is
//! masqueraded, here to the node's address (mark 0x4000, SNAT in POSTROUTING). Only TCP and
//! UDP are translated (no SCTP NAT here); a port without a backend is still probed, and
//! nothing answers it.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Diagnostic, Pod, Protocol, Service, TargetPort};

/// The nft table the lab owns in its node namespace.
pub(crate) const TABLE: &str = "npmlab";

/// One thing to probe: a Service's ClusterIP and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// `svc:ns/name`: the probe's `to`.
    pub label: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What [`plan`] makes of the Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ServicePlan {
    /// `nft -f` input replacing the table (empty when there is nothing to translate).
    pub script: String,
    pub targets: Vec<Target>,
    /// The ClusterIPs as host prefixes: the Service ranges the lab enforces with.
    pub ranges: Vec<IpNet>,
    pub problems: Vec<Diagnostic>,
}

fn problem(s: &Service, message: String) -> Diagnostic {
    Diagnostic {
        source: None,
        object: format!("Service {}/{}", s.namespace, s.name),
        message,
    }
}

/// kube-proxy's masquerade mark.
const MASQ_MARK: u32 = 0x4000;

/// The rules and targets for `services` over the lab's built `pods` (with their addresses);
/// hairpin traffic is SNAT'd to `node` (the node's IPv4 and IPv6 address).
pub(crate) fn plan(services: &[Service], pods: &[Pod], node: (IpAddr, IpAddr)) -> ServicePlan {
    let mut out = ServicePlan::default();
    let mut rules = String::new();
    let mut ranges = BTreeSet::new();
    for s in services {
        if s.cluster_ips.is_empty() {
            out.problems.push(problem(
                s,
                "headless (no clusterIP): nothing for the lab to translate".into(),
            ));
            continue;
        }
        let mut backends: Vec<&Pod> = if s.selector.is_empty() {
            out.problems.push(problem(
                s,
                "no selector: the lab does not know its endpoints; its ClusterIP answers nothing"
                    .into(),
            ));
            Vec::new()
        } else {
            pods.iter()
                .filter(|p| {
                    // kube-proxy sends new connections to ready endpoints, and a pod
                    // being deleted is not ready.
                    p.namespace == s.namespace
                        && !p.terminating
                        && !p.finished
                        && !p.ips.is_empty()
                        && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect()
        };
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        for ip in &s.cluster_ips {
            ranges.insert(IpNet::from(*ip));
            for sp in &s.ports {
                out.targets.push(Target {
                    label: format!("svc:{}/{}", s.namespace, s.name),
                    ip: *ip,
                    port: sp.port,
                    protocol: sp.protocol,
                });
                let l4 = match sp.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Sctp => {
                        out.problems.push(problem(
                            s,
                            format!("port {}/SCTP is not translated in the lab", sp.port),
                        ));
                        continue;
                    }
                };
                // The first backend with an address of the ClusterIP's family and the port.
                let chosen = backends.iter().find_map(|p| {
                    let addr = p.ips.iter().find(|a| a.is_ipv4() == ip.is_ipv4())?;
                    let port = match &sp.target {
                        TargetPort::Number(n) => *n,
                        TargetPort::Name(name) => {
                            p.ports
                                .iter()
                                .find(|c| {
                                    c.name.as_deref() == Some(name.as_str())
                                        && c.protocol == sp.protocol
                                })?
                                .port
                        }
                    };
                    Some((*addr, port))
                });
                let Some((addr, port)) = chosen else {
                    continue;
                };
                let (fam, to) = match (ip, addr) {
                    (IpAddr::V4(_), IpAddr::V4(a)) => ("ip", format!("{a}:{port}")),
                    (_, a) => ("ip6", format!("[{a}]:{port}")),
                };
                let _ = writeln!(
                    rules,
                    "    {fam} saddr {addr} {fam} daddr {ip} {l4} dport {} meta mark set meta mark | {MASQ_MARK:#x}",
                    sp.port
                );
                let _ = writeln!(
                    rules,
                    "    {fam} daddr {ip} {l4} dport {} dnat {fam} to {to}",
                    sp.port
                );
            }
        }
    }
    out.ranges = ranges.into_iter().collect();
    if !rules.is_empty() {
        // PREROUTING for pods' traffic; OUTPUT for the node's own (hostNetwork pods).
        let (v4, v6) = node;
        out.script = format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n  chain output {{\n    type nat hook output priority -100; policy accept;\n{rules}  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta nfproto ipv4 meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} snat ip to {v4}\n    meta nfproto ipv6 meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} snat ip6 to {v6}\n  }}\n}}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPort, ServicePort};

    fn pod(name: &str, app: &str, ips: &[&str], ports: &[(Option<&str>, u16)]) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: ips.iter().map(|s| s.parse().expect("ip")).collect(),
            node_name: None,
            host_network: false,
            terminating: false,
            finished: false,
            ports: ports
                .iter()
                .map(|(n, p)| ContainerPort {
                    name: n.map(str::to_string),
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
        }
    }

    fn node() -> (IpAddr, IpAddr) {
        (
            "192.0.2.1".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        )
    }

    fn svc(name: &str, app: &str, ips: &[&str], ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: ips.iter().map(|s| s.parse().expect("ip")).collect(),
            selector: [("app".to_string(), app.to_string())].into(),
            ports,
        }
    }

    #[test]
    fn each_port_goes_to_the_first_matching_pod_with_its_target_port() {
        let pods = [
            pod(
                "db-b",
                "db",
                &["10.0.0.3", "fd00::3"],
                &[(Some("pg"), 5433)],
            ),
            pod(
                "db-a",
                "db",
                &["10.0.0.2", "fd00::2"],
                &[(Some("pg"), 5432)],
            ),
            pod("web", "web", &["10.0.0.4"], &[]),
        ];
        let services = [svc(
            "db",
            "db",
            &["10.96.0.10", "fd00:96::a"],
            vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    target: TargetPort::Name("pg".into()),
                },
                ServicePort {
                    port: 53,
                    protocol: Protocol::Udp,
                    target: TargetPort::Number(5353),
                },
            ],
        )];
        let p = plan(&services, &pods, node());
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert!(
            p.script
                .contains("ip daddr 10.96.0.10 tcp dport 80 dnat ip to 10.0.0.2:5432"),
            "{}",
            p.script
        );
        assert!(
            p.script
                .contains("ip daddr 10.96.0.10 udp dport 53 dnat ip to 10.0.0.2:5353")
        );
        assert!(
            p.script
                .contains("ip6 daddr fd00:96::a tcp dport 80 dnat ip6 to [fd00::2]:5432"),
            "{}",
            p.script
        );
        assert!(
            p.script
                .starts_with("table inet npmlab\ndelete table inet npmlab\n")
        );
        // The backend's hairpin is marked for the node's SNAT.
        assert!(p.script.contains(
            "ip saddr 10.0.0.2 ip daddr 10.96.0.10 tcp dport 80 meta mark set meta mark | 0x4000"
        ));
        assert!(p.script.contains("snat ip to 192.0.2.1"));
        assert_eq!(p.targets.len(), 4);
        assert!(p.targets.iter().all(|t| t.label == "svc:default/db"));
        assert_eq!(
            p.ranges,
            vec![
                "10.96.0.10/32".parse::<IpNet>().expect("net"),
                "fd00:96::a/128".parse().expect("net")
            ]
        );
    }

    #[test]
    fn headless_selectorless_and_backendless_services_translate_nothing() {
        let pods = [pod("web", "web", &["10.0.0.4"], &[])];
        let port = || ServicePort {
            port: 80,
            protocol: Protocol::Tcp,
            target: TargetPort::Number(80),
        };
        let mut no_sel = svc("ext", "x", &["10.96.0.2"], vec![port()]);
        no_sel.selector.clear();
        let services = [
            svc("headless", "web", &[], vec![port()]),
            no_sel,
            svc("nobody", "db", &["10.96.0.3"], vec![port()]),
        ];
        let p = plan(&services, &pods, node());
        assert_eq!(p.script, "");
        assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
        // The ClusterIPs without backends are still probed (nothing answers them).
        let labels: Vec<&str> = p.targets.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["svc:default/ext", "svc:default/nobody"]);
    }
}
