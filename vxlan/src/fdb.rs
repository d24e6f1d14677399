//! Forwarding database of one VXLAN network: MAC address to VTEP, and the flood list for
//! broadcast, multicast and unknown unicast (head-end replication, RFC 7348 §4.2 without IP
//! multicast in the underlay).
//!
//! Entries come from two places:
//!
//! - **assigned** by the control plane ([`Fdb::insert`]): a node's own MAC, an external VTEP's.
//!   They stay until the control plane removes them or the VTEP goes.
//! - **learned** from traffic ([`Fdb::learn`], RFC 7348 §4): the source MAC of a frame that a
//!   known peer sent (on an encrypted network: that its session authenticated) is bound to
//!   that peer. Workloads behind a node (containers with MACs of their own) are reached this
//!   way. A learned MAC is bound to its peer while it keeps sending from it, and for
//!   [`LEARNED_AGEING`] after its last frame; then another peer may take it (the workload
//!   moved).
//!
//! So no peer can take a MAC that is assigned to another, or that another has sent from in
//! the last [`LEARNED_AGEING`]: the engine drops such frames (`spoofed_source`). A peer learns
//! at most [`MAX_LEARNED_PER_VTEP`] MACs on a network; frames from more new MACs are dropped
//! (`learn_limit`), so no peer can fill the table.
//!
//! Lookups are one hash probe.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::wire::Mac;

/// How long a learned MAC stays bound to its peer after the last frame from it (the Linux
/// bridge's default ageing time).
pub const LEARNED_AGEING: Duration = Duration::from_secs(300);

/// The most MACs one VTEP can have learned on one network.
pub const MAX_LEARNED_PER_VTEP: usize = 1024;

/// How often, at most, the entries of a VTEP at [`MAX_LEARNED_PER_VTEP`] are searched for aged
/// ones (a pass over the table): a peer sending from ever new MACs costs one pass per period.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// How a MAC came to its VTEP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Set by the control plane.
    Assigned,
    /// Learned from a frame the VTEP sent; when its last frame from the MAC was seen.
    Learned {
        /// The last frame from this MAC.
        seen: Instant,
    },
}

/// Where frames for one MAC go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The underlay address of the VTEP (the node or external VTEP) that owns the MAC.
    pub vtep: IpAddr,
    /// How it came there.
    pub origin: Origin,
}

impl Entry {
    /// Whether a learned entry has aged out at `now` (an assigned one never does).
    fn aged(&self, now: Instant) -> bool {
        matches!(self.origin, Origin::Learned { seen } if now.saturating_duration_since(seen) >= LEARNED_AGEING)
    }
}

/// Why a source MAC was not taken for a VTEP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LearnError {
    /// The MAC is assigned to another VTEP, or learned by another one that still sends from
    /// it.
    #[error("the MAC belongs to the VTEP at {0}")]
    Taken(IpAddr),
    /// The VTEP has learned [`MAX_LEARNED_PER_VTEP`] MACs on this network, none aged out.
    #[error("the VTEP has learned {MAX_LEARNED_PER_VTEP} MACs already")]
    Full,
}

#[derive(Debug, Default, Clone, Copy)]
struct Learned {
    count: usize,
    expired: Option<Instant>,
}

/// The forwarding table of one network.
#[derive(Debug, Default, Clone)]
pub struct Fdb {
    entries: HashMap<Mac, Entry>,
    /// Each VTEP's learned entries: how many, and when they were last searched for aged ones.
    learned: HashMap<IpAddr, Learned>,
    flood: Vec<IpAddr>,
}

impl Fdb {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Assigns `mac` to `vtep` (the control plane's word: it replaces a learned entry too),
    /// returning the entry it replaces.
    pub fn insert(&mut self, mac: Mac, vtep: IpAddr) -> Option<Entry> {
        let old = self.entries.insert(
            mac,
            Entry {
                vtep,
                origin: Origin::Assigned,
            },
        );
        self.forget_learned(old.as_ref());
        old
    }

    /// Removes the entry for `mac`.
    pub fn remove(&mut self, mac: &Mac) -> Option<Entry> {
        let old = self.entries.remove(mac);
        self.forget_learned(old.as_ref());
        old
    }

    fn forget_learned(&mut self, old: Option<&Entry>) {
        if let Some(Entry {
            vtep,
            origin: Origin::Learned { .. },
        }) = old
        {
            if let Some(l) = self.learned.get_mut(vtep) {
                l.count = l.count.saturating_sub(1);
            }
        }
    }

    /// Takes `mac` as a source MAC of a frame `vtep` sent at `now`: an entry of `vtep` is kept
    /// (a learned one refreshed); an unknown MAC, or one another VTEP learned and has not sent
    /// from for [`LEARNED_AGEING`], is learned for `vtep`. A MAC assigned to another VTEP, or
    /// learned by one that still sends from it, is refused, as is a new MAC over `vtep`'s
    /// [`MAX_LEARNED_PER_VTEP`]. Callers check that `vtep` is who sent the frame first.
    pub fn learn(&mut self, mac: Mac, vtep: IpAddr, now: Instant) -> Result<(), LearnError> {
        if let Some(e) = self.entries.get_mut(&mac) {
            if e.vtep == vtep {
                if let Origin::Learned { seen } = &mut e.origin {
                    *seen = now;
                }
                return Ok(());
            }
            if !e.aged(now) {
                return Err(LearnError::Taken(e.vtep));
            }
        }
        if self.learned(&vtep) >= MAX_LEARNED_PER_VTEP && self.expire(vtep, now) == 0 {
            return Err(LearnError::Full);
        }
        let old = self.entries.insert(
            mac,
            Entry {
                vtep,
                origin: Origin::Learned { seen: now },
            },
        );
        self.forget_learned(old.as_ref());
        self.learned.entry(vtep).or_default().count += 1;
        Ok(())
    }

    /// Removes `vtep`'s learned entries that aged out at `now`, if they were not searched in
    /// the last [`EXPIRE_EVERY`]; returns how many. One pass over the table: called only when
    /// `vtep` is at its limit.
    fn expire(&mut self, vtep: IpAddr, now: Instant) -> usize {
        let l = self.learned.entry(vtep).or_default();
        if l.expired
            .is_some_and(|t| now.saturating_duration_since(t) < EXPIRE_EVERY)
        {
            return 0;
        }
        l.expired = Some(now);
        let before = self.entries.len();
        self.entries.retain(|_, e| e.vtep != vtep || !e.aged(now));
        let gone = before - self.entries.len();
        l.count = l.count.saturating_sub(gone);
        gone
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

    /// How many MACs `vtep` has learned.
    pub fn learned(&self, vtep: &IpAddr) -> usize {
        self.learned.get(vtep).map_or(0, |l| l.count)
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

    /// Removes every trace of `vtep`: its MAC entries, assigned and learned, and its place in
    /// the flood list.
    pub fn purge_vtep(&mut self, vtep: &IpAddr) {
        self.entries.retain(|_, e| &e.vtep != vtep);
        self.learned.remove(vtep);
        self.remove_flood(vtep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vteps() -> (IpAddr, IpAddr) {
        ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap())
    }

    fn mac(n: u16) -> Mac {
        let [a, b] = n.to_be_bytes();
        Mac([2, 0, 0, 0, a, b])
    }

    #[test]
    fn insert_lookup_purge() {
        let mut f = Fdb::new();
        let (a, b) = vteps();
        let m1 = mac(1);
        let m2 = mac(2);
        assert_eq!(f.insert(m1, a), None);
        f.insert(m2, b);
        assert_eq!(
            f.insert(m1, b),
            Some(Entry {
                vtep: a,
                origin: Origin::Assigned
            })
        );
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

    /// A MAC learned from one peer is bound to it: another cannot take it, nor one assigned
    /// to a third, until the first has not sent from it for the ageing time.
    #[test]
    fn a_learned_mac_is_bound_to_its_peer() {
        let mut f = Fdb::new();
        let (a, b) = vteps();
        let t0 = Instant::now();
        f.insert(mac(1), a);
        // Its own assigned MAC, and a new one (a workload behind it).
        assert_eq!(f.learn(mac(1), a, t0), Ok(()));
        assert_eq!(f.learn(mac(7), a, t0), Ok(()));
        assert_eq!(f.lookup(&mac(7)).unwrap().vtep, a);
        assert_eq!(f.learned(&a), 1);
        // b cannot take either.
        assert_eq!(f.learn(mac(1), b, t0), Err(LearnError::Taken(a)));
        assert_eq!(f.learn(mac(7), b, t0), Err(LearnError::Taken(a)));
        // a keeps sending from 7: still bound when the first frame is long past.
        let later = t0 + LEARNED_AGEING - Duration::from_secs(1);
        assert_eq!(f.learn(mac(7), a, later), Ok(()));
        let t1 = t0 + LEARNED_AGEING + Duration::from_secs(10);
        assert_eq!(f.learn(mac(7), b, t1), Err(LearnError::Taken(a)));
        // a stops; once aged out, 7 moves to b. The assigned MAC never ages.
        let t2 = later + LEARNED_AGEING;
        assert_eq!(f.learn(mac(7), b, t2), Ok(()));
        assert_eq!(f.lookup(&mac(7)).unwrap().vtep, b);
        assert_eq!((f.learned(&a), f.learned(&b)), (0, 1));
        assert_eq!(
            f.learn(mac(1), b, t2 + LEARNED_AGEING),
            Err(LearnError::Taken(a))
        );
        // The control plane's word wins over a learned entry.
        f.insert(mac(7), a);
        assert_eq!(f.learned(&b), 0);
        assert_eq!(f.learn(mac(7), b, t2), Err(LearnError::Taken(a)));
        f.purge_vtep(&a);
        assert_eq!(f.learn(mac(7), b, t2), Ok(()));
    }

    #[test]
    fn learning_is_bounded_per_vtep() {
        let mut f = Fdb::new();
        let (a, b) = vteps();
        let t0 = Instant::now();
        for n in 0..MAX_LEARNED_PER_VTEP as u16 {
            assert_eq!(f.learn(mac(n), a, t0), Ok(()));
        }
        let over = mac(MAX_LEARNED_PER_VTEP as u16);
        assert_eq!(f.learn(over, a, t0), Err(LearnError::Full));
        assert_eq!(f.lookup(&over), None);
        // Known ones still pass, and other VTEPs learn on.
        assert_eq!(f.learn(mac(3), a, t0), Ok(()));
        assert_eq!(f.learn(over, b, t0), Ok(()));
        // Once its entries age out, the VTEP learns again (the aged ones are dropped).
        let later = t0 + LEARNED_AGEING;
        assert_eq!(f.learn(mac(5000), a, later), Ok(()));
        assert_eq!(f.learned(&a), 1);
        assert_eq!(f.len(), 2);
    }
}
