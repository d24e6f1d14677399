//! The cluster as every part of the control plane sees it: the view a manager's state machine
//! makes and every node follows (node list, network keys, the ingress network), and the
//! schedule the network keys follow.
//!
//! This is the in-memory model. It travels as `shoal_proto::view::View` (versioned; see
//! [`ClusterView::to_wire`] and [`ClusterView::from_wire`]) and is kept on disk in the
//! store's own record (`store`), so the wire, the disk and this type change independently.
//! Pure: no IO, no clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use shoal_proto::view::{self as wire, View};

use crate::id::NodeId;
pub use shoal_proto::view::{Availability, EndpointMode, LiveKeys, Protocol, PublishMode, Role};

/// One entry of the node list, as the manager issued it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's ID.
    pub id: NodeId,
    /// Host name the node reported at join.
    pub hostname: String,
    /// Advertise (underlay) address: gossip and the data path use it.
    pub addr: IpAddr,
    /// Worker or manager.
    pub role: Role,
    /// Availability.
    pub availability: Availability,
    /// The node's static X25519 public key.
    pub public_key: [u8; 32],
    /// The node's Ed25519 public key (it signs what it says in gossip).
    pub signing_key: [u8; 32],
    /// SHA-256 of the node certificate the manager issued; mTLS calls are checked against it,
    /// so a removed node's certificate stops working at once.
    pub cert_digest: [u8; 32],
    /// The certificate itself, DER (kept so the node can be given it again; not in views).
    pub cert_der: Vec<u8>,
    /// Unix time the certificate expires.
    pub cert_not_after: u64,
    /// The public half of the node's certificate key (uncompressed P-256 point), for
    /// reissuing its certificate on a role change or a renewal.
    pub cert_public_key: Vec<u8>,
    /// The digest of the certificate before the last reissue: accepted for a watch stream
    /// only (which hands the node its new one), never for anything else.
    pub previous_cert_digest: Option<[u8; 32]>,
    /// Agent version the node reported.
    pub engine_version: String,
    /// The node said it left (`shoal leave`).
    pub left: bool,
    /// The node's address on the ingress network, from the manager's IPAM (kept for as long
    /// as the node is in the list).
    pub overlay_addr: Option<Ipv4Addr>,
    /// Unix time the node joined.
    pub joined_at: u64,
    /// A manager's Raft ID (never reused; a manager demoted and promoted again gets a new one).
    #[serde(default)]
    pub raft_id: Option<u64>,
    /// A manager's API address (`advertise addr:2377` unless it listens elsewhere).
    #[serde(default)]
    pub api_addr: Option<SocketAddr>,
}

/// A 32-byte key with an id, for the gossip keyring or a data-path epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Key id (gossip) or epoch number (data path); grows by one at each rotation.
    pub id: u32,
    /// The key.
    pub key: [u8; 32],
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyEntry({}, ..)", self.id)
    }
}

/// Network keys: the current one last, the previous one (still live during a rotation) before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    /// Gossip keys, at most two, oldest first.
    pub gossip: Vec<KeyEntry>,
    /// Data-path key epochs, at most two, oldest first.
    pub data_path: Vec<KeyEntry>,
    /// Unix time of the last rotation (or of init).
    pub rotated_at: u64,
    /// Seconds between rotations.
    pub interval_secs: u64,
    /// A node left or was removed since the last rotation: the next one is due as soon as
    /// [`MIN_ROTATION_INTERVAL`] after the last allows, so what that node held
    /// stops working.
    pub owed: bool,
}

impl Keys {
    /// Unix time when the next rotation is due.
    pub fn next_rotation(&self) -> u64 {
        let interval = if self.owed {
            MIN_ROTATION_INTERVAL.as_secs()
        } else {
            self.interval_secs
        };
        self.rotated_at.saturating_add(interval)
    }
}

/// An overlay network definition (only `ingress` for now).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Overlay subnet, CIDR text.
    pub subnet: String,
    /// Data path encrypted (false: plain RFC 7348).
    pub encrypted: bool,
    /// UDP port of the data path.
    pub data_path_port: u16,
    /// External VTEPs (kernel or hardware) on a plain network.
    pub vteps: Vec<Vtep>,
}

/// A user-defined overlay network (`network create`; the manager allocates it, see
/// `manager::networks`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNetwork {
    /// 25 base-36 characters, as node IDs.
    pub id: String,
    /// Its name, unique in the cluster (and never `ingress`).
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Its subnet.
    pub subnet: Ipv4Net,
    /// Its gateway (the first address unless `--gateway` said otherwise).
    pub gateway: Ipv4Addr,
    /// Sealed per pair of nodes (`--opt encrypted`).
    pub encrypted: bool,
    /// Containers may attach to it by hand (`--attachable`).
    pub attachable: bool,
    /// No route out of the overlay (`--internal`).
    pub internal: bool,
    /// Unix time of `network create`.
    pub created_at: u64,
    /// The address blocks of its subnet each node allocates from on its own (see
    /// `docs/networks.md`): granted by the manager, given back when the node goes.
    #[serde(default)]
    pub blocks: BTreeMap<NodeId, Vec<Ipv4Net>>,
    /// Fixed addresses a node asked for by name (a container that moved, or one that wants
    /// its address): each belongs to that node whatever block it lies in.
    #[serde(default)]
    pub assigned: BTreeMap<Ipv4Addr, NodeId>,
}

impl UserNetwork {
    /// Whether node `node` may hold an endpoint at `ip`: the address is assigned to it, or
    /// lies in one of its blocks and is assigned to no one else.
    pub fn holds(&self, node: &NodeId, ip: Ipv4Addr) -> bool {
        match self.assigned.get(&ip) {
            Some(owner) => owner == node,
            None => self
                .blocks
                .get(node)
                .is_some_and(|bs| bs.iter().any(|b| b.contains(&ip))),
        }
    }
}

/// A published port of a service (`--publish [mode=M,]PUBLISHED:TARGET[/PROTO]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The port on the nodes.
    pub published: u16,
    /// The port on the backends.
    pub target: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Ingress (every node answers) or host (nodes with a local backend).
    pub mode: PublishMode,
}

impl std::fmt::Display for PublishedPort {
    /// As docker's `service ls` shows it (the wire form's [`wire::PortV1`] writes it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        wire::PortV1::from(*self).fmt(f)
    }
}

/// How a backend's own node checks it: a TCP connect to each target port, every
/// `interval_ms`; `retries` failures in a row make it unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// Milliseconds between checks (default 250).
    pub interval_ms: u32,
    /// Failures in a row before the backend leaves (default 2).
    pub retries: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            interval_ms: 250,
            retries: 2,
        }
    }
}

/// A service (`service create`; the manager allocates its VIP, see `manager::services` and
/// `docs/services.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// 25 base-36 characters, as node IDs.
    pub id: String,
    /// Its name, unique in the cluster.
    pub name: String,
    /// The ID of its user network.
    pub network: String,
    /// VIP (the default) or DNS round robin.
    pub endpoint_mode: EndpointMode,
    /// Its virtual IP on the network (`vip` mode only): from the top of the subnet, never in
    /// a node's block, a fixed address, the gateway or another service's VIP.
    pub vip: Option<Ipv4Addr>,
    /// Published ports; no two services publish the same port and protocol.
    pub ports: Vec<PublishedPort>,
    /// Health check.
    #[serde(default)]
    pub health: HealthSpec,
    /// The backends' addresses on the network.
    #[serde(default)]
    pub backends: BTreeSet<Ipv4Addr>,
    /// Unix time of `service create`.
    pub created_at: u64,
}

/// An external VTEP: a kernel vxlan device or a hardware switch on a plain network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vtep {
    /// Its underlay address.
    pub addr: IpAddr,
    /// The MAC of its overlay interface.
    pub mac: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
}

/// What every node keeps of the manager's state: no CA key, no join secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// The state version this view was made from.
    pub version: u64,
    /// The managers' group generation (see [`ClusterView::supersedes`]).
    pub generation: u64,
    /// The cluster CA certificate, DER.
    pub ca_cert_der: Vec<u8>,
    /// The node list.
    pub nodes: Vec<Node>,
    /// Network keys.
    pub keys: Keys,
    /// The ingress network.
    pub ingress: Network,
    /// How long node certificates are valid (nodes renew theirs with a third left).
    pub cert_expiry_secs: u64,
    /// User-defined networks.
    pub networks: Vec<UserNetwork>,
    /// Services, by name.
    pub services: Vec<Service>,
}

impl ClusterView {
    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The user network with this ID.
    pub fn network_by_id(&self, id: &str) -> Option<&UserNetwork> {
        self.networks.iter().find(|n| n.id == id)
    }

    /// The node with this ID.
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.iter().find(|n| &n.id == id)
    }

    /// The `ingress` network's ID: derived from the cluster CA, so every node shows the same.
    pub fn ingress_id(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::new()
            .chain_update(&self.ca_cert_der)
            .chain_update(b"shoal ingress network")
            .finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        NodeId::from_random(u128::from_be_bytes(first)).to_string()
    }

    /// Whether this view replaces `held`: a later generation of the managers' group (`init
    /// --force-new-cluster` starts one), or the same generation at a higher version.
    pub fn supersedes(&self, held: &ClusterView) -> bool {
        (self.generation, self.version) > (held.generation, held.version)
    }

    /// A view of no cluster (a manager before it has any state or view).
    pub fn empty() -> Self {
        ClusterView {
            version: 0,
            generation: 0,
            ca_cert_der: Vec::new(),
            nodes: Vec::new(),
            keys: Keys {
                gossip: Vec::new(),
                data_path: Vec::new(),
                rotated_at: 0,
                interval_secs: 0,
                owed: false,
            },
            networks: Vec::new(),
            services: Vec::new(),
            ingress: Network {
                name: String::new(),
                vni: 0,
                subnet: String::new(),
                encrypted: false,
                data_path_port: 0,
                vteps: Vec::new(),
            },
            cert_expiry_secs: 0,
        }
    }

    /// The managers with an API address, lowest Raft ID first.
    pub fn managers(&self) -> Vec<(&NodeId, SocketAddr)> {
        let mut managers: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.active() && n.role == Role::Manager && n.api_addr.is_some())
            .collect();
        managers.sort_by_key(|n| n.raft_id.unwrap_or(u64::MAX));
        managers
            .into_iter()
            .filter_map(|n| Some((&n.id, n.api_addr?)))
            .collect()
    }
}

/// How long a new gossip key only opens before it also seals: long enough for the view that
/// carries it to reach every node, so no node receives a key it does not hold yet.
pub const KEY_GRACE: Duration = Duration::from_secs(10);

/// How long after this node first saw a new key it stops opening the one before: three times
/// the grace, so every node has sealed with the new key for twice the grace by then.
pub const KEY_RETIRE: Duration = Duration::from_secs(3 * KEY_GRACE.as_secs());

/// The shortest time between two key rotations (`init --key-rotation-interval`, and rotations
/// for a removal or a leave, which wait for it): a new key must have reached every node and
/// started sealing everywhere ([`KEY_GRACE`] after each node first saw it) before the one after
/// it pushes the oldest out of the ring. Twice the grace leaves as long again for the view to
/// travel.
pub const MIN_ROTATION_INTERVAL: Duration = Duration::from_secs(2 * KEY_GRACE.as_secs());

/// Which key of a ring (at most two, oldest first) seals at `now`, which other one only
/// opens, and when that changes by itself: the newest seals once this node has known it for
/// [`KEY_GRACE`] (`seen` keeps when each id was first seen, between calls); until then the one
/// before it keeps sealing. The one before stops opening once this node has known the newest
/// for [`KEY_RETIRE`]. The same rule serves the gossip keys and the data-path epochs. Pure:
/// time is an input. `None` for an empty ring.
pub fn sealing_order<'a>(
    ring: &'a [KeyEntry],
    seen: &mut HashMap<u32, Instant>,
    now: Instant,
) -> Option<(&'a KeyEntry, Option<&'a KeyEntry>, Option<Instant>)> {
    for entry in ring {
        seen.entry(entry.id).or_insert(now);
    }
    seen.retain(|id, _| ring.iter().any(|k| k.id == *id));
    let mut keys = ring.iter().rev();
    let newest = keys.next()?;
    let Some(previous) = keys.next() else {
        return Some((newest, None, None));
    };
    let first_seen = seen.get(&newest.id).copied().unwrap_or(now);
    let (ready_at, retire_at) = (first_seen + KEY_GRACE, first_seen + KEY_RETIRE);
    Some(if now < ready_at {
        (previous, Some(newest), Some(ready_at))
    } else if now < retire_at {
        (newest, Some(previous), Some(retire_at))
    } else {
        (newest, None, None)
    })
}

impl ClusterView {
    /// The view as it travels (the newest wire format). Certificates and their keys are not
    /// in views.
    pub fn to_wire(&self) -> View {
        let key = |k: &KeyEntry| wire::KeyV1 {
            id: k.id,
            key: k.key,
        };
        let (leader, api_addr) = self
            .managers()
            .first()
            .map(|(id, addr)| ((*id).clone(), *addr))
            .unwrap_or_else(|| (NodeId::from_random(0), SocketAddr::from(([0, 0, 0, 0], 0))));
        View::V1(wire::ViewV1 {
            version: self.version,
            generation: self.generation,
            leader,
            api_addr,
            ca_cert_der: self.ca_cert_der.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| wire::NodeV1 {
                    id: n.id.clone(),
                    hostname: n.hostname.clone(),
                    addr: n.addr,
                    role: n.role,
                    availability: n.availability,
                    public_key: n.public_key,
                    signing_key: n.signing_key,
                    cert_digest: n.cert_digest,
                    cert_not_after: n.cert_not_after,
                    previous_cert_digest: n.previous_cert_digest,
                    engine_version: n.engine_version.clone(),
                    left: n.left,
                    overlay_addr: n.overlay_addr,
                    joined_at: n.joined_at,
                    raft_id: n.raft_id,
                    api_addr: n.api_addr,
                })
                .collect(),
            keys: wire::KeysV1 {
                gossip: self.keys.gossip.iter().map(key).collect(),
                data_path: self.keys.data_path.iter().map(key).collect(),
                rotated_at: self.keys.rotated_at,
                interval_secs: self.keys.interval_secs,
                owed: self.keys.owed,
            },
            ingress: wire::NetworkV1 {
                name: self.ingress.name.clone(),
                vni: self.ingress.vni,
                subnet: self.ingress.subnet.clone(),
                encrypted: self.ingress.encrypted,
                data_path_port: self.ingress.data_path_port,
                vteps: self
                    .ingress
                    .vteps
                    .iter()
                    .map(|v| wire::VtepV1 {
                        addr: v.addr,
                        mac: v.mac.clone(),
                        ip: v.ip,
                    })
                    .collect(),
            },
            cert_expiry_secs: self.cert_expiry_secs,
            networks: self
                .networks
                .iter()
                .map(|n| wire::UserNetworkV1 {
                    id: n.id.clone(),
                    name: n.name.clone(),
                    vni: n.vni,
                    subnet: n.subnet.to_string(),
                    gateway: n.gateway,
                    encrypted: n.encrypted,
                    attachable: n.attachable,
                    internal: n.internal,
                    created_at: n.created_at,
                    blocks: n
                        .blocks
                        .iter()
                        .flat_map(|(node, blocks)| {
                            blocks.iter().map(|b| wire::BlockV1 {
                                node: node.clone(),
                                block: b.to_string(),
                            })
                        })
                        .collect(),
                    assigned: n
                        .assigned
                        .iter()
                        .map(|(ip, node)| wire::AssignedV1 {
                            ip: *ip,
                            node: node.clone(),
                        })
                        .collect(),
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|s| wire::ServiceV1 {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    network: s.network.clone(),
                    endpoint_mode: s.endpoint_mode,
                    vip: s.vip,
                    ports: s.ports.iter().map(|&p| p.into()).collect(),
                    health: wire::HealthV1 {
                        interval_ms: s.health.interval_ms,
                        retries: s.health.retries,
                    },
                    backends: s.backends.iter().copied().collect(),
                    created_at: s.created_at,
                })
                .collect(),
        })
    }

    /// The view a manager sent, in any format this build reads.
    pub fn from_wire(view: View) -> Self {
        let key = |k: wire::KeyV1| KeyEntry {
            id: k.id,
            key: k.key,
        };
        match view {
            View::V1(v) => ClusterView {
                version: v.version,
                generation: v.generation,
                ca_cert_der: v.ca_cert_der,
                nodes: v
                    .nodes
                    .into_iter()
                    .map(|n| Node {
                        // A view from before Raft names its one manager only in `leader`.
                        api_addr: n.api_addr.or((n.id == v.leader).then_some(v.api_addr)),
                        id: n.id,
                        hostname: n.hostname,
                        addr: n.addr,
                        role: n.role,
                        availability: n.availability,
                        public_key: n.public_key,
                        signing_key: n.signing_key,
                        cert_digest: n.cert_digest,
                        cert_der: Vec::new(),
                        cert_not_after: n.cert_not_after,
                        cert_public_key: Vec::new(),
                        previous_cert_digest: n.previous_cert_digest,
                        engine_version: n.engine_version,
                        left: n.left,
                        overlay_addr: n.overlay_addr,
                        joined_at: n.joined_at,
                        raft_id: n.raft_id,
                    })
                    .collect(),
                keys: Keys {
                    gossip: v.keys.gossip.into_iter().map(key).collect(),
                    data_path: v.keys.data_path.into_iter().map(key).collect(),
                    rotated_at: v.keys.rotated_at,
                    interval_secs: v.keys.interval_secs,
                    owed: v.keys.owed,
                },
                ingress: Network {
                    name: v.ingress.name,
                    vni: v.ingress.vni,
                    subnet: v.ingress.subnet,
                    encrypted: v.ingress.encrypted,
                    data_path_port: v.ingress.data_path_port,
                    vteps: v
                        .ingress
                        .vteps
                        .into_iter()
                        .map(|t| Vtep {
                            addr: t.addr,
                            mac: t.mac,
                            ip: t.ip,
                        })
                        .collect(),
                },
                cert_expiry_secs: v.cert_expiry_secs,
                // A subnet that does not parse cannot come from a manager of this version;
                // such a network is left out rather than guessed at.
                networks: v
                    .networks
                    .into_iter()
                    .filter_map(|n| {
                        Some(UserNetwork {
                            subnet: n.subnet.parse().ok()?,
                            id: n.id,
                            name: n.name,
                            vni: n.vni,
                            gateway: n.gateway,
                            encrypted: n.encrypted,
                            attachable: n.attachable,
                            internal: n.internal,
                            created_at: n.created_at,
                            blocks: n.blocks.into_iter().fold(
                                BTreeMap::new(),
                                |mut all: BTreeMap<NodeId, Vec<Ipv4Net>>, b| {
                                    if let Ok(block) = b.block.parse() {
                                        all.entry(b.node).or_default().push(block);
                                    }
                                    all
                                },
                            ),
                            assigned: n.assigned.into_iter().map(|a| (a.ip, a.node)).collect(),
                        })
                    })
                    .collect(),
                services: v
                    .services
                    .into_iter()
                    .map(|s| Service {
                        id: s.id,
                        name: s.name,
                        network: s.network,
                        endpoint_mode: s.endpoint_mode,
                        vip: s.vip,
                        ports: s.ports.into_iter().map(Into::into).collect(),
                        health: HealthSpec {
                            interval_ms: s.health.interval_ms,
                            retries: s.health.retries,
                        },
                        backends: s.backends.into_iter().collect(),
                        created_at: s.created_at,
                    })
                    .collect(),
            },
        }
    }
}

impl From<PublishedPort> for wire::PortV1 {
    fn from(p: PublishedPort) -> Self {
        wire::PortV1 {
            published: p.published,
            target: p.target,
            protocol: p.protocol,
            mode: p.mode,
        }
    }
}

impl From<wire::PortV1> for PublishedPort {
    fn from(p: wire::PortV1) -> Self {
        PublishedPort {
            published: p.published,
            target: p.target,
            protocol: p.protocol,
            mode: p.mode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::state::tests::{init_cmd, node};
    use crate::manager::state::{Command, State};

    #[test]
    fn the_view_survives_the_wire() {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        let mut left = node(3, Role::Worker);
        left.left = true;
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        s.apply(Command::AddNode(Box::new(left))).unwrap();
        let view = s.view().unwrap();
        assert_eq!(ClusterView::from_wire(view.to_wire()), view);
        // Certificates and their keys stay with the manager: not on the wire.
        let json = serde_json::to_value(view.to_wire()).unwrap();
        let first = &json["v1"]["nodes"][0];
        assert!(first.get("cert_digest").is_some(), "{first}");
        assert!(first.get("cert_der").is_none(), "{first}");
        assert!(first.get("cert_public_key").is_none(), "{first}");
    }
}
