//! Address and port rewriting with incremental checksum updates. The
//! kernel helpers keep CHECKSUM_PARTIAL skbs (checksum offload from a
//! local pod) consistent, which a hand-written full checksum would not.

use aya_ebpf::programs::TcContext;
use dataplane_common::PROTO_UDP;

use crate::l4::{Flow, IP_OFF};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;

fn l4_flags(flow: &Flow) -> u64 {
    // A zero UDP checksum means "none" and must stay zero.
    if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// Rewrites the IPv4 address at `off` (IP_SRC_OFF or IP_DST_OFF).
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    flow: &Flow,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(
        flow.csum_off(),
        from,
        to,
        BPF_F_PSEUDO_HDR | l4_flags(flow) | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM_OFF, from, to, 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Rewrites the source (`port_off` 0) or destination (2) port.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    flow: &Flow,
    port_off: usize,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(flow.csum_off(), from, to, l4_flags(flow) | 2)
        .map_err(|_| ())?;
    ctx.store(flow.l4_off + port_off, &new, 0).map_err(|_| ())
}
