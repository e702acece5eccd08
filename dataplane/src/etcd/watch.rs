//! Following a key range: list, watch from the next revision, list again
//! when the watch breaks.
//!
//! [`list_then_watch`] gives a [`ListWatch`], whose [`ListWatch::next`]
//! yields a [`Snapshot`] of everything in the range at one revision, then
//! every change after that revision as an [`Event`], in etcd's order. When
//! the watch cannot go on (etcd restarted, the connection broke, the stream
//! ended, etcd cancelled the watch, or compacted the revision we asked for)
//! it lists again and yields a new snapshot, which replaces everything the
//! caller knew: changes made while the watch was down are in it. etcd trouble
//! is retried forever with exponential backoff; [`ListWatch::next`] returns
//! `None` only once shutdown is requested.
//!
//! The caller supplies the decoding: a function from each key-value (listed
//! or seen in an event; a deleted key's has no value) to its item, or `None`
//! to skip keys it does not care about.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, EventType, KeyValue, KvClient, WatchClient, WatchOptions, WatchStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{KeyRange, MAX_RESPONSE_BYTES, REQUEST_TIMEOUT, kv_client, list_pages};

/// First wait after a failure; also the pause before listing again after a
/// watch that broke, so a watch that keeps breaking does not hammer etcd.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Everything in the range at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot<T> {
    /// The decoded items, in key order.
    pub items: Vec<T>,
    /// The revision they were read at; events follow from the next one.
    pub revision: i64,
}

/// One change after the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<T> {
    /// A key was created or written.
    Put(T),
    /// A key was deleted (or its etcd lease expired); decoded from the key
    /// alone.
    Delete(T),
}

/// What [`ListWatch::next`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update<T> {
    /// Replaces everything known before.
    Snapshot(Snapshot<T>),
    /// Applies on top of the last snapshot and the events since.
    Event(Event<T>),
}

/// A list-then-watch of one key range; see the module documentation.
pub struct ListWatch<T, D> {
    kv: KvClient,
    watcher: WatchClient,
    what: String,
    range: KeyRange,
    decode: D,
    shutdown: watch::Receiver<bool>,
    backoff: Duration,
    phase: Phase<T>,
    /// The `watch` label of its metrics ([`ListWatch::counted_as`]).
    label: &'static str,
    /// Listed once already: the next listing is a re-list.
    listed: bool,
    /// A request failed, or the watch broke, since it last followed etcd.
    failed: bool,
}

enum Phase<T> {
    /// List (at `not_before`, when backing off).
    List {
        not_before: Option<Instant>,
    },
    /// Listed at `revision`: watch from the next one.
    Watch {
        revision: i64,
    },
    /// Following the watch; `pending` are the events of the last response
    /// not yet handed out.
    Follow {
        stream: Box<WatchStream>,
        pending: VecDeque<Event<T>>,
    },
    Stopped,
}

/// Follows `range` until `shutdown` turns true (or its sender is dropped).
///
/// `what` names the range in log messages (`leases under /coreos.com/network`).
/// Nothing is requested until the first [`ListWatch::next`]. `next` is
/// cancel-safe: when its future is dropped (say in a `select!` another branch
/// won), no event is lost; an interrupted listing starts over.
pub fn list_then_watch<T, D>(
    client: &Client,
    what: impl Into<String>,
    range: KeyRange,
    decode: D,
    shutdown: watch::Receiver<bool>,
) -> ListWatch<T, D>
where
    D: FnMut(&KeyValue) -> Option<T>,
{
    ListWatch {
        kv: kv_client(client),
        watcher: client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES),
        what: what.into(),
        range,
        decode,
        shutdown,
        backoff: MIN_BACKOFF,
        phase: Phase::List { not_before: None },
        label: "other",
        listed: false,
        failed: false,
    }
}

impl<T, D> ListWatch<T, D>
where
    D: FnMut(&KeyValue) -> Option<T>,
{
    /// Reports its re-lists, reconnects and state into
    /// [`crate::metrics`] under the label `watch="label"`.
    pub fn counted_as(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// Starts from a listing the caller made itself at `revision`: no
    /// first snapshot, the watch begins at the next revision (and lists
    /// again, as always, if it cannot).
    pub fn after(mut self, revision: i64) -> Self {
        self.phase = Phase::Watch { revision };
        // A listing later is a re-list.
        self.listed = true;
        self
    }

    /// The next snapshot or event; `None` once shutdown is requested.
    pub async fn next(&mut self) -> Option<Update<T>> {
        loop {
            if shutdown_requested(&self.shutdown) {
                self.phase = Phase::Stopped;
            }
            match &mut self.phase {
                Phase::Stopped => return None,
                Phase::List { not_before } => {
                    if let Some(at) = *not_before {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at) => {}
                            _ = wait_shutdown(&mut self.shutdown) => continue,
                        }
                    }
                    // Decoded page by page: the raw listing is never held whole.
                    let mut items = Vec::new();
                    let mut keys = 0usize;
                    let decode = &mut self.decode;
                    let listed = tokio::select! {
                        r = list_pages(&mut self.kv, &self.range, |page| {
                            keys += page.len();
                            items.extend(page.iter().filter_map(&mut *decode));
                        }) => r,
                        _ = wait_shutdown(&mut self.shutdown) => continue,
                    };
                    match listed {
                        Ok(revision) => {
                            if std::mem::replace(&mut self.listed, true) {
                                crate::metrics::global().watch_relisted(self.label);
                            }
                            log::debug!("{keys} keys for {} at revision {revision}", self.what);
                            self.phase = Phase::Watch { revision };
                            return Some(Update::Snapshot(Snapshot { items, revision }));
                        }
                        Err(e) => {
                            log::warn!(
                                "listing {}: {e}; retrying in {:.1}s",
                                self.what,
                                self.backoff.as_secs_f32()
                            );
                            self.retry_later();
                        }
                    }
                }
                Phase::Watch { revision } => {
                    // Fragment: one transaction of many large values may
                    // exceed a gRPC message; etcd then sends its events in
                    // several responses.
                    let opts = WatchOptions::new()
                        .with_range(self.range.end.clone())
                        .with_start_revision(*revision + 1)
                        .with_fragment();
                    let start = self.range.start.clone();
                    let created = tokio::select! {
                        r = tokio::time::timeout(REQUEST_TIMEOUT, self.watcher.watch(start, Some(opts))) => r,
                        _ = wait_shutdown(&mut self.shutdown) => continue,
                    };
                    match created {
                        Ok(Ok(stream)) => {
                            self.phase = Phase::Follow {
                                stream: Box::new(stream),
                                pending: VecDeque::new(),
                            }
                        }
                        Ok(Err(e)) => {
                            log::warn!(
                                "watching {}: {e}; re-listing in {:.1}s",
                                self.what,
                                self.backoff.as_secs_f32()
                            );
                            self.retry_later();
                        }
                        Err(_) => {
                            log::warn!(
                                "watching {}: no answer within {REQUEST_TIMEOUT:?}; re-listing in {:.1}s",
                                self.what,
                                self.backoff.as_secs_f32()
                            );
                            self.retry_later();
                        }
                    }
                }
                Phase::Follow { stream, pending } => {
                    if let Some(ev) = pending.pop_front() {
                        return Some(Update::Event(ev));
                    }
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = wait_shutdown(&mut self.shutdown) => continue,
                    };
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            self.failed = true;
                            self.relist(format_args!("ended"));
                            continue;
                        }
                        Err(e) => {
                            self.failed = true;
                            self.relist(format_args!("failed: {e}"));
                            continue;
                        }
                    };
                    if resp.compact_revision() > 0 {
                        self.relist(format_args!(
                            "fell behind compaction (revision {})",
                            resp.compact_revision()
                        ));
                        continue;
                    }
                    if resp.canceled() {
                        self.relist(format_args!("was cancelled ({})", resp.cancel_reason()));
                        continue;
                    }
                    if resp.created() {
                        // The watch is up: etcd is healthy again.
                        self.backoff = MIN_BACKOFF;
                        let m = crate::metrics::global();
                        if std::mem::replace(&mut self.failed, false) {
                            m.etcd_reconnected(self.label);
                        }
                        m.set_watch_up(self.label, true);
                    }
                    for ev in resp.events() {
                        let Some(item) = ev.kv().and_then(&mut self.decode) else {
                            continue;
                        };
                        pending.push_back(match ev.event_type() {
                            EventType::Put => Event::Put(item),
                            EventType::Delete => Event::Delete(item),
                        });
                    }
                }
            }
        }
    }

    /// After a failed request: list again after the backoff, and back off
    /// further next time.
    fn retry_later(&mut self) {
        self.failed = true;
        crate::metrics::global().set_watch_up(self.label, false);
        self.phase = Phase::List {
            not_before: Some(Instant::now() + self.backoff),
        };
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// After a watch that broke: list again after a short pause.
    fn relist(&mut self, why: std::fmt::Arguments<'_>) {
        log::warn!("watch on {} {why}; re-listing", self.what);
        crate::metrics::global().set_watch_up(self.label, false);
        self.phase = Phase::List {
            not_before: Some(Instant::now() + MIN_BACKOFF),
        };
    }
}

fn shutdown_requested(shutdown: &watch::Receiver<bool>) -> bool {
    // An error means the sender is gone, which counts as shutdown too.
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Resolves once shutdown is requested (value true or sender dropped).
pub async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which we treat as shutdown too.
    let _ = shutdown.wait_for(|&stop| stop).await;
}
