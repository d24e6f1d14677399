//! Network namespaces on a Linux bridge: the one piece of code that makes them, for `shoal lab`
//! (`shoal-control`) and for the netns integration tests (`shoal-netns-tests`), so the lab and
//! the tests build the same network.
//!
//! [`Bridge::new`] makes a "switch" namespace holding a bridge `br0` (so the host's own
//! namespace is never touched), and [`Bridge::add_node`] a node namespace attached to it by a
//! veth pair (`eth0` inside the node, its peer a port of `br0`), with loopback up and one
//! address. Every namespace a [`Bridge`] made is deleted when it is dropped, also while
//! unwinding from a failed assertion, which deletes their devices too; [`Bridge::keep`] leaves
//! them in place for a lab that outlives the program that made it (`shoal lab up`, undone by
//! `shoal lab down` with [`delete`]).
//!
//! What it does not do: choose names or addresses (callers do: 198.18.0.0/15 in shoal), route
//! between bridges or to the host, start or stop processes ([`exec`] only builds the command).
//! It runs `ip` (iproute2) and needs root ([`is_root`]).

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The bridge's name inside its switch namespace.
pub const BRIDGE: &str = "br0";
/// The node's interface on the bridge, inside each node namespace.
pub const NODE_IF: &str = "eth0";

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command could not be started at all.
    #[error("cannot run `{cmd}`: {source}; is iproute2 installed?")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Whether this process runs as root (effective uid 0), which namespaces need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v == "0"))
        })
        .unwrap_or(false)
}

/// Runs `cmd` to its end; its output if it succeeded.
pub fn run(cmd: &mut Command) -> Result<Output, Error> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| Error::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Runs `ip ARGS`; its stdout.
pub fn ip(args: &[&str]) -> Result<String, Error> {
    let out = run(Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec NS PROGRAM`, to add arguments to and run or spawn. `ip netns exec` execs the
/// program, so a spawned child's PID is the program's own.
pub fn exec(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// The names of the namespaces on this host.
pub fn list() -> Result<Vec<String>, Error> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespace `ns` (its devices go with it; a veth's peer in another namespace too).
pub fn delete(ns: &str) -> Result<(), Error> {
    ip(&["netns", "del", ns]).map(drop)
}

/// Namespaces on one bridge; those this value made are deleted when it is dropped. See the
/// crate docs.
#[derive(Debug)]
pub struct Bridge {
    switch: String,
    made: Vec<String>,
}

impl Bridge {
    /// Makes namespace `switch` with the bridge [`BRIDGE`] in it, up.
    pub fn new(switch: &str) -> Result<Bridge, Error> {
        ip(&["netns", "add", switch])?;
        let bridge = Bridge {
            switch: switch.to_owned(),
            made: vec![switch.to_owned()],
        };
        // On error, dropping `bridge` deletes the namespace again.
        ip(&["-n", switch, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", switch, "link", "set", BRIDGE, "up"])?;
        Ok(bridge)
    }

    /// The bridge in namespace `switch` that something else made (a lab `shoal lab up` made):
    /// nodes added through this value are still its own, deleted when it is dropped; the
    /// switch namespace is not.
    pub fn existing(switch: &str) -> Bridge {
        Bridge {
            switch: switch.to_owned(),
            made: Vec::new(),
        }
    }

    /// Makes namespace `ns` with loopback up and [`NODE_IF`] up with address `cidr`, the
    /// other end of its veth pair being `port` on the bridge. On error, what it made is
    /// deleted with the bridge.
    pub fn add_node(&mut self, ns: &str, port: &str, cidr: &str) -> Result<(), Error> {
        ip(&["netns", "add", ns])?;
        self.made.push(ns.to_owned());
        let sw = self.switch.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", NODE_IF, "netns", ns, "type", "veth", "peer", "name", port, "netns", sw,
        ])?;
        ip(&["-n", sw, "link", "set", port, "master", BRIDGE, "up"])?;
        ip(&["-n", ns, "addr", "add", cidr, "dev", NODE_IF])?;
        ip(&["-n", ns, "link", "set", NODE_IF, "up"])?;
        Ok(())
    }

    /// The switch namespace.
    pub fn switch(&self) -> &str {
        &self.switch
    }

    /// The namespaces this value made, switch first.
    pub fn namespaces(&self) -> &[String] {
        &self.made
    }

    /// Leaves every namespace made so far in place, for whoever removes them later by name.
    pub fn keep(mut self) {
        self.made.clear();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Nodes before the switch: each node's veth takes its bridge port with it.
        for ns in self.made.drain(..).rev() {
            let _ = delete(&ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require_root() {
        assert!(
            is_root(),
            "this test needs root to create network namespaces; run it as root"
        );
    }

    fn exists(ns: &str) -> bool {
        list().expect("ip netns list").iter().any(|n| n == ns)
    }

    fn name(tag: &str) -> String {
        format!("shoalnetns{}{tag}", std::process::id())
    }

    #[test]
    fn nodes_on_a_bridge_reach_each_other_and_everything_is_removed() {
        require_root();
        let names = [name("sw"), name("a"), name("b")];
        {
            let mut bridge = Bridge::new(&names[0]).expect("bridge");
            bridge
                .add_node(&names[1], "pa", "198.18.7.1/24")
                .expect("a");
            bridge
                .add_node(&names[2], "pb", "198.18.7.2/24")
                .expect("b");
            assert!(names.iter().all(|n| exists(n)));
            let ping = run(exec(&names[1], "ping").args(["-c", "1", "-W", "2", "198.18.7.2"]));
            assert!(ping.is_ok(), "{ping:?}");
        }
        assert!(names.iter().all(|n| !exists(n)), "namespaces left behind");
    }

    #[test]
    fn a_failed_step_removes_what_was_made_and_keep_keeps() {
        require_root();
        let (sw, a) = (name("sw2"), name("c"));
        {
            let mut bridge = Bridge::new(&sw).expect("bridge");
            let bad = bridge.add_node(&a, "pc", "not-an-address");
            assert!(matches!(bad, Err(Error::Command { .. })), "{bad:?}");
        }
        assert!(!exists(&sw) && !exists(&a), "namespaces left behind");
        let bridge = Bridge::new(&sw).expect("bridge");
        bridge.keep();
        assert!(exists(&sw), "kept");
        delete(&sw).expect("delete");
        assert!(!exists(&sw));
    }
}
