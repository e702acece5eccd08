//! End-to-end VXLAN overlay: real etcd, agents in node namespaces, pods in
//! their own namespaces, the real kernel. Run in both decapsulation modes.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    netns::{in_netns, require_root},
    packets::parse_vxlan,
    topo::{Cluster, add_pod_to},
    traffic::bulk_tcp,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);

macro_rules! root_only {
    () => {
        require_root()
    };
}

/// `n` nodes with agents (`extra` CLI args) and `pods` pods each.
fn cluster(n: usize, pods: usize, extra: &[&str]) -> Cluster {
    let mut c = Cluster::new(n).expect("cluster");
    c.put_config(CONFIG).unwrap();
    for i in 0..n {
        c.start_agent(i, extra).unwrap();
    }
    for i in 0..n {
        c.wait_ready(i, READY).unwrap();
    }
    for i in 0..n {
        for _ in 0..pods {
            c.add_pod(i).unwrap();
        }
    }
    // Every agent has attached to its pods' ports and learnt every peer.
    for i in 0..n {
        wait_for(
            &c,
            || {
                c.nodes[i]
                    .log()
                    .matches("attached from_pod to pod port")
                    .count()
                    >= pods
            },
            "pod ports attached",
            i,
        );
        wait_for(&c, || peer_count(&c, i) == n - 1, "all peers in the map", i);
    }
    c
}

fn wait_for(c: &Cluster, mut cond: impl FnMut() -> bool, what: &str, node: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} on node {}:\n{}",
            node + 1,
            c.nodes[node].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Entries in node `i`'s peer map, read with bpftool (typed BTF dump).
fn peer_count(c: &Cluster, i: usize) -> usize {
    let dump = c.bpftool_dump(i, "peers_v1").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap_or(serde_json::Value::Null);
    v.as_array().map_or(0, Vec::len)
}

fn all_pods(c: &Cluster) -> Vec<(usize, usize, Ipv4Addr)> {
    let mut v = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        for (j, p) in n.pods.iter().enumerate() {
            v.push((i, j, p.ip));
        }
    }
    v
}

fn full_mesh(extra: &[&str]) {
    let c = cluster(3, 2, extra);
    let pods = all_pods(&c);
    for &(i, j, _) in &pods {
        for &(_, _, dst) in &pods {
            c.ping(i, j, dst, 1).unwrap_or_else(|e| {
                panic!("n{}p{} -> {dst}: {e:#}\n{}", i + 1, j + 1, c.nodes[i].log())
            });
        }
    }
    // Bulk TCP across nodes, both directions, checksummed end to end.
    for (a, b) in [(0usize, 1usize), (1, 0), (2, 0)] {
        let (sa, sb) = (&c.nodes[a].pods[0], &c.nodes[b].pods[1]);
        let r = bulk_tcp(&sb.ns, sb.ip, &sa.ns, 100 << 20).unwrap();
        assert_eq!(
            r.sent_sum,
            r.received_sum,
            "stream checksum n{}->n{}",
            a + 1,
            b + 1
        );
        eprintln!(
            "bulk n{} -> n{}: {:.2} Gbit/s",
            a + 1,
            b + 1,
            r.gbit_per_s()
        );
    }
    // The counters agree that the overlay carried it.
    let stats = c.bpftool_dump(0, "stats_v2").unwrap();
    assert!(
        stats.contains("packets"),
        "stats readable with bpftool: {stats}"
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn full_mesh_tc_decap() {
    root_only!();
    full_mesh(&["--decap-mode", "tc"]);
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn full_mesh_xdp_decap() {
    root_only!();
    full_mesh(&["--decap-mode", "xdp"]);
}

/// What leaves node 1 for node 2 is exactly flannel's VXLAN.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn capture_shows_flannel_wire_format() {
    root_only!();
    let c = cluster(2, 1, &["--decap-mode", "tc"]);
    let (src, dst) = (c.nodes[0].pods[0].ip, c.nodes[1].pods[0].ip);
    // Capture on node 2's underlay with a raw packet socket.
    let cap = in_netns(&c.nodes[1].ns, move || {
        capture_vxlan(Duration::from_secs(10))
    });
    std::thread::sleep(Duration::from_millis(300));
    c.ping(0, 0, dst, 3).unwrap();
    let frame = cap
        .join()
        .unwrap()
        .expect("a VXLAN frame on node 2's underlay");
    let p = parse_vxlan(&frame); // checks lengths and the outer IPv4 checksum
    assert_eq!(p.dport, 8472);
    assert_eq!(p.vxlan[0], 0x08, "flags: I bit only");
    assert_eq!(&p.vxlan[1..4], &[0, 0, 0]);
    assert_eq!(
        u32::from_be_bytes([0, p.vxlan[4], p.vxlan[5], p.vxlan[6]]),
        1,
        "VNI 1"
    );
    assert_eq!((p.src_ip, p.dst_ip), (c.nodes[0].ip, c.nodes[1].ip));
    let vtep = |ip: Ipv4Addr| dataplane::lease::vtep_mac_for(ip);
    assert_eq!(
        &p.inner[0..6],
        &vtep(c.nodes[1].ip),
        "inner dst = receiver's VtepMAC"
    );
    assert_eq!(
        &p.inner[6..12],
        &vtep(c.nodes[0].ip),
        "inner src = sender's VtepMAC"
    );
    assert_eq!(&p.inner[26..30], &src.octets());
    assert_eq!(&p.inner[30..34], &dst.octets());
    assert!(
        p.udp_csum == 0 || udp_csum_ok(&frame),
        "outer UDP checksum valid or zero"
    );
    let inner_ip = &p.inner[14..34];
    assert_eq!(
        tests::packets::inet_csum(inner_ip),
        0,
        "inner IPv4 checksum intact"
    );
}

fn udp_csum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    let udp = &frame[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(udp);
    tests::packets::inet_csum(&pseudo) == 0
}

/// Reads frames from every interface of the current namespace until a
/// UDP/8472 one arrives. Returns the whole Ethernet frame.
fn capture_vxlan(timeout: Duration) -> Option<Vec<u8>> {
    // SAFETY: plain socket calls with checked results.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const _,
            size_of::<libc::timeval>() as u32,
        );
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0);
            if n < 42 {
                continue;
            }
            let f = &buf[..n as usize];
            if f[12..14] == [0x08, 0x00] && f[23] == 17 && f[36..38] == 8472u16.to_be_bytes() {
                libc::close(fd);
                return Some(f.to_vec());
            }
        }
        libc::close(fd);
        None
    }
}

/// A node running this agent and a node running stock flannel's kernel
/// vxlan device reach each other's pods.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn mixed_cluster_with_flannel_node() {
    root_only!();
    for mode in ["tc", "xdp"] {
        let mut c = Cluster::new(2).unwrap();
        c.put_config(CONFIG).unwrap();
        // Node 2: flannel-style. Its lease goes into etcd first, in
        // flannel's format with an etcd lease; it programs the kernel as
        // flannel's vxlan backend does.
        let flannel_subnet: ipnet::Ipv4Net = "10.244.200.0/24".parse().unwrap();
        let flannel = tests::flannel::FlannelNode::start(&c, 1, flannel_subnet).unwrap();
        c.start_agent(0, &["--decap-mode", mode]).unwrap();
        let env = c.wait_ready(0, READY).unwrap();
        c.add_pod(0).unwrap();
        let id = c.id.clone();
        add_pod_to(&id, &mut c.nodes[1], &flannel_subnet, 1450).unwrap();
        wait_for(&c, || peer_count(&c, 0) == 1, "flannel peer in the map", 0);
        wait_for(
            &c,
            || c.nodes[0].log().contains("attached from_pod to pod port"),
            "pod port",
            0,
        );
        flannel.program_peers(&c).unwrap();

        let (ours, theirs) = (c.nodes[0].pods[0].ip, c.nodes[1].pods[0].ip);
        assert!(env.subnet.contains(&ours));
        c.ping(0, 0, theirs, 2)
            .unwrap_or_else(|e| panic!("{mode}: ours -> flannel: {e:#}\n{}", c.nodes[0].log()));
        c.ping(1, 0, ours, 2)
            .unwrap_or_else(|e| panic!("{mode}: flannel -> ours: {e:#}"));
        for (from, to) in [(0, 1), (1, 0)] {
            let (a, b) = (&c.nodes[from].pods[0], &c.nodes[to].pods[0]);
            let r = bulk_tcp(&b.ns, b.ip, &a.ns, 100 << 20).unwrap();
            assert_eq!(r.sent_sum, r.received_sum);
            eprintln!(
                "{mode}: bulk n{} -> n{}: {:.2} Gbit/s",
                from + 1,
                to + 1,
                r.gbit_per_s()
            );
        }
    }
}

/// A node that joins becomes reachable without restarting the others; a
/// node whose lease is deleted becomes unreachable and leaves the map.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn node_join_and_leave() {
    root_only!();
    let mut c = cluster(2, 1, &["--decap-mode", "tc"]);
    let k = c.add_node().unwrap();
    c.start_agent(k, &["--decap-mode", "tc"]).unwrap();
    let env3 = c.wait_ready(k, READY).unwrap();
    c.add_pod(k).unwrap();
    wait_for(&c, || peer_count(&c, 0) == 2, "new peer on node 1", 0);
    wait_for(
        &c,
        || c.nodes[k].log().contains("attached from_pod to pod port"),
        "pod port",
        k,
    );
    let new_pod = c.nodes[k].pods[0].ip;
    c.ping(0, 0, new_pod, 2).unwrap();
    c.ping(k, 0, c.nodes[0].pods[0].ip, 2).unwrap();

    // The node goes away: agent stopped (lease kept, as on a restart),
    // then its lease deleted as an operator or TTL expiry would.
    c.nodes[k].stop_agent();
    let key = dataplane::lease::subnet_key(&c.prefix, env3.subnet);
    c.with_etcd(move |mut cl| async move {
        cl.delete(key, None).await?;
        Ok(())
    })
    .unwrap();
    wait_for(
        &c,
        || peer_count(&c, 0) == 1,
        "peer removed from node 1's map",
        0,
    );
    assert!(
        c.ping(0, 0, new_pod, 1).is_err(),
        "a node without a lease is unreachable"
    );
}
