//! Watches the network namespace's links through rtnetlink multicast, so a new pod's host-side
//! interface is seen the moment the CNI creates (or moves in) it, before the API reports the
//! pod's IP.
//!
//! - [`LinkWatcher`] subscribes to `RTNLGRP_LINK` (links), the IPv4/IPv6 route groups and
//!   `RTNLGRP_NEIGH` (a route or neighbour to a pod IP appearing lets discovery tie a link to
//!   its pod), and turns what the kernel sends into [`LinkEvent`]s.
//! - [`dump_links`] lists the links once (start-up, and after the socket overflowed).
//! - [`PodLinks`] keeps the set of candidate pod interfaces ([`LinkFilter`]: veth whose name
//!   starts with a CNI prefix) and turns events into [`PodLinkDelta`]s: appeared, gone.
//! - [`node_changes`] (pure) gives the [`Change`]s that bring a snapshot's `local` and
//!   `pending_links` in line with the live candidate links and what discovery tied to pods.
//!
//! Everything here works in the calling thread's network namespace (the agent's, or the lab
//! node's when the agent runs under `nsenter`).
use std::collections::{BTreeMap, BTreeSet};
use std::io;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::model::ObjRef;
use crate::state::{Change, ClusterSnapshot};

/// Host-side interface name prefixes of common CNIs: Azure CNI (`azv`), Calico (`cali`),
/// the reference veth/bridge plugins, kube-router, Flannel (`veth`), Cilium and this
/// project's lab (`lxc`), the AWS VPC CNI (`eni`).
pub const DEFAULT_POD_PREFIXES: [&str; 5] = ["azv", "cali", "veth", "lxc", "eni"];

/// Socket receive buffer: bursts of link/route/neighbour notifications (a node starting many
/// pods) must not overflow it; if they do, we relist ([`LinkEvent::Overflow`]).
const RCVBUF: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("opening the rtnetlink socket")]
    Socket(#[source] io::Error),
    #[error("subscribing to rtnetlink group {group}")]
    Subscribe {
        group: u32,
        #[source]
        source: io::Error,
    },
    #[error("receiving from the rtnetlink socket")]
    Receive(#[source] io::Error),
    #[error("sending the link dump request")]
    Send(#[source] io::Error),
    #[error("the kernel refused the link dump (errno {0})")]
    Refused(i32),
}

impl LinkError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Socket(_) => "socket",
            Self::Subscribe { .. } => "subscribe",
            Self::Receive(_) => "receive",
            Self::Send(_) => "send",
            Self::Refused(_) => "refused",
        }
    }
}

/// One link as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "bridge", ... (None for physical devices and `lo`).
    pub kind: Option<String>,
    /// Ifindex of the bridge (or bond) this link is a port of.
    pub master: Option<u32>,
}

/// What the watcher saw, in the order the kernel sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (`RTM_NEWLINK` is sent for both).
    Link(Link),
    /// A link went away (deleted, or moved to another namespace).
    Gone(u32),
    /// A route or neighbour entry changed: discovery may now tie a link to a pod.
    Tables,
    /// The socket overflowed: notifications were lost, relist with [`dump_links`].
    Overflow,
}

/// Which links are candidate pod interfaces: veth whose name starts with one of `prefixes`
/// (an empty prefix admits every veth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFilter {
    pub prefixes: Vec<String>,
}

impl Default for LinkFilter {
    fn default() -> Self {
        Self {
            prefixes: DEFAULT_POD_PREFIXES.iter().map(|p| p.to_string()).collect(),
        }
    }
}

impl LinkFilter {
    pub fn is_pod_interface(&self, link: &Link) -> bool {
        link.kind.as_deref() == Some("veth")
            && self.prefixes.iter().any(|p| link.name.starts_with(p))
    }
}

/// A change to the set of candidate pod interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLinkDelta {
    /// New (or renamed into the filter, or renamed: attach again under the new name).
    Appeared(Link),
    Gone(Link),
}

/// The live candidate pod interfaces of this namespace, by ifindex.
#[derive(Clone, Debug, Default)]
pub struct PodLinks {
    filter: LinkFilter,
    links: BTreeMap<u32, Link>,
}

impl PodLinks {
    pub fn new(filter: LinkFilter) -> Self {
        Self {
            filter,
            links: BTreeMap::new(),
        }
    }

    pub fn links(&self) -> &BTreeMap<u32, Link> {
        &self.links
    }

    /// Applies one event; returns what changed for the candidate set.
    pub fn on_event(&mut self, event: &LinkEvent) -> Option<PodLinkDelta> {
        match event {
            LinkEvent::Link(link) => {
                let wanted = self.filter.is_pod_interface(link);
                match (self.links.get(&link.ifindex), wanted) {
                    (Some(old), true) if old.name == link.name => {
                        // State change (up, carrier, master): keep what we know.
                        self.links.insert(link.ifindex, link.clone());
                        None
                    }
                    (_, true) => {
                        self.links.insert(link.ifindex, link.clone());
                        Some(PodLinkDelta::Appeared(link.clone()))
                    }
                    (Some(_), false) => self.links.remove(&link.ifindex).map(PodLinkDelta::Gone),
                    (None, false) => None,
                }
            }
            LinkEvent::Gone(ifindex) => self.links.remove(ifindex).map(PodLinkDelta::Gone),
            LinkEvent::Tables | LinkEvent::Overflow => None,
        }
    }

    /// Replaces the set with a full listing; returns what changed.
    pub fn relist(&mut self, all: &[Link]) -> Vec<PodLinkDelta> {
        let present: BTreeSet<u32> = all.iter().map(|l| l.ifindex).collect();
        let mut out: Vec<PodLinkDelta> = self
            .links
            .keys()
            .filter(|i| !present.contains(i))
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|i| self.on_event(&LinkEvent::Gone(i)))
            .collect();
        out.extend(
            all.iter()
                .filter_map(|l| self.on_event(&LinkEvent::Link(l.clone()))),
        );
        out
    }
}

/// The changes that make `snapshot.local` equal `local` (discovery's pods, restricted by the
/// caller to interfaces that carry our programs) and `snapshot.pending_links` equal the live
/// candidate links that no local pod uses. Local entries come first, so applying the changes
/// in order never shows a link both pending and unknown.
pub fn node_changes(
    snapshot: &ClusterSnapshot,
    live: &BTreeSet<u32>,
    local: &BTreeMap<ObjRef, u32>,
) -> Vec<Change> {
    let mut out = Vec::new();
    for (pod, ifindex) in local {
        if snapshot.local.get(pod) != Some(ifindex) {
            out.push(Change::Local(pod.clone(), Some(*ifindex)));
        }
    }
    for pod in snapshot.local.keys() {
        if !local.contains_key(pod) {
            out.push(Change::Local(pod.clone(), None));
        }
    }
    let used: BTreeSet<u32> = local.values().copied().collect();
    let pending: BTreeSet<u32> = live.difference(&used).copied().collect();
    for i in pending.difference(&snapshot.pending_links) {
        out.push(Change::PendingLink(*i, true));
    }
    for i in snapshot.pending_links.difference(&pending) {
        out.push(Change::PendingLink(*i, false));
    }
    out
}

/// Parses one datagram from an rtnetlink socket into events. Messages this version cannot
/// decode become [`LinkEvent::Overflow`] (relist: safe, if slower).
pub fn parse_datagram(buf: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 16 <= buf.len() {
        let bytes = &buf[offset..];
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < 16 || len > bytes.len() {
            out.push(LinkEvent::Overflow);
            break;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len]) {
            Ok(msg) => {
                if let Some(e) = event_of(msg.payload) {
                    out.push(e);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "undecodable rtnetlink message; relisting");
                out.push(LinkEvent::Overflow);
            }
        }
        // Messages are 4-byte aligned.
        offset += (len + 3) & !3;
    }
    out
}

fn event_of(payload: NetlinkPayload<RouteNetlinkMessage>) -> Option<LinkEvent> {
    match payload {
        NetlinkPayload::InnerMessage(m) => match m {
            RouteNetlinkMessage::NewLink(l) => link_of(&l).map(LinkEvent::Link),
            RouteNetlinkMessage::DelLink(l) => Some(LinkEvent::Gone(l.header.index)),
            RouteNetlinkMessage::NewRoute(_)
            | RouteNetlinkMessage::DelRoute(_)
            | RouteNetlinkMessage::NewNeighbour(_) => Some(LinkEvent::Tables),
            _ => None,
        },
        NetlinkPayload::Overrun(_) => Some(LinkEvent::Overflow),
        _ => None,
    }
}

fn link_of(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut kind = None;
    let mut master = None;
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Controller(m) => master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Link {
        ifindex: msg.header.index,
        name: name?,
        kind,
        master,
    })
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".to_owned(),
        InfoKind::Bridge => "bridge".to_owned(),
        other => other.to_string(),
    }
}

fn open(groups: &[u32]) -> Result<Socket, LinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(LinkError::Socket)?;
    socket.bind_auto().map_err(LinkError::Socket)?;
    if let Err(error) = socket.set_rx_buf_sz(RCVBUF) {
        tracing::debug!(%error, "could not enlarge the rtnetlink receive buffer");
    }
    for &group in groups {
        socket
            .add_membership(group)
            .map_err(|source| LinkError::Subscribe { group, source })?;
    }
    Ok(socket)
}

/// Every link of the calling thread's network namespace (`RTM_GETLINK` dump).
pub fn dump_links() -> Result<Vec<Link>, LinkError> {
    let socket = open(&[])?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(LinkError::Socket)?;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0).map_err(LinkError::Send)?;
    let mut out = Vec::new();
    // Bounded: a dump ends with NLMSG_DONE; a node has far fewer links than this.
    for _ in 0..100_000 {
        let (data, _) = socket.recv_from_full().map_err(LinkError::Receive)?;
        let mut offset = 0;
        while offset + 16 <= data.len() {
            let len = u32::from_ne_bytes([
                data[offset],
                data[offset + 1],
                data[offset + 2],
                data[offset + 3],
            ]) as usize;
            if len < 16 || offset + len > data.len() {
                break;
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..offset + len]) {
                Ok(msg) => match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return Err(LinkError::Refused(e.code.map_or(0, |c| c.get())));
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                        out.extend(link_of(&l));
                    }
                    _ => {}
                },
                Err(error) => tracing::debug!(%error, "undecodable link in the dump; skipped"),
            }
            offset += (len + 3) & !3;
        }
    }
    Ok(out)
}

/// A batch of events from one datagram, with the moment it was read.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub events: Vec<LinkEvent>,
}

/// A subscription to link, route and neighbour notifications, read by a thread of its own
/// (a blocking socket: no unsafe fd registration) and handed over through a channel.
#[derive(Debug)]
pub struct LinkWatcher {
    rx: mpsc::UnboundedReceiver<Result<Received, LinkError>>,
}

impl LinkWatcher {
    /// Subscribes in the calling thread's network namespace (call before [`dump_links`], so
    /// nothing falls between the listing and the first notification). The reader thread
    /// ends when the watcher is dropped and the next datagram arrives, or at process exit.
    pub fn open() -> Result<Self, LinkError> {
        let socket = open(&[
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
            libc::RTNLGRP_NEIGH,
        ])?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("npm-links".into())
            .spawn(move || read_loop(&socket, &tx))
            .map_err(LinkError::Socket)?;
        Ok(Self { rx })
    }

    /// Waits for the next datagram's events (possibly none: notifications we do not care
    /// about). `ENOBUFS` (we fell behind) becomes [`LinkEvent::Overflow`].
    pub async fn next(&mut self) -> Result<Received, LinkError> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err(LinkError::Receive(io::Error::other(
                "link watcher thread ended",
            ))),
        }
    }

    /// What is already queued, without waiting (for draining a burst).
    pub fn try_next(&mut self) -> Option<Result<Received, LinkError>> {
        self.rx.try_recv().ok()
    }
}

fn read_loop(socket: &Socket, tx: &mpsc::UnboundedSender<Result<Received, LinkError>>) {
    loop {
        let item = match socket.recv_from_full() {
            Ok((data, _)) => Ok(Received {
                at: Instant::now(),
                events: parse_datagram(&data),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received {
                at: Instant::now(),
                events: vec![LinkEvent::Overflow],
            }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(LinkError::Receive(e)),
        };
        let fatal = item.is_err();
        if tx.send(item).is_err() || fatal {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkHeader;

    fn link(ifindex: u32, name: &str, kind: Option<&str>) -> Link {
        Link {
            ifindex,
            name: name.into(),
            kind: kind.map(str::to_owned),
            master: None,
        }
    }

    fn datagram(msgs: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
            nl.finalize();
            let mut buf = vec![0; nl.buffer_len()];
            nl.serialize(&mut buf);
            out.extend(buf);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        }
        out
    }

    fn link_msg(
        index: u32,
        name: &str,
        kind: Option<InfoKind>,
        master: Option<u32>,
    ) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header = LinkHeader {
            index,
            ..LinkHeader::default()
        };
        m.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(k) = kind {
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(k)]));
        }
        if let Some(c) = master {
            m.attributes.push(LinkAttribute::Controller(c));
        }
        m
    }

    #[test]
    fn filter_takes_prefixed_veths_only() {
        let f = LinkFilter::default();
        assert!(f.is_pod_interface(&link(5, "cali12ab", Some("veth"))));
        assert!(f.is_pod_interface(&link(5, "lxc3", Some("veth"))));
        assert!(!f.is_pod_interface(&link(5, "eth0", None)));
        assert!(!f.is_pod_interface(&link(5, "cali12ab", Some("bridge"))));
        assert!(
            !f.is_pod_interface(&link(5, "ext0", Some("veth"))),
            "lab externals"
        );
        let any = LinkFilter {
            prefixes: vec![String::new()],
        };
        assert!(any.is_pod_interface(&link(5, "whatever", Some("veth"))));
    }

    #[test]
    fn parses_new_and_deleted_links_and_table_changes() {
        let data = datagram(vec![
            RouteNetlinkMessage::NewLink(link_msg(7, "azv1", Some(InfoKind::Veth), Some(3))),
            RouteNetlinkMessage::DelLink(link_msg(8, "azv2", Some(InfoKind::Veth), None)),
            RouteNetlinkMessage::NewRoute(Default::default()),
            RouteNetlinkMessage::NewLink(link_msg(9, "br0", Some(InfoKind::Bridge), None)),
        ]);
        assert_eq!(
            parse_datagram(&data),
            vec![
                LinkEvent::Link(Link {
                    ifindex: 7,
                    name: "azv1".into(),
                    kind: Some("veth".into()),
                    master: Some(3)
                }),
                LinkEvent::Gone(8),
                LinkEvent::Tables,
                LinkEvent::Link(link(9, "br0", Some("bridge"))),
            ]
        );
        // Garbage (a length past the end) asks for a relist rather than being ignored.
        assert_eq!(
            parse_datagram(&[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            vec![LinkEvent::Overflow]
        );
    }

    #[test]
    fn pod_links_report_appearance_once_rename_and_removal() {
        let mut p = PodLinks::new(LinkFilter::default());
        let a = link(7, "veth1", Some("veth"));
        assert_eq!(
            p.on_event(&LinkEvent::Link(a.clone())),
            Some(PodLinkDelta::Appeared(a.clone()))
        );
        // RTM_NEWLINK again (link set up): nothing new.
        assert_eq!(p.on_event(&LinkEvent::Link(a.clone())), None);
        // Renamed within the filter: attach again under the new name.
        let b = link(7, "veth2", Some("veth"));
        assert_eq!(
            p.on_event(&LinkEvent::Link(b.clone())),
            Some(PodLinkDelta::Appeared(b.clone()))
        );
        // Renamed out of the filter: gone for us.
        assert_eq!(
            p.on_event(&LinkEvent::Link(link(7, "uplink", Some("veth")))),
            Some(PodLinkDelta::Gone(b))
        );
        assert_eq!(p.on_event(&LinkEvent::Link(link(4, "eth0", None))), None);
        let c = link(9, "lxc0", Some("veth"));
        p.on_event(&LinkEvent::Link(c.clone()));
        assert_eq!(
            p.on_event(&LinkEvent::Gone(9)),
            Some(PodLinkDelta::Gone(c.clone()))
        );
        assert_eq!(p.on_event(&LinkEvent::Gone(9)), None);
        // Relist: one disappeared, one new.
        p.on_event(&LinkEvent::Link(c.clone()));
        let d = link(10, "lxc1", Some("veth"));
        assert_eq!(
            p.relist(&[d.clone(), link(1, "lo", None)]),
            vec![PodLinkDelta::Gone(c), PodLinkDelta::Appeared(d)]
        );
        assert_eq!(p.links().keys().copied().collect::<Vec<_>>(), vec![10]);
    }

    #[test]
    fn node_changes_move_a_link_from_pending_to_its_pod_and_drop_removed_ones() {
        let pod = ObjRef::new("a", "new");
        let mut s = ClusterSnapshot::default();
        // Link 7 appears: pending.
        let live: BTreeSet<u32> = [7].into();
        let ch = node_changes(&s, &live, &BTreeMap::new());
        assert_eq!(ch, vec![Change::PendingLink(7, true)]);
        ch.iter().for_each(|c| {
            s.apply(c);
        });
        // Discovery ties it to the pod: Local first, then the pending entry goes.
        let local: BTreeMap<ObjRef, u32> = [(pod.clone(), 7)].into();
        let ch = node_changes(&s, &live, &local);
        assert_eq!(
            ch,
            vec![
                Change::Local(pod.clone(), Some(7)),
                Change::PendingLink(7, false)
            ]
        );
        ch.iter().for_each(|c| {
            s.apply(c);
        });
        assert!(node_changes(&s, &live, &local).is_empty());
        // The link goes: the pod is no longer local, nothing is pending.
        let ch = node_changes(&s, &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(ch, vec![Change::Local(pod, None)]);
        ch.iter().for_each(|c| {
            s.apply(c);
        });
        assert!(s.local.is_empty() && s.pending_links.is_empty());
    }
}
