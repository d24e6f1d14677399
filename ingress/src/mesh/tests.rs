//! Two meshes passing frames as two nodes' data paths would: a client outside, an ingress
//! node N, a backend node M.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use etherparse::{PacketBuilder, SlicedPacket};
use shoal_vxlan::io::Steer;
use shoal_vxlan::wire::{Mac, Vni};

use super::flows::Timeouts;
use super::frame::{self, tcp_flags, TCP, UDP};
use super::*;

const VNI: u32 = 4097;
const N_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const M_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const N_NODE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const M_NODE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
const B1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 5); // on M
const B2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 20); // on N
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 250);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const CLIENT_MAC: Mac = Mac([0x02, 0x99, 0, 0, 0, 1]);
const N_ETH_MAC: Mac = Mac([0x02, 0x88, 0, 0, 0, 1]);

fn mac_of(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

fn vni() -> Vni {
    Vni::new(VNI).unwrap()
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The cluster's view from `me`: web (VIP, 8080->80/tcp, 5353->53/udp) with backends B1
/// on M and B2 on N, each healthy or not.
fn config(me: Ipv4Addr, healthy: [bool; 2], timeouts: Timeouts) -> MeshConfig {
    let (node, underlay) = if me == N_UNDERLAY {
        (N_NODE, N_UNDERLAY)
    } else {
        (M_NODE, M_UNDERLAY)
    };
    let at = |host: Ipv4Addr| (host != me).then_some(IpAddr::V4(host));
    MeshConfig {
        node,
        addresses: vec![underlay],
        networks: vec![MeshNetwork {
            vni: VNI,
            subnet: "198.19.1.0/24".parse().unwrap(),
            gateway: GATEWAY,
            services: vec![MeshService {
                name: "web".into(),
                vip: Some(VIP),
                ports: vec![
                    PortMap {
                        proto: TCP,
                        published: 8080,
                        target: 80,
                        host_mode: false,
                    },
                    PortMap {
                        proto: UDP,
                        published: 5353,
                        target: 53,
                        host_mode: false,
                    },
                ],
                backends: vec![
                    MeshBackend {
                        ip: B1,
                        mac: mac_of(B1),
                        node: at(M_UNDERLAY),
                        healthy: healthy[0],
                    },
                    MeshBackend {
                        ip: B2,
                        mac: mac_of(B2),
                        node: at(N_UNDERLAY),
                        healthy: healthy[1],
                    },
                ],
            }],
        }],
        timeouts,
        max_flows: 10_000,
    }
}

fn mesh(me: Ipv4Addr, healthy: [bool; 2]) -> Mesh {
    let mut m = Mesh::new(Ipv4Addr::UNSPECIFIED);
    m.set_config(&config(me, healthy, Timeouts::default()));
    m
}

fn tcp(
    macs: (Mac, Mac),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.1 .0, macs.0 .0)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1, 65_000);
    let b = match flags {
        tcp_flags::SYN => b.syn(),
        f if f == tcp_flags::SYN | tcp_flags::ACK => b.syn().ack(1),
        tcp_flags::RST => b.rst(),
        _ => b.ack(1),
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// (dst MAC, src MAC, src, dst), and that the checksums hold.
fn read(f: &[u8]) -> (Mac, Mac, SocketAddrV4, SocketAddrV4) {
    let p = SlicedPacket::from_ethernet(f).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 checksum");
    if let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport {
        let sum = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
        assert_eq!(sum, t.checksum(), "TCP checksum");
    }
    let fl = frame::parse(f).unwrap();
    (
        Mac::dst_of(f).unwrap(),
        Mac::src_of(f).unwrap(),
        fl.src,
        fl.dst,
    )
}

fn client(port: u16) -> SocketAddrV4 {
    sa(Ipv4Addr::new(198, 18, 9, 9), port)
}

#[test]
fn a_published_flow_goes_to_a_remote_backend_and_comes_back_with_the_clients_view() {
    let t0 = Instant::now();
    let (mut n, mut m) = (
        mesh(N_UNDERLAY, [true, false]),
        mesh(M_UNDERLAY, [true, false]),
    );
    let published = sa(N_UNDERLAY, 8080);
    // Client -> N: to B1 on M, the client's address kept.
    let mut f = tcp(
        (N_ETH_MAC, CLIENT_MAC),
        client(40_000),
        published,
        tcp_flags::SYN,
        b"",
    );
    let to = n.on_outside(t0, &mut f, false);
    assert_eq!(
        to,
        Steer::Peer {
            vni: vni(),
            vtep: M_UNDERLAY.into()
        }
    );
    assert_eq!(
        read(&f),
        (mac_of(B1), device_mac(N_NODE), client(40_000), sa(B1, 80))
    );
    // N -> M: claimed (source is N's device MAC), delivered, the way back noted.
    assert!(claims_from_peer(&f));
    assert_eq!(m.on_peer(t0, vni(), N_UNDERLAY.into(), &mut f), Steer::Pass);
    // B1's answer, to its default gateway: sent back to N.
    let mut r = tcp(
        (router_mac(VNI), mac_of(B1)),
        sa(B1, 80),
        client(40_000),
        tcp_flags::SYN | tcp_flags::ACK,
        b"",
    );
    assert!(claims_from_device(&r));
    let mut reply = Vec::new();
    assert_eq!(
        m.on_device(t0, vni(), &mut r, &mut reply),
        Steer::Peer {
            vni: vni(),
            vtep: N_UNDERLAY.into()
        }
    );
    assert_eq!(read(&r).0, device_mac(N_NODE));
    // At N: the source the client connected to, the client's MACs.
    assert!(claims_from_peer(&r));
    assert_eq!(
        n.on_peer(t0, vni(), M_UNDERLAY.into(), &mut r),
        Steer::Outside
    );
    assert_eq!(read(&r), (CLIENT_MAC, N_ETH_MAC, published, client(40_000)));
    assert_eq!((n.counters().forwarded, n.counters().returned), (1, 1));
    assert_eq!(m.counters().returned, 1);
}

#[test]
fn a_local_backend_is_reached_through_the_bridge_and_answers_outside() {
    let t0 = Instant::now();
    let mut n = mesh(N_UNDERLAY, [false, true]);
    let published = sa(N_UNDERLAY, 8080);
    let mut f = tcp(
        (N_ETH_MAC, CLIENT_MAC),
        client(1),
        published,
        tcp_flags::SYN,
        b"",
    );
    assert_eq!(n.on_outside(t0, &mut f, false), Steer::Device(vni()));
    assert_eq!(
        read(&f),
        (mac_of(B2), router_mac(VNI), client(1), sa(B2, 80))
    );
    let mut r = tcp(
        (router_mac(VNI), mac_of(B2)),
        sa(B2, 80),
        client(1),
        tcp_flags::SYN | tcp_flags::ACK,
        b"x",
    );
    let mut reply = Vec::new();
    assert_eq!(n.on_device(t0, vni(), &mut r, &mut reply), Steer::Outside);
    assert_eq!(read(&r), (CLIENT_MAC, N_ETH_MAC, published, client(1)));
}

#[test]
fn every_node_picks_the_same_backend_and_both_get_flows() {
    let t0 = Instant::now();
    let (mut n, mut m) = (
        mesh(N_UNDERLAY, [true, true]),
        mesh(M_UNDERLAY, [true, true]),
    );
    let mut seen = [0; 2];
    for port in 1000..1400 {
        // The same flow arriving at either node (a floating address, say).
        let dst = sa(N_UNDERLAY, 8080);
        let mut a = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(port),
            dst,
            tcp_flags::SYN,
            b"",
        );
        n.on_outside(t0, &mut a, false);
        m.set_config(&MeshConfig {
            addresses: vec![N_UNDERLAY, M_UNDERLAY],
            ..config(M_UNDERLAY, [true, true], Timeouts::default())
        });
        let mut b = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(port),
            dst,
            tcp_flags::SYN,
            b"",
        );
        m.on_outside(t0, &mut b, false);
        let (pa, pb) = (read(&a).3, read(&b).3);
        assert_eq!(pa, pb, "flow {port}");
        seen[usize::from(*pa.ip() == B2)] += 1;
    }
    assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
}

#[test]
fn an_unhealthy_backend_gets_no_new_flow_and_keeps_its_open_ones() {
    let t0 = Instant::now();
    let mut n = mesh(N_UNDERLAY, [true, true]);
    let dst = sa(N_UNDERLAY, 8080);
    // Find flows that went to B1, and open one.
    let mut to_b1 = Vec::new();
    for port in 2000..2100 {
        let mut f = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(port),
            dst,
            tcp_flags::SYN,
            b"",
        );
        n.on_outside(t0, &mut f, false);
        if *read(&f).3.ip() == B1 {
            to_b1.push(port);
        }
    }
    assert!(!to_b1.is_empty());
    n.set_config(&config(N_UNDERLAY, [false, true], Timeouts::default()));
    // The open flow stays with B1 ...
    let mut f = tcp(
        (N_ETH_MAC, CLIENT_MAC),
        client(to_b1[0]),
        dst,
        tcp_flags::ACK,
        b"more",
    );
    n.on_outside(t0, &mut f, false);
    assert_eq!(*read(&f).3.ip(), B1);
    // ... and every new one goes to B2.
    for port in 3000..3100 {
        let mut f = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(port),
            dst,
            tcp_flags::SYN,
            b"",
        );
        assert_eq!(n.on_outside(t0, &mut f, false), Steer::Device(vni()));
        assert_eq!(*read(&f).3.ip(), B2);
    }
    // None healthy: refused and counted.
    n.set_config(&config(N_UNDERLAY, [false, false], Timeouts::default()));
    let mut f = tcp((N_ETH_MAC, CLIENT_MAC), client(9), dst, tcp_flags::SYN, b"");
    assert_eq!(n.on_outside(t0, &mut f, false), Steer::Drop);
    assert_eq!(n.counters().dropped(MeshDrop::NoBackend), 1);
}

#[test]
fn an_idle_open_flow_outlives_every_timeout() {
    let t0 = Instant::now();
    let short = Timeouts {
        syn: Duration::from_millis(100),
        closing: Duration::from_millis(100),
        udp: Duration::from_millis(100),
    };
    let mut n = Mesh::new(N_NODE);
    n.set_config(&config(N_UNDERLAY, [false, true], short));
    let dst = sa(N_UNDERLAY, 8080);
    let mut f = tcp((N_ETH_MAC, CLIENT_MAC), client(7), dst, tcp_flags::SYN, b"");
    n.on_outside(t0, &mut f, false);
    let mut r = tcp(
        (router_mac(VNI), mac_of(B2)),
        sa(B2, 80),
        client(7),
        tcp_flags::SYN | tcp_flags::ACK,
        b"",
    );
    n.on_device(t0, vni(), &mut r, &mut Vec::new());
    // An hour of silence, then the backend speaks first: still routed.
    let later = t0 + Duration::from_secs(3600);
    n.flows.sweep(later, true);
    let mut r = tcp(
        (router_mac(VNI), mac_of(B2)),
        sa(B2, 80),
        client(7),
        tcp_flags::ACK,
        b"push",
    );
    assert_eq!(
        n.on_device(later, vni(), &mut r, &mut Vec::new()),
        Steer::Outside
    );
    // A flow that never got an answer is gone by then.
    let mut f = tcp((N_ETH_MAC, CLIENT_MAC), client(8), dst, tcp_flags::SYN, b"");
    n.on_outside(t0, &mut f, false);
    n.flows.sweep(later, true);
    assert_eq!(n.flows().len(), 1);
}

#[test]
fn a_full_table_refuses_new_flows_with_a_count() {
    let t0 = Instant::now();
    let mut n = Mesh::new(N_NODE);
    n.set_config(&MeshConfig {
        max_flows: 3,
        ..config(N_UNDERLAY, [true, true], Timeouts::default())
    });
    let dst = sa(N_UNDERLAY, 8080);
    let steers: Vec<Steer> = (0..5)
        .map(|p| {
            let mut f = tcp((N_ETH_MAC, CLIENT_MAC), client(p), dst, tcp_flags::SYN, b"");
            n.on_outside(t0, &mut f, false)
        })
        .collect();
    assert_eq!(steers.iter().filter(|s| **s == Steer::Drop).count(), 2);
    assert_eq!(n.counters().dropped(MeshDrop::FlowTableFull), 2);
    assert_eq!(n.counters().flows, 3);
}

#[test]
fn what_is_not_published_is_dropped_and_counted() {
    let t0 = Instant::now();
    let (mut n, mut m) = (
        mesh(N_UNDERLAY, [true, true]),
        mesh(M_UNDERLAY, [true, true]),
    );
    // Another port, another of the node's addresses, not a flow.
    for (dst, proto_ok) in [
        (sa(N_UNDERLAY, 8081), true),
        (sa(Ipv4Addr::new(198, 18, 0, 77), 8080), true),
    ] {
        let mut f = tcp((N_ETH_MAC, CLIENT_MAC), client(1), dst, tcp_flags::SYN, b"");
        assert!(proto_ok);
        assert_eq!(n.on_outside(t0, &mut f, false), Steer::Drop);
    }
    assert_eq!(n.on_outside(t0, &mut [0u8; 20], false), Steer::Drop);
    assert_eq!(n.counters().dropped(MeshDrop::NotPublished), 2);
    assert_eq!(n.counters().dropped(MeshDrop::NotAFlow), 1);
    // A member forwarding to a port of a backend that is no published target: refused.
    let mut f = tcp(
        (mac_of(B1), device_mac(N_NODE)),
        client(1),
        sa(B1, 22),
        tcp_flags::SYN,
        b"",
    );
    assert_eq!(m.on_peer(t0, vni(), N_UNDERLAY.into(), &mut f), Steer::Drop);
    assert_eq!(m.counters().dropped(MeshDrop::NotPublished), 1);
    // A reply of no tracked flow, and the router asked for somewhere it does not go.
    let mut r = tcp(
        (router_mac(VNI), mac_of(B1)),
        sa(B1, 80),
        client(5),
        tcp_flags::ACK,
        b"",
    );
    assert_eq!(m.on_device(t0, vni(), &mut r, &mut Vec::new()), Steer::Drop);
    assert_eq!(m.counters().dropped(MeshDrop::NoFlow), 1);
    let mut r = tcp(
        (router_mac(VNI), mac_of(B1)),
        sa(B1, 80),
        sa(Ipv4Addr::new(198, 19, 1, 9), 1),
        tcp_flags::ACK,
        b"",
    );
    assert_eq!(m.on_device(t0, vni(), &mut r, &mut Vec::new()), Steer::Drop);
    assert_eq!(m.counters().dropped(MeshDrop::NoRoute), 1);
}

#[test]
fn a_vip_connection_goes_unchanged_to_a_backend_for_direct_return() {
    let t0 = Instant::now();
    let mut n = mesh(N_UNDERLAY, [true, true]);
    let a = Ipv4Addr::new(198, 19, 1, 30);
    let mut seen = [0; 2];
    for port in 100..300 {
        let mut f = tcp(
            (router_mac(VNI), mac_of(a)),
            sa(a, port),
            sa(VIP, 80),
            tcp_flags::SYN,
            b"",
        );
        let steer = n.on_device(t0, vni(), &mut f, &mut Vec::new());
        let (dmac, smac, src, dst) = read(&f);
        assert_eq!(
            (src, dst),
            (sa(a, port), sa(VIP, 80)),
            "addresses unchanged"
        );
        match steer {
            Steer::Peer { vtep, .. } => {
                assert_eq!(
                    (vtep, dmac, smac),
                    (M_UNDERLAY.into(), mac_of(B1), mac_of(a))
                );
                seen[0] += 1;
            }
            Steer::Device(_) => {
                assert_eq!((dmac, smac), (mac_of(B2), router_mac(VNI)));
                seen[1] += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(seen[0] > 30 && seen[1] > 30, "{seen:?}");
    assert_eq!(n.flows().len(), 0, "no state for direct return");
}

#[test]
fn service_removal_drops_its_flows() {
    let t0 = Instant::now();
    let mut n = mesh(N_UNDERLAY, [true, true]);
    for p in 0..10 {
        let mut f = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(p),
            sa(N_UNDERLAY, 8080),
            tcp_flags::SYN,
            b"",
        );
        n.on_outside(t0, &mut f, false);
    }
    assert_eq!(n.flows().len(), 10);
    let mut c = config(N_UNDERLAY, [true, true], Timeouts::default());
    c.networks[0].services.clear();
    n.set_config(&c);
    assert_eq!(n.flows().len(), 0);
}

fn dns_query(name: &str, id: u16) -> Vec<u8> {
    let mut q = simple_dns::Packet::new_query(id);
    q.questions.push(simple_dns::Question::new(
        simple_dns::Name::new_unchecked(name),
        simple_dns::TYPE::A.into(),
        simple_dns::CLASS::IN.into(),
        false,
    ));
    q.build_bytes_vec().unwrap()
}

fn ask(n: &mut Mesh, name: &str) -> (simple_dns::RCODE, Vec<Ipv4Addr>) {
    let a = Ipv4Addr::new(198, 19, 1, 30);
    let b = PacketBuilder::ethernet2(mac_of(a).0, router_mac(VNI).0)
        .ipv4(a.octets(), GATEWAY.octets(), 64)
        .udp(33_000, 53);
    let mut f = Vec::new();
    b.write(&mut f, &dns_query(name, 7)).unwrap();
    assert!(claims_from_device(&f));
    let mut reply = Vec::new();
    assert_eq!(
        n.on_device(Instant::now(), vni(), &mut f, &mut reply),
        Steer::Reply
    );
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
        panic!("not UDP")
    };
    assert_eq!((u.source_port(), u.destination_port()), (53, 33_000));
    assert_eq!(Mac::src_of(&reply), Some(router_mac(VNI)));
    let p = simple_dns::Packet::parse(u.payload()).unwrap();
    (p.rcode(), a_records(&p))
}

fn a_records(p: &simple_dns::Packet<'_>) -> Vec<Ipv4Addr> {
    p.answers
        .iter()
        .filter_map(|r| match &r.rdata {
            simple_dns::rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_router_answers_service_names_and_refuses_the_rest() {
    let mut n = mesh(N_UNDERLAY, [true, false]);
    assert_eq!(ask(&mut n, "web").1, vec![VIP]);
    assert_eq!(ask(&mut n, "WEB.").1, vec![VIP]);
    assert_eq!(ask(&mut n, "tasks.web").1, vec![B1]);
    assert_eq!(
        ask(&mut n, "example.org"),
        (simple_dns::RCODE::Refused, vec![])
    );
    assert_eq!(n.counters().dns, 4);
}

fn udp(macs: (Mac, Mac), src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.1 .0, macs.0 .0)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

#[test]
fn a_udp_published_flow_goes_and_comes_back() {
    let t0 = Instant::now();
    let (mut n, mut m) = (
        mesh(N_UNDERLAY, [true, false]),
        mesh(M_UNDERLAY, [true, false]),
    );
    let published = sa(N_UNDERLAY, 5353);
    let mut f = udp((N_ETH_MAC, CLIENT_MAC), client(5000), published, b"query");
    assert!(matches!(
        n.on_outside(t0, &mut f, false),
        Steer::Peer { .. }
    ));
    assert_eq!(frame::parse(&f).unwrap().dst, sa(B1, 53));
    assert_eq!(m.on_peer(t0, vni(), N_UNDERLAY.into(), &mut f), Steer::Pass);
    let mut r = udp(
        (router_mac(VNI), mac_of(B1)),
        sa(B1, 53),
        client(5000),
        b"answer",
    );
    assert!(matches!(
        m.on_device(t0, vni(), &mut r, &mut Vec::new()),
        Steer::Peer { .. }
    ));
    assert_eq!(
        n.on_peer(t0, vni(), M_UNDERLAY.into(), &mut r),
        Steer::Outside
    );
    let back = frame::parse(&r).unwrap();
    assert_eq!((back.src, back.dst), (published, client(5000)));
}

#[test]
fn host_mode_ports_use_only_this_nodes_backends() {
    let t0 = Instant::now();
    let host = |me| {
        let mut c = config(me, [true, true], Timeouts::default());
        for p in &mut c.networks[0].services[0].ports {
            p.host_mode = true;
        }
        let mut m = Mesh::new(Ipv4Addr::UNSPECIFIED);
        m.set_config(&c);
        m
    };
    // N holds B2: every flow goes to it, though B1 is healthy too.
    let mut n = host(N_UNDERLAY);
    for port in 1..50 {
        let mut f = tcp(
            (N_ETH_MAC, CLIENT_MAC),
            client(port),
            sa(N_UNDERLAY, 8080),
            tcp_flags::SYN,
            b"",
        );
        assert_eq!(n.on_outside(t0, &mut f, false), Steer::Device(vni()));
        assert_eq!(*frame::parse(&f).unwrap().dst.ip(), B2);
    }
    // A node whose backend is unhealthy has none to give.
    let mut c = config(N_UNDERLAY, [true, false], Timeouts::default());
    for p in &mut c.networks[0].services[0].ports {
        p.host_mode = true;
    }
    n.set_config(&c);
    let mut f = tcp(
        (N_ETH_MAC, CLIENT_MAC),
        client(99),
        sa(N_UNDERLAY, 8080),
        tcp_flags::SYN,
        b"",
    );
    assert_eq!(n.on_outside(t0, &mut f, false), Steer::Drop);
    assert_eq!(n.counters().dropped(MeshDrop::NoBackend), 1);
}
