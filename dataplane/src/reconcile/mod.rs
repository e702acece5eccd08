//! From desired state to map writes. Events change what the agent wants
//! (peers from the lease table, frontends from Services and
//! EndpointSlices, CNI pods, pod ports, the node config); this module turns that
//! into writes in three steps:
//!
//! 1. [`desired`] builds the wanted state in wire types.
//! 2. [`plan`] diffs it against the [`Shadow`] (the one record of what
//!    the maps hold, with the one service-id allocator) and returns
//!    [`MapOp`]s in a safe order. It is pure; its ordering rules are unit
//!    tests.
//! 3. [`apply`] performs them through a [`Sink`] (the BPF maps, or an
//!    in-memory fake in tests), recording each write that took effect.
//!
//! [`Reconciler`] holds the shadow and runs the three steps per kind of
//! change. A failed write stops its plan (later writes may rely on it);
//! the shadow still says what the kernel holds, so planning again later
//! finishes the job.

pub mod desired;
pub mod plan;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use dataplane_common::{EndpointInfo, EndpointKey, NodeConfig, PodPortInfo, PodPortKey, SvcKey};
use log::{debug, warn};

pub use desired::{FrontendState, Frontends, NodeFacts, Peer, Peers, PodEntry, Pods};
pub use state::{MapState, Owners, Shadow};

use crate::{
    bpf::{MapError, MapOp, Maps, PeerEntries, ServiceEntries, maps::Frontend},
    services::ServiceName,
};

/// Where planned writes go.
pub trait Sink {
    /// Performs one write; deleting a missing key is [`MapError::NotFound`].
    fn apply(&mut self, op: &MapOp) -> Result<(), MapError>;
    /// The peer maps, for a full resync.
    fn peer_entries(&self) -> Result<PeerEntries, MapError>;
    /// The agent-owned service maps and the affinity keys.
    fn service_entries(&self) -> Result<ServiceEntries, MapError>;
    /// Endpoints, learnt by the data path or registered.
    fn endpoint_entries(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, MapError>;
    /// The CNI pods' ports.
    fn pod_port_entries(&self) -> Result<Vec<(PodPortKey, PodPortInfo)>, MapError>;
}

impl Sink for Maps {
    fn apply(&mut self, op: &MapOp) -> Result<(), MapError> {
        Maps::apply(self, op)
    }
    fn peer_entries(&self) -> Result<PeerEntries, MapError> {
        Maps::peer_entries(self)
    }
    fn service_entries(&self) -> Result<ServiceEntries, MapError> {
        Maps::service_entries(self)
    }
    fn endpoint_entries(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, MapError> {
        Maps::endpoint_entries(self)
    }
    fn pod_port_entries(&self) -> Result<Vec<(PodPortKey, PodPortInfo)>, MapError> {
        Maps::pod_port_entries(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{op}: {source}")]
    Write {
        op: Box<MapOp>,
        #[source]
        source: MapError,
    },
    #[error("reading the {what} maps: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: MapError,
    },
}

/// Counts of map writes, so tests, the log and the benchmark can check
/// that a change costs writes proportional to the change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub updates: u64,
    pub deletes: u64,
}

/// Performs `ops` in order, recording each write that took effect in
/// `shadow` and counting it in `writes`. A delete of a missing key
/// succeeded (the entry is absent either way). Stops at the first failure.
pub fn apply(
    sink: &mut impl Sink,
    shadow: &mut MapState,
    ops: &[MapOp],
    writes: &mut WriteStats,
) -> Result<(), ReconcileError> {
    for op in ops {
        match sink.apply(op) {
            Ok(()) => {}
            Err(MapError::NotFound) if op.is_delete() => {}
            Err(source) => {
                return Err(ReconcileError::Write {
                    op: Box::new(*op),
                    source,
                });
            }
        }
        debug!("map write: {op}");
        shadow.record(op);
        if op.is_delete() {
            writes.deletes += 1;
        } else {
            writes.updates += 1;
        }
    }
    Ok(())
}

/// Whether a peer resync reads the kernel's maps first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// Diff against the shadow only.
    Incremental,
    /// Take the kernel's maps as the current state first, so entries the
    /// shadow does not know (an earlier run's, or missed events) go.
    Full,
}

/// The shadow and the write counts; see the module doc.
#[derive(Debug, Default)]
pub struct Reconciler {
    shadow: Shadow,
    writes: WriteStats,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the maps hold, as far as the agent wrote them.
    pub fn shadow(&self) -> &Shadow {
        &self.shadow
    }

    /// Writes so far.
    pub fn writes(&self) -> WriteStats {
        self.writes
    }

    /// Rebuilds the shadow's trees with full nodes ([`crate::compact`]).
    pub fn compact(&mut self) {
        self.shadow.compact();
    }

    /// Frontends (service entries) in the maps.
    pub fn frontends(&self) -> usize {
        self.shadow.maps.services.len()
    }

    /// Whether `name` has frontends in the maps.
    pub fn owns_frontends(&self, name: &ServiceName) -> bool {
        self.shadow.owners.of(name).next().is_some()
    }

    fn apply(&mut self, sink: &mut impl Sink, ops: &[MapOp]) -> Result<(), ReconcileError> {
        apply(sink, &mut self.shadow.maps, ops, &mut self.writes)
    }

    pub fn set_node(
        &mut self,
        sink: &mut impl Sink,
        cfg: &NodeConfig,
    ) -> Result<(), ReconcileError> {
        let ops = plan::node(cfg, &self.shadow.maps);
        self.apply(sink, &ops)
    }

    /// Makes the peer maps hold exactly `want`.
    pub fn set_peers(
        &mut self,
        sink: &mut impl Sink,
        want: &Peers,
        resync: Resync,
    ) -> Result<(), ReconcileError> {
        if resync == Resync::Full {
            match sink.peer_entries() {
                Ok(kernel) => {
                    for (net, _) in &kernel.peers {
                        if !want.contains_key(net) && !self.shadow.maps.peers.contains_key(net) {
                            warn!("peer map: removing stale entry {net} (not in etcd)");
                        }
                    }
                    self.shadow.maps.adopt_peers(kernel);
                }
                Err(e) => warn!(
                    "peer map: reading it for a full resync: {e}; diffing against what was written"
                ),
            }
        }
        let ops = plan::peers(want, &self.shadow.maps);
        self.apply(sink, &ops)
    }

    /// Makes the maps hold exactly the frontends `want` for Service
    /// `name`. Costs writes proportional to this one Service.
    pub fn set_service(
        &mut self,
        sink: &mut impl Sink,
        name: &ServiceName,
        want: &Frontends,
    ) -> Result<(), ReconcileError> {
        let ops = plan::service(name, want, &self.shadow);
        let result = self.apply(sink, &ops);
        let mut owned: BTreeSet<SvcKey> = want.keys().copied().collect();
        if result.is_err() {
            // Frontends it could not remove stay its own, so the retry
            // removes them.
            owned.extend(self.shadow.owners.of(name).copied());
        }
        for (k, prev) in self.shadow.owners.set(name, owned) {
            warn!(
                "frontend {} is claimed by Services {prev} and {name}; {name} was programmed last and has it",
                Frontend(&k)
            );
        }
        result
    }

    /// Takes the service maps as the kernel holds them (what an earlier
    /// run wrote) as the current state, with no owners. Called once at
    /// start-up, before the Services are programmed: a frontend a Service
    /// still has keeps its id (its conntrack and affinity entries stay
    /// valid) and gets only its differences written; new frontends get ids
    /// none of the adopted ones carries. [`Reconciler::remove_unowned`]
    /// then removes what no Service claimed. Returns the frontends adopted.
    pub fn adopt_services(&mut self, sink: &mut impl Sink) -> Result<usize, ReconcileError> {
        let kernel = sink
            .service_entries()
            .map_err(|source| ReconcileError::Read {
                what: "service",
                source,
            })?;
        self.shadow.maps.adopt_services(&kernel);
        self.shadow.owners = Owners::default();
        Ok(self.shadow.maps.services.len())
    }

    /// Removes the frontends no Service owns (adopted ones whose Service
    /// is gone or changed while the agent was away), in the orders of
    /// [`plan`]. Returns how many went.
    pub fn remove_unowned(&mut self, sink: &mut impl Sink) -> Result<usize, ReconcileError> {
        let ops = plan::unowned(&self.shadow);
        let n = ops
            .iter()
            .filter(|o| matches!(o, MapOp::DelService(_)))
            .count();
        self.apply(sink, &ops)?;
        Ok(n)
    }

    /// Removes slots and `live` pairs a failed plan left under ids no
    /// frontend carries (they are also reused, and so cleaned, by the next
    /// new frontend). Returns how many writes that took.
    pub fn remove_orphans(&mut self, sink: &mut impl Sink) -> Result<usize, ReconcileError> {
        let ops = plan::orphans(&self.shadow.maps);
        self.apply(sink, &ops)?;
        Ok(ops.len())
    }

    /// Forgets learnt endpoints whose port (host-side ifindex) is not in
    /// `ports` (the bridge's); registered ones stay. Returns how many went.
    pub fn prune_endpoints(
        &mut self,
        sink: &mut impl Sink,
        ports: &BTreeSet<u32>,
    ) -> Result<usize, ReconcileError> {
        let entries = sink
            .endpoint_entries()
            .map_err(|source| ReconcileError::Read {
                what: "endpoint",
                source,
            })?;
        let ops = plan::stale_endpoints(ports, &self.shadow.maps, &entries);
        self.apply(sink, &ops)?;
        Ok(ops.len())
    }

    /// Takes the CNI pods' entries the kernel holds (an earlier run's) as
    /// the current state, so the next [`Reconciler::set_pods`] removes
    /// those no registration wants. Called once at start-up.
    pub fn adopt_pods(&mut self, sink: &mut impl Sink) -> Result<(), ReconcileError> {
        let read = |what| move |source| ReconcileError::Read { what, source };
        let ports = sink.pod_port_entries().map_err(read("pod port"))?;
        let endpoints = sink.endpoint_entries().map_err(read("endpoint"))?;
        self.shadow.maps.adopt_pods(&ports, &endpoints);
        Ok(())
    }

    /// Makes the CNI pods' entries (registered endpoints and their ports)
    /// exactly `want`.
    pub fn set_pods(&mut self, sink: &mut impl Sink, want: &Pods) -> Result<(), ReconcileError> {
        let ops = plan::pods(want, &self.shadow.maps);
        self.apply(sink, &ops)
    }
}
