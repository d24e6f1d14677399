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
# The AEAD's portable Poly1305 (what a CPU without AVX2 runs; this one has AVX2, so the line above
# tests the AVX2 backend): the crypto tests again in a build forced to it, in its own target
# directory. RUSTFLAGS replaces any from the environment for this build only.
RUSTFLAGS='--cfg poly1305_backend="soft"' CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/portable-poly1305" \
  cargo test -p shoal-vxlan --lib crypto
# The patched poly1305 (third_party/poly1305/SHOAL-PATCH.md): its own tests, as built here
# (RFC 8439 and other vectors through the run-time backend choice), then built for AVX2, which
# adds its AVX2-against-portable checks on its fuzzers' past crash inputs.
poly_dir="${CARGO_TARGET_DIR:-target}/poly1305"
CARGO_TARGET_DIR="$poly_dir" cargo test --manifest-path third_party/poly1305/Cargo.toml --locked
if grep -qw avx2 /proc/cpuinfo; then
  RUSTFLAGS="-C target-feature=+avx2" CARGO_TARGET_DIR="$poly_dir/avx2" \
    cargo test --manifest-path third_party/poly1305/Cargo.toml --locked
else
  echo "test: poly1305's AVX2 checks not run: this CPU has no AVX2, so that backend never runs here" >&2
fi
# The patched chacha20 (third_party/chacha20/SHOAL-PATCH.md): its own known-answer tests, with
# its AVX-512 backend compiled in (run where the CPU has AVX-512F and VL, AVX2 elsewhere).
RUSTFLAGS="--cfg chacha20_avx512" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/chacha20" \
  cargo test --manifest-path third_party/chacha20/Cargo.toml --locked --all-features
# The .deb (issue 19): built with cargo-deb, its contents, the unit (systemd-analyze) and
# lintian checked, then installed with dpkg into an overlay of this machine, where the lab runs
# with the installed binary (scripts/package.sh, scripts/package-install-test.sh).
scripts/package.sh >/dev/null
