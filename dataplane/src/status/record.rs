//! The status record: what only the agent knows about its node (lease
//! expiry, etcd connection, peers and since when, Services and their
//! backends, readiness), written by the agent as one JSON file under
//! [`RUN_DIR`] on changes (at most once a second) and at every tick, so
//! that `dataplane status` can show it, also once the agent has stopped,
//! saying how old it is.
//!
//! Written atomically: a temporary file in the same directory, then a
//! rename, so a reader never sees half a record.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::agent::instance::{LOCK_DIR, escape};

/// Where the records live (beside the agents' lock files).
pub const RUN_DIR: &str = LOCK_DIR;

/// The format's version; a reader refuses others.
pub const VERSION: u32 = 1;

/// The record of the agent with this `--pin-path`:
/// `<RUN_DIR>/status<escaped pin path>.json`.
pub fn record_path(pin_path: &Path) -> PathBuf {
    Path::new(RUN_DIR).join(format!(
        "status{}.json",
        escape(&pin_path.to_string_lossy())
    ))
}

/// Unix time in milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time of a Unix millisecond count.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Everything the agent writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// [`VERSION`].
    pub version: u32,
    /// The agent's process.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field
    /// 22): with the PID, it tells the agent from a later process that
    /// reuses the number.
    pub start_ticks: u64,
    pub started_at_ms: u64,
    pub written_at_ms: u64,
    pub pin_path: String,
    pub node: NodeRecord,
    pub lease: LeaseRecord,
    pub etcd: EtcdRecord,
    /// What keeps the node from being ready (empty: ready).
    pub not_ready: Vec<String>,
    /// Other nodes' subnets, by subnet.
    pub peers: Vec<PeerRecord>,
    /// Services that have frontends on this node, by name.
    pub services: Vec<ServiceRecord>,
    /// Errors the agent recovered from so far.
    pub errors: u64,
}

/// This node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub subnet: String,
    pub network: String,
    pub public_ip: String,
    pub vtep_mac: String,
    pub underlay: String,
    pub bridge: String,
    /// `tc` or `xdp`, as resolved.
    pub decap: String,
    pub mtu: u32,
}

/// This node's lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Whether the agent holds it (false while re-acquiring).
    pub held: bool,
    /// When it runs out unless renewed.
    pub expires_at_ms: Option<u64>,
}

/// The agent's etcd.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdRecord {
    pub endpoints: Vec<String>,
    /// Every watch follows etcd (`None`: no watch started yet).
    pub connected: Option<bool>,
    /// When the agent last applied a change from etcd.
    pub last_event_at_ms: Option<u64>,
}

/// A peer: another node's lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub subnet: String,
    pub public_ip: String,
    pub vtep_mac: String,
    /// Since when the agent has it as it is now (added or changed).
    pub since_ms: u64,
}

/// A Service with frontends on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// `namespace/name`.
    pub name: String,
    /// Its frontends (ClusterIP, port, protocol) in the maps.
    pub frontends: usize,
    /// Distinct endpoint addresses that are ready.
    pub ready: usize,
    /// Distinct endpoint addresses, ready or not.
    pub total: usize,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no status record at {0} (no agent has run with this --pin-path since boot)")]
    Missing(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a status record: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: status record version {found}, this binary reads {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

impl StatusRecord {
    /// Writes `self` to `path` atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.write_all(b"\n")?;
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Reads the record at `path`.
    pub fn read(path: &Path) -> Result<StatusRecord, RecordError> {
        let body = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordError::Missing(path.to_owned()));
            }
            Err(source) => {
                return Err(RecordError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let rec: StatusRecord =
            serde_json::from_slice(&body).map_err(|source| RecordError::Malformed {
                path: path.to_owned(),
                source,
            })?;
        if rec.version != VERSION {
            return Err(RecordError::Version {
                path: path.to_owned(),
                found: rec.version,
            });
        }
        Ok(rec)
    }
}

/// The start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`); `None` when there is no such process.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself: fields are
/// counted from the last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the agent that wrote `rec` still runs: its PID exists and
/// started when the record says.
pub fn writer_alive(rec: &StatusRecord) -> bool {
    rec.pid != 0 && process_start_ticks(rec.pid) == Some(rec.start_ticks)
}

/// Whether `pid` runs this program (the same executable as this
/// process, or one named `dataplane`).
pub fn is_agent_process(pid: u32) -> bool {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    if exe.is_some() && exe == std::env::current_exe().ok() {
        return true;
    }
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "dataplane")
}
