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
