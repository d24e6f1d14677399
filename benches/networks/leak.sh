#!/usr/bin/env bash
# benches/networks/leak.sh - user networks (issue 16): "no address is leaked", over many ADD/DEL
# cycles with skipped DELs, periodic GCs and crashed agents, with the real `shoal` and
# `shoal-cni`.
#
# One 3-node lab (`shoal lab up --name NAME --nodes 3`), an encrypted, attachable user network
# made with `shoal network create` on n1 (subnet 198.19.64.0/22, room for 64 address blocks of
# /28). Containers are network namespaces made here with `ip netns add`; `shoal-cni` is called
# as a runtime calls it (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH in the
# environment; the configuration, with "network" and "socket": "/run/shoal/lab-NAME/nI.sock",
# on stdin), and each call is timed by the wall clock around the process.
#
#   1. A long-lived container on every node (ADDed once, never DELeted until the very end): it
#      must survive every GC and every crash of its agent, and keep answering ping from the
#      long-lived container of another node.
#   2. CYCLES cycles, each on a random node: a fresh namespace, ADD with a fresh container ID,
#      then DEL and the namespace deleted; but in SKIP% of the cycles the DEL is skipped (the
#      container died and its runtime never called DEL: only the namespace is deleted). An ADD
#      that fails is followed by a DEL, as the spec asks of runtimes; a DEL that fails is owed
#      and retried later.
#   3. Every GC_EVERY cycles: the owed DELs retried, then GC on every node with
#      `cni.dev/valid-attachments` listing what the runtime still holds there (its long-lived
#      container), and the check: within 10 s every node's `shoal network inspect` lists
#      exactly the long-lived endpoints, its data path forwards to exactly the others' long-
#      lived MACs, its namespace holds exactly one `shv*` veth per long-lived container of its
#      own and one bridge; then each long-lived container pings the next node's.
#   4. KILLS times (spread over the run, never across a GC): `shoal lab stop --kill nX`
#      (SIGKILL), DOWN cycles go on (those landing on nX fail: expected), then `shoal lab start
#      nX` (its agent deletes the attachments whose namespace is gone), and the time until nX's
#      long-lived container answers ping again from another node.
#   5. At the end: owed DELs, GC with only the long-lived listed, the check; a fresh ADD on
#      every node must get the first address that node gave a cycle (its lowest free address
#      above its long-lived container); then GC with an empty list: no endpoint, forwarding
#      entry, veth or bridge may remain anywhere, and a fresh ADD on every node must get the
#      node's very first address (its long-lived container's).
#
# Output: markdown on stdout and in a file (default: the run's scratch directory; --out FILE,
# or --full, which writes benches/networks/results-leak.md).
#
# Addresses: only 198.18.0.0/15 (the lab's underlay 198.18.0.0/24 and ingress 198.19.0.0/24,
# the user network 198.19.64.0/22), only inside namespaces this script (or `shoal lab` for it)
# makes. Nothing in the default namespace is touched. Every wait is bounded; an EXIT trap
# deletes the container namespaces it made and takes its lab down, also on failure or Ctrl-C.
# The agents are started and killed only through `shoal lab` (by the PIDs it recorded).
#
# Exit status: 0 when nothing leaked and every CNI call that should succeed did; 1 when
# something leaked, a call failed that should not have (a failure while the node's agent was
# down is expected and only counted), or something could not run; 2 on a usage error.

set -u -o pipefail
export LC_ALL=C
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROBE="$HERE/probe.py"

usage() {
  cat <<EOF
usage: $0 [--full] [--cycles N] [--gc-every N] [--skip-pct P] [--kills N] [--down N]
          [--seed N] [--out FILE]

  --full           the recorded run: --cycles 10000 --gc-every 1000 --kills 5, report into
                   benches/networks/results-leak.md (10-20 minutes on 2 cores)
  --cycles N       ADD/DEL cycles (default 300: a smoke run of under a minute)
  --gc-every N     cycles between GCs (default 1000, or a third of the cycles when fewer
                   than 3000)
  --skip-pct P     percentage of cycles whose DEL is skipped (default 10)
  --kills N        agents killed with SIGKILL and started again during the run (default 5
                   with --full, else 2); they rotate n2, n3, n1, n2, ...
  --down N         cycles run while a killed agent is down (default 20)
  --seed N         seed of the node and skip choices (default: the PID); printed in the report
  --out FILE       where the report goes (default: the run's scratch directory, or
                   benches/networks/results-leak.md with --full)

Environment: SHOAL_BIN and SHOAL_CNI_BIN = prebuilt binaries (otherwise they are built with
'cargo build --release -p shoal-control -p shoal-cni', honouring CARGO_TARGET_DIR).
EOF
}

FULL=0 CYCLES="" GC_EVERY="" SKIP_PCT=10 KILLS="" DOWN=20 SEED=$$ OUT=""
while (($#)); do
  case $1 in
    --full) FULL=1 ;;
    --cycles) CYCLES=${2:-}; shift ;;
    --gc-every) GC_EVERY=${2:-}; shift ;;
    --skip-pct) SKIP_PCT=${2:-}; shift ;;
    --kills) KILLS=${2:-}; shift ;;
    --down) DOWN=${2:-}; shift ;;
    --seed) SEED=${2:-}; shift ;;
    --out) OUT=${2:-}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "leak.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
  shift
done
if [ "$FULL" = 1 ]; then
  CYCLES=${CYCLES:-10000} KILLS=${KILLS:-5}
else
  CYCLES=${CYCLES:-300} KILLS=${KILLS:-2}
fi
for pair in "cycles:$CYCLES" "gc-every:${GC_EVERY:-0}" "skip-pct:$SKIP_PCT" "kills:$KILLS" "down:$DOWN" "seed:$SEED"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || { echo "leak.sh: --${pair%%:*} needs a whole number, got '${pair#*:}'" >&2; exit 2; }
done
((CYCLES >= 1)) || { echo "leak.sh: --cycles must be at least 1" >&2; exit 2; }
((SKIP_PCT <= 100)) || { echo "leak.sh: --skip-pct is a percentage (0 to 100)" >&2; exit 2; }
if [ -z "$GC_EVERY" ]; then
  if ((CYCLES >= 3000)); then GC_EVERY=1000; else GC_EVERY=$(((CYCLES + 2) / 3)); fi
fi
((GC_EVERY >= 1)) || { echo "leak.sh: --gc-every must be at least 1" >&2; exit 2; }
if [ "$(id -u)" -ne 0 ]; then
  echo "leak.sh: needs root (it creates network namespaces); run it as root or with sudo" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/shoal-networks-leak.XXXXXX)
chmod 700 "$WORK"
if [ -z "$OUT" ]; then
  if [ "$FULL" = 1 ]; then OUT="$HERE/results-leak.md"; else OUT="$WORK/results-leak.md"; fi
fi
ARGS_TEXT="--cycles $CYCLES --gc-every $GC_EVERY --skip-pct $SKIP_PCT --kills $KILLS --down $DOWN --seed $SEED"

ID=$$
PREFIX="nl$ID"        # the lab and every container namespace of this run start with it
LAB="${PREFIX}"
NET=leak
SUBNET=198.19.64.0/22
NODES=3
NS_LIST="$WORK/ns.list"   # container namespaces made by this run (the trap deletes those left)
: >"$NS_LIST"
LAB_UP=0
PROBLEMS=()           # what leaked, failed unexpectedly or could not run (exit 1)
T0=$SECONDS

log() { printf '[networks-leak %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
problem() { PROBLEMS+=("$*"); log "PROBLEM: $*"; }

# ------------------------------------------------------------------------------ process care
ns_exists() { [ -n "$1" ] && [ -e "/run/netns/$1" ]; }
del_container_ns() {   # $1: a container namespace of ours; whatever runs in it we started
  local p
  ns_exists "$1" || return 0
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  ip netns del "$1" 2>/dev/null || log "could not delete namespace $1"
}
lab_down() {
  ((LAB_UP)) || return 0
  timeout 60 "$SHOAL_BIN" lab down --name "$LAB" >>"$WORK/lab.log" 2>&1 || log "lab down $LAB failed (see $WORK/lab.log)"
  LAB_UP=0
}
SAMPLER_PID=""
stop_sampler() {   # TERM, up to 3 s, then KILL: the one background process this script starts
  local p=$SAMPLER_PID
  [ -n "$p" ] || return 0
  SAMPLER_PID=""
  kill -TERM "$p" 2>/dev/null || { wait "$p" 2>/dev/null; return 0; }
  for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null
  return 0
}
cleanup() {
  local ns
  stop_sampler
  while read -r ns; do ns_exists "$ns" && del_container_ns "$ns"; done <"$NS_LIST"
  ((LAB_UP)) && [ "${RUN_OK:-0}" = 0 ] && save_logs at-exit
  lab_down
  log "cleaned up (logs in $WORK)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

for t in ip ping python3 timeout; do
  have "$t" || { echo "leak.sh: $t is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

# ---------------------------------------------------------------------------- the binaries
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
SHOAL_BIN=${SHOAL_BIN:-} CNI_BIN=${SHOAL_CNI_BIN:-}
if [ -z "$SHOAL_BIN" ] || [ -z "$CNI_BIN" ]; then
  have cargo || { echo "leak.sh: no cargo, and SHOAL_BIN / SHOAL_CNI_BIN not set" >&2; exit 1; }
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
  BUILD_NOTE="prebuilt binaries ($SHOAL_BIN, $CNI_BIN; tree at commit $COMMIT)"
fi
SHOAL_BIN=$(realpath "$SHOAL_BIN") CNI_BIN=$(realpath "$CNI_BIN")
[ -x "$SHOAL_BIN" ] && [ -x "$CNI_BIN" ] || { echo "leak.sh: $SHOAL_BIN or $CNI_BIN is not executable" >&2; exit 1; }

# ------------------------------------------------------------------------------- lab helpers
lab_exec() {   # $1 node index, command...
  local i=$1; shift
  timeout 30 "$SHOAL_BIN" lab exec --name "$LAB" "n$i" -- "$@"
}
sock() { echo "/run/shoal/lab-$LAB/n$1.sock"; }
LOG_RUN=0
save_logs() {  # $1 tag: copies the agents' logs (`shoal lab start` truncates a node's log)
  local i
  for i in $(seq 1 "$NODES"); do
    [ -f "/run/shoal/lab-$LAB/n$i.log" ] && cp "/run/shoal/lab-$LAB/n$i.log" "$WORK/agent-n$i.$(printf %02d "$LOG_RUN").$1.log"
  done
  LOG_RUN=$((LOG_RUN + 1))
}
save_log() {   # $1 node, $2 tag: one node's log, before it is restarted
  cp "/run/shoal/lab-$LAB/n$1.log" "$WORK/agent-n$1.$(printf %02d "$LOG_RUN").$2.log" 2>/dev/null
  LOG_RUN=$((LOG_RUN + 1))
}

lab_up() {
  local t=$SECONDS i ok
  log "shoal lab up --name $LAB --nodes $NODES"
  LAB_UP=1
  if ! timeout 180 "$SHOAL_BIN" lab up --name "$LAB" --nodes "$NODES" >"$WORK/lab-up.out" 2>&1; then
    problem "shoal lab up --name $LAB --nodes $NODES failed: $(tail -c 300 "$WORK/lab-up.out" | tr '\n' ' ')"
    return 1
  fi
  log "lab up in $((SECONDS - t)) s"
  if ! lab_exec 1 shoal network create --opt encrypted --attachable --subnet "$SUBNET" "$NET" \
      >"$WORK/create.out" 2>&1; then
    problem "network create failed: $(tr '\n' ' ' <"$WORK/create.out")"
    return 1
  fi
  for i in $(seq 1 "$NODES"); do
    ok=0
    for _ in $(seq 1 100); do
      lab_exec "$i" shoal network ls 2>/dev/null | awk '{print $2}' | grep -qx "$NET" && { ok=1; break; }
      sleep 0.1
    done
    ((ok)) || { problem "n$i does not know network $NET after 10 s"; return 1; }
  done
}

# ------------------------------------------------------------------------------- the plugin
CNI_MS="" CNI_RC="" CNI_OUT=""
cni_call() {   # $1 command, $2 node, $3 container namespace (or ""), $4 container ID, $5 extra config (JSON members, or "")
  local cmd=$1 node=$2 ns=${3:-} cid=${4:-} extra=${5:-} conf t0 t1
  conf="{\"cniVersion\":\"1.1.0\",\"name\":\"$NET\",\"type\":\"shoal-cni\",\"network\":\"$NET\",\"socket\":\"$(sock "$node")\"${extra:+,$extra}}"
  if [ -n "$cid" ]; then
    t0=${EPOCHREALTIME/./}
    CNI_COMMAND=$cmd CNI_CONTAINERID="$cid" CNI_NETNS="/run/netns/$ns" CNI_IFNAME=eth0 \
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
  CNI_OUT=$(<"$WORK/cni.out")
  return "$CNI_RC"
}
RE_ADDR='"address":"([0-9.]+)/' RE_CODE='"code":([0-9]+)' RE_MSG='"msg":"(([^"\\]|\\.)*)"'
cni_ip() {     # the address of the last ADD's result
  [[ $CNI_OUT =~ $RE_ADDR ]] && echo "${BASH_REMATCH[1]}"
}
cni_code() {   # the error code of the last call's answer, or "none" when it printed no error
  if [[ $CNI_OUT =~ $RE_CODE ]]; then echo "${BASH_REMATCH[1]}"; else echo "none"; fi
}
cni_msg() {    # its message (or the start of what it printed)
  if [[ $CNI_OUT =~ $RE_MSG ]]; then echo "${BASH_REMATCH[1]}"; else echo "${CNI_OUT:0:200}"; fi
}
container() {  # $1 name: a fresh container namespace of ours (listed first: an interrupt
  echo "$1" >>"$NS_LIST"   # between the two must not leave it behind)
  ip netns add "$1"
}
stats() { python3 "$PROBE" stats; }   # numbers on stdin -> "p50 p99 max min n"

# failures.txt: one line per failed call: cycle node command code state message
# (state: "down" when the node's agent was killed and not started again, else "up")
DOWN_NODE=0
failed() {     # $1 where (cycle number or a phase name), $2 node, $3 command
  local state=up
  ((DOWN_NODE == $2)) && state=down
  printf '%s n%s %s %s %s %s\n' "$1" "$2" "$3" "$(cni_code)" "$state" "$(cni_msg)" >>"$WORK/failures.txt"
  [ "$state" = up ] && log "$3 failed on n$2 ($1) after $CNI_MS ms: $(cni_code) $(cni_msg)"
  return 0
}

# Owed DELs: "node namespace cid" lines; retried after a restart, before each GC and at the end
# (with the namespace path the container had: it is gone by then, and DEL does not need it).
: >"$WORK/owed.txt"
retry_owed() {   # $1 where
  local node ns cid left=()
  [ -s "$WORK/owed.txt" ] || return 0
  while read -r node ns cid; do
    if cni_call DEL "$node" "$ns" "$cid"; then :; else failed "$1" "$node" DEL-retry; left+=("$node $ns $cid"); fi
  done <"$WORK/owed.txt"
  if ((${#left[@]})); then printf '%s\n' "${left[@]}" >"$WORK/owed.txt"; else : >"$WORK/owed.txt"; fi
}

# --------------------------------------------------------------------------- the long-lived
declare -A LONG_IP LONG_CID FIRST_CYCLE_IP
long_ns() { echo "${PREFIX}-long$1"; }
long_up() {
  local n ns
  for n in $(seq 1 "$NODES"); do
    ns=$(long_ns "$n") LONG_CID[$n]="${PREFIX}long$n"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    ip -n "$ns" link set lo up
    cni_call ADD "$n" "$ns" "${LONG_CID[$n]}" || { problem "ADD of the long-lived container on n$n failed: $(cni_msg)"; return 1; }
    # ARP retried every 10 ms instead of every second: the ping times are shoal's
    ip netns exec "$ns" sysctl -qw net.ipv4.neigh.eth0.retrans_time_ms=10
    LONG_IP[$n]=$(cni_ip)
    echo "n$n ${LONG_IP[$n]}" >>"$WORK/addresses-first.txt"
    log "long-lived container on n$n: ${LONG_IP[$n]} (ADD $CNI_MS ms)"
  done
}
valid_of() {   # $1 node: the valid-attachments member for its GC (its long-lived container)
  echo "\"cni.dev/valid-attachments\":[{\"containerID\":\"${LONG_CID[$1]}\",\"ifname\":\"eth0\"}]"
}
ping_long() {  # $1 from node, $2 to node, $3 seconds: the first reply within, or fail; PING_MS
  # (one echo request at a time, each given 100 ms; the pinger retries ARP every 10 ms)
  local from to t0 deadline
  from=$(long_ns "$1") to=${LONG_IP[$2]}
  t0=${EPOCHREALTIME/./} deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    if timeout 3 ip netns exec "$from" ping -n -q -c 1 -W 0.1 "$to" >/dev/null 2>&1; then
      PING_MS=$(((${EPOCHREALTIME/./} - t0) / 1000))
      return 0
    fi
    sleep 0.01
  done
  PING_MS=-
  return 1
}
ping_ring() {  # $1 where: every long-lived container pings the next node's
  local n m bad=()
  for n in $(seq 1 "$NODES"); do
    m=$((n % NODES + 1))
    ping_long "$n" "$m" 10 || bad+=("n$n->n$m")
  done
  if ((${#bad[@]})); then
    problem "$1: the long-lived containers did not answer ping within 10 s: ${bad[*]}"
    echo "$1 FAIL ${bad[*]}" >>"$WORK/pings.txt"
  else
    echo "$1 ok" >>"$WORK/pings.txt"
  fi
}

# ------------------------------------------------------------------------------ the checks
view_of() {    # $1 node: "OWN ALL FWD DEVICE" of its `network inspect` (addresses sorted, "-" for none)
  lab_exec "$1" shoal network inspect "$NET" 2>/dev/null | python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)[0]
except Exception:
    print("? ? ? ?"); sys.exit()
eps = d.get("endpoints") or []
own = sorted(e["ip"].split("/")[0] for e in eps if e.get("container_id"))
al = sorted(e["ip"].split("/")[0] for e in eps)
dp = d.get("data_path") or {}
print(",".join(own) or "-", ",".join(al) or "-", len(dp.get("forwarding") or []), dp.get("device") or "-")'
}
links_of() {   # $1 node: "VETHS BRIDGES" (shv* veths, shb* bridges in its namespace)
  local v b
  v=$(ip -n "$LAB-n$1" -o link show type veth 2>/dev/null | grep -c ': shv')
  b=$(ip -n "$LAB-n$1" -o link show type bridge 2>/dev/null | grep -c ': shb')
  echo "$v $b"
}
joined() { printf '%s\n' "$@" | grep -v '^$' | sort | paste -sd, | sed 's/^$/-/'; }
CHECK_MS=""
check_state() {   # $1 where, $2 "long" (only the long-lived may remain) or "none": bounded, 10 s
  local where=$1 want=$2 n t0 deadline got links all own fwd dev ok detail g_own g_all g_fwd g_dev polls=0 first=""
  if [ "$want" = long ]; then all=$(joined "${LONG_IP[@]}"); else all=-; fi
  t0=${EPOCHREALTIME/./} deadline=$((SECONDS + 10))
  while :; do
    polls=$((polls + 1))
    ok=1 detail=()
    for n in $(seq 1 "$NODES"); do
      if [ "$want" = long ]; then own=${LONG_IP[$n]} fwd=$((NODES - 1)) dev=shn; links="1 1"
      else own=- fwd=0 dev=- links="0 0"; fi
      read -r g_own g_all g_fwd g_dev <<<"$(view_of "$n")"
      got=$(links_of "$n")
      if [ "$g_own" != "$own" ] || [ "$g_all" != "$all" ] || [ "$g_fwd" != "$fwd" ] \
        || [[ $g_dev != "$dev"* ]] || [ "$got" != "$links" ]; then
        ok=0
        detail+=("n$n: own [$g_own] (want [$own]), all [$g_all] (want [$all]), forwarding $g_fwd (want $fwd), device $g_dev, shv/shb $got (want $links)")
      fi
    done
    ((ok)) && break
    # what the first poll saw, for the report: what took time to converge
    [ -n "$first" ] || first="${detail[*]}"
    ((SECONDS < deadline)) || break
    sleep 0.2
  done
  CHECK_MS=$(((${EPOCHREALTIME/./} - t0) / 1000))
  [ -z "$first" ] || echo "$where (after $polls polls, $CHECK_MS ms) first poll: $first" >>"$WORK/checks-slow.txt"
  if ((ok)); then
    echo "$where ok $CHECK_MS" >>"$WORK/checks.txt"
    return 0
  fi
  echo "$where LEAK ${detail[*]}" >>"$WORK/checks.txt"
  problem "$where: not clean after 10 s: ${detail[*]}"
  for n in $(seq 1 "$NODES"); do
    { echo "== n$n $where"; lab_exec "$n" shoal network inspect "$NET"; ip -n "$LAB-n$n" -o link show; } >>"$WORK/leak-detail.txt" 2>&1
  done
  return 1
}

GC_N=0
gc_all() {     # $1 where, $2 "long" (valid = the node's long-lived container) or "none" (empty list)
  local n extra
  retry_owed "$1"
  GC_N=$((GC_N + 1))
  for n in $(seq 1 "$NODES"); do
    if [ "$2" = long ]; then extra=$(valid_of "$n"); else extra='"cni.dev/valid-attachments":[]'; fi
    if cni_call GC "$n" "" "" "$extra"; then echo "$1 n$n $CNI_MS" >>"$WORK/gc.txt"; else failed "$1" "$n" GC; fi
  done
}

# ----------------------------------------------------------------------------- the crashes
declare -a KILL_AT KILL_NODE
plan_kills() {  # spread over the run, each DOWN cycles long, never across a GC or the end
  local k seg at
  ((KILLS > 0)) || return 0
  seg=$((CYCLES / KILLS))
  for k in $(seq 1 "$KILLS"); do
    at=$(((k - 1) * seg + seg / 3 + 1))
    # the down window (at .. at + DOWN) must not hold a GC
    (((at - 1) / GC_EVERY != (at + DOWN) / GC_EVERY)) && at=$(((at + DOWN) / GC_EVERY * GC_EVERY + 1))
    ((at + DOWN < CYCLES)) || continue
    KILL_AT+=("$at") KILL_NODE+=("$((k % NODES + 1))")
  done
}
RESTART_UNTIL=0
kill_node() {   # $1 node
  log "shoal lab stop --kill n$1"
  timeout 30 "$SHOAL_BIN" lab stop --name "$LAB" --kill "n$1" >>"$WORK/lab.log" 2>&1 \
    || problem "lab stop --kill n$1 failed (see $WORK/lab.log)"
  DOWN_NODE=$1
}
start_node() {  # $1 node, $2 cycle
  local t0 started
  save_log "$1" "killed-at-$2"
  t0=${EPOCHREALTIME/./}
  if ! timeout 60 "$SHOAL_BIN" lab start --name "$LAB" "n$1" >>"$WORK/lab.log" 2>&1; then
    problem "lab start n$1 failed (see $WORK/lab.log)"
    DOWN_NODE=0
    return 1
  fi
  started=$(((${EPOCHREALTIME/./} - t0) / 1000))
  DOWN_NODE=0
  # its long-lived container, from the next node's
  if ping_long "$(($1 % NODES + 1))" "$1" 30; then
    log "n$1 started (socket after $started ms); its long-lived container answers after $PING_MS ms more"
  else
    problem "after the restart of n$1, its long-lived container did not answer ping within 30 s"
  fi
  echo "cycle $2 n$1 socket_ms $started ping_ms $PING_MS" >>"$WORK/restarts.txt"
}

# ---------------------------------------------------------------------------------- the run
# cycles.txt: cycle node add_ms del_ms ip (del_ms "skip" when the DEL was skipped)
LEAK_OK=1 RUN_OK=0
run() {
  local i k node ns cid ip skip add
  lab_up || return 1
  long_up || return 1
  ping_ring start
  plan_kills
  log "kills planned at cycles ${KILL_AT[*]:-none} on nodes ${KILL_NODE[*]:-none} (each $DOWN cycles down)"
  RANDOM=$SEED
  k=0
  period_mark 0
  for i in $(seq 1 "$CYCLES"); do
    if ((k < ${#KILL_AT[@]})) && ((i == KILL_AT[k])); then kill_node "${KILL_NODE[k]}"; fi
    if ((DOWN_NODE)) && ((i == KILL_AT[k] + DOWN)); then
      start_node "$DOWN_NODE" "$i"
      retry_owed "restart-$i"
      k=$((k + 1))
    fi
    node=$((RANDOM % NODES + 1))
    skip=$((RANDOM % 100 < SKIP_PCT))
    ns="${PREFIX}-c$i" cid="${PREFIX}c$i"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    if cni_call ADD "$node" "$ns" "$cid"; then
      add=$CNI_MS ip=$(cni_ip)
      [ -n "${FIRST_CYCLE_IP[$node]:-}" ] || FIRST_CYCLE_IP[$node]=$ip
      if ((skip)); then
        echo "$i $node $add skip $ip" >>"$WORK/cycles.txt"
      elif cni_call DEL "$node" "$ns" "$cid"; then
        echo "$i $node $add $CNI_MS $ip" >>"$WORK/cycles.txt"
      else
        failed "$i" "$node" DEL
        echo "$node $ns $cid" >>"$WORK/owed.txt"
        echo "$i $node $add fail $ip" >>"$WORK/cycles.txt"
      fi
    else
      failed "$i" "$node" ADD
      echo "$i $node fail - -" >>"$WORK/cycles.txt"
      # as the spec asks of a runtime after a failed ADD
      cni_call DEL "$node" "$ns" "$cid" || { failed "$i" "$node" DEL-after-failed-ADD; echo "$node $ns $cid" >>"$WORK/owed.txt"; }
    fi
    del_container_ns "$ns"
    if ((i % GC_EVERY == 0)); then
      period_mark "$i"
      gc_all "gc-$i" long
      check_state "gc-$i" long || LEAK_OK=0
      log "cycle $i: GC, check $( ((LEAK_OK)) && echo clean || echo NOT clean) after $CHECK_MS ms; ADD $(awk '$3 != "fail" {print $3}' "$WORK/cycles.txt" | stats) (p50 p99 max min n, ms)"
      ping_ring "gc-$i"
    elif ((i % 500 == 0)); then
      log "cycle $i"
    fi
  done
  if ((DOWN_NODE)); then start_node "$DOWN_NODE" end; fi
  # the end
  gc_all final long
  check_state final-gc long || LEAK_OK=0
  ping_ring final
  local n again
  for n in $(seq 1 "$NODES"); do
    ns="${PREFIX}-again$n" cid="${PREFIX}again$n"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    if cni_call ADD "$n" "$ns" "$cid"; then
      again=$(cni_ip)
      echo "n$n first-cycle ${FIRST_CYCLE_IP[$n]:--} again $again" >>"$WORK/again.txt"
      [ "$again" = "${FIRST_CYCLE_IP[$n]:-}" ] || { problem "n$n: a fresh ADD got $again, its first cycle got ${FIRST_CYCLE_IP[$n]:-none}"; LEAK_OK=0; }
      cni_call DEL "$n" "$ns" "$cid" || { failed final "$n" DEL; problem "the DEL of the fresh ADD on n$n failed"; }
    else
      failed final "$n" ADD
      problem "the fresh ADD on n$n at the end failed: $(cni_msg)"
    fi
    del_container_ns "$ns"
  done
  gc_all empty none
  check_state empty-gc none || LEAK_OK=0
  for n in $(seq 1 "$NODES"); do
    ns="${PREFIX}-first$n" cid="${PREFIX}first$n"
    container "$ns" || { problem "ip netns add $ns failed"; return 1; }
    if cni_call ADD "$n" "$ns" "$cid"; then
      again=$(cni_ip)
      echo "n$n long-lived ${LONG_IP[$n]} again $again" >>"$WORK/again.txt"
      [ "$again" = "${LONG_IP[$n]}" ] || { problem "n$n: after the empty GC a fresh ADD got $again, its very first address was ${LONG_IP[$n]}"; LEAK_OK=0; }
      cni_call DEL "$n" "$ns" "$cid" || { failed final "$n" DEL; problem "the DEL of the fresh ADD on n$n failed"; }
    else
      failed final "$n" ADD
      problem "the fresh ADD on n$n after the empty GC failed: $(cni_msg)"
    fi
    del_container_ns "$ns"
  done
  check_state end none || LEAK_OK=0
  for n in $(seq 1 "$NODES"); do del_container_ns "$(long_ns "$n")"; done
  for n in $(seq 1 "$NODES"); do
    echo "n$n $(du -sk "/run/shoal/lab-$LAB/n$n" 2>/dev/null | cut -f1)" >>"$WORK/state-kb.txt"
    lab_exec "$n" shoal info 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["node_id"])' >"$WORK/node-id-n$n" 2>/dev/null
  done
  RUN_OK=1
}

# -------------------------------------------------------------------------------- report
row() {  # $1 label, then "p50 p99 max min n" -> a table row
  local label=$1; shift
  read -r p50 p99 max min n <<<"$*"
  echo "| $label | $p50 | $p99 | $max | $min | $n |"
}
blocks_of() {  # $1 node: "blocks highest" from every address it handed out (/28 blocks)
  { echo "${LONG_IP[$1]:-}"; awk -v n="$1" '$2 == n && $5 != "-" {print $5}' "$WORK/cycles.txt"; } | python3 -c '
import ipaddress, sys
ips = [ipaddress.ip_address(l.strip()) for l in sys.stdin if l.strip()]
if not ips:
    print("- -"); sys.exit()
print(len({int(i) >> 4 for i in ips}), max(ips))'
}
granted_of() { # $1 node: "address block granted" lines naming it in the manager's (n1's) logs
  local id
  id=$(cat "$WORK/node-id-n$1" 2>/dev/null)
  [ -n "$id" ] || { echo "?"; return; }
  cat "$WORK"/agent-n1.*.log 2>/dev/null | grep 'address block granted' | grep -c "$id"
}

report() {
  local cores model n adds dels skips fails
  cores=$(nproc)
  model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
  adds=$(awk '$3 != "fail"' "$WORK/cycles.txt" | wc -l)
  skips=$(awk '$4 == "skip"' "$WORK/cycles.txt" | wc -l)
  dels=$(awk '$4 ~ /^[0-9.]+$/' "$WORK/cycles.txt" | wc -l)
  fails=$(wc -l <"$WORK/failures.txt")
  echo "# shoal user networks: no address leaked ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Machine: $(uname -sr), $cores cores ($model), shared with other work; the lab's three"
  echo "agents, the plugin and \`ip\` share these cores. shoal: $BUILD_NOTE. Lab state under /run"
  echo "(tmpfs). Other work on the machine during the run: $LOAD_NOTE; load average at start"
  echo "$LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "Reproduce (as root, from the repository root):"
  echo
  echo '```sh'
  echo "benches/networks/leak.sh $ARGS_TEXT$([ "$FULL" = 1 ] && echo ' --full')"
  echo '```'
  echo
  echo "## Verdict"
  echo
  if ((RUN_OK && LEAK_OK)); then
    echo "**No address leaked**: after $CYCLES cycles ($skips DELs skipped, $GC_N GC rounds, ${#KILL_AT[@]} agents"
    echo "killed), every check found only the long-lived endpoints, and every node gave its first"
    echo "addresses again."
  elif ((RUN_OK)); then
    echo "**Something leaked**: see the checks below."
  else
    echo "**The run did not complete**: see the failures below."
  fi
  echo
  echo "## What ran"
  echo
  echo "A 3-node lab, network \`$NET\` ($SUBNET, encrypted, attachable; /28 blocks per node). A"
  echo "long-lived container on every node (${LONG_IP[1]:-?} on n1, ${LONG_IP[2]:-?} on n2, ${LONG_IP[3]:-?} on n3). $CYCLES cycles on"
  echo "random nodes (seed $SEED): a fresh namespace and container ID, ADD, then DEL and the"
  echo "namespace deleted, or in ${SKIP_PCT}% of them (here $skips) only the namespace deleted. GC on every"
  echo "node every $GC_EVERY cycles with its long-lived container as the only valid attachment. Agents"
  echo "killed (SIGKILL, \`shoal lab stop --kill\`) and started again $DOWN cycles later:"
  if [ -s "$WORK/restarts.txt" ]; then
    echo
    echo "| killed at cycle | node | started at cycle | \`lab start\` until the socket is back (ms) | then until its long-lived container answers ping from another node (ms) |"
    echo "|---|---|---|---|---|"
    local idx=0 c nd sm pm
    while read -r _ c nd _ sm _ pm; do
      echo "| ${KILL_AT[idx]:-?} | $nd | $c | $sm | $pm |"
      idx=$((idx + 1))
    done <"$WORK/restarts.txt"
  else
    echo "none."
  fi
  echo
  echo "## Checks"
  echo
  echo "Each: within 10 s, every node's \`network inspect\` lists exactly the expected endpoints (its"
  echo "own and the others'), its data path forwards to exactly the other nodes' expected MACs, and"
  echo "its namespace holds exactly the expected \`shv*\` veths and \`shb*\` bridge."
  echo
  echo "| after | expected | result | converged after (ms) |"
  echo "|---|---|---|---|"
  local where res ms rest
  while read -r where res ms rest; do
    case $where in
      empty-gc | end) echo "| $where | nothing | $res | $([ "$res" = ok ] && echo "$ms" || echo "- ($ms $rest)") |" ;;
      *) echo "| $where | the 3 long-lived | $res | $([ "$res" = ok ] && echo "$ms" || echo "- ($ms $rest)") |" ;;
    esac
  done <"$WORK/checks.txt"
  if [ -s "$WORK/checks-slow.txt" ]; then
    echo
    echo "What the checks that did not pass at their first poll saw then (each poll asks the three"
    echo "agents and lists the links, ~100-300 ms):"
    echo
    sed 's/^/- /' "$WORK/checks-slow.txt"
  fi
  echo
  echo "Pings between the long-lived containers (each pings the next node's): $(awk '{print $2}' "$WORK/pings.txt" | sort | uniq -c | awk '{printf "%s%s x %s", (NR > 1 ? ", " : ""), $1, $2}') (of $(wc -l <"$WORK/pings.txt") rounds)."
  echo
  echo "Fresh ADDs at the end:"
  echo
  sed 's/^/- /' "$WORK/again.txt"
  echo
  echo "(\`first-cycle\`: the first address the node gave a cycle, its lowest free address with its"
  echo "long-lived container attached; \`long-lived\`: its very first address, given again after the"
  echo "GC with an empty list.)"
  echo
  echo "## Addresses and blocks"
  echo
  echo "| node | /28 blocks it handed addresses from | highest address handed out | blocks granted in the manager's log | state directory at the end (KiB) |"
  echo "|---|---|---|---|---|"
  for n in $(seq 1 "$NODES"); do
    read -r b h <<<"$(blocks_of "$n")"
    echo "| n$n | $b | $h | $(granted_of "$n") | $(awk -v n="n$n" '$1 == n {print $2}' "$WORK/state-kb.txt" 2>/dev/null) |"
  done
  echo
  echo "A node asks for a block only when its blocks are full, and allocates the lowest free"
  echo "address, so the blocks it handed out addresses from are the blocks it holds; what it"
  echo "needs at once is its long-lived container plus the skipped DELs since the last GC or"
  echo "restart (about $((GC_EVERY * SKIP_PCT / 100 / NODES)) per node per GC period at ${SKIP_PCT}%)."
  echo
  echo "## Latency"
  echo
  echo "Each \`shoal-cni\` call timed by the wall clock around the process. Times in ms, percentiles"
  echo "nearest-rank."
  echo
  echo "| call | p50 | p99 | max | min | n |"
  echo "|---|---|---|---|---|---|"
  row "ADD (all cycles)" "$(awk '$3 != "fail" {print $3}' "$WORK/cycles.txt" | stats)"
  row "DEL (all cycles that called it)" "$(awk '$4 ~ /^[0-9.]+$/ {print $4}' "$WORK/cycles.txt" | stats)"
  for n in $(seq 1 "$NODES"); do
    row "ADD on n$n$([ "$n" = 1 ] && echo ' (the manager)')" "$(awk -v n="$n" '$2 == n && $3 != "fail" {print $3}' "$WORK/cycles.txt" | stats)"
  done
  row "GC on one node (its stale attachments deleted)" "$(awk '{print $3}' "$WORK/gc.txt" | stats)"
  echo
  if [ "$(wc -l <"$WORK/periods.txt")" -gt 2 ]; then
    echo "By period between GCs, with the CPU other processes on the machine took meanwhile (the"
    echo "agents, the plugin and \`ip\` wait for the cores behind them):"
    echo
    echo "| cycles | ADD p50 | ADD p99 | DEL p50 | DEL p99 | other work (% of $(nproc) cores) |"
    echo "|---|---|---|---|---|---|"
    local c0 s0 f0 c1 s1 f1 a d
    while read -r c0 s0 f0 c1 s1 f1; do
      a=$(awk -v a="$c0" -v b="$c1" '$1 > a && $1 <= b && $3 != "fail" {print $3}' "$WORK/cycles.txt" | stats)
      d=$(awk -v a="$c0" -v b="$c1" '$1 > a && $1 <= b && $4 ~ /^[0-9.]+$/ {print $4}' "$WORK/cycles.txt" | stats)
      echo "| $((c0 + 1))-$c1 | $(cut -d' ' -f1 <<<"$a") | $(cut -d' ' -f2 <<<"$a") | $(cut -d' ' -f1 <<<"$d") | $(cut -d' ' -f2 <<<"$d") | $(awk -v f="$((s1 - s0))" -v c="$f0" -v e="$f1" -v n="$(nproc)" 'BEGIN {printf "%.0f", (f > 0 ? 100 * (e - c) / (f * n) : 0)}') |"
    done < <(paste -d' ' <(head -n -1 "$WORK/periods.txt") <(tail -n +2 "$WORK/periods.txt"))
    echo
  fi
  echo "Calls: $adds ADDs and $dels DELs succeeded in the cycles, $skips DELs skipped. Total time:"
  echo "$((SECONDS - T0)) s (lab set-up and the checks included)."
  echo
  echo "## Failed calls"
  echo
  if [ -s "$WORK/failures.txt" ]; then
    echo "$fails in all, by CNI error code and whether the node's agent was down (killed, not yet"
    echo "started again: expected) or up:"
    echo
    echo "| command | code | agent | count | first message |"
    echo "|---|---|---|---|---|"
    awk '{k = $3 " | " $4 " | " $5; c[k]++; if (!(k in m)) {s = ""; for (i = 6; i <= NF; i++) s = s (i > 6 ? " " : "") $i; m[k] = s}} END {for (k in c) print "| " k " | " c[k] " | " m[k] " |"}' \
      "$WORK/failures.txt" | sort
    if awk '$5 == "up"' "$WORK/failures.txt" | grep -q .; then
      echo
      echo "Failures with the agent up (each one a shoal failure):"
      echo
      awk '$5 == "up"' "$WORK/failures.txt" | head -20 | sed 's/^/- /'
    fi
  else
    echo "None."
  fi
  echo
  local drops
  drops=$(cat "$WORK"/agent-n*.log 2>/dev/null | grep 'data path dropped' | sed -E 's/.*reasons=//' | tr ' ' '\n' \
    | awk -F= 'NF == 2 {c[$1] += $2} END {for (k in c) printf "%s%s %d", (n++ ? ", " : ""), k, c[k]}')
  echo "Data path drops over the run (the agents' 10 s summaries, all nodes, all runs of each agent):"
  echo "${drops:-none}."
  echo
  local warns
  warns=$(cat "$WORK"/agent-n*.log 2>/dev/null | grep -E '\bWARN\b' | sed -E 's/^.*WARN //; s/[0-9a-f]{12,}/X/g; s/[0-9]+(\.[0-9]+){3}/IP/g' | sort | uniq -c | sort -rn | head -8)
  if [ -n "$warns" ]; then
    echo "Agent warnings (all nodes, all runs of each agent; counts):"
    echo
    echo '```'
    echo "$warns"
    echo '```'
    echo
  fi
  if ((${#PROBLEMS[@]})); then
    echo "## Problems (the run exits 1)"
    echo
    printf -- '- %s\n' "${PROBLEMS[@]}" | head -40
    echo
  fi
  echo "Logs and raw data: $WORK (cycles.txt: cycle node add_ms del_ms address; failures.txt; checks.txt;"
  echo "gc.txt; restarts.txt; agent-n*.log, each agent's log per run)."
}

# ------------------------------------------------------------------------- load on the machine
# probe.py's sampler: once a second, the CPU time of processes that are not ours (not in our
# process group, not in our namespaces): other work on a shared machine.
start_sampler() {
  python3 "$PROBE" sampler --work "$WORK" --prefix "$PREFIX" \
    --pgid "$(ps -o pgid= -p $$ | tr -d ' ')" >"$WORK/sampler.log" 2>&1 &
  SAMPLER_PID=$!
  sleep 2
  cat "$WORK/foreign.now" >"$WORK/foreign.start" 2>/dev/null || echo "TOTAL 0" >"$WORK/foreign.start"
  SAMPLER_T0=$SECONDS
}
LOAD_NOTE="not measured"
# periods.txt: cycle seconds foreign-cpu-seconds, at the start and at each GC (before it)
period_mark() {
  echo "$1 $SECONDS $(awk '$1 == "TOTAL" {print $2}' "$WORK/foreign.now" 2>/dev/null || echo 0)" >>"$WORK/periods.txt"
}
end_sampler() {
  cat "$WORK/foreign.now" >"$WORK/foreign.end" 2>/dev/null || echo "TOTAL 0" >"$WORK/foreign.end"
  LOAD_NOTE=$(python3 "$PROBE" foreign-note "$WORK/foreign.start" "$WORK/foreign.end" $((SECONDS - SAMPLER_T0 > 0 ? SECONDS - SAMPLER_T0 : 1)))
  stop_sampler
}

# ---------------------------------------------------------------------------------- main
for f in cycles.txt failures.txt checks.txt checks-slow.txt periods.txt gc.txt pings.txt restarts.txt again.txt addresses-first.txt state-kb.txt; do
  : >"$WORK/$f"
done
log "seed $SEED, $CYCLES cycles, GC every $GC_EVERY, ${SKIP_PCT}% DELs skipped, $KILLS kills; scratch $WORK"
start_sampler
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
run || log "the run stopped early"
end_sampler
save_logs end
((RUN_OK)) || [ ${#PROBLEMS[@]} -gt 0 ] || problem "the run stopped early"
mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"
((${#PROBLEMS[@]} == 0 && LEAK_OK && RUN_OK)) || { log "FAIL: ${#PROBLEMS[@]} problem(s)"; exit 1; }
exit 0
