#!/usr/bin/env bash
# benches/networks/run.sh - user networks (issue 16): CNI ADD/DEL latency, endpoint spread, and
# container-to-container against node-to-node traffic, with the real `shoal` and `shoal-cni`.
#
# Three labs, one after the other (`shoal lab up --name NAME --nodes N`, torn down with `shoal
# lab down`), each with an encrypted, attachable user network made with `shoal network create`
# on n1 (subnet 198.19.64.0/24). Containers are network namespaces made here with `ip netns add`;
# `shoal-cni` is called as a runtime calls it (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
# CNI_IFNAME, CNI_PATH in the environment; the configuration, with "network" and "socket":
# "/run/shoal/lab-NAME/nI.sock", on stdin), and each call is timed by the wall clock around the
# process.
#
#   A. 3 nodes: CNI ADD and DEL latency. First the floors (VERSION: the plugin process alone;
#      STATUS: the plugin and one round trip to the agent), then COLD cycles of ADD/DEL on n3
#      while no other container of the network is there (each ADD makes the network's bridge,
#      each DEL removes it; the very first also asks the manager for an address block), then a
#      resident container on every node and CYCLES ADD/DEL cycles rotating over n1..n3 (the
#      main figure; goal: ADD p99 <= 50 ms).
#   B. 5 nodes: spread. A resident "pinger" container on every node; then SPREAD samples, each
#      an ADD on node A (A rotating over n1..n5) and the time from the plugin's exit until every
#      other node lists the endpoint in `network inspect` (polled on each agent's socket every
#      5 ms; goal: p99 <= 300 ms), then DEL and the time until every other node has dropped it.
#      Then PINGS samples where the other nodes' pingers run `ping -i 0.01` to the new container
#      from the plugin's exit until its first reply, and as many towards a container every node
#      already knows (the floor: process start, ARP, one round trip).
#   C. 2 nodes: iperf3 TCP (REPS x DUR s, median) and ping (COUNT x 10 ms, average) between two
#      containers on n1 and n2, and between n1 and n2 over the ingress overlay (each node's
#      ingress address from `shoal network inspect ingress`), interleaved, in the same run. Goal:
#      container TCP >= 0.9x node TCP, container ping <= 1.1x node ping.
#
# Output: markdown on stdout and in benches/networks/results-latest.md (in --quick mode a file in
# the run's scratch directory, so CI leaves the checkout untouched).
#
# Addresses: only 198.18.0.0/15 (the lab's underlay 198.18.0.0/24 and ingress 198.19.0.0/24, the
# user network 198.19.64.0/24), only inside namespaces this script (or `shoal lab` for it)
# makes. Nothing in the default namespace is touched. Every wait is bounded; an EXIT trap stops
# the processes it started (by PID), deletes the container namespaces it made and takes its labs
# down, also on failure or Ctrl-C.
#
# Exit status: 0 when everything could be measured (goals missed are reported, not failed: this
# is a measurement); 1 when something could not run (a lab, an ADD, a sample that never
# converged, an iperf3 run without a result); 2 on a usage error.

set -u -o pipefail
export LC_ALL=C
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROBE="$HERE/probe.py"

usage() {
  cat <<EOF
usage: $0 [--quick] [--cycles N] [--cold N] [--floor N] [--spread N] [--pings N] [--reps N]
          [--dur SECONDS] [--count N] [--ping-rounds N] [--parts LIST] [--out FILE] [--quiet-wait SECONDS]

  --quick          CI's short mode: small counts, results into a scratch file; exits 1 only
                   when something could not run
  --cycles N       ADD/DEL cycles with residents, 3-node lab (default 200; quick 20)
  --cold N         ADD/DEL cycles with no other container on the node (default 30; quick 3)
  --floor N        VERSION and STATUS calls each, the floors (default 50; quick 10)
  --spread N       spread samples watched in network inspect, 5-node lab (default 50; quick 5)
  --pings N        spread samples watched by ping, and as many floor samples (default 20; quick 3)
  --reps N         iperf3 runs per path, median (default 3; quick 1)
  --dur SECONDS    seconds per iperf3 run (default 5; quick 2)
  --count N        pings per series, 10 ms apart (default 50; quick 20)
  --ping-rounds N  rounds of four ping series (node, container, container, node) (default 3;
                   quick 1)
  --parts LIST     which parts to run, of A,B,C (default all three)
  --out FILE       where the report goes (default benches/networks/results-latest.md)
  --quiet-wait S   wait up to S seconds for other work on the machine to calm down before
                   measuring (default 60; quick 0)

Environment: SHOAL_BIN and SHOAL_CNI_BIN = prebuilt binaries (otherwise they are built with
'cargo build --release -p shoal-control -p shoal-cni', honouring CARGO_TARGET_DIR).
EOF
}

QUICK=0 PARTS=A,B,C PING_ROUNDS="" CYCLES="" COLD="" FLOOR="" SPREAD="" PINGS="" REPS="" DUR="" COUNT="" OUT="" QUIET_WAIT=""
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --cycles) CYCLES=${2:-}; shift ;;
    --cold) COLD=${2:-}; shift ;;
    --floor) FLOOR=${2:-}; shift ;;
    --spread) SPREAD=${2:-}; shift ;;
    --pings) PINGS=${2:-}; shift ;;
    --reps) REPS=${2:-}; shift ;;
    --dur) DUR=${2:-}; shift ;;
    --count) COUNT=${2:-}; shift ;;
    --ping-rounds) PING_ROUNDS=${2:-}; shift ;;
    --parts) PARTS=${2:-}; shift ;;
    --out) OUT=${2:-}; shift ;;
    --quiet-wait) QUIET_WAIT=${2:-}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  CYCLES=${CYCLES:-20} COLD=${COLD:-3} FLOOR=${FLOOR:-10} SPREAD=${SPREAD:-5} PINGS=${PINGS:-3}
  REPS=${REPS:-1} DUR=${DUR:-2} COUNT=${COUNT:-20} PING_ROUNDS=${PING_ROUNDS:-1} QUIET_WAIT=${QUIET_WAIT:-0}
else
  CYCLES=${CYCLES:-200} COLD=${COLD:-30} FLOOR=${FLOOR:-50} SPREAD=${SPREAD:-50} PINGS=${PINGS:-20}
  REPS=${REPS:-3} DUR=${DUR:-5} COUNT=${COUNT:-50} PING_ROUNDS=${PING_ROUNDS:-3} QUIET_WAIT=${QUIET_WAIT:-60}
fi
for pair in "cycles:$CYCLES" "cold:$COLD" "floor:$FLOOR" "spread:$SPREAD" "pings:$PINGS" \
  "reps:$REPS" "dur:$DUR" "count:$COUNT" "ping-rounds:$PING_ROUNDS" "quiet-wait:$QUIET_WAIT"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || { echo "run.sh: --${pair%%:*} needs a whole number, got '${pair#*:}'" >&2; exit 2; }
done
((CYCLES >= 1 && SPREAD >= 1 && REPS >= 1 && DUR >= 1 && COUNT >= 1 && PING_ROUNDS >= 1)) \
  || { echo "run.sh: --cycles, --spread, --reps, --dur, --count and --ping-rounds must be at least 1" >&2; exit 2; }
[[ $PARTS =~ ^[ABC](,[ABC])*$ ]] || { echo "run.sh: --parts takes a comma-separated list of A, B, C" >&2; exit 2; }
part() { [[ ",$PARTS," == *",$1,"* ]]; }
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: needs root (it creates network namespaces); run it as root or with sudo" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/shoal-networks-bench.XXXXXX)
chmod 700 "$WORK"
if [ -z "$OUT" ]; then
  if [ "$QUICK" = 1 ]; then OUT="$WORK/results-quick.md"; else OUT="$HERE/results-latest.md"; fi
fi
ARGS_TEXT="$([ "$QUICK" = 1 ] && echo '--quick ')--cycles $CYCLES --cold $COLD --floor $FLOOR --spread $SPREAD --pings $PINGS --reps $REPS --dur $DUR --count $COUNT --ping-rounds $PING_ROUNDS$([ "$PARTS" = A,B,C ] || echo " --parts $PARTS")"

ID=$$
PREFIX="nb$ID"        # every lab and container namespace of this run starts with it
NET=bench
SUBNET=198.19.64.0/24
NS_LIST="$WORK/ns.list"   # container namespaces made by this run (the trap deletes them)
: >"$NS_LIST"
LABS=()               # labs up (the trap takes them down)
PIDS=()               # background processes started here (iperf3 servers, the sampler)
PROBLEMS=()           # what could not run (exit 1)
T0=$SECONDS

log() { printf '[networks-bench %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
problem() { PROBLEMS+=("$*"); log "PROBLEM: $*"; }

# ------------------------------------------------------------------------------ process care
stop_pid() {   # TERM, up to 3 s, then KILL; only PIDs we started
  local p=$1
  kill -TERM "$p" 2>/dev/null || { wait "$p" 2>/dev/null; return 0; }
  for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null
  return 0
}
ns_exists() { [ -n "$1" ] && [ -e "/run/netns/$1" ]; }
del_container_ns() {   # $1: a container namespace of ours; whatever runs in it we started
  local p
  ns_exists "$1" || return 0
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  ip netns del "$1" 2>/dev/null || log "could not delete namespace $1"
}
lab_down() {   # $1 lab name
  timeout 60 "$SHOAL_BIN" lab down --name "$1" >>"$WORK/lab.log" 2>&1 || log "lab down $1 failed (see $WORK/lab.log)"
  local l keep=()
  for l in "${LABS[@]}"; do [ "$l" = "$1" ] || keep+=("$l"); done
  LABS=("${keep[@]}")
}
cleanup() {
  local p ns l
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  PIDS=()
  while read -r ns; do del_container_ns "$ns"; done < <(sort -u "$NS_LIST")
  for l in "${LABS[@]}"; do lab_down "$l"; done
  log "cleaned up (logs in $WORK)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

for t in ip iperf3 ping python3; do
  have "$t" || { echo "run.sh: $t is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

# ---------------------------------------------------------------------------- the binaries
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
SHOAL_BIN=${SHOAL_BIN:-} CNI_BIN=${SHOAL_CNI_BIN:-}
if [ -z "$SHOAL_BIN" ] || [ -z "$CNI_BIN" ]; then
  have cargo || { echo "run.sh: no cargo, and SHOAL_BIN / SHOAL_CNI_BIN not set" >&2; exit 1; }
  log "cargo build --release -p shoal-control -p shoal-cni"
  if ! (cd "$REPO" && timeout 3600 cargo build --release -p shoal-control -p shoal-cni) >"$WORK/build.log" 2>&1; then
    log "the build failed; last lines:"; tail -20 "$WORK/build.log" >&2
    exit 1
  fi
  TD=${CARGO_TARGET_DIR:-$REPO/target}
  SHOAL_BIN=${SHOAL_BIN:-$TD/release/shoal} CNI_BIN=${CNI_BIN:-$TD/release/shoal-cni}
  BUILD_NOTE="release build of commit $COMMIT"
  [ -n "$(git -C "$REPO" status --porcelain -- control cni gossip ingress vxlan 2>/dev/null)" ] \
    && BUILD_NOTE+=" plus uncommitted changes"
else
  BUILD_NOTE="prebuilt binaries ($SHOAL_BIN, $CNI_BIN)"
fi
SHOAL_BIN=$(realpath "$SHOAL_BIN") CNI_BIN=$(realpath "$CNI_BIN")
[ -x "$SHOAL_BIN" ] && [ -x "$CNI_BIN" ] || { echo "run.sh: $SHOAL_BIN or $CNI_BIN is not executable" >&2; exit 1; }

# ------------------------------------------------------------------------- load on the machine
SAMPLER_ON=0
start_sampler() {
  python3 "$PROBE" sampler --work "$WORK" --prefix "$PREFIX" \
    --pgid "$(ps -o pgid= -p $$ | tr -d ' ')" >"$WORK/sampler.log" 2>&1 &
  PIDS+=("$!")
  SAMPLER_ON=1
  sleep 2
}
foreign_snap() { cat "$WORK/foreign.now" 2>/dev/null || echo "TOTAL 0"; }
foreign_note() {   # $1 snapshot file from the start, $2 seconds
  foreign_snap >"$WORK/foreign.end"
  python3 "$PROBE" foreign-note "$1" "$WORK/foreign.end" "$2"
}
LOAD_NOTE=""
wait_quiet() {   # up to QUIET_WAIT s for other work < 10% of the machine over 5 s
  if ((QUIET_WAIT == 0)); then LOAD_NOTE="not checked before measuring"; return 0; fi
  local t0=$SECONDS pct=?
  while ((SECONDS - t0 < QUIET_WAIT)); do
    foreign_snap >"$WORK/foreign.q"
    sleep 5
    pct=$(foreign_note "$WORK/foreign.q" 5 | awk '{print $3 + 0}')
    if ((pct < 10)); then
      LOAD_NOTE="quiet at start (other work ${pct}% over 5 s)"
      log "machine quiet (other work ${pct}%)"
      return 0
    fi
    log "waiting for a quieter machine: other work ${pct}% over 5 s"
  done
  LOAD_NOTE="NOT quiet at start (other work ${pct}% after waiting ${QUIET_WAIT} s)"
  log "machine still busy; measuring anyway"
}
declare -A PHASE_LOAD
phase_start() { foreign_snap >"$WORK/foreign.$1"; eval "PHASE_T_$1=$SECONDS"; }
phase_end() { local t; eval "t=\$PHASE_T_$1"; PHASE_LOAD[$1]=$(foreign_note "$WORK/foreign.$1" $((SECONDS - t > 0 ? SECONDS - t : 1))); }

# ------------------------------------------------------------------------------- lab helpers
lab_up() {   # $1 name, $2 nodes: the lab, then the user network on every node's view
  local name=$1 n=$2 t=$SECONDS
  log "shoal lab up --name $name --nodes $n"
  LABS+=("$name")
  if ! timeout 180 "$SHOAL_BIN" lab up --name "$name" --nodes "$n" >"$WORK/lab-$name.out" 2>&1; then
    problem "shoal lab up --name $name --nodes $n failed: $(tail -c 300 "$WORK/lab-$name.out" | tr '\n' ' ')"
    return 1
  fi
  log "lab $name up in $((SECONDS - t)) s"
  if ! lab_exec "$name" 1 shoal network create --opt encrypted --attachable --subnet "$SUBNET" "$NET" \
      >"$WORK/create-$name.out" 2>&1; then
    problem "network create on $name failed: $(tr '\n' ' ' <"$WORK/create-$name.out")"
    return 1
  fi
  local i ok
  for i in $(seq 1 "$n"); do
    ok=0
    for _ in $(seq 1 100); do
      lab_exec "$name" "$i" shoal network ls 2>/dev/null | awk '{print $2}' | grep -qx "$NET" && { ok=1; break; }
      sleep 0.1
    done
    ((ok)) || { problem "n$i of $name does not know network $NET after 10 s"; return 1; }
  done
}
lab_exec() {   # $1 lab, $2 node index, command...
  local name=$1 i=$2; shift 2
  timeout 30 "$SHOAL_BIN" lab exec --name "$name" "n$i" -- "$@"
}
sock() { echo "/run/shoal/lab-$1/n$2.sock"; }

CNI_MS="" CNI_RC=""
cni_call() {   # $1 command, $2 lab, $3 node, $4 container namespace (or ""): timed; stdout to $WORK/cni.out
  local cmd=$1 lab=$2 node=$3 ns=${4:-} conf t0 t1
  conf="{\"cniVersion\":\"1.1.0\",\"name\":\"$NET\",\"type\":\"shoal-cni\",\"network\":\"$NET\",\"socket\":\"$(sock "$lab" "$node")\"}"
  if [ -n "$ns" ]; then
    t0=${EPOCHREALTIME/./}
    CNI_COMMAND=$cmd CNI_CONTAINERID="$ns-0123456789abcdef" CNI_NETNS="/run/netns/$ns" CNI_IFNAME=eth0 \
      CNI_PATH=/opt/cni/bin "$CNI_BIN" <<<"$conf" >"$WORK/cni.out" 2>>"$WORK/cni.err"
    CNI_RC=$?
    t1=${EPOCHREALTIME/./}
  else
    t0=${EPOCHREALTIME/./}
    CNI_COMMAND=$cmd CNI_PATH=/opt/cni/bin "$CNI_BIN" <<<"$conf" >"$WORK/cni.out" 2>>"$WORK/cni.err"
    CNI_RC=$?
    t1=${EPOCHREALTIME/./}
  fi
  CNI_MS=$(((t1 - t0) / 1000)).$(printf '%03d' $(((t1 - t0) % 1000)))
  return "$CNI_RC"
}
container() {  # $1 name: a fresh container namespace of ours
  ip netns add "$1" || return 1
  echo "$1" >>"$NS_LIST"
  ip -n "$1" link set lo up
}
cni_ip() { python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])' <"$WORK/cni.out" 2>/dev/null; }
stats() { python3 "$PROBE" stats; }   # numbers on stdin -> "p50 p99 max min n"
col() { awk -v c="$1" '{print $c}' "$2"; }

# ------------------------------------------------------------------ A: ADD/DEL latency, 3 nodes
# A failed ADD is shoal's failure, not the measurement's: it is counted and reported (and fails
# the run), and the cycles go on.
add_failed() {   # $1 series, $2 cycle, $3 node
  local msg
  msg=$(python3 -c 'import json,sys; print(json.load(sys.stdin).get("msg", "?"))' <"$WORK/cni.out" 2>/dev/null || head -c 300 "$WORK/cni.out")
  echo "$1 $2 n$3 after ${CNI_MS} ms: $msg" >>"$WORK/add-failures.txt"
  log "ADD failed ($1 cycle $2 on n$3): $msg"
}
A_OK=0 FIRST_ADD=- FIRST_DEL=-
phase_a() {
  local lab="${PREFIX}a" i node ns
  lab_up "$lab" 3 || return 1
  phase_start a
  : >"$WORK/floor-version.txt"; : >"$WORK/floor-status.txt"
  for i in $(seq 1 "$FLOOR"); do
    cni_call VERSION "$lab" 2 "" && echo "$CNI_MS" >>"$WORK/floor-version.txt"
    cni_call STATUS "$lab" 2 "" && echo "$CNI_MS" >>"$WORK/floor-status.txt"
  done
  log "floors: VERSION $(stats <"$WORK/floor-version.txt"), STATUS $(stats <"$WORK/floor-status.txt") (p50 p99 max min n, ms)"
  # kernel anchors: what the kernel takes for the same devices, made with the `ip` tool in two
  # scratch namespaces of ours (its process start included, as the plugin's is)
  local kh="${PREFIX}-kh" kc="${PREFIX}-kc" t1 t2 t3 t4 t5
  container "$kh" && container "$kc" || { problem "ip netns add $kh/$kc failed"; return 1; }
  : >"$WORK/kernel.txt"
  for i in $(seq 1 "$FLOOR"); do
    t1=${EPOCHREALTIME/./}
    ip -n "$kh" link add kv0 mtu 1414 up type veth peer name eth0 mtu 1414 netns "$kc" || break
    t2=${EPOCHREALTIME/./}
    ip -n "$kh" link del kv0 || break
    t3=${EPOCHREALTIME/./}
    ip -n "$kh" link add kbr0 up type bridge || break
    t4=${EPOCHREALTIME/./}
    ip -n "$kh" link del kbr0 || break
    t5=${EPOCHREALTIME/./}
    awk -v a="$t1" -v b="$t2" -v c="$t3" -v d="$t4" -v e="$t5" \
      'BEGIN {printf "%.3f %.3f %.3f %.3f\n", (b - a) / 1000, (c - b) / 1000, (d - c) / 1000, (e - d) / 1000}' >>"$WORK/kernel.txt"
  done
  del_container_ns "$kh"; del_container_ns "$kc"
  log "kernel: veth add $(col 1 "$WORK/kernel.txt" | stats), del $(col 2 "$WORK/kernel.txt" | stats); bridge add $(col 3 "$WORK/kernel.txt" | stats), del $(col 4 "$WORK/kernel.txt" | stats)"
  # cold: n3 has no other container of the network (the first ADD also asks for a block)
  : >"$WORK/cold.txt"
  for i in $(seq 1 "$COLD"); do
    ns="${PREFIX}-k$i"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    local add del
    if ! cni_call ADD "$lab" 3 "$ns"; then
      add_failed cold "$i" 3
      cni_call DEL "$lab" 3 "$ns"   # as a runtime would after a failed ADD; not timed
      del_container_ns "$ns"
      continue
    fi
    add=$CNI_MS
    cni_call DEL "$lab" 3 "$ns" || { problem "cold DEL $i on n3 failed: $(cat "$WORK/cni.out")"; return 1; }
    del=$CNI_MS
    del_container_ns "$ns"
    if ((i == 1)); then FIRST_ADD=$add FIRST_DEL=$del; else echo "$add $del" >>"$WORK/cold.txt"; fi
  done
  ((COLD > 0)) && log "cold: first ADD $FIRST_ADD ms (with the block), then ADD $(col 1 "$WORK/cold.txt" | stats), DEL $(col 2 "$WORK/cold.txt" | stats)"
  # a resident container on every node; for n1 and n2 this is their first ADD (block, bridge)
  : >"$WORK/resident-a.txt"
  for node in 1 2 3; do
    ns="${PREFIX}-r$node"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    cni_call ADD "$lab" "$node" "$ns" || { problem "resident ADD on n$node failed: $(cat "$WORK/cni.out")"; return 1; }
    echo "n$node $CNI_MS" >>"$WORK/resident-a.txt"
  done
  : >"$WORK/cycles.txt"
  for i in $(seq 1 "$CYCLES"); do
    node=$(((i - 1) % 3 + 1))
    ns="${PREFIX}-c$i"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    local add del
    if ! cni_call ADD "$lab" "$node" "$ns"; then
      add_failed cycles "$i" "$node"
      cni_call DEL "$lab" "$node" "$ns"
      del_container_ns "$ns"
      continue
    fi
    add=$CNI_MS
    cni_call DEL "$lab" "$node" "$ns" || { problem "DEL $i on n$node failed: $(cat "$WORK/cni.out")"; return 1; }
    del=$CNI_MS
    del_container_ns "$ns"
    echo "$node $add $del" >>"$WORK/cycles.txt"
    ((i % 50 == 0)) && log "cycle $i: ADD $(col 2 "$WORK/cycles.txt" | stats), DEL $(col 3 "$WORK/cycles.txt" | stats)"
  done
  phase_end a
  local nf
  nf=$(wc -l <"$WORK/add-failures.txt")
  ((nf == 0)) || problem "$nf ADD(s) failed in part A (a shoal failure, see the report)"
  cp "/run/shoal/lab-$lab/n2.log" "$WORK/agent-a-n2.log" 2>/dev/null
  for node in 1 2 3; do del_container_ns "${PREFIX}-r$node"; done
  lab_down "$lab"
  A_OK=1
}

# ----------------------------------------------------------------------- B: spread, 5 nodes
B_OK=0 CLI_CHECK="not run"
phase_b() {
  local lab="${PREFIX}b" node ns pingers=() ips=() n=5 ok rc=0
  lab_up "$lab" "$n" || return 1
  for node in $(seq 1 "$n"); do
    ns="${PREFIX}-p$node"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    cni_call ADD "$lab" "$node" "$ns" || { problem "pinger ADD on n$node failed: $(cat "$WORK/cni.out")"; return 1; }
    ips+=("$(cni_ip)") pingers+=("$ns")
    # ARP retried every 10 ms instead of every second: what is timed is shoal, not the back-off
    ip netns exec "$ns" sysctl -qw net.ipv4.neigh.eth0.retrans_time_ms=10
  done
  log "pingers: ${ips[*]}"
  for node in $(seq 1 "$n"); do
    ok=0
    for _ in $(seq 1 150); do
      [ "$(lab_exec "$lab" "$node" shoal network inspect "$NET" 2>/dev/null \
        | python3 -c 'import json,sys; print(len(json.load(sys.stdin)[0].get("endpoints") or []))' 2>/dev/null)" = "$n" ] \
        && { ok=1; break; }
      sleep 0.1
    done
    ((ok)) || { problem "n$node does not list the $n pingers after 15 s"; return 1; }
  done
  phase_start b
  local common=(--cni "$CNI_BIN" --lab "$lab" --nodes "$n" --net "$NET" --prefix "${PREFIX}-"
    --ns-list "$NS_LIST" --pingers "$(IFS=,; echo "${pingers[*]}")" --pinger-ips "$(IFS=,; echo "${ips[*]}")")
  : >"$WORK/spread-inspect.jsonl"; : >"$WORK/spread-ping.jsonl"; : >"$WORK/spread-pingfloor.jsonl"
  log "spread: $SPREAD samples watched in network inspect"
  python3 "$PROBE" spread "${common[@]}" --mode inspect --samples "$SPREAD" \
    --out "$WORK/spread-inspect.jsonl" 2>>"$WORK/probe.err" || rc=1
  if ((PINGS > 0)); then
    log "spread: $PINGS samples watched by ping, $PINGS floor samples"
    python3 "$PROBE" spread "${common[@]}" --mode pingfloor --samples "$PINGS" \
      --out "$WORK/spread-pingfloor.jsonl" 2>>"$WORK/probe.err" || rc=1
    python3 "$PROBE" spread "${common[@]}" --mode ping --samples "$PINGS" \
      --out "$WORK/spread-ping.jsonl" 2>>"$WORK/probe.err" || rc=1
  fi
  phase_end b
  ((rc == 0)) || problem "some spread samples did not converge within 5 s or failed (see $WORK/spread-*.jsonl)"
  # what the poller read is what the CLI shows
  local listed
  listed=$(lab_exec "$lab" 2 shoal network inspect "$NET" 2>/dev/null \
    | python3 -c 'import json,sys; print(" ".join(sorted(e["ip"].split("/")[0] for e in json.load(sys.stdin)[0].get("endpoints") or [])))' 2>/dev/null)
  CLI_CHECK="\`shoal lab exec n2 -- shoal network inspect $NET\` at the end lists: $listed"
  cp "/run/shoal/lab-$lab/n1.log" "$WORK/agent-b-n1.log" 2>/dev/null
  for node in $(seq 1 "$n"); do del_container_ns "${PREFIX}-p$node"; done
  lab_down "$lab"
  B_OK=1
}

# ------------------------------------------------- C: containers against nodes, 2 nodes
C_OK=0
declare -A TCP RETR PING_AVG PING_MED
IPERF_GBPS="" IPERF_RETR=""
iperf_run() {   # $1 server ns, $2 client ns, $3 target, $4 tag
  local json="$WORK/iperf-$4.json" spid
  IPERF_GBPS=FAIL IPERF_RETR=-
  ip netns exec "$1" iperf3 -s -1 -p 5201 >"$WORK/iperf-server-$4.log" 2>&1 &
  spid=$!
  PIDS+=("$spid")
  for _ in $(seq 1 50); do
    ip netns exec "$1" ss -Hltn "sport = :5201" 2>/dev/null | grep -q . && break
    sleep 0.1
  done
  timeout $((DUR + 30)) ip netns exec "$2" iperf3 -c "$3" -p 5201 -t "$DUR" -J --connect-timeout 3000 \
    >"$json" 2>"$json.err"
  for _ in $(seq 1 30); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  stop_pid "$spid"
  read -r IPERF_GBPS IPERF_RETR < <(python3 -c '
import json, sys
try:
    e = json.load(open(sys.argv[1]))["end"]
    print("%.2f %d" % (e["sum_received"]["bits_per_second"] / 1e9, e["sum_sent"].get("retransmits", -1)))
except Exception:
    print("FAIL -")' "$json")
}
ping_avg() {    # $1 from ns, $2 target, $3 file to add each RTT (µs) to -> average RTT in µs, or "-"
  timeout 60 ip netns exec "$1" ping -n -c "$COUNT" -i 0.01 -W 1 "$2" >"$WORK/ping.out" 2>&1
  cat "$WORK/ping.out" >>"$WORK/ping.log"
  awk '/ time=/ {sub(/.* time=/, ""); printf "%.0f\n", $1 * 1000}' "$WORK/ping.out" >>"$3"
  awk -F'/' '/min\/avg/ {printf "%.0f\n", $5 * 1000; f=1} END {if (!f) print "-"}' "$WORK/ping.out"
}
mean() {   # the mean of the numbers among the arguments, rounded, or "-"
  printf '%s\n' "$@" | awk '/^[0-9.]+$/ {s += $1; n++} END {if (n) printf "%.0f\n", s / n; else print "-"}'
}
median() {
  printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{v[NR] = $1} END {
    if (NR == 0) {print "-"; exit}
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f\n", m }'
}
phase_c() {
  local lab="${PREFIX}c" c1="${PREFIX}-t1" c2="${PREFIX}-t2" ip1 ip2 in1 in2 r ok
  lab_up "$lab" 2 || return 1
  container "$c1" && container "$c2" || { problem "ip netns add failed"; return 1; }
  cni_call ADD "$lab" 1 "$c1" || { problem "ADD on n1 failed: $(cat "$WORK/cni.out")"; return 1; }
  ip1=$(cni_ip)
  cni_call ADD "$lab" 2 "$c2" || { problem "ADD on n2 failed: $(cat "$WORK/cni.out")"; return 1; }
  ip2=$(cni_ip)
  in1=$(lab_exec "$lab" 1 shoal network inspect ingress | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["local"]["address"].split("/")[0])')
  in2=$(lab_exec "$lab" 2 shoal network inspect ingress | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["local"]["address"].split("/")[0])')
  C_MTU="container eth0 MTU $(ip netns exec "$c1" cat /sys/class/net/eth0/mtu), ingress MTU $(ip netns exec "$lab-n1" cat /sys/class/net/shoal-ingress/mtu 2>/dev/null || echo '?')"
  C_ADDRS="containers $ip1 (n1) and $ip2 (n2); nodes' ingress $in1 and $in2"
  log "phase C: $C_ADDRS; $C_MTU"
  ok=0
  for _ in $(seq 1 20); do
    timeout 3 ip netns exec "$c1" ping -q -c 1 -W 1 "$ip2" >/dev/null 2>&1 \
      && timeout 3 ip netns exec "$lab-n1" ping -q -c 1 -W 1 "$in2" >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.5
  done
  ((ok)) || { problem "no ping $ip1 -> $ip2 or $in1 -> $in2 after ~20 s"; return 1; }
  phase_start c
  # ping: PING_ROUNDS rounds of four series, in the order node, container, container, node (so
  # a drift cancels); each path's figure is the mean of its series' averages
  local pn=() pc=()
  : >"$WORK/rtt-node.txt"; : >"$WORK/rtt-ctr.txt"
  for r in $(seq 1 "$PING_ROUNDS"); do
    pn+=("$(ping_avg "$lab-n1" "$in2" "$WORK/rtt-node.txt")")
    pc+=("$(ping_avg "$c1" "$ip2" "$WORK/rtt-ctr.txt")")
    pc+=("$(ping_avg "$c1" "$ip2" "$WORK/rtt-ctr.txt")")
    pn+=("$(ping_avg "$lab-n1" "$in2" "$WORK/rtt-node.txt")")
  done
  PING_RAW="series averages, µs: nodes [${pn[*]}], containers [${pc[*]}] (rounds of node, container, container, node)"
  PING_AVG[node]=$(mean "${pn[@]}") PING_AVG[ctr]=$(mean "${pc[@]}")
  PING_MED[node]=$(stats <"$WORK/rtt-node.txt" | awk '{printf "%.0f", $1}')
  PING_MED[ctr]=$(stats <"$WORK/rtt-ctr.txt" | awk '{printf "%.0f", $1}')
  log "ping avg: $PING_RAW"
  local tn=() tc=() rn=() rc=()
  for r in $(seq 1 "$REPS"); do
    # which path goes first alternates from one repetition to the next
    if ((r % 2)); then
      iperf_run "$lab-n2" "$lab-n1" "$in2" "node-$r"; tn+=("$IPERF_GBPS") rn+=("$IPERF_RETR")
      iperf_run "$c2" "$c1" "$ip2" "ctr-$r"; tc+=("$IPERF_GBPS") rc+=("$IPERF_RETR")
    else
      iperf_run "$c2" "$c1" "$ip2" "ctr-$r"; tc+=("$IPERF_GBPS") rc+=("$IPERF_RETR")
      iperf_run "$lab-n2" "$lab-n1" "$in2" "node-$r"; tn+=("$IPERF_GBPS") rn+=("$IPERF_RETR")
    fi
    log "iperf3 run $r: nodes ${tn[-1]} Gbit/s (${rn[-1]} retr), containers ${tc[-1]} Gbit/s (${rc[-1]} retr)"
  done
  phase_end c
  TCP[node]=$(median "${tn[@]}") TCP[ctr]=$(median "${tc[@]}")
  RETR[node]=$(median "${rn[@]}") RETR[ctr]=$(median "${rc[@]}")
  C_SAMPLES="nodes [${tn[*]}] Gbit/s, retransmits [${rn[*]}]; containers [${tc[*]}] Gbit/s, retransmits [${rc[*]}]"
  [[ " ${tn[*]} ${tc[*]} " == *" FAIL "* ]] && problem "an iperf3 run gave no result (see $WORK/iperf-*.json)"
  [ "${PING_AVG[node]}" = - ] || [ "${PING_AVG[ctr]}" = - ] && problem "a ping series got no reply (see $WORK/ping.log)"
  del_container_ns "$c1"; del_container_ns "$c2"
  lab_down "$lab"
  C_OK=1
}

# -------------------------------------------------------------------------------- report
num() { [[ ${1:-} =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { num "$1" && num "$2" && awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}' || echo -; }
verdict() { # $1 awk condition over a and b, $2 a, $3 b
  if num "$2" && num "$3"; then
    if awk -v a="$2" -v b="$3" "BEGIN {exit !($1)}"; then echo met; else echo "**not met**"; fi
  else echo "n/a (not measured)"; fi
}
jq_field() {  # $1 jsonl, $2 python expression over r (one sample) -> one value per line
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    try:
        v = eval(sys.argv[2])
    except Exception:
        v = None
    if v is not None:
        print(v)' "$1" "$2" 2>/dev/null
}
row() {  # $1 label, then "p50 p99 max min n" -> a table row
  local label=$1; shift
  read -r p50 p99 max min n <<<"$*"
  echo "| $label | $p50 | $p99 | $max | $min | $n |"
}

report() {
  local cores model
  cores=$(nproc)
  model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
  echo "# shoal user networks: CNI latency, endpoint spread, containers vs nodes ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Machine: $(uname -sr), $cores cores ($model), shared with other work; every lab node, the"
  echo "plugin, the pollers, iperf3 and ping share these cores. shoal: $BUILD_NOTE. Mode:"
  echo "$([ "$QUICK" = 1 ] && echo 'quick (CI short mode)' || echo full). Machine load: $LOAD_NOTE; load average at start $LOAD_START, at"
  echo "end $(cut -d' ' -f1-3 /proc/loadavg). Lab state directories are under /run (tmpfs): the agent's"
  echo "store writes do not wait for a disk here."
  echo
  echo "Reproduce (as root, from the repository root):"
  echo
  echo '```sh'
  echo "benches/networks/run.sh $ARGS_TEXT"
  echo '```'
  echo
  echo "Percentiles are nearest-rank (p99 of 50 samples is the largest). Times in ms."
  echo
  echo "## Goals"
  echo
  local add_p99 sp_p99 sp_ping_p99
  add_p99=$(col 2 "$WORK/cycles.txt" 2>/dev/null | stats | awk '{print $2}')
  sp_p99=$(jq_field "$WORK/spread-inspect.jsonl" 'r.get("max_ms")' | stats | awk '{print $2}')
  sp_ping_p99=$(jq_field "$WORK/spread-ping.jsonl" 'r.get("max_ms")' | stats | awk '{print $2}')
  echo "| goal (issue 16) | measured | verdict |"
  echo "|---|---|---|"
  echo "| CNI ADD p99 <= 50 ms (3 nodes, with a container of the network already on the node) | $add_p99 ms | $(verdict 'a <= 50' "$add_p99" 0) |"
  echo "| spread p99 <= 300 ms (5 nodes, ADD exit until every other node lists the endpoint) | $sp_p99 ms | $(verdict 'a <= 300' "$sp_p99" 0) |"
  echo "| the same, reached = the first ping reply from a container on every other node | $sp_ping_p99 ms | $(verdict 'a <= 300' "$sp_ping_p99" 0) |"
  echo "| container TCP >= 0.9x node TCP over ingress (2 nodes, encrypted) | $(ratio "${TCP[ctr]:-}" "${TCP[node]:-}")x | $(verdict 'a >= 0.9 * b' "${TCP[ctr]:-}" "${TCP[node]:-}") |"
  echo "| container ping within +10% of node ping over ingress | $(ratio "${PING_AVG[ctr]:-}" "${PING_AVG[node]:-}")x | $(verdict 'a <= 1.1 * b' "${PING_AVG[ctr]:-}" "${PING_AVG[node]:-}") |"
  echo
  echo "## A. CNI ADD and DEL, 3-node lab"
  echo
  echo "Each \`shoal-cni\` call timed by the wall clock around the process (fork and exec included)."
  echo "Cycles: a fresh namespace, ADD, DEL, the namespace deleted; rotating over n1, n2, n3."
  echo
  echo "| call | p50 | p99 | max | min | n |"
  echo "|---|---|---|---|---|---|"
  row "VERSION (the plugin alone, no agent)" "$(stats <"$WORK/floor-version.txt")"
  row "STATUS (the plugin + one round trip to the agent)" "$(stats <"$WORK/floor-status.txt")"
  row "**ADD**, a resident container on the node" "$(col 2 "$WORK/cycles.txt" | stats)"
  row "**DEL**, a resident container on the node" "$(col 3 "$WORK/cycles.txt" | stats)"
  local nd
  for nd in 1 2 3; do
    row "ADD on n$nd only$([ "$nd" = 1 ] && echo ' (the manager)')" "$(awk -v n="$nd" '$1 == n {print $2}' "$WORK/cycles.txt" | stats)"
  done
  row "ADD, no other container of the network on n3 (makes the bridge)" "$(col 1 "$WORK/cold.txt" | stats)"
  row "DEL of that last container (removes the bridge)" "$(col 2 "$WORK/cold.txt" | stats)"
  row "anchor: \`ip link add\` a veth pair, one end into a namespace" "$(col 1 "$WORK/kernel.txt" | stats)"
  row "anchor: \`ip link del\` that veth" "$(col 2 "$WORK/kernel.txt" | stats)"
  row "anchor: \`ip link add\` a bridge" "$(col 3 "$WORK/kernel.txt" | stats)"
  row "anchor: \`ip link del\` that bridge" "$(col 4 "$WORK/kernel.txt" | stats)"
  echo
  local fc fw
  fc=$(grep -c '^cold ' "$WORK/add-failures.txt") fw=$(grep -c '^cycles ' "$WORK/add-failures.txt")
  echo "**Failed ADDs: $fw of $CYCLES cycles with a resident, $fc of $COLD cycles with none** (the"
  echo "tables count the successful ones)."
  if [ -s "$WORK/add-failures.txt" ]; then
    echo
    sed 's/^/- /' "$WORK/add-failures.txt"
  fi
  echo
  echo "The first ADD of the network on n3 (asks the manager for an address block, makes the"
  echo "bridge): $FIRST_ADD ms; its DEL: $FIRST_DEL ms. The residents' ADDs (first on n1 and n2):"
  echo "$(tr '\n' ' ' <"$WORK/resident-a.txt" 2>/dev/null)(node ms). Other work during this phase: ${PHASE_LOAD[a]:-n/a}."
  echo
  local v st ad dl vd bd ca cd
  v=$(stats <"$WORK/floor-version.txt" | awk '{print $1}')
  st=$(stats <"$WORK/floor-status.txt" | awk '{print $1}')
  ad=$(col 2 "$WORK/cycles.txt" | stats | awk '{print $1}')
  dl=$(col 3 "$WORK/cycles.txt" | stats | awk '{print $1}')
  vd=$(col 2 "$WORK/kernel.txt" | stats | awk '{print $1}')
  bd=$(col 4 "$WORK/kernel.txt" | stats | awk '{print $1}')
  cd=$(col 2 "$WORK/cold.txt" | stats | awk '{print $1}')
  echo "Where the time goes (p50s of this run): starting the plugin process is $v ms (VERSION), one"
  echo "round trip to the agent adds $(awk -v a="$st" -v b="$v" 'BEGIN {printf "%.1f", a - b}') ms (STATUS $st ms); an ADD spends $(awk -v a="$ad" -v b="$st" 'BEGIN {printf "%.1f", a - b}') ms more in the agent"
  echo "(address, its record in the store, the veth pair made in one netlink request, the container"
  echo "side configured from a thread in its namespace). A DEL ($dl ms) is mostly the kernel deleting"
  echo "the veth: \`ip link del\` of a veth takes $vd ms here (device unregistration waits for RCU)."
  echo "The DEL of a network's last container on a node ($cd ms) also removes the network's device"
  echo "and bridge: the bridge's deletion alone is $bd ms (anchor), and an strace of the agent (done"
  echo "once by hand, not part of this script) showed the rest: the data path stops the device's"
  echo "reader thread by a flag it reads only at its 100 ms poll timeout (\`vxlan/src/io/driver.rs\`"
  echo "\`POLL\`, \`remove_device\` joins it), so that DEL waits up to 100 ms more, then ~13 ms for the"
  echo "TAP's close."
  if grep -q 'busy' "$WORK/add-failures.txt"; then
    echo
    echo "The failed ADDs (\"Device or resource busy\") follow a DEL of the network's last container"
    echo "on that node that returned early: the network's TAP is closed only when its last holder"
    echo "drops it, and the data path's UDP receive thread keeps its copy of the devices (an"
    echo "\`Arc<Tap>\`, \`Devices::refresh\` in \`vxlan/src/io/driver.rs\`) until it next wakes, up to"
    echo "100 ms (\`POLL\`) later on an idle underlay. An ADD in that window makes the device again"
    echo "under the same name while the old one still has its queue attached, and TUNSETIFF says"
    echo "EBUSY. A runtime that replaces the last container of a network on a node within ~100 ms"
    echo "sees that ADD fail (a shoal bug, not fixed here)."
  fi
  echo
  echo "## B. Spread, 5-node lab"
  echo
  echo "A resident container on every node; each sample an ADD on node A (A rotating over"
  echo "n1..n5), timed from the plugin's exit. Reached in \`network inspect\`: each other node's"
  echo "agent is asked what \`shoal network inspect $NET\` asks (\`{\"network_inspect\":...}\` on its"
  echo "socket) every 5 ms. Reached by ping: from the resident container on each other node,"
  echo "\`ping -n -i 0.01 IP\` started at the plugin's exit and stopped at its first reply (one"
  echo "packet every 10 ms, on through errors; the pinger's neighbour cache flushed before each"
  echo "sample and its ARP retried every 10 ms instead of every second); the floor is the same"
  echo "towards a container every node already knows."
  echo
  echo "| what (ms) | p50 | p99 | max | min | n |"
  echo "|---|---|---|---|---|---|"
  row "**spread, inspect: every other node lists it**" "$(jq_field "$WORK/spread-inspect.jsonl" 'r.get("max_ms")' | stats)"
  row "inspect: each other node (4 per sample)" "$(jq_field "$WORK/spread-inspect.jsonl" '"\n".join(str(v) for v in r["reach_ms"].values() if v is not None)' | stats)"
  row "**spread, ping: every other node gets a reply**" "$(jq_field "$WORK/spread-ping.jsonl" 'r.get("max_ms")' | stats)"
  row "ping: each other node" "$(jq_field "$WORK/spread-ping.jsonl" '"\n".join(str(v) for v in r["reach_ms"].values() if v is not None)' | stats)"
  row "ping floor (a known container): every other node" "$(jq_field "$WORK/spread-pingfloor.jsonl" 'r.get("max_ms")' | stats)"
  row "DEL until every other node dropped it" "$(cat "$WORK"/spread-*.jsonl 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    v = json.loads(l).get("del_spread_ms")
    if v is not None: print(v)' | stats)"
  row "ADD on the 5-node lab (during the inspect samples)" "$(jq_field "$WORK/spread-inspect.jsonl" 'r.get("add_ms")' | stats)"
  echo
  local missed
  missed=$(cat "$WORK"/spread-*.jsonl 2>/dev/null | grep -c '"missed"\|"error"\|del_spread_missed')
  echo "Where the time goes: the ADD's agent hands the signed endpoint record to gossip before it"
  echo "answers, and a new record goes out at once (within gossip's 10 ms \`EAGER_SPACING\`) to"
  echo "\`num_indirect_probes\` members, 5 in the agent's LAN configuration: in a 5-node lab that is"
  echo "every other node in the first round, so this lab measures one datagram and the receivers'"
  echo "processing, not relaying across hops (larger clusters are not measured here). The ping"
  echo "figures are close to their floor: what they add over inspect is starting ping in the"
  echo "container, ARP (answered by the local agent) and one round trip."
  echo
  echo "Samples that did not converge within 5 s or failed: $missed. $CLI_CHECK."
  echo "Other work during this phase: ${PHASE_LOAD[b]:-n/a}."
  echo
  echo "## C. Containers against nodes, 2-node lab, encrypted"
  echo
  echo "iperf3 TCP, 1 stream, ${DUR} s, median of ${REPS} (receiver Gbit/s; sender retransmits),"
  echo "node and container runs interleaved (which goes first alternates); ping: series of ${COUNT} x"
  echo "10 ms, each averaged, in ${PING_ROUNDS} round(s) of node, container, container, node; the mean of"
  echo "each path's series."
  echo "${C_ADDRS:-}; ${C_MTU:-}."
  echo
  echo "| path | TCP Gbit/s | retransmits | ping avg µs | ping median µs |"
  echo "|---|---|---|---|---|"
  echo "| n1 -> n2 over ingress (the nodes' namespaces) | ${TCP[node]:--} | ${RETR[node]:--} | ${PING_AVG[node]:--} | ${PING_MED[node]:--} |"
  echo "| container on n1 -> container on n2, user network | ${TCP[ctr]:--} | ${RETR[ctr]:--} | ${PING_AVG[ctr]:--} | ${PING_MED[ctr]:--} |"
  echo "| ratio container / node | $(ratio "${TCP[ctr]:-}" "${TCP[node]:-}") | | $(ratio "${PING_AVG[ctr]:-}" "${PING_AVG[node]:-}") | $(ratio "${PING_MED[ctr]:-}" "${PING_MED[node]:-}") |"
  echo
  echo "The goal is judged on the averages, as issue 16 states it; the median of the same RTTs is"
  echo "beside them because on this shared machine a few slow replies move an average of $COUNT."
  echo "The container path has one veth pair and one bridge more at each end than the node path."
  echo
  echo "Raw: iperf3 ${C_SAMPLES:-}; ping ${PING_RAW:-}. Other work during this phase: ${PHASE_LOAD[c]:-n/a}."
  echo
  if ((${#PROBLEMS[@]})); then
    echo "## Failures (the run exits 1)"
    echo
    printf -- '- %s\n' "${PROBLEMS[@]}"
    echo
  fi
  echo "Time: $((SECONDS - T0)) s. Logs and raw samples: $WORK (cycles.txt, cold.txt, spread-*.jsonl, iperf-*.json)."
}

# ---------------------------------------------------------------------------------- main
for f in add-failures.txt floor-version.txt floor-status.txt kernel.txt cold.txt cycles.txt resident-a.txt spread-inspect.jsonl \
  spread-ping.jsonl spread-pingfloor.jsonl; do : >"$WORK/$f"; done
start_sampler
wait_quiet
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
if part A; then phase_a || log "phase A stopped"; else A_OK=1; fi
if part B; then phase_b || log "phase B stopped"; else B_OK=1; fi
if part C; then phase_c || log "phase C stopped"; else C_OK=1; fi
((A_OK && B_OK && C_OK)) || [ ${#PROBLEMS[@]} -gt 0 ] || problem "a phase stopped early"
mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"
((${#PROBLEMS[@]} == 0)) || { log "FAIL: ${PROBLEMS[*]}"; exit 1; }
exit 0
