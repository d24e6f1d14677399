//! The tokio driver: one task owns the [`Membership`] core and runs UDP and TCP on one
//! address (default `0.0.0.0:7946`). Events go out on an unbounded tokio mpsc channel (the
//! protocol loop must never wait on a slow consumer); the [`Handle`] sends commands in.
//!
//! Push-pull runs over TCP, one exchange per connection: the side that connects writes its
//! state sealed for the other as `len u32 | frame`, the other answers with its own, sealed
//! for the authenticated initiator. Each exchange is bounded in size ([`MAX_PUSHPULL_FRAME`],
//! and memory grows only as bytes arrive), in time ([`Config::pushpull_timeout`]) and in
//! number ([`Config::pushpull_concurrency`] in each direction; extra ones are refused).
//!
//! Before its first frame opens, an incoming connection is a stranger: at most
//! [`Config::unauthenticated_per_ip`] of them per source IP and
//! [`Config::unauthenticated_total`] in all, each with [`Config::first_frame_timeout`] to
//! deliver its frame; only a frame that opened takes an exchange slot. Refused connections
//! are counted in [`Stats`] (`tcp_*`) and logged at most once per [`REFUSAL_LOG_PERIOD`].
//!
//! The driver passes the wall clock to the core before each input
//! ([`Membership::set_wall_clock`]); nothing else in the crate reads a clock.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::auth::{Admission, Crypto, NodeKeys, PublicKeys};
use crate::identity::{Identity, Metadata, NodeId};
use crate::membership::{
    self, ApiError, EntryInfo, Event, MemberInfo, Membership, Setup, Stats, MAX_PUSHPULL_FRAME,
};
use crate::seal::Keyring;

/// Everything the driver needs. Build with [`Config::new`], then adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen, UDP and TCP (default `0.0.0.0:7946`). Outgoing push-pull connections
    /// come from this IP too, unless it is unspecified.
    pub bind: SocketAddr,
    /// The address others reach us at (goes into our identity).
    pub advertise: SocketAddr,
    /// Our node ID.
    pub id: NodeId,
    /// Identity generation; `None` takes [`wall_bump`] of the wall clock, so that a restarted
    /// agent wins over its previous life.
    pub bump: Option<u32>,
    /// Our metadata; its `public_key` must be `keys`' X25519 public key.
    pub metadata: Metadata,
    /// Gossip keys.
    pub keyring: Keyring,
    /// Our node keys (X25519 static secret and the Ed25519 key derived from it).
    pub keys: Arc<NodeKeys>,
    /// Nodes to join through, by node ID and gossip address (retried every 2 s until some
    /// member answers).
    pub seeds: Vec<(NodeId, SocketAddr)>,
    /// The directory: every node that may take part, with its public keys (the manager's
    /// node list). Empty by default: set it, or nobody is heard.
    pub admission: Admission,
    /// Protocol tuning (default [`membership::Config::lan`] for 100 nodes).
    pub gossip: membership::Config,
    /// Longest a push-pull exchange may take.
    pub pushpull_timeout: Duration,
    /// Most push-pull exchanges at once, in each direction. An incoming exchange takes its
    /// slot only once its first frame opened (its sender is authenticated).
    pub pushpull_concurrency: usize,
    /// Most incoming TCP connections not yet authenticated from one source IP.
    pub unauthenticated_per_ip: usize,
    /// Most incoming TCP connections not yet authenticated in all.
    pub unauthenticated_total: usize,
    /// How long an incoming connection may take to deliver its first frame.
    pub first_frame_timeout: Duration,
    /// Where the driver's rare log lines go (refused connections, at most one line per
    /// [`REFUSAL_LOG_PERIOD`]); default: standard error. The control plane may pass its own.
    pub log: fn(&str),
}

/// Refused TCP connections are logged at most once per this period, with their counts.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

fn log_stderr(line: &str) {
    eprintln!("shoal-gossip: {line}");
}

impl Config {
    /// A configuration with the defaults. `metadata.public_key` must be `keys`' X25519
    /// public key; set `admission` before starting.
    pub fn new(
        id: NodeId,
        advertise: SocketAddr,
        metadata: Metadata,
        keyring: Keyring,
        keys: NodeKeys,
    ) -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise,
            id,
            bump: None,
            metadata,
            keyring,
            keys: Arc::new(keys),
            seeds: Vec::new(),
            admission: Admission::default(),
            gossip: membership::Config::lan(100),
            pushpull_timeout: Duration::from_secs(10),
            pushpull_concurrency: 4,
            unauthenticated_per_ip: 2,
            unauthenticated_total: 32,
            first_frame_timeout: Duration::from_secs(5),
            log: log_stderr,
        }
    }
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The UDP or TCP socket could not be bound.
    #[error("cannot listen for gossip on {addr}: {source}; pick another --listen address or stop what holds the port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The core refused the setup.
    #[error(transparent)]
    Setup(#[from] ApiError),
    /// The OS random source failed.
    #[error("cannot read OS randomness for the gossip nonces: {0}")]
    Random(String),
}

/// Why a handle call failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The driver task has stopped.
    #[error("the gossip driver has stopped; restart the agent")]
    Stopped,
    /// The core refused the call; nothing changed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

enum Command {
    SetAdmission(Admission),
    SetKeys(Keyring),
    UpdateMetadata(Metadata, oneshot::Sender<Result<(), ApiError>>),
    SetEntry(
        Vec<u8>,
        u64,
        Option<Vec<u8>>,
        oneshot::Sender<Result<(), ApiError>>,
    ),
    Entries(oneshot::Sender<Vec<EntryInfo>>),
    Join(Vec<(NodeId, SocketAddr)>),
    Members(oneshot::Sender<Vec<MemberInfo>>),
    Stats(oneshot::Sender<Stats>),
    Identity(oneshot::Sender<Identity>),
    Leave(oneshot::Sender<Result<(), ApiError>>),
    Shutdown,
}

enum Inbound {
    /// A peer's first frame arrived on an accepted connection; answer on the sender (with
    /// the exchange slot the connection holds while it writes), or drop it to close.
    Request(Vec<u8>, oneshot::Sender<(Vec<u8>, OwnedSemaphorePermit)>),
    /// The answer to an exchange we started with this node.
    Reply(Vec<u8>, NodeId),
}

/// Controls a running driver. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
    local: SocketAddr,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("local", &self.local)
            .finish()
    }
}

impl Handle {
    fn send(&self, c: Command) -> Result<(), HandleError> {
        self.tx.send(c).map_err(|_| HandleError::Stopped)
    }

    /// The address the sockets are bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Replaces the directory (node ID and public keys of every node that may take part):
    /// nodes not in it are dropped and counted; members removed from it are declared down;
    /// what was accepted under keys that changed is forgotten.
    pub fn set_admission(&self, list: Vec<(NodeId, PublicKeys)>) -> Result<(), HandleError> {
        self.send(Command::SetAdmission(Admission::only(list)))
    }

    /// Replaces the gossip keys (rotation: current plus previous).
    pub fn set_keys(&self, keyring: Keyring) -> Result<(), HandleError> {
        self.send(Command::SetKeys(keyring))
    }

    /// Changes our metadata and spreads it.
    pub async fn update_metadata(&self, meta: Metadata) -> Result<(), HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::UpdateMetadata(meta, tx))?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// Sets this node's entry `key` to `value` at `version` (`None` deletes it) and spreads
    /// it at once; see [`Membership::set_entry`] (the version must be higher than the one
    /// held for `key`, and must never go back across restarts). Every node reports the
    /// change as [`Event::Entry`], this one included.
    pub async fn set_entry(
        &self,
        key: Vec<u8>,
        version: u64,
        value: Option<Vec<u8>>,
    ) -> Result<(), HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetEntry(key, version, value, tx))?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// Every live entry known (every author's, ours included; tombstones left out), in
    /// (author, key) order.
    pub async fn entries(&self) -> Result<Vec<EntryInfo>, HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Entries(tx))?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Joins (again) through these seeds (node ID and gossip address).
    pub fn join(&self, seeds: Vec<(NodeId, SocketAddr)>) -> Result<(), HandleError> {
        self.send(Command::Join(seeds))
    }

    /// Every member known, ourselves excluded.
    pub async fn members(&self) -> Result<Vec<MemberInfo>, HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Members(tx))?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Counters.
    pub async fn stats(&self) -> Result<Stats, HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx))?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Our current identity (the bump changes on rejoin).
    pub async fn identity(&self) -> Result<Identity, HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Identity(tx))?;
        rx.await.map_err(|_| HandleError::Stopped)
    }

    /// Leaves the cluster on purpose (others see [`Event::Left`]); the driver keeps running
    /// until [`Handle::shutdown`].
    pub async fn leave(&self) -> Result<(), HandleError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Leave(tx))?;
        Ok(rx.await.map_err(|_| HandleError::Stopped)??)
    }

    /// Stops the driver and waits for it (without leaving: call [`Handle::leave`] first for
    /// a graceful exit).
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// Two random words: the nonce salt and the core's seed.
fn os_random() -> Result<(u64, u64), StartError> {
    use rand_0_10::rngs::SysRng;
    use rand_0_10::TryRng;
    let mut rng = SysRng;
    let mut word = || {
        rng.try_next_u64()
            .map_err(|e| StartError::Random(e.to_string()))
    };
    Ok((word()?, word()?))
}

/// The bump of a run started `since_epoch` after the Unix epoch: the time in tenths of a
/// second, modulo 2^32. It wraps every 13.6 years (last on 2024-06-10, next on 2038-01-19), on
/// purpose: bumps ([`Identity::newer_than`](crate::Identity::newer_than)) and the record
/// sequence numbers built on them ([`seq_after`](crate::codec::seq_after)) are compared with
/// serial number arithmetic (RFC 1982), so a run started after the wrap is still the later
/// one, as long as the runs of a node that meet are less than 6.8 years (2^31 tenths) apart.
pub fn wall_bump(since_epoch: Duration) -> u32 {
    let tenths = since_epoch.as_millis() / 100;
    (tenths % (1 << 32)) as u32
}

/// The wall clock in milliseconds since the Unix epoch (0 if it is before 1970).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Binds the sockets, starts the driver task and joins the seeds.
pub async fn start(cfg: Config) -> Result<(Handle, mpsc::UnboundedReceiver<Event>), StartError> {
    let udp = UdpSocket::bind(cfg.bind)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.bind,
            source,
        })?;
    let local = udp.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.bind,
        source,
    })?;
    // TCP on the same port as UDP (matters when binding port 0).
    let tcp = TcpListener::bind(local)
        .await
        .map_err(|source| StartError::Bind {
            addr: local,
            source,
        })?;
    let bump = cfg.bump.unwrap_or_else(|| {
        wall_bump(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO),
        )
    });
    let (salt, seed) = os_random()?;
    // The envelope epoch: rises with every start, so peers refuse an earlier run's datagrams.
    let epoch = wall_ms();
    let now = Instant::now();
    let crypto: Arc<dyn Crypto> = cfg.keys.clone();
    let mut core = Membership::new(
        Setup {
            config: cfg.gossip.clone(),
            identity: Identity::new(cfg.id, cfg.advertise, bump),
            metadata: cfg.metadata.clone(),
            keyring: cfg.keyring.clone(),
            admission: cfg.admission.clone(),
            crypto,
            seed,
            epoch,
            salt,
            wall_ms: epoch,
        },
        now,
    )?;
    if !cfg.seeds.is_empty() {
        core.join(&cfg.seeds, now);
    }
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let driver = Driver {
        core,
        udp: Arc::new(udp),
        tcp,
        source_ip: Some(cfg.bind.ip()).filter(|ip| !ip.is_unspecified()),
        seeds: cfg.seeds.clone(),
        ev_tx,
        timeout: cfg.pushpull_timeout,
        first_frame_timeout: cfg.first_frame_timeout,
        out_slots: Arc::new(Semaphore::new(cfg.pushpull_concurrency.max(1))),
        in_slots: Arc::new(Semaphore::new(cfg.pushpull_concurrency.max(1))),
        gate: Arc::new(Gate {
            per_ip: cfg.unauthenticated_per_ip.max(1),
            total: cfg.unauthenticated_total.max(1),
            open: Mutex::new(Unauthenticated::default()),
            counts: TcpCounts::default(),
        }),
        log: cfg.log,
        logged: TcpTotals::default(),
        logged_at: None,
    };
    let task = tokio::spawn(driver.run(cmd_rx));
    Ok((
        Handle {
            tx: cmd_tx,
            task: Arc::new(tokio::sync::Mutex::new(Some(task))),
            local,
        },
        ev_rx,
    ))
}

/// Incoming connections not yet authenticated, per source IP and in all.
#[derive(Default)]
struct Unauthenticated {
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// Counters of refused or timed-out TCP connections (updated by connection tasks).
#[derive(Default)]
struct TcpCounts {
    per_ip: AtomicU64,
    total: AtomicU64,
    timeout: AtomicU64,
    busy: AtomicU64,
}

/// A snapshot of [`TcpCounts`].
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct TcpTotals {
    per_ip: u64,
    total: u64,
    timeout: u64,
    busy: u64,
}

impl TcpCounts {
    fn totals(&self) -> TcpTotals {
        TcpTotals {
            per_ip: self.per_ip.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            timeout: self.timeout.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
        }
    }
}

/// The caps on connections not yet authenticated (see [`Config::unauthenticated_per_ip`]).
struct Gate {
    per_ip: usize,
    total: usize,
    open: Mutex<Unauthenticated>,
    counts: TcpCounts,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Unauthenticated> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `ip`, or `None` (counted) when a cap is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<GatePass> {
        let mut open = self.lock();
        if open.total >= self.total {
            self.counts.total.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = open.per_ip.entry(ip).or_insert(0);
        if *n >= self.per_ip {
            self.counts.per_ip.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        open.total += 1;
        Some(GatePass {
            gate: Arc::clone(self),
            ip,
        })
    }
}

/// A connection's place among those not yet authenticated; given back on drop.
struct GatePass {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for GatePass {
    fn drop(&mut self) {
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

struct Driver {
    core: Membership,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    /// Our IP for outgoing connections (the bind IP when it is not unspecified).
    source_ip: Option<IpAddr>,
    seeds: Vec<(NodeId, SocketAddr)>,
    ev_tx: mpsc::UnboundedSender<Event>,
    timeout: Duration,
    first_frame_timeout: Duration,
    out_slots: Arc<Semaphore>,
    in_slots: Arc<Semaphore>,
    gate: Arc<Gate>,
    log: fn(&str),
    /// Refusal counts at the last log line, and when it was written.
    logged: TcpTotals,
    logged_at: Option<Instant>,
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    if len > MAX_PUSHPULL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "push-pull frame too large",
        ));
    }
    // Grow as bytes arrive: a peer that announces 16 MiB and sends nothing costs nothing.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *s).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

async fn write_frame(s: &mut TcpStream, frame: &[u8]) -> io::Result<()> {
    s.write_u32(frame.len() as u32).await?;
    s.write_all(frame).await?;
    s.flush().await
}

impl Driver {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 65536];
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Inbound>();
        let mut rejoin = tokio::time::interval(Duration::from_secs(2));
        rejoin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.flush(&in_tx).await;
            let deadline = self
                .core
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => {
                    if let Ok((n, _from)) = r {
                        let now = Instant::now();
                        self.core.set_wall_clock(wall_ms(), now);
                        let _ = self.core.handle_datagram(&buf[..n], now);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.core.handle_timeout(Instant::now());
                }
                a = self.tcp.accept() => {
                    if let Ok((stream, from)) = a {
                        self.accept(stream, from.ip(), in_tx.clone());
                    }
                }
                Some(m) = in_rx.recv() => {
                    let now = Instant::now();
                    self.core.set_wall_clock(wall_ms(), now);
                    match m {
                        Inbound::Request(frame, reply) => self.answer(&frame, reply, now),
                        Inbound::Reply(frame, peer) => {
                            let _ = self.core.handle_pushpull(&frame, Some(peer), now);
                        }
                    }
                }
                _ = rejoin.tick() => {
                    if self.core.num_active() == 0 && !self.seeds.is_empty() {
                        let seeds = self.seeds.clone();
                        self.core.join(&seeds, Instant::now());
                    }
                    self.log_refusals();
                }
                c = cmds.recv() => {
                    let Some(c) = c else { return };
                    if !self.command(c) {
                        self.flush(&in_tx).await;
                        return;
                    }
                }
            }
        }
    }

    /// An incoming exchange's first frame: open it (authenticating its sender), then take
    /// an exchange slot, apply it and answer; otherwise drop `reply`, which closes the
    /// connection.
    fn answer(
        &mut self,
        frame: &[u8],
        reply: oneshot::Sender<(Vec<u8>, OwnedSemaphorePermit)>,
        now: Instant,
    ) {
        let Ok(opened) = self.core.open_pushpull(frame, now) else {
            return;
        };
        let Ok(permit) = Arc::clone(&self.in_slots).try_acquire_owned() else {
            self.gate.counts.busy.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(sender) = self.core.apply_pushpull(opened, None, now) else {
            return;
        };
        if let Ok(ours) = self.core.pushpull_frame(sender) {
            let _ = reply.send((ours, permit));
        }
    }

    /// Writes one line about refused connections, at most once per
    /// [`REFUSAL_LOG_PERIOD`], when there were any since the last line.
    fn log_refusals(&mut self) {
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_PERIOD)
        {
            return;
        }
        let t = self.gate.counts.totals();
        if t == self.logged {
            return;
        }
        let d = TcpTotals {
            per_ip: t.per_ip - self.logged.per_ip,
            total: t.total - self.logged.total,
            timeout: t.timeout - self.logged.timeout,
            busy: t.busy - self.logged.busy,
        };
        (self.log)(&format!(
            "refused {} push-pull connections since {}: {} over the per-address cap, {} over the total cap of connections not yet authenticated, {} without a first frame in time, {} with every exchange slot busy",
            d.per_ip + d.total + d.timeout + d.busy,
            match self.logged_at {
                Some(t) => format!("{} s ago", now.saturating_duration_since(t).as_secs()),
                None => "start".into(),
            },
            d.per_ip,
            d.total,
            d.timeout,
            d.busy
        ));
        self.logged = t;
        self.logged_at = Some(now);
    }

    /// Returns false on shutdown.
    fn command(&mut self, c: Command) -> bool {
        let now = Instant::now();
        match c {
            Command::SetAdmission(a) => self.core.set_admission(a, now),
            Command::SetKeys(k) => self.core.set_keys(k),
            Command::UpdateMetadata(m, tx) => {
                let _ = tx.send(self.core.update_metadata(m, now));
            }
            Command::SetEntry(key, version, value, tx) => {
                let _ = tx.send(self.core.set_entry(key, version, value, now));
            }
            Command::Entries(tx) => {
                let _ = tx.send(self.core.entries());
            }
            Command::Join(seeds) => {
                self.core.join(&seeds, now);
                self.seeds = seeds;
            }
            Command::Members(tx) => {
                let _ = tx.send(self.core.members());
            }
            Command::Stats(tx) => {
                let mut s = self.core.stats();
                let t = self.gate.counts.totals();
                s.tcp_refused_per_ip = t.per_ip;
                s.tcp_refused_global = t.total;
                s.tcp_first_frame_timeout = t.timeout;
                s.tcp_refused_busy = t.busy;
                let _ = tx.send(s);
            }
            Command::Identity(tx) => {
                let _ = tx.send(*self.core.identity());
            }
            Command::Leave(tx) => {
                self.seeds.clear();
                let _ = tx.send(self.core.leave(now));
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// Sends queued datagrams, starts queued push-pulls, forwards events.
    async fn flush(&mut self, in_tx: &mpsc::UnboundedSender<Inbound>) {
        while let Some(t) = self.core.poll_transmit() {
            // UDP send errors (unreachable peer, full buffer) are like loss: SWIM copes.
            let _ = self.udp.send_to(&t.data, t.dst).await;
        }
        while let Some(peer) = self.core.poll_pushpull() {
            let Ok(permit) = Arc::clone(&self.out_slots).try_acquire_owned() else {
                continue; // enough exchanges running; the next period tries again
            };
            let Ok(frame) = self.core.pushpull_frame(peer.id) else {
                continue;
            };
            let tx = in_tx.clone();
            let timeout = self.timeout;
            let source = self.source_ip;
            tokio::spawn(async move {
                let _permit = permit;
                let exchange = async {
                    let mut s = connect(peer.addr, source).await?;
                    write_frame(&mut s, &frame).await?;
                    read_frame(&mut s).await
                };
                if let Ok(Ok(reply)) = tokio::time::timeout(timeout, exchange).await {
                    let _ = tx.send(Inbound::Reply(reply, peer.id));
                }
            });
        }
        while let Some(e) = self.core.poll_event() {
            let _ = self.ev_tx.send(e);
        }
    }

    /// An incoming connection: it gets a place among the connections not yet authenticated
    /// (or is closed at once, counted), then must deliver its first frame within
    /// `first_frame_timeout`. Its place is given back once the driver has opened the frame.
    fn accept(&mut self, mut stream: TcpStream, ip: IpAddr, tx: mpsc::UnboundedSender<Inbound>) {
        let Some(pass) = self.gate.admit(ip) else {
            self.log_refusals();
            return; // dropped: closes the connection
        };
        let gate = Arc::clone(&self.gate);
        let first = self.first_frame_timeout;
        let timeout = self.timeout;
        tokio::spawn(async move {
            let frame = match tokio::time::timeout(first, read_frame(&mut stream)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(_)) => return,
                Err(_) => {
                    gate.counts.timeout.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let (rtx, rrx) = oneshot::channel();
            if tx.send(Inbound::Request(frame, rtx)).is_err() {
                return;
            }
            // Resolved (or dropped) once the frame was opened: no longer unauthenticated.
            let answer = rrx.await;
            drop(pass);
            let Ok((ours, permit)) = answer else {
                return;
            };
            let _permit = permit;
            let _ = tokio::time::timeout(timeout, write_frame(&mut stream, &ours)).await;
        });
    }
}

/// Connects to `addr`, from `source` when given (so peers see our gossip address).
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::seq_after;

    /// At the wrap (2038-01-19 03:14:08 UTC, 5 * 2^32 tenths) the bump starts over from 0,
    /// and the run after it is still the later one, by its bump and by its records.
    #[test]
    fn a_bump_after_the_wrap_is_later() {
        let wrap = Duration::from_secs(5 * (1 << 32) / 10);
        assert_eq!(wrap.as_secs(), 2_147_483_648);
        let before = wall_bump(wrap - Duration::from_millis(100));
        let after = wall_bump(wrap + Duration::from_millis(100));
        assert_eq!((before, wall_bump(wrap), after), (u32::MAX, 0, 1));
        let at = |bump| {
            Identity::new(
                NodeId::from_index(1),
                "198.18.0.1:7946".parse().unwrap(),
                bump,
            )
        };
        assert!(at(after).newer_than(&at(before)));
        assert!(!at(before).newer_than(&at(after)));
        // A run's first record has its bump in the upper half; the run before made more.
        let last_before = (u64::from(before) << 32) + 1_000;
        assert!(seq_after(u64::from(after) << 32, last_before));
        assert!(!seq_after(last_before, u64::from(after) << 32));
        // Today's bumps: 2024-06-10 was the last wrap.
        assert_eq!(wall_bump(Duration::from_secs(1_717_986_919)), 6);
    }
}
