//! Connecting to etcd, with flannel's knobs (`--etcd-endpoints`,
//! `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`, `--etcd-username`,
//! `--etcd-password`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How long to wait for etcd to answer the first request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings, so a dead connection is noticed even while only a watch or
/// nothing at all is in flight.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The options cannot work (no endpoint, a scheme that does not match
    /// the TLS files, half of a credential pair): retrying will not help.
    #[error("{0}")]
    Options(String),
    /// A TLS file could not be read.
    #[error("reading etcd {what} {}: {error}", path.display())]
    ReadFile {
        /// `CA file`, `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read (in the message, so not also a
        /// `source()`, which would print it twice in an error chain).
        error: std::io::Error,
    },
    /// etcd could not be reached, or refused us (bad credentials, say).
    #[error("connecting to etcd at {endpoints}: {error}")]
    Connect {
        /// The endpoints tried, comma separated.
        endpoints: String,
        /// The client error (in the message, not also a `source()`).
        error: etcd_client::Error,
    },
    /// etcd did not answer within the connect timeout.
    #[error("etcd at {endpoints} did not answer within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The endpoints tried, comma separated.
        endpoints: String,
    },
}

fn bad_options(msg: impl Into<String>) -> ConnectError {
    ConnectError::Options(msg.into())
}

/// Where etcd is and how to authenticate.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// `host:port` or `http(s)://host:port`; several for a cluster.
    pub endpoints: Vec<String>,
    /// CA bundle for verifying the server (required for https).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client private key (needs `cert_file`).
    pub key_file: Option<PathBuf>,
    /// Username for etcd's auth (needs `password`).
    pub username: Option<String>,
    /// Password for etcd's auth.
    pub password: Option<String>,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EtcdOptions {
    /// Plain-http options for `endpoints`.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdOptions::default()
        }
    }

    fn uses_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Endpoints with a scheme: as given, or `https://` when TLS files are
    /// set and `http://` otherwise. An explicit `http://` with TLS files is
    /// an error rather than a silent plaintext connection.
    pub fn normalized_endpoints(&self) -> Result<Vec<String>, ConnectError> {
        if self.endpoints.is_empty() {
            return Err(bad_options("no etcd endpoints given"));
        }
        let tls = self.uses_tls();
        let mut out = Vec::with_capacity(self.endpoints.len());
        for e in &self.endpoints {
            let e = e.trim();
            if e.is_empty() {
                return Err(bad_options(format!(
                    "empty etcd endpoint in {:?}",
                    self.endpoints
                )));
            }
            let full = if let Some(rest) = e.strip_prefix("http://") {
                if tls {
                    return Err(bad_options(format!(
                        "etcd endpoint {e} is plain http but TLS files were given; use https://{rest}"
                    )));
                }
                e.to_string()
            } else if e.starts_with("https://") {
                if !tls {
                    return Err(bad_options(format!(
                        "etcd endpoint {e} is https but no CA file was given (--etcd-cafile)"
                    )));
                }
                e.to_string()
            } else if e.contains("://") {
                return Err(bad_options(format!(
                    "etcd endpoint {e}: only http:// and https:// are supported"
                )));
            } else if tls {
                format!("https://{e}")
            } else {
                format!("http://{e}")
            };
            out.push(full);
        }
        Ok(out)
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|error| ConnectError::ReadFile {
        what,
        path: path.to_owned(),
        error,
    })
}

fn tls_options(opts: &EtcdOptions) -> Result<TlsOptions, ConnectError> {
    let Some(ca) = &opts.ca_file else {
        return Err(bad_options(
            "TLS to etcd needs a CA file (--etcd-cafile) to verify the server",
        ));
    };
    let mut tls =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read_file("CA file", ca)?));
    match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read_file("certificate", cert)?,
                read_file("key", key)?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(bad_options(
                "etcd client certificate given without its key file",
            ));
        }
        (None, Some(_)) => {
            return Err(bad_options(
                "etcd client key given without its certificate file",
            ));
        }
    }
    Ok(tls)
}

/// Connects to etcd and checks that it answers, so a wrong endpoint or bad
/// credentials fail here with a clear message rather than later.
pub async fn connect(opts: &EtcdOptions) -> Result<Client, ConnectError> {
    let endpoints = opts.normalized_endpoints()?;
    let mut co = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        // A member cut off from the others cannot tell its watchers: their
        // watches just fall silent. With etcd's "hasleader" metadata (which
        // etcd-client sets on every request, there is no per-watch switch)
        // such a member cancels our watches, so the watchers re-list,
        // perhaps through another endpoint, and other requests to it fail
        // at once instead of timing out.
        .with_require_leader(true);
    if opts.uses_tls() {
        co = co.with_tls(tls_options(opts)?);
    }
    match (&opts.username, &opts.password) {
        (Some(u), Some(p)) => co = co.with_user(u.clone(), p.clone()),
        (None, None) => {}
        (Some(_), None) => return Err(bad_options("etcd username given without a password")),
        (None, Some(_)) => return Err(bad_options("etcd password given without a username")),
    }

    let list = endpoints.join(",");
    let failed = |error| ConnectError::Connect {
        endpoints: list.clone(),
        error,
    };
    let timed_out = |_| ConnectError::Timeout {
        endpoints: list.clone(),
    };
    let mut client = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&endpoints, Some(co)))
        .await
        .map_err(timed_out)?
        .map_err(failed)?;
    tokio::time::timeout(CONNECT_TIMEOUT, client.status())
        .await
        .map_err(timed_out)?
        .map_err(failed)?;
    log::info!("connected to etcd at {list}");
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme() {
        let o = EtcdOptions::new(["127.0.0.1:2379", "http://a:1", "https://b:2"]);
        assert!(o.normalized_endpoints().is_err(), "https without CA");
        let o = EtcdOptions::new(["127.0.0.1:2379", "http://a:1"]);
        assert_eq!(
            o.normalized_endpoints().unwrap(),
            vec!["http://127.0.0.1:2379", "http://a:1"]
        );
        let mut o = EtcdOptions::new(["127.0.0.1:2379", "https://b:2"]);
        o.ca_file = Some("/ca.pem".into());
        assert_eq!(
            o.normalized_endpoints().unwrap(),
            vec!["https://127.0.0.1:2379", "https://b:2"]
        );
        o.endpoints.push("http://c:3".into());
        let e = o.normalized_endpoints().unwrap_err().to_string();
        assert!(e.contains("plain http"), "{e}");
        assert!(
            EtcdOptions::new(Vec::<String>::new())
                .normalized_endpoints()
                .is_err()
        );
        assert!(
            EtcdOptions::new(["unix:///x"])
                .normalized_endpoints()
                .is_err()
        );
    }

    #[test]
    fn debug_hides_password() {
        let mut o = EtcdOptions::new(["a:1"]);
        o.username = Some("flannel".into());
        o.password = Some("s3cret".into());
        let s = format!("{o:?}");
        assert!(!s.contains("s3cret"), "{s}");
        assert!(s.contains("flannel"), "{s}");
    }

    #[tokio::test]
    async fn half_configured_credentials_rejected() {
        let mut o = EtcdOptions::new(["127.0.0.1:1"]);
        o.username = Some("u".into());
        let e = connect(&o).await.err().expect("must fail").to_string();
        assert!(e.contains("without a password"), "{e}");
        let mut o = EtcdOptions::new(["127.0.0.1:1"]);
        o.ca_file = Some("/nonexistent/ca.pem".into());
        let e = format!("{:#}", connect(&o).await.err().expect("must fail"));
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
