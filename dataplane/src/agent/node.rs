//! This node's host side: the underlay interface and PublicIP, the pod
//! bridge (what flannel + the CNI bridge plugin set up), and subnet.env.

use std::{net::Ipv4Addr, path::Path, path::PathBuf};

use anyhow::{Context as _, anyhow};
use ipnet::Ipv4Net;
use log::{info, warn};

use crate::{
    lease::format_mac,
    netlink::{self, LinkInfo, Netlink},
    reconcile::desired::gateway,
    subnet_env::{self, SubnetEnv},
};

/// `--iface`, or the interface holding the IPv4 default route.
pub(super) async fn underlay_iface(nl: &Netlink, name: Option<&str>) -> anyhow::Result<LinkInfo> {
    match name {
        Some(n) => nl
            .link_by_name(n)
            .await?
            .ok_or_else(|| anyhow!("--iface {n}: no such interface")),
        None => nl.default_route_iface().await?.ok_or_else(|| {
            anyhow!("no IPv4 default route to pick the underlay interface from; pass --iface")
        }),
    }
}

/// `--public-ip`, or the underlay's first IPv4 address.
pub(super) async fn public_ip(
    nl: &Netlink,
    underlay: &LinkInfo,
    configured: Option<Ipv4Addr>,
) -> anyhow::Result<Ipv4Addr> {
    if let Some(ip) = configured {
        return Ok(ip);
    }
    nl.ipv4_addrs(underlay.ifindex)
        .await?
        .first()
        .map(|n| n.addr())
        .ok_or_else(|| anyhow!("{} has no IPv4 address; pass --public-ip", underlay.name))
}

/// The bridge holding the subnet's first address, with a fixed MAC derived
/// from it: stable across restarts and pod churn, so the data path can
/// write it as the source of frames it delivers straight into pods.
pub(super) async fn plumb_bridge(
    nl: &Netlink,
    name: &str,
    subnet: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
) -> anyhow::Result<LinkInfo> {
    let gw = gateway(subnet);
    let mut br = nl.ensure_bridge(name, gw, network, mtu).await?;
    // Pods on the bridge take the whole subnet as on-link and ARP for a
    // CNI pod (which is routed, /32, on its own device): the bridge
    // answers for addresses routed elsewhere, at once.
    netlink::set_sysctl(&format!("net/ipv4/conf/{name}/proxy_arp"), "1")?;
    netlink::set_sysctl(&format!("net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    let o = gw.addr().octets();
    let mac = [0x02, 0xdc, o[0], o[1], o[2], o[3]];
    if br.mac != mac {
        nl.set_link_mac(br.ifindex, mac).await?;
        br.mac = mac;
    }
    info!(
        "bridge {name} has {gw}, mac {}, mtu {mtu}",
        format_mac(&mac)
    );
    Ok(br)
}

/// The subnet an earlier run recorded, as a hint for acquiring the lease.
pub(super) fn subnet_hint(path: &Path) -> Option<Ipv4Net> {
    match subnet_env::read(path) {
        Ok(env) => env.map(|e| e.subnet),
        Err(e) => {
            warn!("ignoring {}: {e:#}", path.display());
            None
        }
    }
}

/// flannel's subnet.env, written when its contents change: once at
/// start-up, then when the lease (or MTU) does.
pub(super) struct SubnetEnvFile {
    path: PathBuf,
    network: Ipv4Net,
    ipmasq: bool,
    written: Option<SubnetEnv>,
}

impl SubnetEnvFile {
    pub(super) fn new(path: PathBuf, network: Ipv4Net, ipmasq: bool) -> Self {
        Self {
            path,
            network,
            ipmasq,
            written: None,
        }
    }

    /// Writes the file unless it already says this.
    pub(super) fn ensure(&mut self, subnet: Ipv4Net, mtu: u32) -> anyhow::Result<()> {
        let env = SubnetEnv {
            network: self.network,
            subnet,
            mtu,
            ipmasq: self.ipmasq,
        };
        if self.written.as_ref() == Some(&env) {
            return Ok(());
        }
        subnet_env::write(&self.path, &env)
            .with_context(|| format!("writing {}", self.path.display()))?;
        info!("wrote {}", self.path.display());
        self.written = Some(env);
        Ok(())
    }
}
