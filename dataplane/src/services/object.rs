//! The names every part of the services module shares: the kinds of object
//! stored, how an object is named ([`ObjectRef`]) and where it lives in etcd,
//! and the protocols of a port.
//!
//! This module depends on nothing else in `services`, so the parser,
//! validation, model, store and watch can all use it without depending on
//! each other in a circle.

use std::fmt;

use crate::etcd::{KeyRange, Prefix};

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
    pub fn key(&self, prefix: &Prefix) -> String {
        prefix.key(&self.relative_key())
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

/// Transport protocol of a service port, and so of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// The one key range holding all three directories: from
/// `<prefix>endpoints/` (the smallest of the three) up to, not including,
/// `<prefix>services0` (`'0'` is the byte after `'/'`). Other keys that fall
/// in between (say `<prefix>leases/...`) are filtered out by the readers.
pub(crate) fn key_range(prefix: &Prefix) -> KeyRange {
    KeyRange::new(prefix.key("endpoints/"), prefix.key("services0"))
}

/// The directory of `kind` in namespace `ns`.
pub(crate) fn namespace_dir(prefix: &Prefix, kind: Kind, ns: &str) -> Prefix {
    prefix.join(&format!("{}/{ns}", kind.dir()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::services::DEFAULT_PREFIX;

    #[test]
    fn keys_round_trip() {
        let r = ObjectRef::new(Kind::EndpointSlice, "default", "my-service-1");
        assert_eq!(r.relative_key(), "endpointslices/default/my-service-1");
        let p = Prefix::new(DEFAULT_PREFIX);
        assert_eq!(
            r.key(&Prefix::new("/dataplane")),
            "/dataplane/endpointslices/default/my-service-1"
        );
        assert_eq!(r.key(&p), r.key(&Prefix::new("/dataplane")));
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
    }

    #[test]
    fn refs_sort_like_keys() {
        let mut refs = [
            ObjectRef::new(Kind::Service, "a", "x"),
            ObjectRef::new(Kind::EndpointSlice, "b", "x"),
            ObjectRef::new(Kind::Endpoints, "c", "x"),
            ObjectRef::new(Kind::Service, "a", "w"),
        ];
        let p = Prefix::new(DEFAULT_PREFIX);
        let mut keys: Vec<String> = refs.iter().map(|r| r.key(&p)).collect();
        refs.sort();
        keys.sort();
        assert_eq!(refs.iter().map(|r| r.key(&p)).collect::<Vec<_>>(), keys);
    }

    #[test]
    fn range_covers_the_three_directories_only() {
        let p = Prefix::new(DEFAULT_PREFIX);
        let KeyRange { start, end } = key_range(&p);
        let (start, end) = (
            String::from_utf8(start).unwrap(),
            String::from_utf8(end).unwrap(),
        );
        for k in Kind::ALL {
            let key = ObjectRef::new(k, "ns", "n").key(&p);
            assert!(start <= key && key < end, "{key}");
        }
        assert!(*"/dataplane/subnets/x" > *end);
        assert!(*"/dataplane/config" < *start);
    }
}
