//! Masquerade and Service backends off the pod network, end to end: real
//! etcd, agents in node namespaces, pods on their bridges, and the outside
//! world (a namespace behind the underlay router that knows nothing of
//! pods: `Cluster::add_outside`) with a [`Witness`] that answers with the
//! source it saw.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use dataplane::bpf::{CtTable, read_pinned_stats};
use dataplane_common::{Stat, ct::CtGc};
use tests::{
    netns::require_root,
    outside::{Outside, Seen, Witness},
    svc::{Conn, Ep, TCP_PORT, UDP_PORT, endpoint_slice, service, tcp_ask, tcp_ask_many, udp_ask},
    topo::Cluster,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NAT_PORTS: (u16, u16) = (62000, 62999);

struct Env {
    c: Cluster,
    outside: Outside,
    witness: Witness,
}

impl Env {
    fn node_ip(&self, n: usize) -> Ipv4Addr {
        self.c.nodes[n].ip
    }
    fn pod_ns(&self, n: usize) -> &tests::netns::NetNs {
        &self.c.nodes[n].pods[0].ns
    }
    fn pod_ip(&self, n: usize) -> Ipv4Addr {
        self.c.nodes[n].pods[0].ip
    }
    fn stat(&self, n: usize, s: Stat) -> u64 {
        read_pinned_stats(&self.c.nodes[n].pin_path)
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == s)
            .map_or(0, |(_, c)| c.packets)
    }
    fn table(&self, n: usize) -> CtTable {
        CtTable::open_pinned(&self.c.nodes[n].pin_path).unwrap()
    }
    fn cli(&self, n: usize, args: &[&str]) -> String {
        let pin = self.c.nodes[n].pin_path.to_str().unwrap().to_owned();
        let mut all = args.to_vec();
        all.extend(["--pin-path", &pin]);
        self.c.cli(&all).unwrap()
    }
}

/// Two nodes with one bridge pod each, agents started with `extra`, and
/// the outside world with a witness on its TCP 8080 / UDP 5353.
fn env(extra: &[&str]) -> Env {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, extra).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
        c.add_pod(i).unwrap();
    }
    for i in 0..2 {
        eventually(&format!("node {} attached", i + 1), || {
            let log = c.nodes[i].log();
            log.contains("attached from_pod to pod port")
                && log.contains("attached to_pod to cni0")
                && log.contains("peer added")
        });
    }
    let outside = c.add_outside().unwrap();
    let witness = Witness::start(&outside.ns, outside.ip, TCP_PORT, UDP_PORT).unwrap();
    Env {
        c,
        outside,
        witness,
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn masq_args() -> Vec<String> {
    vec![
        "--decap-mode".into(),
        "tc".into(),
        "--ip-masq".into(),
        "--nat-ports".into(),
        format!("{}-{}", NAT_PORTS.0, NAT_PORTS.1),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The witness's answer, as an address.
fn answer(r: Result<String, String>, what: &str) -> SocketAddr {
    let a = r.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    a.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {a:?}: {e}"))
}

fn assert_masqueraded(a: SocketAddr, node: Ipv4Addr, what: &str) {
    assert_eq!(a.ip(), node, "{what}: the outside sees the node's address");
    assert!(
        (NAT_PORTS.0..=NAT_PORTS.1).contains(&a.port()),
        "{what}: port {} from --nat-ports",
        a.port()
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn without_ip_masq_the_outside_sees_the_pod_and_cannot_answer() {
    require_root();
    let e = env(&["--decap-mode", "tc"]);
    let r = udp_ask(
        e.pod_ns(0),
        e.outside.ip,
        UDP_PORT,
        Duration::from_millis(500),
    );
    assert!(r.is_err(), "no route back to a pod address: {r:?}");
    eventually("the datagram arrived", || !e.witness.seen().is_empty());
    let seen = e.witness.seen();
    assert!(
        seen.iter()
            .all(|s| matches!(s, Seen::Udp(a) if a.ip() == e.pod_ip(0))),
        "the pod's own address: {seen:?}"
    );
    assert!(tcp_ask(e.pod_ns(0), e.outside.ip, TCP_PORT).is_err());
    assert_eq!(e.stat(0, Stat::MasqForward), 0);
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn with_ip_masq_pods_reach_the_outside_as_their_node() {
    require_root();
    let e = env(&strs(&masq_args()));
    // The range is reserved for the node's own sockets.
    let reserved = e.c.nodes[0]
        .ns
        .sh("cat /proc/sys/net/ipv4/ip_local_reserved_ports")
        .unwrap();
    assert!(reserved.contains("62000-62999"), "{reserved:?}");
    for n in 0..2 {
        let a = answer(tcp_ask(e.pod_ns(n), e.outside.ip, TCP_PORT), "TCP");
        assert_masqueraded(a, e.node_ip(n), "TCP");
        let a = answer(
            udp_ask(e.pod_ns(n), e.outside.ip, UDP_PORT, Duration::from_secs(2)),
            "UDP",
        );
        assert_masqueraded(a, e.node_ip(n), "UDP");
        e.c.ping(n, 0, e.outside.ip, 3).unwrap();
    }
    // Many connections, each its own mapping.
    let answers = tcp_ask_many(e.pod_ns(0), e.outside.ip, TCP_PORT, 200);
    let mut ports = std::collections::BTreeSet::new();
    for a in answers {
        let a = answer(a, "one of many");
        assert_masqueraded(a, e.node_ip(0), "one of many");
        ports.insert(a.port());
    }
    assert_eq!(ports.len(), 200, "a port per connection");
    // Pod to pod across nodes is not masqueraded.
    let p1 = e.c.nodes[1].pods[0].ip;
    e.c.ping(0, 0, p1, 1).unwrap();
    // The flows are listed with their kind.
    let list = e.cli(0, &["conntrack", "list"]);
    assert!(list.contains("masq"), "{list}");
    assert!(
        list.contains(&format!("{}:", e.node_ip(0))),
        "leaves as the node: {list}"
    );
    let stats = e.cli(0, &["stats"]);
    assert!(stats.contains("masq_forward"), "{stats}");
    assert!(e.stat(0, Stat::MasqReverse) > 200);
    let status = e.cli(0, &["status"]);
    assert!(status.contains("masq_v1"), "fill level shown: {status}");
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn replies_come_back_in_xdp_decap_mode_too() {
    require_root();
    // decap_xdp passes what is not VXLAN; from_underlay translates it.
    let mut args = masq_args();
    args[1] = "xdp".into();
    let e = env(&strs(&args));
    let a = answer(tcp_ask(e.pod_ns(0), e.outside.ip, TCP_PORT), "TCP");
    assert_masqueraded(a, e.node_ip(0), "TCP");
    let a = answer(
        udp_ask(e.pod_ns(0), e.outside.ip, UDP_PORT, Duration::from_secs(2)),
        "UDP",
    );
    assert_masqueraded(a, e.node_ip(0), "UDP");
    e.c.ping(0, 0, e.outside.ip, 2).unwrap();
    // And pod to pod across nodes still decapsulates in XDP.
    let p1 = e.c.nodes[1].pods[0].ip;
    e.c.ping(0, 0, p1, 2).unwrap();
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn an_exhausted_port_range_drops_and_counts() {
    require_root();
    let e = env(&[
        "--decap-mode",
        "tc",
        "--ip-masq",
        "--nat-ports",
        "62000-62001",
    ]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (conn, first) = Conn::open(e.pod_ns(0), e.outside.ip, TCP_PORT).unwrap();
        assert_masqueraded(
            first.trim().parse().unwrap(),
            e.node_ip(0),
            "within the range",
        );
        held.push(conn);
    }
    assert!(
        Conn::open(e.pod_ns(0), e.outside.ip, TCP_PORT).is_err(),
        "no port left for a third"
    );
    assert!(e.stat(0, Stat::DropMasqExhausted) >= 1);
    // The two connections carry on.
    for c in &held {
        c.ask().unwrap();
    }
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn masqueraded_flows_expire_and_are_swept() {
    require_root();
    let mut args = masq_args();
    args.extend(
        [
            "--ct-udp-timeout",
            "1",
            "--ct-udp-timeout-stream",
            "2",
            "--ct-sweep-interval-secs",
            "1",
        ]
        .map(String::from),
    );
    let e = env(&strs(&args));
    let a = answer(
        udp_ask(e.pod_ns(0), e.outside.ip, UDP_PORT, Duration::from_secs(2)),
        "UDP",
    );
    assert_masqueraded(a, e.node_ip(0), "UDP");
    assert_eq!(e.table(0).masq_flows().unwrap().len(), 1);
    // The counters are written once the sweep is done.
    eventually("swept and counted", || {
        e.table(0).masq_flows().unwrap().is_empty()
            && e.table(0).masq_reverse_entries().unwrap().is_empty()
            && e.table(0)
                .gc_counters()
                .unwrap()
                .iter()
                .any(|&(c, n)| c == CtGc::MasqExpired && n >= 1)
    });
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_masqueraded_connection_survives_an_agent_restart() {
    require_root();
    let args = masq_args();
    let mut e = env(&strs(&args));
    let (conn, first) = Conn::open(e.pod_ns(0), e.outside.ip, TCP_PORT).unwrap();
    let first: SocketAddr = first.trim().parse().unwrap();
    assert_masqueraded(first, e.node_ip(0), "before");
    e.c.nodes[0].stop_agent();
    assert_eq!(conn.ask().unwrap().trim(), first.to_string(), "agent down");
    let ready_before = e.c.nodes[0].log().matches("agent ready").count();
    e.c.start_agent(0, &strs(&args)).unwrap();
    eventually("restarted", || {
        e.c.nodes[0].log().matches("agent ready").count() > ready_before
    });
    assert!(
        e.c.nodes[0]
            .log()
            .contains("to_underlay on eth0: replaced the program of the pinned link"),
        "the masquerade was replaced in place"
    );
    assert_eq!(conn.ask().unwrap().trim(), first.to_string(), "after");
    // New flows still leave masqueraded.
    let a = answer(tcp_ask(e.pod_ns(0), e.outside.ip, TCP_PORT), "new");
    assert_masqueraded(a, e.node_ip(0), "new");
}

/// The Service of these tests: TCP 80 -> 8080, UDP 53 -> 5353, on `eps`.
fn apply_service(e: &Env, name: &str, eps: &[Ipv4Addr]) {
    let eps: Vec<Ep> = eps.iter().copied().map(Ep::ready).collect();
    let yaml = format!(
        "{}---\n{}",
        service(name, VIP, ""),
        endpoint_slice(name, &eps)
    );
    e.c.apply_yaml(&yaml).unwrap();
}

/// A ClusterIP whose one backend is `backend`, asked over TCP and UDP from
/// the pod of node `from`: the answers (the source the backend saw).
fn ask_service(e: &Env, from: usize) -> (SocketAddr, SocketAddr) {
    eventually("service reachable", || {
        tcp_ask(e.pod_ns(from), VIP, 80).is_ok()
    });
    let tcp = answer(tcp_ask(e.pod_ns(from), VIP, 80), "TCP via ClusterIP");
    let udp = answer(
        udp_ask(e.pod_ns(from), VIP, 53, Duration::from_secs(2)),
        "UDP via ClusterIP",
    );
    (tcp, udp)
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn clusterip_backends_on_node_addresses() {
    require_root();
    // No --ip-masq: Service flows off the pod network work without it.
    let e = env(&["--decap-mode", "tc"]);
    // A hostNetwork-style server on node 1's own address.
    let node1 = e.node_ip(0);
    let _server = Witness::start(&e.c.nodes[0].ns, node1, TCP_PORT, UDP_PORT).unwrap();
    apply_service(&e, "hostnet", &[node1]);
    // From node 1's pod: the backend is this node's own address; the reply
    // comes back through the host stack and to_pod, not SNATed.
    let (tcp, udp) = ask_service(&e, 0);
    assert_eq!(tcp.ip(), e.pod_ip(0), "own node: the pod's address");
    assert_eq!(udp.ip(), e.pod_ip(0));
    assert!(e.stat(0, Stat::ToPodReverse) >= 2);
    // From node 2's pod: another node's address, SNATed to node 2's.
    let (tcp, udp) = ask_service(&e, 1);
    assert_masq_any(tcp, e.node_ip(1), "TCP from the other node");
    assert_masq_any(udp, e.node_ip(1), "UDP from the other node");
    assert!(e.stat(1, Stat::MasqForward) >= 2);
    let list = e.cli(1, &["conntrack", "list"]);
    assert!(list.contains("service-backend"), "{list}");
}

/// The node's address and a port of the default `--nat-ports`.
fn assert_masq_any(a: SocketAddr, node: Ipv4Addr, what: &str) {
    assert_eq!(a.ip(), node, "{what}: the backend sees the node's address");
    assert!(
        a.port() >= 61000,
        "{what}: port {} from --nat-ports",
        a.port()
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn clusterip_backend_outside_the_cluster() {
    require_root();
    let e = env(&["--decap-mode", "tc"]);
    apply_service(&e, "external", &[e.outside.ip]);
    for n in 0..2 {
        let (tcp, udp) = ask_service(&e, n);
        assert_masq_any(tcp, e.node_ip(n), "TCP to an outside backend");
        assert_masq_any(udp, e.node_ip(n), "UDP to an outside backend");
    }
    // Plain pod traffic to the outside is still not masqueraded.
    let before = e.witness.seen().len();
    let _ = udp_ask(
        e.pod_ns(0),
        e.outside.ip,
        UDP_PORT,
        Duration::from_millis(300),
    );
    eventually("the datagram arrived", || e.witness.seen().len() > before);
    assert_eq!(e.witness.seen()[before].addr().ip(), e.pod_ip(0));
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_cni_pod_is_masqueraded_and_reaches_a_backend_on_its_node() {
    require_root();
    let mut e = env(&strs(&masq_args()));
    let i = e.c.add_cni_pod(0, "masq-cni").unwrap();
    eventually("to_pod on the CNI pod's device", || {
        e.c.nodes[0]
            .log()
            .contains("attached from_pod and to_pod to CNI pod device")
    });
    let (ns, ip) = {
        let p = &e.c.nodes[0].pods[i];
        (&p.ns, p.ip)
    };
    let a = answer(tcp_ask(ns, e.outside.ip, TCP_PORT), "TCP from a CNI pod");
    assert_masqueraded(a, e.node_ip(0), "TCP from a CNI pod");
    // A backend on the node's own address: its reply reaches the CNI pod
    // through the pod's host-side device, where to_pod translates it.
    let node1 = e.node_ip(0);
    let _server = Witness::start(&e.c.nodes[0].ns, node1, TCP_PORT, UDP_PORT).unwrap();
    apply_service(&e, "hostnet-cni", &[node1]);
    eventually("service reachable", || tcp_ask(ns, VIP, 80).is_ok());
    let a = answer(tcp_ask(ns, VIP, 80), "TCP via ClusterIP");
    assert_eq!(a.ip(), ip, "not SNATed: the pod's own address");
    let a = answer(udp_ask(ns, VIP, 53, Duration::from_secs(2)), "UDP");
    assert_eq!(a.ip(), ip);
}
