//! Services as this node's data path serves them (`docs/services.md`): pure functions from
//! the view, the endpoints and their health to the mesh's networks, the published ports to
//! steer, the VIPs each local backend holds, and the health checks this node makes.
//!
//! A backend is an address the service lists (`service backend add`, or `SHOAL_SERVICE` at
//! ADD) that is an endpoint this node believes: one of its own, or one another node announced
//! ([`attach::believed`]). It is healthy unless its node said otherwise (a signed `hc` gossip
//! entry, this module's [`health_key`]) or that node is down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use shoal_ingress::mesh::frame::{TCP, UDP};
use shoal_ingress::mesh::{MeshBackend, MeshNetwork, MeshService, PortMap};
use shoal_vxlan::wire::Mac;

use super::attach::{self, Announced, Attachments};
use super::links::SteerRule;
use crate::cluster::{ClusterView, EndpointMode, Protocol, PublishMode, Service, UserNetwork};
use crate::id::NodeId;

/// What one health check is of: a backend's network (VNI), address and TCP target port. A
/// backend is healthy for a service when each of that service's TCP targets is: one endpoint
/// may back several services, and one's server being down says nothing of another's.
pub type Target = (u32, Ipv4Addr, u16);

/// The gossip entry key of a target's health: `hc`, the VNI, the address, the port. Its value
/// is one byte, 1 healthy, 0 not; no entry means healthy (never checked yet).
pub fn health_key(t: Target) -> Vec<u8> {
    let mut k = b"hc".to_vec();
    k.extend_from_slice(&t.0.to_be_bytes());
    k.extend_from_slice(&t.1.octets());
    k.extend_from_slice(&t.2.to_be_bytes());
    k
}

/// The target and health a health entry says; `None` for any other key or value.
pub fn decode_health(key: &[u8], value: &[u8]) -> Option<(Target, bool)> {
    let t = decode_health_key(key)?;
    match value {
        [0] => Some((t, false)),
        [1] => Some((t, true)),
        _ => None,
    }
}

/// The target of a health entry's key (its value aside).
pub fn decode_health_key(key: &[u8]) -> Option<Target> {
    let b: [u8; 10] = key.strip_prefix(b"hc")?.try_into().ok()?;
    Some((
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        Ipv4Addr::new(b[4], b[5], b[6], b[7]),
        u16::from_be_bytes([b[8], b[9]]),
    ))
}

/// What the functions here read.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The cluster view.
    pub view: &'a ClusterView,
    /// This node.
    pub me: &'a NodeId,
    /// This node's attachments.
    pub local: &'a Attachments,
    /// Endpoints other nodes announced.
    pub remote: &'a HashMap<(NodeId, u32, Ipv4Addr), Announced>,
    /// Health other nodes announced of their endpoints' targets.
    pub remote_health: &'a HashMap<(NodeId, Target), bool>,
    /// This node's checks of its own backends' targets.
    pub local_health: &'a HashMap<Target, bool>,
    /// The nodes gossip sees up (a backend of a node down is not healthy).
    pub up: &'a HashSet<NodeId>,
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => TCP,
        Protocol::Udp => UDP,
    }
}

/// The mesh's networks: every user network, with its router at the gateway and its
/// services, their ports and backends (see the module documentation).
pub fn mesh_networks(i: &Inputs<'_>) -> Vec<MeshNetwork> {
    i.view
        .networks
        .iter()
        .map(|net| {
            let services = i
                .view
                .services
                .iter()
                .filter(|s| s.network == net.id)
                .map(|s| mesh_service(i, net, s))
                .collect();
            MeshNetwork {
                vni: net.vni,
                subnet: net.subnet,
                gateway: net.gateway,
                services,
            }
        })
        .collect()
}

fn mesh_service(i: &Inputs<'_>, net: &UserNetwork, s: &Service) -> MeshService {
    let remote: HashMap<Ipv4Addr, (&Announced, IpAddr)> =
        attach::believed(i.view, i.me, net, i.remote)
            .map(|(a, vtep)| (a.ip, (a, vtep)))
            .collect();
    let targets = tcp_targets(s);
    let passes = |ip: Ipv4Addr, said: &dyn Fn(Target) -> Option<bool>| {
        targets
            .iter()
            .all(|port| said((net.vni, ip, *port)).unwrap_or(true))
    };
    let backends = s
        .backends
        .iter()
        .filter_map(|ip| {
            if let Some(a) = i.local.on(&net.id).find(|a| a.ip == *ip) {
                return Some(MeshBackend {
                    ip: *ip,
                    mac: Mac(a.mac()),
                    node: None,
                    healthy: passes(*ip, &|t| i.local_health.get(&t).copied()),
                });
            }
            let (a, vtep) = remote.get(ip)?;
            let said = passes(*ip, &|t| i.remote_health.get(&(a.node.clone(), t)).copied());
            Some(MeshBackend {
                ip: *ip,
                mac: Mac(a.mac),
                node: Some(*vtep),
                healthy: said && i.up.contains(&a.node),
            })
        })
        .collect();
    MeshService {
        name: s.name.clone(),
        vip: match s.endpoint_mode {
            EndpointMode::Vip => s.vip,
            EndpointMode::Dnsrr => None,
        },
        ports: s
            .ports
            .iter()
            .map(|p| PortMap {
                proto: proto(p.protocol),
                published: p.published,
                target: p.target,
                host_mode: p.mode == PublishMode::Host,
            })
            .collect(),
        backends,
    }
}

/// The published ports this node steers to the mesh, on each of its `addresses`: every
/// ingress-mode port, and host-mode ports of services with a healthy backend here.
pub fn steer_rules(networks: &[MeshNetwork], addresses: &[Ipv4Addr]) -> Vec<SteerRule> {
    let mut rules: Vec<SteerRule> = networks
        .iter()
        .flat_map(|n| &n.services)
        .flat_map(|s| {
            let local = s.backends.iter().any(|b| b.node.is_none() && b.healthy);
            s.ports
                .iter()
                .filter(move |p| !p.host_mode || local)
                .flat_map(|p| addresses.iter().map(move |a| (p.proto, *a, p.published)))
        })
        .collect();
    rules.sort_unstable();
    rules.dedup();
    rules
}

/// The VIPs each of this node's attachments holds (by attachment key): those of the `vip`
/// services of its network that list it as a backend.
pub fn local_vips(view: &ClusterView, local: &Attachments) -> BTreeMap<String, Vec<Ipv4Addr>> {
    local
        .iter()
        .map(|a| {
            let mut vips: Vec<Ipv4Addr> = view
                .services
                .iter()
                .filter(|s| s.network == a.network_id && s.backends.contains(&a.ip))
                .filter(|s| s.endpoint_mode == EndpointMode::Vip)
                .filter_map(|s| s.vip)
                .collect();
            vips.sort_unstable();
            (a.key(), vips)
        })
        .collect()
}

/// A service's TCP target ports (what its backends' checks connect to; a connect proves
/// nothing of UDP).
fn tcp_targets(s: &Service) -> Vec<u16> {
    let mut ports: Vec<u16> = s
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| p.target)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A health check this node makes: one TCP target of one of its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The backend's network, address and target port.
    pub target: Target,
    /// Its container's network namespace.
    pub netns: String,
    /// Between checks (the shortest of the services' with this target).
    pub interval: Duration,
    /// Failures in a row before it is unhealthy (the fewest of those services').
    pub retries: u32,
}

/// The checks of this node's backends: one per TCP target port of each service that lists
/// one of its attachments.
pub fn checks(view: &ClusterView, local: &Attachments) -> Vec<Check> {
    let mut out: BTreeMap<Target, Check> = BTreeMap::new();
    for a in local.iter() {
        for s in view
            .services
            .iter()
            .filter(|s| s.network == a.network_id && s.backends.contains(&a.ip))
        {
            let interval = Duration::from_millis(u64::from(s.health.interval_ms.max(10)));
            let retries = s.health.retries.max(1);
            for port in tcp_targets(s) {
                let target = (a.vni, a.ip, port);
                let c = out.entry(target).or_insert_with(|| Check {
                    target,
                    netns: a.netns.clone(),
                    interval,
                    retries,
                });
                c.interval = c.interval.min(interval);
                c.retries = c.retries.min(retries);
            }
        }
    }
    out.into_values().collect()
}

/// Where a backend's check stands: failures in a row, and what was last announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckState {
    /// Failures since the last success.
    pub failures: u32,
    /// Whether it counts as healthy now.
    pub healthy: bool,
}

impl CheckState {
    /// A new backend: healthy until its checks say otherwise.
    pub fn new() -> Self {
        CheckState {
            failures: 0,
            healthy: true,
        }
    }

    /// Takes one check's result; whether the backend's health changed.
    pub fn take(&mut self, ok: bool, retries: u32) -> bool {
        let before = self.healthy;
        if ok {
            self.failures = 0;
            self.healthy = true;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= retries {
                self.healthy = false;
            }
        }
        before != self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{HealthSpec, PublishedPort};

    #[test]
    fn health_entries_round_trip_and_refuse_the_rest() {
        let t = (4097, Ipv4Addr::new(10, 0, 0, 5), 8080);
        let k = health_key(t);
        assert_eq!(decode_health(&k, &[0]), Some((t, false)));
        assert_eq!(decode_health(&k, &[1]), Some((t, true)));
        assert_eq!(decode_health(&k, &[2]), None);
        assert_eq!(decode_health(&k, &[]), None);
        assert_eq!(decode_health(&k[..11], &[1]), None);
        assert_eq!(decode_health(&attach::entry_key(4097, t.1), &[1]), None);
        assert_eq!(decode_health_key(&k), Some(t));
    }

    #[test]
    fn a_backend_leaves_after_its_retries_and_comes_back_at_once() {
        let mut s = CheckState::new();
        assert!(!s.take(false, 2), "one failure is not enough");
        assert!(s.take(false, 2), "the second makes it unhealthy");
        assert!(!s.healthy);
        assert!(!s.take(false, 2));
        assert!(s.take(true, 2), "one success brings it back");
        assert!(s.healthy && s.failures == 0);
    }

    fn port(published: u16, target: u16, mode: PublishMode) -> PublishedPort {
        PublishedPort {
            published,
            target,
            protocol: Protocol::Tcp,
            mode,
        }
    }

    fn mesh_net(ports: Vec<PortMap>, local_healthy: Option<bool>) -> MeshNetwork {
        let backends = local_healthy
            .map(|healthy| MeshBackend {
                ip: Ipv4Addr::new(10, 0, 0, 2),
                mac: Mac([2, 0x42, 10, 0, 0, 2]),
                node: None,
                healthy,
            })
            .into_iter()
            .collect();
        MeshNetwork {
            vni: 4097,
            subnet: "10.0.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            services: vec![MeshService {
                name: "web".into(),
                vip: None,
                ports,
                backends,
            }],
        }
    }

    #[test]
    fn ingress_ports_are_steered_everywhere_host_ports_only_beside_a_healthy_backend() {
        let addr = Ipv4Addr::new(198, 18, 0, 1);
        let ingress = PortMap {
            proto: TCP,
            published: 8080,
            target: 80,
            host_mode: false,
        };
        let host = PortMap {
            proto: UDP,
            published: 53,
            target: 53,
            host_mode: true,
        };
        let rules = |local| steer_rules(&[mesh_net(vec![ingress, host], local)], &[addr]);
        assert_eq!(rules(None), vec![(TCP, addr, 8080)]);
        assert_eq!(rules(Some(false)), vec![(TCP, addr, 8080)]);
        assert_eq!(rules(Some(true)), vec![(TCP, addr, 8080), (UDP, addr, 53)]);
    }

    /// Services a (8080->80, 500 ms), b (9090->90, 200 ms), c (no port) on one network, and
    /// this node's attachments .2 to .5 (.2 backs a and b, .3 b, .4 c).
    fn fixture() -> (ClusterView, Attachments) {
        use crate::agent::attach::Attachment;
        use crate::manager::state::tests::init_cmd;
        use crate::manager::state::{Command, State};
        let mut st = State::default();
        st.apply(init_cmd()).unwrap();
        st.apply(Command::CreateNetwork(Box::new(
            crate::manager::networks::tests::spec("web", Some("10.0.0.0/24")),
        )))
        .unwrap();
        let mut view = st.view().unwrap();
        let net = view.networks[0].clone();
        let mk = |name: &str, ports: Vec<PublishedPort>, interval_ms, backends: &[u8]| Service {
            id: format!("{name:0>25}"),
            name: name.into(),
            network: net.id.clone(),
            endpoint_mode: EndpointMode::Vip,
            vip: Some(Ipv4Addr::new(10, 0, 0, 254)),
            ports,
            health: HealthSpec {
                interval_ms,
                retries: 3,
            },
            backends: backends
                .iter()
                .map(|b| Ipv4Addr::new(10, 0, 0, *b))
                .collect(),
            created_at: 0,
        };
        view.services = vec![
            mk("a", vec![port(8080, 80, PublishMode::Ingress)], 500, &[2]),
            mk(
                "b",
                vec![port(9090, 90, PublishMode::Ingress)],
                200,
                &[2, 3],
            ),
            mk("c", vec![], 100, &[4]),
        ];
        let mut local = Attachments::default();
        for n in [2u8, 3, 4, 5] {
            local.insert(Attachment {
                network_id: net.id.clone(),
                vni: net.vni,
                container_id: format!("c{n}"),
                ifname: "eth0".into(),
                netns: format!("/run/netns/c{n}"),
                ip: Ipv4Addr::new(10, 0, 0, n),
                prefix: 24,
                gateway: net.gateway,
                host_ifname: format!("shv{n}"),
                mtu: 1450,
                default_route: true,
                services: vec![],
                version: 1,
            });
        }
        (view, local)
    }

    #[test]
    fn checks_cover_backends_with_tcp_targets_at_their_strictest_settings() {
        let (view, local) = fixture();
        let got = checks(&view, &local);
        let summary: Vec<(u8, u16, u64)> = got
            .iter()
            .map(|c| {
                let (_, ip, port) = c.target;
                (ip.octets()[3], port, c.interval.as_millis() as u64)
            })
            .collect();
        // .2: each service's port at that service's interval; .3: b's; .4: no TCP port;
        // .5: no service.
        assert_eq!(summary, vec![(2, 80, 500), (2, 90, 200), (3, 90, 200)]);
        let vips = local_vips(&view, &local);
        assert_eq!(vips.values().filter(|v| !v.is_empty()).count(), 3);
    }

    #[test]
    fn a_failing_target_takes_a_backend_out_of_that_service_only() {
        let (view, local) = fixture();
        let me = view.nodes[0].id.clone();
        let vni = view.networks[0].vni;
        let dot2 = Ipv4Addr::new(10, 0, 0, 2);
        let health_of = |local_health: &HashMap<Target, bool>| -> Vec<(String, bool)> {
            let nets = mesh_networks(&Inputs {
                view: &view,
                me: &me,
                local: &local,
                remote: &HashMap::new(),
                remote_health: &HashMap::new(),
                local_health,
                up: &HashSet::new(),
            });
            nets[0]
                .services
                .iter()
                .flat_map(|s| {
                    s.backends
                        .iter()
                        .filter(|b| b.ip == dot2)
                        .map(|b| (s.name.clone(), b.healthy))
                })
                .collect()
        };
        assert_eq!(
            health_of(&HashMap::new()),
            vec![("a".into(), true), ("b".into(), true)]
        );
        // a's target (80) fails: out of a, still in b (whose target is 90).
        let failing = HashMap::from([((vni, dot2, 80), false), ((vni, dot2, 90), true)]);
        assert_eq!(
            health_of(&failing),
            vec![("a".into(), false), ("b".into(), true)]
        );
    }
}
