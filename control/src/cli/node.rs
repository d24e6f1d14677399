//! `shoal node ls|inspect|rm|promote|demote`.

use std::path::Path;

use serde_json::json;

use crate::api::{AdminRequest, ManagerStatus, NodeStatus, Reply, Request, Status};
use crate::cli::{call, unexpected, CliError};
use crate::id::NodeId;

/// Output format of `node ls`.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Format {
    /// The docker table.
    #[default]
    Table,
    /// One JSON object per line.
    Json,
}

/// `shoal node` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// List the nodes.
    #[command(alias = "list")]
    Ls {
        /// table or json.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one node in detail.
    Inspect {
        /// Node ID, ID prefix or hostname.
        node: String,
    },
    /// Remove nodes from the swarm.
    #[command(alias = "remove")]
    Rm {
        /// Remove even if the node is up.
        #[arg(short, long)]
        force: bool,
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes managers.
    Promote {
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

pub(super) async fn run(cmd: Cmd, socket: &Path) -> Result<(), CliError> {
    let (request, format) = match cmd {
        Cmd::Ls { format } => (AdminRequest::NodeLs, format),
        Cmd::Inspect { node } => (AdminRequest::NodeInspect { node }, Format::Json),
        Cmd::Rm { force, nodes } => (AdminRequest::NodeRm { nodes, force }, Format::Table),
        Cmd::Promote { nodes } => (AdminRequest::Promote { nodes }, Format::Table),
        Cmd::Demote { nodes } => (AdminRequest::Demote { nodes }, Format::Table),
    };
    let reply = call(socket, Request::Admin(request)).await?;
    match (reply, format) {
        (Reply::Nodes { self_id, nodes }, Format::Table) => {
            out!("{}", table(self_id.as_ref(), &nodes));
        }
        (Reply::Nodes { self_id, nodes }, Format::Json) => {
            for n in &nodes {
                outln!("{}", json_line(self_id.as_ref(), n));
            }
        }
        (Reply::Node(node), _) => {
            let text = serde_json::to_string_pretty(&[node])
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            outln!("{text}");
        }
        (Reply::Lines(lines), _) => {
            for line in lines {
                outln!("{line}");
            }
        }
        (other, _) => return Err(unexpected(&other)),
    }
    Ok(())
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Ready => "Ready",
        Status::Down => "Down",
    }
}

fn manager_word(s: Option<ManagerStatus>) -> &'static str {
    match s {
        None => "",
        Some(ManagerStatus::Leader) => "Leader",
        Some(ManagerStatus::Reachable) => "Reachable",
        Some(ManagerStatus::Unreachable) => "Unreachable",
    }
}

/// The `node ls` table, columns padded as docker's tabwriter does (three spaces apart).
pub fn table(self_id: Option<&NodeId>, nodes: &[NodeStatus]) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "HOSTNAME".to_owned(),
        "STATUS".to_owned(),
        "AVAILABILITY".to_owned(),
        "MANAGER STATUS".to_owned(),
        "ENGINE VERSION".to_owned(),
    ]];
    for n in nodes {
        let star = if Some(&n.id) == self_id { " *" } else { "" };
        rows.push([
            format!("{}{star}", n.id),
            n.hostname.clone(),
            status_word(n.status).to_owned(),
            "Active".to_owned(),
            manager_word(n.manager_status).to_owned(),
            n.engine_version.clone(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn json_line(self_id: Option<&NodeId>, n: &NodeStatus) -> serde_json::Value {
    json!({
        "ID": n.id,
        "Self": Some(&n.id) == self_id,
        "Hostname": n.hostname,
        "Status": status_word(n.status),
        "Availability": "Active",
        "ManagerStatus": manager_word(n.manager_status),
        "EngineVersion": n.engine_version,
        "Addr": n.addr,
        "Role": n.role.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::state::{Availability, Role};

    fn status(n: u128, name: &str, ms: Option<ManagerStatus>, s: Status) -> NodeStatus {
        NodeStatus {
            id: NodeId::from_random(n),
            hostname: name.into(),
            addr: "198.18.0.1".parse().unwrap(),
            role: if ms.is_some() {
                Role::Manager
            } else {
                Role::Worker
            },
            status: s,
            availability: Availability::Active,
            manager_status: ms,
            engine_version: "0.1.0".into(),
            public_key: String::new(),
            joined_at: 0,
            overlay_addr: None,
            data_path: None,
        }
    }

    #[test]
    fn table_golden() {
        let nodes = [
            status(1, "n1", Some(ManagerStatus::Leader), Status::Ready),
            status(2, "node-two", None, Status::Down),
        ];
        let got = table(Some(&NodeId::from_random(1)), &nodes);
        let want = "\
ID                            HOSTNAME   STATUS   AVAILABILITY   MANAGER STATUS   ENGINE VERSION
0000000000000000000000001 *   n1         Ready    Active         Leader           0.1.0
0000000000000000000000002     node-two   Down     Active                          0.1.0
";
        assert_eq!(got, want);
    }

    #[test]
    fn json_lines() {
        let n = status(2, "n2", Some(ManagerStatus::Reachable), Status::Ready);
        let v = json_line(None, &n);
        assert_eq!(v["ManagerStatus"], "Reachable");
        assert_eq!(v["Self"], false);
        assert_eq!(v["ID"], "0000000000000000000000002");
    }
}
