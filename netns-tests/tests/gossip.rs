//! Five gossip agents in five namespaces converge; a SIGKILLed one is seen down by all
//! within a bound; restarted, it comes back up; a sixth with the wrong gossip key is never
//! admitted. Needs root.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use shoal_netns_tests::{require_root, Lab};

const BIN: &str = env!("CARGO_BIN_EXE_netns-gossip-node");
const KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const WRONG_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn node_id(i: usize) -> String {
    // 25 base-36 characters, as the control plane issues them.
    format!("{:0>25}", format!("netns{i}"))
}

fn start(lab: &mut Lab, i: usize, key: &str) -> usize {
    let ip = lab.ip(i);
    let mut args = vec![
        "--id".to_string(),
        node_id(i),
        "--listen".into(),
        format!("{ip}:7946"),
        "--advertise".into(),
        format!("{ip}:7946"),
        "--key".into(),
        key.into(),
        "--cluster-size".into(),
        "6".into(),
        // Every node's keys derive from its node ID (test keys), and every node's directory
        // names all six, the wrong-key one included: it is refused for its gossip key.
        "--insecure-test-keys".into(),
    ];
    for j in 0..6 {
        args.push("--admit".into());
        args.push(node_id(j));
    }
    for s in [0, 1] {
        if s != i {
            args.push("--seed".into());
            args.push(format!("{}@{}:7946", node_id(s), lab.ip(s)));
        }
    }
    lab.spawn(i, BIN, &args).expect("spawn gossip node")
}

/// What every node reported so far.
#[derive(Default)]
struct Views {
    up: HashMap<usize, HashSet<String>>,
    downs: HashMap<usize, HashSet<String>>,
    ever_up: HashMap<usize, HashSet<String>>,
    dropped_seal: HashMap<usize, u64>,
}

/// Reads every running process's output until `done` holds or `timeout` passes; returns
/// whether `done` held.
fn pump(
    lab: &Lab,
    procs: &HashMap<usize, usize>,
    views: &mut Views,
    timeout: Duration,
    done: impl Fn(&Views) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if done(views) {
            return true;
        }
        for (&node, &p) in procs {
            while let Some(line) = lab.next_line(p, Duration::from_millis(20)) {
                let v: serde_json::Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let id = v["id"].as_str().unwrap_or_default().to_string();
                match v["event"].as_str() {
                    Some("up") => {
                        views.up.entry(node).or_default().insert(id.clone());
                        views.ever_up.entry(node).or_default().insert(id);
                    }
                    Some("down") | Some("left") => {
                        views.up.entry(node).or_default().remove(&id);
                        views.downs.entry(node).or_default().insert(id);
                    }
                    Some("stats") => {
                        let d = v["stats"]["dropped_seal"].as_u64().unwrap_or(0);
                        views.dropped_seal.insert(node, d);
                    }
                    _ => {}
                }
            }
        }
    }
    done(views)
}

#[test]
fn five_agents_converge_detect_a_kill_readmit_a_restart_and_refuse_a_wrong_key() {
    require_root();
    let mut lab = Lab::new(6).expect("create namespaces");
    let mut procs: HashMap<usize, usize> = HashMap::new();
    for i in 0..5 {
        procs.insert(i, start(&mut lab, i, KEY));
    }
    let mut views = Views::default();
    let all_but = |i: usize, n: usize| -> HashSet<String> {
        (0..n).filter(|j| *j != i).map(node_id).collect()
    };

    // 1. converge
    let t0 = Instant::now();
    let converged = pump(&lab, &procs, &mut views, Duration::from_secs(30), |v| {
        (0..5).all(|i| v.up.get(&i).is_some_and(|s| *s == all_but(i, 5)))
    });
    assert!(
        converged,
        "5 nodes did not converge in 30 s: {:?}",
        views.up
    );
    eprintln!("converged in {:.1} s", t0.elapsed().as_secs_f64());

    // 2. SIGKILL node 4: all others report it down within 20 s
    let victim = node_id(4);
    let p4 = procs.remove(&4).expect("node 4 process");
    lab.kill(p4).expect("kill node 4");
    let t1 = Instant::now();
    let detected = pump(&lab, &procs, &mut views, Duration::from_secs(20), |v| {
        (0..4).all(|i| v.downs.get(&i).is_some_and(|s| s.contains(&victim)))
    });
    assert!(
        detected,
        "killed node not seen down by all within 20 s: {:?}",
        views.downs
    );
    eprintln!(
        "kill detected by all in {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    // 3. restart it: everyone sees it up again
    procs.insert(4, start(&mut lab, 4, KEY));
    let t2 = Instant::now();
    let back = pump(&lab, &procs, &mut views, Duration::from_secs(30), |v| {
        (0..4).all(|i| v.up.get(&i).is_some_and(|s| s.contains(&victim)))
            && v.up.get(&4).is_some_and(|s| *s == all_but(4, 5))
    });
    assert!(
        back,
        "restarted node not back up everywhere: {:?}",
        views.up
    );
    eprintln!(
        "restart seen up by all in {:.1} s",
        t2.elapsed().as_secs_f64()
    );

    // 4. a sixth node with the wrong key: never admitted, its datagrams counted as dropped
    let intruder = node_id(5);
    procs.insert(5, start(&mut lab, 5, WRONG_KEY));
    pump(&lab, &procs, &mut views, Duration::from_secs(10), |_| false);
    for i in 0..5 {
        assert!(
            !views.ever_up.get(&i).is_some_and(|s| s.contains(&intruder)),
            "node {i} admitted the wrong-key node"
        );
    }
    assert!(
        views.ever_up.get(&5).is_none_or(|s| s.is_empty()),
        "wrong-key node saw members: {:?}",
        views.ever_up.get(&5)
    );
    let dropped: u64 = (0..2)
        .map(|i| views.dropped_seal.get(&i).copied().unwrap_or(0))
        .sum();
    assert!(dropped > 0, "seeds never counted the wrong-key datagrams");
    // The lab's Drop kills every process by PID and deletes the namespaces.
}
