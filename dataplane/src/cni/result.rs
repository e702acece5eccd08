//! The CNI result types (spec section 5, "ADD Success"), shared by what
//! the plugin prints, what IPAM plugins return and the `prevResult` that
//! CHECK and DEL receive.
//!
//! Addresses are kept as [`IpNet`]/[`IpAddr`] so that bad ones are decode
//! errors at the edge. IPAM results are the same type without
//! `interfaces` and without `interface` in `ips`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::error::{CniError, CniResult};

/// A CNI success result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniOutput {
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces in the container, empty/absent on the
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length, e.g. `10.244.1.5/32`.
    #[serde(with = "display_fromstr")]
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(with = "display_fromstr")]
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// 0 global, 253 link, 254 host (spec 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Self {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// `RT_SCOPE_LINK`, for a result route.
pub const SCOPE_LINK: u8 = 253;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniOutput {
    /// Decodes a result (an IPAM plugin's stdout, a `prevResult`); `what`
    /// names it in the error.
    pub fn from_value(value: serde_json::Value, what: &str) -> CniResult<Self> {
        serde_path_to_error::deserialize(value)
            .map_err(|e| CniError::decode(format!("{what}: {} at {}", e.inner(), e.path())))
    }

    pub fn from_slice(bytes: &[u8], what: &str) -> CniResult<Self> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| CniError::decode(format!("{what}: {} at {}", e.inner(), e.path())))
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// (De)serializes through `Display`/`FromStr` (CIDR strings).
mod display_fromstr {
    use std::{fmt::Display, str::FromStr};

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| D::Error::custom(format!("{s:?}: {e} (expected an address/prefix)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_host_locals_output() {
        let r = CniOutput::from_slice(
            br#"{
                "cniVersion": "1.0.0",
                "ips": [{"address": "10.99.0.2/30", "gateway": "10.99.0.1"}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}
            }"#,
            "IPAM result",
        )
        .unwrap();
        assert_eq!(r.ips.len(), 1);
        assert_eq!(r.ips[0].address, "10.99.0.2/30".parse::<IpNet>().unwrap());
        assert_eq!(r.ips[0].gateway, Some("10.99.0.1".parse().unwrap()));
        assert_eq!(r.ips[0].interface, None);
        assert_eq!(
            r.routes,
            vec![Route::new("0.0.0.0/0".parse().unwrap(), None)]
        );
        assert!(r.dns.is_empty());
    }

    #[test]
    fn bad_addresses_are_decode_errors_with_a_path() {
        let e = CniOutput::from_slice(br#"{"ips": [{"address": "10.1.2.300/24"}]}"#, "prevResult")
            .unwrap_err();
        assert_eq!(e.code, crate::cni::error::code::DECODE);
        assert!(
            e.msg.contains("prevResult") && e.msg.contains("ips[0].address"),
            "{}",
            e.msg
        );
        let e = CniOutput::from_slice(br#"{"routes": [{"dst": "0.0.0.0/0", "gw": 5}]}"#, "x")
            .unwrap_err();
        assert!(e.msg.contains("routes[0].gw"), "{}", e.msg);
    }

    #[test]
    fn result_json_has_the_spec_shape() {
        let r = CniOutput {
            cni_version: Some("1.1.0".into()),
            interfaces: vec![
                Interface {
                    name: "dp0123456789ab".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/pod".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![
                Route {
                    scope: Some(SCOPE_LINK),
                    ..Route::new("10.244.1.1/32".parse().unwrap(), None)
                },
                Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.244.1.1".parse().unwrap()),
                ),
            ],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["svc.cluster.local".into()],
                ..Default::default()
            },
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "dp0123456789ab", "mac": "02:00:00:00:00:01", "mtu": 1450},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1450, "sandbox": "/run/netns/pod"}
                ],
                "ips": [{"address": "10.244.1.2/32", "gateway": "10.244.1.1", "interface": 1}],
                "routes": [
                    {"dst": "10.244.1.1/32", "scope": 253},
                    {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}
                ],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
            })
        );
        // And back.
        assert_eq!(CniOutput::from_value(v, "x").unwrap(), r);
    }
}
