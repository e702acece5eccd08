//! The node agent: gets this node a subnet lease, plumbs the pod bridge,
//! loads and attaches the BPF programs, and keeps the peer map equal to the
//! leases in etcd until it is told to stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use dataplane_common::{Backend, NODE_CFG_READY, NodeConfig, PROTO_TCP, PROTO_UDP, SvcKey};
use ipnet::Ipv4Net;
use log::{error, info, warn};
use tokio::sync::{mpsc, watch};

use crate::{
    bpf::{Dataplane, DecapMode, FrontendState, Peer, fmt_mac},
    config::NetworkConfig,
    etcd::EtcdOptions,
    lease::{self, Lease, LeaseAttrs, LeaseEvent},
    netlink::{self, LinkInfo, Netlink},
    peers::{self, PeerChange, PeerTable, PeerUpdate, PeerWatchStats},
    services::{self, ServiceName, ServiceStore, StoreUpdate},
    subnet_env::{self, SubnetEnv},
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
    pub ip_masq: bool,
    /// etcd prefix of Services, Endpoints and EndpointSlices.
    pub service_prefix: String,
}

/// How long to wait between attempts when etcd or the network config is
/// not usable yet. The agent waits rather than exit-looping under a
/// supervisor.
const RETRY: Duration = Duration::from_secs(5);
/// Re-list bridge ports this often even without link events, in case a
/// notification was lost (netlink multicast can overflow).
const PORT_RESYNC: Duration = Duration::from_secs(10);
/// How long a clean shutdown may take before the agent exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until SIGINT/SIGTERM. The lease is deliberately not
/// revoked on exit: a restart must get the same subnet back.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received, shutting down (the lease is kept for the restart)");
        let _ = shutdown_tx.send(true);
        // A clean stop takes milliseconds. Never let an await that does
        // not watch for shutdown keep a stopped agent around: a supervisor
        // would wait on it forever. A second signal exits at once.
        std::thread::spawn(|| {
            std::thread::sleep(SHUTDOWN_GRACE);
            error!("clean shutdown took more than {SHUTDOWN_GRACE:?}; exiting");
            std::process::exit(1);
        });
        wait_for_signal().await;
        error!("second signal: exiting now");
        std::process::exit(1);
    });

    let nl = Netlink::new()?;
    let underlay = underlay_iface(&nl, cfg.iface.as_deref()).await?;
    let public_ip = match cfg.public_ip {
        Some(ip) => ip,
        None => nl
            .ipv4_addrs(underlay.ifindex)
            .await?
            .first()
            .map(|n| n.addr())
            .ok_or_else(|| anyhow!("{} has no IPv4 address; pass --public-ip", underlay.name))?,
    };
    info!(
        "underlay {} (ifindex {}, mtu {}), public IP {public_ip}",
        underlay.name, underlay.ifindex, underlay.mtu
    );

    let Some(mut client) = connect_etcd(&cfg.etcd, shutdown.clone()).await else {
        return Ok(());
    };
    let Some(net) = wait_for_config(&mut client, &cfg.prefix, shutdown.clone()).await else {
        return Ok(());
    };
    info!(
        "network {} subnets /{} from {} to {}, VXLAN VNI {} port {}",
        net.network,
        net.subnet_len,
        net.subnet_min,
        net.subnet_max,
        net.backend.vni,
        net.backend.port
    );

    let attrs = LeaseAttrs {
        public_ip,
        backend_type: "vxlan".into(),
        vni: net.backend.vni,
        vtep_mac: lease::vtep_mac_for(public_ip),
    };
    let hint = match subnet_env::read(&cfg.subnet_file) {
        Ok(env) => env.map(|e| e.subnet),
        Err(e) => {
            warn!("ignoring {}: {e:#}", cfg.subnet_file.display());
            None
        }
    };
    let Some(lease) = acquire_lease(&mut client, &cfg, &net, &attrs, hint, shutdown.clone()).await
    else {
        return Ok(());
    };
    let mtu = net.backend.mtu.unwrap_or(underlay.mtu.saturating_sub(50));

    netlink::set_sysctl("net/ipv4/ip_forward", "1")?;
    let mut dp = Dataplane::load(&cfg.pin_path)?;
    let mut bridge = plumb_node(&nl, &cfg, &net, &lease, mtu).await?;
    dp.set_node_config(&node_config(&net, &lease, &underlay, &bridge, &attrs))?;
    // Services are in the maps before any program is attached, so a
    // ClusterIP is never forwarded untranslated, not even at startup.
    // Entries an earlier run left are cleared first: their ids would
    // collide with the ones allocated now.
    dp.services().clear()?;
    let mut store = match services::list(&mut client, &cfg.service_prefix).await {
        Ok(s) => s,
        Err(e) => {
            error!(
                "listing services under {}: {e:#}; the watch will deliver them",
                cfg.service_prefix
            );
            ServiceStore::new()
        }
    };
    let mut programmed: BTreeMap<ServiceName, BTreeSet<SvcKey>> = BTreeMap::new();
    let names: Vec<ServiceName> = store.service_names().cloned().collect();
    for name in &names {
        program_service(&mut dp, &store, &mut programmed, name, lease.subnet);
    }
    info!(
        "{} services, {} frontends programmed",
        names.len(),
        dp.services().frontends()
    );

    let mode = cfg.decap_mode.resolve(underlay.kind.as_deref());
    dp.attach_underlay(&underlay.name, mode)?;
    // Subscribe before the first listing so no new pod falls in between.
    let mut links = netlink::link_events()?;
    let (svc_tx, mut svc_rx) = mpsc::channel::<StoreUpdate>(4096);
    tokio::spawn(services::watch_services(
        client.clone(),
        cfg.service_prefix.clone(),
        svc_tx,
        shutdown.clone(),
    ));
    sync_ports(&nl, &mut dp, bridge.ifindex).await;

    // Peers: etcd watch -> table -> maps.
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerUpdate>(1024);
    let watch_stats = Arc::new(PeerWatchStats::default());
    tokio::spawn(peers::watch_peers(
        client.clone(),
        cfg.prefix.clone(),
        peer_tx,
        watch_stats.clone(),
        shutdown.clone(),
    ));
    // Own lease: renewal and re-acquisition.
    let (lease_tx, mut lease_rx) = mpsc::channel::<LeaseEvent>(16);
    tokio::spawn(lease::keep(
        client.clone(),
        cfg.prefix.clone(),
        net.clone(),
        attrs.clone(),
        lease.clone(),
        cfg.renew_margin,
        lease_tx,
        shutdown.clone(),
    ));
    let mut port_tick = tokio::time::interval(PORT_RESYNC);

    let mut table = PeerTable::default();
    let mut own_subnet = lease.subnet;
    let mut shutdown_rx = shutdown.clone();
    info!(
        "agent ready: subnet {own_subnet}, VtepMAC {}",
        fmt_mac(&attrs.vtep_mac)
    );
    loop {
        tokio::select! {
            _ = shutdown_rx.changed() => break,
            Some(update) = peer_rx.recv() => {
                let full = matches!(update, PeerUpdate::Snapshot(_));
                for change in table.apply(update) {
                    log_change(&change, own_subnet);
                }
                let desired = desired_peers(&table, own_subnet);
                if let Err(e) = dp.sync_peers(&desired, full) {
                    error!("writing peer maps: {e:#}");
                }
            }
            Some(update) = svc_rx.recv() => {
                let t0 = std::time::Instant::now();
                let before = dp.services().writes();
                let changed = store.apply(update);
                for name in &changed {
                    program_service(&mut dp, &store, &mut programmed, name, own_subnet);
                }
                let after = dp.services().writes();
                let level = if changed.len() <= 10 { log::Level::Info } else { log::Level::Debug };
                log::log!(
                    level,
                    "services: {} changed, {} map updates, {} deletes, {:?}",
                    changed.len(),
                    after.updates - before.updates,
                    after.deletes - before.deletes,
                    t0.elapsed()
                );
            }
            Some(ev) = lease_rx.recv() => match ev {
                LeaseEvent::Reacquired(new) => {
                    if new.subnet != own_subnet {
                        error!("node subnet changed from {own_subnet} to {}: pods on the old subnet lose connectivity", new.subnet);
                    }
                    own_subnet = new.subnet;
                    write_subnet_env(&cfg, &net, &new, mtu)?;
                    bridge = plumb_node(&nl, &cfg, &net, &new, mtu).await?;
                    dp.set_node_config(&node_config(&net, &new, &underlay, &bridge, &attrs))?;
                    let desired = desired_peers(&table, own_subnet);
                    if let Err(e) = dp.sync_peers(&desired, false) {
                        error!("writing peer maps: {e:#}");
                    }
                    // internalTrafficPolicy Local depends on which pods are ours.
                    let names: Vec<ServiceName> = store.service_names().cloned().collect();
                    for name in &names {
                        program_service(&mut dp, &store, &mut programmed, name, own_subnet);
                    }
                }
                other => info!("lease: {other:?}"),
            },
            ev = links.recv() => {
                if ev.is_none() {
                    warn!("link notifications stopped; subscribing again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    links = netlink::link_events()?;
                }
                sync_ports(&nl, &mut dp, bridge.ifindex).await;
            }
            _ = port_tick.tick() => sync_ports(&nl, &mut dp, bridge.ifindex).await,
        }
    }
    info!("stopped");
    Ok(())
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
            fmt_mac(&a.vtep_mac)
        ),
        PeerChange::Changed { subnet, new, .. } => {
            info!(
                "peer changed: {subnet} at {} ({})",
                new.public_ip,
                fmt_mac(&new.vtep_mac)
            )
        }
        PeerChange::Removed(net, a) => info!("peer removed: {net} (was {})", a.public_ip),
    }
}

/// Makes the maps hold exactly the frontends `name` has on this node.
/// Costs map writes proportional to this one service.
fn program_service(
    dp: &mut Dataplane,
    store: &ServiceStore,
    programmed: &mut BTreeMap<ServiceName, BTreeSet<SvcKey>>,
    name: &ServiceName,
    own_subnet: Ipv4Net,
) {
    let fronts = store.frontends_for(name, &|ip| own_subnet.contains(&ip));
    let new_keys: BTreeSet<SvcKey> = fronts.keys().map(svc_key).collect();
    let old_keys = programmed.remove(name).unwrap_or_default();
    for k in old_keys.difference(&new_keys) {
        if let Err(e) = dp.services().remove_frontend(k) {
            error!("service {name}: removing a frontend: {e:#}");
        }
    }
    for (f, spec) in &fronts {
        let state = FrontendState {
            backends: spec
                .backends
                .iter()
                .map(|b| Backend {
                    ip: b.ip.octets(),
                    port: b.port.to_be_bytes(),
                    _pad: [0; 2],
                })
                .collect(),
            affinity_timeout_s: spec
                .affinity_timeout
                .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32),
        };
        if let Err(e) = dp.services().set_frontend(svc_key(f), &state) {
            error!(
                "service {name}: programming {}:{}/{}: {e:#}",
                f.ip, f.port, f.proto
            );
        }
    }
    if !fronts.is_empty() {
        info!(
            "service {name}: {}",
            fronts
                .iter()
                .map(|(f, s)| format!(
                    "{}:{}/{} -> {} backends",
                    f.ip,
                    f.port,
                    f.proto,
                    s.backends.len()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else if !old_keys.is_empty() {
        info!("service {name}: removed");
    }
    if !new_keys.is_empty() {
        programmed.insert(name.clone(), new_keys);
    }
}

fn svc_key(f: &services::Frontend) -> SvcKey {
    SvcKey {
        vip: f.ip.octets(),
        port: f.port.to_be_bytes(),
        proto: match f.proto {
            services::Proto::Tcp => PROTO_TCP,
            services::Proto::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

/// Peers to program: every vxlan lease but our own.
fn desired_peers(table: &PeerTable, own: Ipv4Net) -> BTreeMap<Ipv4Net, Peer> {
    table
        .iter()
        .filter(|(net, _)| **net != own)
        .filter(|(net, a)| {
            let ok = a.backend_type == "vxlan";
            if !ok {
                warn!(
                    "peer {net}: backend {} is not vxlan, not reachable from here",
                    a.backend_type
                );
            }
            ok
        })
        .map(|(net, a)| {
            (
                *net,
                Peer {
                    public_ip: a.public_ip,
                    vtep_mac: a.vtep_mac,
                },
            )
        })
        .collect()
}

async fn underlay_iface(nl: &Netlink, name: Option<&str>) -> anyhow::Result<LinkInfo> {
    match name {
        Some(n) => nl
            .link_by_name(n)
            .await?
            .ok_or_else(|| anyhow!("--iface {n}: no such interface")),
        None => nl.default_route_iface().await?.ok_or_else(|| {
            anyhow!("no IPv4 default route to pick the underlay interface from; pass --iface")
        }),
    }
}

async fn connect_etcd(
    opts: &EtcdOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Option<etcd_client::Client> {
    loop {
        match crate::etcd::connect(opts).await {
            Ok(c) => return Some(c),
            Err(e) => error!(
                "etcd {}: {e:#}; retrying in {RETRY:?}",
                opts.endpoints.join(",")
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// Reads `<prefix>/config` until it holds a valid network config. A
/// missing or invalid config is reported with the key and the field, and
/// the agent keeps waiting for an operator to fix it.
async fn wait_for_config(
    client: &mut etcd_client::Client,
    prefix: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Option<NetworkConfig> {
    loop {
        match crate::config::load(client, prefix).await {
            Ok(cfg) => return Some(cfg),
            Err(e) => error!("{e}; waiting for a valid config"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

async fn acquire_lease(
    client: &mut etcd_client::Client,
    cfg: &AgentConfig,
    net: &NetworkConfig,
    attrs: &LeaseAttrs,
    hint: Option<Ipv4Net>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Lease> {
    loop {
        match lease::acquire(client, &cfg.prefix, net, attrs, hint, cfg.lease_ttl).await {
            Ok(l) => {
                info!(
                    "leased {} (etcd lease {:x}, TTL {:?})",
                    l.subnet, l.lease_id, l.ttl
                );
                if let Err(e) = write_subnet_env(cfg, net, &l, net.backend.mtu.unwrap_or(0)) {
                    error!("{e:#}");
                }
                return Some(l);
            }
            Err(e) => error!("acquiring a subnet lease: {e}; retrying in {RETRY:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

fn write_subnet_env(
    cfg: &AgentConfig,
    net: &NetworkConfig,
    lease: &Lease,
    mtu: u32,
) -> anyhow::Result<()> {
    if mtu == 0 {
        // Written again once the MTU is known (see plumb_node).
        return Ok(());
    }
    let env = SubnetEnv {
        network: net.network,
        subnet: lease.subnet,
        mtu,
        ipmasq: cfg.ip_masq,
    };
    subnet_env::write(&cfg.subnet_file, &env)
        .with_context(|| format!("writing {}", cfg.subnet_file.display()))?;
    info!("wrote {}", cfg.subnet_file.display());
    Ok(())
}

/// What flannel + the CNI bridge plugin set up on a node: subnet.env, the
/// bridge holding the subnet's first address, forwarding on.
async fn plumb_node(
    nl: &Netlink,
    cfg: &AgentConfig,
    net: &NetworkConfig,
    lease: &Lease,
    mtu: u32,
) -> anyhow::Result<LinkInfo> {
    write_subnet_env(cfg, net, lease, mtu)?;
    let gw = gateway(lease.subnet);
    let mut br = nl.ensure_bridge(&cfg.bridge, gw, net.network, mtu).await?;
    // A fixed bridge MAC, derived from the gateway address: stable across
    // restarts and pod churn, so the data path can write it as the source
    // of frames it delivers straight into pods.
    let o = gw.addr().octets();
    let mac = [0x02, 0xdc, o[0], o[1], o[2], o[3]];
    if br.mac != mac {
        nl.set_link_mac(br.ifindex, mac).await?;
        br.mac = mac;
    }
    info!(
        "bridge {} has {gw}, mac {}, mtu {mtu}",
        cfg.bridge,
        fmt_mac(&mac)
    );
    Ok(br)
}

fn gateway(subnet: Ipv4Net) -> Ipv4Net {
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    Ipv4Net::new(first, subnet.prefix_len()).expect("prefix length from a valid subnet")
}

fn node_config(
    net: &NetworkConfig,
    lease: &Lease,
    underlay: &LinkInfo,
    bridge: &LinkInfo,
    attrs: &LeaseAttrs,
) -> NodeConfig {
    NodeConfig {
        flags: NODE_CFG_READY,
        vni: net.backend.vni,
        underlay_ifindex: underlay.ifindex,
        bridge_ifindex: bridge.ifindex,
        public_ip: attrs.public_ip.octets(),
        network: net.network.network().octets(),
        subnet: lease.subnet.network().octets(),
        gateway: gateway(lease.subnet).addr().octets(),
        network_prefix_len: net.network.prefix_len(),
        subnet_prefix_len: lease.subnet.prefix_len(),
        vxlan_port: net.backend.port,
        vtep_mac: attrs.vtep_mac,
        underlay_mac: underlay.mac,
        bridge_mac: bridge.mac,
        _pad: [0; 2],
    }
}

async fn sync_ports(nl: &Netlink, dp: &mut Dataplane, bridge_ifindex: u32) {
    match nl.bridge_ports(bridge_ifindex).await {
        Ok(ports) => {
            let ports: Vec<(String, u32)> =
                ports.into_iter().map(|p| (p.name, p.ifindex)).collect();
            if let Err(e) = dp.sync_pod_ports(&ports) {
                error!("attaching to pod ports: {e:#}");
            }
        }
        Err(e) => error!("listing bridge ports: {e:#}"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
