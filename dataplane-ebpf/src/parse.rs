//! Bounds-checked access to packet bytes (direct packet access). Every
//! header read in the programs goes through [`ptr_at`], which does the one
//! comparison against `data_end` the verifier wants to see.

use core::mem::size_of;

/// Pointer to a `T` at `offset` from `data`, if the whole `T` is in the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// Is `addr` inside `net`/`len`? All three in network byte order.
#[inline(always)]
pub fn in_prefix(addr: [u8; 4], net: [u8; 4], len: u8) -> bool {
    if len == 0 {
        return true;
    }
    if len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
}
