//! Pod addressing, Cilium's way: the pod never ARPs.
//!
//! In the pod: its address as a /32, a `scope link` route to the gateway
//! on the pod interface, the IPAM routes (by default `0.0.0.0/0`) via the
//! gateway, and a PERMANENT neighbour entry gateway -> host-side MAC. On
//! the host: a /32 route to the pod via the host-side device and a
//! PERMANENT neighbour entry pod IP -> pod MAC. Both ends know each other
//! from ADD on, so nothing is learned from traffic, and a pod cannot reach
//! a neighbour except through the host.
//!
//! [`plan`] turns an IPAM result into the addressing (pure, unit-tested);
//! `configure_*` apply it, `check_*` compare the kernel's state with an
//! earlier result for CHECK.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    },
};

use super::{
    device::{Link, errno},
    error::{CniError, CniResult},
    proto::Mac,
    result::{CniOutput, Route, SCOPE_LINK},
};

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// The addressing of one pod interface, from its IPAM result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ip: Ipv4Addr,
    /// IPAM's gateway, or the first address of the IPAM subnet.
    pub gateway: Ipv4Addr,
    /// Destinations routed via the gateway, in IPAM's order.
    pub routes: Vec<Ipv4Net>,
}

/// Reads an IPAM result: exactly one IPv4 address (this dataplane routes
/// IPv4 only), its gateway, and routes whose next hop is that gateway (on
/// a point-to-point link no other next hop is reachable).
pub fn plan(ipam: &CniOutput, ipam_name: &str) -> CniResult<Plan> {
    let bad = |msg: String| CniError::invalid_netconf(format!("IPAM plugin {ipam_name}: {msg}"));
    let mut v4 = Vec::new();
    for ip in &ipam.ips {
        match ip.address {
            IpNet::V4(net) => v4.push((net, ip.gateway)),
            IpNet::V6(net) => {
                return Err(bad(format!(
                    "returned the IPv6 address {net}; dataplane-cni is IPv4 only"
                )));
            }
        }
    }
    let (net, gateway) = match v4.as_slice() {
        [one] => *one,
        [] => return Err(bad("returned no IPv4 address".into())),
        many => {
            return Err(bad(format!(
                "returned {} IPv4 addresses; an attachment has one",
                many.len()
            )));
        }
    };
    let ip = net.addr();
    let gateway = match gateway {
        Some(IpAddr::V4(gw)) => gw,
        Some(IpAddr::V6(gw)) => return Err(bad(format!("gave the IPv6 gateway {gw} for {net}"))),
        None if net.prefix_len() < 31 => Ipv4Addr::from(u32::from(net.network()).wrapping_add(1)),
        None => {
            return Err(bad(format!(
                "gave {net} without a gateway, and a /{} has no first address to use",
                net.prefix_len()
            )));
        }
    };
    if gateway == ip {
        return Err(bad(format!("gave the pod address {ip} as its own gateway")));
    }
    let mut routes = Vec::new();
    for r in &ipam.routes {
        let IpNet::V4(dst) = r.dst else {
            return Err(bad(format!("returned the IPv6 route {}", r.dst)));
        };
        match r.gw {
            None => {}
            Some(IpAddr::V4(gw)) if gw == gateway => {}
            Some(gw) => {
                return Err(bad(format!(
                    "route {dst} via {gw}: the pod's only next hop is its gateway {gateway}"
                )));
            }
        }
        let dst = dst.trunc();
        // The gateway's own /32 is the link route already.
        if dst != Ipv4Net::from(gateway) && !routes.contains(&dst) {
            routes.push(dst);
        }
    }
    Ok(Plan {
        ip,
        gateway,
        routes,
    })
}

impl Plan {
    /// The routes as a result reports them. 1.1 results also list the
    /// gateway's link route (with `scope`, new in 1.1); in a 1.0 result a
    /// route without `gw` would read as "via the gateway", so it is left
    /// out there.
    pub fn result_routes(&self, with_scope: bool) -> Vec<Route> {
        let mut out = Vec::new();
        if with_scope {
            out.push(Route {
                scope: Some(SCOPE_LINK),
                ..Route::new(IpNet::V4(Ipv4Net::from(self.gateway)), None)
            });
        }
        out.extend(
            self.routes
                .iter()
                .map(|dst| Route::new(IpNet::V4(*dst), Some(IpAddr::V4(self.gateway)))),
        );
        out
    }
}

fn nl_err(what: String) -> impl FnOnce(rtnetlink::Error) -> CniError {
    move |e| CniError::internal(format!("{what}: {e}"))
}

async fn add_route(nl: &Handle, msg: RouteMessage, what: String) -> CniResult<()> {
    nl.route().add(msg).execute().await.map_err(nl_err(what))
}

async fn add_neighbour(nl: &Handle, link: &Link, ip: Ipv4Addr, mac: Mac) -> CniResult<()> {
    nl.neighbours()
        .add(link.ifindex, IpAddr::V4(ip))
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("neighbour {ip} -> {mac} on {}", link.name)))
}

/// Addresses the pod end: /32, gateway link route and neighbour, routes.
pub async fn configure_pod(nl: &Handle, pod: &Link, plan: &Plan, host_mac: Mac) -> CniResult<()> {
    nl.address()
        .add(pod.ifindex, IpAddr::V4(plan.ip), 32)
        .execute()
        .await
        .map_err(nl_err(format!("adding {}/32 to {}", plan.ip, pod.name)))?;
    add_route(
        nl,
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(plan.gateway, 32)
            .output_interface(pod.ifindex)
            .scope(RouteScope::Link)
            .build(),
        format!("route {}/32 dev {} scope link", plan.gateway, pod.name),
    )
    .await?;
    add_neighbour(nl, pod, plan.gateway, host_mac).await?;
    for dst in &plan.routes {
        add_route(
            nl,
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(plan.gateway)
                .output_interface(pod.ifindex)
                .build(),
            format!("route {dst} via {} dev {}", plan.gateway, pod.name),
        )
        .await?;
    }
    Ok(())
}

/// The host end: a /32 route to the pod and its neighbour entry.
pub async fn configure_host(
    nl: &Handle,
    host: &Link,
    pod_ip: Ipv4Addr,
    pod_mac: Mac,
) -> CniResult<()> {
    add_route(
        nl,
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(pod_ip, 32)
            .output_interface(host.ifindex)
            .scope(RouteScope::Link)
            .build(),
        format!("route {pod_ip}/32 dev {} scope link", host.name),
    )
    .await?;
    add_neighbour(nl, host, pod_ip, pod_mac).await
}

/// A route as CHECK compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: u8,
    pub table: u32,
}

impl RouteEntry {
    fn from_msg(msg: &RouteMessage) -> Option<Self> {
        if msg.header.address_family != AddressFamily::Inet {
            return None;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gw = None;
        let mut oif = None;
        let mut table = u32::from(msg.header.table);
        for a in &msg.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        Some(Self {
            dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
            gw,
            oif,
            scope: u8::from(msg.header.scope),
            table,
        })
    }
}

/// The IPv4 routes of every table.
pub async fn routes(nl: &Handle) -> CniResult<Vec<RouteEntry>> {
    let msgs: Vec<RouteMessage> = nl
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("dumping IPv4 routes".into()))?;
    Ok(msgs.iter().filter_map(RouteEntry::from_msg).collect())
}

/// The IPv4 addresses of a link, with prefix length.
pub async fn addresses(nl: &Handle, ifindex: u32) -> CniResult<Vec<Ipv4Net>> {
    let msgs: Vec<AddressMessage> = nl
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(nl_err(format!("dumping addresses of link {ifindex}")))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == ifindex)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })?;
            Ipv4Net::new(ip, m.header.prefix_len).ok()
        })
        .collect())
}

/// A neighbour entry: (ifindex, IP, MAC, permanent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighEntry {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

pub async fn neighbours(nl: &Handle) -> CniResult<Vec<NeighEntry>> {
    let msgs: Vec<NeighbourMessage> = match nl
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
    {
        Ok(m) => m,
        Err(e) if errno(&e) == Some(libc::ENOENT) => Vec::new(),
        Err(e) => return Err(CniError::internal(format!("dumping neighbours: {e}"))),
    };
    Ok(msgs
        .iter()
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            let mac = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(b) => {
                    <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac)
                }
                _ => None,
            });
            Some(NeighEntry {
                ifindex: m.header.ifindex,
                ip,
                mac,
                permanent: m.header.state == NeighbourState::Permanent,
            })
        })
        .collect())
}

/// The routes of `expected` (a result's, for interface `oif`) that are not
/// in `have`. A route without `gw` goes via `gateway`, unless its scope
/// is link; IPv6 routes are not this plugin's and are skipped.
pub fn missing_routes(
    expected: &[Route],
    gateway: Option<Ipv4Addr>,
    oif: u32,
    have: &[RouteEntry],
) -> Vec<String> {
    let mut out = Vec::new();
    for r in expected {
        let IpNet::V4(dst) = r.dst else { continue };
        let dst = dst.trunc();
        let link_scope = r.scope == Some(SCOPE_LINK);
        let gw = if link_scope {
            None
        } else {
            match r.gw {
                Some(IpAddr::V4(gw)) => Some(gw),
                Some(IpAddr::V6(_)) => continue,
                None => gateway,
            }
        };
        let table = r.table.unwrap_or(RT_TABLE_MAIN);
        let found = have.iter().any(|h| {
            h.dst == dst
                && h.gw == gw
                && h.oif == Some(oif)
                && h.table == table
                && (!link_scope || h.scope == SCOPE_LINK)
        });
        if !found {
            out.push(match gw {
                Some(gw) => format!("route {dst} via {gw} is missing"),
                None => format!("route {dst} scope link is missing"),
            });
        }
    }
    out
}

/// Problems with a permanent neighbour entry `ip -> mac` on `ifindex`.
pub fn neighbour_problem(
    have: &[NeighEntry],
    ifindex: u32,
    ip: Ipv4Addr,
    mac: Mac,
    dev: &str,
) -> Option<String> {
    match have.iter().find(|n| n.ifindex == ifindex && n.ip == ip) {
        None => Some(format!("neighbour entry {ip} on {dev} is missing")),
        Some(n) if n.mac != Some(mac) => Some(format!(
            "neighbour entry {ip} on {dev} points to {}, not {mac}",
            n.mac.map_or("nothing".to_string(), |m| m.to_string())
        )),
        Some(n) if !n.permanent => Some(format!("neighbour entry {ip} on {dev} is not permanent")),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::{error::code, result::IpConfig};

    fn ipam(ips: &[(&str, Option<&str>)], routes: &[(&str, Option<&str>)]) -> CniOutput {
        CniOutput {
            ips: ips
                .iter()
                .map(|(a, g)| IpConfig {
                    address: a.parse().unwrap(),
                    gateway: g.map(|g| g.parse().unwrap()),
                    interface: None,
                })
                .collect(),
            routes: routes
                .iter()
                .map(|(d, g)| Route::new(d.parse().unwrap(), g.map(|g| g.parse().unwrap())))
                .collect(),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn plans_from_host_local_results() {
        let p = plan(
            &ipam(
                &[("10.244.1.7/24", Some("10.244.1.1"))],
                &[("0.0.0.0/0", None)],
            ),
            "host-local",
        )
        .unwrap();
        assert_eq!(
            p,
            Plan {
                ip: ip("10.244.1.7"),
                gateway: ip("10.244.1.1"),
                routes: vec!["0.0.0.0/0".parse().unwrap()],
            }
        );
        // No gateway: the subnet's first address. Routes are normalized,
        // deduplicated, and the gateway's own /32 is the link route.
        let p = plan(
            &ipam(
                &[("10.99.0.2/30", None)],
                &[
                    ("10.96.0.0/12", Some("10.99.0.1")),
                    ("10.96.5.5/12", None),
                    ("10.99.0.1/32", None),
                ],
            ),
            "x",
        )
        .unwrap();
        assert_eq!(p.gateway, ip("10.99.0.1"));
        assert_eq!(p.routes, vec!["10.96.0.0/12".parse::<Ipv4Net>().unwrap()]);
    }

    #[test]
    fn refuses_what_a_point_to_point_link_cannot_do() {
        let cases = [
            (ipam(&[], &[]), "no IPv4 address"),
            (ipam(&[("fd00::5/64", None)], &[]), "IPv6"),
            (
                ipam(&[("10.0.0.2/24", None), ("10.0.1.2/24", None)], &[]),
                "2 IPv4 addresses",
            ),
            (ipam(&[("10.0.0.2/32", None)], &[]), "without a gateway"),
            (
                ipam(&[("10.0.0.1/24", Some("10.0.0.1"))], &[]),
                "own gateway",
            ),
            (
                ipam(
                    &[("10.0.0.2/24", None)],
                    &[("0.0.0.0/0", Some("10.0.0.254"))],
                ),
                "only next hop",
            ),
            (
                ipam(&[("10.0.0.2/24", None)], &[("::/0", None)]),
                "IPv6 route",
            ),
        ];
        for (input, needle) in cases {
            let e = plan(&input, "host-local").unwrap_err();
            assert_eq!(e.code, code::INVALID_NETCONF, "{needle}");
            assert!(
                e.msg.contains(needle) && e.msg.contains("host-local"),
                "{needle}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn result_routes_by_version() {
        let p = Plan {
            ip: ip("10.0.0.2"),
            gateway: ip("10.0.0.1"),
            routes: vec!["0.0.0.0/0".parse().unwrap()],
        };
        let v11 = p.result_routes(true);
        assert_eq!(v11.len(), 2);
        assert_eq!(v11[0].dst, "10.0.0.1/32".parse::<IpNet>().unwrap());
        assert_eq!(v11[0].scope, Some(SCOPE_LINK));
        assert_eq!(v11[0].gw, None);
        assert_eq!(v11[1].gw, Some("10.0.0.1".parse().unwrap()));
        let v10 = p.result_routes(false);
        assert_eq!(v10, v11[1..].to_vec());
    }

    #[test]
    fn finds_missing_routes() {
        let gw = ip("10.0.0.1");
        let have = vec![
            RouteEntry {
                dst: "10.0.0.1/32".parse().unwrap(),
                gw: None,
                oif: Some(5),
                scope: SCOPE_LINK,
                table: RT_TABLE_MAIN,
            },
            RouteEntry {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(gw),
                oif: Some(5),
                scope: 0,
                table: RT_TABLE_MAIN,
            },
        ];
        let p = Plan {
            ip: ip("10.0.0.2"),
            gateway: gw,
            routes: vec!["0.0.0.0/0".parse().unwrap()],
        };
        let expected = p.result_routes(true);
        assert!(missing_routes(&expected, Some(gw), 5, &have).is_empty());
        // Another interface, or a route gone, is reported.
        assert_eq!(missing_routes(&expected, Some(gw), 6, &have).len(), 2);
        let missing = missing_routes(&expected, Some(gw), 5, &have[..1]);
        assert_eq!(
            missing,
            vec!["route 0.0.0.0/0 via 10.0.0.1 is missing".to_string()]
        );
        // A result route without gw means "via the gateway".
        let implicit = vec![Route::new("0.0.0.0/0".parse().unwrap(), None)];
        assert!(missing_routes(&implicit, Some(gw), 5, &have).is_empty());
        assert_eq!(missing_routes(&implicit, None, 5, &have).len(), 1);
        // IPv6 routes are not ours to check.
        let v6 = vec![Route::new("::/0".parse().unwrap(), None)];
        assert!(missing_routes(&v6, Some(gw), 5, &[]).is_empty());
    }

    #[test]
    fn neighbour_problems() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let n = |mac: Option<Mac>, permanent| NeighEntry {
            ifindex: 3,
            ip: ip("10.0.0.1"),
            mac,
            permanent,
        };
        assert_eq!(
            neighbour_problem(&[n(Some(mac), true)], 3, ip("10.0.0.1"), mac, "eth0"),
            None
        );
        for (have, needle) in [
            (vec![], "missing"),
            (vec![n(Some(mac), true)], "missing"),
            (
                vec![n(Some(Mac([2, 0, 0, 0, 0, 9])), true)],
                "points to 02:00:00:00:00:09",
            ),
            (vec![n(Some(mac), false)], "not permanent"),
        ] {
            let ifindex = if needle == "missing" && !have.is_empty() {
                4
            } else {
                3
            };
            let p = neighbour_problem(&have, ifindex, ip("10.0.0.1"), mac, "eth0").unwrap();
            assert!(p.contains(needle), "{p}");
        }
    }
}
