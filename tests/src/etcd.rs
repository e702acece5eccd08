//! A real, throw-away etcd (Debian's `/usr/bin/etcd`, v3.4) for tests.
//!
//! Each [`Etcd`] is a single-member cluster with its own data directory and
//! ports, so tests run in parallel without seeing each other. It is killed
//! (by its own PID) and its data directory removed on drop, also when the
//! test panics; a panicking test gets the tail of etcd's log on stderr.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The etcd binary (package etcd-server).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with fresh ports before giving up (a port we picked may be
/// taken by someone else before etcd binds it).
const START_ATTEMPTS: usize = 4;
/// etcd prints this once it has a leader and serves clients.
const READY_LINE: &str = "ready to serve client requests";
/// What etcd 3.4 logs instead with `--logger=zap` once clients are served.
const READY_LINE_ZAP: &str = "serving client traffic";

/// A running etcd.
pub struct Etcd {
    /// Client URL, e.g. `http://127.0.0.1:41234`.
    pub endpoint: String,
    /// The data directory (removed on drop).
    pub data_dir: PathBuf,
    /// etcd's stdout and stderr.
    pub log_path: PathBuf,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    netns: Option<String>,
    child: Option<Child>,
}

fn unique_dir() -> anyhow::Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "dp-etcd-{}-{}-{:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    ));
    // etcd wants its data directory private.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Two distinct free TCP ports on `ip`, found by binding port 0 (both held
/// at once so they differ) and releasing them.
fn free_ports(ip: Ipv4Addr) -> anyhow::Result<(u16, u16)> {
    let a = TcpListener::bind((ip, 0)).context("binding a free port")?;
    let b = TcpListener::bind((ip, 0)).context("binding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Two random ports for a fresh network namespace, where nothing listens yet.
fn random_ports() -> (u16, u16) {
    let a = 20000 + rand::random::<u16>() % 20000;
    (a, a + 1)
}

/// The last `lines` lines of a file (best effort, for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} unreadable)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// TCP connect to `addr` from inside network namespace `netns` (a thread
/// that joins it), or from here when `netns` is `None`.
fn can_connect(netns: Option<&str>, addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(500);
    let Some(ns) = netns else {
        return TcpStream::connect_timeout(&addr, timeout).is_ok();
    };
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let Ok(f) = fs::File::open(&path) else {
                return false;
            };
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd affects only this thread,
            // which ends right after the probe.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return false;
            }
            TcpStream::connect_timeout(&addr, timeout).is_ok()
        })
        .join()
        .unwrap_or(false)
    })
}

impl Etcd {
    /// Starts etcd on 127.0.0.1 with free ports and waits until it serves.
    pub fn start() -> anyhow::Result<Etcd> {
        Self::start_with(None, Ipv4Addr::LOCALHOST)
    }

    /// Starts etcd inside the named network namespace (`/run/netns/<netns>`),
    /// listening on `ip`, and waits until it serves.
    pub fn start_in_netns(netns: &str, ip: Ipv4Addr) -> anyhow::Result<Etcd> {
        Self::start_with(Some(netns.to_string()), ip)
    }

    fn start_with(netns: Option<String>, ip: Ipv4Addr) -> anyhow::Result<Etcd> {
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let (client_port, peer_port) = match netns {
                Some(_) => random_ports(),
                None => free_ports(ip)?,
            };
            let data_dir = unique_dir()?;
            let mut etcd = Etcd {
                endpoint: format!("http://{ip}:{client_port}"),
                log_path: data_dir.join("etcd.log"),
                data_dir,
                ip,
                client_port,
                peer_port,
                netns: netns.clone(),
                child: None,
            };
            match etcd.spawn_and_wait() {
                Ok(()) => return Ok(etcd),
                // Dropping `etcd` kills it and removes its directory.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn command(&self) -> Command {
        let client_url = format!("http://{}:{}", self.ip, self.client_port);
        let peer_url = format!("http://{}:{}", self.ip, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(ETCD_BIN);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        cmd.arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.data_dir.join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg(format!(
                "--initial-cluster-token=dp-{}",
                rand::random::<u32>()
            ))
            // Fast elections: the single member leads within milliseconds,
            // and short lease TTLs (1 s) are allowed.
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        // Our flags, not whatever the environment says.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("creating {}", self.log_path.display()))?;
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {ETCD_BIN}"))?;
        self.child = Some(child);

        let addr = SocketAddr::from((self.ip, self.client_port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "etcd exited during startup ({status}); log {}:\n{}",
                    self.log_path.display(),
                    tail(&self.log_path, 30)
                );
            }
            let ready = fs::read_to_string(&self.log_path)
                .map(|t| t.contains(READY_LINE) || t.contains(READY_LINE_ZAP))
                .unwrap_or(false);
            if ready && can_connect(self.netns.as_deref(), addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd at {} not ready after {START_TIMEOUT:?}; log {}:\n{}",
                    self.endpoint,
                    self.log_path.display(),
                    tail(&self.log_path, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The etcd process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same data and ports (to test
    /// clients reconnecting and watches resyncing).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        // Only the lines from the new run count for readiness.
        let _ = fs::remove_file(&self.log_path);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                // The old process's ports may linger a moment.
                Err(e) if Instant::now() < deadline => {
                    log::debug!("etcd restart: {e:#}; retrying");
                    self.stop();
                    let _ = fs::remove_file(&self.log_path);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A client for this etcd.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        etcd_client::Client::connect([self.endpoint.as_str()], None)
            .await
            .with_context(|| format!("connecting to {}", self.endpoint))
    }

    /// Connect options for the agent's own connect function.
    pub fn options(&self) -> dataplane::etcd::EtcdOptions {
        dataplane::etcd::EtcdOptions::new([self.endpoint.clone()])
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- etcd log tail ({}) ---\n{}\n---",
                self.log_path.display(),
                tail(&self.log_path, 20)
            );
        }
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}
