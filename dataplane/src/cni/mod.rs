//! Pods as first-class endpoints: the CNI plugin `dataplane-cni` and its
//! link to the node agent.
//!
//! The plugin (`src/bin/dataplane-cni.rs`, logic in [`plugin`]) is run by a
//! container runtime per the CNI spec 1.1 ([`env`], [`netconf`],
//! [`result`], [`error`], [`version`]). It delegates IP allocation to an
//! IPAM plugin ([`ipam`]), creates the pod's device ([`device`], with
//! [`netkit`] for the netkit kind), addresses it ([`addressing`]), and
//! registers the endpoint with the agent over a Unix socket ([`proto`]).
//! The agent serves that socket with [`server`].
pub mod addressing;
pub mod device;
pub mod env;
pub mod error;
pub mod gc;
pub mod ipam;
pub mod netconf;
pub mod netkit;
pub mod netns;
pub mod plugin;
pub mod proto;
pub mod result;
pub mod server;
pub mod version;
