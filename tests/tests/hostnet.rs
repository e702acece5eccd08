//! The node's own traffic (host network) end to end: real etcd, agents in
//! node namespaces, the node namespace itself as the client (kubelet
//! probes, hostNetwork pods, the node resolving through the cluster DNS).
//!
//! Node 1 has pod p1 (a backend), node 2 has pod p1 (a backend). Strict
//! reverse-path filtering is on in both node namespaces (as on many
//! distributions), so a reply from a remote pod must arrive where the
//! route to it points (the host device).

use std::{
    io::{ErrorKind, Read},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use dataplane_common::Stat;
use tests::{
    netns::{NetNs, in_netns, require_root},
    svc::{Backend, Conn, Ep, TCP_PORT, endpoint_slice, service, tcp_ask},
    topo::Cluster,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// Backend on the client's own node.
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Backend on the other node.
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// No endpoints.
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);

struct Env {
    c: Cluster,
    _backends: Vec<Backend>,
}

impl Env {
    fn node(&self, i: usize) -> &NetNs {
        &self.c.nodes[i].ns
    }
    fn pod_ip(&self, node: usize, pod: usize) -> Ipv4Addr {
        self.c.nodes[node].pods[pod].ip
    }
}

fn env(extra: &[&str]) -> Env {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for n in &c.nodes {
        n.ns.sh("sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1")
            .unwrap();
    }
    for i in 0..2 {
        c.start_agent(i, extra).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    for i in 0..2 {
        c.add_pod(i).unwrap();
    }
    for i in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.nodes[i].log().contains("attached from_pod to pod port")
            || !c.nodes[i].log().contains("peer added")
        {
            assert!(
                Instant::now() < deadline,
                "node {} not ready:\n{}",
                i + 1,
                c.nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut backends = Vec::new();
    for i in 0..2 {
        let p = &c.nodes[i].pods[0];
        backends.push(Backend::start(&p.ns, p.ip).unwrap());
    }
    let e = Env {
        c,
        _backends: backends,
    };
    let yaml = [
        (VIP_LOCAL, "host-local", vec![Ep::ready(e.pod_ip(0, 0))]),
        (VIP_REMOTE, "host-remote", vec![Ep::ready(e.pod_ip(1, 0))]),
        (VIP_EMPTY, "host-empty", vec![]),
    ]
    .iter()
    .map(|(vip, name, eps)| {
        format!(
            "{}---\n{}",
            service(name, *vip, ""),
            endpoint_slice(name, eps)
        )
    })
    .collect::<Vec<_>>()
    .join("---\n");
    e.c.apply_yaml(&yaml).unwrap();
    eventually("services programmed on node 1", || {
        e.c.bpftool_dump(0, "svc_v1")
            .is_ok_and(|d| d.contains("[10,96,0,22]") && d.contains("[10,96,0,21]"))
    });
    e
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One datagram from an unconnected socket (sendto / recvfrom, as a
/// resolver does): the answer and the address it came from.
fn udp_sendto(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Result<(String, SocketAddr), ErrorKind> {
    in_netns(ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.kind())?;
        s.send_to(b"query", (addr, port)).map_err(|e| e.kind())?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf).map_err(|e| e.kind())?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
    .join()
    .expect("client thread")
}

/// A connected UDP socket: connect, send, recv; the answer and what
/// getpeername says.
fn udp_connected(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Result<(String, SocketAddr), ErrorKind> {
    in_netns(ns, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.kind())?;
        s.connect((addr, port)).map_err(|e| e.kind())?;
        s.send(b"query").map_err(|e| e.kind())?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).map_err(|e| e.kind())?;
        let peer = s.peer_addr().map_err(|e| e.kind())?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), peer))
    })
    .join()
    .expect("client thread")
}

/// A TCP connection: the backend's first line and getpeername.
fn tcp_peer(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Result<(String, SocketAddr), ErrorKind> {
    in_netns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(3))
                .map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.kind())?;
        let peer = s.peer_addr().map_err(|e| e.kind())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).map_err(|e| e.kind())? == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        Ok((String::from_utf8_lossy(&line).into_owned(), peer))
    })
    .join()
    .expect("client thread")
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn stat(e: &Env, node: usize, which: Stat) -> u64 {
    dataplane::bpf::read_pinned_stats(&e.c.nodes[node].pin_path)
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == which)
        .map_or(0, |(_, c)| c.packets)
}

/// The node reaches another node's pod (ping, TCP), with its gateway
/// address as source, and the replies come back through strict rp_filter.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_reaches_remote_pods() {
    require_root();
    let e = env(&["--decap-mode", "tc"]);
    let remote = e.pod_ip(1, 0);
    e.node(0)
        .sh(&format!("ping -c 3 -i 0.2 -W 2 {remote} >/dev/null"))
        .unwrap_or_else(|err| panic!("node 1 -> {remote}: {err:#}\n{}", e.c.nodes[0].log()));
    assert_eq!(tcp_ask(e.node(0), remote, TCP_PORT), Ok(remote.to_string()));
    // And the other way round, from node 2 to node 1's pod.
    let p = e.pod_ip(0, 0);
    assert_eq!(tcp_ask(e.node(1), p, TCP_PORT), Ok(p.to_string()));
    assert!(stat(&e, 0, Stat::HostEncapsulated) > 0);
    // The node's packets leave through the host device, from its gateway
    // address.
    let gw = Ipv4Addr::from(u32::from(e.c.nodes[0].subnet_env().unwrap().subnet.network()) + 1);
    let route = e.node(0).sh(&format!("ip route get {remote}")).unwrap();
    assert!(
        route.contains("dev dataplane.1") && route.contains(&format!("src {gw}")),
        "route to a remote pod: {route}"
    );
    // A subnet no lease covers: a counted drop, not a packet to the
    // default route.
    let before = stat(&e, 0, Stat::DropNoPeer);
    let _ = e
        .node(0)
        .sh("ping -c 1 -W 1 10.244.250.9 >/dev/null 2>&1; true");
    assert!(stat(&e, 0, Stat::DropNoPeer) > before);
}

/// ClusterIPs from the node: TCP and UDP to a backend on the node and on
/// the other node; the reply's source and getpeername show the ClusterIP;
/// a Service without endpoints refuses.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_reaches_cluster_ips() {
    require_root();
    let e = env(&["--decap-mode", "tc"]);
    for (vip, backend) in [(VIP_LOCAL, e.pod_ip(0, 0)), (VIP_REMOTE, e.pod_ip(1, 0))] {
        let (answer, peer) = tcp_peer(e.node(0), vip, 80)
            .unwrap_or_else(|err| panic!("TCP {vip}:80: {err:?}\n{}", e.c.nodes[0].log()));
        assert_eq!(answer, backend.to_string(), "TCP {vip}:80");
        assert_eq!(peer, sa(vip, 80), "getpeername of a TCP socket to {vip}:80");

        let (answer, from) =
            udp_sendto(e.node(0), vip, 53).unwrap_or_else(|err| panic!("UDP {vip}:53: {err:?}"));
        assert_eq!(answer, backend.to_string(), "UDP {vip}:53");
        assert_eq!(from, sa(vip, 53), "recvfrom's source for {vip}:53");

        let (answer, peer) = udp_connected(e.node(0), vip, 53).unwrap();
        assert_eq!(answer, backend.to_string());
        assert_eq!(peer, sa(vip, 53), "getpeername of a connected UDP socket");
    }
    // From node 2 too: its "local" backend is node 1's pod.
    assert_eq!(
        tcp_peer(e.node(1), VIP_LOCAL, 80).map(|(a, _)| a),
        Ok(e.pod_ip(0, 0).to_string())
    );
    // No endpoints: refused at once, TCP and UDP.
    assert_eq!(
        tcp_peer(e.node(0), VIP_EMPTY, 80).map(|_| ()),
        Err(ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        udp_sendto(e.node(0), VIP_EMPTY, 53).map(|_| ()),
        Err(ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        udp_connected(e.node(0), VIP_EMPTY, 53).map(|_| ()),
        Err(ErrorKind::ConnectionRefused)
    );
    // A port the Service does not define is refused too.
    assert_eq!(
        tcp_peer(e.node(0), VIP_LOCAL, 81).map(|_| ()),
        Err(ErrorKind::ConnectionRefused)
    );
    assert!(stat(&e, 0, Stat::SockLb) >= 6);
    assert!(stat(&e, 0, Stat::SockRejectNoBackend) >= 3);
    assert!(stat(&e, 0, Stat::SockRejectUndefinedPort) >= 1);
}

/// Sockets outside the nodes' namespaces are not touched, though the
/// programs run for every socket of the machine: the machine's own
/// namespace connects a UDP socket to the ClusterIP of a Service without
/// endpoints (a node's socket is refused; no packet is sent either way),
/// and a namespace that is no node, holding the ClusterIPs on its own
/// loopback, reaches its own servers there.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn other_namespaces_are_untouched() {
    require_root();
    let e = env(&["--decap-mode", "tc"]);
    assert_eq!(
        udp_connected(e.node(0), VIP_EMPTY, 53).map(|_| ()),
        Err(ErrorKind::ConnectionRefused)
    );
    let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
    s.connect((VIP_EMPTY, 53))
        .expect("the machine's own socket is not refused");
    assert_eq!(s.peer_addr().unwrap(), sa(VIP_EMPTY, 53));
    drop(s);

    let other = NetNs::new(&format!("dp{}x", e.c.id)).unwrap();
    other
        .sh(&format!(
            "ip link set lo up && ip addr add {VIP_LOCAL}/32 dev lo && ip addr add {VIP_EMPTY}/32 dev lo"
        ))
        .unwrap();
    let got = in_netns(&other, || {
        let l = TcpListener::bind((VIP_LOCAL, 80)).unwrap();
        let u = UdpSocket::bind((VIP_EMPTY, 53)).unwrap();
        let c = TcpStream::connect((VIP_LOCAL, 80)).map_err(|e| e.kind())?;
        let (_, client) = l.accept().map_err(|e| e.kind())?;
        let peer = c.peer_addr().map_err(|e| e.kind())?;
        let q = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        q.send_to(b"x", (VIP_EMPTY, 53)).map_err(|e| e.kind())?;
        u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.kind())?;
        Ok::<_, ErrorKind>((peer, client.ip(), buf[..n].to_vec()))
    })
    .join()
    .unwrap();
    // Translated, these would have gone to a pod address this namespace
    // has no route to.
    assert_eq!(
        got,
        Ok((sa(VIP_LOCAL, 80), VIP_LOCAL.into(), b"x".to_vec()))
    );
}

/// A restart of the agent keeps the node's connections (to a remote pod,
/// and through a ClusterIP to a remote backend) and its socket programs,
/// replaced, not doubled; `dataplane uninstall` removes the host device
/// and its route.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restart_keeps_host_connections_and_uninstall_removes_the_device() {
    require_root();
    let mut e = env(&["--decap-mode", "tc"]);
    let remote = e.pod_ip(1, 0);
    let (direct, first) = Conn::open(e.node(0), remote, TCP_PORT).unwrap();
    assert_eq!(first, remote.to_string());
    let (via_vip, first) = Conn::open(e.node(0), VIP_REMOTE, 80).unwrap();
    assert_eq!(first, remote.to_string());

    let pins = |e: &Env| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(e.c.nodes[0].pin_path.join("links"))
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sock_") || n.starts_with("host_tc"))
            .collect();
        v.sort();
        v
    };
    let before = pins(&e);
    assert_eq!(before.len(), 5, "{before:?}");

    e.c.nodes[0].stop_agent();
    assert_eq!(direct.ask(), Ok(remote.to_string()), "agent down");
    assert_eq!(via_vip.ask(), Ok(remote.to_string()), "agent down");
    assert_eq!(
        udp_sendto(e.node(0), VIP_REMOTE, 53),
        Ok((remote.to_string(), sa(VIP_REMOTE, 53))),
        "socket LB while the agent is down"
    );
    e.c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    let log_len = e.c.nodes[0].log().matches("agent ready").count();
    assert!(log_len >= 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.c.nodes[0].log().matches("agent ready").count() < 2 {
        assert!(Instant::now() < deadline, "{}", e.c.nodes[0].log());
        assert_eq!(direct.ask(), Ok(remote.to_string()), "during the restart");
        assert_eq!(via_vip.ask(), Ok(remote.to_string()), "during the restart");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(direct.ask(), Ok(remote.to_string()), "after the restart");
    assert_eq!(via_vip.ask(), Ok(remote.to_string()), "after the restart");
    assert_eq!(pins(&e), before, "one link per program after the restart");
    // The replaced links are detached: one program of each kind of this
    // node's runs per hook, so a ClusterIP is translated once.
    assert_eq!(
        tcp_peer(e.node(0), VIP_LOCAL, 80),
        Ok((e.pod_ip(0, 0).to_string(), sa(VIP_LOCAL, 80)))
    );

    e.c.nodes[0].stop_agent();
    let pin_path: PathBuf = e.c.nodes[0].pin_path.clone();
    e.node(0)
        .command(tests::topo::agent_bin().to_str().unwrap())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&pin_path)
        .arg("--cni-conf-dir")
        .arg(e.c.nodes[0].cni_conf_dir())
        .status()
        .unwrap()
        .success()
        .then_some(())
        .expect("uninstall");
    let links = e.node(0).sh("ip -o link show").unwrap();
    assert!(!links.contains("dataplane.1"), "{links}");
    let routes = e.node(0).sh("ip route").unwrap();
    assert!(!routes.contains("10.244.0.0/16"), "{routes}");
    assert!(!pin_path.exists());
}

/// Mixed cluster: the node reaches a pod on a node running stock
/// flannel's kernel vxlan device, and the flannel node's host reaches
/// this node's gateway address (a VXLAN packet for the gateway, delivered
/// to the host through the host device), with TC and with XDP
/// decapsulation.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_reaches_a_pod_on_a_flannel_node() {
    require_root();
    for mode in ["tc", "xdp"] {
        let mut c = Cluster::new(2).unwrap();
        c.put_config(CONFIG).unwrap();
        let flannel_subnet: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
        let flannel = tests::flannel::FlannelNode::start(&c, 1, flannel_subnet).unwrap();
        c.nodes[0]
            .ns
            .sh("sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1")
            .unwrap();
        c.start_agent(0, &["--decap-mode", mode]).unwrap();
        let env0 = c.wait_ready(0, Duration::from_secs(30)).unwrap();
        let id = c.id.clone();
        tests::topo::add_pod_to(&id, &mut c.nodes[1], &flannel_subnet, 1450).unwrap();
        eventually("the flannel node in the peer map", || {
            c.bpftool_dump(0, "peers_v1")
                .is_ok_and(|d| d.contains("[10,244,200,0]"))
        });
        flannel.program_peers(&c).unwrap();
        let theirs = c.nodes[1].pods[0].ip;
        let _backend = Backend::start(&c.nodes[1].pods[0].ns, theirs).unwrap();
        c.nodes[0]
            .ns
            .sh(&format!("ping -c 2 -i 0.2 -W 2 {theirs} >/dev/null"))
            .unwrap_or_else(|e| panic!("{mode}: node -> flannel pod: {e:#}\n{}", c.nodes[0].log()));
        assert_eq!(
            tcp_ask(&c.nodes[0].ns, theirs, TCP_PORT),
            Ok(theirs.to_string()),
            "{mode}"
        );
        let gw = Ipv4Addr::from(u32::from(env0.subnet.network()) + 1);
        c.nodes[1]
            .ns
            .sh(&format!("ping -c 2 -i 0.2 -W 2 {gw} >/dev/null"))
            .unwrap_or_else(|e| panic!("{mode}: flannel host -> our gateway: {e:#}"));
    }
}
