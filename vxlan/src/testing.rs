//! Fixed fixtures shared by the tests, the fuzz targets and the benchmarks: two nodes with known
//! keys, each the other's peer on one network. Not for production use (the keys are public).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::crypto::{EpochKey, Incarnation, Local, NodeIdBytes, NodeKey, PeerKey};
use crate::{Engine, Mac, Vni};

/// The fixture network.
pub const VNI: Vni = match Vni::new(4096) {
    Ok(v) => v,
    Err(_) => panic!("4096 fits in 24 bits"),
};

/// One fixture node.
#[derive(Debug, Clone, Copy)]
pub struct Fixture {
    /// Its static secret.
    pub secret: [u8; 32],
    /// Its node ID.
    pub node_id: NodeIdBytes,
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// Its underlay address and port.
    pub addr: SocketAddr,
    /// Its MAC on the overlay.
    pub mac: Mac,
}

/// Node A: 198.18.0.1.
pub const A: Fixture = Fixture {
    secret: [0xa1; 32],
    node_id: *b"aaaaaaaaaaaaaaaaaaaaaaaaa",
    incarnation: Incarnation([0x11; 16]),
    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 4789),
    mac: Mac([0x02, 0x42, 198, 19, 0, 1]),
};

/// Node B: 198.18.0.2.
pub const B: Fixture = Fixture {
    secret: [0xb2; 32],
    node_id: *b"bbbbbbbbbbbbbbbbbbbbbbbbb",
    incarnation: Incarnation([0x22; 16]),
    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 4789),
    mac: Mac([0x02, 0x42, 198, 19, 0, 2]),
};

/// The fixture key epoch.
pub fn epoch() -> EpochKey {
    EpochKey::new(1, [0xe1; 32])
}

impl Fixture {
    /// The node's peer key, as others see it.
    pub fn peer_key(&self) -> PeerKey {
        *self.local().side()
    }

    /// The node as the key derivation sees it.
    pub fn local(&self) -> Local {
        Local::new(
            NodeKey::from_secret(self.secret),
            self.node_id,
            self.incarnation,
        )
    }

    /// The node's engine, with `peer` as its only peer (FDB entry and flood list) on [`VNI`],
    /// encrypted under [`epoch`] or plain.
    pub fn engine(&self, peer: &Fixture, encrypted: bool) -> Engine {
        let mut e = Engine::new(self.local());
        // The fixture values are valid by construction: none of these calls can fail.
        let _ = e.add_network(VNI, encrypted);
        let _ = e.add_epoch(epoch());
        let _ = e.set_peer(peer.addr, Some(peer.peer_key()));
        if let Ok(fdb) = e.fdb_mut(VNI) {
            fdb.insert(peer.mac, peer.addr.ip());
            fdb.add_flood(peer.addr.ip());
        }
        e
    }
}

/// An Ethernet frame from `src` to `dst` carrying `payload` as IPv4 (the payload is not checked).
pub fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

/// A node for tests: key pair from the secret `[n; 32]`, node ID of 25 letters derived from
/// `n`, and the incarnation `[incarnation; 16]`.
pub fn local(n: u8, incarnation: u8) -> Local {
    Local::new(
        NodeKey::from_secret([n; 32]),
        [b'a' + n % 26; crate::crypto::NODE_ID_LEN],
        Incarnation([incarnation; 16]),
    )
}

pub mod scale;
