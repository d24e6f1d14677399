//! `shoal-cni`: the CNI plugin (spec 1.1.0) that attaches containers to shoal's user networks.
//!
//! The plugin is a thin client of the node's shoal agent, which does all the work (veths,
//! addresses, routes, its records of attachments). A call of the plugin is one request on the
//! agent's Unix socket ([`Request::Cni`](shoal_proto::api::Request::Cni)) and one answer.
//! VERSION, and every refusal of a bad call, are answered by the plugin alone.
//!
//! This library is the plugin without its IO: [`plan`] takes the runtime's `CNI_*` variables
//! (an [`Env`], read through any lookup function) and the bytes of standard input, checks them
//! as the spec asks, and says what to print ([`Plan::Done`]) or what to ask the agent
//! ([`Plan::Call`]); [`Call::finish`] turns the agent's answer, or its absence
//! ([`AgentError`]), into what to print and the exit status ([`Output`]). `main.rs` reads the
//! environment and stdin, talks to the socket under [`Call::timeout`], and prints. No socket,
//! no clock, no environment in here.
//!
//! Spec: <https://github.com/containernetworking/cni/blob/main/SPEC.md>, section 2 (the
//! parameters and operations) and section 5 (the result and error shapes).

#![forbid(unsafe_code)]

pub mod program;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use shoal_proto::api::{CniAnswer, CniCommand, CniError, CniRequest, Reply, Response};

/// The spec version this plugin implements, and the one it reports when the input names none.
pub const SPEC_VERSION: &str = "1.1.0";

/// The `cniVersion`s of configurations the plugin accepts. Their results have the same shape
/// (podman 4.3 on Debian 12 calls with 1.0.0). 0.4.0 is not listed: its results differ
/// (`ips[].version`), and this plugin does not produce them.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The agent's socket when the configuration has no `"socket"` (the agent's default).
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";

/// Largest network configuration read from stdin, in bytes; more is refused.
pub const MAX_CONFIG: usize = 1 << 20;

/// Largest answer frame read from the agent, in bytes.
pub const MAX_ANSWER: u32 = 1 << 20;

/// How long ADD may take, connecting included: it may wait for a manager to grant the node
/// an address block.
pub const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long DEL may take, connecting included.
pub const DEL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long CHECK may take, connecting included.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long GC may take, connecting included: it may drop many attachments.
pub const GC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long STATUS may take, connecting included.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The error codes the plugin prints: the spec's (0 to 99), then shoal's own (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables (the message names them).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure, such as reading the configuration from stdin.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (the configuration is not a JSON object).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (no agent running, an agent too slow).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs.
    pub const NOT_AVAILABLE: u32 = 50;
    /// shoal: the agent refused the request (its line is the message).
    pub const AGENT_REFUSED: u32 = 100;
    /// shoal: the conversation with the agent broke, or its answer does not fit the request.
    pub const AGENT_PROTOCOL: u32 = 101;
}

/// The runtime's parameters, as found in the environment. Empty values count as absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`, as given (`K=V;K=V`).
    pub args: Option<String>,
    /// `CNI_PATH`. Read but not used: the plugin delegates to no other plugin, so it is not
    /// required either, even for GC.
    pub path: Option<String>,
}

impl Env {
    /// Reads the `CNI_*` variables through `lookup` (the process environment in `main.rs`, a
    /// map in tests).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }
}

/// A `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// VERSION, answered by the plugin alone.
    Version,
    /// An operation the agent carries out.
    Agent(CniCommand),
}

impl Command {
    /// Parses a `CNI_COMMAND` value (upper case, as the spec spells them).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "VERSION" => Command::Version,
            "ADD" => Command::Agent(CniCommand::Add),
            "DEL" => Command::Agent(CniCommand::Del),
            "CHECK" => Command::Agent(CniCommand::Check),
            "GC" => Command::Agent(CniCommand::Gc),
            "STATUS" => Command::Agent(CniCommand::Status),
            _ => return None,
        })
    }
}

/// The spec's name of an agent command.
pub fn command_name(command: CniCommand) -> &'static str {
    match command {
        CniCommand::Add => "ADD",
        CniCommand::Del => "DEL",
        CniCommand::Check => "CHECK",
        CniCommand::Gc => "GC",
        CniCommand::Status => "STATUS",
    }
}

/// How long the whole exchange with the agent (connect, request, answer) may take.
pub fn timeout(command: CniCommand) -> Duration {
    match command {
        CniCommand::Add => ADD_TIMEOUT,
        CniCommand::Del => DEL_TIMEOUT,
        CniCommand::Check => CHECK_TIMEOUT,
        CniCommand::Gc => GC_TIMEOUT,
        CniCommand::Status => STATUS_TIMEOUT,
    }
}

/// Why a call was refused before the agent was asked. [`Invalid::code`] is the spec's code;
/// the message names the variable or key at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// `CNI_COMMAND` is absent or empty.
    #[error("required env variables [CNI_COMMAND] missing")]
    NoCommand,
    /// `CNI_COMMAND` is not an operation of the spec.
    #[error("unknown CNI_COMMAND {0:?}")]
    UnknownCommand(String),
    /// Variables the command requires are absent or empty.
    #[error("required env variables [{}] missing for {command}", vars.join(","))]
    MissingEnv {
        /// The command.
        command: &'static str,
        /// The variables, in the spec's order.
        vars: Vec<&'static str>,
    },
    /// `CNI_CONTAINERID` has characters the spec does not allow.
    #[error("invalid characters in CNI_CONTAINERID {0:?}")]
    ContainerId(String),
    /// `CNI_IFNAME` is not a name Linux accepts for an interface.
    #[error("invalid CNI_IFNAME {name:?}: {rule}")]
    Ifname {
        /// The name.
        name: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// `CNI_NETNS` is not an absolute path (the agent opens it, from another directory).
    #[error("CNI_NETNS {0:?} is not an absolute path")]
    Netns(String),
    /// Reading stdin failed.
    #[error("cannot read the network configuration from stdin: {0}")]
    ReadStdin(String),
    /// stdin holds more than [`MAX_CONFIG`] bytes.
    #[error("the network configuration on stdin is over {MAX_CONFIG} bytes")]
    TooLarge,
    /// stdin is empty.
    #[error("no network configuration on stdin")]
    Empty,
    /// stdin is not JSON.
    #[error("the network configuration on stdin is not JSON: {0}")]
    NotJson(String),
    /// stdin is JSON, but not an object.
    #[error("the network configuration on stdin is not a JSON object")]
    NotObject,
    /// A required key is absent, empty or not a string.
    #[error("the network configuration has no {0:?} (a non-empty string)")]
    MissingKey(&'static str),
    /// `name` has characters the spec does not allow.
    #[error("invalid characters in network name {0:?}")]
    Name(String),
    /// `socket` is not a string holding an absolute path.
    #[error("\"socket\" {0:?} in the network configuration is not an absolute path")]
    Socket(String),
    /// `cniVersion` is not one of [`SUPPORTED_VERSIONS`].
    #[error("incompatible CNI versions: the configuration says {0:?}")]
    Version(String),
    /// GC and STATUS came with spec 1.1.0; an older configuration cannot ask for them.
    #[error("config version {version} does not allow {command}")]
    TooOld {
        /// The command.
        command: &'static str,
        /// The configuration's `cniVersion`.
        version: String,
    },
}

impl Invalid {
    /// The spec's error code.
    pub fn code(&self) -> u32 {
        match self {
            Invalid::NoCommand
            | Invalid::UnknownCommand(_)
            | Invalid::MissingEnv { .. }
            | Invalid::ContainerId(_)
            | Invalid::Ifname { .. }
            | Invalid::Netns(_) => code::INVALID_ENV,
            Invalid::ReadStdin(_) | Invalid::TooLarge => code::IO_FAILURE,
            Invalid::Empty | Invalid::NotJson(_) | Invalid::NotObject => code::DECODING_FAILURE,
            Invalid::MissingKey(_) | Invalid::Name(_) | Invalid::Socket(_) => code::INVALID_CONFIG,
            Invalid::Version(_) | Invalid::TooOld { .. } => code::INCOMPATIBLE_VERSION,
        }
    }

    /// What to do about it, for the error's `details`.
    pub fn details(&self) -> String {
        let versions = SUPPORTED_VERSIONS.join(", ");
        match self {
            Invalid::NoCommand | Invalid::UnknownCommand(_) => {
                "the container runtime sets CNI_COMMAND to ADD, DEL, CHECK, GC, STATUS or VERSION"
                    .into()
            }
            Invalid::MissingEnv { .. } => {
                "the container runtime sets these; run the plugin through a runtime (podman, \
                 containerd, cnitool)"
                    .into()
            }
            Invalid::ContainerId(_) => {
                "a container ID starts with a letter or a digit, followed by letters, digits, \
                 '_', '.' or '-'"
                    .into()
            }
            Invalid::Ifname { .. } => {
                "an interface name is 1 to 15 bytes, not \".\" or \"..\", without '/', ':' or \
                 whitespace"
                    .into()
            }
            Invalid::Netns(_) => "CNI_NETNS is a path such as /run/netns/NAME".into(),
            Invalid::ReadStdin(_) | Invalid::Empty => {
                "the container runtime writes the network configuration (JSON) on the plugin's \
                 standard input"
                    .into()
            }
            Invalid::TooLarge => format!("shoal-cni reads at most {MAX_CONFIG} bytes"),
            Invalid::NotJson(_) | Invalid::NotObject => {
                "the network configuration is a JSON object: {\"cniVersion\", \"name\", \
                 \"type\": \"shoal-cni\", \"network\", ...}"
                    .into()
            }
            Invalid::MissingKey("network") => {
                "set \"network\" to the shoal network to attach to (shoal network ls)".into()
            }
            Invalid::MissingKey("cniVersion") => {
                format!("set \"cniVersion\" to one of {versions}")
            }
            Invalid::MissingKey(_) => {
                "set \"name\" to the name of the network configuration \
                                       (a letter or a digit, then letters, digits, '_', '.' or '-')"
                    .into()
            }
            Invalid::Name(_) => {
                "a network name starts with a letter or a digit, followed by letters, digits, \
                 '_', '.' or '-'"
                    .into()
            }
            Invalid::Socket(_) => format!(
                "\"socket\" is the agent's Unix socket, an absolute path (default {DEFAULT_SOCKET})"
            ),
            Invalid::Version(_) => format!("shoal-cni supports cniVersion {versions}"),
            Invalid::TooOld { .. } => format!("set \"cniVersion\" to {SPEC_VERSION}"),
        }
    }

    /// The error as the plugin prints it.
    pub fn to_cni(&self) -> CniError {
        CniError {
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        }
    }
}

/// Why the agent gave no usable answer. Its `Display` is the whole story and what to do, and
/// becomes the error's `details`; [`AgentError::to_cni`] gives the short `msg` and the code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Nothing listens at the socket (absent, or refused): the agent is not running.
    #[error(
        "no shoal agent listens on unix://{socket} ({reason}); start it (systemctl start shoal, \
         or shoal agent), or set \"socket\" in the network configuration to where it listens"
    )]
    NotRunning {
        /// The socket path.
        socket: String,
        /// The OS error.
        reason: String,
    },
    /// Connecting failed otherwise (permissions, a path too long for a socket, ...).
    #[error(
        "cannot connect to the shoal agent at unix://{socket}: {reason}; the plugin must run as \
         root or as a member of the agent's --socket-group"
    )]
    Connect {
        /// The socket path.
        socket: String,
        /// The OS error.
        reason: String,
    },
    /// The agent did not answer in time.
    #[error(
        "the shoal agent at unix://{socket} did not answer {command} within {secs} s; see its \
         log (journalctl -u shoal)"
    )]
    Timeout {
        /// The socket path.
        socket: String,
        /// The command.
        command: &'static str,
        /// The time allowed.
        secs: u64,
    },
    /// The connection broke, or a frame could not be read.
    #[error(
        "the conversation with the shoal agent broke: {0}; is it the same version as shoal-cni?"
    )]
    Broken(String),
    /// The agent answered with one line of refusal (`Err` on the socket).
    #[error("{0}")]
    Refused(String),
    /// The agent's answer does not fit the request.
    #[error("the shoal agent gave an answer that does not fit the request: {0}; is it the same version as shoal-cni?")]
    Unexpected(String),
    /// The plugin could not set up its own IO (the async runtime).
    #[error("shoal-cni cannot start its async runtime: {0}")]
    Local(String),
}

impl AgentError {
    /// The error of a failed connect to `socket`: [`AgentError::NotRunning`] when nothing is
    /// there or nothing listens, [`AgentError::Connect`] otherwise.
    pub fn connect(socket: &Path, err: &std::io::Error) -> Self {
        let socket = socket.display().to_string();
        let reason = err.to_string();
        match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                AgentError::NotRunning { socket, reason }
            }
            _ => AgentError::Connect { socket, reason },
        }
    }

    /// The error as the plugin prints it for `command`. An agent that cannot be reached (or
    /// does not answer) is "not available" (50) to STATUS and "try again later" (11) to the
    /// others: DEL too, since without the agent nothing can be cleaned up, and a runtime that
    /// retries the DEL later lets the agent do it.
    pub fn to_cni(&self, command: CniCommand) -> CniError {
        let unavailable = |what: &str| {
            if command == CniCommand::Status {
                (
                    code::NOT_AVAILABLE,
                    format!("the plugin is not available: {what}"),
                )
            } else {
                (code::TRY_AGAIN_LATER, what.to_owned())
            }
        };
        let (code, msg) = match self {
            AgentError::NotRunning { .. } => unavailable("the shoal agent is not running"),
            AgentError::Connect { .. } => unavailable("cannot connect to the shoal agent"),
            AgentError::Timeout { .. } => unavailable("the shoal agent did not answer in time"),
            AgentError::Broken(_) | AgentError::Unexpected(_) => (
                code::AGENT_PROTOCOL,
                "the shoal agent's answer could not be used".to_owned(),
            ),
            // The agent's line is the message; it is short and says what to do.
            AgentError::Refused(line) => (code::AGENT_REFUSED, line.clone()),
            AgentError::Local(_) => (code::IO_FAILURE, "shoal-cni cannot do IO".to_owned()),
        };
        let details = match self {
            AgentError::Refused(_) => "the shoal agent refused the request".to_owned(),
            other => other.to_string(),
        };
        CniError { code, msg, details }
    }
}

/// What the plugin prints on stdout and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// One JSON document (a result, a version answer or an error), or nothing.
    pub stdout: Option<String>,
    /// Exit 0 (`true`) or 1.
    pub success: bool,
}

impl Output {
    /// Success with nothing to print.
    pub fn silent() -> Self {
        Output {
            stdout: None,
            success: true,
        }
    }

    /// The error JSON of section 5 (`cniVersion`, `code`, `msg`, `details`), exit 1.
    pub fn error(cni_version: &str, error: &CniError) -> Self {
        #[derive(Serialize)]
        struct ErrorResult<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        Output {
            stdout: Some(to_json(&ErrorResult {
                cni_version,
                code: error.code,
                msg: &error.msg,
                details: &error.details,
            })),
            success: false,
        }
    }

    /// VERSION's answer: `cni_version` (the input's) and [`SUPPORTED_VERSIONS`], exit 0.
    pub fn version(cni_version: &str) -> Self {
        #[derive(Serialize)]
        struct VersionResult<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            #[serde(rename = "supportedVersions")]
            supported_versions: &'a [&'a str],
        }
        Output {
            stdout: Some(to_json(&VersionResult {
                cni_version,
                supported_versions: SUPPORTED_VERSIONS,
            })),
            success: true,
        }
    }
}

/// Serializes `value`; the plugin's own types cannot fail, but if one did, an error JSON
/// written by hand takes its place rather than a panic.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| {
        format!(
            r#"{{"cniVersion":"{SPEC_VERSION}","code":{},"msg":"shoal-cni cannot encode its output","details":""}}"#,
            code::AGENT_PROTOCOL
        )
    })
}

/// What to do with a call.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Print this and exit, without the agent: VERSION's answer, or a refused call.
    Done(Output),
    /// Ask the agent, then print what [`Call::finish`] makes of its answer.
    Call(Call),
}

/// One request for the agent, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The request (wrapped in `Request::Cni` on the socket).
    pub request: CniRequest,
    /// The agent's socket: the configuration's `"socket"`, else [`DEFAULT_SOCKET`].
    pub socket: PathBuf,
    /// How long the exchange may take ([`timeout`]).
    pub timeout: Duration,
    /// The configuration's `cniVersion`, for the output.
    pub cni_version: String,
}

impl Call {
    /// The error for an exchange that ran out of [`Call::timeout`].
    pub fn timed_out(&self) -> AgentError {
        AgentError::Timeout {
            socket: self.socket.display().to_string(),
            command: command_name(self.request.command),
            secs: self.timeout.as_secs(),
        }
    }

    /// What to print, given the agent's answer (or why there is none).
    ///
    /// - `Done(Some(result))` to ADD: the result, with `cniVersion` set to the
    ///   configuration's if the agent left it out; a result that is not a JSON object is an
    ///   error. `Done(None)` to ADD is an error too: the spec has ADD print a result, and a
    ///   runtime given none would fail to parse it anyway (it then calls DEL, which cleans up).
    /// - `Done(_)` to the others: nothing (they print nothing on success), exit 0.
    /// - `Failed(error)`: that error, exit 1.
    /// - A refusal line, another reply, or no answer: [`AgentError::to_cni`], exit 1.
    pub fn finish(&self, outcome: Result<Response, AgentError>) -> Output {
        let command = self.request.command;
        let failed = |e: AgentError| Output::error(&self.cni_version, &e.to_cni(command));
        match outcome {
            Ok(Ok(Reply::Cni(CniAnswer::Done(result)))) => match (command, result) {
                (CniCommand::Add, Some(Value::Object(mut result))) => {
                    result
                        .entry("cniVersion")
                        .or_insert_with(|| Value::String(self.cni_version.clone()));
                    Output {
                        stdout: Some(to_json(&result)),
                        success: true,
                    }
                }
                (CniCommand::Add, Some(_)) => failed(AgentError::Unexpected(
                    "an ADD result that is not a JSON object".into(),
                )),
                (CniCommand::Add, None) => {
                    failed(AgentError::Unexpected("ADD done, without a result".into()))
                }
                _ => Output::silent(),
            },
            Ok(Ok(Reply::Cni(CniAnswer::Failed(error)))) => {
                Output::error(&self.cni_version, &error)
            }
            Ok(Ok(other)) => failed(AgentError::Unexpected(format!(
                "a {} reply",
                reply_name(&other)
            ))),
            Ok(Err(line)) => failed(AgentError::Refused(line)),
            Err(e) => failed(e),
        }
    }
}

/// The wire name of a reply's variant (`"left"`, `"join_token"`), without its contents: a
/// reply that is not for the plugin may hold secrets (a join token), never to be printed.
fn reply_name(reply: &Reply) -> String {
    match serde_json::to_value(reply) {
        Ok(Value::String(name)) => name,
        Ok(Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => "malformed".to_owned(),
    }
}

/// Decides what to do with one call: `env` from the environment, `stdin` the bytes read from
/// standard input (at most [`MAX_CONFIG`] + 1 of them; more means too large), or why they
/// could not be read.
///
/// Checks in the order of the spec's reference plugins: `CNI_COMMAND`, the variables the
/// command requires and their form, then the configuration (JSON, `cniVersion`, `name`,
/// `network`, `socket`). VERSION needs only `CNI_COMMAND`, and reads `cniVersion` from stdin
/// if it is there. Errors carry the input's `cniVersion` if it has one, else
/// [`SPEC_VERSION`].
pub fn plan(env: &Env, stdin: Result<&[u8], std::io::Error>) -> Plan {
    let config = parse_config(stdin);
    let version = config
        .as_ref()
        .ok()
        .and_then(reported_version)
        .unwrap_or(SPEC_VERSION)
        .to_owned();
    match decide(env, config) {
        Ok(None) => Plan::Done(Output::version(&version)),
        Ok(Some(call)) => Plan::Call(call),
        Err(invalid) => Plan::Done(Output::error(&version, &invalid.to_cni())),
    }
}

/// The input's `cniVersion`, if it is a string that looks like a version (digits and dots).
fn reported_version(config: &Value) -> Option<&str> {
    let v = config.get("cniVersion")?.as_str()?;
    let looks_right = (1..=16).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars().all(|c| c.is_ascii_digit() || c == '.');
    looks_right.then_some(v)
}

/// Reads stdin's bytes as a JSON object.
fn parse_config(stdin: Result<&[u8], std::io::Error>) -> Result<Value, Invalid> {
    let bytes = stdin.map_err(|e| Invalid::ReadStdin(e.to_string()))?;
    if bytes.len() > MAX_CONFIG {
        return Err(Invalid::TooLarge);
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Invalid::Empty);
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Invalid::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(Invalid::NotObject);
    }
    Ok(value)
}

/// The checks of [`plan`]: `None` for VERSION, else the call to make.
fn decide(env: &Env, config: Result<Value, Invalid>) -> Result<Option<Call>, Invalid> {
    let command = match env.command.as_deref() {
        None => return Err(Invalid::NoCommand),
        Some(text) => Command::parse(text).ok_or_else(|| Invalid::UnknownCommand(text.into()))?,
    };
    let command = match command {
        Command::Version => return Ok(None),
        Command::Agent(command) => command,
    };
    let attachment = matches!(
        command,
        CniCommand::Add | CniCommand::Del | CniCommand::Check
    );
    if attachment {
        check_env(env, command)?;
    }
    let config = config?;
    let settings = check_config(&config, command)?;
    // GC and STATUS concern the network, not an attachment: no attachment parameters.
    let request = CniRequest {
        command,
        container_id: env.container_id.clone().filter(|_| attachment),
        netns: env.netns.clone().filter(|_| attachment),
        ifname: env.ifname.clone().filter(|_| attachment),
        args: env.args.clone().filter(|_| attachment),
        config,
    };
    Ok(Some(Call {
        request,
        socket: settings.socket,
        timeout: timeout(command),
        cni_version: settings.cni_version,
    }))
}

/// The attachment parameters of ADD, DEL and CHECK: present (`CNI_NETNS` optional for DEL)
/// and well formed.
fn check_env(env: &Env, command: CniCommand) -> Result<(), Invalid> {
    let mut missing = Vec::new();
    if env.container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if env.netns.is_none() && command != CniCommand::Del {
        missing.push("CNI_NETNS");
    }
    if env.ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(Invalid::MissingEnv {
            command: command_name(command),
            vars: missing,
        });
    }
    if let Some(id) = &env.container_id {
        if !valid_id(id) {
            return Err(Invalid::ContainerId(id.clone()));
        }
    }
    if let Some(name) = &env.ifname {
        check_ifname(name)?;
    }
    if let Some(netns) = &env.netns {
        if !netns.starts_with('/') {
            return Err(Invalid::Netns(netns.clone()));
        }
    }
    Ok(())
}

/// A container ID or network name as the spec allows: an ASCII letter or digit, then any of
/// letters, digits, `_`, `.`, `-`.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An interface name as Linux (and the spec's reference plugins) accept it: 1 to 15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace.
pub fn check_ifname(name: &str) -> Result<(), Invalid> {
    let rule = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is \".\" or \"..\"")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("it contains '/', ':' or whitespace")
    } else {
        None
    };
    match rule {
        None => Ok(()),
        Some(rule) => Err(Invalid::Ifname {
            name: name.to_owned(),
            rule,
        }),
    }
}

/// What the plugin itself takes from the configuration.
struct Settings {
    cni_version: String,
    socket: PathBuf,
}

/// The configuration's keys the plugin relies on; the rest is the agent's to read.
fn check_config(config: &Value, command: CniCommand) -> Result<Settings, Invalid> {
    let string = |key: &'static str| {
        config
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(Invalid::MissingKey(key))
    };
    let cni_version = string("cniVersion")?;
    if !SUPPORTED_VERSIONS.contains(&cni_version) {
        return Err(Invalid::Version(cni_version.to_owned()));
    }
    let name = string("name")?;
    if !valid_id(name) {
        return Err(Invalid::Name(name.to_owned()));
    }
    string("network")?;
    let socket = match config.get("socket") {
        None => PathBuf::from(DEFAULT_SOCKET),
        Some(Value::String(text)) if text.starts_with('/') => PathBuf::from(text),
        Some(Value::String(text)) => return Err(Invalid::Socket(text.clone())),
        Some(other) => return Err(Invalid::Socket(other.to_string())),
    };
    if matches!(command, CniCommand::Gc | CniCommand::Status) && cni_version != "1.1.0" {
        return Err(Invalid::TooOld {
            command: command_name(command),
            version: cni_version.to_owned(),
        });
    }
    Ok(Settings {
        cni_version: cni_version.to_owned(),
        socket,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::from_lookup(&|name| map.get(name).cloned())
    }

    fn add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c0ffee_1.a-b"),
            ("CNI_NETNS", "/run/netns/blue"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    fn with(mut pairs: Vec<(&'static str, &'static str)>, k: &'static str, v: &'static str) -> Env {
        pairs.retain(|(key, _)| *key != k);
        pairs.push((k, v));
        env(&pairs)
    }

    fn config() -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "web-net",
            "type": "shoal-cni",
            "network": "web",
            "socket": "/tmp/agent.sock",
            "runtimeConfig": {"ips": ["10.0.1.7/24"]},
        })
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    /// The printed JSON of a refused call.
    fn refused(env: &Env, stdin: &[u8]) -> Value {
        match plan(env, Ok(stdin)) {
            Plan::Done(Output {
                stdout: Some(out),
                success: false,
            }) => serde_json::from_str(&out).unwrap(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn code_of(env: &Env, stdin: &[u8]) -> u64 {
        refused(env, stdin)["code"].as_u64().unwrap()
    }

    fn call(env: &Env, stdin: &[u8]) -> Call {
        match plan(env, Ok(stdin)) {
            Plan::Call(call) => call,
            other => panic!("expected a call, got {other:?}"),
        }
    }

    #[test]
    fn env_reads_the_cni_variables_and_drops_empty_ones() {
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", ""), ("OTHER", "x")]);
        assert_eq!(
            e,
            Env {
                command: Some("DEL".into()),
                ..Env::default()
            }
        );
        let e = env(&add_env());
        assert_eq!(e.container_id.as_deref(), Some("c0ffee_1.a-b"));
        assert_eq!(e.path.as_deref(), Some("/opt/cni/bin"));
    }

    #[test]
    fn version_is_answered_alone_with_the_input_version() {
        let e = env(&[("CNI_COMMAND", "VERSION")]);
        let out = |stdin: &[u8]| match plan(&e, Ok(stdin)) {
            Plan::Done(out) => {
                assert!(out.success);
                serde_json::from_str::<Value>(&out.stdout.unwrap()).unwrap()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            out(br#"{"cniVersion":"1.0.0"}"#),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
        // No input, garbage, or a version that is not one: the spec's version.
        for stdin in [&b""[..], b"not json", br#"{"cniVersion":"<x>"}"#] {
            assert_eq!(out(stdin)["cniVersion"], "1.1.0");
        }
        // An unreadable stdin does not matter to VERSION either.
        let e2 = e.clone();
        assert!(matches!(
            plan(&e2, Err(std::io::Error::other("gone"))),
            Plan::Done(Output { success: true, .. })
        ));
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        let v = refused(&env(&[]), &bytes(&config()));
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));
        let v = refused(&env(&[("CNI_COMMAND", "add")]), &bytes(&config()));
        assert_eq!(v["code"], 4);
        assert_eq!(v["msg"], r#"unknown CNI_COMMAND "add""#);
    }

    #[test]
    fn error_json_has_the_spec_shape() {
        let v = refused(&env(&[("CNI_COMMAND", "ADD")]), &bytes(&config()));
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "code": 4,
                "msg": "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME] missing for ADD",
                "details": "the container runtime sets these; run the plugin through a runtime \
                            (podman, containerd, cnitool)",
            })
        );
        // The configuration's version is echoed.
        let mut c = config();
        c["cniVersion"] = json!("1.0.0");
        assert_eq!(
            refused(&env(&[("CNI_COMMAND", "ADD")]), &bytes(&c))["cniVersion"],
            "1.0.0"
        );
        let out = Output::error("1.1.0", &CniError::new(3, "gone"));
        assert_eq!(
            out.stdout.as_deref(),
            Some(r#"{"cniVersion":"1.1.0","code":3,"msg":"gone","details":""}"#)
        );
        assert!(!out.success);
    }

    #[test]
    fn attachment_commands_need_their_variables() {
        let c = bytes(&config());
        for (cmd, needs_netns) in [("ADD", true), ("CHECK", true), ("DEL", false)] {
            let mut pairs = add_env();
            pairs.retain(|(k, _)| *k != "CNI_NETNS");
            pairs.retain(|(k, _)| *k != "CNI_COMMAND");
            pairs.push(("CNI_COMMAND", cmd));
            let e = env(&pairs);
            if needs_netns {
                let v = refused(&e, &c);
                assert_eq!(v["code"], 4, "{cmd}");
                assert_eq!(
                    v["msg"],
                    format!("required env variables [CNI_NETNS] missing for {cmd}")
                );
            } else {
                assert_eq!(call(&e, &c).request.netns, None);
            }
            for var in ["CNI_CONTAINERID", "CNI_IFNAME"] {
                let v = refused(&with(pairs.clone(), var, ""), &c);
                assert_eq!(v["code"], 4, "{cmd} {var}");
                assert!(v["msg"].as_str().unwrap().contains(var), "{v}");
            }
        }
    }

    #[test]
    fn network_commands_need_no_attachment_and_send_none() {
        let c = bytes(&config());
        for cmd in ["GC", "STATUS"] {
            // Stray attachment variables are not passed on.
            let call = call(&with(add_env(), "CNI_COMMAND", cmd), &c);
            assert_eq!(call.request.container_id, None);
            assert_eq!(call.request.netns, None);
            assert_eq!(call.request.ifname, None);
            assert_eq!(call.request.args, None);
            // And none are needed.
            let bare = env(&[("CNI_COMMAND", cmd)]);
            assert!(matches!(plan(&bare, Ok(&c)), Plan::Call(_)));
        }
    }

    #[test]
    fn container_id_follows_the_spec() {
        for good in ["a", "0", "abc_1.2-3", "F00"] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", "_a", ".a", "-a", "a/b", "a b", "a:b", "é", "a\n"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        let v = refused(
            &with(add_env(), "CNI_CONTAINERID", "../etc"),
            &bytes(&config()),
        );
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    }

    #[test]
    fn ifname_follows_the_linux_rules() {
        for good in ["eth0", "a", "123456789012345", "net-1.x_y"] {
            assert_eq!(check_ifname(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "é123456789012345",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        // Bytes, not characters: 8 two-byte characters are 16 bytes.
        assert!(check_ifname("éééééééé").is_err());
        let v = refused(&with(add_env(), "CNI_IFNAME", "e:0"), &bytes(&config()));
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"));
    }

    #[test]
    fn netns_must_be_an_absolute_path() {
        let v = refused(
            &with(add_env(), "CNI_NETNS", "netns/blue"),
            &bytes(&config()),
        );
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_NETNS"));
    }

    #[test]
    fn stdin_that_is_not_a_json_object_is_code_6() {
        let e = env(&add_env());
        for stdin in [
            &b""[..],
            b" \n",
            b"garbage",
            b"{\"cniVersion\":",
            b"[1,2]",
            b"\"x\"",
        ] {
            assert_eq!(
                code_of(&e, stdin),
                6,
                "{:?}",
                String::from_utf8_lossy(stdin)
            );
        }
    }

    #[test]
    fn stdin_too_large_or_unreadable_is_code_5() {
        let e = env(&add_env());
        let big = vec![b' '; MAX_CONFIG + 1];
        assert_eq!(code_of(&e, &big), 5);
        match plan(&e, Err(std::io::Error::other("EIO"))) {
            Plan::Done(out) => {
                let v: Value = serde_json::from_str(&out.stdout.unwrap()).unwrap();
                assert_eq!(v["code"], 5);
                assert!(v["msg"].as_str().unwrap().contains("EIO"));
            }
            other => panic!("{other:?}"),
        }
        // Exactly the limit is accepted (trailing whitespace is valid JSON).
        let mut at_limit = bytes(&config());
        at_limit.resize(MAX_CONFIG, b' ');
        assert!(matches!(plan(&e, Ok(&at_limit)), Plan::Call(_)));
    }

    #[test]
    fn config_needs_version_name_and_network() {
        let e = env(&add_env());
        for key in ["cniVersion", "name", "network"] {
            let mut c = config();
            c.as_object_mut().unwrap().remove(key);
            let v = refused(&e, &bytes(&c));
            assert_eq!(v["code"], 7, "{key}");
            assert!(v["msg"].as_str().unwrap().contains(key), "{v}");
            for wrong in [json!(""), json!(3), json!(null)] {
                let mut c = config();
                c[key] = wrong;
                assert_eq!(code_of(&e, &bytes(&c)), 7, "{key}");
            }
        }
        let mut c = config();
        c["name"] = json!("web net");
        assert_eq!(code_of(&e, &bytes(&c)), 7);
        // `type` is not checked: the runtime chose this binary by it.
        let mut c = config();
        c["type"] = json!("something-else");
        assert!(matches!(plan(&e, Ok(&bytes(&c))), Plan::Call(_)));
    }

    #[test]
    fn socket_is_optional_but_absolute() {
        let e = env(&add_env());
        let mut c = config();
        c.as_object_mut().unwrap().remove("socket");
        assert_eq!(call(&e, &bytes(&c)).socket, Path::new(DEFAULT_SOCKET));
        for bad in [json!("run/shoal.sock"), json!(""), json!(1)] {
            let mut c = config();
            c["socket"] = bad;
            assert_eq!(code_of(&e, &bytes(&c)), 7);
        }
    }

    #[test]
    fn versions_outside_1_0_and_1_1_are_code_1() {
        let e = env(&add_env());
        for bad in ["0.4.0", "0.3.1", "2.0.0", "1.1"] {
            let mut c = config();
            c["cniVersion"] = json!(bad);
            let v = refused(&e, &bytes(&c));
            assert_eq!(v["code"], 1, "{bad}");
            assert_eq!(v["cniVersion"], bad);
        }
        let mut c = config();
        c["cniVersion"] = json!("1.0.0");
        assert_eq!(call(&e, &bytes(&c)).cni_version, "1.0.0");
        // GC and STATUS came with 1.1.0.
        for cmd in ["GC", "STATUS"] {
            let v = refused(&env(&[("CNI_COMMAND", cmd)]), &bytes(&c));
            assert_eq!(v["code"], 1);
            assert_eq!(
                v["msg"],
                format!("config version 1.0.0 does not allow {cmd}")
            );
        }
    }

    #[test]
    fn the_request_carries_env_and_whole_config() {
        let c = config();
        let call = call(&env(&add_env()), &bytes(&c));
        assert_eq!(
            call,
            Call {
                request: CniRequest {
                    command: CniCommand::Add,
                    container_id: Some("c0ffee_1.a-b".into()),
                    netns: Some("/run/netns/blue".into()),
                    ifname: Some("eth0".into()),
                    args: Some("IgnoreUnknown=1;K8S_POD_NAME=web".into()),
                    config: c,
                },
                socket: PathBuf::from("/tmp/agent.sock"),
                timeout: ADD_TIMEOUT,
                cni_version: "1.1.0".into(),
            }
        );
        let wire = serde_json::to_value(shoal_proto::api::Request::Cni(call.request)).unwrap();
        assert_eq!(wire["cni"]["command"], "ADD");
    }

    #[test]
    fn each_command_has_its_timeout() {
        let c = bytes(&config());
        for (cmd, t) in [
            ("ADD", ADD_TIMEOUT),
            ("DEL", DEL_TIMEOUT),
            ("CHECK", CHECK_TIMEOUT),
            ("GC", GC_TIMEOUT),
            ("STATUS", STATUS_TIMEOUT),
        ] {
            assert_eq!(call(&with(add_env(), "CNI_COMMAND", cmd), &c).timeout, t);
        }
    }

    fn finish(cmd: &'static str, outcome: Result<Response, AgentError>) -> (Option<Value>, bool) {
        let call = call(&with(add_env(), "CNI_COMMAND", cmd), &bytes(&config()));
        let out = call.finish(outcome);
        (
            out.stdout.map(|s| serde_json::from_str(&s).unwrap()),
            out.success,
        )
    }

    fn done(v: Option<Value>) -> Result<Response, AgentError> {
        Ok(Ok(Reply::Cni(CniAnswer::Done(v))))
    }

    #[test]
    fn add_prints_the_agents_result() {
        let result = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:01:07", "sandbox": "/run/netns/blue"}],
            "ips": [{"address": "10.0.1.7/24", "gateway": "10.0.1.1", "interface": 0}],
        });
        assert_eq!(
            finish("ADD", done(Some(result.clone()))),
            (Some(result), true)
        );
        // A result without its version gets the configuration's.
        let (out, ok) = finish("ADD", done(Some(json!({"ips": []}))));
        assert!(ok);
        assert_eq!(out.unwrap()["cniVersion"], "1.1.0");
    }

    #[test]
    fn add_without_a_usable_result_is_an_error() {
        for answer in [None, Some(json!([1])), Some(json!("x"))] {
            let (out, ok) = finish("ADD", done(answer));
            assert!(!ok);
            assert_eq!(out.unwrap()["code"], code::AGENT_PROTOCOL);
        }
    }

    #[test]
    fn other_commands_print_nothing_on_success() {
        for cmd in ["DEL", "CHECK", "GC", "STATUS"] {
            assert_eq!(finish(cmd, done(None)), (None, true), "{cmd}");
            assert_eq!(finish(cmd, done(Some(json!({})))), (None, true), "{cmd}");
        }
    }

    #[test]
    fn the_agents_error_is_printed_as_is() {
        let e = CniError {
            code: 3,
            msg: "no such container".into(),
            details: "x".into(),
        };
        let (out, ok) = finish("CHECK", Ok(Ok(Reply::Cni(CniAnswer::Failed(e)))));
        assert!(!ok);
        assert_eq!(
            out.unwrap(),
            json!({"cniVersion": "1.1.0", "code": 3, "msg": "no such container", "details": "x"})
        );
    }

    #[test]
    fn refusals_and_other_replies_are_shoal_codes() {
        let (out, ok) = finish("ADD", Ok(Err("this node is not in a swarm".into())));
        assert!(!ok);
        let out = out.unwrap();
        assert_eq!(out["code"], 100);
        assert_eq!(out["msg"], "this node is not in a swarm");
        let (out, ok) = finish("DEL", Ok(Ok(Reply::Left)));
        assert!(!ok);
        let out = out.unwrap();
        assert_eq!(out["code"], 101);
        assert!(out["details"].as_str().unwrap().contains("a left reply"));
        // A reply that is not for the plugin is named, never shown: it may hold a secret.
        let secret = Reply::JoinToken {
            role: shoal_proto::view::Role::Worker,
            token: "SWMTKN-1-secret".into(),
            join_addr: "192.0.2.1:2377".parse().unwrap(),
            rotated: false,
        };
        let (out, _) = finish("ADD", Ok(Ok(secret)));
        let out = out.unwrap().to_string();
        assert!(out.contains("a join_token reply"), "{out}");
        assert!(!out.contains("SWMTKN"), "{out}");
        let (out, _) = finish("DEL", Err(AgentError::Broken("eof".into())));
        assert_eq!(out.unwrap()["code"], 101);
    }

    #[test]
    fn no_agent_is_code_11_or_50_for_status() {
        let socket = Path::new("/run/shoal/x.sock");
        let absent = AgentError::connect(socket, &std::io::ErrorKind::NotFound.into());
        let refused = AgentError::connect(socket, &std::io::ErrorKind::ConnectionRefused.into());
        let denied = AgentError::connect(socket, &std::io::ErrorKind::PermissionDenied.into());
        assert!(matches!(absent, AgentError::NotRunning { .. }));
        assert!(matches!(refused, AgentError::NotRunning { .. }));
        assert!(matches!(denied, AgentError::Connect { .. }));
        for cmd in ["ADD", "DEL", "CHECK", "GC"] {
            let (out, ok) = finish(cmd, Err(absent.clone()));
            assert!(!ok);
            let out = out.unwrap();
            assert_eq!(out["code"], 11, "{cmd}");
            assert_eq!(out["msg"], "the shoal agent is not running");
            let details = out["details"].as_str().unwrap();
            assert!(details.contains("unix:///run/shoal/x.sock"), "{details}");
            assert!(details.contains("systemctl start shoal"), "{details}");
        }
        let (out, _) = finish("STATUS", Err(absent));
        let out = out.unwrap();
        assert_eq!(out["code"], 50);
        assert!(out["msg"]
            .as_str()
            .unwrap()
            .starts_with("the plugin is not available"));
        assert!(out["details"]
            .as_str()
            .unwrap()
            .contains("/run/shoal/x.sock"));
        assert_eq!(finish("STATUS", Err(denied)).0.unwrap()["code"], 50);
    }

    #[test]
    fn a_timeout_names_the_command_and_the_time() {
        let call = call(&env(&add_env()), &bytes(&config()));
        let e = call.timed_out();
        assert_eq!(
            e.to_string(),
            "the shoal agent at unix:///tmp/agent.sock did not answer ADD within 30 s; see its \
             log (journalctl -u shoal)"
        );
        assert_eq!(e.to_cni(CniCommand::Add).code, 11);
        assert_eq!(e.to_cni(CniCommand::Status).code, 50);
    }
}
