//! The load generator: threads that joined a pod's network namespace and
//! pinned themselves to one CPU. An echo server (TCP and UDP) on the
//! server side; TCP request/response, TCP connect+request+close and UDP
//! request/response clients that record every transaction's latency.
//! Bulk throughput is iperf3's (`-J`), pinned with `-A`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::stats::percentile_sorted;
use crate::netns::{NetNs, in_netns};

pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;
/// The "one CPU" runs: client and server both pinned here, so a
/// transaction is one CPU's work (per-packet cost) rather than wake-ups
/// across CPUs.
pub const SAME_CPU: usize = CLIENT_CPU;

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// TCP and UDP echo on `ip:port` in a pod, pinned to one CPU
/// ([`SERVER_CPU`] with [`EchoServer::start`]). TCP connections are
/// served one after the other on the accept thread (the clients here hold
/// one connection at a time).
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    listen_fd: i32,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, ip: Ipv4Addr, port: u16) -> anyhow::Result<EchoServer> {
        Self::start_on(ns, ip, port, SERVER_CPU)
    }

    /// The echo server with both its threads pinned to `cpu`.
    pub fn start_on(ns: &NetNs, ip: Ipv4Addr, port: u16, cpu: usize) -> anyhow::Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<i32>>();
        let (s1, tx1) = (stop.clone(), tx.clone());
        let tcp = in_netns(ns, move || {
            pin(cpu);
            let l = match TcpListener::bind((ip, port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx1.send(Err(e.into()));
                    return;
                }
            };
            let _ = tx1.send(Ok(l.as_raw_fd()));
            let mut buf = vec![0u8; 65536];
            while !s1.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    if s1.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let s2 = stop.clone();
        let udp = in_netns(ns, move || {
            pin(cpu);
            let sock = match UdpSocket::bind((ip, port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = tx.send(Ok(-1));
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        let mut listen_fd = -1;
        for _ in 0..2 {
            let fd = rx
                .recv_timeout(Duration::from_secs(5))
                .context("echo server did not start")??;
            if fd >= 0 {
                listen_fd = fd;
            }
        }
        Ok(EchoServer {
            stop,
            listen_fd,
            threads: vec![tcp, udp],
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the thread blocked in accept() (it gets EINVAL).
        // SAFETY: shutdown on the listener's fd, which the thread still owns.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One run of a request/response style test.
#[derive(Clone, Debug, Default)]
pub struct RrResult {
    /// Transactions (or connections) per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CRR only: connect() latency.
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    pub count: u64,
    pub errors: u64,
}

fn finish(mut lat: Vec<u32>, mut conn: Vec<u32>, elapsed: Duration, errors: u64) -> RrResult {
    lat.sort_unstable();
    conn.sort_unstable();
    RrResult {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile_sorted(&lat, 50.0) / 1000.0,
        p99_us: percentile_sorted(&lat, 99.0) / 1000.0,
        connect_p50_us: percentile_sorted(&conn, 50.0) / 1000.0,
        connect_p99_us: percentile_sorted(&conn, 99.0) / 1000.0,
        count: lat.len() as u64,
        errors,
    }
}

const WARMUP: Duration = Duration::from_millis(100);

fn run_client<T: Send + 'static>(
    ns: &NetNs,
    cpu: usize,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    in_netns(ns, move || {
        pin(cpu);
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// One TCP connection, `size`-byte request and response in a loop; the
/// client pinned to `cpu`.
pub fn tcp_rr(
    ns: &NetNs,
    cpu: usize,
    dst: SocketAddrV4,
    size: usize,
    dur: Duration,
) -> anyhow::Result<RrResult> {
    run_client(ns, cpu, move || {
        let mut s =
            TcpStream::connect_timeout(&dst.into(), Duration::from_secs(3)).context("connect")?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let req = vec![0x5au8; size];
        let mut resp = vec![0u8; size];
        let mut lat = Vec::with_capacity(1 << 20);
        let warm_end = Instant::now() + WARMUP;
        let mut start = None;
        loop {
            let t0 = Instant::now();
            s.write_all(&req).context("write")?;
            s.read_exact(&mut resp).context("read")?;
            let t1 = Instant::now();
            match start {
                None if t1 >= warm_end => start = Some(t1),
                None => {}
                Some(st) => {
                    lat.push((t1 - t0).as_nanos() as u32);
                    if t1 - st >= dur {
                        return Ok(finish(lat, Vec::new(), t1 - st, 0));
                    }
                }
            }
        }
    })
}

/// Connect, 1 byte each way, close; a new connection each time; the
/// client pinned to `cpu`.
pub fn tcp_crr(
    ns: &NetNs,
    cpu: usize,
    dst: SocketAddrV4,
    dur: Duration,
) -> anyhow::Result<RrResult> {
    run_client(ns, cpu, move || {
        let mut lat = Vec::with_capacity(1 << 18);
        let mut conn = Vec::with_capacity(1 << 18);
        let mut errors = 0u64;
        let warm_end = Instant::now() + WARMUP;
        let mut start: Option<Instant> = None;
        let mut b = [0u8; 1];
        loop {
            let t0 = Instant::now();
            let r = (|| -> std::io::Result<Instant> {
                let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2))?;
                let tc = Instant::now();
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"x")?;
                s.read_exact(&mut b)?;
                drop(s);
                Ok(tc)
            })();
            let t1 = Instant::now();
            let tc = match r {
                Ok(tc) => tc,
                Err(_) => {
                    errors += 1;
                    if errors > 200 {
                        bail!("CRR to {dst}: more than 200 failed connections");
                    }
                    continue;
                }
            };
            match start {
                None if t1 >= warm_end => start = Some(t1),
                None => {}
                Some(st) => {
                    lat.push((t1 - t0).as_nanos() as u32);
                    conn.push((tc - t0).as_nanos() as u32);
                    if t1 - st >= dur {
                        return Ok(finish(lat, conn, t1 - st, errors));
                    }
                }
            }
        }
    })
}

/// UDP `size`-byte request/response on one connected socket; a lost
/// datagram counts as an error after 200 ms.
pub fn udp_rr(
    ns: &NetNs,
    dst: SocketAddrV4,
    size: usize,
    dur: Duration,
) -> anyhow::Result<RrResult> {
    run_client(ns, CLIENT_CPU, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect(dst)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let req = vec![0x5au8; size];
        let mut resp = vec![0u8; 2048];
        let mut lat = Vec::with_capacity(1 << 20);
        let mut errors = 0;
        let warm_end = Instant::now() + WARMUP;
        let mut start: Option<Instant> = None;
        loop {
            let t0 = Instant::now();
            s.send(&req)?;
            if s.recv(&mut resp).is_err() {
                errors += 1;
                if errors > 50 {
                    bail!("UDP RR to {dst}: more than 50 datagrams lost");
                }
                continue;
            }
            let t1 = Instant::now();
            match start {
                None if t1 >= warm_end => start = Some(t1),
                None => {}
                Some(st) => {
                    lat.push((t1 - t0).as_nanos() as u32);
                    if t1 - st >= dur {
                        return Ok(finish(lat, Vec::new(), t1 - st, errors));
                    }
                }
            }
        }
    })
}

/// iperf3 from `client` to `server_ip`, `streams` parallel streams, for
/// `secs`; client and server pinned to `(client, server)` CPUs (`-A`).
/// Returns (Gbit/s received, retransmits).
pub fn iperf3(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    streams: u32,
    secs: f64,
    cpus: (usize, usize),
) -> anyhow::Result<(f64, u64)> {
    iperf3_via(
        server,
        server_ip,
        client,
        SocketAddrV4::new(server_ip, IPERF3_PORT),
        streams,
        secs,
        cpus,
    )
}

/// The port iperf3's server listens on.
pub const IPERF3_PORT: u16 = 5201;

/// [`iperf3`] with the client connecting to `via` (a Service frontend
/// that leads to the server) instead of the server's own address.
pub fn iperf3_via(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    via: SocketAddrV4,
    streams: u32,
    secs: f64,
    cpus: (usize, usize),
) -> anyhow::Result<(f64, u64)> {
    let port = IPERF3_PORT.to_string();
    let port = port.as_str();
    let mut srv = server
        .command("iperf3")
        .args([
            "-s",
            "-1",
            "-A",
            &cpus.1.to_string(),
            "-B",
            &server_ip.to_string(),
            "-p",
            port,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 -s")?;
    let mut last_err = String::new();
    let mut result = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let out = client
            .command("iperf3")
            .args([
                "-c",
                &via.ip().to_string(),
                "-p",
                &via.port().to_string(),
                "-A",
                &cpus.0.to_string(),
                "-J",
                "-P",
                &streams.to_string(),
            ])
            .args(["-t", &format!("{secs}")])
            .output()
            .context("iperf3 -c")?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            result = Some((
                bps / 1e9,
                v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            ));
            break;
        }
        last_err = v["error"].as_str().unwrap_or("no JSON").to_owned();
        if !last_err.contains("connect") {
            break;
        }
    }
    // Only the server we started, by its PID.
    if let Ok(None) = srv.try_wait() {
        let _ = srv.kill();
    }
    let _ = srv.wait();
    result.with_context(|| format!("iperf3 failed: {last_err}"))
}
