//! Address allocation inside a subnet.
//!
//! Pure and deterministic: given the subnet and the addresses in use, the next address is
//! always the same, so the manager's state machine (and a Raft log replaying it) can call it.
//! The network address, the broadcast address and the first host (kept for a gateway, as
//! docker does) are never handed out.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Why an address could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Every assignable address is in use.
    #[error("subnet {0} has no free address left: remove nodes or re-create the network with a larger subnet")]
    Exhausted(Ipv4Net),
    /// The subnet is too small to hold any node.
    #[error("subnet {0} is too small: use a prefix of /{MAX_PREFIX_LEN} or shorter")]
    TooSmall(Ipv4Net),
    /// An address outside the subnet, or a reserved one.
    #[error("{addr} cannot be assigned in {subnet} (outside it, or reserved)")]
    NotAssignable {
        /// The address.
        addr: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
}

/// The longest prefix a network's subnet may have: a /29 holds five nodes (eight addresses
/// less the network, the broadcast and the gateway). The manager's checks of `--subnet` and
/// `--ingress-subnet` call [`Ipam::new`], so this is the one place of the rule.
pub const MAX_PREFIX_LEN: u8 = 29;

/// The allocator of one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipam {
    subnet: Ipv4Net,
}

impl Ipam {
    /// An allocator for `subnet` (its host bits are cleared). Refuses subnets smaller than
    /// /[`MAX_PREFIX_LEN`].
    pub fn new(subnet: Ipv4Net) -> Result<Self, IpamError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > MAX_PREFIX_LEN {
            return Err(IpamError::TooSmall(subnet));
        }
        Ok(Ipam { subnet })
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The address kept for a gateway (the first host).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// Whether `addr` may be given to a node.
    pub fn is_assignable(&self, addr: Ipv4Addr) -> bool {
        self.subnet.contains(&addr)
            && addr != self.subnet.network()
            && addr != self.subnet.broadcast()
            && addr != self.gateway()
    }

    /// Checks that `addr` may be given to a node.
    pub fn check(&self, addr: Ipv4Addr) -> Result<(), IpamError> {
        if self.is_assignable(addr) {
            Ok(())
        } else {
            Err(IpamError::NotAssignable {
                addr,
                subnet: self.subnet,
            })
        }
    }

    /// The lowest assignable address not in `used`.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.subnet.broadcast());
        (first..last)
            .map(Ipv4Addr::from)
            .find(|a| !used.contains(a))
            .ok_or(IpamError::Exhausted(self.subnet))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_lowest_free_and_skips_reserved() {
        let ipam = Ipam::new(net("10.0.0.0/24")).unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(ipam.allocate(&used).unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        used.insert(Ipv4Addr::new(10, 0, 0, 2));
        used.insert(Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(ipam.allocate(&used).unwrap(), Ipv4Addr::new(10, 0, 0, 3));
        assert!(!ipam.is_assignable(Ipv4Addr::new(10, 0, 0, 0)));
        assert!(!ipam.is_assignable(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!ipam.is_assignable(Ipv4Addr::new(10, 0, 0, 255)));
        assert!(!ipam.is_assignable(Ipv4Addr::new(10, 0, 1, 5)));
        assert!(ipam.check(Ipv4Addr::new(10, 0, 0, 254)).is_ok());
    }

    #[test]
    fn exhaustion_and_small_subnets() {
        let ipam = Ipam::new(net("198.19.0.0/29")).unwrap();
        let used: BTreeSet<_> = (2..7).map(|i| Ipv4Addr::new(198, 19, 0, i)).collect();
        assert_eq!(
            ipam.allocate(&used),
            Err(IpamError::Exhausted(net("198.19.0.0/29")))
        );
        assert!(matches!(
            Ipam::new(net("198.19.0.0/30")),
            Err(IpamError::TooSmall(_))
        ));
        assert_eq!(
            Ipam::new(net("198.19.0.77/24")).unwrap().subnet(),
            net("198.19.0.0/24")
        );
    }

    proptest! {
        #[test]
        fn never_hands_out_used_or_reserved(prefix in 20u8..=29, taken in proptest::collection::btree_set(0u32..5000, 0..300)) {
            let subnet = Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), prefix).unwrap();
            let ipam = Ipam::new(subnet).unwrap();
            let used: BTreeSet<Ipv4Addr> = taken.iter().map(|t| Ipv4Addr::from(u32::from(subnet.network()) + t)).collect();
            match ipam.allocate(&used) {
                Ok(a) => {
                    prop_assert!(ipam.is_assignable(a));
                    prop_assert!(!used.contains(&a));
                }
                Err(IpamError::Exhausted(_)) => {
                    let free = (u32::from(subnet.network())..=u32::from(subnet.broadcast()))
                        .map(Ipv4Addr::from)
                        .filter(|a| ipam.is_assignable(*a) && !used.contains(a))
                        .count();
                    prop_assert_eq!(free, 0);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
