//! The tokio driver: one task owns the [`Membership`] core and runs UDP and TCP on one
//! address (default `0.0.0.0:7946`). Events go out on an unbounded tokio mpsc channel (the
//! protocol loop must never wait on a slow consumer); the [`Handle`] sends commands in.
//!
//! Push-pull runs over TCP, one exchange per connection: the side that connects writes its
//! sealed state as `len u32 | frame`, the other answers with its own. Each exchange is bounded
//! in size ([`MAX_PUSHPULL_FRAME`]), in time ([`Config::pushpull_timeout`]) and in number
//! ([`Config::pushpull_concurrency`] in each direction; extra ones are refused).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::identity::{Identity, Metadata, NodeId};
use crate::membership::{
    self, Admission, ApiError, Event, MemberInfo, Membership, Setup, Stats, MAX_PUSHPULL_FRAME,
};
use crate::seal::Keyring;

/// Everything the driver needs. Build with [`Config::new`], then adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen, UDP and TCP (default `0.0.0.0:7946`).
    pub bind: SocketAddr,
    /// The address others reach us at (goes into our identity).
    pub advertise: SocketAddr,
    /// Our node ID.
    pub id: NodeId,
    /// Identity generation; `None` takes the wall clock in tenths of a second so that a
    /// restarted agent always wins over its previous life.
    pub bump: Option<u32>,
    /// Our metadata.
    pub metadata: Metadata,
    /// Gossip keys.
    pub keyring: Keyring,
    /// Addresses to join through (retried every 2 s until some member answers).
    pub seeds: Vec<SocketAddr>,
    /// Who may take part.
    pub admission: Admission,
    /// Protocol tuning (default [`membership::Config::lan`] for 100 nodes).
    pub gossip: membership::Config,
    /// Longest a push-pull exchange may take.
    pub pushpull_timeout: Duration,
    /// Most push-pull exchanges at once, in each direction.
    pub pushpull_concurrency: usize,
}

impl Config {
    /// A configuration with the defaults.
    pub fn new(id: NodeId, advertise: SocketAddr, metadata: Metadata, keyring: Keyring) -> Self {
        Config {
            bind: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise,
            id,
            bump: None,
            metadata,
            keyring,
            seeds: Vec::new(),
            admission: Admission::Open,
            gossip: membership::Config::lan(100),
            pushpull_timeout: Duration::from_secs(10),
            pushpull_concurrency: 4,
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
    Join(Vec<SocketAddr>),
    Members(oneshot::Sender<Vec<MemberInfo>>),
    Stats(oneshot::Sender<Stats>),
    Identity(oneshot::Sender<Identity>),
    Leave(oneshot::Sender<Result<(), ApiError>>),
    Shutdown,
}

enum Inbound {
    /// A peer's state arrived on an accepted connection; answer on the sender.
    Request(Vec<u8>, oneshot::Sender<Vec<u8>>),
    /// The answer to an exchange we started.
    Reply(Vec<u8>),
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

    /// Replaces the admission list: members not on it are dropped and counted; members
    /// removed from it are declared down.
    pub fn set_admission(&self, list: Vec<(NodeId, [u8; 32])>) -> Result<(), HandleError> {
        self.send(Command::SetAdmission(Admission::only(list)))
    }

    /// Lets anyone with the gossip key in (bootstrap, tests).
    pub fn set_admission_open(&self) -> Result<(), HandleError> {
        self.send(Command::SetAdmission(Admission::Open))
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

    /// Joins (again) through these seeds.
    pub fn join(&self, seeds: Vec<SocketAddr>) -> Result<(), HandleError> {
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
        let tenths = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() / 100)
            .unwrap_or(0);
        tenths as u32
    });
    let (salt, seed) = os_random()?;
    // The envelope epoch: rises with every start, so peers refuse an earlier run's datagrams.
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let now = Instant::now();
    let mut core = Membership::new(
        Setup {
            config: cfg.gossip.clone(),
            identity: Identity::new(cfg.id, cfg.advertise, bump),
            metadata: cfg.metadata.clone(),
            keyring: cfg.keyring.clone(),
            admission: cfg.admission.clone(),
            seed,
            epoch,
            salt,
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
        seeds: cfg.seeds.clone(),
        ev_tx,
        timeout: cfg.pushpull_timeout,
        out_slots: Arc::new(Semaphore::new(cfg.pushpull_concurrency.max(1))),
        in_slots: Arc::new(Semaphore::new(cfg.pushpull_concurrency.max(1))),
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

struct Driver {
    core: Membership,
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    seeds: Vec<SocketAddr>,
    ev_tx: mpsc::UnboundedSender<Event>,
    timeout: Duration,
    out_slots: Arc<Semaphore>,
    in_slots: Arc<Semaphore>,
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    if len > MAX_PUSHPULL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "push-pull frame too large",
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
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
                        let _ = self.core.handle_datagram(&buf[..n], Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.core.handle_timeout(Instant::now());
                }
                a = self.tcp.accept() => {
                    if let Ok((stream, _)) = a {
                        self.accept(stream, in_tx.clone());
                    }
                }
                Some(m) = in_rx.recv() => {
                    let now = Instant::now();
                    match m {
                        Inbound::Request(frame, reply) => {
                            if self.core.handle_pushpull(&frame, now).is_ok() {
                                if let Ok(ours) = self.core.pushpull_frame() {
                                    let _ = reply.send(ours);
                                }
                            }
                        }
                        Inbound::Reply(frame) => {
                            let _ = self.core.handle_pushpull(&frame, now);
                        }
                    }
                }
                _ = rejoin.tick() => {
                    if self.core.num_active() == 0 && !self.seeds.is_empty() {
                        let seeds = self.seeds.clone();
                        self.core.join(&seeds, Instant::now());
                    }
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

    /// Returns false on shutdown.
    fn command(&mut self, c: Command) -> bool {
        let now = Instant::now();
        match c {
            Command::SetAdmission(a) => self.core.set_admission(a, now),
            Command::SetKeys(k) => self.core.set_keys(k),
            Command::UpdateMetadata(m, tx) => {
                let _ = tx.send(self.core.update_metadata(m, now));
            }
            Command::Join(seeds) => {
                self.core.join(&seeds, now);
                self.seeds = seeds;
            }
            Command::Members(tx) => {
                let _ = tx.send(self.core.members());
            }
            Command::Stats(tx) => {
                let _ = tx.send(self.core.stats());
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
            let Ok(frame) = self.core.pushpull_frame() else {
                continue;
            };
            let tx = in_tx.clone();
            let timeout = self.timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let exchange = async {
                    let mut s = TcpStream::connect(peer).await?;
                    write_frame(&mut s, &frame).await?;
                    read_frame(&mut s).await
                };
                if let Ok(Ok(reply)) = tokio::time::timeout(timeout, exchange).await {
                    let _ = tx.send(Inbound::Reply(reply));
                }
            });
        }
        while let Some(e) = self.core.poll_event() {
            let _ = self.ev_tx.send(e);
        }
    }

    fn accept(&mut self, mut stream: TcpStream, tx: mpsc::UnboundedSender<Inbound>) {
        let Ok(permit) = Arc::clone(&self.in_slots).try_acquire_owned() else {
            return; // dropped: the peer retries later
        };
        let timeout = self.timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let frame = read_frame(&mut stream).await?;
                let (rtx, rrx) = oneshot::channel();
                tx.send(Inbound::Request(frame, rtx))
                    .map_err(|_| io::Error::other("driver stopped"))?;
                let ours = rrx.await.map_err(|_| io::Error::other("frame refused"))?;
                write_frame(&mut stream, &ours).await
            };
            let _ = tokio::time::timeout(timeout, exchange).await;
        });
    }
}
