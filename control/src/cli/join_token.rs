//! `shoal join-token`.

use std::path::Path;

use crate::api::{AdminRequest, Reply, Request};
use crate::cli::{call, unexpected, CliError};
use shoal_proto::view::Role;

/// Which token.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RoleArg {
    /// The worker token.
    Worker,
    /// The manager token.
    Manager,
}

/// `shoal join-token` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only print the token.
    #[arg(short, long)]
    quiet: bool,
    /// Replace the secret: the old token stops working at once.
    #[arg(long)]
    rotate: bool,
    /// worker or manager.
    role: RoleArg,
}

pub(super) async fn run(args: Args, socket: &Path) -> Result<(), CliError> {
    let role = match args.role {
        RoleArg::Worker => Role::Worker,
        RoleArg::Manager => Role::Manager,
    };
    let reply = call(
        socket,
        Request::Admin(AdminRequest::JoinToken {
            role,
            rotate: args.rotate,
        }),
    )
    .await?;
    let Reply::JoinToken {
        role,
        token,
        join_addr,
        rotated,
    } = reply
    else {
        return Err(unexpected(&reply));
    };
    if args.quiet {
        outln!("{token}");
        return Ok(());
    }
    if rotated {
        outln!("Successfully rotated {} join token.", role.as_str());
        outln!();
    }
    outln!(
        "To add a {} to this swarm, run the following command:",
        role.as_str()
    );
    outln!();
    outln!("    shoal join --token {token} {join_addr}");
    outln!();
    Ok(())
}
