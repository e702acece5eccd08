//! Host plumbing over rtnetlink: links, IPv4 addresses, the default route,
//! the pod bridge, sysctls and link-change notifications.
//!
//! The agent runs inside whatever network namespace it was started in (the
//! tests start several agents, each under `nsenter --net=...`). A netlink
//! socket talks to the namespace its creating thread was in when the socket
//! was opened, so everything here goes through netlink of the *current*
//! namespace. Nothing reads `/sys/class/net`: sysfs shows the namespace it
//! was mounted in, which is not necessarily ours.
//!
//! The kernel's messages are turned into plain values ([`LinkInfo`],
//! [`Ipv4Net`], [`RouteSummary`]) by pure functions so that the decoding
//! and the decisions made on it (which route is the default one, which
//! addresses are stale) can be unit-tested without privileges.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Component, Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkBridge, LinkDummy, LinkMessageBuilder, LinkUnspec, MulticastGroup,
    RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage},
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType},
    },
};
use tokio::sync::mpsc;

/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
const IFNAMSIZ_MAX: usize = 15;

/// Where sysctls live; `/proc/sys/net` follows the netns of the caller.
const PROC_SYS: &str = "/proc/sys";

/// A link as the agent needs to see it, decoded from an `RTM_NEWLINK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// All zeros for links without an Ethernet address (lo has zeros too,
    /// tunnels such as ipip have none or a 4-byte one).
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Administratively up (`IFF_UP`), not carrier: a bridge without ports
    /// is up but has no carrier, and that is what the agent asks for.
    pub up: bool,
    /// Ifindex of the controller (bridge, bond, ...) this link is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND`: "veth", "bridge", "vxlan", ...; `None` for physical
    /// NICs and lo.
    pub kind: Option<String>,
}

/// A connection to rtnetlink of the network namespace that was current when
/// [`Netlink::new`] ran.
///
/// Cloning shares the connection; its task ends once the last clone is
/// dropped.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the rtnetlink socket and spawns its connection task on the
    /// current tokio runtime (an error, not a panic, outside one).
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current()
            .context("Netlink::new must be called inside a tokio runtime")?;
        // Unsolicited messages are not wanted on this socket (it joins no
        // multicast group); dropping their receiver makes the connection
        // discard them.
        let (conn, handle, _unsolicited) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        rt.spawn(conn);
        Ok(Self { handle })
    }

    /// The link called `name`, or `None` if there is no such link here.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
        validate_ifname(name)?;
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(Some(msg)) => link_info_from_msg(&msg)
                .map(Some)
                .with_context(|| format!("decoding link {name:?}")),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name:?}")),
        }
    }

    /// The link with index `ifindex`, or `None` if there is no such link
    /// here (0 is never a valid index).
    pub async fn link_by_index(&self, ifindex: u32) -> Result<Option<LinkInfo>> {
        if ifindex == 0 {
            return Ok(None);
        }
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        match links.try_next().await {
            Ok(Some(msg)) => link_info_from_msg(&msg)
                .map(Some)
                .with_context(|| format!("decoding link with ifindex {ifindex}")),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link with ifindex {ifindex}")),
        }
    }

    /// Every link in the namespace. Messages that cannot be decoded are
    /// skipped with a warning rather than failing the listing: one odd link
    /// must not stop the agent from seeing the others.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .context("dumping links")?;
        Ok(msgs
            .iter()
            .filter_map(|m| match link_info_from_msg(m) {
                Ok(l) => Some(l),
                Err(e) => {
                    log::warn!("skipping link with ifindex {}: {e:#}", m.header.index);
                    None
                }
            })
            .collect())
    }

    /// The interface of the IPv4 default route (main table, 0.0.0.0/0), the
    /// one flannel would pick as the public interface. With several default
    /// routes the one with the lowest metric wins, as in the kernel's lookup.
    /// `None` if there is no default route.
    pub async fn default_route_iface(&self) -> Result<Option<LinkInfo>> {
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .context("dumping IPv4 routes")?;
        let Some(oif) = pick_default_route_oif(routes.iter().map(RouteSummary::from_msg)) else {
            return Ok(None);
        };
        self.link_by_index(oif)
            .await
            .with_context(|| format!("looking up the default route's interface (ifindex {oif})"))
    }

    /// The IPv4 addresses of `ifindex` with their raw messages, which are
    /// what `RTM_DELADDR` wants back to remove one.
    async fn ipv4_addr_msgs(&self, ifindex: u32) -> Result<Vec<(Ipv4Net, AddressMessage)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("dumping addresses of ifindex {ifindex}"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| ipv4_net_of(&m).map(|net| (net, m)))
            .collect())
    }

    /// The IPv4 addresses (with prefix length) of link `ifindex`.
    pub async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<Ipv4Net>> {
        Ok(self
            .ipv4_addr_msgs(ifindex)
            .await?
            .into_iter()
            .map(|(net, _)| net)
            .collect())
    }

    /// Create the bridge if missing, set its MTU, give it `addr` (add if
    /// missing; remove other IPv4 addresses in the same cluster network
    /// `network` from it, i.e. a stale gateway from an old subnet), bring it
    /// up. Idempotent. Returns its LinkInfo.
    ///
    /// Addresses outside `network` are left alone: they are not ours. Stale
    /// addresses are removed before `addr` is added, because deleting a
    /// primary address also deletes the secondaries of its subnet, which
    /// `addr` could otherwise have become.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        addr: Ipv4Net,
        network: Ipv4Net,
        mtu: u32,
    ) -> Result<LinkInfo> {
        validate_ifname(name)?;
        if !network.contains(&addr.addr()) {
            log::warn!("bridge {name}: address {addr} is outside the cluster network {network}");
        }

        let link = match self.link_by_name(name).await? {
            Some(link) => link,
            None => {
                log::info!("creating bridge {name}");
                let created = self
                    .handle
                    .link()
                    .add(LinkBridge::new(name).mtu(mtu).build())
                    .execute()
                    .await;
                match created {
                    Ok(()) => {}
                    // Someone else created it between our lookup and now.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).with_context(|| format!("creating bridge {name}")),
                }
                self.link_by_name(name)
                    .await?
                    .with_context(|| format!("bridge {name} vanished right after its creation"))?
            }
        };
        if link.kind.as_deref() != Some("bridge") {
            bail!(
                "{name} exists but is a {} link, not a bridge",
                link.kind.as_deref().unwrap_or("physical/untyped")
            );
        }
        let ifindex = link.ifindex;

        if link.mtu != mtu {
            log::info!("bridge {name}: setting MTU {} -> {mtu}", link.mtu);
            self.handle
                .link()
                .change(LinkUnspec::new_with_index(ifindex).mtu(mtu).build())
                .execute()
                .await
                .with_context(|| format!("setting MTU {mtu} on bridge {name}"))?;
        }

        let existing = self.ipv4_addr_msgs(ifindex).await?;
        let nets: Vec<Ipv4Net> = existing.iter().map(|(net, _)| *net).collect();
        let plan = plan_bridge_addrs(&nets, addr, network);
        for (net, msg) in existing {
            if !plan.remove.contains(&net) {
                continue;
            }
            log::info!("bridge {name}: removing stale address {net}");
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                // Already gone, e.g. taken with a deleted primary.
                Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("removing stale address {net} from bridge {name}")
                    });
                }
            }
        }
        if plan.add {
            log::info!("bridge {name}: adding address {addr}");
            match self
                .handle
                .address()
                .add(ifindex, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("adding address {addr} to bridge {name}"));
                }
            }
        }

        if !link.up {
            self.set_link_up(ifindex)
                .await
                .with_context(|| format!("bringing bridge {name} up"))?;
        }

        self.link_by_index(ifindex).await?.with_context(|| {
            format!("bridge {name} (ifindex {ifindex}) vanished while being configured")
        })
    }

    /// The host device `name` (created if missing): a dummy, or where the
    /// kernel has no dummy driver (`CONFIG_DUMMY` off: EOPNOTSUPP) an ifb,
    /// which behaves alike for this use (Ethernet, no ARP, drops what it
    /// is given to send); with this MTU and MAC, up. A link of that name of
    /// another kind is an error.
    pub async fn ensure_host_device(&self, name: &str, mtu: u32, mac: [u8; 6]) -> Result<LinkInfo> {
        validate_ifname(name)?;
        let link = match self.link_by_name(name).await? {
            Some(link) => link,
            None => {
                let mut kind = "dummy";
                let mut created = self
                    .handle
                    .link()
                    .add(LinkDummy::new(name).mtu(mtu).address(mac.to_vec()).build())
                    .execute()
                    .await;
                if matches!(&created, Err(e) if errno(e) == Some(libc::EOPNOTSUPP)) {
                    kind = "ifb";
                    let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Ifb)
                        .name(name.to_owned())
                        .mtu(mtu)
                        .address(mac.to_vec())
                        .build();
                    created = self.handle.link().add(msg).execute().await;
                }
                match created {
                    Ok(()) => log::info!("created {kind} device {name}"),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e).with_context(|| format!("creating {kind} {name}")),
                }
                self.link_by_name(name)
                    .await?
                    .with_context(|| format!("{name} vanished right after its creation"))?
            }
        };
        if !is_host_device_kind(link.kind.as_deref()) {
            bail!(
                "{name} exists but is a {} link, not a dummy or ifb",
                link.kind.as_deref().unwrap_or("physical/untyped")
            );
        }
        let ifindex = link.ifindex;
        if link.mtu != mtu {
            self.handle
                .link()
                .change(LinkUnspec::new_with_index(ifindex).mtu(mtu).build())
                .execute()
                .await
                .with_context(|| format!("setting MTU {mtu} on {name}"))?;
        }
        if link.mac != mac {
            self.set_link_mac(ifindex, mac).await?;
        }
        if !link.up {
            self.set_link_up(ifindex)
                .await
                .with_context(|| format!("bringing {name} up"))?;
        }
        self.link_by_index(ifindex)
            .await?
            .with_context(|| format!("{name} (ifindex {ifindex}) vanished while being configured"))
    }

    /// `ip route replace DST dev IFINDEX src SRC` (scope link, main table).
    pub async fn replace_route(&self, dst: Ipv4Net, ifindex: u32, src: Ipv4Addr) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(ifindex)
            .pref_source(src)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("routing {dst} through ifindex {ifindex} from {src}"))
    }

    /// Ports enslaved to the bridge (links whose master is bridge_ifindex).
    pub async fn bridge_ports(&self, bridge_ifindex: u32) -> Result<Vec<LinkInfo>> {
        let links = self
            .links()
            .await
            .with_context(|| format!("listing ports of bridge ifindex {bridge_ifindex}"))?;
        Ok(ports_of(links, bridge_ifindex))
    }

    /// Deletes link `ifindex` (`ip link del`).
    pub async fn delete_link(&self, ifindex: u32) -> Result<()> {
        self.handle
            .link()
            .del(ifindex)
            .execute()
            .await
            .with_context(|| format!("deleting link with ifindex {ifindex}"))
    }

    /// Sets `IFF_UP` on link `ifindex` (`ip link set dev X up`).
    pub async fn set_link_up(&self, ifindex: u32) -> Result<()> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await
            .with_context(|| format!("setting link with ifindex {ifindex} up"))
    }

    /// Sets a link's MAC address. On a bridge this also pins the address:
    /// otherwise the kernel makes the bridge follow its lowest port MAC,
    /// which changes as pods come and go.
    pub async fn set_link_mac(&self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        self.handle
            .link()
            .change(
                LinkUnspec::new_with_index(ifindex)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("setting the MAC of link {ifindex}"))
    }
}

/// Whether a link of this kind can be the host device (and `dataplane
/// uninstall` may delete it).
pub fn is_host_device_kind(kind: Option<&str>) -> bool {
    matches!(kind, Some("dummy" | "ifb"))
}

/// Subscribes to RTNLGRP_LINK (new/del link) notifications on a separate
/// netlink socket; yields () on every link event. The agent re-lists bridge
/// ports on each.
///
/// Events are coalesced: the channel holds one pending `()`, and further
/// events while it is pending are dropped, since a single re-listing after
/// them covers them all. A socket overrun (the kernel dropped notifications
/// because we were slow) also yields `()`, for the same reason. Subscribe
/// *before* the initial listing so nothing falls between the two.
///
/// The receiver yields `None` if the socket dies; the agent should then
/// subscribe again. Dropping the receiver stops the background tasks.
/// Must be called inside a tokio runtime; the socket belongs to the netns
/// that is current at the call.
pub fn link_events() -> Result<mpsc::Receiver<()>> {
    let rt = tokio::runtime::Handle::try_current()
        .context("link_events must be called inside a tokio runtime")?;
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("subscribing to rtnetlink link notifications (RTNLGRP_LINK)")?;
    let (tx, rx) = mpsc::channel(1);
    rt.spawn(conn);
    rt.spawn(async move {
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some((msg, _)) = msg else {
                        log::warn!("link notification socket closed");
                        return;
                    };
                    if !is_link_event(&msg.payload) {
                        continue;
                    }
                    match tx.try_send(()) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                        Err(mpsc::error::TrySendError::Closed(())) => return,
                    }
                }
                // Stop (and drop `messages`, which shuts the connection down)
                // as soon as the receiver goes, not at the next event.
                () = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}

/// Writes /proc/sys/net/... values; these are per-netns in /proc/sys/net
/// (procfs follows the caller's netns), so this is fine.
///
/// `path` is relative to /proc/sys with slashes ("net/ipv4/ip_forward"), not
/// dots, since interface names may contain dots. Nothing is written if the
/// value already matches (compared field by field, as the kernel prints
/// multi-field values with tabs), which keeps restarts quiet and avoids
/// side effects some sysctls have on every write.
pub fn set_sysctl(path: &str, value: &str) -> Result<()> {
    let full = sysctl_path(path)?;
    // Some sysctls are write-only; if reading fails, just write.
    if let Ok(current) = std::fs::read_to_string(&full)
        && sysctl_value_eq(&current, value)
    {
        return Ok(());
    }
    std::fs::write(&full, value)
        .with_context(|| format!("writing {value:?} to {}", full.display()))?;
    log::debug!("sysctl {path} = {value}");
    Ok(())
}

/// The positive errno of a netlink error reply, if `e` is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().saturating_abs()),
        _ => None,
    }
}

/// Rejects names the kernel would reject anyway, with a clearer message
/// than the EINVAL/ERANGE it would give.
fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > IFNAMSIZ_MAX
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        bail!("invalid interface name {name:?}");
    }
    Ok(())
}

/// Decodes an `RTM_NEWLINK` into a [`LinkInfo`]; only the name is
/// mandatory, as every link has one.
fn link_info_from_msg(msg: &LinkMessage) -> Result<LinkInfo> {
    let mut name = None;
    let mut mac = [0u8; 6];
    let mut mtu = 0;
    let mut master = None;
    let mut kind = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = mac_from_bytes(a),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Controller(c) if *c != 0 => master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    NlLinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let Some(name) = name else {
        bail!("link message for ifindex {} has no name", msg.header.index);
    };
    Ok(LinkInfo {
        name,
        ifindex: msg.header.index,
        mac,
        mtu,
        up: msg.header.flags.contains(LinkFlags::Up),
        master,
        kind,
    })
}

/// An Ethernet address, or zeros for hardware addresses of another length.
fn mac_from_bytes(bytes: &[u8]) -> [u8; 6] {
    <[u8; 6]>::try_from(bytes).unwrap_or_default()
}

/// The IPv4 address and prefix of an `RTM_NEWADDR`; `None` for other
/// families. `IFA_LOCAL` is the interface's own address (`IFA_ADDRESS` is
/// the peer on point-to-point links), so it is preferred.
fn ipv4_net_of(msg: &AddressMessage) -> Option<Ipv4Net> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let pick = |want_local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) if want_local => Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) if !want_local => Some(*ip),
            _ => None,
        })
    };
    let ip = pick(true).or_else(|| pick(false))?;
    Ipv4Net::new(ip, msg.header.prefix_len).ok()
}

/// What [`Netlink::ensure_bridge`] must change on the bridge's addresses.
#[derive(Debug, PartialEq, Eq)]
struct AddrPlan {
    remove: Vec<Ipv4Net>,
    add: bool,
}

/// Addresses in `network` other than `want` are stale gateways (e.g. of an
/// expired lease); the same IP with another prefix length is stale too.
fn plan_bridge_addrs(existing: &[Ipv4Net], want: Ipv4Net, network: Ipv4Net) -> AddrPlan {
    AddrPlan {
        remove: existing
            .iter()
            .filter(|a| **a != want && network.contains(&a.addr()))
            .copied()
            .collect(),
        add: !existing.contains(&want),
    }
}

/// The links enslaved to `bridge_ifindex`.
pub fn ports_of(links: Vec<LinkInfo>, bridge_ifindex: u32) -> Vec<LinkInfo> {
    links
        .into_iter()
        .filter(|l| l.master == Some(bridge_ifindex))
        .collect()
}

/// The parts of a route that decide whether it is the default route.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteSummary {
    family: AddressFamily,
    table: u32,
    dst_len: u8,
    kind: RouteType,
    oif: Option<u32>,
    metric: u32,
}

impl RouteSummary {
    fn from_msg(msg: &RouteMessage) -> Self {
        // Tables above 255 only fit in RTA_TABLE; the header then says 252
        // (RT_TABLE_COMPAT), so the attribute wins.
        let mut table = u32::from(msg.header.table);
        let mut oif = None;
        let mut multipath_oif = None;
        let mut metric = 0;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => metric = *p,
                RouteAttribute::MultiPath(hops) => {
                    multipath_oif = hops.iter().map(|h| h.interface_index).find(|i| *i != 0);
                }
                _ => {}
            }
        }
        Self {
            family: msg.header.address_family,
            table,
            dst_len: msg.header.destination_prefix_length,
            kind: msg.header.kind,
            oif: oif.or(multipath_oif),
            metric,
        }
    }
}

/// The output interface of the IPv4 default route of the main table with
/// the lowest metric (the first one on ties, like the kernel).
fn pick_default_route_oif(routes: impl IntoIterator<Item = RouteSummary>) -> Option<u32> {
    routes
        .into_iter()
        .filter(|r| {
            r.family == AddressFamily::Inet
                && r.table == u32::from(RouteHeader::RT_TABLE_MAIN)
                && r.dst_len == 0
                && r.kind == RouteType::Unicast
        })
        .filter_map(|r| r.oif.map(|oif| (r.metric, oif)))
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

/// Whether a message on the RTNLGRP_LINK socket calls for a re-listing.
fn is_link_event(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    matches!(
        payload,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_)
        ) | NetlinkPayload::Overrun(_)
    )
}

/// `/proc/sys/<path>`, refusing anything that could escape /proc/sys.
fn sysctl_path(path: &str) -> Result<PathBuf> {
    let rel = Path::new(path);
    let ok = !path.is_empty()
        && !path.contains('\0')
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        bail!("invalid sysctl path {path:?}: want a relative path like \"net/ipv4/ip_forward\"");
    }
    Ok(Path::new(PROC_SYS).join(rel))
}

/// Sysctl values compared as the kernel parses them: whitespace-separated
/// fields, so "4096\t87380\n" equals "4096 87380".
fn sysctl_value_eq(current: &str, wanted: &str) -> bool {
    current.split_whitespace().eq(wanted.split_whitespace())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rtnetlink::{
        LinkVeth,
        packet_core::{DoneMessage, ErrorMessage, NetlinkMessage},
        packet_route::{
            link::InfoKind,
            route::{RouteAddress, RouteNextHop, RouteScope},
        },
    };

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test literal")
    }

    fn link_msg(index: u32, attrs: Vec<LinkAttribute>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes = attrs;
        m
    }

    #[test]
    fn decodes_link() {
        let mut m = link_msg(
            7,
            vec![
                LinkAttribute::IfName("veth1".into()),
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
                LinkAttribute::Mtu(1450),
                LinkAttribute::Controller(3),
                LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(InfoKind::Veth)]),
            ],
        );
        m.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        let l = link_info_from_msg(&m).expect("decodes");
        assert_eq!(
            l,
            LinkInfo {
                name: "veth1".into(),
                ifindex: 7,
                mac: [2, 0, 0, 0, 0, 9],
                mtu: 1450,
                up: true,
                master: Some(3),
                kind: Some("veth".into()),
            }
        );
    }

    #[test]
    fn decodes_minimal_link_and_rejects_nameless() {
        let l = link_info_from_msg(&link_msg(
            5,
            vec![
                LinkAttribute::IfName("ipip0".into()),
                LinkAttribute::Address(vec![0, 0, 0, 0]),
                LinkAttribute::Controller(0),
            ],
        ))
        .expect("decodes");
        assert_eq!(l.mac, [0; 6]);
        assert_eq!(l.master, None);
        assert_eq!(l.kind, None);
        assert!(!l.up);
        assert!(link_info_from_msg(&link_msg(5, vec![LinkAttribute::Mtu(1)])).is_err());
    }

    #[test]
    fn decodes_ipv4_addresses_only() {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = 24;
        m.attributes = vec![
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))),
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        ];
        assert_eq!(ipv4_net_of(&m), Some(net("10.0.0.1/24")));

        m.attributes
            .retain(|a| matches!(a, AddressAttribute::Address(_)));
        assert_eq!(ipv4_net_of(&m), Some(net("10.0.0.2/24")));

        m.header.prefix_len = 33;
        assert_eq!(ipv4_net_of(&m), None);

        let mut v6 = AddressMessage::default();
        v6.header.family = AddressFamily::Inet6;
        v6.header.prefix_len = 64;
        v6.attributes = vec![AddressAttribute::Address(
            "fe80::1".parse().expect("literal"),
        )];
        assert_eq!(ipv4_net_of(&v6), None);
    }

    #[test]
    fn plans_bridge_addresses() {
        let network = net("10.244.0.0/16");
        let want = net("10.244.3.1/24");
        assert_eq!(
            plan_bridge_addrs(&[], want, network),
            AddrPlan {
                remove: vec![],
                add: true
            }
        );
        assert_eq!(
            plan_bridge_addrs(&[want], want, network),
            AddrPlan {
                remove: vec![],
                add: false
            }
        );
        let existing = [
            net("10.244.9.1/24"),
            net("192.168.1.5/24"),
            want,
            net("10.244.3.1/16"),
        ];
        assert_eq!(
            plan_bridge_addrs(&existing, want, network),
            AddrPlan {
                remove: vec![net("10.244.9.1/24"), net("10.244.3.1/16")],
                add: false
            }
        );
    }

    #[test]
    fn filters_ports() {
        let mk = |ifindex, master| LinkInfo {
            name: format!("l{ifindex}"),
            ifindex,
            mac: [0; 6],
            mtu: 1500,
            up: true,
            master,
            kind: None,
        };
        let ports = ports_of(
            vec![mk(1, None), mk(2, Some(3)), mk(4, Some(9)), mk(5, Some(3))],
            3,
        );
        assert_eq!(ports.iter().map(|l| l.ifindex).collect::<Vec<_>>(), [2, 5]);
    }

    fn route(table: u8, dst_len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = table;
        m.header.destination_prefix_length = dst_len;
        m.header.kind = RouteType::Unicast;
        m.attributes = attrs;
        m
    }

    #[test]
    fn picks_default_route() {
        let main = RouteHeader::RT_TABLE_MAIN;
        let mut local = route(255, 0, vec![RouteAttribute::Oif(1)]);
        local.header.kind = RouteType::Local;
        let routes = [
            route(
                main,
                24,
                vec![
                    RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 0))),
                    RouteAttribute::Oif(2),
                ],
            ),
            local,
            // A VRF/other table default route must not count.
            route(100, 0, vec![RouteAttribute::Oif(3)]),
            route(
                252,
                0,
                vec![RouteAttribute::Table(1000), RouteAttribute::Oif(3)],
            ),
            route(
                main,
                0,
                vec![RouteAttribute::Oif(4), RouteAttribute::Priority(600)],
            ),
            route(
                main,
                0,
                vec![RouteAttribute::Oif(5), RouteAttribute::Priority(100)],
            ),
            route(
                main,
                0,
                vec![RouteAttribute::Oif(6), RouteAttribute::Priority(100)],
            ),
        ];
        let summaries: Vec<_> = routes.iter().map(RouteSummary::from_msg).collect();
        assert_eq!(summaries[3].table, 1000);
        assert_eq!(pick_default_route_oif(summaries.clone()), Some(5));
        assert_eq!(pick_default_route_oif(summaries[..4].to_vec()), None);

        let mut hop = RouteNextHop::default();
        hop.interface_index = 8;
        let ecmp = route(main, 0, vec![RouteAttribute::MultiPath(vec![hop])]);
        assert_eq!(
            pick_default_route_oif([RouteSummary::from_msg(&ecmp)]),
            Some(8)
        );
        let unreachable = {
            let mut r = route(main, 0, vec![]);
            r.header.kind = RouteType::Unreachable;
            r
        };
        assert_eq!(
            pick_default_route_oif([RouteSummary::from_msg(&unreachable)]),
            None
        );
    }

    #[test]
    fn classifies_link_events() {
        let new_link = NetlinkMessage::from(RouteNetlinkMessage::NewLink(LinkMessage::default()));
        assert!(is_link_event(&new_link.payload));
        let del_link = NetlinkMessage::from(RouteNetlinkMessage::DelLink(LinkMessage::default()));
        assert!(is_link_event(&del_link.payload));
        assert!(is_link_event(&NetlinkPayload::Overrun(vec![])));
        assert!(!is_link_event(
            &NetlinkPayload::Done(DoneMessage::default())
        ));
        assert!(!is_link_event(&NetlinkPayload::Error(
            ErrorMessage::default()
        )));
        let new_addr =
            NetlinkMessage::from(RouteNetlinkMessage::NewAddress(AddressMessage::default()));
        assert!(!is_link_event(&new_addr.payload));
    }

    #[test]
    fn validates_names_and_paths() {
        for ok in ["lo", "cni0", "eth0.100", "flannel.1", "abcdefghijklmno"] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "abcdefghijklmnop"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").expect("valid"),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "/etc/passwd",
            "net/../../etc/passwd",
            "./net/ipv4",
            "net/\0",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
        assert!(sysctl_value_eq("1\n", "1"));
        assert!(sysctl_value_eq(
            "4096\t87380\t6291456\n",
            "4096 87380 6291456"
        ));
        assert!(!sysctl_value_eq("0\n", "1"));
        assert!(!sysctl_value_eq("1 2\n", "1"));
    }

    #[test]
    fn new_outside_runtime_is_an_error() {
        assert!(Netlink::new().is_err());
        assert!(link_events().is_err());
    }

    /// Drains whatever link events have arrived within `quiet` of each other.
    async fn drain(events: &mut mpsc::Receiver<()>, quiet: Duration) {
        while let Ok(Some(())) = tokio::time::timeout(quiet, events.recv()).await {}
    }

    /// The whole module against a real kernel, in a network namespace that
    /// only this test's thread lives in (it vanishes with the thread, so
    /// nothing needs cleaning up and no names can collide). Root only.
    #[test]
    #[ignore = "needs root; `cargo xtask test` runs it"]
    fn netns_bridge_roundtrip() {
        // SAFETY: trivial syscall.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "needs root: run it as root, e.g. `cargo xtask test`"
        );
        let thread = std::thread::spawn(|| -> Result<()> {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let err = std::io::Error::last_os_error();
                return Err(err).context("unshare(CLONE_NEWNET)");
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the test runtime")?
                .block_on(roundtrip())
        });
        match thread.join() {
            Ok(res) => res.expect("netns roundtrip failed"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    async fn roundtrip() -> Result<()> {
        let nl = Netlink::new()?;
        let mut events = link_events()?;

        // A fresh namespace: only lo, and it is down.
        let lo = nl.link_by_name("lo").await?.context("no lo")?;
        assert!(!lo.up, "lo is up: not a fresh netns?");
        assert_eq!(nl.bridge_ports(lo.ifindex).await?, vec![]);
        nl.set_link_up(lo.ifindex).await?;
        assert!(
            nl.link_by_index(lo.ifindex)
                .await?
                .context("lo vanished")?
                .up
        );
        assert_eq!(nl.link_by_name("nope0").await?, None);
        assert_eq!(nl.link_by_index(999_999).await?, None);
        assert_eq!(nl.link_by_index(0).await?, None);
        assert!(nl.link_by_name("far/too/long/a/name").await.is_err());
        assert_eq!(nl.default_route_iface().await?, None);

        let network = net("10.244.0.0/16");
        let gw = net("10.244.1.1/24");
        let br = nl.ensure_bridge("br-test", gw, network, 1450).await?;
        assert_eq!(br.kind.as_deref(), Some("bridge"));
        assert_eq!(br.mtu, 1450);
        assert!(br.up);
        assert_eq!(nl.ipv4_addrs(br.ifindex).await?, vec![gw]);

        let again = nl.ensure_bridge("br-test", gw, network, 1450).await?;
        assert_eq!(again, br);
        assert_eq!(nl.ipv4_addrs(br.ifindex).await?, vec![gw]);

        // A stale gateway from an old lease goes, a foreign address stays,
        // the MTU follows the config.
        let stale = net("10.244.7.1/24");
        let foreign = net("192.168.5.1/24");
        for a in [stale, foreign] {
            nl.handle
                .address()
                .add(br.ifindex, IpAddr::V4(a.addr()), a.prefix_len())
                .execute()
                .await?;
        }
        let br = nl.ensure_bridge("br-test", gw, network, 1400).await?;
        assert_eq!(br.mtu, 1400);
        let mut addrs = nl.ipv4_addrs(br.ifindex).await?;
        addrs.sort();
        assert_eq!(addrs, vec![gw, foreign]);

        // A non-bridge under that name is refused.
        nl.handle
            .link()
            .add(LinkVeth::new("veth-a", "veth-b").build())
            .execute()
            .await?;
        assert!(nl.ensure_bridge("veth-a", gw, network, 1400).await.is_err());

        // The default route is found through its interface.
        nl.handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .output_interface(br.ifindex)
                    .scope(RouteScope::Link)
                    .build(),
            )
            .execute()
            .await?;
        let def = nl
            .default_route_iface()
            .await?
            .context("no default route")?;
        assert_eq!(def.ifindex, br.ifindex);

        // Enslaving a veth is both visible and notified.
        drain(&mut events, Duration::from_millis(200)).await;
        let veth_a = nl.link_by_name("veth-a").await?.context("no veth-a")?;
        assert_eq!(veth_a.kind.as_deref(), Some("veth"));
        assert_eq!(nl.bridge_ports(br.ifindex).await?, vec![]);
        nl.handle
            .link()
            .change(
                LinkUnspec::new_with_index(veth_a.ifindex)
                    .controller(br.ifindex)
                    .build(),
            )
            .execute()
            .await?;
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            event.ok().flatten(),
            Some(()),
            "no link event after enslaving"
        );
        let ports = nl.bridge_ports(br.ifindex).await?;
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].name, "veth-a");
        assert_eq!(ports[0].master, Some(br.ifindex));
        assert_eq!(ports[0].kind.as_deref(), Some("veth"));

        // Deleting a link is notified too.
        drain(&mut events, Duration::from_millis(200)).await;
        nl.handle.link().del(veth_a.ifindex).execute().await?;
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert_eq!(
            event.ok().flatten(),
            Some(()),
            "no link event after deleting"
        );
        assert_eq!(nl.bridge_ports(br.ifindex).await?, vec![]);

        // Sysctls of this namespace: br-test exists nowhere else.
        let fwd = "net/ipv4/conf/br-test/forwarding";
        set_sysctl(fwd, "1")?;
        set_sysctl(fwd, "1")?;
        let read = std::fs::read_to_string(sysctl_path(fwd)?)?;
        assert_eq!(read.trim(), "1");
        assert!(set_sysctl("net/ipv4/conf/no-such-if/forwarding", "1").is_err());
        Ok(())
    }
}
