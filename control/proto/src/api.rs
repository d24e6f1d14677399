//! Messages and framing, for both the local socket (CLI to agent) and the manager API on
//! 2377 (agent to manager, over TLS). See `docs/api.md`.
//!
//! Framing: a 4-byte big-endian length, then that many bytes of JSON. Frames over
//! [`MAX_FRAME`] are refused before anything is read into memory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::id::NodeId;
use crate::view::{Availability, EndpointMode, HealthV1, LiveKeys, PortV1, Protocol, Role, View};

/// Largest frame accepted, in bytes.
pub const MAX_FRAME: u32 = 4 << 20;

/// The manager API's port (docker swarm's 2377).
pub const DEFAULT_API_PORT: u16 = 2377;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed mid-frame.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("refused a {0}-byte message (the limit is {MAX_FRAME}); the peer is not a shoal agent of this version")]
    TooLarge(u32),
    /// The frame is not a message we know.
    #[error("malformed message: {0}; the peer is not a shoal agent of this version")]
    Decode(#[from] serde_json::Error),
}

/// Writes one frame.
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    write_raw_frame(w, &serde_json::to_vec(value)?).await
}

/// Writes one frame of bytes that are not JSON (the packet stream of `shoal capture`).
pub async fn write_raw_frame<W>(w: &mut W, body: &[u8]) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
{
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(u32::MAX))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of raw bytes; `None` if the peer closed the connection cleanly before a
/// frame began.
pub async fn read_raw_frame<R>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin,
{
    read_raw_limited(r, MAX_FRAME).await
}

/// [`read_frame`] with a lower size limit (`max`, at most [`MAX_FRAME`]).
pub async fn read_frame_limited<R, T>(r: &mut R, max: u32) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_raw_limited(r, max.min(MAX_FRAME)).await? {
        None => Ok(None),
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
    }
}

async fn read_raw_limited<R>(r: &mut R, max: u32) -> Result<Option<Vec<u8>>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Reads one frame; `None` if the peer closed the connection cleanly before a frame began.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_raw_frame(r).await? {
        None => Ok(None),
        Some(body) => Ok(Some(serde_json::from_slice(&body)?)),
    }
}

/// A request from the CLI to the local agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// This node's identity and swarm membership.
    Info,
    /// `shoal init`.
    Init(InitRequest),
    /// `shoal init --force-new-cluster`: this manager alone forms a new group of managers
    /// from its state (after the others were lost).
    ForceNewCluster,
    /// `shoal join`.
    Join(JoinRequest),
    /// `shoal leave`.
    Leave {
        /// `--force`.
        force: bool,
    },
    /// A command that needs a manager.
    Admin(AdminRequest),
    /// `shoal network ls`: from this node's view.
    NetworkLs,
    /// `shoal network inspect NETWORK`: from this node's view, with its data path.
    NetworkInspect {
        /// The network's name.
        network: String,
    },
    /// `shoal capture`: after [`Reply::Capturing`], the agent sends raw frames (see
    /// [`CaptureFrame`]) until the client closes the connection.
    Capture(CaptureRequest),
    /// A call of the `shoal-cni` plugin, passed on as the runtime made it; answered by
    /// [`Reply::Cni`].
    Cni(CniRequest),
}

/// The CNI operations the agent carries out (VERSION is answered by the plugin alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// Attach a container.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Check an attachment is as ADD left it.
    Check,
    /// Drop every attachment of the network not in the valid list.
    Gc,
    /// Whether the plugin is ready for ADDs.
    Status,
}

/// One `shoal-cni` call: the runtime's `CNI_*` variables and the network configuration it
/// gave on standard input (CNI spec 1.1.0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    /// `CNI_COMMAND`.
    pub command: CniCommand,
    /// `CNI_CONTAINERID` (absent for GC and STATUS).
    #[serde(default)]
    pub container_id: Option<String>,
    /// `CNI_NETNS`: the container's network namespace, a path (absent for DEL at times, GC
    /// and STATUS).
    #[serde(default)]
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: Option<String>,
    /// `CNI_ARGS`, as given (`K=V;K=V`).
    #[serde(default)]
    pub args: Option<String>,
    /// The network configuration, whole (`cniVersion`, `name`, `type`, `network`,
    /// `runtimeConfig`, `prevResult`, `cni.dev/valid-attachments`, ...).
    pub config: serde_json::Value,
}

/// A CNI error, as the spec prints it (`code`, `msg`, `details`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    /// The spec's code: 1 incompatible version, 2 unsupported field, 3 container unknown,
    /// 4 invalid environment variables, 5 I/O failure, 6 decoding failure, 7 invalid network
    /// configuration, 11 try again later, 50 plugin not available, 51 limited connectivity;
    /// 100 and up are shoal's own.
    pub code: u32,
    /// What went wrong, one line.
    pub msg: String,
    /// More, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`, no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

/// The agent's answer to a [`CniRequest`]: the JSON the plugin prints (a CNI result for ADD
/// and CHECK, nothing for the others), or the error it prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CniAnswer {
    /// Success, with the result to print, if the command prints one.
    Done(Option<serde_json::Value>),
    /// Failure.
    Failed(CniError),
}

/// `shoal capture` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRequest {
    /// The network's name.
    pub network: String,
    /// Only packets to or from this node (host name or node ID, or a unique ID prefix).
    pub peer: Option<String>,
    /// Decrypted inner frames.
    pub inner: bool,
    /// Outer datagrams as on the wire.
    pub outer: bool,
}

/// One raw frame of a capture stream: the reader's running count of copies the agent had to
/// drop (8 bytes, big-endian), then pcapng bytes. The first frame holds the section header
/// and the interface blocks, each later frame one packet block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFrame {
    /// Copies lost so far because the reader was too slow.
    pub lost: u64,
    /// pcapng blocks.
    pub pcapng: Vec<u8>,
}

impl CaptureFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.pcapng.len());
        out.extend_from_slice(&self.lost.to_be_bytes());
        out.extend_from_slice(&self.pcapng);
        out
    }

    /// Parses a frame; `None` if it is shorter than its count.
    pub fn decode(mut frame: Vec<u8>) -> Option<CaptureFrame> {
        let lost = u64::from_be_bytes(frame.get(..8)?.try_into().ok()?);
        frame.drain(..8);
        Some(CaptureFrame {
            lost,
            pcapng: frame,
        })
    }
}

/// `shoal init` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// Address other nodes reach this one at.
    pub advertise_addr: IpAddr,
    /// Address the manager API listens on.
    pub listen_addr: SocketAddr,
    /// Data-path UDP port.
    pub data_path_port: u16,
    /// Ingress overlay subnet, CIDR.
    pub ingress_subnet: String,
    /// Encrypt the data path.
    pub encrypt: bool,
    /// Seconds between network key rotations.
    pub key_rotation_secs: u64,
    /// Seconds node certificates are valid.
    #[serde(default = "default_cert_expiry")]
    pub cert_expiry_secs: u64,
    /// Where user networks' subnets come from, CIDRs (`--default-addr-pool`; empty: 10.0.0.0/8).
    #[serde(default)]
    pub default_addr_pools: Vec<String>,
    /// Prefix length of those subnets (`--default-addr-pool-mask-length`; absent: 24).
    #[serde(default)]
    pub default_addr_pool_mask: Option<u8>,
}

fn default_cert_expiry() -> u64 {
    crate::view::DEFAULT_CERT_EXPIRY_SECS
}

/// `shoal join` parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
    /// Manager address, `HOST[:PORT]` (port 2377 if absent).
    pub manager: String,
    /// Our advertise address; if absent, the local address of the connection to the manager.
    pub advertise_addr: Option<IpAddr>,
}

/// Commands that need a manager. On a promoted (non-leader) manager the agent forwards them
/// to the leader over mTLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    /// `shoal join-token [--rotate] ROLE`.
    JoinToken {
        /// Which token.
        role: Role,
        /// Replace the secret first.
        rotate: bool,
    },
    /// `shoal node ls`.
    NodeLs,
    /// `shoal node inspect NODE`.
    NodeInspect {
        /// ID, ID prefix or hostname.
        node: String,
    },
    /// `shoal node rm [--force] NODE...`.
    NodeRm {
        /// IDs, ID prefixes or hostnames.
        nodes: Vec<String>,
        /// Remove even if up.
        force: bool,
    },
    /// `shoal node promote NODE...`.
    Promote {
        /// IDs, ID prefixes or hostnames.
        nodes: Vec<String>,
    },
    /// `shoal node demote NODE...`.
    Demote {
        /// IDs, ID prefixes or hostnames.
        nodes: Vec<String>,
    },
    /// `shoal network vtep add NETWORK --addr --mac --ip`.
    VtepAdd(VtepArgs),
    /// `shoal network vtep rm NETWORK --addr --mac --ip`.
    VtepRm(VtepArgs),
    /// `shoal network create`.
    NetworkCreate(NetworkCreateArgs),
    /// `shoal network rm NETWORK...`.
    NetworkRm {
        /// Names or IDs (or unique ID prefixes).
        networks: Vec<String>,
    },
    /// `shoal service create`; answered with the new service's ID.
    ServiceCreate(ServiceCreateArgs),
    /// `shoal service ls`.
    ServiceLs,
    /// `shoal service inspect SERVICE`.
    ServiceInspect {
        /// Name, ID or unique ID prefix.
        service: String,
    },
    /// `shoal service rm SERVICE...`.
    ServiceRm {
        /// Names, IDs or unique ID prefixes.
        services: Vec<String>,
    },
    /// `shoal service update SERVICE --publish-add ... --publish-rm ...`.
    ServiceUpdate {
        /// Name, ID or unique ID prefix.
        service: String,
        /// Ports to publish.
        publish_add: Vec<PortV1>,
        /// Ports to stop publishing (removed before any is added).
        publish_rm: Vec<PublishRm>,
    },
    /// `shoal service backend add|rm SERVICE ENDPOINT`.
    ServiceBackend {
        /// Name, ID or unique ID prefix.
        service: String,
        /// The backend's IP on the service's network (the CLI's agent turns a local
        /// container ID into it before the request reaches a manager).
        endpoint: String,
        /// Add (`true`) or remove.
        present: bool,
    },
}

/// `shoal service create` flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCreateArgs {
    /// Name.
    pub name: String,
    /// Its user network: name, ID or unique ID prefix.
    pub network: String,
    /// `--endpoint-mode` (vip when absent).
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// `--publish`.
    #[serde(default)]
    pub ports: Vec<PortV1>,
    /// `--health-interval`, `--health-retries` (250 ms and 2 when absent).
    #[serde(default)]
    pub health: Option<HealthV1>,
}

/// A port to stop publishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRm {
    /// The published port.
    pub published: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// A service as `service ls` and `service inspect` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// ID, 25 base-36 characters.
    pub id: String,
    /// Name.
    pub name: String,
    /// Its network's name.
    pub network: String,
    /// Its network's ID.
    pub network_id: String,
    /// `vip` or `dnsrr`.
    pub endpoint_mode: EndpointMode,
    /// Its virtual IP (`vip` mode).
    pub vip: Option<Ipv4Addr>,
    /// Published ports.
    pub ports: Vec<PortV1>,
    /// The backends' addresses.
    pub backends: Vec<Ipv4Addr>,
    /// The health check.
    pub health: HealthV1,
    /// Unix time of its creation.
    pub created_at: u64,
}

/// `shoal network create` flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkCreateArgs {
    /// Name.
    pub name: String,
    /// `--subnet` CIDR (else one from the default pools).
    pub subnet: Option<String>,
    /// `--gateway`.
    pub gateway: Option<Ipv4Addr>,
    /// `--opt encrypted`.
    pub encrypted: bool,
    /// `--attachable`.
    pub attachable: bool,
    /// `--internal`.
    pub internal: bool,
}

/// An external VTEP as the CLI names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepArgs {
    /// The network.
    pub network: String,
    /// Its underlay address.
    pub addr: IpAddr,
    /// Its overlay MAC.
    pub mac: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
}

/// A network as `network ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSummary {
    /// ID, 25 base-36 characters.
    #[serde(default)]
    pub id: String,
    /// Name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Subnet, CIDR.
    pub subnet: String,
    /// Sealed or plain.
    pub encrypted: bool,
}

/// A network as `network inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    /// ID, 25 base-36 characters.
    #[serde(default)]
    pub id: String,
    /// Name.
    pub name: String,
    /// Driver (always `overlay`).
    pub driver: String,
    /// Scope (always `swarm`).
    pub scope: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Subnet, CIDR.
    pub subnet: String,
    /// Sealed (ChaCha20-Poly1305 per pair of nodes) or plain RFC 7348.
    pub encrypted: bool,
    /// UDP port of the data path.
    pub data_path_port: u16,
    /// The nodes on it.
    pub members: Vec<NetworkMember>,
    /// External VTEPs (plain networks).
    pub vteps: Vec<Vtep>,
    /// This node's data path, if it runs.
    pub local: Option<LocalDataPath>,
    /// Gateway (user networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Containers may attach by hand (user networks).
    #[serde(default)]
    pub attachable: bool,
    /// No route out of the overlay (user networks).
    #[serde(default)]
    pub internal: bool,
    /// The containers attached (user networks): this node's, and those other nodes announce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// This node's data path on a user network: its device (while it has containers on it)
    /// and its forwarding table (each remote endpoint's MAC and the node it is behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<UserDataPath>,
}

/// A user network in this node's data path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDataPath {
    /// The TAP device on the network's bridge, while this node has containers on it.
    pub device: Option<String>,
    /// The forwarding entries the control plane set: MAC and VTEP.
    pub forwarding: Vec<Forwarding>,
}

/// One forwarding entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    /// The endpoint's MAC.
    pub mac: String,
    /// The underlay address of the node it is behind.
    pub vtep: IpAddr,
}

/// A container attached to a user network, as `network inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The node it runs on.
    pub node_id: NodeId,
    /// That node's host name.
    pub hostname: String,
    /// The container's ID (known for this node's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its MAC.
    pub mac: String,
    /// Its address, CIDR.
    pub ip: String,
}

/// An external VTEP (a kernel vxlan device or a hardware switch) on a plain network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vtep {
    /// Its underlay address.
    pub addr: IpAddr,
    /// The MAC of its overlay interface.
    pub mac: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
}

/// A node on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMember {
    /// Node ID.
    pub node_id: NodeId,
    /// Host name.
    pub hostname: String,
    /// Overlay address.
    pub address: Option<Ipv4Addr>,
    /// Underlay address of its VTEP.
    pub vtep: IpAddr,
}

/// This node's data path on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDataPath {
    /// Interface name.
    pub interface: String,
    /// Overlay address.
    pub address: Ipv4Addr,
    /// Interface MAC.
    pub mac: String,
    /// Interface MTU.
    pub mtu: u16,
    /// Key epoch this node seals under (encrypted networks).
    pub send_epoch: Option<u32>,
    /// Members with entries in the engine.
    pub members: usize,
    /// Counters, engine-wide.
    pub counters: Counters,
    /// Counters per peer VTEP.
    pub peers: Vec<PeerCounters>,
}

/// Traffic and drops, engine-wide or for one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Frame bytes sent.
    pub tx_bytes: u64,
    /// Frames delivered.
    pub rx_packets: u64,
    /// Frame bytes delivered.
    pub rx_bytes: u64,
    /// Drops by reason (only reasons that happened).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// One peer as this node's data path sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Its underlay address.
    pub vtep: IpAddr,
    /// Its host name (a node), or `vtep OVERLAY-IP` (an external VTEP).
    #[serde(default)]
    pub name: Option<String>,
    /// Its counters: traffic both ways, drops attributed to it.
    pub counters: Counters,
    /// Key epochs this node holds sessions with it under (encrypted networks).
    #[serde(default)]
    pub epochs: Vec<u32>,
    /// The key epoch of the last sealed datagram received from it.
    #[serde(default)]
    pub last_rx_epoch: Option<u32>,
    /// Milliseconds since the last frame from it was delivered; `None` if none yet.
    #[serde(default)]
    pub last_rx_ms_ago: Option<u64>,
}

/// The agent's answer: a reply, or one line saying what went wrong and what to do.
pub type Response = Result<Reply, String>;

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Request::Info`].
    Info(Info),
    /// The swarm is initialized.
    Initialized {
        /// Our node ID.
        node_id: NodeId,
        /// The worker join token.
        worker_token: String,
        /// The address joiners use.
        join_addr: SocketAddr,
    },
    /// This node joined.
    Joined {
        /// As what.
        role: Role,
    },
    /// This node left.
    Left,
    /// A join token.
    JoinToken {
        /// For which role.
        role: Role,
        /// The token.
        token: String,
        /// The address joiners use.
        join_addr: SocketAddr,
        /// The secret was just replaced.
        rotated: bool,
    },
    /// The node list.
    Nodes {
        /// The asking node (starred in `node ls`).
        self_id: Option<NodeId>,
        /// The nodes, sorted by hostname then ID.
        nodes: Vec<NodeStatus>,
    },
    /// One node.
    Node(Box<NodeStatus>),
    /// One line per node acted on (rm, promote, demote).
    Lines(Vec<String>),
    /// The networks.
    Networks(Vec<NetworkSummary>),
    /// One network.
    Network(Box<NetworkDetail>),
    /// The services, by name.
    Services(Vec<ServiceDetail>),
    /// One service.
    Service(Box<ServiceDetail>),
    /// A capture started; raw [`CaptureFrame`]s follow.
    Capturing,
    /// Answer to [`Request::Cni`].
    Cni(CniAnswer),
}

/// Gossip-level health, as `node ls` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Up.
    Ready,
    /// Not heard from, or left.
    Down,
}

/// A manager's standing, as `node ls` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerStatus {
    /// The leader.
    Leader,
    /// A manager that is up.
    Reachable,
    /// A manager that is down.
    Unreachable,
}

/// One node as `node ls` and `node inspect` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node ID.
    pub id: NodeId,
    /// Host name.
    pub hostname: String,
    /// Advertise address.
    pub addr: IpAddr,
    /// Role.
    pub role: Role,
    /// Ready or Down.
    pub status: Status,
    /// Availability.
    pub availability: Availability,
    /// Manager status; `None` for workers.
    pub manager_status: Option<ManagerStatus>,
    /// Agent version.
    pub engine_version: String,
    /// X25519 public key, hex.
    pub public_key: String,
    /// Unix time of join.
    pub joined_at: u64,
    /// Address on the ingress network.
    #[serde(default)]
    pub overlay_addr: Option<Ipv4Addr>,
    /// This node as the data path of the node answering `node inspect` sees it (absent for
    /// the answering node itself, and where its data path does not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_path: Option<PeerCounters>,
}

/// What a node knows of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Host name.
    pub hostname: String,
    /// X25519 public key, hex.
    pub public_key: String,
    /// Node ID, if in a swarm.
    pub node_id: Option<NodeId>,
    /// Role, if in a swarm.
    pub role: Option<Role>,
    /// The leader's API address, if in a swarm.
    pub manager_addr: Option<SocketAddr>,
    /// Version of the cluster view we hold.
    pub view_version: Option<u64>,
    /// Ids of the live gossip keys, oldest first (empty outside a swarm).
    pub gossip_key_ids: Vec<u32>,
    /// Live data-path key epochs, oldest first (empty outside a swarm).
    pub data_path_epochs: Vec<u32>,
    /// When this node's certificate expires (Unix seconds), in a swarm.
    #[serde(default)]
    pub cert_not_after: Option<u64>,
    /// The gossip keys this node seals with and still opens now (`None`: gossip not running).
    #[serde(default)]
    pub gossip_keys_live: Option<LiveKeys>,
    /// The data-path epochs this node seals under and still opens now (`None`: no data path,
    /// or a plain network).
    #[serde(default)]
    pub data_path_epochs_live: Option<LiveKeys>,
    /// The gossip driver's counters (`shoal_gossip::Stats`), if gossip runs.
    #[serde(default)]
    pub gossip: Option<serde_json::Value>,
    /// On a manager: SHA-256 of its state as stored, hex. Managers that have applied the same
    /// commands show the same digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_digest: Option<String>,
}

/// A request to the manager API on 2377.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagerRequest {
    /// The first step of a join (no client certificate yet): the manager answers
    /// [`ManagerReply::JoinChallenge`], and the node sends [`ManagerRequest::Join`] on the same
    /// connection. See [`crate::claim`].
    JoinHello,
    /// The second step of a join: who the node is, and its proofs.
    Join(Box<crate::claim::Claim>),
    /// mTLS: stream cluster views, starting with the current one (and this node's certificate
    /// when the manager reissued it).
    Watch,
    /// mTLS: a new certificate for this node, same key and role (a renewal).
    Renew,
    /// mTLS: keep-alive on a watch stream.
    Ping,
    /// mTLS: we are leaving the swarm.
    Leave,
    /// mTLS, managers only: a forwarded admin command.
    Admin(AdminRequest),
    /// mTLS, managers only: the connection carries the managers' Raft from here on (raw
    /// frames: a kind byte and a body; see `shoal_control::manager::raft`).
    Raft,
    /// mTLS: one more address block of a user network for this node, which allocates its
    /// endpoints' addresses from its blocks on its own (`docs/networks.md`).
    AddressBlock {
        /// The network's name.
        network: String,
    },
    /// mTLS: the fixed address `ip` of a user network for this node (a container that moved
    /// here keeps its address); answered [`ManagerReply::Ok`].
    AssignAddress {
        /// The network's name.
        network: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// mTLS: this node's endpoint at `ip` is a backend of `service` from now on
    /// (`present`), or no longer; only for an address the view gives this node. Answered
    /// [`ManagerReply::Ok`].
    SetBackend {
        /// The service's name.
        service: String,
        /// The endpoint's address on the service's network.
        ip: Ipv4Addr,
        /// A backend, or no longer.
        present: bool,
    },
}

/// What a joining node gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    /// The new node's ID.
    pub node_id: NodeId,
    /// Its certificate, DER, signed by the cluster CA, for the key it sent.
    pub cert_der: Vec<u8>,
    /// When that certificate expires (Unix seconds).
    #[serde(default)]
    pub cert_not_after: u64,
    /// The cluster view: node list (gossip seeds), keys, networks, CA.
    pub view: View,
}

/// A certificate the manager issued to the asking node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// DER.
    pub cert_der: Vec<u8>,
    /// When it expires (Unix seconds).
    pub not_after: u64,
}

/// The manager's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagerReply {
    /// Answer to [`ManagerRequest::JoinHello`]: the manager node's X25519 public key, for the
    /// joining node's key proof.
    JoinChallenge {
        /// The manager's X25519 public key.
        public_key: [u8; 32],
    },
    /// Answer to a join.
    Joined(Box<JoinGrant>),
    /// This node's certificate, reissued (a role change, a renewal): use it from now on.
    Certificate(IssuedCert),
    /// A watch stream event: the current view.
    View(Box<View>),
    /// A watch stream event: this node is not in the swarm any more.
    Removed,
    /// Done.
    Ok,
    /// Answer to a forwarded admin command.
    Admin(Box<Reply>),
    /// Answer to [`ManagerRequest::AddressBlock`]: all of this node's blocks of the network,
    /// CIDR, the new one last.
    Blocks(Vec<String>),
}

/// The manager's answer or one line of error.
pub type ManagerResponse = Result<ManagerReply, String>;

/// Lowercase hex of a key.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frame_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let req = Request::Admin(AdminRequest::NodeRm {
            nodes: vec!["n3".into()],
            force: true,
        });
        write_frame(&mut a, &req).await.unwrap();
        drop(a);
        let got: Option<Request> = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Some(req));
        let eof: Option<Request> = read_frame(&mut b).await.unwrap();
        assert_eq!(eof, None);
    }

    #[tokio::test]
    async fn oversize_and_garbage_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&(MAX_FRAME + 1).to_be_bytes()).await.unwrap();
        let r: Result<Option<Request>, _> = read_frame(&mut b).await;
        assert!(matches!(r, Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1));

        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{oops").await.unwrap();
        let r: Result<Option<Request>, _> = read_frame(&mut b).await;
        assert!(matches!(r, Err(FrameError::Decode(_))));

        // Truncated body: the peer closed mid-frame.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{}").await.unwrap();
        drop(a);
        let r: Result<Option<Request>, _> = read_frame(&mut b).await;
        assert!(matches!(r, Err(FrameError::Io(_))));
    }

    #[test]
    fn wire_names_are_stable() {
        let json = serde_json::to_string(&Request::Admin(AdminRequest::JoinToken {
            role: Role::Worker,
            rotate: false,
        }))
        .unwrap();
        assert_eq!(
            json,
            r#"{"admin":{"join_token":{"role":"worker","rotate":false}}}"#
        );
        assert_eq!(serde_json::to_string(&Request::Info).unwrap(), r#""info""#);
        let resp: Response = Err("boom".into());
        assert_eq!(serde_json::to_string(&resp).unwrap(), r#"{"Err":"boom"}"#);
    }
}
