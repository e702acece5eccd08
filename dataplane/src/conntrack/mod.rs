//! The ClusterIP conntrack table as the agent keeps it and the operator
//! sees it. The data path makes, updates and expires entries
//! (`dataplane-ebpf/src/ct.rs`, rules in `dataplane_common::ct`); the
//! agent removes what expired and, under pressure, what may go first
//! ([`sweep`]); `dataplane conntrack list|flush` reads and removes them
//! ([`show`]). Both go through [`crate::bpf::CtTable`].

pub mod show;
pub mod sweep;

pub use show::{FlowRow, ServiceIndex, flush, render, rows};
pub use sweep::{SweepReport, Sweeper};
