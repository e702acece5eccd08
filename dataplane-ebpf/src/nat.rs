//! Address and port rewriting with incremental checksum updates. The
//! kernel helpers keep CHECKSUM_PARTIAL skbs (checksum offload from a
//! local pod) consistent, which a hand-written full checksum would not.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::PROTO_UDP;
use network_types::ip::Ipv4Hdr;

use crate::{l4::Flow, parse::IP_OFF};

const IP_CSUM_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, check);

/// Which address of the IPv4 header to rewrite.
#[derive(Clone, Copy)]
pub enum Addr {
    Src,
    Dst,
}

/// Which port of the TCP/UDP header to rewrite.
#[derive(Clone, Copy)]
pub enum Port {
    Src,
    Dst,
}

/// `bpf_l4_csum_replace` flags for this flow: a zero UDP checksum means
/// "none" and must stay zero.
#[inline(always)]
fn l4_flags(flow: &Flow) -> u64 {
    if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrites an IPv4 address from `old` to `new`, fixing both checksums.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    flow: &Flow,
    which: Addr,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let off = match which {
        Addr::Src => IP_OFF + offset_of!(Ipv4Hdr, src_addr),
        Addr::Dst => IP_OFF + offset_of!(Ipv4Hdr, dst_addr),
    };
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    // The low bits of the flags are the size of the changed field.
    ctx.l4_csum_replace(
        flow.csum_off(),
        from,
        to,
        BPF_F_PSEUDO_HDR as u64 | l4_flags(flow) | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Rewrites an IPv4 address of a fragment other than the first, which
/// carries no L4 header: only the IPv4 header checksum changes (the L4
/// checksum, in the first fragment, covers the whole datagram and was
/// fixed there).
#[inline(always)]
pub fn set_addr_l3(ctx: &TcContext, which: Addr, old: [u8; 4], new: [u8; 4]) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let off = match which {
        Addr::Src => IP_OFF + offset_of!(Ipv4Hdr, src_addr),
        Addr::Dst => IP_OFF + offset_of!(Ipv4Hdr, dst_addr),
    };
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Rewrites a TCP/UDP port from `old` to `new`, fixing the L4 checksum.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    flow: &Flow,
    which: Port,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    // Source then destination port open both the TCP and UDP header.
    let off = match which {
        Port::Src => flow.l4_off,
        Port::Dst => flow.l4_off + 2,
    };
    let (from, to) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(flow.csum_off(), from, to, l4_flags(flow) | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}
