//! Delegating IP address management (spec section 4): the plugin named by
//! `ipam.type` is looked up in `CNI_PATH` and run with this plugin's
//! environment (`CNI_COMMAND` set per call) and the whole netconf on
//! stdin; its stderr is ours.
//!
//! Every call is preceded by VERSION, and the netconf is relabelled with
//! the newest version both sides speak (see [`super::version::negotiate`]):
//! Debian's host-local 1.1.1 stops at 1.0.0. STATUS and GC exist from 1.1.0
//! on; [`Ipam::speaks_1_1`] tells the caller whether to forward them.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{io::AsyncWriteExt, process::Command as Process};

use super::{
    env::{Command, Env},
    error::{CniError, CniResult, code},
    netconf::NetConf,
    proto::AttachmentKey,
    result::CniOutput,
    version::{self, GC_STATUS_SINCE, Version, VersionInfo},
};

/// How long a delegated plugin may run (host-local waits on a file lock
/// that other invocations hold).
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// The IPAM plugin of a netconf.
pub struct Ipam<'a> {
    conf: &'a NetConf,
    binary: PathBuf,
    version: tokio::sync::OnceCell<Version>,
}

impl<'a> Ipam<'a> {
    /// Finds `ipam.type` in `CNI_PATH` (first match wins).
    pub fn find(conf: &'a NetConf, env: &Env) -> CniResult<Self> {
        let binary = find_in_path(&conf.ipam_type, &env.path)?;
        Ok(Self {
            conf,
            binary,
            version: tokio::sync::OnceCell::new(),
        })
    }

    pub fn plugin_name(&self) -> &str {
        &self.conf.ipam_type
    }

    /// The version to speak with the plugin (asked once).
    pub async fn version(&self) -> CniResult<Version> {
        self.version
            .get_or_try_init(|| async {
                let input = format!(r#"{{"cniVersion":"{}"}}"#, self.conf.cni_version);
                let out = self.exec(Command::Version, None, input.as_bytes()).await?;
                let info: VersionInfo = serde_json::from_slice(&out).map_err(|e| {
                    CniError::decode(format!(
                        "IPAM plugin {}: undecodable VERSION answer: {e}",
                        self.plugin_name()
                    ))
                })?;
                version::negotiate(self.conf.version, &info, self.plugin_name())
            })
            .await
            .copied()
    }

    /// Whether the plugin has STATUS and GC (spec 1.1).
    pub async fn speaks_1_1(&self) -> CniResult<bool> {
        Ok(self.version().await? >= GC_STATUS_SINCE)
    }

    async fn call(&self, command: Command, key: Option<&AttachmentKey>) -> CniResult<Vec<u8>> {
        let version = self.version().await?;
        let stdin = self.conf.for_delegate(version, command == Command::Gc);
        self.exec(command, key, &stdin).await
    }

    /// Allocates the attachment's address.
    pub async fn add(&self) -> CniResult<CniOutput> {
        let out = self.call(Command::Add, None).await?;
        CniOutput::from_slice(&out, &format!("IPAM plugin {} result", self.plugin_name()))
    }

    /// Releases the address of the invocation's attachment, or of `key`
    /// (GC: the environment names no attachment then).
    pub async fn del(&self, key: Option<&AttachmentKey>) -> CniResult<()> {
        self.call(Command::Del, key).await.map(drop)
    }

    pub async fn check(&self) -> CniResult<()> {
        self.call(Command::Check, None).await.map(drop)
    }

    /// Only for plugins that [speak 1.1](Self::speaks_1_1).
    pub async fn status(&self) -> CniResult<()> {
        self.call(Command::Status, None).await.map(drop)
    }

    /// Only for plugins that [speak 1.1](Self::speaks_1_1).
    pub async fn gc(&self) -> CniResult<()> {
        self.call(Command::Gc, None).await.map(drop)
    }

    /// Runs the plugin once; `key` replaces the attachment variables.
    async fn exec(
        &self,
        command: Command,
        key: Option<&AttachmentKey>,
        stdin: &[u8],
    ) -> CniResult<Vec<u8>> {
        let what = format!("IPAM plugin {} {command}", self.plugin_name());
        let mut p = Process::new(&self.binary);
        p.env("CNI_COMMAND", command.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(key) = key {
            p.env("CNI_CONTAINERID", &key.container_id)
                .env("CNI_IFNAME", &key.ifname)
                .env_remove("CNI_NETNS");
        }
        let mut child = p.spawn().map_err(|e| {
            CniError::internal(format!("{what}: running {}: {e}", self.binary.display()))
        })?;
        let mut input = child.stdin.take();
        let write = async {
            if let Some(pipe) = input.as_mut() {
                // A plugin that exits without reading its stdin is not an
                // error here; its exit status tells.
                let _ = pipe.write_all(stdin).await;
            }
            drop(input);
        };
        let run = async {
            let ((), out) = tokio::join!(write, child.wait_with_output());
            out
        };
        let out = tokio::time::timeout(EXEC_TIMEOUT, run)
            .await
            .map_err(|_| {
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("{what}: no answer within {EXEC_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| CniError::internal(format!("{what}: {e}")))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(match serde_json::from_slice::<CniError>(&out.stdout) {
            Ok(e) => e.context(&what),
            Err(_) => CniError::internal(format!(
                "{what} failed ({}) with output {:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            )),
        })
    }
}

/// The first `dir/name` of `path` that is an executable file.
pub fn find_in_path(name: &str, path: &[PathBuf]) -> CniResult<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let found = path.iter().map(|dir| dir.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    found.ok_or_else(|| {
        CniError::invalid_netconf(format!(
            "IPAM plugin {name:?} not found in CNI_PATH ({})",
            path.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn finds_plugins_in_cni_path() {
        let base = std::env::temp_dir().join(format!("dp-cni-path-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(a.join("plain"), "not executable").unwrap();
        for d in [&a, &b] {
            let p = d.join("ipam");
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = vec![base.join("missing"), a.clone(), b.clone()];
        assert_eq!(find_in_path("ipam", &path).unwrap(), a.join("ipam"));
        let e = find_in_path("plain", &path).unwrap_err();
        assert_eq!(e.code, code::INVALID_NETCONF);
        let e = find_in_path("host-local", &path).unwrap_err();
        assert!(
            e.msg.contains("host-local") && e.msg.contains(&a.display().to_string()),
            "{}",
            e.msg
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
