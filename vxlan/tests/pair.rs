//! Two (or three) engines talking in memory over a link that loses, reorders and duplicates.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_vxlan::crypto::{EpochKey, PeerKey};
use shoal_vxlan::engine::Provenance;
use shoal_vxlan::fdb::MAX_LEARNED_PER_VTEP;
use shoal_vxlan::testing::{frame, local};
use shoal_vxlan::wire::envelope;
use shoal_vxlan::{DropReason, Engine, Mac, Packet, Transmits, Vni};

const MAX_FRAME: usize = 9000;

fn vni() -> Vni {
    Vni::new(4096).unwrap()
}

struct Node {
    engine: Engine,
    addr: SocketAddr,
    mac: Mac,
    out: Transmits,
}

impl Node {
    fn new(n: u8, incarnation: u8, encrypted: bool) -> Node {
        let mut engine = Engine::new(local(n, incarnation));
        engine.add_network(vni(), encrypted).unwrap();
        Node {
            engine,
            addr: SocketAddr::new(IpAddr::from([198, 18, 0, n]), 4789),
            mac: Mac([2, 0x42, 198, 19, 0, n]),
            out: Transmits::new(MAX_FRAME),
        }
    }

    fn peer_key(&self) -> PeerKey {
        *self.engine.local()
    }

    /// Seals `payload` from this node to `dst`, returning the datagrams it queued.
    fn send(&mut self, dst: Mac, payload: &[u8]) -> Result<Vec<(SocketAddr, Vec<u8>)>, DropReason> {
        let mut pkt = Packet::new(MAX_FRAME);
        assert!(pkt.set_frame(&frame(dst, self.mac, payload)));
        self.engine
            .handle_frame(Instant::now(), vni(), &mut pkt, &mut self.out)?;
        let sent = self
            .out
            .ready()
            .iter()
            .map(|t| (t.dst, t.packet.data().to_vec()))
            .collect();
        self.out.clear();
        Ok(sent)
    }

    fn recv(&mut self, src: SocketAddr, datagram: &[u8]) -> Result<Vec<u8>, DropReason> {
        let mut pkt = Packet::new(MAX_FRAME);
        assert!(pkt.set_datagram(datagram));
        self.engine
            .handle_datagram(Instant::now(), src, &mut pkt)
            .map(|o| o.frame().to_vec())
    }
}

/// Makes every node a peer of every other, with FDB entries and flood lists.
fn mesh(nodes: &mut [Node]) {
    let info: Vec<(SocketAddr, PeerKey, Mac)> = nodes
        .iter()
        .map(|n| (n.addr, n.peer_key(), n.mac))
        .collect();
    for node in nodes.iter_mut() {
        for &(addr, key, mac) in &info {
            if addr == node.addr {
                continue;
            }
            node.engine.set_peer(addr, Some(key)).unwrap();
            let fdb = node.engine.fdb_mut(vni()).unwrap();
            fdb.insert(mac, addr.ip());
            fdb.add_flood(addr.ip());
        }
    }
}

fn encrypted_pair() -> (Node, Node) {
    let mut nodes = [Node::new(1, 1, true), Node::new(2, 1, true)];
    for n in &mut nodes {
        n.engine.add_epoch(EpochKey::new(1, [0xe1; 32])).unwrap();
    }
    mesh(&mut nodes);
    let [a, b] = nodes;
    (a, b)
}

fn payload(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend((0..(seq % 1400)).map(|i| (i as u8) ^ (seq as u8)));
    p
}

#[test]
fn unicast_is_sealed_and_delivered() {
    let (mut a, mut b) = encrypted_pair();
    let secret = b"the quick brown fox jumps over the lazy dog";
    let out = a.send(b.mac, secret).unwrap();
    assert_eq!(out.len(), 1);
    let (dst, datagram) = &out[0];
    assert_eq!(*dst, b.addr);
    assert_eq!(
        datagram.len(),
        envelope::HEADER_LEN + 14 + secret.len() + envelope::TAG_LEN
    );
    assert!(
        !datagram.windows(secret.len()).any(|w| w == secret),
        "plaintext on the wire"
    );
    let got = b.recv(a.addr, datagram).unwrap();
    assert_eq!(got, frame(b.mac, a.mac, secret));
    assert_eq!(b.engine.counters().rx_packets, 1);
    assert_eq!(b.engine.peer(a.addr.ip()).unwrap().counters().rx_packets, 1);
    // The same datagram again is a replay.
    assert_eq!(b.recv(a.addr, datagram), Err(DropReason::Replay));
    assert_eq!(b.engine.counters().drops.get(DropReason::Replay), 1);
}

#[test]
fn provenance_is_sealed_with_epoch() {
    let (mut a, mut b) = encrypted_pair();
    let out = a.send(b.mac, b"x").unwrap();
    let mut pkt = Packet::new(MAX_FRAME);
    pkt.set_datagram(&out[0].1);
    let opened = b
        .engine
        .handle_datagram(Instant::now(), a.addr, &mut pkt)
        .unwrap();
    assert!(matches!(
        opened.provenance(),
        Provenance::Sealed { epoch: 1, .. }
    ));
    assert_eq!(opened.vtep(), a.addr.ip());
}

/// Runs `count` frames from a to b over a link with the given loss, duplication and reordering,
/// checking each delivered frame is one that was sent, intact, and delivered once.
fn lossy_transfer(seed: u64, count: u32, loss: f64, dup: f64, rotate_at: Option<u32>) -> usize {
    let (mut a, mut b) = encrypted_pair();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut in_flight: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut delivered = HashSet::new();
    let (a_addr, a_mac) = (a.addr, a.mac);
    let mut deliver = |b: &mut Node, in_flight: &mut Vec<(u32, Vec<u8>)>, rng: &mut StdRng| {
        in_flight.shuffle(rng);
        for (seq, d) in in_flight.drain(..) {
            match b.recv(a_addr, &d) {
                Ok(f) => {
                    assert_eq!(f, frame(b.mac, a_mac, &payload(seq)), "frame {seq} altered");
                    assert!(delivered.insert(seq), "frame {seq} delivered twice");
                }
                Err(DropReason::Replay) => {}
                Err(other) => panic!("unexpected drop {other} for frame {seq}"),
            }
        }
    };
    for seq in 0..count {
        if Some(seq) == rotate_at {
            // The manager issues epoch 2: both add it, a switches, b still sends under 1.
            a.engine.add_epoch(EpochKey::new(2, [0xe2; 32])).unwrap();
            b.engine.add_epoch(EpochKey::new(2, [0xe2; 32])).unwrap();
            a.engine.set_send_epoch(2).unwrap();
        }
        for (_, d) in a.send(b.mac, &payload(seq)).unwrap() {
            if rng.gen_bool(loss) {
                continue;
            }
            if rng.gen_bool(dup) {
                in_flight.push((seq, d.clone()));
            }
            in_flight.push((seq, d));
        }
        if in_flight.len() >= 64 {
            deliver(&mut b, &mut in_flight, &mut rng);
        }
    }
    deliver(&mut b, &mut in_flight, &mut rng);
    if rotate_at.is_some() {
        b.engine.set_send_epoch(2).unwrap();
        a.engine.retire_epoch(1).unwrap();
        b.engine.retire_epoch(1).unwrap();
        let d = a.send(b.mac, &payload(7)).unwrap();
        assert!(b.recv(a.addr, &d[0].1).is_ok(), "epoch 2 alone works");
    }
    delivered.len()
}

#[test]
fn lossy_reordering_duplicating_link_delivers_at_most_once() {
    for seed in 0..4 {
        let n = lossy_transfer(seed, 3000, 0.1, 0.2, None);
        // 10% loss: about 2700 arrive; far fewer means a bug dropped good frames.
        assert!((2550..=2850).contains(&n), "seed {seed}: {n} delivered");
    }
}

#[test]
fn rotation_mid_stream_loses_nothing() {
    assert_eq!(lossy_transfer(9, 2000, 0.0, 0.1, Some(1000)), 2000);
}

#[test]
fn every_single_byte_flip_is_dropped() {
    let (mut a, mut b) = encrypted_pair();
    let out = a.send(b.mac, &payload(77)).unwrap();
    let good = &out[0].1;
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            let got = b.recv(a.addr, &bad);
            let expected = match i {
                // Flags: losing I is a bad header, losing S is plaintext; other bits are
                // reserved, ignored by the parser, but authenticated.
                0 if bad[0] & 0x08 == 0 => DropReason::BadHeader,
                0 if bad[0] & 0x40 == 0 => DropReason::PlaintextOnEncrypted,
                4..=6 => DropReason::UnknownVni,
                8 => DropReason::UnknownVersion,
                12..=15 => DropReason::UnknownEpoch,
                16..=19 => DropReason::WrongIncarnation,
                _ => DropReason::Authentication,
            };
            assert_eq!(got, Err(expected), "byte {i} ^ {mask:#04x}");
        }
    }
    // After all that, the genuine datagram still opens: forgeries did not move the window.
    assert!(b.recv(a.addr, good).is_ok());
    assert_eq!(
        b.engine.counters().rx_packets,
        1,
        "nothing but the genuine datagram was delivered"
    );
}

#[test]
fn key_not_in_keyring_is_dropped() {
    let (mut a, mut b) = encrypted_pair();
    // a seals under an epoch b does not hold.
    a.engine.add_epoch(EpochKey::new(5, [5; 32])).unwrap();
    a.engine.set_send_epoch(5).unwrap();
    let d = a.send(b.mac, b"hello").unwrap();
    assert_eq!(b.recv(a.addr, &d[0].1), Err(DropReason::UnknownEpoch));
    // An outsider with the same epoch id but another secret.
    let mut outsider = Node::new(1, 1, true);
    outsider
        .engine
        .add_epoch(EpochKey::new(1, [0x66; 32]))
        .unwrap();
    outsider
        .engine
        .set_peer(b.addr, Some(b.peer_key()))
        .unwrap();
    outsider
        .engine
        .fdb_mut(vni())
        .unwrap()
        .insert(b.mac, b.addr.ip());
    let d = outsider.send(b.mac, b"hello").unwrap();
    assert_eq!(b.recv(a.addr, &d[0].1), Err(DropReason::Authentication));
    // A stranger's address.
    let stranger: SocketAddr = "198.18.0.99:4789".parse().unwrap();
    assert_eq!(b.recv(stranger, &d[0].1), Err(DropReason::UnknownPeer));
    assert_eq!(b.engine.counters().rx_packets, 0);
}

#[test]
fn broadcast_is_replicated_to_the_flood_list() {
    let mut nodes = [
        Node::new(1, 1, true),
        Node::new(2, 1, true),
        Node::new(3, 1, true),
    ];
    for n in &mut nodes {
        n.engine.add_epoch(EpochKey::new(1, [0xe1; 32])).unwrap();
    }
    mesh(&mut nodes);
    let [a, b, c] = &mut nodes;
    let out = a.send(Mac::BROADCAST, b"who has 198.19.0.3").unwrap();
    let dsts: HashSet<SocketAddr> = out.iter().map(|(d, _)| *d).collect();
    assert_eq!(dsts, HashSet::from([b.addr, c.addr]));
    let by_dst: HashMap<SocketAddr, Vec<u8>> = out.into_iter().collect();
    // Each copy is sealed for its own destination only.
    assert_eq!(
        c.recv(a.addr, &by_dst[&b.addr]),
        Err(DropReason::Authentication)
    );
    assert!(b.recv(a.addr, &by_dst[&b.addr]).is_ok());
    assert!(c.recv(a.addr, &by_dst[&c.addr]).is_ok());
    // Unknown unicast floods too.
    let out = a.send(Mac([2, 0, 0, 0, 0, 0x77]), b"?").unwrap();
    assert_eq!(out.len(), 2);
}

#[test]
fn plain_mode_rules() {
    let mut nodes = [Node::new(1, 1, false), Node::new(2, 1, false)];
    mesh(&mut nodes);
    let [mut a, mut b] = nodes;
    let out = a.send(b.mac, b"plain").unwrap();
    let d = &out[0].1;
    assert_eq!(
        &d[..8],
        &[0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0],
        "RFC 7348 header"
    );
    assert_eq!(&d[8..], &frame(b.mac, a.mac, b"plain")[..]);
    let mut pkt = Packet::new(MAX_FRAME);
    pkt.set_datagram(d);
    let opened = b
        .engine
        .handle_datagram(Instant::now(), a.addr, &mut pkt)
        .unwrap();
    assert!(matches!(opened.provenance(), Provenance::Plain));

    // A sealed datagram on a plain network, and plaintext on an encrypted one.
    let (mut ea, mut eb) = encrypted_pair();
    let sealed = ea.send(eb.mac, b"s").unwrap();
    assert_eq!(b.recv(a.addr, &sealed[0].1), Err(DropReason::SealedOnPlain));
    assert_eq!(eb.recv(ea.addr, d), Err(DropReason::PlaintextOnEncrypted));

    // A known peer claiming another VTEP's MAC.
    let mut c = Node::new(3, 1, false);
    b.engine.set_peer(c.addr, None).unwrap();
    c.engine.set_peer(b.addr, None).unwrap();
    c.engine.fdb_mut(vni()).unwrap().insert(b.mac, b.addr.ip());
    c.mac = a.mac;
    let spoof = c.send(b.mac, b"i am a").unwrap();
    assert_eq!(b.recv(c.addr, &spoof[0].1), Err(DropReason::SpoofedSource));
}

fn encrypted_trio() -> (Node, Node, Node) {
    let mut nodes = [
        Node::new(1, 1, true),
        Node::new(2, 1, true),
        Node::new(3, 1, true),
    ];
    for n in &mut nodes {
        n.engine.add_epoch(EpochKey::new(1, [0xe1; 32])).unwrap();
    }
    mesh(&mut nodes);
    let [a, b, c] = nodes;
    (a, b, c)
}

fn drops(at: &Node, from: &Node, reason: DropReason) -> u64 {
    at.engine
        .peer(from.addr.ip())
        .unwrap()
        .counters()
        .drops
        .get(reason)
}

/// Workloads behind a node send from MACs of their own: a frame from a new MAC is delivered
/// and the MAC bound to the peer that sent it (unicast to it then goes to that peer alone).
/// No other peer can send from it, nor from a node's assigned MAC: refused and counted.
#[test]
fn a_source_mac_is_bound_to_the_peer_that_sent_it() {
    let (mut a, mut b, mut c) = encrypted_trio();
    let b_mac = b.mac;
    let workload = Mac([2, 0x42, 198, 19, 9, 9]);
    b.mac = workload;
    let d = b.send(a.mac, b"from a container").unwrap();
    assert_eq!(
        a.recv(b.addr, &d[0].1).unwrap(),
        frame(a.mac, workload, b"from a container")
    );
    let fdb = a.engine.network(vni()).unwrap().fdb();
    assert_eq!(fdb.lookup(&workload).unwrap().vtep, b.addr.ip());
    let out = a.send(workload, b"reply").unwrap();
    assert_eq!(out.len(), 1, "unicast, not flooded");
    assert_eq!(out[0].0, b.addr);

    // c poses as the workload, then as b itself.
    for claimed in [workload, b_mac] {
        c.mac = claimed;
        let spoof = c.send(a.mac, b"it is me").unwrap();
        assert_eq!(
            a.recv(c.addr, &spoof[0].1),
            Err(DropReason::SpoofedSource),
            "{claimed:?}"
        );
    }
    assert_eq!(drops(&a, &c, DropReason::SpoofedSource), 2);
    assert_eq!(
        a.engine
            .network(vni())
            .unwrap()
            .fdb()
            .lookup(&workload)
            .unwrap()
            .vtep,
        b.addr.ip()
    );
    // b goes on from both MACs.
    for mac in [workload, b_mac] {
        b.mac = mac;
        let d = b.send(a.mac, b"still me").unwrap();
        assert!(a.recv(b.addr, &d[0].1).is_ok());
    }
    assert_eq!(drops(&a, &b, DropReason::SpoofedSource), 0);
}

/// A peer that sends from ever new MACs fills only its own share of the table: past
/// [`MAX_LEARNED_PER_VTEP`] its frames from new MACs are dropped and counted.
#[test]
fn a_peer_learns_a_bounded_number_of_macs() {
    let (mut a, mut b, mut c) = encrypted_trio();
    let b_mac = b.mac;
    let new_mac = |n: usize| Mac([2, 0x42, 0, 0, (n >> 8) as u8, n as u8]);
    for n in 0..MAX_LEARNED_PER_VTEP {
        b.mac = new_mac(n);
        let d = b.send(a.mac, b"x").unwrap();
        assert!(a.recv(b.addr, &d[0].1).is_ok(), "{n}");
    }
    b.mac = new_mac(MAX_LEARNED_PER_VTEP);
    let d = b.send(a.mac, b"one too many").unwrap();
    assert_eq!(a.recv(b.addr, &d[0].1), Err(DropReason::LearnLimit));
    assert_eq!(drops(&a, &b, DropReason::LearnLimit), 1);
    // Its known MACs still pass, and other peers still learn.
    b.mac = b_mac;
    let d = b.send(a.mac, b"known").unwrap();
    assert!(a.recv(b.addr, &d[0].1).is_ok());
    c.mac = new_mac(MAX_LEARNED_PER_VTEP);
    let d = c.send(a.mac, b"new").unwrap();
    assert!(a.recv(c.addr, &d[0].1).is_ok());
}

#[test]
fn external_vtep_cannot_talk_on_encrypted_network() {
    let (mut a, b) = encrypted_pair();
    let ext: SocketAddr = "198.18.0.50:4789".parse().unwrap();
    a.engine.set_peer(ext, None).unwrap();
    let ext_mac = Mac([2, 0, 0, 0, 0, 0x50]);
    a.engine.fdb_mut(vni()).unwrap().insert(ext_mac, ext.ip());
    assert_eq!(a.send(ext_mac, b"x"), Err(DropReason::NoSession));
    let _ = b;
}

#[test]
fn removed_peer_is_revoked_and_readding_never_reuses_a_nonce() {
    let (mut a, mut b) = encrypted_pair();
    let first = a.send(b.mac, b"1").unwrap();
    b.recv(a.addr, &first[0].1).unwrap();
    let before = a.send(b.mac, b"2").unwrap();

    assert!(b.engine.remove_peer(a.addr.ip()));
    assert_eq!(b.recv(a.addr, &before[0].1), Err(DropReason::UnknownPeer));
    assert!(b
        .engine
        .network(vni())
        .unwrap()
        .fdb()
        .lookup(&a.mac)
        .is_none());
    assert!(b.engine.network(vni()).unwrap().fdb().flood().is_empty());
    assert_eq!(b.send(a.mac, b"x"), Err(DropReason::NoDestination));

    // Re-added with the same key: b's counter towards a continues, and a's old datagram that
    // b already accepted is still a replay.
    assert!(a.engine.remove_peer(b.addr.ip()));
    a.engine.set_peer(b.addr, Some(b.peer_key())).unwrap();
    a.engine.fdb_mut(vni()).unwrap().insert(b.mac, b.addr.ip());
    b.engine.set_peer(a.addr, Some(a.peer_key())).unwrap();
    assert_eq!(b.recv(a.addr, &first[0].1), Err(DropReason::Replay));
    let after = a.send(b.mac, b"3").unwrap();
    let counter = |d: &[u8]| envelope::Envelope::new_checked(d).unwrap().counter();
    assert!(counter(&after[0].1) > counter(&before[0].1));
    assert!(b.recv(a.addr, &after[0].1).is_ok());
}

#[test]
fn restarted_peer_gets_new_keys() {
    let (mut a, mut b) = encrypted_pair();
    let old = a.send(b.mac, b"old life").unwrap();
    // a restarts: same static key, next incarnation, counters from zero.
    let mut a2 = Node::new(1, 2, true);
    a2.engine.add_epoch(EpochKey::new(1, [0xe1; 32])).unwrap();
    a2.engine.set_peer(b.addr, Some(b.peer_key())).unwrap();
    a2.engine.fdb_mut(vni()).unwrap().insert(b.mac, b.addr.ip());
    let new = a2.send(b.mac, b"new life").unwrap();
    let counter = |d: &[u8]| envelope::Envelope::new_checked(d).unwrap().counter();
    assert_eq!(counter(&old[0].1), counter(&new[0].1), "both start at zero");
    assert_ne!(old[0].1[28..], new[0].1[28..]);
    // Until the control plane announces the new incarnation, b refuses it.
    assert_eq!(b.recv(a.addr, &new[0].1), Err(DropReason::WrongIncarnation));
    b.engine.set_peer(a.addr, Some(a2.peer_key())).unwrap();
    assert_eq!(
        b.recv(a.addr, &new[0].1).unwrap(),
        frame(b.mac, a.mac, b"new life")
    );
    assert_eq!(b.recv(a.addr, &old[0].1), Err(DropReason::WrongIncarnation));
}

#[test]
fn garbage_is_dropped_never_delivered() {
    let (_, mut b) = encrypted_pair();
    let a_addr: SocketAddr = "198.18.0.1:4789".parse().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..5000 {
        let len = rng.gen_range(0..200);
        let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if len >= 8 && rng.gen_bool(0.5) {
            d[..8].copy_from_slice(&[0x48, 0, 0, 0, 0, 0x10, 0, 0]);
            if len > 8 {
                d[8] = envelope::VERSION;
            }
        }
        assert!(b.recv(a_addr, &d).is_err());
    }
    assert_eq!(b.engine.counters().rx_packets, 0);
    assert_eq!(b.engine.counters().drops.total(), 5000);
}

/// A peer that announces a new incarnation again and again (a restart loop, or a member that
/// cycles them on purpose) leaves a bounded trace: the engine keeps the counters of a few
/// retired sessions per peer, not one per incarnation.
#[test]
fn retired_sessions_are_bounded_per_peer() {
    use shoal_vxlan::engine::RETIRED_PER_NODE;
    let (mut a, b) = encrypted_pair();
    let counter = |d: &[u8]| envelope::Envelope::new_checked(d).unwrap().counter();
    let mut key = b.peer_key();
    for i in 0..1000u32 {
        key.incarnation.0[..4].copy_from_slice(&i.to_be_bytes());
        a.engine.set_peer(b.addr, Some(key)).unwrap();
        if i == 998 {
            a.engine.fdb_mut(vni()).unwrap().insert(b.mac, b.addr.ip());
            assert_eq!(counter(&a.send(b.mac, b"x").unwrap()[0].1), 0);
        }
    }
    assert!(
        a.engine.retired_sessions() <= RETIRED_PER_NODE,
        "{} retired sessions kept",
        a.engine.retired_sessions()
    );
    // A recent one resumes where it stopped: its counter does not start over at zero.
    key.incarnation.0[..4].copy_from_slice(&998u32.to_be_bytes());
    a.engine.set_peer(b.addr, Some(key)).unwrap();
    a.engine.fdb_mut(vni()).unwrap().insert(b.mac, b.addr.ip());
    assert_eq!(counter(&a.send(b.mac, b"y").unwrap()[0].1), 1);
}

/// Two networks between the same two nodes, sealed under the same pair keys: a datagram of one
/// network with its VNI rewritten to the other's does not open (the VNI is associated data),
/// so no one on the path can move a frame from one network into another. The untouched
/// datagram opens, on its own network.
#[test]
fn a_frame_cannot_be_moved_to_another_network() {
    let (mut a, mut b) = encrypted_pair();
    let other = Vni::new(4097).unwrap();
    for n in [&mut a, &mut b] {
        n.engine.add_network(other, true).unwrap();
    }
    let out = a.send(b.mac, b"for network 4096 only").unwrap();
    let (_, datagram) = &out[0];
    // The VNI: bytes 4 to 6 of the VXLAN header (RFC 7348).
    let mut moved = datagram.clone();
    moved[4..7].copy_from_slice(&4097u32.to_be_bytes()[1..]);
    let before = b.engine.counters().drops.get(DropReason::Authentication);
    assert_eq!(b.recv(a.addr, &moved), Err(DropReason::Authentication));
    assert_eq!(
        b.engine.counters().drops.get(DropReason::Authentication),
        before + 1
    );
    let mut pkt = Packet::new(MAX_FRAME);
    assert!(pkt.set_datagram(datagram));
    let opened = b
        .engine
        .handle_datagram(Instant::now(), a.addr, &mut pkt)
        .unwrap();
    assert_eq!(opened.vni(), vni());
}
