//! Reading the packet: bounds-checked access to its bytes (direct packet
//! access) and the one parse of Ethernet + IPv4 + ports each entry point
//! does before handing the result to the modules.

use core::mem::size_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    consts::{IP_OFFSET, IPV4_VIHL_NO_OPTIONS},
    l4::{self, L4},
};

/// Offset of the IPv4 header behind the Ethernet header.
pub const IP_OFF: usize = EthHdr::LEN;

/// Pointer to a `T` at `offset` from `data`, if the whole `T` is in the
/// packet. Every header read in the programs goes through here, which
/// does the one comparison against `data_end` the verifier wants to see.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// Is `addr` inside `net`/`len`? All three in network byte order.
#[inline(always)]
pub fn in_prefix(addr: [u8; 4], net: [u8; 4], len: u8) -> bool {
    if len == 0 {
        return true;
    }
    if len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
}

/// An IPv4 packet behind an Ethernet header, parsed once. Values are
/// copied out of the packet: the modules' rewrites invalidate packet
/// pointers, not these.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    pub src_mac: [u8; 6],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub tos: u8,
    pub ttl: u8,
    pub proto: u8,
    /// The header has no options (20 bytes).
    pub no_options: bool,
    /// A fragment other than the first: what follows the header is not
    /// the start of an L4 header.
    pub later_fragment: bool,
    pub l4: L4,
}

/// Parses the frame at `data`. `None` when it is not IPv4 or too short for
/// an IPv4 header.
#[inline(always)]
pub fn ipv4(data: usize, data_end: usize) -> Option<Ipv4Packet> {
    let eth = ptr_at::<EthHdr>(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &*eth };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF)?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    Some(Ipv4Packet {
        src_mac: eth.src_addr,
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        tos: ip.tos,
        ttl: ip.ttl,
        proto: ip.proto,
        no_options: ip.vihl == IPV4_VIHL_NO_OPTIONS,
        later_fragment: u16::from_be_bytes(ip.frags) & IP_OFFSET != 0,
        l4: l4::parse(ip, data, data_end),
    })
}

/// The addresses a frame that is not IPv4 claims as its sender: the
/// Ethernet source, and for ARP the sender hardware and protocol
/// addresses. Only `from_pod` on a CNI pod's port reads these (anti-
/// spoofing); IPv4 frames are covered by [`Ipv4Packet`].
#[derive(Clone, Copy)]
pub struct NonIpSender {
    pub src_mac: [u8; 6],
    /// `(sender MAC, sender IPv4)` of an Ethernet/IPv4 ARP packet.
    pub arp: Option<([u8; 6], [u8; 4])>,
}

/// ARP for Ethernet and IPv4 (RFC 826), as it follows the Ethernet header.
#[repr(C)]
struct ArpEthIpv4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
}

/// Reads [`NonIpSender`]; `None` when the frame is shorter than an
/// Ethernet header. An ARP packet cut short is reported as ARP from
/// 0.0.0.0 with no MAC, which the caller refuses.
#[inline(always)]
pub fn non_ip_sender(data: usize, data_end: usize) -> Option<NonIpSender> {
    let eth = ptr_at::<EthHdr>(data, data_end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (src_mac, ether_type) = unsafe { ((*eth).src_addr, (*eth).ether_type) };
    if ether_type != EtherType::Arp as u16 {
        return Some(NonIpSender { src_mac, arp: None });
    }
    let arp = match ptr_at::<ArpEthIpv4>(data, data_end, EthHdr::LEN) {
        // SAFETY: as above.
        Some(a) => unsafe { ((*a).sha, (*a).spa) },
        None => ([0; 6], [0; 4]),
    };
    Some(NonIpSender {
        src_mac,
        arp: Some(arp),
    })
}
