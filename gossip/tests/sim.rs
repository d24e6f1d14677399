//! The simulation in CI: the targets' shape at N = 200 (the N = 1000 figures come from the
//! `gossip-sim` binary, see README.md).
//!
//! Unoptimized, real sealing and foca make N = 200 take minutes, so those tests run only in
//! an optimized build and say so when skipped:
//! `cargo test --release -p shoal-gossip --test sim` (about 15 s). The determinism test, a
//! small crash test and the entry tests (N = 20) run in every profile.

use std::time::Duration;

use shoal_gossip::sim::{Protocol, Report, Scenario, Sim, SimConfig};

fn run(nodes: usize, seed: u64, scenario: Scenario, loss: f64, minutes: f64, lh: bool) -> Report {
    let p = if lh {
        Protocol::Lifeguard
    } else {
        Protocol::NoLocalHealth
    };
    run_with(nodes, seed, scenario, loss, minutes, p)
}

/// A run's configuration: `nodes` nodes, `loss`, `minutes` measured, the rest as
/// [`SimConfig::new`] sets it.
fn config(nodes: usize, seed: u64, scenario: Scenario, loss: f64, minutes: f64) -> SimConfig {
    let mut c = SimConfig::new(nodes, seed, scenario);
    c.loss = loss;
    c.duration = Duration::from_secs_f64(minutes * 60.0);
    c
}

fn run_with(
    nodes: usize,
    seed: u64,
    scenario: Scenario,
    loss: f64,
    minutes: f64,
    protocol: Protocol,
) -> Report {
    let mut c = config(nodes, seed, scenario, loss, minutes);
    c.protocol = protocol;
    let r = Sim::new(c).run();
    eprintln!("{}", serde_json::to_string(&r).expect("json"));
    r
}

#[test]
fn same_seed_same_trace_other_seed_other_trace() {
    let a = run(30, 7, Scenario::Crash, 0.05, 1.0, true);
    let b = run(30, 7, Scenario::Crash, 0.05, 1.0, true);
    let c = run(30, 8, Scenario::Crash, 0.05, 1.0, true);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.datagrams, b.datagrams);
    assert_ne!(a.trace_hash, c.trace_hash);
}

/// The shared X25519 and verification cache is only a cache: without it the same seed
/// gives the same trace.
#[test]
fn the_crypto_cache_changes_no_outcome() {
    let mut c = config(20, 5, Scenario::Crash, 0.05, 1.0);
    let cached = Sim::new(c.clone()).run();
    c.crypto_cache = false;
    let direct = Sim::new(c).run();
    assert_eq!(cached.trace_hash, direct.trace_hash);
    assert_eq!(cached.datagrams, direct.datagrams);
    assert_eq!(cached.auth_refused, 0);
}

#[test]
fn small_cluster_detects_a_crash_in_any_profile() {
    let r = run(40, 11, Scenario::Crash, 0.01, 1.0, true);
    assert_eq!(r.detect_missed, 0);
    let p99 = r.detect_p99_s.expect("crash samples");
    assert!(p99 <= 10.0, "detection p99 {p99} s > 10 s");
    assert_eq!(r.false_downs, 0);
    assert_eq!(r.dropped_bad, 0);
    assert_eq!(r.dropped_replay, 0);
    assert_eq!(r.auth_refused, 0);
}

/// Entries at N = 20, in any profile: a random node sets or deletes one of its entries every
/// 200 ms for a minute, at 1 % loss. Every other node holds each change (or a later one of
/// the same key) within a few network round trips (1-2 ms each here): the author and each
/// node that first hears it gossip at once, twice, 10 ms apart; a node all of those miss
/// gets it at the next gossip round (200 ms). Measured at seed 1: 249 changes, p50 3.7 ms,
/// p99 13.0 ms, max 13.2 ms (0 % and 5 % loss: within half a millisecond of that); 16 KB/s
/// sent per node for the five changes a second. N = 200 (release build, 2 minutes): p50
/// 14 ms, p99 17 ms, max 202 ms; N = 1000 (one change per 500 ms, 1 minute): p50 17 ms,
/// p99 and max 201 ms.
#[test]
fn entries_spread_to_every_node_within_two_seconds() {
    let mut c = config(20, 1, Scenario::Steady, 0.01, 1.0);
    c.entry_every = Some(Duration::from_millis(200));
    let r = Sim::new(c).run();
    eprintln!("{}", serde_json::to_string(&r).expect("json"));
    let p99 = r.entry_spread_p99_ms.expect("entry samples");
    eprintln!(
        "entry spread, N = 20, 1 % loss, {} changes: p50 {:?} ms, p99 {p99} ms, max {:?} ms",
        r.entry_samples, r.entry_spread_p50_ms, r.entry_spread_max_ms
    );
    assert!(r.entry_samples >= 200, "{} changes", r.entry_samples);
    assert_eq!(r.entry_missed, 0, "a change never reached every node");
    assert!(p99 < 2000.0, "entry spread p99 {p99} ms >= 2 s");
    assert_eq!(r.entries_converged, Some(true), "tables differ at the end");
    assert!(r.max_datagram_bytes <= 1400);
    assert_eq!(r.dropped_bad, 0);
    assert_eq!(r.auth_refused, 0);
    assert_eq!(r.false_downs, 0);
}

/// Entries across a 45 s split at N = 20 (any profile): each side drops the other's
/// entries 30 s after declaring it down, changes go on on both sides, and after the heal
/// every node holds exactly every author's live entries again, through the push-pulls that
/// reconnect the sides (the nodes the changes are new to spread them on). Measured at seed
/// 3: converged 5.75 s after the heal, with the membership (heal p99 5.75 s); 831 entry
/// changes were taken from push-pull states.
#[test]
fn entries_converge_after_a_partition_heals() {
    let mut c = config(20, 3, Scenario::Partition, 0.0, 1.5);
    c.entry_every = Some(Duration::from_millis(500));
    c.partition = Duration::from_secs(45);
    let r = Sim::new(c).run();
    eprintln!("{}", serde_json::to_string(&r).expect("json"));
    let h = r
        .entries_heal_converge_s
        .expect("entries never converged after the heal");
    eprintln!(
        "entries converged {h} s after the heal (membership heal p99 {:?} s), {} changes taken from push-pull",
        r.heal_p99_s, r.entries_from_pushpull
    );
    assert!(h <= 30.0, "entries converged {h} s after the heal");
    assert_eq!(r.entries_converged, Some(true));
    assert!(r.entries_from_pushpull > 0);
    assert_eq!(r.entry_missed, 0);
    assert!(r.max_datagram_bytes <= 1400);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn crashes_are_detected_fast_and_updates_spread_at_one_percent_loss() {
    let r = run(200, 1, Scenario::Crash, 0.01, 2.5, true);
    assert_eq!(r.detect_missed, 0, "a crash was never seen down by 99.9%");
    let p99 = r.detect_p99_s.expect("crash samples");
    assert!(p99 <= 10.0, "detection p99 {p99} s > 10 s");
    assert_eq!(r.false_downs, 0);
    let d = r.disseminate_p99_s.expect("update samples");
    assert!(d <= 3.0, "dissemination p99 {d} s > 3 s");
    assert!(r.max_datagram_bytes <= 1400);
    assert_eq!(r.dropped_bad, 0);
    assert_eq!(r.dropped_replay, 0);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn steady_state_stays_under_one_kilobyte_per_node_per_second() {
    let r = run(200, 2, Scenario::Steady, 0.0, 2.0, true);
    assert!(
        r.bytes_per_node_per_s <= 1000.0,
        "{} B/s per node",
        r.bytes_per_node_per_s
    );
    assert!(r.bytes_per_node_per_s > 0.0);
    assert_eq!(r.false_downs, 0);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn a_sixty_second_partition_heals_within_thirty_seconds() {
    let r = run(200, 3, Scenario::Partition, 0.0, 2.0, true);
    let h = r
        .heal_p99_s
        .expect("every node must see every live node again");
    assert!(h <= 30.0, "heal p99 {h} s > 30 s");
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn local_health_does_not_add_false_downs_under_stalls() {
    let on = run(200, 4, Scenario::Stall, 0.01, 2.0, true);
    let off = run(200, 4, Scenario::Stall, 0.01, 2.0, false);
    assert!(
        on.false_downs <= off.false_downs,
        "local health on: {} false downs, off: {}",
        on.false_downs,
        off.false_downs
    );
    assert_eq!(
        on.false_downs, 0,
        "healthy nodes declared down with local health on"
    );
}

/// Flap damping in the stall scenario (5 % of nodes freezing 2 to 4 s, again and again):
/// with it a stalling node is declared down about once, not at most of its stalls.
/// Measured at seed 4, two simulated minutes: 18 downs of stalling nodes with damping, 74
/// without (at five minutes, seeds 1 to 3: 16-17 against 198-216; RESULTS.md).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn flap_damping_stops_stalling_nodes_going_down_at_every_stall() {
    let cfg = |damping| SimConfig {
        flap_damping: damping,
        ..config(200, 4, Scenario::Stall, 0.01, 2.0)
    };
    let on = Sim::new(cfg(true)).run();
    let off = Sim::new(cfg(false)).run();
    assert_eq!(on.schedule_hash, off.schedule_hash, "not the same stalls");
    assert!(on.flap_damping && !off.flap_damping);
    assert!(
        off.stalled_downs >= 40 && on.stalled_downs * 3 <= off.stalled_downs,
        "stalling nodes' downs: damping on {}, off {} (want off >= 40 and >= 3x on)",
        on.stalled_downs,
        off.stalled_downs
    );
    assert_eq!(
        on.false_downs, 0,
        "healthy nodes declared down with damping"
    );
}

/// The Lifeguard comparison (ours against plain SWIM, `Config::plain_swim`) where it shows:
/// 5 % of nodes read their input 5 to 10 s late, so a refutation reaches them after plain
/// SWIM's fixed 9.2 s suspicion timeout (N = 200). Measured at seed 4, one simulated
/// minute: ours 0 false downs of healthy members, plain SWIM 169 (no local health only: 93).
/// With the issue's own scenario (stalls of 2 to 4 s, or reads 0.2 to 1.2 s late) both have
/// 0, so there is no ratio to assert there (RESULTS.md, "Plain SWIM baseline").
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "N = 200 needs an optimized build: cargo test --release -p shoal-gossip --test sim"
)]
fn plain_swim_declares_healthy_members_down_where_lifeguard_does_not() {
    let cfg = |protocol| SimConfig {
        anomaly_secs: Some((5.0, 10.0)),
        protocol,
        ..config(200, 4, Scenario::Slow, 0.01, 1.0)
    };
    let ours = Sim::new(cfg(Protocol::Lifeguard)).run();
    let plain = Sim::new(cfg(Protocol::PlainSwim)).run();
    for r in [&ours, &plain] {
        eprintln!("{}", serde_json::to_string(r).expect("json"));
    }
    // Same seed, same slow nodes and metadata changes: only the membership config differs.
    assert_eq!(ours.schedule_hash, plain.schedule_hash);
    assert_ne!(ours.trace_hash, plain.trace_hash);
    assert!(
        plain.false_downs >= 50,
        "plain SWIM: only {} healthy members declared down (measured 169)",
        plain.false_downs
    );
    assert!(
        plain.false_downs >= 50 * ours.false_downs.max(1),
        "healthy members declared down: ours {}, plain SWIM {} (want at least 50x fewer)",
        ours.false_downs,
        plain.false_downs
    );
    assert_eq!(ours.false_downs, 0, "ours declared healthy members down");
}
