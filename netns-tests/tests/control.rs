//! The seed's walkthrough, as a user would run it, across Linux network namespaces: shoal
//! agents in their own namespaces on one bridge (the shared [`Lab`]), driven with the CLI.
//!
//! Needs root (it creates namespaces); fails with a clear message otherwise. The lab's
//! namespaces have unique names, addresses come from 198.18.0.0/15 only, and dropping the
//! lab kills the agents by PID and deletes the namespaces, also on failure. The binary is
//! this package's `netns-shoal`, which is exactly the `shoal` program.

// Test code: helpers may unwrap (clippy.toml allows it only inside #[test] functions).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shoal_netns_tests::{require_root, Lab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A lab with a named shoal agent per namespace; state dirs and sockets in a temp dir.
struct Cluster {
    lab: Lab,
    names: Vec<String>,
    agents: Vec<Option<usize>>,
    root: PathBuf,
}

impl Cluster {
    fn new(names: &[&str]) -> Self {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("shoal-netns-control-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        Cluster {
            lab: Lab::new(names.len()).unwrap(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            agents: vec![None; names.len()],
            root,
        }
    }

    fn idx(&self, name: &str) -> usize {
        self.names.iter().position(|n| n == name).unwrap()
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.lab.ip(self.idx(name))
    }

    fn ns(&self, name: &str) -> String {
        self.lab.ns(self.idx(name))
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.sock"))
    }

    fn start(&mut self, name: &str) {
        let i = self.idx(name);
        assert!(self.agents[i].is_none(), "{name} already running");
        let args: Vec<String> = vec![
            "RUST_LOG=warn".into(),
            BIN.into(),
            "agent".into(),
            "--hostname".into(),
            name.into(),
            "--state-dir".into(),
            self.root.join(name).display().to_string(),
            "--socket".into(),
            self.socket(name).display().to_string(),
        ];
        // `env` execs the agent, so the tracked PID is the agent's.
        self.agents[i] = Some(self.lab.spawn(i, "env", &args).unwrap());
        wait_until(Duration::from_secs(10), || {
            self.shoal(name, &["info"]).status.success()
        });
    }

    fn kill9(&mut self, name: &str) {
        let i = self.idx(name);
        let p = self.agents[i].take().unwrap();
        self.lab.kill(p).unwrap();
    }

    /// Runs the CLI inside the node's namespace.
    fn shoal(&self, name: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(name), BIN, "--socket"])
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

    /// Whether the manager on `on` holds an established connection on 2377 from `from`.
    fn watch_stream_open(&self, on: &str, from: &str) -> bool {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(on),
                "ss",
                "-Htn",
                "state",
                "established",
            ])
            .args(["src", &format!("{}:2377", self.ip(on)), "dst", from])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ss: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        !out.stdout.is_empty()
    }

    /// Milliseconds since `from` last sent on its connection to the manager at `to`:2377 (its
    /// agent sends only keep-alives there, every manager::PING_INTERVAL).
    fn ms_since_send(&self, from: &str, to: &str) -> Option<u64> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(from),
                "ss",
                "-Htin",
                "state",
                "established",
            ])
            .args(["dst", &format!("{}:2377", self.ip(to))])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("lastsnd:")?.parse().ok())
    }

    /// Drops every TCP segment `name` sends to `port` (data, FIN, RST): a blackhole route for
    /// them, in its own namespace (removed with it).
    fn cut_tcp_to_port(&self, name: &str, port: u16) {
        let ns = self.ns(name);
        let port = port.to_string();
        run(Command::new("ip").args([
            "-n",
            &ns,
            "route",
            "add",
            "blackhole",
            "default",
            "table",
            "100",
        ]));
        run(Command::new("ip").args([
            "-n", &ns, "rule", "add", "ipproto", "tcp", "dport", &port, "table", "100", "priority",
            "100",
        ]));
    }

    fn status(&self, on: &str, of: &str) -> Option<String> {
        self.rows(on).into_iter().find(|r| r.0 == of).map(|r| r.1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The lab (dropped after this) kills the agents and deletes the namespaces.
        if !std::thread::panicking() {
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
    let mut lab = Cluster::new(&["n1", "n2", "n3", "n4"]);
    for n in ["n1", "n2", "n3", "n4"] {
        lab.start(n);
    }
    let n1_ip = lab.ip("n1").to_string();

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
    assert_eq!(n2_addr, lab.ip("n2").to_string());

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

    // kill -9 of n2's agent: Down within 10 s (n2's kernel closes its watch stream, which
    // tells the manager at once; `a_crash_is_down_through_gossip` shows gossip alone does it);
    // restart with the same state dir: Ready.
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
    let mut lab = Cluster::new(&["g1", "g2", "g3"]);
    for n in ["g1", "g2", "g3"] {
        lab.start(n);
    }
    let g1_ip = lab.ip("g1").to_string();
    let init = lab.ok("g1", &["init", "--advertise-addr", &g1_ip]);
    let join = join_words(&init);
    let join_args: Vec<&str> = join.iter().map(String::as_str).collect();

    // g2 advertises a secondary address, which its gossip binds; its watch stream to the
    // manager runs from its primary address.
    let ns = lab.ns("g2");
    let o = lab.ip("g2").octets();
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

/// A crashed node is Down through gossip, not only because its watch stream ended: c2's
/// namespace drops everything it sends to port 2377 (so its kernel's FIN and RSTs never reach
/// the manager) and its agent is killed with SIGKILL. The manager's stream from c2 then stays
/// open until its keep-alive times out (manager::PING_TIMEOUT, 6 s after the last one, which
/// the test cuts right after); gossip, with four members to confirm the suspicion (3.4 to 4.4 s
/// here), must make c2 Down before that, while c1 still holds the stream.
#[test]
fn a_crash_is_down_through_gossip() {
    let names = ["c1", "c2", "c3", "c4", "c5"];
    let mut lab = Cluster::new(&names);
    for n in names {
        lab.start(n);
    }
    let c1_ip = lab.ip("c1").to_string();
    let init = lab.ok("c1", &["init", "--advertise-addr", &c1_ip]);
    let join = join_words(&init);
    let join_args: Vec<&str> = join.iter().map(String::as_str).collect();
    for n in &names[1..] {
        lab.ok(n, &join_args);
    }
    wait_until(Duration::from_secs(15), || {
        lab.rows("c1").iter().filter(|r| r.1 == "Ready").count() == names.len()
    });
    let c2_ip = lab.ip("c2").to_string();
    assert!(
        lab.watch_stream_open("c1", &c2_ip),
        "c2's watch stream on c1"
    );

    // Right after a keep-alive, so the stream on c1 lives its whole PING_TIMEOUT from here.
    wait_until(Duration::from_secs(5), || {
        lab.ms_since_send("c2", "c1").is_some_and(|ms| ms < 200)
    });
    lab.cut_tcp_to_port("c2", 2377);
    lab.kill9("c2");
    let t = wait_until(Duration::from_secs(10), || {
        lab.status("c1", "c2").as_deref() == Some("Down")
    });
    let open = lab.watch_stream_open("c1", &c2_ip);
    eprintln!("c2 Down on c1 {t:?} after kill -9 (its watch stream still open there: {open})");
    assert!(
        open,
        "c2 turned Down only when its watch stream on c1 ended ({t:?}): STATUS did not come \
         from gossip"
    );
    for n in ["c3", "c4", "c5"] {
        assert_eq!(lab.status("c1", n).as_deref(), Some("Ready"), "{n}");
    }
}
