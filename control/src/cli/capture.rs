//! `shoal capture`: a live pcapng copy of what this node's data path handles.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::api::{
    read_frame, read_raw_frame, write_frame, CaptureFrame, CaptureRequest, Reply, Request, Response,
};
use crate::cli::{unexpected, CliError};

/// How long the stream may be quiet before what is buffered goes to the file.
const FLUSH_AFTER: Duration = Duration::from_millis(200);

/// `shoal capture` flags.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("layer").multiple(false))]
pub struct Args {
    /// The network.
    #[arg(long, default_value = "ingress")]
    network: String,
    /// Only packets to or from this node (host name, node ID or unique ID prefix).
    #[arg(long, value_name = "NODE")]
    peer: Option<String>,
    /// Only the decrypted inner frames.
    #[arg(long, group = "layer")]
    inner: bool,
    /// Only the outer datagrams, as sealed on the wire.
    #[arg(long, group = "layer")]
    outer: bool,
    /// Both (the default).
    #[arg(long, group = "layer")]
    both: bool,
    /// Stop after this many packets.
    #[arg(short = 'c', long = "count", value_name = "COUNT")]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Write pcapng to this file; `-` for standard output.
    #[arg(short = 'w', value_name = "FILE")]
    write: PathBuf,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a positive number of seconds"))
}

/// Where the pcapng goes.
enum Sink {
    Stdout(std::io::Stdout),
    File(std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn open(path: &Path) -> Result<Sink, CliError> {
        if path == Path::new("-") {
            return Ok(Sink::Stdout(std::io::stdout()));
        }
        let file = std::fs::File::create(path)
            .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", path.display())))?;
        Ok(Sink::File(std::io::BufWriter::with_capacity(1 << 16, file)))
    }

    /// Writes and, for a pipe, flushes (so `| tshark -r -` sees packets as they come).
    /// `Ok(false)` when the reader of standard output went away.
    fn write(&mut self, bytes: &[u8]) -> Result<bool, CliError> {
        let r = match self {
            Sink::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(bytes).and_then(|()| s.flush())
            }
            Sink::File(f) => f.write_all(bytes),
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(CliError::Output(e)),
            Ok(()) => Ok(true),
        }
    }

    /// Pushes what is buffered to the file (standard output is never buffered here).
    fn flush(&mut self) -> Result<(), CliError> {
        match self {
            Sink::Stdout(_) => Ok(()),
            Sink::File(f) => f.flush().map_err(CliError::Output),
        }
    }
}

/// Runs `shoal capture`.
pub async fn run(args: Args, socket: &Path) -> Result<(), CliError> {
    let (inner, outer) = match (args.inner, args.outer) {
        (true, _) => (true, false),
        (_, true) => (false, true),
        _ => (true, true),
    };
    if args.count == Some(0) {
        return Err(CliError::Usage("-c COUNT must be at least 1".into()));
    }
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|_| CliError::Connect(socket.display().to_string()))?;
    let request = Request::Capture(CaptureRequest {
        network: args.network,
        peer: args.peer,
        inner,
        outer,
    });
    let protocol = |e: crate::api::FrameError| CliError::Protocol(e.to_string());
    write_frame(&mut stream, &request).await.map_err(protocol)?;
    let response: Option<Response> = read_frame(&mut stream).await.map_err(protocol)?;
    match response {
        None => {
            return Err(CliError::Protocol(
                "the agent closed the connection without an answer".into(),
            ))
        }
        Some(Err(message)) => return Err(CliError::Daemon(message)),
        Some(Ok(Reply::Capturing)) => {}
        Some(Ok(other)) => return Err(unexpected(&other)),
    }
    // Open the output only once the agent agreed, so a refused capture leaves no file.
    let mut out = Sink::open(&args.write)?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let (mut packets, mut lost, mut header, mut dirty) = (0u64, 0u64, true, false);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        if args.count.is_some_and(|c| packets >= c) {
            break;
        }
        let frame = tokio::select! {
            f = read_raw_frame(&mut stream) => f.map_err(protocol)?,
            () = sleep_until(deadline) => break,
            _ = &mut interrupt => break,
            // A quiet moment: make what was captured so far readable in the file.
            () = tokio::time::sleep(FLUSH_AFTER), if dirty => {
                out.flush()?;
                dirty = false;
                continue;
            }
        };
        let Some(frame) = frame.and_then(CaptureFrame::decode) else {
            // The agent ended the stream (its data path stopped).
            break;
        };
        lost = frame.lost;
        if !out.write(&frame.pcapng)? {
            break;
        }
        if std::mem::take(&mut header) {
            // The file is a valid (empty) capture from the start.
            out.flush()?;
        } else {
            packets += 1;
            dirty = true;
        }
    }
    out.flush()?;
    let mut err = std::io::stderr().lock();
    // As tcpdump does: the summary on stderr, so `-w -` output stays clean.
    let _ = writeln!(err, "{packets} packets captured");
    let _ = writeln!(err, "{lost} packets dropped by the agent (reader too slow)");
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
