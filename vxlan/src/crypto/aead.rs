//! The AEAD under a session: ChaCha20-Poly1305 (RFC 8439), sealing and opening in place with a
//! detached tag.
//!
//! Two implementations of the same algorithm, chosen at build time; the bytes on the wire are
//! the same, so nodes built either way talk to each other.
//!
//! - By default, RustCrypto's `chacha20poly1305` 0.11 (pure Rust; the CPU's best backend of
//!   each half chosen at run time: ChaCha20 AVX-512, AVX2 or SSE2, Poly1305 AVX2 or portable;
//!   [`backend`] names them). The workspace builds it with patched copies of `chacha20` 0.10.2
//!   and `poly1305` 0.9.1 (`third_party/*/SHOAL-PATCH.md`) and with `--cfg chacha20_avx512`
//!   (`.cargo/config.toml`), which compiles ChaCha20's AVX-512 backend in. Both patches fix
//!   vector helpers that were built without the CPU features their intrinsics need and so ran
//!   as out-of-line calls (per message: Poly1305's key setup and tag, ChaCha20's AVX-512
//!   one-block path). The Poly1305 patch also keeps its AVX2 backend four blocks at a time
//!   after our 28-byte AAD, which left two blocks cached and sent the whole body through its
//!   per-block fallback. Seal, 1400 bytes, one core: ~1,940 ns with 0.10 and the patched Poly1305,
//!   ~1,280 ns now (`benches/netns/PROFILE.md` section 1). `--cfg poly1305_backend="soft"`
//!   forces Poly1305's portable backend (scripts/test.sh tests that build too). Its key is
//!   zeroized on drop.
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

/// The implementation this build uses on this CPU, for logs and reports: with RustCrypto's, the
/// backends its ChaCha20 and its Poly1305 chose at run time (each detects CPU features itself).
pub fn backend() -> &'static str {
    if cfg!(feature = "ring") {
        return "ring";
    }
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "chacha20poly1305 (RustCrypto: ChaCha20 {}, Poly1305 {})",
            chacha20_backend(),
            poly1305_backend()
        )
    })
}

/// The backend `chacha20` picks here: its AVX-512 one only in a build with `--cfg
/// chacha20_avx512` (`.cargo/config.toml`) and on a CPU with AVX-512F and AVX-512VL (its
/// `cpufeatures` check, OS support included, as `is_x86_feature_detected!` does), then AVX2, then
/// SSE2.
fn chacha20_backend() -> &'static str {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if cfg!(chacha20_avx512)
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
        {
            "AVX-512"
        } else if std::is_x86_feature_detected!("avx2") {
            "AVX2"
        } else {
            "SSE2"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        if cfg!(all(target_arch = "aarch64", target_feature = "neon")) {
            "NEON"
        } else {
            "portable"
        }
    }
}

/// The backend `poly1305` picks here: AVX2 when the CPU has it (its `cpufeatures` check), unless
/// the build forces the portable one with `--cfg poly1305_backend="soft"`.
fn poly1305_backend() -> &'static str {
    if cfg!(poly1305_backend = "soft") {
        return "portable (forced at build time)";
    }
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    if std::is_x86_feature_detected!("avx2") {
        return "AVX2";
    }
    "portable"
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
            use chacha20poly1305::AeadInOut;
            self.key
                .encrypt_inout_detached(&nonce.into(), aad, body.into())
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
            use chacha20poly1305::AeadInOut;
            self.key
                .decrypt_inout_detached(&nonce.into(), aad, body.into(), tag.into())
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

    /// The RustCrypto key is wiped when a session drops it: `chacha20poly1305` 0.11 does that
    /// only with its `zeroize` feature (0.10 always did). Without the feature this does not
    /// compile.
    #[cfg(not(feature = "ring"))]
    #[test]
    fn the_key_is_zeroized_on_drop() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroized_on_drop::<chacha20poly1305::ChaCha20Poly1305>();
    }

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

    /// This build's [`Aead`] and ring seal alike, byte for byte, for every AAD length from 0 to
    /// 69 bytes with every body length from 0 to 159 and a few longer ones: each number of
    /// Poly1305 blocks the AAD leaves cached before the body (our wire header is 28 bytes: two)
    /// meets each body length modulo 64, and ring's tag opens here. (The patched poly1305 checks
    /// its AVX2 backend against its portable one over body lengths 0 to 599 the same way; this
    /// crate's tests build ChaCha20's generic code unoptimized, so this stays smaller.)
    #[test]
    fn ring_and_backend_agree_over_aad_alignments() {
        use rand::{Rng, SeedableRng};
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let mut bytes = vec![0u8; 9100];
        rng.fill(&mut bytes[..]);
        for aad_len in 0..70 {
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            let ours = Aead::new(&key);
            let ring = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());
            let aad = &bytes[..aad_len];
            for len in (0..160).chain([255, 600, 1400, 8950]) {
                let mut nonce = [0u8; 12];
                rng.fill(&mut nonce);
                let text = &bytes[100..100 + len];
                let mut by_ours = text.to_vec();
                let tag = ours.seal(nonce, aad, &mut by_ours).unwrap();
                let mut by_ring = text.to_vec();
                let ring_tag = ring
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        &mut by_ring,
                    )
                    .unwrap();
                let b = backend();
                assert_eq!(
                    by_ours, by_ring,
                    "ciphertext, AAD {aad_len} B, body {len} B ({b})"
                );
                assert_eq!(
                    tag[..],
                    *ring_tag.as_ref(),
                    "tag, AAD {aad_len} B, body {len} B ({b})"
                );
                ours.open(nonce, aad, &mut by_ring, &tag).unwrap();
                assert_eq!(by_ring, text, "opened, AAD {aad_len} B, body {len} B ({b})");
            }
        }
    }

    /// Both implementations (called directly) and this build's [`Aead`] seal every size and
    /// AAD alike, byte for byte, and [`Aead`] opens what either sealed. ring is a
    /// dev-dependency, so this runs with and without the `ring` feature.
    #[test]
    fn ring_rustcrypto_and_backend_agree() {
        use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, KeyInit};
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
                .encrypt_inout_detached(&nonce.into(), &aad, by_rc.as_mut_slice().into())
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
