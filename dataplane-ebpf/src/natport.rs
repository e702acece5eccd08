//! Source ports for SNAT, one allocator for both users: the masquerade
//! (`masq`, reverse entries in `MASQ_REV`) and NodePort's ETP Cluster
//! flows (`nodeport`, reverse entries in `RNAT`). A new flow takes a port
//! of `--nat-ports` whose reverse key (remote end -> node address:port)
//! it can insert with `BPF_NOEXIST`; trying [`ALLOC_TRIES`] ports
//! consecutively from a start the caller picks.
//!
//! A key held by a flow that no longer needs it is taken over, as
//! netfilter lets a new connection reuse a tuple whose conntrack is in
//! TIME_WAIT or CLOSE: the holder's forward entry is gone or names another
//! key (an orphan), has expired, or is closed. Without that, every closed
//! connection would hold its port for the TIME_WAIT timeout (120 s), and a
//! client opening connections to one remote address and port would run
//! out at `ports / 120` connections per second (38/s for the default
//! range). What "no longer needs it" means is the caller's (`reclaim`).

use dataplane_common::masq::{ALLOC_TRIES, port_at};

use crate::consts::{E2BIG, EEXIST};

/// The outcome of claiming one port.
#[derive(Clone, Copy)]
pub enum Claim {
    /// The reverse entry is ours.
    Won,
    /// A live flow holds the key: try the next port.
    Busy,
    /// The reverse map is full.
    Full,
    /// Any other insert error (the errno, negated).
    Failed(i32),
}

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

/// Tries the ports of `min..=max` (host byte order) from `start` on until
/// `claim` wins one; the port, network byte order.
#[inline(always)]
pub fn allocate(
    min: u16,
    max: u16,
    start: u32,
    mut claim: impl FnMut([u8; 2]) -> Claim,
) -> Result<[u8; 2], NoPort> {
    let mut i = 0;
    while i < ALLOC_TRIES {
        let port = port_at(min, max, start, i).to_be_bytes();
        match claim(port) {
            Claim::Won => return Ok(port),
            Claim::Busy => {}
            Claim::Full => return Err(NoPort::Full),
            Claim::Failed(e) => return Err(NoPort::Failed(e)),
        }
        i += 1;
    }
    Err(NoPort::Exhausted)
}

/// Claims one reverse key: `insert` (a `BPF_NOEXIST` insert of it); when
/// the key is held, `reclaim` frees it if its flow is done (and says
/// whether it did), and the insert is tried once more.
#[inline(always)]
pub fn claim(insert: impl Fn() -> Result<(), i32>, reclaim: impl FnOnce() -> bool) -> Claim {
    let mut r = insert();
    if matches!(r, Err(e) if e == -EEXIST) {
        if !reclaim() {
            return Claim::Busy;
        }
        r = insert();
    }
    match r {
        Ok(()) => Claim::Won,
        // Another CPU took it between the reclaim and the insert.
        Err(e) if e == -EEXIST => Claim::Busy,
        Err(e) if e == -E2BIG => Claim::Full,
        Err(e) => Claim::Failed(e),
    }
}
