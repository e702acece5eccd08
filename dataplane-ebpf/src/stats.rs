//! The single place where outcomes are counted.

use aya_ebpf::programs::{TcContext, XdpContext};
use dataplane_common::{Counter, Stat};

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat, bytes: u32) {
    count_seen(stat, bytes);
}

/// [`count`], returning how many packets this CPU has counted under `stat`
/// so far (this one included; 0 if the slot is missing), so that a rare
/// event can be logged at growing intervals rather than for every packet.
#[inline(always)]
pub fn count_seen(stat: Stat, bytes: u32) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        Some(c) => {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe {
                let c: &mut Counter = &mut *c;
                c.packets += 1;
                c.bytes += u64::from(bytes);
                c.packets
            }
        }
        None => 0,
    }
}

/// The length counted with a packet's outcome: the skb's in TC, the
/// frame's in XDP. For code both kinds of program run.
pub trait PacketLen {
    fn packet_len(&self) -> u32;
}

impl PacketLen for TcContext {
    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.len()
    }
}

impl PacketLen for XdpContext {
    #[inline(always)]
    fn packet_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}
