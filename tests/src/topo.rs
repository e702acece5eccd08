//! A cluster on one machine: an underlay namespace with a bridge and a real
//! etcd, node namespaces attached to it by veth, agents running in the node
//! namespaces, and pod namespaces: plumbed as the CNI bridge plugin does
//! ([`Cluster::add_pod`]), or created through `dataplane-cni` exactly as a
//! container runtime runs it ([`Cluster::add_cni_pod`]).
//!
//! Everything is named after a per-cluster id and removed on drop (agents
//! stopped by their own PID, namespaces deleted, pins and files removed),
//! also when a test panics.
//!
//! ```text
//!   [pod]--vpN--[cni0 | node nK | eth0]--uK--[br0 | underlay ns, etcd]
//! ```

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dataplane::{
    cni::device::host_ifname,
    subnet_env::{self, SubnetEnv},
};
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::{
    etcd::Etcd,
    netns::{NetNs, unique_id},
};

pub const UNDERLAY_NET: [u8; 3] = [192, 168, 77];
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 254);
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// Path of the agent binary: `DATAPLANE_BIN` (set by `cargo xtask test`),
/// else `target/debug/dataplane` of this workspace.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_BIN") {
        return p.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dataplane")
}

/// The CNI plugin, next to the agent binary.
pub fn cni_plugin_bin() -> PathBuf {
    agent_bin().with_file_name("dataplane-cni")
}

/// Where host-local (and the other reference plugins) are installed.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// Host-side veth name inside the node namespace.
    pub host_if: String,
    /// Set for a pod made through the CNI plugin.
    pub cni: Option<CniAttachment>,
}

/// A pod's attachment made through `dataplane-cni`.
#[derive(Clone, Debug)]
pub struct CniAttachment {
    pub container_id: String,
    /// ADD's result (the `prevResult` of CHECK and DEL).
    pub result: Value,
}

/// A plugin invocation's outcome.
#[derive(Debug)]
pub struct CniRun {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniRun {
    /// Success, or an error with the plugin's output.
    pub fn check(self, what: &str) -> anyhow::Result<Self> {
        if !self.ok {
            bail!("{what} failed: {}\nstderr: {}", self.stdout, self.stderr);
        }
        Ok(self)
    }
}

/// Runs the CNI plugin at `plugin` in `ns` exactly as a container runtime
/// does: no inherited `CNI_*`, `CNI_COMMAND`, `CNI_PATH` (the plugin's own
/// directory, then the reference plugins'), `vars` (later ones win),
/// `stdin` as the netconf, the result on stdout.
pub fn invoke_cni(
    ns: &NetNs,
    plugin: &Path,
    command: &str,
    vars: &[(&str, &str)],
    stdin: &[u8],
) -> anyhow::Result<CniRun> {
    let cni_path = format!(
        "{}:{CNI_PLUGIN_DIR}",
        plugin.parent().context("plugin dir")?.display()
    );
    let mut cmd = ns.command(plugin.to_str().context("plugin path")?);
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", cni_path)
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running the CNI plugin")?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    Ok(CniRun {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

pub struct Node {
    pub index: usize,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub pin_path: PathBuf,
    pub agent: Option<Child>,
    pub pods: Vec<Pod>,
}

impl Node {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// `--cni-conf-dir` of this node's agent.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    /// `--cni-socket` of this node's agent.
    pub fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    /// `--cni-state-dir` of this node's agent.
    pub fn cni_state_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }

    /// The conflist the agent wrote, if it did.
    pub fn conflist(&self) -> Option<Value> {
        let text = fs::read(self.cni_conf_dir().join("10-dataplane.conflist")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The network config a runtime hands the plugin, made from the
    /// conflist as libcni does: the plugin's entry of `plugins` with the
    /// top-level `cniVersion` and `name` (and `prevResult`, if given).
    pub fn cni_netconf(&self, prev: Option<&Value>) -> anyhow::Result<Value> {
        let list = self
            .conflist()
            .context("the agent has not written its conflist")?;
        let mut conf = list["plugins"]
            .as_array()
            .and_then(|p| p.first())
            .cloned()
            .context("conflist without plugins")?;
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        Ok(conf)
    }

    /// Runs `dataplane-cni` in this node's namespace as a runtime does:
    /// `CNI_COMMAND`, `CNI_PATH` and `vars` (the other `CNI_*`), `conf` on
    /// stdin, the result on stdout.
    pub fn run_cni(
        &self,
        command: &str,
        vars: &[(&str, &str)],
        conf: &Value,
    ) -> anyhow::Result<CniRun> {
        let plugin = cni_plugin_bin();
        anyhow::ensure!(
            plugin.is_file(),
            "{} is missing: build it with `cargo build -p dataplane --bins`",
            plugin.display()
        );
        invoke_cni(&self.ns, &plugin, command, vars, &serde_json::to_vec(conf)?)
    }

    /// Creates a pod namespace and attaches it through the plugin (ADD);
    /// `cni_args` is `CNI_ARGS` (e.g. `IP=10.244.1.5` for host-local).
    pub fn add_cni_pod(
        &mut self,
        cluster_id: &str,
        container_id: &str,
        cni_args: Option<&str>,
    ) -> anyhow::Result<usize> {
        let j = self.pods.len() + 1;
        let ns = NetNs::new(&format!("dp{cluster_id}n{}p{j}", self.index + 1))?;
        let conf = self.cni_netconf(None)?;
        let netns = ns.path();
        let mut vars = vec![
            ("CNI_CONTAINERID", container_id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
        ];
        if let Some(args) = cni_args {
            vars.push(("CNI_ARGS", args));
        }
        let run = self.run_cni("ADD", &vars, &conf)?.check("CNI ADD")?;
        let result: Value = serde_json::from_str(&run.stdout)
            .with_context(|| format!("ADD result is not JSON: {}", run.stdout))?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .context("ADD result without an address")?;
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("address {addr}"))?;
        self.pods.push(Pod {
            ns,
            ip,
            host_if: host_ifname(container_id, "eth0"),
            cni: Some(CniAttachment {
                container_id: container_id.into(),
                result,
            }),
        });
        Ok(self.pods.len() - 1)
    }

    /// CHECK or DEL of CNI pod `pod` (its ADD result as `prevResult`).
    pub fn cni_command(&self, command: &str, pod: usize) -> anyhow::Result<CniRun> {
        let p = &self.pods[pod];
        let att = p.cni.as_ref().context("not a CNI pod")?;
        let conf = self.cni_netconf(Some(&att.result))?;
        let netns = p.ns.path();
        self.run_cni(
            command,
            &[
                ("CNI_CONTAINERID", att.container_id.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns.as_str()),
            ],
            &conf,
        )
    }

    /// subnet.env as the agent wrote it, if it did.
    pub fn subnet_env(&self) -> Option<SubnetEnv> {
        subnet_env::read(&self.subnet_file()).ok().flatten()
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            stop_child(&mut child);
        }
    }
}

/// SIGTERM, wait, SIGKILL: only the process we started, by its PID.
pub fn stop_child(child: &mut Child) {
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub struct Cluster {
    pub id: String,
    pub dir: PathBuf,
    pub underlay: NetNs,
    pub etcd: Etcd,
    pub nodes: Vec<Node>,
    pub prefix: String,
}

impl Cluster {
    /// Underlay namespace + etcd, and `n` node namespaces (no agents yet).
    pub fn new(n: usize) -> anyhow::Result<Self> {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("dp-{id}"));
        fs::create_dir_all(&dir)?;
        let underlay = NetNs::new(&format!("dp{id}u"))?;
        underlay.sh(&format!(
            "ip link add br0 type bridge && ip addr add {UNDERLAY_GW}/24 dev br0 && ip link set br0 up"
        ))?;
        let etcd = Etcd::start_in_netns(&underlay.name, UNDERLAY_GW).context("starting etcd")?;
        let mut c = Cluster {
            id,
            dir,
            underlay,
            etcd,
            nodes: Vec::new(),
            prefix: DEFAULT_PREFIX.into(),
        };
        for _ in 0..n {
            c.add_node()?;
        }
        Ok(c)
    }

    /// A new node namespace on the underlay (address 192.168.77.<k>).
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let k = index + 1;
        let ip = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], k as u8);
        let ns = NetNs::new(&format!("dp{}n{k}", self.id))?;
        self.underlay.sh(&format!(
            "ip link add u{k} type veth peer name eth0 netns {} && ip link set u{k} master br0 up",
            ns.name
        ))?;
        ns.sh(&format!(
            "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via {UNDERLAY_GW}"
        ))?;
        let dir = self.dir.join(format!("n{k}"));
        fs::create_dir_all(&dir)?;
        self.nodes.push(Node {
            index,
            ns,
            ip,
            dir,
            pin_path: PathBuf::from(format!("/sys/fs/bpf/dp{}n{k}", self.id)),
            agent: None,
            pods: Vec::new(),
        });
        Ok(index)
    }

    pub fn endpoint(&self) -> String {
        self.etcd.endpoint.clone()
    }

    /// Runs `f` with an etcd client on a thread inside the underlay
    /// namespace (the only place etcd is reachable from).
    pub fn with_etcd<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(etcd_client::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let endpoint = self.endpoint();
        crate::netns::in_netns(&self.underlay, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = etcd_client::Client::connect([endpoint], None).await?;
                f(client).await
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("etcd thread panicked"))?
    }

    /// Runs the `dataplane` CLI inside the underlay namespace against this
    /// cluster's etcd; returns stdout, or the error with stderr.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .underlay
            .command(agent_bin().to_str().context("agent path")?)
            .args(args)
            .env("DATAPLANE_ETCD_ENDPOINTS", self.endpoint())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("dataplane {args:?}"))?;
        if !out.status.success() {
            bail!(
                "dataplane {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `dataplane apply -f` of this YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!("manifest-{n}.yaml"));
        fs::write(&path, yaml)?;
        self.cli(&["apply", "-f", path.to_str().context("path")?])
    }

    /// Stores the network config (flannel JSON) through the CLI.
    pub fn put_config(&self, json: &str) -> anyhow::Result<()> {
        // etcd is only reachable inside the underlay namespace.
        let out = self
            .underlay
            .command(agent_bin().to_str().context("agent path")?)
            .args([
                "config",
                "put",
                "--etcd-endpoints",
                &self.endpoint(),
                "--etcd-prefix",
                &self.prefix,
                json,
            ])
            .env_remove("DATAPLANE_ETCD_ENDPOINTS")
            .stdin(Stdio::null())
            .output()
            .context("dataplane config put")?;
        if !out.status.success() {
            bail!(
                "config put failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts node `i`'s agent with extra CLI arguments.
    pub fn start_agent(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        self.start_agent_bin(i, &agent_bin(), extra)
    }

    /// Starts node `i`'s agent from the binary `bin` (another release's,
    /// for the upgrade test) with extra CLI arguments.
    pub fn start_agent_bin(&mut self, i: usize, bin: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let endpoint = self.endpoint();
        let prefix = self.prefix.clone();
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_file())?;
        let mut cmd = node.ns.command(bin.to_str().context("agent path")?);
        cmd.args([
            "agent",
            "--etcd-endpoints",
            &endpoint,
            "--etcd-prefix",
            &prefix,
        ])
        .arg("--subnet-file")
        .arg(node.subnet_file())
        .arg("--pin-path")
        .arg(&node.pin_path)
        .arg("--cni-conf-dir")
        .arg(node.cni_conf_dir())
        .arg("--cni-socket")
        .arg(node.cni_socket())
        .arg("--cni-state-dir")
        .arg(node.cni_state_dir())
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        node.agent = Some(cmd.spawn().context("starting agent")?);
        Ok(())
    }

    /// Waits until node `i`'s agent wrote subnet.env and attached its
    /// programs (the log says "agent ready").
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<SubnetEnv> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = &mut self.nodes[i];
            if let Some(env) = node.subnet_env()
                && node.log().contains("agent ready")
            {
                return Ok(env);
            }
            if let Some(child) = node.agent.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                bail!("agent of node {} exited ({st}):\n{}", i + 1, node.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent of node {} not ready after {timeout:?}:\n{}",
                    i + 1,
                    node.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A pod on node `i`, plumbed like the CNI bridge plugin does with
    /// flannel's subnet.env: veth into cni0, address from the node subnet,
    /// default route via the bridge, MTU from subnet.env.
    pub fn add_pod(&mut self, i: usize) -> anyhow::Result<Ipv4Addr> {
        let id = self.id.clone();
        let node = &mut self.nodes[i];
        let env = node.subnet_env().context("node has no subnet.env yet")?;
        add_pod_to(&id, node, &env.subnet, env.mtu)
    }

    /// A pod on node `i` through the CNI plugin, as a runtime makes one
    /// (see [`Node::add_cni_pod`]); returns its index in the node's pods.
    pub fn add_cni_pod(&mut self, i: usize, container_id: &str) -> anyhow::Result<usize> {
        let id = self.id.clone();
        self.nodes[i].add_cni_pod(&id, container_id, None)
    }

    /// Runs `ping` from pod (node, pod index) to `dst`.
    pub fn ping(&self, node: usize, pod: usize, dst: Ipv4Addr, count: u32) -> anyhow::Result<()> {
        self.nodes[node].pods[pod]
            .ns
            .sh(&format!("ping -c {count} -i 0.2 -W 2 {dst} >/dev/null"))?;
        Ok(())
    }

    /// The pinned maps of node `i` as bpftool prints them (JSON).
    pub fn bpftool_dump(&self, i: usize, map: &str) -> anyhow::Result<String> {
        let path = self.nodes[i].pin_path.join(map);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()?;
        if !out.status.success() {
            bail!(
                "bpftool map dump {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Plumbs a pod into `node` with address subnet + 10 + (number of pods).
pub fn add_pod_to(
    id: &str,
    node: &mut Node,
    subnet: &Ipv4Net,
    mtu: u32,
) -> anyhow::Result<Ipv4Addr> {
    let j = node.pods.len() + 1;
    let ip = Ipv4Addr::from(u32::from(subnet.network()) + 10 + j as u32);
    let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    let ns = NetNs::new(&format!("dp{id}n{}p{j}", node.index + 1))?;
    let host_if = format!("vp{j}");
    node.ns.sh(&format!(
        "ip link add {host_if} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod} && \
         ip link set {host_if} master cni0 && ip link set {host_if} up",
        pod = ns.name
    ))?;
    ns.sh(&format!(
        "ip addr add {ip}/{len} dev eth0 && ip link set eth0 up && ip route add default via {gw}",
        len = subnet.prefix_len()
    ))?;
    node.pods.push(Pod {
        ns,
        ip,
        host_if,
        cni: None,
    });
    Ok(ip)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop_agent();
        }
        for node in &mut self.nodes {
            node.pods.clear();
            let _ = fs::remove_dir_all(&node.pin_path);
            let _ = fs::remove_file(dataplane::status::record_path(&node.pin_path));
            // The agent's record of ip_forward in this namespace (what
            // `dataplane uninstall` restores).
            if let Ok(m) = fs::metadata(node.ns.path()) {
                use std::os::unix::fs::MetadataExt;
                let _ = fs::remove_file(format!("/run/dataplane/ip_forward-{}.orig", m.ino()));
            }
        }
        self.nodes.clear();
        if std::env::var_os("DATAPLANE_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
