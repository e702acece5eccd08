//! Reading the packet: bounds-checked access to its bytes (direct packet
//! access) and the one parse of Ethernet + IPv4 + ports each entry point
//! does before handing the result to the modules.

use core::mem::size_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::l4::{self, L4};

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
        l4: l4::parse(ip, data, data_end),
    })
}
