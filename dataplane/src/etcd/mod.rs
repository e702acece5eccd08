//! Everything this crate asks of etcd, in one place.
//!
//! - [`connect`]: connecting with flannel's knobs ([`EtcdOptions`]).
//! - [`Prefix`] and [`KeyRange`]: where keys live. A prefix given on the
//!   command line is normalised once, into a [`Prefix`], and every module
//!   builds and parses its keys with it.
//! - [`list`], [`create_if_absent`], [`timed`]: the requests several modules
//!   make, with a bound on how long each may take and an [`EtcdError`] that
//!   says what was being done.
//! - [`list_then_watch`]: the one loop that follows a key range: a
//!   [`Snapshot`] of everything at one revision, then each change as an
//!   [`Event`], listing again whenever the watch breaks.
//!
//! Nothing here knows about leases, configs or services; those modules
//! depend on this one, never the other way round.

mod connect;
mod keys;
mod request;
mod watch;

pub use connect::{ConnectError, EtcdOptions, connect};
pub use keys::{KeyRange, Prefix};
pub use request::{
    EtcdError, MAX_RESPONSE_BYTES, REQUEST_TIMEOUT, create_if_absent, kv_client, list, list_pages,
    timed,
};
pub use watch::{Event, ListWatch, Snapshot, Update, list_then_watch, wait_shutdown};
