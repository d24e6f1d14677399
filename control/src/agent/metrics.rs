//! Prometheus metrics at `/metrics` (`shoal agent --metrics-addr ADDR`, off by default):
//! the data path (traffic and drops by reason, engine-wide and per peer, key epochs, last
//! packet seen), gossip (members by state, datagrams, bytes, drops, failed probes, local
//! health) and the control plane (view version, nodes by role and status).
//!
//! [`render`] is pure: it turns a [`Snapshot`] into the OpenMetrics text format (which
//! Prometheus scrapes) through `prometheus-client`. [`serve`] is the HTTP shell: one
//! `GET /metrics` per connection, bounded in size and time.

use std::net::IpAddr;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_gossip::MemberState;
use shoal_vxlan::engine::{Counters, DropReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Everything exported, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// This node's host name.
    pub hostname: String,
    /// Node ID and role, in a swarm.
    pub node: Option<(String, String)>,
    /// Version of the cluster view held.
    pub view_version: Option<u64>,
    /// Nodes in the view: (role, status as `node ls` says it).
    pub nodes: Vec<(String, String)>,
    /// The data path, if it runs.
    pub data_path: Option<DataPathSnapshot>,
    /// Gossip, if it runs.
    pub gossip: Option<GossipSnapshot>,
    /// Faults the agent survived, by kind (counts since start).
    pub faults: Vec<(&'static str, u64)>,
    /// On the manager: connections its API refused over a limit, by limit.
    pub api_refused: Vec<(&'static str, u64)>,
}

/// The data path's figures.
#[derive(Debug, Clone, Default)]
pub struct DataPathSnapshot {
    /// Network name.
    pub network: String,
    /// Engine-wide counters.
    pub counters: Counters,
    /// Per peer.
    pub peers: Vec<PeerSnapshot>,
    /// The epoch this node seals under.
    pub send_epoch: Option<u32>,
    /// IO errors by kind (device reads, socket sends, ...).
    pub io_errors: Vec<(&'static str, u64)>,
    /// Frames answered locally (ARP).
    pub answered_locally: u64,
    /// `shoal capture` readers attached.
    pub capture_readers: usize,
    /// The routing mesh's counters.
    pub mesh: shoal_ingress::mesh::MeshCounters,
}

/// One peer of the data path.
#[derive(Debug, Clone, Default)]
pub struct PeerSnapshot {
    /// Its host name, or how else it is known.
    pub name: String,
    /// Its underlay address.
    pub vtep: Option<IpAddr>,
    /// Traffic and drops attributed to it.
    pub counters: Counters,
    /// Epoch of the last sealed datagram from it.
    pub last_rx_epoch: Option<u32>,
    /// Seconds since the last frame from it.
    pub last_rx_age: Option<Duration>,
}

/// Gossip's figures.
#[derive(Debug, Clone, Default)]
pub struct GossipSnapshot {
    /// Members by state (labelled by [`member_state`]).
    pub members: Vec<(MemberState, u64)>,
    /// The driver's counters.
    pub stats: shoal_gossip::Stats,
}

/// Builds one scrape's registry.
struct Page {
    registry: Registry,
}

type Labels = Vec<(&'static str, String)>;

impl Page {
    /// Registers one family of metrics of type `M`, each sample set by `set`.
    fn family<M, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, V)>,
        set: impl Fn(&M, V),
    ) where
        M: prometheus_client::metrics::TypedMetric
            + prometheus_client::encoding::EncodeMetric
            + Default
            + Clone
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let family = Family::<Labels, M>::default();
        for (labels, v) in samples {
            set(&family.get_or_create(&labels), v);
        }
        self.registry.register(name, help, family);
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        self.family(name, help, samples, |c: &Counter, v| {
            c.inc_by(v);
        });
    }

    fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, i64)>) {
        self.family(name, help, samples, |g: &Gauge, v| {
            g.set(v);
        });
    }

    fn seconds(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        self.family(
            name,
            help,
            samples,
            |g: &Gauge<f64, std::sync::atomic::AtomicU64>, v| {
                g.set(v);
            },
        );
    }
}

fn saturate(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// The OpenMetrics text for `s`.
pub fn render(s: &Snapshot) -> String {
    let mut p = Page {
        registry: Registry::with_prefix("shoal"),
    };
    let mut info: Labels = vec![
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("hostname", s.hostname.clone()),
    ];
    if let Some((id, role)) = &s.node {
        info.push(("node_id", id.clone()));
        info.push(("role", role.clone()));
    }
    p.gauge(
        "agent_info",
        "This agent: version, host name, node ID and role.",
        [(info, 1)],
    );
    if let Some(v) = s.view_version {
        p.gauge(
            "cluster_view_version",
            "Version of the cluster view this node holds.",
            [(vec![], saturate(v))],
        );
    }
    let mut by_role_status: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for (role, status) in &s.nodes {
        *by_role_status
            .entry((role.clone(), status.clone()))
            .or_default() += 1;
    }
    p.gauge(
        "cluster_nodes",
        "Nodes in the cluster view, by role and status.",
        by_role_status
            .into_iter()
            .map(|((role, status), n)| (vec![("role", role), ("status", status)], n)),
    );
    p.counter(
        "agent_faults",
        "Faults the agent survived and kept running through, by kind (state writes that failed, watch streams that broke, certificate renewals that failed, clients refused on the local socket).",
        s.faults
            .iter()
            .map(|(kind, n)| (vec![("kind", (*kind).to_owned())], *n)),
    );
    if !s.api_refused.is_empty() {
        p.counter(
            "manager_api_refused_connections",
            "Connections the manager API refused before any handshake, by the limit they hit.",
            s.api_refused
                .iter()
                .map(|(limit, n)| (vec![("limit", (*limit).to_owned())], *n)),
        );
    }
    if let Some(dp) = &s.data_path {
        data_path(&mut p, dp);
    }
    if let Some(g) = &s.gossip {
        gossip(&mut p, g);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &p.registry);
    out
}

fn traffic(c: &Counters, labels: &Labels) -> [(Labels, u64, u64); 2] {
    let with = |dir: &str| {
        let mut l = labels.clone();
        l.push(("direction", dir.to_owned()));
        l
    };
    [
        (with("tx"), c.tx_packets, c.tx_bytes),
        (with("rx"), c.rx_packets, c.rx_bytes),
    ]
}

/// `{name}_packets` and `{name}_bytes` from (labels, packets, bytes) samples.
fn packets_and_bytes(p: &mut Page, name: &str, whose: &str, samples: &[(Labels, u64, u64)]) {
    p.counter(
        &format!("{name}_packets"),
        &format!("Frames sent (as datagrams) and delivered, {whose}."),
        samples.iter().map(|(l, n, _)| (l.clone(), *n)),
    );
    p.counter(
        &format!("{name}_bytes"),
        &format!("Inner frame bytes sent and delivered, {whose}."),
        samples.iter().map(|(l, _, b)| (l.clone(), *b)),
    );
}

/// The routing mesh's figures (`docs/services.md`).
fn mesh(p: &mut Page, m: &shoal_ingress::mesh::MeshCounters) {
    use shoal_ingress::mesh::MeshDrop;
    p.gauge(
        "mesh_flows",
        "Flows the routing mesh tracks on this node.",
        [(Vec::new(), saturate(m.flows))],
    );
    p.counter(
        "mesh_packets",
        "Packets the routing mesh handled, by what it did: forwarded (a client's, to a \
         backend), returned (a backend's, towards a client), vip (to a virtual IP), dns \
         (queries answered).",
        [
            ("forwarded", m.forwarded),
            ("returned", m.returned),
            ("vip", m.vip),
            ("dns", m.dns),
        ]
        .map(|(what, n)| (vec![("what", what.to_owned())], n)),
    );
    p.counter(
        "mesh_drops",
        "Packets the routing mesh dropped, by reason.",
        MeshDrop::ALL
            .iter()
            .map(|r| (vec![("reason", r.as_str().to_owned())], m.dropped(*r))),
    );
}

fn data_path(p: &mut Page, dp: &DataPathSnapshot) {
    mesh(p, &dp.mesh);
    let net: Labels = vec![("network", dp.network.clone())];
    let t = traffic(&dp.counters, &net);
    packets_and_bytes(p, "datapath", "engine-wide", &t);
    p.counter(
        "datapath_drops",
        "Frames and datagrams dropped, by reason, engine-wide.",
        DropReason::ALL.iter().map(|r| {
            let mut l = net.clone();
            l.push(("reason", r.label().to_owned()));
            (l, dp.counters.drops.get(*r))
        }),
    );
    let peer_labels = |peer: &PeerSnapshot| -> Labels {
        let mut l = net.clone();
        l.push(("peer", peer.name.clone()));
        l.push(("vtep", peer.vtep.map(|v| v.to_string()).unwrap_or_default()));
        l
    };
    let peer_traffic: Vec<_> = dp
        .peers
        .iter()
        .flat_map(|peer| traffic(&peer.counters, &peer_labels(peer)))
        .collect();
    packets_and_bytes(p, "datapath_peer", "per peer", &peer_traffic);
    p.counter(
        "datapath_peer_drops",
        "Drops attributed to each peer, by reason (reasons that happened).",
        dp.peers.iter().flat_map(|peer| {
            peer.counters
                .drops
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(move |(r, n)| {
                    let mut l = peer_labels(peer);
                    l.push(("reason", r.label().to_owned()));
                    (l, n)
                })
        }),
    );
    p.seconds(
        "datapath_peer_last_rx_age_seconds",
        "Seconds since the last frame from each peer was delivered (absent: none yet).",
        dp.peers
            .iter()
            .filter_map(|peer| Some((peer_labels(peer), peer.last_rx_age?.as_secs_f64()))),
    );
    p.gauge(
        "datapath_peer_rx_epoch",
        "Key epoch of the last sealed datagram from each peer.",
        dp.peers
            .iter()
            .filter_map(|peer| Some((peer_labels(peer), i64::from(peer.last_rx_epoch?)))),
    );
    p.gauge(
        "datapath_peers",
        "Peers with sessions or forwarding entries.",
        [(net.clone(), saturate(dp.peers.len()))],
    );
    if let Some(e) = dp.send_epoch {
        p.gauge(
            "datapath_send_epoch",
            "Key epoch this node seals under.",
            [(net.clone(), i64::from(e))],
        );
    }
    p.counter(
        "datapath_io_errors",
        "Device and socket errors of the data-path threads, by kind.",
        dp.io_errors.iter().map(|(kind, n)| {
            let mut l = net.clone();
            l.push(("kind", (*kind).to_owned()));
            (l, *n)
        }),
    );
    p.counter(
        "datapath_answered_locally",
        "Frames answered by the agent itself (ARP).",
        [(net.clone(), dp.answered_locally)],
    );
    p.gauge(
        "capture_readers",
        "shoal capture readers attached.",
        [(net, saturate(dp.capture_readers))],
    );
}

/// The `state` label of a gossip member state: the name `info` and `node inspect` use too
/// (`MemberState`'s serde name), so the same state has one name everywhere.
pub fn member_state(state: MemberState) -> &'static str {
    match state {
        MemberState::Up => "up",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

fn gossip(p: &mut Page, g: &GossipSnapshot) {
    let s = &g.stats;
    let one = |k: &'static str, v: &str| -> Labels { vec![(k, v.to_owned())] };
    p.gauge(
        "gossip_members",
        "Gossip members by state, as this node sees them.",
        g.members
            .iter()
            .map(|(state, n)| (one("state", member_state(*state)), saturate(*n))),
    );
    p.counter(
        "gossip_datagrams",
        "Gossip datagrams sent and received.",
        [
            (one("direction", "tx"), s.datagrams_out),
            (one("direction", "rx"), s.datagrams_in),
        ],
    );
    p.counter(
        "gossip_datagrams_opened",
        "Gossip datagrams received that opened (sealed for this node by an admitted member under a live key).",
        [(vec![], s.datagrams_opened)],
    );
    p.counter(
        "gossip_bytes",
        "Sealed gossip bytes sent and received, UDP datagrams and TCP push-pull.",
        [
            (
                vec![("direction", "tx".into()), ("transport", "udp".into())],
                s.bytes_out,
            ),
            (
                vec![("direction", "rx".into()), ("transport", "udp".into())],
                s.bytes_in,
            ),
            (
                vec![("direction", "tx".into()), ("transport", "tcp".into())],
                s.stream_bytes_out,
            ),
            (
                vec![("direction", "rx".into()), ("transport", "tcp".into())],
                s.stream_bytes_in,
            ),
        ],
    );
    p.counter(
        "gossip_drops",
        "Gossip datagrams dropped, by reason.",
        [
            ("seal", s.dropped_seal),
            ("not_admitted", s.dropped_not_admitted),
            ("decode", s.dropped_decode),
            ("replay", s.dropped_replay),
            ("oversize", s.dropped_oversize),
            ("protocol", s.dropped_protocol),
            ("spoofed", s.dropped_spoofed),
            ("future", s.dropped_future),
            ("renewal", s.dropped_renewal),
        ]
        .map(|(r, n)| (one("reason", r), n)),
    );
    p.counter(
        "gossip_unsealable",
        "Gossip datagrams not sent: the destination is not in the directory.",
        [(vec![], s.dropped_unsealable)],
    );
    p.counter(
        "gossip_items_dropped",
        "Relayed gossip items dropped or rewritten, by reason: records that claim more than \
         their subject stated, relayed downs taken as suspicions, bad signatures, witnesses of \
         an unstated incarnation.",
        [
            ("record_ahead", s.records_dropped),
            ("down_rewritten", s.records_rewritten),
            ("bad_signature", s.items_bad_signature),
            ("unproven", s.items_unproven),
        ]
        .map(|(r, n)| (one("reason", r), n)),
    );
    p.counter(
        "gossip_revived",
        "Members held down and taken back up by their signed record.",
        [(vec![], s.revived)],
    );
    p.counter(
        "gossip_tcp_refused",
        "Push-pull connections refused or closed before an exchange, by limit.",
        [
            ("per_source", s.tcp_refused_per_ip),
            ("preauth", s.tcp_refused_global),
            ("first_frame_deadline", s.tcp_first_frame_timeout),
            ("busy", s.tcp_refused_busy),
        ]
        .map(|(r, n)| (one("limit", r), n)),
    );
    p.counter(
        "gossip_pushpull",
        "Push-pull state exchanges applied.",
        [(vec![], s.pushpull_applied)],
    );
    p.counter(
        "gossip_probes_failed",
        "Probes of ours that got no answer (each starts a suspicion).",
        [(vec![], s.probes_failed)],
    );
    p.counter(
        "gossip_declared_down",
        "Members this node declared down (its suspicion timer expired).",
        [(vec![], s.declared_down)],
    );
    p.counter(
        "gossip_probes_answered",
        "Direct probes of ours answered (round-trip samples).",
        [(vec![], s.probe_rtt_count)],
    );
    if s.probe_rtt_count > 0 {
        let us = |v: u64| v as f64 / 1e6;
        p.seconds(
            "gossip_probe_rtt_mean_seconds",
            "Mean round trip of answered direct probes since start.",
            [(vec![], us(s.probe_rtt_sum_us) / s.probe_rtt_count as f64)],
        );
        p.seconds(
            "gossip_probe_rtt_last_seconds",
            "Round trip of the latest answered direct probe.",
            [(vec![], us(s.probe_rtt_last_us))],
        );
    }
    p.gauge(
        "gossip_local_health",
        "Local health score (0 is healthy; higher slows probing).",
        [(vec![], i64::from(s.health))],
    );
}

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Largest request accepted.
const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` with the text of `page()` until the task is dropped.
pub async fn serve<F, Fut>(listener: TcpListener, page: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // Over the limit the connection is closed at once: scrapers retry, floods cost nothing.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIME * 2, answer(stream, page)).await;
            drop(slot);
        });
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, page: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut buf = Vec::with_capacity(1024);
    let request = tokio::time::timeout(REQUEST_TIME, async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(_)) => {
                    return Ok(Some((
                        req.method.map(str::to_owned),
                        req.path.map(str::to_owned),
                    )))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {}
                _ => return Ok(Some((None, None))),
            }
        }
    })
    .await;
    let (status, content_type, body) = match request {
        Err(_) | Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some((Some(method), Some(path))))) => match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                page().await,
            ),
            ("GET", _) => (
                "404 Not Found",
                "text/plain",
                "shoal serves /metrics only\n".to_owned(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_owned(),
            ),
        },
        Ok(Ok(Some(_))) => (
            "400 Bad Request",
            "text/plain",
            "malformed request\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut counters = Counters {
            tx_packets: 10,
            tx_bytes: 1000,
            rx_packets: 7,
            rx_bytes: 700,
            ..Counters::default()
        };
        let mut peer = PeerSnapshot {
            name: "n2".into(),
            vtep: Some("198.18.0.2".parse().unwrap()),
            counters: counters.clone(),
            last_rx_epoch: Some(3),
            last_rx_age: Some(Duration::from_millis(1500)),
        };
        // Drops are counted through the engine; add two the way it does, by merging.
        let mut engine = shoal_vxlan::engine::Engine::new(shoal_vxlan::testing::local(1, 1));
        let vni = shoal_vxlan::wire::Vni::new(4096).unwrap();
        engine.add_network(vni, true).unwrap();
        let mut d = *b"garbage";
        for _ in 0..2 {
            let _ = engine.handle_datagram_slice(
                std::time::Instant::now(),
                "198.18.0.9:4789".parse().unwrap(),
                &mut d,
            );
        }
        counters.add(engine.counters());
        peer.counters.add(engine.counters());
        Snapshot {
            hostname: "n1".into(),
            node: Some(("abc".into(), "manager".into())),
            view_version: Some(12),
            nodes: vec![
                ("manager".into(), "Ready".into()),
                ("worker".into(), "Ready".into()),
                ("worker".into(), "Down".into()),
            ],
            data_path: Some(DataPathSnapshot {
                network: "ingress".into(),
                counters,
                peers: vec![peer],
                send_epoch: Some(3),
                io_errors: vec![("udp_send", 0)],
                answered_locally: 4,
                capture_readers: 1,
                mesh: shoal_ingress::mesh::MeshCounters {
                    flows: 3,
                    forwarded: 10,
                    ..Default::default()
                },
            }),
            gossip: Some(GossipSnapshot {
                members: vec![(MemberState::Up, 2), (MemberState::Down, 1)],
                stats: shoal_gossip::Stats {
                    dropped_replay: 5,
                    dropped_spoofed: 6,
                    items_bad_signature: 2,
                    tcp_refused_per_ip: 9,
                    probe_rtt_count: 4,
                    probe_rtt_sum_us: 2000,
                    probe_rtt_last_us: 250,
                    ..Default::default()
                },
            }),
            faults: vec![("state_write", 3), ("watch_stream", 0)],
            api_refused: vec![("per_source", 7)],
        }
    }

    /// The value of the sample whose line starts with `prefix` (name and labels).
    fn sample(text: &str, prefix: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn snapshot_renders_as_openmetrics() {
        let text = render(&snapshot());
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE shoal_datapath_drops counter"));
        let peer = r#"network="ingress",peer="n2",vtep="198.18.0.2""#;
        let expected = [
            (
                r#"shoal_datapath_packets_total{network="ingress",direction="tx"}"#.to_owned(),
                10.0,
            ),
            (
                r#"shoal_datapath_bytes_total{network="ingress",direction="rx"}"#.to_owned(),
                700.0,
            ),
            // The two garbage datagrams are too short: counted under that reason, others at 0.
            (
                r#"shoal_datapath_drops_total{network="ingress",reason="too_short"}"#.to_owned(),
                2.0,
            ),
            (
                r#"shoal_datapath_drops_total{network="ingress",reason="authentication"}"#
                    .to_owned(),
                0.0,
            ),
            (
                format!(r#"shoal_datapath_peer_drops_total{{{peer},reason="too_short"}}"#),
                2.0,
            ),
            (
                format!("shoal_datapath_peer_last_rx_age_seconds{{{peer}}}"),
                1.5,
            ),
            (format!("shoal_datapath_peer_rx_epoch{{{peer}}}"), 3.0),
            ("shoal_mesh_flows".to_owned(), 3.0),
            (
                r#"shoal_mesh_packets_total{what="forwarded"}"#.to_owned(),
                10.0,
            ),
            (
                r#"shoal_mesh_drops_total{reason="flow_table_full"}"#.to_owned(),
                0.0,
            ),
            (
                r#"shoal_cluster_nodes{role="worker",status="Ready"}"#.to_owned(),
                1.0,
            ),
            (r#"shoal_gossip_members{state="up"}"#.to_owned(), 2.0),
            (r#"shoal_gossip_members{state="down"}"#.to_owned(), 1.0),
            (
                r#"shoal_gossip_drops_total{reason="replay"}"#.to_owned(),
                5.0,
            ),
            (
                r#"shoal_gossip_drops_total{reason="spoofed"}"#.to_owned(),
                6.0,
            ),
            (
                r#"shoal_gossip_items_dropped_total{reason="bad_signature"}"#.to_owned(),
                2.0,
            ),
            (
                r#"shoal_gossip_tcp_refused_total{limit="per_source"}"#.to_owned(),
                9.0,
            ),
            ("shoal_cluster_view_version".to_owned(), 12.0),
            (
                r#"shoal_agent_faults_total{kind="state_write"}"#.to_owned(),
                3.0,
            ),
            (
                r#"shoal_manager_api_refused_connections_total{limit="per_source"}"#.to_owned(),
                7.0,
            ),
            ("shoal_gossip_probe_rtt_mean_seconds".to_owned(), 0.0005),
            ("shoal_gossip_probe_rtt_last_seconds".to_owned(), 0.00025),
            ("shoal_capture_readers".to_owned(), 1.0),
        ];
        for (name, value) in &expected {
            assert_eq!(sample(&text, name), *value, "{name}");
        }
        // Per-peer drops list only the reasons that happened.
        assert!(!text.contains(&format!(r#"{peer},reason="replay""#)));
    }

    #[test]
    fn member_states_have_one_name() {
        for state in [MemberState::Up, MemberState::Suspect, MemberState::Down] {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                member_state(state),
                "{state:?}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let s = Snapshot {
            hostname: "we\"ird\\name\n".into(),
            ..Snapshot::default()
        };
        let text = render(&s);
        assert!(text.contains(r#"hostname="we\"ird\\name\n""#), "{text}");
    }

    #[tokio::test]
    async fn http_serves_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, || async { render(&snapshot()) }));
        let get = |request: &'static str| async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("shoal_datapath_packets_total"));
        assert!(get("GET /other HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(get("\x00\x01 garbage\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400"));
        server.abort();
    }
}
