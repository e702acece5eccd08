//! Network namespaces for tests.
//!
//! Two kinds:
//! - [`in_private_netns`]: runs a closure on a fresh thread that unshares
//!   its own network namespace. Child processes it spawns inherit it. The
//!   namespace dies with the thread: nothing to name, nothing to clean up.
//! - [`NetNs`]: a named namespace (`ip netns add`), for topologies where
//!   several processes (agents, etcd, pods) must live in different
//!   namespaces. Names carry the test-run id so parallel runs never
//!   collide; the namespace is deleted on drop, also when a test panics.

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Runs `f` in a brand-new network namespace (with `lo` up) on its own
/// thread and returns its result. Panics in `f` propagate.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread (CLONE_NEWNET is per task).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        sh("ip link set lo up").expect("lo up");
        f()
    });
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Runs a shell command line in the current (thread's) namespace; fails
/// with its stderr if it exits non-zero.
pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    check(cmd, out)
}

fn check(cmd: &str, out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A short id unique to this test process and call, for namespace and
/// link names (link names are limited to 15 bytes).
pub fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n:x}", std::process::id() % 0xfffff)
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        check(&format!("ip netns add {name}"), out)?;
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// Path for `nsenter --net=`. Unlike `ip netns exec`, nsenter does not
    /// remount /sys, so bpffs pins stay visible to processes started there.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a shell command line inside the namespace.
    pub fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        let out = self
            .command("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .with_context(|| format!("running {cmd}"))?;
        check(&format!("[{}] {cmd}", self.name), out)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive but not the name;
        // tests kill their own processes before the namespaces drop.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

pub fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

/// Root-only tests are `#[ignore = "needs root ..."]`, so a plain `cargo
/// test` lists them as ignored; `cargo xtask test` runs them with
/// `--include-ignored`. Run that way without root, they fail here rather
/// than pass having done nothing.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, BPF): run it as root, e.g. `cargo xtask test`"
    );
}

/// Runs `f` on a new thread that has joined the named namespace (setns):
/// sockets it opens live there. The calling thread is unaffected.
pub fn in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid netns fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}
