//! The data plane as the kernel holds it: the BPF object, its maps and its
//! attachments. This is the only module that uses `aya::maps` and
//! `aya::programs`. It speaks the wire types of `dataplane_common` only and
//! knows nothing of leases or Services: [`crate::reconcile`] decides what
//! to write, as [`MapOp`]s, and in which order.
//!
//! - [`bpffs`]: mounting the BPF filesystem the maps are pinned on, and
//!   removing every pin (`dataplane uninstall`).
//! - [`load`]: loading the object, pinning its maps, the verifier's log
//!   when it rejects a program.
//! - [`attach`]: decapsulation on the underlay, `from_pod` on pod ports
//!   (bridge ports and CNI pods' devices), as links pinned under
//!   `<pin-path>/links` that outlive the agent and are adopted by the
//!   next one.
//! - [`maps`]: typed handles to every map and [`Maps::apply`], the one
//!   place a map is written.
//! - [`migrate`]: maps of an older agent under names this binary no
//!   longer uses, converted into their successors across an upgrade.
//! - [`ct`]: the conntrack tables (list, sweep, flush, and the migration
//!   of the previous release's `ct_v1`, registered with [`migrate`]), also
//!   from the pins while the agent is down.
//! - [`stats`]: the counters, also read from a running agent's pins.
//! - [`logs`]: forwarding the data path's aya-log records (`--bpf-log`).
//! - [`inspect`]: map fill levels and pinned programs, read from the pins
//!   (`dataplane status`, metrics).

pub mod attach;
pub mod bpffs;
pub mod ct;
pub mod inspect;
pub mod load;
pub mod logs;
pub mod maps;
pub mod migrate;
pub mod stats;

use std::path::Path;

use aya::Ebpf;
use dataplane_common::{Counter, Stat};

pub use attach::{AttachError, Decap};
pub use bpffs::{BpffsError, Removed, ensure_bpffs, uninstall};
pub use ct::{CtTable, Flow, MasqFlow};
pub use inspect::{MapFill, PinnedProgram, fill_levels, map_fill, pinned_programs};
pub use load::{LoadError, LoadOptions};
pub use logs::BpfLog;
pub use maps::{
    LAYOUTS, Layout, MapError, MapOp, Maps, PeerEntries, SIZED_BY_CT_MAX, ServiceEntries, layouts,
};
pub use migrate::{MigrateError, Migration, Migrator};
pub use stats::{read_pinned_stats, read_pinned_svc_stats};

/// The loaded object, its maps and what is attached.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    attached: attach::Attachments,
    /// Stale pins being migrated, until [`Dataplane::finish_migration`].
    migration: Option<Migrator>,
}

impl Dataplane {
    /// Loads the embedded object, creating the maps pinned under the pin
    /// path or reusing the ones an earlier run pinned there, and finds the
    /// links an earlier run pinned (adopted as programs are attached).
    /// The entries of an older agent's maps that this binary replaced by
    /// new versions are migrated into them here, before anything is
    /// attached (see [`migrate`]).
    pub fn load(opts: &LoadOptions) -> Result<Self, LoadError> {
        let (ebpf, maps) = load::load(opts)?;
        let migration = match opts.pin_path {
            Some(p) => Some(Migrator::start(p, migrate::MIGRATIONS)?),
            None => None,
        };
        let attached = attach::Attachments::new(opts.pin_path)?;
        Ok(Self {
            ebpf,
            maps,
            attached,
            migration,
        })
    }

    /// Once every program is attached (the pinned links run this binary's
    /// programs): copies what the old programs added to migrated maps
    /// meanwhile, and removes those maps' pins. Returns how many went.
    pub fn finish_migration(&mut self) -> usize {
        self.migration.take().map_or(0, Migrator::finish)
    }

    /// Like [`Dataplane::load`] without `--bpf-log`; `None` creates
    /// private, unpinned maps (packet tests, benchmarks).
    pub fn load_with(pin_path: Option<&Path>) -> Result<Self, LoadError> {
        Self::load(&LoadOptions {
            pin_path,
            bpf_log: false,
            ct_max: None,
        })
    }

    /// The maps, to write through [`Maps::apply`] (the reconciler does).
    pub fn maps(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The loaded object, for running programs with BPF_PROG_TEST_RUN.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The reader of the data path's aya-log records; `None` when the
    /// object has none (or it was taken already).
    pub fn take_log(&mut self) -> Result<Option<BpfLog>, aya_log::Error> {
        logs::take(&mut self.ebpf)
    }

    /// See [`attach`]: decapsulation on `iface`.
    pub fn attach_underlay(&mut self, iface: &str, mode: Decap) -> Result<(), AttachError> {
        self.attached.attach_underlay(&mut self.ebpf, iface, mode)
    }

    /// See [`attach`]: `from_host` on the egress of the host overlay
    /// device.
    pub fn attach_host(&mut self, iface: &str, ifindex: u32) -> Result<(), AttachError> {
        self.attached.attach_host(&mut self.ebpf, iface, ifindex)
    }

    /// See [`attach`]: the cgroup socket programs on the cgroup v2
    /// directory `cgroup`.
    pub fn attach_sock(&mut self, cgroup: &Path) -> Result<(), AttachError> {
        self.attached.attach_sock(&mut self.ebpf, cgroup)
    }

    /// See [`attach`]: `to_pod` on the bridge's egress (idempotent).
    pub fn attach_bridge(&mut self, name: &str, ifindex: u32) -> Result<(), AttachError> {
        self.attached.attach_bridge(&mut self.ebpf, name, ifindex)
    }

    /// Makes `from_pod` attached to exactly these pod ports (by name and
    /// ifindex); returns how many were newly attached.
    pub fn sync_pod_ports(&mut self, ports: &[(String, u32)]) -> Result<usize, AttachError> {
        self.attached.sync_pod_ports(&mut self.ebpf, ports)
    }

    /// Removes the links an earlier run pinned that this run has not
    /// claimed by attaching to their device (see [`attach`]); called once
    /// start-up has attached everything. Returns how many went.
    pub fn prune_links(&mut self) -> usize {
        self.attached.prune()
    }

    /// See [`attach`]: `from_pod` on a CNI pod's host-side device.
    pub fn attach_cni_pod(&mut self, ifindex: u32, name: &str) -> Result<(), AttachError> {
        self.attached.attach_cni_pod(&mut self.ebpf, ifindex, name)
    }

    /// See [`attach`]: the reverse of [`Dataplane::attach_cni_pod`].
    pub fn detach_cni_pod(&mut self, ifindex: u32) -> Result<(), AttachError> {
        self.attached.detach_cni_pod(ifindex);
        Ok(())
    }

    /// Per-outcome counters summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, Counter)>, MapError> {
        stats::read_stats(&self.maps.stats)
    }
}
