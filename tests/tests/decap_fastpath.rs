//! Decapsulation straight into the pod (endpoints_v1 + bpf_redirect_peer)
//! versus through the bridge, in TC and XDP mode.
//!
//! `from_pod` learns each pod's address, MAC and port into `endpoints_v1`
//! from the packets it sends; `decap_direct_to_pod` relies on that (its
//! pings teach the map). `decap_perf` can also fill the map by hand
//! (pod IPv4 -> host-side veth ifindex, pod MAC, bridge MAC) or leave it
//! empty to measure the bridge path.
//!
//! - `decap_direct_to_pod`: correctness of the direct path (checksummed
//!   bulk TCP both ways, ping, the pod sees its own MAC as destination and
//!   the bridge MAC as source, and GSO packets arrive whole, not segmented
//!   by the bridge).
//! - `decap_perf` (ignored): iperf3 pod -> pod both ways, printing Gbit/s
//!   and retransmits. `cargo test -p tests --test decap_fastpath --
//!   --ignored --nocapture`; env DECAP_MODE=tc,xdp, ENDPOINTS=0|1 (fill
//!   the map or leave it empty = bridge path), SECS, REPS.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use dataplane_common::{EndpointInfo, EndpointKey, map_names};
use tests::{
    netns::{NetNs, require_root},
    topo::Cluster,
    traffic::bulk_tcp,
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn cluster(mode: &str) -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", mode]).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    for i in 0..2 {
        c.add_pod(i).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..2 {
        while !c.nodes[i].log().contains("attached from_pod to pod port") {
            assert!(
                Instant::now() < deadline,
                "pod port not attached:\n{}",
                c.nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    c
}

/// `ip -o link show dev` in `ns`: (ifindex, MAC).
fn link(ns: &NetNs, dev: &str) -> (u32, [u8; 6]) {
    let out = ns.sh(&format!("ip -o link show dev {dev}")).unwrap();
    let ifindex = out.split(':').next().unwrap().trim().parse().unwrap();
    let mac = out
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let mut m = [0u8; 6];
    for (b, s) in m.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(s, 16).unwrap();
    }
    (ifindex, m)
}

/// Node `i`'s endpoints_v1 map.
fn endpoints_map(c: &Cluster, i: usize) -> HashMap<MapData, EndpointKey, EndpointInfo> {
    let pin = c.nodes[i].pin_path.join(map_names::ENDPOINTS);
    let data = if pin.exists() {
        MapData::from_pin(&pin).unwrap()
    } else {
        let cfg_id = MapInfo::from_pin(c.nodes[i].pin_path.join(map_names::NODE_CONFIG))
            .unwrap()
            .id();
        let id = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| p.map_ids().ok().flatten())
            .filter(|ids| ids.contains(&cfg_id))
            .flatten()
            .find(|&id| {
                MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(map_names::ENDPOINTS))
            })
            .expect("no endpoints_v1 map next to this node's node_cfg_v2");
        MapData::from_id(id).unwrap()
    };
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

/// Lists every pod of node `i` in its endpoints map, as the agent should.
fn fill_endpoints(c: &Cluster, i: usize) {
    let node = &c.nodes[i];
    let mut map = endpoints_map(c, i);
    let (_, gw_mac) = link(&node.ns, "cni0");
    for pod in &node.pods {
        let (ifindex, _) = link(&node.ns, &pod.host_if);
        let (_, mac) = link(&pod.ns, "eth0");
        map.insert(
            EndpointKey {
                ip: pod.ip.octets(),
            },
            EndpointInfo {
                ifindex,
                mac,
                gw_mac,
            },
            0,
        )
        .unwrap();
    }
}

fn rx_packets(ns: &NetNs, dev: &str) -> u64 {
    ns.sh(&format!(
        "cat /proc/net/dev | awk -F'[: ]+' '$2==\"{dev}\" {{print $4}}'"
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

fn iperf(c: &Cluster, from: usize, to: usize, secs: u32) -> (f64, u64) {
    let (a, b) = (&c.nodes[from].pods[0], &c.nodes[to].pods[0]);
    let mut srv =
        b.ns.command("iperf3")
            .args(["-s", "-1", "-B", &b.ip.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out =
        a.ns.command("iperf3")
            .args(["-c", &b.ip.to_string(), "-t", &secs.to_string(), "-J"])
            .output()
            .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    (
        bps / 1e9,
        end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    )
}

fn ping(c: &Cluster, from: usize, dst: Ipv4Addr) {
    for _ in 0..50 {
        if c.ping(from, 0, dst, 1).is_ok() {
            return;
        }
    }
    panic!("pod on node {} cannot reach {dst}", from + 1);
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn decap_direct_to_pod() {
    require_root();
    for mode in ["tc", "xdp"] {
        let c = cluster(mode);
        let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
        // These pings also teach both agents' data paths where the pods are.
        ping(&c, 0, b.ip);
        ping(&c, 1, a.ip);
        for (n, pod) in [(0usize, a), (1, b)] {
            let map = endpoints_map(&c, n);
            assert!(
                map.get(
                    &EndpointKey {
                        ip: pod.ip.octets()
                    },
                    0
                )
                .is_ok(),
                "[{mode}] node {} learnt its pod",
                n + 1
            );
        }

        // The pod receives frames addressed to itself from the bridge MAC.
        let (_, b_mac) = link(&b.ns, "eth0");
        let (_, gw_mac) = link(&c.nodes[1].ns, "cni0");
        let fmt = |m: [u8; 6]| {
            m.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let mut dump =
            b.ns.command("tcpdump")
                .args([
                    "-c",
                    "1",
                    "-e",
                    "-n",
                    "-l",
                    "-i",
                    "eth0",
                    "icmp[icmptype] == 8",
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn();
        if let Ok(d) = dump.as_mut() {
            // Ping until tcpdump (-c 1) has caught one: on a loaded machine
            // it may take a while before it listens.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(d.try_wait(), Ok(None)) {
                let _ = c.ping(0, 0, b.ip, 1);
                std::thread::sleep(Duration::from_millis(200));
            }
            let out = d.wait_with_output_timeout();
            assert!(
                out.contains(&format!("{} > {}", fmt(gw_mac), fmt(b_mac))),
                "[{mode}] frame in pod: {out}"
            );
            eprintln!("[{mode}] in the pod: {}", out.trim());
        }

        // Bulk TCP both ways, checksummed end to end.
        let rx_before = rx_packets(&b.ns, "eth0");
        let r = bulk_tcp(&b.ns, b.ip, &a.ns, 64 << 20).unwrap();
        assert_eq!(
            r.sent_sum, r.received_sum,
            "[{mode}] checksum mismatch a -> b"
        );
        let pkts = rx_packets(&b.ns, "eth0") - rx_before;
        let r = bulk_tcp(&a.ns, a.ip, &b.ns, 64 << 20).unwrap();
        assert_eq!(
            r.sent_sum, r.received_sum,
            "[{mode}] checksum mismatch b -> a"
        );
        // In TC mode the GSO packets reach the pod whole (veth underlay):
        // 64 MB in far fewer than 64 MB / 1400 B packets.
        if mode == "tc" {
            assert!(
                pkts < (64 << 20) / 1400 / 4,
                "[{mode}] {pkts} packets: segmented on the way"
            );
        }
        eprintln!("[{mode}] ok, {pkts} packets into the pod for 64 MB");
    }
}

trait WaitTimeout {
    fn wait_with_output_timeout(self) -> String;
}

impl WaitTimeout for &mut std::process::Child {
    fn wait_with_output_timeout(self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.kill();
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut out) = self.stdout.take() {
            use std::io::Read;
            let _ = out.read_to_string(&mut s);
        }
        s
    }
}

#[test]
#[ignore = "manual measurement (`cargo xtask test` skips it): cargo test -p tests --test decap_fastpath decap_perf -- --ignored"]
fn decap_perf() {
    require_root();
    let modes = std::env::var("DECAP_MODE").unwrap_or_else(|_| "tc,xdp".into());
    let fill = std::env::var("ENDPOINTS").map_or(true, |v| v != "0");
    let secs = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let reps = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for mode in modes.split(',') {
        let c = cluster(mode);
        if fill {
            fill_endpoints(&c, 0);
            fill_endpoints(&c, 1);
        }
        ping(&c, 0, c.nodes[1].pods[0].ip);
        let path = if fill { "direct" } else { "bridge" };
        for _ in 0..reps {
            for (from, to) in [(0, 1), (1, 0)] {
                let (g, r) = iperf(&c, from, to, secs);
                println!(
                    "[{mode} {path}] n{}->n{}: {g:.2} Gbit/s, {r} retransmits",
                    from + 1,
                    to + 1
                );
            }
        }
        if let Some(h) = std::env::var("HOLD")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            println!(
                "holding {h}s: nodes {} {}",
                c.nodes[0].ns.name, c.nodes[1].ns.name
            );
            std::thread::sleep(Duration::from_secs(h));
        }
    }
}
