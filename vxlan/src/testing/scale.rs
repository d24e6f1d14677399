//! A simulated cluster for the scale benchmarks and tests (issue 18, target 6): node `i` of up
//! to 65,536, each with its own key pair, node ID, incarnation, underlay address and MACs;
//! [`testing::A`](super::A) as the local node; and the rollout that brings peers up and rotates
//! the key epoch across them while traffic flows ([`rollout`]).
//!
//! Everything runs on [`Engine`]s in memory: no sockets, no devices. Not for production use
//! (the keys are derived from the node numbers).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use super::{epoch, frame, Fixture};
use crate::crypto::{EpochKey, Incarnation, PeerKey, NODE_ID_LEN};
use crate::engine::{DropCounts, DropReason};
use crate::{Engine, Mac, Packet, Transmits, Vni};

/// The largest frame the simulated nodes' buffers take.
pub const MAX_FRAME: usize = 9000;

/// The first VNI of the simulated networks; network `j` is `FIRST_VNI + j` when encrypted and
/// `FIRST_VNI + PLAIN_OFFSET + j` when plain.
pub const FIRST_VNI: u32 = 10_000;
/// How far the plain networks' VNIs lie above the encrypted ones'.
pub const PLAIN_OFFSET: u32 = 100_000;

/// Simulated node `i` (0-based; `i` < 65,536): underlay address 198.18.16.0 + `i`, secret and
/// incarnation derived from `i`, node ID `i` in decimal padded with zeros to 25 characters. Its
/// `mac` is its MAC on network 0 (see [`mac`]).
pub fn node(i: u32) -> Fixture {
    let [b0, b1, b2, b3] = i.to_le_bytes();
    let mut secret = [0x5c; 32];
    secret[..4].copy_from_slice(&[b0, b1, b2, b3]);
    let mut incarnation = [0x33; 16];
    incarnation[..4].copy_from_slice(&[b3, b2, b1, b0 ^ 0x80]);
    let mut node_id = [b'0'; NODE_ID_LEN];
    let digits = i.to_string();
    node_id[NODE_ID_LEN - digits.len()..].copy_from_slice(digits.as_bytes());
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i);
    Fixture {
        secret,
        node_id,
        incarnation: Incarnation(incarnation),
        addr: SocketAddr::new(IpAddr::V4(ip), 4789),
        mac: mac(i, 0),
    }
}

/// Node `i`'s MAC on network `j`: 02:53:jj:jj:ii:ii (both below 65,536).
pub fn mac(i: u32, j: u32) -> Mac {
    let [_, _, j1, j0] = j.to_be_bytes();
    let [_, _, i1, i0] = i.to_be_bytes();
    Mac([0x02, 0x53, j1, j0, i1, i0])
}

/// The VNI of network `j`, encrypted or plain.
pub fn vni(j: u32, encrypted: bool) -> Vni {
    let n = FIRST_VNI + j + if encrypted { 0 } else { PLAIN_OFFSET };
    // FIRST_VNI + PLAIN_OFFSET + 65,535 is far below 2^24.
    Vni::new(n).unwrap_or(super::VNI)
}

/// Where the peers' MACs go in a local engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Peer `i` is on network `i % networks` only: one MAC, one FDB entry, one flood-list
    /// place.
    Spread,
    /// Every peer is on every network: a MAC, an FDB entry and a flood-list place per peer and
    /// network (the most state a cluster of this size and this many networks can hold).
    Full,
}

/// The simulated peers, with their keys computed once (one X25519 base-point multiplication
/// each).
#[derive(Debug)]
pub struct Cluster {
    /// The peers, node `i` at index `i`.
    pub nodes: Vec<Fixture>,
    /// Their keys, as the local node learns them from the control plane.
    pub keys: Vec<PeerKey>,
}

impl Cluster {
    /// Nodes 0 to `peers - 1`.
    pub fn new(peers: u32) -> Self {
        let nodes: Vec<Fixture> = (0..peers).map(node).collect();
        let keys = nodes.iter().map(Fixture::peer_key).collect();
        Cluster { nodes, keys }
    }

    /// `local`'s engine with the first `peers` nodes as its peers (each keyed: one X25519 and
    /// one HKDF), `networks` networks (encrypted or plain) holding their MACs as `layout` says,
    /// each peer in the flood list of the networks it is on, and `local`'s MAC on each network
    /// left to the caller (it is local, not in the FDB). Key epoch: [`epoch`].
    ///
    /// # Panics
    /// If `peers` exceeds the cluster or `networks` is zero.
    pub fn engine(
        &self,
        local: &Fixture,
        peers: usize,
        networks: u32,
        encrypted: bool,
        layout: Layout,
    ) -> Engine {
        assert!(networks > 0 && peers <= self.nodes.len());
        let mut e = Engine::new(local.local());
        for j in 0..networks {
            let _ = e.add_network(vni(j, encrypted), encrypted);
        }
        let _ = e.add_epoch(epoch());
        for i in 0..peers as u32 {
            let on = match layout {
                Layout::Spread => i % networks..i % networks + 1,
                Layout::Full => 0..networks,
            };
            self.bring_up(&mut e, i, on, encrypted);
        }
        e
    }

    /// Node `i` made a peer of engine `e` (its key: one X25519 and one HKDF) on the networks
    /// `on`: its MAC there in the FDB and its address in the flood list.
    fn bring_up(&self, e: &mut Engine, i: u32, on: std::ops::Range<u32>, encrypted: bool) {
        let n = &self.nodes[i as usize];
        // The keys are distinct, valid points by construction.
        let _ = e.set_peer(n.addr, Some(self.keys[i as usize]));
        for j in on {
            if let Ok(fdb) = e.fdb_mut(vni(j, encrypted)) {
                fdb.insert(mac(i, j), n.addr.ip());
                fdb.add_flood(n.addr.ip());
            }
        }
    }

    /// Node `i`'s own engine, with `to` as its only peer (FDB entry and flood list) on network
    /// `j`, encrypted and plain (two VNIs, see [`vni`]), under [`epoch`].
    pub fn sender(&self, i: u32, to: &Fixture, j: u32) -> Engine {
        let me = &self.nodes[i as usize];
        let mut e = Engine::new(me.local());
        let _ = e.add_epoch(epoch());
        let _ = e.set_peer(to.addr, Some(to.peer_key()));
        for encrypted in [true, false] {
            let v = vni(j, encrypted);
            let _ = e.add_network(v, encrypted);
            if let Ok(fdb) = e.fdb_mut(v) {
                fdb.insert(to.mac, to.addr.ip());
                fdb.add_flood(to.addr.ip());
            }
        }
        e
    }
}

/// In what order the local node and the watched peers take a new key epoch in [`rollout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The control plane's order (see [`crate::crypto::Keyring`]): every node adds the new
    /// epoch, then every node sends under it, then every node retires the old one.
    Staged,
    /// The local node adds the new epoch, sends under it and retires the old one before any
    /// peer has the new one: a gap, for the tests to see that one is counted.
    Hasty,
}

/// What [`rollout`] saw of the traffic between the local node and the watched peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gap {
    /// Frames sent, both directions.
    pub sent: u64,
    /// Frames that were refused when sealing or did not open (the gap), by reason.
    pub dropped: DropCounts,
    /// Of those, frames the local node sent to a watched peer.
    pub dropped_to_peers: u64,
    /// Of those, frames a watched peer sent to the local node.
    pub dropped_from_peers: u64,
}

/// One watched peer: its own engine, talking to the local node.
struct Watched {
    index: u32,
    engine: Engine,
    out: Transmits,
    network: u32,
}

/// Frames sealed in one round and not yet delivered: (to the local node?, watched index,
/// datagram).
type InFlight = Vec<(bool, usize, SocketAddr, Packet)>;

/// The local node ([`testing::A`](super::A)) brings up the first `peers` nodes of `cluster`
/// on `networks` encrypted networks ([`Layout::Spread`]), one [`Engine::set_peer`] at a time,
/// then rotates from key epoch 1 to 2 across all of them in `order`, bringing up the last
/// tenth of the peers while both epochs are live. The peers at the indices `watch` run
/// engines of their own; after every step each up watched peer and the local node send each
/// other one frame, delivered after the next step (one step of latency, so datagrams sealed
/// before a change are opened after it). Returns what failed to seal or open.
///
/// # Panics
/// If a watched index is not below `peers`, or `peers` exceeds the cluster.
pub fn rollout(cluster: &Cluster, peers: u32, networks: u32, watch: &[u32], order: Order) -> Gap {
    assert!(peers as usize <= cluster.nodes.len());
    let a = super::A;
    let now = Instant::now();
    let mut local = Engine::new(a.local());
    for j in 0..networks {
        let _ = local.add_network(vni(j, true), true);
    }
    let _ = local.add_epoch(epoch());
    let mut local_out = Transmits::new(MAX_FRAME);
    let mut watched: Vec<Watched> = watch
        .iter()
        .map(|&i| {
            assert!(i < peers, "watched peer {i} is not brought up");
            let network = i % networks;
            let mut engine = Engine::new(cluster.nodes[i as usize].local());
            let _ = engine.add_network(vni(network, true), true);
            let _ = engine.add_epoch(epoch());
            let _ = engine.set_peer(a.addr, Some(a.peer_key()));
            if let Ok(fdb) = engine.fdb_mut(vni(network, true)) {
                fdb.insert(a.mac, a.addr.ip());
            }
            Watched {
                index: i,
                engine,
                out: Transmits::new(MAX_FRAME),
                network,
            }
        })
        .collect();
    let mut gap = Gap::default();
    let mut in_flight: InFlight = Vec::new();
    let payload = [0x5a_u8; 64];

    // One step of traffic: deliver what the last step sealed, then seal this step's.
    let mut traffic = |local: &mut Engine,
                       local_out: &mut Transmits,
                       watched: &mut [Watched],
                       up: u32,
                       gap: &mut Gap| {
        for (to_local, w, src, mut pkt) in in_flight.drain(..) {
            let result = if to_local {
                local.handle_datagram(now, src, &mut pkt).map(drop)
            } else {
                watched[w]
                    .engine
                    .handle_datagram(now, src, &mut pkt)
                    .map(drop)
            };
            if let Err(reason) = result {
                count(gap, to_local, reason);
            }
        }
        for (w, peer) in watched.iter_mut().enumerate() {
            if peer.index >= up {
                continue;
            }
            let j = peer.network;
            let me = cluster.nodes[peer.index as usize];
            // The local node to the peer, and the peer to the local node.
            let sends = [
                (
                    false,
                    &mut *local,
                    &mut *local_out,
                    mac(peer.index, j),
                    a.mac,
                ),
                (
                    true,
                    &mut peer.engine,
                    &mut peer.out,
                    a.mac,
                    mac(peer.index, j),
                ),
            ];
            for (to_local, engine, out, dst, src_mac) in sends {
                gap.sent += 1;
                let mut pkt = Packet::new(MAX_FRAME);
                pkt.set_frame(&frame(dst, src_mac, &payload));
                let from = if to_local { me.addr } else { a.addr };
                match engine.handle_frame(now, vni(j, true), &mut pkt, out) {
                    Ok(_) => in_flight.extend(out.drain().map(|t| (to_local, w, from, t.packet))),
                    Err(reason) => count(gap, to_local, reason),
                }
            }
        }
    };

    let bring_up = |local: &mut Engine, i: u32| {
        cluster.bring_up(local, i, i % networks..i % networks + 1, true);
    };

    let early = peers - peers / 10;
    for i in 0..early {
        bring_up(&mut local, i);
        traffic(&mut local, &mut local_out, &mut watched, i + 1, &mut gap);
    }
    let new = EpochKey::new(2, [0xe2; 32]);
    let mut up = early;
    // Each step: a change on one engine (None: the local node; Some(w): watched peer w), then
    // traffic.
    type Step = (Option<usize>, Change);
    let mut steps: Vec<Step> = Vec::new();
    let each = |change: Change| (0..watch.len()).map(move |w| (Some(w), change));
    match order {
        Order::Staged => {
            steps.push((None, Change::Add));
            steps.extend(each(Change::Add));
            steps.push((None, Change::BringUpRest));
            steps.push((None, Change::Send));
            steps.extend(each(Change::Send));
            steps.push((None, Change::Retire));
            steps.extend(each(Change::Retire));
        }
        Order::Hasty => {
            steps.push((None, Change::Add));
            steps.push((None, Change::BringUpRest));
            steps.push((None, Change::Send));
            steps.push((None, Change::Retire));
            steps.extend(each(Change::Add));
            steps.extend(each(Change::Send));
            steps.extend(each(Change::Retire));
        }
    }
    for (who, change) in steps {
        if let Change::BringUpRest = change {
            for i in early..peers {
                bring_up(&mut local, i);
                up = i + 1;
                traffic(&mut local, &mut local_out, &mut watched, up, &mut gap);
            }
            continue;
        }
        let engine = match who {
            None => &mut local,
            Some(w) => &mut watched[w].engine,
        };
        // Each change is valid in the order it comes; a refused one would show as a gap.
        let _ = match change {
            Change::Add => engine.add_epoch(new.clone()),
            Change::Send => engine.set_send_epoch(2),
            Change::Retire => engine.retire_epoch(1),
            Change::BringUpRest => Ok(()),
        };
        traffic(&mut local, &mut local_out, &mut watched, up, &mut gap);
    }
    // Deliver the last step's datagrams.
    traffic(&mut local, &mut local_out, &mut watched, 0, &mut gap);
    gap
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Add,
    Send,
    Retire,
    BringUpRest,
}

fn count(gap: &mut Gap, to_local: bool, reason: DropReason) {
    gap.dropped.bump(reason);
    if to_local {
        gap.dropped_from_peers += 1;
    } else {
        gap.dropped_to_peers += 1;
    }
}
