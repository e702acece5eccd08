//! `--nat-ports`: the source ports the data path gives masqueraded flows
//! (and NodePort SNAT), and their reservation in
//! `net.ipv4.ip_local_reserved_ports`, so the node's own sockets never
//! autobind one (a reply to such a socket would otherwise be taken for a
//! masqueraded flow's, or the other way round). As with `ip_forward`
//! ([`super::forwarding`]), the value found is recorded once per network
//! namespace in [`LOCK_DIR`] and `dataplane uninstall` puts it back.

use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::Context as _;
use dataplane_common::{NAT_PORT_MAX, NAT_PORT_MIN};
use log::info;

use super::instance::LOCK_DIR;
use crate::netlink;

const SYSCTL: &str = "net/ipv4/ip_local_reserved_ports";
const PROC: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// An inclusive range of ports, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatPorts {
    pub min: u16,
    pub max: u16,
}

impl Default for NatPorts {
    fn default() -> Self {
        NatPorts {
            min: NAT_PORT_MIN,
            max: NAT_PORT_MAX,
        }
    }
}

impl fmt::Display for NatPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// Below this the ports are the node's services' (privileged).
const LOWEST: u16 = 1024;

impl FromStr for NatPorts {
    type Err = String;

    /// `MIN-MAX` or a single port.
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port (1024-65535)"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if min > max {
            return Err(format!("{s}: the first port is above the last"));
        }
        if min < LOWEST {
            return Err(format!("{s}: NAT ports start at {LOWEST} at the lowest"));
        }
        Ok(NatPorts { min, max })
    }
}

/// `<LOCK_DIR>/ip_local_reserved_ports-<netns inode>.orig`.
fn record(dir: &Path) -> io::Result<PathBuf> {
    let netns = fs::metadata("/proc/self/ns/net")?.ino();
    Ok(dir.join(format!("ip_local_reserved_ports-{netns}.orig")))
}

/// The ranges of a `ip_local_reserved_ports` value ("1-3,8080").
fn ranges(value: &str) -> Vec<(u16, u16)> {
    value
        .split(',')
        .filter_map(|r| {
            let r = r.trim();
            if r.is_empty() {
                return None;
            }
            match r.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => r.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Whether `value` reserves every port of `want`.
fn covers(value: &str, want: NatPorts) -> bool {
    let mut r = ranges(value);
    r.sort();
    let mut next = u32::from(want.min);
    for (a, b) in r {
        if u32::from(a) <= next && u32::from(b) >= next {
            next = u32::from(b) + 1;
        }
    }
    next > u32::from(want.max)
}

/// `value` with `want` added.
fn with(value: &str, want: NatPorts) -> String {
    let value = value.trim();
    if value.is_empty() {
        want.to_string()
    } else {
        format!("{value},{want}")
    }
}

/// Reserves `ports`, recording the value found unless an earlier run
/// recorded one (what that run found stays the value to restore).
pub fn reserve(ports: NatPorts) -> anyhow::Result<()> {
    reserve_in(Path::new(LOCK_DIR), ports)
}

fn reserve_in(dir: &Path, ports: NatPorts) -> anyhow::Result<()> {
    let now = fs::read_to_string(PROC).with_context(|| format!("reading {PROC}"))?;
    let now = now.trim();
    if covers(now, ports) {
        return Ok(());
    }
    let rec = record(dir).context("naming the record of ip_local_reserved_ports")?;
    if !rec.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(&rec, now).with_context(|| format!("writing {}", rec.display()))?;
    }
    netlink::set_sysctl(SYSCTL, &with(now, ports))?;
    info!(
        "NAT ports {ports} reserved in net.ipv4.ip_local_reserved_ports (was {now:?}; `dataplane uninstall` restores it)"
    );
    Ok(())
}

/// Puts back the value the agent found, if it recorded one; returns it.
pub fn restore() -> anyhow::Result<Option<String>> {
    restore_in(Path::new(LOCK_DIR))
}

fn restore_in(dir: &Path) -> anyhow::Result<Option<String>> {
    let rec = record(dir).context("naming the record of ip_local_reserved_ports")?;
    let was = match fs::read_to_string(&rec) {
        Ok(v) => v.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", rec.display())),
    };
    anyhow::ensure!(
        was.chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '-'),
        "{} holds {was:?}, not an ip_local_reserved_ports value",
        rec.display()
    );
    // The kernel takes an empty list as "none reserved" only as a newline.
    netlink::set_sysctl(SYSCTL, if was.is_empty() { "\n" } else { &was })?;
    fs::remove_file(&rec).with_context(|| format!("removing {}", rec.display()))?;
    Ok(Some(was))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "61000-65535".parse::<NatPorts>(),
            Ok(NatPorts {
                min: 61000,
                max: 65535
            })
        );
        assert_eq!(
            "40000".parse::<NatPorts>(),
            Ok(NatPorts {
                min: 40000,
                max: 40000
            })
        );
        assert!("65535-61000".parse::<NatPorts>().is_err());
        assert!("80-90".parse::<NatPorts>().is_err());
        assert!("61000-70000".parse::<NatPorts>().is_err());
        assert!("x".parse::<NatPorts>().is_err());
        assert_eq!(NatPorts::default().to_string(), "61000-65535");
    }

    #[test]
    fn the_reservation_is_added_only_where_missing() {
        let p = NatPorts {
            min: 61000,
            max: 61010,
        };
        assert!(!covers("", p));
        assert!(covers("61000-61010", p));
        assert!(covers("8080,60000-61005,61006-62000", p));
        assert!(!covers("61000-61009", p));
        assert!(!covers("61001-61010", p));
        assert_eq!(with("", p), "61000-61010");
        assert_eq!(with("8080\n", p), "8080,61000-61010");
        assert!(covers(&with("8080", p), p));
    }
}
