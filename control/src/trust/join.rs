//! The proofs a joining node sends the manager, bound to their TLS session. Pure: no IO, no
//! clock; randomness only through the keys passed in.
//!
//! A join is two requests on one TLS connection (the joiner has checked the manager's
//! certificate against the token's CA digest first, see `tls::PinnedCa`):
//!
//! 1. `JoinHello`: the manager answers with its node's X25519 public key.
//! 2. `Join` ([`Claim`]): what the node says it is, and three proofs over a transcript that
//!    starts with 32 bytes exported from the TLS session ([RFC 5705], label
//!    [`EXPORTER_LABEL`]), so none of them is worth anything on another connection:
//!    - `secret_proof` = HMAC-SHA256(key = the token's secret, the exporter bytes): the secret
//!      itself never crosses the wire, so a server that is not the manager (a worker's
//!      certificate refused at the handshake, or a manager certificate of a node that was
//!      demoted or left and kept it) learns nothing it can use;
//!    - `key_proof` = HMAC-SHA256(key = HKDF-SHA256(X25519(node secret, manager public),
//!      info = "shoal join key proof v1"), transcript): the joiner holds the private half of
//!      the X25519 public key it registers;
//!    - `signature` = Ed25519 over the transcript with the node's signing key: it holds that
//!      one too. Nobody can register someone else's key.
//!
//! The claim and its transcript are in `shoal_proto::claim`.
//!
//! [RFC 5705]: https://www.rfc-editor.org/rfc/rfc5705

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use shoal_gossip::auth::Crypto as _;
use shoal_gossip::NodeKeys;
use zeroize::Zeroizing;

pub use shoal_proto::claim::{Claim, EXPORTER_LABEL, EXPORTER_LEN};

const KEY_PROOF_INFO: &[u8] = b"shoal join key proof v1";

type HmacSha256 = Hmac<Sha256>;

/// The node's two public keys: X25519, and the Ed25519 key derived from the same secret
/// (HKDF-SHA256, info "shoal node signing key v1": gossip's [`NodeKeys`], which signs what the
/// node spreads, is the one key pair).
pub fn public_keys(node_secret: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    let public = NodeKeys::from_secret(*node_secret).public();
    (public.x25519, public.ed25519)
}

/// HMAC-SHA256 of the exporter bytes under a join secret.
pub fn secret_proof(secret: &str, exporter: &[u8; EXPORTER_LEN]) -> [u8; 32] {
    mac(secret.as_bytes(), exporter)
}

/// Whether `proof` is [`secret_proof`] of `secret`, compared in constant time.
pub fn proves_secret(secret: &str, exporter: &[u8; EXPORTER_LEN], proof: &[u8; 32]) -> bool {
    let Ok(mut m) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    m.update(exporter);
    m.verify_slice(proof).is_ok()
}

#[expect(
    clippy::unwrap_used,
    reason = "HMAC takes keys of any length (RFC 2104 hashes long ones): new_from_slice cannot fail"
)]
fn mac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The proofs of a [`Claim`]: made by the joining node, checked by the manager. (The claim
/// itself is protocol, in `shoal-proto`; the crypto is here.)
pub trait Proofs: Sized {
    /// Fills in the key proof and the signature, as the node whose X25519 secret is
    /// `node_secret`, for the manager whose X25519 public key is `manager_public`. `None` if
    /// that key is not a usable X25519 key (a low-order point).
    fn prove(
        self,
        node_secret: &[u8; 32],
        manager_public: &[u8; 32],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Option<Self>;

    /// Checks the key proof and the signature, as the manager whose X25519 secret is
    /// `manager_secret`.
    fn verify(
        &self,
        manager_secret: &[u8; 32],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Result<(), ProofError>;
}

impl Proofs for Claim {
    fn prove(
        mut self,
        node_secret: &[u8; 32],
        manager_public: &[u8; 32],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Option<Claim> {
        let transcript = self.transcript(exporter);
        let keys = NodeKeys::from_secret(*node_secret);
        let key = proof_key(&keys, manager_public)?;
        self.key_proof = mac(&key[..], &transcript);
        self.signature = keys.sign(&transcript);
        Some(self)
    }

    fn verify(
        &self,
        manager_secret: &[u8; 32],
        exporter: &[u8; EXPORTER_LEN],
    ) -> Result<(), ProofError> {
        let transcript = self.transcript(exporter);
        let keys = NodeKeys::from_secret(*manager_secret);
        let key = proof_key(&keys, &self.public_key).ok_or(ProofError::WeakKey)?;
        let mut m = HmacSha256::new_from_slice(&key[..]).map_err(|_| ProofError::KeyProof)?;
        m.update(&transcript);
        m.verify_slice(&self.key_proof)
            .map_err(|_| ProofError::KeyProof)?;
        if keys.verify(&self.signing_key, &transcript, &self.signature) {
            Ok(())
        } else {
            Err(ProofError::Signature)
        }
    }
}

/// HKDF of the X25519 secret two keys share; `None` for a low-order peer key.
fn proof_key(keys: &NodeKeys, peer_public: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let shared = keys.shared(peer_public)?;
    let hk = hkdf::Hkdf::<Sha256>::new(None, &shared[..]);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF's limit: expand cannot fail.
    let _ = hk.expand(KEY_PROOF_INFO, &mut key[..]);
    Some(key)
}

/// Why a joining node's proofs were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The X25519 public key is a low-order point.
    #[error(
        "the joining node's X25519 public key is not usable (a low-order point); nothing was added"
    )]
    WeakKey,
    /// The key proof does not verify.
    #[error("the joining node did not prove it holds the private half of the X25519 key it sent; nothing was added")]
    KeyProof,
    /// The signature does not verify.
    #[error("the joining node did not prove it holds the private half of the Ed25519 key it sent; nothing was added")]
    Signature,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(secret: &[u8; 32], join_secret: &str, exporter: &[u8; 32]) -> Claim {
        let (public_key, signing_key) = public_keys(secret);
        Claim {
            secret_proof: secret_proof(join_secret, exporter),
            hostname: "n2".into(),
            addr: "198.18.0.2".parse().unwrap(),
            public_key,
            signing_key,
            cert_public_key: vec![4; 65],
            engine_version: "0.1.0".into(),
            key_proof: [0; 32],
            signature: [0; 64],
        }
    }

    const MANAGER: [u8; 32] = [0x11; 32];
    const NODE: [u8; 32] = [0x22; 32];
    const EXPORTER: [u8; 32] = [0x33; 32];

    fn proved() -> Claim {
        let (manager_public, _) = public_keys(&MANAGER);
        claim(&NODE, "secret", &EXPORTER)
            .prove(&NODE, &manager_public, &EXPORTER)
            .unwrap()
    }

    #[test]
    fn an_honest_claim_verifies() {
        proved().verify(&MANAGER, &EXPORTER).unwrap();
        assert!(proves_secret("secret", &EXPORTER, &proved().secret_proof));
        assert!(!proves_secret("other", &EXPORTER, &proved().secret_proof));
    }

    #[test]
    fn proofs_belong_to_their_session_and_their_keys() {
        // Another TLS session (a replay elsewhere): every proof fails.
        let other = [0x44; 32];
        assert!(!proves_secret("secret", &other, &proved().secret_proof));
        assert_eq!(proved().verify(&MANAGER, &other), Err(ProofError::KeyProof));
        // Someone else's X25519 key, with our own proofs: refused.
        let mut stolen = proved();
        stolen.public_key = public_keys(&[0x55; 32]).0;
        assert_eq!(
            stolen.verify(&MANAGER, &EXPORTER),
            Err(ProofError::KeyProof)
        );
        // Someone else's signing key: refused.
        let mut stolen = proved();
        stolen.signing_key = public_keys(&[0x55; 32]).1;
        // The key proof covers the signing key too, so it fails first.
        assert_eq!(
            stolen.verify(&MANAGER, &EXPORTER),
            Err(ProofError::KeyProof)
        );
        // A changed field after proving (a man in the middle editing the address).
        let mut edited = proved();
        edited.addr = "198.18.0.9".parse().unwrap();
        assert_eq!(
            edited.verify(&MANAGER, &EXPORTER),
            Err(ProofError::KeyProof)
        );
        // A proof made for another manager key.
        assert_eq!(
            proved().verify(&[0x66; 32], &EXPORTER),
            Err(ProofError::KeyProof)
        );
        // A bad signature alone.
        let mut forged = proved();
        forged.signature[0] ^= 1;
        assert_eq!(
            forged.verify(&MANAGER, &EXPORTER),
            Err(ProofError::Signature)
        );
        // A low-order key.
        let mut weak = proved();
        weak.public_key = [0; 32];
        assert_eq!(weak.verify(&MANAGER, &EXPORTER), Err(ProofError::WeakKey));
    }

    #[test]
    fn the_signing_key_is_derived_from_the_node_secret() {
        assert_eq!(public_keys(&NODE), public_keys(&NODE));
        assert_ne!(public_keys(&NODE).1, public_keys(&MANAGER).1);
        let json = serde_json::to_string(&proved()).unwrap();
        assert_eq!(serde_json::from_str::<Claim>(&json).unwrap(), proved());
    }
}
