#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for a bounded time (default 20 s) from its
# committed seed corpus. New corpus entries go to a temporary folder, so the tree is unchanged.
# The stable toolchain is the only one here: RUSTC_BOOTSTRAP lets cargo-fuzz use the
# sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
SHOAL_SETUP_FUZZ=1 scripts/setup.sh
export RUSTC_BOOTSTRAP=1
for dir in */fuzz; do
  [ -f "$dir/Cargo.toml" ] || continue
  (
    cd "$dir"
    cargo fuzz build -O
    for target in $(cargo fuzz list); do
      scratch=$(mktemp -d)
      echo "fuzz: $dir $target for ${secs}s" >&2
      cargo fuzz run -O "$target" "$scratch" "corpus/$target" -- -max_total_time="$secs" 2>&1 | tail -n 2
      rm -rf "$scratch"
    done
  )
done
