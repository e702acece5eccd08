//! North-south Services: traffic from outside the cluster to a NodePort
//! (this node's PublicIP and a nodePort), an externalIP or a LoadBalancer
//! ingress IP with a port, as it arrives on the underlay.
//!
//! Such a frontend is an entry of `SERVICES` flagged `SVC_F_EXTERNAL`
//! (the agent writes this node's PublicIP as its address). A new flow
//! picks its backend from the frontend's Maglev table (`MAGLEV`), indexed
//! by a hash of the 5-tuple that every node computes alike, so any node a
//! flow reaches sends it to the same backend. The flow is tracked in the
//! Service conntrack (`CT`/`RNAT`, flagged `CT_F_NORTH_SOUTH`):
//!
//! - `externalTrafficPolicy: Cluster`: any endpoint; the source becomes
//!   this node's gateway address with a port of the NAT range, so the
//!   reply of a backend on another node comes back here inside VXLAN. Its
//!   reply arrives decapsulated for the gateway address
//!   ([`decapsulated_to_gateway`], before the packet would go to the host
//!   stack) or from a local backend's veth (`lb::from_pod`).
//! - `externalTrafficPolicy: Local`: this node's endpoints only, the
//!   client's address kept; none here but some on other nodes: dropped
//!   (`drop_np_no_local_endpoint`).
//! - A Service without any endpoint refuses new flows as kube-proxy's
//!   REJECT does: a TCP RST, an ICMP port unreachable for UDP
//!   (`np_reject_no_backend`).
//!
//! Each frontend has its counters in `svc_stats_v1` (new flows, packets,
//! bytes, rejections), as ClusterIPs do.
//!
//! The reply, translated back (source the frontend, destination the
//! client), leaves through the underlay by a FIB lookup and a redirect
//! ([`to_underlay`]): the host stack would drop a forwarded packet whose
//! source is its own address.

use aya_ebpf::{EbpfContext, bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{
    BackendKey, CtEntry, MAGLEV_M, MaglevKey, NodeConfig, PROTO_TCP, SVC_F_EMPTY_DROPS,
    SVC_F_ETP_LOCAL, SVC_F_EXTERNAL, Stat, SvcInfo, SvcKey,
    ct::{self as ct_rules, CT_F_NORTH_SOUTH, Dir},
};

use crate::{
    ct::{self, CreateError, Seen},
    encap::{self, Hop},
    forward, frag, icmp,
    l4::{Flow, L4},
    lb::{self, Verdict},
    maps::{BACKENDS, MAGLEV, SERVICES},
    nat::{Addr, Port, set_addr, set_port},
    natport::{self, NoPort},
    parse::{self, Ipv4Packet, in_prefix},
    stats::{PacketLen, count},
};

/// A packet that arrived on the underlay and is no VXLAN for this node:
/// `Some(action)` when it is north-south Service traffic (translated and
/// sent on, or refused, counted), `None` to leave it to the kernel.
#[inline(always)]
pub fn from_underlay(ctx: &TcContext, cfg: &NodeConfig) -> Option<i32> {
    let pkt = parse::ipv4(ctx.data(), ctx.data_end())?;
    let translated = match pkt.l4 {
        L4::Flow(flow) => return flow_from_outside(ctx, cfg, &pkt, &flow),
        // The rest of a datagram whose first fragment went to a backend.
        L4::Fragment(f) => frag::from_outside(ctx, &f)?,
        // An ICMP error about a reply a backend sent out.
        L4::Other => icmp::from_outside(ctx, &pkt)?,
        L4::Malformed => return None,
    };
    Some(match translated {
        Ok(backend) => to_backend(ctx, cfg, backend, pkt.tos),
        Err(Verdict::Done(action)) => action,
        Err(Verdict::Translated(_) | Verdict::Pass) => TC_ACT_SHOT,
    })
}

/// A translated packet from outside on its way to `backend`: into a pod
/// of this node, or encapsulated to the backend's node.
#[inline(always)]
fn to_backend(ctx: &TcContext, cfg: &NodeConfig, backend: [u8; 4], tos: u8) -> i32 {
    if in_prefix(backend, cfg.subnet, cfg.subnet_prefix_len) {
        return crate::to_local_pod(ctx, cfg, backend);
    }
    encap::encap_to_peer(ctx, cfg, backend, tos, Hop::Forwarded)
}

/// A TCP/UDP packet from outside: to a north-south frontend, it is
/// translated (a new flow gets its backend) and sent on, or refused.
#[inline(always)]
fn flow_from_outside(
    ctx: &TcContext,
    cfg: &NodeConfig,
    pkt: &Ipv4Packet,
    flow: &Flow,
) -> Option<i32> {
    let flow = *flow;
    let key = SvcKey {
        vip: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: plain data, copied out.
    let svc = unsafe { SERVICES.get(key) }.copied()?;
    if svc.flags & SVC_F_EXTERNAL == 0 {
        return None;
    }
    let len = ctx.len();
    let entry = match flow_entry(ctx, cfg, &flow, &key, &svc) {
        Ok(e) => e,
        Err(Refused::Drop(stat)) => {
            count(stat, len);
            return Some(TC_ACT_SHOT);
        }
        Err(Refused::Reject) => {
            return match lb::reject(ctx, &flow, &key, Stat::NpRejectNoBackend) {
                Verdict::Done(action) => Some(action),
                Verdict::Translated(_) | Verdict::Pass => Some(TC_ACT_SHOT),
            };
        }
    };
    lb::svc_counters(ctx, &key, |c| {
        c.packets += 1;
        c.bytes += u64::from(len);
    });
    let b = entry.backend;
    let ok = set_addr(ctx, &flow, Addr::Dst, flow.daddr, b.ip).is_ok()
        && set_port(ctx, &flow, Port::Dst, flow.dport, b.port).is_ok()
        && (entry.snat == [0; 4]
            || set_addr(ctx, &flow, Addr::Src, flow.saddr, entry.snat).is_ok())
        && (entry.snat_port == [0; 2]
            || set_port(ctx, &flow, Port::Src, flow.sport, entry.snat_port).is_ok());
    if !ok {
        log_event!(ctx, "nodeport: DNAT to {:i} failed", b.ip);
        count(Stat::DropNatFailed, len);
        return Some(TC_ACT_SHOT);
    }
    if flow.first_fragment {
        frag::remember(ctx, &flow);
    }
    count(Stat::NpForward, len);
    Some(to_backend(ctx, cfg, b.ip, pkt.tos))
}

/// Why a packet gets no flow.
#[derive(Clone, Copy)]
pub enum Refused {
    /// Dropped, counted as this.
    Drop(Stat),
    /// The Service has no endpoints: refused as kube-proxy's REJECT does
    /// (TCP RST, ICMP port unreachable), counted `np_reject_no_backend`.
    Reject,
}

/// The flow's entry: its live one, or a new one.
#[inline(always)]
pub fn flow_entry<C: EbpfContext + PacketLen>(
    ctx: &C,
    cfg: &NodeConfig,
    flow: &Flow,
    key: &SvcKey,
    svc: &SvcInfo,
) -> Result<CtEntry, Refused> {
    let now = ct::now();
    let fwd = ct::key(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    if let Some(p) = ct::lookup_forward(&fwd, now) {
        // SAFETY: a map value pointer, valid for this program run.
        let e = unsafe { *p };
        if e.svc_id == svc.id && lb::is_live(svc.id, &e.backend) {
            match ct::observe(p, flow.proto, Dir::Orig, flow.tcp_flags, now) {
                Seen::Tracked => return Ok(e),
                Seen::Reopen => {}
            }
        }
        // Backend gone, frontend reused, or the tuple reopened: start over.
        ct::forget(&fwd, &ct::reply_key(&fwd, &e));
        if flow.proto == PROTO_TCP && !flow.is_tcp_open() {
            return Err(Refused::Drop(Stat::DropNpInvalid));
        }
    }
    let Some(initial) = ct_rules::initial(flow.proto, flow.tcp_flags) else {
        return Err(Refused::Drop(Stat::DropNpInvalid));
    };
    if svc.count == 0 {
        // kube-proxy: no endpoints at all, REJECT; endpoints on other
        // nodes only (ETP Local), DROP.
        return Err(if svc.flags & SVC_F_EMPTY_DROPS != 0 {
            Refused::Drop(Stat::DropNpNoLocalEndpoint)
        } else {
            Refused::Reject
        });
    }
    let hash = flow_hash(flow);
    let slot = maglev_slot(svc, hash);
    // SAFETY: plain data, copied out.
    let Some(backend) = (unsafe {
        BACKENDS.get(BackendKey {
            svc_id: svc.id,
            slot,
        })
    })
    .copied() else {
        log_event!(ctx, "nodeport {}: backend slot missing", svc.id);
        return Err(Refused::Drop(Stat::DropNpNoBackend));
    };
    let (mut entry, rnat) =
        ct::new_entries(flow, key, svc.id, backend, initial, CT_F_NORTH_SOUTH, now);
    let created = if svc.flags & SVC_F_ETP_LOCAL != 0 {
        ct::create(&fwd, &entry, &rnat)
    } else {
        // Cluster: SNAT to the gateway address and a free NAT port.
        entry.snat = cfg.gateway;
        let (min, max) = cfg.nat_ports();
        let reply = |port| {
            let mut e = entry;
            e.snat_port = port;
            ct::reply_key(&fwd, &e)
        };
        let port = natport::allocate(
            min,
            max,
            hash,
            natport::NODEPORT_TRIES,
            |port| ct::insert_reply(&reply(port), &rnat),
            |port| ct::reclaim(&reply(port)),
        );
        match port {
            Ok(port) => {
                entry.snat_port = port;
                ct::create_forward(&fwd, &entry)
            }
            Err(NoPort::Exhausted) => return Err(Refused::Drop(Stat::DropNpNatPorts)),
            Err(NoPort::Full) => Err(CreateError::Full),
            Err(NoPort::Failed(_)) => Err(CreateError::Failed),
        }
    };
    match created {
        Ok(()) => {}
        Err(CreateError::Full) => return Err(Refused::Drop(Stat::DropCtFull)),
        Err(CreateError::Failed) => return Err(Refused::Drop(Stat::DropNatFailed)),
    }
    lb::svc_counters(ctx, key, |c| c.new_flows += 1);
    Ok(entry)
}

/// The backend slot of a new flow: the Maglev table's entry at the flow's
/// hash, or (no table yet, or an entry beyond the count while the agent
/// rewrites it) the hash modulo the count.
#[inline(always)]
fn maglev_slot(svc: &SvcInfo, hash: u32) -> u32 {
    let idx = (hash % MAGLEV_M) as usize;
    // The compiler knows idx < M and would drop the check below, which
    // the verifier needs (it cannot follow the modulo, done by multiply).
    // SAFETY: a plain read of a local.
    let idx = unsafe { core::ptr::read_volatile(&idx) };
    if let Some(t) = MAGLEV.get_ptr(MaglevKey { svc_id: svc.id })
        && idx < MAGLEV_M as usize
    {
        // SAFETY: a map value pointer, valid for this program run; idx is
        // checked against the table's length.
        let slot = u32::from(unsafe { (*t).slots[idx] });
        if slot < svc.count {
            return slot;
        }
    }
    hash % svc.count
}

/// A hash of the 5-tuple that does not depend on the node (unlike the
/// kernel's flow hash, which is seeded at boot): murmur3's finalizer over
/// the addresses, ports and protocol.
#[inline(always)]
fn flow_hash(f: &Flow) -> u32 {
    let ports =
        (u32::from(u16::from_be_bytes(f.sport)) << 16) | u32::from(u16::from_be_bytes(f.dport));
    let mut h = 0x9e37_79b9u32;
    h = mix(h ^ u32::from_be_bytes(f.saddr));
    h = mix(h ^ u32::from_be_bytes(f.daddr));
    h = mix(h ^ ports);
    mix(h ^ u32::from(f.proto))
}

#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// A packet decapsulated for this node's gateway address: the reply of a
/// backend on another node to a north-south flow this node SNATed. It is
/// translated back and sent out of the underlay to the client. `None`:
/// not such a reply, the packet goes to the host stack as before.
#[inline(always)]
pub fn decapsulated_to_gateway(ctx: &TcContext, cfg: &NodeConfig) -> Option<i32> {
    let pkt = parse::ipv4(ctx.data(), ctx.data_end())?;
    // A reply, one of its later fragments, or an ICMP error from the
    // backend about the client's packet.
    match lb::reverse_nat_inbound(ctx, &pkt)? {
        // A north-south reply: already sent out (`to_underlay`), or dropped.
        Verdict::Done(action) => Some(action),
        // A Service reply for a pod (not expected at the gateway address).
        Verdict::Translated(_) => Some(forward::redirect_to_bridge(cfg.bridge_ifindex)),
        // Not a Service reply: the host stack's.
        Verdict::Pass => None,
    }
}

/// Sends the translated reply of a north-south flow (destination
/// `client`) out of the underlay: FIB lookup, Ethernet rewritten,
/// redirect. Called by `lb::reverse_nat` wherever the reply entered.
#[inline(always)]
pub fn to_underlay(ctx: &TcContext, client: [u8; 4]) -> i32 {
    let len = ctx.len();
    let Some(cfg) = crate::node_config() else {
        count(Stat::DropNpFib, len);
        return TC_ACT_SHOT;
    };
    let src = match parse::ipv4(ctx.data(), ctx.data_end()) {
        Some(p) => p.saddr,
        None => cfg.public_ip,
    };
    match forward::redirect_to_underlay(ctx, src, client, cfg.underlay_ifindex) {
        Ok(action) => {
            count(Stat::NpToUnderlay, len);
            action
        }
        Err(rc) => {
            log_event!(ctx, "nodeport: no route to {:i} ({})", client, rc);
            count(Stat::DropNpFib, len);
            TC_ACT_SHOT
        }
    }
}
