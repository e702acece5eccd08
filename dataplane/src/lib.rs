//! The node agent, as a library so the integration tests can drive its parts.
//!
//! Control plane: [`config`] (flannel network config), [`lease`] (subnet
//! leases in etcd), [`subnet_env`], [`peers`] (watching every node's
//! lease), [`services`] (Services and EndpointSlices in etcd).
//! Host plumbing: [`netlink`]. Data plane: [`reconcile`] (desired state ->
//! a planned, ordered list of map writes -> applied) over [`bpf`]
//! (loading, pinning, attaching, typed map access); [`conntrack`] (the
//! sweeper, and what `dataplane conntrack` shows). [`agent`] routes
//! events to them. [`metrics`] and [`status`] are what an operator
//! sees of a node.

/// The BPF object built by build.rs from `dataplane-ebpf`, with BTF.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));
pub mod agent;
pub mod bpf;
pub mod cni;
pub mod compact;
pub mod config;
pub mod conntrack;
pub mod etcd;
pub mod lease;
pub mod metrics;
pub mod netlink;
pub mod peers;
pub mod reconcile;
pub mod services;
pub mod status;
pub mod subnet_env;
