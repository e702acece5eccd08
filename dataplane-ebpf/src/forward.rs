//! Sending a packet on its way: FIB lookups and redirects.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use dataplane_common::{EndpointInfo, EndpointKey};
use network_types::eth::EthHdr;

use crate::{consts::AF_INET, maps::ENDPOINTS, parse::ptr_at};

/// Sends an encapsulated frame towards `dst` (the remote node's PublicIP)
/// out of the interface the routing table picks. The outer Ethernet
/// addresses come from the FIB and neighbour tables; when the neighbour is
/// not resolved yet the kernel resolves it (bpf_redirect_neigh), so the
/// first packet to a new node is not lost.
///
/// Returns the TC action, or the `bpf_fib_lookup` result when there is no
/// way there (no route, unreachable, ...).
#[inline(always)]
pub fn redirect_to_underlay(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    ifindex: u32,
) -> Result<i32, i64> {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: p lives on the stack for the duration of the call.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0).ok_or(rc)?;
        // SAFETY: bounds checked.
        unsafe {
            (*eth).dst_addr = p.dmac;
            (*eth).src_addr = p.smac;
        }
        let rc = unsafe { bpf_redirect(p.ifindex, 0) };
        return Ok(rc as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 || rc == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 {
        // Let the kernel route and resolve the next hop (it queues the
        // packet while ARP runs). bpf_fib_lookup refuses to answer when IP
        // forwarding is off on the interface; bpf_redirect_neigh does not.
        let rc = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
        return Ok(rc as i32);
    }
    Err(rc)
}

/// Delivers a decapsulated IPv4 packet to a pod behind the bridge: the
/// kernel resolves the pod's MAC on the bridge and the bridge forwards it
/// to the pod's port. This skips the IP forwarding path (and its GSO and
/// MTU checks, which misjudge a just-decapsulated GSO packet).
#[inline(always)]
pub fn redirect_to_bridge(bridge_ifindex: u32) -> i32 {
    // SAFETY: plain helper call; NULL params means "look up the next hop".
    // TC_ACT_REDIRECT, or TC_ACT_SHOT for invalid arguments.
    unsafe { bpf_redirect_neigh(bridge_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Delivers a decapsulated IPv4 packet straight into a local pod, if the
/// agent listed it in `endpoints_v1`: Ethernet readdressed (pod MAC from
/// the bridge MAC), then `bpf_redirect_peer` to the host-side veth, which
/// hands the skb to the pod's interface as received, in this same softirq.
///
/// Why not the bridge: 6.18's `bpf_skb_adjust_room` cannot clear
/// skb->encapsulation or SKB_GSO_UDP_TUNNEL on decapsulation (no
/// BPF_F_ADJ_ROOM_DECAP_L4_UDP yet), and the bridge has no
/// hw_enc_features, so `validate_xmit_skb` on cni0 segments and checksums
/// every 64 KB GSO packet in software and the pod receives 45 packets
/// instead of one. The pod's veth keeps the GSO packet whole, and a local
/// TCP receiver does not care about the leftover tunnel GSO bits.
///
/// `dst` is the packet's (parsed) IPv4 destination. `None` when the pod is
/// not in the map (the caller uses the bridge). Must run at TC ingress
/// (`bpf_redirect_peer` refuses anything else).
#[inline(always)]
pub fn redirect_to_pod(ctx: &TcContext, dst: [u8; 4]) -> Option<i32> {
    // SAFETY: read-only lookup of a plain value.
    let ep = *unsafe { ENDPOINTS.get(EndpointKey { ip: dst }) }?;
    redirect_to_endpoint(ctx, &ep)
}

/// [`redirect_to_pod`] with the endpoint entry in hand. `None` when the
/// frame has no Ethernet header to readdress.
#[inline(always)]
pub fn redirect_to_endpoint(ctx: &TcContext, ep: &EndpointInfo) -> Option<i32> {
    let (ifindex, mac, gw_mac) = (ep.ifindex, ep.mac, ep.gw_mac);
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = mac;
        (*eth).src_addr = gw_mac;
    }
    // SAFETY: plain helper call.
    let rc = unsafe { bpf_redirect_peer(ifindex, 0) };
    Some(rc as i32)
}
