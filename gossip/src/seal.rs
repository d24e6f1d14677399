//! The sealed envelope: every datagram and every stream frame on 7946 is
//! XChaCha20-Poly1305-sealed with the cluster gossip key.
//!
//! ```text
//! envelope = kind u8 (1 datagram, 2 stream frame) key_id u8 nonce[24] ciphertext tag[16]
//! ```
//!
//! ```text
//! nonce    = epoch u64 salt u64 counter u64
//! ```
//!
//! The nonce names the sending process and orders its messages: `epoch` rises with every start
//! of the agent (the driver uses the wall clock in milliseconds), `salt` is drawn at random at
//! start, and `counter` only goes up. A (key, nonce) pair never repeats within a process, and
//! two processes share an (epoch, salt) pair only if they start in the same millisecond and
//! draw the same 64 random bits. All 24 bytes are the AEAD nonce, so they are authenticated.
//! The kind and key id bytes are authenticated as associated data, so a datagram cannot be
//! replayed as a stream frame. Two keys can be live during a rotation: [`Keyring`] seals with
//! the current one and opens with either.
//!
//! What does not open is an [`OpenError`]: the caller drops and counts it and never decodes it.
//!
//! Replay: [`ReplayWindow`] keeps, per sender, the (epoch, salt) of its current process and a
//! 512-message sliding window over its counter (IPsec's anti-replay window, RFC 4303 §3.4.3).
//! A datagram seen before, older than the window, or from an earlier process of the same
//! sender is refused. The receiver keys the windows by the sender's node ID, read from the
//! opened header (see `membership`).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Bytes the envelope adds to a plaintext.
pub const OVERHEAD: usize = 1 + 1 + 24 + 16;

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
    /// Authentication failed: wrong key or tampered bytes.
    #[error("gossip packet failed authentication (wrong key or tampered); dropped")]
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

/// Seals with the current key and a never-repeating nonce; opens with any live key.
pub struct Sealer {
    keyring: Keyring,
    current: XChaCha20Poly1305,
    previous: Option<XChaCha20Poly1305>,
    epoch: u64,
    salt: u64,
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keyring", &self.keyring)
            .field("epoch", &self.epoch)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer. `epoch` must rise with every start of the agent (wall clock milliseconds);
    /// `salt` must be fresh random bits for every start.
    pub fn new(keyring: Keyring, epoch: u64, salt: u64) -> Self {
        let current = XChaCha20Poly1305::new((&keyring.current.secret).into());
        let previous = keyring
            .previous
            .as_ref()
            .map(|k| XChaCha20Poly1305::new((&k.secret).into()));
        Sealer {
            keyring,
            current,
            previous,
            epoch,
            salt,
            counter: 0,
        }
    }

    /// Replaces the keys; the nonce counter keeps going.
    pub fn set_keys(&mut self, keyring: Keyring) {
        let counter = self.counter;
        *self = Sealer::new(keyring, self.epoch, self.salt);
        self.counter = counter;
    }

    /// The live keys.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Seals `plaintext` into a new envelope.
    pub fn seal(&mut self, kind: Kind, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        if self.counter == u64::MAX {
            return Err(SealError::NonceExhausted);
        }
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&self.epoch.to_be_bytes());
        nonce[8..16].copy_from_slice(&self.salt.to_be_bytes());
        nonce[16..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        let aad = [kind as u8, self.keyring.current.id];
        let ct = self
            .current
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::TooLarge)?;
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens an envelope of the expected `kind`, returning the plaintext and where it stands
    /// in its sender's stream (for a [`ReplayWindow`]).
    pub fn open(&self, kind: Kind, data: &[u8]) -> Result<(Vec<u8>, Sequence), OpenError> {
        if data.len() < OVERHEAD {
            return Err(OpenError::Short(data.len()));
        }
        if data[0] != kind as u8 {
            return Err(OpenError::Kind(data[0]));
        }
        let key_id = data[1];
        let cipher = if key_id == self.keyring.current.id {
            &self.current
        } else {
            match (&self.keyring.previous, &self.previous) {
                (Some(k), Some(c)) if k.id == key_id => c,
                _ => return Err(OpenError::UnknownKey(key_id)),
            }
        };
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&data[2..26]),
                Payload {
                    msg: &data[26..],
                    aad: &data[..2],
                },
            )
            .map_err(|_| OpenError::Auth)?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Ok((
            plain,
            Sequence {
                epoch: word(2),
                salt: word(10),
                counter: word(18),
            },
        ))
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

    #[test]
    fn round_trip_and_nonce_never_repeats() {
        let mut s = Sealer::new(Keyring::new(key(1, 7)), 3, 3);
        let a = s.seal(Kind::Datagram, b"hello").unwrap();
        let b = s.seal(Kind::Datagram, b"hello").unwrap();
        assert_eq!(a.len(), 5 + OVERHEAD);
        assert_ne!(a[2..26], b[2..26], "nonce reused");
        assert_ne!(a, b);
        let (plain, seq) = s.open(Kind::Datagram, &a).unwrap();
        assert_eq!(plain, b"hello");
        assert_eq!(
            seq,
            Sequence {
                epoch: 3,
                salt: 3,
                counter: 0
            }
        );
        assert_eq!(s.open(Kind::Datagram, &b).unwrap().0, b"hello");
    }

    #[test]
    fn every_tampered_byte_fails() {
        let mut s = Sealer::new(Keyring::new(key(1, 7)), 3, 3);
        let good = s.seal(Kind::Datagram, b"some gossip payload").unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(s.open(Kind::Datagram, &bad).is_err(), "byte {i}");
        }
        assert_eq!(
            s.open(Kind::Datagram, &good[..10]),
            Err(OpenError::Short(10))
        );
        assert_eq!(s.open(Kind::Stream, &good), Err(OpenError::Kind(1)));
    }

    #[test]
    fn wrong_key_fails_and_rotation_accepts_both() {
        let mut old = Sealer::new(Keyring::new(key(1, 7)), 1, 1);
        let mut new = Sealer::new(Keyring::new(key(2, 8)), 2, 2);
        let from_old = old.seal(Kind::Datagram, b"x").unwrap();
        let from_new = new.seal(Kind::Datagram, b"y").unwrap();
        assert_eq!(
            new.open(Kind::Datagram, &from_old),
            Err(OpenError::UnknownKey(1))
        );
        // same id, different secret: authentication failure
        let imposter = Sealer::new(Keyring::new(key(1, 9)), 4, 4);
        assert_eq!(
            imposter.open(Kind::Datagram, &from_old),
            Err(OpenError::Auth)
        );
        let mut rotating = Sealer::new(Keyring::new(key(1, 7)), 5, 5);
        rotating.set_keys(Keyring::with_previous(key(2, 8), key(1, 7)).unwrap());
        assert_eq!(rotating.open(Kind::Datagram, &from_old).unwrap().0, b"x");
        assert_eq!(rotating.open(Kind::Datagram, &from_new).unwrap().0, b"y");
        let sent = rotating.seal(Kind::Datagram, b"z").unwrap();
        assert_eq!(sent[1], 2, "seals with the current key");
        assert_eq!(new.open(Kind::Datagram, &sent).unwrap().0, b"z");
        assert!(Keyring::with_previous(key(3, 1), key(3, 2)).is_err());
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
        let mut s = Sealer::new(Keyring::new(key(1, 7)), 42, 9);
        let mut w: Option<ReplayWindow> = None;
        for n in 0..300u64 {
            let sealed = s.seal(Kind::Datagram, b"m").unwrap();
            let (_, q) = s.open(Kind::Datagram, &sealed).unwrap();
            assert_eq!(q, seq(42, 9, n));
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
