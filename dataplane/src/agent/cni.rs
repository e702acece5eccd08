//! Pods through CNI, the agent's side: the socket `dataplane-cni` talks to,
//! the registry behind it, the conflist a container runtime reads, and the
//! record that lets a restarted agent take its pods back.
//!
//! - Once the agent holds a lease and its programs are loaded, it binds
//!   `--cni-socket` and writes `10-dataplane.conflist` in `--cni-conf-dir`
//!   (rewritten when the lease's subnet or the MTU changes). It never
//!   writes the conflist without a lease.
//! - The socket's tasks hand every request to the event loop
//!   ([`Call`]), which owns the maps and the attachments: a registration
//!   goes through the reconciler (the pod's port guard, then its endpoint
//!   entry) and attaches `from_pod` to the pod's host-side device before
//!   `add` answers.
//! - Registrations are recorded in `<--cni-state-dir>/endpoints.json`
//!   (atomically, before the answer). At start the agent re-adopts every
//!   recorded pod whose device still exists and drops the others; a device
//!   that goes while the agent runs takes its registration with it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::Agent;
use crate::{
    cni::{
        device,
        netns::current_handle,
        proto::{Attachment, AttachmentKey, Endpoint, ErrorCode, PodDevice, ProtoError, Status},
        server::EndpointRegistry,
    },
    netlink::LinkInfo,
    reconcile::desired,
    subnet_env::write_atomic,
};

/// The conflist's file name: sorted first among the usual names, so a
/// runtime that takes the first file takes ours.
pub const CONFLIST_NAME: &str = "10-dataplane.conflist";
/// The network's name in the conflist (and host-local's directory under
/// its `dataDir`).
pub const NETWORK_NAME: &str = "dataplane";
/// The record of registrations, in the state directory.
const RECORD_NAME: &str = "endpoints.json";

/// `--pod-device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodDeviceArg {
    Veth,
    Netkit,
    /// netkit where the kernel has it, else veth (probed at start).
    Auto,
}

/// The agent's CNI flags.
#[derive(Clone, Debug)]
pub struct CniOptions {
    /// `--cni-conf-dir`: where the conflist goes.
    pub conf_dir: PathBuf,
    /// `--cni-socket`: the socket the plugin talks to.
    pub socket: PathBuf,
    /// `--cni-state-dir`: the record of registrations and host-local's
    /// `dataDir` (`ipam/`).
    pub state_dir: PathBuf,
    pub pod_device: PodDeviceArg,
}

/// Resolves `--pod-device auto` by creating (and deleting) a netkit pair.
pub(super) async fn resolve_pod_device(arg: PodDeviceArg) -> PodDevice {
    match arg {
        PodDeviceArg::Veth => PodDevice::Veth,
        PodDeviceArg::Netkit => PodDevice::Netkit,
        PodDeviceArg::Auto => {
            let probe = match current_handle() {
                Ok(nl) => device::netkit_available(&nl).await,
                Err(e) => Err(e),
            };
            match probe {
                Ok(true) => PodDevice::Netkit,
                Ok(false) => {
                    info!("--pod-device auto: this kernel has no netkit; pods get veth pairs");
                    PodDevice::Veth
                }
                Err(e) => {
                    warn!("--pod-device auto: probing for netkit failed ({e}); using veth");
                    PodDevice::Veth
                }
            }
        }
    }
}

/// The conflist for this node's lease: one plugin, `dataplane-cni`, with
/// host-local handing out the subnet (gateway: its first address).
pub fn conflist(
    socket: &Path,
    mtu: u32,
    device: PodDevice,
    subnet: Ipv4Net,
    state_dir: &Path,
) -> Value {
    let gateway = desired::gateway(subnet).addr();
    json!({
        "cniVersion": "1.1.0",
        "name": NETWORK_NAME,
        "plugins": [{
            "type": "dataplane-cni",
            "agentSocket": socket,
            "mtu": mtu,
            "podDevice": device,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet.trunc().to_string(), "gateway": gateway.to_string() }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": state_dir.join("ipam"),
            },
        }],
    })
}

/// The conflist file, written when what it says changes.
pub(super) struct ConflistFile {
    path: PathBuf,
    written: Option<Value>,
}

impl ConflistFile {
    pub(super) fn new(conf_dir: &Path) -> Self {
        Self {
            path: conf_dir.join(CONFLIST_NAME),
            written: None,
        }
    }

    /// Writes `conf` (temporary file and rename, mode 0644) unless it was
    /// the last thing written.
    pub(super) fn ensure(&mut self, conf: Value) -> anyhow::Result<()> {
        if self.written.as_ref() == Some(&conf) {
            return Ok(());
        }
        let mut text = serde_json::to_vec_pretty(&conf).context("encoding the conflist")?;
        text.push(b'\n');
        write_atomic(&self.path, &text, 0o644)
            .with_context(|| format!("writing {}", self.path.display()))?;
        info!("wrote {}", self.path.display());
        self.written = Some(conf);
        Ok(())
    }
}

/// What `endpoints.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    endpoints: Vec<Endpoint>,
}

/// The registrations, in memory and on disk.
pub(super) struct Registrations {
    record: PathBuf,
    by_key: BTreeMap<AttachmentKey, Endpoint>,
}

impl Registrations {
    pub(super) fn new(state_dir: &Path) -> Self {
        Self {
            record: state_dir.join(RECORD_NAME),
            by_key: BTreeMap::new(),
        }
    }

    /// What an earlier run recorded. A missing record is empty; an
    /// unreadable one is reported and set aside (`.bad`), so that the
    /// agent starts and pods are registered again by their next CHECK or
    /// re-creation rather than never.
    fn load(&self) -> Vec<Endpoint> {
        let bytes = match std::fs::read(&self.record) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                warn!(
                    "reading {}: {e}; starting without it",
                    self.record.display()
                );
                return Vec::new();
            }
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) => r.endpoints,
            Err(e) => {
                let bad = self.record.with_extension("json.bad");
                warn!(
                    "{} is not a valid record ({e}); moved to {}",
                    self.record.display(),
                    bad.display()
                );
                let _ = std::fs::rename(&self.record, &bad);
                Vec::new()
            }
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        let record = Record {
            endpoints: self.by_key.values().cloned().collect(),
        };
        let mut text = serde_json::to_vec_pretty(&record).context("encoding the record")?;
        text.push(b'\n');
        write_atomic(&self.record, &text, 0o600)
            .with_context(|| format!("writing {}", self.record.display()))
    }

    /// The keys registered with `ip`, other than `key`.
    fn others_with_ip(&self, key: &AttachmentKey, ip: Ipv4Addr) -> Vec<AttachmentKey> {
        self.by_key
            .iter()
            .filter(|(k, e)| *k != key && e.ip == ip)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn uses_ifindex(&self, ifindex: u32) -> bool {
        self.by_key.values().any(|e| e.host_ifindex == ifindex)
    }
}

/// A request from the socket, with where its answer goes.
pub(super) enum Call {
    Add(Endpoint, oneshot::Sender<Result<(), ProtoError>>),
    Del(AttachmentKey, oneshot::Sender<Result<(), ProtoError>>),
    Check(AttachmentKey, oneshot::Sender<Result<Endpoint, ProtoError>>),
    List(oneshot::Sender<Vec<Attachment>>),
    Status(oneshot::Sender<Status>),
}

/// The registry the socket serves: each request goes to the event loop.
pub(super) struct LoopRegistry {
    pub(super) tx: mpsc::Sender<Call>,
}

fn stopping() -> ProtoError {
    ProtoError::new(ErrorCode::NotReady, "the agent is shutting down")
}

impl LoopRegistry {
    async fn ask<T>(&self, call: impl FnOnce(oneshot::Sender<T>) -> Call) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(call(tx)).await.ok()?;
        rx.await.ok()
    }
}

impl EndpointRegistry for LoopRegistry {
    async fn add(&self, endpoint: Endpoint) -> Result<(), ProtoError> {
        self.ask(|tx| Call::Add(endpoint, tx))
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn del(&self, key: AttachmentKey) -> Result<(), ProtoError> {
        self.ask(|tx| Call::Del(key, tx))
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn check(&self, key: AttachmentKey) -> Result<Endpoint, ProtoError> {
        self.ask(|tx| Call::Check(key, tx))
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn list(&self) -> Result<Vec<Attachment>, ProtoError> {
        self.ask(Call::List).await.ok_or_else(stopping)
    }

    async fn status(&self) -> Status {
        self.ask(Call::Status).await.unwrap_or_else(|| Status {
            ready: false,
            reason: Some(stopping().msg),
        })
    }
}

fn internal(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::new(ErrorCode::Internal, e.to_string())
}

impl Agent {
    /// Answers one request of the CNI socket.
    pub(super) async fn on_cni(&mut self, call: Call) {
        match call {
            Call::Add(e, tx) => {
                let r = self.cni_add(e).await;
                let _ = tx.send(r);
            }
            Call::Del(k, tx) => {
                let r = self.cni_del(&k);
                let _ = tx.send(r);
            }
            Call::Check(k, tx) => {
                let r = self.cni.by_key.get(&k).cloned().ok_or_else(|| {
                    ProtoError::new(
                        ErrorCode::NotFound,
                        format!("{}/{} is not registered", k.container_id, k.ifname),
                    )
                });
                let _ = tx.send(r);
            }
            Call::List(tx) => {
                let list = self
                    .cni
                    .by_key
                    .values()
                    .map(|e| Attachment {
                        container_id: e.container_id.clone(),
                        ifname: e.ifname.clone(),
                        ip: e.ip,
                    })
                    .collect();
                let _ = tx.send(list);
            }
            Call::Status(tx) => {
                let reason = self
                    .retry
                    .node
                    .then(|| "the node configuration could not be written yet".to_string());
                let _ = tx.send(Status {
                    ready: reason.is_none(),
                    reason,
                });
            }
        }
    }

    /// `add`: checks the endpoint against this node, takes its address
    /// from any other registration (IPAM is the authority), writes the
    /// maps, attaches `from_pod`, records it. All or nothing.
    async fn cni_add(&mut self, e: Endpoint) -> Result<(), ProtoError> {
        let invalid = |msg: String| Err(ProtoError::new(ErrorCode::Invalid, msg));
        let gateway = desired::gateway(self.subnet).addr();
        if !self.subnet.contains(&e.ip) || e.ip == gateway || e.ip == self.subnet.network() {
            return invalid(format!(
                "{} is not a pod address of this node's subnet {}",
                e.ip, self.subnet
            ));
        }
        match self.nl.link_by_index(e.host_ifindex).await {
            Ok(Some(l)) if l.name == e.host_ifname => {}
            Ok(Some(l)) => {
                return invalid(format!(
                    "ifindex {} is {}, not {}",
                    e.host_ifindex, l.name, e.host_ifname
                ));
            }
            Ok(None) => {
                return invalid(format!(
                    "no device with ifindex {} ({}) on this node",
                    e.host_ifindex, e.host_ifname
                ));
            }
            Err(e) => return Err(internal(format!("{e:#}"))),
        }

        let key = e.key();
        let before = self.cni.by_key.clone();
        for other in self.cni.others_with_ip(&key, e.ip) {
            warn!(
                "{} moves from {}/{} (stale: its DEL did not reach us) to {}/{}",
                e.ip, other.container_id, other.ifname, key.container_id, key.ifname
            );
            self.cni.by_key.remove(&other);
        }
        self.cni.by_key.insert(key, e.clone());
        let done = self.apply_registrations(&before);
        if let Err(err) = &done {
            self.failed(anyhow::anyhow!("registering {}: {err}", e.ip));
            self.restore_registrations(before);
        } else {
            info!(
                "CNI pod {}/{} registered: {} on {} (ifindex {})",
                e.container_id, e.ifname, e.ip, e.host_ifname, e.host_ifindex
            );
        }
        done
    }

    /// `del`: detach, remove the entries, record. Unknown keys are done.
    fn cni_del(&mut self, key: &AttachmentKey) -> Result<(), ProtoError> {
        if !self.cni.by_key.contains_key(key) {
            return Ok(());
        }
        let before = self.cni.by_key.clone();
        let gone = self.cni.by_key.remove(key);
        let done = self.apply_registrations(&before);
        match (&done, gone) {
            (Err(err), _) => {
                self.failed(anyhow::anyhow!(
                    "deleting {}/{}: {err}",
                    key.container_id,
                    key.ifname
                ));
                self.restore_registrations(before);
            }
            (Ok(()), Some(e)) => info!(
                "CNI pod {}/{} deleted ({} on {})",
                e.container_id, e.ifname, e.ip, e.host_ifname
            ),
            (Ok(()), None) => {}
        }
        done
    }

    /// Makes the maps, the attachments and the record follow
    /// `self.cni.by_key`, which was `before`: detaches from devices no
    /// longer registered, writes the maps, attaches to new or changed
    /// devices, then saves the record.
    fn apply_registrations(
        &mut self,
        before: &BTreeMap<AttachmentKey, Endpoint>,
    ) -> Result<(), ProtoError> {
        for old in before.values() {
            let same = self.cni.by_key.get(&old.key()).is_some_and(|e| {
                e.host_ifindex == old.host_ifindex && e.host_ifname == old.host_ifname
            });
            if !same && !self.cni.uses_ifindex(old.host_ifindex) {
                self.dp.detach_cni_pod(old.host_ifindex).map_err(internal)?;
            }
        }
        let want = desired::pods(self.cni.by_key.values());
        self.rec.set_pods(self.dp.maps(), &want).map_err(internal)?;
        let new: Vec<Endpoint> = self
            .cni
            .by_key
            .values()
            .filter(|e| {
                before.get(&e.key()).is_none_or(|b| {
                    b.host_ifindex != e.host_ifindex || b.host_ifname != e.host_ifname
                })
            })
            .cloned()
            .collect();
        for e in new {
            self.dp
                .attach_cni_pod(e.host_ifindex, &e.host_ifname)
                .map_err(internal)?;
        }
        self.cni.save().map_err(|e| internal(format!("{e:#}")))
    }

    /// Goes back to the registrations `before` after a change failed half
    /// way (best effort: the maps are reconciled again at the next change).
    fn restore_registrations(&mut self, before: BTreeMap<AttachmentKey, Endpoint>) {
        let attempted = std::mem::replace(&mut self.cni.by_key, before);
        if let Err(e) = self.apply_registrations(&attempted) {
            self.failed(anyhow::anyhow!(
                "restoring the CNI registrations: {}",
                e.msg
            ));
        }
    }

    /// At start: the pods an earlier run registered whose device is still
    /// here are registered again (maps written, `from_pod` attached);
    /// entries of the others are removed.
    pub(super) async fn adopt_cni_pods(&mut self) -> anyhow::Result<()> {
        self.rec.adopt_pods(self.dp.maps())?;
        let links = self.nl.links().await.context("listing links")?;
        let mut kept = 0;
        for e in self.cni.load() {
            let here = links
                .iter()
                .any(|l| l.ifindex == e.host_ifindex && l.name == e.host_ifname);
            if here {
                self.cni.by_key.insert(e.key(), e);
                kept += 1;
            } else {
                info!(
                    "CNI pod {}/{} ({}): its device {} is gone; dropping it",
                    e.container_id, e.ifname, e.ip, e.host_ifname
                );
            }
        }
        self.apply_registrations(&BTreeMap::new())
            .map_err(|e| anyhow::anyhow!("re-registering CNI pods: {}", e.msg))?;
        if kept > 0 {
            info!("re-adopted {kept} CNI pods");
        }
        Ok(())
    }

    /// After a link change: registrations whose device is gone go (their
    /// entries would send traffic to a dead ifindex).
    pub(super) fn forget_gone_cni_pods(&mut self, links: &[LinkInfo]) {
        let gone: Vec<AttachmentKey> = self
            .cni
            .by_key
            .values()
            .filter(|e| !links.iter().any(|l| l.ifindex == e.host_ifindex))
            .map(Endpoint::key)
            .collect();
        if gone.is_empty() {
            return;
        }
        let before = self.cni.by_key.clone();
        for k in &gone {
            info!(
                "CNI pod {}/{}: its device is gone; forgetting it",
                k.container_id, k.ifname
            );
            self.cni.by_key.remove(k);
        }
        if let Err(e) = self.apply_registrations(&before) {
            self.failed(anyhow::anyhow!("forgetting CNI pods: {}", e.msg));
        }
    }

    /// The conflist for the current lease and MTU.
    pub(super) fn write_conflist(&mut self) -> anyhow::Result<()> {
        let conf = conflist(
            &self.cfg.cni.socket,
            self.mtu,
            self.pod_device,
            self.subnet,
            &self.cfg.cni.state_dir,
        );
        self.conflist.ensure(conf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_holds_the_lease() {
        let c = conflist(
            Path::new("/run/dataplane/cni.sock"),
            1450,
            PodDevice::Veth,
            "10.244.3.0/24".parse().unwrap(),
            Path::new("/var/lib/dataplane/cni"),
        );
        assert_eq!(
            c,
            json!({
                "cniVersion": "1.1.0",
                "name": "dataplane",
                "plugins": [{
                    "type": "dataplane-cni",
                    "agentSocket": "/run/dataplane/cni.sock",
                    "mtu": 1450,
                    "podDevice": "veth",
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": "10.244.3.0/24", "gateway": "10.244.3.1" }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": "/var/lib/dataplane/cni/ipam",
                    },
                }],
            })
        );
        // What the plugin reads out of it, as libcni hands it over.
        let mut net = c["plugins"][0].clone();
        net["cniVersion"] = c["cniVersion"].clone();
        net["name"] = c["name"].clone();
        let parsed = crate::cni::netconf::NetConf::parse(&serde_json::to_vec(&net).unwrap())
            .expect("the plugin accepts it");
        assert_eq!(parsed.mtu, Some(1450));
        assert_eq!(parsed.pod_device, PodDevice::Veth);
    }

    #[test]
    fn conflist_file_is_rewritten_only_on_change() {
        let dir = std::env::temp_dir().join(format!("dp-conflist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = ConflistFile::new(&dir.join("net.d"));
        let conf = |mtu| {
            conflist(
                Path::new("/s"),
                mtu,
                PodDevice::Veth,
                "10.244.3.0/24".parse().unwrap(),
                Path::new("/st"),
            )
        };
        f.ensure(conf(1450)).unwrap();
        let path = dir.join("net.d").join(CONFLIST_NAME);
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        f.ensure(conf(1450)).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            meta.ino(),
            "not rewritten"
        );
        f.ensure(conf(1400)).unwrap();
        let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back["plugins"][0]["mtu"], 1400);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn record_round_trip_and_a_bad_record_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("dp-cnirec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut r = Registrations::new(&dir);
        assert!(r.load().is_empty());
        let e = crate::cni::proto::tests::endpoint("a", [10, 244, 1, 5]);
        r.by_key.insert(e.key(), e.clone());
        r.save().unwrap();
        assert_eq!(Registrations::new(&dir).load(), vec![e]);
        std::fs::write(dir.join(RECORD_NAME), "{not json").unwrap();
        assert!(Registrations::new(&dir).load().is_empty());
        assert!(dir.join("endpoints.json.bad").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
