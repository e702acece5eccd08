//! ECN on decapsulation (RFC 6040, section 4.2, normal mode), shared by the
//! XDP and TC paths. Only congestion experienced on the outer header
//! changes anything:
//!
//! | inner \ outer | Not-ECT / ECT(0) / ECT(1) | CE |
//! |---|---|---|
//! | Not-ECT | unchanged | drop (the endpoints cannot hear of it) |
//! | ECT(0), ECT(1) | unchanged | CE |
//! | CE | unchanged | unchanged |
//!
//! The RFC also allows outer ECT(1) over inner ECT(0) to become ECT(1);
//! like Linux's vxlan we leave that out. Linux drops the Not-ECT/CE case
//! too (`IP_ECN_decapsulate` returning 2).

use dataplane_common::Stat;
use network_types::ip::Ipv4Hdr;

use crate::{
    consts::IP_ECN_MASK,
    csum,
    parse::ptr_at,
    vxlan::{INNER_IP_OFF, OUTER_IP_OFF},
};

const ECN_NOT_ECT: u8 = 0;
const ECN_CE: u8 = 3;

/// Applies the outer header's CE mark to the inner IPv4 header of a frame
/// [`crate::vxlan::classify`] accepted (still encapsulated), fixing the
/// inner checksum. `Err` carries the drop reason.
#[inline(always)]
pub fn decapsulate(data: usize, data_end: usize) -> Result<(), Stat> {
    let outer = ptr_at::<Ipv4Hdr>(data, data_end, OUTER_IP_OFF).ok_or(Stat::DropTruncated)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*outer).tos } & IP_ECN_MASK != ECN_CE {
        return Ok(());
    }
    let inner = ptr_at::<Ipv4Hdr>(data, data_end, INNER_IP_OFF).ok_or(Stat::DropTruncated)?;
    // SAFETY: as above; the frame is ours to write (TC: the verifier
    // unclones the skb for direct writes).
    let inner = unsafe { &mut *inner };
    match inner.tos & IP_ECN_MASK {
        ECN_CE => Ok(()),
        ECN_NOT_ECT => Err(Stat::DropCeNotEct),
        _ => {
            let old = u16::from_be_bytes([inner.vihl, inner.tos]);
            inner.tos |= ECN_CE;
            let new = u16::from_be_bytes([inner.vihl, inner.tos]);
            inner.check = csum::replace16(inner.check, old, new);
            Ok(())
        }
    }
}
