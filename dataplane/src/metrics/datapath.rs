//! The data path's figures, read from the pinned maps at every scrape (a
//! collector, not a copy kept up to date): packets and bytes per outcome
//! and drops by reason (`stats_v2`), new flows and rejections per Service
//! frontend (`svc_stats_v1`), and how full each map is (entries against
//! `max_entries`, conntrack among them).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use dataplane_common::{Counter, Stat, SvcCounters, SvcKey};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::bpf::{self, MapFill, maps::Frontend};

/// What one scrape reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per outcome, summed over CPUs.
    pub stats: Vec<(Stat, Counter)>,
    /// Per frontend, summed over CPUs.
    pub services: Vec<(SvcKey, SvcCounters)>,
    /// Fill levels of the maps that have one.
    pub fill: Vec<MapFill>,
}

impl Snapshot {
    /// Reads the maps pinned under `pin_path`; what cannot be read is
    /// left out (and logged).
    pub fn read(pin_path: &Path) -> Snapshot {
        let mut s = Snapshot::default();
        match bpf::read_pinned_stats(pin_path) {
            Ok(v) => s.stats = v,
            Err(e) => log::warn!("metrics: {e}"),
        }
        match bpf::read_pinned_svc_stats(pin_path) {
            Ok(v) => s.services = v,
            Err(e) => log::warn!("metrics: {e}"),
        }
        for f in bpf::fill_levels(pin_path) {
            match f {
                Ok(f) => s.fill.push(f),
                Err(e) => log::warn!("metrics: {e}"),
            }
        }
        s
    }
}

/// Whether an outcome is a drop (its name says so).
pub fn is_drop(stat: Stat) -> bool {
    stat.name().starts_with("drop_")
}

type Source = Box<dyn Fn() -> Snapshot + Send + Sync>;

/// Reads a [`Snapshot`] at every scrape, once told where from.
#[derive(Clone, Default)]
pub struct DataPathCollector {
    source: Arc<OnceLock<Source>>,
}

impl std::fmt::Debug for DataPathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPathCollector").finish_non_exhaustive()
    }
}

impl DataPathCollector {
    /// Reads the maps pinned under `pin_path` from now on (the first call
    /// wins).
    pub fn set_pin_path(&self, pin_path: PathBuf) {
        let _ = self.source.set(Box::new(move || Snapshot::read(&pin_path)));
    }

    /// Encodes whatever `source` returns (tests).
    pub fn set_source(&self, source: impl Fn() -> Snapshot + Send + Sync + 'static) {
        let _ = self.source.set(Box::new(source));
    }
}

/// One labelled family of constant values.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one snapshot (the names here are part of the README's table).
pub fn encode_snapshot(s: &Snapshot, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let outcome = |st: Stat| vec![("outcome", st.name().to_owned())];
    family(
        &mut enc,
        "packets",
        "Packets the BPF programs handled, by outcome (dataplane stats' names)",
        MetricType::Counter,
        s.stats
            .iter()
            .map(|(st, c)| (outcome(*st), ConstCounter::new(c.packets))),
    )?;
    family(
        &mut enc,
        "bytes",
        "Bytes the BPF programs handled, by outcome",
        MetricType::Counter,
        s.stats
            .iter()
            .map(|(st, c)| (outcome(*st), ConstCounter::new(c.bytes))),
    )?;
    family(
        &mut enc,
        "drops",
        "Packets the BPF programs dropped, by reason (the drop_ outcomes)",
        MetricType::Counter,
        s.stats
            .iter()
            .filter(|(st, _)| is_drop(*st))
            .map(|(st, c)| {
                (
                    vec![("reason", st.name().to_owned())],
                    ConstCounter::new(c.packets),
                )
            }),
    )?;
    let frontend = |k: &SvcKey| vec![("frontend", Frontend(k).to_string())];
    family(
        &mut enc,
        "service_new_flows",
        "New connections sent to a backend, by Service frontend (ClusterIP:port/protocol)",
        MetricType::Counter,
        s.services
            .iter()
            .map(|(k, c)| (frontend(k), ConstCounter::new(c.new_flows))),
    )?;
    family(
        &mut enc,
        "service_rejections",
        "New connections rejected (RST / ICMP), by Service frontend",
        MetricType::Counter,
        s.services
            .iter()
            .map(|(k, c)| (frontend(k), ConstCounter::new(c.rejections))),
    )?;
    family(
        &mut enc,
        "map_entries",
        "Entries in a BPF map now (hash, LRU and LPM maps), by map",
        MetricType::Gauge,
        s.fill.iter().map(|f| {
            (
                vec![("map", f.name.clone())],
                ConstGauge::new(f.entries as i64),
            )
        }),
    )?;
    family(
        &mut enc,
        "map_capacity",
        "max_entries of a BPF map, by map",
        MetricType::Gauge,
        s.fill.iter().map(|f| {
            (
                vec![("map", f.name.clone())],
                ConstGauge::new(i64::from(f.max_entries)),
            )
        }),
    )?;
    Ok(())
}

impl Collector for DataPathCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.source.get() {
            Some(read) => encode_snapshot(&read(), enc),
            None => Ok(()),
        }
    }
}
