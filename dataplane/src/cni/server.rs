//! The agent's side of [`super::proto`]: a Unix socket that decodes
//! requests and hands them to an [`EndpointRegistry`].
//!
//! The socket file is mode 0600 (the plugin runs as root, nobody else may
//! register endpoints). It is bound under a temporary name and renamed into
//! place, so there is never a window with a wider mode, and a stale file
//! left by a dead agent is replaced; a live one is not (binding fails).
//! Dropping the [`AgentSocket`] (or the future of [`AgentSocket::serve`])
//! removes the file, unless another process has replaced it since.

use std::{
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

use super::proto::{
    Attachment, AttachmentKey, Endpoint, ErrorCode, MAX_REQUEST, ProtoError, Reply, Request,
    Response, Status, describe, read_bounded,
};

/// How long a client may take to send its request, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent keeps about pod endpoints. The server calls these
/// concurrently, one task per connection.
pub trait EndpointRegistry: Send + Sync + 'static {
    /// Registers an endpoint; the pod must be reachable (map entries
    /// written, programs attached) when this returns `Ok`. A key that is
    /// already registered gets the new endpoint. IPAM is the authority on
    /// addresses: another key registered with the same IP is stale (its
    /// DEL did not reach the agent) and gives way.
    fn add(&self, endpoint: Endpoint) -> impl Future<Output = Result<(), ProtoError>> + Send;

    /// Removes an endpoint and everything the agent holds for it. Unknown
    /// keys are `Ok` (DEL is idempotent).
    fn del(&self, key: AttachmentKey) -> impl Future<Output = Result<(), ProtoError>> + Send;

    /// The registered endpoint of `key`; [`ErrorCode::NotFound`] if none.
    fn check(
        &self,
        key: AttachmentKey,
    ) -> impl Future<Output = Result<Endpoint, ProtoError>> + Send;

    /// Every registered attachment (GC compares it with the runtime's
    /// list).
    fn list(&self) -> impl Future<Output = Result<Vec<Attachment>, ProtoError>> + Send;

    /// Whether `add` can be served now, and why not.
    fn status(&self) -> impl Future<Output = Status> + Send;
}

/// Runs one request against the registry.
pub async fn dispatch<R: EndpointRegistry>(registry: &R, req: Request) -> Response {
    let reply = match req {
        Request::Add(endpoint) => registry.add(endpoint).await.map(|()| Reply::Done),
        Request::Del(key) => registry.del(key).await.map(|()| Reply::Done),
        Request::Check(key) => registry.check(key).await.map(Reply::Endpoint),
        Request::List => registry.list().await.map(Reply::Attachments),
        Request::Status => Ok(Reply::Status(registry.status().await)),
    };
    match reply {
        Ok(reply) => Response::Ok(reply),
        Err(e) => Response::Error(e),
    }
}

/// The agent's listening socket.
#[derive(Debug)]
pub struct AgentSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so that drop only
    /// removes our own.
    file_id: (u64, u64),
}

impl AgentSocket {
    /// Binds `path` (creating its directory), mode 0600. A stale socket
    /// file is replaced; a socket someone listens on, or a file that is
    /// not a socket, is an error. Must run inside a tokio runtime.
    pub async fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file_name = path
            .file_name()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has no file name", path.display()),
                )
            })?
            .to_string_lossy()
            .into_owned();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; not replacing it",
                        path.display()
                    ),
                ));
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("another process is listening on {}", path.display()),
                    ));
                }
                log::info!("replacing stale socket {}", path.display());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }

        let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std_listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std_listener)?;
        let meta = std::fs::metadata(&path)?;
        Ok(Self {
            listener,
            path,
            file_id: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the future is dropped, one task each.
    pub async fn serve<R: EndpointRegistry>(self, registry: Arc<R>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let registry = Arc::clone(&registry);
                    tokio::spawn(async move { handle(stream, &*registry).await });
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    log::warn!("CNI socket {}: accept failed: {e}", self.path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file_id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One connection: read the request, answer, close.
async fn handle<R: EndpointRegistry>(mut stream: UnixStream, registry: &R) {
    let response = match tokio::time::timeout(IO_TIMEOUT, read_bounded(&mut stream, MAX_REQUEST))
        .await
    {
        Err(_) => Response::Error(ProtoError::new(
            ErrorCode::Invalid,
            format!(
                "no complete request within {IO_TIMEOUT:?} (send it, then shut down the write half)"
            ),
        )),
        Ok(Err(e)) => {
            log::debug!("CNI socket: reading a request: {e}");
            return;
        }
        Ok(Ok(None)) => {
            // Take (a bounded amount of) the rest, so that the client reads
            // the answer instead of a reset from closing on unread data.
            let mut rest = (&mut stream).take(16 * MAX_REQUEST as u64);
            let _ = tokio::time::timeout(
                IO_TIMEOUT,
                tokio::io::copy(&mut rest, &mut tokio::io::sink()),
            )
            .await;
            Response::Error(ProtoError::new(
                ErrorCode::Invalid,
                format!("request longer than {MAX_REQUEST} bytes"),
            ))
        }
        Ok(Ok(Some(bytes))) => match serde_json::from_slice::<Request>(&bytes) {
            Err(e) => Response::Error(ProtoError::new(
                ErrorCode::Invalid,
                format!("undecodable request: {e}"),
            )),
            Ok(req) => {
                let what = describe(&req);
                let resp = dispatch(registry, req).await;
                match &resp {
                    Response::Ok(_) => log::debug!("CNI {what}: ok"),
                    Response::Error(e) => log::info!("CNI {what}: {e}"),
                }
                resp
            }
        },
    };
    let Ok(bytes) = serde_json::to_vec(&response) else {
        return;
    };
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("CNI socket: writing an answer: {e}"),
        Err(_) => log::debug!("CNI socket: the client did not take its answer"),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Mutex};

    use super::*;
    use crate::cni::proto::{AgentClient, ClientError, tests::endpoint};

    /// An in-memory registry that records the calls it got.
    #[derive(Default)]
    struct Fake {
        endpoints: Mutex<BTreeMap<AttachmentKey, Endpoint>>,
        calls: Mutex<Vec<String>>,
        not_ready: Option<String>,
    }

    impl Fake {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl EndpointRegistry for Fake {
        async fn add(&self, e: Endpoint) -> Result<(), ProtoError> {
            self.log(format!("add {}", e.container_id));
            if let Some(why) = &self.not_ready {
                return Err(ProtoError::new(ErrorCode::NotReady, why.clone()));
            }
            if e.host_ifindex == 0 {
                return Err(ProtoError::new(ErrorCode::Invalid, "host_ifindex 0"));
            }
            let mut eps = self.endpoints.lock().unwrap();
            eps.retain(|_, o| o.ip != e.ip);
            eps.insert(e.key(), e);
            Ok(())
        }
        async fn del(&self, k: AttachmentKey) -> Result<(), ProtoError> {
            self.log(format!("del {}", k.container_id));
            self.endpoints.lock().unwrap().remove(&k);
            Ok(())
        }
        async fn check(&self, k: AttachmentKey) -> Result<Endpoint, ProtoError> {
            self.log(format!("check {}", k.container_id));
            self.endpoints
                .lock()
                .unwrap()
                .get(&k)
                .cloned()
                .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, "no such attachment"))
        }
        async fn list(&self) -> Result<Vec<Attachment>, ProtoError> {
            self.log("list".into());
            Ok(self
                .endpoints
                .lock()
                .unwrap()
                .values()
                .map(|e| Attachment {
                    container_id: e.container_id.clone(),
                    ifname: e.ifname.clone(),
                    ip: e.ip,
                })
                .collect())
        }
        async fn status(&self) -> Status {
            self.log("status".into());
            Status {
                ready: self.not_ready.is_none(),
                reason: self.not_ready.clone(),
            }
        }
    }

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("dp-cni-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn start(
        fake: Fake,
        dir: &TempDir,
    ) -> (AgentClient, Arc<Fake>, tokio::task::JoinHandle<()>) {
        let path = dir.0.join("sub/cni.sock");
        let sock = AgentSocket::bind(&path).await.unwrap();
        let fake = Arc::new(fake);
        let task = tokio::spawn(sock.serve(Arc::clone(&fake)));
        (AgentClient::new(path), fake, task)
    }

    #[tokio::test]
    async fn dispatches_every_request() {
        let dir = TempDir::new("dispatch");
        let (client, fake, task) = start(Fake::default(), &dir).await;
        let a = endpoint("a", [10, 0, 0, 2]);
        let b = endpoint("b", [10, 0, 0, 3]);
        client.add(&a).await.unwrap();
        client.add(&b).await.unwrap();
        assert_eq!(client.check(&a.key()).await.unwrap(), a);
        let mut listed = client.list().await.unwrap();
        listed.sort_by(|x, y| x.container_id.cmp(&y.container_id));
        assert_eq!(
            listed
                .iter()
                .map(|x| (x.container_id.as_str(), x.ip))
                .collect::<Vec<_>>(),
            vec![("a", a.ip), ("b", b.ip)]
        );
        // A registry refusal comes back as a typed error.
        let bad = Endpoint {
            container_id: "c".into(),
            host_ifindex: 0,
            ..a.clone()
        };
        match client.add(&bad).await.unwrap_err() {
            ClientError::Refused { error, .. } => assert_eq!(error.code, ErrorCode::Invalid),
            other => panic!("expected a refusal, got {other}"),
        }
        client.del(&a.key()).await.unwrap();
        client.del(&a.key()).await.unwrap();
        match client.check(&a.key()).await.unwrap_err() {
            ClientError::Refused { error, .. } => assert_eq!(error.code, ErrorCode::NotFound),
            other => panic!("expected not_found, got {other}"),
        }
        assert_eq!(
            client.status().await.unwrap(),
            Status {
                ready: true,
                reason: None
            }
        );
        assert_eq!(
            *fake.calls.lock().unwrap(),
            [
                "add a", "add b", "check a", "list", "add c", "del a", "del a", "check a", "status"
            ]
        );
        task.abort();
        let _ = task.await;
        assert!(
            !client.socket.exists(),
            "socket file removed with the server"
        );
    }

    #[tokio::test]
    async fn not_ready_registry() {
        let dir = TempDir::new("notready");
        let fake = Fake {
            not_ready: Some("no subnet lease yet".into()),
            ..Default::default()
        };
        let (client, _fake, task) = start(fake, &dir).await;
        let s = client.status().await.unwrap();
        assert!(!s.ready);
        assert_eq!(s.reason.as_deref(), Some("no subnet lease yet"));
        let e = client.add(&endpoint("a", [10, 0, 0, 2])).await.unwrap_err();
        assert!(e.to_string().contains("no subnet lease yet"), "{e}");
        assert!(!e.is_unreachable());
        task.abort();
    }

    async fn raw(path: &Path, bytes: &[u8]) -> Response {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_answer() {
        let dir = TempDir::new("bad");
        let (client, fake, task) = start(Fake::default(), &dir).await;
        for bad in [
            &b"not json"[..],
            b"{\"op\":\"explode\"}",
            b"{\"op\":\"del\"}",
            b"",
        ] {
            match raw(&client.socket, bad).await {
                Response::Error(e) => assert_eq!(e.code, ErrorCode::Invalid, "{e}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        let huge = vec![b' '; MAX_REQUEST + 10];
        match raw(&client.socket, &huge).await {
            Response::Error(e) => assert!(e.msg.contains("longer"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(
            fake.calls.lock().unwrap().is_empty(),
            "nothing reached the registry"
        );
        task.abort();
    }

    #[tokio::test]
    async fn bind_mode_and_stale_files() {
        let dir = TempDir::new("bind");
        let path = dir.0.join("agent.sock");

        // A stale socket file (its listener gone) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let sock = AgentSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

        // A live one is not.
        let e = AgentSocket::bind(&path).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");

        // Dropping removes our file, but not a file that replaced it.
        drop(sock);
        assert!(!path.exists());
        let first = AgentSocket::bind(&path).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let second = AgentSocket::bind(&path).await.unwrap();
        drop(first);
        assert!(
            path.exists(),
            "the first socket's drop removed the second's file"
        );
        drop(second);
        assert!(!path.exists());

        // Not a socket: left alone.
        std::fs::write(&path, "precious").unwrap();
        let e = AgentSocket::bind(&path).await.unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
