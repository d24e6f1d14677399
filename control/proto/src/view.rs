//! The cluster view as it travels from a manager to the nodes (in a join grant and on the
//! watch stream), and the words both ends share (role, availability, live keys).
//!
//! The message is versioned: [`View`] is an enum with one variant per format, written as
//! `{"v1": {...}}`. Every field of a format is required (no serde defaults standing in for
//! migrations); a node that gets a format it does not know says so in one line
//! ("unknown variant `v2`"). The control plane keeps its own in-memory type and its own disk
//! record and converts at the edges, so each can change without the others.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::id::NodeId;

/// What a node is in the swarm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs workloads; cannot view or change cluster state.
    Worker,
    /// Can view and change cluster state.
    Manager,
}

impl Role {
    /// The word docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Manager => "manager",
        }
    }
}

/// Scheduling availability, as docker has it. shoal only reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Availability {
    /// The node takes work.
    Active,
}

/// Which keys of a ring are live on a node: the one that seals, and the other one that still
/// opens (by their ids in the view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LiveKeys {
    /// The id that seals.
    pub sealing: u32,
    /// The other id that opens, if one does.
    pub also_open: Option<u32>,
}

/// How long node certificates are valid unless `init --cert-expiry` says otherwise: 90 days,
/// docker's default.
pub const DEFAULT_CERT_EXPIRY_SECS: u64 = 90 * 24 * 3600;

/// The cluster view on the wire, one variant per format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// Format 1.
    V1(ViewV1),
}

/// Format 1 of the view: what every node keeps of the manager's state (no CA key, no join
/// secrets, no certificates).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewV1 {
    /// The manager state version this view was made from; a node replaces its view only with
    /// a strictly newer one (a later generation, or the same generation and a higher version).
    pub version: u64,
    /// The generation of the managers' group: raised by `init --force-new-cluster`, so the new
    /// group's views replace the old group's whatever their versions (the forced manager may
    /// not have had every change the old group made). Absent (0) from views before it existed.
    #[serde(default)]
    pub generation: u64,
    /// A manager's node ID (the one with the lowest Raft ID). Before Raft this was the one
    /// manager; now every manager is in `nodes` with its API address, and who leads is Raft's
    /// to say, not the view's.
    pub leader: NodeId,
    /// That manager's API address.
    pub api_addr: SocketAddr,
    /// The cluster CA certificate, DER.
    pub ca_cert_der: Vec<u8>,
    /// The node list.
    pub nodes: Vec<NodeV1>,
    /// Network keys.
    pub keys: KeysV1,
    /// The ingress network.
    pub ingress: NetworkV1,
    /// How long node certificates are valid, in seconds (nodes renew with a third left).
    pub cert_expiry_secs: u64,
    /// User-defined networks (absent from views before they existed).
    #[serde(default)]
    pub networks: Vec<UserNetworkV1>,
    /// Services (absent from views before they existed).
    #[serde(default)]
    pub services: Vec<ServiceV1>,
}

/// One node of the list, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeV1 {
    /// Node ID.
    pub id: NodeId,
    /// Host name the node reported at join.
    pub hostname: String,
    /// Advertise (underlay) address.
    pub addr: IpAddr,
    /// Worker or manager.
    pub role: Role,
    /// Availability.
    pub availability: Availability,
    /// Static X25519 public key.
    pub public_key: [u8; 32],
    /// Ed25519 public key.
    pub signing_key: [u8; 32],
    /// SHA-256 of the node's current certificate.
    pub cert_digest: [u8; 32],
    /// Unix time that certificate expires.
    pub cert_not_after: u64,
    /// SHA-256 of the certificate before the last reissue, if any.
    pub previous_cert_digest: Option<[u8; 32]>,
    /// Agent version the node reported.
    pub engine_version: String,
    /// The node left.
    pub left: bool,
    /// Address on the ingress network.
    pub overlay_addr: Option<Ipv4Addr>,
    /// Unix time the node joined.
    pub joined_at: u64,
    /// A manager's Raft ID. Optional, and the one exception to "every field is required":
    /// views from managers before Raft have none (their one manager is `leader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_id: Option<u64>,
    /// A manager's API address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_addr: Option<SocketAddr>,
}

/// A key with its id, format 1.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyV1 {
    /// Key id or epoch.
    pub id: u32,
    /// The key.
    pub key: [u8; 32],
}

impl std::fmt::Debug for KeyV1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyV1({}, ..)", self.id)
    }
}

/// Network keys, format 1: at most two per ring, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysV1 {
    /// Gossip keys.
    pub gossip: Vec<KeyV1>,
    /// Data-path epochs.
    pub data_path: Vec<KeyV1>,
    /// Unix time of the last rotation.
    pub rotated_at: u64,
    /// Seconds between rotations.
    pub interval_secs: u64,
    /// A rotation is owed (a node left or was removed).
    pub owed: bool,
}

/// An overlay network, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkV1 {
    /// Name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Subnet, CIDR text.
    pub subnet: String,
    /// Encrypted data path.
    pub encrypted: bool,
    /// UDP port of the data path.
    pub data_path_port: u16,
    /// External VTEPs.
    pub vteps: Vec<VtepV1>,
}

/// A user-defined overlay network (`network create`), format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNetworkV1 {
    /// ID, 25 base-36 characters.
    pub id: String,
    /// Name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Subnet, CIDR text.
    pub subnet: String,
    /// Gateway address.
    pub gateway: Ipv4Addr,
    /// Encrypted data path.
    pub encrypted: bool,
    /// Containers may attach by hand.
    pub attachable: bool,
    /// No route out of the overlay.
    pub internal: bool,
    /// Unix time of its creation.
    pub created_at: u64,
    /// Each node's address blocks of the subnet (absent from views before blocks existed).
    #[serde(default)]
    pub blocks: Vec<BlockV1>,
    /// Fixed addresses and the node each is assigned to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned: Vec<AssignedV1>,
}

/// How a service's clients reach its backends (docker's `--endpoint-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// A virtual IP on the service's network, spread over the backends.
    #[default]
    Vip,
    /// DNS round robin: the service's name resolves to its backends' addresses.
    Dnsrr,
}

impl EndpointMode {
    /// The word docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        }
    }
}

/// The transport protocol of a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The word docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Where a published port answers (docker's `mode=` of `--publish`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node (the routing mesh).
    #[default]
    Ingress,
    /// Only on nodes with a local backend, and only with those.
    Host,
}

impl PublishMode {
    /// The word docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        }
    }
}

/// A published port of a service, format 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortV1 {
    /// The port on the nodes.
    pub published: u16,
    /// The port on the backends.
    pub target: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Ingress (every node) or host (nodes with a backend).
    pub mode: PublishMode,
}

/// A service's health check, format 1 (a TCP connect to each target port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthV1 {
    /// Milliseconds between checks.
    pub interval_ms: u32,
    /// Failed checks in a row that make a backend unhealthy.
    pub retries: u32,
}

impl Default for HealthV1 {
    /// 250 ms and 2 retries.
    fn default() -> Self {
        HealthV1 {
            interval_ms: 250,
            retries: 2,
        }
    }
}

/// A service (`service create`), format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceV1 {
    /// ID, 25 base-36 characters.
    pub id: String,
    /// Name, unique in the cluster.
    pub name: String,
    /// The ID of its user network.
    pub network: String,
    /// VIP or DNS round robin.
    pub endpoint_mode: EndpointMode,
    /// Its virtual IP on the network (`vip` mode only).
    pub vip: Option<Ipv4Addr>,
    /// Published ports.
    pub ports: Vec<PortV1>,
    /// Health check.
    pub health: HealthV1,
    /// The backends' addresses on the network.
    pub backends: Vec<Ipv4Addr>,
    /// Unix time of its creation.
    pub created_at: u64,
}

/// A fixed address of a network and its node, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedV1 {
    /// The address.
    pub ip: Ipv4Addr,
    /// The node it is assigned to.
    pub node: NodeId,
}

/// A node's address block of a network, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockV1 {
    /// The node.
    pub node: NodeId,
    /// The block, CIDR text.
    pub block: String,
}

/// An external VTEP, format 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtepV1 {
    /// Underlay address.
    pub addr: IpAddr,
    /// MAC of its overlay interface.
    pub mac: String,
    /// Overlay address.
    pub ip: Ipv4Addr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> ViewV1 {
        ViewV1 {
            version: 7,
            generation: 1,
            leader: NodeId::from_random(1),
            api_addr: "198.18.0.1:2377".parse().unwrap(),
            ca_cert_der: vec![1, 2, 3],
            nodes: vec![NodeV1 {
                id: NodeId::from_random(1),
                hostname: "n1".into(),
                addr: "198.18.0.1".parse().unwrap(),
                role: Role::Manager,
                availability: Availability::Active,
                public_key: [1; 32],
                signing_key: [2; 32],
                cert_digest: [3; 32],
                cert_not_after: 99,
                previous_cert_digest: None,
                engine_version: "0.1.0".into(),
                left: false,
                overlay_addr: Some("198.19.0.2".parse().unwrap()),
                joined_at: 5,
                raft_id: Some(1),
                api_addr: Some("198.18.0.1:2377".parse().unwrap()),
            }],
            keys: KeysV1 {
                gossip: vec![KeyV1 {
                    id: 1,
                    key: [4; 32],
                }],
                data_path: vec![KeyV1 {
                    id: 1,
                    key: [5; 32],
                }],
                rotated_at: 5,
                interval_secs: 3600,
                owed: false,
            },
            ingress: NetworkV1 {
                name: "ingress".into(),
                vni: 4096,
                subnet: "198.19.0.0/24".into(),
                encrypted: true,
                data_path_port: 4789,
                vteps: Vec::new(),
            },
            cert_expiry_secs: 3600,
            networks: Vec::new(),
            services: Vec::new(),
        }
    }

    #[test]
    fn the_format_travels_as_its_key() {
        let view = View::V1(v1());
        let json = serde_json::to_value(&view).unwrap();
        assert!(json.get("v1").is_some(), "{json}");
        assert_eq!(serde_json::from_value::<View>(json).unwrap(), view);
    }

    #[test]
    fn an_unknown_format_or_a_missing_field_is_refused() {
        let json = serde_json::to_value(View::V1(v1())).unwrap();
        let later = serde_json::json!({ "v2": json["v1"].clone() });
        let err = serde_json::from_value::<View>(later)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `v2`"), "{err}");
        // No serde defaults standing in for migrations: every field of v1 is required, but
        // those added since that views from older managers lack (see below).
        let mut partial = json.clone();
        partial["v1"]
            .as_object_mut()
            .unwrap()
            .remove("cert_expiry_secs");
        let err = serde_json::from_value::<View>(partial)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `cert_expiry_secs`"), "{err}");
    }

    #[test]
    fn a_view_from_before_services_has_none_and_services_travel() {
        let mut json = serde_json::to_value(View::V1(v1())).unwrap();
        json["v1"].as_object_mut().unwrap().remove("services");
        let View::V1(old) = serde_json::from_value::<View>(json).unwrap();
        assert!(old.services.is_empty());
        let mut with = v1();
        with.services.push(ServiceV1 {
            id: "s".repeat(25),
            name: "web".into(),
            network: "n".repeat(25),
            endpoint_mode: EndpointMode::Vip,
            vip: Some("10.9.0.254".parse().unwrap()),
            ports: vec![PortV1 {
                published: 8080,
                target: 80,
                protocol: Protocol::Udp,
                mode: PublishMode::Host,
            }],
            health: HealthV1 {
                interval_ms: 250,
                retries: 2,
            },
            backends: vec!["10.9.0.2".parse().unwrap()],
            created_at: 9,
        });
        let json = serde_json::to_value(View::V1(with.clone())).unwrap();
        let port = &json["v1"]["services"][0]["ports"][0];
        assert_eq!(port["protocol"], "udp");
        assert_eq!(port["mode"], "host");
        assert_eq!(json["v1"]["services"][0]["endpoint_mode"], "vip");
        assert_eq!(
            serde_json::from_value::<View>(json).unwrap(),
            View::V1(with)
        );
    }

    #[test]
    fn a_view_from_before_generations_is_generation_0() {
        let mut json = serde_json::to_value(View::V1(v1())).unwrap();
        json["v1"].as_object_mut().unwrap().remove("generation");
        let View::V1(old) = serde_json::from_value::<View>(json).unwrap();
        assert_eq!(old.generation, 0);
        assert_eq!(old.version, 7);
    }
}
