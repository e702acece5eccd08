//! Packet-level tests of the BPF programs through BPF_PROG_TEST_RUN:
//! input frame -> expected action and output frame, as Katran's tests do.
//!
//! Each test runs in a private network namespace holding an underlay veth
//! (with a permanent neighbour for the peer, so the FIB lookup in the encap
//! path resolves) and a pod bridge.

use std::net::Ipv4Addr;

use aya::{
    maps::RingBuf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use dataplane::{
    bpf::{Dataplane, LoadOptions},
    reconcile::{FrontendState, Frontends, Peer, Reconciler, Resync},
    services::ServiceName,
};
use dataplane_common::{
    NODE_CFG_BPF_LOG, NODE_CFG_READY, NodeConfig, Stat,
    ct::{CT_F_PICKED_UP, CT_F_SEEN_REPLY, CtState, CtTimeouts},
    prog_names,
};
use etherparse::{Ethernet2Header, Icmpv4Type, IpNumber, icmpv4::DestUnreachableHeader};
use ipnet::Ipv4Net;
use tests::{
    netns::{in_private_netns, require_root, sh},
    packets::*,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 3);
const OUR_VTEP: [u8; 6] = [0x02, 0xdb, 192, 168, 100, 1];
const PEER_VTEP: [u8; 6] = [0x02, 0xdb, 192, 168, 100, 2];
const PEER_UL_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 5];
const CNI0_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];

struct Env {
    dp: Dataplane,
    rec: Reconciler,
    ul_mac: [u8; 6],
    cfg: NodeConfig,
    /// The frontends of the one test Service.
    fronts: Frontends,
}

fn link(name: &str) -> (u32, [u8; 6]) {
    let out = sh(&format!("ip -j link show {name}")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let idx = v[0]["ifindex"].as_u64().unwrap() as u32;
    let mac: Vec<u8> = v[0]["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    (idx, mac.try_into().unwrap())
}

/// Builds the node: underlay ul0 (192.168.100.1/24), peer neighbour, bridge
/// cni0 (10.244.1.1/24), and loads the programs with this node's config and
/// one peer (10.244.2.0/24 at 192.168.100.2).
fn setup() -> Env {
    setup_with(false)
}

/// [`setup`] with a conntrack table of `ct_max` flows.
fn setup_ct(ct_max: u32) -> Env {
    setup_opts(false, Some(ct_max))
}

/// [`setup`], loading the object as `dataplane agent --bpf-log` does when
/// `bpf_log` (its aya-log level then is this process's log level).
fn setup_with(bpf_log: bool) -> Env {
    setup_opts(bpf_log, None)
}

fn setup_opts(bpf_log: bool, ct_max: Option<u32>) -> Env {
    // The agent turns forwarding on (pods are routed); bpf_fib_lookup
    // needs it to answer.
    sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
    sh(&format!(
        "ip link add ul0 type veth peer name ul1 && ip link set ul1 address {} && \
         ip addr add 192.168.100.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up && \
         ip neigh replace 192.168.100.2 lladdr {} dev ul0 nud permanent && \
         ip link add cni0 type bridge && ip link set cni0 address {} && \
         ip addr add 10.244.1.1/24 dev cni0 && ip link set cni0 up",
        dataplane::lease::format_mac(&PEER_UL_MAC),
        dataplane::lease::format_mac(&PEER_UL_MAC),
        dataplane::lease::format_mac(&CNI0_MAC),
    ))
    .unwrap();
    let (ul_idx, ul_mac) = link("ul0");
    let (br_idx, _) = link("cni0");
    let mut dp = Dataplane::load(&LoadOptions {
        pin_path: None,
        bpf_log,
        ct_max,
    })
    .unwrap();
    let cfg = NodeConfig {
        flags: NODE_CFG_READY,
        vni: 1,
        underlay_ifindex: ul_idx,
        bridge_ifindex: br_idx,
        public_ip: OUR_IP.octets(),
        network: [10, 244, 0, 0],
        subnet: [10, 244, 1, 0],
        gateway: [10, 244, 1, 1],
        network_prefix_len: 16,
        subnet_prefix_len: 24,
        vxlan_port: 8472,
        vtep_mac: OUR_VTEP,
        underlay_mac: ul_mac,
        bridge_mac: CNI0_MAC,
        nat_port_min: dataplane_common::NAT_PORT_MIN,
        nat_port_max: dataplane_common::NAT_PORT_MAX,
        ..Default::default()
    };
    let mut rec = Reconciler::new();
    rec.set_node(dp.maps(), &cfg).unwrap();
    rec.set_peers(dp.maps(), &peers(&[]), Resync::Full).unwrap();
    Env {
        dp,
        rec,
        ul_mac,
        cfg,
        fronts: Frontends::new(),
    }
}

/// The peer of [`setup`] (10.244.2.0/24 at 192.168.100.2) and `more`.
fn peers(more: &[(&str, Ipv4Addr)]) -> std::collections::BTreeMap<Ipv4Net, Peer> {
    let mut peers = std::collections::BTreeMap::new();
    peers.insert(
        "10.244.2.0/24".parse::<Ipv4Net>().unwrap(),
        Peer {
            public_ip: PEER_IP,
            vtep_mac: PEER_VTEP,
        },
    );
    for (subnet, public_ip) in more {
        peers.insert(
            subnet.parse().unwrap(),
            Peer {
                public_ip: *public_ip,
                vtep_mac: PEER_VTEP,
            },
        );
    }
    peers
}

fn run_tc(env: &mut Env, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut SchedClassifier = env
        .dp
        .ebpf_mut()
        .program_mut(prog)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = p.test_run(opts).unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn run_xdp(env: &mut Env, input: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut Xdp = env
        .dp
        .ebpf_mut()
        .program_mut(prog_names::DECAP_XDP)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = p.test_run(opts).unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn stat(env: &Env, s: Stat) -> u64 {
    env.dp
        .stats()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == s)
        .map(|(_, c)| c.packets)
        .unwrap()
}

fn inner_pod_packet() -> Vec<u8> {
    ipv4(
        Ipv4Addr::new(10, 244, 2, 7),
        Ipv4Addr::new(10, 244, 1, 5),
        17,
        0,
        &udp(1234, 80, b"hello from a remote pod"),
    )
}

fn vxlan_from(
    src: Ipv4Addr,
    flags: u8,
    vni: u32,
    inner_dst_mac: [u8; 6],
    inner_ip: &[u8],
    ul_mac: [u8; 6],
) -> Vec<u8> {
    VxlanFrame {
        outer_dst_mac: ul_mac,
        outer_src_mac: PEER_UL_MAC,
        src_ip: src,
        dst_ip: OUR_IP,
        sport: 45678,
        dport: 8472,
        flags,
        vni,
        inner: eth(inner_dst_mac, PEER_VTEP, ETH_P_IP, inner_ip),
    }
    .build()
}

macro_rules! root_test {
    ($name:ident, $body:expr) => {
        #[test]
        #[ignore = "needs root; `cargo xtask test` runs it"]
        fn $name() {
            require_root();
            in_private_netns($body);
        }
    };
}

/// The counters that moved, by name.
fn nonzero(env: &Env) -> Vec<(&'static str, u64)> {
    env.dp
        .stats()
        .unwrap()
        .into_iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(s, c)| (s.name(), c.packets))
        .collect()
}

/// Exactly these counters moved, by exactly these numbers of packets.
fn assert_counters(env: &Env, want: &[(Stat, u64)], what: &str) {
    let want: Vec<(&str, u64)> = Stat::ALL
        .iter()
        .filter_map(|s| want.iter().find(|(w, _)| w == s))
        .map(|(s, n)| (s.name(), *n))
        .collect();
    assert_eq!(nonzero(env), want, "{what}: counters");
}

/// A SYN from the client (a pod of this node) to the ClusterIP.
fn syn_to_vip(sport: u16) -> Vec<u8> {
    let seg = tcp(CLIENT, VIP, sport, 80, 1000, 0, TCP_SYN, b"");
    eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg))
}

root_test!(encap_to_remote_pod_writes_flannel_vxlan, || {
    let mut env = setup();
    let inner_ip = ipv4(
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        17,
        0x02,
        &udp(40000, 53, b"query"),
    );
    let input = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &inner_ip);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(
        rc,
        TC_ACT_REDIRECT,
        "encapsulated packets are redirected to the underlay: {:?}",
        nonzero(&env)
    );
    assert_eq!(out.len(), input.len() + 50);
    let p = parse_vxlan(&out);
    assert_eq!(
        p.outer_dst_mac, PEER_UL_MAC,
        "next hop MAC from the neighbour table"
    );
    assert_eq!(p.outer_src_mac, env.ul_mac);
    assert_eq!((p.src_ip, p.dst_ip, p.ttl), (OUR_IP, PEER_IP, 64));
    assert_eq!(p.dport, 8472);
    assert!(
        (32768..=60999).contains(&p.sport),
        "source port {} in the local port range",
        p.sport
    );
    assert_eq!(p.udp_csum, 0, "zero UDP checksum is valid over IPv4");
    assert_eq!(p.vxlan, vxlan_hdr(0x08, 1), "flags I, VNI 1");
    let (inner_eth, rest) = Ethernet2Header::from_slice(&p.inner).unwrap();
    assert_eq!(
        inner_eth.destination, PEER_VTEP,
        "inner destination = receiver's VtepMAC"
    );
    assert_eq!(inner_eth.source, OUR_VTEP, "inner source = our VtepMAC");
    assert_eq!(inner_eth.ether_type.0, ETH_P_IP);
    assert_eq!(
        rest,
        &forwarded(&inner_ip)[..],
        "inner IPv4 packet untouched but for the TTL (the node routes it)"
    );
    assert_eq!(
        p.ecn, 0x02,
        "ECN of the inner packet copied to the outer header"
    );
    assert_counters(&env, &[(Stat::Encapsulated, 1)], "encap");

    // Same flow, same source port (ECMP/RSS stability); another flow may differ.
    let (_, out2) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(parse_vxlan(&out2).sport, p.sport);
});

root_test!(from_pod_passes_local_and_external_traffic_untouched, || {
    let mut env = setup();
    for dst in [
        Ipv4Addr::new(10, 244, 1, 9),
        Ipv4Addr::new(8, 8, 8, 8),
        Ipv4Addr::new(10, 244, 1, 1),
    ] {
        let input = pod_frame(CNI0_MAC, POD_MAC, Ipv4Addr::new(10, 244, 1, 5), dst, b"x");
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &input);
        assert_eq!(rc, TC_ACT_OK, "to {dst}");
        assert_eq!(out, input, "to {dst}: frame untouched");
    }
    let arp = eth([0xff; 6], POD_MAC, ETH_P_ARP, &[0u8; 28]);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &arp);
    assert_eq!((rc, out), (TC_ACT_OK, arp));
    // IPv6 (a bare header; BPF_PROG_TEST_RUN refuses an IPv4 frame too
    // short for its header, as the stack does).
    let mut ipv6 = [0u8; 40];
    ipv6[0] = 0x60;
    let ipv6 = eth(CNI0_MAC, POD_MAC, ETH_P_IPV6, &ipv6);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &ipv6);
    assert_eq!((rc, out), (TC_ACT_OK, ipv6));
    assert_counters(
        &env,
        &[(Stat::PassLocal, 3), (Stat::PassNotIpv4, 2)],
        "local, external, ARP, IPv6",
    );
});

root_test!(without_node_config_everything_passes_counted, || {
    // Loaded, but the agent has not written this node's configuration.
    let mut env = Env {
        dp: Dataplane::load_with(None).unwrap(),
        rec: Reconciler::new(),
        ul_mac: [2, 0, 0, 0, 0, 1],
        cfg: NodeConfig::default(),
        fronts: Frontends::new(),
    };
    let from_pod = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        b"x",
    );
    let vxlan = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner_pod_packet(), env.ul_mac);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_pod);
    assert_eq!((rc, out), (TC_ACT_OK, from_pod));
    let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &vxlan);
    assert_eq!((rc, &out), (TC_ACT_OK, &vxlan));
    let (rc, out) = run_xdp(&mut env, &vxlan);
    assert_eq!((rc, out), (XDP_PASS, vxlan), "XDP leaves counting to TC");
    assert_counters(&env, &[(Stat::PassNoConfig, 2)], "no config");
});

root_test!(from_pod_drops_cluster_traffic_without_a_lease, || {
    let mut env = setup();
    let input = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 9, 1),
        b"x",
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(rc, TC_ACT_SHOT);
    assert_counters(&env, &[(Stat::DropNoPeer, 1)], "no lease");
});

root_test!(rare_events_are_logged_only_when_asked, || {
    // As `dataplane agent --bpf-log` loads it, at the agent's default
    // level; records then flow only while the node config asks for them.
    log::set_max_level(log::LevelFilter::Info);
    let mut env = setup_with(true);
    // A peer whose PublicIP has no route: encapsulation fails at the FIB.
    env.rec
        .set_peers(
            env.dp.maps(),
            &peers(&[("10.244.3.0/24", Ipv4Addr::new(203, 0, 113, 9))]),
            Resync::Full,
        )
        .unwrap();
    let input = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 3, 7),
        b"x",
    );
    let log_records = |env: &mut Env| {
        let map = env.dp.ebpf_mut().map_mut("AYA_LOGS").expect("aya-log map");
        let mut ring = RingBuf::try_from(map).unwrap();
        let mut records = Vec::new();
        while let Some(r) = ring.next() {
            records.push(r.to_vec());
        }
        records
    };
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(rc, TC_ACT_SHOT);
    assert_counters(&env, &[(Stat::DropFib, 1)], "no route");
    assert!(log_records(&mut env).is_empty(), "nothing logged unasked");

    let cfg = NodeConfig {
        flags: env.cfg.flags | NODE_CFG_BPF_LOG,
        ..env.cfg
    };
    env.rec.set_node(env.dp.maps(), &cfg).unwrap();
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(rc, TC_ACT_SHOT);
    assert_counters(&env, &[(Stat::DropFib, 2)], "no route, logged");
    let records = log_records(&mut env);
    assert_eq!(records.len(), 1, "one record for one event");
    assert!(
        records[0].windows(8).any(|w| w == b"no route"),
        "the record says what happened: {:?}",
        String::from_utf8_lossy(&records[0])
    );

    // The fast path never logs, asked or not.
    let ok = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        b"x",
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &ok);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert!(
        log_records(&mut env).is_empty(),
        "encapsulation logs nothing"
    );
});

/// The aya-log records the programs wrote since the last call.
fn take_log_records(env: &mut Env) -> Vec<String> {
    let map = env.dp.ebpf_mut().map_mut("AYA_LOGS").expect("aya-log map");
    let mut ring = RingBuf::try_from(map).unwrap();
    let mut records = Vec::new();
    while let Some(r) = ring.next() {
        records.push(String::from_utf8_lossy(&r).into_owned());
    }
    records
}

/// Keeps this thread on one CPU: the counters that space out repeated
/// records are per CPU.
fn stay_on_one_cpu() {
    // SAFETY: a zeroed CPU set with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

root_test!(a_missing_config_is_logged_at_growing_intervals, || {
    stay_on_one_cpu();
    log::set_max_level(log::LevelFilter::Info);
    let mut env = setup_with(true);
    // As before the agent has written it: no READY bit.
    let cfg = NodeConfig {
        flags: 0,
        ..env.cfg
    };
    env.rec.set_node(env.dp.maps(), &cfg).unwrap();
    let input = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        b"x",
    );
    for _ in 0..5 {
        let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
        assert_eq!(rc, TC_ACT_OK, "passed untouched");
    }
    assert_counters(&env, &[(Stat::PassNoConfig, 5)], "no config");
    let records = take_log_records(&mut env);
    // The 1st, 2nd and 4th time, not every packet.
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(
        records.iter().all(|r| r.contains("no node config")),
        "{records:?}"
    );
    let ul = env.ul_mac;
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner_pod_packet(), ul),
    );
    assert_eq!(rc, TC_ACT_OK);
    assert!(
        take_log_records(&mut env).is_empty(),
        "the 6th packet is not logged"
    );
    // Loaded without --bpf-log (in a namespace of its own), the same
    // packet logs nothing.
    in_private_netns(move || {
        let mut quiet = setup_with(false);
        quiet.rec.set_node(quiet.dp.maps(), &cfg).unwrap();
        run_tc(&mut quiet, prog_names::FROM_POD, &input);
        assert_counters(&quiet, &[(Stat::PassNoConfig, 1)], "no config, quiet");
        assert!(take_log_records(&mut quiet).is_empty());
    });
});

root_test!(
    a_full_endpoint_map_is_counted_and_logged_not_per_packet,
    || {
        use dataplane::bpf::MapOp;
        use dataplane_common::{ENDPOINTS_MAX, EndpointInfo, EndpointKey};
        stay_on_one_cpu();
        log::set_max_level(log::LevelFilter::Info);
        let mut env = setup_with(true);
        let cfg = NodeConfig {
            flags: env.cfg.flags | NODE_CFG_BPF_LOG,
            ..env.cfg
        };
        env.rec.set_node(env.dp.maps(), &cfg).unwrap();
        for i in 0..ENDPOINTS_MAX {
            let key = EndpointKey {
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + i).octets(),
            };
            env.dp
                .maps()
                .apply(&MapOp::PutEndpoint(key, EndpointInfo::default()))
                .unwrap();
        }
        // A bridge pod not learnt yet, sending to a pod of this node: the
        // packet still goes its way (passed); the entry is not stored.
        let input = pod_frame(
            CNI0_MAC,
            POD_MAC,
            Ipv4Addr::new(10, 244, 1, 6),
            Ipv4Addr::new(10, 244, 1, 9),
            b"x",
        );
        for _ in 0..3 {
            let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
            assert_eq!(rc, TC_ACT_OK);
        }
        assert_counters(
            &env,
            &[(Stat::PassLocal, 3), (Stat::MapFull, 3)],
            "endpoints_v1 full",
        );
        let records = take_log_records(&mut env);
        assert_eq!(records.len(), 2, "1st and 2nd, not the 3rd: {records:?}");
        assert!(
            records
                .iter()
                .all(|r| r.contains("map full") && r.contains("endpoints_v1")),
            "{records:?}"
        );
    }
);

root_test!(tc_decap_delivers_vxlan_from_a_peer, || {
    let mut env = setup();
    let inner = inner_pod_packet();
    let input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, env.ul_mac);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
    assert_eq!(rc, TC_ACT_REDIRECT, "redirected to the pod bridge");
    assert_eq!(out.len(), input.len() - 50);
    let (e, rest) = Ethernet2Header::from_slice(&out).unwrap();
    assert_eq!(e.ether_type.0, ETH_P_IP);
    assert_eq!(
        rest,
        &forwarded(&inner)[..],
        "inner IPv4 packet behind an Ethernet header, one hop further"
    );
    assert_counters(&env, &[(Stat::Decapsulated, 1)], "decap");
});

root_test!(tc_decap_rejects_bad_vxlan_and_passes_the_rest, || {
    let mut env = setup();
    let inner = inner_pod_packet();
    let ul = env.ul_mac;
    let cases: Vec<(&str, Vec<u8>, u32, Option<Stat>)> = vec![
        (
            "wrong VNI",
            vxlan_from(PEER_IP, 0x08, 2, OUR_VTEP, &inner, ul),
            TC_ACT_SHOT,
            Some(Stat::DropWrongVni),
        ),
        (
            "unknown sender",
            vxlan_from(STRANGER_IP, 0x08, 1, OUR_VTEP, &inner, ul),
            TC_ACT_SHOT,
            Some(Stat::DropUnknownPeer),
        ),
        (
            "bad flags",
            vxlan_from(PEER_IP, 0x0c, 1, OUR_VTEP, &inner, ul),
            TC_ACT_SHOT,
            Some(Stat::DropBadVxlanFlags),
        ),
        (
            "other VtepMAC",
            vxlan_from(PEER_IP, 0x08, 1, [2, 9, 9, 9, 9, 9], &inner, ul),
            TC_ACT_SHOT,
            Some(Stat::DropWrongVtepMac),
        ),
        (
            "inner not local",
            vxlan_from(
                PEER_IP,
                0x08,
                1,
                OUR_VTEP,
                &ipv4(
                    Ipv4Addr::new(10, 244, 2, 7),
                    Ipv4Addr::new(10, 244, 3, 5),
                    17,
                    0,
                    &udp(1, 2, b"x"),
                ),
                ul,
            ),
            TC_ACT_SHOT,
            Some(Stat::DropInnerNotLocal),
        ),
        (
            "inner ARP",
            VxlanFrame {
                outer_dst_mac: ul,
                outer_src_mac: PEER_UL_MAC,
                src_ip: PEER_IP,
                dst_ip: OUR_IP,
                sport: 1,
                dport: 8472,
                flags: 0x08,
                vni: 1,
                inner: eth(OUR_VTEP, PEER_VTEP, ETH_P_ARP, &[0u8; 28]),
            }
            .build(),
            TC_ACT_SHOT,
            Some(Stat::DropInnerNotIpv4),
        ),
    ];
    for (what, input, want, stat_want) in cases {
        let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
        assert_eq!(rc, want, "{what}");
        if let Some(s) = stat_want {
            assert_eq!(stat(&env, s), 1, "{what}: counted as {s:?}");
        }
    }
    // Truncated: VXLAN header cut short (4 of its 8 bytes).
    let cut = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(
            PEER_IP,
            OUR_IP,
            17,
            0,
            &udp(45678, 8472, &vxlan_hdr(0x08, 1)[..4]),
        ),
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &cut);
    assert_eq!(rc, TC_ACT_SHOT, "truncated VXLAN");
    assert_eq!(stat(&env, Stat::DropTruncated), 1);

    // Not ours: other UDP port, other destination, TCP. Untouched.
    let other_port = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(PEER_IP, OUR_IP, 17, 0, &udp(1, 4789, &vxlan_hdr(0x08, 1))),
    );
    let other_dst = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(PEER_IP, STRANGER_IP, 17, 0, &udp(1, 8472, &[0; 40])),
    );
    let tcp = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(PEER_IP, OUR_IP, 6, 0, &[0u8; 20]),
    );
    for (what, input) in [
        ("other port", other_port),
        ("other dst", other_dst),
        ("tcp", tcp),
    ] {
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
        assert_eq!((rc, &out), (TC_ACT_OK, &input), "{what} passes untouched");
    }
    assert_counters(
        &env,
        &[
            (Stat::PassNotOverlay, 3),
            (Stat::DropUnknownPeer, 1),
            (Stat::DropWrongVni, 1),
            (Stat::DropBadVxlanFlags, 1),
            (Stat::DropTruncated, 1),
            (Stat::DropInnerNotIpv4, 1),
            (Stat::DropInnerNotLocal, 1),
            (Stat::DropWrongVtepMac, 1),
        ],
        "each frame under its own reason",
    );
});

root_test!(xdp_decap_strips_vxlan_and_drops_bad, || {
    let mut env = setup();
    let inner = inner_pod_packet();
    let ul = env.ul_mac;
    let input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, ul);
    let (rc, out) = run_xdp(&mut env, &input);
    assert_eq!(rc, XDP_PASS);
    // BPF_PROG_TEST_RUN returns the metadata in front of the frame.
    assert_eq!(
        &out[0..4],
        &dataplane_common::XDP_META_DECAPPED.to_ne_bytes(),
        "marker for the TC program"
    );
    let (e, rest) = Ethernet2Header::from_slice(&out[4..]).unwrap();
    assert_eq!(
        e.destination, ul,
        "inner frame readdressed to the underlay interface"
    );
    assert_eq!(e.source, PEER_VTEP);
    assert_eq!(rest, &inner[..]);
    assert_eq!(stat(&env, Stat::Decapsulated), 1);

    // For the node itself (the bridge address): decapsulated, passed up,
    // marked so that from_underlay does not count it again.
    let to_host = ipv4(
        Ipv4Addr::new(10, 244, 2, 7),
        Ipv4Addr::new(10, 244, 1, 1),
        17,
        0,
        &udp(1234, 80, b"to the node"),
    );
    let (rc, out) = run_xdp(
        &mut env,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &to_host, ul),
    );
    assert_eq!(rc, XDP_PASS);
    assert_eq!(
        &out[0..4],
        &dataplane_common::XDP_META_TO_HOST.to_ne_bytes()
    );
    assert_eq!(&out[4 + 14..], &to_host[..]);
    assert_eq!(stat(&env, Stat::PassToHost), 1);

    let (rc, _) = run_xdp(
        &mut env,
        &vxlan_from(PEER_IP, 0x08, 7, OUR_VTEP, &inner, ul),
    );
    assert_eq!(rc, XDP_DROP, "wrong VNI");
    let (rc, _) = run_xdp(
        &mut env,
        &vxlan_from(STRANGER_IP, 0x08, 1, OUR_VTEP, &inner, ul),
    );
    assert_eq!(rc, XDP_DROP, "unknown sender");
    let plain = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(PEER_IP, OUR_IP, 6, 0, &[0u8; 20]),
    );
    let (rc, out) = run_xdp(&mut env, &plain);
    assert_eq!((rc, out), (XDP_PASS, plain), "non-VXLAN passes untouched");
    assert_counters(
        &env,
        &[
            (Stat::Decapsulated, 1),
            (Stat::PassToHost, 1),
            (Stat::DropUnknownPeer, 1),
            (Stat::DropWrongVni, 1),
        ],
        "XDP (non-VXLAN left to TC)",
    );
});

/// A UDP packet from `src` to a pod of this node, with ECN bits `ecn`.
fn inner_from(src: Ipv4Addr, ecn: u8) -> Vec<u8> {
    ipv4(
        src,
        Ipv4Addr::new(10, 244, 1, 5),
        17,
        ecn,
        &udp(1234, 80, b"inner"),
    )
}

root_test!(decap_drops_inner_sources_outside_the_senders_lease, || {
    let mut env = setup();
    // A second peer, 10.244.3.0/24 at STRANGER_IP.
    let more = peers(&[("10.244.3.0/24", STRANGER_IP)]);
    env.rec
        .set_peers(env.dp.maps(), &more, Resync::Incremental)
        .unwrap();
    let ul = env.ul_mac;
    let other_nodes_pod = inner_from(Ipv4Addr::new(10, 244, 3, 7), 0);
    let nobodys = inner_from(Ipv4Addr::new(10, 250, 0, 1), 0);
    // PEER_IP speaking for STRANGER_IP's pod, or for an address no lease
    // covers: dropped, in TC and in XDP.
    for inner in [&other_nodes_pod, &nobodys] {
        let input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, inner, ul);
        let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
        assert_eq!(rc, TC_ACT_SHOT, "TC: forged inner source");
        let (rc, _) = run_xdp(&mut env, &input);
        assert_eq!(rc, XDP_DROP, "XDP: forged inner source");
    }
    // The pod's own node may send it, and so may PEER_IP for its pods.
    let input = vxlan_from(STRANGER_IP, 0x08, 1, OUR_VTEP, &other_nodes_pod, ul);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
    assert_eq!(rc, TC_ACT_REDIRECT, "TC: the sender's own pod");
    let input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner_pod_packet(), ul);
    let (rc, _) = run_xdp(&mut env, &input);
    assert_eq!(rc, XDP_PASS, "XDP: the sender's own pod");
    assert_counters(
        &env,
        &[(Stat::Decapsulated, 2), (Stat::DropInnerSrcNotSender, 4)],
        "inner source check",
    );
});

root_test!(
    decap_copies_congestion_experienced_to_the_inner_header,
    || {
        let mut env = setup();
        let ul = env.ul_mac;
        let src = Ipv4Addr::new(10, 244, 2, 7);
        // (inner ECN, outer ECN) -> inner ECN after decapsulation (RFC 6040
        // section 4.2); None: dropped.
        let cases: [(u8, u8, Option<u8>); 6] = [
            (ECN_ECT0, ECN_CE, Some(ECN_CE)),
            (ECN_ECT1, ECN_CE, Some(ECN_CE)),
            (ECN_CE, ECN_CE, Some(ECN_CE)),
            (ECN_ECT0, ECN_ECT0, Some(ECN_ECT0)),
            (ECN_NOT_ECT, ECN_ECT0, Some(ECN_NOT_ECT)),
            (ECN_NOT_ECT, ECN_CE, None),
        ];
        let mut decapped = 0;
        for (inner_ecn, outer_ecn, want) in cases {
            let inner = inner_from(src, inner_ecn);
            let mut input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, ul);
            set_outer_ecn(&mut input, outer_ecn);
            let what = format!("inner {inner_ecn}, outer {outer_ecn}");
            let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
            let (xrc, xout) = run_xdp(&mut env, &input);
            match want {
                None => {
                    assert_eq!(rc, TC_ACT_SHOT, "TC {what}");
                    assert_eq!(xrc, XDP_DROP, "XDP {what}");
                }
                Some(ecn) => {
                    decapped += 2;
                    assert_eq!(rc, TC_ACT_REDIRECT, "TC {what}");
                    assert_eq!(xrc, XDP_PASS, "XDP {what}");
                    // XDP: 4 bytes of metadata in front.
                    // XDP leaves the TTL to the TC program that delivers.
                    for (path, ip, hops) in [("TC", &out[14..], 1), ("XDP", &xout[4 + 14..], 0)] {
                        assert!(ipv4_checksums_ok(ip), "{path} {what}: inner checksum");
                        assert_eq!(ip[1] & 0x03, ecn, "{path} {what}: inner ECN");
                        assert_eq!(ip[1] & !0x03, 0, "{path} {what}: DSCP kept");
                        assert_eq!(&ip[2..8], &inner[2..8], "{path} {what}: rest untouched");
                        assert_eq!(ip[8], inner[8] - hops, "{path} {what}: TTL");
                        assert_eq!(ip[9], inner[9], "{path} {what}: rest untouched");
                        assert_eq!(&ip[12..], &inner[12..], "{path} {what}: rest untouched");
                    }
                }
            }
        }
        assert_counters(
            &env,
            &[(Stat::Decapsulated, decapped), (Stat::DropCeNotEct, 2)],
            "ECN",
        );
    }
);

root_test!(peer_removal_stops_encap_and_decap, || {
    let mut env = setup();
    env.rec
        .set_peers(env.dp.maps(), &Default::default(), Resync::Incremental)
        .unwrap();
    let input = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 2, 7),
        b"x",
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
    assert_eq!(rc, TC_ACT_SHOT);
    let ul = env.ul_mac;
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner_pod_packet(), ul),
    );
    assert_eq!(
        rc, TC_ACT_SHOT,
        "a node whose lease is gone is an unknown sender"
    );
});

// ---- ClusterIP services ----

use dataplane_common::{Backend, SvcKey};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

fn svc_key(port: u16, proto: u8) -> SvcKey {
    SvcKey {
        vip: VIP.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

fn backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        ip: ip.octets(),
        port: port.to_be_bytes(),
        _pad: [0; 2],
    }
}

/// Programs one frontend of the test Service (its others stay).
fn set_frontend(env: &mut Env, key: SvcKey, backends: Vec<Backend>) {
    env.fronts.insert(
        key,
        FrontendState {
            backends,
            affinity_timeout_s: None,
            north_south: None,
            empty_drops: false,
        },
    );
    let name = ServiceName::new("default", "test");
    env.rec
        .set_service(env.dp.maps(), &name, &env.fronts)
        .unwrap();
}

root_test!(service_dnat_to_remote_backend_then_encap, || {
    let mut env = setup();
    let b = backend(Ipv4Addr::new(10, 244, 2, 7), 8080);
    set_frontend(&mut env, svc_key(80, 6), vec![b]);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40001));
    assert_eq!(rc, TC_ACT_REDIRECT);
    // Checksums are verified while parsing.
    let inner = parse_vxlan(&out).inner_ipv4();
    assert_eq!(
        inner.dst(),
        Ipv4Addr::new(10, 244, 2, 7),
        "DNAT to the backend"
    );
    assert_eq!(inner.tcp().destination_port, 8080, "backend port");
    assert_eq!(inner.src(), CLIENT, "source kept");
    assert_counters(
        &env,
        &[(Stat::Encapsulated, 1), (Stat::SvcForward, 1)],
        "translated, then encapsulated",
    );

    // The reply from the backend, arriving decapsulated on the underlay,
    // goes back to the client from the ClusterIP.
    let reply_seg = tcp(
        Ipv4Addr::new(10, 244, 2, 7),
        CLIENT,
        8080,
        40001,
        5000,
        1001,
        TCP_SYN | TCP_ACK,
        b"",
    );
    let reply_ip = ipv4(Ipv4Addr::new(10, 244, 2, 7), CLIENT, 6, 0, &reply_seg);
    let ul = env.ul_mac;
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &reply_ip, ul),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let (_, reply) = parse_eth_ipv4(&out);
    assert_eq!(reply.src(), VIP, "reply source is the ClusterIP");
    assert_eq!(
        reply.tcp().source_port,
        80,
        "reply source port is the service port"
    );
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 1),
            (Stat::Decapsulated, 1),
            (Stat::SvcForward, 1),
            (Stat::SvcReverse, 1),
        ],
        "reply translated back, then delivered",
    );
});

root_test!(
    service_without_backends_rejects_tcp_with_rst_and_udp_with_icmp,
    || {
        let mut env = setup();
        set_frontend(&mut env, svc_key(80, 6), vec![]);
        set_frontend(&mut env, svc_key(53, 17), vec![]);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40002));
        assert_eq!(rc, TC_ACT_REDIRECT, "the RST goes straight back to the pod");
        let (e, rst) = parse_eth_ipv4(&out);
        assert_eq!(e.destination, POD_MAC);
        assert_eq!((rst.src(), rst.dst()), (VIP, CLIENT));
        let t = rst.tcp();
        assert!(t.rst && t.ack, "RST+ACK");
        assert_eq!(t.acknowledgment_number, 1001, "acknowledges the SYN");
        assert_eq!((t.source_port, t.destination_port), (80, 40002));
        assert_eq!(stat(&env, Stat::SvcRejectNoBackend), 1);

        let q = udp_csum(CLIENT, VIP, 5353, 53, b"query");
        let query = ipv4(CLIENT, VIP, 17, 0, &q);
        let input = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &query);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &input);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (_, icmp) = parse_eth_ipv4(&out);
        assert_eq!((icmp.src(), icmp.dst()), (VIP, CLIENT));
        assert_eq!(
            icmp.icmp().icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
            "ICMP port unreachable"
        );
        assert_eq!(
            icmp.payload,
            &query[..28],
            "quotes the original IPv4 header and 8 bytes"
        );
        assert_eq!(stat(&env, Stat::SvcRejectNoBackend), 2);

        // With IPv4 options there is no rejection to build: dropped, and
        // counted as that, not as a rejection.
        let mut h = ipv4_header(CLIENT, VIP, 17, 0, q.len());
        h.options = [1, 1, 1, 1].into(); // four NOPs
        let input = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4_with(h, &q));
        let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &input);
        assert_eq!(rc, TC_ACT_SHOT);
        assert_counters(
            &env,
            &[(Stat::SvcRejectNoBackend, 2), (Stat::DropRejectFailed, 1)],
            "rejections",
        );
    }
);

root_test!(service_undefined_port_and_midflow_without_conntrack, || {
    let mut env = setup();
    let b = backend(Ipv4Addr::new(10, 244, 2, 7), 8080);
    set_frontend(&mut env, svc_key(80, 6), vec![b]);
    // Port 81, UDP/80 and ICMP are not defined: dropped, not forwarded raw.
    let seg = tcp(CLIENT, VIP, 40003, 81, 1, 0, TCP_SYN, b"");
    let u = udp_csum(CLIENT, VIP, 40003, 80, b"x");
    let ping = [8, 0, 0xf7, 0xff, 0, 0, 0, 0]; // echo request, checksum included
    for (what, ip) in [
        ("TCP/81", ipv4(CLIENT, VIP, 6, 0, &seg)),
        ("UDP/80", ipv4(CLIENT, VIP, 17, 0, &u)),
        ("ICMP", ipv4(CLIENT, VIP, IpNumber::ICMP.0, 0, &ping)),
    ] {
        let (rc, _) = run_tc(
            &mut env,
            prog_names::FROM_POD,
            &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ip),
        );
        assert_eq!(rc, TC_ACT_SHOT, "{what}");
    }
    assert_eq!(stat(&env, Stat::DropSvcUndefinedPort), 3);
    // TCP to the ClusterIP cut short before its ports: dropped as
    // malformed (fragments are handled, see `fragments_*`).
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(
            CNI0_MAC,
            POD_MAC,
            ETH_P_IP,
            &ipv4(CLIENT, VIP, 6, 0, &[0x9c, 0x43]),
        ),
    );
    assert_eq!(rc, TC_ACT_SHOT, "cut short");
    assert_eq!(stat(&env, Stat::DropSvcMalformed), 1);
    // Without a tracked flow, an ACK is picked up (nf_conntrack_tcp_loose)
    // and translated; a RST or FIN is INVALID and dropped, never answered.
    let seg = tcp(CLIENT, VIP, 40004, 80, 1, 77, TCP_ACK, b"data");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let inner = parse_vxlan(&out).inner_ipv4();
    assert_eq!(
        inner.dst(),
        Ipv4Addr::new(10, 244, 2, 7),
        "picked up, DNATed"
    );
    assert!(!inner.tcp().rst);
    for (sport, flags) in [
        (40005, TCP_RST),
        (40006, TCP_RST | TCP_ACK),
        (40007, TCP_FIN | TCP_ACK),
    ] {
        let seg = tcp(CLIENT, VIP, sport, 80, 1, 77, flags, b"");
        let (rc, _) = run_tc(
            &mut env,
            prog_names::FROM_POD,
            &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
        );
        assert_eq!(rc, TC_ACT_SHOT, "flags {flags:#x} without a flow");
    }
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 1),
            (Stat::SvcForward, 1),
            (Stat::DropSvcUndefinedPort, 3),
            (Stat::DropSvcMalformed, 1),
            (Stat::SvcCtPickup, 1),
            (Stat::DropCtInvalid, 3),
        ],
        "ClusterIP without a matching frontend or flow",
    );
    let flows = env.dp.maps().conntrack().unwrap().flows().unwrap();
    assert_eq!(flows.len(), 1, "only the picked-up flow is tracked");
    assert_eq!(flows[0].entry.state, CtState::Established as u8);
    assert_ne!(flows[0].entry.flags & CT_F_PICKED_UP, 0);
});

root_test!(service_local_backend_and_hairpin, || {
    let mut env = setup();
    // The client itself is the only backend: hairpin, source rewritten.
    let b = backend(CLIENT, 8080);
    set_frontend(&mut env, svc_key(80, 6), vec![b]);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40005));
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "local backends are handed to the bridge"
    );
    assert_counters(
        &env,
        &[(Stat::SvcForward, 1), (Stat::RedirectToBridge, 1)],
        "to a local backend",
    );
    // The backend answers the hairpin address; it goes back as VIP -> client.
    let hp = Ipv4Addr::from(dataplane_common::HAIRPIN_SNAT_IP);
    let seg = tcp(CLIENT, hp, 8080, 40005, 9, 1001, TCP_SYN | TCP_ACK, b"");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, hp, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let (_, reply) = parse_eth_ipv4(&out);
    assert_eq!((reply.src(), reply.dst()), (VIP, CLIENT));
    let t = reply.tcp();
    assert_eq!((t.source_port, t.destination_port), (80, 40005));
    assert_counters(
        &env,
        &[
            (Stat::SvcForward, 1),
            (Stat::SvcReverse, 1),
            (Stat::RedirectToBridge, 2),
        ],
        "and back",
    );
});

root_test!(decap_delivers_straight_to_a_learnt_pod, || {
    let mut env = setup();
    // Before the pod has sent anything: through the bridge (kernel fills L2).
    let inner = inner_pod_packet();
    let ul = env.ul_mac;
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, ul),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_ne!(&out[0..6], &POD_MAC);
    // The pod 10.244.1.5 sends a packet: from_pod learns its MAC and port.
    let input = pod_frame(
        CNI0_MAC,
        POD_MAC,
        Ipv4Addr::new(10, 244, 1, 5),
        Ipv4Addr::new(10, 244, 1, 9),
        b"x",
    );
    run_tc(&mut env, prog_names::FROM_POD, &input);
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, ul),
    );
    assert_eq!(rc, TC_ACT_REDIRECT, "redirected into the pod");
    let (e, rest) = Ethernet2Header::from_slice(&out).unwrap();
    assert_eq!(e.destination, POD_MAC, "to the pod's MAC");
    assert_eq!(e.source, CNI0_MAC, "from its gateway's MAC");
    assert_eq!(rest, &forwarded(&inner)[..]);
});

root_test!(removed_backend_flows_die_at_their_next_packet, || {
    let mut env = setup();
    let (a, b) = (
        backend(Ipv4Addr::new(10, 244, 2, 7), 8080),
        backend(Ipv4Addr::new(10, 244, 2, 8), 8080),
    );
    let udp_key = svc_key(53, 17);
    set_frontend(&mut env, svc_key(80, 6), vec![a]);
    set_frontend(&mut env, udp_key, vec![a]);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40010));
    assert_eq!(rc, TC_ACT_REDIRECT);
    let q = udp_csum(CLIENT, VIP, 40011, 53, b"q");
    let udp_frame = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 17, 0, &q));
    let (_, out) = run_tc(&mut env, prog_names::FROM_POD, &udp_frame);
    assert_eq!(
        parse_vxlan(&out).inner_ipv4().dst(),
        Ipv4Addr::new(10, 244, 2, 7)
    );
    // Backend a goes, b comes: no conntrack scan, one live_v1 delete.
    for k in [svc_key(80, 6), udp_key] {
        set_frontend(&mut env, k, vec![b]);
    }
    // The TCP flow's next segment is reset...
    let seg = tcp(CLIENT, VIP, 40010, 80, 1001, 5001, TCP_ACK, b"more");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert!(
        parse_eth_ipv4(&out).1.tcp().rst,
        "RST for a flow whose backend is gone"
    );
    // ...and the UDP flow's next datagram goes to the live backend.
    let (_, out) = run_tc(&mut env, prog_names::FROM_POD, &udp_frame);
    assert_eq!(
        parse_vxlan(&out).inner_ipv4().dst(),
        Ipv4Addr::new(10, 244, 2, 8),
        "UDP re-balanced at once"
    );
});

// ---------------------------------------------------- conntrack lifecycle

use dataplane::{
    bpf::{CtTable, MapOp, ct::monotonic_ns},
    conntrack::Sweeper,
};
use dataplane_common::ct::CtGc;

/// A backend on this node's bridge.
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
const BACKEND_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 9];

/// A TCP segment from the client to the ClusterIP, through from_pod.
fn client_seg(env: &mut Env, sport: u16, flags: u8) -> (u32, Vec<u8>) {
    let seg = tcp(CLIENT, VIP, sport, 80, 1000, 1, flags, b"");
    let f = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg));
    run_tc(env, prog_names::FROM_POD, &f)
}

/// A TCP segment from the local backend to the client, through from_pod.
fn backend_seg(env: &mut Env, sport: u16, flags: u8) -> (u32, Vec<u8>) {
    let seg = tcp(LOCAL_BACKEND, CLIENT, 8080, sport, 5000, 1001, flags, b"");
    let f = eth(
        CNI0_MAC,
        BACKEND_MAC,
        ETH_P_IP,
        &ipv4(LOCAL_BACKEND, CLIENT, 6, 0, &seg),
    );
    run_tc(env, prog_names::FROM_POD, &f)
}

fn table(env: &mut Env) -> CtTable {
    env.dp.maps().conntrack().unwrap()
}

/// The entry of the client's flow from `sport`, if any.
fn flow_of(env: &mut Env, sport: u16) -> Option<dataplane_common::CtEntry> {
    table(env)
        .flows()
        .unwrap()
        .into_iter()
        .find(|f| f.key.sport == sport.to_be_bytes())
        .map(|f| f.entry)
}

fn state_of(env: &mut Env, sport: u16) -> Option<CtState> {
    flow_of(env, sport).and_then(|e| CtState::from_u8(e.state))
}

fn set_timeouts(env: &mut Env, t: CtTimeouts) {
    env.dp.maps().apply(&MapOp::CtConfig(t)).unwrap();
}

root_test!(tcp_flow_walks_its_states_and_a_syn_reopens_it, || {
    let mut env = setup();
    set_frontend(&mut env, svc_key(80, 6), vec![backend(LOCAL_BACKEND, 8080)]);
    let p = 41000;
    let steps: &[(bool, u8, CtState)] = &[
        (true, TCP_SYN, CtState::SynSent),
        (false, TCP_SYN | TCP_ACK, CtState::SynRecv),
        (true, TCP_ACK, CtState::Established),
        (true, TCP_FIN | TCP_ACK, CtState::FinWait),
        (false, TCP_ACK, CtState::CloseWait),
        (false, TCP_FIN | TCP_ACK, CtState::TimeWait),
        (true, TCP_ACK, CtState::TimeWait),
    ];
    for &(from_client, flags, want) in steps {
        let (rc, out) = if from_client {
            client_seg(&mut env, p, flags)
        } else {
            backend_seg(&mut env, p, flags)
        };
        assert_eq!(rc, TC_ACT_REDIRECT, "{flags:#x} handed to the bridge");
        let (_, ip) = parse_eth_ipv4(&out);
        if from_client {
            assert_eq!(ip.dst(), LOCAL_BACKEND);
        } else {
            assert_eq!((ip.src(), ip.tcp().source_port), (VIP, 80), "reverse NAT");
        }
        assert_eq!(state_of(&mut env, p), Some(want), "after {flags:#x}");
    }
    let closed = flow_of(&mut env, p).unwrap();
    assert_eq!(
        closed.flags & CT_F_SEEN_REPLY,
        CT_F_SEEN_REPLY,
        "the backend was seen"
    );
    // The tuple reused by a new connection: a new flow, not the old one.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (rc, _) = client_seg(&mut env, p, TCP_SYN);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let reopened = flow_of(&mut env, p).unwrap();
    assert_eq!(CtState::from_u8(reopened.state), Some(CtState::SynSent));
    assert!(reopened.created_ns > closed.created_ns, "a new entry");
    // A RST from either side closes.
    backend_seg(&mut env, p, TCP_RST | TCP_ACK);
    assert_eq!(state_of(&mut env, p), Some(CtState::Close));
    // One flow, one reverse entry: nothing left of the first one.
    assert_eq!(table(&mut env).reverse_entries().unwrap().len(), 1);
});

root_test!(
    expired_flows_are_absent_and_their_replies_untranslated,
    || {
        let mut env = setup();
        set_frontend(&mut env, svc_key(80, 6), vec![backend(LOCAL_BACKEND, 8080)]);
        set_timeouts(
            &mut env,
            CtTimeouts {
                tcp_syn_sent: 1,
                ..CtTimeouts::DEFAULT
            },
        );
        let p = 41100;
        client_seg(&mut env, p, TCP_SYN);
        assert_eq!(state_of(&mut env, p), Some(CtState::SynSent));
        std::thread::sleep(std::time::Duration::from_millis(2100));
        // Still in the map (nobody swept), but expired: the backend's late
        // SYN-ACK is not a Service reply any more and goes as it is.
        assert!(flow_of(&mut env, p).is_some());
        let (rc, _) = backend_seg(&mut env, p, TCP_SYN | TCP_ACK);
        assert_eq!(rc, TC_ACT_OK, "passed untranslated");
        assert_eq!(stat(&env, Stat::SvcReverse), 0);
        // The client's next segment finds no live flow: picked up anew.
        let (rc, _) = client_seg(&mut env, p, TCP_ACK);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(stat(&env, Stat::SvcCtPickup), 1);
        assert_eq!(state_of(&mut env, p), Some(CtState::Established));
        // The sweeper takes what expired, both directions.
        set_timeouts(
            &mut env,
            CtTimeouts {
                tcp_established: 1,
                ..CtTimeouts::DEFAULT
            },
        );
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let t = table(&mut env);
        let timeouts = t.timeouts().unwrap();
        let mut sweeper = Sweeper::new(t, timeouts);
        let r = sweeper.sweep(monotonic_ns()).unwrap();
        assert_eq!((r.flows, r.expired), (1, 1));
        assert_eq!(table(&mut env).flows().unwrap().len(), 0);
        assert_eq!(table(&mut env).reverse_entries().unwrap().len(), 0);
        let gc = table(&mut env).gc_counters().unwrap();
        assert!(gc.contains(&(CtGc::Expired, 1)), "{gc:?}");
    }
);

root_test!(udp_is_unreplied_until_the_backend_answers, || {
    let mut env = setup();
    set_frontend(
        &mut env,
        svc_key(53, 17),
        vec![backend(LOCAL_BACKEND, 5353)],
    );
    let q = udp_csum(CLIENT, VIP, 41200, 53, b"q");
    let f = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 17, 0, &q));
    assert_eq!(
        run_tc(&mut env, prog_names::FROM_POD, &f).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(state_of(&mut env, 41200), Some(CtState::UdpUnreplied));
    let a = udp_csum(LOCAL_BACKEND, CLIENT, 5353, 41200, b"a");
    let f = eth(
        CNI0_MAC,
        BACKEND_MAC,
        ETH_P_IP,
        &ipv4(LOCAL_BACKEND, CLIENT, 17, 0, &a),
    );
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &f);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(parse_eth_ipv4(&out).1.src(), VIP);
    assert_eq!(state_of(&mut env, 41200), Some(CtState::UdpReplied));
});

root_test!(
    a_full_table_drops_new_flows_and_early_drop_spares_established_ones,
    || {
        let mut env = setup_ct(16);
        set_frontend(&mut env, svc_key(80, 6), vec![backend(LOCAL_BACKEND, 8080)]);
        // 4 established flows, 12 unanswered SYNs: full.
        for p in 42000..42004 {
            client_seg(&mut env, p, TCP_SYN);
            backend_seg(&mut env, p, TCP_SYN | TCP_ACK);
            client_seg(&mut env, p, TCP_ACK);
            assert_eq!(state_of(&mut env, p), Some(CtState::Established));
        }
        for p in 42100..42112 {
            assert_eq!(client_seg(&mut env, p, TCP_SYN).0, TC_ACT_REDIRECT);
        }
        // The 17th flow loses (dropped, as netfilter does); nothing of it is
        // left behind, and the established flows go on.
        assert_eq!(client_seg(&mut env, 42200, TCP_SYN).0, TC_ACT_SHOT);
        assert_eq!(stat(&env, Stat::DropCtFull), 1);
        assert_eq!(flow_of(&mut env, 42200), None);
        assert_eq!(table(&mut env).reverse_entries().unwrap().len(), 16);
        assert_eq!(client_seg(&mut env, 42000, TCP_ACK).0, TC_ACT_REDIRECT);
        // The sweeper makes room (16 of 16 > 90%: down to 13), taking
        // unanswered flows, never established ones.
        let t = table(&mut env);
        let mut sweeper = Sweeper::new(t, CtTimeouts::DEFAULT);
        let r = sweeper.sweep(monotonic_ns()).unwrap();
        assert_eq!((r.expired, r.early_dropped), (0, 3));
        for p in 42000..42004 {
            assert_eq!(
                state_of(&mut env, p),
                Some(CtState::Established),
                "{p} kept"
            );
        }
        assert_eq!(table(&mut env).flows().unwrap().len(), 13);
        assert_eq!(table(&mut env).reverse_entries().unwrap().len(), 13);
        assert_eq!(
            client_seg(&mut env, 42200, TCP_SYN).0,
            TC_ACT_REDIRECT,
            "room again"
        );
        let gc = table(&mut env).gc_counters().unwrap();
        assert!(gc.contains(&(CtGc::EarlyDrop, 3)), "{gc:?}");
    }
);

root_test!(
    without_endpoints_new_segments_are_rejected_invalid_ones_dropped,
    || {
        let mut env = setup();
        set_frontend(&mut env, svc_key(80, 6), vec![]);
        // kube-proxy: INVALID is dropped, REJECT answers what conntrack calls
        // NEW (a SYN, or an ACK it would pick up).
        for flags in [TCP_SYN, TCP_ACK] {
            let (rc, out) = client_seg(&mut env, 44000, flags);
            assert_eq!(rc, TC_ACT_REDIRECT, "{flags:#x} rejected");
            assert!(parse_eth_ipv4(&out).1.tcp().rst);
        }
        for flags in [TCP_RST, TCP_FIN | TCP_ACK, TCP_SYN | TCP_ACK] {
            assert_eq!(
                client_seg(&mut env, 44000, flags).0,
                TC_ACT_SHOT,
                "{flags:#x}"
            );
        }
        assert_counters(
            &env,
            &[(Stat::SvcRejectNoBackend, 2), (Stat::DropCtInvalid, 3)],
            "no endpoints",
        );
        assert!(table(&mut env).flows().unwrap().is_empty());
    }
);

// ---------------------------------------------------------------- CNI pods

/// MAC of a CNI pod's host-side device (its gateway's MAC).
const HOST_DEV_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 1];

/// Registers CNI pods `(ip, mac, host ifindex)` as the agent does. The
/// skb of BPF_PROG_TEST_RUN is on lo: ifindex 1 is "the port a frame
/// comes in on".
fn register_pods(env: &mut Env, pods: &[(Ipv4Addr, [u8; 6], u32)]) {
    use dataplane::reconcile::{PodEntry, Pods};
    use dataplane_common::{EndpointInfo, PodPortInfo};
    let want: Pods = pods
        .iter()
        .map(|&(ip, mac, ifindex)| {
            (
                ip.octets(),
                PodEntry {
                    endpoint: EndpointInfo {
                        ifindex,
                        mac,
                        gw_mac: HOST_DEV_MAC,
                    },
                    port: PodPortInfo {
                        ip: ip.octets(),
                        mac,
                        _pad: [0; 2],
                    },
                },
            )
        })
        .collect();
    env.rec.set_pods(env.dp.maps(), &want).unwrap();
}

fn endpoint_of(env: &mut Env, ip: Ipv4Addr) -> Option<dataplane_common::EndpointInfo> {
    env.dp
        .maps()
        .endpoint_entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.ip == ip.octets())
        .map(|(_, v)| v)
}

/// An Ethernet/IPv4 ARP request from (`sha`, `spa`) for `tpa`.
fn arp(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&tpa.octets());
    eth([0xff; 6], sha, ETH_P_ARP, &p)
}

root_test!(cni_pod_port_drops_spoofed_frames_and_learns_nothing, || {
    let mut env = setup();
    register_pods(&mut env, &[(CLIENT, POD_MAC, 1)]);
    let remote = Ipv4Addr::new(10, 244, 2, 7);
    let gw = Ipv4Addr::new(10, 244, 1, 1);
    // Its own addresses: encapsulated as usual; ARP passes.
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &pod_frame(HOST_DEV_MAC, POD_MAC, CLIENT, remote, b"ok"),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &arp(POD_MAC, CLIENT, gw));
    assert_eq!(rc, TC_ACT_OK);
    assert_counters(
        &env,
        &[(Stat::Encapsulated, 1), (Stat::PassNotIpv4, 1)],
        "a CNI pod's own traffic",
    );
    // Another source address, another MAC, ARP claiming either.
    let forged_ip = Ipv4Addr::new(10, 244, 1, 99);
    let forged_mac = [0x02, 0x66, 0, 0, 0, 6];
    for (frame, what) in [
        (
            pod_frame(HOST_DEV_MAC, POD_MAC, forged_ip, remote, b"x"),
            "forged IP",
        ),
        (
            pod_frame(HOST_DEV_MAC, forged_mac, CLIENT, remote, b"x"),
            "forged MAC",
        ),
        (arp(POD_MAC, forged_ip, gw), "ARP for a forged IP"),
        (arp(forged_mac, CLIENT, gw), "ARP from a forged MAC"),
        (
            {
                // Ethernet source right, ARP sender MAC forged.
                let mut f = arp(POD_MAC, CLIENT, gw);
                f[22..28].copy_from_slice(&forged_mac);
                f
            },
            "ARP with a forged sender MAC",
        ),
    ] {
        let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &frame);
        assert_eq!(rc, TC_ACT_SHOT, "{what}");
    }
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 1),
            (Stat::PassNotIpv4, 1),
            (Stat::DropSpoofedMac, 3),
            (Stat::DropSpoofedIp, 2),
        ],
        "spoofed frames",
    );
    assert!(endpoint_of(&mut env, forged_ip).is_none(), "nothing learnt");
    assert_eq!(
        endpoint_of(&mut env, CLIENT).map(|e| e.gw_mac),
        Some(HOST_DEV_MAC),
        "the registered entry is untouched"
    );
});

root_test!(learning_never_repoints_an_entry_of_another_port, || {
    let mut env = setup();
    // 10.244.1.5 is registered on port 42; a bridge pod (on lo, ifindex
    // 1) sending from that address does not take it.
    register_pods(&mut env, &[(CLIENT, POD_MAC, 42)]);
    let other_mac = [0x02, 0xaa, 0, 0, 0, 9];
    let dst = Ipv4Addr::new(10, 244, 1, 9);
    run_tc(
        &mut env,
        prog_names::FROM_POD,
        &pod_frame(CNI0_MAC, other_mac, CLIENT, dst, b"x"),
    );
    let ep = endpoint_of(&mut env, CLIENT).unwrap();
    assert_eq!((ep.ifindex, ep.mac), (42, POD_MAC));
    // A new address is learnt on this port; the same port with a new MAC
    // refreshes it.
    let six = Ipv4Addr::new(10, 244, 1, 6);
    run_tc(
        &mut env,
        prog_names::FROM_POD,
        &pod_frame(CNI0_MAC, other_mac, six, dst, b"x"),
    );
    let ep = endpoint_of(&mut env, six).unwrap();
    assert_eq!((ep.ifindex, ep.mac, ep.gw_mac), (1, other_mac, CNI0_MAC));
    let newer = [0x02, 0xaa, 0, 0, 0, 10];
    run_tc(
        &mut env,
        prog_names::FROM_POD,
        &pod_frame(CNI0_MAC, newer, six, dst, b"x"),
    );
    assert_eq!(endpoint_of(&mut env, six).unwrap().mac, newer);
});

root_test!(service_to_a_local_cni_pod_goes_straight_into_it, || {
    let mut env = setup();
    let pod_ip = Ipv4Addr::new(10, 244, 1, 7);
    let pod_mac = [0x02, 0xaa, 0, 0, 0, 7];
    register_pods(&mut env, &[(pod_ip, pod_mac, 42)]);
    set_frontend(&mut env, svc_key(80, 6), vec![backend(pod_ip, 8080)]);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40020));
    assert_eq!(rc, TC_ACT_REDIRECT);
    let (e, ip) = parse_eth_ipv4(&out);
    assert_eq!((e.destination, e.source), (pod_mac, HOST_DEV_MAC));
    assert_eq!(ip.dst(), pod_ip);
    assert_counters(
        &env,
        &[(Stat::SvcForward, 1), (Stat::RedirectToPod, 1)],
        "to a local CNI pod",
    );
});

// ------------------------------------- ICMP errors, fragments and TTL

const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const REMOTE_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
const LOCAL_GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

/// A pod's frame (client side) carrying the IPv4 packet `ip`.
fn from_client(ip: &[u8]) -> Vec<u8> {
    eth(CNI0_MAC, POD_MAC, ETH_P_IP, ip)
}

/// Sends one UDP datagram client:sport -> ClusterIP:53 through from_pod
/// (the frontend goes to `backend`), and returns the translated packet
/// as the backend receives it (inner packet of the VXLAN frame).
fn udp_flow_to_remote_backend(env: &mut Env, sport: u16) -> Vec<u8> {
    let q = udp_csum(CLIENT, VIP, sport, 53, b"query");
    let (rc, out) = run_tc(
        env,
        prog_names::FROM_POD,
        &from_client(&ipv4(CLIENT, VIP, 17, 0, &q)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = parse_vxlan(&out);
    p.inner[14..].to_vec()
}

/// Checks an ICMP error the client receives about its flow to the
/// ClusterIP: outer addresses, type/code/rest kept, the quote back in the
/// ClusterIP's terms with valid IPv4 and L4 checksums (ICMP and outer IPv4
/// checksums are checked by parse_ipv4).
fn assert_error_for_client(
    icmp_ip: &[u8],
    from: Ipv4Addr,
    want_icmp: (u8, u8, [u8; 4]),
    sport: u16,
    vport: u16,
    what: &str,
) {
    let p = parse_ipv4(icmp_ip);
    assert_eq!(
        (p.src(), p.dst()),
        (from, CLIENT),
        "{what}: outer addresses"
    );
    let raw = &icmp_ip[p.ip.header_len()..];
    assert_eq!(
        (raw[0], raw[1], [raw[4], raw[5], raw[6], raw[7]]),
        want_icmp,
        "{what}: type, code, rest of header kept"
    );
    let (qh, ql4) = parse_quote(&raw[8..]);
    let (qs, qd): (Ipv4Addr, Ipv4Addr) = (qh.source.into(), qh.destination.into());
    assert_eq!(
        (qs, qd),
        (CLIENT, VIP),
        "{what}: quote is client -> ClusterIP"
    );
    assert_eq!(
        (
            u16::from_be_bytes([ql4[0], ql4[1]]),
            u16::from_be_bytes([ql4[2], ql4[3]])
        ),
        (sport, vport),
        "{what}: quoted ports"
    );
    assert!(
        l4_checksum_ok(qs, qd, qh.protocol.0, &ql4),
        "{what}: quoted L4 checksum"
    );
}

root_test!(
    icmp_errors_about_a_service_flow_reach_the_client_translated,
    || {
        let mut env = setup();
        set_frontend(
            &mut env,
            svc_key(53, 17),
            vec![backend(REMOTE_BACKEND, 5353)],
        );
        set_frontend(
            &mut env,
            svc_key(80, 6),
            vec![backend(REMOTE_BACKEND, 8080)],
        );
        let ul = env.ul_mac;
        let sent = udp_flow_to_remote_backend(&mut env, 40020);
        let mtu = [0, 0, 0x04, 0xb0]; // next-hop MTU 1200
        // The backend's port unreachable (it quotes the whole datagram), a
        // router's fragmentation needed and time exceeded (the node's bridge
        // address stands in for the router: it is in the sender's lease).
        let cases = [
            (
                "port unreachable",
                REMOTE_BACKEND,
                VIP,
                (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, [0; 4]),
            ),
            (
                "fragmentation needed",
                REMOTE_GW,
                REMOTE_GW,
                (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu),
            ),
            (
                "time exceeded",
                REMOTE_GW,
                REMOTE_GW,
                (ICMP_TIME_EXCEEDED, 0, [0; 4]),
            ),
        ];
        for (what, sender, want_src, (t, c, rest)) in cases {
            let err = ipv4(sender, CLIENT, 1, 0xc0, &icmp_error(t, c, rest, &sent));
            let (rc, out) = run_tc(
                &mut env,
                prog_names::FROM_UNDERLAY,
                &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &err, ul),
            );
            assert_eq!(rc, TC_ACT_REDIRECT, "{what}");
            assert_error_for_client(&out[14..], want_src, (t, c, rest), 40020, 53, what);
            assert_eq!(out[14 + 8], 63, "{what}: one hop (TTL) on the way");
        }
        // TCP, quoted with its whole header (Linux quotes up to 576 bytes):
        // its checksum is fixed too.
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40021));
        assert_eq!(rc, TC_ACT_REDIRECT);
        let syn = parse_vxlan(&out).inner[14..].to_vec();
        let err = ipv4(
            REMOTE_GW,
            CLIENT,
            1,
            0xc0,
            &icmp_error(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu, &syn),
        );
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &err, ul),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_error_for_client(
            &out[14..],
            REMOTE_GW,
            (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu),
            40021,
            80,
            "TCP",
        );
        // An error about a flow nobody translated passes untouched.
        let other = ipv4(
            CLIENT,
            REMOTE_BACKEND,
            17,
            0,
            &udp_csum(CLIENT, REMOTE_BACKEND, 999, 5353, b"x"),
        );
        let err = ipv4(
            REMOTE_BACKEND,
            CLIENT,
            1,
            0xc0,
            &icmp_error(3, 3, [0; 4], &forwarded(&other)),
        );
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &err, ul),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(
            &out[14..],
            &forwarded(&err)[..],
            "unrelated error untouched"
        );
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 2),
                (Stat::Decapsulated, 5),
                (Stat::SvcForward, 2),
                (Stat::SvcIcmpReverse, 4),
            ],
            "four errors translated, one passed",
        );
    }
);

root_test!(
    icmp_errors_from_a_local_backend_and_for_hairpin_flows,
    || {
        let mut env = setup();
        let local = Ipv4Addr::new(10, 244, 1, 9);
        set_frontend(&mut env, svc_key(53, 17), vec![backend(local, 5353)]);
        let q = udp_csum(CLIENT, VIP, 40022, 53, b"query");
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_POD,
            &from_client(&ipv4(CLIENT, VIP, 17, 0, &q)),
        );
        assert_eq!(rc, TC_ACT_REDIRECT, "to the local backend");
        let sent = out[14..].to_vec();
        assert_eq!(parse_ipv4(&sent).dst(), local);
        let err = ipv4(local, CLIENT, 1, 0xc0, &icmp_error(3, 3, [0; 4], &sent));
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_POD,
            &eth(CNI0_MAC, [2, 0xaa, 0, 0, 0, 9], ETH_P_IP, &err),
        );
        assert_eq!(rc, TC_ACT_REDIRECT, "back to the client");
        assert_error_for_client(&out[14..], VIP, (3, 3, [0; 4]), 40022, 53, "local backend");

        // Hairpin: the client is the backend; it saw the flow from the
        // hairpin address and answers that.
        set_frontend(&mut env, svc_key(53, 17), vec![backend(CLIENT, 5353)]);
        let q = udp_csum(CLIENT, VIP, 40023, 53, b"query");
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_POD,
            &from_client(&ipv4(CLIENT, VIP, 17, 0, &q)),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        let sent = out[14..].to_vec();
        let hp = Ipv4Addr::from(dataplane_common::HAIRPIN_SNAT_IP);
        assert_eq!(parse_ipv4(&sent).src(), hp);
        let err = ipv4(CLIENT, hp, 1, 0xc0, &icmp_error(3, 3, [0; 4], &sent));
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&err));
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_error_for_client(&out[14..], VIP, (3, 3, [0; 4]), 40023, 53, "hairpin");
        assert_counters(
            &env,
            &[
                (Stat::SvcForward, 2),
                (Stat::RedirectToBridge, 4),
                (Stat::SvcIcmpReverse, 2),
            ],
            "translated both times",
        );
    }
);

root_test!(
    icmp_error_from_a_client_about_a_reply_goes_to_the_backend,
    || {
        let mut env = setup();
        set_frontend(
            &mut env,
            svc_key(53, 17),
            vec![backend(REMOTE_BACKEND, 5353)],
        );
        udp_flow_to_remote_backend(&mut env, 40024);
        // The client got VIP:53 -> client:40024 and answers it (its socket is
        // gone): port unreachable to the ClusterIP.
        let reply = ipv4(
            VIP,
            CLIENT,
            17,
            0,
            &udp_csum(VIP, CLIENT, 53, 40024, b"answer"),
        );
        let err = ipv4(CLIENT, VIP, 1, 0xc0, &icmp_error(3, 3, [0; 4], &reply));
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&err));
        assert_eq!(rc, TC_ACT_REDIRECT);
        let inner = parse_vxlan(&out).inner_ipv4();
        assert_eq!(
            (inner.src(), inner.dst()),
            (CLIENT, REMOTE_BACKEND),
            "to the backend"
        );
        assert_eq!(inner.ip.time_to_live, 63, "one hop");
        let (qh, ql4) = parse_quote(&inner.payload);
        let (qs, qd): (Ipv4Addr, Ipv4Addr) = (qh.source.into(), qh.destination.into());
        assert_eq!(
            (qs, qd),
            (REMOTE_BACKEND, CLIENT),
            "quote as the backend sent it"
        );
        assert_eq!(&ql4[0..4], &[0x14, 0xe9, 0x9c, 0x58], "ports 5353 -> 40024");
        assert!(l4_checksum_ok(qs, qd, 17, &ql4), "quoted UDP checksum");
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 2),
                (Stat::SvcForward, 1),
                (Stat::SvcIcmpForward, 1),
            ],
            "error translated to the backend",
        );
    }
);

root_test!(fragments_to_and_from_a_clusterip_follow_the_first, || {
    let mut env = setup();
    set_frontend(
        &mut env,
        svc_key(53, 17),
        vec![backend(REMOTE_BACKEND, 5353)],
    );
    let data: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
    let seg = udp_csum(CLIENT, VIP, 40025, 53, &data);
    let frags = fragments(CLIENT, VIP, 17, 0x4242, &seg, 304);
    let mut got = Vec::new();
    for f in &frags {
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(f));
        assert_eq!(rc, TC_ACT_REDIRECT, "fragment encapsulated");
        let p = parse_vxlan(&out).inner_ipv4();
        assert_eq!(
            (p.src(), p.dst()),
            (CLIENT, REMOTE_BACKEND),
            "to the backend"
        );
        assert_eq!(p.ip.identification, 0x4242);
        got.push(p);
    }
    // etherparse reads no transport header in a fragment: the payloads are
    // the datagram's bytes.
    let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
    assert_eq!(
        &whole[0..4],
        &[0x9c, 0x59, 0x14, 0xe9],
        "ports 40025 -> 5353"
    );
    assert_eq!(&whole[8..], &data[..], "data untouched");
    assert!(
        l4_checksum_ok(CLIENT, REMOTE_BACKEND, 17, &whole),
        "UDP checksum of the reassembled datagram"
    );

    // The reply, fragmented by the backend, arrives over the overlay.
    let seg = udp_csum(REMOTE_BACKEND, CLIENT, 5353, 40025, &data);
    let ul = env.ul_mac;
    let mut got = Vec::new();
    for f in fragments(REMOTE_BACKEND, CLIENT, 17, 0x5151, &seg, 304) {
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &f, ul),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.dst()), (VIP, CLIENT), "from the ClusterIP");
        got.push(p);
    }
    let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
    assert_eq!(&whole[0..4], &[0, 53, 0x9c, 0x59], "ports 53 -> 40025");
    assert!(l4_checksum_ok(VIP, CLIENT, 17, &whole), "reply checksum");

    // A later fragment whose first was never seen: to a ClusterIP it is
    // dropped; to a pod it goes on as it is.
    let [_, orphan] = fragments(CLIENT, VIP, 17, 0x6363, &seg, 304);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&orphan));
    assert_eq!(rc, TC_ACT_SHOT, "orphan to the ClusterIP");
    let [_, orphan] = fragments(CLIENT, REMOTE_BACKEND, 17, 0x6464, &seg, 304);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&orphan));
    assert_eq!(rc, TC_ACT_REDIRECT, "orphan to a pod");
    assert_eq!(parse_vxlan(&out).inner[14..], forwarded(&orphan)[..]);
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 3),
            (Stat::Decapsulated, 2),
            (Stat::SvcForward, 2),
            (Stat::SvcReverse, 2),
            (Stat::DropFragNoFirst, 1),
        ],
        "fragments",
    );
});

/// A UDP packet from the client to `dst` with this TTL.
fn udp_with_ttl(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, ttl: u8) -> Vec<u8> {
    let mut ip = ipv4(src, dst, 17, 0, &udp_csum(src, dst, 33434, dport, b"probe"));
    ip[8] = ttl;
    set_ipv4_checksum(&mut ip);
    ip
}

/// Checks a time exceeded from `from` to `to` quoting `probe`.
fn assert_time_exceeded(icmp_ip: &[u8], from: Ipv4Addr, to: Ipv4Addr, probe: &[u8], what: &str) {
    let p = parse_ipv4(icmp_ip);
    assert_eq!((p.src(), p.dst()), (from, to), "{what}: addresses");
    assert_eq!(p.ip.time_to_live, 64, "{what}: a new packet");
    assert_eq!(
        p.icmp().icmp_type,
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
        "{what}: time exceeded in transit"
    );
    assert_eq!(
        p.payload,
        &probe[..28],
        "{what}: quotes the header and 8 bytes"
    );
}

root_test!(ttl_running_out_is_answered_with_time_exceeded, || {
    let mut env = setup();
    set_frontend(
        &mut env,
        svc_key(53, 17),
        vec![backend(REMOTE_BACKEND, 5353)],
    );
    // From a pod, to a remote pod and to a ClusterIP: answered by this
    // node (its bridge address) straight back into the pod.
    for (what, dst, dport) in [("remote pod", REMOTE_BACKEND, 5353), ("ClusterIP", VIP, 53)] {
        let probe = udp_with_ttl(CLIENT, dst, dport, 1);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&probe));
        assert_eq!(rc, TC_ACT_REDIRECT, "{what}");
        let (e, _) = parse_eth_ipv4(&out);
        assert_eq!(e.destination, POD_MAC, "{what}: back to the pod");
        assert_time_exceeded(&out[14..], LOCAL_GW, CLIENT, &probe, what);
    }
    // TTL 2 goes on with 1; traffic the node does not route keeps TTL 1.
    let probe = udp_with_ttl(CLIENT, REMOTE_BACKEND, 5353, 2);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&probe));
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(parse_vxlan(&out).inner_ipv4().ip.time_to_live, 1);
    let local = from_client(&udp_with_ttl(CLIENT, Ipv4Addr::new(10, 244, 1, 9), 5353, 1));
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &local);
    assert_eq!(
        (rc, out),
        (TC_ACT_OK, local),
        "same-node traffic is bridged"
    );
    // An ICMP error is never answered with another.
    let mut err = ipv4(
        CLIENT,
        REMOTE_BACKEND,
        1,
        0,
        &icmp_error(3, 3, [0; 4], &probe),
    );
    err[8] = 1;
    set_ipv4_checksum(&mut err);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&err));
    assert_eq!(rc, TC_ACT_SHOT);
    // Nor is a fragment other than the first (it has no L4 header to quote).
    let seg = udp_csum(CLIENT, REMOTE_BACKEND, 33434, 5353, &[7; 600]);
    let [_, mut later] = fragments(CLIENT, REMOTE_BACKEND, 17, 0x7777, &seg, 304);
    later[8] = 1;
    set_ipv4_checksum(&mut later);
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &from_client(&later));
    assert_eq!(rc, TC_ACT_SHOT, "later fragment");

    // Out of the overlay with TTL 1: answered to the sender, encapsulated
    // to its node.
    let probe = udp_with_ttl(REMOTE_BACKEND, CLIENT, 33434, 1);
    let ul = env.ul_mac;
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_UNDERLAY,
        &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &probe, ul),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let v = parse_vxlan(&out);
    assert_eq!(
        (v.src_ip, v.dst_ip),
        (OUR_IP, PEER_IP),
        "to the sender's node"
    );
    assert_time_exceeded(
        &v.inner[14..],
        LOCAL_GW,
        REMOTE_BACKEND,
        &probe,
        "decapsulated",
    );
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 2),
            (Stat::PassLocal, 1),
            (Stat::TtlExceeded, 3),
            (Stat::DropTtlExceeded, 2),
        ],
        "TTL",
    );
});

// ------------------------------------------------------------ masquerade

use dataplane_common::{
    NODE_CFG_IP_MASQ,
    masq::{MASQ_F_SERVICE, PROTO_ICMP},
};

/// The outside world, beyond the underlay.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// [`setup`] with `--ip-masq` (or not) and `--nat-ports min-max`.
fn setup_masq(ip_masq: bool, ports: (u16, u16)) -> Env {
    let mut env = setup();
    if ip_masq {
        env.cfg.flags |= NODE_CFG_IP_MASQ;
    }
    (env.cfg.nat_port_min, env.cfg.nat_port_max) = ports;
    let cfg = env.cfg;
    env.rec.set_node(env.dp.maps(), &cfg).unwrap();
    env
}

/// A frame from the pod `src` leaving on the underlay (as the kernel
/// routed it: towards the underlay's next hop).
fn leaving(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(
        PEER_UL_MAC,
        CNI0_MAC,
        ETH_P_IP,
        &ipv4(src, dst, proto, 0, l4),
    )
}

/// A frame arriving on the underlay for this node.
fn arriving(ul_mac: [u8; 6], src: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(
        ul_mac,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(src, OUR_IP, proto, 0, l4),
    )
}

/// [`arriving`] run through from_underlay.
fn arrive(env: &mut Env, src: Ipv4Addr, proto: u8, l4: &[u8]) -> (u32, Vec<u8>) {
    let f = arriving(env.ul_mac, src, proto, l4);
    run_tc(env, prog_names::FROM_UNDERLAY, &f)
}

/// ICMP echo (type 8 request, 0 reply) with its checksum.
fn echo(type_: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut v = vec![type_, 0, 0, 0];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(b"ping payload");
    let c = inet_csum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

fn masq_flows(env: &mut Env) -> Vec<dataplane::bpf::MasqFlow> {
    table(env).masq_flows().unwrap()
}

root_test!(masquerade_udp_out_and_back_with_checksums, || {
    let mut env = setup_masq(true, (61000, 61003));
    let out_l4 = udp_csum(CLIENT, OUTSIDE, 40000, 53, b"query");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 17, &out_l4),
    );
    assert_eq!(rc, TC_ACT_OK, "{:?}", nonzero(&env));
    // Checksums are verified while parsing.
    let (_, p) = parse_eth_ipv4(&out);
    assert_eq!(
        (p.src(), p.dst()),
        (OUR_IP, OUTSIDE),
        "source is the node's"
    );
    let nat = p.udp().source_port;
    assert!(
        (61000..=61003).contains(&nat),
        "port {nat} from --nat-ports"
    );
    assert_eq!(p.udp().destination_port, 53);
    // The next datagram of the flow leaves the same way.
    let (_, out2) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 17, &out_l4),
    );
    assert_eq!(parse_eth_ipv4(&out2).1.udp().source_port, nat);
    let flows = masq_flows(&mut env);
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].entry.state, CtState::UdpUnreplied as u8);

    // The answer comes back to the pod.
    let back = udp_csum(OUTSIDE, OUR_IP, 53, nat, b"answer");
    let (rc, back) = arrive(&mut env, OUTSIDE, 17, &back);
    assert_eq!(
        rc, TC_ACT_OK,
        "passed to the kernel, which routes it to the pod"
    );
    let (_, p) = parse_eth_ipv4(&back);
    assert_eq!((p.src(), p.dst()), (OUTSIDE, CLIENT));
    assert_eq!((p.udp().source_port, p.udp().destination_port), (53, 40000));
    assert_eq!(
        masq_flows(&mut env)[0].entry.state,
        CtState::UdpReplied as u8
    );
    // A NAT port no flow to this destination holds: the node's own, untouched.
    let stray = if nat == 61002 { 61001 } else { 61002 };
    let other = udp_csum(OUTSIDE, OUR_IP, 53, stray, b"stray");
    let input = arriving(env.ul_mac, OUTSIDE, 17, &other);
    let (rc, untouched) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
    assert_eq!((rc, untouched), (TC_ACT_OK, input));
    assert_counters(
        &env,
        &[
            (Stat::PassNotOverlay, 1),
            (Stat::MasqForward, 2),
            (Stat::MasqReverse, 1),
        ],
        "masqueraded UDP",
    );
});

root_test!(flannels_rules_decide_what_is_masqueraded, || {
    let mut env = setup_masq(false, (61000, 61003));
    // Without --ip-masq nothing is (flannel's behaviour).
    let input = leaving(CLIENT, OUTSIDE, 17, &udp(40000, 53, b"q"));
    let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &input);
    assert_eq!((rc, &out), (TC_ACT_OK, &input), "not masqueraded");
    env.cfg.flags |= NODE_CFG_IP_MASQ;
    let cfg = env.cfg;
    env.rec.set_node(env.dp.maps(), &cfg).unwrap();
    let env = &mut env;
    for (src, dst, what) in [
        (CLIENT, Ipv4Addr::new(10, 244, 2, 7), "pod to pod"),
        (
            CLIENT,
            Ipv4Addr::new(10, 244, 9, 1),
            "to the cluster network",
        ),
        (CLIENT, Ipv4Addr::new(224, 0, 0, 251), "multicast"),
        (OUR_IP, OUTSIDE, "the node's own traffic"),
        (Ipv4Addr::new(10, 244, 2, 7), OUTSIDE, "another node's pod"),
    ] {
        let input = leaving(src, dst, 17, &udp(40000, 53, b"q"));
        let (rc, out) = run_tc(env, prog_names::TO_UNDERLAY, &input);
        assert_eq!((rc, &out), (TC_ACT_OK, &input), "{what}: untouched");
    }
    // TCP: only a SYN opens a mapping; anything else without one belongs
    // to a connection from outside and leaves as it is.
    for flags in [TCP_SYN | TCP_ACK, TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK] {
        let seg = tcp(CLIENT, OUTSIDE, 8080, 50000, 1, 1, flags, b"");
        let input = leaving(CLIENT, OUTSIDE, 6, &seg);
        let (rc, out) = run_tc(env, prog_names::TO_UNDERLAY, &input);
        assert_eq!((rc, &out), (TC_ACT_OK, &input), "flags {flags:#x}");
    }
    assert!(masq_flows(env).is_empty());
    assert_counters(env, &[(Stat::PassMasqNotNew, 4)], "not masqueraded");
    let syn = tcp(CLIENT, OUTSIDE, 40001, 443, 1, 0, TCP_SYN, b"");
    let (_, out) = run_tc(
        env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 6, &syn),
    );
    let p = parse_eth_ipv4(&out).1;
    assert_eq!(p.src(), OUR_IP);
    let nat = p.tcp().source_port;
    // The rest of the connection, both ways, through its states.
    let synack = tcp(OUTSIDE, OUR_IP, 443, nat, 7, 2, TCP_SYN | TCP_ACK, b"");
    let (rc, back) = arrive(env, OUTSIDE, 6, &synack);
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_eth_ipv4(&back).1;
    assert_eq!((p.dst(), p.tcp().destination_port), (CLIENT, 40001));
    let ack = tcp(CLIENT, OUTSIDE, 40001, 443, 2, 8, TCP_ACK, b"data");
    run_tc(
        env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 6, &ack),
    );
    assert_eq!(masq_flows(env)[0].entry.state, CtState::Established as u8);
});

root_test!(masquerade_ping_rewrites_the_echo_identifier, || {
    let mut env = setup_masq(true, (61000, 61003));
    let (rc, out) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, PROTO_ICMP, &echo(8, 777, 1)),
    );
    assert_eq!(rc, TC_ACT_OK);
    // The ICMP checksum is verified while parsing.
    let (_, p) = parse_eth_ipv4(&out);
    assert_eq!(p.src(), OUR_IP);
    let Icmpv4Type::EchoRequest(e) = p.icmp().icmp_type.clone() else {
        panic!("{:?}", p.icmp());
    };
    assert!(
        (61000..=61003).contains(&e.id),
        "id {} from --nat-ports",
        e.id
    );
    assert_eq!(e.seq, 1);
    let (rc, back) = arrive(&mut env, OUTSIDE, PROTO_ICMP, &echo(0, e.id, 1));
    assert_eq!(rc, TC_ACT_OK);
    let (_, p) = parse_eth_ipv4(&back);
    assert_eq!(p.dst(), CLIENT);
    let Icmpv4Type::EchoReply(r) = p.icmp().icmp_type.clone() else {
        panic!("{:?}", p.icmp());
    };
    assert_eq!((r.id, r.seq), (777, 1), "the pod's own identifier back");
    assert_counters(
        &env,
        &[(Stat::MasqForward, 1), (Stat::MasqReverse, 1)],
        "ping",
    );
});

root_test!(
    an_icmp_error_about_a_masqueraded_flow_reaches_the_pod,
    || {
        let mut env = setup_masq(true, (61000, 61003));
        let (_, out) = run_tc(
            &mut env,
            prog_names::TO_UNDERLAY,
            &leaving(
                CLIENT,
                OUTSIDE,
                17,
                &udp_csum(CLIENT, OUTSIDE, 40000, 9, b"x"),
            ),
        );
        let sent = &out[14..];
        let nat = parse_ipv4(sent).udp().source_port;
        let err = icmp_error(3, ICMP_PORT_UNREACH, [0; 4], sent);
        let (rc, back) = arrive(&mut env, OUTSIDE, PROTO_ICMP, &err);
        assert_eq!(rc, TC_ACT_OK);
        let (_, p) = parse_eth_ipv4(&back);
        assert_eq!(p.dst(), CLIENT, "to the pod");
        let (q, rest) = parse_quote(&p.payload);
        assert_eq!(Ipv4Addr::from(q.source), CLIENT, "the pod's packet quoted");
        assert_eq!(u16::from_be_bytes([rest[0], rest[1]]), 40000);
        assert_ne!(nat, 40000);
        assert_eq!(stat(&env, Stat::MasqIcmpReverse), 1);
    }
);

root_test!(an_exhausted_port_range_is_a_counted_drop, || {
    // Two ports: two flows to one destination get them, the third none.
    let mut env = setup_masq(true, (61000, 61001));
    let mut ports = Vec::new();
    for sport in [40000, 40001] {
        let (rc, out) = run_tc(
            &mut env,
            prog_names::TO_UNDERLAY,
            &leaving(CLIENT, OUTSIDE, 17, &udp(sport, 53, b"q")),
        );
        assert_eq!(rc, TC_ACT_OK);
        ports.push(parse_eth_ipv4(&out).1.udp().source_port);
    }
    ports.sort();
    assert_eq!(ports, [61000, 61001], "each port once");
    let (rc, _) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 17, &udp(40002, 53, b"q")),
    );
    assert_eq!(rc, TC_ACT_SHOT, "no port left");
    assert_eq!(stat(&env, Stat::DropMasqExhausted), 1);
    // Ports are per destination: another one still has both.
    let (rc, _) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 17, &udp(40002, 54, b"q")),
    );
    assert_eq!(rc, TC_ACT_OK);
    // Once the flows expire and are swept, the ports are free again.
    set_timeouts(
        &mut env,
        CtTimeouts {
            udp_unreplied: 1,
            ..CtTimeouts::DEFAULT
        },
    );
    let t = table(&mut env).timeouts().unwrap();
    let mut sweeper = Sweeper::new(table(&mut env), t);
    let r = sweeper.sweep(monotonic_ns() + 2_000_000_000).unwrap();
    assert_eq!((r.masq_flows, r.masq_expired), (3, 3));
    assert!(masq_flows(&mut env).is_empty());
    assert!(table(&mut env).masq_reverse_entries().unwrap().is_empty());
    let gc = table(&mut env).gc_counters().unwrap();
    assert!(gc.contains(&(CtGc::MasqExpired, 3)), "{gc:?}");
    let (rc, _) = run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 17, &udp(40002, 53, b"q")),
    );
    assert_eq!(rc, TC_ACT_OK, "a port again");
    assert_eq!(stat(&env, Stat::DropMasqExhausted), 1);
});

root_test!(
    a_service_flow_to_a_backend_outside_is_masqueraded_without_ip_masq,
    || {
        let mut env = setup_masq(false, (61000, 61003));
        set_frontend(&mut env, svc_key(80, 6), vec![backend(OUTSIDE, 8080)]);
        // DNAT at the client's port; the kernel routes it out of the cluster
        // network (pass_local).
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40010));
        assert_eq!(rc, TC_ACT_OK);
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.dst()), (CLIENT, OUTSIDE));
        // On the underlay it gets the node's address, as a Service flow.
        let routed = leaving(CLIENT, OUTSIDE, 6, &out[14..][p.ip.header_len()..]);
        let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &routed);
        assert_eq!(rc, TC_ACT_OK, "{:?}", nonzero(&env));
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.dst()), (OUR_IP, OUTSIDE));
        let nat = p.tcp().source_port;
        let flows = masq_flows(&mut env);
        assert_eq!(flows[0].entry.flags & MASQ_F_SERVICE, MASQ_F_SERVICE);
        // The backend's answer: back to the pod on the underlay, then to the
        // ClusterIP where the host stack hands it to the pod.
        let synack = tcp(OUTSIDE, OUR_IP, 8080, nat, 9, 1001, TCP_SYN | TCP_ACK, b"");
        let (_, back) = arrive(&mut env, OUTSIDE, 6, &synack);
        let p = parse_eth_ipv4(&back).1;
        assert_eq!((p.src(), p.dst()), (OUTSIDE, CLIENT));
        let to_pod = eth(POD_MAC, CNI0_MAC, ETH_P_IP, &back[14..]);
        let (rc, last) = run_tc(&mut env, prog_names::TO_POD, &to_pod);
        assert_eq!(rc, TC_ACT_OK);
        let p = parse_eth_ipv4(&last).1;
        assert_eq!((p.src(), p.dst()), (VIP, CLIENT));
        assert_eq!((p.tcp().source_port, p.tcp().destination_port), (80, 40010));
        assert_eq!(
            state_of(&mut env, 40010),
            Some(CtState::SynRecv),
            "the Service flow saw the answer"
        );
        assert_counters(
            &env,
            &[
                (Stat::PassLocal, 1),
                (Stat::SvcForward, 1),
                (Stat::SvcReverse, 1),
                (Stat::MasqForward, 1),
                (Stat::MasqReverse, 1),
                (Stat::ToPodReverse, 1),
            ],
            "a Service backend outside",
        );
    }
);

root_test!(
    to_pod_translates_a_reply_from_this_nodes_own_address,
    || {
        let mut env = setup_masq(false, (61000, 61003));
        set_frontend(&mut env, svc_key(80, 6), vec![backend(OUR_IP, 8080)]);
        let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40020));
        assert_eq!(rc, TC_ACT_OK, "delivered by the host stack");
        // The server on the node answers; the host stack sends it to the pod.
        let synack = tcp(OUR_IP, CLIENT, 8080, 40020, 9, 1001, TCP_SYN | TCP_ACK, b"");
        let f = eth(
            POD_MAC,
            CNI0_MAC,
            ETH_P_IP,
            &ipv4(OUR_IP, CLIENT, 6, 0, &synack),
        );
        let (rc, out) = run_tc(&mut env, prog_names::TO_POD, &f);
        assert_eq!(rc, TC_ACT_OK);
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.tcp().source_port), (VIP, 80));
        // Not a Service reply: untouched.
        let other = tcp(OUR_IP, CLIENT, 22, 40021, 9, 1001, TCP_ACK, b"");
        let f = eth(
            POD_MAC,
            CNI0_MAC,
            ETH_P_IP,
            &ipv4(OUR_IP, CLIENT, 6, 0, &other),
        );
        let (rc, out) = run_tc(&mut env, prog_names::TO_POD, &f);
        assert_eq!((rc, out), (TC_ACT_OK, f));
        assert!(masq_flows(&mut env).is_empty(), "never masqueraded");
    }
);

root_test!(
    a_pods_udp_answer_to_a_client_outside_is_not_masqueraded,
    || {
        let mut env = setup_masq(true, (61000, 61003));
        // A client outside reaches the pod's address directly (a route to the
        // pod network): from_underlay records the flow, the kernel delivers it.
        let q = udp_csum(OUTSIDE, CLIENT, 5000, 53, b"query");
        let input = eth(
            env.ul_mac,
            PEER_UL_MAC,
            ETH_P_IP,
            &ipv4(OUTSIDE, CLIENT, 17, 0, &q),
        );
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
        assert_eq!((rc, &out), (TC_ACT_OK, &input), "passed as it is");
        // The pod's answer leaves with its own address.
        let a = leaving(
            CLIENT,
            OUTSIDE,
            17,
            &udp_csum(CLIENT, OUTSIDE, 53, 5000, b"answer"),
        );
        let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &a);
        assert_eq!((rc, &out), (TC_ACT_OK, &a), "a reply, not a new flow");
        let flows = masq_flows(&mut env);
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].entry.state, CtState::UdpReplied as u8);
        assert!(
            table(&mut env).masq_reverse_entries().unwrap().is_empty(),
            "nothing to translate back"
        );
        // Its own new flow to another port is masqueraded.
        let n = leaving(CLIENT, OUTSIDE, 17, &udp(53, 5001, b"new"));
        let (_, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &n);
        assert_eq!(parse_eth_ipv4(&out).1.src(), OUR_IP);
        assert_counters(
            &env,
            &[(Stat::PassNotOverlay, 1), (Stat::MasqForward, 1)],
            "inbound UDP",
        );
    }
);

// North-south: NodePort / externalIP / LoadBalancer frontends at the
// underlay (dataplane-ebpf/src/nodeport.rs).

use dataplane::services::TrafficPolicy;

const NODE_PORT: u16 = 30080;

/// Programs the north-south frontend `OUR_IP:port/proto` with `policy`.
fn set_ns_frontend(
    env: &mut Env,
    port: u16,
    proto: u8,
    backends: Vec<Backend>,
    policy: TrafficPolicy,
) {
    set_ns_frontend_with(env, port, proto, backends, policy, false);
}

/// The key of the north-south frontend `OUR_IP:port/proto`.
fn ns_key(port: u16, proto: u8) -> SvcKey {
    SvcKey {
        vip: OUR_IP.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

/// [`set_ns_frontend`], saying whether the Service has endpoints
/// elsewhere when `backends` is empty (`empty_drops`).
fn set_ns_frontend_with(
    env: &mut Env,
    port: u16,
    proto: u8,
    backends: Vec<Backend>,
    policy: TrafficPolicy,
    empty_drops: bool,
) {
    env.fronts.insert(
        ns_key(port, proto),
        FrontendState {
            backends,
            affinity_timeout_s: None,
            north_south: Some(policy),
            empty_drops,
        },
    );
    let name = ServiceName::new("default", "test");
    env.rec
        .set_service(env.dp.maps(), &name, &env.fronts)
        .unwrap();
}

/// A node with a route to the outside and the north-south frontend
/// `OUR_IP:NODE_PORT/proto`.
fn ns_setup(proto: u8, backends: Vec<Backend>, policy: TrafficPolicy) -> Env {
    let mut env = setup();
    route_outside();
    set_ns_frontend(&mut env, NODE_PORT, proto, backends, policy);
    env
}

/// A frame from the outside (through the underlay's router, 192.168.100.2)
/// to this node's PublicIP.
fn from_outside(env: &Env, l4: &[u8], proto: u8) -> Vec<u8> {
    eth(
        env.ul_mac,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(OUTSIDE, OUR_IP, proto, 0, l4),
    )
}

/// The route to the outside, through the router.
fn route_outside() {
    sh("ip route add default via 192.168.100.2 dev ul0").unwrap();
}

root_test!(
    nodeport_cluster_snats_to_the_gateway_and_the_reply_leaves_by_the_underlay,
    || {
        let remote = Ipv4Addr::new(10, 244, 2, 7);
        let mut env = ns_setup(6, vec![backend(remote, 8080)], TrafficPolicy::Cluster);
        let syn = tcp(OUTSIDE, OUR_IP, 50000, NODE_PORT, 1000, 0, TCP_SYN, b"");
        let f = from_outside(&env, &syn, 6);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let inner = parse_vxlan(&out).inner_ipv4();
        assert_eq!(
            (inner.src(), inner.dst()),
            (Ipv4Addr::new(10, 244, 1, 1), remote),
            "SNAT to the gateway, DNAT to the backend"
        );
        let nat_port = inner.tcp().source_port;
        assert!((61000..=65535).contains(&nat_port), "NAT port {nat_port}");
        assert_eq!(inner.tcp().destination_port, 8080);
        assert_counters(
            &env,
            &[(Stat::Encapsulated, 1), (Stat::NpForward, 1)],
            "translated, then encapsulated",
        );

        // The same flow's next packet keeps its NAT port.
        let ack = tcp(OUTSIDE, OUR_IP, 50000, NODE_PORT, 1001, 1, TCP_ACK, b"");
        let f = from_outside(&env, &ack, 6);
        let (_, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(parse_vxlan(&out).inner_ipv4().tcp().source_port, nat_port);

        // The backend's reply comes back in VXLAN to the gateway address and
        // leaves through the underlay as PublicIP:nodePort -> the client.
        let gw = Ipv4Addr::new(10, 244, 1, 1);
        let seg = tcp(
            remote,
            gw,
            8080,
            nat_port,
            5000,
            1001,
            TCP_SYN | TCP_ACK,
            b"",
        );
        let reply_ip = ipv4(remote, gw, 6, 0, &seg);
        let ul = env.ul_mac;
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &reply_ip, ul),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (e, reply) = parse_eth_ipv4(&out);
        assert_eq!((reply.src(), reply.dst()), (OUR_IP, OUTSIDE));
        let t = reply.tcp();
        assert_eq!((t.source_port, t.destination_port), (NODE_PORT, 50000));
        assert_eq!(e.destination, PEER_UL_MAC, "to the router, by the FIB");
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 2),
                (Stat::NpForward, 2),
                (Stat::NpReverse, 1),
                (Stat::NpToUnderlay, 1),
            ],
            "and back out",
        );
        // Something else to the gateway address still goes to the host.
        let other = ipv4(remote, gw, 17, 0, &udp(1, 2, b"x"));
        let (rc, _) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &other, ul),
        );
        assert_eq!(rc, TC_ACT_OK);
    }
);

root_test!(
    nodeport_local_keeps_the_client_and_drops_without_a_local_endpoint,
    || {
        let mut env = ns_setup(17, vec![backend(LOCAL_BACKEND, 5353)], TrafficPolicy::Local);
        let f = from_outside(&env, &udp(50001, NODE_PORT, b"q"), 17);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (_, p) = parse_eth_ipv4(&out);
        assert_eq!(
            (p.src(), p.dst()),
            (OUTSIDE, LOCAL_BACKEND),
            "the client's address kept"
        );
        assert_eq!(p.udp().destination_port, 5353);
        assert_counters(
            &env,
            &[(Stat::RedirectToBridge, 1), (Stat::NpForward, 1)],
            "to the local backend",
        );

        // Its reply, leaving the pod, goes out of the underlay from the nodePort.
        let r = eth(
            CNI0_MAC,
            BACKEND_MAC,
            ETH_P_IP,
            &ipv4(LOCAL_BACKEND, OUTSIDE, 17, 0, &udp(5353, 50001, b"a")),
        );
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &r);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (e, p) = parse_eth_ipv4(&out);
        assert_eq!((p.src(), p.dst()), (OUR_IP, OUTSIDE));
        assert_eq!(
            (p.udp().source_port, p.udp().destination_port),
            (NODE_PORT, 50001)
        );
        assert_eq!(e.destination, PEER_UL_MAC);
        assert_counters(
            &env,
            &[
                (Stat::RedirectToBridge, 1),
                (Stat::NpForward, 1),
                (Stat::NpReverse, 1),
                (Stat::NpToUnderlay, 1),
            ],
            "and back out",
        );

        // Without a local endpoint, the Service's endpoints elsewhere:
        // dropped, counted (kube-proxy drops these).
        set_ns_frontend_with(&mut env, NODE_PORT, 17, vec![], TrafficPolicy::Local, true);
        let f = from_outside(&env, &udp(50002, NODE_PORT, b"q"), 17);
        let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_SHOT);
        assert_eq!(stat(&env, Stat::DropNpNoLocalEndpoint), 1);
        assert_eq!(stat(&env, Stat::NpRejectNoBackend), 0);
        // Another port of the PublicIP is the host's: passed untouched.
        let f = from_outside(&env, &udp(50002, 22, b"q"), 17);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!((rc, out), (TC_ACT_OK, f));
    }
);
root_test!(fragments_of_a_masqueraded_datagram_follow_the_first, || {
    let mut env = setup_masq(true, (61000, 61003));
    let data: Vec<u8> = (0..600u32).map(|i| (i * 11) as u8).collect();
    let seg = udp_csum(CLIENT, OUTSIDE, 40030, 53, &data);
    let mut got = Vec::new();
    for f in fragments(CLIENT, OUTSIDE, 17, 0x4343, &seg, 304) {
        let frame = eth(PEER_UL_MAC, CNI0_MAC, ETH_P_IP, &f);
        let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &frame);
        assert_eq!(rc, TC_ACT_OK);
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.dst()), (OUR_IP, OUTSIDE), "every fragment");
        got.push(p);
    }
    let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
    let nat = u16::from_be_bytes([whole[0], whole[1]]);
    assert!((61000..=61003).contains(&nat));
    assert_eq!(&whole[8..], &data[..], "data untouched");
    assert!(
        l4_checksum_ok(OUR_IP, OUTSIDE, 17, &whole),
        "UDP checksum of the reassembled datagram"
    );
    // The answer, fragmented on the way back.
    let seg = udp_csum(OUTSIDE, OUR_IP, 53, nat, &data);
    let mut got = Vec::new();
    for f in fragments(OUTSIDE, OUR_IP, 17, 0x5454, &seg, 304) {
        let frame = eth(env.ul_mac, PEER_UL_MAC, ETH_P_IP, &f);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &frame);
        assert_eq!(rc, TC_ACT_OK);
        let p = parse_eth_ipv4(&out).1;
        assert_eq!((p.src(), p.dst()), (OUTSIDE, CLIENT), "every fragment");
        got.push(p);
    }
    let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
    assert_eq!(u16::from_be_bytes([whole[2], whole[3]]), 40030);
    assert!(l4_checksum_ok(OUTSIDE, CLIENT, 17, &whole));
    assert_counters(
        &env,
        &[(Stat::MasqForward, 2), (Stat::MasqReverse, 2)],
        "fragments",
    );
});

root_test!(nodeport_snat_port_of_a_closed_flow_is_taken_over, || {
    // One NAT port: a second client gets it only once the first
    // client's flow is closed (as netfilter reuses a tuple in
    // TIME_WAIT), not after the 120 s a closed flow is remembered.
    let mut env = setup_masq(false, (61000, 61000));
    route_outside();
    let remote = Ipv4Addr::new(10, 244, 2, 7);
    set_ns_frontend(
        &mut env,
        NODE_PORT,
        6,
        vec![backend(remote, 8080)],
        TrafficPolicy::Cluster,
    );
    let ul_mac = env.ul_mac;
    let syn = |sport| {
        let l4 = tcp(OUTSIDE, OUR_IP, sport, NODE_PORT, 1000, 0, TCP_SYN, b"");
        eth(
            ul_mac,
            PEER_UL_MAC,
            ETH_P_IP,
            &ipv4(OUTSIDE, OUR_IP, 6, 0, &l4),
        )
    };
    let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &syn(50000));
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(parse_vxlan(&out).inner_ipv4().tcp().source_port, 61000);
    // The only port is held by a live flow: the second client waits.
    run_tc(&mut env, prog_names::FROM_UNDERLAY, &syn(50001));
    assert_counters(
        &env,
        &[
            (Stat::Encapsulated, 1),
            (Stat::NpForward, 1),
            (Stat::DropNpNatPorts, 1),
        ],
        "one port, one live flow",
    );
    // The first client resets its connection: the flow is closed.
    let rst = tcp(OUTSIDE, OUR_IP, 50000, NODE_PORT, 1001, 0, TCP_RST, b"");
    let f = from_outside(&env, &rst, 6);
    run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &syn(50001));
    assert_eq!(rc, TC_ACT_REDIRECT, "the closed flow's port is taken over");
    let inner = parse_vxlan(&out).inner_ipv4();
    assert_eq!(
        (inner.src(), inner.tcp().source_port),
        (Ipv4Addr::new(10, 244, 1, 1), 61000)
    );
});

root_test!(
    a_north_south_frontend_without_endpoints_rejects_and_counts_per_frontend,
    || {
        // Per-frontend counters, as ClusterIPs have.
        let remote = Ipv4Addr::new(10, 244, 2, 7);
        let mut env = ns_setup(6, vec![backend(remote, 8080)], TrafficPolicy::Cluster);
        let syn = tcp(OUTSIDE, OUR_IP, 50000, NODE_PORT, 1000, 0, TCP_SYN, b"");
        let f = from_outside(&env, &syn, 6);
        let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let ack = tcp(
            OUTSIDE, OUR_IP, 50000, NODE_PORT, 1001, 1, TCP_ACK, b"hello",
        );
        let f = from_outside(&env, &ack, 6);
        run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        let c = env.dp.maps().svc_counters();
        let (_, c) = c
            .iter()
            .find(|(k, _)| *k == ns_key(NODE_PORT, 6))
            .expect("the nodePort's counters");
        assert_eq!((c.new_flows, c.packets, c.rejections), (1, 2, 0));
        assert!(c.bytes > 0);

        // No endpoints anywhere (whatever the policy): refused as
        // kube-proxy's REJECT, back out of the underlay: TCP RST, ICMP
        // port unreachable.
        set_ns_frontend(&mut env, NODE_PORT, 6, vec![], TrafficPolicy::Cluster);
        set_ns_frontend(&mut env, NODE_PORT, 17, vec![], TrafficPolicy::Local);
        let syn = tcp(OUTSIDE, OUR_IP, 50001, NODE_PORT, 2000, 0, TCP_SYN, b"");
        let f = from_outside(&env, &syn, 6);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_REDIRECT, "the RST goes back the way it came");
        let (e, rst) = parse_eth_ipv4(&out);
        assert_eq!(e.destination, PEER_UL_MAC);
        assert_eq!((rst.src(), rst.dst()), (OUR_IP, OUTSIDE));
        let t = rst.tcp();
        assert!(t.rst && t.ack, "RST+ACK");
        assert_eq!((t.source_port, t.destination_port), (NODE_PORT, 50001));
        assert_eq!(t.acknowledgment_number, 2001);

        let q = udp_csum(OUTSIDE, OUR_IP, 50002, NODE_PORT, b"query");
        let f = from_outside(&env, &q, 17);
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &f);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (e, icmp) = parse_eth_ipv4(&out);
        assert_eq!(e.destination, PEER_UL_MAC);
        assert_eq!((icmp.src(), icmp.dst()), (OUR_IP, OUTSIDE));
        assert_eq!(
            icmp.icmp().icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        );
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 2),
                (Stat::NpForward, 2),
                (Stat::NpRejectNoBackend, 2),
            ],
            "forwarded, then refused",
        );
        let c = env.dp.maps().svc_counters();
        let rejections = |k| c.iter().find(|(f, _)| *f == k).map(|(_, c)| c.rejections);
        assert_eq!(rejections(ns_key(NODE_PORT, 6)), Some(1));
        assert_eq!(rejections(ns_key(NODE_PORT, 17)), Some(1));
    }
);

root_test!(masquerade_port_of_a_closed_flow_is_taken_over, || {
    // One NAT port: a second connection to the same destination gets it
    // once the first is closed, not after the 120 s TIME_WAIT timeout.
    let mut env = setup_masq(true, (61000, 61000));
    let syn = |sport| {
        let l4 = tcp(CLIENT, OUTSIDE, sport, 443, 1, 0, TCP_SYN, b"");
        leaving(CLIENT, OUTSIDE, 6, &l4)
    };
    let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &syn(40000));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(parse_eth_ipv4(&out).1.tcp().source_port, 61000);
    let (rc, _) = run_tc(&mut env, prog_names::TO_UNDERLAY, &syn(40001));
    assert_eq!(rc, TC_ACT_SHOT, "the only port is held by a live flow");
    assert_eq!(stat(&env, Stat::DropMasqExhausted), 1);
    // The first connection is reset by the pod: closed.
    let rst = tcp(CLIENT, OUTSIDE, 40000, 443, 2, 0, TCP_RST, b"");
    run_tc(
        &mut env,
        prog_names::TO_UNDERLAY,
        &leaving(CLIENT, OUTSIDE, 6, &rst),
    );
    let (rc, out) = run_tc(&mut env, prog_names::TO_UNDERLAY, &syn(40001));
    assert_eq!(rc, TC_ACT_OK, "the closed flow's port is taken over");
    assert_eq!(parse_eth_ipv4(&out).1.tcp().source_port, 61000);
    let flows = masq_flows(&mut env);
    assert_eq!(flows.len(), 1, "the closed flow is gone: {flows:?}");
    // The answer on the port goes to the new connection.
    let synack = tcp(OUTSIDE, OUR_IP, 443, 61000, 7, 2, TCP_SYN | TCP_ACK, b"");
    let (rc, back) = arrive(&mut env, OUTSIDE, 6, &synack);
    assert_eq!(rc, TC_ACT_OK);
    let p = parse_eth_ipv4(&back).1;
    assert_eq!((p.dst(), p.tcp().destination_port), (CLIENT, 40001));
    // A live flow's port is never taken: a third connection waits.
    let (rc, _) = run_tc(&mut env, prog_names::TO_UNDERLAY, &syn(40002));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(stat(&env, Stat::DropMasqExhausted), 2);
});

root_test!(
    north_south_fragments_and_icmp_errors_are_translated_both_ways,
    || {
        let remote = Ipv4Addr::new(10, 244, 2, 7);
        let gw = Ipv4Addr::new(10, 244, 1, 1);
        let mut env = ns_setup(17, vec![backend(remote, 5353)], TrafficPolicy::Cluster);
        let ul = env.ul_mac;
        let outside_frame = |ip: &[u8]| eth(ul, PEER_UL_MAC, ETH_P_IP, ip);

        // A fragmented datagram from outside: both fragments go to the
        // backend, SNATed to the gateway address.
        let data: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
        let seg = udp_csum(OUTSIDE, OUR_IP, 50010, NODE_PORT, &data);
        let mut got = Vec::new();
        for f in fragments(OUTSIDE, OUR_IP, 17, 0x4343, &seg, 304) {
            let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &outside_frame(&f));
            assert_eq!(rc, TC_ACT_REDIRECT, "fragment encapsulated");
            let v = parse_vxlan(&out);
            assert_eq!(v.dst_ip, PEER_IP);
            let p = v.inner_ipv4();
            assert_eq!((p.src(), p.dst()), (gw, remote), "SNAT and DNAT");
            got.push(p);
        }
        let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
        let nat_port = u16::from_be_bytes([whole[0], whole[1]]);
        assert_eq!(
            &whole[2..4],
            &5353u16.to_be_bytes(),
            "to the backend's port"
        );
        assert_eq!(&whole[8..], &data[..]);
        assert!(l4_checksum_ok(gw, remote, 17, &whole), "datagram checksum");

        // The backend's fragmented reply, in VXLAN to the gateway address:
        // both fragments leave by the underlay from the nodePort.
        let seg = udp_csum(remote, gw, 5353, nat_port, &data);
        let mut got = Vec::new();
        for f in fragments(remote, gw, 17, 0x5252, &seg, 304) {
            let (rc, out) = run_tc(
                &mut env,
                prog_names::FROM_UNDERLAY,
                &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &f, ul),
            );
            assert_eq!(rc, TC_ACT_REDIRECT);
            let (e, p) = parse_eth_ipv4(&out);
            assert_eq!(e.destination, PEER_UL_MAC, "to the router");
            assert_eq!((p.src(), p.dst()), (OUR_IP, OUTSIDE));
            got.push(p);
        }
        let whole: Vec<u8> = got.iter().flat_map(|p| p.payload.clone()).collect();
        assert_eq!(&whole[0..2], &NODE_PORT.to_be_bytes());
        assert_eq!(&whole[2..4], &50010u16.to_be_bytes());
        assert!(l4_checksum_ok(OUR_IP, OUTSIDE, 17, &whole));
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 2),
                (Stat::NpForward, 2),
                (Stat::NpReverse, 2),
                (Stat::NpToUnderlay, 2),
            ],
            "fragments both ways",
        );

        // The backend refuses a datagram (port unreachable, in VXLAN to the
        // gateway): the client gets it from the nodePort, quoting what it sent.
        let sent = ipv4(
            gw,
            remote,
            17,
            0,
            &udp_csum(gw, remote, nat_port, 5353, b"q"),
        );
        let err = ipv4(remote, gw, 1, 0xc0, &icmp_error(3, 3, [0; 4], &sent));
        let (rc, out) = run_tc(
            &mut env,
            prog_names::FROM_UNDERLAY,
            &vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &err, ul),
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        let (e, p) = parse_eth_ipv4(&out);
        assert_eq!(e.destination, PEER_UL_MAC);
        assert_eq!((p.src(), p.dst()), (OUR_IP, OUTSIDE), "from the frontend");
        let (q, rest) = parse_quote(&p.payload);
        assert_eq!(
            (Ipv4Addr::from(q.source), Ipv4Addr::from(q.destination)),
            (OUTSIDE, OUR_IP),
            "the quote as the client sent it"
        );
        assert_eq!(&rest[0..2], &50010u16.to_be_bytes());
        assert_eq!(&rest[2..4], &NODE_PORT.to_be_bytes());

        // A router on the client's path says the reply is too big: the error
        // goes on to the backend, quoting the reply as the backend sent it.
        let router = Ipv4Addr::new(203, 0, 113, 1);
        let reply = ipv4(
            OUR_IP,
            OUTSIDE,
            17,
            0,
            &udp_csum(OUR_IP, OUTSIDE, NODE_PORT, 50010, b"a"),
        );
        let mtu = [0, 0, 0x04, 0xb0];
        let err = ipv4(router, OUR_IP, 1, 0xc0, &icmp_error(3, 4, mtu, &reply));
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &outside_frame(&err));
        assert_eq!(rc, TC_ACT_REDIRECT, "encapsulated to the backend");
        let p = parse_vxlan(&out).inner_ipv4();
        assert_eq!(
            (p.src(), p.dst()),
            (gw, remote),
            "from the gateway (the overlay carries only this node's subnet)"
        );
        let (q, rest) = parse_quote(&p.payload);
        assert_eq!(
            (Ipv4Addr::from(q.source), Ipv4Addr::from(q.destination)),
            (remote, gw)
        );
        assert_eq!(&rest[0..2], &5353u16.to_be_bytes());
        assert_eq!(&rest[2..4], &nat_port.to_be_bytes());
        assert!(
            l4_checksum_ok(remote, gw, 17, &rest),
            "the quoted UDP checksum, fixed"
        );
        assert_counters(
            &env,
            &[
                (Stat::Encapsulated, 3),
                (Stat::NpForward, 2),
                (Stat::NpReverse, 2),
                (Stat::NpToUnderlay, 3),
                (Stat::NpIcmpReverse, 1),
                (Stat::NpIcmpForward, 1),
            ],
            "ICMP errors both ways",
        );
        // An error about no north-south flow is the host's.
        let other = ipv4(
            OUR_IP,
            OUTSIDE,
            17,
            0,
            &udp_csum(OUR_IP, OUTSIDE, 22, 50010, b"a"),
        );
        let err = outside_frame(&ipv4(
            router,
            OUR_IP,
            1,
            0xc0,
            &icmp_error(3, 4, mtu, &other),
        ));
        let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &err);
        assert_eq!((rc, out), (TC_ACT_OK, err));
    }
);

/// The verifier walks every path of a program, up to a million
/// instructions; past that the program does not load at all (`E2BIG`),
/// and the agent with it. Every program must stay well inside, so that a
/// change that brings one near is seen here, with the numbers, and not
/// as a load failure.
const VERIFIER_BUDGET: u32 = 500_000;

root_test!(every_program_stays_well_inside_the_verifier_limit, || {
    let mut env = setup();
    let mut counts = Vec::new();
    for (name, prog) in env.dp.ebpf_mut().programs() {
        let n = prog
            .info()
            .unwrap()
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (5.16+)");
        counts.push((name.to_string(), n));
    }
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    eprintln!("instructions the verifier processed: {counts:?}");
    assert!(counts.len() >= 10, "{counts:?}");
    for (name, n) in &counts {
        assert!(
            *n < VERIFIER_BUDGET,
            "{name}: the verifier processed {n} instructions, near its limit of 1,000,000"
        );
    }
});
