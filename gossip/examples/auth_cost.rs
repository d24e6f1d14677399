//! What gossip authentication costs in CPU, one line per operation (median of 15 batches):
//! `cargo run --release -p shoal-gossip --example auth_cost`.
//!
//! - node keys from the secret (X25519 public key, HKDF, Ed25519 key): once per start;
//! - X25519 with a peer, and the two HKDF pair keys: once per peer (and gossip key);
//! - Ed25519 sign and verify (strict) of a node record: once per record made, and once per
//!   (node, record) received;
//! - sealing and opening a 1400-byte datagram with cached pair keys, against the plain
//!   XChaCha20-Poly1305 of the cluster key the envelope used before (the difference is the
//!   tag lookup and the pair-key map).

use std::hint::black_box;
use std::time::Instant;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use shoal_gossip::auth::{insecure_test_keys, pair_key, Crypto, NodeKeys};
use shoal_gossip::codec::NodeRecord;
use shoal_gossip::seal::{Kind, Sealer};
use shoal_gossip::{Admission, Identity, Key, Keyring, Metadata, NodeId, Role};

/// Runs `f` `n` times per batch, 15 batches; prints the median time per call.
fn bench(name: &str, n: u32, mut f: impl FnMut()) {
    let mut per_call: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(n)
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    let us = per_call[per_call.len() / 2] * 1e6;
    println!("{name:<58} {us:>9.2} us");
}

fn main() {
    let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
    let (ka, kb) = (insecure_test_keys(&a), insecure_test_keys(&b));
    let dir = Admission::only([(a, ka.public()), (b, kb.public())]);
    let ring = || {
        Keyring::new(Key {
            id: 1,
            secret: [7; 32],
        })
    };

    bench("node keys from the secret (once per start)", 200, || {
        black_box(NodeKeys::from_secret(black_box([5; 32])));
    });
    let pb = kb.public().x25519;
    bench("X25519 with a peer (once per peer)", 500, || {
        black_box(ka.shared(black_box(&pb)));
    });
    let shared = ka.shared(&pb).expect("contributory");
    bench(
        "HKDF: the two pair keys of a peer (per peer and gossip key)",
        2000,
        || {
            black_box(pair_key(&[7; 32], &shared, &a, &b));
            black_box(pair_key(&[7; 32], &shared, &b, &a));
        },
    );
    bench(
        "first datagram to a new peer (DH, HKDF, seal 1400 B)",
        300,
        || {
            let mut s = Sealer::new(a, ring(), 1, 1);
            black_box(
                s.seal(Kind::Datagram, &b, &dir, &ka, &[0u8; 1354])
                    .expect("seal"),
            );
        },
    );

    let meta = Metadata {
        vtep: "198.18.0.1".parse().expect("ip"),
        data_port: 4789,
        public_key: ka.public().x25519,
        incarnation: [1; 16],
        role: Role::Worker,
        version: "0.1.0".into(),
    };
    let subject = Identity::new(a, "198.18.0.1:7946".parse().expect("addr"), 1);
    bench("Ed25519: sign a node record", 2000, || {
        black_box(NodeRecord::signed(subject, 0, 1, false, meta.clone(), &ka));
    });
    let rec = NodeRecord::signed(subject, 0, 1, false, meta, &ka);
    let ed = ka.public().ed25519;
    bench("Ed25519: verify a node record (strict)", 2000, || {
        let msg = rec.signed_bytes(&ka.public().x25519);
        assert!(kb.verify(&ed, &msg, &rec.sig));
    });

    let mut sa = Sealer::new(a, ring(), 1, 1);
    let mut sb = Sealer::new(b, ring(), 2, 2);
    let plain = vec![0u8; 1354];
    bench("seal 1400 B, pair keys cached", 20000, || {
        black_box(
            sa.seal(Kind::Datagram, &b, &dir, &ka, &plain)
                .expect("seal"),
        );
    });
    let sealed: Vec<Vec<u8>> = (0..20000)
        .map(|_| {
            sa.seal(Kind::Datagram, &b, &dir, &ka, &plain)
                .expect("seal")
        })
        .collect();
    let mut i = 0;
    bench("open 1400 B (tag lookup, pair keys cached)", 20000, || {
        black_box(
            sb.open(Kind::Datagram, &sealed[i % sealed.len()], &dir, &kb)
                .expect("open"),
        );
        i += 1;
    });
    let cipher = XChaCha20Poly1305::new((&[7u8; 32]).into());
    let nonce = [3u8; 24];
    bench(
        "before: XChaCha20-Poly1305 seal 1400 B, one cluster key",
        20000,
        || {
            black_box(
                cipher
                    .encrypt(
                        &XNonce::from(nonce),
                        Payload {
                            msg: &plain,
                            aad: &[1, 1],
                        },
                    )
                    .expect("seal"),
            );
        },
    );
    let ct = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &[1, 1],
            },
        )
        .expect("seal");
    bench(
        "before: XChaCha20-Poly1305 open 1400 B, one cluster key",
        20000,
        || {
            black_box(
                cipher
                    .decrypt(
                        &XNonce::from(nonce),
                        Payload {
                            msg: &ct,
                            aad: &[1, 1],
                        },
                    )
                    .expect("open"),
            );
        },
    );
}
