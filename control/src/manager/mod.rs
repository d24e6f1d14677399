//! The manager: serves the API on 2377 (join, watch streams, leave, admin commands, and the
//! managers' Raft) over the replicated [`State`].
//!
//! Every manager runs one. All changes go through [`Manager::apply_with`]: one at a time per
//! manager, in the order they were asked for (the turn, a fair async lock), the command is
//! built from this manager's state and committed through the Raft leader ([`raft`]), wherever
//! it is; the state machine decides it (a refused command changes nothing), every manager
//! writes the result to its store in one transaction, and only then does it replace the live
//! state and go out to that manager's watch streams. The caller hears back once this manager
//! has applied it. Without a leader, a change fails within [`raft::PROPOSE_TIMEOUT`] with
//! docker's message ([`raft::NO_LEADER`]).
//!
//! STATUS (Ready/Down) of a node is the OR of two signals: a live watch stream from that node
//! (closed at once when its agent dies, or after [`PING_TIMEOUT`] without a keep-alive), and
//! gossip, when the agent feeds it in through [`Manager::set_gossip_up`].

pub mod networks;
pub mod raft;
pub mod services;
pub mod state;

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
    hex, read_frame, write_frame, AdminRequest, FrameError, IssuedCert, JoinGrant, ManagerReply,
    ManagerRequest, ManagerResponse, ManagerStatus, NodeStatus, Reply, ServiceDetail, Status,
};
use crate::id::NodeId;
use crate::manager::networks::{NetworkError, NetworkSpec};
use crate::manager::raft::{ProposeError, Replica};
use crate::manager::services::{HealthSpec, Service, ServiceError, ServiceSpec};
use crate::manager::state::{
    Applied, ApplyError, Availability, Cluster, ClusterView, Command, Node, NodeCert, Role, State,
};
use crate::store::{MembershipCell, Store, StoreError};
use crate::token::{CaDigest, Secret, Token};
use crate::trust::join::{Claim, ProofError, Proofs as _, EXPORTER_LABEL, EXPORTER_LEN};
use crate::trust::tls::{cert_digest, sign_node_cert, Issued, Validity};
use shoal_proto::view::HealthV1;

/// A watch stream with no keep-alive for this long is closed and the node counted down.
pub const PING_TIMEOUT: Duration = Duration::from_secs(6);
/// How often a watching node sends a keep-alive.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Most manager API connections served at once (watch streams included); more are closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most connections whose peer has not shown a member's certificate yet (joins, and anyone
/// else); more are closed at once.
pub const MAX_PREAUTH: usize = 128;
/// Most connections from one address, authenticated or not (a member has one watch stream
/// and the odd request).
pub const MAX_PER_SOURCE: usize = 8;
/// Time a connection has for its TLS handshake and first request.
pub const PREAUTH_DEADLINE: Duration = Duration::from_secs(5);
/// How often refused connections are logged, at most (with their count).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

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

/// A manager: this node's part of the Raft group and the API it serves.
pub struct Manager {
    self_id: NodeId,
    /// This node's X25519 secret: joining nodes prove they hold theirs against it.
    node_secret: zeroize::Zeroizing<[u8; 32]>,
    /// The Raft node, with the live state (its replica).
    raft: Arc<raft::Node>,
    /// Held by one change at a time, from the state it reads until its result is live here.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Watch streams open here, by node; and when the last one of a node closed.
    sessions: Mutex<HashMap<NodeId, usize>>,
    ended: Mutex<HashMap<NodeId, std::time::Instant>>,
    gate: Arc<Gate>,
    gossip_up: Mutex<Option<Arc<HashSet<NodeId>>>>,
    endpoints: Mutex<Option<EndpointCount>>,
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
    /// No leader (too few managers up), or no commit in time.
    #[error("{}", raft::NO_LEADER)]
    NoLeader,
    /// The new state could not be saved, so it was not applied.
    #[error("the manager could not save the change: {0}")]
    Save(#[from] StoreError),
    /// A certificate could not be issued.
    #[error("the manager could not issue a certificate: {0}")]
    Certificate(crate::trust::tls::TlsError),
}

/// Why an admin command failed. Nothing changed: rm, promote and demote check every node
/// before they change any.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No network by this name.
    #[error("external VTEPs join network ingress only, not {0}")]
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
    /// `rm` of a manager.
    #[error("node {0} is a cluster manager. It must be demoted to worker before removal")]
    RemoveManager(NodeId),
    /// `rm` without `--force` of a node that is up.
    #[error("node {0} is not down and can't be removed; stop it or run `shoal leave` on it first, or use --force")]
    NodeUp(NodeId),
    /// The change itself failed.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The stored join secret is damaged.
    #[error("the stored join secret is damaged ({0}); rotate it with `shoal join-token --rotate`")]
    Token(#[from] crate::token::TokenError),
    /// A node whose record has no certificate key cannot get a new certificate.
    #[error("node {0} joined before certificates named roles and cannot be given a new one; run `shoal leave` on it and join it again")]
    NoCertKey(NodeId),
    /// `network rm` of a network with containers attached (docker's words).
    #[error("network {0} has active endpoints")]
    ActiveEndpoints(String),
    /// `service backend add|rm` with an endpoint that is no IPv4 address (nor, on the node
    /// that was asked, a local container).
    #[error("endpoint {0:?} is neither an IPv4 address nor a container attached on this node: give its IP on the service's network")]
    BadEndpoint(String),
    /// Several services' IDs start with this prefix.
    #[error(
        "service {name} is ambiguous ({count} service IDs start with it); type more of the ID"
    )]
    AmbiguousService {
        /// What was asked for.
        name: String,
        /// How many match.
        count: usize,
    },
    /// A node naming as a backend an address the view does not give it.
    #[error("address {ip} is not this node's on the network of service {service}: a node makes backends of its own endpoints only")]
    NotYourAddress {
        /// The address.
        ip: std::net::Ipv4Addr,
        /// The service.
        service: String,
    },
}

/// How many endpoints of a user network the manager's node knows to be live (its own and
/// those other nodes announce): `network rm` refuses a network with any.
pub type EndpointCount = Arc<dyn Fn(&crate::cluster::UserNetwork) -> usize + Send + Sync>;

impl From<ApplyError> for AdminError {
    fn from(e: ApplyError) -> Self {
        AdminError::Change(ChangeError::Refused(e))
    }
}

/// What `name` names among `items` (name, ID), as docker takes a name, an ID or a unique
/// prefix of one: `Ok(Some(the name))`, `Ok(None)` for nothing, `Err(count)` for a prefix of
/// several IDs.
fn by_name_or_id<'a>(
    items: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    name: &str,
) -> Result<Option<String>, usize> {
    if items.clone().any(|(n, _)| n == name) {
        return Ok(Some(name.to_owned()));
    }
    let mut by_id = items.filter(|(_, id)| !name.is_empty() && id.starts_with(name));
    match (by_id.next(), by_id.next()) {
        (Some((n, _)), None) => Ok(Some(n.to_owned())),
        (Some(_), Some(_)) => Err(2 + by_id.count()),
        (None, _) => Ok(None),
    }
}

/// The name of the network called `name`, or whose ID is or starts with `name`.
pub fn resolve_network(cluster: &Cluster, name: &str) -> Result<String, AdminError> {
    if name == cluster.ingress.name {
        return Ok(name.to_owned());
    }
    let items = cluster
        .networks
        .values()
        .map(|n| (n.name.as_str(), n.id.as_str()));
    match by_name_or_id(items, name) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(ApplyError::from(NetworkError::NotFound(name.to_owned())).into()),
        Err(count) => Err(AdminError::AmbiguousPrefix {
            name: name.to_owned(),
            count,
        }),
    }
}

/// The name of the service called `name`, or whose ID is or starts with `name`.
pub fn resolve_service(cluster: &Cluster, name: &str) -> Result<String, AdminError> {
    let items = cluster
        .services
        .values()
        .map(|s| (s.name.as_str(), s.id.as_str()));
    match by_name_or_id(items, name) {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(ApplyError::from(ServiceError::NotFound(name.to_owned())).into()),
        Err(count) => Err(AdminError::AmbiguousService {
            name: name.to_owned(),
            count,
        }),
    }
}

/// A service as `service ls` and `inspect` show it.
pub fn service_detail(cluster: &Cluster, s: &Service) -> ServiceDetail {
    ServiceDetail {
        id: s.id.clone(),
        name: s.name.clone(),
        network: cluster
            .networks
            .values()
            .find(|n| n.id == s.network)
            .map(|n| n.name.clone())
            .unwrap_or_default(),
        network_id: s.network.clone(),
        endpoint_mode: s.endpoint_mode,
        vip: s.vip,
        ports: s.ports.iter().map(|&p| p.into()).collect(),
        backends: s.backends.iter().copied().collect(),
        health: HealthV1 {
            interval_ms: s.health.interval_ms,
            retries: s.health.retries,
        },
        created_at: s.created_at,
    }
}

/// A certificate for `node` in `role`, for the key its current one certifies.
pub fn issue_cert(cluster: &Cluster, node: &Node, role: Role) -> Result<NodeCert, AdminError> {
    if node.cert_public_key.is_empty() {
        return Err(AdminError::NoCertKey(node.id.clone()));
    }
    let validity = Validity::from_now(unix_now(), Duration::from_secs(cluster.cert_expiry_secs));
    let der = sign_node_cert(&cluster.ca, &node.id, role, &node.cert_public_key, validity)
        .map_err(|e| AdminError::Change(ChangeError::Certificate(e)))?;
    Ok(NodeCert {
        digest: cert_digest(&der),
        der,
        not_after: validity.not_after,
    })
}

/// `init --force-new-cluster` on node `self_id`, whose manager has stopped: the first state of
/// a new group of one, from what the store holds ([`raft::last_known_state`]) with every other
/// manager demoted ([`State::force_new_cluster`]); and the managers demoted.
pub async fn forced_state(
    store: &Arc<Store>,
    self_id: &NodeId,
) -> Result<(State, Vec<NodeId>), ForceError> {
    let mut state = raft::last_known_state(store).await?;
    let demoted = state.force_new_cluster(self_id, |cluster, node| {
        issue_cert(cluster, node, Role::Worker)
    })?;
    Ok((state, demoted))
}

/// Why `init --force-new-cluster` did not happen. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ForceError {
    /// This manager's state or log could not be read.
    #[error("cannot read this manager's state: {0}")]
    Store(#[from] StoreError),
    /// The state refused it (not a manager), or a certificate could not be issued.
    #[error(transparent)]
    Refused(#[from] AdminError),
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
    Certificate(#[from] crate::trust::tls::TlsError),
    /// The node did not prove it holds the keys it sent.
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// The TLS session gave no exporter bytes to bind the proofs to.
    #[error("the join connection cannot bind its proofs (no TLS exporter): {0}")]
    Exporter(String),
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
    /// A Raft channel ended on an error.
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Raft did not start.
    #[error(transparent)]
    Raft(#[from] raft::StartError),
}

impl From<ProposeError> for ChangeError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NoLeader => ChangeError::NoLeader,
            ProposeError::Refused(e) => ChangeError::Refused(e),
        }
    }
}

impl Manager {
    /// Starts the manager of node `self_id` (Raft ID `raft_id`, API on `listen_addr`, serving
    /// with `own_cert`), over what the store holds: `state` (empty on a manager that has just
    /// joined: it gets the state from the leader) and the Raft log. `bootstrap`: a new group of
    /// one if there is no Raft log yet (`init`, or a state dir from before Raft).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        self_id: NodeId,
        raft_id: u64,
        listen_addr: SocketAddr,
        own_cert: (Issued, u64),
        node_secret: [u8; 32],
        state: State,
        store: Arc<Store>,
        membership: Arc<MembershipCell>,
        bootstrap: bool,
    ) -> Result<Arc<Self>, StartError> {
        // Before it has a state, a manager knows the cluster from its join view.
        let view = membership.get().map_or_else(ClusterView::empty, |m| m.view);
        let replica = Replica::open(
            self_id.clone(),
            raft_id,
            listen_addr,
            own_cert,
            state,
            store,
            membership,
            view,
        )
        .await?;
        let raft = raft::Node::start(replica, bootstrap).await?;
        Ok(Arc::new(Self {
            self_id,
            node_secret: zeroize::Zeroizing::new(node_secret),
            raft,
            turn: Arc::new(tokio::sync::Mutex::new(())),
            sessions: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            gate: Arc::new(Gate::default()),
            gossip_up: Mutex::new(None),
            endpoints: Mutex::new(None),
        }))
    }

    /// Stops this manager's Raft (the API stops with [`Manager::serve`]'s stop signal).
    pub async fn shutdown(&self) {
        self.raft.shutdown().await;
    }

    /// The Raft node.
    pub fn raft(&self) -> &Arc<raft::Node> {
        &self.raft
    }

    fn replica(&self) -> &Replica {
        &self.raft.replica
    }

    /// The current cluster view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.replica().view()
    }

    /// A copy of the state.
    pub fn state(&self) -> State {
        self.replica().state()
    }

    /// Feeds gossip's view: the set of node IDs gossip sees up (`None`: gossip not running).
    pub fn set_gossip_up(&self, up: Option<Arc<HashSet<NodeId>>>) {
        *lock(&self.gossip_up) = up;
    }

    /// Where `network rm` learns whether a network has endpoints (the agent's table).
    pub fn set_endpoint_count(&self, count: EndpointCount) {
        *lock(&self.endpoints) = Some(count);
    }

    /// Whether this manager leads (and heard from a quorum lately).
    pub fn is_leader(&self) -> bool {
        self.raft.leader() == Some(self.replica().raft_id)
    }

    /// Builds a command from the current state with `f` (`None`: nothing to do) and commits it
    /// through the leader; returns once this manager has applied it. Changes asked of this
    /// manager run one at a time, in the order they were asked for.
    pub async fn apply_with<T, E>(
        &self,
        f: impl FnOnce(&State) -> Result<(Option<Command>, T), E>,
    ) -> Result<(Applied, T), E>
    where
        E: From<ChangeError>,
    {
        let _turn = self.turn.clone().lock_owned().await;
        let (command, extra) = f(&self.state())?;
        let Some(command) = command else {
            return Ok((Applied::Unchanged, extra));
        };
        let applied = self
            .raft
            .propose(command)
            .await
            .map_err(ChangeError::from)?;
        Ok((applied, extra))
    }

    /// The certificate this node serves with.
    pub fn own_cert(&self) -> Issued {
        self.replica().own_cert().0
    }

    /// Applies one ready-made command.
    pub async fn apply(&self, command: Command) -> Result<Applied, ChangeError> {
        self.apply_with(|_| Ok::<_, ChangeError>((Some(command), ())))
            .await
            .map(|(a, ())| a)
    }

    /// The managers this one sees reachable (itself included).
    fn reachable_managers(&self, cluster: &Cluster) -> std::collections::BTreeSet<NodeId> {
        cluster
            .managers()
            .filter(|n| n.raft_id.is_some_and(|r| self.raft.reachable(r)))
            .map(|n| n.id.clone())
            .collect()
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
        match lock(&self.gossip_up).as_ref() {
            // Without gossip, the watch streams here are all this manager knows.
            None => watching,
            // A node follows one manager; the others know it from gossip. A worker whose
            // stream here just ended (its agent stopped) is down at once, as before gossip
            // agrees. (A manager has no stream: a promoted node's ends when its manager starts.)
            Some(up) => {
                let lost_here = !watching
                    && node.role == Role::Worker
                    && lock(&self.ended)
                        .get(&node.id)
                        .is_some_and(|t| t.elapsed() < LOST_STREAM_HOLD);
                up.contains(&node.id) && !lost_here
            }
        }
    }

    fn status(&self, node: &Node) -> NodeStatus {
        let up = self.is_up(node);
        let leader = self.raft.leader();
        // Reachable: a voter of the Raft group that answered lately. A manager still catching
        // up (a learner) is not yet part of any quorum.
        let voters = self.raft.voters();
        let manager_status = match (node.role, node.raft_id) {
            (Role::Worker, _) => None,
            (Role::Manager, Some(r)) if Some(r) == leader => Some(ManagerStatus::Leader),
            (Role::Manager, Some(r)) if voters.contains(&r) && self.raft.reachable(r) => {
                Some(ManagerStatus::Reachable)
            }
            (Role::Manager, _) => Some(ManagerStatus::Unreachable),
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
    pub async fn handle_admin(
        &self,
        request: AdminRequest,
        caller: &NodeId,
    ) -> Result<Reply, AdminError> {
        match request {
            AdminRequest::JoinToken { role, rotate } => {
                if rotate {
                    let secret = Secret::from_random(random_u128());
                    self.apply(Command::RotateSecret(role, secret.as_str().to_owned()))
                        .await?;
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
                    join_addr: self.replica().api_addr(),
                    rotated: rotate,
                })
            }
            AdminRequest::NodeLs => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let mut nodes: Vec<NodeStatus> =
                    cluster.nodes.values().map(|n| self.status(n)).collect();
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
                Ok(Reply::Node(Box::new(self.status(node))))
            }
            AdminRequest::NodeRm { nodes, force } => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                // Check every node first: one refusal and nothing is removed.
                let mut ids = Vec::new();
                for name in &nodes {
                    let id = resolve(cluster, name)?;
                    let node = &cluster.nodes[&id];
                    if node.role == Role::Manager && node.active() {
                        return Err(AdminError::RemoveManager(id));
                    }
                    if self.is_up(node) && !force {
                        return Err(AdminError::NodeUp(id));
                    }
                    ids.push(id);
                }
                let mut lines = Vec::new();
                for id in ids {
                    self.apply(Command::RemoveNode(id.clone())).await?;
                    info!(node = %id, "node removed");
                    lines.push(id.to_string());
                }
                self.rotate_now_if_owed().await;
                Ok(Reply::Lines(lines))
            }
            AdminRequest::Promote { nodes } => self.set_roles(&nodes, Role::Manager).await,
            AdminRequest::Demote { nodes } => self.set_roles(&nodes, Role::Worker).await,
            AdminRequest::VtepAdd(v) | AdminRequest::VtepRm(v)
                if v.network != shoal_ingress::INGRESS_NAME =>
            {
                Err(AdminError::NoSuchNetwork(v.network))
            }
            AdminRequest::VtepAdd(v) => {
                let line = format!("{} {} {}", v.addr, v.mac, v.ip);
                self.apply(Command::AddVtep(state::Vtep {
                    addr: v.addr,
                    mac: v.mac.to_ascii_lowercase(),
                    ip: v.ip,
                }))
                .await?;
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
                self.apply(Command::RemoveVtep(v.ip)).await?;
                info!(vtep = %v.ip, "external VTEP removed");
                Ok(Reply::Lines(vec![format!("{} {} {}", v.addr, v.mac, v.ip)]))
            }
            AdminRequest::NetworkCreate(args) => {
                let subnet = match &args.subnet {
                    Some(s) => Some(s.parse().map_err(|_| {
                        AdminError::from(ApplyError::Ipam(format!(
                            "invalid --subnet {s:?}: use a CIDR such as 10.20.0.0/24"
                        )))
                    })?),
                    None => None,
                };
                let id = NodeId::from_random(random_u128()).to_string();
                let name = args.name.clone();
                self.apply(Command::CreateNetwork(Box::new(NetworkSpec {
                    id: id.clone(),
                    name: args.name,
                    subnet,
                    gateway: args.gateway,
                    encrypted: args.encrypted,
                    attachable: args.attachable,
                    internal: args.internal,
                    at: unix_now(),
                })))
                .await?;
                info!(network = %name, %id, "network created");
                Ok(Reply::Lines(vec![id]))
            }
            AdminRequest::NetworkRm { networks } => {
                // Every name resolves before anything is removed.
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let names = networks
                    .iter()
                    .map(|n| resolve_network(cluster, n))
                    .collect::<Result<Vec<_>, _>>()?;
                let count = lock(&self.endpoints).clone();
                for name in &names {
                    let busy = cluster
                        .networks
                        .get(name)
                        .zip(count.as_ref())
                        .is_some_and(|(n, count)| count(n) > 0);
                    if busy {
                        return Err(AdminError::ActiveEndpoints(name.clone()));
                    }
                }
                for name in &names {
                    self.apply(Command::RemoveNetwork(name.clone())).await?;
                    info!(network = %name, "network removed");
                }
                Ok(Reply::Lines(networks))
            }
            AdminRequest::ServiceCreate(args) => {
                let network = {
                    let state = self.state();
                    let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                    resolve_network(cluster, &args.network)?
                };
                let id = NodeId::from_random(random_u128()).to_string();
                let name = args.name.clone();
                self.apply(Command::CreateService(Box::new(ServiceSpec {
                    id: id.clone(),
                    name: args.name,
                    network,
                    endpoint_mode: args.endpoint_mode,
                    ports: args.ports.into_iter().map(Into::into).collect(),
                    health: args
                        .health
                        .map_or_else(HealthSpec::default, |h| HealthSpec {
                            interval_ms: h.interval_ms,
                            retries: h.retries,
                        }),
                    at: unix_now(),
                })))
                .await?;
                info!(service = %name, %id, "service created");
                Ok(Reply::Lines(vec![id]))
            }
            AdminRequest::ServiceLs => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                Ok(Reply::Services(
                    cluster
                        .services
                        .values()
                        .map(|s| service_detail(cluster, s))
                        .collect(),
                ))
            }
            AdminRequest::ServiceInspect { service } => {
                let state = self.state();
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let name = resolve_service(cluster, &service)?;
                Ok(Reply::Service(Box::new(service_detail(
                    cluster,
                    &cluster.services[&name],
                ))))
            }
            AdminRequest::ServiceRm { services } => {
                // Every name resolves before anything is removed.
                let names = {
                    let state = self.state();
                    let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                    services
                        .iter()
                        .map(|s| resolve_service(cluster, s))
                        .collect::<Result<Vec<_>, _>>()?
                };
                for name in &names {
                    self.apply(Command::RemoveService(name.clone())).await?;
                    info!(service = %name, "service removed");
                }
                Ok(Reply::Lines(services))
            }
            AdminRequest::ServiceUpdate {
                service,
                publish_add,
                publish_rm,
            } => {
                let name = {
                    let state = self.state();
                    let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                    resolve_service(cluster, &service)?
                };
                self.apply(Command::UpdateService {
                    name: name.clone(),
                    publish_add: publish_add.into_iter().map(Into::into).collect(),
                    publish_rm: publish_rm
                        .into_iter()
                        .map(|r| (r.published, r.protocol))
                        .collect(),
                })
                .await?;
                info!(service = %name, "service updated");
                Ok(Reply::Lines(vec![service]))
            }
            AdminRequest::ServiceBackend {
                service,
                endpoint,
                present,
            } => {
                let name = {
                    let state = self.state();
                    let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                    resolve_service(cluster, &service)?
                };
                let ip: std::net::Ipv4Addr = endpoint
                    .parse()
                    .map_err(|_| AdminError::BadEndpoint(endpoint.clone()))?;
                self.apply(Command::SetBackend {
                    service: name.clone(),
                    ip,
                    present,
                })
                .await?;
                info!(service = %name, %ip, present, "service backend set");
                Ok(Reply::Lines(vec![ip.to_string()]))
            }
        }
    }

    /// Adds (`present`) or removes the endpoint of node `id` at `ip` as a backend of
    /// `service`: only an address the state gives that node on the service's network
    /// ([`crate::cluster::UserNetwork::holds`]), so a node speaks for its own endpoints only.
    pub(crate) async fn set_backend(
        &self,
        id: &NodeId,
        service: &str,
        ip: std::net::Ipv4Addr,
        present: bool,
    ) -> Result<ManagerReply, AdminError> {
        {
            let state = self.state();
            let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
            let s = cluster
                .services
                .get(service)
                .ok_or_else(|| ApplyError::from(ServiceError::NotFound(service.to_owned())))?;
            let held = cluster
                .networks
                .values()
                .find(|n| n.id == s.network)
                .is_some_and(|n| n.holds(id, ip));
            if !held {
                return Err(AdminError::NotYourAddress {
                    ip,
                    service: service.to_owned(),
                });
            }
        }
        self.apply(Command::SetBackend {
            service: service.to_owned(),
            ip,
            present,
        })
        .await?;
        info!(node = %id, %service, %ip, present, "service backend set by its node");
        Ok(ManagerReply::Ok)
    }

    async fn set_roles(&self, names: &[String], role: Role) -> Result<Reply, AdminError> {
        let state = self.state();
        let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
        let mut ids = Vec::new();
        for name in names {
            let id = resolve(cluster, name)?;
            ids.push((name, id));
        }
        let mut lines = Vec::new();
        for (name, id) in ids {
            let raft_id = cluster.nodes.get(&id).and_then(|n| n.raft_id);
            let (applied, ()) = self
                .apply_with(|state| -> Result<_, AdminError> {
                    let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                    let node = cluster
                        .nodes
                        .get(&id)
                        .ok_or_else(|| AdminError::NotFound(name.clone()))?;
                    if node.role == role {
                        return Ok((None, ()));
                    }
                    // A new certificate in the new role: the old one stops opening the
                    // manager API (a demotion) at once.
                    let cert = issue_cert(cluster, node, role)?;
                    let reachable = self.reachable_managers(cluster);
                    Ok((
                        Some(Command::SetRole(id.clone(), role, cert, reachable)),
                        (),
                    ))
                })
                .await?;
            if let (Role::Worker, Applied::Changed, Some(raft_id)) = (role, applied, raft_id) {
                // As docker answers: once the managers have taken it out of the Raft group
                // (until then it keeps its part: a group of two needs it for that).
                if !self.raft.left_group(raft_id, raft::PROPOSE_TIMEOUT).await {
                    warn!(node = %id, "demoted, but not yet out of the Raft group");
                }
            }
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

    /// One more address block of `network` for node `id`: the caller, never a node it names.
    /// Grants node `id` one more address block of `network`; all its blocks of it.
    pub(crate) async fn address_block(
        &self,
        id: &NodeId,
        network: &str,
    ) -> Result<ManagerReply, AdminError> {
        self.apply(Command::GrantBlock {
            network: network.to_owned(),
            node: id.clone(),
        })
        .await?;
        let state = self.state();
        let blocks = state
            .cluster()
            .and_then(|c| c.networks.get(network))
            .and_then(|n| n.blocks.get(id))
            .map(|blocks| blocks.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        info!(node = %id, %network, "address block granted");
        Ok(ManagerReply::Blocks(blocks))
    }

    /// Assigns the fixed address `ip` of `network` to node `id`.
    pub(crate) async fn assign_address(
        &self,
        id: &NodeId,
        network: &str,
        ip: std::net::Ipv4Addr,
    ) -> Result<ManagerReply, AdminError> {
        self.apply(Command::AssignAddress {
            network: network.to_owned(),
            node: id.clone(),
            ip,
        })
        .await?;
        info!(node = %id, %network, %ip, "fixed address assigned");
        Ok(ManagerReply::Ok)
    }

    /// The X25519 public key joining nodes prove their keys against.
    pub fn public_key(&self) -> [u8; 32] {
        crate::trust::join::public_keys(&self.node_secret).0
    }

    /// Admits a node that sent `claim` on a connection whose exporter bytes are `exporter`:
    /// its secret proof picks the role, its key proof and signature show it holds the keys it
    /// registers, and the state machine refuses an address or key another node in the swarm
    /// has.
    pub async fn handle_join(
        &self,
        claim: &Claim,
        exporter: &[u8; EXPORTER_LEN],
    ) -> Result<JoinGrant, AdmitError> {
        let hostname = claim.hostname.as_str();
        if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
            return Err(AdmitError::BadHostname);
        }
        if claim.engine_version.len() > 64 {
            return Err(AdmitError::VersionTooLong);
        }
        claim.verify(&self.node_secret, exporter)?;
        let id = NodeId::from_random(random_u128());
        let (_, (cert, role, not_after)) = self
            .apply_with(|state| -> Result<_, AdmitError> {
                let role = state
                    .role_for_proof(exporter, &claim.secret_proof)
                    .ok_or(AdmitError::InvalidSecret)?;
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let validity =
                    Validity::from_now(unix_now(), Duration::from_secs(cluster.cert_expiry_secs));
                let cert =
                    sign_node_cert(&cluster.ca, &id, role, &claim.cert_public_key, validity)?;
                let node = Node {
                    id: id.clone(),
                    hostname: hostname.to_owned(),
                    addr: claim.addr,
                    role,
                    availability: Availability::Active,
                    public_key: claim.public_key,
                    signing_key: claim.signing_key,
                    cert_digest: cert_digest(&cert),
                    cert_der: cert.clone(),
                    cert_not_after: validity.not_after,
                    cert_public_key: claim.cert_public_key.clone(),
                    previous_cert_digest: None,
                    engine_version: claim.engine_version.clone(),
                    left: false,
                    overlay_addr: None,
                    joined_at: unix_now(),
                    raft_id: None,
                    api_addr: None,
                };
                let admission = state::Admission {
                    exporter: *exporter,
                    secret_proof: claim.secret_proof,
                };
                Ok((
                    Some(Command::Join(Box::new(node), admission)),
                    (cert, role, validity.not_after),
                ))
            })
            .await?;
        info!(node = %id, hostname, role = role.as_str(), addr = %claim.addr, "node joined");
        Ok(JoinGrant {
            node_id: id,
            cert_der: cert,
            cert_not_after: not_after,
            view: self.view().to_wire(),
        })
    }

    /// The node whose certificate has this digest, if it is in the swarm (not left or
    /// removed), and whether that is its current certificate (`false`: the one before its last
    /// reissue, good for a watch stream only).
    fn caller(&self, digest: Option<[u8; 32]>) -> Option<(Node, bool)> {
        let digest = digest?;
        let view = self.view();
        view.nodes.iter().find_map(|n| {
            if !n.active() {
                None
            } else if n.cert_digest == digest {
                Some((n.clone(), true))
            } else if n.previous_cert_digest == Some(digest) {
                Some((n.clone(), false))
            } else {
                None
            }
        })
    }

    /// A new certificate for node `id`, same role and key (a renewal).
    pub async fn renew(&self, id: &NodeId) -> Result<IssuedCert, AdminError> {
        let (_, cert) = self
            .apply_with(|state| -> Result<_, AdminError> {
                let cluster = state.cluster().ok_or(ChangeError::NotManager)?;
                let node = cluster
                    .nodes
                    .get(id)
                    .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
                let cert = issue_cert(cluster, node, node.role)?;
                Ok((Some(Command::Renew(id.clone(), cert.clone())), cert))
            })
            .await?;
        info!(node = %id, "certificate renewed");
        Ok(IssuedCert {
            cert_der: cert.der,
            not_after: cert.not_after,
        })
    }

    /// Renews this node's own certificate when it is due (it signs its own: it holds the CA);
    /// returns the new one for the API's TLS configuration, if it renewed.
    pub async fn renew_own_if_due(&self, now: u64) -> Result<Option<Issued>, AdminError> {
        let (own, not_after) = self.replica().own_cert();
        if !crate::trust::tls::renewal_due(not_after, self.cert_lifetime(), now) {
            return Ok(None);
        }
        let issued = self.renew(&self.self_id).await?;
        let fresh = Issued {
            cert_der: issued.cert_der,
            key_pem: own.key_pem,
        };
        // The state machine took the new certificate as this node's own when it applied the
        // renewal (and wrote this node's record with it).
        Ok(Some(fresh))
    }

    fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(
            self.state()
                .cluster()
                .map_or(crate::trust::tls::DEFAULT_CERT_EXPIRY.as_secs(), |c| {
                    c.cert_expiry_secs
                }),
        )
    }

    /// Rotates the keys at once if a removal or a leave made a rotation due (and the last one
    /// is old enough); otherwise the maintenance loop does it when it is.
    async fn rotate_now_if_owed(&self) {
        match self.rotate_keys_if_due(unix_now()).await {
            Ok(true) => info!("network keys rotated: a node left or was removed"),
            Ok(false) => {}
            Err(e) => warn!("network key rotation failed: {e}; retrying"),
        }
    }

    /// Rotates the network keys if due at `now` (unix seconds). True if it rotated.
    pub async fn rotate_keys_if_due(&self, now: u64) -> Result<bool, ChangeError> {
        // The leader rotates; the others would only race it to the same change.
        if !self.is_leader() {
            return Ok(false);
        }
        let (applied, ()) = self
            .apply_with(|state| -> Result<_, ChangeError> {
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
            })
            .await?;
        Ok(applied == Applied::Changed)
    }

    /// Serves the API on `listener` until `stop` turns true, with `acceptor` (replaced when
    /// this node's own certificate is renewed).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        mut stop: watch::Receiver<bool>,
    ) {
        let acceptor = Arc::new(std::sync::RwLock::new(acceptor));
        let rotator = tokio::spawn(
            self.clone()
                .maintenance_loop(acceptor.clone(), stop.clone()),
        );
        let gate = self.gate.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let member = self.is_member_address(peer.ip());
                        let Some(ticket) = gate.admit(peer.ip(), member) else {
                            gate.log_refusals();
                            continue;
                        };
                        let me = self.clone();
                        let acceptor = acceptor
                            .read()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.connection(tcp, acceptor, ticket, stop).await {
                                debug!(%peer, "manager API connection: {e}");
                            }
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

    /// Whether `ip` is the address of a node in the swarm: its connections do not count
    /// against the unauthenticated limit (they still must show the node's certificate, and a
    /// TCP connection cannot come from an address that does not answer).
    fn is_member_address(&self, ip: IpAddr) -> bool {
        self.view().nodes.iter().any(|n| n.active() && n.addr == ip)
    }

    /// The connection limits' counters (see [`GateStats`]).
    pub fn gate_stats(&self) -> GateStats {
        self.gate.stats()
    }

    /// Key rotation when due, and this node's own certificate renewal.
    async fn maintenance_loop(
        self: Arc<Self>,
        acceptor: Arc<std::sync::RwLock<TlsAcceptor>>,
        mut stop: watch::Receiver<bool>,
    ) {
        // Often enough for a rotation a removal made due (MIN_ROTATION_INTERVAL after the
        // last) and for short certificate lifetimes; each tick is a look at the state.
        let tick = Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            match self.rotate_keys_if_due(unix_now()).await {
                Ok(true) => info!("network keys rotated"),
                Ok(false) => {}
                Err(e) => warn!("network key rotation failed: {e}"),
            }
            match self.renew_own_if_due(unix_now()).await {
                Ok(Some(own)) => {
                    let ca = self.state().cluster().map(|c| c.ca.cert_der.clone());
                    match ca.map(|ca| crate::trust::tls::server_config(&ca, &own)) {
                        Some(Ok(config)) => {
                            *acceptor.write().unwrap_or_else(PoisonError::into_inner) =
                                TlsAcceptor::from(config);
                            info!("this manager's certificate was renewed");
                        }
                        Some(Err(e)) => warn!("renewed certificate unusable: {e}"),
                        None => {}
                    }
                }
                Ok(None) => {}
                Err(e) => warn!("this manager's certificate renewal failed: {e}; retrying"),
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        ticket: Ticket,
        stop: watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        // Before authentication: a short deadline for the handshake and the first request.
        let deadline = tokio::time::Instant::now() + PREAUTH_DEADLINE;
        let mut tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp))
            .await
            .map_err(|_| ServeError::Handshake("timed out".into()))?
            .map_err(|e| ServeError::Handshake(e.to_string()))?;
        let digest = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| cert_digest(c.as_ref()));
        let caller = self.caller(digest);
        let mut ticket = ticket;
        if caller.is_some() {
            // A member: its connection no longer counts against the unauthenticated limits.
            ticket.authenticated();
        }
        let request = match read_request(&mut tls, deadline).await? {
            Some(r) => r,
            None => return Ok(()),
        };
        let response: ManagerResponse = match request {
            ManagerRequest::JoinHello => {
                let hello: ManagerResponse = Ok(ManagerReply::JoinChallenge {
                    public_key: self.public_key(),
                });
                write_frame(&mut tls, &hello).await?;
                match read_request(&mut tls, deadline).await? {
                    Some(ManagerRequest::Join(claim)) => self.join(&tls, &claim).await,
                    Some(_) => Err("expected a join after the join hello".into()),
                    None => return Ok(()),
                }
            }
            ManagerRequest::Join(claim) => self.join(&tls, &claim).await,
            ManagerRequest::Watch => {
                return match caller {
                    Some((node, _)) => {
                        let result = self.watch(tls, node.id, digest, stop).await;
                        drop(ticket);
                        result
                    }
                    None => {
                        let r: ManagerResponse = Ok(ManagerReply::Removed);
                        Ok(write_frame(&mut tls, &r).await?)
                    }
                };
            }
            ManagerRequest::Ping => Ok(ManagerReply::Ok),
            ManagerRequest::Renew => match caller {
                Some((node, true)) => self
                    .renew(&node.id)
                    .await
                    .map(ManagerReply::Certificate)
                    .map_err(|e| e.to_string()),
                Some((_, false)) => Err(OLD_CERT.into()),
                None => Err(not_member()),
            },
            ManagerRequest::AssignAddress { network, ip } => match caller {
                Some((node, true)) => self
                    .assign_address(&node.id, &network, ip)
                    .await
                    .map_err(|e| e.to_string()),
                Some((_, false)) => Err(OLD_CERT.into()),
                None => Err(not_member()),
            },
            ManagerRequest::SetBackend {
                service,
                ip,
                present,
            } => match caller {
                Some((node, true)) => self
                    .set_backend(&node.id, &service, ip, present)
                    .await
                    .map_err(|e| e.to_string()),
                Some((_, false)) => Err(OLD_CERT.into()),
                None => Err(not_member()),
            },
            ManagerRequest::AddressBlock { network } => match caller {
                Some((node, true)) => self
                    .address_block(&node.id, &network)
                    .await
                    .map_err(|e| e.to_string()),
                Some((_, false)) => Err(OLD_CERT.into()),
                None => Err(not_member()),
            },
            ManagerRequest::Leave => match caller {
                Some((node, _)) => match self.apply(Command::MarkLeft(node.id.clone())).await {
                    Ok(_) => {
                        info!(node = %node.id, "node left");
                        self.rotate_now_if_owed().await;
                        Ok(ManagerReply::Ok)
                    }
                    Err(e) => Err(e.to_string()),
                },
                None => Err(not_member()),
            },
            ManagerRequest::Raft => {
                return match caller {
                    Some((node, true)) if node.role == Role::Manager => {
                        let still = |(n, current): (Node, bool)| current && n.role == Role::Manager;
                        let allowed = || self.caller(digest).is_some_and(still);
                        // A manager keeps several channels to each peer (replication, votes,
                        // probes, forwarded commands; see `raft::PeerClient`): they leave the
                        // per-source count, which is for the API's callers, and are checked
                        // again at every frame instead.
                        drop(ticket);
                        raft::serve_peer(self.raft.clone(), tls, allowed)
                            .await
                            .map_err(|e| ServeError::Raft(e.to_string()))
                    }
                    _ => {
                        let r: ManagerResponse = Err(NOT_MANAGER.into());
                        Ok(write_frame(&mut tls, &r).await?)
                    }
                };
            }
            ManagerRequest::Admin(request) => match caller {
                Some((node, true)) if node.role == Role::Manager => self
                    .handle_admin(request, &node.id)
                    .await
                    .map(|r| ManagerReply::Admin(Box::new(r)))
                    .map_err(|e| e.to_string()),
                Some((_, false)) => Err(OLD_CERT.into()),
                Some(_) => Err(NOT_MANAGER.into()),
                None => Err(not_member()),
            },
        };
        write_frame(&mut tls, &response).await?;
        use tokio::io::AsyncWriteExt as _;
        let _ = tls.shutdown().await;
        Ok(())
    }

    /// A join on this TLS connection: its proofs are bound to the session's exporter bytes.
    async fn join(&self, tls: &ServerTls, claim: &Claim) -> ManagerResponse {
        let mut exporter = [0u8; EXPORTER_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
            .map_err(|e| AdmitError::Exporter(e.to_string()).to_string())?;
        self.handle_join(claim, &exporter)
            .await
            .map(|g| ManagerReply::Joined(Box::new(g)))
            .map_err(|e| e.to_string())
    }

    /// A watch stream for node `id`, which connected with the certificate whose digest is
    /// `presented`: the current view now and on every change, the node's new certificate when
    /// the manager reissued it (then the node reconnects with it), and `Removed` once the node
    /// is no longer in the swarm (removed, or left).
    async fn watch<S>(
        self: Arc<Self>,
        stream: S,
        id: NodeId,
        presented: Option<[u8; 32]>,
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
        let mut views = self.replica().subscribe();
        let mut current = Some(views.borrow_and_update().clone());
        let result = loop {
            if let Some(view) = current.take() {
                let (reply, last) = match view.node(&id).filter(|n| n.active()) {
                    None => (Ok(ManagerReply::Removed), true),
                    Some(n) if Some(n.cert_digest) != presented => {
                        // Reissued: the view first, then the certificate, then we part.
                        let frame: ManagerResponse =
                            Ok(ManagerReply::View(Box::new(view.to_wire())));
                        if let Err(e) = write_frame(&mut wr, &frame).await {
                            break Err(e.into());
                        }
                        match self.issued_cert(&id) {
                            Some(cert) => (Ok(ManagerReply::Certificate(cert)), true),
                            None => (Ok(ManagerReply::Removed), true),
                        }
                    }
                    Some(_) => (Ok(ManagerReply::View(Box::new(view.to_wire()))), false),
                };
                let reply: ManagerResponse = reply;
                if let Err(e) = write_frame(&mut wr, &reply).await {
                    break Err(e.into());
                }
                if last {
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

    /// Node `id`'s current certificate, as the state holds it.
    fn issued_cert(&self, id: &NodeId) -> Option<IssuedCert> {
        let state = self.state();
        let node = state.cluster()?.nodes.get(id)?;
        (!node.cert_der.is_empty()).then(|| IssuedCert {
            cert_der: node.cert_der.clone(),
            not_after: node.cert_not_after,
        })
    }
}

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// The message for a request made with a certificate the manager has since replaced.
pub const OLD_CERT: &str = "this node's certificate was replaced (a role change or a renewal); the agent picks up the new one on its watch stream, try again in a moment";

/// Most bytes a request frame may have (requests are small; views and certificates only flow
/// the other way).
pub const MAX_REQUEST: u32 = 64 << 10;

/// Reads one request within `deadline`.
async fn read_request(
    tls: &mut ServerTls,
    deadline: tokio::time::Instant,
) -> Result<Option<ManagerRequest>, ServeError> {
    match tokio::time::timeout_at(deadline, crate::api::read_frame_limited(tls, MAX_REQUEST)).await
    {
        Err(_) => Err(ServeError::Silent),
        Ok(r) => Ok(r?),
    }
}

/// Counters of the manager API's connection limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    /// Refused: [`MAX_PER_SOURCE`] connections from that address already.
    pub refused_per_source: u64,
    /// Refused: [`MAX_PREAUTH`] unauthenticated connections already.
    pub refused_unauthenticated: u64,
    /// Refused: [`MAX_CONNECTIONS`] connections already.
    pub refused_total: u64,
}

impl GateStats {
    fn sum(&self) -> u64 {
        self.refused_per_source + self.refused_unauthenticated + self.refused_total
    }
}

/// The limits on who may hold a connection to the manager API, checked before the TLS
/// handshake: per source address, unauthenticated, and in all. A member's connection leaves
/// the unauthenticated count once its certificate is checked ([`Ticket::authenticated`]);
/// one from a member's address never enters it, so strangers filling the unauthenticated
/// places cannot keep the nodes of the swarm out.
#[derive(Debug, Default)]
struct Gate {
    inner: Mutex<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    per_source: HashMap<IpAddr, usize>,
    unauthenticated: usize,
    total: usize,
    stats: GateStats,
    logged: u64,
    last_log: Option<std::time::Instant>,
}

/// One admitted connection's place; released when dropped.
#[derive(Debug)]
struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
    unauthenticated: bool,
}

impl Gate {
    fn admit(self: &Arc<Self>, source: IpAddr, member: bool) -> Option<Ticket> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let from_source = g.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= MAX_PER_SOURCE {
            g.stats.refused_per_source += 1;
            return None;
        }
        if !member && g.unauthenticated >= MAX_PREAUTH {
            g.stats.refused_unauthenticated += 1;
            return None;
        }
        if g.total >= MAX_CONNECTIONS {
            g.stats.refused_total += 1;
            return None;
        }
        *g.per_source.entry(source).or_insert(0) += 1;
        g.unauthenticated += usize::from(!member);
        g.total += 1;
        Some(Ticket {
            gate: self.clone(),
            source,
            unauthenticated: !member,
        })
    }

    fn stats(&self) -> GateStats {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stats
            .clone()
    }

    /// Logs the refusals since the last line, at most once per [`REFUSAL_LOG_EVERY`].
    fn log_refusals(&self) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::time::Instant::now();
        if g.last_log
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        let total = g.stats.sum();
        let new = total - g.logged;
        g.logged = total;
        g.last_log = Some(now);
        warn!(
            refused = new,
            per_source = g.stats.refused_per_source,
            unauthenticated = g.stats.refused_unauthenticated,
            total = g.stats.refused_total,
            "manager API refused connections over its limits ({MAX_PER_SOURCE} per address, {MAX_PREAUTH} unauthenticated, {MAX_CONNECTIONS} in all)"
        );
    }
}

impl Ticket {
    /// The peer showed a member's certificate: it stops counting as unauthenticated.
    fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauthenticated) {
            let mut g = self
                .gate
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            g.unauthenticated = g.unauthenticated.saturating_sub(1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self
            .gate
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.unauthenticated {
            g.unauthenticated = g.unauthenticated.saturating_sub(1);
        }
        g.total = g.total.saturating_sub(1);
        if let Some(n) = g.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.per_source.remove(&self.source);
            }
        }
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
        lock(&manager.ended).remove(id);
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
                let mut ended = lock(&self.manager.ended);
                ended.retain(|_, t| t.elapsed() < LOST_STREAM_HOLD);
                ended.insert(self.id.clone(), std::time::Instant::now());
            }
        }
    }
}

/// How long a node whose watch stream here ended counts as down here, unless it opens another
/// (gossip has noticed by then).
pub const LOST_STREAM_HOLD: Duration = Duration::from_secs(30);

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
    use crate::manager::state::tests::{init_cmd, node};
    use crate::manager::state::CaMaterial;
    use crate::trust::tls::{generate_ca, issue_node_cert};

    struct Fixture {
        _dir: tempfile::TempDir,
        manager: Arc<Manager>,
        membership: Arc<MembershipCell>,
        store: Arc<Store>,
    }

    async fn leader() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        leader_on(dir, store).await
    }

    /// A manager group of one whose state lives in `store` (opened in `dir`).
    async fn leader_on(dir: tempfile::TempDir, store: Store) -> Fixture {
        let store = Arc::new(store);
        let ca: CaMaterial = generate_ca().unwrap();
        let id = NodeId::from_random(1);
        let validity = Validity::from_now(unix_now(), crate::trust::tls::DEFAULT_CERT_EXPIRY);
        let own = issue_node_cert(&ca, &id, Role::Manager, validity).unwrap();
        let mut leader = node(1, Role::Manager);
        leader.cert_digest = cert_digest(&own.cert_der);
        leader.public_key = crate::trust::join::public_keys(&LEADER_SECRET).0;
        // The state machine tests' `init`, with a real CA and this leader.
        let Command::Init(mut init) = init_cmd() else {
            unreachable!("init_cmd is an init")
        };
        init.ca = ca;
        init.leader = leader;
        init.api_addr = "127.0.0.1:2377".parse().unwrap();
        init.key_interval_secs = 100;
        init.cert_expiry_secs = crate::trust::tls::DEFAULT_CERT_EXPIRY.as_secs();
        let init = Command::Init(init);
        let membership = MembershipCell::new(None);
        let manager = Manager::start(
            id,
            1,
            "127.0.0.1:2377".parse().unwrap(),
            (own, validity.not_after),
            LEADER_SECRET,
            State::default(),
            store.clone(),
            membership.clone(),
            true,
        )
        .await
        .unwrap();
        // A group of one elects itself; then `init` commits.
        manager
            .raft()
            .raft
            .wait(Some(Duration::from_secs(20)))
            .current_leader(1, "the group of one elected itself")
            .await
            .unwrap();
        manager.apply(init).await.unwrap();
        Fixture {
            _dir: dir,
            manager,
            membership,
            store,
        }
    }

    const LEADER_SECRET: [u8; 32] = [0x1e; 32];
    /// The TLS exporter bytes of the tests' pretend connection.
    const EXPORTER: [u8; 32] = [0xee; 32];
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(10);

    /// A claim proved by the node with secret `[n; 32]` at 198.18.0.n, for `m`.
    fn claim(m: &Manager, secret: &str, host: &str, n: u8, cert_key: Vec<u8>) -> Claim {
        let node_secret = [n; 32];
        let (public_key, signing_key) = crate::trust::join::public_keys(&node_secret);
        Claim {
            secret_proof: crate::trust::join::secret_proof(secret, &EXPORTER),
            hostname: host.into(),
            addr: IpAddr::from([198, 18, 0, n]),
            public_key,
            signing_key,
            cert_public_key: cert_key,
            engine_version: "0.1.0".into(),
            key_proof: [0; 32],
            signature: [0; 64],
        }
        .prove(&node_secret, &m.public_key(), &EXPORTER)
        .unwrap()
    }

    /// A join by a node of its own (its own keys and address) with the secret
    /// `Secret::from_random(secret)`.
    async fn join(m: &Manager, secret: u128, host: &str) -> Result<JoinGrant, String> {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = crate::trust::tls::NodeKey::generate().unwrap().public_raw();
        let c = claim(m, Secret::from_random(secret).as_str(), host, n, key);
        m.handle_join(&c, &EXPORTER)
            .await
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn join_checks_the_secret_and_changes_nothing_on_refusal() {
        let f = leader().await;
        let before = f.manager.state();
        assert_eq!(
            join(&f.manager, 33, "w1").await.unwrap_err(),
            INVALID_SECRET
        );
        assert_eq!(f.manager.state(), before);
        assert!(join(&f.manager, 11, "")
            .await
            .unwrap_err()
            .contains("hostname"));
        assert!(join(&f.manager, 11, "a\nb")
            .await
            .unwrap_err()
            .contains("hostname"));
        assert!(join(&f.manager, 11, &"x".repeat(254))
            .await
            .unwrap_err()
            .contains("hostname"));
        assert_eq!(f.manager.state(), before);
        join(&f.manager, 11, "w1").await.unwrap();
        assert_eq!(f.manager.state().version, before.version + 1);

        let grant = join(&f.manager, 22, "m2").await.unwrap();
        let view = ClusterView::from_wire(grant.view);
        assert_eq!(view.node(&grant.node_id).unwrap().role, Role::Manager);
        assert_eq!(view.nodes.len(), 3);
        // The leader's own record follows every change.
        let kept = f.membership.get().unwrap();
        assert_eq!(kept.view.version, f.manager.state().version);
    }

    #[tokio::test]
    async fn rotated_secret_is_refused_at_once() {
        let f = leader().await;
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
            .await
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
            .await
            .unwrap()
        else {
            panic!("not a token")
        };
        assert!(rotated);
        assert_ne!(old, new);
        assert_eq!(join(&f.manager, 11, "w").await.unwrap_err(), INVALID_SECRET);
        let secret = Token::parse(&new).unwrap().secret;
        let key = crate::trust::tls::NodeKey::generate().unwrap().public_raw();
        let c = claim(&f.manager, secret.as_str(), "w", 200, key);
        assert!(f.manager.handle_join(&c, &EXPORTER).await.is_ok());
        // A certificate key that is not a P-256 point: refused, nothing added.
        let before = f.manager.state();
        let c = claim(&f.manager, secret.as_str(), "w", 201, vec![4; 10]);
        let err = f
            .manager
            .handle_join(&c, &EXPORTER)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("P-256"), "{err}");
        assert_eq!(f.manager.state(), before);
    }

    #[tokio::test]
    async fn a_join_must_prove_its_keys_and_cannot_take_another_nodes() {
        let f = leader().await;
        let key = || crate::trust::tls::NodeKey::generate().unwrap().public_raw();
        let secret = Secret::from_random(11);
        let n2 = claim(&f.manager, secret.as_str(), "n2", 2, key());
        f.manager.handle_join(&n2, &EXPORTER).await.unwrap();
        let before = f.manager.state();
        // n2's address from another machine.
        let mut same_addr = claim(&f.manager, secret.as_str(), "n3", 3, key());
        same_addr.addr = n2.addr;
        let same_addr = Claim {
            key_proof: [0; 32],
            ..same_addr
        }
        .prove(&[3; 32], &f.manager.public_key(), &EXPORTER)
        .unwrap();
        let err = f
            .manager
            .handle_join(&same_addr, &EXPORTER)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already used by node"), "{err}");
        // n2's public key, sent by someone who cannot prove it holds it.
        let mut stolen = claim(&f.manager, secret.as_str(), "n4", 4, key());
        stolen.public_key = n2.public_key;
        let err = f.manager.handle_join(&stolen, &EXPORTER).await.unwrap_err();
        assert!(matches!(err, AdmitError::Proof(_)), "{err}");
        // n2's own keys again (a copy of its state dir), proved: refused as taken.
        let twin = claim(&f.manager, secret.as_str(), "n2-copy", 2, key());
        let twin = Claim {
            addr: IpAddr::from([198, 18, 0, 5]),
            ..twin
        }
        .prove(&[2; 32], &f.manager.public_key(), &EXPORTER)
        .unwrap();
        let err = f.manager.handle_join(&twin, &EXPORTER).await.unwrap_err();
        assert!(err.to_string().contains("already the key of node"), "{err}");
        // Proofs made on another TLS session: refused.
        let replayed = claim(&f.manager, secret.as_str(), "n6", 6, key());
        assert!(f.manager.handle_join(&replayed, &[0x01; 32]).await.is_err());
        assert_eq!(f.manager.state(), before, "nothing was added");
    }

    #[tokio::test]
    async fn promote_and_demote_reissue_the_certificate_in_the_new_role() {
        let f = leader().await;
        let grant = join(&f.manager, 11, "w").await.unwrap();
        let ca = f.manager.view().ca_cert_der.clone();
        crate::trust::tls::verify_issued(&ca, &grant.cert_der, &grant.node_id, Role::Worker)
            .unwrap();
        let worker_digest = cert_digest(&grant.cert_der);
        set_role(&f.manager, "w", Role::Manager).await;
        let promoted = f.manager.issued_cert(&grant.node_id).unwrap();
        crate::trust::tls::verify_issued(&ca, &promoted.cert_der, &grant.node_id, Role::Manager)
            .unwrap();
        // The worker certificate now only opens a watch stream (to fetch the new one).
        assert_eq!(
            f.manager
                .caller(Some(worker_digest))
                .map(|(_, current)| current),
            Some(false)
        );
        let manager_digest = cert_digest(&promoted.cert_der);
        assert_eq!(
            f.manager
                .caller(Some(manager_digest))
                .map(|(n, c)| (n.role, c)),
            Some((Role::Manager, true))
        );
        set_role(&f.manager, "w", Role::Worker).await;
        let demoted = f.manager.issued_cert(&grant.node_id).unwrap();
        crate::trust::tls::verify_issued(&ca, &demoted.cert_der, &grant.node_id, Role::Worker)
            .unwrap();
        // The manager certificate it held is no longer current: no admin rights with it.
        assert_eq!(
            f.manager.caller(Some(manager_digest)).map(|(_, c)| c),
            Some(false)
        );
        assert_eq!(
            f.manager.caller(Some(worker_digest)),
            None,
            "two back: gone"
        );
        // Renewal: same role, a new certificate.
        let renewed = f.manager.renew(&grant.node_id).await.unwrap();
        assert_ne!(renewed.cert_der, demoted.cert_der);
        crate::trust::tls::verify_issued(&ca, &renewed.cert_der, &grant.node_id, Role::Worker)
            .unwrap();
    }

    #[tokio::test]
    async fn a_node_that_left_has_no_access() {
        let f = leader().await;
        let me = NodeId::from_random(1);
        let grant = join(&f.manager, 22, "m2").await.unwrap();
        let digest = cert_digest(&grant.cert_der);
        assert_eq!(
            f.manager.caller(Some(digest)).map(|(n, c)| (n.role, c)),
            Some((Role::Manager, true))
        );
        f.manager
            .apply(Command::MarkLeft(grant.node_id.clone()))
            .await
            .unwrap();
        assert_eq!(f.manager.caller(Some(digest)), None);
        // Still listed (Down), as docker does, until `node rm`.
        let Reply::Nodes { nodes, .. } = f
            .manager
            .handle_admin(AdminRequest::NodeLs, &me)
            .await
            .unwrap()
        else {
            panic!("not a node list")
        };
        assert!(nodes
            .iter()
            .any(|n| n.id == grant.node_id && n.status == Status::Down));
    }

    #[test]
    fn connection_limits_per_source_unauthenticated_and_members() {
        let gate = Arc::new(Gate::default());
        let stranger: IpAddr = "198.18.0.100".parse().unwrap();
        let held: Vec<Ticket> = (0..MAX_PER_SOURCE)
            .map(|_| gate.admit(stranger, false).unwrap())
            .collect();
        assert!(gate.admit(stranger, false).is_none(), "per source");
        assert_eq!(gate.stats().refused_per_source, 1);
        // Strangers from many addresses fill the unauthenticated places...
        let mut many = Vec::new();
        for i in 0..MAX_PREAUTH - MAX_PER_SOURCE {
            many.push(
                gate.admit(
                    IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]),
                    false,
                )
                .unwrap(),
            );
        }
        assert!(gate.admit("10.9.9.9".parse().unwrap(), false).is_none());
        assert_eq!(gate.stats().refused_unauthenticated, 1);
        // ...and a node of the swarm still gets in.
        let mut member = gate.admit("198.18.0.2".parse().unwrap(), true).unwrap();
        member.authenticated();
        // A stranger's connection that authenticates frees its place.
        let mut first = many.pop().unwrap();
        first.authenticated();
        assert!(gate.admit("10.9.9.9".parse().unwrap(), false).is_some());
        drop(held);
        assert!(
            gate.admit(stranger, false).is_some(),
            "places come back when closed"
        );
    }

    /// `node promote NAME` (`Role::Manager`) or `node demote NAME`, asked by the leader.
    async fn set_role(m: &Manager, name: &str, role: Role) {
        let nodes = vec![name.to_owned()];
        let request = match role {
            Role::Manager => AdminRequest::Promote { nodes },
            Role::Worker => AdminRequest::Demote { nodes },
        };
        m.handle_admin(request, &NodeId::from_random(1))
            .await
            .unwrap();
    }

    /// `manager`'s API served on a loopback port: its address, and the stop signal and task.
    async fn serving(
        manager: &Arc<Manager>,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let ca_der = manager.view().ca_cert_der.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(
            crate::trust::tls::server_config(&ca_der, &manager.own_cert()).unwrap(),
        );
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(manager.clone().serve(listener, acceptor, stopped));
        (addr, stop, server)
    }

    /// An mTLS connection to the manager API at `addr` (CA `ca_der`, node `manager`), as
    /// `cert`.
    async fn connect(
        addr: SocketAddr,
        ca_der: &[u8],
        manager: &NodeId,
        cert: &Issued,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config = crate::trust::tls::manager_client_config(ca_der, cert, manager).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(crate::trust::tls::server_name(), tcp)
            .await
            .unwrap()
    }

    /// A Raft channel to the manager API at `addr`, as `cert` (see [`connect`]).
    async fn raft_channel(
        addr: SocketAddr,
        ca_der: &[u8],
        manager: &NodeId,
        cert: &Issued,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut tls = connect(addr, ca_der, manager, cert).await;
        write_frame(&mut tls, &ManagerRequest::Raft).await.unwrap();
        tls
    }

    /// A worker `w` that joined `manager` with a key of its own: its grant and its key.
    async fn worker_with_key(manager: &Manager) -> (JoinGrant, crate::trust::tls::NodeKey) {
        let key = crate::trust::tls::NodeKey::generate().unwrap();
        let c = claim(
            manager,
            Secret::from_random(11).as_str(),
            "w",
            40,
            key.public_raw(),
        );
        (manager.handle_join(&c, &EXPORTER).await.unwrap(), key)
    }

    /// The managers' Raft channel on 2377 takes a manager's certificate only, and only for as
    /// long as it is one: a worker is refused at the door, and a manager demoted while its
    /// channel is open gets nothing more through it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_raft_channel_is_for_managers_only_and_ends_with_a_demotion() {
        use crate::api::{read_raw_frame, write_raw_frame};
        let f = leader().await;
        let me = NodeId::from_random(1);
        let ca_der = f.manager.view().ca_cert_der.clone();
        let (addr, stop, server) = serving(&f.manager).await;
        let (grant, key) = worker_with_key(&f.manager).await;
        let issued = |der: Vec<u8>| Issued {
            cert_der: der,
            key_pem: key.private_pem(),
        };
        let ping = [5u8]; // raft::Kind::Ping
        let mut worker = raft_channel(addr, &ca_der, &me, &issued(grant.cert_der.clone())).await;
        let refused = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut worker));
        let refused: Option<ManagerResponse> = refused.await.expect("refused at once").unwrap();
        assert_eq!(refused, Some(Err(NOT_MANAGER.to_owned())));
        // Promoted: its manager certificate opens the channel, and a ping is answered.
        set_role(&f.manager, "w", Role::Manager).await;
        let der = f.manager.issued_cert(&grant.node_id).unwrap().cert_der;
        let mut promoted = raft_channel(addr, &ca_der, &me, &issued(der)).await;
        write_raw_frame(&mut promoted, &ping).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut promoted));
        assert_eq!(answer.await.unwrap().unwrap(), Some(Vec::new()));
        // Demoted while the channel is open: the next frame gets no answer, the channel ends.
        set_role(&f.manager, "w", Role::Worker).await;
        write_raw_frame(&mut promoted, &ping).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut promoted));
        assert!(
            !matches!(answer.await.unwrap(), Ok(Some(_))),
            "a demoted manager's channel still answers"
        );
        let _ = stop.send(true);
        let _ = server.await;
    }

    /// A node asks for an address block of a network and gets one for itself, the lowest
    /// free first; asking again gets another; an unknown network is refused with docker's
    /// words.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_gets_address_blocks_for_itself() {
        let f = leader().await;
        f.manager
            .apply(Command::CreateNetwork(Box::new(networks::tests::spec(
                "web",
                Some("10.9.0.0/24"),
            ))))
            .await
            .unwrap();
        let ca_der = f.manager.view().ca_cert_der.clone();
        let (addr, stop, server) = serving(&f.manager).await;
        let (grant, key) = worker_with_key(&f.manager).await;
        let cert = Issued {
            cert_der: grant.cert_der.clone(),
            key_pem: key.private_pem(),
        };
        let ask = |network: &str| {
            let (cert, ca_der, manager) = (cert.clone(), ca_der.clone(), f.manager.self_id.clone());
            let request = ManagerRequest::AddressBlock {
                network: network.into(),
            };
            async move {
                let mut tls = connect(addr, &ca_der, &manager, &cert).await;
                write_frame(&mut tls, &request).await.unwrap();
                let answer: Option<ManagerResponse> = read_frame(&mut tls).await.unwrap();
                answer.unwrap()
            }
        };
        assert_eq!(
            ask("web").await,
            Ok(ManagerReply::Blocks(vec!["10.9.0.0/28".into()]))
        );
        assert_eq!(
            ask("web").await,
            Ok(ManagerReply::Blocks(vec![
                "10.9.0.0/28".into(),
                "10.9.0.16/28".into()
            ]))
        );
        assert_eq!(ask("db").await, Err("network db not found".into()));
        let state = f.manager.state();
        let web = &state.cluster().unwrap().networks["web"];
        assert_eq!(web.blocks.keys().collect::<Vec<_>>(), [&grant.node_id]);
        let _ = stop.send(true);
        let _ = server.await;
    }

    /// `service create|ls|inspect|update|backend|rm` through the admin API, a network in use
    /// refused, and a node making its own endpoint a backend over mTLS (never another's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn services_through_the_admin_api_and_backends_from_their_nodes() {
        use crate::api::{PublishRm, ServiceCreateArgs};
        use crate::manager::services::Protocol;
        use shoal_proto::publish::parse_publish;
        let f = leader().await;
        let me = NodeId::from_random(1);
        f.manager
            .apply(Command::CreateNetwork(Box::new(networks::tests::spec(
                "web",
                Some("10.9.0.0/24"),
            ))))
            .await
            .unwrap();
        let admin = |request| f.manager.handle_admin(request, &me);
        let create = |name: &str, ports: &[&str]| {
            AdminRequest::ServiceCreate(ServiceCreateArgs {
                name: name.into(),
                network: "web".into(),
                endpoint_mode: Default::default(),
                ports: ports.iter().map(|p| parse_publish(p).unwrap()).collect(),
                health: None,
            })
        };
        let Reply::Lines(id) = admin(create("front", &["8080:80"])).await.unwrap() else {
            panic!("create answers lines");
        };
        assert_eq!(id[0].len(), 25);
        assert_eq!(
            admin(create("back", &["8080:81"]))
                .await
                .unwrap_err()
                .to_string(),
            "port 8080 is already in use by service front"
        );
        // Inspect by name or ID prefix.
        let Reply::Service(detail) = admin(AdminRequest::ServiceInspect {
            service: id[0][..6].into(),
        })
        .await
        .unwrap() else {
            panic!("inspect answers a service");
        };
        assert_eq!(
            (detail.name.as_str(), detail.network.as_str()),
            ("front", "web")
        );
        assert_eq!(detail.vip, Some("10.9.0.254".parse().unwrap()));
        assert_eq!(detail.health.interval_ms, 250);
        admin(AdminRequest::ServiceUpdate {
            service: "front".into(),
            publish_add: vec![parse_publish("mode=host,53:53/udp").unwrap()],
            publish_rm: vec![PublishRm {
                published: 8080,
                protocol: Protocol::Tcp,
            }],
        })
        .await
        .unwrap();
        admin(AdminRequest::ServiceBackend {
            service: "front".into(),
            endpoint: "10.9.0.100".into(),
            present: true,
        })
        .await
        .unwrap();
        assert!(admin(AdminRequest::ServiceBackend {
            service: "front".into(),
            endpoint: "c0ffee".into(),
            present: true,
        })
        .await
        .unwrap_err()
        .to_string()
        .contains("neither an IPv4 address"));
        let Reply::Services(all) = admin(AdminRequest::ServiceLs).await.unwrap() else {
            panic!("ls answers services");
        };
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].backends,
            ["10.9.0.100".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            all[0].ports,
            [parse_publish("mode=host,53:53/udp").unwrap()]
        );
        assert_eq!(
            admin(AdminRequest::NetworkRm {
                networks: vec!["web".into()]
            })
            .await
            .unwrap_err()
            .to_string(),
            "network web is in use by service front"
        );

        // A worker: its own address (in its block) becomes a backend; another's does not.
        let ca_der = f.manager.view().ca_cert_der.clone();
        let (addr, stop, server) = serving(&f.manager).await;
        let (grant, key) = worker_with_key(&f.manager).await;
        let cert = Issued {
            cert_der: grant.cert_der.clone(),
            key_pem: key.private_pem(),
        };
        f.manager
            .address_block(&grant.node_id, "web")
            .await
            .unwrap();
        let ask = |service: &str, ip: &str, present| {
            let (cert, ca_der, manager) = (cert.clone(), ca_der.clone(), f.manager.self_id.clone());
            let request = ManagerRequest::SetBackend {
                service: service.into(),
                ip: ip.parse().unwrap(),
                present,
            };
            async move {
                let mut tls = connect(addr, &ca_der, &manager, &cert).await;
                write_frame(&mut tls, &request).await.unwrap();
                let answer: Option<ManagerResponse> = read_frame(&mut tls).await.unwrap();
                answer.unwrap()
            }
        };
        assert_eq!(ask("front", "10.9.0.2", true).await, Ok(ManagerReply::Ok));
        assert!(ask("front", "10.9.0.100", false)
            .await
            .unwrap_err()
            .contains("not this node's"));
        assert_eq!(
            ask("nope", "10.9.0.2", true).await,
            Err("service nope not found".into())
        );
        let backends = |m: &Manager| {
            m.state().cluster().unwrap().services["front"]
                .backends
                .len()
        };
        assert_eq!(backends(&f.manager), 2);
        assert_eq!(ask("front", "10.9.0.2", false).await, Ok(ManagerReply::Ok));
        assert_eq!(backends(&f.manager), 1);
        assert_eq!(
            f.manager.view().service("front").unwrap().backends.len(),
            1,
            "the view carries it"
        );
        let _ = stop.send(true);
        let _ = server.await;
        admin(AdminRequest::ServiceRm {
            services: vec!["front".into()],
        })
        .await
        .unwrap();
        admin(AdminRequest::NetworkRm {
            networks: vec!["web".into()],
        })
        .await
        .unwrap();
    }

    /// A manager whose Raft stopped (a demotion, a restart in the same agent) ends the peer
    /// channels open to it at their next frame, so the peers reconnect to what serves next
    /// instead of talking to a stopped node forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_managers_raft_channels_end() {
        use crate::api::{read_raw_frame, write_raw_frame};
        let f = leader().await;
        let ca_der = f.manager.view().ca_cert_der.clone();
        let (addr, stop, server) = serving(&f.manager).await;
        let mut tls = raft_channel(addr, &ca_der, &f.manager.self_id, &f.manager.own_cert()).await;
        let ping = [5u8]; // raft::Kind::Ping
        write_raw_frame(&mut tls, &ping).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut tls));
        assert_eq!(answer.await.unwrap().unwrap(), Some(Vec::new()));
        f.manager.shutdown().await;
        write_raw_frame(&mut tls, &ping).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut tls));
        assert!(
            !matches!(answer.await.unwrap(), Ok(Some(_))),
            "a stopped manager's channel still answers"
        );
        let _ = stop.send(true);
        let _ = server.await;
    }

    /// A pre-vote goes only to a candidate whose log is not behind this manager's, and only
    /// when this manager hears no leader.
    #[tokio::test]
    async fn a_pre_vote_is_refused_to_a_log_behind_and_while_a_leader_is_heard() {
        use raft::grants_pre_vote as grants;
        let at = |index| Some(openraft::testing::log_id(3, 1, index));
        let quiet = raft::ELECTION_MIN;
        assert!(!grants(false, quiet, at(5), None), "an empty log is behind");
        assert!(!grants(false, quiet, at(5), at(4)));
        assert!(grants(false, quiet, at(5), at(5)));
        assert!(grants(false, quiet, at(5), at(6)));
        assert!(grants(false, quiet, None, None));
        let heard = raft::ELECTION_MIN - Duration::from_millis(1);
        assert!(!grants(false, heard, at(5), at(6)), "a leader is heard");
        assert!(!grants(true, quiet, at(5), at(6)), "this manager leads");
        // The rule as a manager applies it: a leader (of one) grants nothing.
        let f = leader().await;
        let raft = f.manager.raft();
        tokio::time::sleep(raft::ELECTION_MIN).await;
        let ahead = openraft::testing::log_id(u64::MAX, 1, u64::MAX);
        assert!(!raft.would_vote(Some(ahead)).await);
    }

    #[tokio::test]
    async fn rm_refuses_an_up_node_unless_forced() {
        let f = leader().await;
        let me = NodeId::from_random(1);
        let rm = |force| AdminRequest::NodeRm {
            nodes: vec!["w".into()],
            force,
        };
        // A node follows one manager; the others know it is up from gossip alone...
        let first = join(&f.manager, 11, "w").await.unwrap();
        f.manager
            .set_gossip_up(Some(Arc::new(HashSet::from([first.node_id.clone()]))));
        let err = f.manager.handle_admin(rm(false), &me).await.unwrap_err();
        assert!(err.to_string().contains("is not down"), "{err}");
        // ...but one whose watch stream here just ended is down here at once, before gossip
        // notices, and goes.
        drop(Session::start(&f.manager, &first.node_id));
        assert!(f.manager.handle_admin(rm(false), &me).await.is_ok());
        // A watch stream and gossip: up, so refused without --force.
        let grant = join(&f.manager, 11, "w").await.unwrap();
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
            .await
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
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
        assert_eq!(f.manager.state().cluster().unwrap().nodes.len(), 2);
        assert_eq!(
            f.manager.handle_admin(rm(true), &me).await.unwrap(),
            Reply::Lines(vec![grant.node_id.to_string()])
        );
        drop(session);
        // A manager (the only one).
        let err = f
            .manager
            .handle_admin(
                AdminRequest::NodeRm {
                    nodes: vec!["n1".into()],
                    force: true,
                },
                &me,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("must be demoted to worker before removal"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn keys_rotate_when_due_and_persist() {
        let f = leader().await;
        let v = f.manager.state().version;
        assert!(!f.manager.rotate_keys_if_due(1099).await.unwrap());
        assert_eq!(f.manager.state().version, v);
        assert!(f.manager.rotate_keys_if_due(1100).await.unwrap());
        let keys = f.manager.view().keys.clone();
        assert_eq!(
            keys.data_path.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(keys.next_rotation(), 1200);
        assert_eq!(
            f.store.manager(State::from_record).await.unwrap().unwrap(),
            f.manager.state()
        );
    }

    fn rotate_secret(n: u128) -> Command {
        Command::RotateSecret(Role::Worker, Secret::from_random(n).as_str().into())
    }

    /// Changes asked for at once apply one at a time: none is computed from a state another
    /// is replacing (each raises the version by one), and the store holds what is live.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_apply_one_at_a_time() {
        let f = leader().await;
        let v = f.manager.state().version;
        let tasks: Vec<_> = (0..20)
            .map(|n| {
                let m = f.manager.clone();
                tokio::spawn(async move { m.apply(rotate_secret(1000 + n)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Applied::Changed);
        }
        let state = f.manager.state();
        assert_eq!(state.version, v + 20);
        assert_eq!(
            f.store.manager(State::from_record).await.unwrap(),
            Some(state.clone())
        );
        assert_eq!(f.membership.get().unwrap().view.version, state.version);
        assert_eq!(f.manager.view().version, state.version);
    }

    /// A caller that stops waiting while its change is being written splits nothing: the
    /// change is saved and goes live together, and the next change starts from it.
    #[tokio::test]
    async fn a_caller_gone_mid_commit_splits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_slow(dir.path(), Duration::from_millis(200))
            .await
            .unwrap();
        let f = leader_on(dir, store).await;
        let v = f.manager.state().version;
        let mut change = Box::pin(f.manager.apply(rotate_secret(1)));
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(change.as_mut(), cx))
        })
        .await;
        assert!(first.is_pending(), "the change is being written");
        drop(change);
        assert_eq!(f.manager.state().version, v, "not live before it is saved");
        f.manager.apply(rotate_secret(2)).await.unwrap();
        let state = f.manager.state();
        assert_eq!(state.version, v + 2);
        assert_eq!(
            f.store.manager(State::from_record).await.unwrap(),
            Some(state)
        );
    }

    /// A change the store cannot save changes nothing: not the state, the view, nor this
    /// node's record. (openraft stops a member whose storage fails: the other managers carry
    /// on without it; a group of one has no leader until it is restarted.)
    #[tokio::test]
    async fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, failing) = Store::open_failing(dir.path()).await.unwrap();
        let f = leader_on(dir, store).await;
        f.manager.apply(rotate_secret(1)).await.unwrap();
        let (state, view, record) = (
            f.manager.state(),
            f.manager.view(),
            f.membership.get().unwrap(),
        );
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = f.manager.apply(rotate_secret(2)).await.unwrap_err();
        assert!(matches!(err, ChangeError::NoLeader), "{err}");
        assert!(!f.manager.rotate_keys_if_due(1100).await.unwrap_or(false));
        assert_eq!(f.manager.state(), state);
        assert_eq!(f.manager.view(), view);
        assert_eq!(f.membership.get().unwrap(), record);
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

    /// What gossip's timers saw while the manager made changes.
    struct Lateness {
        /// Manager changes made (one store commit each).
        commits: u64,
        /// Gossip timers fired during the load, both nodes.
        fired: u64,
        /// Their mean lateness, microseconds.
        mean_us: u64,
        /// The latest any gossip timer fired, microseconds (either node, since start).
        max_us: u64,
        /// The highest local health either node reported, sampled every 100 ms.
        health: u32,
    }

    impl std::fmt::Display for Lateness {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let ms = |us: u64| us as f64 / 1000.0;
            write!(
                f,
                "{} commits; {} gossip timers fired, late by {:.1} ms on average, {:.1} ms at most; local health at most {}",
                self.commits,
                self.fired,
                ms(self.mean_us),
                ms(self.max_us),
                self.health
            )
        }
    }

    /// Two gossip drivers on loopback that see each other up (1 s probe period).
    async fn gossip_pair() -> [shoal_gossip::driver::Handle; 2] {
        use shoal_gossip::auth::insecure_test_keys;
        use shoal_gossip::{driver, Admission, Event, Key, Keyring, Metadata};
        let id = |i: u128| shoal_gossip::NodeId::from_index(100 + i);
        let addr = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let addrs = [addr(), addr()];
        let mut handles = Vec::new();
        let mut events = Vec::new();
        for i in 0..2 {
            let mut c = driver::Config::new(
                id(i),
                addrs[i as usize],
                Metadata {
                    vtep: addrs[i as usize].ip(),
                    data_port: 4789,
                    public_key: insecure_test_keys(&id(i)).public().x25519,
                    incarnation: [i as u8; 16],
                    role: shoal_gossip::Role::Worker,
                    version: "test".into(),
                },
                Keyring::new(Key {
                    id: 1,
                    secret: [3; 32],
                }),
                insecure_test_keys(&id(i)),
            );
            c.bind = addrs[i as usize];
            c.admission =
                Admission::only((0..2).map(|j| (id(j), insecure_test_keys(&id(j)).public())));
            if i == 1 {
                c.seeds = vec![(id(0), addrs[0])];
            }
            let (h, e) = driver::start(c).await.unwrap();
            handles.push(h);
            events.push(e);
        }
        for (i, e) in events.iter_mut().enumerate() {
            let other = id(1 - i as u128);
            tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(ev) = e.recv().await {
                    if matches!(&ev, Event::Up(m) if m.id == other) {
                        return;
                    }
                }
            })
            .await
            .expect("the gossip nodes see each other up");
        }
        // Keep the event channels open (the drivers' sends fail harmlessly otherwise).
        std::mem::forget(events);
        [handles[0].clone(), handles[1].clone()]
    }

    /// Two gossip drivers run on this runtime (as the agent runs gossip beside its manager);
    /// then `writers` tasks make manager changes for `load`, each a store commit whose syncs
    /// take `sync_delay` longer (a slow disk), each task yielding between its changes (as API
    /// requests do between their reads and writes). Returns what gossip's timers saw.
    async fn gossip_during_commits(
        sync_delay: Duration,
        writers: u128,
        load: Duration,
    ) -> Lateness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_slow(dir.path(), sync_delay).await.unwrap();
        let f = leader_on(dir, store).await;
        let gossip = gossip_pair().await;
        let stats = || async {
            let a = gossip[0].stats().await.unwrap();
            let b = gossip[1].stats().await.unwrap();
            [a, b]
        };
        let before = stats().await;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let health = {
            let (gossip, done) = (gossip.clone(), done.clone());
            tokio::spawn(async move {
                let mut worst = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for g in &gossip {
                        worst = worst.max(g.stats().await.unwrap().health);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                worst
            })
        };
        let end = tokio::time::Instant::now() + load;
        let writers: Vec<_> = (0..writers)
            .map(|w| {
                let m = f.manager.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while tokio::time::Instant::now() < end {
                        let secret = Secret::from_random(u128::from(n) << 8 | w);
                        m.apply(Command::RotateSecret(Role::Worker, secret.as_str().into()))
                            .await
                            .unwrap();
                        n += 1;
                        tokio::task::yield_now().await;
                    }
                    n
                })
            })
            .collect();
        let mut commits = 0;
        for w in writers {
            commits += w.await.unwrap();
        }
        tokio::time::sleep_until(end).await;
        // Every timer the load delayed has fired by now (the probe period is 1 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let health = health.await.unwrap();
        let after = stats().await;
        let fired: u64 = (0..2)
            .map(|i| after[i].timers_fired - before[i].timers_fired)
            .sum();
        let late: u64 = (0..2)
            .map(|i| after[i].timer_late_sum_us - before[i].timer_late_sum_us)
            .sum();
        for g in &gossip {
            g.shutdown().await;
        }
        Lateness {
            commits,
            fired,
            mean_us: late / fired.max(1),
            max_us: after.iter().map(|s| s.timer_late_max_us).max().unwrap_or(0),
            health: health.max(after.iter().map(|s| s.health).max().unwrap_or(0)),
        }
    }

    /// The manager's store commits do not hold up gossip's timers on the agent's runtime (two
    /// workers), even on a disk whose every sync takes 300 ms: no timer fires half a probe
    /// period late (which would raise Lifeguard's local health, then slow this node's probes
    /// and make it distrust its own observations).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_keeps_time_while_the_manager_commits_on_a_slow_disk() {
        // Slow, but a Raft commit (the log append, then the apply: two syncs) still fits in
        // the proposal timeout.
        const SLOW_SYNC_MS: u64 = 300;
        let l = gossip_during_commits(
            Duration::from_millis(SLOW_SYNC_MS),
            3,
            Duration::from_secs(4),
        )
        .await;
        eprintln!("slow disk ({SLOW_SYNC_MS} ms a sync), 3 writers, 4 s: {l}");
        assert!(l.commits > 0 && l.fired > 0, "{l}");
        let half_period = Duration::from_millis(500).as_micros() as u64;
        assert!(
            l.max_us < half_period,
            "a gossip timer fired {} ms late: {l}",
            l.max_us / 1000
        );
        assert_eq!(l.health, 0, "{l}");
    }

    /// The same on this machine's disk, as fast as the writers go (a measurement: prints
    /// what gossip's timers saw; `cargo test -p shoal-control --lib gossip_timers_on_this_disk
    /// -- --ignored --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement"]
    async fn gossip_timers_on_this_disk() {
        for writers in [0, 3] {
            let l = gossip_during_commits(Duration::ZERO, writers, Duration::from_secs(10)).await;
            eprintln!("this disk, {writers} writers, 10 s: {l}");
            assert_eq!(l.health, 0, "{l}");
        }
    }
}
