//! The AEAD under a session: ChaCha20-Poly1305 (RFC 8439), sealing and opening in place with a
//! detached tag.
//!
//! Two implementations of the same algorithm, chosen at build time; the bytes on the wire are
//! the same, so nodes built either way talk to each other.
//!
//! - By default, RustCrypto's `chacha20poly1305` (pure Rust; ChaCha20's and Poly1305's AVX2
//!   code chosen at run time, portable code on CPUs without AVX2). The workspace builds it with
//!   a patched `poly1305` 0.8.0 (`third_party/poly1305/SHOAL-PATCH.md`): in the released crate
//!   the AVX2 backend's helpers and per-key setup are compiled without AVX2 and call the vector
//!   intrinsics out of line, which made it slower than the portable backend at our sizes
//!   (Poly1305 over 1400 bytes: 2,048 ns released, 1,058 ns portable, ~640 ns patched;
//!   `benches/netns/PROFILE.md`). `--cfg poly1305_force_soft` forces the portable backend
//!   (scripts/test.sh tests that build too). Its key is zeroized on drop.
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
            .field("backend", &backend())
            .finish_non_exhaustive()
    }
}

/// The implementation this build uses on this CPU, for logs and reports.
pub fn backend() -> &'static str {
    if cfg!(feature = "ring") {
        "ring"
    } else if cfg!(poly1305_force_soft) {
        "chacha20poly1305 (RustCrypto, portable Poly1305 forced at build time)"
    } else if poly1305_avx2() {
        "chacha20poly1305 (RustCrypto, Poly1305 AVX2)"
    } else {
        "chacha20poly1305 (RustCrypto, portable Poly1305: no AVX2 on this CPU)"
    }
}

/// Whether `poly1305`'s run-time detection picks its AVX2 backend here (its `cpufeatures`
/// check asks for AVX and AVX2 with OS support, as this does).
fn poly1305_avx2() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        false
    }
}

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
            assert_eq!(by_ours, by_rc, "ciphertext, {len} bytes ({})", backend());
            assert_eq!(ours_tag[..], rc_tag[..], "tag, {len} bytes ({})", backend());

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
