//! Header values the programs write or test, named once. Layouts come from
//! `network-types`, values shared with the agent (protocol numbers, VXLAN
//! flags and overhead) from `dataplane-common`; the rest is here.

/// IPv4 version 4, header length 5 words: no options.
pub const IPV4_VIHL_NO_OPTIONS: u8 = 0x45;
/// Don't Fragment, in the IPv4 flags/fragment-offset field.
pub const IP_DF: u16 = 0x4000;
/// More Fragments + fragment offset: non-zero in any fragment.
pub const IP_MF_OFFSET: u16 = 0x3fff;
/// Fragment offset alone: non-zero in every fragment but the first.
pub const IP_OFFSET: u16 = 0x1fff;
/// TTL of packets the programs originate (Linux's IPDEFTTL).
pub const IP_DEFAULT_TTL: u8 = 64;
/// The ECN bits of the TOS byte.
pub const IP_ECN_MASK: u8 = 0x03;
/// TOS of ICMP errors (Linux: IPTOS_PREC_INTERNETCONTROL).
pub const IPTOS_PREC_INTERNETCONTROL: u8 = 0xc0;
/// Longest IPv4 header (15 words).
pub const IPV4_MAX_HDR_LEN: usize = 60;

/// Bits of the TCP flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// Data-offset byte of a TCP header without options (5 words, high nibble).
pub const TCP_DOFF_NO_OPTIONS: u8 = 5 << 4;

/// ICMP type destination unreachable, and its code port unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
/// ICMP type time exceeded, and its code "TTL exceeded in transit".
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_EXC_TTL: u8 = 0;
/// ICMP type parameter problem (an error, like the two above).
pub const ICMP_PARAMETERPROB: u8 = 12;

/// Address family of `bpf_fib_lookup` for IPv4.
pub const AF_INET: u8 = 2;

/// Linux's default ip_local_port_range, which the kernel vxlan driver
/// picks its UDP source ports from.
pub const VXLAN_SPORT_MIN: u32 = 32768;
pub const VXLAN_SPORT_MAX: u32 = 60999;

/// `bpf_map_update_elem` errors, negated in what it returns: a key that
/// exists (with `BPF_NOEXIST`), a full (non-LRU) hash map.
pub const EEXIST: i32 = 17;
pub const E2BIG: i32 = 7;
/// Map update flag: only add a new key.
pub const BPF_NOEXIST: u64 = 1;
