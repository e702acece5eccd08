//! The flannel network config stored at `<prefix>/config`.
//!
//! Parsing follows flannel's `pkg/subnet/config.go` (field names matched
//! case-insensitively, the same defaults and the same rejections) so that a
//! config written for flannel means exactly the same thing to this agent. We
//! are stricter in a few places where flannel silently misbehaves: a
//! `SubnetMin` above `SubnetMax` (an empty pool), a backend other than vxlan
//! (we only speak vxlan) and IPv6 (not implemented) are rejected with a clear
//! error instead of failing later.
//!
//! [`ConfigError`] messages name the offending field but not the etcd key;
//! [`load`] (and any other caller) adds the `<prefix>/config` context.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Map, Value};

use crate::etcd::Prefix;

/// Default VXLAN network identifier, as in flannel.
pub const DEFAULT_VNI: u32 = 1;
/// Default VXLAN UDP port: flannel passes 0 to the kernel, which uses the
/// Linux-specific 8472 (not IANA's 4789).
pub const DEFAULT_PORT: u16 = 8472;
/// Largest VNI: the VXLAN header has 24 bits for it.
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// The cluster network, as configured in `<prefix>/config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Cluster pod CIDR (host bits cleared).
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// Network address of the first subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// Network address of the last subnet that may be leased.
    pub subnet_max: Ipv4Addr,
    /// The `Backend` block.
    pub backend: BackendConfig,
    /// `ServiceCIDR`: where ClusterIPs lie. Our extension (flannel ignores
    /// the field); `--service-cidr` overrides it, and without either
    /// [`crate::services::DEFAULT_SERVICE_CIDR`] applies.
    pub service_cidr: Option<Ipv4Net>,
    /// `NodePortRange` (`"30000-32767"`): where `dataplane apply`
    /// allocates nodePorts and which explicit ones it accepts. Our
    /// extension like `ServiceCIDR`; `apply --service-node-port-range`
    /// overrides it, and without either
    /// [`crate::services::guard::DEFAULT_NODE_PORT_RANGE`] applies.
    pub node_port_range: Option<NodePortRange>,
}

/// An inclusive range of nodePorts (kube-apiserver's
/// `--service-node-port-range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePortRange {
    pub min: u16,
    pub max: u16,
}

impl NodePortRange {
    pub fn contains(&self, p: u16) -> bool {
        (self.min..=self.max).contains(&p)
    }
}

impl std::fmt::Display for NodePortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl std::str::FromStr for NodePortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range such as \"30000-32767\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(format!("{s:?}: want 1 <= min <= max <= 65535"));
        }
        Ok(NodePortRange { min, max })
    }
}

/// The `Backend` block of the network config (vxlan only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Always `"vxlan"` after a successful parse.
    pub backend_type: String,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// VXLAN UDP destination port.
    pub port: u16,
    /// Overlay MTU; `None` (absent or 0) means underlay MTU minus 50.
    pub mtu: Option<u32>,
}

/// Why a network config was rejected. The message names the field; the
/// caller is expected to say which etcd key the config came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The value is not JSON at all.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// The value is JSON but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// One field is missing, mistyped or out of range.
    #[error("field {field}: {reason}")]
    Field {
        /// Field name as flannel documents it, e.g. `SubnetLen` or `Backend.VNI`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn field_err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Looks up `name` in a JSON object the way Go's `encoding/json` does:
/// case-insensitively. A JSON `null` counts as absent (Go leaves the field at
/// its default). Two spellings of the same field are rejected: Go would
/// silently keep whichever comes last, which is too surprising for a config.
pub(crate) fn get_ci<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Value>, String> {
    let mut found: Option<(&String, &Value)> = None;
    for (k, v) in obj {
        if k.eq_ignore_ascii_case(field) {
            if let Some((first, _)) = found {
                return Err(format!("given twice, as {first:?} and {k:?}"));
            }
            found = Some((k, v));
        }
    }
    Ok(found.map(|(_, v)| v).filter(|v| !v.is_null()))
}

fn get_field<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    display: &str,
) -> Result<Option<&'a Value>, ConfigError> {
    get_ci(obj, field).map_err(|reason| field_err(display, reason))
}

fn as_str<'a>(v: &'a Value, display: &str) -> Result<&'a str, ConfigError> {
    v.as_str()
        .ok_or_else(|| field_err(display, format!("expected a string, got {v}")))
}

fn as_u64(v: &Value, display: &str) -> Result<u64, ConfigError> {
    v.as_u64()
        .ok_or_else(|| field_err(display, format!("expected a non-negative integer, got {v}")))
}

fn as_bool(v: &Value, display: &str) -> Result<bool, ConfigError> {
    v.as_bool()
        .ok_or_else(|| field_err(display, format!("expected true or false, got {v}")))
}

fn parse_ipv4(v: &Value, display: &str) -> Result<Ipv4Addr, ConfigError> {
    let s = as_str(v, display)?;
    s.parse()
        .map_err(|_| field_err(display, format!("{s:?} is not an IPv4 address")))
}

fn subnet_size(subnet_len: u8) -> u64 {
    1u64 << (32 - u32::from(subnet_len))
}

impl NetworkConfig {
    /// Parses the JSON stored at `<prefix>/config`, applying flannel's
    /// defaults and checks.
    pub fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = value.as_object().ok_or(ConfigError::NotObject)?;

        // Dual stack: IPv4 is on unless switched off, IPv6 off unless on.
        if let Some(v) = get_field(obj, "EnableIPv4", "EnableIPv4")?
            && !as_bool(v, "EnableIPv4")?
        {
            return Err(field_err(
                "EnableIPv4",
                "false (IPv6-only networks) is not supported by this agent",
            ));
        }
        if let Some(v) = get_field(obj, "EnableIPv6", "EnableIPv6")?
            && as_bool(v, "EnableIPv6")?
        {
            return Err(field_err(
                "EnableIPv6",
                "true (dual stack) is not supported by this agent; remove it or set it to false",
            ));
        }

        let network = match get_field(obj, "Network", "Network")? {
            None => {
                return Err(field_err(
                    "Network",
                    "required: the cluster pod CIDR, e.g. \"10.244.0.0/16\"",
                ));
            }
            Some(v) => {
                let s = as_str(v, "Network")?;
                let net: Ipv4Net = s.parse().map_err(|_| {
                    field_err(
                        "Network",
                        format!("{s:?} is not an IPv4 CIDR such as \"10.244.0.0/16\""),
                    )
                })?;
                let trunc = net.trunc();
                if trunc != net {
                    // flannel (Go's net.ParseCIDR) silently drops host bits; so do we.
                    log::warn!("config field Network: {net} has host bits set; using {trunc}");
                }
                trunc
            }
        };

        // Go's zero value: SubnetLen 0 means "not set".
        let explicit_len = match get_field(obj, "SubnetLen", "SubnetLen")? {
            Some(v) => Some(as_u64(v, "SubnetLen")?).filter(|&len| len != 0),
            None => None,
        };
        let subnet_len = match explicit_len {
            Some(len) => {
                if len > 30 {
                    return Err(field_err(
                        "SubnetLen",
                        format!(
                            "{len} is greater than 30 (a node subnet needs at least 4 addresses)"
                        ),
                    ));
                }
                // Checked above: fits in u8.
                let len = len as u8;
                if len < network.prefix_len() + 2 {
                    return Err(field_err(
                        "SubnetLen",
                        format!(
                            "{len} is less than Network's prefix length + 2 ({}): \
                             Network {network} must hold at least four subnets",
                            network.prefix_len() + 2
                        ),
                    ));
                }
                len
            }
            None => {
                if network.prefix_len() > 28 {
                    return Err(field_err(
                        "Network",
                        format!(
                            "{network} is too small: the longest usable prefix is /28 \
                             (four subnets of four addresses)"
                        ),
                    ));
                } else if network.prefix_len() <= 22 {
                    24
                } else {
                    network.prefix_len() + 2
                }
            }
        };

        let size = subnet_size(subnet_len);
        let net_start = u64::from(u32::from(network.network()));
        let net_end = u64::from(u32::from(network.broadcast())) + 1;
        let mask = u32::MAX << (32 - u32::from(subnet_len));

        let check_bound = |name: &str, addr: Ipv4Addr| -> Result<(), ConfigError> {
            if !network.contains(&addr) {
                return Err(field_err(
                    name,
                    format!("{addr} is not inside Network {network}"),
                ));
            }
            if u32::from(addr) & mask != u32::from(addr) {
                return Err(field_err(
                    name,
                    format!("{addr} is not on a /{subnet_len} (SubnetLen) boundary"),
                ));
            }
            Ok(())
        };

        // Go treats 0.0.0.0 as "not set".
        let subnet_min = match get_field(obj, "SubnetMin", "SubnetMin")? {
            Some(v) if !parse_ipv4(v, "SubnetMin")?.is_unspecified() => {
                let a = parse_ipv4(v, "SubnetMin")?;
                check_bound("SubnetMin", a)?;
                a
            }
            // The first subnet is skipped: its network address would clash
            // with the Network's own network address.
            _ => Ipv4Addr::from((net_start + size) as u32),
        };
        let subnet_max = match get_field(obj, "SubnetMax", "SubnetMax")? {
            Some(v) if !parse_ipv4(v, "SubnetMax")?.is_unspecified() => {
                let a = parse_ipv4(v, "SubnetMax")?;
                check_bound("SubnetMax", a)?;
                a
            }
            _ => Ipv4Addr::from((net_end - size) as u32),
        };
        if subnet_min > subnet_max {
            return Err(field_err(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}: no subnet could be leased"),
            ));
        }

        let backend = match get_field(obj, "Backend", "Backend")? {
            None => {
                return Err(field_err(
                    "Backend",
                    "missing: flannel then uses its udp backend, which this agent does not \
                     implement; add \"Backend\": {\"Type\": \"vxlan\"}",
                ));
            }
            Some(v) => BackendConfig::parse(v)?,
        };

        let service_cidr = match get_field(obj, "ServiceCIDR", "ServiceCIDR")? {
            None => None,
            Some(v) => {
                let s = as_str(v, "ServiceCIDR")?;
                let net: Ipv4Net = s.parse().map_err(|_| {
                    field_err(
                        "ServiceCIDR",
                        format!("{s:?} is not an IPv4 CIDR such as \"10.96.0.0/12\""),
                    )
                })?;
                let net = net.trunc();
                if net.contains(&network.network()) || network.contains(&net.network()) {
                    return Err(field_err(
                        "ServiceCIDR",
                        format!(
                            "{net} overlaps Network {network}: ClusterIPs cannot be pod addresses"
                        ),
                    ));
                }
                Some(net)
            }
        };

        let node_port_range = match get_field(obj, "NodePortRange", "NodePortRange")? {
            None => None,
            Some(v) => {
                let s = as_str(v, "NodePortRange")?;
                Some(s.parse().map_err(|e| field_err("NodePortRange", e))?)
            }
        };

        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            service_cidr,
            node_port_range,
        })
    }

    /// Every leasable subnet, from `subnet_min` up to `subnet_max` inclusive.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + use<> {
        let size = subnet_size(self.subnet_len);
        let len = self.subnet_len;
        let start = u64::from(u32::from(self.subnet_min));
        let end = u64::from(u32::from(self.subnet_max));
        (0..)
            .map(move |i: u64| start + i * size)
            .take_while(move |&a| a <= end)
            .filter_map(move |a| Ipv4Net::new(Ipv4Addr::from(a as u32), len).ok())
    }

    /// Whether `subnet` could be leased under this config: right prefix
    /// length, no host bits, between `subnet_min` and `subnet_max`.
    pub fn contains_subnet(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.addr() == subnet.network()
            && subnet.addr() >= self.subnet_min
            && subnet.addr() <= self.subnet_max
    }
}

impl BackendConfig {
    fn parse(v: &Value) -> Result<BackendConfig, ConfigError> {
        let obj = v.as_object().ok_or_else(|| {
            field_err(
                "Backend",
                format!("expected an object such as {{\"Type\": \"vxlan\"}}, got {v}"),
            )
        })?;
        let backend_type = match get_field(obj, "Type", "Backend.Type")? {
            None => {
                return Err(field_err(
                    "Backend.Type",
                    "missing; this agent only implements \"vxlan\"",
                ));
            }
            Some(v) => as_str(v, "Backend.Type")?.to_string(),
        };
        // flannel looks backends up by exact name, so "VXLAN" fails there too.
        if backend_type != "vxlan" {
            return Err(field_err(
                "Backend.Type",
                format!("{backend_type:?} is not supported; this agent only implements \"vxlan\""),
            ));
        }
        let vni = match get_field(obj, "VNI", "Backend.VNI")? {
            None => DEFAULT_VNI,
            Some(v) => {
                let n = as_u64(v, "Backend.VNI")?;
                if n > u64::from(MAX_VNI) {
                    return Err(field_err(
                        "Backend.VNI",
                        format!("{n} does not fit in 24 bits (max {MAX_VNI})"),
                    ));
                }
                n as u32
            }
        };
        let port = match get_field(obj, "Port", "Backend.Port")? {
            None => DEFAULT_PORT,
            Some(v) => match as_u64(v, "Backend.Port")? {
                // flannel passes 0 on to the kernel, which means 8472.
                0 => DEFAULT_PORT,
                n => u16::try_from(n).map_err(|_| {
                    field_err("Backend.Port", format!("{n} is not a UDP port (1..=65535)"))
                })?,
            },
        };
        let mtu = match get_field(obj, "MTU", "Backend.MTU")? {
            None => None,
            Some(v) => match as_u64(v, "Backend.MTU")? {
                0 => None,
                n if (68..=65535).contains(&n) => Some(n as u32),
                n => {
                    return Err(field_err(
                        "Backend.MTU",
                        format!("{n} is not a usable MTU (68..=65535, or 0 for automatic)"),
                    ));
                }
            },
        };
        // flannel options this dataplane does not implement: refused
        // rather than silently ignored. `false` is what we do anyway.
        for (name, display, what) in [
            (
                "GBP",
                "Backend.GBP",
                "VXLAN group-based policy is not supported by this dataplane; remove it or set false",
            ),
            (
                "DirectRouting",
                "Backend.DirectRouting",
                "direct routing is not supported by this dataplane (every peer is reached over VXLAN); remove it or set false",
            ),
        ] {
            if let Some(v) = get_field(obj, name, display)?
                && as_bool(v, display)?
            {
                return Err(field_err(display, what));
            }
        }
        Ok(BackendConfig {
            backend_type,
            vni,
            port,
            mtu,
        })
    }
}

/// The etcd key holding the network config.
pub fn config_key(prefix: impl Into<Prefix>) -> String {
    prefix.into().key("config")
}

/// What differs between the `running` config and a `new` one written at run
/// time, one message per field. The agent applies none of these while it
/// runs (the VNI and port are in every peer's frames, Network and
/// SubnetLen in every lease): they are refused and logged as errors.
pub fn unapplied_changes(running: &NetworkConfig, new: &NetworkConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut diff = |field: &str, old: String, new: String| {
        if old != new {
            out.push(format!(
                "{field} changed from {old} to {new} at run time: not applied, this agent keeps {old} \
                 (a change of {field} needs every agent restarted with it)"
            ));
        }
    };
    let (a, b) = (&running.backend, &new.backend);
    diff("Backend.VNI", a.vni.to_string(), b.vni.to_string());
    diff("Backend.Port", a.port.to_string(), b.port.to_string());
    diff(
        "Network",
        running.network.to_string(),
        new.network.to_string(),
    );
    diff(
        "SubnetLen",
        running.subnet_len.to_string(),
        new.subnet_len.to_string(),
    );
    let mtu = |m: Option<u32>| m.map_or("automatic".to_string(), |m| m.to_string());
    diff("Backend.MTU", mtu(a.mtu), mtu(b.mtu));
    let cidr = |c: Option<Ipv4Net>| c.map_or("unset".to_string(), |c| c.to_string());
    diff(
        "ServiceCIDR",
        cidr(running.service_cidr),
        cidr(new.service_cidr),
    );
    out
}

/// Follows `<prefix>/config` while the agent runs and logs, as errors, every
/// change it does not apply ([`unapplied_changes`]) and every new value
/// that is not a valid config. Each new value is judged once. Returns when
/// `shutdown` turns true.
pub async fn watch_config(
    client: etcd_client::Client,
    prefix: impl Into<Prefix>,
    running: NetworkConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let key = config_key(prefix);
    let mut watch = crate::etcd::list_then_watch(
        &client,
        format!("the network config {key}"),
        crate::etcd::KeyRange::key(key.as_bytes()),
        |kv: &etcd_client::KeyValue| Some(kv.value().to_vec()),
        shutdown,
    )
    .counted_as("config");
    let mut last: Option<Vec<u8>> = None;
    let mut judge = |value: Option<Vec<u8>>| {
        if value == last {
            return;
        }
        match &value {
            None => log::error!(
                "{key} deleted at run time: this agent keeps the config it started with"
            ),
            Some(v) => match std::str::from_utf8(v)
                .map_err(|e| e.to_string())
                .and_then(|s| NetworkConfig::parse(s).map_err(|e| e.to_string()))
            {
                Err(e) => log::error!(
                    "{key} rewritten with an invalid config ({e}): not applied, this agent keeps the config it started with"
                ),
                Ok(new) => {
                    for msg in unapplied_changes(&running, &new) {
                        log::error!("{key}: {msg}");
                    }
                }
            },
        }
        last = value;
    };
    while let Some(update) = watch.next().await {
        match update {
            crate::etcd::Update::Snapshot(s) => judge(s.items.into_iter().next()),
            crate::etcd::Update::Event(crate::etcd::Event::Put(v)) => judge(Some(v)),
            crate::etcd::Update::Event(crate::etcd::Event::Delete(_)) => judge(None),
        }
    }
}

/// Why [`load`] could not produce a config.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    /// The key does not exist (yet): flannel waits and retries in this case.
    #[error(
        "network config {key} not found in etcd; write one, e.g. {{\"Network\": \"10.244.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}"
    )]
    Missing {
        /// The etcd key that was read.
        key: String,
    },
    /// The value is not UTF-8.
    #[error("network config {key}: value is not UTF-8")]
    NotUtf8 {
        /// The etcd key that was read.
        key: String,
    },
    /// The value was rejected.
    #[error("network config {key}: {source}")]
    Invalid {
        /// The etcd key that was read.
        key: String,
        /// What is wrong with the value.
        source: ConfigError,
    },
    /// etcd could not be read.
    #[error("reading network config {key} from etcd: {source}")]
    Etcd {
        /// The etcd key that was read.
        key: String,
        /// The client error.
        source: etcd_client::Error,
    },
}

/// Reads and parses `<prefix>/config` from etcd.
pub async fn load(
    client: &mut etcd_client::Client,
    prefix: impl Into<Prefix>,
) -> Result<NetworkConfig, LoadConfigError> {
    let key = config_key(prefix);
    let resp = client
        .get(key.as_str(), None)
        .await
        .map_err(|source| LoadConfigError::Etcd {
            key: key.clone(),
            source,
        })?;
    let Some(kv) = resp.kvs().first() else {
        return Err(LoadConfigError::Missing { key });
    };
    let Ok(text) = std::str::from_utf8(kv.value()) else {
        return Err(LoadConfigError::NotUtf8 { key });
    };
    NetworkConfig::parse(text).map_err(|source| LoadConfigError::Invalid { key, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s)
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn err_of(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn typical_flannel_config() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.network, net("10.244.0.0/16"));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, ip("10.244.1.0"));
        assert_eq!(c.subnet_max, ip("10.244.255.0"));
        assert_eq!(
            c.backend,
            BackendConfig {
                backend_type: "vxlan".into(),
                vni: 1,
                port: 8472,
                mtu: None,
            }
        );
    }

    #[test]
    fn field_names_are_case_insensitive() {
        let c = parse(
            r#"{"network":"10.1.0.0/16","SUBNETLEN":26,"subnetmin":"10.1.0.64",
                "subNetMax":"10.1.1.0","backend":{"type":"vxlan","vni":42,"port":4789,
                "mtu":1400,"gbp":false,"directrouting":false}}"#,
        )
        .unwrap();
        assert_eq!(c.network, net("10.1.0.0/16"));
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, ip("10.1.0.64"));
        assert_eq!(c.subnet_max, ip("10.1.1.0"));
        assert_eq!(c.backend.vni, 42);
        assert_eq!(c.backend.port, 4789);
        assert_eq!(c.backend.mtu, Some(1400));
    }

    #[test]
    fn same_field_twice_rejected() {
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(e.starts_with("field Network: given twice"), "{e}");
    }

    #[test]
    fn default_subnet_len_24_up_to_slash_22() {
        for (n, len) in [("10.0.0.0/8", 24), ("10.1.0.0/16", 24), ("10.1.0.0/22", 24)] {
            let c = parse(&format!(
                r#"{{"Network":"{n}","Backend":{{"Type":"vxlan"}}}}"#
            ))
            .unwrap();
            assert_eq!(c.subnet_len, len, "{n}");
        }
    }

    #[test]
    fn default_subnet_len_network_plus_2_below_slash_22() {
        for (n, len) in [
            ("10.1.0.0/23", 25),
            ("10.1.0.0/26", 28),
            ("10.1.0.0/28", 30),
        ] {
            let c = parse(&format!(
                r#"{{"Network":"{n}","Backend":{{"Type":"vxlan"}}}}"#
            ))
            .unwrap();
            assert_eq!(c.subnet_len, len, "{n}");
        }
    }

    #[test]
    fn default_min_max() {
        let c = parse(r#"{"Network":"10.5.0.0/28","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 30);
        assert_eq!(c.subnet_min, ip("10.5.0.4"));
        assert_eq!(c.subnet_max, ip("10.5.0.12"));
        let all: Vec<_> = c.subnets().collect();
        assert_eq!(
            all,
            vec![net("10.5.0.4/30"), net("10.5.0.8/30"), net("10.5.0.12/30")]
        );
    }

    #[test]
    fn zero_min_max_mean_default() {
        let c = parse(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_min, ip("10.5.1.0"));
        assert_eq!(c.subnet_max, ip("10.5.255.0"));
    }

    #[test]
    fn nulls_mean_default() {
        let c = parse(
            r#"{"Network":"10.5.0.0/16","SubnetLen":null,"Backend":{"Type":"vxlan","VNI":null}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.backend.vni, 1);
        let c =
            parse(r#"{"Network":"10.5.0.0/16","SubnetLen":0,"Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
    }

    #[test]
    fn top_of_address_space() {
        let c = parse(r#"{"Network":"255.255.255.240/28","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_max, ip("255.255.255.252"));
        assert_eq!(c.subnets().count(), 3);
    }

    #[test]
    fn host_bits_in_network_are_dropped() {
        let c = parse(r#"{"Network":"10.244.3.7/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.network, net("10.244.0.0/16"));
    }

    #[test]
    fn backend_defaults_and_port_zero() {
        let c = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Port":0,"MTU":0}}"#)
            .unwrap();
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, None);
    }

    #[test]
    fn unknown_fields_ignored() {
        parse(r#"{"Network":"10.1.0.0/16","EnableNFTables":false,"EnableIPv4":true,"EnableIPv6":false,"Backend":{"Type":"vxlan","Learning":false}}"#)
            .unwrap();
    }

    #[test]
    fn rejects_bad_json() {
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert_eq!(parse("[1]"), Err(ConfigError::NotObject));
    }

    #[test]
    fn rejects_missing_or_bad_network() {
        assert!(err_of(r#"{"Backend":{"Type":"vxlan"}}"#).starts_with("field Network: required"));
        assert!(
            err_of(r#"{"Network":"10.1.0.0","Backend":{"Type":"vxlan"}}"#)
                .starts_with("field Network: ")
        );
        assert!(
            err_of(r#"{"Network":"fd00::/64","Backend":{"Type":"vxlan"}}"#)
                .starts_with("field Network: ")
        );
        assert!(
            err_of(r#"{"Network":16,"Backend":{"Type":"vxlan"}}"#)
                .starts_with("field Network: expected a string")
        );
    }

    #[test]
    fn rejects_network_longer_than_28() {
        let e = err_of(r#"{"Network":"10.1.0.0/29","Backend":{"Type":"vxlan"}}"#);
        assert!(
            e.starts_with("field Network: 10.1.0.0/29 is too small"),
            "{e}"
        );
    }

    #[test]
    fn rejects_subnet_len_over_30() {
        let e = err_of(r#"{"Network":"10.1.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#);
        assert!(
            e.starts_with("field SubnetLen: 31 is greater than 30"),
            "{e}"
        );
    }

    #[test]
    fn rejects_subnet_len_below_network_plus_2() {
        let e = err_of(r#"{"Network":"10.1.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#);
        assert!(e.starts_with("field SubnetLen: 17 is less than"), "{e}");
        // Exactly +2 is fine.
        parse(r#"{"Network":"10.1.0.0/16","SubnetLen":18,"Backend":{"Type":"vxlan"}}"#).unwrap();
        // With an explicit SubnetLen a /29 network can never pass.
        let e = err_of(r#"{"Network":"10.1.0.0/29","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#);
        assert!(e.starts_with("field SubnetLen: 30 is less than"), "{e}");
    }

    #[test]
    fn rejects_bad_subnet_len_type() {
        let e = err_of(r#"{"Network":"10.1.0.0/16","SubnetLen":-1,"Backend":{"Type":"vxlan"}}"#);
        assert!(
            e.starts_with("field SubnetLen: expected a non-negative integer"),
            "{e}"
        );
        let e = err_of(r#"{"Network":"10.1.0.0/16","SubnetLen":"24","Backend":{"Type":"vxlan"}}"#);
        assert!(e.starts_with("field SubnetLen: "), "{e}");
    }

    #[test]
    fn rejects_unaligned_min_max() {
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.1","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMin: 10.1.1.1 is not on a /24"),
            "{e}"
        );
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.9.128","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMax: 10.1.9.128 is not on a /24"),
            "{e}"
        );
    }

    #[test]
    fn rejects_min_max_outside_network() {
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.1.0","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMin: 10.2.1.0 is not inside Network 10.1.0.0/16"),
            "{e}"
        );
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMax":"10.0.255.0","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMax: 10.0.255.0 is not inside"),
            "{e}"
        );
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMax":"not-an-ip","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMax: \"not-an-ip\" is not an IPv4 address"),
            "{e}"
        );
    }

    #[test]
    fn rejects_min_above_max() {
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.8.0","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field SubnetMin: 10.1.9.0 is above SubnetMax 10.1.8.0"),
            "{e}"
        );
        // Min == Max is a pool of one.
        let c = parse(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.9.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnets().collect::<Vec<_>>(), vec![net("10.1.9.0/24")]);
    }

    #[test]
    fn rejects_missing_backend_as_udp() {
        let e = err_of(r#"{"Network":"10.1.0.0/16"}"#);
        assert!(
            e.starts_with("field Backend: missing: flannel then uses its udp backend"),
            "{e}"
        );
    }

    #[test]
    fn rejects_other_backends() {
        for t in ["udp", "host-gw", "wireguard", "VXLAN"] {
            let e = err_of(&format!(
                r#"{{"Network":"10.1.0.0/16","Backend":{{"Type":"{t}"}}}}"#
            ));
            assert!(
                e.starts_with(&format!("field Backend.Type: \"{t}\" is not supported")),
                "{e}"
            );
        }
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":{}}"#);
        assert!(e.starts_with("field Backend.Type: missing"), "{e}");
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":"vxlan"}"#);
        assert!(e.starts_with("field Backend: expected an object"), "{e}");
    }

    #[test]
    fn rejects_bad_backend_values() {
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#);
        assert!(
            e.starts_with("field Backend.VNI: 16777216 does not fit in 24 bits"),
            "{e}"
        );
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Port":65536}}"#);
        assert!(e.starts_with("field Backend.Port: 65536"), "{e}");
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":20}}"#);
        assert!(e.starts_with("field Backend.MTU: 20"), "{e}");
        let e = err_of(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":"yes"}}"#);
        assert!(
            e.starts_with("field Backend.GBP: expected true or false"),
            "{e}"
        );
    }

    #[test]
    fn rejects_ipv6_and_ipv6_only() {
        let e = err_of(
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field EnableIPv6: true (dual stack) is not supported"),
            "{e}"
        );
        let e =
            err_of(r#"{"Network":"10.1.0.0/16","EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#);
        assert!(e.starts_with("field EnableIPv4: false"), "{e}");
    }

    #[test]
    fn subnets_iterates_min_to_max() {
        let c = parse(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.13.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let all: Vec<_> = c.subnets().collect();
        assert_eq!(
            all,
            [
                "10.1.10.0/24",
                "10.1.11.0/24",
                "10.1.12.0/24",
                "10.1.13.0/24"
            ]
            .map(net)
        );
        let c = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnets().count(), 255);
    }

    #[test]
    fn contains_subnet_checks_len_alignment_and_range() {
        let c = parse(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.13.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert!(c.contains_subnet(net("10.1.10.0/24")));
        assert!(c.contains_subnet(net("10.1.13.0/24")));
        assert!(!c.contains_subnet(net("10.1.9.0/24")));
        assert!(!c.contains_subnet(net("10.1.14.0/24")));
        assert!(!c.contains_subnet(net("10.1.10.0/25")));
        assert!(!c.contains_subnet(net("10.1.10.0/23")));
        assert!(!c.contains_subnet(net("10.1.10.5/24")));
        assert!(!c.contains_subnet(net("10.2.10.0/24")));
    }

    #[test]
    fn config_key_joins_prefix() {
        assert_eq!(
            config_key("/coreos.com/network"),
            "/coreos.com/network/config"
        );
        assert_eq!(
            config_key("/coreos.com/network/"),
            "/coreos.com/network/config"
        );
    }

    #[test]
    fn unsupported_backend_features_are_refused() {
        for (json, field) in [
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
                "field Backend.GBP: VXLAN group-based policy is not supported",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","directRouting":true}}"#,
                "field Backend.DirectRouting: direct routing is not supported",
            ),
        ] {
            let e = err_of(json);
            assert!(e.starts_with(field), "{json}: {e}");
        }
        // false is what the dataplane does: accepted.
        parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":false,"DirectRouting":false}}"#)
            .unwrap();
    }

    #[test]
    fn node_port_range_is_our_extension() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.node_port_range, None);
        let c = parse(
            r#"{"Network":"10.244.0.0/16","NodePortRange":"31000-31999","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.node_port_range,
            Some(NodePortRange {
                min: 31000,
                max: 31999
            })
        );
        for bad in ["31000", "32000-31000", "0-10", "a-b", "1-70000"] {
            let e = parse(&format!(
                r#"{{"Network":"10.244.0.0/16","NodePortRange":"{bad}","Backend":{{"Type":"vxlan"}}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("field NodePortRange: "), "{bad}: {e}");
        }
    }

    #[test]
    fn service_cidr_is_our_extension() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.service_cidr, None);
        let c = parse(
            r#"{"Network":"10.244.0.0/16","ServiceCIDR":"10.100.0.0/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.service_cidr, Some("10.100.0.0/16".parse().unwrap()));
        // Case-insensitive like flannel's fields; host bits dropped.
        let c = parse(
            r#"{"Network":"10.244.0.0/16","serviceCidr":"10.100.3.4/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.service_cidr, Some("10.100.0.0/16".parse().unwrap()));
        let e = err_of(
            r#"{"Network":"10.244.0.0/16","ServiceCIDR":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#,
        );
        assert_eq!(
            e,
            "field ServiceCIDR: 10.0.0.0/8 overlaps Network 10.244.0.0/16: ClusterIPs cannot be pod addresses"
        );
        let e = err_of(
            r#"{"Network":"10.244.0.0/16","ServiceCIDR":"10.96.0.1","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(
            e.starts_with("field ServiceCIDR: \"10.96.0.1\" is not an IPv4 CIDR"),
            "{e}"
        );
        // Changing it at run time needs a restart, like the other fields.
        let running = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let new = parse(
            r#"{"Network":"10.1.0.0/16","ServiceCIDR":"10.96.0.0/12","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let msgs = unapplied_changes(&running, &new);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            msgs[0].starts_with("ServiceCIDR changed from unset to 10.96.0.0/12 at run time"),
            "{}",
            msgs[0]
        );
    }

    #[test]
    fn runtime_changes_are_named_field_by_field() {
        let running = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(
            unapplied_changes(&running, &running.clone()),
            Vec::<String>::new()
        );
        let new =
            parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":7,"Port":4789}}"#)
                .unwrap();
        let msgs = unapplied_changes(&running, &new);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].starts_with("Backend.VNI changed from 1 to 7 at run time: not applied"),
            "{}",
            msgs[0]
        );
        assert!(
            msgs[1].starts_with("Backend.Port changed from 8472 to 4789 at run time: not applied"),
            "{}",
            msgs[1]
        );
    }
}
