//! "The outside world": a namespace behind the underlay's router that
//! holds no lease and is not a node. It knows nothing of the pod network
//! or of Services: it reaches the nodes (and they it) only through the
//! underlay namespace, which routes between 192.168.77.0/24 (the nodes)
//! and 203.0.113.0/24 (here).
//!
//! ```text
//!   [node nK | eth0]--uK--[br0 192.168.77.254 | underlay ns | ow 203.0.113.254]--[eth0 203.0.113.10 | outside]
//! ```
//!
//! [`Witness`] is a server for it (or anywhere) that answers every TCP
//! connection and UDP datagram with the address it came from, so a test
//! sees which source a packet left the cluster with, and records the
//! sources it saw ([`Witness::seen`]) for packets whose answers cannot
//! come back (a pod address the outside has no route to).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    netns::{NetNs, in_netns},
    topo::Cluster,
};

pub const OUTSIDE_NET: [u8; 3] = [203, 0, 113];
/// The underlay router's address on the outside link.
pub const OUTSIDE_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// The outside namespace's own address.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// The outside namespace, deleted on drop.
pub struct Outside {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
}

impl Cluster {
    /// Adds the outside namespace behind the underlay router (once per
    /// cluster) and returns it. The underlay namespace forwards between
    /// the two links; the nodes already route everything not theirs to
    /// it (their default route).
    pub fn add_outside(&self) -> anyhow::Result<Outside> {
        let ns = NetNs::new(&format!("dp{}o", self.id))?;
        self.underlay.sh(&format!(
            "ip link add ow type veth peer name eth0 netns {} && \
             ip addr add {OUTSIDE_GW}/24 dev ow && ip link set ow up && \
             sysctl -qw net.ipv4.ip_forward=1",
            ns.name
        ))?;
        ns.sh(&format!(
            "ip addr add {OUTSIDE_IP}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {OUTSIDE_GW}"
        ))?;
        Ok(Outside { ns, ip: OUTSIDE_IP })
    }
}

/// A TCP and a UDP server on `ip` in `ns` answering every connection and
/// datagram with the peer's address (`a.b.c.d:port`), so the caller
/// learns which source address and port reached it. Stopped on drop.
pub struct Witness {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A source a [`Witness`] saw: a UDP datagram's, or an accepted TCP
/// connection's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

impl Seen {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Seen::Udp(a) | Seen::Tcp(a) => *a,
        }
    }
}

impl Witness {
    pub fn start(ns: &NetNs, ip: Ipv4Addr, tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (s1, tx1) = (stop.clone(), tx.clone());
        let (seen_tcp, seen_udp) = (seen.clone(), seen.clone());
        let tcp = in_netns(ns, move || {
            let l = match TcpListener::bind((ip, tcp_port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx1.send(Err(e.into()));
                    return;
                }
            };
            let _ = tx1.send(Ok(()));
            for conn in l.incoming() {
                if s1.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                if let Ok(peer) = c.peer_addr() {
                    seen_tcp.lock().unwrap().push(Seen::Tcp(peer));
                }
                std::thread::spawn(move || {
                    let Ok(peer) = c.peer_addr() else { return };
                    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    if c.write_all(format!("{peer}\n").as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(format!("{peer}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let s2 = stop.clone();
        let udp = in_netns(ns, move || {
            let sock = match UdpSocket::bind((ip, udp_port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 512];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    seen_udp.lock().unwrap().push(Seen::Udp(from));
                    let _ = sock.send_to(from.to_string().as_bytes(), from);
                }
            }
        });
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .context("witness did not start")??;
        }
        Ok(Witness {
            stop,
            threads: vec![tcp, udp],
            addr: SocketAddr::from((ip, tcp_port)),
            seen,
        })
    }

    /// Every source seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The listener thread sees the flag at its next connection.
        let addr = self.addr;
        let _ = std::thread::spawn(move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100))
        });
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
