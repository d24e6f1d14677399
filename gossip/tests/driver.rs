//! Tokio drivers on loopback (127.0.0.0/8 only): join through a seed, see each other up
//! with metadata, push-pull over TCP, metadata update, graceful leave; and the doors of the
//! TCP port before authentication (per-address and total caps on idle strangers, the first
//! frame's deadline, the exchange slot taken only once a frame opened).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use shoal_gossip::auth::insecure_test_keys;
use shoal_gossip::membership::ApiError;
use shoal_gossip::{
    driver, Admission, Event, Key, Keyring, Membership, Metadata, NodeId, Role, Setup,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

fn free_port(ip: &str) -> SocketAddr {
    // Ask the OS for a port free for both UDP and TCP (a driver binds both); the tiny race
    // with other sockets until the driver binds it is harmless as long as the caller binds
    // soon after asking.
    for _ in 0..100 {
        let s = UdpSocket::bind(format!("{ip}:0")).expect("bind loopback");
        let addr = s.local_addr().expect("local addr");
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no port free for both UDP and TCP on {ip} in 100 tries");
}

fn id(i: u128) -> NodeId {
    NodeId::from_index(100 + i)
}

fn meta(i: u128, ip: &str) -> Metadata {
    Metadata {
        vtep: ip.parse().expect("ip"),
        data_port: 4789,
        public_key: insecure_test_keys(&id(i)).public().x25519,
        incarnation: [i as u8; 16],
        role: Role::Worker,
        version: "test".into(),
    }
}

fn directory() -> Admission {
    Admission::only((1..=4).map(|i| (id(i), insecure_test_keys(&id(i)).public())))
}

/// Node `i` listening on `addr`, with the directory of nodes 1 to 4.
fn config(i: u128, addr: SocketAddr) -> driver::Config {
    let ip = addr.ip().to_string();
    let mut c = driver::Config::new(
        id(i),
        addr,
        meta(i, &ip),
        Keyring::new(Key {
            id: 1,
            secret: [3; 32],
        }),
        insecure_test_keys(&id(i)),
    );
    c.bind = addr;
    c.admission = directory();
    c
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
    let (a_addr, b_addr) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let ca = config(1, a_addr);
    let mut cb = config(2, b_addr);
    cb.seeds = vec![(id(1), a_addr)];
    let (ha, mut ea) = driver::start(ca).await.expect("start a");
    let (hb, mut eb) = driver::start(cb).await.expect("start b");

    let up = next_matching(&mut ea, |e| matches!(e, Event::Up(m) if m.id == id(2))).await;
    match up {
        Some(Event::Up(m)) => assert_eq!(m.metadata, Some(meta(2, "127.0.0.1"))),
        other => panic!("a never saw b up: {other:?}"),
    }
    assert!(
        next_matching(&mut eb, |e| matches!(e, Event::Up(m) if m.id == id(1)))
            .await
            .is_some()
    );

    let mut m2 = meta(2, "127.0.0.1");
    m2.role = Role::Manager;
    hb.update_metadata(m2.clone()).await.expect("update");
    let upd = next_matching(&mut ea, |e| matches!(e, Event::Updated(m) if m.id == id(2))).await;
    match upd {
        Some(Event::Updated(m)) => assert_eq!(m.metadata, Some(m2)),
        other => panic!("no update: {other:?}"),
    }
    // metadata with another node's key is refused, nothing changes
    assert!(hb.update_metadata(meta(3, "127.0.0.1")).await.is_err());
    let members = ha.members().await.expect("members");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].id, id(2));
    let stats = ha.stats().await.expect("stats");
    assert!(stats.datagrams_in > 0 && stats.datagrams_out > 0);
    assert!(stats.datagrams_opened > 0, "{stats:?}");
    // b joined through a: a push-pull ran over TCP
    assert!(stats.stream_bytes_in > 0, "{stats:?}");
    assert_eq!(stats.dropped_seal + stats.dropped_decode, 0);

    hb.leave().await.expect("leave");
    assert!(
        next_matching(&mut ea, |e| matches!(e, Event::Left(m) if m.id == id(2)))
            .await
            .is_some(),
        "a did not see b leave"
    );
    hb.shutdown().await;
    ha.shutdown().await;
    assert!(ha.members().await.is_err(), "handle works after shutdown");
}

/// Entries through the handles: set on one driver, reported and listed on the other (and
/// on the author), deleted, refused when stale; a node that joins later gets them by its
/// join's push-pull over TCP.
#[tokio::test]
async fn entries_through_the_handles() {
    let (a_addr, b_addr) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let mut cb = config(2, b_addr);
    cb.seeds = vec![(id(1), a_addr)];
    let (ha, mut ea) = driver::start(config(1, a_addr)).await.expect("start a");
    let (hb, mut eb) = driver::start(cb).await.expect("start b");
    assert!(
        next_matching(&mut ea, |e| matches!(e, Event::Up(m) if m.id == id(2)))
            .await
            .is_some()
    );
    ha.set_entry(b"ep/1".to_vec(), 5, Some(b"10.0.0.5".to_vec()))
        .await
        .expect("set");
    let is_ep = |e: &Event, value: Option<&[u8]>| {
        matches!(e, Event::Entry { author, key, version, value: v }
            if *author == id(1) && key == b"ep/1" && *version >= 5 && v.as_deref() == value)
    };
    assert!(
        next_matching(&mut ea, |e| is_ep(e, Some(b"10.0.0.5")))
            .await
            .is_some(),
        "the author reports its own change"
    );
    assert!(
        next_matching(&mut eb, |e| is_ep(e, Some(b"10.0.0.5")))
            .await
            .is_some(),
        "b never saw a's entry"
    );
    let listed = hb.entries().await.expect("entries");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].author,
            listed[0].version,
            listed[0].value.as_slice()
        ),
        (id(1), 5, &b"10.0.0.5"[..])
    );
    assert!(matches!(
        ha.set_entry(b"ep/1".to_vec(), 5, None).await,
        Err(driver::HandleError::Api(ApiError::StaleVersion {
            held: 5,
            ..
        }))
    ));
    // c joins later and gets it too (its join's push-pull carries every entry)
    // c's port is picked only now: picked at the start, it stayed free for UDP but a and b's
    // push-pull connections, opened meanwhile, could take it as their TCP ephemeral port.
    let mut cc = config(3, free_port("127.0.0.1"));
    cc.seeds = vec![(id(2), b_addr)];
    let (hc, mut ec) = driver::start(cc).await.expect("start c");
    assert!(
        next_matching(&mut ec, |e| is_ep(e, Some(b"10.0.0.5")))
            .await
            .is_some(),
        "c never got a's entry"
    );
    ha.set_entry(b"ep/1".to_vec(), 6, None)
        .await
        .expect("delete");
    for rx in [&mut eb, &mut ec] {
        assert!(
            next_matching(rx, |e| is_ep(e, None)).await.is_some(),
            "the deletion did not arrive"
        );
    }
    assert!(hc.entries().await.expect("entries").is_empty());
    for h in [ha, hb, hc] {
        h.shutdown().await;
    }
}

/// Opens a TCP connection from `source` (a loopback address) to `to`, sends nothing.
async fn idle(source: &str, to: SocketAddr) -> Option<TcpStream> {
    let s = TcpSocket::new_v4().ok()?;
    s.bind(SocketAddr::new(source.parse().ok()?, 0)).ok()?;
    s.connect(to).await.ok()
}

/// One push-pull exchange as node `me` from `source` with node `peer` at `to`, through a
/// sans-IO core and a raw TCP connection (`len u32 | frame` each way). Returns who
/// answered, authenticated.
async fn push_pull(me: u128, source: &str, peer: u128, to: SocketAddr) -> Result<NodeId, String> {
    let now = std::time::Instant::now();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as u64;
    let mut core = Membership::new(
        Setup {
            config: shoal_gossip::Config::lan(4),
            identity: shoal_gossip::Identity::new(
                id(me),
                SocketAddr::new(source.parse().map_err(|_| "ip")?, 7946),
                1,
            ),
            metadata: meta(me, source),
            keyring: Keyring::new(Key {
                id: 1,
                secret: [3; 32],
            }),
            admission: directory(),
            crypto: std::sync::Arc::new(insecure_test_keys(&id(me))),
            seed: 1,
            epoch: wall,
            salt: 1,
            wall_ms: wall,
        },
        now,
    )
    .map_err(|e| e.to_string())?;
    let frame = core.pushpull_frame(id(peer)).map_err(|e| e.to_string())?;
    let mut s = idle(source, to).await.ok_or("connect")?;
    s.write_u32(frame.len() as u32)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&frame).await.map_err(|e| e.to_string())?;
    let len = s.read_u32().await.map_err(|e| format!("no answer: {e}"))?;
    let mut reply = vec![0u8; len as usize];
    s.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
    core.handle_pushpull(&reply, Some(id(peer)), now)
        .map_err(|e| e.to_string())
}

static LOG_LINES: AtomicUsize = AtomicUsize::new(0);

fn count_log(_line: &str) {
    LOG_LINES.fetch_add(1, Ordering::Relaxed);
}

/// Before, an exchange slot (4) was taken at accept: four idle connections from anyone
/// blocked every push-pull. Now 127.0.0.2 holds 40 idle connections and 127.0.0.4 two more,
/// and a real push-pull from 127.0.0.3 (node 2's frame, answered by a) still completes: the per-address cap keeps
/// 127.0.0.2 to 2 (without it, 32 of its connections fill the total cap and the real peer is
/// refused), and idle strangers hold no exchange slot (with slots taken at accept, the four
/// idle connections let in take all of them).
#[tokio::test]
async fn idle_strangers_do_not_block_a_real_push_pull() {
    let a_addr = free_port("127.0.0.1");
    let mut ca = config(1, a_addr);
    ca.log = count_log;
    let (ha, _ea) = driver::start(ca).await.expect("start a");
    let mut held = Vec::new();
    for _ in 0..40 {
        held.extend(idle("127.0.0.2", a_addr).await);
    }
    for _ in 0..2 {
        held.extend(idle("127.0.0.4", a_addr).await);
    }
    assert_eq!(held.len(), 42, "could not open the idle connections");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // node 2 runs one exchange with a, as its driver would, from 127.0.0.3
    let answer = timeout(Duration::from_secs(4), push_pull(2, "127.0.0.3", 1, a_addr)).await;
    let sa = ha.stats().await.expect("stats");
    match answer {
        Ok(Ok(from)) => assert_eq!(from, id(1)),
        other => panic!("the push-pull with a did not complete: {other:?}; a: {sa:?}"),
    }
    assert!(sa.pushpull_applied > 0, "{sa:?}");
    assert_eq!(sa.tcp_refused_per_ip, 38, "{sa:?}");
    assert_eq!(sa.tcp_refused_global, 0, "{sa:?}");
    assert_eq!(sa.tcp_refused_busy, 0, "{sa:?}");
    assert_eq!(
        LOG_LINES.load(Ordering::Relaxed),
        1,
        "one log line for the refusals"
    );
    // the strangers are still connected: the deadline has not passed
    drop(held);
    ha.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_a_frame_is_closed_at_the_deadline() {
    let a_addr = free_port("127.0.0.1");
    let mut ca = config(1, a_addr);
    ca.first_frame_timeout = Duration::from_millis(300);
    let (ha, _ea) = driver::start(ca).await.expect("start a");
    let mut s = idle("127.0.0.5", a_addr).await.expect("connect");
    // a length that announces 16 MiB, then nothing: closed at the deadline, not held
    let _ = s.write_all(&(16u32 << 20).to_be_bytes()).await;
    let mut buf = [0u8; 1];
    let closed = timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open: {closed:?}"
    );
    let st = ha.stats().await.expect("stats");
    assert_eq!(st.tcp_first_frame_timeout, 1, "{st:?}");
    // and its place is free again: two more from the same address are let in
    let again: Vec<_> = [
        idle("127.0.0.5", a_addr).await,
        idle("127.0.0.5", a_addr).await,
    ]
    .into_iter()
    .flatten()
    .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(again.len(), 2);
    assert_eq!(ha.stats().await.expect("stats").tcp_refused_per_ip, 0);
    ha.shutdown().await;
}
