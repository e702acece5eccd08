//! Following the services directories in etcd from every node.
//!
//! As for the peer leases (`peers.rs`): list everything at one revision and
//! send a [`StoreUpdate::Snapshot`], then watch from the next revision and
//! send each change. When the watch breaks (etcd restart, network trouble,
//! compaction) list again and send a new snapshot; the agent's
//! [`super::ServiceStore::apply`] then reports every service, so it can
//! reconcile its maps against the new state, including services deleted
//! while the watch was down.
//!
//! The updates carry raw values; decoding and validation happen in
//! [`super::ServiceStore::apply`], which skips (and counts) bad ones.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::model::StoreUpdate;
use super::store::{MAX_RESPONSE_BYTES, list_with_revision};
use super::{Kind, key_range, strip_base};
use crate::lease::wait_shutdown;

/// Longest wait between attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(250);

/// Sleeps `d` unless shutdown comes first; `false` on shutdown.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = wait_shutdown(shutdown) => false,
    }
}

/// The update for one watch event, or `None` for keys that are not ours
/// (other data that falls in the watched key range).
fn event_update(prefix: &str, ev: &etcd_client::Event) -> Option<StoreUpdate> {
    let kv = ev.kv()?;
    let Ok(key) = std::str::from_utf8(kv.key()) else {
        log::warn!(
            "ignoring non-UTF-8 key {:?}",
            String::from_utf8_lossy(kv.key())
        );
        return None;
    };
    let rel = strip_base(prefix, key)?;
    Kind::from_dir(rel.split('/').next()?)?;
    Some(match ev.event_type() {
        EventType::Put => StoreUpdate::Put {
            key: rel.to_string(),
            value: kv.value().to_vec(),
        },
        EventType::Delete => StoreUpdate::Delete {
            key: rel.to_string(),
        },
    })
}

/// Watches the Services, Endpoints and EndpointSlices under `prefix` until
/// `shutdown` turns true (or its sender is dropped) or `tx`'s receiver is
/// dropped; both return `Ok(())`. etcd trouble is retried forever with
/// backoff, never returned.
pub async fn watch_services(
    client: Client,
    prefix: String,
    tx: mpsc::Sender<StoreUpdate>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (start, end) = key_range(&prefix);
    let mut backoff = MIN_BACKOFF;
    let mut listed_before = false;
    let mut watcher = client
        .watch_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES);

    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let listed = tokio::select! {
            r = list_with_revision(&client, &prefix) => r,
            _ = wait_shutdown(&mut shutdown) => return Ok(()),
        };
        let (store, rev) = match listed {
            Ok(x) => x,
            Err(e) => {
                log::warn!(
                    "listing services under {prefix}: {e:#}; retrying in {:.1}s",
                    backoff.as_secs_f32()
                );
                if !pause(backoff, &mut shutdown).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        log::info!(
            "{} services under {prefix} at revision {rev}{}",
            store.len(),
            if listed_before { " (re-listed)" } else { "" }
        );
        listed_before = true;
        if tx.send(StoreUpdate::Snapshot(store)).await.is_err() {
            log::info!("service update receiver gone; stopping the service watch");
            return Ok(());
        }

        // Fragment: one transaction of many large objects may exceed a
        // gRPC message; etcd then sends its events in several responses.
        let opts = WatchOptions::new()
            .with_range(end.as_str())
            .with_start_revision(rev + 1)
            .with_fragment();
        let created = tokio::select! {
            r = watcher.watch(start.as_str(), Some(opts)) => r,
            _ = wait_shutdown(&mut shutdown) => return Ok(()),
        };
        let mut stream = match created {
            Ok(s) => s,
            Err(e) => {
                log::warn!(
                    "watching services under {prefix}: {e}; re-listing in {:.1}s",
                    backoff.as_secs_f32()
                );
                if !pause(backoff, &mut shutdown).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };

        // Follow the watch until it breaks.
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = wait_shutdown(&mut shutdown) => return Ok(()),
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    log::warn!("service watch under {prefix} ended; re-listing");
                    break;
                }
                Err(e) => {
                    log::warn!("service watch under {prefix} failed: {e}; re-listing");
                    break;
                }
            };
            if resp.compact_revision() > 0 {
                log::warn!(
                    "service watch under {prefix} fell behind compaction (revision {}); \
                     re-listing",
                    resp.compact_revision()
                );
                break;
            }
            if resp.canceled() {
                log::warn!(
                    "service watch under {prefix} was cancelled ({}); re-listing",
                    resp.cancel_reason()
                );
                break;
            }
            if resp.created() {
                // The watch is up: etcd is healthy again.
                backoff = MIN_BACKOFF;
            }
            for ev in resp.events() {
                let Some(update) = event_update(&prefix, ev) else {
                    continue;
                };
                if tx.send(update).await.is_err() {
                    log::info!("service update receiver gone; stopping the service watch");
                    return Ok(());
                }
            }
        }

        // Do not hammer etcd if the watch keeps breaking right away.
        if !pause(MIN_BACKOFF, &mut shutdown).await {
            return Ok(());
        }
    }
}
