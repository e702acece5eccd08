//! `dataplane conntrack list|flush`: flows as rows (kind, client,
//! frontend, backend, state, age, idle, Service), the Service named
//! through etcd when it is reachable (a flow's forward key is its
//! frontend: ClusterIP, port, protocol), by its frontend and service id
//! otherwise. Masqueraded flows (kind `masq`) show the pod as client, the
//! destination as frontend and backend, and the address and port they
//! leave with as `nat`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use dataplane_common::{
    CtKey, PROTO_TCP,
    ct::{self, CT_F_MIGRATED, CT_F_NORTH_SOUTH, CT_F_PICKED_UP, CtState, CtTimeouts},
    masq::{MASQ_F_INBOUND, MASQ_F_SERVICE, PROTO_ICMP},
};
use serde::Serialize;

use crate::{
    bpf::{CtTable, Flow, MapError, MasqFlow},
    services::{Frontend, Proto, ServiceName, ServiceStore},
};

/// Frontend -> Service, from the Services in etcd.
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    by_frontend: BTreeMap<Frontend, ServiceName>,
}

impl ServiceIndex {
    pub fn new(store: &ServiceStore) -> ServiceIndex {
        let mut by_frontend = BTreeMap::new();
        for name in store.service_names() {
            for f in store.frontends_for(name, &|_| true).into_keys() {
                by_frontend.insert(f, name.clone());
            }
        }
        ServiceIndex { by_frontend }
    }

    /// The Service a flow's forward key is a connection to: its frontend,
    /// or a nodePort (on any address of the node, so listed under the
    /// unspecified address).
    pub fn service_of(&self, key: &CtKey) -> Option<&ServiceName> {
        let f = frontend_of(key)?;
        self.by_frontend.get(&f).or_else(|| {
            self.by_frontend.get(&Frontend {
                ip: Ipv4Addr::UNSPECIFIED,
                ..f
            })
        })
    }

    /// Whether `name` is a known Service.
    pub fn knows(&self, name: &ServiceName) -> bool {
        self.by_frontend.values().any(|n| n == name)
    }
}

fn frontend_of(key: &CtKey) -> Option<Frontend> {
    let proto = match key.proto {
        PROTO_TCP => Proto::Tcp,
        dataplane_common::PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    Some(Frontend {
        ip: Ipv4Addr::from(key.daddr),
        port: u16::from_be_bytes(key.dport),
        proto,
    })
}

/// One flow as `dataplane conntrack list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    /// `service` (a ClusterIP flow), `north-south` (to a nodePort,
    /// externalIP or LoadBalancer IP from outside) or `masq` (a
    /// masqueraded flow).
    pub kind: &'static str,
    pub proto: &'static str,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// Source address written for hairpin flows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<Ipv4Addr>,
    pub state: &'static str,
    /// Seconds since the entry was made (or migrated).
    pub age_s: u64,
    /// Seconds since its last packet (to within a second).
    pub idle_s: u64,
    /// Seconds until it expires unless a packet comes.
    pub expires_in_s: u64,
    pub svc_id: u32,
    /// `namespace/name`, when etcd was reachable and knows the frontend.
    pub service: Option<String>,
    /// The address and port a masqueraded or NodePort-SNATed flow leaves
    /// with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<SocketAddrV4>,
    /// `picked-up` (mid-stream, no SYN seen), `migrated` (from ct_v1),
    /// `service-backend` (a masqueraded Service flow to a backend outside
    /// the cluster network), `inbound, not translated` (UDP from outside
    /// straight to a pod: its answers leave unmasqueraded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<&'static str>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_ICMP => "ICMP",
        _ => "UDP",
    }
}

fn masq_row(f: &MasqFlow, now_ns: u64, t: &CtTimeouts) -> FlowRow {
    let (k, e) = (&f.key, &f.entry);
    let state = CtState::from_u8(e.state);
    let idle = ct::idle_ns(e.last_seen_ns, now_ns);
    let timeout_ns = state.map_or(0, |s| u64::from(t.secs(s)) * 1_000_000_000);
    let mut notes = Vec::new();
    if e.flags & MASQ_F_SERVICE != 0 {
        notes.push("service-backend");
    }
    if e.flags & MASQ_F_INBOUND != 0 {
        notes.push("inbound, not translated");
    }
    FlowRow {
        kind: "masq",
        proto: proto_name(k.proto),
        client: sock(k.saddr, k.sport),
        frontend: sock(k.daddr, k.dport),
        backend: sock(k.daddr, k.dport),
        snat: None,
        state: state.map_or("unknown", CtState::name),
        age_s: ct::idle_ns(e.created_ns, now_ns) / 1_000_000_000,
        idle_s: idle / 1_000_000_000,
        expires_in_s: timeout_ns.saturating_sub(idle) / 1_000_000_000,
        svc_id: 0,
        service: None,
        nat: Some(sock(e.nat_addr, e.nat_port)),
        notes,
    }
}

fn sock(ip: [u8; 4], port: [u8; 2]) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), u16::from_be_bytes(port))
}

fn row(f: &Flow, now_ns: u64, t: &CtTimeouts, services: Option<&ServiceIndex>) -> FlowRow {
    let (k, e) = (&f.key, &f.entry);
    let state = CtState::from_u8(e.state);
    let idle = ct::idle_ns(e.last_seen_ns, now_ns);
    let timeout_ns = state.map_or(0, |s| u64::from(t.secs(s)) * 1_000_000_000);
    let mut notes = Vec::new();
    if e.flags & CT_F_PICKED_UP != 0 {
        notes.push("picked-up");
    }
    if e.flags & CT_F_MIGRATED != 0 {
        notes.push("migrated");
    }
    let north_south = e.flags & CT_F_NORTH_SOUTH != 0;
    FlowRow {
        kind: if north_south {
            "north-south"
        } else {
            "service"
        },
        proto: proto_name(k.proto),
        client: sock(k.saddr, k.sport),
        frontend: sock(k.daddr, k.dport),
        backend: sock(e.backend.ip, e.backend.port),
        snat: (e.snat != [0; 4]).then(|| Ipv4Addr::from(e.snat)),
        state: state.map_or("unknown", CtState::name),
        age_s: ct::idle_ns(e.created_ns, now_ns) / 1_000_000_000,
        idle_s: idle / 1_000_000_000,
        expires_in_s: timeout_ns.saturating_sub(idle) / 1_000_000_000,
        svc_id: e.svc_id,
        service: services
            .and_then(|s| s.service_of(k))
            .map(|n| n.to_string()),
        // An externalTrafficPolicy Cluster flow leaves with the gateway
        // address and a NAT port.
        nat: (e.snat_port != [0; 2]).then(|| sock(e.snat, e.snat_port)),
        notes,
    }
}

/// The flows of the table, live ones only (an expired entry the sweeper
/// has not removed yet is absent to the data path too), optionally only
/// those of `only` (Service flows, then), sorted by kind, frontend, then
/// client; masqueraded flows follow the Service flows.
pub fn rows(
    table: &CtTable,
    now_ns: u64,
    timeouts: &CtTimeouts,
    services: Option<&ServiceIndex>,
    only: Option<&ServiceName>,
) -> Result<Vec<FlowRow>, MapError> {
    let mut out: Vec<FlowRow> = table
        .flows()?
        .iter()
        .filter(|f| !ct::is_expired(f.entry.state, f.entry.last_seen_ns, now_ns, timeouts))
        .filter(|f| matches_service(f, services, only))
        .map(|f| row(f, now_ns, timeouts, services))
        .collect();
    out.sort_by_key(|r| (r.frontend, r.client, r.proto));
    if only.is_none() {
        let mut masq: Vec<FlowRow> = table
            .masq_flows()?
            .iter()
            .filter(|f| !ct::is_expired(f.entry.state, f.entry.last_seen_ns, now_ns, timeouts))
            .map(|f| masq_row(f, now_ns, timeouts))
            .collect();
        masq.sort_by_key(|r| (r.frontend, r.client, r.proto));
        out.extend(masq);
    }
    Ok(out)
}

fn matches_service(f: &Flow, services: Option<&ServiceIndex>, only: Option<&ServiceName>) -> bool {
    match only {
        None => true,
        Some(name) => services.and_then(|s| s.service_of(&f.key)) == Some(name),
    }
}

/// Removes the flows (both directions) of `only`, or all; returns how
/// many, and counts them as `ct_flushed`.
pub fn flush(
    table: &mut CtTable,
    services: Option<&ServiceIndex>,
    only: Option<&ServiceName>,
) -> Result<u64, MapError> {
    let mut n = 0;
    for f in table.flows()? {
        if matches_service(&f, services, only) {
            table.remove_flow(&f)?;
            n += 1;
        }
    }
    table.add_gc_counter(ct::CtGc::Flushed, n)?;
    if only.is_none() {
        let mut m = 0;
        for f in table.masq_flows()? {
            table.remove_masq_flow(&f)?;
            m += 1;
        }
        table.add_gc_counter(ct::CtGc::MasqFlushed, m)?;
        n += m;
    }
    Ok(n)
}

/// The rows as a table for a terminal.
pub fn render(rows: &[FlowRow]) -> String {
    let mut s = format!(
        "{:<11} {:<5} {:<21} {:<21} {:<21} {:<13} {:>8} {:>8} {:>8}  SERVICE\n",
        "KIND", "PROTO", "CLIENT", "FRONTEND", "BACKEND", "STATE", "AGE(s)", "IDLE(s)", "EXP(s)"
    );
    for r in rows {
        let service = match (&r.service, r.nat) {
            (Some(s), _) => s.clone(),
            (None, Some(nat)) => format!("(leaves as {nat})"),
            (None, None) => format!("(svc id {})", r.svc_id),
        };
        let mut line = format!(
            "{:<11} {:<5} {:<21} {:<21} {:<21} {:<13} {:>8} {:>8} {:>8}  {service}",
            r.kind,
            r.proto,
            r.client.to_string(),
            r.frontend.to_string(),
            r.backend.to_string(),
            r.state,
            r.age_s,
            r.idle_s,
            r.expires_in_s
        );
        match (r.snat, r.nat) {
            (Some(_), Some(nat)) if r.service.is_some() => {
                line.push_str(&format!(" (source {nat})"))
            }
            (Some(snat), _) => line.push_str(&format!(" (source {snat})")),
            _ => {}
        }
        for n in &r.notes {
            line.push_str(&format!(" [{n}]"));
        }
        s.push_str(&line);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use dataplane_common::{Backend, CtEntry, ct::CT_F_SEEN_REPLY};

    use super::*;

    #[test]
    fn a_row_shows_the_flow_and_its_clock() {
        let s = 1_000_000_000u64;
        let f = Flow {
            key: CtKey {
                saddr: [10, 244, 1, 5],
                daddr: [10, 96, 0, 10],
                sport: 40000u16.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: PROTO_TCP,
                _pad: [0; 3],
            },
            entry: CtEntry {
                backend: Backend {
                    ip: [10, 244, 2, 7],
                    port: 8080u16.to_be_bytes(),
                    _pad: [0; 2],
                },
                snat: [0; 4],
                svc_id: 4,
                created_ns: 100 * s,
                last_seen_ns: 150 * s,
                state: CtState::TimeWait as u8,
                flags: CT_F_SEEN_REPLY | CT_F_PICKED_UP,
                snat_port: [0; 2],
                _pad: [0; 4],
            },
        };
        let r = row(&f, 160 * s, &CtTimeouts::default(), None);
        assert_eq!(r.client.to_string(), "10.244.1.5:40000");
        assert_eq!(r.frontend.to_string(), "10.96.0.10:80");
        assert_eq!(r.backend.to_string(), "10.244.2.7:8080");
        assert_eq!(r.state, "time_wait");
        assert_eq!((r.age_s, r.idle_s, r.expires_in_s), (60, 10, 110));
        assert_eq!(r.notes, ["picked-up"]);
        assert_eq!(r.service, None);
        let text = render(&[r]);
        assert!(text.contains("(svc id 4)"), "{text}");
    }

    #[test]
    fn a_node_port_flow_names_its_service_and_nat() {
        let objs = crate::services::manifest::parse_manifests(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: NodePort\n  \
             clusterIP: 10.96.0.10\n  ports:\n  - {port: 80, nodePort: 30080}\n",
        )
        .unwrap();
        let index = ServiceIndex::new(&ServiceStore::from_objects(&objs));
        let f = Flow {
            key: CtKey {
                saddr: [203, 0, 113, 10],
                daddr: [192, 168, 100, 11],
                sport: 50000u16.to_be_bytes(),
                dport: 30080u16.to_be_bytes(),
                proto: PROTO_TCP,
                _pad: [0; 3],
            },
            entry: CtEntry {
                backend: Backend {
                    ip: [10, 244, 2, 7],
                    port: 80u16.to_be_bytes(),
                    _pad: [0; 2],
                },
                snat: [10, 244, 1, 1],
                svc_id: 5,
                created_ns: 0,
                last_seen_ns: 0,
                state: CtState::Established as u8,
                flags: CT_F_NORTH_SOUTH,
                snat_port: 61000u16.to_be_bytes(),
                _pad: [0; 4],
            },
        };
        let r = row(&f, 0, &CtTimeouts::default(), Some(&index));
        assert_eq!(r.kind, "north-south");
        assert_eq!(r.service.as_deref(), Some("default/web"));
        assert_eq!(
            r.nat.map(|n| n.to_string()).as_deref(),
            Some("10.244.1.1:61000")
        );
        assert!(matches_service(
            &f,
            Some(&index),
            Some(&ServiceName::new("default", "web"))
        ));
    }
}
