//! Service test support: backend servers that answer with their own
//! address (TCP and UDP), clients, and manifest builders.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::{NetNs, in_netns};

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// A backend: a TCP server and a UDP server in a pod namespace, each
/// answering with the pod's address. Stopped on drop.
pub struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ip: Ipv4Addr,
}

impl Backend {
    pub fn start(ns: &NetNs, ip: Ipv4Addr) -> anyhow::Result<Backend> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (s1, tx1) = (stop.clone(), tx.clone());
        let tcp = in_netns(ns, move || {
            let l = match TcpListener::bind((ip, TCP_PORT)) {
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
                // One thread per connection: a long-lived client must not
                // hold up the others. Answer at once, then one answer per
                // byte the client writes, until it closes.
                std::thread::spawn(move || {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    if c.write_all(format!("{ip}\n").as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(format!("{ip}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let s2 = stop.clone();
        let udp = in_netns(ns, move || {
            let sock = match UdpSocket::bind((ip, UDP_PORT)) {
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
                    let _ = sock.send_to(ip.to_string().as_bytes(), from);
                }
            }
        });
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .context("backend did not start")??;
        }
        Ok(Backend {
            stop,
            threads: vec![tcp, udp],
            ip,
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock accept() with a connection of our own, from the server's
        // namespace is not needed: the listener thread exits on the flag at
        // its next connection; poke it and move on.
        let ip = self.ip;
        let _ = std::thread::spawn(move || {
            TcpStream::connect_timeout(
                &SocketAddr::from((ip, TCP_PORT)),
                Duration::from_millis(100),
            )
        });
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Opens `n` TCP connections from the client namespace to `addr:port`,
/// one after the other, and returns what each answered (or its error).
pub fn tcp_ask_many(
    client: &NetNs,
    addr: Ipv4Addr,
    port: u16,
    n: usize,
) -> Vec<Result<String, String>> {
    in_netns(client, move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from((addr, port)),
                    Duration::from_secs(3),
                )
                .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).map_err(|e| e.to_string())? == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                Ok(String::from_utf8_lossy(&line).into_owned())
            })
            .collect()
    })
    .join()
    .expect("client thread")
}

pub fn tcp_ask(client: &NetNs, addr: Ipv4Addr, port: u16) -> Result<String, String> {
    tcp_ask_many(client, addr, port, 1).remove(0)
}

/// One UDP request/response, as a DNS client would do it.
pub fn udp_ask(
    client: &NetNs,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<String, String> {
    in_netns(client, move || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
        s.connect((addr, port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.send(b"query").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .expect("client thread")
}

/// A long-lived TCP connection held in the client namespace: each
/// `ask()` writes a byte and reads the backend's answer.
pub struct Conn {
    tx: std::sync::mpsc::Sender<()>,
    rx: std::sync::mpsc::Receiver<Result<String, String>>,
}

impl Conn {
    pub fn open(client: &NetNs, addr: Ipv4Addr, port: u16) -> Result<(Conn, String), String> {
        let (tx, req) = std::sync::mpsc::channel::<()>();
        let (resp, rx) = std::sync::mpsc::channel();
        in_netns(client, move || {
            let mut s = match TcpStream::connect_timeout(
                &SocketAddr::from((addr, port)),
                Duration::from_secs(3),
            ) {
                Ok(s) => s,
                Err(e) => {
                    let _ = resp.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let read_line = |s: &mut TcpStream| -> Result<String, String> {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                loop {
                    match s.read(&mut b) {
                        Ok(1) if b[0] != b'\n' => line.push(b[0]),
                        Ok(1) => return Ok(String::from_utf8_lossy(&line).into_owned()),
                        Ok(_) => return Err("closed".into()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
            };
            let _ = resp.send(read_line(&mut s));
            while req.recv().is_ok() {
                let r = s
                    .write_all(b"?")
                    .map_err(|e| e.to_string())
                    .and_then(|()| read_line(&mut s));
                let _ = resp.send(r);
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())??;
        Ok((Conn { tx, rx }, first))
    }

    pub fn ask(&self) -> Result<String, String> {
        self.tx.send(()).map_err(|e| e.to_string())?;
        self.rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?
    }
}

/// An endpoint for [`endpoint_slice`]: address and conditions.
#[derive(Clone, Copy)]
pub struct Ep {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Ep {
    pub fn ready(ip: Ipv4Addr) -> Ep {
        Ep {
            ip,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
    pub fn terminating(ip: Ipv4Addr) -> Ep {
        Ep {
            ip,
            ready: false,
            serving: true,
            terminating: true,
        }
    }
}

/// A Service with a TCP port 80 -> 8080 ("http") and a UDP port 53 ->
/// 5353 ("dns").
pub fn service(name: &str, cluster_ip: Ipv4Addr, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n{extra_spec}  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {TCP_PORT}\n  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: {UDP_PORT}\n"
    )
}

/// The EndpointSlice of `service` with these endpoints.
pub fn endpoint_slice(service: &str, eps: &[Ep]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: http\n    protocol: TCP\n    port: {TCP_PORT}\n  - name: dns\n    protocol: UDP\n    port: {UDP_PORT}\nendpoints:\n"
    );
    if eps.is_empty() {
        s.push_str("  []\n");
    }
    for e in eps {
        s.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions:\n      ready: {}\n      serving: {}\n      terminating: {}\n",
            e.ip, e.ready, e.serving, e.terminating
        ));
    }
    s
}

/// UDP request from a fixed source port (a resolver reusing its socket:
/// the case the stuck-conntrack DNS bug hit).
pub fn udp_ask_from(
    client: &NetNs,
    sport: u16,
    addr: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<String, String> {
    in_netns(client, move || {
        let s = UdpSocket::bind(("0.0.0.0", sport)).map_err(|e| e.to_string())?;
        s.connect((addr, port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.send(b"query").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .expect("client thread")
}
