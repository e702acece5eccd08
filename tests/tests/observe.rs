//! Seeing what a node does, end to end (real etcd, agents in node
//! namespaces): the metrics endpoint follows the traffic sent and turns
//! ready only once synced, `dataplane status` shows the node while the
//! agent runs and after it stopped, and a rare data-path event reaches
//! the agent's log with `--bpf-log`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use tests::{
    netns::{in_netns, require_root},
    svc::{Backend, Ep, endpoint_slice, service, tcp_ask},
    topo::{Cluster, agent_bin},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The node's own loopback: every node namespace has its own.
const METRICS: &str = "127.0.0.1:9475";

macro_rules! root_only {
    () => {
        require_root()
    };
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_log(c: &Cluster, node: usize, needle: &str) {
    eventually(
        &format!("{needle:?} in the log of node {}", node + 1),
        || c.nodes[node].log().contains(needle),
    );
}

/// `GET path` on node `node`'s metrics address: (status, body).
fn get(c: &Cluster, node: usize, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(&c.nodes[node].ns, move || {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no header end: {resp:?}")))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status: {head:?}")))?;
        Ok((code, body.to_owned()))
    })
    .join()
    .unwrap()
}

/// The samples of one scrape.
struct Scrape(String);

impl Scrape {
    fn of(c: &Cluster, node: usize) -> Scrape {
        let (code, body) = get(c, node, "/metrics").unwrap();
        assert_eq!(code, 200, "{body}");
        Scrape(body)
    }

    /// The value of `name` (labels as encoded), 0 when absent.
    fn value(&self, name: &str) -> f64 {
        self.0
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(0.0)
    }
}

/// `name`'s growth from `a` to `b`.
fn delta(a: &Scrape, b: &Scrape, name: &str) -> f64 {
    b.value(name) - a.value(name)
}

fn outcome(name: &str) -> String {
    format!(r#"dataplane_packets_total{{outcome="{name}"}}"#)
}

/// Two nodes, a pod on each, node 1's agent serving metrics.
fn pods_up(c: &mut Cluster) {
    c.add_pod(0).unwrap();
    c.add_pod(1).unwrap();
    wait_log(c, 0, "peer added");
    wait_log(c, 0, "attached from_pod to pod port vp1");
    wait_log(c, 1, "attached from_pod to pod port vp1");
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn metrics_follow_the_traffic_and_ready_waits_for_the_sync() {
    root_only!();
    let mut c = Cluster::new(2).unwrap();
    // No network config yet: the agent waits, serving, not ready. A short
    // lease, so that renewals show within the test.
    c.start_agent(
        0,
        &[
            "--decap-mode",
            "tc",
            "--metrics-address",
            METRICS,
            "--lease-ttl-secs",
            "6",
            "--renew-margin-secs",
            "4",
        ],
    )
    .unwrap();
    eventually("/healthz answers", || {
        get(&c, 0, "/healthz").is_ok_and(|(code, _)| code == 200)
    });
    let (code, body) = get(&c, 0, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no subnet lease held"), "{body}");
    assert!(body.contains("programs not attached"), "{body}");
    assert!(body.contains("peer maps not synced"), "{body}");
    let pid = c.nodes[0].agent.as_ref().unwrap().id();
    let human = status(&c, 0, false);
    assert!(
        human.contains(&format!("Agent:      STARTING (pid {pid})")),
        "{human}"
    );
    assert_eq!(status_json(&c, 0)["agent"]["starting_pid"], pid);
    let (code, body) = get(&c, 0, "/nope").unwrap();
    assert_eq!(code, 404, "{body}");

    c.put_config(CONFIG).unwrap();
    c.start_agent(1, &["--decap-mode", "tc"]).unwrap();
    c.wait_ready(0, READY).unwrap();
    c.wait_ready(1, READY).unwrap();
    eventually("/readyz turns ready", || {
        get(&c, 0, "/readyz").is_ok_and(|(code, _)| code == 200)
    });
    let m = Scrape::of(&c, 0);
    assert_eq!(m.value("dataplane_ready"), 1.0, "{}", m.0);
    assert!(
        m.value(r#"dataplane_etcd_events_total{kind="peers"}"#) >= 1.0,
        "ready after the lease table was applied:\n{}",
        m.0
    );
    assert_eq!(m.value(r#"dataplane_etcd_watch_up{watch="peers"}"#), 1.0);
    let expiry = m.value("dataplane_lease_expiry_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now && expiry < now + 7.0,
        "lease expiry {expiry} ahead of {now}, within the TTL"
    );

    pods_up(&mut c);
    let remote = c.nodes[1].pods[0].ip;
    let before = Scrape::of(&c, 0);
    c.ping(0, 0, remote, 3).unwrap();
    let after = Scrape::of(&c, 0);
    assert!(
        delta(&before, &after, &outcome("encapsulated")) >= 3.0,
        "3 echo requests encapsulated:\n{}",
        after.0
    );
    assert!(delta(&before, &after, &outcome("decapsulated")) >= 3.0);
    assert!(
        delta(
            &before,
            &after,
            r#"dataplane_bytes_total{outcome="encapsulated"}"#
        ) >= 3.0 * 84.0,
        "bytes move with the packets"
    );

    // A ClusterIP with a backend on node 2, and one with none.
    let backend = Backend::start(&c.nodes[1].pods[0].ns, remote).unwrap();
    let yaml = format!(
        "{}---\n{}---\n{}---\n{}",
        service("web", VIP, ""),
        endpoint_slice("web", &[Ep::ready(remote)]),
        service("empty", EMPTY_VIP, ""),
        endpoint_slice("empty", &[]),
    );
    let events_before = Scrape::of(&c, 0);
    c.apply_yaml(&yaml).unwrap();
    let client = &c.nodes[0].pods[0].ns;
    eventually("the ClusterIP answers", || tcp_ask(client, VIP, 80).is_ok());
    let before = Scrape::of(&c, 0);
    assert!(
        delta(
            &events_before,
            &before,
            r#"dataplane_reconcile_apply_seconds_count{kind="services"}"#
        ) >= 1.0,
        "the Service's way from etcd to the maps is timed:\n{}",
        before.0
    );
    for _ in 0..5 {
        assert_eq!(tcp_ask(client, VIP, 80).unwrap(), remote.to_string());
    }
    assert!(tcp_ask(client, EMPTY_VIP, 80).is_err(), "rejected");
    let after = Scrape::of(&c, 0);
    let flows = r#"dataplane_service_new_flows_total{frontend="10.96.0.10:80/TCP"}"#;
    assert_eq!(
        delta(&before, &after, flows),
        5.0,
        "one new flow per connection:\n{}",
        after.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"dataplane_service_rejections_total{frontend="10.96.0.11:80/TCP"}"#
        ),
        1.0
    );
    assert!(delta(&before, &after, &outcome("svc_forward")) >= 5.0);
    assert!(
        after.value(&format!(
            r#"dataplane_map_entries{{map="{}"}}"#,
            dataplane_common::map_names::CT
        )) >= 5.0,
        "conntrack holds the flows:\n{}",
        after.0
    );
    assert!(
        after.value(&format!(
            r#"dataplane_map_capacity{{map="{}"}}"#,
            dataplane_common::map_names::CT
        )) > 0.0
    );
    assert!(after.value(r#"dataplane_map_entries{map="svc_v1"}"#) >= 4.0);
    drop(backend);

    // The lease is renewed every 2 s.
    eventually("lease renewals counted", || {
        Scrape::of(&c, 0).value("dataplane_lease_renewals_total") >= 2.0
    });
    // etcd goes away and comes back: the watches reconnect and list again.
    let before = Scrape::of(&c, 0);
    c.etcd.restart().unwrap();
    let peers = r#"{watch="peers"}"#;
    eventually("the peer watch reconnected", || {
        let now = Scrape::of(&c, 0);
        delta(
            &before,
            &now,
            &format!("dataplane_etcd_reconnects_total{peers}"),
        ) >= 1.0
            && delta(
                &before,
                &now,
                &format!("dataplane_etcd_watch_relists_total{peers}"),
            ) >= 1.0
            && now.value(&format!("dataplane_etcd_watch_up{peers}")) == 1.0
    });
    let (code, body) = get(&c, 0, "/readyz").unwrap();
    assert_eq!(code, 200, "still ready after etcd came back: {body}");
}

/// Runs `dataplane status ARGS` in node `i`'s namespace (as an operator
/// on that node would).
fn status(c: &Cluster, i: usize, json: bool) -> String {
    let node = &c.nodes[i];
    let mut cmd = node.ns.command(agent_bin().to_str().unwrap());
    cmd.arg("status").arg("--pin-path").arg(&node.pin_path);
    if json {
        cmd.args(["--output", "json"]);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "dataplane status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(c: &Cluster, i: usize) -> serde_json::Value {
    serde_json::from_str(&status(c, i, true)).unwrap()
}

/// `max_entries` of a pinned map, as bpftool reports it.
fn bpftool_max_entries(c: &Cluster, i: usize, map: &str) -> u64 {
    let path = c.nodes[i].pin_path.join(map);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["max_entries"].as_u64().unwrap()
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn status_shows_the_node_while_the_agent_runs_and_after_it_stopped() {
    root_only!();
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", "tc"]).unwrap();
    }
    let env0 = c.wait_ready(0, READY).unwrap();
    let env1 = c.wait_ready(1, READY).unwrap();
    pods_up(&mut c);
    let remote = c.nodes[1].pods[0].ip;
    let other = Ipv4Addr::from(u32::from(remote) + 100);
    let backend = Backend::start(&c.nodes[1].pods[0].ns, remote).unwrap();
    let not_ready = Ep {
        ready: false,
        serving: false,
        ..Ep::ready(other)
    };
    c.apply_yaml(&format!(
        "{}---\n{}",
        service("web", VIP, ""),
        endpoint_slice("web", &[Ep::ready(remote), not_ready]),
    ))
    .unwrap();
    let client = &c.nodes[0].pods[0].ns;
    eventually("the ClusterIP answers", || tcp_ask(client, VIP, 80).is_ok());
    for _ in 0..3 {
        tcp_ask(client, VIP, 80).unwrap();
    }
    // The record follows within a second of a change.
    eventually("the Service in the status record", || {
        status_json(&c, 0)["record"]["services"][0]["name"] == "default/web"
    });

    let pid = c.nodes[0].agent.as_ref().unwrap().id();
    let human = status(&c, 0, false);
    for want in [
        format!("Agent:      running (pid {pid})"),
        format!("subnet {} in 10.244.0.0/16", env0.subnet),
        "Lease:      held, 23h59m left".to_string(),
        "etcd:       connected, last event".to_string(),
        "Ready:      yes".to_string(),
        "PEERS (1)".to_string(),
        format!(
            "{:<20} {:<16}",
            env1.subnet.to_string(),
            c.nodes[1].ip.to_string()
        ),
        format!("{:<40} {:>9} {:>15}", "default/web", 2, "1/2"),
        "Conntrack:  ".to_string(),
        "from_underlay   tcx ingress  eth0".to_string(),
        "from_pod        tcx ingress  vp1".to_string(),
    ] {
        assert!(human.contains(&want), "{want:?} missing from\n{human}");
    }

    let v = status_json(&c, 0);
    assert_eq!(v["agent"]["running"], true, "{v:#}");
    assert_eq!(v["agent"]["pid"], pid);
    assert_eq!(v["record"]["node"]["subnet"], env0.subnet.to_string());
    assert_eq!(v["record"]["node"]["decap"], "tc");
    assert_eq!(v["record"]["peers"][0]["subnet"], env1.subnet.to_string());
    assert_eq!(
        v["record"]["peers"][0]["public_ip"],
        c.nodes[1].ip.to_string()
    );
    assert_eq!(v["record"]["services"][0]["ready"], 1);
    assert_eq!(v["record"]["services"][0]["total"], 2);
    assert!(v["record"]["not_ready"].as_array().unwrap().is_empty());
    let ct_max = bpftool_max_entries(&c, 0, dataplane_common::map_names::CT);
    assert_eq!(v["conntrack"]["name"], dataplane_common::map_names::CT);
    assert_eq!(v["conntrack"]["max_entries"], ct_max);
    assert!(v["conntrack"]["entries"].as_u64().unwrap() >= 3, "{v:#}");
    assert!(
        v["drops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"] == "drop_no_peer"),
        "every drop reason listed: {v:#}"
    );
    let programs = v["programs"].as_array().unwrap();
    assert!(
        programs
            .iter()
            .any(|p| p["program"] == "from_underlay" && p["hook"] == "tcx ingress"),
        "{v:#}"
    );
    assert!(programs.iter().any(|p| p["program"] == "from_pod"));

    // Stopped: the pinned part is still there, and the record says how
    // old it is.
    c.nodes[0].stop_agent();
    let human = status(&c, 0, false);
    assert!(
        human.contains(&format!("Agent:      NOT RUNNING (pid {pid} is gone)")),
        "{human}"
    );
    assert!(human.contains("PEERS (1)"), "the last record still shown");
    let v = status_json(&c, 0);
    assert_eq!(v["agent"]["running"], false);
    assert!(v["agent"]["record_age_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["conntrack"]["max_entries"], ct_max);
    assert!(
        v["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["program"] == "from_underlay"),
        "the pinned links stay attached: {v:#}"
    );

    // Uninstalled: the record goes with the pins.
    let node = &c.nodes[0];
    let record = dataplane::status::record_path(&node.pin_path);
    assert!(record.exists());
    let out = node
        .ns
        .command(agent_bin().to_str().unwrap())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&node.pin_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!record.exists(), "status record removed");
    let human = status(&c, 0, false);
    assert!(
        human.contains("NOT RUNNING or never ran: no status record"),
        "{human}"
    );
    assert!(human.contains("PROGRAMS (0 attached)"), "{human}");
    drop(backend);
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_missing_node_config_reaches_the_agent_log_with_bpf_log() {
    use aya::maps::{Array, Map, MapData};
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    c.start_agent(0, &["--decap-mode", "tc", "--bpf-log"])
        .unwrap();
    c.wait_ready(0, READY).unwrap();
    c.add_pod(0).unwrap();
    wait_log(&c, 0, "attached from_pod to pod port vp1");
    assert!(!c.nodes[0].log().contains("no node config"));
    // The node config gone from under the running programs.
    let path = c.nodes[0]
        .pin_path
        .join(dataplane_common::map_names::NODE_CONFIG);
    let mut cfg: Array<_, dataplane_common::NodeConfig> =
        Array::try_from(Map::Array(MapData::from_pin(&path).unwrap())).unwrap();
    cfg.set(0, dataplane_common::NodeConfig::default(), 0)
        .unwrap();
    let gw = c.nodes[0].subnet_env().unwrap().subnet.addr();
    let _ = c.nodes[0].pods[0]
        .ns
        .sh(&format!("ping -c 3 -i 0.2 -W 1 {gw} >/dev/null"));
    wait_log(&c, 0, "no node config (node_cfg_v2) yet");
    let log = c.nodes[0].log();
    assert!(log.contains("from_pod: no node config"), "{log}");
    let logged = log.matches("no node config").count();
    let passed = dataplane::bpf::read_pinned_stats(&c.nodes[0].pin_path)
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == dataplane_common::Stat::PassNoConfig)
        .unwrap()
        .1
        .packets;
    assert!(passed >= 3, "{passed}");
    // At most the 1st, 2nd, 4th, ... on each of the CPUs.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let per_cpu_max = u64::from(64 - passed.leading_zeros());
    assert!(
        (logged as u64) <= cpus * per_cpu_max,
        "{logged} records for {passed} packets:\n{log}"
    );
}
