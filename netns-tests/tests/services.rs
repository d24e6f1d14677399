//! Services and the routing mesh as users meet them (`docs/services.md`): a published port
//! answering on every node of a `shoal lab` for a client outside the cluster, backends
//! attached through `shoal-cni` with `SHOAL_SERVICE`, health, idle connections, names and the
//! VIP inside the network, and `service rm`. Needs root; each test makes its own lab and
//! namespaces and removes them on drop, also when it fails.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_netns_tests::shoal_lab::{metrics, sample, Spawned, TestLab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

mod common;
use common::cni::{address, cni_args, create, wait_network, Container};

/// The backends' TCP server: to each connection it says its name and the peer address it
/// sees, then echoes each line it gets, but for `later N`: after N seconds of silence it
/// speaks first (`pushed`), as a server pushing to an idle client does.
const SERVER: &str = r#"
import socketserver, sys, time
name = sys.argv[1]
class H(socketserver.StreamRequestHandler):
    def handle(self):
        try:
            self.wfile.write(f"{name} {self.client_address[0]}\n".encode())
            for line in self.rfile:
                if line.startswith(b"later "):
                    time.sleep(float(line.split()[1]))
                    self.wfile.write(b"pushed\n")
                else:
                    self.wfile.write(line)
        except OSError:
            pass  # a health check connects and leaves at once
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 7000), H).serve_forever()
"#;

/// Makes `count` connections to `addr`:`port` and prints, per line, what each was told (or
/// `refused` / `timeout`), each bounded by a 2 s timeout.
const CLIENT: &str = r#"
import socket, sys
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    try:
        c = socket.create_connection((addr, port), timeout=2)
        f = c.makefile()
        line = f.readline().strip()
        c.close()
        print(line or "empty")
    except ConnectionRefusedError:
        print("refused")
    except OSError:
        print("timeout")
"#;

/// One connection left idle for `idle` seconds: the backend speaks first after the silence
/// (so the way back must still be known), then the client is echoed. Prints the three lines.
const IDLE_CLIENT: &str = r#"
import socket, sys
addr, port, idle = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = socket.create_connection((addr, port), timeout=float(idle) + 5)
f = c.makefile()
print(f.readline().strip(), flush=True)
c.sendall(f"later {idle}\n".encode())
print(f.readline().strip(), flush=True)
c.sendall(b"still-there\n")
print(f.readline().strip())
"#;

/// Asks the DNS server at argv[1] for the A records of argv[2]: prints the RCODE and the
/// addresses, sorted.
const DNS: &str = r#"
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(q, (server, 53))
d, _ = s.recvfrom(600)
rcode, an = d[3] & 15, struct.unpack(">H", d[6:8])[0]
i = 12
while d[i]:
    i += d[i] + 1
i += 5
ips = []
for _ in range(an):
    if d[i] & 0xC0 == 0xC0:
        i += 2
    else:
        while d[i]:
            i += d[i] + 1
        i += 1
    t, c, ttl, l = struct.unpack(">HHIH", d[i:i + 10])
    i += 10
    if t == 1:
        ips.append(socket.inet_ntoa(d[i:i + l]))
    i += l
print(rcode, " ".join(sorted(ips)))
"#;

fn python(ns: &str, script: &str, args: &[&str]) -> String {
    let out = shoal_netns::exec(ns, "python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `count` connections to `addr:port` from namespace `ns` were told: (backend, peer)
/// per connection, or ("refused"|"timeout", "").
fn connect(ns: &str, addr: &str, port: u16, count: usize) -> Vec<(String, String)> {
    python(ns, CLIENT, &[addr, &port.to_string(), &count.to_string()])
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (
                w.next().unwrap_or_default().to_owned(),
                w.next().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn shoal_ok(lab: &TestLab, node: usize, args: &[&str]) -> String {
    let out = lab.shoal(node, args);
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A backend: a container on `node` attached as a backend of `service`, with its server.
struct Backend {
    container: Container,
    ip: String,
    server: Option<Spawned>,
}

impl Backend {
    fn new(lab: &TestLab, node: usize, tag: &str, service: &str) -> Backend {
        let container = Container::new(lab, tag);
        let r = cni_args(
            lab,
            node,
            "ADD",
            Some(&container),
            "front",
            json!({}),
            Some(&format!("SHOAL_SERVICE={service}")),
        );
        assert!(r.ok, "ADD of backend {tag} on n{node}: {}", r.out);
        let mut b = Backend {
            ip: address(&r.out),
            container,
            server: None,
        };
        b.start(tag);
        b
    }

    fn start(&mut self, name: &str) {
        self.server = Some(Spawned(
            shoal_netns::exec(&self.container.name, "python3")
                .args(["-c", SERVER, name])
                .spawn()
                .unwrap(),
        ));
    }

    fn stop(&mut self) {
        // Spawned kills and reaps its process on drop.
        self.server = None;
    }
}

const NODE: [&str; 3] = ["198.18.0.1", "198.18.0.2", "198.18.0.3"];
const CLIENT_ADDR: &str = "198.18.0.100";

#[test]
fn published_ports_reach_healthy_backends_from_every_node_with_the_clients_address() {
    let mut lab = TestLab::up_with_env(
        BIN,
        3,
        true,
        &[],
        // Far below any naive design's idle timeout: the idle check below outlasts them all.
        &[("SHOAL_MESH_TIMEOUTS", "syn=1s,closing=1s,udp=1s")],
    );
    create(
        &lab,
        &[
            "--opt",
            "encrypted",
            "--attachable",
            "--subnet",
            "198.19.40.0/24",
            "front",
        ],
    );
    wait_network(&lab, 3, "front");
    let id = shoal_ok(
        &lab,
        1,
        &[
            "service",
            "create",
            "web",
            "--network",
            "front",
            "--publish",
            "8080:7000",
            "--health-interval",
            "200ms",
            "--health-retries",
            "2",
        ],
    );
    assert_eq!(id.trim().len(), 25, "service create prints the ID: {id}");
    // Bad input: one clear line, nothing changed.
    for (args, says) in [
        (
            vec!["service", "create", "api", "--network", "nope"],
            "network nope not found",
        ),
        (
            vec![
                "service",
                "create",
                "api",
                "--network",
                "front",
                "--publish",
                "8080:9000",
            ],
            "port 8080 is already in use by service web",
        ),
        (
            vec![
                "service",
                "create",
                "api",
                "--network",
                "front",
                "--publish",
                "70000:80",
            ],
            "out of range",
        ),
    ] {
        let out = lab.shoal(1, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let ls = shoal_ok(&lab, 1, &["service", "ls"]);
    assert!(!ls.contains("api"), "a refused create left a service: {ls}");

    let mut b1 = Backend::new(&lab, 2, "b1", "web");
    let mut b2 = Backend::new(&lab, 3, "b2", "web");
    let client = lab.add_host("cl", &format!("{CLIENT_ADDR}/24"));

    // Every node answers, both backends serve, and each sees the client's own address.
    lab.eventually(
        "the published port answers on n1",
        Duration::from_secs(20),
        || connect(&client, NODE[0], 8080, 1)[0].0.starts_with('b'),
    );
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for node in NODE {
        for (backend, peer) in connect(&client, node, 8080, 20) {
            assert!(
                backend == "b1" || backend == "b2",
                "a connection to {node}:8080 was not served: {backend}"
            );
            assert_eq!(peer, CLIENT_ADDR, "the backend saw another address");
            *served.entry(backend).or_default() += 1;
        }
    }
    assert_eq!(served.len(), 2, "both backends get connections: {served:?}");

    // An idle connection outlives every tracking timeout (all 1 s here) and still works.
    // Meanwhile other connections come and go through the same node (tables are swept as
    // new flows arrive): only the idle one's own entries keep its way back.
    let idle = std::thread::scope(|s| {
        let held = s.spawn(|| python(&client, IDLE_CLIENT, &[NODE[1], "8080", "3"]));
        let started = Instant::now();
        while !held.is_finished() && started.elapsed() < Duration::from_secs(15) {
            connect(&client, NODE[1], 8080, 4);
            std::thread::sleep(Duration::from_millis(200));
        }
        held.join().unwrap()
    });
    let lines: Vec<&str> = idle.lines().collect();
    assert_eq!(lines.len(), 3, "{idle}");
    assert_eq!(
        lines[1..],
        ["pushed", "still-there"],
        "the idle connection broke: {idle}"
    );

    // Health: b1 stops answering; within a second every new connection goes to b2.
    b1.stop();
    let stopped = Instant::now();
    let mut moved = None;
    while stopped.elapsed() < Duration::from_secs(5) {
        let round = connect(&client, NODE[0], 8080, 10);
        if round.iter().all(|(b, _)| b == "b2") {
            moved = Some(stopped.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = moved.expect("new connections still reach the stopped backend after 5 s");
    eprintln!("new connections left the stopped backend after {moved:?}");
    assert!(
        moved <= Duration::from_secs(1),
        "new connections left the stopped backend only after {moved:?}"
    );
    // Back again: b1 gets connections again.
    b1.start("b1");
    lab.eventually(
        "b1 serves again after its server is back",
        Duration::from_secs(10),
        || {
            connect(&client, NODE[2], 8080, 20)
                .iter()
                .any(|(b, _)| b == "b1")
        },
    );

    // Inside the network: names at the gateway, and the VIP reaches a backend with the
    // client's own address.
    let inspect: Value =
        serde_json::from_str(&shoal_ok(&lab, 1, &["service", "inspect", "web"])).unwrap();
    let vip = inspect[0]["vip"]
        .as_str()
        .or_else(|| inspect["vip"].as_str())
        .unwrap_or_else(|| panic!("service inspect gives the VIP: {inspect}"))
        .to_owned();
    let c = Container::new(&lab, "c1");
    let r = cni_args(&lab, 1, "ADD", Some(&c), "front", json!({}), None);
    assert!(r.ok, "{}", r.out);
    let c_ip = address(&r.out);
    let gateway = "198.19.40.1";
    assert_eq!(
        r.out["dns"]["nameservers"][0], gateway,
        "the result names the router as nameserver: {}",
        r.out
    );
    lab.eventually("web resolves to its VIP", Duration::from_secs(10), || {
        python(&c.name, DNS, &[gateway, "web"]).trim() == format!("0 {vip}")
    });
    let tasks: BTreeSet<String> = [b1.ip.clone(), b2.ip.clone()].into();
    let want = format!("0 {}", tasks.iter().cloned().collect::<Vec<_>>().join(" "));
    assert_eq!(python(&c.name, DNS, &[gateway, "tasks.web"]).trim(), want);
    assert_eq!(
        python(&c.name, DNS, &[gateway, "example.org"]).trim(),
        "5",
        "unknown names are REFUSED"
    );
    lab.eventually("the VIP reaches a backend", Duration::from_secs(10), || {
        let got = connect(&c.name, &vip, 7000, 1);
        got[0].0.starts_with('b') && got[0].1 == c_ip
    });

    // service rm: no listener, no tracking state, on any node.
    shoal_ok(&lab, 1, &["service", "rm", "web"]);
    for (i, node) in NODE.iter().enumerate() {
        lab.eventually(
            &format!("n{} stops answering on 8080", i + 1),
            Duration::from_secs(10),
            || {
                connect(&client, node, 8080, 1)[0].0 != "b1"
                    && connect(&client, node, 8080, 1)[0].0 != "b2"
            },
        );
        lab.eventually(
            &format!("n{} tracks no flow", i + 1),
            Duration::from_secs(10),
            || sample(&metrics(&lab, i + 1), "shoal_mesh_flows") == 0.0,
        );
        let tc = lab.exec(i + 1, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
        let tc = String::from_utf8_lossy(&tc.stdout);
        assert!(
            !tc.contains("pref 21320"),
            "n{} kept a steering filter: {tc}",
            i + 1
        );
    }
    // A node that leaves answers on no published port.
    shoal_ok(
        &lab,
        1,
        &[
            "service",
            "create",
            "api",
            "--network",
            "front",
            "--publish",
            "9090:7000",
        ],
    );
    let steered = |i: usize| {
        let tc = lab.exec(i, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
        String::from_utf8_lossy(&tc.stdout).contains("pref 21320")
    };
    lab.eventually("n2 steers 9090", Duration::from_secs(10), || steered(2));
    shoal_ok(&lab, 2, &["leave"]);
    lab.eventually(
        "n2 steers nothing after leave",
        Duration::from_secs(10),
        || !steered(2),
    );
    b2.stop();
}
