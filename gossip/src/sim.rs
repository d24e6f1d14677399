//! A deterministic many-node simulation: one process, a virtual clock, a priority queue of
//! events with a sequence number to break ties, one seeded RNG for the network (loss,
//! latency, jitter, partitions) and one for the scenario, and real [`Membership`] cores
//! (real foca, real codec, real sealing, real X25519 and Ed25519). The same seed gives the
//! same trace; the report carries a hash of the trace to check it.
//!
//! Every node has its own keys (derived from its node ID, [`insecure_test_keys`]) and all
//! share one directory naming all of them. The cores reach X25519 and Ed25519 through a
//! cache shared by every simulated node ([`CryptoCache`]): an X25519 result per unordered
//! pair of public keys (both ends compute the same value) and a verification result per
//! (key, message, signature). Both are pure functions of their inputs, so the cache changes
//! no outcome, only wall time (`SimConfig::crypto_cache` off gives the same trace hash; a
//! test checks it): at N = 1000, every node verifies the same signed records, and without
//! the cache forming the cluster alone would cost a million verifications.
//!
//! Scenarios:
//! - `steady`: nothing happens; measures bandwidth, false downs and dissemination.
//! - `crash`: one random node crashes every 20 s and restarts 30 s later (new bump);
//!   measures the time until 99.9% of live nodes report it down.
//! - `partition`: a 50/50 split for 60 s, then healed; measures the time until each node
//!   sees every live node again.
//! - `stall`: 5% of the nodes freeze for 2 to 4 s, again and again (0.5 to 4 s between
//!   stalls); input and timers queue up and are handled, timers first, when they wake.
//! - `slow`: 5% of the nodes are slow at reading their input (a starved receive loop, as in
//!   the Lifeguard paper's experiments): every datagram they receive waits 0.2 to 1.2 s,
//!   in order, before they handle it; their timers run on time. Their probes time out, so
//!   they suspect healthy members again and again.
//!
//! In every scenario one random node changes its metadata every 10 s; the time until 99.9% of
//! the other live nodes report [`Event::Updated`] is the dissemination time.
//!
//! With [`SimConfig::entry_every`], a random node also sets or deletes one of its entries
//! (sixteen keys per node, one change in four a deletion) at that interval, except in the
//! last 10 s of the run (which ends with every node's table checked); the time until
//! every other live node reports that version ([`Event::Entry`]) is the entry spread time.
//! After a partition heals, the time until every live node holds exactly the live entries
//! of every live author is the entries' convergence time.
//!
//! [`SimConfig::anomaly_secs`] changes the stall lengths or the slow nodes' read delay.
//! [`SimConfig::protocol`] picks every node's membership configuration: ours
//! ([`Config::lan`]), ours without local health, or plain SWIM ([`Config::plain_swim`]).
//! The scenario's draws (crashes, restarts, metadata changes, stalls, which nodes are slow)
//! come from their own RNG and do not depend on the protocol ([`Report::schedule_hash`]);
//! loss, jitter and the slow nodes' per-datagram delay are drawn per datagram sent, so two
//! protocols that send different datagrams get the same distributions, not the same fate
//! for each datagram.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand_0_10::rngs::SmallRng;
use rand_0_10::{RngExt, SeedableRng};

use foca::{Member, State};

use zeroize::Zeroizing;

use crate::auth::{insecure_test_keys, Admission, Crypto, NodeKeys, PublicKeys, Sig};
use crate::codec::{NodeRecord, StateDump};
use crate::identity::{Identity, Metadata, NodeId, Role};
use crate::membership::{Config, Event, Membership, Setup};
use crate::seal::{Key, Keyring};

/// What happens during a run (named in lower case on `gossip-sim`'s command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Nothing.
    Steady,
    /// Crashes and restarts.
    Crash,
    /// A 60 s 50/50 partition.
    Partition,
    /// Stalling nodes.
    Stall,
    /// Nodes slow to read their input.
    Slow,
}

/// Which membership configuration every node of a run uses (kebab case on the command
/// line and in the JSON: `lifeguard`, `no-local-health`, `plain-swim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Ours: [`Config::lan`] (local health, dynamic suspicion with confirmation probes and
    /// witness quorum, buddy system, 5 indirect probes).
    Lifeguard,
    /// [`Config::lan`] with only local health off (dynamic suspicion, confirmation probes
    /// and the buddy system stay on).
    NoLocalHealth,
    /// [`Config::plain_swim`]: memberlist without Lifeguard (fixed `4 * log10(n)` s
    /// suspicion, no witnesses or confirmations, no buddy system, 3 indirect probes).
    PlainSwim,
}

impl Protocol {
    /// The membership configuration for a cluster of `nodes`.
    pub fn config(self, nodes: u32) -> Config {
        match self {
            Protocol::Lifeguard => Config::lan(nodes),
            Protocol::NoLocalHealth => Config {
                local_health: false,
                ..Config::lan(nodes)
            },
            Protocol::PlainSwim => Config::plain_swim(nodes),
        }
    }
}

/// Parameters of a run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Datagram loss probability, 0..1.
    pub loss: f64,
    /// One-way latency.
    pub latency: Duration,
    /// Extra uniform one-way delay, 0..jitter.
    pub jitter: Duration,
    /// What happens.
    pub scenario: Scenario,
    /// Measured time, after the cluster has formed.
    pub duration: Duration,
    /// The membership configuration of every node.
    pub protocol: Protocol,
    /// Share of nodes that stall (stall scenario) or are slow (slow scenario).
    pub stall_fraction: f64,
    /// Range in seconds of the anomaly, drawn uniformly: each stall's length (stall
    /// scenario, 2 to 4 s by default) or each datagram's wait before a slow node reads it
    /// (slow scenario, 0.2 to 1.2 s by default). `None`: the scenario's default.
    pub anomaly_secs: Option<(f64, f64)>,
    /// Print diagnostics (slow samples, datagram counts by message) on stderr.
    pub debug: bool,
    /// Confirmation probes on (the default) or off.
    pub confirm_probes: bool,
    /// Overrides the protocol's `suspicion_min` (raised to it, `suspicion_max` too), to
    /// measure the trade-off between tolerating stalls and detecting crashes.
    pub suspicion_min: Option<Duration>,
    /// Flap damping as the protocol configures it (the default) or off.
    pub flap_damping: bool,
    /// Share X25519 and Ed25519 results between the simulated nodes (the default; see the
    /// module docs). Off: every node computes everything itself (same trace, more time).
    pub crypto_cache: bool,
    /// Print an estimated memory breakdown (summed over nodes, bytes per (node, member)
    /// pair) on stderr once the cluster has formed and at the end, with the resident set
    /// size `rss` reports (the binary reads it; the simulation does no IO).
    pub mem: Option<fn() -> Option<u64>>,
    /// One entry change (a random node sets or deletes one of its entries) per this
    /// interval, from the start of the measurement; `None` (the default): no entries.
    pub entry_every: Option<Duration>,
    /// Length of the partition scenario's split (60 s by default).
    pub partition: Duration,
}

impl SimConfig {
    /// Defaults for `nodes` nodes: 1 ms latency, 1 ms jitter, no loss, 5 minutes.
    pub fn new(nodes: usize, seed: u64, scenario: Scenario) -> Self {
        SimConfig {
            nodes,
            seed,
            loss: 0.0,
            latency: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
            scenario,
            duration: Duration::from_secs(300),
            protocol: Protocol::Lifeguard,
            stall_fraction: 0.05,
            anomaly_secs: None,
            debug: false,
            confirm_probes: true,
            suspicion_min: None,
            flap_damping: true,
            crypto_cache: true,
            mem: None,
            entry_every: None,
            partition: Duration::from_secs(60),
        }
    }
}

/// The measurements of one run (one JSON line from `gossip-sim`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed.
    pub seed: u64,
    /// Loss probability.
    pub loss: f64,
    /// Scenario.
    pub scenario: Scenario,
    /// Membership configuration of every node.
    pub protocol: Protocol,
    /// Local health on (true only for `lifeguard`).
    pub local_health: bool,
    /// Shortest time from a suspicion to a Down in this run's configuration, seconds.
    pub suspicion_min_s: f64,
    /// Flap damping on in this run's configuration.
    pub flap_damping: bool,
    /// Simulated minutes measured (after formation).
    pub minutes: f64,
    /// Seconds of simulated time the cluster took to form (everyone sees everyone).
    pub form_s: f64,
    /// Crash to 99.9% of live nodes reporting it down, median (crash scenario).
    pub detect_p50_s: Option<f64>,
    /// Same, 99th percentile.
    pub detect_p99_s: Option<f64>,
    /// Crashes not seen down by 99.9% of live nodes before the run ended or the node restarted.
    pub detect_missed: usize,
    /// Metadata change to 99.9% of live nodes reporting it, median.
    pub disseminate_p50_s: Option<f64>,
    /// Same, 99th percentile.
    pub disseminate_p99_s: Option<f64>,
    /// Samples of the above that did not reach 99.9% before the run ended.
    pub disseminate_missed: usize,
    /// False Downs as the targets mean them: healthy members declared down by anyone.
    /// Counted once per member incarnation (node, bump, incarnation: a member declared down
    /// comes back at a higher incarnation, or after a restart at a higher bump) that at
    /// least one node reported
    /// `Down` while it was healthy: not crashed, not a slow reader, not stalled within the
    /// last 10 s (a stalling node's stalls are 0.5 to 4 s apart, so from its first stall on
    /// it never counts as healthy), and not across an active partition from the reporter.
    pub false_downs: u64,
    /// The stalling or slow nodes' own downs (distinct node, bump and incarnation), kept apart from
    /// `false_downs` (stall: the node was unresponsive; slow: it answered too late).
    pub stalled_downs: u64,
    /// The same false Downs counted per reporter: the number of `Down` events about healthy
    /// members, summed over the nodes that reported them. A healthy member declared down
    /// and spread to the whole cluster counts about `nodes - 1` here and 1 in `false_downs`.
    pub false_down_events: u64,
    /// Sealed bytes sent per node per second (UDP payloads and push-pull frames), measured
    /// after formation.
    pub bytes_per_node_per_s: f64,
    /// Largest sealed datagram sent.
    pub max_datagram_bytes: usize,
    /// Partition healed to a node seeing every live node again, 99th percentile over nodes.
    pub heal_p99_s: Option<f64>,
    /// Datagrams dropped by any node as unopenable or undecodable (should be 0).
    pub dropped_bad: u64,
    /// Datagrams dropped by the replay windows (the simulated network never duplicates, so
    /// these are reorderings deeper than the window; should be 0).
    pub dropped_replay: u64,
    /// Mean pending (membership updates, custom broadcasts) per node at the end.
    pub backlog_mean: (f64, f64),
    /// Hash of the event trace: equal seeds give equal hashes.
    pub trace_hash: String,
    /// Hash of the scenario's draws (which node crashes when, restart seeds, metadata
    /// changes, stall starts and lengths, slow nodes) and their times. It depends on the seed
    /// and scenario only, not on the protocol: both lines of `--compare-plain` show the same
    /// value.
    pub schedule_hash: String,
    /// Probes that failed (direct and indirect; each makes the prober suspect the target),
    /// summed over the nodes, after formation. A restarted node's count starts over.
    pub probes_failed: u64,
    /// Number of simulated datagrams.
    pub datagrams: u64,
    /// Relayed member records dropped for saying more than their subject stated, summed
    /// over the nodes (most are early: the subject's signed record is on its way).
    pub records_dropped: u64,
    /// Relayed `Down` records turned into `Suspect`, summed over the nodes.
    pub records_rewritten: u64,
    /// Authentication refusals, summed over the nodes (should be 0 in a simulation with no
    /// attacker): spoofed senders, future epochs, bad signatures, unproven witnesses,
    /// unsealable destinations, refused renewals.
    pub auth_refused: u64,
    /// Entry changes made ([`SimConfig::entry_every`]).
    pub entry_samples: usize,
    /// Entry change to every other live node reporting it (or a later version of the same
    /// key), median, milliseconds.
    pub entry_spread_p50_ms: Option<f64>,
    /// Same, 99th percentile.
    pub entry_spread_p99_ms: Option<f64>,
    /// Same, the slowest.
    pub entry_spread_max_ms: Option<f64>,
    /// Entry changes some live node had not reported by the end.
    pub entry_missed: usize,
    /// Partition healed to every live node holding exactly every live author's live
    /// entries, seconds (partition scenario with entries).
    pub entries_heal_converge_s: Option<f64>,
    /// At the end, every live node holds exactly every live author's live entries.
    pub entries_converged: Option<bool>,
    /// Entry changes taken from push-pull states (their broadcasts missed the node), summed
    /// over the live nodes.
    pub entries_from_pushpull: u64,
    /// Entries sent, summed over the nodes: a datagram and a push-pull state carried
    /// (per-node counters: `entries_received`, summed).
    pub entries_received: u64,
}

enum Ev {
    Deliver {
        to: usize,
        data: Vec<u8>,
    },
    PushReq {
        from: usize,
        to: usize,
        frame: Vec<u8>,
    },
    PushResp {
        to: usize,
        /// Who answers (the node `to` asked).
        from: NodeId,
        frame: Vec<u8>,
    },
    Wake {
        node: usize,
    },
    Action(Action),
}

#[derive(Clone, Copy)]
enum Action {
    Crash(usize),
    Restart(usize),
    MetaChange,
    EntrySet,
    StallStart(usize),
    PartitionStart,
    PartitionEnd,
    Check,
}

struct Node {
    core: Option<Membership>,
    addr: SocketAddr,
    bump: u32,
    wake: Option<Duration>,
    stalled_until: Option<Duration>,
    /// End of the last stall (slow nodes declared down soon after are not false downs).
    last_stall_end: Option<Duration>,
    /// Slow at reading input (slow scenario): not counted in false downs.
    slow: bool,
    /// When the slow node's input backlog is read up to.
    slow_busy_until: Duration,
    version: u32,
}

struct Sample {
    subject: NodeId,
    /// The metadata version an update sample waits for (`None` for a crash sample).
    version: Option<String>,
    start: Duration,
    seen: HashSet<usize>,
    need: usize,
    done: Option<Duration>,
}

/// A simulation run. Build with [`Sim::new`], run with [`Sim::run`].
pub struct Sim {
    cfg: SimConfig,
    /// Every node's public keys.
    publics: Vec<PublicKeys>,
    /// The directory every node holds (one, shared).
    directory: Admission,
    /// Shared X25519 and verification results (see the module docs).
    cache: Option<Arc<CryptoCache>>,
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    slab: HashMap<usize, Ev>,
    nodes: Vec<Node>,
    by_addr: HashMap<SocketAddr, usize>,
    net: SmallRng,
    plan: SmallRng,
    partitioned: bool,
    trace: u64,
    // metrics
    measuring_from: Option<Duration>,
    bytes_at_start: u64,
    probes_failed_at_start: u64,
    /// Hash of the scenario's own draws (crashes, restarts' seeds, metadata changes, stalls).
    schedule: u64,
    detect: Vec<Sample>,
    updates: Vec<Sample>,
    false_downs: HashSet<(NodeId, u32, u16)>,
    false_down_events: u64,
    slow_downs: HashSet<(NodeId, u32, u16)>,
    max_datagram: usize,
    datagrams: u64,
    heal_start: Option<Duration>,
    healed: Vec<Option<Duration>>,
    formed_at: Option<Duration>,
    /// Entry changes, and by (author, key) each one's version and index.
    entry_samples: Vec<Sample>,
    entry_index: HashMap<EntryKey, Vec<(u64, usize)>>,
    entry_seq: u64,
    entries_converged_at: Option<Duration>,
    debug: bool,
    tally: std::collections::BTreeMap<String, (u64, u64)>,
}

/// An entry's author and key.
type EntryKey = (NodeId, Vec<u8>);

fn addr_of(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(198, 18, (i >> 8) as u8, (i & 0xff) as u8);
    SocketAddr::new(IpAddr::V4(ip), 7946)
}

fn id_of(i: usize) -> NodeId {
    NodeId::from_index(i as u128 + 1)
}

fn meta_for(i: usize, version: u32, public: &PublicKeys) -> Metadata {
    Metadata {
        vtep: addr_of(i).ip(),
        data_port: 4789,
        public_key: public.x25519,
        incarnation: [1; 16],
        role: if i == 0 { Role::Manager } else { Role::Worker },
        version: format!("sim-{version}"),
    }
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some((v[idx] * 1000.0).round() / 1000.0)
}

impl Sim {
    /// A new run; nothing happens until [`Sim::run`].
    pub fn new(cfg: SimConfig) -> Self {
        let n = cfg.nodes.max(2);
        let nodes = (0..n)
            .map(|i| Node {
                core: None,
                addr: addr_of(i),
                bump: 1,
                wake: None,
                stalled_until: None,
                last_stall_end: None,
                slow: false,
                slow_busy_until: Duration::ZERO,
                version: 0,
            })
            .collect::<Vec<_>>();
        let by_addr = nodes.iter().enumerate().map(|(i, n)| (n.addr, i)).collect();
        let publics: Vec<PublicKeys> = (0..n)
            .map(|i| insecure_test_keys(&id_of(i)).public())
            .collect();
        let directory = Admission::only((0..n).map(|i| (id_of(i), publics[i])));
        Sim {
            publics,
            directory,
            cache: cfg.crypto_cache.then(|| Arc::new(CryptoCache::default())),
            debug: cfg.debug,
            net: SmallRng::seed_from_u64(cfg.seed),
            plan: SmallRng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1),
            cfg: SimConfig { nodes: n, ..cfg },
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            slab: HashMap::new(),
            nodes,
            by_addr,
            partitioned: false,
            trace: 0xcbf2_9ce4_8422_2325,
            measuring_from: None,
            bytes_at_start: 0,
            probes_failed_at_start: 0,
            schedule: 0xcbf2_9ce4_8422_2325,
            detect: Vec::new(),
            updates: Vec::new(),
            false_downs: HashSet::new(),
            false_down_events: 0,
            slow_downs: HashSet::new(),
            max_datagram: 0,
            datagrams: 0,
            heal_start: None,
            healed: Vec::new(),
            formed_at: None,
            entry_samples: Vec::new(),
            entry_index: HashMap::new(),
            entry_seq: 0,
            entries_converged_at: None,
            tally: Default::default(),
        }
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.slab.insert(self.seq as usize, ev);
        self.queue.push(Reverse((at, self.seq, self.seq as usize)));
    }

    fn mix(&mut self, a: u64, b: u64) {
        for x in [a, b, self.now.as_micros() as u64] {
            self.trace ^= x;
            self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn side(&self, i: usize) -> bool {
        i < self.nodes.len() / 2
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].core.is_some()
    }

    fn live_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.core.is_some()).count()
    }

    /// The membership configuration every node of this run gets.
    fn node_config(&self) -> Config {
        let mut config = self.cfg.protocol.config(self.cfg.nodes as u32);
        if !self.cfg.confirm_probes {
            config.confirm_probes = 0;
        }
        if !self.cfg.flap_damping {
            config.flap_damping = None;
        }
        if let Some(min) = self.cfg.suspicion_min {
            config.suspicion_min = min;
            config.suspicion_max = config.suspicion_max.max(min);
            // The damping period follows suspicion_max, as in `Config::lan`.
            if let Some(period) = config.flap_damping.as_mut() {
                *period = (*period).max(config.suspicion_max * 5);
            }
        }
        config
    }

    fn crypto(&self, i: usize) -> Arc<SimCrypto> {
        Arc::new(SimCrypto {
            keys: insecure_test_keys(&id_of(i)),
            cache: self.cache.clone(),
        })
    }

    fn make_core(&mut self, i: usize) -> Membership {
        let config = self.node_config();
        let node = &self.nodes[i];
        let setup = Setup {
            config,
            identity: Identity::new(id_of(i), node.addr, node.bump),
            metadata: meta_for(i, node.version, &self.publics[i]),
            keyring: Keyring::new(Key {
                id: 1,
                secret: [0x42; 32],
            }),
            admission: self.directory.clone(),
            crypto: self.crypto(i),
            seed: self.cfg.seed ^ ((i as u64) << 20) ^ u64::from(node.bump),
            // Every start of a node gets a later epoch: virtual milliseconds, plus the bump
            // (which rises with each restart) so it rises even within one millisecond.
            epoch: self.now.as_millis() as u64 + u64::from(node.bump),
            salt: i as u64,
            // The wall clock is the virtual clock.
            wall_ms: self.now.as_millis() as u64,
        };
        // Metadata from meta_for is always valid and carries the node's own key.
        match Membership::new(setup, self.base + self.now) {
            Ok(mut m) => {
                m.set_debug(self.debug);
                m
            }
            Err(e) => panic!("simulation setup invalid: {e}"),
        }
    }

    /// Drains a node's outputs into the event queue and records its events.
    fn pump(&mut self, i: usize) {
        let now = self.now;
        let Some(core) = self.nodes[i].core.as_mut() else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = core.poll_transmit() {
            sends.push(t);
        }
        let mut pulls = Vec::new();
        while let Some(p) = core.poll_pushpull() {
            pulls.push(p);
        }
        let mut events = Vec::new();
        while let Some(e) = core.poll_event() {
            events.push(e);
        }
        let next = core.poll_timeout();
        if self.debug {
            for n in core.take_notes() {
                eprintln!("{:.3} node {i}: {n}", now.as_secs_f64());
            }
        }
        for t in sends {
            if self.debug && self.measuring_from.is_some() {
                let to = self.by_addr.get(&t.dst).map(|j| id_of(*j));
                if let Some(h) = self.nodes[i]
                    .core
                    .as_ref()
                    .zip(to)
                    .and_then(|(c, to)| c.peek_header(&to, &t.data))
                {
                    let tag = format!("{:?}", h.message);
                    let tag = tag.split(['(', ' ']).next().unwrap_or("").to_string();
                    let e = self.tally.entry(tag).or_insert((0, 0));
                    e.0 += 1;
                    e.1 += t.data.len() as u64;
                }
            }
            self.datagrams += 1;
            self.max_datagram = self.max_datagram.max(t.data.len());
            let Some(&to) = self.by_addr.get(&t.dst) else {
                continue;
            };
            if self.partitioned && self.side(i) != self.side(to) {
                continue;
            }
            if self.net.random::<f64>() < self.cfg.loss {
                continue;
            }
            let delay = self.cfg.latency + self.cfg.jitter.mul_f64(self.net.random::<f64>());
            let mut at = now + delay;
            if self.nodes[to].slow {
                // A starved receive loop: each datagram waits 0.2-1.2 s, in order.
                let (lo, hi) = self.cfg.anomaly_secs.unwrap_or((0.2, 1.2));
                let wait = Duration::from_secs_f64(if hi > lo {
                    self.net.random_range(lo..hi)
                } else {
                    lo.max(0.0)
                });
                at = (at + wait).max(self.nodes[to].slow_busy_until);
                self.nodes[to].slow_busy_until = at;
            }
            self.push(at, Ev::Deliver { to, data: t.data });
        }
        for peer in pulls {
            let Some(&to) = self.by_addr.get(&peer.addr) else {
                continue;
            };
            if to == i {
                continue;
            }
            let Some(core) = self.nodes[i].core.as_mut() else {
                return;
            };
            if let Ok(frame) = core.pushpull_frame(peer.id) {
                // TCP: no loss, but a connect + one RTT; blocked by partitions.
                if !(self.partitioned && self.side(i) != self.side(to)) {
                    let delay = self.cfg.latency * 3;
                    self.push(now + delay, Ev::PushReq { from: i, to, frame });
                }
            }
        }
        for e in events {
            self.record(i, e);
        }
        if let Some(t) = next {
            let t = t.saturating_duration_since(self.base);
            let t = t.max(now);
            if self.nodes[i].wake.is_none_or(|w| t < w || w < now) {
                self.nodes[i].wake = Some(t);
                self.push(t, Ev::Wake { node: i });
            }
        }
    }

    fn record(&mut self, observer: usize, e: Event) {
        let (kind, info) = match &e {
            Event::Up(m) => (1, m),
            Event::Down(m) => (2, m),
            Event::Updated(m) => (3, m),
            Event::Left(m) => (4, m),
            Event::Entry { .. } => {
                self.record_entry(observer, e);
                return;
            }
        };
        let subj = info.id;
        let info_bump = info.bump;
        let info_inc = info.incarnation;
        let subj_index =
            (u128::from_str_radix(subj.as_str(), 36).unwrap_or(0) as usize).wrapping_sub(1);
        self.mix(observer as u64 * 8 + kind, subj_index as u64);
        if self.measuring_from.is_none() {
            return;
        }
        let now = self.now;
        match e {
            Event::Down(_) => {
                if subj_index < self.nodes.len() && self.alive(subj_index) {
                    let split = self.partitioned && self.side(observer) != self.side(subj_index);
                    // A node that stalled in the last 10 s was really unresponsive.
                    let slow = self.nodes[subj_index].slow
                        || self.nodes[subj_index]
                            .last_stall_end
                            .is_some_and(|end| now < end + Duration::from_secs(10));
                    if slow {
                        self.slow_downs.insert((subj, info_bump, info_inc));
                    } else if !split {
                        if self.debug && !self.false_downs.contains(&(subj, info_bump, info_inc)) {
                            eprintln!(
                                "{:.3} FALSE DOWN {subj} bump {info_bump} inc {info_inc} first seen by node {observer}",
                                now.as_secs_f64()
                            );
                        }
                        self.false_down_events += 1;
                        self.false_downs.insert((subj, info_bump, info_inc));
                    }
                }
                for s in self.detect.iter_mut().filter(|s| s.subject == subj) {
                    if s.seen.is_empty() && self.debug {
                        eprintln!(
                            "first down of {subj} after {:.2}",
                            (now - s.start).as_secs_f64()
                        );
                    }
                    if s.seen.insert(observer) && s.seen.len() >= s.need && s.done.is_none() {
                        s.done = Some(now - s.start);
                    }
                }
            }
            // An update has arrived when the node reports the new version, as an update or
            // in the Up of a member it has just (re)discovered.
            Event::Updated(m) | Event::Up(m) => {
                let version = m.metadata.as_ref().map(|d| d.version.clone());
                for s in self
                    .updates
                    .iter_mut()
                    .filter(|s| s.subject == subj && s.version == version)
                {
                    if s.seen.insert(observer) && s.seen.len() >= s.need && s.done.is_none() {
                        s.done = Some(now - s.start);
                        if self.debug && (now - s.start) > Duration::from_secs(3) {
                            eprintln!(
                                "slow update of {subj} at {:.1}: {:.2} s",
                                s.start.as_secs_f64(),
                                (now - s.start).as_secs_f64()
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// An entry change reported by `observer`: one more node that holds that version.
    fn record_entry(&mut self, observer: usize, e: Event) {
        let Event::Entry {
            author,
            key,
            version,
            value,
        } = e
        else {
            return;
        };
        let author_index =
            (u128::from_str_radix(author.as_str(), 36).unwrap_or(0) as usize).wrapping_sub(1);
        self.mix(
            observer as u64 * 8 + 5 + u64::from(value.is_some()),
            author_index as u64 ^ version,
        );
        let now = self.now;
        // That version, or a later one that superseded it (a node that missed a change but
        // holds the next one has caught up).
        for &(v, k) in self.entry_index.get(&(author, key)).into_iter().flatten() {
            if v > version {
                continue;
            }
            let s = &mut self.entry_samples[k];
            if s.seen.insert(observer) && s.seen.len() >= s.need && s.done.is_none() {
                s.done = Some(now - s.start);
                if self.debug && now - s.start > Duration::from_secs(1) {
                    eprintln!(
                        "{:.3} slow entry of {} (version {v}, set at {:.3}): node {observer} last, at version {version}",
                        now.as_secs_f64(),
                        s.subject,
                        s.start.as_secs_f64()
                    );
                }
            }
        }
    }

    /// Prints (debug) which nodes hold other live entries than their authors do.
    fn entries_diff(&self) {
        for (j, n) in self.nodes.iter().enumerate() {
            let Some(c) = n.core.as_ref() else { continue };
            for (i, a) in self.nodes.iter().enumerate() {
                let Some(ac) = a.core.as_ref() else { continue };
                let own: Vec<_> = ac
                    .entries()
                    .into_iter()
                    .filter(|e| e.author == id_of(i))
                    .map(|e| (e.key, e.version))
                    .collect();
                let held: Vec<_> = c
                    .entries()
                    .into_iter()
                    .filter(|e| e.author == id_of(i))
                    .map(|e| (e.key, e.version))
                    .collect();
                if own != held {
                    eprintln!("entries of node {i} at node {j}: author holds {own:?}, node holds {held:?}");
                }
            }
        }
    }

    /// Whether every live node holds exactly the live entries of every live author (as
    /// each author holds them itself).
    fn entries_converged(&self) -> bool {
        let live: HashSet<NodeId> = (0..self.nodes.len())
            .filter(|i| self.alive(*i))
            .map(id_of)
            .collect();
        let mut want = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(c) = n.core.as_ref() {
                want.extend(c.entries().into_iter().filter(|e| e.author == id_of(i)));
            }
        }
        want.sort_by(|a, b| (a.author, &a.key).cmp(&(b.author, &b.key)));
        self.nodes.iter().filter_map(|n| n.core.as_ref()).all(|c| {
            let held: Vec<_> = c
                .entries()
                .into_iter()
                .filter(|e| live.contains(&e.author))
                .collect();
            held == want
        })
    }

    fn need(&self, exclude: usize) -> usize {
        let live = self.live_count() - usize::from(self.alive(exclude));
        ((live as f64) * 0.999).ceil() as usize
    }

    fn act(&mut self, a: Action) {
        let now = self.now;
        let n = self.nodes.len();
        match a {
            Action::Crash(i) => {
                self.plan_mix(1, i as u64, 0);
                if self.alive(i) {
                    self.nodes[i].core = None;
                    self.nodes[i].wake = None;
                    let subject = NodeId::from_index(i as u128 + 1);
                    let need = self.need(i);
                    self.detect.push(Sample {
                        subject,
                        version: None,
                        start: now,
                        seen: HashSet::new(),
                        need,
                        done: None,
                    });
                    self.push(
                        now + Duration::from_secs(30),
                        Ev::Action(Action::Restart(i)),
                    );
                }
            }
            Action::Restart(i) => {
                self.nodes[i].bump += 1;
                let core = self.make_core(i);
                self.nodes[i].core = Some(core);
                let mut seed = self.plan.random_range(0..n);
                while !self.alive(seed) || seed == i {
                    seed = (seed + 1) % n;
                }
                self.plan_mix(2, i as u64, seed as u64);
                if let Some(core) = self.nodes[i].core.as_mut() {
                    core.join(&[(id_of(seed), addr_of(seed))], self.base + now);
                }
                self.pump(i);
            }
            Action::MetaChange => {
                let i = self.plan.random_range(0..n);
                self.plan_mix(3, i as u64, 0);
                if self.alive(i) && self.nodes[i].stalled_until.is_none() {
                    self.nodes[i].version += 1;
                    let meta = meta_for(i, self.nodes[i].version, &self.publics[i]);
                    let need = self.need(i);
                    self.updates.push(Sample {
                        subject: NodeId::from_index(i as u128 + 1),
                        version: Some(meta.version.clone()),
                        start: now,
                        seen: HashSet::new(),
                        need,
                        done: None,
                    });
                    if let Some(core) = self.nodes[i].core.as_mut() {
                        let _ = core.update_metadata(meta, self.base + now);
                    }
                    self.pump(i);
                }
                self.push(
                    now + Duration::from_secs(10),
                    Ev::Action(Action::MetaChange),
                );
            }
            Action::EntrySet => {
                let i = self.plan.random_range(0..n);
                let key = format!("ep/{}", self.plan.random_range(0..16u32)).into_bytes();
                let delete = self.plan.random_range(0..4u32) == 0;
                self.plan_mix(6, i as u64, u64::from(delete));
                self.entry_seq += 1;
                // Wall-clock milliseconds (virtual), then a sequence number: never back, not
                // even across restarts.
                let version = (now.as_millis() as u64) * 1000 + self.entry_seq % 1000;
                let value =
                    (!delete).then(|| format!("net1 10.0.{i}.{} mac", self.entry_seq).into_bytes());
                if self.alive(i) && self.nodes[i].stalled_until.is_none() {
                    let need = self.live_count() - 1;
                    let set = self.nodes[i].core.as_mut().is_some_and(|c| {
                        c.set_entry(key.clone(), version, value, self.base + now)
                            .is_ok()
                    });
                    if set {
                        self.entry_index
                            .entry((id_of(i), key))
                            .or_default()
                            .push((version, self.entry_samples.len()));
                        let mut seen = HashSet::new();
                        seen.insert(i);
                        self.entry_samples.push(Sample {
                            subject: id_of(i),
                            version: None,
                            start: now,
                            seen,
                            // every other live node, and the author itself
                            need: need + 1,
                            done: None,
                        });
                    }
                    self.pump(i);
                }
                // None in the last 10 s: the run ends with every change spread (or missed).
                let stop = self
                    .measuring_from
                    .map_or(now, |f| f + self.cfg.duration)
                    .saturating_sub(Duration::from_secs(10));
                if let Some(every) = self.cfg.entry_every.filter(|e| now + *e < stop) {
                    self.push(now + every, Ev::Action(Action::EntrySet));
                }
            }
            Action::StallStart(i) => {
                let (lo, hi) = self.cfg.anomaly_secs.unwrap_or((2.0, 4.0));
                let len = Duration::from_secs_f64(if hi > lo {
                    self.plan.random_range(lo..hi)
                } else {
                    lo.max(0.0)
                });
                self.nodes[i].stalled_until = Some(now + len);
                self.nodes[i].last_stall_end = Some(now + len);
                let gap = Duration::from_secs_f64(self.plan.random_range(0.5..4.0));
                self.plan_mix(4, i as u64, (len + gap).as_micros() as u64);
                self.push(now + len + gap, Ev::Action(Action::StallStart(i)));
            }
            Action::PartitionStart => {
                self.partitioned = true;
                self.push(now + self.cfg.partition, Ev::Action(Action::PartitionEnd));
            }
            Action::PartitionEnd => {
                self.partitioned = false;
                self.heal_start = Some(now);
                self.healed = vec![None; n];
            }
            Action::Check => {
                let live = self.live_count();
                if self.formed_at.is_none() {
                    let formed = self.nodes.iter().all(|nd| {
                        nd.core
                            .as_ref()
                            .is_none_or(|c| c.num_active() + 1 == live && c.backlog() == (0, 0))
                    });
                    if formed || now > Duration::from_secs(600) {
                        self.formed_at = Some(now);
                        self.mem_report("formed");
                        self.start_measuring();
                    }
                }
                if let Some(h) = self.heal_start {
                    if self.cfg.entry_every.is_some() && self.entries_converged_at.is_none() {
                        if self.entries_converged() {
                            self.entries_converged_at = Some(now - h);
                        } else if self.debug && (now - h).as_millis() % 5000 == 0 {
                            eprintln!("{:.2} entries not converged:", now.as_secs_f64());
                            self.entries_diff();
                        }
                    }
                    for i in 0..n {
                        if self.healed[i].is_none() {
                            if let Some(c) = self.nodes[i].core.as_ref() {
                                if c.num_active() + 1 == live {
                                    self.healed[i] = Some(now - h);
                                }
                            }
                        }
                    }
                }
                self.push(now + Duration::from_millis(250), Ev::Action(Action::Check));
            }
        }
    }

    fn total_probes_failed(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.stats().probes_failed)
            .sum()
    }

    /// Records one scenario draw in the schedule hash.
    fn plan_mix(&mut self, kind: u64, a: u64, b: u64) {
        for x in [kind, a, b, self.now.as_micros() as u64] {
            self.schedule ^= x;
            self.schedule = self.schedule.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn total_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| {
                let s = c.stats();
                s.bytes_out + s.stream_bytes_out
            })
            .sum()
    }

    fn start_measuring(&mut self) {
        let now = self.now;
        self.measuring_from = Some(now);
        self.bytes_at_start = self.total_bytes();
        self.probes_failed_at_start = self.total_probes_failed();
        let n = self.nodes.len();
        self.push(now + Duration::from_secs(2), Ev::Action(Action::MetaChange));
        if let Some(every) = self.cfg.entry_every {
            self.push(now + every, Ev::Action(Action::EntrySet));
        }
        match self.cfg.scenario {
            Scenario::Steady => {}
            Scenario::Crash => {
                let mut t = now + Duration::from_secs(10);
                while t < now + self.cfg.duration.saturating_sub(Duration::from_secs(20)) {
                    let i = self.plan.random_range(1..n);
                    self.push(t, Ev::Action(Action::Crash(i)));
                    t += Duration::from_secs(20);
                }
            }
            Scenario::Partition => {
                self.push(
                    now + Duration::from_secs(5),
                    Ev::Action(Action::PartitionStart),
                );
            }
            Scenario::Stall => {
                let k = ((n as f64) * self.cfg.stall_fraction).round() as usize;
                for j in 0..k {
                    let i = 1 + (j * (n - 1)) / k.max(1);
                    let at = now + Duration::from_secs_f64(self.plan.random_range(0.0..10.0));
                    self.push(at, Ev::Action(Action::StallStart(i)));
                }
            }
            Scenario::Slow => {
                let k = ((n as f64) * self.cfg.stall_fraction).round() as usize;
                for j in 0..k {
                    let i = 1 + (j * (n - 1)) / k.max(1);
                    self.nodes[i].slow = true;
                    self.plan_mix(5, i as u64, 0);
                }
            }
        }
    }

    /// Runs the scenario to the end and reports.
    pub fn run(mut self) -> Report {
        let n = self.nodes.len();
        // The cluster forms at once: every node restores the full state (as an agent
        // restoring its saved state would), so the run measures the steady cluster, not a
        // thousand simultaneous joins. Restarted nodes join for real, through a seed.
        let dump = StateDump {
            members: (0..n)
                .map(|i| Member::new(Identity::new(id_of(i), addr_of(i), 1), 0, State::Alive))
                .collect(),
            // Each node's first record, exactly as its core signs it at start (Ed25519 is
            // deterministic): identity at bump 1, incarnation 0, seq 1 << 32.
            records: (0..n)
                .map(|i| {
                    Arc::new(NodeRecord::signed(
                        Identity::new(id_of(i), addr_of(i), 1),
                        0,
                        1 << 32,
                        false,
                        meta_for(i, 0, &self.publics[i]),
                        self.crypto(i).as_ref(),
                    ))
                })
                .collect(),
            entries: Vec::new(),
        };
        for i in 0..n {
            let mut core = self.make_core(i);
            core.restore(&dump, self.base);
            self.nodes[i].core = Some(core);
            self.pump(i);
        }
        self.push(Duration::from_secs(1), Ev::Action(Action::Check));
        while let Some(Reverse((at, _, key))) = self.queue.pop() {
            if let Some(from) = self.measuring_from {
                if at > from + self.cfg.duration {
                    break;
                }
            }
            let Some(ev) = self.slab.remove(&key) else {
                continue;
            };
            self.now = at;
            self.step(ev);
        }
        self.report()
    }

    fn deferred(&mut self, i: usize, ev: Ev, timer_first: bool) -> Option<Ev> {
        match self.nodes[i].stalled_until {
            Some(until) if until > self.now => {
                // Frozen: timers fire as soon as it wakes, queued input right after.
                let at = if timer_first {
                    until
                } else {
                    until + Duration::from_micros(1)
                };
                self.push(at, ev);
                None
            }
            Some(_) => {
                self.nodes[i].stalled_until = None;
                Some(ev)
            }
            None => Some(ev),
        }
    }

    fn step(&mut self, ev: Ev) {
        let now = self.base + self.now;
        match ev {
            Ev::Action(a) => self.act(a),
            Ev::Wake { node } => {
                let ev = Ev::Wake { node };
                let Some(Ev::Wake { node }) = self.deferred(node, ev, true) else {
                    return;
                };
                if self.nodes[node].wake.is_some_and(|w| w > self.now) {
                    return; // superseded by a later schedule
                }
                self.nodes[node].wake = None;
                if let Some(c) = self.nodes[node].core.as_mut() {
                    c.handle_timeout(now);
                }
                self.pump(node);
            }
            Ev::Deliver { to, data } => {
                let Some(Ev::Deliver { to, data }) =
                    self.deferred(to, Ev::Deliver { to, data }, false)
                else {
                    return;
                };
                if let Some(c) = self.nodes[to].core.as_mut() {
                    let _ = c.handle_datagram(&data, now);
                }
                self.pump(to);
            }
            Ev::PushReq { from, to, frame } => {
                let Some(Ev::PushReq { from, to, frame }) =
                    self.deferred(to, Ev::PushReq { from, to, frame }, false)
                else {
                    return;
                };
                let reply = match self.nodes[to].core.as_mut() {
                    Some(c) => match c.handle_pushpull(&frame, None, now) {
                        Ok(sender) => c.pushpull_frame(sender).ok(),
                        Err(_) => None,
                    },
                    None => None,
                };
                self.pump(to);
                if let Some(frame) = reply {
                    if !(self.partitioned && self.side(from) != self.side(to)) {
                        let at = self.now + self.cfg.latency;
                        self.push(
                            at,
                            Ev::PushResp {
                                to: from,
                                from: id_of(to),
                                frame,
                            },
                        );
                    }
                }
            }
            Ev::PushResp { to, from, frame } => {
                let Some(Ev::PushResp { to, from, frame }) =
                    self.deferred(to, Ev::PushResp { to, from, frame }, false)
                else {
                    return;
                };
                if let Some(c) = self.nodes[to].core.as_mut() {
                    let _ = c.handle_pushpull(&frame, Some(from), now);
                }
                self.pump(to);
            }
        }
    }

    fn mem_report(&self, when: &str) {
        let Some(rss) = self.cfg.mem else {
            return;
        };
        let mut parts: Vec<(&'static str, usize)> = Vec::new();
        for c in self.nodes.iter().filter_map(|n| n.core.as_ref()) {
            for (name, b) in c.memory() {
                match parts.iter_mut().find(|p| p.0 == name) {
                    Some(p) => p.1 += b,
                    None => parts.push((name, b)),
                }
            }
        }
        let n = self.nodes.len() as f64;
        let pairs = n * (n - 1.0);
        let mut out = serde_json::Map::new();
        out.insert("mem".into(), when.into());
        let mut total = 0;
        for (name, b) in parts {
            total += b;
            out.insert(
                format!("{name}_B_per_pair"),
                serde_json::json!((b as f64 / pairs * 10.0).round() / 10.0),
            );
        }
        out.insert(
            "estimated_B_per_pair".into(),
            serde_json::json!((total as f64 / pairs * 10.0).round() / 10.0),
        );
        if let Some(r) = rss() {
            out.insert(
                "rss_B_per_pair".into(),
                serde_json::json!((r as f64 / pairs * 10.0).round() / 10.0),
            );
            out.insert("rss_kb".into(), serde_json::json!(r / 1024));
        }
        out.insert("queue_events".into(), serde_json::json!(self.slab.len()));
        eprintln!("{}", serde_json::Value::Object(out));
    }

    fn report(self) -> Report {
        self.mem_report("end");
        if self.debug {
            eprintln!("{:?}", self.tally);
        }
        let from = self.measuring_from.unwrap_or(self.now);
        let secs = (self.now.saturating_sub(from)).as_secs_f64().max(1e-9);
        let bytes = self.total_bytes().saturating_sub(self.bytes_at_start);
        let mut detect: Vec<f64> = self
            .detect
            .iter()
            .map(|s| s.done.map_or(f64::INFINITY, |d| d.as_secs_f64()))
            .collect();
        let end = self.now;
        // A metadata change needs a few seconds to spread: ignore samples from the last 10 s.
        let mut missed = 0;
        let mut dissem: Vec<f64> = Vec::new();
        for s in &self.updates {
            match s.done {
                Some(d) => dissem.push(d.as_secs_f64()),
                None if end - s.start > Duration::from_secs(10) => {
                    missed += 1;
                    dissem.push(f64::INFINITY);
                    if self.debug {
                        let missing: Vec<usize> = (0..self.nodes.len())
                            .filter(|i| {
                                self.nodes[*i].core.is_some()
                                    && !s.seen.contains(i)
                                    && id_of(*i) != s.subject
                            })
                            .collect();
                        eprintln!(
                            "update of {} at {:.1} s reached {} of {} needed; not at {missing:?}",
                            s.subject,
                            s.start.as_secs_f64(),
                            s.seen.len(),
                            s.need
                        );
                    }
                }
                None => {}
            }
        }
        if self.debug && self.heal_start.is_some() {
            let live = self.live_count();
            let mut shown = 0;
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(c) = n.core.as_ref() else { continue };
                if c.num_active() + 1 < live && shown < 5 {
                    shown += 1;
                    let members = c.members();
                    let missing: Vec<String> = members
                        .iter()
                        .filter(|m| m.state != crate::MemberState::Up)
                        .take(8)
                        .map(|m| {
                            format!(
                                "{}/{}/{:?} (it is at bump {})",
                                m.id,
                                m.bump,
                                m.state,
                                (u128::from_str_radix(m.id.as_str(), 36).unwrap_or(1) as usize)
                                    .checked_sub(1)
                                    .and_then(|j| self.nodes.get(j))
                                    .and_then(|n| n.core.as_ref())
                                    .map_or(0, |c| c.identity().bump)
                            )
                        })
                        .collect();
                    eprintln!(
                        "not healed: node {i} (bump {}) holds {} active of {}; e.g. {missing:?}",
                        c.identity().bump,
                        c.num_active(),
                        live - 1
                    );
                }
            }
        }
        let heal_p99 = self.heal_start.map(|_| {
            let mut v: Vec<f64> = self
                .healed
                .iter()
                .enumerate()
                .filter(|(i, _)| self.nodes[*i].core.is_some())
                .map(|(_, h)| h.map_or(f64::INFINITY, |d| d.as_secs_f64()))
                .collect();
            percentile(&mut v, 0.99).unwrap_or(f64::INFINITY)
        });
        let fin = |x: Option<f64>| x.filter(|v| v.is_finite());
        let dropped_bad = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| {
                let s = c.stats();
                s.dropped_seal + s.dropped_decode
            })
            .sum();
        let dropped_replay = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.stats().dropped_replay)
            .sum();
        let sum = |f: &dyn Fn(&crate::Stats) -> u64| -> u64 {
            self.nodes
                .iter()
                .filter_map(|n| n.core.as_ref())
                .map(|c| f(&c.stats()))
                .sum()
        };
        if self.debug {
            eprintln!(
                "auth: spoofed {} future {} bad_sig {} unproven {} unsealable {} renewal {} not_admitted {}",
                sum(&|s| s.dropped_spoofed),
                sum(&|s| s.dropped_future),
                sum(&|s| s.items_bad_signature),
                sum(&|s| s.items_unproven),
                sum(&|s| s.dropped_unsealable),
                sum(&|s| s.dropped_renewal),
                sum(&|s| s.dropped_not_admitted)
            );
        }
        let records_dropped = sum(&|s| s.records_dropped);
        let records_rewritten = sum(&|s| s.records_rewritten);
        let auth_refused = sum(&|s| {
            s.dropped_spoofed
                + s.dropped_future
                + s.items_bad_signature
                + s.items_unproven
                + s.dropped_unsealable
                + s.dropped_renewal
                + s.dropped_not_admitted
        });
        let node_config = self.node_config();
        let entries_on = self.cfg.entry_every.is_some();
        let mut spread: Vec<f64> = Vec::new();
        let mut entry_missed = 0;
        for s in &self.entry_samples {
            match s.done {
                Some(d) => spread.push(d.as_secs_f64() * 1000.0),
                None => {
                    entry_missed += 1;
                    spread.push(f64::INFINITY);
                }
            }
        }
        let spread_max = spread
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let entries_converged = entries_on.then(|| self.entries_converged());
        if self.debug && entries_converged == Some(false) {
            self.entries_diff();
        }
        if self.debug && entries_on {
            eprintln!(
                "entries: refused_gone {} stale {} dropped {} from_pushpull {} evicted {} omitted {}",
                sum(&|s| s.entries_refused_gone),
                sum(&|s| s.entries_stale),
                sum(&|s| s.entries_dropped),
                sum(&|s| s.entries_from_pushpull),
                sum(&|s| s.entries_queue_evicted),
                sum(&|s| s.entries_pushpull_omitted)
            );
        }
        let entries_from_pushpull = sum(&|s| s.entries_from_pushpull);
        let entries_received = sum(&|s| s.entries_received);
        Report {
            nodes: self.nodes.len(),
            seed: self.cfg.seed,
            loss: self.cfg.loss,
            scenario: self.cfg.scenario,
            protocol: self.cfg.protocol,
            local_health: node_config.local_health,
            // Plain SWIM's suspicions all wait suspicion_max.
            suspicion_min_s: if node_config.dynamic_suspicion {
                node_config.suspicion_min.as_secs_f64()
            } else {
                node_config.suspicion_max.as_secs_f64()
            },
            flap_damping: node_config.flap_damping.is_some(),
            minutes: (secs / 60.0 * 100.0).round() / 100.0,
            form_s: self.formed_at.map_or(-1.0, |d| d.as_secs_f64()),
            detect_missed: detect.iter().filter(|d| !d.is_finite()).count(),
            detect_p50_s: fin(percentile(&mut detect, 0.5)),
            detect_p99_s: fin(percentile(&mut detect, 0.99)),
            disseminate_p50_s: fin(percentile(&mut dissem, 0.5)),
            disseminate_p99_s: fin(percentile(&mut dissem, 0.99)),
            disseminate_missed: missed,
            false_downs: self.false_downs.len() as u64,
            false_down_events: self.false_down_events,
            stalled_downs: self.slow_downs.len() as u64,
            bytes_per_node_per_s: (bytes as f64 / self.nodes.len() as f64 / secs).round(),
            max_datagram_bytes: self.max_datagram,
            heal_p99_s: heal_p99.and_then(|v| fin(Some(v))),
            dropped_bad,
            dropped_replay,
            backlog_mean: {
                let (mut a, mut b, mut k) = (0usize, 0usize, 0usize);
                for c in self.nodes.iter().filter_map(|n| n.core.as_ref()) {
                    let (x, y) = c.backlog();
                    a += x;
                    b += y;
                    k += 1;
                }
                (a as f64 / k.max(1) as f64, b as f64 / k.max(1) as f64)
            },
            trace_hash: format!("{:016x}", self.trace),
            schedule_hash: format!("{:016x}", self.schedule),
            probes_failed: self
                .total_probes_failed()
                .saturating_sub(self.probes_failed_at_start),
            datagrams: self.datagrams,
            records_dropped,
            records_rewritten,
            auth_refused,
            entry_samples: self.entry_samples.len(),
            entry_spread_p50_ms: fin(percentile(&mut spread, 0.5)),
            entry_spread_p99_ms: fin(percentile(&mut spread, 0.99)),
            entry_spread_max_ms: fin(spread_max.map(|m| (m * 1000.0).round() / 1000.0)),
            entry_missed,
            entries_heal_converge_s: self.entries_converged_at.map(|d| d.as_secs_f64()),
            entries_converged,
            entries_from_pushpull,
            entries_received,
        }
    }
}

/// X25519 and Ed25519 results shared by every simulated node (see the module docs). Both
/// functions are pure, so a cached answer is the answer. Bounded: a full map is cleared.
#[derive(Debug, Default)]
pub struct CryptoCache {
    /// X25519 result per unordered pair of public keys (lower key first).
    dh: Mutex<HashMap<KeyPair, Option<[u8; 32]>>>,
    /// Verification result per signature, with the key and message it was for (a lookup
    /// with another key or message computes again).
    verified: Mutex<HashMap<Sig, Verified>>,
}

/// Two X25519 public keys, the lower first.
type KeyPair = ([u8; 32], [u8; 32]);

/// A verification: the Ed25519 key, the message, the result.
type Verified = ([u8; 32], Vec<u8>, bool);

/// Most entries per map of [`CryptoCache`] (about 100 bytes each).
const CACHE_ENTRIES: usize = 1 << 22;

impl CryptoCache {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A simulated node's keys behind the shared cache.
#[derive(Debug)]
struct SimCrypto {
    keys: NodeKeys,
    cache: Option<Arc<CryptoCache>>,
}

impl Crypto for SimCrypto {
    fn public(&self) -> PublicKeys {
        self.keys.public()
    }

    fn shared(&self, peer_x25519: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let Some(cache) = &self.cache else {
            return self.keys.shared(peer_x25519);
        };
        let mine = self.keys.public().x25519;
        let pair = if mine <= *peer_x25519 {
            (mine, *peer_x25519)
        } else {
            (*peer_x25519, mine)
        };
        if let Some(v) = CryptoCache::lock(&cache.dh).get(&pair) {
            return v.map(Zeroizing::new);
        }
        let v = self.keys.shared(peer_x25519);
        let mut dh = CryptoCache::lock(&cache.dh);
        if dh.len() >= CACHE_ENTRIES {
            dh.clear();
        }
        dh.insert(pair, v.as_deref().copied());
        v
    }

    fn sign(&self, msg: &[u8]) -> Sig {
        self.keys.sign(msg)
    }

    fn verify(&self, ed25519: &[u8; 32], msg: &[u8], sig: &Sig) -> bool {
        let Some(cache) = &self.cache else {
            return self.keys.verify(ed25519, msg, sig);
        };
        if let Some((k, m, ok)) = CryptoCache::lock(&cache.verified).get(sig) {
            if k == ed25519 && m == msg {
                return *ok;
            }
        }
        let ok = self.keys.verify(ed25519, msg, sig);
        let mut v = CryptoCache::lock(&cache.verified);
        if v.len() >= CACHE_ENTRIES {
            v.clear();
        }
        v.insert(*sig, (*ed25519, msg.to_vec(), ok));
        ok
    }
}
