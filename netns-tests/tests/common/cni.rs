//! The CNI harness: containers as network namespaces, and `shoal-cni` called exactly as a
//! runtime calls it.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shoal_netns_tests::shoal_lab::TestLab;

pub const CNI: &str = env!("CARGO_BIN_EXE_netns-shoal-cni");

/// A container: a network namespace of its own, deleted on drop.
pub struct Container {
    /// Its namespace's name.
    pub name: String,
    /// Its container ID.
    pub id: String,
}

impl Container {
    pub fn new(lab: &TestLab, tag: &str) -> Container {
        let name = format!("{}-{tag}", lab.name);
        shoal_netns::ip(&["netns", "add", &name]).unwrap();
        Container {
            id: format!("{tag}0123456789abcdef"),
            name,
        }
    }

    pub fn netns(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let (program, args) = args.split_first().unwrap();
        shoal_netns::exec(&self.name, program)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ping(&self, to: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = shoal_netns::delete(&self.name);
    }
}

/// What one plugin call printed, and whether it succeeded.
pub struct Called {
    /// Whether the plugin exited 0.
    pub ok: bool,
    /// What it printed (JSON).
    pub out: Value,
}

/// Calls `shoal-cni` as a runtime does: `command` for `container` (its ID, namespace and
/// `eth0`) on network `network`, against node `node`'s agent, with `extra` merged into the
/// configuration.
pub fn cni(
    lab: &TestLab,
    node: usize,
    command: &str,
    container: Option<&Container>,
    network: &str,
    extra: Value,
) -> Called {
    cni_args(lab, node, command, container, network, extra, None)
}

/// [`cni`] with `CNI_ARGS`.
pub fn cni_args(
    lab: &TestLab,
    node: usize,
    command: &str,
    container: Option<&Container>,
    network: &str,
    extra: Value,
    args: Option<&str>,
) -> Called {
    let mut config = json!({
        "cniVersion": "1.1.0",
        "name": network,
        "type": "shoal-cni",
        "network": network,
        "socket": lab.socket(node),
    });
    if let (Some(c), Value::Object(extra)) = (config.as_object_mut(), extra) {
        c.extend(extra);
    }
    let mut cmd = Command::new(CNI);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(args) = args {
        cmd.env("CNI_ARGS", args);
    }
    if let Some(c) = container {
        cmd.env("CNI_CONTAINERID", &c.id)
            .env("CNI_NETNS", c.netns())
            .env("CNI_IFNAME", "eth0");
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    Called {
        ok: out.status.success(),
        out: serde_json::from_str(text.trim()).unwrap_or(Value::Null),
    }
}

/// The address an ADD result gives (without its prefix length).
pub fn address(result: &Value) -> String {
    let cidr = result["ips"][0]["address"].as_str().unwrap_or_default();
    cidr.split('/').next().unwrap().to_owned()
}

pub fn add(lab: &TestLab, node: usize, c: &Container, network: &str) -> String {
    let r = cni(lab, node, "ADD", Some(c), network, json!({}));
    assert!(r.ok, "ADD of {} on n{node}: {}", c.name, r.out);
    address(&r.out)
}

pub fn create(lab: &TestLab, args: &[&str]) {
    let mut all = vec!["network", "create"];
    all.extend_from_slice(args);
    let out = lab.shoal(1, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until every node's view has network `name`.
pub fn wait_network(lab: &TestLab, nodes: usize, name: &str) {
    for i in 1..=nodes {
        lab.eventually(
            &format!("n{i} knows network {name}"),
            Duration::from_secs(10),
            || {
                let out = lab.shoal(i, &["network", "ls"]);
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(name))
            },
        );
    }
}

pub fn endpoints(lab: &TestLab, node: usize, network: &str) -> Vec<Value> {
    let out = lab.shoal(node, &["network", "inspect", network]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v[0]["endpoints"].as_array().cloned().unwrap_or_default()
}
