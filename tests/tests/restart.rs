//! Restarting, upgrading and removing the agent (issue 10, "Restart and
//! upgrade without loss"): the programs stay attached through pinned links
//! while the agent is away, a starting agent replaces them in place and
//! keeps every service id, a pinned map of another layout stops the agent,
//! and `dataplane uninstall` leaves nothing behind.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    netns::require_root,
    svc::{Backend, Conn, Ep, endpoint_slice, service, tcp_ask},
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

/// Two nodes with `pods` bridge pods each, agents ready and peered.
fn cluster(pods: usize, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, extra).unwrap();
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

/// Stops node `i`'s agent and starts it again with a fresh log; returns
/// once it is ready.
fn restart(c: &mut Cluster, i: usize, extra: &[&str]) {
    c.nodes[i].stop_agent();
    std::fs::write(c.nodes[i].log_file(), "").unwrap();
    c.start_agent(i, extra).unwrap();
    c.wait_ready(i, READY).unwrap();
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

/// Pod-to-pod pings across nodes at 1,000 per second while both agents
/// restart one after the other: not one is lost. The links stay attached
/// while an agent is down, and the new agent replaces their programs in
/// place.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restarts_under_pod_to_pod_traffic_lose_nothing() {
    root_only!();
    restarts_under_traffic("tc");
}

/// The same with decapsulation in XDP: the pinned XDP link gets the new
/// program in place too.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restarts_in_xdp_mode_lose_nothing() {
    root_only!();
    restarts_under_traffic("xdp");
}

fn restarts_under_traffic(mode: &str) {
    let extra = ["--decap-mode", mode];
    let mut c = cluster(1, &extra);
    let dst = c.nodes[1].pods[0].ip;
    c.ping(0, 0, dst, 2).unwrap();

    // 15 s of pings; both restarts happen well inside them.
    let count = 15_000;
    let ns = c.nodes[0].pods[0].ns.path();
    let pinger = std::thread::spawn(move || {
        Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .args(["--", "ping", "-q", "-i", "0.001", "-W", "2", "-c"])
            .arg(count.to_string())
            .arg(dst.to_string())
            .output()
            .expect("running ping")
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    restart(&mut c, 0, &extra);
    restart(&mut c, 1, &extra);
    let restarted = started.elapsed();
    let out = pinger.join().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_summary(&out);
    assert!(
        restarted < Duration::from_secs(13),
        "the restarts took {restarted:?}, not inside the pings"
    );
    assert_eq!(sent, count, "{out}");
    assert_eq!(received, sent, "pings lost across two restarts:\n{out}");
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
    }
}

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const API: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 9);

/// An established TCP connection through a ClusterIP keeps working while
/// its node's agent is stopped, and after it restarts having missed a new
/// Service whose name sorts first (before ids were kept, the restart gave
/// that Service the connection's id and the connection was reset).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn an_established_clusterip_connection_survives_a_restart() {
    root_only!();
    let extra = ["--decap-mode", "tc"];
    let mut c = cluster(2, &extra);
    let backends: Vec<Backend> = [(0, 1), (1, 0), (1, 1)]
        .into_iter()
        .map(|(n, p)| {
            let pod = &c.nodes[n].pods[p];
            Backend::start(&pod.ns, pod.ip).unwrap()
        })
        .collect();
    let eps: Vec<Ep> = [(0, 1), (1, 0), (1, 1)]
        .into_iter()
        .map(|(n, p)| Ep::ready(c.nodes[n].pods[p].ip))
        .collect();
    c.apply_yaml(&format!(
        "{}---\n{}",
        service("web", WEB, ""),
        endpoint_slice("web", &eps)
    ))
    .unwrap();
    let client = &c.nodes[0].pods[0].ns;
    eventually("web reachable", || tcp_ask(client, WEB, 80).is_ok());
    let (conn, first) = Conn::open(client, WEB, 80).unwrap();
    assert_eq!(conn.ask().unwrap(), first);

    c.nodes[0].stop_agent();
    // The data path runs on without the agent.
    for _ in 0..3 {
        assert_eq!(conn.ask(), Ok(first.clone()), "while the agent is down");
    }
    c.apply_yaml(&format!(
        "{}---\n{}",
        service("api", API, ""),
        endpoint_slice("api", &eps)
    ))
    .unwrap();
    std::fs::write(c.nodes[0].log_file(), "").unwrap();
    c.start_agent(0, &extra).unwrap();
    c.wait_ready(0, READY).unwrap();
    let client = &c.nodes[0].pods[0].ns;
    eventually("api reachable", || tcp_ask(client, API, 80).is_ok());
    for _ in 0..5 {
        assert_eq!(
            conn.ask(),
            Ok(first.clone()),
            "the connection after the restart:\n{}",
            c.nodes[0].log()
        );
    }
    let log = c.nodes[0].log();
    assert!(
        log.contains("2 frontends adopted from the pinned maps, 0 of them gone"),
        "{log}"
    );
    drop(backends);
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

/// A stopped agent leaves its links attached (the data path runs on);
/// `dataplane uninstall` removes them, the programs, the pins and the
/// bridge.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn uninstall_leaves_nothing() {
    root_only!();
    let mut c = cluster(1, &["--decap-mode", "tc"]);
    let dst = c.nodes[1].pods[0].ip;
    c.nodes[0].stop_agent();
    c.ping(0, 0, dst, 2).unwrap();
    let pin = c.nodes[0].pin_path.clone();
    let links = pinned_links(&pin);
    // from_underlay on the underlay, from_pod on the one pod port.
    assert_eq!(links.len(), 2, "{links:?}");
    for (link, prog) in &links {
        assert!(bpftool_ok(&["link", "show", "id", &link.to_string()]));
        assert!(bpftool_ok(&["prog", "show", "id", &prog.to_string()]));
    }

    let out = c.nodes[0]
        .ns
        .command(agent_bin().to_str().unwrap())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&pin)
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
    assert!(c.ping(0, 0, dst, 1).is_err(), "no data path left");
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
