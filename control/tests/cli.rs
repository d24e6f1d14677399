//! End-to-end tests of the `shoal` binary: real agents on loopback addresses, each with its
//! own temporary state dir and socket, driven by the CLI as a user would.
//!
//! Every test picks its own 127.x.y.0/24 block from its PID and a counter, so tests running
//! in parallel never share an address. Agents are killed by PID when the test ends, also on
//! failure.

// Test code: helpers may unwrap (clippy.toml allows it only inside #[test] functions).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shoal");
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A block of loopback addresses for one test.
fn block() -> [u8; 2] {
    let n = std::process::id()
        .wrapping_mul(31)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    [(n >> 8) as u8 | 1, n as u8]
}

struct Node {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    ip: Ipv4Addr,
    child: Option<Child>,
}

impl Node {
    fn new(root: &Path, name: &str, ip: Ipv4Addr) -> Self {
        let node = Self {
            name: name.to_owned(),
            dir: root.join(name),
            socket: root.join(format!("{name}.sock")),
            ip,
            child: None,
        };
        std::fs::create_dir_all(&node.dir).unwrap();
        node
    }

    fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Starts the agent with extra `agent` flags.
    fn start_with(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let child = Command::new(BIN)
            .args([
                "agent",
                "--no-data-path",
                "--hostname",
                &self.name,
                "--state-dir",
            ])
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Wait (bounded) until the socket answers.
        wait_until(Duration::from_secs(10), || {
            self.shoal(&["info"]).status.success()
        });
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL, by PID
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "agent exited with {status}");
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent {} did not stop within 10 s of SIGTERM", self.name);
        }
    }

    fn shoal(&self, args: &[&str]) -> Output {
        shoal_at(&self.socket, args)
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "{} {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            !out.status.success(),
            "{} {:?} should have failed",
            self.name,
            args
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "expected one line: {err:?}"
        );
        err.trim_end().to_owned()
    }

    fn info(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["info"])).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `shoal` against the agent on `socket`.
fn shoal_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("condition not met within {limit:?}");
}

/// The value of the sample `name{labels}` on a metrics page.
fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `node ls --format json` as (hostname, status, manager status, self) rows.
fn rows(node: &Node) -> Vec<(String, String, String, bool)> {
    node.ok(&["node", "ls", "--format", "json"])
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

fn status_of(node: &Node, host: &str) -> Option<String> {
    rows(node).into_iter().find(|r| r.0 == host).map(|r| r.1)
}

fn join_command(init_output: &str) -> Vec<String> {
    let line = init_output
        .lines()
        .find(|l| l.trim_start().starts_with("shoal join --token"))
        .expect("init prints a join command");
    line.split_whitespace().skip(1).map(str::to_owned).collect()
}

fn cluster(names: &[&str]) -> (tempfile::TempDir, Vec<Node>) {
    let root = tempfile::tempdir().unwrap();
    let [a, b] = block();
    let mut nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Node::new(root.path(), n, Ipv4Addr::new(127, a, b, i as u8 + 1)))
        .collect();
    for n in &mut nodes {
        n.start();
    }
    (root, nodes)
}

fn init(n1: &Node) -> String {
    init_with(n1, &[])
}

/// `init` with more flags.
fn init_with(n1: &Node, flags: &[&str]) -> String {
    let listen = format!("{}:2377", n1.ip);
    let ip = n1.ip.to_string();
    let mut args = vec!["init", "--advertise-addr", &ip, "--listen-addr", &listen];
    args.extend(flags);
    let out = n1.ok(&args);
    let id = n1.info()["node_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 25);
    assert!(out.starts_with(&format!(
        "Swarm initialized: current node ({id}) is now a manager.\n\nTo add a worker to this swarm, run the following command:\n\n    shoal join --token SWMTKN-1-"
    )), "{out}");
    assert!(out.contains(&format!(" {listen}\n\nTo add a manager to this swarm, run 'shoal join-token manager' and follow the instructions.\n")));
    out
}

/// `join --token TOKEN ADDR` on `node`, which must succeed.
fn join_ok(node: &Node, token: &str, addr: &str) {
    let out = join(
        node,
        &["join".into(), "--token".into(), token.into(), addr.into()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn join(node: &Node, cmd: &[String]) -> Output {
    let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let ip = node.ip.to_string();
    args.extend(["--advertise-addr", &ip]);
    node.shoal(&args)
}

#[test]
fn walkthrough_on_loopback() {
    let (_root, mut nodes) = cluster(&["n1", "n2", "n3"]);
    let init_out = init(&nodes[0]);
    let cmd = join_command(&init_out);
    for n in &nodes[1..] {
        let out = join(n, &cmd);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "This node joined a swarm as a worker.\n"
        );
    }
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    // Three Ready, n1 the starred leader.
    wait_until(Duration::from_secs(10), || {
        rows(n1).iter().filter(|r| r.1 == "Ready").count() == 3
    });
    let table = n1.ok(&["node", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0]
            .split("   ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>(),
        [
            "ID",
            "HOSTNAME",
            "STATUS",
            "AVAILABILITY",
            "MANAGER STATUS",
            "ENGINE VERSION"
        ]
    );
    let n1_line = lines.iter().find(|l| l.contains(" n1 ")).unwrap();
    assert!(
        n1_line.contains(" * ") && n1_line.contains("Leader"),
        "{table}"
    );
    assert_eq!(lines.iter().filter(|l| l.contains('*')).count(), 1);

    // node inspect: by hostname or ID prefix, a JSON array of one node.
    let n2_id = n2.info()["node_id"].as_str().unwrap().to_owned();
    for name in ["n2", &n2_id[..6]] {
        let v: serde_json::Value =
            serde_json::from_str(&n1.ok(&["node", "inspect", name])).unwrap();
        assert_eq!(v[0]["id"], n2_id.as_str());
        assert_eq!(v[0]["hostname"], "n2");
        assert_eq!(v[0]["addr"], n2.ip.to_string());
        assert_eq!(v[0]["role"], "worker");
        assert_eq!(v[0]["status"], "Ready");
        assert_eq!(v[0]["public_key"], n2.info()["public_key"]);
    }
    let err = n1.fails(&["node", "inspect", "nope"]);
    assert!(err.contains("node nope not found"), "{err}");

    // Manager-only commands on a worker: docker's message.
    let err = n2.fails(&["node", "ls"]);
    assert!(
        err.contains("This node is not a swarm manager. Worker nodes can't be used"),
        "{err}"
    );

    // Tokens: the manager token differs; -q prints the token alone.
    let worker = n1.ok(&["join-token", "-q", "worker"]).trim().to_owned();
    let manager = n1.ok(&["join-token", "-q", "manager"]).trim().to_owned();
    assert_ne!(worker, manager);
    assert_eq!(worker, cmd[2]);
    assert_eq!(worker[..59], manager[..59], "same CA digest");
    let full = n1.ok(&["join-token", "manager"]);
    assert!(full.starts_with("To add a manager to this swarm, run the following command:\n\n    shoal join --token SWMTKN-1-"));

    // Rotate: the old worker token is refused at once, nodes already in stay in.
    let rotated = n1.ok(&["join-token", "--rotate", "worker"]);
    assert!(rotated.starts_with("Successfully rotated worker join token.\n"));
    let new_worker = n1.ok(&["join-token", "-q", "worker"]).trim().to_owned();
    assert_ne!(new_worker, worker);
    let root = nodes[0].dir.parent().unwrap().to_owned();
    let mut n4 = Node::new(
        &root,
        "n4",
        Ipv4Addr::new(127, nodes[0].ip.octets()[1], nodes[0].ip.octets()[2], 4),
    );
    n4.start();
    let err = n4.fails(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("A valid join token is necessary"), "{err}");
    assert_eq!(
        n4.info()["node_id"],
        serde_json::Value::Null,
        "nothing kept"
    );
    let mut new_cmd = cmd.clone();
    new_cmd[2] = new_worker;
    assert!(join(&n4, &new_cmd).status.success());
    wait_until(Duration::from_secs(10), || {
        status_of(n1, "n4").as_deref() == Some("Ready")
    });
    // The join reached every node: all hold the leader's current view.
    let leader_version = n1.info()["view_version"].clone();
    for n in [n2, n3, &n4] {
        wait_until(Duration::from_secs(10), || {
            n.info()["view_version"] == leader_version
        });
    }
    assert_eq!(status_of(n1, "n2").as_deref(), Some("Ready"));

    // Leave on n3: Down on n1 within 10 s; then rm removes it.
    assert_eq!(n3.ok(&["leave"]), "Node left the swarm.\n");
    wait_until(Duration::from_secs(10), || {
        status_of(n1, "n3").as_deref() == Some("Down")
    });
    let n3_err = n3.fails(&["leave"]);
    assert!(n3_err.contains("not part of a swarm"), "{n3_err}");
    // rm of a node that is up is refused without --force.
    let err = n1.fails(&["node", "rm", "n4"]);
    assert!(err.contains("is not down and can't be removed"), "{err}");
    n1.ok(&["node", "rm", "n3"]);
    assert_eq!(status_of(n1, "n3"), None);

    // Promote n2: Reachable, and it can run manager commands; demote: blank again.
    assert_eq!(
        n1.ok(&["node", "promote", "n2"]),
        "Node n2 promoted to a manager in the swarm.\n"
    );
    wait_until(Duration::from_secs(10), || {
        rows(n1).iter().any(|r| r.0 == "n2" && r.2 == "Reachable")
    });
    wait_until(Duration::from_secs(10), || {
        n2.shoal(&["node", "ls"]).status.success()
    });
    assert!(
        rows(n2).iter().any(|r| r.0 == "n2" && r.3),
        "n2 starred on n2"
    );
    assert_eq!(
        n1.ok(&["node", "promote", "n2"]),
        "Node n2 is already a manager.\n"
    );
    assert_eq!(
        n1.ok(&["node", "demote", "n2"]),
        "Manager n2 demoted in the swarm.\n"
    );
    assert!(rows(n1).iter().any(|r| r.0 == "n2" && r.2.is_empty()));
    let err = n1.fails(&["node", "demote", "n1"]);
    assert!(
        err.contains("attempting to demote the last manager of the swarm"),
        "{err}"
    );

    // kill -9 of n2's agent: Down within 10 s; a restart with the same state: Ready, no token.
    let n2_id = nodes[1].info()["node_id"].clone();
    nodes[1].kill9();
    wait_until(Duration::from_secs(10), || {
        status_of(&nodes[0], "n2").as_deref() == Some("Down")
    });
    nodes[1].start();
    assert_eq!(nodes[1].info()["node_id"], n2_id, "same node after restart");
    wait_until(Duration::from_secs(10), || {
        status_of(&nodes[0], "n2").as_deref() == Some("Ready")
    });

    // rm --force of a running node: it notices, leaves the swarm on its own, and its old
    // certificate no longer opens anything.
    nodes[0].ok(&["node", "rm", "--force", "n4"]);
    assert_eq!(status_of(&nodes[0], "n4"), None);
    wait_until(Duration::from_secs(10), || {
        n4.info()["node_id"] == serde_json::Value::Null
    });
    let err = n4.fails(&["leave"]);
    assert!(err.contains("not part of a swarm"), "{err}");

    // A manager restart loses nothing.
    let before = rows(&nodes[0]);
    nodes[0].kill9();
    nodes[0].start();
    wait_until(Duration::from_secs(10), || rows(&nodes[0]) == before);

    // A second init fails cleanly; leave of the last manager needs --force.
    let err = nodes[0].fails(&["init", "--advertise-addr", "127.0.0.1"]);
    assert!(err.contains("already part of a swarm"), "{err}");
    let err = nodes[0].fails(&["leave"]);
    assert!(err.contains("Use `--force`"), "{err}");
    assert_eq!(rows(&nodes[0]), before, "nothing changed");

    // A clean SIGTERM stop.
    nodes[0].terminate();
    drop(n4);
}

#[test]
fn join_errors_keep_nothing() {
    let (_root, nodes) = cluster(&["m", "w", "other"]);
    let (m, w, other) = (&nodes[0], &nodes[1], &nodes[2]);
    let cmd = join_command(&init(m));
    let token = cmd[2].clone();
    let addr = cmd[3].clone();

    // Malformed tokens: one clear line each.
    for (bad, want) in [
        ("nonsense", "must start with SWMTKN-"),
        (&token[..token.len() - 1], "the secret has 24 characters"),
        (
            &token.replace("SWMTKN-1-", "SWMTKN-2-"),
            "unsupported version",
        ),
    ] {
        let err = w.fails(&["join", "--token", bad, &addr]);
        assert!(err.contains(want), "{bad}: {err}");
    }

    // A token of another swarm: the CA digest does not match; the secret is never sent.
    let other_cmd = {
        let listen = format!("{}:2377", other.ip);
        let out = other.ok(&[
            "init",
            "--advertise-addr",
            &other.ip.to_string(),
            "--listen-addr",
            &listen,
        ]);
        join_command(&out)
    };
    let err = w.fails(&["join", "--token", &other_cmd[2], &addr]);
    assert!(
        err.contains("does not hold the swarm CA named in the token"),
        "{err}"
    );

    // A manager that does not answer.
    let dead = format!("{}:2399", m.ip);
    let err = w.fails(&["join", "--token", &token, &dead]);
    assert!(err.contains("could not reach the manager"), "{err}");

    // Nothing kept after all of that; the right token still works.
    assert_eq!(w.info()["node_id"], serde_json::Value::Null);
    assert_eq!(rows(m).len(), 1);
    assert!(w
        .shoal(&["join", "--token", &token, &addr])
        .status
        .success());
    assert_eq!(rows(m).len(), 2);
    let err = w.fails(&["join", "--token", &token, &addr]);
    assert!(err.contains("already part of a swarm"), "{err}");
}

#[test]
fn no_agent_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(root.path().join("none.sock"))
        .args(["node", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("Cannot connect to the shoal agent at unix://"),
        "{err}"
    );
}

#[test]
fn not_in_a_swarm_errors() {
    let (_root, nodes) = cluster(&["solo"]);
    let err = nodes[0].fails(&["node", "ls"]);
    assert!(
        err.contains("Use \"shoal init\" or \"shoal join\""),
        "{err}"
    );
    let err = nodes[0].fails(&["join-token", "worker"]);
    assert!(err.contains("not a swarm manager"), "{err}");
    let err = nodes[0].fails(&[
        "init",
        "--advertise-addr",
        "127.0.0.1",
        "--ingress-subnet",
        "10.0.0.1/24",
    ]);
    assert!(err.contains("host bits are set"), "{err}");
    assert_eq!(nodes[0].info()["node_id"], serde_json::Value::Null);

    // A reader that goes away (`shoal info | head -1`) is no crash.
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&nodes[0].socket)
        .arg("info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

#[test]
fn keys_rotate_and_reach_every_node() {
    let (_root, nodes) = cluster(&["k1", "k2"]);
    let (k1, k2) = (&nodes[0], &nodes[1]);
    let listen = format!("{}:2377", k1.ip);
    let out = k1.ok(&[
        "init",
        "--advertise-addr",
        &k1.ip.to_string(),
        "--listen-addr",
        &listen,
        "--key-rotation-interval",
        "20s",
    ]);
    assert!(join(k2, &join_command(&out)).status.success());
    let epochs = |n: &Node| -> Vec<u64> {
        n.info()["data_path_epochs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    // Two epochs live (previous and current), and the worker follows the rotations.
    wait_until(Duration::from_secs(45), || {
        let e = epochs(k2);
        e.len() == 2 && e[1] >= 2 && e[1] == e[0] + 1
    });
    let info = k2.info();
    assert_eq!(info["gossip_key_ids"].as_array().unwrap().len(), 2);
    // Gossip runs under the rotated key: once both nodes seal with it, what each sends opens
    // at the other (datagrams opened keep growing) and nothing fails to open.
    let sealing = |n: &Node| {
        n.info()["gossip_keys_live"]["sealing"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), || {
        sealing(k1) >= 2 && sealing(k2) >= 2
    });
    let counts = |n: &Node| {
        let g = &n.info()["gossip"];
        let get = |k: &str| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("no gossip.{k}: {g}"))
        };
        (get("datagrams_opened"), get("dropped_seal"))
    };
    let before = [counts(k1), counts(k2)];
    wait_until(Duration::from_secs(10), || {
        [counts(k1), counts(k2)]
            .iter()
            .zip(&before)
            .all(|(now, then)| now.0 >= then.0 + 5)
    });
    let after = [counts(k1), counts(k2)];
    for (name, (now, then)) in ["k1", "k2"].iter().zip(after.iter().zip(&before)) {
        assert_eq!(
            now.1, then.1,
            "{name}: gossip datagrams failed to open under the rotated key"
        );
    }
}

#[test]
fn garbage_on_the_api_port_and_socket_is_refused() {
    use std::io::{Read, Write};
    let (_root, nodes) = cluster(&["g1"]);
    let g1 = &nodes[0];
    init(g1);
    let junk: [&[u8]; 3] = [
        b"\x16\x03\x01\x00\x05hello",
        b"GET / HTTP/1.1\r\n\r\n",
        &[0xff; 64],
    ];
    for bytes in junk {
        let mut tcp = std::net::TcpStream::connect((g1.ip, 2377)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = tcp.write_all(bytes);
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf); // the manager closes; bounded by the timeout
    }
    for bytes in [&u32::MAX.to_be_bytes()[..], b"\x00\x00\x00\x03{x}"] {
        let mut unix = std::os::unix::net::UnixStream::connect(&g1.socket).unwrap();
        unix.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        unix.write_all(bytes).unwrap();
        let mut buf = Vec::new();
        let _ = unix.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("bad request"), "{text}");
    }
    // The agent and the manager are still fine.
    assert_eq!(rows(g1).len(), 1);
}

#[test]
fn json_logs_and_metrics_on_loopback() {
    let root = tempfile::tempdir().unwrap();
    let [a, b] = block();
    let ip = Ipv4Addr::new(127, a, b, 1);
    let mut n1 = Node::new(root.path(), "n1", ip);
    let metrics_addr = format!("{ip}:9323");
    n1.start_with(&["--log-format", "json", "--metrics-addr", &metrics_addr]);
    init(&n1);

    let scrape = || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&metrics_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: shoal\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        c.read_to_string(&mut page).unwrap();
        page
    };
    let page = scrape();
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("role=\"manager\""), "{page}");
    assert!(page.contains("shoal_cluster_view_version"), "{page}");
    // The gossip figures appear once gossip runs (it starts with the swarm).
    wait_until(Duration::from_secs(10), || {
        scrape().contains("shoal_gossip_bytes_total")
    });
    assert!(page.trim_end().ends_with("# EOF"), "{page}");

    // Members by state, with the names `info` uses (`MemberState`'s): a worker that joins is
    // counted `up`.
    let mut n2 = Node::new(root.path(), "n2", Ipv4Addr::new(127, a, b, 2));
    n2.start();
    let token = n1.ok(&["join-token", "worker"]);
    assert!(join(&n2, &join_command(&token)).status.success());
    let members = |state: &str| {
        sample(
            &scrape(),
            &format!("shoal_gossip_members{{state=\"{state}\"}}"),
        )
    };
    wait_until(Duration::from_secs(20), || members("up") == Some(1.0));
    for state in ["suspect", "down"] {
        assert_eq!(members(state), Some(0.0), "{state} in\n{}", scrape());
    }

    // Gossip's own rare lines go through the agent's log too: three idle connections from
    // one address to the push-pull port trip its per-address cap (two), and the refusal line
    // it writes must be JSON like every other.
    let idle: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect((ip, 7946)).unwrap())
        .collect();
    let log_path = n1.dir.with_extension("log");
    wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("push-pull connections"))
    });
    drop(idle);

    // Every log line is one JSON object; init's line is there with its fields.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string()));
    let init_line = lines
        .iter()
        .find(|l| l["message"] == "swarm initialized")
        .unwrap_or_else(|| panic!("no init line in {log}"));
    assert!(init_line["node"].is_string(), "{init_line}");
    assert!(lines
        .iter()
        .any(|l| l["message"] == "metrics at http://".to_owned() + &metrics_addr + "/metrics"));
}

/// The local socket: mode 0600 from the start, and even with its mode loosened by hand, a
/// user who is not root, the agent's user or in `--socket-group` is refused by the agent
/// itself, with one line, and counted.
#[test]
fn the_socket_is_private_and_refuses_other_users() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let (root, nodes) = cluster(&["s1"]);
    let s1 = &nodes[0];
    let mode = std::fs::metadata(&s1.socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Let `nobody` reach the socket file: the agent's own check must still refuse it.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&s1.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "--socket",
        ])
        .arg(&s1.socket)
        .arg("info")
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Root still gets in.
    assert!(s1.info()["hostname"].as_str() == Some("s1"));
    // A --socket-group that does not exist: the agent says so and does not start.
    let out = Command::new(BIN)
        .args(["agent", "--no-data-path", "--hostname", "s2", "--state-dir"])
        .arg(root.path().join("s2-state"))
        .arg("--socket")
        .arg(root.path().join("s2.sock"))
        .args(["--socket-group", "no-such-group-shoal"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-group-shoal") && err.contains("does not exist"),
        "{err}"
    );
}

/// Certificates expire (`init --cert-expiry`) and every node renews its own with a third of
/// the lifetime left, the leader included; the swarm goes on working on the new ones.
#[test]
fn certificates_are_renewed_before_they_expire() {
    let (_root, nodes) = cluster(&["c1", "c2"]);
    let (c1, c2) = (&nodes[0], &nodes[1]);
    let listen = format!("{}:2377", c1.ip);
    let out = c1.ok(&[
        "init",
        "--advertise-addr",
        &c1.ip.to_string(),
        "--listen-addr",
        &listen,
        "--cert-expiry",
        "60s",
    ]);
    assert!(join(c2, &join_command(&out)).status.success());
    let expiry = |n: &Node| n.info()["cert_not_after"].as_u64().unwrap();
    let (e1, e2) = (expiry(c1), expiry(c2));
    // Renewal is due with 20 s left, 40 s after issue.
    wait_until(Duration::from_secs(55), || {
        expiry(c1) > e1 && expiry(c2) > e2
    });
    // The worker still follows the leader over the renewed certificates.
    let version = c2.info()["view_version"].as_u64().unwrap();
    c1.ok(&["join-token", "--rotate", "worker"]);
    wait_until(Duration::from_secs(10), || {
        c2.info()["view_version"].as_u64().unwrap() > version
    });
    assert_eq!(status_of(c1, "c2").as_deref(), Some("Ready"));
    // A lifetime shorter than the minimum is refused with one line.
    let (_root2, more) = cluster(&["c3"]);
    let err = more[0].fails(&[
        "init",
        "--advertise-addr",
        &more[0].ip.to_string(),
        "--cert-expiry",
        "10s",
    ]);
    assert!(err.contains("--cert-expiry 10s is too short"), "{err}");
    let err = more[0].fails(&[
        "init",
        "--advertise-addr",
        &more[0].ip.to_string(),
        "--key-rotation-interval",
        "5s",
    ]);
    assert!(
        err.contains("--key-rotation-interval 5s is too short"),
        "{err}"
    );
}

/// A manager's state digest (`info`), `None` on a worker.
fn state_digest(n: &Node) -> Option<String> {
    n.info()["state_digest"].as_str().map(str::to_owned)
}

/// MANAGER STATUS of `host` in `node ls` on `n`.
fn manager_status(n: &Node, host: &str) -> Option<String> {
    rows(n).into_iter().find(|r| r.0 == host).map(|r| r.2)
}

/// `init` (with `init_flags`) on the first node, the next two join as managers and the fourth
/// as a worker; waits until the first (the leader) sees the other managers reachable.
fn three_managers_and_a_worker(nodes: &[Node], init_flags: &[&str]) {
    let init_out = init_with(&nodes[0], init_flags);
    let manager_token = nodes[0]
        .ok(&["join-token", "-q", "manager"])
        .trim()
        .to_owned();
    let addr = format!("{}:2377", nodes[0].ip);
    for n in &nodes[1..3] {
        join_ok(n, &manager_token, &addr);
    }
    assert!(join(&nodes[3], &join_command(&init_out)).status.success());
    wait_until(Duration::from_secs(15), || {
        [&nodes[1].name, &nodes[2].name]
            .iter()
            .all(|h| manager_status(&nodes[0], h).as_deref() == Some("Reachable"))
    });
    assert_eq!(
        manager_status(&nodes[0], &nodes[0].name).as_deref(),
        Some("Leader")
    );
}

/// Three managers and a worker on loopback: `kill -9` of the leader, and the two left elect a
/// new one (docker's `Leader` moves), a rotation commits on a follower's word, a new worker
/// joins through a surviving manager; the old leader, restarted, rejoins as a follower. Then
/// two of three managers gone: every admin command gets docker's one line within 2 s, and
/// with one back, writes resume.
#[test]
fn managers_elect_a_new_leader_and_refuse_without_quorum() {
    let (_root, mut nodes) = cluster(&["m1", "m2", "m3", "w1", "w2"]);
    three_managers_and_a_worker(&nodes, &[]);
    let status = manager_status;
    // Any manager answers admin commands, and sees the same leader.
    wait_until(Duration::from_secs(10), || {
        status(&nodes[2], "m1").as_deref() == Some("Leader")
    });

    // The leader dies: a new one within 3 s (the command retries inside its own 2 s).
    nodes[0].kill9();
    let killed = Instant::now();
    let mut rotated = None;
    while killed.elapsed() < Duration::from_secs(10) {
        if nodes[1]
            .shoal(&["join-token", "--rotate", "worker"])
            .status
            .success()
        {
            rotated = Some(killed.elapsed());
            break;
        }
    }
    let rotated = rotated.unwrap_or_else(|| {
        // What the survivors' Raft said, for whoever reads the failure.
        for n in &nodes[1..3] {
            let log = std::fs::read_to_string(n.dir.with_extension("log")).unwrap_or_default();
            let raft: Vec<&str> = log.lines().filter(|l| l.contains("raft")).collect();
            eprintln!(
                "--- {} ---\n{}",
                n.name,
                raft[raft.len().saturating_sub(40)..].join("\n")
            );
        }
        panic!("a rotation commits after the leader died")
    });
    assert!(rotated < Duration::from_secs(5), "{rotated:?}");
    let leader = |n: &Node| rows(n).into_iter().find(|r| r.2 == "Leader").map(|r| r.0);
    // MANAGER STATUS is a moment's sight: a leader shows once it has heard from a quorum
    // within the lease, which a loaded machine can miss for a beat.
    let mut new_leader = None;
    wait_until(Duration::from_secs(5), || {
        new_leader = leader(&nodes[1]);
        new_leader.is_some()
    });
    let new_leader = new_leader.unwrap_or_default();
    assert_ne!(new_leader, "m1");
    wait_until(Duration::from_secs(5), || {
        status(&nodes[2], "m1").as_deref() == Some("Unreachable")
    });
    // A new worker joins through a surviving manager, with the rotated token.
    let token = nodes[2]
        .ok(&["join-token", "-q", "worker"])
        .trim()
        .to_owned();
    let via = format!("{}:2377", nodes[2].ip);
    join_ok(&nodes[4], &token, &via);
    wait_until(Duration::from_secs(10), || {
        status_of(&nodes[1], "w2").as_deref() == Some("Ready")
    });
    // The worker that followed m1 moved to another manager: it has the newest view.
    let version = nodes[1].info()["view_version"].clone();
    wait_until(Duration::from_secs(10), || {
        nodes[3].info()["view_version"] == version
    });

    // The old leader comes back as a follower with the state it missed.
    nodes[0].start();
    wait_until(Duration::from_secs(10), || {
        status(&nodes[0], "m1").as_deref() == Some("Reachable")
            && leader(&nodes[0]).as_deref() == Some(new_leader.as_str())
    });
    wait_until(Duration::from_secs(10), || {
        status_of(&nodes[0], "w2").as_deref() == Some("Ready")
    });

    // Two of three managers gone: docker's line, within 2 s, for every admin write.
    let (survivor, others) = if new_leader == "m2" {
        (2, [0, 1])
    } else {
        (1, [0, 2])
    };
    for i in others {
        nodes[i].kill9();
    }
    let asked = Instant::now();
    let err = nodes[survivor].fails(&["join-token", "--rotate", "worker"]);
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        err,
        "Error response from daemon: The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online."
    );
    let err = nodes[survivor].fails(&["node", "promote", "w1"]);
    assert!(err.contains("does not have a leader"), "{err}");
    // One back: a quorum again, writes resume.
    nodes[others[0]].start();
    wait_until(Duration::from_secs(10), || {
        nodes[survivor]
            .shoal(&["join-token", "--rotate", "worker"])
            .status
            .success()
    });
}

/// Two of three managers lost for good: `init --force-new-cluster` on the last one makes it
/// the one manager of a swarm with the state it had (nodes, tokens, keys), within 5 s; the
/// lost managers are workers in it; the worker follows on; a lost manager that comes back
/// cannot disturb the new group (its manager certificate no longer opens the managers'
/// channel). Refusals: on a worker, while there is a leader, and with flags of a new swarm.
#[test]
fn force_new_cluster_on_the_last_manager() {
    let (_root, mut nodes) = cluster(&["f1", "f2", "f3", "fw"]);
    three_managers_and_a_worker(&nodes, &[]);
    wait_until(Duration::from_secs(10), || {
        status_of(&nodes[0], "fw").as_deref() == Some("Ready")
    });
    let token_before = nodes[1].ok(&["join-token", "-q", "worker"]);
    // On a worker, with docker's words; with another init flag, clap's.
    let err = nodes[3].fails(&["init", "--force-new-cluster"]);
    assert!(err.contains("This node is not a swarm manager."), "{err}");
    let out = nodes[0].shoal(&[
        "init",
        "--force-new-cluster",
        "--advertise-addr",
        "127.0.0.1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot be used with"),
        "{err}"
    );

    // Not while there is a leader: two groups would go their own ways.
    let err = nodes[1].fails(&["init", "--force-new-cluster"]);
    assert!(err.contains("the swarm has a leader"), "{err}");
    // The leader f1 and f3 are lost; f2, a follower, survives (from here nodes[0]).
    nodes.swap(0, 1);
    nodes[1].kill9();
    nodes[2].kill9();
    let err = nodes[0].fails(&["join-token", "--rotate", "worker"]);
    assert!(err.contains("does not have a leader"), "{err}");

    let forced = Instant::now();
    let out = nodes[0].ok(&["init", "--force-new-cluster"]);
    let id = nodes[0].info()["node_id"].as_str().unwrap().to_owned();
    assert!(
        out.contains(&format!(
            "Swarm initialized: current node ({id}) is now a manager."
        )),
        "{out}"
    );
    // A write commits on the new group of one.
    wait_until(Duration::from_secs(5), || {
        nodes[0]
            .shoal(&["join-token", "--rotate", "worker"])
            .status
            .success()
    });
    let took = forced.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    let token_after = nodes[0].ok(&["join-token", "-q", "worker"]);
    assert_ne!(token_before, token_after);
    let ls = rows(&nodes[0]);
    let mut hosts: Vec<(&str, &str)> = ls.iter().map(|r| (r.0.as_str(), r.2.as_str())).collect();
    hosts.sort_unstable();
    assert_eq!(
        hosts,
        [("f1", ""), ("f2", "Leader"), ("f3", ""), ("fw", "")],
        "{ls:?}"
    );
    // The worker follows the new group (a later generation, whatever the versions).
    let version = nodes[0].info()["view_version"].clone();
    wait_until(Duration::from_secs(10), || {
        nodes[3].info()["view_version"] == version
    });
    assert_eq!(status_of(&nodes[0], "fw").as_deref(), Some("Ready"));

    // A lost manager comes back: the new group goes on without it.
    nodes[1].start();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(manager_status(&nodes[0], "f2").as_deref(), Some("Leader"));
    assert_eq!(manager_status(&nodes[0], "f1").as_deref(), Some(""));
    nodes[0].ok(&["join-token", "--rotate", "worker"]);
    // A manager added to the new group gets its state (from a snapshot: the new group's log
    // does not hold it).
    nodes[0].ok(&["node", "promote", "fw"]);
    wait_until(Duration::from_secs(15), || {
        manager_status(&nodes[0], "fw").as_deref() == Some("Reachable")
    });
    wait_until(Duration::from_secs(10), || {
        state_digest(&nodes[3]).is_some() && state_digest(&nodes[3]) == state_digest(&nodes[0])
    });
}

/// The no-lost-writes check: a client adds external VTEPs through the managers in turn, as
/// fast as they answer, while the leader is killed (`kill -9`) and restarted three times.
/// Every write acknowledged is in the final state on every manager, and once healed the
/// managers' states are byte-equal (same digest). (`benches/managers/` runs it longer.)
#[test]
fn no_acknowledged_write_is_lost_when_leaders_die() {
    let (_root, mut nodes) = cluster(&["l1", "l2", "l3", "lw"]);
    three_managers_and_a_worker(&nodes, &["--no-encrypt", "--ingress-subnet", "10.9.0.0/16"]);
    let sockets: Vec<PathBuf> = nodes[..3].iter().map(|n| n.socket.clone()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut acked, mut failed) = (Vec::new(), 0u32);
            for i in 0u32..60_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 1, 0)) + i);
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 1, 0)) + i);
                let mac = format!("02:42:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
                let socket = &sockets[i as usize % sockets.len()];
                let (ip_s, addr_s) = (ip.to_string(), addr.to_string());
                let out = shoal_at(
                    socket,
                    &[
                        "network", "vtep", "add", "ingress", "--addr", &addr_s, "--mac", &mac,
                        "--ip", &ip_s,
                    ],
                );
                if out.status.success() {
                    acked.push(ip_s);
                } else {
                    failed += 1;
                }
            }
            (acked, failed)
        })
    };
    let leader = |nodes: &[Node]| {
        nodes[..3].iter().position(|n| {
            n.child.is_some() && manager_status(n, &n.name).as_deref() == Some("Leader")
        })
    };
    for round in 0..3 {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = leader(&nodes);
            found.is_some()
        });
        let i = found.unwrap_or_default();
        std::thread::sleep(Duration::from_millis(700));
        nodes[i].kill9();
        eprintln!("round {round}: killed the leader {}", nodes[i].name);
        std::thread::sleep(Duration::from_secs(3));
        nodes[i].start();
        let name = nodes[i].name.clone();
        let other = &nodes[(i + 1) % 3];
        wait_until(Duration::from_secs(15), || {
            manager_status(other, &name).as_deref() == Some("Reachable")
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.join().unwrap();
    eprintln!(
        "{} writes acknowledged, {failed} refused or unanswered",
        acked.len()
    );
    assert!(
        acked.len() >= 20,
        "too few writes to tell anything: {}",
        acked.len()
    );
    // Healed: every manager applies the same log to the same state.
    let digest = state_digest;
    wait_until(Duration::from_secs(20), || {
        let d: Vec<_> = nodes[..3].iter().map(digest).collect();
        d[0].is_some() && d.iter().all(|x| *x == d[0])
    });
    for n in &nodes[..3] {
        let out = n.ok(&["network", "inspect", "ingress"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let have: std::collections::HashSet<&str> = v[0]["vteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["ip"].as_str().unwrap())
            .collect();
        let lost: Vec<&String> = acked
            .iter()
            .filter(|ip| !have.contains(ip.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "{}: acknowledged but lost: {lost:?}",
            n.name
        );
    }
}

/// A manager that joins a swarm whose state is larger than the API's 4 MiB frame limit gets
/// it: the state travels as a snapshot, in chunks of 512 KiB. (How long it takes is measured
/// in release by `benches/managers/catch-up.sh`; the bound here only ends a hang.) The state is grown on
/// the stopped first manager's store with departed nodes carrying 2 KiB certificates (kept in
/// the state, not in the views), the way a state dir from before Raft would come: it restarts
/// as a group of one whose log starts with a snapshot of that state.
#[test]
fn a_manager_catches_up_with_a_state_over_4_mib() {
    use shoal_control::manager::state::{Role, State};
    use shoal_control::store::{Store, Write};
    const GONE: u16 = 800;
    let (_root, mut nodes) = cluster(&["b1", "b2"]);
    init(&nodes[0]);
    let token = nodes[0]
        .ok(&["join-token", "-q", "manager"])
        .trim()
        .to_owned();
    nodes[0].terminate();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let size = runtime.block_on(async {
        let store = Store::open(&nodes[0].dir.join("state")).await.unwrap();
        let mut state = store.manager(State::from_record).await.unwrap().unwrap();
        let cluster = state.cluster.as_mut().unwrap();
        let first = cluster.nodes.values().next().unwrap().clone();
        for i in 0..GONE {
            let mut n = first.clone();
            n.id = shoal_control::id::NodeId::from_random(0xb16_0000 + u128::from(i));
            n.hostname = format!("gone-{i}");
            n.addr = Ipv4Addr::new(198, 18, (i >> 8) as u8 + 10, i as u8).into();
            n.role = Role::Worker;
            n.left = true;
            (n.raft_id, n.api_addr, n.overlay_addr) = (None, None, None);
            n.cert_der = vec![i as u8; 2048];
            cluster.nodes.insert(n.id.clone(), n);
        }
        state.version += 1;
        let record = state.to_record().unwrap();
        store
            .write(&[Write::ClearRaft, Write::Manager(&record)])
            .await
            .unwrap();
        record.len()
    });
    assert!(size > 4 << 20, "the state is only {size} bytes");
    nodes[0].start();
    wait_until(Duration::from_secs(10), || {
        manager_status(&nodes[0], "b1").as_deref() == Some("Leader")
    });
    let addr = format!("{}:2377", nodes[0].ip);
    let joined = Instant::now();
    join_ok(&nodes[1], &token, &addr);
    // Asked twice a second: a digest costs each agent a pass over the whole state.
    wait_until(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(400));
        state_digest(&nodes[1]).is_some() && state_digest(&nodes[1]) == state_digest(&nodes[0])
    });
    let took = joined.elapsed();
    eprintln!("a {size}-byte state: the new manager had it {took:?} after `join`");
    assert_eq!(
        manager_status(&nodes[0], "b2").as_deref(),
        Some("Reachable")
    );
    let gone = rows(&nodes[1])
        .iter()
        .filter(|r| r.0.starts_with("gone-"))
        .count();
    assert_eq!(gone, usize::from(GONE));
}

/// `network create|ls|inspect|rm` in docker's words: VNIs from 4097, subnets from the pools
/// `init --default-addr-pool` set, the definitions on every node (a worker lists and inspects
/// them), and docker's refusals.
#[test]
fn networks_are_created_listed_and_removed() {
    let (_root, nodes) = cluster(&["k1", "k2"]);
    let out = init_with(
        &nodes[0],
        &[
            "--default-addr-pool",
            "10.20.0.0/16",
            "--default-addr-pool-mask-length",
            "26",
        ],
    );
    assert!(join(&nodes[1], &join_command(&out)).status.success());
    let (m, w) = (&nodes[0], &nodes[1]);
    let id = m.ok(&[
        "network",
        "create",
        "--opt",
        "encrypted",
        "--attachable",
        "web",
    ]);
    assert_eq!(id.trim().len(), 25, "{id}");
    m.ok(&[
        "network",
        "create",
        "--subnet",
        "192.168.50.0/24",
        "--gateway",
        "192.168.50.254",
        "db",
    ]);
    for (args, want) in [
        (
            &["network", "create", "web"][..],
            "network with name web already exists",
        ),
        (
            &["network", "create", "--subnet", "10.0.0.0/16", "x"],
            "Pool overlaps",
        ),
        (
            &[
                "network",
                "create",
                "--subnet",
                "10.99.0.0/24",
                "--gateway",
                "10.98.0.1",
                "x",
            ],
            "is not a host address",
        ),
        (
            &["network", "create", "-d", "bridge", "x"],
            "overlay networks only",
        ),
        (
            &["network", "create", "--opt", "mtu=9000", "x"],
            "unknown network option",
        ),
        (&["network", "create", "bad name"], "invalid network name"),
        (&["network", "rm", "ingress"], "cannot be removed"),
        (&["network", "rm", "nope"], "network nope not found"),
    ] {
        let err = m.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = w.fails(&["network", "create", "x"]);
    assert!(err.contains("not a swarm manager"), "{err}");
    // The worker has them from its view.
    let names = |n: &Node| -> Vec<String> {
        n.ok(&["network", "ls"])
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
            .collect()
    };
    wait_until(Duration::from_secs(10), || {
        names(w) == ["ingress", "db", "web"]
    });
    let header = w.ok(&["network", "ls"]);
    assert!(header.starts_with("NETWORK ID     NAME"), "{header}");
    assert!(header.contains(&id.trim()[..12]), "{header}");
    let inspect = |n: &Node, name: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&n.ok(&["network", "inspect", name])).unwrap()[0]
            .clone()
    };
    let web = inspect(w, "web");
    assert_eq!(web["vni"], 4097);
    assert_eq!(web["subnet"], "10.20.0.0/26");
    assert_eq!(web["gateway"], "10.20.0.1");
    assert_eq!(
        (web["encrypted"].clone(), web["attachable"].clone()),
        (true.into(), true.into())
    );
    let db = inspect(w, "db");
    assert_eq!(
        (db["vni"].clone(), db["gateway"].clone()),
        (4098.into(), "192.168.50.254".into())
    );
    assert_eq!(db["encrypted"], false);
    // Removed by name and by ID prefix.
    let out = m.ok(&["network", "rm", "db", &id.trim()[..8]]);
    assert_eq!(out.lines().count(), 2, "{out}");
    wait_until(Duration::from_secs(10), || names(w) == ["ingress"]);
}

#[test]
fn services_are_created_listed_changed_and_removed() {
    let (_root, nodes) = cluster(&["v1", "v2"]);
    let out = init_with(&nodes[0], &[]);
    assert!(join(&nodes[1], &join_command(&out)).status.success());
    let (m, w) = (&nodes[0], &nodes[1]);
    m.ok(&["network", "create", "--subnet", "10.30.0.0/24", "web"]);
    let id = m.ok(&[
        "service",
        "create",
        "--network",
        "web",
        "-p",
        "8080:80",
        "front",
    ]);
    assert_eq!(id.trim().len(), 25, "{id}");
    for (args, want) in [
        (
            &[
                "service",
                "create",
                "--network",
                "web",
                "-p",
                "8080:81",
                "back",
            ][..],
            "port 8080 is already in use by service front",
        ),
        (
            &[
                "service",
                "create",
                "--network",
                "web",
                "-p",
                "70000:80",
                "back",
            ],
            r#"invalid publish spec "70000:80": port out of range"#,
        ),
        (
            &[
                "service",
                "create",
                "--network",
                "web",
                "--endpoint-mode",
                "dnsrr",
                "-p",
                "9090:90",
                "back",
            ],
            "port published with ingress mode can't be used with dnsrr mode",
        ),
        (
            &["service", "create", "--network", "nope", "back"],
            "network nope not found",
        ),
        (
            &["network", "rm", "web"],
            "network web is in use by service front",
        ),
        (
            &["service", "backend", "add", "front", "c0ffee"],
            "neither an IPv4 address nor a container",
        ),
        (&["service", "rm", "nope"], "service nope not found"),
    ] {
        let err = m.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = w.fails(&["service", "ls"]);
    assert!(err.contains("not a swarm manager"), "{err}");
    m.ok(&[
        "service",
        "update",
        "--publish-add",
        "mode=host,53:53/udp",
        "--publish-rm",
        "8080",
        "front",
    ]);
    m.ok(&["service", "backend", "add", "front", "10.30.0.9"]);
    let ls = m.ok(&["service", "ls"]);
    let mut lines = ls.lines();
    assert!(
        lines.next().is_some_and(|h| h
            .split_whitespace()
            .eq(["ID", "NAME", "MODE", "REPLICAS", "PORTS"])),
        "{ls}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [&id.trim()[..12], "front", "vip", "1", "53->53/udp"],
        "{ls}"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&m.ok(&["service", "inspect", "front"])).unwrap();
    let front = &inspect[0];
    assert_eq!(front["vip"], "10.30.0.254");
    assert_eq!(front["network"], "web");
    assert_eq!(front["endpoint_mode"], "vip");
    assert_eq!(front["backends"], serde_json::json!(["10.30.0.9"]));
    assert_eq!(
        front["health"],
        serde_json::json!({"interval_ms": 250, "retries": 2})
    );
    m.ok(&["service", "backend", "rm", "front", "10.30.0.9"]);
    m.ok(&["service", "rm", &id.trim()[..8]]);
    m.ok(&["network", "rm", "web"]);
}
