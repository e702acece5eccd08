//! ICMP errors about Service flows, translated as netfilter's
//! `nf_nat_icmp_reply_translation` does, so that a UDP client gets
//! ECONNREFUSED from a ClusterIP and path MTU discovery works through one.
//!
//! An ICMP error quotes the IPv4 header and the first bytes of the packet
//! it is about. For a Service flow that packet was translated, so the
//! quote is in the other address space than the error's receiver expects:
//!
//! - Reply direction: the backend, or a router or node on the way to it,
//!   answers a packet client -> backend:port (destination unreachable,
//!   fragmentation needed, time exceeded). The quote's destination goes
//!   back to ClusterIP:port (and its source to the client for hairpin
//!   flows); the outer source becomes the ClusterIP when it is the backend.
//! - Forward direction: the client answers a reply it got from
//!   ClusterIP:port. The outer destination and the quote's source become
//!   the backend.
//!
//! North-south flows alike: an error from a local or remote backend
//! about a packet from outside goes back out of the underlay to the
//! client; one from outside about a reply goes on to the backend
//! ([`from_outside`]).
//!
//! The quote's IPv4 checksum, its TCP/UDP checksum where the quote holds
//! it, the ICMP checksum and the outer IPv4 checksum are updated
//! incrementally. Every change is paired with the checksum that covers
//! it, so the packet's overall sum (CHECKSUM_COMPLETE) stays right.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{CtKey, PROTO_TCP, PROTO_UDP, Stat};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr};

use crate::{
    consts::{
        ICMP_DEST_UNREACH, ICMP_PARAMETERPROB, ICMP_TIME_EXCEEDED, IP_OFFSET, IPV4_VIHL_NO_OPTIONS,
    },
    csum,
    lb::{Verdict, is_vip},
    parse::{IP_OFF, Ipv4Packet, ptr_at},
    stats::count,
    track,
};

/// IPPROTO_ICMP.
pub const PROTO_ICMP: u8 = 1;

/// What an ICMP error about a TCP/UDP packet starts with, when neither IPv4
/// header has options (the only case translated): outer IPv4, ICMP, the
/// quoted IPv4 header and the first 8 bytes of its TCP/UDP header, all of
/// which RFC 792 requires an error to carry.
#[repr(C)]
struct ErrorHdrs {
    ip: Ipv4Hdr,
    icmp: Icmpv4Hdr,
    inner: Ipv4Hdr,
    sport: [u8; 2],
    dport: [u8; 2],
    /// UDP length and checksum, or the TCP sequence number.
    udp_len: [u8; 2],
    udp_check: [u8; 2],
}

/// Offset of the quoted TCP/UDP header from the start of the frame.
const INNER_L4_OFF: usize = IP_OFF + 2 * Ipv4Hdr::LEN + Icmpv4Hdr::LEN;
/// Offset of the TCP checksum in a TCP header.
const TCP_CHECK_OFF: usize = 16;

/// Is ICMP type `t` an error (it quotes a packet)?
#[inline(always)]
pub fn is_error(t: u8) -> bool {
    t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED || t == ICMP_PARAMETERPROB
}

/// Is the packet (at [`IP_OFF`], parsed as `pkt`) an ICMP error? Read
/// where the ICMP header would be after a header without options; `true`
/// also when it cannot be read or is a later fragment (never answer what
/// might be one).
#[inline(always)]
pub fn may_be_error(data: usize, data_end: usize, pkt: &Ipv4Packet) -> bool {
    if pkt.proto != PROTO_ICMP {
        return false;
    }
    match ptr_at::<u8>(data, data_end, IP_OFF + Ipv4Hdr::LEN) {
        // SAFETY: bounds checked by ptr_at.
        Some(t) => !pkt.no_options || pkt.later_fragment || is_error(unsafe { *t }),
        None => true,
    }
}

/// The addresses and ports one translation writes.
pub struct Rewrite {
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub quote_src: [u8; 4],
    pub quote_sport: [u8; 2],
    pub quote_dst: [u8; 4],
    pub quote_dport: [u8; 2],
}

/// The TCP/UDP packet an ICMP error quotes, as it was sent.
pub struct Quoted {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
}

/// The packet quoted by the ICMP error `pkt`, when it is one this module
/// can translate (no options in either header, the quote a TCP/UDP
/// packet that is not a later fragment, sent by the error's receiver).
#[inline(always)]
pub fn quoted_flow(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Quoted> {
    if pkt.proto != PROTO_ICMP || !pkt.no_options || pkt.later_fragment {
        return None;
    }
    let h = ptr_at::<ErrorHdrs>(ctx.data(), ctx.data_end(), IP_OFF)?;
    // SAFETY: bounds checked by ptr_at; the fields are copied out.
    let (icmp_type, inner_vihl, frags, q) = unsafe {
        let h = &*h;
        (
            h.icmp.type_,
            h.inner.vihl,
            u16::from_be_bytes(h.inner.frags),
            Quoted {
                saddr: h.inner.src_addr,
                daddr: h.inner.dst_addr,
                sport: h.sport,
                dport: h.dport,
                proto: h.inner.proto,
            },
        )
    };
    if !is_error(icmp_type)
        || inner_vihl != IPV4_VIHL_NO_OPTIONS
        || frags & IP_OFFSET != 0
        || (q.proto != PROTO_TCP && q.proto != PROTO_UDP)
        || pkt.daddr != q.saddr
    {
        return None;
    }
    Some(q)
}

/// An ICMP error leaving a pod. `None` when it is not one about a tracked
/// Service flow (it is then handled as any other packet).
#[inline(always)]
pub fn from_pod(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Verdict> {
    translate(ctx, pkt, true)
}

/// An ICMP error that came out of the overlay for a pod of this node:
/// only the reply direction applies (the client is here).
#[inline(always)]
pub fn decapsulated(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Verdict> {
    translate(ctx, pkt, false)
}

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Ipv4Packet, from_client: bool) -> Option<Verdict> {
    // The error goes to whoever sent the quoted packet.
    let q = quoted_flow(ctx, pkt)?;
    let (proto, q_src, q_dst, q_sport, q_dport) = (q.proto, q.saddr, q.daddr, q.sport, q.dport);
    // The quoted packet's flow, seen from the other end: the reply key of
    // a client's packet, the forward key of a backend's reply.
    let key: CtKey = track::key(q_dst, q_src, q_dport, q_sport, proto);
    let (rw, to, stat) = if from_client && is_vip(pkt.daddr) {
        // The client answers a reply from ClusterIP:port.
        let e = track::forward(&key)?;
        let client = if e.snat == [0; 4] { q_dst } else { e.snat };
        let rw = Rewrite {
            outer_src: if pkt.saddr == q_dst {
                client
            } else {
                pkt.saddr
            },
            outer_dst: e.backend.ip,
            quote_src: e.backend.ip,
            quote_sport: e.backend.port,
            quote_dst: client,
            quote_dport: q_dport,
        };
        (rw, e.backend.ip, Stat::SvcIcmpForward)
    } else {
        // The backend or the path answers a packet client -> backend.
        let b = track::reply(&key)?;
        let r = b.rnat;
        let rw = Rewrite {
            outer_src: if pkt.saddr == q_dst { r.vip } else { pkt.saddr },
            outer_dst: r.client,
            quote_src: r.client,
            quote_sport: r.client_port,
            quote_dst: r.vip,
            quote_dport: r.vport,
        };
        if b.north_south {
            // To a client outside: it leaves by the underlay.
            return Some(match translated(ctx, &rw, r.client, Stat::NpIcmpReverse) {
                Ok(to) => Verdict::Done(crate::nodeport::to_underlay(ctx, to)),
                Err(v) => v,
            });
        }
        (rw, r.client, Stat::SvcIcmpReverse)
    };
    Some(match translated(ctx, &rw, to, stat) {
        Ok(to) => Verdict::Translated(to),
        Err(v) => v,
    })
}

/// Writes `rw` into the error, counted as `stat`: `Ok(to)`, or the
/// packet's end when the rewrite failed (counted).
#[inline(always)]
fn translated(ctx: &TcContext, rw: &Rewrite, to: [u8; 4], stat: Stat) -> Result<[u8; 4], Verdict> {
    if rewrite(ctx, rw).is_err() {
        log_event!(ctx, "svc: ICMP error translation to {:i} failed", to);
        count(Stat::DropNatFailed, ctx.len());
        return Err(Verdict::Done(TC_ACT_SHOT));
    }
    count(stat, ctx.len());
    Ok(to)
}

/// An ICMP error from outside the cluster (arriving on the underlay)
/// about a reply of a north-south flow, frontend -> client: the path to
/// the client says the reply was too big, or the client refuses it. The
/// error goes on to the backend, as the reply came from it: `Some(to)`
/// (the backend, after the rewrite), the packet's end when the rewrite
/// failed, `None` when it is about no north-south flow.
#[inline(always)]
pub fn from_outside(ctx: &TcContext, pkt: &Ipv4Packet) -> Option<Result<[u8; 4], Verdict>> {
    let q = quoted_flow(ctx, pkt)?;
    // The quoted reply, seen as the client's packet: the forward key.
    let key = track::key(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    let e = track::forward(&key)?;
    if !track::is_north_south(&e) {
        return None;
    }
    // What the backend sent its reply to: the SNAT address and port
    // (ETP Cluster), else the client.
    let (to_addr, to_port) = if e.snat == [0; 4] {
        (q.daddr, q.dport)
    } else if e.snat_port == [0; 2] {
        (e.snat, q.dport)
    } else {
        (e.snat, e.snat_port)
    };
    let rw = Rewrite {
        // From the SNAT address when there is one: a remote backend's
        // node only accepts what the overlay carries from this node's
        // subnet; else from whoever sent it (the client or its path).
        outer_src: if e.snat == [0; 4] { pkt.saddr } else { e.snat },
        outer_dst: e.backend.ip,
        quote_src: e.backend.ip,
        quote_sport: e.backend.port,
        quote_dst: to_addr,
        quote_dport: to_port,
    };
    Some(translated(ctx, &rw, e.backend.ip, Stat::NpIcmpForward))
}

/// Writes `rw` into the error and fixes the four checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, rw: &Rewrite) -> Result<(), ()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let h = ptr_at::<ErrorHdrs>(data, data_end, IP_OFF).ok_or(())?;
    // The TCP checksum lies beyond the 8 bytes every error quotes; Linux
    // quotes more, so it is usually there.
    let tcp_check = ptr_at::<[u8; 2]>(data, data_end, INNER_L4_OFF + TCP_CHECK_OFF);
    // SAFETY: bounds checked by ptr_at; the frame is ours to write (TC
    // unclones the skb for direct writes).
    let h = unsafe { &mut *h };

    // The quote: addresses (its IPv4 checksum and its L4 pseudo-header),
    // then ports (its L4 checksum).
    let d_addr = csum::diff4(
        csum::diff4(0, h.inner.src_addr, rw.quote_src),
        h.inner.dst_addr,
        rw.quote_dst,
    );
    let d_port = csum::diff2(
        csum::diff2(0, h.sport, rw.quote_sport),
        h.dport,
        rw.quote_dport,
    );
    let inner_check = csum::apply(h.inner.check, d_addr);
    let mut d_icmp = csum::diff2(d_addr + d_port, h.inner.check, inner_check);
    h.inner.check = inner_check;
    h.inner.src_addr = rw.quote_src;
    h.inner.dst_addr = rw.quote_dst;
    h.sport = rw.quote_sport;
    h.dport = rw.quote_dport;
    if h.inner.proto == PROTO_UDP {
        // Zero means "no checksum" and stays so.
        if h.udp_check != [0; 2] {
            let mut c = csum::apply(h.udp_check, d_addr + d_port);
            if c == [0; 2] {
                c = [0xff; 2];
            }
            d_icmp = csum::diff2(d_icmp, h.udp_check, c);
            h.udp_check = c;
        }
    } else if let Some(p) = tcp_check {
        // SAFETY: bounds checked by ptr_at.
        let p = unsafe { &mut *p };
        let c = csum::apply(*p, d_addr + d_port);
        d_icmp = csum::diff2(d_icmp, *p, c);
        *p = c;
    }
    h.icmp.check = csum::apply(h.icmp.check, d_icmp);

    // The outer header (ICMP has no pseudo-header).
    let d_outer = csum::diff4(
        csum::diff4(0, h.ip.src_addr, rw.outer_src),
        h.ip.dst_addr,
        rw.outer_dst,
    );
    h.ip.check = csum::apply(h.ip.check, d_outer);
    h.ip.src_addr = rw.outer_src;
    h.ip.dst_addr = rw.outer_dst;
    Ok(())
}
