//! The node's own traffic (host network): the host overlay device the
//! cluster network is routed through, and the network namespace cookie
//! the cgroup socket programs tell this node's sockets by.
//!
//! The device (`--host-device`, a dummy, or an ifb where the kernel has
//! no dummy driver: no ARP, nothing sent on it leaves) carries
//! `from_host` on its egress; the route `<Network> dev <device> src
//! <gateway>` sends the node's packets to other nodes' pods there, from
//! the node's overlay address (its subnet's gateway, `cni0`'s address),
//! so replies come back inside VXLAN. This node's own subnet keeps its
//! more specific routes (`cni0`, CNI pods' /32s).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use log::{info, warn};

use crate::{
    lease::format_mac,
    netlink::{self, LinkInfo, Netlink},
    reconcile::desired::gateway,
};

/// Default `--host-device`.
pub const DEFAULT_DEVICE: &str = "dataplane.1";

/// The host device's MAC: `02:dd:` + the gateway address, stable across
/// restarts (the data path writes it into frames it redirects there).
pub fn device_mac(gw: Ipv4Addr) -> [u8; 6] {
    let o = gw.octets();
    [0x02, 0xdd, o[0], o[1], o[2], o[3]]
}

/// The device, up, with the pod MTU, and the cluster network routed
/// through it from the gateway address (which `cni0` holds, so the
/// bridge is plumbed first).
pub(super) async fn plumb(
    nl: &Netlink,
    name: &str,
    subnet: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
) -> anyhow::Result<LinkInfo> {
    let gw = gateway(subnet).addr();
    let mac = device_mac(gw);
    let dev = nl
        .ensure_host_device(name, mtu, mac)
        .await
        .with_context(|| format!("the host device {name}"))?;
    // It carries IPv4 only; IPv6 would only add router solicitations.
    if let Err(e) = netlink::set_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1") {
        warn!("{name}: IPv6 left on: {e:#}");
    }
    nl.replace_route(network, dev.ifindex, gw).await?;
    info!(
        "host device {name} (ifindex {}, mac {}, mtu {mtu}): {network} routed through it from {gw}",
        dev.ifindex,
        format_mac(&mac)
    );
    Ok(dev)
}

/// The cookie of the network namespace this process runs in
/// (`SO_NETNS_COOKIE`, Linux 5.14), as `bpf_get_netns_cookie` gives it.
pub fn netns_cookie() -> anyhow::Result<u64> {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for SO_NETNS_COOKIE");
        }
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err).context("getsockopt SO_NETNS_COOKIE (Linux 5.14+)");
        }
        Ok(cookie)
    }
}

/// `statfs` magic of a cgroup v2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed statfs for the kernel to fill.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// The cgroup v2 directory to attach the socket programs to:
/// `--cgroup-path` when it is one, else its `unified/` on a host with
/// systemd's hybrid layout (v1 controllers at /sys/fs/cgroup, v2 at
/// /sys/fs/cgroup/unified).
pub(super) fn cgroup_dir(path: &Path) -> anyhow::Result<PathBuf> {
    if is_cgroup2(path) {
        return Ok(path.to_owned());
    }
    let unified = path.join("unified");
    if is_cgroup2(&unified) {
        info!(
            "{} is not a cgroup v2 mount; using {} (hybrid layout)",
            path.display(),
            unified.display()
        );
        return Ok(unified);
    }
    anyhow::bail!(
        "--cgroup-path {}: not a cgroup v2 directory (nor is {}); the socket programs need one",
        path.display(),
        unified.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mac_is_local_unicast_and_follows_the_gateway() {
        let m = device_mac(Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(m, [0x02, 0xdd, 10, 244, 3, 1]);
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_ne!(device_mac(Ipv4Addr::new(10, 244, 4, 1)), m);
    }
}
