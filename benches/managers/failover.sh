#!/usr/bin/env bash
# Manager failover (issue 15): three managers, each a real `shoal agent`; the leader is killed
# with SIGKILL N times, and the time from the kill until a `join-token --rotate worker`
# succeeds on a survivor is recorded; then the killed one is restarted and must rejoin as a
# follower before the next round. Also the time of one write (a rotation, through the CLI)
# with one manager and with three, and the writes per second of 4 clients at once with three.
#
#   benches/managers/failover.sh [--lab] [KILLS] [WRITES]     (defaults 100 and 50)
#
# Without --lab: agents on loopback (127.77.0.1-3, no data path). With --lab: `shoal lab up
# --managers 3` (network namespaces, data path and encrypted overlay up; as root), the agents
# killed by the PIDs the lab recorded. Prints p50, p99 and max, and writes them to
# benches/managers/results-latest.md (loopback) or results-lab.md. Every agent it starts is
# killed by PID at the end (`lab down` in lab mode), its temporary files removed, also on
# failure. SLOW_LOGS=1 keeps the agents' logs of every round over 3 s in
# benches/managers/last-slow/ (set RUST_LOG too, for Raft's debug lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
LAB=
if [ "${1:-}" = --lab ]; then LAB=fo$$; shift; fi
KILLS=${1:-100}
WRITES=${2:-50}
cargo build --release -q -p shoal-control
BIN=$PWD/target/release/shoal
DIR=$(mktemp -d /tmp/shoal-failover.XXXXXX)
declare -A PID
cleanup() {
  local rc=$?
  for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    # The agents' logs, for whoever reads the failure.
    mkdir -p benches/managers/last-failure
    cp "$DIR"/*.log "${LAB:+/run/shoal/lab-$LAB/}"*.log benches/managers/last-failure/ 2>/dev/null || true
    echo "failover: logs in benches/managers/last-failure/" >&2
  fi
  [ -z "$LAB" ] || "$BIN" lab down --name "$LAB" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
now_ms() { date +%s%3N; }
if [ -n "$LAB" ]; then
  NODES=(n1 n2 n3)
  s() { local n=$1; shift; "$BIN" --socket "/run/shoal/lab-$LAB/$n.sock" "$@"; }
  start() { "$BIN" lab start --name "$LAB" "$1" >/dev/null; }
  stop() { kill -9 "$(cat "/run/shoal/lab-$LAB/$1.pid")"; }
else
  NODES=(m1 m2 m3)
  s() { local n=$1; shift; "$BIN" --socket "$DIR/$n.sock" "$@"; }
  stop() { kill -9 "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; unset "PID[$1]"; }
fi
loopback_start() {
  local n=$1
  "$BIN" agent --no-data-path --hostname "$n" --state-dir "$DIR/$n" --socket "$DIR/$n.sock" \
    2>>"$DIR/$n.log" &
  PID[$n]=$!
  for _ in $(seq 100); do s "$n" info >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "failover: agent $n did not start" >&2; exit 1
}
[ -n "$LAB" ] || start() { loopback_start "$1"; }
ip() { echo "127.77.0.${1#m}"; }
# Waits (at most 20 s) until manager $1 sees $2 voters answering (Leader + Reachable).
settled() {
  for _ in $(seq 200); do
    local n; n=$(s "$1" node ls --format json 2>/dev/null | grep -cE '"ManagerStatus":"(Leader|Reachable)"' || true)
    [ "$n" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "failover: the managers did not settle" >&2; exit 1
}
leader() { s "$1" node ls --format json | grep '"ManagerStatus":"Leader"' | sed 's/.*"Hostname":"\([^"]*\)".*/\1/'; }
writes() { # $1 manager, $2 count: mean ms per write
  local t0; t0=$(now_ms)
  for _ in $(seq "$2"); do s "$1" join-token --rotate worker >/dev/null; done
  echo $(( ($(now_ms) - t0) / $2 ))
}

# Writes per second of 4 clients at once for 5 s, through manager $1.
throughput() {
  local t0 end n=0; t0=$(now_ms); end=$(( t0 + 5000 ))
  for c in 1 2 3 4; do
    ( k=0; while [ "$(now_ms)" -lt "$end" ]; do s "$1" join-token --rotate worker >/dev/null && k=$((k + 1)); done; echo "$k" > "$DIR/tp.$c" ) &
  done
  wait
  for c in 1 2 3 4; do n=$(( n + $(cat "$DIR/tp.$c") )); done
  echo $(( n * 1000 / ($(now_ms) - t0) ))
}

if [ -n "$LAB" ]; then
  # One manager first (for the single-manager write time), then the lab of three.
  "$BIN" lab up --name "$LAB" --nodes 1 --managers 1 >/dev/null
  one=$(writes n1 "$WRITES")
  "$BIN" lab down --name "$LAB" >/dev/null
  "$BIN" lab up --name "$LAB" --nodes 3 --managers 3 >/dev/null
else
  for n in m1 m2 m3; do start "$n"; done
  s m1 init --advertise-addr "$(ip m1)" --listen-addr "$(ip m1):2377" >/dev/null
  one=$(writes m1 "$WRITES")
  token=$(s m1 join-token -q manager)
  for n in m2 m3; do s "$n" join --token "$token" "$(ip m1):2377" --advertise-addr "$(ip $n)" >/dev/null; done
fi
first=${NODES[0]}
settled "$first" 3
three=$(writes "$first" "$WRITES")
per_sec=$(throughput "$first")

times=()
for k in $(seq "$KILLS"); do
  l=$(leader "${NODES[0]}" 2>/dev/null || true); [ -n "$l" ] || l=$(leader "${NODES[1]}")
  survivors=(); for n in "${NODES[@]}"; do [ "$n" != "$l" ] && survivors+=("$n"); done
  stop "$l"; t0=$(now_ms)
  until s "${survivors[0]}" join-token --rotate worker >/dev/null 2>&1; do
    [ $(( $(now_ms) - t0 )) -lt 30000 ] || { echo "failover: no write 30 s after kill $k" >&2; exit 1; }
  done
  times+=($(( $(now_ms) - t0 )))
  if [ -n "${SLOW_LOGS:-}" ] && [ "${times[-1]}" -gt 3000 ]; then
    # A slow round: the agents' logs as they are now, for whoever looks into it.
    mkdir -p "benches/managers/last-slow/kill-$k"
    cp "${LAB:+/run/shoal/lab-$LAB/}"*.log "$DIR"/*.log "benches/managers/last-slow/kill-$k/" 2>/dev/null || true
    echo "kill $k: ${times[-1]} ms, leader was $l" >> benches/managers/last-slow/rounds.txt
  fi
  start "$l"; settled "${survivors[0]}" 3
  # ... and the restarted one sees the leader too (a survivor may still count it reachable
  # from before its kill).
  settled "$l" 3
  printf '.' >&2
done
echo >&2
sorted=($(printf '%s\n' "${times[@]}" | sort -n))
pick() { echo "${sorted[$(( (${#sorted[@]} * $1 + 99) / 100 - 1 ))]}"; }
p50=$(pick 50); p99=$(pick 99); max=${sorted[-1]}
over=0; for t in "${times[@]}"; do [ "$t" -le 3000 ] || over=$((over + 1)); done
where=loopback; out=benches/managers/results-latest.md
if [ -n "$LAB" ]; then where="netns lab (data path and encrypted overlay up)"; out=benches/managers/results-lab.md; fi
report="## Manager failover, $where, $(date -u +%F)

$KILLS kills of the leader of three managers (release build, \`benches/managers/failover.sh ${LAB:+--lab }$KILLS $WRITES\`),
time from SIGKILL until a rotation commits through a survivor (the CLI retries within its
1.8 s no-leader window): p50 ${p50} ms, p99 ${p99} ms, max ${max} ms (goal: p99 <= 3000 ms);
${over} of $KILLS over 3000 ms.

One write (\`join-token --rotate worker\` through the CLI, process start included), mean of
$WRITES: ${one} ms with one manager, ${three} ms with three. Four clients at once, 5 s, three
managers: ${per_sec} writes/s."
echo "$report"
echo "$report" > "$out"
