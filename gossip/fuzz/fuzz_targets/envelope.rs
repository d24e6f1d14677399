//! The receive paths of a `Membership` core (a UDP datagram, a push-pull frame): arbitrary
//! bytes never panic, every refusal is counted, and nothing leaves the core larger than
//! 1400 bytes. The first byte picks the path and whether the rest is first sealed with a
//! pair key (as node 9, a member, or as node 20, a stranger), so the fuzzer reaches the codec,
//! the authentication rules and foca behind the envelope as well as the envelope itself.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use foca::{Member, State};
use libfuzzer_sys::fuzz_target;
use shoal_gossip::auth::{insecure_test_keys, NodeKeys};
use shoal_gossip::codec::{NodeRecord, StateDump};
use shoal_gossip::membership::MAX_DATAGRAM;
use shoal_gossip::seal::{Kind, Sealer};
use shoal_gossip::{
    Admission, Config, Identity, Key, Keyring, Membership, Metadata, NodeId, Role, Setup, Stats,
};

/// The wall clock the core believes (milliseconds).
const WALL: u64 = 1_000_000;

fn keyring() -> Keyring {
    Keyring::new(Key {
        id: 1,
        secret: [0x42; 32],
    })
}

fn ident(i: u128) -> Identity {
    let addr = format!("198.18.0.{i}:7946").parse().expect("address");
    Identity::new(NodeId::from_index(i), addr, 1)
}

fn keys(i: u128) -> &'static NodeKeys {
    static KEYS: OnceLock<Vec<NodeKeys>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..=20)
            .map(|i| insecure_test_keys(&NodeId::from_index(i)))
            .collect()
    })[i as usize]
}

fn meta(i: u128) -> Metadata {
    Metadata {
        vtep: ident(i).socket_addr().ip(),
        data_port: 4789,
        public_key: keys(i).public().x25519,
        incarnation: [i as u8; 16],
        role: Role::Worker,
        version: "fuzz".into(),
    }
}

/// Nodes 1 to 9: node 1 is the core under test, 9 the sender of sealed inputs. Node 20 holds
/// keys and the gossip key but is not in the directory.
fn directory() -> Admission {
    Admission::only((1..=9).map(|i| (NodeId::from_index(i), keys(i).public())))
}

fn core(now: Instant) -> Membership {
    let setup = Setup {
        config: Config::lan(10),
        identity: ident(1),
        metadata: meta(1),
        keyring: keyring(),
        admission: directory(),
        crypto: Arc::new(insecure_test_keys(&NodeId::from_index(1))),
        seed: 1,
        epoch: WALL,
        salt: 1,
        wall_ms: WALL,
    };
    let mut m = Membership::new(setup, now).expect("valid setup");
    let dump = StateDump {
        members: vec![
            Member::new(ident(2), 0, State::Alive),
            Member::new(ident(3), 4, State::Suspect),
            Member::new(ident(4), 0, State::Down),
            Member::new(ident(9), 0, State::Alive),
        ],
        records: [2, 3, 4, 9]
            .into_iter()
            .map(|i| {
                let inc = if i == 3 { 4 } else { 0 };
                Arc::new(NodeRecord::signed(
                    ident(i),
                    inc,
                    1 << 32,
                    false,
                    meta(i),
                    keys(i),
                ))
            })
            .collect(),
        entries: Vec::new(),
    };
    m.restore(&dump, now);
    m
}

fn dropped(s: &Stats) -> u64 {
    s.dropped_seal
        + s.dropped_decode
        + s.dropped_oversize
        + s.dropped_protocol
        + s.dropped_not_admitted
        + s.dropped_replay
        + s.dropped_spoofed
        + s.dropped_future
        + s.dropped_renewal
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut m = core(now);
    let stream = mode & 2 != 0;
    let kind = if stream { Kind::Stream } else { Kind::Datagram };
    let bytes = if mode & 1 != 0 {
        let (from, dir) = if mode & 4 != 0 {
            // a stranger: its own directory names itself and node 1
            let wide = Admission::only([1, 20].map(|i| (NodeId::from_index(i), keys(i).public())));
            (20, wide)
        } else {
            (9, directory())
        };
        let mut sender = Sealer::new(NodeId::from_index(from), keyring(), WALL, 9);
        sender
            .seal(kind, &NodeId::from_index(1), &dir, keys(from), rest)
            .expect("sealing a fuzz input")
    } else {
        rest.to_vec()
    };
    let before = m.stats();
    let ok = if stream {
        m.handle_pushpull(&bytes, None, now).is_ok()
    } else {
        m.handle_datagram(&bytes, now).is_ok()
    };
    let after = m.stats();
    if !ok {
        assert!(
            dropped(&after) > dropped(&before),
            "an error that was not counted"
        );
    }
    m.handle_timeout(now + Duration::from_secs(2));
    while let Some(t) = m.poll_transmit() {
        assert!(t.data.len() <= MAX_DATAGRAM);
    }
    let frame = m
        .pushpull_frame(NodeId::from_index(9))
        .expect("our own state seals");
    assert!(!frame.is_empty());
    while m.poll_event().is_some() {}
});
