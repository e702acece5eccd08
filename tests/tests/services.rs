//! ClusterIP services end to end (docs/services.md): real
//! etcd, agents in node namespaces, backends and clients in pods.
//!
//! Cluster used by most tests: node 1 has pods p1 (client) and p2
//! (backend), node 2 has p1, p2 (backends) and p3 (client).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    netns::require_root,
    svc::{
        Backend, Conn, Ep, endpoint_slice, service, tcp_ask, tcp_ask_many, udp_ask, udp_ask_from,
    },
    topo::Cluster,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

macro_rules! root_only {
    () => {
        require_root()
    };
}

struct Env {
    c: Cluster,
    _backends: Vec<Backend>,
}

impl Env {
    fn pod(&self, node: usize, pod: usize) -> &tests::topo::Pod {
        &self.c.nodes[node].pods[pod]
    }
    fn ip(&self, node: usize, pod: usize) -> Ipv4Addr {
        self.pod(node, pod).ip
    }
}

fn env(extra: &[&str]) -> Env {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, extra).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    for (node, pods) in [(0, 2), (1, 3)] {
        for _ in 0..pods {
            c.add_pod(node).unwrap();
        }
    }
    for (node, pods) in [(0usize, 2usize), (1, 3)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.nodes[node]
            .log()
            .matches("attached from_pod to pod port")
            .count()
            < pods
            || !c.nodes[node].log().contains("peer added")
        {
            assert!(
                Instant::now() < deadline,
                "node {} not ready:\n{}",
                node + 1,
                c.nodes[node].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut backends = Vec::new();
    for (n, p) in [(0, 1), (1, 0), (1, 1)] {
        let pod = &c.nodes[n].pods[p];
        backends.push(Backend::start(&pod.ns, pod.ip).unwrap());
    }
    // Node 1's client pod also serves, for the hairpin case.
    let p = &c.nodes[0].pods[0];
    backends.push(Backend::start(&p.ns, p.ip).unwrap());
    Env {
        c,
        _backends: backends,
    }
}

/// Waits until `f` holds, polling.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn three_backends(e: &Env) -> Vec<Ipv4Addr> {
    vec![e.ip(0, 1), e.ip(1, 0), e.ip(1, 1)]
}

fn apply_service(e: &Env, name: &str, extra_spec: &str, eps: &[Ep]) {
    let yaml = format!(
        "{}---\n{}",
        service(name, VIP, extra_spec),
        endpoint_slice(name, eps)
    );
    e.c.apply_yaml(&yaml).unwrap();
}

/// 1 + 2 (reverse NAT) + 8 (client/backend on the same and other nodes):
/// new connections spread evenly over the ready endpoints, from either node.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn even_spread_from_both_nodes() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let eps: Vec<Ep> = three_backends(&e).into_iter().map(Ep::ready).collect();
    apply_service(&e, "spread", "", &eps);
    eventually("service reachable", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).is_ok()
    });
    let n = 3000;
    let answers = tcp_ask_many(&e.pod(0, 0).ns, VIP, 80, n);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for a in &answers {
        *counts
            .entry(a.clone().expect("every connection answered"))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "all three backends used: {counts:?}");
    // Chi-square, 2 degrees of freedom: 13.8 is the p = 0.001 critical value.
    let expected = n as f64 / 3.0;
    let chi2: f64 = counts
        .values()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 13.8, "uneven split {counts:?}, chi2 {chi2:.1}");
    // From node 2 too, over TCP and UDP; replies come from the ClusterIP
    // (the client connected to it, so a wrong source would not match).
    let from2 = tcp_ask_many(&e.pod(1, 2).ns, VIP, 80, 300);
    assert!(
        from2.iter().all(|r| r.is_ok()),
        "node 2 client: {:?}",
        from2.iter().find(|r| r.is_err())
    );
    let u = udp_ask(&e.pod(1, 2).ns, VIP, 53, Duration::from_secs(2)).unwrap();
    assert!(
        three_backends(&e).iter().any(|b| b.to_string() == u),
        "UDP answer {u}"
    );
    let stats =
        e.c.cli(&[
            "stats",
            "--pin-path",
            e.c.nodes[0].pin_path.to_str().unwrap(),
        ])
        .unwrap_or_default();
    eprintln!("{stats}");
}

/// 2 + 6: an established connection stays on its backend while others
/// come and go; when its own backend is removed it fails fast.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn established_connection_sticks_then_fails_fast() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let all = three_backends(&e);
    apply_service(
        &e,
        "sticky",
        "",
        &all.iter().copied().map(Ep::ready).collect::<Vec<_>>(),
    );
    eventually("service reachable", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).is_ok()
    });
    let (conn, first) = Conn::open(&e.pod(0, 0).ns, VIP, 80).unwrap();
    let mine: Ipv4Addr = first.parse().unwrap();
    // Remove every other backend: the connection keeps answering from its own.
    apply_service(&e, "sticky", "", &[Ep::ready(mine)]);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        assert_eq!(
            conn.ask().unwrap(),
            first,
            "existing connection keeps its backend"
        );
    }
    // Add the others back and remove ours: new connections avoid it at once,
    // the old connection is reset instead of hanging.
    let others: Vec<Ep> = all
        .iter()
        .copied()
        .filter(|b| *b != mine)
        .map(Ep::ready)
        .collect();
    apply_service(&e, "sticky", "", &others);
    eventually("new connections avoid the removed backend", || {
        tcp_ask_many(&e.pod(0, 0).ns, VIP, 80, 20)
            .iter()
            .all(|r| matches!(r, Ok(b) if *b != first))
    });
    let t = Instant::now();
    let r = conn.ask();
    assert!(r.is_err(), "the flow to a removed backend fails: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "and fails fast ({:?})",
        t.elapsed()
    );
}

/// 3: ClientIP affinity holds, and expires after timeoutSeconds of no new
/// connections.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn client_ip_affinity_and_timeout() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 2\n";
    apply_service(
        &e,
        "aff",
        spec,
        &three_backends(&e)
            .into_iter()
            .map(Ep::ready)
            .collect::<Vec<_>>(),
    );
    eventually("service reachable", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).is_ok()
    });
    let answers = tcp_ask_many(&e.pod(0, 0).ns, VIP, 80, 60);
    let first = answers[0].clone().unwrap();
    assert!(
        answers.iter().all(|a| a.as_ref() == Ok(&first)),
        "all 60 on one backend: {answers:?}"
    );
    // After the timeout a client may land elsewhere; over 8 rounds the
    // chance that it never does is (1/3)^8.
    let mut seen = std::collections::BTreeSet::from([first]);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2300));
        let round = tcp_ask_many(&e.pod(0, 0).ns, VIP, 80, 5);
        let b = round[0].clone().unwrap();
        assert!(
            round.iter().all(|a| a.as_ref() == Ok(&b)),
            "sticky within a round"
        );
        seen.insert(b);
    }
    assert!(seen.len() > 1, "affinity expired at least once: {seen:?}");
}

/// 4: no endpoints -> refused at once, TCP and UDP.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn no_endpoints_is_refused_immediately() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    apply_service(&e, "empty", "", &[]);
    eventually("frontend programmed", || {
        e.c.bpftool_dump(0, "svc_v1")
            .map(|d| d.contains("\"key\""))
            .unwrap_or(false)
    });
    let t = Instant::now();
    let r = tcp_ask(&e.pod(0, 0).ns, VIP, 80);
    assert!(
        matches!(&r, Err(m) if m.contains("refused")),
        "TCP refused: {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "in well under a second: {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let r = udp_ask(&e.pod(0, 0).ns, VIP, 53, Duration::from_secs(3));
    assert!(
        matches!(&r, Err(m) if m.contains("refused")),
        "UDP refused: {r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

/// 5: only terminating-but-serving endpoints left -> they are used; once a
/// ready one exists, only it is.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn terminating_endpoints_are_the_fallback() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let (a, b) = (e.ip(1, 0), e.ip(1, 1));
    apply_service(&e, "term", "", &[Ep::terminating(a)]);
    eventually("terminating endpoint used", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).as_deref() == Ok(&a.to_string())
    });
    apply_service(&e, "term", "", &[Ep::terminating(a), Ep::ready(b)]);
    eventually("ready endpoint preferred", || {
        tcp_ask_many(&e.pod(0, 0).ns, VIP, 80, 20)
            .iter()
            .all(|r| r.as_deref() == Ok(&b.to_string()))
    });
}

/// 6: a UDP client reusing its port gets a live backend on its next
/// request after its backend is removed (kubernetes #19029).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn udp_recovers_after_backend_removal() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let (a, b) = (e.ip(1, 0), e.ip(0, 1));
    apply_service(&e, "dns", "", &[Ep::ready(a)]);
    eventually("UDP answered by a", || {
        udp_ask_from(&e.pod(0, 0).ns, 40053, VIP, 53, Duration::from_millis(500)).as_deref()
            == Ok(&a.to_string())
    });
    apply_service(&e, "dns", "", &[Ep::ready(b)]);
    eventually("next request answered by b", || {
        udp_ask_from(&e.pod(0, 0).ns, 40053, VIP, 53, Duration::from_millis(500)).as_deref()
            == Ok(&b.to_string())
    });
}

/// 7: a pod that is the service's only endpoint reaches itself through it.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn hairpin() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let me = e.ip(0, 0);
    apply_service(&e, "self", "", &[Ep::ready(me)]);
    eventually("hairpin connection", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).as_deref() == Ok(&me.to_string())
    });
    assert_eq!(
        udp_ask(&e.pod(0, 0).ns, VIP, 53, Duration::from_secs(2)).unwrap(),
        me.to_string()
    );
}

/// 8: a port or protocol the Service does not define is not forwarded.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn undefined_port_is_not_forwarded() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    apply_service(
        &e,
        "ports",
        "",
        &three_backends(&e)
            .into_iter()
            .map(Ep::ready)
            .collect::<Vec<_>>(),
    );
    eventually("service reachable", || {
        tcp_ask(&e.pod(0, 0).ns, VIP, 80).is_ok()
    });
    // TCP to 8080 on the ClusterIP (the backends listen there) and UDP to
    // 80: nothing answers.
    assert!(tcp_ask(&e.pod(0, 0).ns, VIP, 8080).is_err());
    assert!(udp_ask(&e.pod(0, 0).ns, VIP, 80, Duration::from_millis(700)).is_err());
    let stats =
        e.c.cli(&[
            "stats",
            "--pin-path",
            e.c.nodes[0].pin_path.to_str().unwrap(),
        ])
        .unwrap();
    let line = stats
        .lines()
        .find(|l| l.starts_with("drop_svc_undefined_port"))
        .unwrap();
    assert!(!line.contains(" 0 pkts"), "counted: {line}");
}

/// 9: internalTrafficPolicy Local uses only endpoints on the client's node
/// and rejects where there are none.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn internal_traffic_policy_local() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let node2 = [e.ip(1, 0), e.ip(1, 1)];
    apply_service(
        &e,
        "local",
        "  internalTrafficPolicy: Local\n",
        &node2.iter().copied().map(Ep::ready).collect::<Vec<_>>(),
    );
    eventually("node 2 client served", || {
        tcp_ask(&e.pod(1, 2).ns, VIP, 80).is_ok()
    });
    let answers = tcp_ask_many(&e.pod(1, 2).ns, VIP, 80, 50);
    assert!(
        answers
            .iter()
            .all(|a| node2.iter().any(|b| a.as_deref() == Ok(&b.to_string()))),
        "{answers:?}"
    );
    let r = tcp_ask(&e.pod(0, 0).ns, VIP, 80);
    assert!(
        matches!(&r, Err(m) if m.contains("refused")),
        "node 1 has no local endpoint: {r:?}"
    );
}

/// 10: with 10,000 services applied, one more becomes reachable from every
/// node, and programming it took map writes for that one service only.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn ten_thousand_services_then_one_more() {
    root_only!();
    let e = env(&["--decap-mode", "tc"]);
    let backends = three_backends(&e);
    // 10,000 services with 3 endpoints each, written straight to etcd in
    // batches of 40 (Service + EndpointSlice = 2 objects each).
    let mut yaml_batches = Vec::new();
    let mut cur = String::new();
    for i in 0..10_000u32 {
        let vip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8);
        let name = format!("bulk-{i}");
        cur.push_str(&service(&name, vip, ""));
        cur.push_str("---\n");
        cur.push_str(&endpoint_slice(
            &name,
            &backends.iter().copied().map(Ep::ready).collect::<Vec<_>>(),
        ));
        cur.push_str("---\n");
        if i % 60 == 59 {
            yaml_batches.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        yaml_batches.push(cur);
    }
    e.c.with_etcd(move |mut client| async move {
        for y in yaml_batches {
            let objs = dataplane::services::parse_manifests(&y)?;
            dataplane::services::apply(&mut client, dataplane::services::DEFAULT_PREFIX, &objs)
                .await?;
        }
        Ok(())
    })
    .unwrap();
    let last = Ipv4Addr::new(10, 97, 39, 250);
    for n in 0..2 {
        let client = if n == 0 {
            &e.pod(0, 0).ns
        } else {
            &e.pod(1, 2).ns
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while tcp_ask(client, last, 80).is_err() {
            assert!(
                Instant::now() < deadline,
                "10,000th service not reachable from node {}:\n{}",
                n + 1,
                e.c.nodes[n].log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let count_lines = |n: usize| e.c.nodes[n].log().matches("service default/").count();
    let before: Vec<usize> = (0..2).map(count_lines).collect();
    apply_service(
        &e,
        "one-more",
        "",
        &backends.iter().copied().map(Ep::ready).collect::<Vec<_>>(),
    );
    for (n, client) in [(0usize, &e.pod(0, 0).ns), (1, &e.pod(1, 2).ns)] {
        eventually("the new service answers", || {
            tcp_ask(client, VIP, 80).is_ok()
        });
        // The agent logs one line per service it programs: exactly one more.
        eventually("programmed", || count_lines(n) > before[n]);
        let log = e.c.nodes[n].log();
        let new_lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("service default/"))
            .skip(before[n])
            .collect();
        // (The Service and its EndpointSlice may arrive as two events.)
        assert!(
            new_lines.iter().all(|l| l.contains("default/one-more")),
            "only the new service was reprogrammed on node {}: {new_lines:?}",
            n + 1
        );
        let writes = log
            .lines()
            .rev()
            .find(|l| l.contains("services: 1 changed"))
            .expect("write count logged");
        let updates: u64 = writes
            .split(" map updates")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // 2 frontends x (service entry + 3 backend slots + 3 live pairs)
        // + 2 ClusterIP refcount writes = 16, whatever the 10,000 others.
        assert!(
            updates <= 16,
            "map writes proportional to one service: {writes}"
        );
    }
}

// ---------------------------------------------------------------- guards

/// Frontend count of `vip:port/TCP` in node `i`'s svc_v1 (its backends),
/// `None` when absent.
fn svc_backends(c: &Cluster, i: usize, vip: Ipv4Addr, port: u16) -> Option<u32> {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use dataplane_common::{PROTO_TCP, SvcInfo, SvcKey, map_names};
    let data = MapData::from_pin(c.nodes[i].pin_path.join(map_names::SERVICES)).ok()?;
    let m: BpfHashMap<MapData, SvcKey, SvcInfo> = BpfHashMap::try_from(Map::HashMap(data)).ok()?;
    let key = SvcKey {
        vip: vip.octets(),
        port: port.to_be_bytes(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    m.get(&key, 0).ok().map(|i| i.count)
}

/// One node, no pods: enough to see what the agent programs.
fn bare_node(config: &str, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(1).unwrap();
    c.put_config(config).unwrap();
    c.start_agent(0, extra).unwrap();
    c.wait_ready(0, Duration::from_secs(30)).unwrap();
    c
}

/// Writes objects straight to etcd (no `apply` checks), as a controller
/// racing `apply` or bypassing it would.
fn write_unchecked(c: &Cluster, yaml: &str) {
    let objs = dataplane::services::parse_manifests(yaml).unwrap();
    c.with_etcd(move |mut client| async move {
        dataplane::services::apply(&mut client, dataplane::services::DEFAULT_PREFIX, &objs).await?;
        Ok(())
    })
    .unwrap();
}

fn eps(n: u8) -> Vec<Ep> {
    (1..=n)
        .map(|k| Ep::ready(Ipv4Addr::new(10, 244, 200, k)))
        .collect()
}

fn svc_yaml(name: &str, vip: Ipv4Addr, n_eps: u8) -> String {
    format!(
        "{}---\n{}",
        service(name, vip, ""),
        endpoint_slice(name, &eps(n_eps))
    )
}

/// Two Services claiming one IP:port/protocol in etcd: the older keeps it,
/// the newer is skipped (counted, logged once) and takes over when the
/// older goes.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn older_service_keeps_a_contested_frontend() {
    root_only!();
    let c = bare_node(CONFIG, &["--decap-mode", "tc"]);
    write_unchecked(&c, &svc_yaml("older", VIP, 1));
    eventually("older programmed", || {
        svc_backends(&c, 0, VIP, 80) == Some(1)
    });
    write_unchecked(&c, &svc_yaml("newer", VIP, 2));
    let skipped = |c: &Cluster| {
        c.nodes[0]
            .log()
            .matches("service default/newer skipped: frontends are claimed")
            .count()
    };
    eventually("newer skipped", || skipped(&c) == 1);
    // Its endpoints change: still skipped, not logged again.
    write_unchecked(&c, &endpoint_slice("newer", &eps(3)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        svc_backends(&c, 0, VIP, 80),
        Some(1),
        "{}",
        c.nodes[0].log()
    );
    assert_eq!(skipped(&c), 1, "{}", c.nodes[0].log());
    assert!(
        c.nodes[0]
            .log()
            .contains("owned by the older service default/older")
    );
    // The older goes: the newer takes over, with its own backends.
    c.cli(&["delete", "service", "default/older"]).unwrap();
    eventually("newer took over", || {
        svc_backends(&c, 0, VIP, 80) == Some(3)
    });
    assert!(
        c.nodes[0]
            .log()
            .contains("service default/newer: no longer skipped")
    );
}

/// ClusterIPs the agent refuses: outside the service CIDR (the flag
/// overriding the network config's ServiceCIDR), a node's PublicIP, a
/// lease's gateway. Skipped and logged; a Service that moves onto one keeps
/// what it had.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn refused_clusterips_are_skipped_and_the_last_good_state_stays() {
    root_only!();
    let config =
        r#"{"Network":"10.244.0.0/16","ServiceCIDR":"10.96.0.0/12","Backend":{"Type":"vxlan"}}"#;
    let mut c = bare_node(
        config,
        &["--decap-mode", "tc", "--service-cidr", "192.168.0.0/16"],
    );
    let node_ip = c.nodes[0].ip;
    let env = c.wait_ready(0, Duration::from_secs(5)).unwrap();
    let gateway = Ipv4Addr::from(u32::from(env.subnet.network()) + 1);
    let fine = Ipv4Addr::new(192, 168, 50, 1);
    let mut yaml = String::new();
    for (name, ip) in [
        ("in-config-cidr", VIP),
        ("node", node_ip),
        ("gateway", gateway),
        ("fine", fine),
    ] {
        yaml.push_str(&svc_yaml(name, ip, 1));
        yaml.push_str("---\n");
    }
    write_unchecked(&c, &yaml);
    eventually("the good one programmed", || {
        svc_backends(&c, 0, fine, 80) == Some(1)
    });
    let log = c.nodes[0].log();
    for (name, why) in [
        (
            "in-config-cidr",
            format!("{VIP} is outside the service CIDR 192.168.0.0/16"),
        ),
        ("node", format!("{node_ip} is a node address")),
        ("gateway", format!("{gateway} is the gateway of the lease")),
    ] {
        assert_eq!(
            log.matches(&format!("service default/{name} skipped: {why}"))
                .count(),
            1,
            "{name}:\n{log}"
        );
    }
    for ip in [VIP, node_ip, gateway] {
        assert_eq!(svc_backends(&c, 0, ip, 80), None, "{ip} programmed");
    }
    // The good one moves onto a refused address: what it had stays.
    write_unchecked(&c, &service("fine", Ipv4Addr::new(10, 200, 0, 1), ""));
    eventually("move refused", || {
        c.nodes[0].log().contains("service default/fine skipped")
    });
    assert_eq!(svc_backends(&c, 0, fine, 80), Some(1));
}
