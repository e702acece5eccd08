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

/// Names of the pinned maps (the file names under `--pin-path`).
pub mod map_names {
    /// LPM trie: remote pod subnet -> remote node (PublicIP, VtepMAC).
    pub const PEERS: &str = "peers_v1";
    /// Hash: remote node PublicIP -> VtepMAC; a VXLAN sender must be in here.
    pub const PEER_IPS: &str = "peer_ips_v1";
    /// Array[1]: this node's configuration (addresses, ifindexes, VNI, port).
    pub const NODE_CONFIG: &str = "node_cfg_v1";
    /// Per-CPU array indexed by [`Stat`]: packets and bytes per outcome.
    pub const STATS: &str = "stats_v1";
    /// Hash: service frontend (ClusterIP, port, protocol) -> service entry.
    pub const SERVICES: &str = "svc_v1";
    /// Hash: (service id, slot) -> backend (IP, port).
    pub const BACKENDS: &str = "backends_v1";
    /// Hash: ClusterIP -> number of frontends; traffic to a ClusterIP on a
    /// port/protocol no frontend defines is dropped, never forwarded raw.
    pub const VIPS: &str = "vips_v1";
    /// LRU: original flow (client -> ClusterIP) -> chosen backend.
    pub const CT: &str = "ct_v1";
    /// LRU: reply flow (backend -> client) -> ClusterIP to restore.
    pub const RNAT: &str = "rnat_v1";
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
    pub const ENDPOINTS: &str = "endpoints_v1";
}

/// Program names as they appear in the object file.
pub mod prog_names {
    pub const FROM_POD: &str = "from_pod";
    pub const FROM_UNDERLAY: &str = "from_underlay";
    pub const DECAP_XDP: &str = "decap_xdp";
}

pub const PEERS_MAX: u32 = 16_384;
pub const SERVICES_MAX: u32 = 65_536;
pub const BACKENDS_MAX: u32 = 262_144;
pub const CT_MAX: u32 = 262_144;
pub const AFFINITY_MAX: u32 = 65_536;

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

/// Value of [`map_names::CT`]: where this flow was sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend: Backend,
    /// Source address rewritten too (hairpin), or zero.
    pub snat: [u8; 4],
    /// The service (frontend) id the backend was chosen for.
    pub svc_id: u32,
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
    /// The bridge's address (first address of `subnet`).
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
}

/// Outcomes counted in [`map_names::STATS`]. The numbers are stable: they
/// are array indexes that operators and dashboards read; never renumber or
/// reuse one, only append.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A pod packet was VXLAN-encapsulated and sent to a remote node.
    Encapsulated = 0,
    /// A VXLAN packet from a peer was decapsulated and delivered to a pod.
    Decapsulated = 1,
    /// Underlay traffic that is not our VXLAN, passed untouched.
    PassNotOverlay = 2,
    /// Pod traffic that stays on this node or leaves the cluster network,
    /// passed to the kernel untouched.
    PassLocal = 3,
    /// A decapsulated packet for this node itself (the bridge address), passed up.
    PassToHost = 4,
    /// A packet to a ClusterIP translated to its backend.
    SvcForward = 5,
    /// A reply from a backend translated back to the ClusterIP.
    SvcReverse = 6,

    /// VXLAN from a source IP that holds no lease.
    DropUnknownPeer = 10,
    /// VXLAN to our port with another VNI.
    DropWrongVni = 11,
    /// VXLAN header flags other than exactly the I bit.
    DropBadVxlanFlags = 12,
    /// A header was cut short.
    DropTruncated = 13,
    /// bpf_skb_adjust_room / bpf_xdp_adjust_head failed.
    DropAdjustRoom = 14,
    /// No route or neighbour towards the remote node.
    DropFib = 15,
    /// Decapsulated frame is not IPv4.
    DropInnerNotIpv4 = 16,
    /// Decapsulated packet is not for a pod of this node.
    DropInnerNotLocal = 17,
    /// Destination is in the cluster network but no lease covers it.
    DropNoPeer = 18,
    /// The agent has not written the node configuration yet.
    DropNoConfig = 19,
    /// IPv4 options or fragments in the outer header of VXLAN to us.
    DropOuterMalformed = 20,
    /// Inner Ethernet destination is not our VtepMAC.
    DropWrongVtepMac = 21,
    /// New connection to a Service with no usable backend: rejected with
    /// ICMP port unreachable (kube-proxy's REJECT).
    SvcRejectNoBackend = 22,
    /// To a ClusterIP on a port or protocol the Service does not define.
    DropSvcUndefinedPort = 23,
    /// TCP segment (not SYN) to a ClusterIP with no connection-tracking
    /// entry, e.g. its backend was removed: rejected so it fails fast.
    SvcRejectNoConntrack = 24,
    /// Could not build the rejection packet.
    DropRejectFailed = 25,
    /// A fragment or a header too short to read ports from, to a ClusterIP.
    DropSvcMalformed = 26,
}

/// Size of the stats array; leaves room for later reasons.
pub const STATS_LEN: u32 = 64;

impl Stat {
    /// Every stat, for listing. Keep in numeric order.
    pub const ALL: &'static [Stat] = &[
        Stat::Encapsulated,
        Stat::Decapsulated,
        Stat::PassNotOverlay,
        Stat::PassLocal,
        Stat::PassToHost,
        Stat::SvcForward,
        Stat::SvcReverse,
        Stat::DropUnknownPeer,
        Stat::DropWrongVni,
        Stat::DropBadVxlanFlags,
        Stat::DropTruncated,
        Stat::DropAdjustRoom,
        Stat::DropFib,
        Stat::DropInnerNotIpv4,
        Stat::DropInnerNotLocal,
        Stat::DropNoPeer,
        Stat::DropNoConfig,
        Stat::DropOuterMalformed,
        Stat::DropWrongVtepMac,
        Stat::SvcRejectNoBackend,
        Stat::DropSvcUndefinedPort,
        Stat::SvcRejectNoConntrack,
        Stat::DropRejectFailed,
        Stat::DropSvcMalformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Encapsulated => "encapsulated",
            Stat::Decapsulated => "decapsulated",
            Stat::PassNotOverlay => "pass_not_overlay",
            Stat::PassLocal => "pass_local",
            Stat::PassToHost => "pass_to_host",
            Stat::SvcForward => "svc_forward",
            Stat::SvcReverse => "svc_reverse",
            Stat::DropUnknownPeer => "drop_unknown_peer",
            Stat::DropWrongVni => "drop_wrong_vni",
            Stat::DropBadVxlanFlags => "drop_bad_vxlan_flags",
            Stat::DropTruncated => "drop_truncated",
            Stat::DropAdjustRoom => "drop_adjust_room",
            Stat::DropFib => "drop_fib",
            Stat::DropInnerNotIpv4 => "drop_inner_not_ipv4",
            Stat::DropInnerNotLocal => "drop_inner_not_local",
            Stat::DropNoPeer => "drop_no_peer",
            Stat::DropNoConfig => "drop_no_config",
            Stat::DropOuterMalformed => "drop_outer_malformed",
            Stat::DropWrongVtepMac => "drop_wrong_vtep_mac",
            Stat::SvcRejectNoBackend => "svc_reject_no_backend",
            Stat::DropSvcUndefinedPort => "drop_svc_undefined_port",
            Stat::SvcRejectNoConntrack => "svc_reject_no_conntrack",
            Stat::DropRejectFailed => "drop_reject_failed",
            Stat::DropSvcMalformed => "drop_svc_malformed",
        }
    }
}

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

const _: () = assert!(size_of::<PeerInfo>() == 12);
const _: () = assert!(size_of::<PeerIpKey>() == 4);
const _: () = assert!(size_of::<PeerIpInfo>() == 4);
const _: () = assert!(size_of::<NodeConfig>() == 56);
const _: () = assert!(size_of::<Counter>() == 16);
const _: () = assert!((Stat::DropSvcMalformed as u32) < STATS_LEN);
const _: () = assert!(size_of::<SvcKey>() == 8);
const _: () = assert!(size_of::<SvcInfo>() == 16);
const _: () = assert!(size_of::<BackendKey>() == 8);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<VipKey>() == 4);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<CtEntry>() == 16);
const _: () = assert!(size_of::<LiveKey>() == 12);
const _: () = assert!(size_of::<LiveInfo>() == 4);
const _: () = assert!(size_of::<RnatEntry>() == 12);
const _: () = assert!(size_of::<AffinityKey>() == 8);
const _: () = assert!(size_of::<AffinityEntry>() == 16);
const _: () = assert!(size_of::<SvcCounters>() == 32);

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
    unsafe impl aya::Pod for super::RnatEntry {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
    unsafe impl aya::Pod for super::SvcCounters {}
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::LiveInfo {}
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
    /// MAC the pod knows its gateway by, the bridge's (Ethernet source written).
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
