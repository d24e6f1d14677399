//! Services (`service create`): their definitions, virtual IPs, published ports and
//! backends. Pure: the state machine calls these inside apply, so every manager decides the
//! same. `docs/services.md` is the design.
//!
//! A VIP is taken from the top of its network's subnet downward, while nodes' address blocks
//! are granted from the bottom upward (`networks::grant_block`), so the two stay apart; a
//! block that would hold a VIP is never granted, and a VIP is never given as a fixed address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use crate::cluster::{
    EndpointMode, HealthSpec, Protocol, PublishMode, PublishedPort, Service, UserNetwork,
};

/// What `service create` asks for; the manager fills in the ID and the time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The new service's ID (random, made by the proposer).
    pub id: String,
    /// Name.
    pub name: String,
    /// Its user network: a name, or an exact ID.
    pub network: String,
    /// `--endpoint-mode`.
    pub endpoint_mode: EndpointMode,
    /// `--publish`, in order.
    pub ports: Vec<PublishedPort>,
    /// `--health-interval`, `--health-retries`.
    pub health: HealthSpec,
    /// Unix time now.
    pub at: u64,
}

/// Why a service was not created, changed or removed, or a publish spec not read. Docker's
/// words where it has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ServiceError {
    /// A name docker would refuse.
    #[error("invalid service name {0:?}: use 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or a digit")]
    BadName(String),
    /// The name is taken.
    #[error("service {0} already exists")]
    NameTaken(String),
    /// No service of this name.
    #[error("service {0} not found")]
    NotFound(String),
    /// No user network of this name or ID.
    #[error("network {0} not found")]
    NoNetwork(String),
    /// `--network ingress`.
    #[error("network ingress carries the nodes' own overlay: services run on user networks (shoal network create)")]
    IngressNetwork,
    /// Another service (or this one, twice) publishes the port with this protocol.
    #[error("port {port} is already in use by service {service}")]
    PortInUse {
        /// The published port.
        port: u16,
        /// The service that publishes it.
        service: String,
    },
    /// Docker's refusal of `--endpoint-mode dnsrr` with an ingress-mode port.
    #[error("port published with ingress mode can't be used with dnsrr mode")]
    DnsrrIngress,
    /// A publish spec that does not read.
    #[error("invalid publish spec {spec:?}: {why}")]
    BadPublish {
        /// As given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// `--publish-rm` of a port the service does not publish.
    #[error("service {service} does not publish port {port}/{}", protocol.as_str())]
    NotPublished {
        /// The service.
        service: String,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// A zero health interval or retry count.
    #[error("invalid health check: the interval must be at least 1ms and the retries at least 1")]
    BadHealth,
    /// No address of the network is free for a VIP.
    #[error("network {0} has no address left for a virtual IP; use --endpoint-mode dnsrr, or a network with a larger --subnet")]
    VipsExhausted(String),
    /// A backend address outside the network's subnet, or one of its reserved addresses.
    #[error("address {ip} cannot be a backend of service {service}: it is not a host address of network {network} ({subnet}), or it is reserved there")]
    BadBackend {
        /// The address.
        ip: Ipv4Addr,
        /// The service.
        service: String,
        /// The network's name.
        network: String,
        /// Its subnet.
        subnet: String,
    },
}

/// Checks a service name: the rule `network create` uses (docker's).
pub fn check_name(name: &str) -> Result<(), ServiceError> {
    super::networks::check_name(name).map_err(|_| ServiceError::BadName(name.to_owned()))
}

/// The VIPs of the services on the network with ID `network_id`.
pub fn vips_on(services: &BTreeMap<String, Service>, network_id: &str) -> BTreeSet<Ipv4Addr> {
    services
        .values()
        .filter(|s| s.network == network_id)
        .filter_map(|s| s.vip)
        .collect()
}

/// The user network called `name`, or whose ID is exactly `name`.
pub fn find_network<'a>(
    networks: &'a BTreeMap<String, UserNetwork>,
    name: &str,
) -> Option<&'a UserNetwork> {
    networks
        .get(name)
        .or_else(|| networks.values().find(|n| n.id == name))
}

/// A VIP for a new service on `net`: the highest host address of its subnet that is not the
/// gateway, in no node's block, no fixed address, and no other service's VIP or backend.
pub fn allocate_vip(net: &UserNetwork, services: &BTreeMap<String, Service>) -> Option<Ipv4Addr> {
    let taken: BTreeSet<Ipv4Addr> = services
        .values()
        .filter(|s| s.network == net.id)
        .flat_map(|s| s.vip.into_iter().chain(s.backends.iter().copied()))
        .collect();
    let low = u32::from(net.subnet.network()).checked_add(1)?;
    let high = u32::from(net.subnet.broadcast()).checked_sub(1)?;
    (low..=high).rev().map(Ipv4Addr::from).find(|ip| {
        *ip != net.gateway
            && !net.assigned.contains_key(ip)
            && !taken.contains(ip)
            && !net.blocks.values().flatten().any(|b| b.contains(ip))
    })
}

/// Checks the ports service `name` would publish in `mode`, against each other and every
/// other service's.
fn check_ports(
    services: &BTreeMap<String, Service>,
    name: &str,
    mode: EndpointMode,
    ports: &[PublishedPort],
) -> Result<(), ServiceError> {
    for (i, p) in ports.iter().enumerate() {
        if p.published == 0 || p.target == 0 {
            return Err(ServiceError::BadPublish {
                spec: format!("{}:{}", p.published, p.target),
                why: "port out of range".into(),
            });
        }
        if mode == EndpointMode::Dnsrr && p.mode == PublishMode::Ingress {
            return Err(ServiceError::DnsrrIngress);
        }
        let same = |q: &PublishedPort| q.published == p.published && q.protocol == p.protocol;
        if ports[..i].iter().any(same) {
            return Err(ServiceError::PortInUse {
                port: p.published,
                service: name.to_owned(),
            });
        }
        if let Some(other) = services
            .values()
            .find(|s| s.name != name && s.ports.iter().any(same))
        {
            return Err(ServiceError::PortInUse {
                port: p.published,
                service: other.name.clone(),
            });
        }
    }
    Ok(())
}

/// The service `spec` asks for, given the services and user networks there are (`ingress`
/// is named `ingress_name`): its VIP allocated in `vip` mode.
pub fn create(
    services: &BTreeMap<String, Service>,
    networks: &BTreeMap<String, UserNetwork>,
    ingress_name: &str,
    spec: ServiceSpec,
) -> Result<Service, ServiceError> {
    check_name(&spec.name)?;
    if services.contains_key(&spec.name) {
        return Err(ServiceError::NameTaken(spec.name));
    }
    if spec.network == ingress_name {
        return Err(ServiceError::IngressNetwork);
    }
    let net = find_network(networks, &spec.network)
        .ok_or_else(|| ServiceError::NoNetwork(spec.network.clone()))?;
    if spec.health.interval_ms == 0 || spec.health.retries == 0 {
        return Err(ServiceError::BadHealth);
    }
    check_ports(services, &spec.name, spec.endpoint_mode, &spec.ports)?;
    let vip = match spec.endpoint_mode {
        EndpointMode::Vip => Some(
            allocate_vip(net, services)
                .ok_or_else(|| ServiceError::VipsExhausted(net.name.clone()))?,
        ),
        EndpointMode::Dnsrr => None,
    };
    Ok(Service {
        id: spec.id,
        name: spec.name,
        network: net.id.clone(),
        endpoint_mode: spec.endpoint_mode,
        vip,
        ports: spec.ports,
        health: spec.health,
        backends: BTreeSet::new(),
        created_at: spec.at,
    })
}

/// The ports service `name` publishes after `service update --publish-rm ... --publish-add
/// ...` (removals first); `None` when that is what it publishes already.
pub fn update(
    services: &BTreeMap<String, Service>,
    name: &str,
    publish_add: &[PublishedPort],
    publish_rm: &[(u16, Protocol)],
) -> Result<Option<Vec<PublishedPort>>, ServiceError> {
    let service = services
        .get(name)
        .ok_or_else(|| ServiceError::NotFound(name.to_owned()))?;
    let mut ports = service.ports.clone();
    for &(port, protocol) in publish_rm {
        let before = ports.len();
        ports.retain(|p| !(p.published == port && p.protocol == protocol));
        if ports.len() == before {
            return Err(ServiceError::NotPublished {
                service: name.to_owned(),
                port,
                protocol,
            });
        }
    }
    for p in publish_add {
        if !ports.contains(p) {
            ports.push(*p);
        }
    }
    check_ports(services, name, service.endpoint_mode, &ports)?;
    Ok((ports != service.ports).then_some(ports))
}

/// Adds (`present`) or removes backend `ip` of service `name`. Whether that changed anything.
pub fn set_backend(
    services: &mut BTreeMap<String, Service>,
    networks: &BTreeMap<String, UserNetwork>,
    name: &str,
    ip: Ipv4Addr,
    present: bool,
) -> Result<bool, ServiceError> {
    let service = services
        .get(name)
        .ok_or_else(|| ServiceError::NotFound(name.to_owned()))?;
    if !present {
        let changed = service.backends.contains(&ip);
        if let Some(s) = services.get_mut(name) {
            s.backends.remove(&ip);
        }
        return Ok(changed);
    }
    if service.backends.contains(&ip) {
        return Ok(false);
    }
    let net = find_network(networks, &service.network)
        .ok_or_else(|| ServiceError::NoNetwork(service.network.clone()))?;
    let s = &net.subnet;
    let usable = s.contains(&ip)
        && ip != s.network()
        && ip != s.broadcast()
        && ip != net.gateway
        && !vips_on(services, &net.id).contains(&ip);
    if !usable {
        return Err(ServiceError::BadBackend {
            ip,
            service: name.to_owned(),
            network: net.name.clone(),
            subnet: s.to_string(),
        });
    }
    if let Some(s) = services.get_mut(name) {
        s.backends.insert(ip);
    }
    Ok(true)
}

/// The service using the network with ID `network_id`, if any (such a network cannot be
/// removed).
pub fn user_of<'a>(
    services: &'a BTreeMap<String, Service>,
    network_id: &str,
) -> Option<&'a Service> {
    services.values().find(|s| s.network == network_id)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::id::NodeId;
    use crate::manager::networks::{self, tests::net, AddrPools};

    fn tcp(published: u16, target: u16) -> PublishedPort {
        PublishedPort {
            published,
            target,
            protocol: Protocol::Tcp,
            mode: PublishMode::Ingress,
        }
    }

    /// `--publish SPEC`.
    pub(crate) fn port(spec: &str) -> PublishedPort {
        shoal_proto::publish::parse_publish(spec).unwrap().into()
    }

    /// `service create NAME --network NETWORK [--publish P]...` in vip mode.
    pub(crate) fn spec(name: &str, network: &str, ports: Vec<PublishedPort>) -> ServiceSpec {
        ServiceSpec {
            id: format!("svc-{name}"),
            name: name.into(),
            network: network.into(),
            endpoint_mode: EndpointMode::Vip,
            ports,
            health: HealthSpec::default(),
            at: 9,
        }
    }

    /// Network `web` on 10.9.0.0/24 and `small` on 10.9.1.0/29.
    fn nets() -> BTreeMap<String, UserNetwork> {
        let mut all = BTreeMap::new();
        for (name, subnet) in [("web", "10.9.0.0/24"), ("small", "10.9.1.0/29")] {
            let n = networks::create(
                &all,
                net("10.0.0.0/24"),
                &AddrPools::default(),
                networks::tests::spec(name, Some(subnet)),
            )
            .unwrap();
            all.insert(n.name.clone(), n);
        }
        all
    }

    fn add(
        services: &mut BTreeMap<String, Service>,
        nets: &BTreeMap<String, UserNetwork>,
        spec: ServiceSpec,
    ) -> Result<Service, ServiceError> {
        let s = create(services, nets, "ingress", spec)?;
        services.insert(s.name.clone(), s.clone());
        Ok(s)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn vips_come_from_the_top_and_avoid_blocks_fixed_addresses_and_each_other() {
        let mut nets = nets();
        let mut services = BTreeMap::new();
        let a = add(&mut services, &nets, spec("a", "web", vec![])).unwrap();
        assert_eq!(a.vip, Some(ip("10.9.0.254")));
        assert_eq!(a.network, nets["web"].id);
        // By ID too.
        let id = nets["web"].id.clone();
        let b = add(&mut services, &nets, spec("b", &id, vec![])).unwrap();
        assert_eq!(b.vip, Some(ip("10.9.0.253")));
        // A fixed address and a block near the top are skipped.
        let web = nets.get_mut("web").unwrap();
        web.assigned
            .insert(ip("10.9.0.252"), NodeId::from_random(1));
        web.blocks
            .insert(NodeId::from_random(2), vec![net("10.9.0.224/28")]);
        web.blocks
            .get_mut(&NodeId::from_random(2))
            .unwrap()
            .push(net("10.9.0.240/28"));
        let c = add(&mut services, &nets, spec("c", "web", vec![])).unwrap();
        assert_eq!(c.vip, Some(ip("10.9.0.223")));
        // The gateway is never one: a /29 with a block of its lower half keeps .6 .. .1
        // minus the block and the gateway.
        let small = nets.get_mut("small").unwrap();
        small.gateway = ip("10.9.1.6");
        let d = add(&mut services, &nets, spec("d", "small", vec![])).unwrap();
        assert_eq!(d.vip, Some(ip("10.9.1.5")));
        // Until none is left; dnsrr needs none.
        nets.get_mut("small")
            .unwrap()
            .blocks
            .insert(NodeId::from_random(3), vec![net("10.9.1.0/30")]);
        let e = add(&mut services, &nets, spec("e", "small", vec![])).unwrap();
        assert_eq!(e.vip, Some(ip("10.9.1.4")));
        assert_eq!(
            create(&services, &nets, "ingress", spec("f", "small", vec![])),
            Err(ServiceError::VipsExhausted("small".into()))
        );
        let mut dnsrr = spec("f", "small", vec![]);
        dnsrr.endpoint_mode = EndpointMode::Dnsrr;
        assert_eq!(add(&mut services, &nets, dnsrr).unwrap().vip, None);
        // A removed service's VIP is free again.
        let h = add(&mut services, &nets, spec("h", "web", vec![])).unwrap();
        assert_eq!(h.vip, Some(ip("10.9.0.222")));
        services.remove("c");
        let g = add(&mut services, &nets, spec("g", "web", vec![])).unwrap();
        assert_eq!(g.vip, Some(ip("10.9.0.223")));
    }

    #[test]
    fn refusals_say_why() {
        let nets = nets();
        let mut services = BTreeMap::new();
        add(
            &mut services,
            &nets,
            spec("web", "web", vec![tcp(8080, 80)]),
        )
        .unwrap();
        let refused = |s| {
            create(&services, &nets, "ingress", s)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused(spec("web", "web", vec![])),
            "service web already exists"
        );
        assert_eq!(refused(spec("x", "db", vec![])), "network db not found");
        assert!(refused(spec("x", "ingress", vec![])).contains("user networks"));
        assert!(refused(spec("-x", "web", vec![])).contains("invalid service name"));
        assert_eq!(
            refused(spec("x", "small", vec![tcp(8080, 81)])),
            "port 8080 is already in use by service web"
        );
        // Host mode or not, the same port and protocol is one port.
        let mut host = tcp(8080, 80);
        host.mode = PublishMode::Host;
        assert_eq!(
            refused(spec("x", "web", vec![host])),
            "port 8080 is already in use by service web"
        );
        // Another protocol is another port.
        let mut udp = tcp(8080, 80);
        udp.protocol = Protocol::Udp;
        assert!(create(&services, &nets, "ingress", spec("x", "web", vec![udp])).is_ok());
        assert_eq!(
            refused(spec("x", "web", vec![tcp(9090, 1), tcp(9090, 2)])),
            "port 9090 is already in use by service x"
        );
        let mut dnsrr = spec("x", "web", vec![tcp(9090, 80)]);
        dnsrr.endpoint_mode = EndpointMode::Dnsrr;
        assert_eq!(
            refused(dnsrr.clone()),
            "port published with ingress mode can't be used with dnsrr mode"
        );
        dnsrr.ports[0].mode = PublishMode::Host;
        assert!(create(&services, &nets, "ingress", dnsrr).is_ok());
        let mut sick = spec("x", "web", vec![]);
        sick.health.retries = 0;
        assert_eq!(
            create(&services, &nets, "ingress", sick),
            Err(ServiceError::BadHealth)
        );
    }

    #[test]
    fn updates_remove_then_add_and_keep_ports_apart() {
        let nets = nets();
        let mut services = BTreeMap::new();
        add(
            &mut services,
            &nets,
            spec("web", "web", vec![tcp(8080, 80)]),
        )
        .unwrap();
        add(
            &mut services,
            &nets,
            spec("api", "web", vec![tcp(9090, 90)]),
        )
        .unwrap();
        assert_eq!(
            update(&services, "web", &[tcp(8081, 80)], &[(8080, Protocol::Tcp)]),
            Ok(Some(vec![tcp(8081, 80)]))
        );
        // What is already so changes nothing.
        assert_eq!(update(&services, "web", &[tcp(8080, 80)], &[]), Ok(None));
        assert_eq!(
            update(&services, "web", &[tcp(9090, 80)], &[])
                .unwrap_err()
                .to_string(),
            "port 9090 is already in use by service api"
        );
        // Another target on a port it publishes: remove it first.
        assert_eq!(
            update(&services, "web", &[tcp(8080, 81)], &[])
                .unwrap_err()
                .to_string(),
            "port 8080 is already in use by service web"
        );
        assert_eq!(
            update(&services, "web", &[tcp(8080, 81)], &[(8080, Protocol::Tcp)]),
            Ok(Some(vec![tcp(8080, 81)]))
        );
        assert_eq!(
            update(&services, "web", &[], &[(8080, Protocol::Udp)])
                .unwrap_err()
                .to_string(),
            "service web does not publish port 8080/udp"
        );
        assert_eq!(
            update(&services, "nope", &[], &[]),
            Err(ServiceError::NotFound("nope".into()))
        );
    }

    #[test]
    fn backends_are_host_addresses_of_the_network() {
        let nets = nets();
        let mut services = BTreeMap::new();
        add(&mut services, &nets, spec("web", "web", vec![])).unwrap();
        add(&mut services, &nets, spec("api", "web", vec![])).unwrap();
        let set = |services: &mut BTreeMap<String, Service>, name: &str, a: &str, present| {
            set_backend(services, &nets, name, ip(a), present)
        };
        assert_eq!(set(&mut services, "web", "10.9.0.2", true), Ok(true));
        assert_eq!(set(&mut services, "web", "10.9.0.2", true), Ok(false));
        assert_eq!(set(&mut services, "web", "10.9.0.3", true), Ok(true));
        assert_eq!(
            services["web"].backends,
            BTreeSet::from([ip("10.9.0.2"), ip("10.9.0.3")])
        );
        let before = services.clone();
        // Outside, the network's own, the gateway, a VIP (its own or another's).
        for bad in [
            "10.9.1.2",
            "10.9.0.0",
            "10.9.0.255",
            "10.9.0.1",
            "10.9.0.254",
            "10.9.0.253",
        ] {
            assert!(
                matches!(
                    set(&mut services, "web", bad, true),
                    Err(ServiceError::BadBackend { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            set(&mut services, "nope", "10.9.0.2", true)
                .unwrap_err()
                .to_string(),
            "service nope not found"
        );
        assert_eq!(services, before);
        assert_eq!(set(&mut services, "web", "10.9.0.2", false), Ok(true));
        assert_eq!(set(&mut services, "web", "10.9.0.2", false), Ok(false));
        assert_eq!(services["web"].backends, BTreeSet::from([ip("10.9.0.3")]));
        // A backend address is never given as a VIP.
        let c = add(&mut services, &nets, spec("c", "web", vec![])).unwrap();
        assert_eq!(c.vip, Some(ip("10.9.0.252")));
        set(&mut services, "web", "10.9.0.251", true).unwrap();
        let d = add(&mut services, &nets, spec("d", "web", vec![])).unwrap();
        assert_eq!(d.vip, Some(ip("10.9.0.250")));
        assert_eq!(
            user_of(&services, &nets["web"].id).map(|s| s.name.as_str()),
            Some("api")
        );
        assert!(user_of(&services, &nets["small"].id).is_none());
    }
}
