//! Network namespaces of the plugin: its own (the node's, where the
//! runtime runs it) and the pod's (`CNI_NETNS`).
//!
//! A netlink socket belongs to the namespace its creating thread was in.
//! So for the pod, a short-lived thread enters the namespace (`setns`
//! affects only the calling thread), opens the socket there and hands it
//! back; every request then runs on the plugin's runtime as usual, and the
//! plugin itself never changes namespace.

use std::{
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use rtnetlink::Handle;

use super::error::{CniError, CniResult};

/// `NSFS_MAGIC` from `linux/magic.h`: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// An open network namespace file.
#[derive(Debug)]
pub struct Netns {
    file: File,
    pub path: PathBuf,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace other than
    /// the caller's own. Errors are code 4 (they are about `CNI_NETNS`).
    pub fn open(path: &Path) -> CniResult<Self> {
        let file = File::open(path).map_err(|e| {
            CniError::invalid_env(format!("CNI_NETNS: cannot open {}: {e}", path.display()))
        })?;
        // SAFETY: fstatfs on an open fd, into a zeroed struct it fills.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(CniError::invalid_env(format!(
                "CNI_NETNS: fstatfs {}: {e}",
                path.display()
            )));
        }
        #[allow(
            clippy::unnecessary_cast,
            reason = "f_type's type differs between libcs"
        )]
        if st.f_type as i64 != NSFS_MAGIC {
            return Err(CniError::invalid_env(format!(
                "CNI_NETNS: {} is not a network namespace (not on nsfs)",
                path.display()
            )));
        }
        let ns = Self {
            file,
            path: path.to_path_buf(),
        };
        if ns.is_current()? {
            return Err(CniError::invalid_env(format!(
                "CNI_NETNS: {} is the plugin's own network namespace, not a container's",
                path.display()
            )));
        }
        Ok(ns)
    }

    /// Whether this is the calling thread's namespace.
    fn is_current(&self) -> CniResult<bool> {
        let ours = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| CniError::internal(format!("reading /proc/thread-self/ns/net: {e}")))?;
        let theirs = self
            .file
            .metadata()
            .map_err(|e| CniError::internal(format!("stat {}: {e}", self.path.display())))?;
        Ok((ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// An rtnetlink handle whose socket lives in this namespace. Must be
    /// called inside a tokio runtime (the connection task runs on it).
    pub fn handle(&self) -> CniResult<Handle> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| CniError::internal(format!("no tokio runtime: {e}")))?;
        let file = self
            .file
            .try_clone()
            .map_err(|e| CniError::internal(format!("dup {}: {e}", self.path.display())))?;
        let rt2 = rt.clone();
        let opened = std::thread::spawn(move || -> std::io::Result<_> {
            // SAFETY: setns with a valid namespace fd; it changes only this
            // thread, which ends right after opening the socket.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The socket registers with the runtime's reactor.
            let _entered = rt2.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok((conn, handle))
        })
        .join()
        .map_err(|_| CniError::internal("the thread opening a netlink socket panicked"))?
        .map_err(|e| {
            CniError::internal(format!(
                "opening a netlink socket in {}: {e}",
                self.path.display()
            ))
        })?;
        let (conn, handle) = opened;
        rt.spawn(conn);
        Ok(handle)
    }
}

/// An rtnetlink handle in the caller's own namespace (the node's).
pub fn current_handle() -> CniResult<Handle> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| CniError::internal(format!("no tokio runtime: {e}")))?;
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::internal(format!("opening a netlink socket: {e}")))?;
    rt.spawn(conn);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::code;

    #[test]
    fn rejects_what_is_not_a_container_netns() {
        let e = Netns::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS") && e.msg.contains("/nonexistent/netns"));
        let e = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(e.msg.contains("not a network namespace"), "{}", e.msg);
        let e = Netns::open(Path::new("/proc/thread-self/ns/net")).unwrap_err();
        assert!(e.msg.contains("own network namespace"), "{}", e.msg);
    }
}
