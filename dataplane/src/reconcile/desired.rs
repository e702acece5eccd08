//! Desired state, in the data path's terms, made from what the agent
//! knows: the lease table (peers), the Service store (frontends), this
//! node's links and lease (node config). Every wire type the agent writes
//! is built here, once.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use dataplane_common::{
    Backend, EndpointInfo, NODE_CFG_BPF_LOG, NODE_CFG_IP_MASQ, NODE_CFG_READY, NodeConfig,
    PROTO_TCP, PROTO_UDP, PodPortInfo, SvcKey,
};
use ipnet::Ipv4Net;
use log::warn;

use crate::{
    cni::proto::Endpoint,
    peers::PeerTable,
    services::{self, FrontendSpec},
};

/// A remote node as the data path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// Remote subnet -> the node holding it.
pub type Peers = BTreeMap<Ipv4Net, Peer>;

/// What one frontend should look like in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    /// In slot order; no duplicates.
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `Some` for a north-south frontend (NodePort, externalIP,
    /// LoadBalancer IP): whether its externalTrafficPolicy is Local.
    pub north_south: Option<services::TrafficPolicy>,
    /// No backends here but the Service has endpoints elsewhere
    /// (`externalTrafficPolicy: Local`): new flows from outside are
    /// dropped, not rejected (`SVC_F_EMPTY_DROPS`).
    pub empty_drops: bool,
}

/// The frontends of one Service.
pub type Frontends = BTreeMap<SvcKey, FrontendState>;

/// Peers to program: every vxlan lease but our own.
pub fn peers(table: &PeerTable, own: Ipv4Net) -> Peers {
    table
        .iter()
        .filter(|(net, _)| **net != own)
        .filter(|(net, a)| {
            let ok = a.backend_type == "vxlan";
            if !ok {
                warn!(
                    "peer {net}: backend {} is not vxlan, not reachable from here",
                    a.backend_type
                );
            }
            ok
        })
        .map(|(net, a)| {
            (
                *net,
                Peer {
                    public_ip: a.public_ip,
                    vtep_mac: a.vtep_mac,
                },
            )
        })
        .collect()
}

/// The wire key of a frontend.
pub fn svc_key(f: &services::Frontend) -> SvcKey {
    SvcKey {
        vip: f.ip.octets(),
        port: f.port.to_be_bytes(),
        proto: match f.proto {
            services::Proto::Tcp => PROTO_TCP,
            services::Proto::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

/// One Service's frontends (from [`services::ServiceStore::frontends_for`])
/// in wire form. A NodePort frontend (address 0.0.0.0: every node
/// address) is this node's `public_ip` and the nodePort.
pub fn frontends(
    fronts: &BTreeMap<services::Frontend, FrontendSpec>,
    public_ip: Ipv4Addr,
) -> Frontends {
    fronts
        .iter()
        .map(|(f, spec)| {
            let mut f = *f;
            if f.ip.is_unspecified() {
                f.ip = public_ip;
            }
            (svc_key(&f), frontend_state(spec))
        })
        .collect()
}

fn frontend_state(spec: &FrontendSpec) -> FrontendState {
    FrontendState {
        backends: spec
            .backends
            .iter()
            .map(|b| Backend {
                ip: b.ip.octets(),
                port: b.port.to_be_bytes(),
                _pad: [0; 2],
            })
            .collect(),
        affinity_timeout_s: spec.affinity_timeout.map(secs_u32),
        north_south: spec.north_south,
        empty_drops: spec.empty_drops,
    }
}

fn secs_u32(d: Duration) -> u32 {
    d.as_secs().min(u64::from(u32::MAX)) as u32
}

/// The pod bridge's address: the subnet's first address, as the CNI
/// bridge plugin expects with flannel.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Net {
    let first = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
    Ipv4Net::new(first, subnet.prefix_len()).expect("prefix length from a valid subnet")
}

/// What the data path must know about this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// The cluster network.
    pub network: Ipv4Net,
    /// This node's leased subnet.
    pub subnet: Ipv4Net,
    pub vni: u32,
    /// VXLAN UDP port, host byte order.
    pub vxlan_port: u16,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub underlay_ifindex: u32,
    pub underlay_mac: [u8; 6],
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
    /// The host overlay device (`--host-device`).
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    /// The agent's network namespace cookie (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// `--bpf-log`.
    pub bpf_log: bool,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--nat-ports`, inclusive, host byte order.
    pub nat_ports: (u16, u16),
}

/// The node config entry for these facts.
pub fn node_config(n: &NodeFacts) -> NodeConfig {
    let flags = NODE_CFG_READY
        | if n.bpf_log { NODE_CFG_BPF_LOG } else { 0 }
        | if n.ip_masq { NODE_CFG_IP_MASQ } else { 0 };
    NodeConfig {
        flags,
        vni: n.vni,
        underlay_ifindex: n.underlay_ifindex,
        bridge_ifindex: n.bridge_ifindex,
        public_ip: n.public_ip.octets(),
        network: n.network.network().octets(),
        subnet: n.subnet.network().octets(),
        gateway: gateway(n.subnet).addr().octets(),
        network_prefix_len: n.network.prefix_len(),
        subnet_prefix_len: n.subnet.prefix_len(),
        vxlan_port: n.vxlan_port,
        vtep_mac: n.vtep_mac,
        underlay_mac: n.underlay_mac,
        bridge_mac: n.bridge_mac,
        // `--nat-ports` (masquerade) sets these; the default until then.
        _pad: [0; 2],
        host_ifindex: n.host_ifindex,
        host_mac: n.host_mac,
        nat_port_min: n.nat_ports.0,
        nat_port_max: n.nat_ports.1,
        _pad2: [0; 2],
        netns_cookie: n.netns_cookie,
    }
}

/// A pod registered through CNI, as the data path needs it: its endpoint
/// entry and its port's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub endpoint: EndpointInfo,
    pub port: PodPortInfo,
}

/// CNI pods by IPv4 address (network byte order).
pub type Pods = BTreeMap<[u8; 4], PodEntry>;

/// The CNI pods of these registrations. Two with one address cannot both
/// be served; the registry never holds such a pair (a new registration
/// takes the address), and here the later one wins.
pub fn pods<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Pods {
    endpoints
        .into_iter()
        .map(|e| {
            let ip = e.ip.octets();
            let entry = PodEntry {
                endpoint: EndpointInfo {
                    ifindex: e.host_ifindex,
                    mac: e.mac.0,
                    gw_mac: e.host_mac.0,
                },
                port: PodPortInfo {
                    ip,
                    mac: e.mac.0,
                    _pad: [0; 2],
                },
            };
            (ip, entry)
        })
        .collect()
}
