//! Recognising VXLAN for this node, shared by the XDP and TC decapsulation
//! paths so both modes take exactly the same decisions.
//!
//! Frame layout checked here (offsets from the outer Ethernet header):
//! outer Ethernet 0..14, outer IPv4 14..34 (no options), UDP 34..42,
//! VXLAN 42..50, inner Ethernet 50..64, inner IPv4 64..84.

use aya_ebpf::btf_maps::lpm_trie::Key;
use dataplane_common::{NodeConfig, PeerIpKey, Stat, VXLAN_FLAGS_I};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

use crate::{
    consts::{IP_MF_OFFSET, IPV4_MAX_HDR_LEN, IPV4_VIHL_NO_OPTIONS},
    maps::{PEER_IPS, PEERS},
    parse::{in_prefix, ptr_at},
};

pub const OUTER_IP_OFF: usize = EthHdr::LEN;
pub const UDP_OFF: usize = OUTER_IP_OFF + Ipv4Hdr::LEN;
pub const VXLAN_OFF: usize = UDP_OFF + UdpHdr::LEN;
pub const INNER_ETH_OFF: usize = VXLAN_OFF + VxlanHdr::LEN;
pub const INNER_IP_OFF: usize = INNER_ETH_OFF + EthHdr::LEN;
/// Bytes that must be readable to classify a frame.
pub const HEADERS_LEN: usize = INNER_IP_OFF + Ipv4Hdr::LEN;

/// Whom a verified VXLAN frame for this node carries a packet for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// A pod on this node: decapsulate and deliver.
    Pod,
    /// This node's own bridge address: decapsulate and pass up the stack.
    Host,
}

/// Is this frame UDP to our VXLAN port? Needs only the outer headers, so
/// callers can decide whether to pull more of the packet into the linear area.
#[inline(always)]
pub fn is_vxlan_candidate(data: usize, data_end: usize, cfg: &NodeConfig) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return false;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, OUTER_IP_OFF) else {
        return false;
    };
    let ip = unsafe { &*ip };
    if ip.proto != IpProto::Udp as u8 || ip.dst_addr != cfg.public_ip {
        return false;
    }
    // The UDP header sits after the IPv4 options, if any.
    let ihl = usize::from(ip.ihl());
    if !(Ipv4Hdr::LEN..=IPV4_MAX_HDR_LEN).contains(&ihl) {
        return false;
    }
    let Some(udp) = ptr_at::<UdpHdr>(data, data_end, OUTER_IP_OFF + ihl) else {
        return false;
    };
    unsafe { (*udp).dst_port() == cfg.vxlan_port }
}

/// Classifies a frame whose outer headers [`is_vxlan_candidate`] accepted.
/// `Err` carries the drop reason.
#[inline(always)]
pub fn classify(data: usize, data_end: usize, cfg: &NodeConfig) -> Result<Dest, Stat> {
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, OUTER_IP_OFF).ok_or(Stat::DropTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    // Options or fragments in the outer header: not something a VXLAN
    // sender produces; refuse rather than guess where the payload starts.
    if ip.vihl != IPV4_VIHL_NO_OPTIONS || (u16::from_be_bytes(ip.frags) & IP_MF_OFFSET) != 0 {
        return Err(Stat::DropOuterMalformed);
    }
    let vx = ptr_at::<VxlanHdr>(data, data_end, VXLAN_OFF).ok_or(Stat::DropTruncated)?;
    let vx = unsafe { &*vx };
    // Linux drops VXLAN with any flag other than I set (no GBP/GPE here).
    if vx.flags != VXLAN_FLAGS_I || vx._reserved1 != [0, 0, 0] {
        return Err(Stat::DropBadVxlanFlags);
    }
    if vx.vni() != cfg.vni {
        return Err(Stat::DropWrongVni);
    }
    let sender = PeerIpKey {
        public_ip: ip.src_addr,
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { PEER_IPS.get(sender) }.is_none() {
        return Err(Stat::DropUnknownPeer);
    }
    let inner_eth = ptr_at::<EthHdr>(data, data_end, INNER_ETH_OFF).ok_or(Stat::DropTruncated)?;
    let inner_eth = unsafe { &*inner_eth };
    if inner_eth.dst_addr != cfg.vtep_mac {
        return Err(Stat::DropWrongVtepMac);
    }
    if inner_eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(Stat::DropInnerNotIpv4);
    }
    let inner_ip = ptr_at::<Ipv4Hdr>(data, data_end, INNER_IP_OFF).ok_or(Stat::DropTruncated)?;
    let (inner_src, inner_dst) = unsafe { ((*inner_ip).src_addr, (*inner_ip).dst_addr) };
    // The inner source must be in the subnet leased to the outer sender,
    // or any lease holder could speak for another node's pods.
    match PEERS.get(&Key::new(32, inner_src)) {
        Some(p) if p.public_ip == ip.src_addr => {}
        _ => return Err(Stat::DropInnerSrcNotSender),
    }
    if inner_dst == cfg.gateway {
        return Ok(Dest::Host);
    }
    if !in_prefix(inner_dst, cfg.subnet, cfg.subnet_prefix_len) {
        return Err(Stat::DropInnerNotLocal);
    }
    Ok(Dest::Pod)
}
