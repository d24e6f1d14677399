//! A handful of `Membership` cores talking in memory on a virtual clock (quinn's `Pair`
//! idea), shared by the in-memory test files. Every node's keys derive from its node ID
//! (`insecure_test_keys`); the default directory names nodes 0 to `DIRECTORY - 1`.
#![allow(dead_code)] // each test file uses its own part of the harness

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_gossip::auth::{insecure_test_keys, Crypto};
use shoal_gossip::membership::MAX_DATAGRAM;
use shoal_gossip::{
    Admission, Config, Event, Identity, Key, Keyring, Membership, Metadata, NodeId, PublicKeys,
    Role, Setup,
};

/// Nodes the default directory names.
pub const DIRECTORY: usize = 16;

/// The wall clock of the test network at virtual time zero, in milliseconds.
pub const WALL0: u64 = 1_000_000;

pub struct Net {
    pub base: Instant,
    pub now: Duration,
    pub nodes: Vec<Membership>,
    pub addrs: HashMap<SocketAddr, usize>,
    pub events: Vec<Vec<Event>>,
    /// Drop everything to or from these nodes.
    pub cut: Vec<bool>,
    /// Tamper with every datagram (flip one byte).
    pub tamper: bool,
    /// Hold datagrams back instead of delivering them.
    pub hold: bool,
    /// A partition: nodes below this index cannot reach the others.
    pub split: Option<usize>,
    /// Datagrams held back: (from, to, bytes).
    pub held: Vec<(usize, usize, Vec<u8>)>,
    /// Every datagram delivered: (from, to, bytes).
    pub log: Vec<(usize, usize, Vec<u8>)>,
    /// Build cores without flap damping.
    pub no_damping: bool,
    /// Applied to every core's configuration when it is built (after the above).
    pub tweak: fn(&mut Config),
}

pub fn addr(i: usize) -> SocketAddr {
    format!("198.18.0.{}:7946", i + 1).parse().expect("address")
}

pub fn id(i: usize) -> NodeId {
    NodeId::from_index(i as u128 + 1)
}

pub fn public(i: usize) -> PublicKeys {
    insecure_test_keys(&id(i)).public()
}

pub fn crypto(i: usize) -> Arc<dyn Crypto> {
    Arc::new(insecure_test_keys(&id(i)))
}

/// A directory of these nodes with their own keys.
pub fn dir(nodes: impl IntoIterator<Item = usize>) -> Admission {
    Admission::only(nodes.into_iter().map(|i| (id(i), public(i))))
}

/// The default directory: nodes 0 to `DIRECTORY - 1`.
pub fn full() -> Admission {
    dir(0..DIRECTORY)
}

pub fn meta(i: usize) -> Metadata {
    Metadata {
        vtep: addr(i).ip(),
        data_port: 4789,
        public_key: public(i).x25519,
        incarnation: [i as u8; 16],
        role: Role::Worker,
        version: "test".into(),
    }
}

pub fn key(secret: u8) -> Keyring {
    Keyring::new(Key {
        id: 1,
        secret: [secret; 32],
    })
}

impl Net {
    pub fn new() -> Self {
        Net {
            base: Instant::now(),
            now: Duration::ZERO,
            nodes: Vec::new(),
            addrs: HashMap::new(),
            events: Vec::new(),
            cut: Vec::new(),
            tamper: false,
            hold: false,
            split: None,
            held: Vec::new(),
            log: Vec::new(),
            no_damping: false,
            tweak: |_| {},
        }
    }

    /// The wall clock now, in milliseconds.
    pub fn wall(&self) -> u64 {
        WALL0 + self.now.as_millis() as u64
    }

    /// Node `i`'s core for its run number `run` (its bump too; the envelope epoch, seed and
    /// salt rise with it).
    pub fn core(
        &self,
        i: usize,
        keyring: Keyring,
        admission: Admission,
        lh: bool,
        run: u32,
    ) -> Membership {
        self.core_bumped(i, keyring, admission, lh, run, run)
    }

    /// [`Net::core`] with an identity bump of its own.
    pub fn core_bumped(
        &self,
        i: usize,
        keyring: Keyring,
        admission: Admission,
        lh: bool,
        run: u32,
        bump: u32,
    ) -> Membership {
        let mut config = Config::lan(10);
        config.local_health = lh;
        if self.no_damping {
            config.flap_damping = None;
        }
        (self.tweak)(&mut config);
        Membership::new(
            Setup {
                config,
                identity: Identity::new(id(i), addr(i), bump),
                metadata: meta(i),
                keyring,
                admission,
                crypto: crypto(i),
                seed: i as u64 + u64::from(run),
                epoch: WALL0 + u64::from(run),
                salt: i as u64 + (u64::from(run) << 32),
                wall_ms: self.wall(),
            },
            self.base + self.now,
        )
        .expect("valid setup")
    }

    pub fn add(&mut self, keyring: Keyring, admission: Admission, local_health: bool) -> usize {
        let i = self.nodes.len();
        let m = self.core(i, keyring, admission, local_health, 1);
        self.nodes.push(m);
        self.addrs.insert(addr(i), i);
        self.events.push(Vec::new());
        self.cut.push(false);
        i
    }

    /// `n` nodes with the same key, the default directory and local health, all joined
    /// through node 0, after 5 s of virtual time.
    pub fn joined(n: usize) -> Net {
        Net::joined_with(n, false)
    }

    /// [`Net::joined`], with flap damping off when `no_damping`.
    pub fn joined_with(n: usize, no_damping: bool) -> Net {
        Net::joined_tweaked(n, no_damping, |_| {})
    }

    /// [`Net::joined_with`], every core's configuration changed by `tweak`.
    pub fn joined_tweaked(n: usize, no_damping: bool, tweak: fn(&mut Config)) -> Net {
        let mut net = Net::new();
        net.no_damping = no_damping;
        net.tweak = tweak;
        for _ in 0..n {
            net.add(key(7), full(), true);
        }
        let t = net.t();
        for i in 1..n {
            net.nodes[i].join(&[(id(0), addr(0))], t);
        }
        net.run(Duration::from_secs(5));
        net
    }

    pub fn t(&self) -> Instant {
        self.base + self.now
    }

    /// Delivers one datagram to node `j` (as the network would).
    pub fn deliver(&mut self, j: usize, data: &[u8]) -> bool {
        let (now, wall) = (self.t(), self.wall());
        self.nodes[j].set_wall_clock(wall, now);
        self.nodes[j].handle_datagram(data, now).is_ok()
    }

    /// Runs the network for `d` of virtual time in 10 ms steps; every datagram and
    /// push-pull arrives within the step.
    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            let now = self.t();
            let wall = self.wall();
            for i in 0..self.nodes.len() {
                self.nodes[i].set_wall_clock(wall, now);
                if !self.cut[i] {
                    self.nodes[i].handle_timeout(now);
                }
            }
            // deliver until quiet (bounded)
            for _ in 0..50 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    while let Some(t) = self.nodes[i].poll_transmit() {
                        moved = true;
                        assert!(t.data.len() <= MAX_DATAGRAM);
                        let Some(&j) = self.addrs.get(&t.dst) else {
                            continue;
                        };
                        if self.cut[i] || self.cut[j] || self.apart(i, j) {
                            continue;
                        }
                        let mut data = t.data;
                        if self.tamper {
                            let k = data.len() / 2;
                            data[k] ^= 0x80;
                        }
                        if self.hold {
                            self.held.push((i, j, data));
                            continue;
                        }
                        let _ = self.nodes[j].handle_datagram(&data, now);
                        self.log.push((i, j, data));
                    }
                    while let Some(peer) = self.nodes[i].poll_pushpull() {
                        moved = true;
                        let Some(&j) = self.addrs.get(&peer.addr) else {
                            continue;
                        };
                        if self.cut[i] || self.cut[j] || i == j || self.apart(i, j) {
                            continue;
                        }
                        let Ok(mut frame) = self.nodes[i].pushpull_frame(peer.id) else {
                            continue;
                        };
                        if self.tamper {
                            let k = frame.len() / 2;
                            frame[k] ^= 0x80;
                        }
                        if let Ok(sender) = self.nodes[j].handle_pushpull(&frame, None, now) {
                            if let Ok(reply) = self.nodes[j].pushpull_frame(sender) {
                                let _ = self.nodes[i].handle_pushpull(&reply, Some(peer.id), now);
                            }
                        }
                    }
                    while let Some(e) = self.nodes[i].poll_event() {
                        moved = true;
                        self.events[i].push(e);
                    }
                }
                if !moved {
                    break;
                }
            }
        }
    }

    pub fn apart(&self, i: usize, j: usize) -> bool {
        self.split.is_some_and(|k| (i < k) != (j < k))
    }

    pub fn up_ids(&self, i: usize) -> Vec<NodeId> {
        let mut up: Vec<NodeId> = Vec::new();
        for e in &self.events[i] {
            match e {
                Event::Up(m) => up.push(m.id),
                Event::Down(m) | Event::Left(m) => up.retain(|x| *x != m.id),
                Event::Updated(_) | Event::Entry { .. } => {}
            }
        }
        up.sort();
        up
    }

    /// Whether node `i` ever reported node `j` down (or left).
    pub fn saw_down(&self, i: usize, j: usize) -> bool {
        self.events[i]
            .iter()
            .any(|e| matches!(e, Event::Down(m) | Event::Left(m) if m.id == id(j)))
    }
}
