//! `shoal leave`.

use std::path::Path;

use crate::api::{Reply, Request};
use crate::cli::{call, unexpected, CliError};

/// `shoal leave` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Leave even as the last manager (erases the swarm's state on this node).
    #[arg(short, long)]
    force: bool,
}

pub(super) async fn run(args: Args, socket: &Path) -> Result<(), CliError> {
    let reply = call(socket, Request::Leave { force: args.force }).await?;
    let Reply::Left = reply else {
        return Err(unexpected(&reply));
    };
    outln!("Node left the swarm.");
    Ok(())
}
