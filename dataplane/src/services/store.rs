//! Services, Endpoints and EndpointSlices in etcd: apply, delete, list.
//!
//! Every write is one etcd transaction, so a file is applied (or deleted)
//! entirely or not at all, and watchers see it at one revision. A
//! transaction holds at most [`MAX_TXN_OPS`] operations (etcd's default
//! `--max-txn-ops`); a larger file is refused with a clear error before
//! anything is written, rather than split into several transactions that
//! could leave it half-applied. Bulk loads call [`apply`] per batch.
//!
//! [`apply`] is compare-and-swap: it reads the current values, then writes
//! only what differs, on condition that nothing it read has changed since
//! (retrying a few times if it has). Re-applying an unchanged file writes
//! nothing, so it costs the watchers nothing either.

use std::fmt;

use etcd_client::{Client, Compare, CompareOp, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::manifest::Object;
use super::model::{Decoded, ServiceStore};
use super::object::{Kind, ObjectRef, SERVICE_NAME_LABEL, key_range, namespace_dir};
use crate::etcd::{self, EtcdError, Prefix, kv_client, timed};

/// Operations per etcd transaction: etcd's default `--max-txn-ops`. Also
/// bounds the comparisons of one transaction, which etcd limits alike.
pub const MAX_TXN_OPS: usize = 128;

/// Attempts of a compare-and-swap write racing other writers.
const CAS_ATTEMPTS: usize = 5;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// More objects than one etcd transaction may hold; nothing was written.
    #[error(
        "{count} objects to {op} in one etcd transaction; etcd allows {MAX_TXN_OPS} \
         operations per transaction (--max-txn-ops), and this tool does not split a file \
         (that could leave it half-applied): split it into files of at most {MAX_TXN_OPS} \
         objects"
    )]
    TooManyObjects {
        /// How many objects were given.
        count: usize,
        /// `apply` or `delete`.
        op: &'static str,
    },
    /// An object fails validation; nothing was written.
    #[error("{object} is invalid: {path}: {message}")]
    Invalid {
        /// The object.
        object: ObjectRef,
        /// The field at fault, e.g. `spec.ports[0].protocol`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The same object was given twice; nothing was written.
    #[error("{0} is given twice")]
    Duplicate(ObjectRef),
    /// Two Services claim one frontend; nothing was written.
    #[error(
        "{object} conflicts with service {other}: both claim {}",
        claim(frontend)
    )]
    Conflict {
        /// The Service being applied.
        object: ObjectRef,
        /// What both claim.
        frontend: super::model::Frontend,
        /// The Service that claims it too (in etcd, or in the same file).
        other: super::model::ServiceName,
    },
    /// The write is larger than etcd accepts in one request.
    #[error(
        "the {count} objects add up to {bytes} bytes, more than etcd accepts in one request \
         (--max-request-bytes, 1.5 MiB by default); apply the file in smaller parts: {error}"
    )]
    TooLarge {
        /// How many objects.
        count: usize,
        /// Their keys and values, in bytes.
        bytes: usize,
        /// etcd's refusal (in the message, not also a `source()`).
        error: EtcdError,
    },
    /// Other writers kept changing the same keys; nothing was written.
    #[error(
        "other writers kept changing the same objects under {prefix}; gave up after \
         {CAS_ATTEMPTS} attempts (nothing was written)"
    )]
    Contention {
        /// The prefix written under.
        prefix: Prefix,
    },
    /// The EndpointSlices of a namespace kept changing while deleting a
    /// service; nothing was deleted.
    #[error(
        "EndpointSlices in namespace {namespace} kept changing; gave up deleting service \
         {name} after {CAS_ATTEMPTS} attempts (nothing was deleted)"
    )]
    SlicesKeptChanging {
        /// The namespace.
        namespace: String,
        /// The service.
        name: String,
    },
    /// etcd answered something it should not have.
    #[error("unexpected answer from etcd: {0}")]
    Unexpected(String),
    /// An etcd request failed or did not answer in time.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What [`apply`] did with one object, in kubectl's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// It did not exist.
    Created,
    /// It existed with a different value.
    Configured,
    /// It existed with the same value; nothing was written.
    Unchanged,
}

impl fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

/// The result of [`apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplySummary {
    /// Each object, in the order given.
    pub objects: Vec<(ObjectRef, ApplyOutcome)>,
    /// The etcd revision that holds the result (the write's, or the read's
    /// when nothing needed writing).
    pub revision: i64,
}

impl ApplySummary {
    /// How many objects had `outcome`.
    pub fn count(&self, outcome: ApplyOutcome) -> usize {
        self.objects.iter().filter(|(_, o)| *o == outcome).count()
    }
}

/// The result of [`delete_objects`] and [`delete_service`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteSummary {
    /// Objects deleted.
    pub deleted: Vec<ObjectRef>,
    /// Objects asked for that did not exist.
    pub not_found: Vec<ObjectRef>,
    /// The etcd revision after the delete.
    pub revision: i64,
}

fn check_size(count: usize, op: &'static str) -> Result<(), StoreError> {
    if count > MAX_TXN_OPS {
        return Err(StoreError::TooManyObjects { count, op });
    }
    Ok(())
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// A frontend as a conflict names it.
fn claim(f: &super::model::Frontend) -> String {
    if f.ip.is_unspecified() {
        format!("nodePort {} {}", f.port, f.proto)
    } else {
        format!(
            "{}:{} {} (ClusterIP, port, protocol)",
            f.ip, f.port, f.proto
        )
    }
}

/// Writes `objects` under `prefix` in one etcd transaction: all or nothing.
///
/// Objects are validated again (callers may build them in code), and the
/// same object twice is refused. Values already equal are not rewritten.
/// Fails if there are more than [`MAX_TXN_OPS`] objects, or if other
/// writers keep changing the same keys.
pub async fn apply(
    client: &mut Client,
    prefix: impl Into<Prefix>,
    objects: &[Object],
) -> Result<ApplySummary, StoreError> {
    let prefix = prefix.into();
    check_size(objects.len(), "apply")?;
    let mut entries = Vec::with_capacity(objects.len());
    let mut seen = std::collections::BTreeSet::new();
    for obj in objects {
        let r = obj.object_ref();
        if let Some(p) = obj.problems().first() {
            return Err(StoreError::Invalid {
                object: r,
                path: p.path.clone(),
                message: p.message.clone(),
            });
        }
        if !seen.insert(r.clone()) {
            return Err(StoreError::Duplicate(r));
        }
        entries.push((r.key(&prefix), r, obj.to_json()));
    }
    let mut kv = kv_client(client);

    for _ in 0..CAS_ATTEMPTS {
        // Read everything at one revision.
        let read = Txn::new().and_then(
            entries
                .iter()
                .map(|(key, _, _)| TxnOp::get(key.as_str(), None))
                .collect::<Vec<_>>(),
        );
        let resp = timed(
            || format!("reading {} keys under {prefix}", entries.len()),
            kv.txn(read),
        )
        .await?;
        let read_rev = revision_of(resp.header());
        let current: Vec<Option<KeyValue>> = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
            .collect();
        if current.len() != entries.len() {
            return Err(StoreError::Unexpected(format!(
                "{} reads for {} keys",
                current.len(),
                entries.len()
            )));
        }

        let mut compares = Vec::with_capacity(entries.len());
        let mut puts = Vec::new();
        let mut outcomes = Vec::with_capacity(entries.len());
        for ((key, r, value), cur) in entries.iter().zip(&current) {
            let outcome = match cur {
                None => {
                    compares.push(Compare::version(key.as_str(), CompareOp::Equal, 0));
                    ApplyOutcome::Created
                }
                Some(kv) => {
                    compares.push(Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ));
                    if kv.value() == value.as_slice() {
                        ApplyOutcome::Unchanged
                    } else {
                        ApplyOutcome::Configured
                    }
                }
            };
            if outcome != ApplyOutcome::Unchanged {
                puts.push(TxnOp::put(key.as_str(), value.clone(), None));
            }
            outcomes.push((r.clone(), outcome));
        }
        if puts.is_empty() {
            return Ok(ApplySummary {
                objects: outcomes,
                revision: read_rev,
            });
        }
        let write = Txn::new().when(compares).and_then(puts);
        let resp = timed(
            || format!("writing {} objects under {prefix}", entries.len()),
            kv.txn(write),
        )
        .await
        .map_err(|e| explain_limits(e, &entries))?;
        if resp.succeeded() {
            return Ok(ApplySummary {
                objects: outcomes,
                revision: revision_of(resp.header()),
            });
        }
        log::info!("objects under {prefix} changed while applying; retrying");
    }
    Err(StoreError::Contention { prefix })
}

/// [`apply`], after the checks against the cluster: every ClusterIP in
/// `guard`'s service CIDR and outside the pod network, and no frontend
/// claimed by two Services (those in etcd under `prefix` and those given).
/// The Services in etcd are read first, so a conflicting write that lands
/// in between is not seen here; the agents then keep the older Service's
/// frontend.
pub async fn apply_guarded(
    client: &mut Client,
    prefix: impl Into<Prefix>,
    objects: &[Object],
    guard: &super::guard::AddressGuard,
) -> Result<ApplySummary, StoreError> {
    let prefix = prefix.into();
    super::guard::check_addresses(objects, guard)?;
    // Frontends come from Services alone (a Service without endpoints
    // still claims its ports), so only `services/` is listed: a third of
    // the keys of a large store, and no EndpointSlice decoding.
    let services = prefix.join(Kind::Service.dir()).range();
    let mut existing = ServiceStore::new();
    etcd::list_pages(&mut kv_client(client), &services, |page| {
        for kv in page {
            if let Some(e) = decode(&prefix, &kv) {
                insert(&mut existing, e);
            }
        }
    })
    .await?;
    // nodePorts are allocated here and stored in the Service, as the
    // API server does, so every agent reads the same port.
    let mut objects = objects.to_vec();
    super::guard::allocate_node_ports(&mut objects, &existing, guard.node_ports)?;
    super::guard::check_conflicts(&objects, &existing)?;
    apply(client, prefix, &objects).await
}

/// etcd's size limit, spelled out for the operator.
fn explain_limits(e: EtcdError, entries: &[(String, ObjectRef, Vec<u8>)]) -> StoreError {
    if e.to_string().contains("request is too large") {
        return StoreError::TooLarge {
            count: entries.len(),
            bytes: entries.iter().map(|(k, _, v)| k.len() + v.len()).sum(),
            error: e,
        };
    }
    StoreError::Etcd(e)
}

/// Runs deletes in one transaction; returns (deleted, not found, revision).
async fn delete_keys(
    kv: &mut KvClient,
    prefix: &Prefix,
    refs: Vec<ObjectRef>,
    compares: Vec<Compare>,
) -> Result<Option<DeleteSummary>, StoreError> {
    let ops: Vec<TxnOp> = refs
        .iter()
        .map(|r| TxnOp::delete(r.key(prefix), None))
        .collect();
    let resp = timed(
        || format!("deleting {} keys under {prefix}", refs.len()),
        kv.txn(Txn::new().when(compares).and_then(ops)),
    )
    .await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    let mut summary = DeleteSummary {
        revision: revision_of(resp.header()),
        ..DeleteSummary::default()
    };
    for (r, op) in refs.into_iter().zip(resp.op_responses()) {
        match op {
            TxnOpResponse::Delete(d) if d.deleted() > 0 => summary.deleted.push(r),
            _ => summary.not_found.push(r),
        }
    }
    Ok(Some(summary))
}

/// Deletes `objects` (as `delete -f FILE` would) in one transaction. Only
/// the objects named are deleted: a Service's EndpointSlices stay unless
/// listed too (see [`delete_service`] for that).
pub async fn delete_objects(
    client: &mut Client,
    prefix: impl Into<Prefix>,
    objects: &[Object],
) -> Result<DeleteSummary, StoreError> {
    let prefix = prefix.into();
    check_size(objects.len(), "delete")?;
    let mut refs: Vec<ObjectRef> = objects.iter().map(Object::object_ref).collect();
    refs.sort();
    refs.dedup();
    let mut kv = kv_client(client);
    delete_keys(&mut kv, &prefix, refs, Vec::new())
        .await?
        .ok_or_else(|| StoreError::Unexpected("an unconditional delete failed".into()))
}

/// Deletes a service with its Endpoints and the EndpointSlices labelled
/// `kubernetes.io/service-name=<name>` in its namespace, in one
/// transaction. The slices are found by listing the namespace; the delete
/// is conditional on no slice there having changed since (so a slice
/// created or relabelled meanwhile is not missed or wrongly deleted), and
/// retried if one did.
pub async fn delete_service(
    client: &mut Client,
    prefix: impl Into<Prefix>,
    namespace: &str,
    name: &str,
) -> Result<DeleteSummary, StoreError> {
    let prefix = prefix.into();
    let mut kv = kv_client(client);
    let dir = namespace_dir(&prefix, Kind::EndpointSlice, namespace);
    let range = dir.range();
    for _ in 0..CAS_ATTEMPTS {
        let (kvs, rev) = etcd::list(&mut kv, &range).await?;
        let mut refs = vec![
            ObjectRef::new(Kind::Service, namespace, name),
            ObjectRef::new(Kind::Endpoints, namespace, name),
        ];
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key());
            let Some(slice_name) = dir.strip(&key) else {
                continue;
            };
            match serde_json::from_slice::<EndpointSlice>(kv.value()) {
                Ok(slice) => {
                    let label = slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL));
                    if label.map(String::as_str) == Some(name) {
                        refs.push(ObjectRef::new(Kind::EndpointSlice, namespace, slice_name));
                    }
                }
                Err(e) => log::warn!("ignoring unreadable EndpointSlice {key}: {e}"),
            }
        }
        check_size(refs.len(), "delete")?;
        // No slice key in the namespace modified after our list.
        let unchanged = Compare::mod_revision(range.start.clone(), CompareOp::Less, rev + 1)
            .with_range(range.end.clone());
        if let Some(summary) = delete_keys(&mut kv, &prefix, refs, vec![unchanged]).await? {
            return Ok(summary);
        }
        log::info!("EndpointSlices in {namespace} changed while deleting {name}; retrying");
    }
    Err(StoreError::SlicesKeptChanging {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// One key-value under the prefix, as the readers ([`list`] and
/// [`super::watch_services`]) see it: decoded as it arrives, so neither the
/// JSON nor the Kubernetes object outlives this.
pub(crate) enum Entry {
    /// A key of one of our kinds.
    Object {
        /// E.g. `services/default/my-service`.
        key: String,
        /// The value decoded; `None` when the key-value has none (a
        /// deletion event).
        value: Option<Decoded>,
    },
    /// A key that is not UTF-8: unusable, counted as malformed.
    BadKey,
}

/// The entry for `kv`, or `None` for keys that are not ours (other data in
/// the key range).
pub(crate) fn decode(prefix: &Prefix, kv: &KeyValue) -> Option<Entry> {
    let Ok(key) = std::str::from_utf8(kv.key()) else {
        log::warn!(
            "ignoring non-UTF-8 key {:?} under {prefix}",
            String::from_utf8_lossy(kv.key())
        );
        return Some(Entry::BadKey);
    };
    let rel = prefix.strip(key)?;
    Kind::from_dir(rel.split('/').next()?)?;
    let value = (!kv.value().is_empty() || kv.create_revision() != 0)
        .then(|| Decoded::new(rel, kv.value(), kv.create_revision()));
    Some(Entry::Object {
        key: rel.to_string(),
        value,
    })
}

/// Adds a listed entry to `store`.
pub(crate) fn insert(store: &mut ServiceStore, entry: Entry) {
    match entry {
        Entry::Object {
            value: Some(value), ..
        } => store.insert(value),
        Entry::Object { key, value: None } => {
            store.insert(Decoded::bad(&key, "listed without a value"))
        }
        Entry::BadKey => store.insert(Decoded::bad("(not UTF-8)", "key is not UTF-8")),
    }
}

/// A store of listed entries.
pub(crate) fn store_from(entries: Vec<Entry>, revision: i64) -> ServiceStore {
    let mut store = ServiceStore::new();
    for e in entries {
        insert(&mut store, e);
    }
    store.set_revision(revision);
    store
}

/// Lists all Services, Endpoints and EndpointSlices under `prefix`, at one
/// revision ([`ServiceStore::revision`]), page by page: each value is
/// decoded and dropped as its page arrives. Unusable values are skipped
/// (logged, and counted in [`ServiceStore::malformed`]).
pub async fn list(
    client: &mut Client,
    prefix: impl Into<Prefix>,
) -> Result<ServiceStore, StoreError> {
    let prefix = prefix.into();
    let mut store = ServiceStore::new();
    let revision = etcd::list_pages(&mut kv_client(client), &key_range(&prefix), |page| {
        for kv in page {
            if let Some(e) = decode(&prefix, &kv) {
                insert(&mut store, e);
            }
        }
    })
    .await?;
    store.set_revision(revision);
    Ok(store)
}

/// Every Service, Endpoints and EndpointSlice under `prefix` as the whole
/// Kubernetes object (for inspection and tests; the agent keeps only the
/// compact form of [`list`]), ordered by kind (Endpoints, EndpointSlice,
/// Service, as in etcd), namespace and name. Values that do not decode are
/// left out.
pub async fn list_objects(
    client: &mut Client,
    prefix: impl Into<Prefix>,
) -> Result<Vec<Object>, StoreError> {
    let prefix = prefix.into();
    let (kvs, _) = etcd::list(&mut kv_client(client), &key_range(&prefix)).await?;
    let mut out = Vec::new();
    for kv in &kvs {
        let Some(rel) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| prefix.strip(k))
        else {
            continue;
        };
        let Some(r) = ObjectRef::parse_relative_key(rel) else {
            continue;
        };
        let obj = match r.kind {
            Kind::Service => serde_json::from_slice(kv.value()).map(Object::Service),
            Kind::Endpoints => serde_json::from_slice(kv.value()).map(Object::Endpoints),
            Kind::EndpointSlice => serde_json::from_slice(kv.value()).map(Object::EndpointSlice),
        };
        if let Ok(o) = obj {
            out.push(o);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_objects_refused_before_any_io() {
        let e = check_size(MAX_TXN_OPS + 1, "apply")
            .unwrap_err()
            .to_string();
        assert!(e.contains("129 objects"), "{e}");
        assert!(e.contains("at most 128"), "{e}");
        assert!(check_size(MAX_TXN_OPS, "apply").is_ok());
    }
}
