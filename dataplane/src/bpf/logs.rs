//! `--bpf-log`: the data path's rare-event records (aya-log) forwarded to
//! the agent's `log` output. The records travel through a ring buffer; a
//! task waits for it to become readable and drains it.

use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{Log, error, warn};
use tokio::io::{Interest, unix::AsyncFd};

/// The reader of the object's log ring buffer.
pub struct BpfLog(EbpfLogger<&'static dyn Log>);

/// Takes the log ring buffer out of the object. `None` (with a warning)
/// when the object has no aya-log records at all.
pub(super) fn take(ebpf: &mut Ebpf) -> Result<Option<BpfLog>, aya_log::Error> {
    match EbpfLogger::init(ebpf) {
        Ok(l) => Ok(Some(BpfLog(l))),
        Err(aya_log::Error::MapNotFound) => {
            warn!("--bpf-log: this BPF object has no log records");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl BpfLog {
    /// Forwards records until the ring buffer fails; run it as a task.
    pub async fn forward(self) {
        // SAFETY: the fd is the ring buffer map's, owned by the logger the
        // AsyncFd now owns: open, and the same fd, for as long as it lives.
        let registered = unsafe { AsyncFd::register_with_interest(self.0, Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                error!("--bpf-log: polling the log ring buffer: {e}");
                return;
            }
        };
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    error!("--bpf-log: waiting for log records: {e}");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}
