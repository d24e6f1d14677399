//! The `shoal` command line: docker swarm's words, flags and output shapes.
//!
//! Every command except `agent` is a client: it sends one request to the local agent over
//! the Unix socket and prints the answer. Errors print one line on stderr and exit 1.

/// `println!` that returns an error instead of panicking (see [`emit`]).
macro_rules! outln {
    () => {
        $crate::cli::emit("\n")?
    };
    ($($arg:tt)*) => {
        $crate::cli::emit(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// `print!` that returns an error instead of panicking (see [`emit`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(&format!($($arg)*))?
    };
}

mod agent;
mod capture;
mod init;
mod join;
mod join_token;
mod lab;
mod leave;
mod network;
mod node;
mod service;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::net::UnixStream;

use crate::api::{read_frame, write_frame, Reply, Request, Response};

/// Default Unix socket of the agent.
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";

/// shoal: the networking half of a swarm-mode cluster.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
pub struct Cli {
    /// The agent's Unix socket.
    #[arg(long, global = true, env = "SHOAL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the node agent in the foreground.
    Agent(agent::Args),
    /// Initialize a swarm with this node as its manager.
    Init(init::Args),
    /// Join a swarm as a worker or a manager.
    Join(join::Args),
    /// Print or rotate a join token.
    JoinToken(join_token::Args),
    /// Leave the swarm.
    Leave(leave::Args),
    /// Manage swarm nodes.
    #[command(subcommand)]
    Node(node::Cmd),
    /// Inspect overlay networks and manage external VTEPs.
    #[command(subcommand)]
    Network(network::Cmd),
    /// Manage services: virtual IPs, published ports and backends (on a manager).
    #[command(subcommand)]
    Service(service::Cmd),
    /// Write a live copy of this node's overlay traffic as pcapng: decrypted inner frames
    /// and/or outer datagrams as on the wire.
    Capture(capture::Args),
    /// A small cluster on this machine, in network namespaces (needs root).
    #[command(subcommand)]
    Lab(lab::Cmd),
    /// Print this node's identity and swarm membership as JSON.
    Info,
}

/// A failed command: the line to print.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The agent is not running or the socket is wrong.
    #[error("Cannot connect to the shoal agent at unix://{0}. Is the shoal agent running?")]
    Connect(String),
    /// The agent refused the request.
    #[error("Error response from daemon: {0}")]
    Daemon(String),
    /// The conversation with the agent broke.
    #[error("error talking to the shoal agent: {0}")]
    Protocol(String),
    /// The agent gave an answer that does not fit the request.
    #[error("the shoal agent gave an unexpected answer: {0}")]
    Unexpected(String),
    /// A flag value is invalid.
    #[error("{0}")]
    Usage(String),
    /// The agent failed.
    #[error("{0}")]
    Agent(#[from] crate::agent::AgentError),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// The whole `shoal` program: parses the command line, runs it, prints an error as one
/// line on stderr. `main.rs` (and test binaries that embed the CLI) call only this.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let mut cli = Cli::parse();
    // The lab runs commands and waits on them: no async runtime.
    let lab_cmd = match std::mem::replace(&mut cli.command, Cmd::Info) {
        Cmd::Lab(cmd) => Some(cmd),
        other => {
            cli.command = other;
            None
        }
    };
    if let Some(cmd) = lab_cmd {
        return match lab::run(cmd) {
            Ok(code) => code,
            Err(e) => {
                eprint_line(&e.to_string());
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Cmd::Agent(args) = &cli.command {
        // Before any thread starts: see `agent::notify`.
        crate::agent::notify::take_env();
        let logs = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match args.log_format {
            agent::LogFormat::Text => logs.init(),
            agent::LogFormat::Json => logs.json().flatten_event(true).init(),
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprint_line(&format!("cannot start the async runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprint_line(&e.to_string());
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let socket = cli.socket;
    match cli.command {
        Cmd::Agent(args) => agent::run(args, socket).await,
        Cmd::Init(args) => init::run(args, &socket).await,
        Cmd::Join(args) => join::run(args, &socket).await,
        Cmd::JoinToken(args) => join_token::run(args, &socket).await,
        Cmd::Leave(args) => leave::run(args, &socket).await,
        Cmd::Node(cmd) => node::run(cmd, &socket).await,
        Cmd::Network(cmd) => network::run(cmd, &socket).await,
        Cmd::Service(cmd) => service::run(cmd, &socket).await,
        Cmd::Capture(args) => capture::run(args, &socket).await,
        Cmd::Lab(cmd) => lab::run(cmd).map(drop),
        Cmd::Info => {
            let reply = call(&socket, Request::Info).await?;
            let Reply::Info(info) = reply else {
                return Err(unexpected(&reply));
            };
            let json = serde_json::to_string_pretty(&info)
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            outln!("{json}");
            Ok(())
        }
    }
}

/// Writes `text` to stdout. A reader that went away (`shoal node ls | head`) is not an
/// error: the output just stops. Any other write failure is [`CliError::Output`].
pub fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Output(e)),
        _ => Ok(()),
    }
}

fn eprint_line(text: &str) {
    use std::io::Write as _;
    // Nothing more can be done if stderr is gone too.
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Sends one request to the agent and returns its reply.
pub async fn call(socket: &std::path::Path, request: Request) -> Result<Reply, CliError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|_| CliError::Connect(socket.display().to_string()))?;
    write_frame(&mut stream, &request)
        .await
        .map_err(|e| CliError::Protocol(e.to_string()))?;
    let response: Option<Response> = read_frame(&mut stream)
        .await
        .map_err(|e| CliError::Protocol(e.to_string()))?;
    match response {
        None => Err(CliError::Protocol(
            "the agent closed the connection without an answer".into(),
        )),
        Some(Err(message)) => Err(CliError::Daemon(message)),
        Some(Ok(reply)) => Ok(reply),
    }
}

fn unexpected(reply: &Reply) -> CliError {
    CliError::Unexpected(format!("{reply:?}"))
}
