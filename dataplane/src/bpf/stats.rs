//! The data path's counters: per outcome ([`Stat`]) and per frontend,
//! summed over CPUs, from the loaded object or from the pins of a running
//! agent (`dataplane stats`).

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use dataplane_common::{Counter, STATS_LEN, Stat, SvcCounters, SvcKey, map_names};

use super::MapError;

pub(super) fn read_stats(
    map: &PerCpuArray<MapData, Counter>,
) -> Result<Vec<(Stat, Counter)>, MapError> {
    let mut out = Vec::new();
    for &stat in Stat::ALL {
        let idx = stat as u32;
        if idx >= STATS_LEN {
            continue;
        }
        let per_cpu = map.get(&idx, 0)?;
        let mut sum = Counter::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        out.push((stat, sum));
    }
    Ok(out)
}

fn open_pinned(pin_path: &Path, name: &str) -> Result<MapData, MapError> {
    let path = pin_path.join(name);
    MapData::from_pin(&path).map_err(|source| MapError::Pinned { path, source })
}

/// Reads the counters from the pinned stats map of a running agent.
pub fn read_pinned_stats(pin_path: &Path) -> Result<Vec<(Stat, Counter)>, MapError> {
    let data = open_pinned(pin_path, map_names::STATS)?;
    let map: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    read_stats(&map)
}

/// Per-frontend counters from the pinned map of a running agent.
pub fn read_pinned_svc_stats(pin_path: &Path) -> Result<Vec<(SvcKey, SvcCounters)>, MapError> {
    let data = open_pinned(pin_path, map_names::SVC_STATS)?;
    let map: PerCpuHashMap<MapData, SvcKey, SvcCounters> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
    Ok(read_svc_stats(&map))
}

/// Every frontend's counters, summed over the CPUs, in key order.
pub(super) fn read_svc_stats(
    map: &PerCpuHashMap<MapData, SvcKey, SvcCounters>,
) -> Vec<(SvcKey, SvcCounters)> {
    let mut out = Vec::new();
    for (k, per_cpu) in map.iter().filter_map(Result::ok) {
        let sum = per_cpu.iter().fold(SvcCounters::default(), |mut s, c| {
            s.new_flows += c.new_flows;
            s.packets += c.packets;
            s.bytes += c.bytes;
            s.rejections += c.rejections;
            s
        });
        out.push((k, sum));
    }
    out.sort_by_key(|(k, _)| *k);
    out
}
