//! The invocation: `CNI_*` environment variables (spec section 2,
//! "Parameters").
//!
//! Which variables each command needs follows the spec and the reference
//! implementation (libcni's `skel`): ADD and CHECK need the container ID,
//! the netns and the interface name; DEL needs the container ID and the
//! interface name (the netns may be gone already); every command but
//! VERSION needs `CNI_PATH`, where delegated plugins are looked up.

use std::{fmt, path::PathBuf};

use super::error::{CniError, CniResult};

/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const IFNAME_MAX: usize = 15;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> CniResult<Self> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::invalid_env(format!(
                    "CNI_COMMAND: unknown command {other:?} (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// The attachment variables this command needs: (container ID, netns,
    /// ifname, path).
    fn needs(self) -> [bool; 4] {
        match self {
            Self::Add | Self::Check => [true, true, true, true],
            Self::Del => [true, false, true, true],
            Self::Status | Self::Gc => [false, false, false, true],
            Self::Version => [false, false, false, false],
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parsed environment. Optional fields are `None` when the command does
/// not need them and they were not given (an empty variable counts as not
/// given, as in libcni).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`, passed on to delegated plugins untouched; this plugin
    /// reads nothing from it.
    pub args: Option<String>,
    /// `CNI_PATH`, split on `:` (empty entries dropped).
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the variables through `get` (`std::env::var` in the binary, a
    /// map in tests). Every missing or invalid variable is named in one
    /// error (code 4).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> CniResult<Self> {
        let get = |name: &str| get(name).filter(|v| !v.is_empty());
        let Some(cmd) = get("CNI_COMMAND") else {
            return Err(CniError::invalid_env(
                "required environment variable CNI_COMMAND is missing",
            ));
        };
        let command = Command::parse(&cmd)?;
        let [need_id, need_netns, need_ifname, need_path] = command.needs();

        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS");
        let ifname = get("CNI_IFNAME");
        let path = get("CNI_PATH");

        let mut missing = Vec::new();
        for (need, name, value) in [
            (need_id, "CNI_CONTAINERID", &container_id),
            (need_netns, "CNI_NETNS", &netns),
            (need_ifname, "CNI_IFNAME", &ifname),
            (need_path, "CNI_PATH", &path),
        ] {
            if need && value.is_none() {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            return Err(CniError::invalid_env(format!(
                "required environment variables missing for {command}: {}",
                missing.join(", ")
            )));
        }

        let mut invalid = Vec::new();
        if let Some(id) = &container_id
            && let Err(e) = validate_container_id(id)
        {
            invalid.push(format!("CNI_CONTAINERID: {e}"));
        }
        if let Some(name) = &ifname
            && let Err(e) = validate_ifname(name)
        {
            invalid.push(format!("CNI_IFNAME: {e}"));
        }
        if let Some(ns) = &netns
            && !ns.starts_with('/')
        {
            invalid.push(format!("CNI_NETNS: {ns:?} is not an absolute path"));
        }
        if !invalid.is_empty() {
            return Err(CniError::invalid_env(format!(
                "invalid environment variables: {}",
                invalid.join("; ")
            )));
        }

        Ok(Self {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args: get("CNI_ARGS"),
            path: path
                .map(|p| {
                    p.split(':')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The container ID; only called where [`Env::parse`] required it.
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    /// The interface name; only called where [`Env::parse`] required it.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

/// A container ID: an alphanumeric, then alphanumerics, `_`, `.` or `-`
/// (spec section 3, "Attachment Parameters").
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let mut bytes = id.bytes();
    match bytes.next() {
        None => return Err("empty".into()),
        Some(b) if !b.is_ascii_alphanumeric() => {
            return Err(format!("{id:?} must start with a letter or digit"));
        }
        Some(_) => {}
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{id:?} contains {bad:?} (allowed: letters, digits, _ . -)"
        ));
    }
    Ok(())
}

/// An interface name the kernel accepts (what libcni checks too).
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > IFNAME_MAX {
        return Err(format!("{name:?} is longer than {IFNAME_MAX} bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?} contains {bad:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::cni::error::code;

    fn env(vars: &[(&str, &str)]) -> CniResult<Env> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee-1.2_3"),
        ("CNI_NETNS", "/run/netns/pod1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    #[test]
    fn parses_an_add() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id(), "c0ffee-1.2_3");
        assert_eq!(e.netns, Some(PathBuf::from("/run/netns/pod1")));
        assert_eq!(e.ifname(), "eth0");
        assert_eq!(e.args.as_deref(), Some("IgnoreUnknown=1;K8S_POD_NAME=web"));
        assert_eq!(
            e.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn names_every_missing_variable() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        for name in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_PATH"] {
            assert!(e.msg.contains(name), "{name} not in {}", e.msg);
        }
        assert!(!e.msg.contains("CNI_IFNAME"), "{}", e.msg);
        // Empty counts as missing.
        let e = env(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ])
        .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
        let e = env(&[]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_COMMAND"));
    }

    #[test]
    fn per_command_requirements() {
        // DEL without a netns (the pod's namespace may be gone).
        let d = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ])
        .unwrap();
        assert_eq!(d.command, Command::Del);
        assert_eq!(d.netns, None);
        for cmd in ["GC", "STATUS"] {
            let e = env(&[("CNI_COMMAND", cmd), ("CNI_PATH", "/x")]).unwrap();
            assert_eq!(e.container_id, None);
            let err = env(&[("CNI_COMMAND", cmd)]).unwrap_err();
            assert!(err.msg.contains("CNI_PATH"), "{}", err.msg);
        }
        let v = env(&[("CNI_COMMAND", "VERSION")]).unwrap();
        assert_eq!(v.command, Command::Version);
        let e = env(&[("CNI_COMMAND", "add")]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("\"add\""), "{}", e.msg);
    }

    #[test]
    fn validates_values() {
        let mut vars = ADD.to_vec();
        vars[1] = ("CNI_CONTAINERID", "-bad id");
        vars[3] = ("CNI_IFNAME", "a-very-long-ifname");
        vars[2] = ("CNI_NETNS", "run/netns/x");
        let e = env(&vars).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        for name in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            assert!(e.msg.contains(name), "{name} not in {}", e.msg);
        }
        assert!(validate_container_id("a b").is_err());
        assert!(validate_container_id("0").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "abcdefghijklmnop"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        assert!(validate_ifname("abcdefghijklmno").is_ok());
    }
}
