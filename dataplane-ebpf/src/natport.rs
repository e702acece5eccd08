//! Source ports for SNAT, one allocator for both users: the masquerade
//! (`masq`, reverse entries in `MASQ_REV`) and NodePort's ETP Cluster
//! flows (`nodeport`, reverse entries in `RNAT`). A new flow takes a port
//! of `--nat-ports` whose reverse key (remote end -> node address:port)
//! it can insert with `BPF_NOEXIST`, trying consecutive ports from a
//! start the caller picks, in two passes:
//!
//! 1. a free port: [`Tries::free`] plain inserts;
//! 2. a port held by a flow that no longer needs it, taken over, as
//!    netfilter lets a new connection reuse a tuple whose conntrack is in
//!    TIME_WAIT or CLOSE: the holder's forward entry is gone or names
//!    another key (an orphan), has expired, or is closed
//!    ([`Tries::take_over`] ports from the same start; what "no longer
//!    needs it" means is the caller's `reclaim`). Without this, every
//!    closed connection would hold its port for the TIME_WAIT timeout
//!    (120 s), and a client opening connections to one remote address
//!    and port would run out at `ports / 120` connections per second (38/s
//!    for the default range).
//!
//! Two passes, not a takeover check at every try: the verifier walks
//! every try of a bounded loop, and a takeover costs about as much to
//! verify as ten plain inserts (`to_underlay` went past the verifier's
//! limit with a takeover check in each of 32 tries).

use dataplane_common::masq::port_at;

use crate::consts::{E2BIG, EEXIST};

/// How many ports a program tries in each pass.
#[derive(Clone, Copy)]
pub struct Tries {
    pub free: u32,
    pub take_over: u32,
}

/// The masquerade's own program (`to_underlay`).
pub const MASQ_TRIES: Tries = Tries {
    free: dataplane_common::masq::ALLOC_TRIES,
    take_over: 4,
};

/// NodePort's SNAT, in `from_underlay`, which does much more besides.
pub const NODEPORT_TRIES: Tries = Tries {
    free: 8,
    take_over: 4,
};

/// Why no port was allocated.
#[derive(Clone, Copy)]
pub enum NoPort {
    /// Every port tried is held by a live flow.
    Exhausted,
    /// The reverse map is full.
    Full,
    /// An insert failed otherwise (the errno, negated).
    Failed(i32),
}

/// Tries ports of `min..=max` (host byte order) from `start` on: `insert`
/// adds the reverse entry for a port (`BPF_NOEXIST`); `reclaim` frees a
/// port's reverse key if the flow holding it no longer needs it and says
/// whether it is free now. The port won, network byte order.
#[inline(always)]
pub fn allocate(
    min: u16,
    max: u16,
    start: u32,
    tries: Tries,
    insert: impl Fn([u8; 2]) -> Result<(), i32>,
    reclaim: impl Fn([u8; 2]) -> bool,
) -> Result<[u8; 2], NoPort> {
    let mut i = 0;
    while i < tries.free {
        let port = port_at(min, max, start, i).to_be_bytes();
        match insert(port) {
            Ok(()) => return Ok(port),
            Err(e) if e == -EEXIST => {}
            Err(e) => return Err(failed(e)),
        }
        i += 1;
    }
    let mut i = 0;
    while i < tries.take_over {
        let port = port_at(min, max, start, i).to_be_bytes();
        if reclaim(port) {
            match insert(port) {
                Ok(()) => return Ok(port),
                // Another CPU took it between the reclaim and the insert.
                Err(e) if e == -EEXIST => {}
                Err(e) => return Err(failed(e)),
            }
        }
        i += 1;
    }
    Err(NoPort::Exhausted)
}

#[inline(always)]
fn failed(e: i32) -> NoPort {
    if e == -E2BIG {
        NoPort::Full
    } else {
        NoPort::Failed(e)
    }
}
