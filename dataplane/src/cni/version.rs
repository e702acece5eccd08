//! CNI spec versions: which ones this plugin speaks, and which one to use
//! with a delegated plugin.
//!
//! The plugin reads and writes the 1.x result format only; 1.0.0 and 1.1.0
//! share it (1.1 added the STATUS and GC commands and a few optional route
//! fields). Delegated plugins (IPAM) are asked for their versions first:
//! Debian's host-local 1.1.1 speaks up to 1.0.0 and fails a 1.1.0 netconf,
//! so it gets the netconf relabelled 1.0.0.

use std::{cmp::Ordering, fmt};

use serde::Deserialize;

use super::error::{CniError, CniResult, code};

/// The versions this plugin accepts in a netconf, oldest first.
pub const SUPPORTED: [&str; 2] = ["1.0.0", "1.1.0"];

/// The newest supported version: used where the caller gave none we know
/// (errors before the netconf was read, VERSION without input).
pub const LATEST: &str = "1.1.0";

/// The first version with the STATUS and GC commands.
pub const GC_STATUS_SINCE: Version = Version::new(1, 1, 0);

/// A spec version, `MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `"1.0.0"`; anything else (missing parts, pre-release tags,
    /// leading `v`) is an error.
    pub fn parse(s: &str) -> CniResult<Self> {
        let bad = || {
            CniError::decode(format!(
                "invalid CNI version {s:?}: expected MAJOR.MINOR.PATCH"
            ))
        };
        let mut parts = s.split('.');
        let mut next = || -> CniResult<u32> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = Self::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Checks a netconf's `cniVersion` against [`SUPPORTED`].
pub fn check_supported(conf_version: &str) -> CniResult<Version> {
    let v = Version::parse(conf_version)?;
    if !SUPPORTED.contains(&conf_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: config is {conf_version:?}, dataplane-cni supports {SUPPORTED:?}"
            ),
        ));
    }
    Ok(v)
}

/// What a plugin answers to VERSION.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

/// This plugin's answer to VERSION: `cniVersion` echoes the input's.
pub fn version_json(input_version: Option<&str>) -> String {
    serde_json::json!({
        "cniVersion": input_version.unwrap_or(LATEST),
        "supportedVersions": SUPPORTED,
    })
    .to_string()
}

/// The version to speak with a delegated plugin: the newest one that the
/// delegate supports, this plugin supports, and is not newer than the
/// netconf's own. Unparsable entries in the delegate's list are ignored.
pub fn negotiate(conf: Version, delegate: &VersionInfo, delegate_name: &str) -> CniResult<Version> {
    let ours: Vec<Version> = SUPPORTED
        .iter()
        .filter_map(|s| Version::parse(s).ok())
        .collect();
    delegate
        .supported_versions
        .iter()
        .filter_map(|s| Version::parse(s).ok())
        .filter(|v| ours.contains(v) && v.cmp(&conf) != Ordering::Greater)
        .max()
        .ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "no common CNI version with {delegate_name}: it supports {:?}, dataplane-cni {SUPPORTED:?} (config {conf})",
                    delegate.supported_versions
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(v: &[&str]) -> VersionInfo {
        VersionInfo {
            supported_versions: v.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parses_versions() {
        assert_eq!(Version::parse("1.1.0").unwrap(), Version::new(1, 1, 0));
        assert_eq!(Version::parse("0.3.1").unwrap(), Version::new(0, 3, 1));
        assert!(Version::parse("1.10.0").unwrap() > Version::parse("1.9.0").unwrap());
        for bad in [
            "",
            "1",
            "1.0",
            "1.0.0.0",
            "v1.0.0",
            "1.0.0-rc1",
            "1..0",
            "a.b.c",
            " 1.0.0",
        ] {
            let e = Version::parse(bad).unwrap_err();
            assert_eq!(e.code, code::DECODE, "{bad:?}");
        }
    }

    #[test]
    fn only_1_0_and_1_1_are_supported() {
        assert!(check_supported("1.0.0").is_ok());
        assert!(check_supported("1.1.0").is_ok());
        for old in ["0.4.0", "0.3.1", "1.2.0", "2.0.0"] {
            let e = check_supported(old).unwrap_err();
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{old}");
            assert!(e.msg.contains(old), "{}", e.msg);
        }
        assert_eq!(check_supported("one").unwrap_err().code, code::DECODE);
    }

    #[test]
    fn version_answer_echoes_the_input() {
        let v: serde_json::Value = serde_json::from_str(&version_json(Some("1.0.0"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
        let v: serde_json::Value = serde_json::from_str(&version_json(None)).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn negotiates_with_delegates() {
        let host_local_1_1_1 = info(&["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]);
        let v11 = Version::new(1, 1, 0);
        let v10 = Version::new(1, 0, 0);
        assert_eq!(
            negotiate(v11, &host_local_1_1_1, "host-local").unwrap(),
            v10
        );
        assert_eq!(
            negotiate(v10, &host_local_1_1_1, "host-local").unwrap(),
            v10
        );
        let modern = info(&["0.4.0", "1.0.0", "1.1.0", "1.2.0", "junk"]);
        assert_eq!(negotiate(v11, &modern, "x").unwrap(), v11);
        // Never newer than the netconf.
        assert_eq!(negotiate(v10, &modern, "x").unwrap(), v10);
        let old = info(&["0.3.1", "0.4.0"]);
        let e = negotiate(v11, &old, "old-ipam").unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(
            e.msg.contains("old-ipam") && e.msg.contains("0.4.0"),
            "{}",
            e.msg
        );
    }
}
