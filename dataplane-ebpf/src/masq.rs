//! Masquerade (source NAT to the node's PublicIP) of pod traffic leaving
//! the cluster network, in place of flannel's `--ip-masq` iptables rules;
//! the rules and keys are `dataplane_common::masq`.
//!
//! Out (`to_underlay`, TC egress of the underlay, after the kernel routed
//! the pod's packet and netfilter saw it as the pod sent it): a packet
//! from this node's pod subnet to neither the cluster network nor
//! multicast follows its flow's `MASQ` entry, or, if it starts a new
//! flow, gets one: a NAT port from `--nat-ports` whose reverse key is
//! free, or else held by a closed or expired flow (`natport`: `BPF_NOEXIST`
//! inserts into `MASQ_REV` from a random port on, `natport::MASQ_TRIES`;
//! none is `drop_masq_exhausted`). Without
//! `--ip-masq` only Service flows to backends outside the cluster network
//! are masqueraded (the packet is the forward direction of a live Service
//! flow, `lb::is_service_flow`), so that the backend's reply comes back
//! to this node whatever its routes.
//!
//! What starts a flow: a TCP SYN, any UDP datagram, an ICMP echo request.
//! A TCP segment without a mapping that is no SYN is passed as it is
//! (`pass_masq_not_new`): it belongs to a connection from outside (a pod
//! answering a client that reached it directly) or one whose mapping is
//! gone, and a new source address would only break it.
//!
//! In (from_underlay, what is not VXLAN): a packet to the PublicIP on a
//! NAT port whose `MASQ_REV` entry names a live flow that points back is
//! rewritten to the pod and its port and passed to the kernel, which
//! routes it to the pod as the reply of the flow it saw leave (TTL,
//! neighbour resolution, netfilter state all as without masquerade). A
//! Service reply among them is translated back to the ClusterIP by
//! `to_pod` on its way into the pod. ICMP errors about a masqueraded flow
//! (port unreachable, fragmentation needed) are translated back too.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_get_prandom_u32,
    programs::TcContext,
};
use dataplane_common::{
    CtKey, NODE_CFG_IP_MASQ, NodeConfig, PROTO_TCP, PROTO_UDP, Stat,
    ct::{self as rules, CtState, CtTimeouts, Dir, Observe, TcpNew},
    masq::{self as m, MASQ_F_INBOUND, MASQ_F_OWN, MASQ_F_SERVICE, MasqEntry, MasqRev, PROTO_ICMP},
};
use network_types::ip::Ipv4Hdr;

use crate::{
    consts::{BPF_NOEXIST, E2BIG, EEXIST},
    ct, frag, icmp,
    l4::{Flow, Fragment, L4},
    lb,
    maps::{CT_CONFIG, MASQ, MASQ_REV},
    nat::{Addr, Port, set_addr, set_addr_l3, set_port},
    natport::{self, NoPort},
    parse::{self, IP_OFF, Ipv4Packet, ptr_at},
    stats::count,
};

/// ICMP echo reply and request types.
const ICMP_ECHOREPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
/// Offsets in an ICMP header: checksum, echo identifier.
const ICMP_CSUM_OFF: usize = 2;
const ICMP_ID_OFF: usize = 4;

/// What a masquerade translates: the tuple as the packet carries it and
/// where its L4 header is.
#[derive(Clone, Copy)]
enum Packet {
    /// TCP or UDP.
    Flow(Flow),
    /// ICMP echo request (out) or reply (in): the identifier plays the
    /// pod's port.
    Echo {
        saddr: [u8; 4],
        daddr: [u8; 4],
        id: [u8; 2],
        l4_off: usize,
    },
}

impl Packet {
    /// The conntrack key of the packet as it is (see `masq` keys: an echo
    /// request is pod:id -> dst:0, a reply dst:0 -> node:id).
    #[inline(always)]
    fn key(&self, outbound: bool) -> CtKey {
        match self {
            Packet::Flow(f) => ct::key(f.saddr, f.daddr, f.sport, f.dport, f.proto),
            Packet::Echo {
                saddr, daddr, id, ..
            } => {
                let (sport, dport) = if outbound {
                    (*id, [0; 2])
                } else {
                    ([0; 2], *id)
                };
                ct::key(*saddr, *daddr, sport, dport, PROTO_ICMP)
            }
        }
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        match self {
            Packet::Flow(f) => f.proto,
            Packet::Echo { .. } => PROTO_ICMP,
        }
    }

    #[inline(always)]
    fn tcp_flags(&self) -> u8 {
        match self {
            Packet::Flow(f) => f.tcp_flags,
            Packet::Echo { .. } => 0,
        }
    }
}

/// The ICMP echo of this type in `pkt`, if it is one (no IPv4 options, not
/// a fragment).
#[inline(always)]
fn echo(ctx: &TcContext, pkt: &Ipv4Packet, want_type: u8) -> Option<Packet> {
    if pkt.proto != PROTO_ICMP || !pkt.no_options || pkt.later_fragment {
        return None;
    }
    let l4_off = IP_OFF + Ipv4Hdr::LEN;
    let h = ptr_at::<[u8; 8]>(ctx.data(), ctx.data_end(), l4_off)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *h };
    if h[0] != want_type || h[1] != 0 {
        return None;
    }
    Some(Packet::Echo {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: [h[ICMP_ID_OFF], h[ICMP_ID_OFF + 1]],
        l4_off,
    })
}

#[inline(always)]
fn timeouts() -> CtTimeouts {
    CT_CONFIG.get(0).copied().unwrap_or(CtTimeouts::DEFAULT)
}

/// TC egress of the underlay: masquerades what leaves the cluster network
/// from this node's pods. Returns the TC action.
#[inline(always)]
pub fn to_underlay(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let Some(pkt) = parse::ipv4(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    if !m::wanted(
        pkt.saddr,
        pkt.daddr,
        cfg.subnet,
        cfg.subnet_prefix_len,
        cfg.network,
        cfg.network_prefix_len,
    ) {
        return TC_ACT_OK;
    }
    let p = match pkt.l4 {
        L4::Flow(f) => Packet::Flow(f),
        L4::Fragment(f) => return later_fragment(ctx, &f, true).unwrap_or(TC_ACT_OK),
        _ => match echo(ctx, &pkt, ICMP_ECHO) {
            Some(p) => p,
            None => return TC_ACT_OK,
        },
    };
    let key = p.key(true);
    let now = ct::now();
    let entry = match tracked(&key, &p, now) {
        Some(e) => e,
        None => match new_flow(ctx, cfg, &key, &p, now) {
            Ok(e) => e,
            Err(action) => return action,
        },
    };
    if entry.flags & MASQ_F_INBOUND != 0 {
        // A pod's answer to a client outside: it leaves as it is.
        return TC_ACT_OK;
    }
    if let Packet::Flow(f) = &p
        && f.first_fragment
    {
        frag::remember(ctx, f);
    }
    if rewrite(ctx, &p, true, entry.nat_addr, entry.nat_port).is_err() {
        log_event!(ctx, "masq: SNAT of {:i} failed", pkt.saddr);
        count(Stat::DropNatFailed, ctx.len());
        return TC_ACT_SHOT;
    }
    count(Stat::MasqForward, ctx.len());
    TC_ACT_OK
}

/// A fragment other than the first of a masqueraded datagram: no ports in
/// it, so its first fragment's (remembered in `frags_v1` as it was
/// translated) find the flow, and only its address is rewritten (the
/// first fragment's L4 checksum change covers the whole datagram). `None`
/// for one of no masqueraded flow (it passes as it is).
#[inline(always)]
fn later_fragment(ctx: &TcContext, f: &Fragment, outbound: bool) -> Option<i32> {
    let ports = frag::ports_of(f)?;
    let key = ct::key(f.saddr, f.daddr, ports.sport, ports.dport, f.proto);
    let (ok, stat) = if outbound {
        let e = MASQ.get_ptr_mut(key)?;
        // SAFETY: a map value pointer, valid for this program run.
        let v = unsafe { *e };
        if v.flags & MASQ_F_INBOUND != 0
            || rules::is_expired(v.state, v.last_seen_ns, ct::now(), &timeouts())
        {
            return None;
        }
        let ok = set_addr_l3(ctx, Addr::Src, f.saddr, v.nat_addr).is_ok();
        (ok, Stat::MasqForward)
    } else {
        let (_, r, _) = live_reply(&key)?;
        let ok = set_addr_l3(ctx, Addr::Dst, f.daddr, r.pod).is_ok();
        (ok, Stat::MasqReverse)
    };
    if !ok {
        return Some(drop(ctx, Stat::DropNatFailed));
    }
    count(stat, ctx.len());
    Some(TC_ACT_OK)
}

/// The live mapping of this flow, if it has one it may keep using (an
/// expired one, or one a SYN reopens, is removed here).
#[inline(always)]
fn tracked(key: &CtKey, p: &Packet, now: u64) -> Option<MasqEntry> {
    let e = MASQ.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for this program run.
    let v = unsafe { *e };
    let rk = m::reply_key(key, v.nat_addr, v.nat_port);
    if rules::is_expired(v.state, v.last_seen_ns, now, &timeouts()) {
        forget(key, &rk);
        return None;
    }
    // The pod's packets of an inbound flow are its replies.
    let dir = if v.flags & MASQ_F_INBOUND != 0 {
        Dir::Reply
    } else {
        Dir::Orig
    };
    if observe(e, p.proto(), dir, p.tcp_flags(), now) {
        Some(v)
    } else {
        forget(key, &rk);
        None
    }
}

/// Applies a packet to a live entry (the Service conntrack's rules);
/// `false` when a SYN reopens a closed flow.
#[inline(always)]
fn observe(entry: *mut MasqEntry, proto: u8, dir: Dir, tcp: u8, now: u64) -> bool {
    // SAFETY: a map value pointer, valid for this program run; written
    // racily with other CPUs as `ct::observe` explains.
    let e = unsafe { &mut *entry };
    let Some(state) = CtState::from_u8(e.state) else {
        return false;
    };
    // Only the CT_F_* bits are the state machine's; MASQ_F_OWN stay.
    let own = e.flags & MASQ_F_OWN;
    match rules::observe(
        state,
        e.flags & !MASQ_F_OWN,
        e.last_seen_ns,
        proto,
        dir,
        tcp,
        now,
    ) {
        Observe::Keep => true,
        Observe::Write {
            state,
            flags,
            last_seen_ns,
        } => {
            e.state = state as u8;
            e.flags = flags | own;
            e.last_seen_ns = last_seen_ns;
            true
        }
        Observe::Reopen => false,
    }
}

/// Frees the reverse key `rk` (remote end -> node:NAT port) if the flow
/// holding it no longer needs it (see `natport`): its forward entry is
/// gone or maps elsewhere (an orphan), or it is closed or expired.
/// Whether the key is free now.
#[inline(always)]
fn reclaim(rk: &CtKey, now: u64) -> bool {
    // SAFETY: plain data, copied out.
    let Some(r) = (unsafe { MASQ_REV.get(rk) }).copied() else {
        return true;
    };
    let fwd = m::forward_key(rk, &r);
    let holder = MASQ.get_ptr(fwd).map(|e| {
        // SAFETY: a map value pointer, valid for this program run.
        let v = unsafe { *e };
        let ours =
            v.flags & MASQ_F_INBOUND == 0 && m::reply_key(&fwd, v.nat_addr, v.nat_port) == *rk;
        (ours, v)
    });
    match holder {
        Some((true, v)) => {
            if !rules::releases_port(v.state, v.last_seen_ns, now, &timeouts()) {
                return false;
            }
            forget(&fwd, rk);
        }
        // Gone, or the forward key now holds another mapping.
        _ => {
            let _ = MASQ_REV.remove(rk);
        }
    }
    true
}

/// Removes a flow: both entries.
#[inline(always)]
fn forget(fwd: &CtKey, rev: &CtKey) {
    let _ = MASQ.remove(fwd);
    let _ = MASQ_REV.remove(rev);
}

/// A packet without a live mapping: a new flow gets one (port allocated)
/// when it is to be masqueraded and may start a flow. `Err` is the TC
/// action for the packet (passed as it is, or dropped and counted).
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    cfg: &NodeConfig,
    key: &CtKey,
    p: &Packet,
    now: u64,
) -> Result<MasqEntry, i32> {
    let service = match p {
        Packet::Flow(f) => lb::is_service_flow(f),
        Packet::Echo { .. } => false,
    };
    if cfg.flags & NODE_CFG_IP_MASQ == 0 && !service {
        // flannel without --ip-masq: the pod's address goes out as it is.
        return Err(TC_ACT_OK);
    }
    let state = if p.proto() == PROTO_TCP {
        if !matches!(rules::tcp_new(p.tcp_flags()), TcpNew::Open) {
            count(Stat::PassMasqNotNew, ctx.len());
            return Err(TC_ACT_OK);
        }
        CtState::SynSent
    } else {
        CtState::UdpUnreplied
    };
    let rev = MasqRev {
        pod: key.saddr,
        pod_port: key.sport,
        _pad: [0; 2],
    };
    let (min, max) = cfg.nat_ports();
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    let rk = |port| m::reply_key(key, cfg.public_ip, port);
    let port = match natport::allocate(
        min,
        max,
        start,
        natport::MASQ_TRIES,
        |port| MASQ_REV.insert(rk(port), rev, BPF_NOEXIST),
        |port| reclaim(&rk(port), now),
    ) {
        Ok(port) => port,
        Err(NoPort::Exhausted) => return Err(drop(ctx, Stat::DropMasqExhausted)),
        Err(NoPort::Full) => return Err(drop(ctx, Stat::DropMasqFull)),
        Err(NoPort::Failed(e)) => {
            log_event!(ctx, "masq: masq_rev_v1 insert failed ({})", e);
            return Err(drop(ctx, Stat::DropNatFailed));
        }
    };
    let entry = MasqEntry {
        nat_addr: cfg.public_ip,
        nat_port: port,
        state: state as u8,
        flags: if service { MASQ_F_SERVICE } else { 0 },
        created_ns: now,
        last_seen_ns: now,
    };
    let rk = m::reply_key(key, cfg.public_ip, port);
    match MASQ.insert(key, entry, BPF_NOEXIST) {
        Ok(()) => Ok(entry),
        Err(e) => {
            let _ = MASQ_REV.remove(rk);
            // Another CPU mapped this flow first: use its mapping.
            if e == -EEXIST
                && let Some(other) = MASQ.get_ptr_mut(key)
            {
                // SAFETY: a map value pointer, valid for this program run.
                return Ok(unsafe { *other });
            }
            Err(drop(
                ctx,
                if e == -E2BIG {
                    Stat::DropMasqFull
                } else {
                    Stat::DropNatFailed
                },
            ))
        }
    }
}

#[inline(always)]
fn drop(ctx: &TcContext, stat: Stat) -> i32 {
    count(stat, ctx.len());
    TC_ACT_SHOT
}

/// Rewrites the pod end of the packet: its source going out
/// (`outbound`), its destination coming back.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    outbound: bool,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), ()> {
    let (a, pt) = if outbound {
        (Addr::Src, Port::Src)
    } else {
        (Addr::Dst, Port::Dst)
    };
    match p {
        Packet::Flow(f) => {
            let (old_addr, old_port) = if outbound {
                (f.saddr, f.sport)
            } else {
                (f.daddr, f.dport)
            };
            set_addr(ctx, f, a, old_addr, addr)?;
            set_port(ctx, f, pt, old_port, port)
        }
        Packet::Echo {
            saddr,
            daddr,
            id,
            l4_off,
        } => {
            // ICMP has no pseudo-header: the address is the IPv4
            // header's alone, the identifier the ICMP checksum's.
            set_addr_l3(ctx, a, if outbound { *saddr } else { *daddr }, addr)?;
            if *id != port {
                ctx.l4_csum_replace(
                    l4_off + ICMP_CSUM_OFF,
                    u64::from(u16::from_ne_bytes(*id)),
                    u64::from(u16::from_ne_bytes(port)),
                    2,
                )
                .map_err(|_| ())?;
                ctx.store(l4_off + ICMP_ID_OFF, &port, 0).map_err(|_| ())?;
            }
            Ok(())
        }
    }
}

/// A packet on the underlay that is not VXLAN: the reply of a masqueraded
/// flow (or an ICMP error about one) is translated back to the pod and
/// handed to the kernel (`Some(action)`); `None` for anything else.
#[inline(always)]
pub fn from_underlay(ctx: &TcContext, cfg: &NodeConfig) -> Option<i32> {
    let pkt = parse::ipv4(ctx.data(), ctx.data_end())?;
    if pkt.daddr != cfg.public_ip {
        inbound(cfg, &pkt);
        return None;
    }
    let p = match pkt.l4 {
        L4::Flow(f) => {
            // Cheap test first: the node's own traffic is on other ports.
            let (min, max) = cfg.nat_ports();
            let port = u16::from_be_bytes(f.dport);
            if port < min || port > max {
                return None;
            }
            Packet::Flow(f)
        }
        L4::Fragment(f) => return later_fragment(ctx, &f, false),
        _ => match echo(ctx, &pkt, ICMP_ECHOREPLY) {
            Some(p) => p,
            None => return icmp_error(ctx, &pkt),
        },
    };
    let rk = p.key(false);
    let (fwd, r, e) = live_reply(&rk)?;
    let _ = observe(e, p.proto(), Dir::Reply, p.tcp_flags(), ct::now());
    if let Packet::Flow(f) = &p
        && f.first_fragment
    {
        frag::remember(ctx, f);
    }
    if rewrite(ctx, &p, false, r.pod, r.pod_port).is_err() {
        log_event!(ctx, "masq: reverse NAT to {:i} failed", fwd.saddr);
        return Some(drop(ctx, Stat::DropNatFailed));
    }
    count(Stat::MasqReverse, ctx.len());
    Some(TC_ACT_OK)
}

/// A UDP datagram from outside the cluster network straight to a pod of
/// this node (a route to the pod network), with `--ip-masq`: its flow is
/// recorded (`MASQ_F_INBOUND`) so that the pod's answers, which cannot be
/// told from a new flow by themselves, leave as replies, unmasqueraded.
/// (TCP needs no record: only a SYN opens a masqueraded flow.)
#[inline(always)]
fn inbound(cfg: &NodeConfig, pkt: &Ipv4Packet) {
    let L4::Flow(f) = pkt.l4 else {
        return;
    };
    if f.proto != PROTO_UDP
        || cfg.flags & NODE_CFG_IP_MASQ == 0
        || !m::wanted(
            pkt.daddr,
            pkt.saddr,
            cfg.subnet,
            cfg.subnet_prefix_len,
            cfg.network,
            cfg.network_prefix_len,
        )
    {
        return;
    }
    // The key of the pod's answers.
    let key = ct::key(f.daddr, f.saddr, f.dport, f.sport, f.proto);
    let now = ct::now();
    if let Some(e) = MASQ.get_ptr_mut(key) {
        // SAFETY: a map value pointer, valid for this program run.
        let v = unsafe { *e };
        if v.flags & MASQ_F_INBOUND != 0
            && !rules::is_expired(v.state, v.last_seen_ns, now, &timeouts())
        {
            let _ = observe(e, f.proto, Dir::Orig, 0, now);
            return;
        }
        if !rules::is_expired(v.state, v.last_seen_ns, now, &timeouts()) {
            // A live masqueraded flow of the pod with this tuple keeps it.
            return;
        }
        forget(&key, &m::reply_key(&key, v.nat_addr, v.nat_port));
    }
    let entry = MasqEntry {
        nat_addr: f.daddr,
        nat_port: f.dport,
        state: CtState::UdpUnreplied as u8,
        flags: MASQ_F_INBOUND,
        created_ns: now,
        last_seen_ns: now,
    };
    // Full table: the answers are masqueraded, as before this record.
    let _ = MASQ.insert(key, entry, BPF_NOEXIST);
}

/// The flow a reply (`rk`, as it arrives) belongs to, provided its forward
/// entry is live and maps to exactly this address and port.
#[inline(always)]
fn live_reply(rk: &CtKey) -> Option<(CtKey, MasqRev, *mut MasqEntry)> {
    // SAFETY: plain data, copied out.
    let r = unsafe { MASQ_REV.get(rk) }.copied()?;
    let fwd = m::forward_key(rk, &r);
    let e = MASQ.get_ptr_mut(fwd)?;
    // SAFETY: a map value pointer, valid for this program run.
    let v = unsafe { *e };
    if rules::is_expired(v.state, v.last_seen_ns, ct::now(), &timeouts())
        || v.nat_addr != rk.daddr
        || v.nat_port != rk.dport
    {
        return None;
    }
    Some((fwd, r, e))
}

/// An ICMP error to the PublicIP about a packet a masqueraded flow sent
/// (its quote: node:NAT port -> outside): the quote gets the pod's
/// address and port back, the outer destination the pod.
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<i32> {
    let q = icmp::quoted_flow(ctx, pkt)?;
    // The quote is a packet the node sent: node -> outside. Its reply
    // direction is the reverse key.
    let rk = ct::key(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    let (_, r, _) = live_reply(&rk)?;
    let rw = icmp::Rewrite {
        outer_src: pkt.saddr,
        outer_dst: r.pod,
        quote_src: r.pod,
        quote_sport: r.pod_port,
        quote_dst: q.daddr,
        quote_dport: q.dport,
    };
    if icmp::rewrite(ctx, &rw).is_err() {
        return Some(drop(ctx, Stat::DropNatFailed));
    }
    count(Stat::MasqIcmpReverse, ctx.len());
    Some(TC_ACT_OK)
}
