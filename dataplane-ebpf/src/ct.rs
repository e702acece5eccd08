//! Connection tracking of ClusterIP flows: the typed access to `CT` and
//! `RNAT` and the lifecycle rules of `dataplane_common::ct` applied to
//! them. One flow is one `CT` entry (client -> ClusterIP, holding the
//! backend, state and last-seen time) and one `RNAT` entry (backend ->
//! client, the reply's index back to it). A reply is translated only
//! while the `CT` entry it names is live and points back at it, so a
//! closed or expired flow's reverse NAT can never rewrite a later flow
//! that reuses the tuple.
//!
//! The calls other modules make: [`lookup_forward`], [`lookup_reply`],
//! [`observe`], [`create`], [`forget`].

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use dataplane_common::{
    Backend, CtEntry, CtKey, RnatEntry, SvcKey,
    ct::{self, CtState, CtTimeouts, Dir, Observe},
};

use crate::{
    consts::{BPF_NOEXIST, E2BIG},
    l4::Flow,
    maps::{CT, CT_CONFIG, RNAT},
};

/// The clock of `last_seen_ns` (CLOCK_MONOTONIC, as the agent reads it).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn timeouts() -> CtTimeouts {
    CT_CONFIG.get(0).copied().unwrap_or(CtTimeouts::DEFAULT)
}

/// The forward key of a packet (client -> ClusterIP, as it arrives).
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

/// The reverse-NAT key of a flow.
#[inline(always)]
pub fn reply_key(fwd: &CtKey, e: &CtEntry) -> CtKey {
    ct::entry_reply_key(fwd, e)
}

/// The live entry of the flow `key` (client -> ClusterIP). An expired
/// entry is absent: it is removed with its reverse-NAT entry here, so the
/// caller can make a new flow in its place.
#[inline(always)]
pub fn lookup_forward(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let p = CT.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for this program run.
    let e = unsafe { *p };
    if ct::is_expired(e.state, e.last_seen_ns, now, &timeouts()) {
        forget(key, &reply_key(key, &e));
        return None;
    }
    Some(p)
}

/// A reply's flow: what to restore, the flow's entry, and the time it
/// was looked up at (for [`observe`]).
pub struct Reply {
    pub rnat: RnatEntry,
    pub entry: *mut CtEntry,
    pub now: u64,
}

/// The flow a packet from a backend (`key`: backend -> client) is a
/// reply of: its reverse-NAT entry, provided the forward entry it names
/// is live and was sent to exactly this backend and client. Otherwise
/// `None`: the packet is not a Service reply (a stale entry is left for
/// the sweeper). Every packet from a pod asks this first, so it costs one
/// hash lookup when the answer is no.
#[inline(always)]
pub fn lookup_reply(key: &CtKey) -> Option<Reply> {
    // SAFETY: plain data, copied out.
    let rnat = unsafe { RNAT.get(key) }.copied()?;
    // Only now: most packets that get here are no Service reply.
    let now = now();
    let fwd = ct::forward_key(&rnat, key.proto);
    let p = CT.get_ptr_mut(fwd)?;
    // SAFETY: a map value pointer, valid for this program run.
    let e = unsafe { *p };
    if ct::is_expired(e.state, e.last_seen_ns, now, &timeouts()) || reply_key(&fwd, &e) != *key {
        return None;
    }
    Some(Reply {
        rnat,
        entry: p,
        now,
    })
}

/// What a packet did to its flow.
pub enum Seen {
    /// The entry is updated (or needed no write).
    Tracked,
    /// A SYN on a closed flow: the caller forgets it and opens a new one.
    Reopen,
}

/// Applies a packet (`proto`, TCP flags `tcp`, going `dir`) to its live
/// entry: state transition, and last-seen written at most once a second.
#[inline(always)]
pub fn observe(entry: *mut CtEntry, proto: u8, dir: Dir, tcp: u8, now: u64) -> Seen {
    // SAFETY: a map value pointer, valid for this program run; the fields
    // are written racily with other CPUs, as every conntrack does (the
    // last writer wins, and either value is right).
    let e = unsafe { &mut *entry };
    let state = match CtState::from_u8(e.state) {
        Some(s) => s,
        None => return Seen::Reopen,
    };
    match ct::observe(state, e.flags, e.last_seen_ns, proto, dir, tcp, now) {
        Observe::Keep => Seen::Tracked,
        Observe::Write {
            state,
            flags,
            last_seen_ns,
        } => {
            e.state = state as u8;
            e.flags = flags;
            e.last_seen_ns = last_seen_ns;
            Seen::Tracked
        }
        Observe::Reopen => Seen::Reopen,
    }
}

/// Why [`create`] failed.
pub enum CreateError {
    /// The table holds `--ct-max` flows: the packet is dropped, as
    /// netfilter does.
    Full,
    /// Any other failure of the map update.
    Failed,
}

/// The two entries of a new Service flow: the forward one (the client's
/// packet `flow` to the frontend `front`, sent to `backend`, in the
/// `initial` state and flags `ct::initial` gave) and the reverse one (a
/// reply goes back to the client, from the frontend). No SNAT: a caller
/// that translates the source too fills it in.
#[inline(always)]
pub fn new_entries(
    flow: &Flow,
    front: &SvcKey,
    svc_id: u32,
    backend: Backend,
    initial: (CtState, u8),
    flags: u8,
    now: u64,
) -> (CtEntry, RnatEntry) {
    let entry = CtEntry {
        backend,
        snat: [0; 4],
        svc_id,
        created_ns: now,
        last_seen_ns: now,
        state: initial.0 as u8,
        flags: initial.1 | flags,
        snat_port: [0; 2],
        _pad: [0; 4],
    };
    let rnat = RnatEntry {
        vip: front.vip,
        vport: front.port,
        client_port: flow.sport,
        client: flow.saddr,
    };
    (entry, rnat)
}

/// Stores a new flow: its reverse-NAT entry first (a fast reply must find
/// it), then the forward entry. Nothing is left behind on failure.
#[inline(always)]
pub fn create(fwd: &CtKey, entry: &CtEntry, rnat: &RnatEntry) -> Result<(), CreateError> {
    let reply = reply_key(fwd, entry);
    let err = |e: i32| {
        if e == -E2BIG {
            CreateError::Full
        } else {
            CreateError::Failed
        }
    };
    RNAT.insert(reply, *rnat, 0).map_err(err)?;
    if let Err(e) = CT.insert(fwd, *entry, 0) {
        let _ = RNAT.remove(reply);
        return Err(err(e));
    }
    Ok(())
}

/// Adds the reverse-NAT entry of a new flow whose reply key holds a port
/// this packet chose (NodePort SNAT, one try of `natport::allocate`),
/// only if no flow holds the key (`BPF_NOEXIST`). After it,
/// [`create_forward`] completes the flow.
#[inline(always)]
pub fn insert_reply(reply: &CtKey, rnat: &RnatEntry) -> Result<(), i32> {
    RNAT.insert(reply, *rnat, BPF_NOEXIST)
}

/// Stores the forward entry of a flow whose reverse-NAT entry
/// [`insert_reply`] added; that entry is removed again on failure.
#[inline(always)]
pub fn create_forward(fwd: &CtKey, entry: &CtEntry) -> Result<(), CreateError> {
    if let Err(e) = CT.insert(fwd, *entry, 0) {
        let _ = RNAT.remove(reply_key(fwd, entry));
        return Err(if e == -E2BIG {
            CreateError::Full
        } else {
            CreateError::Failed
        });
    }
    Ok(())
}

/// Frees the reverse-NAT key `reply` if the flow holding it no longer
/// needs it: its forward entry is gone or points elsewhere (an orphan),
/// expired, or closed (TIME_WAIT or CLOSE). Whether the key is free now.
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn reclaim(reply: &CtKey) -> bool {
    // SAFETY: plain data, copied out.
    let Some(old) = (unsafe { RNAT.get(reply) }).copied() else {
        return true;
    };
    let fwd = ct::forward_key(&old, reply.proto);
    // The key by reference, not by value as clippy would have it: a
    // 16-byte copy on the stack, which `from_underlay` has no room for
    // (it broke the `--bpf-log` build: "combined stack size ... 528").
    // SAFETY: plain data, copied out.
    let free = match (unsafe { CT.get(&fwd) }).copied() {
        None => true,
        Some(e) => {
            reply_key(&fwd, &e) != *reply
                || ct::releases_port(e.state, e.last_seen_ns, now(), &timeouts())
        }
    };
    if !free {
        return false;
    }
    // The forward entry only if it is this key's flow.
    // SAFETY: plain data, copied out.
    if let Some(e) = unsafe { CT.get(&fwd) }
        && reply_key(&fwd, e) == *reply
    {
        let _ = CT.remove(&fwd);
    }
    let _ = RNAT.remove(reply);
    true
}

/// Removes a flow: both its entries.
#[inline(always)]
pub fn forget(fwd: &CtKey, reply: &CtKey) {
    let _ = CT.remove(fwd);
    let _ = RNAT.remove(reply);
}
