#!/usr/bin/env bash
# Does a `shoal capture` reader that stops reading slow the data path? (issue 7)
#
# Brings up a 2-node encrypted `shoal lab` (real agents), then alternates iperf3 TCP runs
# n1 -> n2 across the overlay without a capture and with a capture whose reader never reads
# (`shoal capture -w - | sleep`: the pipe fills, the CLI blocks, the agent's queue for it fills
# and it drops copies). Prints each run, the medians, their ratio, and the copies the agent
# dropped for the stalled reader. Needs root; cleans up on exit.
#
#   benches/netns/capture-stall.sh            # 3 pairs of 10 s runs
#   benches/netns/capture-stall.sh --quick    # 1 pair of 3 s runs
set -euo pipefail
cd "$(dirname "$0")/../.."

reps=3 dur=10
case "${1:-}" in
  --quick) reps=1 dur=3 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "capture-stall.sh needs root (network namespaces)" >&2; exit 1; }
command -v iperf3 >/dev/null || apt-get install -y --no-install-recommends iperf3 >/dev/null

cargo build --release --quiet -p shoal-control --bin shoal
bin="$(realpath "${CARGO_TARGET_DIR:-target}/release/shoal")"
lab="capbench$$"
dir="/run/shoal/lab-$lab"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$bin" lab down --name "$lab" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$bin" lab up --name "$lab" --nodes 2 >/dev/null
n2=$("$bin" lab exec --name "$lab" n2 -- shoal network inspect ingress \
  | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["local"]["address"])')

run() { # one iperf3 run; prints Gbit/s
  ip netns exec "$lab-n2" iperf3 -s -1 -D >/dev/null 2>&1 || true
  sleep 0.3
  ip netns exec "$lab-n1" iperf3 -c "$n2" -t "$dur" -J \
    | python3 -c 'import json,sys;print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

plain=() stalled=()
for i in $(seq "$reps"); do
  plain+=("$(run)")
  # The stalled reader: our own PIDs (the capture itself through `ip netns exec`, and sleep).
  ip netns exec "$lab-n1" env SHOAL_SOCKET="$dir/n1.sock" "$bin" capture -w - 2>/dev/null \
    | sleep $((dur + 30)) &
  reader=$!
  cap=$(jobs -p | tail -1) # the pipeline's first process: the capture
  pids+=("$reader" "$cap")
  sleep 1
  stalled+=("$(run)")
  kill "$cap" "$reader" 2>/dev/null || true
  wait "$reader" 2>/dev/null || true
  sleep 0.5
  echo "run $i: no capture ${plain[-1]} Gbit/s, stalled capture reader ${stalled[-1]} Gbit/s"
done
p=$(printf '%s\n' "${plain[@]}" | median)
s=$(printf '%s\n' "${stalled[@]}" | median)
lost=$(grep -o 'capture ended.*lost=[0-9]*' "$dir/n1.log" | grep -o '[0-9]*$' | awk '{s+=$1} END {print s+0}')
echo
echo "| | TCP 1-stream Gbit/s (median of $reps x ${dur} s) |"
echo "|---|---|"
echo "| shoal encrypted, no capture | $p |"
echo "| shoal encrypted, stalled capture reader | $s |"
echo "| ratio | $(python3 -c "print('%.2f' % ($s / $p if $p else 0))") |"
echo
echo "copies the agent dropped for the stalled readers (agent log): $lost"
