//! `dataplane status`: this node's view, from the agent's status record
//! ([`record`]) and the pinned maps and links, so it works while the
//! agent is down and says so ([`NodeStatus::gather`]); shown as a table
//! or as JSON ([`render`]).

pub mod record;
pub mod render;

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::bpf::{self, MapFill, PinnedProgram};
use dataplane_common::map_names;
pub use record::{StatusRecord, record_path};

/// The agent as `dataplane status` finds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The process that wrote the record still runs.
    pub running: bool,
    /// Its PID, from the record.
    pub pid: Option<u32>,
    /// Where the record is.
    pub record_path: String,
    /// How old the record is, in seconds.
    pub record_age_s: Option<f64>,
    /// Why there is no record, or what is wrong with it.
    pub record_error: Option<String>,
    /// An agent that holds this pin path but has not written its record
    /// (yet): it is starting, waiting for etcd, a config or a lease.
    pub starting_pid: Option<u32>,
}

/// Packets dropped for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Everything `dataplane status` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pin_path: String,
    pub agent: AgentState,
    /// What the agent last wrote (its node, lease, etcd, peers, Services).
    pub record: Option<StatusRecord>,
    /// Seconds left on the lease as of now (negative: expired), if known.
    pub lease_left_s: Option<f64>,
    /// Conntrack use against capacity (`ct_v2`).
    pub conntrack: Option<MapFill>,
    /// How full each map is (hash, LRU, LPM).
    pub maps: Vec<MapFill>,
    /// Every drop reason, zero or not.
    pub drops: Vec<DropCount>,
    /// The programs attached through pinned links.
    pub programs: Vec<PinnedProgram>,
    /// What could not be read.
    pub problems: Vec<String>,
}

fn age_s(now: SystemTime, then_ms: u64) -> f64 {
    match now.duration_since(record::from_unix_ms(then_ms)) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl NodeStatus {
    /// Reads the record and the pins of the agent with `pin_path`.
    pub fn gather(pin_path: &Path, now: SystemTime) -> NodeStatus {
        let path = record_path(pin_path);
        let rec = StatusRecord::read(&path);
        let alive = rec.as_ref().is_ok_and(record::writer_alive);
        let mut st = NodeStatus::from_record(pin_path, &path, rec, alive, now);
        if !alive {
            st.agent.starting_pid = crate::agent::instance::pin_holder(pin_path)
                .filter(|&pid| pid != std::process::id() && record::is_agent_process(pid));
        }
        match bpf::read_pinned_stats(pin_path) {
            Ok(stats) => {
                st.drops = stats
                    .into_iter()
                    .filter(|(s, _)| crate::metrics::datapath::is_drop(*s))
                    .map(|(s, c)| DropCount {
                        reason: s.name().to_owned(),
                        packets: c.packets,
                        bytes: c.bytes,
                    })
                    .collect()
            }
            Err(e) => st.problems.push(format!("counters: {e}")),
        }
        for f in bpf::fill_levels(pin_path) {
            match f {
                Ok(f) => st.maps.push(f),
                Err(e) => st.problems.push(format!("map fill: {e}")),
            }
        }
        st.conntrack = st.maps.iter().find(|m| m.name == map_names::CT).cloned();
        if st.conntrack.is_none() {
            st.problems.push(format!(
                "no conntrack map {} under {}",
                map_names::CT,
                pin_path.display()
            ));
        }
        match bpf::pinned_programs(pin_path) {
            Ok(p) => st.programs = p,
            Err(e) => st.problems.push(format!("pinned links: {e}")),
        }
        st
    }

    /// The part that comes from the record (`alive`: its writer runs).
    pub fn from_record(
        pin_path: &Path,
        path: &Path,
        rec: Result<StatusRecord, record::RecordError>,
        alive: bool,
        now: SystemTime,
    ) -> NodeStatus {
        let (rec, record_error) = match rec {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let lease_left_s = rec
            .as_ref()
            .and_then(|r| r.lease.expires_at_ms)
            .map(|ms| -age_s(now, ms));
        NodeStatus {
            pin_path: pin_path.display().to_string(),
            agent: AgentState {
                running: alive,
                pid: rec.as_ref().map(|r| r.pid),
                record_path: path.display().to_string(),
                record_age_s: rec.as_ref().map(|r| age_s(now, r.written_at_ms)),
                record_error,
                starting_pid: None,
            },
            record: rec,
            lease_left_s,
            conntrack: None,
            maps: Vec::new(),
            drops: Vec::new(),
            programs: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// A duration as `3d4h`, `2h5m`, `4m10s`, `12s`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests;
