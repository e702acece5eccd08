//! Checks on ClusterIPs, beyond one object's own validation
//! ([`super::validate`]): inside the service CIDR, and not an address the
//! cluster already uses (a pod, a node's PublicIP, a subnet's gateway);
//! and no frontend (ClusterIP, port, protocol) claimed by two Services.
//!
//! `apply` refuses a file that fails them ([`check_addresses`],
//! [`check_conflicts`]). The agent skips (counts and logs once) a Service
//! in etcd that fails [`AddressGuard::check`], and of two Services claiming
//! one frontend programs the older ([`super::ServiceStore::owner`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::manifest::Object;
use super::model::{Frontend, ServiceName, ServiceStore};
use super::object::{Kind, ObjectRef};
use super::store::StoreError;
use super::validate::{self, ClusterIp};
use crate::config::NodePortRange;
use crate::etcd::{self, Prefix, kv_client};
use crate::lease::{LeaseAttrs, subnets_dir};

/// Kubernetes' default service CIDR (kube-apiserver
/// `--service-cluster-ip-range`).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// Kubernetes' default nodePort range (kube-apiserver
/// `--service-node-port-range`).
pub const DEFAULT_NODE_PORT_RANGE: NodePortRange = NodePortRange {
    min: 30_000,
    max: 32_767,
};

/// Where ClusterIPs may lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressGuard {
    /// ClusterIPs must lie inside it: `--service-cidr`, else `ServiceCIDR`
    /// of the network config, else [`DEFAULT_SERVICE_CIDR`]
    /// ([`AddressGuard::service_cidr_of`]).
    pub service_cidr: Ipv4Net,
    /// The cluster's pod network (`Network` of the network config), when
    /// known: no ClusterIP inside it.
    pub pod_network: Option<Ipv4Net>,
    /// Node addresses (the PublicIP of each lease), with the lease's
    /// subnet: no ClusterIP on them.
    pub nodes: BTreeMap<Ipv4Addr, Ipv4Net>,
    /// Gateways (the first address of each leased subnet, the node's
    /// bridge), with the subnet: no ClusterIP on them.
    pub gateways: BTreeMap<Ipv4Addr, Ipv4Net>,
    /// Where `apply` allocates nodePorts and which explicit ones it
    /// accepts: `apply --service-node-port-range`, else `NodePortRange`
    /// of the network config, else [`DEFAULT_NODE_PORT_RANGE`].
    pub node_ports: NodePortRange,
}

impl AddressGuard {
    /// A guard with a service CIDR and pod network and no leases yet.
    pub fn new(service_cidr: Ipv4Net, pod_network: Option<Ipv4Net>) -> AddressGuard {
        AddressGuard {
            service_cidr,
            pod_network,
            nodes: BTreeMap::new(),
            gateways: BTreeMap::new(),
            node_ports: DEFAULT_NODE_PORT_RANGE,
        }
    }

    /// The service CIDR in force: the flag, else the network config's
    /// `ServiceCIDR`, else [`DEFAULT_SERVICE_CIDR`].
    pub fn service_cidr_of(flag: Option<Ipv4Net>, config: Option<Ipv4Net>) -> Ipv4Net {
        flag.or(config).unwrap_or_else(|| {
            DEFAULT_SERVICE_CIDR
                .parse()
                .expect("DEFAULT_SERVICE_CIDR is a CIDR")
        })
    }

    /// The gateway of a leased subnet: its first address.
    pub fn gateway_of(subnet: Ipv4Net) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
    }

    /// Records a lease: its PublicIP and gateway are off limits.
    pub fn add_lease(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        self.nodes.insert(public_ip, subnet);
        self.gateways.insert(Self::gateway_of(subnet), subnet);
    }

    /// Forgets a lease (the PublicIP only if no other lease has it since).
    pub fn remove_lease(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        if self.nodes.get(&public_ip) == Some(&subnet) {
            self.nodes.remove(&public_ip);
        }
        let gw = Self::gateway_of(subnet);
        if self.gateways.get(&gw) == Some(&subnet) {
            self.gateways.remove(&gw);
        }
    }

    /// Why `ip` cannot be a ClusterIP, if it cannot.
    pub fn check(&self, ip: Ipv4Addr) -> Result<(), String> {
        if let Some(subnet) = self.nodes.get(&ip) {
            return Err(format!(
                "{ip} is a node address (the PublicIP of the lease {subnet}): a ClusterIP cannot be a pod, node or gateway address"
            ));
        }
        if let Some(subnet) = self.gateways.get(&ip) {
            return Err(format!(
                "{ip} is the gateway of the lease {subnet}: a ClusterIP cannot be a pod, node or gateway address"
            ));
        }
        if let Some(net) = self.pod_network
            && net.contains(&ip)
        {
            return Err(format!(
                "{ip} is inside the pod network {net}: a ClusterIP cannot be a pod, node or gateway address"
            ));
        }
        if !self.service_cidr.contains(&ip) {
            return Err(format!(
                "{ip} is outside the service CIDR {} (--service-cidr, or ServiceCIDR in the network config)",
                self.service_cidr
            ));
        }
        Ok(())
    }

    /// Why `ip` cannot be an externalIP or LoadBalancer ingress IP, if it
    /// cannot: traffic to it would be taken from a pod, a gateway or a
    /// ClusterIP. (A node's PublicIP may be one: that is how externalIPs
    /// are often used.)
    pub fn check_external(&self, ip: Ipv4Addr) -> Result<(), String> {
        if let Some(subnet) = self.gateways.get(&ip) {
            return Err(format!(
                "{ip} is the gateway of the lease {subnet}: an externalIP or LoadBalancer IP cannot be a pod, gateway or ClusterIP address"
            ));
        }
        if let Some(net) = self.pod_network
            && net.contains(&ip)
        {
            return Err(format!(
                "{ip} is inside the pod network {net}: an externalIP or LoadBalancer IP cannot be a pod, gateway or ClusterIP address"
            ));
        }
        if self.service_cidr.contains(&ip) {
            return Err(format!(
                "{ip} is inside the service CIDR {}: an externalIP or LoadBalancer IP cannot be a pod, gateway or ClusterIP address",
                self.service_cidr
            ));
        }
        Ok(())
    }

    /// The guard `apply` uses: the network config under `etcd_prefix`
    /// (pod network and `ServiceCIDR`) and its leases (node addresses and
    /// gateways). Without a network config, the pod network and lease
    /// checks are left out; the second value then says so.
    pub async fn for_cluster(
        client: &mut etcd_client::Client,
        etcd_prefix: impl Into<Prefix>,
        service_cidr_flag: Option<Ipv4Net>,
    ) -> Result<(AddressGuard, Option<String>), StoreError> {
        let prefix = etcd_prefix.into();
        let net = match crate::config::load(client, prefix.clone()).await {
            Ok(net) => net,
            Err(e) => {
                let guard = AddressGuard::new(Self::service_cidr_of(service_cidr_flag, None), None);
                return Ok((
                    guard,
                    Some(format!(
                        "{e}; ClusterIPs are not checked against the pod network and node addresses"
                    )),
                ));
            }
        };
        let mut guard = AddressGuard::new(
            Self::service_cidr_of(service_cidr_flag, net.service_cidr),
            Some(net.network),
        );
        if let Some(r) = net.node_port_range {
            guard.node_ports = r;
        }
        let dir = subnets_dir(&prefix);
        let (kvs, _) = etcd::list(&mut kv_client(client), &dir.range()).await?;
        for kv in &kvs {
            let Some(subnet) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| crate::lease::subnet_in(&dir, k))
            else {
                continue;
            };
            if let Ok(attrs) = LeaseAttrs::from_json(kv.value()) {
                guard.add_lease(subnet, attrs.public_ip);
            }
        }
        Ok((guard, None))
    }
}

/// The first address problem of a Service in `objects`.
pub fn check_addresses(objects: &[Object], guard: &AddressGuard) -> Result<(), StoreError> {
    for obj in objects {
        let Object::Service(svc) = obj else { continue };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let invalid = |path: String, message: String| StoreError::Invalid {
            object: obj.object_ref(),
            path,
            message,
        };
        for (i, x) in spec.external_ips.iter().flatten().enumerate() {
            if let Ok(ip) = x.parse() {
                guard
                    .check_external(ip)
                    .map_err(|m| invalid(format!("spec.externalIPs[{i}]"), m))?;
            }
        }
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, g) in ingress.into_iter().flatten().enumerate() {
            if let Some(Ok(ip)) = g.ip.as_deref().map(str::parse) {
                guard
                    .check_external(ip)
                    .map_err(|m| invalid(format!("status.loadBalancer.ingress[{i}].ip"), m))?;
            }
        }
        let Ok(ClusterIp::V4(ip)) = validate::cluster_ip(spec) else {
            continue;
        };
        guard
            .check(ip)
            .map_err(|m| invalid("spec.clusterIP".into(), m))?;
    }
    Ok(())
}

/// Gives every port of a NodePort or LoadBalancer Service in `objects`
/// its nodePort, as the API server does: an explicit one must lie in
/// `range` and be free (no other Service, in etcd or earlier in the file,
/// has that number, whatever the protocol); a port without one keeps
/// the number its Service has in `existing` (same port and protocol),
/// else gets the lowest free number of the range. Refusals name the
/// Service and the field.
pub fn allocate_node_ports(
    objects: &mut [Object],
    existing: &ServiceStore,
    range: NodePortRange,
) -> Result<(), StoreError> {
    let applied: std::collections::BTreeSet<ServiceName> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(_) => {
                let r = o.object_ref();
                Some(ServiceName::new(r.namespace.as_str(), r.name.as_str()))
            }
            _ => None,
        })
        .collect();
    // nodePort -> the Service that has it.
    let mut used: BTreeMap<u16, ServiceName> = BTreeMap::new();
    for name in existing.service_names() {
        if applied.contains(name) {
            continue;
        }
        for (_, _, np) in existing.node_ports(name) {
            used.entry(np).or_insert_with(|| name.clone());
        }
        if let Some(hc) = existing.health_check_node_port(name) {
            used.entry(hc).or_insert_with(|| name.clone());
        }
    }
    // Explicit ones first, so an allocation never takes a number a later
    // Service of the file asks for.
    for obj in objects.iter() {
        let Object::Service(svc) = obj else { continue };
        let name = ServiceName::new(
            obj.object_ref().namespace.as_str(),
            obj.object_ref().name.as_str(),
        );
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if !matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            continue;
        }
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let Some(np) = p.node_port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            let invalid = |message: String| StoreError::Invalid {
                object: obj.object_ref(),
                path: format!("spec.ports[{i}].nodePort"),
                message,
            };
            claim_explicit(&mut used, &name, np, range).map_err(invalid)?;
        }
        if wants_health_check(spec)
            && let Some(hc) = spec
                .health_check_node_port
                .and_then(|n| u16::try_from(n).ok())
        {
            claim_explicit(&mut used, &name, hc, range).map_err(|message| StoreError::Invalid {
                object: obj.object_ref(),
                path: "spec.healthCheckNodePort".into(),
                message,
            })?;
        }
    }
    let mut next = range.min;
    for obj in objects.iter_mut() {
        let r = obj.object_ref();
        let Object::Service(svc) = obj else { continue };
        let name = ServiceName::new(r.namespace.as_str(), r.name.as_str());
        let Some(spec) = svc.spec.as_mut() else {
            continue;
        };
        if !matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            continue;
        }
        let before = existing.node_ports(&name);
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            if p.node_port.is_some() {
                continue;
            }
            let proto = validate::protocol(p.protocol.as_deref()).ok();
            let kept = before
                .iter()
                .find(|(port, pr, np)| {
                    i32::from(*port) == p.port
                        && Some(*pr) == proto
                        && range.contains(*np)
                        && used.get(np).is_none_or(|o| *o == name)
                })
                .map(|(_, _, np)| *np);
            let np = match kept {
                Some(np) => np,
                None => next_free(&used, &mut next, range).ok_or_else(|| StoreError::Invalid {
                    object: r.clone(),
                    path: format!("spec.ports[{i}].nodePort"),
                    message: format!("no free nodePort left in the range {range}"),
                })?,
            };
            used.insert(np, name.clone());
            p.node_port = Some(i32::from(np));
        }
        // LoadBalancer with externalTrafficPolicy Local: the port load
        // balancers probe, from the same range, kept across applies.
        if wants_health_check(spec) && spec.health_check_node_port.is_none() {
            let kept = existing
                .health_check_node_port(&name)
                .filter(|hc| range.contains(*hc) && used.get(hc).is_none_or(|o| *o == name));
            let hc = match kept {
                Some(hc) => hc,
                None => next_free(&used, &mut next, range).ok_or_else(|| StoreError::Invalid {
                    object: r.clone(),
                    path: "spec.healthCheckNodePort".into(),
                    message: format!("no free nodePort left in the range {range}"),
                })?,
            };
            used.insert(hc, name.clone());
            spec.health_check_node_port = Some(i32::from(hc));
        }
    }
    Ok(())
}

/// Whether a Service gets a `healthCheckNodePort`: a LoadBalancer with
/// `externalTrafficPolicy: Local`, as the API server allocates it.
fn wants_health_check(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> bool {
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local")
}

/// Takes an explicit nodePort (or health check port) `np` for `name`:
/// inside `range` and held by no other Service.
fn claim_explicit(
    used: &mut BTreeMap<u16, ServiceName>,
    name: &ServiceName,
    np: u16,
    range: NodePortRange,
) -> Result<(), String> {
    if !range.contains(np) {
        return Err(format!(
            "{np} is outside the nodePort range {range} (apply --service-node-port-range, or NodePortRange in the network config)"
        ));
    }
    match used.get(&np) {
        Some(other) if other != name => {
            Err(format!("{np} is already allocated to service {other}"))
        }
        _ => {
            used.insert(np, name.clone());
            Ok(())
        }
    }
}

/// The lowest number from `next` on that no Service holds (`next` left
/// there), or `None` when the range is used up.
fn next_free(
    used: &BTreeMap<u16, ServiceName>,
    next: &mut u16,
    range: NodePortRange,
) -> Option<u16> {
    while used.contains_key(next) {
        if *next >= range.max {
            return None;
        }
        *next += 1;
    }
    Some(*next)
}

/// Frontends claimed by two Services once `objects` replace their
/// namesakes in `existing`: the first conflict that involves an object of
/// `objects`. Conflicts among `existing` alone are not this apply's.
pub fn check_conflicts(objects: &[Object], existing: &ServiceStore) -> Result<(), StoreError> {
    let new = ServiceStore::from_objects(objects.iter());
    let none = |_| false;
    let mut owner: BTreeMap<Frontend, ServiceName> = BTreeMap::new();
    for name in existing.service_names() {
        if new.contains(name) {
            continue;
        }
        for f in existing.frontends_for(name, &none).into_keys() {
            owner.entry(f).or_insert_with(|| name.clone());
        }
    }
    for name in new.service_names() {
        for f in new.frontends_for(name, &none).into_keys() {
            match owner.get(&f) {
                Some(other) if other != name => {
                    return Err(StoreError::Conflict {
                        object: ObjectRef::new(Kind::Service, name.namespace(), name.name()),
                        frontend: f,
                        other: other.clone(),
                    });
                }
                _ => {
                    owner.insert(f, name.clone());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> AddressGuard {
        let mut g = AddressGuard::new(
            "10.96.0.0/12".parse().unwrap(),
            Some("10.244.0.0/16".parse().unwrap()),
        );
        g.add_lease(
            "10.244.3.0/24".parse().unwrap(),
            "10.100.0.7".parse().unwrap(),
        );
        g
    }

    #[test]
    fn each_rule_refuses_on_its_own() {
        let mut g = guard();
        assert_eq!(g.check("10.96.0.10".parse().unwrap()), Ok(()));
        let e = g.check("10.100.0.7".parse().unwrap()).unwrap_err();
        assert!(
            e.starts_with("10.100.0.7 is a node address (the PublicIP of the lease 10.244.3.0/24)"),
            "{e}"
        );
        // A gateway outside the pod network (a lease the peer watch would
        // skip, but a gateway all the same) is named as such.
        g.pod_network = None;
        let e = g.check("10.244.3.1".parse().unwrap()).unwrap_err();
        assert!(
            e.starts_with("10.244.3.1 is the gateway of the lease 10.244.3.0/24"),
            "{e}"
        );
        let g = guard();
        let e = g.check("10.244.3.1".parse().unwrap()).unwrap_err();
        assert!(e.starts_with("10.244.3.1 is the gateway"), "{e}");
        let e = g.check("10.244.3.2".parse().unwrap()).unwrap_err();
        assert!(
            e.starts_with("10.244.3.2 is inside the pod network 10.244.0.0/16"),
            "{e}"
        );
        let e = g.check("10.200.0.1".parse().unwrap()).unwrap_err();
        assert!(
            e.starts_with("10.200.0.1 is outside the service CIDR 10.96.0.0/12"),
            "{e}"
        );
    }

    #[test]
    fn leases_come_and_go() {
        let mut g = guard();
        let (s, ip) = (
            "10.244.3.0/24".parse().unwrap(),
            "10.100.0.7".parse().unwrap(),
        );
        g.remove_lease(s, ip);
        assert_eq!(g.check(ip), Ok(()));
        // A PublicIP that moved to another subnet stays off limits when
        // the old lease goes.
        let other = "10.244.4.0/24".parse().unwrap();
        g.add_lease(s, ip);
        g.add_lease(other, ip);
        g.remove_lease(s, ip);
        assert!(g.check(ip).is_err());
    }

    #[test]
    fn flag_then_config_then_default() {
        let f: Ipv4Net = "10.100.0.0/16".parse().unwrap();
        let c: Ipv4Net = "10.200.0.0/16".parse().unwrap();
        assert_eq!(AddressGuard::service_cidr_of(Some(f), Some(c)), f);
        assert_eq!(AddressGuard::service_cidr_of(None, Some(c)), c);
        assert_eq!(
            AddressGuard::service_cidr_of(None, None),
            DEFAULT_SERVICE_CIDR.parse::<Ipv4Net>().unwrap()
        );
    }
}
