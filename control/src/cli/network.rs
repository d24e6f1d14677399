//! `shoal network ls|inspect|vtep`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use crate::api::{AdminRequest, Reply, Request, VtepArgs};
use crate::cli::{call, unexpected, CliError};

/// `shoal network` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
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
        Cmd::Ls => Request::NetworkLs,
        Cmd::Inspect { network } => Request::NetworkInspect { network },
        Cmd::Vtep(VtepCmd::Add(v)) => Request::Admin(AdminRequest::VtepAdd(v.into())),
        Cmd::Vtep(VtepCmd::Rm(v)) => Request::Admin(AdminRequest::VtepRm(v.into())),
    };
    match call(socket, request).await? {
        Reply::Networks(networks) => {
            outln!(
                "{:<14}{:<10}{:<8}{:<8}{:<20}ENCRYPTED",
                "NAME",
                "DRIVER",
                "SCOPE",
                "VNI",
                "SUBNET"
            );
            for n in networks {
                outln!(
                    "{:<14}{:<10}{:<8}{:<8}{:<20}{}",
                    n.name,
                    "overlay",
                    "swarm",
                    n.vni,
                    n.subnet,
                    if n.encrypted { "yes" } else { "no" }
                );
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
