//! The built `shoal-cni` binary, run as a runtime runs it (environment, stdin, stdout, exit
//! status), against a fake agent: a Unix socket in a temporary directory that reads one
//! framed request and gives a scripted answer. Every wait is bounded.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_proto::api::{
    read_frame, write_frame, CniAnswer, CniCommand, CniError, CniRequest, Reply, Request, Response,
};

/// The longest any one test waits for the plugin or the fake agent.
const WAIT: Duration = Duration::from_secs(20);

/// A fake agent answering one request with a scripted response.
struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: mpsc::Receiver<Request>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeAgent {
    /// Listens now (so the socket exists before the plugin runs); answers `answer` to the
    /// first request, in a thread with its own runtime, for at most [`WAIT`].
    fn start(answer: Response) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (tx, seen) = mpsc::channel();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                let serve = async {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    let request: Request = read_frame(&mut stream).await.unwrap().unwrap();
                    tx.send(request).unwrap();
                    write_frame(&mut stream, &answer).await.unwrap();
                };
                // Nobody came (a test that failed before running the plugin): just stop.
                let _ = tokio::time::timeout(WAIT, serve).await;
            });
        });
        FakeAgent {
            _dir: dir,
            socket,
            seen,
            thread: Some(thread),
        }
    }

    /// The request the agent received.
    fn request(mut self) -> CniRequest {
        let request = self
            .seen
            .recv_timeout(WAIT)
            .expect("the fake agent got no request");
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the fake agent panicked");
        }
        match request {
            Request::Cni(request) => request,
            other => panic!("the plugin sent {other:?}"),
        }
    }
}

/// What the plugin printed and how it exited.
struct Run {
    stdout: String,
    success: bool,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// Runs the plugin with exactly `env` and `stdin`, for at most [`WAIT`].
fn run(env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        // The plugin may exit before reading it all (a refused call): not an error here.
        let _ = input.write_all(stdin);
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shoal-cni did not exit within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    // The outputs are small: they fit in the pipe, so reading after the exit is safe.
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "exit status {status:?}, stdout {stdout:?}"
    );
    Run {
        stdout,
        success: status.success(),
    }
}

fn config(socket: &Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "web-net",
        "type": "shoal-cni",
        "network": "web",
        "socket": socket,
    })
}

fn attachment_env(command: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "3f2a9c0d1e"),
        ("CNI_NETNS", "/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// A socket path where nothing listens.
fn nowhere() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    (dir, socket)
}

#[test]
fn add_prints_the_result_and_sends_the_call() {
    let result = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "02:42:0a:00:01:07", "sandbox": "/run/netns/cni-1234"}],
        "ips": [{"address": "10.0.1.7/24", "gateway": "10.0.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
    });
    let agent = FakeAgent::start(Ok(Reply::Cni(CniAnswer::Done(Some(result.clone())))));
    let config = config(&agent.socket);
    let out = run(&attachment_env("ADD"), config.to_string().as_bytes());
    assert!(out.success, "{}", out.stdout);
    assert_eq!(out.json(), result);
    assert_eq!(
        agent.request(),
        CniRequest {
            command: CniCommand::Add,
            container_id: Some("3f2a9c0d1e".into()),
            netns: Some("/run/netns/cni-1234".into()),
            ifname: Some("eth0".into()),
            args: Some("IgnoreUnknown=1".into()),
            config,
        }
    );
}

#[test]
fn del_done_prints_nothing() {
    let agent = FakeAgent::start(Ok(Reply::Cni(CniAnswer::Done(None))));
    // DEL without CNI_NETNS (the namespace may be gone): allowed.
    let env: Vec<_> = attachment_env("DEL")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let out = run(&env, config(&agent.socket).to_string().as_bytes());
    assert!(out.success);
    assert_eq!(out.stdout, "");
    let request = agent.request();
    assert_eq!(request.command, CniCommand::Del);
    assert_eq!(request.netns, None);
}

#[test]
fn a_failed_answer_is_printed_with_exit_1() {
    let agent = FakeAgent::start(Ok(Reply::Cni(CniAnswer::Failed(CniError {
        code: 7,
        msg: "no network \"web\"".into(),
        details: "shoal network ls".into(),
    }))));
    let out = run(
        &attachment_env("ADD"),
        config(&agent.socket).to_string().as_bytes(),
    );
    assert!(!out.success);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "code": 7, "msg": "no network \"web\"", "details": "shoal network ls"})
    );
    assert_eq!(agent.request().command, CniCommand::Add);
}

#[test]
fn an_agent_refusal_is_code_100() {
    let agent = FakeAgent::start(Err("this node is not in a swarm".into()));
    let out = run(
        &attachment_env("CHECK"),
        config(&agent.socket).to_string().as_bytes(),
    );
    assert!(!out.success);
    let v = out.json();
    assert_eq!(v["code"], 100);
    assert_eq!(v["msg"], "this node is not in a swarm");
    assert_eq!(agent.request().command, CniCommand::Check);
}

#[test]
fn status_without_an_agent_is_code_50() {
    let (_dir, socket) = nowhere();
    let out = run(
        &[("CNI_COMMAND", "STATUS")],
        config(&socket).to_string().as_bytes(),
    );
    assert!(!out.success);
    let v = out.json();
    assert_eq!(v["code"], 50);
    assert!(v["msg"]
        .as_str()
        .unwrap()
        .starts_with("the plugin is not available"));
    assert!(v["details"]
        .as_str()
        .unwrap()
        .contains(&*socket.to_string_lossy()));
}

#[test]
fn add_without_an_agent_is_code_11() {
    let (_dir, socket) = nowhere();
    let out = run(
        &attachment_env("ADD"),
        config(&socket).to_string().as_bytes(),
    );
    assert!(!out.success);
    let v = out.json();
    assert_eq!(v["code"], 11);
    assert_eq!(v["msg"], "the shoal agent is not running");
    let details = v["details"].as_str().unwrap();
    assert!(details.contains(&*socket.to_string_lossy()), "{details}");
    assert!(details.contains("systemctl start shoal"), "{details}");
}

#[test]
fn version_needs_no_agent() {
    let out = run(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    assert!(out.success);
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );
    let out = run(&[("CNI_COMMAND", "VERSION")], b"");
    assert!(out.success);
    assert_eq!(out.json()["cniVersion"], "1.1.0");
}

#[test]
fn garbage_stdin_is_code_6() {
    let out = run(&attachment_env("ADD"), b"\x00\xffnot json at all");
    assert!(!out.success);
    assert_eq!(out.json()["code"], 6);
}

#[test]
fn too_much_stdin_is_refused() {
    let stdin = vec![b' '; shoal_cni::MAX_CONFIG + 4096];
    let out = run(&attachment_env("ADD"), &stdin);
    assert!(!out.success);
    assert_eq!(out.json()["code"], 5);
}

#[test]
fn a_missing_command_is_code_4() {
    let (_dir, socket) = nowhere();
    let out = run(&[], config(&socket).to_string().as_bytes());
    assert!(!out.success);
    let v = out.json();
    assert_eq!(v["code"], 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));
}
