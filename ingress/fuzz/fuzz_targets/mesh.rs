//! The routing mesh on any frame, from any side (a client outside, a peer, a container), with
//! a service configured: never panics, never changes a frame's length, and what it steers
//! somewhere is still an IPv4 TCP/UDP frame whose checksums hold.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_ingress::mesh::flows::Timeouts;
use shoal_ingress::mesh::{
    frame, Mesh, MeshBackend, MeshConfig, MeshNetwork, MeshService, PortMap,
};
use shoal_vxlan::io::Steer;
use shoal_vxlan::wire::{Mac, Vni};

const VNI: u32 = 4097;

fn config() -> MeshConfig {
    let b = |last: u8, node: Option<IpAddr>| MeshBackend {
        ip: Ipv4Addr::new(198, 19, 1, last),
        mac: Mac([2, 0x42, 198, 19, 1, last]),
        node,
        healthy: last != 7,
    };
    MeshConfig {
        node: Ipv4Addr::new(198, 19, 255, 1),
        addresses: vec![Ipv4Addr::new(198, 18, 0, 1)],
        networks: vec![MeshNetwork {
            vni: VNI,
            subnet: "198.19.1.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(198, 19, 1, 1),
            services: vec![MeshService {
                name: "web".into(),
                vip: Some(Ipv4Addr::new(198, 19, 1, 250)),
                ports: vec![
                    PortMap { proto: frame::TCP, published: 8080, target: 80, host_mode: false },
                    PortMap { proto: frame::UDP, published: 53, target: 53, host_mode: true },
                ],
                backends: vec![
                    b(5, None),
                    b(6, Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)))),
                    b(7, Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3)))),
                ],
            }],
        }],
        timeouts: Timeouts::default(),
        max_flows: 64,
    }
}

fn mesh() -> &'static Mutex<(Mesh, Instant)> {
    static M: OnceLock<Mutex<(Mesh, Instant)>> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = Mesh::new(Ipv4Addr::new(198, 19, 255, 1));
        m.set_config(&config());
        Mutex::new((m, Instant::now()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&side, rest)) = data.split_first() else { return };
    let mut f = rest.to_vec();
    let len = f.len();
    let mut guard = mesh().lock().unwrap();
    let (m, t0) = &mut *guard;
    // Time moves on with the input, so flows expire too.
    let now = *t0 + Duration::from_millis(u64::from(side) * 997);
    let vni = Vni::new(VNI).unwrap();
    let steer = match side % 3 {
        0 => m.on_outside(now, &mut f, side & 0x80 != 0),
        1 => m.on_peer(now, vni, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), &mut f),
        _ => {
            let mut reply = Vec::new();
            m.on_device(now, vni, &mut f, &mut reply)
        }
    };
    assert_eq!(f.len(), len, "a frame changed length");
    if matches!(steer, Steer::Peer { .. } | Steer::Outside | Steer::Device(_)) && f != rest {
        assert!(frame::parse(&f).is_some(), "a rewritten frame is no longer a flow");
    }
});
