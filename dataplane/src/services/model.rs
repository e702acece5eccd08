//! The agent's in-memory copy of all Services, Endpoints and EndpointSlices,
//! and the frontends one service needs on this node.
//!
//! Only what the frontends are computed from is kept, not the Kubernetes
//! objects: each value is decoded ([`Decoded::new`]), validated, reduced
//! to a compact form (ClusterIP, ports, endpoint addresses and conditions)
//! and dropped, as it arrives from etcd. 10,000 Services with their
//! EndpointSlices take a few MB this way instead of tens.
//!
//! [`ServiceStore::apply`] takes the updates of the etcd watch and says
//! which services they may have changed, so the agent recomputes and
//! rewrites only those: updating one service among thousands costs one
//! service's work (service-semantics.md, point 10). Identical rewrites (a
//! re-applied file) change nothing and report nothing.
//!
//! Two Services may claim one frontend (ClusterIP, port, protocol) in etcd
//! (`apply` refuses that, but a write can race it or bypass the CLI). The
//! one created first (lower etcd create revision; the name breaks a tie)
//! owns it: [`ServiceStore::owner`]. When the owner goes, the next claimant
//! takes over, and [`ServiceStore::apply`] reports every claimant of a
//! frontend whose claims changed.
//!
//! [`ServiceStore::frontends_for`] follows kube-proxy:
//!
//! - Endpoints come from the service's IPv4 EndpointSlices (label
//!   `kubernetes.io/service-name`) if it has any, else from its Endpoints
//!   object (`addresses` ready, `notReadyAddresses` not). kube-proxy only
//!   reads slices; the Endpoints fallback is for users who write the older
//!   object by hand, as the Kubernetes docs still show.
//! - Slice conditions as the API defines them: `ready` nil = true,
//!   `serving` nil = true, `terminating` nil = false. Only an endpoint's
//!   first address is used (the API says they are fungible; kube-proxy does
//!   the same).
//! - Backends are the ready endpoints; if there are none, the serving and
//!   terminating ones (graceful termination); else none, and the data path
//!   rejects. With `internalTrafficPolicy: Local` the same rule is applied
//!   to this node's endpoints only.
//! - A service port finds its endpoint port by name (an unnamed one matches
//!   an unnamed one; a service with a single port also matches a slice with
//!   a single port when either is unnamed), else by the name in a string
//!   `targetPort`. The backend port is that endpoint port's number, as in
//!   kube-proxy: the endpoints controller already resolved `targetPort`
//!   into it. Only when the endpoint source lists no port at all (or a
//!   slice port without a number) does `targetPort` (a number) or else the
//!   service port itself give it; a named `targetPort` then matches
//!   nothing. A port whose protocol differs from the service port's is not
//!   used.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use super::manifest::Object;
use super::object::{Kind, ObjectRef, Proto, SERVICE_NAME_LABEL};
use super::validate::{self, ClusterIp, FieldError};

/// A service (or another namespaced object): namespace and name.
///
/// One shared allocation holding `namespace/name`: cloning it (the store's
/// indexes, the reconciler's owners and the status record each keep the
/// names of thousands of Services) takes a reference, not two strings.
/// Ordered by namespace, then name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServiceName {
    /// `namespace/name`.
    full: Arc<str>,
    /// Length of the namespace in `full`.
    ns_len: u32,
}

impl ServiceName {
    /// `namespace/name`.
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> ServiceName {
        let (namespace, name) = (namespace.as_ref(), name.as_ref());
        let mut full = String::with_capacity(namespace.len() + 1 + name.len());
        full.push_str(namespace);
        full.push('/');
        full.push_str(name);
        ServiceName {
            full: full.into(),
            ns_len: u32::try_from(namespace.len()).expect("a namespace shorter than 4 GiB"),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.full[..self.ns_len as usize]
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.full[self.ns_len as usize + 1..]
    }
}

impl Default for ServiceName {
    fn default() -> ServiceName {
        ServiceName::new("", "")
    }
}

impl Ord for ServiceName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl PartialOrd for ServiceName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceName")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// What a client connects to: ClusterIP, port, protocol; or, for a
/// north-south frontend, an externalIP or LoadBalancer ingress IP with a
/// service port, or a nodePort (address 0.0.0.0: every node's PublicIP;
/// the agent writes its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    /// The ClusterIP (or externalIP, LoadBalancer IP, 0.0.0.0 for a
    /// nodePort).
    pub ip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
}

/// Where a connection may be sent: endpoint address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    /// The endpoint (pod) address.
    pub ip: Ipv4Addr,
    /// The endpoint port.
    pub port: u16,
}

/// Everything the data path needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// The service it belongs to.
    pub service: ServiceName,
    /// The service port's name (empty when unnamed).
    pub port_name: String,
    /// The backends, sorted and without duplicates. Empty means "reject new
    /// connections" (no ready and no serving-terminating endpoint).
    pub backends: Vec<BackendAddr>,
    /// `Some` when `sessionAffinity` is ClientIP: how long a client keeps
    /// its backend after its last packet (default 10800 s).
    pub affinity_timeout: Option<Duration>,
    /// `Some` for a north-south frontend (nodePort, externalIP,
    /// LoadBalancer ingress IP): its `externalTrafficPolicy`.
    pub north_south: Option<TrafficPolicy>,
    /// A north-south frontend without backends here whose Service has
    /// endpoints on other nodes (`externalTrafficPolicy: Local`): new
    /// flows are dropped, as kube-proxy does. With no endpoints anywhere
    /// they are rejected.
    pub empty_drops: bool,
}

/// `spec.externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any endpoint; the client's source is SNATed to the node.
    Cluster,
    /// This node's endpoints only; the client's source is kept.
    Local,
}

/// One change seen by the etcd watch ([`super::watch_services`]).
#[derive(Clone, Debug, PartialEq)]
pub enum StoreUpdate {
    /// Everything, at one revision; replaces all that was known.
    Snapshot(ServiceStore),
    /// A key was written; its value, decoded ([`StoreUpdate::put`]).
    Put(Decoded),
    /// A key was deleted (`key` relative to the prefix).
    Delete {
        /// Key below the prefix.
        key: String,
    },
}

impl StoreUpdate {
    /// A write of `value` (the object as JSON) to `key` (relative to the
    /// prefix, e.g. `services/default/my-service`), created at etcd
    /// revision `create_revision`.
    pub fn put(key: &str, value: &[u8], create_revision: i64) -> StoreUpdate {
        StoreUpdate::Put(Decoded::new(key, value, create_revision))
    }
}

/// One line of `dataplane get services`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    /// The service.
    pub service: ServiceName,
    /// `spec.type`, `ClusterIP` when unset.
    pub service_type: String,
    /// `spec.clusterIP` as written (`None` for headless).
    pub cluster_ip: String,
    /// Its ports, kubectl style: `80/TCP`, or `http:80/TCP` when named.
    pub ports: Vec<String>,
    /// Distinct IPv4 endpoint addresses that are ready.
    pub ready_endpoints: usize,
    /// Distinct IPv4 endpoint addresses, ready or not.
    pub total_endpoints: usize,
}

/// A value from etcd, decoded into what the store keeps of it (or why it
/// is unusable). Built as values arrive, so the JSON and the Kubernetes
/// object are dropped at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded(Value);

#[derive(Clone, Debug, PartialEq)]
enum Value {
    /// Not one of our keys (other data in the key range): ignored.
    Ignored,
    /// Unusable: counted and logged, the last good value stays.
    Bad {
        key: Box<str>,
        why: String,
    },
    Service(ServiceName, SvcEntry),
    Endpoints(ServiceName, Box<[EpSet]>),
    Slice(SliceId, SliceEntry),
}

/// A slice: namespace and name.
type SliceId = ServiceName;

/// What a Service contributes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SvcEntry {
    /// etcd create revision: the older of two Services claiming one
    /// frontend keeps it.
    create_revision: i64,
    /// `spec.type` as written.
    type_: Option<Box<str>>,
    /// `spec.clusterIP` as written.
    cluster_ip: ClusterIpText,
    /// The ClusterIP when the service has frontends (IPv4, not
    /// ExternalName).
    frontend_ip: Option<Ipv4Addr>,
    /// `internalTrafficPolicy: Local`.
    local_only: bool,
    /// Session affinity timeout, seconds.
    affinity_timeout: Option<u32>,
    ports: Box<[SvcPort]>,
    /// `spec.externalIPs` (IPv4).
    external_ips: Box<[Ipv4Addr]>,
    /// `status.loadBalancer.ingress[].ip` (IPv4) of a LoadBalancer.
    lb_ips: Box<[Ipv4Addr]>,
    /// `externalTrafficPolicy: Local`.
    etp_local: bool,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with
    /// `externalTrafficPolicy: Local`: where the agent tells load
    /// balancers whether this node has an endpoint.
    health_check_node_port: Option<u16>,
}

/// `spec.clusterIP` as written, without a copy of the usual case: the
/// text of [`SvcEntry::frontend_ip`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum ClusterIpText {
    Unset,
    /// Exactly the text of the frontend IP.
    FrontendIp,
    Other(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct SvcPort {
    name: Box<str>,
    port: u16,
    proto: Proto,
    /// The backend port when the endpoints list none: a numeric
    /// `targetPort`, else the port itself; `None` for a named one.
    fallback: Option<u16>,
    /// A named `targetPort`.
    target_name: Option<Box<str>>,
    /// `nodePort` of a NodePort or LoadBalancer Service.
    node_port: Option<u16>,
}

impl SvcEntry {
    /// The frontends this Service claims, each with the port it serves
    /// and whether it is north-south (nodePort, externalIP, LoadBalancer
    /// IP) rather than its ClusterIP.
    fn frontends_of(&self) -> impl Iterator<Item = (Frontend, &SvcPort, bool)> + '_ {
        self.frontend_ip.into_iter().flat_map(move |ip| {
            self.ports.iter().flat_map(move |p| {
                let at = move |ip: Ipv4Addr, port: u16, ns: bool| {
                    (
                        Frontend {
                            ip,
                            port,
                            proto: p.proto,
                        },
                        p,
                        ns,
                    )
                };
                std::iter::once(at(ip, p.port, false))
                    .chain(p.node_port.map(|np| at(Ipv4Addr::UNSPECIFIED, np, true)))
                    .chain(
                        self.external_ips
                            .iter()
                            .chain(self.lb_ips.iter())
                            .map(move |x| at(*x, p.port, true)),
                    )
            })
        })
    }

    /// The frontends this Service claims.
    fn frontends(&self) -> impl Iterator<Item = Frontend> + '_ {
        self.frontends_of().map(|(f, _, _)| f)
    }
}

/// What an EndpointSlice contributes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceEntry {
    /// The Service its `kubernetes.io/service-name` label names (in the
    /// slice's namespace).
    service: Option<ServiceName>,
    /// `addressType: IPv4`; other slices keep no endpoints.
    ipv4: bool,
    set: EpSet,
}

/// An endpoint's conditions, as booleans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cond {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Cond {
    fn merge(self, o: Cond) -> Cond {
        Cond {
            ready: self.ready || o.ready,
            serving: self.serving || o.serving,
            terminating: self.terminating || o.terminating,
        }
    }
}

/// A port of an Endpoints subset or an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EpPort {
    name: Box<str>,
    port: Option<u16>,
    /// `None`: a protocol we do not carry.
    proto: Option<Proto>,
}

/// One Endpoints subset or one EndpointSlice, normalized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct EpSet {
    ports: Box<[EpPort]>,
    endpoints: Box<[(Ipv4Addr, Cond)]>,
}

/// Decodes a stored value and checks it belongs under its key.
fn decode<T: DeserializeOwned>(
    r: &ObjectRef,
    value: &[u8],
    meta: fn(&T) -> &ObjectMeta,
    check: fn(&T) -> Vec<FieldError>,
) -> Result<T, String> {
    let obj: T = serde_json::from_slice(value).map_err(|e| format!("not a {}: {e}", r.kind))?;
    let m = meta(&obj);
    if m.name.as_deref() != Some(r.name.as_str()) {
        return Err(format!(
            "metadata.name {:?} does not match the key",
            m.name.as_deref().unwrap_or_default()
        ));
    }
    if let Some(ns) = m.namespace.as_deref()
        && ns != r.namespace
    {
        return Err(format!("metadata.namespace {ns:?} does not match the key"));
    }
    let problems = check(&obj);
    if let Some(p) = problems.first() {
        return Err(format!("invalid: {}: {}", p.path, p.message));
    }
    Ok(obj)
}

fn boxed(s: Option<&str>) -> Box<str> {
    s.unwrap_or_default().into()
}

fn svc_entry(svc: &Service, create_revision: i64) -> SvcEntry {
    let spec = svc.spec.as_ref();
    let type_ = spec.and_then(|s| s.type_.as_deref());
    let external = type_ == Some("ExternalName");
    let node_ports = matches!(type_, Some("NodePort" | "LoadBalancer"));
    let frontend_ip = match spec.map(validate::cluster_ip) {
        Some(Ok(ClusterIp::V4(ip))) if !external => Some(ip),
        _ => None,
    };
    let ports = spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|sp| {
            let port = validate::port_number(sp.port).ok()?;
            let proto = validate::protocol(sp.protocol.as_deref()).ok()?;
            let (fallback, target_name) = match &sp.target_port {
                None => (Some(port), None),
                Some(IntOrString::Int(n)) => (validate::port_number(*n).ok(), None),
                Some(IntOrString::String(s)) => (None, Some(s.as_str().into())),
            };
            Some(SvcPort {
                name: boxed(sp.name.as_deref()),
                port,
                proto,
                fallback,
                target_name,
                node_port: if node_ports {
                    sp.node_port.and_then(|n| validate::port_number(n).ok())
                } else {
                    None
                },
            })
        })
        .collect();
    let v4 = |list: Option<&Vec<String>>| -> Box<[Ipv4Addr]> {
        list.into_iter()
            .flatten()
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    let lb_ips: Box<[Ipv4Addr]> = if type_ == Some("LoadBalancer") {
        svc.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect()
    } else {
        Box::new([])
    };
    let etp_local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    SvcEntry {
        create_revision,
        type_: spec.and_then(|s| s.type_.as_deref()).map(Into::into),
        cluster_ip: match spec.and_then(|s| s.cluster_ip.as_deref()) {
            None => ClusterIpText::Unset,
            Some(t) if frontend_ip.is_some_and(|ip| ip.to_string() == t) => {
                ClusterIpText::FrontendIp
            }
            Some(t) => ClusterIpText::Other(t.into()),
        },
        frontend_ip,
        local_only: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
        affinity_timeout: spec.and_then(validate::affinity_timeout_secs),
        ports,
        external_ips: if external {
            Box::new([])
        } else {
            v4(spec.and_then(|s| s.external_ips.as_ref()))
        },
        lb_ips,
        etp_local,
        health_check_node_port: spec
            .filter(|s| etp_local && s.type_.as_deref() == Some("LoadBalancer"))
            .and_then(|s| s.health_check_node_port)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0),
    }
}

fn endpoints_sets(ep: &Endpoints) -> Box<[EpSet]> {
    ep.subsets
        .iter()
        .flatten()
        .map(|subset| {
            let ports = subset
                .ports
                .iter()
                .flatten()
                .map(|p| EpPort {
                    name: boxed(p.name.as_deref()),
                    port: validate::port_number(p.port).ok(),
                    proto: validate::protocol(p.protocol.as_deref()).ok(),
                })
                .collect();
            let ready = Cond {
                ready: true,
                serving: true,
                terminating: false,
            };
            let endpoints = subset
                .addresses
                .iter()
                .flatten()
                .map(|a| (a, ready))
                .chain(
                    subset
                        .not_ready_addresses
                        .iter()
                        .flatten()
                        .map(|a| (a, Cond::default())),
                )
                .filter_map(|(a, c)| Some((a.ip.parse().ok()?, c)))
                .collect();
            EpSet { ports, endpoints }
        })
        .collect()
}

fn slice_entry(namespace: &str, slice: &EndpointSlice) -> SliceEntry {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(|s| ServiceName::new(namespace, s));
    let ipv4 = slice.address_type == "IPv4";
    if !ipv4 {
        return SliceEntry {
            service,
            ipv4,
            set: EpSet::default(),
        };
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .map(|p| EpPort {
            name: boxed(p.name.as_deref()),
            port: p.port.and_then(|n| validate::port_number(n).ok()),
            proto: validate::protocol(p.protocol.as_deref()).ok(),
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| {
            let ip: Ipv4Addr = e.addresses.first()?.parse().ok()?;
            let c = e.conditions.as_ref();
            Some((
                ip,
                Cond {
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    serving: c.and_then(|c| c.serving).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                },
            ))
        })
        .collect();
    SliceEntry {
        service,
        ipv4,
        set: EpSet { ports, endpoints },
    }
}

impl Decoded {
    /// Decodes `value` (the object as JSON) stored at `key` (relative to
    /// the prefix), created at etcd revision `create_revision`.
    pub fn new(key: &str, value: &[u8], create_revision: i64) -> Decoded {
        let bad = |why: String| {
            Decoded(Value::Bad {
                key: key.into(),
                why,
            })
        };
        let Some(r) = ObjectRef::parse_relative_key(key) else {
            if key.split('/').next().and_then(Kind::from_dir).is_some() {
                return bad("malformed key (want <kind>/<namespace>/<name>)".into());
            }
            return Decoded(Value::Ignored);
        };
        let sn = || ServiceName::new(r.namespace.as_str(), r.name.as_str());
        let v = match r.kind {
            Kind::Service => decode(&r, value, |s: &Service| &s.metadata, validate::service)
                .map(|svc| Value::Service(sn(), svc_entry(&svc, create_revision))),
            Kind::Endpoints => decode(&r, value, |e: &Endpoints| &e.metadata, validate::endpoints)
                .map(|ep| Value::Endpoints(sn(), endpoints_sets(&ep))),
            Kind::EndpointSlice => decode(
                &r,
                value,
                |s: &EndpointSlice| &s.metadata,
                validate::endpoint_slice,
            )
            .map(|s| {
                Value::Slice(
                    ServiceName::new(r.namespace.as_str(), r.name.as_str()),
                    slice_entry(r.namespace.as_str(), &s),
                )
            }),
        };
        v.map_or_else(bad, Decoded)
    }

    /// A value that is no use: counted as malformed (a key that is not
    /// UTF-8, say).
    pub(crate) fn bad(key: &str, why: &str) -> Decoded {
        Decoded(Value::Bad {
            key: key.into(),
            why: why.into(),
        })
    }
}

/// All Services, Endpoints and EndpointSlices, by namespace and name, in
/// compact form.
///
/// Values that do not decode, do not match their key, or fail validation
/// are logged, counted in [`ServiceStore::malformed`] and skipped: the last
/// good version of that object, if any, stays in force.
#[derive(Clone, Debug, Default)]
pub struct ServiceStore {
    services: BTreeMap<ServiceName, SvcEntry>,
    endpoints: BTreeMap<ServiceName, Box<[EpSet]>>,
    slices: BTreeMap<SliceId, SliceEntry>,
    /// (service, slice name) for each slice, by its service-name label.
    /// One tree rather than a set per service: a set's first node alone
    /// takes a few hundred bytes.
    slices_by_service: BTreeSet<(ServiceName, SliceId)>,
    /// (frontend, create revision, service) for each claim: the claimants
    /// of one frontend are adjacent, oldest first.
    claims: BTreeSet<(Frontend, i64, ServiceName)>,
    /// The etcd revision the store was listed at (0 when not listed).
    revision: i64,
    malformed: u64,
}

/// Stores compare by content; the malformed counter and the revision are
/// history, not state.
impl PartialEq for ServiceStore {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.endpoints == other.endpoints
            && self.slices == other.slices
    }
}

impl ServiceStore {
    /// An empty store.
    pub fn new() -> ServiceStore {
        ServiceStore::default()
    }

    /// A store holding `entries` (keys relative to the prefix, values as
    /// in etcd, create revisions), as listed at one revision. Bad entries
    /// are skipped and counted.
    pub fn from_entries(entries: impl IntoIterator<Item = (String, Vec<u8>, i64)>) -> ServiceStore {
        let mut store = ServiceStore::new();
        for (key, value, rev) in entries {
            store.insert(Decoded::new(&key, &value, rev));
        }
        store
    }

    /// A store holding `objects` (as if applied, newer than anything in
    /// etcd: create revision `i64::MAX`).
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Object>) -> ServiceStore {
        ServiceStore::from_entries(
            objects
                .into_iter()
                .map(|o| (o.object_ref().relative_key(), o.to_json(), i64::MAX)),
        )
    }

    /// Adds one decoded value (listing).
    pub(crate) fn insert(&mut self, d: Decoded) {
        self.put(d);
    }

    /// Rebuilds the store's trees with full nodes ([`crate::compact`]);
    /// the content stays the same.
    pub fn compact(&mut self) {
        use crate::compact::rebuilt;
        self.services = rebuilt(std::mem::take(&mut self.services));
        self.endpoints = rebuilt(std::mem::take(&mut self.endpoints));
        self.slices = rebuilt(std::mem::take(&mut self.slices));
        self.slices_by_service = rebuilt(std::mem::take(&mut self.slices_by_service));
        self.claims = rebuilt(std::mem::take(&mut self.claims));
    }

    /// The revision the store was listed at (0 when built otherwise).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub(crate) fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }

    /// Applies one update; returns the services whose frontends may have
    /// changed. For a Put or Delete that is the service named by the key
    /// (for an EndpointSlice, the service of its label before and after;
    /// for a Service, also every other claimant of its frontends before
    /// and after), and nothing when the value is unchanged or unusable.
    /// For a Snapshot it is every service known before or after.
    pub fn apply(&mut self, update: StoreUpdate) -> BTreeSet<ServiceName> {
        match update {
            StoreUpdate::Put(d) => self.put(d),
            StoreUpdate::Delete { key } => self.delete(&key),
            StoreUpdate::Snapshot(new) => {
                let mut names = self.referenced_names();
                names.extend(new.referenced_names());
                let malformed = self.malformed + new.malformed;
                *self = new;
                self.malformed = malformed;
                names
            }
        }
    }

    /// Values skipped so far because they were unusable (each observation
    /// counts; a bad value listed again at a re-list counts again).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Every name a service, Endpoints or slice label refers to.
    fn referenced_names(&self) -> BTreeSet<ServiceName> {
        self.services
            .keys()
            .chain(self.endpoints.keys())
            .chain(self.slices_by_service.iter().map(|(n, _)| n))
            .cloned()
            .collect()
    }

    fn put(&mut self, d: Decoded) -> BTreeSet<ServiceName> {
        match d.0 {
            Value::Ignored => BTreeSet::new(),
            Value::Bad { key, why } => {
                self.malformed += 1;
                log::warn!("ignoring services entry {key}: {why}");
                BTreeSet::new()
            }
            Value::Service(sn, entry) => {
                if self.services.get(&sn) == Some(&entry) {
                    return BTreeSet::new();
                }
                let sn = self.shared(sn);
                let mut touched = self.unclaim(&sn);
                for f in entry.frontends() {
                    self.claims.insert((f, entry.create_revision, sn.clone()));
                }
                for f in entry.frontends() {
                    touched.extend(self.claimants_of(f).cloned());
                }
                touched.insert(sn.clone());
                self.services.insert(sn, entry);
                touched
            }
            Value::Endpoints(sn, sets) => {
                if self.endpoints.get(&sn) == Some(&sets) {
                    return BTreeSet::new();
                }
                self.endpoints.insert(sn.clone(), sets);
                BTreeSet::from([sn])
            }
            Value::Slice(id, mut entry) => {
                if self.slices.get(&id) == Some(&entry) {
                    return BTreeSet::new();
                }
                let mut touched = self.remove_slice(&id);
                if let Some(svc) = entry.service.take() {
                    let svc = self.shared(svc);
                    self.slices_by_service.insert((svc.clone(), id.clone()));
                    touched.insert(svc.clone());
                    entry.service = Some(svc);
                }
                self.slices.insert(id, entry);
                touched
            }
        }
    }

    /// Withdraws `sn`'s claims; returns every claimant (left) of the
    /// frontends it claimed.
    fn unclaim(&mut self, sn: &ServiceName) -> BTreeSet<ServiceName> {
        let Some(old) = self.services.get(sn) else {
            return BTreeSet::new();
        };
        let rev = old.create_revision;
        let fronts: Vec<Frontend> = old.frontends().collect();
        let mut touched = BTreeSet::new();
        for f in fronts {
            self.claims.remove(&(f, rev, sn.clone()));
            touched.extend(self.claimants_of(f).cloned());
        }
        touched
    }

    /// The services claiming `f`, oldest first.
    fn claimants_of(&self, f: Frontend) -> impl Iterator<Item = &ServiceName> {
        self.claims
            .range((f, i64::MIN, ServiceName::default())..)
            .take_while(move |(g, _, _)| *g == f)
            .map(|(_, _, n)| n)
    }

    /// `name` as this store already holds it (a Service, or the label of
    /// a slice), so the copies in its indexes share one allocation.
    fn shared(&self, name: ServiceName) -> ServiceName {
        if let Some((k, _)) = self.services.get_key_value(&name) {
            return k.clone();
        }
        match self
            .slices_by_service
            .range((name.clone(), ServiceName::default())..)
            .next()
        {
            Some((n, _)) if *n == name => n.clone(),
            _ => name,
        }
    }

    /// The slices labelled for `name`.
    fn slice_ids<'a>(&'a self, name: &ServiceName) -> impl Iterator<Item = &'a SliceId> + 'a {
        let name = name.clone();
        self.slices_by_service
            .range((name.clone(), ServiceName::default())..)
            .take_while(move |(n, _)| *n == name)
            .map(|(_, s)| s)
    }

    /// Removes a slice and its index entry; returns its old service.
    fn remove_slice(&mut self, id: &SliceId) -> BTreeSet<ServiceName> {
        let Some(old) = self.slices.remove(id) else {
            return BTreeSet::new();
        };
        let Some(svc) = old.service else {
            return BTreeSet::new();
        };
        self.slices_by_service.remove(&(svc.clone(), id.clone()));
        BTreeSet::from([svc])
    }

    fn delete(&mut self, key: &str) -> BTreeSet<ServiceName> {
        let Some(r) = ObjectRef::parse_relative_key(key) else {
            return BTreeSet::new();
        };
        let sn = ServiceName::new(r.namespace.as_str(), r.name.as_str());
        match r.kind {
            Kind::Service => {
                let mut touched = self.unclaim(&sn);
                if self.services.remove(&sn).is_some() {
                    touched.insert(sn);
                }
                touched
            }
            Kind::Endpoints => {
                if self.endpoints.remove(&sn).is_some() {
                    BTreeSet::from([sn])
                } else {
                    BTreeSet::new()
                }
            }
            Kind::EndpointSlice => {
                self.remove_slice(&ServiceName::new(r.namespace.as_str(), r.name.as_str()))
            }
        }
    }

    /// The names of all services, in order.
    pub fn service_names(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.keys()
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are no services.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Whether a service is known.
    pub fn contains(&self, name: &ServiceName) -> bool {
        self.services.contains_key(name)
    }

    /// Whether an Endpoints object named like `name` is known.
    pub fn has_endpoints(&self, name: &ServiceName) -> bool {
        self.endpoints.contains_key(name)
    }

    /// How many EndpointSlices are labelled for a service.
    pub fn endpoint_slice_count(&self, name: &ServiceName) -> usize {
        self.slice_ids(name).count()
    }

    /// The IPv4 ClusterIP of a service with frontends.
    pub fn cluster_ip(&self, name: &ServiceName) -> Option<Ipv4Addr> {
        self.services.get(name)?.frontend_ip
    }

    /// The nodePorts of a service: (service port, protocol, nodePort).
    pub fn node_ports(&self, name: &ServiceName) -> Vec<(u16, Proto, u16)> {
        self.services
            .get(name)
            .map(|e| {
                e.ports
                    .iter()
                    .filter_map(|p| Some((p.port, p.proto, p.node_port?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `healthCheckNodePort` of a LoadBalancer Service with
    /// `externalTrafficPolicy: Local`.
    pub fn health_check_node_port(&self, name: &ServiceName) -> Option<u16> {
        self.services.get(name)?.health_check_node_port
    }

    /// The etcd create revision of a service.
    pub fn create_revision(&self, name: &ServiceName) -> Option<i64> {
        Some(self.services.get(name)?.create_revision)
    }

    /// The service that owns frontend `f`: of those claiming it, the one
    /// created first.
    pub fn owner(&self, f: &Frontend) -> Option<&ServiceName> {
        self.claimants_of(*f).next()
    }

    /// The services with a frontend on `ip`.
    pub fn services_on(&self, ip: Ipv4Addr) -> BTreeSet<ServiceName> {
        let lo = Frontend {
            ip,
            port: 0,
            proto: Proto::Tcp,
        };
        self.claims
            .range((lo, i64::MIN, ServiceName::default())..)
            .take_while(|(f, _, _)| f.ip == ip)
            .map(|(_, _, n)| n.clone())
            .collect()
    }

    /// The endpoint source of a service: its IPv4 slices if it has any,
    /// else its Endpoints subsets.
    fn endpoint_sets<'a>(&'a self, name: &ServiceName) -> Vec<&'a EpSet> {
        let slices: Vec<&EpSet> = self
            .slice_ids(name)
            .filter_map(|slice| self.slices.get(slice))
            .filter(|s| s.ipv4)
            .map(|s| &s.set)
            .collect();
        if !slices.is_empty() {
            return slices;
        }
        self.endpoints
            .get(name)
            .map(|sets| sets.iter().collect())
            .unwrap_or_default()
    }

    /// The frontends of one service as this node must program them, by
    /// frontend. `is_local(ip)` says whether an endpoint address is a pod of
    /// this node (the agent passes "ip is in my pod subnet"); it matters
    /// only for `internalTrafficPolicy: Local`. Empty for an unknown,
    /// headless or ExternalName service. Frontends another (older) service
    /// owns are included: see [`ServiceStore::owner`].
    pub fn frontends_for(
        &self,
        svc: &ServiceName,
        is_local: &dyn Fn(Ipv4Addr) -> bool,
    ) -> BTreeMap<Frontend, FrontendSpec> {
        let mut out = BTreeMap::new();
        let Some(entry) = self.services.get(svc) else {
            return out;
        };
        if entry.frontend_ip.is_none() {
            return out;
        }
        let affinity_timeout = entry
            .affinity_timeout
            .map(|s| Duration::from_secs(s.into()));
        let sets = self.endpoint_sets(svc);
        // Backends of each port, once for `local` = false and true.
        let mut cache: BTreeMap<(u16, Proto, bool), Vec<BackendAddr>> = BTreeMap::new();
        for (f, sp, ns) in entry.frontends_of() {
            let local = if ns {
                entry.etp_local
            } else {
                entry.local_only
            };
            let mut backends_of = |local: bool| {
                cache
                    .entry((sp.port, sp.proto, local))
                    .or_insert_with(|| {
                        let mut eps: BTreeMap<BackendAddr, Cond> = BTreeMap::new();
                        for set in &sets {
                            let Some(target) = resolve_port(sp, entry.ports.len(), set) else {
                                continue;
                            };
                            for &(ip, cond) in set.endpoints.iter() {
                                if local && !is_local(ip) {
                                    continue;
                                }
                                let e = eps.entry(BackendAddr { ip, port: target }).or_default();
                                *e = e.merge(cond);
                            }
                        }
                        choose_backends(&eps)
                    })
                    .clone()
            };
            let backends = backends_of(local);
            let empty_drops = ns && local && backends.is_empty() && !backends_of(false).is_empty();
            out.entry(f).or_insert_with(|| FrontendSpec {
                service: svc.clone(),
                port_name: sp.name.to_string(),
                backends,
                affinity_timeout,
                north_south: ns.then_some(if entry.etp_local {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                }),
                empty_drops,
            });
        }
        out
    }

    /// Distinct IPv4 endpoint addresses of a Service: (ready, total).
    pub fn endpoint_counts(&self, name: &ServiceName) -> (usize, usize) {
        let mut addrs: BTreeMap<Ipv4Addr, bool> = BTreeMap::new();
        for set in self.endpoint_sets(name) {
            for (ip, c) in set.endpoints.iter() {
                *addrs.entry(*ip).or_default() |= c.ready;
            }
        }
        (addrs.values().filter(|r| **r).count(), addrs.len())
    }

    /// One line per service for `dataplane get services`, in name order.
    pub fn summary(&self) -> Vec<ServiceSummary> {
        self.services
            .iter()
            .map(|(name, svc)| {
                let ports = svc
                    .ports
                    .iter()
                    .map(|p| {
                        // kubectl's form: `80:30080/TCP` with a nodePort.
                        let port = match p.node_port {
                            Some(np) => format!("{}:{np}", p.port),
                            None => p.port.to_string(),
                        };
                        if p.name.is_empty() {
                            format!("{port}/{}", p.proto)
                        } else {
                            format!("{}:{port}/{}", p.name, p.proto)
                        }
                    })
                    .collect();
                let (ready_endpoints, total_endpoints) = self.endpoint_counts(name);
                ServiceSummary {
                    service: name.clone(),
                    service_type: svc.type_.as_deref().unwrap_or("ClusterIP").to_string(),
                    cluster_ip: match &svc.cluster_ip {
                        ClusterIpText::Unset => "<none>".to_string(),
                        ClusterIpText::FrontendIp => {
                            svc.frontend_ip.map(|ip| ip.to_string()).unwrap_or_default()
                        }
                        ClusterIpText::Other(t) => t.to_string(),
                    },
                    ports,
                    ready_endpoints,
                    total_endpoints,
                }
            })
            .collect()
    }
}

/// The backend port for service port `sp` in endpoint set `set`, or `None`
/// when the set has no matching port (see the module docs).
fn resolve_port(sp: &SvcPort, n_service_ports: usize, set: &EpSet) -> Option<u16> {
    if set.ports.is_empty() {
        return sp.fallback;
    }
    let pick = |p: &EpPort| {
        if p.proto == Some(sp.proto) {
            p.port.or(sp.fallback)
        } else {
            None
        }
    };
    if let Some(p) = set.ports.iter().find(|p| p.name == sp.name) {
        return pick(p);
    }
    if let Some(target) = &sp.target_name
        && let Some(p) = set.ports.iter().find(|p| p.name == *target)
    {
        return pick(p);
    }
    if let [only] = &*set.ports
        && n_service_ports == 1
        && (sp.name.is_empty() || only.name.is_empty())
    {
        return pick(only);
    }
    None
}

/// Ready endpoints; else serving-and-terminating ones; else none.
fn choose_backends(eps: &BTreeMap<BackendAddr, Cond>) -> Vec<BackendAddr> {
    let ready: Vec<BackendAddr> = eps
        .iter()
        .filter(|(_, c)| c.ready)
        .map(|(a, _)| *a)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.iter()
        .filter(|(_, c)| c.serving && c.terminating)
        .map(|(a, _)| *a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::manifest::parse_manifests;

    fn store(yaml: &str) -> ServiceStore {
        let objs = parse_manifests(yaml).unwrap();
        ServiceStore::from_objects(&objs)
    }

    fn sn(name: &str) -> ServiceName {
        ServiceName::new("default", name)
    }

    fn b(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn nowhere(_: Ipv4Addr) -> bool {
        false
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  \
                       clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";

    fn slice(name: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: {ports}\n\
             endpoints: {endpoints}\n"
        )
    }

    fn backends(s: &ServiceStore, f: Frontend) -> Vec<BackendAddr> {
        s.frontends_for(&sn("web"), &nowhere)[&f].backends.clone()
    }

    #[test]
    fn ready_endpoints_only() {
        let s = store(&format!(
            "{SVC}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.3]}, {addresses: [10.244.1.2], conditions: {ready: true}}, \
                 {addresses: [10.244.2.2], conditions: {ready: false}}]"
            )
        ));
        let f = s.frontends_for(&sn("web"), &nowhere);
        assert_eq!(f.len(), 1);
        let spec = &f[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(spec.service, sn("web"));
        assert_eq!(spec.port_name, "http");
        assert_eq!(
            spec.backends,
            vec![b("10.244.1.2", 8080), b("10.244.1.3", 8080)]
        );
        assert_eq!(spec.affinity_timeout, None);
    }

    #[test]
    fn terminating_fallback() {
        let eps = "[{addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}}, \
                   {addresses: [10.244.1.3], conditions: {ready: false, serving: false, terminating: true}}, \
                   {addresses: [10.244.1.4], conditions: {ready: false}}]";
        let s = store(&format!(
            "{SVC}{}",
            slice("web-1", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            backends(&s, fe("10.96.0.10", 80, Proto::Tcp)),
            vec![b("10.244.1.2", 8080)]
        );
        // A ready endpoint anywhere (another slice) wins over the fallback.
        let s = store(&format!(
            "{SVC}{}{}",
            slice("web-1", "[{name: http, port: 8080}]", eps),
            slice(
                "web-2",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.2.9]}]"
            )
        ));
        assert_eq!(
            backends(&s, fe("10.96.0.10", 80, Proto::Tcp)),
            vec![b("10.244.2.9", 8080)]
        );
        // Nothing ready, nothing serving-terminating: the frontend stays,
        // with no backends, so the data path rejects.
        let s = store(&format!(
            "{SVC}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.4], conditions: {ready: false, serving: false}}]"
            )
        ));
        assert_eq!(backends(&s, fe("10.96.0.10", 80, Proto::Tcp)), vec![]);
        let s = store(SVC);
        assert_eq!(backends(&s, fe("10.96.0.10", 80, Proto::Tcp)), vec![]);
    }

    #[test]
    fn external_traffic_policy_local_drops_only_with_endpoints_elsewhere() {
        let svc = SVC
            .replace(
                "  ports:",
                "  type: NodePort\n  externalTrafficPolicy: Local\n  ports:",
            )
            .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
        let s = store(&format!(
            "{svc}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.2.2]}]"
            )
        ));
        let node1 = |ip: Ipv4Addr| ip.octets()[2] == 1;
        let node2 = |ip: Ipv4Addr| ip.octets()[2] == 2;
        let np = fe("0.0.0.0", 30080, Proto::Tcp);
        let cip = fe("10.96.0.10", 80, Proto::Tcp);
        // Node 1 has none of the endpoints: its nodePort drops.
        let f = s.frontends_for(&sn("web"), &node1);
        assert_eq!(f[&np].north_south, Some(TrafficPolicy::Local));
        assert_eq!(f[&np].backends, vec![]);
        assert!(f[&np].empty_drops);
        // The ClusterIP is not north-south: all endpoints, never drops.
        assert_eq!(f[&cip].backends, vec![b("10.244.2.2", 8080)]);
        assert!(!f[&cip].empty_drops);
        // Node 2 has it.
        let f = s.frontends_for(&sn("web"), &node2);
        assert_eq!(f[&np].backends, vec![b("10.244.2.2", 8080)]);
        assert!(!f[&np].empty_drops);
        // No endpoints anywhere: rejected everywhere, as kube-proxy does.
        let s = store(&svc);
        let f = s.frontends_for(&sn("web"), &node1);
        assert_eq!(f[&np].backends, vec![]);
        assert!(!f[&np].empty_drops);
    }

    #[test]
    fn internal_traffic_policy_local() {
        let svc = SVC.replace("  ports:", "  internalTrafficPolicy: Local\n  ports:");
        let eps = "[{addresses: [10.244.1.2]}, {addresses: [10.244.2.2]}, \
                   {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}}]";
        let s = store(&format!(
            "{svc}{}",
            slice("web-1", "[{name: http, port: 8080}]", eps)
        ));
        let node1 = |ip: Ipv4Addr| ip.octets()[2] == 1;
        let node2 = |ip: Ipv4Addr| ip.octets()[2] == 2;
        let node3 = |ip: Ipv4Addr| ip.octets()[2] == 3;
        let f = fe("10.96.0.10", 80, Proto::Tcp);
        assert_eq!(
            s.frontends_for(&sn("web"), &node1)[&f].backends,
            vec![b("10.244.1.2", 8080)]
        );
        assert_eq!(
            s.frontends_for(&sn("web"), &node2)[&f].backends,
            vec![b("10.244.2.2", 8080)]
        );
        assert_eq!(s.frontends_for(&sn("web"), &node3)[&f].backends, vec![]);
        // The terminating fallback applies to the local set alone.
        let eps = "[{addresses: [10.244.2.2]}, \
                   {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}}]";
        let s = store(&format!(
            "{svc}{}",
            slice("web-1", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            s.frontends_for(&sn("web"), &node1)[&f].backends,
            vec![b("10.244.1.3", 8080)]
        );
        // Cluster policy ignores locality.
        let s = store(&format!(
            "{SVC}{}",
            slice("web-1", "[{name: http, port: 8080}]", eps)
        ));
        assert_eq!(
            s.frontends_for(&sn("web"), &node1)[&f].backends,
            vec![b("10.244.2.2", 8080)]
        );
    }

    #[test]
    fn named_target_port() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  \
                   clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: web-port}\n  \
                   - {name: metrics, port: 9090, targetPort: prom}\n";
        // Each slice resolves the name to its own port number (pods of
        // two versions during a rollout, listening on different ports).
        let s = store(&format!(
            "{svc}{}{}",
            slice(
                "web-1",
                "[{name: web-port, port: 8080}, {name: other, port: 1}]",
                "[{addresses: [10.244.1.2]}]"
            ),
            slice(
                "web-2",
                "[{name: web-port, port: 8081}]",
                "[{addresses: [10.244.2.2]}]"
            )
        ));
        let f = s.frontends_for(&sn("web"), &nowhere);
        assert_eq!(
            f[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![b("10.244.1.2", 8080), b("10.244.2.2", 8081)]
        );
        // No endpoint port named "prom" nor "metrics": no backends.
        assert_eq!(f[&fe("10.96.0.10", 9090, Proto::Tcp)].backends, vec![]);
        // The endpoints controller names slice ports after the service
        // port; that match comes first.
        let s = store(&format!(
            "{svc}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}, {name: metrics, port: 9100}]",
                "[{addresses: [10.244.1.2]}]"
            ),
        ));
        let f = s.frontends_for(&sn("web"), &nowhere);
        assert_eq!(
            f[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![b("10.244.1.2", 8080)]
        );
        assert_eq!(
            f[&fe("10.96.0.10", 9090, Proto::Tcp)].backends,
            vec![b("10.244.1.2", 9100)]
        );
    }

    #[test]
    fn target_port_number_and_default() {
        // No ports in the slice: targetPort gives the backend port, or the
        // service port when targetPort is absent.
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  \
                   clusterIP: 10.96.0.10\n  ports:\n  - {name: a, port: 80, targetPort: 8080}\n  \
                   - {name: b, port: 81}\n";
        let s = store(&format!(
            "{svc}{}",
            slice("web-1", "[]", "[{addresses: [10.244.1.2]}]")
        ));
        let f = s.frontends_for(&sn("web"), &nowhere);
        assert_eq!(
            f[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![b("10.244.1.2", 8080)]
        );
        assert_eq!(
            f[&fe("10.96.0.10", 81, Proto::Tcp)].backends,
            vec![b("10.244.1.2", 81)]
        );
        // A single unnamed port on each side matches.
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  \
                   clusterIP: 10.96.0.10\n  ports:\n  - {port: 80, targetPort: 9376}\n";
        let s = store(&format!(
            "{svc}{}",
            slice("web-1", "[{port: 9376}]", "[{addresses: [10.244.1.2]}]")
        ));
        assert_eq!(
            backends(&s, fe("10.96.0.10", 80, Proto::Tcp)),
            vec![b("10.244.1.2", 9376)]
        );
    }

    #[test]
    fn endpoints_vs_endpoint_slices() {
        let endpoints = "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets:\n\
                         - addresses: [{ip: 10.244.9.1}, {ip: 10.244.9.2}]\n  \
                         notReadyAddresses: [{ip: 10.244.9.3}]\n  ports: [{name: http, port: 8080}]\n";
        let f = fe("10.96.0.10", 80, Proto::Tcp);
        // Endpoints alone: addresses are ready, notReadyAddresses are not.
        let s = store(&format!("{SVC}{endpoints}"));
        assert_eq!(
            backends(&s, f),
            vec![b("10.244.9.1", 8080), b("10.244.9.2", 8080)]
        );
        let sum = &s.summary()[0];
        assert_eq!((sum.ready_endpoints, sum.total_endpoints), (2, 3));
        // With a slice, the slice wins.
        let mut s = store(&format!(
            "{SVC}{endpoints}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}]"
            )
        ));
        assert_eq!(backends(&s, f), vec![b("10.244.1.2", 8080)]);
        // Deleting the slice falls back to the Endpoints object.
        let touched = s.apply(StoreUpdate::Delete {
            key: "endpointslices/default/web-1".into(),
        });
        assert_eq!(touched, BTreeSet::from([sn("web")]));
        assert_eq!(
            backends(&s, f),
            vec![b("10.244.9.1", 8080), b("10.244.9.2", 8080)]
        );
    }

    #[test]
    fn udp_and_tcp_ports_and_protocol_mismatch() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  \
                   clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  ports:\n  \
                   - {name: dns, port: 53, protocol: UDP}\n  - {name: dns-tcp, port: 53, protocol: TCP}\n  \
                   - {name: other, port: 54, protocol: UDP}\n";
        let slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                     name: dns-1\n  labels: {kubernetes.io/service-name: dns}\naddressType: IPv4\n\
                     ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353}, \
                     {name: other, port: 54, protocol: TCP}]\n\
                     endpoints: [{addresses: [10.244.1.2]}]\n";
        let s = store(&format!("{svc}{slice}"));
        let f = s.frontends_for(&ServiceName::new("default", "dns"), &nowhere);
        assert_eq!(f.len(), 3);
        let udp = &f[&fe("10.96.0.10", 53, Proto::Udp)];
        assert_eq!(udp.backends, vec![b("10.244.1.2", 5353)]);
        assert_eq!(udp.port_name, "dns");
        assert_eq!(udp.affinity_timeout, Some(Duration::from_secs(10800)));
        let tcp = &f[&fe("10.96.0.10", 53, Proto::Tcp)];
        assert_eq!(tcp.backends, vec![b("10.244.1.2", 5353)]);
        assert_eq!(tcp.port_name, "dns-tcp");
        // "other" is UDP on the service, TCP on the slice: not used.
        assert_eq!(f[&fe("10.96.0.10", 54, Proto::Udp)].backends, vec![]);
    }

    #[test]
    fn affinity_timeout() {
        let svc = SVC.replace(
            "  ports:",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports:",
        );
        let s = store(&svc);
        let f = s.frontends_for(&sn("web"), &nowhere);
        assert_eq!(
            f[&fe("10.96.0.10", 80, Proto::Tcp)].affinity_timeout,
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn headless_and_external_name_have_no_frontends() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                    spec: {clusterIP: None, ports: [{name: http, port: 80}]}\n";
        let s = store(&format!(
            "{text}{}",
            slice(
                "web-1",
                "[{name: http, port: 80}]",
                "[{addresses: [10.244.1.2]}]"
            )
        ));
        assert!(s.frontends_for(&sn("web"), &nowhere).is_empty());
        assert_eq!(s.summary()[0].cluster_ip, "None");
        let s = store(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
             spec: {type: ExternalName, externalName: example.com}\n",
        );
        assert!(s.frontends_for(&sn("web"), &nowhere).is_empty());
        assert!(s.frontends_for(&sn("nonexistent"), &nowhere).is_empty());
    }

    #[test]
    fn duplicates_across_slices_and_ipv6_slices() {
        let v6 = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
                  name: web-v6\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv6\n\
                  ports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['fd00::1']}]\n";
        let s = store(&format!(
            "{SVC}{v6}{}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}]"
            ),
            slice(
                "web-2",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}, {addresses: [10.244.1.1]}]"
            )
        ));
        assert_eq!(
            backends(&s, fe("10.96.0.10", 80, Proto::Tcp)),
            vec![b("10.244.1.1", 8080), b("10.244.1.2", 8080)]
        );
        // An IPv6 slice alone does not hide the Endpoints object.
        let endpoints = "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\n\
                         subsets: [{addresses: [{ip: 10.244.9.1}], ports: [{name: http, port: 8080}]}]\n";
        let s = store(&format!("{SVC}{v6}{endpoints}"));
        assert_eq!(
            backends(&s, fe("10.96.0.10", 80, Proto::Tcp)),
            vec![b("10.244.9.1", 8080)]
        );
    }

    fn put(o: &Object) -> StoreUpdate {
        StoreUpdate::put(&o.object_ref().relative_key(), &o.to_json(), 1)
    }

    #[test]
    fn apply_reports_touched_services() {
        let objs = parse_manifests(&format!(
            "{SVC}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}]"
            )
        ))
        .unwrap();
        let mut s = ServiceStore::new();
        assert_eq!(s.apply(put(&objs[0])), BTreeSet::from([sn("web")]));
        assert_eq!(s.apply(put(&objs[1])), BTreeSet::from([sn("web")]));
        // Same value again: nothing changed.
        assert_eq!(s.apply(put(&objs[0])), BTreeSet::new());
        assert_eq!(s.apply(put(&objs[1])), BTreeSet::new());
        // Relabelling a slice touches the old and the new service.
        let Object::EndpointSlice(mut sl) = objs[1].clone() else {
            panic!()
        };
        sl.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_NAME_LABEL.into(), "api".into());
        let touched = s.apply(put(&Object::EndpointSlice(sl)));
        assert_eq!(touched, BTreeSet::from([sn("api"), sn("web")]));
        assert_eq!(s.endpoint_slice_count(&sn("web")), 0);
        assert_eq!(s.endpoint_slice_count(&sn("api")), 1);
        // Deleting what is not there touches nothing.
        assert_eq!(
            s.apply(StoreUpdate::Delete {
                key: "services/default/nope".into()
            }),
            BTreeSet::new()
        );
        assert_eq!(
            s.apply(StoreUpdate::Delete {
                key: "services/default/web".into()
            }),
            BTreeSet::from([sn("web")])
        );
        assert!(s.is_empty());
    }

    #[test]
    fn malformed_values_keep_good_state() {
        let objs = parse_manifests(SVC).unwrap();
        let mut s = ServiceStore::new();
        s.apply(put(&objs[0]));
        let before = s.clone();
        let json = String::from_utf8(objs[0].to_json()).unwrap();
        for (key, value) in [
            ("services/default/web", b"{not json".to_vec()),
            // Valid JSON, wrong name for the key.
            (
                "services/default/web",
                json.replace("\"name\":\"web\"", "\"name\":\"other\"")
                    .into_bytes(),
            ),
            // Decodes, but fails validation (SCTP).
            (
                "services/default/web",
                json.replace("\"port\":80", "\"port\":80,\"protocol\":\"SCTP\"")
                    .into_bytes(),
            ),
            ("services/default", b"{}".to_vec()),
        ] {
            let touched = s.apply(StoreUpdate::put(key, &value, 1));
            assert!(touched.is_empty());
        }
        assert_eq!(s, before);
        assert_eq!(s.malformed(), 4);
        // Keys outside the three directories are not ours: ignored, not counted.
        s.apply(StoreUpdate::put("leases/x", &[], 1));
        assert_eq!(s.malformed(), 4);
    }

    #[test]
    fn snapshot_reports_old_and_new() {
        let mut s = store(SVC);
        let new = store(&SVC.replace("name: web", "name: api"));
        let touched = s.apply(StoreUpdate::Snapshot(new.clone()));
        assert_eq!(touched, BTreeSet::from([sn("api"), sn("web")]));
        assert_eq!(s, new);
        assert_eq!(
            s.service_names().cloned().collect::<Vec<_>>(),
            vec![sn("api")]
        );
    }

    #[test]
    fn summary_lines() {
        let s = store(&format!(
            "{SVC}{}",
            slice(
                "web-1",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.244.1.2]}, {addresses: [10.244.1.3], conditions: {ready: false}}]"
            )
        ));
        assert_eq!(
            s.summary(),
            vec![ServiceSummary {
                service: sn("web"),
                service_type: "ClusterIP".into(),
                cluster_ip: "10.96.0.10".into(),
                ports: vec!["http:80/TCP".into()],
                ready_endpoints: 1,
                total_endpoints: 2,
            }]
        );
    }
}
