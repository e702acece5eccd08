//! Read-only lookups of the Service flow state that ICMP error
//! translation (`icmp`) and fragment handling (`frag`) need. They reach
//! connection tracking only through here, so a change of its maps or
//! entries touches these two functions and nothing in those modules.

use dataplane_common::{CtEntry, CtKey, RnatEntry};

use crate::maps::{CT, RNAT};

/// The 5-tuple as a conntrack key.
#[inline(always)]
pub fn key(saddr: [u8; 4], daddr: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// The flow client -> ClusterIP `key` is tracked: where it was sent.
#[inline(always)]
pub fn forward(key: &CtKey) -> Option<CtEntry> {
    // SAFETY: plain data, copied out at once.
    unsafe { CT.get(key) }.copied()
}

/// `key` is the reply direction (backend -> client) of a tracked flow:
/// what its addresses must become.
#[inline(always)]
pub fn reply(key: &CtKey) -> Option<RnatEntry> {
    // SAFETY: plain data, copied out at once.
    unsafe { RNAT.get(key) }.copied()
}
