//! VXLAN encapsulation of a pod's packet, in TC, without a vxlan device.
//!
//! `bpf_skb_adjust_room` opens 50 bytes after the Ethernet header and,
//! through the ENCAP flags, marks the skb as UDP-tunnelled so a GSO packet
//! is segmented correctly (outer lengths and IDs fixed per segment) wherever
//! that happens. The original Ethernet header stays in front and becomes
//! the outer one; the room is filled with outer IPv4, UDP, VXLAN and the
//! inner Ethernet header, exactly as flannel's kernel vxlan device writes
//! them (see docs/flannel-compat.md).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_hash_recalc, bpf_get_prandom_u32},
    programs::TcContext,
};
use dataplane_common::{NodeConfig, Stat, VXLAN_FLAGS_I, VXLAN_OVERHEAD};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

use crate::{
    consts::{IP_DEFAULT_TTL, IP_ECN_MASK, IPV4_VIHL_NO_OPTIONS, VXLAN_SPORT_MAX, VXLAN_SPORT_MIN},
    csum,
    forward::redirect_to_underlay,
    maps::PEERS,
    parse::{in_prefix, ptr_at},
    stats::count,
    ttl,
    vxlan::{INNER_ETH_OFF, OUTER_IP_OFF, UDP_OFF, VXLAN_OFF},
};

/// FIXED_GSO: the pod MTU already leaves room for the 50 bytes, so GSO
/// segments keep the inner MSS instead of shrinking by 50.
/// ENCAP_*: mark the skb as Ethernet-in-UDP-in-IPv4 so segmentation and
/// checksum offload treat the inner headers as inner.
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ((EthHdr::LEN as u64) << 56);

/// Where the packet to encapsulate comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// A pod's packet this node forwards: its TTL is taken off (`ttl`).
    Forwarded,
    /// A packet this node itself sends (an ICMP error).
    Originated,
    /// A packet of the node's own processes (`from_host`): its TTL is
    /// kept, and it may be a GSO packet, so it is marked as tunnelled.
    Host,
}

impl Hop {
    /// The outcome of a packet encapsulated and sent on its way.
    #[inline(always)]
    fn stat(self) -> Stat {
        match self {
            Hop::Host => Stat::HostEncapsulated,
            Hop::Forwarded | Hop::Originated => Stat::Encapsulated,
        }
    }
}

/// Encapsulates an IPv4 packet whose destination is a pod subnet of
/// another node. `dst` is the inner destination. Returns the TC action.
#[inline(always)]
pub fn encap_to_peer(ctx: &TcContext, cfg: &NodeConfig, dst: [u8; 4], tos: u8, hop: Hop) -> i32 {
    let len = ctx.len();
    if !in_prefix(dst, cfg.network, cfg.network_prefix_len)
        || in_prefix(dst, cfg.subnet, cfg.subnet_prefix_len)
    {
        count(Stat::PassLocal, len);
        return TC_ACT_OK;
    }
    let Some(peer) = PEERS.get(&Key::new(32, dst)) else {
        count(Stat::DropNoPeer, len);
        return TC_ACT_SHOT;
    };
    let (peer_ip, peer_mac) = (peer.public_ip, peer.vtep_mac);
    // `ttl::expired_from_pod` answered the packets whose TTL runs out
    // here; this catches what got past it.
    if hop == Hop::Forwarded && ttl::decrement(ctx.data(), ctx.data_end()).is_err() {
        count(Stat::DropTtlExceeded, len);
        return TC_ACT_SHOT;
    }

    // Entropy for ECMP/RSS in the underlay: the inner flow's hash, as the
    // kernel's udp_flow_src_port() does.
    // SAFETY: helper on our own skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = (VXLAN_SPORT_MIN + hash % (VXLAN_SPORT_MAX - VXLAN_SPORT_MIN + 1)) as u16;

    // An originated packet is an ICMP error built from a packet that was
    // just decapsulated: the kernel still marks that skb as encapsulated
    // (see `forward::redirect_to_pod`) and refuses the ENCAP flags on it
    // (-EALREADY). It is small and not GSO, so it needs none of them.
    let flags = match hop {
        Hop::Forwarded | Hop::Host => ENCAP_FLAGS,
        Hop::Originated => 0,
    };
    if let Err(e) = ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags) {
        log_event!(ctx, "encap: bpf_skb_adjust_room failed: {}", e);
        count(Stat::DropAdjustRoom, len);
        return TC_ACT_SHOT;
    }
    let new_len = ctx.len();
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // The room just opened is linear data, so these always succeed; the
    // verifier needs the checks.
    let (Some(ip), Some(udp), Some(vx), Some(inner_eth)) = (
        ptr_at::<Ipv4Hdr>(data, data_end, OUTER_IP_OFF),
        ptr_at::<UdpHdr>(data, data_end, UDP_OFF),
        ptr_at::<VxlanHdr>(data, data_end, VXLAN_OFF),
        ptr_at::<EthHdr>(data, data_end, INNER_ETH_OFF),
    ) else {
        count(Stat::DropAdjustRoom, len);
        return TC_ACT_SHOT;
    };
    let outer_len = (new_len - EthHdr::LEN as u32) as u16;
    // SAFETY: every pointer was bounds-checked by ptr_at above.
    unsafe {
        let ip = &mut *ip;
        ip.vihl = IPV4_VIHL_NO_OPTIONS;
        // Copy ECN from the inner header (RFC 6040 normal mode), no DSCP.
        ip.tos = tos & IP_ECN_MASK;
        ip.tot_len = outer_len.to_be_bytes();
        ip.id = (bpf_get_prandom_u32() as u16).to_be_bytes();
        ip.frags = [0, 0];
        ip.ttl = IP_DEFAULT_TTL;
        ip.proto = IpProto::Udp as u8;
        ip.src_addr = cfg.public_ip;
        ip.dst_addr = peer_ip;
        ip.check = [0, 0];
        ip.check = csum::ipv4_header(ip);

        let udp = &mut *udp;
        udp.src = sport.to_be_bytes();
        udp.dst = cfg.vxlan_port.to_be_bytes();
        udp.len = (outer_len - Ipv4Hdr::LEN as u16).to_be_bytes();
        // Zero is valid for UDP over IPv4 and what GSO keeps consistent
        // across segments (SKB_GSO_UDP_TUNNEL without _CSUM).
        udp.check = [0, 0];

        let vx = &mut *vx;
        vx.flags = VXLAN_FLAGS_I;
        vx._reserved1 = [0, 0, 0];
        vx.set_vni(cfg.vni);
        vx._reserved2 = 0;

        let inner_eth = &mut *inner_eth;
        inner_eth.dst_addr = peer_mac;
        inner_eth.src_addr = cfg.vtep_mac;
        inner_eth.ether_type = EtherType::Ipv4 as u16;
    }

    match redirect_to_underlay(ctx, cfg.public_ip, peer_ip, cfg.underlay_ifindex) {
        Ok(action) => {
            count(hop.stat(), new_len);
            action
        }
        Err(rc) => {
            log_event!(
                ctx,
                "encap: no route to {:i} (bpf_fib_lookup {})",
                peer_ip,
                rc
            );
            count(Stat::DropFib, new_len);
            TC_ACT_SHOT
        }
    }
}
