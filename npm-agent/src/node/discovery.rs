//! Finds local pods' host-side interfaces from the node's routing state, in the calling
//! thread's network namespace.
//!
//! - Routed CNIs (Calico, Azure CNI transparent mode): the route to the pod IP leaves through
//!   the pod's veth (`10.244.1.5 dev cali1234 scope link`).
//! - Bridged CNIs (kube-router, Azure CNI bridge mode): the route leaves through a bridge; the
//!   neighbour table gives the pod's MAC and the bridge forwarding table gives the port.
//!
//! It reads iproute2's JSON output (`ip -j`, `bridge -j`), which every node image has.
//!
//! Node addresses are those of every interface but kube-proxy's IPVS dummy ([`IPVS_LINK`]),
//! whose addresses are Service ClusterIPs, not the node's.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::{ObjRef, Pod};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("running `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("`{command}` printed JSON this version does not understand")]
    Parse {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A local pod's host-side interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub ifindex: u32,
}

fn run_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<T, DiscoveryError> {
    let command = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| DiscoveryError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(DiscoveryError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let text = if text.trim().is_empty() {
        "[]"
    } else {
        text.trim()
    };
    serde_json::from_str(text).map_err(|source| DiscoveryError::Parse { command, source })
}

#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Route {
    dst: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Neigh {
    dst: String,
    #[serde(default)]
    lladdr: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Fdb {
    mac: String,
    #[serde(default)]
    ifname: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AddrLink {
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    local: IpAddr,
}

/// The routing facts discovery works from (kept apart from the commands so it can be tested).
#[derive(Debug, Default)]
pub struct NodeTables {
    /// ifname -> (ifindex, kind, master)
    links: BTreeMap<String, (u32, Option<String>, Option<String>)>,
    /// Directly connected routes (no gateway): prefix -> device.
    routes: Vec<(IpNet, String)>,
    /// bridge name -> (IP -> MAC)
    neigh: BTreeMap<String, BTreeMap<IpAddr, String>>,
    /// bridge name -> (MAC -> port ifname)
    fdb: BTreeMap<String, BTreeMap<String, String>>,
}

impl NodeTables {
    /// Reads links, routes, and for each bridge its neighbour and forwarding tables.
    pub fn read() -> Result<Self, DiscoveryError> {
        let mut t = NodeTables::default();
        let links: Vec<Link> = run_json(&["ip", "-j", "-d", "link", "show"])?;
        for l in links {
            let kind = l.linkinfo.and_then(|i| i.info_kind);
            t.links.insert(l.ifname, (l.ifindex, kind, l.master));
        }
        for family in ["-4", "-6"] {
            let routes: Vec<Route> = run_json(&["ip", "-j", family, "route", "show"])?;
            for r in routes {
                if r.gateway.is_some() {
                    continue;
                }
                let (Some(dev), Some(net)) = (r.dev, parse_dst(&r.dst)) else {
                    continue;
                };
                t.routes.push((net, dev));
            }
        }
        let bridges: Vec<String> = t
            .links
            .iter()
            .filter(|(_, (_, kind, _))| kind.as_deref() == Some("bridge"))
            .map(|(name, _)| name.clone())
            .collect();
        for br in bridges {
            let neigh: Vec<Neigh> = run_json(&["ip", "-j", "neigh", "show", "dev", &br])?;
            let map = neigh
                .into_iter()
                .filter_map(|n| Some((n.dst.parse().ok()?, n.lladdr?)))
                .collect();
            t.neigh.insert(br.clone(), map);
            let fdb: Vec<Fdb> = run_json(&["bridge", "-j", "fdb", "show", "br", &br])?;
            let map = fdb
                .into_iter()
                .filter_map(|f| Some((f.mac, f.ifname?)))
                .collect();
            t.fdb.insert(br, map);
        }
        Ok(t)
    }

    /// The host-side veth behind which `ip` lives, if it is a local pod address.
    pub fn interface_for(&self, ip: IpAddr) -> Option<HostInterface> {
        let (_, dev) = self
            .routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())?;
        let (ifindex, kind, _) = self.links.get(dev)?;
        match kind.as_deref() {
            Some("veth") => Some(HostInterface {
                name: dev.clone(),
                ifindex: *ifindex,
            }),
            Some("bridge") => {
                let mac = self.neigh.get(dev)?.get(&ip)?;
                let port = self.fdb.get(dev)?.get(mac)?;
                let (port_index, port_kind, master) = self.links.get(port)?;
                (port_kind.as_deref() == Some("veth") && master.as_deref() == Some(dev.as_str()))
                    .then(|| HostInterface {
                        name: port.clone(),
                        ifindex: *port_index,
                    })
            }
            _ => None,
        }
    }
}

fn parse_dst(dst: &str) -> Option<IpNet> {
    if let Ok(net) = dst.parse::<IpNet>() {
        return Some(net);
    }
    dst.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Pods (endpoints, on this node by `node_name` when both sides know it) whose address is
/// behind a local veth, with that interface.
pub fn local_pods<'a>(
    tables: &NodeTables,
    pods: impl IntoIterator<Item = &'a Pod>,
    node_name: Option<&str>,
) -> BTreeMap<ObjRef, HostInterface> {
    let mut out = BTreeMap::new();
    for pod in pods {
        if !pod.is_endpoint() {
            continue;
        }
        if let (Some(want), Some(have)) = (node_name, pod.node_name.as_deref())
            && want != have
        {
            continue;
        }
        if let Some(iface) = pod.ips.iter().find_map(|ip| tables.interface_for(*ip)) {
            out.insert(pod.obj_ref(), iface);
        }
    }
    out
}

/// The dummy interface on which kube-proxy in IPVS mode puts every Service ClusterIP (and
/// external and load-balancer IP) so that the node accepts them. Its addresses are not the
/// node's: counted as node addresses (to and from which traffic always passes), egress to any
/// ClusterIP would pass without the post-DNAT Service check. Only this name is recognised;
/// other dummy interfaces (NodeLocal DNSCache's `nodelocaldns`, addresses a user put on one)
/// stay node addresses, since discovery does not know the Service ranges to tell them apart.
pub const IPVS_LINK: &str = "kube-ipvs0";

/// Every address configured on this network namespace's interfaces but [`IPVS_LINK`].
pub fn node_addresses() -> Result<Vec<IpAddr>, DiscoveryError> {
    let links: Vec<AddrLink> = run_json(&["ip", "-j", "addr", "show"])?;
    Ok(addresses_of(links))
}

/// The node addresses in `ip -j addr show`'s links: sorted, without duplicates, without
/// [`IPVS_LINK`]'s.
fn addresses_of(links: Vec<AddrLink>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = links
        .into_iter()
        .filter(|l| l.ifname != IPVS_LINK)
        .flat_map(|l| l.addr_info.into_iter().map(|a| a.local))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> NodeTables {
        let mut t = NodeTables::default();
        t.links.insert("eth0".into(), (2, None, None));
        t.links
            .insert("cali1".into(), (10, Some("veth".into()), None));
        t.links
            .insert("kube-bridge".into(), (20, Some("bridge".into()), None));
        t.links.insert(
            "veth9".into(),
            (21, Some("veth".into()), Some("kube-bridge".into())),
        );
        t.routes
            .push(("0.0.0.0/0".parse().expect("net"), "eth0".into()));
        t.routes
            .push(("10.244.1.5/32".parse().expect("net"), "cali1".into()));
        t.routes
            .push(("10.244.2.0/24".parse().expect("net"), "kube-bridge".into()));
        t.neigh.insert(
            "kube-bridge".into(),
            [(
                "10.244.2.7".parse().expect("ip"),
                "aa:bb:cc:00:00:07".to_string(),
            )]
            .into(),
        );
        t.fdb.insert(
            "kube-bridge".into(),
            [("aa:bb:cc:00:00:07".to_string(), "veth9".to_string())].into(),
        );
        t
    }

    #[test]
    fn routed_pod_is_found_by_its_route() {
        let i = tables()
            .interface_for("10.244.1.5".parse().expect("ip"))
            .expect("found");
        assert_eq!(
            i,
            HostInterface {
                name: "cali1".into(),
                ifindex: 10
            }
        );
    }

    #[test]
    fn bridged_pod_is_found_through_neighbour_and_fdb() {
        let i = tables()
            .interface_for("10.244.2.7".parse().expect("ip"))
            .expect("found");
        assert_eq!(
            i,
            HostInterface {
                name: "veth9".into(),
                ifindex: 21
            }
        );
    }

    /// `ip -j addr show` on an IPVS-mode node (iproute2 6.1's field set, trimmed to one
    /// address family where both say the same): ClusterIPs on kube-ipvs0, a NodeLocal
    /// DNSCache dummy, a pod veth without addresses.
    const IPVS_NODE_ADDR_JSON: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,
       "operstate":"UNKNOWN","link_type":"loopback","address":"00:00:00:00:00:00",
       "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo"},
                    {"family":"inet6","local":"::1","prefixlen":128,"scope":"host"}]},
      {"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,
       "operstate":"UP","link_type":"ether","address":"02:fc:00:00:00:01",
       "addr_info":[{"family":"inet","local":"192.0.2.2","prefixlen":24,"broadcast":"192.0.2.255",
                     "scope":"global","label":"eth0"},
                    {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"}]},
      {"ifindex":5,"ifname":"kube-ipvs0","flags":["BROADCAST","NOARP"],"mtu":1500,
       "operstate":"DOWN","link_type":"ether","address":"7e:1c:2b:3a:4d:5e",
       "addr_info":[{"family":"inet","local":"10.96.0.1","prefixlen":32,"scope":"global","label":"kube-ipvs0"},
                    {"family":"inet","local":"10.96.0.10","prefixlen":32,"scope":"global","label":"kube-ipvs0"},
                    {"family":"inet6","local":"fd00:10:96::1","prefixlen":128,"scope":"global"}]},
      {"ifindex":6,"ifname":"nodelocaldns","flags":["BROADCAST","NOARP"],"mtu":1500,
       "operstate":"DOWN","link_type":"ether","address":"aa:3c:11:22:33:44",
       "addr_info":[{"family":"inet","local":"169.254.20.10","prefixlen":32,"scope":"global","label":"nodelocaldns"}]},
      {"ifindex":7,"ifname":"cali1","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,
       "operstate":"UP","link_type":"ether","address":"ee:ee:ee:ee:ee:ee","link_netnsid":0,
       "addr_info":[]}
    ]"#;

    #[test]
    fn ipvs_cluster_ips_on_kube_ipvs0_are_not_node_addresses() {
        let links: Vec<AddrLink> = serde_json::from_str(IPVS_NODE_ADDR_JSON).expect("ip -j addr");
        let got = addresses_of(links);
        let want: Vec<IpAddr> = ["127.0.0.1", "169.254.20.10", "192.0.2.2", "::1", "fd00::2"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(got, want, "every interface's addresses but kube-ipvs0's");
    }

    #[test]
    fn remote_and_unknown_addresses_are_not_local() {
        let t = tables();
        assert_eq!(t.interface_for("8.8.8.8".parse().expect("ip")), None);
        // On the bridge subnet but with no neighbour entry: not known to be here.
        assert_eq!(t.interface_for("10.244.2.9".parse().expect("ip")), None);
    }
}
