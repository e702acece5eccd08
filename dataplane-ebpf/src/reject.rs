//! Rejecting a connection to a Service, from the ClusterIP back to the
//! client: a TCP RST for TCP (connect() fails at once with ECONNREFUSED,
//! and an established flow whose backend vanished is reset, which an ICMP
//! error would not do), an ICMP port unreachable for UDP (kube-proxy's
//! REJECT). Nobody waits for a timeout.
//!
//! Also the ICMP time exceeded a node sends when a packet's TTL runs out
//! on its way through (see `ttl`).

use aya_ebpf::{
    bindings::{
        TC_ACT_REDIRECT,
        bpf_adj_room_mode::{BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_NET},
    },
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{
    bitfield::BitfieldU16,
    eth::EthHdr,
    icmp::Icmpv4Hdr,
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
};

use crate::{
    consts::{
        ICMP_DEST_UNREACH, ICMP_EXC_TTL, ICMP_PORT_UNREACH, ICMP_TIME_EXCEEDED, IP_DEFAULT_TTL,
        IP_DF, IPTOS_PREC_INTERNETCONTROL, IPV4_VIHL_NO_OPTIONS, TCP_ACK, TCP_DOFF_NO_OPTIONS,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
    csum,
    l4::Flow,
    parse::{IP_OFF, ptr_at},
};

/// What an ICMP error quotes of the offending packet: its IPv4 header and
/// the first 8 bytes after it (RFC 792).
const QUOTED: usize = Ipv4Hdr::LEN + 8;
/// The ICMP message: header and quote.
const ICMP_LEN: usize = Icmpv4Hdr::LEN + QUOTED;
/// Put in front of the quote: the new IPv4 header and the ICMP header.
const ADDED: usize = Ipv4Hdr::LEN + Icmpv4Hdr::LEN;
/// Where the L4 header of a packet without IPv4 options starts.
const L4_OFF: usize = IP_OFF + Ipv4Hdr::LEN;

/// An IPv4 header from `src` to `dst` of a packet the programs originate.
#[inline(always)]
fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: IpProto,
    tos: u8,
    frags: u16,
    payload: usize,
) -> Ipv4Hdr {
    let mut h = Ipv4Hdr {
        vihl: IPV4_VIHL_NO_OPTIONS,
        tos,
        tot_len: ((Ipv4Hdr::LEN + payload) as u16).to_be_bytes(),
        id: [0; 2],
        frags: frags.to_be_bytes(),
        ttl: IP_DEFAULT_TTL,
        proto: proto as u8,
        check: [0; 2],
        src_addr: src,
        dst_addr: dst,
    };
    h.check = csum::ipv4_header(&h);
    h
}

/// Turns the packet into an ICMP port unreachable for its sender and sends
/// it back out of the interface it came in on (towards the pod).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    if flow.l4_off != L4_OFF {
        return Err(()); // IPv4 options: not worth quoting; caller drops.
    }
    // SAFETY: reading our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    icmp_error(
        ctx,
        flow.daddr,
        flow.saddr,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
    )?;
    redirect_back(ifindex)
}

/// Turns the packet (IPv4 without options, at least 28 bytes) into the
/// ICMP time exceeded in transit that `from` sends its sender. The caller
/// sends it on.
#[inline(always)]
pub fn time_exceeded(ctx: &TcContext, from: [u8; 4]) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), IP_OFF).ok_or(())?;
    // SAFETY: bounds checked.
    let (vihl, sender) = unsafe { ((*ip).vihl, (*ip).src_addr) };
    if vihl != IPV4_VIHL_NO_OPTIONS || ctx.len() < (EthHdr::LEN + QUOTED) as u32 {
        return Err(());
    }
    icmp_error(ctx, from, sender, ICMP_TIME_EXCEEDED, ICMP_EXC_TTL)
}

/// Turns the packet (IPv4 without options) into an ICMP error `from` ->
/// `to` of this type and code quoting its IPv4 header and 8 bytes, with
/// the Ethernet addresses swapped.
#[inline(always)]
fn icmp_error(ctx: &TcContext, from: [u8; 4], to: [u8; 4], type_: u8, code: u8) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0).ok_or(())?;
    // SAFETY: bounds checked.
    let (their_mac, our_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    trim_to_quote(ctx)?;
    ctx.adjust_room(ADDED as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;

    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF).ok_or(())?;
    let icmp = ptr_at::<Icmpv4Hdr>(data, data_end, L4_OFF).ok_or(())?;
    let message = ptr_at::<[u8; ICMP_LEN]>(data, data_end, L4_OFF).ok_or(())?;
    let ip_hdr = ipv4_header(
        from,
        to,
        IpProto::Icmp,
        IPTOS_PREC_INTERNETCONTROL,
        0,
        ICMP_LEN,
    );
    // SAFETY: all bounds-checked above; `message` is `icmp` and the quote.
    unsafe {
        (*eth).dst_addr = their_mac;
        (*eth).src_addr = our_mac;
        *ip = ip_hdr;
        *icmp = Icmpv4Hdr {
            type_,
            code,
            check: [0; 2],
            data: [0; 4],
        };
        (*icmp).check = csum::finish(csum::add(0, &*message));
    }
    Ok(())
}

/// Cuts the frame down to the Ethernet header and the quote.
#[inline(always)]
fn trim_to_quote(ctx: &TcContext) -> Result<(), ()> {
    // SAFETY: helper on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (EthHdr::LEN + QUOTED) as u32, 0) } == 0 {
        return Ok(());
    }
    // bpf_skb_change_tail refuses an skb the kernel still marks as
    // encapsulated, which a just decapsulated packet is (see
    // `forward::redirect_to_pod`). Remove what follows the 8 quoted bytes
    // from between the IPv4 and L4 headers instead, then put those 8 bytes
    // back. Not for GSO packets, whose segment size would be left over.
    // SAFETY: reading a context field.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return Err(());
    }
    let extra = ctx
        .len()
        .checked_sub((EthHdr::LEN + QUOTED) as u32)
        .ok_or(())?;
    if extra == 0 {
        return Ok(());
    }
    let l4_head: [u8; 8] = ctx.load(L4_OFF).map_err(|_| ())?;
    ctx.adjust_room(-(extra as i32), BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| ())?;
    ctx.store(L4_OFF, &l4_head, 0).map_err(|_| ())
}

/// Turns a TCP segment into the RST its sender expects from the ClusterIP
/// and sends it back out of the interface it came in on.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    if flow.l4_off != L4_OFF {
        return Err(());
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF).ok_or(())?;
    let tcp = ptr_at::<TcpHdr>(data, data_end, L4_OFF).ok_or(())?;
    // SAFETY: bounds checked above.
    let (client_mac, our_mac, ip, tcp) = unsafe { ((*eth).src_addr, (*eth).dst_addr, *ip, *tcp) };
    let seg_len = u32::from(ip.tot_len()).saturating_sub(Ipv4Hdr::LEN as u32);
    let payload = seg_len.saturating_sub(u32::from(tcp.doff()) * 4);
    let flags = flow.tcp_flags;
    // RFC 793 reset generation: take the ACK's number as our sequence if
    // there is one, else acknowledge what the segment occupied.
    let (r_seq, r_ack, r_flags) = if flags & TCP_ACK != 0 {
        (u32::from_be_bytes(tcp.ack_seq), 0, TCP_RST)
    } else {
        let occupied = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        let seq = u32::from_be_bytes(tcp.seq);
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    // SAFETY: helpers on our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, L4_OFF as u32 + TcpHdr::LEN as u32, 0) } != 0 {
        return Err(());
    }
    let mut rst = TcpHdr {
        source: flow.dport,
        dest: flow.sport,
        seq: r_seq.to_be_bytes(),
        ack_seq: r_ack.to_be_bytes(),
        _bitfield_align_1: [],
        _bitfield_1: BitfieldU16::new([TCP_DOFF_NO_OPTIONS, r_flags]),
        window: [0; 2],
        check: [0; 2],
        urg_ptr: [0; 2],
    };
    let pseudo = csum::pseudo_header(
        flow.daddr,
        flow.saddr,
        IpProto::Tcp as u8,
        TcpHdr::LEN as u16,
    );
    rst.check = csum::finish(csum::add(pseudo, &rst));
    let ip_hdr = ipv4_header(flow.daddr, flow.saddr, IpProto::Tcp, 0, IP_DF, TcpHdr::LEN);

    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip_p = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF).ok_or(())?;
    let tcp_p = ptr_at::<TcpHdr>(data, data_end, L4_OFF).ok_or(())?;
    // SAFETY: bounds checked above.
    unsafe {
        (*eth).dst_addr = client_mac;
        (*eth).src_addr = our_mac;
        *ip_p = ip_hdr;
        *tcp_p = rst;
    }
    redirect_back(ifindex)
}

/// Sends the rewritten packet out of `ifindex`, where it came in.
#[inline(always)]
pub fn redirect_back(ifindex: u32) -> Result<i32, ()> {
    // SAFETY: plain helper.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == TC_ACT_REDIRECT as i64 {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(())
    }
}
