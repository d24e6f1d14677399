//! The sealed envelope: every datagram and every stream frame on 7946 is
//! XChaCha20-Poly1305-sealed with a key only its sender and its receiver hold.
//!
//! ```text
//! envelope = kind u8 (1 datagram, 2 stream frame) key_id u8 sender_tag[4] nonce[24]
//!            ciphertext tag[16]                                     (46 bytes overhead)
//! nonce    = epoch u64 salt u64 counter u64
//! ```
//!
//! **Keys.** One per ordered pair of nodes and per gossip key ([`crate::auth::pair_key`]):
//! HKDF-SHA256 with the gossip key secret as salt, the X25519 result of the two nodes'
//! static keys as input, and both node IDs (sender first) in the info. A node holding the
//! gossip key but not one end's X25519 secret can neither read nor forge a pair's messages,
//! so a message that opens under the pair key of sender S came from S. [`Sealer`] caches the
//! derived keys per (peer, gossip key), drops them when the peer leaves the directory or
//! changes key, or the gossip key leaves the ring, and keeps at most [`PAIR_CACHE`] peers.
//!
//! **Sender tag.** The first 4 bytes of SHA-256 of the sender's node ID
//! ([`crate::auth::sender_tag`]): the receiver looks the tag up in its directory and tries
//! the pair key of each member with that tag (usually one; a collision means two or more
//! tries). A tag that names nobody is dropped before any cryptography.
//!
//! **Nonce.** Names the sending process and orders its messages: `epoch` rises with every
//! start of the agent (the driver uses the wall clock in milliseconds), `salt` is drawn at
//! random at start, and `counter` only goes up. A (key, nonce) pair never repeats: a key
//! seals for one sender only, and that sender's nonces never repeat. All 24 bytes are the AEAD
//! nonce, so they are authenticated; kind, key id and sender tag are the associated data, so
//! a datagram cannot be replayed as a stream frame nor relabelled with another sender. Two
//! gossip keys can be live during a rotation: [`Keyring`] seals with the current one and
//! opens with either.
//!
//! What does not open is an [`OpenError`]: the caller drops and counts it and never decodes
//! it. What opens is an [`Opened`], which only [`Sealer::open`] makes: the proof that the
//! plaintext came from [`Opened::sender`].
//!
//! Replay: [`ReplayWindow`] keeps, per sender, the (epoch, salt) of its current process and a
//! 512-message sliding window over its counter (IPsec's anti-replay window, RFC 4303 §3.4.3).
//! A datagram seen before, older than the window, or from an earlier process of the same
//! sender is refused. The receiver keys the windows by the authenticated sender (see
//! `membership`).

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::auth::{pair_key, sender_tag, Admission, Crypto};
use crate::identity::NodeId;

/// Bytes the envelope adds to a plaintext.
pub const OVERHEAD: usize = HEAD + 16;

/// Bytes before the ciphertext: kind, key id, sender tag, nonce.
const HEAD: usize = 1 + 1 + 4 + 24;

/// The 24-byte nonce at bytes 6..30 of an envelope (callers have checked it is that long).
fn nonce_of(envelope: &[u8]) -> XNonce {
    let mut nonce = XNonce::default();
    nonce.copy_from_slice(&envelope[6..HEAD]);
    nonce
}

/// What an envelope carries, authenticated so one kind cannot pass for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A UDP datagram.
    Datagram = 1,
    /// One frame of a TCP push-pull stream.
    Stream = 2,
}

/// One gossip key: a 32-byte secret and the id that names it on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// Names the key in every envelope so the receiver knows which to try.
    pub id: u8,
    /// The secret.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ id: {}, secret: <redacted> }}", self.id)
    }
}

/// The live gossip keys: send with `current`, accept `current` or `previous`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    current: Key,
    previous: Option<Key>,
}

/// Why a [`Keyring`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// The previous key has the same id as the current one.
    #[error(
        "previous gossip key has the same id {0} as the current one; give each key its own id"
    )]
    SameId(u8),
}

impl Keyring {
    /// A keyring with one key.
    pub fn new(current: Key) -> Self {
        Keyring {
            current,
            previous: None,
        }
    }

    /// A keyring during a rotation: `current` seals, both open.
    pub fn with_previous(current: Key, previous: Key) -> Result<Self, KeyringError> {
        if current.id == previous.id {
            return Err(KeyringError::SameId(current.id));
        }
        Ok(Keyring {
            current,
            previous: Some(previous),
        })
    }

    /// The key used to seal.
    pub fn current(&self) -> &Key {
        &self.current
    }

    /// The key still accepted during a rotation.
    pub fn previous(&self) -> Option<&Key> {
        self.previous.as_ref()
    }
}

/// Why sealing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The 64-bit nonce counter is spent; the agent must restart to draw a new prefix.
    #[error("gossip nonce counter exhausted; restart the agent")]
    NonceExhausted,
    /// The AEAD refused the input (only possible for absurd lengths).
    #[error("gossip message too large to seal")]
    TooLarge,
    /// The destination is in no directory entry: there is no key to seal for it.
    #[error("gossip destination {0} is not on the admission list; nothing sent")]
    UnknownPeer(NodeId),
    /// The destination's directory key gives no shared secret (a low-order point).
    #[error("gossip destination {0} has an unusable X25519 key in the node list; nothing sent")]
    PeerKey(NodeId),
}

/// Why an envelope did not open. The bytes must be dropped, counted, and never decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than the envelope overhead.
    #[error("gossip packet of {0} bytes is shorter than a sealed envelope; dropped")]
    Short(usize),
    /// The kind byte is wrong for where it arrived.
    #[error("gossip envelope kind {0} is not expected here; dropped")]
    Kind(u8),
    /// No live key has this id.
    #[error("gossip packet sealed with unknown key id {0}; the sender's gossip key differs (check the cluster key rotation)")]
    UnknownKey(u8),
    /// The sender tag names no member of the directory (nothing was tried).
    #[error("gossip packet from a sender that is not on the admission list; dropped")]
    UnknownSender,
    /// Authentication failed under every candidate sender's pair key: wrong gossip key,
    /// tampered bytes, or a member posing as another.
    #[error(
        "gossip packet failed authentication (wrong key, tampered, or a forged sender); dropped"
    )]
    Auth,
}

/// Where a sealed message stands in its sender's stream: read from the (authenticated) nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// Rises with every start of the sending agent.
    pub epoch: u64,
    /// Random per start: tells apart two processes that started in the same millisecond.
    pub salt: u64,
    /// Rises with every message the process seals.
    pub counter: u64,
}

/// Messages a [`ReplayWindow`] remembers below the highest counter seen. The counter is
/// shared by all of a sender's destinations, and a node waking from a stall answers its
/// backlog in one burst of hundreds of datagrams, so the window is wide.
pub const REPLAY_WINDOW: u64 = 512;

const WINDOW_WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Why a [`ReplayWindow`] refused a message. The message must be dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This counter was accepted before.
    #[error("gossip datagram already received (replayed or duplicated); dropped")]
    Duplicate,
    /// The counter is more than [`REPLAY_WINDOW`] messages behind the newest one.
    #[error("gossip datagram too far behind the sender's newest one (replayed or badly reordered); dropped")]
    TooOld,
    /// Sealed by an earlier process of the sender (lower epoch, or same epoch other salt).
    #[error("gossip datagram from an earlier run of its sender (replayed, or the sender's clock went back across a restart); dropped")]
    StaleEpoch,
}

/// One sender's anti-replay state: its process and a sliding window over its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    epoch: u64,
    salt: u64,
    top: u64,
    /// A ring of bits: bit `c % REPLAY_WINDOW` set means counter `c` (within the window
    /// below `top`) was accepted.
    seen: [u64; WINDOW_WORDS],
}

impl ReplayWindow {
    /// A window that has accepted `first`.
    pub fn new(first: Sequence) -> Self {
        let mut w = ReplayWindow {
            epoch: first.epoch,
            salt: first.salt,
            top: first.counter,
            seen: [0; WINDOW_WORDS],
        };
        w.set(first.counter);
        w
    }

    fn slot(counter: u64) -> (usize, u64) {
        let bit = counter % REPLAY_WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    fn set(&mut self, counter: u64) {
        let (w, b) = Self::slot(counter);
        self.seen[w] |= b;
    }

    fn is_set(&self, counter: u64) -> bool {
        let (w, b) = Self::slot(counter);
        self.seen[w] & b != 0
    }

    /// Accepts `seq` (and remembers it) or says why it is a replay. A higher epoch is a
    /// restart of the sender: the window starts over.
    pub fn check(&mut self, seq: Sequence) -> Result<(), ReplayError> {
        if seq.epoch > self.epoch {
            *self = ReplayWindow::new(seq);
            return Ok(());
        }
        if seq.epoch < self.epoch || seq.salt != self.salt {
            return Err(ReplayError::StaleEpoch);
        }
        if seq.counter > self.top {
            if seq.counter - self.top >= REPLAY_WINDOW {
                self.seen = [0; WINDOW_WORDS];
            } else {
                // Forget the counters that fall out of the window (they share ring slots
                // with the new ones).
                for c in self.top + 1..seq.counter {
                    let (w, b) = Self::slot(c);
                    self.seen[w] &= !b;
                }
            }
            self.set(seq.counter);
            self.top = seq.counter;
            return Ok(());
        }
        if self.top - seq.counter >= REPLAY_WINDOW {
            return Err(ReplayError::TooOld);
        }
        if self.is_set(seq.counter) {
            return Err(ReplayError::Duplicate);
        }
        self.set(seq.counter);
        Ok(())
    }
}

/// Pair keys kept at most (least recently used ones are dropped first, a quarter at a time).
/// Deriving a dropped one again costs one X25519 (about 40 us); a node probing a 10,000-member
/// cluster meets a new peer about twice a second.
pub const PAIR_CACHE: usize = 1024;

/// A message that opened: its plaintext, where it stands in its sender's stream, and who
/// sent it. Only [`Sealer::open`] makes one, and only when the pair key of `sender` opened
/// the message, so the sender is authenticated.
#[derive(Debug)]
pub struct Opened {
    sender: NodeId,
    seq: Sequence,
    plain: Vec<u8>,
}

impl Opened {
    /// The authenticated sender.
    pub fn sender(&self) -> NodeId {
        self.sender
    }
    /// Where the message stands in the sender's stream (for a [`ReplayWindow`]).
    pub fn sequence(&self) -> Sequence {
        self.seq
    }
    /// The plaintext.
    pub fn plaintext(&self) -> &[u8] {
        &self.plain
    }
}

/// The derived keys of one peer under one gossip key.
struct PairCiphers {
    key_id: u8,
    send: XChaCha20Poly1305,
    recv: XChaCha20Poly1305,
}

/// What we keep per peer: the directory key the pair keys were derived from, and those keys
/// per live gossip key. (The X25519 result is not kept: a new gossip key, once per rotation,
/// computes it again.)
struct Pair {
    x25519: [u8; 32],
    keys: Vec<PairCiphers>,
    used: u64,
}

/// Why no pair key could be had for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairError {
    /// Not in the directory.
    Unknown,
    /// Its directory key gives no shared secret (low order).
    BadKey,
    /// No live gossip key has this id.
    NoGossipKey,
}

/// Seals for one peer with the current gossip key and a never-repeating nonce; opens with
/// any live key, finding the sender through its tag. Keeps the pair keys (see [`PAIR_CACHE`]).
pub struct Sealer {
    keyring: Keyring,
    me: NodeId,
    tag: [u8; 4],
    epoch: u64,
    salt: u64,
    counter: u64,
    pairs: HashMap<NodeId, Pair>,
    tick: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("me", &self.me)
            .field("keyring", &self.keyring)
            .field("epoch", &self.epoch)
            .field("counter", &self.counter)
            .field("pairs", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for node `me`. `epoch` must rise with every start of the agent (wall clock
    /// milliseconds); `salt` must be fresh random bits for every start.
    pub fn new(me: NodeId, keyring: Keyring, epoch: u64, salt: u64) -> Self {
        Sealer {
            keyring,
            me,
            tag: sender_tag(&me),
            epoch,
            salt,
            counter: 0,
            pairs: HashMap::new(),
            tick: 0,
        }
    }

    /// Replaces the gossip keys; the nonce counter keeps going. Keys derived from a gossip
    /// key that is no longer live (or whose id now names another secret) are dropped.
    pub fn set_keys(&mut self, keyring: Keyring) {
        let stale: Vec<u8> = [Some(&self.keyring.current), self.keyring.previous.as_ref()]
            .into_iter()
            .flatten()
            .filter(|old| {
                ![Some(&keyring.current), keyring.previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|new| new == *old)
            })
            .map(|k| k.id)
            .collect();
        for p in self.pairs.values_mut() {
            p.keys.retain(|c| !stale.contains(&c.key_id));
        }
        self.keyring = keyring;
    }

    /// Forgets the pair keys of peers the directory no longer names, or names with another
    /// X25519 key.
    pub fn set_directory(&mut self, dir: &Admission) {
        self.pairs
            .retain(|id, p| dir.keys(id).is_some_and(|k| k.x25519 == p.x25519));
    }

    /// The live keys.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Peers whose keys are cached (memory figures).
    pub fn pairs_cached(&self) -> usize {
        self.pairs.len()
    }

    fn gossip_secret(&self, key_id: u8) -> Option<Zeroizing<[u8; 32]>> {
        [Some(&self.keyring.current), self.keyring.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == key_id)
            .map(|k| Zeroizing::new(k.secret))
    }

    /// The keys of the pair (us, `peer`) under gossip key `key_id`, derived on first use.
    fn ciphers(
        &mut self,
        peer: &NodeId,
        key_id: u8,
        dir: &Admission,
        crypto: &dyn Crypto,
    ) -> Result<&PairCiphers, PairError> {
        let keys = dir.keys(peer).ok_or(PairError::Unknown)?;
        let secret = self.gossip_secret(key_id).ok_or(PairError::NoGossipKey)?;
        self.tick += 1;
        let tick = self.tick;
        let fresh = self.pairs.get(peer).is_none_or(|p| p.x25519 != keys.x25519);
        if fresh {
            if self.pairs.len() >= PAIR_CACHE && !self.pairs.contains_key(peer) {
                self.evict();
            }
            self.pairs.insert(
                *peer,
                Pair {
                    x25519: keys.x25519,
                    keys: Vec::with_capacity(1),
                    used: tick,
                },
            );
        }
        let me = self.me;
        let pair = self.pairs.get_mut(peer).ok_or(PairError::Unknown)?;
        pair.used = tick;
        let at = match pair.keys.iter().position(|c| c.key_id == key_id) {
            Some(at) => at,
            None => {
                let shared = crypto.shared(&keys.x25519).ok_or(PairError::BadKey)?;
                let send = pair_key(&secret, &shared, &me, peer);
                let recv = pair_key(&secret, &shared, peer, &me);
                pair.keys.push(PairCiphers {
                    key_id,
                    send: XChaCha20Poly1305::new((&*send).into()),
                    recv: XChaCha20Poly1305::new((&*recv).into()),
                });
                pair.keys.len() - 1
            }
        };
        Ok(&pair.keys[at])
    }

    /// Drops the least recently used quarter of the pair keys.
    fn evict(&mut self) {
        let mut ticks: Vec<u64> = self.pairs.values().map(|p| p.used).collect();
        ticks.sort_unstable();
        let cut = ticks[ticks.len() / 4];
        self.pairs.retain(|_, p| p.used > cut);
    }

    /// Seals `plaintext` into a new envelope for `to`.
    pub fn seal(
        &mut self,
        kind: Kind,
        to: &NodeId,
        dir: &Admission,
        crypto: &dyn Crypto,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if self.counter == u64::MAX {
            return Err(SealError::NonceExhausted);
        }
        let key_id = self.keyring.current.id;
        let mut head = [0u8; HEAD];
        head[0] = kind as u8;
        head[1] = key_id;
        head[2..6].copy_from_slice(&self.tag);
        head[6..14].copy_from_slice(&self.epoch.to_be_bytes());
        head[14..22].copy_from_slice(&self.salt.to_be_bytes());
        head[22..30].copy_from_slice(&self.counter.to_be_bytes());
        let cipher = match self.ciphers(to, key_id, dir, crypto) {
            Ok(c) => &c.send,
            Err(PairError::BadKey) => return Err(SealError::PeerKey(*to)),
            Err(_) => return Err(SealError::UnknownPeer(*to)),
        };
        let ct = cipher
            .encrypt(
                &nonce_of(&head),
                Payload {
                    msg: plaintext,
                    aad: &head[..6],
                },
            )
            .map_err(|_| SealError::TooLarge)?;
        // Only a nonce that was used counts: a failed seal leaves the counter alone.
        self.counter += 1;
        let mut out = Vec::with_capacity(HEAD + ct.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens an envelope of the expected `kind`: the sender is the directory member (named
    /// by the tag) whose pair key opens it.
    pub fn open(
        &mut self,
        kind: Kind,
        data: &[u8],
        dir: &Admission,
        crypto: &dyn Crypto,
    ) -> Result<Opened, OpenError> {
        if data.len() < OVERHEAD {
            return Err(OpenError::Short(data.len()));
        }
        if data[0] != kind as u8 {
            return Err(OpenError::Kind(data[0]));
        }
        let key_id = data[1];
        if self.gossip_secret(key_id).is_none() {
            return Err(OpenError::UnknownKey(key_id));
        }
        let tag = [data[2], data[3], data[4], data[5]];
        let me = self.me;
        let candidates: Vec<NodeId> = dir
            .candidates(&tag)
            .iter()
            .copied()
            .filter(|c| *c != me)
            .collect();
        if candidates.is_empty() {
            return Err(OpenError::UnknownSender);
        }
        for sender in candidates {
            let Ok(c) = self.ciphers(&sender, key_id, dir, crypto) else {
                continue;
            };
            if let Ok(plain) = c.recv.decrypt(
                &nonce_of(data),
                Payload {
                    msg: &data[HEAD..],
                    aad: &data[..6],
                },
            ) {
                let word = |at: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[at..at + 8]);
                    u64::from_be_bytes(b)
                };
                return Ok(Opened {
                    sender,
                    seq: Sequence {
                        epoch: word(6),
                        salt: word(14),
                        counter: word(22),
                    },
                    plain,
                });
            }
        }
        Err(OpenError::Auth)
    }

    /// Opens an envelope we sealed for `to` (debug output of the simulation): `None` unless
    /// its pair keys are still cached.
    pub fn open_own(&self, to: &NodeId, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < OVERHEAD {
            return None;
        }
        let c = self
            .pairs
            .get(to)?
            .keys
            .iter()
            .find(|c| c.key_id == data[1])?;
        c.send
            .decrypt(
                &nonce_of(data),
                Payload {
                    msg: &data[HEAD..],
                    aad: &data[..6],
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8, b: u8) -> Key {
        Key {
            id,
            secret: [b; 32],
        }
    }

    use crate::auth::{NodeKeys, PublicKeys};

    /// Three nodes a, b, c, their keys and a directory naming all three.
    struct Trio {
        ids: [NodeId; 3],
        keys: [NodeKeys; 3],
        dir: Admission,
    }

    fn trio() -> Trio {
        let ids = [1, 2, 3].map(NodeId::from_index);
        let keys = [1u8, 2, 3].map(|b| NodeKeys::from_secret([b; 32]));
        let dir = Admission::only(ids.iter().zip(&keys).map(|(i, k)| (*i, k.public())));
        Trio { ids, keys, dir }
    }

    impl Trio {
        fn sealer(&self, i: usize, ring: Keyring, epoch: u64) -> Sealer {
            Sealer::new(self.ids[i], ring, epoch, epoch)
        }
    }

    #[test]
    fn round_trip_names_the_sender_and_nonce_never_repeats() {
        let t = trio();
        let mut a = t.sealer(0, Keyring::new(key(1, 7)), 3);
        let mut b = t.sealer(1, Keyring::new(key(1, 7)), 4);
        let x = a
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"hello")
            .unwrap();
        let y = a
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"hello")
            .unwrap();
        assert_eq!(x.len(), 5 + OVERHEAD);
        assert_ne!(x[6..30], y[6..30], "nonce reused");
        let o = b.open(Kind::Datagram, &x, &t.dir, &t.keys[1]).unwrap();
        assert_eq!(o.plaintext(), b"hello");
        assert_eq!(o.sender(), t.ids[0]);
        assert_eq!(
            o.sequence(),
            Sequence {
                epoch: 3,
                salt: 3,
                counter: 0
            }
        );
        let o = b.open(Kind::Datagram, &y, &t.dir, &t.keys[1]).unwrap();
        assert_eq!(o.sequence().counter, 1);
        // and back: b's answer opens at a, named b
        let z = b
            .seal(Kind::Datagram, &t.ids[0], &t.dir, &t.keys[1], b"hi")
            .unwrap();
        let o = a.open(Kind::Datagram, &z, &t.dir, &t.keys[0]).unwrap();
        assert_eq!((o.sender(), o.plaintext()), (t.ids[1], &b"hi"[..]));
        // our own copy, for debug output
        assert_eq!(a.open_own(&t.ids[1], &x).as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn envelope_golden_layout() {
        let t = trio();
        let mut a = t.sealer(0, Keyring::new(key(9, 7)), 0x0102_0304_0506_0708);
        let x = a
            .seal(Kind::Stream, &t.ids[1], &t.dir, &t.keys[0], b"abc")
            .unwrap();
        let mut head = vec![2, 9];
        head.extend_from_slice(&sender_tag(&t.ids[0]));
        head.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        head.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        head.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(x[..30], head[..]);
        assert_eq!(x.len(), 30 + 3 + 16);
        // the ciphertext is XChaCha20-Poly1305 under the directional pair key, with the first
        // six bytes as associated data
        let shared = t.keys[0].shared(&t.keys[1].public().x25519).unwrap();
        let k = pair_key(&[7; 32], &shared, &t.ids[0], &t.ids[1]);
        let plain = XChaCha20Poly1305::new((&*k).into())
            .decrypt(
                &nonce_of(&x),
                Payload {
                    msg: &x[30..],
                    aad: &x[..6],
                },
            )
            .unwrap();
        assert_eq!(plain, b"abc");
    }

    #[test]
    fn every_tampered_byte_fails() {
        let t = trio();
        let mut a = t.sealer(0, Keyring::new(key(1, 7)), 3);
        let mut b = t.sealer(1, Keyring::new(key(1, 7)), 4);
        let good = a
            .seal(
                Kind::Datagram,
                &t.ids[1],
                &t.dir,
                &t.keys[0],
                b"some payload",
            )
            .unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(
                b.open(Kind::Datagram, &bad, &t.dir, &t.keys[1]).is_err(),
                "byte {i}"
            );
        }
        assert_eq!(
            b.open(Kind::Datagram, &good[..10], &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::Short(10)
        );
        assert_eq!(
            b.open(Kind::Stream, &good, &t.dir, &t.keys[1]).unwrap_err(),
            OpenError::Kind(1)
        );
    }

    #[test]
    fn only_the_two_ends_of_a_pair_open_it() {
        let t = trio();
        let ring = || Keyring::new(key(1, 7));
        let mut a = t.sealer(0, ring(), 3);
        let mut b = t.sealer(1, ring(), 4);
        let mut c = t.sealer(2, ring(), 5);
        let to_b = a
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"for b")
            .unwrap();
        // c holds the gossip key and is a member, but not b's secret
        assert_eq!(
            c.open(Kind::Datagram, &to_b, &t.dir, &t.keys[2])
                .unwrap_err(),
            OpenError::Auth
        );
        // c relabels its own envelope with a's tag: it opens under no key b holds for a
        let mut forged = c
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[2], b"i am a")
            .unwrap();
        forged[2..6].copy_from_slice(&sender_tag(&t.ids[0]));
        assert_eq!(
            b.open(Kind::Datagram, &forged, &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::Auth
        );
        // reflected back to its sender: our own tag names no one we accept from
        assert_eq!(
            a.open(Kind::Datagram, &to_b, &t.dir, &t.keys[0])
                .unwrap_err(),
            OpenError::UnknownSender
        );
        // a sender not in the directory: dropped before any cryptography
        let outsider = NodeKeys::from_secret([4; 32]);
        let wide = Admission::only(
            t.ids
                .iter()
                .zip(&t.keys)
                .map(|(i, k)| (*i, k.public()))
                .chain([(NodeId::from_index(4), outsider.public())]),
        );
        let mut o = Sealer::new(NodeId::from_index(4), ring(), 6, 6);
        let from_outsider = o
            .seal(Kind::Datagram, &t.ids[1], &wide, &outsider, b"let me in")
            .unwrap();
        assert_eq!(
            b.open(Kind::Datagram, &from_outsider, &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::UnknownSender
        );
        // and nothing can be sealed for a destination the directory does not name
        assert_eq!(
            a.seal(
                Kind::Datagram,
                &NodeId::from_index(4),
                &t.dir,
                &t.keys[0],
                b"x"
            )
            .unwrap_err(),
            SealError::UnknownPeer(NodeId::from_index(4))
        );
    }

    #[test]
    fn colliding_tags_are_each_tried() {
        let t = trio();
        // Two members with one tag (finding a real 4-byte collision takes about 2^32 hashes,
        // so the index entry is made by hand): b tries both and names the one whose key opens.
        let mut dir = t.dir.clone();
        dir.force_tag(&t.ids[2], sender_tag(&t.ids[0]));
        let mut a = t.sealer(0, Keyring::new(key(1, 7)), 3);
        let mut b = t.sealer(1, Keyring::new(key(1, 7)), 4);
        let mut c = t.sealer(2, Keyring::new(key(1, 7)), 5);
        c.tag = sender_tag(&t.ids[0]);
        let from_a = a
            .seal(Kind::Datagram, &t.ids[1], &dir, &t.keys[0], b"a")
            .unwrap();
        let from_c = c
            .seal(Kind::Datagram, &t.ids[1], &dir, &t.keys[2], b"c")
            .unwrap();
        assert_eq!(from_a[2..6], from_c[2..6]);
        for (env, who) in [(&from_a, 0), (&from_c, 2)] {
            let o = b.open(Kind::Datagram, env, &dir, &t.keys[1]).unwrap();
            assert_eq!(o.sender(), t.ids[who]);
        }
    }

    #[test]
    fn wrong_gossip_key_fails_and_rotation_accepts_both() {
        let t = trio();
        let mut old = t.sealer(0, Keyring::new(key(1, 7)), 1);
        let mut new = t.sealer(1, Keyring::new(key(2, 8)), 2);
        let from_old = old
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"x")
            .unwrap();
        assert_eq!(
            new.open(Kind::Datagram, &from_old, &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::UnknownKey(1)
        );
        // same id, different secret: authentication failure
        let mut imposter = t.sealer(1, Keyring::new(key(1, 9)), 4);
        assert_eq!(
            imposter
                .open(Kind::Datagram, &from_old, &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::Auth
        );
        let mut rotating = t.sealer(1, Keyring::new(key(1, 7)), 5);
        assert!(rotating
            .open(Kind::Datagram, &from_old, &t.dir, &t.keys[1])
            .is_ok());
        rotating.set_keys(Keyring::with_previous(key(2, 8), key(1, 7)).unwrap());
        let again = old
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"x")
            .unwrap();
        assert_eq!(
            rotating
                .open(Kind::Datagram, &again, &t.dir, &t.keys[1])
                .unwrap()
                .plaintext(),
            b"x"
        );
        let sent = rotating
            .seal(Kind::Datagram, &t.ids[0], &t.dir, &t.keys[1], b"z")
            .unwrap();
        assert_eq!(sent[1], 2, "seals with the current key");
        // the old key leaves the ring: its derived keys go, and it no longer opens
        rotating.set_keys(Keyring::new(key(2, 8)));
        assert!(rotating
            .pairs
            .values()
            .all(|p| p.keys.iter().all(|c| c.key_id == 2)));
        let late = old
            .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"x")
            .unwrap();
        assert_eq!(
            rotating
                .open(Kind::Datagram, &late, &t.dir, &t.keys[1])
                .unwrap_err(),
            OpenError::UnknownKey(1)
        );
        assert!(Keyring::with_previous(key(3, 1), key(3, 2)).is_err());
    }

    #[test]
    fn pair_cache_follows_the_directory_and_stays_bounded() {
        let t = trio();
        let mut a = t.sealer(0, Keyring::new(key(1, 7)), 1);
        for to in [1, 2] {
            a.seal(Kind::Datagram, &t.ids[to], &t.dir, &t.keys[0], b"x")
                .unwrap();
        }
        assert_eq!(a.pairs_cached(), 2);
        // c re-keys: its cached pair goes, b's stays
        let rekeyed: Vec<(NodeId, PublicKeys)> = vec![
            (t.ids[0], t.keys[0].public()),
            (t.ids[1], t.keys[1].public()),
            (t.ids[2], NodeKeys::from_secret([9; 32]).public()),
        ];
        a.set_directory(&Admission::only(rekeyed));
        assert_eq!(a.pairs_cached(), 1);
        assert!(a.pairs.contains_key(&t.ids[1]));
        // many peers: never more than PAIR_CACHE kept
        let many: Vec<(NodeId, NodeKeys)> = (10..10 + PAIR_CACHE as u128 + 50)
            .map(|i| {
                (
                    NodeId::from_index(i),
                    NodeKeys::from_secret([(i % 251) as u8 + 1; 32]),
                )
            })
            .collect();
        let dir = Admission::only(many.iter().map(|(i, k)| (*i, k.public())));
        for (id, _) in &many {
            a.seal(Kind::Datagram, id, &dir, &t.keys[0], b"x").unwrap();
        }
        assert!(a.pairs_cached() <= PAIR_CACHE);
        assert!(a.pairs_cached() >= PAIR_CACHE * 3 / 4);
    }

    fn seq(epoch: u64, salt: u64, counter: u64) -> Sequence {
        Sequence {
            epoch,
            salt,
            counter,
        }
    }

    #[test]
    fn window_refuses_a_replay_and_accepts_reordering_inside_it() {
        let mut w = ReplayWindow::new(seq(5, 1, 10));
        assert_eq!(w.check(seq(5, 1, 10)), Err(ReplayError::Duplicate));
        assert_eq!(w.check(seq(5, 1, 12)), Ok(()));
        // 11 arrives after 12: reordered, accepted once
        assert_eq!(w.check(seq(5, 1, 11)), Ok(()));
        assert_eq!(w.check(seq(5, 1, 11)), Err(ReplayError::Duplicate));
        assert_eq!(w.check(seq(5, 1, 12)), Err(ReplayError::Duplicate));
        // never-seen counters below the top but inside the window are fine
        assert_eq!(w.check(seq(5, 1, 3)), Ok(()));
        assert_eq!(w.check(seq(5, 1, 3)), Err(ReplayError::Duplicate));
    }

    #[test]
    fn window_refuses_what_falls_behind_it() {
        let mut w = ReplayWindow::new(seq(5, 1, 0));
        assert_eq!(w.check(seq(5, 1, REPLAY_WINDOW + 10)), Ok(()));
        // exactly the window's width behind: too old, even though never seen
        assert_eq!(w.check(seq(5, 1, 10)), Err(ReplayError::TooOld));
        assert_eq!(w.check(seq(5, 1, 11)), Ok(()));
        // a jump beyond the window forgets everything below it
        assert_eq!(w.check(seq(5, 1, 10_000)), Ok(()));
        assert_eq!(
            w.check(seq(5, 1, REPLAY_WINDOW + 10)),
            Err(ReplayError::TooOld)
        );
        assert_eq!(w.check(seq(5, 1, 10_000 - REPLAY_WINDOW + 1)), Ok(()));
        assert_eq!(w.check(seq(5, 1, 0)), Err(ReplayError::TooOld));
    }

    #[test]
    fn window_ring_slots_are_reused_cleanly() {
        let mut w = ReplayWindow::new(seq(5, 1, 0));
        for c in 1..10 {
            assert_eq!(w.check(seq(5, 1, c)), Ok(()));
        }
        // counters 3 and REPLAY_WINDOW + 3 share a ring slot: the old bit must not make the
        // new counter look like a duplicate
        assert_eq!(w.check(seq(5, 1, REPLAY_WINDOW + 5)), Ok(()));
        assert_eq!(w.check(seq(5, 1, REPLAY_WINDOW + 3)), Ok(()));
        assert_eq!(
            w.check(seq(5, 1, REPLAY_WINDOW + 3)),
            Err(ReplayError::Duplicate)
        );
        // 6 to 9 are still inside the window and were seen; 5 fell out of it
        assert_eq!(w.check(seq(5, 1, 9)), Err(ReplayError::Duplicate));
        assert_eq!(w.check(seq(5, 1, 6)), Err(ReplayError::Duplicate));
        assert_eq!(w.check(seq(5, 1, 5)), Err(ReplayError::TooOld));
        // never seen, inside the window
        assert_eq!(w.check(seq(5, 1, 200)), Ok(()));
    }

    #[test]
    fn window_follows_a_restarted_sender_and_refuses_its_old_run() {
        let mut w = ReplayWindow::new(seq(100, 7, 5_000));
        // the sender restarts: higher epoch, new salt, counter from zero
        assert_eq!(w.check(seq(200, 9, 0)), Ok(()));
        assert_eq!(w.check(seq(200, 9, 1)), Ok(()));
        // anything from the earlier run, even far ahead in its counter, is stale
        assert_eq!(w.check(seq(100, 7, 5_001)), Err(ReplayError::StaleEpoch));
        assert_eq!(w.check(seq(100, 7, 9_999)), Err(ReplayError::StaleEpoch));
        // same epoch, other salt: another process, refused
        assert_eq!(w.check(seq(200, 8, 2)), Err(ReplayError::StaleEpoch));
        assert_eq!(w.check(seq(200, 9, 0)), Err(ReplayError::Duplicate));
    }

    #[test]
    fn open_reports_the_sequence_of_every_sealed_message() {
        let t = trio();
        let mut a = t.sealer(0, Keyring::new(key(1, 7)), 42);
        let mut b = t.sealer(1, Keyring::new(key(1, 7)), 1);
        let mut w: Option<ReplayWindow> = None;
        for n in 0..300u64 {
            let sealed = a
                .seal(Kind::Datagram, &t.ids[1], &t.dir, &t.keys[0], b"m")
                .unwrap();
            let q = b
                .open(Kind::Datagram, &sealed, &t.dir, &t.keys[1])
                .unwrap()
                .sequence();
            assert_eq!(q, seq(42, 42, n));
            match w.as_mut() {
                None => w = Some(ReplayWindow::new(q)),
                Some(w) => {
                    assert_eq!(w.check(q), Ok(()));
                    assert_eq!(w.check(q), Err(ReplayError::Duplicate));
                }
            }
        }
    }
}
