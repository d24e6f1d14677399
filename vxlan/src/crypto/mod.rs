//! Data-path keys: per pair of nodes, per key epoch, one key per direction.
//!
//! Each node has a static X25519 key pair (RFC 7748), a node ID the manager issued (25 lowercase
//! base-36 ASCII characters) and an [`Incarnation`]: 16 random bytes its agent draws, and stores
//! durably, before every start of its data path (agent start, join after leave, rejoin after a
//! removal). The manager issues network key epochs (an id and 32 secret bytes) and rotates them.
//! For nodes A and B under epoch E:
//!
//! ```text
//! shared = X25519(a_secret, B_public)                  (= X25519(b_secret, A_public))
//! okm    = HKDF-SHA256(salt = E.secret, ikm = shared,
//!                      info = "shoal vxlan v2" || E.id
//!                             || low_node_id || low_public || low_incarnation
//!                             || high_node_id || high_public || high_incarnation,
//!                      L = 64)
//! key(low -> high) = okm[0..32],  key(high -> low) = okm[32..64]
//! ```
//!
//! where `low` and `high` order the two public keys bytewise and E.id is u32 big-endian. Both
//! nodes compute the same two keys; an outsider needs a node's static secret *and* the epoch
//! secret. Counters start at zero in every session, so the incarnations are what keep a nonce
//! from ever repeating under one key: every start of a data path draws 128 fresh random bits, so
//! a restarted node, a node that left and joined again, a state directory restored from a copy
//! and two machines cloned from one state directory all get keys of their own. The node ID binds
//! the keys to the identity the manager issued, so a key registered under one node ID is useless
//! under another. Removing a node's public key from the peer table revokes it; rotating the
//! epoch cuts off anyone who holds an old epoch secret but no current one.
//!
//! The envelope carries the first four bytes of the sender's incarnation ([`Incarnation::tag`])
//! so a receiver can tell which of the sender's lives sealed a datagram.

mod aead;
pub mod session;

use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use aead::backend;
pub use session::{OpenError, SealError, Session, SessionState, Verified};

const INFO_LABEL: &[u8] = b"shoal vxlan v2";

/// Length of a node ID as the manager issues it: 25 lowercase base-36 ASCII characters.
pub const NODE_ID_LEN: usize = 25;

/// A node ID, as the bytes that go into the key derivation.
pub type NodeIdBytes = [u8; NODE_ID_LEN];

/// A node's data-path incarnation: 16 random bytes drawn at every start of its data path. See
/// the module docs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Incarnation(pub [u8; 16]);

impl Incarnation {
    /// The first four bytes, big-endian: what the envelope carries to name this incarnation.
    pub fn tag(&self) -> u32 {
        let b = &self.0;
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl core::fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A node's static X25519 key pair. The secret is zeroized on drop.
pub struct NodeKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl NodeKey {
    /// The key pair for a 32-byte secret (clamped as RFC 7748 §5 says).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        NodeKey { secret, public }
    }

    /// The public half, the one that goes into the node list.
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The secret bytes, for the node's own state store.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
}

impl core::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A network key epoch as the manager issues it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EpochKey {
    id: u32,
    secret: [u8; 32],
}

impl EpochKey {
    /// An epoch from its id and secret.
    pub fn new(id: u32, secret: [u8; 32]) -> Self {
        EpochKey { id, secret }
    }

    /// The epoch id carried in every envelope.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl core::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EpochKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a pair key could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The peer's public key is a low-order point: the shared secret would be all zeros.
    #[error("peer public key is a low-order point; refusing it")]
    WeakPeerKey,
    /// The peer's public key is this node's own.
    #[error("peer public key equals this node's own key")]
    OwnKey,
}

/// The per-direction keys for one pair under one epoch. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct PairKeys {
    /// Key for what this node sends.
    pub send: [u8; 32],
    /// Key for what this node receives.
    pub recv: [u8; 32],
}

/// One side of a pair: a node's public key, its node ID and the incarnation it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The node's static X25519 public key.
    pub public: [u8; 32],
    /// The node ID the manager issued to it.
    pub node_id: NodeIdBytes,
    /// The node's current incarnation.
    pub incarnation: Incarnation,
}

/// The X25519 secret this node shares with a peer, before the per-epoch derivation: computed
/// once per peer public key and kept (zeroized on drop), so a peer that restarts (same key, new
/// incarnation) costs one HKDF per epoch, not another X25519.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Shared([u8; 32]);

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Shared(..)")
    }
}

/// The secret `local` shares with the node whose public key is `peer_public`.
pub fn shared(local: &NodeKey, peer_public: &[u8; 32]) -> Result<Shared, KeyError> {
    if local.public.to_bytes() == *peer_public {
        return Err(KeyError::OwnKey);
    }
    let shared = local.secret.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(KeyError::WeakPeerKey);
    }
    Ok(Shared(shared.to_bytes()))
}

/// This node as the key derivation sees it: its static key pair, node ID and incarnation.
pub struct Local {
    key: NodeKey,
    side: PeerKey,
}

impl Local {
    /// This node, with the node ID the manager issued and the incarnation of this start.
    pub fn new(key: NodeKey, node_id: NodeIdBytes, incarnation: Incarnation) -> Self {
        let side = PeerKey {
            public: key.public(),
            node_id,
            incarnation,
        };
        Local { key, side }
    }

    /// The static key pair.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// This node as its peers see it.
    pub fn side(&self) -> &PeerKey {
        &self.side
    }
}

impl core::fmt::Debug for Local {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Local")
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

/// Derives the pair keys between `local` and `peer` under `epoch`.
pub fn derive(local: &Local, peer: &PeerKey, epoch: &EpochKey) -> Result<PairKeys, KeyError> {
    let shared = shared(&local.key, &peer.public)?;
    Ok(derive_shared(&shared, &local.side, peer, epoch))
}

/// [`derive`] from a secret already computed with [`shared`] for `peer.public`.
pub fn derive_shared(
    shared: &Shared,
    local_side: &PeerKey,
    peer: &PeerKey,
    epoch: &EpochKey,
) -> PairKeys {
    let local_is_low = local_side.public < peer.public;
    let (low, high) = if local_is_low {
        (local_side, peer)
    } else {
        (peer, local_side)
    };
    let mut info = [0u8; INFO_LABEL.len() + 4 + 2 * (NODE_ID_LEN + 32 + 16)];
    let mut at = 0;
    for part in [
        INFO_LABEL,
        &epoch.id.to_be_bytes(),
        &low.node_id,
        &low.public,
        &low.incarnation.0,
        &high.node_id,
        &high.public,
        &high.incarnation.0,
    ] {
        info[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }

    let hk = Hkdf::<Sha256>::new(Some(&epoch.secret), &shared.0);
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF's limit (255 * 32): expand cannot fail.
    let _ = hk.expand(&info, &mut okm[..]);
    let mut keys = PairKeys {
        send: [0; 32],
        recv: [0; 32],
    };
    let (low_to_high, high_to_low) = okm.split_at(32);
    if local_is_low {
        keys.send.copy_from_slice(low_to_high);
        keys.recv.copy_from_slice(high_to_low);
    } else {
        keys.send.copy_from_slice(high_to_low);
        keys.recv.copy_from_slice(low_to_high);
    }
    keys
}

/// The network key epochs a node holds: at most two live, one of them designated for sending.
///
/// Rotation without loss: the control plane adds the new epoch on every node (all of them can
/// now receive under it), then designates it for sending, then retires the old one once every
/// node sends under the new one.
#[derive(Debug, Default)]
pub struct Keyring {
    live: [Option<EpochKey>; 2],
    send: Option<u32>,
}

/// Why a keyring change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// Two epochs are live already.
    #[error("two key epochs are live already: retire one before adding epoch {0}")]
    Full(u32),
    /// The epoch is live already.
    #[error("key epoch {0} is live already")]
    Duplicate(u32),
    /// The epoch is not live.
    #[error("key epoch {0} is not live")]
    Unknown(u32),
    /// Retiring the epoch designated for sending.
    #[error("key epoch {0} is the sending epoch: designate another before retiring it")]
    Sending(u32),
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live epochs.
    pub fn epochs(&self) -> impl Iterator<Item = &EpochKey> {
        self.live.iter().flatten()
    }

    /// The epoch designated for sending.
    pub fn send_epoch(&self) -> Option<u32> {
        self.send
    }

    /// Looks up a live epoch.
    pub fn get(&self, id: u32) -> Option<&EpochKey> {
        self.epochs().find(|e| e.id == id)
    }

    /// Adds a live epoch. The first one added becomes the sending epoch.
    pub fn add(&mut self, epoch: EpochKey) -> Result<(), KeyringError> {
        if self.get(epoch.id).is_some() {
            return Err(KeyringError::Duplicate(epoch.id));
        }
        let slot = self
            .live
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(KeyringError::Full(epoch.id))?;
        if self.send.is_none() {
            self.send = Some(epoch.id);
        }
        *slot = Some(epoch);
        Ok(())
    }

    /// Designates a live epoch for sending.
    pub fn set_send(&mut self, id: u32) -> Result<(), KeyringError> {
        self.get(id).ok_or(KeyringError::Unknown(id))?;
        self.send = Some(id);
        Ok(())
    }

    /// Retires a live epoch that is not the sending one. Its secret is zeroized.
    pub fn retire(&mut self, id: u32) -> Result<(), KeyringError> {
        if self.send == Some(id) {
            return Err(KeyringError::Sending(id));
        }
        let slot = self
            .live
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|e| e.id == id))
            .ok_or(KeyringError::Unknown(id))?;
        *slot = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;

    use super::*;

    /// RFC 7748 §6.1.
    #[test]
    fn rfc7748_x25519_vector() {
        let alice = NodeKey::from_secret(hex!(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
        ));
        let bob = NodeKey::from_secret(hex!(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
        ));
        assert_eq!(
            alice.public(),
            hex!("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            bob.public(),
            hex!("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let shared = alice.secret.diffie_hellman(&PublicKey::from(bob.public()));
        assert_eq!(
            shared.to_bytes(),
            hex!("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }

    fn local(seed: u8, incarnation: u8) -> Local {
        Local::new(
            NodeKey::from_secret([seed; 32]),
            [b'a' + seed % 26; NODE_ID_LEN],
            Incarnation([incarnation; 16]),
        )
    }

    fn peer(l: &Local) -> PeerKey {
        *l.side()
    }

    #[test]
    fn both_sides_derive_matching_keys() {
        let (a, b) = (local(1, 5), local(2, 6));
        let e = EpochKey::new(3, [7; 32]);
        let ka = derive(&a, &peer(&b), &e).unwrap();
        let kb = derive(&b, &peer(&a), &e).unwrap();
        assert_eq!(ka.send, kb.recv);
        assert_eq!(ka.recv, kb.send);
        assert_ne!(ka.send, ka.recv, "one key per direction");
    }

    /// A vector computed with an independent implementation (Python `cryptography` 48:
    /// X25519 and HKDF-SHA256) from the inputs below; the script is in `docs/wire.md`.
    #[test]
    fn derivation_vector() {
        let a = Local::new(
            NodeKey::from_secret([0xa1; 32]),
            *b"aaaaaaaaaaaaaaaaaaaaaaaaa",
            Incarnation([0x11; 16]),
        );
        let b = Local::new(
            NodeKey::from_secret([0xb2; 32]),
            *b"bbbbbbbbbbbbbbbbbbbbbbbbb",
            Incarnation([0x22; 16]),
        );
        let e = EpochKey::new(1, [0xe1; 32]);
        let ka = derive(&a, b.side(), &e).unwrap();
        let (a_to_b, b_to_a) = (ka.send, ka.recv);
        assert_eq!(
            a_to_b,
            hex!("dfb32370bb44c45dd56a4803b5d6aee1547573705de37f86e11445b0c330835a")
        );
        assert_eq!(
            b_to_a,
            hex!("ae5f73c5ab8b63aae3c3e818e48abef1bbcd978b20c943f2db9e343307e159fb")
        );
    }

    #[test]
    fn keys_depend_on_epoch_pair_identity_and_incarnations() {
        let (a, b, c) = (local(1, 1), local(2, 1), local(3, 1));
        let e1 = EpochKey::new(1, [7; 32]);
        let base = derive(&a, &peer(&b), &e1).unwrap().send;
        let other_epoch = EpochKey::new(2, [7; 32]);
        let other_secret = EpochKey::new(1, [8; 32]);
        assert_ne!(base, derive(&a, &peer(&b), &other_epoch).unwrap().send);
        assert_ne!(base, derive(&a, &peer(&b), &other_secret).unwrap().send);
        assert_ne!(base, derive(&a, &peer(&c), &e1).unwrap().send);
        assert_ne!(
            base,
            derive(&local(1, 2), &peer(&b), &e1).unwrap().send,
            "own restart"
        );
        assert_ne!(
            base,
            derive(&a, &peer(&local(2, 2)), &e1).unwrap().send,
            "peer restart"
        );
        // Two incarnations that share the four bytes the envelope carries still differ.
        let mut close = peer(&b);
        close.incarnation.0[15] ^= 1;
        assert_eq!(close.incarnation.tag(), peer(&b).incarnation.tag());
        assert_ne!(
            base,
            derive(&a, &close, &e1).unwrap().send,
            "whole incarnation"
        );
        // The same key and incarnation under another node ID (a key registered twice).
        let mut renamed = peer(&b);
        renamed.node_id[0] = b'z';
        assert_ne!(base, derive(&a, &renamed, &e1).unwrap().send, "node ID");
        let mut me_renamed = Local::new(
            NodeKey::from_secret([1; 32]),
            [b'q'; NODE_ID_LEN],
            a.side().incarnation,
        );
        assert_ne!(base, derive(&me_renamed, &peer(&b), &e1).unwrap().send);
        me_renamed = local(1, 1);
        assert_eq!(base, derive(&me_renamed, &peer(&b), &e1).unwrap().send);
    }

    #[test]
    fn refuses_weak_and_own_keys() {
        let a = local(1, 1);
        let e = EpochKey::new(1, [7; 32]);
        let zero = PeerKey {
            public: [0; 32],
            node_id: [b'x'; NODE_ID_LEN],
            incarnation: Incarnation([1; 16]),
        };
        assert_eq!(derive(&a, &zero, &e).err(), Some(KeyError::WeakPeerKey));
        assert_eq!(
            derive(&a, &peer(&local(1, 2)), &e).err(),
            Some(KeyError::OwnKey)
        );
    }

    #[test]
    fn incarnation_tag_is_the_first_four_bytes() {
        let mut i = Incarnation([0; 16]);
        i.0[..4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(i.tag(), 0xdead_beef);
        assert_eq!(format!("{i:?}"), "deadbeef000000000000000000000000");
    }

    #[test]
    fn keyring_rotation_rules() {
        let mut k = Keyring::new();
        k.add(EpochKey::new(1, [1; 32])).unwrap();
        assert_eq!(k.send_epoch(), Some(1));
        assert_eq!(
            k.add(EpochKey::new(1, [1; 32])),
            Err(KeyringError::Duplicate(1))
        );
        k.add(EpochKey::new(2, [2; 32])).unwrap();
        assert_eq!(k.add(EpochKey::new(3, [3; 32])), Err(KeyringError::Full(3)));
        assert_eq!(k.send_epoch(), Some(1), "adding does not switch sending");
        assert_eq!(k.retire(1), Err(KeyringError::Sending(1)));
        k.set_send(2).unwrap();
        k.retire(1).unwrap();
        assert_eq!(k.retire(1), Err(KeyringError::Unknown(1)));
        assert_eq!(k.set_send(1), Err(KeyringError::Unknown(1)));
        k.add(EpochKey::new(3, [3; 32])).unwrap();
        assert_eq!(k.epochs().map(EpochKey::id).collect::<Vec<_>>().len(), 2);
    }
}
