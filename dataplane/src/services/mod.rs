//! ClusterIP services, the userspace half: from the YAML a user would
//! `kubectl apply` to the frontends this node programs into BPF maps.
//!
//! - [`manifest`] parses multi-document YAML into Kubernetes objects
//!   (core/v1 `Service` and `Endpoints`, discovery.k8s.io/v1 `EndpointSlice`)
//!   and validates them, so that a bad file is refused as a whole with the
//!   document, line and field at fault.
//! - [`store`] keeps those objects in etcd (apply, delete, list), each write
//!   one etcd transaction so nothing is ever half-applied.
//! - [`watch`] follows them from every node: a snapshot, then the changes.
//! - [`model`] holds them in memory ([`ServiceStore`], in a compact form,
//!   not the Kubernetes objects) and computes the
//!   frontends (ClusterIP:port/protocol and their backends) of one service as
//!   kube-proxy would, and which services an update touched, so the agent
//!   rewrites only what changed.
//!
//! # Layout in etcd
//!
//! Under a prefix ([`DEFAULT_PREFIX`] unless configured), one key per object,
//! its value the object as JSON (the Kubernetes wire format):
//!
//! ```text
//! <prefix>services/<namespace>/<name>
//! <prefix>endpoints/<namespace>/<name>
//! <prefix>endpointslices/<namespace>/<name>
//! ```
//!
//! Namespaces and names are validated DNS names, so they never contain `/`
//! and a key always splits back into kind, namespace and name.

pub mod guard;
pub mod maglev;
pub mod manifest;
pub mod model;
mod object;
pub mod store;
mod validate;
pub mod watch;

/// The Kubernetes API types, re-exported so that callers (CLI, tests) build
/// and inspect objects with exactly the version this crate parses.
pub use k8s_openapi;

pub use guard::{AddressGuard, DEFAULT_SERVICE_CIDR, check_addresses, check_conflicts};
pub use manifest::{DocumentError, ManifestError, Object, parse_manifests};
pub use model::{
    BackendAddr, Decoded, Frontend, FrontendSpec, ServiceName, ServiceStore, ServiceSummary,
    StoreUpdate, TrafficPolicy,
};
pub use object::{Kind, ObjectRef, Proto, SERVICE_NAME_LABEL};
pub use store::{
    ApplyOutcome, ApplySummary, DeleteSummary, MAX_TXN_OPS, StoreError, apply, apply_guarded,
    delete_objects, delete_service, list, list_objects,
};
pub use watch::{watch_services, watch_services_after};

/// Where the objects live in etcd unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/dataplane/";
