//! Checks `apply` makes against the cluster, beyond one object's own
//! validation ([`super::validate`]): a ClusterIP inside the service CIDR
//! and outside the pod network, and no frontend (ClusterIP, port,
//! protocol) claimed by two Services.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::manifest::Object;
use super::model::{Frontend, ServiceName, ServiceStore};
use super::object::{Kind, ObjectRef};
use super::store::StoreError;
use super::validate::{self, ClusterIp};

/// Kubernetes' default service CIDR (kube-apiserver
/// `--service-cluster-ip-range`).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

/// Where ClusterIPs may lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressGuard {
    /// ClusterIPs must lie inside it (`--service-cidr`).
    pub service_cidr: Ipv4Net,
    /// The cluster's pod network (`Network` of the network config), when
    /// known: no ClusterIP inside it.
    pub pod_network: Option<Ipv4Net>,
}

/// The first address problem of a Service in `objects`.
pub fn check_addresses(objects: &[Object], guard: &AddressGuard) -> Result<(), StoreError> {
    for obj in objects {
        let Object::Service(svc) = obj else { continue };
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let Ok(ClusterIp::V4(ip)) = validate::cluster_ip(spec) else {
            continue;
        };
        let invalid = |message: String| StoreError::Invalid {
            object: obj.object_ref(),
            path: "spec.clusterIP".into(),
            message,
        };
        if let Some(net) = guard.pod_network
            && net.contains(&ip)
        {
            return Err(invalid(format!(
                "{ip} is inside the pod network {net}: a ClusterIP cannot be a pod, node or gateway address"
            )));
        }
        if !guard.service_cidr.contains(&ip) {
            return Err(invalid(format!(
                "{ip} is outside the service CIDR {} (--service-cidr)",
                guard.service_cidr
            )));
        }
    }
    Ok(())
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
                        object: ObjectRef::new(Kind::Service, &name.namespace, &name.name),
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
