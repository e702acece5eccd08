//! ClusterIP load balancing in place of kube-proxy's iptables chains: one
//! hash lookup finds the service whatever their number, connection
//! tracking (`ct.rs`) keeps a flow on its backend, reverse NAT restores
//! the ClusterIP on replies.
//!
//! Flow of a new connection from a pod (at its veth, `from_pod`):
//! `SERVICES` hit -> no live `CT` entry -> pick a backend (affinity or
//! uniform random) -> record the flow (`CT` forward, `RNAT` reply) ->
//! DNAT. Later packets follow `CT` and move its state. Replies from the
//! backend hit `RNAT` wherever they enter this node (its veth if the
//! backend is local, the underlay after decapsulation if it is remote).
//!
//! A TCP segment that finds no entry is treated as netfilter with
//! kube-proxy's settings treats it: an ACK is picked up as an established
//! flow (`nf_conntrack_tcp_loose=1`), a RST, FIN or SYN-ACK is INVALID and
//! dropped; only a Service with no endpoints answers with a RST
//! (kube-proxy's REJECT).
//!
//! There, too, the later fragments of a datagram follow its first
//! (`frag`) and ICMP errors about a flow are translated (`icmp`); both
//! reach the flow state through `track`.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_get_prandom_u32,
    programs::TcContext,
};
use dataplane_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, HAIRPIN_SNAT_IP, LiveKey,
    PROTO_TCP, RnatEntry, SVC_F_AFFINITY, Stat, SvcCounters, SvcInfo, SvcKey, VipKey,
    ct::{self as ct_rules, CT_F_NORTH_SOUTH, Dir, TCP_RST},
};

use crate::{
    ct::{self, CreateError, Seen},
    frag, icmp,
    l4::{Flow, L4},
    maps::{AFFINITY, BACKENDS, LIVE, SERVICES, SVC_STATS, VIPS},
    nat::{Addr, Port, set_addr, set_port},
    parse::{self, Ipv4Packet},
    reject,
    stats::{PacketLen, count},
};

/// What the service path decided about a packet.
pub enum Verdict {
    /// Not service traffic: forward as it is.
    Pass,
    /// Translated; forward to this destination address.
    Translated([u8; 4]),
    /// Finished here with this TC action (rejected or dropped, counted).
    Done(i32),
}

/// Service handling for a packet leaving a pod.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, pkt: &Ipv4Packet) -> Verdict {
    match pkt.l4 {
        L4::Flow(flow) => {
            let v = from_pod_flow(ctx, &flow);
            if flow.first_fragment && matches!(v, Verdict::Translated(_)) {
                frag::remember(ctx, &flow);
            }
            v
        }
        L4::Fragment(f) => frag::follow(ctx, &f),
        L4::Other => match icmp::from_pod(ctx, pkt) {
            Some(v) => v,
            None if is_vip(pkt.daddr) => drop_counted(ctx, Stat::DropSvcUndefinedPort),
            None => Verdict::Pass,
        },
        L4::Malformed if is_vip(pkt.daddr) => drop_counted(ctx, Stat::DropSvcMalformed),
        L4::Malformed => Verdict::Pass,
    }
}

#[inline(always)]
fn drop_counted(ctx: &TcContext, stat: Stat) -> Verdict {
    count(stat, ctx.len());
    Verdict::Done(TC_ACT_SHOT)
}

/// A TCP/UDP packet leaving a pod: a reply to translate back, a packet to
/// a ClusterIP to translate to its backend, or neither.
#[inline(always)]
fn from_pod_flow(ctx: &TcContext, flow: &Flow) -> Verdict {
    let len = ctx.len();
    if let Some(d) = reverse_nat(ctx, flow) {
        return d;
    }
    let key = SvcKey {
        vip: flow.daddr,
        port: flow.dport,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: values are plain data; copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        if is_vip(flow.daddr) {
            return drop_counted(ctx, Stat::DropSvcUndefinedPort);
        }
        return Verdict::Pass;
    };
    let now = ct::now();
    let ct_key = ct::key(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let entry = match tracked(ctx, flow, &key, &svc, &ct_key, now) {
        Ok(Some(e)) => e,
        Ok(None) => match new_flow(ctx, flow, &key, &svc, &ct_key, now) {
            Ok(e) => e,
            Err(v) => return v,
        },
        Err(v) => return v,
    };
    svc_counters(ctx, &key, |c| {
        c.packets += 1;
        c.bytes += u64::from(len);
    });
    let b = entry.backend;
    let ok = set_addr(ctx, flow, Addr::Dst, flow.daddr, b.ip).is_ok()
        && set_port(ctx, flow, Port::Dst, flow.dport, b.port).is_ok()
        && (entry.snat == [0; 4] || set_addr(ctx, flow, Addr::Src, flow.saddr, entry.snat).is_ok());
    if !ok {
        log_event!(ctx, "svc: DNAT to {:i} failed", b.ip);
        return drop_counted(ctx, Stat::DropNatFailed);
    }
    count(Stat::SvcForward, len);
    Verdict::Translated(b.ip)
}

/// A reply from a backend to a client: restore the ClusterIP as its source
/// (and the client as its destination for hairpin flows).
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, flow: &Flow) -> Option<Verdict> {
    let key = ct::key(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    let reply = ct::lookup_reply(&key)?;
    // A SYN from the backend cannot reopen the flow (only the client's
    // can), so the result is always "tracked".
    let _ = ct::observe(
        reply.entry,
        flow.proto,
        Dir::Reply,
        flow.tcp_flags,
        reply.now,
    );
    let r: RnatEntry = reply.rnat;
    // SAFETY: a map value pointer, valid for this program run.
    let north_south = unsafe { (*reply.entry).flags } & CT_F_NORTH_SOUTH != 0;
    let ok = set_addr(ctx, flow, Addr::Src, flow.saddr, r.vip).is_ok()
        && set_port(ctx, flow, Port::Src, flow.sport, r.vport).is_ok()
        && set_addr(ctx, flow, Addr::Dst, flow.daddr, r.client).is_ok()
        && set_port(ctx, flow, Port::Dst, flow.dport, r.client_port).is_ok();
    if !ok {
        log_event!(ctx, "svc: reverse NAT to {:i} failed", r.client);
        return Some(drop_counted(ctx, Stat::DropNatFailed));
    }
    if north_south {
        // Its later fragments follow it (the callers remember only
        // translations that stay here).
        if flow.first_fragment {
            frag::remember(ctx, flow);
        }
        // It leaves through the underlay towards the client.
        count(Stat::NpReverse, ctx.len());
        return Some(Verdict::Done(crate::nodeport::to_underlay(ctx, r.client)));
    }
    count(Stat::SvcReverse, ctx.len());
    Some(Verdict::Translated(r.client))
}

/// Reverse NAT for a packet that just came out of the overlay (a reply
/// from a backend on another node, one of its later fragments, or an ICMP
/// error about a Service flow from the backend or the path). Returns its
/// IPv4 destination after the rewrite (`None` if it is not IPv4), or the
/// TC action when the rewrite failed (counted).
#[inline(always)]
pub fn reverse_nat_decapsulated(ctx: &TcContext) -> Result<Option<[u8; 4]>, i32> {
    let Some(pkt) = parse::ipv4(ctx.data(), ctx.data_end()) else {
        return Ok(None);
    };
    match reverse_nat_inbound(ctx, &pkt) {
        Some(Verdict::Done(action)) => Err(action),
        Some(Verdict::Translated(to)) => Ok(Some(to)),
        _ => Ok(Some(pkt.daddr)),
    }
}

/// Reverse NAT of a packet for a pod of this node that did not come from
/// a pod: a reply, later fragment or ICMP error of a Service flow.
#[inline(always)]
pub fn reverse_nat_inbound(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Verdict> {
    match pkt.l4 {
        L4::Flow(flow) => {
            let v = reverse_nat(ctx, &flow);
            if flow.first_fragment && matches!(v, Some(Verdict::Translated(_))) {
                frag::remember(ctx, &flow);
            }
            v
        }
        L4::Fragment(f) => Some(frag::follow(ctx, &f)),
        L4::Other => icmp::decapsulated(ctx, pkt),
        L4::Malformed => None,
    }
}

/// `to_pod`: a packet the host stack hands to a pod. A Service reply from
/// a backend the kernel routes (this node's own address, or outside the
/// cluster network, whose reply the masquerade already gave back the
/// pod's address) is translated back to the ClusterIP here, as it would
/// be at the backend's veth or after decapsulation. Returns the TC action.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    let Some(pkt) = parse::ipv4(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    match reverse_nat_inbound(ctx, &pkt) {
        Some(Verdict::Done(action)) => action,
        Some(Verdict::Translated(_)) => {
            count(Stat::ToPodReverse, ctx.len());
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// Is `flow` (a pod's packet, after the Service translation) the forward
/// direction of a live Service flow? Its reply direction has a reverse-NAT
/// entry then. The masquerade asks this of what leaves the cluster
/// network (a Service backend outside it).
#[inline(always)]
pub fn is_service_flow(flow: &Flow) -> bool {
    ct::lookup_reply(&ct::key(
        flow.daddr, flow.saddr, flow.dport, flow.sport, flow.proto,
    ))
    .is_some()
}

#[inline(always)]
pub fn is_vip(addr: [u8; 4]) -> bool {
    // SAFETY: existence check only.
    unsafe { VIPS.get(VipKey { vip: addr }) }.is_some()
}

/// The live entry of this flow, if it has one it may keep using.
/// `Ok(None)`: none (or it just ended), a new flow is to be made. `Err`:
/// the packet is finished (its backend is gone).
#[inline(always)]
fn tracked(
    ctx: &TcContext,
    flow: &Flow,
    key: &SvcKey,
    svc: &SvcInfo,
    ct_key: &CtKey,
    now: u64,
) -> Result<Option<CtEntry>, Verdict> {
    let Some(p) = ct::lookup_forward(ct_key, now) else {
        return Ok(None);
    };
    // SAFETY: a map value pointer, valid for this program run.
    let e = unsafe { *p };
    if e.svc_id != svc.id || !is_live(svc.id, &e.backend) {
        // Its backend was removed: forget the flow here and now. UDP
        // then picks a live backend; TCP is reset so the client fails
        // fast instead of hanging (a RST is dropped, never answered).
        ct::forget(ct_key, &ct::reply_key(ct_key, &e));
        if flow.proto == PROTO_TCP && !flow.is_tcp_open() {
            if flow.tcp_flags & TCP_RST != 0 {
                return Err(drop_counted(ctx, Stat::DropCtInvalid));
            }
            return Err(reject(ctx, flow, key, Stat::SvcResetBackendGone));
        }
        return Ok(None);
    }
    match ct::observe(p, flow.proto, Dir::Orig, flow.tcp_flags, now) {
        Seen::Tracked => Ok(Some(e)),
        Seen::Reopen => {
            // A new connection reusing a closed flow's tuple.
            ct::forget(ct_key, &ct::reply_key(ct_key, &e));
            Ok(None)
        }
    }
}

/// A packet without a live entry: rejected when the Service has no
/// endpoints, dropped when it is a TCP segment netfilter calls INVALID,
/// else a backend is picked and the flow recorded. `Err` is the
/// packet's end (counted).
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    flow: &Flow,
    key: &SvcKey,
    svc: &SvcInfo,
    ct_key: &CtKey,
    now: u64,
) -> Result<CtEntry, Verdict> {
    // INVALID first (a RST is never answered): kube-proxy drops those
    // before its REJECT, which only sees new connections.
    let Some(initial) = ct_rules::initial(flow.proto, flow.tcp_flags) else {
        return Err(drop_counted(ctx, Stat::DropCtInvalid));
    };
    if svc.count == 0 {
        return Err(reject(ctx, flow, key, Stat::SvcRejectNoBackend));
    }
    let Some(backend) = pick_backend(ctx, svc, flow.saddr, now) else {
        log_event!(ctx, "svc {}: backend slot missing", svc.id);
        return Err(reject(ctx, flow, key, Stat::SvcRejectNoBackend));
    };
    let (mut entry, rnat) = ct::new_entries(flow, key, svc.id, backend, initial, 0, now);
    // Hairpin: the client is its own backend. Give the flow another source
    // so the pod does not see a packet from itself.
    if backend.ip == flow.saddr {
        entry.snat = HAIRPIN_SNAT_IP;
    }
    match ct::create(ct_key, &entry, &rnat) {
        Ok(()) => {}
        Err(CreateError::Full) => return Err(drop_counted(ctx, Stat::DropCtFull)),
        Err(CreateError::Failed) => {
            log_event!(ctx, "svc {}: conntrack insert failed", svc.id);
            return Err(reject(ctx, flow, key, Stat::SvcRejectCtFailed));
        }
    }
    if entry.flags & ct_rules::CT_F_PICKED_UP != 0 {
        count(Stat::SvcCtPickup, ctx.len());
    }
    svc_counters(ctx, key, |c| c.new_flows += 1);
    Ok(entry)
}

/// Whether `backend` still serves the service (frontend) `svc_id`.
#[inline(always)]
pub fn is_live(svc_id: u32, backend: &Backend) -> bool {
    // SAFETY: existence check only.
    unsafe {
        LIVE.get(LiveKey {
            svc_id,
            backend: *backend,
        })
    }
    .is_some()
}

/// The backend for a new connection of `client` to `svc` (which has
/// `count > 0` slots): the client's affinity entry while it is fresh and
/// its backend live, else a slot at random (then remembered for affinity).
/// The one backend choice, shared by the packet path and the socket LB
/// (`sock.rs`). `None`: the slot is missing (a write in progress).
#[inline(always)]
pub fn pick_backend<C: EbpfContext>(
    ctx: &C,
    svc: &SvcInfo,
    client: [u8; 4],
    now: u64,
) -> Option<Backend> {
    let aff_key = AffinityKey {
        svc_id: svc.id,
        client,
    };
    if svc.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: plain data, copied out.
        if let Some(a) = unsafe { AFFINITY.get(aff_key) }.copied()
            && now.wrapping_sub(a.last_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000
            && is_live(svc.id, &a.backend)
        {
            remember_affinity(ctx, &aff_key, a.backend, now);
            return Some(a.backend);
        }
    }
    // Uniform over the slots in use, as kube-proxy's `statistic --mode
    // random` chain is. The modulo bias is below 1e-5 for any real count.
    // SAFETY: helper without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
    // SAFETY: plain data, copied out.
    let b = unsafe {
        BACKENDS.get(BackendKey {
            svc_id: svc.id,
            slot,
        })
    }
    .copied()?;
    if svc.flags & SVC_F_AFFINITY != 0 {
        remember_affinity(ctx, &aff_key, b, now);
    }
    Some(b)
}

#[inline(always)]
fn remember_affinity<C: EbpfContext>(ctx: &C, key: &AffinityKey, backend: Backend, now: u64) {
    if AFFINITY
        .insert(
            key,
            AffinityEntry {
                backend,
                last_ns: now,
            },
            0,
        )
        .is_err()
    {
        log_event!(ctx, "svc {}: affinity insert failed", key.svc_id);
    }
}

/// Rejects a new connection: counted under `stat` when the RST / ICMP
/// error went back to the client, as `drop_reject_failed` when it could
/// not be built.
#[inline(always)]
pub fn reject(ctx: &TcContext, flow: &Flow, key: &SvcKey, stat: Stat) -> Verdict {
    let len = ctx.len();
    svc_counters(ctx, key, |c| c.rejections += 1);
    let r = if flow.proto == PROTO_TCP {
        reject::tcp_reset(ctx, flow)
    } else {
        reject::port_unreachable(ctx, flow)
    };
    match r {
        Ok(action) => {
            count(stat, len);
            Verdict::Done(action)
        }
        Err(()) => {
            count(Stat::DropRejectFailed, len);
            Verdict::Done(TC_ACT_SHOT)
        }
    }
}

/// Applies `f` to the frontend's counters (`svc_stats_v1`, per CPU).
#[inline(always)]
pub fn svc_counters<C: EbpfContext + PacketLen>(
    ctx: &C,
    key: &SvcKey,
    f: impl FnOnce(&mut SvcCounters),
) {
    let ptr = match SVC_STATS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            // The agent creates the entry with the service; this covers a race.
            if let Err(e) = SVC_STATS.insert(key, SvcCounters::default(), 0) {
                let e = i64::from(e);
                if crate::event::is_full(e) {
                    crate::event::map_full(ctx, "svc_stats_v1", e);
                } else {
                    log_event!(ctx, "svc_stats_v1 insert failed ({})", e);
                }
                return;
            }
            match SVC_STATS.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    f(unsafe { &mut *ptr });
}
