//! Loading the embedded object: maps created pinned under the pin path (or
//! reused from an earlier run), programs through the verifier, whose log
//! is part of the error when it rejects one.

use std::path::Path;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapData,
    programs::{CgroupSockAddr, ProgramError, SchedClassifier, Xdp},
};
use dataplane_common::prog_names;
use log::info;

use super::{
    BpffsError,
    maps::{Layout, MapError, Maps, PINNED, SIZED_BY_CT_MAX, layouts},
};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("loading the BPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("program {0} missing from the BPF object")]
    MissingProgram(&'static str),
    #[error("the verifier rejected {program} ({source}); its log:\n{log}")]
    Verifier {
        program: &'static str,
        #[source]
        source: std::io::Error,
        log: String,
    },
    #[error("loading {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Links(Box<super::AttachError>),
    #[error("migrating the maps of an older agent: {0}")]
    Migrate(Box<super::MigrateError>),
    #[error(
        "the map {map} pinned at {} has another layout than this binary's: pinned {pinned}; \
         wanted {wanted}. Refusing to start rather than run programs against it (a layout \
         change takes a new map name and a migration, see bpf::migrate): run the binary that \
         made it, or `dataplane uninstall` to remove the pins (and the state in them)",
        path.display()
    )]
    Layout {
        map: &'static str,
        path: std::path::PathBuf,
        pinned: Layout,
        wanted: Layout,
    },
}

impl From<super::MigrateError> for LoadError {
    fn from(e: super::MigrateError) -> Self {
        LoadError::Migrate(Box::new(e))
    }
}

impl From<super::AttachError> for LoadError {
    fn from(e: super::AttachError) -> Self {
        LoadError::Links(Box::new(e))
    }
}

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions<'a> {
    /// bpffs directory for the maps; `None` creates private, unpinned maps
    /// (packet tests, benchmarks).
    pub pin_path: Option<&'a Path>,
    /// Let the data path's aya-log records through (`--bpf-log`); without
    /// it the log level compiled into the object is "off", so the verifier
    /// drops the logging code.
    pub bpf_log: bool,
    /// Size of the conntrack tables (`--ct-max`); `None`: the object's
    /// default, [`dataplane_common::CT_MAX`].
    pub ct_max: Option<u32>,
}

impl LoadOptions<'_> {
    /// The conntrack table size this load creates.
    pub fn ct_max(&self) -> u32 {
        self.ct_max.unwrap_or(dataplane_common::CT_MAX)
    }
}

fn program_error(program: &'static str) -> impl FnOnce(ProgramError) -> LoadError {
    move |e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => LoadError::Verifier {
            program,
            source: io_error,
            log: verifier_log.to_string(),
        },
        source => LoadError::Program { program, source },
    }
}

/// Checks that every map pinned under `pin_path` has the layout this
/// binary's object declares ([`super::LAYOUTS`], the conntrack maps sized
/// `ct_max`): aya reuses a pinned map by name without looking, and a
/// program must never run against a map of another shape. Maps not
/// pinned yet are fine (they are created).
pub fn check_pinned_layouts(pin_path: &Path, ct_max: u32) -> Result<(), LoadError> {
    for (map, wanted) in layouts(ct_max) {
        let path = pin_path.join(map);
        if !path.exists() {
            continue;
        }
        let pinned = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|source| MapError::Pinned {
                path: path.clone(),
                source,
            })?;
        let pinned = Layout::of(&pinned)?;
        if pinned != wanted {
            return Err(LoadError::Layout {
                map,
                path,
                pinned,
                wanted,
            });
        }
    }
    Ok(())
}

/// Loads the object and every program, and takes the maps out of it.
pub(super) fn load(opts: &LoadOptions) -> Result<(Ebpf, Maps), LoadError> {
    let mut loader = EbpfLoader::new();
    if let Some(pin_path) = opts.pin_path {
        super::ensure_bpffs(pin_path)?;
        check_pinned_layouts(pin_path, opts.ct_max())?;
        for name in PINNED {
            loader.map_pin_path(name, pin_path.join(name));
        }
    }
    for name in SIZED_BY_CT_MAX {
        loader.map_max_entries(name, opts.ct_max());
    }
    // aya-log's level filter in the object (absent when it logs nothing):
    // the agent's own maximum level, or off.
    let level = if opts.bpf_log {
        log::max_level() as u8
    } else {
        0
    };
    loader.override_global(aya_log::LEVEL, &level, false);
    let mut ebpf = loader.load(crate::BPF_OBJECT).map_err(LoadError::Object)?;
    for name in [
        prog_names::FROM_POD,
        prog_names::FROM_UNDERLAY,
        prog_names::FROM_HOST,
        prog_names::TO_UNDERLAY,
        prog_names::TO_POD,
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(program_error(name))?;
        prog.load().map_err(program_error(name))?;
    }
    let name = prog_names::DECAP_XDP;
    let xdp: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))?;
    xdp.load().map_err(program_error(name))?;
    for name in prog_names::SOCK {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(program_error(name))?;
        prog.load().map_err(program_error(name))?;
    }
    let maps = Maps::take(&mut ebpf)?;
    // The object was parsed into `ebpf`; its bytes are not read again.
    crate::compact::drop_resident_pages(crate::BPF_OBJECT);
    match opts.pin_path {
        Some(p) => info!("BPF programs loaded, maps pinned under {}", p.display()),
        None => info!("BPF programs loaded (maps not pinned)"),
    }
    Ok((ebpf, maps))
}
