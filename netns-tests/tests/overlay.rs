//! The ingress overlay as a user runs it, through `shoal lab` (the same code as the lab
//! command): encrypted and plain traffic, what is on the wire, kernel VXLAN interop, revocation,
//! hostile datagrams, and an agent restart. Needs root; each test makes its own lab (unique
//! name) and takes it down on drop, also when it fails.

#![allow(clippy::unwrap_used)] // test helpers: a failed step fails the test

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_netns_tests::shoal_lab::{
    first_payload, matching, metrics, ok, packets, run, sample, send_udp, tshark, wait_exit,
    Spawned, TestLab,
};

const BIN: &str = env!("CARGO_BIN_EXE_netns-shoal");

#[test]
fn encrypted_overlay_carries_ping_and_tcp_and_never_the_plaintext() {
    let lab = TestLab::up(BIN, 3, true);
    let addrs: Vec<String> = (1..=3).map(|i| lab.overlay_addr(i)).collect();
    for from in 1..=3 {
        for (to, addr) in addrs.iter().enumerate() {
            if to + 1 != from {
                lab.eventually(
                    &format!("n{from} pings {addr}"),
                    Duration::from_secs(10),
                    || lab.ping(from, addr),
                );
            }
        }
    }
    let marker = b"shoal-known-plaintext-";
    let secret = std::str::from_utf8(marker).unwrap().repeat(200);
    // Everything on n1's underlay, whatever its protocol or port.
    let pcap = lab.capture_all(1, "enc", || {
        let got = lab.tcp_transfer(1, &lab.ns(3), &addrs[0], &secret);
        assert_eq!(got, secret, "TCP transfer n3 -> n1 arrives intact");
        let got = lab.tcp_transfer(2, &lab.ns(1), &addrs[1], "n1 to n2");
        assert_eq!(got, "n1 to n2");
    });
    let file = pcap.to_str().unwrap();
    let sealed = tshark(&["-r", file, "-Y", "udp.dstport == 4789"]);
    assert!(
        sealed.lines().count() > 5,
        "UDP 4789 datagrams on the wire:\n{sealed}"
    );
    // The capture holds more than the data path (gossip at least): it is not filtered.
    let other = tshark(&["-r", file, "-Y", "not udp.port == 4789"]);
    assert!(
        other.lines().count() > 0,
        "only data-path packets in an unfiltered capture"
    );
    let packets = packets(&pcap);
    let leaked: Vec<usize> = (0..packets.len())
        .filter(|&i| packets[i].windows(marker.len()).any(|w| w == marker))
        .collect();
    assert!(
        leaked.is_empty(),
        "the plaintext appears on the wire in {} of {} packets; the first:\n{}",
        leaked.len(),
        packets.len(),
        leaked.first().map_or(String::new(), |&i| tshark(&[
            "-r",
            file,
            "-Y",
            &format!("frame.number == {}", i + 1)
        ]))
    );
}

#[test]
fn plain_mode_is_rfc7348_that_tshark_decodes() {
    let lab = TestLab::up(BIN, 2, false);
    let target = lab.overlay_addr(1);
    let pcap = lab.capture(2, "plain", || {
        assert!(lab.ping(2, &target));
    });
    let decoded = tshark(&["-r", pcap.to_str().unwrap(), "-V", "-Y", "icmp"]);
    assert!(
        decoded.contains("VXLAN Network Identifier (VNI): 4096"),
        "{decoded}"
    );
    assert!(decoded.contains("Echo (ping) request"), "{decoded}");
    assert!(decoded.contains("Echo (ping) reply"), "{decoded}");
}

#[test]
fn kernel_vxlan_device_joins_a_plain_overlay_as_external_vtep() {
    let mut lab = TestLab::up(BIN, 2, false);
    let k = lab.add_host("k", "198.18.0.200/24");
    // Over veth the kernel leaves the inner TCP checksum for a NIC to fill in (CHECKSUM_PARTIAL
    // survives into the other namespace), and a userspace VTEP gets the datagram from a socket
    // with that state lost: make the kernel side compute its checksums, as a NIC would.
    ok(Command::new("ip").args(["netns", "exec", &k, "ethtool", "-K", "eth0", "tx", "off"]));
    let kmac = "02:42:c6:13:00:c8";
    ok(Command::new("ip").args([
        "-n",
        &k,
        "link",
        "add",
        "vx0",
        "address",
        kmac,
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "local",
        "198.18.0.200",
        "nolearning",
    ]));
    for node in ["198.18.0.1", "198.18.0.2"] {
        ok(Command::new("ip").args([
            "netns",
            "exec",
            &k,
            "bridge",
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx0",
            "dst",
            node,
        ]));
    }
    ok(Command::new("ip").args(["-n", &k, "addr", "add", "198.19.0.200/24", "dev", "vx0"]));
    ok(Command::new("ip").args(["-n", &k, "link", "set", "vx0", "up"]));
    let add = lab.vtep_add(kmac);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let n1 = lab.overlay_addr(1);
    lab.eventually("kernel VTEP pings n1", Duration::from_secs(10), || {
        run(Command::new("ip").args(["netns", "exec", &k, "ping", "-c", "1", "-W", "1", &n1]))
            .status
            .success()
    });
    lab.eventually("n2 pings the kernel VTEP", Duration::from_secs(10), || {
        lab.ping(2, "198.19.0.200")
    });
    // TCP from the kernel side to shoal node n1.
    let payload = "from-the-kernel-".repeat(500);
    assert_eq!(lab.tcp_transfer(1, &k, &n1, &payload), payload);
    // The VTEP is listed, and refused on an encrypted lab (below, in another test's lab).
    let v = lab.inspect(2);
    assert_eq!(v["vteps"][0]["ip"], "198.19.0.200");
}

#[test]
fn vtep_add_is_refused_on_an_encrypted_network() {
    let lab = TestLab::up(BIN, 1, true);
    let out = lab.vtep_add("02:42:c6:13:00:c8");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encrypted"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn node_rm_cuts_the_node_off_the_overlay() {
    let lab = TestLab::up(BIN, 3, true);
    let n1 = lab.overlay_addr(1);
    let n3 = lab.overlay_addr(3);
    // A genuine datagram n3 sealed for n1, to send again once n3 is removed.
    let pcap = lab.capture(1, "from-n3", || assert!(lab.ping(3, &n1)));
    let sealed = first_payload(&pcap, "198.18.0.3");
    assert!(lab.ping(1, &n3));
    let unknown_before = lab.drops(1, "unknown_peer");
    let ls = lab.shoal(1, &["node", "rm", "--force", "n3"]);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let removed = Instant::now();
    lab.eventually(
        "n3 gone from n1's and n2's data path",
        Duration::from_secs(2),
        || {
            [1, 2].iter().all(|&i| {
                lab.inspect(i)["local"]["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["vtep"] != "198.18.0.3")
            })
        },
    );
    // n3's datagrams are now dropped and counted.
    send_udp(&lab, 3, "198.18.0.3", &sealed);
    lab.eventually(
        "n3's datagram counted as from an unknown peer",
        Duration::from_secs(1),
        || lab.drops(1, "unknown_peer") > unknown_before,
    );
    assert!(
        removed.elapsed() <= Duration::from_secs(2),
        "{:?}",
        removed.elapsed()
    );
    assert!(
        !lab.ping(1, &n3),
        "n3's overlay address is unreachable after rm"
    );
    assert!(!lab.ping(2, &n3));
}

#[test]
fn hostile_datagrams_are_dropped_counted_and_harmless() {
    let lab = TestLab::up(BIN, 2, true);
    let n1 = lab.overlay_addr(1);
    // A real sealed datagram from n2 to n1, captured on n1's underlay.
    let pcap = lab.capture(1, "real", || assert!(lab.ping(2, &n1)));
    let real = first_payload(&pcap, "198.18.0.2");
    let before: Vec<u64> = ["replay", "authentication", "plaintext_on_encrypted"]
        .iter()
        .map(|r| lab.drops(1, r))
        .collect();
    let total = || -> u64 {
        lab.inspect(1)["local"]["counters"]["drops"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    let total_before = total();
    // From n2's own address (a known peer): a replay, a copy with its counter tampered with
    // (so it passes the replay check and fails authentication), plaintext VXLAN, random bytes.
    let py = format!(
        "import socket,os\nreal=bytes.fromhex('{real}')\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind(('198.18.0.2',0))\nd=('198.18.0.1',4789)\n\
         s.sendto(real,d)\nt=bytearray(real);t[20]^=0x80;s.sendto(bytes(t),d)\n\
         s.sendto(bytes([8,0,0,0,0,0x10,0,0])+bytes(60),d)\n\
         [s.sendto(os.urandom(n),d) for n in (0,3,8,29,100,1400)]\n"
    );
    let sent = lab.exec(2, &["python3", "-c", &py]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    lab.eventually("drops counted by reason", Duration::from_secs(3), || {
        let now: Vec<u64> = ["replay", "authentication", "plaintext_on_encrypted"]
            .iter()
            .map(|r| lab.drops(1, r))
            .collect();
        now.iter().zip(&before).all(|(n, b)| n > b)
    });
    // Nine datagrams injected: each dropped and counted once, on top of what was counted
    // before them.
    lab.eventually(
        "every injected datagram dropped and counted",
        Duration::from_secs(3),
        || total() >= total_before + 9,
    );
    // The same drops, attributed to n2, in `node inspect n2` on n1 and in n1's metrics.
    let out = lab.shoal(1, &["node", "inspect", "n2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dp = &node[0]["data_path"];
    assert_eq!(dp["name"], "n2", "{node}");
    for reason in ["replay", "authentication", "plaintext_on_encrypted"] {
        assert!(
            dp["counters"]["drops"][reason].as_u64().unwrap_or(0) >= 1,
            "{reason} in node inspect: {dp}"
        );
        let peer = format!(
            "shoal_datapath_peer_drops_total{{network=\"ingress\",peer=\"n2\",vtep=\"198.18.0.2\",reason=\"{reason}\"}}"
        );
        let page = metrics(&lab, 1);
        assert!(sample(&page, &peer) >= 1.0, "{peer} in\n{page}");
        let all = format!("shoal_datapath_drops_total{{network=\"ingress\",reason=\"{reason}\"}}");
        assert!(sample(&page, &all) >= 1.0, "{all} in\n{page}");
    }
    assert!(dp["last_rx_epoch"].as_u64().is_some(), "{dp}");
    assert!(
        lab.ping(2, &n1),
        "the agent keeps running and the overlay works"
    );
}

#[test]
fn capture_shows_decrypted_inner_frames_and_sealed_outer_datagrams() {
    let lab = TestLab::up(BIN, 2, true);
    let n2 = lab.overlay_addr(2);
    // The ICMP payload pattern: "SHALO!" repeated.
    let pattern = "5348414c4f21";
    let file = lab.scratch.join("capture.pcapng");
    let file_arg = file.to_str().unwrap().to_owned();
    let mut capture = Spawned(
        Command::new(BIN)
            .args(["lab", "exec", "--name", &lab.name, "n1", "--"])
            .args(["shoal", "capture", "--duration", "4", "-w", &file_arg])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The file appears once the agent has agreed and sent the pcapng header.
    lab.eventually("the capture file", Duration::from_secs(10), || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
    });
    let ping = lab.exec(1, &["ping", "-c", "3", "-i", "0.2", "-p", pattern, &n2]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(wait_exit(&mut capture.0, Duration::from_secs(15)).success());
    let mut err = String::new();
    std::io::Read::read_to_string(capture.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("packets captured"), "{err}");

    let inner = "frame.interface_name == \"ingress/inner\"";
    let outer = "frame.interface_name == \"ingress/outer\"";
    let requests = matching(
        &file,
        &format!("{inner} && icmp.type == 8 && ip.dst == {n2}"),
    );
    let replies = matching(
        &file,
        &format!("{inner} && icmp.type == 0 && ip.src == {n2}"),
    );
    assert!(
        requests.len() >= 3 && replies.len() >= 3,
        "{requests:?} {replies:?} {err} in\n{}",
        tshark(&["-r", &file_arg])
    );
    let commented = matching(
        &file,
        &format!("{inner} && icmp.type == 8 && frame.comment contains \"to n2\""),
    );
    assert_eq!(
        commented.len(),
        requests.len(),
        "each request names its peer"
    );
    let bytes = pattern
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let clear = matching(&file, &format!("{inner} && frame contains {bytes}"));
    assert!(
        clear.len() >= 6,
        "the payload is in the inner frames: {clear:?}"
    );
    let sealed = matching(&file, outer);
    assert!(sealed.len() >= 6, "outer datagrams both ways: {sealed:?}");
    let on_4789 = matching(
        &file,
        &format!("{outer} && udp.srcport == 4789 && udp.dstport == 4789"),
    );
    assert_eq!(
        on_4789.len(),
        sealed.len(),
        "every outer packet is UDP 4789"
    );
    let leaked = matching(&file, &format!("{outer} && frame contains {bytes}"));
    assert!(
        leaked.is_empty(),
        "no inner payload in outer packets: {leaked:?}"
    );

    // `-w -` streams to a reader such as `tshark -r -`; -c stops it.
    let mut piped = Spawned(
        Command::new(BIN)
            .args(["lab", "exec", "--name", &lab.name, "n1", "--"])
            .args(["shoal", "capture", "--inner", "-c", "4", "-w", "-"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut reader = Spawned(
        Command::new("tshark")
            .args(["-r", "-"])
            .stdin(piped.0.stdout.take().unwrap())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // No signal tells when the agent has attached the reader: ping (one at a time, bounded)
    // until the capture has its 4 packets and exits.
    for _ in 0..40 {
        if piped.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(lab.ping(1, &n2));
    }
    assert!(wait_exit(&mut piped.0, Duration::from_secs(15)).success());
    assert!(wait_exit(&mut reader.0, Duration::from_secs(15)).success());
    let mut text = String::new();
    std::io::Read::read_to_string(reader.0.stdout.as_mut().unwrap(), &mut text).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.contains("ICMP"), "{text}");

    // Refusals are one clear line each, and write no file.
    let this = lab.shoal(
        1,
        &["capture", "--peer", "n1", "-w", &format!("{file_arg}.x")],
    );
    assert!(!this.status.success());
    assert!(String::from_utf8_lossy(&this.stderr).contains("is this node"));
    let nope = lab.shoal(
        1,
        &[
            "capture",
            "--network",
            "nope",
            "-w",
            &format!("{file_arg}.x"),
        ],
    );
    assert!(String::from_utf8_lossy(&nope.stderr).contains("network nope not found"));
    assert!(!std::path::Path::new(&format!("{file_arg}.x")).exists());
}

#[test]
fn restarted_agent_comes_back_with_the_same_interface_and_address() {
    let lab = TestLab::up(BIN, 2, true);
    let before = lab.inspect(2)["local"].clone();
    let n1 = lab.overlay_addr(1);
    assert!(lab.ping(2, &n1));
    ok(Command::new(BIN).args(["lab", "restart", "--name", &lab.name, "n2"]));
    lab.eventually(
        "traffic resumes after the restart",
        Duration::from_secs(20),
        || lab.ping(2, &n1),
    );
    let after = lab.inspect(2)["local"].clone();
    assert_eq!(after["interface"], before["interface"]);
    assert_eq!(after["address"], before["address"]);
    assert_eq!(after["mac"], before["mac"]);
    // And n1 reaches n2 (the new incarnation was learnt through gossip).
    let n2 = lab.overlay_addr(2);
    lab.eventually("n1 pings the restarted n2", Duration::from_secs(10), || {
        lab.ping(1, &n2)
    });
}

/// Node i's data-path counters for its peer at underlay address `vtep` (`network inspect`).
fn peer_of(lab: &TestLab, i: usize, vtep: &str) -> Value {
    let v = lab.inspect(i);
    v["local"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["vtep"] == vtep)
        .unwrap_or_else(|| panic!("n{i} has no peer {vtep}: {v}"))
        .clone()
}

/// A TCP stream (iperf3, 20 Mbit/s) from n2 to n1 across the encrypted overlay for 55 s, while
/// the manager rotates the network key twice (every 20 s; each new epoch seals 10 s after it
/// arrives): the stream is never reset nor stalls for a second, no datagram is dropped for an
/// unknown epoch, a failed tag or a missing session, and each node received from the other
/// under all three epochs.
#[test]
fn a_tcp_stream_crosses_two_key_rotations() {
    let lab = TestLab::up_with(BIN, 2, true, &["--key-rotation-interval", "20s"]);
    let n1 = lab.overlay_addr(1);
    let vtep = |i: usize| format!("198.18.0.{i}");
    let reasons = ["unknown_epoch", "authentication", "no_session"];
    // (node, reason) -> (engine-wide, attributed to the other node)
    let drops = || -> Vec<(u64, u64)> {
        [(1, 2), (2, 1)]
            .iter()
            .flat_map(|&(i, other)| {
                let peer = peer_of(&lab, i, &vtep(other));
                reasons.map(|r| {
                    (
                        lab.drops(i, r),
                        peer["counters"]["drops"][r].as_u64().unwrap_or(0),
                    )
                })
            })
            .collect()
    };
    let before = drops();
    let first_epoch = lab.inspect(1)["local"]["send_epoch"].as_u64().unwrap();

    let _server = Spawned(
        shoal_netns::exec(&lab.ns(1), "iperf3")
            .args(["-s", "-1", "-B", &n1])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut client = Spawned(
        shoal_netns::exec(&lab.ns(2), "iperf3")
            .args(["-c", &n1, "-t", "55", "-b", "20M", "-J"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The stream's JSON, read as it comes (a full pipe would stall iperf3).
    let mut out = client.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut json = String::new();
        std::io::Read::read_to_string(&mut out, &mut json).map(|_| json)
    });
    // Meanwhile, the epochs each node receives from the other.
    let mut seen: [std::collections::BTreeSet<u64>; 2] = Default::default();
    let deadline = Instant::now() + Duration::from_secs(70);
    while client.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "iperf3 did not finish in 70 s");
        for (k, (i, other)) in [(1, 2), (2, 1)].into_iter().enumerate() {
            if let Some(e) = peer_of(&lab, i, &vtep(other))["last_rx_epoch"].as_u64() {
                seen[k].insert(e);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = client.0.wait().unwrap();
    let json = reader.join().unwrap().unwrap();
    let report: Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("iperf3 JSON ({e}): {json}"));
    assert!(
        status.success() && report.get("error").is_none(),
        "the stream ended in error ({status}): {}",
        report["error"]
    );
    let intervals = report["intervals"].as_array().unwrap();
    let bytes: Vec<u64> = intervals
        .iter()
        .map(|i| i["sum"]["bytes"].as_u64().unwrap())
        .collect();
    assert!(
        bytes.len() >= 50 && bytes.iter().all(|&b| b > 0),
        "bytes per second of the stream: {bytes:?}"
    );
    let sent = &report["end"]["sum_sent"];
    eprintln!(
        "{} MB in {:.1} s, {} retransmits; epochs received: n1 from n2 {:?}, n2 from n1 {:?}",
        sent["bytes"].as_u64().unwrap() >> 20,
        sent["seconds"].as_f64().unwrap(),
        sent["retransmits"],
        seen[0],
        seen[1]
    );
    let after = drops();
    for (k, (b, a)) in before.iter().zip(&after).enumerate() {
        let (node, reason) = (k / reasons.len() + 1, reasons[k % reasons.len()]);
        assert_eq!(
            a, b,
            "n{node}: {reason} drops (engine-wide, from its peer) before and after the stream"
        );
    }
    let want: std::collections::BTreeSet<u64> = (first_epoch..=first_epoch + 2).collect();
    for (k, name) in ["n1 from n2", "n2 from n1"].iter().enumerate() {
        assert!(
            want.is_subset(&seen[k]),
            "{name}: epochs received {:?}, not every one of {want:?}",
            seen[k]
        );
    }
}
