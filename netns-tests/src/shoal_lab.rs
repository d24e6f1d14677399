//! A `shoal lab` for tests: [`TestLab::up`] runs `shoal lab up` with a unique name, the test
//! drives nodes through `shoal lab exec`, and dropping the lab runs `shoal lab down` (also when
//! the test fails), which kills exactly the lab's agents and deletes exactly its namespaces.
//! Helpers read what is on the wire (tcpdump, tshark) and what the agents count.

// Test support: a failed step fails the test that called it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use shoal_netns::Bridge;

use crate::require_root;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A lab that is taken down when dropped.
pub struct TestLab {
    /// The lab's name (`shoal lab --name`).
    pub name: String,
    /// Namespaces a test added to the lab's bridge ([`TestLab::add_host`]), deleted on drop.
    hosts: Bridge,
    /// A directory for the test's files (removed with the lab).
    pub scratch: PathBuf,
    bin: PathBuf,
}

/// Runs a command and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let line = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{line} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestLab {
    /// `shoal lab up` (the program at `bin`) with `nodes` nodes, encrypted or plain; checks
    /// it printed the leader and, with two or more nodes, a ping across the overlay.
    pub fn up(bin: &str, nodes: usize, encrypt: bool) -> TestLab {
        Self::up_with(bin, nodes, encrypt, &[])
    }

    /// [`TestLab::up`] with more `shoal lab up` flags.
    pub fn up_with(bin: &str, nodes: usize, encrypt: bool, flags: &[&str]) -> TestLab {
        Self::up_with_env(bin, nodes, encrypt, flags, &[])
    }

    /// [`TestLab::up_with`] with environment variables for `shoal lab up`, which its agents
    /// inherit (`SHOAL_MESH_TIMEOUTS`, say).
    pub fn up_with_env(
        bin: &str,
        nodes: usize,
        encrypt: bool,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> TestLab {
        require_root();
        let name = format!(
            "t{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let scratch = std::env::temp_dir().join(format!("shoal-{name}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let lab = TestLab {
            hosts: Bridge::existing(&format!("{name}-sw")),
            name,
            scratch,
            bin: PathBuf::from(bin),
        };
        let mut cmd = Command::new(&lab.bin);
        cmd.args([
            "lab",
            "up",
            "--name",
            &lab.name,
            "--nodes",
            &nodes.to_string(),
        ]);
        if !encrypt {
            cmd.arg("--no-encrypt");
        }
        cmd.args(flags);
        cmd.envs(env.iter().copied());
        let out = ok(&mut cmd);
        assert!(out.contains("Leader"), "{out}");
        if nodes > 1 {
            assert!(
                out.contains(" 0% packet loss"),
                "lab up pings across the overlay:\n{out}"
            );
        }
        lab
    }

    /// Adds a namespace `<lab>-<suffix>` on the lab's bridge with underlay address `cidr`
    /// (from 198.18.0.0/24); it is deleted with the lab. Returns its name.
    pub fn add_host(&mut self, suffix: &str, cidr: &str) -> String {
        let ns = format!("{}-{suffix}", self.name);
        self.hosts
            .add_node(&ns, &format!("p{suffix}"), cidr)
            .unwrap_or_else(|e| panic!("add host {ns}: {e}"));
        ns
    }

    /// Where node i keeps its state (`shoal lab` puts it under /run/shoal).
    pub fn state_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/run/shoal/lab-{}/n{i}", self.name))
    }

    /// Node i's agent socket (`shoal lab` puts it beside the state).
    pub fn socket(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/run/shoal/lab-{}/n{i}.sock", self.name))
    }

    /// Node i's agent log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(format!("/run/shoal/lab-{}/n{i}.log", self.name))
            .unwrap_or_default()
    }

    /// `shoal lab VERB --name LAB nI` (restart, stop, start).
    pub fn lab_node(&self, verb: &str, i: usize) {
        ok(Command::new(&self.bin).args(["lab", verb, "--name", &self.name, &format!("n{i}")]));
    }

    /// Node i's namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.name)
    }

    /// `shoal ARGS` against node i's agent.
    pub fn shoal(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "lab",
            "exec",
            "--name",
            &self.name,
            &format!("n{i}"),
            "--",
            "shoal",
        ]);
        run(cmd.args(args))
    }

    /// A command inside node i's namespace.
    pub fn exec(&self, i: usize, args: &[&str]) -> Output {
        let (program, args) = args.split_first().expect("a command");
        run(shoal_netns::exec(&self.ns(i), program).args(args))
    }

    /// `network inspect ingress` on node i.
    pub fn inspect(&self, i: usize) -> Value {
        let out = self.shoal(i, &["network", "inspect", "ingress"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    /// `shoal network vtep add` on n1 for the kernel VTEP of these tests (198.18.0.200,
    /// overlay 198.19.0.200) with `mac`.
    pub fn vtep_add(&self, mac: &str) -> Output {
        self.shoal(
            1,
            &[
                "network",
                "vtep",
                "add",
                "ingress",
                "--addr",
                "198.18.0.200",
                "--mac",
                mac,
                "--ip",
                "198.19.0.200",
            ],
        )
    }

    /// Node i's address on the overlay.
    pub fn overlay_addr(&self, i: usize) -> String {
        let v = self.inspect(i);
        v["local"]["address"].as_str().unwrap().to_owned()
    }

    /// Node i's data-path drops for `reason`.
    pub fn drops(&self, i: usize, reason: &str) -> u64 {
        self.inspect(i)["local"]["counters"]["drops"][reason]
            .as_u64()
            .unwrap_or(0)
    }

    /// One ping (1 s wait) from node `from` to `to`.
    pub fn ping(&self, from: usize, to: &str) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
    }

    /// Waits (bounded) until `f` holds.
    pub fn eventually(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `data` over TCP from namespace `from` to `to`:5555, and returns what the server on
    /// node `server` received (python3, bounded by timeouts).
    pub fn tcp_transfer(&self, server: usize, from: &str, to: &str, data: &str) -> String {
        self.tcp_transfer_ns(&self.ns(server), from, to, data)
    }

    /// [`TestLab::tcp_transfer`] with the server in namespace `server`.
    pub fn tcp_transfer_ns(&self, server: &str, from: &str, to: &str, data: &str) -> String {
        let out_file = self.scratch.join(format!("tcp-{server}-{from}.out"));
        let srv = format!(
            "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('{to}',5555));s.listen(1);s.settimeout(20)\nc,_=s.accept();c.settimeout(20)\n\
             b=b''\nwhile True:\n    d=c.recv(65536)\n    if not d: break\n    b+=d\n\
             open('{}','wb').write(b)\n",
            out_file.display()
        );
        let mut server_proc = Spawned(
            shoal_netns::exec(server, "python3")
                .args(["-c", &srv])
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(300));
        let cli = format!(
            "import socket,time\nfor _ in range(50):\n    try:\n        c=socket.create_connection(('{to}',5555),timeout=5);break\n    except OSError: time.sleep(0.1)\n\
             c.sendall({data:?}.encode());c.close()\n"
        );
        let client = run(shoal_netns::exec(from, "python3").args(["-c", &cli]));
        assert!(
            client.status.success(),
            "{}",
            String::from_utf8_lossy(&client.stderr)
        );
        let status = wait_exit(&mut server_proc.0, Duration::from_secs(25));
        assert!(status.success(), "tcp server failed");
        std::fs::read_to_string(&out_file).unwrap()
    }

    /// Runs tcpdump on node i's underlay interface while `during` runs, keeping the UDP
    /// datagrams to or from the data-path port 4789; returns the pcap path.
    pub fn capture(&self, i: usize, tag: &str, during: impl FnOnce()) -> PathBuf {
        self.capture_filtered(i, tag, &["udp", "port", "4789"], during)
    }

    /// [`TestLab::capture`] of every packet on node i's underlay interface, whole (no filter,
    /// no snap length): read them with [`packets`].
    pub fn capture_all(&self, i: usize, tag: &str, during: impl FnOnce()) -> PathBuf {
        self.capture_filtered(i, tag, &[], during)
    }

    fn capture_filtered(
        &self,
        i: usize,
        tag: &str,
        filter: &[&str],
        during: impl FnOnce(),
    ) -> PathBuf {
        let file = self.scratch.join(format!("{tag}.pcap"));
        // Killed by its PID on drop if `during` fails.
        let mut dump = Spawned(
            shoal_netns::exec(&self.ns(i), "tcpdump")
                .args(["-i", "eth0", "-s", "0", "-U", "-w"])
                .arg(&file)
                .args(filter)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(700));
        during();
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-INT", &dump.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while dump.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(dump);
        file
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["lab", "down", "--name", &self.name])
            .output();
        // Then `hosts`, dropped with the other fields, deletes the hosts the test added.
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A child process a test started, killed by its PID and reaped when dropped (also when the
/// test fails), unless it was reaped already.
#[derive(Debug)]
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every packet of a pcap file (as tcpdump writes it), whole: panics if one was cut short by
/// the snap length, so nothing on the wire escapes a check of their bytes.
pub fn packets(pcap: &std::path::Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(pcap).unwrap();
    assert!(bytes.len() >= 24, "{}: no pcap header", pcap.display());
    let magic = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let u32_at: fn(&[u8]) -> u32 = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => |b| u32::from_le_bytes(b.try_into().unwrap()),
        0xd4c3_b2a1 | 0x4d3c_b2a1 => |b| u32::from_be_bytes(b.try_into().unwrap()),
        _ => panic!("{}: not a pcap file (magic {magic:#x})", pcap.display()),
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caught = u32_at(&bytes[at + 8..at + 12]) as usize;
        let sent = u32_at(&bytes[at + 12..at + 16]) as usize;
        assert_eq!(
            caught,
            sent,
            "packet {} cut short in the capture",
            out.len()
        );
        let data = bytes
            .get(at + 16..at + 16 + caught)
            .unwrap_or_else(|| panic!("packet {} truncated in the file", out.len()));
        out.push(data.to_vec());
        at += 16 + caught;
    }
    out
}

/// tshark with `args`; its stdout.
pub fn tshark(args: &[&str]) -> String {
    ok(Command::new("tshark").args(args))
}

/// Lines tshark prints for the packets of `file` that match `filter`.
pub fn matching(file: &std::path::Path, filter: &str) -> Vec<String> {
    tshark(&["-r", file.to_str().unwrap(), "-Y", filter])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) for a child to exit; kills it if it does not.
pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{child:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The metrics page of node i's agent (the lab serves it inside the node's namespace).
pub fn metrics(lab: &TestLab, i: usize) -> String {
    let py = "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:9323/metrics', timeout=5).read().decode())";
    let out = lab.exec(i, &["python3", "-c", py]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample `name{labels}` on a metrics page (0 if absent).
pub fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The UDP payloads (hex) of the datagrams from `src` to port 4789 in a capture, in order.
pub fn payloads(pcap: &std::path::Path, src: &str) -> Vec<String> {
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
    hex.lines().map(|l| l.replace(':', "")).collect()
}

/// The UDP payload (hex) of the first datagram from `src` to port 4789 in a capture.
pub fn first_payload(pcap: &std::path::Path, src: &str) -> String {
    payloads(pcap, src)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no datagram from {src} in the capture"))
}

/// Sends one datagram (hex) from node `i`'s underlay address to n1's data-path port.
pub fn send_udp(lab: &TestLab, i: usize, from: &str, hex: &str) {
    let py = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{from}',0))\n\
         s.sendto(bytes.fromhex('{hex}'),('198.18.0.1',4789))\n"
    );
    let sent = lab.exec(i, &["python3", "-c", &py]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
}
