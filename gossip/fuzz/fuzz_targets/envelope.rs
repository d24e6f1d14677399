//! The receive paths of a `Membership` core (a UDP datagram, a push-pull frame): arbitrary
//! bytes never panic, and nothing leaves the core larger than 1400 bytes. The first byte picks
//! the path and whether the rest is sealed with the cluster key first, so the fuzzer reaches
//! the codec and foca behind the envelope as well as the envelope itself.
#![no_main]

use std::time::{Duration, Instant};

use foca::{Member, State};
use libfuzzer_sys::fuzz_target;
use shoal_gossip::codec::StateDump;
use shoal_gossip::membership::MAX_DATAGRAM;
use shoal_gossip::seal::{Kind, Sealer};
use shoal_gossip::{
    Admission, Config, Identity, Key, Keyring, Membership, Metadata, NodeId, Role, Setup,
};

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

fn core(now: Instant) -> Membership {
    let setup = Setup {
        config: Config::lan(10),
        identity: ident(1),
        metadata: Metadata {
            vtep: "198.18.0.1".parse().expect("address"),
            data_port: 4789,
            public_key: [1; 32],
            incarnation: 1,
            role: Role::Worker,
            version: "fuzz".into(),
        },
        keyring: keyring(),
        admission: Admission::Open,
        seed: 1,
        epoch: 1,
        salt: 1,
    };
    let mut m = Membership::new(setup, now).expect("valid setup");
    let dump = StateDump {
        members: vec![
            Member::new(ident(2), 0, State::Alive),
            Member::new(ident(3), 4, State::Suspect),
            Member::new(ident(4), 0, State::Down),
        ],
        items: Vec::new(),
    };
    m.restore(&dump, now);
    m
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
        let mut sender = Sealer::new(keyring(), 9, 9);
        sender.seal(kind, rest).expect("sealing a fuzz input")
    } else {
        rest.to_vec()
    };
    let before = m.stats();
    let ok = if stream {
        m.handle_pushpull(&bytes, now).is_ok()
    } else {
        m.handle_datagram(&bytes, now).is_ok()
    };
    let after = m.stats();
    if !ok {
        let dropped = |s: &shoal_gossip::Stats| {
            s.dropped_seal
                + s.dropped_decode
                + s.dropped_oversize
                + s.dropped_protocol
                + s.dropped_not_admitted
                + s.dropped_replay
        };
        assert!(dropped(&after) > dropped(&before), "an error that was not counted");
    }
    m.handle_timeout(now + Duration::from_secs(2));
    while let Some(t) = m.poll_transmit() {
        assert!(t.data.len() <= MAX_DATAGRAM);
    }
    if stream {
        let frame = m.pushpull_frame().expect("our own state seals");
        assert!(!frame.is_empty());
    }
    while m.poll_event().is_some() {}
});
