//! Looking at a node's pinned state from outside the agent (`dataplane
//! status`, the metrics collector): how full each map is, and which
//! programs the pinned links hold where. It goes by the map names of
//! `dataplane_common::map_names` and reads only what the kernel reports
//! (entry counts by key iteration, `max_entries`, link info), so it does
//! not depend on any map's key or value type.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapType},
    programs::links::{FdLink, LinkType, PinnedLink},
};
use dataplane_common::map_names;

use super::{
    MapError,
    attach::{LINKS_DIR, LinkRole, list_pins},
};

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    /// The pinned name (`ct_v1`).
    pub name: String,
    /// The kernel's map type (`LruHash`).
    pub kind: String,
    /// Entries present now.
    pub entries: u64,
    /// Capacity (`max_entries`).
    pub max_entries: u32,
}

/// `BPF_MAP_GET_NEXT_KEY` (include/uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The part of `union bpf_attr` that `BPF_MAP_GET_NEXT_KEY` reads.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Counts the keys of a map by walking them with `BPF_MAP_GET_NEXT_KEY`.
/// Entries that come and go meanwhile may be counted or not; the walk
/// stops at `limit` (a hash map whose current key is deleted restarts from
/// its first key, so under churn a walk could otherwise go on for long).
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, limit: u64) -> io::Result<u64> {
    let len = key_size.max(1) as usize;
    let (mut cur, mut next) = (vec![0u8; len], vec![0u8; len]);
    let mut n = 0u64;
    while n < limit {
        let attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // No key: the first one.
            key: if n == 0 { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the attribute points at two buffers of the map's key
        // size, which outlive the call; the kernel reads one and writes the
        // other.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKeyAttr,
                size_of::<NextKeyAttr>(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        n += 1;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(n)
}

/// Whether a map of this type holds entries that come and go (hash maps,
/// LRU, LPM trie); arrays always hold `max_entries`.
fn has_fill_level(kind: MapType) -> bool {
    !matches!(
        kind,
        MapType::Array | MapType::PerCpuArray | MapType::RingBuf | MapType::ProgramArray
    )
}

/// How full the map pinned as `pin_path/name` is; `None` for an array
/// (always full) or a map that is not pinned.
pub fn map_fill(pin_path: &Path, name: &str) -> Result<Option<MapFill>, MapError> {
    let path = pin_path.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let pinned = |source| MapError::Pinned {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(pinned)?;
    let info = data.info().map_err(pinned)?;
    let kind = info.map_type()?;
    if !has_fill_level(kind) {
        return Ok(None);
    }
    let entries = count_keys(
        data.fd().as_fd(),
        info.key_size(),
        u64::from(info.max_entries()),
    )
    .map_err(|e| MapError::Io {
        path: path.clone(),
        source: e,
    })?;
    Ok(Some(MapFill {
        name: name.to_owned(),
        kind: format!("{kind:?}"),
        entries,
        max_entries: info.max_entries(),
    }))
}

/// The fill level of every pinned map that has one, by name; a map that
/// cannot be read is reported with its error.
pub fn fill_levels(pin_path: &Path) -> Vec<Result<MapFill, MapError>> {
    map_names::ALL
        .iter()
        .filter_map(|name| map_fill(pin_path, name).transpose())
        .collect()
}

/// A program attached through a link pinned under `<pin-path>/links`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedProgram {
    /// The pin's file name (`pod_port_12`).
    pub pin: String,
    /// The program (`from_pod`), as the pin's role says.
    pub program: String,
    /// Where and how: `tcx ingress`, `tcx egress` or `xdp`, from the
    /// kernel's link info (the direction from the pin's role).
    pub hook: String,
    /// The device, by the pin's name.
    pub ifindex: u32,
    /// The device's name in this network namespace, if it has one here.
    pub iface: Option<String>,
    /// The kernel's id of the attached program (changes when a new agent
    /// replaces it).
    pub program_id: u32,
}

/// The device name of `ifindex` in this network namespace.
fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The links pinned under `<pin_path>/links` and what they hold, by pin
/// name. A pin that is not a link (or not one of ours) is skipped.
pub fn pinned_programs(pin_path: &Path) -> Result<Vec<PinnedProgram>, MapError> {
    let dir: PathBuf = pin_path.join(LINKS_DIR);
    let pins = list_pins(&dir).map_err(|e| MapError::Io {
        path: dir.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    let mut out = Vec::new();
    for (name, path) in pins {
        let Some((role, ifindex)) = LinkRole::parse(&name) else {
            continue;
        };
        let Ok(link) = PinnedLink::from_pin(&path) else {
            continue;
        };
        let link: FdLink = link.into();
        let (hook, program_id) = match link.info() {
            Ok(info) => {
                let hook = match info.link_type() {
                    Ok(LinkType::Tcx | LinkType::Xdp | LinkType::Cgroup) => role.hook().to_owned(),
                    Ok(other) => format!("{other:?}"),
                    Err(e) => e.to_string(),
                };
                (hook, info.program_id())
            }
            Err(e) => (format!("unreadable ({e})"), 0),
        };
        out.push(PinnedProgram {
            pin: name,
            program: role.program().to_owned(),
            hook,
            ifindex,
            iface: ifname(ifindex),
            program_id,
        });
    }
    Ok(out)
}
