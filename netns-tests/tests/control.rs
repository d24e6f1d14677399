//! The seed's walkthrough, as a user would run it, across Linux network namespaces: shoal
//! agents in their own namespaces on one bridge, driven with the `shoal` CLI.
//!
//! Needs root (it creates namespaces); fails with a clear message otherwise. Every namespace
//! has a unique name (PID and a counter), addresses come from 198.18.0.0/15 only, and the
//! [`Lab`] guard kills its agents by PID and deletes its namespaces on drop, also on failure.
//!
//! The `shoal` binary: `SHOAL_BIN` if set, else `<target dir>/<profile>/shoal` next to this
//! test's executable, built with cargo first if it is missing.

// Test code: helpers may unwrap (clippy.toml allows it only inside #[test] functions).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run `id -u`");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test creates network namespaces and must run as root"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shoal_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return bin.into();
    }
    // <target>/<profile>/deps/control-<hash>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let bin = profile_dir.join("shoal");
    if !bin.exists() {
        let target = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "shoal-control",
            "--bin",
            "shoal",
            "--target-dir",
        ])
        .arg(target);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        run(&mut cmd);
    }
    assert!(
        bin.exists(),
        "no shoal binary at {}; set SHOAL_BIN",
        bin.display()
    );
    bin
}

/// Namespaces on one bridge, agents in them, all removed on drop.
struct Lab {
    bin: PathBuf,
    switch: String,
    nodes: Vec<LabNode>,
    root: PathBuf,
}

struct LabNode {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    agent: Option<Child>,
}

impl Lab {
    fn new(names: &[&str]) -> Self {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        // One /24 per lab inside 198.18.0.0/15, picked from the PID and counter.
        let block = (std::process::id().wrapping_mul(7).wrapping_add(n)) % 512;
        let base = Ipv4Addr::new(198, 18 + (block / 256) as u8, (block % 256) as u8, 0);
        let mut lab = Lab {
            bin: shoal_bin(),
            switch: format!("shc-{tag}-sw"),
            nodes: Vec::new(),
            root: std::env::temp_dir().join(format!("shoal-netns-control-{tag}")),
        };
        std::fs::create_dir_all(&lab.root).unwrap();
        run(Command::new("ip").args(["netns", "add", &lab.switch]));
        let sw = lab.switch.clone();
        run(Command::new("ip").args(["-n", &sw, "link", "add", "br0", "type", "bridge"]));
        run(Command::new("ip").args(["-n", &sw, "link", "set", "br0", "up"]));
        for (i, name) in names.iter().enumerate() {
            let ns = format!("shc-{tag}-{name}");
            let o = base.octets();
            let ip = Ipv4Addr::new(o[0], o[1], o[2], i as u8 + 1);
            // Registered before it exists, so a failure below still deletes it.
            lab.nodes.push(LabNode {
                name: (*name).to_owned(),
                ns: ns.clone(),
                ip,
                agent: None,
            });
            let port = format!("p{i}");
            run(Command::new("ip").args(["netns", "add", &ns]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
            run(Command::new("ip").args([
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &sw,
            ]));
            run(Command::new("ip").args(["-n", &sw, "link", "set", &port, "master", "br0"]));
            run(Command::new("ip").args(["-n", &sw, "link", "set", &port, "up"]));
            run(Command::new("ip").args([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
        }
        lab
    }

    fn node(&self, name: &str) -> &LabNode {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.sock"))
    }

    fn start(&mut self, name: &str) {
        let socket = self.socket(name);
        let state = self.root.join(name);
        let log = std::fs::File::create(self.root.join(format!("{name}.log"))).unwrap();
        let bin = self.bin.clone();
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        assert!(node.agent.is_none());
        // `ip netns exec` execs the agent, so the child's PID is the agent's.
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(&bin)
            .args(["agent", "--hostname", name, "--state-dir"])
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        node.agent = Some(child);
        wait_until(Duration::from_secs(10), || {
            self.shoal(name, &["info"]).status.success()
        });
    }

    fn kill9(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut child) = node.agent.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Runs the CLI inside the node's namespace.
    fn shoal(&self, name: &str, args: &[&str]) -> Output {
        let node = self.node(name);
        Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(&self.bin)
            .arg("--socket")
            .arg(self.socket(name))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, name: &str, args: &[&str]) -> String {
        let out = self.shoal(name, args);
        assert!(
            out.status.success(),
            "{name}: shoal {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, name: &str, args: &[&str]) -> String {
        let out = self.shoal(name, args);
        assert!(!out.status.success(), "{name}: shoal {args:?} should fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
        err.trim_end().to_owned()
    }

    /// (hostname, STATUS, MANAGER STATUS, starred) from `node ls --format json`.
    fn rows(&self, name: &str) -> Vec<(String, String, String, bool)> {
        self.ok(name, &["node", "ls", "--format", "json"])
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["Hostname"].as_str().unwrap().to_owned(),
                    v["Status"].as_str().unwrap().to_owned(),
                    v["ManagerStatus"].as_str().unwrap().to_owned(),
                    v["Self"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    fn status(&self, on: &str, of: &str) -> Option<String> {
        self.rows(on).into_iter().find(|r| r.0 == of).map(|r| r.1)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &node.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
        if std::thread::panicking() {
            eprintln!("agent logs kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("condition not met within {limit:?}");
}

/// The printed join command, as words after `shoal`.
fn join_words(text: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("shoal join --token"))
        .expect("a join command");
    line.split_whitespace().skip(1).map(str::to_owned).collect()
}

#[test]
fn walkthrough_across_namespaces() {
    let mut lab = Lab::new(&["n1", "n2", "n3", "n4"]);
    for n in ["n1", "n2", "n3", "n4"] {
        lab.start(n);
    }
    let n1_ip = lab.node("n1").ip.to_string();

    // init on n1 prints the paste-ready join command.
    let init = lab.ok("n1", &["init", "--advertise-addr", &n1_ip]);
    assert!(
        init.starts_with("Swarm initialized: current node ("),
        "{init}"
    );
    let join = join_words(&init);
    assert_eq!(join.last().unwrap(), &format!("{n1_ip}:2377"));
    let join_args: Vec<&str> = join.iter().map(String::as_str).collect();

    // n2 and n3 run it.
    for n in ["n2", "n3"] {
        assert_eq!(
            lab.ok(n, &join_args),
            "This node joined a swarm as a worker.\n"
        );
    }
    wait_until(Duration::from_secs(10), || {
        lab.rows("n1").iter().filter(|r| r.1 == "Ready").count() == 3
    });
    let rows = lab.rows("n1");
    assert_eq!(rows.len(), 3);
    let n1_row = rows.iter().find(|r| r.0 == "n1").unwrap();
    assert_eq!((n1_row.2.as_str(), n1_row.3), ("Leader", true));
    assert_eq!(rows.iter().filter(|r| r.3).count(), 1);
    let table = lab.ok("n1", &["node", "ls"]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table
        .lines()
        .any(|l| l.contains(" * ") && l.contains("n1") && l.contains("Leader")));
    // The addresses are the namespaces' own.
    let n2_addr = serde_json::from_str::<serde_json::Value>(
        lab.ok("n1", &["node", "ls", "--format", "json"])
            .lines()
            .find(|l| l.contains("\"n2\""))
            .unwrap(),
    )
    .unwrap()["Addr"]
        .clone();
    assert_eq!(n2_addr, lab.node("n2").ip.to_string());

    // Tokens.
    let worker = lab
        .ok("n1", &["join-token", "-q", "worker"])
        .trim()
        .to_owned();
    let manager = lab
        .ok("n1", &["join-token", "-q", "manager"])
        .trim()
        .to_owned();
    assert_ne!(worker, manager);
    assert_eq!(worker, join[2]);
    lab.ok("n1", &["join-token", "--rotate", "worker"]);
    let err = lab.fails("n4", &join_args);
    assert!(err.contains("A valid join token is necessary"), "{err}");
    let new_token = lab
        .ok("n1", &["join-token", "-q", "worker"])
        .trim()
        .to_owned();
    assert_ne!(new_token, worker);
    lab.ok(
        "n4",
        &["join", "--token", &new_token, &format!("{n1_ip}:2377")],
    );
    wait_until(Duration::from_secs(10), || {
        lab.status("n1", "n4").as_deref() == Some("Ready")
    });
    // Nodes already in stay in.
    assert_eq!(lab.status("n1", "n2").as_deref(), Some("Ready"));

    // leave on n3: Down on n1 within 10 s; rm removes it.
    assert_eq!(lab.ok("n3", &["leave"]), "Node left the swarm.\n");
    let t = wait_until(Duration::from_secs(10), || {
        lab.status("n1", "n3").as_deref() == Some("Down")
    });
    eprintln!("n3 Down on n1 {t:?} after leave");
    lab.ok("n1", &["node", "rm", "n3"]);
    assert_eq!(lab.status("n1", "n3"), None);

    // promote n2: Reachable; demote: blank.
    lab.ok("n1", &["node", "promote", "n2"]);
    wait_until(Duration::from_secs(10), || {
        lab.rows("n1")
            .iter()
            .any(|r| r.0 == "n2" && r.2 == "Reachable")
    });
    lab.ok("n1", &["node", "demote", "n2"]);
    assert!(lab.rows("n1").iter().any(|r| r.0 == "n2" && r.2.is_empty()));

    // kill -9 of n2's agent: Down within 10 s; restart with the same state dir: Ready.
    lab.kill9("n2");
    let t = wait_until(Duration::from_secs(10), || {
        lab.status("n1", "n2").as_deref() == Some("Down")
    });
    eprintln!("n2 Down on n1 {t:?} after kill -9");
    lab.start("n2");
    let t = wait_until(Duration::from_secs(10), || {
        lab.status("n1", "n2").as_deref() == Some("Ready")
    });
    eprintln!("n2 Ready on n1 {t:?} after restart");

    // A second init fails cleanly and changes nothing.
    let before = lab.rows("n1");
    let err = lab.fails("n1", &["init", "--advertise-addr", &n1_ip]);
    assert!(err.contains("already part of a swarm"), "{err}");
    assert_eq!(lab.rows("n1"), before);
}

/// STATUS comes from gossip: a node whose gossip is cut (its watch stream to the manager
/// untouched) turns Down, and Ready again when gossip flows.
#[test]
fn status_follows_gossip() {
    let mut lab = Lab::new(&["g1", "g2", "g3"]);
    for n in ["g1", "g2", "g3"] {
        lab.start(n);
    }
    let g1_ip = lab.node("g1").ip.to_string();
    let init = lab.ok("g1", &["init", "--advertise-addr", &g1_ip]);
    let join = join_words(&init);
    let join_args: Vec<&str> = join.iter().map(String::as_str).collect();

    // g2 advertises a secondary address, which its gossip binds; its watch stream to the
    // manager runs from its primary address.
    let ns = lab.node("g2").ns.clone();
    let o = lab.node("g2").ip.octets();
    let secondary = Ipv4Addr::new(o[0], o[1], o[2], 200).to_string();
    let secondary_cidr = format!("{secondary}/24");
    run(Command::new("ip").args(["-n", &ns, "addr", "add", &secondary_cidr, "dev", "eth0"]));
    let mut g2_join = join_args.clone();
    g2_join.extend(["--advertise-addr", &secondary]);
    lab.ok("g2", &g2_join);
    lab.ok("g3", &join_args);
    wait_until(Duration::from_secs(10), || {
        lab.rows("g1").iter().filter(|r| r.1 == "Ready").count() == 3
    });

    // Cut g2's gossip and nothing else.
    run(Command::new("ip").args(["-n", &ns, "addr", "del", &secondary_cidr, "dev", "eth0"]));
    let t = wait_until(Duration::from_secs(30), || {
        lab.status("g1", "g2").as_deref() == Some("Down")
    });
    eprintln!("g2 Down on g1 {t:?} after its gossip was cut");
    assert_eq!(lab.status("g1", "g3").as_deref(), Some("Ready"));
    // Its control plane still works: the watch stream is not what made it Down.
    assert!(lab.shoal("g2", &["info"]).status.success());

    run(Command::new("ip").args(["-n", &ns, "addr", "add", &secondary_cidr, "dev", "eth0"]));
    let t = wait_until(Duration::from_secs(30), || {
        lab.status("g1", "g2").as_deref() == Some("Ready")
    });
    eprintln!("g2 Ready on g1 {t:?} after gossip flowed again");
}
