//! TCP/UDP: the flow a packet belongs to, as the service path needs it.

use core::mem::offset_of;

use dataplane_common::{PROTO_TCP, PROTO_UDP};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    consts::{IP_MF_OFFSET, IP_OFFSET, IPV4_MAX_HDR_LEN, TCP_ACK, TCP_FLAGS_OFF, TCP_SYN},
    parse::{IP_OFF, ptr_at},
};

/// The 5-tuple of a packet and where its L4 header starts.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// The first fragment of a fragmented datagram (MF set, offset 0):
    /// its later fragments follow it (see `frag`).
    pub first_fragment: bool,
    /// The IP identification field, network byte order.
    pub ip_id: [u8; 2],
}

impl Flow {
    /// Offset of the L4 checksum field from the start of the frame.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + offset_of!(TcpHdr, check)
        } else {
            self.l4_off + offset_of!(UdpHdr, check)
        }
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_tcp_open(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// What follows the IPv4 header.
#[derive(Clone, Copy)]
pub enum L4 {
    /// A TCP or UDP packet whose ports (and TCP flags) could be read.
    Flow(Flow),
    /// A TCP or UDP fragment other than the first: no ports in it.
    Fragment(Fragment),
    /// Another protocol (ICMP, ...).
    Other,
    /// An impossible header length, or ports cut short.
    Malformed,
}

/// A non-first fragment of a TCP/UDP datagram: what ties it to its first
/// fragment.
#[derive(Clone, Copy)]
pub struct Fragment {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub proto: u8,
    pub ip_id: [u8; 2],
}

/// Reads the ports after `ip`, the IPv4 header at [`IP_OFF`].
#[inline(always)]
pub fn parse(ip: &Ipv4Hdr, data: usize, data_end: usize) -> L4 {
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return L4::Other;
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IP_OFFSET != 0 {
        return L4::Fragment(Fragment {
            saddr: ip.src_addr,
            daddr: ip.dst_addr,
            proto: ip.proto,
            ip_id: ip.id,
        });
    }
    let ihl = usize::from(ip.ihl());
    if !(Ipv4Hdr::LEN..=IPV4_MAX_HDR_LEN).contains(&ihl) {
        return L4::Malformed;
    }
    let l4_off = IP_OFF + ihl;
    let Some(ports) = ptr_at::<[u8; 4]>(data, data_end, l4_off) else {
        return L4::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { *ports };
    let mut tcp_flags = 0;
    if ip.proto == PROTO_TCP {
        let Some(f) = ptr_at::<u8>(data, data_end, l4_off + TCP_FLAGS_OFF) else {
            return L4::Malformed;
        };
        // SAFETY: as above.
        tcp_flags = unsafe { *f };
    }
    L4::Flow(Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip.proto,
        tcp_flags,
        l4_off,
        first_fragment: frags & IP_MF_OFFSET != 0,
        ip_id: ip.id,
    })
}
