//! Entries (each node's signed application table) between in-memory cores (harness in
//! `common`): spreading, versions, tombstones, lifetimes (down past the grace, left,
//! removed from the directory), push-pull at join, restarts, datagram sizes. Forged and
//! replayed entries from an insider are in `attacks.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use shoal_gossip::codec::{Entry, StateDump, MAX_ENTRY_VALUE};
use shoal_gossip::membership::ApiError;
use shoal_gossip::{Config, Event};

/// The live entry node `at` holds for (`author`, `key`): version and value.
fn held(net: &Net, at: usize, author: usize, key: &[u8]) -> Option<(u64, Vec<u8>)> {
    net.nodes[at]
        .entries()
        .into_iter()
        .find(|e| e.author == id(author) && e.key == key)
        .map(|e| (e.version, e.value))
}

/// The entry events node `at` reported for (`author`, `key`), in order.
fn events(net: &Net, at: usize, author: usize, key: &[u8]) -> Vec<(u64, Option<Vec<u8>>)> {
    net.events[at]
        .iter()
        .filter_map(|e| match e {
            Event::Entry {
                author: a,
                key: k,
                version,
                value,
            } if *a == id(author) && k == key => Some((*version, value.clone())),
            _ => None,
        })
        .collect()
}

/// An entry as `author` signs it (Ed25519 is deterministic: the very bytes it sent).
fn genuine(author: usize, key: &[u8], version: u64, value: Option<&[u8]>) -> Arc<Entry> {
    Arc::new(
        Entry::signed(
            id(author),
            key.to_vec(),
            version,
            value.map(<[u8]>::to_vec),
            crypto(author).as_ref(),
        )
        .expect("small entry"),
    )
}

/// Hands node `at` these entries as a saved state would (checked as if a peer sent them).
fn restore_entries(net: &mut Net, at: usize, entries: Vec<Arc<Entry>>) {
    let t = net.t();
    net.nodes[at].restore(
        &StateDump {
            members: Vec::new(),
            records: Vec::new(),
            entries,
        },
        t,
    );
}

fn set(net: &mut Net, at: usize, key: &[u8], version: u64, value: Option<&[u8]>) {
    let t = net.t();
    net.nodes[at]
        .set_entry(key.to_vec(), version, value.map(<[u8]>::to_vec), t)
        .expect("set_entry");
}

fn short_lifetimes(c: &mut Config) {
    c.entries_down_grace = Duration::from_secs(5);
    c.tombstone_ttl = Duration::from_secs(8);
}

#[test]
fn a_members_entry_reaches_every_other_node_at_once() {
    let mut net = Net::joined(5);
    set(&mut net, 1, b"ep/a", 10, Some(b"net1 10.0.0.5"));
    // one 10 ms step: the author gossips at once, and each node that hears it relays it
    // at once; the author reports its own change too
    net.run(Duration::from_millis(10));
    for i in 0..5 {
        assert_eq!(
            held(&net, i, 1, b"ep/a"),
            Some((10, b"net1 10.0.0.5".to_vec())),
            "node {i}"
        );
        assert_eq!(
            events(&net, i, 1, b"ep/a"),
            vec![(10, Some(b"net1 10.0.0.5".to_vec()))],
            "node {i}: one event"
        );
    }
    // a change is one more entry, reported once everywhere
    set(&mut net, 1, b"ep/a", 11, Some(b"net1 10.0.0.6"));
    net.run(Duration::from_secs(3));
    for i in 0..5 {
        assert_eq!(
            held(&net, i, 1, b"ep/a"),
            Some((11, b"net1 10.0.0.6".to_vec()))
        );
        assert_eq!(events(&net, i, 1, b"ep/a").len(), 2, "node {i}");
        let s = net.nodes[i].stats();
        assert_eq!(s.entries_bad_signature + s.entries_too_big, 0);
        if i != 1 {
            assert_eq!(s.entries_applied, 2, "node {i}: {s:?}");
            assert!(s.entries_stale > 0, "copies arrive: {s:?}");
        }
    }
    // the queues drain: each entry is sent a bounded number of times
    for i in 0..5 {
        assert_eq!(net.nodes[i].backlog().1, 0, "node {i}");
    }
}

#[test]
fn a_stale_version_never_wins() {
    let mut net = Net::joined(3);
    set(&mut net, 0, b"k", 10, Some(b"new"));
    net.run(Duration::from_secs(1));
    let before = net.events[0].len();
    // the author cannot go back: refused, nothing changed
    let t = net.t();
    for v in [9, 10] {
        match net.nodes[0].set_entry(b"k".to_vec(), v, None, t) {
            Err(ApiError::StaleVersion { version, held: 10 }) => assert_eq!(version, v),
            other => panic!("version {v}: {other:?}"),
        }
    }
    assert_eq!(net.events[0].len(), before);
    assert_eq!(held(&net, 0, 0, b"k"), Some((10, b"new".to_vec())));
    // an older genuine copy arriving late is stale everywhere
    let stale = net.nodes[1].stats().entries_stale;
    restore_entries(&mut net, 1, vec![genuine(0, b"k", 9, Some(b"old"))]);
    restore_entries(
        &mut net,
        1,
        vec![genuine(0, b"k", 10, Some(b"same version"))],
    );
    assert_eq!(net.nodes[1].stats().entries_stale, stale + 2);
    assert_eq!(held(&net, 1, 0, b"k"), Some((10, b"new".to_vec())));
    assert_eq!(events(&net, 1, 0, b"k").len(), 1);
    // a higher one wins, wherever it comes from
    restore_entries(&mut net, 1, vec![genuine(0, b"k", 12, Some(b"newer"))]);
    assert_eq!(held(&net, 1, 0, b"k"), Some((12, b"newer".to_vec())));
}

#[test]
fn a_tombstone_replaces_and_is_forgotten_after_its_time() {
    let mut net = Net::joined_tweaked(3, false, short_lifetimes);
    set(&mut net, 0, b"k", 1, Some(b"x"));
    net.run(Duration::from_secs(1));
    assert!(held(&net, 2, 0, b"k").is_some());
    set(&mut net, 0, b"k", 2, None);
    net.run(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(held(&net, i, 0, b"k"), None, "node {i}");
        assert_eq!(
            events(&net, i, 0, b"k"),
            vec![(1, Some(b"x".to_vec())), (2, None)],
            "node {i}"
        );
    }
    // within its time, the tombstone makes a late copy of the value stale
    restore_entries(&mut net, 2, vec![genuine(0, b"k", 1, Some(b"x"))]);
    assert_eq!(held(&net, 2, 0, b"k"), None);
    assert_eq!(events(&net, 2, 0, b"k").len(), 2);
    // and travels in push-pull states while it is kept: a node that missed the delete
    // converges
    let t = net.t();
    let frame = net.nodes[0].pushpull_frame(id(2)).expect("frame");
    let stale_before = net.nodes[2].stats().entries_stale;
    net.nodes[2]
        .handle_pushpull(&frame, None, t)
        .expect("push-pull");
    assert!(net.nodes[2].stats().entries_stale > stale_before);
    // after it (8 s here, 120 s by default) it is forgotten everywhere, silently: the same
    // late copy would now be taken (the limit of a tombstone's time to live; its author
    // then sees its own deleted entry back, as an event, and deletes it again)
    net.run(Duration::from_secs(8));
    assert_eq!(events(&net, 2, 0, b"k").len(), 2, "no event for forgetting");
    restore_entries(&mut net, 2, vec![genuine(0, b"k", 1, Some(b"x"))]);
    assert_eq!(held(&net, 2, 0, b"k"), Some((1, b"x".to_vec())));
    restore_entries(&mut net, 0, vec![genuine(0, b"k", 1, Some(b"x"))]);
    net.run(Duration::from_millis(10));
    assert_eq!(
        events(&net, 0, 0, b"k").last(),
        Some(&(1, Some(b"x".to_vec())))
    );
}

/// Twelve nodes, one of them frozen: fewer than a tenth of the members down, so its return
/// starts no push-pull (that is for healed partitions); its own re-send is what brings its
/// entries back at once.
#[test]
fn entries_of_a_node_down_past_the_grace_are_dropped_and_come_back() {
    const N: usize = 12;
    let mut net = Net::joined_tweaked(N, true, short_lifetimes);
    set(&mut net, 3, b"a", 1, Some(b"x"));
    set(&mut net, 3, b"b", 1, Some(b"y"));
    net.run(Duration::from_secs(1));
    let others: Vec<usize> = (0..N).filter(|i| *i != 3).collect();
    // frozen: no timers, nothing in or out
    net.cut[3] = true;
    let mut waited = 0;
    while !others.iter().all(|i| net.saw_down(*i, 3)) {
        net.run(Duration::from_millis(100));
        waited += 1;
        assert!(waited < 300, "node 3 never seen down");
    }
    // down, but within the grace: still held
    net.run(Duration::from_secs(4));
    for &i in &others {
        assert!(
            held(&net, i, 3, b"a").is_some(),
            "node {i} dropped too early"
        );
        assert_eq!(events(&net, i, 3, b"a").len(), 1);
    }
    net.run(Duration::from_secs(2));
    for &i in &others {
        assert_eq!(held(&net, i, 3, b"a"), None, "node {i}");
        assert_eq!(held(&net, i, 3, b"b"), None, "node {i}");
        assert_eq!(
            events(&net, i, 3, b"a"),
            vec![(1, Some(b"x".to_vec())), (1, None)]
        );
        assert_eq!(
            events(&net, i, 3, b"b"),
            vec![(1, Some(b"y".to_vec())), (1, None)]
        );
        assert_eq!(net.nodes[i].stats().entries_dropped, 2);
    }
    // while it stays down, a late copy is refused
    restore_entries(&mut net, 0, vec![genuine(3, b"c", 1, Some(b"z"))]);
    assert_eq!(held(&net, 0, 3, b"c"), None);
    assert_eq!(net.nodes[0].stats().entries_refused_gone, 1);
    // it wakes: told it was down, it refutes and sends its entries again
    net.cut[3] = false;
    net.run(Duration::from_secs(3));
    for &i in &others {
        assert!(net.up_ids(i).contains(&id(3)), "node {i} does not see 3 up");
        assert_eq!(held(&net, i, 3, b"a"), Some((1, b"x".to_vec())), "node {i}");
        assert_eq!(held(&net, i, 3, b"b"), Some((1, b"y".to_vec())), "node {i}");
        assert_eq!(
            events(&net, i, 3, b"a").last(),
            Some(&(1, Some(b"x".to_vec())))
        );
    }
}

#[test]
fn a_node_that_left_loses_its_entries_at_once() {
    // the default grace (30 s): what happens below happens within 2 s
    let mut net = Net::joined(4);
    set(&mut net, 2, b"a", 1, Some(b"x"));
    net.run(Duration::from_secs(1));
    assert!((0..4).all(|i| held(&net, i, 2, b"a").is_some()));
    let t = net.t();
    net.nodes[2].leave(t).expect("leave");
    assert!(matches!(
        net.nodes[2].set_entry(b"b".to_vec(), 1, Some(b"y".to_vec()), t),
        Err(ApiError::Left)
    ));
    // its leave goes out, then it stops (as the driver's owner shuts it down; a core left
    // running after leave() keeps refuting the others' "you are down", a storm that
    // predates entries)
    net.run(Duration::from_millis(10));
    net.cut[2] = true;
    net.run(Duration::from_secs(2));
    for i in [0, 1, 3] {
        let left = net.events[i]
            .iter()
            .position(|e| matches!(e, Event::Left(m) if m.id == id(2)))
            .expect("left");
        let dropped = net.events[i]
            .iter()
            .position(|e| matches!(e, Event::Entry { author, value: None, .. } if *author == id(2)))
            .expect("entry dropped");
        assert!(left < dropped, "node {i}: the Left first");
        assert_eq!(held(&net, i, 2, b"a"), None);
        assert_eq!(net.nodes[i].stats().entries_dropped, 1);
    }
}

#[test]
fn a_node_removed_from_the_directory_loses_its_entries_at_once() {
    let mut net = Net::joined(3);
    set(&mut net, 2, b"a", 1, Some(b"x"));
    set(&mut net, 0, b"a", 1, Some(b"mine"));
    net.run(Duration::from_secs(1));
    let t = net.t();
    net.nodes[0].set_admission(dir([0, 1]), t);
    assert_eq!(events(&net, 0, 2, b"a").len(), 1);
    net.run(Duration::from_millis(10));
    assert_eq!(
        events(&net, 0, 2, b"a"),
        vec![(1, Some(b"x".to_vec())), (1, None)]
    );
    assert_eq!(held(&net, 0, 2, b"a"), None);
    // our own stay
    assert_eq!(held(&net, 0, 0, b"a"), Some((1, b"mine".to_vec())));
}

#[test]
fn a_joining_node_gets_every_entry_in_its_first_push_pull() {
    let mut net = Net::joined(3);
    set(&mut net, 0, b"a", 1, Some(b"x"));
    set(&mut net, 1, b"b", 1, Some(b"y"));
    set(&mut net, 2, b"c", 1, None);
    // long enough for every broadcast to be spent
    net.run(Duration::from_secs(10));
    assert!((0..3).all(|i| net.nodes[i].backlog().1 == 0));
    let j = net.add(key(7), full(), true);
    let t = net.t();
    net.nodes[j].join(&[(id(0), addr(0))], t);
    net.run(Duration::from_millis(20));
    let s = net.nodes[j].stats();
    assert!(s.pushpull_applied >= 1, "{s:?}");
    assert_eq!(held(&net, j, 0, b"a"), Some((1, b"x".to_vec())));
    assert_eq!(held(&net, j, 1, b"b"), Some((1, b"y".to_vec())));
    // tombstones travel too
    assert_eq!(events(&net, j, 2, b"c"), vec![(1, None)]);
    assert_eq!(s.entries_applied, 3);
}

#[test]
fn a_restarted_node_learns_its_earlier_entries_and_cannot_go_back() {
    let mut net = Net::joined(3);
    set(&mut net, 2, b"a", 100, Some(b"x"));
    net.run(Duration::from_secs(1));
    // restart (a new run, new bump) before anyone declares it down
    let mut core = net.core(2, key(7), full(), true, 2);
    let t = net.t();
    core.join(&[(id(0), addr(0))], t);
    net.nodes[2] = core;
    net.events[2].clear();
    net.run(Duration::from_secs(1));
    assert_eq!(held(&net, 2, 2, b"a"), Some((100, b"x".to_vec())));
    assert_eq!(events(&net, 2, 2, b"a"), vec![(100, Some(b"x".to_vec()))]);
    let t = net.t();
    assert!(matches!(
        net.nodes[2].set_entry(b"a".to_vec(), 50, None, t),
        Err(ApiError::StaleVersion { held: 100, .. })
    ));
    set(&mut net, 2, b"a", 101, None);
    net.run(Duration::from_secs(1));
    for i in 0..3 {
        assert_eq!(held(&net, i, 2, b"a"), None, "node {i}");
        assert_eq!(
            events(&net, i, 2, b"a").last(),
            Some(&(101, None)),
            "node {i}"
        );
    }
}

#[test]
fn our_own_entries_are_bounded_and_sized() {
    let mut net = Net::joined_tweaked(2, false, |c| c.max_entries_per_author = 3);
    for k in [b"a", b"b", b"c"] {
        set(&mut net, 0, k, 1, Some(b"x"));
    }
    let t = net.t();
    let before = net.events[0].len();
    assert!(matches!(
        net.nodes[0].set_entry(b"d".to_vec(), 1, Some(b"x".to_vec()), t),
        Err(ApiError::TooManyEntries(3))
    ));
    assert!(matches!(
        net.nodes[0].set_entry(vec![0; 65], 1, None, t),
        Err(ApiError::Entry(_))
    ));
    assert!(matches!(
        net.nodes[0].set_entry(b"a".to_vec(), 2, Some(vec![0; MAX_ENTRY_VALUE + 1]), t),
        Err(ApiError::Entry(_))
    ));
    assert_eq!(net.events[0].len(), before, "refused calls change nothing");
    // an existing key can still change, and be deleted (the tombstone counts until it goes)
    set(&mut net, 0, b"a", 2, None);
    assert!(net.nodes[0]
        .set_entry(b"d".to_vec(), 1, Some(b"x".to_vec()), t)
        .is_err());
    net.run(Duration::from_secs(1));
    assert_eq!(net.nodes[1].entries().len(), 2);
}

#[test]
fn large_entries_fit_the_datagram_budget() {
    // the harness asserts every datagram is at most MAX_DATAGRAM bytes
    let mut net = Net::joined(4);
    for i in 0..40u8 {
        // half the largest there is, half 400-byte values (two fit in a datagram)
        let key = [i; 64];
        let len = if i % 2 == 0 { MAX_ENTRY_VALUE } else { 400 };
        set(&mut net, usize::from(i % 4), &key, 1, Some(&vec![i; len]));
    }
    net.run(Duration::from_secs(10));
    for i in 0..4 {
        assert_eq!(net.nodes[i].entries().len(), 40, "node {i}");
        let s = net.nodes[i].stats();
        assert_eq!(s.dropped_oversize + s.dropped_decode, 0, "{s:?}");
    }
    let largest = net.log.iter().map(|(_, _, d)| d.len()).max().unwrap_or(0);
    assert!(
        largest > 1000,
        "entries filled datagrams: largest {largest}"
    );
}

/// A split too short for anyone to be declared down, so nobody sends its entries again:
/// the changes made on each side while it lasted (their broadcasts spent within the side)
/// cross by push-pull (the nodes they are new to spread them on).
#[test]
fn a_healed_split_converges_by_push_pull() {
    let mut net = Net::joined_tweaked(6, true, |c| {
        c.pushpull_interval = Duration::from_secs(4);
    });
    net.split = Some(3);
    set(&mut net, 0, b"a", 1, Some(b"x"));
    set(&mut net, 4, b"b", 1, Some(b"y"));
    net.run(Duration::from_millis(900));
    for i in 0..6 {
        assert_eq!(held(&net, i, 0, b"a").is_some(), i < 3, "node {i}");
        assert_eq!(held(&net, i, 4, b"b").is_some(), i >= 3, "node {i}");
        assert_eq!(net.nodes[i].backlog().1, 0, "node {i}: broadcasts spent");
    }
    net.split = None;
    net.run(Duration::from_secs(15));
    for i in 0..6 {
        assert!(
            !(0..6).any(|j| net.saw_down(i, j)),
            "node {i} saw a down: not the case this test is about"
        );
        assert_eq!(held(&net, i, 0, b"a"), Some((1, b"x".to_vec())), "node {i}");
        assert_eq!(held(&net, i, 4, b"b"), Some((1, b"y".to_vec())), "node {i}");
    }
    let by_state: u64 = (0..6)
        .map(|i| net.nodes[i].stats().entries_from_pushpull)
        .sum();
    assert!(
        by_state >= 2,
        "{by_state} changes taken from push-pull states"
    );
}
