//! Typed handles to every map of the object, and [`MapOp`]: the one way
//! the agent writes them. A write is a value, so the order of writes can
//! be planned and tested without a kernel ([`crate::reconcile`]); applying
//! it ([`Maps::apply`]) is a single `match`.
//!
//! The data path owns conntrack, reverse NAT and the counters, and learns
//! endpoints of bridge ports; the agent only ever deletes from those. The
//! endpoints of CNI pods are the agent's (registered), with their
//! `pod_ports_v1` entries.

use std::{fmt, net::Ipv4Addr, path::PathBuf};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapInfo, MapType, PerCpuArray, PerCpuHashMap,
        lpm_trie::Key,
    },
};
use dataplane_common::{
    AFFINITY_MAX, AffinityEntry, AffinityKey, BACKENDS_MAX, Backend, BackendKey, CT_MAX, Counter,
    CtEntry, CtKey, ENDPOINTS_MAX, EndpointInfo, EndpointKey, FRAGS_MAX, FragEntry, FragKey,
    LiveInfo, LiveKey, MaglevKey, MaglevTable, NodeConfig, PEER_IPS_MAX, PEERS_MAX, POD_PORTS_MAX,
    PROTO_TCP, PeerInfo, PeerIpInfo, PeerIpKey, PodPortInfo, PodPortKey, RnatEntry, SERVICES_MAX,
    SOCK_LB_MAX, STATS_LEN, SockFwdKey, SockRnatEntry, SockRnatKey, SvcCounters, SvcInfo, SvcKey,
    VipInfo, VipKey,
    ct::{CT_GC_LEN, CtTimeouts},
    map_names,
    masq::{MasqEntry, MasqRev},
};
use ipnet::Ipv4Net;

/// Every map of the object (`map_names::ALL`, which a test checks against
/// the built object): pinned under `--pin-path` when loading with one, so a
/// restarted agent (and `dataplane stats`) finds them.
pub(super) const PINNED: &[&str] = map_names::ALL;

/// What a map is, as the kernel checks it: a pinned map is reused only
/// when its layout is the object's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl Layout {
    const fn new<K, V>(kind: MapType, max_entries: u32) -> Layout {
        Layout {
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }

    /// The layout of a map as the kernel has it.
    pub fn of(info: &MapInfo) -> Result<Layout, MapError> {
        Ok(Layout {
            kind: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        })
    }
}

impl Layout {
    /// Same type, key and value size (whatever `max_entries`).
    pub fn same_shape(&self, other: &Layout) -> bool {
        self.kind == other.kind
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}, key {} B, value {} B, {} entries",
            self.kind, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The layout of every map of the object, as `dataplane-ebpf/src/maps.rs`
/// declares it (a test checks this against the built object). An LPM
/// trie's key carries the prefix length (4 bytes) before the address.
pub const LAYOUTS: &[(&str, Layout)] = &[
    (
        map_names::PEERS,
        Layout::new::<(u32, [u8; 4]), PeerInfo>(MapType::LpmTrie, PEERS_MAX),
    ),
    (
        map_names::PEER_IPS,
        Layout::new::<PeerIpKey, PeerIpInfo>(MapType::Hash, PEER_IPS_MAX),
    ),
    (
        map_names::NODE_CONFIG,
        Layout::new::<u32, NodeConfig>(MapType::Array, 1),
    ),
    (
        map_names::STATS,
        Layout::new::<u32, Counter>(MapType::PerCpuArray, STATS_LEN),
    ),
    (
        map_names::SERVICES,
        Layout::new::<SvcKey, SvcInfo>(MapType::Hash, SERVICES_MAX),
    ),
    (
        map_names::BACKENDS,
        Layout::new::<BackendKey, Backend>(MapType::Hash, BACKENDS_MAX),
    ),
    (
        map_names::VIPS,
        Layout::new::<VipKey, VipInfo>(MapType::Hash, SERVICES_MAX),
    ),
    (
        map_names::CT,
        Layout::new::<CtKey, CtEntry>(MapType::Hash, CT_MAX),
    ),
    (
        map_names::RNAT,
        Layout::new::<CtKey, RnatEntry>(MapType::Hash, CT_MAX),
    ),
    (
        map_names::CT_CONFIG,
        Layout::new::<u32, CtTimeouts>(MapType::Array, 1),
    ),
    (
        map_names::CT_GC,
        Layout::new::<u32, u64>(MapType::Array, CT_GC_LEN),
    ),
    (
        map_names::AFFINITY,
        Layout::new::<AffinityKey, AffinityEntry>(MapType::LruHash, AFFINITY_MAX),
    ),
    (
        map_names::SVC_STATS,
        Layout::new::<SvcKey, SvcCounters>(MapType::PerCpuHash, SERVICES_MAX),
    ),
    (
        map_names::ENDPOINTS,
        Layout::new::<EndpointKey, EndpointInfo>(MapType::Hash, ENDPOINTS_MAX),
    ),
    (
        map_names::LIVE,
        Layout::new::<LiveKey, LiveInfo>(MapType::Hash, BACKENDS_MAX),
    ),
    (
        map_names::POD_PORTS,
        Layout::new::<PodPortKey, PodPortInfo>(MapType::Hash, POD_PORTS_MAX),
    ),
    (
        map_names::FRAGS,
        Layout::new::<FragKey, FragEntry>(MapType::LruHash, FRAGS_MAX),
    ),
    (
        map_names::SOCK_RNAT,
        Layout::new::<SockRnatKey, SockRnatEntry>(MapType::LruHash, SOCK_LB_MAX),
    ),
    (
        map_names::SOCK_FWD,
        Layout::new::<SockFwdKey, Backend>(MapType::LruHash, SOCK_LB_MAX),
    ),
    (
        map_names::MASQ,
        Layout::new::<CtKey, MasqEntry>(MapType::Hash, CT_MAX),
    ),
    (
        map_names::MASQ_REV,
        Layout::new::<CtKey, MasqRev>(MapType::Hash, CT_MAX),
    ),
    (
        map_names::MAGLEV,
        Layout::new::<MaglevKey, MaglevTable>(MapType::Hash, SERVICES_MAX),
    ),
];

/// The conntrack maps, whose size is the agent's `--ct-max`, not the
/// object's default.
pub const SIZED_BY_CT_MAX: &[&str] = &[
    map_names::CT,
    map_names::RNAT,
    map_names::MASQ,
    map_names::MASQ_REV,
];

/// [`LAYOUTS`] as a load with `--ct-max` `ct_max` creates the maps.
pub fn layouts(ct_max: u32) -> Vec<(&'static str, Layout)> {
    LAYOUTS
        .iter()
        .map(|&(name, l)| {
            if SIZED_BY_CT_MAX.contains(&name) {
                (
                    name,
                    Layout {
                        max_entries: ct_max,
                        ..l
                    },
                )
            } else {
                (name, l)
            }
        })
        .collect()
}

/// A map access that failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The key was not in the map (a delete of something already gone).
    #[error("no such key")]
    NotFound,
    /// The map holds `max_entries` already.
    #[error("map full")]
    Full,
    #[error("map {0} missing from the BPF object")]
    Missing(&'static str),
    #[error("map {0} has another type than expected")]
    WrongType(&'static str),
    #[error("duplicating a map handle: {0}")]
    Dup(#[source] std::io::Error),
    #[error("opening {}: {source}", path.display())]
    Pinned {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(aya::maps::MapError),
}

impl From<aya::maps::MapError> for MapError {
    fn from(e: aya::maps::MapError) -> Self {
        match e {
            aya::maps::MapError::KeyNotFound => MapError::NotFound,
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                MapError::NotFound
            }
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                MapError::Full
            }
            e => MapError::Kernel(e),
        }
    }
}

/// One write to one map, in wire types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// The single entry of the node config array.
    NodeConfig(NodeConfig),
    PutPeerIp(PeerIpKey, PeerIpInfo),
    DelPeerIp(PeerIpKey),
    /// A remote subnet (LPM trie key) and the node that holds it.
    PutPeer(Ipv4Net, PeerInfo),
    DelPeer(Ipv4Net),
    PutService(SvcKey, SvcInfo),
    DelService(SvcKey),
    PutBackend(BackendKey, Backend),
    DelBackend(BackendKey),
    PutVip(VipKey, VipInfo),
    DelVip(VipKey),
    PutLive(LiveKey),
    DelLive(LiveKey),
    /// A frontend's counters, when the frontend goes.
    DelSvcStats(SvcKey),
    DelAffinity(AffinityKey),
    /// A learnt pod whose port is gone, or a CNI pod deleted.
    DelEndpoint(EndpointKey),
    /// A CNI pod's endpoint (registered, not learnt).
    PutEndpoint(EndpointKey, EndpointInfo),
    /// A CNI pod's port: the addresses it may send from.
    PutPodPort(PodPortKey, PodPortInfo),
    DelPodPort(PodPortKey),
    /// The conntrack timeouts (the agent's `--ct-*-timeout` flags).
    CtConfig(CtTimeouts),
    /// A north-south frontend's Maglev table, computed from its backend
    /// slots 0..count as the backends map holds them (written just before
    /// in the same plan): the table is a function of them, so the op
    /// carries the count rather than 2 KB of table.
    PutMaglev(MaglevKey, u32),
    DelMaglev(MaglevKey),
}

impl MapOp {
    /// Whether this removes an entry (counted as a delete, and a missing
    /// key is then not an error).
    pub fn is_delete(&self) -> bool {
        !matches!(
            self,
            MapOp::NodeConfig(_)
                | MapOp::CtConfig(_)
                | MapOp::PutPeerIp(..)
                | MapOp::PutPeer(..)
                | MapOp::PutService(..)
                | MapOp::PutBackend(..)
                | MapOp::PutVip(..)
                | MapOp::PutLive(_)
                | MapOp::PutEndpoint(..)
                | MapOp::PutPodPort(..)
                | MapOp::PutMaglev(..)
        )
    }
}

/// Shows a frontend key as `10.96.0.10:80/TCP`.
pub struct Frontend<'a>(pub &'a SvcKey);

impl fmt::Display for Frontend<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        let proto = if k.proto == PROTO_TCP { "TCP" } else { "UDP" };
        write!(
            f,
            "{}:{}/{proto}",
            Ipv4Addr::from(k.vip),
            u16::from_be_bytes(k.port)
        )
    }
}

struct Addr<'a>(&'a Backend);

impl fmt::Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{}:{}", Ipv4Addr::from(b.ip), u16::from_be_bytes(b.port))
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapOp::NodeConfig(_) => write!(f, "writing the node config"),
            MapOp::PutPeerIp(k, v) => write!(
                f,
                "accepting VXLAN from {} ({} leases)",
                Ipv4Addr::from(k.public_ip),
                v.leases
            ),
            MapOp::DelPeerIp(k) => write!(f, "refusing VXLAN from {}", Ipv4Addr::from(k.public_ip)),
            MapOp::PutPeer(net, v) => {
                write!(f, "adding peer {net} at {}", Ipv4Addr::from(v.public_ip))
            }
            MapOp::DelPeer(net) => write!(f, "removing peer {net}"),
            MapOp::PutService(k, v) => write!(
                f,
                "writing frontend {} (id {}, {} backends)",
                Frontend(k),
                v.id,
                v.count
            ),
            MapOp::DelService(k) => write!(f, "removing frontend {}", Frontend(k)),
            MapOp::PutBackend(k, b) => write!(
                f,
                "writing backend slot {} of service id {} ({})",
                k.slot,
                k.svc_id,
                Addr(b)
            ),
            MapOp::DelBackend(k) => write!(
                f,
                "removing backend slot {} of service id {}",
                k.slot, k.svc_id
            ),
            MapOp::PutVip(k, v) => write!(
                f,
                "writing ClusterIP {} ({} frontends)",
                Ipv4Addr::from(k.vip),
                v.frontends
            ),
            MapOp::DelVip(k) => write!(f, "removing ClusterIP {}", Ipv4Addr::from(k.vip)),
            MapOp::PutLive(k) => write!(
                f,
                "marking {} live for service id {}",
                Addr(&k.backend),
                k.svc_id
            ),
            MapOp::DelLive(k) => write!(
                f,
                "ending flows to {} of service id {}",
                Addr(&k.backend),
                k.svc_id
            ),
            MapOp::DelSvcStats(k) => write!(f, "removing counters of {}", Frontend(k)),
            MapOp::DelAffinity(k) => write!(
                f,
                "removing affinity of {} for service id {}",
                Ipv4Addr::from(k.client),
                k.svc_id
            ),
            MapOp::DelEndpoint(k) => write!(f, "forgetting endpoint {}", Ipv4Addr::from(k.ip)),
            MapOp::PutEndpoint(k, v) => write!(
                f,
                "registering endpoint {} on ifindex {}",
                Ipv4Addr::from(k.ip),
                v.ifindex
            ),
            MapOp::PutPodPort(k, v) => write!(
                f,
                "guarding pod port ifindex {} for {}",
                k.ifindex,
                Ipv4Addr::from(v.ip)
            ),
            MapOp::DelPodPort(k) => write!(f, "removing pod port ifindex {}", k.ifindex),
            MapOp::CtConfig(_) => write!(f, "writing the conntrack timeouts"),
            MapOp::PutMaglev(k, n) => write!(
                f,
                "writing the Maglev table of service id {} ({n} backends)",
                k.svc_id
            ),
            MapOp::DelMaglev(k) => {
                write!(f, "removing the Maglev table of service id {}", k.svc_id)
            }
        }
    }
}

/// What the peer maps hold, read back for a full resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub peers: Vec<(Ipv4Net, PeerInfo)>,
    pub peer_ips: Vec<(PeerIpKey, PeerIpInfo)>,
}

/// What the agent-owned service maps hold (and the affinity keys), read
/// back to clear what an earlier run left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntries {
    pub services: Vec<(SvcKey, SvcInfo)>,
    pub backends: Vec<(BackendKey, Backend)>,
    pub vips: Vec<(VipKey, VipInfo)>,
    pub live: Vec<LiveKey>,
    pub affinity: Vec<AffinityKey>,
}

/// Typed handles to the maps.
pub struct Maps {
    peers: LpmTrie<MapData, [u8; 4], PeerInfo>,
    peer_ips: HashMap<MapData, PeerIpKey, PeerIpInfo>,
    node_cfg: Array<MapData, NodeConfig>,
    pub(super) stats: PerCpuArray<MapData, Counter>,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    services: HashMap<MapData, SvcKey, SvcInfo>,
    backends: HashMap<MapData, BackendKey, Backend>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    svc_stats: PerCpuHashMap<MapData, SvcKey, SvcCounters>,
    live: HashMap<MapData, LiveKey, LiveInfo>,
    pod_ports: HashMap<MapData, PodPortKey, PodPortInfo>,
    maglev: HashMap<MapData, MaglevKey, MaglevTable>,
    ct_cfg: Array<MapData, CtTimeouts>,
    /// Conntrack, handed out as separate handles ([`Maps::conntrack`]).
    ct: MapData,
    rnat: MapData,
    ct_gc: MapData,
    ct_cfg_read: MapData,
    masq: MapData,
    masq_rev: MapData,
}

fn lpm_key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

/// Collects an aya map iterator; entries that vanish while iterating are
/// skipped by aya itself.
fn collect<T>(
    it: impl Iterator<Item = Result<T, aya::maps::MapError>>,
) -> Result<Vec<T>, MapError> {
    it.map(|r| r.map_err(MapError::from)).collect()
}

/// The map inside one taken out of the object, for the conntrack maps
/// (hash or array), which are handed out as [`super::ct::CtTable`].
fn map_data(name: &'static str, m: aya::maps::Map) -> Result<MapData, MapError> {
    use aya::maps::Map;
    match m {
        Map::HashMap(d) | Map::Array(d) => Ok(d),
        _ => Err(MapError::WrongType(name)),
    }
}

/// A second handle on the same map.
fn dup(m: &MapData) -> Result<MapData, MapError> {
    use std::os::fd::AsFd as _;
    let fd = m.fd().as_fd().try_clone_to_owned().map_err(MapError::Dup)?;
    Ok(MapData::from_fd(fd)?)
}

impl Maps {
    /// Takes every map out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Maps, MapError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapError::Missing(name));
        let ct_cfg = map_data(map_names::CT_CONFIG, take(map_names::CT_CONFIG)?)?;
        let ct_cfg_read = dup(&ct_cfg)?;
        Ok(Maps {
            peers: LpmTrie::try_from(take(map_names::PEERS)?)?,
            peer_ips: HashMap::try_from(take(map_names::PEER_IPS)?)?,
            node_cfg: Array::try_from(take(map_names::NODE_CONFIG)?)?,
            stats: PerCpuArray::try_from(take(map_names::STATS)?)?,
            endpoints: HashMap::try_from(take(map_names::ENDPOINTS)?)?,
            services: HashMap::try_from(take(map_names::SERVICES)?)?,
            backends: HashMap::try_from(take(map_names::BACKENDS)?)?,
            vips: HashMap::try_from(take(map_names::VIPS)?)?,
            affinity: HashMap::try_from(take(map_names::AFFINITY)?)?,
            svc_stats: PerCpuHashMap::try_from(take(map_names::SVC_STATS)?)?,
            live: HashMap::try_from(take(map_names::LIVE)?)?,
            pod_ports: HashMap::try_from(take(map_names::POD_PORTS)?)?,
            maglev: HashMap::try_from(take(map_names::MAGLEV)?)?,
            ct_cfg: Array::try_from(aya::maps::Map::Array(ct_cfg))?,
            ct_cfg_read,
            ct: map_data(map_names::CT, take(map_names::CT)?)?,
            rnat: map_data(map_names::RNAT, take(map_names::RNAT)?)?,
            ct_gc: map_data(map_names::CT_GC, take(map_names::CT_GC)?)?,
            masq: map_data(map_names::MASQ, take(map_names::MASQ)?)?,
            masq_rev: map_data(map_names::MASQ_REV, take(map_names::MASQ_REV)?)?,
        })
    }

    /// Performs one write. Deleting a missing key is
    /// [`MapError::NotFound`]; the caller decides whether that matters.
    pub fn apply(&mut self, op: &MapOp) -> Result<(), MapError> {
        match op {
            MapOp::NodeConfig(c) => self.node_cfg.set(0, c, 0)?,
            MapOp::PutPeerIp(k, v) => self.peer_ips.insert(k, v, 0)?,
            MapOp::DelPeerIp(k) => self.peer_ips.remove(k)?,
            MapOp::PutPeer(net, v) => self.peers.insert(&lpm_key(net), v, 0)?,
            MapOp::DelPeer(net) => self.peers.remove(&lpm_key(net))?,
            MapOp::PutService(k, v) => self.services.insert(k, v, 0)?,
            MapOp::DelService(k) => self.services.remove(k)?,
            MapOp::PutBackend(k, v) => self.backends.insert(k, v, 0)?,
            MapOp::DelBackend(k) => self.backends.remove(k)?,
            MapOp::PutVip(k, v) => self.vips.insert(k, v, 0)?,
            MapOp::DelVip(k) => self.vips.remove(k)?,
            MapOp::PutLive(k) => self.live.insert(k, LiveInfo::default(), 0)?,
            MapOp::DelLive(k) => self.live.remove(k)?,
            MapOp::DelSvcStats(k) => self.svc_stats.remove(k)?,
            MapOp::DelAffinity(k) => self.affinity.remove(k)?,
            MapOp::DelEndpoint(k) => self.endpoints.remove(k)?,
            MapOp::PutEndpoint(k, v) => self.endpoints.insert(k, v, 0)?,
            MapOp::PutPodPort(k, v) => self.pod_ports.insert(k, v, 0)?,
            MapOp::DelPodPort(k) => self.pod_ports.remove(k)?,
            MapOp::CtConfig(t) => self.ct_cfg.set(0, t, 0)?,
            MapOp::PutMaglev(k, n) => {
                let mut names = Vec::with_capacity(*n as usize);
                for slot in 0..*n {
                    let b = self.backends.get(
                        &BackendKey {
                            svc_id: k.svc_id,
                            slot,
                        },
                        0,
                    )?;
                    names.push(crate::services::maglev::name(&b));
                }
                let table = crate::services::maglev::wire_table(&names);
                self.maglev.insert(k, table.as_ref(), 0)?
            }
            MapOp::DelMaglev(k) => self.maglev.remove(k)?,
        }
        Ok(())
    }

    /// A north-south frontend's Maglev table (`dataplane status` and the
    /// tests compare them across nodes).
    pub fn maglev_table(&self, svc_id: u32) -> Result<MaglevTable, MapError> {
        Ok(self.maglev.get(&MaglevKey { svc_id }, 0)?)
    }

    /// The peer maps as the kernel has them.
    /// Every frontend's counters (`svc_stats_v1`), summed over the CPUs.
    pub fn svc_counters(&self) -> Vec<(SvcKey, SvcCounters)> {
        super::stats::read_svc_stats(&self.svc_stats)
    }

    pub fn peer_entries(&self) -> Result<PeerEntries, MapError> {
        let peers = collect(self.peers.iter())?
            .into_iter()
            .filter_map(|(k, v)| {
                let net = Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8).ok()?;
                Some((net, v))
            })
            .collect();
        Ok(PeerEntries {
            peers,
            peer_ips: collect(self.peer_ips.iter())?,
        })
    }

    /// The service maps as the kernel has them.
    pub fn service_entries(&self) -> Result<ServiceEntries, MapError> {
        Ok(ServiceEntries {
            services: collect(self.services.iter())?,
            backends: collect(self.backends.iter())?,
            vips: collect(self.vips.iter())?,
            live: collect(self.live.keys())?,
            affinity: collect(self.affinity.keys())?,
        })
    }

    /// The endpoints: learnt by the data path, or registered.
    pub fn endpoint_entries(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, MapError> {
        collect(self.endpoints.iter())
    }

    /// The conntrack tables, on handles of their own (file descriptors
    /// duplicated): the agent's sweeper runs on them beside the maps.
    pub fn conntrack(&self) -> Result<super::ct::CtTable, MapError> {
        super::ct::CtTable::from_maps(
            dup(&self.ct)?,
            dup(&self.rnat)?,
            dup(&self.ct_gc)?,
            dup(&self.ct_cfg_read)?,
            Some((dup(&self.masq)?, dup(&self.masq_rev)?)),
        )
    }

    /// The CNI pods' ports.
    pub fn pod_port_entries(&self) -> Result<Vec<(PodPortKey, PodPortInfo)>, MapError> {
        collect(self.pod_ports.iter())
    }
}
