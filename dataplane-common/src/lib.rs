//! Types shared by the BPF programs (`dataplane-ebpf`) and the agent (`dataplane`).
//!
//! Everything here is `#[repr(C)]`, padded explicitly (no implicit holes, so
//! the kernel never sees uninitialised bytes in a key) and size-checked at
//! compile time. Addresses and ports are kept in network byte order as byte
//! arrays: that is what is on the wire, and `bpftool map dump` prints them as
//! `[10,244,1,0]`, which an operator can read.
//!
//! Map names carry a version suffix (as Cilium's do) so a later layout change
//! can live beside the old pinned map and migrate it.
#![no_std]

use core::mem::size_of;

pub mod ct;
pub mod masq;

/// Names of the pinned maps (the file names under `--pin-path`).
pub mod map_names {
    /// LPM trie: remote pod subnet -> remote node (PublicIP, VtepMAC).
    pub const PEERS: &str = "peers_v1";
    /// Hash: remote node PublicIP -> VtepMAC; a VXLAN sender must be in here.
    pub const PEER_IPS: &str = "peer_ips_v1";
    /// Array[1]: this node's configuration (addresses, ifindexes, VNI, port).
    pub const NODE_CONFIG: &str = "node_cfg_v2";
    /// Per-CPU array indexed by [`Stat`]: packets and bytes per outcome.
    pub const STATS: &str = "stats_v2";
    /// Hash: service frontend (ClusterIP, port, protocol) -> service entry.
    pub const SERVICES: &str = "svc_v1";
    /// Hash: (service id, slot) -> backend (IP, port).
    pub const BACKENDS: &str = "backends_v1";
    /// Hash: ClusterIP -> number of frontends; traffic to a ClusterIP on a
    /// port/protocol no frontend defines is dropped, never forwarded raw.
    pub const VIPS: &str = "vips_v1";
    /// Hash (not LRU: the kernel never evicts a flow): original flow
    /// (client -> ClusterIP) -> backend, state, last seen. Sized by the
    /// agent's `--ct-max`.
    pub const CT: &str = "ct_v2";
    /// Hash: reply flow (backend -> client) -> ClusterIP to restore. Used
    /// only while the forward entry it names is live and points back at it.
    pub const RNAT: &str = "rnat_v2";
    /// Array[1]: conntrack timeouts per state ([`crate::ct::CtTimeouts`]).
    pub const CT_CONFIG: &str = "ct_cfg_v1";
    /// Array of u64 indexed by [`crate::ct::CtGc`]: the agent's sweeper
    /// counters, kept pinned so `dataplane stats` reads them while the
    /// agent is down.
    pub const CT_GC: &str = "ct_gc_v1";
    /// LRU: (service id, client IP) -> backend, for sessionAffinity ClientIP.
    pub const AFFINITY: &str = "affinity_v1";
    /// Per-CPU hash: service frontend -> flows, packets, bytes, rejections.
    pub const SVC_STATS: &str = "svc_stats_v1";
    /// Hash: (service id, backend) pairs in use. A conntrack or affinity
    /// entry whose pair is missing is stale and is dropped where it is
    /// found, so removing a backend costs one delete, not a conntrack scan.
    pub const LIVE: &str = "live_v1";
    /// Hash: local pod IPv4 -> its host-side veth and MACs, for delivering
    /// decapsulated packets straight into the pod (bpf_redirect_peer).
    /// Registered by the agent for CNI pods, learnt by `from_pod` for pods
    /// on the bridge.
    pub const ENDPOINTS: &str = "endpoints_v1";
    /// Hash: host-side ifindex of a pod registered through CNI -> the
    /// pod's IP and MAC. `from_pod` drops what such a port sends from any
    /// other address, and learns nothing there.
    pub const POD_PORTS: &str = "pod_ports_v1";
    /// LRU: first fragment of a translated IPv4 datagram (source,
    /// destination, protocol, IP ID) -> its ports, so that the later
    /// fragments, which carry none, follow the same flow.
    pub const FRAGS: &str = "frags_v1";
    /// LRU: (socket cookie, backend address, port) -> the ClusterIP and
    /// port the node's own socket asked for: `sock_recvmsg4` and
    /// `sock_getpeername4` show the ClusterIP again.
    pub const SOCK_RNAT: &str = "sock_rnat_v1";
    /// LRU: (socket cookie, ClusterIP, port) -> the backend an
    /// unconnected UDP socket of the node sends that ClusterIP's
    /// datagrams to, so that they keep to one backend as a tracked flow
    /// does.
    pub const SOCK_FWD: &str = "sock_fwd_v1";
    /// Hash (not LRU, sized by `--ct-max`): a masqueraded flow as the pod
    /// sent it (pod -> outside) -> the node address and port it leaves
    /// with, state, last seen ([`crate::masq`]).
    pub const MASQ: &str = "masq_v1";
    /// Hash: a masqueraded flow's reply as it arrives (outside -> node
    /// address and NAT port) -> the pod and port it is for. Used only while
    /// the forward entry it names is live and points back at it; inserted
    /// with `BPF_NOEXIST`, which is what allocates the NAT port.
    pub const MASQ_REV: &str = "masq_rev_v1";
    /// Hash (allocated per entry): north-south frontend's service id ->
    /// its Maglev lookup table (backend slots), written by the agent.
    pub const MAGLEV: &str = "maglev_v1";

    /// Maps of earlier releases that a starting agent migrates and then
    /// removes (never created by this one).
    pub mod previous {
        /// LRU: `CtKey` -> `ct::CtEntryV1` (backend, snat, svc_id).
        pub const CT_V1: &str = "ct_v1";
        /// LRU: `CtKey` -> `RnatEntry`.
        pub const RNAT_V1: &str = "rnat_v1";
        /// Array, one `NodeConfig` of 56 bytes; rewritten by every agent
        /// at start, so nothing is carried over.
        pub const NODE_CONFIG_V1: &str = "node_cfg_v1";
        /// Per-CPU array of 64 counters; `stats_v2` has room for 128.
        /// Counters restart from zero at that upgrade.
        pub const STATS_V1: &str = "stats_v1";
    }

    /// Every map the programs define, exactly (a test checks this list
    /// against the built object, where `dataplane-ebpf/src/maps.rs` has to
    /// spell the names as literals).
    pub const ALL: &[&str] = &[
        PEERS,
        PEER_IPS,
        NODE_CONFIG,
        STATS,
        SERVICES,
        BACKENDS,
        VIPS,
        CT,
        RNAT,
        CT_CONFIG,
        CT_GC,
        AFFINITY,
        SVC_STATS,
        LIVE,
        ENDPOINTS,
        POD_PORTS,
        FRAGS,
        SOCK_RNAT,
        SOCK_FWD,
        MASQ,
        MASQ_REV,
        MAGLEV,
    ];
}

/// Program names as they appear in the object file.
pub mod prog_names {
    pub const FROM_POD: &str = "from_pod";
    pub const FROM_UNDERLAY: &str = "from_underlay";
    pub const DECAP_XDP: &str = "decap_xdp";
    /// TC egress of the host overlay device (`--host-device`): the node's
    /// own packets to other nodes' pod subnets.
    pub const FROM_HOST: &str = "from_host";
    /// cgroup connect4: the node's own connections to ClusterIPs, balanced
    /// at the socket.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: UDP datagrams to a ClusterIP (unconnected sockets).
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: a UDP reply's source shown as the ClusterIP.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a connected socket's peer shown as the ClusterIP.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// TC egress of the underlay: masquerade of pod traffic leaving the
    /// cluster network (and of Service flows to backends outside it).
    pub const TO_UNDERLAY: &str = "to_underlay";
    /// TC egress where the host stack hands packets to pods (`cni0`, CNI
    /// pods' host-side devices): reverse NAT of Service replies that came
    /// through the host stack.
    pub const TO_POD: &str = "to_pod";

    /// The cgroup sock_addr programs (attached to `--cgroup-path`).
    pub const SOCK: &[&str] = &[
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
    ];

    /// Every program in the object, exactly (checked against it by a test).
    pub const ALL: &[&str] = &[
        FROM_POD,
        FROM_UNDERLAY,
        DECAP_XDP,
        FROM_HOST,
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        TO_UNDERLAY,
        TO_POD,
    ];
}

pub const PEERS_MAX: u32 = 16_384;
pub const SERVICES_MAX: u32 = 65_536;
pub const BACKENDS_MAX: u32 = 262_144;
/// Default size of the conntrack tables (`--ct-max`): kube-proxy's
/// `nf_conntrack_max` on a 16-core node (32,768 per core), Cilium's
/// default TCP table. See the README for the memory it takes.
pub const CT_MAX: u32 = 524_288;
pub const AFFINITY_MAX: u32 = 65_536;
/// Sockets of the node's own processes with a ClusterIP translated at
/// the socket (`sock_rnat_v1`, `sock_fwd_v1`; LRU).
pub const SOCK_LB_MAX: u32 = 65_536;
/// Datagrams in flight in fragments, to or from ClusterIPs. An entry is
/// needed only between a datagram's first and last fragment.
pub const FRAGS_MAX: u32 = 8_192;

/// Source address given to hairpin flows (a pod reaching itself through a
/// Service): a packet from the pod's own address would be dropped by the
/// pod as a martian. kube-proxy masquerades these for the same reason.
pub const HAIRPIN_SNAT_IP: [u8; 4] = [169, 254, 77, 1];

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of [`map_names::SERVICES`] and [`map_names::SVC_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub vip: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}

/// `SvcInfo::flags`: sessionAffinity ClientIP.
pub const SVC_F_AFFINITY: u32 = 1 << 0;
/// `SvcInfo::flags`: a north-south frontend (this node's PublicIP and a
/// nodePort, an externalIP or a LoadBalancer ingress IP, with a port),
/// served where traffic from outside the cluster arrives (the underlay).
/// It has no `vips_v1` entry (other ports of the address are the node's
/// or someone else's), and new flows pick their backend from the
/// frontend's Maglev table ([`map_names::MAGLEV`]).
pub const SVC_F_EXTERNAL: u32 = 1 << 1;
/// `SvcInfo::flags`: `externalTrafficPolicy: Local`. The frontend's
/// backends are this node's endpoints only and the client's address is
/// kept (no SNAT); with none, packets from outside are dropped (counted
/// `drop_np_no_local_endpoint`) or rejected, see [`SVC_F_EMPTY_DROPS`].
pub const SVC_F_ETP_LOCAL: u32 = 1 << 2;
/// `SvcInfo::flags`: with no backends (`count` 0), new flows from outside
/// are dropped, not rejected: an `externalTrafficPolicy: Local` frontend
/// whose Service has endpoints, on other nodes only. kube-proxy drops
/// those and rejects only when the Service has no endpoints at all.
pub const SVC_F_EMPTY_DROPS: u32 = 1 << 3;

/// Size of a Maglev lookup table (a prime; see the README, "Maglev").
pub const MAGLEV_M: u32 = 1021;
/// Backend slots a Maglev table can name (its entries are `u16`).
pub const MAGLEV_BACKENDS_MAX: u32 = 65_535;

/// Key of [`map_names::MAGLEV`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    /// The frontend's service id (`SvcInfo::id`).
    pub svc_id: u32,
}

/// Value of [`map_names::MAGLEV`]: a frontend's Maglev lookup table, each
/// entry a backend slot (`BackendKey::slot`) below the frontend's count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub slots: [u16; MAGLEV_M as usize],
}

/// Value of [`map_names::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcInfo {
    /// Index into the backend slots; assigned by the agent.
    pub id: u32,
    /// Number of backend slots in use (0 = reject new flows).
    pub count: u32,
    pub flags: u32,
    /// sessionAffinityConfig.clientIP.timeoutSeconds.
    pub affinity_timeout_s: u32,
}

/// Key of [`map_names::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// Value of [`map_names::BACKENDS`], and where a flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Backend {
    pub ip: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Key of [`map_names::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub vip: [u8; 4],
}

/// Value of [`map_names::VIPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    pub frontends: u32,
}

/// A flow's 5-tuple, key of [`map_names::CT`] (client -> ClusterIP) and
/// [`map_names::RNAT`] (backend -> client or hairpin address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of [`map_names::CT`]: where this flow was sent, and where it is
/// in its lifecycle ([`ct`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend: Backend,
    /// Source address rewritten too (hairpin, NodePort SNAT), or zero.
    pub snat: [u8; 4],
    /// The service (frontend) id the backend was chosen for.
    pub svc_id: u32,
    /// bpf_ktime_get_ns() when the entry was made.
    pub created_ns: u64,
    /// bpf_ktime_get_ns() of the last packet, written at most once a
    /// second ([`ct::REFRESH_NS`]) unless the state changes.
    pub last_seen_ns: u64,
    /// A [`ct::CtState`].
    pub state: u8,
    /// `ct::CT_F_*`.
    pub flags: u8,
    /// Source port rewritten too (NodePort SNAT: a port of the NAT
    /// range), network byte order; zero keeps the client's port. Zero in
    /// every entry an earlier release wrote (it was padding).
    pub snat_port: [u8; 2],
    pub _pad: [u8; 4],
}

/// Key of [`map_names::LIVE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub svc_id: u32,
    pub backend: Backend,
}

/// Value of [`map_names::LIVE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LiveInfo {
    pub flags: u32,
}

/// Value of [`map_names::RNAT`]: what the reply's addresses must become.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RnatEntry {
    pub vip: [u8; 4],
    pub vport: [u8; 2],
    pub client_port: [u8; 2],
    pub client: [u8; 4],
}

/// Key of [`map_names::FRAGS`]: the fields that tie the fragments of one
/// IPv4 datagram together (RFC 791), as the fragment arrived (before any
/// translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// The IP identification field, network byte order.
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`map_names::FRAGS`]: the ports of the datagram's first
/// fragment, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragEntry {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// Key of [`map_names::SOCK_RNAT`]: a socket of the node's own and the
/// backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRnatKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub backend_ip: [u8; 4],
    /// Network byte order.
    pub backend_port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Value of [`map_names::SOCK_RNAT`]: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRnatEntry {
    pub vip: [u8; 4],
    /// Network byte order.
    pub vport: [u8; 2],
    pub _pad: [u8; 2],
}

/// Key of [`map_names::SOCK_FWD`] (value: [`Backend`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockFwdKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub vip: [u8; 4],
    /// Network byte order.
    pub vport: [u8; 2],
    pub _pad: [u8; 2],
}

/// Key of [`map_names::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client: [u8; 4],
}

/// Value of [`map_names::AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend: Backend,
    /// bpf_ktime_get_ns() of the last new connection from this client.
    pub last_ns: u64,
}

/// Value of [`map_names::SVC_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcCounters {
    pub new_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub rejections: u64,
}
pub const PEER_IPS_MAX: u32 = 16_384;

/// Length of what VXLAN adds in front of the inner IPv4 packet when the inner
/// Ethernet header is counted: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14). The outer Ethernet header replaces the original one.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The flags byte of a VXLAN header with only the I (VNI valid) bit set.
pub const VXLAN_FLAGS_I: u8 = 0x08;

/// Value of the [`map_names::PEERS`] LPM trie. Its key is aya's
/// `lpm_trie::Key<[u8; 4]>`: a 32-bit prefix length, then the subnet's
/// network address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Remote node's PublicIP (outer IPv4 destination), network byte order.
    pub public_ip: [u8; 4],
    /// Remote node's VtepMAC (inner Ethernet destination).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Key of [`map_names::PEER_IPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerIpKey {
    pub public_ip: [u8; 4],
}

/// Value of [`map_names::PEER_IPS`]: how many leases this PublicIP holds
/// (normally one; a node may transiently hold two while re-leasing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIpInfo {
    pub leases: u32,
}

/// `NodeConfig::flags` bit: the node is configured (the agent wrote it).
pub const NODE_CFG_READY: u32 = 1 << 0;
/// `NodeConfig::flags` bit: log rare data-path events through aya-log
/// (`dataplane agent --bpf-log`). Never set on the fast path's behalf.
pub const NODE_CFG_BPF_LOG: u32 = 1 << 1;
/// `NodeConfig::flags` bit: masquerade pod traffic leaving the cluster
/// network (`dataplane agent --ip-masq`). Service flows to backends
/// outside the cluster network are masqueraded with or without it.
pub const NODE_CFG_IP_MASQ: u32 = 1 << 2;

/// The single entry of [`map_names::NODE_CONFIG`]: what the programs need to
/// know about this node. Written by the agent before it attaches anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    pub flags: u32,
    /// VXLAN network identifier (flannel: Backend.VNI, default 1).
    pub vni: u32,
    /// Underlay interface (where VXLAN leaves and arrives).
    pub underlay_ifindex: u32,
    /// The pod bridge (cni0).
    pub bridge_ifindex: u32,
    /// This node's PublicIP (outer IPv4 source).
    pub public_ip: [u8; 4],
    /// Cluster pod network (flannel `Network`).
    pub network: [u8; 4],
    /// This node's pod subnet.
    pub subnet: [u8; 4],
    /// The bridge's address (first address of `subnet`): the node's
    /// address in the overlay, and the source NodePort SNAT gives flows.
    pub gateway: [u8; 4],
    pub network_prefix_len: u8,
    pub subnet_prefix_len: u8,
    /// VXLAN UDP destination port, host byte order (flannel default 8472).
    pub vxlan_port: u16,
    /// This node's VtepMAC (inner Ethernet source; inner destination of
    /// frames sent to us).
    pub vtep_mac: [u8; 6],
    /// MAC of the underlay interface (outer Ethernet source).
    pub underlay_mac: [u8; 6],
    /// MAC of the pod bridge: the gateway MAC pods know, written as the
    /// source of frames delivered straight into a pod.
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The host overlay device (`--host-device`, a dummy the cluster
    /// network is routed through): `from_host` runs on its egress, and
    /// packets decapsulated for the gateway address enter the host stack
    /// through its ingress. 0: none (delivered as they arrive).
    pub host_ifindex: u32,
    /// Its MAC, written as the destination of frames redirected into it.
    pub host_mac: [u8; 6],
    /// NAT source ports (masquerade, NodePort SNAT), inclusive, host byte order: `--nat-ports`.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub _pad2: [u8; 2],
    /// The agent's network namespace cookie (`SO_NETNS_COOKIE`): the
    /// cgroup socket programs, attached to a cgroup every namespace's
    /// processes may be in, leave every other namespace's sockets alone.
    pub netns_cookie: u64,
}

/// Default NAT source port range (`--nat-ports`): above Linux's default
/// ephemeral range (32768-60999), so the node's own sockets do not use it.
pub const NAT_PORT_MIN: u16 = 61_000;
pub const NAT_PORT_MAX: u16 = 65_535;

impl NodeConfig {
    /// `--nat-ports` (masquerade and NodePort SNAT), inclusive; the
    /// default for a configuration without a valid range.
    #[inline(always)]
    pub fn nat_ports(&self) -> (u16, u16) {
        if self.nat_port_min != 0 && self.nat_port_min <= self.nat_port_max {
            (self.nat_port_min, self.nat_port_max)
        } else {
            (NAT_PORT_MIN, NAT_PORT_MAX)
        }
    }
}

/// Defines [`Stat`], [`Stat::ALL`], [`Stat::name`] and [`Stat::meaning`]
/// from one list, so the names cannot drift from the codes.
macro_rules! stats {
    ($(
        $(#[$attr:meta])*
        $variant:ident = $num:literal, $name:literal, $meaning:literal;
    )*) => {
        /// Outcomes counted in [`map_names::STATS`]. The numbers are stable:
        /// they are array indexes that operators and dashboards read; never
        /// renumber or reuse one (a retired number stays in
        /// [`Stat::RETIRED`]), only append.
        ///
        /// Every packet a program handles ends in exactly one outcome
        /// counter. `svc_forward` and `svc_reverse` count a translation on
        /// the way, and `map_full` an entry that could not be stored; each
        /// is followed by the packet's outcome.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $(
                #[doc = $meaning]
                $(#[$attr])*
                $variant = $num,
            )*
        }

        impl Stat {
            /// Every stat, in numeric order.
            pub const ALL: &'static [Stat] = &[$(Stat::$variant),*];

            /// The counter's name, as `dataplane stats` prints it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }

            /// One line saying what happened to a packet counted here.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $(Stat::$variant => $meaning,)*
                }
            }
        }
    };
}

stats! {
    Encapsulated = 0, "encapsulated",
        "pod packet VXLAN-encapsulated and redirected to a remote node";
    /// In XDP mode `decap_xdp` counts it; from_underlay then only delivers
    /// it (a reverse-NAT failure there is counted as `drop_nat_failed` as
    /// well). Where the driver cannot carry XDP metadata the frame reaches
    /// the pod through the kernel's routing, and from_underlay counts it
    /// again as `pass_not_overlay`.
    Decapsulated = 1, "decapsulated",
        "VXLAN from a peer decapsulated and handed on to a pod of this node";
    PassNotOverlay = 2, "pass_not_overlay",
        "underlay frame that is not VXLAN to this node, passed to the kernel untouched";
    /// Includes Service packets translated to an address outside the
    /// cluster network (counted as `svc_forward`/`svc_reverse` first).
    PassLocal = 3, "pass_local",
        "pod packet for this node's subnet or outside the cluster network, passed to the kernel";
    PassToHost = 4, "pass_to_host",
        "VXLAN for this node's bridge address, decapsulated and passed up the stack";
    SvcForward = 5, "svc_forward",
        "packet to a ClusterIP translated to its backend (then counted by its outcome)";
    SvcReverse = 6, "svc_reverse",
        "reply from a backend translated back to the ClusterIP (then counted by its outcome)";

    DropUnknownPeer = 10, "drop_unknown_peer",
        "VXLAN from an IP that holds no lease (flannel accepts it; we do not)";
    DropWrongVni = 11, "drop_wrong_vni",
        "VXLAN to our port with another VNI";
    DropBadVxlanFlags = 12, "drop_bad_vxlan_flags",
        "VXLAN flags other than exactly the I bit";
    DropTruncated = 13, "drop_truncated",
        "VXLAN to this node cut short before the end of the inner IPv4 header";
    DropAdjustRoom = 14, "drop_adjust_room",
        "bpf_skb_adjust_room / bpf_xdp_adjust_head failed to add or strip the VXLAN headers";
    DropFib = 15, "drop_fib",
        "no route towards the remote node (FIB lookup failed)";
    DropInnerNotIpv4 = 16, "drop_inner_not_ipv4",
        "decapsulated frame is not IPv4";
    DropInnerNotLocal = 17, "drop_inner_not_local",
        "decapsulated packet not for a pod of this node";
    DropNoPeer = 18, "drop_no_peer",
        "pod packet to the cluster network that no lease covers";
    DropOuterMalformed = 20, "drop_outer_malformed",
        "IPv4 options or fragments in VXLAN's outer header";
    DropWrongVtepMac = 21, "drop_wrong_vtep_mac",
        "inner destination MAC of VXLAN to this node is not our VtepMAC";
    /// kube-proxy's REJECT: nobody waits for a timeout.
    SvcRejectNoBackend = 22, "svc_reject_no_backend",
        "new connection to a Service with no usable backend, answered with TCP RST / ICMP port unreachable";
    DropSvcUndefinedPort = 23, "drop_svc_undefined_port",
        "to a ClusterIP on a port or protocol the Service does not define";
    DropRejectFailed = 25, "drop_reject_failed",
        "a Service rejection (RST / ICMP) could not be built, e.g. IPv4 options: dropped instead";
    DropSvcMalformed = 26, "drop_svc_malformed",
        "TCP/UDP to a ClusterIP with an impossible header length or too short to read the ports of";
    /// Not logged: without a configuration there is no `NODE_CFG_BPF_LOG`
    /// bit to ask for it.
    PassNoConfig = 27, "pass_no_config",
        "the agent has not written the node configuration yet: passed to the kernel untouched";
    PassNotIpv4 = 28, "pass_not_ipv4",
        "pod frame without a complete IPv4 header (ARP, IPv6, cut short), passed to the kernel untouched";
    DropNatFailed = 29, "drop_nat_failed",
        "rewriting a Service packet's addresses, ports or checksums failed";
    /// Straight to the bridge rather than through IP forwarding, which
    /// would also send the pod an ICMP redirect (in and out being cni0).
    RedirectToBridge = 30, "redirect_to_bridge",
        "translated Service packet for a pod of this node, handed to the bridge";
    SvcRejectCtFailed = 31, "svc_reject_ct_failed",
        "new connection to a Service rejected (RST / ICMP) because its conntrack entry could not be stored (other than a full table)";
    /// Also a frame too short to carry an Ethernet header.
    DropSpoofedMac = 32, "drop_spoofed_mac",
        "frame from a CNI pod whose Ethernet source (or ARP sender MAC) is not the pod's MAC";
    /// ARP with a sender address other than the pod's (or 0.0.0.0) counts here too.
    DropSpoofedIp = 33, "drop_spoofed_ip",
        "IPv4 packet or ARP from a CNI pod whose source address is not the pod's IP";
    /// Straight into the pod (bpf_redirect_peer): a CNI pod is not behind
    /// the bridge.
    RedirectToPod = 34, "redirect_to_pod",
        "translated Service packet for a CNI pod of this node, delivered straight into the pod";
    /// Any lease holder could otherwise forge inner sources of another
    /// node's pods. Traffic from the remote node itself carries its bridge
    /// address, which lies in its subnet too.
    DropInnerSrcNotSender = 35, "drop_inner_src_not_sender",
        "decapsulated packet whose inner source is not in the subnet leased to the outer sender";
    /// RFC 6040 section 4.2: the endpoints could not learn of the
    /// congestion. Linux's vxlan drops these too.
    DropCeNotEct = 36, "drop_ce_not_ect",
        "VXLAN whose outer header says congestion experienced (CE) around an inner packet that is not ECN-capable";
    /// netfilter with `nf_conntrack_tcp_loose=1` (the default, which
    /// kube-proxy keeps) does the same: a flow whose entry expired, was
    /// flushed, or began before the table existed carries on.
    SvcCtPickup = 37, "svc_ct_pickup",
        "TCP segment (ACK, no SYN/FIN/RST) to a ClusterIP with no conntrack entry, picked up as an established flow (then counted by its outcome)";
    /// Also a RST for a flow whose backend was removed.
    DropCtInvalid = 38, "drop_ct_invalid",
        "TCP RST, FIN or SYN-ACK to a ClusterIP with no conntrack entry: netfilter's ctstate INVALID, which kube-proxy drops";
    /// As netfilter does ("table full, dropping packet"): the client
    /// retransmits its SYN, by when the sweeper may have made room.
    DropCtFull = 39, "drop_ct_full",
        "new flow to a ClusterIP dropped: the conntrack table (--ct-max) is full";
    SvcResetBackendGone = 40, "svc_reset_backend_gone",
        "TCP segment (not SYN) of a flow whose backend was removed, answered with RST so the client fails fast";
    /// netfilter's nf_nat_icmp_reply_translation: the quoted packet gets
    /// the ClusterIP back as its destination, the outer source too when
    /// the backend sent the error.
    SvcIcmpReverse = 47, "svc_icmp_reverse",
        "ICMP error (unreachable, time exceeded) about a Service flow, from its backend or the path, translated back to the ClusterIP (then counted by its outcome)";
    SvcIcmpForward = 48, "svc_icmp_forward",
        "ICMP error from a client about a reply from a ClusterIP, translated to the backend (then counted by its outcome)";
    /// Its ports are only in the first fragment. Also a fragment whose
    /// first fragment was seen too long ago (`frags_v1` is an LRU).
    DropFragNoFirst = 49, "drop_frag_no_first",
        "non-first fragment to a ClusterIP whose first fragment was not seen first";
    /// From a pod this is the packet's outcome (the answer goes straight
    /// back into the pod). After decapsulation the answer is encapsulated
    /// to the sender's node and counted as that too.
    TtlExceeded = 50, "ttl_exceeded",
        "packet forwarded by this node whose TTL ran out, answered with ICMP time exceeded";
    /// An ICMP error is never answered with another (RFC 1122 3.2.2), nor
    /// a fragment other than the first (as Linux's icmp_send).
    DropTtlExceeded = 51, "drop_ttl_exceeded",
        "packet whose TTL ran out at this node and that is not answered (an ICMP error itself, a later fragment, IPv4 options, or the answer could not be built)";
    /// Counted on the way, like `svc_forward`: the packet then ends in its
    /// own outcome. With `--bpf-log` it is logged at the 1st, 2nd, 4th,
    /// 8th, ... time on each CPU, never once per packet.
    MapFull = 61, "map_full",
        "an entry the data path had to store (a learnt endpoint, a frontend's counters) was refused: its map is full";
    /// Counted per socket call (bytes 0), not per packet: the packets then
    /// go to the backend untranslated.
    SockLb = 62, "sock_lb",
        "connect or UDP sendmsg of a node's own socket to a ClusterIP, sent to a backend at the socket";
    /// connect / sendmsg fail with ECONNREFUSED.
    SockRejectNoBackend = 63, "sock_reject_no_backend",
        "connect or UDP sendmsg of a node's own socket to a Service with no usable backend, refused (ECONNREFUSED)";
    /// As the data path drops it: a ClusterIP is never sent untranslated.
    SockRejectUndefinedPort = 64, "sock_reject_undefined_port",
        "connect or UDP sendmsg of a node's own socket to a ClusterIP on a port or protocol the Service does not define, refused (ECONNREFUSED)";
    /// Only the reverse mapping is lost: the datagram still goes to
    /// its backend, but a UDP reply then shows the backend's address.
    SockMapFull = 65, "sock_map_full",
        "a node's own socket to a ClusterIP whose reverse mapping (sock_rnat_v1) could not be stored";
    /// Its TTL is kept: the node is the sender, not a router.
    HostEncapsulated = 66, "host_encapsulated",
        "packet of the node itself (host network) to another node's pod subnet, VXLAN-encapsulated (from_host)";

    // 70-84: masquerade and Service backends outside the cluster network
    // (`to_underlay`, `to_pod`, and from_underlay for what is not VXLAN).
    // Packets the egress programs leave untouched are not counted there:
    // they were counted by the program that sent them, or are the node's
    // own traffic.
    /// Also a Service flow to a backend outside the cluster network,
    /// masqueraded with or without `--ip-masq`.
    MasqForward = 70, "masq_forward",
        "pod packet leaving the cluster network on the underlay, source rewritten to the node's PublicIP and a NAT port";
    /// The kernel then routes it to the pod (TTL, neighbour, netfilter
    /// see the reply of the flow they saw leave).
    MasqReverse = 71, "masq_reverse",
        "reply on the underlay to a masqueraded flow, destination rewritten back to the pod and passed to the kernel";
    /// Every port of `--nat-ports` towards this destination address,
    /// port and protocol is taken (or the bounded search found none free).
    DropMasqExhausted = 72, "drop_masq_exhausted",
        "new masqueraded flow dropped: no free NAT port (--nat-ports) for its destination";
    DropMasqFull = 73, "drop_masq_full",
        "new masqueraded flow dropped: the masquerade table (--ct-max) is full";
    /// A reply to a connection from outside (a pod answering a client
    /// that reached it directly), or a segment of a flow whose mapping is
    /// gone: masquerading it would break the connection it belongs to.
    PassMasqNotNew = 74, "pass_masq_not_new",
        "TCP segment from a pod to outside the cluster network with no mapping and no SYN: not masqueraded, passed as it is";
    /// Counted after `svc_reverse` (or `svc_icmp_reverse`).
    ToPodReverse = 75, "to_pod_reverse",
        "Service reply the host stack hands to a pod (a backend on this node's own address, or outside the cluster network), translated back to the ClusterIP";
    MasqIcmpReverse = 76, "masq_icmp_reverse",
        "ICMP error on the underlay about a masqueraded flow, translated back to the pod and passed to the kernel";

    /// Counted on the way, like `svc_forward`.
    NpForward = 85, "np_forward",
        "packet from outside to a NodePort, externalIP or LoadBalancer IP translated to its backend (then counted by its outcome)";
    /// Counted on the way, like `svc_reverse`.
    NpReverse = 86, "np_reverse",
        "reply of a north-south flow translated back to its frontend (then counted by its outcome)";
    NpToUnderlay = 87, "np_to_underlay",
        "reply of a north-south flow sent out of the underlay towards its client (FIB lookup and redirect)";
    DropNpNoLocalEndpoint = 88, "drop_np_no_local_endpoint",
        "packet from outside to an externalTrafficPolicy Local frontend on a node without a local endpoint (kube-proxy drops these)";
    DropNpNoBackend = 89, "drop_np_no_backend",
        "new flow from outside to a north-south frontend whose chosen backend slot is missing (the agent is rewriting the frontend)";
    DropNpNatPorts = 90, "drop_np_nat_ports",
        "new externalTrafficPolicy Cluster flow for which no free NAT source port was found";
    DropNpFib = 91, "drop_np_fib",
        "reply of a north-south flow with no route towards its client";
    /// A TCP segment netfilter would call INVALID (RST, FIN, SYN-ACK
    /// without an entry), from outside.
    DropNpInvalid = 92, "drop_np_invalid",
        "packet from outside to a north-south frontend that opens no flow (TCP segment other than SYN or ACK without an entry, or its backend is gone)";
    NpRejectNoBackend = 100, "np_reject_no_backend",
        "new flow from outside to a north-south frontend whose Service has no endpoints, refused (TCP RST, ICMP port unreachable: kube-proxy's REJECT)";
    /// Counted on the way, like `svc_icmp_reverse`.
    NpIcmpReverse = 101, "np_icmp_reverse",
        "ICMP error from a backend or its path about a packet from outside, translated back and sent out of the underlay to the client (then counted by its outcome)";
    /// Counted on the way, like `svc_icmp_forward`.
    NpIcmpForward = 102, "np_icmp_forward",
        "ICMP error from outside about a reply of a north-south flow, translated and sent on to the backend (then counted by its outcome)";
}

impl Stat {
    /// Numbers of removed codes, never to be used again: 19 was
    /// `drop_no_config`, which nothing emitted (the packet is passed, now
    /// counted as [`Stat::PassNoConfig`]); 24 was
    /// `svc_reject_no_conntrack` (a non-SYN segment without an entry got a
    /// RST), split into [`Stat::SvcCtPickup`], [`Stat::DropCtInvalid`] and
    /// [`Stat::SvcResetBackendGone`].
    pub const RETIRED: &'static [u32] = &[19, 24];
}

/// Size of the stats array; leaves room for later reasons.
pub const STATS_LEN: u32 = 128;

// Stat::ALL in increasing order, below STATS_LEN, no retired number reused.
const _: () = {
    let all = Stat::ALL;
    let mut i = 0;
    while i < all.len() {
        let n = all[i] as u32;
        assert!(n < STATS_LEN);
        assert!(i == 0 || (all[i - 1] as u32) < n);
        let mut j = 0;
        while j < Stat::RETIRED.len() {
            assert!(n != Stat::RETIRED[j]);
            j += 1;
        }
        i += 1;
    }
};

/// One slot of [`map_names::STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Marker an XDP decapsulation leaves in the packet metadata so that the TC
/// program on the same interface knows the frame was a verified VXLAN packet
/// and forwards it to the pod bridge.
pub const XDP_META_DECAPPED: u32 = 0xdec0_0001;
/// Marker for a frame decap_xdp decapsulated for this node itself (the
/// bridge address): the TC program passes it up without counting it again.
pub const XDP_META_TO_HOST: u32 = 0xdec0_0002;

const _: () = assert!(size_of::<PeerInfo>() == 12);
const _: () = assert!(size_of::<PeerIpKey>() == 4);
const _: () = assert!(size_of::<PeerIpInfo>() == 4);
const _: () = assert!(size_of::<NodeConfig>() == 80);
const _: () = assert!(core::mem::offset_of!(NodeConfig, netns_cookie) % 8 == 0);
const _: () = assert!(size_of::<SockRnatKey>() == 16);
const _: () = assert!(size_of::<SockRnatEntry>() == 8);
const _: () = assert!(size_of::<SockFwdKey>() == 16);
const _: () = assert!(size_of::<MaglevKey>() == 4);
const _: () = assert!(size_of::<MaglevTable>() == 2 * MAGLEV_M as usize);
const _: () = assert!(size_of::<Counter>() == 16);
const _: () = assert!(size_of::<SvcKey>() == 8);
const _: () = assert!(size_of::<SvcInfo>() == 16);
const _: () = assert!(size_of::<BackendKey>() == 8);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<VipKey>() == 4);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<CtEntry>() == 40);
const _: () = assert!(size_of::<ct::CtTimeouts>() == 40);
const _: () = assert!(size_of::<LiveKey>() == 12);
const _: () = assert!(size_of::<LiveInfo>() == 4);
const _: () = assert!(size_of::<RnatEntry>() == 12);
const _: () = assert!(size_of::<AffinityKey>() == 8);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<SvcCounters>() == 32);
const _: () = assert!(size_of::<FragKey>() == 12);
const _: () = assert!(size_of::<FragEntry>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and
    // byte arrays, and have no implicit padding (see the size assertions).
    unsafe impl aya::Pod for super::PeerInfo {}
    unsafe impl aya::Pod for super::PeerIpKey {}
    unsafe impl aya::Pod for super::PeerIpInfo {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcInfo {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::ct::CtTimeouts {}
    unsafe impl aya::Pod for super::RnatEntry {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::SvcCounters {}
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::LiveInfo {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
    unsafe impl aya::Pod for super::SockRnatKey {}
    unsafe impl aya::Pod for super::SockRnatEntry {}
    unsafe impl aya::Pod for super::SockFwdKey {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::MaglevTable {}
}

/// Local pods the decapsulation path may deliver to directly, bypassing the
/// bridge: a packet decapsulated by `bpf_skb_adjust_room` keeps
/// skb->encapsulation and SKB_GSO_UDP_TUNNEL (6.18 has no flag to clear
/// them), the bridge has no hw_enc_features, so it would segment and
/// checksum every 64 KB GSO packet in software (3.4 instead of ~9 Gbit/s).
pub const ENDPOINTS_MAX: u32 = 4096;

/// Key of [`map_names::ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// The pod's IPv4 address, network byte order.
    pub ip: [u8; 4],
}

/// Value of [`map_names::ENDPOINTS`]. A missing entry is not an error: the
/// packet goes through the bridge (correct, slower for bulk TCP). A stale
/// one is: the packet is redirected to `ifindex` and dropped if that
/// device is gone, so remove entries with their port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// Host-side veth of the pod, in the node namespace (a port of the
    /// bridge); its peer is the pod's interface.
    pub ifindex: u32,
    /// MAC of the pod's interface (Ethernet destination written).
    pub mac: [u8; 6],
    /// MAC the pod knows its gateway by (Ethernet source written): the
    /// bridge's, or for a CNI pod its host-side device's.
    pub gw_mac: [u8; 6],
}

const _: () = assert!(size_of::<EndpointKey>() == 4);
const _: () = assert!(size_of::<EndpointInfo>() == 16);

#[cfg(feature = "user")]
mod endpoint_pod {
    // SAFETY: #[repr(C)], Copy, integers and byte arrays only, no padding
    // (see the size assertions).
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointInfo {}
}

/// Pods registered through CNI (`dataplane-cni`), one host-side port each.
pub const POD_PORTS_MAX: u32 = ENDPOINTS_MAX;

/// Key of [`map_names::POD_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPortKey {
    /// The pod's host-side device (veth, or netkit primary), in the node
    /// namespace.
    pub ifindex: u32,
}

/// Value of [`map_names::POD_PORTS`]: the only addresses the pod may send
/// from. Its endpoint entry ([`map_names::ENDPOINTS`], key `ip`) is the
/// agent's, registered, never learnt.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodPortInfo {
    /// The pod's IPv4 address, network byte order.
    pub ip: [u8; 4],
    /// MAC of the pod's interface.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<PodPortKey>() == 4);
const _: () = assert!(size_of::<PodPortInfo>() == 12);

#[cfg(feature = "user")]
mod pod_port_pod {
    // SAFETY: #[repr(C)], Copy, integers and byte arrays only, no padding
    // (see the size assertions).
    unsafe impl aya::Pod for super::PodPortKey {}
    unsafe impl aya::Pod for super::PodPortInfo {}
}
