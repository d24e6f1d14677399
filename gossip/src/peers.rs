//! [`Peers`]: what the core keeps per member besides foca's own record, in one compact table
//! sorted by node ID: the member's latest signed record (shared, with its metadata) and
//! whether foca reports it up and we announced it.
//!
//! Two parallel vectors plus the IDs cost 34 bytes per member (ID, record pointer, flags).
//! That matters to the simulation, which holds N full memberships in one process; one agent
//! holds one. Lookups are a binary search; inserting a member not yet known moves the tail of
//! the vectors (members join rarely, and a full state arrives sorted, so it appends).

use std::sync::Arc;

use crate::codec::NodeRecord;
use crate::identity::NodeId;

/// foca reports the member up.
const UP: u8 = 2;
/// We emitted `Event::Up` for it (its record had arrived).
const ANNOUNCED: u8 = 4;

/// Per-member state, sorted by node ID. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    ids: Vec<NodeId>,
    /// The member's latest signed record (its public key filled in), `None` until one
    /// arrived.
    records: Vec<Option<Arc<NodeRecord>>>,
    flags: Vec<u8>,
}

impl Peers {
    fn find(&self, id: &NodeId) -> Result<usize, usize> {
        self.ids.binary_search(id)
    }

    /// Index of `id`, inserting an empty entry if it is not there.
    fn slot(&mut self, id: NodeId) -> usize {
        match self.find(&id) {
            Ok(i) => i,
            Err(i) => {
                self.ids.insert(i, id);
                self.records.insert(i, None);
                self.flags.insert(i, 0);
                i
            }
        }
    }

    /// Drops the entry at `i` when it holds nothing any more.
    fn prune(&mut self, i: usize) {
        if self.records[i].is_none() && self.flags[i] & (UP | ANNOUNCED) == 0 {
            self.ids.remove(i);
            self.records.remove(i);
            self.flags.remove(i);
        }
    }

    /// Makes room for `extra` more members without over-allocating (a state restore).
    pub(crate) fn reserve_exact(&mut self, extra: usize) {
        self.ids.reserve_exact(extra);
        self.records.reserve_exact(extra);
        self.flags.reserve_exact(extra);
    }

    /// The record held for `id`.
    pub(crate) fn record(&self, id: &NodeId) -> Option<&Arc<NodeRecord>> {
        let i = self.find(id).ok()?;
        self.records[i].as_ref()
    }

    /// Stores the record of `id` (replacing what was held).
    pub(crate) fn set_record(&mut self, id: NodeId, record: Arc<NodeRecord>) {
        let i = self.slot(id);
        self.records[i] = Some(record);
    }

    /// Every record held, in node ID order.
    pub(crate) fn records(&self) -> impl Iterator<Item = (NodeId, &Arc<NodeRecord>)> + '_ {
        self.ids
            .iter()
            .zip(&self.records)
            .filter_map(|(id, r)| r.as_ref().map(|r| (*id, r)))
    }

    /// Forgets the records of the members for which `keep` says no.
    pub(crate) fn retain_records(&mut self, mut keep: impl FnMut(&NodeId) -> bool) {
        let mut i = 0;
        while i < self.ids.len() {
            if self.records[i].is_some() && !keep(&self.ids[i]) {
                self.records[i] = None;
                let before = self.ids.len();
                self.prune(i);
                if self.ids.len() < before {
                    continue;
                }
            }
            i += 1;
        }
    }

    /// `Some(announced)` if foca reports `id` up.
    pub(crate) fn up(&self, id: &NodeId) -> Option<bool> {
        let i = self.find(id).ok()?;
        let f = self.flags[i];
        (f & UP != 0).then_some(f & ANNOUNCED != 0)
    }

    /// Marks `id` up, announced or not.
    pub(crate) fn set_up(&mut self, id: NodeId, announced: bool) {
        let i = self.slot(id);
        self.flags[i] = UP | if announced { ANNOUNCED } else { 0 };
    }

    /// Marks `id` no longer up; returns whether it was up, and then whether it was announced.
    pub(crate) fn remove_up(&mut self, id: &NodeId) -> Option<bool> {
        let i = self.find(id).ok()?;
        let f = self.flags[i];
        if f & UP == 0 {
            return None;
        }
        self.flags[i] = 0;
        self.prune(i);
        Some(f & ANNOUNCED != 0)
    }

    /// Bytes held (capacity, not length), for the simulation's memory breakdown.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ids.capacity() * size_of::<NodeId>()
            + self.records.capacity() * size_of::<Option<Arc<NodeRecord>>>()
            + self.flags.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Metadata, Role};

    fn record(id: NodeId, seq: u64, v: &str) -> Arc<NodeRecord> {
        Arc::new(NodeRecord {
            subject: Identity::new(id, "198.18.0.1:7946".parse().unwrap(), 1),
            incarnation: 0,
            seq,
            leaving: false,
            meta: Metadata {
                vtep: "198.18.0.1".parse().unwrap(),
                data_port: 4789,
                public_key: [1; 32],
                incarnation: [1; 16],
                role: Role::Worker,
                version: v.into(),
            },
            sig: [0; 64],
        })
    }

    #[test]
    fn records_and_up_state_kept_apart_and_sorted() {
        let mut p = Peers::default();
        let (a, b, c) = (
            NodeId::from_index(3),
            NodeId::from_index(1),
            NodeId::from_index(2),
        );
        p.set_record(a, record(a, 5, "a"));
        p.set_up(b, false);
        p.set_record(c, record(c, 7, "c"));
        assert_eq!(p.ids, vec![b, c, a]);
        assert!(p.record(&b).is_none());
        assert_eq!(p.up(&b), Some(false));
        assert_eq!(p.up(&a), None);
        let r = p.record(&c).unwrap();
        assert_eq!((r.seq, r.meta.version.as_str()), (7, "c"));
        p.set_up(c, true);
        assert_eq!(p.up(&c), Some(true));
        p.set_record(c, record(c, 8, "c2"));
        assert_eq!(p.record(&c).unwrap().seq, 8);
        let order: Vec<NodeId> = p.records().map(|(id, _)| id).collect();
        assert_eq!(order, vec![c, a]);
        // b holds nothing once down: its entry goes.
        assert_eq!(p.remove_up(&b), Some(false));
        assert_eq!(p.remove_up(&b), None);
        assert_eq!(p.ids, vec![c, a]);
        // Dropping c's record keeps its up entry; dropping a's removes a.
        p.retain_records(|_| false);
        assert_eq!(p.ids, vec![c]);
        assert_eq!(p.up(&c), Some(true));
        assert!(p.record(&c).is_none());
    }
}
