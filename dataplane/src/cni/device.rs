//! The pod device: a veth or netkit pair with one end on the host (named
//! from the attachment, see [`host_ifname`]) and the other in the pod as
//! `CNI_IFNAME`.
//!
//! The pair is created with the pod end directly in the pod's namespace
//! (`IFLA_NET_NS_FD` in the peer's attributes), so the pod-side name never
//! exists on the host, where it could clash. Deleting either end deletes
//! the pair, and the pair goes with the pod's namespace too.

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::link::{
        InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    },
};

use super::{
    error::{CniError, CniResult},
    netkit,
    netns::Netns,
    proto::{Mac, PodDevice},
};

/// Prefix of host-side device names.
pub const HOST_PREFIX: &str = "dp";

/// A link as the plugin needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_INFO_KIND` ("veth", "netkit", ...).
    pub kind: Option<String>,
}

/// The host-side name of an attachment's device: `dp` and 12 hex digits of
/// a 64-bit FNV-1a hash of `container_id`, a NUL and `ifname` (14 bytes,
/// under the kernel's 15). Stable across processes and releases, so DEL
/// and GC find the device from the attachment alone.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    format!("{HOST_PREFIX}{:012x}", h >> 16)
}

/// The positive errno of a netlink error reply.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().saturating_abs()),
        _ => None,
    }
}

fn link_from_msg(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mac = Mac::default();
    let mut mtu = 0;
    let mut kind = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => {
                if let Ok(m) = <[u8; 6]>::try_from(a.as_slice()) {
                    mac = Mac(m);
                }
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(Link {
        name: name?,
        ifindex: msg.header.index,
        mac,
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind,
    })
}

/// The link called `name`, or `None`.
pub async fn link_by_name(nl: &Handle, name: &str) -> CniResult<Option<Link>> {
    let mut links = nl.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(link_from_msg(&msg)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(CniError::internal(format!("looking up link {name}: {e}"))),
    }
}

/// The link with index `ifindex`, or `None`.
pub async fn link_by_index(nl: &Handle, ifindex: u32) -> CniResult<Option<Link>> {
    let mut links = nl.link().get().match_index(ifindex).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(link_from_msg(&msg)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(CniError::internal(format!(
            "looking up link {ifindex}: {e}"
        ))),
    }
}

/// The `RTM_NEWLINK` message for a veth pair, peer in `peer_netns`.
fn veth_message(
    host: &str,
    pod: &str,
    peer_netns: std::os::fd::BorrowedFd<'_>,
    mtu: Option<u32>,
) -> LinkMessage {
    use std::os::fd::AsRawFd;
    let mut peer = LinkMessage::default();
    peer.attributes.push(LinkAttribute::IfName(pod.to_string()));
    peer.attributes
        .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(host.to_string()));
    if let Some(mtu) = mtu {
        peer.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    msg
}

/// The two ends of a pod device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub host: Link,
    pub pod: Link,
}

/// Creates the pair (host end `host_name` here, pod end `pod_name` in
/// `pod_ns`), brings both up and returns them.
pub async fn create_pair(
    host_nl: &Handle,
    pod_nl: &Handle,
    pod_ns: &Netns,
    device: PodDevice,
    host_name: &str,
    pod_name: &str,
    mtu: Option<u32>,
) -> CniResult<Pair> {
    let msg = match device {
        PodDevice::Veth => veth_message(host_name, pod_name, pod_ns.fd(), mtu),
        PodDevice::Netkit => netkit::pair_message(host_name, pod_name, pod_ns.fd(), mtu),
    };
    if let Err(e) = host_nl.link().add(msg).execute().await {
        let hint = match (device, errno(&e)) {
            (PodDevice::Netkit, Some(libc::EOPNOTSUPP)) => {
                " (netkit needs Linux 6.7 or later built with CONFIG_NETKIT)"
            }
            (_, Some(libc::EEXIST)) => " (a device of that name exists)",
            _ => "",
        };
        return Err(CniError::internal(format!(
            "creating the {device} pair {host_name} (host) / {pod_name} (in {}): {e}{hint}",
            pod_ns.path.display()
        )));
    }
    let host = link_by_name(host_nl, host_name).await?.ok_or_else(|| {
        CniError::internal(format!("{host_name} vanished right after its creation"))
    })?;
    let pod = link_by_name(pod_nl, pod_name).await?.ok_or_else(|| {
        CniError::internal(format!(
            "{pod_name} is not in {} after creating the pair",
            pod_ns.path.display()
        ))
    })?;
    set_up(host_nl, &host).await?;
    set_up(pod_nl, &pod).await?;
    Ok(Pair {
        host: Link { up: true, ..host },
        pod: Link { up: true, ..pod },
    })
}

async fn set_up(nl: &Handle, link: &Link) -> CniResult<()> {
    nl.link()
        .change(LinkUnspec::new_with_index(link.ifindex).up().build())
        .execute()
        .await
        .map_err(|e| CniError::internal(format!("setting {} up: {e}", link.name)))
}

/// Deletes the link called `name` if there is one; `true` if it was there.
pub async fn delete_by_name(nl: &Handle, name: &str) -> CniResult<bool> {
    let Some(link) = link_by_name(nl, name).await? else {
        return Ok(false);
    };
    match nl.link().del(link.ifindex).execute().await {
        Ok(()) => Ok(true),
        // Gone meanwhile (its peer's namespace went away).
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(CniError::internal(format!("deleting {name}: {e}"))),
    }
}

/// Whether this kernel can make netkit pairs (`CONFIG_NETKIT`, Linux 6.7+;
/// the version alone does not tell: a 6.18 kernel may be built without
/// it). Creates a throw-away pair with the same request ADD sends, and
/// deletes it; `nl` must belong to the calling thread's namespace, where
/// both ends go. For `--pod-device auto`.
pub async fn netkit_available(nl: &Handle) -> CniResult<bool> {
    let ns = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| CniError::internal(format!("opening /proc/thread-self/ns/net: {e}")))?;
    let tag = format!("{:x}", std::process::id() & 0xff_ffff);
    let (primary, peer) = (format!("dpnk{tag}a"), format!("dpnk{tag}b"));
    let msg = netkit::pair_message(&primary, &peer, std::os::fd::AsFd::as_fd(&ns), None);
    match nl.link().add(msg).execute().await {
        Ok(()) => {
            delete_by_name(nl, &primary).await?;
            Ok(true)
        }
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(CniError::internal(format!("probing for netkit: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rtnetlink::packet_core::{Emitable, Parseable};

    use super::*;
    use crate::cni::env::IFNAME_MAX;

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_ifname("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.len() <= IFNAME_MAX);
        assert!(a.starts_with("dp"));
        assert!(a[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        // The same attachment always gets the same name (a pinned value:
        // DEL of a pod added by an earlier build must find its device;
        // computed independently with a few lines of Python).
        assert_eq!(host_ifname("c1", "eth0"), host_ifname("c1", "eth0"));
        assert_eq!(host_ifname("c1", "eth0"), "dpf53f02b3bfe9");
        let mut names = std::collections::HashSet::new();
        for id in ["c1", "c2", "c1e", "c"] {
            for ifname in ["eth0", "eth1", "th0"] {
                assert!(names.insert(host_ifname(id, ifname)), "{id}/{ifname}");
            }
        }
    }

    #[test]
    fn veth_message_puts_the_peer_in_the_pod() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let msg = veth_message("dpabc", "eth0", f.as_fd(), Some(1400));
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        let back = LinkMessage::parse(&bytes[..]).unwrap();
        assert!(
            back.attributes
                .contains(&LinkAttribute::IfName("dpabc".into()))
        );
        assert!(back.attributes.contains(&LinkAttribute::Mtu(1400)));
        let peer = back
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .expect("veth peer");
        use std::os::fd::AsRawFd;
        assert!(
            peer.attributes
                .contains(&LinkAttribute::IfName("eth0".into()))
        );
        assert!(peer.attributes.contains(&LinkAttribute::Mtu(1400)));
        assert!(
            peer.attributes
                .contains(&LinkAttribute::NetNsFd(f.as_raw_fd()))
        );
    }
}
