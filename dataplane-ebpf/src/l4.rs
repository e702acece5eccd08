//! IPv4 + TCP/UDP flow parsing for the service path.

use dataplane_common::{PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::ptr_at;

pub const IP_OFF: usize = EthHdr::LEN;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

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
    pub l4_off: usize,
}

impl Flow {
    /// Offset of the L4 checksum field.
    pub fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    pub fn is_tcp_open(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

pub enum L4 {
    /// A TCP or UDP packet whose ports could be read.
    Flow(Flow),
    /// Not TCP/UDP, a fragment, or a header cut short.
    Other { daddr: [u8; 4] },
}

/// Parses the IPv4 header at [`IP_OFF`] and the TCP/UDP ports after it.
/// `None` when there is no complete IPv4 header.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Option<L4> {
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF)?;
    // SAFETY: bounds checked.
    let ip = unsafe { &*ip };
    let daddr = ip.dst_addr;
    let frag = u16::from_be_bytes(ip.frags) & 0x3fff;
    if (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP) || frag != 0 {
        return Some(L4::Other { daddr });
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if !(20..=60).contains(&ihl) {
        return Some(L4::Other { daddr });
    }
    let l4_off = IP_OFF + ihl;
    let Some(ports) = ptr_at::<[u8; 4]>(data, data_end, l4_off) else {
        return Some(L4::Other { daddr });
    };
    let ports = unsafe { *ports };
    let mut tcp_flags = 0;
    if ip.proto == PROTO_TCP {
        let Some(f) = ptr_at::<u8>(data, data_end, l4_off + 13) else {
            return Some(L4::Other { daddr });
        };
        tcp_flags = unsafe { *f };
    }
    Some(L4::Flow(Flow {
        saddr: ip.src_addr,
        daddr,
        sport: [ports[0], ports[1]],
        dport: [ports[2], ports[3]],
        proto: ip.proto,
        tcp_flags,
        l4_off,
    }))
}
