//! The node's own traffic (host network) on the packet path.
//!
//! The agent routes the cluster network through the host overlay device
//! (`--host-device`, a dummy) with the gateway address as source; the more
//! specific route of this node's subnet (`cni0`, CNI pods' /32s) keeps
//! local pods where they are. What the node sends that way reaches
//! [`from_host`] on the device's egress and is encapsulated like a pod's
//! packet, with its TTL kept (the node is the sender, not a router).
//!
//! Replies come back as VXLAN to the gateway address; after
//! decapsulation [`to_host`] hands them to the host stack through the
//! same device's ingress, where the route to their source points, so
//! strict reverse-path filtering (`rp_filter=1`) accepts them.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK},
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use dataplane_common::{NodeConfig, Stat};
use network_types::eth::EthHdr;

use crate::{
    encap::{self, Hop},
    parse::{self, ptr_at},
    stats::count,
};

/// TC egress of the host overlay device: a packet of the node's own to
/// another node's pod subnet is encapsulated and sent to that node; one
/// to a subnet no lease covers is dropped (`drop_no_peer`). Anything else
/// (not IPv4, not the cluster network) is left to the device, which
/// discards it.
#[inline(always)]
pub fn from_host(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let Some(pkt) = parse::ipv4(ctx.data(), ctx.data_end()) else {
        count(Stat::PassNotIpv4, ctx.len());
        return TC_ACT_OK;
    };
    encap::encap_to_peer(ctx, cfg, pkt.daddr, pkt.tos, Hop::Host)
}

/// A decapsulated packet for the gateway address (the node's address in
/// the overlay), counted already: into the host stack through the host
/// device's ingress, readdressed to the device so the stack takes it as
/// its own. Without a host device (not configured yet) it goes up where
/// it arrived.
#[inline(always)]
pub fn to_host(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    if cfg.host_ifindex == 0 {
        return TC_ACT_OK;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return TC_ACT_OK;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*eth).dst_addr = cfg.host_mac };
    // SAFETY: plain helper call; TC_ACT_REDIRECT, or TC_ACT_SHOT for a
    // bad ifindex.
    unsafe { bpf_redirect(cfg.host_ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}
