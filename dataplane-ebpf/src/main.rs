//! Entry points only. Each program reads the node configuration, then hands
//! the packet to the module for its concern (encap, decap).
#![no_std]
#![no_main]

mod csum;
mod decap;
mod encap;
mod endpoints;
mod forward;
mod l4;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod stats;
mod vxlan;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{NODE_CFG_READY, NodeConfig, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{maps::NODE_CONFIG, parse::ptr_at, stats::count};

#[inline(always)]
fn node_config() -> Option<&'static NodeConfig> {
    NODE_CONFIG.get(0).filter(|c| c.flags & NODE_CFG_READY != 0)
}

/// TC ingress of every pod's host-side veth: packets leaving a pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        return TC_ACT_OK;
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return TC_ACT_OK;
    };
    // SAFETY: bounds checked.
    if !matches!(unsafe { (*eth).ether_type() }, Ok(EtherType::Ipv4)) {
        return TC_ACT_OK;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, EthHdr::LEN) else {
        count(Stat::DropTruncated, ctx.len());
        return TC_ACT_OK;
    };
    // SAFETY: bounds checked.
    let (mut dst, tos, src) = unsafe { ((*ip).dst_addr, (*ip).tos, (*ip).src_addr) };
    endpoints::learn(&ctx, cfg, src, unsafe { (*eth).src_addr });
    // Services first: a ClusterIP is never forwarded untranslated.
    match l4::parse(data, data_end) {
        Some(l4::L4::Flow(flow)) => match lb::from_pod(&ctx, &flow) {
            lb::Verdict::Pass => {}
            lb::Verdict::Done(action) => return action,
            lb::Verdict::Translated(to) => {
                dst = to;
                // A pod of this node: hand it to the bridge directly, not
                // through IP forwarding (which would also send the client
                // an ICMP redirect, in and out being the same bridge).
                if parse::in_prefix(dst, cfg.subnet, cfg.subnet_prefix_len) {
                    return forward::redirect_to_bridge(cfg.bridge_ifindex);
                }
            }
        },
        Some(l4::L4::Other { daddr }) if lb::is_vip(daddr) => {
            count(Stat::DropSvcUndefinedPort, ctx.len());
            return TC_ACT_SHOT;
        }
        _ => {}
    }
    encap::encap_to_peer(&ctx, cfg, dst, tos)
}

/// TC ingress of the underlay interface: VXLAN in (decapsulation in TC
/// mode, delivery of XDP-decapsulated frames in XDP mode).
#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        return TC_ACT_OK;
    };
    decap::tc_from_underlay(&ctx, cfg)
}

/// XDP on the underlay interface (`--decap-mode xdp`).
#[xdp]
pub fn decap_xdp(ctx: XdpContext) -> u32 {
    let Some(cfg) = node_config() else {
        return xdp_action::XDP_PASS;
    };
    decap::xdp_decap(&ctx, cfg)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
