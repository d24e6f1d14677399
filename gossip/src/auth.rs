//! Node keys and the primitives gossip authentication uses.
//!
//! Every node holds one static X25519 secret (the same 32 bytes its data path uses; the
//! control plane keeps it in the state directory). Gossip derives two things from it:
//!
//! - per pair of nodes, per gossip key and per direction, the envelope key of every datagram
//!   and stream frame (see [`pair_key`]): only the two ends of a pair can seal or open it,
//!   so a message that opens names its sender;
//! - an Ed25519 signing key, `seed = HKDF-SHA256(salt = none, ikm = secret, info = "shoal
//!   node signing key v1")`, with which the node signs what it says about itself (its record:
//!   identity, incarnation, metadata) and its suspicion witnesses.
//!
//! [`PublicKeys`] are the two public halves. The control plane registers them with the
//! manager at join; the manager's node list binds node ID to [`PublicKeys`]
//! ([`crate::Admission`]), and gossip believes only that.
//!
//! The core reaches the primitives through [`Crypto`], so the simulation can run the same
//! code with a cache in front of the real functions (both are pure: the cache changes no
//! outcome, only wall time). [`NodeKeys`] is the production implementation: real X25519
//! (non-contributory results refused) and Ed25519 (`verify_strict`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::identity::NodeId;

/// HKDF info of the signing key seed.
const SIGNING_INFO: &[u8] = b"shoal node signing key v1";
/// HKDF info prefix of the pair keys.
const PAIR_INFO: &[u8] = b"shoal gossip pair v1";

/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// An Ed25519 signature as it travels.
pub type Sig = [u8; SIGNATURE_LEN];

/// The public halves of a node's keys, as the manager's node list holds them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKeys {
    /// The static X25519 public key (data path and gossip pair keys).
    pub x25519: [u8; 32],
    /// The Ed25519 key that verifies what the node signs.
    pub ed25519: [u8; 32],
}

impl fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKeys {{ x25519: {}, ed25519: {} }}",
            hex(&self.x25519),
            hex(&self.ed25519)
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The primitives the gossip core calls. Implementations must be pure functions of their
/// inputs and the node's own keys (the simulation caches them on that basis).
pub trait Crypto: Send + Sync + fmt::Debug {
    /// Our public keys.
    fn public(&self) -> PublicKeys;
    /// X25519 of our secret and `peer`; `None` when the result is all zeros (a low-order
    /// peer key: nothing secret would come out of it).
    fn shared(&self, peer_x25519: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>>;
    /// Signs `msg` with our Ed25519 key.
    fn sign(&self, msg: &[u8]) -> Sig;
    /// Whether `sig` is a valid signature of `msg` under `ed25519` (strict: no malleable or
    /// small-order encodings).
    fn verify(&self, ed25519: &[u8; 32], msg: &[u8], sig: &Sig) -> bool;
}

/// A node's secret keys: the X25519 static secret and the Ed25519 signing key derived from
/// it. Zeroized on drop; redacted in `Debug`.
pub struct NodeKeys {
    x25519: StaticSecret,
    signing: SigningKey,
    public: PublicKeys,
}

impl fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NodeKeys {{ public: {:?}, secrets: <redacted> }}",
            self.public
        )
    }
}

impl NodeKeys {
    /// The node's keys from its X25519 static secret. The caller's copy of `secret` is its
    /// own to wipe; ours is wiped here.
    pub fn from_secret(mut secret: [u8; 32]) -> Self {
        let x25519 = StaticSecret::from(secret);
        let mut seed = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
        let _ = Hkdf::<Sha256>::new(None, &secret).expand(SIGNING_INFO, seed.as_mut());
        secret.zeroize();
        let signing = SigningKey::from_bytes(&seed);
        let public = PublicKeys {
            x25519: PublicKey::from(&x25519).to_bytes(),
            ed25519: signing.verifying_key().to_bytes(),
        };
        NodeKeys {
            x25519,
            signing,
            public,
        }
    }

    /// The public halves, for the manager's node list.
    pub fn public(&self) -> PublicKeys {
        self.public
    }
}

impl Crypto for NodeKeys {
    fn public(&self) -> PublicKeys {
        self.public
    }

    fn shared(&self, peer_x25519: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let shared = self.x25519.diffie_hellman(&PublicKey::from(*peer_x25519));
        if !shared.was_contributory() {
            return None;
        }
        Some(Zeroizing::new(shared.to_bytes()))
    }

    fn sign(&self, msg: &[u8]) -> Sig {
        self.signing.sign(msg).to_bytes()
    }

    fn verify(&self, ed25519: &[u8; 32], msg: &[u8], sig: &Sig) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(ed25519) else {
            return false;
        };
        key.verify_strict(msg, &Signature::from_bytes(sig)).is_ok()
    }
}

/// Keys derived from the node ID alone: **anyone can compute them**. Only for tests, the
/// simulation and `gossip-node --insecure-test-keys`; never for a real cluster.
pub fn insecure_test_keys(id: &NodeId) -> NodeKeys {
    let mut h = Sha256::new();
    h.update(b"shoal gossip insecure test key v1");
    h.update(id.as_bytes());
    NodeKeys::from_secret(h.finalize().into())
}

/// The 4-byte sender tag of an envelope: the first 4 bytes of SHA-256 of the node ID. The
/// receiver keeps a tag -> node IDs index of its directory; two members whose tags collide
/// (about N^2 / 2^33 for N members: 1 % at N = 10,000) are both tried.
pub fn sender_tag(id: &NodeId) -> [u8; 4] {
    let d = Sha256::digest(id.as_bytes());
    [d[0], d[1], d[2], d[3]]
}

/// The envelope key for messages from `from` to `to` under one gossip key:
/// `HKDF-SHA256(salt = gossip key secret, ikm = X25519(from, to), info = "shoal gossip pair
/// v1" || from || to)`, 32 bytes.
///
/// One key per direction (the spec suggested one per unordered pair): each key then seals
/// with one sender's nonces only, so two nodes that happened to draw the same (epoch, salt)
/// still never share a (key, nonce), and a message cannot be reflected back to its sender
/// as if the other end had sent it.
pub fn pair_key(
    gossip_secret: &[u8; 32],
    shared: &[u8; 32],
    from: &NodeId,
    to: &NodeId,
) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // Infallible for 32 bytes of output (see `from_secret`).
    let _ = Hkdf::<Sha256>::new(Some(gossip_secret), shared)
        .expand_multi_info(&[PAIR_INFO, from.as_bytes(), to.as_bytes()], out.as_mut());
    out
}

/// Which nodes may take part, and their keys: the manager's node list, a directory from
/// node ID to [`PublicKeys`]. Every sender and every author is looked up here; a node that
/// is not in it can neither seal to us nor sign anything we accept.
///
/// Cheap to clone (shared): the simulation gives one directory to thousands of cores.
#[derive(Clone, Default)]
pub struct Admission(Arc<Directory>);

#[derive(Default)]
struct Directory {
    keys: HashMap<NodeId, PublicKeys>,
    /// Sender tag -> the members with that tag.
    tags: HashMap<[u8; 4], Vec<NodeId>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Admission {{ members: {} }}", self.0.keys.len())
    }
}

impl PartialEq for Admission {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.keys == other.0.keys
    }
}

impl Eq for Admission {}

impl Admission {
    /// A directory of these nodes and keys (a later entry for the same ID wins; the reserved
    /// [`NodeId::ANY`] is never admitted).
    pub fn only(list: impl IntoIterator<Item = (NodeId, PublicKeys)>) -> Self {
        let keys: HashMap<NodeId, PublicKeys> = list
            .into_iter()
            .filter(|(id, _)| *id != NodeId::ANY)
            .collect();
        let mut tags: HashMap<[u8; 4], Vec<NodeId>> = HashMap::with_capacity(keys.len());
        for id in keys.keys() {
            tags.entry(sender_tag(id)).or_default().push(*id);
        }
        for v in tags.values_mut() {
            v.sort();
        }
        Admission(Arc::new(Directory { keys, tags }))
    }

    /// Whether `id` may take part.
    pub fn admits(&self, id: &NodeId) -> bool {
        self.0.keys.contains_key(id)
    }

    /// The keys the directory binds to `id`.
    pub fn keys(&self, id: &NodeId) -> Option<&PublicKeys> {
        self.0.keys.get(id)
    }

    /// The members whose sender tag is `tag` (usually one, none for a stranger).
    pub fn candidates(&self, tag: &[u8; 4]) -> &[NodeId] {
        self.0.tags.get(tag).map_or(&[], Vec::as_slice)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.keys.len()
    }

    /// Whether the directory is empty.
    pub fn is_empty(&self) -> bool {
        self.0.keys.is_empty()
    }

    /// Every member and its keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &PublicKeys)> {
        self.0.keys.iter()
    }

    /// Test helper: files `id` under another tag as well (a tag collision).
    #[cfg(test)]
    pub(crate) fn force_tag(&mut self, id: &NodeId, tag: [u8; 4]) {
        let mut d = Directory {
            keys: self.0.keys.clone(),
            tags: self.0.tags.clone(),
        };
        let v = d.tags.entry(tag).or_default();
        v.push(*id);
        v.sort();
        self.0 = Arc::new(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_key_is_derived_from_the_secret() {
        let a = NodeKeys::from_secret([7; 32]);
        let b = NodeKeys::from_secret([7; 32]);
        let c = NodeKeys::from_secret([8; 32]);
        assert_eq!(a.public(), b.public());
        assert_ne!(a.public().ed25519, c.public().ed25519);
        // The X25519 public half is the usual one (RFC 7748 base point multiplication).
        let x = StaticSecret::from([7u8; 32]);
        assert_eq!(a.public().x25519, PublicKey::from(&x).to_bytes());
        // The Ed25519 seed is HKDF(secret), not the secret itself.
        assert_ne!(
            a.public().ed25519,
            SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes()
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let k = NodeKeys::from_secret([0xab; 32]);
        let s = format!("{k:?}");
        assert!(s.contains("redacted"));
        assert!(!s.contains(&"ab".repeat(32)));
    }

    #[test]
    fn sign_verify_and_tamper() {
        let k = NodeKeys::from_secret([1; 32]);
        let other = NodeKeys::from_secret([2; 32]);
        let sig = k.sign(b"hello");
        assert!(k.verify(&k.public().ed25519, b"hello", &sig));
        assert!(other.verify(&k.public().ed25519, b"hello", &sig));
        assert!(!k.verify(&k.public().ed25519, b"hellp", &sig));
        assert!(!k.verify(&other.public().ed25519, b"hello", &sig));
        let mut bad = sig;
        bad[5] ^= 1;
        assert!(!k.verify(&k.public().ed25519, b"hello", &bad));
        // not a curve point: refused, no panic
        assert!(!k.verify(&[0xff; 32], b"hello", &sig));
    }

    #[test]
    fn both_ends_derive_the_same_pair_keys_per_direction() {
        let (a, b) = (
            NodeKeys::from_secret([3; 32]),
            NodeKeys::from_secret([4; 32]),
        );
        let (ia, ib) = (NodeId::from_index(1), NodeId::from_index(2));
        let sa = a.shared(&b.public().x25519).unwrap();
        let sb = b.shared(&a.public().x25519).unwrap();
        assert_eq!(*sa, *sb);
        let g = [9u8; 32];
        assert_eq!(*pair_key(&g, &sa, &ia, &ib), *pair_key(&g, &sb, &ia, &ib));
        assert_ne!(*pair_key(&g, &sa, &ia, &ib), *pair_key(&g, &sa, &ib, &ia));
        assert_ne!(
            *pair_key(&g, &sa, &ia, &ib),
            *pair_key(&[8; 32], &sa, &ia, &ib)
        );
        // A low-order peer key gives an all-zero secret: refused.
        assert!(a.shared(&[0; 32]).is_none());
    }

    #[test]
    fn tags_are_sha256_prefixes() {
        // SHA-256("0000000000000000000000001")
        let d = Sha256::digest(b"0000000000000000000000001");
        assert_eq!(sender_tag(&NodeId::from_index(1)), [d[0], d[1], d[2], d[3]]);
        assert_ne!(
            sender_tag(&NodeId::from_index(1)),
            sender_tag(&NodeId::from_index(2))
        );
    }
}
