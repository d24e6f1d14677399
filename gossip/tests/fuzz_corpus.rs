//! The seed corpora of `gossip/fuzz` (codec and envelope targets), made from the current
//! wire format. `cargo test -p shoal-gossip --test fuzz_corpus -- --ignored` writes them; the
//! other test checks that the committed files still parse as what they stand for, so a wire
//! change cannot leave the fuzzers starting from bytes that fail at the first check.

use std::path::PathBuf;
use std::sync::Arc;

use foca::{Header, Member, Message, State};
use shoal_gossip::auth::insecure_test_keys;
use shoal_gossip::codec::{
    decode_header, encode_header, Codec, Entry, Item, NodeRecord, StateDump,
};
use shoal_gossip::{Identity, Metadata, NodeId, Role};

fn ident(i: u128) -> Identity {
    let addr = format!("198.18.0.{i}:7946").parse().expect("address");
    Identity::new(NodeId::from_index(i), addr, 1)
}

fn record(i: u128) -> NodeRecord {
    let keys = insecure_test_keys(&NodeId::from_index(i));
    let meta = Metadata {
        vtep: ident(i).socket_addr().ip(),
        data_port: 4789,
        public_key: keys.public().x25519,
        incarnation: [i as u8; 16],
        role: Role::Worker,
        version: "fuzz".into(),
    };
    NodeRecord::signed(ident(i), 0, (1 << 32) + 1, false, meta, &keys)
}

fn witness() -> Item {
    let keys = insecure_test_keys(&NodeId::from_index(9));
    let msg = shoal_gossip::codec::suspect_signed_bytes(&ident(2), 0, &NodeId::from_index(9));
    Item::Suspect {
        subject: ident(2),
        incarnation: 0,
        from: NodeId::from_index(9),
        sig: shoal_gossip::auth::Crypto::sign(&keys, &msg),
    }
}

/// A foca datagram from node 9 to node 1: header, updates, custom items.
fn datagram(message: Message<Identity>, members: &[Member<Identity>], items: &[Item]) -> Vec<u8> {
    let mut v = encode_header(&Header {
        src: ident(9),
        src_incarnation: 0,
        dst: ident(1),
        message,
    });
    if !members.is_empty() || !items.is_empty() {
        v.extend_from_slice(&(members.len() as u16).to_be_bytes());
        for m in members {
            foca::Codec::encode_member(&mut Codec, m, &mut v).expect("room");
        }
        for i in items {
            let b = i.encode();
            v.extend_from_slice(&(b.len() as u16).to_be_bytes());
            v.extend_from_slice(&b);
        }
    }
    v
}

/// An entry of node `author`, signed by it (a tombstone without `value`).
fn entry(author: u128, key: &str, version: u64, value: Option<&str>) -> Entry {
    let keys = insecure_test_keys(&NodeId::from_index(author));
    Entry::signed(
        NodeId::from_index(author),
        key.as_bytes().to_vec(),
        version,
        value.map(|v| v.as_bytes().to_vec()),
        &keys,
    )
    .expect("small entry")
}

fn state_with(entries: Vec<Entry>) -> Vec<u8> {
    StateDump {
        members: vec![
            Member::new(ident(2), 0, State::Alive),
            Member::new(ident(3), 1, State::Suspect),
            Member::new(ident(9), 0, State::Alive),
        ],
        records: vec![Arc::new(record(2)), Arc::new(record(9))],
        entries: entries.into_iter().map(Arc::new).collect(),
    }
    .encode()
}

/// A version-3 state (no entries).
fn state() -> Vec<u8> {
    state_with(Vec::new())
}

/// A version-4 state: entries of nodes 2 and 9, a tombstone among them.
fn state_entries() -> Vec<u8> {
    state_with(vec![
        entry(2, "ep/a", 10, Some("net1 10.0.0.2 02:42:0a:00:00:02")),
        entry(9, "ep/b", 11, None),
        entry(9, "ep/c", 12, Some("net1 10.0.0.3 02:42:0a:00:00:03")),
    ])
}

/// (target, file, bytes)
fn corpus() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let gossip = datagram(
        Message::Gossip,
        &[
            Member::new(ident(2), 0, State::Alive),
            Member::new(ident(3), 0, State::Down),
        ],
        &[Item::Node(Arc::new(record(9))), witness()],
    );
    let with_entry = datagram(
        Message::Gossip,
        &[],
        &[Item::Entry(Arc::new(entry(
            9,
            "ep/c",
            12,
            Some("net1 10.0.0.3 02:42:0a:00:00:03"),
        )))],
    );
    let ping = datagram(Message::Ping(7), &[], &[]);
    let pingreq = encode_header(&Header {
        src: ident(9),
        src_incarnation: 0,
        dst: ident(1),
        message: Message::PingReq {
            target: ident(2),
            probe_number: 3,
        },
    });
    let announce = datagram(Message::Announce, &[], &[]);
    let with_mode = |mode: u8, b: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(b);
        v
    };
    vec![
        ("codec", "header_ping", ping.clone()),
        ("codec", "header_pingreq", pingreq),
        ("codec", "datagram", gossip.clone()),
        (
            "codec",
            "item_node",
            Item::Node(Arc::new(record(2))).encode(),
        ),
        ("codec", "item_suspect", witness().encode()),
        ("codec", "state", state()),
        (
            "codec",
            "item_entry",
            Item::Entry(Arc::new(entry(2, "ep/a", 10, Some("net1")))).encode(),
        ),
        (
            "codec",
            "item_entry_tombstone",
            Item::Entry(Arc::new(entry(2, "ep/a", 11, None))).encode(),
        ),
        ("codec", "state_entries", state_entries()),
        ("envelope", "raw_datagram", with_mode(0, &gossip)),
        ("envelope", "raw_state", with_mode(2, &state())),
        ("envelope", "sealed_announce", with_mode(1, &announce)),
        ("envelope", "sealed_datagram", with_mode(1, &gossip)),
        ("envelope", "sealed_state", with_mode(3, &state())),
        ("envelope", "stranger_datagram", with_mode(5, &gossip)),
        ("envelope", "stranger_state", with_mode(7, &state())),
        (
            "envelope",
            "sealed_datagram_entry",
            with_mode(1, &with_entry),
        ),
        (
            "envelope",
            "sealed_state_entries",
            with_mode(3, &state_entries()),
        ),
    ]
}

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
#[ignore = "writes gossip/fuzz/corpus: cargo test -p shoal-gossip --test fuzz_corpus -- --ignored"]
fn write_corpus() {
    for (target, name, bytes) in corpus() {
        std::fs::create_dir_all(dir(target)).expect("corpus dir");
        std::fs::write(dir(target).join(name), bytes).expect("write corpus file");
    }
}

#[test]
fn committed_corpus_is_the_current_format() {
    for (target, name, bytes) in corpus() {
        let path = dir(target).join(name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        // Signatures are deterministic (Ed25519), so the bytes are reproducible.
        assert_eq!(
            on_disk,
            bytes,
            "{} is stale; rewrite the corpus",
            path.display()
        );
    }
    // and they parse as what they stand for
    assert!(decode_header(&corpus()[0].2).is_ok());
    assert!(Item::decode(&corpus()[3].2).is_ok());
    assert!(StateDump::decode(&corpus()[5].2).is_ok());
    for (_, name, bytes) in corpus() {
        match name {
            "item_entry" | "item_entry_tombstone" => {
                assert!(matches!(Item::decode(&bytes), Ok(Item::Entry(_))), "{name}")
            }
            "state_entries" => {
                assert_eq!(StateDump::decode(&bytes).expect(name).entries.len(), 3)
            }
            _ => {}
        }
    }
}
