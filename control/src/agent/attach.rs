//! The pure part of attaching containers to user networks (`docs/networks.md`): this node's
//! attachments and their addresses, the endpoints other nodes announce, and from both the
//! user networks the data path carries. No IO: `agent::cni` does the netlink, the store and
//! gossip around it.
//!
//! - **Addresses** come from this node's blocks of the network's subnet (granted by the
//!   manager, in the view): the lowest free one, never the subnet's network or broadcast
//!   address or the gateway. No manager is asked while a block has room.
//! - **An attachment** is keyed as the CNI spec's GC keys it: (network, container ID,
//!   interface name). Its MAC is derived from its address (`02:42` and the four bytes, as
//!   docker and as shoal does for nodes).
//! - **Remote endpoints** are what other nodes announce in gossip, each signed by its node.
//!   One is believed only while its address lies in a block the view gives that node on that
//!   network: a member cannot claim another node's addresses, and a node that left, was
//!   removed or gave its block back loses its endpoints with the view that says so.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use shoal_ingress::network::{mac_for, overlay_mtu, NetworkSpec};
use shoal_ingress::overlay::{RemoteEndpoint, SegmentConfig};

use crate::cluster::{ClusterView, UserNetwork};
use crate::id::NodeId;

/// One container's attachment to a user network, as this node keeps it (in its store, one
/// record each, written before ADD answers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The network's ID.
    pub network_id: String,
    /// Its VNI.
    pub vni: u32,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface's name in the container.
    pub ifname: String,
    /// `CNI_NETNS`: the container's network namespace.
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The network's prefix length.
    pub prefix: u8,
    /// The network's gateway.
    pub gateway: Ipv4Addr,
    /// The host end of its veth pair.
    pub host_ifname: String,
    /// The interface MTU.
    pub mtu: u16,
    /// Whether the container's default route goes through the network's router (networks
    /// that are not `--internal`: the way back to clients of published ports).
    #[serde(default)]
    pub default_route: bool,
    /// The services it is a backend of (`SHOAL_SERVICE` in `CNI_ARGS`).
    #[serde(default)]
    pub services: Vec<String>,
    /// The version of its announcement: it grows with every change this node makes, across
    /// restarts (see [`next_version`]).
    pub version: u64,
}

impl Attachment {
    /// Its store key.
    pub fn key(&self) -> String {
        key(&self.network_id, &self.container_id, &self.ifname)
    }

    /// Its MAC, derived from its address.
    pub fn mac(&self) -> [u8; 6] {
        mac_for(self.ip).0
    }

    /// The CNI result for it, in `cni_version`: the container's interface, its address on
    /// the network's subnet, the network's router (at the gateway) as its nameserver and, on
    /// networks that are not `--internal`, its default route (see `docs/services.md`).
    pub fn result(&self, cni_version: &str) -> serde_json::Value {
        let gateway = self.gateway.to_string();
        // The router answers DNS at the gateway on every node: service names, and REFUSED
        // for the rest (a stub resolver then asks its next server).
        let routes = if self.default_route {
            serde_json::json!([{"dst": "0.0.0.0/0", "gw": gateway}])
        } else {
            serde_json::json!([])
        };
        serde_json::json!({
            "cniVersion": cni_version,
            "interfaces": [{
                "name": self.ifname,
                "mac": mac_for(self.ip).to_string(),
                "mtu": self.mtu,
                "sandbox": self.netns,
            }],
            "ips": [{
                "address": format!("{}/{}", self.ip, self.prefix),
                "gateway": gateway,
                "interface": 0,
            }],
            "routes": routes,
            "dns": {"nameservers": [gateway]},
        })
    }
}

/// The store key of an attachment.
pub fn key(network_id: &str, container_id: &str, ifname: &str) -> String {
    format!("{network_id}/{container_id}/{ifname}")
}

/// The host end of an attachment's veth pair: `shv` and 12 hex digits of a digest of its key
/// (15 bytes at most, as interface names must be; the same name on a retry).
pub fn host_ifname(network_id: &str, container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(key(network_id, container_id, ifname).as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("shv{hex}")
}

/// The TAP device of a user network on a node with endpoints of it.
pub fn device_name(vni: u32) -> String {
    format!("shn{vni}")
}

/// The bridge of a user network on a node with endpoints of it.
pub fn bridge_name(vni: u32) -> String {
    format!("shb{vni}")
}

/// A version above `last` and at least `now_ms` (wall-clock milliseconds): versions keep
/// growing across restarts of the agent as long as the clock does not go back by more than
/// the time between them, and never repeat within a run.
pub fn next_version(last: u64, now_ms: u64) -> u64 {
    now_ms.max(last.saturating_add(1))
}

/// Why no address could be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every address of this node's blocks is taken (ask the manager for another block).
    #[error("no free address in this node's blocks of network {0}")]
    Exhausted(String),
    /// The address asked for is not in this node's blocks.
    #[error("address {ip} is not in this node's blocks of network {network}; a fixed address must come from them")]
    NotOurs {
        /// The network.
        network: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// The address asked for is taken, or is the network's, broadcast or gateway address.
    #[error("address {ip} of network {network} is in use or reserved")]
    InUse {
        /// The network.
        network: String,
        /// The address.
        ip: Ipv4Addr,
    },
}

/// Whether `ip` may be given to an endpoint of `net`: inside its subnet, not its network or
/// broadcast address, not its gateway.
fn assignable(net: &UserNetwork, ip: Ipv4Addr) -> bool {
    net.subnet.contains(&ip)
        && ip != net.subnet.network()
        && ip != net.subnet.broadcast()
        && ip != net.gateway
}

/// This node's attachments.
#[derive(Debug, Default, Clone)]
pub struct Attachments {
    by_key: BTreeMap<String, Attachment>,
    last_version: u64,
}

impl Attachments {
    /// The attachment with `key`.
    pub fn get(&self, key: &str) -> Option<&Attachment> {
        self.by_key.get(key)
    }

    /// Every attachment.
    pub fn iter(&self) -> impl Iterator<Item = &Attachment> {
        self.by_key.values()
    }

    /// The attachments on network `network_id`.
    pub fn on(&self, network_id: &str) -> impl Iterator<Item = &Attachment> + '_ {
        let network_id = network_id.to_owned();
        self.by_key
            .values()
            .filter(move |a| a.network_id == network_id)
    }

    /// The address on network `network_id` of the container whose ID is or starts with
    /// `container` (`service backend add SERVICE CONTAINER`): `None` when no container here
    /// matches; an error when several do.
    pub fn container_ip(
        &self,
        network_id: &str,
        container: &str,
    ) -> Result<Option<Ipv4Addr>, String> {
        if container.is_empty() {
            return Ok(None);
        }
        let exact: Vec<&Attachment> = self
            .on(network_id)
            .filter(|a| a.container_id == container)
            .collect();
        let found: Vec<&Attachment> = if exact.is_empty() {
            self.on(network_id)
                .filter(|a| a.container_id.starts_with(container))
                .collect()
        } else {
            exact
        };
        match found.as_slice() {
            [] => Ok(None),
            [a] => Ok(Some(a.ip)),
            [a, ..] if found.iter().all(|b| b.container_id == a.container_id) => Err(format!(
                "container {container} has several interfaces on the service's network: give the IP"
            )),
            _ => Err(format!(
                "container {container} is ambiguous ({} containers here start with it); type more of the ID",
                found.len()
            )),
        }
    }

    /// Adds (or replaces) an attachment.
    pub fn insert(&mut self, a: Attachment) {
        self.last_version = self.last_version.max(a.version);
        self.by_key.insert(a.key(), a);
    }

    /// Removes the attachment with `key`.
    pub fn remove(&mut self, key: &str) -> Option<Attachment> {
        self.by_key.remove(key)
    }

    /// The next announcement version at `now_ms` (see [`next_version`]); it is taken.
    pub fn take_version(&mut self, now_ms: u64) -> u64 {
        self.last_version = next_version(self.last_version, now_ms);
        self.last_version
    }

    /// An address for a new endpoint of `net` on node `me`: `want` if given, free and this
    /// node's (see [`UserNetwork::holds`]; `taken` is an address just assigned to it that the
    /// view does not show yet), else the lowest free one of its blocks and of `more` (blocks
    /// just granted) that no other node has by assignment.
    pub fn allocate(
        &self,
        net: &UserNetwork,
        me: &NodeId,
        more: &[Ipv4Net],
        taken: Option<Ipv4Addr>,
        want: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, AllocError> {
        let used: std::collections::HashSet<Ipv4Addr> = self.on(&net.id).map(|a| a.ip).collect();
        let free = |ip: Ipv4Addr| assignable(net, ip) && !used.contains(&ip);
        let mut blocks: Vec<Ipv4Net> = net.blocks.get(me).cloned().unwrap_or_default();
        blocks.extend_from_slice(more);
        blocks.sort();
        blocks.dedup();
        let ours = |ip: Ipv4Addr| {
            taken == Some(ip)
                || match net.assigned.get(&ip) {
                    Some(owner) => owner == me,
                    None => blocks.iter().any(|b| b.contains(&ip)),
                }
        };
        if let Some(ip) = want {
            if !ours(ip) {
                return Err(AllocError::NotOurs {
                    network: net.name.clone(),
                    ip,
                });
            }
            return if free(ip) {
                Ok(ip)
            } else {
                Err(AllocError::InUse {
                    network: net.name.clone(),
                    ip,
                })
            };
        }
        blocks
            .iter()
            .flat_map(|b| b.hosts().chain([b.network(), b.broadcast()]))
            .filter(|ip| free(*ip) && ours(*ip))
            .min()
            .ok_or_else(|| AllocError::Exhausted(net.name.clone()))
    }
}

/// An endpoint another node announced (its gossip entry, decoded): believed only as
/// [`segments`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The node that announced it (the entry's author).
    pub node: NodeId,
    /// The network's VNI.
    pub vni: u32,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// The gossip entry of an attachment: its key (`ep`, the VNI, the address) and its value
/// (the MAC). A deleted attachment is the same key with no value.
pub fn entry_key(vni: u32, ip: Ipv4Addr) -> Vec<u8> {
    let mut k = b"ep".to_vec();
    k.extend_from_slice(&vni.to_be_bytes());
    k.extend_from_slice(&ip.octets());
    k
}

/// The network (VNI) and address an endpoint entry's key names; `None` for any other key.
pub fn decode_key(key: &[u8]) -> Option<(u32, Ipv4Addr)> {
    let rest = key.strip_prefix(b"ep")?;
    let vni: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    let ip: [u8; 4] = rest.get(4..)?.try_into().ok()?;
    Some((u32::from_be_bytes(vni), Ipv4Addr::from(ip)))
}

/// Decodes an endpoint entry of `node`; `None` for any other key or a malformed value.
pub fn decode_entry(node: &NodeId, key: &[u8], value: &[u8]) -> Option<Announced> {
    let (vni, ip) = decode_key(key)?;
    let mac: [u8; 6] = value.try_into().ok()?;
    Some(Announced {
        node: node.clone(),
        vni,
        ip,
        mac,
    })
}

/// The user networks the data path should carry on node `me`: every user network of the
/// view; a device for those with local attachments; and the remote endpoints believed: an
/// announced endpoint is kept only if its node is in the view, has not left, and holds its
/// address ([`UserNetwork::holds`]: by a fixed assignment, or in one of its blocks that no
/// assignment took), so no two nodes are believed for one address.
pub fn segments(
    view: &ClusterView,
    me: &NodeId,
    local: &Attachments,
    remote: &HashMap<(NodeId, u32, Ipv4Addr), Announced>,
) -> Vec<SegmentConfig> {
    view.networks
        .iter()
        .map(|net| {
            let mut endpoints: Vec<RemoteEndpoint> = believed(view, me, net, remote)
                .map(|(a, vtep)| RemoteEndpoint {
                    ip: a.ip,
                    mac: shoal_vxlan::wire::Mac(a.mac),
                    vtep,
                })
                .collect();
            endpoints.sort_by_key(|e| (e.ip, e.mac.0));
            SegmentConfig {
                spec: NetworkSpec {
                    name: net.name.clone(),
                    vni: net.vni,
                    subnet: net.subnet,
                    encrypted: net.encrypted,
                },
                device: local.on(&net.id).next().map(|_| device_name(net.vni)),
                endpoints,
                // The router answers DNS and the VIPs on every network, internal or not.
                gateway: Some(net.gateway),
                vips: view
                    .services
                    .iter()
                    .filter(|s| s.network == net.id)
                    .filter(|s| s.endpoint_mode == crate::cluster::EndpointMode::Vip)
                    .filter_map(|s| s.vip)
                    .collect(),
            }
        })
        .collect()
}

/// The endpoints of `net` other nodes announced that node `me` believes, each with its
/// node's VTEP: its node is in the view, has not left and holds the address
/// ([`UserNetwork::holds`]), and the address may be given to an endpoint at all.
pub fn believed<'a>(
    view: &'a ClusterView,
    me: &'a NodeId,
    net: &'a UserNetwork,
    remote: &'a HashMap<(NodeId, u32, Ipv4Addr), Announced>,
) -> impl Iterator<Item = (&'a Announced, std::net::IpAddr)> + 'a {
    remote
        .values()
        .filter(move |a| a.vni == net.vni && &a.node != me)
        .filter_map(move |a| {
            let node = view.node(&a.node).filter(|n| !n.left)?;
            (net.holds(&a.node, a.ip) && assignable(net, a.ip)).then_some((a, node.addr))
        })
}

/// The MTU of a user network's interfaces on an underlay of `underlay_mtu`.
pub fn mtu(net: &UserNetwork, underlay_mtu: u16) -> u16 {
    overlay_mtu(underlay_mtu, net.encrypted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Role;
    use crate::manager::networks;
    use crate::manager::state::tests::{init_cmd, node};
    use crate::manager::state::{Command, State};

    /// A view with nodes 1 (the manager), 2 and 3 (3 left), network `web` on 10.9.0.0/24
    /// with a block for node 1 and one for node 2.
    fn view() -> ClusterView {
        let mut s = State::default();
        s.apply(init_cmd()).unwrap();
        s.apply(Command::AddNode(Box::new(node(2, Role::Worker))))
            .unwrap();
        s.apply(Command::AddNode(Box::new(node(3, Role::Worker))))
            .unwrap();
        s.apply(Command::CreateNetwork(Box::new(networks::tests::spec(
            "web",
            Some("10.9.0.0/24"),
        ))))
        .unwrap();
        for n in [1, 2, 3] {
            s.apply(Command::GrantBlock {
                network: "web".into(),
                node: NodeId::from_random(n),
            })
            .unwrap();
        }
        let mut v = s.view().unwrap();
        for n in v.nodes.iter_mut() {
            if n.id == NodeId::from_random(3) {
                n.left = true;
            }
        }
        v
    }

    fn web(v: &ClusterView) -> &UserNetwork {
        v.networks.iter().find(|n| n.name == "web").unwrap()
    }

    fn attachment(net: &UserNetwork, container: &str, ip: Ipv4Addr) -> Attachment {
        Attachment {
            network_id: net.id.clone(),
            vni: net.vni,
            container_id: container.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{container}"),
            ip,
            prefix: net.subnet.prefix_len(),
            gateway: net.gateway,
            host_ifname: host_ifname(&net.id, container, "eth0"),
            mtu: 1414,
            default_route: true,
            services: Vec::new(),
            version: 1,
        }
    }

    #[test]
    fn the_cni_result_routes_through_the_router_only_when_asked() {
        let v = view();
        let mut a = attachment(web(&v), "c1", Ipv4Addr::new(10, 0, 0, 2));
        let routed = a.result("1.1.0");
        assert_eq!(
            routed["routes"],
            serde_json::json!([{"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}])
        );
        a.default_route = false;
        assert_eq!(a.result("1.1.0")["routes"], serde_json::json!([]));
    }

    #[test]
    fn a_container_id_or_prefix_names_its_address_on_the_network() {
        let v = view();
        let net = web(&v);
        let mut local = Attachments::default();
        local.insert(attachment(net, "abc123", Ipv4Addr::new(10, 9, 0, 2)));
        local.insert(attachment(net, "abd456", Ipv4Addr::new(10, 9, 0, 3)));
        assert_eq!(
            local.container_ip(&net.id, "abc123"),
            Ok(Some(Ipv4Addr::new(10, 9, 0, 2)))
        );
        assert_eq!(
            local.container_ip(&net.id, "abd"),
            Ok(Some(Ipv4Addr::new(10, 9, 0, 3)))
        );
        assert!(local
            .container_ip(&net.id, "ab")
            .unwrap_err()
            .contains("ambiguous"));
        assert_eq!(local.container_ip(&net.id, "zz"), Ok(None));
        assert_eq!(local.container_ip("other", "abc123"), Ok(None));
        assert_eq!(local.container_ip(&net.id, ""), Ok(None));
    }

    #[test]
    fn addresses_are_the_lowest_free_of_our_blocks_never_reserved_ones() {
        let v = view();
        let net = web(&v);
        let me = NodeId::from_random(1);
        assert_eq!(
            net.blocks[&me],
            vec!["10.9.0.0/28".parse::<Ipv4Net>().unwrap()]
        );
        let mut atts = Attachments::default();
        // .0 is the network's address, .1 its gateway.
        let first = atts.allocate(net, &me, &[], None, None).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 9, 0, 2));
        atts.insert(attachment(net, "a", first));
        assert_eq!(
            atts.allocate(net, &me, &[], None, None).unwrap(),
            Ipv4Addr::new(10, 9, 0, 3)
        );
        // The whole block: .2 to .15 (the block's last address is not the subnet's
        // broadcast address, so it is a host like any other).
        for i in 3..=15 {
            let ip = atts.allocate(net, &me, &[], None, None).unwrap();
            assert_eq!(ip, Ipv4Addr::new(10, 9, 0, i));
            atts.insert(attachment(net, &format!("c{i}"), ip));
        }
        assert_eq!(
            atts.allocate(net, &me, &[], None, None),
            Err(AllocError::Exhausted("web".into()))
        );
        // A freed address is given again.
        atts.remove(&key(&net.id, "c7", "eth0"));
        assert_eq!(
            atts.allocate(net, &me, &[], None, None).unwrap(),
            Ipv4Addr::new(10, 9, 0, 7)
        );
    }

    #[test]
    fn a_fixed_address_must_be_ours_and_free() {
        let v = view();
        let net = web(&v);
        let me = NodeId::from_random(1);
        let mut atts = Attachments::default();
        let five = Ipv4Addr::new(10, 9, 0, 5);
        assert_eq!(atts.allocate(net, &me, &[], None, Some(five)), Ok(five));
        atts.insert(attachment(net, "a", five));
        assert!(matches!(
            atts.allocate(net, &me, &[], None, Some(five)),
            Err(AllocError::InUse { .. })
        ));
        assert!(matches!(
            atts.allocate(net, &me, &[], None, Some(net.gateway)),
            Err(AllocError::InUse { .. })
        ));
        // Node 2's block.
        assert!(matches!(
            atts.allocate(net, &me, &[], None, Some(Ipv4Addr::new(10, 9, 0, 18))),
            Err(AllocError::NotOurs { .. })
        ));
    }

    #[test]
    fn only_endpoints_inside_their_nodes_blocks_are_believed() {
        let v = view();
        let net = web(&v);
        let me = NodeId::from_random(1);
        let mut remote = HashMap::new();
        let mut add = |node: u128, ip: [u8; 4]| {
            let a = Announced {
                node: NodeId::from_random(node),
                vni: net.vni,
                ip: ip.into(),
                mac: mac_for(ip.into()).0,
            };
            remote.insert((a.node.clone(), a.vni, a.ip), a);
        };
        // Node 2 holds 10.9.0.16/28: its own endpoint is believed.
        add(2, [10, 9, 0, 18]);
        // Node 2 claiming an address of node 1's block: not believed.
        add(2, [10, 9, 0, 3]);
        // Node 3 left: its endpoints go with it.
        add(3, [10, 9, 0, 34]);
        // An unknown node.
        add(9, [10, 9, 0, 50]);
        let segs = segments(&v, &me, &Attachments::default(), &remote);
        assert_eq!(segs.len(), 1);
        let seg = &segs[0];
        assert_eq!(seg.spec.vni, net.vni);
        assert_eq!(seg.device, None, "no local attachment: no device");
        let node2 = v.node(&NodeId::from_random(2)).unwrap().addr;
        assert_eq!(
            seg.endpoints,
            vec![RemoteEndpoint {
                ip: Ipv4Addr::new(10, 9, 0, 18),
                mac: mac_for(Ipv4Addr::new(10, 9, 0, 18)),
                vtep: node2,
            }]
        );
        let mut local = Attachments::default();
        local.insert(attachment(net, "a", Ipv4Addr::new(10, 9, 0, 2)));
        let segs = segments(&v, &me, &local, &remote);
        assert_eq!(
            segs[0].device.as_deref(),
            Some(device_name(net.vni).as_str())
        );
    }

    #[test]
    fn a_fixed_address_moves_belief_to_its_new_node() {
        let mut v = view();
        let me = NodeId::from_random(1);
        let two = NodeId::from_random(2);
        // 10.9.0.5 lies in node 1's block; node 2 is assigned it (a container moved there).
        let moved = Ipv4Addr::new(10, 9, 0, 5);
        let net = v.networks.iter_mut().find(|n| n.name == "web").unwrap();
        assert!(net.holds(&me, moved) && !net.holds(&two, moved));
        networks::assign(net, &two, moved, &Default::default()).unwrap();
        assert!(!net.holds(&me, moved) && net.holds(&two, moved));
        let net = net.clone();
        // Node 1 no longer gives it out, nor takes it by name.
        let mut atts = Attachments::default();
        for i in 2..=4 {
            atts.insert(attachment(
                &net,
                &format!("c{i}"),
                Ipv4Addr::new(10, 9, 0, i),
            ));
        }
        assert_eq!(
            atts.allocate(&net, &me, &[], None, None),
            Ok(Ipv4Addr::new(10, 9, 0, 6))
        );
        assert!(matches!(
            atts.allocate(&net, &me, &[], None, Some(moved)),
            Err(AllocError::NotOurs { .. })
        ));
        // Node 2 may take it, before its view shows the assignment too.
        assert_eq!(
            Attachments::default().allocate(&net, &two, &[], Some(moved), Some(moved)),
            Ok(moved)
        );
        // Node 2's announcement of it is believed, node 1's not.
        let mut remote = HashMap::new();
        for (n, node) in [(2, &two), (1, &me)] {
            let a = Announced {
                node: node.clone(),
                vni: net.vni,
                ip: moved,
                mac: mac_for(moved).0,
            };
            remote.insert((NodeId::from_random(n), a.vni, a.ip), a);
        }
        let three = NodeId::from_random(3);
        let segs = segments(&v, &three, &Attachments::default(), &remote);
        let node2 = v.node(&two).unwrap().addr;
        assert_eq!(
            segs[0].endpoints,
            vec![RemoteEndpoint {
                ip: moved,
                mac: mac_for(moved),
                vtep: node2
            }]
        );
    }

    #[test]
    fn entries_round_trip_and_malformed_ones_are_ignored() {
        let n = NodeId::from_random(4);
        let ip = Ipv4Addr::new(10, 9, 0, 18);
        let k = entry_key(4097, ip);
        let a = decode_entry(&n, &k, &mac_for(ip).0).unwrap();
        assert_eq!((a.vni, a.ip, a.mac), (4097, ip, mac_for(ip).0));
        assert_eq!(decode_entry(&n, &k, &[1, 2, 3]), None);
        assert_eq!(decode_entry(&n, &k[..9], &mac_for(ip).0), None);
        assert_eq!(decode_entry(&n, b"xx\0\0\0\0\0\0\0\0", &[0; 6]), None);
    }

    #[test]
    fn names_fit_interfaces_and_versions_grow() {
        let h = host_ifname("id-web", "0123456789abcdef0123456789abcdef", "eth0");
        assert!(h.len() <= 15 && h.starts_with("shv"), "{h}");
        assert_eq!(
            h,
            host_ifname("id-web", "0123456789abcdef0123456789abcdef", "eth0")
        );
        assert_ne!(
            h,
            host_ifname("id-web", "0123456789abcdef0123456789abcdef", "eth1")
        );
        assert!(device_name(16_777_215).len() <= 15);
        assert!(bridge_name(16_777_215).len() <= 15);
        assert_eq!(next_version(5, 3), 6, "never back, never the same");
        assert_eq!(next_version(5, 100), 100);
        let mut atts = Attachments::default();
        let a = atts.take_version(10);
        let b = atts.take_version(10);
        assert!(b > a);
    }
}
