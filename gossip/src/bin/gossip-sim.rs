//! `gossip-sim`: runs the deterministic gossip simulation and prints one JSON line of
//! measurements (two with `--compare-plain`: local health on, then off, same seed).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_gossip::sim::{Scenario, Sim, SimConfig};

/// Deterministic many-node SWIM simulation (virtual clock, real foca and sealing).
#[derive(Parser, Debug)]
#[command(name = "gossip-sim")]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seed; the same seed gives the same trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Datagram loss probability, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// steady, crash, partition, stall or slow.
    #[arg(long, default_value = "steady")]
    scenario: Scenario,
    /// Simulated minutes to measure after the cluster has formed.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// One-way latency in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    latency_ms: f64,
    /// Extra uniform one-way delay in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    jitter_ms: f64,
    /// Turn local health off.
    #[arg(long)]
    plain: bool,
    /// Run the same seed with local health on and off and print both lines.
    #[arg(long)]
    compare_plain: bool,
    /// Print diagnostics on stderr.
    #[arg(long)]
    debug: bool,
    /// Turn confirmation probes (and so the witness quorum) off.
    #[arg(long)]
    no_confirm: bool,
    /// Print an estimated memory breakdown (bytes per node-member pair) and the resident
    /// set size on stderr, once formed and at the end.
    #[arg(long)]
    mem: bool,
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes < 2
        || !(0.0..1.0).contains(&args.loss)
        || args.minutes.is_nan()
        || args.minutes <= 0.0
    {
        eprintln!("gossip-sim: need --nodes >= 2, 0 <= --loss < 1 and --minutes > 0");
        return ExitCode::from(2);
    }
    let mut cfg = SimConfig::new(args.nodes, args.seed, args.scenario);
    cfg.loss = args.loss;
    cfg.debug = args.debug;
    cfg.confirm_probes = !args.no_confirm;
    if args.mem {
        cfg.mem = Some(rss_bytes);
    }
    cfg.duration = Duration::from_secs_f64(args.minutes * 60.0);
    cfg.latency = Duration::from_secs_f64(args.latency_ms.max(0.0) / 1000.0);
    cfg.jitter = Duration::from_secs_f64(args.jitter_ms.max(0.0) / 1000.0);
    let runs: &[bool] = if args.compare_plain {
        &[true, false]
    } else if args.plain {
        &[false]
    } else {
        &[true]
    };
    for &lh in runs {
        let mut c = cfg.clone();
        c.local_health = lh;
        let started = Instant::now();
        let report = Sim::new(c).run();
        let mut v = match serde_json::to_value(&report) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("gossip-sim: cannot serialize report: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "wall_s".into(),
                serde_json::json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            );
        }
        println!("{v}");
    }
    ExitCode::SUCCESS
}
