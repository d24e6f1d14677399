//! [`Table`]: the application entries the core holds (every author's, ours included), and
//! their lifetimes.
//!
//! One entry per (author, key), the highest version held. A tombstone (a deleted key) is
//! kept for the tombstone time to live, then forgotten, so that an older copy still
//! travelling is recognized as stale meanwhile. An author's entries are dropped when it
//! left, or once it has been down for the grace period; until it comes back up, its entries
//! are refused (a copy relayed by a slower node would otherwise bring them back). Refused,
//! but parked for [`PARK_FOR`]: an author that comes back sends its entries again at once,
//! and some arrive just before the record that takes it back up here; those are taken when
//! it does.
//!
//! Sans-IO like the core: time comes in as `now`. The table checks nothing cryptographic;
//! the core verifies an entry's signature after [`Table::check`] passed and before
//! [`Table::insert`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::Entry;
use crate::identity::NodeId;

/// How long an entry of a gone author is parked, waiting for its author to come back up.
pub(crate) const PARK_FOR: Duration = Duration::from_secs(10);

/// Most entries parked at once (the oldest go first).
pub(crate) const MAX_PARKED: usize = 4096;

/// An entry parked: when, whether it came in a datagram (then it is spread on once taken),
/// and the entry (its signature verified).
type Parked = (Instant, bool, Arc<Entry>);

/// Why a received entry is not taken (the checks before its signature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not newer than the entry held for its (author, key).
    Stale,
    /// A new key of an author that holds the most entries allowed already.
    OverLimit,
    /// Its author left, or has been down for the grace period or longer.
    Gone,
}

/// Why an author's entries are refused or about to be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// Declared down at this instant.
    Down(Instant),
    /// Left on purpose (its signed record said so).
    Left,
}

/// An entry held, and when it is forgotten if it is a tombstone.
#[derive(Debug)]
struct Held {
    entry: Arc<Entry>,
    forget_at: Option<Instant>,
}

/// Every entry held, by author then key (so push-pull states come out in their canonical
/// order, and runs are reproducible). See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Table {
    authors: BTreeMap<NodeId, BTreeMap<Vec<u8>, Held>>,
    /// Tombstones by the instant they are forgotten; an item whose tombstone was replaced
    /// meanwhile is skipped when it comes up.
    forget: BinaryHeap<Reverse<(Instant, NodeId, Vec<u8>)>>,
    /// Authors down or left.
    gone: HashMap<NodeId, Gone>,
    /// When the entries of a down author are due to be dropped; an item whose author came
    /// back (or went down again later) is skipped when it comes up.
    drops: BinaryHeap<Reverse<(Instant, NodeId)>>,
    /// Entries held, tombstones included.
    len: usize,
    /// Entries of gone authors (see the module docs), oldest first.
    parked: Vec<Parked>,
    /// Parked entries whose author came back up: for the core to take.
    unparked: Vec<(bool, Arc<Entry>)>,
}

impl Table {
    /// The checks before the signature: `e` must be newer than what is held for its (author,
    /// key), its author neither left nor down for `grace` or longer, and a new key must fit
    /// under `max_per_author`.
    pub(crate) fn check(
        &self,
        e: &Entry,
        max_per_author: usize,
        grace: Duration,
        now: Instant,
    ) -> Result<(), Refused> {
        let table = self.authors.get(&e.author);
        let held = table.and_then(|t| t.get(&e.key));
        if held.is_some_and(|h| e.version <= h.entry.version) {
            return Err(Refused::Stale);
        }
        match self.gone.get(&e.author) {
            Some(Gone::Left) => return Err(Refused::Gone),
            Some(Gone::Down(since)) if now.saturating_duration_since(*since) >= grace => {
                return Err(Refused::Gone)
            }
            _ => {}
        }
        if held.is_none() && table.map_or(0, BTreeMap::len) >= max_per_author {
            return Err(Refused::OverLimit);
        }
        Ok(())
    }

    /// Holds `e` (checked and verified), replacing what was held for its (author, key). A
    /// tombstone is forgotten `tombstone_ttl` after `now`; an author down has its entries
    /// dropped `grace` after it went down.
    pub(crate) fn insert(
        &mut self,
        e: Arc<Entry>,
        now: Instant,
        tombstone_ttl: Duration,
        grace: Duration,
    ) {
        let forget_at = e.is_tombstone().then(|| now + tombstone_ttl);
        if let Some(at) = forget_at {
            self.forget.push(Reverse((at, e.author, e.key.clone())));
        }
        let table = self.authors.entry(e.author).or_default();
        let first = table.is_empty();
        let held = Held {
            entry: Arc::clone(&e),
            forget_at,
        };
        if table.insert(e.key.clone(), held).is_none() {
            self.len += 1;
        }
        if first {
            // The first entry of an author down (within the grace): its drop is due.
            if let Some(Gone::Down(since)) = self.gone.get(&e.author) {
                self.drops.push(Reverse((*since + grace, e.author)));
            }
        }
    }

    /// The entry held for (`author`, `key`), tombstone or not.
    pub(crate) fn get(&self, author: &NodeId, key: &[u8]) -> Option<&Arc<Entry>> {
        self.authors.get(author)?.get(key).map(|h| &h.entry)
    }

    /// Entries held for `author`, tombstones included.
    pub(crate) fn author_len(&self, author: &NodeId) -> usize {
        self.authors.get(author).map_or(0, BTreeMap::len)
    }

    /// Entries held, tombstones included.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every entry held, tombstones included, in (author, key) order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.authors
            .values()
            .flat_map(|t| t.values().map(|h| &h.entry))
    }

    /// `author`'s entries, tombstones included, in key order.
    pub(crate) fn of(&self, author: &NodeId) -> impl Iterator<Item = &Arc<Entry>> + '_ {
        self.authors
            .get(author)
            .into_iter()
            .flat_map(|t| t.values().map(|h| &h.entry))
    }

    /// `author` is up (again): its entries are welcome, those parked first
    /// ([`Table::take_unparked`]).
    pub(crate) fn up(&mut self, author: &NodeId) {
        if self.gone.remove(author).is_none() || self.parked.is_empty() {
            return;
        }
        let (back, keep): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(_, _, e)| e.author == *author);
        self.parked = keep;
        self.unparked
            .extend(back.into_iter().map(|(_, relay, e)| (relay, e)));
    }

    /// Whether this very entry (author, key, version) is parked already.
    pub(crate) fn is_parked(&self, e: &Entry) -> bool {
        self.parked
            .iter()
            .any(|(_, _, p)| p.author == e.author && p.version == e.version && p.key == e.key)
    }

    /// Parks an entry refused because its author is gone (its signature verified), for
    /// [`PARK_FOR`]; `relay`: it came in a datagram.
    pub(crate) fn park(&mut self, e: Arc<Entry>, relay: bool, now: Instant) {
        self.parked
            .retain(|(at, _, _)| now.saturating_duration_since(*at) < PARK_FOR);
        if self.parked.len() >= MAX_PARKED {
            self.parked.remove(0);
        }
        self.parked.push((now, relay, e));
    }

    /// The parked entries whose author came back up, to take now (checked again).
    pub(crate) fn take_unparked(&mut self) -> Vec<(bool, Arc<Entry>)> {
        std::mem::take(&mut self.unparked)
    }

    /// `author` was declared down at `now`: its entries are dropped `grace` later unless it
    /// comes back up first. A member already down keeps its first instant. (Nothing is
    /// scheduled for an author without entries: a core that holds none wakes no more often
    /// than without entries.)
    pub(crate) fn down(&mut self, author: NodeId, now: Instant, grace: Duration) {
        if self.gone.contains_key(&author) {
            return;
        }
        self.gone.insert(author, Gone::Down(now));
        if self.authors.contains_key(&author) {
            self.drops.push(Reverse((now + grace, author)));
        }
    }

    /// `author` left: its entries go now, and are refused until it comes back up. Returns
    /// the live entries dropped (each an event).
    pub(crate) fn left(&mut self, author: NodeId) -> Vec<Arc<Entry>> {
        self.gone.insert(author, Gone::Left);
        self.remove_author(&author)
    }

    /// Drops every entry of `author`; returns the live ones (tombstones go silently: they
    /// were already reported as deletions).
    pub(crate) fn remove_author(&mut self, author: &NodeId) -> Vec<Arc<Entry>> {
        let Some(table) = self.authors.remove(author) else {
            return Vec::new();
        };
        self.len -= table.len();
        table
            .into_values()
            .filter(|h| !h.entry.is_tombstone())
            .map(|h| h.entry)
            .collect()
    }

    /// Drops the entries of every author for which `keep` says no (and forgets that they
    /// were down); returns the live entries dropped.
    pub(crate) fn retain_authors(
        &mut self,
        mut keep: impl FnMut(&NodeId) -> bool,
    ) -> Vec<Arc<Entry>> {
        self.gone.retain(|id, _| keep(id));
        self.parked.retain(|(_, _, e)| keep(&e.author));
        let drop: Vec<NodeId> = self
            .authors
            .keys()
            .filter(|id| !keep(id))
            .copied()
            .collect();
        drop.iter().flat_map(|id| self.remove_author(id)).collect()
    }

    /// Drops what is due at `now`: the entries of authors down for `grace` (returned, the
    /// live ones, each an event) and the tombstones whose time is up (silently).
    pub(crate) fn expire(&mut self, now: Instant, grace: Duration) -> Vec<Arc<Entry>> {
        let mut dropped = Vec::new();
        while let Some(Reverse((at, author))) = self.drops.peek().cloned() {
            if at > now {
                break;
            }
            self.drops.pop();
            let due = matches!(self.gone.get(&author),
                Some(Gone::Down(since)) if now.saturating_duration_since(*since) >= grace);
            if due {
                dropped.extend(self.remove_author(&author));
            }
        }
        while let Some(Reverse((at, _, _))) = self.forget.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, author, key))) = self.forget.pop() else {
                break;
            };
            let Some(table) = self.authors.get_mut(&author) else {
                continue;
            };
            if table.get(&key).is_some_and(|h| h.forget_at == Some(at)) {
                table.remove(&key);
                self.len -= 1;
                if table.is_empty() {
                    self.authors.remove(&author);
                }
            }
        }
        dropped
    }

    /// The next instant [`Table::expire`] has something to do (possibly nothing, for an item
    /// superseded meanwhile).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let d = self.drops.peek().map(|Reverse((at, _))| *at);
        let f = self.forget.peek().map(|Reverse((at, _, _))| *at);
        match (d, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Estimated heap bytes (the simulation's memory figures).
    pub(crate) fn heap_bytes(&self) -> usize {
        let per_entry = size_of::<Entry>() + size_of::<Held>() + 2 * 64 + 16;
        self.iter()
            .map(|e| per_entry + e.key.capacity() * 2 + e.value.as_ref().map_or(0, Vec::capacity))
            .sum::<usize>()
            + self.forget.capacity() * (size_of::<(Instant, NodeId, Vec<u8>)>())
            + self.drops.capacity() * size_of::<(Instant, NodeId)>()
            + self.gone.capacity() * (size_of::<(NodeId, Gone)>() + 1)
            + self.parked.capacity() * size_of::<Parked>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(author: u128, key: &str, version: u64, value: Option<&str>) -> Arc<Entry> {
        Arc::new(Entry {
            author: NodeId::from_index(author),
            key: key.as_bytes().to_vec(),
            version,
            value: value.map(|v| v.as_bytes().to_vec()),
            sig: [0; 64],
        })
    }

    const GRACE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(120);

    #[test]
    fn the_higher_version_wins_and_equal_is_stale() {
        let t0 = Instant::now();
        let mut t = Table::default();
        let e = entry(1, "a", 5, Some("x"));
        assert_eq!(t.check(&e, 10, GRACE, t0), Ok(()));
        t.insert(e, t0, TTL, GRACE);
        for v in [4, 5] {
            assert_eq!(
                t.check(&entry(1, "a", v, Some("y")), 10, GRACE, t0),
                Err(Refused::Stale)
            );
        }
        let e = entry(1, "a", 6, None);
        assert_eq!(t.check(&e, 10, GRACE, t0), Ok(()));
        t.insert(e, t0, TTL, GRACE);
        assert_eq!(t.len(), 1);
        assert!(t
            .get(&NodeId::from_index(1), b"a")
            .is_some_and(|e| e.is_tombstone()));
    }

    #[test]
    fn a_new_key_over_the_limit_is_refused_an_update_is_not() {
        let t0 = Instant::now();
        let mut t = Table::default();
        t.insert(entry(1, "a", 1, Some("x")), t0, TTL, GRACE);
        t.insert(entry(1, "b", 1, None), t0, TTL, GRACE);
        let c = entry(1, "c", 1, Some("x"));
        assert_eq!(t.check(&c, 2, GRACE, t0), Err(Refused::OverLimit));
        assert_eq!(t.check(&entry(1, "a", 2, None), 2, GRACE, t0), Ok(()));
        // another author has its own limit
        assert_eq!(t.check(&entry(2, "c", 1, None), 2, GRACE, t0), Ok(()));
    }

    #[test]
    fn tombstones_are_forgotten_after_their_time() {
        let t0 = Instant::now();
        let mut t = Table::default();
        t.insert(entry(1, "a", 1, None), t0, TTL, GRACE);
        t.insert(entry(1, "b", 1, None), t0, TTL, GRACE);
        // b comes back to life: its tombstone's time no longer applies
        t.insert(entry(1, "b", 2, Some("x")), t0 + TTL / 2, TTL, GRACE);
        assert_eq!(t.next_deadline(), Some(t0 + TTL));
        assert!(t
            .expire(t0 + TTL - Duration::from_millis(1), GRACE)
            .is_empty());
        assert_eq!(t.len(), 2);
        assert!(
            t.expire(t0 + TTL, GRACE).is_empty(),
            "no event for a tombstone"
        );
        assert_eq!(t.len(), 1);
        assert!(t.get(&NodeId::from_index(1), b"a").is_none());
        assert!(t.get(&NodeId::from_index(1), b"b").is_some());
        // once forgotten, an older copy is new again (the tombstone time to live bounds
        // how late a copy may travel)
        assert_eq!(
            t.check(&entry(1, "a", 1, Some("x")), 10, GRACE, t0 + TTL),
            Ok(())
        );
    }

    #[test]
    fn a_down_author_is_dropped_after_the_grace_unless_it_comes_back() {
        let t0 = Instant::now();
        let (a, b) = (NodeId::from_index(1), NodeId::from_index(2));
        let mut t = Table::default();
        t.insert(entry(1, "a", 1, Some("x")), t0, TTL, GRACE);
        t.insert(entry(1, "b", 1, None), t0, TTL, GRACE);
        t.insert(entry(2, "a", 1, Some("x")), t0, TTL, GRACE);
        t.down(a, t0, GRACE);
        t.down(b, t0, GRACE);
        // within the grace, entries of a down author are still taken
        assert_eq!(t.check(&entry(1, "c", 1, Some("x")), 10, GRACE, t0), Ok(()));
        t.up(&b);
        assert_eq!(t.next_deadline(), Some(t0 + GRACE));
        assert!(t.expire(t0 + GRACE / 2, GRACE).is_empty());
        // a again down later: the first instant stands
        t.down(a, t0 + GRACE / 2, GRACE);
        let dropped = t.expire(t0 + GRACE, GRACE);
        assert_eq!(dropped.len(), 1, "the live entry only: {dropped:?}");
        assert_eq!(dropped[0].key, b"a");
        assert_eq!(t.author_len(&a), 0);
        assert_eq!(t.author_len(&b), 1, "b came back");
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.check(&entry(1, "a", 9, Some("x")), 10, GRACE, t0 + GRACE),
            Err(Refused::Gone)
        );
        t.up(&a);
        assert_eq!(
            t.check(&entry(1, "a", 9, Some("x")), 10, GRACE, t0 + GRACE),
            Ok(())
        );
    }

    #[test]
    fn entries_of_a_gone_author_wait_parked_for_its_return() {
        let t0 = Instant::now();
        let a = NodeId::from_index(1);
        let mut t = Table::default();
        t.down(a, t0, GRACE);
        let late = t0 + GRACE;
        let e = entry(1, "a", 1, Some("x"));
        assert_eq!(t.check(&e, 10, GRACE, late), Err(Refused::Gone));
        t.park(Arc::clone(&e), true, late);
        assert!(t.is_parked(&e));
        assert!(!t.is_parked(&entry(1, "a", 2, Some("x"))));
        // an old one expires when another is parked
        t.park(entry(1, "b", 1, None), false, late + PARK_FOR);
        assert!(!t.is_parked(&e));
        t.up(&NodeId::from_index(2));
        assert!(t.take_unparked().is_empty(), "another author");
        t.up(&a);
        let back = t.take_unparked();
        assert_eq!(back.len(), 1);
        assert!(!back[0].0 && back[0].1.key == b"b");
        assert!(t.take_unparked().is_empty());
        // bounded
        t.down(a, late, GRACE);
        for i in 0..MAX_PARKED + 5 {
            t.park(entry(1, &i.to_string(), 1, None), false, late);
        }
        assert_eq!(t.parked.len(), MAX_PARKED);
        assert!(!t.is_parked(&entry(1, "0", 1, None)), "the oldest went");
    }

    #[test]
    fn an_entry_taken_while_its_author_is_down_is_dropped_with_it() {
        let t0 = Instant::now();
        let a = NodeId::from_index(1);
        let mut t = Table::default();
        t.down(a, t0, GRACE);
        assert_eq!(
            t.next_deadline(),
            None,
            "nothing to drop, nothing to wake for"
        );
        t.insert(entry(1, "a", 1, Some("x")), t0 + GRACE / 2, TTL, GRACE);
        assert_eq!(t.next_deadline(), Some(t0 + GRACE));
        assert_eq!(t.expire(t0 + GRACE, GRACE).len(), 1);
    }

    #[test]
    fn a_member_that_left_is_dropped_at_once() {
        let t0 = Instant::now();
        let a = NodeId::from_index(1);
        let mut t = Table::default();
        t.insert(entry(1, "a", 1, Some("x")), t0, TTL, GRACE);
        assert_eq!(t.left(a).len(), 1);
        assert_eq!(t.len(), 0);
        assert_eq!(
            t.check(&entry(1, "a", 2, Some("x")), 10, GRACE, t0),
            Err(Refused::Gone)
        );
        // removed from the directory
        t.insert(entry(2, "a", 1, Some("x")), t0, TTL, GRACE);
        assert_eq!(t.retain_authors(|id| *id != NodeId::from_index(2)).len(), 1);
        assert_eq!(t.iter().count(), 0);
    }
}
