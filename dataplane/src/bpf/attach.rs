//! Attaching the programs: decapsulation on the underlay (TC ingress, plus
//! XDP in XDP mode) and masquerade on its egress (`to_underlay`),
//! `from_pod` on the ingress of every pod port: the bridge's ports (kept
//! equal to the bridge's list) and CNI pods' devices (attached and
//! detached one by one as pods are registered), and `to_pod` on the
//! egress of the bridge and of CNI pods' devices. TC programs are
//! attached as tcx links, XDP as an XDP link.
//!
//! With a pin path every link is pinned under `<pin-path>/links/`, named
//! after its role and the device's ifindex ([`LinkRole::pin_name`]), so it
//! stays attached while the agent is away (stopped, restarting, being
//! upgraded): the data path keeps running on the pinned maps. A starting
//! agent adopts the pins it finds: where it attaches a program and a pin
//! of that role and device exists, the pinned link gets the new program
//! atomically (`bpf_link_update`), so there is no moment without one. Pins
//! nothing claimed by the end of start-up (their device is gone, or the
//! agent no longer wants them) are removed ([`Attachments::prune`]), which
//! detaches what is still attached.
//!
//! Detaching a pinned link is removing its pin and closing the agent's
//! descriptor of it.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use dataplane_common::prog_names;
use log::{debug, info, warn};

/// The directory under the pin path that holds the pinned links.
pub const LINKS_DIR: &str = "links";

/// Where VXLAN is decapsulated on the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap {
    /// XDP on the underlay (native where the driver supports it); the TC
    /// program delivers what XDP decapsulated.
    Xdp,
    /// TC ingress on the underlay.
    Tc,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0} missing from the BPF object")]
    Missing(&'static str),
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{program} on {iface}: not a link that can be pinned ({source}); tcx needs Linux 6.6")]
    NotPinnable {
        program: &'static str,
        iface: String,
        #[source]
        source: LinkError,
    },
    #[error("pinning {program} on {iface} at {}: {source}", path.display())]
    Pin {
        program: &'static str,
        iface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("no device {0}")]
    NoDevice(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What a link is for; with the device's ifindex, its pin's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkRole {
    /// `from_underlay` on the underlay (tcx ingress).
    UnderlayTc,
    /// `decap_xdp` on the underlay.
    UnderlayXdp,
    /// `from_pod` on a bridge port (tcx ingress).
    PodPort,
    /// `from_pod` on a CNI pod's host-side device (tcx ingress).
    CniPod,
    /// `from_host` on the host overlay device (tcx egress).
    HostTc,
    /// One of the cgroup socket programs ([`prog_names::SOCK`]) on
    /// `--cgroup-path`; one link each, pinned under the program's name.
    Sock(&'static str),
    /// `to_underlay` on the underlay (tcx egress): masquerade.
    UnderlayEgress,
    /// `to_pod` on the bridge (tcx egress): what the host stack sends to
    /// bridge pods.
    BridgeEgress,
    /// `to_pod` on a CNI pod's host-side device (tcx egress).
    CniPodEgress,
}

impl LinkRole {
    const ALL: [LinkRole; 8] = [
        LinkRole::UnderlayTc,
        LinkRole::UnderlayXdp,
        LinkRole::PodPort,
        LinkRole::CniPod,
        LinkRole::HostTc,
        LinkRole::UnderlayEgress,
        LinkRole::BridgeEgress,
        LinkRole::CniPodEgress,
    ];

    fn prefix(self) -> &'static str {
        match self {
            LinkRole::UnderlayTc => "underlay_tc",
            LinkRole::UnderlayXdp => "underlay_xdp",
            LinkRole::PodPort => "pod_port",
            LinkRole::CniPod => "cni_pod",
            LinkRole::HostTc => "host_tc",
            LinkRole::Sock(name) => name,
            LinkRole::UnderlayEgress => "underlay_egress",
            LinkRole::BridgeEgress => "bridge_egress",
            LinkRole::CniPodEgress => "cni_pod_egress",
        }
    }

    pub(super) fn program(self) -> &'static str {
        match self {
            LinkRole::UnderlayTc => prog_names::FROM_UNDERLAY,
            LinkRole::UnderlayXdp => prog_names::DECAP_XDP,
            LinkRole::PodPort | LinkRole::CniPod => prog_names::FROM_POD,
            LinkRole::HostTc => prog_names::FROM_HOST,
            LinkRole::Sock(name) => name,
            LinkRole::UnderlayEgress => prog_names::TO_UNDERLAY,
            LinkRole::BridgeEgress | LinkRole::CniPodEgress => prog_names::TO_POD,
        }
    }

    /// The tcx hook of a TC role (XDP and cgroup roles have none).
    fn tc_hook(self) -> TcAttachType {
        match self {
            LinkRole::HostTc
            | LinkRole::UnderlayEgress
            | LinkRole::BridgeEgress
            | LinkRole::CniPodEgress => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }

    /// The hook, as `dataplane status` prints it.
    pub(super) fn hook(self) -> &'static str {
        match self {
            LinkRole::UnderlayXdp => "xdp",
            LinkRole::Sock(_) => "cgroup",
            _ => match self.tc_hook() {
                TcAttachType::Egress => "tcx egress",
                _ => "tcx ingress",
            },
        }
    }

    /// `<role>_<ifindex>`, e.g. `pod_port_12`; a socket program's link
    /// (no device) is pinned under the program's name.
    pub fn pin_name(self, ifindex: u32) -> String {
        match self {
            LinkRole::Sock(name) => name.to_owned(),
            _ => format!("{}_{ifindex}", self.prefix()),
        }
    }

    /// The role and ifindex a pin's name stands for (0 for a socket
    /// program's).
    pub fn parse(name: &str) -> Option<(LinkRole, u32)> {
        if let Some(p) = prog_names::SOCK.iter().find(|p| **p == name) {
            return Some((LinkRole::Sock(p), 0));
        }
        LinkRole::ALL.into_iter().find_map(|r| {
            let idx = name.strip_prefix(r.prefix())?.strip_prefix('_')?;
            Some((r, idx.parse().ok()?))
        })
    }
}

/// A link the agent holds, pinned when there is a pin path. Dropping it
/// closes the agent's descriptor only: a pinned link stays attached.
struct Held {
    link: FdLink,
    pin: Option<PathBuf>,
}

impl Held {
    /// Detaches: the pin goes, then the last descriptor.
    fn detach(self) {
        if let Some(p) = &self.pin
            && let Err(e) = fs::remove_file(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!("removing link pin {}: {e}", p.display());
        }
        drop(self.link);
    }
}

/// What is attached where.
#[derive(Default)]
pub(super) struct Attachments {
    /// `<pin-path>/links`, when pinning.
    links_dir: Option<PathBuf>,
    /// Pins found at load that no attachment has claimed yet.
    found: BTreeMap<String, PathBuf>,
    /// Bridge ports by name (with the ifindex attached to).
    pod_links: HashMap<String, (u32, Held)>,
    /// CNI pods' host-side devices, by ifindex (with the name attached to).
    cni_links: HashMap<u32, (String, Held)>,
    /// `to_pod` on CNI pods' host-side devices, by ifindex.
    cni_egress: HashMap<u32, Held>,
    /// `to_pod` on the bridge, with its ifindex.
    bridge: Option<(u32, Held)>,
    underlay: Option<Underlay>,
    /// `from_host` on the host overlay device (with its ifindex).
    host: Option<(u32, Held)>,
    /// The cgroup socket programs.
    sock: Vec<Held>,
}

struct Underlay {
    iface: String,
    tc: Held,
    xdp: Option<Held>,
    /// `to_underlay` (masquerade).
    egress: Held,
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, AttachError> {
    ebpf.program_mut(name)
        .ok_or(AttachError::Missing(name))?
        .try_into()
        .map_err(|source| AttachError::Program {
            program: name,
            source,
        })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, AttachError> {
    let name = prog_names::DECAP_XDP;
    ebpf.program_mut(name)
        .ok_or(AttachError::Missing(name))?
        .try_into()
        .map_err(|source| AttachError::Program {
            program: name,
            source,
        })
}

/// The ifindex of device `name`.
fn ifindex(name: &str) -> Result<u32, AttachError> {
    let c = std::ffi::CString::new(name).map_err(|_| AttachError::NoDevice(name.to_owned()))?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(AttachError::NoDevice(name.to_owned())),
        i => Ok(i),
    }
}

/// The link files in `dir` (none when it does not exist).
pub(super) fn list_pins(dir: &Path) -> Result<BTreeMap<String, PathBuf>, AttachError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(AttachError::Io {
                what: "listing",
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut out = BTreeMap::new();
    for e in entries.flatten() {
        if let Some(name) = e.file_name().to_str() {
            out.insert(name.to_owned(), e.path());
        }
    }
    Ok(out)
}

/// A program's way of making and taking links, for [`attach`].
trait LinkProgram {
    type Link: TryFrom<FdLink, Error = LinkError> + TryInto<FdLink, Error = LinkError>;
    fn attach_new(&mut self, iface: &str, role: LinkRole) -> Result<Self::Link, ProgramError>;
    fn replace(&mut self, link: Self::Link) -> Result<Self::Link, ProgramError>;
}

impl LinkProgram for SchedClassifier {
    type Link = SchedClassifierLink;
    fn attach_new(&mut self, iface: &str, role: LinkRole) -> Result<Self::Link, ProgramError> {
        let id = self.attach(iface, role.tc_hook())?;
        self.take_link(id)
    }
    fn replace(&mut self, link: Self::Link) -> Result<Self::Link, ProgramError> {
        let id = self.attach_to_link(link)?;
        self.take_link(id)
    }
}

impl LinkProgram for Xdp {
    type Link = XdpLink;
    fn attach_new(&mut self, iface: &str, _role: LinkRole) -> Result<Self::Link, ProgramError> {
        let id = self.attach(iface, XdpMode::Default)?;
        self.take_link(id)
    }
    fn replace(&mut self, link: Self::Link) -> Result<Self::Link, ProgramError> {
        let id = self.attach_to_link(link)?;
        self.take_link(id)
    }
}

/// Replaces the program of the link pinned at `pin` with `prog`, in one
/// step (`bpf_link_update`). Fails when the link's device is gone (the
/// kernel detached it) or the pin is not a link of this kind.
fn adopt<P: LinkProgram>(prog: &mut P, pin: &Path) -> Result<FdLink, String> {
    let fd: FdLink = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?.into();
    let link = P::Link::try_from(fd).map_err(|e| e.to_string())?;
    let link = prog.replace(link).map_err(|e| e.to_string())?;
    link.try_into().map_err(|e: LinkError| e.to_string())
}

impl Attachments {
    /// Attachments pinned under `<pin_path>/links` (created), adopting the
    /// links pinned there by an earlier run; `None`: nothing is pinned and
    /// everything is detached with the object.
    pub(super) fn new(pin_path: Option<&Path>) -> Result<Self, AttachError> {
        let Some(pin_path) = pin_path else {
            return Ok(Self::default());
        };
        let dir = pin_path.join(LINKS_DIR);
        fs::create_dir_all(&dir).map_err(|source| AttachError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let found = list_pins(&dir)?;
        if !found.is_empty() {
            info!(
                "{} pinned links of an earlier run under {}",
                found.len(),
                dir.display()
            );
        }
        Ok(Self {
            links_dir: Some(dir),
            found,
            ..Self::default()
        })
    }

    /// `prog` attached to `iface` for `role`: the pinned link of that role
    /// and device gets the program if there is one, else a new link is
    /// made (and pinned).
    fn attach<P: LinkProgram>(
        &mut self,
        prog: &mut P,
        role: LinkRole,
        iface: &str,
        ifindex: u32,
    ) -> Result<Held, AttachError> {
        let program = role.program();
        let pin = self
            .links_dir
            .as_ref()
            .map(|d| d.join(role.pin_name(ifindex)));
        let mut stale = None;
        if let Some(pin) = &pin
            && (self.found.remove(&role.pin_name(ifindex)).is_some() || pin.exists())
        {
            match adopt(prog, pin) {
                Ok(link) => {
                    info!("{program} on {iface}: replaced the program of the pinned link");
                    return Ok(Held {
                        link,
                        pin: Some(pin.clone()),
                    });
                }
                Err(e) => {
                    info!(
                        "{program} on {iface}: the pinned link {} is not usable ({e}); attaching anew",
                        pin.display()
                    );
                    stale = Some(pin.clone());
                }
            }
        }
        let unpin = |p: &Path| {
            if let Err(e) = fs::remove_file(p)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!("removing link pin {}: {e}", p.display());
            }
        };
        // XDP takes one link per device: an old one still attached has to
        // go first. A tcx link goes after the new one is attached.
        if role == LinkRole::UnderlayXdp
            && let Some(p) = stale.take()
        {
            unpin(&p);
        }
        let attach_err = |source| AttachError::Attach {
            program,
            iface: iface.to_owned(),
            source,
        };
        let link = prog.attach_new(iface, role).map_err(attach_err)?;
        let link: FdLink = link.try_into().map_err(|source| AttachError::NotPinnable {
            program,
            iface: iface.to_owned(),
            source,
        })?;
        if let Some(p) = stale {
            unpin(&p);
        }
        let Some(pin) = pin else {
            return Ok(Held { link, pin: None });
        };
        let pinned = link.pin(&pin).map_err(|source| AttachError::Pin {
            program,
            iface: iface.to_owned(),
            path: pin.clone(),
            source,
        })?;
        Ok(Held {
            link: pinned.into(),
            pin: Some(pin),
        })
    }

    /// Removes the pins found at load that nothing claimed since: links of
    /// devices that are gone, or that this run does not attach to. Removing
    /// the pin detaches a link still attached. Returns how many went.
    pub(super) fn prune(&mut self) -> usize {
        let found = std::mem::take(&mut self.found);
        let mut n = 0;
        for (name, path) in found {
            if !path.exists() {
                continue; // claimed and replaced meanwhile
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    n += 1;
                    info!("removed the pinned link {name} (not wanted by this run)");
                }
                Err(e) => warn!("removing the pinned link {}: {e}", path.display()),
            }
        }
        n
    }

    /// Attaches decapsulation to the underlay interface: always the TC
    /// program (it decapsulates in TC mode and delivers XDP-decapsulated
    /// frames in XDP mode), plus the XDP program in XDP mode. Attaching
    /// again first detaches what an earlier call attached.
    pub(super) fn attach_underlay(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        mode: Decap,
    ) -> Result<(), AttachError> {
        if let Some(old) = self.underlay.take() {
            old.tc.detach();
            old.egress.detach();
            if let Some(x) = old.xdp {
                x.detach();
            }
            info!("decapsulation detached from {}", old.iface);
        }
        let idx = ifindex(iface)?;
        let tc = self.attach(
            classifier(ebpf, prog_names::FROM_UNDERLAY)?,
            LinkRole::UnderlayTc,
            iface,
            idx,
        )?;
        let xdp = match mode {
            Decap::Xdp => {
                Some(self.attach(xdp_program(ebpf)?, LinkRole::UnderlayXdp, iface, idx)?)
            }
            Decap::Tc => None,
        };
        let egress = self.attach(
            classifier(ebpf, prog_names::TO_UNDERLAY)?,
            LinkRole::UnderlayEgress,
            iface,
            idx,
        )?;
        info!("decapsulation attached to {iface} ({mode:?} mode), masquerade on its egress");
        self.underlay = Some(Underlay {
            iface: iface.to_owned(),
            tc,
            xdp,
            egress,
        });
        Ok(())
    }

    /// Attaches `to_pod` to the bridge's egress (what the host stack sends
    /// to bridge pods), unless it is attached to this ifindex already.
    pub(super) fn attach_bridge(
        &mut self,
        ebpf: &mut Ebpf,
        name: &str,
        ifindex: u32,
    ) -> Result<(), AttachError> {
        if self.bridge.as_ref().is_some_and(|(i, _)| *i == ifindex) {
            return Ok(());
        }
        if let Some((_, old)) = self.bridge.take() {
            old.detach();
        }
        let prog = classifier(ebpf, prog_names::TO_POD)?;
        let held = self.attach(prog, LinkRole::BridgeEgress, name, ifindex)?;
        self.bridge = Some((ifindex, held));
        info!("attached {} to {name} (egress)", prog_names::TO_POD);
        Ok(())
    }

    /// Makes the set of pod interfaces with `from_pod` attached equal
    /// `ports` (the bridge's, by name and ifindex). New ports get the
    /// program; links of vanished ports are dropped with their pins (the
    /// kernel detached them with the device). Returns how many were
    /// attached.
    pub(super) fn sync_pod_ports(
        &mut self,
        ebpf: &mut Ebpf,
        ports: &[(String, u32)],
    ) -> Result<usize, AttachError> {
        let gone: Vec<String> = self
            .pod_links
            .iter()
            .filter(|(n, (idx, _))| !ports.iter().any(|(pn, pi)| pn == *n && pi == idx))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some((_, held)) = self.pod_links.remove(&name) {
                held.detach();
                debug!("pod port {name} gone");
            }
        }
        let mut attached = 0;
        for (name, idx) in ports {
            if self.pod_links.contains_key(name) {
                continue;
            }
            let prog = classifier(ebpf, prog_names::FROM_POD)?;
            match self.attach(prog, LinkRole::PodPort, name, *idx) {
                Ok(held) => {
                    self.pod_links.insert(name.clone(), (*idx, held));
                    attached += 1;
                    info!("attached {} to pod port {name}", prog_names::FROM_POD);
                }
                // The port may vanish between listing and attaching.
                Err(e) => warn!("{e}"),
            }
        }
        Ok(attached)
    }

    /// Attaches `from_pod` to a CNI pod's host-side device `name`
    /// (ifindex `ifindex`), replacing what an earlier call attached there.
    pub(super) fn attach_cni_pod(
        &mut self,
        ebpf: &mut Ebpf,
        ifindex: u32,
        name: &str,
    ) -> Result<(), AttachError> {
        let prog = classifier(ebpf, prog_names::FROM_POD)?;
        // The same device again: its link gets the program in place.
        let old = self.cni_links.remove(&ifindex);
        if let Some((old_name, held)) = old {
            if old_name == name {
                // Keep the pin for `attach` to adopt.
                drop(held.link);
            } else {
                held.detach();
                debug!("{} detached from {old_name}", prog_names::FROM_POD);
            }
        }
        let held = self.attach(prog, LinkRole::CniPod, name, ifindex)?;
        self.cni_links.insert(ifindex, (name.to_owned(), held));
        if let Some(old) = self.cni_egress.remove(&ifindex) {
            // Its pin stays for `attach` to adopt.
            drop(old.link);
        }
        let prog = classifier(ebpf, prog_names::TO_POD)?;
        let egress = self.attach(prog, LinkRole::CniPodEgress, name, ifindex)?;
        self.cni_egress.insert(ifindex, egress);
        info!(
            "attached {} and {} to CNI pod device {name}",
            prog_names::FROM_POD,
            prog_names::TO_POD
        );
        Ok(())
    }

    /// Detaches `from_pod` from a CNI pod's device, if attached; a device
    /// that is gone took the attachment with it (its pin goes here).
    pub(super) fn detach_cni_pod(&mut self, ifindex: u32) {
        if let Some(held) = self.cni_egress.remove(&ifindex) {
            held.detach();
        }
        if let Some((name, held)) = self.cni_links.remove(&ifindex) {
            held.detach();
            info!(
                "detached {} from CNI pod device {name}",
                prog_names::FROM_POD
            );
        }
    }
    /// Attaches `from_host` to the egress of the host overlay device.
    pub(super) fn attach_host(
        &mut self,
        ebpf: &mut Ebpf,
        iface: &str,
        ifindex: u32,
    ) -> Result<(), AttachError> {
        match self.host.take() {
            // The same device: keep the pin for `attach` to adopt.
            Some((idx, old)) if idx == ifindex => drop(old.link),
            // A device made anew: the old one's link goes with its pin.
            Some((_, old)) => old.detach(),
            None => {}
        }
        let prog = classifier(ebpf, prog_names::FROM_HOST)?;
        let held = self.attach(prog, LinkRole::HostTc, iface, ifindex)?;
        info!("attached {} to {iface} (egress)", prog_names::FROM_HOST);
        self.host = Some((ifindex, held));
        Ok(())
    }

    /// Attaches the cgroup socket programs to the cgroup v2 directory
    /// `cgroup`, as multi-attach links (other agents' and tools' programs
    /// there stay). An earlier run's link is replaced without a gap: the
    /// new link is attached and pinned beside it, then renamed over its
    /// pin, which detaches it (meanwhile both run, which is harmless: the
    /// second sees a backend, or a ClusterIP it has no entry for).
    pub(super) fn attach_sock(
        &mut self,
        ebpf: &mut Ebpf,
        cgroup: &Path,
    ) -> Result<(), AttachError> {
        let cg = fs::File::open(cgroup).map_err(|source| AttachError::Io {
            what: "opening the cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        let iface = cgroup.display().to_string();
        // Pins of this run's earlier links are replaced below.
        self.sock.clear();
        for name in prog_names::SOCK {
            let role = LinkRole::Sock(name);
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(AttachError::Missing(name))?
                .try_into()
                .map_err(|source| AttachError::Program {
                    program: name,
                    source,
                })?;
            let attach_err = |source| AttachError::Attach {
                program: name,
                iface: iface.clone(),
                source,
            };
            // A cgroup bpf_link always attaches with multi-attach
            // semantics (BPF_F_ALLOW_MULTI) and takes no flags: the
            // kernel refuses any (EINVAL), so the mode passed is the
            // zero one.
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let link: FdLink = link.try_into().map_err(|source| AttachError::NotPinnable {
                program: name,
                iface: iface.clone(),
                source,
            })?;
            let Some(dir) = &self.links_dir else {
                self.sock.push(Held { link, pin: None });
                continue;
            };
            let pin = dir.join(role.pin_name(0));
            self.found.remove(&role.pin_name(0));
            // bpffs refuses names with a dot.
            let tmp = dir.join(format!("{}_new", role.pin_name(0)));
            let _ = fs::remove_file(&tmp);
            let pinned = link.pin(&tmp).map_err(|source| AttachError::Pin {
                program: name,
                iface: iface.clone(),
                path: tmp.clone(),
                source,
            })?;
            fs::rename(&tmp, &pin).map_err(|source| AttachError::Io {
                what: "renaming the link pin",
                path: tmp.clone(),
                source,
            })?;
            self.sock.push(Held {
                link: pinned.into(),
                pin: Some(pin),
            });
        }
        info!("attached the socket programs to the cgroup {iface}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_for_every_role() {
        for (role, idx) in [
            (LinkRole::UnderlayTc, 2),
            (LinkRole::UnderlayXdp, 2),
            (LinkRole::PodPort, 12),
            (LinkRole::CniPod, 7),
            (LinkRole::HostTc, 4),
        ] {
            assert_eq!(LinkRole::parse(&role.pin_name(idx)), Some((role, idx)));
        }
        for name in prog_names::SOCK {
            let role = LinkRole::Sock(name);
            assert_eq!(role.pin_name(0), *name);
            assert_eq!(LinkRole::parse(name), Some((role, 0)));
            assert_eq!(role.program(), *name);
            assert_eq!(role.hook(), "cgroup");
        }
        assert_eq!(LinkRole::HostTc.hook(), "tcx egress");
        // A socket link's pin being replaced is nobody's.
        assert_eq!(LinkRole::parse("sock_connect4_new"), None);
        assert_eq!(LinkRole::parse("host_tc_x"), None);
    }
}
