//! `dataplane-cni`: the CNI plugin of the dataplane (see
//! `dataplane::cni`). A container runtime runs it with `CNI_*` variables
//! and the netconf on stdin; the result or error JSON goes to stdout, logs
//! to stderr.

use std::io::{IsTerminal, Read, Write};

use dataplane::cni::{
    error::{CniError, code},
    netconf::version_hint,
    plugin::{self, Outcome},
};

fn main() {
    let mut stdin = Vec::new();
    // Run by hand on a terminal (`CNI_COMMAND=VERSION dataplane-cni`),
    // there is no netconf to wait for.
    let read = if std::io::stdin().is_terminal() {
        Ok(0)
    } else {
        std::io::stdin().read_to_end(&mut stdin)
    };
    let outcome = match read {
        Err(e) => Outcome::error(
            &CniError::new(
                code::IO,
                format!("reading the network configuration from stdin: {e}"),
            ),
            None,
        ),
        Ok(_) => std::panic::catch_unwind(|| plugin::run(|name| std::env::var(name).ok(), &stdin))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::error(
                    &CniError::internal(format!("dataplane-cni panicked: {what}")),
                    version_hint(&stdin).as_deref(),
                )
            }),
    };
    let mut out = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        let _ = writeln!(out, "{}", outcome.stdout);
    }
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
