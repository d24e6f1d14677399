//! `shoal lab up|status|restart|stop|start|down|exec`.

use crate::cli::CliError;
use crate::lab::{Lab, DEFAULT_NAME};

/// `shoal lab` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Make N namespaces on a bridge, an agent in each, init and join; print `node ls` and a
    /// ping across the overlay.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How many of them are managers (Raft; an odd number is best: 3 survive losing 1,
        /// 5 survive losing 2).
        #[arg(long, default_value_t = 1)]
        managers: usize,
        /// Plain RFC 7348 overlay instead of the encrypted one.
        #[arg(long)]
        no_encrypt: bool,
        /// How often the network keys rotate (passed to `init`; e.g. 20s).
        #[arg(long)]
        key_rotation_interval: Option<String>,
        /// The lab's name (several labs can be up at once).
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Show the lab's nodes and `node ls`.
    Status {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Kill a node's agent with SIGKILL and start it again on the same state.
    Restart {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// The node: n1, n2, ...
        node: String,
    },
    /// Stop a node's agent (SIGTERM); its state stays for `lab start`.
    Stop {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// SIGKILL at once, as a crash (no goodbye to the others).
        #[arg(long)]
        kill: bool,
        /// The node: n1, n2, ...
        node: String,
    },
    /// Start a stopped node's agent on its state.
    Start {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// The node: n1, n2, ...
        node: String,
    },
    /// Remove everything the lab made. Safe to run twice.
    Down {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Run a command in a node's namespace, with SHOAL_SOCKET set to its agent:
    /// `shoal lab exec n2 -- shoal node ls`.
    Exec {
        /// The lab's name.
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// The node: n1, n2, ...
        node: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

fn lab_err(e: crate::lab::LabError) -> CliError {
    CliError::Usage(e.to_string())
}

pub(super) fn run(cmd: Cmd) -> Result<std::process::ExitCode, CliError> {
    match cmd {
        Cmd::Up {
            nodes,
            managers,
            no_encrypt,
            key_rotation_interval,
            name,
        } => {
            let options = crate::lab::UpOptions {
                nodes,
                managers,
                encrypt: !no_encrypt,
                key_rotation_interval,
            };
            let out = Lab::new(&name)
                .and_then(|lab| lab.up_with(&options))
                .map_err(lab_err)?;
            out!("{out}");
        }
        Cmd::Status { name } => {
            let out = Lab::new(&name)
                .and_then(|lab| lab.status())
                .map_err(lab_err)?;
            out!("{out}");
        }
        Cmd::Restart { name, node } => {
            let out = Lab::new(&name)
                .and_then(|lab| lab.restart(&node))
                .map_err(lab_err)?;
            outln!("{out}");
        }
        Cmd::Stop { name, node, kill } => {
            let out = Lab::new(&name)
                .and_then(|lab| lab.stop(&node, kill))
                .map_err(lab_err)?;
            outln!("{out}");
        }
        Cmd::Start { name, node } => {
            let out = Lab::new(&name)
                .and_then(|lab| lab.start(&node))
                .map_err(lab_err)?;
            outln!("{out}");
        }
        Cmd::Down { name } => {
            let out = Lab::new(&name)
                .and_then(|lab| lab.down())
                .map_err(lab_err)?;
            outln!("{out}");
        }
        Cmd::Exec { name, node, cmd } => {
            let status = Lab::new(&name)
                .and_then(|lab| lab.exec(&node, &cmd))
                .map_err(lab_err)?;
            return Ok(std::process::ExitCode::from(
                status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
            ));
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
