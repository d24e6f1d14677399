//! Issue "trust" as a user meets it, across network namespaces through `shoal lab`: no sealed
//! datagram ever repeats a (key epoch, incarnation, counter) of its sender, whatever the node
//! goes through (leave and join in the same agent, removal and rejoin, a restart from a copied
//! state directory). Needs root; each test makes its own lab and takes it down on drop.

#![allow(clippy::unwrap_used)] // test code: a failed step fails the test

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_netns_tests::shoal_lab::{ok, tshark, TestLab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

/// (key epoch, incarnation tag, counter) of every sealed datagram from `src` in a capture:
/// bytes 12..28 of the UDP payload (docs/wire.md).
fn sealed_from(pcap: &std::path::Path, src: &str) -> Vec<(u32, u32, u64)> {
    let filter = format!("ip.src == {src} && udp.dstport == 4789");
    let hex = tshark(&[
        "-r",
        pcap.to_str().unwrap(),
        "-Y",
        &filter,
        "-T",
        "fields",
        "-e",
        "udp.payload",
    ]);
    hex.lines()
        .map(|l| {
            let b: Vec<u8> = (0..l.replace(':', "").len() / 2)
                .map(|i| u8::from_str_radix(&l.replace(':', "")[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert!(b.len() >= 44 && b[0] == 0x48, "a sealed datagram: {l}");
            let u32_at = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
            let counter = u64::from_be_bytes(b[20..28].try_into().unwrap());
            (u32_at(12), u32_at(16), counter)
        })
        .collect()
}

/// Pings n1's overlay address from n2 a few times, capturing n2's underlay; returns what n2
/// sealed.
fn n2_traffic(lab: &TestLab, tag: &str, n1: &str) -> Vec<(u32, u32, u64)> {
    let pcap = lab.capture(2, tag, || {
        for _ in 0..5 {
            assert!(lab.ping(2, n1), "n2 pings n1 ({tag})");
        }
    });
    let seen = sealed_from(&pcap, &lab_ip(2));
    assert!(seen.len() >= 5, "{tag}: n2 sealed {} datagrams", seen.len());
    seen
}

fn lab_ip(i: usize) -> String {
    format!("198.18.0.{i}")
}

/// After `change` (something that restarts n2's data path), n2 pings n1 again within 5 s,
/// and nothing it seals repeats a (epoch, incarnation, counter) it sealed before.
fn no_tuple_twice(lab: &TestLab, what: &str, change: impl FnOnce()) {
    let n1 = lab.overlay_addr(1);
    let before = n2_traffic(lab, &format!("{what}-before"), &n1);
    change();
    let back = Instant::now();
    lab.eventually(
        &format!("n2 pings n1 after {what}"),
        Duration::from_secs(5),
        || lab.ping(2, &n1),
    );
    eprintln!(
        "{what}: n2 reached n1 {:?} after it was back",
        back.elapsed()
    );
    let after = n2_traffic(lab, &format!("{what}-after"), &n1);
    let old: HashSet<_> = before.iter().collect();
    let repeated: Vec<_> = after.iter().filter(|t| old.contains(t)).collect();
    assert!(
        repeated.is_empty(),
        "{what}: n2 sealed again under (epoch, incarnation, counter) it used before: {repeated:?}"
    );
    assert_ne!(
        before[0].1, after[0].1,
        "{what}: a new incarnation after the data path restarted"
    );
}

/// The join command (as words after `shoal`) for a worker, from n1.
fn worker_join(lab: &TestLab) -> Vec<String> {
    let token = String::from_utf8(lab.shoal(1, &["join-token", "-q", "worker"]).stdout).unwrap();
    vec![
        "join".into(),
        "--token".into(),
        token.trim().into(),
        format!("{}:2377", lab_ip(1)),
    ]
}

fn shoal_ok(lab: &TestLab, i: usize, args: &[&str]) -> String {
    let out = lab.shoal(i, args);
    assert!(
        out.status.success(),
        "n{i}: shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn leave_and_join_in_the_same_agent_never_repeats_a_nonce() {
    let lab = TestLab::up(BIN, 2, true);
    let join = worker_join(&lab);
    no_tuple_twice(&lab, "leave and join", || {
        shoal_ok(&lab, 2, &["leave"]);
        let args: Vec<&str> = join.iter().map(String::as_str).collect();
        shoal_ok(&lab, 2, &args);
    });
}

#[test]
fn removal_and_rejoin_never_repeats_a_nonce() {
    let lab = TestLab::up(BIN, 2, true);
    let join = worker_join(&lab);
    no_tuple_twice(&lab, "node rm --force and rejoin", || {
        shoal_ok(&lab, 1, &["node", "rm", "--force", "n2"]);
        // n2 hears it was removed and leaves by itself.
        lab.eventually("n2 out of the swarm", Duration::from_secs(10), || {
            let info = shoal_ok(&lab, 2, &["info"]);
            info.contains("\"node_id\": null")
        });
        let args: Vec<&str> = join.iter().map(String::as_str).collect();
        shoal_ok(&lab, 2, &args);
    });
}

#[test]
fn restart_from_a_copied_state_directory_never_repeats_a_nonce() {
    let lab = TestLab::up(BIN, 2, true);
    let state = std::path::PathBuf::from(format!("/run/shoal/lab-{}/n2", lab.name));
    let copy = lab.scratch.join("n2-copy");
    let lab_cmd = |verb: &str| {
        ok(Command::new(BIN).args(["lab", verb, "--name", &lab.name, "n2"]));
    };
    // A copy taken while n2 is stopped, then one more life of n2 on its own state.
    lab_cmd("stop");
    ok(Command::new("cp").arg("-a").arg(&state).arg(&copy));
    lab_cmd("start");
    // That life's traffic, then n2 brought back from the copy: the same stored state it started
    // that life from.
    no_tuple_twice(&lab, "restart from a copy", || {
        lab_cmd("stop");
        ok(Command::new("rm").arg("-rf").arg(&state));
        ok(Command::new("cp").arg("-a").arg(&copy).arg(&state));
        lab_cmd("start");
    });
}

/// The keys live on node i now: (gossip sealing, gossip also open, data-path sealing, data-path
/// also open), from `shoal info`.
fn live_keys(lab: &TestLab, i: usize) -> (u64, Option<u64>, u64, Option<u64>) {
    let info: serde_json::Value = serde_json::from_str(&shoal_ok(lab, i, &["info"])).unwrap();
    let g = &info["gossip_keys_live"];
    let d = &info["data_path_epochs_live"];
    (
        g["sealing"].as_u64().unwrap_or(0),
        g["also_open"].as_u64(),
        d["sealing"].as_u64().unwrap_or(0),
        d["also_open"].as_u64(),
    )
}

/// `node rm` (and `leave`) rotate the gossip key and the data-path epoch, and the keys the
/// node held stop opening anywhere soon after: a removed node can then neither read nor forge
/// anything new. Prints how long that took.
#[test]
fn removal_and_leave_retire_the_keys_the_node_held() {
    let lab = TestLab::up(BIN, 3, true);
    let n1 = lab.overlay_addr(1);
    let (g0, _, d0, _) = live_keys(&lab, 1);
    assert!(g0 >= 1 && d0 >= 1);
    let removed = Instant::now();
    shoal_ok(&lab, 1, &["node", "rm", "--force", "n3"]);
    let retired = |g_old: u64, d_old: u64| {
        [1, 2].iter().all(|&i| {
            let (g, g_open, d, d_open) = live_keys(&lab, i);
            g > g_old && d > d_old && g_open.is_none() && d_open.is_none()
        })
    };
    lab.eventually(
        "n3's gossip key and epoch retired on n1 and n2",
        Duration::from_secs(75),
        || retired(g0, d0),
    );
    eprintln!(
        "node rm: the keys n3 held stopped opening on every node {:?} after the removal",
        removed.elapsed()
    );
    assert!(lab.ping(2, &n1), "the others talk under the new keys");
    // The same for a node that leaves.
    let (g1, _, d1, _) = live_keys(&lab, 1);
    let left = Instant::now();
    shoal_ok(&lab, 2, &["leave"]);
    lab.eventually(
        "n2's gossip key and epoch retired on n1",
        Duration::from_secs(75),
        || {
            let (g, g_open, d, d_open) = live_keys(&lab, 1);
            g > g1 && d > d1 && g_open.is_none() && d_open.is_none()
        },
    );
    eprintln!(
        "leave: the keys n2 held stopped opening on n1 {:?} after it left",
        left.elapsed()
    );
}
