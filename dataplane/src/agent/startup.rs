//! Start-up waits that must not end the agent: etcd unreachable, no valid
//! network config yet, no subnet free yet. Each retries until it succeeds
//! or the agent is told to stop; and stopping itself, on SIGINT/SIGTERM.

use std::time::Duration;

use ipnet::Ipv4Net;
use log::{error, info};
use tokio::sync::watch;

use super::AgentConfig;
use crate::{
    config::NetworkConfig,
    etcd::EtcdOptions,
    lease::{self, Lease, LeaseAttrs},
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
