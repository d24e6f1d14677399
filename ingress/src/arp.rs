//! ARP (RFC 826) for overlay addresses, answered on the node.
//!
//! The control plane knows every node's overlay address and MAC, so a request for one of them
//! never needs to cross the overlay: the agent answers it from its table, as if the owner had.
//! Requests for addresses it does not know go on to the engine and are flooded to every peer.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::RwLock;

use etherparse::{ArpEthIpv4Packet, ArpOperation, ArpPacket, EtherType, Ethernet2Header};
use shoal_vxlan::io::LocalResponder;
use shoal_vxlan::wire::Mac;

/// Overlay address to MAC, for the addresses the node answers for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ArpTable {
    entries: HashMap<Ipv4Addr, Mac>,
}

impl ArpTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the MAC for `ip`.
    pub fn insert(&mut self, ip: Ipv4Addr, mac: Mac) {
        self.entries.insert(ip, mac);
    }

    /// Forgets `ip`.
    pub fn remove(&mut self, ip: &Ipv4Addr) {
        self.entries.remove(ip);
    }

    /// The MAC for `ip`.
    pub fn lookup(&self, ip: &Ipv4Addr) -> Option<Mac> {
        self.entries.get(ip).copied()
    }

    /// If `frame` is an ARP request for an address in the table, writes the reply frame into
    /// `reply` (cleared first) and returns `true`.
    pub fn answer(&self, frame: &[u8], reply: &mut Vec<u8>) -> bool {
        let Some(request) = parse_request(frame) else {
            return false;
        };
        let target = request.target_ipv4_addr();
        // A gratuitous ARP (sender = target) announces, it does not ask.
        if target == request.sender_ipv4_addr() {
            return false;
        }
        let Some(mac) = self.lookup(&target) else {
            return false;
        };
        let answer = ArpEthIpv4Packet {
            operation: ArpOperation::REPLY,
            sender_mac: mac.0,
            sender_ipv4: request.target_ipv4,
            target_mac: request.sender_mac,
            target_ipv4: request.sender_ipv4,
        };
        let eth = Ethernet2Header {
            destination: request.sender_mac,
            source: mac.0,
            ether_type: EtherType::ARP,
        };
        reply.clear();
        reply.extend_from_slice(&eth.to_bytes());
        reply.extend_from_slice(&ArpPacket::from(answer).to_bytes());
        true
    }
}

fn parse_request(frame: &[u8]) -> Option<ArpEthIpv4Packet> {
    let (eth, payload) = Ethernet2Header::from_slice(frame).ok()?;
    if eth.ether_type != EtherType::ARP {
        return None;
    }
    let arp = ArpPacket::from_slice(payload).ok()?.try_eth_ipv4().ok()?;
    (arp.operation == ArpOperation::REQUEST).then_some(arp)
}

/// An [`ArpTable`] shared between the control plane (which writes it) and the data path
/// (which answers from it).
#[derive(Debug, Default)]
pub struct ArpResponder {
    table: RwLock<ArpTable>,
}

impl ArpResponder {
    /// A responder with an empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the table.
    pub fn set(&self, table: ArpTable) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// A copy of the table.
    pub fn table(&self) -> ArpTable {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl LocalResponder for ArpResponder {
    fn respond(&self, frame: &[u8], reply: &mut Vec<u8>) -> bool {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .answer(frame, reply)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ASKER_MAC: [u8; 6] = [2, 0x42, 10, 0, 0, 2];
    const ASKER_IP: [u8; 4] = [10, 0, 0, 2];

    fn request(target: [u8; 4], sender_ip: [u8; 4]) -> Vec<u8> {
        let arp = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: ASKER_MAC,
            sender_ipv4: sender_ip,
            target_mac: [0; 6],
            target_ipv4: target,
        };
        let mut f = Ethernet2Header {
            destination: [0xff; 6],
            source: ASKER_MAC,
            ether_type: EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&ArpPacket::from(arp).to_bytes());
        f
    }

    fn table() -> ArpTable {
        let mut t = ArpTable::new();
        t.insert(Ipv4Addr::new(10, 0, 0, 3), Mac([2, 0x42, 10, 0, 0, 3]));
        t
    }

    #[test]
    fn answers_known_address() {
        let mut reply = Vec::new();
        assert!(table().answer(&request([10, 0, 0, 3], ASKER_IP), &mut reply));
        let (eth, rest) = Ethernet2Header::from_slice(&reply).unwrap();
        assert_eq!(eth.destination, ASKER_MAC);
        assert_eq!(eth.source, [2, 0x42, 10, 0, 0, 3]);
        let arp = ArpPacket::from_slice(rest).unwrap().try_eth_ipv4().unwrap();
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_mac, [2, 0x42, 10, 0, 0, 3]);
        assert_eq!(arp.sender_ipv4, [10, 0, 0, 3]);
        assert_eq!(arp.target_mac, ASKER_MAC);
        assert_eq!(arp.target_ipv4, ASKER_IP);
    }

    #[test]
    fn ignores_unknown_gratuitous_and_non_arp() {
        let mut reply = Vec::new();
        let t = table();
        assert!(!t.answer(&request([10, 0, 0, 9], ASKER_IP), &mut reply));
        assert!(!t.answer(&request([10, 0, 0, 3], [10, 0, 0, 3]), &mut reply));
        let mut ip = request([10, 0, 0, 3], ASKER_IP);
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!t.answer(&ip, &mut reply));
        let mut is_reply = request([10, 0, 0, 3], ASKER_IP);
        is_reply[14 + 7] = 2;
        assert!(!t.answer(&is_reply, &mut reply));
        assert!(reply.is_empty());
    }

    #[test]
    fn responder_shares_the_table() {
        let r = ArpResponder::new();
        let mut reply = Vec::new();
        assert!(!r.respond(&request([10, 0, 0, 3], ASKER_IP), &mut reply));
        r.set(table());
        assert!(r.respond(&request([10, 0, 0, 3], ASKER_IP), &mut reply));
    }

    proptest! {
        #[test]
        fn never_panics(frame in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut reply = Vec::new();
            let _ = table().answer(&frame, &mut reply);
        }
    }
}
