//! The routing mesh and the networks' routers, in the data path (`docs/services.md`).
//!
//! Sans-IO: [`Mesh`] takes frames (from a network's device, from a peer, from the mesh device
//! that clients outside reach) and the time, rewrites them in place and says where they go
//! ([`Steer`]). [`MeshHook`] puts it behind a lock for the driver's threads, with the cheap
//! checks that keep every other frame away from that lock.
//!
//! Frames it takes:
//! - from a device, to the network's router MAC ([`router_mac`]): DNS to the gateway,
//!   connections to a virtual IP (sent to a backend unchanged, direct return), and backends'
//!   replies to clients outside (sent back by the node the flow came in through);
//! - from a peer, a flow forwarded by its ingress node (source MAC a node device MAC,
//!   `02:43`): the return route is noted; or a reply to a flow this node is the ingress of
//!   (destination MAC this node's device MAC): its source is restored and it goes outside;
//! - from outside: a client's packet to a published port: a backend is picked (Maglev) and
//!   the packet forwarded to it.

pub mod flows;
pub mod frame;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use ipnet::Ipv4Net;
use shoal_vxlan::io::{FrameHook, Steer};
use shoal_vxlan::wire::{Mac, Vni};

use crate::dns;
use crate::maglev::{self, Maglev};
use crate::overlay::device_mac;
use flows::{Back, Flow, FlowKey, FlowTable, Front, Timeouts};
use frame::End;

pub use flows::DEFAULT_MAX_FLOWS;

/// The first two bytes of every node's device MAC on a user network (see
/// [`crate::overlay::device_mac`]).
const DEVICE_MAC_PREFIX: [u8; 2] = [0x02, 0x43];
/// The first three bytes of every network's router MAC.
const ROUTER_MAC_PREFIX: [u8; 3] = [0x02, 0x5e, 0x00];
/// DNS.
const DNS_PORT: u16 = 53;
/// TTL of a virtual IP's record: it lives as long as the service.
const VIP_TTL: u32 = 600;
/// TTL of backends' records: they come and go.
const TASKS_TTL: u32 = 5;

/// The MAC that answers, on every node, for network `vni`'s gateway address and virtual IPs:
/// `02:5e:00` and the VNI's three bytes.
pub fn router_mac(vni: u32) -> Mac {
    let v = vni.to_be_bytes();
    Mac([0x02, 0x5e, 0x00, v[1], v[2], v[3]])
}

/// A published port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    /// [`frame::TCP`] or [`frame::UDP`].
    pub proto: u8,
    /// The port every node (or, `host_mode`, every node with a backend) answers on.
    pub published: u16,
    /// The backends' port.
    pub target: u16,
    /// `mode=host`: only nodes with a local backend answer, with those backends only.
    pub host_mode: bool,
}

/// A backend of a service: an endpoint on its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshBackend {
    /// Its address on the network.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: Mac,
    /// The underlay address of its node; `None` when that is this node.
    pub node: Option<IpAddr>,
    /// Whether it passes its health check (and its node is up).
    pub healthy: bool,
}

/// A service as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshService {
    /// Its name (what DNS answers for).
    pub name: String,
    /// Its virtual IP (`vip` mode).
    pub vip: Option<Ipv4Addr>,
    /// Published ports.
    pub ports: Vec<PortMap>,
    /// Its backends, healthy or not.
    pub backends: Vec<MeshBackend>,
}

/// A network as the mesh needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshNetwork {
    /// Its VNI.
    pub vni: u32,
    /// Its subnet.
    pub subnet: Ipv4Net,
    /// Its gateway: the router's address, and the DNS server's.
    pub gateway: Ipv4Addr,
    /// Its services.
    pub services: Vec<MeshService>,
}

/// What the mesh is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// This node's `ingress` address (its device MACs derive from it).
    pub node: Ipv4Addr,
    /// The node's underlay addresses that published ports answer on.
    pub addresses: Vec<Ipv4Addr>,
    /// The networks with services, or whose router answers DNS.
    pub networks: Vec<MeshNetwork>,
    /// Flow timeouts.
    pub timeouts: Timeouts,
    /// The flow table's bound.
    pub max_flows: usize,
}

/// Why the mesh dropped a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshDrop {
    /// Not an IPv4 TCP or UDP packet (or a fragment) where a flow was expected.
    NotAFlow,
    /// To a port (or address) nothing is published on, or a forwarded flow to an endpoint
    /// that is no published target.
    NotPublished,
    /// The service has no healthy backend.
    NoBackend,
    /// A reply of a flow this node does not track.
    NoFlow,
    /// To the router, for something it does not serve (the overlay has no way out).
    NoRoute,
    /// The flow table is full: a new flow refused.
    FlowTableFull,
    /// A DNS query that could not be read.
    BadDns,
}

impl MeshDrop {
    /// Every reason, in counter order.
    pub const ALL: [MeshDrop; 7] = [
        MeshDrop::NotAFlow,
        MeshDrop::NotPublished,
        MeshDrop::NoBackend,
        MeshDrop::NoFlow,
        MeshDrop::NoRoute,
        MeshDrop::FlowTableFull,
        MeshDrop::BadDns,
    ];

    /// Its name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshDrop::NotAFlow => "not_a_flow",
            MeshDrop::NotPublished => "not_published",
            MeshDrop::NoBackend => "no_backend",
            MeshDrop::NoFlow => "no_flow",
            MeshDrop::NoRoute => "no_route",
            MeshDrop::FlowTableFull => "flow_table_full",
            MeshDrop::BadDns => "bad_dns",
        }
    }
}

/// What the mesh did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// Clients' packets forwarded to a backend.
    pub forwarded: u64,
    /// Backends' replies sent back towards a client outside.
    pub returned: u64,
    /// Frames to a virtual IP sent to a backend.
    pub vip: u64,
    /// DNS queries answered.
    pub dns: u64,
    /// Drops, by [`MeshDrop::ALL`]'s order.
    pub drops: [u64; MeshDrop::ALL.len()],
    /// Flows tracked now.
    pub flows: u64,
}

impl MeshCounters {
    /// Drops for `reason`.
    pub fn dropped(&self, reason: MeshDrop) -> u64 {
        self.drops[reason as usize]
    }
}

/// A service's lookup tables.
#[derive(Debug)]
struct ServiceTables {
    ports: Vec<PortMap>,
    /// Every backend, by address.
    backends: Vec<MeshBackend>,
    /// Over the healthy backends (indices into `backends`).
    healthy: Vec<usize>,
    maglev: Maglev,
    /// Over the healthy local backends (`mode=host`).
    local: Vec<usize>,
    local_maglev: Maglev,
}

impl ServiceTables {
    fn new(s: &MeshService) -> Self {
        let mut backends = s.backends.clone();
        backends.sort_by_key(|b| b.ip);
        backends.dedup_by_key(|b| b.ip);
        let healthy: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].healthy)
            .collect();
        let local: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|&i| backends[i].node.is_none())
            .collect();
        let table = |idx: &[usize]| {
            let keys: Vec<[u8; 4]> = idx.iter().map(|&i| backends[i].ip.octets()).collect();
            Maglev::new(&keys, maglev::TABLE_SIZE)
        };
        ServiceTables {
            ports: s.ports.clone(),
            maglev: table(&healthy),
            local_maglev: table(&local),
            backends,
            healthy,
            local,
        }
    }

    /// The backend Maglev gives the flow hash `hash`, among the healthy ones (local ones
    /// only, `local`).
    fn pick(&self, hash: u64, local: bool) -> Option<&MeshBackend> {
        let (table, idx) = if local {
            (&self.local_maglev, &self.local)
        } else {
            (&self.maglev, &self.healthy)
        };
        table
            .pick(hash)
            .and_then(|i| idx.get(i))
            .map(|&i| &self.backends[i])
    }

    fn backend(&self, ip: Ipv4Addr) -> Option<&MeshBackend> {
        self.backends
            .binary_search_by_key(&ip, |b| b.ip)
            .ok()
            .map(|i| &self.backends[i])
    }
}

/// A network's tables.
#[derive(Debug)]
struct NetworkTables {
    vni: Vni,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    router: Mac,
    services: Vec<ServiceTables>,
    vips: HashMap<Ipv4Addr, usize>,
    names: HashMap<String, (Vec<Ipv4Addr>, u32)>,
    /// (protocol, address, port) of local backends that published ports lead to.
    targets: HashSet<(u8, Ipv4Addr, u16)>,
}

impl NetworkTables {
    fn new(n: &MeshNetwork, vni: Vni) -> Self {
        let services: Vec<ServiceTables> = n.services.iter().map(ServiceTables::new).collect();
        let mut vips = HashMap::new();
        let mut names = HashMap::new();
        let mut targets = HashSet::new();
        for (i, (s, t)) in n.services.iter().zip(&services).enumerate() {
            let healthy: Vec<Ipv4Addr> = t.healthy.iter().map(|&i| t.backends[i].ip).collect();
            let name = s.name.to_ascii_lowercase();
            match s.vip {
                Some(vip) => {
                    vips.insert(vip, i);
                    names.insert(name.clone(), (vec![vip], VIP_TTL));
                }
                None => {
                    names.insert(name.clone(), (healthy.clone(), TASKS_TTL));
                }
            }
            names.insert(format!("tasks.{name}"), (healthy, TASKS_TTL));
            for b in t.backends.iter().filter(|b| b.node.is_none()) {
                for p in &t.ports {
                    targets.insert((p.proto, b.ip, p.target));
                }
            }
        }
        NetworkTables {
            vni,
            subnet: n.subnet,
            gateway: n.gateway,
            router: router_mac(n.vni),
            services,
            vips,
            names,
            targets,
        }
    }
}

/// The mesh on one node. See the module documentation.
#[derive(Debug)]
pub struct Mesh {
    own_mac: Mac,
    addresses: Vec<Ipv4Addr>,
    networks: HashMap<u32, NetworkTables>,
    /// (protocol, published port) to (VNI, service index, port).
    published: HashMap<(u8, u16), (u32, usize, PortMap)>,
    flows: FlowTable,
    counters: MeshCounters,
}

impl Mesh {
    /// A mesh with nothing to do yet.
    pub fn new(node: Ipv4Addr) -> Self {
        Mesh {
            own_mac: device_mac(node),
            addresses: Vec::new(),
            networks: HashMap::new(),
            published: HashMap::new(),
            flows: FlowTable::new(DEFAULT_MAX_FLOWS, Timeouts::default()),
            counters: MeshCounters::default(),
        }
    }

    /// Makes the mesh serve exactly `config`. Flows of ports no longer published, of
    /// networks gone, or to backends no longer there, are dropped.
    pub fn set_config(&mut self, config: &MeshConfig) {
        self.own_mac = device_mac(config.node);
        self.addresses = config.addresses.clone();
        self.flows.set_limits(config.max_flows, config.timeouts);
        self.networks.clear();
        self.published.clear();
        for n in &config.networks {
            let Ok(vni) = Vni::new(n.vni) else { continue };
            let tables = NetworkTables::new(n, vni);
            for (i, s) in tables.services.iter().enumerate() {
                for p in &s.ports {
                    self.published
                        .insert((p.proto, p.published), (n.vni, i, *p));
                }
            }
            self.networks.insert(n.vni, tables);
        }
        let (networks, published) = (&self.networks, &self.published);
        self.flows.retain(|k, f| {
            let Some(net) = networks.get(&f.vni) else {
                return false;
            };
            let front_ok = f.front.is_none_or(|fr| {
                published
                    .get(&(k.proto, fr.published.port()))
                    .is_some_and(|(vni, i, p)| {
                        *vni == f.vni
                            && p.target == k.backend.port()
                            && net.services[*i].backend(*k.backend.ip()).is_some()
                    })
            });
            let back_ok = f.back.is_none()
                || net
                    .targets
                    .contains(&(k.proto, *k.backend.ip(), k.backend.port()));
            front_ok && back_ok
        });
    }

    /// The counters, with the flows tracked now.
    pub fn counters(&self) -> MeshCounters {
        MeshCounters {
            flows: self.flows.len() as u64,
            ..self.counters.clone()
        }
    }

    /// The flow table (for inspection and tests).
    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    fn drop(&mut self, reason: MeshDrop) -> Steer {
        self.counters.drops[reason as usize] += 1;
        Steer::Drop
    }

    /// A frame from a client outside (the mesh device): forwarded to a backend. Its L4
    /// checksum may be `partial` (see [`frame::rewrite`]).
    pub fn on_outside(&mut self, now: Instant, f: &mut [u8], partial: bool) -> Steer {
        let Some(flow) = frame::parse(f) else {
            return self.drop(MeshDrop::NotAFlow);
        };
        let Some(&(vni, svc, port)) = self.published.get(&(flow.proto, flow.dst.port())) else {
            return self.drop(MeshDrop::NotPublished);
        };
        if !self.addresses.contains(flow.dst.ip()) {
            return self.drop(MeshDrop::NotPublished);
        }
        let Some(net) = self.networks.get(&vni) else {
            return self.drop(MeshDrop::NotPublished);
        };
        let service = &net.services[svc];
        // A flow already tracked keeps its backend while that backend exists (healthy or
        // not: open connections are left alone); else Maglev picks one, as every node would.
        let known = self
            .flows
            .front_backend(flow.proto, flow.src, flow.dst)
            .and_then(|b| service.backend(*b.ip()));
        let backend = match known {
            Some(b) => *b,
            None => {
                let hash = maglev::flow_hash(flow.proto, flow.src, flow.dst);
                match service.pick(hash, port.host_mode) {
                    Some(b) => *b,
                    None => return self.drop(MeshDrop::NoBackend),
                }
            }
        };
        let key = FlowKey {
            proto: flow.proto,
            client: flow.src,
            backend: SocketAddrV4::new(backend.ip, port.target),
        };
        let (router, net_vni) = (net.router, net.vni);
        if self.flows.entry(now, key, || Flow::new(vni, now)).is_err() {
            return self.drop(MeshDrop::FlowTableFull);
        }
        let (client_mac, own) = (Mac::src_of(f), Mac::dst_of(f));
        let (Some(client_mac), Some(own_mac)) = (client_mac, own) else {
            return self.drop(MeshDrop::NotAFlow);
        };
        self.flows.set_front(
            &key,
            Front {
                published: flow.dst,
                client_mac,
                own_mac,
            },
        );
        self.flows.observe(now, &key, true, flow.flags);
        frame::rewrite(f, &flow, End::Destination, key.backend, partial);
        self.counters.forwarded += 1;
        match backend.node {
            // Into this node's bridge: from the router's MAC, which the bridge learns is
            // behind the data path's port.
            None => {
                frame::set_macs(f, backend.mac, router);
                Steer::Device(net_vni)
            }
            Some(vtep) => {
                frame::set_macs(f, backend.mac, self.own_mac);
                Steer::Peer { vni: net_vni, vtep }
            }
        }
    }

    /// A frame opened from the node at `vtep`, on network `vni`, that [`claims_from_peer`]
    /// took.
    pub fn on_peer(&mut self, now: Instant, vni: Vni, vtep: IpAddr, f: &mut [u8]) -> Steer {
        let (Some(src_mac), Some(dst_mac)) = (Mac::src_of(f), Mac::dst_of(f)) else {
            return Steer::Pass;
        };
        let Some(flow) = frame::parse(f) else {
            return Steer::Pass;
        };
        let Some(net) = self.networks.get(&vni.get()) else {
            return Steer::Pass;
        };
        let (src_in, dst_in) = (
            net.subnet.contains(flow.src.ip()),
            net.subnet.contains(flow.dst.ip()),
        );
        if src_mac.0[..2] == DEVICE_MAC_PREFIX && !src_in && dst_in {
            // Forwarded by its ingress node to a backend here: note the way back. Only to a
            // published target: what a client outside could reach, and no more.
            if !net
                .targets
                .contains(&(flow.proto, *flow.dst.ip(), flow.dst.port()))
            {
                return self.drop(MeshDrop::NotPublished);
            }
            let key = FlowKey {
                proto: flow.proto,
                client: flow.src,
                backend: flow.dst,
            };
            let vni = vni.get();
            match self.flows.entry(now, key, || Flow::new(vni, now)) {
                Ok(entry) => {
                    entry.back = Some(Back {
                        via: vtep,
                        via_mac: src_mac,
                    })
                }
                Err(_) => return self.drop(MeshDrop::FlowTableFull),
            }
            self.flows.observe(now, &key, true, flow.flags);
            return Steer::Pass;
        }
        if dst_mac == self.own_mac && src_in && !dst_in {
            // A backend's reply, sent back to this node, the flow's ingress.
            let key = FlowKey {
                proto: flow.proto,
                client: flow.dst,
                backend: flow.src,
            };
            return self.send_outside(now, &key, &flow, f);
        }
        Steer::Pass
    }

    /// Restores a reply's source as the client knows it and sends it outside.
    fn send_outside(
        &mut self,
        now: Instant,
        key: &FlowKey,
        flow: &frame::Flow,
        f: &mut [u8],
    ) -> Steer {
        let Some(front) = self.flows.get(key).and_then(|e| e.front) else {
            return self.drop(MeshDrop::NoFlow);
        };
        self.flows.observe(now, key, false, flow.flags);
        frame::rewrite(f, flow, End::Source, front.published, false);
        frame::set_macs(f, front.client_mac, front.own_mac);
        self.counters.returned += 1;
        Steer::Outside
    }

    /// A frame from network `vni`'s device to its router (see [`claims_from_device`]).
    pub fn on_device(
        &mut self,
        now: Instant,
        vni: Vni,
        f: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Steer {
        let Some(net) = self.networks.get(&vni.get()) else {
            return self.drop(MeshDrop::NoRoute);
        };
        if Mac::dst_of(f) != Some(net.router) {
            return self.drop(MeshDrop::NoRoute);
        }
        let Some(flow) = frame::parse(f) else {
            return self.drop(MeshDrop::NotAFlow);
        };
        let dst = *flow.dst.ip();
        if dst == net.gateway && flow.proto == frame::UDP && flow.dst.port() == DNS_PORT {
            return self.answer_dns(vni.get(), &flow, f, reply);
        }
        if let Some(&svc) = net.vips.get(&dst) {
            // Direct return: the backend holds the VIP and answers the client itself.
            let hash = maglev::flow_hash(flow.proto, flow.src, flow.dst);
            let Some(b) = net.services[svc].pick(hash, false).copied() else {
                return self.drop(MeshDrop::NoBackend);
            };
            let router = net.router;
            let net_vni = net.vni;
            self.counters.vip += 1;
            return match b.node {
                None => {
                    frame::set_macs(f, b.mac, router);
                    Steer::Device(net_vni)
                }
                Some(vtep) => {
                    frame::set_macs(f, b.mac, Mac::src_of(f).unwrap_or(router));
                    Steer::Peer { vni: net_vni, vtep }
                }
            };
        }
        if net.subnet.contains(&dst) {
            return self.drop(MeshDrop::NoRoute);
        }
        // A backend's reply to a client outside.
        let key = FlowKey {
            proto: flow.proto,
            client: flow.dst,
            backend: flow.src,
        };
        let Some(entry) = self.flows.get(&key) else {
            return self.drop(MeshDrop::NoFlow);
        };
        match (entry.front, entry.back) {
            (Some(_), _) => self.send_outside(now, &key, &flow, f),
            (None, Some(back)) => {
                self.flows.observe(now, &key, false, flow.flags);
                let src = Mac::src_of(f).unwrap_or(back.via_mac);
                frame::set_macs(f, back.via_mac, src);
                self.counters.returned += 1;
                Steer::Peer {
                    vni,
                    vtep: back.via,
                }
            }
            (None, None) => self.drop(MeshDrop::NoFlow),
        }
    }

    fn answer_dns(&mut self, vni: u32, flow: &frame::Flow, f: &[u8], reply: &mut Vec<u8>) -> Steer {
        let Some(net) = self.networks.get(&vni) else {
            return self.drop(MeshDrop::NoRoute);
        };
        let Some(payload) = udp_payload(f) else {
            return self.drop(MeshDrop::BadDns);
        };
        let mut answer = Vec::new();
        let names = &net.names;
        let ok = dns::respond(
            payload,
            |name| match names.get(name) {
                Some((addrs, ttl)) => dns::Answer::Addresses {
                    addrs: addrs.clone(),
                    ttl: *ttl,
                },
                None => dns::Answer::Refused,
            },
            &mut answer,
        );
        if !ok {
            return self.drop(MeshDrop::BadDns);
        }
        let Some(client_mac) = Mac::src_of(f) else {
            return self.drop(MeshDrop::BadDns);
        };
        reply.clear();
        let builder = etherparse::PacketBuilder::ethernet2(net.router.0, client_mac.0)
            .ipv4(net.gateway.octets(), flow.src.ip().octets(), 64)
            .udp(DNS_PORT, flow.src.port());
        if builder.write(reply, &answer).is_err() {
            return self.drop(MeshDrop::BadDns);
        }
        self.counters.dns += 1;
        Steer::Reply
    }
}

/// The UDP payload of a frame [`frame::parse`] read as UDP.
fn udp_payload(f: &[u8]) -> Option<&[u8]> {
    let ihl = usize::from(f.get(14)? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*f.get(16)?, *f.get(17)?]));
    f.get(14 + ihl + 8..14 + total)
}

/// Whether a frame from a device is the mesh's: to a network's router.
pub fn claims_from_device(f: &[u8]) -> bool {
    f.len() >= 6 && f[..3] == ROUTER_MAC_PREFIX
}

/// Whether a frame from a peer is the mesh's: from or to a node's device MAC.
pub fn claims_from_peer(f: &[u8]) -> bool {
    f.len() >= 12 && (f[..2] == DEVICE_MAC_PREFIX || f[6..8] == DEVICE_MAC_PREFIX)
}

/// [`Mesh`] for the driver's threads.
#[derive(Debug)]
pub struct MeshHook {
    mesh: Mutex<Mesh>,
}

impl MeshHook {
    /// Wraps `mesh`.
    pub fn new(mesh: Mesh) -> Self {
        MeshHook {
            mesh: Mutex::new(mesh),
        }
    }

    /// Runs `f` on the mesh (configuration, counters).
    pub fn with<R>(&self, f: impl FnOnce(&mut Mesh) -> R) -> R {
        f(&mut self.mesh.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl FrameHook for MeshHook {
    fn claims_from_device(&self, frame: &[u8]) -> bool {
        claims_from_device(frame)
    }

    fn claims_from_peer(&self, frame: &[u8]) -> bool {
        claims_from_peer(frame)
    }

    fn on_device(&self, now: Instant, vni: Vni, frame: &mut [u8], reply: &mut Vec<u8>) -> Steer {
        self.with(|m| m.on_device(now, vni, frame, reply))
    }

    fn on_peer(&self, now: Instant, vni: Vni, vtep: IpAddr, frame: &mut [u8]) -> Steer {
        self.with(|m| m.on_peer(now, vni, vtep, frame))
    }

    fn on_outside(&self, now: Instant, frame: &mut [u8], partial: bool) -> Steer {
        self.with(|m| m.on_outside(now, frame, partial))
    }
}

#[cfg(test)]
mod tests;
