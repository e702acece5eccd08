//! Rejecting a connection to a Service with no usable backend, from the
//! ClusterIP back to the client: a TCP RST for TCP (connect() fails at
//! once with ECONNREFUSED, and an established flow whose backend vanished
//! is reset, which an ICMP error would not do), an ICMP port unreachable
//! for UDP (kube-proxy's REJECT). Nobody waits for a timeout.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::eth::EthHdr;

use crate::{l4::Flow, parse::ptr_at};

/// Original IPv4 header + 8 bytes of it carried in the ICMP error.
const QUOTED: usize = 20 + 8;
/// New IPv4 header + ICMP header put in front of the quote.
const ADDED: usize = 20 + 8;
const ICMP_LEN: usize = 8 + QUOTED;

/// Turns the packet into an ICMP port unreachable for its sender and sends
/// it back out of the interface it came in on (towards the pod).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    if flow.l4_off != EthHdr::LEN + 20 {
        return Err(()); // IPv4 options: not worth quoting; caller drops.
    }
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0).ok_or(())?;
    // SAFETY: bounds checked.
    let (client_mac, our_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    // SAFETY: helpers on our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (EthHdr::LEN + QUOTED) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.adjust_room(ADDED as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;

    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip = ptr_at::<[u8; 20]>(data, data_end, EthHdr::LEN).ok_or(())?;
    let icmp = ptr_at::<[u8; ICMP_LEN]>(data, data_end, EthHdr::LEN + 20).ok_or(())?;
    // SAFETY: all three bounds-checked above.
    unsafe {
        (*eth).dst_addr = client_mac;
        (*eth).src_addr = our_mac;
        let total = (20 + ICMP_LEN) as u16;
        let t = total.to_be_bytes();
        let (s, d) = (flow.daddr, flow.saddr);
        let mut h = [
            0x45, 0xc0, t[0], t[1], 0, 0, 0, 0, 64, 1, 0, 0, s[0], s[1], s[2], s[3], d[0], d[1],
            d[2], d[3],
        ];
        let c = csum(&h);
        h[10] = c[0];
        h[11] = c[1];
        *ip = h;
        let m = &mut *icmp;
        m[0] = 3; // destination unreachable
        m[1] = 3; // port unreachable
        m[2] = 0;
        m[3] = 0;
        m[4] = 0;
        m[5] = 0;
        m[6] = 0;
        m[7] = 0;
        let c = csum(m);
        m[2] = c[0];
        m[3] = c[1];
    }
    // SAFETY: plain helper.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == TC_ACT_REDIRECT as i64 {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(())
    }
}

/// Turns a TCP segment into the RST its sender expects from the ClusterIP
/// and sends it back out of the interface it came in on.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow) -> Result<i32, ()> {
    if flow.l4_off != EthHdr::LEN + 20 {
        return Err(());
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip = ptr_at::<[u8; 20]>(data, data_end, EthHdr::LEN).ok_or(())?;
    let tcp = ptr_at::<[u8; 20]>(data, data_end, EthHdr::LEN + 20).ok_or(())?;
    // SAFETY: bounds checked above.
    let (client_mac, our_mac, ip, tcp) = unsafe { ((*eth).src_addr, (*eth).dst_addr, *ip, *tcp) };
    let tot_len = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let doff = u32::from(tcp[12] >> 4) * 4;
    let payload = tot_len.saturating_sub(20 + doff);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    // RFC 793 reset generation: take the ACK's number as our sequence if
    // there is one, else acknowledge what the segment occupied.
    let (r_seq, r_ack, r_flags) = if flags & 0x10 != 0 {
        (ack, 0u32, 0x04u8)
    } else {
        let occupied = payload + u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        (0, seq.wrapping_add(occupied), 0x14)
    };
    // SAFETY: helpers on our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (EthHdr::LEN + 40) as u32, 0) } != 0 {
        return Err(());
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0).ok_or(())?;
    let ip_p = ptr_at::<[u8; 20]>(data, data_end, EthHdr::LEN).ok_or(())?;
    let tcp_p = ptr_at::<[u8; 20]>(data, data_end, EthHdr::LEN + 20).ok_or(())?;
    let (s, d) = (flow.daddr, flow.saddr);
    let mut h = [
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3],
    ];
    let c = csum(&h);
    h[10] = c[0];
    h[11] = c[1];
    let q = r_seq.to_be_bytes();
    let a = r_ack.to_be_bytes();
    let mut t = [
        flow.dport[0],
        flow.dport[1],
        flow.sport[0],
        flow.sport[1],
        q[0],
        q[1],
        q[2],
        q[3],
        a[0],
        a[1],
        a[2],
        a[3],
        0x50,
        r_flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    // Pseudo-header (src, dst, zero, protocol, TCP length) + TCP header.
    let mut p = [0u8; 32];
    p[0..4].copy_from_slice(&s);
    p[4..8].copy_from_slice(&d);
    p[9] = 6;
    p[11] = 20;
    p[12..32].copy_from_slice(&t);
    let c = csum(&p);
    t[16] = c[0];
    t[17] = c[1];
    // SAFETY: bounds checked above.
    unsafe {
        (*eth).dst_addr = client_mac;
        (*eth).src_addr = our_mac;
        *ip_p = h;
        *tcp_p = t;
    }
    // SAFETY: plain helper.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == TC_ACT_REDIRECT as i64 {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(())
    }
}

/// Internet checksum of an even-length byte array.
#[inline(always)]
fn csum<const N: usize>(b: &[u8; N]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
