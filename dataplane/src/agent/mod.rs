//! The node agent. Start-up gets this node a subnet lease, writes
//! subnet.env, loads the BPF object, plumbs the pod bridge, programs the
//! node config and every Service, then attaches. After that it is an event
//! loop that hands each event to [`crate::reconcile`]:
//!
//! | event                         | reconciles                              |
//! |-------------------------------|-----------------------------------------|
//! | lease table (etcd watch)      | peer maps                               |
//! | Services, EndpointSlices      | that Service's frontends                |
//! | own lease re-acquired         | subnet.env, bridge, node config, peers, all Services |
//! | link change, timer            | pod ports (attach, forget endpoints), CNI pods whose device went, retries |
//! | CNI socket request            | a CNI pod's entries, attachment and record ([`cni`]) |
//!
//! Inside the loop no error ends the agent: a failed write or netlink call
//! is logged and counted, and retried at the next event or tick.
//! [`startup`] is everything before the loop, [`node`] this node's host side,
//! [`cni`] pods registered through the CNI plugin.
//!
//! What an operator sees of it: every event is reported into
//! [`crate::metrics`] (apply latency, readiness, errors) and into the
//! status record ([`status`], read by `dataplane status`), each through
//! one named call.

pub mod cni;
pub mod forwarding;
mod health_check;
pub mod hostnet;
pub(crate) mod instance;
pub mod nat_ports;
mod node;
mod service_guard;
mod startup;
mod status;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use ipnet::Ipv4Net;
use log::{debug, error, info, warn};
use tokio::sync::{mpsc, watch};

use crate::{
    bpf::{Dataplane, Decap},
    config::NetworkConfig,
    etcd::EtcdOptions,
    lease::{LeaseAttrs, LeaseEvent, format_mac},
    metrics::{EventKind, ReadyPart},
    netlink::{self, LinkInfo, Netlink},
    peers::{PeerChange, PeerTable, PeerUpdate},
    reconcile::{Reconciler, Resync, desired},
    services::{ServiceName, ServiceStore, StoreUpdate},
};

/// Everything the agent needs to run; built from the CLI.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: EtcdOptions,
    pub prefix: String,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub pin_path: PathBuf,
    pub decap_mode: DecapMode,
    pub bridge: String,
    pub lease_ttl: Duration,
    pub renew_margin: Duration,
    /// `--ip-masq`: FLANNEL_IPMASQ=true in subnet.env, and pod traffic
    /// leaving the cluster network masqueraded in BPF.
    pub ip_masq: bool,
    /// `--nat-ports`: source ports of masqueraded flows (reserved in
    /// `net.ipv4.ip_local_reserved_ports`).
    pub nat_ports: nat_ports::NatPorts,
    /// etcd prefix of Services, Endpoints and EndpointSlices.
    pub service_prefix: String,
    /// `--service-cidr` (else the network config's, else the default).
    pub service_cidr: Option<Ipv4Net>,
    /// Forward the data path's aya-log records to the log (`--bpf-log`).
    pub bpf_log: bool,
    /// Pods through CNI: socket, conflist, state, pod device.
    pub cni: cni::CniOptions,
    /// Serve `/metrics`, `/healthz`, `/readyz` here (`--metrics-address`).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// ClusterIP conntrack: table size, timeouts, sweeps.
    pub ct: CtOptions,
    /// The host overlay device (`--host-device`).
    pub host_device: String,
    /// The cgroup v2 directory the socket programs attach to
    /// (`--cgroup-path`).
    pub cgroup_path: PathBuf,
}

/// `--ct-*`: the conntrack table's size and timeouts, and how often the
/// agent sweeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtOptions {
    /// Flows the table holds (`--ct-max`), set when the maps are made.
    pub max: u32,
    /// Per-state timeouts, handed to the data path (`ct_cfg_v1`).
    pub timeouts: dataplane_common::ct::CtTimeouts,
    /// Sweep at least this often (and within a second of the table
    /// filling up).
    pub sweep_interval: Duration,
}

impl Default for CtOptions {
    fn default() -> Self {
        CtOptions {
            max: dataplane_common::CT_MAX,
            timeouts: dataplane_common::ct::CtTimeouts::DEFAULT,
            sweep_interval: Duration::from_secs(30),
        }
    }
}

/// `--decap-mode`: where decapsulation runs on the underlay interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapMode {
    /// XDP on the underlay (native where the driver supports it).
    Xdp,
    /// TC ingress on the underlay.
    Tc,
    /// XDP on physical NICs, TC on virtual devices (veth, bridge, ...),
    /// where attaching XDP turns off TSO on the peer and costs more than it saves.
    Auto,
}

impl DecapMode {
    /// Resolves `Auto` for an interface of the given rtnetlink kind
    /// (`None` for a physical NIC).
    pub fn resolve(self, link_kind: Option<&str>) -> Decap {
        match self {
            DecapMode::Xdp => Decap::Xdp,
            DecapMode::Tc => Decap::Tc,
            DecapMode::Auto if link_kind.is_none() => Decap::Xdp,
            DecapMode::Auto => Decap::Tc,
        }
    }
}

/// Re-list bridge ports (in case a link notification was lost: netlink
/// multicast can overflow) and retry failed writes this often.
const TICK: Duration = Duration::from_secs(10);

/// Runs the agent until SIGINT/SIGTERM. The lease is deliberately not
/// revoked on exit: a restart must get the same subnet back.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let shutdown = startup::stop_on_signal();
    let Some((mut agent, events)) = startup::start(cfg, shutdown.clone()).await? else {
        return Ok(());
    };
    agent.event_loop(events, shutdown).await;
    info!("stopped");
    Ok(())
}

struct Events {
    peers: mpsc::Receiver<PeerUpdate>,
    services: mpsc::Receiver<StoreUpdate>,
    leases: mpsc::Receiver<LeaseEvent>,
    /// `None` while resubscribing (at the next tick).
    links: Option<mpsc::Receiver<()>>,
    /// Requests from the CNI socket.
    cni: mpsc::Receiver<cni::Call>,
}

/// What failed and is tried again at the next tick.
#[derive(Default)]
struct Retry {
    node: bool,
    peers: bool,
    services: BTreeSet<ServiceName>,
}

/// What the event handlers share: the data plane, the reconciler and the
/// desired-state sources (lease table, Service store, this node).
struct Agent {
    cfg: AgentConfig,
    nl: Netlink,
    dp: Dataplane,
    rec: Reconciler,
    net: NetworkConfig,
    attrs: LeaseAttrs,
    underlay: LinkInfo,
    bridge: LinkInfo,
    /// The host overlay device (`--host-device`).
    host: LinkInfo,
    /// This agent's network namespace cookie.
    netns_cookie: u64,
    mtu: u32,
    subnet: Ipv4Net,
    subnet_env: node::SubnetEnvFile,
    table: PeerTable,
    /// This node's current subnet, for the peer watch's rule on leases
    /// carrying our PublicIP.
    own_subnet: tokio::sync::watch::Sender<Ipv4Net>,
    store: ServiceStore,
    /// Services skipped for their ClusterIP or a frontend another owns.
    svc_guard: service_guard::ServiceGuard,
    /// `healthCheckNodePort` servers.
    health_checks: health_check::HealthChecks,
    retry: Retry,
    transient_errors: u64,
    /// CNI pods registered with this agent.
    cni: cni::Registrations,
    conflist: cni::ConflistFile,
    /// What the conflist tells the plugin to create.
    pod_device: crate::cni::proto::PodDevice,
    /// The task serving the CNI socket (ended with the loop).
    cni_server: Option<tokio::task::JoinHandle<()>>,
    /// Where decapsulation runs, as resolved at start-up.
    decap: Decap,
    /// The conntrack sweeper's thread (stops at the shutdown signal).
    ct_sweeper: Option<std::thread::JoinHandle<()>>,
    /// This agent's claims on its pin path and PublicIP.
    _instance: Vec<instance::InstanceLock>,
    /// The status record `dataplane status` reads.
    status: status::StatusWriter,
    /// Services and peers changed since the trees were last compacted.
    since_compact: usize,
}

/// The trees are compacted ([`crate::compact`]) once this many Services
/// and peers changed, and a fraction ([`COMPACT_FRACTION`]) of all.
const COMPACT_MIN_CHANGES: usize = 256;
const COMPACT_FRACTION: usize = 8;

async fn next_link_event(links: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match links {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    async fn event_loop(&mut self, mut ev: Events, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        let mut status_tick = tokio::time::interval(status::MIN_INTERVAL);
        loop {
            crate::metrics::global().loop_turned();
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(update) = ev.peers.recv() => self.on_peers(update),
                Some(update) = ev.services.recv() => self.on_services(update),
                Some(event) = ev.leases.recv() => self.on_lease(event).await,
                Some(call) = ev.cni.recv() => self.on_cni(call).await,
                link = next_link_event(&mut ev.links) => {
                    if link.is_none() {
                        warn!("link notifications stopped; subscribing again at the next tick");
                        ev.links = None;
                    }
                    self.sync_ports().await;
                }
                _ = tick.tick() => {
                    if ev.links.is_none() {
                        match netlink::link_events() {
                            Ok(rx) => ev.links = Some(rx),
                            Err(e) => self.failed(anyhow!("subscribing to link notifications: {e:#}")),
                        }
                    }
                    self.on_tick().await;
                    self.write_status(true);
                }
                _ = status_tick.tick() => {
                    self.write_status(false);
                    self.compact(false);
                }
            }
        }
        // The socket goes first: a plugin call now finds no agent rather
        // than one that never answers.
        if let Some(server) = self.cni_server.take() {
            server.abort();
            let _ = server.await;
        }
        // The sweeper sees the same signal and ends after its sweep.
        if let Some(sweeper) = self.ct_sweeper.take() {
            let _ = tokio::task::spawn_blocking(move || sweeper.join()).await;
        }
    }

    /// Rebuilds the agent's trees with full nodes and returns the freed
    /// memory to the kernel ([`crate::compact`]): `force`d after start-up,
    /// else once enough changed since the last time. Costs a few
    /// milliseconds per 10,000 Services.
    fn compact(&mut self, force: bool) {
        let size = self.store.len() + self.rec.frontends();
        let due = self.since_compact >= COMPACT_MIN_CHANGES.max(size / COMPACT_FRACTION);
        if !force && !due {
            return;
        }
        let t0 = Instant::now();
        self.store.compact();
        self.rec.compact();
        self.status.compact();
        crate::compact::release_free_memory();
        self.since_compact = 0;
        debug!("trees compacted in {:?}", t0.elapsed());
    }

    /// Logs and counts an error the loop recovers from.
    fn failed(&mut self, e: anyhow::Error) {
        self.transient_errors += 1;
        crate::metrics::global().error();
        error!(
            "{e:#} (retried at the next event or tick; {} transient errors so far)",
            self.transient_errors
        );
    }

    fn node_facts(&self) -> desired::NodeFacts {
        desired::NodeFacts {
            network: self.net.network,
            subnet: self.subnet,
            vni: self.net.backend.vni,
            vxlan_port: self.net.backend.port,
            public_ip: self.attrs.public_ip,
            vtep_mac: self.attrs.vtep_mac,
            underlay_ifindex: self.underlay.ifindex,
            underlay_mac: self.underlay.mac,
            bridge_ifindex: self.bridge.ifindex,
            bridge_mac: self.bridge.mac,
            host_ifindex: self.host.ifindex,
            host_mac: self.host.mac,
            netns_cookie: self.netns_cookie,
            bpf_log: self.cfg.bpf_log,
            ip_masq: self.cfg.ip_masq,
            nat_ports: (self.cfg.nat_ports.min, self.cfg.nat_ports.max),
        }
    }

    fn on_peers(&mut self, update: PeerUpdate) {
        let t0 = Instant::now();
        let resync = match update {
            PeerUpdate::Snapshot(_) => Resync::Full,
            _ => Resync::Incremental,
        };
        let changes = self.table.apply(update);
        self.since_compact += changes.len();
        for change in &changes {
            log_change(change, self.subnet);
            self.status.peer_changed(change, self.subnet);
        }
        self.sync_peers(resync);
        // A ClusterIP on a node or gateway address that came or went.
        for name in self.svc_guard.peers_changed(&self.store, &changes) {
            self.program_service(&name);
        }
        let m = crate::metrics::global();
        m.observe_apply(EventKind::Peers, t0.elapsed());
        // A complete listing is in the maps.
        if resync == Resync::Full && !self.retry.peers {
            m.set_ready(ReadyPart::PeersSynced, true);
        }
    }

    fn sync_peers(&mut self, resync: Resync) {
        let want = desired::peers(&self.table, self.subnet);
        match self.rec.set_peers(self.dp.maps(), &want, resync) {
            Ok(()) => self.retry.peers = false,
            Err(e) => {
                self.retry.peers = true;
                self.failed(anyhow!("writing peer maps: {e}"));
            }
        }
    }

    fn on_services(&mut self, update: StoreUpdate) {
        let t0 = Instant::now();
        let before = self.rec.writes();
        let snapshot = matches!(update, StoreUpdate::Snapshot(_));
        let changed = self.store.apply(update);
        self.since_compact += changed.len();
        for name in &changed {
            self.program_service(name);
        }
        let after = self.rec.writes();
        let m = crate::metrics::global();
        m.observe_apply(EventKind::Services, t0.elapsed());
        if snapshot {
            m.set_ready(ReadyPart::ServicesSynced, true);
        }
        let level = if changed.len() <= 10 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "services: {} changed, {} map updates, {} deletes, {:?}",
            changed.len(),
            after.updates - before.updates,
            after.deletes - before.deletes,
            t0.elapsed()
        );
    }

    /// Programs every known Service; returns how many there are.
    fn program_all_services(&mut self) -> usize {
        let names: Vec<ServiceName> = self.store.service_names().cloned().collect();
        for name in &names {
            self.program_service(name);
        }
        names.len()
    }

    /// Makes the maps hold exactly the frontends `name` has on this node.
    fn program_service(&mut self, name: &ServiceName) {
        let own = self.subnet;
        let mut fronts = self.store.frontends_for(name, &|ip| own.contains(&ip));
        if self.svc_guard.judge(&self.store, name, &mut fronts) == service_guard::Verdict::Keep {
            self.retry.services.remove(name);
            return;
        }
        let had = self.rec.owns_frontends(name);
        // This node's endpoints behind its externalTrafficPolicy Local
        // frontends, for the load balancers' health checks.
        let local: std::collections::BTreeSet<_> = fronts
            .values()
            .filter(|s| s.north_south == Some(crate::services::TrafficPolicy::Local))
            .flat_map(|s| s.backends.iter().map(|b| b.ip))
            .collect();
        self.health_checks.set(
            name,
            self.store
                .health_check_node_port(name)
                .filter(|_| !fronts.is_empty()),
            local.len(),
        );
        let (ready, total) = self.store.endpoint_counts(name);
        self.status.service(name, fronts.len(), ready, total);
        let want = desired::frontends(&fronts, self.attrs.public_ip);
        match self.rec.set_service(self.dp.maps(), name, &want) {
            Ok(()) => {
                self.retry.services.remove(name);
            }
            Err(e) => {
                self.retry.services.insert(name.clone());
                self.failed(anyhow!("service {name}: {e}"));
            }
        }
        if !fronts.is_empty() {
            let list: Vec<String> = fronts
                .iter()
                .map(|(f, s)| {
                    format!(
                        "{}:{}/{} -> {} backends",
                        f.ip,
                        f.port,
                        f.proto,
                        s.backends.len()
                    )
                })
                .collect();
            info!("service {name}: {}", list.join(", "));
        } else if had {
            info!("service {name}: removed");
        }
    }

    async fn on_lease(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Reacquired(new) => {
                if new.subnet != self.subnet {
                    error!(
                        "node subnet changed from {} to {}: pods on the old subnet lose connectivity",
                        self.subnet, new.subnet
                    );
                }
                self.subnet = new.subnet;
                self.own_subnet.send_replace(new.subnet);
                self.status.own_subnet(new.subnet);
                let m = crate::metrics::global();
                m.lease_held_until(std::time::SystemTime::now() + new.ttl);
                m.set_ready(ReadyPart::Lease, true);
                self.svc_guard.own_lease(new.subnet, self.attrs.public_ip);
                self.refresh_node().await;
                self.sync_peers(Resync::Incremental);
                // internalTrafficPolicy Local depends on which pods are ours.
                self.program_all_services();
            }
            LeaseEvent::Lost { subnet, reason } => {
                crate::metrics::global().lease_lost();
                info!("lease: lost {subnet}: {reason}");
            }
        }
    }

    /// subnet.env, the bridge and the node config for the current lease.
    async fn refresh_node(&mut self) {
        self.retry.node = true;
        if let Err(e) = self.subnet_env.ensure(self.subnet, self.mtu) {
            return self.failed(e);
        }
        let bridge = node::plumb_bridge(
            &self.nl,
            &self.cfg.bridge,
            self.subnet,
            self.net.network,
            self.mtu,
        )
        .await;
        match bridge {
            Ok(b) => self.bridge = b,
            Err(e) => return self.failed(e.context("plumbing the pod bridge")),
        }
        let host = hostnet::plumb(
            &self.nl,
            &self.cfg.host_device,
            self.subnet,
            self.net.network,
            self.mtu,
        )
        .await;
        match host {
            Ok(h) if h.ifindex == self.host.ifindex => self.host = h,
            Ok(h) => {
                // Recreated by someone: the program goes onto the new one.
                if let Err(e) = self.dp.attach_host(&h.name, h.ifindex) {
                    return self.failed(e.into());
                }
                self.host = h;
            }
            Err(e) => return self.failed(e),
        }
        let cfg = desired::node_config(&self.node_facts());
        if let Err(e) = self.rec.set_node(self.dp.maps(), &cfg) {
            return self.failed(e.into());
        }
        if let Err(e) = self.write_conflist() {
            return self.failed(e);
        }
        self.retry.node = false;
    }

    /// Writes the status record when due (`force`: at every tick, so its
    /// age tells a reader whether the agent still runs).
    fn write_status(&mut self, force: bool) {
        if !self.status.due(force) {
            return;
        }
        let node = crate::status::record::NodeRecord {
            subnet: self.subnet.to_string(),
            network: self.net.network.to_string(),
            public_ip: self.attrs.public_ip.to_string(),
            vtep_mac: format_mac(&self.attrs.vtep_mac),
            underlay: self.underlay.name.clone(),
            bridge: self.cfg.bridge.clone(),
            decap: format!("{:?}", self.decap).to_lowercase(),
            mtu: self.mtu,
        };
        let held = !crate::metrics::global()
            .missing()
            .contains(&ReadyPart::Lease);
        let rec = self.status.record(node, held, self.transient_errors);
        self.status.write(&rec);
    }

    async fn on_tick(&mut self) {
        if self.retry.node {
            self.refresh_node().await;
        }
        if self.retry.peers {
            self.sync_peers(Resync::Incremental);
        }
        for name in std::mem::take(&mut self.retry.services) {
            self.program_service(&name);
        }
        if let Err(e) = self.rec.remove_orphans(self.dp.maps()) {
            self.failed(anyhow!("removing what failed service writes left: {e}"));
        }
        self.sync_ports().await;
    }

    /// `from_pod` on exactly the bridge's ports; endpoints learnt on
    /// ports that are gone are forgotten first, and CNI pods whose device
    /// is gone too. Runs at every link notification, so a removed port's
    /// entries go at once, not at the next tick.
    async fn sync_ports(&mut self) {
        let links = match self.nl.links().await {
            Ok(l) => l,
            Err(e) => return self.failed(e.context("listing links")),
        };
        self.forget_gone_cni_pods(&links);
        let ports = netlink::ports_of(links, self.bridge.ifindex);
        let ifindexes: BTreeSet<u32> = ports.iter().map(|p| p.ifindex).collect();
        if let Err(e) = self.rec.prune_endpoints(self.dp.maps(), &ifindexes) {
            self.failed(anyhow!("forgetting endpoints of gone ports: {e}"));
        }
        let ports: Vec<(String, u32)> = ports.into_iter().map(|p| (p.name, p.ifindex)).collect();
        if let Err(e) = self.dp.sync_pod_ports(&ports) {
            self.failed(anyhow!("attaching to pod ports: {e}"));
        }
        if let Err(e) = self.dp.attach_bridge(&self.cfg.bridge, self.bridge.ifindex) {
            self.failed(anyhow!("attaching to the bridge: {e}"));
        }
    }
}

fn log_change(c: &PeerChange, own: Ipv4Net) {
    let subnet = match c {
        PeerChange::Added(n, _) | PeerChange::Removed(n, _) => *n,
        PeerChange::Changed { subnet, .. } => *subnet,
    };
    if subnet == own {
        return;
    }
    match c {
        PeerChange::Added(net, a) => info!(
            "peer added: {net} at {} ({})",
            a.public_ip,
            format_mac(&a.vtep_mac)
        ),
        PeerChange::Changed { subnet, new, .. } => info!(
            "peer changed: {subnet} at {} ({})",
            new.public_ip,
            format_mac(&new.vtep_mac)
        ),
        PeerChange::Removed(net, a) => info!("peer removed: {net} (was {})", a.public_ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_decap_is_xdp_on_physical_nics_and_tc_on_virtual_ones() {
        assert_eq!(DecapMode::Auto.resolve(None), Decap::Xdp);
        assert_eq!(DecapMode::Auto.resolve(Some("veth")), Decap::Tc);
        assert_eq!(DecapMode::Xdp.resolve(Some("veth")), Decap::Xdp);
        assert_eq!(DecapMode::Tc.resolve(None), Decap::Tc);
    }
}
