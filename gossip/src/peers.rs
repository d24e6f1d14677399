//! [`Peers`]: what the core keeps per member besides foca's own record, in one compact table
//! sorted by node ID: the member's metadata (version, leaving flag, shared value) and whether
//! foca reports it up and we announced it.
//!
//! It replaces two hash maps (metadata by node ID, and up members by node ID with their
//! identity). Three parallel vectors cost 42 bytes per member, against about 230 for the two
//! maps (with their empty buckets, a metadata copy and its version string per holder). That
//! matters to the simulation, which holds N full memberships in one process; one agent holds
//! one. Lookups are a binary search; inserting a member not yet known moves the tail of the
//! vectors (members join rarely, and a full state arrives sorted, so it appends).

use std::sync::Arc;

use crate::identity::{Metadata, NodeId};

/// The member announced it is leaving (its latest metadata carries the flag).
const LEAVING: u8 = 1;
/// foca reports the member up.
const UP: u8 = 2;
/// We emitted `Event::Up` for it (its metadata had arrived).
const ANNOUNCED: u8 = 4;

/// Per-member state, sorted by node ID. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    ids: Vec<NodeId>,
    /// Metadata version and value, `None` until metadata arrived.
    metas: Vec<Option<(u64, Arc<Metadata>)>>,
    flags: Vec<u8>,
}

/// A member's metadata as held: version, leaving flag, value.
pub(crate) struct MetaRef<'a> {
    /// Version (higher wins).
    pub(crate) seq: u64,
    /// The member is leaving on purpose.
    pub(crate) leaving: bool,
    /// The value.
    pub(crate) meta: &'a Arc<Metadata>,
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
                self.metas.insert(i, None);
                self.flags.insert(i, 0);
                i
            }
        }
    }

    /// Drops the entry at `i` when it holds nothing any more.
    fn prune(&mut self, i: usize) {
        if self.metas[i].is_none() && self.flags[i] & (UP | ANNOUNCED) == 0 {
            self.ids.remove(i);
            self.metas.remove(i);
            self.flags.remove(i);
        }
    }

    /// Makes room for `extra` more members without over-allocating (a state restore).
    pub(crate) fn reserve_exact(&mut self, extra: usize) {
        self.ids.reserve_exact(extra);
        self.metas.reserve_exact(extra);
        self.flags.reserve_exact(extra);
    }

    /// The metadata held for `id`.
    pub(crate) fn meta(&self, id: &NodeId) -> Option<MetaRef<'_>> {
        let i = self.find(id).ok()?;
        let (seq, meta) = self.metas[i].as_ref()?;
        Some(MetaRef {
            seq: *seq,
            leaving: self.flags[i] & LEAVING != 0,
            meta,
        })
    }

    /// Stores metadata for `id` (replacing what was held).
    pub(crate) fn set_meta(&mut self, id: NodeId, seq: u64, leaving: bool, meta: Arc<Metadata>) {
        let i = self.slot(id);
        self.metas[i] = Some((seq, meta));
        if leaving {
            self.flags[i] |= LEAVING;
        } else {
            self.flags[i] &= !LEAVING;
        }
    }

    /// Every metadata held, in node ID order.
    pub(crate) fn metas(&self) -> impl Iterator<Item = (NodeId, MetaRef<'_>)> + '_ {
        self.ids
            .iter()
            .zip(&self.metas)
            .zip(&self.flags)
            .filter_map(|((id, m), f)| {
                m.as_ref().map(|(seq, meta)| {
                    (
                        *id,
                        MetaRef {
                            seq: *seq,
                            leaving: f & LEAVING != 0,
                            meta,
                        },
                    )
                })
            })
    }

    /// Forgets the metadata for which `keep` says no.
    pub(crate) fn retain_metas(&mut self, mut keep: impl FnMut(&NodeId, &Metadata) -> bool) {
        let mut i = 0;
        while i < self.ids.len() {
            let drop = self.metas[i]
                .as_ref()
                .is_some_and(|(_, m)| !keep(&self.ids[i], m));
            if drop {
                self.metas[i] = None;
                self.flags[i] &= !LEAVING;
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
        self.flags[i] = (self.flags[i] & LEAVING) | UP | if announced { ANNOUNCED } else { 0 };
    }

    /// Marks `id` no longer up; returns whether it was up, and then whether it was announced.
    pub(crate) fn remove_up(&mut self, id: &NodeId) -> Option<bool> {
        let i = self.find(id).ok()?;
        let f = self.flags[i];
        if f & UP == 0 {
            return None;
        }
        self.flags[i] = f & LEAVING;
        self.prune(i);
        Some(f & ANNOUNCED != 0)
    }

    /// Bytes held (capacity, not length), for the simulation's memory breakdown.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ids.capacity() * size_of::<NodeId>()
            + self.metas.capacity() * size_of::<Option<(u64, Arc<Metadata>)>>()
            + self.flags.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    fn meta(v: &str) -> Arc<Metadata> {
        Arc::new(Metadata {
            vtep: "198.18.0.1".parse().unwrap(),
            data_port: 4789,
            public_key: [1; 32],
            incarnation: 1,
            role: Role::Worker,
            version: v.into(),
        })
    }

    #[test]
    fn metadata_and_up_state_kept_apart_and_sorted() {
        let mut p = Peers::default();
        let (a, b, c) = (
            NodeId::from_index(3),
            NodeId::from_index(1),
            NodeId::from_index(2),
        );
        p.set_meta(a, 5, false, meta("a"));
        p.set_up(b, false);
        p.set_meta(c, 7, true, meta("c"));
        assert_eq!(p.ids, vec![b, c, a]);
        assert!(p.meta(&b).is_none());
        assert_eq!(p.up(&b), Some(false));
        assert_eq!(p.up(&a), None);
        let m = p.meta(&c).unwrap();
        assert_eq!((m.seq, m.leaving, m.meta.version.as_str()), (7, true, "c"));
        // Up keeps the leaving flag; a newer metadata clears it.
        p.set_up(c, true);
        assert_eq!(p.up(&c), Some(true));
        assert!(p.meta(&c).unwrap().leaving);
        p.set_meta(c, 8, false, meta("c2"));
        assert!(!p.meta(&c).unwrap().leaving);
        let order: Vec<NodeId> = p.metas().map(|(id, _)| id).collect();
        assert_eq!(order, vec![c, a]);
        // b holds nothing once down: its entry goes.
        assert_eq!(p.remove_up(&b), Some(false));
        assert_eq!(p.remove_up(&b), None);
        assert_eq!(p.ids, vec![c, a]);
        // Dropping c's metadata keeps its up entry; dropping a's removes a.
        p.retain_metas(|_, _| false);
        assert_eq!(p.ids, vec![c]);
        assert_eq!(p.up(&c), Some(true));
        assert!(p.meta(&c).is_none());
    }
}
