//! A server that is not the swarm's manager but holds a certificate of the swarm's CA (a
//! worker's, or the manager certificate of a node that was demoted or left): a joining node
//! refuses it and never sends it the join secret, and a member's watch stream and forwarded
//! admin commands refuse it too. Real agents (in this process, control plane only) against an
//! impostor TLS server on loopback that records every byte it is sent.

#![allow(clippy::unwrap_used)] // test code: a failed step fails the test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_control::agent::{Agent, AgentConfig};
use shoal_control::api::{
    write_frame, AdminRequest, JoinGrant, JoinRequest, ManagerReply, ManagerRequest,
    ManagerResponse, Request,
};
use shoal_control::id::NodeId;
use shoal_control::manager::state::{
    Availability, CaMaterial, ClusterView, KeyEntry, Keys, Network, Node, Role,
};
use shoal_control::store::{Membership, Store, Write};
use shoal_control::token::CaDigest;
use shoal_control::trust::tls::{
    cert_digest, generate_ca, issue_node_cert, server_config, Issued, Validity, DEFAULT_CERT_EXPIRY,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn cert(ca: &CaMaterial, id: &NodeId, role: Role) -> Issued {
    issue_node_cert(ca, id, role, Validity::from_now(now(), DEFAULT_CERT_EXPIRY)).unwrap()
}

/// What the impostor was sent, in the clear (after TLS), and whether a handshake completed.
#[derive(Default)]
struct Seen {
    handshakes: usize,
    bytes: Vec<u8>,
}

/// An impostor on 127.0.0.x: serves TLS with `cert`; after a handshake it answers a join hello
/// with its own X25519 key and a join with `grant`, and records everything it reads.
async fn impostor(
    ca: &CaMaterial,
    cert: Issued,
    grant: Option<JoinGrant>,
) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&ca.cert_der, &cert).unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            record.lock().unwrap().handshakes += 1;
            let grant = grant.clone();
            let record = record.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 4];
                    if tls.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if tls.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    record.lock().unwrap().bytes.extend_from_slice(&body);
                    let reply: ManagerResponse = match serde_json::from_slice(&body) {
                        Ok(ManagerRequest::JoinHello) => Ok(ManagerReply::JoinChallenge {
                            public_key: shoal_control::trust::join::public_keys(&[0x77; 32]).0,
                        }),
                        Ok(ManagerRequest::Join(_)) => match &grant {
                            Some(g) => Ok(ManagerReply::Joined(Box::new(g.clone()))),
                            None => Err("no".into()),
                        },
                        _ => Err("no".into()),
                    };
                    if write_frame(&mut tls, &reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn agent(dir: &std::path::Path, name: &str) -> Arc<Agent> {
    Agent::start(AgentConfig {
        state_dir: dir.join(name),
        socket: dir.join(format!("{name}.sock")),
        hostname: name.into(),
        gossip_addr: Some("127.0.0.1:0".parse().unwrap()),
        data_path: None,
        metrics_addr: None,
        socket_group: None,
    })
    .await
    .unwrap()
}

fn node(id: &NodeId, role: Role, cert: &Issued, last: u8) -> Node {
    Node {
        id: id.clone(),
        hostname: format!("n{last}"),
        addr: [127, 0, 0, last].into(),
        role,
        availability: Availability::Active,
        public_key: [last; 32],
        signing_key: [last; 32],
        cert_digest: cert_digest(&cert.cert_der),
        cert_der: Vec::new(),
        cert_not_after: 0,
        cert_public_key: Vec::new(),
        previous_cert_digest: None,
        engine_version: "0.1.0".into(),
        left: false,
        overlay_addr: None,
        joined_at: 1,
        raft_id: (role == Role::Manager).then_some(1),
        api_addr: None,
    }
}

fn view(ca: &CaMaterial, api_addr: SocketAddr, leader: &NodeId, nodes: Vec<Node>) -> ClusterView {
    // The manager is known by its API address in its node record.
    let nodes = nodes
        .into_iter()
        .map(|mut n| {
            if &n.id == leader {
                n.api_addr = Some(api_addr);
            }
            n
        })
        .collect();
    ClusterView {
        version: 5,
        generation: 0,
        networks: Vec::new(),
        services: Vec::new(),
        ca_cert_der: ca.cert_der.clone(),
        nodes,
        keys: Keys {
            gossip: vec![KeyEntry {
                id: 1,
                key: [1; 32],
            }],
            data_path: vec![KeyEntry {
                id: 1,
                key: [2; 32],
            }],
            rotated_at: now(),
            interval_secs: 3600,
            owed: false,
        },
        ingress: Network {
            name: "ingress".into(),
            vni: 4096,
            subnet: "198.19.0.0/24".into(),
            encrypted: true,
            data_path_port: 4789,
            vteps: Vec::new(),
        },
        cert_expiry_secs: DEFAULT_CERT_EXPIRY.as_secs(),
    }
}

fn token(ca: &CaMaterial, secret: &str) -> String {
    format!("SWMTKN-1-{}-{secret}", CaDigest::of(&ca.cert_der))
}

/// A fresh agent in `dir` joins the swarm of `ca` through `addr`; its error line.
async fn join_fails(
    dir: &std::path::Path,
    ca: &CaMaterial,
    addr: SocketAddr,
) -> (Arc<Agent>, String) {
    let joiner = agent(dir, "j").await;
    let err = joiner
        .handle(Request::Join(JoinRequest {
            token: token(ca, SECRET),
            manager: addr.to_string(),
            advertise_addr: None,
        }))
        .await
        .unwrap_err();
    (joiner, err)
}

const SECRET: &str = "0123456789abcdefghijklmno";

#[tokio::test]
async fn a_worker_certificate_cannot_pose_as_the_manager_to_a_joining_node() {
    let ca = generate_ca().unwrap();
    let worker = cert(&ca, &NodeId::from_random(7), Role::Worker);
    let (addr, seen) = impostor(&ca, worker, None).await;
    let dir = tempfile::tempdir().unwrap();
    let (joiner, err) = join_fails(dir.path(), &ca, addr).await;
    assert!(err.contains("not a manager's"), "{err}");
    assert!(err.contains("nothing was sent"), "{err}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.handshakes, 0, "the handshake itself failed");
        assert!(seen.bytes.is_empty());
    }
    assert!(joiner.handle(Request::Info).await.is_ok());
}

#[tokio::test]
async fn a_manager_certificate_of_another_node_gets_no_secret_and_no_member() {
    let ca = generate_ca().unwrap();
    // The impostor holds a genuine manager certificate (a manager that was demoted, or left,
    // and kept it), and sends a grant that names the real leader.
    let leader = NodeId::from_random(1);
    let impostor_id = NodeId::from_random(9);
    let impostor_cert = cert(&ca, &impostor_id, Role::Manager);
    let leader_cert = cert(&ca, &leader, Role::Manager);
    let new_id = NodeId::from_random(2);
    let new_cert = cert(&ca, &new_id, Role::Worker);
    let addr_guess: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let grant = JoinGrant {
        node_id: new_id.clone(),
        cert_der: new_cert.cert_der.clone(),
        cert_not_after: now() + 1000,
        view: view(
            &ca,
            addr_guess,
            &leader,
            vec![
                node(&leader, Role::Manager, &leader_cert, 1),
                node(&new_id, Role::Worker, &new_cert, 2),
            ],
        )
        .to_wire(),
    };
    let (addr, seen) = impostor(&ca, impostor_cert, Some(grant)).await;
    let dir = tempfile::tempdir().unwrap();
    let (joiner, err) = join_fails(dir.path(), &ca, addr).await;
    assert!(err.contains("not one of the swarm's managers"), "{err}");
    let (handshakes, bytes) = {
        let seen = seen.lock().unwrap();
        (seen.handshakes, seen.bytes.clone())
    };
    assert_eq!(handshakes, 1);
    assert!(
        !bytes.is_empty(),
        "the join hello and the claim went through TLS"
    );
    assert!(
        !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the join secret was written to the impostor"
    );
    // Nothing was kept: the node is in no swarm.
    let Ok(shoal_control::api::Reply::Info(info)) = joiner.handle(Request::Info).await else {
        panic!("info")
    };
    assert_eq!(info.node_id, None);
}

/// A member (here a promoted manager, which forwards admin commands) whose manager address
/// now leads to a server with a worker's certificate: its watch stream and its admin
/// commands both refuse that server, and send it nothing.
#[tokio::test]
async fn watch_and_admin_refuse_a_worker_certificate() {
    let ca = generate_ca().unwrap();
    let leader = NodeId::from_random(1);
    let me = NodeId::from_random(3);
    let leader_cert = cert(&ca, &leader, Role::Manager);
    let key = shoal_control::trust::tls::NodeKey::generate().unwrap();
    let my_cert = Issued {
        cert_der: shoal_control::trust::tls::sign_node_cert(
            &ca,
            &me,
            Role::Manager,
            &key.public_raw(),
            Validity::from_now(now(), DEFAULT_CERT_EXPIRY),
        )
        .unwrap(),
        key_pem: key.private_pem(),
    };
    let (addr, seen) = impostor(&ca, cert(&ca, &NodeId::from_random(8), Role::Worker), None).await;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(&dir.path().join("m")).await.unwrap();
        store.node_key([3; 32]).await.unwrap();
        let m = Membership {
            node_id: me.clone(),
            cert_der: my_cert.cert_der.clone(),
            key_pem: my_cert.key_pem.clone(),
            cert_not_after: now() + 1_000_000,
            view: view(
                &ca,
                addr,
                &leader,
                vec![
                    node(&leader, Role::Manager, &leader_cert, 1),
                    node(&me, Role::Manager, &my_cert, 3),
                ],
            ),
            listen_addr: None,
        };
        store.write(&[Write::Membership(&m)]).await.unwrap();
    }
    // The agent resumes its membership and opens its watch stream (which must fail).
    let member = agent(dir.path(), "m").await;
    let err = member
        .handle(Request::Admin(AdminRequest::NodeLs))
        .await
        .unwrap_err();
    assert!(err.contains("could not reach the manager"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.handshakes, 0, "no handshake completed");
    assert!(seen.bytes.is_empty(), "nothing was sent");
}
