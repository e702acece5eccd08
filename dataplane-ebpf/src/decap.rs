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
use dataplane_common::{NodeConfig, Stat, VXLAN_OVERHEAD, XDP_META_DECAPPED};
use network_types::eth::EthHdr;

use crate::{
    forward::{redirect_to_bridge, redirect_to_pod},
    parse::ptr_at,
    stats::count,
    vxlan::{HEADERS_LEN, Verdict, classify, is_vxlan_candidate},
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
    if xdp_marked(ctx) {
        // Verified and decapsulated by decap_xdp; only delivery is left.
        if let Err(action) = crate::lb::reverse_nat_decapsulated(ctx) {
            return action;
        }
        return deliver_to_pod(ctx, cfg);
    }
    if !is_vxlan_candidate(ctx.data(), ctx.data_end(), cfg) {
        count(Stat::PassNotOverlay, len);
        return TC_ACT_OK;
    }
    if ctx.data() + HEADERS_LEN > ctx.data_end() {
        // Headers split across fragments: pull them into the linear area.
        if len < HEADERS_LEN as u32 || ctx.pull_data(HEADERS_LEN as u32).is_err() {
            count(Stat::DropTruncated, len);
            return TC_ACT_SHOT;
        }
    }
    let verdict = match classify(ctx.data(), ctx.data_end(), cfg) {
        Ok(v) => v,
        Err(stat) => {
            count(stat, len);
            return TC_ACT_SHOT;
        }
    };
    // Remove outer IPv4 + UDP + VXLAN + inner Ethernet; the outer Ethernet
    // header stays in front of the inner IPv4 packet.
    if ctx
        .adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .is_err()
    {
        count(Stat::DropAdjustRoom, len);
        return TC_ACT_SHOT;
    }
    match verdict {
        Verdict::ToPod => {
            count(Stat::Decapsulated, len);
            // Replies from a remote backend of a Service a local pod uses.
            if let Err(action) = crate::lb::reverse_nat_decapsulated(ctx) {
                return action;
            }
            deliver_to_pod(ctx, cfg)
        }
        Verdict::ToHost => {
            // The outer Ethernet header is addressed to this interface, so
            // the stack takes the inner packet as its own.
            count(Stat::PassToHost, len);
            TC_ACT_OK
        }
    }
}

/// Hands a decapsulated packet for a local pod on: straight into the pod
/// when the agent listed it in endpoints_v1 (fast: the GSO packet stays
/// whole, see `redirect_to_pod`), else through the bridge (correct, but
/// the bridge segments a tunnel-GSO packet in software).
#[inline(always)]
fn deliver_to_pod(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    match redirect_to_pod(ctx) {
        Some(action) => action,
        None => redirect_to_bridge(cfg.bridge_ifindex),
    }
}

/// Did decap_xdp leave its marker in the metadata in front of the frame?
#[inline(always)]
fn xdp_marked(ctx: &TcContext) -> bool {
    // SAFETY: reading context fields the verifier rewrites into packet pointers.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    match ptr_at::<u32>(meta, data, 0) {
        // SAFETY: bounds checked against data (the end of the metadata).
        Some(m) => unsafe { *m == XDP_META_DECAPPED },
        None => false,
    }
}

/// XDP on the underlay: verifies and strips VXLAN on the driver's buffer.
/// Frames for pods get a metadata marker and go up to tc_from_underlay,
/// which delivers them (XDP cannot redirect into a bridge, and
/// bpf_redirect_peer exists only in TC).
#[inline(always)]
pub fn xdp_decap(ctx: &XdpContext, cfg: &NodeConfig) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u32;
    if !is_vxlan_candidate(data, data_end, cfg) {
        // Counted once, by the TC program that sees it next.
        return xdp_action::XDP_PASS;
    }
    let verdict = match classify(data, data_end, cfg) {
        Ok(v) => v,
        Err(stat) => {
            count(stat, len);
            return xdp_action::XDP_DROP;
        }
    };
    // SAFETY: helpers on our own frame; pointers re-derived afterwards.
    // Strip outer Ethernet + IPv4 + UDP + VXLAN (14 + 20 + 8 + 8, which is
    // also VXLAN_OVERHEAD); the inner Ethernet header is left in front.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) } != 0 {
        count(Stat::DropAdjustRoom, len);
        return xdp_action::XDP_DROP;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        count(Stat::DropTruncated, len);
        return xdp_action::XDP_DROP;
    };
    // The inner frame is addressed to our VtepMAC; readdress it to the
    // underlay interface so the stack treats it as its own.
    unsafe { (*eth).dst_addr = cfg.underlay_mac };
    if let Verdict::ToHost = verdict {
        count(Stat::PassToHost, len);
        return xdp_action::XDP_PASS;
    }
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } == 0 {
        let (meta, data) = (ctx.metadata(), ctx.data());
        if let Some(m) = ptr_at::<u32>(meta, data, 0) {
            unsafe { *m = XDP_META_DECAPPED };
        }
    }
    count(Stat::Decapsulated, len);
    xdp_action::XDP_PASS
}
