#!/usr/bin/env bash
# shoal's main job on one machine: builds shoal, then `shoal lab up` makes a small cluster in
# network namespaces (3 nodes by default), prints `node ls` and a ping across the encrypted
# overlay. Arguments go to `shoal lab up` (--nodes N, --no-encrypt). Needs root.
#   scripts/lab.sh                      # up
#   target/release/shoal lab exec n2 -- shoal network inspect ingress
#   target/release/shoal lab down
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p shoal-control --bin shoal
bin="${CARGO_TARGET_DIR:-target}/release/shoal"
"$bin" lab down >/dev/null 2>&1 || true
exec "$bin" lab up "$@"
