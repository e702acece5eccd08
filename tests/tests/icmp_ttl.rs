//! ICMP, fragments and TTL end to end, with the real agent: what a pod
//! sees of the network through a ClusterIP and across nodes.
//!
//! Cluster: node 1 has the client c, an echo server e1 and a pod with the
//! port closed x1; node 2 has an echo server e2, a router pod r2 and a pod
//! with the port closed x2. Behind r2, over a link with MTU 1200, is the
//! server s (an address of node 2's subnet routed via r2): the hop with
//! the smaller MTU that path MTU discovery has to find.

use std::{
    io,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    netns::{NetNs, require_root},
    probe::{Echo, Probe, ping_ttl, udp_echo_large, udp_probe, udp_recv_result},
    svc::{Ep, UDP_PORT, endpoint_slice, service},
    topo::{Cluster, Pod},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The Service's UDP port (`svc::service`: 53 -> 5353).
const PORT: u16 = 53;
const NARROW_MTU: u32 = 1200;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Fields drop in order: servers first, the cluster last.
struct Env {
    _echo: Vec<Echo>,
    /// Server behind the narrow link.
    _s: NetNs,
    s_ip: Ipv4Addr,
    c: Cluster,
}

impl Env {
    fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.c.nodes[node].pods[pod]
    }
    fn client(&self) -> &NetNs {
        &self.pod(0, 0).ns
    }
    /// The bridge address of node `i` (its pods' gateway).
    fn gateway(&self, i: usize) -> Ipv4Addr {
        let net = self.c.nodes[i].subnet_env().unwrap().subnet.network();
        Ipv4Addr::from(u32::from(net) + 1)
    }
    /// A Service `name` at `vip` whose endpoints are `eps`.
    fn service(&self, name: &str, vip: Ipv4Addr, eps: &[Ipv4Addr]) {
        let eps: Vec<Ep> = eps.iter().copied().map(Ep::ready).collect();
        let yaml = format!(
            "{}---\n{}",
            service(name, vip, ""),
            endpoint_slice(name, &eps)
        );
        self.c.apply_yaml(&yaml).unwrap();
    }
}

fn env(mode: &str) -> Env {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", mode]).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    for node in 0..2 {
        for _ in 0..3 {
            c.add_pod(node).unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in 0..2 {
        while c.nodes[node]
            .log()
            .matches("attached from_pod to pod port")
            .count()
            < 3
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
    // s: an address of node 2's subnet, behind r2 over a 1200-byte link.
    let subnet = c.nodes[1].subnet_env().unwrap().subnet;
    let s_ip = Ipv4Addr::from(u32::from(subnet.network()) + 200);
    let r2 = &c.nodes[1].pods[1];
    let s = NetNs::new(&format!("dp{}s", c.id)).unwrap();
    r2.ns
        .sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && \
             ip link add rs0 mtu {NARROW_MTU} type veth peer name eth0 mtu {NARROW_MTU} netns {s} && \
             ip addr add 192.168.201.1/30 dev rs0 && ip link set rs0 up && \
             ip route add {s_ip}/32 dev rs0",
            s = s.name
        ))
        .unwrap();
    s.sh(&format!(
        "ip addr add {s_ip}/32 dev eth0 && ip link set eth0 up && \
         ip route add default via 192.168.201.1 dev eth0 onlink"
    ))
    .unwrap();
    c.nodes[1]
        .ns
        .sh(&format!("ip route add {s_ip}/32 via {} dev cni0", r2.ip))
        .unwrap();
    let echo = vec![
        Echo::start(&c.nodes[0].pods[1].ns, UDP_PORT).unwrap(),
        Echo::start(&c.nodes[1].pods[0].ns, UDP_PORT).unwrap(),
        Echo::start(&s, UDP_PORT).unwrap(),
    ];
    Env {
        _echo: echo,
        _s: s,
        s_ip,
        c,
    }
}

/// Retries `f` until it gives `Some`, for up to 15 s (the agent programs
/// a Service a moment after `apply`; the first packets to a new
/// neighbour may be lost).
/// On a timeout the nodes' counters are printed.
fn eventually<T>(e: &Env, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            for n in &e.c.nodes {
                let pin = n.pin_path.to_str().unwrap();
                let stats = e.c.cli(&["stats", "--pin-path", pin]).unwrap_or_default();
                eprintln!("node {} counters:\n{stats}", n.index + 1);
            }
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Port unreachable from a backend, path MTU discovery, fragmented
/// datagrams both ways and time exceeded from the path, all through
/// ClusterIPs.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn icmp_errors_and_fragments_through_clusterips() {
    require_root();
    let e = env("tc");
    let (x1, x2, e1, e2) = (
        e.pod(0, 2).ip,
        e.pod(1, 2).ip,
        e.pod(0, 1).ip,
        e.pod(1, 0).ip,
    );
    let refused_local = Ipv4Addr::new(10, 96, 0, 21);
    let refused_remote = Ipv4Addr::new(10, 96, 0, 22);
    let echo_local = Ipv4Addr::new(10, 96, 0, 23);
    let echo_remote = Ipv4Addr::new(10, 96, 0, 24);
    let narrow = Ipv4Addr::new(10, 96, 0, 25);
    e.service("refused-local", refused_local, &[x1]);
    e.service("refused-remote", refused_remote, &[x2]);
    e.service("echo-local", echo_local, &[e1]);
    e.service("echo-remote", echo_remote, &[e2]);
    e.service("narrow", narrow, &[e.s_ip]);

    // A closed backend port: the backend's port unreachable reaches the
    // client as ECONNREFUSED, on the same node and across nodes.
    for (what, vip) in [("local", refused_local), ("remote", refused_remote)] {
        eventually(
            &e,
            &format!("ECONNREFUSED from the {what} backend"),
            || match udp_recv_result(e.client(), vip, PORT, Duration::from_millis(500)) {
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => Some(()),
                Err(err)
                    if err.kind() == io::ErrorKind::WouldBlock
                        || err.kind() == io::ErrorKind::TimedOut =>
                {
                    None
                }
                other => panic!("{what}: expected ECONNREFUSED, got {other:?}"),
            },
        );
    }

    // Large datagrams, fragmented by the client and by the echo server,
    // come back whole.
    for (what, vip) in [("local", echo_local), ("remote", echo_remote)] {
        eventually(&e, &format!("{what} echo reachable"), || {
            (udp_echo_large(e.client(), vip, PORT, 100, 1, Duration::from_millis(500)).ok()? == 1)
                .then_some(())
        });
        for len in [1500, 4000, 9000] {
            let n = udp_echo_large(e.client(), vip, PORT, len, 20, Duration::from_secs(2)).unwrap();
            assert_eq!(n, 20, "{what}: {len}-byte datagrams echoed whole");
        }
    }

    // Path MTU discovery: s sits behind a 1200-byte link; r2 answers a
    // 1400-byte datagram with "fragmentation needed", and the client's
    // socket to the ClusterIP learns 1200.
    eventually(&e, "narrow service reachable", || {
        (udp_echo_large(e.client(), narrow, PORT, 100, 1, Duration::from_millis(500)).ok()? == 1)
            .then_some(())
    });
    let mut p = Probe::udp(narrow, PORT);
    p.len = 1400;
    p.df = true;
    let (report, mtu) = eventually(&e, "fragmentation needed", || {
        let (r, mtu) = udp_probe(e.client(), p, Duration::from_secs(1)).unwrap();
        r.map(|r| (r, mtu))
    });
    assert_eq!(
        (report.icmp_type, report.code, report.info),
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, NARROW_MTU),
        "fragmentation needed, next-hop MTU: {report:?}"
    );
    assert_eq!(report.offender, e.pod(1, 1).ip, "from the router");
    assert_eq!(report.errno, libc::EMSGSIZE);
    assert_eq!(mtu, NARROW_MTU, "the path MTU to the ClusterIP");
    // And the datagrams that fit now get through both ways, fragmented.
    let n = udp_echo_large(e.client(), narrow, PORT, 3000, 10, Duration::from_secs(2)).unwrap();
    assert_eq!(n, 10, "3000-byte datagrams through the narrow link");

    // Traceroute through a ClusterIP whose backend is on node 2: TTL 1
    // dies at node 1, TTL 2 at node 2 (its answer translated back).
    for (ttl, from) in [(1, e.gateway(0)), (2, e.gateway(1))] {
        let mut p = Probe::udp(echo_remote, PORT);
        p.ttl = Some(ttl);
        let (r, _) = eventually(&e, &format!("time exceeded for TTL {ttl}"), || {
            let (r, mtu) = udp_probe(e.client(), p, Duration::from_secs(1)).unwrap();
            r.map(|r| (r, mtu))
        });
        assert_eq!(
            (r.icmp_type, r.code, r.offender),
            (ICMP_TIME_EXCEEDED, 0, from),
            "TTL {ttl}: {r:?}"
        );
    }
}

/// The nodes route pod traffic: a cross-node ping reply arrives with TTL
/// 62, and traceroute-style probes are answered by each node on the way.
fn ttl_across_nodes(mode: &str) {
    let e = env(mode);
    let (e2, x2) = (e.pod(1, 0).ip, e.pod(1, 2).ip);
    let ttl = eventually(&e, "ping across nodes", || ping_ttl(e.client(), e2).ok());
    assert_eq!(ttl, 62, "64 minus one hop per node, as host routing gives");
    let local = ping_ttl(e.client(), e.pod(0, 1).ip).unwrap();
    assert_eq!(local, 64, "pods of one node are bridged, not routed");
    for (ttl, want) in [
        (1, (ICMP_TIME_EXCEEDED, 0, e.gateway(0))),
        (2, (ICMP_TIME_EXCEEDED, 0, e.gateway(1))),
        (3, (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, x2)),
    ] {
        let mut p = Probe::udp(x2, 33434);
        p.ttl = Some(ttl);
        let (r, _) = eventually(&e, &format!("answer to TTL {ttl}"), || {
            udp_probe(e.client(), p, Duration::from_secs(1))
                .unwrap()
                .0
                .map(|r| (r, ()))
        });
        assert_eq!((r.icmp_type, r.code, r.offender), want, "TTL {ttl}: {r:?}");
    }
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn ttl_across_nodes_tc_decap() {
    require_root();
    ttl_across_nodes("tc");
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn ttl_across_nodes_xdp_decap() {
    require_root();
    ttl_across_nodes("xdp");
}
