//! Insiders against the in-memory cluster (harness in `common`). The attacker holds a valid
//! node identity that is in the directory (node 9: its keys and the gossip key) and sends
//! whatever bytes it likes, sealed with its own pair keys; or it is a node that is not (or
//! no longer) in the directory. Each test names the defence it exercises; RESULTS.md says
//! how each was seen failing with its defence undone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use foca::{Header, Member, Message, State};
use shoal_gossip::auth::{insecure_test_keys, sender_tag, Crypto, PublicKeys};
use shoal_gossip::codec::{
    encode_header, suspect_signed_bytes, Codec, Entry, Item, NodeRecord, StateDump,
};
use shoal_gossip::seal::{Kind, Sealer};
use shoal_gossip::{Admission, Event, Identity, Membership, NodeId};

/// The attacker's node index (in the directory, never a running node of the net).
const ATTACKER: usize = 9;

/// A node that crafts its own datagrams: its own identity and keys, any contents.
struct Forger {
    index: usize,
    sealer: Sealer,
    crypto: Arc<dyn Crypto>,
    /// The directory it seals with (it needs its victims' public keys: the node list is no
    /// secret).
    dir: Admission,
}

impl Forger {
    fn new(index: usize, epoch: u64) -> Self {
        Forger {
            index,
            sealer: Sealer::new(id(index), key(7), epoch, 0xbad),
            crypto: crypto(index),
            dir: Admission::only(
                (0..DIRECTORY)
                    .chain([index])
                    .map(|i| (id(i), insecure_test_keys(&id(i)).public())),
            ),
        }
    }

    fn identity(&self) -> Identity {
        Identity::new(id(self.index), addr(self.index), 1)
    }

    /// A `Gossip` datagram for node `to` (whose identity is `dst`), from `src`, carrying
    /// these member records and items, sealed with the forger's own pair key.
    fn datagram(
        &mut self,
        to: &Identity,
        src: Identity,
        message: Message<Identity>,
        members: &[Member<Identity>],
        items: &[Item],
    ) -> Vec<u8> {
        let mut plain = encode_header(&Header {
            src,
            src_incarnation: 0,
            dst: *to,
            message,
        });
        plain.extend_from_slice(&(members.len() as u16).to_be_bytes());
        for m in members {
            foca::Codec::encode_member(&mut Codec, m, &mut plain).expect("room");
        }
        for i in items {
            let b = i.encode();
            plain.extend_from_slice(&(b.len() as u16).to_be_bytes());
            plain.extend_from_slice(&b);
        }
        self.sealer
            .seal(
                Kind::Datagram,
                &to.id,
                &self.dir,
                self.crypto.as_ref(),
                &plain,
            )
            .expect("seal")
    }

    /// A `Gossip` datagram from the forger itself.
    fn gossip(&mut self, to: &Identity, members: &[Member<Identity>], items: &[Item]) -> Vec<u8> {
        let me = self.identity();
        self.datagram(to, me, Message::Gossip, members, items)
    }
}

fn others(net: &Net, victim: usize) -> Vec<usize> {
    (0..net.nodes.len()).filter(|i| *i != victim).collect()
}

fn metadata_at(net: &Net, at: usize, of: usize) -> Option<shoal_gossip::Metadata> {
    net.nodes[at]
        .members()
        .into_iter()
        .find(|m| m.id == id(of))
        .and_then(|m| m.metadata)
}

fn bump_at(net: &Net, at: usize, of: usize) -> Option<u32> {
    net.nodes[at]
        .members()
        .into_iter()
        .find(|m| m.id == id(of))
        .map(|m| m.bump)
}

/// Defence: node records are signed by the node they describe (and verified under the
/// directory's key). A member sends the victim's record with the furthest-ahead `seq` there
/// is (sequence numbers compare with serial number arithmetic: 2^63 - 1 past the victim's
/// first) and new metadata (another data-path incarnation, another VTEP), unsigned, signed by
/// itself, and as "leaving": nothing changes anywhere, and the victim's own later update
/// still lands.
#[test]
fn forged_metadata_with_a_huge_seq_changes_nothing() {
    let mut net = Net::joined(4);
    let victim = 2;
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let subject = *net.nodes[victim].identity();
    let huge = (u64::from(subject.bump) << 32).wrapping_add(i64::MAX as u64);
    assert!(shoal_gossip::codec::seq_after(
        huge,
        u64::from(subject.bump) << 32
    ));
    let mut forged = meta(victim);
    forged.incarnation = [0xee; 16];
    forged.vtep = "198.18.9.9".parse().expect("ip");
    let unsigned = NodeRecord {
        subject,
        incarnation: 0,
        seq: huge,
        leaving: false,
        meta: forged.clone(),
        sig: [0; 64],
    };
    // signed by the attacker over exactly what the victim would sign
    let mut by_attacker = unsigned.clone();
    by_attacker.sig = f
        .crypto
        .sign(&by_attacker.signed_bytes(&public(victim).x25519));
    let mut leaving = by_attacker.clone();
    leaving.leaving = true;
    leaving.sig = f.crypto.sign(&leaving.signed_bytes(&public(victim).x25519));
    let items: Vec<Item> = [unsigned, by_attacker, leaving]
        .into_iter()
        .map(|r| Item::Node(Arc::new(r)))
        .collect();
    let before: Vec<u64> = (0..4)
        .map(|i| net.nodes[i].stats().items_bad_signature)
        .collect();
    for to in 0..4 {
        let dst = *net.nodes[to].identity();
        let d = f.gossip(&dst, &[], &items);
        assert!(
            net.deliver(to, &d),
            "the attacker's datagram itself is well formed"
        );
    }
    net.run(Duration::from_secs(5));
    for i in others(&net, victim) {
        assert_eq!(metadata_at(&net, i, victim), Some(meta(victim)), "node {i}");
        assert!(
            !net.events[i].iter().any(|e| matches!(e,
                Event::Updated(m) | Event::Left(m) | Event::Down(m) if m.id == id(victim))),
            "node {i}: {:?}",
            net.events[i]
        );
        let bad = net.nodes[i].stats().items_bad_signature - before[i];
        assert!(bad >= 3, "node {i}: {bad} bad signatures counted");
    }
    // The victim's real update (its own seq, far behind the forged one) still reaches everyone.
    let mut real = meta(victim);
    real.incarnation = [0x42; 16];
    let t = net.t();
    net.nodes[victim]
        .update_metadata(real.clone(), t)
        .expect("update");
    net.run(Duration::from_secs(3));
    for i in others(&net, victim) {
        assert_eq!(metadata_at(&net, i, victim), Some(real.clone()), "node {i}");
    }
}

/// The live entries node `at` holds of `author`: (key, version, value).
fn entries_of(net: &Net, at: usize, author: usize) -> Vec<(Vec<u8>, u64, Vec<u8>)> {
    net.nodes[at]
        .entries()
        .into_iter()
        .filter(|e| e.author == id(author))
        .map(|e| (e.key, e.version, e.value))
        .collect()
}

/// Defence: entries are signed by their author and verified under its directory key. A
/// member (node 9) sends, in datagrams and in a push-pull state, entries in the victim's
/// name: signed by itself, signed by another member (node 1) of the cluster, and the
/// victim's genuine entry with its value and version changed. Nothing changes anywhere,
/// each is counted, and the victim's real change still lands.
#[test]
fn forged_and_altered_entries_change_nothing() {
    let mut net = Net::joined(4);
    let victim = 2;
    let t = net.t();
    net.nodes[victim]
        .set_entry(b"ep/a".to_vec(), 10, Some(b"real".to_vec()), t)
        .expect("set");
    net.run(Duration::from_secs(1));
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let sign_as = |signer: &dyn Crypto, key: &[u8], version: u64, value: Option<&[u8]>| {
        Arc::new(
            Entry::signed(
                id(victim),
                key.to_vec(),
                version,
                value.map(<[u8]>::to_vec),
                signer,
            )
            .expect("small"),
        )
    };
    let by_attacker = sign_as(f.crypto.as_ref(), b"ep/a", 11, Some(b"forged"));
    let by_member = sign_as(crypto(1).as_ref(), b"ep/a", 12, None);
    let new_key = sign_as(f.crypto.as_ref(), b"ep/b", 1, Some(b"forged"));
    let genuine = sign_as(crypto(victim).as_ref(), b"ep/a", 10, Some(b"real"));
    let mut altered = Entry::clone(&genuine);
    altered.value = Some(b"altered".to_vec());
    altered.version = 13;
    let items: Vec<Item> = [by_attacker, by_member, new_key.clone(), Arc::new(altered)]
        .into_iter()
        .map(Item::Entry)
        .collect();
    let before: Vec<u64> = (0..4)
        .map(|i| net.nodes[i].stats().entries_bad_signature)
        .collect();
    for to in others(&net, victim) {
        let dst = *net.nodes[to].identity();
        let d = f.gossip(&dst, &[], &items);
        assert!(net.deliver(to, &d), "the datagram itself is well formed");
    }
    // and in a push-pull state
    let state = StateDump {
        members: Vec::new(),
        records: Vec::new(),
        entries: vec![new_key],
    }
    .encode();
    let frame = f
        .sealer
        .seal(Kind::Stream, &id(0), &f.dir, f.crypto.as_ref(), &state)
        .expect("seal");
    let t = net.t();
    net.nodes[0]
        .handle_pushpull(&frame, None, t)
        .expect("a well-formed state");
    net.run(Duration::from_secs(3));
    for (i, before) in before.iter().enumerate() {
        assert_eq!(
            entries_of(&net, i, victim),
            vec![(b"ep/a".to_vec(), 10, b"real".to_vec())],
            "node {i}"
        );
        let changes = net.events[i]
            .iter()
            .filter(|e| matches!(e, Event::Entry { author, .. } if *author == id(victim)))
            .count();
        assert_eq!(
            changes, 1,
            "node {i}: only the real entry was ever reported"
        );
        if i != victim {
            let bad = net.nodes[i].stats().entries_bad_signature - before;
            let want = if i == 0 { 5 } else { 4 };
            assert_eq!(bad, want, "node {i}: bad signatures counted");
        }
    }
    // the victim's real change still lands (its version is below the forged ones)
    let t = net.t();
    net.nodes[victim]
        .set_entry(b"ep/a".to_vec(), 11, Some(b"real 2".to_vec()), t)
        .expect("set");
    net.run(Duration::from_secs(1));
    for i in 0..4 {
        assert_eq!(
            entries_of(&net, i, victim),
            vec![(b"ep/a".to_vec(), 11, b"real 2".to_vec())],
            "node {i}"
        );
    }
}

/// Defences: a version never goes back, and per-author limits. A member replays the
/// victim's genuine older entry (captured earlier) and genuine new keys beyond the limit:
/// the first is stale, the others refused, each counted; nothing changes.
#[test]
fn replayed_and_excess_genuine_entries_change_nothing() {
    let mut net = Net::joined_tweaked(3, false, |c| c.max_entries_per_author = 2);
    let victim = 2;
    let genuine = |key: &[u8], version: u64, value: &[u8]| {
        Arc::new(
            Entry::signed(
                id(victim),
                key.to_vec(),
                version,
                Some(value.to_vec()),
                crypto(victim).as_ref(),
            )
            .expect("small"),
        )
    };
    let t = net.t();
    for (k, v) in [(b"a", 1), (b"a", 2), (b"b", 1)] {
        net.nodes[victim]
            .set_entry(k.to_vec(), v, Some(b"x".to_vec()), t)
            .expect("set");
    }
    net.run(Duration::from_secs(1));
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let items = vec![
        Item::Entry(genuine(b"a", 1, b"x")),
        Item::Entry(genuine(b"c", 1, b"x")),
    ];
    let dst = *net.nodes[0].identity();
    let st = net.nodes[0].stats();
    let d = f.gossip(&dst, &[], &items);
    assert!(net.deliver(0, &d));
    let s = net.nodes[0].stats();
    assert_eq!(s.entries_stale, st.entries_stale + 1);
    assert_eq!(s.entries_over_limit, st.entries_over_limit + 1);
    assert_eq!(s.entries_applied, st.entries_applied);
    assert_eq!(
        entries_of(&net, 0, victim),
        vec![
            (b"a".to_vec(), 2, b"x".to_vec()),
            (b"b".to_vec(), 1, b"x".to_vec())
        ]
    );
}

/// Defences: envelopes sealed per pair (a member cannot seal as another), the header's
/// sender must be the one that sealed (`dropped_spoofed`), and the epoch bound. A member
/// claims the victim's ID as sender with envelope epoch `u64::MAX`, three ways; the
/// receiver drops and counts each, its view of the victim does not move, and the victim's
/// real datagrams are still accepted.
#[test]
fn a_claimed_sender_is_dropped_and_the_victims_datagrams_still_count() {
    let mut net = Net::joined(3);
    let (victim, rx) = (1, 0);
    let mut f = Forger::new(ATTACKER, u64::MAX);
    let dst = *net.nodes[rx].identity();
    let real = *net.nodes[victim].identity();
    let mut later = real;
    later.bump += 3;
    let s0 = net.nodes[rx].stats();
    // 1. relabelled with the victim's tag: opens under no key the receiver holds for it
    let mut relabelled = f.gossip(&dst, &[], &[]);
    relabelled[2..6].copy_from_slice(&sender_tag(&id(victim)));
    assert!(!net.deliver(rx, &relabelled));
    // 2. sealed as itself, the header naming the victim (a later bump, to move its view)
    let spoofed = f.datagram(&dst, later, Message::Gossip, &[], &[]);
    assert!(!net.deliver(rx, &spoofed));
    // 3. as itself, with its own header, from the far future
    let future = f.gossip(&dst, &[], &[]);
    assert!(!net.deliver(rx, &future));
    let s1 = net.nodes[rx].stats();
    assert_eq!(s1.dropped_seal - s0.dropped_seal, 1, "{s1:?}");
    assert_eq!(s1.dropped_spoofed - s0.dropped_spoofed, 1, "{s1:?}");
    assert_eq!(s1.dropped_future - s0.dropped_future, 1, "{s1:?}");
    assert_eq!(bump_at(&net, rx, victim), Some(real.bump));
    // The attacker's own window was not pushed to the far future either: its datagrams from
    // a sane epoch still open.
    let mut sane = Forger::new(ATTACKER, WALL0 + 60);
    let d = sane.gossip(&dst, &[], &[]);
    assert!(net.deliver(rx, &d), "{:?}", net.nodes[rx].stats());
    // The victim's real datagrams keep flowing: none refused as replays, no suspicion.
    let replays = net.nodes[rx].stats().dropped_replay;
    let from_victim = net
        .log
        .iter()
        .filter(|(a, b, _)| (*a, *b) == (victim, rx))
        .count();
    net.run(Duration::from_secs(10));
    let now_from_victim = net
        .log
        .iter()
        .filter(|(a, b, _)| (*a, *b) == (victim, rx))
        .count();
    assert!(now_from_victim > from_victim + 5);
    assert_eq!(net.nodes[rx].stats().dropped_replay, replays);
    assert!(!net.saw_down(rx, victim));
    assert_eq!(bump_at(&net, rx, victim), Some(real.bump));
}

/// Defence: suspicion witnesses are signed by the witness, who must be in the directory.
/// A member sends witnesses of a healthy victim naming invented nodes and real members it
/// cannot sign for (plus its own, real, witness): no quorum forms, the victim stays up
/// everywhere.
#[test]
fn invented_witnesses_do_not_declare_a_healthy_member_down() {
    let mut net = Net::joined(5);
    let victim = 2;
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let subject = *net.nodes[victim].identity();
    let huge = (u64::from(subject.bump) << 32).wrapping_add(i64::MAX as u64);
    assert!(shoal_gossip::codec::seq_after(
        huge,
        u64::from(subject.bump) << 32
    ));
    let inc = net.nodes[victim].incarnation();
    let witness = |from: NodeId, sig: [u8; 64]| Item::Suspect {
        subject,
        incarnation: inc,
        from,
        sig,
    };
    let msg = |from: &NodeId| suspect_signed_bytes(&subject, inc, from);
    let items = vec![
        // invented witnesses (not in the directory)
        witness(
            NodeId::from_index(900),
            f.crypto.sign(&msg(&NodeId::from_index(900))),
        ),
        witness(NodeId::from_index(901), [0; 64]),
        witness(NodeId::from_index(902), [7; 64]),
        // real members, in the directory, that the attacker cannot sign for
        witness(id(12), f.crypto.sign(&msg(&id(12)))),
        witness(id(13), [0; 64]),
        witness(id(0), f.crypto.sign(&msg(&id(0)))),
        // and its own, real
        witness(id(ATTACKER), f.crypto.sign(&msg(&id(ATTACKER)))),
    ];
    for to in others(&net, victim) {
        let dst = *net.nodes[to].identity();
        let d = f.gossip(&dst, &[], &items);
        assert!(net.deliver(to, &d));
    }
    net.run(Duration::from_secs(20));
    for i in others(&net, victim) {
        assert!(!net.saw_down(i, victim), "node {i}: {:?}", net.events[i]);
        let s = net.nodes[i].stats();
        assert!(s.items_bad_signature >= 3, "node {i}: {s:?}");
        assert!(s.dropped_not_admitted >= 3, "node {i}: {s:?}");
    }
    assert_eq!(net.nodes[victim].identity().bump, subject.bump);
}

/// Defences: a relayed `Down` becomes a `Suspect`, and relayed records may not say more of a
/// member than it stated. A member sends `Down(victim)`, `Suspect(victim, 65535)`,
/// `Alive(victim, 60000)` and `Alive` of the victim at a later bump, to everyone and to the
/// victim itself: the victim stays up everywhere and keeps its bump.
#[test]
fn relayed_down_and_inflated_records_leave_the_victim_up_with_its_bump() {
    let mut net = Net::joined(4);
    let victim = 2;
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let subject = *net.nodes[victim].identity();
    let huge = (u64::from(subject.bump) << 32).wrapping_add(i64::MAX as u64);
    assert!(shoal_gossip::codec::seq_after(
        huge,
        u64::from(subject.bump) << 32
    ));
    let inc = net.nodes[victim].incarnation();
    let mut later = subject;
    later.bump += 7;
    let records = [
        Member::new(subject, inc, State::Down),
        Member::new(subject, u16::MAX, State::Suspect),
        Member::new(subject, 60_000, State::Alive),
        Member::new(later, 0, State::Alive),
        Member::new(later, 0, State::Down),
    ];
    let before: Vec<(u64, u64)> = (0..4)
        .map(|i| {
            let s = net.nodes[i].stats();
            (s.records_dropped, s.records_rewritten)
        })
        .collect();
    for to in 0..4 {
        let dst = *net.nodes[to].identity();
        let d = f.gossip(&dst, &records, &[]);
        assert!(net.deliver(to, &d));
    }
    net.run(Duration::from_secs(20));
    for i in others(&net, victim) {
        assert!(!net.saw_down(i, victim), "node {i}: {:?}", net.events[i]);
        assert_eq!(bump_at(&net, i, victim), Some(subject.bump), "node {i}");
        let s = net.nodes[i].stats();
        assert!(s.records_rewritten > before[i].1, "node {i}: {s:?}");
        assert!(s.records_dropped >= before[i].0 + 4, "node {i}: {s:?}");
    }
    assert_eq!(net.nodes[victim].identity().bump, subject.bump);
}

/// Defences: a member's "you are down" makes us refute (a higher incarnation in a new
/// signed record), never renew our identity; and it is heeded at most once per
/// `RENEW_HOLD`. A member tells the victim it is down twice in a row: the victim keeps its
/// bump, refutes once, and drops the second.
#[test]
fn a_member_cannot_make_another_renew_or_refute_again_and_again() {
    let mut net = Net::joined(3);
    let victim = 1;
    let mut f = Forger::new(ATTACKER, WALL0 + 50);
    let b0 = net.nodes[victim].identity().bump;
    let i0 = net.nodes[victim].incarnation();
    let me = f.identity();
    let dst = *net.nodes[victim].identity();
    let d = f.datagram(&dst, me, Message::TurnUndead, &[], &[]);
    net.deliver(victim, &d);
    assert_eq!(net.nodes[victim].identity().bump, b0);
    assert_eq!(net.nodes[victim].incarnation(), i0 + 1);
    net.run(Duration::from_secs(2));
    let dst = *net.nodes[victim].identity();
    let d = f.datagram(&dst, me, Message::TurnUndead, &[], &[]);
    assert!(!net.deliver(victim, &d));
    assert_eq!(net.nodes[victim].identity().bump, b0);
    assert_eq!(net.nodes[victim].incarnation(), i0 + 1);
    assert_eq!(net.nodes[victim].stats().dropped_renewal, 1);
    for i in others(&net, victim) {
        assert!(!net.saw_down(i, victim), "node {i}");
    }
}

/// Defence: the directory. A node with the gossip key but not in the directory (a stranger,
/// or a member the control plane removed) is refused at every door: its datagrams, its
/// push-pull frames, its records and witnesses relayed by a member, and nobody seals
/// anything for it.
#[test]
fn a_non_member_is_refused_at_every_door() {
    let mut net = Net::joined(3);
    let stranger = 20; // not in the directory of nodes 0..16
    let mut s = Forger::new(stranger, WALL0 + 50);
    let dst = *net.nodes[0].identity();
    let st0 = net.nodes[0].stats();
    // its datagrams: the tag names nobody
    let d = s.gossip(&dst, &[], &[]);
    assert!(!net.deliver(0, &d));
    // its push-pull frames
    let frame = {
        let mut core = stranger_core(&net, stranger);
        core.pushpull_frame(id(0))
            .expect("the stranger seals for node 0")
    };
    let t = net.t();
    assert!(net.nodes[0].handle_pushpull(&frame, None, t).is_err());
    // its signed record, its Alive record and its witness, relayed by a member
    let rec = NodeRecord::signed(
        s.identity(),
        0,
        9,
        false,
        stranger_meta(stranger),
        s.crypto.as_ref(),
    );
    let w_subject = *net.nodes[1].identity();
    let w = Item::Suspect {
        subject: w_subject,
        incarnation: net.nodes[1].incarnation(),
        from: id(stranger),
        sig: s.crypto.sign(&suspect_signed_bytes(
            &w_subject,
            net.nodes[1].incarnation(),
            &id(stranger),
        )),
    };
    let mut relay = Forger::new(ATTACKER, WALL0 + 50);
    let d = relay.gossip(
        &dst,
        &[Member::new(s.identity(), 0, State::Alive)],
        &[Item::Node(Arc::new(rec)), w],
    );
    net.deliver(0, &d);
    // and node 0 cannot seal for it: joining through it sends nothing
    let t = net.t();
    net.nodes[0].join(&[(id(stranger), addr(stranger))], t);
    let st1 = net.nodes[0].stats();
    assert_eq!(
        st1.dropped_not_admitted - st0.dropped_not_admitted,
        5,
        "{st1:?}"
    );
    assert_eq!(
        st1.dropped_unsealable - st0.dropped_unsealable,
        1,
        "{st1:?}"
    );
    net.run(Duration::from_secs(3));
    assert!(net.nodes[0].members().iter().all(|m| m.id != id(stranger)));
    assert!(!net.saw_down(0, 1), "the stranger's witness counted");

    // A member the control plane removes is a stranger from then on.
    let t = net.t();
    net.nodes[0].set_admission(dir((0..DIRECTORY).filter(|i| *i != 2)), t);
    net.run(Duration::from_secs(1));
    let st2 = net.nodes[0].stats();
    let frame = net.nodes[2].pushpull_frame(id(0)).expect("frame");
    let t = net.t();
    assert!(net.nodes[0].handle_pushpull(&frame, None, t).is_err());
    net.run(Duration::from_secs(3));
    let st3 = net.nodes[0].stats();
    assert!(
        st3.dropped_not_admitted > st2.dropped_not_admitted + 1,
        "{st3:?}"
    );
    assert!(net.nodes[0]
        .members()
        .iter()
        .all(|m| m.id != id(2) || m.state == shoal_gossip::MemberState::Down));
}

fn stranger_meta(i: usize) -> shoal_gossip::Metadata {
    let mut m = meta(i);
    m.public_key = insecure_test_keys(&id(i)).public().x25519;
    m
}

/// A core for a node outside the directory that believes itself a member (its own
/// directory names node 0 to 15 and itself).
fn stranger_core(net: &Net, i: usize) -> Membership {
    let wide: Vec<(NodeId, PublicKeys)> = (0..DIRECTORY)
        .chain([i])
        .map(|j| (id(j), insecure_test_keys(&id(j)).public()))
        .collect();
    Membership::new(
        shoal_gossip::Setup {
            config: shoal_gossip::Config::lan(10),
            identity: Identity::new(id(i), addr(i), 1),
            metadata: stranger_meta(i),
            keyring: key(7),
            admission: Admission::only(wide),
            crypto: crypto(i),
            seed: 1,
            epoch: WALL0 + 1,
            salt: 1,
            wall_ms: net.wall(),
        },
        net.t(),
    )
    .expect("setup")
}
