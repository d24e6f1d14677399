//! Overlay network definitions.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use shoal_vxlan::wire::{envelope, header, Mac};

/// The name of the network every node joins.
pub const INGRESS_NAME: &str = "ingress";
/// The ingress network's VNI (docker's is 4096 too).
pub const INGRESS_VNI: u32 = 4096;
/// The ingress subnet when `init` is given none (docker's default).
pub const DEFAULT_INGRESS_SUBNET: &str = "10.0.0.0/24";
/// The interface name of the ingress network on every node.
pub const INGRESS_INTERFACE: &str = "shoal-ingress";

/// IPv4 header (20) + UDP header (8): the underlay headers around a VXLAN datagram.
const UNDERLAY_HEADERS: usize = 20 + 8;
/// An Ethernet header inside the datagram (no VLAN tag).
const INNER_ETHERNET: usize = 14;

/// A network as the manager defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Its name (`ingress`).
    pub name: String,
    /// Its VXLAN network identifier.
    pub vni: u32,
    /// Its IPv4 subnet.
    pub subnet: Ipv4Net,
    /// Whether traffic is sealed (the default) or plain RFC 7348.
    pub encrypted: bool,
}

impl NetworkSpec {
    /// The ingress network over `subnet`.
    pub fn ingress(subnet: Ipv4Net, encrypted: bool) -> Self {
        NetworkSpec {
            name: INGRESS_NAME.to_owned(),
            vni: INGRESS_VNI,
            subnet,
            encrypted,
        }
    }

    /// The interface MTU for an underlay MTU: what is left of an underlay packet after the
    /// outer IPv4 and UDP headers, the VXLAN header (and in encrypted mode the envelope header
    /// and tag) and the inner Ethernet header. 1450 for plain, 1414 for encrypted, on 1500.
    pub fn mtu(&self, underlay_mtu: u16) -> u16 {
        overlay_mtu(underlay_mtu, self.encrypted)
    }
}

/// The interface MTU for an underlay MTU (see [`NetworkSpec::mtu`]).
pub fn overlay_mtu(underlay_mtu: u16, encrypted: bool) -> u16 {
    let vxlan = if encrypted {
        envelope::HEADER_LEN + envelope::TAG_LEN
    } else {
        header::HEADER_LEN
    };
    let overhead = (UNDERLAY_HEADERS + vxlan + INNER_ETHERNET) as u16;
    underlay_mtu.saturating_sub(overhead)
}

/// The MAC address of an overlay address: `02:42` and the four bytes of the address, as
/// docker derives container MACs, so every node computes every other's MAC alone.
pub fn mac_for(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_on_a_1500_underlay() {
        assert_eq!(overlay_mtu(1500, false), 1450, "as docker's overlay");
        assert_eq!(overlay_mtu(1500, true), 1414);
        assert_eq!(overlay_mtu(9000, true), 8914);
        assert_eq!(overlay_mtu(10, true), 0);
    }

    #[test]
    fn mac_derivation() {
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 0, 0, 2)).to_string(),
            "02:42:0a:00:00:02"
        );
    }
}
