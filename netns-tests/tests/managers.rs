//! Several managers as a user runs them, through `shoal lab up --managers N` (the same code as
//! the lab command): losing the leader while the encrypted overlay carries a ping every 10 ms,
//! a new worker joining through a survivor, the old leader back as a follower; five managers
//! losing two at once; the leader demoted. Needs root; each test makes its own lab (unique
//! name) and takes it down on drop, also when it fails. Times are printed (from before the
//! `lab stop --kill`, which itself waits until the process is gone), not asserted: the failover
//! benchmark (`benches/managers/failover.sh`) measures them.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_netns_tests::shoal_lab::{ok, Spawned, TestLab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

/// `node ls` on node `i` as (hostname, manager status) pairs; empty if it does not answer.
fn managers(lab: &TestLab, i: usize) -> Vec<(String, String)> {
    let out = lab.shoal(i, &["node", "ls", "--format", "json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("Hostname"), s("ManagerStatus"))
        })
        .collect()
}

/// The leader as node `i` sees it.
fn leader(lab: &TestLab, i: usize) -> Option<String> {
    managers(lab, i)
        .into_iter()
        .find(|(_, status)| status == "Leader")
        .map(|(host, _)| host)
}

/// Node `i`'s index from its host name (`n3` -> 3).
fn index(host: &str) -> usize {
    host.trim_start_matches('n').parse().unwrap()
}

/// Tries `join-token --rotate worker` on node `i` until it commits (bounded); how long it took.
fn rotate_on(lab: &TestLab, i: usize, since: Instant) -> Duration {
    let mut tries = 0;
    while !lab
        .shoal(i, &["join-token", "--rotate", "worker"])
        .status
        .success()
    {
        tries += 1;
        assert!(tries < 20, "no write commits on n{i}");
    }
    since.elapsed()
}

/// `shoal lab stop --kill` (SIGKILL, as a crash) of node `i`.
fn kill(lab: &TestLab, i: usize) {
    ok(Command::new(BIN).args([
        "lab",
        "stop",
        "--kill",
        "--name",
        &lab.name,
        &format!("n{i}"),
    ]));
}

#[test]
fn the_leader_dies_and_the_overlay_and_the_managers_carry_on() {
    let lab = TestLab::up_with(BIN, 6, true, &["--managers", "3"]);
    assert_eq!(leader(&lab, 1).as_deref(), Some("n1"));
    // n6 leaves now, to join again later as a new node through a surviving manager.
    ok(Command::new(BIN).args([
        "lab", "exec", "--name", &lab.name, "n6", "--", "shoal", "leave",
    ]));
    // A ping every 10 ms between two workers for the whole failover.
    let target = lab.overlay_addr(5);
    let mut ping = Spawned(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(4),
                "ping",
                "-n",
                "-q",
                "-i",
                "0.01",
            ])
            .args(["-c", "1200", "-w", "30", &target])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(1));

    // From before the kill: `lab stop --kill` itself returns only once the process is gone.
    let killed = Instant::now();
    kill(&lab, 1);
    let took = rotate_on(&lab, 2, killed);
    eprintln!("leader killed: a rotation committed on n2 {took:?} after");
    let new_leader = leader(&lab, 2).expect("a new leader");
    assert!(new_leader == "n2" || new_leader == "n3", "{new_leader}");
    assert_eq!(leader(&lab, 3).as_deref(), Some(new_leader.as_str()));

    // A new worker joins through a survivor, with the rotated token.
    let words = String::from_utf8(lab.shoal(3, &["join-token", "worker"]).stdout).unwrap();
    let join = words
        .lines()
        .find(|l| l.trim_start().starts_with("shoal join --token"))
        .expect("join-token prints a join command");
    let mut args = vec!["lab", "exec", "--name", &lab.name, "n6", "--"];
    args.extend(join.split_whitespace());
    ok(Command::new(BIN).args(&args));
    lab.eventually(
        "n6 Ready on the new leader",
        Duration::from_secs(20),
        || {
            let ls =
                String::from_utf8_lossy(&lab.shoal(index(&new_leader), &["node", "ls"]).stdout)
                    .into_owned();
            ls.lines()
                .filter(|l| l.contains(" n6 ") && l.contains(" Ready "))
                .count()
                == 1
        },
    );

    // Not a single ping lost while the leader died and the managers moved on.
    // ping ends by itself (1,200 sent, or `-w 30`): its summary is the last of its output.
    let mut summary = String::new();
    ping.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary)
        .unwrap();
    eprintln!("{summary}");
    assert!(
        summary.contains("1200 packets transmitted, 1200 received"),
        "{summary}"
    );

    // The old leader comes back as a follower of the new one, with what it missed.
    ok(Command::new(BIN).args(["lab", "start", "--name", &lab.name, "n1"]));
    lab.eventually("n1 back, following", Duration::from_secs(20), || {
        leader(&lab, 1).as_deref() == Some(new_leader.as_str())
            && managers(&lab, 1).contains(&("n1".to_owned(), "Reachable".to_owned()))
    });
    let version = |i: usize| {
        let info = String::from_utf8(lab.shoal(i, &["info"]).stdout).unwrap();
        serde_json::from_str::<Value>(&info).unwrap()["view_version"].clone()
    };
    lab.eventually("n1 has the newest state", Duration::from_secs(10), || {
        version(1) == version(index(&new_leader))
    });
}

#[test]
fn five_managers_lose_two_at_once_and_a_demoted_leader_is_replaced() {
    let lab = TestLab::up_with(BIN, 5, true, &["--managers", "5"]);
    assert_eq!(leader(&lab, 1).as_deref(), Some("n1"));
    let killed = Instant::now();
    kill(&lab, 1);
    kill(&lab, 2);
    let took = rotate_on(&lab, 3, killed);
    eprintln!("two of five killed: a rotation committed on n3 {took:?} after");
    lab.eventually("both Unreachable on n3", Duration::from_secs(5), || {
        let ls = managers(&lab, 3);
        ["n1", "n2"]
            .iter()
            .all(|h| ls.contains(&((*h).to_owned(), "Unreachable".to_owned())))
    });
    eprintln!(
        "both Unreachable on n3 {:?} after the kills",
        killed.elapsed()
    );

    for i in [1, 2] {
        ok(Command::new(BIN).args(["lab", "start", "--name", &lab.name, &format!("n{i}")]));
    }
    lab.eventually("five managers again", Duration::from_secs(20), || {
        managers(&lab, 3)
            .iter()
            .filter(|(_, s)| s == "Leader" || s == "Reachable")
            .count()
            == 5
    });
    // Demote the leader, from another manager: a new leader, and writes go on.
    let old = leader(&lab, 3).unwrap();
    let asker = if old == "n3" { 4 } else { 3 };
    let demoted = Instant::now();
    let out = lab.shoal(asker, &["node", "demote", &old]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = rotate_on(&lab, asker, demoted);
    eprintln!("leader {old} demoted: a rotation committed {took:?} after");
    let now = leader(&lab, asker).expect("a leader after the demotion");
    assert_ne!(now, old);
    assert!(managers(&lab, asker).contains(&(old, String::new())));
}
