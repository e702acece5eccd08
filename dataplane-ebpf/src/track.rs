//! Read-only lookups of the Service flow state that ICMP error
//! translation (`icmp`) and fragment handling (`frag`) need. They reach
//! connection tracking only through here, so a change of its maps or
//! entries touches these two functions and nothing in those modules.

use dataplane_common::{CtEntry, CtKey, RnatEntry};

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

/// `key` is the reply direction (backend -> client) of a live tracked
/// flow (see `ct::lookup_reply`): what its addresses must become.
#[inline(always)]
pub fn reply(key: &CtKey) -> Option<RnatEntry> {
    ct::lookup_reply(key).map(|r| r.rnat)
}
