//! Test support: network namespaces and topologies, a real etcd, frames,
//! traffic generators.
pub mod bench;
pub mod etcd;
pub mod flannel;
pub mod interrupt;
pub mod netns;
pub mod outside;
pub mod packets;
pub mod probe;
pub mod svc;
pub mod topo;
pub mod traffic;
