//! The sealed envelope: every datagram and every stream frame on 7946 is
//! XChaCha20-Poly1305-sealed with the cluster gossip key.
//!
//! ```text
//! envelope = kind u8 (1 datagram, 2 stream frame) key_id u8 nonce[24] ciphertext tag[16]
//! ```
//!
//! The nonce is a 16-byte prefix drawn at random once per [`Sealer`] (once per agent start)
//! followed by a 64-bit counter that only goes up: a (key, nonce) pair never repeats within a
//! process, and across the cluster's processes the 128-bit random prefixes do not collide in
//! practice (birthday bound about 2^64 starts). The kind and key id bytes are authenticated as
//! associated data, so a datagram cannot be replayed as a stream frame. Two keys can be live
//! during a rotation: [`Keyring`] seals with the current one and opens with either.
//!
//! What does not open is an [`OpenError`]: the caller drops and counts it and never decodes it.
//! No replay protection: SWIM tolerates duplicates (probe numbers, incarnations), and push-pull
//! state is idempotent.

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

/// Seals with the current key and a never-repeating nonce; opens with any live key.
pub struct Sealer {
    keyring: Keyring,
    current: XChaCha20Poly1305,
    previous: Option<XChaCha20Poly1305>,
    prefix: [u8; 16],
    counter: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keyring", &self.keyring)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer. `nonce_prefix` must be fresh random bytes for every process start.
    pub fn new(keyring: Keyring, nonce_prefix: [u8; 16]) -> Self {
        let current = XChaCha20Poly1305::new((&keyring.current.secret).into());
        let previous = keyring
            .previous
            .as_ref()
            .map(|k| XChaCha20Poly1305::new((&k.secret).into()));
        Sealer {
            keyring,
            current,
            previous,
            prefix: nonce_prefix,
            counter: 0,
        }
    }

    /// Replaces the keys; the nonce counter keeps going.
    pub fn set_keys(&mut self, keyring: Keyring) {
        let prefix = self.prefix;
        let counter = self.counter;
        *self = Sealer::new(keyring, prefix);
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
        nonce[..16].copy_from_slice(&self.prefix);
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

    /// Opens an envelope of the expected `kind`, returning the plaintext.
    pub fn open(&self, kind: Kind, data: &[u8]) -> Result<Vec<u8>, OpenError> {
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
        cipher
            .decrypt(
                XNonce::from_slice(&data[2..26]),
                Payload {
                    msg: &data[26..],
                    aad: &data[..2],
                },
            )
            .map_err(|_| OpenError::Auth)
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
        let mut s = Sealer::new(Keyring::new(key(1, 7)), [3; 16]);
        let a = s.seal(Kind::Datagram, b"hello").unwrap();
        let b = s.seal(Kind::Datagram, b"hello").unwrap();
        assert_eq!(a.len(), 5 + OVERHEAD);
        assert_ne!(a[2..26], b[2..26], "nonce reused");
        assert_ne!(a, b);
        assert_eq!(s.open(Kind::Datagram, &a).unwrap(), b"hello");
        assert_eq!(s.open(Kind::Datagram, &b).unwrap(), b"hello");
    }

    #[test]
    fn every_tampered_byte_fails() {
        let mut s = Sealer::new(Keyring::new(key(1, 7)), [3; 16]);
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
        let mut old = Sealer::new(Keyring::new(key(1, 7)), [1; 16]);
        let mut new = Sealer::new(Keyring::new(key(2, 8)), [2; 16]);
        let from_old = old.seal(Kind::Datagram, b"x").unwrap();
        let from_new = new.seal(Kind::Datagram, b"y").unwrap();
        assert_eq!(
            new.open(Kind::Datagram, &from_old),
            Err(OpenError::UnknownKey(1))
        );
        // same id, different secret: authentication failure
        let imposter = Sealer::new(Keyring::new(key(1, 9)), [4; 16]);
        assert_eq!(
            imposter.open(Kind::Datagram, &from_old),
            Err(OpenError::Auth)
        );
        let mut rotating = Sealer::new(Keyring::new(key(1, 7)), [5; 16]);
        rotating.set_keys(Keyring::with_previous(key(2, 8), key(1, 7)).unwrap());
        assert_eq!(rotating.open(Kind::Datagram, &from_old).unwrap(), b"x");
        assert_eq!(rotating.open(Kind::Datagram, &from_new).unwrap(), b"y");
        let sent = rotating.seal(Kind::Datagram, b"z").unwrap();
        assert_eq!(sent[1], 2, "seals with the current key");
        assert_eq!(new.open(Kind::Datagram, &sent).unwrap(), b"z");
        assert!(Keyring::with_previous(key(3, 1), key(3, 2)).is_err());
    }
}
