//! Runs one side of a two-node overlay with the fixed test keys, for trying the data path by
//! hand in two network namespaces (underlay 198.18.0.1-2, overlay 198.19.0.1-2/24):
//!
//! ```sh
//! ip netns exec NS_A cargo run -p shoal-ingress --example overlay_pair -- a encrypted
//! ip netns exec NS_B cargo run -p shoal-ingress --example overlay_pair -- b encrypted
//! ```
//!
//! It runs until killed. Not for production: the keys are public.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use shoal_ingress::overlay::{Member, Overlay, OverlayConfig};
use shoal_ingress::NetworkSpec;
use shoal_vxlan::crypto::NodeKey;
use shoal_vxlan::testing::{epoch, A, B};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (me, peer, n, m) = match args.next().as_deref() {
        Some("a") => (A, B, 1, 2),
        Some("b") => (B, A, 2, 1),
        _ => return Err("usage: overlay_pair a|b encrypted|plain".into()),
    };
    let encrypted = args.next().as_deref() != Some("plain");
    let overlay_ip = |i| Ipv4Addr::new(198, 19, 0, i);
    let mut overlay = Overlay::start(OverlayConfig {
        network: NetworkSpec::ingress("198.19.0.0/24".parse()?, encrypted),
        interface: "shoal-ingress".into(),
        mesh_interface: shoal_ingress::overlay::MESH_INTERFACE.into(),
        address: overlay_ip(n),
        underlay_mtu: 1500,
        bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 4789),
        node_key: NodeKey::from_secret(me.secret),
        node_id: me.node_id,
        incarnation: me.incarnation,
    })?;
    overlay.set_epochs(&[epoch()], epoch().id())?;
    overlay.set_members(&[Member::node(peer.addr, overlay_ip(m), peer.peer_key())])?;
    println!("up: {} mtu {}", overlay.address(), overlay.mtu());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let c = overlay.counters();
        eprintln!(
            "tx {} rx {} drops {:?}",
            c.tx_packets,
            c.rx_packets,
            c.drops.iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>()
        );
    }
}
