//! What the package (issue 19) relies on: the agent's readiness notification for systemd's
//! `Type=notify`, and man pages and completions that cover the whole CLI.
//!
//! The agents here run with `--no-data-path` in a temporary directory and are killed by PID
//! when the test ends, also on failure; nothing touches the network.

// Test code: helpers may unwrap (clippy.toml allows it only inside #[test] functions).
#![allow(clippy::unwrap_used)]

#[path = "../examples/gen-docs.rs"]
mod gen_docs;

use std::collections::BTreeSet;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// An agent process, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(dir: &Path, socket: &Path, notify: &Path) -> Agent {
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    Agent(
        Command::new(BIN)
            .args(["agent", "--no-data-path", "--hostname", "ready"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(socket)
            .env("NOTIFY_SOCKET", notify)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// The next datagram on `rx`, or `None` after `within`.
fn recv(rx: &UnixDatagram, within: Duration) -> Option<String> {
    rx.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    match rx.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// `READY=1` with a status line arrives once, and only when the socket already answers; an
/// agent that cannot bind its socket says nothing; `STOPPING=1` on SIGTERM.
#[test]
fn agent_notifies_readiness_only_once_its_socket_answers() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut first = agent(dir.path(), &socket, &notify);

    let message = recv(&rx, Duration::from_secs(20)).unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        panic!("no readiness message within 20 s; agent log:\n{log}")
    });
    // At the moment READY arrives the socket must take a connection and answer a request.
    let connected = UnixStream::connect(&socket);
    assert!(
        connected.is_ok(),
        "READY=1 came before the agent's socket accepted connections: {connected:?}"
    );
    let info = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .arg("info")
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "the agent said READY=1 but does not answer: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let lines: Vec<&str> = message.lines().collect();
    assert!(lines.contains(&"READY=1"), "{message:?}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= line in {message:?}"));
    assert!(
        status.contains("not in a swarm") && status.contains(&*socket.to_string_lossy()),
        "{status:?}"
    );
    // Only once.
    assert_eq!(recv(&rx, Duration::from_millis(300)), None);

    // A second agent on the same socket fails to start and must not claim readiness.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let mut second = agent(&other_dir, &socket, &notify);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the second agent did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    assert_eq!(recv(&rx, Duration::from_millis(300)), None);
    drop(second);

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = first.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(
        recv(&rx, Duration::from_secs(10)).as_deref(),
        Some("STOPPING=1\n")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The subcommands and long flags that `shoal [PATH...] --help` lists.
fn help(path: &[String]) -> (Vec<String>, BTreeSet<String>) {
    let out = Command::new(BIN)
        .args(path)
        .arg("--help")
        .env_remove("SHOAL_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "shoal {path:?} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut commands = Vec::new();
    let mut flags = BTreeSet::new();
    let mut in_commands = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_commands = line.starts_with("Commands:");
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or("");
        if in_commands && line.starts_with("  ") && !line.starts_with("   ") && word != "help" {
            commands.push(word.to_owned());
        }
        for w in line.split(|c: char| c.is_whitespace() || c == ',' || c == '=') {
            if let Some(flag) = w.strip_prefix("--") {
                if !flag.is_empty() && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    flags.insert(flag.to_owned());
                }
            }
        }
    }
    (commands, flags)
}

/// Every command that `shoal --help` (and each subcommand's `--help`) lists has a man page
/// generated from the CLI definition, naming each of its flags, and is in the completions.
#[test]
fn man_pages_and_completions_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    gen_docs::generate(dir.path()).unwrap();
    let bash = std::fs::read_to_string(dir.path().join("completions/shoal.bash")).unwrap();
    let zsh = std::fs::read_to_string(dir.path().join("completions/_shoal")).unwrap();
    let fish = std::fs::read_to_string(dir.path().join("completions/shoal.fish")).unwrap();

    let mut pending = vec![Vec::<String>::new()];
    let mut pages = BTreeSet::new();
    while let Some(path) = pending.pop() {
        let (commands, flags) = help(&path);
        let name = std::iter::once("shoal".to_owned())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join("-");
        let page_path = dir.path().join("man").join(format!("{name}.1"));
        let page = std::fs::read_to_string(&page_path)
            .unwrap_or_else(|e| panic!("`shoal {}` has no man page {name}.1: {e}", path.join(" ")));
        for flag in &flags {
            let roff = format!("\\-\\-{}", flag.replace('-', "\\-"));
            assert!(page.contains(&roff), "{name}.1 does not document --{flag}");
        }
        if let Some(word) = path.last() {
            for (shell, text) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
                assert!(
                    text.contains(word.as_str()),
                    "the {shell} completion does not know `{}`",
                    path.join(" ")
                );
            }
        }
        pages.insert(format!("{name}.1"));
        for c in commands {
            let mut sub = path.clone();
            sub.push(c);
            pending.push(sub);
        }
    }
    // No page for a command that --help does not show (a stale or a `help` page).
    let written: BTreeSet<String> = std::fs::read_dir(dir.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, pages);
    assert!(pages.contains("shoal-node-ls.1") && pages.contains("shoal-agent.1"));
}
