//! The shadow: what the agent-owned maps hold, as the agent wrote them.
//! It is updated one [`MapOp`] at a time as writes succeed, so after a
//! failed write it still says exactly what the kernel has, and the next
//! plan picks up where the failed one stopped.
//!
//! It also holds the one service-id allocator. An id is taken while a
//! service entry carries it. Backend slots or `live` pairs left under a
//! free id (a plan that failed half way) are tracked as orphans: removed
//! at the agent's next tick ([`super::plan::orphans`]), or overwritten by
//! the plan of the next frontend that gets the id, since plans diff slots
//! and pairs by id.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::{
    Backend, BackendKey, EndpointInfo, EndpointKey, LiveKey, NodeConfig, PeerInfo, PeerIpInfo,
    PeerIpKey, PodPortInfo, PodPortKey, SVC_F_EXTERNAL, SvcInfo, SvcKey, VipInfo, VipKey,
};
use ipnet::Ipv4Net;

use crate::{
    bpf::{MapOp, PeerEntries, ServiceEntries},
    services::ServiceName,
};

/// A backend as an ordered key (the wire type has no order).
pub type BackendAddr = ([u8; 4], [u8; 2]);

pub fn addr(b: &Backend) -> BackendAddr {
    (b.ip, b.port)
}

pub fn backend(a: BackendAddr) -> Backend {
    Backend {
        ip: a.0,
        port: a.1,
        _pad: [0; 2],
    }
}

/// The agent-owned maps as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub node: Option<NodeConfig>,
    pub peers: BTreeMap<Ipv4Net, PeerInfo>,
    /// PublicIP -> number of leases.
    pub peer_ips: BTreeMap<[u8; 4], u32>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    /// (Service id, slot) -> backend. One tree rather than a map per id:
    /// a map's first node alone takes more than a hundred bytes.
    pub slots: BTreeMap<(u32, u32), Backend>,
    /// (service id, backend) pairs in `live_v1`.
    pub live: BTreeSet<(u32, BackendAddr)>,
    /// ClusterIP -> the refcount written in `vips_v1`.
    pub vips: BTreeMap<[u8; 4], u32>,
    /// CNI pods' (registered) entries of `endpoints_v1`, by IPv4 address.
    /// Learnt entries are the data path's and not in here.
    pub pods: BTreeMap<[u8; 4], EndpointInfo>,
    /// `pod_ports_v1`: host-side ifindex -> the pod's addresses.
    pub pod_ports: BTreeMap<u32, PodPortInfo>,
    /// North-south frontend id -> the backend count its `maglev_v1`
    /// table was computed for (rewritten with its slots; not adopted at
    /// start, so every table is written once by a new agent).
    pub maglev: BTreeMap<u32, u32>,
    /// ClusterIP -> ClusterIP service entries that carry it (derived from
    /// `services`; north-south frontends have no `vips_v1` entry).
    frontends_per_vip: BTreeMap<[u8; 4], u32>,
    ids: IdAllocator,
    /// Ids with slots or `live` pairs but no service entry: left by a
    /// plan that failed half way (derived).
    orphans: BTreeSet<u32>,
}

/// Service ids: taken while a service entry carries one; released ids are
/// handed out again lowest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IdAllocator {
    /// Id -> service entries carrying it (1, unless adopted from a broken map).
    used: BTreeMap<u32, u32>,
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    /// Every id from here up has never been handed out.
    next: u32,
}

impl IdAllocator {
    fn take(&mut self, id: u32) {
        let n = self.used.entry(id).or_default();
        *n += 1;
        if *n == 1 {
            self.free.remove(&id);
            // Ids skipped over (adopted from the kernel) are simply never
            // handed out: no gap is filled, so a stray large id costs nothing.
            self.next = self.next.max(id.saturating_add(1));
        }
    }

    fn release(&mut self, id: u32) {
        if let Some(n) = self.used.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.used.remove(&id);
                self.free.insert(id);
            }
        }
    }

    fn fresh(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied().chain(self.next..)
    }
}

impl MapState {
    /// Ids a plan may give new frontends, in order; none is in use.
    pub fn fresh_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.fresh()
    }

    /// Number of service entries carrying this ClusterIP.
    pub fn frontends_of_vip(&self, vip: &[u8; 4]) -> u32 {
        self.frontends_per_vip.get(vip).copied().unwrap_or(0)
    }

    /// The `live` backends of service id `id`.
    pub fn live_of(&self, id: u32) -> impl Iterator<Item = BackendAddr> + '_ {
        self.live
            .range((id, ([0; 4], [0; 2]))..=(id, ([255; 4], [255; 2])))
            .map(|(_, a)| *a)
    }

    /// The slots of service id `id` from `first` on, in order.
    pub fn slots_from(&self, id: u32, first: u32) -> impl Iterator<Item = (u32, &Backend)> + '_ {
        self.slots
            .range((id, first)..=(id, u32::MAX))
            .map(|((_, slot), b)| (*slot, b))
    }

    /// The slots of service id `id`, in order.
    pub fn slots_of(&self, id: u32) -> impl Iterator<Item = (u32, &Backend)> + '_ {
        self.slots_from(id, 0)
    }

    /// The backend in slot `slot` of service id `id`.
    pub fn slot(&self, id: u32, slot: u32) -> Option<&Backend> {
        self.slots.get(&(id, slot))
    }

    /// Rebuilds the trees with full nodes ([`crate::compact`]); the
    /// content stays the same.
    pub fn compact(&mut self) {
        use crate::compact::rebuilt;
        use std::mem::take;
        self.peers = rebuilt(take(&mut self.peers));
        self.peer_ips = rebuilt(take(&mut self.peer_ips));
        self.services = rebuilt(take(&mut self.services));
        self.slots = rebuilt(take(&mut self.slots));
        self.live = rebuilt(take(&mut self.live));
        self.vips = rebuilt(take(&mut self.vips));
        self.pods = rebuilt(take(&mut self.pods));
        self.pod_ports = rebuilt(take(&mut self.pod_ports));
        self.frontends_per_vip = rebuilt(take(&mut self.frontends_per_vip));
        self.orphans = rebuilt(take(&mut self.orphans));
        self.maglev = rebuilt(take(&mut self.maglev));
        self.ids.used = rebuilt(take(&mut self.ids.used));
        self.ids.free = rebuilt(take(&mut self.ids.free));
    }

    /// Ids with slots or `live` pairs but no service entry.
    pub fn orphans(&self) -> &BTreeSet<u32> {
        &self.orphans
    }

    fn refresh_orphan(&mut self, id: u32) {
        let unused = !self.ids.used.contains_key(&id);
        if unused && (self.slots_of(id).next().is_some() || self.live_of(id).next().is_some()) {
            self.orphans.insert(id);
        } else {
            self.orphans.remove(&id);
        }
    }

    /// Records a write that took effect (or a delete of a key that was
    /// already gone: the entry is absent either way).
    pub fn record(&mut self, op: &MapOp) {
        self.record_entry(op);
        match *op {
            MapOp::PutService(_, v) => self.refresh_orphan(v.id),
            MapOp::PutBackend(k, _) | MapOp::DelBackend(k) => self.refresh_orphan(k.svc_id),
            MapOp::PutLive(k) | MapOp::DelLive(k) => self.refresh_orphan(k.svc_id),
            _ => {}
        }
    }

    fn record_entry(&mut self, op: &MapOp) {
        match *op {
            MapOp::NodeConfig(c) => self.node = Some(c),
            // Written once at start-up, outside the reconciler.
            MapOp::CtConfig(_) => {}
            MapOp::PutPeerIp(k, v) => {
                self.peer_ips.insert(k.public_ip, v.leases);
            }
            MapOp::DelPeerIp(k) => {
                self.peer_ips.remove(&k.public_ip);
            }
            MapOp::PutPeer(net, v) => {
                self.peers.insert(net, v);
            }
            MapOp::DelPeer(net) => {
                self.peers.remove(&net);
            }
            MapOp::PutService(k, v) => {
                let old = self.services.insert(k, v);
                if let Some(old) = old {
                    self.ids.release(old.id);
                    self.refresh_orphan(old.id);
                }
                self.count_vip(k.vip, old.as_ref(), Some(&v));
                self.ids.take(v.id);
            }
            MapOp::DelService(k) => {
                if let Some(old) = self.services.remove(&k) {
                    self.ids.release(old.id);
                    self.refresh_orphan(old.id);
                    self.count_vip(k.vip, Some(&old), None);
                }
            }
            MapOp::PutMaglev(k, n) => {
                self.maglev.insert(k.svc_id, n);
            }
            MapOp::DelMaglev(k) => {
                self.maglev.remove(&k.svc_id);
            }
            MapOp::PutBackend(k, b) => {
                self.slots.insert((k.svc_id, k.slot), b);
            }
            MapOp::DelBackend(k) => {
                self.slots.remove(&(k.svc_id, k.slot));
            }
            MapOp::PutVip(k, v) => {
                self.vips.insert(k.vip, v.frontends);
            }
            MapOp::DelVip(k) => {
                self.vips.remove(&k.vip);
            }
            MapOp::PutLive(k) => {
                self.live.insert((k.svc_id, addr(&k.backend)));
            }
            MapOp::DelLive(k) => {
                self.live.remove(&(k.svc_id, addr(&k.backend)));
            }
            MapOp::PutEndpoint(k, v) => {
                self.pods.insert(k.ip, v);
            }
            MapOp::DelEndpoint(k) => {
                self.pods.remove(&k.ip);
            }
            MapOp::PutPodPort(k, v) => {
                self.pod_ports.insert(k.ifindex, v);
            }
            MapOp::DelPodPort(k) => {
                self.pod_ports.remove(&k.ifindex);
            }
            MapOp::DelSvcStats(_) | MapOp::DelAffinity(_) => {}
        }
    }

    /// Keeps `frontends_per_vip` right when the entry of a frontend on
    /// `vip` goes from `old` to `new`: only ClusterIP entries count.
    fn count_vip(&mut self, vip: [u8; 4], old: Option<&SvcInfo>, new: Option<&SvcInfo>) {
        let cluster_ip = |i: Option<&SvcInfo>| i.is_some_and(|i| i.flags & SVC_F_EXTERNAL == 0);
        match (cluster_ip(old), cluster_ip(new)) {
            (false, true) => *self.frontends_per_vip.entry(vip).or_default() += 1,
            (true, false) => {
                if let Some(n) = self.frontends_per_vip.get_mut(&vip) {
                    *n -= 1;
                    if *n == 0 {
                        self.frontends_per_vip.remove(&vip);
                    }
                }
            }
            _ => {}
        }
    }

    /// Replaces the peer maps' shadow with what the kernel has.
    pub fn adopt_peers(&mut self, kernel: PeerEntries) {
        self.peers = kernel.peers.into_iter().collect();
        self.peer_ips = kernel
            .peer_ips
            .into_iter()
            .map(|(k, v)| (k.public_ip, v.leases))
            .collect();
    }

    /// Replaces the CNI pods' shadow with what the kernel has: every
    /// `pod_ports_v1` entry, and the `endpoints_v1` entries those ports
    /// registered (address and port agree). Other endpoint entries are
    /// learnt ones.
    pub fn adopt_pods(
        &mut self,
        ports: &[(PodPortKey, PodPortInfo)],
        endpoints: &[(EndpointKey, EndpointInfo)],
    ) {
        self.pod_ports = ports.iter().map(|(k, v)| (k.ifindex, *v)).collect();
        self.pods = endpoints
            .iter()
            .filter(|(k, v)| self.pod_ports.get(&v.ifindex).is_some_and(|p| p.ip == k.ip))
            .map(|(k, v)| (k.ip, *v))
            .collect();
    }

    /// Replaces the service maps' shadow with what the kernel has.
    pub fn adopt_services(&mut self, kernel: &ServiceEntries) {
        self.services.clear();
        self.frontends_per_vip.clear();
        self.maglev.clear();
        self.ids = IdAllocator::default();
        for (k, v) in &kernel.services {
            self.record(&MapOp::PutService(*k, *v));
        }
        self.slots.clear();
        for (k, b) in &kernel.backends {
            self.record(&MapOp::PutBackend(*k, *b));
        }
        self.vips = kernel
            .vips
            .iter()
            .map(|(k, v)| (k.vip, v.frontends))
            .collect();
        self.live = kernel
            .live
            .iter()
            .map(|k| (k.svc_id, addr(&k.backend)))
            .collect();
        let ids: BTreeSet<u32> = self
            .slots
            .keys()
            .map(|(id, _)| *id)
            .chain(self.live.iter().map(|(id, _)| *id))
            .collect();
        self.orphans.clear();
        for id in ids {
            self.refresh_orphan(id);
        }
    }
}

/// Keys of the wire types, for building ops.
pub fn peer_ip_key(ip: [u8; 4]) -> PeerIpKey {
    PeerIpKey { public_ip: ip }
}

pub fn peer_ip_info(leases: u32) -> PeerIpInfo {
    PeerIpInfo { leases }
}

pub fn backend_key(svc_id: u32, slot: u32) -> BackendKey {
    BackendKey { svc_id, slot }
}

pub fn live_key(svc_id: u32, a: BackendAddr) -> LiveKey {
    LiveKey {
        svc_id,
        backend: backend(a),
    }
}

pub fn vip_key(vip: [u8; 4]) -> VipKey {
    VipKey { vip }
}

pub fn vip_info(frontends: u32) -> VipInfo {
    VipInfo { frontends }
}

pub fn endpoint_key(ip: [u8; 4]) -> EndpointKey {
    EndpointKey { ip }
}

pub fn pod_port_key(ifindex: u32) -> PodPortKey {
    PodPortKey { ifindex }
}

/// Which Service programmed which frontend: a frontend is removed when the
/// Service that owns it no longer has it. Two Services claiming one
/// frontend (same ClusterIP, port and protocol) is a conflict; the last
/// one programmed owns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    /// (Service, frontend) for each frontend a Service owns. One tree
    /// rather than a set per Service: a set's first node alone takes more
    /// than a hundred bytes.
    by_service: BTreeSet<(ServiceName, SvcKey)>,
    by_frontend: BTreeMap<SvcKey, ServiceName>,
}

/// The lowest key, to range over one Service's frontends.
const FIRST_KEY: SvcKey = SvcKey {
    vip: [0; 4],
    port: [0; 2],
    proto: 0,
    _pad: 0,
};

impl Owners {
    /// The frontends `name` owns.
    pub fn of<'a>(&'a self, name: &ServiceName) -> impl Iterator<Item = &'a SvcKey> + 'a {
        let name = name.clone();
        self.by_service
            .range((name.clone(), FIRST_KEY)..)
            .take_while(move |(n, _)| *n == name)
            .map(|(_, k)| k)
    }

    /// Rebuilds the trees with full nodes ([`crate::compact`]).
    pub fn compact(&mut self) {
        use crate::compact::rebuilt;
        self.by_service = rebuilt(std::mem::take(&mut self.by_service));
        self.by_frontend = rebuilt(std::mem::take(&mut self.by_frontend));
    }

    /// Who owns `key`.
    pub fn owner(&self, key: &SvcKey) -> Option<&ServiceName> {
        self.by_frontend.get(key)
    }

    /// `name` now owns exactly `keys`. Returns the frontends taken from
    /// another Service, with that Service.
    pub fn set(
        &mut self,
        name: &ServiceName,
        keys: BTreeSet<SvcKey>,
    ) -> Vec<(SvcKey, ServiceName)> {
        let old: Vec<SvcKey> = self.of(name).copied().collect();
        for k in old {
            self.by_service.remove(&(name.clone(), k));
            if self.by_frontend.get(&k) == Some(name) {
                self.by_frontend.remove(&k);
            }
        }
        let mut taken = Vec::new();
        for k in &keys {
            if let Some(prev) = self.by_frontend.insert(*k, name.clone())
                && prev != *name
            {
                self.by_service.remove(&(prev.clone(), *k));
                taken.push((*k, prev));
            }
        }
        for k in keys {
            self.by_service.insert((name.clone(), k));
        }
        taken
    }
}

/// The one current state plans are made against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    pub maps: MapState,
    pub owners: Owners,
}

impl Shadow {
    /// Rebuilds the trees with full nodes ([`crate::compact`]).
    pub fn compact(&mut self) {
        self.maps.compact();
        self.owners.compact();
    }
}
