//! Pods through CNI end to end, with the real agent: two nodes, their
//! agents writing the conflist and serving the socket, pods made by
//! running `dataplane-cni` as a container runtime does (netconf taken from
//! the conflist the agent wrote), next to pods on the stock bridge path.
//!
//! Needs the plugin next to the agent (`cargo build -p dataplane --bins`)
//! and host-local in /usr/lib/cni (`cargo xtask setup`).

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use dataplane::cni::device::host_ifname;
use dataplane_common::{EndpointInfo, EndpointKey, PodPortInfo, PodPortKey, map_names};
use serde_json::{Value, json};
use tests::{
    netns::require_root,
    svc::{Backend, Ep, endpoint_slice, service, udp_ask},
    topo::{Cluster, Node, agent_bin},
};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// Two nodes with agents, ready.
fn cluster() -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        assert!(
            c.nodes[i].conflist().is_none(),
            "no conflist before the agent runs"
        );
        c.start_agent(i, &[]).unwrap();
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(30)).unwrap();
    }
    for i in 0..2 {
        wait_for(&c, i, "peer added", 1);
    }
    c
}

/// Waits until node `i`'s log holds `what` at least `n` times.
fn wait_for(c: &Cluster, i: usize, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.nodes[i].log().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "node {}: no {what:?} (x{n}) in the log:\n{}",
            i + 1,
            c.nodes[i].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pinned<K: aya::Pod, V: aya::Pod>(node: &Node, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(node.pin_path.join(name)).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

fn endpoint(node: &Node, ip: Ipv4Addr) -> Option<EndpointInfo> {
    pinned::<EndpointKey, EndpointInfo>(node, map_names::ENDPOINTS)
        .get(&EndpointKey { ip: ip.octets() }, 0)
        .ok()
}

fn pod_port(node: &Node, ifindex: u32) -> Option<PodPortInfo> {
    pinned::<PodPortKey, PodPortInfo>(node, map_names::POD_PORTS)
        .get(&PodPortKey { ifindex }, 0)
        .ok()
}

/// The ifindex of `name` in the node's namespace, if it exists.
fn ifindex(node: &Node, name: &str) -> Option<u32> {
    let out = node.ns.sh(&format!("ip -j link show dev {name}")).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v[0]["ifindex"].as_u64().map(|i| i as u32)
}

/// A counter of node `i`, read the operator's way.
fn counter(node: &Node, name: &str) -> u64 {
    let out = Command::new(agent_bin())
        .args(["stats", "--pin-path"])
        .arg(&node.pin_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no counter {name}"))
}

fn ping(c: &Cluster, node: usize, pod: usize, dst: Ipv4Addr) {
    c.ping(node, pod, dst, 2).unwrap_or_else(|e| {
        panic!(
            "node {} pod {pod} cannot reach {dst}: {e:#}\nnode 1:\n{}\nnode 2:\n{}",
            node + 1,
            c.nodes[0].log(),
            c.nodes[1].log()
        )
    });
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn cni_pods_through_the_agent() {
    require_root();
    let mut c = cluster();

    // The conflist: written once the lease was held, for the lease.
    for i in 0..2 {
        let node = &c.nodes[i];
        let env = node.subnet_env().unwrap();
        let list = node.conflist().expect("conflist written");
        let gw = Ipv4Addr::from(u32::from(env.subnet.network()) + 1);
        assert_eq!(list["cniVersion"], "1.1.0");
        let plugin = &list["plugins"][0];
        assert_eq!(plugin["type"], "dataplane-cni");
        assert_eq!(plugin["agentSocket"], json!(node.cni_socket()));
        assert_eq!(plugin["mtu"], env.mtu);
        assert_eq!(plugin["podDevice"], "veth", "this kernel has no netkit");
        assert_eq!(
            plugin["ipam"]["ranges"],
            json!([[{ "subnet": env.subnet.to_string(), "gateway": gw.to_string() }]])
        );
        assert_eq!(
            plugin["ipam"]["dataDir"],
            json!(node.cni_state_dir().join("ipam"))
        );
    }

    // Pods: a CNI pod and a bridge pod on each node.
    let a = c.add_cni_pod(0, "ctr-a").unwrap(); // node 1, pod 0
    let b = c.add_cni_pod(1, "ctr-b").unwrap(); // node 2, pod 0
    c.add_pod(0).unwrap(); // node 1, pod 1
    c.add_pod(1).unwrap(); // node 2, pod 1
    wait_for(&c, 0, "attached from_pod to pod port", 1);
    wait_for(&c, 1, "attached from_pod to pod port", 1);
    let (ip_a, ip_b) = (c.nodes[0].pods[a].ip, c.nodes[1].pods[b].ip);
    let (br1, br2) = (c.nodes[0].pods[1].ip, c.nodes[1].pods[1].ip);

    // Registered: endpoint entry (host side, pod MAC, host MAC as the
    // gateway's) and port guard.
    let host_a = host_ifname("ctr-a", "eth0");
    let idx_a = ifindex(&c.nodes[0], &host_a).unwrap();
    let ep = endpoint(&c.nodes[0], ip_a).expect("endpoint registered");
    assert_eq!(ep.ifindex, idx_a);
    let port = pod_port(&c.nodes[0], idx_a).expect("pod port registered");
    assert_eq!(port.ip, ip_a.octets());
    assert_eq!(port.mac, ep.mac);

    // Across nodes, CNI to CNI, and mixed with the bridge path both ways;
    // on one node, CNI pod and bridge pod.
    ping(&c, 0, a, ip_b);
    ping(&c, 1, b, ip_a);
    ping(&c, 0, a, br2);
    ping(&c, 1, 1, ip_a);
    ping(&c, 0, a, br1);
    ping(&c, 0, 1, ip_a);
    assert!(
        endpoint(&c.nodes[0], ip_a).unwrap() == ep,
        "traffic did not repoint the registered entry"
    );

    // A Service backed by the CNI pod of node 2; the first packet of a
    // fresh CNI pod on node 1 is translated.
    let _backend = Backend::start(&c.nodes[1].pods[b].ns, ip_b).unwrap();
    c.apply_yaml(&format!(
        "{}---\n{}",
        service("web", VIP, ""),
        endpoint_slice("web", &[Ep::ready(ip_b)])
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while udp_ask(&c.nodes[0].pods[a].ns, VIP, 53, Duration::from_millis(500)).as_deref()
        != Ok(&ip_b.to_string())
    {
        assert!(Instant::now() < deadline, "service never answered");
    }
    let fresh = c.add_cni_pod(0, "ctr-fresh").unwrap();
    let answer = udp_ask(&c.nodes[0].pods[fresh].ns, VIP, 53, Duration::from_secs(3));
    assert_eq!(answer.as_deref(), Ok(ip_b.to_string().as_str()));
    // And a backend on the same node as its client, a CNI pod: delivered
    // straight into it.
    let local = c.nodes[0].pods[fresh].ip;
    let _local_backend = Backend::start(&c.nodes[0].pods[fresh].ns, local).unwrap();
    c.apply_yaml(&endpoint_slice("web", &[Ep::ready(local)]))
        .unwrap();
    let before = counter(&c.nodes[0], "redirect_to_pod");
    let deadline = Instant::now() + Duration::from_secs(20);
    while udp_ask(&c.nodes[0].pods[a].ns, VIP, 53, Duration::from_millis(500)).as_deref()
        != Ok(&local.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "local CNI backend never answered"
        );
    }
    assert!(counter(&c.nodes[0], "redirect_to_pod") > before);

    // Anti-spoofing: a forged source address, then a forged MAC.
    let pod_a = &c.nodes[0].pods[a].ns;
    let forged = Ipv4Addr::from(u32::from(ip_a) + 100);
    let ip_drops = counter(&c.nodes[0], "drop_spoofed_ip");
    pod_a
        .sh(&format!("ip addr add {forged}/32 dev eth0"))
        .unwrap();
    assert!(
        pod_a
            .sh(&format!("ping -c 2 -i 0.2 -W 1 -I {forged} {ip_b}"))
            .is_err(),
        "a forged source address got through"
    );
    pod_a
        .sh(&format!("ip addr del {forged}/32 dev eth0"))
        .unwrap();
    assert!(counter(&c.nodes[0], "drop_spoofed_ip") >= ip_drops + 2);
    let mac_drops = counter(&c.nodes[0], "drop_spoofed_mac");
    let link: Value = serde_json::from_str(&pod_a.sh("ip -j link show dev eth0").unwrap()).unwrap();
    let own_mac = link[0]["address"].as_str().unwrap().to_string();
    pod_a
        .sh("ip link set dev eth0 address 02:66:66:66:66:66")
        .unwrap();
    assert!(
        pod_a.sh(&format!("ping -c 2 -i 0.2 -W 1 {ip_b}")).is_err(),
        "a forged MAC got through"
    );
    // Changing a MAC flushes the device's neighbour table, the gateway's
    // permanent entry included: put both back as ADD made them.
    let gw_mac = c.nodes[0].pods[a].cni.as_ref().unwrap().result["interfaces"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let gw = c.nodes[0].pods[a].cni.as_ref().unwrap().result["ips"][0]["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    pod_a
        .sh(&format!(
            "ip link set dev eth0 address {own_mac} && \
             ip neigh replace {gw} lladdr {gw_mac} dev eth0 nud permanent"
        ))
        .unwrap();
    assert!(counter(&c.nodes[0], "drop_spoofed_mac") >= mac_drops + 2);
    ping(&c, 0, a, ip_b);

    // STATUS with the agent up.
    let conf = c.nodes[0].cni_netconf(None).unwrap();
    c.nodes[0]
        .run_cni("STATUS", &[], &conf)
        .unwrap()
        .check("STATUS")
        .unwrap();

    // Agent restart: the CNI pods are re-adopted, still reachable, CHECK
    // passes.
    c.nodes[0].stop_agent();
    c.start_agent(0, &[]).unwrap();
    wait_for(&c, 0, "agent ready", 2);
    wait_for(&c, 0, "re-adopted 2 CNI pods", 1);
    ping(&c, 1, b, ip_a);
    ping(&c, 0, a, ip_b);
    c.nodes[0]
        .cni_command("CHECK", a)
        .unwrap()
        .check("CHECK after a restart")
        .unwrap();

    // DEL: endpoint entry, port guard and device go.
    let old_mac = ep.mac;
    c.nodes[0]
        .cni_command("DEL", a)
        .unwrap()
        .check("DEL")
        .unwrap();
    assert!(endpoint(&c.nodes[0], ip_a).is_none(), "endpoint left");
    assert!(pod_port(&c.nodes[0], idx_a).is_none(), "pod port left");
    assert!(ifindex(&c.nodes[0], &host_a).is_none(), "device left");
    // DEL again is fine.
    c.nodes[0]
        .cni_command("DEL", a)
        .unwrap()
        .check("second DEL")
        .unwrap();

    // Address reuse: a new container gets the same address and is
    // reachable from the other node at once.
    let id = c.id.clone();
    let reused = c.nodes[0]
        .add_cni_pod(&id, "ctr-reuse", Some(&format!("IP={ip_a}")))
        .unwrap();
    assert_eq!(c.nodes[0].pods[reused].ip, ip_a);
    let ep = endpoint(&c.nodes[0], ip_a).unwrap();
    assert_ne!(ep.mac, old_mac, "a new pod");
    c.nodes[1].pods[b]
        .ns
        .sh(&format!("ping -c 1 -W 2 {ip_a} >/dev/null"))
        .expect("the reused address is reachable at once");

    // GC: the runtime knows every attachment but the fresh pod's; that
    // one is deleted (agent, device, address).
    let mut conf = c.nodes[0].cni_netconf(None).unwrap();
    conf["cni.dev/valid-attachments"] = json!([{ "containerID": "ctr-reuse", "ifname": "eth0" }]);
    c.nodes[0]
        .run_cni("GC", &[], &conf)
        .unwrap()
        .check("GC")
        .unwrap();
    assert!(endpoint(&c.nodes[0], local).is_none());
    assert!(ifindex(&c.nodes[0], &host_ifname("ctr-fresh", "eth0")).is_none());
    assert!(endpoint(&c.nodes[0], ip_a).is_some(), "the valid one stays");
    c.nodes[1].pods[b]
        .ns
        .sh(&format!("ping -c 1 -W 2 {ip_a} >/dev/null"))
        .expect("the valid pod is still reachable");
}
