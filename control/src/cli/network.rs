//! `shoal network create|ls|inspect|rm|vtep`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::api::{AdminRequest, NetworkCreateArgs, Reply, Request, VtepArgs};
use crate::cli::{call, unexpected, CliError};

/// `shoal network` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create an overlay network (on a manager).
    Create(Create),
    /// Remove networks (on a manager).
    #[command(alias = "remove")]
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// List the networks.
    #[command(alias = "list")]
    Ls,
    /// Show a network: its subnet, VNI, mode, members, external VTEPs and this node's data
    /// path with its counters.
    Inspect {
        /// The network's name.
        network: String,
    },
    /// Add or remove an external VTEP (a kernel vxlan device or a hardware VTEP) on a plain
    /// network.
    #[command(subcommand)]
    Vtep(VtepCmd),
}

/// `shoal network create` flags, docker's.
#[derive(Debug, clap::Args)]
pub struct Create {
    /// The driver: overlay (the only one).
    #[arg(short, long, default_value = "overlay")]
    driver: String,
    /// Subnet in CIDR form (default: the next free one of the default address pools).
    #[arg(long)]
    subnet: Option<String>,
    /// Gateway address (default: the subnet's first).
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Driver options: `encrypted` seals the network's traffic per pair of nodes.
    #[arg(short, long = "opt", value_name = "KEY[=VALUE]")]
    opt: Vec<String>,
    /// Containers may attach to it by hand.
    #[arg(long)]
    attachable: bool,
    /// No route out of the overlay.
    #[arg(long)]
    internal: bool,
    /// The network's name.
    name: String,
}

impl Create {
    fn into_args(self) -> Result<NetworkCreateArgs, CliError> {
        if self.driver != "overlay" {
            return Err(CliError::Usage(format!(
                "network driver {:?} is not supported: shoal makes overlay networks only",
                self.driver
            )));
        }
        let mut encrypted = false;
        for opt in &self.opt {
            let (key, value) = opt.split_once('=').unwrap_or((opt.as_str(), "true"));
            match (key, value) {
                ("encrypted", "" | "true") => encrypted = true,
                ("encrypted", "false") => encrypted = false,
                _ => {
                    return Err(CliError::Usage(format!(
                        "unknown network option {opt:?}: shoal knows --opt encrypted"
                    )))
                }
            }
        }
        Ok(NetworkCreateArgs {
            name: self.name,
            subnet: self.subnet,
            gateway: self.gateway,
            encrypted,
            attachable: self.attachable,
            internal: self.internal,
        })
    }
}

/// `shoal network vtep` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VtepCmd {
    /// Register an external VTEP.
    Add(Vtep),
    /// Remove an external VTEP.
    #[command(alias = "remove")]
    Rm(Vtep),
}

/// An external VTEP.
#[derive(Debug, clap::Args)]
pub struct Vtep {
    /// The network (ingress).
    network: String,
    /// The VTEP's underlay address.
    #[arg(long)]
    addr: IpAddr,
    /// The MAC of its overlay interface, e.g. 02:42:c6:13:00:99.
    #[arg(long)]
    mac: String,
    /// Its overlay address.
    #[arg(long)]
    ip: Ipv4Addr,
}

impl From<Vtep> for VtepArgs {
    fn from(v: Vtep) -> Self {
        VtepArgs {
            network: v.network,
            addr: v.addr,
            mac: v.mac,
            ip: v.ip,
        }
    }
}

pub(super) async fn run(cmd: Cmd, socket: &Path) -> Result<(), CliError> {
    let request = match cmd {
        Cmd::Create(c) => Request::Admin(AdminRequest::NetworkCreate(c.into_args()?)),
        Cmd::Rm { networks } => Request::Admin(AdminRequest::NetworkRm { networks }),
        Cmd::Ls => Request::NetworkLs,
        Cmd::Inspect { network } => Request::NetworkInspect { network },
        Cmd::Vtep(VtepCmd::Add(v)) => Request::Admin(AdminRequest::VtepAdd(v.into())),
        Cmd::Vtep(VtepCmd::Rm(v)) => Request::Admin(AdminRequest::VtepRm(v.into())),
    };
    match call(socket, request).await? {
        Reply::Networks(networks) => {
            // Docker's columns (the ID cut to 12 characters, as docker shows it).
            let width = networks
                .iter()
                .map(|n| n.name.len())
                .max()
                .unwrap_or(0)
                .max(4)
                + 3;
            outln!(
                "{:<15}{:<width$}{:<10}SCOPE",
                "NETWORK ID",
                "NAME",
                "DRIVER"
            );
            for n in networks {
                let id: String = n.id.chars().take(12).collect();
                outln!("{id:<15}{:<width$}{:<10}swarm", n.name, "overlay");
            }
        }
        Reply::Network(detail) => {
            let text = serde_json::to_string_pretty(&[detail])
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            outln!("{text}");
        }
        Reply::Lines(lines) => {
            for l in lines {
                outln!("{l}");
            }
        }
        other => return Err(unexpected(&other)),
    }
    Ok(())
}
