//! `cargo xtask demo`: a three-node cluster on this machine, in network
//! namespaces. Shows the leases, subnet.env files, the CNI conflist the
//! agents write, pods made through the CNI plugin pinging each other
//! across nodes through the BPF overlay, a short bulk transfer, the peer
//! map as bpftool prints it, and the data path counters. Cleans up on exit
//! and on Ctrl-C.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tests::{
    topo::{Cluster, agent_bin},
    traffic::bulk_tcp,
};

const NODES: usize = 3;
const PODS: usize = 2;
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn main() -> anyhow::Result<()> {
    tests::interrupt::install_signal_cleanup();
    let mut c = Cluster::new(NODES)?;
    tests::interrupt::register(&c);
    let r = run(&mut c);
    if let Err(e) = &r {
        eprintln!("demo failed: {e:#}");
        for n in &c.nodes {
            eprintln!("--- agent log, node {} ---\n{}", n.index + 1, n.log());
        }
    }
    drop(c);
    println!("\ncleaned up: agents stopped, namespaces and pins removed");
    r
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run(c: &mut Cluster) -> anyhow::Result<()> {
    step(&format!(
        "etcd at {} (inside namespace {}), network config",
        c.endpoint(),
        c.underlay.name
    ));
    c.put_config(CONFIG)?;
    println!("{}/config = {CONFIG}", c.prefix);

    step("starting one agent per node");
    for i in 0..NODES {
        c.start_agent(i, &[])?;
    }
    tests::interrupt::register(c);
    for i in 0..NODES {
        let env = c.wait_ready(i, Duration::from_secs(60))?;
        println!("node {} ({}): subnet {}", i + 1, c.nodes[i].ip, env.subnet);
    }

    step("subnet.env of node 1 (flannel's format)");
    print!("{}", std::fs::read_to_string(c.nodes[0].subnet_file())?);

    step("leases in etcd (dataplane leases)");
    let out = c
        .underlay
        .command(agent_bin().to_str().context("agent path")?)
        .args(["leases", "--etcd-endpoints", &c.endpoint()])
        .output()
        .context("dataplane leases")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step(&format!(
        "CNI conflist of node 1 ({}/10-dataplane.conflist)",
        c.nodes[0].cni_conf_dir().display()
    ));
    let list = c.nodes[0].conflist().context("node 1 wrote no conflist")?;
    println!("{}", serde_json::to_string_pretty(&list)?);

    step(&format!(
        "{PODS} pods per node, each made by running dataplane-cni ADD as a container runtime does"
    ));
    for i in 0..NODES {
        for j in 0..PODS {
            let p = c.add_cni_pod(i, &format!("demo-n{}-p{}", i + 1, j + 1))?;
            let pod = &c.nodes[i].pods[p];
            println!("node {} pod {} on {}", i + 1, pod.ip, pod.host_if);
        }
    }

    step("every pod pings every other pod");
    let pods: Vec<(usize, usize, std::net::Ipv4Addr)> = c
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.pods.iter().enumerate().map(move |(j, p)| (i, j, p.ip)))
        .collect();
    let mut ok = 0;
    for &(i, j, src) in &pods {
        let mut row = format!("{src:<13}");
        for &(_, _, dst) in &pods {
            if dst == src {
                row.push_str("   -  ");
                continue;
            }
            match c.ping(i, j, dst, 1) {
                Ok(()) => {
                    ok += 1;
                    row.push_str("   ok ");
                }
                Err(_) => row.push_str(" FAIL "),
            }
        }
        println!("{row}");
    }
    let total = pods.len() * (pods.len() - 1);
    println!("{ok}/{total} pings answered");
    anyhow::ensure!(ok == total, "some pods could not reach each other");

    step("bulk TCP, 200 MB, node 1 pod -> node 2 pod (checksummed)");
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let r = bulk_tcp(&b.ns, b.ip, &a.ns, 200 << 20)?;
    anyhow::ensure!(r.sent_sum == r.received_sum, "checksum mismatch");
    println!(
        "{} MB in {:.2} s = {:.2} Gbit/s, checksum ok",
        r.bytes >> 20,
        r.elapsed.as_secs_f64(),
        r.gbit_per_s()
    );
    if Command::new("iperf3").arg("--version").output().is_ok() {
        let srv =
            b.ns.command("iperf3")
                .args(["-s", "-1", "-B", &b.ip.to_string()])
                .spawn();
        if let Ok(mut srv) = srv {
            std::thread::sleep(Duration::from_millis(300));
            let out =
                a.ns.command("iperf3")
                    .args(["-c", &b.ip.to_string(), "-t", "3", "-f", "g"])
                    .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text
                .lines()
                .filter(|l| l.contains("sender") || l.contains("receiver"))
            {
                println!("iperf3: {}", line.trim());
            }
            let _ = srv.kill();
            let _ = srv.wait();
        }
    }

    services(c)?;

    step(&format!(
        "peer map of node 1: bpftool map dump pinned {}/peers_v1",
        c.nodes[0].pin_path.display()
    ));
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(c.nodes[0].pin_path.join("peers_v1"))
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step("data path counters of node 1 (dataplane stats)");
    let out = Command::new(agent_bin())
        .args(["stats", "--pin-path"])
        .arg(&c.nodes[0].pin_path)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// A ClusterIP Service with three backends on different nodes; requests
/// from a pod on every node spread over them; then one backend goes.
fn services(c: &Cluster) -> anyhow::Result<()> {
    use tests::svc::{Backend, Ep, endpoint_slice, service, tcp_ask_many};
    let vip = std::net::Ipv4Addr::new(10, 96, 0, 10);
    let backends = [
        c.nodes[0].pods[1].ip,
        c.nodes[1].pods[0].ip,
        c.nodes[2].pods[0].ip,
    ];
    let mut servers = Vec::new();
    for (n, p) in [(0, 1), (1, 0), (2, 0)] {
        let pod = &c.nodes[n].pods[p];
        servers.push(Backend::start(&pod.ns, pod.ip)?);
    }
    step(&format!(
        "Service web, ClusterIP {vip} port 80 -> 8080, backends {backends:?} (dataplane apply -f)"
    ));
    let eps: Vec<Ep> = backends.iter().copied().map(Ep::ready).collect();
    let yaml = format!(
        "{}---\n{}",
        service("web", vip, ""),
        endpoint_slice("web", &eps)
    );
    print!("{}", c.apply_yaml(&yaml)?);
    print!("{}", c.cli(&["get", "services"])?);
    let clients = [(0usize, 0usize), (1, 1), (2, 1)];
    let spread = |label: &str| -> anyhow::Result<()> {
        for &(n, p) in &clients {
            let pod = &c.nodes[n].pods[p];
            let deadline = Instant::now() + Duration::from_secs(10);
            let answers = loop {
                let a = tcp_ask_many(&pod.ns, vip, 80, 300);
                if a.iter().all(Result::is_ok) || Instant::now() > deadline {
                    break a;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            for a in answers {
                *counts
                    .entry(a.unwrap_or_else(|e| format!("error: {e}")))
                    .or_default() += 1;
            }
            println!("{label} from {} (node {}): {counts:?}", pod.ip, n + 1);
        }
        Ok(())
    };
    spread("300 connections")?;
    step(&format!(
        "backend {} removed from the EndpointSlice",
        backends[2]
    ));
    let yaml = format!(
        "{}---\n{}",
        service("web", vip, ""),
        endpoint_slice("web", &eps[..2])
    );
    print!("{}", c.apply_yaml(&yaml)?);
    std::thread::sleep(Duration::from_millis(300));
    spread("300 connections")?;
    drop(servers);
    Ok(())
}
