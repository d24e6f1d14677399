//! User-defined overlay networks (`network create`): their definitions, VNIs and subnets.
//! Pure: the state machine calls [`create`] inside apply, so every manager allocates the same.
//! `docs/networks.md` is the design.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::id::NodeId;

pub use crate::cluster::UserNetwork;

/// `ingress` keeps this VNI; user networks get the lowest free one above it.
pub const INGRESS_VNI: u32 = shoal_ingress::INGRESS_VNI;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The longest network name.
pub const MAX_NAME: usize = 64;
/// A node's address block: a /28 (16 addresses), or the whole subnet when it is smaller.
pub const BLOCK_PREFIX: u8 = 28;

/// What `network create` asks for; the manager fills in the ID and the time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// The new network's ID (random, made by the proposer).
    pub id: String,
    /// Name.
    pub name: String,
    /// `--subnet`, or one from the default pools.
    pub subnet: Option<Ipv4Net>,
    /// `--gateway`.
    pub gateway: Option<Ipv4Addr>,
    /// `--opt encrypted`.
    pub encrypted: bool,
    /// `--attachable`.
    pub attachable: bool,
    /// `--internal`.
    pub internal: bool,
    /// Unix time now.
    pub at: u64,
}

/// Where subnets come from when `network create` names none (`init --default-addr-pool`,
/// `--default-addr-pool-mask-length`, as docker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrPools {
    /// The pools, tried in order.
    pub pools: Vec<Ipv4Net>,
    /// The prefix length of each network's subnet.
    pub mask: u8,
}

impl Default for AddrPools {
    fn default() -> Self {
        Self {
            pools: vec![Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default()],
            mask: 24,
        }
    }
}

impl AddrPools {
    /// Checks pools and mask as given to `init`: every pool a network address, the mask
    /// within 8..=29 and no shorter than any pool's own prefix.
    pub fn check(&self) -> Result<(), NetworkError> {
        if self.pools.is_empty() {
            return Err(NetworkError::Pool("no default address pool".into()));
        }
        if !(8..=29).contains(&self.mask) {
            return Err(NetworkError::Pool(format!(
                "--default-addr-pool-mask-length {} must be between 8 and 29",
                self.mask
            )));
        }
        for pool in &self.pools {
            if pool.trunc() != *pool {
                return Err(NetworkError::Pool(format!(
                    "--default-addr-pool {pool} is not a network address (did you mean {}?)",
                    pool.trunc()
                )));
            }
            if pool.prefix_len() > self.mask {
                return Err(NetworkError::Pool(format!(
                    "--default-addr-pool {pool} is smaller than one /{} network",
                    self.mask
                )));
            }
        }
        Ok(())
    }
}

/// Why a network was not created or removed. Docker's words where it has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NetworkError {
    /// A name docker would refuse.
    #[error("invalid network name {0:?}: use 1 to 64 letters, digits, '_', '-' or '.', starting with a letter or a digit")]
    BadName(String),
    /// The name is taken.
    #[error("network with name {0} already exists")]
    NameTaken(String),
    /// No network of this name.
    #[error("network {0} not found")]
    NotFound(String),
    /// `network rm ingress`.
    #[error("network ingress carries the nodes' own overlay and cannot be removed")]
    Ingress,
    /// `--subnet` overlaps `ingress` or another network.
    #[error("invalid pool request: Pool overlaps with other one on this address space ({0})")]
    Overlap(String),
    /// A subnet with no room for a gateway and an endpoint.
    #[error("subnet {0} is too small: a network needs at least a /30")]
    TooSmall(Ipv4Net),
    /// `--subnet` given with host bits.
    #[error("invalid subnet {given}: it is not a network address (did you mean {network}?)")]
    NotNetwork {
        /// As given.
        given: Ipv4Net,
        /// With the host bits cleared.
        network: Ipv4Net,
    },
    /// `--gateway` outside the subnet, or its network or broadcast address.
    #[error("gateway {gateway} is not a host address of subnet {subnet}")]
    BadGateway {
        /// The gateway.
        gateway: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The default pools are used up.
    #[error("could not find an available, non-overlapping IPv4 address pool among the defaults to assign to the network")]
    PoolsExhausted,
    /// Every VNI is taken.
    #[error("no VXLAN network identifier left")]
    VnisExhausted,
    /// Bad default pools at `init`.
    #[error("{0}")]
    Pool(String),
    /// Every block of the subnet is granted.
    #[error("network {0} has no address block left for this node: its subnet is full; remove containers on other nodes, or make a network with a larger --subnet")]
    BlocksExhausted(String),
    /// `network rm` of a network a service uses.
    #[error("network {network} is in use by service {service}")]
    InUse {
        /// The network.
        network: String,
        /// A service on it.
        service: String,
    },
    /// A fixed address outside the subnet, or its network, broadcast or gateway address.
    #[error("address {ip} cannot be given to a container on network {network}: it is outside its subnet or reserved")]
    BadAddress {
        /// The address.
        ip: Ipv4Addr,
        /// The network.
        network: String,
    },
}

/// Checks a network name as docker does.
pub fn check_name(name: &str) -> Result<(), NetworkError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if first_ok && rest_ok && name.len() <= MAX_NAME {
        Ok(())
    } else {
        Err(NetworkError::BadName(name.to_owned()))
    }
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The network `spec` asks for, given the networks there are (`ingress` among `taken`
/// subnets and VNIs): its VNI is the lowest free one above `ingress`'s, its subnet the one
/// asked for or the first free one of `pools`.
pub fn create(
    networks: &BTreeMap<String, UserNetwork>,
    ingress_subnet: Ipv4Net,
    pools: &AddrPools,
    spec: NetworkSpec,
) -> Result<UserNetwork, NetworkError> {
    check_name(&spec.name)?;
    if spec.name == shoal_ingress::INGRESS_NAME || networks.contains_key(&spec.name) {
        return Err(NetworkError::NameTaken(spec.name));
    }
    let taken: Vec<(String, Ipv4Net)> = std::iter::once(("ingress".to_owned(), ingress_subnet))
        .chain(networks.values().map(|n| (n.name.clone(), n.subnet)))
        .collect();
    let clash = |subnet: &Ipv4Net| taken.iter().find(|(_, t)| overlaps(t, subnet));
    let subnet = match spec.subnet {
        Some(given) => {
            if given.trunc() != given {
                return Err(NetworkError::NotNetwork {
                    given,
                    network: given.trunc(),
                });
            }
            if let Some((name, t)) = clash(&given) {
                return Err(NetworkError::Overlap(format!("network {name} has {t}")));
            }
            given
        }
        None => pools
            .pools
            .iter()
            .flat_map(|pool| pool.subnets(pools.mask).into_iter().flatten())
            .find(|s| clash(s).is_none())
            .ok_or(NetworkError::PoolsExhausted)?,
    };
    if subnet.prefix_len() > 30 {
        return Err(NetworkError::TooSmall(subnet));
    }
    let gateway = match spec.gateway {
        Some(g) => g,
        None => Ipv4Addr::from(u32::from(subnet.network()) + 1),
    };
    if !subnet.contains(&gateway) || gateway == subnet.network() || gateway == subnet.broadcast() {
        return Err(NetworkError::BadGateway { gateway, subnet });
    }
    let used: BTreeSet<u32> = networks.values().map(|n| n.vni).collect();
    let vni = (INGRESS_VNI + 1..=MAX_VNI)
        .find(|v| !used.contains(v))
        .ok_or(NetworkError::VnisExhausted)?;
    Ok(UserNetwork {
        id: spec.id,
        name: spec.name,
        vni,
        subnet,
        gateway,
        encrypted: spec.encrypted,
        attachable: spec.attachable,
        internal: spec.internal,
        created_at: spec.at,
        blocks: BTreeMap::new(),
        assigned: BTreeMap::new(),
    })
}

/// Grants `node` the lowest block of `network`'s subnet that no node holds and that holds
/// none of the services' VIPs `vips` (see [`BLOCK_PREFIX`]); the block.
pub fn grant_block(
    network: &mut UserNetwork,
    node: &NodeId,
    vips: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Net, NetworkError> {
    let prefix = BLOCK_PREFIX.max(network.subnet.prefix_len());
    let held: Vec<Ipv4Net> = network.blocks.values().flatten().copied().collect();
    let block = network
        .subnet
        .subnets(prefix)
        .into_iter()
        .flatten()
        .find(|b| !held.contains(b) && !vips.iter().any(|v| b.contains(v)))
        .ok_or_else(|| NetworkError::BlocksExhausted(network.name.clone()))?;
    network.blocks.entry(node.clone()).or_default().push(block);
    Ok(block)
}

/// Gives back every block and fixed address `node` holds, on every network (it left or was
/// removed).
pub fn release_blocks(networks: &mut BTreeMap<String, UserNetwork>, node: &NodeId) -> bool {
    let mut any = false;
    for n in networks.values_mut() {
        any |= n.blocks.remove(node).is_some();
        let before = n.assigned.len();
        n.assigned.retain(|_, owner| owner != node);
        any |= n.assigned.len() != before;
    }
    any
}

/// Assigns the fixed address `ip` of `network` to `node` (taking it from any other node's
/// block or assignment: the last node to ask for an address by name holds it); never one of
/// the services' VIPs `vips`.
pub fn assign(
    network: &mut UserNetwork,
    node: &NodeId,
    ip: Ipv4Addr,
    vips: &BTreeSet<Ipv4Addr>,
) -> Result<(), NetworkError> {
    let usable = network.subnet.contains(&ip)
        && ip != network.subnet.network()
        && ip != network.subnet.broadcast()
        && ip != network.gateway
        && !vips.contains(&ip);
    if !usable {
        return Err(NetworkError::BadAddress {
            ip,
            network: network.name.clone(),
        });
    }
    network.assigned.insert(ip, node.clone());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// `network create NAME [--subnet SUBNET] --opt encrypted --attachable`.
    pub(crate) fn spec(name: &str, subnet: Option<&str>) -> NetworkSpec {
        NetworkSpec {
            id: format!("id-{name}"),
            name: name.into(),
            subnet: subnet.map(net),
            gateway: None,
            encrypted: true,
            attachable: true,
            internal: false,
            at: 7,
        }
    }

    /// Creates `specs` in order into a map, as the state machine does.
    fn make(specs: Vec<NetworkSpec>) -> Result<BTreeMap<String, UserNetwork>, NetworkError> {
        let mut all = BTreeMap::new();
        for s in specs {
            let n = create(&all, net("10.0.0.0/24"), &AddrPools::default(), s)?;
            all.insert(n.name.clone(), n);
        }
        Ok(all)
    }

    #[test]
    fn vnis_and_subnets_are_the_lowest_free_ones() {
        let all = make(vec![
            spec("web", None),
            spec("db", Some("192.168.7.0/24")),
            spec("app", None),
        ])
        .unwrap();
        assert_eq!(all["web"].vni, 4097);
        assert_eq!(
            all["web"].subnet,
            net("10.0.1.0/24"),
            "10.0.0.0/24 is ingress's"
        );
        assert_eq!(all["web"].gateway, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(all["db"].vni, 4098);
        assert_eq!(all["db"].subnet, net("192.168.7.0/24"));
        assert_eq!(all["app"].subnet, net("10.0.2.0/24"));
        assert_eq!(all["app"].vni, 4099);
        // A freed VNI and subnet are taken again, the lowest first.
        let mut some = all.clone();
        some.remove("web");
        let again = create(
            &some,
            net("10.0.0.0/24"),
            &AddrPools::default(),
            spec("new", None),
        )
        .unwrap();
        assert_eq!((again.vni, again.subnet), (4097, net("10.0.1.0/24")));
    }

    #[test]
    fn overlaps_names_and_gateways_are_refused() {
        let all = make(vec![spec("web", None)]).unwrap();
        let refused = |s| create(&all, net("10.0.0.0/24"), &AddrPools::default(), s).unwrap_err();
        assert_eq!(
            refused(spec("web", None)),
            NetworkError::NameTaken("web".into())
        );
        assert_eq!(
            refused(spec("ingress", None)),
            NetworkError::NameTaken("ingress".into())
        );
        for bad in ["", "-x", "a b", "é", &"x".repeat(65)] {
            assert_eq!(refused(spec(bad, None)), NetworkError::BadName(bad.into()));
        }
        assert!(
            matches!(refused(spec("o", Some("10.0.0.128/25"))), NetworkError::Overlap(m) if m.contains("ingress"))
        );
        assert!(matches!(
            refused(spec("o", Some("10.0.0.0/16"))),
            NetworkError::Overlap(_)
        ));
        assert!(
            matches!(refused(spec("o", Some("10.0.1.0/28"))), NetworkError::Overlap(m) if m.contains("web"))
        );
        assert!(matches!(
            refused(spec("o", Some("10.9.0.1/24"))),
            NetworkError::NotNetwork { .. }
        ));
        assert!(matches!(
            refused(spec("o", Some("10.9.0.0/31"))),
            NetworkError::TooSmall(_)
        ));
        for gw in ["10.9.0.0", "10.9.0.255", "10.8.0.1"] {
            let mut s = spec("o", Some("10.9.0.0/24"));
            s.gateway = Some(gw.parse().unwrap());
            assert!(
                matches!(refused(s), NetworkError::BadGateway { .. }),
                "{gw}"
            );
        }
        let mut s = spec("o", Some("10.9.0.0/24"));
        s.gateway = Some("10.9.0.254".parse().unwrap());
        assert_eq!(
            create(&all, net("10.0.0.0/24"), &AddrPools::default(), s)
                .unwrap()
                .gateway,
            Ipv4Addr::new(10, 9, 0, 254)
        );
    }

    #[test]
    fn the_pools_run_out_with_a_clear_error() {
        let pools = AddrPools {
            pools: vec![net("172.30.0.0/23")],
            mask: 24,
        };
        let mut all = BTreeMap::new();
        for name in ["a", "b"] {
            let n = create(&all, net("10.0.0.0/24"), &pools, spec(name, None)).unwrap();
            all.insert(n.name.clone(), n);
        }
        assert_eq!(all["b"].subnet, net("172.30.1.0/24"));
        assert_eq!(
            create(&all, net("10.0.0.0/24"), &pools, spec("c", None)),
            Err(NetworkError::PoolsExhausted)
        );
        assert!(AddrPools {
            pools: vec![net("10.0.0.1/8")],
            mask: 24
        }
        .check()
        .is_err());
        assert!(AddrPools {
            pools: vec![net("10.0.0.0/25")],
            mask: 24
        }
        .check()
        .is_err());
        assert!(AddrPools {
            pools: vec![net("10.0.0.0/8")],
            mask: 30
        }
        .check()
        .is_err());
        assert!(AddrPools::default().check().is_ok());
    }

    #[test]
    fn blocks_are_granted_lowest_first_and_given_back() {
        let mut all = make(vec![
            spec("web", Some("10.9.0.0/26")),
            spec("tiny", Some("10.9.1.0/30")),
        ])
        .unwrap();
        let (a, b) = (NodeId::from_random(1), NodeId::from_random(2));
        let none = BTreeSet::new();
        let web = all.get_mut("web").unwrap();
        assert_eq!(grant_block(web, &a, &none), Ok(net("10.9.0.0/28")));
        assert_eq!(grant_block(web, &b, &none), Ok(net("10.9.0.16/28")));
        assert_eq!(grant_block(web, &a, &none), Ok(net("10.9.0.32/28")));
        assert_eq!(grant_block(web, &b, &none), Ok(net("10.9.0.48/28")));
        assert_eq!(
            grant_block(web, &a, &none),
            Err(NetworkError::BlocksExhausted("web".into()))
        );
        assert_eq!(web.blocks[&a], [net("10.9.0.0/28"), net("10.9.0.32/28")]);
        // A subnet smaller than a block is one block.
        let tiny = all.get_mut("tiny").unwrap();
        assert_eq!(grant_block(tiny, &b, &none), Ok(net("10.9.1.0/30")));
        assert!(grant_block(tiny, &a, &none).is_err());
        // Node a goes: its blocks are free again, b's stay.
        assert!(release_blocks(&mut all, &a));
        assert!(!release_blocks(&mut all, &a));
        let web = all.get_mut("web").unwrap();
        assert_eq!(web.blocks.keys().collect::<Vec<_>>(), [&b]);
        assert_eq!(grant_block(web, &a, &none), Ok(net("10.9.0.0/28")));
    }

    #[test]
    fn no_block_holds_a_vip_and_no_vip_is_a_fixed_address() {
        let mut all = make(vec![spec("web", Some("10.9.0.0/26"))]).unwrap();
        let a = NodeId::from_random(1);
        let vips = BTreeSet::from([Ipv4Addr::new(10, 9, 0, 62), Ipv4Addr::new(10, 9, 0, 20)]);
        let web = all.get_mut("web").unwrap();
        assert_eq!(grant_block(web, &a, &vips), Ok(net("10.9.0.0/28")));
        assert_eq!(grant_block(web, &a, &vips), Ok(net("10.9.0.32/28")));
        assert!(grant_block(web, &a, &vips).is_err());
        let before = web.clone();
        assert!(matches!(
            assign(web, &a, Ipv4Addr::new(10, 9, 0, 62), &vips),
            Err(NetworkError::BadAddress { .. })
        ));
        assert_eq!(*web, before);
        assert_eq!(assign(web, &a, Ipv4Addr::new(10, 9, 0, 61), &vips), Ok(()));
    }
}
