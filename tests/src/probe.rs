//! What a pod's UDP socket learns from the network: the ICMP errors that
//! reach it (IP_RECVERR, as traceroute and path MTU discovery read them),
//! the path MTU, ECONNREFUSED; and a UDP echo server. All in-process, on
//! threads that joined a pod's namespace.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::{NetNs, in_netns};

/// An ICMP error a socket received (`struct sock_extended_err` and the
/// address of the node that sent it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpReport {
    /// The errno it maps to (ECONNREFUSED, EMSGSIZE, EHOSTUNREACH, ...).
    pub errno: i32,
    pub icmp_type: u8,
    pub code: u8,
    /// For "fragmentation needed": the next-hop MTU.
    pub info: u32,
    /// Who sent the error.
    pub offender: Ipv4Addr,
}

/// How to send the probe.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub dst: Ipv4Addr,
    pub port: u16,
    /// IP TTL of the datagram; `None` for the default (64).
    pub ttl: Option<u8>,
    /// UDP payload length.
    pub len: usize,
    /// Don't Fragment (IP_PMTUDISC_DO): the socket learns the path MTU.
    pub df: bool,
}

impl Probe {
    pub fn udp(dst: Ipv4Addr, port: u16) -> Probe {
        Probe {
            dst,
            port,
            ttl: None,
            len: 16,
            df: false,
        }
    }
}

fn setsockopt(s: &UdpSocket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The path MTU the kernel knows for a connected socket (IP_MTU).
fn path_mtu(s: &UdpSocket) -> io::Result<u32> {
    let mut v: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: valid fd, pointers to live locals of the given sizes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one ICMP error from the socket's error queue, waiting up to
/// `timeout`. `None` when none came.
fn read_error(s: &UdpSocket, timeout: Duration) -> io::Result<Option<IcmpReport>> {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: 0, // POLLERR is always reported
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 || pfd.revents & libc::POLLERR == 0 {
        return Ok(None);
    }
    let mut data = [0u8; 2048];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 64];
    // SAFETY: all-zero msghdr is valid; the pointers set below are live.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 64]>();
    // SAFETY: msg points at live buffers.
    let rc = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_IP && (*c).cmsg_type == libc::IP_RECVERR {
                let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                let e = ee.read_unaligned();
                if e.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                    // A local error (e.g. EMSGSIZE from our own PMTU).
                    c = libc::CMSG_NXTHDR(&msg, c);
                    continue;
                }
                let off = libc::SO_EE_OFFENDER(ee) as *const libc::sockaddr_in;
                let off = off.read_unaligned();
                return Ok(Some(IcmpReport {
                    errno: e.ee_errno as i32,
                    icmp_type: e.ee_type,
                    code: e.ee_code,
                    info: e.ee_info,
                    offender: Ipv4Addr::from(u32::from_be(off.sin_addr.s_addr)),
                }));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(None)
}

/// Sends `p` from a new socket in `client` and returns the first ICMP
/// error it receives within `timeout`, with the path MTU the socket knows
/// afterwards.
pub fn udp_probe(
    client: &NetNs,
    p: Probe,
    timeout: Duration,
) -> anyhow::Result<(Option<IcmpReport>, u32)> {
    in_netns(
        client,
        move || -> anyhow::Result<(Option<IcmpReport>, u32)> {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            setsockopt(&s, libc::IPPROTO_IP, libc::IP_RECVERR, 1).context("IP_RECVERR")?;
            if let Some(ttl) = p.ttl {
                setsockopt(&s, libc::IPPROTO_IP, libc::IP_TTL, i32::from(ttl)).context("IP_TTL")?;
            }
            let pmtu = if p.df {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_DONT
            };
            setsockopt(&s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, pmtu).context("PMTUDISC")?;
            s.connect((p.dst, p.port))?;
            s.send(&vec![0x5a; p.len]).context("send")?;
            let report = read_error(&s, timeout)?;
            Ok((report, path_mtu(&s)?))
        },
    )
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// Sends one datagram to `addr:port` from a plain connected socket in
/// `client` and returns what `recv` says: the answer, or the error (a
/// refused port reads as [`io::ErrorKind::ConnectionRefused`]).
pub fn udp_recv_result(
    client: &NetNs,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    in_netns(client, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect((addr, port))?;
        s.set_read_timeout(Some(timeout))?;
        s.send(b"anyone there?")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })
    .join()
    .expect("client thread")
}

/// Sends `len`-byte datagrams (fragmented by the sender when larger than
/// the MTU) to `addr:port` and checks each is echoed whole; returns how
/// many of `n` came back intact within `timeout` each.
pub fn udp_echo_large(
    client: &NetNs,
    addr: Ipv4Addr,
    port: u16,
    len: usize,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<usize> {
    in_netns(client, move || -> anyhow::Result<usize> {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        setsockopt(
            &s,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )?;
        s.connect((addr, port))?;
        s.set_read_timeout(Some(timeout))?;
        let mut ok = 0;
        let mut buf = vec![0u8; 65536];
        for i in 0..n {
            let msg: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
            s.send(&msg).context("send")?;
            if let Ok(got) = s.recv(&mut buf)
                && buf[..got] == msg[..]
            {
                ok += 1;
            }
        }
        Ok(ok)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// A UDP echo server on `0.0.0.0:port` in a namespace; stopped on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &NetNs, port: u16) -> anyhow::Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let s2 = stop.clone();
        let thread = in_netns(ns, move || {
            let sock = match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // The answer may be larger than the path: let it be fragmented.
            let _ = setsockopt(
                &sock,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            );
            let _ = tx.send(Ok(()));
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
        Ok(Echo {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The TTL of the echo reply `ping` prints for one ping from `client` to
/// `dst`.
pub fn ping_ttl(client: &NetNs, dst: Ipv4Addr) -> anyhow::Result<u8> {
    let out = client.sh(&format!("ping -c 1 -W 2 {dst}"))?;
    let ttl = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ttl="))
        .with_context(|| format!("no ttl= in ping output:\n{out}"))?;
    Ok(ttl.parse()?)
}
