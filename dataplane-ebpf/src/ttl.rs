//! The node as a router: a pod packet that leaves for another node, and a
//! packet that comes out of the overlay for a pod, passes through a node's
//! forwarding in host routing or flannel's kernel VXLAN, which takes one
//! off its TTL. The programs do the same, so a cross-node ping reply
//! arrives with TTL 62, as there. A packet whose TTL runs out is answered
//! with ICMP time exceeded from the node's bridge address (traceroute):
//! straight back into the pod, or encapsulated to the sender's node.
//!
//! Packets between pods of one node, or from a pod to a Service backend
//! on its own node, keep their TTL (see README, known limits).

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{NodeConfig, Stat};
use network_types::ip::Ipv4Hdr;

use crate::{
    csum, encap, icmp,
    lb::is_vip,
    parse::{self, IP_OFF, Ipv4Packet, in_prefix, ptr_at},
    reject,
    stats::count,
};

/// Takes one off the TTL of the IPv4 packet at [`IP_OFF`] and fixes its
/// header checksum. `Err` when the TTL would reach zero (nothing written).
#[inline(always)]
pub fn decrement(data: usize, data_end: usize) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF).ok_or(())?;
    // SAFETY: bounds checked by ptr_at; the frame is ours to write.
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        return Err(());
    }
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace16(ip.check, old, new);
    Ok(())
}

/// A pod's packet whose TTL runs out here: one this node would send on to
/// another node or translate (a ClusterIP). Answered and counted; `None`
/// for every other packet.
#[inline(always)]
pub fn expired_from_pod(ctx: &TcContext, cfg: &NodeConfig, pkt: &Ipv4Packet) -> Option<i32> {
    if pkt.ttl > 1 {
        return None;
    }
    let remote = in_prefix(pkt.daddr, cfg.network, cfg.network_prefix_len)
        && !in_prefix(pkt.daddr, cfg.subnet, cfg.subnet_prefix_len);
    if !remote && !is_vip(pkt.daddr) {
        return None;
    }
    let len = ctx.len();
    // SAFETY: reading our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Like Linux's icmp_send: no answer to an error, nor to a fragment
    // other than the first.
    if icmp::may_be_error(ctx.data(), ctx.data_end(), pkt) || !pkt.no_options || pkt.later_fragment
    {
        count(Stat::DropTtlExceeded, len);
        return Some(TC_ACT_SHOT);
    }
    match reject::time_exceeded(ctx, cfg.gateway).and_then(|()| reject::redirect_back(ifindex)) {
        Ok(action) => {
            count(Stat::TtlExceeded, len);
            Some(action)
        }
        Err(()) => {
            count(Stat::DropTtlExceeded, len);
            Some(TC_ACT_SHOT)
        }
    }
}

/// A packet that just came out of the overlay for a pod of this node:
/// its TTL taken off, or, when it runs out, answered with time exceeded
/// encapsulated to the sender (the TC action in `Err`).
#[inline(always)]
pub fn decapsulated(ctx: &TcContext, cfg: &NodeConfig) -> Result<(), i32> {
    if decrement(ctx.data(), ctx.data_end()).is_ok() {
        return Ok(());
    }
    let len = ctx.len();
    let Some(pkt) = parse::ipv4(ctx.data(), ctx.data_end()) else {
        count(Stat::DropTtlExceeded, len);
        return Err(TC_ACT_SHOT);
    };
    if icmp::may_be_error(ctx.data(), ctx.data_end(), &pkt)
        || pkt.later_fragment
        || reject::time_exceeded(ctx, cfg.gateway).is_err()
    {
        count(Stat::DropTtlExceeded, len);
        return Err(TC_ACT_SHOT);
    }
    count(Stat::TtlExceeded, len);
    Err(encap::encap_to_peer(
        ctx,
        cfg,
        pkt.saddr,
        0,
        encap::Hop::Originated,
    ))
}
