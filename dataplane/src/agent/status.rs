//! The agent's side of `dataplane status`: it keeps what only it knows
//! (peers and since when, Services and their backends) as the events come,
//! and writes the status record ([`crate::status::record`]) at most once
//! a second after a change, and at every tick anyway, so that a reader
//! can tell a stale record from a live one.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use ipnet::Ipv4Net;
use log::warn;

use crate::{
    lease::format_mac,
    metrics,
    peers::PeerChange,
    services::ServiceName,
    status::record::{
        EtcdRecord, LeaseRecord, NodeRecord, PeerRecord, ServiceRecord, StatusRecord, VERSION,
        process_start_ticks, record_path, unix_ms,
    },
};

/// Changes are written at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A peer as the record shows it.
struct Peer {
    public_ip: Ipv4Addr,
    vtep_mac: [u8; 6],
    since: SystemTime,
}

/// A Service's line.
#[derive(Clone, Copy)]
struct Svc {
    frontends: usize,
    ready: usize,
    total: usize,
}

/// What the record holds besides this node's facts (passed at write time).
pub struct StatusWriter {
    path: PathBuf,
    pin_path: PathBuf,
    endpoints: Vec<String>,
    started: SystemTime,
    start_ticks: u64,
    peers: BTreeMap<Ipv4Net, Peer>,
    services: BTreeMap<ServiceName, Svc>,
    dirty: bool,
    last_write: Option<Instant>,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
}

impl StatusWriter {
    pub fn new(pin_path: PathBuf, endpoints: Vec<String>) -> StatusWriter {
        StatusWriter {
            path: record_path(&pin_path),
            pin_path,
            endpoints,
            started: SystemTime::now(),
            start_ticks: process_start_ticks(std::process::id()).unwrap_or(0),
            peers: BTreeMap::new(),
            services: BTreeMap::new(),
            dirty: true,
            last_write: None,
            failing: false,
        }
    }

    /// A peer added, changed or removed (not this node's own subnet).
    pub fn peer_changed(&mut self, c: &PeerChange, own: Ipv4Net) {
        match c {
            PeerChange::Added(net, a)
            | PeerChange::Changed {
                subnet: net,
                new: a,
                ..
            } => {
                if *net != own {
                    self.peers.insert(
                        *net,
                        Peer {
                            public_ip: a.public_ip,
                            vtep_mac: a.vtep_mac,
                            since: SystemTime::now(),
                        },
                    );
                }
            }
            PeerChange::Removed(net, _) => {
                self.peers.remove(net);
            }
        }
        self.dirty = true;
    }

    /// Rebuilds the trees with full nodes ([`crate::compact`]).
    pub fn compact(&mut self) {
        use crate::compact::rebuilt;
        self.peers = rebuilt(std::mem::take(&mut self.peers));
        self.services = rebuilt(std::mem::take(&mut self.services));
    }

    /// This node's subnet changed: it is no peer of its own.
    pub fn own_subnet(&mut self, own: Ipv4Net) {
        self.peers.remove(&own);
        self.dirty = true;
    }

    /// A Service programmed with `frontends` frontends (0: it has none on
    /// this node any more) and its endpoint addresses.
    pub fn service(&mut self, name: &ServiceName, frontends: usize, ready: usize, total: usize) {
        if frontends == 0 {
            self.dirty |= self.services.remove(name).is_some();
            return;
        }
        self.services.insert(
            name.clone(),
            Svc {
                frontends,
                ready,
                total,
            },
        );
        self.dirty = true;
    }

    /// Whether a write is due: changes older than [`MIN_INTERVAL`], or
    /// `force` (the tick).
    pub fn due(&self, force: bool) -> bool {
        force || (self.dirty && self.last_write.is_none_or(|t| t.elapsed() >= MIN_INTERVAL))
    }

    /// The record as of now.
    pub fn record(&self, node: NodeRecord, lease_held: bool, errors: u64) -> StatusRecord {
        let m = metrics::global();
        StatusRecord {
            version: VERSION,
            pid: std::process::id(),
            start_ticks: self.start_ticks,
            started_at_ms: unix_ms(self.started),
            written_at_ms: unix_ms(SystemTime::now()),
            pin_path: self.pin_path.display().to_string(),
            node,
            lease: LeaseRecord {
                held: lease_held,
                expires_at_ms: m.lease_expiry().map(unix_ms),
            },
            etcd: EtcdRecord {
                endpoints: self.endpoints.clone(),
                connected: m.etcd_connected(),
                last_event_at_ms: m.last_etcd_event().map(unix_ms),
            },
            not_ready: m
                .missing()
                .into_iter()
                .map(|p| p.describe().to_owned())
                .collect(),
            peers: self
                .peers
                .iter()
                .map(|(net, p)| PeerRecord {
                    subnet: net.to_string(),
                    public_ip: p.public_ip.to_string(),
                    vtep_mac: format_mac(&p.vtep_mac),
                    since_ms: unix_ms(p.since),
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|(name, s)| ServiceRecord {
                    name: name.to_string(),
                    frontends: s.frontends,
                    ready: s.ready,
                    total: s.total,
                })
                .collect(),
            errors,
        }
    }

    /// Writes the record (see [`StatusWriter::due`]); a failure is logged
    /// once, and the next write tries again.
    pub fn write(&mut self, rec: &StatusRecord) {
        self.last_write = Some(Instant::now());
        self.dirty = false;
        match rec.write(&self.path) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(
                        "writing the status record {}: {e} (dataplane status will show an old one)",
                        self.path.display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 77, last),
            backend_type: "vxlan".into(),
            vni: 1,
            vtep_mac: [2, 0, 0, 0, 0, last],
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn writer() -> StatusWriter {
        StatusWriter::new(
            "/tmp/dp-status-writer-test".into(),
            vec!["http://e:2379".into()],
        )
    }

    #[test]
    fn peers_follow_the_changes_and_never_include_this_node() {
        let own = net("10.244.1.0/24");
        let mut w = writer();
        w.peer_changed(&PeerChange::Added(own, attrs(1)), own);
        w.peer_changed(&PeerChange::Added(net("10.244.2.0/24"), attrs(2)), own);
        w.peer_changed(&PeerChange::Added(net("10.244.3.0/24"), attrs(3)), own);
        w.peer_changed(
            &PeerChange::Changed {
                subnet: net("10.244.2.0/24"),
                old: attrs(2),
                new: attrs(9),
            },
            own,
        );
        w.peer_changed(&PeerChange::Removed(net("10.244.3.0/24"), attrs(3)), own);
        let rec = w.record(NodeRecord::default(), true, 0);
        assert_eq!(rec.peers.len(), 1, "{:?}", rec.peers);
        assert_eq!(rec.peers[0].subnet, "10.244.2.0/24");
        assert_eq!(rec.peers[0].public_ip, "192.168.77.9", "the new attributes");
        assert_eq!(rec.peers[0].vtep_mac, "02:00:00:00:00:09");
        assert_eq!(rec.pid, std::process::id());
        assert_eq!(rec.etcd.endpoints, ["http://e:2379"]);
        // Re-numbered onto a subnet that was a peer's.
        w.own_subnet(net("10.244.2.0/24"));
        assert!(w.record(NodeRecord::default(), true, 0).peers.is_empty());
    }

    #[test]
    fn services_without_frontends_here_are_left_out() {
        let mut w = writer();
        let web = ServiceName::new("default", "web");
        let db = ServiceName::new("prod", "db");
        w.service(&web, 2, 1, 3);
        w.service(&db, 1, 0, 0);
        w.service(&web, 2, 3, 3);
        w.service(&db, 0, 0, 0);
        let rec = w.record(NodeRecord::default(), true, 7);
        assert_eq!(
            rec.services,
            [ServiceRecord {
                name: "default/web".into(),
                frontends: 2,
                ready: 3,
                total: 3,
            }]
        );
        assert_eq!(rec.errors, 7);
    }

    #[test]
    fn changes_are_written_at_most_once_a_second_and_the_tick_always_writes() {
        let mut w = writer();
        assert!(w.due(false), "never written");
        w.last_write = Some(Instant::now());
        w.dirty = false;
        assert!(!w.due(false), "nothing changed");
        assert!(w.due(true), "the tick refreshes the record");
        w.service(&ServiceName::new("a", "b"), 1, 1, 1);
        assert!(!w.due(false), "changed, but written just now");
        w.last_write = Some(Instant::now() - MIN_INTERVAL);
        assert!(w.due(false));
    }
}
