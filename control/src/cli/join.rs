//! `shoal join`.

use std::net::IpAddr;
use std::path::Path;

use crate::api::{JoinRequest, Reply, Request};
use crate::cli::{call, unexpected, CliError};

/// `shoal join` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The join token from `shoal join-token`.
    #[arg(long)]
    token: String,
    /// Address this node is reached at (default: the address it reaches the manager from).
    #[arg(long)]
    advertise_addr: Option<IpAddr>,
    /// The manager, `HOST[:PORT]` (port 2377 if absent).
    manager: String,
}

pub(super) async fn run(args: Args, socket: &Path) -> Result<(), CliError> {
    let request = Request::Join(JoinRequest {
        token: args.token,
        manager: args.manager,
        advertise_addr: args.advertise_addr,
    });
    let reply = call(socket, request).await?;
    let Reply::Joined { role } = reply else {
        return Err(unexpected(&reply));
    };
    outln!("This node joined a swarm as a {}.", role.as_str());
    Ok(())
}
