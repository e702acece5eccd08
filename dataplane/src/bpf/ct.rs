//! The conntrack tables (`ct_v2`, `rnat_v2`) and the sweeper's counters
//! (`ct_gc_v1`) as the agent's sweeper and `dataplane conntrack` see them,
//! from the loaded object or from the pins (so they work while the agent
//! is down). The data path owns the entries; from here they are only
//! read, removed (expired, early-dropped, flushed) or, once at an
//! upgrade, copied in from the previous release's `ct_v1`
//! ([`CT_V1_MIGRATION`], run by [`super::migrate`]).

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapType};
use dataplane_common::{
    Backend, CtEntry, CtKey, PROTO_TCP, RnatEntry,
    ct::{self, CT_F_MIGRATED, CT_F_SEEN_REPLY, CT_GC_LEN, CtGc, CtState, CtTimeouts},
    map_names,
    masq::{self, MasqEntry, MasqRev},
};

use super::{
    MapError,
    maps::Layout,
    migrate::{Entry, Migration},
};

/// One flow: its forward key (client -> ClusterIP) and entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: CtKey,
    pub entry: CtEntry,
}

impl Flow {
    /// The key of its reverse-NAT entry.
    pub fn reply_key(&self) -> CtKey {
        ct::entry_reply_key(&self.key, &self.entry)
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

/// One masqueraded flow: its forward key (pod -> outside, as sent) and
/// entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasqFlow {
    pub key: CtKey,
    pub entry: MasqEntry,
}

impl MasqFlow {
    /// The key of its reverse entry (the reply as it arrives).
    pub fn reply_key(&self) -> CtKey {
        masq::reply_key(&self.key, self.entry.nat_addr, self.entry.nat_port)
    }

    /// Its reverse entry.
    pub fn rev(&self) -> MasqRev {
        MasqRev {
            pod: self.key.saddr,
            pod_port: self.key.sport,
            _pad: [0; 2],
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

/// `masq_v1` (forward) and `masq_rev_v1` (reverse).
type MasqMaps = (
    HashMap<MapData, CtKey, MasqEntry>,
    HashMap<MapData, CtKey, MasqRev>,
);

/// The conntrack maps (Service flows, masqueraded flows) and the
/// sweeper's counters.
pub struct CtTable {
    ct: HashMap<MapData, CtKey, CtEntry>,
    rnat: HashMap<MapData, CtKey, RnatEntry>,
    /// `masq_v1` and `masq_rev_v1`; `None` in the pins of a release
    /// without masquerade.
    masq: Option<MasqMaps>,
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
        masq: Option<(MapData, MapData)>,
    ) -> Result<CtTable, MapError> {
        let max_entries = ct.info()?.max_entries();
        let masq = match masq {
            Some((fwd, rev)) => Some((
                HashMap::try_from(Map::HashMap(fwd))?,
                HashMap::try_from(Map::HashMap(rev))?,
            )),
            None => None,
        };
        Ok(CtTable {
            ct: HashMap::try_from(Map::HashMap(ct))?,
            rnat: HashMap::try_from(Map::HashMap(rnat))?,
            masq,
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
            if pin_path.join(map_names::MASQ).exists() {
                Some((
                    open_pinned(pin_path, map_names::MASQ)?,
                    open_pinned(pin_path, map_names::MASQ_REV)?,
                ))
            } else {
                None
            },
        )
    }

    /// Every masqueraded flow (none without the masquerade maps).
    pub fn masq_flows(&self) -> Result<Vec<MasqFlow>, MapError> {
        let Some((fwd, _)) = &self.masq else {
            return Ok(Vec::new());
        };
        fwd.iter()
            .map(|r| {
                r.map(|(key, entry)| MasqFlow { key, entry })
                    .map_err(MapError::from)
            })
            .collect()
    }

    /// Every masquerade reverse entry.
    pub fn masq_reverse_entries(&self) -> Result<Vec<(CtKey, MasqRev)>, MapError> {
        let Some((_, rev)) = &self.masq else {
            return Ok(Vec::new());
        };
        rev.iter().map(|r| r.map_err(MapError::from)).collect()
    }

    /// The entry of one masqueraded flow, if it has one.
    pub fn masq_entry(&self, key: &CtKey) -> Result<Option<MasqEntry>, MapError> {
        let Some((fwd, _)) = &self.masq else {
            return Ok(None);
        };
        match fwd.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(e) => match MapError::from(e) {
                MapError::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Removes a masqueraded flow, both directions. Already gone is fine.
    pub fn remove_masq_flow(&mut self, flow: &MasqFlow) -> Result<(), MapError> {
        let Some((fwd, rev)) = &mut self.masq else {
            return Ok(());
        };
        for r in [fwd.remove(&flow.key), rev.remove(&flow.reply_key())] {
            match r.map_err(MapError::from) {
                Ok(()) | Err(MapError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes one masquerade reverse entry. Already gone is fine.
    pub fn remove_masq_reverse(&mut self, key: &CtKey) -> Result<(), MapError> {
        let Some((_, rev)) = &mut self.masq else {
            return Ok(());
        };
        match rev.remove(key).map_err(MapError::from) {
            Ok(()) | Err(MapError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
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
            snat_port: [0; 2],
            _pad: [0; 4],
        },
    }
}

/// The previous release's `ct_v1` (LRU, `CtKey` -> [`CtEntryV1`]), as
/// [`super::migrate`] converts it at an upgrade: each flow becomes a
/// `ct_v2` flow ([`upgrade_v1_entry`], last seen at the migration) and
/// its `rnat_v2` entry, written reverse entry first so the data path never
/// finds a flow whose replies it cannot translate.
pub const CT_V1_MIGRATION: Migration = Migration {
    from: map_names::previous::CT_V1,
    layout: Layout {
        kind: MapType::LruHash,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<CtEntryV1>() as u32,
        max_entries: 262_144,
    },
    into: &[map_names::RNAT, map_names::CT],
    convert: convert_ct_v1,
};

/// The previous release's `rnat_v1`: everything in it is derived from
/// `ct_v1` again ([`CT_V1_MIGRATION`]), so its entries are dropped and the
/// pin goes with the migration.
pub const RNAT_V1_MIGRATION: Migration = Migration {
    from: map_names::previous::RNAT_V1,
    layout: Layout {
        kind: MapType::LruHash,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<RnatEntry>() as u32,
        max_entries: 262_144,
    },
    into: &[map_names::RNAT],
    convert: |_, _| Vec::new(),
};

fn convert_ct_v1(key: &[u8], value: &[u8]) -> Vec<Entry> {
    let (Some(key), Some(old)) = (from_bytes::<CtKey>(key), from_bytes::<CtEntryV1>(value)) else {
        return Vec::new();
    };
    let flow = upgrade_v1_entry(&key, &old, monotonic_ns());
    vec![
        Entry {
            map: map_names::RNAT,
            key: bytes_of(&flow.reply_key()),
            value: bytes_of(&flow.rnat()),
        },
        Entry {
            map: map_names::CT,
            key: bytes_of(&flow.key),
            value: bytes_of(&flow.entry),
        },
    ]
}

fn from_bytes<T: aya::Pod>(b: &[u8]) -> Option<T> {
    // SAFETY: T is Pod (any bytes are a valid T); the length is checked.
    (b.len() == size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) })
}

fn bytes_of<T: aya::Pod>(v: &T) -> Vec<u8> {
    // SAFETY: T is Pod: plain bytes, no padding with undefined contents.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A previous-release flow: 10.244.1.5:40000 -> 10.96.0.10:80 sent to
    /// 10.244.2.7:8080, service id 3.
    fn v1_flow() -> (CtKey, CtEntryV1) {
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
        (key, old)
    }

    #[test]
    fn v1_flows_become_established_and_replied_now() {
        let (key, old) = v1_flow();
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

    #[test]
    fn the_registered_ct_v1_migration_writes_the_reply_entry_first() {
        let (key, old) = v1_flow();
        let out = (CT_V1_MIGRATION.convert)(&bytes_of(&key), &bytes_of(&old));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].map, map_names::RNAT);
        assert_eq!(out[1].map, map_names::CT);
        let ct: CtEntry = from_bytes(&out[1].value).unwrap();
        assert_eq!(from_bytes::<CtKey>(&out[1].key), Some(key));
        assert_eq!((ct.backend, ct.svc_id), (old.backend, 3));
        assert_eq!(ct.state, CtState::Established as u8);
        let reply: CtKey = from_bytes(&out[0].key).unwrap();
        assert_eq!(reply.saddr, old.backend.ip);
        // Bytes of the wrong size are dropped, not misread.
        assert!((CT_V1_MIGRATION.convert)(&[0; 15], &bytes_of(&old)).is_empty());
        assert!((RNAT_V1_MIGRATION.convert)(&[0; 16], &[0; 12]).is_empty());
    }
}
