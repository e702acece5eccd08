//! Attaching the programs: decapsulation on the underlay (TC ingress, plus
//! XDP in XDP mode) and `from_pod` on the ingress of every pod port: the
//! bridge's ports (kept equal to the bridge's list) and CNI pods' devices
//! (attached and detached one by one as pods are registered). On this
//! kernel aya attaches TC programs as tcx links.

use std::collections::HashMap;

use aya::{
    Ebpf,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use dataplane_common::prog_names;
use log::{debug, info, warn};

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
}

/// What is attached where; dropping it (with the object) detaches.
#[derive(Default)]
pub(super) struct Attachments {
    pod_links: HashMap<String, SchedClassifierLinkId>,
    /// CNI pods' host-side devices, by ifindex (with the name attached to).
    cni_links: HashMap<u32, (String, SchedClassifierLinkId)>,
    underlay: Option<Underlay>,
}

struct Underlay {
    iface: String,
    tc: SchedClassifierLinkId,
    xdp: Option<XdpLinkId>,
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

impl Attachments {
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
            let _ = classifier(ebpf, prog_names::FROM_UNDERLAY)?.detach(old.tc);
            if let Some(x) = old.xdp {
                let _ = xdp_program(ebpf)?.detach(x);
            }
            info!("decapsulation detached from {}", old.iface);
        }
        let attach_err = |program| {
            let iface = iface.to_owned();
            move |source| AttachError::Attach {
                program,
                iface,
                source,
            }
        };
        let tc = classifier(ebpf, prog_names::FROM_UNDERLAY)?
            .attach(iface, TcAttachType::Ingress)
            .map_err(attach_err(prog_names::FROM_UNDERLAY))?;
        let xdp = match mode {
            Decap::Xdp => Some(
                xdp_program(ebpf)?
                    .attach(iface, XdpMode::Default)
                    .map_err(attach_err(prog_names::DECAP_XDP))?,
            ),
            Decap::Tc => None,
        };
        info!("decapsulation attached to {iface} ({mode:?} mode)");
        self.underlay = Some(Underlay {
            iface: iface.to_owned(),
            tc,
            xdp,
        });
        Ok(())
    }

    /// Makes the set of pod interfaces with `from_pod` attached equal
    /// `ifaces` (the bridge's ports). New ports get the program; links of
    /// vanished ports are forgotten (the kernel detached them with the
    /// device). Returns how many were attached.
    pub(super) fn sync_pod_ports(
        &mut self,
        ebpf: &mut Ebpf,
        ifaces: &[String],
    ) -> Result<usize, AttachError> {
        let prog = classifier(ebpf, prog_names::FROM_POD)?;
        let gone: Vec<String> = self
            .pod_links
            .keys()
            .filter(|n| !ifaces.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(id) = self.pod_links.remove(&name) {
                // The device is gone and took the attachment with it;
                // dropping the link object just releases our fd.
                let _ = prog.take_link(id);
                debug!("pod port {name} gone");
            }
        }
        let mut attached = 0;
        for name in ifaces {
            if self.pod_links.contains_key(name) {
                continue;
            }
            match prog.attach(name, TcAttachType::Ingress) {
                Ok(id) => {
                    self.pod_links.insert(name.clone(), id);
                    attached += 1;
                    info!("attached {} to pod port {name}", prog_names::FROM_POD);
                }
                // The port may vanish between listing and attaching.
                Err(e) => warn!("attaching {} to {name}: {e}", prog_names::FROM_POD),
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
        if let Some((old, id)) = self.cni_links.remove(&ifindex) {
            let _ = prog.detach(id);
            debug!("{} detached from {old}", prog_names::FROM_POD);
        }
        let id =
            prog.attach(name, TcAttachType::Ingress)
                .map_err(|source| AttachError::Attach {
                    program: prog_names::FROM_POD,
                    iface: name.to_owned(),
                    source,
                })?;
        self.cni_links.insert(ifindex, (name.to_owned(), id));
        info!("attached {} to CNI pod device {name}", prog_names::FROM_POD);
        Ok(())
    }

    /// Detaches `from_pod` from a CNI pod's device, if attached; a device
    /// that is gone took the attachment with it.
    pub(super) fn detach_cni_pod(
        &mut self,
        ebpf: &mut Ebpf,
        ifindex: u32,
    ) -> Result<(), AttachError> {
        let Some((name, id)) = self.cni_links.remove(&ifindex) else {
            return Ok(());
        };
        let prog = classifier(ebpf, prog_names::FROM_POD)?;
        match prog.detach(id) {
            Ok(()) => info!(
                "detached {} from CNI pod device {name}",
                prog_names::FROM_POD
            ),
            Err(e) => debug!(
                "detaching {} from {name} (gone?): {e}",
                prog_names::FROM_POD
            ),
        }
        Ok(())
    }
}
