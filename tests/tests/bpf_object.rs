//! The names the agent uses for maps and programs
//! (`dataplane_common::map_names::ALL`, `prog_names::ALL`) are exactly those
//! in the built BPF object, where `dataplane-ebpf/src/maps.rs` has to spell
//! the map names as literals (`#[btf_map(name = ...)]` takes nothing else).
//! The object is parsed, not loaded: no root needed.

use aya_obj::{EbpfSectionKind, Object};
use dataplane_common::{map_names, prog_names};

/// aya-log's ring buffer, present because the programs log rare events.
const AYA_LOG_MAP: &str = "AYA_LOGS";

fn object() -> Object {
    Object::parse(dataplane::BPF_OBJECT).expect("the embedded BPF object parses")
}

fn sorted<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = names.into_iter().collect();
    v.sort_unstable();
    v
}

#[test]
fn map_names_are_exactly_the_objects_maps() {
    let obj = object();
    let ours = sorted(
        obj.maps
            .iter()
            .filter(|(_, m)| m.section_kind() == EbpfSectionKind::BtfMaps)
            .map(|(n, _)| n.as_str()),
    );
    let listed = sorted(map_names::ALL.iter().copied());
    assert_eq!(ours, listed, "BTF maps in the object vs map_names::ALL");
    let mut dedup = listed.clone();
    dedup.dedup();
    assert_eq!(dedup, listed, "map_names::ALL lists a name twice");
    // Anything else is aya-log's or global data, not a map of ours.
    for (name, m) in &obj.maps {
        match m.section_kind() {
            EbpfSectionKind::BtfMaps
            | EbpfSectionKind::Data
            | EbpfSectionKind::Rodata
            | EbpfSectionKind::Bss => {}
            EbpfSectionKind::Maps if name == AYA_LOG_MAP => {}
            kind => panic!("map {name} ({kind:?}) is not in map_names::ALL"),
        }
    }
}

#[test]
fn prog_names_are_exactly_the_objects_programs() {
    let obj = object();
    assert_eq!(
        sorted(obj.programs.keys().map(String::as_str)),
        sorted(prog_names::ALL.iter().copied()),
    );
}

/// The layouts the agent checks pinned maps against
/// (`dataplane::bpf::LAYOUTS`) are the object's: type, key and value
/// sizes, max_entries.
#[test]
fn map_layouts_are_the_objects() {
    let obj = object();
    let layouts = dataplane::bpf::LAYOUTS;
    assert_eq!(
        sorted(layouts.iter().map(|(n, _)| *n)),
        sorted(map_names::ALL.iter().copied()),
        "one layout per map"
    );
    for (name, want) in layouts {
        let m = obj
            .maps
            .get(*name)
            .unwrap_or_else(|| panic!("{name} not in the object"));
        let have = (m.map_type(), m.key_size(), m.value_size(), m.max_entries());
        let listed = (
            want.kind as u32,
            want.key_size,
            want.value_size,
            want.max_entries,
        );
        assert_eq!(have, listed, "{name}: object vs LAYOUTS ({want})");
    }
}

/// Per-CPU hash maps are allocated per entry (`BPF_F_NO_PREALLOC`): their
/// memory follows what they hold, not max_entries × CPUs.
#[test]
fn per_cpu_hash_maps_are_not_preallocated() {
    const BPF_F_NO_PREALLOC: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    let obj = object();
    let mut per_cpu_hashes = 0;
    for name in map_names::ALL {
        let m = &obj.maps[*name];
        let no_prealloc = m.map_flags() & BPF_F_NO_PREALLOC != 0;
        if m.map_type() == BPF_MAP_TYPE_PERCPU_HASH {
            per_cpu_hashes += 1;
            assert!(no_prealloc, "{name} is a per-CPU hash, preallocated");
        }
    }
    assert!(per_cpu_hashes > 0, "svc_stats_v1 is a per-CPU hash");
    assert_ne!(
        obj.maps[map_names::SVC_STATS].map_flags() & BPF_F_NO_PREALLOC,
        0
    );
}
