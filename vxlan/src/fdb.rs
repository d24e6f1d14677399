//! Forwarding database of one VXLAN network: MAC address to VTEP, set by the control plane, and
//! the flood list for broadcast, multicast and unknown unicast (head-end replication, RFC 7348
//! §4.2 without IP multicast in the underlay).
//!
//! Lookups are one hash probe. No entries are learned from traffic: a peer's frames can only
//! claim the MACs the control plane gave it (see `crate::engine`).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::wire::Mac;

/// Where frames for one MAC go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The underlay address of the VTEP (the node or external VTEP) that owns the MAC.
    pub vtep: IpAddr,
}

/// The forwarding table of one network.
#[derive(Debug, Default, Clone)]
pub struct Fdb {
    entries: HashMap<Mac, Entry>,
    flood: Vec<IpAddr>,
}

impl Fdb {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the VTEP for `mac`, returning the entry it replaces.
    pub fn insert(&mut self, mac: Mac, vtep: IpAddr) -> Option<Entry> {
        self.entries.insert(mac, Entry { vtep })
    }

    /// Removes the entry for `mac`.
    pub fn remove(&mut self, mac: &Mac) -> Option<Entry> {
        self.entries.remove(mac)
    }

    /// The VTEP for `mac`.
    pub fn lookup(&self, mac: &Mac) -> Option<&Entry> {
        self.entries.get(mac)
    }

    /// Number of MAC entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no MAC entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The MAC entries.
    pub fn entries(&self) -> impl Iterator<Item = (&Mac, &Entry)> {
        self.entries.iter()
    }

    /// Adds `vtep` to the flood list (once).
    pub fn add_flood(&mut self, vtep: IpAddr) {
        if !self.flood.contains(&vtep) {
            self.flood.push(vtep);
        }
    }

    /// Removes `vtep` from the flood list.
    pub fn remove_flood(&mut self, vtep: &IpAddr) {
        self.flood.retain(|v| v != vtep);
    }

    /// The VTEPs that get a copy of each broadcast, multicast or unknown-unicast frame.
    pub fn flood(&self) -> &[IpAddr] {
        &self.flood
    }

    /// Removes every trace of `vtep`: its MAC entries and its place in the flood list.
    pub fn purge_vtep(&mut self, vtep: &IpAddr) {
        self.entries.retain(|_, e| &e.vtep != vtep);
        self.remove_flood(vtep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_purge() {
        let mut f = Fdb::new();
        let (a, b): (IpAddr, IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        let m1 = Mac([2, 0, 0, 0, 0, 1]);
        let m2 = Mac([2, 0, 0, 0, 0, 2]);
        assert_eq!(f.insert(m1, a), None);
        f.insert(m2, b);
        assert_eq!(f.insert(m1, b), Some(Entry { vtep: a }));
        f.insert(m1, a);
        f.add_flood(a);
        f.add_flood(a);
        f.add_flood(b);
        assert_eq!(f.flood(), &[a, b]);
        assert_eq!(f.lookup(&m1).unwrap().vtep, a);
        f.purge_vtep(&a);
        assert_eq!(f.lookup(&m1), None);
        assert_eq!(f.lookup(&m2).unwrap().vtep, b);
        assert_eq!(f.flood(), &[b]);
        assert_eq!(f.len(), 1);
    }
}
