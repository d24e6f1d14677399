//! `shoal lab`: a small cluster on one machine, in network namespaces.
//!
//! `lab up` makes a switch namespace holding a Linux bridge (so the host's own namespace is
//! never touched) and N node namespaces on it (with `shoal-netns`, the code every netns test
//! makes its namespaces with), with underlay addresses 198.18.0.1..N/24; it
//! starts an agent in each, runs `init` on the first with the overlay on 198.19.0.0/24, joins
//! the others with the printed token, and prints `node ls` and a ping across the overlay.
//! Everything it makes is named after the lab (`shoal-lab` unless `--name`), and its agents'
//! PIDs, state and logs live in `/run/shoal/lab-NAME/`; `lab down` kills exactly those PIDs and
//! deletes exactly those namespaces, and is safe to run twice.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_netns::{self as netns, is_root, Bridge};

/// The lab's underlay subnet (the first /24 of the benchmark range).
pub const UNDERLAY: [u8; 3] = [198, 18, 0];
/// The lab's overlay subnet.
pub const OVERLAY_SUBNET: &str = "198.19.0.0/24";
/// The lab's default name.
pub const DEFAULT_NAME: &str = "shoal-lab";
/// At most this many nodes (addresses .1 to .N of one /24, interface names stay short).
pub const MAX_NODES: usize = 50;
/// Where each lab agent serves `/metrics`, inside its node's namespace:
/// `shoal lab exec n1 -- curl -s http://127.0.0.1:9323/metrics`.
pub const METRICS_ADDR: &str = "127.0.0.1:9323";
const WAIT: Duration = Duration::from_secs(20);

/// Why a lab command failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Not root.
    #[error("shoal lab needs root to create network namespaces; run it with sudo")]
    NotRoot,
    /// A lab of this name is up.
    #[error("lab {0} is already up; run `shoal lab down` first (or pick another --name)")]
    AlreadyUp(String),
    /// No lab of this name.
    #[error("lab {0} is not up; run `shoal lab up`")]
    NotUp(String),
    /// A bad node count or name.
    #[error("{0}")]
    Usage(String),
    /// A command failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// What went wrong.
        detail: String,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What `shoal lab up` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpOptions {
    /// How many nodes.
    pub nodes: usize,
    /// How many of them are managers (n1 first; the others join with the manager token).
    pub managers: usize,
    /// Encrypted overlay (or plain).
    pub encrypt: bool,
    /// `init --key-rotation-interval` (default: init's).
    pub key_rotation_interval: Option<String>,
}

/// One lab, by name.
#[derive(Debug, Clone)]
pub struct Lab {
    name: String,
    dir: PathBuf,
}

impl From<netns::Error> for LabError {
    fn from(e: netns::Error) -> Self {
        match e {
            netns::Error::Spawn { cmd, source } => LabError::Command {
                cmd,
                detail: source.to_string(),
            },
            netns::Error::Command { cmd, stderr } => LabError::Command {
                cmd,
                detail: stderr,
            },
        }
    }
}

/// Runs `cmd` to its end; its stdout if it succeeded.
fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = netns::run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lab {
    /// The lab called `name`.
    pub fn new(name: &str) -> Result<Self, LabError> {
        let ok = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(LabError::Usage(format!(
                "lab name {name:?}: use up to 20 lowercase letters, digits and dashes"
            )));
        }
        Ok(Lab {
            name: name.to_owned(),
            dir: PathBuf::from("/run/shoal").join(format!("lab-{name}")),
        })
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.name)
    }

    /// The namespace of node `i` (1-based).
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.name)
    }

    /// The agent socket of node `i`.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.sock"))
    }

    /// The node count of a lab that is up.
    pub fn nodes(&self) -> Result<usize, LabError> {
        let text = std::fs::read_to_string(self.dir.join("nodes"))
            .map_err(|_| LabError::NotUp(self.name.clone()))?;
        text.trim()
            .parse()
            .map_err(|_| LabError::NotUp(self.name.clone()))
    }

    /// The node number of `node` (`n2` or `2`).
    pub fn node_index(&self, node: &str) -> Result<usize, LabError> {
        let n = self.nodes()?;
        node.trim_start_matches('n')
            .parse::<usize>()
            .ok()
            .filter(|i| (1..=n).contains(i))
            .ok_or_else(|| {
                LabError::Usage(format!("no node {node} in lab {} (n1 to n{n})", self.name))
            })
    }

    fn shoal(&self, exe: &Path, i: usize, args: &[&str]) -> Result<String, LabError> {
        run(Command::new(exe)
            .arg("--socket")
            .arg(self.socket(i))
            .args(args))
    }

    /// Brings the lab up and returns what to print.
    pub fn up(&self, nodes: usize, encrypt: bool) -> Result<String, LabError> {
        self.up_with(&UpOptions {
            nodes,
            managers: 1,
            encrypt,
            key_rotation_interval: None,
        })
    }

    /// [`Lab::up`] with every option.
    pub fn up_with(&self, o: &UpOptions) -> Result<String, LabError> {
        let nodes = o.nodes;
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(LabError::Usage(format!("--nodes must be 1 to {MAX_NODES}")));
        }
        if !(1..=nodes).contains(&o.managers) {
            return Err(LabError::Usage(format!(
                "--managers must be 1 to --nodes ({nodes})"
            )));
        }
        if self.dir.join("nodes").exists() {
            return Err(LabError::AlreadyUp(self.name.clone()));
        }
        let result = self.build(o);
        if result.is_err() {
            let _ = self.down();
        }
        result
    }

    fn build(&self, o: &UpOptions) -> Result<String, LabError> {
        let (nodes, encrypt) = (o.nodes, o.encrypt);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LabError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        std::fs::write(self.dir.join("nodes"), nodes.to_string()).map_err(io(&self.dir))?;
        let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
        // Until the lab is up, a failed step deletes the namespaces with `bridge`.
        let mut bridge = Bridge::new(&self.switch())?;
        for i in 1..=nodes {
            let addr = format!("{}.{}.{}.{i}/24", UNDERLAY[0], UNDERLAY[1], UNDERLAY[2]);
            bridge.add_node(&self.node_ns(i), &format!("p{i}"), &addr)?;
            self.start_agent(&exe, i)?;
        }
        for i in 1..=nodes {
            self.wait_socket(i)?;
        }
        let first = Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], 1).to_string();
        let mut init = vec![
            "init",
            "--advertise-addr",
            &first,
            "--ingress-subnet",
            OVERLAY_SUBNET,
        ];
        if !encrypt {
            init.push("--no-encrypt");
        }
        if let Some(interval) = o.key_rotation_interval.as_deref() {
            init.extend(["--key-rotation-interval", interval]);
        }
        let mut out = self.shoal(&exe, 1, &init)?;
        let worker = self.shoal(&exe, 1, &["join-token", "-q", "worker"])?;
        let manager_token = self.shoal(&exe, 1, &["join-token", "-q", "manager"])?;
        let manager = format!("{first}:{}", crate::api::DEFAULT_API_PORT);
        for i in 2..=nodes {
            let token = if i <= o.managers {
                &manager_token
            } else {
                &worker
            };
            self.shoal(&exe, i, &["join", "--token", token.trim(), &manager])?;
        }
        self.wait_ready(&exe, nodes, o.managers)?;
        out.push('\n');
        out.push_str(&self.shoal(&exe, 1, &["node", "ls"])?);
        if nodes > 1 {
            out.push('\n');
            out.push_str(&self.ping_across(&exe, nodes)?);
        }
        // Up: the lab outlives this program, until `shoal lab down`.
        bridge.keep();
        Ok(out)
    }

    fn start_agent(&self, exe: &Path, i: usize) -> Result<(), LabError> {
        use std::os::unix::process::CommandExt;
        let state = self.state_dir(i);
        let log_path = self.dir.join(format!("n{i}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| LabError::Io {
            path: log_path.clone(),
            source,
        })?;
        let err = log.try_clone().map_err(|source| LabError::Io {
            path: log_path.clone(),
            source,
        })?;
        let child = netns::exec(&self.node_ns(i), exe)
            .arg("--socket")
            .arg(self.socket(i))
            .args(["agent", "--hostname", &format!("n{i}"), "--state-dir"])
            .arg(&state)
            .args(["--metrics-addr", METRICS_ADDR])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a Ctrl-C at the terminal that ran `lab up` leaves it be.
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::Command {
                cmd: "ip netns exec ... shoal agent".into(),
                detail: e.to_string(),
            })?;
        let pid_path = self.dir.join(format!("n{i}.pid"));
        std::fs::write(&pid_path, child.id().to_string()).map_err(|source| LabError::Io {
            path: pid_path,
            source,
        })?;
        Ok(())
    }

    fn wait_socket(&self, i: usize) -> Result<(), LabError> {
        let deadline = Instant::now() + WAIT;
        while !self.socket(i).exists() {
            if Instant::now() > deadline {
                return Err(LabError::Timeout(format!(
                    "agent n{i} did not open its socket; see {}",
                    self.dir.join(format!("n{i}.log")).display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits (bounded) until every node is Ready and every manager in the Raft group (the
    /// Leader, and the others Reachable: voters that answer).
    fn wait_ready(&self, exe: &Path, nodes: usize, managers: usize) -> Result<(), LabError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let ls = self.shoal(exe, 1, &["node", "ls"])?;
            let voters = ls.matches(" Leader ").count() + ls.matches(" Reachable ").count();
            if ls.matches(" Ready ").count() >= nodes && voters >= managers {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout(format!(
                    "not every node is Ready, or not every manager in the Raft group:\n{ls}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Pings node 1's overlay address from the last node until it answers (bounded).
    fn ping_across(&self, exe: &Path, nodes: usize) -> Result<String, LabError> {
        let inspect = self.shoal(exe, 1, &["node", "inspect", "n1"])?;
        let target = serde_json::from_str::<serde_json::Value>(&inspect)
            .ok()
            .and_then(|v| v[0]["overlay_addr"].as_str().map(str::to_owned))
            .ok_or_else(|| LabError::Timeout("node n1 has no overlay address".into()))?;
        let ns = self.node_ns(nodes);
        let deadline = Instant::now() + WAIT;
        loop {
            // One probe at a time until the path is up (keys and entries follow gossip).
            let probe = run(netns::exec(&ns, "ping").args(["-c", "1", "-W", "1", &target]));
            if probe.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout(format!(
                    "no answer from {target} across the overlay"
                )));
            }
        }
        let out = run(netns::exec(&ns, "ping").args(["-c", "3", "-i", "0.2", &target]))?;
        Ok(format!(
            "n{nodes} $ ping {target}   (n1 across the overlay)\n{out}"
        ))
    }

    /// What is up: namespaces, agents alive, `node ls`.
    pub fn status(&self) -> Result<String, LabError> {
        let nodes = self.nodes()?;
        let mut out = format!(
            "lab {}: {nodes} nodes, state in {}\n",
            self.name,
            self.dir.display()
        );
        for i in 1..=nodes {
            let alive = self.live_agent(i).is_some();
            out.push_str(&format!(
                "n{i}: namespace {}, agent {}\n",
                self.node_ns(i),
                if alive { "running" } else { "not running" }
            ));
        }
        let exe = std::env::current_exe().map_err(|source| LabError::Io {
            path: "/proc/self/exe".into(),
            source,
        })?;
        match self.shoal(&exe, 1, &["node", "ls"]) {
            Ok(ls) => out.push_str(&ls),
            Err(e) => out.push_str(&format!("node ls on n1: {e}\n")),
        }
        Ok(out)
    }

    /// The PID of node `i`'s agent, if that process is alive and is still our agent (its
    /// command line names this lab's socket: a PID the system reused is left alone).
    fn live_agent(&self, i: usize) -> Option<u32> {
        let pid = self.pid(i)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let socket = self.socket(i);
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == socket.as_os_str().as_encoded_bytes());
        ours.then_some(pid)
    }

    /// Stops node `i`'s agent: SIGTERM and up to 5 s to go, then SIGKILL (`graceful`), or
    /// SIGKILL at once, as a crash.
    fn stop_agent(&self, i: usize, graceful: bool) {
        let Some(pid) = self.live_agent(i) else {
            return;
        };
        let signal = |sig: &str| {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        };
        signal(if graceful { "-TERM" } else { "-KILL" });
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            signal("-KILL");
        }
    }

    fn pid(&self, i: usize) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("n{i}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Removes the lab: kills its agents (by the PIDs it recorded), deletes its namespaces
    /// and its directory. Safe to run twice, and on a half-built lab.
    pub fn down(&self) -> Result<String, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let listed = netns::list().unwrap_or_default();
        let ours: Vec<String> = listed
            .into_iter()
            .filter(|n| {
                *n == self.switch()
                    || n.strip_prefix(&format!("{}-n", self.name))
                        .is_some_and(|rest| rest.parse::<usize>().is_ok())
            })
            .collect();
        for i in 1..=MAX_NODES {
            self.stop_agent(i, true);
        }
        for ns in &ours {
            let _ = netns::delete(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(if ours.is_empty() {
            format!("lab {} was not up; nothing to remove", self.name)
        } else {
            format!("lab {} removed ({} namespaces)", self.name, ours.len())
        })
    }

    /// Kills node `node`'s agent with SIGKILL (no goodbye, as a crash) and starts it again on
    /// the same state; returns when its socket is back.
    pub fn restart(&self, node: &str) -> Result<String, LabError> {
        let i = self.stopped(node, false)?;
        self.started(i)?;
        Ok(format!("n{i} restarted"))
    }

    /// Stops node `node`'s agent (SIGTERM, then SIGKILL after 5 s; with `crash`, SIGKILL at
    /// once, no goodbye); its state stays, in [`Lab::state_dir`], for [`Lab::start`].
    pub fn stop(&self, node: &str, crash: bool) -> Result<String, LabError> {
        let i = self.stopped(node, !crash)?;
        Ok(format!("n{i} {}", if crash { "killed" } else { "stopped" }))
    }

    /// Starts node `node`'s agent on its state, if it is not running; returns when its socket
    /// is back.
    pub fn start(&self, node: &str) -> Result<String, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let i = self.node_index(node)?;
        if self.live_agent(i).is_some() {
            return Err(LabError::Usage(format!("n{i} is running; stop it first")));
        }
        self.started(i)?;
        Ok(format!("n{i} started"))
    }

    /// Where node `i` (1-based) keeps its state.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}"))
    }

    fn stopped(&self, node: &str, graceful: bool) -> Result<usize, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        let i = self.node_index(node)?;
        self.stop_agent(i, graceful);
        let _ = std::fs::remove_file(self.socket(i));
        Ok(i)
    }

    fn started(&self, i: usize) -> Result<(), LabError> {
        let exe = std::env::current_exe().map_err(|source| LabError::Io {
            path: "/proc/self/exe".into(),
            source,
        })?;
        self.start_agent(&exe, i)?;
        self.wait_socket(i)
    }

    /// Runs `cmd` in node `node`'s namespace, with `SHOAL_SOCKET` set to its agent.
    pub fn exec(&self, node: &str, cmd: &[String]) -> Result<std::process::ExitStatus, LabError> {
        let i = self.node_index(node)?;
        let Some((program, args)) = cmd.split_first() else {
            return Err(LabError::Usage("lab exec needs a command after --".into()));
        };
        // `shoal` means this very program, wherever it was run from.
        let program: std::ffi::OsString = match std::env::current_exe() {
            Ok(exe) if program == "shoal" => exe.into(),
            _ => program.into(),
        };
        netns::exec(&self.node_ns(i), &program)
            .args(args)
            .env("SHOAL_SOCKET", self.socket(i))
            .status()
            .map_err(|e| LabError::Command {
                cmd: format!(
                    "ip netns exec {} {}",
                    self.node_ns(i),
                    program.to_string_lossy()
                ),
                detail: e.to_string(),
            })
    }
}
