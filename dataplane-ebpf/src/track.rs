//! Read-only lookups of the Service flow state that ICMP error
//! translation (`icmp`) and fragment handling (`frag`) need. They reach
//! connection tracking only through here, so a change of its maps or
//! entries touches these two functions and nothing in those modules.

use dataplane_common::{CtEntry, CtKey, RnatEntry, ct::CT_F_NORTH_SOUTH};

use crate::ct;

/// The 5-tuple as a conntrack key.
pub use crate::ct::key;

/// The flow client -> ClusterIP `key` is tracked and live (not expired):
/// where it was sent.
#[inline(always)]
pub fn forward(key: &CtKey) -> Option<CtEntry> {
    let p = ct::lookup_forward(key, ct::now())?;
    // SAFETY: a map value pointer, valid for this program run; copied out.
    Some(unsafe { *p })
}

/// The reply direction of a live tracked flow.
pub struct Back {
    /// What the reply's addresses must become.
    pub rnat: RnatEntry,
    /// A north-south flow (NodePort, externalIP, LoadBalancer IP): its
    /// replies leave by the underlay (`nodeport::to_underlay`).
    pub north_south: bool,
}

/// `key` is the reply direction (backend -> client) of a live tracked
/// flow (see `ct::lookup_reply`).
#[inline(always)]
pub fn reply(key: &CtKey) -> Option<Back> {
    let r = ct::lookup_reply(key)?;
    // SAFETY: a map value pointer, valid for this program run.
    let flags = unsafe { (*r.entry).flags };
    Some(Back {
        rnat: r.rnat,
        north_south: flags & CT_F_NORTH_SOUTH != 0,
    })
}

/// Whether a forward entry is a north-south flow's.
#[inline(always)]
pub fn is_north_south(e: &CtEntry) -> bool {
    e.flags & CT_F_NORTH_SOUTH != 0
}
