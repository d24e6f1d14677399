//! The one place the control plane meets the data path: it brings the ingress overlay up on
//! this node (the `shoal-ingress` interface, the data-path socket, the engine) and keeps the
//! engine's members and key epochs in step with the cluster view and gossip.
//!
//! Members come from the manager's node list (underlay address, X25519 public key, overlay
//! address), never from gossip alone: gossip only adds each node's incarnation (renewed at
//! every agent start), and only for a node whose gossip public key is the one the manager
//! issued. A node that goes Down keeps its entries (it may come back); a node removed from
//! the list loses them, and its sessions' keys, at once. External VTEPs (plain networks) come
//! from the network definition.
//!
//! Key epochs follow the gossip keys' rule ([`crate::agent::gossip::sealing_order`]): both live
//! epochs always open, the newest seals once this node has known it for
//! [`crate::agent::gossip::KEY_GRACE`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use shoal_ingress::mesh::flows::Timeouts;
use shoal_ingress::mesh::{MeshConfig, MeshNetwork, DEFAULT_MAX_FLOWS};
use shoal_ingress::network::{mac_for, INGRESS_INTERFACE};
use shoal_ingress::overlay::{
    Member, Overlay, OverlayConfig, OverlayError, PeerStatus, SegmentConfig,
};
use shoal_ingress::NetworkSpec;
use shoal_vxlan::crypto::{EpochKey, Incarnation, NodeKey, PeerKey};
use shoal_vxlan::engine::{Counters, DropCounts};
use shoal_vxlan::wire::Mac;

use crate::cluster::sealing_order;
use crate::cluster::{ClusterView, Network};
use crate::id::NodeId;

/// The underlay MTU assumed when none is given.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;

/// Why the data path could not start or follow a view.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// This node has no overlay address in the view.
    #[error("this node has no address on the ingress network yet")]
    NoAddress,
    /// The network definition is not usable.
    #[error("the ingress network definition is damaged: {0}")]
    BadNetwork(String),
    /// The overlay refused a change or could not be set up.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// How to run the data path on this node.
#[derive(Debug, Clone)]
pub struct Params {
    /// The interface name.
    pub interface: String,
    /// The underlay MTU.
    pub underlay_mtu: u16,
    /// This node's incarnation: drawn afresh and stored before every start of the data path
    /// (see `Store::renew_incarnation`).
    pub incarnation: Incarnation,
    /// The mesh's flow timeouts (`shoal agent --mesh-timeouts`).
    pub mesh_timeouts: Timeouts,
    /// The mesh's flow table bound (`shoal agent --mesh-max-flows`).
    pub mesh_max_flows: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            interface: INGRESS_INTERFACE.to_owned(),
            underlay_mtu: DEFAULT_UNDERLAY_MTU,
            incarnation: Incarnation::default(),
            mesh_timeouts: Timeouts::default(),
            mesh_max_flows: DEFAULT_MAX_FLOWS,
        }
    }
}

/// What gossip says of a node: its public key and incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// The public key in its gossip metadata.
    pub public_key: [u8; 32],
    /// Its incarnation.
    pub incarnation: Incarnation,
}

/// The network spec of a view's ingress network.
pub fn spec(network: &Network) -> Result<NetworkSpec, DataPathError> {
    let subnet = network
        .subnet
        .parse()
        .map_err(|_| DataPathError::BadNetwork(format!("subnet {}", network.subnet)))?;
    Ok(NetworkSpec {
        name: network.name.clone(),
        vni: network.vni,
        subnet,
        encrypted: network.encrypted,
    })
}

/// The overlay members for a view: every other node that has not left, has an overlay
/// address and is heard in gossip with the key the manager issued; plus the external VTEPs.
pub fn members(view: &ClusterView, me: &NodeId, heard: &HashMap<NodeId, Announced>) -> Vec<Member> {
    let port = view.ingress.data_path_port;
    let nodes = view
        .nodes
        .iter()
        .filter(|n| &n.id != me && !n.left)
        .filter_map(|n| {
            let address = n.overlay_addr?;
            let h = heard.get(&n.id).filter(|h| h.public_key == n.public_key)?;
            Some(Member::node(
                SocketAddr::new(n.addr, port),
                address,
                PeerKey {
                    public: n.public_key,
                    node_id: n.id.bytes(),
                    incarnation: h.incarnation,
                },
            ))
        });
    let vteps = view.ingress.vteps.iter().filter_map(|v| {
        let mac: Mac = v.mac.parse().ok()?;
        Some(Member {
            vtep: SocketAddr::new(v.addr, port),
            address: v.ip,
            mac,
            key: None,
        })
    });
    nodes.chain(vteps).collect()
}

/// A running data path.
pub struct DataPath {
    overlay: Mutex<Overlay>,
    underlay_mtu: u16,
    /// The node's underlay addresses that published ports answer on.
    addresses: Vec<Ipv4Addr>,
    mesh_timeouts: Timeouts,
    mesh_max_flows: usize,
    seen: Mutex<HashMap<u32, Instant>>,
    capture: Arc<crate::agent::capture::Hub>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath").finish_non_exhaustive()
    }
}

impl DataPath {
    /// Brings the overlay up for `me` in `view`: the interface with this node's overlay
    /// address, the socket on the advertise address and data-path port.
    pub fn start(
        view: &ClusterView,
        me: &NodeId,
        node_secret: [u8; 32],
        params: &Params,
    ) -> Result<Self, DataPathError> {
        let node = view.node(me).ok_or(DataPathError::NoAddress)?;
        let address = node.overlay_addr.ok_or(DataPathError::NoAddress)?;
        let overlay = Overlay::start(OverlayConfig {
            network: spec(&view.ingress)?,
            interface: params.interface.clone(),
            mesh_interface: shoal_ingress::overlay::MESH_INTERFACE.to_owned(),
            address,
            underlay_mtu: params.underlay_mtu,
            bind: SocketAddr::new(node.addr, view.ingress.data_path_port),
            node_key: NodeKey::from_secret(node_secret),
            node_id: me.bytes(),
            incarnation: params.incarnation,
        })?;
        let capture = Arc::new(crate::agent::capture::Hub::default());
        overlay.set_capture(Some(capture.clone()));
        Ok(DataPath {
            overlay: Mutex::new(overlay),
            underlay_mtu: params.underlay_mtu,
            addresses: match node.addr {
                std::net::IpAddr::V4(a) => vec![a],
                std::net::IpAddr::V6(_) => Vec::new(),
            },
            mesh_timeouts: params.mesh_timeouts,
            mesh_max_flows: params.mesh_max_flows,
            seen: Mutex::new(HashMap::new()),
            capture,
        })
    }

    /// Brings members and key epochs in step with `view` and what gossip `heard`, at `now`.
    /// Returns when the sending epoch will next change by itself, if it will.
    pub fn apply_view(
        &self,
        view: &ClusterView,
        me: &NodeId,
        heard: &HashMap<NodeId, Announced>,
        now: Instant,
    ) -> Result<Option<Instant>, DataPathError> {
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let next = match sealing_order(&view.keys.data_path, &mut seen, now) {
            Some((seal, open, next)) if overlay.spec().encrypted => {
                let mut epochs = vec![EpochKey::new(seal.id, seal.key)];
                epochs.extend(open.map(|o| EpochKey::new(o.id, o.key)));
                let before = overlay.send_epoch();
                overlay.set_epochs(&epochs, seal.id)?;
                if before != Some(seal.id) {
                    tracing::info!(
                        epoch = seal.id,
                        previous = ?before,
                        "data path seals under a new key epoch"
                    );
                }
                next
            }
            _ => None,
        };
        overlay.set_members(&members(view, me, heard))?;
        Ok(next)
    }

    /// Makes the user networks carried here what `segments` computes, called with the data
    /// path held so two callers never apply an older picture over a newer one.
    pub fn sync_networks(
        &self,
        segments: impl FnOnce() -> (Vec<SegmentConfig>, Vec<MeshNetwork>),
    ) -> Result<(), DataPathError> {
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let (segments, networks) = segments();
        overlay.set_networks(&segments)?;
        overlay.set_mesh(&MeshConfig {
            node: overlay.address(),
            addresses: self.addresses.clone(),
            networks,
            timeouts: self.mesh_timeouts,
            max_flows: self.mesh_max_flows,
        });
        Ok(())
    }

    /// The user networks carried here, as the data path holds them.
    pub fn segments(&self) -> Vec<shoal_ingress::overlay::SegmentStatus> {
        self.overlay
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .segments()
    }

    /// The underlay MTU the interfaces are sized for.
    pub fn underlay_mtu(&self) -> u16 {
        self.underlay_mtu
    }

    /// `shoal capture` readers attached.
    pub fn capture_readers(&self) -> usize {
        self.capture.readers()
    }

    /// Starts a `shoal capture` reader, unless [`crate::agent::capture::MAX_READERS`] run already.
    pub fn capture(
        &self,
        filter: crate::agent::capture::Filter,
    ) -> Result<crate::agent::capture::Subscription, crate::agent::capture::Busy> {
        self.capture.subscribe(filter)
    }

    /// A summary for `network inspect` and `node inspect`.
    pub fn status(&self) -> Status {
        let overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let peers = overlay.peer_status();
        Status {
            interface: overlay.interface().to_owned(),
            address: overlay.address(),
            mac: mac_for(overlay.address()),
            mtu: overlay.mtu(),
            members: overlay.members().count(),
            counters: overlay.counters(),
            peers,
            send_epoch: overlay.send_epoch(),
            epochs: overlay.epochs(),
            io_errors: {
                let io = overlay.io_counters();
                let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                vec![
                    ("tap_read", get(&io.tap_read_errors)),
                    ("tap_bad_frame", get(&io.tap_bad_frames)),
                    ("tap_write", get(&io.tap_write_errors)),
                    ("udp_send", get(&io.udp_send_errors)),
                    ("udp_recv", get(&io.udp_recv_errors)),
                    ("no_device", get(&io.no_device)),
                ]
            },
            answered_locally: overlay
                .io_counters()
                .answered_locally
                .load(Ordering::Relaxed),
            mesh: overlay.mesh_counters(),
        }
    }
}

/// How often the agent logs a summary of the data path's drops (one line, if any).
pub const DROP_SUMMARY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The drops between two readings of the counters, as `reason=count` pairs, `None` if none.
pub fn drop_summary(before: &DropCounts, now: &DropCounts) -> Option<(u64, String)> {
    let mut total = 0;
    let mut parts = Vec::new();
    for ((reason, n), (_, m)) in now.iter().zip(before.iter()) {
        let d = n.saturating_sub(m);
        if d > 0 {
            total += d;
            parts.push(format!("{reason}={d}"));
        }
    }
    (total > 0).then(|| (total, parts.join(" ")))
}

impl Drop for DataPath {
    fn drop(&mut self) {
        // Capture readers see their stream end rather than wait on a data path that is gone.
        self.capture.close();
    }
}

/// The data path as `network inspect` shows it.
#[derive(Debug, Clone)]
pub struct Status {
    /// The interface.
    pub interface: String,
    /// This node's overlay address.
    pub address: Ipv4Addr,
    /// Its MAC.
    pub mac: Mac,
    /// The interface MTU.
    pub mtu: u16,
    /// Members with sessions or entries.
    pub members: usize,
    /// Engine-wide counters.
    pub counters: Counters,
    /// Each peer: counters, epochs, last packet.
    pub peers: Vec<PeerStatus>,
    /// The key epoch this node seals under.
    pub send_epoch: Option<u32>,
    /// The key epochs live here (the sending one and the one before, while it still opens).
    pub epochs: Vec<u32>,
    /// Device and socket errors by kind.
    pub io_errors: Vec<(&'static str, u64)>,
    /// Frames answered locally (ARP).
    pub answered_locally: u64,
    /// The routing mesh's counters.
    pub mesh: shoal_ingress::mesh::MeshCounters,
}

/// The data path's counters as the API shows them: drops only by the reasons that happened.
pub fn counters(c: &Counters) -> crate::api::Counters {
    crate::api::Counters {
        tx_packets: c.tx_packets,
        tx_bytes: c.tx_bytes,
        rx_packets: c.rx_packets,
        rx_bytes: c.rx_bytes,
        drops: c
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.label().to_owned(), n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_vxlan::engine::Engine;
    use shoal_vxlan::wire::Vni;

    #[test]
    fn drop_summary_names_the_new_drops_only() {
        let mut engine = Engine::new(shoal_vxlan::testing::local(7, 1));
        engine.add_network(Vni::new(4096).unwrap(), true).unwrap();
        let src: SocketAddr = "198.18.0.9:4789".parse().unwrap();
        let mut send = |bytes: &[u8]| {
            let mut b = bytes.to_vec();
            let _ = engine.handle_datagram_slice(Instant::now(), src, &mut b);
            engine.counters().drops.clone()
        };
        let zero = DropCounts::default();
        let short = send(b"short");
        assert_eq!(drop_summary(&zero, &zero), None);
        assert_eq!(drop_summary(&zero, &short), Some((1, "too_short=1".into())));
        // A well-formed VXLAN header on an unknown VNI.
        let unknown = send(&[0x08, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            drop_summary(&short, &unknown),
            Some((1, "unknown_vni=1".into()))
        );
        assert_eq!(drop_summary(&unknown, &unknown), None);
    }
}
