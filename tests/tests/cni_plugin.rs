//! The `dataplane-cni` plugin end to end, run exactly as a container
//! runtime runs it: `CNI_*` variables, the netconf on stdin, `CNI_PATH`
//! holding the plugin's directory and /usr/lib/cni (host-local), the
//! result on stdout. The plugin runs in a "node" namespace the test
//! creates; pods are further namespaces. The agent's side of the socket is
//! `dataplane::cni::server` with a small in-test registry that records
//! what it was asked (the real agent takes its place in phase 2).
//!
//! Needs the plugin binary next to the agent's (`DATAPLANE_BIN`, else
//! target/debug): `cargo build -p dataplane --bins`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use dataplane::cni::{
    device::host_ifname,
    proto::{Attachment, AttachmentKey, Endpoint, ErrorCode, ProtoError, Status},
    server::{AgentSocket, EndpointRegistry},
};
use serde_json::{Value, json};
use tests::{
    netns::{NetNs, in_netns, require_root, unique_id},
    topo::{agent_bin, invoke_cni},
};

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

/// The plugin binary, next to the agent's.
fn plugin_bin() -> PathBuf {
    let p = agent_bin().with_file_name("dataplane-cni");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build -p dataplane --bins`",
        p.display()
    );
    assert!(
        Path::new(HOST_LOCAL).is_file(),
        "{HOST_LOCAL} is missing: run `cargo xtask setup` (containernetworking-plugins)"
    );
    p
}

/// What the agent would hold, plus a log of the calls it got.
#[derive(Default)]
struct Registry {
    endpoints: Mutex<BTreeMap<AttachmentKey, Endpoint>>,
    calls: Mutex<Vec<String>>,
    /// When set, `add` is refused with it (and `status` reports not ready).
    refuse: Mutex<Option<String>>,
}

impl Registry {
    fn endpoint(&self, id: &str, ifname: &str) -> Option<Endpoint> {
        self.endpoints
            .lock()
            .unwrap()
            .get(&AttachmentKey {
                container_id: id.into(),
                ifname: ifname.into(),
            })
            .cloned()
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl EndpointRegistry for Registry {
    async fn add(&self, e: Endpoint) -> Result<(), ProtoError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("add {}/{}", e.container_id, e.ifname));
        if let Some(why) = self.refuse.lock().unwrap().clone() {
            return Err(ProtoError::new(ErrorCode::NotReady, why));
        }
        let mut eps = self.endpoints.lock().unwrap();
        eps.retain(|_, o| o.ip != e.ip);
        eps.insert(e.key(), e);
        Ok(())
    }

    async fn del(&self, k: AttachmentKey) -> Result<(), ProtoError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("del {}/{}", k.container_id, k.ifname));
        self.endpoints.lock().unwrap().remove(&k);
        Ok(())
    }

    async fn check(&self, k: AttachmentKey) -> Result<Endpoint, ProtoError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("check {}/{}", k.container_id, k.ifname));
        self.endpoints
            .lock()
            .unwrap()
            .get(&k)
            .cloned()
            .ok_or_else(|| ProtoError::new(ErrorCode::NotFound, "no such attachment"))
    }

    async fn list(&self) -> Result<Vec<Attachment>, ProtoError> {
        self.calls.lock().unwrap().push("list".into());
        Ok(self
            .endpoints
            .lock()
            .unwrap()
            .values()
            .map(|e| Attachment {
                container_id: e.container_id.clone(),
                ifname: e.ifname.clone(),
                ip: e.ip,
            })
            .collect())
    }

    async fn status(&self) -> Status {
        self.calls.lock().unwrap().push("status".into());
        let refuse = self.refuse.lock().unwrap().clone();
        Status {
            ready: refuse.is_none(),
            reason: refuse,
        }
    }
}

/// A directory removed on drop (host-local's dataDir and the socket).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A plugin invocation's outcome.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Success with a result on stdout.
    fn result(&self) -> Value {
        assert!(
            self.ok,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self.json()
    }

    /// Success without output (DEL, CHECK, GC, STATUS).
    fn quiet_ok(&self) {
        assert!(
            self.ok,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(self.stdout.trim(), "", "unexpected output");
    }

    /// Failure with a spec error object of `code`; returns its msg.
    fn error(&self, code: u64) -> String {
        assert!(!self.ok, "expected an error, got success: {}", self.stdout);
        let v = self.json();
        for key in ["cniVersion", "code", "msg", "details"] {
            assert!(v.get(key).is_some(), "error JSON lacks {key}: {v}");
        }
        assert_eq!(v["code"], code, "{v}\nstderr: {}", self.stderr);
        v["msg"].as_str().unwrap().to_string()
    }
}

/// A node: its namespace (where the plugin runs, as a runtime would run
/// it), a registry server on its own socket, host-local's data.
struct Node {
    id: String,
    name: String,
    host: NetNs,
    dir: TempDir,
    socket: PathBuf,
    registry: Arc<Registry>,
    rt: tokio::runtime::Runtime,
    server: Option<tokio::task::JoinHandle<()>>,
    plugin: PathBuf,
    /// The `ipam` section of the netconf.
    ipam: Value,
    pod_device: &'static str,
}

impl Node {
    fn new(subnet: &str, pod_device: &'static str) -> Self {
        Self::with_range(json!([[{ "subnet": subnet }]]), pod_device)
    }

    fn with_range(ranges: Value, pod_device: &'static str) -> Self {
        let plugin = plugin_bin();
        let id = unique_id();
        let host = NetNs::new(&format!("dpcni-{id}")).unwrap();
        host.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
        let dir = TempDir(std::env::temp_dir().join(format!("dp-cni-test-{id}")));
        std::fs::create_dir_all(&dir.0).unwrap();
        let socket = dir.0.join("agent.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let registry = Arc::new(Registry::default());
        let sock = rt.block_on(AgentSocket::bind(&socket)).unwrap();
        let server = Some(rt.spawn(sock.serve(Arc::clone(&registry))));
        let ipam = json!({
            "type": "host-local",
            "ranges": ranges,
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": dir.0.join("ipam"),
        });
        Self {
            name: format!("dptest-{id}"),
            id,
            host,
            dir,
            socket,
            registry,
            rt,
            server,
            plugin,
            ipam,
            pod_device,
        }
    }

    /// The netconf as the agent would write it.
    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "dataplane-cni",
            "agentSocket": self.socket,
            "mtu": 1400,
            "podDevice": self.pod_device,
            "ipam": self.ipam,
            "dns": { "nameservers": ["10.96.0.10"] },
        })
    }

    fn pod(&self, n: usize) -> NetNs {
        NetNs::new(&format!("dpcni-{}-p{n}", self.id)).unwrap()
    }

    /// Runs the plugin in the node namespace.
    fn run(&self, command: &str, vars: &[(&str, &str)], stdin: &[u8]) -> Run {
        let mut all = vec![("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=test")];
        all.extend_from_slice(vars);
        let r =
            invoke_cni(&self.host, &self.plugin, command, &all, stdin).expect("running the plugin");
        Run {
            ok: r.ok,
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }

    fn attach(&self, command: &str, id: &str, pod: Option<&NetNs>, conf: &Value) -> Run {
        let netns = pod.map(|p| p.path()).unwrap_or_default();
        let mut vars = vec![("CNI_CONTAINERID", id), ("CNI_IFNAME", "eth0")];
        if pod.is_some() {
            vars.push(("CNI_NETNS", &netns));
        }
        self.run(command, &vars, &serde_json::to_vec(conf).unwrap())
    }

    fn add(&self, id: &str, pod: &NetNs) -> Value {
        self.attach("ADD", id, Some(pod), &self.conf()).result()
    }

    fn with_prev(&self, prev: &Value) -> Value {
        let mut c = self.conf();
        c["prevResult"] = prev.clone();
        c
    }

    fn check(&self, id: &str, pod: &NetNs, prev: &Value) -> Run {
        self.attach("CHECK", id, Some(pod), &self.with_prev(prev))
    }

    fn del(&self, id: &str, pod: Option<&NetNs>, prev: Option<&Value>) -> Run {
        let conf = prev.map_or_else(|| self.conf(), |p| self.with_prev(p));
        self.attach("DEL", id, pod, &conf)
    }

    /// host-local's allocations: IP -> container ID.
    fn allocations(&self) -> BTreeMap<Ipv4Addr, String> {
        let dir = self.dir.0.join("ipam").join(&self.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return BTreeMap::new();
        };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let ip: Ipv4Addr = e.file_name().to_str()?.parse().ok()?;
                let owner = std::fs::read_to_string(e.path()).ok()?;
                Some((ip, owner.lines().next().unwrap_or_default().to_string()))
            })
            .collect()
    }

    /// Links of the node namespace other than lo.
    fn host_links(&self) -> Vec<String> {
        links(&self.host)
    }

    fn stop_agent(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = self.rt.block_on(server);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
    }
}

fn ip_json(ns: &NetNs, args: &str) -> Value {
    let out = ns.sh(&format!("ip -j {args}")).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j {args}: {e}: {out}"))
}

fn links(ns: &NetNs) -> Vec<String> {
    ip_json(ns, "link show")
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// The pod's address from an ADD result.
fn pod_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"].as_str().unwrap();
    addr.strip_suffix("/32")
        .unwrap_or_else(|| panic!("not a /32: {addr}"))
        .parse()
        .unwrap()
}

/// Everything ADD promises, checked from outside with `ip`.
fn assert_attached(node: &Node, id: &str, pod: &NetNs, result: &Value, kind: &str, gw: &str) {
    let host_name = host_ifname(id, "eth0");
    let ip = pod_ip(result);

    // The result, per the spec.
    assert_eq!(result["cniVersion"], "1.1.0");
    let ifs = result["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2, "{result}");
    assert_eq!(ifs[0]["name"], host_name.as_str());
    assert!(ifs[0].get("sandbox").is_none(), "{result}");
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], pod.path().as_str());
    assert_eq!(ifs[1]["mtu"], 1400);
    assert_eq!(result["ips"][0]["gateway"], gw);
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{ "dst": format!("{gw}/32"), "scope": 253 }, { "dst": "0.0.0.0/0", "gw": gw }])
    );
    assert_eq!(result["dns"]["nameservers"], json!(["10.96.0.10"]));

    // The pod end.
    let link = &ip_json(pod, "-d link show dev eth0")[0];
    assert_eq!(link["linkinfo"]["info_kind"], kind, "{link}");
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], ifs[1]["mac"]);
    assert!(
        link["flags"].as_array().unwrap().contains(&json!("UP")),
        "{link}"
    );
    let addrs: Vec<(String, u64)> = ip_json(pod, "-4 addr show dev eth0")[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(addrs, vec![(ip.to_string(), 32)]);
    let routes = ip_json(pod, "-4 route show");
    let routes = routes.as_array().unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == gw && r["dev"] == "eth0"),
        "no default route via {gw}: {routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == gw && r["dev"] == "eth0" && r["scope"] == "link"),
        "no link route to {gw}: {routes:?}"
    );
    let neigh = ip_json(pod, "-4 neigh show dev eth0");
    assert_eq!(neigh[0]["dst"], gw, "{neigh}");
    assert_eq!(neigh[0]["lladdr"], ifs[0]["mac"], "{neigh}");
    assert_eq!(neigh[0]["state"], json!(["PERMANENT"]), "{neigh}");

    // The host end.
    let link = &ip_json(&node.host, &format!("-d link show dev {host_name}"))[0];
    assert_eq!(link["linkinfo"]["info_kind"], kind, "{link}");
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], ifs[0]["mac"]);
    let routes = ip_json(&node.host, &format!("-4 route show {ip}/32"));
    assert_eq!(routes[0]["dev"], host_name.as_str(), "{routes}");
    assert_eq!(routes[0]["scope"], "link", "{routes}");
    let neigh = ip_json(&node.host, &format!("-4 neigh show dev {host_name}"));
    assert_eq!(neigh[0]["dst"], ip.to_string(), "{neigh}");
    assert_eq!(neigh[0]["lladdr"], ifs[1]["mac"], "{neigh}");
    assert_eq!(neigh[0]["state"], json!(["PERMANENT"]), "{neigh}");

    // The agent got the endpoint, and host-local the allocation.
    let ep = node.registry.endpoint(id, "eth0").expect("registered");
    assert_eq!(ep.ip, ip);
    assert_eq!(ep.mac.to_string(), ifs[1]["mac"].as_str().unwrap());
    assert_eq!(ep.host_mac.to_string(), ifs[0]["mac"].as_str().unwrap());
    assert_eq!(ep.host_ifname, host_name);
    assert_eq!(
        Some(ep.host_ifindex),
        link["ifindex"].as_u64().map(|i| i as u32)
    );
    assert_eq!(ep.netns, pod.path());
    assert_eq!(ep.device.to_string(), kind);
    assert_eq!(node.allocations().get(&ip).map(String::as_str), Some(id));
}

fn add_check_del(kind: &'static str) {
    let node = Node::new("10.250.0.0/24", kind);
    let pod = node.pod(1);
    let id = format!("c-{kind}-{}", node.id);
    let result = node.add(&id, &pod);
    assert_attached(&node, &id, &pod, &result, kind, "10.250.0.1");
    node.check(&id, &pod, &result).quiet_ok();

    node.del(&id, Some(&pod), Some(&result)).quiet_ok();
    assert_eq!(links(&pod), Vec::<String>::new(), "pod end left behind");
    assert_eq!(
        node.host_links(),
        Vec::<String>::new(),
        "host end left behind"
    );
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert_eq!(node.registry.endpoint(&id, "eth0"), None);
    // DEL again, and without a netns or prevResult, still succeeds.
    node.del(&id, Some(&pod), Some(&result)).quiet_ok();
    node.del(&id, None, None).quiet_ok();
    // DEL of a container that was never added succeeds too, even with a
    // prevResult that is not one (DEL does not need it).
    node.del(
        "never-added",
        None,
        Some(&json!({ "ips": [{ "address": "nope" }] })),
    )
    .quiet_ok();
    assert_eq!(
        node.registry.calls(),
        vec![
            format!("add {id}/eth0"),
            format!("check {id}/eth0"),
            format!("del {id}/eth0"),
            format!("del {id}/eth0"),
            format!("del {id}/eth0"),
            "del never-added/eth0".to_string(),
        ]
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn veth_pod_add_check_del() {
    require_root();
    add_check_del("veth");
}

/// Whether this kernel makes netkit pairs (probed in a scratch namespace
/// with the plugin's own request).
fn netkit_supported() -> bool {
    let ns = NetNs::new(&format!("dpcni-{}-probe", unique_id())).unwrap();
    in_netns(&ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let nl = dataplane::cni::netns::current_handle().unwrap();
                dataplane::cni::device::netkit_available(&nl).await.unwrap()
            })
    })
    .join()
    .unwrap()
}

/// netkit pods where the kernel has netkit; elsewhere (CONFIG_NETKIT not
/// set, as on some VM kernels) ADD must refuse with a clear error and
/// leave nothing behind.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn netkit_pod_add_check_del() {
    require_root();
    if netkit_supported() {
        add_check_del("netkit");
        return;
    }
    eprintln!("NOTE: this kernel cannot make netkit devices; testing that ADD refuses cleanly");
    let node = Node::new("10.250.8.0/24", "netkit");
    let pod = node.pod(1);
    let msg = node
        .attach("ADD", "c1", Some(&pod), &node.conf())
        .error(999);
    assert!(
        msg.contains("netkit") && msg.contains("CONFIG_NETKIT"),
        "{msg}"
    );
    assert_eq!(links(&pod), Vec::<String>::new());
    assert_eq!(node.host_links(), Vec::<String>::new());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(
        node.registry.calls().is_empty(),
        "{:?}",
        node.registry.calls()
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn version_and_status() {
    require_root();
    let node = Node::new("10.250.1.0/24", "veth");
    let run = node.run("VERSION", &[], br#"{"cniVersion": "1.0.0"}"#);
    assert_eq!(
        run.result(),
        json!({ "cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"] })
    );
    let conf = serde_json::to_vec(&node.conf()).unwrap();
    node.run("STATUS", &[], &conf).quiet_ok();
    *node.registry.refuse.lock().unwrap() = Some("no subnet lease yet".into());
    let msg = node.run("STATUS", &[], &conf).error(50);
    assert!(msg.contains("no subnet lease yet"), "{msg}");
    let mut node = node;
    node.stop_agent();
    let msg = node.run("STATUS", &[], &conf).error(50);
    assert!(msg.contains(node.socket.to_str().unwrap()), "{msg}");
}

/// Two pods, a veth and a netkit one, reach each other through the node's
/// routes and permanent neighbour entries: no ARP anywhere.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn pods_reach_each_other_through_the_host() {
    require_root();
    let veth = Node::new("10.250.2.0/24", "veth");
    let (a, b) = (veth.pod(1), veth.pod(2));
    let ra = veth.add("pod-a", &a);
    // Same node and network, the other device kind where the kernel has
    // it: a second netconf.
    let mut conf_b = veth.conf();
    if netkit_supported() {
        conf_b["podDevice"] = json!("netkit");
    } else {
        eprintln!("NOTE: this kernel cannot make netkit devices; both pods are veth");
    }
    let rb = veth.attach("ADD", "pod-b", Some(&b), &conf_b).result();
    let (ia, ib) = (pod_ip(&ra), pod_ip(&rb));
    assert_ne!(ia, ib);
    a.sh(&format!("ping -c 2 -W 2 {ib}")).unwrap();
    b.sh(&format!("ping -c 2 -W 2 {ia}")).unwrap();
    for ns in [&a, &b, &veth.host] {
        let arp = ip_json(ns, "-4 neigh show");
        for n in arp.as_array().unwrap() {
            assert_eq!(n["state"], json!(["PERMANENT"]), "a learned neighbour: {n}");
        }
    }
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn check_fails_when_the_address_is_gone() {
    require_root();
    let node = Node::new("10.250.3.0/24", "veth");
    let pod = node.pod(1);
    let result = node.add("c1", &pod);
    node.check("c1", &pod, &result).quiet_ok();
    let ip = pod_ip(&result);
    pod.sh(&format!("ip addr del {ip}/32 dev eth0")).unwrap();
    let msg = node.check("c1", &pod, &result).error(100);
    assert!(
        msg.contains(&format!("address {ip}/32 is missing on eth0")),
        "{msg}"
    );
    // The default route went with the address: reported too.
    let details = node.check("c1", &pod, &result).json()["details"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        details.contains("route 0.0.0.0/0 via 10.250.3.1 is missing"),
        "{details}"
    );
    // And an attachment the agent does not know fails CHECK as well.
    let other = node.pod(2);
    let r2 = node.add("c2", &other);
    node.registry.endpoints.lock().unwrap().clear();
    let msg = node.check("c2", &other, &r2).error(100);
    assert!(
        msg.contains("agent check") && msg.contains("no such attachment"),
        "{msg}"
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn unreachable_or_refusing_agent_fails_add_and_leaves_nothing() {
    require_root();
    let mut node = Node::new("10.250.4.0/24", "veth");
    let pod = node.pod(1);

    *node.registry.refuse.lock().unwrap() = Some("maps not loaded".into());
    let run = node.attach("ADD", "c1", Some(&pod), &node.conf());
    let msg = run.error(11);
    assert!(msg.contains("maps not loaded"), "{msg}");
    assert_eq!(node.registry.calls(), vec!["add c1/eth0", "del c1/eth0"]);

    node.stop_agent();
    let msg = node.attach("ADD", "c1", Some(&pod), &node.conf()).error(11);
    assert!(msg.contains(node.socket.to_str().unwrap()), "{msg}");
    for _ in 0..2 {
        assert_eq!(links(&pod), Vec::<String>::new());
        assert_eq!(node.host_links(), Vec::<String>::new());
        assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    }
    // DEL with the agent gone still succeeds (noted on stderr).
    let run = node.del("c1", Some(&pod), None);
    run.quiet_ok();
    assert!(
        run.stderr
            .contains("removing the device and the address anyway"),
        "{}",
        run.stderr
    );
}

#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn bad_input_gets_an_error_json() {
    require_root();
    let node = Node::new("10.250.5.0/24", "veth");
    let pod = node.pod(1);
    let netns = pod.path();
    let vars = [
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    node.run("ADD", &vars, b"{\"cniVersion\": ").error(6);
    let mut conf = node.conf();
    conf["mtu"] = json!("large");
    let msg = node
        .run("ADD", &vars, &serde_json::to_vec(&conf).unwrap())
        .error(6);
    assert!(msg.contains("mtu"), "{msg}");
    let mut conf = node.conf();
    conf["podDevice"] = json!("macvlan");
    let msg = node
        .run("ADD", &vars, &serde_json::to_vec(&conf).unwrap())
        .error(7);
    assert!(msg.contains("macvlan"), "{msg}");
    let mut conf = node.conf();
    conf["ipam"]["type"] = json!("no-such-ipam");
    let msg = node
        .run("ADD", &vars, &serde_json::to_vec(&conf).unwrap())
        .error(7);
    assert!(msg.contains("no-such-ipam"), "{msg}");
    let mut conf = node.conf();
    conf["cniVersion"] = json!("0.4.0");
    node.run("ADD", &vars, &serde_json::to_vec(&conf).unwrap())
        .error(1);
    let conf = serde_json::to_vec(&node.conf()).unwrap();
    node.run("ADD", &vars[..2], &conf).error(4);
    node.run(
        "ADD",
        &[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/self/status"),
        ],
        &conf,
    )
    .error(4);
    node.run("FROB", &vars, &conf).error(4);
    // An interface of that name in the pod already: refused, nothing
    // allocated.
    pod.sh("ip link add eth0 type veth peer name other0")
        .unwrap();
    let msg = node.run("ADD", &vars, &conf).error(4);
    assert!(msg.contains("already exists"), "{msg}");
    assert!(node.allocations().is_empty());
    assert!(
        node.registry.calls().is_empty(),
        "{:?}",
        node.registry.calls()
    );
}

/// GC removes what the runtime no longer lists: the agent's entry, the
/// device and host-local's allocation; the rest stays.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn gc_removes_stale_attachments() {
    require_root();
    let node = Node::new("10.250.6.0/24", "veth");
    let (p1, p2) = (node.pod(1), node.pod(2));
    let r1 = node.add("c1", &p1);
    let r2 = node.add("c2", &p2);
    let (ip1, ip2) = (pod_ip(&r1), pod_ip(&r2));
    assert_eq!(node.allocations().len(), 2);
    // The runtime lost c1 (its namespace is gone, no DEL came).
    drop(p1);

    let mut conf = node.conf();
    conf["cni.dev/valid-attachments"] = json!([{ "containerID": "c2", "ifname": "eth0" }]);
    let run = node.run("GC", &[], &serde_json::to_vec(&conf).unwrap());
    run.quiet_ok();
    assert!(
        run.stderr.contains("removing stale attachment c1/eth0"),
        "{}",
        run.stderr
    );
    assert_eq!(
        node.allocations(),
        BTreeMap::from([(ip2, "c2".to_string())]),
        "{ip1} still allocated"
    );
    assert_eq!(node.registry.endpoint("c1", "eth0"), None);
    assert!(node.registry.endpoint("c2", "eth0").is_some());
    assert_eq!(node.host_links(), vec![host_ifname("c2", "eth0")]);
    node.check("c2", &p2, &r2).quiet_ok();
    // Nothing stale: nothing done.
    node.run("GC", &[], &serde_json::to_vec(&conf).unwrap())
        .quiet_ok();
    assert_eq!(node.allocations().len(), 1);
}

/// With two addresses in the range, a deleted pod's address goes to the
/// next new pod, which then works like any other.
#[test]
#[ignore = "needs root; `cargo xtask test` runs it"]
fn a_freed_address_is_reused() {
    require_root();
    let node = Node::with_range(
        json!([[{ "subnet": "10.250.7.0/29", "rangeStart": "10.250.7.2", "rangeEnd": "10.250.7.3" }]]),
        "veth",
    );
    let (p1, p2, p3) = (node.pod(1), node.pod(2), node.pod(3));
    let r1 = node.add("c1", &p1);
    let r2 = node.add("c2", &p2);
    // The range is full: IPAM's error comes back, nothing is left behind.
    let msg = node.attach("ADD", "c3", Some(&p3), &node.conf()).error(999);
    assert!(
        msg.contains("host-local") && msg.contains("no IP addresses available"),
        "{msg}"
    );
    assert_eq!(links(&p3), Vec::<String>::new());

    node.del("c1", Some(&p1), Some(&r1)).quiet_ok();
    let r3 = node.add("c3", &p3);
    assert_eq!(pod_ip(&r3), pod_ip(&r1), "the freed address is reused");
    assert_attached(&node, "c3", &p3, &r3, "veth", "10.250.7.1");
    node.check("c3", &p3, &r3).quiet_ok();
    p3.sh(&format!("ping -c 2 -W 2 {}", pod_ip(&r2))).unwrap();
    p2.sh(&format!("ping -c 2 -W 2 {}", pod_ip(&r3))).unwrap();
}
