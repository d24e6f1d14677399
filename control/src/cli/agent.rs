//! `shoal agent`.

use std::path::PathBuf;

use crate::agent::AgentConfig;
use crate::cli::CliError;

/// `shoal agent` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the node key, membership and manager state.
    #[arg(long, default_value = "/var/lib/shoal")]
    state_dir: PathBuf,
    /// This node's host name (default: the system host name).
    #[arg(long)]
    hostname: Option<String>,
    /// Where gossip listens, IP:PORT (default: the node's advertise address, port 7946).
    #[arg(long)]
    gossip_addr: Option<std::net::SocketAddr>,
}

pub(super) async fn run(args: Args, socket: PathBuf) -> Result<(), CliError> {
    let hostname = match args.hostname {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CliError::Usage("cannot read the host name; pass --hostname".into()))?,
    };
    let config = AgentConfig {
        state_dir: args.state_dir,
        socket,
        hostname,
        gossip_addr: args.gossip_addr,
    };
    crate::agent::run(config, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
