//! Every map the programs use, one comment each. Names and layouts come from
//! `dataplane-common`; the agent pins them under `--pin-path`. They are BTF
//! maps (`.maps` section) so `bpftool map dump` prints typed keys and values.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use dataplane_common::{
    Counter, NodeConfig, PEER_IPS_MAX, PEERS_MAX, PeerInfo, PeerIpInfo, PeerIpKey, STATS_LEN,
};

/// Remote pod subnet (LPM) -> remote node's PublicIP and VtepMAC. Filled by
/// the agent from the etcd lease watch; read by encapsulation.
#[btf_map(name = "peers_v1")]
pub static PEERS: LpmTrie<[u8; 4], PeerInfo, { PEERS_MAX as usize }> = LpmTrie::new();

/// PublicIPs that hold a lease. Decapsulation drops VXLAN from anyone else.
#[btf_map(name = "peer_ips_v1")]
pub static PEER_IPS: HashMap<PeerIpKey, PeerIpInfo, { PEER_IPS_MAX as usize }> = HashMap::new();

/// This node: addresses, interfaces, VNI and port. One entry, index 0.
#[btf_map(name = "node_cfg_v1")]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Packets and bytes per outcome, indexed by `dataplane_common::Stat`.
#[btf_map(name = "stats_v1")]
pub static STATS: PerCpuArray<Counter, { STATS_LEN as usize }> = PerCpuArray::new();
