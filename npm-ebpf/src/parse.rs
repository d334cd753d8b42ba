//! Header parsing: Ethernet → IPv4/IPv6 (bounded extension-header walk) → TCP/UDP/SCTP/ICMP.
//! ICMPv6 neighbour and router discovery and MLD that meet the link-local checks of their
//! RFCs are told apart ([`L4Kind::LinkControl`]): the datapath passes them like ARP. Fragments
//! are told apart by [`Packet::frag`] (with the datagram's identification), ICMP errors by
//! [`Packet::inner_off`], where the packet they report on starts ([`embedded`] reads it).
//!
//! Every read goes through [`ptr_at`], which checks the access against `data_end` (the
//! verifier insists, and a short packet must never be read past its end). Header structs are
//! byte arrays (alignment 1), so no read is ever misaligned and no field needs a byte swap
//! except where the value is interpreted.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use npm_common::maps::{
    Addr16, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, addr_from_v4,
};

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];

/// IPv6 extension headers we skip (RFC 8200 §4): hop-by-hop, routing, fragment, dest-opts.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// How many IPv6 extension headers we walk before giving up (packet counts as malformed).
const IPV6_MAX_EXT: usize = 4;
/// Largest L3+L4 offset we accept; keeps every packet offset provably bounded for the verifier.
const MAX_L4_OFFSET: usize = 512;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMP errors that embed the packet they report on (RFC 792, RFC 1191): destination
/// unreachable (incl. fragmentation needed), time exceeded, parameter problem. Not redirect
/// (5), which changes routes rather than reporting on a flow.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 errors (RFC 4443 §3): destination unreachable (1), packet too big (2), time
/// exceeded (3), parameter problem (4).
const ICMPV6_ERROR_FIRST: u8 = 1;
const ICMPV6_ERROR_LAST: u8 = 4;
/// Bytes of an ICMP error's header before the embedded packet (type, code, checksum, and 4
/// bytes of unused / MTU / pointer).
const ICMP_ERROR_HLEN: usize = 8;
/// MLD (RFC 2710, RFC 3810): query, v1 report, v1 done, v2 report.
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_MLD2_REPORT: u8 = 143;
/// Neighbour and router discovery (RFC 4861): router solicitation (133), router
/// advertisement, neighbour solicitation, neighbour advertisement, redirect (137).
const ICMPV6_ND_FIRST: u8 = 133;
const ICMPV6_ND_LAST: u8 = 137;
/// Neighbour solicitation and advertisement (RFC 4861 §4.3, §4.4).
const ICMPV6_ND_NS: u8 = 135;
const ICMPV6_ND_NA: u8 = 136;
/// The hop limit RFC 4861 §6.1, §7.1 and §8.1 require of ND messages (a receiver discards
/// any other): a packet a router forwarded has a lower one, so it was sent on this link.
const ND_HOP_LIMIT: u8 = 255;
/// The hop limit RFC 2710 §3 and RFC 3810 §5 give MLD messages: no router forwards them.
const MLD_HOP_LIMIT: u8 = 1;

/// [`Packet::frag`] bits, IPv4's `frag_off` layout (RFC 791): more fragments, and the
/// 13-bit offset in 8-byte units.
const FRAG_MF: u16 = 0x2000;
const FRAG_OFFSET: u16 = 0x1fff;

/// TCP flag bits (byte 13 of the TCP header).
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// What the L4 header told us, beyond the ports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4Kind {
    /// TCP, UDP or SCTP with ports.
    Ports,
    /// No L4 header to read: non-first fragment or a protocol without ports.
    NoPorts,
    /// ICMP/ICMPv6 echo request; both ports are the echo identifier.
    EchoRequest,
    /// ICMP/ICMPv6 echo reply; both ports are the echo identifier.
    EchoReply,
    /// Any other ICMP/ICMPv6 type (ports 0, never tracked); an error that embeds the packet
    /// it reports on has [`Packet::inner_off`] set.
    IcmpOther,
    /// ICMPv6 link control: neighbour or router discovery (types 133-137) with hop limit
    /// 255, or MLD (130-132, 143) with hop limit 1 from a link-local (fe80::/10) or the
    /// unspecified source. IPv6's ARP: never policed, never tracked; only what it claims
    /// (`Packet::dst`) is checked when it leaves a pod.
    LinkControl,
}

/// The classified view of one IP packet. Aligned to 8 with the addresses first, so
/// [`be_words`] can read each address as two 8-byte words (BPF stack accesses must be
/// aligned).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct Packet {
    pub(crate) src: Addr16,
    /// The destination; for [`L4Kind::LinkControl`] instead the address the message claims
    /// for its sender, which a receiver puts in its neighbour cache: a neighbour
    /// advertisement's target, a neighbour solicitation's source (`::` for DAD), `::` for
    /// the other types (nothing claimed). Link control passes without policy, so nothing
    /// else reads its destination.
    pub(crate) dst: Addr16,
    /// Ports in network byte order (as on the wire).
    pub(crate) sport_be: u16,
    pub(crate) dport_be: u16,
    pub(crate) proto: u8,
    pub(crate) kind: L4Kind,
    /// TCP flags byte, 0 for other protocols.
    pub(crate) tcp_flags: u8,
    /// Both addresses are IPv4-mapped (an IPv4 packet, or an IPv6 one with two mapped
    /// addresses): the flow lives in `NPM_CT4`, as `CtKey::to_v4` says.
    pub(crate) v4: bool,
    /// The datagram's identification (for fragments): the wire bytes as a native-order word
    /// (IPv4's 2 bytes, then zeros; IPv6's 4).
    pub(crate) frag_id: u32,
    /// An ICMP error (destination unreachable, time exceeded, parameter problem; ICMPv6 also
    /// packet too big): the packet offset of the IP header it embeds; 0 for anything else.
    pub(crate) inner_off: u16,
    /// The fragment's offset (8-byte units, bits 0..13) and more-fragments flag (bit 13), as
    /// in IPv4's `frag_off` (IPv6's fragment header rearranged to match); 0 for a packet
    /// that is not a fragment. Kept as computed from the packet's bits rather than as a
    /// constant per case: the verifier then has no reason to explore the rest of the program
    /// once per fragment state ([`Packet::first_fragment`], [`Packet::later_fragment`]).
    pub(crate) frag: u16,
}

const _: () = assert!(core::mem::offset_of!(Packet, src) == 0);
const _: () = assert!(core::mem::offset_of!(Packet, dst) == 16);

/// An address of a [`Packet`] as two big-endian words (numeric order = byte order).
#[inline(always)]
pub(crate) fn be_words(a: &Addr16) -> (u64, u64) {
    let p = a.as_ptr().cast::<u64>();
    // SAFETY: callers pass `Packet::src` or `Packet::dst`, which are 8-byte aligned (the
    // struct is `align(8)`, the fields at offsets 0 and 16) and 16 bytes long.
    unsafe { (u64::from_be(p.read()), u64::from_be(p.add(1).read())) }
}

/// [`npm_common::maps::is_v4_mapped`] for an address of a [`Packet`], in two word compares.
#[inline(always)]
fn v4_mapped(a: &Addr16) -> bool {
    let (w0, w1) = be_words(a);
    w0 == 0 && w1 >> 32 == 0xffff
}

/// fe80::/10 (the top 10 bits 1111 1110 10): IPv6 link-local unicast.
#[inline(always)]
pub(crate) fn link_local(a: &Addr16) -> bool {
    let (w0, _) = be_words(a);
    w0 >> 54 == 0x3fa
}

/// A destination a packet cannot leave the link for: link-local unicast (fe80::/10) or
/// IPv6 multicast (ff00::/8; every scope: a router does not forward a link-local source).
#[inline(always)]
pub(crate) fn link_scoped(a: &Addr16) -> bool {
    let (w0, _) = be_words(a);
    w0 >> 54 == 0x3fa || w0 >> 56 == 0xff
}

/// An IP packet we cannot classify (truncated header, bad version/IHL, too many ext headers).
pub(crate) struct Malformed;

#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    proto: [u8; 2],
}
const ETH_HLEN: usize = size_of::<EthHdr>();

#[derive(Clone, Copy)]
#[repr(C)]
struct Ipv4Hdr {
    ver_ihl: u8,
    _tos: u8,
    _tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    _ttl: u8,
    proto: u8,
    _csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Ipv6Hdr {
    ver_tc_flow: [u8; 4],
    _payload_len: [u8; 2],
    next_hdr: u8,
    hop_limit: u8,
    src: Addr16,
    dst: Addr16,
}

/// First eight bytes of every skipped IPv6 extension header (RFC 8200 §4.2 layout; each is
/// at least 8 bytes long).
#[repr(C)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    hdr_len: u8,
    /// Fragment header: 13-bit offset + 2 reserved bits + more-fragments; unused for the
    /// other headers.
    frag_off: [u8; 2],
    /// Fragment header: the identification; unused for the other headers.
    ident: [u8; 4],
}

/// Minimal TCP header (RFC 9293): ports, then flags in byte 13.
#[repr(C)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    _doff: u8,
    flags: u8,
    _window: [u8; 2],
    _csum: [u8; 2],
    _urg: [u8; 2],
}

/// UDP header (8 bytes) and SCTP common header (12 bytes): both start with the two ports.
#[repr(C)]
struct PortsHdr<const N: usize> {
    sport: [u8; 2],
    dport: [u8; 2],
    _rest: [u8; N],
}

/// ARP for IPv4 over Ethernet (RFC 826).
#[repr(C)]
struct ArpHdr {
    _htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    _oper: [u8; 2],
    _sha: [u8; 6],
    spa: [u8; 4],
    _tha: [u8; 6],
    _tpa: [u8; 4],
}

#[repr(C)]
struct IcmpEchoHdr {
    icmp_type: u8,
    _code: u8,
    _csum: [u8; 2],
    id: [u8; 2],
    _seq: [u8; 2],
}

/// Returns a pointer to a `T` at `offset` in the packet, or `Err` when it would end past
/// `data_end`. The only way this crate touches packet memory.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_L4_OFFSET || start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

impl Packet {
    pub(crate) const fn new() -> Self {
        Self {
            src: [0; 16],
            dst: [0; 16],
            sport_be: 0,
            dport_be: 0,
            proto: 0,
            kind: L4Kind::NoPorts,
            tcp_flags: 0,
            v4: false,
            frag_id: 0,
            inner_off: 0,
            frag: 0,
        }
    }

    /// The first fragment of a datagram (offset 0, more fragments follow): it has the L4
    /// header, the datagram's later fragments do not.
    #[inline(always)]
    pub(crate) fn first_fragment(&self) -> bool {
        self.frag & (FRAG_OFFSET | FRAG_MF) == FRAG_MF
    }

    /// A later fragment of a datagram (offset > 0): no L4 header, ports 0.
    #[inline(always)]
    pub(crate) fn later_fragment(&self) -> bool {
        self.frag & FRAG_OFFSET != 0
    }
}

/// Parses the packet into `pkt` (written in place to keep the BPF stack small).
/// `Ok(false)`: not IPv4/IPv6 (ARP, LLDP, ...).
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, Malformed> {
    // A frame shorter than an Ethernet header is not IP as far as we can tell.
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(false);
    };
    // SAFETY: `ptr_at` checked that the header lies within the packet.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_IP {
        parse_v4(ctx, pkt).map(|()| true)
    } else if proto == ETH_P_IPV6 {
        parse_v6(ctx, pkt).map(|()| true)
    } else {
        Ok(false)
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked bounds; the struct has alignment 1.
    let (ver_ihl, frag_off, id) = unsafe { ((*ip).ver_ihl, (*ip).frag_off, (*ip).id) };
    if ver_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(Malformed);
    }
    // Non-first fragments carry no L4 header: classify them with ports 0.
    let frag_off = u16::from_be_bytes(frag_off);
    let first_fragment = frag_off & FRAG_OFFSET == 0;
    pkt.frag = frag_off & (FRAG_OFFSET | FRAG_MF);
    pkt.frag_id = u32::from(u16::from_ne_bytes(id));
    // SAFETY: `ptr_at` checked bounds; the struct has alignment 1.
    unsafe {
        pkt.src = addr_from_v4((*ip).src);
        pkt.dst = addr_from_v4((*ip).dst);
        pkt.proto = (*ip).proto;
    }
    pkt.v4 = true;
    if first_fragment {
        // Hop limit 0: no ICMPv6 link control over IPv4 (protocol 58 in an IPv4 header).
        parse_l4(ctx, ETH_HLEN + ihl, pkt, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet) -> Result<(), Malformed> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked bounds; the struct has alignment 1.
    let (mut next, hop_limit) = unsafe {
        pkt.src = (*ip).src;
        pkt.dst = (*ip).dst;
        ((*ip).next_hdr, (*ip).hop_limit)
    };
    let mut off = ETH_HLEN + size_of::<Ipv6Hdr>();
    let mut first_fragment = true;
    let mut done = false;
    // Bounded walk over extension headers; unrolled by the compiler.
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => {
                let ext = ptr_at::<Ipv6ExtHdr>(ctx, off)?;
                // SAFETY: `ptr_at` checked bounds; alignment 1.
                let (n, len, frag) = unsafe { ((*ext).next_hdr, (*ext).hdr_len, (*ext).frag_off) };
                if next == IPV6_FRAGMENT {
                    // Fixed 8-byte header; offset is the upper 13 bits of bytes 2..4, the
                    // more-fragments flag the lowest bit.
                    let frag = u16::from_be_bytes(frag);
                    pkt.frag = frag >> 3 | (frag & 1) << 13;
                    // SAFETY: as above.
                    pkt.frag_id = u32::from_ne_bytes(unsafe { (*ext).ident });
                    if frag >> 3 != 0 {
                        // A non-first fragment: what follows is the middle of the payload,
                        // not headers. Its protocol is the one this header names.
                        first_fragment = false;
                        next = n;
                        done = true;
                        break;
                    }
                    off += 8;
                } else {
                    off += (usize::from(len) + 1) * 8;
                }
                next = n;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        // More extension headers than we walk: cannot find the L4 header.
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => return Err(Malformed),
            _ => {}
        }
    }
    pkt.proto = next;
    if first_fragment {
        parse_l4(ctx, off, pkt, hop_limit)?;
    }
    // Last, from `pkt`: computed before the walk, the four words would stay live through it.
    pkt.v4 = v4_mapped(&pkt.src) && v4_mapped(&pkt.dst);
    Ok(())
}

/// Fills ports, kind and TCP flags from the L4 header at `off`. A truncated header of a
/// protocol we classify is malformed; unknown protocols keep ports 0. `hop_limit`: the IPv6
/// header's (0 for IPv4).
#[inline(always)]
fn parse_l4(ctx: &TcContext, off: usize, pkt: &mut Packet, hop_limit: u8) -> Result<(), Malformed> {
    match pkt.proto {
        PROTO_TCP => {
            // One bounds check for the whole header, then reads through that same pointer
            // (separate checks for sub-ranges can be merged by LLVM in ways the verifier
            // cannot follow).
            let tcp = ptr_at::<TcpHdr>(ctx, off)?;
            // SAFETY: `ptr_at` checked bounds; alignment 1.
            unsafe {
                pkt.sport_be = u16::from_ne_bytes((*tcp).sport);
                pkt.dport_be = u16::from_ne_bytes((*tcp).dport);
                pkt.tcp_flags = (*tcp).flags;
            }
            pkt.kind = L4Kind::Ports;
        }
        PROTO_UDP => {
            let udp = ptr_at::<PortsHdr<4>>(ctx, off)?;
            // SAFETY: `ptr_at` checked bounds; alignment 1.
            unsafe {
                pkt.sport_be = u16::from_ne_bytes((*udp).sport);
                pkt.dport_be = u16::from_ne_bytes((*udp).dport);
            }
            pkt.kind = L4Kind::Ports;
        }
        PROTO_SCTP => {
            let sctp = ptr_at::<PortsHdr<8>>(ctx, off)?;
            // SAFETY: `ptr_at` checked bounds; alignment 1.
            unsafe {
                pkt.sport_be = u16::from_ne_bytes((*sctp).sport);
                pkt.dport_be = u16::from_ne_bytes((*sctp).dport);
            }
            pkt.kind = L4Kind::Ports;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let icmp = ptr_at::<IcmpEchoHdr>(ctx, off)?;
            // SAFETY: `ptr_at` checked bounds; alignment 1.
            let (ty, id) = unsafe { ((*icmp).icmp_type, (*icmp).id) };
            let (req, rep) = if pkt.proto == PROTO_ICMP {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            } else {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            };
            pkt.kind = if ty == req {
                L4Kind::EchoRequest
            } else if ty == rep {
                L4Kind::EchoReply
            } else if pkt.proto == PROTO_ICMPV6 && link_control(ty, hop_limit, &pkt.src) {
                L4Kind::LinkControl
            } else {
                L4Kind::IcmpOther
            };
            if ty == req || ty == rep {
                let id_be = u16::from_ne_bytes(id);
                pkt.sport_be = id_be;
                pkt.dport_be = id_be;
            } else if icmp_error(pkt.proto, ty) {
                // `off` passed `ptr_at`, so it is at most MAX_L4_OFFSET.
                pkt.inner_off = (off + ICMP_ERROR_HLEN) as u16;
            }
            if pkt.kind == L4Kind::LinkControl {
                // What the message claims (see `Packet::dst`).
                pkt.dst = if ty == ICMPV6_ND_NA {
                    // The target follows the 4 bytes of flags (RFC 4861 §4.4).
                    let target = ptr_at::<Addr16>(ctx, off + 8)?;
                    // SAFETY: `ptr_at` checked bounds; alignment 1.
                    unsafe { *target }
                } else if ty == ICMPV6_ND_NS {
                    pkt.src
                } else {
                    [0; 16]
                };
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether ICMP (`proto` `PROTO_ICMP`) or ICMPv6 type `ty` is an error that embeds the packet
/// it reports on.
#[inline(always)]
fn icmp_error(proto: u8, ty: u8) -> bool {
    if proto == PROTO_ICMP {
        matches!(
            ty,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    } else {
        (ICMPV6_ERROR_FIRST..=ICMPV6_ERROR_LAST).contains(&ty)
    }
}

/// Parses the packet the ICMP error `pkt` embeds (at `pkt.inner_off`) into `inner`: its
/// addresses, protocol, and the ports (TCP, UDP, SCTP) or echo identifier (ICMP echo of the
/// error's own family) from the first 8 bytes of its L4 header, which every error carries
/// (RFC 792, RFC 4443 §2.4). False when it cannot be read: truncated, not of the error's
/// family (IPv4 in ICMP, IPv6 in ICMPv6), a later fragment (no ports), an IPv6 packet with
/// extension headers (not walked: this first version reads only a fixed header), another
/// protocol, or an ICMP message that is not an echo (errors are not sent about errors).
#[inline(always)]
pub(crate) fn embedded(ctx: &TcContext, pkt: &Packet, inner: &mut Packet) -> bool {
    // Copied out with `bpf_skb_load_bytes` rather than read in place: the offset then never
    // takes part in packet-pointer arithmetic, so the verifier need not tell the callers'
    // offsets apart (it would re-verify this for each), and a quote in the skb's paged part
    // is read as well.
    let off = usize::from(pkt.inner_off);
    let l4 = if pkt.proto == PROTO_ICMP {
        let Ok(ip) = ctx.load::<Ipv4Hdr>(off) else {
            return false;
        };
        let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
        if ip.ver_ihl >> 4 != 4
            || ihl < size_of::<Ipv4Hdr>()
            || u16::from_be_bytes(ip.frag_off) & FRAG_OFFSET != 0
        {
            return false;
        }
        inner.src = addr_from_v4(ip.src);
        inner.dst = addr_from_v4(ip.dst);
        inner.proto = ip.proto;
        inner.v4 = true;
        off + ihl
    } else {
        let Ok(ip) = ctx.load::<Ipv6Hdr>(off) else {
            return false;
        };
        if ip.ver_tc_flow[0] >> 4 != 6 {
            return false;
        }
        inner.src = ip.src;
        inner.dst = ip.dst;
        inner.proto = ip.next_hdr;
        inner.v4 = v4_mapped(&inner.src) && v4_mapped(&inner.dst);
        off + size_of::<Ipv6Hdr>()
    };
    // The first 8 bytes of the L4 header: TCP, UDP and SCTP start with the two ports, ICMP
    // echo has its type first and its identifier at bytes 4..6.
    let Ok(h) = ctx.load::<[u8; 8]>(l4) else {
        return false;
    };
    match inner.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            inner.sport_be = u16::from_ne_bytes([h[0], h[1]]);
            inner.dport_be = u16::from_ne_bytes([h[2], h[3]]);
            inner.kind = L4Kind::Ports;
            true
        }
        p if p == pkt.proto => {
            let (req, rep) = if p == PROTO_ICMP {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            } else {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            };
            inner.kind = if h[0] == req {
                L4Kind::EchoRequest
            } else if h[0] == rep {
                L4Kind::EchoReply
            } else {
                return false;
            };
            inner.sport_be = u16::from_ne_bytes([h[4], h[5]]);
            inner.dport_be = inner.sport_be;
            true
        }
        _ => false,
    }
}

/// Whether two addresses of [`Packet`]s are equal, in two word compares each.
#[inline(always)]
pub(crate) fn same_addr(a: &Addr16, b: &Addr16) -> bool {
    be_words(a) == be_words(b)
}

/// The sender protocol address of an ARP packet for IPv4 over Ethernet, IPv4-mapped: the
/// address its receivers bind to the sender's MAC. `None` for any other frame (and for a
/// truncated ARP packet, which receivers discard).
#[inline(always)]
pub(crate) fn arp_sender(ctx: &TcContext) -> Option<Addr16> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok()?;
    // SAFETY: `ptr_at` checked that the header lies within the packet.
    if unsafe { (*eth).proto } != ETH_P_ARP {
        return None;
    }
    let arp = ptr_at::<ArpHdr>(ctx, ETH_HLEN).ok()?;
    // SAFETY: `ptr_at` checked bounds; alignment 1.
    let (ptype, hlen, plen, spa) = unsafe { ((*arp).ptype, (*arp).hlen, (*arp).plen, (*arp).spa) };
    (ptype == ETH_P_IP && hlen == 6 && plen == 4).then(|| addr_from_v4(spa))
}

/// Whether an ICMPv6 message of type `ty` with this hop limit and source is link control
/// its receivers accept (see [`L4Kind::LinkControl`]); one they would discard is policed
/// like any ICMPv6 message (`IcmpOther`). Nothing from off-link qualifies: a router
/// decrements the hop limit below 255 and forwards no packet with hop limit 1.
#[inline(always)]
fn link_control(ty: u8, hop_limit: u8, src: &Addr16) -> bool {
    if (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&ty) {
        return hop_limit == ND_HOP_LIMIT;
    }
    if matches!(
        ty,
        ICMPV6_MLD_QUERY | ICMPV6_MLD_REPORT | ICMPV6_MLD_DONE | ICMPV6_MLD2_REPORT
    ) && hop_limit == MLD_HOP_LIMIT
    {
        // fe80::/10 (the top 10 bits 1111 1110 10) or :: (RFC 3810 §5.2.13: reports sent
        // before the interface has a link-local address).
        let (w0, w1) = be_words(src);
        return link_local(src) || w0 | w1 == 0;
    }
    false
}
