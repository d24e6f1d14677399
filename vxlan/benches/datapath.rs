//! Data-path micro-benchmarks: raw ChaCha20-Poly1305 sealing (the ceiling), the engine's
//! encrypt path (encapsulate + seal) and decrypt path (open + decapsulate), and plain
//! encapsulation and decapsulation, at 64, 1400 and 8950-byte frames.
//!
//! `cargo bench -p shoal-vxlan --bench datapath`. Compare each engine figure with `raw_seal`
//! at the same size, from the same run. `raw_seal` is always RustCrypto's `chacha20poly1305`;
//! the engine paths use the session's backend, so `--features ring` measures ring's there.

#![allow(missing_docs)] // criterion_group! generates an undocumented function
#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly

use std::hint::black_box;
use std::time::Instant;

use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, KeyInit};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shoal_vxlan::testing::{frame, A, B, VNI};
use shoal_vxlan::{Packet, Transmits};

const SIZES: [usize; 3] = [64, 1400, 8950];
const MAX_FRAME: usize = 9000;

fn raw_seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("raw_seal");
    let aead = ChaCha20Poly1305::new(&[7u8; 32].into());
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0u8; size];
        let aad = [0u8; 28];
        let mut counter = 0u64;
        g.bench_function(size.to_string(), |b| {
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&counter.to_be_bytes());
                black_box(
                    aead.encrypt_inout_detached(&nonce.into(), &aad, buf.as_mut_slice().into())
                        .unwrap(),
                );
            })
        });
    }
    g.finish();
}

/// handle_frame for a unicast frame: copy the frame into the buffer (as a device read would),
/// encapsulate, and seal or not.
fn encap(c: &mut Criterion, name: &str, encrypted: bool) {
    let mut g = c.benchmark_group(name);
    let mut a = A.engine(&B, encrypted);
    let mut out = Transmits::new(MAX_FRAME);
    let mut pkt = Packet::new(MAX_FRAME);
    let now = Instant::now();
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let f = frame(B.mac, A.mac, &vec![0x5a; size - 14]);
        g.bench_function(size.to_string(), |b| {
            b.iter(|| {
                pkt.set_frame(&f);
                a.handle_frame(now, VNI, &mut pkt, &mut out).unwrap();
                out.clear();
            })
        });
    }
    g.finish();
}

/// handle_datagram for datagrams sealed (or encapsulated) by the peer beforehand, untimed.
fn decap(c: &mut Criterion, name: &str, encrypted: bool) {
    let mut g = c.benchmark_group(name);
    let mut a = A.engine(&B, encrypted);
    let mut b_engine = B.engine(&A, encrypted);
    let mut out = Transmits::new(MAX_FRAME);
    let now = Instant::now();
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let f = frame(B.mac, A.mac, &vec![0x5a; size - 14]);
        g.bench_function(size.to_string(), |bench| {
            bench.iter_batched_ref(
                || {
                    let mut pkt = Packet::new(MAX_FRAME);
                    pkt.set_frame(&f);
                    a.handle_frame(now, VNI, &mut pkt, &mut out).unwrap();
                    out.drain().next().unwrap().packet
                },
                |pkt| {
                    black_box(b_engine.handle_datagram(now, A.addr, pkt).unwrap());
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    raw_seal(c);
    encap(c, "encrypt_path", true);
    decap(c, "decrypt_path", true);
    encap(c, "plain_encap", false);
    decap(c, "plain_decap", false);
}

criterion_group!(datapath, benches);
criterion_main!(datapath);
