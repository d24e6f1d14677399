//! Two tokio drivers on loopback: join through a seed, see each other up with metadata,
//! push-pull over TCP, metadata update, graceful leave.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use shoal_gossip::{driver, Event, Key, Keyring, Metadata, NodeId, Role};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

fn free_port() -> SocketAddr {
    // Ask the OS for a free port on loopback; the tiny race with other tests is harmless.
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    s.local_addr().expect("local addr")
}

fn meta(i: u8) -> Metadata {
    Metadata {
        vtep: "127.0.0.1".parse().expect("ip"),
        data_port: 4789,
        public_key: [i; 32],
        incarnation: 1,
        role: Role::Worker,
        version: "test".into(),
    }
}

async fn next_matching(
    rx: &mut UnboundedReceiver<Event>,
    f: impl Fn(&Event) -> bool,
) -> Option<Event> {
    timeout(Duration::from_secs(15), async {
        while let Some(e) = rx.recv().await {
            if f(&e) {
                return Some(e);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn two_drivers_join_update_and_leave() {
    let key = Keyring::new(Key {
        id: 1,
        secret: [3; 32],
    });
    let (a_addr, b_addr) = (free_port(), free_port());
    let (a_id, b_id) = (NodeId::from_index(101), NodeId::from_index(102));
    let mut ca = driver::Config::new(a_id, a_addr, meta(1), key.clone());
    ca.bind = a_addr;
    let mut cb = driver::Config::new(b_id, b_addr, meta(2), key);
    cb.bind = b_addr;
    cb.seeds = vec![a_addr];
    let (ha, mut ea) = driver::start(ca).await.expect("start a");
    let (hb, mut eb) = driver::start(cb).await.expect("start b");

    let up = next_matching(&mut ea, |e| matches!(e, Event::Up(m) if m.id == b_id)).await;
    match up {
        Some(Event::Up(m)) => assert_eq!(m.metadata, Some(meta(2))),
        other => panic!("a never saw b up: {other:?}"),
    }
    assert!(
        next_matching(&mut eb, |e| matches!(e, Event::Up(m) if m.id == a_id))
            .await
            .is_some()
    );

    let mut m2 = meta(2);
    m2.role = Role::Manager;
    hb.update_metadata(m2.clone()).await.expect("update");
    let upd = next_matching(&mut ea, |e| matches!(e, Event::Updated(m) if m.id == b_id)).await;
    match upd {
        Some(Event::Updated(m)) => assert_eq!(m.metadata, Some(m2)),
        other => panic!("no update: {other:?}"),
    }
    let members = ha.members().await.expect("members");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].id, b_id);
    let stats = ha.stats().await.expect("stats");
    assert!(stats.datagrams_in > 0 && stats.datagrams_out > 0);
    // b joined through a: a push-pull ran over TCP
    assert!(stats.stream_bytes_in > 0, "{stats:?}");
    assert_eq!(stats.dropped_seal + stats.dropped_decode, 0);

    hb.leave().await.expect("leave");
    assert!(
        next_matching(&mut ea, |e| matches!(e, Event::Left(m) if m.id == b_id))
            .await
            .is_some(),
        "a did not see b leave"
    );
    hb.shutdown().await;
    ha.shutdown().await;
    assert!(ha.members().await.is_err(), "handle works after shutdown");
}
