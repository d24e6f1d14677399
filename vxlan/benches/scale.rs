//! Flat costs as the cluster grows (issue 18, target 6): one 1,400-byte frame through the engine
//! (encap: `handle_frame`; decap: `handle_datagram`; sealed and plain) with 1 peer on 1 network
//! against 1,000 peers spread over 100 networks (peer `i` on network `i % 100`, each with its
//! own session and FDB entry), every packet to or from the next peer in turn; and
//! `bring_up_1000`: `set_peer` for 1,000 keyed peers from scratch (one X25519 and one HKDF each).
//!
//! `cargo bench -p shoal-vxlan --bench scale`. Compare `.../1` with `.../1000` from the same
//! run; `examples/scale.rs` (`benches/scale/run.sh`) measures the same with interleaved rounds,
//! and the memory and the rotation as well.

#![allow(missing_docs)] // criterion_group! generates an undocumented function
#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shoal_vxlan::testing::scale::{mac, vni, Cluster, Layout, MAX_FRAME};
use shoal_vxlan::testing::{epoch, frame, A};
use shoal_vxlan::{Engine, Mac, Packet, Transmits};

const PEERS: u32 = 1000;
const NETWORKS: u32 = 100;
const FRAME: usize = 1400;

/// The local engine of one size, sealed or plain, and its peers' own engines (to seal what it
/// decaps).
struct Side {
    peers: u32,
    networks: u32,
    local: Engine,
    senders: Vec<Engine>,
}

impl Side {
    fn new(cluster: &Cluster, peers: u32, networks: u32, sealed: bool) -> Side {
        Side {
            peers,
            networks,
            local: cluster.engine(&A, peers as usize, networks, sealed, Layout::Spread),
            senders: (0..peers)
                .map(|i| cluster.sender(i, &A, i % networks))
                .collect(),
        }
    }

    /// Peer `i`'s MAC and network.
    fn dest(&self, i: u32) -> (Mac, u32) {
        (mac(i, i % self.networks), i % self.networks)
    }
}

fn per_packet(c: &mut Criterion, cluster: &Cluster, sealed: bool) {
    let kind = if sealed { "sealed" } else { "plain" };
    let tail = frame(Mac([0; 6]), A.mac, &[0x5a; FRAME - 14])[12..].to_vec();
    let now = Instant::now();
    for (peers, networks) in [(1, 1), (PEERS, NETWORKS)] {
        let mut side = Side::new(cluster, peers, networks, sealed);
        let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.addr).collect();
        let mut out = Transmits::new(MAX_FRAME);
        let mut g = c.benchmark_group(format!("encap_{kind}"));
        g.throughput(Throughput::Bytes(FRAME as u64));
        let mut pkt = Packet::new(MAX_FRAME);
        let mut next = 0;
        g.bench_function(peers.to_string(), |b| {
            b.iter(|| {
                let (dst, j) = side.dest(next);
                next = (next + 1) % side.peers;
                let mut head = [0u8; 12];
                head[..6].copy_from_slice(&dst.0);
                head[6..].copy_from_slice(&A.mac.0);
                pkt.set_frame_parts(&head, &tail);
                side.local
                    .handle_frame(now, vni(j, sealed), &mut pkt, &mut out)
                    .unwrap();
                out.clear();
            })
        });
        g.finish();

        let mut g = c.benchmark_group(format!("decap_{kind}"));
        g.throughput(Throughput::Bytes(FRAME as u64));
        let mut next = 0;
        let dests: Vec<(Mac, u32)> = (0..side.peers).map(|i| side.dest(i)).collect();
        let (local, senders) = (&mut side.local, &mut side.senders);
        g.bench_function(peers.to_string(), |b| {
            b.iter_batched_ref(
                || {
                    // Peer `next` seals a frame to the local node, untimed.
                    let i = next;
                    next = (next + 1) % peers;
                    let (src, j) = dests[i as usize];
                    let mut head = [0u8; 12];
                    head[..6].copy_from_slice(&A.mac.0);
                    head[6..].copy_from_slice(&src.0);
                    let mut pkt = Packet::new(MAX_FRAME);
                    pkt.set_frame_parts(&head, &tail);
                    senders[i as usize]
                        .handle_frame(now, vni(j, sealed), &mut pkt, &mut out)
                        .unwrap();
                    (addrs[i as usize], out.drain().next().unwrap().packet)
                },
                |(src, pkt)| {
                    black_box(local.handle_datagram(now, *src, pkt).unwrap());
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn bring_up(c: &mut Criterion, cluster: &Cluster) {
    let mut g = c.benchmark_group("bring_up_1000");
    g.sample_size(10);
    g.bench_function("set_peer", |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(A.local());
                for j in 0..NETWORKS {
                    e.add_network(vni(j, true), true).unwrap();
                }
                e.add_epoch(epoch()).unwrap();
                e
            },
            |mut e| {
                for (n, key) in cluster.nodes.iter().zip(&cluster.keys) {
                    e.set_peer(n.addr, Some(*key)).unwrap();
                }
                e
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let cluster = Cluster::new(PEERS);
    per_packet(c, &cluster, true);
    per_packet(c, &cluster, false);
    bring_up(c, &cluster);
}

criterion_group! {
    name = scale;
    // Short by default: 9 benchmarks on a shared machine. Criterion's command line overrides.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(scale);
