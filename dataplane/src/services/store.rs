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
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::manifest::Object;
use super::model::ServiceStore;
use super::{Kind, ObjectRef, SERVICE_NAME_LABEL, base, key_range, namespace_dir, strip_base};

/// Operations per etcd transaction: etcd's default `--max-txn-ops`. Also
/// bounds the comparisons of one transaction, which etcd limits alike.
pub const MAX_TXN_OPS: usize = 128;

/// Bound on each etcd request, so a black-holed connection fails the
/// command instead of hanging it.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts of a compare-and-swap write racing other writers.
const CAS_ATTEMPTS: usize = 5;

/// Keys per page when listing. With the raised message limit below, a page
/// of even large EndpointSlices fits in one response.
const LIST_PAGE: i64 = 500;

/// Largest response we accept from etcd. tonic's default is 4 MiB, which a
/// few hundred big EndpointSlices exceed; etcd itself caps values at its
/// `--max-request-bytes` (1.5 MiB by default).
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

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

async fn timed<T>(
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.with_context(what),
        Err(_) => Err(anyhow::anyhow!(
            "{}: etcd did not answer within {RPC_TIMEOUT:?}",
            what()
        )),
    }
}

fn kv(client: &Client) -> KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn check_size(n: usize, what: &str) -> anyhow::Result<()> {
    if n > MAX_TXN_OPS {
        bail!(
            "{n} objects to {what} in one etcd transaction; etcd allows {MAX_TXN_OPS} \
             operations per transaction (--max-txn-ops), and this tool does not split a file \
             (that could leave it half-applied): split it into files of at most {MAX_TXN_OPS} \
             objects"
        );
    }
    Ok(())
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// Writes `objects` under `prefix` in one etcd transaction: all or nothing.
///
/// Objects are validated again (callers may build them in code), and the
/// same object twice is refused. Values already equal are not rewritten.
/// Fails if there are more than [`MAX_TXN_OPS`] objects, or if other
/// writers keep changing the same keys.
pub async fn apply(
    client: &mut Client,
    prefix: &str,
    objects: &[Object],
) -> anyhow::Result<ApplySummary> {
    check_size(objects.len(), "apply")?;
    let mut entries = Vec::with_capacity(objects.len());
    let mut seen = std::collections::BTreeSet::new();
    for obj in objects {
        let r = obj.object_ref();
        if let Some(p) = obj.problems().first() {
            bail!("{r} is invalid: {}: {}", p.path, p.message);
        }
        if !seen.insert(r.clone()) {
            bail!("{r} is given twice");
        }
        entries.push((r.key(prefix), r, obj.to_json()));
    }
    let mut kv = kv(client);

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
            bail!(
                "etcd answered {} reads for {} keys",
                current.len(),
                entries.len()
            );
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
    bail!(
        "other writers kept changing the same objects under {prefix}; gave up after \
         {CAS_ATTEMPTS} attempts (nothing was written)"
    )
}

/// etcd's size limit, spelled out for the operator.
fn explain_limits(e: anyhow::Error, entries: &[(String, ObjectRef, Vec<u8>)]) -> anyhow::Error {
    if format!("{e:#}").contains("request is too large") {
        let bytes: usize = entries.iter().map(|(k, _, v)| k.len() + v.len()).sum();
        return e.context(format!(
            "the {} objects add up to {bytes} bytes, more than etcd accepts in one request \
             (--max-request-bytes, 1.5 MiB by default); apply the file in smaller parts",
            entries.len()
        ));
    }
    e
}

/// Runs deletes in one transaction; returns (deleted, not found, revision).
async fn delete_keys(
    kv: &mut KvClient,
    prefix: &str,
    refs: Vec<ObjectRef>,
    compares: Vec<Compare>,
) -> anyhow::Result<Option<DeleteSummary>> {
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
    prefix: &str,
    objects: &[Object],
) -> anyhow::Result<DeleteSummary> {
    check_size(objects.len(), "delete")?;
    let mut refs: Vec<ObjectRef> = objects.iter().map(Object::object_ref).collect();
    refs.sort();
    refs.dedup();
    let mut kv = kv(client);
    delete_keys(&mut kv, prefix, refs, Vec::new())
        .await?
        .context("etcd refused an unconditional delete")
}

/// Deletes a service with its Endpoints and the EndpointSlices labelled
/// `kubernetes.io/service-name=<name>` in its namespace, in one
/// transaction. The slices are found by listing the namespace; the delete
/// is conditional on no slice there having changed since (so a slice
/// created or relabelled meanwhile is not missed or wrongly deleted), and
/// retried if one did.
pub async fn delete_service(
    client: &mut Client,
    prefix: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<DeleteSummary> {
    let mut kv = kv(client);
    let dir = namespace_dir(prefix, Kind::EndpointSlice, namespace);
    for _ in 0..CAS_ATTEMPTS {
        let (kvs, rev) = list_range(&mut kv, &dir, &prefix_end(&dir)).await?;
        let mut refs = vec![
            ObjectRef::new(Kind::Service, namespace, name),
            ObjectRef::new(Kind::Endpoints, namespace, name),
        ];
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key());
            let Some(slice_name) = key.strip_prefix(dir.as_str()) else {
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
        let unchanged = Compare::mod_revision(dir.as_str(), CompareOp::Less, rev + 1)
            .with_range(prefix_end(&dir));
        if let Some(summary) = delete_keys(&mut kv, prefix, refs, vec![unchanged]).await? {
            return Ok(summary);
        }
        log::info!("EndpointSlices in {namespace} changed while deleting {name}; retrying");
    }
    bail!(
        "EndpointSlices in namespace {namespace} kept changing; gave up deleting service \
         {name} after {CAS_ATTEMPTS} attempts (nothing was deleted)"
    )
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// All keys in `[start, end)` at one revision, in pages. Returns the
/// key-values and that revision.
pub(crate) async fn list_range(
    kv: &mut KvClient,
    start: &str,
    end: &[u8],
) -> anyhow::Result<(Vec<KeyValue>, i64)> {
    let mut out = Vec::new();
    let mut from = start.as_bytes().to_vec();
    let mut rev = 0;
    loop {
        let opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(LIST_PAGE)
            .with_revision(rev);
        let mut resp = timed(
            || format!("listing {start}"),
            kv.get(from.clone(), Some(opts)),
        )
        .await?;
        if rev == 0 {
            rev = revision_of(resp.header());
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        // The next page starts just after the last key.
        from = last.key().to_vec();
        from.push(0);
        out.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((out, rev))
}

/// Lists everything under `prefix` into a store, at one revision. Also
/// returns that revision (to watch from the next one).
pub(crate) async fn list_with_revision(
    client: &Client,
    prefix: &str,
) -> anyhow::Result<(ServiceStore, i64)> {
    let (start, end) = key_range(prefix);
    let mut kv = kv(client);
    let (kvs, rev) = list_range(&mut kv, &start, end.as_bytes()).await?;
    let b = base(prefix);
    let mut bad_keys = 0u64;
    let entries: Vec<(String, Vec<u8>)> = kvs
        .into_iter()
        .filter_map(|kv| {
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                bad_keys += 1;
                log::warn!(
                    "ignoring non-UTF-8 key {:?} under {b}",
                    String::from_utf8_lossy(kv.key())
                );
                return None;
            };
            let rel = strip_base(prefix, key)?.to_string();
            Some((rel, kv.value().to_vec()))
        })
        .collect();
    let mut store = ServiceStore::from_entries(entries);
    store.add_malformed(bad_keys);
    Ok((store, rev))
}

/// Lists all Services, Endpoints and EndpointSlices under `prefix`, at one
/// revision. Unusable values are skipped (logged, and counted in
/// [`ServiceStore::malformed`]).
pub async fn list(client: &mut Client, prefix: &str) -> anyhow::Result<ServiceStore> {
    Ok(list_with_revision(client, prefix).await?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
    }

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
