//! Test support: network namespaces and topologies, a real etcd, frames,
//! traffic generators.
pub mod netns;
pub mod packets;
pub mod topo;
pub mod traffic;
pub mod flannel;
pub mod etcd;
pub mod svc;
pub mod bench;
