//! The agent's conntrack sweeper: removes expired flows (both
//! directions), reverse-NAT entries no live flow points at, and, when the
//! table is more than 90% full, the flows that may go first (unanswered,
//! closing, closed: netfilter's early_drop), most idle first, down to 85%.
//! Established flows both sides have spoken in are never removed under
//! pressure: a new flow loses instead (`drop_ct_full`).
//!
//! Deciding ([`plan`], [`confirm_orphans`]) is pure and unit-tested;
//! [`Sweeper::sweep`] applies a plan, re-reading each entry just before
//! removing it so a flow the data path touched meanwhile stays.

use std::{
    cmp::Reverse,
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use dataplane_common::{
    CtEntry, CtKey, RnatEntry, Stat,
    ct::{self, CtGc, CtTimeouts},
    masq::{self, MasqEntry, MasqRev},
};
use log::{debug, error, info, warn};

use crate::bpf::{CtTable, Flow, MapError, MasqFlow};

/// Why a flow is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Expired,
    EarlyDrop,
}

/// What one sweep is to remove.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub remove: Vec<(Flow, Reason)>,
}

/// Expired flows, then, if the rest is more than
/// [`ct::EARLY_DROP_ABOVE_PCT`] of `max`, early-drop candidates by rank
/// ([`ct::evict_rank`]) and, within a rank, most idle first.
pub fn plan(flows: &[Flow], now_ns: u64, t: &CtTimeouts, max: u32) -> Plan {
    let mut remove = Vec::new();
    let mut candidates = Vec::new();
    for f in flows {
        let e = &f.entry;
        if ct::is_expired(e.state, e.last_seen_ns, now_ns, t) {
            remove.push((*f, Reason::Expired));
        } else if let Some(rank) = ct::evict_rank(e.state, e.flags) {
            candidates.push((rank, Reverse(ct::idle_ns(e.last_seen_ns, now_ns)), *f));
        }
    }
    let live = (flows.len() - remove.len()) as u64;
    let budget = ct::early_drop_budget(live, u64::from(max)) as usize;
    if budget > 0 {
        candidates.sort_by_key(|(rank, idle, f)| (*rank, *idle, f.key.saddr, f.key.sport));
        remove.extend(
            candidates
                .into_iter()
                .take(budget)
                .map(|(_, _, f)| (f, Reason::EarlyDrop)),
        );
    }
    Plan { remove }
}

/// Reverse-NAT entries that no live flow points back at: the flow they
/// name is missing, expired, or went to another backend.
pub fn orphans(
    reverse: &[(CtKey, RnatEntry)],
    flows: &HashMap<CtKey, CtEntry>,
    now_ns: u64,
    t: &CtTimeouts,
) -> Vec<CtKey> {
    reverse
        .iter()
        .filter(|(key, r)| {
            let fwd = ct::forward_key(r, key.proto);
            match flows.get(&fwd) {
                Some(e) => {
                    ct::is_expired(e.state, e.last_seen_ns, now_ns, t)
                        || ct::entry_reply_key(&fwd, e) != *key
                }
                None => true,
            }
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Masqueraded flows whose state's timeout passed. (No early drop: a
/// full masquerade table drops new flows, `drop_masq_full`, until
/// flows expire.)
pub fn masq_expired(flows: &[MasqFlow], now_ns: u64, t: &CtTimeouts) -> Vec<MasqFlow> {
    flows
        .iter()
        .filter(|f| ct::is_expired(f.entry.state, f.entry.last_seen_ns, now_ns, t))
        .copied()
        .collect()
}

/// Masquerade reverse entries that no live flow points back at (the
/// flow they name is missing, expired, or left with another port).
pub fn masq_orphans(
    reverse: &[(CtKey, MasqRev)],
    flows: &HashMap<CtKey, MasqEntry>,
    now_ns: u64,
    t: &CtTimeouts,
) -> Vec<CtKey> {
    reverse
        .iter()
        .filter(|(key, r)| {
            let fwd = masq::forward_key(key, r);
            match flows.get(&fwd) {
                Some(e) => {
                    ct::is_expired(e.state, e.last_seen_ns, now_ns, t)
                        || masq::reply_key(&fwd, e.nat_addr, e.nat_port) != *key
                }
                None => true,
            }
        })
        .map(|(key, _)| *key)
        .collect()
}

/// The data path stores a flow's reverse entry just before its forward
/// one, so a sweep can see the first without the second. An orphan is
/// removed only when the previous sweep saw it orphaned too. Returns
/// (to remove now, to check next time).
pub fn confirm_orphans(previous: &HashSet<CtKey>, now: Vec<CtKey>) -> (Vec<CtKey>, HashSet<CtKey>) {
    let (confirmed, fresh): (Vec<CtKey>, Vec<CtKey>) =
        now.into_iter().partition(|k| previous.contains(k));
    (confirmed, fresh.into_iter().collect())
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows in the table before the sweep.
    pub flows: u64,
    pub expired: u64,
    pub early_dropped: u64,
    pub orphans: u64,
    /// Planned removals skipped because the data path touched the entry.
    pub skipped: u64,
    /// Masqueraded flows in the table before the sweep.
    pub masq_flows: u64,
    pub masq_expired: u64,
    pub masq_orphans: u64,
}

/// Runs sweeps on a table and keeps its counters (`ct_gc_v1`).
pub struct Sweeper {
    table: CtTable,
    timeouts: CtTimeouts,
    suspects: HashSet<CtKey>,
    masq_suspects: HashSet<CtKey>,
}

impl Sweeper {
    pub fn new(table: CtTable, timeouts: CtTimeouts) -> Sweeper {
        Sweeper {
            table,
            timeouts,
            suspects: HashSet::new(),
            masq_suspects: HashSet::new(),
        }
    }

    /// One sweep at `now_ns` (CLOCK_MONOTONIC).
    pub fn sweep(&mut self, now_ns: u64) -> Result<SweepReport, MapError> {
        let flows = self.table.flows()?;
        let mut report = SweepReport {
            flows: flows.len() as u64,
            ..Default::default()
        };
        let max = self.table.max_entries();
        for (f, reason) in plan(&flows, now_ns, &self.timeouts, max).remove {
            // Removed only as planned: an entry the data path changed
            // since it was read (refreshed, or replaced by a new flow)
            // stays.
            if self.table.entry(&f.key)? != Some(f.entry) {
                report.skipped += 1;
                continue;
            }
            self.table.remove_flow(&f)?;
            match reason {
                Reason::Expired => report.expired += 1,
                Reason::EarlyDrop => report.early_dropped += 1,
            }
        }
        let live: HashMap<CtKey, CtEntry> = self
            .table
            .flows()?
            .into_iter()
            .map(|f| (f.key, f.entry))
            .collect();
        let reverse = self.table.reverse_entries()?;
        let found = orphans(&reverse, &live, now_ns, &self.timeouts);
        let (remove, suspects) = confirm_orphans(&self.suspects, found);
        self.suspects = suspects;
        for key in remove {
            self.table.remove_reverse(&key)?;
            report.orphans += 1;
        }
        let live_masq = self.sweep_masq(now_ns, &mut report)?;
        let t = &mut self.table;
        t.add_gc_counter(CtGc::MasqExpired, report.masq_expired)?;
        t.add_gc_counter(CtGc::MasqOrphanReply, report.masq_orphans)?;
        t.set_gc_counter(CtGc::MasqEntries, live_masq)?;
        t.add_gc_counter(CtGc::Sweeps, 1)?;
        t.add_gc_counter(CtGc::Expired, report.expired)?;
        t.add_gc_counter(CtGc::EarlyDrop, report.early_dropped)?;
        t.add_gc_counter(CtGc::OrphanReply, report.orphans)?;
        t.set_gc_counter(CtGc::Entries, live.len() as u64)?;
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        t.set_gc_counter(CtGc::LastSweepUnix, unix)?;
        Ok(report)
    }
}

impl Sweeper {
    /// The masquerade part of a sweep: expired flows, then confirmed
    /// orphan reverse entries. Returns the flows left.
    fn sweep_masq(&mut self, now_ns: u64, report: &mut SweepReport) -> Result<u64, MapError> {
        let flows = self.table.masq_flows()?;
        report.masq_flows = flows.len() as u64;
        for f in masq_expired(&flows, now_ns, &self.timeouts) {
            if self.table.masq_entry(&f.key)? != Some(f.entry) {
                report.skipped += 1;
                continue;
            }
            self.table.remove_masq_flow(&f)?;
            report.masq_expired += 1;
        }
        let live: HashMap<CtKey, MasqEntry> = self
            .table
            .masq_flows()?
            .into_iter()
            .map(|f| (f.key, f.entry))
            .collect();
        let reverse = self.table.masq_reverse_entries()?;
        let found = masq_orphans(&reverse, &live, now_ns, &self.timeouts);
        let (remove, suspects) = confirm_orphans(&self.masq_suspects, found);
        self.masq_suspects = suspects;
        for key in remove {
            self.table.remove_masq_reverse(&key)?;
            report.masq_orphans += 1;
        }
        Ok(live.len() as u64)
    }
}

/// How often the sweeper looks at `drop_ct_full`: a table that filled up
/// is swept at once, not at the next interval.
const FULL_CHECK: Duration = Duration::from_secs(1);

/// Runs `sweeper` on a thread of its own (a sweep of a large table takes
/// many map syscalls; the agent's event loop must not wait on it): every
/// `interval`, and within a second of a new flow being dropped for a full
/// table (the `drop_ct_full` counter, read from the pins under
/// `pin_path`). Ends when `stop` turns true.
pub fn spawn(
    mut sweeper: Sweeper,
    interval: Duration,
    pin_path: PathBuf,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let full_drops = || {
            crate::bpf::read_pinned_stats(&pin_path)
                .ok()
                .and_then(|s| s.into_iter().find(|(s, _)| *s == Stat::DropCtFull))
                .map(|(_, c)| c.packets)
                .unwrap_or_default()
        };
        let mut last_full = full_drops();
        let mut last_sweep = Instant::now();
        let mut failures = 0u64;
        while !*stop.borrow() {
            std::thread::sleep(FULL_CHECK.min(interval));
            let full = full_drops();
            let pressed = full > last_full;
            if !pressed && last_sweep.elapsed() < interval {
                continue;
            }
            last_full = full;
            last_sweep = Instant::now();
            let result = sweeper.sweep(crate::bpf::ct::monotonic_ns());
            let last_report = result.as_ref().ok().copied();
            match result {
                Ok(r) if r.early_dropped > 0 => warn!(
                    "conntrack: table over {}% full: {} unestablished or closing flows dropped early ({} expired, {} flows before)",
                    ct::EARLY_DROP_ABOVE_PCT,
                    r.early_dropped,
                    r.expired,
                    r.flows
                ),
                Ok(r) if r.expired + r.orphans + r.masq_expired + r.masq_orphans > 0 => {
                    debug!("conntrack sweep: {r:?}")
                }
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    error!("conntrack sweep failed: {e} ({failures} failures so far)");
                }
            }
            if pressed {
                info!("conntrack: new flows were dropped for a full table; swept");
            }
            if pressed && last_report.is_some_and(|r: SweepReport| r.early_dropped + r.expired == 0)
            {
                warn!(
                    "conntrack: the table is full of established flows, nothing may go early: new flows are dropped (raise --ct-max)"
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use dataplane_common::{
        Backend, PROTO_TCP,
        ct::{CT_F_PICKED_UP, CT_F_SEEN_REPLY, CtState},
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(port: u16, state: CtState, flags: u8, last_seen_s: u64) -> Flow {
        Flow {
            key: CtKey {
                saddr: [10, 244, 1, 5],
                daddr: [10, 96, 0, 10],
                sport: port.to_be_bytes(),
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
                last_seen_ns: last_seen_s * S,
                state: state as u8,
                flags,
                ..Default::default()
            },
        }
    }

    fn removed(p: &Plan) -> Vec<(u16, Reason)> {
        p.remove
            .iter()
            .map(|(f, r)| (u16::from_be_bytes(f.key.sport), *r))
            .collect()
    }

    #[test]
    fn expired_flows_go_whatever_the_fill() {
        let t = CtTimeouts::default();
        let flows = [
            flow(1, CtState::Close, 0, 100),    // 10 s: expired at 111
            flow(2, CtState::TimeWait, 0, 100), // 120 s: not yet
            flow(3, CtState::Established, CT_F_SEEN_REPLY, 0), // 24 h: not yet
        ];
        let p = plan(&flows, 111 * S, &t, 1000);
        assert_eq!(removed(&p), [(1, Reason::Expired)]);
        assert_eq!(plan(&flows, 110 * S, &t, 1000).remove, []);
    }

    #[test]
    fn early_drop_spares_established_flows_and_takes_the_most_idle_first() {
        let t = CtTimeouts::default();
        let mut flows = Vec::new();
        // 80 established and answered: never dropped.
        for p in 0..80 {
            flows.push(flow(1000 + p, CtState::Established, CT_F_SEEN_REPLY, 500));
        }
        // 15 time_wait, idle from 100..115 s; 5 syn_sent.
        for p in 0..15 {
            flows.push(flow(2000 + p, CtState::TimeWait, 0, 450 + u64::from(p)));
        }
        for p in 0..5 {
            flows.push(flow(3000 + p, CtState::SynSent, 0, 499));
        }
        // 100 of 100: drop down to 85, i.e. 15 flows.
        let p = plan(&flows, 500 * S, &t, 100);
        let r = removed(&p);
        assert_eq!(r.len(), 15);
        assert!(r.iter().all(|(_, why)| *why == Reason::EarlyDrop));
        assert!(
            r.iter().all(|(p, _)| (2000..2015).contains(p)),
            "time_wait before syn_sent: {r:?}"
        );
        // At 90% nothing goes.
        assert_eq!(plan(&flows[..90], 500 * S, &t, 100).remove, []);
        // Within a rank, the most idle first.
        let few = plan(&flows, 500 * S, &t, 95);
        let r = removed(&few);
        assert_eq!(r.len(), (100 - 95 * 85 / 100) as usize);
        assert_eq!(r[0].0, 2000);
        // With only established flows left, nothing can go.
        let est: Vec<Flow> = flows[..80].to_vec();
        assert_eq!(plan(&est, 500 * S, &t, 80).remove, []);
        // A picked-up flow never answered is not protected.
        let mut picked = est.clone();
        picked[0].entry.flags = CT_F_PICKED_UP;
        assert_eq!(
            removed(&plan(&picked, 500 * S, &t, 80)),
            [(1000, Reason::EarlyDrop)]
        );
    }

    #[test]
    fn masqueraded_flows_expire_and_their_reverse_entries_follow() {
        use dataplane_common::{PROTO_UDP, masq::MasqEntry};
        let t = CtTimeouts::default();
        let mk = |port: u16, state: CtState, last_seen_s: u64, nat: u16| MasqFlow {
            key: CtKey {
                saddr: [10, 244, 1, 5],
                daddr: [203, 0, 113, 10],
                sport: port.to_be_bytes(),
                dport: 53u16.to_be_bytes(),
                proto: PROTO_UDP,
                _pad: [0; 3],
            },
            entry: MasqEntry {
                nat_addr: [192, 168, 0, 1],
                nat_port: nat.to_be_bytes(),
                state: state as u8,
                last_seen_ns: last_seen_s * S,
                ..Default::default()
            },
        };
        let live = mk(1, CtState::UdpReplied, 100, 61_001);
        let old = mk(2, CtState::UdpUnreplied, 60, 61_002);
        assert_eq!(masq_expired(&[live, old], 100 * S, &t), [old]);
        // A reverse entry whose flow left with another port, or is gone.
        let mut moved = live;
        moved.entry.nat_port = 61_003u16.to_be_bytes();
        let reverse: Vec<(CtKey, MasqRev)> = [live, old, moved]
            .iter()
            .map(|f| (f.reply_key(), f.rev()))
            .collect();
        let flows: HashMap<CtKey, MasqEntry> = [(live.key, live.entry)].into_iter().collect();
        assert_eq!(
            masq_orphans(&reverse, &flows, 100 * S, &t),
            [old.reply_key(), moved.reply_key()]
        );
    }

    #[test]
    fn reverse_entries_without_their_live_flow_are_orphans_twice_then_removed() {
        let t = CtTimeouts::default();
        let live = flow(1, CtState::Established, CT_F_SEEN_REPLY, 100);
        let expired = flow(2, CtState::Close, 0, 10);
        let gone = flow(3, CtState::Established, CT_F_SEEN_REPLY, 100);
        // Same tuple as `live`, but another backend: an older flow's.
        let mut moved = live;
        moved.entry.backend.ip = [10, 244, 2, 99];
        let reverse: Vec<(CtKey, RnatEntry)> = [live, expired, gone, moved]
            .iter()
            .map(|f| (f.reply_key(), f.rnat()))
            .collect();
        let flows: HashMap<CtKey, CtEntry> =
            [live, expired].iter().map(|f| (f.key, f.entry)).collect();
        let found = orphans(&reverse, &flows, 100 * S, &t);
        assert_eq!(
            found,
            [expired.reply_key(), gone.reply_key(), moved.reply_key()]
        );
        let (now, next) = confirm_orphans(&HashSet::new(), found.clone());
        assert_eq!(now, []);
        let (now, next) = confirm_orphans(&next, found[..2].to_vec());
        assert_eq!(now, found[..2]);
        assert!(next.is_empty());
    }
}
