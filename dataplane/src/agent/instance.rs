//! One agent per pin path and per PublicIP on a node: a second agent
//! refuses to start, naming the first.
//!
//! Each claim is an exclusive `flock` on a file under [`LOCK_DIR`] holding
//! the owner's PID. The kernel drops the lock with the process (a crash
//! included), so a stale file never blocks a restart. The PublicIP claim
//! is per network namespace (its inode is in the file name): agents in
//! separate namespaces are separate nodes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, bail};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/dataplane";

/// A held claim; released when dropped (which also removes the file) or
/// when the process ends (the file stays, unlocked, and is reused).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: std::path::PathBuf,
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Unlinked while still locked: whoever opened it meanwhile finds
        // it gone once locked (see `claim`) and starts over.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `s` as one file name: `/` and other bytes outside `[A-Za-z0-9._-]`
/// become `%XX`.
pub(crate) fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Claims `what` (`--pin-path /sys/fs/bpf/dataplane`, ...) through the
/// lock file `dir/name`.
pub fn claim(dir: &Path, name: &str, what: &str) -> anyhow::Result<InstanceLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    loop {
        let mut file = try_lock(&path, what)?;
        // The holder before us may have removed the file between our open
        // and our lock: then the lock is on a file nobody else will see
        // (closing it drops that lock); start over.
        let same = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(InstanceLock { _file: file, path });
        }
    }
}

/// Opens `path` and locks it, or says who holds it.
fn try_lock(path: &Path, what: &str) -> anyhow::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        let pid = pid.trim();
        let who = if pid.is_empty() {
            "another agent".to_string()
        } else {
            format!("another agent (pid {pid})")
        };
        bail!(
            "{who} already runs on this node with {what} (it holds {}); refusing to start a second one",
            path.display()
        );
    }
    Ok(file)
}

/// The name of the lock file of `--pin-path pin_path` in [`LOCK_DIR`].
fn pin_lock_name(pin_path: &Path) -> String {
    format!("pin{}.lock", escape(&pin_path.to_string_lossy()))
}

/// The PID of the agent that holds `--pin-path pin_path` (or held it:
/// the file of a crashed agent stays, so check that the process runs).
pub fn pin_holder(pin_path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(Path::new(LOCK_DIR).join(pin_lock_name(pin_path))).ok()?;
    text.trim().parse().ok()
}

/// Claims the pin path and the PublicIP (in this network namespace) under
/// [`LOCK_DIR`].
pub fn claim_node(pin_path: &Path, public_ip: Ipv4Addr) -> anyhow::Result<Vec<InstanceLock>> {
    let dir = Path::new(LOCK_DIR);
    let pins = claim(
        dir,
        &pin_lock_name(pin_path),
        &format!("--pin-path {}", pin_path.display()),
    )?;
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .context("reading this process's network namespace")?;
    let ip = claim(
        dir,
        &format!("ip-{netns}-{public_ip}.lock"),
        &format!("PublicIP {public_ip}"),
    )?;
    Ok(vec![pins, ip])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_one_file_name() {
        assert_eq!(
            escape("/sys/fs/bpf/dataplane"),
            "%2Fsys%2Ffs%2Fbpf%2Fdataplane"
        );
        assert_eq!(escape("a b"), "a%20b");
    }

    #[test]
    fn a_second_claim_names_the_first_and_the_lock_dies_with_it() {
        let dir = std::env::temp_dir().join(format!("dp-lock-test-{}", std::process::id()));
        let first = claim(&dir, "x.lock", "--pin-path /p").unwrap();
        // flock locks belong to the open file description: a second open
        // in this process conflicts as a second process would.
        let e = claim(&dir, "x.lock", "--pin-path /p").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "another agent (pid {}) already runs on this node with --pin-path /p (it holds {}); refusing to start a second one",
                std::process::id(),
                dir.join("x.lock").display()
            )
        );
        drop(first);
        assert!(!dir.join("x.lock").exists(), "removed when released");
        let again = claim(&dir, "x.lock", "--pin-path /p").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("x.lock")).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
