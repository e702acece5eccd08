//! Rare data-path events (a full map, a failed helper), logged through
//! aya-log when the agent asks for it (`NODE_CFG_BPF_LOG`, set by
//! `dataplane agent --bpf-log`). Only failure paths log, never the fast
//! path, and the flag is read only there. Without a node configuration
//! there is no flag to read, so nothing is logged (those packets are
//! counted as `pass_no_config`).

use dataplane_common::NODE_CFG_BPF_LOG;

use crate::maps::NODE_CONFIG;

/// Has the agent asked for rare events to be logged?
#[inline(always)]
pub fn enabled() -> bool {
    NODE_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & NODE_CFG_BPF_LOG != 0)
}

/// `log_event!(ctx, "format", args...)`: an aya-log warning, if [`enabled`].
macro_rules! log_event {
    ($ctx:expr, $($fmt:tt)+) => {
        if $crate::event::enabled() {
            aya_log_ebpf::warn!($ctx, $($fmt)+);
        }
    };
}
