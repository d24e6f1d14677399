//! User-defined networks as a container runtime uses them: `shoal-cni` called exactly as a
//! runtime calls it (`CNI_*` variables, the configuration on stdin, a network namespace as the
//! container) against the agents of a `shoal lab`. Needs root; each test makes its own lab and
//! container namespaces and removes them on drop, also when it fails.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_netns_tests::shoal_lab::{matching, packets, wait_exit, Spawned, TestLab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

mod common;
use common::cni::{add, address, cni, create, endpoints, wait_network, Container, CNI};

#[test]
fn containers_on_three_nodes_reach_each_other_through_the_cni_plugin() {
    let lab = TestLab::up(BIN, 3, true);
    create(
        &lab,
        &[
            "--opt",
            "encrypted",
            "--attachable",
            "--subnet",
            "10.77.0.0/24",
            "web",
        ],
    );
    wait_network(&lab, 3, "web");
    let c: Vec<Container> = (1..=3)
        .map(|i| Container::new(&lab, &format!("c{i}")))
        .collect();
    let ips: Vec<String> = (0..3).map(|i| add(&lab, i + 1, &c[i], "web")).collect();
    for ip in &ips {
        assert!(ip.starts_with("10.77.0."), "{ips:?}");
    }
    assert_eq!(
        ips.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "three different addresses: {ips:?}"
    );
    // The interface is as the result says, with the encrypted overlay's MTU.
    let link = String::from_utf8_lossy(&c[0].exec(&["ip", "-o", "addr", "show", "eth0"]).stdout)
        .into_owned();
    assert!(link.contains(&format!("{}/24", ips[0])), "{link}");
    let mtu = String::from_utf8_lossy(&c[0].exec(&["cat", "/sys/class/net/eth0/mtu"]).stdout)
        .trim()
        .to_owned();
    assert_eq!(mtu, "1414");

    // Every container reaches every other, across nodes.
    for (i, from) in c.iter().enumerate() {
        for (j, to) in ips.iter().enumerate() {
            if i != j {
                lab.eventually(
                    &format!("c{} pings c{} ({to})", i + 1, j + 1),
                    Duration::from_secs(10),
                    || from.ping(to),
                );
            }
        }
    }
    // TCP across nodes, and never the plaintext on the underlay.
    let marker = "shoal-container-plaintext-";
    let data = marker.repeat(300);
    let pcap = lab.capture_all(2, "web", || {
        let got = lab.tcp_transfer_ns(&c[1].name, &c[0].name, &ips[1], &data);
        assert_eq!(got, data, "TCP c1 -> c2 arrives intact");
    });
    let leaked = packets(&pcap)
        .iter()
        .filter(|p| p.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .count();
    assert_eq!(leaked, 0, "the plaintext is on the underlay");

    // Every node knows every endpoint.
    for node in 1..=3 {
        lab.eventually(
            &format!("n{node} lists the 3 endpoints"),
            Duration::from_secs(5),
            || endpoints(&lab, node, "web").len() == 3,
        );
    }

    // Nothing a node's own devices send looks like another node's: no frame was dropped as
    // a spoofed source (each node's network device has a MAC of its own, its bridge no IPv6).
    for node in 1..=3 {
        assert_eq!(lab.drops(node, "spoofed_source"), 0, "n{node}");
    }

    // ADD again (a runtime retrying) answers the same; CHECK passes.
    let again = cni(&lab, 1, "ADD", Some(&c[0]), "web", json!({}));
    assert!(again.ok, "{}", again.out);
    assert_eq!(address(&again.out), ips[0]);
    let check = cni(&lab, 1, "CHECK", Some(&c[0]), "web", json!({}));
    assert!(check.ok, "{}", check.out);

    // network rm is refused while endpoints are attached.
    let rm = lab.shoal(1, &["network", "rm", "web"]);
    assert!(!rm.status.success());
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("network web has active endpoints"),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );

    // DEL, and DEL again: both succeed; c2 is gone from the overlay and from every table.
    for _ in 0..2 {
        let del = cni(&lab, 2, "DEL", Some(&c[1]), "web", json!({}));
        assert!(del.ok, "{}", del.out);
    }
    assert!(!c[1].exec(&["ip", "link", "show", "eth0"]).status.success());
    // n2's last container went, and its device and bridge with it: an ADD right after makes
    // them again (the old device must be gone by then, not still closing).
    for _ in 0..10 {
        let again = cni(&lab, 2, "ADD", Some(&c[1]), "web", json!({}));
        assert!(again.ok, "ADD right after the last DEL: {}", again.out);
        let del = cni(&lab, 2, "DEL", Some(&c[1]), "web", json!({}));
        assert!(del.ok, "{}", del.out);
    }
    for node in [1, 3] {
        lab.eventually(
            &format!("n{node} forgets c2"),
            Duration::from_secs(5),
            || endpoints(&lab, node, "web").len() == 2,
        );
    }
    assert!(!c[0].ping(&ips[1]), "c2's address still answers");

    // GC with c3 not among the valid attachments removes it.
    let gc = cni(
        &lab,
        3,
        "GC",
        None,
        "web",
        json!({"cni.dev/valid-attachments": [{"containerID": "other", "ifname": "eth0"}]}),
    );
    assert!(gc.ok, "{}", gc.out);
    assert!(!c[2].exec(&["ip", "link", "show", "eth0"]).status.success());

    // STATUS: ready while the agent runs, the spec's error 50 when it does not.
    let status = cni(&lab, 3, "STATUS", None, "web", json!({}));
    assert!(status.ok, "{}", status.out);
    lab.lab_node("stop", 3);
    let status = cni(&lab, 3, "STATUS", None, "web", json!({}));
    assert!(!status.ok);
    assert_eq!(status.out["code"], 50, "{}", status.out);

    // With the last endpoint gone, the network can be removed.
    let del = cni(&lab, 1, "DEL", Some(&c[0]), "web", json!({}));
    assert!(del.ok, "{}", del.out);
    lab.eventually("network rm web", Duration::from_secs(5), || {
        lab.shoal(1, &["network", "rm", "web"]).status.success()
    });
}

/// Podman from Debian with its CNI backend, one configuration per lab node (each naming that
/// node's agent socket), storage and state under the test's scratch directory. Dropping it
/// removes the containers it ran (each DEL reaches its node's agent), then its files.
struct Podman {
    dir: std::path::PathBuf,
    containers: Vec<(usize, String)>,
}

impl Podman {
    /// Sets up podman for nodes `1..=nodes` of `lab` with `network` and imports a busybox
    /// image made here (no network access needed).
    fn new(lab: &TestLab, nodes: usize, network: &str) -> Podman {
        let dir = lab.scratch.join("podman");
        let rootfs = dir.join("rootfs");
        for d in ["bin", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("busybox-static is installed (.ci/run installs it)");
        for tool in ["sh", "ping", "nc", "sleep", "ip", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).unwrap();
        }
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::os::unix::fs::symlink(CNI, plugins.join("shoal-cni")).unwrap();
        for i in 1..=nodes {
            let conf = dir.join(format!("n{i}"));
            std::fs::create_dir_all(conf.join("net.d")).unwrap();
            std::fs::write(
                conf.join("net.d").join(format!("{network}.conflist")),
                json!({
                    "cniVersion": "1.0.0",
                    "name": network,
                    "plugins": [{
                        "type": "shoal-cni",
                        "network": network,
                        "socket": lab.socket(i),
                    }],
                })
                .to_string(),
            )
            .unwrap();
            std::fs::write(
                conf.join("containers.conf"),
                format!(
                    "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n\
                     cgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\n[network]\n\
                     network_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\n\
                     network_config_dir = \"{}\"\n",
                    plugins.display(),
                    conf.join("net.d").display()
                ),
            )
            .unwrap();
        }
        let podman = Podman {
            dir,
            containers: Vec::new(),
        };
        let tar = podman.dir.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {out:?}");
        let out = podman
            .cmd(1)
            .arg("import")
            .arg(&tar)
            .arg("shoal-bb")
            .output()
            .unwrap();
        assert!(out.status.success(), "podman import: {out:?}");
        podman
    }

    /// `podman` with node `node`'s configuration.
    fn cmd(&self, node: usize) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env(
            "CONTAINERS_CONF",
            self.dir.join(format!("n{node}")).join("containers.conf"),
        )
        .arg("--root")
        .arg(self.dir.join("root"))
        .arg("--runroot")
        .arg(self.dir.join("run"))
        .args(["--storage-driver", "vfs"]);
        cmd
    }

    /// Runs a container `name` on node `node`'s network; its address there. Its main process:
    /// a TCP listener on port 5555 writing what it gets to /tmp/got, then a long sleep.
    fn run(&mut self, node: usize, name: &str, network: &str) -> String {
        let out = self
            .cmd(node)
            .args([
                "run",
                "-d",
                "--name",
                name,
                "--network",
                network,
                "shoal-bb",
            ])
            .args(["sh", "-c", "nc -l -p 5555 > /tmp/got; sleep 600"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman run on n{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.containers.push((node, name.to_owned()));
        let addr = self.exec(node, name, &["ip", "-o", "-4", "addr", "show", "eth0"]);
        let cidr = addr
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .unwrap_or_else(|| panic!("no address on eth0 in {name}: {addr}"));
        cidr.split('/').next().unwrap().to_owned()
    }

    /// `podman exec` in container `name` (on node `node`); its stdout, if it succeeded.
    fn try_exec(&self, node: usize, name: &str, args: &[&str]) -> Option<String> {
        let out = self
            .cmd(node)
            .args(["exec", name])
            .args(args)
            .output()
            .unwrap();
        if !out.status.success() {
            let what: String = format!("{args:?}").chars().take(120).collect();
            eprintln!(
                "podman exec {name} {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn exec(&self, node: usize, name: &str, args: &[&str]) -> String {
        self.try_exec(node, name, args)
            .unwrap_or_else(|| panic!("podman exec {name} {args:?} failed"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for (node, name) in std::mem::take(&mut self.containers) {
            let _ = self.cmd(node).args(["rm", "-f", "-t", "0", &name]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn podman_containers_on_two_nodes_talk_over_an_encrypted_user_network() {
    let lab = TestLab::up(BIN, 2, true);
    create(
        &lab,
        &[
            "--opt",
            "encrypted",
            "--attachable",
            "--subnet",
            "10.78.0.0/24",
            "app",
        ],
    );
    wait_network(&lab, 2, "app");
    let mut podman = Podman::new(&lab, 2, "app");
    let a = format!("{}-a", lab.name);
    let b = format!("{}-b", lab.name);
    let ip_a = podman.run(1, &a, "app");
    let ip_b = podman.run(2, &b, "app");
    assert!(ip_a.starts_with("10.78.0.") && ip_b.starts_with("10.78.0."));
    lab.eventually(
        &format!("{a} pings {b} ({ip_b})"),
        Duration::from_secs(15),
        || {
            podman
                .try_exec(1, &a, &["ping", "-c", "1", "-W", "1", &ip_b])
                .is_some()
        },
    );
    // A TCP transfer between the two, never in the clear on the underlay.
    let marker = "shoal-podman-plaintext-";
    let data = marker.repeat(100);
    let pcap = lab.capture_all(1, "podman", || {
        lab.eventually("the transfer is sent", Duration::from_secs(10), || {
            podman
                .try_exec(
                    1,
                    &a,
                    &["sh", "-c", &format!("echo {data} | nc {ip_b} 5555")],
                )
                .is_some()
        });
    });
    lab.eventually(
        &format!("{b} received it all"),
        Duration::from_secs(5),
        || {
            podman
                .try_exec(2, &b, &["cat", "/tmp/got"])
                .map(|s| s.trim().to_owned())
                == Some(data.clone())
        },
    );
    let leaked = packets(&pcap)
        .iter()
        .filter(|p| p.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .count();
    assert_eq!(leaked, 0, "the plaintext is on the underlay");
}

/// When `from` first reaches `to`, from now: pings every 50 ms for up to 3 s; the time of the
/// first echo answered (its sequence number times the interval), `None` if none was.
fn first_reply(from: &Container, to: &str) -> Option<Duration> {
    let out = from.exec(&["ping", "-n", "-i", "0.05", "-c", "60", "-w", "3", to]);
    let text = String::from_utf8_lossy(&out.stdout);
    let seq = text
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .min()?;
    Some(Duration::from_millis(seq.saturating_sub(1) * 50))
}

#[test]
fn a_moved_address_is_followed_and_networks_stay_apart() {
    let lab = TestLab::up(BIN, 3, true);
    create(&lab, &["--attachable", "--subnet", "10.79.0.0/24", "front"]);
    create(&lab, &["--attachable", "--subnet", "10.80.0.0/24", "back"]);
    wait_network(&lab, 3, "back");
    let [c1, c2, c3, c4, d] = ["c1", "c2", "c3", "c4", "d"].map(|t| Container::new(&lab, t));
    let ip1 = add(&lab, 1, &c1, "front");
    let ip3 = add(&lab, 3, &c3, "front");
    add(&lab, 1, &c4, "front");
    lab.eventually("c3 reaches c1", Duration::from_secs(10), || c3.ping(&ip1));

    // The address leaves n1 (DEL) and comes back on n2 by name (IP= in CNI_ARGS).
    let del = cni(&lab, 1, "DEL", Some(&c1), "front", json!({}));
    assert!(del.ok, "{}", del.out);
    let moved = cni(
        &lab,
        2,
        "ADD",
        Some(&c2),
        "front",
        json!({"runtimeConfig": {"ips": [format!("{ip1}/24")]}}),
    );
    assert!(moved.ok, "{}", moved.out);
    assert_eq!(address(&moved.out), ip1, "the address asked for");
    for (name, from) in [("c3 on n3", &c3), ("c4 on n1", &c4)] {
        let after =
            first_reply(from, &ip1).unwrap_or_else(|| panic!("{name} never reaches {ip1} on n2"));
        assert!(
            after <= Duration::from_secs(1),
            "{name} reached the moved address after {after:?}"
        );
    }
    // The address is n2's now: its endpoint is listed, on n2's node.
    let listed = endpoints(&lab, 3, "front");
    let row = listed
        .iter()
        .find(|e| {
            e["ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with(&format!("{ip1}/")))
        })
        .unwrap_or_else(|| panic!("{ip1} not listed: {listed:?}"));
    let n2 = lab.shoal(2, &["info"]);
    let n2: Value = serde_json::from_slice(&n2.stdout).unwrap_or(Value::Null);
    assert_eq!(row["node_id"], n2["node_id"], "{row}");

    // Networks are apart: a container of `back` on the same node as c2, told that `front`'s
    // subnet is on its link, reaches nothing there (its ARP is answered by no one and
    // flooded to no node of `front`).
    let ip_d = add(&lab, 2, &d, "back");
    assert!(ip_d.starts_with("10.80.0."));
    assert!(d
        .exec(&["ip", "route", "add", "10.79.0.0/24", "dev", "eth0"])
        .status
        .success());
    assert!(c3
        .exec(&["ip", "route", "add", "10.80.0.0/24", "dev", "eth0"])
        .status
        .success());
    for _ in 0..3 {
        assert!(!d.ping(&ip1), "a container of back reached front's {ip1}");
        assert!(
            !c3.ping(&ip_d),
            "a container of front reached back's {ip_d}"
        );
    }
    assert!(c3.ping(&ip1), "front itself still works");

    // `shoal capture --network` shows a user network's own frames, decrypted, and only its.
    let pattern = "5348414c4f21";
    let front = start_capture(&lab, 2, "front");
    let back = start_capture(&lab, 2, "back");
    let ping = c3.exec(&["ping", "-c", "3", "-i", "0.2", "-p", pattern, &ip1]);
    assert!(ping.status.success(), "{ping:?}");
    let front = front.finish();
    let back = back.finish();
    let echo = format!("icmp.type == 8 && ip.dst == {ip1}");
    let seen = matching(
        &front,
        &format!("frame.interface_name == \"front/inner\" && {echo}"),
    );
    assert!(seen.len() >= 3, "front's capture: {seen:?}");
    assert!(
        matching(&back, &echo).is_empty(),
        "back's capture holds front's frames"
    );

    // A node down for longer than the grace (30 s) loses its endpoints on every other node;
    // when it comes back, so do they.
    let listed = |node: usize, ip: &str| {
        endpoints(&lab, node, "front").iter().any(|e| {
            e["ip"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{ip}/")))
        })
    };
    assert!(listed(1, &ip3));
    ok_lab(&lab, &["stop", "--kill", "n3"]);
    lab.eventually("n1 drops n3's endpoint", Duration::from_secs(60), || {
        !listed(1, &ip3)
    });
    lab.lab_node("start", 3);
    lab.eventually(
        "n1 lists n3's endpoint again",
        Duration::from_secs(15),
        || listed(1, &ip3),
    );
    lab.eventually("c4 reaches c3 again", Duration::from_secs(10), || {
        c4.ping(&ip3)
    });
}

/// A `shoal capture --network NET --inner` running on node `node`.
struct Capture {
    child: Spawned,
    file: std::path::PathBuf,
}

fn start_capture(lab: &TestLab, node: usize, network: &str) -> Capture {
    let file = lab.scratch.join(format!("{network}-n{node}.pcapng"));
    let file_arg = file.to_str().unwrap().to_owned();
    let child = Spawned(
        Command::new(BIN)
            .args([
                "lab",
                "exec",
                "--name",
                &lab.name,
                &format!("n{node}"),
                "--",
            ])
            .args(["shoal", "capture", "--network", network, "--inner"])
            .args(["--duration", "4", "-w", &file_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    lab.eventually("the capture file", Duration::from_secs(10), || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
    });
    Capture { child, file }
}

impl Capture {
    fn finish(mut self) -> std::path::PathBuf {
        assert!(wait_exit(&mut self.child.0, Duration::from_secs(15)).success());
        self.file
    }
}

/// A small deterministic generator (xorshift64*), so a failing churn run can be replayed from
/// the seed it prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// ADD/DEL cycles on the churn test's network.
const CHURN_CYCLES: usize = 1000;

#[test]
fn churn_with_crashing_agents_leaves_tables_in_step_and_no_address_leaked() {
    let lab = TestLab::up(BIN, 3, true);
    create(
        &lab,
        &[
            "--attachable",
            "--opt",
            "encrypted",
            "--subnet",
            "10.81.0.0/22",
            "churn",
        ],
    );
    wait_network(&lab, 3, "churn");
    let seed = std::env::var("SHOAL_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::from(std::process::id()) | 1);
    eprintln!("churn seed {seed} (SHOAL_CHURN_SEED replays it)");
    let mut rng = Rng(seed);
    // Nine containers, three per node; what the runtime believes of each.
    let slots: Vec<(usize, Container)> = (0..9)
        .map(|k| (k % 3 + 1, Container::new(&lab, &format!("k{k}"))))
        .collect();
    let mut attached: Vec<Option<String>> = vec![None; slots.len()];
    let mut owed_del = vec![false; slots.len()];
    let mut down: Option<usize> = None;
    let (mut adds, mut dels, mut kills, mut failed) = (0, 0, 0, 0);
    // The first address each node gave: the lowest of its first block, given again at the
    // end if no address leaked.
    let mut first: [Option<String>; 3] = [None, None, None];
    while adds < CHURN_CYCLES {
        if rng.below(150) == 0 {
            match down.take() {
                None => {
                    let n = rng.below(3) + 1;
                    ok_lab(&lab, &["stop", "--kill", &format!("n{n}")]);
                    down = Some(n);
                    kills += 1;
                }
                Some(n) => lab.lab_node("start", n),
            }
        }
        let k = rng.below(slots.len());
        let (node, c) = &slots[k];
        if owed_del[k] || attached[k].is_some() {
            // A runtime deletes what it added, and retries a DEL that failed.
            let r = cni(&lab, *node, "DEL", Some(c), "churn", json!({}));
            if r.ok {
                owed_del[k] = false;
                attached[k] = None;
                dels += 1;
            } else {
                owed_del[k] = true;
                attached[k] = None;
                failed += 1;
            }
        } else {
            let r = cni(&lab, *node, "ADD", Some(c), "churn", json!({}));
            if r.ok {
                attached[k] = Some(address(&r.out));
                first[node - 1].get_or_insert_with(|| address(&r.out));
                adds += 1;
            } else {
                // A failed ADD is followed by a DEL, as the spec asks of runtimes.
                owed_del[k] = true;
                failed += 1;
            }
        }
    }
    if let Some(n) = down {
        lab.lab_node("start", n);
    }
    for (k, (node, c)) in slots.iter().enumerate() {
        if owed_del[k] {
            lab.eventually("an owed DEL succeeds", Duration::from_secs(20), || {
                cni(&lab, *node, "DEL", Some(c), "churn", json!({})).ok
            });
        }
    }
    eprintln!("churn: {adds} ADDs, {dels} DELs, {failed} calls refused while an agent was down, {kills} agents killed");
    assert!(
        kills > 0 && failed > 0,
        "the run crashed no agent mid-churn"
    );

    // Every node's records, and its data path's table, are what the runtime holds.
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            let info: Value = serde_json::from_slice(&lab.shoal(i, &["info"]).stdout).unwrap();
            info["node_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let vtep_of: std::collections::HashMap<String, String> = lab.inspect(1)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["node_id"].as_str().unwrap().to_owned(),
                m["vtep"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: std::collections::BTreeSet<(String, String)> = slots
        .iter()
        .zip(&attached)
        .filter_map(|((node, _), ip)| Some((ip.clone()?, ids[node - 1].clone())))
        .collect();
    let mac = |ip: &str| {
        let o: Vec<u8> = ip.split('.').map(|p| p.parse().unwrap()).collect();
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    };
    let in_step = |i: usize| -> Result<(), String> {
        let out = lab.shoal(i, &["network", "inspect", "churn"]);
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let records: std::collections::BTreeSet<(String, String)> =
            pairs(&v[0]["endpoints"], "ip", "node_id")
                .into_iter()
                .map(|(ip, node)| (ip.split('/').next().unwrap_or_default().to_owned(), node))
                .collect();
        if records != expected {
            return Err(format!(
                "n{i} records {records:?}, the runtime holds {expected:?}"
            ));
        }
        let table = pairs(&v[0]["data_path"]["forwarding"], "mac", "vtep");
        let want: std::collections::BTreeSet<(String, String)> = expected
            .iter()
            .filter(|(_, node)| *node != ids[i - 1])
            .map(|(ip, node)| (mac(ip), vtep_of[node].clone()))
            .collect();
        if table != want {
            return Err(format!("n{i} data path {table:?}, records say {want:?}"));
        }
        Ok(())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let errors: Vec<String> = (1..=3).filter_map(|i| in_step(i).err()).collect();
        if errors.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not in step within 2 s:\n{}",
            errors.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // No address leaked: with every container deleted, no node holds an attachment, a veth
    // or a bridge, and each node gives its first address again.
    for (k, (node, c)) in slots.iter().enumerate() {
        if attached[k].take().is_some() {
            let r = cni(&lab, *node, "DEL", Some(c), "churn", json!({}));
            assert!(r.ok, "{}", r.out);
        }
    }
    for i in 1..=3 {
        assert_eq!(
            endpoints(&lab, i, "churn").len(),
            0,
            "n{i} still lists endpoints"
        );
        let links =
            String::from_utf8_lossy(&lab.exec(i, &["ip", "-o", "link"]).stdout).into_owned();
        assert!(
            !links.contains("shv") && !links.contains("shb"),
            "n{i} keeps devices:\n{links}"
        );
    }
    for (node, c) in slots.iter().take(3) {
        let again = add(&lab, *node, c, "churn");
        assert_eq!(
            Some(&again),
            first[node - 1].as_ref(),
            "n{node} gives its first address again"
        );
    }
}

/// The (`a`, `b`) string fields of each object of the JSON array `list`.
fn pairs(list: &Value, a: &str, b: &str) -> std::collections::BTreeSet<(String, String)> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            let field = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
            (field(a), field(b))
        })
        .collect()
}

/// `shoal lab ARGS --name LAB`, which must succeed.
fn ok_lab(lab: &TestLab, args: &[&str]) {
    let (verb, rest) = args.split_first().unwrap();
    let out = Command::new(BIN)
        .args(["lab", verb, "--name", &lab.name])
        .args(rest)
        .output()
        .unwrap();
    assert!(out.status.success(), "lab {args:?}: {out:?}");
}
