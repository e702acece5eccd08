//! Internet checksums (RFC 1071) of the headers the programs write: the
//! outer IPv4 header of VXLAN, the rejections' IPv4, TCP and ICMP headers;
//! incremental updates (RFC 1624) of the fields ICMP translation and TTL
//! decrement change by direct writes.
//! Rewrites of a packet in place (Service NAT) use the kernel's
//! incremental helpers instead (see `nat`), which keep CHECKSUM_PARTIAL
//! skbs consistent.

use core::mem::size_of;

use network_types::ip::Ipv4Hdr;

/// Adds the bytes of `v` (an even number of them, in packet or stack
/// memory) to `sum` as big-endian 16-bit words.
#[inline(always)]
pub fn add<T>(mut sum: u32, v: &T) -> u32 {
    let p = (v as *const T).cast::<u8>();
    let mut i = 0;
    while i + 1 < size_of::<T>() {
        // SAFETY: i + 1 < size_of::<T>(), inside `v`.
        let w = unsafe { u16::from_be_bytes([*p.add(i), *p.add(i + 1)]) };
        sum += u32::from(w);
        i += 2;
    }
    sum
}

/// Sum of the IPv4 pseudo-header of an L4 segment of `len` bytes.
#[inline(always)]
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let sum = add(add(0, &src), &dst);
    sum + u32::from(proto) + u32::from(len)
}

/// Folds the carries and complements: the bytes of the checksum field.
#[inline(always)]
pub fn finish(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(ip: &Ipv4Hdr) -> [u8; 2] {
    finish(add(0, ip))
}

/// The checksum field `check` after a 16-bit word of the header changed
/// from `old` to `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let sum = u32::from(!u16::from_be_bytes(check)) + u32::from(!old) + u32::from(new);
    finish(sum)
}

/// Adds to `acc` what replacing the 16-bit words of `old` by those of
/// `new` does to a sum (RFC 1624: ~m + m'), for [`apply`]. Nothing when
/// they are equal.
#[inline(always)]
pub fn diff4(acc: u32, old: [u8; 4], new: [u8; 4]) -> u32 {
    if old == new {
        return acc;
    }
    diff2(
        diff2(acc, [old[0], old[1]], [new[0], new[1]]),
        [old[2], old[3]],
        [new[2], new[3]],
    )
}

/// [`diff4`] for one 16-bit word.
#[inline(always)]
pub fn diff2(acc: u32, old: [u8; 2], new: [u8; 2]) -> u32 {
    if old == new {
        return acc;
    }
    acc + u32::from(!u16::from_be_bytes(old)) + u32::from(u16::from_be_bytes(new))
}

/// The checksum field `check` after the changes summed in `acc` by
/// [`diff4`]/[`diff2`] (RFC 1624, eqn. 3).
#[inline(always)]
pub fn apply(check: [u8; 2], acc: u32) -> [u8; 2] {
    if acc == 0 {
        return check;
    }
    finish(u32::from(!u16::from_be_bytes(check)) + acc)
}
