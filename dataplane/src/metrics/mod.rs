//! The agent's metrics: the one registry (Prometheus / OpenMetrics text,
//! `prometheus-client`), the typed calls that report into it, and the
//! data path's figures read from the pinned maps at scrape time
//! ([`datapath`]). [`http`] serves it on `--metrics-address` with
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! Every name carries the `dataplane_` prefix and is stable (dashboards
//! and alerts use them); the README lists them.
//!
//! There is one [`Metrics`] per process ([`global`]), so that the parts
//! that run as tasks of their own (the lease keeper, the etcd watches)
//! report into the same registry as the agent's event loop, each through
//! a named call (`lease_renewed`, `watch_relisted`, `observe_apply`, ...).

pub mod datapath;
pub mod http;

use std::{
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// A metric label: one name, one value.
type Label = [(&'static str, &'static str); 1];

/// What an applied event came from, for [`Metrics::observe_apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A change of the lease table (peers).
    Peers,
    /// A change of Services / EndpointSlices.
    Services,
}

impl EventKind {
    fn label(self) -> Label {
        [(
            "kind",
            match self {
                EventKind::Peers => "peers",
                EventKind::Services => "services",
            },
        )]
    }
}

/// What `/readyz` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyPart {
    /// This node holds its subnet lease.
    Lease,
    /// The programs are attached (underlay and pod ports).
    Attached,
    /// The peer maps hold the lease table of a complete listing.
    PeersSynced,
    /// The service maps hold the Services of a complete listing.
    ServicesSynced,
}

impl ReadyPart {
    const ALL: [ReadyPart; 4] = [
        ReadyPart::Lease,
        ReadyPart::Attached,
        ReadyPart::PeersSynced,
        ReadyPart::ServicesSynced,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// How `/readyz` names it when it is missing.
    pub fn describe(self) -> &'static str {
        match self {
            ReadyPart::Lease => "no subnet lease held",
            ReadyPart::Attached => "programs not attached",
            ReadyPart::PeersSynced => "peer maps not synced with etcd",
            ReadyPart::ServicesSynced => "service maps not synced with etcd",
        }
    }
}

/// Buckets of the event-to-map-write histogram: 50 µs to ~3.3 s.
fn apply_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// The registry and the handles of the metrics the agent updates.
pub struct Metrics {
    registry: Registry,
    lease_renewals: Counter,
    lease_renewal_failures: Counter,
    lease_losses: Counter,
    lease_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    etcd_reconnects: Family<Label, Counter>,
    watch_relists: Family<Label, Counter>,
    watch_up: Family<Label, Gauge>,
    apply_seconds: Family<Label, Histogram, fn() -> Histogram>,
    etcd_events: Family<Label, Counter>,
    errors: Counter,
    ready: [AtomicBool; 4],
    ready_gauge: Gauge,
    /// Unix ms of the event loop's last turn, 0 before it runs.
    loop_turned_ms: AtomicU64,
    /// Unix ms of the last etcd event handled, 0 before any.
    last_etcd_event_ms: AtomicU64,
    datapath: datapath::DataPathCollector,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// This process's metrics.
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered (the data path's read
    /// nothing until [`Metrics::read_pins_at`] names the pin path).
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dataplane");
        let lease_renewals = Counter::default();
        registry.register(
            "lease_renewals",
            "Keep-alives of this node's etcd lease that etcd answered",
            lease_renewals.clone(),
        );
        let lease_renewal_failures = Counter::default();
        registry.register(
            "lease_renewal_failures",
            "Keep-alives of this node's etcd lease that failed (retried)",
            lease_renewal_failures.clone(),
        );
        let lease_losses = Counter::default();
        registry.register(
            "lease_losses",
            "Times this node's lease vanished (expired, deleted, overwritten) and had to be re-acquired",
            lease_losses.clone(),
        );
        let lease_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "lease_expiry_timestamp_seconds",
            "When this node's etcd lease runs out unless renewed (Unix time)",
            lease_expiry.clone(),
        );
        let etcd_reconnects = Family::<Label, Counter>::default();
        registry.register(
            "etcd_reconnects",
            "Watches on etcd set up again after the connection or request failed, by watch",
            etcd_reconnects.clone(),
        );
        let watch_relists = Family::<Label, Counter>::default();
        registry.register(
            "etcd_watch_relists",
            "Listings of a watched key range after the first (watch broken, compacted, cancelled), by watch",
            watch_relists.clone(),
        );
        let watch_up = Family::<Label, Gauge>::default();
        registry.register(
            "etcd_watch_up",
            "1 while a watch follows etcd, 0 while it is retrying, by watch",
            watch_up.clone(),
        );
        let etcd_events = Family::<Label, Counter>::default();
        registry.register(
            "etcd_events",
            "Changes from etcd applied by the agent (snapshots and events), by kind",
            etcd_events.clone(),
        );
        let apply_seconds =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(apply_buckets);
        registry.register(
            "reconcile_apply_seconds",
            "Time from an etcd change reaching the agent to its map writes done, by kind",
            apply_seconds.clone(),
        );
        let errors = Counter::default();
        registry.register(
            "agent_errors",
            "Errors the agent recovered from (failed writes, netlink calls); retried",
            errors.clone(),
        );
        let ready_gauge = Gauge::default();
        registry.register(
            "ready",
            "1 when the node is ready: lease held, programs attached, maps synced with etcd",
            ready_gauge.clone(),
        );
        let datapath = datapath::DataPathCollector::default();
        registry.register_collector(Box::new(datapath.clone()));
        Metrics {
            registry,
            lease_renewals,
            lease_renewal_failures,
            lease_losses,
            lease_expiry,
            etcd_reconnects,
            watch_relists,
            watch_up,
            apply_seconds,
            etcd_events,
            errors,
            ready: Default::default(),
            ready_gauge,
            loop_turned_ms: AtomicU64::new(0),
            last_etcd_event_ms: AtomicU64::new(0),
            datapath,
        }
    }

    /// The data path's figures are read from the maps pinned here.
    pub fn read_pins_at(&self, pin_path: PathBuf) {
        self.datapath.set_pin_path(pin_path);
    }

    /// The lease was renewed; it now runs until `expires`.
    pub fn lease_renewed(&self, expires: SystemTime) {
        self.lease_renewals.inc();
        self.lease_held_until(expires);
    }

    /// The lease runs until `expires` (acquired, renewed).
    pub fn lease_held_until(&self, expires: SystemTime) {
        let t = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.lease_expiry.set(t);
    }

    /// When the lease runs out unless renewed, if known.
    pub fn lease_expiry(&self) -> Option<SystemTime> {
        let t = self.lease_expiry.get();
        (t > 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(t))
    }

    /// A renewal failed (it is retried).
    pub fn lease_renewal_failed(&self) {
        self.lease_renewal_failures.inc();
    }

    /// The lease vanished and is being re-acquired.
    pub fn lease_lost(&self) {
        self.lease_losses.inc();
        self.set_ready(ReadyPart::Lease, false);
    }

    /// The watch `watch` is set up again after a failure.
    pub fn etcd_reconnected(&self, watch: &'static str) {
        self.etcd_reconnects
            .get_or_create(&[("watch", watch)])
            .inc();
    }

    /// The watch `watch` listed its range again.
    pub fn watch_relisted(&self, watch: &'static str) {
        self.watch_relists.get_or_create(&[("watch", watch)]).inc();
    }

    /// Whether the watch `watch` follows etcd (true) or is retrying.
    pub fn set_watch_up(&self, watch: &'static str, up: bool) {
        self.watch_up
            .get_or_create(&[("watch", watch)])
            .set(i64::from(up));
    }

    /// Whether every watch seen so far follows etcd; `None` before any
    /// watch started.
    pub fn etcd_connected(&self) -> Option<bool> {
        let mut any = false;
        let mut all = true;
        for w in ["peers", "services", "lease", "config"] {
            if let Some(g) = self.watch_up.get(&[("watch", w)]) {
                any = true;
                all &= g.get() == 1;
            }
        }
        any.then_some(all)
    }

    /// An etcd change of `kind` took `took` from reaching the agent's
    /// loop to its map writes done.
    pub fn observe_apply(&self, kind: EventKind, took: Duration) {
        self.etcd_events.get_or_create(&kind.label()).inc();
        self.apply_seconds
            .get_or_create(&kind.label())
            .observe(took.as_secs_f64());
        self.last_etcd_event_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// When the agent last applied an etcd change.
    pub fn last_etcd_event(&self) -> Option<SystemTime> {
        match self.last_etcd_event_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// An error the agent recovered from.
    pub fn error(&self) {
        self.errors.inc();
    }

    /// Sets one part of readiness.
    pub fn set_ready(&self, part: ReadyPart, ok: bool) {
        self.ready[part.index()].store(ok, Ordering::Relaxed);
        self.ready_gauge.set(i64::from(self.missing().is_empty()));
    }

    /// What keeps the node from being ready (empty: ready).
    pub fn missing(&self) -> Vec<ReadyPart> {
        ReadyPart::ALL
            .into_iter()
            .filter(|p| !self.ready[p.index()].load(Ordering::Relaxed))
            .collect()
    }

    /// The event loop turned (an event or its tick).
    pub fn loop_turned(&self) {
        self.loop_turned_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the event loop last turned; `None` before it runs.
    pub fn since_loop_turned(&self) -> Option<Duration> {
        match self.loop_turned_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(now_ms().saturating_sub(ms))),
        }
    }

    /// Everything, in the OpenMetrics text format (read from the maps
    /// now: call it off the async runtime's workers).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            log::error!("encoding the metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests;
