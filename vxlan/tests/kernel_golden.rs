//! Golden bytes from the Linux kernel's vxlan device (plain mode must interoperate with it).
//!
//! `tests/fixtures/kernel-vxlan.pcap` holds an ICMP echo request and reply between two kernel
//! vxlan devices (VNI 4096, port 4789), captured on the underlay; `kernel-vxlan.sh` beside it is
//! the script that made it. Our parser must read those datagrams, our engine must deliver their
//! frames, and our emitter must reproduce them byte for byte.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;
use shoal_vxlan::wire::{header, Header};
use shoal_vxlan::{Engine, Mac, Packet, Transmits, Vni};

struct Captured {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

fn captured() -> Vec<Captured> {
    let file = std::fs::File::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kernel-vxlan.pcap"
    ))
    .unwrap();
    let mut reader = PcapReader::new(file).unwrap();
    let mut out = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.unwrap();
        let sliced = SlicedPacket::from_ethernet(&pkt.data).unwrap();
        let Some(NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("not IPv4")
        };
        let Some(TransportSlice::Udp(udp)) = sliced.transport else {
            panic!("not UDP")
        };
        out.push(Captured {
            src: SocketAddr::new(IpAddr::V4(ip.header().source_addr()), udp.source_port()),
            dst: SocketAddr::new(
                IpAddr::V4(ip.header().destination_addr()),
                udp.destination_port(),
            ),
            payload: udp.payload().to_vec(),
        });
    }
    out
}

#[test]
fn kernel_datagrams_parse() {
    let caps = captured();
    assert_eq!(caps.len(), 2, "echo request and reply");
    for c in &caps {
        assert_eq!(c.dst.port(), 4789);
        let h = Header::new_checked(&c.payload[..]).unwrap();
        let repr = header::Repr::parse(&h);
        assert_eq!(repr.vni, Vni::new(4096).unwrap());
        assert!(!repr.sealed);
        // Inner Ethernet carrying IPv4 ICMP between the overlay addresses.
        let inner = SlicedPacket::from_ethernet(h.payload()).unwrap();
        let Some(NetSlice::Ipv4(ip)) = inner.net else {
            panic!("inner not IPv4")
        };
        assert_eq!(ip.header().protocol(), etherparse::IpNumber::ICMP);
    }
}

#[test]
fn engine_delivers_and_reproduces_kernel_datagrams() {
    let vni = Vni::new(4096).unwrap();
    for c in captured() {
        let inner = &c.payload[header::HEADER_LEN..];
        let src_mac = Mac::src_of(inner).unwrap();
        let dst_mac = Mac::dst_of(inner).unwrap();

        // Receiving side: the kernel sender is an external VTEP on a plain network.
        let mut rx = Engine::new(shoal_vxlan::testing::local(1, 1));
        rx.add_network(vni, false).unwrap();
        rx.set_peer(SocketAddr::new(c.src.ip(), 4789), None)
            .unwrap();
        rx.fdb_mut(vni).unwrap().insert(src_mac, c.src.ip());
        let mut pkt = Packet::new(1500);
        assert!(pkt.set_datagram(&c.payload));
        let opened = rx.handle_datagram(Instant::now(), c.src, &mut pkt).unwrap();
        assert_eq!(opened.frame(), inner);

        // Sending side: the same frame, encapsulated by us, is the kernel's datagram exactly.
        let mut tx = Engine::new(shoal_vxlan::testing::local(2, 1));
        tx.add_network(vni, false).unwrap();
        tx.set_peer(c.dst, None).unwrap();
        tx.fdb_mut(vni).unwrap().insert(dst_mac, c.dst.ip());
        let mut out = Transmits::new(1500);
        let mut frame = Packet::new(1500);
        assert!(frame.set_frame(inner));
        assert_eq!(
            tx.handle_frame(Instant::now(), vni, &mut frame, &mut out),
            Ok(1)
        );
        let t = &out.ready()[0];
        assert_eq!(t.dst, c.dst);
        assert_eq!(t.packet.data(), &c.payload[..]);
    }
}
