//! IPv4 forwarding (`net.ipv4.ip_forward`), the one host-wide setting the
//! agent changes: pods' traffic is routed through the node. Turning it on,
//! the agent records the value it found (once, per network namespace, in
//! [`LOCK_DIR`]), so `dataplane uninstall` can put it back. Settings on
//! the bridge (proxy ARP) go with the bridge.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use log::info;

use super::instance::LOCK_DIR;
use crate::netlink;

const SYSCTL: &str = "net/ipv4/ip_forward";
const PROC: &str = "/proc/sys/net/ipv4/ip_forward";

/// `<LOCK_DIR>/ip_forward-<netns inode>.orig`: the value before the
/// agent first set it, in this network namespace.
fn record(dir: &Path) -> io::Result<PathBuf> {
    let netns = fs::metadata("/proc/self/ns/net")?.ino();
    Ok(dir.join(format!("ip_forward-{netns}.orig")))
}

/// Turns forwarding on, recording the value found unless an earlier run
/// recorded one already (that run turned it on: what it found stays the
/// value to restore).
pub fn enable() -> anyhow::Result<()> {
    enable_in(Path::new(LOCK_DIR))
}

fn enable_in(dir: &Path) -> anyhow::Result<()> {
    let now = fs::read_to_string(PROC).with_context(|| format!("reading {PROC}"))?;
    let now = now.trim();
    if now == "1" {
        return Ok(());
    }
    let rec = record(dir).context("naming the record of ip_forward")?;
    if !rec.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(&rec, now).with_context(|| format!("writing {}", rec.display()))?;
    }
    netlink::set_sysctl(SYSCTL, "1")?;
    info!("net.ipv4.ip_forward turned on (was {now}; `dataplane uninstall` restores it)");
    Ok(())
}

/// Puts back the value the agent found, if it recorded one; returns it.
pub fn restore() -> anyhow::Result<Option<String>> {
    restore_in(Path::new(LOCK_DIR))
}

fn restore_in(dir: &Path) -> anyhow::Result<Option<String>> {
    let rec = record(dir).context("naming the record of ip_forward")?;
    let was = match fs::read_to_string(&rec) {
        Ok(v) => v.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", rec.display())),
    };
    anyhow::ensure!(
        was == "0" || was == "1",
        "{} holds {was:?}, not an ip_forward value",
        rec.display()
    );
    netlink::set_sysctl(SYSCTL, &was)?;
    fs::remove_file(&rec).with_context(|| format!("removing {}", rec.display()))?;
    Ok(Some(was))
}
