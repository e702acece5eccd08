//! The network configuration on stdin (spec sections 1 and 3).
//!
//! Standard fields: `cniVersion`, `name`, `type` (must be `dataplane-cni`),
//! `ipam` (delegated, see [`super::ipam`]), `dns`, and what the runtime
//! adds: `prevResult` (CHECK, DEL), `cni.dev/valid-attachments` (GC),
//! `runtimeConfig` and `args` (ignored). This plugin's own fields:
//!
//! - `agentSocket` (required): absolute path of this node's agent socket.
//!   Several agents on one machine (one per node namespace) each have
//!   their own; the agent writes its path into the conflist.
//! - `mtu`: MTU of both ends of the pod device; the kernel default if
//!   absent.
//! - `podDevice`: `"veth"` (default) or `"netkit"`.
//!
//! Unknown fields are passed through to the IPAM plugin and otherwise
//! ignored, as the spec allows runtimes to add fields.
//!
//! Errors: syntax and wrong field types are code 6 (decode), with the
//! field's path; decodable but wrong values are code 7 (invalid netconf);
//! an unsupported `cniVersion` is code 1.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    env::validate_container_id,
    error::{CniError, CniResult},
    proto::{AttachmentKey, PodDevice},
    result::{CniOutput, Dns},
    version::{self, Version},
};

/// The `type` this plugin answers to (its binary's name).
pub const PLUGIN_TYPE: &str = "dataplane-cni";

/// The GC key of the spec; `cni.dev/attachments` is the name an earlier
/// text of the spec used, which libcni still sends alongside.
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
const VALID_ATTACHMENTS_OLD: &str = "cni.dev/attachments";

/// Smallest MTU IPv4 allows (RFC 791), largest a device takes.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// `sun_path` holds 108 bytes with the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A validated netconf.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// As given, e.g. `"1.1.0"`; results carry it back.
    pub cni_version: String,
    pub version: Version,
    pub name: String,
    pub agent_socket: PathBuf,
    pub mtu: Option<u32>,
    pub pod_device: PodDevice,
    /// `ipam.type`: the delegated plugin's binary name.
    pub ipam_type: String,
    /// `dns` of the netconf, reported when IPAM gives none.
    pub dns: Dns,
    /// `prevResult`, decoded on use ([`NetConf::prev_result`]): DEL does
    /// not need it and must not fail on a bad one.
    prev_result: Option<Value>,
    /// GC's still-valid attachments; `None` if the key is absent (null
    /// counts as an empty list, as libcni sends for none).
    pub valid_attachments: Option<Vec<AttachmentKey>>,
    /// The whole object, for delegated plugins (which get the complete
    /// netconf, spec section 4).
    raw: Map<String, Value>,
}

/// The typed view; presence and values are checked afterwards so that the
/// errors can say which field is wrong.
#[derive(Deserialize)]
struct Typed {
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "agentSocket")]
    agent_socket: Option<String>,
    mtu: Option<u32>,
    #[serde(rename = "podDevice")]
    pod_device: Option<String>,
    ipam: Option<TypedIpam>,
    dns: Option<Dns>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
}

#[derive(Deserialize)]
struct TypedIpam {
    #[serde(rename = "type")]
    ipam_type: Option<String>,
}

#[derive(Deserialize)]
struct GcAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> CniResult<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::decode(format!(
                "the network configuration on stdin is not valid JSON: {e}"
            ))
        })?;
        let Value::Object(raw) = value else {
            return Err(CniError::decode(
                "the network configuration on stdin must be a JSON object",
            ));
        };

        let cni_version = match raw.get("cniVersion") {
            None => return Err(CniError::invalid_netconf("cniVersion is missing")),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(CniError::decode(format!(
                    "cniVersion must be a string, not {other}"
                )));
            }
        };
        let version = version::check_supported(&cni_version)?;

        let typed: Typed =
            serde_path_to_error::deserialize(Value::Object(raw.clone())).map_err(|e| {
                CniError::decode(format!(
                    "network configuration: {} at {}",
                    e.inner(),
                    e.path()
                ))
            })?;

        let name = typed
            .name
            .ok_or_else(|| CniError::invalid_netconf("name is missing"))?;
        validate_container_id(&name)
            .map_err(|e| CniError::invalid_netconf(format!("name: {e}")))?;

        match typed.plugin_type.as_deref() {
            Some(PLUGIN_TYPE) => {}
            Some(other) => {
                return Err(CniError::invalid_netconf(format!(
                    "type is {other:?}, but this plugin is {PLUGIN_TYPE:?}"
                )));
            }
            None => return Err(CniError::invalid_netconf("type is missing")),
        }

        let agent_socket = typed.agent_socket.ok_or_else(|| {
            CniError::invalid_netconf("agentSocket is missing (the node agent's socket path)")
        })?;
        if !agent_socket.starts_with('/') {
            return Err(CniError::invalid_netconf(format!(
                "agentSocket {agent_socket:?} is not an absolute path"
            )));
        }
        if agent_socket.len() > SUN_PATH_MAX {
            return Err(CniError::invalid_netconf(format!(
                "agentSocket {agent_socket:?} is longer than the {SUN_PATH_MAX} bytes a Unix socket path can have"
            )));
        }

        if let Some(mtu) = typed.mtu
            && !MTU_RANGE.contains(&mtu)
        {
            return Err(CniError::invalid_netconf(format!(
                "mtu {mtu} is out of range {}..={}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }

        let pod_device = match typed.pod_device.as_deref() {
            None | Some("veth") => PodDevice::Veth,
            Some("netkit") => PodDevice::Netkit,
            Some(other) => {
                return Err(CniError::invalid_netconf(format!(
                    "podDevice is {other:?}; expected \"veth\" or \"netkit\""
                )));
            }
        };

        let ipam_type = typed
            .ipam
            .ok_or_else(|| CniError::invalid_netconf("ipam is missing"))?
            .ipam_type
            .ok_or_else(|| CniError::invalid_netconf("ipam.type is missing"))?;
        if ipam_type.is_empty() || ipam_type.contains('/') || ipam_type == "." || ipam_type == ".."
        {
            return Err(CniError::invalid_netconf(format!(
                "ipam.type {ipam_type:?} is not a plugin file name"
            )));
        }

        let prev_result = typed.prev_result.filter(|v| !v.is_null());

        let valid_attachments = match raw
            .get(VALID_ATTACHMENTS)
            .or_else(|| raw.get(VALID_ATTACHMENTS_OLD))
        {
            None => None,
            Some(Value::Null) => Some(Vec::new()),
            Some(v) => {
                let list: Vec<GcAttachment> =
                    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                        CniError::decode(format!(
                            "{VALID_ATTACHMENTS}: {} at {}",
                            e.inner(),
                            e.path()
                        ))
                    })?;
                Some(
                    list.into_iter()
                        .map(|a| AttachmentKey {
                            container_id: a.container_id,
                            ifname: a.ifname,
                        })
                        .collect(),
                )
            }
        };

        Ok(Self {
            cni_version,
            version,
            name,
            agent_socket: PathBuf::from(agent_socket),
            mtu: typed.mtu,
            pod_device,
            ipam_type,
            dns: typed.dns.unwrap_or_default(),
            prev_result,
            valid_attachments,
            raw,
        })
    }

    /// `prevResult`, if given (code 6 if it is not a result).
    pub fn prev_result(&self) -> CniResult<Option<CniOutput>> {
        self.prev_result
            .clone()
            .map(|v| CniOutput::from_value(v, "prevResult"))
            .transpose()
    }

    /// The netconf for a delegated plugin speaking `version`: the whole
    /// object, relabelled with that version. `keep_gc_keys` keeps the
    /// `cni.dev/` GC keys (only a forwarded GC wants them).
    pub fn for_delegate(&self, version: Version, keep_gc_keys: bool) -> Vec<u8> {
        let mut raw = self.raw.clone();
        raw.insert("cniVersion".into(), Value::String(version.to_string()));
        if !keep_gc_keys {
            raw.remove(VALID_ATTACHMENTS);
            raw.remove(VALID_ATTACHMENTS_OLD);
        }
        // A map of JSON values always serializes.
        serde_json::to_vec(&Value::Object(raw)).unwrap_or_default()
    }
}

/// The `cniVersion` of a netconf that failed to parse, if it has one we
/// support: the error result should carry it.
pub fn version_hint(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let v: V = serde_json::from_slice(bytes).ok()?;
    version::SUPPORTED
        .contains(&v.cni_version.as_str())
        .then_some(v.cni_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::code;

    const GOOD: &str = r#"{
        "cniVersion": "1.1.0",
        "name": "dataplane",
        "type": "dataplane-cni",
        "agentSocket": "/run/dataplane/node1/cni.sock",
        "mtu": 1450,
        "podDevice": "netkit",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.1.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]
        },
        "dns": {"nameservers": ["10.96.0.10"]},
        "runtimeConfig": {"portMappings": []},
        "someFutureField": 1
    }"#;

    fn with(edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
        let mut v: Map<String, Value> = serde_json::from_str(GOOD).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn err(bytes: &[u8]) -> CniError {
        NetConf::parse(bytes).unwrap_err()
    }

    #[test]
    fn parses_a_good_netconf() {
        let c = NetConf::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(c.cni_version, "1.1.0");
        assert_eq!(c.version, Version::new(1, 1, 0));
        assert_eq!(c.name, "dataplane");
        assert_eq!(
            c.agent_socket,
            PathBuf::from("/run/dataplane/node1/cni.sock")
        );
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(c.pod_device, PodDevice::Netkit);
        assert_eq!(c.ipam_type, "host-local");
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10".to_string()]);
        assert_eq!(c.prev_result().unwrap(), None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn defaults() {
        let c = NetConf::parse(&with(|m| {
            m.remove("mtu");
            m.remove("podDevice");
            m.remove("dns");
        }))
        .unwrap();
        assert_eq!(c.mtu, None);
        assert_eq!(c.pod_device, PodDevice::Veth);
        assert!(c.dns.is_empty());
    }

    #[test]
    fn bad_json_is_a_decode_error() {
        for bad in [
            &b"{"[..],
            b"",
            b"[]",
            b"\"x\"",
            b"{\"cniVersion\": \"1.1.0\",}",
        ] {
            assert_eq!(
                err(bad).code,
                code::DECODE,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn wrong_types_are_decode_errors_naming_the_field() {
        let e = err(&with(|m| {
            m.insert("mtu".into(), "big".into());
        }));
        assert_eq!(e.code, code::DECODE);
        assert!(e.msg.contains("mtu"), "{}", e.msg);
        let e = err(&with(|m| {
            m.insert("ipam".into(), serde_json::json!({"type": 7}));
        }));
        assert_eq!(e.code, code::DECODE);
        assert!(e.msg.contains("ipam.type"), "{}", e.msg);
        let e = err(&with(|m| {
            m.insert("cniVersion".into(), 1.into());
        }));
        assert_eq!(e.code, code::DECODE);
        // A bad prevResult is an error where it is used (CHECK, ADD), not
        // for DEL, which must not fail on it.
        let c = NetConf::parse(&with(|m| {
            m.insert(
                "prevResult".into(),
                serde_json::json!({"ips": [{"address": "nope"}]}),
            );
        }))
        .unwrap();
        let e = c.prev_result().unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert!(
            e.msg.contains("prevResult") && e.msg.contains("ips[0].address"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn missing_and_wrong_values_are_invalid_netconf() {
        for (field, needle) in [
            ("cniVersion", "cniVersion"),
            ("name", "name"),
            ("type", "type"),
            ("agentSocket", "agentSocket"),
            ("ipam", "ipam"),
        ] {
            let e = err(&with(|m| {
                m.remove(field);
            }));
            assert_eq!(e.code, code::INVALID_NETCONF, "{field}: {e}");
            assert!(e.msg.contains(needle), "{field}: {}", e.msg);
        }
        let cases: Vec<(&str, Value, &str)> = vec![
            ("type", "bridge".into(), "bridge"),
            ("podDevice", "macvlan".into(), "macvlan"),
            ("mtu", 20.into(), "mtu 20"),
            ("agentSocket", "run/x.sock".into(), "absolute"),
            (
                "agentSocket",
                format!("/{}", "x".repeat(200)).into(),
                "longer",
            ),
            ("name", "-net".into(), "name"),
            ("ipam", serde_json::json!({"type": "../evil"}), "ipam.type"),
            ("ipam", serde_json::json!({}), "ipam.type"),
        ];
        for (field, value, needle) in cases {
            let e = err(&with(|m| {
                m.insert(field.into(), value.clone());
            }));
            assert_eq!(e.code, code::INVALID_NETCONF, "{field}={value}: {e}");
            assert!(e.msg.contains(needle), "{field}={value}: {}", e.msg);
        }
    }

    #[test]
    fn unsupported_versions_are_code_1() {
        for v in ["0.4.0", "0.3.1", "2.0.0"] {
            let e = err(&with(|m| {
                m.insert("cniVersion".into(), v.into());
            }));
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{v}");
        }
        assert_eq!(version_hint(GOOD.as_bytes()).as_deref(), Some("1.1.0"));
        assert_eq!(version_hint(br#"{"cniVersion": "0.4.0"}"#), None);
        assert_eq!(version_hint(b"garbage"), None);
    }

    #[test]
    fn gc_attachments() {
        let c = NetConf::parse(&with(|m| {
            m.insert(
                VALID_ATTACHMENTS.into(),
                serde_json::json!([{"containerID": "a", "ifname": "eth0"}]),
            );
        }))
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![AttachmentKey {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
        let c = NetConf::parse(&with(|m| {
            m.insert(VALID_ATTACHMENTS.into(), Value::Null);
        }))
        .unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
        // The old key alone is understood too.
        let c = NetConf::parse(&with(|m| {
            m.insert(
                "cni.dev/attachments".into(),
                serde_json::json!([{"containerID": "b", "ifname": "net1"}]),
            );
        }))
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "b");
        let e = err(&with(|m| {
            m.insert(
                VALID_ATTACHMENTS.into(),
                serde_json::json!([{"ifname": "x"}]),
            );
        }));
        assert_eq!(e.code, code::DECODE);
        assert!(e.msg.contains(VALID_ATTACHMENTS), "{}", e.msg);
    }

    #[test]
    fn delegates_get_the_whole_netconf_relabelled() {
        let c = NetConf::parse(&with(|m| {
            m.insert(VALID_ATTACHMENTS.into(), serde_json::json!([]));
        }))
        .unwrap();
        let d: Value =
            serde_json::from_slice(&c.for_delegate(Version::new(1, 0, 0), false)).unwrap();
        assert_eq!(d["cniVersion"], "1.0.0");
        assert_eq!(d["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(d["someFutureField"], 1);
        assert!(d.get(VALID_ATTACHMENTS).is_none());
        let d: Value =
            serde_json::from_slice(&c.for_delegate(Version::new(1, 1, 0), true)).unwrap();
        assert_eq!(d["cniVersion"], "1.1.0");
        assert_eq!(d[VALID_ATTACHMENTS], serde_json::json!([]));
    }
}
