//! Readiness for the service manager (systemd's `sd_notify` protocol, `Type=notify`): once
//! the agent's socket is bound and its state is up it sends `READY=1` and a `STATUS=` line as
//! one datagram to the Unix socket named by `$NOTIFY_SOCKET`, and `STOPPING=1` when it shuts
//! down. Without `$NOTIFY_SOCKET` (the agent run by hand, by the lab, by tests) nothing is sent.
//!
//! `shoal agent` takes the variable out of its environment at start ([`take_env`], before any
//! thread runs), so nothing the agent starts inherits it.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

/// The variable systemd sets for a `Type=notify` service.
pub const ENV: &str = "NOTIFY_SOCKET";

static TAKEN: OnceLock<Option<OsString>> = OnceLock::new();

/// Reads `$NOTIFY_SOCKET` and removes it from the environment. Call it while the process has
/// one thread (before the async runtime starts): changing the environment is not safe while
/// other threads may read it.
pub fn take_env() {
    let value = std::env::var_os(ENV);
    if value.is_some() {
        std::env::remove_var(ENV);
    }
    let _ = TAKEN.set(value);
}

fn target() -> Option<OsString> {
    match TAKEN.get() {
        Some(taken) => taken.clone(),
        // The agent embedded in a program that did not call `take_env`.
        None => std::env::var_os(ENV),
    }
}

/// Tells the service manager the agent is ready, with `status` as its status line.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
}

/// Tells the service manager the agent is stopping.
pub fn stopping() {
    send("STOPPING=1\n");
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Sends `message` to `$NOTIFY_SOCKET`, if set. Best effort, as `sd_notify` is: a service
/// manager that is gone is no reason to stop the agent; a failure is logged.
fn send(message: &str) {
    let Some(path) = target() else {
        return;
    };
    if let Err(e) = send_to(&path, message) {
        tracing::warn!(
            "cannot notify the service manager at {}: {e}",
            path.to_string_lossy()
        );
    }
}

fn send_to(path: &OsString, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.split_first() {
        // `@name`: a socket in the abstract namespace (systemd allows both forms).
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        Some((b'/', _)) => {
            socket.send_to(message.as_bytes(), std::path::Path::new(path))?;
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path or an @abstract name",
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sends_to_a_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(&path.as_os_str().to_owned(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("shoal-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}").into(), "STOPPING=1\n").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        assert!(send_to(&"relative".into(), "READY=1\n").is_err());
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("a\nb"), "a b");
    }
}
