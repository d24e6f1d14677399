//! The overlay on one node: the network's TAP interface (address, derived MAC, MTU), the
//! data-path socket, the engine, and the ARP responder, kept in step with the members the
//! control plane announces.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use shoal_vxlan::crypto::{EpochKey, Incarnation, Local, NodeIdBytes, NodeKey, PeerKey};
use shoal_vxlan::engine::{ConfigError, Counters, Engine};
use shoal_vxlan::fdb::Origin;
use shoal_vxlan::io::tap::{Tap, TapConfig};
use shoal_vxlan::io::{udp, Dataplane, IoCounters};
use shoal_vxlan::wire::{Mac, Vni};

use crate::arp::{ArpResponder, ArpTable};
use crate::mesh::{Mesh, MeshConfig, MeshCounters, MeshHook};
use crate::network::{mac_for, NetworkSpec};

/// How to bring a network up on this node.
#[derive(Debug)]
pub struct OverlayConfig {
    /// The network.
    pub network: NetworkSpec,
    /// The interface name (`shoal-ingress`).
    pub interface: String,
    /// The mesh device's name ([`MESH_INTERFACE`]).
    pub mesh_interface: String,
    /// This node's overlay address.
    pub address: Ipv4Addr,
    /// The underlay MTU the interface MTU is derived from.
    pub underlay_mtu: u16,
    /// Where the data-path socket binds (the data-path port on all addresses, or the
    /// advertise address).
    pub bind: SocketAddr,
    /// This node's static key.
    pub node_key: NodeKey,
    /// This node's ID, as the manager issued it (it goes into the pair keys).
    pub node_id: NodeIdBytes,
    /// This node's incarnation (drawn afresh at every start of the data path).
    pub incarnation: Incarnation,
}

/// Another member of the network: a shoal node, or an external VTEP (plain networks only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Underlay address and data-path port.
    pub vtep: SocketAddr,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// Its overlay MAC.
    pub mac: Mac,
    /// Its key and incarnation; `None` for an external VTEP.
    pub key: Option<PeerKey>,
}

impl Member {
    /// A shoal node, whose MAC is derived from its overlay address.
    pub fn node(vtep: SocketAddr, address: Ipv4Addr, key: PeerKey) -> Self {
        Member {
            vtep,
            address,
            mac: mac_for(address),
            key: Some(key),
        }
    }
}

/// Why an overlay change was refused.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The engine refused a change.
    #[error(transparent)]
    Engine(#[from] ConfigError),
    /// An external VTEP on an encrypted network.
    #[error("network {0} is encrypted: external VTEPs can only join plain networks (create it with --no-encrypt)")]
    ExternalOnEncrypted(String),
    /// The VNI does not fit in 24 bits.
    #[error("VNI {0} does not fit in 24 bits")]
    BadVni(u32),
    /// Device or socket setup failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// An endpoint of a user network behind another node: a container's address and MAC, and
/// the node's VTEP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteEndpoint {
    /// Its address on the network.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: Mac,
    /// The underlay address of the node it is behind.
    pub vtep: IpAddr,
}

/// A user network as this node should carry it (see [`Overlay::set_networks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentConfig {
    /// The network.
    pub spec: NetworkSpec,
    /// The device its local endpoints are bridged to, if this node has any: the TAP's name.
    pub device: Option<String>,
    /// Its endpoints behind other nodes.
    pub endpoints: Vec<RemoteEndpoint>,
    /// The network's router on this node: its gateway address, or `None` for a network
    /// with no way out (`--internal`). ARP for it gets [`crate::mesh::router_mac`].
    pub gateway: Option<Ipv4Addr>,
    /// Its services' virtual IPs, which the router answers for too.
    pub vips: Vec<Ipv4Addr>,
}

/// A user network as the data path carries it (see [`Overlay::segments`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentStatus {
    /// Its VNI.
    pub vni: u32,
    /// Its device here, if this node has endpoints on it.
    pub device: Option<String>,
    /// The forwarding entries the control plane assigned: each remote endpoint's MAC and
    /// VTEP, sorted.
    pub forwarding: Vec<(Mac, IpAddr)>,
}

/// A user network carried here.
#[derive(Debug)]
struct Segment {
    spec: NetworkSpec,
    device: Option<String>,
    arp: Arc<ArpResponder>,
    endpoints: Vec<RemoteEndpoint>,
    router: Vec<Ipv4Addr>,
}

impl SegmentConfig {
    /// The addresses the network's router answers for: the gateway and the VIPs.
    pub fn router(&self) -> Vec<Ipv4Addr> {
        self.gateway.iter().chain(&self.vips).copied().collect()
    }
}

/// The MAC of a user network's TAP device on the node whose ingress address is `node`:
/// `02:43` and that address's four bytes, so no two nodes' devices share one (the device is
/// a bridge port, and a bridge takes its lowest port's MAC: frames the bridge itself sends
/// would otherwise come from one MAC on every node, and be dropped as spoofed).
pub fn device_mac(node: Ipv4Addr) -> Mac {
    let o = node.octets();
    Mac([0x02, 0x43, o[0], o[1], o[2], o[3]])
}

/// A network, up on this node.
pub struct Overlay {
    spec: NetworkSpec,
    vni: Vni,
    interface: String,
    mtu: u16,
    address: Ipv4Addr,
    dataplane: Dataplane,
    arp: Arc<ArpResponder>,
    members: HashMap<IpAddr, Member>,
    underlay_mtu: u16,
    segments: HashMap<Vni, Segment>,
    mesh: Arc<MeshHook>,
}

/// The name of the device clients' packets to published ports are steered to (see
/// `docs/services.md`).
pub const MESH_INTERFACE: &str = "shoal-mesh";

impl core::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Overlay")
            .field("network", &self.spec.name)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

/// One peer as the data path sees it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Its VTEP: underlay address and data-path port.
    pub vtep: SocketAddr,
    /// Traffic with it, both directions, and drops attributed to it.
    pub counters: Counters,
    /// Key epochs this node holds sessions with it under.
    pub epochs: Vec<u32>,
    /// The key epoch of the last sealed datagram opened from it.
    pub last_rx_epoch: Option<u32>,
    /// When the last frame from it was delivered.
    pub last_rx: Option<std::time::Instant>,
}

impl Overlay {
    /// Creates the interface and the socket and starts the data path. Nothing is reachable
    /// until [`Overlay::set_members`] (and, encrypted, [`Overlay::set_epochs`]).
    pub fn start(config: OverlayConfig) -> Result<Overlay, OverlayError> {
        let vni =
            Vni::new(config.network.vni).map_err(|_| OverlayError::BadVni(config.network.vni))?;
        let mtu = config.network.mtu(config.underlay_mtu);
        let tap = Tap::create(&TapConfig {
            name: config.interface.clone(),
            mac: mac_for(config.address),
            mtu,
            address: Some((config.address, config.network.subnet.prefix_len())),
            offload: true,
        })
        .map_err(|source| OverlayError::Io {
            what: "creating the overlay interface",
            source,
        })?;
        let socket = udp::bind(config.bind).map_err(|source| OverlayError::Io {
            what: "binding the data-path port",
            source,
        })?;
        // One engine per direction (see `shoal_vxlan::io`), from the same key.
        let secret = config.node_key.secret_bytes();
        let mut engines = [0, 1].map(|_| {
            Engine::new(Local::new(
                NodeKey::from_secret(*secret),
                config.node_id,
                config.incarnation,
            ))
        });
        for e in &mut engines {
            e.add_network(vni, config.network.encrypted)?;
        }
        let [outbound, inbound] = engines;
        let arp = Arc::new(ArpResponder::new());
        let responder: Arc<dyn shoal_vxlan::io::LocalResponder> = arp.clone();
        let mut dataplane = Dataplane::start(outbound, inbound, vni, tap, socket, Some(responder))
            .map_err(|source| OverlayError::Io {
                what: "starting the data path",
                source,
            })?;
        let mesh = Arc::new(MeshHook::new(Mesh::new(config.address)));
        let outside = Tap::create(&TapConfig {
            name: config.mesh_interface.clone(),
            mac: mac_for(config.address),
            mtu: config.underlay_mtu,
            address: None,
            offload: true,
        })
        .map_err(|source| OverlayError::Io {
            what: "creating the mesh device",
            source,
        })?;
        let hook: Arc<dyn shoal_vxlan::io::FrameHook> = mesh.clone();
        dataplane
            .set_mesh(Some((hook, outside)))
            .map_err(|source| OverlayError::Io {
                what: "starting the mesh device",
                source,
            })?;
        Ok(Overlay {
            vni,
            interface: config.interface,
            mtu,
            address: config.address,
            spec: config.network,
            dataplane,
            arp,
            members: HashMap::new(),
            underlay_mtu: config.underlay_mtu,
            segments: HashMap::new(),
            mesh,
        })
    }

    /// Makes the user networks carried here exactly `networks` (`ingress` is not one of
    /// them): each one's forwarding table holds its remote endpoints (and floods to their
    /// nodes only), ARP for them is answered here, and a network with local endpoints has
    /// its device (created at its first, removed after its last). A network no longer listed
    /// loses its device, its table and its engine entry.
    pub fn set_networks(&mut self, networks: &[SegmentConfig]) -> Result<(), OverlayError> {
        let mut wanted: HashMap<Vni, &SegmentConfig> = HashMap::new();
        for n in networks {
            let vni = Vni::new(n.spec.vni).map_err(|_| OverlayError::BadVni(n.spec.vni))?;
            if vni == self.vni {
                return Err(OverlayError::BadVni(n.spec.vni));
            }
            wanted.insert(vni, n);
        }
        let gone: Vec<Vni> = self
            .segments
            .keys()
            .filter(|v| !wanted.contains_key(v))
            .copied()
            .collect();
        for vni in gone {
            self.dataplane.remove_device(vni);
            self.dataplane.configure(|e| e.remove_network(vni))?;
            self.segments.remove(&vni);
        }
        for (vni, want) in wanted {
            let changed_kind = self
                .segments
                .get(&vni)
                .is_some_and(|s| s.spec.encrypted != want.spec.encrypted);
            if changed_kind {
                self.dataplane.remove_device(vni);
                self.dataplane.configure(|e| e.remove_network(vni))?;
                self.segments.remove(&vni);
            }
            if !self.segments.contains_key(&vni) {
                self.dataplane
                    .configure(|e| e.add_network(vni, want.spec.encrypted))?;
                self.segments.insert(
                    vni,
                    Segment {
                        spec: want.spec.clone(),
                        device: None,
                        arp: Arc::new(ArpResponder::new()),
                        endpoints: Vec::new(),
                        router: Vec::new(),
                    },
                );
            }
            self.set_segment(vni, want)?;
        }
        Ok(())
    }

    fn set_segment(&mut self, vni: Vni, want: &SegmentConfig) -> Result<(), OverlayError> {
        let Some(segment) = self.segments.get_mut(&vni) else {
            return Ok(());
        };
        segment.spec = want.spec.clone();
        if segment.device != want.device {
            self.dataplane.remove_device(vni);
            segment.device = None;
            if let Some(name) = &want.device {
                let tap = Tap::create(&TapConfig {
                    name: name.clone(),
                    mac: device_mac(self.address),
                    mtu: want.spec.mtu(self.underlay_mtu),
                    address: None,
                    offload: true,
                })
                .map_err(|source| OverlayError::Io {
                    what: "creating a network's device",
                    source,
                })?;
                let responder: Arc<dyn shoal_vxlan::io::LocalResponder> = segment.arp.clone();
                self.dataplane
                    .add_device(vni, tap, Some(responder))
                    .map_err(|source| OverlayError::Io {
                        what: "starting a network's device",
                        source,
                    })?;
                segment.device = Some(name.clone());
            }
        }
        let router = want.router();
        if segment.endpoints != want.endpoints || segment.router != router {
            let wanted: HashMap<Mac, IpAddr> =
                want.endpoints.iter().map(|e| (e.mac, e.vtep)).collect();
            let mut flood: Vec<IpAddr> = want.endpoints.iter().map(|e| e.vtep).collect();
            flood.sort_unstable();
            flood.dedup();
            self.dataplane
                .configure(|engine| -> Result<(), OverlayError> {
                    let fdb = engine.fdb_mut(vni)?;
                    let stale: Vec<Mac> = fdb
                        .entries()
                        .filter(|(mac, e)| {
                            e.origin == Origin::Assigned && wanted.get(*mac) != Some(&e.vtep)
                        })
                        .map(|(mac, _)| *mac)
                        .collect();
                    for mac in stale {
                        fdb.remove(&mac);
                    }
                    let held: Vec<IpAddr> = fdb.flood().to_vec();
                    for vtep in held.iter().filter(|v| !flood.contains(v)) {
                        fdb.remove_flood(vtep);
                    }
                    for (mac, vtep) in &wanted {
                        if fdb.lookup(mac).map(|e| (e.vtep, e.origin))
                            != Some((*vtep, Origin::Assigned))
                        {
                            fdb.insert(*mac, *vtep);
                        }
                    }
                    for vtep in &flood {
                        fdb.add_flood(*vtep);
                    }
                    Ok(())
                })?;
            let mut table = ArpTable::new();
            for e in &want.endpoints {
                table.insert(e.ip, e.mac);
            }
            let mac = crate::mesh::router_mac(want.spec.vni);
            for ip in &router {
                table.insert(*ip, mac);
            }
            segment.arp.set(table);
            segment.endpoints = want.endpoints.clone();
            segment.router = router;
        }
        Ok(())
    }

    /// The user networks carried here, by VNI.
    pub fn segments(&self) -> Vec<SegmentStatus> {
        let mut out: Vec<_> = self
            .segments
            .iter()
            .map(|(vni, s)| {
                let mut entries = self.dataplane.read(|out, _| {
                    out.network(*vni)
                        .map(|n| {
                            n.fdb()
                                .entries()
                                .filter(|(_, e)| e.origin == Origin::Assigned)
                                .map(|(m, e)| (*m, e.vtep))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default()
                });
                entries.sort();
                SegmentStatus {
                    vni: vni.get(),
                    device: s.device.clone(),
                    forwarding: entries,
                }
            })
            .collect();
        out.sort_by_key(|s| s.vni);
        out
    }

    /// Makes the routing mesh and the networks' routers serve `config`.
    pub fn set_mesh(&self, config: &MeshConfig) {
        self.mesh.with(|m| m.set_config(config));
    }

    /// The mesh's counters.
    pub fn mesh_counters(&self) -> MeshCounters {
        self.mesh.with(|m| m.counters())
    }

    /// The network.
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The interface MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// This node's overlay address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The members as last set.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Makes the member set exactly `members`: new ones are added, changed ones updated (a new
    /// key or incarnation means new sessions), missing ones removed and their keys revoked.
    pub fn set_members(&mut self, members: &[Member]) -> Result<(), OverlayError> {
        if self.spec.encrypted && members.iter().any(|m| m.key.is_none()) {
            return Err(OverlayError::ExternalOnEncrypted(self.spec.name.clone()));
        }
        let wanted: HashMap<IpAddr, Member> = members.iter().map(|m| (m.vtep.ip(), *m)).collect();
        let vni = self.vni;
        let gone: Vec<IpAddr> = self
            .members
            .keys()
            .filter(|ip| !wanted.contains_key(ip))
            .copied()
            .collect();
        self.dataplane
            .configure(|engine| -> Result<(), OverlayError> {
                for ip in &gone {
                    engine.remove_peer(*ip);
                }
                for m in wanted.values() {
                    engine.set_peer(m.vtep, m.key)?;
                    let fdb = engine.fdb_mut(vni)?;
                    // A member whose MAC moved: forget the old one (not the MACs learned
                    // from its traffic: those age out by themselves).
                    let stale: Vec<Mac> = fdb
                        .entries()
                        .filter(|(mac, e)| {
                            e.vtep == m.vtep.ip() && e.origin == Origin::Assigned && **mac != m.mac
                        })
                        .map(|(mac, _)| *mac)
                        .collect();
                    for mac in stale {
                        fdb.remove(&mac);
                    }
                    fdb.insert(m.mac, m.vtep.ip());
                    fdb.add_flood(m.vtep.ip());
                }
                Ok(())
            })?;
        let mut table = ArpTable::new();
        for m in wanted.values() {
            table.insert(m.address, m.mac);
        }
        self.arp.set(table);
        self.members = wanted;
        Ok(())
    }

    /// Makes the live key epochs exactly `epochs` (at most two), sending under `send`.
    /// Epochs are added before the sending one moves and retired after, so a rotation that
    /// reaches every node loses nothing.
    pub fn set_epochs(&self, epochs: &[EpochKey], send: u32) -> Result<(), OverlayError> {
        self.dataplane
            .configure(|engine| -> Result<(), OverlayError> {
                let live: Vec<u32> = engine.keyring().epochs().map(EpochKey::id).collect();
                let wanted: Vec<u32> = epochs.iter().map(EpochKey::id).collect();
                // Make room first: retire what is no longer wanted (never the sending epoch).
                for id in live.iter().filter(|id| !wanted.contains(id)) {
                    if engine.keyring().send_epoch() == Some(*id) {
                        if let Some(other) = live.iter().find(|o| wanted.contains(o)) {
                            engine.set_send_epoch(*other)?;
                        } else {
                            continue;
                        }
                    }
                    engine.retire_epoch(*id)?;
                }
                for e in epochs.iter().filter(|e| !live.contains(&e.id())) {
                    engine.add_epoch(e.clone())?;
                }
                engine.set_send_epoch(send)?;
                // An old sending epoch that could not be retired before the new one arrived.
                let leftover: Vec<u32> = engine
                    .keyring()
                    .epochs()
                    .map(EpochKey::id)
                    .filter(|id| !wanted.contains(id))
                    .collect();
                for id in leftover {
                    engine.retire_epoch(id)?;
                }
                Ok(())
            })
    }

    /// The engines' counters, both directions.
    pub fn counters(&self) -> Counters {
        self.dataplane.read(|out, inb| {
            let mut c = out.counters().clone();
            c.add(inb.counters());
            c
        })
    }

    /// Each peer VTEP: counters (both directions), key epochs, last packet.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.dataplane.read(|out, inb| {
            out.peers()
                .map(|p| {
                    let mut counters = p.counters().clone();
                    let received = inb.peer(p.vtep().ip());
                    if let Some(q) = received {
                        counters.add(q.counters());
                    }
                    PeerStatus {
                        vtep: p.vtep(),
                        counters,
                        epochs: p.epochs().collect(),
                        last_rx_epoch: received.and_then(|q| q.last_rx_epoch()),
                        last_rx: received.and_then(|q| q.last_rx()),
                    }
                })
                .collect()
        })
    }

    /// The key epoch this node seals under.
    pub fn send_epoch(&self) -> Option<u32> {
        self.dataplane.read(|out, _| out.keyring().send_epoch())
    }

    /// The key epochs live here: the sending one, and any other that still opens.
    pub fn epochs(&self) -> Vec<u32> {
        self.dataplane
            .read(|out, _| out.keyring().epochs().map(EpochKey::id).collect())
    }

    /// The IO shell's counters.
    pub fn io_counters(&self) -> &IoCounters {
        self.dataplane.io_counters()
    }

    /// Installs (or removes) the sink offered a copy of every packet (see
    /// [`shoal_vxlan::io::capture`]).
    pub fn set_capture(&self, sink: Option<Arc<dyn shoal_vxlan::io::CaptureSink>>) {
        self.dataplane.set_capture(sink);
    }
}
