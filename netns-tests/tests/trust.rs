//! Issue "trust" as a user meets it, across network namespaces through `shoal lab`: no sealed
//! datagram ever repeats a (key epoch, incarnation, counter) of its sender, whatever the node
//! goes through (leave and join in the same agent, removal and rejoin, a restart from a copied
//! state directory). Needs root; each test makes its own lab and takes it down on drop.

#![allow(clippy::unwrap_used)] // test code: a failed step fails the test

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_netns_tests::shoal_lab::{ok, payloads, Spawned, TestLab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

/// (key epoch, incarnation tag, counter) of every sealed datagram from `src` in a capture:
/// bytes 12..28 of the UDP payload (docs/wire.md).
fn sealed_from(pcap: &std::path::Path, src: &str) -> Vec<(u32, u32, u64)> {
    payloads(pcap, src)
        .iter()
        .map(|hex| {
            let b: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert!(b.len() >= 44 && b[0] == 0x48, "a sealed datagram: {hex}");
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
    let state = lab.state_dir(2);
    let copy = lab.scratch.join("n2-copy");
    let lab_cmd = |verb: &str| lab.lab_node(verb, 2);
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

/// Python run in a namespace that is not a member: `per_port` tasks for each of n1's 2377
/// and 7946/TCP, each connecting, holding its connection until the agent closes it, and
/// connecting again at once, for `secs` seconds; then prints how many connections it made.
fn flood_script(per_port: usize, secs: u64) -> String {
    format!(
        r#"
import asyncio, resource, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
made = 0
async def hold(port, end):
    global made
    while time.time() < end:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("198.18.0.1", port), 1)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
            continue
        made += 1
        try:
            await asyncio.wait_for(r.read(1), max(0.01, end - time.time()))
        except (OSError, asyncio.TimeoutError):
            pass
        w.close()
async def main():
    end = time.time() + {secs}
    await asyncio.gather(*[hold(p, end) for p in (2377, 7946) for _ in range({per_port})])
asyncio.run(main())
print(made, flush=True)
"#
    )
}

/// A namespace that is not a member holds as many connections as the limits allow on n1's
/// 2377 and 7946/TCP (and more); meanwhile a worker restarts and a node joins: both are Ready
/// within 15 s, and n1 counts what it refused.
#[test]
fn strangers_holding_connections_do_not_keep_nodes_out() {
    let mut lab = TestLab::up(BIN, 3, true);
    let join = worker_join(&lab);
    // n3 leaves the swarm for good (removed), to join again as a new node during the flood.
    shoal_ok(&lab, 1, &["node", "rm", "--force", "n3"]);
    lab.eventually("n3 out of the swarm", Duration::from_secs(10), || {
        shoal_ok(&lab, 3, &["info"]).contains("\"node_id\": null")
    });
    let stranger = lab.add_host("x", "198.18.0.100/24");
    let flood = Spawned(
        shoal_netns::exec(&stranger, "python3")
            .args(["-c", &flood_script(1100, 40)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(8));
    let started = Instant::now();
    lab.lab_node("restart", 2);
    let args: Vec<&str> = join.iter().map(String::as_str).collect();
    shoal_ok(&lab, 3, &args);
    lab.eventually(
        "the restarted worker and the new node are Ready on n1",
        Duration::from_secs(15),
        || {
            let ls = shoal_ok(&lab, 1, &["node", "ls"]);
            ls.lines()
                .filter(|l| (l.contains(" n2 ") || l.contains(" n3 ")) && l.contains(" Ready "))
                .count()
                == 2
        },
    );
    eprintln!(
        "under the flood: n2 (restarted) and n3 (joined) Ready {:?} after the restart",
        started.elapsed()
    );
    let page = shoal_netns_tests::shoal_lab::metrics(&lab, 1);
    let refused = shoal_netns_tests::shoal_lab::sample(
        &page,
        r#"shoal_manager_api_refused_connections_total{limit="per_source"}"#,
    );
    assert!(refused > 0.0, "n1 counted the refused connections:\n{page}");
    assert!(
        lab.log(1).contains("manager API refused connections"),
        "n1 logged them"
    );
    drop(flood);
}

/// Unmounts a test's tmpfs when dropped (lazily, so a busy mount goes as soon as it can).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A worker whose state directory is full through two key rotations: it says so (a warn line,
/// a counter in /metrics), keeps running on the views it could not save, and once there is
/// room again it saves them; ping works throughout and after.
#[test]
fn a_worker_with_a_full_state_dir_says_so_and_keeps_working() {
    let lab = TestLab::up_with(BIN, 2, true, &["--key-rotation-interval", "20s"]);
    let n1 = lab.overlay_addr(1);
    // n2's state on a small tmpfs.
    let state = lab.state_dir(2);
    let saved = lab.scratch.join("n2-state");
    lab.lab_node("stop", 2);
    ok(Command::new("cp").arg("-a").arg(&state).arg(&saved));
    ok(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&state));
    let _unmount = Unmount(state.clone());
    ok(Command::new("sh").arg("-c").arg(format!(
        "cp -a {}/. {}/",
        saved.display(),
        state.display()
    )));
    lab.lab_node("start", 2);
    lab.eventually("n2 pings n1", Duration::from_secs(15), || lab.ping(2, &n1));
    // Fill it.
    let filler = state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let view_of = |i: usize| -> u64 {
        serde_json::from_str::<serde_json::Value>(&shoal_ok(&lab, i, &["info"])).unwrap()
            ["view_version"]
            .as_u64()
            .unwrap()
    };
    let epochs_of = |i: usize| -> u64 {
        serde_json::from_str::<serde_json::Value>(&shoal_ok(&lab, i, &["info"])).unwrap()
            ["data_path_epochs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .max()
            .unwrap()
    };
    let first = epochs_of(2);
    lab.eventually(
        "two key rotations reach n2 while its state dir is full",
        Duration::from_secs(70),
        || epochs_of(2) >= first + 2,
    );
    assert!(lab.ping(2, &n1), "traffic flows on the rotated keys");
    assert!(
        lab.log(2).contains("cannot save the cluster view"),
        "a warn line on n2:\n{}",
        lab.log(2)
    );
    let page = shoal_netns_tests::shoal_lab::metrics(&lab, 2);
    let faults = shoal_netns_tests::shoal_lab::sample(
        &page,
        r#"shoal_agent_faults_total{kind="state_write"}"#,
    );
    assert!(faults >= 1.0, "counted in /metrics:\n{page}");
    // Room again: the view is saved (a restart resumes from it) and ping works.
    std::fs::remove_file(&filler).unwrap();
    let version = view_of(2);
    std::thread::sleep(Duration::from_secs(7));
    lab.lab_node("restart", 2);
    assert!(
        view_of(2) >= version,
        "n2 saved the newest view once it had room"
    );
    lab.eventually(
        "n2 pings n1 after the restart",
        Duration::from_secs(15),
        || lab.ping(2, &n1),
    );
}

/// A node may not take the identity of a node in the swarm: a join with n2's advertise
/// address, and a join with n2's keys (a copy of its state directory, in another namespace),
/// are both refused with one line, and n1 and n2 go on talking.
#[test]
fn a_join_cannot_take_another_nodes_address_or_keys() {
    let lab = TestLab::up(BIN, 4, true);
    let join = worker_join(&lab);
    let (n1, n2) = (lab.overlay_addr(1), lab.overlay_addr(2));
    // n4 leaves the swarm for good, to try joining as someone else.
    shoal_ok(&lab, 1, &["node", "rm", "--force", "n4"]);
    lab.eventually("n4 out of the swarm", Duration::from_secs(10), || {
        shoal_ok(&lab, 4, &["info"]).contains("\"node_id\": null")
    });
    let args: Vec<&str> = join.iter().map(String::as_str).collect();
    // n4 claims n2's address (it has it as a second address).
    ok(Command::new("ip").args([
        "-n",
        &lab.ns(4),
        "addr",
        "add",
        "198.18.0.2/32",
        "dev",
        "lo",
    ]));
    let mut with_addr = args.clone();
    with_addr.extend(["--advertise-addr", "198.18.0.2"]);
    let out = lab.shoal(4, &with_addr);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a join with n2's address must be refused"
    );
    assert!(err.contains("already used by node"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // n3's agent restarted on a copy of n2's state (n2's keys), after n3 was removed. The copy
    // first drops the swarm membership it copied without telling the manager (its link is down
    // meanwhile: it must not make n2 leave), then tries to join as a new node.
    shoal_ok(&lab, 1, &["node", "rm", "--force", "n3"]);
    lab.eventually("n3 out of the swarm", Duration::from_secs(10), || {
        shoal_ok(&lab, 3, &["info"]).contains("\"node_id\": null")
    });
    lab.lab_node("stop", 3);
    let n3_state = lab.state_dir(3);
    ok(Command::new("rm").arg("-rf").arg(&n3_state));
    lab.lab_node("stop", 2);
    ok(Command::new("cp")
        .arg("-a")
        .arg(lab.state_dir(2))
        .arg(&n3_state));
    lab.lab_node("start", 2);
    ok(Command::new("ip").args(["-n", &lab.ns(3), "link", "set", "eth0", "down"]));
    lab.lab_node("start", 3);
    let _ = lab.shoal(3, &["leave", "--force"]);
    ok(Command::new("ip").args(["-n", &lab.ns(3), "link", "set", "eth0", "up"]));
    let out = lab.shoal(3, &args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a join with n2's keys must be refused"
    );
    assert!(err.contains("already the key of node"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // n1 and n2 are unaffected.
    lab.eventually("n1 and n2 still talk", Duration::from_secs(10), || {
        lab.ping(1, &n2) && lab.ping(2, &n1)
    });
}
