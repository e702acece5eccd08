//! North-south Services end to end: NodePort, externalIPs and
//! LoadBalancer ingress IPs reached from the outside namespace (behind the
//! underlay router, knowing nothing of pods or Services), on a 3-node
//! cluster with real agents and etcd.
//!
//! The backends are `Witness` servers in pods: they answer with the
//! source address they saw, so a test sees whether the client's address
//! was kept (externalTrafficPolicy Local) or SNATed to the entry node's
//! gateway address (Cluster).
//!
//! Pods: node 1 has p0 (backend A), node 2 has p0 (backend B), node 3
//! has p0 (a client inside the cluster).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    netns::{NetNs, in_netns, require_root},
    outside::{Outside, Witness},
    svc::{Conn, TCP_PORT, UDP_PORT, tcp_ask, udp_ask},
    topo::Cluster,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

struct Env {
    c: Cluster,
    outside: Outside,
    /// Each node's gateway address (its subnet's first address).
    gateways: Vec<Ipv4Addr>,
    _witnesses: Vec<Witness>,
}

impl Env {
    fn pod_ip(&self, node: usize) -> Ipv4Addr {
        self.c.nodes[node].pods[0].ip
    }

    /// A counter of `dataplane stats` on node `i` (packets).
    fn stat(&self, i: usize, name: &str) -> u64 {
        let out = self
            .c
            .cli(&[
                "stats",
                "--pin-path",
                self.c.nodes[i].pin_path.to_str().unwrap(),
            ])
            .unwrap();
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"));
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable line {line:?}"))
    }
}

fn env() -> Env {
    env_in("tc")
}

fn env_in(decap_mode: &str) -> Env {
    let mut c = Cluster::new(3).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..3 {
        c.start_agent(i, &["--decap-mode", decap_mode]).unwrap();
    }
    let mut gateways = Vec::new();
    for i in 0..3 {
        let env = c.wait_ready(i, Duration::from_secs(30)).unwrap();
        gateways.push(Ipv4Addr::from(u32::from(env.subnet.network()) + 1));
    }
    for i in 0..3 {
        c.add_pod(i).unwrap();
    }
    for node in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.nodes[node]
            .log()
            .contains("attached from_pod to pod port")
            || c.nodes[node].log().matches("peer added").count() < 2
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
    let outside = c.add_outside().unwrap();
    let mut witnesses = Vec::new();
    for node in 0..2 {
        let p = &c.nodes[node].pods[0];
        witnesses.push(Witness::start(&p.ns, p.ip, TCP_PORT, UDP_PORT).unwrap());
    }
    Env {
        c,
        outside,
        gateways,
        _witnesses: witnesses,
    }
}

/// A Service with an http (TCP 80) and a dns (UDP 53) port, `spec` lines
/// added (two-space indented, under `spec:`), `node_ports` explicit
/// nodePorts for the two ports, and an EndpointSlice with `backends`.
fn manifest(
    name: &str,
    cluster_ip: &str,
    spec: &str,
    node_ports: Option<(u16, u16)>,
    status: &str,
    backends: &[Ipv4Addr],
) -> String {
    let np = |n: Option<u16>| {
        n.map(|n| format!("    nodePort: {n}\n"))
            .unwrap_or_default()
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n{spec}  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {TCP_PORT}\n{}  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: {UDP_PORT}\n{}{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: {TCP_PORT}\n  - name: dns\n    protocol: UDP\n    port: {UDP_PORT}\nendpoints:\n",
        np(node_ports.map(|p| p.0)),
        np(node_ports.map(|p| p.1)),
    );
    for b in backends {
        s.push_str(&format!("  - addresses: [\"{b}\"]\n"));
    }
    s
}

/// One HTTP GET of `/` from the namespace `ns`: the whole response.
fn http_get(ns: &NetNs, ip: Ipv4Addr, port: u16) -> Result<String, String> {
    in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((ip, port)),
            Duration::from_secs(2),
        )
        .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .join()
    .expect("client thread")
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The source address (without the port) a Witness answered with.
fn source(answer: &str) -> Ipv4Addr {
    answer
        .trim()
        .rsplit_once(':')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {answer:?}"))
}

/// The nodePort `get services` shows for `name`'s port `port`/`proto`.
fn node_port(e: &Env, name: &str, port: u16, proto: &str) -> u16 {
    let out = e.c.cli(&["get", "services"]).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("default/{name} ")))
        .unwrap_or_else(|| panic!("{name} not listed:\n{out}"));
    let want = format!(":{port}:");
    line.split_whitespace()
        .flat_map(|w| w.split(','))
        .find(|p| p.contains(&want) && p.ends_with(&format!("/{proto}")))
        .and_then(|p| p.split(':').nth(2)?.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no nodePort for {port}/{proto} in {line:?}"))
}

/// Outside -> every node's PublicIP:nodePort, TCP and UDP: with
/// externalTrafficPolicy Cluster the answer comes back from every node
/// and the backend saw the entry node's gateway address; with Local the
/// backend saw the outside's own address, and a node without a local
/// endpoint drops (counted). Every node holds the same Maglev table for
/// the Cluster Service.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_ports_on_every_node() {
    require_root();
    let e = env();
    let (a, b) = (e.pod_ip(0), e.pod_ip(1));
    e.c.apply_yaml(&manifest(
        "web",
        "10.96.0.20",
        "  type: NodePort\n",
        Some((30080, 30053)),
        "",
        &[b],
    ))
    .unwrap();
    e.c.apply_yaml(&manifest(
        "local",
        "10.96.0.21",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
        None,
        "",
        &[a],
    ))
    .unwrap();
    let (ltcp, ludp) = (
        node_port(&e, "local", 80, "TCP"),
        node_port(&e, "local", 53, "UDP"),
    );
    assert!((30000..=32767).contains(&ltcp) && ltcp != 30080, "{ltcp}");
    assert!((30000..=32767).contains(&ludp) && ludp != 30053, "{ludp}");

    let out = &e.outside.ns;
    for (i, node) in e.c.nodes.iter().enumerate() {
        let ip = node.ip;
        eventually(&format!("TCP nodePort on node {}", i + 1), || {
            tcp_ask(out, ip, 30080).is_ok()
        });
        let t = tcp_ask(out, ip, 30080).unwrap();
        assert_eq!(source(&t), e.gateways[i], "TCP via node {}: {t}", i + 1);
        let u = udp_ask(out, ip, 30053, Duration::from_secs(2)).unwrap();
        assert_eq!(source(&u), e.gateways[i], "UDP via node {}: {u}", i + 1);
    }

    // `conntrack list` on the entry node names the Service of a
    // north-south flow and the address and port it leaves with.
    let (_held, _) = Conn::open(out, e.c.nodes[0].ip, 30080).unwrap();
    let pin = e.c.nodes[0].pin_path.to_str().unwrap().to_owned();
    let rows: Vec<serde_json::Value> = serde_json::from_str(
        &e.c.cli(&["conntrack", "list", "--output", "json", "--pin-path", &pin])
            .unwrap(),
    )
    .unwrap();
    let row = rows
        .iter()
        .find(|r| r["kind"] == "north-south" && r["proto"] == "TCP" && r["state"] == "established")
        .unwrap_or_else(|| panic!("no established north-south flow: {rows:#?}"));
    assert_eq!(row["service"], "default/web", "{row}");
    assert_eq!(row["frontend"], format!("{}:30080", e.c.nodes[0].ip));
    assert!(
        row["nat"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{}:", e.gateways[0]))),
        "{row}"
    );

    // Local: node 1 has the endpoint and keeps the client's address.
    let n1 = e.c.nodes[0].ip;
    eventually("Local nodePort on node 1", || {
        tcp_ask(out, n1, ltcp).is_ok()
    });
    let t = tcp_ask(out, n1, ltcp).unwrap();
    assert_eq!(source(&t), e.outside.ip, "Local keeps the source: {t}");
    let u = udp_ask(out, n1, ludp, Duration::from_secs(2)).unwrap();
    assert_eq!(source(&u), e.outside.ip, "Local keeps the source: {u}");
    // Node 3 has none (the Service's endpoint is on node 1): dropped and
    // counted, nothing answers, not even a refusal.
    let before = e.stat(2, "drop_np_no_local_endpoint");
    let n3 = e.c.nodes[2].ip;
    assert!(udp_ask(out, n3, ludp, Duration::from_millis(700)).is_err());
    let err = tcp_ask(out, n3, ltcp).unwrap_err();
    assert!(!err.contains("refused"), "dropped, not refused: {err}");
    assert!(e.stat(2, "drop_np_no_local_endpoint") > before);

    // A LoadBalancer with externalTrafficPolicy Local: its
    // healthCheckNodePort tells a load balancer which nodes have an
    // endpoint (node 1: 200; node 3: 503), as kube-proxy's does.
    e.c.apply_yaml(&manifest(
        "lb-local",
        "10.96.0.24",
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30300\n",
        None,
        "",
        &[a],
    ))
    .unwrap();
    for (node, status, n) in [(0, "200", 1), (2, "503", 0)] {
        let ip = e.c.nodes[node].ip;
        eventually(&format!("health check on node {}", node + 1), || {
            http_get(out, ip, 30300).is_ok_and(|r| r.starts_with(&format!("HTTP/1.1 {status}")))
        });
        let r = http_get(out, ip, 30300).unwrap();
        assert!(
            r.contains(&format!(
                r#""localEndpoints":{n},"service":{{"name":"lb-local","namespace":"default"}}"#
            )),
            "node {}: {r}",
            node + 1
        );
    }

    // A Service without any endpoint: refused at once (kube-proxy's
    // REJECT: TCP RST, ICMP port unreachable) by the data path, whatever
    // the policy, on every node. (The host would refuse a closed port
    // too: the counter shows who did.)
    for (name, ip, policy, ports) in [
        ("empty", "10.96.0.22", "", (30090, 30091)),
        (
            "empty-local",
            "10.96.0.23",
            "  externalTrafficPolicy: Local\n",
            (30092, 30093),
        ),
    ] {
        e.c.apply_yaml(&manifest(
            name,
            ip,
            &format!("  type: NodePort\n{policy}"),
            Some(ports),
            "",
            &[],
        ))
        .unwrap();
    }
    for (i, node) in e.c.nodes.iter().enumerate() {
        let before = e.stat(i, "np_reject_no_backend");
        eventually(&format!("refusals on node {}", i + 1), || {
            let t = tcp_ask(out, node.ip, 30090).unwrap_err();
            let u = udp_ask(out, node.ip, 30093, Duration::from_secs(2)).unwrap_err();
            assert!(t.contains("refused") && u.contains("refused"), "{t}; {u}");
            e.stat(i, "np_reject_no_backend") >= before + 2
        });
    }

    // A pod (node 3) reaching a node's PublicIP:nodePort: served by
    // from_pod on its own node (node 3's address), without SNAT.
    let p3 = &e.c.nodes[2].pods[0];
    let t = tcp_ask(&p3.ns, n3, 30080).unwrap();
    assert_eq!(source(&t), p3.ip, "east-west to the nodePort: {t}");
    // The node itself reaching its own PublicIP:nodePort: balanced at the
    // socket by the host network's programs, which find the frontend as
    // they find a ClusterIP; the backend (on node 2) sees node 3's
    // gateway address, the source of the node's traffic to pods.
    let t = tcp_ask(&e.c.nodes[2].ns, n3, 30080).unwrap();
    assert_eq!(source(&t), e.gateways[2], "node 3 to its own nodePort: {t}");

    // Maglev: the same table on every node for the Cluster Service.
    for c in [30080u16, 30053] {
        let key = |i: usize| table_of(&e.c, i, e.c.nodes[i].ip, c);
        let t0 = key(0);
        assert_eq!(t0.len(), 1021);
        for i in 1..3 {
            assert_eq!(key(i), t0, "node {} has another table for :{c}", i + 1);
        }
    }
    for i in 0..3 {
        eprintln!(
            "node {}: np_forward {}, np_reverse {}, np_to_underlay {}",
            i + 1,
            e.stat(i, "np_forward"),
            e.stat(i, "np_reverse"),
            e.stat(i, "np_to_underlay")
        );
    }
}

/// The Maglev table of the frontend `ip:port` on node `i` (through its
/// service id in `svc_v1`).
fn table_of(c: &Cluster, i: usize, ip: Ipv4Addr, port: u16) -> Vec<u64> {
    let svc: serde_json::Value =
        serde_json::from_str(&c.bpftool_dump(i, "svc_v1").unwrap()).unwrap();
    let id = svc
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .find(|f| {
            let vip: Vec<u64> = f["key"]["vip"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let p: Vec<u64> = f["key"]["port"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            vip == ip.octets().map(u64::from) && p == port.to_be_bytes().map(u64::from)
        })
        .map(|f| f["value"]["id"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("no frontend {ip}:{port} on node {}", i + 1));
    let mg: serde_json::Value =
        serde_json::from_str(&c.bpftool_dump(i, "maglev_v1").unwrap()).unwrap();
    mg.as_array()
        .unwrap()
        .iter()
        .map(|e| &e["formatted"])
        .find(|f| f["key"]["svc_id"].as_u64() == Some(id))
        .map(|f| {
            f["value"]["slots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .unwrap_or_else(|| panic!("no Maglev table for id {id} on node {}", i + 1))
}

/// Outside -> an externalIP and a LoadBalancer ingress IP, routed by the
/// underlay router to node 1 and node 3: answered, TCP and UDP, with the
/// entry node's gateway address as the backend saw it (Cluster).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn external_ip_and_load_balancer_ingress() {
    require_root();
    let e = env();
    let b = e.pod_ip(1);
    e.c.apply_yaml(&manifest(
        "ext",
        "10.96.0.30",
        &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n"),
        None,
        "",
        &[b],
    ))
    .unwrap();
    e.c.apply_yaml(&manifest(
        "lb",
        "10.96.0.31",
        "  type: LoadBalancer\n",
        None,
        &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {LB_IP}\n"),
        &[b],
    ))
    .unwrap();
    // The "load balancer": the router sends each IP to a node.
    e.c.underlay
        .sh(&format!(
            "ip route add {EXTERNAL_IP}/32 via {} && ip route add {LB_IP}/32 via {}",
            e.c.nodes[0].ip, e.c.nodes[2].ip
        ))
        .unwrap();
    let out = &e.outside.ns;
    for (ip, node) in [(EXTERNAL_IP, 0), (LB_IP, 2)] {
        eventually(&format!("{ip}:80"), || tcp_ask(out, ip, 80).is_ok());
        let t = tcp_ask(out, ip, 80).unwrap();
        assert_eq!(source(&t), e.gateways[node], "TCP {ip}: {t}");
        let u = udp_ask(out, ip, 53, Duration::from_secs(2)).unwrap();
        assert_eq!(source(&u), e.gateways[node], "UDP {ip}: {u}");
    }
    // Another port of the external IP is no frontend: nothing answers.
    assert!(tcp_ask(out, EXTERNAL_IP, 81).is_err());
}

/// `--decap-mode xdp`: decap_xdp passes the frames from outside (no
/// VXLAN) to from_underlay, which serves them as in TC mode; the reply of
/// a remote backend is decapsulated in XDP (marked "to host", being for
/// the gateway address) and reverse-translated by from_underlay.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_ports_in_xdp_mode() {
    require_root();
    let e = env_in("xdp");
    e.c.apply_yaml(&manifest(
        "web",
        "10.96.0.20",
        "  type: NodePort\n",
        Some((30080, 30053)),
        "",
        &[e.pod_ip(1)],
    ))
    .unwrap();
    let out = &e.outside.ns;
    for (i, node) in e.c.nodes.iter().enumerate() {
        let ip = node.ip;
        eventually(&format!("TCP nodePort on node {}", i + 1), || {
            tcp_ask(out, ip, 30080).is_ok()
        });
        let t = tcp_ask(out, ip, 30080).unwrap();
        assert_eq!(source(&t), e.gateways[i], "TCP via node {}: {t}", i + 1);
        let u = udp_ask(out, ip, 30053, Duration::from_secs(2)).unwrap();
        assert_eq!(source(&u), e.gateways[i], "UDP via node {}: {u}", i + 1);
    }
    // The remote backend's replies came through XDP decapsulation (which
    // counts them as pass_to_host) and were translated by from_underlay.
    for i in [0, 2] {
        assert!(e.stat(i, "np_reverse") > 0 && e.stat(i, "np_to_underlay") > 0);
    }
}
