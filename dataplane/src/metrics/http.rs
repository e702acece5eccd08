//! `--metrics-address`: `/metrics` (OpenMetrics text), `/healthz` (the
//! process serves and its event loop turns) and `/readyz` (lease held,
//! programs attached, maps synced with etcd), over HTTP/1.1 with hyper.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use tokio::{net::TcpListener, sync::watch};

use super::{Metrics, global};

/// The event loop turns at least every tick (10 s); three missed ticks
/// and `/healthz` fails.
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Binds `addr` (failing at once, so a wrong address stops the agent
/// with a clear error) and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --metrics-address {addr}: {e}"))?;
    info!(
        "metrics on http://{}/metrics (also /healthz, /readyz)",
        listener.local_addr()?
    );
    Ok(tokio::spawn(accept_loop(listener, shutdown)))
}

async fn accept_loop(listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!("metrics: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::etcd::wait_shutdown(&mut shutdown) => return,
        };
        tokio::spawn(async move {
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service_fn(handle));
            if let Err(e) = conn.await {
                debug!("metrics: connection from {peer}: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        ));
    }
    let m = global();
    Ok(match req.uri().path() {
        "/metrics" => {
            // Reading the maps is a series of syscalls: off the workers.
            match tokio::task::spawn_blocking(move || m.encode()).await {
                Ok(body) => reply(StatusCode::OK, OPENMETRICS, body),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        "/healthz" => {
            let (status, body) = health(m);
            reply(status, TEXT, body)
        }
        "/readyz" => {
            let (status, body) = readiness(m);
            reply(status, TEXT, body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    })
}

/// `/healthz`: the process answers, and its event loop (once running)
/// has turned within [`STUCK_AFTER`].
pub fn health(m: &Metrics) -> (StatusCode, String) {
    match m.since_loop_turned() {
        Some(d) if d > STUCK_AFTER => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "event loop stuck: last turned {:.0}s ago\n",
                d.as_secs_f64()
            ),
        ),
        _ => (StatusCode::OK, "ok\n".into()),
    }
}

/// `/readyz`: 200 once the lease is held, the programs attached and the
/// maps synced with etcd; else 503 naming what is missing.
pub fn readiness(m: &Metrics) -> (StatusCode, String) {
    let missing = m.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        let why: Vec<&str> = missing.iter().map(|p| p.describe()).collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join(", ")),
        )
    }
}
