#!/usr/bin/env bash
# Runs every test of the workspace: unit, property, in-memory engine pairs, simulations and the
# network-namespace integration tests (these need root; without it they fail, loudly).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "test: not root: the netns integration tests will fail. Run as root (sudo) for a full run." >&2
fi
cargo test --workspace --all-targets "$@"
# The gossip simulation's target tests (N = 200) need an optimized build; in the line above
# they are ignored, here they run.
cargo test --release -p shoal-gossip --test sim "$@"
