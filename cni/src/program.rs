//! The program: reads the `CNI_*` environment and the configuration on stdin, asks the
//! agent if the call needs it (one request on its Unix socket, under a deadline), prints the
//! result or the error JSON on stdout, and gives the exit status. The decisions are in
//! [`crate::plan`] and [`crate::Call::finish`]; this module only does the IO.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;

use crate::{AgentError, Call, Env, Output, Plan, MAX_ANSWER, MAX_CONFIG};
use shoal_proto::api::{read_frame_limited, write_frame, Request, Response};
use tokio::net::UnixStream;

/// The whole `shoal-cni` program (its binary calls this; so does the netns tests' copy).
pub fn main() -> ExitCode {
    let env = Env::from_lookup(&|name| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        // Kept (lossily), so the checks name the variable instead of calling it missing.
        Err(std::env::VarError::NotUnicode(raw)) => Some(raw.to_string_lossy().into_owned()),
    });
    let mut stdin = Vec::new();
    let read = read_stdin(&mut stdin).map(|()| stdin.as_slice());
    let output = match crate::plan(&env, read) {
        Plan::Done(output) => output,
        Plan::Call(call) => call.finish(exchange(&call)),
    };
    print(&output)
}

/// Reads at most [`MAX_CONFIG`] + 1 bytes of stdin (one more than allowed, so that too much
/// is seen). A terminal is not read: someone ran the plugin by hand, and VERSION should not
/// wait for input; other commands then see no configuration and say so.
fn read_stdin(buf: &mut Vec<u8>) -> std::io::Result<()> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(());
    }
    let limit = u64::try_from(MAX_CONFIG)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    stdin.lock().take(limit).read_to_end(buf)?;
    Ok(())
}

/// One request to the agent and its answer, within the call's timeout.
fn exchange(call: &Call) -> Result<Response, AgentError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| AgentError::Local(e.to_string()))?;
    runtime.block_on(async {
        match tokio::time::timeout(call.timeout, talk(call)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(call.timed_out()),
        }
    })
}

async fn talk(call: &Call) -> Result<Response, AgentError> {
    let mut stream = UnixStream::connect(&call.socket)
        .await
        .map_err(|e| AgentError::connect(&call.socket, &e))?;
    write_frame(&mut stream, &Request::Cni(call.request.clone()))
        .await
        .map_err(|e| AgentError::Broken(e.to_string()))?;
    match read_frame_limited::<_, Response>(&mut stream, MAX_ANSWER).await {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(AgentError::Broken(
            "the agent closed the connection without an answer".into(),
        )),
        Err(e) => Err(AgentError::Broken(e.to_string())),
    }
}

/// Prints the output on stdout and gives the exit status. An output that cannot be written
/// fails the call: the runtime would not see the result.
fn print(output: &Output) -> ExitCode {
    let written = match &output.stdout {
        None => Ok(()),
        Some(text) => {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{text}").and_then(|()| stdout.flush())
        }
    };
    if output.success && written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
