//! The manager's state and the one state machine that changes it.
//!
//! Every change is a [`Command`] applied by [`State::apply`]. `apply` is deterministic: the
//! IDs, secrets, keys and timestamps a change needs are made before and carried inside the
//! command, so a replicated log (Raft, a later issue) can replay the same commands on every
//! manager and reach the same state. A refused command changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use crate::cluster::{
    Availability, ClusterView, KeyEntry, Keys, Network, Node, Role, Vtep, MIN_ROTATION_INTERVAL,
};
use crate::id::NodeId;
use crate::manager::networks::{self, AddrPools, NetworkError, NetworkSpec, UserNetwork};
use crate::manager::services::{self, Protocol, PublishedPort, Service, ServiceError, ServiceSpec};
use crate::token::Secret;
pub use crate::trust::tls::CaMaterial;

/// Everything a swarm is, once initialized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// The cluster CA.
    pub ca: CaMaterial,
    /// Worker join secret.
    pub worker_secret: String,
    /// Manager join secret.
    pub manager_secret: String,
    /// The next Raft ID to hand out (IDs are never reused).
    #[serde(default)]
    pub next_raft_id: u64,
    /// Before Raft: the one manager. Read from old records only, to give it Raft ID 1.
    #[serde(default, rename = "leader", skip_serializing)]
    pub legacy_leader: Option<NodeId>,
    /// Before Raft: that manager's API address.
    #[serde(default, rename = "api_addr", skip_serializing)]
    pub legacy_api_addr: Option<SocketAddr>,
    /// The node list.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Network keys.
    pub keys: Keys,
    /// The ingress network.
    pub ingress: Network,
    /// Unix time of init.
    pub created_at: u64,
    /// How long node certificates are valid (`init --cert-expiry`).
    pub cert_expiry_secs: u64,
    /// User-defined networks, by name.
    #[serde(default)]
    pub networks: BTreeMap<String, UserNetwork>,
    /// Where their subnets come from (`init --default-addr-pool`).
    #[serde(default)]
    pub addr_pools: AddrPools,
    /// Services, by name.
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
}

/// A manager's API address when it did not say otherwise.
pub fn default_api_addr(addr: IpAddr) -> SocketAddr {
    SocketAddr::new(addr, crate::api::DEFAULT_API_PORT)
}

impl Cluster {
    /// A fresh Raft ID.
    fn take_raft_id(&mut self) -> u64 {
        let id = self.next_raft_id.max(1);
        self.next_raft_id = id + 1;
        id
    }

    /// The active managers.
    pub fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .filter(|n| n.active() && n.role == Role::Manager)
    }

    /// Refuses to demote `id` if it is the last manager, or if the managers left, as many of
    /// them as `reachable` says are up, would be fewer than a quorum of their number.
    fn check_demotion(&self, id: &NodeId, reachable: &BTreeSet<NodeId>) -> Result<(), ApplyError> {
        let left: Vec<&Node> = self.managers().filter(|n| &n.id != id).collect();
        if left.is_empty() {
            return Err(ApplyError::DemoteLast(id.clone()));
        }
        let quorum = left.len() / 2 + 1;
        let up = left.iter().filter(|n| reachable.contains(&n.id)).count();
        if up < quorum {
            return Err(ApplyError::Quorum {
                reachable: up,
                left: left.len(),
                quorum,
            });
        }
        Ok(())
    }

    /// Gives Raft IDs and API addresses to the managers of a state from before Raft: the one
    /// that ran `init` gets ID 1 and the API address it had.
    fn adopt_raft(&mut self) {
        if self.next_raft_id != 0 {
            return;
        }
        self.next_raft_id = 1;
        if let Some(id) = self.legacy_leader.take() {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.raft_id = Some(1);
                n.api_addr = self.legacy_api_addr.or(n.api_addr);
                self.next_raft_id = 2;
            }
        }
        let others: Vec<NodeId> = self
            .managers()
            .filter(|n| n.raft_id.is_none())
            .map(|n| n.id.clone())
            .collect();
        for id in others {
            let raft_id = self.take_raft_id();
            if let Some(n) = self.nodes.get_mut(&id) {
                n.raft_id = Some(raft_id);
                n.api_addr = Some(n.api_addr.unwrap_or_else(|| default_api_addr(n.addr)));
            }
        }
        self.legacy_api_addr = None;
    }

    /// Overlay addresses in use: the nodes' and the external VTEPs'.
    pub fn overlay_used(&self) -> BTreeSet<Ipv4Addr> {
        self.nodes
            .values()
            .filter_map(|n| n.overlay_addr)
            .chain(self.ingress.vteps.iter().map(|v| v.ip))
            .collect()
    }

    /// The secret for `role`.
    pub fn secret(&self, role: Role) -> &str {
        match role {
            Role::Worker => &self.worker_secret,
            Role::Manager => &self.manager_secret,
        }
    }
}

/// The manager's whole state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Grows by one at every command that changed something.
    pub version: u64,
    /// Grows by one at every `init --force-new-cluster` (see [`State::force_new_cluster`]).
    #[serde(default)]
    pub generation: u64,
    /// `None` until `init`.
    pub cluster: Option<Cluster>,
}

/// A certificate the manager issued to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// DER.
    pub der: Vec<u8>,
    /// SHA-256 of `der`.
    pub digest: [u8; 32],
    /// Unix time it expires.
    pub not_after: u64,
}

impl Node {
    /// Takes `cert` as the node's certificate; the one before stays usable for a watch stream
    /// only, until the node picks the new one up.
    fn set_cert(&mut self, cert: NodeCert) {
        if cert.digest != self.cert_digest {
            self.previous_cert_digest = Some(self.cert_digest);
        }
        self.cert_digest = cert.digest;
        self.cert_der = cert.der;
        self.cert_not_after = cert.not_after;
    }

    /// Whether this record still speaks for a node: it has not left.
    pub fn active(&self) -> bool {
        !self.left
    }
}

/// The data of [`Command::Init`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// The CA made for this cluster.
    pub ca: CaMaterial,
    /// The first node, the first manager.
    pub leader: Node,
    /// Its API address.
    pub api_addr: SocketAddr,
    /// Worker join secret.
    pub worker_secret: String,
    /// Manager join secret.
    pub manager_secret: String,
    /// First gossip key and data-path epoch (id 1 each).
    pub gossip_key: [u8; 32],
    /// First data-path key.
    pub data_path_key: [u8; 32],
    /// Seconds between key rotations.
    pub key_interval_secs: u64,
    /// How long node certificates are valid.
    pub cert_expiry_secs: u64,
    /// The ingress network.
    pub ingress: Network,
    /// Unix time now.
    pub at: u64,
    /// Where user networks' subnets come from.
    #[serde(default)]
    pub addr_pools: AddrPools,
}

/// A change to the manager's state. Everything random or time-dependent is inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create the cluster.
    Init(Box<Init>),
    /// Add a node (already checked by whoever proposes it).
    AddNode(Box<Node>),
    /// Add a node that joined with a token: applied only if its secret proof still opens the
    /// node's role (a join that raced a `join-token --rotate` does not commit).
    Join(Box<Node>, Admission),
    /// Remove a node from the list.
    RemoveNode(NodeId),
    /// Change a node's role, with the certificate issued for it in that role; the managers the
    /// proposer saw reachable decide whether a demotion keeps a quorum.
    SetRole(NodeId, Role, NodeCert, BTreeSet<NodeId>),
    /// Replace a node's certificate (a renewal), same role.
    Renew(NodeId, NodeCert),
    /// The node left on its own (`shoal leave`).
    MarkLeft(NodeId),
    /// Replace the join secret of a role.
    RotateSecret(Role, String),
    /// Register an external VTEP on the ingress network (plain networks only).
    AddVtep(Vtep),
    /// Remove the external VTEP with this overlay address.
    RemoveVtep(Ipv4Addr),
    /// `network create`.
    CreateNetwork(Box<NetworkSpec>),
    /// `network rm`.
    RemoveNetwork(String),
    /// Give a node another address block of a network (see `docs/networks.md`).
    GrantBlock {
        /// The network's name.
        network: String,
        /// The node.
        node: NodeId,
    },
    /// Assign a fixed address of a network to a node (a container that moved to it).
    AssignAddress {
        /// The network's name.
        network: String,
        /// The node.
        node: NodeId,
        /// The address.
        ip: Ipv4Addr,
    },
    /// `service create` (its VIP allocated inside apply).
    CreateService(Box<ServiceSpec>),
    /// `service rm`: the service and its VIP go.
    RemoveService(String),
    /// `service update`: its published ports (removals first).
    UpdateService {
        /// The service's name.
        name: String,
        /// `--publish-add`.
        publish_add: Vec<PublishedPort>,
        /// `--publish-rm`: published port and protocol.
        publish_rm: Vec<(u16, Protocol)>,
    },
    /// `service backend add|rm`, or a node attaching a container of the service: the address
    /// `ip` on the service's network is one of its backends (`present`) or not.
    SetBackend {
        /// The service's name.
        service: String,
        /// The backend's address on the service's network.
        ip: Ipv4Addr,
        /// A backend from now on, or no longer.
        present: bool,
    },
    /// Start a new gossip key and data-path epoch; the previous ones stay live.
    RotateKeys {
        /// New gossip key.
        gossip_key: [u8; 32],
        /// New data-path key.
        data_path_key: [u8; 32],
        /// Unix time now.
        at: u64,
    },
}

/// A join's proof of its secret, bound to the join's TLS session (see `crate::trust::join`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The session's exporter bytes.
    pub exporter: [u8; 32],
    /// The node's proof of the join secret.
    pub secret_proof: [u8; 32],
}

/// What an applied command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed and its version grew.
    Changed,
    /// The command asked for what already was (e.g. promote a manager); nothing changed.
    Unchanged,
}

/// Why a command was refused. The state is exactly as before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    /// `init` on a node that is already in a swarm.
    #[error("This node is already part of a swarm. Use \"shoal leave\" to leave this swarm and join another one.")]
    AlreadyInitialized,
    /// A command other than `init` before `init`.
    #[error("This node is not a swarm manager. Use \"shoal init\" or \"shoal join\" to connect this node to swarm and try again.")]
    NotInitialized,
    /// A node with this ID is in the list already.
    #[error("node {0} is already in the swarm")]
    NodeExists(NodeId),
    /// No node with this ID.
    #[error("node {0} not found")]
    NoSuchNode(NodeId),
    /// A joining node's advertise address belongs to a node in the swarm.
    #[error("advertise address {addr} is already used by node {owner} ({hostname}), which is in the swarm; if that node is gone, remove it first (`shoal node rm {owner}`), or join with another --advertise-addr")]
    AddressInUse {
        /// The address.
        addr: IpAddr,
        /// The node that has it.
        owner: NodeId,
        /// Its host name.
        hostname: String,
    },
    /// A joining node's public key belongs to a node in the swarm.
    #[error("this node's key is already the key of node {owner} ({hostname}), which is in the swarm: a copy of that node's state dir? Give this node its own state dir, or remove the other first (`shoal node rm {owner}`)")]
    KeyInUse {
        /// The node that has it.
        owner: NodeId,
        /// Its host name.
        hostname: String,
    },
    /// The join secret was rotated (or is wrong) by the time the join was applied.
    #[error("{}", crate::manager::INVALID_SECRET)]
    InvalidSecret,
    /// A manager must be demoted before removal.
    #[error("node {0} is a cluster manager. It must be demoted to worker before removal")]
    RemoveManager(NodeId),
    /// The last manager cannot be demoted.
    #[error("attempting to demote the last manager of the swarm")]
    DemoteLast(NodeId),
    /// A demotion that would leave fewer reachable managers than a quorum.
    #[error("can't remove member from the raft: this would result in a loss of quorum ({reachable} of the {left} managers left would be reachable, {quorum} are needed)")]
    Quorum {
        /// Reachable managers after the change.
        reachable: usize,
        /// Managers after the change.
        left: usize,
        /// A quorum of those.
        quorum: usize,
    },
    /// A join secret that is not 25 base-36 characters.
    #[error("refused a malformed join secret: {0}")]
    BadSecret(String),
    /// No overlay address left, or a bad subnet.
    #[error("cannot give an address on network ingress: {0}")]
    Ipam(String),
    /// External VTEPs on an encrypted network.
    #[error("network ingress is encrypted: external VTEPs can only join a plain network (one made with `shoal init --no-encrypt`)")]
    VtepOnEncrypted,
    /// A VTEP that clashes with a node or another VTEP, or a bad one.
    #[error("{0}")]
    BadVtep(String),
    /// No VTEP with this overlay address.
    #[error("no external VTEP with overlay address {0} on network ingress")]
    NoSuchVtep(Ipv4Addr),
    /// Key rotation interval of zero.
    #[error("the key rotation interval must be at least one second")]
    ZeroInterval,
    /// `network create` or `rm` refused.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A service command refused.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// `init --force-new-cluster` on a node that is not an active manager of its state.
    #[error("This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager.")]
    NotAManager(NodeId),
}

impl State {
    /// Applies `command`. On error nothing changed.
    pub fn apply(&mut self, command: Command) -> Result<Applied, ApplyError> {
        let applied = self.apply_inner(command)?;
        if applied == Applied::Changed {
            self.version += 1;
        }
        Ok(applied)
    }

    fn apply_inner(&mut self, command: Command) -> Result<Applied, ApplyError> {
        if let Command::Init(init) = command {
            if self.cluster.is_some() {
                return Err(ApplyError::AlreadyInitialized);
            }
            if init.key_interval_secs == 0 {
                return Err(ApplyError::ZeroInterval);
            }
            for secret in [&init.worker_secret, &init.manager_secret] {
                crate::token::Token::parse_secret(secret)
                    .map_err(|e| ApplyError::BadSecret(e.to_string()))?;
            }
            let Init {
                ca,
                mut leader,
                api_addr,
                worker_secret,
                manager_secret,
                gossip_key,
                data_path_key,
                key_interval_secs,
                cert_expiry_secs,
                ingress,
                at,
                addr_pools,
            } = *init;
            addr_pools.check()?;
            leader.role = Role::Manager;
            leader.raft_id = Some(1);
            leader.api_addr = Some(api_addr);
            leader.overlay_addr = Some(
                ipam(&ingress)?
                    .allocate(&BTreeSet::new())
                    .map_err(|e| ApplyError::Ipam(e.to_string()))?,
            );
            let leader_id = leader.id.clone();
            self.cluster = Some(Cluster {
                ca,
                worker_secret,
                manager_secret,
                next_raft_id: 2,
                legacy_leader: None,
                legacy_api_addr: None,
                nodes: BTreeMap::from([(leader_id, leader)]),
                keys: Keys {
                    gossip: vec![KeyEntry {
                        id: 1,
                        key: gossip_key,
                    }],
                    data_path: vec![KeyEntry {
                        id: 1,
                        key: data_path_key,
                    }],
                    rotated_at: at,
                    interval_secs: key_interval_secs,
                    owed: false,
                },
                ingress,
                created_at: at,
                cert_expiry_secs,
                networks: BTreeMap::new(),
                addr_pools,
                services: BTreeMap::new(),
            });
            return Ok(Applied::Changed);
        }
        let cluster = self.cluster.as_mut().ok_or(ApplyError::NotInitialized)?;
        match command {
            // An `Init` returns above; here the cluster exists.
            Command::Init(_) => Err(ApplyError::AlreadyInitialized),
            Command::Join(node, admission) => {
                let role = self.role_for_proof(&admission.exporter, &admission.secret_proof);
                if role != Some(node.role) {
                    return Err(ApplyError::InvalidSecret);
                }
                self.apply_inner(Command::AddNode(node))
            }
            Command::AddNode(mut node) => {
                if cluster.nodes.contains_key(&node.id) {
                    return Err(ApplyError::NodeExists(node.id.clone()));
                }
                // One identity per node: the address and the keys of a node that is in the
                // swarm (not one that left) are its own.
                for other in cluster.nodes.values().filter(|n| n.active()) {
                    if other.addr == node.addr {
                        return Err(ApplyError::AddressInUse {
                            addr: node.addr,
                            owner: other.id.clone(),
                            hostname: other.hostname.clone(),
                        });
                    }
                    let same_signing_key =
                        other.signing_key != [0; 32] && other.signing_key == node.signing_key;
                    if other.public_key == node.public_key || same_signing_key {
                        return Err(ApplyError::KeyInUse {
                            owner: other.id.clone(),
                            hostname: other.hostname.clone(),
                        });
                    }
                }
                let ipam = ipam(&cluster.ingress)?;
                let used = cluster.overlay_used();
                node.overlay_addr = Some(match node.overlay_addr {
                    Some(a) if ipam.is_assignable(a) && !used.contains(&a) => a,
                    _ => ipam
                        .allocate(&used)
                        .map_err(|e| ApplyError::Ipam(e.to_string()))?,
                });
                node.raft_id = None;
                if node.role == Role::Manager {
                    node.raft_id = Some(cluster.take_raft_id());
                    node.api_addr =
                        Some(node.api_addr.unwrap_or_else(|| default_api_addr(node.addr)));
                }
                cluster.nodes.insert(node.id.clone(), *node);
                Ok(Applied::Changed)
            }
            Command::AddVtep(vtep) => {
                if cluster.ingress.encrypted {
                    return Err(ApplyError::VtepOnEncrypted);
                }
                if vtep.mac.parse::<shoal_vxlan::wire::Mac>().is_err() {
                    return Err(ApplyError::BadVtep(format!(
                        "{} is not a MAC address: write six pairs of hex digits separated by colons",
                        vtep.mac
                    )));
                }
                ipam(&cluster.ingress)?
                    .check(vtep.ip)
                    .map_err(|e| ApplyError::BadVtep(e.to_string()))?;
                if cluster.ingress.vteps.contains(&vtep) {
                    return Ok(Applied::Unchanged);
                }
                if cluster.overlay_used().contains(&vtep.ip) {
                    return Err(ApplyError::BadVtep(format!(
                        "overlay address {} is in use on network ingress",
                        vtep.ip
                    )));
                }
                if cluster.nodes.values().any(|n| n.addr == vtep.addr)
                    || cluster.ingress.vteps.iter().any(|v| v.addr == vtep.addr)
                {
                    return Err(ApplyError::BadVtep(format!(
                        "underlay address {} is already a node or VTEP of network ingress",
                        vtep.addr
                    )));
                }
                cluster.ingress.vteps.push(vtep);
                Ok(Applied::Changed)
            }
            Command::RemoveVtep(ip) => {
                let before = cluster.ingress.vteps.len();
                cluster.ingress.vteps.retain(|v| v.ip != ip);
                if cluster.ingress.vteps.len() == before {
                    return Err(ApplyError::NoSuchVtep(ip));
                }
                Ok(Applied::Changed)
            }
            Command::RemoveNode(id) => {
                let node = cluster
                    .nodes
                    .get(&id)
                    .ok_or_else(|| ApplyError::NoSuchNode(id.clone()))?;
                if node.role == Role::Manager && node.active() {
                    return Err(ApplyError::RemoveManager(id));
                }
                let was_in = node.active();
                cluster.nodes.remove(&id);
                networks::release_blocks(&mut cluster.networks, &id);
                // What it held (gossip key, data-path epoch) must stop working: rotate soon.
                // (A node that left already caused that rotation.)
                cluster.keys.owed |= was_in;
                Ok(Applied::Changed)
            }
            Command::SetRole(id, role, cert, reachable) => {
                let current = cluster
                    .nodes
                    .get(&id)
                    .ok_or_else(|| ApplyError::NoSuchNode(id.clone()))?;
                if current.role == role {
                    return Ok(Applied::Unchanged);
                }
                if role == Role::Worker {
                    cluster.check_demotion(&id, &reachable)?;
                }
                let raft_id = (role == Role::Manager).then(|| cluster.take_raft_id());
                let Some(node) = cluster.nodes.get_mut(&id) else {
                    return Err(ApplyError::NoSuchNode(id));
                };
                node.role = role;
                node.raft_id = raft_id;
                if role == Role::Manager && node.api_addr.is_none() {
                    node.api_addr = Some(default_api_addr(node.addr));
                }
                node.set_cert(cert);
                Ok(Applied::Changed)
            }
            Command::Renew(id, cert) => {
                let node = cluster
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| ApplyError::NoSuchNode(id.clone()))?;
                if node.cert_digest == cert.digest {
                    return Ok(Applied::Unchanged);
                }
                node.set_cert(cert);
                Ok(Applied::Changed)
            }
            Command::MarkLeft(id) => {
                let node = cluster
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| ApplyError::NoSuchNode(id.clone()))?;
                if node.left {
                    return Ok(Applied::Unchanged);
                }
                // Leaving revokes, as a removal does: no certificate of its works any more, and
                // the keys it held are rotated soon.
                node.left = true;
                node.previous_cert_digest = None;
                node.raft_id = None;
                cluster.keys.owed = true;
                networks::release_blocks(&mut cluster.networks, &id);
                Ok(Applied::Changed)
            }
            Command::RotateSecret(role, secret) => {
                crate::token::Token::parse_secret(&secret)
                    .map_err(|e| ApplyError::BadSecret(e.to_string()))?;
                let slot = match role {
                    Role::Worker => &mut cluster.worker_secret,
                    Role::Manager => &mut cluster.manager_secret,
                };
                if *slot == secret {
                    return Ok(Applied::Unchanged);
                }
                *slot = secret;
                Ok(Applied::Changed)
            }
            Command::CreateNetwork(spec) => {
                let ingress = cluster.ingress.subnet.parse().map_err(|_| {
                    ApplyError::Ipam(format!("subnet {} is not a CIDR", cluster.ingress.subnet))
                })?;
                let network =
                    networks::create(&cluster.networks, ingress, &cluster.addr_pools, *spec)?;
                cluster.networks.insert(network.name.clone(), network);
                Ok(Applied::Changed)
            }
            Command::GrantBlock { network, node } => {
                let vips = vips_of(cluster, &network);
                let n = network_of_node(cluster, network, &node)?;
                networks::grant_block(n, &node, &vips)?;
                Ok(Applied::Changed)
            }
            Command::AssignAddress { network, node, ip } => {
                let vips = vips_of(cluster, &network);
                let n = network_of_node(cluster, network, &node)?;
                if n.assigned.get(&ip) == Some(&node) {
                    return Ok(Applied::Unchanged);
                }
                networks::assign(n, &node, ip, &vips)?;
                Ok(Applied::Changed)
            }
            Command::RemoveNetwork(name) => {
                if name == cluster.ingress.name {
                    return Err(NetworkError::Ingress.into());
                }
                let n = cluster
                    .networks
                    .get(&name)
                    .ok_or_else(|| NetworkError::NotFound(name.clone()))?;
                if let Some(s) = services::user_of(&cluster.services, &n.id) {
                    return Err(NetworkError::InUse {
                        network: name,
                        service: s.name.clone(),
                    }
                    .into());
                }
                cluster.networks.remove(&name);
                Ok(Applied::Changed)
            }
            Command::CreateService(spec) => {
                let service = services::create(
                    &cluster.services,
                    &cluster.networks,
                    &cluster.ingress.name,
                    *spec,
                )?;
                cluster.services.insert(service.name.clone(), service);
                Ok(Applied::Changed)
            }
            Command::RemoveService(name) => {
                cluster
                    .services
                    .remove(&name)
                    .ok_or(ServiceError::NotFound(name))?;
                Ok(Applied::Changed)
            }
            Command::UpdateService {
                name,
                publish_add,
                publish_rm,
            } => {
                let ports = services::update(&cluster.services, &name, &publish_add, &publish_rm)?;
                match (ports, cluster.services.get_mut(&name)) {
                    (Some(ports), Some(s)) => {
                        s.ports = ports;
                        Ok(Applied::Changed)
                    }
                    _ => Ok(Applied::Unchanged),
                }
            }
            Command::SetBackend {
                service,
                ip,
                present,
            } => {
                let changed = services::set_backend(
                    &mut cluster.services,
                    &cluster.networks,
                    &service,
                    ip,
                    present,
                )?;
                Ok(if changed {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                })
            }
            Command::RotateKeys {
                gossip_key,
                data_path_key,
                at,
            } => {
                let keys = &mut cluster.keys;
                push_key(&mut keys.gossip, gossip_key);
                push_key(&mut keys.data_path, data_path_key);
                keys.rotated_at = at;
                keys.owed = false;
                Ok(Applied::Changed)
            }
        }
    }

    /// `init --force-new-cluster` on manager `keep`: every other manager becomes a worker,
    /// out of the Raft group, with the certificate `issue` makes for it in that role (its
    /// manager certificate no longer opens the managers' channel). The generation grows, so
    /// the new group's views replace the old group's on every node whatever their versions.
    /// Not a [`Command`]: it is no change the old group commits, but the first state of a new
    /// one. The demoted managers, in `node ls` order; on error nothing changed.
    pub fn force_new_cluster<E: From<ApplyError>>(
        &mut self,
        keep: &NodeId,
        mut issue: impl FnMut(&Cluster, &Node) -> Result<NodeCert, E>,
    ) -> Result<Vec<NodeId>, E> {
        let cluster = self.cluster.as_ref().ok_or(ApplyError::NotInitialized)?;
        if !cluster.managers().any(|n| &n.id == keep) {
            return Err(ApplyError::NotAManager(keep.clone()).into());
        }
        let mut certs = Vec::new();
        for node in cluster.managers().filter(|n| &n.id != keep) {
            certs.push((node.id.clone(), issue(cluster, node)?));
        }
        let Some(cluster) = self.cluster.as_mut() else {
            return Err(ApplyError::NotInitialized.into());
        };
        let mut demoted = Vec::new();
        for (id, cert) in certs {
            if let Some(node) = cluster.nodes.get_mut(&id) {
                node.role = Role::Worker;
                node.raft_id = None;
                node.set_cert(cert);
                demoted.push(id);
            }
        }
        self.generation += 1;
        self.version += 1;
        Ok(demoted)
    }

    /// The cluster, if initialized.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The role whose join secret `proof` proves on the connection with these exporter bytes
    /// (see `crate::trust::join`), if any.
    pub fn role_for_proof(&self, exporter: &[u8; 32], proof: &[u8; 32]) -> Option<Role> {
        let cluster = self.cluster.as_ref()?;
        [Role::Worker, Role::Manager]
            .into_iter()
            .find(|role| crate::trust::join::proves_secret(cluster.secret(*role), exporter, proof))
    }

    /// Checks `secret` against both roles' secrets; the role it opens, if any.
    pub fn role_for_secret(&self, secret: &str) -> Option<Role> {
        let cluster = self.cluster.as_ref()?;
        [Role::Worker, Role::Manager]
            .into_iter()
            .find(|role| secret_eq(cluster.secret(*role), secret))
    }
}

impl State {
    /// The view sent to nodes, if initialized.
    pub fn view(&self) -> Option<ClusterView> {
        let c = self.cluster.as_ref()?;
        Some(ClusterView {
            version: self.version,
            generation: self.generation,
            ca_cert_der: c.ca.cert_der.clone(),
            nodes: c
                .nodes
                .values()
                .map(|n| Node {
                    cert_der: Vec::new(),
                    cert_public_key: Vec::new(),
                    ..n.clone()
                })
                .collect(),
            keys: c.keys.clone(),
            ingress: c.ingress.clone(),
            cert_expiry_secs: c.cert_expiry_secs,
            networks: c.networks.values().cloned().collect(),
            services: c.services.values().cloned().collect(),
        })
    }
}

fn secret_eq(ours: &str, theirs: &str) -> bool {
    crate::token::Token::parse_secret(ours).is_ok_and(|s: Secret| s.matches(theirs))
}

fn ipam(network: &Network) -> Result<shoal_ingress::ipam::Ipam, ApplyError> {
    let subnet = network
        .subnet
        .parse()
        .map_err(|_| ApplyError::Ipam(format!("subnet {} is not a CIDR", network.subnet)))?;
    shoal_ingress::ipam::Ipam::new(subnet).map_err(|e| ApplyError::Ipam(e.to_string()))
}

fn push_key(ring: &mut Vec<KeyEntry>, key: [u8; 32]) {
    let id = ring.last().map_or(1, |k| k.id.wrapping_add(1));
    ring.push(KeyEntry { id, key });
    while ring.len() > 2 {
        ring.remove(0);
    }
}

/// The manager's state as the store keeps it, one variant per format (`{"v1": ...}`). The
/// state machine's types are format 1; a change to them that old records cannot be read into
/// gets a format 2 and a conversion here.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    V1(State),
}

/// [`Record`] as it is written: the same bytes, without a copy of the state.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum RecordRef<'a> {
    V1(&'a State),
}

impl State {
    /// The state as the store's manager record.
    pub fn to_record(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&RecordRef::V1(self))
    }

    /// The state from the store's manager record, in any format this build reads.
    pub fn from_record(bytes: &[u8]) -> Result<State, serde_json::Error> {
        serde_json::from_slice(bytes).map(|Record::V1(mut state)| {
            if let Some(c) = state.cluster.as_mut() {
                c.adopt_raft();
            }
            state
        })
    }
}

/// The VIPs of the services on user network `network` (by name).
fn vips_of(cluster: &Cluster, network: &str) -> BTreeSet<Ipv4Addr> {
    cluster
        .networks
        .get(network)
        .map(|n| services::vips_on(&cluster.services, &n.id))
        .unwrap_or_default()
}

/// User network `network`, to change on behalf of `node`, which must be an active node.
fn network_of_node<'a>(
    cluster: &'a mut Cluster,
    network: String,
    node: &NodeId,
) -> Result<&'a mut UserNetwork, ApplyError> {
    if !cluster.nodes.get(node).is_some_and(Node::active) {
        return Err(ApplyError::NoSuchNode(node.clone()));
    }
    Ok(cluster
        .networks
        .get_mut(&network)
        .ok_or(NetworkError::NotFound(network))?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn id(n: u128) -> NodeId {
        NodeId::from_random(n)
    }

    /// A certificate record for node `n` (its bytes are not a real certificate).
    pub(crate) fn cert(n: u128) -> NodeCert {
        NodeCert {
            der: vec![n as u8; 3],
            digest: [n as u8 + 200; 32],
            not_after: 1_000_000,
        }
    }

    pub(crate) fn node(n: u128, role: Role) -> Node {
        Node {
            id: id(n),
            hostname: format!("n{n}"),
            addr: IpAddr::from([198, 18, 0, n as u8]),
            role,
            availability: Availability::Active,
            public_key: [n as u8; 32],
            signing_key: [n as u8 + 50; 32],
            cert_der: Vec::new(),
            cert_not_after: 0,
            cert_public_key: Vec::new(),
            previous_cert_digest: None,
            cert_digest: [n as u8 + 100; 32],
            engine_version: "0.1.0".into(),
            left: false,
            overlay_addr: None,
            joined_at: 1000 + n as u64,
            raft_id: None,
            api_addr: None,
        }
    }

    pub(crate) fn init_cmd() -> Command {
        Command::Init(Box::new(Init {
            ca: CaMaterial {
                cert_der: vec![1, 2, 3],
                key_pem: "key".into(),
            },
            leader: node(1, Role::Worker),
            api_addr: "198.18.0.1:2377".parse().unwrap(),
            worker_secret: Secret::from_random(11).as_str().into(),
            manager_secret: Secret::from_random(22).as_str().into(),
            gossip_key: [7; 32],
            data_path_key: [8; 32],
            key_interval_secs: 43_200,
            cert_expiry_secs: 90 * 24 * 3600,
            ingress: Network {
                name: "ingress".into(),
                vni: 4096,
                subnet: "198.19.0.0/24".into(),
                encrypted: true,
                data_path_port: 4789,
                vteps: Vec::new(),
            },
            at: 1000,
            addr_pools: AddrPools::default(),
        }))
    }

    fn initialized() -> State {
        let mut s = State::default();
        assert_eq!(s.apply(init_cmd()), Ok(Applied::Changed));
        s
    }

    /// Every test node reachable.
    fn up() -> BTreeSet<NodeId> {
        (1..=9).map(id).collect()
    }

    /// Applies a command that must be refused and checks nothing moved.
    fn refused(s: &mut State, cmd: Command, want: ApplyError) {
        let before = s.clone();
        assert_eq!(s.apply(cmd), Err(want));
        assert_eq!(*s, before);
    }

    #[test]
    fn init_makes_leader_manager() {
        let s = initialized();
        assert_eq!(s.version, 1);
        let c = s.cluster().unwrap();
        assert_eq!(c.nodes[&id(1)].role, Role::Manager);
        // The first manager is Raft ID 1; who leads is Raft's to say, not the state's.
        assert_eq!(c.nodes[&id(1)].raft_id, Some(1));
        assert_eq!(c.next_raft_id, 2);
        assert_eq!(c.keys.gossip.len(), 1);
        assert_eq!(c.keys.next_rotation(), 1000 + 43_200);
        assert_eq!(
            s.role_for_secret(Secret::from_random(11).as_str()),
            Some(Role::Worker)
        );
        assert_eq!(
            s.role_for_secret(Secret::from_random(22).as_str()),
            Some(Role::Manager)
        );
        assert_eq!(s.role_for_secret(Secret::from_random(33).as_str()), None);
    }

    #[test]
    fn second_init_refused() {
        let mut s = initialized();
        refused(&mut s, init_cmd(), ApplyError::AlreadyInitialized);
    }

    #[test]
    fn init_refuses_bad_input() {
        let mut s = State::default();
        let Command::Init(mut init) = init_cmd() else {
            unreachable!()
        };
        init.key_interval_secs = 0;
        refused(
            &mut s,
            Command::Init(init.clone()),
            ApplyError::ZeroInterval,
        );
        init.key_interval_secs = 10;
        init.worker_secret = "BAD".into();
        refused(
            &mut s,
            Command::Init(init),
            ApplyError::BadSecret(crate::token::TokenError::SecretLength(3).to_string()),
        );
    }

    #[test]
    fn commands_before_init_refused() {
        let mut s = State::default();
        for cmd in [
            Command::AddNode(Box::new(node(2, Role::Worker))),
            Command::RemoveNode(id(2)),
            Command::SetRole(id(2), Role::Manager, cert(2), up()),
            Command::MarkLeft(id(2)),
            Command::RotateSecret(Role::Worker, Secret::from_random(1).as_str().into()),
            Command::RotateKeys {
                gossip_key: [0; 32],
                data_path_key: [0; 32],
                at: 1,
            },
        ] {
            refused(&mut s, cmd, ApplyError::NotInitialized);
        }
    }

    #[test]
    fn add_and_remove_node() {
        let mut s = initialized();
        assert_eq!(
            s.apply(Command::AddNode(Box::new(node(2, Role::Worker)))),
            Ok(Applied::Changed)
        );
        assert_eq!(s.version, 2);
        refused(
            &mut s,
            Command::AddNode(Box::new(node(2, Role::Worker))),
            ApplyError::NodeExists(id(2)),
        );
        assert_eq!(s.apply(Command::RemoveNode(id(2))), Ok(Applied::Changed));
        assert!(!s.cluster().unwrap().nodes.contains_key(&id(2)));
        refused(
            &mut s,
            Command::RemoveNode(id(2)),
            ApplyError::NoSuchNode(id(2)),
        );
        refused(
            &mut s,
            Command::RemoveNode(id(1)),
            ApplyError::RemoveManager(id(1)),
        );
    }

    #[test]
    fn manager_must_be_demoted_before_removal() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(3, Role::Manager))))
            .unwrap();
        refused(
            &mut s,
            Command::RemoveNode(id(3)),
            ApplyError::RemoveManager(id(3)),
        );
        s.apply(Command::SetRole(id(3), Role::Worker, cert(3), up()))
            .unwrap();
        assert_eq!(s.apply(Command::RemoveNode(id(3))), Ok(Applied::Changed));
    }

    #[test]
    fn raft_ids_are_handed_out_once_and_never_reused() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Manager))))
            .unwrap();
        s.apply(Command::AddNode(Box::new(node(3, Role::Worker))))
            .unwrap();
        let c = s.cluster().unwrap();
        assert_eq!(c.nodes[&id(2)].raft_id, Some(2));
        assert_eq!(c.nodes[&id(3)].raft_id, None);
        assert_eq!(
            c.nodes[&id(2)].api_addr,
            Some("198.18.0.2:2377".parse().unwrap())
        );
        // Demoted, then promoted again: a new Raft ID, not its old one.
        s.apply(Command::SetRole(id(2), Role::Worker, cert(2), up()))
            .unwrap();
        assert_eq!(s.cluster().unwrap().nodes[&id(2)].raft_id, None);
        s.apply(Command::SetRole(id(2), Role::Manager, cert(5), up()))
            .unwrap();
        s.apply(Command::SetRole(id(3), Role::Manager, cert(3), up()))
            .unwrap();
        let c = s.cluster().unwrap();
        assert_eq!(c.nodes[&id(2)].raft_id, Some(3));
        assert_eq!(c.nodes[&id(3)].raft_id, Some(4));
        // A manager that leaves is out of the Raft group.
        s.apply(Command::MarkLeft(id(3))).unwrap();
        assert_eq!(s.cluster().unwrap().nodes[&id(3)].raft_id, None);
    }

    #[test]
    fn networks_are_created_and_removed_through_apply() {
        let mut s = initialized();
        let spec = |name: &str| Command::CreateNetwork(Box::new(networks::tests::spec(name, None)));
        s.apply(spec("web")).unwrap();
        let web = &s.cluster().unwrap().networks["web"];
        assert_eq!(
            (web.vni, web.subnet.to_string()),
            (4097, "10.0.0.0/24".into())
        );
        // The view carries it to every node.
        let view = s.view().unwrap();
        assert_eq!(view.networks.len(), 1);
        assert_eq!(
            ClusterView::from_wire(view.to_wire()).networks,
            view.networks
        );
        refused(
            &mut s,
            spec("web"),
            ApplyError::Network(NetworkError::NameTaken("web".into())),
        );
        refused(
            &mut s,
            Command::RemoveNetwork("ingress".into()),
            ApplyError::Network(NetworkError::Ingress),
        );
        refused(
            &mut s,
            Command::RemoveNetwork("db".into()),
            ApplyError::Network(NetworkError::NotFound("db".into())),
        );
        s.apply(Command::RemoveNetwork("web".into())).unwrap();
        assert!(s.cluster().unwrap().networks.is_empty());
    }

    /// A swarm of node 1 (its manager) and workers 2 and 3, with network `web` on 10.9.0.0/24.
    fn with_web() -> State {
        let mut s = initialized();
        for n in [2, 3] {
            s.apply(Command::AddNode(Box::new(node(n, Role::Worker))))
                .unwrap();
        }
        s.apply(Command::CreateNetwork(Box::new(networks::tests::spec(
            "web",
            Some("10.9.0.0/24"),
        ))))
        .unwrap();
        s
    }

    #[test]
    fn address_blocks_go_to_members_and_come_back_when_they_go() {
        let mut s = with_web();
        let grant = |n| Command::GrantBlock {
            network: "web".into(),
            node: id(n),
        };
        for n in [2, 3, 2] {
            s.apply(grant(n)).unwrap();
        }
        let blocks = |s: &State| s.cluster().unwrap().networks["web"].blocks.clone();
        assert_eq!(blocks(&s)[&id(2)].len(), 2);
        assert_eq!(blocks(&s)[&id(3)], ["10.9.0.16/28".parse().unwrap()]);
        // Every node has them, from its view.
        let view = ClusterView::from_wire(s.view().unwrap().to_wire());
        assert_eq!(view.networks[0].blocks, blocks(&s));
        // Not for a node that is not in the swarm, nor on a network that does not exist.
        refused(&mut s, grant(7), ApplyError::NoSuchNode(id(7)));
        refused(
            &mut s,
            Command::GrantBlock {
                network: "db".into(),
                node: id(2),
            },
            ApplyError::Network(NetworkError::NotFound("db".into())),
        );
        // A node that leaves, or is removed, gives its blocks back.
        s.apply(Command::MarkLeft(id(2))).unwrap();
        assert!(!blocks(&s).contains_key(&id(2)));
        refused(&mut s, grant(2), ApplyError::NoSuchNode(id(2)));
        s.apply(Command::RemoveNode(id(3))).unwrap();
        assert!(blocks(&s).is_empty());
    }

    #[test]
    fn a_fixed_address_goes_to_the_last_node_that_asks_and_comes_back_when_it_goes() {
        let mut s = with_web();
        let ip: Ipv4Addr = "10.9.0.5".parse().unwrap();
        let assign = |n, ip| Command::AssignAddress {
            network: "web".into(),
            node: id(n),
            ip,
        };
        let owner = |s: &State| {
            s.cluster().unwrap().networks["web"]
                .assigned
                .get(&ip)
                .cloned()
        };
        s.apply(assign(2, ip)).unwrap();
        assert_eq!(owner(&s), Some(id(2)));
        assert_eq!(s.apply(assign(2, ip)).unwrap(), Applied::Unchanged);
        // It moves: the last node to ask holds it; every node sees that in its view.
        s.apply(assign(3, ip)).unwrap();
        assert_eq!(owner(&s), Some(id(3)));
        let view = ClusterView::from_wire(s.view().unwrap().to_wire());
        assert_eq!(view.networks[0].assigned.get(&ip), Some(&id(3)));
        assert!(view.networks[0].holds(&id(3), ip) && !view.networks[0].holds(&id(2), ip));
        // Never the gateway, the network's own addresses, or one outside it; never for a
        // node that is not in the swarm.
        for bad in ["10.9.0.1", "10.9.0.0", "10.9.0.255", "10.10.0.5"] {
            let bad: Ipv4Addr = bad.parse().unwrap();
            refused(
                &mut s,
                assign(2, bad),
                ApplyError::Network(NetworkError::BadAddress {
                    ip: bad,
                    network: "web".into(),
                }),
            );
        }
        refused(&mut s, assign(7, ip), ApplyError::NoSuchNode(id(7)));
        // A node that goes gives it back.
        s.apply(Command::RemoveNode(id(3))).unwrap();
        assert_eq!(owner(&s), None);
    }

    fn create_service(name: &str, ports: &[&str]) -> Command {
        Command::CreateService(Box::new(services::tests::spec(
            name,
            "web",
            ports.iter().map(|p| services::tests::port(p)).collect(),
        )))
    }

    #[test]
    fn services_are_created_changed_and_removed_through_apply() {
        let mut s = with_web();
        s.apply(create_service("front", &["8080:80"])).unwrap();
        let svc = |s: &State, name: &str| s.cluster().unwrap().services[name].clone();
        let vip: Ipv4Addr = "10.9.0.254".parse().unwrap();
        assert_eq!(svc(&s, "front").vip, Some(vip));
        // Every node has it, from its view.
        let view = ClusterView::from_wire(s.view().unwrap().to_wire());
        assert_eq!(view.services, [svc(&s, "front")]);
        assert_eq!(view.service("front").unwrap().vip, Some(vip));
        // Refusals change nothing.
        let service_err = |e| ApplyError::Service(e);
        refused(
            &mut s,
            create_service("front", &[]),
            service_err(ServiceError::NameTaken("front".into())),
        );
        refused(
            &mut s,
            create_service("back", &["mode=host,8080:81"]),
            service_err(ServiceError::PortInUse {
                port: 8080,
                service: "front".into(),
            }),
        );
        let mut elsewhere = services::tests::spec("back", "db", vec![]);
        refused(
            &mut s,
            Command::CreateService(Box::new(elsewhere.clone())),
            service_err(ServiceError::NoNetwork("db".into())),
        );
        elsewhere.network = "web".into();
        elsewhere.endpoint_mode = services::EndpointMode::Dnsrr;
        elsewhere.ports = vec![services::tests::port("9090:90")];
        refused(
            &mut s,
            Command::CreateService(Box::new(elsewhere)),
            service_err(ServiceError::DnsrrIngress),
        );
        // Update: removals first, then additions; what already is, is Unchanged.
        let update = |add: &[&str], rm: &[(u16, Protocol)]| Command::UpdateService {
            name: "front".into(),
            publish_add: add.iter().map(|p| services::tests::port(p)).collect(),
            publish_rm: rm.to_vec(),
        };
        assert_eq!(s.apply(update(&["8080:80"], &[])), Ok(Applied::Unchanged));
        s.apply(update(&["53:53/udp"], &[(8080, Protocol::Tcp)]))
            .unwrap();
        assert_eq!(
            svc(&s, "front")
                .ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["*:53->53/udp"]
        );
        refused(
            &mut s,
            update(&[], &[(8080, Protocol::Tcp)]),
            service_err(ServiceError::NotPublished {
                service: "front".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }),
        );
        // Backends: addresses of the network, never its VIP.
        let backend = |ip: &str, present| Command::SetBackend {
            service: "front".into(),
            ip: ip.parse().unwrap(),
            present,
        };
        s.apply(backend("10.9.0.2", true)).unwrap();
        assert_eq!(s.apply(backend("10.9.0.2", true)), Ok(Applied::Unchanged));
        assert!(matches!(
            s.clone().apply(backend("10.9.0.254", true)),
            Err(ApplyError::Service(ServiceError::BadBackend { .. }))
        ));
        let before = s.clone();
        assert!(s.apply(backend("10.8.0.2", true)).is_err());
        assert_eq!(s, before);
        refused(
            &mut s,
            Command::SetBackend {
                service: "nope".into(),
                ip: "10.9.0.2".parse().unwrap(),
                present: true,
            },
            service_err(ServiceError::NotFound("nope".into())),
        );
        assert_eq!(
            ClusterView::from_wire(s.view().unwrap().to_wire()).services[0]
                .backends
                .len(),
            1
        );
        // A network a service uses stays.
        refused(
            &mut s,
            Command::RemoveNetwork("web".into()),
            ApplyError::Network(NetworkError::InUse {
                network: "web".into(),
                service: "front".into(),
            }),
        );
        assert_eq!(
            ApplyError::Network(NetworkError::InUse {
                network: "web".into(),
                service: "front".into(),
            })
            .to_string(),
            "network web is in use by service front"
        );
        s.apply(Command::RemoveService("front".into())).unwrap();
        refused(
            &mut s,
            Command::RemoveService("front".into()),
            service_err(ServiceError::NotFound("front".into())),
        );
        s.apply(Command::RemoveNetwork("web".into())).unwrap();
    }

    #[test]
    fn blocks_and_fixed_addresses_keep_away_from_vips() {
        let mut s = with_web();
        s.apply(create_service("front", &[])).unwrap();
        let vip: Ipv4Addr = "10.9.0.254".parse().unwrap();
        refused(
            &mut s,
            Command::AssignAddress {
                network: "web".into(),
                node: id(2),
                ip: vip,
            },
            ApplyError::Network(NetworkError::BadAddress {
                ip: vip,
                network: "web".into(),
            }),
        );
        // All 15 blocks below the VIP's are granted; the VIP's is never.
        for _ in 0..15 {
            s.apply(Command::GrantBlock {
                network: "web".into(),
                node: id(2),
            })
            .unwrap();
        }
        refused(
            &mut s,
            Command::GrantBlock {
                network: "web".into(),
                node: id(3),
            },
            ApplyError::Network(NetworkError::BlocksExhausted("web".into())),
        );
        // Once the service goes, its block is free; with every block granted, a new VIP
        // has nowhere to go.
        s.apply(Command::RemoveService("front".into())).unwrap();
        s.apply(Command::GrantBlock {
            network: "web".into(),
            node: id(3),
        })
        .unwrap();
        assert_eq!(
            s.cluster().unwrap().networks["web"].blocks[&id(3)],
            ["10.9.0.240/28".parse().unwrap()]
        );
        refused(
            &mut s,
            create_service("back", &[]),
            ApplyError::Service(ServiceError::VipsExhausted("web".into())),
        );
    }

    #[test]
    fn a_state_from_before_services_loads_with_none() {
        let s = with_web();
        let mut json: serde_json::Value = serde_json::from_slice(&s.to_record().unwrap()).unwrap();
        json["v1"]["cluster"]
            .as_object_mut()
            .unwrap()
            .remove("services");
        let old = State::from_record(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(old.cluster().unwrap().services.is_empty());
        assert_eq!(old, s);
    }

    #[test]
    fn force_new_cluster_keeps_one_manager_and_starts_a_generation() {
        let mut s = initialized();
        for (n, role) in [(2, Role::Manager), (3, Role::Manager), (4, Role::Worker)] {
            s.apply(Command::AddNode(Box::new(node(n, role)))).unwrap();
        }
        let before = s.clone();
        // A worker cannot force; nothing moves.
        let worker = s.force_new_cluster(&id(4), |_, _| Ok::<_, ApplyError>(cert(9)));
        assert_eq!(worker, Err(ApplyError::NotAManager(id(4))));
        assert_eq!(s, before);
        // A certificate that cannot be issued: nothing moves either.
        let failed = s.force_new_cluster(&id(3), |_, n| {
            if n.id == id(2) {
                Err(ApplyError::NoSuchNode(n.id.clone()))
            } else {
                Ok(cert(9))
            }
        });
        assert_eq!(failed, Err(ApplyError::NoSuchNode(id(2))));
        assert_eq!(s, before);

        let demoted = s.force_new_cluster(&id(3), |_, n| {
            Ok::<_, ApplyError>(cert(u128::from(n.public_key[0]) + 50))
        });
        assert_eq!(demoted, Ok(vec![id(1), id(2)]));
        let c = s.cluster().unwrap();
        let managers: Vec<_> = c.managers().map(|n| n.id.clone()).collect();
        assert_eq!(managers, vec![id(3)]);
        assert_eq!(
            c.nodes[&id(3)].raft_id,
            before.cluster().unwrap().nodes[&id(3)].raft_id
        );
        for n in [1, 2] {
            let node = &c.nodes[&id(n)];
            assert_eq!((node.role, node.raft_id), (Role::Worker, None));
            assert_eq!(node.cert_digest, cert(n + 50).digest);
        }
        // The worker and the Raft IDs to come are untouched.
        assert_eq!(c.nodes[&id(4)], before.cluster().unwrap().nodes[&id(4)]);
        assert_eq!(c.next_raft_id, before.cluster().unwrap().next_raft_id);
        // A later generation outranks any version of the old group.
        assert_eq!(s.generation, before.generation + 1);
        let mut old_group = before.view().unwrap();
        old_group.version += 1000;
        assert!(s.view().unwrap().supersedes(&old_group));
        assert!(!old_group.supersedes(&s.view().unwrap()));
    }

    #[test]
    fn a_demotion_that_breaks_quorum_is_refused_inside_apply() {
        let mut s = initialized();
        for n in [2, 3] {
            s.apply(Command::AddNode(Box::new(node(n, Role::Manager))))
                .unwrap();
        }
        // 3 managers, 3 reachable: demoting one leaves 2 of 2 reachable.
        // 3 managers, 1 and 2 reachable (3 is down): demoting 2 leaves 1 of 2: no quorum.
        let seen: BTreeSet<NodeId> = [id(1), id(2)].into();
        refused(
            &mut s,
            Command::SetRole(id(2), Role::Worker, cert(2), seen.clone()),
            ApplyError::Quorum {
                reachable: 1,
                left: 2,
                quorum: 2,
            },
        );
        // Demoting the down one keeps 2 of 2.
        s.apply(Command::SetRole(id(3), Role::Worker, cert(3), seen))
            .unwrap();
        s.apply(Command::SetRole(id(2), Role::Worker, cert(2), up()))
            .unwrap();
        refused(
            &mut s,
            Command::SetRole(id(1), Role::Worker, cert(1), up()),
            ApplyError::DemoteLast(id(1)),
        );
    }

    #[test]
    fn a_join_that_raced_a_rotation_does_not_commit() {
        let mut s = initialized();
        let exporter = [7u8; 32];
        let old = s.cluster().unwrap().worker_secret.clone();
        let proof = crate::trust::join::secret_proof(&old, &exporter);
        let admission = Admission {
            exporter,
            secret_proof: proof,
        };
        // The rotation commits first; the join proved the old secret.
        let new = Secret::from_random(42).as_str().to_owned();
        s.apply(Command::RotateSecret(Role::Worker, new)).unwrap();
        refused(
            &mut s,
            Command::Join(Box::new(node(2, Role::Worker)), admission.clone()),
            ApplyError::InvalidSecret,
        );
        // A manager's secret does not admit a worker record, nor the reverse.
        let manager = s.cluster().unwrap().manager_secret.clone();
        let as_manager = Admission {
            exporter,
            secret_proof: crate::trust::join::secret_proof(&manager, &exporter),
        };
        refused(
            &mut s,
            Command::Join(Box::new(node(2, Role::Worker)), as_manager.clone()),
            ApplyError::InvalidSecret,
        );
        assert_eq!(
            s.apply(Command::Join(Box::new(node(2, Role::Manager)), as_manager)),
            Ok(Applied::Changed)
        );
    }

    #[test]
    fn a_state_from_before_raft_gets_raft_ids() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        s.apply(Command::SetRole(id(2), Role::Manager, cert(2), up()))
            .unwrap();
        // As an agent before Raft wrote it: `leader` and `api_addr` in the cluster, no Raft IDs.
        let mut json: serde_json::Value = serde_json::from_slice(&s.to_record().unwrap()).unwrap();
        let c = &mut json["v1"]["cluster"];
        c["leader"] = serde_json::to_value(id(1)).unwrap();
        c["api_addr"] = "198.18.0.1:2400".into();
        c.as_object_mut().unwrap().remove("next_raft_id");
        for n in c["nodes"].as_object_mut().unwrap().values_mut() {
            n.as_object_mut().unwrap().remove("raft_id");
            n.as_object_mut().unwrap().remove("api_addr");
        }
        let old = State::from_record(&serde_json::to_vec(&json).unwrap()).unwrap();
        let c = old.cluster().unwrap();
        assert_eq!(c.nodes[&id(1)].raft_id, Some(1));
        assert_eq!(
            c.nodes[&id(1)].api_addr,
            Some("198.18.0.1:2400".parse().unwrap())
        );
        assert_eq!(c.nodes[&id(2)].raft_id, Some(2));
        assert_eq!(c.next_raft_id, 3);
        // Written again, the old fields are gone.
        let again = String::from_utf8(old.to_record().unwrap()).unwrap();
        assert!(!again.contains("\"leader\""), "{again}");
    }

    #[test]
    fn promote_and_demote() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        let v = s.version;
        assert_eq!(
            s.apply(Command::SetRole(id(2), Role::Manager, cert(2), up())),
            Ok(Applied::Changed)
        );
        assert_eq!(s.version, v + 1);
        assert_eq!(
            s.apply(Command::SetRole(id(2), Role::Manager, cert(2), up())),
            Ok(Applied::Unchanged)
        );
        assert_eq!(s.version, v + 1);
        assert_eq!(
            s.apply(Command::SetRole(id(2), Role::Worker, cert(2), up())),
            Ok(Applied::Changed)
        );
        assert_eq!(s.cluster().unwrap().nodes[&id(2)].role, Role::Worker);
        refused(
            &mut s,
            Command::SetRole(id(1), Role::Worker, cert(1), up()),
            ApplyError::DemoteLast(id(1)),
        );
        refused(
            &mut s,
            Command::SetRole(id(9), Role::Manager, cert(9), up()),
            ApplyError::NoSuchNode(id(9)),
        );
        // Promoting the leader is a no-op.
        assert_eq!(
            s.apply(Command::SetRole(id(1), Role::Manager, cert(1), up())),
            Ok(Applied::Unchanged)
        );
    }

    #[test]
    fn a_node_in_the_swarm_keeps_its_address_and_keys() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        let mut same_addr = node(3, Role::Worker);
        same_addr.addr = node(2, Role::Worker).addr;
        refused(
            &mut s,
            Command::AddNode(Box::new(same_addr)),
            ApplyError::AddressInUse {
                addr: node(2, Role::Worker).addr,
                owner: id(2),
                hostname: "n2".into(),
            },
        );
        for (x25519, ed25519) in [([2; 32], [0x99; 32]), ([0x98; 32], [52; 32])] {
            let mut same_key = node(4, Role::Worker);
            same_key.public_key = x25519;
            same_key.signing_key = ed25519;
            refused(
                &mut s,
                Command::AddNode(Box::new(same_key)),
                ApplyError::KeyInUse {
                    owner: id(2),
                    hostname: "n2".into(),
                },
            );
        }
        // Once n2 left, its address and keys are free (the same machine joining again).
        s.apply(Command::MarkLeft(id(2))).unwrap();
        let mut again = node(5, Role::Worker);
        again.addr = node(2, Role::Worker).addr;
        again.public_key = [2; 32];
        assert_eq!(
            s.apply(Command::AddNode(Box::new(again))),
            Ok(Applied::Changed)
        );
    }

    #[test]
    fn role_changes_and_renewals_reissue_the_certificate() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        let old = s.cluster().unwrap().nodes[&id(2)].cert_digest;
        s.apply(Command::SetRole(id(2), Role::Manager, cert(7), up()))
            .unwrap();
        let n = &s.cluster().unwrap().nodes[&id(2)];
        assert_eq!(
            (n.cert_digest, n.previous_cert_digest),
            (cert(7).digest, Some(old))
        );
        assert_eq!(n.cert_not_after, cert(7).not_after);
        assert!(
            s.view()
                .unwrap()
                .nodes
                .iter()
                .all(|n| n.cert_der.is_empty()),
            "certificates stay with the manager"
        );
        assert_eq!(
            s.apply(Command::Renew(id(2), cert(7))),
            Ok(Applied::Unchanged)
        );
        s.apply(Command::Renew(id(2), cert(8))).unwrap();
        let n = &s.cluster().unwrap().nodes[&id(2)];
        assert_eq!(
            (n.cert_digest, n.previous_cert_digest),
            (cert(8).digest, Some(cert(7).digest))
        );
        refused(
            &mut s,
            Command::Renew(id(9), cert(9)),
            ApplyError::NoSuchNode(id(9)),
        );
        // Leaving revokes every certificate of the node.
        s.apply(Command::MarkLeft(id(2))).unwrap();
        assert_eq!(
            s.cluster().unwrap().nodes[&id(2)].previous_cert_digest,
            None
        );
    }

    #[test]
    fn mark_left() {
        let mut s = initialized();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        assert_eq!(s.apply(Command::MarkLeft(id(2))), Ok(Applied::Changed));
        assert!(s.cluster().unwrap().nodes[&id(2)].left);
        assert_eq!(s.apply(Command::MarkLeft(id(2))), Ok(Applied::Unchanged));
        refused(
            &mut s,
            Command::MarkLeft(id(5)),
            ApplyError::NoSuchNode(id(5)),
        );
    }

    #[test]
    fn rotate_secret() {
        let mut s = initialized();
        let old = Secret::from_random(11);
        let new = Secret::from_random(99);
        assert_eq!(
            s.apply(Command::RotateSecret(Role::Worker, new.as_str().into())),
            Ok(Applied::Changed)
        );
        assert_eq!(s.role_for_secret(old.as_str()), None);
        assert_eq!(s.role_for_secret(new.as_str()), Some(Role::Worker));
        // The manager secret is untouched.
        assert_eq!(
            s.role_for_secret(Secret::from_random(22).as_str()),
            Some(Role::Manager)
        );
        refused(
            &mut s,
            Command::RotateSecret(Role::Manager, "zz".into()),
            ApplyError::BadSecret(crate::token::TokenError::SecretLength(2).to_string()),
        );
    }

    #[test]
    fn leaving_and_removal_make_a_rotation_due_soon() {
        let mut s = initialized();
        let keys = |s: &State| s.cluster().unwrap().keys.clone();
        assert_eq!(keys(&s).next_rotation(), 1000 + 43_200);
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        s.apply(Command::AddNode(Box::new(node(3, Role::Worker))))
            .unwrap();
        s.apply(Command::RemoveNode(id(3))).unwrap();
        let min = MIN_ROTATION_INTERVAL.as_secs();
        assert_eq!(keys(&s).next_rotation(), 1000 + min);
        s.apply(Command::RotateKeys {
            gossip_key: [2; 32],
            data_path_key: [3; 32],
            at: 2000,
        })
        .unwrap();
        assert_eq!(keys(&s).next_rotation(), 2000 + 43_200, "paid");
        s.apply(Command::MarkLeft(id(2))).unwrap();
        assert_eq!(keys(&s).next_rotation(), 2000 + min);
        s.apply(Command::RotateKeys {
            gossip_key: [4; 32],
            data_path_key: [5; 32],
            at: 3000,
        })
        .unwrap();
        // Removing the node that left owes nothing more: it held nothing new.
        s.apply(Command::RemoveNode(id(2))).unwrap();
        assert_eq!(keys(&s).next_rotation(), 3000 + 43_200);
    }

    #[test]
    fn rotate_keys_keeps_previous() {
        let mut s = initialized();
        s.apply(Command::RotateKeys {
            gossip_key: [2; 32],
            data_path_key: [3; 32],
            at: 5000,
        })
        .unwrap();
        let keys = &s.cluster().unwrap().keys;
        assert_eq!(
            keys.gossip.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(keys.data_path.last().unwrap().key, [3; 32]);
        assert_eq!(keys.rotated_at, 5000);
        s.apply(Command::RotateKeys {
            gossip_key: [4; 32],
            data_path_key: [5; 32],
            at: 6000,
        })
        .unwrap();
        let keys = &s.cluster().unwrap().keys;
        assert_eq!(
            keys.gossip.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(keys.data_path[0].key, [3; 32]);
        assert_eq!(keys.data_path[1].key, [5; 32]);
    }

    #[test]
    fn replay_is_deterministic() {
        let cmds = vec![
            init_cmd(),
            Command::AddNode(Box::new(node(2, Role::Worker))),
            Command::AddNode(Box::new(node(3, Role::Worker))),
            Command::SetRole(id(2), Role::Manager, cert(2), up()),
            Command::RotateSecret(Role::Worker, Secret::from_random(5).as_str().into()),
            Command::RotateKeys {
                gossip_key: [2; 32],
                data_path_key: [3; 32],
                at: 9,
            },
            Command::MarkLeft(id(3)),
            Command::RemoveNode(id(3)),
        ];
        let run = |cmds: &[Command]| {
            let mut s = State::default();
            for c in cmds {
                s.apply(c.clone()).unwrap();
            }
            s
        };
        let a = run(&cmds);
        // Commands survive serialization (a log on disk) and replay to the same state.
        let json = serde_json::to_string(&cmds).unwrap();
        let b = run(&serde_json::from_str::<Vec<Command>>(&json).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.version, 8);
    }

    #[test]
    fn ipam_gives_every_node_an_overlay_address_and_frees_it_on_rm() {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        s.apply(Command::AddNode(Box::new(node(3, Role::Worker))))
            .unwrap();
        let addr = |s: &State, n| s.cluster().unwrap().nodes[&id(n)].overlay_addr;
        let (a1, a2, a3) = (addr(&s, 1), addr(&s, 2), addr(&s, 3));
        assert!(a1.is_some() && a2.is_some() && a3.is_some());
        assert!(a1 != a2 && a2 != a3 && a1 != a3);
        s.apply(Command::RemoveNode(id(2))).unwrap();
        s.apply(Command::AddNode(Box::new(node(4, Role::Worker))))
            .unwrap();
        assert_eq!(addr(&s, 4), a2, "the freed address is given again");
    }

    #[test]
    fn vteps_only_on_plain_networks_and_never_clash() {
        // Encrypted (`shoal init`): refused, and nothing moves.
        let mut encrypted = initialized();
        assert!(encrypted.cluster().unwrap().ingress.encrypted);
        let vtep = Vtep {
            addr: "198.18.0.99".parse().unwrap(),
            mac: "02:42:c6:13:00:63".into(),
            ip: "198.19.0.99".parse().unwrap(),
        };
        refused(
            &mut encrypted,
            Command::AddVtep(vtep.clone()),
            ApplyError::VtepOnEncrypted,
        );
        // Plain (`shoal init --no-encrypt`): every state below is made by commands only.
        let mut s = State::default();
        let Command::Init(mut plain) = init_cmd() else {
            unreachable!("init_cmd makes an Init")
        };
        plain.ingress.encrypted = false;
        s.apply(Command::Init(plain)).unwrap();
        assert!(!s.cluster().unwrap().ingress.encrypted);
        let subnet: ipnet::Ipv4Net = s.cluster().unwrap().ingress.subnet.parse().unwrap();
        let vtep = Vtep {
            ip: Ipv4Addr::from(u32::from(subnet.network()) + 99),
            ..vtep
        };
        s.apply(Command::AddVtep(vtep.clone())).unwrap();
        assert_eq!(
            s.apply(Command::AddVtep(vtep.clone())),
            Ok(Applied::Unchanged)
        );
        let leader_addr = s.cluster().unwrap().nodes[&id(1)].overlay_addr.unwrap();
        let clash = Vtep {
            addr: "198.18.0.98".parse().unwrap(),
            ip: leader_addr,
            ..vtep.clone()
        };
        assert!(matches!(
            s.apply(Command::AddVtep(clash)),
            Err(ApplyError::BadVtep(_))
        ));
        let bad_mac = Vtep {
            mac: "nonsense".into(),
            addr: "198.18.0.97".parse().unwrap(),
            ip: Ipv4Addr::from(u32::from(subnet.network()) + 97),
        };
        assert!(matches!(
            s.apply(Command::AddVtep(bad_mac)),
            Err(ApplyError::BadVtep(_))
        ));
        // A node joining later does not take the VTEP's address.
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        assert_ne!(
            s.cluster().unwrap().nodes[&id(2)].overlay_addr,
            Some(vtep.ip)
        );
        s.apply(Command::RemoveVtep(vtep.ip)).unwrap();
        assert_eq!(
            s.apply(Command::RemoveVtep(vtep.ip)),
            Err(ApplyError::NoSuchVtep(vtep.ip))
        );
    }
}
