//! Every map the programs use, one comment each. Layouts come from
//! `dataplane-common`; the names are spelled here as literals
//! (`#[btf_map(name = ...)]` takes nothing else) and must be exactly
//! `dataplane_common::map_names::ALL`, which `tests/tests/bpf_object.rs`
//! checks against the built object. The agent pins them under
//! `--pin-path`. They are BTF maps (`.maps` section) so `bpftool map dump`
//! prints typed keys and values.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use dataplane_common::{
    AFFINITY_MAX, AffinityEntry, AffinityKey, BACKENDS_MAX, Backend, BackendKey, CT_MAX, Counter,
    CtEntry, CtKey, ENDPOINTS_MAX, EndpointInfo, EndpointKey, FRAGS_MAX, FragEntry, FragKey,
    LiveInfo, LiveKey, MaglevKey, MaglevTable, NodeConfig, PEER_IPS_MAX, PEERS_MAX, POD_PORTS_MAX,
    PeerInfo, PeerIpInfo, PeerIpKey, PodPortInfo, PodPortKey, RnatEntry, SERVICES_MAX, SOCK_LB_MAX,
    STATS_LEN, SockFwdKey, SockRnatEntry, SockRnatKey, SvcCounters, SvcInfo, SvcKey, VipInfo,
    VipKey,
    ct::{CT_GC_LEN, CtTimeouts},
    masq::{MasqEntry, MasqRev},
};

/// Remote pod subnet (LPM) -> remote node's PublicIP and VtepMAC. Filled by
/// the agent from the etcd lease watch; read by encapsulation.
#[btf_map(name = "peers_v1")]
pub static PEERS: LpmTrie<[u8; 4], PeerInfo, { PEERS_MAX as usize }> = LpmTrie::new();

/// PublicIPs that hold a lease. Decapsulation drops VXLAN from anyone else.
#[btf_map(name = "peer_ips_v1")]
pub static PEER_IPS: HashMap<PeerIpKey, PeerIpInfo, { PEER_IPS_MAX as usize }> = HashMap::new();

/// This node: addresses, interfaces, VNI and port. One entry, index 0.
#[btf_map(name = "node_cfg_v2")]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Packets and bytes per outcome, indexed by `dataplane_common::Stat`.
#[btf_map(name = "stats_v2")]
pub static STATS: PerCpuArray<Counter, { STATS_LEN as usize }> = PerCpuArray::new();

/// Service frontend (ClusterIP, port, protocol) -> service entry.
#[btf_map(name = "svc_v1")]
pub static SERVICES: HashMap<SvcKey, SvcInfo, { SERVICES_MAX as usize }> = HashMap::new();

/// (service id, slot) -> backend. Slots 0..count of a service are in use.
#[btf_map(name = "backends_v1")]
pub static BACKENDS: HashMap<BackendKey, Backend, { BACKENDS_MAX as usize }> = HashMap::new();

/// ClusterIPs; traffic to one that matches no frontend is dropped.
#[btf_map(name = "vips_v1")]
pub static VIPS: HashMap<VipKey, VipInfo, { SERVICES_MAX as usize }> = HashMap::new();

/// Connection tracking: client -> ClusterIP flow to its backend, state
/// and last seen (see `ct.rs`). A plain hash, not LRU: the kernel never
/// evicts a flow; expired ones are absent to the data path and removed by
/// the agent's sweeper. The agent sizes it (`--ct-max`) at load time.
#[btf_map(name = "ct_v2")]
pub static CT: HashMap<CtKey, CtEntry, { CT_MAX as usize }> = HashMap::new();

/// Reverse NAT: backend -> client flow to the ClusterIP it came in on.
/// Valid only while the `CT` entry it names is live and points back.
#[btf_map(name = "rnat_v2")]
pub static RNAT: HashMap<CtKey, RnatEntry, { CT_MAX as usize }> = HashMap::new();

/// Conntrack timeouts per state, index 0, written by the agent.
#[btf_map(name = "ct_cfg_v1")]
pub static CT_CONFIG: Array<CtTimeouts, 1> = Array::new();

/// The agent's sweeper counters (`dataplane_common::ct::CtGc`); the
/// programs do not use it, the object declares it so it is pinned with
/// the others.
#[btf_map(name = "ct_gc_v1")]
pub static CT_GC: Array<u64, { CT_GC_LEN as usize }> = Array::new();

/// sessionAffinity ClientIP: (service, client) -> backend and last use.
#[btf_map(name = "affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { AFFINITY_MAX as usize }> =
    LruHashMap::new();

/// Per-frontend counters. Allocated per entry (`BPF_F_NO_PREALLOC`), not
/// up front: preallocated, 65,536 entries of per-CPU counters take 32 B ×
/// 65,536 × CPUs (128 MiB on 64 CPUs) however few frontends there are.
#[btf_map(name = "svc_stats_v1")]
pub static SVC_STATS: PerCpuHashMap<
    SvcKey,
    SvcCounters,
    { SERVICES_MAX as usize },
    { BPF_F_NO_PREALLOC },
> = PerCpuHashMap::new();

/// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h): hash map elements are
/// allocated as they are inserted.
const BPF_F_NO_PREALLOC: usize = 1;

/// Local pod IPv4 -> host-side veth and MACs. Registered by the agent for
/// CNI pods; learnt by from_pod on bridge ports, pruned by the agent when a
/// port goes (see `endpoints.rs`). Read by decapsulation to deliver straight
/// into the pod (see `forward::redirect_to_pod`).
#[btf_map(name = "endpoints_v1")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { ENDPOINTS_MAX as usize }> =
    HashMap::new();

/// (service id, backend) pairs in use; conntrack and affinity entries are
/// checked against it, so stale ones die where they are found.
#[btf_map(name = "live_v1")]
pub static LIVE: HashMap<LiveKey, LiveInfo, { BACKENDS_MAX as usize }> = HashMap::new();

/// Host-side ifindex of a CNI pod -> the pod's IP and MAC: from_pod's
/// anti-spoofing check, and "do not learn here". Written by the agent.
#[btf_map(name = "pod_ports_v1")]
pub static POD_PORTS: HashMap<PodPortKey, PodPortInfo, { POD_PORTS_MAX as usize }> = HashMap::new();

/// First fragments of translated datagrams -> their ports, for the later
/// fragments (see `frag.rs`). An LRU: an entry is needed only while its
/// datagram is in flight.
#[btf_map(name = "frags_v1")]
pub static FRAGS: LruHashMap<FragKey, FragEntry, { FRAGS_MAX as usize }> = LruHashMap::new();

/// The node's own sockets sent to a backend at connect / sendmsg (see
/// `sock.rs`): (socket cookie, backend) -> the ClusterIP and port asked
/// for, read back at recvmsg and getpeername. An LRU: a closed socket's
/// entries are simply evicted.
#[btf_map(name = "sock_rnat_v1")]
pub static SOCK_RNAT: LruHashMap<SockRnatKey, SockRnatEntry, { SOCK_LB_MAX as usize }> =
    LruHashMap::new();

/// (socket cookie, ClusterIP, port) -> the backend an unconnected UDP
/// socket of the node sends to, so its datagrams keep to one backend.
#[btf_map(name = "sock_fwd_v1")]
pub static SOCK_FWD: LruHashMap<SockFwdKey, Backend, { SOCK_LB_MAX as usize }> = LruHashMap::new();
/// Masquerade, forward: a flow as the pod sent it (pod -> outside) ->
/// the node address and NAT port it leaves with, state, last seen (see
/// `masq.rs`). A plain hash like `CT`, sized by the agent (`--ct-max`),
/// expired entries removed by its sweeper.
#[btf_map(name = "masq_v1")]
pub static MASQ: HashMap<CtKey, MasqEntry, { CT_MAX as usize }> = HashMap::new();

/// Masquerade, reverse: a reply as it arrives (outside -> node address,
/// NAT port) -> the pod end. Inserting it with `BPF_NOEXIST` is what
/// allocates the port. Valid only while the `MASQ` entry it names is live
/// and points back.
#[btf_map(name = "masq_rev_v1")]
pub static MASQ_REV: HashMap<CtKey, MasqRev, { CT_MAX as usize }> = HashMap::new();
/// North-south frontend's service id -> its Maglev lookup table (backend
/// slots), written by the agent from the frontend's backends in slot
/// order (see `nodeport.rs`). Allocated per entry: only north-south
/// frontends have one (2,042 bytes each).
#[btf_map(name = "maglev_v1")]
pub static MAGLEV: HashMap<
    MaglevKey,
    MaglevTable,
    { SERVICES_MAX as usize },
    { BPF_F_NO_PREALLOC },
> = HashMap::new();
