//! A node set up exactly as stock flannel's vxlan backend sets one up, for
//! mixed-cluster tests: a kernel vxlan device `flannel.1` (VNI 1, port
//! 8472, nolearning), its lease in etcd in flannel's JSON under an etcd
//! lease, and per remote lease the neighbour, fdb and route entries flannel
//! programs (pkg/backend/vxlan/vxlan_network.go).

use std::net::Ipv4Addr;

use anyhow::Context as _;
use dataplane::lease::{LeaseAttrs, parse_subnet_key, subnet_key};
use ipnet::Ipv4Net;

use crate::topo::Cluster;

pub struct FlannelNode {
    pub node: usize,
    pub subnet: Ipv4Net,
    pub vtep_mac: [u8; 6],
    pub public_ip: Ipv4Addr,
}

impl FlannelNode {
    /// Creates flannel.1 and cni0 in node `i`'s namespace and writes the
    /// node's lease as flannel would.
    pub fn start(c: &Cluster, i: usize, subnet: Ipv4Net) -> anyhow::Result<Self> {
        let node = &c.nodes[i];
        let public_ip = node.ip;
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        node.ns.sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && \
             ip link add flannel.1 type vxlan id 1 local {public_ip} dev eth0 dstport 8472 nolearning && \
             ip link set flannel.1 mtu 1450 && ip addr add {net}/32 dev flannel.1 && ip link set flannel.1 up && \
             ip link add cni0 type bridge && ip link set cni0 mtu 1450 && ip addr add {gw}/{len} dev cni0 && ip link set cni0 up",
            net = subnet.network(),
            len = subnet.prefix_len()
        ))?;
        let out = node.ns.sh("ip -j link show flannel.1")?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mac = v[0]["address"].as_str().context("flannel.1 MAC")?;
        let vtep_mac = dataplane::lease::parse_mac(mac).context("parse MAC")?;
        let attrs = LeaseAttrs {
            public_ip,
            backend_type: "vxlan".into(),
            vni: 1,
            vtep_mac,
        };
        let key = subnet_key(&c.prefix, subnet);
        c.with_etcd(move |mut cl| async move {
            let lease = cl.lease_grant(600, None).await?;
            cl.put(
                key,
                attrs.to_json(),
                Some(etcd_client::PutOptions::new().with_lease(lease.id())),
            )
            .await?;
            anyhow::Ok(())
        })?;
        Ok(FlannelNode {
            node: i,
            subnet,
            vtep_mac,
            public_ip,
        })
    }

    /// Programs neighbour, fdb and route for every other lease in etcd.
    pub fn program_peers(&self, c: &Cluster) -> anyhow::Result<()> {
        let prefix = c.prefix.clone();
        let leases = c.with_etcd(move |mut cl| async move {
            let dir = format!("{prefix}/subnets/");
            let resp = cl
                .get(dir, Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            let mut v = Vec::new();
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if let (Some(net), Ok(a)) = (
                    parse_subnet_key(&prefix, &key),
                    LeaseAttrs::from_json(kv.value()),
                ) {
                    v.push((net, a));
                }
            }
            anyhow::Ok(v)
        })?;
        let ns = &c.nodes[self.node].ns;
        for (net, a) in leases {
            if net == self.subnet {
                continue;
            }
            let mac = dataplane::lease::format_mac(&a.vtep_mac);
            ns.sh(&format!(
                "ip neigh replace {addr} lladdr {mac} dev flannel.1 nud permanent && \
                 bridge fdb replace {mac} dev flannel.1 dst {ip} self permanent && \
                 ip route replace {net} via {addr} dev flannel.1 onlink",
                addr = net.network(),
                ip = a.public_ip
            ))?;
        }
        Ok(())
    }
}
