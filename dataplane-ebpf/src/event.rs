//! Rare data-path events (a full map, a failed helper, no node
//! configuration), logged through aya-log when the agent asks for it
//! (`dataplane agent --bpf-log`). Only failure paths log, never the fast
//! path.
//!
//! Two gates: the aya-log level the agent sets in the object at load time
//! (off without `--bpf-log`, and the verifier then drops the logging code
//! altogether), and, for events of a configured node, `NODE_CFG_BPF_LOG`
//! in the node configuration. An event that repeats for every packet while
//! a condition lasts (no configuration, a full map) is logged only at the
//! 1st, 2nd, 4th, 8th, ... time on each CPU ([`repeat_logged`]), so a
//! flood of such packets costs a handful of records.

use aya_ebpf::{EbpfContext, programs::TcContext};
use dataplane_common::{NODE_CFG_BPF_LOG, Stat};

use crate::{
    maps::NODE_CONFIG,
    stats::{PacketLen, count_seen},
};

/// Has the agent asked for rare events to be logged?
#[inline(always)]
pub fn enabled() -> bool {
    NODE_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & NODE_CFG_BPF_LOG != 0)
}

/// What a map update returns, negated, when the map holds `max_entries`.
const E2BIG: i64 = crate::consts::E2BIG as i64;

/// Whether a map update failed because the map is full.
#[inline(always)]
pub fn is_full(err: i64) -> bool {
    err == -E2BIG
}

/// Whether the `n`th occurrence (on this CPU) of a repeating event is one
/// to log: 1, 2, 4, 8, ...
#[inline(always)]
pub fn repeat_logged(n: u64) -> bool {
    n != 0 && n & (n - 1) == 0
}

/// `log_event!(ctx, "format", args...)`: an aya-log warning, if [`enabled`].
macro_rules! log_event {
    ($ctx:expr, $($fmt:tt)+) => {
        if $crate::event::enabled() {
            aya_log_ebpf::warn!($ctx, $($fmt)+);
        }
    };
}

/// A packet seen before the agent wrote the node configuration: counted
/// as `pass_no_config` (it is passed untouched). There is no
/// configuration to ask, so only the load-time level gates the record.
#[inline(always)]
pub fn config_missing(ctx: &TcContext, program: &str) {
    let n = count_seen(Stat::PassNoConfig, ctx.len());
    if repeat_logged(n) {
        aya_log_ebpf::warn!(
            ctx,
            "{}: no node config (node_cfg_v2) yet: {} packets passed untouched on this CPU",
            program,
            n
        );
    }
}

/// An entry the data path had to store in `map` was refused with `err`
/// (-E2BIG: the map is full): counted as `map_full` on the way; the
/// packet then goes on to its outcome.
#[inline(always)]
pub fn map_full<C: EbpfContext + PacketLen>(ctx: &C, map: &str, err: i64) {
    let n = count_seen(Stat::MapFull, ctx.packet_len());
    if repeat_logged(n) {
        log_event!(
            ctx,
            "map full: {} refused an entry ({}); {} times on this CPU",
            map,
            err,
            n
        );
    }
}
