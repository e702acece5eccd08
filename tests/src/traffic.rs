//! Traffic generators that run inside pod namespaces (threads that joined
//! the namespace), so tests need no external tools: a bulk TCP transfer
//! with an end-to-end checksum, and UDP request/response.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{NetNs, in_netns};

/// FNV-1a 64 over a stream, good enough to catch corruption and reordering.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Deterministic pseudo-random bytes (xorshift), so both ends need not
/// share a buffer and a shifted or repeated block changes the checksum.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let b = state.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

pub struct BulkResult {
    pub bytes: u64,
    pub elapsed: Duration,
    pub sent_sum: u64,
    pub received_sum: u64,
}

impl BulkResult {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Sends `bytes` over TCP from `client` (in its namespace) to a listener
/// on `server_ip` in `server`'s namespace; both sides checksum the stream.
pub fn bulk_tcp(
    server: &NetNs,
    server_ip: Ipv4Addr,
    client: &NetNs,
    bytes: u64,
) -> anyhow::Result<BulkResult> {
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let srv = in_netns(server, move || -> anyhow::Result<(u64, u64)> {
        let l = TcpListener::bind((server_ip, 0)).context("bind")?;
        port_tx.send(l.local_addr()?.port())?;
        let (mut s, _) = l.accept().context("accept")?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut sum = Fnv::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).context("server read")?;
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
            total += n as u64;
        }
        Ok((total, sum.get()))
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(5))
        .context("server did not start")?;
    let cli = in_netns(client, move || -> anyhow::Result<(u64, Duration)> {
        let addr = SocketAddr::from((server_ip, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut sum = Fnv::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill(&mut buf[..n], &mut state);
            s.write_all(&buf[..n]).context("client write")?;
            sum.update(&buf[..n]);
            left -= n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // Wait for the server to close so elapsed covers delivery.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        Ok((sum.get(), start.elapsed()))
    });
    let (sent_sum, elapsed) = cli
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let (received, received_sum) = srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    if received != bytes {
        bail!("received {received} of {bytes} bytes");
    }
    Ok(BulkResult {
        bytes,
        elapsed,
        sent_sum,
        received_sum,
    })
}
