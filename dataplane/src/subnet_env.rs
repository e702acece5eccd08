//! `/run/flannel/subnet.env`: how Docker (`--bip`), the flannel CNI plugin
//! and `mk-docker-opts.sh` learn this node's subnet and MTU.
//!
//! The format is flannel's, byte for byte:
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=false
//! ```
//!
//! The file is also the agent's memory across restarts: the subnet it names
//! is the hint for [`crate::lease::acquire`], so a node keeps its subnet even
//! when its lease expired while it was down.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use ipnet::Ipv4Net;

/// flannel's default location.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

/// Contents of subnet.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network.
    pub network: Ipv4Net,
    /// This node's subnet, network address form (`10.244.1.0/24`); the file
    /// holds its first address (`FLANNEL_SUBNET=10.244.1.1/24`).
    pub subnet: Ipv4Net,
    /// `FLANNEL_MTU`: MTU for pod interfaces.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flannel masquerades traffic leaving the network.
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file's text.
    pub fn render(&self) -> String {
        let subnet = self.subnet.trunc();
        let first = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network.trunc(),
            first,
            subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Parses the file's text. Blank lines, `#` comments and keys we do not
    /// use (e.g. flannel's `FLANNEL_IPV6_*`) are ignored; the four keys above
    /// are required.
    pub fn parse(text: &str) -> anyhow::Result<SubnetEnv> {
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| anyhow!("line {}: expected KEY=value, got {line:?}", n + 1))?;
            let bad = |what: &str| anyhow!("line {}: {key}: {value:?} is not {what}", n + 1);
            match key {
                "FLANNEL_NETWORK" => {
                    network = Some(
                        value
                            .parse::<Ipv4Net>()
                            .map_err(|_| bad("an IPv4 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_SUBNET" => {
                    subnet = Some(
                        value
                            .parse::<Ipv4Net>()
                            .map_err(|_| bad("an IPv4 CIDR"))?
                            .trunc(),
                    )
                }
                "FLANNEL_MTU" => mtu = Some(value.parse::<u32>().map_err(|_| bad("an MTU"))?),
                "FLANNEL_IPMASQ" => {
                    ipmasq = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("true or false")),
                    })
                }
                _ => {}
            }
        }
        Ok(SubnetEnv {
            network: network.context("FLANNEL_NETWORK missing")?,
            subnet: subnet.context("FLANNEL_SUBNET missing")?,
            mtu: mtu.context("FLANNEL_MTU missing")?,
            ipmasq: ipmasq.context("FLANNEL_IPMASQ missing")?,
        })
    }
}

/// Writes `env` to `path` atomically: readers see the old file or the new
/// one, never a partial one. The parent directory is created if needed; the
/// file is mode 0644 (readers such as the CNI plugin may not run as root).
pub fn write(path: &Path, env: &SubnetEnv) -> anyhow::Result<()> {
    write_atomic(path, env.render().as_bytes(), 0o644)
}

/// Writes `contents` to `path` atomically (a temporary file in the same
/// directory, fsynced, renamed over `path`), with mode `mode`; creates the
/// parent directory if needed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| -> anyhow::Result<()> {
        // A leftover from a crash of this very PID would make create_new fail.
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(contents)
            .with_context(|| format!("writing {}", tmp.display()))?;
        // Explicit, so the umask does not decide.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; failure here is not worth failing for.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads `path`: `None` if it does not exist, an error if it is unreadable
/// or not a valid subnet.env.
pub fn read(path: &Path) -> anyhow::Result<Option<SubnetEnv>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match SubnetEnv::parse(&text) {
        Ok(env) => Ok(Some(env)),
        Err(e) => bail!("{}: {e:#}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const TEXT: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: false,
        }
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "subnet-env-test-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn render_is_flannel_format() {
        assert_eq!(env().render(), TEXT);
        let e = SubnetEnv {
            network: "10.5.0.0/28".parse().unwrap(),
            subnet: "10.5.0.8/30".parse().unwrap(),
            mtu: 8950,
            ipmasq: true,
        };
        assert_eq!(
            e.render(),
            "FLANNEL_NETWORK=10.5.0.0/28\nFLANNEL_SUBNET=10.5.0.9/30\nFLANNEL_MTU=8950\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn parse_roundtrip_and_tolerance() {
        assert_eq!(SubnetEnv::parse(TEXT).unwrap(), env());
        let with_extras = format!("# written by flannel\n\n{TEXT}FLANNEL_IPV6_NETWORK=fd00::/56\n");
        assert_eq!(SubnetEnv::parse(&with_extras).unwrap(), env());
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "garbage",
            "FLANNEL_NETWORK=10.244.0.0/16\n",
            &TEXT.replace("10.244.1.1/24", "10.244.1.1"),
            &TEXT.replace("1450", "big"),
            &TEXT.replace("=false", "=no"),
            &TEXT.replace("FLANNEL_MTU=1450\n", ""),
        ] {
            assert!(SubnetEnv::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_then_read() {
        let d = TempDir::new("rw");
        let path = d.0.join("nested/dir/subnet.env");
        assert_eq!(read(&path).unwrap(), None);
        write(&path, &env()).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), TEXT);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(read(&path).unwrap(), Some(env()));

        // Overwrite; no temp file left behind.
        let mut e2 = env();
        e2.subnet = "10.244.7.0/24".parse().unwrap();
        write(&path, &e2).unwrap();
        assert_eq!(read(&path).unwrap(), Some(e2));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
    }

    #[test]
    fn read_garbage_is_error() {
        let d = TempDir::new("garbage");
        fs::create_dir_all(&d.0).unwrap();
        let path = d.0.join("subnet.env");
        fs::write(&path, "not a subnet env").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("subnet.env"), "{e}");
    }
}
