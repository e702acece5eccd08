//! Ctrl-C for the demo and benchmark binaries: SIGINT/SIGTERM are handled
//! on one thread, which stops the processes the clusters started (by PID),
//! deletes their namespaces, pins and directories, and exits. Clusters
//! register when they have started something and unregister when their
//! own Drop has cleaned up.

use std::{
    process::Command,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use crate::topo::Cluster;

type Registry = Vec<(String, Vec<u32>, std::path::PathBuf)>;
static CLEANUP: OnceLock<Mutex<Registry>> = OnceLock::new();

pub fn register(c: &Cluster) {
    let mut pids: Vec<u32> = c
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref().map(|a| a.id()))
        .collect();
    pids.extend(c.etcd.pid());
    let mut reg = CLEANUP.get_or_init(Default::default).lock().unwrap();
    reg.retain(|(id, _, _)| id != &c.id);
    reg.push((c.id.clone(), pids, c.etcd.data_dir.clone()));
}

pub fn unregister(id: &str) {
    CLEANUP
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .retain(|(i, _, _)| i != id);
}

/// SIGINT/SIGTERM: stop what we started (by PID), delete our namespaces
/// and pins, exit. Signals are blocked on every other thread.
pub fn install_signal_cleanup() {
    // SAFETY: signal mask manipulation with valid sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("\ninterrupted: cleaning up");
            let reg = std::mem::take(&mut *CLEANUP.get_or_init(Default::default).lock().unwrap());
            for (_, pids, _) in &reg {
                for pid in pids {
                    libc::kill(*pid as i32, libc::SIGTERM);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
            for (id, _, etcd_dir) in &reg {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "for ns in $(ip netns list | awk '{{print $1}}' | grep '^dp{id}'); do ip netns delete $ns; done; \
                         rm -rf /sys/fs/bpf/dp{id}n* /tmp/dp-{id} '{}'",
                        etcd_dir.display()
                    ))
                    .status();
            }
            std::process::exit(130);
        });
    }
}
