//! ClusterIP load balancing in place of kube-proxy's iptables chains: one
//! hash lookup finds the service whatever their number, connection
//! tracking keeps a flow on its backend, reverse NAT restores the
//! ClusterIP on replies.
//!
//! Flow of a new connection from a pod (at its veth, `from_pod`):
//! `SERVICES` hit -> no `CT` entry -> pick a backend (affinity or uniform
//! random) -> record `CT` (forward) and `RNAT` (reply) -> DNAT. Later
//! packets follow `CT`. Replies from the backend hit `RNAT` wherever they
//! enter this node (its veth if the backend is local, the underlay after
//! decapsulation if it is remote).

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use dataplane_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CtEntry, CtKey, HAIRPIN_SNAT_IP, LiveKey,
    PROTO_TCP, RnatEntry, SVC_F_AFFINITY, Stat, SvcCounters, SvcInfo, SvcKey, VipKey,
};

use crate::{
    l4::Flow,
    maps::{AFFINITY, BACKENDS, CT, LIVE, RNAT, SERVICES, SVC_STATS, VIPS},
    nat::{IP_DST_OFF, IP_SRC_OFF, set_addr, set_port},
    reject,
    stats::count,
};

pub enum Verdict {
    /// Not service traffic: forward as it is.
    Pass,
    /// Translated; forward to this destination address.
    Translated([u8; 4]),
    /// Finished here with this TC action (rejected or dropped).
    Done(i32),
}

/// Service handling for a packet leaving a pod.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, flow: &Flow) -> Verdict {
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
            count(Stat::DropSvcUndefinedPort, len);
            return Verdict::Done(TC_ACT_SHOT);
        }
        return Verdict::Pass;
    };
    let ct_key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: as above.
    let entry = match unsafe { CT.get(ct_key) }.copied() {
        Some(e) if e.svc_id == svc.id && is_live(svc.id, &e.backend) => e,
        stale => {
            if let Some(e) = stale {
                // Its backend was removed: forget the flow here and now.
                // UDP then picks a live backend; TCP is reset below.
                let _ = CT.remove(ct_key);
                let _ = RNAT.remove(reply_key(flow, &e.backend, e.snat));
            }
            match new_flow(flow, &key, &svc, &ct_key) {
                Ok(e) => e,
                Err(stat) => return reject(ctx, flow, &key, stat),
            }
        }
    };
    svc_counters(&key, |c| {
        c.packets += 1;
        c.bytes += u64::from(len);
    });
    let b = entry.backend;
    let ok = set_addr(ctx, flow, IP_DST_OFF, flow.daddr, b.ip).is_ok()
        && set_port(ctx, flow, 2, flow.dport, b.port).is_ok()
        && (entry.snat == [0; 4]
            || set_addr(ctx, flow, IP_SRC_OFF, flow.saddr, entry.snat).is_ok());
    if !ok {
        count(Stat::DropAdjustRoom, len);
        return Verdict::Done(TC_ACT_SHOT);
    }
    count(Stat::SvcForward, len);
    Verdict::Translated(b.ip)
}

/// A reply from a backend to a client: restore the ClusterIP as its source
/// (and the client as its destination for hairpin flows).
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext, flow: &Flow) -> Option<Verdict> {
    let key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    // SAFETY: plain data, copied out.
    let r: RnatEntry = unsafe { RNAT.get(key) }.copied()?;
    let len = ctx.len();
    let ok = set_addr(ctx, flow, IP_SRC_OFF, flow.saddr, r.vip).is_ok()
        && set_port(ctx, flow, 0, flow.sport, r.vport).is_ok()
        && set_addr(ctx, flow, IP_DST_OFF, flow.daddr, r.client).is_ok()
        && set_port(ctx, flow, 2, flow.dport, r.client_port).is_ok();
    if !ok {
        count(Stat::DropAdjustRoom, len);
        return Some(Verdict::Done(TC_ACT_SHOT));
    }
    count(Stat::SvcReverse, len);
    Some(Verdict::Translated(r.client))
}

/// Reverse NAT for a packet that just came out of the overlay (a reply
/// from a backend on another node). `Err` carries the TC action when the
/// rewrite failed.
#[inline(always)]
pub fn reverse_nat_decapsulated(ctx: &TcContext) -> Result<(), i32> {
    if let Some(crate::l4::L4::Flow(flow)) = crate::l4::parse(ctx.data(), ctx.data_end())
        && let Some(Verdict::Done(action)) = reverse_nat(ctx, &flow)
    {
        return Err(action);
    }
    Ok(())
}

#[inline(always)]
pub fn is_vip(addr: [u8; 4]) -> bool {
    // SAFETY: existence check only.
    unsafe { VIPS.get(VipKey { vip: addr }) }.is_some()
}

/// Picks a backend for a new flow and records it. `Err` is why the flow
/// is rejected.
#[inline(always)]
fn new_flow(flow: &Flow, key: &SvcKey, svc: &SvcInfo, ct_key: &CtKey) -> Result<CtEntry, Stat> {
    // A TCP segment that does not open a connection and has no entry
    // belongs to a flow whose backend went away (its entry was purged):
    // refuse it so the client fails fast instead of hanging.
    if flow.proto == PROTO_TCP && !flow.is_tcp_open() {
        return Err(Stat::SvcRejectNoConntrack);
    }
    if svc.count == 0 {
        return Err(Stat::SvcRejectNoBackend);
    }
    let backend = pick_backend(flow, svc).ok_or(Stat::SvcRejectNoBackend)?;
    // Hairpin: the client is its own backend. Give the flow another source
    // so the pod does not see a packet from itself.
    let snat = if backend.ip == flow.saddr {
        HAIRPIN_SNAT_IP
    } else {
        [0; 4]
    };
    let entry = CtEntry {
        backend,
        snat,
        svc_id: svc.id,
    };
    let reply = reply_key(flow, &backend, snat);
    let rnat = RnatEntry {
        vip: key.vip,
        vport: key.port,
        client_port: flow.sport,
        client: flow.saddr,
    };
    // Reply state first: a fast reply must find it.
    if RNAT.insert(reply, rnat, 0).is_err() || CT.insert(ct_key, entry, 0).is_err() {
        return Err(Stat::SvcRejectNoBackend);
    }
    svc_counters(key, |c| c.new_flows += 1);
    Ok(entry)
}

/// The reverse-NAT key of a flow's replies.
#[inline(always)]
fn reply_key(flow: &Flow, backend: &Backend, snat: [u8; 4]) -> CtKey {
    CtKey {
        saddr: backend.ip,
        daddr: if snat == [0; 4] { flow.saddr } else { snat },
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn is_live(svc_id: u32, backend: &Backend) -> bool {
    // SAFETY: existence check only.
    unsafe {
        LIVE.get(LiveKey {
            svc_id,
            backend: *backend,
        })
    }
    .is_some()
}

#[inline(always)]
fn pick_backend(flow: &Flow, svc: &SvcInfo) -> Option<Backend> {
    let aff_key = AffinityKey {
        svc_id: svc.id,
        client: flow.saddr,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if svc.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: plain data, copied out.
        if let Some(a) = unsafe { AFFINITY.get(aff_key) }.copied()
            && now.wrapping_sub(a.last_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000
            && is_live(svc.id, &a.backend)
        {
            let _ = AFFINITY.insert(
                aff_key,
                AffinityEntry {
                    backend: a.backend,
                    last_ns: now,
                },
                0,
            );
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
        let _ = AFFINITY.insert(
            aff_key,
            AffinityEntry {
                backend: b,
                last_ns: now,
            },
            0,
        );
    }
    Some(b)
}

#[inline(always)]
fn reject(ctx: &TcContext, flow: &Flow, key: &SvcKey, stat: Stat) -> Verdict {
    let len = ctx.len();
    count(stat, len);
    svc_counters(key, |c| c.rejections += 1);
    let r = if flow.proto == PROTO_TCP {
        reject::tcp_reset(ctx, flow)
    } else {
        reject::port_unreachable(ctx, flow)
    };
    match r {
        Ok(action) => Verdict::Done(action),
        Err(()) => {
            count(Stat::DropRejectFailed, len);
            Verdict::Done(TC_ACT_SHOT)
        }
    }
}

#[inline(always)]
fn svc_counters(key: &SvcKey, f: impl FnOnce(&mut SvcCounters)) {
    let ptr = match SVC_STATS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            // The agent creates the entry with the service; this covers a race.
            let _ = SVC_STATS.insert(key, SvcCounters::default(), 0);
            match SVC_STATS.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    f(unsafe { &mut *ptr });
}
