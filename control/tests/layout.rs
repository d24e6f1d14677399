//! The arrows of `control/README.md` hold: each part of the control plane uses only the parts
//! below it (no circles), and the protocol crate stays free of TLS, the store and the data
//! path. Read from the sources (test modules excluded), so a new `use` that points the wrong
//! way fails here with the file and the part it reached.

#![allow(clippy::unwrap_used)] // test code: a failed step fails the test

use std::path::{Path, PathBuf};

/// Each part, the files that make it, and the parts it may use.
const PARTS: &[(&str, &[&str], &[&str])] = &[
    ("cluster", &["src/cluster.rs"], &[]),
    ("trust", &["src/trust"], &["cluster"]),
    ("store", &["src/store.rs"], &["cluster"]),
    (
        "manager",
        &["src/manager"],
        &["cluster", "trust", "store", "manager"],
    ),
    (
        "agent",
        &["src/agent"],
        &["cluster", "trust", "store", "manager", "agent"],
    ),
    ("lab", &["src/lab.rs"], &[]),
    ("cli", &["src/cli"], &["agent", "lab", "cli"]),
];

/// The parts a `crate::` path can name (the protocol's re-exports, `api`, `id` and `token`,
/// are below everything and free for all).
const NAMED: &[&str] = &[
    "cluster", "trust", "store", "manager", "agent", "lab", "cli",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        out.extend(rust_files(&entry.unwrap().path()));
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "rs"));
    out
}

/// The source without its test module (everything from the first `#[cfg(test)]` on: the
/// crate keeps its tests at the end of each file).
fn production(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

/// The parts a source names as `crate::PART` outside comments.
fn used_parts(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in production(text).lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if NAMED.contains(&name.as_str()) && !used.contains(&name) {
                used.push(name);
            }
        }
    }
    used
}

#[test]
fn every_part_uses_only_the_parts_below_it() {
    let mut wrong = Vec::new();
    for (part, paths, allowed) in PARTS {
        for path in paths.iter().flat_map(|p| rust_files(&root().join(p))) {
            let text = std::fs::read_to_string(&path).unwrap();
            for used in used_parts(&text) {
                if used != *part && !allowed.contains(&used.as_str()) {
                    wrong.push(format!(
                        "{} ({part}) uses crate::{used}",
                        path.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows pointing the wrong way:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_a_wrong_arrow() {
    // What the test above would catch, and what it must not count.
    let text = "use crate::agent::Agent;\n// crate::manager in a comment\nfn f() { crate::store::x(); }\n#[cfg(test)]\nmod tests { use crate::cli; }\n";
    assert_eq!(used_parts(text), vec!["agent", "store"]);
}

#[test]
fn the_protocol_crate_has_no_tls_store_or_data_path() {
    let manifest = std::fs::read_to_string(root().join("proto/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap();
    for banned in [
        "rustls",
        "redb",
        "shoal-vxlan",
        "shoal-ingress",
        "shoal-gossip",
        "rcgen",
    ] {
        assert!(
            !deps.contains(banned),
            "shoal-proto depends on {banned}:\n{deps}"
        );
    }
}
