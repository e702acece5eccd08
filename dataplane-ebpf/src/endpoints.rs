//! Which local pod sits behind which port, so that decapsulated packets
//! can be delivered straight into the pod (`forward::redirect_to_pod`)
//! instead of through the bridge, which would segment every tunnel-GSO
//! packet in software; and what a CNI pod may send.
//!
//! Two kinds of port:
//!
//! - A CNI pod's port (in `pod_ports_v1`, written by the agent when the
//!   plugin registers the pod): its endpoint entry is the agent's. Nothing
//!   is learnt there, and a frame whose Ethernet source is not the pod's
//!   MAC, an IPv4 packet whose source is not the pod's IP, or ARP with
//!   another sender, is dropped ([`check_port`]).
//! - A bridge port (the stock bridge plugin's veth): the pod is learnt
//!   from what it sends ([`learn`]). An entry is created only where there
//!   is none, or refreshed when it is this port's own: learning never
//!   repoints an entry that belongs to another port, whether learnt there
//!   or registered. An address that moves to another port therefore
//!   follows only once the agent has removed the old entry, which it does
//!   as soon as the old port goes.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use dataplane_common::{EndpointInfo, EndpointKey, NodeConfig, PodPortKey, Stat};

use crate::{
    consts::EEXIST,
    event,
    maps::{ENDPOINTS, POD_PORTS},
    parse::{self, Ipv4Packet, in_prefix},
};

/// What kind of port a pod frame came in on, and whether it may pass.
pub enum Port {
    /// A bridge port: learn from it.
    Bridge,
    /// A CNI pod's port, and the frame is from the pod's own addresses.
    Registered,
    /// A CNI pod's port, and the frame claims another address.
    Spoofed(Stat),
}

#[inline(always)]
fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading our own skb's ifindex (the pod's host-side device).
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Classifies the port and checks a CNI pod's frame against its
/// registration. `pkt` is the frame parsed as IPv4, if it is IPv4.
#[inline(always)]
pub fn check_port(ctx: &TcContext, pkt: Option<&Ipv4Packet>) -> Port {
    let key = PodPortKey {
        ifindex: ingress_ifindex(ctx),
    };
    // SAFETY: plain data, copied out at once.
    let Some(port) = (unsafe { POD_PORTS.get(key) }) else {
        return Port::Bridge;
    };
    let (ip, mac) = (port.ip, port.mac);
    if let Some(pkt) = pkt {
        return if pkt.src_mac != mac {
            Port::Spoofed(Stat::DropSpoofedMac)
        } else if pkt.saddr != ip {
            Port::Spoofed(Stat::DropSpoofedIp)
        } else {
            Port::Registered
        };
    }
    let Some(sender) = parse::non_ip_sender(ctx.data(), ctx.data_end()) else {
        return Port::Spoofed(Stat::DropSpoofedMac);
    };
    if sender.src_mac != mac {
        return Port::Spoofed(Stat::DropSpoofedMac);
    }
    match sender.arp {
        Some((sha, _)) if sha != mac => Port::Spoofed(Stat::DropSpoofedMac),
        Some((_, spa)) if spa != ip => Port::Spoofed(Stat::DropSpoofedIp),
        _ => Port::Registered,
    }
}

/// Records the sender of `pkt`, a pod behind a bridge port of this node
/// (see the module doc for when an entry is created or refreshed).
#[inline(always)]
pub fn learn(ctx: &TcContext, cfg: &NodeConfig, pkt: &Ipv4Packet) {
    let (src_ip, src_mac) = (pkt.saddr, pkt.src_mac);
    if src_ip == cfg.gateway || !in_prefix(src_ip, cfg.subnet, cfg.subnet_prefix_len) {
        return;
    }
    let ifindex = ingress_ifindex(ctx);
    let key = EndpointKey { ip: src_ip };
    let info = EndpointInfo {
        ifindex,
        mac: src_mac,
        gw_mac: cfg.bridge_mac,
    };
    // SAFETY: plain data, compared and dropped at once.
    let flags = match unsafe { ENDPOINTS.get(key) } {
        None => u64::from(BPF_NOEXIST),
        Some(ep) if ep.ifindex != ifindex => return,
        Some(ep) if ep.mac == src_mac && ep.gw_mac == cfg.bridge_mac => return,
        // This port's own entry, with a new MAC: refresh it.
        Some(_) => 0,
    };
    // Losing a race to another port's create (EEXIST) is fine: that entry
    // stands until its port goes.
    match ENDPOINTS.insert(key, info, flags) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(e) if event::is_full(i64::from(e)) => {
            event::map_full(ctx, "endpoints_v1", i64::from(e))
        }
        Err(e) => log_event!(ctx, "endpoints_v1: {:i} not learnt ({})", src_ip, e),
    }
}

/// The entry of a CNI pod of this node at `ip`: registered by the agent,
/// its port in `pod_ports_v1` with this address.
#[inline(always)]
pub fn registered(ip: [u8; 4]) -> Option<EndpointInfo> {
    // SAFETY: plain data, copied out at once.
    let ep = *unsafe { ENDPOINTS.get(EndpointKey { ip }) }?;
    // SAFETY: as above.
    let port = unsafe {
        POD_PORTS.get(PodPortKey {
            ifindex: ep.ifindex,
        })
    }?;
    (port.ip == ip).then_some(ep)
}
