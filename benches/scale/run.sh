#!/usr/bin/env bash
# benches/scale/run.sh - flat costs as the cluster grows (issue 18, target 6), sans-IO: the
# engine in one process, simulated peers, no sockets, no devices, no root.
#
# Builds and runs vxlan/examples/scale.rs (release, honouring CARGO_TARGET_DIR), which prints
# `key value` lines, and turns them into a markdown report with each goal and its verdict:
#
#   1. per-packet cost with 1,000 peers in the FDB within 10 % of the cost with 1 (1,400-byte
#      frames; 1,000 peers spread over 100 networks; every packet to or from the next peer in
#      turn; median of interleaved rounds);
#   2. RSS with 1,000 peers and 100 networks <= 64 MiB (the process holding one engine with
#      1,000 keyed peers under two live epochs and every peer on every network);
#   3. 1,000 peer sessions brought up (X25519 + HKDF each) and the key epoch rotated across them
#      with no frame lost to or from the peers already up.
#
# Output: markdown on stdout and in benches/scale/results-latest.md (in --quick mode a file in a
# scratch directory, so CI leaves the checkout untouched). The goal rows have the form
# `| goal | measured | met |` (or `not met`), one line each, for other scripts to grep.
#
# Exit status: 0 when everything could be measured (goals missed are reported, not failed: this
# is a measurement); 1 when something could not run; 2 on a usage error.

set -u -o pipefail
export LC_ALL=C
export PATH="$PATH:${HOME:-/root}/.cargo/bin"

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() {
  cat <<EOF2
usage: $0 [--quick] [--out FILE]

  --quick     CI's short mode: fewer rounds and packets, results into a scratch file
  --out FILE  where the report goes (default benches/scale/results-latest.md)

Environment: SCALE_BIN = a prebuilt vxlan/examples/scale binary (otherwise it is built with
'cargo build --release -p shoal-vxlan --example scale', honouring CARGO_TARGET_DIR).
EOF2
}

QUICK=0 OUT=""
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done

WORK=$(mktemp -d /tmp/shoal-scale-bench.XXXXXX)
if [[ -z $OUT ]]; then
  if ((QUICK)); then OUT=$WORK/results.md; else OUT=$HERE/results-latest.md; fi
fi

BIN=${SCALE_BIN:-}
if [[ -z $BIN ]]; then
  echo "building: cargo build --release -p shoal-vxlan --example scale" >&2
  if ! (cd "$REPO" && cargo build --release -p shoal-vxlan --example scale) >"$WORK/build.log" 2>&1; then
    tail -20 "$WORK/build.log" >&2
    echo "build failed (log: $WORK/build.log)" >&2
    exit 1
  fi
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/scale
fi

args=()
((QUICK)) && args+=(--quick)
echo "running: $BIN ${args[*]}" >&2
if ! "$BIN" "${args[@]}" >"$WORK/raw.txt" 2>"$WORK/err.txt"; then
  cat "$WORK/err.txt" >&2
  echo "the measurement failed (raw output: $WORK/raw.txt)" >&2
  exit 1
fi

# val KEY: the value printed for KEY, or exit 1.
val() {
  local v
  v=$(awk -v k="$1" '$1 == k { print $2 }' "$WORK/raw.txt")
  if [[ -z $v ]]; then
    echo "no '$1' in the output ($WORK/raw.txt)" >&2
    exit 1
  fi
  echo "$v"
}
verdict() { if awk "BEGIN { exit !($1) }"; then echo met; else echo "not met"; fi; }

for k in ratio ratio_max ratio_max_flow rss_kib_after_1000x100 hwm_kib_after_1000x100 rss_kib_baseline \
  bring_up_ms add_epoch_ms retire_epoch_ms rotation_frames rotation_gap_frames \
  rotation_gap_frames_hasty rounds packets_per_round per_packet_ns_1 per_packet_ns_1000; do
  v=$(val "$k") || exit 1
  declare "$k=$v"
done
rss_mib=$(awk -v k="$rss_kib_after_1000x100" 'BEGIN { printf "%.1f", k / 1024 }')
hwm_mib=$(awk -v k="$hwm_kib_after_1000x100" 'BEGIN { printf "%.1f", k / 1024 }')
base_mib=$(awk -v k="$rss_kib_baseline" 'BEGIN { printf "%.1f", k / 1024 }')

cores=$(nproc)
model=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
commit=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(cd "$REPO" && git status --porcelain -- vxlan 2>/dev/null | grep -q . && echo " (vxlan/ with uncommitted changes)")
mode=full
((QUICK)) && mode=quick

{
  echo "# shoal at scale: per-packet cost, memory, bring-up and rotation ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Machine: $(uname -sr), $cores cores ($model), shared with other work. shoal: release"
  echo "build of commit $commit$dirty; AEAD backend: RustCrypto (the default build). Mode: $mode"
  echo "($rounds rounds of $packets_per_round packets per path and size). Load average at the end:"
  echo "$(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "Reproduce (from the repository root): \`benches/scale/run.sh\`; the figures come from"
  echo "\`cargo run --release -p shoal-vxlan --example scale\` (all sans-IO: engines in memory,"
  echo "simulated peers). The criterion bench \`cargo bench -p shoal-vxlan --bench scale\` measures"
  echo "the same paths."
  echo
  echo "## Goals (issue 18, target 6)"
  echo
  echo "| goal | measured | verdict |"
  echo "|---|---|---|"
  echo "| per-packet cost, 1,000 peers in the tables over 1, one flow, worst path (sealed or plain, encap or decap) | ${ratio_max_flow}x | $(verdict "$ratio_max_flow <= 1.10") |"
  echo "| per-packet cost, 1,000 peers over 1, traffic spread over every peer, one sealed packet at both ends | ${ratio}x | $(verdict "$ratio <= 1.10") |"
  echo "| per-packet cost, 1,000 peers over 1, traffic spread over every peer, worst path | ${ratio_max}x | $(verdict "$ratio_max <= 1.10") |"
  echo "| RSS with 1,000 peers and 100 networks <= 64 MiB | $rss_mib MiB | $(verdict "$rss_kib_after_1000x100 <= 65536") |"
  echo "| 1,000 sessions up and the key rotated, frames lost to peers already up | $rotation_gap_frames of $rotation_frames | $(verdict "$rotation_gap_frames == 0") |"
  echo
  echo "## Per-packet cost (ns per 1,400-byte frame, median of the rounds)"
  echo
  echo "1 peer on 1 network against 1,000 peers spread over 100 networks (peer i on network"
  echo "i % 100, one session and one FDB entry each). \"One flow\": every packet to or from the"
  echo "first of the 1,000 peers (the tables as large, the entries a packet touches in cache: what"
  echo "the data structures cost). \"Spread\": every packet to or from the next peer in turn, so"
  echo "each packet touches another peer's state (the cache misses of traffic to every peer at"
  echo "once). The three kinds of rounds alternate. Encap: \`handle_frame\` (the frame copied into the buffer, encapsulated, sealed"
  echo "or not); decap: \`handle_datagram\` (opened or not, the source MAC checked in the FDB)."
  echo "The second goal row is one sealed packet at both ends (sealed encap plus sealed decap)."
  echo
  echo "| path | 1 peer | 1,000 peers, one flow | ratio | 1,000 peers, spread | ratio |"
  echo "|---|---|---|---|---|---|"
  for p in encap_sealed decap_sealed encap_plain decap_plain; do
    echo "| $p | $(val "per_packet_ns_${p}_1") | $(val "per_packet_ns_${p}_1000flow") | $(val "ratio_${p}_flow")x | $(val "per_packet_ns_${p}_1000") | $(val "ratio_$p")x |"
  done
  echo "| sealed, both ends | $per_packet_ns_1 | | | $per_packet_ns_1000 | ${ratio}x |"
  echo
  echo "Where the spread rounds' difference goes (one flow shows none): a fixed sum per packet,"
  echo "not a share of its work, so a small share of a sealed packet (the ChaCha20-Poly1305 pass"
  echo "dominates it) and a large one of a plain packet:"
  for p in encap_sealed decap_sealed encap_plain decap_plain; do
    printf '%s' " $p +$(awk -v a="$(val "per_packet_ns_${p}_1")" -v b="$(val "per_packet_ns_${p}_1000")" 'BEGIN { printf "%.0f ns (%.0f %%)", b - a, 100 * (b - a) / a }');"
  done
  echo
  echo "A profile (\`perf record\` of \`examples/scale --profile"
  echo "encap_plain:1000\` against \`:1\`) puts the extra time on the hash-table probes that change"
  echo "with every packet: in the network's FDB (\`Fdb::lookup\` / \`learn\`) and in the peer table"
  echo "(\`peers.get_mut\`), each loading a control-byte group and then a bucket that are no longer in"
  echo "cache when the next packet goes to another peer. Boxing the replay windows (a peer's bucket"
  echo "from 1,576 bytes to about 550) changed nothing measurable, so it was not kept; fewer probes"
  echo "per packet (an FDB entry that points at its peer's slot instead of its address) would be the"
  echo "change to try next."
  echo
  echo "## Memory"
  echo
  echo "VmRSS of the measuring process once it holds one engine with 1,000 peers, each keyed under"
  echo "two live epochs (a rotation's peak), and 100 encrypted networks with every peer on every"
  echo "network (100,000 FDB entries and flood-list places): $rss_mib MiB (peak VmHWM $hwm_mib MiB;"
  echo "the process before any engine: $base_mib MiB). This is the data plane's state, not a whole"
  echo "agent's: the gossip membership, the control plane's tables and the IO threads' buffers"
  echo "are not in it."
  echo
  echo "## Bring-up and rotation"
  echo
  echo "| step | time |"
  echo "|---|---|"
  echo "| set_peer for 1,000 keyed peers from scratch (X25519 + HKDF each) | $bring_up_ms ms |"
  echo "| add_epoch across 1,000 peers (HKDF each) | $add_epoch_ms ms |"
  echo "| retire_epoch across 1,000 peers | $retire_epoch_ms ms |"
  echo
  echo "The rollout (\`testing::scale::rollout\`, also \`vxlan/tests/scale.rs\`): the local node brings"
  echo "up 900 peers one set_peer at a time, then every node adds epoch 2, the last 100 peers come"
  echo "up, every node sends under 2, every node retires 1; 16 watched peers run engines of their"
  echo "own and exchange a frame each way with the local node after every step, delivered one step"
  echo "later. Frames that failed to seal or open: $rotation_gap_frames of $rotation_frames. The"
  echo "control (the local node retires epoch 1 before the peers hold epoch 2): $rotation_gap_frames_hasty"
  echo "frames lost, so the count does see a gap."
  echo
  echo "## Raw output"
  echo
  echo '```'
  cat "$WORK/raw.txt"
  echo '```'
} >"$OUT"

cat "$OUT"
echo >&2
echo "report: $OUT" >&2
