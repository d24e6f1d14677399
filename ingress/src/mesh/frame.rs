//! The few things the mesh reads and changes in a frame, in place: Ethernet addresses, the
//! IPv4 addresses and TCP/UDP ports of a flow, with the checksums updated incrementally
//! (RFC 1624) rather than recomputed, so a rewrite costs the same for 60 bytes as for 9,000.
//!
//! Only Ethernet II (no VLAN tag) with IPv4 and an unfragmented TCP or UDP packet is a flow;
//! anything else is `None` to [`parse`], and the mesh counts it.

use std::net::{Ipv4Addr, SocketAddrV4};

use shoal_vxlan::wire::Mac;

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;

/// TCP flags the flow table follows.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

const ETH: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

/// Where a flow's fields lie in a frame, and their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// TCP flags (0 for UDP).
    pub flags: u8,
    /// Offset of the TCP or UDP header.
    l4: usize,
}

/// Reads a frame's flow, if it is one (see the module documentation).
pub fn parse(frame: &[u8]) -> Option<Flow> {
    if frame.len() < ETH + 20 || frame[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH..];
    let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0x0f) * 4);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if version != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    // More fragments, or an offset: a fragment has no (or not all of its) ports.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let proto = ip[9];
    let l4 = ETH + ihl;
    let need = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    if total - ihl < need {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Some(Flow {
        proto,
        src: SocketAddrV4::new(addr(12), port(l4)),
        dst: SocketAddrV4::new(addr(16), port(l4 + 2)),
        flags: if proto == TCP { frame[l4 + 13] } else { 0 },
        l4,
    })
}

/// Sets the Ethernet destination and source.
pub fn set_macs(frame: &mut [u8], dst: Mac, src: Mac) {
    frame[0..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&src.0);
}

/// Which end of a flow [`rewrite`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source address and port.
    Source,
    /// The destination address and port.
    Destination,
}

/// Changes one end of `flow` (as [`parse`] read it from `frame`) to `to`, updating the IPv4
/// header checksum and the TCP or UDP checksum (whose pseudo-header holds the addresses).
/// A `partial` checksum (the field holds the pseudo-header sum, uncomplemented, and the rest
/// is summed later, as Linux's CHECKSUM_PARTIAL) gets only the addresses' change.
pub fn rewrite(frame: &mut [u8], flow: &Flow, end: End, to: SocketAddrV4, partial: bool) {
    let (ip_at, port_at, from) = match end {
        End::Source => (ETH + 12, flow.l4, flow.src),
        End::Destination => (ETH + 16, flow.l4 + 2, flow.dst),
    };
    let (old_ip, new_ip) = (from.ip().octets(), to.ip().octets());
    let (old_port, new_port) = (from.port().to_be_bytes(), to.port().to_be_bytes());
    frame[ip_at..ip_at + 4].copy_from_slice(&new_ip);
    frame[port_at..port_at + 2].copy_from_slice(&new_port);
    let ip_sum = ETH + 10;
    let sum = read16(frame, ip_sum);
    write16(frame, ip_sum, adjust(sum, &old_ip, &new_ip));
    let l4_sum = match flow.proto {
        TCP => flow.l4 + 16,
        _ => flow.l4 + 6,
    };
    let sum = read16(frame, l4_sum);
    if partial {
        write16(frame, l4_sum, !adjust(!sum, &old_ip, &new_ip));
        return;
    }
    if flow.proto == UDP && sum == 0 {
        // UDP without a checksum stays without one.
        return;
    }
    let sum = adjust(adjust(sum, &old_ip, &new_ip), &old_port, &new_port);
    // In UDP, 0 means "none": a computed 0 is sent as all ones (RFC 768).
    let sum = if flow.proto == UDP && sum == 0 {
        0xffff
    } else {
        sum
    };
    write16(frame, l4_sum, sum);
}

fn read16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn write16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// RFC 1624 (eqn. 3): the checksum `sum` of data in which the 16-bit words `old` became
/// `new` (equal, even lengths): HC' = ~(~HC + ~m + m').
fn adjust(sum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!sum);
    for w in old.chunks_exact(2) {
        acc += u32::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    for w in new.chunks_exact(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .tcp(src.port(), dst.port(), 1000, 64_000)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .udp(src.port(), dst.port());
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// Whether the frame's IPv4 and TCP/UDP checksums are right, recomputed from scratch.
    fn checksums_ok(frame: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            return false;
        };
        let h = ip.header();
        if h.to_header().calc_header_checksum() != h.header_checksum() {
            return false;
        }
        let payload = ip.payload().payload;
        match p.transport {
            Some(TransportSlice::Tcp(t)) => {
                t.to_header()
                    .calc_checksum_ipv4(&h.to_header(), t.payload())
                    .unwrap()
                    == t.checksum()
            }
            Some(TransportSlice::Udp(u)) => {
                let _ = payload;
                u.to_header()
                    .calc_checksum_ipv4(&h.to_header(), u.payload())
                    .unwrap()
                    == u.checksum()
            }
            _ => false,
        }
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn reads_a_tcp_flow_and_rewrites_both_ends_with_valid_checksums() {
        let mut f = tcp_frame(sa("198.18.9.9:40000"), sa("198.18.0.1:8080"), b"hello");
        let flow = parse(&f).unwrap();
        assert_eq!(
            (flow.proto, flow.src, flow.dst, flow.flags),
            (
                TCP,
                sa("198.18.9.9:40000"),
                sa("198.18.0.1:8080"),
                tcp_flags::SYN
            )
        );
        rewrite(&mut f, &flow, End::Destination, sa("10.0.1.5:80"), false);
        assert!(checksums_ok(&f));
        let after = parse(&f).unwrap();
        assert_eq!(
            (after.src, after.dst),
            (sa("198.18.9.9:40000"), sa("10.0.1.5:80"))
        );
        rewrite(&mut f, &after, End::Source, sa("198.18.0.7:1"), false);
        assert!(checksums_ok(&f));
        assert_eq!(parse(&f).unwrap().src, sa("198.18.0.7:1"));
    }

    #[test]
    fn udp_keeps_no_checksum_and_never_writes_zero() {
        let mut f = udp_frame(sa("198.18.9.9:5000"), sa("198.18.0.1:53"), b"q");
        let flow = parse(&f).unwrap();
        rewrite(&mut f, &flow, End::Destination, sa("10.0.1.5:5353"), false);
        assert!(checksums_ok(&f));
        // No checksum (0) stays none.
        let mut g = udp_frame(sa("198.18.9.9:5000"), sa("198.18.0.1:53"), b"q");
        let at = flow.l4 + 6;
        g[at..at + 2].copy_from_slice(&[0, 0]);
        rewrite(&mut g, &flow, End::Destination, sa("10.0.1.5:5353"), false);
        assert_eq!(&g[at..at + 2], &[0, 0]);
    }

    #[test]
    fn not_a_flow() {
        let f = tcp_frame(sa("198.18.9.9:40000"), sa("198.18.0.1:8080"), b"x");
        // Too short, not IPv4, a fragment, ICMP, a lying total length.
        assert!(parse(&f[..30]).is_none());
        let mut g = f.clone();
        g[12] = 0x86;
        assert!(parse(&g).is_none());
        let mut g = f.clone();
        g[ETH + 6] = 0x20; // more fragments
        assert!(parse(&g).is_none());
        let mut g = f.clone();
        g[ETH + 9] = 1;
        assert!(parse(&g).is_none());
        let mut g = f.clone();
        g[ETH + 2] = 0xff;
        assert!(parse(&g).is_none());
    }

    #[test]
    fn a_partial_checksum_gets_the_addresses_change_and_completes_right() {
        use shoal_vxlan::offload::{segment, VirtioNetHdr};
        let mut f = tcp_frame(sa("198.18.9.9:40000"), sa("198.18.0.1:8080"), b"some data");
        let flow = parse(&f).unwrap();
        // As Linux hands it over with checksum offload: the field holds the pseudo-header
        // sum (addresses, protocol, length), folded and not complemented.
        let l4_len = (f.len() - flow.l4) as u32;
        let mut sum: u32 = 0;
        for w in f[ETH + 12..ETH + 20].chunks_exact(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        sum += u32::from(TCP) + l4_len;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let at = flow.l4 + 16;
        f[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
        rewrite(&mut f, &flow, End::Destination, sa("10.0.1.5:80"), true);
        let hdr = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: flow.l4 as u16,
            csum_offset: 16,
        };
        let mut done = Vec::new();
        segment(&hdr, &mut f, |head, tail| {
            done = [head, tail].concat();
        })
        .unwrap();
        assert!(checksums_ok(&done), "completed after the rewrite");
        assert_eq!(parse(&done).unwrap().dst, sa("10.0.1.5:80"));
    }

    proptest! {
        #[test]
        fn rewrites_keep_checksums_valid(
            a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), c in any::<[u8; 4]>(),
            p in any::<u16>(), q in any::<u16>(), r in any::<u16>(),
            udp in any::<bool>(), src_end in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (s, d) = (SocketAddrV4::new(a.into(), p), SocketAddrV4::new(b.into(), q));
            let mut f = if udp { udp_frame(s, d, &payload) } else { tcp_frame(s, d, &payload) };
            let flow = parse(&f).unwrap();
            let end = if src_end { End::Source } else { End::Destination };
            rewrite(&mut f, &flow, end, SocketAddrV4::new(c.into(), r), false);
            prop_assert!(checksums_ok(&f));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse(&bytes);
        }
    }
}
