//! The single place where outcomes are counted.

use dataplane_common::{Counter, Stat};

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat, bytes: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            let c: &mut Counter = &mut *c;
            c.packets += 1;
            c.bytes += u64::from(bytes);
        }
    }
}
