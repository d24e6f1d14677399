//! The manager: owns the [`State`], applies commands to it, persists every change, and
//! serves the API on 2377 (join, watch streams, leave, admin commands).
//!
//! All changes go through [`Manager::apply_with`]: the command is built and applied to a copy
//! under one lock, the copy is written to the store in one transaction, and only then does it
//! replace the live state and go out to every watch stream. A refused command or a failed
//! write changes nothing. With Raft (a later issue) the same commands become log entries.
//!
//! STATUS (Ready/Down) of a node is the OR of two signals: a live watch stream from that node
//! (closed at once when its agent dies, or after [`PING_TIMEOUT`] without a keep-alive), and
//! gossip, when the agent feeds it in through [`Manager::set_gossip_up`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::OsRng;
use rand::Rng as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::api::{
    hex, read_frame, write_frame, AdminRequest, FrameError, JoinGrant, ManagerReply,
    ManagerRequest, ManagerResponse, ManagerStatus, NodeStatus, Reply, Status,
};
use crate::id::NodeId;
use crate::state::{
    Applied, ApplyError, Availability, Cluster, ClusterView, Command, Node, Role, State,
};
use crate::store::{Current, Membership, Store, StoreError, Write};
use crate::tls::{cert_digest, sign_node_cert, Issued};
use crate::token::{CaDigest, Secret, Token};

/// A watch stream with no keep-alive for this long is closed and the node counted down.
pub const PING_TIMEOUT: Duration = Duration::from_secs(6);
/// How often a watching node sends a keep-alive.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most manager API connections served at once (watch streams included); more are closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// The message docker prints when a manager-only command runs on a worker.
pub const NOT_MANAGER: &str = "This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager.";
/// The message for a wrong or rotated join secret.
pub const INVALID_SECRET: &str = "A valid join token is necessary to join this cluster: the token's secret is wrong or was rotated; get the current token with `shoal join-token worker` on a manager";

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 128 fresh random bits from the OS.
pub fn random_u128() -> u128 {
    OsRng.gen()
}

/// 32 fresh random bytes from the OS.
pub fn random_key() -> [u8; 32] {
    OsRng.gen()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock cannot leave the state half-changed: changes
    // are made on a copy and swapped in whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The leader's manager.
pub struct Manager {
    self_id: NodeId,
    listen_addr: SocketAddr,
    own_cert: Issued,
    state: Mutex<State>,
    store: Arc<Store>,
    membership: Arc<Current>,
    views: watch::Sender<Arc<ClusterView>>,
    sessions: Mutex<HashMap<NodeId, usize>>,
    gossip_up: Mutex<Option<Arc<HashSet<NodeId>>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("self_id", &self.self_id)
            .finish()
    }
}

/// Why a change to the manager's state was not made. The state is exactly as before.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// This node has no swarm state.
    #[error("{NOT_MANAGER}")]
    NotManager,
    /// The state machine refused the command.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// The new state could not be saved, so it was not applied.
    #[error("the manager could not save the change: {0}")]
    Save(#[from] StoreError),
}

/// Why an admin command failed. Nothing changed: rm, promote and demote check every node
/// before they change any.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No network by this name.
    #[error("network {0} not found (shoal has one network, ingress)")]
    NoSuchNetwork(String),
    /// No such external VTEP.
    #[error("no external VTEP {0} on network ingress; `shoal network inspect ingress` lists them")]
    NoSuchVtep(String),
    /// No node has this ID, hostname or ID prefix.
    #[error("node {0} not found")]
    NotFound(String),
    /// Several nodes have this hostname.
    #[error("node {name} is ambiguous ({count} nodes have this hostname); use the node ID")]
    AmbiguousName {
        /// What was asked for.
        name: String,
        /// How many match.
        count: usize,
    },
    /// Several node IDs start with this prefix.
    #[error("node {name} is ambiguous ({count} node IDs start with it); type more of the ID")]
    AmbiguousPrefix {
        /// What was asked for.
        name: String,
        /// How many match.
        count: usize,
    },
    /// `rm` of the leader.
    #[error("node {0} is the leader and can't be removed; run `shoal leave --force` on it to dissolve the swarm")]
    RemoveLeader(NodeId),
    /// `rm` of a manager.
    #[error("node {0} is a cluster manager. It must be demoted to worker before removal")]
    RemoveManager(NodeId),
    /// `rm` without `--force` of a node that is up.
    #[error("node {0} is not down and can't be removed; stop it or run `shoal leave` on it first, or use --force")]
    NodeUp(NodeId),
    /// `demote` of the leader.
    #[error("node {0} is the leader and can't be demoted: shoal has no leader election yet, so the swarm would have no leader")]
    DemoteLeader(String),
    /// The change itself failed.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The stored join secret is damaged.
    #[error("the stored join secret is damaged ({0}); rotate it with `shoal join-token --rotate`")]
    Token(#[from] crate::token::TokenError),
}

/// Why a join was refused. Nothing was added to the node list.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The secret matches no role (wrong, or rotated away).
    #[error("{INVALID_SECRET}")]
    InvalidSecret,
    /// The host name is empty, too long or has control characters.
    #[error("the hostname must be 1 to 253 printable characters; pass --hostname to the agent")]
    BadHostname,
    /// The agent version string is too long.
    #[error("the agent version string is longer than 64 characters")]
    VersionTooLong,
    /// The node's certificate could not be made (e.g. a malformed public key).
    #[error(transparent)]
    Certificate(#[from] crate::tls::TlsError),
    /// Adding the node failed.
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// Why one manager API connection ended early (logged, never shown to a user).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS handshake failed or timed out.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The peer sent no request, or no keep-alive, in time.
    #[error("the peer went silent")]
    Silent,
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why a manager could not start from a state.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state has no cluster.
    #[error("the manager state is empty; run `shoal init`")]
    Empty,
}

impl Manager {
    /// A manager over an initialized `state`; `membership` is the agent's shared record,
    /// updated on every change.
    pub fn new(
        self_id: NodeId,
        listen_addr: SocketAddr,
        own_cert: Issued,
        state: State,
        store: Arc<Store>,
        membership: Arc<Current>,
    ) -> Result<Arc<Self>, StartError> {
        let view = state.view().ok_or(StartError::Empty)?;
        let (views, _) = watch::channel(Arc::new(view));
        Ok(Arc::new(Self {
            self_id,
            listen_addr,
            own_cert,
            state: Mutex::new(state),
            store,
            membership,
            views,
            sessions: Mutex::new(HashMap::new()),
            gossip_up: Mutex::new(None),
        }))
    }

    /// The current cluster view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.views.borrow().clone()
    }

    /// A copy of the state.
    pub fn state(&self) -> State {
        lock(&self.state).clone()
    }

    /// Feeds gossip's view: the set of node IDs gossip sees up (`None`: gossip not running).
    pub fn set_gossip_up(&self, up: Option<Arc<HashSet<NodeId>>>) {
        *lock(&self.gossip_up) = up;
    }

    /// Builds a command from the current state with `f` (`None`: nothing to do), applies
    /// it, persists, publishes.
    pub fn apply_with<T, E>(
        &self,
        f: impl FnOnce(&State) -> Result<(Option<Command>, T), E>,
    ) -> Result<(Applied, T), E>
    where
        E: From<ChangeError>,
    {
        let mut guard = lock(&self.state);
        let (command, extra) = f(&guard)?;
        let Some(command) = command else {
            return Ok((Applied::Unchanged, extra));
        };
        let mut next = guard.clone();
        let applied = next.apply(command).map_err(ChangeError::from)?;
        if applied == Applied::Unchanged {
            return Ok((applied, extra));
        }
        let view = next.view().ok_or(ChangeError::NotManager)?;
        let membership = Membership {
            node_id: self.self_id.clone(),
            cert_der: self.own_cert.cert_der.clone(),
            key_pem: self.own_cert.key_pem.clone(),
            view: view.clone(),
            listen_addr: Some(self.listen_addr),
        };
        self.store
            .write(&[Write::Manager(&next), Write::Membership(&membership)])
            .map_err(ChangeError::from)?;
        *guard = next;
        drop(guard);
        self.membership.set(Some(membership));
        self.views.send_replace(Arc::new(view));
        Ok((applied, extra))
    }

    /// Applies one ready-made command.
    pub fn apply(&self, command: Command) -> Result<Applied, ChangeError> {
        self.apply_with(|_| Ok::<_, ChangeError>((Some(command), ())))
            .map(|(a, ())| a)
    }

    /// True if `node` is up. Ourselves always; a node that left never; otherwise it needs a
    /// live watch stream and, when gossip runs, gossip must see it up too: a node the
    /// manager can reach but the cluster cannot gossip with is not Ready.
    pub fn is_up(&self, node: &Node) -> bool {
        if node.id == self.self_id {
            return true;
        }
        if node.left {
            return false;
        }
        let watching = lock(&self.sessions).get(&node.id).copied().unwrap_or(0) > 0;
        let gossip = lock(&self.gossip_up)
            .as_ref()
            .is_none_or(|up| up.contains(&node.id));
        watching && gossip
    }

    fn status(&self, cluster: &Cluster, node: &Node) -> NodeStatus {
        let up = self.is_up(node);
        let manager_status = match node.role {
            Role::Worker => None,
            Role::Manager if node.id == cluster.leader => Some(ManagerStatus::Leader),
            Role::Manager if up => Some(ManagerStatus::Reachable),
            Role::Manager => Some(ManagerStatus::Unreachable),
        };
        NodeStatus {
            id: node.id.clone(),
            hostname: node.hostname.clone(),
            addr: node.addr,
            role: node.role,
            status: if up { Status::Ready } else { Status::Down },
            availability: node.availability,
            manager_status,
            engine_version: node.engine_version.clone(),
            public_key: hex(&node.public_key),
            joined_at: node.joined_at,
            overlay_addr: node.overlay_addr,
            data_path: None,
        }
    }

    /// Handles a command that needs a manager. `caller` is the asking node (for the `*`).
    pub fn handle_admin(
        &self,
        request: AdminRequest,
        caller: &NodeId,
    ) -> Result<Reply, AdminError> {
        match request {
            AdminRequest::JoinToken { role, rotate } => {
                if rotate {
                    let secret = Secret::from_random(random_u128());
                    self.apply(Command::RotateSecret(role, secret.as_str().to_owned()))?;
                    info!(role = role.as_str(), "join token rotated");
                }
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let token = Token::parse(&format!(
                    "SWMTKN-1-{}-{}",
                    CaDigest::of(&cluster.ca.cert_der),
                    cluster.secret(role)
                ))?;
                Ok(Reply::JoinToken {
                    role,
                    token: token.to_string(),
                    join_addr: cluster.api_addr,
                    rotated: rotate,
                })
            }
            AdminRequest::NodeLs => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let mut nodes: Vec<NodeStatus> = cluster
                    .nodes
                    .values()
                    .map(|n| self.status(cluster, n))
                    .collect();
                nodes.sort_by(|a, b| (&a.hostname, &a.id).cmp(&(&b.hostname, &b.id)));
                Ok(Reply::Nodes {
                    self_id: Some(caller.clone()),
                    nodes,
                })
            }
            AdminRequest::NodeInspect { node } => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let id = resolve(cluster, &node)?;
                let node = &cluster.nodes[&id];
                Ok(Reply::Node(Box::new(self.status(cluster, node))))
            }
            AdminRequest::NodeRm { nodes, force } => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                // Check every node first: one refusal and nothing is removed.
                let mut ids = Vec::new();
                for name in &nodes {
                    let id = resolve(cluster, name)?;
                    let node = &cluster.nodes[&id];
                    if id == cluster.leader {
                        return Err(AdminError::RemoveLeader(id));
                    }
                    if node.role == Role::Manager {
                        return Err(AdminError::RemoveManager(id));
                    }
                    if self.is_up(node) && !force {
                        return Err(AdminError::NodeUp(id));
                    }
                    ids.push(id);
                }
                let mut lines = Vec::new();
                for id in ids {
                    self.apply(Command::RemoveNode(id.clone()))?;
                    info!(node = %id, "node removed");
                    lines.push(id.to_string());
                }
                Ok(Reply::Lines(lines))
            }
            AdminRequest::Promote { nodes } => self.set_roles(&nodes, Role::Manager),
            AdminRequest::Demote { nodes } => self.set_roles(&nodes, Role::Worker),
            AdminRequest::VtepAdd(v) | AdminRequest::VtepRm(v)
                if v.network != shoal_ingress::INGRESS_NAME =>
            {
                Err(AdminError::NoSuchNetwork(v.network))
            }
            AdminRequest::VtepAdd(v) => {
                let line = format!("{} {} {}", v.addr, v.mac, v.ip);
                self.apply(Command::AddVtep(crate::state::Vtep {
                    addr: v.addr,
                    mac: v.mac.to_ascii_lowercase(),
                    ip: v.ip,
                }))?;
                info!(vtep = %line, "external VTEP added");
                Ok(Reply::Lines(vec![line]))
            }
            AdminRequest::VtepRm(v) => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let found = cluster.ingress.vteps.iter().any(|x| {
                    x.ip == v.ip && x.addr == v.addr && x.mac.eq_ignore_ascii_case(&v.mac)
                });
                if !found {
                    return Err(AdminError::NoSuchVtep(format!(
                        "{} {} {}",
                        v.addr, v.mac, v.ip
                    )));
                }
                self.apply(Command::RemoveVtep(v.ip))?;
                info!(vtep = %v.ip, "external VTEP removed");
                Ok(Reply::Lines(vec![format!("{} {} {}", v.addr, v.mac, v.ip)]))
            }
        }
    }

    fn set_roles(&self, names: &[String], role: Role) -> Result<Reply, AdminError> {
        let state = self.state();
        let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
        let mut ids = Vec::new();
        for name in names {
            let id = resolve(cluster, name)?;
            if role == Role::Worker && id == cluster.leader {
                return Err(AdminError::DemoteLeader(name.clone()));
            }
            ids.push((name, id));
        }
        let mut lines = Vec::new();
        for (name, id) in ids {
            let applied = self.apply(Command::SetRole(id, role))?;
            lines.push(match (role, applied) {
                (Role::Manager, Applied::Changed) => {
                    format!("Node {name} promoted to a manager in the swarm.")
                }
                (Role::Manager, Applied::Unchanged) => format!("Node {name} is already a manager."),
                (Role::Worker, Applied::Changed) => format!("Manager {name} demoted in the swarm."),
                (Role::Worker, Applied::Unchanged) => format!("Node {name} is already a worker."),
            });
        }
        Ok(Reply::Lines(lines))
    }

    /// Admits a node that presented `secret`.
    pub fn handle_join(
        &self,
        secret: &str,
        hostname: &str,
        addr: IpAddr,
        public_key: [u8; 32],
        cert_public_key: &[u8],
        engine_version: &str,
    ) -> Result<JoinGrant, AdmitError> {
        if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
            return Err(AdmitError::BadHostname);
        }
        if engine_version.len() > 64 {
            return Err(AdmitError::VersionTooLong);
        }
        let id = NodeId::from_random(random_u128());
        let (_, (cert, role)) = self.apply_with(|state| -> Result<_, AdmitError> {
            let role = state
                .role_for_secret(secret)
                .ok_or(AdmitError::InvalidSecret)?;
            let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
            let cert = sign_node_cert(&cluster.ca, &id, role, cert_public_key)?;
            let node = Node {
                id: id.clone(),
                hostname: hostname.to_owned(),
                addr,
                role,
                availability: Availability::Active,
                public_key,
                cert_digest: cert_digest(&cert),
                engine_version: engine_version.to_owned(),
                left: false,
                overlay_addr: None,
                joined_at: unix_now(),
            };
            Ok((Some(Command::AddNode(Box::new(node))), (cert, role)))
        })?;
        info!(node = %id, hostname, role = role.as_str(), %addr, "node joined");
        Ok(JoinGrant {
            node_id: id,
            cert_der: cert,
            view: (*self.view()).clone(),
        })
    }

    /// The node whose certificate has this digest.
    fn caller(&self, digest: Option<[u8; 32]>) -> Option<Node> {
        let digest = digest?;
        let state = lock(&self.state);
        state
            .cluster()?
            .nodes
            .values()
            .find(|n| n.cert_digest == digest)
            .cloned()
    }

    /// Rotates the network keys if due at `now` (unix seconds). True if it rotated.
    pub fn rotate_keys_if_due(&self, now: u64) -> Result<bool, ChangeError> {
        let (applied, ()) = self.apply_with(|state| -> Result<_, ChangeError> {
            let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
            if now < cluster.keys.next_rotation() {
                return Ok((None, ()));
            }
            Ok((
                Some(Command::RotateKeys {
                    gossip_key: random_key(),
                    data_path_key: random_key(),
                    at: now,
                }),
                (),
            ))
        })?;
        Ok(applied == Applied::Changed)
    }

    /// Serves the API on `listener` until `stop` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        mut stop: watch::Receiver<bool>,
    ) {
        let rotator = tokio::spawn(self.clone().rotate_keys_loop(stop.clone()));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            warn!(%peer, "manager API: {MAX_CONNECTIONS} connections open; refused one");
                            continue;
                        };
                        let me = self.clone();
                        let acceptor = acceptor.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.connection(tcp, acceptor, stop).await {
                                debug!(%peer, "manager API connection: {e}");
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        warn!("manager API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
        rotator.abort();
    }

    async fn rotate_keys_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let interval = self.state().cluster().map_or(60, |c| c.keys.interval_secs);
        let tick = Duration::from_secs((interval / 2).clamp(1, 30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            match self.rotate_keys_if_due(unix_now()) {
                Ok(true) => info!("network keys rotated"),
                Ok(false) => {}
                Err(e) => warn!("network key rotation failed: {e}"),
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        stop: watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| ServeError::Handshake("timed out".into()))?
            .map_err(|e| ServeError::Handshake(e.to_string()))?;
        let digest = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| cert_digest(c.as_ref()));
        let request: ManagerRequest =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut tls)).await {
                Err(_) => return Err(ServeError::Silent),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(r))) => r,
            };
        let response: ManagerResponse = match request {
            ManagerRequest::Join {
                secret,
                hostname,
                addr,
                public_key,
                cert_public_key,
                engine_version,
            } => self
                .handle_join(
                    &secret,
                    &hostname,
                    addr,
                    public_key,
                    &cert_public_key,
                    &engine_version,
                )
                .map(|g| ManagerReply::Joined(Box::new(g)))
                .map_err(|e| e.to_string()),
            ManagerRequest::Watch => {
                return match self.caller(digest) {
                    Some(node) => self.watch(tls, node.id, stop).await,
                    None => {
                        let r: ManagerResponse = Ok(ManagerReply::Removed);
                        Ok(write_frame(&mut tls, &r).await?)
                    }
                };
            }
            ManagerRequest::Ping => Ok(ManagerReply::Ok),
            ManagerRequest::Leave => match self.caller(digest) {
                Some(node) => self
                    .apply(Command::MarkLeft(node.id.clone()))
                    .map(|_| {
                        info!(node = %node.id, "node left");
                        ManagerReply::Ok
                    })
                    .map_err(|e| e.to_string()),
                None => Err(not_member()),
            },
            ManagerRequest::Admin(request) => match self.caller(digest) {
                Some(node) if node.role == Role::Manager => self
                    .handle_admin(request, &node.id)
                    .map(|r| ManagerReply::Admin(Box::new(r)))
                    .map_err(|e| e.to_string()),
                Some(_) => Err(NOT_MANAGER.into()),
                None => Err(not_member()),
            },
        };
        write_frame(&mut tls, &response).await?;
        use tokio::io::AsyncWriteExt as _;
        let _ = tls.shutdown().await;
        Ok(())
    }

    async fn watch<S>(
        self: Arc<Self>,
        stream: S,
        id: NodeId,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), ServeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _session = Session::start(&self, &id);
        debug!(node = %id, "watch stream open");
        let (mut rd, mut wr) = tokio::io::split(stream);
        // The reader runs apart so a half-read frame is never cancelled.
        let (alive_tx, mut alive) = mpsc::channel::<()>(4);
        let reader = tokio::spawn(async move {
            while let Ok(Some(ManagerRequest::Ping)) = read_frame(&mut rd).await {
                if alive_tx.send(()).await.is_err() {
                    break;
                }
            }
        });
        let mut views = self.views.subscribe();
        let mut current = Some(views.borrow_and_update().clone());
        let result = loop {
            if let Some(view) = current.take() {
                let reply: ManagerResponse = if view.node(&id).is_some() {
                    Ok(ManagerReply::View(Box::new((*view).clone())))
                } else {
                    Ok(ManagerReply::Removed)
                };
                let removed = matches!(reply, Ok(ManagerReply::Removed));
                if let Err(e) = write_frame(&mut wr, &reply).await {
                    break Err(e.into());
                }
                if removed {
                    break Ok(());
                }
            }
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    current = Some(views.borrow_and_update().clone());
                }
                ping = tokio::time::timeout(PING_TIMEOUT, alive.recv()) => match ping {
                    Ok(Some(())) => {}
                    Ok(None) => break Ok(()),
                    Err(_) => break Err(ServeError::Silent),
                },
                _ = stop.changed() => break Ok(()),
            }
        };
        reader.abort();
        debug!(node = %id, "watch stream closed");
        result
    }
}

fn not_member() -> String {
    "this node's certificate is not in the swarm any more (the node was removed); run `shoal leave`, then join again".into()
}

/// Counts a watch stream for as long as it lives.
struct Session<'a> {
    manager: &'a Manager,
    id: NodeId,
}

impl<'a> Session<'a> {
    fn start(manager: &'a Manager, id: &NodeId) -> Self {
        *lock(&manager.sessions).entry(id.clone()).or_insert(0) += 1;
        Self {
            manager,
            id: id.clone(),
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let mut sessions = lock(&self.manager.sessions);
        if let Some(n) = sessions.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sessions.remove(&self.id);
            }
        }
    }
}

/// Finds a node by exact ID, then unique hostname, then unique ID prefix, as docker does.
pub fn resolve(cluster: &Cluster, name: &str) -> Result<NodeId, AdminError> {
    resolve_among(
        cluster.nodes.values().map(|n| (&n.id, n.hostname.as_str())),
        name,
    )
}

/// [`resolve`] among any list of (node ID, host name): a node list from a cluster view, for
/// example.
pub fn resolve_among<'a, I>(nodes: I, name: &str) -> Result<NodeId, AdminError>
where
    I: Iterator<Item = (&'a NodeId, &'a str)> + Clone,
{
    if let Ok(id) = name.parse::<NodeId>() {
        if nodes.clone().any(|(n, _)| *n == id) {
            return Ok(id);
        }
    }
    let by_name: Vec<&NodeId> = nodes
        .clone()
        .filter(|(_, hostname)| *hostname == name)
        .map(|(id, _)| id)
        .collect();
    match by_name.as_slice() {
        [one] => return Ok((*one).clone()),
        [] => {}
        many => {
            return Err(AdminError::AmbiguousName {
                name: name.to_owned(),
                count: many.len(),
            })
        }
    }
    let by_prefix: Vec<&NodeId> = if name.is_empty() {
        Vec::new()
    } else {
        nodes
            .map(|(id, _)| id)
            .filter(|id| id.as_str().starts_with(name))
            .collect()
    };
    match by_prefix.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(AdminError::NotFound(name.to_owned())),
        many => Err(AdminError::AmbiguousPrefix {
            name: name.to_owned(),
            count: many.len(),
        }),
    }
}

/// The address joiners use, from the advertise address and the API port.
pub fn join_addr(advertise: IpAddr, listen: SocketAddr) -> SocketAddr {
    SocketAddr::new(advertise, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{init_cmd, node};
    use crate::state::{CaMaterial, Init, Network};
    use crate::tls::{generate_ca, issue_node_cert};

    struct Fixture {
        _dir: tempfile::TempDir,
        manager: Arc<Manager>,
        membership: Arc<Current>,
    }

    fn leader() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let ca: CaMaterial = generate_ca().unwrap();
        let id = NodeId::from_random(1);
        let own = issue_node_cert(&ca, &id, Role::Manager).unwrap();
        let mut leader = node(1, Role::Manager);
        leader.cert_digest = cert_digest(&own.cert_der);
        let mut state = State::default();
        state
            .apply(Command::Init(Box::new(Init {
                ca,
                leader,
                api_addr: "127.0.0.1:2377".parse().unwrap(),
                worker_secret: Secret::from_random(11).as_str().into(),
                manager_secret: Secret::from_random(22).as_str().into(),
                gossip_key: [1; 32],
                data_path_key: [2; 32],
                key_interval_secs: 100,
                ingress: Network {
                    name: "ingress".into(),
                    vni: 4096,
                    subnet: "198.19.0.0/24".into(),
                    encrypted: true,
                    data_path_port: 4789,
                    vteps: Vec::new(),
                },
                at: 1000,
            })))
            .unwrap();
        let membership = Current::new(None);
        let manager = Manager::new(
            id,
            "127.0.0.1:2377".parse().unwrap(),
            own,
            state,
            store,
            membership.clone(),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            manager,
            membership,
        }
    }

    fn join(m: &Manager, secret: u128, host: &str) -> Result<JoinGrant, String> {
        m.handle_join(
            Secret::from_random(secret).as_str(),
            host,
            "198.18.0.9".parse().unwrap(),
            [9; 32],
            &crate::tls::NodeKey::generate().unwrap().public_raw(),
            "0.1.0",
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn join_checks_the_secret_and_changes_nothing_on_refusal() {
        let f = leader();
        let before = f.manager.state();
        assert_eq!(join(&f.manager, 33, "w1").unwrap_err(), INVALID_SECRET);
        assert_eq!(f.manager.state(), before);
        assert!(join(&f.manager, 11, "").unwrap_err().contains("hostname"));
        assert!(join(&f.manager, 11, "a\nb")
            .unwrap_err()
            .contains("hostname"));
        assert!(join(&f.manager, 11, &"x".repeat(254))
            .unwrap_err()
            .contains("hostname"));
        assert_eq!(f.manager.state(), before);
        join(&f.manager, 11, "w1").unwrap();
        assert_eq!(f.manager.state().version, before.version + 1);

        let grant = join(&f.manager, 22, "m2").unwrap();
        assert_eq!(grant.view.node(&grant.node_id).unwrap().role, Role::Manager);
        assert_eq!(grant.view.nodes.len(), 3);
        // The leader's own record follows every change.
        let kept = f.membership.get().unwrap();
        assert_eq!(kept.view.version, f.manager.state().version);
    }

    #[test]
    fn rotated_secret_is_refused_at_once() {
        let f = leader();
        let me = NodeId::from_random(1);
        let Reply::JoinToken { token: old, .. } = f
            .manager
            .handle_admin(
                AdminRequest::JoinToken {
                    role: Role::Worker,
                    rotate: false,
                },
                &me,
            )
            .unwrap()
        else {
            panic!("not a token")
        };
        let Reply::JoinToken {
            token: new,
            rotated,
            ..
        } = f
            .manager
            .handle_admin(
                AdminRequest::JoinToken {
                    role: Role::Worker,
                    rotate: true,
                },
                &me,
            )
            .unwrap()
        else {
            panic!("not a token")
        };
        assert!(rotated);
        assert_ne!(old, new);
        assert_eq!(join(&f.manager, 11, "w").unwrap_err(), INVALID_SECRET);
        let secret = Token::parse(&new).unwrap().secret;
        assert!(f
            .manager
            .handle_join(
                secret.as_str(),
                "w",
                "198.18.0.9".parse().unwrap(),
                [9; 32],
                &crate::tls::NodeKey::generate().unwrap().public_raw(),
                "0.1.0"
            )
            .is_ok());
        // A certificate key that is not a P-256 point: refused, nothing added.
        let before = f.manager.state();
        let err = f
            .manager
            .handle_join(
                secret.as_str(),
                "w",
                "198.18.0.9".parse().unwrap(),
                [9; 32],
                &[4; 10],
                "0.1.0",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("P-256"), "{err}");
        assert_eq!(f.manager.state(), before);
    }

    #[test]
    fn rm_refuses_an_up_node_unless_forced() {
        let f = leader();
        let me = NodeId::from_random(1);
        let rm = |force| AdminRequest::NodeRm {
            nodes: vec!["w".into()],
            force,
        };
        // Gossip alone is not enough: without a watch stream the node is down and goes.
        let first = join(&f.manager, 11, "w").unwrap();
        f.manager
            .set_gossip_up(Some(Arc::new(HashSet::from([first.node_id.clone()]))));
        assert!(f.manager.handle_admin(rm(false), &me).is_ok());
        // A watch stream and gossip: up, so refused without --force.
        let grant = join(&f.manager, 11, "w").unwrap();
        f.manager
            .set_gossip_up(Some(Arc::new(HashSet::from([grant.node_id.clone()]))));
        let session = Session::start(&f.manager, &grant.node_id);
        // A watch stream but gossip does not see it: down.
        f.manager.set_gossip_up(Some(Arc::new(HashSet::new())));
        let node = f.manager.state().cluster().unwrap().nodes[&grant.node_id].clone();
        assert!(!f.manager.is_up(&node));
        f.manager
            .set_gossip_up(Some(Arc::new(HashSet::from([grant.node_id.clone()]))));
        assert!(f.manager.is_up(&node));
        let err = f
            .manager
            .handle_admin(rm(false), &me)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not down"), "{err}");
        assert_eq!(f.manager.state().cluster().unwrap().nodes.len(), 2);
        // All-or-nothing: one bad name and nothing is removed.
        let err = f
            .manager
            .handle_admin(
                AdminRequest::NodeRm {
                    nodes: vec!["w".into(), "nope".into()],
                    force: true,
                },
                &me,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
        assert_eq!(f.manager.state().cluster().unwrap().nodes.len(), 2);
        assert_eq!(
            f.manager.handle_admin(rm(true), &me).unwrap(),
            Reply::Lines(vec![grant.node_id.to_string()])
        );
        drop(session);
        // The leader itself.
        let err = f
            .manager
            .handle_admin(
                AdminRequest::NodeRm {
                    nodes: vec!["n1".into()],
                    force: true,
                },
                &me,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("leader"), "{err}");
    }

    #[test]
    fn keys_rotate_when_due_and_persist() {
        let f = leader();
        let v = f.manager.state().version;
        assert!(!f.manager.rotate_keys_if_due(1099).unwrap());
        assert_eq!(f.manager.state().version, v);
        assert!(f.manager.rotate_keys_if_due(1100).unwrap());
        let keys = f.manager.view().keys.clone();
        assert_eq!(
            keys.data_path.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(keys.next_rotation(), 1200);
        assert_eq!(
            f.manager.store.manager().unwrap().unwrap(),
            f.manager.state()
        );
    }

    fn resolve_s(c: &Cluster, name: &str) -> Result<NodeId, String> {
        resolve(c, name).map_err(|e| e.to_string())
    }

    #[test]
    fn resolve_by_id_name_prefix() {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        let mut twin = node(3, Role::Worker);
        twin.hostname = "n2".into();
        s.apply(Command::AddNode(Box::new(twin))).unwrap();
        let c = s.cluster().unwrap();
        let id2 = NodeId::from_random(2);
        assert_eq!(resolve_s(c, id2.as_str()), Ok(id2.clone()));
        assert_eq!(resolve_s(c, "n1"), Ok(NodeId::from_random(1)));
        assert!(resolve_s(c, "n2").unwrap_err().contains("ambiguous"));
        assert!(resolve_s(c, "000000").unwrap_err().contains("ambiguous"));
        assert_eq!(resolve_s(c, "0000000000000000000000002"), Ok(id2));
        assert!(resolve_s(c, "nope").unwrap_err().contains("not found"));
        assert!(resolve_s(c, "").unwrap_err().contains("not found"));
    }
}
