//! Restarting, upgrading and removing the agent (issue 10, "Restart and
//! upgrade without loss"): the programs stay attached through pinned links
//! while the agent is away, a starting agent (the same release, or the
//! next one) replaces them in place, keeps every service id and serves
//! what changed while it was away, with not one packet lost nor one
//! connection reset; maps of an older layout are migrated, a pinned map
//! of another layout under the same name stops the agent, and `dataplane
//! uninstall` leaves nothing behind.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use dataplane_common::map_names;
use serde_json::Value;
use tests::{
    netns::{NetNs, in_netns, require_root},
    svc::{Backend, Ep, TCP_PORT, endpoint_slice, service, tcp_ask, tcp_ask_many},
    topo::{Cluster, agent_bin},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);

macro_rules! root_only {
    () => {
        require_root()
    };
}

fn wait_log(c: &Cluster, node: usize, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.nodes[node].log().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} {needle:?} in the log of node {}:\n{}",
            node + 1,
            c.nodes[node].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two nodes with `pods` bridge pods each, agents (from `bin`) ready and
/// peered.
fn cluster(pods: usize, bin: &Path, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent_bin(i, bin, extra).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, READY).unwrap();
    }
    for i in 0..2 {
        for _ in 0..pods {
            c.add_pod(i).unwrap();
        }
    }
    for i in 0..2 {
        wait_log(&c, i, "attached from_pod to pod port", pods);
        wait_log(&c, i, "peer added", 1);
    }
    c
}

/// Starts node `i`'s agent from `bin` with a fresh log; returns once it
/// is ready.
fn start_fresh(c: &mut Cluster, i: usize, bin: &Path, extra: &[&str]) {
    std::fs::write(c.nodes[i].log_file(), "").unwrap();
    c.start_agent_bin(i, bin, extra).unwrap();
    c.wait_ready(i, READY).unwrap();
}

/// The previous release's agent for the upgrade tests: `cargo xtask test`
/// builds it from the repository's history and passes it in
/// `DATAPLANE_PREV_BIN` (`cargo xtask prev-release` prints its path).
fn prev_bin() -> PathBuf {
    let p = std::env::var_os("DATAPLANE_PREV_BIN")
        .map(PathBuf::from)
        .expect(
            "DATAPLANE_PREV_BIN is not set: the upgrade test needs the previous release's agent; \
         run it through `cargo xtask test`, or set DATAPLANE_PREV_BIN to the path \
         `cargo xtask prev-release` prints",
        );
    assert!(
        p.is_file(),
        "DATAPLANE_PREV_BIN={} is not a file",
        p.display()
    );
    p
}

/// `(transmitted, received)` from ping's summary line.
fn ping_summary(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no summary in ping's output:\n{out}"));
    let num = |word: &str| -> u64 {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let at = words
            .iter()
            .position(|w| w.starts_with(word))
            .unwrap_or_else(|| panic!("no {word} in {line:?}"));
        words[at - 1].parse().unwrap()
    };
    (num("packets"), num("received"))
}

/// Pings at 1,000 per second from a pod namespace until stopped, in
/// rounds of 1,000 (each waits for its last answers, so stopping loses
/// nothing in flight); counts what went and came back.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, u64, String)>,
}

impl Pinger {
    fn start(ns: &NetNs, dst: Ipv4Addr) -> Pinger {
        let ns = ns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut sent, mut received, mut lossy) = (0, 0, String::new());
            while !halt.load(Ordering::Relaxed) {
                let out = Command::new("nsenter")
                    .arg(format!("--net={ns}"))
                    .args(["--", "ping", "-q", "-i", "0.001", "-W", "2", "-c", "1000"])
                    .arg(dst.to_string())
                    .output()
                    .expect("running ping");
                let out = String::from_utf8_lossy(&out.stdout).into_owned();
                // No summary: ping was killed (the namespace went with a
                // failed test); counted as one round all lost.
                if !out.contains("packets transmitted") {
                    lossy.push_str(&format!("ping gave no summary: {out}\n"));
                    sent += 1000;
                    break;
                }
                let (s, r) = ping_summary(&out);
                if s != r || s != 1000 {
                    lossy.push_str(&out);
                }
                sent += s;
                received += r;
            }
            (sent, received, lossy)
        });
        Pinger { stop, thread }
    }

    /// `(sent, answered, the output of rounds that lost any)`.
    fn finish(self) -> (u64, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("pinger thread")
    }
}

/// A long-lived TCP connection to a [`Backend`] (directly or through a
/// ClusterIP), exchanging a byte for an answer every 5 ms until stopped.
/// The first failure ends it: a reset, 3 s without an answer, or an answer
/// from another backend than the first.
struct Chatter {
    what: &'static str,
    exchanges: Arc<AtomicU64>,
    /// The failure that ended it, as soon as it happens.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), String>>,
}

fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed")),
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(b[0]),
        }
    }
}

impl Chatter {
    fn open(what: &'static str, client: &NetNs, addr: Ipv4Addr, port: u16) -> Chatter {
        let exchanges = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(std::sync::Mutex::new(None));
        let (n, halt, fail) = (exchanges.clone(), stop.clone(), failed.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = in_netns(client, move || {
            let opened =
                TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(3))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        s.set_nodelay(true)?;
                        let first = read_line(&mut s)?;
                        Ok((s, first))
                    });
            let (mut s, first) = match opened {
                Ok(o) => o,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok(first.clone()));
            while !halt.load(Ordering::Relaxed) {
                let got = s.write_all(b"?").and_then(|()| read_line(&mut s));
                let done = n.load(Ordering::Relaxed);
                let e = match got {
                    Ok(a) if a == first => None,
                    Ok(a) => Some(format!("after {done} exchanges {a} answered, not {first}")),
                    Err(e) => Some(format!("after {done} exchanges: {e}")),
                };
                if let Some(e) = e {
                    *fail.lock().unwrap() = Some(e.clone());
                    return Err(e);
                }
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(_)) => {}
            other => panic!("{what}: connecting to {addr}:{port}: {other:?}"),
        }
        Chatter {
            what,
            exchanges,
            failed,
            stop,
            thread,
        }
    }

    fn exchanges(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.thread.join().expect("chatter thread");
        let n = self.exchanges.load(Ordering::Relaxed);
        r.map(|()| n).map_err(|e| format!("{}: {e}", self.what))
    }
}

/// UDP requests through a ClusterIP at 1,000 per second from one socket
/// (one flow), each answered by the backend; counts what went and came back.
struct UdpProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(u64, u64), String>>,
}

impl UdpProbe {
    fn start(client: &NetNs, addr: Ipv4Addr, port: u16) -> UdpProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = in_netns(client, move || {
            let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
            s.connect((addr, port)).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let (mut sent, mut received) = (0u64, 0u64);
            let mut buf = [0u8; 512];
            let t0 = Instant::now();
            let mut drain_until = None;
            loop {
                match drain_until {
                    None if halt.load(Ordering::Relaxed) => {
                        drain_until = Some(Instant::now() + Duration::from_secs(2));
                    }
                    None => {
                        let due = t0.elapsed().as_millis() as u64 + 1;
                        while sent < due {
                            s.send(&sent.to_be_bytes())
                                .map_err(|e| format!("sending request {sent}: {e}"))?;
                            sent += 1;
                        }
                    }
                    Some(t) if received == sent || Instant::now() > t => {
                        return Ok((sent, received));
                    }
                    Some(_) => {}
                }
                loop {
                    match s.recv(&mut buf) {
                        Ok(_) => received += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("after {received} answers: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        UdpProbe { stop, thread }
    }

    fn finish(self) -> Result<(u64, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("UDP probe thread")
    }
}

const NEAR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FAR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// Added while node 1's agent is down; sorts before the others (before
/// ids were kept, a restart gave such a Service the id of an established
/// connection's, which was then reset).
const API: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 9);

fn svc(name: &str, ip: Ipv4Addr, eps: &[Ipv4Addr]) -> String {
    let eps: Vec<Ep> = eps.iter().map(|ip| Ep::ready(*ip)).collect();
    format!(
        "{}---\n{}",
        service(name, ip, ""),
        endpoint_slice(name, &eps)
    )
}

fn ns(c: &Cluster, node: usize, pod: usize) -> &NetNs {
    &c.nodes[node].pods[pod].ns
}

/// Waits (up to 10 s) until every chatter has exchanged data since
/// `before` (data flowed in that phase); returns the new counts.
fn advanced(phase: &str, chatters: &[Chatter], before: &[u64]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<u64> = chatters.iter().map(Chatter::exchanges).collect();
        let stuck: Vec<String> = chatters
            .iter()
            .zip(before)
            .zip(&now)
            .filter(|((_, b), n)| n <= b)
            .map(|((c, b), _)| {
                let why = c.failed.lock().unwrap().clone().unwrap_or_default();
                format!("{} ({b} exchanges; {why})", c.what)
            })
            .collect();
        if stuck.is_empty() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no data exchanged {phase}: {}",
            stuck.join(", ")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The restart (or upgrade) under traffic that issue 10 asks for. Two
/// nodes with agents from `first`, each with two pods; Services `near`
/// (its backend on node 1) and `far` (on node 2). Then, under continuous
/// traffic (pings pod to pod at 1,000 per second, UDP requests through
/// both ClusterIPs at 1,000 per second, six long-lived TCP connections:
/// pod to pod on one node and across, and through both ClusterIPs from
/// both nodes, exchanging data all along):
///
/// 1. node 1's agent stops; while it is down `far` gets a second backend
///    and a new Service `api` appears;
/// 2. node 1's agent starts from `then`, node 2's agent is restarted from
///    `then`.
///
/// Not one ping nor UDP answer is lost, no connection is reset or
/// answered by another backend, and afterwards node 1 serves what changed
/// while its agent was down.
fn restart_under_traffic(first: &Path, then: &Path, mode: &str) {
    let extra = ["--decap-mode", mode];
    let mut c = cluster(2, first, &extra);
    let ip = |n: usize, p: usize| c.nodes[n].pods[p].ip;
    let (server1, server2, client2) = (ip(0, 1), ip(1, 0), ip(1, 1));
    let backends: Vec<Backend> = [(0, 1), (1, 0), (1, 1)]
        .into_iter()
        .map(|(n, p)| Backend::start(&c.nodes[n].pods[p].ns, ip(n, p)).unwrap())
        .collect();
    c.apply_yaml(&format!(
        "{}---\n{}",
        svc("near", NEAR, &[server1]),
        svc("far", FAR, &[server2])
    ))
    .unwrap();
    for (n, p) in [(0, 0), (1, 1)] {
        for vip in [NEAR, FAR] {
            eventually("the Services reachable", || {
                tcp_ask(ns(&c, n, p), vip, 80).is_ok()
            });
        }
    }
    c.ping(0, 0, server2, 2).unwrap();

    let chatters = vec![
        Chatter::open("pod to pod, one node", ns(&c, 0, 0), server1, TCP_PORT),
        Chatter::open("pod to pod, across nodes", ns(&c, 0, 0), server2, TCP_PORT),
        Chatter::open("ClusterIP, backend on the node", ns(&c, 0, 0), NEAR, 80),
        Chatter::open("ClusterIP, backend across", ns(&c, 0, 0), FAR, 80),
        Chatter::open(
            "ClusterIP from node 2, backend across",
            ns(&c, 1, 1),
            NEAR,
            80,
        ),
        Chatter::open(
            "ClusterIP from node 2, backend on the node",
            ns(&c, 1, 1),
            FAR,
            80,
        ),
    ];
    let probes = [
        (
            "UDP through a ClusterIP across nodes",
            UdpProbe::start(ns(&c, 0, 0), FAR, 53),
        ),
        (
            "UDP through a ClusterIP from node 2",
            UdpProbe::start(ns(&c, 1, 1), NEAR, 53),
        ),
    ];
    let pings = Pinger::start(ns(&c, 0, 0), server2);
    let started = Instant::now();

    std::thread::sleep(Duration::from_secs(2));
    let mut seen = advanced("before the restarts", &chatters, &vec![0; chatters.len()]);
    c.nodes[0].stop_agent();
    seen = advanced("while node 1's agent was down", &chatters, &seen);
    c.apply_yaml(&format!(
        "{}---\n{}",
        svc("far", FAR, &[server2, client2]),
        svc("api", API, &[client2])
    ))
    .unwrap();
    start_fresh(&mut c, 0, then, &extra);
    c.nodes[1].stop_agent();
    start_fresh(&mut c, 1, then, &extra);
    let restarted = started.elapsed();
    seen = advanced("after the restarts", &chatters, &seen);

    // What changed while node 1's agent was down is served there.
    let client = ns(&c, 0, 0);
    eventually("api served on node 1", || {
        tcp_ask(client, API, 80) == Ok(client2.to_string())
    });
    let answers = tcp_ask_many(client, FAR, 80, 40);
    assert!(
        answers.contains(&Ok(client2.to_string())) && answers.contains(&Ok(server2.to_string())),
        "far's new backend is served on node 1 next to the old one: {answers:?}"
    );

    // Traffic goes on a while after the restarts.
    std::thread::sleep(Duration::from_secs(2));
    advanced("after the restarts", &chatters, &seen);
    let (sent, received, out) = pings.finish();
    let mut failures = Vec::new();
    eprintln!("restarts done after {restarted:?}; pings: {sent} sent, {received} answered");
    for (what, p) in probes {
        match p.finish() {
            Ok((s, r)) if s == r && s > 4_000 => eprintln!("{what}: {r} answers to {s} requests"),
            Ok((s, r)) => failures.push(format!("{what}: {r} answers to {s} requests")),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    for ch in chatters {
        let what = ch.what;
        match ch.finish() {
            Ok(n) => eprintln!("{what}: {n} exchanges, none failed"),
            Err(e) => failures.push(e),
        }
    }
    assert!(sent >= 4_000, "{sent} pings");
    if received != sent {
        failures.push(format!(
            "{} of {sent} pings lost across the restarts:\n{out}",
            sent - received
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\nnode 1's log:\n{}",
        failures.join("\n"),
        c.nodes[0].log()
    );

    for i in 0..2 {
        let log = c.nodes[i].log();
        assert!(
            log.contains("from_pod on vp1: replaced the program of the pinned link")
                && log.contains("from_underlay on"),
            "node {} adopted its pinned links:\n{log}",
            i + 1
        );
        assert!(
            !log.contains("attaching anew"),
            "no pinned link had to be replaced:\n{log}"
        );
        assert_eq!(
            log.contains("decap_xdp on"),
            mode == "xdp",
            "the XDP link adopted in XDP mode only:\n{log}"
        );
        // Nothing of an older layout is left: each was migrated and removed.
        let pins: Vec<String> = std::fs::read_dir(&c.nodes[i].pin_path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "links" && !map_names::ALL.contains(&n.as_str()))
            .collect();
        assert!(
            pins.is_empty(),
            "pins of node {} this agent does not use: {pins:?}\n{log}",
            i + 1
        );
    }
    // near and far (a TCP and a UDP frontend each) kept their ids.
    let log = c.nodes[0].log();
    assert!(
        log.contains("4 frontends adopted from the pinned maps, 0 of them gone"),
        "{log}"
    );
    drop(backends);
}

/// Restarts of the same release under traffic (see
/// [`restart_under_traffic`]), decapsulating in TC.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restarts_under_traffic_lose_nothing() {
    root_only!();
    restart_under_traffic(&agent_bin(), &agent_bin(), "tc");
}

/// The same with decapsulation in XDP: the pinned XDP link gets the new
/// program in place too.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restarts_in_xdp_mode_lose_nothing() {
    root_only!();
    restart_under_traffic(&agent_bin(), &agent_bin(), "xdp");
}

/// An upgrade from the previous release under the same traffic, with the
/// same bars: the previous release's agents run first, then this one
/// takes over their pins (maps of a changed layout migrated into their new
/// versions before its programs replace the old ones).
#[test]
#[ignore = "needs root and the previous release; `cargo xtask test` runs it"]
fn an_upgrade_under_traffic_loses_nothing() {
    root_only!();
    restart_under_traffic(&prev_bin(), &agent_bin(), "tc");
}

/// The link and program ids behind the pins under `<pin>/links`.
fn pinned_links(pin: &Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin.join("links")).unwrap() {
        let path = e.unwrap().path();
        let o = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "bpftool link show pinned {path:?}");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        out.push((v["id"].as_u64().unwrap(), v["prog_id"].as_u64().unwrap()));
    }
    out
}

fn bpftool_ok(args: &[&str]) -> bool {
    Command::new("bpftool")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether bpftool stops finding the object within 5 s: the kernel frees
/// a released link and its program asynchronously (work queue, RCU).
fn bpftool_gone(args: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while bpftool_ok(args) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Creates a hash map pinned at `path` (4-byte keys and values).
fn pin_map(path: &Path, name: &str) {
    let o = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "8", "name", name,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn ip_forward(c: &Cluster, node: usize) -> String {
    c.nodes[node]
        .ns
        .sh("cat /proc/sys/net/ipv4/ip_forward")
        .unwrap()
        .trim()
        .to_owned()
}

/// A stopped agent leaves its links attached (the data path runs on);
/// `dataplane uninstall` removes them, the programs, every pin (an older
/// release's too), the bridge, the conflist, and turns IPv4 forwarding
/// back off (a fresh network namespace has it off; the agent turned it
/// on).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn uninstall_leaves_nothing() {
    root_only!();
    let mut c = cluster(1, &agent_bin(), &["--decap-mode", "tc"]);
    let dst = c.nodes[1].pods[0].ip;
    assert_eq!(ip_forward(&c, 0), "1", "the agent turned forwarding on");
    assert!(
        c.nodes[0].conflist().is_some(),
        "the agent wrote its conflist"
    );
    c.nodes[0].stop_agent();
    c.ping(0, 0, dst, 2).unwrap();
    let pin = c.nodes[0].pin_path.clone();
    let links = pinned_links(&pin);
    // from_underlay and to_underlay on the underlay, from_pod on the one
    // pod port, to_pod on the bridge, from_host on the host device, the
    // four socket programs on the cgroup.
    assert_eq!(links.len(), 9, "{links:?}");
    for (link, prog) in &links {
        assert!(bpftool_ok(&["link", "show", "id", &link.to_string()]));
        assert!(bpftool_ok(&["prog", "show", "id", &prog.to_string()]));
    }

    // What an older release left: a map of an old version, and one in a
    // directory of its own.
    pin_map(&pin.join("svc_v0"), "svc_v0");
    std::fs::create_dir(pin.join("old")).unwrap();
    pin_map(&pin.join("old/ct_v0"), "ct_v0");

    let out = c.nodes[0]
        .ns
        .command(agent_bin().to_str().unwrap())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&pin)
        .arg("--cni-conf-dir")
        .arg(c.nodes[0].cni_conf_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "uninstall: {text}");
    assert!(text.contains("deleted bridge cni0"), "{text}");
    assert!(!pin.exists(), "pin path {pin:?} removed");
    for (link, prog) in &links {
        assert!(
            bpftool_gone(&["link", "show", "id", &link.to_string()]),
            "link {link} gone"
        );
        assert!(
            bpftool_gone(&["prog", "show", "id", &prog.to_string()]),
            "program {prog} unloaded"
        );
    }
    assert!(
        c.nodes[0].ns.sh("ip link show cni0").is_err(),
        "bridge cni0 gone"
    );
    assert!(
        text.contains("deleted the host device dataplane.1"),
        "{text}"
    );
    assert!(
        c.nodes[0].ns.sh("ip link show dataplane.1").is_err(),
        "host device gone"
    );
    assert!(c.ping(0, 0, dst, 1).is_err(), "no data path left");
    assert!(text.contains("net.ipv4.ip_forward restored to 0"), "{text}");
    assert_eq!(ip_forward(&c, 0), "0", "forwarding as before the agent");
    assert!(c.nodes[0].conflist().is_none(), "conflist removed: {text}");
    // A second uninstall finds nothing to do, and says so.
    let out = c.nodes[0]
        .ns
        .command(agent_bin().to_str().unwrap())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&pin)
        .arg("--cni-conf-dir")
        .arg(c.nodes[0].cni_conf_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "second uninstall: {text}");
    assert!(text.contains("no bridge cni0"), "{text}");
}

/// A pinned map whose layout is not the binary's (an older or newer
/// agent's) stops the agent before any program runs against it, with an
/// error naming the map and both layouts.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_pinned_map_of_another_layout_stops_the_agent() {
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    let pin = c.nodes[0].pin_path.clone();
    std::fs::create_dir_all(&pin).unwrap();
    let map = pin.join("svc_v1");
    let o = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "8", "name", "svc_v1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    let deadline = Instant::now() + READY;
    let status = loop {
        if let Some(st) = c.nodes[0].agent.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running:\n{}",
            c.nodes[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = c.nodes[0].log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("the map svc_v1 pinned at")
            && log.contains("key 4 B, value 4 B, 8 entries")
            && log.contains("65536 entries"),
        "the error names the map and both layouts:\n{log}"
    );
    assert!(
        !pin.join("links").exists() || std::fs::read_dir(pin.join("links")).unwrap().count() == 0,
        "nothing attached"
    );
}

/// An older release's map `endpoints_v0` (a synthetic layout: the value
/// lacks the gateway MAC) migrated into this binary's `endpoints_v1`
/// through the pinned maps in the kernel, as the agent does at start-up:
/// converted before anything is attached, never overwriting an entry the
/// new map has, a second pass after the attach picking up what the old
/// programs added meanwhile, the migrated pin removed and an unknown one
/// left in place (for `dataplane uninstall`, which removes it).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn an_older_layout_is_migrated_through_the_pinned_maps() {
    use dataplane::bpf::{Dataplane, migrate::Entry, migrate::Migration, migrate::Migrator};
    use dataplane_common::{EndpointInfo, EndpointKey};
    root_only!();

    const GW: [u8; 6] = [0x02, 0xdc, 0, 0, 0, 1];
    /// v0: key = IPv4, value = ifindex (4 B), MAC (6 B), 2 B padding.
    fn convert(key: &[u8], value: &[u8]) -> Vec<Entry> {
        let mut v = value[..10].to_vec();
        v.extend_from_slice(&GW);
        vec![Entry {
            map: map_names::ENDPOINTS,
            key: key.to_vec(),
            value: v,
        }]
    }
    static REGISTRY: [Migration; 1] = [Migration {
        from: "endpoints_v0",
        layout: dataplane::bpf::Layout {
            kind: aya::maps::MapType::Hash,
            key_size: 4,
            value_size: 12,
            max_entries: 64,
        },
        into: &[map_names::ENDPOINTS],
        convert,
    }];

    let pin = PathBuf::from(format!("/sys/fs/bpf/dp-migrate-{}", std::process::id()));
    let _ = dataplane::bpf::uninstall(&pin);
    let mut dp = Dataplane::load_with(Some(&pin)).unwrap();
    let old = pin.join("endpoints_v0");
    let o = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "12",
            "entries",
            "64",
            "name",
            "endpoints_v0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    pin_map(&pin.join("mystery_v0"), "mystery_v0");
    let put = |ip: [u8; 4], ifindex: u8, mac: u8| {
        let mut args: Vec<String> = ["map", "update", "pinned"].map(String::from).to_vec();
        args.push(old.to_str().unwrap().into());
        args.push("key".into());
        args.extend(ip.map(|b| b.to_string()));
        args.push("value".into());
        args.extend([ifindex, 0, 0, 0, mac, mac, mac, mac, mac, mac, 0, 0].map(|b| b.to_string()));
        let o = Command::new("bpftool").args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    put([10, 244, 1, 2], 7, 0xaa);
    put([10, 244, 1, 3], 8, 0xbb);
    // The new map has its own entry for 10.244.1.3 already (the new
    // programs learnt it): it is kept.
    let mine = EndpointInfo {
        ifindex: 99,
        mac: [1; 6],
        gw_mac: [2; 6],
    };
    dp.maps()
        .apply(&dataplane::bpf::MapOp::PutEndpoint(
            EndpointKey {
                ip: [10, 244, 1, 3],
            },
            mine,
        ))
        .unwrap();

    let m = Migrator::start(&pin, &REGISTRY).unwrap();
    assert_eq!(m.pending(), 1);
    let entries = |dp: &mut Dataplane| {
        let mut e = dp.maps().endpoint_entries().unwrap();
        e.sort_by_key(|(k, _)| k.ip);
        e
    };
    let first = EndpointInfo {
        ifindex: 7,
        mac: [0xaa; 6],
        gw_mac: GW,
    };
    assert_eq!(
        entries(&mut dp),
        vec![
            (
                EndpointKey {
                    ip: [10, 244, 1, 2]
                },
                first
            ),
            (
                EndpointKey {
                    ip: [10, 244, 1, 3]
                },
                mine
            ),
        ]
    );
    // The old programs add an entry before their links get the new ones.
    put([10, 244, 1, 4], 9, 0xcc);
    assert_eq!(m.finish(), 1);
    let e = entries(&mut dp);
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[2].1.ifindex, 9);
    assert!(!old.exists(), "the migrated pin is removed");
    assert!(pin.join("mystery_v0").exists(), "an unknown pin is left");
    drop(dp);
    let removed = dataplane::bpf::uninstall(&pin).unwrap();
    assert!(removed.maps > map_names::ALL.len(), "{removed:?}");
    assert!(!pin.exists());
}
