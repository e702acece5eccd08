//! Key prefixes and key ranges.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// A directory of keys in etcd, such as flannel's `/coreos.com/network` or
/// the services' `/dataplane/`.
///
/// Trailing slashes do not matter (`/dataplane` and `/dataplane/` are the
/// same prefix, as with flannel's `path.Join`); the empty prefix and `/`
/// are the root. Keys below it are `<prefix>/<relative key>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// With exactly one trailing `/`; the root is `/`.
    dir: String,
}

impl Prefix {
    /// The prefix `s`, trailing slashes dropped.
    pub fn new(s: &str) -> Prefix {
        Prefix {
            dir: format!("{}/", s.trim_end_matches('/')),
        }
    }

    /// The directory, with its trailing `/` (`/coreos.com/network/`).
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The key `rel` below the prefix: `<prefix>/<rel>`.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.dir)
    }

    /// The directory `rel` below the prefix, itself a prefix.
    pub fn join(&self, rel: &str) -> Prefix {
        Prefix::new(&self.key(rel))
    }

    /// The key relative to the prefix, if `key` is below it.
    pub fn strip<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.dir.as_str())
    }

    /// Every key below the prefix.
    pub fn range(&self) -> KeyRange {
        KeyRange::prefix(self.dir.as_bytes())
    }
}

impl fmt::Display for Prefix {
    /// Without the trailing `/`, as flannel's `--etcd-prefix` is written
    /// (the root shows as `/`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dir.strip_suffix('/') {
            Some("") | None => f.write_str("/"),
            Some(p) => f.write_str(p),
        }
    }
}

impl FromStr for Prefix {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Prefix, Infallible> {
        Ok(Prefix::new(s))
    }
}

impl From<&str> for Prefix {
    fn from(s: &str) -> Prefix {
        Prefix::new(s)
    }
}

impl From<String> for Prefix {
    fn from(s: String) -> Prefix {
        Prefix::new(&s)
    }
}

impl From<&String> for Prefix {
    fn from(s: &String) -> Prefix {
        Prefix::new(s)
    }
}

impl From<&Prefix> for Prefix {
    fn from(p: &Prefix) -> Prefix {
        p.clone()
    }
}

/// The keys from `start` up to, not including, `end`; an empty `end` means
/// the single key `start` (etcd's convention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key.
    pub start: Vec<u8>,
    /// The key after the last one; empty for the single key `start`.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// `[start, end)`.
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: end.into(),
        }
    }

    /// Just `key`.
    pub fn key(key: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange::new(key, Vec::new())
    }

    /// Every key starting with `prefix` (all keys for an empty one).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> KeyRange {
        let start = prefix.into();
        let end = prefix_end(&start);
        KeyRange { start, end }
    }

    /// The start as text, for messages.
    pub fn describe(&self) -> String {
        String::from_utf8_lossy(&self.start).into_owned()
    }
}

/// The smallest key greater than every key starting with `prefix`; `\0`
/// (etcd's "to the end of the keyspace") when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slashes_do_not_matter() {
        let p = Prefix::new("/coreos.com/network");
        assert_eq!(p, Prefix::new("/coreos.com/network/"));
        assert_eq!(p, Prefix::new("/coreos.com/network//"));
        assert_eq!(p.dir(), "/coreos.com/network/");
        assert_eq!(p.to_string(), "/coreos.com/network");
        assert_eq!(p.key("config"), "/coreos.com/network/config");
        assert_eq!(
            p.join("subnets").key("10.244.1.0-24"),
            "/coreos.com/network/subnets/10.244.1.0-24"
        );
        assert_eq!(p.join("subnets/").dir(), "/coreos.com/network/subnets/");
    }

    #[test]
    fn root_prefix() {
        for s in ["", "/", "//"] {
            let p = Prefix::new(s);
            assert_eq!(p.dir(), "/", "{s:?}");
            assert_eq!(p.to_string(), "/", "{s:?}");
            assert_eq!(p.key("config"), "/config");
        }
    }

    #[test]
    fn strip_only_below_the_prefix() {
        let p = Prefix::new("/dataplane/");
        assert_eq!(p.strip("/dataplane/services/a/b"), Some("services/a/b"));
        assert_eq!(p.strip("/dataplane"), None);
        assert_eq!(p.strip("/dataplanex/services"), None);
        assert_eq!(p.strip("/other/services/a/b"), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
        let r = Prefix::new("/dataplane").range();
        assert_eq!(r, KeyRange::new("/dataplane/", "/dataplane0"));
        assert_eq!(KeyRange::key("k").end, Vec::<u8>::new());
    }
}
