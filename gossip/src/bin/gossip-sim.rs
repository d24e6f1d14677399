//! `gossip-sim`: runs the deterministic gossip simulation and prints one JSON line of
//! measurements (two with `--compare-plain`: ours, then the baseline, same seed and so the
//! same network draws, stalls and crashes).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use shoal_gossip::sim::{Protocol, Scenario, Sim, SimConfig};

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
    /// What happens during the run.
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
    /// Run only the baseline (see --baseline) instead of ours.
    #[arg(long)]
    plain: bool,
    /// Run the same seed twice, ours (`lifeguard`: Config::lan) then the baseline, and print
    /// both lines. Only the membership configuration differs: the network, stall, slow-node
    /// and crash draws are the same.
    #[arg(long)]
    compare_plain: bool,
    /// The baseline of --plain and --compare-plain: `plain-swim` (memberlist without
    /// Lifeguard: no local health, fixed 4*log10(n) s suspicion timeout, no confirmation
    /// probes or witness quorum, no buddy system, 3 indirect probes) or `no-local-health`
    /// (ours with only local health off).
    #[arg(long, default_value = "plain-swim")]
    baseline: Protocol,
    /// Anomaly range in seconds, `MIN-MAX`: each stall's length (stall scenario, default
    /// 2-4) or each datagram's wait before a slow node reads it (slow scenario, default
    /// 0.2-1.2).
    #[arg(long, value_parser = parse_range)]
    anomaly_s: Option<(f64, f64)>,
    /// Print diagnostics on stderr.
    #[arg(long)]
    debug: bool,
    /// Turn confirmation probes (and so the witness quorum) off.
    #[arg(long)]
    no_confirm: bool,
    /// Override the suspicion minimum, in seconds (both runs of --compare-plain): the
    /// shortest time from a suspicion to a Down, however many members confirm it.
    #[arg(long, value_parser = parse_secs)]
    suspicion_min: Option<Duration>,
    /// Turn flap damping off (both runs of --compare-plain).
    #[arg(long)]
    no_flap_damping: bool,
    /// Print an estimated memory breakdown (bytes per node-member pair) and the resident
    /// set size on stderr, once formed and at the end.
    #[arg(long)]
    mem: bool,
    /// One entry change (a random node sets or deletes one of its entries) every this many
    /// milliseconds; reports the entries' spread times (and, in the partition scenario,
    /// their convergence after the heal).
    #[arg(long)]
    entries_ms: Option<u64>,
    /// Length of the partition scenario's split, in seconds.
    #[arg(long, default_value_t = 60.0)]
    partition_s: f64,
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parses `MIN-MAX` (seconds, 0 <= MIN <= MAX <= 600).
fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let err = || format!("{s:?}: expected MIN-MAX in seconds, e.g. 2-4 (0 <= MIN <= MAX <= 600)");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let a: f64 = a.trim().parse().map_err(|_| err())?;
    let b: f64 = b.trim().parse().map_err(|_| err())?;
    if !(0.0..=600.0).contains(&a) || !(a..=600.0).contains(&b) {
        return Err(err());
    }
    Ok((a, b))
}

/// Parses seconds (0 < S <= 600).
fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 600.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?}: expected seconds, 0 < S <= 600")),
    }
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
    if !(args.partition_s > 0.0 && args.partition_s <= 3600.0) {
        eprintln!("gossip-sim: need 0 < --partition-s <= 3600");
        return ExitCode::from(2);
    }
    let mut cfg = SimConfig::new(args.nodes, args.seed, args.scenario);
    cfg.entry_every = args
        .entries_ms
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    cfg.partition = Duration::from_secs_f64(args.partition_s);
    cfg.loss = args.loss;
    cfg.debug = args.debug;
    cfg.anomaly_secs = args.anomaly_s;
    cfg.confirm_probes = !args.no_confirm;
    cfg.suspicion_min = args.suspicion_min;
    cfg.flap_damping = !args.no_flap_damping;
    if args.mem {
        cfg.mem = Some(rss_bytes);
    }
    cfg.duration = Duration::from_secs_f64(args.minutes * 60.0);
    cfg.latency = Duration::from_secs_f64(args.latency_ms.max(0.0) / 1000.0);
    cfg.jitter = Duration::from_secs_f64(args.jitter_ms.max(0.0) / 1000.0);
    let runs = if args.compare_plain {
        vec![Protocol::Lifeguard, args.baseline]
    } else if args.plain {
        vec![args.baseline]
    } else {
        vec![Protocol::Lifeguard]
    };
    for protocol in runs {
        let mut c = cfg.clone();
        c.protocol = protocol;
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
