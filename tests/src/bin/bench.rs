//! `cargo xtask bench [--quick | --memory | --p2p [--modes=..] | --nodeport]`:
//! the benchmark of issues #5 and #12.
//!
//! Pod-to-pod across two nodes in four modes (host routing, flannel's
//! kernel vxlan, this dataplane with TC decapsulation and with XDP) and
//! node to node over the underlay, interleaved per repetition, RR and CRR
//! also with client and server on one CPU, with the TCP and drop counters
//! of every single-stream run; NodePort from outside the cluster against
//! kube-proxy's iptables NodePort rules; ClusterIP at 1, 1,000 and 10,000 services
//! against kube-proxy's iptables structure; control plane latency from an
//! etcd change to the map on every node; agent RSS after the initial sync,
//! with 1,000 peers and through an hour of churn; the per-packet cost of
//! each BPF program through BPF_PROG_TEST_RUN. Writes
//! `bench/results/latest.{md,json}` and two SVG charts. `--memory` runs
//! the agent memory part alone (about a minute) and writes
//! `bench/results/memory.md`; `--p2p` and `--nodeport` run those parts
//! alone, to `bench/results/p2p.md` and `nodeport.md`.
//!
//! Everything runs in network namespaces created through the topology
//! builder; they are removed on exit, on panic and on Ctrl-C.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use dataplane::lease::{LeaseAttrs, subnet_key};
use dataplane_common::{PeerInfo, SvcInfo, SvcKey, map_names};
use serde_json::{Value, json};
use tests::{
    bench::{
        kube::{self, BenchService},
        load::{self, EchoServer, RrResult},
        netstat,
        stats::{Summary, f1, f2, num, thousands},
        svg,
    },
    flannel::FlannelNode,
    netns::{NetNs, in_netns},
    topo::{Cluster, add_pod_to},
};

const OURS_CONFIG: &str = r#"{"Network":"10.0.0.0/12","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const SERVER_PORT: u16 = 8080;
/// The echo server pinned to the client's CPU (one-CPU RR and CRR).
const SERVER_PORT_SAME_CPU: u16 = 8081;
/// The mode with no pods and no overlay: node to node over the underlay.
const UNDERLAY_MODE: &str = "underlay (node to node)";

#[derive(Clone)]
struct Opts {
    reps: usize,
    bulk_secs: f64,
    rr: Duration,
    crr: Duration,
    svc_levels: Vec<u32>,
    svc_reps: usize,
    add_reps: usize,
    cp_events: usize,
    bpf_repeat: u32,
    bpf_new_flows: u32,
    /// `--modes=underlay,host,flannel,tc,xdp`: only these pod-to-pod modes
    /// (all when absent).
    modes: Option<Vec<String>>,
}

impl Opts {
    fn new(quick: bool) -> Opts {
        if quick {
            Opts {
                reps: 1,
                bulk_secs: 1.0,
                rr: Duration::from_millis(700),
                crr: Duration::from_millis(700),
                svc_levels: vec![1, 1000, 10_000],
                svc_reps: 1,
                add_reps: 1,
                cp_events: 20,
                bpf_repeat: 100_000,
                bpf_new_flows: 2_000,
                modes: None,
            }
        } else {
            Opts {
                reps: 5,
                bulk_secs: 3.0,
                rr: Duration::from_secs(2),
                crr: Duration::from_secs(2),
                svc_levels: vec![1, 1000, 10_000],
                svc_reps: 3,
                add_reps: 3,
                cp_events: 100,
                bpf_repeat: 1_000_000,
                bpf_new_flows: 20_000,
                modes: None,
            }
        }
    }
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct Report {
    missing: Vec<String>,
    targets: Vec<Value>,
    target_md: Vec<String>,
}

impl Report {
    fn target(
        &mut self,
        name: &str,
        value: f64,
        goal: f64,
        unit: &str,
        higher_is_better: bool,
        detail: &str,
    ) {
        let met = if higher_is_better {
            value >= goal
        } else {
            value < goal
        };
        let margin = if !value.is_finite() {
            "not measured".to_string()
        } else if met {
            if higher_is_better {
                format!("met, {:.1}% above", (value / goal - 1.0) * 100.0)
            } else {
                format!("met, {:.1}% below", (1.0 - value / goal) * 100.0)
            }
        } else if higher_is_better {
            format!(
                "MISSED by {:.1}% ({} vs {} {unit})",
                (1.0 - value / goal) * 100.0,
                f2(value),
                f2(goal)
            )
        } else {
            format!(
                "MISSED by {:.1}% ({} vs < {} {unit})",
                (value / goal - 1.0) * 100.0,
                f2(value),
                f2(goal)
            )
        };
        let met = met && value.is_finite();
        self.targets.push(json!({"target": name, "value": num(value), "goal": num(goal), "unit": unit,
            "comparison": if higher_is_better { ">=" } else { "<" }, "met": met, "margin": margin, "detail": detail}));
        self.target_md.push(format!(
            "| {name} | {} {unit} | {} {} {unit} | {} | {detail} |",
            f2(value),
            if higher_is_better { "≥" } else { "<" },
            f2(goal),
            if met {
                format!("✅ {margin}")
            } else {
                format!("❌ {margin}")
            }
        ));
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn sh_out(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- clusters

struct ModeCluster {
    name: &'static str,
    /// Client and server are the node namespaces themselves, talking over
    /// the underlay (no pods, no overlay): the limit of the path.
    on_nodes: bool,
    servers: Vec<EchoServer>,
    _flannel: Vec<FlannelNode>,
    c: Cluster,
}

impl ModeCluster {
    fn client_ns(&self) -> &NetNs {
        if self.on_nodes {
            &self.c.nodes[0].ns
        } else {
            &self.c.nodes[0].pods[0].ns
        }
    }
    fn client_ip(&self) -> Ipv4Addr {
        if self.on_nodes {
            self.c.nodes[0].ip
        } else {
            self.c.nodes[0].pods[0].ip
        }
    }
    /// The (first) server's namespace.
    fn server_ns(&self) -> &NetNs {
        if self.on_nodes {
            &self.c.nodes[1].ns
        } else {
            &self.c.nodes[1].pods[0].ns
        }
    }
    fn server_ips(&self) -> Vec<Ipv4Addr> {
        if self.on_nodes {
            vec![self.c.nodes[1].ip]
        } else {
            self.c.nodes[1].pods.iter().map(|p| p.ip).collect()
        }
    }
    /// Every namespace of the cluster (underlay, nodes, pods), for the
    /// interface drop counters.
    fn namespaces(&self) -> Vec<&NetNs> {
        let mut v = vec![&self.c.underlay];
        for n in &self.c.nodes {
            v.push(&n.ns);
            v.extend(n.pods.iter().map(|p| &p.ns));
        }
        v
    }
}

impl Drop for ModeCluster {
    fn drop(&mut self) {
        self.servers.clear();
        tests::interrupt::unregister(&self.c.id);
    }
}

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().unwrap()
}

/// Echo servers on the servers (pods of node 2, or node 2 itself), one more
/// on the first server pinned to the client's CPU (the one-CPU runs),
/// client sysctls (CRR opens many connections: wide port range, TIME_WAIT
/// reuse), and a reachability check.
fn finish_cluster(
    name: &'static str,
    c: Cluster,
    flannel: Vec<FlannelNode>,
    on_nodes: bool,
) -> anyhow::Result<ModeCluster> {
    let mut m = ModeCluster {
        name,
        on_nodes,
        servers: Vec::new(),
        _flannel: flannel,
        c,
    };
    let ips = m.server_ips();
    let mut servers = Vec::new();
    for (k, ip) in ips.iter().enumerate() {
        let ns = if on_nodes {
            &m.c.nodes[1].ns
        } else {
            &m.c.nodes[1].pods[k].ns
        };
        servers.push(EchoServer::start(ns, *ip, SERVER_PORT)?);
        if k == 0 {
            servers.push(EchoServer::start_on(
                ns,
                *ip,
                SERVER_PORT_SAME_CPU,
                load::SAME_CPU,
            )?);
        }
    }
    m.servers = servers;
    m.client_ns().sh("sysctl -qw net.ipv4.ip_local_port_range='1024 65535' && sysctl -qw net.ipv4.tcp_tw_reuse=1")?;
    for ip in ips {
        let deadline = Instant::now() + Duration::from_secs(15);
        while m
            .client_ns()
            .sh(&format!("ping -c 1 -W 2 {ip} >/dev/null"))
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("{name}: {} cannot reach {ip}", m.client_ip());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(m)
}

/// Node to node over the underlay: two node namespaces on the underlay
/// bridge and nothing else.
fn underlay_cluster() -> anyhow::Result<ModeCluster> {
    let c = Cluster::new(2)?;
    tests::interrupt::register(&c);
    finish_cluster(UNDERLAY_MODE, c, Vec::new(), true)
}

fn host_cluster(server_pods: usize) -> anyhow::Result<ModeCluster> {
    let mut c = Cluster::new(2)?;
    tests::interrupt::register(&c);
    let nets = [net("10.244.1.0/24"), net("10.244.2.0/24")];
    for i in 0..2 {
        let gw = Ipv4Addr::from(u32::from(nets[i].network()) + 1);
        c.nodes[i].ns.sh(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && ip link add cni0 type bridge && ip addr add {gw}/24 dev cni0 && \
             ip link set cni0 up && ip route add {} via {}",
            nets[1 - i],
            c.nodes[1 - i].ip
        ))?;
    }
    let id = c.id.clone();
    add_pod_to(&id, &mut c.nodes[0], &nets[0], 1500)?;
    for _ in 0..server_pods {
        add_pod_to(&id, &mut c.nodes[1], &nets[1], 1500)?;
    }
    finish_cluster("host routing", c, Vec::new(), false)
}

fn flannel_cluster(server_pods: usize) -> anyhow::Result<ModeCluster> {
    let mut c = Cluster::new(2)?;
    tests::interrupt::register(&c);
    let nets = [net("10.244.1.0/24"), net("10.244.2.0/24")];
    let f = vec![
        FlannelNode::start(&c, 0, nets[0])?,
        FlannelNode::start(&c, 1, nets[1])?,
    ];
    for n in &f {
        n.program_peers(&c)?;
    }
    let id = c.id.clone();
    add_pod_to(&id, &mut c.nodes[0], &nets[0], 1450)?;
    for _ in 0..server_pods {
        add_pod_to(&id, &mut c.nodes[1], &nets[1], 1450)?;
    }
    finish_cluster("kernel vxlan (flannel)", c, f, false)
}

fn ours_cluster(name: &'static str, mode: &str, server_pods: usize) -> anyhow::Result<ModeCluster> {
    let mut c = Cluster::new(2)?;
    tests::interrupt::register(&c);
    c.put_config(OURS_CONFIG)?;
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", mode])?;
    }
    tests::interrupt::register(&c);
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(60))?;
    }
    c.add_pod(0)?;
    for _ in 0..server_pods {
        c.add_pod(1)?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, want) in [(0, 1), (1, server_pods)] {
        while c.nodes[i]
            .log()
            .matches("attached from_pod to pod port")
            .count()
            < want
        {
            if Instant::now() > deadline {
                bail!(
                    "{name}: pod ports of node {} not attached:\n{}",
                    i + 1,
                    c.nodes[i].log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    finish_cluster(name, c, Vec::new(), false)
}

// ---------------------------------------------------------------- NodePort

/// NodePorts of the scenario: echo with `externalTrafficPolicy: Cluster`
/// (reached on node 1, endpoints on node 2), echo with `Local` (reached on
/// node 2, where the endpoints are), iperf3 with `Cluster` (node 1).
const NP_ECHO: u16 = 30080;
const NP_ECHO_LOCAL: u16 = 30081;
const NP_BULK: u16 = 30201;

fn nodeport_services(eps: &[Ipv4Addr]) -> Vec<kube::NodePortService> {
    let np = |k: u8, port, target_port, node_port, local, endpoints: &[Ipv4Addr]| {
        kube::NodePortService {
            name: format!("np-{node_port}"),
            vip: Ipv4Addr::new(10, 100, 255, k),
            port,
            target_port,
            node_port,
            local,
            endpoints: endpoints.to_vec(),
        }
    };
    vec![
        np(1, kube::SVC_PORT, SERVER_PORT, NP_ECHO, false, eps),
        np(2, kube::SVC_PORT, SERVER_PORT, NP_ECHO_LOCAL, true, eps),
        np(
            3,
            load::IPERF3_PORT,
            load::IPERF3_PORT,
            NP_BULK,
            false,
            &eps[..1],
        ),
    ]
}

/// One side (kube-proxy or ours) of the NodePort scenario: its cluster
/// and the outside namespace behind its underlay router.
struct NpSide {
    m: ModeCluster,
    outside: tests::outside::Outside,
}

impl NpSide {
    fn new(m: ModeCluster) -> anyhow::Result<NpSide> {
        let outside = m.c.add_outside()?;
        outside.ns.sh(
            "sysctl -qw net.ipv4.ip_local_port_range='1024 65535' && sysctl -qw net.ipv4.tcp_tw_reuse=1",
        )?;
        Ok(NpSide { m, outside })
    }
    fn node(&self, i: usize) -> Ipv4Addr {
        self.m.c.nodes[i].ip
    }
}

/// Whether a TCP connection from the outside namespace to `dst` is
/// answered (the echo server's byte comes back) within `within`.
fn np_answers(side: &NpSide, dst: SocketAddrV4, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let r = in_netns(&side.outside.ns, move || -> std::io::Result<()> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&dst.into(), Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
        })
        .join();
        match r {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "probe thread panicked".into(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

#[derive(Default)]
struct NpLevel {
    n: u32,
    /// (figure, kube-proxy runs, ours runs)
    figs: Vec<(&'static str, &'static str, Vec<f64>, Vec<f64>)>,
}

/// `--nodeport` (and part of the full run): NodePort from outside the
/// cluster, kube-proxy's iptables rules on the host-routing cluster
/// against this dataplane, at 1 and 10,000 Services.
fn nodeport(o: &Opts, out: &mut Sections<'_>) {
    let (r, md, sections, errors) = (&mut *out.r, &mut *out.md, &mut *out.json, &mut *out.errors);
    eprintln!("[nodeport] building clusters");
    let ipt = match host_cluster(3).and_then(NpSide::new) {
        Ok(s) => s,
        Err(e) => {
            r.missing.push(format!(
                "NodePort: the kube-proxy cluster did not start: {e:#}"
            ));
            return;
        }
    };
    let ours = match ours_cluster("ours, TC decap", "tc", 3).and_then(NpSide::new) {
        Ok(s) => Some(s),
        Err(e) => {
            r.missing
                .push(format!("NodePort (ours): cluster setup failed: {e:#}"));
            None
        }
    };
    let ipt_nps = nodeport_services(&ipt.m.server_ips());
    let ours_nps = ours
        .as_ref()
        .map(|s| nodeport_services(&s.m.server_ips()))
        .unwrap_or_default();
    // Ours: the NodePort Services through `dataplane apply`, then is the
    // NodePort served at all? A build without NodePort warns at apply
    // ("only its ClusterIP is served") and the connection fails.
    let mut ours = ours;
    let mut not_served = None;
    if let Some(side) = &ours {
        let yaml = kube::nodeport_manifests(&ours_nps);
        let path = side.m.c.dir.join("nodeports.yaml");
        let applied = std::fs::write(&path, &yaml)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                let o = side
                    .m
                    .c
                    .underlay
                    .command(tests::topo::agent_bin().to_str().unwrap_or("dataplane"))
                    .args(["apply", "-f", path.to_str().unwrap_or("")])
                    .env("DATAPLANE_ETCD_ENDPOINTS", side.m.c.endpoint())
                    .output()?;
                Ok(o)
            });
        not_served = match applied {
            Err(e) => Some(format!("`dataplane apply` could not run: {e:#}")),
            Ok(o) if !o.status.success() => Some(format!(
                "`dataplane apply` refused the NodePort Services: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(o) => {
                let warn = String::from_utf8_lossy(&o.stderr).to_string();
                let probe = |port, node| {
                    np_answers(
                        side,
                        SocketAddrV4::new(side.node(node), port),
                        Duration::from_secs(5),
                    )
                    .map_err(|e| format!("{}:{port} from outside: {e}", side.node(node)))
                };
                match (probe(NP_ECHO, 0), probe(NP_ECHO_LOCAL, 1)) {
                    (Ok(()), Ok(())) => None,
                    (a, b) => Some(format!(
                        "connection failed ({}){}",
                        [a.err(), b.err()]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join("; "),
                        warn.lines()
                            .find(|l| l.contains("NodePort"))
                            .map(|l| format!("; `dataplane apply` said: {}", l.trim()))
                            .unwrap_or_default()
                    )),
                }
            }
        };
        if let Some(why) = &not_served {
            r.missing.push(format!(
                "NodePort (ours): not measured: NodePort not served by this build ({why})"
            ));
        }
    }
    if not_served.is_some() {
        ours = None;
    }
    // kube-proxy's side must work, or the scenario is broken.
    let ipt_rules = |fillers: &[BenchService]| -> anyhow::Result<()> {
        for (i, node) in ipt.m.c.nodes.iter().enumerate() {
            let subnet = net(&format!("10.244.{}.0/24", i + 1));
            let table =
                kube::iptables_nat_with_nodeports(fillers, &ipt_nps, "10.244.0.0/16", |ep| {
                    subnet.contains(&ep)
                });
            let mut child = node
                .ns
                .command("iptables-restore")
                .arg("-w")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("iptables-restore")?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(table.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "iptables-restore failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    };
    // The NodePort Services alone, then 10,000 Services in all.
    let levels: Vec<u32> = vec![ipt_nps.len() as u32, 10_000];
    let mut filler = 0u32;
    let mut fillers: Vec<BenchService> = Vec::new();
    let mut results: Vec<NpLevel> = Vec::new();
    for &n in &levels {
        // n Services in all: the 3 NodePort ones and ClusterIP fillers.
        let mut new = Vec::new();
        while fillers.len() + new.len() + ipt_nps.len() < n as usize {
            new.push(kube::filler(filler));
            filler += 1;
        }
        fillers.extend(new.iter().cloned());
        if let Err(e) = ipt_rules(&fillers) {
            r.missing
                .push(format!("NodePort: kube-proxy rules at {n} Services: {e:#}"));
            break;
        }
        if let Err(e) = np_answers(
            &ipt,
            SocketAddrV4::new(ipt.node(0), NP_ECHO),
            Duration::from_secs(5),
        ) {
            r.missing.push(format!(
                "NodePort: kube-proxy's NodePort does not answer at {n} Services: {e}"
            ));
            break;
        }
        if let Some(side) = &ours {
            if let Err(e) = apply_services(&side.m.c, &new) {
                r.missing
                    .push(format!("NodePort (ours): fillers at {n} Services: {e:#}"));
                ours = None;
            } else {
                // The last filler live on both nodes before measuring.
                let maps: Vec<_> = side
                    .m
                    .c
                    .nodes
                    .iter()
                    .filter_map(|nd| svc_map(&nd.pin_path).ok())
                    .collect();
                if let Some(last) = new.last() {
                    let k = svc_key(last.vip);
                    if wait_maps(&maps, Duration::from_secs(120), |m| svc_count_is(m, &k, 3))
                        .is_none()
                    {
                        errors.push(format!("NodePort (ours): fillers not live at {n} Services"));
                    }
                }
            }
        }
        eprintln!("[nodeport] {n} services");
        let mut lv = NpLevel {
            n,
            figs: Vec::new(),
        };
        let mut fig = |name: &'static str, unit: &'static str| -> usize {
            lv.figs.push((name, unit, Vec::new(), Vec::new()));
            lv.figs.len() - 1
        };
        let (crr_c, crr_l, bulk) = (
            fig(
                "CRR, externalTrafficPolicy Cluster (node 1, endpoints on node 2)",
                "connections/s",
            ),
            fig(
                "CRR, externalTrafficPolicy Local (node 2, its own endpoints)",
                "connections/s",
            ),
            fig(
                "bulk, 1 stream, Cluster (node 1 -> pod on node 2)",
                "Gbit/s",
            ),
        );
        let (crr_c_p50, crr_l_p50) = (fig("CRR p50, Cluster", "µs"), fig("CRR p50, Local", "µs"));
        for _ in 0..o.svc_reps {
            let sides: Vec<(bool, &NpSide)> = std::iter::once((false, &ipt))
                .chain(ours.iter().map(|s| (true, s)))
                .collect();
            for (is_ours, side) in sides {
                let put = |lv: &mut NpLevel, k: usize, v: f64| {
                    if is_ours {
                        lv.figs[k].3.push(v)
                    } else {
                        lv.figs[k].2.push(v)
                    }
                };
                let who = if is_ours { "ours" } else { "kube-proxy" };
                for (port, node, k, k50) in [
                    (NP_ECHO, 0, crr_c, crr_c_p50),
                    (NP_ECHO_LOCAL, 1, crr_l, crr_l_p50),
                ] {
                    match load::tcp_crr(
                        &side.outside.ns,
                        load::CLIENT_CPU,
                        SocketAddrV4::new(side.node(node), port),
                        o.crr,
                    ) {
                        Ok(res) => {
                            put(&mut lv, k, res.rate);
                            put(&mut lv, k50, res.p50_us);
                        }
                        Err(e) => errors.push(format!("NodePort {who} CRR :{port} at {n}: {e:#}")),
                    }
                }
                let srv = &side.m.c.nodes[1].pods[0];
                match load::iperf3_via(
                    &srv.ns,
                    srv.ip,
                    &side.outside.ns,
                    SocketAddrV4::new(side.node(0), NP_BULK),
                    1,
                    o.bulk_secs,
                    (load::CLIENT_CPU, load::SERVER_CPU),
                ) {
                    Ok((g, _)) => put(&mut lv, bulk, g),
                    Err(e) => errors.push(format!("NodePort {who} bulk at {n}: {e:#}")),
                }
            }
        }
        results.push(lv);
    }
    // Report.
    let _ = writeln!(md, "## NodePort from outside the cluster\n");
    let _ = writeln!(
        md,
        "A client in an \"outside\" namespace behind the underlay router (203.0.113.10, no route to pods or Services) connects to a node's address and NodePort. \
         kube-proxy side: its iptables nat rules (KUBE-SERVICES, whose last rule sends local destinations to KUBE-NODEPORTS -> KUBE-EXT-* -> KUBE-MARK-MASQ and KUBE-SVC-*, \
         or for `externalTrafficPolicy: Local` KUBE-SVL-* over the node's own endpoints; KUBE-SEP-* DNAT; MASQUERADE of marked packets) \
         loaded with `iptables-restore` in both node namespaces of the host-routing cluster. Ours: the same Services (`type: NodePort`, explicit `nodePort`) \
         applied with `dataplane apply` to a TC-decap cluster. Three NodePort Services: echo :{NP_ECHO} (Cluster; endpoints the 3 pods of node 2, reached on node 1), \
         echo :{NP_ECHO_LOCAL} (Local; reached on node 2), iperf3 :{NP_BULK} (Cluster, one endpoint on node 2, reached on node 1); the rest of each level are ClusterIP fillers \
         (kube-proxy's NodePort packets first pass every KUBE-SERVICES rule). CRR {} ms, bulk {} s, {} run(s) per level interleaved; median (min–max).\n",
        o.crr.as_millis(),
        o.bulk_secs,
        o.svc_reps
    );
    if ours.is_none() {
        let _ = writeln!(
            md,
            "Ours: **not measured**{}.\n",
            not_served
                .as_ref()
                .map(|w| format!(": NodePort not served by this build ({w})"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "| services | figure | unit | kube-proxy iptables | ours | ours / kube-proxy |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let mut js = Vec::new();
    for lv in &results {
        for (name, unit, ipt_v, ours_v) in &lv.figs {
            let (a, b) = (Summary::of(ipt_v), Summary::of(ours_v));
            let fmt = |x: f64| {
                if *unit == "Gbit/s" {
                    f2(x)
                } else if *unit == "µs" {
                    f1(x)
                } else {
                    thousands(x)
                }
            };
            let ours_cell = if b.n == 0 {
                "not measured".to_string()
            } else {
                b.fmt(fmt)
            };
            let ratio = if b.n == 0 || a.n == 0 {
                "".to_string()
            } else {
                format!("{}x", f2(b.median / a.median))
            };
            let _ = writeln!(
                md,
                "| {} | {name} | {unit} | {} | {ours_cell} | {ratio} |",
                thousands(lv.n as f64),
                a.fmt(fmt)
            );
            js.push(json!({"services": lv.n, "figure": name, "kube_proxy": a.json(unit), "ours": b.json(unit),
                "ours_over_kube_proxy": num(b.median / a.median)}));
        }
    }
    let _ = writeln!(md);
    if let Some(last) = results.last() {
        let (a, b) = (
            Summary::of(&last.figs[0].2).median,
            Summary::of(&last.figs[0].3).median,
        );
        if ours.is_some() {
            r.target(
                &format!(
                    "NodePort CRR ours / kube-proxy at {} services",
                    thousands(last.n as f64)
                ),
                b / a,
                1.0,
                "x",
                true,
                "externalTrafficPolicy Cluster, from outside",
            );
        }
    }
    sections.insert(
        "nodeport".into(),
        json!({"ours_served": ours.is_some(), "not_served_reason": not_served, "levels": js}),
    );
}

// ---------------------------------------------------------------- pod to pod

type Figures = BTreeMap<String, Vec<f64>>;

fn push(f: &mut Figures, mode: &str, metric: &str, v: f64) {
    f.entry(format!("{mode}|{metric}")).or_default().push(v);
}

fn summary(f: &Figures, mode: &str, metric: &str) -> Summary {
    Summary::of(
        f.get(&format!("{mode}|{metric}"))
            .map(Vec::as_slice)
            .unwrap_or(&[]),
    )
}

/// Interface drops (rx + tx `dropped` of every link) summed over the
/// cluster's namespaces.
fn link_drops(m: &ModeCluster) -> u64 {
    m.namespaces()
        .iter()
        .filter_map(|ns| ns.sh("ip -j -s link").ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .map(|l| {
            l["stats64"]["rx"]["dropped"].as_u64().unwrap_or(0)
                + l["stats64"]["tx"]["dropped"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// Our data path's drop counters (`drop_*`), summed over the nodes; 0
/// for the other modes (no agent).
fn dataplane_drops(m: &ModeCluster) -> u64 {
    m.c.nodes
        .iter()
        .filter(|n| n.agent.is_some())
        .filter_map(|n| dataplane::bpf::read_pinned_stats(&n.pin_path).ok())
        .flatten()
        .filter(|(s, _)| s.name().starts_with("drop_"))
        .map(|(_, c)| c.packets)
        .sum()
}

/// The counters around one single-stream bulk run: the sender's and the
/// receiver's TCP counters, interface drops in every namespace, backlog
/// drops, our data path's drop counters.
struct PathCounters {
    tx: netstat::Counters,
    rx: netstat::Counters,
    links: u64,
    softnet: u64,
    dataplane: u64,
}

impl PathCounters {
    fn take(m: &ModeCluster) -> anyhow::Result<PathCounters> {
        Ok(PathCounters {
            tx: netstat::snapshot(m.client_ns())?,
            rx: netstat::snapshot(m.server_ns())?,
            links: link_drops(m),
            softnet: netstat::softnet_dropped(),
            dataplane: dataplane_drops(m),
        })
    }

    /// Pushes `self - before` as figures `bulk1_tx_*`, `bulk1_rx_*`,
    /// `bulk1_drops_*`.
    fn push_delta(&self, before: &PathCounters, f: &mut Figures, mode: &str) {
        let (dtx, drx) = (
            netstat::delta(&before.tx, &self.tx),
            netstat::delta(&before.rx, &self.rx),
        );
        for (name, _) in netstat::SENDER {
            push(
                f,
                mode,
                &format!("bulk1_tx_{name}"),
                dtx.get(*name).copied().unwrap_or(0) as f64,
            );
        }
        for (name, _) in netstat::RECEIVER {
            push(
                f,
                mode,
                &format!("bulk1_rx_{name}"),
                drx.get(*name).copied().unwrap_or(0) as f64,
            );
        }
        for (name, a, b) in [
            ("links", before.links, self.links),
            ("softnet", before.softnet, self.softnet),
            ("dataplane", before.dataplane, self.dataplane),
        ] {
            push(
                f,
                mode,
                &format!("bulk1_drops_{name}"),
                b.saturating_sub(a) as f64,
            );
        }
    }
}

fn pod_to_pod_rep(m: &ModeCluster, o: &Opts, f: &mut Figures, errors: &mut Vec<String>) {
    let (cl, sv, sv_ip) = (m.client_ns(), m.server_ns(), m.server_ips()[0]);
    let dst = SocketAddrV4::new(sv_ip, SERVER_PORT);
    let dst_same = SocketAddrV4::new(sv_ip, SERVER_PORT_SAME_CPU);
    let name = m.name;
    let split = (load::CLIENT_CPU, load::SERVER_CPU);
    let same = (load::SAME_CPU, load::SAME_CPU);
    for (streams, cpus, metric) in [
        (1, split, "bulk1_gbps"),
        (4, split, "bulk4_gbps"),
        (1, same, "bulk1_1cpu_gbps"),
    ] {
        let before = (metric == "bulk1_gbps").then(|| PathCounters::take(m));
        match load::iperf3(sv, sv_ip, cl, streams, o.bulk_secs, cpus) {
            Ok((g, retr)) => {
                push(f, name, metric, g);
                push(f, name, &format!("{metric}_retransmits"), retr as f64);
                // Retransmissions per GB sent: a faster mode sends more.
                push(
                    f,
                    name,
                    &format!("{metric}_retransmits_per_gb"),
                    retr as f64 / (g * o.bulk_secs / 8.0),
                );
                match (before, PathCounters::take(m)) {
                    (Some(Ok(b)), Ok(a)) => a.push_delta(&b, f, name),
                    (Some(Err(e)), _) | (Some(_), Err(e)) => {
                        errors.push(format!("{name} {metric} counters: {e:#}"))
                    }
                    (None, _) => {}
                }
            }
            Err(e) => errors.push(format!("{name} {metric}: {e:#}")),
        }
    }
    let mut rr = |metric: &str, r: anyhow::Result<RrResult>| match r {
        Ok(r) => {
            push(f, name, &format!("{metric}_rate"), r.rate);
            push(f, name, &format!("{metric}_p50_us"), r.p50_us);
            push(f, name, &format!("{metric}_p99_us"), r.p99_us);
            push(f, name, &format!("{metric}_errors"), r.errors as f64);
            if r.connect_p50_us.is_finite() {
                push(
                    f,
                    name,
                    &format!("{metric}_connect_p50_us"),
                    r.connect_p50_us,
                );
                push(
                    f,
                    name,
                    &format!("{metric}_connect_p99_us"),
                    r.connect_p99_us,
                );
            }
        }
        Err(e) => errors.push(format!("{name} {metric}: {e:#}")),
    };
    rr("tcp_rr", load::tcp_rr(cl, load::CLIENT_CPU, dst, 64, o.rr));
    rr("tcp_crr", load::tcp_crr(cl, load::CLIENT_CPU, dst, o.crr));
    rr(
        "tcp_rr_1cpu",
        load::tcp_rr(cl, load::SAME_CPU, dst_same, 64, o.rr),
    );
    rr(
        "tcp_crr_1cpu",
        load::tcp_crr(cl, load::SAME_CPU, dst_same, o.crr),
    );
    rr("udp_rr", load::udp_rr(cl, dst, 64, o.rr));
}

fn ethtool_tso(m: &ModeCluster) -> String {
    // The underlay veth of node 1 and its peer on the bridge (u1).
    let node = m.c.nodes[0]
        .ns
        .sh("ethtool -k eth0 | grep tcp-segmentation-offload:")
        .unwrap_or_default();
    let peer =
        m.c.underlay
            .sh("ethtool -k u1 | grep tcp-segmentation-offload:")
            .unwrap_or_default();
    format!(
        "node eth0 {}; its peer u1 {}",
        node.trim().trim_start_matches("tcp-segmentation-offload: "),
        peer.trim().trim_start_matches("tcp-segmentation-offload: ")
    )
}

// ---------------------------------------------------------------- maps

fn svc_map(pin: &Path) -> anyhow::Result<BpfHashMap<MapData, SvcKey, SvcInfo>> {
    let data = MapData::from_pin(pin.join(map_names::SERVICES))
        .with_context(|| format!("{}", pin.display()))?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

fn peers_map(pin: &Path) -> anyhow::Result<LpmTrie<MapData, [u8; 4], PeerInfo>> {
    let data = MapData::from_pin(pin.join(map_names::PEERS))?;
    Ok(LpmTrie::try_from(Map::LpmTrie(data))?)
}

fn svc_key(vip: Ipv4Addr) -> SvcKey {
    SvcKey {
        vip: vip.octets(),
        port: kube::SVC_PORT.to_be_bytes(),
        proto: dataplane_common::PROTO_TCP,
        _pad: 0,
    }
}

/// Polls until `ok` holds on every map, or `timeout`.
fn wait_maps<M>(maps: &[M], timeout: Duration, ok: impl Fn(&M) -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if maps.iter().all(&ok) {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn svc_count_is(m: &BpfHashMap<MapData, SvcKey, SvcInfo>, k: &SvcKey, count: u32) -> bool {
    m.get(k, 0).is_ok_and(|i| i.count == count)
}

// ---------------------------------------------------------------- ClusterIP

/// Applies services to etcd in transactions of 64 (Service + slice each).
fn apply_services(c: &Cluster, svcs: &[BenchService]) -> anyhow::Result<()> {
    let mut batches = Vec::new();
    for chunk in svcs.chunks(60) {
        batches.push(
            dataplane::services::parse_manifests(&kube::manifests(chunk))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    c.with_etcd(move |mut cl| async move {
        for b in batches {
            dataplane::services::store::apply(&mut cl, dataplane::services::DEFAULT_PREFIX, &b)
                .await?;
        }
        anyhow::Ok(())
    })
}

fn iptables_restore(m: &ModeCluster, table: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut child = m.c.nodes[0]
        .ns
        .command("iptables-restore")
        .arg("-w")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    child.stdin.take().unwrap().write_all(table.as_bytes())?;
    let out = child.wait_with_output()?;
    let d = t0.elapsed();
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(d)
}

#[derive(Default)]
struct LevelResult {
    n: u32,
    ipt_crr: Vec<RrResult>,
    ours_crr: Vec<RrResult>,
    ipt_restore_full_s: f64,
    ipt_add_s: Vec<f64>,
    ours_add_s: Vec<f64>,
    ours_add_cli_s: Vec<f64>,
    ours_load_s: f64,
}

fn clusterip(
    host: &ModeCluster,
    ours: &ModeCluster,
    o: &Opts,
    log: &mut Vec<String>,
) -> anyhow::Result<Vec<LevelResult>> {
    let host_eps = host.server_ips();
    let ours_eps = ours.server_ips();
    // Both service lists hold the same services except for the endpoints
    // of targets (each cluster's own server pods).
    let mut ipt_svcs: Vec<BenchService> = Vec::new();
    let mut ours_svcs: Vec<BenchService> = Vec::new();
    let mut filler = 0u32;
    let maps = [
        svc_map(&ours.c.nodes[0].pin_path)?,
        svc_map(&ours.c.nodes[1].pin_path)?,
    ];
    let mut out = Vec::new();
    for &n in &o.svc_levels {
        let mut lr = LevelResult {
            n,
            ..Default::default()
        };
        let mut new_ours = Vec::new();
        while (ours_svcs.len() + new_ours.len() + 1) < n as usize {
            let s = kube::filler(filler);
            filler += 1;
            ipt_svcs.push(s.clone());
            new_ours.push(s);
        }
        let t_host = kube::target(n, &host_eps);
        let t_ours = kube::target(n, &ours_eps);
        ipt_svcs.push(t_host.clone());
        new_ours.push(t_ours.clone());
        // iptables: the full table, as kube-proxy's sync writes it.
        let table = kube::iptables_nat(&ipt_svcs, "10.244.0.0/16");
        lr.ipt_restore_full_s = iptables_restore(host, &table)?.as_secs_f64();
        // ours: the new services through etcd, until the target is live.
        let t0 = Instant::now();
        apply_services(&ours.c, &new_ours)?;
        ours_svcs.extend(new_ours);
        let k = svc_key(t_ours.vip);
        wait_maps(&maps, Duration::from_secs(120), |m| svc_count_is(m, &k, 3))
            .context("target service not in svc_v1 on every node")?;
        lr.ours_load_s = t0.elapsed().as_secs_f64();
        log.push(format!(
            "N={n}: iptables-restore of the full table {:.3} s; ours: applied and live in {:.3} s",
            lr.ipt_restore_full_s, lr.ours_load_s
        ));
        eprintln!("  {}", log.last().unwrap());
        // CRR to the last-added service, interleaved.
        for _ in 0..o.svc_reps {
            lr.ipt_crr.push(load::tcp_crr(
                host.client_ns(),
                load::CLIENT_CPU,
                SocketAddrV4::new(t_host.vip, kube::SVC_PORT),
                o.crr,
            )?);
            lr.ours_crr.push(load::tcp_crr(
                ours.client_ns(),
                load::CLIENT_CPU,
                SocketAddrV4::new(t_ours.vip, kube::SVC_PORT),
                o.crr,
            )?);
        }
        // One more service.
        for _ in 0..o.add_reps {
            let s = kube::filler(filler);
            filler += 1;
            ipt_svcs.push(s.clone());
            let table = kube::iptables_nat(&ipt_svcs, "10.244.0.0/16");
            lr.ipt_add_s
                .push(iptables_restore(host, &table)?.as_secs_f64());
            let yaml = kube::manifests(std::slice::from_ref(&s));
            let path = ours.c.dir.join(format!("add-{}.yaml", s.name));
            std::fs::write(&path, yaml)?;
            let k = svc_key(s.vip);
            let t0 = Instant::now();
            let mut cli = ours
                .c
                .underlay
                .command(tests::topo::agent_bin().to_str().unwrap())
                .args(["apply", "-f", path.to_str().unwrap()])
                .env("DATAPLANE_ETCD_ENDPOINTS", ours.c.endpoint())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let live = wait_maps(&maps, Duration::from_secs(30), |m| svc_count_is(m, &k, 3));
            let st = cli.wait()?;
            let cli_done = t0.elapsed();
            if !st.success() {
                bail!("dataplane apply failed: {st}");
            }
            let live = live.context("added service not live on every node within 30 s")?;
            lr.ours_add_s.push((live - t0).as_secs_f64());
            lr.ours_add_cli_s.push(cli_done.as_secs_f64());
            ours_svcs.push(s);
        }
        out.push(lr);
    }
    Ok(out)
}

// ---------------------------------------------------------------- control plane

struct CpResult {
    kind: &'static str,
    lat_ms: Vec<f64>,
    timeouts: usize,
}

fn control_plane(ours: &ModeCluster, o: &Opts) -> anyhow::Result<Vec<CpResult>> {
    let pins: Vec<PathBuf> = ours.c.nodes.iter().map(|n| n.pin_path.clone()).collect();
    let endpoint = ours.c.endpoint();
    let prefix = ours.c.prefix.clone();
    let events = o.cp_events;
    in_netns(
        &ours.c.underlay,
        move || -> anyhow::Result<Vec<CpResult>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let svcs: Vec<_> = pins
                .iter()
                .map(|p| svc_map(p))
                .collect::<anyhow::Result<_>>()?;
            let peers: Vec<_> = pins
                .iter()
                .map(|p| peers_map(p))
                .collect::<anyhow::Result<_>>()?;
            rt.block_on(async move {
                let mut cl = etcd_client::Client::connect([endpoint], None).await?;
                let lease = cl.lease_grant(3600, None).await?.id();
                let timeout = Duration::from_secs(5);
                let mut lease_r = CpResult {
                    kind: "new lease",
                    lat_ms: vec![],
                    timeouts: 0,
                };
                for k in 0..events {
                    let subnet: ipnet::Ipv4Net = format!("10.12.{}.0/24", k % 256).parse()?;
                    let public_ip = Ipv4Addr::new(172, 20, (k / 250) as u8, (k % 250 + 1) as u8);
                    let attrs = LeaseAttrs {
                        public_ip,
                        backend_type: "vxlan".into(),
                        vni: 1,
                        vtep_mac: [2, 0xdb, 172, 20, (k / 250) as u8, (k % 250 + 1) as u8],
                    };
                    let key = Key::new(24, subnet.network().octets());
                    let t0 = Instant::now();
                    cl.put(
                        subnet_key(&prefix, subnet),
                        attrs.to_json(),
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                    match wait_maps(&peers, timeout, |m| m.get(&key, 0).is_ok()) {
                        Some(t) => lease_r.lat_ms.push((t - t0).as_secs_f64() * 1e3),
                        None => lease_r.timeouts += 1,
                    }
                }
                let mut new_r = CpResult {
                    kind: "new service",
                    lat_ms: vec![],
                    timeouts: 0,
                };
                let mut chg_r = CpResult {
                    kind: "changed service (endpoints 3 -> 2)",
                    lat_ms: vec![],
                    timeouts: 0,
                };
                for k in 0..events {
                    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 101, 0, 1)) + k as u32);
                    let eps = [
                        Ipv4Addr::new(10, 251, 0, 1),
                        Ipv4Addr::new(10, 251, 0, 2),
                        Ipv4Addr::new(10, 251, 0, 3),
                    ];
                    let mut s = BenchService {
                        name: format!("cp-{k:04}"),
                        vip,
                        endpoints: eps.to_vec(),
                    };
                    let objs = dataplane::services::parse_manifests(&kube::manifests(
                        std::slice::from_ref(&s),
                    ))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let key = svc_key(vip);
                    let t0 = Instant::now();
                    dataplane::services::store::apply(
                        &mut cl,
                        dataplane::services::DEFAULT_PREFIX,
                        &objs,
                    )
                    .await?;
                    match wait_maps(&svcs, timeout, |m| svc_count_is(m, &key, 3)) {
                        Some(t) => new_r.lat_ms.push((t - t0).as_secs_f64() * 1e3),
                        None => new_r.timeouts += 1,
                    }
                    s.endpoints.truncate(2);
                    let objs = dataplane::services::parse_manifests(&kube::manifests(
                        std::slice::from_ref(&s),
                    ))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let t0 = Instant::now();
                    dataplane::services::store::apply(
                        &mut cl,
                        dataplane::services::DEFAULT_PREFIX,
                        &objs,
                    )
                    .await?;
                    match wait_maps(&svcs, timeout, |m| svc_count_is(m, &key, 2)) {
                        Some(t) => chg_r.lat_ms.push((t - t0).as_secs_f64() * 1e3),
                        None => chg_r.timeouts += 1,
                    }
                }
                anyhow::Ok(vec![lease_r, new_r, chg_r])
            })
        },
    )
    .join()
    .map_err(|_| anyhow::anyhow!("control plane thread panicked"))?
}

/// VmRSS, VmHWM (the peak) and RssAnon (heap and stacks; the rest of
/// VmRSS is the binary's and libraries' pages) of a process, in kB.
fn rss_kb(pid: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"), get("RssAnon:"))
}

/// `n` fake peers (flannel-format leases with distinct PublicIPs); returns
/// when both agents have them all.
fn add_fake_peers(c: &Cluster, n: usize) -> anyhow::Result<Duration> {
    let prefix = c.prefix.clone();
    let t0 = Instant::now();
    c.with_etcd(move |mut cl| async move {
        let lease = cl.lease_grant(3600, None).await?.id();
        for k in 0..n {
            let subnet = ipnet::Ipv4Net::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 8, 0, 0)) + (k as u32) * 256),
                24,
            )?;
            let public_ip = Ipv4Addr::new(172, 21, (k / 250) as u8, (k % 250 + 1) as u8);
            let attrs = LeaseAttrs {
                public_ip,
                backend_type: "vxlan".into(),
                vni: 1,
                vtep_mac: [2, 0xdb, 172, 21, (k / 250) as u8, (k % 250 + 1) as u8],
            };
            cl.put(
                subnet_key(&prefix, subnet),
                attrs.to_json(),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await?;
        }
        anyhow::Ok(())
    })?;
    let last = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 8, 0, 0)) + (n as u32 - 1) * 256);
    let key = Key::new(24, last.octets());
    let maps: Vec<_> = c
        .nodes
        .iter()
        .map(|nd| peers_map(&nd.pin_path))
        .collect::<anyhow::Result<_>>()?;
    wait_maps(&maps, Duration::from_secs(60), |m| m.get(&key, 0).is_ok())
        .context("fake peers not in peers_v1")?;
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------- agent memory

/// Services in etcd for the memory figures (before the agents start, so
/// the start-up listing is part of what is measured).
const MEM_SERVICES: u32 = 10_000;
/// Fake peers for the memory figures.
const MEM_PEERS: usize = 1_000;
/// An hour of churn, compressed: 60 rounds ("minutes"), each rewriting
/// [`CHURN_SLICE_UPDATES`] EndpointSlices (a rolling restart replacing
/// endpoints) and creating and deleting [`CHURN_SERVICES`] Services with
/// their slices.
const CHURN_ROUNDS: u32 = 60;
const CHURN_SLICE_UPDATES: u32 = 100;
const CHURN_SERVICES: u32 = 10;

/// One measurement of the agents: (VmRSS, VmHWM, RssAnon) in kB per
/// agent; zeros where not measured.
struct MemPoint {
    phase: String,
    agents: Vec<(u64, u64, u64)>,
}

struct MemResult {
    points: Vec<MemPoint>,
    sync_s: f64,
    peers_s: f64,
    churn_s: f64,
    churn_writes: u64,
}

fn rss_all(c: &Cluster) -> Vec<(u64, u64, u64)> {
    c.nodes
        .iter()
        .filter_map(|n| n.agent.as_ref().map(|a| rss_kb(a.id())))
        .collect()
}

/// A service of the churn: same shape as the fillers, endpoints moved by
/// `round` so every rewrite changes them.
fn churned(i: u32, round: u32) -> BenchService {
    let mut s = kube::filler(i);
    for (k, ep) in s.endpoints.iter_mut().enumerate() {
        *ep = Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (i * 7 + round * 13 + k as u32) % 65_000 + 1,
        );
    }
    s
}

/// Two agents started with [`MEM_SERVICES`] Services (+ slices) already in
/// etcd; RSS after the initial sync, with [`MEM_PEERS`] peers, then after
/// half and all of an hour's churn.
fn agent_memory() -> anyhow::Result<MemResult> {
    let mut c = Cluster::new(3)?;
    tests::interrupt::register(&c);
    c.put_config(OURS_CONFIG)?;
    // Node 3 starts before any Service exists (its idle figure is the
    // baseline) and receives them as watch events; nodes 1 and 2 start
    // with them all in etcd (the start-up listing).
    c.start_agent(2, &["--decap-mode", "tc"])?;
    c.wait_ready(2, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = c.nodes[2]
        .agent
        .as_ref()
        .map_or((0, 0, 0), |a| rss_kb(a.id()));
    let svcs: Vec<BenchService> = (0..MEM_SERVICES).map(kube::filler).collect();
    apply_services(&c, &svcs)?;
    let t0 = Instant::now();
    for i in 0..2 {
        c.start_agent(i, &["--decap-mode", "tc"])?;
    }
    for i in 0..2 {
        c.wait_ready(i, Duration::from_secs(120))?;
    }
    let maps: Vec<_> = c
        .nodes
        .iter()
        .map(|n| svc_map(&n.pin_path))
        .collect::<anyhow::Result<_>>()?;
    let last = svc_key(svcs.last().context("no services")?.vip);
    wait_maps(&maps, Duration::from_secs(120), |m| {
        svc_count_is(m, &last, 3)
    })
    .context("services not in svc_v1 after start-up")?;
    let sync_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let mut points = vec![
        MemPoint {
            phase: "node 3 idle: started before any Service existed, no peers".into(),
            agents: vec![(0, 0, 0), (0, 0, 0), idle],
        },
        MemPoint {
            phase: format!("after the initial sync ({MEM_SERVICES} services, no peers)"),
            agents: rss_all(&c),
        },
    ];
    let peers_s = add_fake_peers(&c, MEM_PEERS)?.as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    points.push(MemPoint {
        phase: format!("with {MEM_PEERS} peers"),
        agents: rss_all(&c),
    });
    // Churn: live services are fill-[lo, hi); each round deletes the
    // oldest CHURN_SERVICES, creates as many new ones, and rewrites the
    // slices of CHURN_SLICE_UPDATES live ones.
    let t1 = Instant::now();
    let (mut lo, mut hi) = (0u32, MEM_SERVICES);
    let mut writes = 0u64;
    for round in 1..=CHURN_ROUNDS {
        let gone: Vec<BenchService> = (lo..lo + CHURN_SERVICES).map(kube::filler).collect();
        lo += CHURN_SERVICES;
        let new: Vec<BenchService> = (hi..hi + CHURN_SERVICES).map(kube::filler).collect();
        hi += CHURN_SERVICES;
        let span = hi - lo;
        let updated: Vec<BenchService> = (0..CHURN_SLICE_UPDATES)
            .map(|k| lo + (round * 7919 + k * 104_729) % span)
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .map(|i| churned(i, round))
            .collect();
        let del = dataplane::services::parse_manifests(&kube::manifests(&gone))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        writes += (del.len() + 2 * new.len() + updated.len()) as u64;
        apply_services(&c, &new)?;
        apply_services(&c, &updated)?;
        c.with_etcd(move |mut cl| async move {
            dataplane::services::delete_objects(&mut cl, dataplane::services::DEFAULT_PREFIX, &del)
                .await?;
            anyhow::Ok(())
        })?;
        let probe = svc_key(new.last().context("no new service")?.vip);
        wait_maps(&maps, Duration::from_secs(60), |m| {
            svc_count_is(m, &probe, 3)
        })
        .with_context(|| format!("churn round {round} not in svc_v1"))?;
        if round == CHURN_ROUNDS / 2 || round == CHURN_ROUNDS {
            std::thread::sleep(Duration::from_secs(1));
            points.push(MemPoint {
                phase: format!(
                    "after {round} of {CHURN_ROUNDS} churn rounds ({} services)",
                    hi - lo
                ),
                agents: rss_all(&c),
            });
        }
    }
    let churn_s = t1.elapsed().as_secs_f64();
    tests::interrupt::unregister(&c.id);
    Ok(MemResult {
        points,
        sync_s,
        peers_s,
        churn_s,
        churn_writes: writes,
    })
}

/// The "Agent memory" section; adds the targets to `r`.
fn memory_section(res: &MemResult, md: &mut String, r: &mut Report) -> Value {
    let _ = writeln!(md, "## Agent memory\n");
    let _ = writeln!(
        md,
        "Three agents (TC decap). Node 3's starts first, before any Service exists (its idle figure is the baseline), and receives the Services as watch events; \
         nodes 1 and 2 start with {MEM_SERVICES} Services and their EndpointSlices (3 endpoints each) already in etcd, \
         so their figures include the start-up listing; all frontends in svc_v1 on every node {:.2} s after their start. \
         Then {MEM_PEERS} fake peer leases (flannel JSON, distinct PublicIPs; in peers_v1 on both nodes after {:.2} s). \
         Then an hour of churn compressed into {:.1} s: {CHURN_ROUNDS} rounds, each creating {CHURN_SERVICES} Services, deleting the {CHURN_SERVICES} oldest \
         and rewriting the EndpointSlices of {CHURN_SLICE_UPDATES} others with new endpoints ({} object writes and deletes in all). \
         VmRSS (of it RssAnon: heap and stacks; the rest is pages of the binary and libraries) and VmHWM (the peak) from /proc, 1 s after each phase.\n",
        res.sync_s, res.peers_s, res.churn_s, res.churn_writes
    );
    let n = res.points.first().map_or(0, |p| p.agents.len());
    let _ = writeln!(
        md,
        "| phase | {} |",
        (1..=n)
            .map(|i| format!("node {i} RSS (anon) MB | node {i} peak MB"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|---|".repeat(n));
    let mb = |kb: u64| {
        if kb == 0 {
            "".to_string()
        } else {
            f1(kb as f64 / 1024.0)
        }
    };
    let mut js = Vec::new();
    for p in &res.points {
        let mut row = format!("| {} |", p.phase);
        for (rss, hwm, anon) in &p.agents {
            if *rss == 0 {
                let _ = write!(row, " | |");
            } else {
                let _ = write!(row, " {} ({}) | {} |", mb(*rss), mb(*anon), mb(*hwm));
            }
        }
        let _ = writeln!(md, "{row}");
        js.push(json!({"phase": p.phase, "agents": p.agents.iter().map(|(rss, hwm, anon)| json!({"rss_mb": num(*rss as f64 / 1024.0), "rss_anon_mb": num(*anon as f64 / 1024.0), "vmhwm_mb": num(*hwm as f64 / 1024.0)})).collect::<Vec<_>>()}));
    }
    let _ = writeln!(md);
    let worst = |i: usize| {
        res.points.get(i).map_or(f64::NAN, |p| {
            p.agents.iter().map(|a| a.0).max().unwrap_or(0) as f64 / 1024.0
        })
    };
    let peak = res
        .points
        .iter()
        .flat_map(|p| p.agents.iter().map(|a| a.1))
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    r.target(
        "agent RSS at 1,000 peers / 10,000 services",
        worst(2),
        30.0,
        "MB",
        false,
        &format!("worst of {n} agents; peak (VmHWM) {} MB", f1(peak)),
    );
    let after = worst(res.points.len() - 1);
    r.target(
        "agent RSS after an hour of churn / before it",
        after / worst(2),
        1.10,
        "x",
        false,
        &format!("{} vs {} MB, worst agent", f1(after), f1(worst(2))),
    );
    json!({"services": MEM_SERVICES, "peers": MEM_PEERS, "sync_s": num(res.sync_s), "churn_s": num(res.churn_s), "churn_writes": res.churn_writes, "points": js})
}

// ---------------------------------------------------------------- BPF cost

struct ProgCost {
    name: &'static str,
    program: &'static str,
    ns_per_packet: f64,
    verdict: u32,
    how: String,
}

fn bpf_costs(o: &Opts) -> anyhow::Result<Vec<ProgCost>> {
    use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
    use dataplane::{
        bpf::Dataplane,
        reconcile::{FrontendState, Peer, Reconciler, Resync},
        services::ServiceName,
    };
    use dataplane_common::{Backend, NODE_CFG_READY, NodeConfig, prog_names};
    use tests::packets::*;
    let repeat = o.bpf_repeat;
    let new_flows = o.bpf_new_flows;
    tests::netns::in_private_netns(move || -> anyhow::Result<Vec<ProgCost>> {
        const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
        const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
        const OUR_VTEP: [u8; 6] = [0x02, 0xdb, 192, 168, 100, 1];
        const PEER_VTEP: [u8; 6] = [0x02, 0xdb, 192, 168, 100, 2];
        const PEER_UL_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
        const POD_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 5];
        const CNI0_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 1];
        let client = Ipv4Addr::new(10, 244, 1, 5);
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        tests::netns::sh("sysctl -qw net.ipv4.ip_forward=1")?;
        tests::netns::sh(
            "ip link add ul0 type veth peer name ul1 && ip link set ul1 address 02:00:00:00:00:02 && \
             ip addr add 192.168.100.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up && \
             ip neigh replace 192.168.100.2 lladdr 02:00:00:00:00:02 dev ul0 nud permanent && \
             ip link add cni0 type bridge && ip link set cni0 address 02:bb:00:00:00:01 && \
             ip addr add 10.244.1.1/24 dev cni0 && ip link set cni0 up",
        )?;
        let link = |name: &str| -> anyhow::Result<(u32, [u8; 6])> {
            let v: Value =
                serde_json::from_str(&tests::netns::sh(&format!("ip -j link show {name}"))?)?;
            let idx = v[0]["ifindex"].as_u64().context("ifindex")? as u32;
            let mac = dataplane::lease::parse_mac(v[0]["address"].as_str().context("mac")?)
                .context("mac")?;
            Ok((idx, mac))
        };
        let (ul_idx, ul_mac) = link("ul0")?;
        let (br_idx, _) = link("cni0")?;
        let mut dp = Dataplane::load_with(None)?;
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
                ..Default::default()
            },
        )?;
        let mut peers = BTreeMap::new();
        peers.insert(
            net("10.244.2.0/24"),
            Peer {
                public_ip: PEER_IP,
                vtep_mac: PEER_VTEP,
            },
        );
        rec.set_peers(dp.maps(), &peers, Resync::Full)?;
        let backends = (0..3)
            .map(|k| Backend {
                ip: Ipv4Addr::new(10, 244, 2, 7 + k).octets(),
                port: 8080u16.to_be_bytes(),
                _pad: [0; 2],
            })
            .collect();
        let fronts = [(
            svc_key_port(vip, 80),
            FrontendState {
                backends,
                affinity_timeout_s: None,
                north_south: None,
                empty_drops: false,
            },
        )]
        .into();
        rec.set_service(dp.maps(), &ServiceName::new("default", "bench"), &fronts)?;

        let run = |dp: &mut Dataplane,
                   prog: &str,
                   xdp: bool,
                   input: &[u8],
                   repeat: u32|
         -> anyhow::Result<(u32, Duration)> {
            let mut out = vec![0u8; input.len() + 256];
            let mut opts = TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            };
            opts.repeat = repeat;
            let r = if xdp {
                let p: &mut Xdp = dp
                    .ebpf_mut()
                    .program_mut(prog)
                    .context("prog")?
                    .try_into()?;
                p.test_run(opts)?
            } else {
                let p: &mut SchedClassifier = dp
                    .ebpf_mut()
                    .program_mut(prog)
                    .context("prog")?
                    .try_into()?;
                p.test_run(opts)?
            };
            Ok((r.return_value, r.duration))
        };
        let payload = [0x5au8; 64];
        let mut costs = Vec::new();
        // Which data path counters a case moved (what the program did).
        let snap = |dp: &Dataplane| -> BTreeMap<&'static str, u64> {
            dp.stats()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, c)| (k.name(), c.packets))
                .collect()
        };
        let moved = |a: &BTreeMap<&'static str, u64>, b: &BTreeMap<&'static str, u64>| -> String {
            let v: Vec<&str> = b
                .iter()
                .filter(|(k, n)| a.get(*k).copied().unwrap_or(0) < **n)
                .map(|(k, _)| *k)
                .collect();
            format!(
                "counters moved: {}",
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            )
        };
        // TC test runs reuse one skb across `repeat`, so a program that
        // rewrites the packet (encap, decap, DNAT) would run on its own
        // output from the second repetition on. Those paths run with
        // repeat 1 on a fresh packet each time; the per-run overhead that
        // adds is measured on a packet the program passes untouched
        // (repeat 1 vs repeat N) and subtracted.
        let k_runs = new_flows;
        let pass = pod_frame(
            CNI0_MAC,
            POD_MAC,
            client,
            Ipv4Addr::new(8, 8, 8, 8),
            &payload,
        );
        let (_, d_rep) = run(&mut dp, prog_names::FROM_POD, false, &pass, repeat)?;
        let mut t1 = Duration::ZERO;
        for _ in 0..k_runs {
            t1 += run(&mut dp, prog_names::FROM_POD, false, &pass, 1)?.1;
        }
        let t1_ns = t1.as_nanos() as f64 / k_runs as f64;
        let overhead = t1_ns - d_rep.as_nanos() as f64;
        costs.push(ProgCost {
            name: "pass-through (pod -> outside the cluster, untouched): reference",
            program: prog_names::FROM_POD,
            ns_per_packet: d_rep.as_nanos() as f64,
            verdict: 0,
            how: format!("repeat {repeat}; the same with repeat 1: {t1_ns:.0} ns, so the per-run overhead subtracted below is {overhead:.0} ns"),
        });
        let single = |dp: &mut Dataplane,
                      prog: &'static str,
                      xdp: bool,
                      frames: &dyn Fn(u32) -> Vec<u8>|
         -> anyhow::Result<(u32, f64, String)> {
            let a = snap(dp);
            let mut total = Duration::ZERO;
            let mut rc = 0;
            for k in 0..k_runs {
                let f = frames(k);
                let (r, d) = run(dp, prog, xdp, &f, 1)?;
                rc = r;
                total += d;
            }
            Ok((
                rc,
                total.as_nanos() as f64 / k_runs as f64 - overhead,
                moved(&a, &snap(dp)),
            ))
        };
        // Encapsulation: pod -> remote pod, TCP segment with 64 B.
        let seg = tcp(
            client,
            Ipv4Addr::new(10, 244, 2, 7),
            40000,
            8080,
            1,
            1,
            0x18,
            &payload,
        );
        let input = eth(
            CNI0_MAC,
            POD_MAC,
            ETH_P_IP,
            &ipv4(client, Ipv4Addr::new(10, 244, 2, 7), 6, 0, &seg),
        );
        let (rc, ns, m) = single(&mut dp, prog_names::FROM_POD, false, &|_| input.clone())?;
        costs.push(ProgCost {
            name: "encap (pod -> remote pod)",
            program: prog_names::FROM_POD,
            ns_per_packet: ns,
            verdict: rc,
            how: format!(
                "{k_runs} runs of repeat 1 minus overhead, {} B frame; {m}",
                input.len()
            ),
        });
        // Decapsulation: VXLAN from the peer to a local pod, TC and XDP.
        let inner_seg = tcp(
            Ipv4Addr::new(10, 244, 2, 7),
            client,
            8080,
            40000,
            1,
            1,
            0x18,
            &payload,
        );
        let inner = ipv4(Ipv4Addr::new(10, 244, 2, 7), client, 6, 0, &inner_seg);
        let vx = VxlanFrame {
            outer_dst_mac: ul_mac,
            outer_src_mac: PEER_UL_MAC,
            src_ip: PEER_IP,
            dst_ip: OUR_IP,
            sport: 45678,
            dport: 8472,
            flags: 0x08,
            vni: 1,
            inner: eth(OUR_VTEP, PEER_VTEP, ETH_P_IP, &inner),
        }
        .build();
        let (rc, ns, m) = single(&mut dp, prog_names::FROM_UNDERLAY, false, &|_| vx.clone())?;
        costs.push(ProgCost {
            name: "decap, TC",
            program: prog_names::FROM_UNDERLAY,
            ns_per_packet: ns,
            verdict: rc,
            how: format!(
                "{k_runs} runs of repeat 1 minus overhead, {} B frame; {m}",
                vx.len()
            ),
        });
        let a = snap(&dp);
        let (rc, d) = run(&mut dp, prog_names::DECAP_XDP, true, &vx, repeat)?;
        costs.push(ProgCost { name: "decap, XDP", program: prog_names::DECAP_XDP, ns_per_packet: d.as_nanos() as f64, verdict: rc, how: format!("repeat {repeat} (XDP test runs start from the input frame each time), {} B frame; {}", vx.len(), moved(&a, &snap(&dp))) });
        // Service lookup on a new flow: a SYN to the ClusterIP from a new
        // source port each time (lookup, backend pick, conntrack and
        // reverse-NAT insert, DNAT, then encapsulation to the backend's node).
        let syn = |k: u32| {
            let sport = 1024 + (k % 60_000) as u16;
            let src = Ipv4Addr::new(10, 244, 1, 5 + (k / 60_000) as u8);
            let seg = tcp(src, vip, sport, 80, 1000, 0, 0x02, b"");
            eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(src, vip, 6, 0, &seg))
        };
        let (rc, ns, m) = single(&mut dp, prog_names::FROM_POD, false, &syn)?;
        costs.push(ProgCost {
            name: "service lookup, new flow (SYN to ClusterIP; + CT/RNAT insert, DNAT, encap)",
            program: prog_names::FROM_POD,
            ns_per_packet: ns,
            verdict: rc,
            how: format!("{k_runs} distinct flows, repeat 1 each, minus overhead; {m}"),
        });
        // Conntrack hit: the next segment of an existing flow.
        let seg = tcp(client, vip, 50000, 80, 1000, 0, 0x02, b"");
        run(
            &mut dp,
            prog_names::FROM_POD,
            false,
            &eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(client, vip, 6, 0, &seg)),
            1,
        )?;
        let seg = tcp(client, vip, 50000, 80, 1001, 1, 0x18, &payload);
        let input = eth(CNI0_MAC, POD_MAC, ETH_P_IP, &ipv4(client, vip, 6, 0, &seg));
        let (rc, ns, m) = single(&mut dp, prog_names::FROM_POD, false, &|_| input.clone())?;
        costs.push(ProgCost {
            name: "conntrack hit (established flow to ClusterIP; + DNAT, encap)",
            program: prog_names::FROM_POD,
            ns_per_packet: ns,
            verdict: rc,
            how: format!(
                "{k_runs} runs of repeat 1 minus overhead, {} B frame; {m}",
                input.len()
            ),
        });
        Ok(costs)
    })
}

fn verdict_name(program: &str, v: u32) -> String {
    let name = if program == dataplane_common::prog_names::DECAP_XDP {
        [
            "XDP_ABORTED",
            "XDP_DROP",
            "XDP_PASS",
            "XDP_TX",
            "XDP_REDIRECT",
        ]
        .get(v as usize)
        .copied()
    } else {
        match v {
            0 => Some("TC_ACT_OK"),
            2 => Some("TC_ACT_SHOT"),
            7 => Some("TC_ACT_REDIRECT"),
            _ => None,
        }
    };
    format!("{v} ({})", name.unwrap_or("?"))
}

fn svc_key_port(vip: Ipv4Addr, port: u16) -> SvcKey {
    SvcKey {
        vip: vip.octets(),
        port: port.to_be_bytes(),
        proto: dataplane_common::PROTO_TCP,
        _pad: 0,
    }
}

// ---------------------------------------------------------------- pod to pod

/// Where a part of the benchmark writes: targets and "not measured" (r),
/// the Markdown sections, the JSON sections, run errors.
struct Sections<'a> {
    r: &'a mut Report,
    md: &'a mut String,
    json: &'a mut serde_json::Map<String, Value>,
    errors: &'a mut Vec<String>,
}

/// The "where do single-stream retransmissions come from" table: counter
/// deltas over each 1-stream bulk run, per mode.
fn retransmit_counters(
    figs: &Figures,
    mode_names: &[&str],
    md: &mut String,
    j: &mut serde_json::Map<String, Value>,
) {
    let _ = writeln!(
        md,
        "Single-stream bulk: counter deltas over each 1-stream run (median (min–max) over repetitions). \
         Sender: TCP counters of the client's namespace; receiver: the server's (`/proc/net/snmp`, `/proc/net/netstat`, named as `nstat` names them); \
         interface drops: rx + tx `dropped` of every link in every namespace of the cluster; backlog drops: `/proc/net/softnet_stat` (machine-wide); \
         data path drops: our `drop_*` counters on both nodes.\n"
    );
    let _ = writeln!(md, "| counter | meaning | {} |", mode_names.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(mode_names.len()));
    let rows = [
        (
            "bulk1_gbps_retransmits_per_gb".to_string(),
            "retransmits per GB".to_string(),
            "iperf3's retransmits over the bytes sent (a faster mode sends more)",
        ),
        (
            "bulk1_1cpu_gbps_retransmits_per_gb".to_string(),
            "retransmits per GB, one CPU".to_string(),
            "the same with sender and receiver pinned to one CPU",
        ),
    ]
    .into_iter()
    .chain(
        netstat::SENDER
            .iter()
            .map(|(n, m)| (format!("bulk1_tx_{n}"), format!("sender {n}"), *m)),
    )
    .chain(
        netstat::RECEIVER
            .iter()
            .map(|(n, m)| (format!("bulk1_rx_{n}"), format!("receiver {n}"), *m)),
    )
    .chain([
        (
            "bulk1_drops_links".to_string(),
            "interface drops".to_string(),
            "packets dropped by a device (veth, bridge)",
        ),
        (
            "bulk1_drops_softnet".to_string(),
            "backlog drops".to_string(),
            "packets dropped: a CPU's input backlog full (machine-wide)",
        ),
        (
            "bulk1_drops_dataplane".to_string(),
            "data path drops".to_string(),
            "our drop_* counters, both nodes",
        ),
    ]);
    let mut js = serde_json::Map::new();
    for (metric, label, meaning) in rows {
        let mut row = format!("| {label} | {meaning} |");
        for m in mode_names {
            let s = summary(figs, m, &metric);
            let _ = write!(row, " {} |", s.fmt(thousands));
            js.insert(format!("{m}: {metric}"), s.json("count"));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
    j.insert("bulk1_counters".into(), Value::Object(js));
}

/// Pod to pod across nodes in every mode, and node to node over the
/// underlay, interleaved; returns the clusters (the ClusterIP part reuses
/// host routing and TC).
fn pod_to_pod(
    o: &Opts,
    started: Instant,
    chart: &Path,
    out: &mut Sections<'_>,
) -> Vec<ModeCluster> {
    let auto = dataplane::agent::DecapMode::Auto.resolve(Some("veth"));
    let (r, md, sections, errors) = (&mut *out.r, &mut *out.md, &mut *out.json, &mut *out.errors);
    eprintln!("[p2p] building clusters");
    let mut figs = Figures::new();
    let mut modes: Vec<ModeCluster> = Vec::new();
    let mut tso = BTreeMap::new();
    for (key, name, build) in [
        (
            "underlay",
            UNDERLAY_MODE,
            Box::new(underlay_cluster) as Box<dyn Fn() -> anyhow::Result<ModeCluster>>,
        ),
        ("host", "host routing", Box::new(|| host_cluster(3))),
        (
            "flannel",
            "kernel vxlan (flannel)",
            Box::new(|| flannel_cluster(1)),
        ),
        (
            "tc",
            "ours, TC decap",
            Box::new(|| ours_cluster("ours, TC decap", "tc", 3)),
        ),
        (
            "xdp",
            "ours, XDP decap",
            Box::new(|| ours_cluster("ours, XDP decap", "xdp", 1)),
        ),
    ] {
        if o.modes
            .as_ref()
            .is_some_and(|m| !m.iter().any(|k| k == key))
        {
            continue;
        }
        match build() {
            Ok(m) => {
                tso.insert(name.to_string(), ethtool_tso(&m));
                modes.push(m);
            }
            Err(e) => r
                .missing
                .push(format!("mode {name}: cluster setup failed: {e:#}")),
        }
    }
    eprintln!(
        "[p2p] {} modes ready after {:.1} s",
        modes.len(),
        started.elapsed().as_secs_f64()
    );
    for rep in 0..o.reps {
        // Rotate the order per repetition so drift hits all modes alike.
        let n = modes.len();
        for k in 0..n {
            let m = &modes[(k + rep) % n];
            pod_to_pod_rep(m, o, &mut figs, errors);
        }
        eprintln!(
            "[p2p] repetition {}/{} done at {:.1} s",
            rep + 1,
            o.reps,
            started.elapsed().as_secs_f64()
        );
    }
    let mode_names: Vec<&str> = modes.iter().map(|m| m.name).collect();
    let host_ok = mode_names.contains(&"host routing");
    let vx_ok = mode_names.contains(&"kernel vxlan (flannel)");
    let ul_ok = mode_names.contains(&UNDERLAY_MODE);

    let p2p_metrics: [(&str, &str, &str); 22] = [
        ("bulk1_gbps", "TCP bulk, 1 stream", "Gbit/s"),
        ("bulk4_gbps", "TCP bulk, 4 streams", "Gbit/s"),
        (
            "bulk1_gbps_retransmits",
            "retransmits, 1 stream",
            "segments",
        ),
        (
            "bulk4_gbps_retransmits",
            "retransmits, 4 streams",
            "segments",
        ),
        ("bulk1_1cpu_gbps", "TCP bulk, 1 stream, one CPU", "Gbit/s"),
        (
            "bulk1_1cpu_gbps_retransmits",
            "retransmits, 1 stream, one CPU",
            "segments",
        ),
        ("tcp_rr_rate", "TCP RR 64 B", "transactions/s"),
        ("tcp_rr_p50_us", "TCP RR p50", "µs"),
        ("tcp_rr_p99_us", "TCP RR p99", "µs"),
        ("tcp_crr_rate", "TCP CRR", "connections/s"),
        ("tcp_crr_p50_us", "TCP CRR p50", "µs"),
        ("tcp_crr_p99_us", "TCP CRR p99", "µs"),
        ("tcp_crr_connect_p50_us", "connect() p50", "µs"),
        ("tcp_rr_1cpu_rate", "TCP RR 64 B, one CPU", "transactions/s"),
        ("tcp_rr_1cpu_p50_us", "TCP RR p50, one CPU", "µs"),
        ("tcp_rr_1cpu_p99_us", "TCP RR p99, one CPU", "µs"),
        ("tcp_crr_1cpu_rate", "TCP CRR, one CPU", "connections/s"),
        ("tcp_crr_1cpu_p50_us", "TCP CRR p50, one CPU", "µs"),
        ("tcp_crr_1cpu_p99_us", "TCP CRR p99, one CPU", "µs"),
        ("udp_rr_rate", "UDP RR 64 B", "transactions/s"),
        ("udp_rr_p50_us", "UDP RR p50", "µs"),
        ("udp_rr_p99_us", "UDP RR p99", "µs"),
    ];
    {
        let mut j = serde_json::Map::new();
        let _ = writeln!(md, "## Pod to pod across nodes\n");
        let _ = writeln!(
            md,
            "Two node namespaces on a veth underlay (bridge in an underlay namespace), one client pod on node 1, the server pod on node 2; \
             \"{UNDERLAY_MODE}\" is the same underlay with client and server in the node namespaces themselves (no pods, no overlay, nothing loaded): the limit of the path. \
             Load generator in Rust (tests/src/bench/load.rs): client thread pinned to CPU {}, server to CPU {}; the \"one CPU\" rows pin both to CPU {} \
             (a second echo server, port {SERVER_PORT_SAME_CPU}), so a transaction is one CPU's work, per-packet cost rather than cross-CPU wake-ups; bulk is iperf3 -J with -A. \
             {} repetition(s), modes interleaved (order rotated per repetition); each cell: median (min–max). \
             Bulk {} s per run; RR/CRR/UDP {} ms per run after 100 ms warm-up.\n",
            load::CLIENT_CPU,
            load::SERVER_CPU,
            load::SAME_CPU,
            o.reps,
            o.bulk_secs,
            o.rr.as_millis()
        );
        let _ = writeln!(md, "| figure | unit | {} |", mode_names.join(" | "));
        let _ = writeln!(md, "|---|---|{}", "---|".repeat(mode_names.len()));
        for (metric, label, unit) in p2p_metrics {
            let mut row = format!("| {label} | {unit} |");
            for m in &mode_names {
                let s = summary(&figs, m, metric);
                let fmt = |x: f64| {
                    if unit == "Gbit/s" {
                        f2(x)
                    } else if unit == "µs" {
                        f1(x)
                    } else {
                        thousands(x)
                    }
                };
                let _ = write!(row, " {} |", s.fmt(fmt));
                j.entry(m.to_string())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .unwrap()
                    .insert(metric.to_string(), s.json(unit));
            }
            let _ = writeln!(md, "{row}");
        }
        let _ = writeln!(md);
        // Ratios.
        let ours_modes: Vec<&str> = mode_names
            .iter()
            .copied()
            .filter(|m| m.starts_with("ours"))
            .collect();
        let mut ratios = serde_json::Map::new();
        let _ = writeln!(
            md,
            "Ratios of medians (higher is better for rates and throughput, lower for latency):\n"
        );
        let _ = writeln!(
            md,
            "| figure | {} |",
            ours_modes
                .iter()
                .flat_map(|m| {
                    [
                        format!("{m} / host routing"),
                        format!("{m} / kernel VXLAN"),
                        format!("{m} / underlay"),
                    ]
                })
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(md, "|---|{}", "---|".repeat(ours_modes.len() * 3));
        for (metric, label, _) in p2p_metrics.iter().filter(|(m, ..)| !m.contains("retrans")) {
            let mut row = format!("| {label} |");
            for m in &ours_modes {
                let ours = summary(&figs, m, metric).median;
                let h = if host_ok {
                    ours / summary(&figs, "host routing", metric).median
                } else {
                    f64::NAN
                };
                let v = if vx_ok {
                    ours / summary(&figs, "kernel vxlan (flannel)", metric).median
                } else {
                    f64::NAN
                };
                let u = if ul_ok {
                    ours / summary(&figs, UNDERLAY_MODE, metric).median
                } else {
                    f64::NAN
                };
                let _ = write!(row, " {}x | {}x | {}x |", f2(h), f2(v), f2(u));
                ratios.insert(format!("{m} / host routing: {metric}"), num(h));
                ratios.insert(format!("{m} / kernel VXLAN: {metric}"), num(v));
                ratios.insert(format!("{m} / underlay: {metric}"), num(u));
            }
            let _ = writeln!(md, "{row}");
        }
        let _ = writeln!(
            md,
            "\n`--decap-mode auto` picks **{auto:?}** on this underlay (veth: XDP on a veth turns off TSO on its peer). \
             TSO as ethtool reports it per mode: {}\n",
            tso.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        retransmit_counters(&figs, &mode_names, md, &mut j);
        j.insert("ratios".into(), Value::Object(ratios));
        j.insert("auto_decap_mode_on_veth".into(), json!(format!("{auto:?}")));
        j.insert("tso".into(), json!(tso));
        j.insert("raw".into(), json!(figs));
        sections.insert("pod_to_pod".into(), Value::Object(j));
        // Targets.
        for m in &ours_modes {
            for (metric, label) in [
                ("tcp_rr_rate", "TCP RR"),
                ("tcp_crr_rate", "TCP CRR"),
                ("tcp_rr_1cpu_rate", "TCP RR one CPU"),
                ("tcp_crr_1cpu_rate", "TCP CRR one CPU"),
            ] {
                let v = summary(&figs, m, metric).median
                    / summary(&figs, "host routing", metric).median;
                r.target(
                    &format!("{label} {m} / host routing"),
                    v,
                    1.0,
                    "x",
                    true,
                    "pod to pod, medians",
                );
            }
            for metric in ["bulk1_gbps", "bulk4_gbps"] {
                let v = summary(&figs, m, metric).median
                    / summary(&figs, "kernel vxlan (flannel)", metric).median;
                r.target(
                    &format!(
                        "bulk {} {m} / kernel VXLAN",
                        if metric == "bulk1_gbps" {
                            "1 stream"
                        } else {
                            "4 streams"
                        }
                    ),
                    v,
                    1.0,
                    "x",
                    true,
                    "pod to pod, medians",
                );
            }
        }
        // Chart: pod-to-pod latency per mode.
        let cats: Vec<String> = mode_names.iter().map(|s| s.to_string()).collect();
        let series: Vec<(String, Vec<f64>)> = [
            ("TCP RR p50", "tcp_rr_p50_us"),
            ("TCP RR p99", "tcp_rr_p99_us"),
            ("TCP CRR p50", "tcp_crr_p50_us"),
            ("TCP CRR p99", "tcp_crr_p99_us"),
            ("UDP RR p50", "udp_rr_p50_us"),
        ]
        .iter()
        .map(|(n, k)| {
            (
                n.to_string(),
                mode_names
                    .iter()
                    .map(|m| summary(&figs, m, k).median)
                    .collect(),
            )
        })
        .collect();
        if let Err(e) = std::fs::write(
            chart,
            svg::bars(
                "Pod-to-pod latency across nodes, per mode (medians)",
                "latency (µs)",
                &cats,
                &series,
            ),
        ) {
            errors.push(format!("writing {}: {e}", chart.display()));
        }
    }

    modes
}

// ---------------------------------------------------------------- main

/// `--memory`: the agent memory figures alone, to bench/results/memory.md.
fn memory_only(out_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut r = Report::default();
    let mut md = String::new();
    let res = agent_memory()?;
    memory_section(&res, &mut md, &mut r);
    let mut text = format!(
        "# Agent memory (`cargo xtask bench --memory`)\n\n{}; load average {}; {:.0} s.\n\n| target | measured | goal | result | detail |\n|---|---|---|---|---|\n",
        sh_out("date -u +%Y-%m-%dT%H:%M:%SZ"),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    for t in &r.target_md {
        let _ = writeln!(text, "{t}");
    }
    let _ = writeln!(text);
    text.push_str(&md);
    std::fs::write(out_dir.join("memory.md"), &text)?;
    println!("{text}");
    Ok(())
}

/// A part of the benchmark run on its own (`--p2p`, `--nodeport`): its
/// sections with the machine and load in front, to `bench/results/<file>.md`
/// and `.json`.
fn write_partial(
    out_dir: &Path,
    file: &str,
    title: &str,
    started: Instant,
    load_before: &str,
    out: Sections<'_>,
) -> anyhow::Result<()> {
    let (r, md, errors) = (&*out.r, &*out.md, &*out.errors);
    let load_after = loadavg();
    let mut text = format!(
        "# {title}\n\nMachine: kernel {}, {} CPUs ({}); {}; load average before {load_before}, after {load_after}; {:.0} s.\n\n",
        sh_out("uname -r"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sh_out("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").trim(),
        sh_out("date -u +%Y-%m-%dT%H:%M:%SZ"),
        started.elapsed().as_secs_f64()
    );
    if !r.target_md.is_empty() {
        text.push_str("| target | measured | goal | result | detail |\n|---|---|---|---|---|\n");
        for t in &r.target_md {
            let _ = writeln!(text, "{t}");
        }
        text.push('\n');
    }
    let missing: Vec<String> = r
        .missing
        .iter()
        .cloned()
        .chain(errors.iter().map(|e| format!("run error: {e}")))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(text, "## Not measured / errors\n");
        for m in &missing {
            let _ = writeln!(text, "- {}", m.replace('\n', " "));
        }
        text.push('\n');
    }
    text.push_str(md);
    std::fs::write(out_dir.join(format!("{file}.md")), &text)?;
    let doc = json!({"load_average_before": load_before, "load_average_after": load_after,
        "targets": r.targets, "not_measured_or_errors": missing, "results": out.json});
    std::fs::write(
        out_dir.join(format!("{file}.json")),
        serde_json::to_string_pretty(&doc)?,
    )?;
    println!("{text}");
    eprintln!("wrote {}", out_dir.join(format!("{file}.md")).display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let quick = flag("--quick");
    if flag("--memory") {
        tests::interrupt::install_signal_cleanup();
        let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
        std::fs::create_dir_all(&out_dir)?;
        return memory_only(&out_dir);
    }
    let mut o = Opts::new(quick);
    o.modes = args
        .iter()
        .find_map(|a| a.strip_prefix("--modes="))
        .map(|m| m.split(',').map(str::to_owned).collect());
    if flag("--p2p") || flag("--nodeport") {
        tests::interrupt::install_signal_cleanup();
        let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
        std::fs::create_dir_all(&out_dir)?;
        let started = Instant::now();
        let load_before = loadavg();
        let mut r = Report::default();
        let (mut md, mut sections, mut errors) =
            (String::new(), serde_json::Map::new(), Vec::new());
        let mut out = Sections {
            r: &mut r,
            md: &mut md,
            json: &mut sections,
            errors: &mut errors,
        };
        let (file, title) = if flag("--p2p") {
            drop(pod_to_pod(
                &o,
                started,
                &out_dir.join("p2p_latency.svg"),
                &mut out,
            ));
            (
                "p2p",
                "Pod to pod and node to node (`cargo xtask bench --p2p`)",
            )
        } else {
            nodeport(&o, &mut out);
            ("nodeport", "NodePort (`cargo xtask bench --nodeport`)")
        };
        return write_partial(
            &out_dir,
            file,
            &format!("{title}{}", if quick { ", quick" } else { "" }),
            started,
            &load_before,
            out,
        );
    }
    tests::interrupt::install_signal_cleanup();
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = root.join("bench/results");
    std::fs::create_dir_all(&out_dir)?;
    let mut r = Report::default();
    let load_before = loadavg();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let machine = json!({
        "kernel": sh_out("uname -r"),
        "cpus": cpus,
        "cpu_model": sh_out("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "load_average_before": load_before,
        "iptables": sh_out("iptables --version"),
        "iperf3": sh_out("iperf3 --version | head -1"),
        "agent_binary": tests::topo::agent_bin().display().to_string(),
        "mode": if quick { "quick" } else { "full" },
        "date_utc": sh_out("date -u +%Y-%m-%dT%H:%M:%SZ"),
    });
    eprintln!(
        "bench ({}): kernel {}, {cpus} CPUs, load {load_before}",
        if quick { "quick" } else { "full" },
        machine["kernel"]
    );
    let mut sections = serde_json::Map::new();
    let mut md = String::new();
    let mut errors: Vec<String> = Vec::new();

    // ---- BPF per-program cost (no cluster needed)
    eprintln!("[bpf] per-program cost via BPF_PROG_TEST_RUN");
    let bpf = match bpf_costs(&o) {
        Ok(c) => c,
        Err(e) => {
            r.missing.push(format!("BPF per-program cost: {e:#}"));
            Vec::new()
        }
    };

    // ---- pod to pod (and node to node)
    let mut modes = pod_to_pod(
        &o,
        started,
        &out_dir.join("pod_latency.svg"),
        &mut Sections {
            r: &mut r,
            md: &mut md,
            json: &mut sections,
            errors: &mut errors,
        },
    );

    // ---- ClusterIP
    let mut host = None;
    let mut tc = None;
    for m in modes.drain(..) {
        match m.name {
            "host routing" => host = Some(m),
            "ours, TC decap" => tc = Some(m),
            _ => drop(m),
        }
    }
    let mut cip_levels = Vec::new();
    if let (Some(host), Some(tc)) = (&host, &tc) {
        eprintln!(
            "[clusterip] levels {:?} at {:.1} s",
            o.svc_levels,
            started.elapsed().as_secs_f64()
        );
        let mut log = Vec::new();
        match clusterip(host, tc, &o, &mut log) {
            Ok(l) => cip_levels = l,
            Err(e) => r.missing.push(format!("ClusterIP benchmark failed: {e:#}")),
        }
        let mut j = serde_json::Map::new();
        let _ = writeln!(md, "## ClusterIP: kube-proxy iptables vs this dataplane\n");
        let _ = writeln!(
            md,
            "kube-proxy's nat table (KUBE-SERVICES -> KUBE-SVC-* with `statistic --mode random` -> KUBE-SEP-* DNAT, KUBE-MARK-MASQ, KUBE-POSTROUTING), \
             loaded with `iptables-restore` ({}) in the client's node namespace of the host-routing cluster (no agent there), \
             against this dataplane (TC decap cluster) with the same services applied through etcd. Each service: TCP 80 -> 8080, 3 endpoints; \
             the measured one is the last added, its endpoints are 3 server pods on the other node. CRR = connect + 1 byte each way + close, \
             {} ms per run, {} run(s) per level interleaved; cells are median (min–max).\n",
            machine["iptables"].as_str().unwrap_or(""),
            o.crr.as_millis(),
            o.svc_reps
        );
        let _ = writeln!(
            md,
            "| services | iptables CRR/s | ours CRR/s | ours / iptables | iptables connect p50 / p99 µs | ours connect p50 / p99 µs | iptables CRR p50 / p99 µs | ours CRR p50 / p99 µs |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        let mut lv = Vec::new();
        for l in &cip_levels {
            let s = |v: &[RrResult], f: fn(&RrResult) -> f64| {
                Summary::of(&v.iter().map(f).collect::<Vec<_>>())
            };
            let (ir, or) = (s(&l.ipt_crr, |r| r.rate), s(&l.ours_crr, |r| r.rate));
            let (icp50, icp99) = (
                s(&l.ipt_crr, |r| r.connect_p50_us),
                s(&l.ipt_crr, |r| r.connect_p99_us),
            );
            let (ocp50, ocp99) = (
                s(&l.ours_crr, |r| r.connect_p50_us),
                s(&l.ours_crr, |r| r.connect_p99_us),
            );
            let (ip50, ip99) = (s(&l.ipt_crr, |r| r.p50_us), s(&l.ipt_crr, |r| r.p99_us));
            let (op50, op99) = (s(&l.ours_crr, |r| r.p50_us), s(&l.ours_crr, |r| r.p99_us));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {}x | {} / {} | {} / {} | {} / {} | {} / {} |",
                thousands(l.n as f64),
                ir.fmt(thousands),
                or.fmt(thousands),
                f2(or.median / ir.median),
                f1(icp50.median),
                f1(icp99.median),
                f1(ocp50.median),
                f1(ocp99.median),
                f1(ip50.median),
                f1(ip99.median),
                f1(op50.median),
                f1(op99.median)
            );
            lv.push(json!({
                "services": l.n,
                "iptables": {"crr_rate": ir.json("connections/s"), "connect_p50": icp50.json("µs"), "connect_p99": icp99.json("µs"), "crr_p50": ip50.json("µs"), "crr_p99": ip99.json("µs"),
                    "errors": l.ipt_crr.iter().map(|r| r.errors).sum::<u64>(),
                    "full_restore_s": num(l.ipt_restore_full_s), "add_one_service_s": Summary::of(&l.ipt_add_s).json("s")},
                "ours": {"crr_rate": or.json("connections/s"), "connect_p50": ocp50.json("µs"), "connect_p99": ocp99.json("µs"), "crr_p50": op50.json("µs"), "crr_p99": op99.json("µs"),
                    "errors": l.ours_crr.iter().map(|r| r.errors).sum::<u64>(),
                    "load_new_services_via_etcd_until_live_s": num(l.ours_load_s),
                    "add_one_service_until_live_on_every_node_s": Summary::of(&l.ours_add_s).json("s"),
                    "add_one_service_cli_exit_s": Summary::of(&l.ours_add_cli_s).json("s")},
                "ratio_ours_over_iptables_crr": num(or.median / ir.median),
            }));
        }
        let _ = writeln!(
            md,
            "\nTime to add one more service ({} time(s) per level; median (min–max)):\n",
            o.add_reps
        );
        let _ = writeln!(
            md,
            "| services | iptables-restore of the full nat table | `dataplane apply` until the entry is in svc_v1 on every node | (`dataplane apply` process exit) | iptables / ours |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for l in &cip_levels {
            let (i, ou, cli) = (
                Summary::of(&l.ipt_add_s),
                Summary::of(&l.ours_add_s),
                Summary::of(&l.ours_add_cli_s),
            );
            let _ = writeln!(
                md,
                "| {} | {} ms | {} ms | {} ms | {}x |",
                thousands(l.n as f64),
                i.fmt(|x| f1(x * 1e3)),
                ou.fmt(|x| f2(x * 1e3)),
                cli.fmt(|x| f1(x * 1e3)),
                f1(i.median / ou.median)
            );
        }
        let _ = writeln!(
            md,
            "\nLoading each level from scratch: {}\n",
            log.join("; ")
        );
        j.insert("levels".into(), json!(lv));
        sections.insert("clusterip".into(), Value::Object(j));
        if let (Some(first), Some(last)) = (cip_levels.first(), cip_levels.last()) {
            let rate =
                |v: &[RrResult]| Summary::of(&v.iter().map(|r| r.rate).collect::<Vec<_>>()).median;
            let r10k_over_1 = rate(&last.ours_crr) / rate(&first.ours_crr);
            r.target(
                &format!(
                    "ours CRR at {} services within 5% of 1 service",
                    thousands(last.n as f64)
                ),
                r10k_over_1,
                0.95,
                "x of 1-service rate",
                true,
                &format!(
                    "{} vs {} conn/s",
                    thousands(rate(&last.ours_crr)),
                    thousands(rate(&first.ours_crr))
                ),
            );
            r.target(
                &format!(
                    "ours / iptables CRR at {} services",
                    thousands(last.n as f64)
                ),
                rate(&last.ours_crr) / rate(&last.ipt_crr),
                5.0,
                "x",
                true,
                &format!(
                    "{} vs {} conn/s",
                    thousands(rate(&last.ours_crr)),
                    thousands(rate(&last.ipt_crr))
                ),
            );
            let add = Summary::of(&last.ipt_add_s).median / Summary::of(&last.ours_add_s).median;
            r.target(
                &format!(
                    "adding one service among {}: iptables-restore / ours",
                    thousands(last.n as f64)
                ),
                add,
                1000.0,
                "x",
                true,
                &format!(
                    "{:.1} ms vs {:.2} ms",
                    Summary::of(&last.ipt_add_s).median * 1e3,
                    Summary::of(&last.ours_add_s).median * 1e3
                ),
            );
            let xs: Vec<String> = cip_levels.iter().map(|l| thousands(l.n as f64)).collect();
            let med = |l: &LevelResult, ours: bool, f: fn(&RrResult) -> f64| {
                Summary::of(
                    &(if ours { &l.ours_crr } else { &l.ipt_crr })
                        .iter()
                        .map(f)
                        .collect::<Vec<_>>(),
                )
                .median
            };
            let series = vec![
                (
                    "iptables p50".to_string(),
                    false,
                    cip_levels
                        .iter()
                        .map(|l| med(l, false, |r| r.connect_p50_us))
                        .collect(),
                ),
                (
                    "iptables p99".to_string(),
                    true,
                    cip_levels
                        .iter()
                        .map(|l| med(l, false, |r| r.connect_p99_us))
                        .collect(),
                ),
                (
                    "ours p50".to_string(),
                    false,
                    cip_levels
                        .iter()
                        .map(|l| med(l, true, |r| r.connect_p50_us))
                        .collect(),
                ),
                (
                    "ours p99".to_string(),
                    true,
                    cip_levels
                        .iter()
                        .map(|l| med(l, true, |r| r.connect_p99_us))
                        .collect(),
                ),
            ];
            std::fs::write(
                out_dir.join("clusterip_connect_latency.svg"),
                svg::lines(
                    "ClusterIP connect latency vs number of services",
                    "connect() latency (µs)",
                    "services",
                    &xs,
                    &series,
                ),
            )?;
        }
    } else {
        r.missing.push(
            "ClusterIP benchmark: needs the host-routing and TC clusters, one failed to start"
                .into(),
        );
    }
    drop(host);

    // ---- control plane and RSS on the TC cluster (10,000+ services loaded)
    if let Some(tc) = &tc {
        eprintln!(
            "[control plane] {} events per kind at {:.1} s",
            o.cp_events,
            started.elapsed().as_secs_f64()
        );
        let _ = writeln!(md, "## Control plane\n");
        let mut j = serde_json::Map::new();
        match control_plane(tc, &o) {
            Ok(res) => {
                let _ = writeln!(
                    md,
                    "Time from the etcd write (issued from the bench process) until the entry is in the pinned map of **both** nodes \
                     (polled every 100 µs from the bench process), with the agents holding {} services. {} events per kind.\n",
                    thousands(cip_levels.last().map_or(0.0, |l| l.n as f64)),
                    o.cp_events
                );
                let _ = writeln!(
                    md,
                    "| event | p50 ms | p99 ms | max ms | events | timeouts (5 s) |"
                );
                let _ = writeln!(md, "|---|---|---|---|---|---|");
                let mut all = Vec::new();
                let mut js = Vec::new();
                for c in &res {
                    let mut v: Vec<u32> = c.lat_ms.iter().map(|x| (x * 1000.0) as u32).collect();
                    v.sort_unstable();
                    let p = |q| tests::bench::stats::percentile_sorted(&v, q) / 1000.0;
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} |",
                        c.kind,
                        f2(p(50.0)),
                        f2(p(99.0)),
                        f2(p(100.0)),
                        c.lat_ms.len(),
                        c.timeouts
                    );
                    js.push(json!({"event": c.kind, "p50_ms": num(p(50.0)), "p99_ms": num(p(99.0)), "max_ms": num(p(100.0)), "events": c.lat_ms.len(), "timeouts": c.timeouts}));
                    all.extend(v);
                }
                all.sort_unstable();
                let p99 = tests::bench::stats::percentile_sorted(&all, 99.0) / 1000.0;
                let timeouts: usize = res.iter().map(|c| c.timeouts).sum();
                let p99 = if timeouts > 0 { f64::INFINITY } else { p99 };
                let _ = writeln!(
                    md,
                    "| all | {} | {} | | {} | {timeouts} |\n",
                    f2(tests::bench::stats::percentile_sorted(&all, 50.0) / 1000.0),
                    f2(p99),
                    all.len()
                );
                j.insert("etcd_to_map_every_node".into(), json!(js));
                r.target(
                    "etcd change -> map on every node, p99",
                    p99,
                    50.0,
                    "ms",
                    false,
                    &format!("{} events of 3 kinds", all.len()),
                );
            }
            Err(e) => r.missing.push(format!("control plane latency: {e:#}")),
        }
        sections.insert("control_plane".into(), Value::Object(j));
    } else {
        r.missing
            .push("control plane latency: the TC cluster did not start".into());
    }
    drop(tc);

    // ---- agent memory, on a cluster of its own (agents started with the
    // services already in etcd)
    eprintln!("[memory] at {:.1} s", started.elapsed().as_secs_f64());
    match agent_memory() {
        Ok(res) => {
            let j = memory_section(&res, &mut md, &mut r);
            sections.insert("agent_memory".into(), j);
        }
        Err(e) => r.missing.push(format!("agent memory: {e:#}")),
    }

    // ---- NodePort from outside, on clusters of its own
    eprintln!("[nodeport] at {:.1} s", started.elapsed().as_secs_f64());
    nodeport(
        &o,
        &mut Sections {
            r: &mut r,
            md: &mut md,
            json: &mut sections,
            errors: &mut errors,
        },
    );

    // ---- BPF costs table
    {
        let _ = writeln!(
            md,
            "## Per-packet cost of each BPF program (BPF_PROG_TEST_RUN)\n"
        );
        let _ = writeln!(
            md,
            "Object loaded with `Dataplane::load_with(None)` in a private network namespace (node config, one peer, one ClusterIP with 3 remote backends); duration as the kernel reports it (total / repeat). TC test runs reuse one skb across repetitions, so paths that rewrite the packet are timed one run per syscall on a fresh frame, minus the per-run overhead measured on the pass-through row (its repeat-1 minus repeat-N time); those figures carry the noise of that subtraction.\n"
        );
        let _ = writeln!(md, "| path | program | ns/packet | verdict | how |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        let mut js = Vec::new();
        for c in &bpf {
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {} |",
                c.name,
                c.program,
                f1(c.ns_per_packet),
                verdict_name(c.program, c.verdict),
                c.how
            );
            js.push(json!({"path": c.name, "program": c.program, "ns_per_packet": num(c.ns_per_packet), "unit": "ns/packet", "verdict": c.verdict, "how": c.how}));
        }
        let _ = writeln!(md);
        sections.insert("bpf_prog_cost".into(), json!(js));
    }

    // ---- write
    let load_after = loadavg();
    let elapsed = started.elapsed().as_secs_f64();
    for e in &errors {
        r.missing.push(format!("run error: {e}"));
    }
    let mut head = String::new();
    let _ = writeln!(
        head,
        "# Benchmark results ({})\n",
        if quick {
            "`cargo xtask bench --quick`"
        } else {
            "`cargo xtask bench`"
        }
    );
    let _ = writeln!(
        head,
        "Machine: kernel {}, {} CPUs ({}), {}; load average before {load_before}, after {load_after}; run took {elapsed:.0} s; {}.\n",
        machine["kernel"].as_str().unwrap_or(""),
        cpus,
        machine["cpu_model"].as_str().unwrap_or("").trim(),
        machine["iptables"].as_str().unwrap_or(""),
        machine["date_utc"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        head,
        "Charts: [connect latency vs services](clusterip_connect_latency.svg), [pod-to-pod latency per mode](pod_latency.svg).\n"
    );
    let _ = writeln!(head, "## Targets (reported, not asserted)\n");
    let _ = writeln!(head, "| target | measured | goal | result | detail |");
    let _ = writeln!(head, "|---|---|---|---|---|");
    for t in &r.target_md {
        let _ = writeln!(head, "{t}");
    }
    let _ = writeln!(head);
    if !r.missing.is_empty() {
        let _ = writeln!(head, "## Not measured / errors\n");
        for m in &r.missing {
            let _ = writeln!(head, "- {}", m.replace('\n', " "));
        }
        let _ = writeln!(head);
    }
    let _ = writeln!(md, "## Notes and limits\n");
    let _ = writeln!(
        md,
        "- Every mode runs on the same machine with the same 2 vCPUs; other work on the machine (see the load averages) adds noise, \
           which the interleaving spreads over all modes alike.\n\
         - The iptables side is kube-proxy's nat table only (no filter-table KUBE-FORWARD/KUBE-EXTERNAL-SERVICES rules, no NodePorts), \
           in the client's node; its \"add one service\" time is a full `iptables-restore` of that table, as kube-proxy's full sync does. \
           kube-proxy's partial syncs (`--noflush` with only the changed chains) and iptables-legacy are not measured.\n\
         - Our \"add one service\" time starts before `dataplane apply -f` is spawned and ends when the frontend (with its 3 backends) is \
           in svc_v1 on both nodes, polled every 100 µs from the benchmark process; it includes the CLI's start and etcd round trips.\n\
         - Control-plane events are written with the etcd client from the benchmark process; the clock starts before the write.\n\
         - The ClusterIP comparison uses our TC-decap cluster (what `auto` picks on veth).\n\
         - BPF costs: TC and XDP programs run through BPF_PROG_TEST_RUN on a synthetic frame; figures exclude the rest of the stack."
    );
    let text = format!("{head}{md}");
    let mut mj = machine.as_object().cloned().unwrap_or_default();
    mj.insert("load_average_after".into(), json!(load_after));
    mj.insert("elapsed_s".into(), num(elapsed));
    let doc = json!({"machine": mj, "targets": r.targets, "not_measured_or_errors": r.missing, "results": sections});
    std::fs::write(out_dir.join("latest.md"), &text)?;
    std::fs::write(
        out_dir.join("latest.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    println!("{text}");
    eprintln!(
        "wrote {} and latest.json, charts; {elapsed:.0} s",
        out_dir.join("latest.md").display()
    );
    Ok(())
}
