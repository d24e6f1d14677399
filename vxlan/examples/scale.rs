//! Issue 18, target 6, in one process: flat costs as the cluster grows. Prints `key value`
//! lines for `benches/scale/run.sh`:
//!
//! - `bring_up_ms`: [`Engine::set_peer`] for 1,000 keyed peers from scratch (one X25519 and one
//!   HKDF each); `add_epoch_ms` and `retire_epoch_ms`: a rotation's two sweeps over them.
//! - `rss_kib_after_1000x100` (and the `hwm_` peak): this process's VmRSS from
//!   `/proc/self/status` once it holds an engine with 1,000 peers, each keyed under two live
//!   epochs, and 100 encrypted networks with every peer on every one (100,000 FDB entries,
//!   100,000 flood-list places).
//! - `per_packet_ns_<path>_<n>`: the median over rounds of the mean cost of one 1,400-byte frame
//!   through [`Engine::handle_frame`] (encap, sealed or plain) or [`Engine::handle_datagram`]
//!   (decap), with 1 peer on 1 network, or 1,000 peers spread over 100 networks (peer `i` on
//!   network `i % 100`, one session and one FDB entry each) and every packet to or from the next
//!   peer in turn. The 1-peer and 1,000-peer rounds alternate, so the machine's noise hits both.
//!   `per_packet_ns_1` and `_1000` are one sealed packet's cost at both ends (sealed encap plus
//!   sealed decap), `ratio` theirs, `ratio_max` the worst of the four paths' ratios. The
//!   `_1000flow` figures (and `ratio_<path>_flow`, `ratio_max_flow`) are the same 1,000-peer
//!   engine with one flow: every packet to or from the first peer, so the tables are as large
//!   but the entries a packet touches stay in cache (what the data structures cost, apart from
//!   the cache misses of traffic spread over every peer).
//! - `rotation_gap_frames`: frames to or from peers already up that failed to seal or open while
//!   1,000 peers came up and the key epoch rotated across them
//!   ([`rollout`], 16 watched peers with engines of their own); `rotation_gap_frames_hasty`: the
//!   same with the old epoch retired before the peers hold the new one (the control: not 0).
//!
//! `cargo run --release -p shoal-vxlan --example scale -- [--quick] [--profile PATH:N]`
//!
//! `--quick`: fewer rounds and packets. `--profile encap_plain:1000` (any path, 1 or 1000): set
//! up, then run only that measurement, 2,000 rounds, and print nothing more: for `perf record`.

#![allow(clippy::unwrap_used)] // a measurement that cannot run should stop loudly

use std::hint::black_box;
use std::time::Instant;

use shoal_vxlan::crypto::EpochKey;
use shoal_vxlan::testing::scale::{mac, rollout, vni, Cluster, Layout, Order, MAX_FRAME};
use shoal_vxlan::testing::{epoch, frame, A};
use shoal_vxlan::{Engine, Mac, Packet, Transmits, Vni};

const PEERS: u32 = 1000;
const NETWORKS: u32 = 100;
const FRAME: usize = 1400;
/// Watched peers of the rollout: spread over the bring-up order, four in its last tenth.
const WATCH: [u32; 16] = [
    0, 1, 2, 63, 127, 255, 400, 511, 700, 800, 898, 899, 900, 901, 950, 999,
];

/// VmRSS and VmHWM of this process, in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One side of the comparison: the local engines (sealed and plain) and where its traffic goes.
struct Case {
    peers: u32,
    sealed: Engine,
    plain: Engine,
    /// Per peer: its MAC and its network's index.
    dests: Vec<(Mac, u32)>,
}

impl Case {
    fn new(cluster: &Cluster, peers: u32, networks: u32) -> Case {
        let engine = |enc| cluster.engine(&A, peers as usize, networks, enc, Layout::Spread);
        Case {
            peers,
            sealed: engine(true),
            plain: engine(false),
            dests: (0..peers)
                .map(|i| (mac(i, i % networks), i % networks))
                .collect(),
        }
    }
}

/// The frame every measurement sends, from byte 12 on (the MACs are written per packet).
struct Bench {
    tail: Vec<u8>,
    count: usize,
    out: Transmits,
    /// Buffers for the peers' frames, reused.
    spare: Vec<Packet>,
    senders: Vec<Engine>,
    pool: Vec<(std::net::SocketAddr, Packet)>,
}

impl Bench {
    /// Mean ns per frame through `handle_frame`, to the next peer in turn (`spread`) or all
    /// to the first peer (one flow).
    fn encap(&mut self, case: &mut Case, sealed: bool, spread: bool) -> f64 {
        let engine = if sealed {
            &mut case.sealed
        } else {
            &mut case.plain
        };
        let vnis: Vec<Vni> = case.dests.iter().map(|&(_, j)| vni(j, sealed)).collect();
        let mut pkt = Packet::new(MAX_FRAME);
        let mut head = [0u8; 12];
        head[6..].copy_from_slice(&A.mac.0);
        let now = Instant::now();
        let start = Instant::now();
        for k in 0..self.count {
            let i = if spread { k % case.peers as usize } else { 0 };
            head[..6].copy_from_slice(&case.dests[i].0 .0);
            pkt.set_frame_parts(&head, &self.tail);
            engine
                .handle_frame(now, vnis[i], &mut pkt, &mut self.out)
                .unwrap();
            self.out.clear();
        }
        start.elapsed().as_nanos() as f64 / self.count as f64
    }

    /// Mean ns per datagram through `handle_datagram`, from the next peer in turn (`spread`)
    /// or all from the first peer (sealed by the peers' own engines beforehand, untimed).
    fn decap(&mut self, case: &mut Case, sealed: bool, spread: bool) -> f64 {
        let now = Instant::now();
        let mut head = [0u8; 12];
        head[..6].copy_from_slice(&A.mac.0);
        for k in 0..self.count {
            let i = if spread { k % case.peers as usize } else { 0 };
            let (src_mac, j) = case.dests[i];
            head[6..].copy_from_slice(&src_mac.0);
            let mut pkt = self.spare.pop().unwrap_or_else(|| Packet::new(MAX_FRAME));
            pkt.set_frame_parts(&head, &self.tail);
            let sender = &mut self.senders[i];
            sender
                .handle_frame(now, vni(j, sealed), &mut pkt, &mut self.out)
                .unwrap();
            self.out.recycle(pkt);
            let t = self.out.drain().next().unwrap();
            let src = shoal_vxlan::testing::scale::node(i as u32).addr;
            self.pool.push((src, t.packet));
        }
        let engine = if sealed {
            &mut case.sealed
        } else {
            &mut case.plain
        };
        let start = Instant::now();
        for (src, pkt) in self.pool.iter_mut() {
            black_box(engine.handle_datagram(now, *src, pkt).unwrap());
        }
        let ns = start.elapsed().as_nanos() as f64 / self.count as f64;
        self.spare.extend(self.pool.drain(..).map(|(_, pkt)| pkt));
        ns
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let profile = args
        .iter()
        .position(|a| a == "--profile")
        .and_then(|at| args.get(at + 1));
    let (rounds, count) = if quick { (7, 1000) } else { (41, 4000) };
    let (rss0, _) = memory();
    println!("rss_kib_baseline {rss0}");

    let cluster = Cluster::new(PEERS);

    // Bring-up from scratch: the networks and the epoch first, then one set_peer per peer.
    let mut big = Engine::new(A.local());
    for j in 0..NETWORKS {
        big.add_network(vni(j, true), true).unwrap();
    }
    big.add_epoch(epoch()).unwrap();
    let start = Instant::now();
    for (n, key) in cluster.nodes.iter().zip(&cluster.keys) {
        big.set_peer(n.addr, Some(*key)).unwrap();
    }
    println!("bring_up_ms {:.1}", start.elapsed().as_secs_f64() * 1e3);
    for (i, n) in cluster.nodes.iter().enumerate() {
        for j in 0..NETWORKS {
            let fdb = big.fdb_mut(vni(j, true)).unwrap();
            fdb.insert(mac(i as u32, j), n.addr.ip());
            fdb.add_flood(n.addr.ip());
        }
    }
    let start = Instant::now();
    big.add_epoch(EpochKey::new(2, [0xe2; 32])).unwrap();
    println!("add_epoch_ms {:.1}", start.elapsed().as_secs_f64() * 1e3);
    let (rss, hwm) = memory();
    println!("rss_kib_after_1000x100 {rss}");
    println!("hwm_kib_after_1000x100 {hwm}");
    big.set_send_epoch(2).unwrap();
    let start = Instant::now();
    big.retire_epoch(1).unwrap();
    println!("retire_epoch_ms {:.1}", start.elapsed().as_secs_f64() * 1e3);
    drop(big);

    // Per-packet cost, 1 peer against 1,000.
    let mut one = Case::new(&cluster, 1, 1);
    let mut many = Case::new(&cluster, PEERS, NETWORKS);
    let template = frame(Mac([0; 6]), A.mac, &[0x5a; FRAME - 14]);
    let mut bench = Bench {
        tail: template[12..].to_vec(),
        count,
        out: Transmits::new(MAX_FRAME),
        spare: Vec::new(),
        senders: (0..PEERS)
            .map(|i| cluster.sender(i, &A, i % NETWORKS))
            .collect(),
        pool: Vec::with_capacity(count),
    };
    let paths = ["encap_sealed", "decap_sealed", "encap_plain", "decap_plain"];
    if let Some(only) = profile {
        let (path, n) = only.split_once(':').unwrap();
        let case = if n == "1" { &mut one } else { &mut many };
        let sealed = path.ends_with("sealed");
        for _ in 0..2000 {
            if path.starts_with("encap") {
                bench.encap(case, sealed, true);
            } else {
                bench.decap(case, sealed, true);
            }
        }
        return;
    }
    // samples[case][path]; cases: 1 peer, 1,000 peers with traffic spread over all of them,
    // 1,000 peers with one flow (every packet to or from the first).
    let mut samples = vec![vec![Vec::new(); paths.len()]; 3];
    let orders = [[0, 1, 2], [1, 2, 0], [2, 0, 1]];
    for round in 0..rounds {
        for c in orders[round % 3] {
            let (case, spread) = match c {
                0 => (&mut one, true),
                1 => (&mut many, true),
                _ => (&mut many, false),
            };
            for (p, path) in paths.iter().enumerate() {
                let sealed = path.ends_with("sealed");
                let ns = if path.starts_with("encap") {
                    bench.encap(case, sealed, spread)
                } else {
                    bench.decap(case, sealed, spread)
                };
                samples[c][p].push(ns);
            }
        }
    }
    let (mut ratio_max, mut ratio_max_flow): (f64, f64) = (0.0, 0.0);
    let mut both = [0.0; 2];
    for (p, path) in paths.iter().enumerate() {
        let a = median(&mut samples[0][p]);
        let b = median(&mut samples[1][p]);
        let f = median(&mut samples[2][p]);
        println!("per_packet_ns_{path}_1 {a:.1}");
        println!("per_packet_ns_{path}_1000 {b:.1}");
        println!("per_packet_ns_{path}_1000flow {f:.1}");
        println!("ratio_{path} {:.3}", b / a);
        println!("ratio_{path}_flow {:.3}", f / a);
        ratio_max = ratio_max.max(b / a);
        ratio_max_flow = ratio_max_flow.max(f / a);
        if path.ends_with("sealed") {
            both[0] += a;
            both[1] += b;
        }
    }
    println!("per_packet_ns_1 {:.1}", both[0]);
    println!("per_packet_ns_1000 {:.1}", both[1]);
    println!("ratio {:.3}", both[1] / both[0]);
    println!("ratio_max {ratio_max:.3}");
    println!("ratio_max_flow {ratio_max_flow:.3}");
    println!("rounds {rounds}");
    println!("packets_per_round {count}");
    drop((one, many, bench));

    // Bring-up and rotation with traffic to the peers already up.
    let gap = rollout(&cluster, PEERS, NETWORKS, &WATCH, Order::Staged);
    println!("rotation_frames {}", gap.sent);
    println!("rotation_gap_frames {}", gap.dropped.total());
    let hasty = rollout(&cluster, PEERS, NETWORKS, &WATCH, Order::Hasty);
    println!("rotation_gap_frames_hasty {}", hasty.dropped.total());
    let (rss, hwm) = memory();
    println!("rss_kib_end {rss}");
    println!("hwm_kib_end {hwm}");
}
