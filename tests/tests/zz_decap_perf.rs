//! Scratch benchmark for the decapsulation path (ignored by default):
//! `cargo test -p tests --test zz_decap_perf -- --ignored --nocapture`.
//! DECAP_MODE=tc|xdp (default both), HOLD=secs keeps the cluster up after.

use std::time::{Duration, Instant};

use tests::{netns::is_root, topo::Cluster};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn iperf(c: &Cluster, from: usize, to: usize, secs: u32) -> String {
    let (a, b) = (&c.nodes[from].pods[0], &c.nodes[to].pods[0]);
    let mut srv = b.ns.command("iperf3").args(["-s", "-1", "-B", &b.ip.to_string()]).stdout(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = a
        .ns
        .command("iperf3")
        .args(["-c", &b.ip.to_string(), "-t", &secs.to_string(), "-J"])
        .output()
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    let retr = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    format!("{:.2} Gbit/s, {retr} retransmits", bps / 1e9)
}

fn run(mode: &str) {
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
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Ok(script) = std::env::var("FILL_EP") {
        for n in &c.nodes {
            let out = std::process::Command::new(&script).args([&n.ns.name, &n.pods[0].ns.name, &n.pods[0].host_if]).output().unwrap();
            print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }
    let dst = c.nodes[1].pods[0].ip;
    for _ in 0..50 {
        if c.ping(0, 0, dst, 1).is_ok() {
            break;
        }
    }
    let secs = std::env::var("SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("[{mode}] n1->n2: {}", iperf(&c, 0, 1, secs));
    println!("[{mode}] n2->n1: {}", iperf(&c, 1, 0, secs));
    if let Some(h) = std::env::var("HOLD").ok().and_then(|s| s.parse::<u64>().ok()) {
        println!("holding {h}s: nodes {} {}, pods {} {}", c.nodes[0].ns.name, c.nodes[1].ns.name, c.nodes[0].pods[0].ns.name, c.nodes[1].pods[0].ns.name);
        std::thread::sleep(Duration::from_secs(h));
    }
}

#[test]
#[ignore]
fn decap_perf() {
    if !is_root() {
        return;
    }
    let modes = std::env::var("DECAP_MODE").unwrap_or_else(|_| "tc,xdp".into());
    for m in modes.split(',') {
        run(m);
    }
}
