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
//! Peers are keyed by IPv4 subnet. A plain key (`10.244.1.0-24`) and a
//! dual-stack key for the same subnet (`10.244.1.0-24&fd00::-64`) are two
//! leases of one subnet: an overlap, where the older key (by etcd create
//! revision) wins, as for any other overlap.
//!
//! Our own lease is included; the agent filters it out by subnet.
//!
//! Leases that cannot be right are skipped (never sent, so never
//! programmed), logged once when they become skipped (not at every
//! re-list) and counted in [`PeerWatchStats`] by reason ([`Skip`]):
//! a subnet outside the cluster Network or of another length than
//! SubnetLen; a subnet overlapping another lease (the older one by etcd
//! create revision stays, the newer is skipped until the older goes); a
//! PublicIP that is unspecified, loopback, multicast or broadcast; this
//! node's own PublicIP under another subnet than its own lease.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
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
    /// Leases skipped for a subnet outside Network or not of SubnetLen
    /// (each time one becomes skipped, not at every re-list).
    pub skipped_subnet: AtomicU64,
    /// Leases skipped for overlapping an older lease (likewise).
    pub skipped_overlap: AtomicU64,
    /// Leases skipped for their PublicIP (likewise).
    pub skipped_public_ip: AtomicU64,
    /// Leases skipped right now, for any reason.
    pub skipped_now: AtomicU64,
}

/// Why a lease that parsed is still not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not inside the cluster Network.
    OutsideNetwork(Ipv4Net),
    /// Not of the configured SubnetLen.
    WrongLength(u8),
    /// Overlaps this older lease.
    Overlaps(Ipv4Net),
    /// PublicIP 0.0.0.0, loopback, multicast or broadcast.
    BadPublicIp(Ipv4Addr),
    /// This node's own PublicIP, under another subnet than its own lease.
    OwnPublicIp(Ipv4Addr),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::OutsideNetwork(n) => write!(f, "subnet outside the cluster Network {n}"),
            Skip::WrongLength(l) => write!(f, "subnet is not a /{l} (SubnetLen)"),
            Skip::Overlaps(o) => write!(f, "subnet overlaps the older lease {o}"),
            Skip::BadPublicIp(ip) => write!(
                f,
                "PublicIP {ip} is unspecified, loopback, multicast or broadcast"
            ),
            Skip::OwnPublicIp(ip) => write!(
                f,
                "PublicIP {ip} is this node's, but this is not this node's lease"
            ),
        }
    }
}

/// What a lease must satisfy to be used, beyond parsing.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// The cluster Network; every lease's subnet lies inside it.
    pub network: Ipv4Net,
    /// SubnetLen: every lease's prefix length.
    pub subnet_len: u8,
    /// This node, when known: leases with its PublicIP under another
    /// subnet are skipped.
    pub own: Option<OwnNode>,
}

/// This node's PublicIP and the subnet of its current lease (the agent
/// updates it when the lease is re-acquired under another subnet).
#[derive(Debug, Clone)]
pub struct OwnNode {
    pub public_ip: Ipv4Addr,
    pub subnet: watch::Receiver<Ipv4Net>,
}

impl PeerPolicy {
    /// A policy for the cluster `net`, without a node.
    pub fn for_network(net: &crate::config::NetworkConfig) -> PeerPolicy {
        PeerPolicy {
            network: net.network,
            subnet_len: net.subnet_len,
            own: None,
        }
    }

    /// The rules on one lease alone (not overlaps).
    fn check(&self, subnet: &Ipv4Net, attrs: &LeaseAttrs) -> Option<Skip> {
        if !self.network.contains(subnet) {
            return Some(Skip::OutsideNetwork(self.network));
        }
        if subnet.prefix_len() != self.subnet_len {
            return Some(Skip::WrongLength(self.subnet_len));
        }
        let ip = attrs.public_ip;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
            return Some(Skip::BadPublicIp(ip));
        }
        if let Some(own) = &self.own
            && own.public_ip == ip
            && *own.subnet.borrow() != *subnet
        {
            return Some(Skip::OwnPublicIp(ip));
        }
        None
    }
}

/// A lease in `taken` that overlaps `subnet`, if any.
fn overlapping<V>(taken: &BTreeMap<Ipv4Net, V>, subnet: &Ipv4Net) -> Option<Ipv4Net> {
    // One that contains it (or is it)...
    for len in 0..=subnet.prefix_len() {
        if let Ok(sup) = Ipv4Net::new(subnet.addr(), len)
            && taken.contains_key(&sup.trunc())
        {
            return Some(sup.trunc());
        }
    }
    // ... or one inside it.
    let lo = Ipv4Net::new(subnet.network(), 0).ok()?;
    let hi = Ipv4Net::new(subnet.broadcast(), 32).ok()?;
    taken
        .range(lo..=hi)
        .map(|(k, _)| *k)
        .find(|k| subnet.contains(k))
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
    /// etcd's create revision of the key: which of two overlapping leases
    /// is older.
    created: i64,
}

impl Entry {
    fn decode(subnets: &Prefix, kv: &KeyValue) -> Entry {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        Entry {
            subnet: subnet_in(subnets, &key),
            key,
            value: kv.value().to_vec(),
            created: kv.create_revision(),
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

/// A lease as listed or written, before the rules between leases.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    subnet: Ipv4Net,
    attrs: LeaseAttrs,
    created: i64,
}

/// Turns the listings and events of the watch into [`PeerUpdate`]s,
/// remembering what it sent so that a no-op write sends nothing. Every
/// input updates the parsed leases; the leases to use are then derived
/// from all of them (so a lease skipped for overlapping comes back when
/// the older one goes) and diffed against what was sent.
struct PeerTracker {
    /// `<prefix>/subnets/`.
    subnets: Prefix,
    policy: PeerPolicy,
    /// Every lease that parsed, by key: two keys can name one IPv4
    /// subnet (a plain and a dual-stack key).
    parsed: BTreeMap<String, Parsed>,
    /// What was sent: the leases in use.
    known: BTreeMap<Ipv4Net, LeaseAttrs>,
    /// Leases skipped by key, and why (each logged once, when it became
    /// skipped).
    skipped: BTreeMap<String, Skip>,
    listed_before: bool,
    stats: Arc<PeerWatchStats>,
}

impl PeerTracker {
    fn new(subnets: Prefix, policy: PeerPolicy, stats: Arc<PeerWatchStats>) -> PeerTracker {
        PeerTracker {
            subnets,
            policy,
            parsed: BTreeMap::new(),
            known: BTreeMap::new(),
            skipped: BTreeMap::new(),
            listed_before: false,
            stats,
        }
    }

    fn update(&mut self, update: Update<Entry>) -> Vec<PeerUpdate> {
        match update {
            Update::Snapshot(s) => vec![self.snapshot(s)],
            Update::Event(ev) => {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
                self.event(ev);
                self.diff()
            }
        }
    }

    fn snapshot(&mut self, s: Snapshot<Entry>) -> PeerUpdate {
        if self.listed_before {
            self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.listed_before = true;
        let mut parsed = BTreeMap::new();
        for entry in s.items {
            match entry.parse() {
                Ok((subnet, attrs)) => {
                    let created = entry.created;
                    parsed.insert(
                        entry.key,
                        Parsed {
                            subnet,
                            attrs,
                            created,
                        },
                    );
                }
                Err(msg) => self.malformed(&msg),
            }
        }
        self.parsed = parsed;
        let peers = self.usable();
        log::info!(
            "{} leases under {} at revision {} ({} skipped)",
            peers.len(),
            self.subnets,
            s.revision,
            self.skipped.len()
        );
        self.known = peers.clone();
        PeerUpdate::Snapshot(peers)
    }

    fn event(&mut self, ev: Event<Entry>) {
        match ev {
            Event::Delete(entry) => {
                if self.parsed.remove(&entry.key).is_none() && entry.subnet.is_none() {
                    log::debug!("malformed key {:?} deleted", entry.key);
                }
            }
            Event::Put(entry) => match entry.parse() {
                Ok((subnet, attrs)) => {
                    let created = entry.created;
                    self.parsed.insert(
                        entry.key,
                        Parsed {
                            subnet,
                            attrs,
                            created,
                        },
                    );
                }
                Err(msg) => {
                    self.malformed(&msg);
                    // A good lease overwritten with garbage is gone.
                    if let Some(old) = self.parsed.remove(&entry.key) {
                        log::warn!(
                            "lease for {} overwritten with garbage; removing that peer",
                            old.subnet
                        );
                    }
                }
            },
        }
    }

    /// Re-derives the leases in use after the own subnet changed.
    fn own_subnet_changed(&mut self) -> Vec<PeerUpdate> {
        self.diff()
    }

    /// The updates that take the receiver from `known` to the leases in
    /// use now: removals first, then additions and changes.
    fn diff(&mut self) -> Vec<PeerUpdate> {
        let now = self.usable();
        let mut out: Vec<PeerUpdate> = self
            .known
            .keys()
            .filter(|s| !now.contains_key(s))
            .map(|s| PeerUpdate::Remove(*s))
            .collect();
        for (subnet, attrs) in &now {
            if self.known.get(subnet) != Some(attrs) {
                out.push(PeerUpdate::Upsert(*subnet, attrs.clone()));
            }
        }
        self.known = now;
        out
    }

    /// The parsed leases that pass the policy, older leases first for
    /// overlaps. Logs and counts the leases newly skipped.
    fn usable(&mut self) -> BTreeMap<Ipv4Net, LeaseAttrs> {
        let mut order: Vec<(&String, &Parsed)> = self.parsed.iter().collect();
        order.sort_by(|(k1, p1), (k2, p2)| (p1.created, k1).cmp(&(p2.created, k2)));
        let mut usable = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (key, p) in order {
            let skip = self
                .policy
                .check(&p.subnet, &p.attrs)
                .or_else(|| overlapping(&usable, &p.subnet).map(Skip::Overlaps));
            match skip {
                Some(why) => {
                    skipped.insert(key.clone(), why);
                }
                None => {
                    usable.insert(p.subnet, p.attrs.clone());
                }
            }
        }
        for (key, why) in &skipped {
            if self.skipped.get(key) == Some(why) {
                continue;
            }
            let counter = match why {
                Skip::OutsideNetwork(_) | Skip::WrongLength(_) => &self.stats.skipped_subnet,
                Skip::Overlaps(_) => &self.stats.skipped_overlap,
                Skip::BadPublicIp(_) | Skip::OwnPublicIp(_) => &self.stats.skipped_public_ip,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            log::warn!("skipping the lease {key}: {why}");
        }
        for key in self.skipped.keys() {
            if !skipped.contains_key(key) && self.parsed.contains_key(key) {
                log::info!("the lease {key} is no longer skipped");
            }
        }
        self.stats
            .skipped_now
            .store(skipped.len() as u64, Ordering::Relaxed);
        self.skipped = skipped;
        usable
    }

    fn malformed(&self, msg: &str) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        log::warn!("{msg}");
    }
}

/// Watches `<prefix>/subnets/` until `shutdown` turns true (or its sender is
/// dropped) or `tx`'s receiver is dropped; both return `Ok(())`. etcd
/// trouble is retried forever with backoff, never returned.
/// Leases that break `policy` are skipped (see the module documentation).
pub async fn watch_peers(
    client: Client,
    prefix: impl Into<Prefix>,
    policy: PeerPolicy,
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
    )
    .counted_as("peers");
    let mut own_subnet = policy.own.as_ref().map(|o| o.subnet.clone());
    let mut tracker = PeerTracker::new(subnets.clone(), policy, stats);
    loop {
        let updates = tokio::select! {
            update = watch.next() => match update {
                Some(update) => tracker.update(update),
                None => break,
            },
            Ok(()) = async {
                match own_subnet.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => tracker.own_subnet_changed(),
        };
        for u in updates {
            if tx.send(u).await.is_err() {
                log::info!("peer update receiver gone; stopping the peer watch");
                return Ok(());
            }
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
            created: 0,
        }
    }

    fn policy() -> PeerPolicy {
        PeerPolicy {
            network: net("10.244.0.0/16"),
            subnet_len: 24,
            own: None,
        }
    }

    fn tracker() -> (PeerTracker, Arc<PeerWatchStats>) {
        tracker_with(policy())
    }

    fn tracker_with(policy: PeerPolicy) -> (PeerTracker, Arc<PeerWatchStats>) {
        let stats = Arc::new(PeerWatchStats::default());
        let subnets = Prefix::new("/coreos.com/network/subnets");
        (PeerTracker::new(subnets, policy, stats.clone()), stats)
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
            vec![PeerUpdate::Snapshot(BTreeMap::from([(
                net("10.244.1.0/24"),
                good.clone()
            )]))]
        );
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
        // Rewriting the same value sends nothing.
        assert_eq!(
            t.update(Update::Event(Event::Put(entry(A, FLANNEL)))),
            vec![]
        );
        // Deleting a malformed key is no news and no new malformation.
        let bad_key = entry("/coreos.com/network/subnets/nonsense", "");
        assert_eq!(t.update(Update::Event(Event::Delete(bad_key))), vec![]);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
        // Garbage over a good lease removes it, once.
        let garbage = || Update::Event(Event::Put(entry(A, "garbage")));
        assert_eq!(
            t.update(garbage()),
            vec![PeerUpdate::Remove(net("10.244.1.0/24"))]
        );
        assert_eq!(t.update(garbage()), vec![]);
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

    /// A flannel lease value for `ip`.
    fn lease(ip: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:db:00:00:00:01"}}}}"#
        )
    }

    fn put(subnet: &str, ip: &str, created: i64) -> Update<Entry> {
        let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
        let mut e = entry(&key, &lease(ip));
        e.created = created;
        Update::Event(Event::Put(e))
    }

    fn del(subnet: &str) -> Update<Entry> {
        let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
        Update::Event(Event::Delete(entry(&key, "")))
    }

    fn skipped(stats: &PeerWatchStats) -> [u64; 4] {
        [
            stats.skipped_subnet.load(Ordering::Relaxed),
            stats.skipped_overlap.load(Ordering::Relaxed),
            stats.skipped_public_ip.load(Ordering::Relaxed),
            stats.skipped_now.load(Ordering::Relaxed),
        ]
    }

    #[test]
    fn leases_outside_network_or_of_wrong_length_are_skipped() {
        let (mut t, stats) = tracker();
        let mut e1 = entry(
            "/coreos.com/network/subnets/10.245.1.0-24",
            &lease("192.168.0.1"),
        );
        e1.created = 1;
        let mut e2 = entry(
            "/coreos.com/network/subnets/10.244.2.0-25",
            &lease("192.168.0.2"),
        );
        e2.created = 2;
        let mut e3 = entry(
            "/coreos.com/network/subnets/10.244.3.0-24",
            &lease("192.168.0.3"),
        );
        e3.created = 3;
        let u = t.update(snapshot(vec![e1, e2, e3]));
        let PeerUpdate::Snapshot(snap) = &u[0] else {
            panic!("{u:?}")
        };
        assert_eq!(
            snap.keys().copied().collect::<Vec<_>>(),
            [net("10.244.3.0/24")]
        );
        assert_eq!(skipped(&stats), [2, 0, 0, 2]);
        // A re-list of the same leases counts (and logs) nothing new.
        t.update(snapshot(vec![]));
        assert_eq!(skipped(&stats), [2, 0, 0, 0]);
        assert_eq!(t.update(put("10.244.0.0/20", "192.168.0.4", 4)), vec![]);
        assert_eq!(skipped(&stats), [3, 0, 0, 1]);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_older_of_two_overlapping_leases_wins() {
        // A wider policy, so that subnets of two lengths are both valid
        // alone: a /16 network cut in /24s, plus the same /24 under a
        // dual-stack key.
        let (mut t, stats) = tracker();
        let a = net("10.244.1.0/24");
        let older = attrs([192, 168, 0, 1], 1);
        assert_eq!(
            t.update(put("10.244.1.0/24", "192.168.0.1", 10)),
            vec![PeerUpdate::Upsert(a, older)]
        );
        // The same subnet under a dual-stack key, created later: skipped.
        let dual = |ip: &str, created| {
            let mut e = entry(
                "/coreos.com/network/subnets/10.244.1.0-24&fd00::-64",
                &lease(ip),
            );
            e.created = created;
            Update::Event(Event::Put(e))
        };
        assert_eq!(t.update(dual("192.168.0.9", 11)), vec![]);
        assert_eq!(skipped(&stats), [0, 1, 0, 1]);
        // Rewritten (same create revision): still skipped, not re-counted.
        assert_eq!(t.update(dual("192.168.0.8", 11)), vec![]);
        assert_eq!(skipped(&stats), [0, 1, 0, 1]);
        // The older goes: the newer takes the subnet.
        let newer = {
            let mut a = attrs([192, 168, 0, 8], 1);
            a.vtep_mac = [0x02, 0xdb, 0, 0, 0, 1];
            a
        };
        assert_eq!(
            t.update(del("10.244.1.0/24")),
            vec![PeerUpdate::Upsert(a, newer)]
        );
        assert_eq!(skipped(&stats), [0, 1, 0, 0]);
        // In a listing, create revisions decide, not key order.
        let mut first = entry(
            "/coreos.com/network/subnets/10.244.1.0-24",
            &lease("192.168.0.1"),
        );
        first.created = 20;
        let mut second = entry(
            "/coreos.com/network/subnets/10.244.1.0-24&fd00::-64",
            &lease("192.168.0.8"),
        );
        second.created = 11;
        let u = t.update(snapshot(vec![first, second]));
        let PeerUpdate::Snapshot(snap) = &u[0] else {
            panic!("{u:?}")
        };
        assert_eq!(snap[&a].public_ip, Ipv4Addr::new(192, 168, 0, 8));
        assert_eq!(skipped(&stats), [0, 2, 0, 1]);
    }

    #[test]
    fn overlap_finds_supernets_and_subnets() {
        let taken = BTreeMap::from([(net("10.244.1.0/24"), ()), (net("10.0.0.0/8"), ())]);
        assert_eq!(
            overlapping(&taken, &net("10.244.1.128/25")),
            Some(net("10.0.0.0/8"))
        );
        let taken = BTreeMap::from([(net("10.244.1.0/24"), ())]);
        assert_eq!(
            overlapping(&taken, &net("10.244.1.128/25")),
            Some(net("10.244.1.0/24"))
        );
        assert_eq!(
            overlapping(&taken, &net("10.244.0.0/16")),
            Some(net("10.244.1.0/24"))
        );
        assert_eq!(
            overlapping(&taken, &net("10.244.1.0/24")),
            Some(net("10.244.1.0/24"))
        );
        assert_eq!(overlapping(&taken, &net("10.244.2.0/24")), None);
        assert_eq!(overlapping(&taken, &net("10.244.0.0/24")), None);
    }

    #[test]
    fn bad_and_foreign_own_public_ips_are_skipped() {
        let (own_tx, own_rx) = watch::channel(net("10.244.1.0/24"));
        let (mut t, stats) = tracker_with(PeerPolicy {
            own: Some(OwnNode {
                public_ip: Ipv4Addr::new(192, 168, 0, 1),
                subnet: own_rx,
            }),
            ..policy()
        });
        for (i, ip) in ["0.0.0.0", "127.0.0.5", "224.0.0.1", "255.255.255.255"]
            .iter()
            .enumerate()
        {
            let subnet = format!("10.244.{}.0/24", 10 + i);
            assert_eq!(t.update(put(&subnet, ip, i as i64)), vec![], "{ip}");
        }
        assert_eq!(skipped(&stats), [0, 0, 4, 4]);
        // Our own lease passes (the agent leaves it out); our PublicIP
        // under another subnet does not.
        assert_eq!(t.update(put("10.244.1.0/24", "192.168.0.1", 20)).len(), 1);
        assert_eq!(t.update(put("10.244.2.0/24", "192.168.0.1", 21)), vec![]);
        assert_eq!(skipped(&stats), [0, 0, 5, 5]);
        // Re-acquired under 10.244.2.0/24: that one is ours now, the old
        // one (until it expires) is the stray.
        own_tx.send(net("10.244.2.0/24")).unwrap();
        let u = t.own_subnet_changed();
        assert_eq!(
            u,
            vec![
                PeerUpdate::Remove(net("10.244.1.0/24")),
                PeerUpdate::Upsert(net("10.244.2.0/24"), {
                    let mut a = attrs([192, 168, 0, 1], 1);
                    a.vtep_mac = [0x02, 0xdb, 0, 0, 0, 1];
                    a
                }),
            ]
        );
        assert_eq!(skipped(&stats), [0, 0, 6, 5]);
    }
}
