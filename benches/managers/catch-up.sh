#!/usr/bin/env bash
# A manager joins a swarm whose state is over 4 MiB (release build, loopback): how long from
# `join` until its state digest equals the leader's. Runs the cli test
# `a_manager_catches_up_with_a_state_over_4_mib` RUNS times (default 5) and prints each time.
# Usage: benches/managers/catch-up.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-5}"
cargo build --release -p shoal-control --tests --quiet
for i in $(seq 1 "$runs"); do
  cargo test --release --quiet -p shoal-control --test cli -- \
    a_manager_catches_up_with_a_state_over_4_mib --exact --nocapture 2>&1 |
    grep -o 'a [0-9]*-byte state: .*' | sed "s/^/run $i: /"
done
