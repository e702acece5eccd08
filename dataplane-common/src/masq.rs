//! Masquerade: pod traffic leaving the cluster network gets the node's
//! PublicIP and a port of `--nat-ports` as its source, as flannel's
//! `--ip-masq` rules do with iptables (`-s <network> -d <network>
//! RETURN`, `-s <network> ! -d 224.0.0.0/4 MASQUERADE --random-fully`).
//! The rules and the keys, as pure functions shared by the BPF programs
//! (`dataplane-ebpf/src/masq.rs`) and the agent's sweeper and
//! `dataplane conntrack list`.
//!
//! A masqueraded flow is two entries, as a Service flow is: the forward
//! one ([`crate::map_names::MASQ`], keyed by the flow as the pod sent it)
//! holding the NAT address and port and the flow's state, and the
//! reverse one ([`crate::map_names::MASQ_REV`], keyed by the reply as it
//! arrives) naming the pod. Their life is the Service conntrack's
//! ([`crate::ct`]: same states, timeouts and sweeper). ICMP echo is
//! tracked as UDP is, its identifier playing both ports (forward key:
//! `sport` = the pod's identifier, `dport` = 0).

use core::mem::size_of;

use crate::CtKey;
use parse_prefix::in_prefix;

/// IPPROTO_ICMP.
pub const PROTO_ICMP: u8 = 1;

/// `MasqEntry::flags` bit (beside the `ct::CT_F_*` bits): the flow is a
/// Service flow to a backend outside the cluster network, masqueraded
/// whether or not `--ip-masq` is on.
pub const MASQ_F_SERVICE: u8 = 1 << 6;
/// `MasqEntry::flags` bit: not a masqueraded flow but one that came in
/// from outside straight to a pod (UDP): its entry, made by the first
/// datagram in, says the pod's answers are replies, to leave as they are.
/// Its `nat_addr`/`nat_port` are the pod's own; it has no reverse entry.
pub const MASQ_F_INBOUND: u8 = 1 << 7;
/// The bits of `MasqEntry::flags` that are not the state machine's.
pub const MASQ_F_OWN: u8 = MASQ_F_SERVICE | MASQ_F_INBOUND;

/// How many ports a new flow tries (consecutive, from a random one)
/// before it is dropped as `drop_masq_exhausted`. A range no larger than
/// this is searched whole.
pub const ALLOC_TRIES: u32 = 32;

/// Value of [`crate::map_names::MASQ`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MasqEntry {
    /// The source address the flow leaves with (the node's PublicIP).
    pub nat_addr: [u8; 4],
    /// The source port (ICMP: echo identifier) it leaves with, network
    /// byte order.
    pub nat_port: [u8; 2],
    /// A [`crate::ct::CtState`].
    pub state: u8,
    /// `ct::CT_F_*`, [`MASQ_F_SERVICE`] and [`MASQ_F_INBOUND`].
    pub flags: u8,
    /// bpf_ktime_get_ns() when the entry was made.
    pub created_ns: u64,
    /// bpf_ktime_get_ns() of the last packet (see `ct::REFRESH_NS`).
    pub last_seen_ns: u64,
}

/// Value of [`crate::map_names::MASQ_REV`]: the pod end of the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MasqRev {
    pub pod: [u8; 4],
    /// Network byte order (ICMP: the pod's echo identifier).
    pub pod_port: [u8; 2],
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<MasqEntry>() == 24);
const _: () = assert!(size_of::<MasqRev>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers and byte arrays only, no padding
    // (see the size assertions).
    unsafe impl aya::Pod for super::MasqEntry {}
    unsafe impl aya::Pod for super::MasqRev {}
}

/// The reverse key of a flow (`fwd`: pod -> outside, as sent) that
/// leaves as `nat_addr`:`nat_port`: its replies as they arrive.
#[inline(always)]
pub const fn reply_key(fwd: &CtKey, nat_addr: [u8; 4], nat_port: [u8; 2]) -> CtKey {
    CtKey {
        saddr: fwd.daddr,
        daddr: nat_addr,
        sport: fwd.dport,
        dport: nat_port,
        proto: fwd.proto,
        _pad: [0; 3],
    }
}

/// The forward key of the flow a reverse entry belongs to.
#[inline(always)]
pub const fn forward_key(rev: &CtKey, r: &MasqRev) -> CtKey {
    CtKey {
        saddr: r.pod,
        daddr: rev.saddr,
        sport: r.pod_port,
        dport: rev.sport,
        proto: rev.proto,
        _pad: [0; 3],
    }
}

/// Whether a packet from `src` to `dst` leaving on the underlay is pod
/// traffic to be masqueraded (with `--ip-masq`): from this node's pod
/// subnet, to neither the cluster network nor multicast.
#[inline(always)]
pub const fn wanted(
    src: [u8; 4],
    dst: [u8; 4],
    subnet: [u8; 4],
    subnet_len: u8,
    network: [u8; 4],
    network_len: u8,
) -> bool {
    in_prefix(src, subnet, subnet_len)
        && !in_prefix(dst, network, network_len)
        && dst[0] & 0xf0 != 224
}

/// The `i`th port a new flow tries: consecutive from `start` (random),
/// wrapping inside `min..=max` (host byte order). A reversed range is
/// taken as the single port `min`.
#[inline(always)]
pub const fn port_at(min: u16, max: u16, start: u32, i: u32) -> u16 {
    if max <= min {
        return min;
    }
    let span = (max - min) as u32 + 1;
    min + ((start % span + i) % span) as u16
}

/// Address prefix test without the BPF crate's helpers (const, shared).
mod parse_prefix {
    /// Is `addr` inside `net`/`len`? All in network byte order.
    #[inline(always)]
    pub const fn in_prefix(addr: [u8; 4], net: [u8; 4], len: u8) -> bool {
        if len == 0 {
            return true;
        }
        if len > 32 {
            return false;
        }
        let mask = u32::MAX << (32 - len as u32);
        (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PROTO_TCP, PROTO_UDP};

    const NET: [u8; 4] = [10, 244, 0, 0];
    const SUB: [u8; 4] = [10, 244, 1, 0];

    fn w(src: [u8; 4], dst: [u8; 4]) -> bool {
        wanted(src, dst, SUB, 24, NET, 16)
    }

    #[test]
    fn flannels_rules() {
        assert!(w([10, 244, 1, 5], [203, 0, 113, 10]), "pod to outside");
        assert!(!w([10, 244, 1, 5], [10, 244, 2, 7]), "pod to pod");
        assert!(
            !w([10, 244, 1, 5], [10, 244, 1, 1]),
            "to the cluster network"
        );
        assert!(!w([10, 244, 1, 5], [224, 0, 0, 251]), "multicast");
        assert!(!w([10, 244, 1, 5], [239, 1, 2, 3]), "multicast");
        assert!(w([10, 244, 1, 5], [240, 0, 0, 1]), "not multicast");
        assert!(!w([192, 168, 0, 1], [203, 0, 113, 10]), "the node's own");
        assert!(!w([10, 244, 2, 5], [203, 0, 113, 10]), "another node's pod");
    }

    #[test]
    fn keys_are_inverse() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
            let fwd = CtKey {
                saddr: [10, 244, 1, 5],
                daddr: [203, 0, 113, 10],
                sport: 40000u16.to_be_bytes(),
                dport: if proto == PROTO_ICMP {
                    [0; 2]
                } else {
                    80u16.to_be_bytes()
                },
                proto,
                _pad: [0; 3],
            };
            let nat = 61_234u16.to_be_bytes();
            let rev = reply_key(&fwd, [192, 168, 0, 1], nat);
            assert_eq!(
                (rev.saddr, rev.daddr, rev.sport, rev.dport),
                (fwd.daddr, [192, 168, 0, 1], fwd.dport, nat)
            );
            let r = MasqRev {
                pod: fwd.saddr,
                pod_port: fwd.sport,
                _pad: [0; 2],
            };
            assert_eq!(forward_key(&rev, &r), fwd);
        }
    }

    #[test]
    fn ports_wrap_inside_the_range() {
        assert_eq!(port_at(61_000, 61_003, 0, 0), 61_000);
        assert_eq!(port_at(61_000, 61_003, 2, 1), 61_003);
        assert_eq!(port_at(61_000, 61_003, 2, 2), 61_000);
        assert_eq!(port_at(61_000, 61_003, u32::MAX, 0), 61_003);
        // Every port of a small range within ALLOC_TRIES tries.
        let mut seen = [false; 4];
        for i in 0..ALLOC_TRIES {
            seen[(port_at(61_000, 61_003, 12345, i) - 61_000) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(port_at(65_535, 65_535, 7, 3), 65_535);
        assert_eq!(
            port_at(1, 65_535, u32::MAX, 1),
            1 + (u32::MAX % 65_535) as u16 + 1
        );
        assert_eq!(port_at(9, 3, 5, 5), 9, "reversed: the first port only");
    }
}
