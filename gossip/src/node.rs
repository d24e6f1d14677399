//! The `gossip-node` program as a library function, so that other packages (the netns tests)
//! can ship it as their own binary: it runs the gossip driver alone and prints membership
//! events as JSON lines on stdout (`ready`, `up`, `down`, `updated`, `left`, `entry` (key
//! and value as byte arrays), and `stats` every 2 s). SIGTERM or SIGINT leaves the cluster gracefully. Its directory comes from
//! `--admit` (and, with `--insecure-test-keys`, from the node IDs themselves).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::auth::{insecure_test_keys, NodeKeys, PublicKeys};
use crate::identity::parse_hex32;
use crate::{driver, Admission, Event, Key, Keyring, Metadata, NodeId, Role};
use clap::Parser;
use serde_json::json;

/// One gossip agent, events as JSON lines.
#[derive(Parser, Debug)]
#[command(name = "gossip-node")]
struct Args {
    /// Node ID (25 lowercase base-36 characters).
    #[arg(long)]
    id: NodeId,
    /// UDP and TCP listen address.
    #[arg(long, default_value = "0.0.0.0:7946")]
    listen: SocketAddr,
    /// Address the others reach us at.
    #[arg(long)]
    advertise: SocketAddr,
    /// Cluster gossip key, 64 hex digits.
    #[arg(long)]
    key: String,
    /// Id of the gossip key.
    #[arg(long, default_value_t = 1)]
    key_id: u8,
    /// Our X25519 static secret, 64 hex digits (our Ed25519 key is derived from it).
    #[arg(long, conflicts_with = "insecure_test_keys")]
    secret: Option<String>,
    /// Derive every node's keys from its node ID (ours, each --seed's, each --admit given
    /// as a bare ID). Anyone can compute these keys: tests only, never a real cluster.
    #[arg(long)]
    insecure_test_keys: bool,
    /// Node to join through, as ID@ADDRESS (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// VXLAN endpoint address (defaults to the advertise IP).
    #[arg(long)]
    vtep: Option<IpAddr>,
    /// Data path port.
    #[arg(long, default_value_t = 4789)]
    data_port: u16,
    /// worker or manager.
    #[arg(long, default_value = "worker")]
    role: String,
    /// Expected cluster size (tunes timeouts).
    #[arg(long, default_value_t = 16)]
    cluster_size: u32,
    /// A member of the directory, as ID:X25519_HEX:ED25519_HEX, or a bare ID with
    /// --insecure-test-keys (repeatable). With --insecure-test-keys, ourselves and every
    /// --seed are members too.
    #[arg(long = "admit")]
    admit: Vec<String>,
}

fn hex32(what: &str, s: &str) -> Result<[u8; 32], String> {
    parse_hex32(s).ok_or_else(|| format!("--{what} must be 64 hex digits"))
}

fn build(args: &Args) -> Result<driver::Config, String> {
    let key = hex32("key", &args.key)?;
    let keys = match (&args.secret, args.insecure_test_keys) {
        (Some(s), false) => NodeKeys::from_secret(hex32("secret", s)?),
        (None, true) => insecure_test_keys(&args.id),
        _ => return Err("give --secret HEX, or --insecure-test-keys for a test cluster".into()),
    };
    let role = match args.role.as_str() {
        "worker" => Role::Worker,
        "manager" => Role::Manager,
        r => return Err(format!("--role must be worker or manager, not {r:?}")),
    };
    let metadata = Metadata {
        vtep: args.vtep.unwrap_or(args.advertise.ip()),
        data_port: args.data_port,
        public_key: keys.public().x25519,
        incarnation: [0; 16],
        role,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut seeds = Vec::new();
    for s in &args.seeds {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("--seed takes ID@ADDRESS, got {s:?}"))?;
        let id: NodeId = id.parse().map_err(|e| format!("--seed {s:?}: {e}"))?;
        let addr: SocketAddr = addr.parse().map_err(|e| format!("--seed {s:?}: {e}"))?;
        seeds.push((id, addr));
    }
    let mut list: Vec<(NodeId, PublicKeys)> = Vec::new();
    if args.insecure_test_keys {
        list.push((args.id, keys.public()));
        for (id, _) in &seeds {
            list.push((*id, insecure_test_keys(id).public()));
        }
    }
    for a in &args.admit {
        let mut parts = a.split(':');
        let id: NodeId = parts
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("--admit {a:?}: {e}"))?;
        let pk = match (parts.next(), parts.next(), parts.next()) {
            (Some(x), Some(e), None) => PublicKeys {
                x25519: hex32("admit", x)?,
                ed25519: hex32("admit", e)?,
            },
            (None, None, None) if args.insecure_test_keys => insecure_test_keys(&id).public(),
            _ => {
                return Err(format!(
                    "--admit takes ID:X25519_HEX:ED25519_HEX (or a bare ID with --insecure-test-keys), got {a:?}"
                ))
            }
        };
        list.push((id, pk));
    }
    let mut cfg = driver::Config::new(
        args.id,
        args.advertise,
        metadata,
        Keyring::new(Key {
            id: args.key_id,
            secret: key,
        }),
        keys,
    );
    cfg.bind = args.listen;
    cfg.seeds = seeds;
    cfg.gossip = crate::Config::lan(args.cluster_size);
    cfg.admission = Admission::only(list);
    Ok(cfg)
}

fn print_event(e: &Event) {
    let (kind, m) = match e {
        Event::Up(m) => ("up", m),
        Event::Down(m) => ("down", m),
        Event::Updated(m) => ("updated", m),
        Event::Left(m) => ("left", m),
        Event::Entry {
            author,
            key,
            version,
            value,
        } => {
            println!(
                "{}",
                json!({"event": "entry", "author": author, "key": key, "version": version, "value": value})
            );
            return;
        }
    };
    println!(
        "{}",
        json!({"event": kind, "id": m.id, "addr": m.addr, "metadata": m.metadata})
    );
}

/// Parses the command line and runs the node until SIGTERM or SIGINT; the exit code says
/// how it went (2 for bad flags).
pub fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gossip-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run())
}

async fn run() -> ExitCode {
    let args = Args::parse();
    let cfg = match build(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gossip-node: {e}");
            return ExitCode::from(2);
        }
    };
    let (handle, mut events) = match driver::start(cfg).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("gossip-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        json!({"event": "ready", "id": args.id, "addr": handle.local_addr()})
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gossip-node: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(e) => print_event(&e),
                None => break,
            },
            _ = tick.tick() => {
                if let Ok(s) = handle.stats().await {
                    println!("{}", json!({"event": "stats", "stats": s}));
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    if let Err(e) = handle.leave().await {
        eprintln!("gossip-node: leave failed: {e}");
    }
    // Give the leave datagrams a moment to go out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.shutdown().await;
    ExitCode::SUCCESS
}
