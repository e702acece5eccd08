//! ClusterIP conntrack end to end (README "ClusterIP services",
//! docs/services.md 5.2 and 5.11): a real agent with a small table and
//! short timeouts, real etcd, pods in namespaces.
//!
//! One node: pod 0 is the client, pod 1 another client (the one that
//! fills the table), pods 2 and 3 are backends.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use dataplane::bpf::{CtTable, Flow, ct::monotonic_ns};
use dataplane_common::{
    PROTO_TCP, Stat,
    ct::{CT_F_PICKED_UP, CtGc, CtState},
};
use serde_json::Value;
use tests::{
    netns::require_root,
    svc::{Backend, Conn, Ep, endpoint_slice, service, tcp_ask_many, udp_ask},
    topo::Cluster,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

struct Env {
    c: Cluster,
    _backends: Vec<Backend>,
}

impl Env {
    fn ip(&self, pod: usize) -> Ipv4Addr {
        self.c.nodes[0].pods[pod].ip
    }
    fn ns(&self, pod: usize) -> &tests::netns::NetNs {
        &self.c.nodes[0].pods[pod].ns
    }
    fn table(&self) -> CtTable {
        CtTable::open_pinned(&self.c.nodes[0].pin_path).unwrap()
    }
    /// Live flows (as the data path sees them).
    fn flows(&self) -> Vec<Flow> {
        let t = self.table();
        let timeouts = t.timeouts().unwrap();
        let now = monotonic_ns();
        t.flows()
            .unwrap()
            .into_iter()
            .filter(|f| {
                !dataplane_common::ct::is_expired(
                    f.entry.state,
                    f.entry.last_seen_ns,
                    now,
                    &timeouts,
                )
            })
            .collect()
    }
    fn stat(&self, s: Stat) -> u64 {
        dataplane::bpf::read_pinned_stats(&self.c.nodes[0].pin_path)
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == s)
            .map(|(_, c)| c.packets)
            .unwrap()
    }
    fn gc(&self, c: CtGc) -> u64 {
        self.table()
            .gc_counters()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v)
            .unwrap()
    }
    fn apply(&self, name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr]) {
        let eps: Vec<Ep> = backends.iter().copied().map(Ep::ready).collect();
        let yaml = format!(
            "{}---\n{}",
            service(name, vip, ""),
            endpoint_slice(name, &eps)
        );
        self.c.apply_yaml(&yaml).unwrap();
    }
    fn cli(&self, args: &[&str]) -> String {
        let pin = self.c.nodes[0].pin_path.to_str().unwrap().to_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--pin-path", &pin]);
        self.c.cli(&all).unwrap()
    }
}

/// One node, four pods (backends on 2 and 3), the agent with `agent_args`.
fn env(agent_args: &[&str]) -> Env {
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    let mut args = vec!["--decap-mode", "tc"];
    args.extend_from_slice(agent_args);
    c.start_agent(0, &args).unwrap();
    c.wait_ready(0, Duration::from_secs(30)).unwrap();
    for _ in 0..4 {
        c.add_pod(0).unwrap();
    }
    eventually("from_pod on every pod port", || {
        c.nodes[0]
            .log()
            .matches("attached from_pod to pod port")
            .count()
            >= 4
    });
    let backends = [2, 3]
        .iter()
        .map(|&p| {
            let pod = &c.nodes[0].pods[p];
            Backend::start(&pod.ns, pod.ip).unwrap()
        })
        .collect();
    Env {
        c,
        _backends: backends,
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The flows from `client` to `vip`:80/TCP.
fn tcp_flows_of(flows: &[Flow], client: Ipv4Addr, vip: Ipv4Addr) -> Vec<Flow> {
    flows
        .iter()
        .filter(|f| {
            f.key.saddr == client.octets()
                && f.key.daddr == vip.octets()
                && f.key.dport == 80u16.to_be_bytes()
                && f.key.proto == PROTO_TCP
        })
        .copied()
        .collect()
}

/// An idle established connection survives another pod opening
/// connections fast enough to fill the table: the full table drops new
/// flows, the sweeper early-drops closing ones, the established flow
/// keeps its entry (not a picked-up one) and its backend.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn an_idle_established_connection_survives_a_full_table() {
    require_root();
    let e = env(&["--ct-max", "64"]);
    e.apply("idle", VIP_A, &[e.ip(2), e.ip(3)]);
    eventually("service reachable", || {
        tcp_ask_many(e.ns(0), VIP_A, 80, 1)[0].is_ok()
    });
    let (conn, first) = Conn::open(e.ns(0), VIP_A, 80).unwrap();
    let mine = tcp_flows_of(&e.flows(), e.ip(0), VIP_A)
        .into_iter()
        .find(|f| CtState::from_u8(f.entry.state) == Some(CtState::Established))
        .expect("the connection's flow, established");
    // The other pod: 150 connections, each closed at once (time_wait for
    // 120 s), through a table of 64.
    let t0 = Instant::now();
    let results = tcp_ask_many(e.ns(1), VIP_A, 80, 150);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    eprintln!(
        "filler: {ok}/150 answered in {:?}; drop_ct_full {}, early drops {}",
        t0.elapsed(),
        e.stat(Stat::DropCtFull),
        e.gc(CtGc::EarlyDrop)
    );
    assert!(e.stat(Stat::DropCtFull) > 0, "the table was full");
    assert!(e.gc(CtGc::EarlyDrop) > 0, "the sweeper made room");
    assert!(ok > 64, "new flows got through once room was made ({ok})");
    // Then it holds connections open until the table is full of
    // established flows: now nothing may go early (the idle connection
    // would be the first, being the most idle), so new flows lose.
    let before = e.stat(Stat::DropCtFull);
    let held: Vec<Conn> = (0..66)
        .filter_map(|_| Conn::open(e.ns(1), VIP_A, 80).ok().map(|(c, _)| c))
        .collect();
    eprintln!(
        "filler holds {} connections; drop_ct_full {} -> {}",
        held.len(),
        before,
        e.stat(Stat::DropCtFull)
    );
    assert!(held.len() < 66, "the table could not take them all");
    assert!(
        held.len() >= 60,
        "closing flows made room for them ({})",
        held.len()
    );
    assert!(e.stat(Stat::DropCtFull) > before);
    // The idle connection's entry is the one it had (not re-made, not
    // picked up), and the connection answers from its backend.
    let now = tcp_flows_of(&e.flows(), e.ip(0), VIP_A)
        .into_iter()
        .find(|f| f.key == mine.key)
        .expect("the idle connection's flow is still tracked");
    assert_eq!(now.entry.created_ns, mine.entry.created_ns, "same entry");
    assert_eq!(now.entry.backend, mine.entry.backend);
    assert_eq!(now.entry.flags & CT_F_PICKED_UP, 0);
    assert_eq!(e.stat(Stat::SvcCtPickup), 0, "no flow was picked up");
    for _ in 0..3 {
        assert_eq!(conn.ask().unwrap(), first, "same backend, no reset");
    }
}

/// Closed flows (TCP after both FINs, UDP answered) leave the table, both
/// directions, within their timeouts (shortened by flags) plus a sweep;
/// an open connection stays.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn closed_flows_leave_the_table_within_their_timeouts() {
    require_root();
    let e = env(&[
        "--ct-tcp-timeout-fin-wait",
        "2",
        "--ct-tcp-timeout-close-wait",
        "2",
        "--ct-tcp-timeout-time-wait",
        "2",
        "--ct-tcp-timeout-close",
        "1",
        "--ct-udp-timeout",
        "2",
        "--ct-udp-timeout-stream",
        "2",
        "--ct-sweep-interval-secs",
        "1",
    ]);
    e.apply("short", VIP_A, &[e.ip(2)]);
    eventually("service reachable", || {
        tcp_ask_many(e.ns(0), VIP_A, 80, 1)[0].is_ok()
    });
    let (conn, first) = Conn::open(e.ns(0), VIP_A, 80).unwrap();
    let answers = tcp_ask_many(e.ns(1), VIP_A, 80, 20);
    assert!(answers.iter().all(|r| r.is_ok()), "{answers:?}");
    udp_ask(e.ns(1), VIP_A, 53, Duration::from_secs(2)).unwrap();
    let closed_at = Instant::now();
    // Right after: 20 closing TCP flows and one answered UDP flow.
    let flows = e.flows();
    let closing = tcp_flows_of(&flows, e.ip(1), VIP_A)
        .iter()
        .filter(|f| {
            matches!(
                CtState::from_u8(f.entry.state),
                Some(CtState::FinWait | CtState::CloseWait | CtState::TimeWait)
            )
        })
        .count();
    assert!(closing >= 18, "closing flows tracked: {closing}");
    assert!(
        flows
            .iter()
            .any(|f| CtState::from_u8(f.entry.state) == Some(CtState::UdpReplied)),
        "the UDP flow, answered"
    );
    // Gone from the map itself (not only expired), both directions: 2 s
    // of timeout, up to 1 s of last-seen granularity, a 1 s sweep, slack.
    let limit = Duration::from_secs(2 + 1 + 1 + 3);
    loop {
        let t = e.table();
        let (fwd, rev) = (t.flows().unwrap().len(), t.reverse_entries().unwrap().len());
        if fwd == 1 && rev == 1 {
            break;
        }
        assert!(
            closed_at.elapsed() < limit,
            "{fwd} flows and {rev} reverse entries left after {:?}",
            closed_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("closed flows gone after {:?}", closed_at.elapsed());
    assert!(e.gc(CtGc::Expired) >= 21);
    // The one left is the open connection, which still works.
    let left = e.table().flows().unwrap();
    assert_eq!(left[0].key.saddr, e.ip(0).octets());
    assert_eq!(conn.ask().unwrap(), first);
}

/// `dataplane conntrack list` shows client, frontend, backend, state and
/// Service (by name through etcd, by id without it); `flush --service`
/// removes that Service's flows only.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn conntrack_list_and_flush() {
    require_root();
    let e = env(&[]);
    e.apply("a", VIP_A, &[e.ip(2)]);
    e.apply("b", VIP_B, &[e.ip(3)]);
    for vip in [VIP_A, VIP_B] {
        eventually("services reachable", || {
            tcp_ask_many(e.ns(0), vip, 80, 1)[0].is_ok()
        });
    }
    // Let the probes' closing flows go, so only the open ones are listed.
    let (conn_a, _) = Conn::open(e.ns(0), VIP_A, 80).unwrap();
    let (conn_b, _) = Conn::open(e.ns(0), VIP_B, 80).unwrap();
    e.cli(&["conntrack", "flush"]);
    conn_a.ask().unwrap();
    conn_b.ask().unwrap();

    let list = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["conntrack", "list", "--output", "json"];
        args.extend_from_slice(extra);
        let out = e.cli(&args);
        serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|err| panic!("{err}: {out}"))
    };
    let rows = list(&[]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for (row, vip, backend, svc) in [
        (&rows[0], VIP_A, e.ip(2), "default/a"),
        (&rows[1], VIP_B, e.ip(3), "default/b"),
    ] {
        assert_eq!(row["proto"], "TCP");
        assert_eq!(row["frontend"], format!("{vip}:80"));
        assert_eq!(row["backend"], format!("{backend}:8080"));
        assert!(
            row["client"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", e.ip(0))),
            "{row}"
        );
        assert_eq!(row["state"], "established");
        assert_eq!(row["service"], svc);
        assert_eq!(
            row["notes"],
            serde_json::json!(["picked-up"]),
            "flushed, then picked up"
        );
    }
    let only_b = list(&["--service", "default/b"]);
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0]["service"], "default/b");
    // etcd unreachable: the flows still show, by service id.
    let no_etcd = list(&["--etcd-endpoints", "http://127.0.0.1:9"]);
    assert_eq!(no_etcd.len(), 2);
    assert!(
        no_etcd
            .iter()
            .all(|r| r["service"].is_null() && r["svc_id"].is_u64())
    );
    // The table view names them too.
    let text = e.cli(&["conntrack", "list"]);
    assert!(
        text.contains("default/a") && text.contains("established"),
        "{text}"
    );

    // Flush one Service: its flow goes, the other stays.
    let out = e.cli(&["conntrack", "flush", "--service", "default/a"]);
    assert_eq!(out.trim(), "flushed 1 flows of default/a");
    let rows = list(&[]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["service"], "default/b");
    assert!(e.gc(CtGc::Flushed) >= 1);
    // A Service that does not exist is an error, not an empty list.
    let pin = e.c.nodes[0].pin_path.to_str().unwrap().to_owned();
    assert!(
        e.c.cli(&[
            "conntrack",
            "flush",
            "--service",
            "default/nope",
            "--pin-path",
            &pin
        ])
        .is_err()
    );
    // The stats command shows the sweeper's counters.
    let stats = e.cli(&["stats"]);
    assert!(stats.contains("ct_flushed"), "{stats}");
}

/// An agent starting where the previous release pinned `ct_v1`/`rnat_v1`
/// copies the flows into `ct_v2` as established and removes the old
/// pins once its programs are attached.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn the_previous_releases_conntrack_is_migrated_at_start() {
    require_root();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    let pin = c.nodes[0].pin_path.clone();
    std::fs::create_dir_all(&pin).unwrap();
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("0x{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // One TCP flow 10.244.9.5:40000 -> VIP_A:80 sent to 10.244.9.7:8080.
    let key = [
        &[10, 244, 9, 5][..],
        &VIP_A.octets(),
        &40000u16.to_be_bytes(),
        &80u16.to_be_bytes(),
        &[6, 0, 0, 0],
    ]
    .concat();
    let val = [
        &[10, 244, 9, 7][..],
        &8080u16.to_be_bytes(),
        &[0; 2],
        &[0; 4],
        &7u32.to_ne_bytes(),
    ]
    .concat();
    tests::netns::sh(&format!(
        "bpftool map create {ct} type lru_hash key 16 value 16 entries 1024 name ct_v1 && \
         bpftool map update pinned {ct} key {} value {} && \
         bpftool map create {rnat} type lru_hash key 16 value 12 entries 1024 name rnat_v1",
        hex(&key),
        hex(&val),
        ct = pin.join("ct_v1").display(),
        rnat = pin.join("rnat_v1").display(),
    ))
    .unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    c.wait_ready(0, Duration::from_secs(30)).unwrap();
    let log = c.nodes[0].log();
    // One flow: its reverse entry and itself (bpf::ct::CT_V1_MIGRATION),
    // before the programs are attached; rnat_v1 holds nothing more.
    assert!(
        log.contains("ct_v1: 2 entries migrated into rnat_v2, ct_v2 (0 there already"),
        "{log}"
    );
    assert!(log.contains("rnat_v1: 0 entries migrated"), "{log}");
    assert!(
        log.contains("ct_v1 (migrated)") && log.contains("rnat_v1 (migrated)"),
        "{log}"
    );
    assert!(!pin.join("ct_v1").exists() && !pin.join("rnat_v1").exists());
    let t = CtTable::open_pinned(&pin).unwrap();
    let flows = t.flows().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = flows[0];
    assert_eq!(f.key.daddr, VIP_A.octets());
    assert_eq!(f.entry.backend.ip, [10, 244, 9, 7]);
    assert_eq!(f.entry.svc_id, 7);
    assert_eq!(CtState::from_u8(f.entry.state), Some(CtState::Established));
    assert_ne!(f.entry.flags & dataplane_common::ct::CT_F_MIGRATED, 0);
    assert_eq!(t.reverse_entries().unwrap().len(), 1, "its reverse entry");
}
