//! Semantic checks on Services, Endpoints and EndpointSlices, after serde
//! has accepted their shape.
//!
//! The rules are the subset of the API server's validation that matters to
//! the data path (addresses, ports, protocols, names that become etcd key
//! segments), plus what this dataplane does not implement (SCTP, IPv6
//! ClusterIPs, ClusterIP allocation), so that an object is refused when it
//! is applied rather than silently ignored on every node. The same checks
//! run again on values read back from etcd, where anyone with etcdctl could
//! have written anything.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::object::{Proto, SERVICE_NAME_LABEL};

/// One problem, at a field path such as `spec.ports[0].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub path: String,
    pub message: String,
}

/// The API server's session affinity timeout default: 3 hours.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The API server's upper bound for that timeout: one day.
const MAX_AFFINITY_TIMEOUT_SECS: i32 = 86_400;

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// What a Service's `spec.clusterIP` means to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClusterIp {
    /// An IPv4 address: the service gets frontends.
    V4(Ipv4Addr),
    /// `None`: headless, no frontends (DNS-only in Kubernetes).
    Headless,
}

/// Interprets `spec.clusterIP`; `Err` says what is wrong with it.
pub(crate) fn cluster_ip(spec: &ServiceSpec) -> Result<ClusterIp, String> {
    match spec.cluster_ip.as_deref() {
        None | Some("") => Err(
            "required: this dataplane does not allocate ClusterIPs; set an \
             IPv4 address from the service CIDR, or \"None\" for a headless service"
                .into(),
        ),
        Some("None") => Ok(ClusterIp::Headless),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                if ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_broadcast()
                    || ip.is_link_local()
                {
                    Err(format!("{s} cannot be a ClusterIP (reserved address)"))
                } else {
                    Ok(ClusterIp::V4(ip))
                }
            }
            Ok(IpAddr::V6(_)) => Err(format!(
                "{s} is IPv6; this dataplane serves IPv4 ClusterIPs only"
            )),
            Err(_) => Err(format!("{s:?} is not an IPv4 address (nor \"None\")")),
        },
    }
}

/// `protocol` of a port: TCP when absent, as the API server defaults it.
pub(crate) fn protocol(p: Option<&str>) -> Result<Proto, String> {
    match p {
        None | Some("TCP") => Ok(Proto::Tcp),
        Some("UDP") => Ok(Proto::Udp),
        Some("SCTP") => Err("SCTP is not supported by this dataplane (only TCP and UDP)".into()),
        Some(other) => Err(format!(
            "unsupported protocol {other:?}: must be TCP or UDP (case matters)"
        )),
    }
}

/// A port number 1..=65535.
pub(crate) fn port_number(p: i32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(format!("{p} is not a valid port number (1-65535)")),
    }
}

/// The session affinity timeout of a Service whose `sessionAffinity` is
/// ClientIP (default 10800 s); `None` when affinity is off.
pub(crate) fn affinity_timeout_secs(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    Some(match t {
        Some(t) if t > 0 => t.unsigned_abs(),
        _ => DEFAULT_AFFINITY_TIMEOUT_SECS,
    })
}

/// RFC 1123 label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1035 label (what Service names must be): an RFC 1123 label that
/// starts with a letter.
pub(crate) fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA service name (a named `targetPort`): 1-15 of `a-z0-9-`, at least
/// one letter, no `-` at either end nor `--`.
pub(crate) fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// `metadata.name` and `metadata.namespace`: they become etcd key segments.
fn metadata(meta: &ObjectMeta, name_ok: fn(&str) -> bool, rule: &str, errs: &mut Errors) {
    match meta.name.as_deref() {
        None | Some("") => errs.add("metadata.name", "required"),
        Some(n) if !name_ok(n) => errs.add("metadata.name", format!("{n:?} is not {rule}")),
        Some(_) => {}
    }
    if meta.name.is_none() && meta.generate_name.is_some() {
        errs.add(
            "metadata.generateName",
            "not supported: there is no API server to generate a name; set metadata.name",
        );
    }
    if let Some(ns) = meta.namespace.as_deref()
        && !is_dns1123_label(ns)
    {
        errs.add(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace (lowercase RFC 1123 label)"),
        );
    }
}

/// Checks a Service.
pub(crate) fn service(svc: &Service) -> Vec<FieldError> {
    let mut errs = Errors::default();
    metadata(
        &svc.metadata,
        is_dns1035_label,
        "a valid Service name (lowercase RFC 1035 label: letters, digits and '-', starting with a letter, at most 63)",
        &mut errs,
    );
    let Some(spec) = &svc.spec else {
        errs.add("spec", "required");
        return errs.0;
    };

    let external_name = match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => false,
        Some("ExternalName") => true,
        Some(t) => {
            errs.add(
                "spec.type",
                format!(
                    "unsupported value {t:?}: must be ClusterIP, NodePort, LoadBalancer or ExternalName"
                ),
            );
            false
        }
    };

    let headless = if external_name {
        // An ExternalName service is a DNS alias: no ClusterIP, no frontends.
        if let Some(ip) = spec.cluster_ip.as_deref()
            && !ip.is_empty()
            && ip != "None"
        {
            errs.add(
                "spec.clusterIP",
                "must not be set for type ExternalName (it has no ClusterIP)",
            );
        }
        true
    } else {
        match cluster_ip(spec) {
            Ok(ClusterIp::Headless) => true,
            Ok(ClusterIp::V4(ip)) => {
                if let Some(first) = spec.cluster_ips.as_ref().and_then(|v| v.first())
                    && first.parse::<Ipv4Addr>().ok() != Some(ip)
                {
                    errs.add(
                        "spec.clusterIPs[0]",
                        format!("{first:?} must equal spec.clusterIP ({ip})"),
                    );
                }
                false
            }
            Err(e) => {
                errs.add("spec.clusterIP", e);
                false
            }
        }
    };

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless {
        errs.add(
            "spec.ports",
            "required: a ClusterIP service needs at least one port",
        );
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        match p.name.as_deref() {
            None | Some("") if ports.len() > 1 => errs.add(
                format!("{at}.name"),
                "required when a service has more than one port",
            ),
            None | Some("") => {}
            Some(n) => {
                if !is_dns1123_label(n) {
                    errs.add(
                        format!("{at}.name"),
                        format!("{n:?} is not a valid port name (lowercase RFC 1123 label)"),
                    );
                }
                if !names.insert(n) {
                    errs.add(format!("{at}.name"), format!("duplicate port name {n:?}"));
                }
            }
        }
        // A missing `port` deserializes as 0.
        let port = if p.port == 0 {
            errs.add(format!("{at}.port"), "required: a port number 1-65535");
            Err(())
        } else {
            port_number(p.port).map_err(|e| errs.add(format!("{at}.port"), e))
        };
        let proto =
            protocol(p.protocol.as_deref()).map_err(|e| errs.add(format!("{at}.protocol"), e));
        if let (Ok(port), Ok(proto)) = (port, proto)
            && !seen.insert((port, proto))
        {
            errs.add(at.clone(), format!("duplicate port {port}/{proto}"));
        }
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(n)) => {
                if let Err(e) = port_number(*n) {
                    errs.add(format!("{at}.targetPort"), e);
                }
            }
            Some(IntOrString::String(s)) if !is_iana_svc_name(s) => errs.add(
                format!("{at}.targetPort"),
                format!(
                    "{s:?} is neither a port number nor a valid port name \
                     (1-15 lowercase letters, digits and '-', with at least one letter)"
                ),
            ),
            Some(IntOrString::String(_)) => {}
        }
    }

    north_south(svc, &mut errs);

    match spec.session_affinity.as_deref() {
        None | Some("None") => {
            if spec
                .session_affinity_config
                .as_ref()
                .is_some_and(|c| c.client_ip.is_some())
            {
                errs.add(
                    "spec.sessionAffinityConfig",
                    "must not be set when spec.sessionAffinity is None",
                );
            }
        }
        Some("ClientIP") => {
            if let Some(t) = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                && !(1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t)
            {
                errs.add(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is out of range (1-{MAX_AFFINITY_TIMEOUT_SECS})"),
                );
            }
        }
        Some(other) => errs.add(
            "spec.sessionAffinity",
            format!("unsupported value {other:?}: must be None or ClientIP"),
        ),
    }

    match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster" | "Local") => {}
        Some(other) => errs.add(
            "spec.internalTrafficPolicy",
            format!("unsupported value {other:?}: must be Cluster or Local"),
        ),
    }
    errs.0
}

/// Checks a port list of an Endpoints subset or an EndpointSlice: numbers,
/// protocols, and names unique (they are how service ports find them).
fn endpoint_ports<'a>(
    ports: impl ExactSizeIterator<Item = (Option<&'a str>, Option<i32>, Option<&'a str>)>,
    at: &str,
    errs: &mut Errors,
) {
    let mut names = BTreeSet::new();
    for (i, (name, port, proto)) in ports.enumerate() {
        let at = format!("{at}[{i}]");
        let name = name.unwrap_or_default();
        if !name.is_empty() && !is_dns1123_label(name) {
            errs.add(
                format!("{at}.name"),
                format!("{name:?} is not a valid port name (lowercase RFC 1123 label)"),
            );
        }
        if !names.insert(name) {
            errs.add(
                format!("{at}.name"),
                format!("duplicate port name {name:?}"),
            );
        }
        if let Some(p) = port
            && let Err(e) = port_number(p)
        {
            errs.add(format!("{at}.port"), e);
        }
        if let Err(e) = protocol(proto) {
            errs.add(format!("{at}.protocol"), e);
        }
    }
}

/// Checks an Endpoints object.
pub(crate) fn endpoints(ep: &Endpoints) -> Vec<FieldError> {
    let mut errs = Errors::default();
    metadata(
        &ep.metadata,
        is_dns1123_subdomain,
        "a valid name (lowercase RFC 1123 subdomain)",
        &mut errs,
    );
    for (i, subset) in ep.subsets.iter().flatten().enumerate() {
        for (field, list) in [
            ("addresses", &subset.addresses),
            ("notReadyAddresses", &subset.not_ready_addresses),
        ] {
            for (j, a) in list.iter().flatten().enumerate() {
                if a.ip.is_empty() {
                    errs.add(format!("subsets[{i}].{field}[{j}].ip"), "required");
                } else if a.ip.parse::<IpAddr>().is_err() {
                    errs.add(
                        format!("subsets[{i}].{field}[{j}].ip"),
                        format!("{:?} is not an IP address", a.ip),
                    );
                }
            }
        }
        let ports = subset.ports.as_deref().unwrap_or_default();
        endpoint_ports(
            ports
                .iter()
                .map(|p| (p.name.as_deref(), Some(p.port), p.protocol.as_deref())),
            &format!("subsets[{i}].ports"),
            &mut errs,
        );
    }
    errs.0
}

/// Checks an EndpointSlice.
pub(crate) fn endpoint_slice(slice: &EndpointSlice) -> Vec<FieldError> {
    let mut errs = Errors::default();
    metadata(
        &slice.metadata,
        is_dns1123_subdomain,
        "a valid name (lowercase RFC 1123 subdomain)",
        &mut errs,
    );
    let family: Option<fn(&str) -> bool> = match slice.address_type.as_str() {
        "IPv4" => Some(|s| s.parse::<Ipv4Addr>().is_ok()),
        "IPv6" => Some(|s| s.parse::<Ipv6Addr>().is_ok()),
        "FQDN" => None,
        "" => {
            errs.add("addressType", "required: must be IPv4, IPv6 or FQDN");
            None
        }
        other => {
            errs.add(
                "addressType",
                format!("unsupported value {other:?}: must be IPv4, IPv6 or FQDN"),
            );
            None
        }
    };
    for (i, e) in slice.endpoints.iter().flatten().enumerate() {
        if e.addresses.is_empty() {
            errs.add(
                format!("endpoints[{i}].addresses"),
                "must have at least one address",
            );
        }
        if let Some(ok) = family {
            for (j, a) in e.addresses.iter().enumerate() {
                if !ok(a) {
                    errs.add(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an {} address", slice.address_type),
                    );
                }
            }
        }
    }
    let ports = slice.ports.as_deref().unwrap_or_default();
    endpoint_ports(
        ports
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref())),
        "ports",
        &mut errs,
    );
    if let Some(labels) = &slice.metadata.labels
        && let Some(svc) = labels.get(SERVICE_NAME_LABEL)
        && !is_dns1035_label(svc)
    {
        errs.add(
            format!("metadata.labels[{}]", SERVICE_NAME_LABEL),
            format!("{svc:?} is not a valid Service name"),
        );
    }
    errs.0
}

/// An address a client outside the cluster can use: IPv4, not
/// unspecified, loopback, link-local, multicast or broadcast.
fn external_ip(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address (IPv4 only)"))?;
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
    {
        return Err(format!(
            "{ip} cannot be reached from outside (unspecified, loopback, link-local, multicast or broadcast)"
        ));
    }
    Ok(ip)
}

/// nodePorts, externalIPs, LoadBalancer ingress IPs and
/// externalTrafficPolicy, as the API server checks them.
fn north_south(svc: &Service, errs: &mut Errors) {
    let Some(spec) = &svc.spec else { return };
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Some(n) = p.node_port else { continue };
        let at = format!("spec.ports[{i}].nodePort");
        if !node_ports {
            errs.add(
                at,
                format!(
                    "may not be used when spec.type is {}",
                    spec.type_.as_deref().unwrap_or("ClusterIP")
                ),
            );
        } else if let Err(e) = port_number(n) {
            errs.add(at, e);
        }
    }
    let mut seen = BTreeSet::new();
    for (i, x) in spec.external_ips.iter().flatten().enumerate() {
        match external_ip(x) {
            Ok(ip) if !seen.insert(ip) => {
                errs.add(format!("spec.externalIPs[{i}]"), format!("duplicate {ip}"))
            }
            Ok(_) => {}
            Err(e) => errs.add(format!("spec.externalIPs[{i}]"), e),
        }
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, g) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = g.ip.as_deref()
            && let Err(e) = external_ip(ip)
        {
            errs.add(format!("status.loadBalancer.ingress[{i}].ip"), e);
        }
    }
    if let Some(hc) = spec.health_check_node_port {
        let at = "spec.healthCheckNodePort";
        if spec.type_.as_deref() != Some("LoadBalancer")
            || spec.external_traffic_policy.as_deref() != Some("Local")
        {
            errs.add(
                at,
                "may only be set when spec.type is LoadBalancer and spec.externalTrafficPolicy is Local",
            );
        } else if let Err(e) = port_number(hc) {
            errs.add(at, e);
        }
    }
    let has_external = node_ports || spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => {}
        Some("Local") if has_external => {}
        Some("Local") => errs.add(
            "spec.externalTrafficPolicy",
            "may only be Local for a NodePort or LoadBalancer Service, or one with externalIPs",
        ),
        Some(other) => errs.add(
            "spec.externalTrafficPolicy",
            format!("unsupported value {other:?}: must be Cluster or Local"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_label("my-service"));
        assert!(is_dns1123_label("1abc"));
        assert!(!is_dns1123_label("My-service"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("a/b"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1035_label("a1"));
        assert!(!is_dns1035_label("1a"));
        assert!(is_dns1123_subdomain("my-service-abc.x"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_iana_svc_name("http-web"));
        assert!(!is_iana_svc_name("80"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(!is_iana_svc_name("abcdefghijklmnop"));
    }

    #[test]
    fn protocols_and_ports() {
        assert_eq!(protocol(None), Ok(Proto::Tcp));
        assert_eq!(protocol(Some("UDP")), Ok(Proto::Udp));
        assert!(
            protocol(Some("SCTP"))
                .unwrap_err()
                .contains("SCTP is not supported")
        );
        assert!(protocol(Some("tcp")).is_err());
        assert_eq!(port_number(65535), Ok(65535));
        assert!(port_number(0).is_err());
        assert!(port_number(65536).is_err());
        assert!(port_number(-1).is_err());
    }
}
