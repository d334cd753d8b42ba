//! SCTP-shaped packets for raw IP sockets (protocol 132).
//!
//! This kernel has no SCTP stack, so the lab speaks just enough of it by hand: the prober
//! sends an INIT chunk from port `s` to port `d` with a random initiate tag; the responder
//! answers with an INIT ACK from `d` to `s` whose verification tag is that initiate tag. The
//! common header carries a correct CRC32c, so the packets are well formed for anything that
//! parses them (an eBPF classifier, tcpdump).

/// IP protocol number of SCTP.
pub(crate) const IPPROTO_SCTP: i32 = 132;
pub(crate) const CHUNK_INIT: u8 = 1;
pub(crate) const CHUNK_INIT_ACK: u8 = 2;

const COMMON_HEADER: usize = 12;
/// INIT / INIT ACK fixed part: type, flags, length, initiate tag, a_rwnd, streams, TSN.
const INIT_CHUNK: usize = 20;
pub(crate) const PACKET_LEN: usize = COMMON_HEADER + INIT_CHUNK;

/// The fields of an SCTP packet the lab cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Packet {
    pub src_port: u16,
    pub dst_port: u16,
    pub vtag: u32,
    pub chunk_type: u8,
    /// The INIT / INIT ACK initiate tag.
    pub initiate_tag: u32,
}

impl Packet {
    pub(crate) fn init(src_port: u16, dst_port: u16, initiate_tag: u32) -> Packet {
        Packet {
            src_port,
            dst_port,
            vtag: 0,
            chunk_type: CHUNK_INIT,
            initiate_tag,
        }
    }

    /// The answer to an INIT: ports swapped, tagged with the peer's initiate tag.
    pub(crate) fn init_ack(&self, own_tag: u32) -> Packet {
        Packet {
            src_port: self.dst_port,
            dst_port: self.src_port,
            vtag: self.initiate_tag,
            chunk_type: CHUNK_INIT_ACK,
            initiate_tag: own_tag,
        }
    }

    pub(crate) fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        b[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        b[4..8].copy_from_slice(&self.vtag.to_be_bytes());
        // b[8..12] checksum, filled in last.
        b[12] = self.chunk_type;
        b[13] = 0;
        b[14..16].copy_from_slice(&(INIT_CHUNK as u16).to_be_bytes());
        b[16..20].copy_from_slice(&self.initiate_tag.to_be_bytes());
        b[20..24].copy_from_slice(&65535u32.to_be_bytes()); // a_rwnd
        b[24..26].copy_from_slice(&1u16.to_be_bytes()); // outbound streams
        b[26..28].copy_from_slice(&1u16.to_be_bytes()); // inbound streams
        b[28..32].copy_from_slice(&self.initiate_tag.to_be_bytes()); // initial TSN
        // RFC 9260 appendix A: the CRC32c goes in as a little-endian number.
        let crc = crc32c(&b);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses an SCTP packet (without IP header). Checks the checksum.
    pub(crate) fn decode(b: &[u8]) -> Option<Packet> {
        if b.len() < COMMON_HEADER + 8 {
            return None;
        }
        let mut copy = b.to_vec();
        copy[8..12].fill(0);
        let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if crc32c(&copy) != crc {
            return None;
        }
        Some(Packet {
            src_port: u16::from_be_bytes([b[0], b[1]]),
            dst_port: u16::from_be_bytes([b[2], b[3]]),
            vtag: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            chunk_type: b[12],
            initiate_tag: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
        })
    }
}

/// Strips the IPv4 header a raw AF_INET socket delivers along with the payload.
pub(crate) fn strip_ipv4_header(b: &[u8]) -> Option<&[u8]> {
    let ihl = usize::from(*b.first()? & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    b.get(ihl..)
}

/// CRC32c (Castagnoli), SCTP's checksum (RFC 9260).
fn crc32c(data: &[u8]) -> u32 {
    const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    CRC32C.checksum(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn round_trip_and_reply() {
        let init = Packet::init(40000, 9000, 0xdead_beef);
        let bytes = init.encode();
        assert_eq!(Packet::decode(&bytes), Some(init));
        let ack = init.init_ack(7);
        assert_eq!(
            (ack.src_port, ack.dst_port, ack.vtag),
            (9000, 40000, 0xdead_beef)
        );
        let mut bad = bytes;
        bad[3] ^= 1;
        assert_eq!(Packet::decode(&bad), None);
    }

    #[test]
    fn strips_ipv4_header() {
        let mut b = vec![0x45u8; 20];
        b.extend_from_slice(&[1, 2]);
        assert_eq!(strip_ipv4_header(&b), Some(&[1u8, 2][..]));
    }
}
