//! `dataplane`: the node agent and its operator commands.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use dataplane::{
    agent::{
        self, AgentConfig, CtOptions, DecapMode,
        cni::{CniOptions, PodDeviceArg},
    },
    etcd::{EtcdOptions, Prefix},
    lease::format_mac,
};

#[derive(Parser)]
#[command(
    name = "dataplane",
    version,
    about = "Overlay dataplane node agent: flannel-compatible leases in etcd, VXLAN in BPF"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (as root).
    Agent(Box<AgentArgs>),
    /// Read or write the network config (`<prefix>/config`).
    Config {
        #[command(subcommand)]
        op: ConfigOp,
    },
    /// List the subnet leases in etcd.
    Leases {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Store Services, Endpoints and EndpointSlices from a YAML file (what
    /// you would `kubectl apply`), all or nothing.
    Apply {
        #[command(flatten)]
        svc: ServiceArgs,
        /// The manifest file (several documents allowed; `-` for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects of a YAML file, or one Service with its endpoints.
    Delete {
        #[command(flatten)]
        svc: ServiceArgs,
        /// The manifest file whose objects to delete.
        #[arg(short = 'f', long = "filename", conflicts_with = "target")]
        file: Option<PathBuf>,
        /// `service NAMESPACE/NAME` (or `service NAME` in `default`).
        #[arg(num_args = 2, value_names = ["KIND", "NAME"])]
        target: Vec<String>,
    },
    /// List services: name, ClusterIP, ports, endpoints ready/total.
    Get {
        #[command(flatten)]
        svc: ServiceArgs,
        /// What to list (`services`).
        what: String,
    },
    /// Remove what the agent leaves on a node when it stops: its pinned
    /// links (detaching the programs), every pin under the pin path (older
    /// releases' maps included), the pod bridge (with its settings), its
    /// CNI conflist, and net.ipv4.ip_forward as it was before the agent.
    /// Stop the agent first.
    Uninstall {
        /// Where the agent pinned its maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        pin_path: PathBuf,
        /// The pod bridge the agent made.
        #[arg(long, default_value = "cni0")]
        bridge: String,
        /// Where the agent wrote its CNI conflist.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The host overlay device the agent made (removed with its route).
        #[arg(long, default_value = dataplane::agent::hostnet::DEFAULT_DEVICE)]
        host_device: String,
    },
    /// This node's view: lease, etcd, peers, Services, conntrack, drops,
    /// attached programs. Works while the agent is down (and says so).
    Status {
        /// Where the agent pinned its maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        pin_path: PathBuf,
        /// `human` (a table) or `json`.
        #[arg(long, short = 'o', value_enum, default_value = "human")]
        output: dataplane::status::render::Output,
    },
    /// Print the data path counters of the agent on this node.
    Stats {
        /// Where the agent pinned its maps.
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        pin_path: PathBuf,
    },
    /// The ClusterIP flows of this node (from the pinned maps, so also
    /// while the agent is down).
    Conntrack {
        #[command(subcommand)]
        op: ConntrackOp,
    },
}

#[derive(Subcommand)]
enum ConntrackOp {
    /// List flows: client, frontend, backend, state, age, idle, Service.
    List {
        #[command(flatten)]
        ct: ConntrackArgs,
        /// `table` or `json`.
        #[arg(long, short = 'o', default_value = "table")]
        output: OutputFormat,
    },
    /// Remove flows (both directions): all, or one Service's. Their next
    /// packets start over (an ACK is picked up, a UDP datagram picks a
    /// backend again).
    Flush {
        #[command(flatten)]
        ct: ConntrackArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Args)]
struct ConntrackArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// etcd prefix of Services (to name them; without etcd, flows show
    /// their frontend and service id).
    #[arg(long, default_value = dataplane::services::DEFAULT_PREFIX)]
    service_prefix: Prefix,
    /// Only the flows of this Service (`NAMESPACE/NAME`, or `NAME` in
    /// `default`); needs etcd.
    #[arg(long)]
    service: Option<String>,
    /// Where the agent pinned its maps.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    pin_path: PathBuf,
}

/// Conntrack timeouts in seconds; the defaults are netfilter's, with the
/// two kube-proxy sets (established 24 h, close_wait 1 h).
#[derive(Args, Clone, Copy)]
struct CtTimeoutArgs {
    /// A SYN not answered yet (netfilter's nf_conntrack_tcp_timeout_syn_sent).
    #[arg(long, default_value_t = 120)]
    ct_tcp_timeout_syn_sent: u32,
    /// SYN-ACK seen, handshake not completed.
    #[arg(long, default_value_t = 60)]
    ct_tcp_timeout_syn_recv: u32,
    /// An established connection (kube-proxy: 86400).
    #[arg(long, default_value_t = 86_400)]
    ct_tcp_timeout_established: u32,
    /// One side sent a FIN.
    #[arg(long, default_value_t = 120)]
    ct_tcp_timeout_fin_wait: u32,
    /// Half-closed: a FIN acknowledged, the other side still open (kube-proxy: 3600).
    #[arg(long, default_value_t = 3_600)]
    ct_tcp_timeout_close_wait: u32,
    /// Both sides sent a FIN.
    #[arg(long, default_value_t = 120)]
    ct_tcp_timeout_time_wait: u32,
    /// After a RST.
    #[arg(long, default_value_t = 10)]
    ct_tcp_timeout_close: u32,
    /// UDP, nothing came back yet.
    #[arg(long, default_value_t = 30)]
    ct_udp_timeout: u32,
    /// UDP, both directions seen.
    #[arg(long, default_value_t = 120)]
    ct_udp_timeout_stream: u32,
}

impl CtTimeoutArgs {
    fn timeouts(&self) -> anyhow::Result<dataplane_common::ct::CtTimeouts> {
        let t = dataplane_common::ct::CtTimeouts {
            tcp_syn_sent: self.ct_tcp_timeout_syn_sent,
            tcp_syn_recv: self.ct_tcp_timeout_syn_recv,
            tcp_established: self.ct_tcp_timeout_established,
            tcp_fin_wait: self.ct_tcp_timeout_fin_wait,
            tcp_close_wait: self.ct_tcp_timeout_close_wait,
            tcp_time_wait: self.ct_tcp_timeout_time_wait,
            tcp_close: self.ct_tcp_timeout_close,
            udp_unreplied: self.ct_udp_timeout,
            udp_replied: self.ct_udp_timeout_stream,
            _pad: 0,
        };
        for (flag, v) in [
            ("--ct-tcp-timeout-syn-sent", t.tcp_syn_sent),
            ("--ct-tcp-timeout-syn-recv", t.tcp_syn_recv),
            ("--ct-tcp-timeout-established", t.tcp_established),
            ("--ct-tcp-timeout-fin-wait", t.tcp_fin_wait),
            ("--ct-tcp-timeout-close-wait", t.tcp_close_wait),
            ("--ct-tcp-timeout-time-wait", t.tcp_time_wait),
            ("--ct-tcp-timeout-close", t.tcp_close),
            ("--ct-udp-timeout", t.udp_unreplied),
            ("--ct-udp-timeout-stream", t.udp_replied),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1 second");
            }
        }
        Ok(t)
    }
}

#[derive(Subcommand)]
enum ConfigOp {
    /// Print the config as stored.
    Get {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Store a config (JSON, flannel's format) after validating it.
    Put {
        #[command(flatten)]
        etcd: EtcdArgs,
        json: String,
        /// Leave an existing config alone.
        #[arg(long)]
        if_absent: bool,
    },
}

#[derive(Args, Clone)]
struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "DATAPLANE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// CA certificate for etcd TLS.
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd TLS.
    #[arg(long)]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd TLS.
    #[arg(long)]
    etcd_keyfile: Option<PathBuf>,
    #[arg(long, env = "DATAPLANE_ETCD_USERNAME")]
    etcd_username: Option<String>,
    #[arg(long, env = "DATAPLANE_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Key prefix of the network (flannel's --etcd-prefix).
    #[arg(long, default_value = "/coreos.com/network")]
    etcd_prefix: Prefix,
}

impl EtcdArgs {
    fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }
}

#[derive(Args, Clone)]
struct ServiceArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// etcd prefix of Services, Endpoints and EndpointSlices.
    #[arg(long, default_value = dataplane::services::DEFAULT_PREFIX)]
    service_prefix: Prefix,
    /// The cluster's service CIDR: `apply` refuses a ClusterIP outside it
    /// (kube-apiserver's --service-cluster-ip-range). Default: ServiceCIDR
    /// of the network config, else 10.96.0.0/12.
    #[arg(long)]
    service_cidr: Option<ipnet::Ipv4Net>,
    /// Where `apply` allocates nodePorts, and which explicit ones it
    /// accepts (kube-apiserver's --service-node-port-range), e.g.
    /// 30000-32767. Default: NodePortRange of the network config, else
    /// 30000-32767.
    #[arg(long)]
    service_node_port_range: Option<dataplane::config::NodePortRange>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Underlay interface VXLAN leaves and arrives on (default: the one
    /// holding the IPv4 default route).
    #[arg(long)]
    iface: Option<String>,
    /// IP published in the lease (default: the underlay's first IPv4 address).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env.
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    subnet_file: PathBuf,
    /// bpffs directory for the pinned maps.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    pin_path: PathBuf,
    /// Where VXLAN is decapsulated: xdp, tc, or auto (XDP on physical NICs,
    /// TC on veth and other virtual devices).
    #[arg(long, value_enum, default_value = "auto")]
    decap_mode: DecapMode,
    /// The pod bridge (the CNI bridge plugin's default name).
    #[arg(long, default_value = "cni0")]
    bridge: String,
    /// TTL of the etcd lease holding our subnet, in seconds (flannel: 24 h).
    #[arg(long, default_value_t = 86_400)]
    lease_ttl_secs: u64,
    /// Renew the lease this many seconds before it expires (flannel: 1 h).
    #[arg(long, default_value_t = 3_600)]
    renew_margin_secs: u64,
    /// Masquerade pod traffic leaving the cluster network to the node's
    /// PublicIP (in BPF, as flannel's --ip-masq rules do), and write
    /// FLANNEL_IPMASQ=true to subnet.env.
    #[arg(long)]
    ip_masq: bool,
    /// Source ports of masqueraded flows, MIN-MAX (reserved in
    /// net.ipv4.ip_local_reserved_ports while the agent is installed).
    #[arg(long, default_value = "61000-65535")]
    nat_ports: dataplane::agent::nat_ports::NatPorts,
    /// etcd prefix of Services, Endpoints and EndpointSlices.
    #[arg(long, default_value = dataplane::services::DEFAULT_PREFIX)]
    service_prefix: Prefix,
    /// The cluster's service CIDR: a Service whose ClusterIP lies outside
    /// it is skipped. Default: ServiceCIDR of the network config, else
    /// 10.96.0.0/12.
    #[arg(long)]
    service_cidr: Option<ipnet::Ipv4Net>,
    /// Log rare data-path events (aya-log records from the BPF programs)
    /// through the agent's log, filtered by RUST_LOG like the rest.
    #[arg(long)]
    bpf_log: bool,
    /// Where the agent writes its CNI conflist (10-dataplane.conflist),
    /// once it holds a lease.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The socket the CNI plugin (dataplane-cni) registers pods on.
    #[arg(long, default_value = "/run/dataplane/cni.sock")]
    cni_socket: PathBuf,
    /// The record of CNI pods (for a restart) and host-local's dataDir.
    #[arg(long, default_value = "/var/lib/dataplane/cni")]
    cni_state_dir: PathBuf,
    /// The device pods get: veth, netkit, or auto (netkit where the kernel
    /// has it).
    #[arg(long, value_enum, default_value = "auto")]
    pod_device: PodDeviceArg,
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP
    /// on this address, e.g. 127.0.0.1:9475 (off by default).
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// ClusterIP flows the conntrack table holds (each takes ~216 bytes
    /// of kernel memory, allocated at start: see the README). Changing it
    /// needs the pinned table removed (`dataplane uninstall`).
    #[arg(long, default_value_t = dataplane_common::CT_MAX)]
    ct_max: u32,
    /// Sweep the conntrack table (remove expired flows) this often, in
    /// seconds; a full table is swept within a second anyway.
    #[arg(long, default_value_t = 30)]
    ct_sweep_interval_secs: u64,
    #[command(flatten)]
    ct_timeouts: CtTimeoutArgs,
    /// The host overlay device: a dummy the agent creates, through which
    /// the cluster network is routed from the node's gateway address, so
    /// the node's own traffic to other nodes' pods is encapsulated (at
    /// most 15 bytes).
    #[arg(long, default_value = dataplane::agent::hostnet::DEFAULT_DEVICE)]
    host_device: String,
    /// The cgroup v2 directory the socket programs (ClusterIPs for the
    /// node's own processes) attach to, as multi-attach links.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_path: PathBuf,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    unblock_stop_signals();
    tune_malloc();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Agent(a) => {
                if a.lease_ttl_secs == 0 {
                    bail!("--lease-ttl-secs must be positive");
                }
                if a.ct_max < 16 {
                    bail!("--ct-max must be at least 16");
                }
                if a.ct_sweep_interval_secs == 0 {
                    bail!("--ct-sweep-interval-secs must be positive");
                }
                let ct = CtOptions {
                    max: a.ct_max,
                    timeouts: a.ct_timeouts.timeouts()?,
                    sweep_interval: Duration::from_secs(a.ct_sweep_interval_secs),
                };
                agent::run(AgentConfig {
                    etcd: a.etcd.options(),
                    prefix: a.etcd.etcd_prefix.to_string(),
                    iface: a.iface,
                    public_ip: a.public_ip,
                    subnet_file: a.subnet_file,
                    pin_path: a.pin_path,
                    decap_mode: a.decap_mode,
                    bridge: a.bridge,
                    lease_ttl: Duration::from_secs(a.lease_ttl_secs),
                    renew_margin: Duration::from_secs(a.renew_margin_secs),
                    ip_masq: a.ip_masq,
                    nat_ports: a.nat_ports,
                    service_prefix: a.service_prefix.to_string(),
                    service_cidr: a.service_cidr,
                    bpf_log: a.bpf_log,
                    cni: CniOptions {
                        conf_dir: a.cni_conf_dir,
                        socket: a.cni_socket,
                        state_dir: a.cni_state_dir,
                        pod_device: a.pod_device,
                    },
                    metrics_address: a.metrics_address,
                    ct,
                    host_device: a.host_device,
                    cgroup_path: a.cgroup_path,
                })
                .await
            }
            Cmd::Config { op } => config_cmd(op).await,
            Cmd::Apply { svc, file } => apply_cmd(&svc, &file).await,
            Cmd::Delete { svc, file, target } => delete_cmd(&svc, file.as_deref(), &target).await,
            Cmd::Get { svc, what } => get_cmd(&svc, &what).await,
            Cmd::Leases { etcd } => leases_cmd(&etcd).await,
            Cmd::Uninstall {
                pin_path,
                bridge,
                cni_conf_dir,
                host_device,
            } => uninstall_cmd(&pin_path, &bridge, &cni_conf_dir, &host_device).await,
            Cmd::Status { pin_path, output } => {
                use dataplane::status::{NodeStatus, render};
                let now = std::time::SystemTime::now();
                let st = NodeStatus::gather(&pin_path, now);
                match output {
                    render::Output::Human => print!("{}", render::human(&st, now)),
                    render::Output::Json => println!("{}", render::json(&st)),
                }
                Ok(())
            }
            Cmd::Conntrack { op } => conntrack_cmd(op).await,
            Cmd::Stats { pin_path } => {
                for (stat, c) in dataplane::bpf::read_pinned_stats(&pin_path)? {
                    println!(
                        "{:<24} {:>12} pkts {:>16} bytes",
                        stat.name(),
                        c.packets,
                        c.bytes
                    );
                }
                let svc = dataplane::bpf::read_pinned_svc_stats(&pin_path)?;
                if !svc.is_empty() {
                    println!(
                        "\n{:<24} {:>10} {:>12} {:>14} {:>10}",
                        "FRONTEND", "FLOWS", "PACKETS", "BYTES", "REJECTED"
                    );
                    for (k, c) in svc {
                        let proto = if k.proto == dataplane_common::PROTO_TCP {
                            "TCP"
                        } else {
                            "UDP"
                        };
                        let fe = format!(
                            "{}:{}/{proto}",
                            std::net::Ipv4Addr::from(k.vip),
                            u16::from_be_bytes(k.port)
                        );
                        println!(
                            "{fe:<24} {:>10} {:>12} {:>14} {:>10}",
                            c.new_flows, c.packets, c.bytes, c.rejections
                        );
                    }
                }
                if let Some(gc) = dataplane::bpf::ct::read_pinned_gc(&pin_path)? {
                    println!();
                    for (c, v) in gc {
                        println!("{:<24} {v:>12}", c.name());
                    }
                }
                Ok(())
            }
        }
    })
}

/// The Services in etcd, to name flows by; `None` (with a warning) when
/// etcd cannot be reached in a few seconds.
async fn service_index(ct: &ConntrackArgs) -> Option<dataplane::conntrack::ServiceIndex> {
    let list = async {
        let mut client = dataplane::etcd::connect(&ct.etcd.options()).await?;
        anyhow::Ok(dataplane::services::list(&mut client, &ct.service_prefix).await?)
    };
    match tokio::time::timeout(Duration::from_secs(5), list).await {
        Ok(Ok(store)) => Some(dataplane::conntrack::ServiceIndex::new(&store)),
        Ok(Err(e)) => {
            eprintln!("warning: Services not listed from etcd ({e:#}): flows show service ids");
            None
        }
        Err(_) => {
            eprintln!("warning: etcd did not answer within 5 s: flows show service ids");
            None
        }
    }
}

async fn conntrack_cmd(op: ConntrackOp) -> anyhow::Result<()> {
    let ct = match &op {
        ConntrackOp::List { ct, .. } | ConntrackOp::Flush { ct } => ct,
    };
    let services = service_index(ct).await;
    let only = match &ct.service {
        None => None,
        Some(s) => {
            let (ns, name) = s.split_once('/').unwrap_or(("default", s.as_str()));
            let name = dataplane::services::ServiceName::new(ns, name);
            match &services {
                None => {
                    bail!("--service {name}: the Services in etcd are needed to find its flows")
                }
                Some(idx) if !idx.knows(&name) => {
                    bail!("--service {name}: no such Service in etcd")
                }
                Some(_) => Some(name),
            }
        }
    };
    let mut table = dataplane::bpf::CtTable::open_pinned(&ct.pin_path)
        .with_context(|| format!("is an agent's pin path {}?", ct.pin_path.display()))?;
    match op {
        ConntrackOp::List { output, .. } => {
            let rows = dataplane::conntrack::rows(
                &table,
                dataplane::bpf::ct::monotonic_ns(),
                &table.timeouts()?,
                services.as_ref(),
                only.as_ref(),
            )?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                OutputFormat::Table => print!("{}", dataplane::conntrack::render(&rows)),
            }
        }
        ConntrackOp::Flush { .. } => {
            let n = dataplane::conntrack::flush(&mut table, services.as_ref(), only.as_ref())?;
            match &only {
                Some(name) => println!("flushed {n} flows of {name}"),
                None => println!("flushed {n} flows"),
            }
        }
    }
    Ok(())
}

async fn config_cmd(op: ConfigOp) -> anyhow::Result<()> {
    let etcd = match &op {
        ConfigOp::Get { etcd } | ConfigOp::Put { etcd, .. } => etcd.clone(),
    };
    let mut client = dataplane::etcd::connect(&etcd.options()).await?;
    let key = dataplane::config::config_key(&etcd.etcd_prefix);
    match op {
        ConfigOp::Get { .. } => {
            let resp = client.get(key.as_str(), None).await?;
            match resp.kvs().first() {
                Some(kv) => println!("{}", String::from_utf8_lossy(kv.value())),
                None => bail!("{key} is not set"),
            }
        }
        ConfigOp::Put {
            json, if_absent, ..
        } => {
            dataplane::config::NetworkConfig::parse(&json)
                .with_context(|| format!("refusing to store an invalid {key}"))?;
            if if_absent {
                let created =
                    dataplane::etcd::create_if_absent(&mut client, &key, json.as_str(), None)
                        .await?;
                println!(
                    "{}",
                    if created {
                        "stored"
                    } else {
                        "already set, left alone"
                    }
                );
            } else {
                client.put(key.as_str(), json.as_str(), None).await?;
                println!("stored");
            }
        }
    }
    Ok(())
}

async fn leases_cmd(etcd: &EtcdArgs) -> anyhow::Result<()> {
    let mut client = dataplane::etcd::connect(&etcd.options()).await?;
    let prefix = &etcd.etcd_prefix;
    let dir = dataplane::lease::subnets_dir(prefix);
    let (kvs, _) =
        dataplane::etcd::list(&mut dataplane::etcd::kv_client(&client), &dir.range()).await?;
    println!(
        "{:<20} {:<16} {:<18} {:>10}",
        "SUBNET", "PUBLIC IP", "VTEP MAC", "TTL (s)"
    );
    for kv in &kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(subnet) = dataplane::lease::parse_subnet_key(prefix, &key) else {
            println!("{key:<20} (not a subnet key)");
            continue;
        };
        let ttl = if kv.lease() != 0 {
            client
                .lease_time_to_live(kv.lease(), None)
                .await
                .map(|r| r.ttl().to_string())
                .unwrap_or_else(|_| "?".into())
        } else {
            "none".into()
        };
        match dataplane::lease::LeaseAttrs::from_json(kv.value()) {
            Ok(a) => println!(
                "{:<20} {:<16} {:<18} {:>10}",
                subnet.to_string(),
                a.public_ip.to_string(),
                format_mac(&a.vtep_mac),
                ttl
            ),
            Err(e) => println!("{:<20} malformed: {e}", subnet.to_string()),
        }
    }
    Ok(())
}

fn read_manifest(file: &std::path::Path) -> anyhow::Result<Vec<dataplane::services::Object>> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    dataplane::services::parse_manifests(&text)
        .with_context(|| format!("{}: nothing applied", file.display()))
}

async fn apply_cmd(svc: &ServiceArgs, file: &std::path::Path) -> anyhow::Result<()> {
    let objects = read_manifest(file)?;
    let mut client = dataplane::etcd::connect(&svc.etcd.options()).await?;
    // No ClusterIP on a pod, node or gateway address; without a network
    // config yet, those checks are left out (the CIDR and conflict checks
    // still run).
    let (guard, warning) = dataplane::services::AddressGuard::for_cluster(
        &mut client,
        &svc.etcd.etcd_prefix,
        svc.service_cidr,
    )
    .await?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let mut guard = guard;
    if let Some(r) = svc.service_node_port_range {
        guard.node_ports = r;
    }
    let summary =
        dataplane::services::apply_guarded(&mut client, &svc.service_prefix, &objects, &guard)
            .await?;
    for (r, outcome) in &summary.objects {
        println!("{} {}/{} {outcome}", r.kind.as_str(), r.namespace, r.name);
    }
    Ok(())
}

async fn delete_cmd(
    svc: &ServiceArgs,
    file: Option<&std::path::Path>,
    target: &[String],
) -> anyhow::Result<()> {
    let mut client = dataplane::etcd::connect(&svc.etcd.options()).await?;
    let summary = match (file, target) {
        (Some(f), _) => {
            let objects = read_manifest(f)?;
            dataplane::services::delete_objects(&mut client, &svc.service_prefix, &objects).await?
        }
        (None, [kind, name]) if matches!(kind.as_str(), "service" | "services" | "svc") => {
            let (ns, name) = name.split_once('/').unwrap_or(("default", name.as_str()));
            dataplane::services::delete_service(&mut client, &svc.service_prefix, ns, name).await?
        }
        _ => bail!("usage: dataplane delete -f FILE | dataplane delete service NAMESPACE/NAME"),
    };
    for r in &summary.deleted {
        println!("{} {}/{} deleted", r.kind.as_str(), r.namespace, r.name);
    }
    for r in &summary.not_found {
        println!("{} {}/{} not found", r.kind.as_str(), r.namespace, r.name);
    }
    Ok(())
}

async fn get_cmd(svc: &ServiceArgs, what: &str) -> anyhow::Result<()> {
    if !matches!(what, "services" | "service" | "svc") {
        bail!("dataplane get: only `services` can be listed");
    }
    let mut client = dataplane::etcd::connect(&svc.etcd.options()).await?;
    let store = dataplane::services::list(&mut client, &svc.service_prefix).await?;
    println!(
        "{:<40} {:<16} {:<28} ENDPOINTS (READY/TOTAL)",
        "NAME", "CLUSTER-IP", "PORT(S)"
    );
    for s in store.summary() {
        println!(
            "{:<40} {:<16} {:<28} {}/{}",
            s.service.to_string(),
            s.cluster_ip,
            s.ports.join(","),
            s.ready_endpoints,
            s.total_endpoints
        );
    }
    Ok(())
}

/// glibc's allocator, set for a long-running process that holds little:
/// one arena per thread (its default, up to 8 per CPU) keeps each thread's
/// freed memory apart, and its mmap threshold rises to the largest block
/// ever freed (so the big buffers of a start-up listing end up in the heap,
/// where their holes stay in RSS). Two arenas, and blocks from 128 KiB up
/// in their own mappings (returned to the kernel when freed), keep RSS
/// near what is in use.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
}

/// A parent that blocked SIGTERM/SIGINT (many supervisors and test
/// harnesses do, to handle them on one thread) passes the blocked mask on
/// through fork and exec; the agent would then never see the signal that
/// asks it to stop. Unblock them before any thread exists.
fn unblock_stop_signals() {
    // SAFETY: plain signal-mask calls on a zeroed, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

async fn uninstall_cmd(
    pin_path: &std::path::Path,
    bridge: &str,
    cni_conf_dir: &std::path::Path,
    host_device: &str,
) -> anyhow::Result<()> {
    let removed = dataplane::bpf::uninstall(pin_path)?;
    println!(
        "removed {} pinned links and {} pinned maps under {}",
        removed.links,
        removed.maps,
        pin_path.display()
    );
    // The agent's status record describes what was just removed.
    let record = dataplane::status::record_path(pin_path);
    match std::fs::remove_file(&record) {
        Ok(()) => println!("removed the status record {}", record.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("removing the status record {}: {e}", record.display()),
    }
    let nl = dataplane::netlink::Netlink::new()?;
    match nl.link_by_name(bridge).await? {
        Some(l) if l.kind.as_deref() == Some("bridge") => {
            nl.delete_link(l.ifindex).await?;
            println!("deleted bridge {bridge}");
        }
        Some(l) => bail!(
            "{bridge} is a {} device, not a bridge; left alone",
            l.kind.as_deref().unwrap_or("unknown")
        ),
        None => println!("no bridge {bridge}"),
    }
    // Its route goes with it.
    match nl.link_by_name(host_device).await? {
        Some(l) if dataplane::netlink::is_host_device_kind(l.kind.as_deref()) => {
            nl.delete_link(l.ifindex).await?;
            println!("deleted the host device {host_device}");
        }
        Some(l) => bail!(
            "{host_device} is a {} device, not a dummy or ifb; left alone",
            l.kind.as_deref().unwrap_or("unknown")
        ),
        None => println!("no host device {host_device}"),
    }
    let conflist = cni_conf_dir.join(dataplane::agent::cni::CONFLIST_NAME);
    match std::fs::remove_file(&conflist) {
        Ok(()) => println!("removed {}", conflist.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", conflist.display())),
    }
    match dataplane::agent::forwarding::restore()? {
        Some(v) => println!("net.ipv4.ip_forward restored to {v}"),
        None => println!("net.ipv4.ip_forward left as it is (the agent found it on)"),
    }
    match dataplane::agent::nat_ports::restore()? {
        Some(v) => println!("net.ipv4.ip_local_reserved_ports restored to {v:?}"),
        None => println!("net.ipv4.ip_local_reserved_ports left as it is"),
    }
    Ok(())
}
