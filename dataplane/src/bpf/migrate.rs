//! Map layout changes across versions. A map whose layout changes gets a
//! new name (`ct_v1` becomes `ct_v2`): a pinned map is never reused under
//! its old name with another shape ([`super::load::check_pinned_layouts`]
//! refuses to start on that). What an older agent pinned under a name this
//! binary does not use is a *stale pin*. At start-up:
//!
//! 1. [`Migrator::start`], after the new maps are created and pinned and
//!    before any program is attached: every stale pin with a registered
//!    [`Migration`] has its entries converted into the new maps. The old
//!    programs still run meanwhile, on the old maps.
//! 2. The agent attaches: each pinned link gets the new program in place
//!    (`bpf_link_update`), which now reads the new maps.
//! 3. [`Migrator::finish`], once everything is attached: a second pass
//!    copies what the old programs added between the first pass and the
//!    link update, then the migrated stale pins are removed.
//!
//! An entry already in the new map is never overwritten (`BPF_NOEXIST`):
//! it is the new programs' own, or a newer copy. A stale pin with no
//! registered migration (or with a layout its migration does not expect)
//! is left in place with a warning; `dataplane uninstall` removes it.
//!
//! A migration is a plain function from the old entry's bytes to new
//! entries, so it is unit-tested without a kernel; [`MIGRATIONS`] is the
//! table the agent uses.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use log::{info, warn};

use super::maps::{LAYOUTS, Layout, MapError};

/// One entry a migration writes into a map of this binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The map's name (one of the migration's [`Migration::into`]).
    pub map: &'static str,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// How the entries of an older agent's map become entries of this
/// binary's maps.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// The old map's pin name, e.g. `ct_v1`.
    pub from: &'static str,
    /// The layout the old map has; a pin of that name with another type,
    /// key or value size is not converted (left in place, with a
    /// warning). Its size (`max_entries`, which may have been a flag)
    /// does not matter.
    pub layout: Layout,
    /// The maps of this binary the conversion writes.
    pub into: &'static [&'static str],
    /// One old entry (key and value bytes, as the kernel returns them) to
    /// the new entries it becomes; none drops it.
    pub convert: fn(key: &[u8], value: &[u8]) -> Vec<Entry>,
}

/// The migrations this binary knows, by old map name. A map whose layout
/// changes registers its conversion here when it gets its new name.
pub const MIGRATIONS: &[Migration] = &[
    super::ct::CT_V1_MIGRATION,
    super::ct::RNAT_V1_MIGRATION,
    NODE_CONFIG_V1_MIGRATION,
    STATS_V1_MIGRATION,
];

/// `node_cfg_v1` (56-byte `NodeConfig`): its successor `node_cfg_v2` is
/// written by the agent from its own state before attaching, so no entry
/// is carried over; the old pin goes once the new programs run.
const NODE_CONFIG_V1_MIGRATION: Migration = Migration {
    from: dataplane_common::map_names::previous::NODE_CONFIG_V1,
    layout: Layout {
        kind: MapType::Array,
        key_size: 4,
        value_size: 56,
        max_entries: 1,
    },
    into: &[dataplane_common::map_names::NODE_CONFIG],
    convert: |_, _| Vec::new(),
};

/// `stats_v1` (64 counters per CPU). An array's slots always exist, so
/// they cannot be copied without overwriting the new programs' counts:
/// the counters restart from zero at this upgrade (a Prometheus counter
/// reset), and the old pin goes once the new programs run.
const STATS_V1_MIGRATION: Migration = Migration {
    from: dataplane_common::map_names::previous::STATS_V1,
    layout: Layout {
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: 16,
        max_entries: 64,
    },
    into: &[dataplane_common::map_names::STATS],
    convert: |_, _| Vec::new(),
};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("listing {}: {source}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the pinned map {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("migration from {from}: {map} is not a map of this binary")]
    UnknownTarget {
        from: &'static str,
        map: &'static str,
    },
    #[error("migrating {from} into {map}: {source}")]
    Write {
        from: &'static str,
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {from}: {source}")]
    Read {
        from: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A map as the migration sees it: its layout, its entries, and inserting
/// an entry unless its key is there. The kernel's maps ([`Pinned`]) and an
/// in-memory fake in the tests.
pub trait RawMap {
    fn layout(&self) -> Layout;
    /// Every entry (an entry removed while listing is skipped).
    fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Inserts unless the key is present; whether it inserted.
    fn insert_absent(&mut self, key: &[u8], value: &[u8]) -> io::Result<bool>;
}

impl<T: RawMap + ?Sized> RawMap for &mut T {
    fn layout(&self) -> Layout {
        (**self).layout()
    }
    fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        (**self).entries()
    }
    fn insert_absent(&mut self, key: &[u8], value: &[u8]) -> io::Result<bool> {
        (**self).insert_absent(key, value)
    }
}

/// How many entries a pass wrote and left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Inserted into a new map.
    pub written: usize,
    /// The new map had the key already (the new programs' entry wins).
    pub present: usize,
    /// The conversion returned nothing for the entry, or an entry of the
    /// wrong size or for a map it did not declare.
    pub dropped: usize,
    /// The new map was full.
    pub full: usize,
}

/// Converts every entry of `old` through `m` into `targets` (by map name),
/// never overwriting.
pub fn copy<O: RawMap + ?Sized, T: RawMap>(
    m: &Migration,
    old: &O,
    targets: &mut BTreeMap<&'static str, T>,
) -> Result<Copied, MigrateError> {
    let mut n = Copied::default();
    let entries = old.entries().map_err(|source| MigrateError::Read {
        from: m.from,
        source,
    })?;
    for (k, v) in entries {
        let new = (m.convert)(&k, &v);
        if new.is_empty() {
            n.dropped += 1;
        }
        for e in new {
            let map = e.map;
            let Some(t) = targets.get_mut(map) else {
                n.dropped += 1;
                continue;
            };
            let l = t.layout();
            if e.key.len() != l.key_size as usize || e.value.len() != value_len(&l) {
                n.dropped += 1;
                continue;
            }
            match t.insert_absent(&e.key, &e.value) {
                Ok(true) => n.written += 1,
                Ok(false) => n.present += 1,
                Err(err) if err.raw_os_error() == Some(libc::E2BIG) => n.full += 1,
                Err(source) => {
                    return Err(MigrateError::Write {
                        from: m.from,
                        map,
                        source,
                    });
                }
            }
        }
    }
    Ok(n)
}

/// What a pin under the pin path is to this binary.
#[derive(Clone, Copy, Debug)]
pub enum PinKind {
    /// A map of this binary, or the links directory.
    Current,
    /// An older (or other) agent's map with a registered migration.
    Migrate(&'static Migration),
    /// A stale pin this binary knows nothing about.
    Unknown,
}

impl PartialEq for PinKind {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PinKind::Migrate(a), PinKind::Migrate(b)) => a.from == b.from,
            (PinKind::Current, PinKind::Current) | (PinKind::Unknown, PinKind::Unknown) => true,
            _ => false,
        }
    }
}

/// Sorts a pin name found under the pin path.
pub fn classify(name: &str, registry: &'static [Migration]) -> PinKind {
    if name == super::attach::LINKS_DIR || LAYOUTS.iter().any(|(n, _)| *n == name) {
        return PinKind::Current;
    }
    match registry.iter().find(|m| m.from == name) {
        Some(m) => PinKind::Migrate(m),
        None => PinKind::Unknown,
    }
}

/// The value bytes the kernel reads and writes per entry: per-CPU maps
/// hold one 8-byte aligned value per possible CPU.
fn value_len(l: &Layout) -> usize {
    let v = l.value_size as usize;
    match l.kind {
        MapType::PerCpuHash | MapType::PerCpuArray | MapType::LruPerCpuHash => {
            v.next_multiple_of(8) * aya::util::nr_cpus().unwrap_or(1)
        }
        _ => v,
    }
}

/// A pinned map, through the bpf(2) element commands.
pub struct Pinned {
    map: MapData,
    layout: Layout,
}

impl Pinned {
    pub fn open(path: &Path) -> Result<Pinned, MigrateError> {
        let err = |source| MigrateError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let map = MapData::from_pin(path).map_err(|e| err(e.into()))?;
        let info = map.info().map_err(|e| err(e.into()))?;
        let layout = Layout::of(&info).map_err(err)?;
        Ok(Pinned { map, layout })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_NOEXIST: u64 = 1;

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: bpf(2) with an attribute of the element commands' layout,
    // whose pointers point at buffers of the map's key and value sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RawMap for Pinned {
    fn layout(&self) -> Layout {
        self.layout
    }

    fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let fd = self.fd().as_raw_fd() as u32;
        let ksz = self.layout.key_size as usize;
        let vsz = value_len(&self.layout);
        let mut out = Vec::new();
        let mut prev: Option<Vec<u8>> = None;
        // A hash map restarts from its first key when the previous one
        // was deleted meanwhile: bound the walk.
        let limit = 2 * self.layout.max_entries as usize + 16;
        for _ in 0..limit {
            let mut next = vec![0u8; ksz];
            let mut a = ElemAttr {
                map_fd: fd,
                key: prev.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            let mut value = vec![0u8; vsz];
            let mut a = ElemAttr {
                map_fd: fd,
                key: next.as_ptr() as u64,
                value: value.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
                Ok(()) => out.push((next.clone(), value)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            prev = Some(next);
        }
        Ok(out)
    }

    fn insert_absent(&mut self, key: &[u8], value: &[u8]) -> io::Result<bool> {
        let mut a = ElemAttr {
            map_fd: self.fd().as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: BPF_NOEXIST,
            ..ElemAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut a) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A stale pin being migrated: the old map and the migration.
struct Pending {
    path: PathBuf,
    migration: &'static Migration,
    first: Copied,
}

/// Migration in progress between [`Migrator::start`] and
/// [`Migrator::finish`].
pub struct Migrator {
    pin_path: PathBuf,
    pending: Vec<Pending>,
}

impl Migrator {
    /// Step 1 (see the module doc): the stale pins under `pin_path`, those
    /// with a migration in `registry` converted into this binary's maps
    /// (already pinned there), the others warned about.
    pub fn start(pin_path: &Path, registry: &'static [Migration]) -> Result<Self, MigrateError> {
        let mut pending = Vec::new();
        let list = |source| MigrateError::List {
            path: pin_path.to_owned(),
            source,
        };
        let mut names: Vec<(String, PathBuf)> = fs::read_dir(pin_path)
            .map_err(list)?
            .map(|e| e.map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())))
            .collect::<Result<_, _>>()
            .map_err(list)?;
        names.sort();
        for (name, path) in names {
            match classify(&name, registry) {
                PinKind::Current => {}
                PinKind::Unknown => warn!(
                    "{} is not a map of this agent (an older or newer agent's?) and no migration \
                     is known for it: left in place; `dataplane uninstall` removes it",
                    path.display()
                ),
                PinKind::Migrate(m) => {
                    let old = Pinned::open(&path)?;
                    if !old.layout.same_shape(&m.layout) {
                        warn!(
                            "{} has layout {}, not the {} its migration converts: left in place, \
                             not migrated; `dataplane uninstall` removes it",
                            path.display(),
                            old.layout,
                            m.layout
                        );
                        continue;
                    }
                    let first = migrate_pin(pin_path, m, &old)?;
                    info!(
                        "{}: {} entries migrated into {} ({} there already, {} dropped, {} did not fit)",
                        m.from,
                        first.written,
                        m.into.join(", "),
                        first.present,
                        first.dropped,
                        first.full
                    );
                    pending.push(Pending {
                        path,
                        migration: m,
                        first,
                    });
                }
            }
        }
        Ok(Migrator {
            pin_path: pin_path.to_owned(),
            pending,
        })
    }

    /// How many stale pins are being migrated.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Step 3: once every link runs the new programs, copies what the old
    /// programs added since [`Migrator::start`] and removes the migrated
    /// pins. Returns how many pins went. A failure leaves the pin, to be
    /// migrated again (never overwriting) at the next start.
    pub fn finish(self) -> usize {
        let mut removed = 0;
        for p in self.pending {
            let m = p.migration;
            let again = Pinned::open(&p.path).and_then(|old| migrate_pin(&self.pin_path, m, &old));
            match again {
                Ok(n) => info!(
                    "{}: {} more entries migrated after the programs were replaced ({} in all)",
                    m.from,
                    n.written,
                    n.written + p.first.written
                ),
                Err(e) => {
                    warn!("{e}; {} left in place", p.path.display());
                    continue;
                }
            }
            match fs::remove_file(&p.path) {
                Ok(()) => {
                    removed += 1;
                    info!("removed {} (migrated)", p.path.display());
                }
                Err(e) => warn!("removing {}: {e}", p.path.display()),
            }
        }
        removed
    }
}

/// Opens the migration's targets (this binary's maps, pinned under
/// `pin_path`) and copies `old` into them.
fn migrate_pin(pin_path: &Path, m: &Migration, old: &Pinned) -> Result<Copied, MigrateError> {
    let mut targets = BTreeMap::new();
    for &map in m.into {
        if !LAYOUTS.iter().any(|(n, _)| *n == map) {
            return Err(MigrateError::UnknownTarget { from: m.from, map });
        }
        targets.insert(map, Pinned::open(&pin_path.join(map))?);
    }
    copy(m, old, &mut targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory map.
    #[derive(Default)]
    struct Fake {
        layout: Option<Layout>,
        entries: BTreeMap<Vec<u8>, Vec<u8>>,
    }

    impl Fake {
        fn new(layout: Layout) -> Fake {
            Fake {
                layout: Some(layout),
                entries: BTreeMap::new(),
            }
        }
    }

    impl RawMap for Fake {
        fn layout(&self) -> Layout {
            self.layout.unwrap()
        }
        fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
            Ok(self
                .entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn insert_absent(&mut self, key: &[u8], value: &[u8]) -> io::Result<bool> {
            let l = self.layout();
            if self.entries.len() >= l.max_entries as usize {
                return Err(io::Error::from_raw_os_error(libc::E2BIG));
            }
            if self.entries.contains_key(key) {
                return Ok(false);
            }
            self.entries.insert(key.to_vec(), value.to_vec());
            Ok(true)
        }
    }

    /// A synthetic layout change: `demo_v1` maps a u32 to a u32 counter;
    /// `demo_v2` widens the counter to u64 and adds a u32 flags field, and
    /// drops entries whose counter is 0.
    const OLD: Layout = Layout {
        kind: MapType::Hash,
        key_size: 4,
        value_size: 4,
        max_entries: 16,
    };
    const NEW: Layout = Layout {
        kind: MapType::Hash,
        key_size: 4,
        value_size: 16,
        max_entries: 4,
    };

    fn widen(key: &[u8], value: &[u8]) -> Vec<Entry> {
        let Ok(v) = <[u8; 4]>::try_from(value) else {
            return Vec::new();
        };
        let count = u32::from_ne_bytes(v);
        if count == 0 {
            return Vec::new();
        }
        let mut value = u64::from(count).to_ne_bytes().to_vec();
        value.extend_from_slice(&7u32.to_ne_bytes());
        value.extend_from_slice(&[0; 4]);
        vec![Entry {
            map: "demo_v2",
            key: key.to_vec(),
            value,
        }]
    }

    static DEMO: [Migration; 1] = [Migration {
        from: "demo_v1",
        layout: OLD,
        into: &["demo_v2"],
        convert: widen,
    }];

    fn old_with(entries: &[(u32, u32)]) -> Fake {
        let mut f = Fake::new(OLD);
        for (k, v) in entries {
            f.entries
                .insert(k.to_ne_bytes().to_vec(), v.to_ne_bytes().to_vec());
        }
        f
    }

    #[test]
    fn entries_are_converted_into_the_new_layout() {
        let old = old_with(&[(1, 10), (2, 0), (3, 30)]);
        let mut new = Fake::new(NEW);
        let mut targets: BTreeMap<&'static str, &mut Fake> = BTreeMap::new();
        targets.insert("demo_v2", &mut new);
        let n = copy(&DEMO[0], &old, &mut targets).unwrap();
        drop(targets);
        assert_eq!(
            n,
            Copied {
                written: 2,
                present: 0,
                dropped: 1,
                full: 0
            }
        );
        let v = &new.entries[&3u32.to_ne_bytes().to_vec()];
        assert_eq!(u64::from_ne_bytes(v[..8].try_into().unwrap()), 30);
        assert_eq!(u32::from_ne_bytes(v[8..12].try_into().unwrap()), 7);
        assert!(!new.entries.contains_key(2u32.to_ne_bytes().as_slice()));
    }

    #[test]
    fn an_entry_the_new_map_has_is_never_overwritten_and_a_second_pass_adds_only_new_ones() {
        let mut old = old_with(&[(1, 10)]);
        let mut new = Fake::new(NEW);
        // The new programs made their own entry for key 1 already.
        new.entries
            .insert(1u32.to_ne_bytes().to_vec(), vec![0xaa; 16]);
        {
            let mut t: BTreeMap<&'static str, &mut Fake> = BTreeMap::new();
            t.insert("demo_v2", &mut new);
            let n = copy(&DEMO[0], &old, &mut t).unwrap();
            assert_eq!((n.written, n.present), (0, 1));
        }
        assert_eq!(new.entries[&1u32.to_ne_bytes().to_vec()], vec![0xaa; 16]);
        // The old programs add a flow between the passes.
        old.entries
            .insert(5u32.to_ne_bytes().to_vec(), 50u32.to_ne_bytes().to_vec());
        let mut t: BTreeMap<&'static str, &mut Fake> = BTreeMap::new();
        t.insert("demo_v2", &mut new);
        let n = copy(&DEMO[0], &old, &mut t).unwrap();
        drop(t);
        assert_eq!((n.written, n.present), (1, 1));
        assert_eq!(new.entries.len(), 2);
    }

    #[test]
    fn wrong_sizes_and_undeclared_maps_are_dropped_and_a_full_map_is_counted() {
        fn bad(key: &[u8], _: &[u8]) -> Vec<Entry> {
            vec![
                Entry {
                    map: "demo_v2",
                    key: key.to_vec(),
                    value: vec![0; 3], // wrong value size
                },
                Entry {
                    map: "elsewhere_v1",
                    key: key.to_vec(),
                    value: vec![0; 16],
                },
            ]
        }
        let m = Migration {
            convert: bad,
            ..DEMO[0]
        };
        let old = old_with(&[(1, 1)]);
        let mut new = Fake::new(NEW);
        let mut t: BTreeMap<&'static str, &mut Fake> = BTreeMap::new();
        t.insert("demo_v2", &mut new);
        let n = copy(&m, &old, &mut t).unwrap();
        assert_eq!((n.written, n.dropped), (0, 2));
        drop(t);

        // NEW holds 4 entries: the fifth and sixth do not fit.
        let old = old_with(&[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]);
        let mut new = Fake::new(NEW);
        let mut t: BTreeMap<&'static str, &mut Fake> = BTreeMap::new();
        t.insert("demo_v2", &mut new);
        let n = copy(&DEMO[0], &old, &mut t).unwrap();
        assert_eq!((n.written, n.full), (4, 2));
    }

    #[test]
    fn pins_are_sorted_into_current_migrated_and_unknown() {
        use dataplane_common::map_names;
        for name in map_names::ALL {
            assert_eq!(classify(name, &DEMO), PinKind::Current, "{name}");
        }
        assert_eq!(classify("links", &DEMO), PinKind::Current);
        assert!(matches!(
            classify("demo_v1", &DEMO),
            PinKind::Migrate(m) if m.from == "demo_v1"
        ));
        assert_eq!(classify("svc_v0", &DEMO), PinKind::Unknown);
        assert_eq!(classify("demo_v1", &[]), PinKind::Unknown);
    }

    /// Every registered migration converts from a name this binary no
    /// longer uses into maps it does, and at most one per old name.
    #[test]
    fn the_registry_is_consistent() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert!(
                LAYOUTS.iter().all(|(n, _)| *n != m.from),
                "{} is still a map of this binary",
                m.from
            );
            assert!(!m.into.is_empty(), "{} migrates into nothing", m.from);
            for t in m.into {
                assert!(
                    LAYOUTS.iter().any(|(n, _)| n == t),
                    "{} migrates into {t}, not a map of this binary",
                    m.from
                );
            }
            assert!(
                MIGRATIONS[..i].iter().all(|o| o.from != m.from),
                "two migrations from {}",
                m.from
            );
        }
    }
}
