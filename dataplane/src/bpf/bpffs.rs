//! The BPF filesystem the maps are pinned on: a fresh machine (or a
//! container) may have none mounted at `/sys/fs/bpf`.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use log::info;

/// Where bpffs is mounted when there is none.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not on a BPF filesystem", .0.display())]
    NotBpffs(PathBuf),
}

/// Makes sure a BPF filesystem is mounted at `/sys/fs/bpf` and the pin
/// directory exists on one.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), BpffsError> {
    let root = Path::new(BPFFS_ROOT);
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| BpffsError::Io { what, path, source }
    };
    if !is_bpffs(root) {
        fs::create_dir_all(root).map_err(io("creating", root))?;
        mount_bpffs(root).map_err(io("mounting bpffs at", root))?;
        info!("mounted bpffs at {BPFFS_ROOT}");
    }
    fs::create_dir_all(pin_path).map_err(io("creating", pin_path))?;
    if !is_bpffs(pin_path) {
        return Err(BpffsError::NotBpffs(pin_path.to_owned()));
    }
    Ok(())
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let src = CString::new("bpf").expect("no NUL");
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// What [`uninstall`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Link pins (each detaching its program, no process holding it).
    pub links: usize,
    /// Map pins and other files.
    pub maps: usize,
}

/// Removes everything pinned under `pin_path`: the links first (removing
/// a link's pin detaches its program once no process holds the link, so
/// the agent must be stopped), then every other pin (maps, this release's
/// and older ones), then the directories. A pin path that does not exist
/// is nothing to do.
pub fn uninstall(pin_path: &Path) -> Result<Removed, BpffsError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| BpffsError::Io { what, path, source }
    };
    let mut removed = Removed::default();
    if !pin_path.exists() {
        return Ok(removed);
    }
    if !is_bpffs(pin_path) {
        return Err(BpffsError::NotBpffs(pin_path.to_owned()));
    }
    let links = pin_path.join(super::attach::LINKS_DIR);
    if links.exists() {
        for e in fs::read_dir(&links).map_err(io("listing", &links))? {
            let path = e.map_err(io("listing", &links))?.path();
            fs::remove_file(&path).map_err(io("removing", &path))?;
            removed.links += 1;
        }
        fs::remove_dir(&links).map_err(io("removing", &links))?;
    }
    // Every other pin: this release's maps, and whatever an older (or
    // newer) release pinned, in subdirectories too.
    removed.maps += remove_tree(pin_path)?;
    info!(
        "removed {} pinned links and {} pinned maps under {}",
        removed.links,
        removed.maps,
        pin_path.display()
    );
    Ok(removed)
}

/// Removes the pins under `dir`, its subdirectories and `dir` itself;
/// returns how many pins went.
fn remove_tree(dir: &Path) -> Result<usize, BpffsError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| BpffsError::Io { what, path, source }
    };
    let mut n = 0;
    for e in fs::read_dir(dir).map_err(io("listing", dir))? {
        let e = e.map_err(io("listing", dir))?;
        let path = e.path();
        if e.file_type().map_err(io("listing", &path))?.is_dir() {
            n += remove_tree(&path)?;
        } else {
            fs::remove_file(&path).map_err(io("removing", &path))?;
            n += 1;
        }
    }
    fs::remove_dir(dir).map_err(io("removing", dir))?;
    Ok(n)
}
