//! Packet-level tests of the BPF programs through BPF_PROG_TEST_RUN:
//! input frame -> expected action and output frame, as Katran's tests do.
//!
//! Each test runs in a private network namespace holding an underlay veth
//! (with a permanent neighbour for the peer, so the FIB lookup in the encap
//! path resolves) and a pod bridge.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use dataplane::{
    bpf::Dataplane,
    reconcile::{FrontendState, Frontends, Peer, Reconciler, Resync},
    services::ServiceName,
};
use dataplane_common::{NODE_CFG_READY, NodeConfig, Stat, prog_names};
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
    /// The frontends of the one test Service.
    fronts: Frontends,
}

impl Env {
    /// Programs one frontend of the test Service (its others stay).
    fn set_frontend(&mut self, key: SvcKey, state: FrontendState) {
        self.fronts.insert(key, state);
        let name = ServiceName::new("default", "test");
        self.rec
            .set_service(self.dp.maps(), &name, &self.fronts)
            .unwrap();
    }
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
    let mut dp = Dataplane::load_with(None).unwrap();
    let mut rec = Reconciler::new();
    rec.set_node(
        dp.maps(),
        &NodeConfig {
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
            _pad: [0; 2],
        },
    )
    .unwrap();
    let mut peers = std::collections::BTreeMap::new();
    peers.insert(
        "10.244.2.0/24".parse::<Ipv4Net>().unwrap(),
        Peer {
            public_ip: PEER_IP,
            vtep_mac: PEER_VTEP,
        },
    );
    rec.set_peers(dp.maps(), &peers, Resync::Full).unwrap();
    Env {
        dp,
        rec,
        ul_mac,
        fronts: Frontends::new(),
    }
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
        env.dp
            .stats()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .collect::<Vec<_>>()
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
    assert_eq!(p.vxlan, [0x08, 0, 0, 0, 0, 0, 1, 0], "flags I, VNI 1");
    assert_eq!(
        &p.inner[0..6],
        &PEER_VTEP,
        "inner destination = receiver's VtepMAC"
    );
    assert_eq!(&p.inner[6..12], &OUR_VTEP, "inner source = our VtepMAC");
    assert_eq!(&p.inner[12..14], &[0x08, 0x00]);
    assert_eq!(&p.inner[14..], &inner_ip[..], "inner IPv4 packet untouched");
    // ECN of the inner packet is copied to the outer header.
    assert_eq!(out[15] & 0x03, 0x02);
    assert_eq!(stat(&env, Stat::Encapsulated), 1);

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
    assert_eq!(stat(&env, Stat::PassLocal), 3);
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
    assert_eq!(stat(&env, Stat::DropNoPeer), 1);
});

root_test!(tc_decap_delivers_vxlan_from_a_peer, || {
    let mut env = setup();
    let inner = inner_pod_packet();
    let input = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, env.ul_mac);
    let (rc, out) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &input);
    assert_eq!(rc, TC_ACT_REDIRECT, "redirected to the pod bridge");
    assert_eq!(out.len(), input.len() - 50);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(
        &out[14..],
        &inner[..],
        "inner IPv4 packet behind an Ethernet header"
    );
    assert_eq!(stat(&env, Stat::Decapsulated), 1);
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
    // Truncated: VXLAN header cut short.
    let full = vxlan_from(PEER_IP, 0x08, 1, OUR_VTEP, &inner, ul);
    let mut cut = full[..46].to_vec();
    let ip_len = (cut.len() - 14) as u16;
    cut[16..18].copy_from_slice(&ip_len.to_be_bytes());
    let (rc, _) = run_tc(&mut env, prog_names::FROM_UNDERLAY, &cut);
    assert_eq!(rc, TC_ACT_SHOT, "truncated VXLAN");
    assert_eq!(stat(&env, Stat::DropTruncated), 1);

    // Not ours: other UDP port, other destination, TCP. Untouched.
    let other_port = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(
            PEER_IP,
            OUR_IP,
            17,
            0,
            &udp(1, 4789, &[0x08, 0, 0, 0, 0, 0, 1, 0]),
        ),
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
    assert_eq!(stat(&env, Stat::PassNotOverlay), 3);
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
    let out = &out[4..];
    assert_eq!(
        &out[0..6],
        &ul,
        "inner frame readdressed to the underlay interface"
    );
    assert_eq!(&out[6..12], &PEER_VTEP);
    assert_eq!(&out[14..], &inner[..]);
    assert_eq!(stat(&env, Stat::Decapsulated), 1);

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
    assert_eq!(stat(&env, Stat::DropUnknownPeer), 1);
    let plain = eth(
        ul,
        PEER_UL_MAC,
        ETH_P_IP,
        &ipv4(PEER_IP, OUR_IP, 6, 0, &[0u8; 20]),
    );
    let (rc, out) = run_xdp(&mut env, &plain);
    assert_eq!((rc, out), (XDP_PASS, plain), "non-VXLAN passes untouched");
});

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

fn syn_to_vip(sport: u16) -> Vec<u8> {
    let seg = tcp(CLIENT, VIP, sport, 80, 1000, 0, 0x02, b"");
    eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg))
}

root_test!(service_dnat_to_remote_backend_then_encap, || {
    let mut env = setup();
    let b = backend(Ipv4Addr::new(10, 244, 2, 7), 8080);
    env.set_frontend(
        svc_key(80, 6),
        FrontendState {
            backends: vec![b],
            affinity_timeout_s: None,
        },
    );
    let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40001));
    assert_eq!(rc, TC_ACT_REDIRECT);
    let p = parse_vxlan(&out);
    let inner_ip = &p.inner[14..];
    assert_eq!(&inner_ip[16..20], &[10, 244, 2, 7], "DNAT to the backend");
    assert_eq!(&inner_ip[22..24], &8080u16.to_be_bytes(), "backend port");
    assert_eq!(&inner_ip[12..16], &CLIENT.octets(), "source kept");
    assert!(
        ipv4_checksums_ok(inner_ip),
        "IPv4 and TCP checksums valid after NAT"
    );
    assert_eq!(stat(&env, Stat::SvcForward), 1);

    // The reply from the backend, arriving decapsulated on the underlay,
    // goes back to the client from the ClusterIP.
    let reply_seg = tcp(
        Ipv4Addr::new(10, 244, 2, 7),
        CLIENT,
        8080,
        40001,
        5000,
        1001,
        0x12,
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
    let ip = &out[14..];
    assert_eq!(&ip[12..16], &VIP.octets(), "reply source is the ClusterIP");
    assert_eq!(
        &ip[20..22],
        &80u16.to_be_bytes(),
        "reply source port is the service port"
    );
    assert!(ipv4_checksums_ok(ip));
    assert_eq!(stat(&env, Stat::SvcReverse), 1);
});

root_test!(
    service_without_backends_rejects_tcp_with_rst_and_udp_with_icmp,
    || {
        let mut env = setup();
        env.set_frontend(
            svc_key(80, 6),
            FrontendState {
                backends: vec![],
                affinity_timeout_s: None,
            },
        );
        env.set_frontend(
            svc_key(53, 17),
            FrontendState {
                backends: vec![],
                affinity_timeout_s: None,
            },
        );
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40002));
        assert_eq!(rc, TC_ACT_REDIRECT, "the RST goes straight back to the pod");
        assert_eq!(&out[0..6], &POD_MAC);
        let ip = &out[14..];
        assert_eq!(ip[9], 6);
        assert_eq!(&ip[12..16], &VIP.octets());
        assert_eq!(&ip[16..20], &CLIENT.octets());
        assert_eq!(ip[33] & 0x04, 0x04, "RST flag");
        assert_eq!(&ip[28..32], &1001u32.to_be_bytes(), "acknowledges the SYN");
        assert!(ipv4_checksums_ok(ip));
        assert_eq!(stat(&env, Stat::SvcRejectNoBackend), 1);

        let q = udp_csum(CLIENT, VIP, 5353, 53, b"query");
        let input = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 17, 0, &q));
        let (rc, out) = run_tc(&mut env, prog_names::FROM_POD, &input);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let ip = &out[14..];
        assert_eq!((ip[9], ip[20], ip[21]), (1, 3, 3), "ICMP port unreachable");
        assert_eq!(inet_csum(&ip[..20]), 0);
        assert_eq!(inet_csum(&ip[20..]), 0, "ICMP checksum");
        assert_eq!(
            &ip[28 + 16..28 + 20],
            &VIP.octets(),
            "quotes the original packet"
        );
    }
);

root_test!(service_undefined_port_and_midflow_without_conntrack, || {
    let mut env = setup();
    let b = backend(Ipv4Addr::new(10, 244, 2, 7), 8080);
    env.set_frontend(
        svc_key(80, 6),
        FrontendState {
            backends: vec![b],
            affinity_timeout_s: None,
        },
    );
    // Port 81 and UDP/80 are not defined: dropped, not forwarded raw.
    let seg = tcp(CLIENT, VIP, 40003, 81, 1, 0, 0x02, b"");
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    let u = udp_csum(CLIENT, VIP, 40003, 80, b"x");
    let (rc, _) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 17, 0, &u)),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(stat(&env, Stat::DropSvcUndefinedPort), 2);
    // An ACK with no tracked connection is reset.
    let seg = tcp(CLIENT, VIP, 40004, 80, 1, 77, 0x10, b"data");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[14 + 33], 0x04, "bare RST");
    assert_eq!(
        &out[14 + 24..14 + 28],
        &77u32.to_be_bytes(),
        "sequence = the segment's ACK"
    );
    assert_eq!(stat(&env, Stat::SvcRejectNoConntrack), 1);
});

root_test!(service_local_backend_and_hairpin, || {
    let mut env = setup();
    // The client itself is the only backend: hairpin, source rewritten.
    let b = backend(CLIENT, 8080);
    env.set_frontend(
        svc_key(80, 6),
        FrontendState {
            backends: vec![b],
            affinity_timeout_s: None,
        },
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40005));
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "local backends are handed to the bridge"
    );
    // The backend answers the hairpin address; it goes back as VIP -> client.
    let hp = Ipv4Addr::from(dataplane_common::HAIRPIN_SNAT_IP);
    let seg = tcp(CLIENT, hp, 8080, 40005, 9, 1001, 0x12, b"");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, hp, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    let ip = &out[14..];
    assert_eq!(
        (&ip[12..16], &ip[16..20]),
        (&VIP.octets()[..], &CLIENT.octets()[..])
    );
    assert_eq!(&ip[20..24], &[0, 80, 0x9c, 0x45], "ports: 80 -> 40005");
    assert!(ipv4_checksums_ok(ip));
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
    assert_eq!(&out[0..6], &POD_MAC, "to the pod's MAC");
    assert_eq!(&out[6..12], &CNI0_MAC, "from its gateway's MAC");
    assert_eq!(&out[14..], &inner[..]);
});

root_test!(removed_backend_flows_die_at_their_next_packet, || {
    let mut env = setup();
    let (a, b) = (
        backend(Ipv4Addr::new(10, 244, 2, 7), 8080),
        backend(Ipv4Addr::new(10, 244, 2, 8), 8080),
    );
    let udp_key = svc_key(53, 17);
    env.set_frontend(
        svc_key(80, 6),
        FrontendState {
            backends: vec![a],
            affinity_timeout_s: None,
        },
    );
    env.set_frontend(
        udp_key,
        FrontendState {
            backends: vec![a],
            affinity_timeout_s: None,
        },
    );
    let (rc, _) = run_tc(&mut env, prog_names::FROM_POD, &syn_to_vip(40010));
    assert_eq!(rc, TC_ACT_REDIRECT);
    let q = udp_csum(CLIENT, VIP, 40011, 53, b"q");
    let udp_frame = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 17, 0, &q));
    let (_, out) = run_tc(&mut env, prog_names::FROM_POD, &udp_frame);
    assert_eq!(&parse_vxlan(&out).inner[14 + 16..14 + 20], &[10, 244, 2, 7]);
    // Backend a goes, b comes: no conntrack scan, one live_v1 delete.
    for k in [svc_key(80, 6), udp_key] {
        env.set_frontend(
            k,
            FrontendState {
                backends: vec![b],
                affinity_timeout_s: None,
            },
        );
    }
    // The TCP flow's next segment is reset...
    let seg = tcp(CLIENT, VIP, 40010, 80, 1001, 5001, 0x10, b"more");
    let (rc, out) = run_tc(
        &mut env,
        prog_names::FROM_POD,
        &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(CLIENT, VIP, 6, 0, &seg)),
    );
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[14 + 33], 0x04, "RST for a flow whose backend is gone");
    // ...and the UDP flow's next datagram goes to the live backend.
    let (_, out) = run_tc(&mut env, prog_names::FROM_POD, &udp_frame);
    assert_eq!(
        &parse_vxlan(&out).inner[14 + 16..14 + 20],
        &[10, 244, 2, 8],
        "UDP re-balanced at once"
    );
});
