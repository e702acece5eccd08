//! IPv4 fragments of Service flows. kube-proxy reassembles (netfilter's
//! defrag) before NAT; here the first fragment, which carries the ports,
//! is translated as any packet of its flow and leaves its ports in
//! `frags_v1` under (source, destination, protocol, IP ID). The later
//! fragments find them there and follow it: same flow, same backend,
//! addresses rewritten (they carry no L4 header; the first fragment's L4
//! checksum change covers the whole datagram).
//!
//! North-south flows (NodePort, externalIP, LoadBalancer IP) too: their
//! fragments from outside follow the first to the backend
//! (`nodeport::from_underlay`), their replies' fragments leave by the
//! underlay after it.
//!
//! A later fragment that arrives before its first (reordering, or the
//! entry was evicted) cannot be placed: to a ClusterIP it is dropped and
//! counted (`drop_frag_no_first`); a reply fragment cannot be told from
//! other pod traffic and goes on untranslated.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{CtEntry, FragEntry, FragKey, Stat};

use crate::{
    l4::{Flow, Fragment},
    lb::{Verdict, is_vip},
    maps::FRAGS,
    nat::{Addr, set_addr_l3},
    stats::count,
    track,
};

/// Records the ports of a first fragment whose flow was translated. Call
/// with the flow as parsed, before its rewrite.
#[inline(always)]
pub fn remember(ctx: &TcContext, flow: &Flow) {
    let key = FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        _pad: 0,
    };
    let ports = FragEntry {
        sport: flow.sport,
        dport: flow.dport,
    };
    if FRAGS.insert(key, ports, 0).is_err() {
        log_event!(ctx, "frags_v1 insert failed");
    }
}

/// The ports of the first fragment of `f`'s datagram, if it was
/// remembered (a translated first fragment).
#[inline(always)]
pub fn ports_of(f: &Fragment) -> Option<FragEntry> {
    let key = FragKey {
        saddr: f.saddr,
        daddr: f.daddr,
        id: f.ip_id,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: plain data, copied out at once.
    unsafe { FRAGS.get(key) }.copied()
}

/// A fragment other than the first: translated as its first fragment was
/// (reply direction first, as `lb` does), passed when it belongs to no
/// Service flow.
#[inline(always)]
pub fn follow(ctx: &TcContext, f: &Fragment) -> Verdict {
    let key = FragKey {
        saddr: f.saddr,
        daddr: f.daddr,
        id: f.ip_id,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: plain data, copied out at once.
    let Some(ports) = (unsafe { FRAGS.get(key) }).copied() else {
        return unplaced(ctx, f);
    };
    let ct_key = track::key(f.saddr, f.daddr, ports.sport, ports.dport, f.proto);
    let len = ctx.len();
    let (ok, to, stat, north_south) = if let Some(b) = track::reply(&ct_key) {
        let r = b.rnat;
        let ok = set_addr_l3(ctx, Addr::Src, f.saddr, r.vip).is_ok()
            && set_addr_l3(ctx, Addr::Dst, f.daddr, r.client).is_ok();
        let stat = if b.north_south {
            Stat::NpReverse
        } else {
            Stat::SvcReverse
        };
        (ok, r.client, stat, b.north_south)
    } else if let Some(e) = track::forward(&ct_key) {
        (forward(ctx, f, &e), e.backend.ip, Stat::SvcForward, false)
    } else {
        return unplaced(ctx, f);
    };
    if !ok {
        log_event!(ctx, "svc: fragment NAT to {:i} failed", to);
        count(Stat::DropNatFailed, len);
        return Verdict::Done(TC_ACT_SHOT);
    }
    count(stat, len);
    if north_south {
        // A north-south reply leaves by the underlay, as its first did.
        return Verdict::Done(crate::nodeport::to_underlay(ctx, to));
    }
    Verdict::Translated(to)
}

/// A later fragment from outside the cluster (on the underlay, not
/// VXLAN) of a north-south flow's datagram: translated as its first was.
/// `Some(Ok(backend))` translated, `Some(Err(..))` its end (counted),
/// `None`: of no north-south flow (the kernel gets it).
#[inline(always)]
pub fn from_outside(ctx: &TcContext, f: &Fragment) -> Option<Result<[u8; 4], Verdict>> {
    let ports = ports_of(f)?;
    let e = track::forward(&track::key(
        f.saddr,
        f.daddr,
        ports.sport,
        ports.dport,
        f.proto,
    ))?;
    if !track::is_north_south(&e) {
        return None;
    }
    if !forward(ctx, f, &e) {
        log_event!(ctx, "nodeport: fragment NAT to {:i} failed", e.backend.ip);
        count(Stat::DropNatFailed, ctx.len());
        return Some(Err(Verdict::Done(TC_ACT_SHOT)));
    }
    count(Stat::NpForward, ctx.len());
    Some(Ok(e.backend.ip))
}

/// Rewrites a fragment of a flow's forward direction as its entry says:
/// destination the backend, source the SNAT address if any.
#[inline(always)]
fn forward(ctx: &TcContext, f: &Fragment, e: &CtEntry) -> bool {
    set_addr_l3(ctx, Addr::Dst, f.daddr, e.backend.ip).is_ok()
        && (e.snat == [0; 4] || set_addr_l3(ctx, Addr::Src, f.saddr, e.snat).is_ok())
}

/// A later fragment without a known first fragment.
#[inline(always)]
fn unplaced(ctx: &TcContext, f: &Fragment) -> Verdict {
    if is_vip(f.daddr) {
        count(Stat::DropFragNoFirst, ctx.len());
        return Verdict::Done(TC_ACT_SHOT);
    }
    Verdict::Pass
}
