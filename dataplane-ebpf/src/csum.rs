//! Checksum helpers.

use network_types::ip::Ipv4Hdr;

/// Internet checksum of a 20-byte IPv4 header (no options), with the
/// checksum field taken as zero. Unrolled: 10 u16 words.
#[inline(always)]
pub fn ipv4_header_csum(ip: &Ipv4Hdr) -> [u8; 2] {
    let words: [u16; 10] = [
        u16::from_be_bytes([ip.vihl, ip.tos]),
        u16::from_be_bytes(ip.tot_len),
        u16::from_be_bytes(ip.id),
        u16::from_be_bytes(ip.frags),
        u16::from_be_bytes([ip.ttl, ip.proto]),
        0,
        u16::from_be_bytes([ip.src_addr[0], ip.src_addr[1]]),
        u16::from_be_bytes([ip.src_addr[2], ip.src_addr[3]]),
        u16::from_be_bytes([ip.dst_addr[0], ip.dst_addr[1]]),
        u16::from_be_bytes([ip.dst_addr[2], ip.dst_addr[3]]),
    ];
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(words[i]);
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
