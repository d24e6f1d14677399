//! The agent daemon: the Unix socket the CLI talks to, and this node's part in the swarm.
//!
//! On a manager it runs the [`Manager`] (its part of the Raft group) and its API on 2377. On
//! every other node it keeps a watch stream to one of the managers over mTLS (node certificate
//! issued at join), moving to another when that one stops answering: each change of the node
//! list or the keys arrives as a new cluster view and is kept in the store, so a restarted
//! agent is the same node, with no token needed.

pub(crate) mod attach;
pub mod capture;
pub mod cni;
pub mod datapath;
pub mod gossip;
pub mod links;
pub mod local;
pub mod metrics;
pub mod notify;
pub mod reconcile;
pub mod services;

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
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::api::{
    hex, read_frame, write_frame, write_raw_frame, AdminRequest, CaptureFrame, CaptureRequest,
    FrameError, Info, InitRequest, JoinRequest, LocalDataPath, ManagerReply, ManagerRequest,
    ManagerResponse, NetworkDetail, NetworkMember, NetworkSummary, PeerCounters, Reply, Request,
    Response,
};
use crate::cluster::ClusterView;
use crate::id::NodeId;
use crate::manager::networks::{AddrPools, NetworkError};
use crate::manager::state::{ApplyError, Availability, Command, Init, Network, Node, Role, State};
use crate::manager::{
    join_addr, random_key, random_u128, unix_now, AdminError, StartError, NOT_MANAGER,
    PING_INTERVAL,
};
use crate::store::{Membership, MembershipCell, Store, StoreError, Write};
use crate::token::{Secret, Token};
use crate::trust::join::Proofs as _;
use crate::trust::tls::{
    cert_digest, generate_ca, join_client_config, manager_client_config, server_name, Issued,
    NodeKey, TlsError, Validity,
};

/// The agent's version, reported as ENGINE VERSION.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The manager API port.
pub use crate::api::DEFAULT_API_PORT;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

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
    pub data_path: Option<datapath::Params>,
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
    Local(#[from] local::LocalError),
    /// TLS material in the state dir is damaged.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The manager did not start.
    #[error(transparent)]
    ManagerStart(#[from] StartError),
    /// The manager started but could not commit its first command.
    #[error("the manager could not commit: {0}")]
    Manager(String),
    /// `init --force-new-cluster` was refused or failed; nothing changed.
    #[error("{0}")]
    Force(String),
    /// A manager whose view gives it no Raft ID (a view from a manager older than Raft).
    #[error("this node is a manager but its cluster view gives it no Raft ID; run `shoal leave --force` and join it again")]
    NoRaftId,
    /// The metrics address (`--metrics-addr`) could not be bound.
    #[error(
        "cannot listen on {addr} for metrics: {source}; free the port or change --metrics-addr"
    )]
    Metrics {
        /// The metrics address.
        addr: SocketAddr,
        /// The OS error.
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
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    Stopped,
    /// Not in a swarm (a start without a membership record).
    #[error("{NOT_IN_SWARM}")]
    NotInSwarm,
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
    #[error("--key-rotation-interval {0}s is too short: a rotation takes {min}s to reach every node and retire the old key, so the interval must be at least {min}s", min = crate::cluster::MIN_ROTATION_INTERVAL.as_secs())]
    RotationTooShort(u64),
    /// A certificate lifetime that is too short.
    #[error("--cert-expiry {0}s is too short: it must be at least {min}s", min = crate::trust::tls::MIN_CERT_EXPIRY.as_secs())]
    CertExpiryTooShort(u64),
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
    /// Joined, but this node's part could not start (the agent is shutting down).
    #[error("joined the swarm, but could not start: {0}")]
    Start(Box<AgentError>),
    /// The token is malformed.
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    /// The manager address does not parse or resolve.
    #[error("invalid manager address {0:?}: expected IP[:PORT] or HOST[:PORT]")]
    Address(String),
    /// The server's certificate chain failed the check pinned to the token's CA (another
    /// swarm's CA, a leaf it did not sign, an expired or not yet valid certificate, a worker's);
    /// the secret was not sent.
    #[error("the server at {addr} {failure}; nothing was sent")]
    Pinned {
        /// The server.
        addr: SocketAddr,
        /// What was wrong with its chain.
        failure: crate::trust::tls::PinFailure,
    },
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
    /// The last manager without `--force`.
    #[error("You are attempting to leave the swarm on a node that is participating as a manager. Removing the last manager erases all current state of the swarm. Use `--force` to ignore this message.")]
    LastManager,
    /// A manager of several without `--force`.
    #[error("You are attempting to leave the swarm on a node that is participating as a manager. Removing this node leaves {left} managers out of {total}. Without a Raft quorum your swarm will be inaccessible. The only way to restore a swarm that has lost consensus is to reinitialize it with `--force-new-cluster`. Use `--force` to suppress this message.")]
    Manager {
        /// Managers left after this one.
        left: usize,
        /// Managers now.
        total: usize,
    },
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
    /// A container ID that names no single endpoint here.
    #[error("{0}")]
    Endpoint(String),
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    store: Arc<Store>,
    public_key: [u8; 32],
    membership: Arc<MembershipCell>,
    /// One `init`, `join` or `leave` at a time: each checks the membership and then changes
    /// it.
    lifecycle: tokio::sync::Mutex<()>,
    node_secret: zeroize::Zeroizing<[u8; 32]>,
    faults: Arc<Faults>,
    /// The task that owns what runs (see [`reconcile`]).
    reconciler: reconcile::Handle,
    /// Containers attached to user networks, here and elsewhere (see [`cni`]).
    endpoints: Arc<cni::Endpoints>,
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
    let access = local::Access::new(config.socket_group.as_deref())?;
    let agent = Agent::start(config).await?;
    tokio::spawn(agent.clone().run_health());
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
                async move { metrics::render(&agent.metrics_snapshot().await) }
            };
            Some(tokio::spawn(metrics::serve(tcp, page)))
        }
    };
    // Socket bound, state open, metrics (if any) listening: ready.
    notify::ready(&match agent.membership.get() {
        Some(m) => format!(
            "node {} ({:?}), socket {}",
            m.node_id,
            m.role(),
            agent.config.socket.display()
        ),
        None => format!("not in a swarm, socket {}", agent.config.socket.display()),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    let allowed = match stream.peer_cred() {
                        Ok(c) => access.allows(
                            &local::Peer {
                                uid: c.uid(),
                                gid: c.gid(),
                                pid: c.pid(),
                            },
                            local::groups_of,
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
    notify::stopping();
    if let Some(task) = metrics {
        task.abort();
    }
    agent.stop().await;
    let _ = std::fs::remove_file(&agent.config.socket);
    Ok(())
}

/// Binds the local socket, private from its first moment (see [`crate::agent::local`]); a socket
/// left by an agent that died is replaced, one that answers is another agent's.
async fn bind_socket(path: &Path, access: &local::Access) -> Result<UnixListener, AgentError> {
    if path.exists() && UnixStream::connect(path).await.is_ok() {
        return Err(AgentError::SocketInUse(path.to_owned()));
    }
    Ok(local::bind(path, access)?)
}

impl Agent {
    /// Opens the state and resumes this node's role in its swarm, if any.
    pub async fn start(config: AgentConfig) -> Result<Arc<Self>, AgentError> {
        let store = Arc::new(Store::open(&config.state_dir).await?);
        let node_secret = zeroize::Zeroizing::new(store.node_key(random_key()).await?);
        store.check_incarnation().await?;
        let (public_key, _) = crate::trust::join::public_keys(&node_secret);
        let membership = store.membership().await?;
        let manager_state = store.manager(State::from_record).await?;
        let membership_cell = MembershipCell::new(membership.clone());
        let faults = Arc::new(Faults::default());
        let endpoints = Arc::new(cni::Endpoints::default());
        let attached = endpoints.load(&store).await?;
        if attached > 0 {
            info!(attached, "container attachments resumed");
        }
        let reconciler = reconcile::spawn(reconcile::Setup {
            endpoints: endpoints.clone(),
            store: store.clone(),
            membership: membership_cell.clone(),
            faults: faults.clone(),
            node_secret: node_secret.clone(),
            gossip_addr: config.gossip_addr,
            data_path: config.data_path.clone(),
        });
        let agent = Arc::new(Self {
            config,
            store,
            public_key,
            membership: membership_cell,
            lifecycle: tokio::sync::Mutex::new(()),
            node_secret,
            faults,
            reconciler,
            endpoints,
        });
        if let Some(m) = membership {
            let incarnation = agent.fresh_incarnation().await?;
            let own = m.view.node(&m.node_id).cloned();
            let manager_role = own.as_ref().is_some_and(|n| n.role == Role::Manager);
            if !manager_role && manager_state.is_some() {
                // Demoted while it was down (or stopped before it could clear its part):
                // a worker now, with nothing of the managers' kept.
                agent
                    .store
                    .write(&[Write::ClearManager, Write::ClearRaft])
                    .await?;
            }
            let listen = m
                .listen_addr
                .or_else(|| own.as_ref().and_then(|n| n.api_addr));
            match (manager_role, listen) {
                (true, Some(listen)) => {
                    let manager = reconcile::manager_start(&agent.store, &m, listen).await?;
                    let raft_id = manager.raft_id;
                    agent.reconciler.start(Some(manager), incarnation).await?;
                    info!(node = %m.node_id, %listen, raft_id, "resumed as a swarm manager");
                }
                _ => {
                    agent.reconciler.start(None, incarnation).await?;
                    info!(node = %m.node_id, "resumed swarm membership");
                }
            }
            agent.reconcile_attachments().await;
        }
        Ok(agent)
    }

    /// What runs on this node now.
    fn running(&self) -> Arc<reconcile::Running> {
        self.reconciler.running()
    }

    async fn stop(&self) {
        self.reconciler.stop().await;
    }

    /// A new incarnation for the next start of gossip and the data path, stored before it is
    /// used (see [`Store::renew_incarnation`]).
    async fn fresh_incarnation(&self) -> Result<Incarnation, StoreError> {
        self.store
            .renew_incarnation(|| {
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&random_key()[..16]);
                bytes
            })
            .await
            .map(Incarnation)
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
                if let Some(handle) = self.running().gossip.clone() {
                    if let Ok(stats) = handle.stats().await {
                        info.gossip = serde_json::to_value(stats).ok();
                    }
                }
                Ok(Reply::Info(info))
            }
            Request::Init(init) => self.init(init).await.map_err(|e| e.to_string()),
            Request::ForceNewCluster => self.force_new_cluster().await.map_err(|e| e.to_string()),
            Request::Join(join) => self.join(join).await.map_err(|e| e.to_string()),
            Request::Leave { force } => self.leave(force).await.map_err(|e| e.to_string()),
            Request::Admin(admin) => self.admin(admin).await.map_err(|e| e.to_string()),
            Request::NetworkLs => {
                let m = self
                    .membership
                    .get()
                    .ok_or_else(|| NOT_IN_SWARM.to_owned())?;
                let n = &m.view.ingress;
                let ingress = NetworkSummary {
                    id: m.view.ingress_id(),
                    name: n.name.clone(),
                    vni: n.vni,
                    subnet: n.subnet.clone(),
                    encrypted: n.encrypted,
                };
                let user = m.view.networks.iter().map(|n| NetworkSummary {
                    id: n.id.clone(),
                    name: n.name.clone(),
                    vni: n.vni,
                    subnet: n.subnet.to_string(),
                    encrypted: n.encrypted,
                });
                Ok(Reply::Networks(
                    std::iter::once(ingress).chain(user).collect(),
                ))
            }
            Request::NetworkInspect { network } => {
                let m = self
                    .membership
                    .get()
                    .ok_or_else(|| NOT_IN_SWARM.to_owned())?;
                if let Some(n) = m
                    .view
                    .networks
                    .iter()
                    .find(|n| n.name == network || n.id == network)
                {
                    return Ok(Reply::Network(Box::new(NetworkDetail {
                        id: n.id.clone(),
                        name: n.name.clone(),
                        driver: "overlay".into(),
                        scope: "swarm".into(),
                        vni: n.vni,
                        subnet: n.subnet.to_string(),
                        encrypted: n.encrypted,
                        data_path_port: m.view.ingress.data_path_port,
                        members: Vec::new(),
                        vteps: Vec::new(),
                        local: None,
                        gateway: Some(n.gateway),
                        attachable: n.attachable,
                        internal: n.internal,
                        endpoints: self.endpoints.inspect(&m.view, &m.node_id, n),
                        data_path: self.running().data_path.as_ref().and_then(|dp| {
                            dp.segments().into_iter().find(|s| s.vni == n.vni).map(|s| {
                                crate::api::UserDataPath {
                                    device: s.device,
                                    forwarding: s
                                        .forwarding
                                        .into_iter()
                                        .map(|(mac, vtep)| crate::api::Forwarding {
                                            mac: mac.to_string(),
                                            vtep,
                                        })
                                        .collect(),
                                }
                            })
                        }),
                    })));
                }
                let m = self.membership_on(&network)?;
                Ok(Reply::Network(Box::new(self.network_detail(&m))))
            }
            Request::Capture(_) => Err(
                "a capture streams packets: send it on its own connection (shoal capture)".into(),
            ),
            Request::Cni(req) => Ok(Reply::Cni(self.cni(req).await)),
        }
    }

    /// `shoal capture`: streams pcapng to the client until it goes away (or the data path
    /// stops). The data path never waits for the client: see [`crate::agent::capture`].
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

    fn start_capture(
        &self,
        req: &CaptureRequest,
    ) -> Result<(capture::Subscription, capture::Encoder, Vec<u8>), String> {
        let m = self
            .membership
            .get()
            .ok_or_else(|| NOT_IN_SWARM.to_owned())?;
        if !req.inner && !req.outer {
            return Err("nothing to capture: ask for --inner, --outer or --both".into());
        }
        let dp = self
            .running()
            .data_path
            .clone()
            .ok_or("the data path is not running on this node; see the agent's log")?;
        // `ingress`, or a user network (by name or ID): its frames, on its device's name.
        let (name, vni, interface) = if req.network == m.view.ingress.name {
            (
                m.view.ingress.name.clone(),
                m.view.ingress.vni,
                dp.status().interface,
            )
        } else {
            let n = m
                .view
                .networks
                .iter()
                .find(|n| n.name == req.network || n.id == req.network)
                .ok_or_else(|| format!("network {} not found", req.network))?;
            (n.name.clone(), n.vni, attach::device_name(n.vni))
        };
        let port = m.view.ingress.data_path_port;
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
        let context = capture::Context {
            network: name,
            vni,
            interface,
            hostname: me.hostname.clone(),
            local: SocketAddr::new(me.addr, port),
            names: peer_names(&m.view),
        };
        let (encoder, header) = capture::Encoder::start(context).map_err(|e| e.to_string())?;
        let sub = dp
            .capture(capture::Filter {
                inner: req.inner,
                outer: req.outer,
                peer,
                vni: Some(vni),
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
            return Err(if m.view.networks.iter().any(|n| n.name == network) {
                format!(
                    "network {network} has no data path on this node yet (only {} has, today)",
                    m.view.ingress.name
                )
            } else {
                format!("network {network} not found")
            });
        }
        Ok(m)
    }

    fn network_detail(&self, m: &Membership) -> NetworkDetail {
        let n = &m.view.ingress;
        let dp = self.running().data_path.clone();
        let local = dp.map(|dp| {
            let s = dp.status();
            LocalDataPath {
                interface: s.interface,
                address: s.address,
                mac: s.mac.to_string(),
                mtu: s.mtu,
                send_epoch: s.send_epoch,
                members: s.members,
                counters: datapath::counters(&s.counters),
                peers: {
                    let names = peer_names(&m.view);
                    s.peers.iter().map(|p| peer_counters(&names, p)).collect()
                },
            }
        });
        NetworkDetail {
            id: m.view.ingress_id(),
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
            vteps: n
                .vteps
                .iter()
                .map(|v| crate::api::Vtep {
                    addr: v.addr,
                    mac: v.mac.clone(),
                    ip: v.ip,
                })
                .collect(),
            local,
            gateway: None,
            attachable: false,
            internal: false,
            endpoints: Vec::new(),
            data_path: None,
        }
    }

    fn info(&self) -> Info {
        let m = self.membership.get();
        Info {
            hostname: self.config.hostname.clone(),
            public_key: hex(&self.public_key),
            node_id: m.as_ref().map(|m| m.node_id.clone()),
            role: m.as_ref().map(Membership::role),
            manager_addr: m.as_ref().and_then(|m| {
                let own = m.view.node(&m.node_id).and_then(|n| n.api_addr);
                own.or_else(|| m.view.managers().first().map(|(_, a)| *a))
            }),
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
            gossip_keys_live: self.running().gossip_keys,
            data_path_epochs_live: self.running().data_path.clone().and_then(|dp| {
                let s = dp.status();
                let sealing = s.send_epoch?;
                Some(crate::cluster::LiveKeys {
                    sealing,
                    also_open: s.epochs.into_iter().find(|e| *e != sealing),
                })
            }),
            gossip: None,
            state_digest: self.running().manager.as_ref().and_then(|manager| {
                let record = manager.state().to_record().ok()?;
                Some(hex(&<sha2::Sha256 as sha2::Digest>::digest(&record)))
            }),
        }
    }

    async fn init(&self, req: InitRequest) -> Result<Reply, InitError> {
        let _one_at_a_time = self.lifecycle.lock().await;
        if self.membership.get().is_some() {
            return Err(InitError::AlreadyInSwarm);
        }
        check_cidr(&req.ingress_subnet)?;
        if req.key_rotation_secs < crate::cluster::MIN_ROTATION_INTERVAL.as_secs() {
            return Err(InitError::RotationTooShort(req.key_rotation_secs));
        }
        if req.cert_expiry_secs < crate::trust::tls::MIN_CERT_EXPIRY.as_secs() {
            return Err(InitError::CertExpiryTooShort(req.cert_expiry_secs));
        }
        let addr_pools = addr_pools(&req)?;
        // Before anything is made: a store that cannot renew the incarnation keeps nothing.
        let incarnation = self.fresh_incarnation().await?;
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
            cert_der: crate::trust::tls::sign_node_cert(
                &ca,
                &node_id,
                Role::Manager,
                &own_key.public_raw(),
                validity,
            )?,
            key_pem: own_key.private_pem(),
        };
        let (_, signing_key) = crate::trust::join::public_keys(&self.node_secret);
        let api_addr = join_addr(req.advertise_addr, req.listen_addr);
        let init = Command::Init(Box::new(Init {
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
                raft_id: None,
                api_addr: None,
            },
            api_addr,
            worker_secret: Secret::from_random(random_u128()).as_str().into(),
            manager_secret: Secret::from_random(random_u128()).as_str().into(),
            gossip_key: random_key(),
            data_path_key: random_key(),
            key_interval_secs: req.key_rotation_secs,
            cert_expiry_secs: req.cert_expiry_secs,
            ingress: Network {
                name: shoal_ingress::INGRESS_NAME.into(),
                vni: shoal_ingress::INGRESS_VNI,
                subnet: req.ingress_subnet.clone(),
                encrypted: req.encrypt,
                data_path_port: req.data_path_port,
                vteps: Vec::new(),
            },
            at: now,
            addr_pools,
        }));
        // What the state will be once the Raft group of one has committed `init`: the view
        // this node keeps, and the token to print.
        let mut state = State::default();
        state.apply(init.clone())?;
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
            .write(&[Write::ClearRaft, Write::Membership(&membership)])
            .await?;
        self.membership.set(Some(membership));
        let manager = reconcile::ManagerStart {
            state: State::default(),
            listener,
            listen: req.listen_addr,
            raft_id: 1,
            bootstrap: true,
            first: Some(init),
        };
        match self.reconciler.start(Some(manager), incarnation).await {
            Ok(()) => {}
            Err(e) => {
                // Undo: nothing of a half-started swarm stays.
                self.reconciler.stop().await;
                self.membership.set(None);
                let _ = self
                    .store
                    .write(&[
                        Write::ClearManager,
                        Write::ClearRaft,
                        Write::ClearMembership,
                    ])
                    .await;
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

    /// `init --force-new-cluster`: after the other managers were lost, this one forms a new
    /// group of managers alone, from its state (see [`reconcile::Order::ForceNewCluster`]).
    async fn force_new_cluster(&self) -> Result<Reply, AgentError> {
        let _one_at_a_time = self.lifecycle.lock().await;
        let m = self.membership.get().ok_or(AgentError::NotInSwarm)?;
        let own = m.view.node(&m.node_id);
        if !own.is_some_and(|n| n.role == Role::Manager && n.active()) {
            return Err(AgentError::Force(
                ApplyError::NotAManager(m.node_id.clone()).to_string(),
            ));
        }
        // Two groups of managers would each go their own way: only once the quorum is lost.
        if let Some(manager) = self.running().manager.clone() {
            if manager.raft().hears_leader() {
                return Err(AgentError::Force(
                    "the swarm has a leader: --force-new-cluster is only for a swarm that lost the quorum of its managers; demote managers (`shoal node demote`) to have fewer".into(),
                ));
            }
        }
        let demoted = self.reconciler.force_new_cluster().await?;
        let manager = self.running().manager.clone().ok_or(AgentError::Stopped)?;
        let state = manager.state();
        let cluster = state.cluster().ok_or(AgentError::NotInSwarm)?;
        let worker_token = format!(
            "SWMTKN-1-{}-{}",
            crate::token::CaDigest::of(&cluster.ca.cert_der),
            cluster.worker_secret
        );
        warn!(
            demoted = ?demoted,
            "forced a new cluster: the other managers are workers now; promote nodes to have several managers again"
        );
        Ok(Reply::Initialized {
            node_id: m.node_id.clone(),
            worker_token,
            join_addr: manager.raft().replica.api_addr(),
        })
    }

    async fn join(&self, req: JoinRequest) -> Result<Reply, JoinError> {
        let _one_at_a_time = self.lifecycle.lock().await;
        if self.membership.get().is_some() {
            return Err(JoinError::AlreadyInSwarm);
        }
        let token = Token::parse(&req.token)?;
        let manager = resolve_manager(&req.manager).await?;
        // Before the manager is asked: a store that cannot renew the incarnation keeps nothing.
        let incarnation = self.fresh_incarnation().await?;
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
            Ok(Err(e)) => {
                return Err(match pinned.failure() {
                    Some(failure) => JoinError::Pinned {
                        addr: manager,
                        failure,
                    },
                    None => CallError::unreachable(manager, format!("TLS failed: {e}")).into(),
                })
            }
            Ok(Ok(tls)) => tls,
        };
        // The proofs are bound to this TLS session: worth nothing on any other connection.
        let mut exporter = [0u8; crate::trust::join::EXPORTER_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, crate::trust::join::EXPORTER_LABEL, None)
            .map_err(|e| CallError::unreachable(manager, format!("TLS exporter: {e}")))?;
        let manager_public = match call(&mut tls, manager, &ManagerRequest::JoinHello).await? {
            ManagerReply::JoinChallenge { public_key } => public_key,
            other => return Err(CallError::Unexpected(format!("{other:?}")).into()),
        };
        // Our certificate key: the manager signs its public half; the private half stays here.
        let cert_key = NodeKey::generate()?;
        let (public_key, signing_key) = crate::trust::join::public_keys(&self.node_secret);
        let claim = crate::trust::join::Claim {
            secret_proof: crate::trust::join::secret_proof(token.secret.as_str(), &exporter),
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
        let view = ClusterView::from_wire(grant.view);
        check_grant(
            &grant.node_id,
            &grant.cert_der,
            &view,
            &token,
            pinned.accepted_leaf(),
            manager,
        )?;
        let listen_addr = view.node(&grant.node_id).and_then(|n| n.api_addr);
        let membership = Membership {
            node_id: grant.node_id,
            cert_der: grant.cert_der,
            key_pem: cert_key.private_pem(),
            cert_not_after: grant.cert_not_after,
            view,
            listen_addr,
        };
        let role = membership.role();
        self.store
            .write(&[
                Write::ClearManager,
                Write::ClearRaft,
                Write::Membership(&membership),
            ])
            .await?;
        info!(node = %membership.node_id, role = role.as_str(), %manager, "joined the swarm");
        // A manager joins the Raft group: the leader adds it and sends it the state.
        let manager_start = match (role, listen_addr) {
            (Role::Manager, Some(listen)) => Some(
                reconcile::manager_start(&self.store, &membership, listen)
                    .await
                    .map_err(|e| JoinError::Start(Box::new(e)))?,
            ),
            _ => None,
        };
        self.membership.set(Some(membership));
        self.reconciler
            .start(manager_start, incarnation)
            .await
            .map_err(|e| JoinError::Start(Box::new(e)))?;
        Ok(Reply::Joined { role })
    }

    async fn leave(&self, force: bool) -> Result<Reply, LeaveError> {
        let _one_at_a_time = self.lifecycle.lock().await;
        let Some(m) = self.membership.get() else {
            return Err(LeaveError::NotInSwarm);
        };
        let total = m.view.managers().len();
        if let Some(manager) = self.running().manager.clone() {
            if !force {
                return Err(if total <= 1 {
                    LeaveError::LastManager
                } else {
                    LeaveError::Manager {
                        left: total - 1,
                        total,
                    }
                });
            }
            // One of several: the others take it out of the Raft group and the node list.
            if total > 1 {
                if let Err(e) = manager.apply(Command::MarkLeft(m.node_id.clone())).await {
                    warn!("could not tell the other managers we leave: {e}");
                }
            }
        } else {
            if m.role() == Role::Manager && !force {
                return Err(LeaveError::Manager {
                    left: total.saturating_sub(1),
                    total,
                });
            }
            // Tell the manager, so it shows this node Down at once; leave anyway if it can't hear.
            match tokio::time::timeout(REQUEST_TIMEOUT, async {
                let (mut tls, addr) = connect_member(&m).await?;
                call(&mut tls, addr, &ManagerRequest::Leave).await
            })
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("could not tell the manager we leave: {e}"),
                Err(_) => warn!("could not tell the manager we leave: timed out"),
            }
        }
        self.reconciler.stop().await;
        self.detach_all().await;
        self.store
            .write(&[
                Write::ClearMembership,
                Write::ClearManager,
                Write::ClearRaft,
            ])
            .await?;
        self.membership.set(None);
        info!(node = %m.node_id, "left the swarm");
        Ok(Reply::Left)
    }

    /// Everything `/metrics` exports, read now.
    pub async fn metrics_snapshot(&self) -> metrics::Snapshot {
        use crate::agent::metrics::{DataPathSnapshot, GossipSnapshot, PeerSnapshot, Snapshot};
        let m = self.membership.get();
        let running = self.running();
        let (members, stats) = match &running.gossip {
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
        let api_refused = match running.manager.as_ref() {
            Some(manager) => {
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
        let dp = self.running().data_path.clone();
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
                mesh: s.mesh,
            });
        }
        snapshot
    }

    /// `node inspect` of another node: adds what this node's data path knows of it.
    fn with_data_path(&self, m: &Membership, reply: Reply) -> Reply {
        let Reply::Node(mut node) = reply else {
            return reply;
        };
        let dp = self.running().data_path.clone();
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

    async fn admin(&self, mut request: AdminRequest) -> Result<Reply, AdminCallError> {
        let leader = self.running().manager.clone();
        let Some(m) = self.membership.get() else {
            return Err(AdminCallError::NotInSwarm);
        };
        // `service backend add|rm SERVICE CONTAINER`: a container attached here stands for
        // its address on the service's network (the managers know addresses only).
        if let AdminRequest::ServiceBackend {
            service, endpoint, ..
        } = &mut request
        {
            if endpoint.parse::<std::net::Ipv4Addr>().is_err() {
                if let Some(ip) = self
                    .local_endpoint(&m.view, service, endpoint)
                    .map_err(AdminCallError::Endpoint)?
                {
                    *endpoint = ip.to_string();
                }
            }
        }
        if let Some(manager) = leader {
            let reply = manager.handle_admin(request, &m.node_id).await?;
            return Ok(self.with_data_path(&m, reply));
        }
        if m.role() != Role::Manager {
            // A worker may name its own containers as backends, as the CNI path does (the
            // managers accept it for addresses the view gives this node only).
            if let AdminRequest::ServiceBackend {
                service,
                endpoint,
                present,
            } = &request
            {
                if let Ok(ip) = endpoint.parse::<std::net::Ipv4Addr>() {
                    if self.endpoints.holds(ip) {
                        self.set_backend(service, ip, *present)
                            .await
                            .map_err(AdminCallError::Endpoint)?;
                        return Ok(Reply::Lines(vec![ip.to_string()]));
                    }
                }
            }
            return Err(AdminCallError::NotManager);
        }
        // A manager whose own manager is not running yet: ask another.
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let (mut tls, addr) = connect_member(&m).await?;
            call(&mut tls, addr, &ManagerRequest::Admin(request)).await
        })
        .await
        .map_err(|_| CallError::Timeout(first_manager(&m)))??;
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
fn peer_names(view: &ClusterView) -> HashMap<IpAddr, String> {
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
        counters: datapath::counters(&p.counters),
        epochs: p.epochs.clone(),
        last_rx_epoch: p.last_rx_epoch,
        last_rx_ms_ago: p
            .last_rx
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
    }
}

/// Checks a join grant before anything of it is kept: the view's CA is the token's, the node is
/// in the view, its certificate is the CA's for this node in its role, and the server that
/// granted it is one of the view's managers (the certificate it showed names it, as manager).
fn check_grant(
    node_id: &NodeId,
    cert_der: &[u8],
    view: &ClusterView,
    token: &Token,
    server_leaf: Option<Vec<u8>>,
    addr: SocketAddr,
) -> Result<(), JoinError> {
    let bad = |why: String| JoinError::BadGrant { addr, why };
    if crate::token::CaDigest::of(&view.ca_cert_der) != token.ca_digest {
        return Err(bad("its CA is not the one the token names".into()));
    }
    let node = view.node(node_id).ok_or(JoinError::NotInView(addr))?;
    crate::trust::tls::verify_issued(&view.ca_cert_der, cert_der, node_id, node.role)
        .map_err(|e| bad(format!("the certificate: {e}")))?;
    let server = server_leaf.and_then(|der| crate::trust::tls::cert_identity(&der));
    let is_manager = |id: &NodeId| view.node(id).is_some_and(|n| n.role == Role::Manager);
    match server {
        Some((id, Role::Manager)) if is_manager(&id) => {}
        _ => return Err(bad("the server is not one of the swarm's managers".into())),
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
    /// Too small for the IPAM to give a node an address.
    #[error("invalid subnet {0:?}: the prefix must be /{max} or shorter, for addresses to give to nodes", max = shoal_ingress::ipam::MAX_PREFIX_LEN)]
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

/// Checks an IPv4 CIDR like `10.0.0.0/24`. Whether it is large enough is the IPAM's rule
/// ([`shoal_ingress::ipam::Ipam::new`]), asked here, so the two cannot disagree.
pub fn check_cidr(text: &str) -> Result<(), CidrError> {
    let bad = || CidrError::Syntax(text.to_owned());
    let too_small = || CidrError::TooSmall(text.to_owned());
    let (ip, len) = text.split_once('/').ok_or_else(bad)?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = ipnet::Ipv4Net::new(ip, len).map_err(|_| too_small())?;
    // `new` refuses only a subnet too small to hold a node.
    shoal_ingress::ipam::Ipam::new(net).map_err(|_| too_small())?;
    if net.trunc() != net {
        return Err(CidrError::HostBits {
            text: text.to_owned(),
            fixed: net.trunc().to_string(),
        });
    }
    Ok(())
}

/// The address of the first manager of the view (for messages).
fn first_manager(m: &Membership) -> SocketAddr {
    m.view
        .managers()
        .first()
        .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |(_, a)| *a)
}

/// How long one manager gets to answer before the next is tried.
const MANAGER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A mutual-TLS connection to one of the view's managers (not this node), tried in turn from
/// the one that answered last: each must show a manager certificate of the cluster CA naming
/// itself.
async fn connect_member(m: &Membership) -> Result<(TlsStream<TcpStream>, SocketAddr), CallError> {
    static LAST_GOOD: std::sync::Mutex<Option<SocketAddr>> = std::sync::Mutex::new(None);
    let mut managers: Vec<(NodeId, SocketAddr)> = m
        .view
        .managers()
        .into_iter()
        .filter(|(id, _)| **id != m.node_id)
        .map(|(id, a)| (id.clone(), a))
        .collect();
    let last = *LAST_GOOD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(i) = managers.iter().position(|(_, a)| Some(*a) == last) {
        managers.rotate_left(i);
    }
    let mut error = CallError::unreachable(first_manager(m), "the view names no manager");
    for (id, addr) in managers {
        match connect_manager(m, &id, addr).await {
            Ok(tls) => {
                *LAST_GOOD
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
                return Ok((tls, addr));
            }
            Err(e) => error = e,
        }
    }
    Err(error)
}

/// A mutual-TLS connection to manager `id` at `addr`.
async fn connect_manager(
    m: &Membership,
    id: &NodeId,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, CallError> {
    let config = manager_client_config(&m.view.ca_cert_der, &issued(m), id)?;
    let tcp = tokio::time::timeout(MANAGER_CONNECT_TIMEOUT, TcpStream::connect(addr))
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
    membership: &MembershipCell,
    faults: &Faults,
) -> Result<(), WatchError> {
    let cert = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let (mut tls, addr) = connect_member(m).await?;
        call(&mut tls, addr, &ManagerRequest::Renew).await
    })
    .await
    .map_err(|_| CallError::Timeout(first_manager(m)))??;
    match cert {
        ManagerReply::Certificate(cert) => {
            take_certificate(m, cert, store, membership, faults).await?;
            info!("certificate renewed");
            Ok(())
        }
        other => Err(WatchError::Unexpected(format!("{other:?}"))),
    }
}

/// Checks a certificate the manager issued to this node and keeps it (in memory at once; in
/// the store too, or the fault is reported and the write retried with the next change).
async fn take_certificate(
    m: &Membership,
    cert: crate::api::IssuedCert,
    store: &Store,
    membership: &MembershipCell,
    faults: &Faults,
) -> Result<(), WatchError> {
    let role = m.role();
    crate::trust::tls::verify_issued(&m.view.ca_cert_der, &cert.cert_der, &m.node_id, role)
        .map_err(WatchError::BadCertificate)?;
    let mut next = m.clone();
    next.cert_der = cert.cert_der;
    next.cert_not_after = cert.not_after;
    keep(store, membership, faults, next).await;
    Ok(())
}

/// Keeps `next` as this node's membership: in memory always (the node goes on with the newest
/// view and certificate it was given), in the store if it can be written; a failed write is a
/// fault, retried on the next change and every [`SAVE_RETRY`].
async fn keep(store: &Store, membership: &MembershipCell, faults: &Faults, next: Membership) {
    match store.write(&[Write::Membership(&next)]).await {
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
    membership: Arc<MembershipCell>,
    faults: Arc<Faults>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(m) = membership.get() else {
            return;
        };
        if crate::trust::tls::renewal_due(m.cert_not_after, cert_lifetime(&m), unix_now()) {
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
                if let Err(e) = store.write(&[Write::ClearMembership]).await {
                    warn!("could not clear the membership: {e}");
                }
                membership.set(None);
                return;
            }
            Err(e) => faults.report(
                &faults.watch_failures,
                "the watch stream to the manager failed; reconnecting",
                &e,
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
    membership: &MembershipCell,
    faults: &Faults,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<WatchEnd, WatchError> {
    let (mut tls, _) = connect_member(m).await?;
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
                    keep(store, membership, faults, current).await;
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
                let view = ClusterView::from_wire(*view);
                let Some(current) = membership.get() else {
                    break Ok(WatchEnd::Stopped);
                };
                // Only a newer view replaces the one we hold; the connection it came on is
                // authenticated as the manager this node expects (see `connect_member`).
                if !view.supersedes(&current.view) {
                    continue;
                }
                let mut next = current;
                next.view = view;
                keep(store, membership, faults, next).await;
                debug!(
                    version = membership.get().map(|m| m.view.version),
                    "cluster view updated"
                );
            }
            Ok(Some(Ok(ManagerReply::Certificate(cert)))) => {
                let Some(current) = membership.get() else {
                    break Ok(WatchEnd::Stopped);
                };
                take_certificate(&current, cert, store, membership, faults).await?;
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

/// `init`'s default address pools, checked (`--default-addr-pool`, `--default-addr-pool-mask-length`).
fn addr_pools(req: &InitRequest) -> Result<AddrPools, InitError> {
    let mut pools = AddrPools::default();
    if !req.default_addr_pools.is_empty() {
        pools.pools = req
            .default_addr_pools
            .iter()
            .map(|p| {
                p.parse().map_err(|_| {
                    NetworkError::Pool(format!(
                        "--default-addr-pool {p:?} is not a CIDR, e.g. 10.10.0.0/16"
                    ))
                })
            })
            .collect::<Result<_, _>>()
            .map_err(ApplyError::from)?;
    }
    if let Some(mask) = req.default_addr_pool_mask {
        pools.mask = mask;
    }
    pools.check().map_err(ApplyError::from)?;
    Ok(pools)
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

    /// The manager's check and the IPAM agree on every prefix length: what `init` accepts,
    /// the IPAM can give addresses in (the boundary: /29 is taken, /30 refused with the size).
    #[test]
    fn cidr_size_rule_is_the_ipams() {
        use shoal_ingress::ipam::{Ipam, MAX_PREFIX_LEN};
        for len in 0..=32u8 {
            let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, len).unwrap();
            let text = net.to_string();
            assert_eq!(
                check_cidr(&text).is_ok(),
                Ipam::new(net).is_ok(),
                "{text}: the manager and the IPAM disagree"
            );
        }
        assert_eq!(MAX_PREFIX_LEN, 29);
        assert!(check_cidr("198.19.0.0/29").is_ok());
        let err = check_cidr("198.19.0.0/30").unwrap_err();
        assert_eq!(err, CidrError::TooSmall("198.19.0.0/30".into()));
        assert_eq!(
            err.to_string(),
            "invalid subnet \"198.19.0.0/30\": the prefix must be /29 or shorter, for addresses to give to nodes"
        );
    }

    /// A join refused on the pinned chain names the server, says what failed (not always
    /// "another swarm") and that the secret was not sent.
    #[test]
    fn join_errors_say_what_failed_in_the_pinned_chain() {
        use crate::trust::tls::PinFailure;
        let addr: SocketAddr = "198.18.0.1:2377".parse().unwrap();
        for (failure, words) in [
            (
                PinFailure::OtherSwarm,
                "does not hold the swarm CA named in the token",
            ),
            (
                PinFailure::NotSignedByCa,
                "its own certificate is not signed by that CA",
            ),
            (
                PinFailure::Expired {
                    not_after: 2_000,
                    now: 3_000,
                },
                "a certificate of this swarm that expired at 2000",
            ),
            (
                PinFailure::NotYetValid {
                    not_before: 4_000,
                    now: 3_000,
                },
                "a certificate of this swarm that is valid only from 4000",
            ),
            (PinFailure::NotManager, "not a manager's"),
        ] {
            let line = JoinError::Pinned { addr, failure }.to_string();
            assert!(line.starts_with("the server at 198.18.0.1:2377 "), "{line}");
            assert!(line.contains(words), "{line}");
            assert!(line.ends_with("; nothing was sent"), "{line}");
        }
    }

    /// A taken `--metrics-addr` is reported as the metrics address, not another one.
    #[tokio::test]
    async fn a_taken_metrics_address_is_named_as_such() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig {
            state_dir: dir.path().join("state"),
            socket: dir.path().join("shoal.sock"),
            hostname: "m".into(),
            gossip_addr: None,
            data_path: None,
            metrics_addr: Some(addr),
            socket_group: None,
        };
        let err = run(config, std::future::pending()).await.unwrap_err();
        assert!(matches!(err, AgentError::Metrics { .. }), "{err:?}");
        let line = err.to_string();
        assert!(
            line.starts_with(&format!("cannot listen on {addr} for metrics: ")),
            "{line}"
        );
        assert!(
            line.ends_with("; free the port or change --metrics-addr"),
            "{line}"
        );
    }

    /// The message of every warn-level event, while set as the thread's subscriber.
    #[derive(Clone, Default)]
    struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message<'a>(&'a mut String);
            impl tracing::field::Visit for Message<'_> {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        *self.0 = format!("{value:?}");
                    }
                }
            }
            if *event.metadata().level() == tracing::Level::WARN {
                let mut message = String::new();
                event.record(&mut Message(&mut message));
                self.0.lock().unwrap().push(message);
            }
        }
    }

    /// A watch stream that keeps failing (a "manager" that closes every connection) is counted
    /// every time and logged at warn level, once per [`FAULT_LOG_EVERY`].
    #[tokio::test]
    async fn a_failing_watch_stream_is_counted_and_warned() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let warnings = Warnings::default();
        let _log =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = listener.local_addr().unwrap();
        let closer = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        let ca = generate_ca().unwrap();
        let id = NodeId::from_random(2);
        let now = unix_now();
        let issued = crate::trust::tls::issue_node_cert(
            &ca,
            &id,
            Role::Worker,
            Validity::from_now(now, crate::trust::tls::DEFAULT_CERT_EXPIRY),
        )
        .unwrap();
        let mut state = State::default();
        state
            .apply(crate::manager::state::tests::init_cmd())
            .unwrap();
        let mut view = state.view().unwrap();
        for n in &mut view.nodes {
            if n.role == Role::Manager {
                n.api_addr = Some(api_addr);
            }
        }
        view.ca_cert_der = ca.cert_der.clone();
        let m = Membership {
            node_id: id,
            cert_der: issued.cert_der,
            key_pem: issued.key_pem,
            // Far from due for renewal: only the watch stream is tried.
            cert_not_after: now + 3 * view.cert_expiry_secs,
            view,
            listen_addr: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).await.unwrap());
        let faults = Arc::new(Faults::default());
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(watch_loop(
            store,
            MembershipCell::new(Some(m)),
            faults.clone(),
            stop,
        ));
        let failures = || faults.watch_failures.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while failures() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        closer.abort();
        assert!(failures() >= 3, "{} watch failures counted", failures());
        let warned: Vec<String> = warnings.0.lock().unwrap().clone();
        let watch: Vec<&String> = warned
            .iter()
            .filter(|w| w.starts_with("the watch stream to the manager failed; reconnecting: "))
            .collect();
        assert_eq!(watch.len(), 1, "one warning per period: {warned:?}");
        assert!(watch[0].contains(&api_addr.to_string()), "{warned:?}");
        assert_eq!(faults.renewal_failures.load(Ordering::Relaxed), 0);
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
