//! The agent as a process, end to end: real etcd, node namespaces.

use std::time::{Duration, Instant};

use tests::{netns::require_root, topo::Cluster};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY: Duration = Duration::from_secs(30);

macro_rules! root_only {
    () => {
        require_root()
    };
}

fn wait_log(c: &Cluster, node: usize, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.nodes[node].log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log of node {}:\n{}",
            node + 1,
            c.nodes[node].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A restarted agent gets the same subnet back and the overlay works again.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn restart_keeps_the_subnet_and_connectivity() {
    root_only!();
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", "tc"]).unwrap();
    }
    let before = c.wait_ready(0, READY).unwrap();
    c.wait_ready(1, READY).unwrap();
    c.add_pod(0).unwrap();
    c.add_pod(1).unwrap();
    wait_log(&c, 0, "peer added");
    wait_log(&c, 0, "attached from_pod to pod port vp1");
    wait_log(&c, 1, "attached from_pod to pod port vp1");
    let remote = c.nodes[1].pods[0].ip;
    c.ping(0, 0, remote, 2).unwrap();

    c.nodes[0].stop_agent();
    assert!(
        c.nodes[0].log().contains("shutting down"),
        "clean shutdown logged:\n{}",
        c.nodes[0].log()
    );
    // The next start must reuse the pinned maps and the lease.
    std::fs::write(c.nodes[0].log_file(), "").unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    let after = c.wait_ready(0, READY).unwrap();
    assert_eq!(after.subnet, before.subnet, "same subnet after a restart");
    wait_log(&c, 0, "attached from_pod to pod port vp1");
    wait_log(&c, 0, "peer added");
    c.ping(0, 0, remote, 2).unwrap();
}

/// An invalid config is reported with its key and field; the agent waits
/// for a valid one instead of exiting, then comes up.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn waits_for_a_valid_config() {
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.with_etcd(|mut cl| async move {
        cl.put(
            "/coreos.com/network/config",
            r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    wait_log(&c, 0, "SubnetLen");
    let log = c.nodes[0].log();
    assert!(
        log.contains("/coreos.com/network/config"),
        "error names the key:\n{log}"
    );
    assert!(
        c.nodes[0]
            .agent
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "agent still running"
    );
    c.put_config(CONFIG).unwrap();
    let env = c.wait_ready(0, READY).unwrap();
    assert_eq!(env.network.to_string(), "10.244.0.0/16");
    assert_eq!(env.mtu, 1450, "underlay MTU 1500 - 50");
}

/// Writes `json` as the network config without the CLI's validation.
fn put_raw_config(c: &Cluster, json: &'static str) {
    c.with_etcd(move |mut cl| async move {
        cl.put("/coreos.com/network/config", json, None).await?;
        Ok(())
    })
    .unwrap();
}

/// GBP or DirectRouting is refused (the agent waits for a config it can
/// run); a VNI or port change at run time is refused and logged as an
/// error, not applied.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn unsupported_and_runtime_config_changes_are_refused() {
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    put_raw_config(
        &c,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
    );
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    wait_log(&c, 0, "group-based policy is not supported");
    c.put_config(CONFIG).unwrap();
    c.wait_ready(0, READY).unwrap();
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":7,"Port":4789}}"#)
        .unwrap();
    wait_log(
        &c,
        0,
        "Backend.VNI changed from 1 to 7 at run time: not applied",
    );
    wait_log(
        &c,
        0,
        "Backend.Port changed from 8472 to 4789 at run time: not applied",
    );
    put_raw_config(
        &c,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    );
    wait_log(&c, 0, "direct routing is not supported");
    assert!(
        c.nodes[0]
            .agent
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "agent still running"
    );
}

/// A second agent on the node with the same --pin-path refuses to start,
/// naming the first; the first keeps running.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_second_agent_with_the_same_pin_path_refuses_to_start() {
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    c.wait_ready(0, READY).unwrap();
    let mut first = c.nodes[0].agent.take().unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    let deadline = Instant::now() + READY;
    let status = loop {
        if let Some(st) = c.nodes[0].agent.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the second agent did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = c.nodes[0].log();
    assert!(!status.success(), "the second agent failed:\n{log}");
    let want = format!(
        "another agent (pid {}) already runs on this node with --pin-path {}",
        first.id(),
        c.nodes[0].pin_path.display()
    );
    assert!(log.contains(&want), "{want:?} in:\n{log}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first agent still runs"
    );
    c.nodes[0].agent = Some(first);
}

/// With a short TTL the agent's lease outlives several TTLs (renewal).
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn short_ttl_lease_is_renewed() {
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    c.start_agent(
        0,
        &[
            "--decap-mode",
            "tc",
            "--lease-ttl-secs",
            "3",
            "--renew-margin-secs",
            "2",
        ],
    )
    .unwrap();
    let env = c.wait_ready(0, READY).unwrap();
    let key = dataplane::lease::subnet_key("/coreos.com/network", env.subnet);
    std::thread::sleep(Duration::from_secs(10));
    let (present, ttl) = c
        .with_etcd(move |mut cl| async move {
            let r = cl.get(key, None).await?;
            let Some(kv) = r.kvs().first() else {
                return Ok((false, 0));
            };
            let ttl = cl.lease_time_to_live(kv.lease(), None).await?.ttl();
            Ok((true, ttl))
        })
        .unwrap();
    assert!(
        present,
        "lease key alive after 10 s with a 3 s TTL:\n{}",
        c.nodes[0].log()
    );
    assert!(ttl > 0 && ttl <= 3, "TTL {ttl}");
}

/// Garbage under subnets/ is skipped and counted; good peers stay.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn garbage_lease_changes_nothing_else() {
    root_only!();
    let mut c = Cluster::new(2).unwrap();
    c.put_config(CONFIG).unwrap();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", "tc"]).unwrap();
    }
    c.wait_ready(0, READY).unwrap();
    c.wait_ready(1, READY).unwrap();
    wait_log(&c, 0, "peer added");
    c.with_etcd(|mut cl| async move {
        cl.put(
            "/coreos.com/network/subnets/10.244.250.0-24",
            "{not json",
            None,
        )
        .await?;
        cl.put("/coreos.com/network/subnets/garbage", "x", None)
            .await?;
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let dump = c.bpftool_dump(0, "peers_v1").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "the good peer is still there: {dump}"
    );
    assert!(
        c.nodes[0]
            .agent
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "agent still running"
    );
}

/// The node config's flags as the agent of node `i` wrote them.
fn node_flags(c: &Cluster, i: usize) -> u32 {
    use aya::maps::{Array, Map, MapData};
    let path = c.nodes[i]
        .pin_path
        .join(dataplane_common::map_names::NODE_CONFIG);
    let data = MapData::from_pin(&path).unwrap();
    let map: Array<_, dataplane_common::NodeConfig> = Array::try_from(Map::Array(data)).unwrap();
    map.get(&0, 0).unwrap().flags
}

/// `--bpf-log` brings the agent up (whether or not the object has aya-log
/// records yet) and tells the data path through the node config; without
/// it the bit is clear again.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn bpf_log_flag_reaches_the_node_config() {
    use dataplane_common::{NODE_CFG_BPF_LOG, NODE_CFG_READY};
    root_only!();
    let mut c = Cluster::new(1).unwrap();
    c.put_config(CONFIG).unwrap();
    c.start_agent(0, &["--decap-mode", "tc", "--bpf-log"])
        .unwrap();
    c.wait_ready(0, READY).unwrap();
    assert_eq!(
        node_flags(&c, 0),
        NODE_CFG_READY | NODE_CFG_BPF_LOG,
        "{}",
        c.nodes[0].log()
    );
    c.nodes[0].stop_agent();
    std::fs::write(c.nodes[0].log_file(), "").unwrap();
    c.start_agent(0, &["--decap-mode", "tc"]).unwrap();
    c.wait_ready(0, READY).unwrap();
    assert_eq!(node_flags(&c, 0), NODE_CFG_READY);
}
