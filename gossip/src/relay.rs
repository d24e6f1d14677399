//! [`RecordQueue`]: the signed node records we spread ourselves, ahead of foca's membership
//! updates.
//!
//! foca fills a datagram with its membership updates first and custom broadcasts after them.
//! Signed records cannot wait there: a relayed update about a new identity or incarnation of
//! a member is dropped wherever that member's record has not arrived yet, and after a healed
//! partition, or any wave of renewals, the updates fill every datagram for many seconds. So
//! the core keeps records apart: each record (ours, or one accepted from gossip) is sent
//! `max_transmissions` times, freshest first, in the datagrams the core sends anyway
//! (`Membership::absorb` makes room by leaving out relayed `Alive` updates about others,
//! which records make redundant, and if needed some of the other updates, which foca sends
//! again later).

use std::sync::Arc;

use crate::codec::{Item, NodeRecord};
use crate::identity::NodeId;

/// One queued record: its encoded item and the transmissions it has left.
#[derive(Debug)]
struct Queued {
    id: NodeId,
    seq: u64,
    item: Vec<u8>,
    left: usize,
    /// When it was queued (a counter): among records with as many transmissions left, the
    /// newest goes first, so each new record spreads at once even behind a backlog.
    queued: u64,
}

/// Records to send, at most one per node (the newest). Bounded by the directory: only
/// records that verified under a directory key are queued.
#[derive(Debug, Default)]
pub(crate) struct RecordQueue {
    items: Vec<Queued>,
    pushes: u64,
    /// Our own node: its record goes before every other (it is the only source of it).
    me: Option<NodeId>,
}

impl RecordQueue {
    /// A queue for node `me`, whose own records go first.
    pub(crate) fn new(me: NodeId) -> Self {
        RecordQueue {
            me: Some(me),
            ..RecordQueue::default()
        }
    }

    /// Queues `rec` for `transmissions` sends, replacing an older record of the same node.
    pub(crate) fn push(&mut self, rec: &Arc<NodeRecord>, transmissions: usize) {
        let id = rec.subject.id;
        self.pushes += 1;
        if let Some(q) = self.items.iter_mut().find(|q| q.id == id) {
            if q.seq >= rec.seq {
                return;
            }
            q.seq = rec.seq;
            q.item = Item::Node(Arc::clone(rec)).encode();
            q.left = transmissions;
            q.queued = self.pushes;
            return;
        }
        self.items.push(Queued {
            id,
            seq: rec.seq,
            item: Item::Node(Arc::clone(rec)).encode(),
            left: transmissions,
            queued: self.pushes,
        });
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of records queued.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Writes as many records as fit in `budget` bytes into `out`, each as `len u16 | item`
    /// (foca's custom broadcast framing), freshest first (most transmissions left, then the
    /// newest; our own record before all), counting one transmission for each. Returns the
    /// bytes written.
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>, budget: usize) -> usize {
        if self.items.is_empty() {
            return 0;
        }
        let me = self.me;
        self.items.sort_by(|a, b| {
            (Some(b.id) == me)
                .cmp(&(Some(a.id) == me))
                .then(b.left.cmp(&a.left))
                .then(b.queued.cmp(&a.queued))
        });
        let mut used = 0;
        for q in &mut self.items {
            let need = 2 + q.item.len();
            if used + need > budget {
                continue;
            }
            out.extend_from_slice(&(q.item.len() as u16).to_be_bytes());
            out.extend_from_slice(&q.item);
            used += need;
            q.left -= 1;
        }
        self.items.retain(|q| q.left > 0);
        used
    }

    /// The smallest queued record with its framing, if any.
    pub(crate) fn smallest(&self) -> Option<usize> {
        self.items.iter().map(|q| 2 + q.item.len()).min()
    }

    /// Forgets the records of nodes for which `keep` says no.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&NodeId) -> bool) {
        self.items.retain(|q| keep(&q.id));
    }

    /// Heap bytes (the simulation's memory figures).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.items.capacity() * size_of::<Queued>()
            + self.items.iter().map(|q| q.item.capacity()).sum::<usize>()
    }
}
