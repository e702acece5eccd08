//! Requests several modules make: bounded in time, paged, conditional.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, KvClient, PutOptions, Txn, TxnOp,
};

use super::KeyRange;

/// Bound on each request, so a black-holed connection fails the request
/// (and the caller retries or reports it) instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response we accept from etcd. tonic's default is 4 MiB, which a
/// few hundred big EndpointSlices exceed; etcd itself caps values at its
/// `--max-request-bytes` (1.5 MiB by default).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Keys per page when listing. With the raised message limit above, a page
/// of even large values fits in one response.
const LIST_PAGE: i64 = 500;

/// An etcd request that failed, and what it was for.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd refused the request, or the connection failed.
    #[error("etcd: {what}: {error}")]
    Request {
        /// What we were doing, e.g. `listing /coreos.com/network/subnets/`.
        what: String,
        /// The client error (in the message, so not also a `source()`,
        /// which would print it twice in an error chain).
        error: etcd_client::Error,
    },
    /// etcd did not answer within [`REQUEST_TIMEOUT`].
    #[error("etcd: {what}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// What we were doing.
        what: String,
    },
}

/// Runs one request, bounded by [`REQUEST_TIMEOUT`]; `what` names it in
/// the error.
pub async fn timed<T>(
    what: impl FnOnce() -> String,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(error)) => Err(EtcdError::Request {
            what: what(),
            error,
        }),
        Err(_) => Err(EtcdError::Timeout { what: what() }),
    }
}

/// A KV client that accepts responses up to [`MAX_RESPONSE_BYTES`].
pub fn kv_client(client: &Client) -> KvClient {
    client
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Every key-value in `range` at one revision, read in pages; returns them
/// in key order with that revision (to watch from the next one).
pub async fn list(kv: &mut KvClient, range: &KeyRange) -> Result<(Vec<KeyValue>, i64), EtcdError> {
    let mut out = Vec::new();
    let revision = list_pages(kv, range, |page| out.extend(page)).await?;
    Ok((out, revision))
}

/// [`list`], handing each page to `page` as it arrives instead of
/// collecting them, so a large range is never held whole; returns the
/// revision every page was read at.
pub async fn list_pages(
    kv: &mut KvClient,
    range: &KeyRange,
    mut page: impl FnMut(Vec<KeyValue>),
) -> Result<i64, EtcdError> {
    let mut from = range.start.clone();
    let mut revision = 0;
    loop {
        let opts = GetOptions::new()
            .with_range(range.end.clone())
            .with_limit(LIST_PAGE)
            .with_revision(revision);
        let mut resp = timed(
            || format!("listing {}", range.describe()),
            kv.get(from.clone(), Some(opts)),
        )
        .await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        // The next page starts just after the last key.
        from = last.key().to_vec();
        from.push(0);
        page(kvs);
        if !more {
            break;
        }
    }
    Ok(revision)
}

/// Creates `key` holding `value`, attached to etcd lease `lease` if given,
/// only if the key does not exist: one transaction, so of several writers
/// racing for the key exactly one wins. Returns whether we did.
pub async fn create_if_absent(
    client: &mut Client,
    key: &str,
    value: impl Into<Vec<u8>>,
    lease: Option<i64>,
) -> Result<bool, EtcdError> {
    let opts = lease.map(|id| PutOptions::new().with_lease(id));
    let txn = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, opts)]);
    let resp = timed(|| format!("creating {key}"), client.txn(txn)).await?;
    Ok(resp.succeeded())
}
