//! Learning which local pod sits behind which bridge port, so that
//! decapsulated packets can be delivered straight into the pod
//! (`forward::redirect_to_pod`) instead of through the bridge, which would
//! segment every tunnel-GSO packet in software.
//!
//! `from_pod` sees every packet a pod sends, with the pod's MAC and the
//! host-side veth it came in on; the agent removes entries whose port has
//! gone. A pod claiming another pod's address would draw its traffic, as
//! ARP spoofing on the bridge already allows; the entry follows the last
//! sender.

use aya_ebpf::programs::TcContext;
use dataplane_common::{EndpointInfo, EndpointKey, NodeConfig};

use crate::{
    maps::ENDPOINTS,
    parse::{Ipv4Packet, in_prefix},
};

/// Records (or refreshes) the sender of `pkt`, a pod of this node.
#[inline(always)]
pub fn learn(ctx: &TcContext, cfg: &NodeConfig, pkt: &Ipv4Packet) {
    let (src_ip, src_mac) = (pkt.saddr, pkt.src_mac);
    if src_ip == cfg.gateway || !in_prefix(src_ip, cfg.subnet, cfg.subnet_prefix_len) {
        return;
    }
    // SAFETY: reading our own skb's ifindex (the pod's host-side veth).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = EndpointKey { ip: src_ip };
    // SAFETY: plain data, compared and dropped at once.
    if let Some(ep) = unsafe { ENDPOINTS.get(key) }
        && ep.ifindex == ifindex
        && ep.mac == src_mac
        && ep.gw_mac == cfg.bridge_mac
    {
        return;
    }
    let info = EndpointInfo {
        ifindex,
        mac: src_mac,
        gw_mac: cfg.bridge_mac,
    };
    if ENDPOINTS.insert(key, info, 0).is_err() {
        log_event!(ctx, "endpoints_v1 full? {:i} not learnt", src_ip);
    }
}
