//! Watching every node's lease under `<prefix>/subnets/`.
//!
//! [`watch_peers`] follows the directory with
//! [`crate::etcd::list_then_watch`]: a full [`PeerUpdate::Snapshot`], then
//! incremental updates. When the watch breaks (etcd restart, network
//! trouble, compaction) it lists again and sends a new snapshot;
//! [`PeerTable::apply`] turns that into the exact diff, including removals of
//! peers that vanished meanwhile.
//!
//! Unlike flannel, one unparsable entry never costs us the other peers: a bad
//! key or value is logged, counted in [`PeerWatchStats::malformed`] and
//! skipped. The one case where a bad value removes something: a key that
//! held a good lease is overwritten with garbage. The node's real lease is
//! then gone (whoever wrote the garbage destroyed it), and keeping a route
//! to a lease etcd no longer has would leave us out of step with every other
//! node, so we send [`PeerUpdate::Remove`] for that subnet.
//!
//! Entries are keyed by IPv4 subnet. A plain key (`10.244.1.0-24`) and a
//! dual-stack key for the same subnet (`10.244.1.0-24&fd00::-64`) would
//! collide; that does not happen with a sane flannel cluster, and when it
//! does the first one listed wins in a snapshot and the latest write wins
//! while watching.
//!
//! Our own lease is included; the agent filters it out by subnet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Client, KeyValue};
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use crate::etcd::{Event, Prefix, Snapshot, Update, list_then_watch};
use crate::lease::{LeaseAttrs, subnet_in, subnets_dir};

/// What [`watch_peers`] tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerUpdate {
    /// Every valid lease, at one revision. Replaces everything known before.
    Snapshot(BTreeMap<Ipv4Net, LeaseAttrs>),
    /// A lease was created or changed.
    Upsert(Ipv4Net, LeaseAttrs),
    /// A lease was deleted, expired, or overwritten with garbage.
    Remove(Ipv4Net),
}

/// Counters for the peer watch, shared with the agent (metrics, tests).
#[derive(Debug, Default)]
pub struct PeerWatchStats {
    /// Malformed keys or values seen (each observation counts, so an entry
    /// that stays bad is counted again at every re-list).
    pub malformed: AtomicU64,
    /// Watch events received.
    pub events: AtomicU64,
    /// Re-lists after the first snapshot (watch broke or was compacted).
    pub resyncs: AtomicU64,
}

/// One difference between the old and the new peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// A subnet we did not know.
    Added(Ipv4Net, LeaseAttrs),
    /// A known subnet whose attributes changed (new VtepMAC or PublicIP).
    Changed {
        /// The subnet.
        subnet: Ipv4Net,
        /// What we had.
        old: LeaseAttrs,
        /// What it is now.
        new: LeaseAttrs,
    },
    /// A subnet that is gone; carries what it had, so routes can be undone.
    Removed(Ipv4Net, LeaseAttrs),
}

/// The agent's view of all leases, turning [`PeerUpdate`]s into diffs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTable {
    peers: BTreeMap<Ipv4Net, LeaseAttrs>,
}

impl PeerTable {
    /// An empty table.
    pub fn new() -> PeerTable {
        PeerTable::default()
    }

    /// Applies `update` and returns what changed, in subnet order (a
    /// snapshot yields removals first, then additions and changes). Updates
    /// that change nothing return an empty vector.
    pub fn apply(&mut self, update: PeerUpdate) -> Vec<PeerChange> {
        match update {
            PeerUpdate::Upsert(subnet, attrs) => self.upsert(subnet, attrs).into_iter().collect(),
            PeerUpdate::Remove(subnet) => self
                .peers
                .remove(&subnet)
                .map(|old| PeerChange::Removed(subnet, old))
                .into_iter()
                .collect(),
            PeerUpdate::Snapshot(new) => {
                let mut changes = Vec::new();
                let stale: Vec<Ipv4Net> = self
                    .peers
                    .keys()
                    .filter(|s| !new.contains_key(s))
                    .copied()
                    .collect();
                for subnet in stale {
                    if let Some(old) = self.peers.remove(&subnet) {
                        changes.push(PeerChange::Removed(subnet, old));
                    }
                }
                for (subnet, attrs) in new {
                    changes.extend(self.upsert(subnet, attrs));
                }
                changes
            }
        }
    }

    fn upsert(&mut self, subnet: Ipv4Net, attrs: LeaseAttrs) -> Option<PeerChange> {
        match self.peers.insert(subnet, attrs.clone()) {
            None => Some(PeerChange::Added(subnet, attrs)),
            Some(old) if old == attrs => None,
            Some(old) => Some(PeerChange::Changed {
                subnet,
                old,
                new: attrs,
            }),
        }
    }

    /// The lease for `subnet`, if known.
    pub fn get(&self, subnet: &Ipv4Net) -> Option<&LeaseAttrs> {
        self.peers.get(subnet)
    }

    /// All known leases, in subnet order.
    pub fn iter(&self) -> impl Iterator<Item = (&Ipv4Net, &LeaseAttrs)> {
        self.peers.iter()
    }

    /// Number of known leases.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no lease is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// A key under `subnets/`, with the subnet it names (`None` for a
/// malformed key) and its value (empty for a deletion).
#[derive(Debug)]
struct Entry {
    key: String,
    subnet: Option<Ipv4Net>,
    value: Vec<u8>,
}

impl Entry {
    fn decode(subnets: &Prefix, kv: &KeyValue) -> Entry {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        Entry {
            subnet: subnet_in(subnets, &key),
            key,
            value: kv.value().to_vec(),
        }
    }

    /// The lease, parsed; `Err` carries a log message.
    fn parse(&self) -> Result<(Ipv4Net, LeaseAttrs), String> {
        let key = &self.key;
        let subnet = self
            .subnet
            .ok_or_else(|| format!("ignoring malformed lease key {key:?}"))?;
        let attrs = LeaseAttrs::from_json(&self.value).map_err(|e| {
            format!(
                "ignoring lease {key}: {e} (value {:?})",
                String::from_utf8_lossy(&self.value)
            )
        })?;
        Ok((subnet, attrs))
    }
}

/// Turns the listings and events of the watch into [`PeerUpdate`]s,
/// remembering what it sent so that a no-op write sends nothing.
struct PeerTracker {
    /// `<prefix>/subnets/`.
    subnets: Prefix,
    known: BTreeMap<Ipv4Net, LeaseAttrs>,
    listed_before: bool,
    stats: Arc<PeerWatchStats>,
}

impl PeerTracker {
    fn new(subnets: Prefix, stats: Arc<PeerWatchStats>) -> PeerTracker {
        PeerTracker {
            subnets,
            known: BTreeMap::new(),
            listed_before: false,
            stats,
        }
    }

    fn update(&mut self, update: Update<Entry>) -> Option<PeerUpdate> {
        match update {
            Update::Snapshot(s) => Some(self.snapshot(s)),
            Update::Event(ev) => {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.event(ev)
            }
        }
    }

    fn snapshot(&mut self, s: Snapshot<Entry>) -> PeerUpdate {
        if self.listed_before {
            self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.listed_before = true;
        let mut peers = BTreeMap::new();
        for entry in s.items {
            match entry.parse() {
                Ok((subnet, attrs)) => {
                    if peers.contains_key(&subnet) {
                        log::warn!("two leases for {subnet}; ignoring {}", entry.key);
                        continue;
                    }
                    peers.insert(subnet, attrs);
                }
                Err(msg) => self.malformed(&msg),
            }
        }
        log::info!(
            "{} leases under {} at revision {}",
            peers.len(),
            self.subnets,
            s.revision
        );
        self.known = peers.clone();
        PeerUpdate::Snapshot(peers)
    }

    fn event(&mut self, ev: Event<Entry>) -> Option<PeerUpdate> {
        match ev {
            Event::Delete(entry) => match entry.subnet {
                Some(subnet) => self
                    .known
                    .remove(&subnet)
                    .map(|_| PeerUpdate::Remove(subnet)),
                None => {
                    log::debug!("malformed key {:?} deleted", entry.key);
                    None
                }
            },
            Event::Put(entry) => match entry.parse() {
                Ok((subnet, attrs)) => {
                    if self.known.get(&subnet) == Some(&attrs) {
                        None
                    } else {
                        self.known.insert(subnet, attrs.clone());
                        Some(PeerUpdate::Upsert(subnet, attrs))
                    }
                }
                Err(msg) => {
                    self.malformed(&msg);
                    // A good lease overwritten with garbage is gone.
                    let subnet = entry.subnet?;
                    self.known.remove(&subnet)?;
                    log::warn!("lease for {subnet} overwritten with garbage; removing that peer");
                    Some(PeerUpdate::Remove(subnet))
                }
            },
        }
    }

    fn malformed(&self, msg: &str) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        log::warn!("{msg}");
    }
}

/// Watches `<prefix>/subnets/` until `shutdown` turns true (or its sender is
/// dropped) or `tx`'s receiver is dropped; both return `Ok(())`. etcd
/// trouble is retried forever with backoff, never returned.
pub async fn watch_peers(
    client: Client,
    prefix: impl Into<Prefix>,
    tx: mpsc::Sender<PeerUpdate>,
    stats: Arc<PeerWatchStats>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let subnets = subnets_dir(&prefix.into());
    let mut watch = list_then_watch(
        &client,
        format!("leases under {subnets}"),
        subnets.range(),
        |kv: &KeyValue| Some(Entry::decode(&subnets, kv)),
        shutdown,
    );
    let mut tracker = PeerTracker::new(subnets.clone(), stats);
    while let Some(update) = watch.next().await {
        let Some(u) = tracker.update(update) else {
            continue;
        };
        if tx.send(u).await.is_err() {
            log::info!("peer update receiver gone; stopping the peer watch");
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(ip: [u8; 4], mac_last: u8) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.into(),
            backend_type: "vxlan".into(),
            vni: 1,
            vtep_mac: [0x02, 0xdb, 0, 0, 0, mac_last],
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const FLANNEL: &str = r#"{"PublicIP":"192.168.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:db:00:00:00:01"}}"#;

    fn entry(key: &str, value: &str) -> Entry {
        let subnets = Prefix::new("/coreos.com/network/subnets");
        Entry {
            subnet: subnet_in(&subnets, key),
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn tracker() -> (PeerTracker, Arc<PeerWatchStats>) {
        let stats = Arc::new(PeerWatchStats::default());
        let subnets = Prefix::new("/coreos.com/network/subnets");
        (PeerTracker::new(subnets, stats.clone()), stats)
    }

    fn snapshot(items: Vec<Entry>) -> Update<Entry> {
        Update::Snapshot(Snapshot { items, revision: 7 })
    }

    const A: &str = "/coreos.com/network/subnets/10.244.1.0-24";

    #[test]
    fn tracker_counts_and_skips_garbage() {
        let (mut t, stats) = tracker();
        let good = attrs([192, 168, 0, 1], 1);
        let u = t.update(snapshot(vec![
            entry(A, FLANNEL),
            entry("/coreos.com/network/subnets/nonsense", "{}"),
            entry("/coreos.com/network/subnets/10.244.2.0-24", "garbage"),
        ]));
        assert_eq!(
            u,
            Some(PeerUpdate::Snapshot(BTreeMap::from([(
                net("10.244.1.0/24"),
                good.clone()
            )])))
        );
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
        // Rewriting the same value sends nothing.
        assert_eq!(t.update(Update::Event(Event::Put(entry(A, FLANNEL)))), None);
        // Deleting a malformed key is no news and no new malformation.
        let bad_key = entry("/coreos.com/network/subnets/nonsense", "");
        assert_eq!(t.update(Update::Event(Event::Delete(bad_key))), None);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
        // Garbage over a good lease removes it, once.
        let garbage = || Update::Event(Event::Put(entry(A, "garbage")));
        assert_eq!(
            t.update(garbage()),
            Some(PeerUpdate::Remove(net("10.244.1.0/24")))
        );
        assert_eq!(t.update(garbage()), None);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 4);
        assert_eq!(stats.events.load(Ordering::Relaxed), 4);
        assert_eq!(stats.resyncs.load(Ordering::Relaxed), 0);
        // A second listing is a resync.
        t.update(snapshot(vec![]));
        assert_eq!(stats.resyncs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn upsert_add_change_noop() {
        let mut t = PeerTable::new();
        let a = attrs([192, 168, 0, 1], 1);
        let s = net("10.244.1.0/24");
        assert_eq!(
            t.apply(PeerUpdate::Upsert(s, a.clone())),
            vec![PeerChange::Added(s, a.clone())]
        );
        assert_eq!(t.apply(PeerUpdate::Upsert(s, a.clone())), vec![]);
        let b = attrs([192, 168, 0, 1], 2);
        assert_eq!(
            t.apply(PeerUpdate::Upsert(s, b.clone())),
            vec![PeerChange::Changed {
                subnet: s,
                old: a,
                new: b.clone()
            }]
        );
        assert_eq!(t.get(&s), Some(&b));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn remove_known_and_unknown() {
        let mut t = PeerTable::new();
        let a = attrs([192, 168, 0, 1], 1);
        let s = net("10.244.1.0/24");
        t.apply(PeerUpdate::Upsert(s, a.clone()));
        assert_eq!(t.apply(PeerUpdate::Remove(net("10.244.9.0/24"))), vec![]);
        assert_eq!(
            t.apply(PeerUpdate::Remove(s)),
            vec![PeerChange::Removed(s, a)]
        );
        assert!(t.is_empty());
        assert_eq!(t.apply(PeerUpdate::Remove(s)), vec![]);
    }

    #[test]
    fn snapshot_diffs_against_table() {
        let mut t = PeerTable::new();
        let (s1, s2, s3, s4) = (
            net("10.244.1.0/24"),
            net("10.244.2.0/24"),
            net("10.244.3.0/24"),
            net("10.244.4.0/24"),
        );
        for (s, i) in [(s1, 1), (s2, 2), (s3, 3)] {
            t.apply(PeerUpdate::Upsert(s, attrs([192, 168, 0, i], i)));
        }
        let mut snap = BTreeMap::new();
        snap.insert(s1, attrs([192, 168, 0, 1], 1)); // unchanged
        snap.insert(s2, attrs([192, 168, 0, 2], 9)); // changed
        snap.insert(s4, attrs([192, 168, 0, 4], 4)); // new; s3 gone
        let changes = t.apply(PeerUpdate::Snapshot(snap.clone()));
        assert_eq!(
            changes,
            vec![
                PeerChange::Removed(s3, attrs([192, 168, 0, 3], 3)),
                PeerChange::Changed {
                    subnet: s2,
                    old: attrs([192, 168, 0, 2], 2),
                    new: attrs([192, 168, 0, 2], 9)
                },
                PeerChange::Added(s4, attrs([192, 168, 0, 4], 4)),
            ]
        );
        // Same snapshot again: nothing to do.
        assert_eq!(t.apply(PeerUpdate::Snapshot(snap.clone())), vec![]);
        assert_eq!(
            t.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![s1, s2, s4]
        );
        // Empty snapshot removes all.
        let changes = t.apply(PeerUpdate::Snapshot(BTreeMap::new()));
        assert_eq!(changes.len(), 3);
        assert!(changes.iter().all(|c| matches!(c, PeerChange::Removed(..))));
        assert!(t.is_empty());
    }
}
