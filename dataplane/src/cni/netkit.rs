//! The `RTM_NEWLINK` request that creates a netkit pair.
//!
//! netkit (Linux 6.7+) is a veth-like pair whose transmit path runs BPF
//! programs directly. The request carries `IFLA_INFO_KIND "netkit"` and an
//! `IFLA_INFO_DATA` that this module encodes itself, attribute by
//! attribute, with the numbers of the kernel's UAPI header
//! `include/uapi/linux/if_link.h` ("netkit section"; read from a Linux
//! tree's copy of that header, UbuntuAsahi/linux at 8de47211, since the
//! installed linux-libc-dev 6.1 predates netkit and the stored
//! torvalds/linux copy is older still):
//!
//! ```c
//! enum netkit_action { NETKIT_NEXT = -1, NETKIT_PASS = 0, NETKIT_DROP = 2, NETKIT_REDIRECT = 7 };
//! enum netkit_mode { NETKIT_L2, NETKIT_L3 };
//! enum { IFLA_NETKIT_UNSPEC, IFLA_NETKIT_PEER_INFO, IFLA_NETKIT_PRIMARY,
//!        IFLA_NETKIT_POLICY, IFLA_NETKIT_PEER_POLICY, IFLA_NETKIT_MODE,
//!        IFLA_NETKIT_SCRUB, IFLA_NETKIT_PEER_SCRUB, IFLA_NETKIT_HEADROOM,
//!        IFLA_NETKIT_TAILROOM, __IFLA_NETKIT_MAX };
//! ```
//!
//! `IFLA_NETKIT_PEER_INFO` nests a whole `ifinfomsg` plus link attributes
//! for the peer (its name, netns, MTU), like `VETH_INFO_PEER`. The device
//! named in the outer message is the primary one: it stays on the host and
//! is where the agent attaches programs (`BPF_NETKIT_PRIMARY` for its own
//! transmit path, `BPF_NETKIT_PEER` for the pod's). The pair is made in L2
//! mode, so both ends have MACs and the pod sees an Ethernet device, and
//! with policy "pass" on both ends, so it forwards like a veth until
//! programs are attached. The unit tests decode the emitted bytes with
//! netlink-packet-route's own netkit parser, an independent check of the
//! numbers.

use std::os::fd::{AsRawFd, BorrowedFd};

use rtnetlink::{
    packet_core::Emitable,
    packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};

/// `IFLA_NETKIT_PEER_INFO`: the peer's `ifinfomsg` and attributes.
pub const IFLA_NETKIT_PEER_INFO: u16 = 1;
/// `IFLA_NETKIT_PRIMARY`: u8, reported by the kernel, not set by us.
pub const IFLA_NETKIT_PRIMARY: u16 = 2;
/// `IFLA_NETKIT_POLICY`: u32 `netkit_action` of the primary.
pub const IFLA_NETKIT_POLICY: u16 = 3;
/// `IFLA_NETKIT_PEER_POLICY`: u32 `netkit_action` of the peer.
pub const IFLA_NETKIT_PEER_POLICY: u16 = 4;
/// `IFLA_NETKIT_MODE`: u32 `netkit_mode`.
pub const IFLA_NETKIT_MODE: u16 = 5;

/// `NETKIT_L2`: Ethernet devices with MACs (the default is L3).
pub const NETKIT_L2: u32 = 0;
/// `NETKIT_PASS` (= `TC_ACT_OK`): forward when no program decides.
pub const NETKIT_PASS: u32 = 0;

/// One netlink attribute: `{u16 len, u16 type}`, value, padding to 4.
fn push_nla(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = u16::try_from(4 + value.len()).expect("netlink attribute longer than 64 KiB");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The `RTM_NEWLINK` message for a netkit pair: `primary` here, `peer` in
/// the namespace `peer_netns`, both with `mtu` if given.
pub fn pair_message(
    primary: &str,
    peer: &str,
    peer_netns: BorrowedFd<'_>,
    mtu: Option<u32>,
) -> LinkMessage {
    let mut peer_msg = LinkMessage::default();
    peer_msg
        .attributes
        .push(LinkAttribute::IfName(peer.to_string()));
    peer_msg
        .attributes
        .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
    if let Some(mtu) = mtu {
        peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    let mut peer_bytes = vec![0u8; peer_msg.buffer_len()];
    peer_msg.emit(&mut peer_bytes);

    let mut data = Vec::new();
    push_nla(&mut data, IFLA_NETKIT_PEER_INFO, &peer_bytes);
    push_nla(&mut data, IFLA_NETKIT_MODE, &NETKIT_L2.to_ne_bytes());
    push_nla(&mut data, IFLA_NETKIT_POLICY, &NETKIT_PASS.to_ne_bytes());
    push_nla(
        &mut data,
        IFLA_NETKIT_PEER_POLICY,
        &NETKIT_PASS.to_ne_bytes(),
    );

    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(primary.to_string()));
    if let Some(mtu) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Netkit),
        LinkInfo::Data(InfoData::Other(data)),
    ]));
    msg
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rtnetlink::{
        packet_core::Parseable,
        packet_route::link::{InfoNetkit, NetkitMode, NetkitPolicy},
    };

    use super::*;

    /// Emits `msg` and parses it back as the kernel's bytes would be.
    fn round_trip(msg: &LinkMessage) -> (Vec<u8>, LinkMessage) {
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        let back = LinkMessage::parse(&bytes[..]).expect("parse back");
        (bytes, back)
    }

    #[test]
    fn attributes_have_the_kernels_numbers() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let msg = pair_message("dp0123456789ab", "eth0", f.as_fd(), Some(1450));
        let (_, back) = round_trip(&msg);

        assert!(
            back.attributes
                .contains(&LinkAttribute::IfName("dp0123456789ab".into()))
        );
        assert!(back.attributes.contains(&LinkAttribute::Mtu(1450)));
        let infos = back
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i),
                _ => None,
            })
            .expect("IFLA_LINKINFO");
        assert!(infos.contains(&LinkInfo::Kind(InfoKind::Netkit)));
        // netlink-packet-route decodes IFLA_INFO_DATA of kind netkit with
        // its own attribute table: our numbers must mean the same to it.
        let data = infos
            .iter()
            .find_map(|i| match i {
                LinkInfo::Data(InfoData::Netkit(d)) => Some(d),
                _ => None,
            })
            .expect("IFLA_INFO_DATA decoded as netkit");
        assert!(data.contains(&InfoNetkit::Mode(NetkitMode::L2)), "{data:?}");
        assert!(
            data.contains(&InfoNetkit::Policy(NetkitPolicy::Pass)),
            "{data:?}"
        );
        assert!(
            data.contains(&InfoNetkit::PeerPolicy(NetkitPolicy::Pass)),
            "{data:?}"
        );
        let peer = data
            .iter()
            .find_map(|d| match d {
                InfoNetkit::Peer(p) => Some(p),
                _ => None,
            })
            .expect("peer info");
        assert!(
            peer.attributes
                .contains(&LinkAttribute::IfName("eth0".into()))
        );
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1450)));
        assert!(
            peer.attributes
                .contains(&LinkAttribute::NetNsFd(f.as_raw_fd())),
            "{peer:?}"
        );
        // Nothing the kernel would reject: PRIMARY is read-only.
        assert!(!data.iter().any(|d| matches!(d, InfoNetkit::Primary(_))));
        assert_eq!(data.len(), 4, "{data:?}");
    }

    #[test]
    fn wire_layout() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let msg = pair_message("nk0", "p", f.as_fd(), None);
        let (bytes, _) = round_trip(&msg);
        // ifinfomsg (16 bytes), then attributes: IFLA_IFNAME (3) "nk0\0",
        // IFLA_LINKINFO (18) { IFLA_INFO_KIND (1) "netkit\0",
        // IFLA_INFO_DATA (2) { PEER_INFO (1) ..., MODE (5) 0, ... } }.
        let nla = |at: usize| {
            (
                u16::from_ne_bytes([bytes[at], bytes[at + 1]]) as usize,
                u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]),
            )
        };
        let mut at = 16;
        assert_eq!(nla(at), (8, 3));
        assert_eq!(&bytes[at + 4..at + 8], b"nk0\0");
        at += 8;
        let (linkinfo_len, linkinfo) = nla(at);
        assert_eq!(linkinfo, 18);
        assert_eq!(at + linkinfo_len, bytes.len());
        at += 4;
        assert_eq!(nla(at), (11, 1));
        assert_eq!(&bytes[at + 4..at + 11], b"netkit\0");
        at += 12;
        let (data_len, data) = nla(at);
        assert_eq!(data, 2);
        let end = at + data_len;
        at += 4;
        let mut seen = Vec::new();
        while at < end {
            let (len, kind) = nla(at);
            if kind != IFLA_NETKIT_PEER_INFO {
                assert_eq!(len, 8);
                seen.push((
                    kind,
                    u32::from_ne_bytes(bytes[at + 4..at + 8].try_into().unwrap()),
                ));
            }
            at += len.next_multiple_of(4);
        }
        assert_eq!(at, end);
        assert_eq!(seen, vec![(5, 0), (3, 0), (4, 0)]);
    }
}
