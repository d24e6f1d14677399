#!/usr/bin/env bash
# A manager joins a swarm whose state is over 4 MiB (release build, loopback): how long from
# `join` until its state digest equals the leader's. Runs the cli test
# `a_manager_catches_up_with_a_state_over_4_mib` RUNS times (default 5), prints each time and
# writes them to benches/managers/results-catch-up.md.
# Usage: benches/managers/catch-up.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs="${1:-5}"
cargo build --release -p shoal-control --tests --quiet
lines=()
for i in $(seq 1 "$runs"); do
  line=$(cargo test --release --quiet -p shoal-control --test cli -- \
    a_manager_catches_up_with_a_state_over_4_mib --exact --nocapture 2>&1 |
    grep -o 'a [0-9]*-byte state: .*' || echo "the test failed")
  echo "run $i: $line"
  lines+=("- run $i: $line")
done
{
  echo "## A new manager catches up with a state over 4 MiB, loopback, $(date -u +%F)"
  echo
  echo "\`benches/managers/catch-up.sh $runs\` (release build): a one-manager swarm whose state"
  echo "is grown past 4 MiB (departed nodes with 2 KiB certificates added to a stopped manager's"
  echo "store, restarted as a state from before Raft); a second manager joins. Time from \`join\`"
  echo "until its state digest equals the leader's (goal: within 10 s). The state travels as a"
  echo "snapshot in chunks of 512 KiB."
  echo
  printf '%s\n' "${lines[@]}"
} > benches/managers/results-catch-up.md
