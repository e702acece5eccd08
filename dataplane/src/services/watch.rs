//! Following the services directories in etcd from every node.
//!
//! With [`crate::etcd::list_then_watch`], as for the peer leases: everything
//! at one revision as a [`StoreUpdate::Snapshot`], then each change. When the
//! watch breaks (etcd restart, network trouble, compaction) it lists again
//! and sends a new snapshot; the agent's [`super::ServiceStore::apply`] then
//! reports every service, so it can reconcile its maps against the new
//! state, including services deleted while the watch was down.
//!
//! Values are decoded and validated here, as they arrive ([`Decoded`]):
//! the updates carry only the compact form the store keeps, and bad ones
//! are skipped (and counted) by [`super::ServiceStore::apply`].

use etcd_client::{Client, KeyValue};
use tokio::sync::{mpsc, watch};

use super::model::{Decoded, StoreUpdate};
use super::object::key_range;
use super::store::{Entry, decode, store_from};
use crate::etcd::{Event, Prefix, Update, list_then_watch};

/// Watches the Services, Endpoints and EndpointSlices under `prefix` until
/// `shutdown` turns true (or its sender is dropped) or `tx`'s receiver is
/// dropped; both return `Ok(())`. etcd trouble is retried forever with
/// backoff, never returned.
pub async fn watch_services(
    client: Client,
    prefix: impl Into<Prefix>,
    tx: mpsc::Sender<StoreUpdate>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    watch_services_after(client, prefix, None, tx, shutdown).await
}

/// [`watch_services`], for a caller that already listed at `revision`
/// ([`super::list`], [`super::ServiceStore::revision`]): no first
/// snapshot, the changes after it. The agent starts this way, so it never
/// holds two full listings at once.
pub async fn watch_services_after(
    client: Client,
    prefix: impl Into<Prefix>,
    revision: Option<i64>,
    tx: mpsc::Sender<StoreUpdate>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let prefix = prefix.into();
    let mut watch = list_then_watch(
        &client,
        format!("services under {prefix}"),
        key_range(&prefix),
        |kv: &KeyValue| decode(&prefix, kv),
        shutdown,
    )
    .counted_as("services");
    let mut listed_before = revision.is_some();
    if let Some(r) = revision {
        watch = watch.after(r);
    }
    while let Some(update) = watch.next().await {
        let update = match update {
            Update::Snapshot(s) => {
                let store = store_from(s.items, s.revision);
                log::info!(
                    "{} services under {prefix} at revision {}{}",
                    store.len(),
                    s.revision,
                    if listed_before { " (re-listed)" } else { "" }
                );
                listed_before = true;
                StoreUpdate::Snapshot(store)
            }
            Update::Event(Event::Put(Entry::Object { key, value })) => StoreUpdate::Put(
                value.unwrap_or_else(|| Decoded::bad(&key, "written without a value")),
            ),
            Update::Event(Event::Delete(Entry::Object { key, .. })) => StoreUpdate::Delete { key },
            // Not UTF-8: logged when decoded, nothing to apply.
            Update::Event(Event::Put(Entry::BadKey) | Event::Delete(Entry::BadKey)) => continue,
        };
        if tx.send(update).await.is_err() {
            log::info!("service update receiver gone; stopping the service watch");
            break;
        }
    }
    Ok(())
}
