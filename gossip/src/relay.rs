//! [`RecordQueue`]: the signed items (node records and suspicion witnesses) the core spreads
//! itself, ahead of foca's membership updates.
//!
//! foca fills a datagram with its membership updates first and custom broadcasts after them.
//! Signed records cannot wait there: a relayed update about a new identity or incarnation of
//! a member is dropped wherever that member's record has not arrived yet, and after a healed
//! partition the updates filled every datagram for many seconds. So the core keeps its
//! signed items apart: each (ours, or one accepted from gossip) is sent `max_transmissions`
//! times, freshest first, in the datagrams the core sends anyway (`Membership::piggyback`
//! makes room by leaving out relayed `Alive` updates about others, which records make
//! redundant, and if needed some of the other updates, which foca sends again later).
//!
//! Keeping the witnesses here too lets a refutation end them: once a member's record shows
//! a later incarnation than a suspicion's, that suspicion's witnesses stop being sent (they
//! are 128 bytes each, three per suspicion, and a suspicion is usually refuted within a
//! second).
//!
//! Application entries travel here as well, after records and witnesses (membership first:
//! a burst of entries must not slow failure detection), ours before relayed ones. At most
//! one per (author, key) is queued, the highest version, and at most [`MAX_QUEUED_ENTRIES`]
//! in all: past that the one sent most often goes (push-pull repairs what a node misses).

use std::sync::Arc;

use crate::codec::{seq_after, Entry, Item, NodeRecord};
use crate::identity::{Identity, NodeId};

/// Most entries queued at once (ours and relayed).
pub(crate) const MAX_QUEUED_ENTRIES: usize = 8192;

/// What a queued item is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    /// A node record: at most one per node, the newest; with the bump and incarnation it
    /// states.
    Record {
        id: NodeId,
        seq: u64,
        bump: u32,
        incarnation: u16,
    },
    /// A witness of a suspicion of `subject` at `incarnation`, by `from`.
    Witness {
        subject: Identity,
        incarnation: u16,
        from: NodeId,
    },
    /// An entry of `author`'s table: at most one per (author, key), the highest version.
    Entry {
        author: NodeId,
        key: Vec<u8>,
        version: u64,
    },
}

impl What {
    fn node(&self) -> NodeId {
        match self {
            What::Record { id, .. } => *id,
            What::Witness { subject, .. } => subject.id,
            What::Entry { author, .. } => *author,
        }
    }

    /// Sending order by kind: our record, other records, witnesses, our entries, other
    /// entries (lowest first).
    fn rank(&self, me: Option<NodeId>) -> u8 {
        match self {
            What::Record { id, .. } if Some(*id) == me => 0,
            What::Record { .. } => 1,
            What::Witness { .. } => 2,
            What::Entry { author, .. } if Some(*author) == me => 3,
            What::Entry { .. } => 4,
        }
    }
}

/// One queued item: its encoding and the transmissions it has left.
#[derive(Debug)]
struct Queued {
    what: What,
    item: Vec<u8>,
    left: usize,
    /// When it was queued (a counter): among items with as many transmissions left, the
    /// newest goes first, so each new one spreads at once even behind a backlog.
    queued: u64,
}

/// Signed items to send. Bounded: records are one per directory member, and a node queues
/// at most `QUORUM` witnesses per suspicion it has not seen refuted.
#[derive(Debug, Default)]
pub(crate) struct RecordQueue {
    items: Vec<Queued>,
    pushes: u64,
    /// Entries among `items`.
    entries: usize,
    /// Our own node: its record goes before every other (it is the only source of it).
    me: Option<NodeId>,
}

/// Whether (`b`, `i`) is a later bump or incarnation than (`ob`, `oi`) (bumps compared with
/// wrap-around, as identities are).
pub(crate) fn after(b: u32, i: u16, ob: u32, oi: u16) -> bool {
    ((b.wrapping_sub(ob) as i32) > 0) || (b == ob && i > oi)
}

impl RecordQueue {
    /// A queue for node `me`, whose own records go first.
    pub(crate) fn new(me: NodeId) -> Self {
        RecordQueue {
            me: Some(me),
            ..RecordQueue::default()
        }
    }

    fn add(&mut self, what: What, item: Vec<u8>, transmissions: usize) {
        self.pushes += 1;
        self.items.push(Queued {
            what,
            item,
            left: transmissions,
            queued: self.pushes,
        });
    }

    /// Queues `rec` for `transmissions` sends, replacing an older record of the same node,
    /// and ends the witnesses of suspicions it refutes (of an earlier bump or incarnation).
    pub(crate) fn push(&mut self, rec: &Arc<NodeRecord>, transmissions: usize) {
        let id = rec.subject.id;
        let (b, i) = (rec.subject.bump, rec.incarnation);
        let mut newer_held = false;
        self.items.retain(|q| match &q.what {
            What::Record { id: o, seq, .. } if *o == id => {
                let held = !seq_after(rec.seq, *seq);
                newer_held |= held;
                held
            }
            What::Witness {
                subject,
                incarnation,
                ..
            } if subject.id == id => !after(b, i, subject.bump, *incarnation),
            _ => true,
        });
        if newer_held {
            return;
        }
        self.add(
            What::Record {
                id,
                seq: rec.seq,
                bump: b,
                incarnation: i,
            },
            Item::Node(Arc::clone(rec)).encode(),
            transmissions,
        );
    }

    /// Queues a witness item (`Item::Suspect`) for `transmissions` sends, unless it is
    /// queued already or a later suspicion (or a record showing a later incarnation) of the
    /// same member is; witnesses of earlier suspicions of that member are dropped.
    pub(crate) fn push_witness(&mut self, item: &Item, transmissions: usize) {
        let Item::Suspect {
            subject,
            incarnation,
            from,
            ..
        } = item
        else {
            return;
        };
        let what = What::Witness {
            subject: *subject,
            incarnation: *incarnation,
            from: *from,
        };
        let (b, i) = (subject.bump, *incarnation);
        let mut superseded = false;
        self.items.retain(|q| {
            if q.what.node() != subject.id {
                return true;
            }
            match &q.what {
                What::Witness {
                    subject: s,
                    incarnation: si,
                    ..
                } => {
                    superseded |= q.what == what || after(s.bump, *si, b, i);
                    !after(b, i, s.bump, *si)
                }
                What::Record {
                    bump: rb,
                    incarnation: ri,
                    ..
                } => {
                    superseded |= after(*rb, *ri, b, i);
                    true
                }
                What::Entry { .. } => true,
            }
        });
        if !superseded {
            self.add(what, item.encode(), transmissions);
        }
    }

    /// Queues an entry for `transmissions` sends, replacing a lower version of the same
    /// (author, key); a higher version queued already wins, the same version gets at least
    /// `transmissions` sends left (sent again). Past
    /// [`MAX_QUEUED_ENTRIES`], the queued entry with the fewest transmissions left (a
    /// relayed one before one of ours) goes; returns whether one went.
    pub(crate) fn push_entry(&mut self, e: &Arc<Entry>, transmissions: usize) -> bool {
        let mut newer_held = false;
        let before = self.items.len();
        self.items.retain_mut(|q| match &q.what {
            What::Entry {
                author,
                key,
                version,
            } if *author == e.author && *key == e.key => {
                if *version == e.version {
                    q.left = q.left.max(transmissions);
                }
                let held = *version >= e.version;
                newer_held |= held;
                held
            }
            _ => true,
        });
        self.entries -= before - self.items.len();
        if newer_held {
            return false;
        }
        let mut evicted = false;
        if self.entries >= MAX_QUEUED_ENTRIES {
            let me = self.me;
            let victim = self
                .items
                .iter()
                .enumerate()
                .filter(|(_, q)| matches!(q.what, What::Entry { .. }))
                .min_by_key(|(_, q)| (q.what.rank(me) == 3, q.left, q.queued))
                .map(|(i, _)| i);
            if let Some(i) = victim {
                self.items.swap_remove(i);
                self.entries -= 1;
                evicted = true;
            }
        }
        self.add(
            What::Entry {
                author: e.author,
                key: e.key.clone(),
                version: e.version,
            },
            Item::Entry(Arc::clone(e)).encode(),
            transmissions,
        );
        self.entries += 1;
        evicted
    }

    /// Ends the witnesses of `subject` up to (`bump`, `incarnation`): it refuted them (its
    /// record shows a later incarnation, learnt from push-pull or its own datagrams).
    pub(crate) fn refuted(&mut self, id: NodeId, bump: u32, incarnation: u16) {
        self.items.retain(|q| match &q.what {
            What::Witness {
                subject,
                incarnation: si,
                ..
            } if subject.id == id => !after(bump, incarnation, subject.bump, *si),
            _ => true,
        });
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of items queued.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Writes as many items as fit in `budget` bytes into `out`, each as `len u16 | item`
    /// (foca's custom broadcast framing), counting one transmission for each: our own record
    /// first, then the other records, then witnesses, each freshest first (most
    /// transmissions left, then the newest). Records are what refutes and heals; witnesses
    /// only hasten declarations, and a mass event (a healed partition: every node suspects
    /// half the cluster) makes more of them than any queue can send. Returns the bytes
    /// written.
    pub(crate) fn fill(&mut self, out: &mut Vec<u8>, budget: usize) -> usize {
        if self.items.is_empty() {
            return 0;
        }
        let me = self.me;
        self.items.sort_by(|a, b| {
            a.what
                .rank(me)
                .cmp(&b.what.rank(me))
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
        self.retain_queued(|q| q.left > 0);
        used
    }

    /// Keeps the items for which `keep` says yes, counting the entries that go.
    fn retain_queued(&mut self, keep: impl FnMut(&Queued) -> bool) {
        self.items.retain(keep);
        self.entries = self
            .items
            .iter()
            .filter(|q| matches!(q.what, What::Entry { .. }))
            .count();
    }

    /// The smallest queued item with its framing, if any.
    pub(crate) fn smallest(&self) -> Option<usize> {
        self.items.iter().map(|q| 2 + q.item.len()).min()
    }

    /// Forgets the items about nodes (or by authors) for which `keep` says no.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&NodeId) -> bool) {
        self.retain_queued(|q| keep(&q.what.node()));
    }

    /// Forgets the entries of `author` (it left or went down for good here).
    pub(crate) fn drop_entries_of(&mut self, author: &NodeId) {
        self.retain_queued(|q| !matches!(&q.what, What::Entry { author: a, .. } if a == author));
    }

    /// Heap bytes (the simulation's memory figures).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.items.capacity() * size_of::<Queued>()
            + self.items.iter().map(|q| q.item.capacity()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Metadata, Role};

    fn ident(n: u128, bump: u32) -> Identity {
        Identity::new(
            NodeId::from_index(n),
            "198.18.0.1:7946".parse().unwrap(),
            bump,
        )
    }

    fn record(n: u128, seq: u64, inc: u16) -> Arc<NodeRecord> {
        Arc::new(NodeRecord {
            subject: ident(n, 1),
            incarnation: inc,
            seq,
            leaving: false,
            meta: Metadata {
                vtep: "198.18.0.1".parse().unwrap(),
                data_port: 4789,
                public_key: [0; 32],
                incarnation: [0; 16],
                role: Role::Worker,
                version: "t".into(),
            },
            sig: [0; 64],
        })
    }

    fn witness(n: u128, inc: u16, from: u128) -> Item {
        Item::Suspect {
            subject: ident(n, 1),
            incarnation: inc,
            from: NodeId::from_index(from),
            sig: [0; 64],
        }
    }

    fn drain(q: &mut RecordQueue) -> Vec<Item> {
        let mut out = Vec::new();
        q.fill(&mut out, 100_000);
        let mut items = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = u16::from_be_bytes([out[at], out[at + 1]]) as usize;
            items.push(Item::decode(&out[at + 2..at + 2 + len]).unwrap());
            at += 2 + len;
        }
        items
    }

    #[test]
    fn own_record_first_then_freshest_and_each_sent_its_count() {
        let mut q = RecordQueue::new(NodeId::from_index(1));
        q.push(&record(2, 5, 0), 2);
        q.push(&record(3, 5, 0), 2);
        q.push(&record(1, 5, 0), 2);
        q.push_witness(&witness(4, 0, 5), 2);
        let first = drain(&mut q);
        assert!(matches!(&first[0], Item::Node(r) if r.subject.id == NodeId::from_index(1)));
        // then the newest of the others
        assert!(matches!(&first[1], Item::Node(r) if r.subject.id == NodeId::from_index(3)));
        // and the witness, though newer, after the records
        assert!(matches!(&first[3], Item::Suspect { .. }));
        assert_eq!(drain(&mut q).len(), 4);
        assert!(q.is_empty());
        // an older record of a node does not replace a newer one
        q.push(&record(2, 6, 0), 1);
        q.push(&record(2, 5, 0), 1);
        let items = drain(&mut q);
        assert!(matches!(&items[..], [Item::Node(r)] if r.seq == 6));
    }

    fn entry(author: u128, key: &str, version: u64) -> Arc<Entry> {
        Arc::new(Entry {
            author: NodeId::from_index(author),
            key: key.as_bytes().to_vec(),
            version,
            value: Some(vec![7; 10]),
            sig: [0; 64],
        })
    }

    #[test]
    fn entries_go_after_membership_ours_first_one_per_key() {
        let mut q = RecordQueue::new(NodeId::from_index(1));
        q.push_entry(&entry(2, "a", 5), 2);
        q.push_entry(&entry(1, "a", 5), 2);
        q.push_witness(&witness(4, 0, 5), 2);
        q.push(&record(3, 5, 0), 2);
        // a lower or equal version does not replace a queued one (the equal one gets its
        // transmissions back); a higher one does
        q.push_entry(&entry(2, "a", 4), 2);
        q.push_entry(&entry(2, "a", 5), 2);
        q.push_entry(&entry(2, "b", 1), 2);
        q.push_entry(&entry(2, "b", 2), 2);
        let items = drain(&mut q);
        assert_eq!(items.len(), 5, "{items:?}");
        assert!(matches!(&items[0], Item::Node(_)));
        assert!(matches!(&items[1], Item::Suspect { .. }));
        assert!(matches!(&items[2], Item::Entry(e) if e.author == NodeId::from_index(1)));
        let keys: Vec<(Vec<u8>, u64)> = items[3..]
            .iter()
            .map(|i| match i {
                Item::Entry(e) => (e.key.clone(), e.version),
                _ => panic!("{i:?}"),
            })
            .collect();
        // the newest first among equals
        assert_eq!(keys, vec![(b"b".to_vec(), 2), (b"a".to_vec(), 5)]);
        drain(&mut q);
        assert!(q.is_empty());
        assert_eq!(q.entries, 0);
        // an author's entries can be dropped from the queue
        q.push_entry(&entry(2, "a", 6), 2);
        q.push_entry(&entry(3, "a", 6), 2);
        q.drop_entries_of(&NodeId::from_index(2));
        assert_eq!(q.len(), 1);
        assert_eq!(q.entries, 1);
    }

    #[test]
    fn the_entry_queue_is_bounded_ours_kept() {
        let mut q = RecordQueue::new(NodeId::from_index(1));
        assert!(!q.push_entry(&entry(1, "own", 1), 1));
        for i in 0..MAX_QUEUED_ENTRIES - 1 {
            assert!(!q.push_entry(&entry(2, &i.to_string(), 1), 3));
        }
        assert_eq!(q.len(), MAX_QUEUED_ENTRIES);
        // full: the relayed entry with the fewest transmissions left goes, not ours
        let mut sent = Vec::new();
        q.fill(&mut sent, 2 + Item::Entry(entry(2, "0", 1)).len());
        assert!(q.push_entry(&entry(3, "new", 1), 3));
        assert_eq!(q.len(), MAX_QUEUED_ENTRIES);
        let items = drain(&mut q);
        assert!(matches!(&items[0], Item::Entry(e) if e.author == NodeId::from_index(1)));
        assert!(items
            .iter()
            .any(|i| matches!(i, Item::Entry(e) if e.author == NodeId::from_index(3))));
    }

    #[test]
    fn a_refutation_ends_the_witnesses_of_its_suspicion() {
        let mut q = RecordQueue::new(NodeId::from_index(1));
        q.push_witness(&witness(2, 0, 5), 4);
        q.push_witness(&witness(2, 0, 6), 4);
        q.push_witness(&witness(2, 0, 6), 4); // already queued
        q.push_witness(&witness(3, 0, 5), 4);
        assert_eq!(q.len(), 3);
        // node 2's record at incarnation 1 refutes its suspicion at 0
        q.push(&record(2, 9, 1), 4);
        assert_eq!(q.len(), 2);
        // a record at the same incarnation does not
        q.push(&record(3, 9, 0), 4);
        assert_eq!(q.len(), 3);
        // nor is a witness of the refuted suspicion queued again
        q.push_witness(&witness(2, 0, 7), 4);
        q.push_witness(&witness(2, 1, 7), 4);
        assert_eq!(q.len(), 4);
        // node 3 refuted, learnt another way
        q.refuted(NodeId::from_index(3), 1, 1);
        let items = drain(&mut q);
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(items.iter().all(
            |i| !matches!(i, Item::Suspect { subject, .. } if subject.id == NodeId::from_index(3))
        ));
    }
}
