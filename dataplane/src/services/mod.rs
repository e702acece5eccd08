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
//! - [`model`] holds them in memory ([`ServiceStore`]) and computes the
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

pub mod manifest;
pub mod model;
pub mod store;
mod validate;
pub mod watch;

use std::fmt;

/// The Kubernetes API types, re-exported so that callers (CLI, tests) build
/// and inspect objects with exactly the version this crate parses.
pub use k8s_openapi;

pub use manifest::{DocumentError, ManifestError, Object, parse_manifests};
pub use model::{
    BackendAddr, Frontend, FrontendSpec, Proto, ServiceName, ServiceStore, ServiceSummary,
    StoreUpdate,
};
pub use store::{
    ApplyOutcome, ApplySummary, DeleteSummary, MAX_TXN_OPS, apply, delete_objects, delete_service,
    list,
};
pub use watch::watch_services;

/// Where the objects live in etcd unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/dataplane/";

/// The label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The kinds of object this module stores, declared in the order of their
/// etcd directories, so [`ObjectRef`]s sort like their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Endpoints.
    Endpoints,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Service.
    Service,
}

impl Kind {
    /// Every kind, in key order (as declared).
    pub const ALL: [Kind; 3] = [Kind::Endpoints, Kind::EndpointSlice, Kind::Service];

    /// The directory under the prefix (`services`, `endpoints`,
    /// `endpointslices`: the resource names `kubectl` uses).
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Endpoints => "endpoints",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    /// The inverse of [`Kind::dir`].
    pub fn from_dir(dir: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.dir() == dir)
    }

    /// The Kubernetes kind, e.g. `EndpointSlice`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one stored object: kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The kind.
    pub kind: Kind,
    /// The namespace (`default` when the manifest gave none).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind` `namespace/name`.
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key below the prefix, e.g. `services/default/my-service`.
    pub fn relative_key(&self) -> String {
        format!("{}/{}/{}", self.kind.dir(), self.namespace, self.name)
    }

    /// The full etcd key under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        format!("{}{}", base(prefix), self.relative_key())
    }

    /// Parses a key below the prefix (`services/<ns>/<name>` etc.). `None`
    /// for anything else, including empty or extra path segments.
    pub fn parse_relative_key(key: &str) -> Option<ObjectRef> {
        let mut parts = key.split('/');
        let kind = Kind::from_dir(parts.next()?)?;
        let namespace = parts.next()?;
        let name = parts.next()?;
        if namespace.is_empty() || name.is_empty() || parts.next().is_some() {
            return None;
        }
        Some(ObjectRef::new(kind, namespace, name))
    }
}

impl fmt::Display for ObjectRef {
    /// `endpointslice default/my-service-abc`, like kubectl's `kind/name`
    /// with the namespace spelled out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.kind.as_str().to_ascii_lowercase(),
            self.namespace,
            self.name
        )
    }
}

/// `prefix` with exactly one trailing `/` (`/dataplane` and `/dataplane/`
/// are the same prefix; the empty prefix is `/`).
pub(crate) fn base(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

/// The key below `prefix`, if `key` is under it.
pub(crate) fn strip_base<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(base(prefix).as_str())
}

/// The one key range holding all three directories: from
/// `<prefix>endpoints/` (the smallest of the three) up to, not including,
/// `<prefix>services0` (`'0'` is the byte after `'/'`). Other keys that fall
/// in between (say `<prefix>leases/...`) are filtered out by the readers.
pub(crate) fn key_range(prefix: &str) -> (String, String) {
    let b = base(prefix);
    (format!("{b}endpoints/"), format!("{b}services0"))
}

/// The directory of `kind` in namespace `ns`, with its trailing `/`.
pub(crate) fn namespace_dir(prefix: &str, kind: Kind, ns: &str) -> String {
    format!("{}{}/{}/", base(prefix), kind.dir(), ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let r = ObjectRef::new(Kind::EndpointSlice, "default", "my-service-1");
        assert_eq!(r.relative_key(), "endpointslices/default/my-service-1");
        assert_eq!(
            r.key("/dataplane"),
            "/dataplane/endpointslices/default/my-service-1"
        );
        assert_eq!(r.key(DEFAULT_PREFIX), r.key("/dataplane"));
        assert_eq!(ObjectRef::parse_relative_key(&r.relative_key()), Some(r));
        for bad in [
            "services/default",
            "services//x",
            "services/a/b/c",
            "pods/a/b",
            "",
        ] {
            assert_eq!(ObjectRef::parse_relative_key(bad), None, "{bad}");
        }
        assert_eq!(
            strip_base("/dataplane/", "/dataplane/services/a/b"),
            Some("services/a/b")
        );
        assert_eq!(strip_base("/dataplane/", "/other/services/a/b"), None);
    }

    #[test]
    fn refs_sort_like_keys() {
        let mut refs = [
            ObjectRef::new(Kind::Service, "a", "x"),
            ObjectRef::new(Kind::EndpointSlice, "b", "x"),
            ObjectRef::new(Kind::Endpoints, "c", "x"),
            ObjectRef::new(Kind::Service, "a", "w"),
        ];
        let mut keys: Vec<String> = refs.iter().map(|r| r.key(DEFAULT_PREFIX)).collect();
        refs.sort();
        keys.sort();
        assert_eq!(
            refs.iter()
                .map(|r| r.key(DEFAULT_PREFIX))
                .collect::<Vec<_>>(),
            keys
        );
    }

    #[test]
    fn range_covers_the_three_directories_only() {
        let (start, end) = key_range(DEFAULT_PREFIX);
        for k in Kind::ALL {
            let key = ObjectRef::new(k, "ns", "n").key(DEFAULT_PREFIX);
            assert!(start <= key && key < end, "{key}");
        }
        assert!(*"/dataplane/subnets/x" > *end);
        assert!(*"/dataplane/config" < *start);
    }
}
