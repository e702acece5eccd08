//! Start-up: everything before the event loop ([`start`]), including the
//! waits that must not end the agent (etcd unreachable, no valid network
//! config yet, no subnet free yet: each retries until it succeeds or the
//! agent is told to stop), and stopping itself on SIGINT/SIGTERM.

use std::{sync::Arc, time::Duration};

use dataplane_common::VXLAN_OVERHEAD;
use ipnet::Ipv4Net;
use log::{error, info, warn};
use tokio::sync::{mpsc, watch};

use anyhow::Context as _;

use super::{Agent, AgentConfig, Events, Retry, cni, hostnet, node};
use crate::{
    bpf::{Dataplane, LoadOptions, MapOp},
    cni::server::AgentSocket,
    config::NetworkConfig,
    conntrack::{Sweeper, sweep},
    etcd::EtcdOptions,
    lease::{self, Lease, LeaseAttrs, LeaseEvent, format_mac},
    metrics::ReadyPart,
    netlink::{self, Netlink},
    peers::{self, OwnNode, PeerPolicy, PeerTable, PeerUpdate, PeerWatchStats},
    reconcile::{Reconciler, desired},
    services::{self, ServiceStore, StoreUpdate},
};

/// How long to wait between attempts when etcd or the network config is
/// not usable yet. The agent waits rather than exit-looping under a
/// supervisor.
const RETRY: Duration = Duration::from_secs(5);
/// How long a clean shutdown may take before the agent exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A receiver that turns true at the first SIGINT/SIGTERM. A second
/// signal, or a clean stop taking longer than [`SHUTDOWN_GRACE`], exits
/// the process: a supervisor must never wait on a stopped agent forever.
pub(super) fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received, shutting down (the lease is kept for the restart)");
        let _ = tx.send(true);
        std::thread::spawn(|| {
            std::thread::sleep(SHUTDOWN_GRACE);
            error!("clean shutdown took more than {SHUTDOWN_GRACE:?}; exiting");
            std::process::exit(1);
        });
        wait_for_signal().await;
        error!("second signal: exiting now");
        std::process::exit(1);
    });
    rx
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

/// Sleeps [`RETRY`]; false when told to stop meanwhile.
async fn wait_retry(shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RETRY) => true,
        _ = shutdown.changed() => false,
    }
}

pub(super) async fn connect_etcd(
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
        if !wait_retry(&mut shutdown).await {
            return None;
        }
    }
}

/// Reads `<prefix>/config` until it holds a valid network config. A
/// missing or invalid config is reported with the key and the field, and
/// the agent keeps waiting for an operator to fix it.
pub(super) async fn wait_for_config(
    client: &mut etcd_client::Client,
    prefix: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Option<NetworkConfig> {
    loop {
        match crate::config::load(client, prefix).await {
            Ok(cfg) => return Some(cfg),
            Err(e) => error!("{e}; waiting for a valid config"),
        }
        if !wait_retry(&mut shutdown).await {
            return None;
        }
    }
}

pub(super) async fn acquire_lease(
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
                return Some(l);
            }
            Err(e) => error!("acquiring a subnet lease: {e}; retrying in {RETRY:?}"),
        }
        if !wait_retry(&mut shutdown).await {
            return None;
        }
    }
}

/// Start-up, in order: underlay, etcd, network config, lease,
/// subnet.env, BPF load, bridge, node config, Services, attach, CNI pods
/// of an earlier run, CNI socket and conflist, watches.
/// `None` when told to stop while waiting.
pub(super) async fn start(
    cfg: AgentConfig,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<(Agent, Events)>> {
    let nl = Netlink::new()?;
    let underlay = node::underlay_iface(&nl, cfg.iface.as_deref()).await?;
    let public_ip = node::public_ip(&nl, &underlay, cfg.public_ip).await?;
    info!(
        "underlay {} (ifindex {}, mtu {}), public IP {public_ip}",
        underlay.name, underlay.ifindex, underlay.mtu
    );
    // A second agent with our pin path or PublicIP stops here.
    let instance = super::instance::claim_node(&cfg.pin_path, public_ip)?;
    // Metrics from the start: /healthz answers and /readyz says what is
    // still missing while the agent waits for etcd or a config.
    let metrics = crate::metrics::global();
    metrics.read_pins_at(cfg.pin_path.clone());
    if let Some(addr) = cfg.metrics_address {
        crate::metrics::http::serve(addr, shutdown.clone()).await?;
    }

    let Some(mut client) = connect_etcd(&cfg.etcd, shutdown.clone()).await else {
        return Ok(None);
    };
    let Some(net) = wait_for_config(&mut client, &cfg.prefix, shutdown.clone()).await else {
        return Ok(None);
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
    let hint = node::subnet_hint(&cfg.subnet_file);
    let Some(lease) = acquire_lease(&mut client, &cfg, &net, &attrs, hint, shutdown.clone()).await
    else {
        return Ok(None);
    };
    metrics.lease_held_until(std::time::SystemTime::now() + lease.ttl);
    metrics.set_ready(ReadyPart::Lease, true);
    let mtu = net
        .backend
        .mtu
        .unwrap_or(underlay.mtu.saturating_sub(VXLAN_OVERHEAD));
    let mut subnet_env =
        node::SubnetEnvFile::new(cfg.subnet_file.clone(), net.network, cfg.ip_masq);
    subnet_env.ensure(lease.subnet, mtu)?;

    super::forwarding::enable()?;
    super::nat_ports::reserve(cfg.nat_ports)?;
    let mut dp = Dataplane::load(&LoadOptions {
        pin_path: Some(&cfg.pin_path),
        bpf_log: cfg.bpf_log,
        ct_max: Some(cfg.ct.max),
    })?;
    if cfg.bpf_log
        && let Some(log) = dp.take_log()?
    {
        tokio::spawn(log.forward());
    }
    let bridge = node::plumb_bridge(&nl, &cfg.bridge, lease.subnet, net.network, mtu).await?;
    let host = hostnet::plumb(&nl, &cfg.host_device, lease.subnet, net.network, mtu).await?;
    let netns_cookie = hostnet::netns_cookie()?;
    let pod_device = cni::resolve_pod_device(cfg.cni.pod_device).await;
    let mut agent = Agent {
        cni: cni::Registrations::new(&cfg.cni.state_dir),
        conflist: cni::ConflistFile::new(&cfg.cni.conf_dir),
        pod_device,
        cni_server: None,
        ct_sweeper: None,
        _instance: instance,
        status: super::status::StatusWriter::new(cfg.pin_path.clone(), cfg.etcd.endpoints.clone()),
        since_compact: 0,
        decap: cfg.decap_mode.resolve(underlay.kind.as_deref()),
        nl,
        dp,
        rec: Reconciler::new(),
        subnet: lease.subnet,
        subnet_env,
        mtu,
        underlay,
        bridge,
        host,
        netns_cookie,
        table: PeerTable::default(),
        own_subnet: watch::channel(lease.subnet).0,
        store: ServiceStore::new(),
        svc_guard: {
            let mut g = super::service_guard::ServiceGuard::new(services::AddressGuard::new(
                services::AddressGuard::service_cidr_of(cfg.service_cidr, net.service_cidr),
                Some(net.network),
            ));
            g.own_lease(lease.subnet, public_ip);
            if let Some(r) = net.node_port_range {
                g.addresses.node_ports = r;
            }
            info!(
                "service CIDR {}, nodePort range {}",
                g.addresses.service_cidr, g.addresses.node_ports
            );
            g
        },
        health_checks: Default::default(),
        retry: Retry::default(),
        transient_errors: 0,
        cfg,
        net,
        attrs,
    };
    let node_cfg = desired::node_config(&agent.node_facts());
    agent.rec.set_node(agent.dp.maps(), &node_cfg)?;
    agent
        .dp
        .maps()
        .apply(&MapOp::CtConfig(agent.cfg.ct.timeouts))
        .context("writing the conntrack timeouts")?;
    let ct_table = agent.dp.maps().conntrack()?;
    // Services are in the maps before any program is attached, so a
    // ClusterIP is never forwarded untranslated, not even at start-up.
    // What an earlier run wrote is the current state: frontends keep their
    // ids, so established connections through them keep their backends.
    let adopted = agent.rec.adopt_services(agent.dp.maps())?;
    let listed = match services::list(&mut client, &agent.cfg.service_prefix).await {
        Ok(s) => Some(s),
        Err(e) => {
            error!(
                "listing services under {}: {e:#}; the watch will deliver them",
                agent.cfg.service_prefix
            );
            None
        }
    };
    let complete = listed.is_some();
    agent.store = listed.unwrap_or_else(ServiceStore::new);
    // The watch follows on from this listing instead of listing again:
    // two full listings are never held at once.
    let listed_at = complete.then(|| agent.store.revision());
    let names = agent.program_all_services();
    if complete {
        metrics.set_ready(ReadyPart::ServicesSynced, true);
        let removed = agent.rec.remove_unowned(agent.dp.maps())?;
        agent.rec.remove_orphans(agent.dp.maps())?;
        info!("{adopted} frontends adopted from the pinned maps, {removed} of them gone");
    } else if adopted > 0 {
        warn!(
            "{adopted} frontends adopted from the pinned maps are kept: without a listing of the Services, which are gone is unknown"
        );
    }
    info!(
        "{names} services, {} frontends programmed",
        agent.rec.frontends()
    );
    agent.compact(true);

    agent
        .dp
        .attach_underlay(&agent.underlay.name, agent.decap)?;
    // The node's own traffic: from_host on the host device, the socket
    // programs on the cgroup (the node config with this namespace's
    // cookie is written).
    agent.dp.attach_host(&agent.host.name, agent.host.ifindex)?;
    let cgroup = hostnet::cgroup_dir(&agent.cfg.cgroup_path)?;
    agent
        .dp
        .attach_sock(&cgroup)
        .with_context(|| format!("--cgroup-path {}", cgroup.display()))?;
    // Subscribe before the first listing so no new pod falls in between.
    let links = Some(netlink::link_events()?);
    // CNI pods of an earlier run first: pruning must know them.
    agent.adopt_cni_pods().await?;
    // The socket before the conflist: a runtime that reads the conflist
    // finds the agent.
    let socket = AgentSocket::bind(&agent.cfg.cni.socket)
        .await
        .with_context(|| format!("binding the CNI socket {}", agent.cfg.cni.socket.display()))?;
    let (cni_tx, cni_calls) = mpsc::channel::<cni::Call>(64);
    agent.cni_server = Some(tokio::spawn(
        socket.serve(Arc::new(cni::LoopRegistry { tx: cni_tx })),
    ));
    agent.write_conflist()?;
    info!(
        "CNI: socket {}, pod device {}",
        agent.cfg.cni.socket.display(),
        agent.pod_device
    );
    let (svc_tx, services) = mpsc::channel::<StoreUpdate>(4096);
    tokio::spawn(services::watch_services_after(
        client.clone(),
        agent.cfg.service_prefix.clone(),
        listed_at,
        svc_tx,
        shutdown.clone(),
    ));
    agent.sync_ports().await;
    // Everything this run attaches is attached: links an earlier run
    // pinned that nothing claimed (device gone, no longer wanted) go, and
    // no program reads the maps of an older layout any more.
    agent.dp.prune_links();
    agent.dp.finish_migration();
    metrics.set_ready(ReadyPart::Attached, true);
    agent.ct_sweeper = Some(sweep::spawn(
        Sweeper::new(ct_table, agent.cfg.ct.timeouts),
        agent.cfg.ct.sweep_interval,
        agent.cfg.pin_path.clone(),
        shutdown.clone(),
    ));
    info!(
        "conntrack: {} flows at most, swept every {:?}",
        agent.cfg.ct.max, agent.cfg.ct.sweep_interval
    );

    // Peers: etcd watch -> table -> maps.
    let (peer_tx, peers) = mpsc::channel::<PeerUpdate>(1024);
    let peer_policy = PeerPolicy {
        own: Some(OwnNode {
            public_ip: agent.attrs.public_ip,
            subnet: agent.own_subnet.subscribe(),
        }),
        ..PeerPolicy::for_network(&agent.net)
    };
    tokio::spawn(peers::watch_peers(
        client.clone(),
        agent.cfg.prefix.clone(),
        peer_policy,
        peer_tx,
        Arc::new(PeerWatchStats::default()),
        shutdown.clone(),
    ));
    // The network config: changes at run time are refused, logged as
    // errors (never silently ignored).
    tokio::spawn(crate::config::watch_config(
        client.clone(),
        agent.cfg.prefix.clone(),
        agent.net.clone(),
        shutdown.clone(),
    ));
    // Own lease: renewal and re-acquisition.
    let (lease_tx, leases) = mpsc::channel::<LeaseEvent>(16);
    tokio::spawn(lease::keep(
        client.clone(),
        agent.cfg.prefix.clone(),
        agent.net.clone(),
        agent.attrs.clone(),
        lease,
        agent.cfg.renew_margin,
        lease_tx,
        shutdown.clone(),
    ));

    info!(
        "agent ready: subnet {}, VtepMAC {}",
        agent.subnet,
        format_mac(&agent.attrs.vtep_mac)
    );
    Ok(Some((
        agent,
        Events {
            peers,
            services,
            leases,
            links,
            cni: cni_calls,
        },
    )))
}
