//! Helpers for shoal's network namespace integration tests.
//!
//! Every namespace these tests make is made by `shoal-netns` (the code `shoal lab` makes its
//! namespaces with): [`Lab`] directly, [`shoal_lab::TestLab`] through `shoal lab up`.
//!
//! [`Lab::new`] builds a uniquely named set of namespaces: one "switch" namespace holding a
//! Linux bridge, and N node namespaces, each attached to the bridge by a veth pair (`eth0`
//! inside the node) with an underlay address from 198.18.0.0/15 (a /24 chosen per lab, so
//! parallel labs differ even though their bridges are isolated anyway). Processes started
//! with [`Lab::spawn`] run inside a node namespace (`ip netns exec`), are tracked by PID and
//! killed with SIGKILL when the lab is dropped. Dropping the lab (also while unwinding from a
//! failed assertion) kills them, then deletes every namespace it made, which deletes their
//! devices.
//!
//! What it does not do: no routing between labs or to the host, no NAT, nothing outside the
//! namespaces it created. It needs root ([`require_root`]) and the `ip` tool (iproute2).

#![forbid(unsafe_code)]

pub mod shoal_lab;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use shoal_netns::Bridge;

/// Panics with a clear message unless running as root (network namespaces need it).
pub fn require_root() {
    if !shoal_netns::is_root() {
        panic!(
            "this test needs root to create network namespaces; \
             run it as root, e.g. `sudo -E cargo test -p shoal-netns-tests`"
        );
    }
}

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A namespace command could not start or failed.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
    /// [`Lab::exec`] without a program.
    #[error("no command to run")]
    NoCommand,
    /// No such node or process.
    #[error("no node or process number {0} in this lab")]
    NoSuch(usize),
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process running inside a lab namespace; its stdout lines arrive on a channel.
#[derive(Debug)]
struct Proc {
    child: Child,
    lines: Receiver<String>,
    node: usize,
}

/// A set of namespaces on one bridge. See the crate docs.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    subnet: (u8, u8),
    nodes: usize,
    procs: Vec<Option<Proc>>,
    /// Dropped after the processes are killed (see `Drop`): deletes the namespaces.
    bridge: Bridge,
}

impl Lab {
    /// Creates the switch namespace, its bridge and `nodes` node namespaces.
    /// On error, whatever was created is removed again.
    pub fn new(nodes: usize) -> Result<Lab, LabError> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let slot = (pid.wrapping_mul(31).wrapping_add(n)) % 512;
        let prefix = format!("shoal{pid}x{n}");
        // On error, dropping the bridge deletes what it made.
        let mut lab = Lab {
            bridge: Bridge::new(&format!("{prefix}sw"))?,
            prefix,
            subnet: (18 + (slot / 256) as u8, (slot % 256) as u8),
            nodes,
            procs: Vec::new(),
        };
        for i in 0..nodes {
            let cidr = format!("{}/24", lab.ip(i));
            lab.bridge.add_node(&lab.ns(i), &format!("p{i}"), &cidr)?;
        }
        Ok(lab)
    }

    /// Name of node `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Underlay address of node `i` (198.18.0.0/15).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, self.subnet.0, self.subnet.1, (i + 1) as u8)
    }

    /// Number of node namespaces.
    pub fn len(&self) -> usize {
        self.nodes
    }

    /// Whether the lab has no node namespaces.
    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    /// Runs a command inside node `i` and waits for it.
    pub fn exec(&self, i: usize, cmd: &[&str]) -> Result<Output, LabError> {
        if i >= self.nodes {
            return Err(LabError::NoSuch(i));
        }
        let Some((program, args)) = cmd.split_first() else {
            return Err(LabError::NoCommand);
        };
        Ok(shoal_netns::run(
            shoal_netns::exec(&self.ns(i), program).args(args),
        )?)
    }

    /// Starts `program args...` inside node `i` with stdout captured line by line; returns
    /// a process number for [`Lab::next_line`] and [`Lab::kill`].
    pub fn spawn(&mut self, i: usize, program: &str, args: &[String]) -> Result<usize, LabError> {
        if i >= self.nodes {
            return Err(LabError::NoSuch(i));
        }
        let ns = self.ns(i);
        let mut child = shoal_netns::exec(&ns, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| shoal_netns::Error::Spawn {
                cmd: format!("ip netns exec {ns} {program}"),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        self.procs.push(Some(Proc {
            child,
            lines: rx,
            node: i,
        }));
        Ok(self.procs.len() - 1)
    }

    /// PID of process `p` (the program itself: `ip netns exec` execs it).
    pub fn pid(&self, p: usize) -> Option<u32> {
        self.procs.get(p)?.as_ref().map(|x| x.child.id())
    }

    /// Node that process `p` runs in.
    pub fn node_of(&self, p: usize) -> Option<usize> {
        self.procs.get(p)?.as_ref().map(|x| x.node)
    }

    /// Waits up to `timeout` for the next stdout line of process `p`; `None` on timeout or
    /// when the process closed stdout.
    pub fn next_line(&self, p: usize, timeout: Duration) -> Option<String> {
        let proc_ = self.procs.get(p)?.as_ref()?;
        match proc_.lines.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads lines of process `p` until `pred` accepts one or `timeout` passes.
    pub fn wait_line(
        &self,
        p: usize,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.next_line(p, left)?;
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// Kills process `p` with SIGKILL (by its PID) and reaps it.
    pub fn kill(&mut self, p: usize) -> Result<(), LabError> {
        let mut proc_ = self
            .procs
            .get_mut(p)
            .and_then(Option::take)
            .ok_or(LabError::NoSuch(p))?;
        let _ = proc_.child.kill(); // SIGKILL to this PID only
        let _ = proc_.child.wait();
        Ok(())
    }

    /// Sends SIGTERM to process `p` (by its PID) and waits up to `timeout` for it to exit;
    /// kills it if it does not.
    pub fn terminate(&mut self, p: usize, timeout: Duration) -> Result<(), LabError> {
        let pid = self.pid(p).ok_or(LabError::NoSuch(p))?;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let end = Instant::now() + timeout;
        if let Some(Some(proc_)) = self.procs.get_mut(p) {
            while Instant::now() < end {
                if let Ok(Some(_)) = proc_.child.try_wait() {
                    self.procs[p] = None;
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill(p)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in 0..self.procs.len() {
            let _ = self.kill(p);
        }
        // Then the bridge, dropped with the other fields, deletes the namespaces.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns_exists(name: &str) -> bool {
        shoal_netns::list()
            .expect("ip netns list")
            .iter()
            .any(|n| n == name)
    }

    #[test]
    fn lab_nodes_reach_each_other_and_everything_is_removed() {
        require_root();
        let names;
        {
            let lab = Lab::new(2).expect("lab");
            names = lab.bridge.namespaces().to_vec();
            assert_eq!(names.len(), 3);
            assert!(names.iter().all(|n| ns_exists(n)));
            let ip1 = lab.ip(1).to_string();
            let out = lab
                .exec(0, &["ping", "-c", "1", "-W", "2", &ip1])
                .expect("ping across the bridge");
            assert!(out.status.success());
            assert_eq!(lab.ip(0).octets()[0], 198);
            assert!((18..=19).contains(&lab.ip(0).octets()[1]));
        }
        assert!(
            names.iter().all(|n| !ns_exists(n)),
            "namespaces left behind"
        );
    }

    #[test]
    fn spawned_processes_are_killed_on_drop() {
        require_root();
        let pid;
        {
            let mut lab = Lab::new(1).expect("lab");
            let p = lab
                .spawn(0, "sh", &["-c".into(), "echo hi; sleep 600".into()])
                .expect("spawn");
            assert_eq!(
                lab.next_line(p, Duration::from_secs(5)).as_deref(),
                Some("hi")
            );
            pid = lab.pid(p).expect("pid");
            assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        }
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the lab"
        );
    }
}
