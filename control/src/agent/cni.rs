//! The agent's side of `shoal-cni` (CNI spec 1.1.0): containers attached to user networks.
//! See `docs/networks.md`.
//!
//! One plugin call at a time (they are quick, and this keeps addresses and devices simple).
//! ADD keeps the attachment in the store before it touches a device, so a crash leaves a
//! record the next start reconciles, never an address in use that no record holds:
//! - **ADD**: an attachment that exists is answered again as it is (a runtime retrying);
//!   otherwise an address from this node's blocks (one more block from the manager when they
//!   are full: the only ADD that waits for a manager), the record, the network's device and
//!   bridge (at its first endpoint here), the veth, and the endpoint announced in gossip.
//! - **DEL**: the veth, the record, the announcement (a tombstone); the device and bridge
//!   after the network's last endpoint here. An attachment that does not exist is success.
//! - **CHECK**: the record and the devices as ADD left them.
//! - **GC**: every attachment of the network not in `cni.dev/valid-attachments` is deleted.
//! - **STATUS**: ready when this node is in a swarm, its data path runs and knows the
//!   network.
//!
//! At start, attachments whose namespace is gone are deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::{info, warn};

use super::attach::{self, Announced, Attachment, Attachments};
use super::links::{Attach, LinkError, Links};
use super::services;
use super::Agent;
use crate::api::{CniAnswer, CniCommand, CniError, CniRequest, ManagerReply, ManagerRequest};
use crate::cluster::{ClusterView, UserNetwork};
use crate::id::NodeId;
use crate::store::Store;

/// CNI error codes (spec 1.1.0, "Error").
mod code {
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const BAD_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const BAD_CONFIG: u32 = 7;
    pub const TRY_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
}

/// What the agent holds of user networks: this node's attachments, the endpoints others
/// announce, blocks granted but not yet in the view, and the netlink connection.
#[derive(Default)]
pub struct Endpoints {
    op: tokio::sync::Mutex<()>,
    local: Mutex<Attachments>,
    remote: Mutex<HashMap<(NodeId, u32, Ipv4Addr), Announced>>,
    granted: Mutex<HashMap<String, Vec<Ipv4Net>>>,
    links: tokio::sync::OnceCell<Links>,
    /// Health other nodes announced of their endpoints.
    remote_health: Mutex<HashMap<(NodeId, services::Target), bool>>,
    /// This node's backends' health, as announced, by target.
    local_health: Mutex<HashMap<services::Target, bool>>,
    /// The nodes gossip sees up.
    up: Mutex<Arc<HashSet<NodeId>>>,
    /// The published ports steered to the mesh, as last made, and the underlay interface.
    steered: tokio::sync::Mutex<Option<(String, Vec<super::links::SteerRule>)>>,
    /// The VIPs each attachment's loopback holds, as last made (by attachment key).
    vips: tokio::sync::Mutex<BTreeMap<String, Vec<Ipv4Addr>>>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn err(code: u32, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}

impl Endpoints {
    /// The user networks the data path should carry (see [`attach::segments`]), and the
    /// mesh's view of them (see [`services::mesh_networks`]).
    pub fn segments(
        &self,
        view: &ClusterView,
        me: &NodeId,
    ) -> (
        Vec<shoal_ingress::overlay::SegmentConfig>,
        Vec<shoal_ingress::mesh::MeshNetwork>,
    ) {
        let (local, remote) = (lock(&self.local), lock(&self.remote));
        let segments = attach::segments(view, me, &local, &remote);
        let up = lock(&self.up).clone();
        let mesh = services::mesh_networks(&services::Inputs {
            view,
            me,
            local: &local,
            remote: &remote,
            remote_health: &lock(&self.remote_health),
            local_health: &lock(&self.local_health),
            up: &up,
        });
        (segments, mesh)
    }

    /// Takes the published ports' steering away (on `leave`: a node out of the swarm answers
    /// on none).
    pub async fn unsteer(&self) {
        let mut steered = self.steered.lock().await;
        if let Some((underlay, _)) = steered.as_ref() {
            let done = match self.links().await {
                Ok(links) => {
                    links
                        .set_steering(underlay, shoal_ingress::overlay::MESH_INTERFACE, &[])
                        .await
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => *steered = None,
                Err(e) => warn!("could not take the published ports' steering away: {e}"),
            }
        }
    }

    /// Whether one of this node's attachments has address `ip`.
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        lock(&self.local).iter().any(|a| a.ip == ip)
    }

    /// What gossip says is up now.
    pub fn set_up(&self, up: Arc<HashSet<NodeId>>) {
        *lock(&self.up) = up;
    }

    /// Records this node's check of a backend's target; whether that is news to announce.
    pub fn set_local_health(&self, t: services::Target, healthy: bool) -> bool {
        lock(&self.local_health).insert(t, healthy) != Some(healthy)
    }

    /// Forgets the health of targets no longer checked here; which they were.
    pub fn retain_local_health(&self, keep: &HashSet<services::Target>) -> Vec<services::Target> {
        let mut h = lock(&self.local_health);
        let gone: Vec<services::Target> = h.keys().filter(|k| !keep.contains(k)).copied().collect();
        for k in &gone {
            h.remove(k);
        }
        gone
    }

    /// Brings the published ports' steering and the backends' VIPs in step with the view
    /// (netlink; only what changed). `address` is this node's underlay address.
    pub async fn apply_services(&self, view: &ClusterView, me: &NodeId, address: Ipv4Addr) {
        let (_, mesh) = self.segments(view, me);
        let rules = services::steer_rules(&mesh, &[address]);
        let links = match self.links().await {
            Ok(l) => l,
            Err(e) => {
                warn!("services: no netlink: {e}");
                return;
            }
        };
        {
            let mut steered = self.steered.lock().await;
            if steered.as_ref().map(|(_, r)| r) != Some(&rules) {
                let made = match links.interface_with(address).await {
                    Ok(Some(underlay)) => links
                        .set_steering(&underlay, shoal_ingress::overlay::MESH_INTERFACE, &rules)
                        .await
                        .map(|()| underlay),
                    Ok(None) => Err(LinkError::NotFound {
                        name: format!("(the interface with {address})"),
                        ns: super::links::Namespace::Node,
                    }),
                    Err(e) => Err(e),
                };
                match made {
                    Ok(underlay) => *steered = Some((underlay, rules)),
                    Err(e) => warn!("could not steer the published ports: {e}"),
                }
            }
        }
        let wanted = services::local_vips(view, &lock(&self.local));
        let mut held = self.vips.lock().await;
        held.retain(|k, _| wanted.contains_key(k));
        for (key, vips) in wanted {
            let now = held.get(&key).cloned().unwrap_or_default();
            if now == vips {
                continue;
            }
            let Some(a) = lock(&self.local).get(&key).cloned() else {
                continue;
            };
            let path = PathBuf::from(&a.netns);
            match links.set_loopback_vips(&path, &a.ifname, &vips).await {
                Ok(()) => {
                    held.insert(key, vips);
                }
                Err(e) => {
                    warn!(container = %a.container_id, "could not give a backend its VIPs: {e}")
                }
            }
        }
    }

    /// The endpoints of `net` live as far as this node knows: its own, and those of other
    /// nodes in `view` that have not left (announced inside their blocks).
    pub fn count(&self, view: &ClusterView, me: &NodeId, net: &UserNetwork) -> usize {
        let local = lock(&self.local).on(&net.id).count();
        local + attach::believed(view, me, net, &lock(&self.remote)).count()
    }

    /// The endpoints of `net` for `network inspect`: this node's, then the believed ones of
    /// other nodes, by address.
    pub fn inspect(
        &self,
        view: &ClusterView,
        me: &NodeId,
        net: &UserNetwork,
    ) -> Vec<crate::api::Endpoint> {
        let hostname = |id: &NodeId| {
            view.node(id)
                .map(|n| n.hostname.clone())
                .unwrap_or_default()
        };
        let mut out: Vec<(Ipv4Addr, crate::api::Endpoint)> = lock(&self.local)
            .on(&net.id)
            .map(|a| {
                (
                    a.ip,
                    crate::api::Endpoint {
                        node_id: me.clone(),
                        hostname: hostname(me),
                        container_id: Some(a.container_id.clone()),
                        mac: shoal_vxlan::wire::Mac(a.mac()).to_string(),
                        ip: format!("{}/{}", a.ip, a.prefix),
                    },
                )
            })
            .collect();
        let remote = lock(&self.remote);
        out.extend(attach::believed(view, me, net, &remote).map(|(a, _)| {
            (
                a.ip,
                crate::api::Endpoint {
                    node_id: a.node.clone(),
                    hostname: hostname(&a.node),
                    container_id: None,
                    mac: shoal_vxlan::wire::Mac(a.mac).to_string(),
                    ip: format!("{}/{}", a.ip, net.subnet.prefix_len()),
                },
            )
        }));
        out.sort_by_key(|(ip, _)| *ip);
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// This node's attachments.
    pub fn local(&self) -> Vec<Attachment> {
        lock(&self.local).iter().cloned().collect()
    }

    /// Takes what gossip says of node `author`'s entry `key`: an endpoint announced, or with
    /// `None`, gone. Whether anything changed.
    pub fn take_entry(&self, author: &NodeId, key: &[u8], value: Option<&[u8]>) -> bool {
        if let Some(t) = services::decode_health_key(key) {
            let mut health = lock(&self.remote_health);
            let k = (author.clone(), t);
            return match value.and_then(|v| services::decode_health(key, v)) {
                Some((_, healthy)) => health.insert(k, healthy) != Some(healthy),
                None => health.remove(&k).is_some(),
            };
        }
        let mut remote = lock(&self.remote);
        match value {
            Some(v) => match attach::decode_entry(author, key, v) {
                Some(a) => remote.insert((a.node.clone(), a.vni, a.ip), a.clone()) != Some(a),
                None => false,
            },
            None => match attach::decode_key(key) {
                Some((vni, ip)) => remote.remove(&(author.clone(), vni, ip)).is_some(),
                None => false,
            },
        }
    }

    /// This node's endpoints as gossip entries (key, version, value).
    pub fn own_entries(&self) -> Vec<(Vec<u8>, u64, Option<Vec<u8>>)> {
        let mut local = lock(&self.local);
        let mut out: Vec<_> = local
            .iter()
            .map(|a| {
                (
                    attach::entry_key(a.vni, a.ip),
                    a.version,
                    Some(a.mac().to_vec()),
                )
            })
            .collect();
        let health: Vec<(services::Target, bool)> = lock(&self.local_health)
            .iter()
            .map(|(k, h)| (*k, *h))
            .collect();
        for (t, healthy) in health {
            let version = local.take_version(now_ms());
            out.push((
                services::health_key(t),
                version,
                Some(vec![u8::from(healthy)]),
            ));
        }
        out
    }

    /// Gossip holds our entry `key` at `version` with `value` (from an earlier run, or a
    /// deletion others did not hear of): what to set it to now, above that version, if it is
    /// not what this node holds.
    pub fn correct_own(
        &self,
        key: &[u8],
        version: u64,
        value: Option<&[u8]>,
    ) -> Option<(u64, Option<Vec<u8>>)> {
        let mut local = lock(&self.local);
        let now: Option<Vec<u8>> = match services::decode_health_key(key) {
            Some(k) => lock(&self.local_health).get(&k).map(|h| vec![u8::from(*h)]),
            None => local
                .iter()
                .find(|a| attach::entry_key(a.vni, a.ip) == key)
                .map(|a| a.mac().to_vec()),
        };
        if now.as_deref() == value {
            return None;
        }
        let next = local.take_version(now_ms().max(version.saturating_add(1)));
        Some((next, now))
    }

    /// Loads this node's attachments from the store.
    pub async fn load(&self, store: &Store) -> Result<usize, crate::store::StoreError> {
        let rows = store.attachments().await?;
        let mut local = lock(&self.local);
        for (key, bytes) in rows {
            match serde_json::from_slice::<Attachment>(&bytes) {
                Ok(a) if a.key() == key => local.insert(a),
                _ => warn!(%key, "an attachment record is damaged; it is ignored"),
            }
        }
        Ok(local.iter().count())
    }

    async fn links(&self) -> Result<&Links, LinkError> {
        self.links.get_or_try_init(Links::new).await
    }

    /// Gives each network with a device here its bridge, with the device on it (after the
    /// data path made or remade the device).
    pub async fn wire_devices(
        &self,
        view: &ClusterView,
        underlay_mtu: u16,
    ) -> Result<(), LinkError> {
        let wanted: Vec<(u32, u16)> = {
            let local = lock(&self.local);
            view.networks
                .iter()
                .filter(|n| local.on(&n.id).next().is_some())
                .map(|n| (n.vni, attach::mtu(n, underlay_mtu)))
                .collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let links = self.links().await?;
        for (vni, mtu) in wanted {
            let bridge = attach::bridge_name(vni);
            links.ensure_bridge(&bridge, u32::from(mtu)).await?;
            links.set_master(&attach::device_name(vni), &bridge).await?;
        }
        Ok(())
    }
}

impl Agent {
    /// Carries out one plugin call.
    pub(crate) async fn cni(&self, req: CniRequest) -> CniAnswer {
        let result = match req.command {
            CniCommand::Add => self.cni_add(&req).await.map(Some),
            CniCommand::Del => self.cni_del(&req).await.map(|()| None),
            CniCommand::Check => self.cni_check(&req).await.map(|()| None),
            CniCommand::Gc => self.cni_gc(&req).await.map(|()| None),
            CniCommand::Status => self.cni_status(&req).map(|()| None),
        };
        match result {
            Ok(v) => CniAnswer::Done(v),
            Err(e) => {
                info!(command = ?req.command, code = e.code, "cni: {}", e.msg);
                CniAnswer::Failed(e)
            }
        }
    }

    /// The network the configuration names, in this node's view.
    fn cni_network(
        &self,
        req: &CniRequest,
    ) -> Result<(crate::store::Membership, UserNetwork), CniError> {
        let m = self.membership.get().ok_or_else(|| {
            err(
                code::TRY_LATER,
                "this node is not in a swarm yet (shoal join)",
            )
        })?;
        let name = req
            .config
            .get("network")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                err(
                    code::BAD_CONFIG,
                    "the network configuration has no \"network\" (the shoal network's name)",
                )
            })?;
        let net = m
            .view
            .networks
            .iter()
            .find(|n| n.name == name || n.id == name)
            .cloned()
            .ok_or_else(|| {
                err(
                    code::BAD_CONFIG,
                    format!("network {name} not found (shoal network ls; create it on a manager with shoal network create)"),
                )
            })?;
        Ok((m, net))
    }

    async fn cni_add(&self, req: &CniRequest) -> Result<Value, CniError> {
        let (container_id, ifname) = ids(req)?;
        let netns = req
            .netns
            .clone()
            .ok_or_else(|| err(code::BAD_ENV, "CNI_NETNS is required for ADD"))?;
        let (m, net) = self.cni_network(req)?;
        if !net.attachable {
            return Err(err(
                code::BAD_CONFIG,
                format!(
                    "network {} not manually attachable (create it with --attachable)",
                    net.name
                ),
            ));
        }
        let version = cni_version(req);
        let dp = self
            .running()
            .data_path
            .clone()
            .ok_or_else(|| err(code::TRY_LATER, "this node's data path is not up yet"))?;
        let _op = self.endpoints.op.lock().await;
        let key = attach::key(&net.id, &container_id, &ifname);
        if let Some(a) = lock(&self.endpoints.local).get(&key) {
            return Ok(a.result(&version));
        }
        let want = wanted_ip(req)?;
        let services = wanted_services(req);
        for name in &services {
            match m.view.service(name) {
                None => {
                    return Err(err(
                        code::BAD_CONFIG,
                        format!("service {name} not found (shoal service ls)"),
                    ))
                }
                Some(s) if s.network != net.id => {
                    return Err(err(
                        code::BAD_CONFIG,
                        format!("service {name} is not on network {}", net.name),
                    ))
                }
                Some(_) => {}
            }
        }
        // The default route goes through this network's router (the way back to clients of
        // published ports), unless the container has one already (another network's).
        let routed = match self.endpoints.links().await {
            Ok(links) => links
                .has_default_route(std::path::Path::new(&netns))
                .await
                .unwrap_or(false),
            Err(_) => false,
        };
        let ip = self.allocate(&m, &net, want).await?;
        let host_ifname = attach::host_ifname(&net.id, &container_id, &ifname);
        let a = Attachment {
            network_id: net.id.clone(),
            vni: net.vni,
            container_id,
            ifname,
            netns,
            ip,
            prefix: net.subnet.prefix_len(),
            gateway: net.gateway,
            host_ifname,
            mtu: attach::mtu(&net, dp.underlay_mtu()),
            default_route: !net.internal && !routed,
            services: services.clone(),
            version: lock(&self.endpoints.local).take_version(now_ms()),
        };
        let record = serde_json::to_vec(&a).map_err(|e| err(code::IO, e.to_string()))?;
        self.store
            .put_attachment(key.clone(), Some(record))
            .await
            .map_err(|e| err(code::IO, format!("could not keep the attachment: {e}")))?;
        lock(&self.endpoints.local).insert(a.clone());
        if let Err(e) = self.plumb(&a).await {
            self.forget(&a).await;
            return Err(e);
        }
        self.announce(&a, true);
        for name in &services {
            if let Err(e) = self.set_backend(name, a.ip, true).await {
                self.detach(&a).await;
                return Err(err(
                    code::TRY_LATER,
                    format!("could not make the container a backend of service {name}: {e}"),
                ));
            }
        }
        info!(network = %net.name, container = %a.container_id, ip = %a.ip, "endpoint attached");
        Ok(a.result(&version))
    }

    /// An address for a new endpoint of `net`: from this node's blocks, asking the manager
    /// for one more when they are full.
    async fn allocate(
        &self,
        m: &crate::store::Membership,
        net: &UserNetwork,
        want: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, CniError> {
        let granted: Vec<Ipv4Net> = lock(&self.endpoints.granted)
            .get(&net.id)
            .cloned()
            .unwrap_or_default();
        let me = &m.node_id;
        let first = lock(&self.endpoints.local).allocate(net, me, &granted, None, want);
        match (first, want) {
            (Ok(ip), _) => Ok(ip),
            (Err(attach::AllocError::Exhausted(_)), None) => {
                let more = self.address_block(m, &net.name).await.map_err(|e| {
                    err(
                        code::TRY_LATER,
                        format!("no free address on this node and no new block: {e}"),
                    )
                })?;
                lock(&self.endpoints.granted).insert(net.id.clone(), more.clone());
                lock(&self.endpoints.local)
                    .allocate(net, me, &more, None, None)
                    .map_err(|e| err(code::TRY_LATER, e.to_string()))
            }
            (Err(attach::AllocError::NotOurs { .. }), Some(ip)) => {
                // Another node's address (a container that moved here): the manager gives it
                // to this node, and from then on only this node's endpoint at it is believed.
                self.assign_address(m, &net.name, ip)
                    .await
                    .map_err(|e| err(code::TRY_LATER, format!("address {ip}: {e}")))?;
                lock(&self.endpoints.local)
                    .allocate(net, me, &granted, Some(ip), Some(ip))
                    .map_err(|e| err(code::BAD_CONFIG, e.to_string()))
            }
            (Err(e), _) => Err(err(code::BAD_CONFIG, e.to_string())),
        }
    }

    /// Asks the manager to assign the fixed address `ip` of network `name` to this node.
    async fn assign_address(
        &self,
        m: &crate::store::Membership,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<(), String> {
        let request = ManagerRequest::AssignAddress {
            network: name.to_owned(),
            ip,
        };
        let reply = self
            .ask_manager(m, request, |manager| async move {
                manager.assign_address(&m.node_id, name, ip).await
            })
            .await?;
        match reply {
            ManagerReply::Ok => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// One more address block of network `name` for this node, from the manager.
    async fn address_block(
        &self,
        m: &crate::store::Membership,
        name: &str,
    ) -> Result<Vec<Ipv4Net>, String> {
        let request = ManagerRequest::AddressBlock {
            network: name.to_owned(),
        };
        let reply = self
            .ask_manager(m, request, |manager| async move {
                manager.address_block(&m.node_id, name).await
            })
            .await?;
        match reply {
            ManagerReply::Blocks(blocks) => {
                Ok(blocks.iter().filter_map(|b| b.parse().ok()).collect())
            }
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Makes this node's endpoint at `ip` a backend of service `service` (`present`), or no
    /// longer one: the call the CNI path makes for a container attached with
    /// `SHOAL_SERVICE=NAME`. A service the view does not have is refused here at once
    /// (`service NAME not found`), as is an address that is not this node's (by the manager).
    pub(crate) async fn set_backend(
        &self,
        service: &str,
        ip: Ipv4Addr,
        present: bool,
    ) -> Result<(), String> {
        let m = self
            .membership
            .get()
            .ok_or_else(|| super::NOT_IN_SWARM.to_owned())?;
        if m.view.service(service).is_none() {
            return Err(
                crate::manager::services::ServiceError::NotFound(service.to_owned()).to_string(),
            );
        }
        let request = ManagerRequest::SetBackend {
            service: service.to_owned(),
            ip,
            present,
        };
        let m = &m;
        let reply = self
            .ask_manager(m, request, |manager| async move {
                manager.set_backend(&m.node_id, service, ip, present).await
            })
            .await?;
        match reply {
            ManagerReply::Ok => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// The IP of a local container (by ID or unique prefix) on service `service`'s network,
    /// for `service backend add|rm SERVICE CONTAINER`; `None` when `endpoint` names none.
    pub(crate) fn local_endpoint(
        &self,
        view: &ClusterView,
        service: &str,
        endpoint: &str,
    ) -> Result<Option<Ipv4Addr>, String> {
        let Some(s) = view.service(service).or_else(|| {
            let mut by_id = view.services.iter().filter(|s| s.id.starts_with(service));
            match (by_id.next(), by_id.next()) {
                (Some(s), None) => Some(s),
                _ => None,
            }
        }) else {
            return Ok(None);
        };
        lock(&self.endpoints.local).container_ip(&s.network, endpoint)
    }

    /// `request` for this node: to its own manager when it leads (`local`), else over mTLS to
    /// a manager of the view.
    async fn ask_manager<'a, F, Fut>(
        &self,
        m: &'a crate::store::Membership,
        request: ManagerRequest,
        local: F,
    ) -> Result<ManagerReply, String>
    where
        F: FnOnce(Arc<crate::manager::Manager>) -> Fut,
        Fut: std::future::Future<Output = Result<ManagerReply, crate::manager::AdminError>> + 'a,
    {
        match self.running().manager.clone() {
            Some(manager) => local(manager).await.map_err(|e| e.to_string()),
            None => tokio::time::timeout(super::REQUEST_TIMEOUT, async {
                let (mut tls, addr) = super::connect_member(m).await?;
                super::call(&mut tls, addr, &request).await
            })
            .await
            .map_err(|_| "the manager did not answer in time".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        }
    }

    /// The devices for an attachment kept in the store: the network's device and bridge,
    /// the veth into the container.
    async fn plumb(&self, a: &Attachment) -> Result<(), CniError> {
        self.sync_networks().map_err(|e| {
            err(
                code::IO,
                format!("the data path could not take the network: {e}"),
            )
        })?;
        let m = self
            .membership
            .get()
            .ok_or_else(|| err(code::TRY_LATER, "this node left the swarm"))?;
        let mtu = self
            .running()
            .data_path
            .as_ref()
            .map_or(crate::agent::datapath::DEFAULT_UNDERLAY_MTU, |dp| {
                dp.underlay_mtu()
            });
        self.endpoints
            .wire_devices(&m.view, mtu)
            .await
            .map_err(|e| link_err(&e))?;
        let links = self.endpoints.links().await.map_err(|e| link_err(&e))?;
        // A veth of ours with no record (an agent that stopped mid-ADD): it goes first.
        let _ = links.delete(&a.host_ifname).await;
        links
            .attach(&attachment_links(a))
            .await
            .map_err(|e| link_err(&e))
    }

    /// Undoes an attachment: the veth, the record, the device and bridge if it was the
    /// network's last here. Errors are logged: what remains is reconciled at the next start.
    async fn forget(&self, a: &Attachment) {
        if let Ok(links) = self.endpoints.links().await {
            if let Err(e) = links.delete(&a.host_ifname).await {
                warn!(veth = %a.host_ifname, "could not delete the veth: {e}");
            }
        }
        if let Err(e) = self.store.put_attachment(a.key(), None).await {
            warn!("could not delete an attachment record: {e}");
        }
        let last = {
            let mut local = lock(&self.endpoints.local);
            local.remove(&a.key());
            let none_left = local.on(&a.network_id).next().is_none();
            none_left
        };
        if let Err(e) = self.sync_networks() {
            warn!("the data path could not follow a detach: {e}");
        }
        if last {
            if let Ok(links) = self.endpoints.links().await {
                let _ = links.delete(&attach::bridge_name(a.vni)).await;
            }
        }
    }

    async fn cni_del(&self, req: &CniRequest) -> Result<(), CniError> {
        let (container_id, ifname) = ids(req)?;
        let m = self.membership.get();
        let name = req
            .config
            .get("network")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // By the network's ID when it is in the view, else any attachment of this container
        // and interface on a network of that name or ID (the network may be gone).
        let _op = self.endpoints.op.lock().await;
        let ids: Vec<String> = m
            .iter()
            .flat_map(|m| m.view.networks.iter())
            .filter(|n| n.name == name || n.id == name)
            .map(|n| n.id.clone())
            .chain(std::iter::once(name.to_owned()))
            .collect();
        let found: Vec<Attachment> = lock(&self.endpoints.local)
            .iter()
            .filter(|a| {
                a.container_id == container_id && a.ifname == ifname && ids.contains(&a.network_id)
            })
            .cloned()
            .collect();
        for a in found {
            self.detach(&a).await;
        }
        Ok(())
    }

    async fn detach(&self, a: &Attachment) {
        // No longer a backend (best effort: the address is gone from gossip either way, and
        // a backend that is no endpoint is no one's).
        for name in &a.services {
            if let Err(e) = self.set_backend(name, a.ip, false).await {
                warn!(service = %name, ip = %a.ip, "could not take the backend out: {e}");
            }
        }
        self.forget(a).await;
        let mut tomb = a.clone();
        tomb.version = lock(&self.endpoints.local).take_version(now_ms());
        self.announce(&tomb, false);
        info!(container = %a.container_id, ip = %a.ip, "endpoint detached");
    }

    async fn cni_check(&self, req: &CniRequest) -> Result<(), CniError> {
        let (container_id, ifname) = ids(req)?;
        let (_, net) = self.cni_network(req)?;
        let key = attach::key(&net.id, &container_id, &ifname);
        let a = lock(&self.endpoints.local)
            .get(&key)
            .cloned()
            .ok_or_else(|| {
                err(
                    code::CONTAINER_UNKNOWN,
                    format!(
                        "container {container_id} has no interface {ifname} on network {}",
                        net.name
                    ),
                )
            })?;
        let links = self.endpoints.links().await.map_err(|e| link_err(&e))?;
        links
            .check(&attachment_links(&a))
            .await
            .map_err(|e| link_err(&e))
    }

    async fn cni_gc(&self, req: &CniRequest) -> Result<(), CniError> {
        let (_, net) = self.cni_network(req)?;
        let valid: Vec<(String, String)> = req
            .config
            .get("cni.dev/valid-attachments")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    v.get("containerID")?.as_str()?.to_owned(),
                    v.get("ifname")?.as_str()?.to_owned(),
                ))
            })
            .collect();
        let _op = self.endpoints.op.lock().await;
        let stale: Vec<Attachment> = lock(&self.endpoints.local)
            .on(&net.id)
            .filter(|a| !valid.contains(&(a.container_id.clone(), a.ifname.clone())))
            .cloned()
            .collect();
        for a in &stale {
            self.detach(a).await;
        }
        if !stale.is_empty() {
            info!(network = %net.name, removed = stale.len(), "cni gc");
        }
        Ok(())
    }

    fn cni_status(&self, req: &CniRequest) -> Result<(), CniError> {
        let unavailable = |msg: &str| err(code::NOT_AVAILABLE, msg);
        self.cni_network(req).map_err(|e| unavailable(&e.msg))?;
        if self.running().data_path.is_none() {
            return Err(unavailable("this node's data path is not up yet"));
        }
        Ok(())
    }

    /// Brings the data path's user networks in step with the view and the endpoints.
    pub(crate) fn sync_networks(&self) -> Result<(), super::datapath::DataPathError> {
        let Some(dp) = self.running().data_path.clone() else {
            return Ok(());
        };
        let sync = || {
            dp.sync_networks(|| match self.membership.get() {
                Some(m) => self.endpoints.segments(&m.view, &m.node_id),
                None => (Vec::new(), Vec::new()),
            })
        };
        // Removing a device waits for its threads (up to about 100 ms): not on a worker the
        // other tasks need.
        let synced = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(sync),
            _ => sync(),
        };
        if let Some(m) = self.membership.get() {
            if let Some(std::net::IpAddr::V4(address)) = m.view.node(&m.node_id).map(|n| n.addr) {
                let endpoints = self.endpoints.clone();
                tokio::spawn(async move {
                    endpoints.apply_services(&m.view, &m.node_id, address).await;
                });
            }
        }
        synced
    }

    /// Checks this node's backends ([`services::checks`]) and announces their health (a
    /// signed `hc` gossip entry each) when it changes, taking them out of (or back into) this
    /// node's mesh at once. Runs for the agent's life.
    pub(crate) async fn run_health(self: Arc<Self>) {
        use std::time::{Duration, Instant};
        struct Due {
            state: services::CheckState,
            next: Instant,
            running: bool,
            retries: u32,
        }
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(services::Target, bool)>();
        let mut due: HashMap<services::Target, Due> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(m) = self.membership.get() else { continue };
                    let checks = services::checks(&m.view, &lock(&self.endpoints.local));
                    let keep: HashSet<services::Target> = checks.iter().map(|c| c.target).collect();
                    due.retain(|k, _| keep.contains(k));
                    for t in self.endpoints.retain_local_health(&keep) {
                        self.announce_health(t, None);
                    }
                    let now = Instant::now();
                    for c in checks {
                        let d = due.entry(c.target).or_insert(Due {
                            state: services::CheckState::new(),
                            next: now,
                            running: false,
                            retries: c.retries,
                        });
                        d.retries = c.retries;
                        if d.running || now < d.next {
                            continue;
                        }
                        d.running = true;
                        d.next = now + c.interval;
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let netns = std::path::Path::new(&c.netns);
                            // A refused connection fails at once; a slow one gets a second
                            // (a busy node is not a dead backend).
                            let limit = c.interval.max(Duration::from_secs(1));
                            let (_, ip, port) = c.target;
                            let addr = std::net::SocketAddr::new(ip.into(), port);
                            let ok = super::links::connects_in(netns, addr, limit).await;
                            let _ = tx.send((c.target, ok));
                        });
                    }
                }
                Some((key, ok)) = rx.recv() => {
                    let Some(d) = due.get_mut(&key) else { continue };
                    d.running = false;
                    d.state.take(ok, d.retries);
                    let healthy = d.state.healthy;
                    if self.endpoints.set_local_health(key, healthy) {
                        if !healthy {
                            warn!(ip = %key.1, port = key.2, "a backend failed its health check");
                        } else {
                            info!(ip = %key.1, port = key.2, "a backend passes its health check");
                        }
                        self.announce_health(key, Some(healthy));
                        if let Err(e) = self.sync_networks() {
                            warn!("data path could not follow a backend's health: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Tells the cluster of a backend's health (`None`: no longer checked here).
    fn announce_health(&self, t: services::Target, healthy: Option<bool>) {
        let Some(gossip) = self.running().gossip.clone() else {
            return;
        };
        let key = services::health_key(t);
        let version = lock(&self.endpoints.local).take_version(now_ms());
        let value = healthy.map(|h| vec![u8::from(h)]);
        tokio::spawn(async move { super::gossip::announce(&gossip, key, version, value).await });
    }

    /// Tells the cluster of an attachment (or, `live` false, that it is gone).
    fn announce(&self, a: &Attachment, live: bool) {
        let Some(gossip) = self.running().gossip.clone() else {
            return;
        };
        let value = live.then(|| a.mac().to_vec());
        let key = attach::entry_key(a.vni, a.ip);
        let version = a.version;
        tokio::spawn(async move { super::gossip::announce(&gossip, key, version, value).await });
    }

    /// On `leave`: every container is detached (its veth, its record), every bridge goes,
    /// and the endpoints other nodes announced are forgotten.
    pub(crate) async fn detach_all(&self) {
        let _op = self.endpoints.op.lock().await;
        for a in self.endpoints.local() {
            self.forget(&a).await;
        }
        lock(&self.endpoints.remote).clear();
        lock(&self.endpoints.granted).clear();
        self.endpoints.unsteer().await;
    }

    /// At start: attachments whose namespace is gone are deleted (the container went while
    /// the agent was down).
    pub(crate) async fn reconcile_attachments(&self) {
        let gone: Vec<Attachment> = lock(&self.endpoints.local)
            .iter()
            .filter(|a| !std::path::Path::new(&a.netns).exists())
            .cloned()
            .collect();
        for a in &gone {
            self.detach(a).await;
        }
        if !gone.is_empty() {
            info!(
                removed = gone.len(),
                "attachments whose container is gone were removed"
            );
        }
    }
}

/// `CNI_CONTAINERID` and `CNI_IFNAME`, required.
fn ids(req: &CniRequest) -> Result<(String, String), CniError> {
    let c = req
        .container_id
        .clone()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| err(code::BAD_ENV, "CNI_CONTAINERID is required"))?;
    let i = req
        .ifname
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| err(code::BAD_ENV, "CNI_IFNAME is required"))?;
    Ok((c, i))
}

/// The configuration's `cniVersion` (the result is given in it).
fn cni_version(req: &CniRequest) -> String {
    req.config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.1.0")
        .to_owned()
}

/// A fixed address asked for: `runtimeConfig.ips` (the `ips` capability) or `IP=` in
/// `CNI_ARGS`.
/// The services an ADD makes the container a backend of: `SHOAL_SERVICE=NAME[,NAME...]` in
/// `CNI_ARGS`.
fn wanted_services(req: &CniRequest) -> Vec<String> {
    req.args
        .as_deref()
        .and_then(|args| {
            args.split(';')
                .find_map(|kv| kv.strip_prefix("SHOAL_SERVICE="))
        })
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn wanted_ip(req: &CniRequest) -> Result<Option<Ipv4Addr>, CniError> {
    let from_caps = req
        .config
        .pointer("/runtimeConfig/ips")
        .and_then(Value::as_array)
        .and_then(|ips| ips.first())
        .and_then(Value::as_str)
        .map(|s| s.split('/').next().unwrap_or(s).to_owned());
    let from_args = req.args.as_deref().and_then(|args| {
        args.split(';')
            .find_map(|kv| kv.strip_prefix("IP="))
            .map(str::to_owned)
    });
    match from_caps.or(from_args) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| err(code::BAD_CONFIG, format!("{s} is not an IPv4 address"))),
    }
}

fn attachment_links(a: &Attachment) -> Attach {
    Attach {
        bridge: attach::bridge_name(a.vni),
        host_ifname: a.host_ifname.clone(),
        netns: PathBuf::from(&a.netns),
        ifname: a.ifname.clone(),
        mac: a.mac(),
        address: Ipv4Net::new(a.ip, a.prefix).unwrap_or_else(|_| Ipv4Net::from(a.ip)),
        gateway: a.default_route.then_some(a.gateway),
        mtu: u32::from(a.mtu),
    }
}

fn link_err(e: &LinkError) -> CniError {
    match e {
        LinkError::NoNetns { .. } => err(code::CONTAINER_UNKNOWN, e.to_string()),
        _ => err(code::IO, e.to_string()),
    }
}
