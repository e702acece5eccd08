//! The conntrack tables (`ct_v2`, `rnat_v2`) and the sweeper's counters
//! (`ct_gc_v1`) as the agent's sweeper and `dataplane conntrack` see them,
//! from the loaded object or from the pins (so they work while the agent
//! is down). The data path owns the entries; from here they are only
//! read, removed (expired, early-dropped, flushed) or, once at an
//! upgrade, copied in from the previous release's `ct_v1`
//! ([`migrate_ct_v1`]).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapType};
use dataplane_common::{
    Backend, CtEntry, CtKey, PROTO_TCP, RnatEntry,
    ct::{self, CT_F_MIGRATED, CT_F_SEEN_REPLY, CT_GC_LEN, CtGc, CtState, CtTimeouts},
    map_names,
};

use super::MapError;

/// One flow: its forward key (client -> ClusterIP) and entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: CtKey,
    pub entry: CtEntry,
}

impl Flow {
    /// The key of its reverse-NAT entry.
    pub fn reply_key(&self) -> CtKey {
        ct::reply_key(&self.key, &self.entry.backend, self.entry.snat)
    }

    /// Its reverse-NAT entry.
    pub fn rnat(&self) -> RnatEntry {
        RnatEntry {
            vip: self.key.daddr,
            vport: self.key.dport,
            client_port: self.key.sport,
            client: self.key.saddr,
        }
    }
}

/// The clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn open_pinned(pin_path: &Path, name: &str) -> Result<MapData, MapError> {
    let path = pin_path.join(name);
    MapData::from_pin(&path).map_err(|source| MapError::Pinned { path, source })
}

/// The two conntrack maps and the sweeper's counters.
pub struct CtTable {
    ct: HashMap<MapData, CtKey, CtEntry>,
    rnat: HashMap<MapData, CtKey, RnatEntry>,
    gc: Array<MapData, u64>,
    cfg: Array<MapData, CtTimeouts>,
    max_entries: u32,
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

fn is_errno(e: &aya::maps::MapError, errno: i32) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno))
}

impl CtTable {
    pub(super) fn from_maps(
        ct: MapData,
        rnat: MapData,
        gc: MapData,
        cfg: MapData,
    ) -> Result<CtTable, MapError> {
        let max_entries = ct.info()?.max_entries();
        Ok(CtTable {
            ct: HashMap::try_from(Map::HashMap(ct))?,
            rnat: HashMap::try_from(Map::HashMap(rnat))?,
            gc: Array::try_from(Map::Array(gc))?,
            cfg: Array::try_from(Map::Array(cfg))?,
            max_entries,
        })
    }

    /// The timeouts the agent gave the data path (`ct_cfg_v1`).
    pub fn timeouts(&self) -> Result<CtTimeouts, MapError> {
        Ok(self.cfg.get(&0, 0)?)
    }

    /// The tables an agent pinned under `pin_path` (running or not).
    pub fn open_pinned(pin_path: &Path) -> Result<CtTable, MapError> {
        CtTable::from_maps(
            open_pinned(pin_path, map_names::CT)?,
            open_pinned(pin_path, map_names::RNAT)?,
            open_pinned(pin_path, map_names::CT_GC)?,
            open_pinned(pin_path, map_names::CT_CONFIG)?,
        )
    }

    /// The table's size (`--ct-max` of the agent that made it).
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Every flow (entries that vanish while iterating are skipped).
    pub fn flows(&self) -> Result<Vec<Flow>, MapError> {
        self.ct
            .iter()
            .map(|r| {
                r.map(|(key, entry)| Flow { key, entry })
                    .map_err(MapError::from)
            })
            .collect()
    }

    /// Every reverse-NAT entry.
    pub fn reverse_entries(&self) -> Result<Vec<(CtKey, RnatEntry)>, MapError> {
        self.rnat
            .iter()
            .map(|r| r.map_err(MapError::from))
            .collect()
    }

    /// The entry of one flow, if it has one.
    pub fn entry(&self, key: &CtKey) -> Result<Option<CtEntry>, MapError> {
        match self.ct.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(e) => match MapError::from(e) {
                MapError::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Removes a flow, both directions. Already gone is fine.
    pub fn remove_flow(&mut self, flow: &Flow) -> Result<(), MapError> {
        for r in [
            self.ct.remove(&flow.key),
            self.rnat.remove(&flow.reply_key()),
        ] {
            match r.map_err(MapError::from) {
                Ok(()) | Err(MapError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes one reverse-NAT entry. Already gone is fine.
    pub fn remove_reverse(&mut self, key: &CtKey) -> Result<(), MapError> {
        match self.rnat.remove(key).map_err(MapError::from) {
            Ok(()) | Err(MapError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stores a flow that is not in the table yet, reverse entry first
    /// as the data path does. `Ok(false)`: it is there already (the data
    /// path's entry wins).
    pub fn insert_new_flow(&mut self, flow: &Flow) -> Result<bool, MapError> {
        if self.entry(&flow.key)?.is_some() {
            return Ok(false);
        }
        let reply = flow.reply_key();
        self.rnat.insert(reply, flow.rnat(), 0)?;
        match self.ct.insert(flow.key, flow.entry, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(false),
            Err(e) => {
                let _ = self.rnat.remove(&reply);
                Err(e.into())
            }
        }
    }

    /// The sweeper's counters, by [`CtGc`].
    pub fn gc_counters(&self) -> Result<Vec<(CtGc, u64)>, MapError> {
        CtGc::ALL
            .iter()
            .map(|&c| Ok((c, self.gc.get(&(c as u32), 0)?)))
            .collect()
    }

    /// Writes one of the sweeper's counters.
    pub fn set_gc_counter(&mut self, c: CtGc, value: u64) -> Result<(), MapError> {
        Ok(self.gc.set(c as u32, value, 0)?)
    }

    /// Adds `n` to one of the sweeper's counters.
    pub fn add_gc_counter(&mut self, c: CtGc, n: u64) -> Result<(), MapError> {
        if n == 0 {
            return Ok(());
        }
        let v = self.gc.get(&(c as u32), 0)?;
        self.set_gc_counter(c, v.saturating_add(n))
    }
}

/// The sweeper's counters from the pins (`dataplane stats`, agent down or
/// not). An agent of a release without them: `Ok(None)`.
pub fn read_pinned_gc(pin_path: &Path) -> Result<Option<Vec<(CtGc, u64)>>, MapError> {
    if !pin_path.join(map_names::CT_GC).exists() {
        return Ok(None);
    }
    let gc: Array<MapData, u64> =
        Array::try_from(Map::Array(open_pinned(pin_path, map_names::CT_GC)?))?;
    let out = CtGc::ALL
        .iter()
        .filter(|&&c| (c as u32) < CT_GC_LEN)
        .map(|&c| Ok((c, gc.get(&(c as u32), 0)?)))
        .collect::<Result<Vec<_>, MapError>>()?;
    Ok(Some(out))
}

// ------------------------------------------------- upgrade from ct_v1

/// Value of the previous release's `ct_v1` (LRU hash, `CtKey` ->
/// this), which had no state and no clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntryV1 {
    pub backend: Backend,
    pub snat: [u8; 4],
    pub svc_id: u32,
}

const _: () = assert!(size_of::<CtEntryV1>() == 16);

// SAFETY: #[repr(C)], Copy, integers and byte arrays only, no padding.
unsafe impl aya::Pod for CtEntryV1 {}

/// What a [`migrate_ct_v1`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// Flows copied into `ct_v2`.
    pub copied: u64,
    /// Flows `ct_v2` had already (an earlier pass, or the new programs).
    pub present: u64,
    /// Flows not copied: `ct_v2` was full.
    pub lost: u64,
}

/// The v2 entry a `ct_v1` flow becomes: established (or UDP replied),
/// seen both ways, last seen `now_ns`. Its state is assumed, not seen;
/// the first packets correct it (a FIN moves it to fin_wait as usual).
pub fn upgrade_v1_entry(key: &CtKey, old: &CtEntryV1, now_ns: u64) -> Flow {
    let state = if key.proto == PROTO_TCP {
        CtState::Established
    } else {
        CtState::UdpReplied
    };
    Flow {
        key: *key,
        entry: CtEntry {
            backend: old.backend,
            snat: old.snat,
            svc_id: old.svc_id,
            created_ns: now_ns,
            last_seen_ns: now_ns,
            state: state as u8,
            flags: CT_F_SEEN_REPLY | CT_F_MIGRATED,
            _pad: [0; 6],
        },
    }
}

fn v1_path(pin_path: &Path) -> PathBuf {
    pin_path.join(map_names::previous::CT_V1)
}

/// Copies the flows of the previous release's pinned `ct_v1` into
/// `table`, each as established with last-seen `now_ns`, with its
/// reverse-NAT entry derived from it (`rnat_v1` holds nothing more).
/// Flows `table` has already are left as they are, so the call can be
/// repeated: once before the new programs are attached (they find the
/// flows at once) and once after (what the old programs added
/// meanwhile), before [`remove_v1_pins`]. `Ok(None)`: nothing pinned.
///
/// The counters `ct_migrated` and `ct_migrate_lost` are added to.
pub fn migrate_ct_v1(
    pin_path: &Path,
    table: &mut CtTable,
    now_ns: u64,
) -> Result<Option<Migration>, MapError> {
    let path = v1_path(pin_path);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|source| MapError::Pinned {
        path: path.clone(),
        source,
    })?;
    let info = data.info()?;
    if info.map_type()? != MapType::LruHash || info.key_size() != 16 || info.value_size() != 16 {
        return Err(MapError::WrongType(map_names::previous::CT_V1));
    }
    let old: HashMap<MapData, CtKey, CtEntryV1> = HashMap::try_from(Map::LruHashMap(data))?;
    let mut m = Migration::default();
    for r in old.iter() {
        let (key, v1) = r?;
        let flow = upgrade_v1_entry(&key, &v1, now_ns);
        match table.insert_new_flow(&flow) {
            Ok(true) => m.copied += 1,
            Ok(false) => m.present += 1,
            Err(MapError::Full) => m.lost += 1,
            Err(e) => return Err(e),
        }
    }
    table.add_gc_counter(CtGc::Migrated, m.copied)?;
    table.add_gc_counter(CtGc::MigrateLost, m.lost)?;
    Ok(Some(m))
}

/// Removes the previous release's conntrack pins (`ct_v1`, `rnat_v1`):
/// only once the new programs are attached and nothing reads them.
/// Returns how many were there.
pub fn remove_v1_pins(pin_path: &Path) -> io::Result<usize> {
    let mut n = 0;
    for name in [map_names::previous::CT_V1, map_names::previous::RNAT_V1] {
        match std::fs::remove_file(pin_path.join(name)) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_flows_become_established_and_replied_now() {
        let key = CtKey {
            saddr: [10, 244, 1, 5],
            daddr: [10, 96, 0, 10],
            sport: [0x9c, 0x40],
            dport: [0, 80],
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let old = CtEntryV1 {
            backend: Backend {
                ip: [10, 244, 2, 7],
                port: [0x1f, 0x90],
                _pad: [0; 2],
            },
            snat: [0; 4],
            svc_id: 3,
        };
        let f = upgrade_v1_entry(&key, &old, 77);
        assert_eq!(f.entry.state, CtState::Established as u8);
        assert_eq!((f.entry.created_ns, f.entry.last_seen_ns), (77, 77));
        assert_eq!(
            (f.entry.backend, f.entry.snat, f.entry.svc_id),
            (old.backend, old.snat, old.svc_id)
        );
        assert_eq!(
            ct::evict_rank(f.entry.state, f.entry.flags),
            None,
            "never early-dropped"
        );
        assert_eq!(f.reply_key().saddr, old.backend.ip);
        assert_eq!(ct::forward_key(&f.rnat(), PROTO_TCP), key);
        let udp = upgrade_v1_entry(
            &CtKey {
                proto: dataplane_common::PROTO_UDP,
                ..key
            },
            &old,
            1,
        );
        assert_eq!(udp.entry.state, CtState::UdpReplied as u8);
    }
}
