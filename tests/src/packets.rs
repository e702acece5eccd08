//! Frames for packet-level tests, built with etherparse, and checks on the
//! frames the programs produce: parsed with etherparse, lengths and
//! checksums verified on the way. Plain byte vectors: what the kernel sees.

use std::net::Ipv4Addr;

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, IpDscp, IpEcn, IpNumber, Ipv4Header, NetHeaders,
    PacketHeaders, TcpHeader, TransportHeader, UdpHeader,
};

pub const ETH_P_IP: u16 = EtherType::IPV4.0;
pub const ETH_P_ARP: u16 = EtherType::ARP.0;
pub const ETH_P_IPV6: u16 = EtherType::IPV6.0;

/// TCP flags as the `flags` byte of [`tcp`] takes them.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let h = Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType(ethertype),
    };
    let mut v = h.to_bytes().to_vec();
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

/// The IPv4 header [`ipv4`] writes (ID 0x1234, DF, TTL 64), for tests that
/// change a field (options, fragments) before [`ipv4_with`].
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    tos: u8,
    payload_len: usize,
) -> Ipv4Header {
    let mut h = Ipv4Header::new(
        payload_len.try_into().expect("IPv4 payload too long"),
        64,
        IpNumber(proto),
        src.octets(),
        dst.octets(),
    )
    .expect("IPv4 payload too long");
    h.identification = 0x1234;
    h.dscp = IpDscp::try_new(tos >> 2).unwrap();
    h.ecn = IpEcn::try_new(tos & 0x03).unwrap();
    h
}

/// `h` (its total length and checksum recomputed for `payload`) + `payload`.
pub fn ipv4_with(mut h: Ipv4Header, payload: &[u8]) -> Vec<u8> {
    h.set_payload_len(payload.len())
        .expect("IPv4 payload too long");
    h.header_checksum = h.calc_header_checksum();
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(ipv4_header(src, dst, proto, tos, payload.len()), payload)
}

/// The IPv4 packet `ip` (no options needed) as a router forwards it: TTL
/// one less, header checksum recomputed.
pub fn forwarded(ip: &[u8]) -> Vec<u8> {
    let mut v = ip.to_vec();
    assert!(v[8] > 1, "TTL {} does not survive a hop", v[8]);
    v[8] -= 1;
    set_ipv4_checksum(&mut v);
    v
}

/// Recomputes the header checksum of the IPv4 packet `ip` in place.
pub fn set_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = inet_csum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// UDP with a zero checksum (valid over IPv4).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let h = UdpHeader::without_ipv4_checksum(sport, dport, payload.len())
        .expect("UDP payload too long");
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// UDP with a correct checksum.
pub fn udp_csum(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = UdpHeader::without_ipv4_checksum(sport, dport, payload.len())
        .expect("UDP payload too long");
    h.checksum = h
        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload)
        .expect("UDP payload too long");
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// TCP header (no options, window 65535) + payload with a correct checksum
/// for src/dst. `flags` is the flags byte ([`TCP_SYN`] | ...).
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
    let mut h = TcpHeader::new(sport, dport, seq, 0xffff);
    h.acknowledgment_number = ack;
    h.fin = flags & TCP_FIN != 0;
    h.syn = flags & TCP_SYN != 0;
    h.rst = flags & TCP_RST != 0;
    h.psh = flags & TCP_PSH != 0;
    h.ack = flags & TCP_ACK != 0;
    h.checksum = h
        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload)
        .expect("TCP payload too long");
    let mut v = h.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A VXLAN header (etherparse has none): flags, reserved, VNI, reserved.
pub fn vxlan_hdr(flags: u8, vni: u32) -> [u8; 8] {
    let b = vni.to_be_bytes();
    [flags, 0, 0, 0, b[1], b[2], b[3], 0]
}

/// A complete VXLAN frame as a flannel node sends it (UDP checksum zero).
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
        let ip = ipv4(self.src_ip, self.dst_ip, IpNumber::UDP.0, 0, &u);
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
        &ipv4(src, dst, IpNumber::UDP.0, 0, &udp(40000, 53, payload)),
    )
}

/// An IPv4 packet the programs produced, parsed and checked: IPv4 header
/// checksum, total length against the bytes present, and the TCP, UDP
/// (unless zero) or ICMP checksum.
#[derive(Debug)]
pub struct Ipv4Packet {
    pub ip: Ipv4Header,
    pub transport: Option<TransportHeader>,
    /// What follows the transport header (the IPv4 payload if there is none).
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn src(&self) -> Ipv4Addr {
        self.ip.source.into()
    }

    pub fn dst(&self) -> Ipv4Addr {
        self.ip.destination.into()
    }

    pub fn tcp(&self) -> &TcpHeader {
        match &self.transport {
            Some(TransportHeader::Tcp(t)) => t,
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    pub fn udp(&self) -> &UdpHeader {
        match &self.transport {
            Some(TransportHeader::Udp(u)) => u,
            other => panic!("expected UDP, got {other:?}"),
        }
    }

    pub fn icmp(&self) -> &Icmpv4Header {
        match &self.transport {
            Some(TransportHeader::Icmpv4(i)) => i,
            other => panic!("expected ICMP, got {other:?}"),
        }
    }
}

/// Parses and checks the IPv4 packet `ip` (see [`Ipv4Packet`]). Panics
/// with a clear message when it is malformed or a checksum is wrong.
pub fn parse_ipv4(ip: &[u8]) -> Ipv4Packet {
    try_parse_ipv4(ip).unwrap_or_else(|e| panic!("{e}"))
}

/// [`parse_ipv4`], with the problem as an error instead of a panic.
pub fn try_parse_ipv4(ip: &[u8]) -> Result<Ipv4Packet, String> {
    let h = PacketHeaders::from_ip_slice(ip).map_err(|e| format!("not IPv4: {e}"))?;
    let Some(NetHeaders::Ipv4(iph, _)) = h.net else {
        return Err(format!("not IPv4: {:?}", h.net));
    };
    if usize::from(iph.total_len) != ip.len() {
        return Err(format!(
            "IPv4 total length {} but {} bytes",
            iph.total_len,
            ip.len()
        ));
    }
    let check = |what: &str, got: u16, want: u16| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what} checksum {got:#06x}, should be {want:#06x}"))
        }
    };
    check(
        "IPv4 header",
        iph.header_checksum,
        iph.calc_header_checksum(),
    )?;
    let payload = h.payload.slice().to_vec();
    let (src, dst) = (iph.source, iph.destination);
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => check(
            "TCP",
            t.checksum,
            t.calc_checksum_ipv4_raw(src, dst, &payload).unwrap(),
        )?,
        Some(TransportHeader::Udp(u)) if u.checksum != 0 => check(
            "UDP",
            u.checksum,
            u.calc_checksum_ipv4_raw(src, dst, &payload).unwrap(),
        )?,
        Some(TransportHeader::Icmpv4(i)) => check(
            "ICMP",
            i.checksum,
            Icmpv4Header::with_checksum(i.icmp_type.clone(), &payload).checksum,
        )?,
        _ => {}
    }
    Ok(Ipv4Packet {
        ip: iph,
        transport: h.transport,
        payload,
    })
}

/// Parses the IPv4 packet behind the Ethernet header of `frame`.
pub fn parse_eth_ipv4(frame: &[u8]) -> (Ethernet2Header, Ipv4Packet) {
    let (e, rest) = Ethernet2Header::from_slice(frame).expect("Ethernet header");
    assert_eq!(e.ether_type, EtherType::IPV4, "ethertype");
    (e, parse_ipv4(rest))
}

/// Does this IPv4 packet carry valid IPv4 and L4 checksums?
pub fn ipv4_checksums_ok(ip: &[u8]) -> bool {
    try_parse_ipv4(ip).is_ok()
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
    /// The outer IPv4 header's ECN bits.
    pub ecn: u8,
    pub sport: u16,
    pub dport: u16,
    pub udp_csum: u16,
    pub vxlan: [u8; 8],
    /// The whole inner Ethernet frame.
    pub inner: Vec<u8>,
}

impl ParsedVxlan {
    /// The inner IPv4 packet, parsed and checked.
    pub fn inner_ipv4(&self) -> Ipv4Packet {
        parse_eth_ipv4(&self.inner).1
    }
}

pub fn parse_vxlan(f: &[u8]) -> ParsedVxlan {
    let (e, rest) = Ethernet2Header::from_slice(f).expect("outer Ethernet header");
    assert_eq!(e.ether_type, EtherType::IPV4, "outer ethertype");
    let (ip, rest) = Ipv4Header::from_slice(rest).expect("outer IPv4 header");
    assert_eq!(ip.ihl(), 5, "no options in the outer IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "outer IPv4 header checksum must verify"
    );
    assert_eq!(
        usize::from(ip.total_len),
        f.len() - Ethernet2Header::LEN,
        "outer IPv4 total length"
    );
    assert_eq!(ip.protocol, IpNumber::UDP, "outer protocol must be UDP");
    let (u, rest) = UdpHeader::from_slice(rest).expect("UDP header");
    assert_eq!(
        usize::from(u.length),
        UdpHeader::LEN + rest.len(),
        "UDP length"
    );
    assert!(
        rest.len() >= 8 + Ethernet2Header::LEN,
        "too short for VXLAN: {} bytes after UDP",
        rest.len()
    );
    ParsedVxlan {
        outer_dst_mac: e.destination,
        outer_src_mac: e.source,
        src_ip: ip.source.into(),
        dst_ip: ip.destination.into(),
        ttl: ip.time_to_live,
        ecn: ip.ecn.value(),
        sport: u.source_port,
        dport: u.destination_port,
        udp_csum: u.checksum,
        vxlan: rest[..8].try_into().unwrap(),
        inner: rest[8..].to_vec(),
    }
}

/// Sets the ECN bits of the outer IPv4 header of a VXLAN frame built by
/// [`VxlanFrame::build`] and recomputes that header's checksum.
pub fn set_outer_ecn(frame: &mut [u8], ecn: u8) {
    let ip = &mut frame[14..34];
    ip[1] = (ip[1] & !0x03) | (ecn & 0x03);
    ip[10..12].copy_from_slice(&[0, 0]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// ECN codepoints (RFC 3168).
pub const ECN_NOT_ECT: u8 = 0;
pub const ECN_ECT1: u8 = 1;
pub const ECN_ECT0: u8 = 2;
pub const ECN_CE: u8 = 3;

/// ICMP types and codes of the errors the tests build and expect.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// An ICMP error message (checksum included): type, code, the 4 bytes
/// after the checksum (for "fragmentation needed": unused, next-hop MTU),
/// then `quoted`, the start of the offending IPv4 packet.
pub fn icmp_error(type_: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut v = vec![type_, code, 0, 0];
    v.extend_from_slice(&rest);
    v.extend_from_slice(quoted);
    let c = inet_csum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

/// The packet an ICMP error quotes, parsed: its IPv4 header (checksum
/// verified) and the bytes after it.
pub fn parse_quote(quote: &[u8]) -> (Ipv4Header, Vec<u8>) {
    let (h, rest) = Ipv4Header::from_slice(quote).expect("quoted IPv4 header");
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "quoted IPv4 header checksum"
    );
    (h, rest.to_vec())
}

/// Does the TCP or UDP segment `l4` (whole) carry a valid checksum for
/// these addresses? A zero UDP checksum counts as valid.
pub fn l4_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> bool {
    if proto == IpNumber::UDP.0 && l4[6..8] == [0, 0] {
        return true;
    }
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    inet_csum(&pseudo) == 0
}

/// The two fragments of an IPv4 datagram `src` -> `dst` carrying the
/// transport segment `l4` (checksum over the whole of it), split after
/// `first_len` bytes (a multiple of 8), IP ID `id`.
pub fn fragments(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    l4: &[u8],
    first_len: usize,
) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte blocks");
    let mut h = ipv4_header(src, dst, proto, 0, 0);
    h.identification = id;
    h.dont_fragment = false;
    h.more_fragments = true;
    let first = ipv4_with(h.clone(), &l4[..first_len]);
    h.more_fragments = false;
    h.fragment_offset = etherparse::IpFragOffset::try_new((first_len / 8) as u16).unwrap();
    let second = ipv4_with(h, &l4[first_len..]);
    [first, second]
}
