//! Hand-built frames for packet-level tests, and checks on frames the
//! programs produce. Plain byte vectors: what the kernel sees.

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(14 + payload.len());
    v.extend_from_slice(&dst);
    v.extend_from_slice(&src);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Internet checksum over `data`.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = inet_csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// UDP with a zero checksum (valid over IPv4).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

pub fn vxlan_hdr(flags: u8, vni: u32) -> [u8; 8] {
    let b = vni.to_be_bytes();
    [flags, 0, 0, 0, b[1], b[2], b[3], 0]
}

/// A complete VXLAN frame as a flannel node sends it.
pub struct VxlanFrame {
    pub outer_dst_mac: [u8; 6],
    pub outer_src_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub vni: u32,
    /// The whole inner Ethernet frame.
    pub inner: Vec<u8>,
}

impl VxlanFrame {
    pub fn build(&self) -> Vec<u8> {
        let mut vx = vxlan_hdr(self.flags, self.vni).to_vec();
        vx.extend_from_slice(&self.inner);
        let u = udp(self.sport, self.dport, &vx);
        let ip = ipv4(self.src_ip, self.dst_ip, 17, 0, &u);
        eth(self.outer_dst_mac, self.outer_src_mac, ETH_P_IP, &ip)
    }
}

/// A pod's IPv4/UDP packet inside an Ethernet frame.
pub fn pod_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &[u8],
) -> Vec<u8> {
    eth(
        dst_mac,
        src_mac,
        ETH_P_IP,
        &ipv4(src, dst, 17, 0, &udp(40000, 53, payload)),
    )
}

/// The fields of a VXLAN frame, checked for well-formedness on the way
/// (IPv4 header checksum, lengths). Panics with a clear message otherwise.
#[derive(Debug)]
pub struct ParsedVxlan {
    pub outer_dst_mac: [u8; 6],
    pub outer_src_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub udp_csum: u16,
    pub vxlan: [u8; 8],
    pub inner: Vec<u8>,
}

pub fn parse_vxlan(f: &[u8]) -> ParsedVxlan {
    assert!(
        f.len() >= 50 + 14,
        "frame too short for VXLAN: {} bytes",
        f.len()
    );
    assert_eq!(
        u16::from_be_bytes([f[12], f[13]]),
        ETH_P_IP,
        "outer ethertype"
    );
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45, "outer IPv4 version/ihl");
    assert_eq!(inet_csum(ip), 0, "outer IPv4 header checksum must verify");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        f.len() - 14,
        "outer IPv4 total length"
    );
    assert_eq!(ip[9], 17, "outer protocol must be UDP");
    let u = &f[34..42];
    assert_eq!(
        u16::from_be_bytes([u[4], u[5]]) as usize,
        f.len() - 34,
        "UDP length"
    );
    let mut vxlan = [0u8; 8];
    vxlan.copy_from_slice(&f[42..50]);
    ParsedVxlan {
        outer_dst_mac: f[0..6].try_into().unwrap(),
        outer_src_mac: f[6..12].try_into().unwrap(),
        src_ip: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst_ip: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        sport: u16::from_be_bytes([u[0], u[1]]),
        dport: u16::from_be_bytes([u[2], u[3]]),
        udp_csum: u16::from_be_bytes([u[6], u[7]]),
        vxlan,
        inner: f[50..].to_vec(),
    }
}

/// TCP header (no options) + payload with a correct checksum for src/dst.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    let c = l4_csum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// UDP with a correct checksum.
pub fn udp_csum(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    let c = l4_csum(src, dst, 17, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// Checksum of an L4 segment with the IPv4 pseudo-header (field zeroed or not:
/// a segment with a correct checksum sums to zero).
pub fn l4_csum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    p.extend_from_slice(seg);
    inet_csum(&p)
}

/// Does this IPv4 packet (no options) carry valid IPv4 and L4 checksums?
pub fn ipv4_checksums_ok(ip: &[u8]) -> bool {
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    inet_csum(&ip[..20]) == 0 && l4_csum(src, dst, ip[9], &ip[20..total]) == 0
}
