//! The data plane as the agent sees it: loading the BPF object, pinning its
//! maps, attaching programs, and typed access to the maps. This is the only
//! module that touches `aya::maps`; the rest of the agent speaks in subnets,
//! IPs and MACs.
//!
//! Userspace keeps a shadow of what it wrote (Katran's model): the shadow
//! is the source of truth, every change is a diff against it, and a full
//! resync also removes whatever is in the (pinned, possibly older) map but
//! not in the shadow.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    ffi::CString,
    fs,
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use dataplane_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, Counter, EndpointInfo, EndpointKey, LiveInfo,
    LiveKey, NodeConfig, PeerInfo, PeerIpInfo, PeerIpKey, STATS_LEN, SVC_F_AFFINITY, Stat,
    SvcCounters, SvcInfo, SvcKey, VipInfo, VipKey, map_names, prog_names,
};
use ipnet::Ipv4Net;
use log::{debug, info, warn};

/// Where decapsulation runs on the underlay interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapMode {
    /// XDP on the underlay (native where the driver supports it).
    Xdp,
    /// TC ingress on the underlay.
    Tc,
    /// XDP on physical NICs, TC on virtual devices (veth, bridge, ...),
    /// where attaching XDP turns off TSO on the peer and costs more than it saves.
    Auto,
}

impl DecapMode {
    /// Resolves `Auto` for an interface of the given rtnetlink kind
    /// (`None` for a physical NIC).
    pub fn resolve(self, link_kind: Option<&str>) -> DecapMode {
        match self {
            DecapMode::Auto if link_kind.is_none() => DecapMode::Xdp,
            DecapMode::Auto => DecapMode::Tc,
            m => m,
        }
    }
}

/// A remote node as the data plane needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub public_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// Counts of map writes, so tests and the benchmark can check that a change
/// costs writes proportional to the change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub updates: u64,
    pub deletes: u64,
}

/// Makes sure a BPF filesystem is mounted at `/sys/fs/bpf` (a fresh
/// machine may have none) and the pin directory exists.
pub fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !is_bpffs(root) {
        fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let src = CString::new("bpf")?;
        let target = CString::new("/sys/fs/bpf")?;
        // SAFETY: plain mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
        }
        info!("mounted bpffs at /sys/fs/bpf");
    }
    fs::create_dir_all(pin_path).with_context(|| format!("creating {}", pin_path.display()))?;
    if !is_bpffs(pin_path) {
        bail!("{} is not on a BPF filesystem", pin_path.display());
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// The loaded programs and their pinned maps.
pub struct Dataplane {
    ebpf: Ebpf,
    peers: LpmTrie<MapData, [u8; 4], PeerInfo>,
    peer_ips: HashMap<MapData, PeerIpKey, PeerIpInfo>,
    node_cfg: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, Counter>,
    /// Learnt by the data path; pruned here when a port goes.
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    svc: ServiceMaps,
    /// Shadow of `peers`: what we wrote.
    shadow: BTreeMap<Ipv4Net, Peer>,
    /// Shadow of `peer_ips`: lease count per PublicIP.
    shadow_ips: BTreeMap<Ipv4Addr, u32>,
    writes: WriteStats,
    pod_links: StdHashMap<String, SchedClassifierLinkId>,
    underlay: Option<(String, SchedClassifierLinkId, Option<XdpLinkId>)>,
}

impl Dataplane {
    /// Loads the embedded object, creating the maps pinned under `pin_path`
    /// or reusing the ones an earlier run pinned there (their contents are
    /// then re-synced by [`Dataplane::sync_peers`]).
    pub fn load(pin_path: &Path) -> anyhow::Result<Self> {
        Self::load_with(Some(pin_path))
    }

    /// Like [`Dataplane::load`]; `None` creates private, unpinned maps
    /// (packet tests, benchmarks).
    pub fn load_with(pin_path: Option<&Path>) -> anyhow::Result<Self> {
        let names = [
            map_names::PEERS,
            map_names::PEER_IPS,
            map_names::NODE_CONFIG,
            map_names::STATS,
            map_names::SERVICES,
            map_names::BACKENDS,
            map_names::VIPS,
            map_names::CT,
            map_names::RNAT,
            map_names::AFFINITY,
            map_names::SVC_STATS,
            map_names::ENDPOINTS,
            map_names::LIVE,
        ];
        let mut loader = EbpfLoader::new();
        if let Some(pin_path) = pin_path {
            ensure_bpffs(pin_path)?;
            for name in names {
                loader.map_pin_path(name, pin_path.join(name));
            }
        }
        let mut ebpf = loader.load(crate::BPF_OBJECT).map_err(|e| {
            // The Display of a load error carries the verifier log.
            anyhow!("loading BPF object: {e}")
        })?;
        for name in [prog_names::FROM_POD, prog_names::FROM_UNDERLAY] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from object"))?
                .try_into()?;
            prog.load().map_err(|e| anyhow!("loading {name}: {e}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(prog_names::DECAP_XDP)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::DECAP_XDP))?
            .try_into()?;
        xdp.load()
            .map_err(|e| anyhow!("loading {}: {e}", prog_names::DECAP_XDP))?;

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from object"))
        };
        let peers = LpmTrie::try_from(take(&mut ebpf, map_names::PEERS)?)?;
        let peer_ips = HashMap::try_from(take(&mut ebpf, map_names::PEER_IPS)?)?;
        let node_cfg = Array::try_from(take(&mut ebpf, map_names::NODE_CONFIG)?)?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, map_names::STATS)?)?;
        let endpoints = HashMap::try_from(take(&mut ebpf, map_names::ENDPOINTS)?)?;
        let svc = ServiceMaps {
            services: HashMap::try_from(take(&mut ebpf, map_names::SERVICES)?)?,
            backends: HashMap::try_from(take(&mut ebpf, map_names::BACKENDS)?)?,
            vips: HashMap::try_from(take(&mut ebpf, map_names::VIPS)?)?,
            affinity: HashMap::try_from(take(&mut ebpf, map_names::AFFINITY)?)?,
            svc_stats: PerCpuHashMap::try_from(take(&mut ebpf, map_names::SVC_STATS)?)?,
            live: HashMap::try_from(take(&mut ebpf, map_names::LIVE)?)?,
            shadow: BTreeMap::new(),
            vip_refs: BTreeMap::new(),
            free_ids: Vec::new(),
            next_id: 0,
            writes: WriteStats::default(),
        };
        match pin_path {
            Some(p) => info!("BPF programs loaded, maps pinned under {}", p.display()),
            None => info!("BPF programs loaded (maps not pinned)"),
        }
        Ok(Self {
            ebpf,
            peers,
            peer_ips,
            node_cfg,
            stats,
            endpoints,
            svc,
            shadow: BTreeMap::new(),
            shadow_ips: BTreeMap::new(),
            writes: WriteStats::default(),
            pod_links: StdHashMap::new(),
            underlay: None,
        })
    }

    /// The loaded object, for running programs with BPF_PROG_TEST_RUN.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn set_node_config(&mut self, cfg: &NodeConfig) -> anyhow::Result<()> {
        self.node_cfg
            .set(0, cfg, 0)
            .context("writing node config")?;
        Ok(())
    }

    /// Makes the peer maps equal `desired` (subnet -> remote node),
    /// writing only what differs from the shadow. With `full`, also reads
    /// the kernel maps and removes entries the shadow does not know
    /// (left by an earlier run, or missed events).
    pub fn sync_peers(
        &mut self,
        desired: &BTreeMap<Ipv4Net, Peer>,
        full: bool,
    ) -> anyhow::Result<()> {
        // Desired PublicIP lease counts.
        let mut want_ips: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for p in desired.values() {
            *want_ips.entry(p.public_ip).or_default() += 1;
        }
        // Order: accept a new sender before sending to it; stop sending to
        // a removed subnet before refusing its sender.
        for (ip, n) in &want_ips {
            if self.shadow_ips.get(ip) != Some(n) {
                let key = PeerIpKey {
                    public_ip: ip.octets(),
                };
                self.peer_ips.insert(key, PeerIpInfo { leases: *n }, 0)?;
                self.writes.updates += 1;
            }
        }
        for (net, p) in desired {
            if self.shadow.get(net) != Some(p) {
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                let val = PeerInfo {
                    public_ip: p.public_ip.octets(),
                    vtep_mac: p.vtep_mac,
                    _pad: [0; 2],
                };
                self.peers
                    .insert(&key, val, 0)
                    .with_context(|| format!("adding peer {net}"))?;
                self.writes.updates += 1;
                debug!(
                    "peer map: {net} -> {} {}",
                    p.public_ip,
                    fmt_mac(&p.vtep_mac)
                );
            }
        }
        let stale: Vec<Ipv4Net> = self
            .shadow
            .keys()
            .filter(|n| !desired.contains_key(n))
            .copied()
            .collect();
        for net in stale {
            let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
            remove_ok_if_missing(self.peers.remove(&key))
                .with_context(|| format!("removing peer {net}"))?;
            self.writes.deletes += 1;
            debug!("peer map: removed {net}");
        }
        let stale_ips: Vec<Ipv4Addr> = self
            .shadow_ips
            .keys()
            .filter(|ip| !want_ips.contains_key(ip))
            .copied()
            .collect();
        for ip in stale_ips {
            remove_ok_if_missing(self.peer_ips.remove(&PeerIpKey {
                public_ip: ip.octets(),
            }))?;
            self.writes.deletes += 1;
        }
        if full {
            let in_map: Vec<Key<[u8; 4]>> = self.peers.keys().filter_map(Result::ok).collect();
            for k in in_map {
                let net = Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8);
                if let Ok(net) = net
                    && !desired.contains_key(&net)
                {
                    warn!("peer map: removing stale entry {net} (not in etcd)");
                    remove_ok_if_missing(self.peers.remove(&k))?;
                    self.writes.deletes += 1;
                }
            }
            let in_map: Vec<PeerIpKey> = self.peer_ips.keys().filter_map(Result::ok).collect();
            for k in in_map {
                if !want_ips.contains_key(&Ipv4Addr::from(k.public_ip)) {
                    remove_ok_if_missing(self.peer_ips.remove(&k))?;
                    self.writes.deletes += 1;
                }
            }
        }
        self.shadow = desired.clone();
        self.shadow_ips = want_ips;
        Ok(())
    }

    /// Attaches decapsulation to the underlay interface: always the TC
    /// program (it decapsulates in TC mode and delivers XDP-decapsulated
    /// frames in XDP mode), plus the XDP program in XDP mode.
    pub fn attach_underlay(&mut self, iface: &str, mode: DecapMode) -> anyhow::Result<()> {
        if mode == DecapMode::Auto {
            bail!("decap mode must be resolved before attaching");
        }
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog_names::FROM_UNDERLAY)
            .ok_or_else(|| anyhow!("no {}", prog_names::FROM_UNDERLAY))?
            .try_into()?;
        let tc_link = tc.attach(iface, TcAttachType::Ingress).with_context(|| {
            format!("attaching {} to {iface} ingress", prog_names::FROM_UNDERLAY)
        })?;
        let xdp_link = if mode == DecapMode::Xdp {
            let xdp: &mut Xdp = self
                .ebpf
                .program_mut(prog_names::DECAP_XDP)
                .ok_or_else(|| anyhow!("no {}", prog_names::DECAP_XDP))?
                .try_into()?;
            Some(
                xdp.attach(iface, XdpMode::Default)
                    .with_context(|| format!("attaching {} to {iface}", prog_names::DECAP_XDP))?,
            )
        } else {
            None
        };
        info!("decapsulation attached to {iface} ({mode:?} mode)");
        self.underlay = Some((iface.to_owned(), tc_link, xdp_link));
        Ok(())
    }

    /// Makes the set of pod interfaces with `from_pod` attached equal
    /// `ifaces` (the bridge's ports). New ports get the program; links of
    /// vanished ports are forgotten (the kernel detached them with the
    /// device). Returns how many were attached.
    pub fn sync_pod_ports(&mut self, ports: &[(String, u32)]) -> anyhow::Result<usize> {
        let ifaces: Vec<String> = ports.iter().map(|(n, _)| n.clone()).collect();
        // Pods whose port is gone: delivering to a stale ifindex would
        // drop their (new owner's) traffic silently.
        let stale: Vec<EndpointKey> = self
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| !ports.iter().any(|(_, idx)| *idx == v.ifindex))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            remove_ok_if_missing(self.endpoints.remove(&k))?;
            debug!("endpoint {} forgotten (port gone)", Ipv4Addr::from(k.ip));
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog_names::FROM_POD)
            .ok_or_else(|| anyhow!("no {}", prog_names::FROM_POD))?
            .try_into()?;
        let gone: Vec<String> = self
            .pod_links
            .keys()
            .filter(|n| !ifaces.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(id) = self.pod_links.remove(&name) {
                // The device is gone and took the attachment with it;
                // dropping the link object just releases our fd.
                let _ = prog.take_link(id);
                debug!("pod port {name} gone");
            }
        }
        let mut attached = 0;
        for name in &ifaces {
            if self.pod_links.contains_key(name) {
                continue;
            }
            match prog.attach(name, TcAttachType::Ingress) {
                Ok(id) => {
                    self.pod_links.insert(name.clone(), id);
                    attached += 1;
                    info!("attached {} to pod port {name}", prog_names::FROM_POD);
                }
                // The port may vanish between listing and attaching.
                Err(e) => warn!("attaching {} to {name}: {e}", prog_names::FROM_POD),
            }
        }
        Ok(attached)
    }

    /// The service maps, for programming frontends.
    pub fn services(&mut self) -> &mut ServiceMaps {
        &mut self.svc
    }

    /// Per-outcome counters summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Stat, Counter)>> {
        read_stats(&self.stats)
    }
}

fn read_stats(map: &PerCpuArray<MapData, Counter>) -> anyhow::Result<Vec<(Stat, Counter)>> {
    let mut out = Vec::new();
    for &stat in Stat::ALL {
        let idx = stat as u32;
        if idx >= STATS_LEN {
            continue;
        }
        let per_cpu = map.get(&idx, 0)?;
        let mut sum = Counter::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        out.push((stat, sum));
    }
    Ok(out)
}

/// Reads the counters from the pinned stats map of a running agent.
pub fn read_pinned_stats(pin_path: &Path) -> anyhow::Result<Vec<(Stat, Counter)>> {
    let path = pin_path.join(map_names::STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    read_stats(&map)
}

/// Per-frontend counters from the pinned map of a running agent.
pub fn read_pinned_svc_stats(pin_path: &Path) -> anyhow::Result<Vec<(SvcKey, SvcCounters)>> {
    let path = pin_path.join(map_names::SVC_STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: PerCpuHashMap<MapData, SvcKey, SvcCounters> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
    let mut out = Vec::new();
    for (k, per_cpu) in map.iter().filter_map(Result::ok) {
        let sum = per_cpu.iter().fold(SvcCounters::default(), |mut s, c| {
            s.new_flows += c.new_flows;
            s.packets += c.packets;
            s.bytes += c.bytes;
            s.rejections += c.rejections;
            s
        });
        out.push((k, sum));
    }
    out.sort_by_key(|(k, _)| *k);
    Ok(out)
}

fn remove_ok_if_missing(r: Result<(), aya::maps::MapError>) -> anyhow::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// What one frontend should look like in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout, seconds.
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug)]
struct ShadowFrontend {
    id: u32,
    info: SvcInfo,
    backends: Vec<Backend>,
}

/// The service maps and their shadow. One frontend is one
/// (ClusterIP, port, protocol); a change to it costs writes proportional
/// to its own backends, never to the number of services.
pub struct ServiceMaps {
    services: HashMap<MapData, SvcKey, SvcInfo>,
    backends: HashMap<MapData, BackendKey, Backend>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    svc_stats: PerCpuHashMap<MapData, SvcKey, SvcCounters>,
    live: HashMap<MapData, LiveKey, LiveInfo>,
    shadow: BTreeMap<SvcKey, ShadowFrontend>,
    vip_refs: BTreeMap<[u8; 4], u32>,
    free_ids: Vec<u32>,
    next_id: u32,
    writes: WriteStats,
}

impl ServiceMaps {
    pub fn writes(&self) -> WriteStats {
        self.writes
    }

    pub fn frontends(&self) -> usize {
        self.shadow.len()
    }

    /// Programs (or reprograms) one frontend. Order matters for packets in
    /// flight: flows to removed backends are forgotten first, new slots are
    /// written before the count grows, and the count shrinks before slots
    /// are deleted, so a lookup never lands on an empty slot.
    pub fn set_frontend(&mut self, key: SvcKey, want: &FrontendState) -> anyhow::Result<()> {
        let (id, old_backends, old_info) = match self.shadow.get(&key) {
            Some(f) => (f.id, f.backends.clone(), Some(f.info)),
            None => (self.alloc_id(), Vec::new(), None),
        };
        let info = SvcInfo {
            id,
            count: want.backends.len() as u32,
            flags: if want.affinity_timeout_s.is_some() {
                SVC_F_AFFINITY
            } else {
                0
            },
            affinity_timeout_s: want.affinity_timeout_s.unwrap_or(0),
        };
        if old_info == Some(info) && old_backends == want.backends {
            return Ok(());
        }
        // Flows to a removed backend die at their next packet: the data
        // path finds the (service, backend) pair gone from live_v1.
        for b in old_backends.iter().filter(|b| !want.backends.contains(b)) {
            remove_ok_if_missing(self.live.remove(&LiveKey {
                svc_id: id,
                backend: *b,
            }))?;
            self.writes.deletes += 1;
        }
        for b in want.backends.iter().filter(|b| !old_backends.contains(b)) {
            self.live.insert(
                LiveKey {
                    svc_id: id,
                    backend: *b,
                },
                LiveInfo::default(),
                0,
            )?;
            self.writes.updates += 1;
        }
        let shrink = want.backends.len() < old_backends.len();
        if shrink && old_info.is_some() {
            self.services.insert(key, info, 0)?;
            self.writes.updates += 1;
        }
        for (slot, b) in want.backends.iter().enumerate() {
            if old_backends.get(slot) != Some(b) {
                self.backends.insert(
                    BackendKey {
                        svc_id: id,
                        slot: slot as u32,
                    },
                    *b,
                    0,
                )?;
                self.writes.updates += 1;
            }
        }
        if (!shrink || old_info.is_none()) && old_info != Some(info) {
            self.services.insert(key, info, 0)?;
            self.writes.updates += 1;
        }
        for slot in want.backends.len()..old_backends.len() {
            remove_ok_if_missing(self.backends.remove(&BackendKey {
                svc_id: id,
                slot: slot as u32,
            }))?;
            self.writes.deletes += 1;
        }
        if old_info.is_none() {
            let n = self.vip_refs.entry(key.vip).or_default();
            *n += 1;
            self.vips
                .insert(VipKey { vip: key.vip }, VipInfo { frontends: *n }, 0)?;
            self.writes.updates += 1;
        }
        self.shadow.insert(
            key,
            ShadowFrontend {
                id,
                info,
                backends: want.backends.clone(),
            },
        );
        Ok(())
    }

    /// Removes a frontend and everything that hangs off it.
    pub fn remove_frontend(&mut self, key: &SvcKey) -> anyhow::Result<()> {
        let Some(f) = self.shadow.remove(key) else {
            return Ok(());
        };
        remove_ok_if_missing(self.services.remove(key))?;
        self.writes.deletes += 1;
        for (slot, b) in f.backends.iter().enumerate() {
            remove_ok_if_missing(self.backends.remove(&BackendKey {
                svc_id: f.id,
                slot: slot as u32,
            }))?;
            remove_ok_if_missing(self.live.remove(&LiveKey {
                svc_id: f.id,
                backend: *b,
            }))?;
            self.writes.deletes += 2;
        }
        let _ = self.svc_stats.remove(key);
        match self.vip_refs.get_mut(&key.vip) {
            Some(n) if *n > 1 => {
                *n -= 1;
                self.vips
                    .insert(VipKey { vip: key.vip }, VipInfo { frontends: *n }, 0)?;
                self.writes.updates += 1;
            }
            _ => {
                self.vip_refs.remove(&key.vip);
                remove_ok_if_missing(self.vips.remove(&VipKey { vip: key.vip }))?;
                self.writes.deletes += 1;
            }
        }
        self.free_ids.push(f.id);
        Ok(())
    }

    /// Empties the service maps (not conntrack: its entries name backends
    /// by address and stay valid) and the shadow. Called at startup, before
    /// anything is attached.
    pub fn clear(&mut self) -> anyhow::Result<()> {
        let keys: Vec<SvcKey> = self.services.keys().filter_map(Result::ok).collect();
        for k in &keys {
            remove_ok_if_missing(self.services.remove(k))?;
        }
        let keys: Vec<BackendKey> = self.backends.keys().filter_map(Result::ok).collect();
        for k in &keys {
            remove_ok_if_missing(self.backends.remove(k))?;
        }
        let keys: Vec<VipKey> = self.vips.keys().filter_map(Result::ok).collect();
        for k in &keys {
            remove_ok_if_missing(self.vips.remove(k))?;
        }
        let keys: Vec<AffinityKey> = self.affinity.keys().filter_map(Result::ok).collect();
        for k in &keys {
            remove_ok_if_missing(self.affinity.remove(k))?;
        }
        let keys: Vec<LiveKey> = self.live.keys().filter_map(Result::ok).collect();
        for k in &keys {
            remove_ok_if_missing(self.live.remove(k))?;
        }
        self.shadow.clear();
        self.vip_refs.clear();
        self.free_ids.clear();
        self.next_id = 0;
        Ok(())
    }

    fn alloc_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            let id = self.next_id;
            self.next_id += 1;
            id
        })
    }
}
