//! The agent daemon: the Unix socket the CLI talks to, and this node's part in the swarm.
//!
//! On the leader it runs the [`Manager`] and its API on 2377. On every other node it keeps a
//! watch stream to the leader over mTLS (node certificate issued at join): each change of
//! the node list or the keys arrives as a new cluster view and is kept in the store, so a
//! restarted agent is the same node, with no token needed. Manager-only commands on a
//! promoted (non-leader) manager are forwarded to the leader over the same mTLS identity.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_vxlan::crypto::Incarnation;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::api::{
    hex, read_frame, write_frame, write_raw_frame, AdminRequest, CaptureFrame, CaptureRequest,
    FrameError, Info, InitRequest, JoinGrant, JoinRequest, LocalDataPath, ManagerReply,
    ManagerRequest, ManagerResponse, NetworkDetail, NetworkMember, NetworkSummary, PeerCounters,
    Reply, Request, Response,
};
use crate::datapath::DataPath;
use crate::gossip::Link;
use crate::id::NodeId;
use crate::manager::{
    join_addr, random_key, random_u128, unix_now, AdminError, Manager, StartError, NOT_MANAGER,
    PING_INTERVAL,
};
use crate::state::{ApplyError, Availability, Command, Init, Network, Node, Role, State};
use crate::store::{Current, Membership, Store, StoreError, Write};
use crate::tls::{
    cert_digest, generate_ca, join_client_config, manager_client_config, server_config,
    server_name, Issued, NodeKey, TlsError, Validity,
};
use crate::token::{Secret, Token};

/// The agent's version, reported as ENGINE VERSION.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The manager API port.
pub const DEFAULT_API_PORT: u16 = 2377;
/// The ingress network's VNI.
pub const INGRESS_VNI: u32 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const GOSSIP_RETRY: Duration = Duration::from_secs(5);

/// The message for a client command that needs a swarm, on a node that is in none.
pub const NOT_IN_SWARM: &str = "This node is not a swarm manager. Use \"shoal init\" or \"shoal join\" to connect this node to swarm and try again.";
/// The message for `init` or `join` on a node that is in a swarm.
pub const ALREADY_IN_SWARM: &str = "This node is already part of a swarm. Use \"shoal leave\" to leave this swarm and join another one.";

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// Unix socket path for the CLI.
    pub socket: PathBuf,
    /// This node's host name.
    pub hostname: String,
    /// Where gossip listens (default: the advertise address, port 7946).
    pub gossip_addr: Option<SocketAddr>,
    /// The data path's settings; `None` runs the control plane only. The incarnation is
    /// filled in at start.
    pub data_path: Option<crate::datapath::Params>,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The group whose members may use the socket besides root and the agent's user (as the
    /// docker group); `None`: nobody else.
    pub socket_group: Option<String>,
}

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Unix socket could not be made.
    #[error(
        "cannot listen on socket {path}: {source}; check --socket and that no other agent runs"
    )]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another shoal agent is already listening on {0}; stop it or pick another --socket")]
    SocketInUse(PathBuf),
    /// The socket could not be made private, or its group does not exist.
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    /// TLS material in the state dir is damaged.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The stored manager state is empty.
    #[error(transparent)]
    Manager(#[from] StartError),
    /// The manager API address is taken.
    #[error(
        "cannot listen on {addr} for metrics: {source}; free the port or change --metrics-addr"
    )]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The manager API's port could not be bound.
    #[error("cannot listen on {addr} for the manager API: {source}; free the port or change --listen-addr")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a call to the manager API failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection (refused, no route, timeout, TLS failure).
    #[error("could not reach the manager at {addr}: {why}; check the address and that the manager's port is open")]
    Unreachable {
        /// The manager's address.
        addr: SocketAddr,
        /// What failed.
        why: String,
    },
    /// Connected, but no answer in time.
    #[error("the manager at {0} did not answer in time")]
    Timeout(SocketAddr),
    /// Connected, but closed without an answer.
    #[error("the manager at {0} closed the connection without an answer")]
    Closed(SocketAddr),
    /// The manager refused, with its own one-line reason.
    #[error("{message} (manager {addr})")]
    Refused {
        /// The manager's address.
        addr: SocketAddr,
        /// Its reason.
        message: String,
    },
    /// A message could not be sent or read.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Our TLS identity is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// An answer that does not fit the request.
    #[error("the manager gave an unexpected answer: {0}")]
    Unexpected(String),
}

impl CallError {
    fn unreachable(addr: SocketAddr, why: impl std::fmt::Display) -> Self {
        Self::Unreachable {
            addr,
            why: why.to_string(),
        }
    }
}

/// Why `shoal init` failed. Nothing was kept.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The node is in a swarm.
    #[error("{ALREADY_IN_SWARM}")]
    AlreadyInSwarm,
    /// The ingress subnet is not usable.
    #[error(transparent)]
    Subnet(#[from] CidrError),
    /// A key rotation interval shorter than a rotation takes.
    #[error("--key-rotation-interval {0}s is too short: a rotation takes {min}s to reach every node and retire the old key, so the interval must be at least {min}s", min = crate::gossip::MIN_ROTATION_INTERVAL.as_secs())]
    RotationTooShort(u64),
    /// A certificate lifetime that is too short.
    #[error("--cert-expiry {0}s is too short: it must be at least {min}s", min = crate::tls::MIN_CERT_EXPIRY.as_secs())]
    CertExpiryTooShort(u64),
    /// The manager API address is taken.
    #[error(
        "cannot listen on {addr} for metrics: {source}; free the port or change --metrics-addr"
    )]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The manager API's port could not be bound.
    #[error("cannot listen on {addr} for the manager API: {source}; free the port or change --listen-addr")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA or the node certificate could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The state machine refused the new cluster.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// The new state could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manager did not start; the state was removed again.
    #[error("the manager did not start: {0}")]
    Start(Box<AgentError>),
}

/// Why `shoal join` failed. Nothing was kept.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The node is in a swarm.
    #[error("{ALREADY_IN_SWARM}")]
    AlreadyInSwarm,
    /// The token is malformed.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    /// The manager address does not parse or resolve.
    #[error("invalid manager address {0:?}: expected IP[:PORT] or HOST[:PORT]")]
    Address(String),
    /// The manager's certificate chain is not the CA in the token; the secret was not sent.
    #[error("the manager at {0} does not hold the swarm CA named in the token: the token is for another swarm, or the address is wrong; nothing was sent")]
    CaMismatch(SocketAddr),
    /// The server holds a certificate of the token's swarm, but not a manager's.
    #[error("the server at {0} presents a certificate of this swarm that is not a manager's (a worker's?): check the manager address; nothing was sent")]
    NotManager(SocketAddr),
    /// What came back is not a grant from the swarm's manager: a view under another CA, a
    /// certificate that does not name this node, or a server that is not the view's manager.
    #[error(
        "the server at {addr} sent a join grant that does not hold up ({why}); nothing was kept"
    )]
    BadGrant {
        /// The server.
        addr: SocketAddr,
        /// What is wrong with it.
        why: String,
    },
    /// The manager's X25519 key is not usable.
    #[error("the manager at {0} sent an unusable X25519 key; nothing was kept")]
    BadManagerKey(SocketAddr),
    /// Talking to the manager failed (including a refused secret).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The manager's node list does not hold the new node.
    #[error("the manager at {0} sent a node list without this node; nothing was kept")]
    NotInView(SocketAddr),
    /// The issued certificate does not work with our key.
    #[error("the manager sent an unusable certificate: {0}; nothing was kept")]
    BadCertificate(TlsError),
    /// Our key or the join TLS configuration could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The membership could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why `shoal leave` failed. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    /// Not in a swarm.
    #[error("This node is not part of a swarm")]
    NotInSwarm,
    /// The leader (the last manager) without `--force`.
    #[error("You are attempting to leave the swarm on a node that is participating as a manager. Removing the last manager erases all current state of the swarm. Use `--force` to ignore this message.")]
    LastManager,
    /// A promoted manager without `--force`.
    #[error("You are attempting to leave the swarm on a node that is participating as a manager. Demote it first with `shoal node demote`, or use `--force` to ignore this message.")]
    Manager,
    /// The state could not be cleared.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a manager-only command failed on this node.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    /// Not in a swarm.
    #[error("{NOT_IN_SWARM}")]
    NotInSwarm,
    /// A worker.
    #[error("{NOT_MANAGER}")]
    NotManager,
    /// The leader refused or failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// Forwarding to the leader failed.
    #[error(transparent)]
    Forward(#[from] CallError),
}

/// A background task with a stop signal.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[derive(Default)]
struct Roles {
    manager: Option<(Arc<Manager>, Running)>,
    watcher: Option<Running>,
    gossip: Option<Running>,
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    store: Arc<Store>,
    public_key: [u8; 32],
    membership: Arc<Current>,
    roles: tokio::sync::Mutex<Roles>,
    gossip: Arc<std::sync::Mutex<Option<shoal_gossip::driver::Handle>>>,
    node_secret: zeroize::Zeroizing<[u8; 32]>,
    datapath: DataPathSlot,
    faults: Arc<Faults>,
    gossip_keys: GossipKeysSlot,
}

/// The gossip keys live on this node (`None`: gossip not running).
type GossipKeysSlot = Arc<std::sync::Mutex<Option<crate::gossip::LiveKeys>>>;

/// The running data path, shared by the gossip loop (which starts and steers it) and the
/// requests that read it.
pub type DataPathSlot = Arc<std::sync::Mutex<Option<Arc<DataPath>>>>;

/// The data path in `slot`, if one runs.
fn running(slot: &DataPathSlot) -> Option<Arc<DataPath>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .finish()
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let access = crate::local::Access::new(config.socket_group.as_deref())?;
    let agent = Agent::start(config).await?;
    let listener = bind_socket(&agent.config.socket, &access).await?;
    info!(socket = %agent.config.socket.display(), "agent listening");
    let metrics = match agent.config.metrics_addr {
        None => None,
        Some(addr) => {
            let tcp = TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?;
            info!(%addr, "metrics at http://{addr}/metrics");
            let agent = agent.clone();
            let page = move || {
                let agent = agent.clone();
                async move { crate::metrics::render(&agent.metrics_snapshot().await) }
            };
            Some(tokio::spawn(crate::metrics::serve(tcp, page)))
        }
    };
    let drops = tokio::spawn(drop_summaries(agent.datapath.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    let allowed = match stream.peer_cred() {
                        Ok(c) => access.allows(
                            &crate::local::Peer {
                                uid: c.uid(),
                                gid: c.gid(),
                                pid: c.pid(),
                            },
                            crate::local::groups_of,
                        ),
                        Err(_) => false,
                    };
                    if allowed {
                        tokio::spawn(async move { agent.client(stream).await });
                    } else {
                        tokio::spawn(async move { agent.refuse(stream).await });
                    }
                }
                Err(e) => {
                    warn!("socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    info!("shutting down");
    drops.abort();
    if let Some(task) = metrics {
        task.abort();
    }
    agent.stop().await;
    let _ = std::fs::remove_file(&agent.config.socket);
    Ok(())
}

/// Logs one line per interval with the data path's drops by reason, when there were any
/// (never a line per packet).
async fn drop_summaries(slot: DataPathSlot) {
    let mut tick = tokio::time::interval(crate::datapath::DROP_SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Arc<DataPath>, shoal_vxlan::engine::DropCounts)> = None;
    loop {
        tick.tick().await;
        let dp = running(&slot);
        let Some(dp) = dp else {
            last = None;
            continue;
        };
        let now = dp.status().counters.drops;
        if let Some((prev_dp, prev)) = &last {
            if Arc::ptr_eq(prev_dp, &dp) {
                if let Some((total, reasons)) = crate::datapath::drop_summary(prev, &now) {
                    warn!(
                        total,
                        %reasons,
                        "data path dropped {total} packets in the last {}s",
                        crate::datapath::DROP_SUMMARY_INTERVAL.as_secs()
                    );
                }
            }
        }
        last = Some((dp, now));
    }
}

/// Binds the local socket, private from its first moment (see [`crate::local`]); a socket
/// left by an agent that died is replaced, one that answers is another agent's.
async fn bind_socket(
    path: &Path,
    access: &crate::local::Access,
) -> Result<UnixListener, AgentError> {
    if path.exists() && UnixStream::connect(path).await.is_ok() {
        return Err(AgentError::SocketInUse(path.to_owned()));
    }
    Ok(crate::local::bind(path, access)?)
}

impl Agent {
    /// Opens the state and resumes this node's role in its swarm, if any.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let store = Arc::new(Store::open(&config.state_dir)?);
        let node_secret = zeroize::Zeroizing::new(store.node_key(random_key())?);
        store.check_incarnation()?;
        let (public_key, _) = crate::join::public_keys(&node_secret);
        let membership = store.membership()?;
        let manager_state = store.manager()?;
        let agent = Arc::new(Self {
            config,
            store,
            public_key,
            membership: Current::new(membership.clone()),
            roles: tokio::sync::Mutex::new(Roles::default()),
            gossip: Arc::new(std::sync::Mutex::new(None)),
            node_secret,
            datapath: Arc::new(std::sync::Mutex::new(None)),
            faults: Arc::new(Faults::default()),
            gossip_keys: Arc::new(std::sync::Mutex::new(None)),
        });
        if let Some(m) = membership {
            let mut roles = agent.roles.lock().await;
            let incarnation = agent.fresh_incarnation()?;
            match (manager_state, m.listen_addr) {
                (Some(state), Some(listen)) => {
                    let listener =
                        TcpListener::bind(listen)
                            .await
                            .map_err(|source| AgentError::Bind {
                                addr: listen,
                                source,
                            })?;
                    let (manager, running) = agent.start_manager(&m, state, listener, listen)?;
                    roles.gossip = Some(agent.start_gossip(Some(manager.clone()), incarnation));
                    roles.manager = Some((manager, running));
                    info!(node = %m.node_id, %listen, "resumed as the swarm leader");
                }
                _ => {
                    roles.watcher = Some(agent.start_watcher());
                    roles.gossip = Some(agent.start_gossip(None, incarnation));
                    info!(node = %m.node_id, manager = %m.view.api_addr, "resumed swarm membership");
                }
            }
        }
        Ok(agent)
    }

    async fn stop(&self) {
        let mut roles = self.roles.lock().await;
        if let Some(running) = roles.gossip.take() {
            running.stop().await;
        }
        if let Some((_, running)) = roles.manager.take() {
            running.stop().await;
        }
        if let Some(running) = roles.watcher.take() {
            running.stop().await;
        }
    }

    /// A new incarnation for the next start of gossip and the data path, stored before it is
    /// used (see [`Store::renew_incarnation`]).
    fn fresh_incarnation(&self) -> Result<Incarnation, StoreError> {
        self.store
            .renew_incarnation(|| {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&random_key()[..16]);
                bytes
            })
            .map(Incarnation)
    }

    /// Starts gossip (and, with it, the data path) with `incarnation`, which must be fresh:
    /// from [`Agent::fresh_incarnation`], once per start.
    fn start_gossip(&self, manager: Option<Arc<Manager>>, incarnation: Incarnation) -> Running {
        let (stop, rx) = watch::channel(false);
        let data_path = self.config.data_path.clone().map(|mut params| {
            params.incarnation = incarnation;
            (params, *self.node_secret, self.datapath.clone())
        });
        let task = tokio::spawn(gossip_loop(
            self.gossip.clone(),
            self.gossip_keys.clone(),
            self.membership.clone(),
            self.node_secret.clone(),
            incarnation,
            self.config.gossip_addr,
            manager,
            data_path,
            rx,
        ));
        Running { stop, task }
    }

    fn start_manager(
        &self,
        m: &Membership,
        state: State,
        listener: TcpListener,
        listen: SocketAddr,
    ) -> Result<(Arc<Manager>, Running), AgentError> {
        let own = Issued {
            cert_der: m.cert_der.clone(),
            key_pem: m.key_pem.clone(),
        };
        let tls = server_config(&m.view.ca_cert_der, &own)?;
        let manager = Manager::new(
            m.node_id.clone(),
            listen,
            (own, m.cert_not_after),
            *self.node_secret,
            state,
            self.store.clone(),
            self.membership.clone(),
        )?;
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(manager.clone().serve(listener, TlsAcceptor::from(tls), rx));
        Ok((manager, Running { stop, task }))
    }

    fn start_watcher(&self) -> Running {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(watch_loop(
            self.store.clone(),
            self.membership.clone(),
            self.faults.clone(),
            rx,
        ));
        Running { stop, task }
    }

    /// A client the socket's access rules do not allow: one line, counted, closed.
    async fn refuse(self: Arc<Self>, mut stream: UnixStream) {
        let who = stream
            .peer_cred()
            .map(|c| format!("uid {} gid {}", c.uid(), c.gid()))
            .unwrap_or_else(|_| "a process whose credentials cannot be read".into());
        self.faults.report(
            &self.faults.socket_refusals,
            "refused a client on the local socket",
            &who,
        );
        // Read (and drop) the request first, so the client reads our answer rather than a
        // broken pipe.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            crate::api::read_frame_limited::<_, serde_json::Value>(&mut stream, 64 << 10),
        )
        .await;
        let response: Response = Err(format!(
            "permission denied: this agent's socket is for root, its own user{}; {who} is none of them",
            self.config
                .socket_group
                .as_deref()
                .map(|g| format!(" and the members of group {g}"))
                .unwrap_or_default()
        ));
        let _ = write_frame(&mut stream, &response).await;
    }

    async fn client(self: Arc<Self>, mut stream: UnixStream) {
        let request = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream)).await;
        let request: Request = match request {
            Err(_) => return,
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let response: Response = Err(format!("bad request: {e}"));
                let _ = write_frame(&mut stream, &response).await;
                return;
            }
        };
        debug!(?request, "client request");
        if let Request::Capture(req) = request {
            return self.capture(req, stream).await;
        }
        let response = self.handle(request).await;
        if let Err(e) = write_frame(&mut stream, &response).await {
            debug!("client went away: {e}");
        }
    }

    /// Handles one CLI request.
    pub async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Info => {
                let mut info = self.info();
                let handle = self
                    .gossip
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if let Some(handle) = handle {
                    if let Ok(stats) = handle.stats().await {
                        info.gossip = serde_json::to_value(stats).ok();
                    }
                }
                Ok(Reply::Info(info))
            }
            Request::Init(init) => self.init(init).await.map_err(|e| e.to_string()),
            Request::Join(join) => self.join(join).await.map_err(|e| e.to_string()),
            Request::Leave { force } => self.leave(force).await.map_err(|e| e.to_string()),
            Request::Admin(admin) => self.admin(admin).await.map_err(|e| e.to_string()),
            Request::NetworkLs => {
                let m = self
                    .membership
                    .get()
                    .ok_or_else(|| NOT_IN_SWARM.to_owned())?;
                let n = &m.view.ingress;
                Ok(Reply::Networks(vec![NetworkSummary {
                    name: n.name.clone(),
                    vni: n.vni,
                    subnet: n.subnet.clone(),
                    encrypted: n.encrypted,
                }]))
            }
            Request::NetworkInspect { network } => {
                let m = self.membership_on(&network)?;
                Ok(Reply::Network(Box::new(self.network_detail(&m))))
            }
            Request::Capture(_) => Err(
                "a capture streams packets: send it on its own connection (shoal capture)".into(),
            ),
        }
    }

    /// `shoal capture`: streams pcapng to the client until it goes away (or the data path
    /// stops). The data path never waits for the client: see [`crate::capture`].
    async fn capture(&self, req: CaptureRequest, mut stream: UnixStream) {
        let started = self.start_capture(&req);
        let (mut sub, mut encoder, header) = match started {
            Ok(s) => s,
            Err(line) => {
                let _ = write_frame(&mut stream, &Response::Err(line)).await;
                return;
            }
        };
        info!(network = %req.network, peer = ?req.peer, inner = req.inner, outer = req.outer, "capture started");
        let (mut rd, mut wr) = stream.into_split();
        let frame = CaptureFrame {
            lost: 0,
            pcapng: header,
        };
        if write_frame(&mut wr, &Response::Ok(Reply::Capturing))
            .await
            .is_err()
            || write_raw_frame(&mut wr, &frame.encode()).await.is_err()
        {
            return;
        }
        let mut probe = [0u8; 1];
        loop {
            let copy = tokio::select! {
                copy = sub.recv() => copy,
                // The client sends nothing more: a read returning means it went away.
                _ = tokio::io::AsyncReadExt::read(&mut rd, &mut probe) => break,
            };
            let Some(copy) = copy else { break };
            let frame = match encoder.packet(&copy, sub.lost()) {
                Ok(pcapng) => CaptureFrame {
                    lost: sub.lost(),
                    pcapng,
                },
                Err(e) => {
                    warn!("capture: {e}");
                    continue;
                }
            };
            if write_raw_frame(&mut wr, &frame.encode()).await.is_err() {
                break;
            }
        }
        info!(lost = sub.lost(), "capture ended");
    }

    #[allow(clippy::type_complexity)]
    fn start_capture(
        &self,
        req: &CaptureRequest,
    ) -> Result<
        (
            crate::capture::Subscription,
            crate::capture::Encoder,
            Vec<u8>,
        ),
        String,
    > {
        let m = self.membership_on(&req.network)?;
        let n = &m.view.ingress;
        if !req.inner && !req.outer {
            return Err("nothing to capture: ask for --inner, --outer or --both".into());
        }
        let dp = running(&self.datapath)
            .ok_or("the data path is not running on this node; see the agent's log")?;
        let me = m.view.node(&m.node_id).ok_or(NOT_IN_SWARM)?;
        let peer = match &req.peer {
            None => None,
            Some(name) => {
                let nodes = m.view.nodes.iter().filter(|n| !n.left);
                let id = crate::manager::resolve_among(
                    nodes.map(|n| (&n.id, n.hostname.as_str())),
                    name,
                )
                .map_err(|e| e.to_string())?;
                if id == m.node_id {
                    return Err(format!(
                        "{name} is this node: capture here shows its traffic with every peer; name another node with --peer"
                    ));
                }
                m.view.node(&id).map(|n| n.addr)
            }
        };
        let context = crate::capture::Context {
            network: n.name.clone(),
            vni: n.vni,
            interface: dp.status().interface,
            hostname: me.hostname.clone(),
            local: SocketAddr::new(me.addr, n.data_path_port),
            names: peer_names(&m.view),
        };
        let (encoder, header) =
            crate::capture::Encoder::start(context).map_err(|e| e.to_string())?;
        let sub = dp
            .capture(crate::capture::Filter {
                inner: req.inner,
                outer: req.outer,
                peer,
            })
            .map_err(|e| e.to_string())?;
        Ok((sub, encoder, header))
    }

    /// This node's membership, if it is in a swarm and `network` is one of its networks.
    fn membership_on(&self, network: &str) -> Result<Membership, String> {
        let m = self
            .membership
            .get()
            .ok_or_else(|| NOT_IN_SWARM.to_owned())?;
        if network != m.view.ingress.name {
            return Err(format!(
                "network {network} not found (shoal has one network, {})",
                m.view.ingress.name
            ));
        }
        Ok(m)
    }

    fn network_detail(&self, m: &Membership) -> NetworkDetail {
        let n = &m.view.ingress;
        let dp = running(&self.datapath);
        let local = dp.map(|dp| {
            let s = dp.status();
            LocalDataPath {
                interface: s.interface,
                address: s.address,
                mac: s.mac.to_string(),
                mtu: s.mtu,
                send_epoch: s.send_epoch,
                members: s.members,
                counters: (&s.counters).into(),
                peers: {
                    let names = peer_names(&m.view);
                    s.peers.iter().map(|p| peer_counters(&names, p)).collect()
                },
            }
        });
        NetworkDetail {
            name: n.name.clone(),
            driver: "overlay".into(),
            scope: "swarm".into(),
            vni: n.vni,
            subnet: n.subnet.clone(),
            encrypted: n.encrypted,
            data_path_port: n.data_path_port,
            members: m
                .view
                .nodes
                .iter()
                .filter(|node| !node.left)
                .map(|node| NetworkMember {
                    node_id: node.id.clone(),
                    hostname: node.hostname.clone(),
                    address: node.overlay_addr,
                    vtep: node.addr,
                })
                .collect(),
            vteps: n.vteps.clone(),
            local,
        }
    }

    fn info(&self) -> Info {
        let m = self.membership.get();
        Info {
            hostname: self.config.hostname.clone(),
            public_key: hex(&self.public_key),
            node_id: m.as_ref().map(|m| m.node_id.clone()),
            role: m.as_ref().map(Membership::role),
            manager_addr: m.as_ref().map(|m| m.view.api_addr),
            view_version: m.as_ref().map(|m| m.view.version),
            gossip_key_ids: m
                .as_ref()
                .map(|m| m.view.keys.gossip.iter().map(|k| k.id).collect())
                .unwrap_or_default(),
            data_path_epochs: m
                .as_ref()
                .map(|m| m.view.keys.data_path.iter().map(|k| k.id).collect())
                .unwrap_or_default(),
            cert_not_after: m.as_ref().map(|m| m.cert_not_after),
            gossip_keys_live: *self
                .gossip_keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            data_path_epochs_live: running(&self.datapath).and_then(|dp| {
                let s = dp.status();
                let sealing = s.send_epoch?;
                Some(crate::gossip::LiveKeys {
                    sealing,
                    also_open: s.epochs.into_iter().find(|e| *e != sealing),
                })
            }),
            gossip: None,
        }
    }

    async fn init(&self, req: InitRequest) -> Result<Reply, InitError> {
        let mut roles = self.roles.lock().await;
        if self.membership.get().is_some() {
            return Err(InitError::AlreadyInSwarm);
        }
        check_cidr(&req.ingress_subnet)?;
        if req.key_rotation_secs < crate::gossip::MIN_ROTATION_INTERVAL.as_secs() {
            return Err(InitError::RotationTooShort(req.key_rotation_secs));
        }
        if req.cert_expiry_secs < crate::tls::MIN_CERT_EXPIRY.as_secs() {
            return Err(InitError::CertExpiryTooShort(req.cert_expiry_secs));
        }
        // Before anything is made: a store that cannot renew the incarnation keeps nothing.
        let incarnation = self.fresh_incarnation()?;
        let listener =
            TcpListener::bind(req.listen_addr)
                .await
                .map_err(|source| InitError::Bind {
                    addr: req.listen_addr,
                    source,
                })?;
        let node_id = NodeId::from_random(random_u128());
        let ca = generate_ca()?;
        let now = unix_now();
        let validity = Validity::from_now(now, Duration::from_secs(req.cert_expiry_secs));
        let own_key = NodeKey::generate()?;
        let own = Issued {
            cert_der: crate::tls::sign_node_cert(
                &ca,
                &node_id,
                Role::Manager,
                &own_key.public_raw(),
                validity,
            )?,
            key_pem: own_key.private_pem(),
        };
        let (_, signing_key) = crate::join::public_keys(&self.node_secret);
        let api_addr = join_addr(req.advertise_addr, req.listen_addr);
        let mut state = State::default();
        state.apply(Command::Init(Box::new(Init {
            ca,
            leader: Node {
                id: node_id.clone(),
                hostname: self.config.hostname.clone(),
                addr: req.advertise_addr,
                role: Role::Manager,
                availability: Availability::Active,
                public_key: self.public_key,
                signing_key,
                cert_digest: cert_digest(&own.cert_der),
                cert_der: own.cert_der.clone(),
                cert_not_after: validity.not_after,
                cert_public_key: own_key.public_raw(),
                previous_cert_digest: None,
                engine_version: VERSION.into(),
                left: false,
                overlay_addr: None,
                joined_at: now,
            },
            api_addr,
            worker_secret: Secret::from_random(random_u128()).as_str().into(),
            manager_secret: Secret::from_random(random_u128()).as_str().into(),
            gossip_key: random_key(),
            data_path_key: random_key(),
            key_interval_secs: req.key_rotation_secs,
            cert_expiry_secs: req.cert_expiry_secs,
            ingress: Network {
                name: "ingress".into(),
                vni: INGRESS_VNI,
                subnet: req.ingress_subnet.clone(),
                encrypted: req.encrypt,
                data_path_port: req.data_path_port,
                vteps: Vec::new(),
            },
            at: now,
        })))?;
        let (Some(view), Some(cluster)) = (state.view(), state.cluster()) else {
            return Err(InitError::Refused(ApplyError::NotInitialized));
        };
        let worker_token = format!(
            "SWMTKN-1-{}-{}",
            crate::token::CaDigest::of(&cluster.ca.cert_der),
            cluster.worker_secret
        );
        let membership = Membership {
            node_id: node_id.clone(),
            cert_der: own.cert_der.clone(),
            key_pem: own.key_pem.clone(),
            cert_not_after: validity.not_after,
            view,
            listen_addr: Some(req.listen_addr),
        };
        self.store
            .write(&[Write::Manager(&state), Write::Membership(&membership)])?;
        let started = self.start_manager(&membership, state, listener, req.listen_addr);
        self.membership.set(Some(membership));
        match started {
            Ok((manager, running)) => {
                roles.gossip = Some(self.start_gossip(Some(manager.clone()), incarnation));
                roles.manager = Some((manager, running));
            }
            Err(e) => {
                // Undo: nothing of a half-started swarm stays.
                self.membership.set(None);
                let _ = self
                    .store
                    .write(&[Write::ClearManager, Write::ClearMembership]);
                return Err(InitError::Start(Box::new(e)));
            }
        }
        info!(node = %node_id, %api_addr, "swarm initialized");
        Ok(Reply::Initialized {
            node_id,
            worker_token,
            join_addr: api_addr,
        })
    }

    async fn join(&self, req: JoinRequest) -> Result<Reply, JoinError> {
        let mut roles = self.roles.lock().await;
        if self.membership.get().is_some() {
            return Err(JoinError::AlreadyInSwarm);
        }
        let token = Token::parse(&req.token)?;
        let manager = resolve_manager(&req.manager).await?;
        // Before the manager is asked: a store that cannot renew the incarnation keeps nothing.
        let incarnation = self.fresh_incarnation()?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(manager))
            .await
            .map_err(|_| CallError::unreachable(manager, "no answer"))?
            .map_err(|e| CallError::unreachable(manager, e))?;
        let local = tcp
            .local_addr()
            .map_err(|e| CallError::unreachable(manager, e))?;
        let (config, pinned) = join_client_config(token.ca_digest)?;
        let mut tls = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            TlsConnector::from(config).connect(server_name(), tcp),
        )
        .await
        {
            Err(_) => {
                return Err(CallError::unreachable(manager, "the TLS handshake timed out").into())
            }
            Ok(Err(_)) if pinned.mismatched() => return Err(JoinError::CaMismatch(manager)),
            Ok(Err(_)) if pinned.not_manager() => return Err(JoinError::NotManager(manager)),
            Ok(Err(e)) => {
                return Err(CallError::unreachable(manager, format!("TLS failed: {e}")).into())
            }
            Ok(Ok(tls)) => tls,
        };
        // The proofs are bound to this TLS session: worth nothing on any other connection.
        let mut exporter = [0u8; crate::join::EXPORTER_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, crate::join::EXPORTER_LABEL, None)
            .map_err(|e| CallError::unreachable(manager, format!("TLS exporter: {e}")))?;
        let manager_public = match call(&mut tls, manager, &ManagerRequest::JoinHello).await? {
            ManagerReply::JoinChallenge { public_key } => public_key,
            other => return Err(CallError::Unexpected(format!("{other:?}")).into()),
        };
        // Our certificate key: the manager signs its public half; the private half stays here.
        let cert_key = NodeKey::generate()?;
        let (public_key, signing_key) = crate::join::public_keys(&self.node_secret);
        let claim = crate::join::Claim {
            secret_proof: crate::join::secret_proof(token.secret.as_str(), &exporter),
            hostname: self.config.hostname.clone(),
            addr: req.advertise_addr.unwrap_or(local.ip()),
            public_key,
            signing_key,
            cert_public_key: cert_key.public_raw(),
            engine_version: VERSION.into(),
            key_proof: [0; 32],
            signature: [0; 64],
        }
        .prove(&self.node_secret, &manager_public, &exporter)
        .ok_or(JoinError::BadManagerKey(manager))?;
        let grant = match call(&mut tls, manager, &ManagerRequest::Join(Box::new(claim))).await? {
            ManagerReply::Joined(grant) => grant,
            other => return Err(CallError::Unexpected(format!("{other:?}")).into()),
        };
        check_grant(&grant, &token, pinned.accepted_leaf(), manager)?;
        let membership = Membership {
            node_id: grant.node_id.clone(),
            cert_der: grant.cert_der,
            key_pem: cert_key.private_pem(),
            cert_not_after: grant.cert_not_after,
            view: grant.view,
            listen_addr: None,
        };
        let role = membership.role();
        self.store.write(&[Write::Membership(&membership)])?;
        info!(node = %membership.node_id, role = role.as_str(), %manager, "joined the swarm");
        self.membership.set(Some(membership));
        roles.watcher = Some(self.start_watcher());
        roles.gossip = Some(self.start_gossip(None, incarnation));
        Ok(Reply::Joined { role })
    }

    async fn leave(&self, force: bool) -> Result<Reply, LeaveError> {
        let mut roles = self.roles.lock().await;
        let Some(m) = self.membership.get() else {
            return Err(LeaveError::NotInSwarm);
        };
        if roles.manager.is_some() {
            if !force {
                return Err(LeaveError::LastManager);
            }
            if let Some(running) = roles.gossip.take() {
                running.stop().await;
            }
            if let Some((_, running)) = roles.manager.take() {
                running.stop().await;
            }
        } else {
            if m.role() == Role::Manager && !force {
                return Err(LeaveError::Manager);
            }
            // Tell the manager, so it shows this node Down at once; leave anyway if it can't hear.
            match tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut tls = connect_member(&m).await?;
                call(&mut tls, m.view.api_addr, &ManagerRequest::Leave).await
            })
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("could not tell the manager we leave: {e}"),
                Err(_) => warn!("could not tell the manager we leave: timed out"),
            }
        }
        if let Some(running) = roles.gossip.take() {
            running.stop().await;
        }
        if let Some(running) = roles.watcher.take() {
            running.stop().await;
        }
        self.store
            .write(&[Write::ClearMembership, Write::ClearManager])?;
        self.membership.set(None);
        info!(node = %m.node_id, "left the swarm");
        Ok(Reply::Left)
    }

    /// Everything `/metrics` exports, read now.
    pub async fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        use crate::metrics::{DataPathSnapshot, GossipSnapshot, PeerSnapshot, Snapshot};
        let m = self.membership.get();
        let handle = self
            .gossip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (members, stats) = match &handle {
            Some(h) => (h.members().await.ok(), h.stats().await.ok()),
            None => (None, None),
        };
        let up: Option<std::collections::HashSet<String>> = members.as_ref().map(|ms| {
            ms.iter()
                .filter(|i| i.state == shoal_gossip::MemberState::Up)
                .map(|i| i.id.as_str().to_owned())
                .collect()
        });
        let f = &self.faults;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let api_refused = match self.roles.lock().await.manager.as_ref() {
            Some((manager, _)) => {
                let g = manager.gate_stats();
                vec![
                    ("per_source", g.refused_per_source),
                    ("unauthenticated", g.refused_unauthenticated),
                    ("total", g.refused_total),
                ]
            }
            None => Vec::new(),
        };
        let mut snapshot = Snapshot {
            hostname: self.config.hostname.clone(),
            faults: vec![
                ("state_write", get(&f.state_write_failures)),
                ("watch_stream", get(&f.watch_failures)),
                ("certificate_renewal", get(&f.renewal_failures)),
                ("socket_refused", get(&f.socket_refusals)),
            ],
            api_refused,
            ..Snapshot::default()
        };
        if let Some(m) = &m {
            snapshot.node = Some((m.node_id.to_string(), m.role().as_str().to_owned()));
            snapshot.view_version = Some(m.view.version);
            snapshot.nodes = m
                .view
                .nodes
                .iter()
                .filter(|n| !n.left)
                .map(|n| {
                    let status = match &up {
                        _ if n.id == m.node_id => "Ready",
                        Some(up) if up.contains(n.id.as_str()) => "Ready",
                        Some(_) => "Down",
                        None => "Unknown",
                    };
                    (n.role.as_str().to_owned(), status.to_owned())
                })
                .collect();
        }
        if let (Some(members), Some(stats)) = (members, stats) {
            use shoal_gossip::MemberState::{self, Down, Suspect, Up};
            let count = |s: MemberState| members.iter().filter(|i| i.state == s).count() as u64;
            snapshot.gossip = Some(GossipSnapshot {
                members: [Up, Suspect, Down].map(|s| (s, count(s))).to_vec(),
                stats,
            });
        }
        let dp = running(&self.datapath);
        if let (Some(dp), Some(m)) = (dp, &m) {
            let s = dp.status();
            let names = peer_names(&m.view);
            snapshot.data_path = Some(DataPathSnapshot {
                network: m.view.ingress.name.clone(),
                counters: s.counters,
                peers: s
                    .peers
                    .into_iter()
                    .map(|p| PeerSnapshot {
                        name: names
                            .get(&p.vtep.ip())
                            .cloned()
                            .unwrap_or_else(|| "unknown".into()),
                        vtep: Some(p.vtep.ip()),
                        counters: p.counters,
                        last_rx_epoch: p.last_rx_epoch,
                        last_rx_age: p.last_rx.map(|t| t.elapsed()),
                    })
                    .collect(),
                send_epoch: s.send_epoch,
                io_errors: s.io_errors,
                answered_locally: s.answered_locally,
                capture_readers: dp.capture_readers(),
            });
        }
        snapshot
    }

    /// `node inspect` of another node: adds what this node's data path knows of it.
    fn with_data_path(&self, m: &Membership, reply: Reply) -> Reply {
        let Reply::Node(mut node) = reply else {
            return reply;
        };
        let dp = running(&self.datapath);
        if let Some(dp) = dp.filter(|_| node.id != m.node_id) {
            node.data_path = dp
                .status()
                .peers
                .iter()
                .find(|p| p.vtep.ip() == node.addr)
                .map(|p| peer_counters(&peer_names(&m.view), p));
        }
        Reply::Node(node)
    }

    async fn admin(&self, request: AdminRequest) -> Result<Reply, AdminCallError> {
        let leader = self
            .roles
            .lock()
            .await
            .manager
            .as_ref()
            .map(|(m, _)| m.clone());
        let Some(m) = self.membership.get() else {
            return Err(AdminCallError::NotInSwarm);
        };
        if let Some(manager) = leader {
            let reply = manager.handle_admin(request, &m.node_id)?;
            return Ok(self.with_data_path(&m, reply));
        }
        if m.role() != Role::Manager {
            return Err(AdminCallError::NotManager);
        }
        // A promoted manager: forward to the leader.
        let addr = m.view.api_addr;
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut tls = connect_member(&m).await?;
            call(&mut tls, addr, &ManagerRequest::Admin(request)).await
        })
        .await
        .map_err(|_| CallError::Timeout(addr))??;
        match reply {
            ManagerReply::Admin(reply) => Ok(match *reply {
                Reply::Nodes { nodes, .. } => Reply::Nodes {
                    self_id: Some(m.node_id.clone()),
                    nodes,
                },
                other => self.with_data_path(&m, other),
            }),
            other => Err(CallError::Unexpected(format!("{other:?}")).into()),
        }
    }
}

/// Names for the data path's peers by underlay address: host names of nodes, `vtep
/// OVERLAY-IP` for external VTEPs.
fn peer_names(view: &crate::state::ClusterView) -> HashMap<IpAddr, String> {
    let vteps = view
        .ingress
        .vteps
        .iter()
        .map(|v| (v.addr, format!("vtep {}", v.ip)));
    let nodes = view.nodes.iter().map(|n| (n.addr, n.hostname.clone()));
    vteps.chain(nodes).collect()
}

/// A peer of the data path as `network inspect` and `node inspect` show it.
fn peer_counters(
    names: &HashMap<IpAddr, String>,
    p: &shoal_ingress::overlay::PeerStatus,
) -> PeerCounters {
    let ip = p.vtep.ip();
    PeerCounters {
        vtep: ip,
        name: names.get(&ip).cloned(),
        counters: (&p.counters).into(),
        epochs: p.epochs.clone(),
        last_rx_epoch: p.last_rx_epoch,
        last_rx_ms_ago: p
            .last_rx
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
    }
}

/// Checks a join grant before anything of it is kept: the view's CA is the token's, the node is
/// in the view, its certificate is the CA's for this node in its role, and the server that
/// granted it is the view's manager (the certificate it showed names the view's leader).
fn check_grant(
    grant: &JoinGrant,
    token: &Token,
    server_leaf: Option<Vec<u8>>,
    addr: SocketAddr,
) -> Result<(), JoinError> {
    let bad = |why: String| JoinError::BadGrant { addr, why };
    if crate::token::CaDigest::of(&grant.view.ca_cert_der) != token.ca_digest {
        return Err(bad("its CA is not the one the token names".into()));
    }
    let node = grant
        .view
        .node(&grant.node_id)
        .ok_or(JoinError::NotInView(addr))?;
    crate::tls::verify_issued(
        &grant.view.ca_cert_der,
        &grant.cert_der,
        &grant.node_id,
        node.role,
    )
    .map_err(|e| bad(format!("the certificate: {e}")))?;
    let server = server_leaf.and_then(|der| crate::tls::cert_identity(&der));
    if server != Some((grant.view.leader.clone(), Role::Manager)) {
        return Err(bad(format!(
            "the server is not the swarm's manager {}",
            grant.view.leader
        )));
    }
    Ok(())
}

fn issued(m: &Membership) -> Issued {
    Issued {
        cert_der: m.cert_der.clone(),
        key_pem: m.key_pem.clone(),
    }
}

/// Parses `HOST[:PORT]`; the port defaults to 2377.
async fn resolve_manager(text: &str) -> Result<SocketAddr, JoinError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_API_PORT));
    }
    let with_port = if text.contains(':') {
        text.to_owned()
    } else {
        format!("{text}:{DEFAULT_API_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| JoinError::Address(text.to_owned()))
}

/// Why a subnet is not usable for an overlay network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `a.b.c.d/len`.
    #[error("invalid subnet {0:?}: expected an IPv4 CIDR such as 10.0.0.0/24")]
    Syntax(String),
    /// Fewer than two host addresses.
    #[error("invalid subnet {0:?}: the prefix must be /30 or shorter")]
    TooSmall(String),
    /// Bits set below the prefix.
    #[error("invalid subnet {text:?}: host bits are set; did you mean {fixed}?")]
    HostBits {
        /// What was given.
        text: String,
        /// The network it probably means.
        fixed: String,
    },
}

/// Checks an IPv4 CIDR like `10.0.0.0/24`.
pub fn check_cidr(text: &str) -> Result<(), CidrError> {
    let bad = || CidrError::Syntax(text.to_owned());
    let (ip, len) = text.split_once('/').ok_or_else(bad)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    if len > 30 {
        return Err(CidrError::TooSmall(text.to_owned()));
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    if u32::from(ip) & !mask != 0 {
        return Err(CidrError::HostBits {
            text: text.to_owned(),
            fixed: format!("{}/{len}", std::net::Ipv4Addr::from(u32::from(ip) & mask)),
        });
    }
    Ok(())
}

/// A mutual-TLS connection to this node's manager: it must show a manager certificate of the
/// cluster CA naming the view's leader.
async fn connect_member(m: &Membership) -> Result<TlsStream<TcpStream>, CallError> {
    let config = manager_client_config(&m.view.ca_cert_der, &issued(m), &m.view.leader)?;
    let addr = m.view.api_addr;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| CallError::unreachable(addr, "no answer"))?
        .map_err(|e| CallError::unreachable(addr, e))?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(config).connect(server_name(), tcp),
    )
    .await
    .map_err(|_| CallError::unreachable(addr, "the TLS handshake timed out"))?
    .map_err(|e| CallError::unreachable(addr, format!("TLS failed: {e}")))
}

async fn call(
    tls: &mut TlsStream<TcpStream>,
    addr: SocketAddr,
    request: &ManagerRequest,
) -> Result<ManagerReply, CallError> {
    write_frame(tls, request).await?;
    let response: Option<ManagerResponse> = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(tls))
        .await
        .map_err(|_| CallError::Timeout(addr))??;
    match response {
        None => Err(CallError::Closed(addr)),
        Some(Err(message)) => Err(CallError::Refused { addr, message }),
        Some(Ok(reply)) => Ok(reply),
    }
}

#[allow(clippy::too_many_arguments)]
async fn gossip_loop(
    handle_slot: Arc<std::sync::Mutex<Option<shoal_gossip::driver::Handle>>>,
    keys_slot: GossipKeysSlot,
    cell: Arc<Current>,
    node_secret: zeroize::Zeroizing<[u8; 32]>,
    incarnation: Incarnation,
    bind: Option<SocketAddr>,
    manager: Option<Arc<Manager>>,
    data_path: Option<(crate::datapath::Params, [u8; 32], DataPathSlot)>,
    mut stop: watch::Receiver<bool>,
) {
    // Start gossip, retrying while it cannot (e.g. the advertise address is not up yet).
    let mut warned = false;
    let link = loop {
        let Some(m) = cell.get() else {
            return;
        };
        match Link::start(&m, &node_secret, incarnation, bind, keys_slot.clone()).await {
            Ok(link) => break link,
            Err(e) => {
                if !warned {
                    warn!("gossip did not start: {e}; retrying every 5 s, and node STATUS falls back to the watch streams meanwhile");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GOSSIP_RETRY) => {}
            _ = stop.changed() => return,
        }
    };
    if warned {
        info!("gossip started after all");
    }
    *handle_slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link.handle());
    let mut changes = cell.subscribe();
    let mut up = link.watch_up();
    let mut heard = link.watch_heard();
    if let Some(manager) = &manager {
        manager.set_gossip_up(Some(link.up()));
    }
    let mut steer = data_path.map(|(params, secret, slot)| Steer::new(params, secret, slot));
    let mut epoch_switch = None;
    if let (Some(s), Some(m)) = (steer.as_mut(), cell.get()) {
        epoch_switch = s.follow(&m, &link.heard());
    }
    loop {
        // Also wake when the data path's sending epoch changes (or, if it is not up yet, to
        // retry bringing it up).
        let dp_wake = epoch_switch.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            tokio::time::Instant::from_std,
        );
        // When a new gossip key starts sealing (see gossip::KEY_GRACE); far away if none.
        let switch = link.key_switch_at().map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            tokio::time::Instant::from_std,
        );
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                match cell.get() {
                    Some(m) => {
                        if let Err(e) = link.follow(&m).await {
                            warn!("gossip could not follow the cluster view: {e}");
                        }
                        if let Some(s) = steer.as_mut() {
                            epoch_switch = s.follow(&m, &link.heard());
                        }
                    }
                    None => break,
                }
            }
            changed = heard.changed() => {
                if changed.is_err() {
                    break;
                }
                let now_heard = heard.borrow_and_update().clone();
                if let (Some(s), Some(m)) = (steer.as_mut(), cell.get()) {
                    epoch_switch = s.follow(&m, &now_heard);
                }
            }
            () = tokio::time::sleep_until(dp_wake) => {
                if let (Some(s), Some(m)) = (steer.as_mut(), cell.get()) {
                    epoch_switch = s.follow(&m, &link.heard());
                }
            }
            changed = up.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(manager) = &manager {
                    manager.set_gossip_up(Some(up.borrow_and_update().clone()));
                }
            }
            () = tokio::time::sleep_until(switch) => {
                if let Some(m) = cell.get() {
                    if let Err(e) = link.refresh_keys(&m.view) {
                        warn!("gossip could not switch keys: {e}");
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    if let Some(manager) = &manager {
        manager.set_gossip_up(None);
    }
    if let Some(s) = steer {
        s.stop();
    }
    *handle_slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    *keys_slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    link.stop(true).await;
}

/// Brings the data path up once this node has an overlay address, and keeps it following the
/// view and gossip. Failures are logged and retried (the control plane runs without it).
struct Steer {
    params: crate::datapath::Params,
    secret: zeroize::Zeroizing<[u8; 32]>,
    slot: DataPathSlot,
    warned: bool,
}

/// How often a data path that could not start is retried.
const DATA_PATH_RETRY: Duration = Duration::from_secs(5);

impl Steer {
    fn new(params: crate::datapath::Params, secret: [u8; 32], slot: DataPathSlot) -> Self {
        Steer {
            params,
            secret: zeroize::Zeroizing::new(secret),
            slot,
            warned: false,
        }
    }

    fn current(&self) -> Option<Arc<DataPath>> {
        running(&self.slot)
    }

    /// Follows `m`; returns when to be called again by itself.
    fn follow(
        &mut self,
        m: &Membership,
        heard: &HashMap<NodeId, crate::datapath::Heard>,
    ) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        let dp = match self.current() {
            Some(dp) => dp,
            None => match DataPath::start(&m.view, &m.node_id, *self.secret, &self.params) {
                Ok(dp) => {
                    let dp = Arc::new(dp);
                    info!(
                        interface = %self.params.interface,
                        incarnation = ?self.params.incarnation,
                        aead = shoal_vxlan::crypto::backend(),
                        "data path up"
                    );
                    *self
                        .slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dp.clone());
                    dp
                }
                Err(e) => {
                    if !self.warned {
                        warn!("data path did not start: {e}; retrying every 5 s");
                        self.warned = true;
                    }
                    return Some(now + DATA_PATH_RETRY);
                }
            },
        };
        match dp.follow(&m.view, &m.node_id, heard, now) {
            Ok(next) => next,
            Err(e) => {
                warn!("data path could not follow the cluster view: {e}");
                Some(now + DATA_PATH_RETRY)
            }
        }
    }

    fn stop(self) {
        *self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Why a watch stream ended (logged; the agent reconnects with backoff).
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// No connection.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The manager closed the stream.
    #[error("the manager closed the stream")]
    Closed,
    /// The manager refused the stream.
    #[error("{0}")]
    Refused(String),
    /// A reissued certificate that does not hold up.
    #[error("the manager sent a certificate that does not hold up: {0}")]
    BadCertificate(TlsError),
    /// A message that does not belong on a watch stream.
    #[error("unexpected message on the watch stream: {0}")]
    Unexpected(String),
}

enum WatchEnd {
    Stopped,
    Removed,
    /// Connect again at once: this node has a new certificate.
    Reconnect,
}

/// Faults the agent survives but must not keep quiet: counted for `/metrics`, logged at warn
/// level at most once per [`FAULT_LOG_EVERY`] each.
#[derive(Debug, Default)]
pub struct Faults {
    /// Cluster views (or certificates) that could not be written to the state dir.
    pub state_write_failures: AtomicU64,
    /// Watch streams to the manager that failed or could not be opened.
    pub watch_failures: AtomicU64,
    /// Certificate renewals that failed.
    pub renewal_failures: AtomicU64,
    /// Clients refused on the local socket (not root, the agent's user, or the socket group).
    pub socket_refusals: AtomicU64,
    last_log: std::sync::Mutex<HashMap<&'static str, std::time::Instant>>,
}

/// How often one kind of fault is logged at most.
pub const FAULT_LOG_EVERY: Duration = Duration::from_secs(30);

impl Faults {
    /// Counts a fault of `kind` and logs it at warn level, unless that kind was logged less
    /// than [`FAULT_LOG_EVERY`] ago.
    fn report(&self, counter: &AtomicU64, kind: &'static str, what: &dyn std::fmt::Display) {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let now = std::time::Instant::now();
        let mut last = self
            .last_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last
            .get(kind)
            .is_none_or(|t| now.duration_since(*t) >= FAULT_LOG_EVERY)
        {
            last.insert(kind, now);
            warn!(count = n, "{kind}: {what}");
        }
    }
}

/// Renews this node's certificate over its own connection and keeps it.
async fn renew(
    m: &Membership,
    store: &Store,
    membership: &Current,
    faults: &Faults,
) -> Result<(), WatchError> {
    let addr = m.view.api_addr;
    let cert = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut tls = connect_member(m).await?;
        call(&mut tls, addr, &ManagerRequest::Renew).await
    })
    .await
    .map_err(|_| CallError::Timeout(addr))??;
    match cert {
        ManagerReply::Certificate(cert) => {
            take_certificate(m, cert, store, membership, faults)?;
            info!("certificate renewed");
            Ok(())
        }
        other => Err(WatchError::Unexpected(format!("{other:?}"))),
    }
}

/// Checks a certificate the manager issued to this node and keeps it (in memory at once; in
/// the store too, or the fault is reported and the write retried with the next change).
fn take_certificate(
    m: &Membership,
    cert: crate::api::IssuedCert,
    store: &Store,
    membership: &Current,
    faults: &Faults,
) -> Result<(), WatchError> {
    let role = m.role();
    crate::tls::verify_issued(&m.view.ca_cert_der, &cert.cert_der, &m.node_id, role)
        .map_err(WatchError::BadCertificate)?;
    let mut next = m.clone();
    next.cert_der = cert.cert_der;
    next.cert_not_after = cert.not_after;
    keep(store, membership, faults, next);
    Ok(())
}

/// Keeps `next` as this node's membership: in memory always (the node goes on with the newest
/// view and certificate it was given), in the store if it can be written; a failed write is a
/// fault, retried on the next change and every [`SAVE_RETRY`].
fn keep(store: &Store, membership: &Current, faults: &Faults, next: Membership) {
    match store.write(&[Write::Membership(&next)]) {
        Ok(()) => membership.set(Some(next)),
        Err(e) => {
            faults.report(
                &faults.state_write_failures,
                "cannot save the cluster view to the state dir; running on it from memory and retrying",
                &e,
            );
            membership.set_unsaved(next);
        }
    }
}

/// How often a membership that could not be saved is written again.
pub const SAVE_RETRY: Duration = Duration::from_secs(5);

/// The lifetime of this node's certificates, as the view says.
fn cert_lifetime(m: &Membership) -> Duration {
    Duration::from_secs(m.view.cert_expiry_secs)
}

async fn watch_loop(
    store: Arc<Store>,
    membership: Arc<Current>,
    faults: Arc<Faults>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(m) = membership.get() else {
            return;
        };
        if crate::tls::renewal_due(m.cert_not_after, cert_lifetime(&m), unix_now()) {
            match renew(&m, &store, &membership, &faults).await {
                Ok(()) => continue,
                Err(e) => faults.report(
                    &faults.renewal_failures,
                    "certificate renewal failed; retrying",
                    &e,
                ),
            }
        }
        match watch_once(&m, &store, &membership, &faults, &mut stop, &mut backoff).await {
            Ok(WatchEnd::Stopped) => return,
            Ok(WatchEnd::Reconnect) => continue,
            Ok(WatchEnd::Removed) => {
                warn!(node = %m.node_id, "this node was removed from the swarm; leaving it");
                if let Err(e) = store.write(&[Write::ClearMembership]) {
                    warn!("could not clear the membership: {e}");
                }
                membership.set(None);
                return;
            }
            Err(e) => faults.report(
                &faults.watch_failures,
                "the watch stream to the manager failed; reconnecting",
                &format_args!("{}: {e}", m.view.api_addr),
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn watch_once(
    m: &Membership,
    store: &Store,
    membership: &Current,
    faults: &Faults,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<WatchEnd, WatchError> {
    let mut tls = connect_member(m).await?;
    write_frame(&mut tls, &ManagerRequest::Watch).await?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            if write_frame(&mut wr, &ManagerRequest::Ping).await.is_err() {
                return;
            }
        }
    });
    // Wake to renew the certificate once it is due (then reconnect with the new one).
    let lifetime = cert_lifetime(m).as_secs();
    let due_in = m
        .cert_not_after
        .saturating_sub(lifetime / 3)
        .saturating_sub(unix_now());
    let renew_at = tokio::time::Instant::now() + Duration::from_secs(due_in.min(86_400));
    let end = loop {
        let frame = tokio::select! {
            f = read_frame::<_, ManagerResponse>(&mut rd) => f,
            _ = stop.changed() => break Ok(WatchEnd::Stopped),
            () = tokio::time::sleep_until(renew_at) => break Ok(WatchEnd::Reconnect),
            () = tokio::time::sleep(SAVE_RETRY), if membership.unsaved() => {
                if let Some(current) = membership.get() {
                    keep(store, membership, faults, current);
                }
                continue;
            }
        };
        match frame {
            Err(e) => break Err(e.into()),
            Ok(None) => break Err(WatchError::Closed),
            Ok(Some(Err(message))) => break Err(WatchError::Refused(message)),
            Ok(Some(Ok(ManagerReply::Removed))) => break Ok(WatchEnd::Removed),
            Ok(Some(Ok(ManagerReply::View(view)))) => {
                *backoff = Duration::from_millis(200);
                let Some(current) = membership.get() else {
                    break Ok(WatchEnd::Stopped);
                };
                // Only a newer view replaces the one we hold; the connection it came on is
                // authenticated as the manager this node expects (see `connect_member`).
                if view.version <= current.view.version {
                    continue;
                }
                let mut next = current;
                next.view = *view;
                keep(store, membership, faults, next);
                debug!(
                    version = membership.get().map(|m| m.view.version),
                    "cluster view updated"
                );
            }
            Ok(Some(Ok(ManagerReply::Certificate(cert)))) => {
                let Some(current) = membership.get() else {
                    break Ok(WatchEnd::Stopped);
                };
                take_certificate(&current, cert, store, membership, faults)?;
                info!(
                    role = current.role().as_str(),
                    "new certificate from the manager"
                );
                break Ok(WatchEnd::Reconnect);
            }
            Ok(Some(Ok(other))) => break Err(WatchError::Unexpected(format!("{other:?}"))),
        }
    };
    pinger.abort();
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_checks() {
        assert!(check_cidr("10.0.0.0/24").is_ok());
        assert!(check_cidr("198.19.0.0/16").is_ok());
        assert_eq!(
            check_cidr("10.0.0.1/24"),
            Err(CidrError::HostBits {
                text: "10.0.0.1/24".into(),
                fixed: "10.0.0.0/24".into()
            })
        );
        assert_eq!(
            check_cidr("10.0.0.0/31"),
            Err(CidrError::TooSmall("10.0.0.0/31".into()))
        );
        assert_eq!(
            check_cidr("10.0.0.0/33"),
            Err(CidrError::TooSmall("10.0.0.0/33".into()))
        );
        for bad in ["10.0.0.0", "10.0.0.0/x", "nope/24", ""] {
            assert_eq!(check_cidr(bad), Err(CidrError::Syntax(bad.into())), "{bad}");
        }
        assert!(check_cidr("0.0.0.0/0").is_ok());
    }

    #[tokio::test]
    async fn manager_address_forms() {
        assert_eq!(
            resolve_manager("198.18.0.1").await.unwrap(),
            "198.18.0.1:2377".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve_manager("198.18.0.1:4000").await.unwrap(),
            "198.18.0.1:4000".parse::<SocketAddr>().unwrap()
        );
        assert!(matches!(
            resolve_manager("not a host!").await,
            Err(JoinError::Address(a)) if a == "not a host!"
        ));
    }
}
