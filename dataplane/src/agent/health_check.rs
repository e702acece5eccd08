//! `spec.healthCheckNodePort`: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP server on that port of the
//! node, as kube-proxy runs one. It answers 200 when this node has an
//! endpoint of the Service and 503 when it has none, so a load balancer
//! that probes it sends traffic only to nodes that serve it (the others
//! drop it: `drop_np_no_local_endpoint`). The body is kube-proxy's:
//! `{"service":{"namespace":"default","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}`.
//!
//! The port comes from the nodePort range (`apply` allocates it as the
//! API server does), which the data path serves only for the nodePorts
//! themselves, so the listener here gets its connections.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::services::ServiceName;

/// The health check servers of this node, one per Service that has a
/// `healthCheckNodePort`.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<ServiceName, Server>,
}

struct Server {
    port: u16,
    /// This node's endpoints of the Service, as the last update said.
    local: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The task owns the listener: ending it closes the port.
        self.task.abort();
    }
}

impl HealthChecks {
    /// Makes `name`'s health check server match: listening on `port`
    /// (none: stopped) and reporting `local_endpoints`. Must run inside
    /// the agent's tokio runtime. A port that cannot be bound is logged
    /// and tried again at the Service's next update.
    pub fn set(&mut self, name: &ServiceName, port: Option<u16>, local_endpoints: usize) {
        if let (Some(s), Some(p)) = (self.servers.get(name), port)
            && s.port == p
        {
            s.local.store(local_endpoints, Ordering::Relaxed);
            return;
        }
        if let Some(old) = self.servers.remove(name) {
            info!("service {name}: health check on port {} stopped", old.port);
        }
        let Some(port) = port else { return };
        let local = Arc::new(AtomicUsize::new(local_endpoints));
        match listen(port) {
            Ok(listener) => {
                info!(
                    "service {name}: health check on port {port} ({local_endpoints} local endpoints)"
                );
                let task = tokio::spawn(serve(listener, name.clone(), local.clone()));
                self.servers
                    .insert(name.clone(), Server { port, local, task });
            }
            Err(e) => warn!("service {name}: health check on port {port}: {e}"),
        }
    }

    /// The ports served.
    #[cfg(test)]
    pub fn ports(&self) -> impl Iterator<Item = (&ServiceName, u16)> {
        self.servers.iter().map(|(n, s)| (n, s.port))
    }
}

fn listen(port: u16) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

async fn serve(listener: TcpListener, name: ServiceName, local: Arc<AtomicUsize>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("service {name}: health check: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (name, local) = (name.clone(), local.clone());
        tokio::spawn(async move {
            let answer = service_fn(move |_req| {
                let n = local.load(Ordering::Relaxed);
                std::future::ready(Ok::<_, Infallible>(response(&name, n)))
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), answer);
            if let Err(e) = conn.await {
                debug!("health check: connection from {peer}: {e}");
            }
        });
    }
}

/// kube-proxy's answer: 200 with local endpoints, 503 without.
fn response(name: &ServiceName, local_endpoints: usize) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "service": {"namespace": name.namespace(), "name": name.name()},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = if local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy() {
        let name = ServiceName::new("default", "web");
        let ok = response(&name, 2);
        assert_eq!(ok.status(), StatusCode::OK);
        let none = response(&name, 0);
        assert_eq!(none.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(none.headers()[CONTENT_TYPE], "application/json");
    }

    #[tokio::test]
    async fn serves_follows_updates_and_closes_its_port() {
        let mut hc = HealthChecks::default();
        let name = ServiceName::new("default", "web");
        // A free port, found by binding it first.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        hc.set(&name, Some(port), 1);
        let get = || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        let a = get().await.unwrap();
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(
            a.ends_with(
                r#"{"localEndpoints":1,"service":{"name":"web","namespace":"default"},"serviceProxyHealthy":true}"#
            ),
            "{a}"
        );
        hc.set(&name, Some(port), 0);
        let a = get().await.unwrap();
        assert!(a.starts_with("HTTP/1.1 503"), "{a}");
        assert_eq!(hc.ports().collect::<Vec<_>>(), vec![(&name, port)]);
        hc.set(&name, None, 0);
        tokio::task::yield_now().await;
        assert!(get().await.is_err(), "the port is closed");
        assert_eq!(hc.ports().count(), 0);
    }
}
