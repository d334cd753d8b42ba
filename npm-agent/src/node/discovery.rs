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

/// Runs `args` and returns its standard output.
fn run_text(args: &[&str]) -> Result<String, DiscoveryError> {
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses `command`'s JSON output `text` (empty output is an empty list).
fn parse_json<T: for<'de> Deserialize<'de>>(
    command: &str,
    text: &str,
) -> Result<T, DiscoveryError> {
    let text = if text.trim().is_empty() {
        "[]"
    } else {
        text.trim()
    };
    serde_json::from_str(text).map_err(|source| DiscoveryError::Parse {
        command: command.to_owned(),
        source,
    })
}

fn run_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<T, DiscoveryError> {
    parse_json(&args.join(" "), &run_text(args)?)
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
        t.add_links(&run_text(&["ip", "-j", "-d", "link", "show"])?)?;
        for family in ["-4", "-6"] {
            t.add_routes(&run_text(&["ip", "-j", family, "route", "show"])?)?;
        }
        for br in t.bridges() {
            let neigh = run_text(&["ip", "-j", "neigh", "show", "dev", &br])?;
            let fdb = run_text(&["bridge", "-j", "fdb", "show", "br", &br])?;
            t.add_bridge(&br, &neigh, &fdb)?;
        }
        Ok(t)
    }

    /// Adds the links of `ip -j -d link show`'s output.
    pub fn add_links(&mut self, json: &str) -> Result<(), DiscoveryError> {
        let links: Vec<Link> = parse_json("ip -j -d link show", json)?;
        for l in links {
            let kind = l.linkinfo.and_then(|i| i.info_kind);
            self.links.insert(l.ifname, (l.ifindex, kind, l.master));
        }
        Ok(())
    }

    /// Adds the directly connected routes of `ip -j route show`'s output (either family).
    pub fn add_routes(&mut self, json: &str) -> Result<(), DiscoveryError> {
        let routes: Vec<Route> = parse_json("ip -j route show", json)?;
        for r in routes {
            if r.gateway.is_some() {
                continue;
            }
            let (Some(dev), Some(net)) = (r.dev, parse_dst(&r.dst)) else {
                continue;
            };
            self.routes.push((net, dev));
        }
        Ok(())
    }

    /// The bridges among the links.
    pub fn bridges(&self) -> Vec<String> {
        self.links
            .iter()
            .filter(|(_, (_, kind, _))| kind.as_deref() == Some("bridge"))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Adds bridge `br`'s neighbour table (`ip -j neigh show dev br`) and forwarding table
    /// (`bridge -j fdb show br br`).
    pub fn add_bridge(&mut self, br: &str, neigh: &str, fdb: &str) -> Result<(), DiscoveryError> {
        let neigh: Vec<Neigh> = parse_json("ip -j neigh show", neigh)?;
        let map = neigh
            .into_iter()
            .filter_map(|n| Some((n.dst.parse().ok()?, n.lladdr?)))
            .collect();
        self.neigh.insert(br.to_owned(), map);
        let fdb: Vec<Fdb> = parse_json("bridge -j fdb show", fdb)?;
        let map = fdb
            .into_iter()
            .filter_map(|f| Some((f.mac, f.ifname?)))
            .collect();
        self.fdb.insert(br.to_owned(), map);
        Ok(())
    }

    /// The host-side veth behind which `ip` lives, if it is a local pod address.
    pub fn interface_for(&self, ip: IpAddr) -> Option<HostInterface> {
        self.resolve(ip).map(|(i, _)| i)
    }

    /// The device of the longest directly connected route to `ip`.
    fn route_dev(&self, ip: IpAddr) -> Option<&String> {
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, dev)| dev)
    }

    /// [`NodeTables::interface_for`], and whether the route named the veth itself (written
    /// by the CNI: authoritative) or a bridge whose neighbour and fdb entries led to it
    /// (learnt from the pods' own frames).
    fn resolve(&self, ip: IpAddr) -> Option<(HostInterface, Via)> {
        let dev = self.route_dev(ip)?;
        let (ifindex, kind, _) = self.links.get(dev)?;
        match kind.as_deref() {
            Some("veth") => Some((
                HostInterface {
                    name: dev.clone(),
                    ifindex: *ifindex,
                },
                Via::Route,
            )),
            Some("bridge") => {
                let mac = self.neigh.get(dev)?.get(&ip)?;
                let port = self.fdb.get(dev)?.get(mac)?;
                let (port_index, port_kind, master) = self.links.get(port)?;
                (port_kind.as_deref() == Some("veth") && master.as_deref() == Some(dev.as_str()))
                    .then(|| {
                        (
                            HostInterface {
                                name: port.clone(),
                                ifindex: *port_index,
                            },
                            Via::Bridge,
                        )
                    })
            }
            _ => None,
        }
    }

    /// The veth `ifindex` when it still exists as a port of the bridge the routes send `ip`
    /// to.
    fn bridge_port_for(&self, ip: IpAddr, ifindex: u32) -> Option<HostInterface> {
        let dev = self.route_dev(ip)?;
        let (_, kind, _) = self.links.get(dev)?;
        if kind.as_deref() != Some("bridge") {
            return None;
        }
        self.links
            .iter()
            .find(|(_, (i, k, master))| {
                *i == ifindex && k.as_deref() == Some("veth") && master.as_deref() == Some(dev)
            })
            .map(|(name, (i, _, _))| HostInterface {
                name: name.clone(),
                ifindex: *i,
            })
    }
}

/// How an address was tied to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// A directly connected route through the veth.
    Route,
    /// A route through a bridge, then its neighbour and forwarding entries.
    Bridge,
}

/// What [`place_pods`] found: each local pod's interface, and the pods that more than one
/// interface claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub pods: BTreeMap<ObjRef, HostInterface>,
    pub conflicts: Vec<PlacementConflict>,
}

/// A pod that another interface than the one it is placed on also claims: one of its
/// addresses resolves there (a bridge's neighbour or fdb entry pointing at another port,
/// which a pod's own ARP, neighbour advertisements or source MACs can cause; or a dual-stack
/// pod whose addresses resolve to two interfaces). Reported, never acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementConflict {
    pub pod: ObjRef,
    pub placed: HostInterface,
    pub also_claimed_by: Vec<HostInterface>,
}

impl std::fmt::Display for PlacementConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let others: Vec<String> = self
            .also_claimed_by
            .iter()
            .map(|i| format!("{} (ifindex {})", i.name, i.ifindex))
            .collect();
        write!(
            f,
            "pod {} stays on {} (ifindex {}); the node's tables also tie it to {}",
            self.pod,
            self.placed.name,
            self.placed.ifindex,
            others.join(", ")
        )
    }
}

fn parse_dst(dst: &str) -> Option<IpNet> {
    if let Ok(net) = dst.parse::<IpNet>() {
        return Some(net);
    }
    dst.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Pods (endpoints, on this node by `node_name` when both sides know it) whose address is
/// behind a local veth, with that interface, as a first placement ([`place_pods`] with
/// nothing placed yet).
pub fn local_pods<'a>(
    tables: &NodeTables,
    pods: impl IntoIterator<Item = &'a Pod>,
    node_name: Option<&str>,
) -> BTreeMap<ObjRef, HostInterface> {
    place_pods(tables, pods, node_name, &BTreeMap::new()).pods
}

/// Ties this node's pods to their interfaces, given where they are placed now (`current`:
/// `ClusterSnapshot::local`, pod → ifindex). Pure.
///
/// A route through a veth is the CNI's word and decides (a pod's sandbox recreated on a new
/// veth moves with it). A bridge's neighbour and fdb entries are learnt from the pods' own
/// frames, so a pod could point them at itself; a pod placed on a veth keeps it while that
/// veth is still a port of the bridge the routes send one of its addresses to, whatever the
/// entries say now (a changed entry is a [`PlacementConflict`], reported, not followed), and
/// moves only when its veth is gone or left the bridge. A pod not placed yet takes its first
/// address's interface. Addresses resolving to two interfaces are a conflict too.
pub fn place_pods<'a>(
    tables: &NodeTables,
    pods: impl IntoIterator<Item = &'a Pod>,
    node_name: Option<&str>,
    current: &BTreeMap<ObjRef, u32>,
) -> Placement {
    let mut out = Placement::default();
    for pod in pods {
        if !pod.is_endpoint() {
            continue;
        }
        if let (Some(want), Some(have)) = (node_name, pod.node_name.as_deref())
            && want != have
        {
            continue;
        }
        let obj = pod.obj_ref();
        let mut claims: Vec<(HostInterface, Via)> = Vec::new();
        for ip in &pod.ips {
            if let Some((i, via)) = tables.resolve(*ip)
                && !claims.iter().any(|(c, _)| c.ifindex == i.ifindex)
            {
                claims.push((i, via));
            }
        }
        let cur = current.get(&obj).copied();
        let routed: Vec<&HostInterface> = claims
            .iter()
            .filter(|(_, via)| *via == Via::Route)
            .map(|(i, _)| i)
            .collect();
        let chosen = if !routed.is_empty() {
            routed
                .iter()
                .find(|i| Some(i.ifindex) == cur)
                .or(routed.first())
                .map(|i| (*i).clone())
        } else if let Some(kept) =
            cur.and_then(|c| pod.ips.iter().find_map(|ip| tables.bridge_port_for(*ip, c)))
        {
            Some(kept)
        } else {
            claims.first().map(|(i, _)| i.clone())
        };
        let Some(chosen) = chosen else {
            continue;
        };
        let others: Vec<HostInterface> = claims
            .iter()
            .map(|(i, _)| i)
            .filter(|i| i.ifindex != chosen.ifindex)
            .cloned()
            .collect();
        if !others.is_empty() {
            out.conflicts.push(PlacementConflict {
                pod: obj.clone(),
                placed: chosen.clone(),
                also_claimed_by: others,
            });
        }
        out.pods.insert(obj, chosen);
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

    /// `ip -j -d link show` of a bridged node (iproute2 6.1's fields, trimmed): kube-bridge
    /// with two pod veths, vethA (pod a) and vethB (pod b), and a routed veth cali1.
    const BRIDGED_LINKS_JSON: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback"},
      {"ifindex":2,"ifname":"eth0","flags":["UP"],"mtu":1500,"link_type":"ether"},
      {"ifindex":20,"ifname":"kube-bridge","flags":["UP"],"mtu":1500,"link_type":"ether",
       "linkinfo":{"info_kind":"bridge","info_data":{"stp_state":0}}},
      {"ifindex":21,"link_index":2,"ifname":"vethA","flags":["UP"],"mtu":1500,
       "master":"kube-bridge","link_type":"ether","link_netnsid":1,
       "linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
      {"ifindex":22,"link_index":2,"ifname":"vethB","flags":["UP"],"mtu":1500,
       "master":"kube-bridge","link_type":"ether","link_netnsid":2,
       "linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
      {"ifindex":30,"link_index":2,"ifname":"cali1","flags":["UP"],"mtu":1500,
       "link_type":"ether","link_netnsid":3,"linkinfo":{"info_kind":"veth"}}
    ]"#;
    /// `ip -j -4 route show` and `ip -j -6 route show`.
    const ROUTES4_JSON: &str = r#"[
      {"dst":"default","gateway":"192.0.2.254","dev":"eth0","flags":[]},
      {"dst":"10.244.2.0/24","dev":"kube-bridge","protocol":"kernel","scope":"link",
       "prefsrc":"10.244.2.1","flags":[]},
      {"dst":"10.244.9.9","dev":"cali1","scope":"link","flags":[]}
    ]"#;
    const ROUTES6_JSON: &str = r#"[
      {"dst":"fd00:244:2::/64","dev":"kube-bridge","protocol":"kernel","metric":256,
       "flags":[],"pref":"medium"}
    ]"#;
    const MAC_A: &str = "aa:bb:cc:00:00:0a";
    const MAC_B: &str = "aa:bb:cc:00:00:0b";

    /// `ip -j neigh show dev kube-bridge` with pod b's IPv4 (and IPv6) address at `b_mac`.
    fn neigh_json(b_mac: &str) -> String {
        format!(
            r#"[{{"dst":"10.244.2.10","lladdr":"{MAC_A}","state":["REACHABLE"]}},
               {{"dst":"10.244.2.11","lladdr":"{b_mac}","state":["STALE"]}},
               {{"dst":"fd00:244:2::11","lladdr":"{MAC_B}","state":["REACHABLE"]}},
               {{"dst":"10.244.2.99","state":["FAILED"]}}]"#
        )
    }

    /// `bridge -j fdb show br kube-bridge`: the MACs learnt on their ports.
    fn fdb_json(b_port: &str) -> String {
        format!(
            r#"[{{"mac":"{MAC_A}","ifname":"vethA","master":"kube-bridge","state":""}},
               {{"mac":"{MAC_B}","ifname":"{b_port}","master":"kube-bridge","state":""}},
               {{"mac":"33:33:00:00:00:01","ifname":"kube-bridge","state":"permanent"}}]"#
        )
    }

    fn bridged(links: &str, neigh: &str, fdb: &str) -> NodeTables {
        let mut t = NodeTables::default();
        t.add_links(links).expect("links");
        t.add_routes(ROUTES4_JSON).expect("routes");
        t.add_routes(ROUTES6_JSON).expect("routes");
        for br in t.bridges() {
            t.add_bridge(&br, neigh, fdb).expect("bridge tables");
        }
        t
    }

    fn bridged_pod(name: &str, ips: &[&str]) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            labels: Default::default(),
            ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            node_name: None,
            host_network: false,
            terminating: false,
            finished: false,
            ports: vec![],
        }
    }

    fn iface(name: &str, ifindex: u32) -> HostInterface {
        HostInterface {
            name: name.into(),
            ifindex,
        }
    }

    #[test]
    fn a_placed_pod_stays_on_its_veth_when_bridge_entries_point_elsewhere() {
        let a = bridged_pod("a", &["10.244.2.10"]);
        let b = bridged_pod("b", &["10.244.2.11"]);
        let pods = [a.clone(), b.clone()];
        // First pass: the tables are right.
        let t = bridged(BRIDGED_LINKS_JSON, &neigh_json(MAC_B), &fdb_json("vethB"));
        let first = place_pods(&t, &pods, None, &BTreeMap::new());
        assert_eq!(first.pods[&b.obj_ref()], iface("vethB", 22));
        assert_eq!(first.pods[&a.obj_ref()], iface("vethA", 21));
        assert!(first.conflicts.is_empty());
        let current: BTreeMap<ObjRef, u32> =
            [(a.obj_ref(), 21), (b.obj_ref(), 22)].into_iter().collect();

        // Pod a claims b's address (a gratuitous ARP put a's MAC in the neighbour entry):
        // b stays on vethB, the conflict names vethA.
        let poisoned = bridged(BRIDGED_LINKS_JSON, &neigh_json(MAC_A), &fdb_json("vethB"));
        let p = place_pods(&poisoned, &pods, None, &current);
        assert_eq!(p.pods[&b.obj_ref()], iface("vethB", 22));
        assert_eq!(p.pods[&a.obj_ref()], iface("vethA", 21));
        assert_eq!(
            p.conflicts,
            vec![PlacementConflict {
                pod: b.obj_ref(),
                placed: iface("vethB", 22),
                also_claimed_by: vec![iface("vethA", 21)],
            }]
        );
        assert!(p.conflicts[0].to_string().contains("stays on vethB"));
        // The same with b's MAC learnt on a's port (a sent frames from it).
        let p = place_pods(
            &bridged(BRIDGED_LINKS_JSON, &neigh_json(MAC_B), &fdb_json("vethA")),
            &pods,
            None,
            &current,
        );
        assert_eq!(p.pods[&b.obj_ref()], iface("vethB", 22));
        assert_eq!(p.conflicts.len(), 1);
        // Without the current placement (the old behaviour, and a pod not placed yet), the
        // entries decide: b would be a's.
        assert_eq!(
            local_pods(&poisoned, &pods, None)[&b.obj_ref()],
            iface("vethA", 21)
        );
    }

    #[test]
    fn a_pod_moves_when_its_veth_is_gone_or_the_routes_say_so() {
        let b = bridged_pod("b", &["10.244.2.11"]);
        let pods = [b.clone()];
        let current: BTreeMap<ObjRef, u32> = [(b.obj_ref(), 22)].into_iter().collect();
        // vethB is gone (the pod's sandbox was recreated behind vethA): b moves, no conflict.
        let links: Vec<serde_json::Value> = serde_json::from_str(BRIDGED_LINKS_JSON).expect("json");
        let without_b: Vec<serde_json::Value> = links
            .iter()
            .filter(|l| l["ifname"] != "vethB")
            .cloned()
            .collect();
        let without_b = serde_json::to_string(&without_b).expect("json");
        let t = bridged(&without_b, &neigh_json(MAC_A), &fdb_json("vethA"));
        let p = place_pods(&t, &pods, None, &current);
        assert_eq!(p.pods[&b.obj_ref()], iface("vethA", 21));
        assert!(p.conflicts.is_empty());
        // vethB still exists but left the bridge: moves as well.
        let detached = BRIDGED_LINKS_JSON.replacen(
            r#""ifname":"vethB","flags":["UP"],"mtu":1500,
       "master":"kube-bridge","#,
            r#""ifname":"vethB","flags":["UP"],"mtu":1500,"#,
            1,
        );
        assert_ne!(detached, BRIDGED_LINKS_JSON);
        let t = bridged(&detached, &neigh_json(MAC_A), &fdb_json("vethA"));
        assert_eq!(
            place_pods(&t, &pods, None, &current).pods[&b.obj_ref()],
            iface("vethA", 21)
        );
        // Its veth still a port, but no neighbour entry (expired): it stays.
        let t = bridged(BRIDGED_LINKS_JSON, "[]", &fdb_json("vethB"));
        let p = place_pods(&t, &pods, None, &current);
        assert_eq!(p.pods[&b.obj_ref()], iface("vethB", 22));
        assert!(p.conflicts.is_empty());
        // A route through a veth is the CNI's word: a pod placed elsewhere follows it.
        let r = bridged_pod("r", &["10.244.9.9"]);
        let current: BTreeMap<ObjRef, u32> = [(r.obj_ref(), 21)].into_iter().collect();
        let t = bridged(BRIDGED_LINKS_JSON, &neigh_json(MAC_B), &fdb_json("vethB"));
        let p = place_pods(&t, [&r], None, &current);
        assert_eq!(p.pods[&r.obj_ref()], iface("cali1", 30));
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn a_dual_stack_pod_whose_addresses_resolve_to_two_veths_is_a_conflict() {
        // b's IPv6 address resolves to vethB, its IPv4 address (poisoned) to vethA.
        let b = bridged_pod("b", &["10.244.2.11", "fd00:244:2::11"]);
        let t = bridged(BRIDGED_LINKS_JSON, &neigh_json(MAC_A), &fdb_json("vethB"));
        let current: BTreeMap<ObjRef, u32> = [(b.obj_ref(), 22)].into_iter().collect();
        let p = place_pods(&t, [&b], None, &current);
        assert_eq!(p.pods[&b.obj_ref()], iface("vethB", 22));
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].also_claimed_by, vec![iface("vethA", 21)]);
        // Not placed yet: its first address decides, and the conflict is reported.
        let p = place_pods(&t, [&b], None, &BTreeMap::new());
        assert_eq!(p.pods[&b.obj_ref()], iface("vethA", 21));
        assert_eq!(p.conflicts[0].also_claimed_by, vec![iface("vethB", 22)]);
    }

    #[test]
    fn remote_and_unknown_addresses_are_not_local() {
        let t = tables();
        assert_eq!(t.interface_for("8.8.8.8".parse().expect("ip")), None);
        // On the bridge subnet but with no neighbour entry: not known to be here.
        assert_eq!(t.interface_for("10.244.2.9".parse().expect("ip")), None);
    }
}
