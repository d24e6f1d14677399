//! The AEAD under a session: ChaCha20-Poly1305 (RFC 8439), sealing and opening in place with a
//! detached tag.
//!
//! Two implementations of the same algorithm, chosen at build time; the bytes on the wire are
//! the same, so nodes built either way talk to each other.
//!
//! - By default, RustCrypto's `chacha20poly1305` (pure Rust; ChaCha20's AVX2 code chosen at
//!   run time). The repository's `.cargo/config.toml` builds its Poly1305 with the crate's
//!   portable backend (`--cfg poly1305_force_soft`): the AVX2 backend it would otherwise pick at
//!   run time has helpers compiled without AVX2 that call the vector intrinsics out of line and
//!   ~500 ns of key setup per message, so at our sizes it is the slower one (1400-byte seal
//!   2.67 µs with it, 1.96 µs without; 64 bytes 1.65 µs against 0.36 µs;
//!   `benches/netns/PROFILE.md`). Its key is zeroized on drop.
//! - With the `ring` cargo feature, `ring`'s (BoringSSL's assembly, CPU features detected at
//!   run time, in a portable build). `ring` keeps its key schedule without zeroizing it on drop.

use core::fmt;

/// Why a datagram did not open: forged, corrupted or sealed under another key. (A seal fails
/// only for messages over 2^38 bytes, which no buffer here reaches; it is reported the same way.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failed;

/// One direction's key, expanded once.
pub(crate) struct Aead {
    #[cfg(not(feature = "ring"))]
    key: chacha20poly1305::ChaCha20Poly1305,
    #[cfg(feature = "ring")]
    key: ring::aead::LessSafeKey,
}

impl fmt::Debug for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aead")
            .field("backend", &BACKEND)
            .finish_non_exhaustive()
    }
}

/// The implementation this build uses, for logs and reports.
#[cfg(all(not(feature = "ring"), poly1305_force_soft))]
pub const BACKEND: &str = "chacha20poly1305 (RustCrypto, portable Poly1305)";
/// The implementation this build uses, for logs and reports. (Built without the repository's
/// `.cargo/config.toml`, or with a `RUSTFLAGS` that replaced it: Poly1305's AVX2 backend,
/// chosen at run time, which is slower at our message sizes.)
#[cfg(all(not(feature = "ring"), not(poly1305_force_soft)))]
pub const BACKEND: &str = "chacha20poly1305 (RustCrypto, Poly1305 AVX2 chosen at run time)";
/// The implementation this build uses, for logs and reports.
#[cfg(feature = "ring")]
pub const BACKEND: &str = "ring";

impl Aead {
    /// Expands `key`.
    #[cfg(not(feature = "ring"))]
    pub(crate) fn new(key: &[u8; 32]) -> Aead {
        use chacha20poly1305::KeyInit;
        Aead {
            key: chacha20poly1305::ChaCha20Poly1305::new(key.into()),
        }
    }

    /// Expands `key`.
    #[cfg(feature = "ring")]
    pub(crate) fn new(key: &[u8; 32]) -> Aead {
        use ring::aead::{LessSafeKey, UnboundKey, CHACHA20_POLY1305};
        let key = match UnboundKey::new(&CHACHA20_POLY1305, key) {
            Ok(k) => k,
            // ring refuses only a key of the wrong length; ours is 32 bytes by its type.
            Err(_) => unreachable!("a 32-byte ChaCha20-Poly1305 key"),
        };
        Aead {
            key: LessSafeKey::new(key),
        }
    }

    /// Encrypts `body` in place and returns the tag over `aad` and the ciphertext.
    pub(crate) fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        body: &mut [u8],
    ) -> Result<[u8; 16], Failed> {
        #[cfg(not(feature = "ring"))]
        {
            use chacha20poly1305::aead::AeadInPlace;
            self.key
                .encrypt_in_place_detached(&nonce.into(), aad, body)
                .map(Into::into)
                .map_err(|_| Failed)
        }
        #[cfg(feature = "ring")]
        {
            use ring::aead::{Aad, Nonce};
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                )
                .map_err(|_| Failed)?;
            let mut out = [0u8; 16];
            out.copy_from_slice(tag.as_ref());
            Ok(out)
        }
    }

    /// Checks `tag` over `aad` and `body`, then decrypts `body` in place. On failure `body` is
    /// left as it was or overwritten, but never holds plaintext the caller may use.
    pub(crate) fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        body: &mut [u8],
        tag: &[u8; 16],
    ) -> Result<(), Failed> {
        #[cfg(not(feature = "ring"))]
        {
            use chacha20poly1305::aead::AeadInPlace;
            self.key
                .decrypt_in_place_detached(&nonce.into(), aad, body, tag.into())
                .map_err(|_| Failed)
        }
        #[cfg(feature = "ring")]
        {
            use ring::aead::{Aad, Nonce, Tag};
            self.key
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    Tag::from(*tag),
                    body,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use hex_literal::hex;

    use super::*;

    const KEY: [u8; 32] = hex!("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    const NONCE: [u8; 12] = hex!("070000004041424344454647");
    const AAD: [u8; 12] = hex!("50515253c0c1c2c3c4c5c6c7");
    const TEXT: &[u8] = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";

    /// RFC 8439 §2.8.2, through whichever backend this build uses.
    #[test]
    fn rfc8439_vector_through_backend() {
        let aead = Aead::new(&KEY);
        let mut text = TEXT.to_vec();
        let tag = aead.seal(NONCE, &AAD, &mut text).unwrap();
        assert_eq!(
            text[..],
            hex!(
                "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
                "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
                "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
                "3ff4def08e4b7a9de576d26586cec64b6116"
            )
        );
        assert_eq!(tag, hex!("1ae10b594f09e26a7e902ecbd0600691"));
        aead.open(NONCE, &AAD, &mut text, &tag).unwrap();
        assert_eq!(text, TEXT);
    }

    #[test]
    fn open_refuses_a_changed_tag_aad_or_body() {
        let aead = Aead::new(&KEY);
        let mut sealed = TEXT.to_vec();
        let tag = aead.seal(NONCE, &AAD, &mut sealed).unwrap();
        let mut bad_tag = tag;
        bad_tag[15] ^= 1;
        assert_eq!(
            aead.open(NONCE, &AAD, &mut sealed.clone(), &bad_tag),
            Err(Failed)
        );
        let mut bad_aad = AAD;
        bad_aad[0] ^= 1;
        assert_eq!(
            aead.open(NONCE, &bad_aad, &mut sealed.clone(), &tag),
            Err(Failed)
        );
        let mut bad_body = sealed.clone();
        bad_body[3] ^= 0x80;
        assert_eq!(aead.open(NONCE, &AAD, &mut bad_body, &tag), Err(Failed));
        let mut other_nonce = NONCE;
        other_nonce[11] ^= 1;
        assert_eq!(
            aead.open(other_nonce, &AAD, &mut sealed.clone(), &tag),
            Err(Failed)
        );
    }

    /// Both implementations (called directly) and this build's [`Aead`] seal every size and
    /// AAD alike, byte for byte, and [`Aead`] opens what either sealed. ring is a
    /// dev-dependency, so this runs with and without the `ring` feature.
    #[test]
    fn ring_rustcrypto_and_backend_agree() {
        use chacha20poly1305::aead::AeadInPlace;
        use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
        use rand::{Rng, SeedableRng};
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for len in (0..300).chain([1400, 1450, 8950, 9000]) {
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce);
            let aad: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
            let text: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let ours = Aead::new(&key);
            let rc = ChaCha20Poly1305::new(&key.into());
            let ring = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());

            let mut by_ours = text.clone();
            let ours_tag = ours.seal(nonce, &aad, &mut by_ours).unwrap();
            let mut by_rc = text.clone();
            let rc_tag = rc
                .encrypt_in_place_detached(&nonce.into(), &aad, &mut by_rc)
                .unwrap();
            let mut by_ring = text.clone();
            let ring_tag = ring
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    &mut by_ring,
                )
                .unwrap();
            assert_eq!(by_rc, by_ring, "ciphertext, {len} bytes");
            assert_eq!(rc_tag[..], *ring_tag.as_ref(), "tag, {len} bytes");
            assert_eq!(by_ours, by_rc, "ciphertext, {len} bytes ({BACKEND})");
            assert_eq!(ours_tag[..], rc_tag[..], "tag, {len} bytes ({BACKEND})");

            let mut tag = [0u8; 16];
            tag.copy_from_slice(&rc_tag);
            ours.open(nonce, &aad, &mut by_rc, &tag).unwrap();
            assert_eq!(by_rc, text);
            tag.copy_from_slice(ring_tag.as_ref());
            ours.open(nonce, &aad, &mut by_ring, &tag).unwrap();
            assert_eq!(by_ring, text);
        }
    }
}
