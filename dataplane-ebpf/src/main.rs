//! Entry points only. Each program reads the node configuration, parses
//! the packet once, then hands it to the module for each concern in turn
//! (services, encapsulation, decapsulation). Every packet leaves through
//! exactly one outcome counter (`dataplane_common::Stat`).
#![no_std]
#![no_main]

// First: the `log_event!` macro is used by the modules below.
#[macro_use]
mod event;

mod consts;
mod csum;
mod ct;
mod decap;
mod ecn;
mod encap;
mod endpoints;
mod forward;
mod frag;
mod hostnet;
mod icmp;
mod l4;
mod lb;
mod maps;
mod masq;
mod nat;
mod natport;
mod nodeport;
mod parse;
mod reject;
mod sock;
mod stats;
mod track;
mod ttl;
mod vxlan;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use dataplane_common::{NODE_CFG_READY, NodeConfig, Stat};

use crate::{endpoints::Port, lb::Verdict, maps::NODE_CONFIG, parse::in_prefix, stats::count};

#[inline(always)]
pub(crate) fn node_config() -> Option<&'static NodeConfig> {
    NODE_CONFIG.get(0).filter(|c| c.flags & NODE_CFG_READY != 0)
}

/// TC ingress of every pod's host-side device (bridge ports and CNI
/// pods' ports): packets leaving a pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        event::config_missing(&ctx, "from_pod");
        return TC_ACT_OK;
    };
    let pkt = parse::ipv4(ctx.data(), ctx.data_end());
    match endpoints::check_port(&ctx, pkt.as_ref()) {
        Port::Spoofed(stat) => {
            count(stat, ctx.len());
            return TC_ACT_SHOT;
        }
        Port::Registered => {}
        Port::Bridge => {
            if let Some(pkt) = &pkt {
                endpoints::learn(&ctx, cfg, pkt);
            }
        }
    }
    let Some(pkt) = pkt else {
        count(Stat::PassNotIpv4, ctx.len());
        return TC_ACT_OK;
    };
    // A router answers a packet whose TTL runs out before translating it.
    if let Some(action) = ttl::expired_from_pod(&ctx, cfg, &pkt) {
        return action;
    }
    // Services first: a ClusterIP is never forwarded untranslated.
    let dst = match lb::from_pod(&ctx, &pkt) {
        Verdict::Pass => pkt.daddr,
        Verdict::Done(action) => return action,
        Verdict::Translated(to) if in_prefix(to, cfg.subnet, cfg.subnet_prefix_len) => {
            return to_local_pod(&ctx, cfg, to);
        }
        Verdict::Translated(to) => to,
    };
    encap::encap_to_peer(&ctx, cfg, dst, pkt.tos, encap::Hop::Forwarded)
}

/// A translated Service packet for a pod of this node: a CNI pod gets it
/// straight (it is not behind the bridge); any other goes to the bridge
/// directly, not through IP forwarding (which would also send the client
/// an ICMP redirect, in and out being the same bridge).
#[inline(always)]
pub(crate) fn to_local_pod(ctx: &TcContext, cfg: &NodeConfig, to: [u8; 4]) -> i32 {
    if let Some(ep) = endpoints::registered(to)
        && let Some(action) = forward::redirect_to_endpoint(ctx, &ep)
    {
        count(Stat::RedirectToPod, ctx.len());
        return action;
    }
    count(Stat::RedirectToBridge, ctx.len());
    forward::redirect_to_bridge(cfg.bridge_ifindex)
}

/// TC ingress of the underlay interface: VXLAN in (decapsulation in TC
/// mode, delivery of XDP-decapsulated frames in XDP mode).
#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        event::config_missing(&ctx, "from_underlay");
        return TC_ACT_OK;
    };
    decap::tc_from_underlay(&ctx, cfg)
}

/// TC egress of the underlay interface: masquerade of pod traffic leaving
/// the cluster network (see `masq.rs`).
#[classifier]
pub fn to_underlay(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        return TC_ACT_OK;
    };
    masq::to_underlay(&ctx, cfg)
}

/// TC egress where the host stack hands packets to pods (`cni0`, CNI pods'
/// host-side devices): Service replies that came through the host stack
/// are translated back to the ClusterIP.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    if node_config().is_none() {
        return TC_ACT_OK;
    }
    lb::to_pod(&ctx)
}

/// XDP on the underlay interface (`--decap-mode xdp`).
#[xdp]
pub fn decap_xdp(ctx: XdpContext) -> u32 {
    let Some(cfg) = node_config() else {
        // Counted by from_underlay, which sees the frame next.
        return xdp_action::XDP_PASS;
    };
    decap::xdp_decap(&ctx, cfg)
}

/// TC egress of the host overlay device (`--host-device`): the node's own
/// packets to other nodes' pod subnets.
#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    let Some(cfg) = node_config() else {
        event::config_missing(&ctx, "from_host");
        return TC_ACT_OK;
    };
    hostnet::from_host(&ctx, cfg)
}

/// cgroup connect4: the node's own connections to a ClusterIP go to a
/// backend from the start.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_service(&ctx, sock::Call::Connect)
}

/// cgroup sendmsg4: UDP datagrams to a ClusterIP (unconnected sockets).
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_service(&ctx, sock::Call::Sendmsg)
}

/// cgroup recvmsg4: a reply's source shown as the ClusterIP it was sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::from_service(&ctx)
}

/// cgroup getpeername4: a connected socket's peer shown as the ClusterIP.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::from_service(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
