//! VXLAN decapsulation, in TC (skb) or XDP, after [`crate::vxlan::classify`]
//! accepted the frame.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{NodeConfig, Stat, VXLAN_OVERHEAD, XDP_META_DECAPPED, XDP_META_TO_HOST};
use network_types::eth::EthHdr;

use crate::{
    ecn,
    forward::{redirect_to_bridge, redirect_to_pod},
    hostnet, lb, masq, nodeport,
    parse::ptr_at,
    stats::count,
    ttl,
    vxlan::{Dest, HEADERS_LEN, classify, is_vxlan_candidate},
};

/// Flags for the skb shrink. FIXED_GSO keeps gso_size (the inner MSS) as
/// it is: the segments were sized for the inner packet already, and
/// growing them by the 50 removed bytes would exceed the pod MTU.
/// DECAP_L3_IPV4 tells the kernel the new network header is IPv4.
const DECAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64;

/// TC ingress on the underlay: decapsulates VXLAN for this node, forwards
/// frames the XDP program already decapsulated, passes everything else.
#[inline(always)]
pub fn tc_from_underlay(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let len = ctx.len();
    match xdp_marker(ctx) {
        // Verified, decapsulated and counted by decap_xdp; only delivery
        // is left.
        Some(XDP_META_DECAPPED) => {
            if let Err(action) = ttl::decapsulated(ctx, cfg) {
                return action;
            }
            return match lb::reverse_nat_decapsulated(ctx) {
                Ok(dst) => deliver_to_pod(ctx, cfg, dst),
                Err(action) => action,
            };
        }
        // Counted by decap_xdp as pass_to_host: first the replies of
        // north-south flows SNATed to the gateway address.
        Some(XDP_META_TO_HOST) => {
            if let Some(action) = nodeport::decapsulated_to_gateway(ctx, cfg) {
                return action;
            }
            return hostnet::to_host(ctx, cfg);
        }
        _ => {}
    }
    if !is_vxlan_candidate(ctx.data(), ctx.data_end(), cfg) {
        // NodePorts, externalIPs, LoadBalancer IPs.
        if let Some(action) = nodeport::from_underlay(ctx, cfg) {
            return action;
        }
        // Replies of masqueraded flows, back to their pods.
        if let Some(action) = masq::from_underlay(ctx, cfg) {
            return action;
        }
        count(Stat::PassNotOverlay, len);
        return TC_ACT_OK;
    }
    if ctx.data() + HEADERS_LEN > ctx.data_end() {
        // Headers split across fragments: pull them into the linear area.
        if len < HEADERS_LEN as u32 {
            count(Stat::DropTruncated, len);
            return TC_ACT_SHOT;
        }
        if let Err(e) = ctx.pull_data(HEADERS_LEN as u32) {
            log_event!(ctx, "decap: bpf_skb_pull_data failed: {}", e);
            count(Stat::DropTruncated, len);
            return TC_ACT_SHOT;
        }
    }
    let dest = match classify(ctx.data(), ctx.data_end(), cfg)
        .and_then(|d| ecn::decapsulate(ctx.data(), ctx.data_end()).map(|()| d))
    {
        Ok(d) => d,
        Err(stat) => {
            count(stat, len);
            return TC_ACT_SHOT;
        }
    };
    // Remove outer IPv4 + UDP + VXLAN + inner Ethernet; the outer Ethernet
    // header stays in front of the inner IPv4 packet.
    if let Err(e) = ctx.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS) {
        log_event!(ctx, "decap: bpf_skb_adjust_room failed: {}", e);
        count(Stat::DropAdjustRoom, len);
        return TC_ACT_SHOT;
    }
    match dest {
        Dest::Pod => {
            // An expired TTL is answered; the answer is counted instead.
            if let Err(action) = ttl::decapsulated(ctx, cfg) {
                return action;
            }
            // Replies from a remote backend of a Service a local pod uses.
            let dst = match lb::reverse_nat_decapsulated(ctx) {
                Ok(dst) => dst,
                Err(action) => return action,
            };
            count(Stat::Decapsulated, len);
            deliver_to_pod(ctx, cfg, dst)
        }
        Dest::Host => {
            // First the replies of north-south flows SNATed to the
            // gateway address; then the node's own traffic's replies (and
            // anything else a pod or node sends the gateway address).
            if let Some(action) = nodeport::decapsulated_to_gateway(ctx, cfg) {
                return action;
            }
            count(Stat::PassToHost, len);
            hostnet::to_host(ctx, cfg)
        }
    }
}

/// Hands a decapsulated packet for a local pod (IPv4 destination `dst`)
/// on: straight into the pod when the agent listed it in endpoints_v1
/// (fast: the GSO packet stays whole, see `redirect_to_pod`), else through
/// the bridge (correct, but the bridge segments a tunnel-GSO packet in
/// software).
#[inline(always)]
fn deliver_to_pod(ctx: &TcContext, cfg: &NodeConfig, dst: Option<[u8; 4]>) -> i32 {
    match dst.and_then(|dst| redirect_to_pod(ctx, dst)) {
        Some(action) => action,
        None => redirect_to_bridge(cfg.bridge_ifindex),
    }
}

/// The marker decap_xdp left in the metadata in front of the frame, if any.
#[inline(always)]
fn xdp_marker(ctx: &TcContext) -> Option<u32> {
    // SAFETY: reading context fields the verifier rewrites into packet pointers.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    let m = ptr_at::<u32>(meta, data, 0)?;
    // SAFETY: bounds checked against data (the end of the metadata).
    Some(unsafe { *m })
}

/// XDP on the underlay: verifies and strips VXLAN on the driver's buffer.
/// Frames for pods get a metadata marker and go up to tc_from_underlay,
/// which delivers them (XDP cannot redirect into a bridge, and
/// bpf_redirect_peer exists only in TC); frames for this node itself get
/// another, so that the TC program passes them without counting them again.
#[inline(always)]
pub fn xdp_decap(ctx: &XdpContext, cfg: &NodeConfig) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u32;
    if !is_vxlan_candidate(data, data_end, cfg) {
        // Counted once, by the TC program that sees it next.
        return xdp_action::XDP_PASS;
    }
    let dest = match classify(data, data_end, cfg)
        .and_then(|d| ecn::decapsulate(data, data_end).map(|()| d))
    {
        Ok(d) => d,
        Err(stat) => {
            count(stat, len);
            return xdp_action::XDP_DROP;
        }
    };
    // SAFETY: helpers on our own frame; pointers re-derived afterwards.
    // Strip outer Ethernet + IPv4 + UDP + VXLAN (14 + 20 + 8 + 8, which is
    // also VXLAN_OVERHEAD); the inner Ethernet header is left in front.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) };
    if rc != 0 {
        log_event!(ctx, "decap_xdp: bpf_xdp_adjust_head failed: {}", rc);
        count(Stat::DropAdjustRoom, len);
        return xdp_action::XDP_DROP;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // classify read the inner IPv4 header, so this is there; the verifier
    // needs the check.
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        count(Stat::DropAdjustRoom, len);
        return xdp_action::XDP_DROP;
    };
    // The inner frame is addressed to our VtepMAC; readdress it to the
    // underlay interface so the stack treats it as its own.
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*eth).dst_addr = cfg.underlay_mac };
    let (marker, stat) = match dest {
        Dest::Pod => (XDP_META_DECAPPED, Stat::Decapsulated),
        Dest::Host => (XDP_META_TO_HOST, Stat::PassToHost),
    };
    // A driver without XDP metadata refuses this for every frame, so it is
    // not logged: the frame then reaches the pod through the kernel's
    // routing, unmarked (see `Stat::Decapsulated`).
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<u32>() as i32)) } == 0
        && let Some(m) = ptr_at::<u32>(ctx.metadata(), ctx.data(), 0)
    {
        // SAFETY: bounds checked against data (the end of the metadata).
        unsafe { *m = marker };
    }
    count(stat, len);
    xdp_action::XDP_PASS
}
