//! The CNI error result and its codes.
//!
//! A failing plugin prints one JSON object on stdout
//! (`{"cniVersion", "code", "msg", "details"}`, spec section 5, "Error") and
//! exits non-zero; stderr is free-form log. Codes 0-99 are the spec's
//! well-known ones, 100 and up are this plugin's own.

use serde::{Deserialize, Serialize};

/// Error codes: the spec's well-known ones, then this plugin's.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration; the message names
    /// the key and value.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables; the message names them.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure, e.g. reading stdin.
    pub const IO: u32 = 5;
    /// Failed to decode content (JSON syntax, a field of the wrong type).
    pub const DECODE: u32 = 6;
    /// Invalid network configuration (it decodes, but a value is wrong).
    pub const INVALID_NETCONF: u32 = 7;
    /// Try again later: a transient condition, e.g. the agent is unreachable.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited
    /// connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 100;
    /// Anything else (netlink or process failures); libcni uses 999 for
    /// the same.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: what the plugin prints (with the `cniVersion` in use) and
/// what a delegated plugin's failure is decoded into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg} (CNI error {code}{})", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    pub fn invalid_netconf(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_NETCONF, msg)
    }

    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(code::DECODE, msg)
    }

    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// The error result as printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| {
            // Serializing strings and numbers cannot fail; keep a valid
            // error object even so.
            format!(r#"{{"cniVersion":"{cni_version}","code":{},"msg":"unprintable error","details":""}}"#, code::INTERNAL)
        })
    }
}

/// `Result` with a [`CniError`].
pub type CniResult<T> = Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::invalid_netconf("mtu 20 is out of range")
            .with_details("the MTU must be 68..=65535");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "code": 7,
                "msg": "mtu 20 is out of range",
                "details": "the MTU must be 68..=65535",
            })
        );
        // Every key is present even without details.
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(code::TRY_AGAIN_LATER, "x").to_json("1.0.0"))
                .unwrap();
        assert_eq!(v["details"], "");
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn decodes_a_delegate_error() {
        // What host-local prints: no cniVersion, no details.
        let e: CniError = serde_json::from_str(
            r#"{"code": 999, "msg": "failed to allocate for range 0: no IP addresses available"}"#,
        )
        .unwrap();
        assert_eq!(e.code, 999);
        assert!(e.details.is_empty());
        let shown = e.context("IPAM plugin host-local").to_string();
        assert!(
            shown.starts_with("IPAM plugin host-local: failed to allocate"),
            "{shown}"
        );
    }
}
