#!/usr/bin/env bash
# benches/mesh/run.sh - published-port service load balancing across a 3-node lab (issue 17):
# the baselines a user would pick instead of shoal's routing mesh, and a slot for shoal's row.
#
# The lab has the layout `shoal lab up --name LAB --nodes 3` makes, so that shoal's row can run
# the real lab in the same places (control/src/lab.rs):
#
#   LAB-sw       switch namespace, bridge br0 (ports p1..p3, pclient)
#   LAB-n1..n3   the nodes, eth0 198.18.0.1..3/24 (NODE_NS, NODE_ADDR)
#   LAB-client   outside the cluster on the same underlay, eth0 198.18.0.100/24 (CLIENT_NS)
#   LAB-b1       backend 1, on n2, eth0 198.19.64.2/24 (BACKEND_NS[1], BACKEND_ADDR[1])
#   LAB-b2       backend 2, on n3, eth0 198.19.64.3/24 (BACKEND_NS[2], BACKEND_ADDR[2])
#
# Baselines put the backends on an overlay between the nodes: kernel VXLAN (VNI 4097, UDP 4789,
# head-end replication to the other two nodes) on a bridge `brm` in each node, which holds the
# node's own overlay address 198.19.64.241..243. Two published ports on every node's underlay
# address: PUB_TPUT 5201 (iperf3, one backend: b1 on n2, so every byte crosses the overlay;
# iperf3's control and data connections must reach the same server, which a per-connection
# balancer does not promise) and PUB_CPS 8080 (the accept-and-close server of mesh.py, both
# backends). The client measures through n1 (ENTRY 198.18.0.1):
#   - TCP throughput: iperf3 -c, one stream, DUR s, median of REPS runs (receiver Gbit/s);
#   - new connections per second: CONNS short connections (connect, read one line, close) in
#     CPS_PAR processes; each reply names the backend and the peer address it saw, so the run
#     tells whether both backends got connections and whether the client's address survived.
#
# Rows (each one function that sets up a fresh lab, measures and tears it down):
#   nft         nftables DNAT (numgen inc mod 2) + masquerade over kernel VXLAN (kube-proxy's
#               nftables mode)                                         row_nft
#   haproxy     HAProxy, TCP mode, roundrobin, on every node, over kernel VXLAN   row_haproxy
#   haproxy-wg  the same over VXLAN over wireguard-go between the nodes (encrypted) row_haproxy_wg
#   nft-wg      nftables DNAT over VXLAN over wireguard-go (encrypted)  row_nft_wg
#   shoal       shoal's routing mesh on a plain user network                 row_shoal
#   shoal-enc   the same on an encrypted user network                        row_shoal_enc
#
# Output: markdown on stdout and, in full mode, in benches/mesh/results-latest.md (in --quick
# mode a file in the run's scratch directory, so CI leaves the checkout untouched).
#
# Addresses: only 198.18.0.0/15, only inside namespaces this script makes (all named
# mb<PID>r<N>-...). Nothing in the default namespace is touched. Every wait is bounded; an EXIT
# trap stops the processes it started (by PID) and deletes every namespace it made, also on
# failure or Ctrl-C.
#
# Exit status: 0 when every row that was set up moved traffic; 1 when a row could not (or no
# row could be measured); 2 on a usage error.

# shellcheck disable=SC2317  # functions are called indirectly (row_$id, traps)
set -u -o pipefail
export LC_ALL=C
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MESH_PY="$HERE/mesh.py"
PROBE="$REPO/benches/networks/probe.py"   # its sampler of other work on the machine

usage() {
  cat <<EOF
usage: $0 [--quick] [--reps N] [--dur SECONDS] [--conns N] [--cps-par N] [--rows LIST]
          [--out FILE] [--skip-install] [--quiet-wait SECONDS]

  --quick          CI's short mode (< 2 minutes): 1 iperf3 run of 2 s, 300 connections,
                   report into a scratch file
  --reps N         iperf3 runs per row, median reported (default 3; quick 1)
  --dur SECONDS    seconds per iperf3 run (default 5; quick 2)
  --conns N        short connections per conn/s run, REPS runs per row, median reported
                   (default 5000; quick 300)
  --cps-par N      client processes making them (default 4)
  --rows LIST      comma-separated subset of: $ALL_ROWS
  --out FILE       where the report goes (default benches/mesh/results-latest.md; quick: scratch)
  --skip-install   install nothing (rows whose tools are missing are skipped)
  --quiet-wait S   wait up to S seconds for other work on the machine to calm down before
                   measuring (default 60; quick 0)
EOF
}

ALL_ROWS="nft,haproxy,haproxy-wg,nft-wg,shoal,shoal-enc"
QUICK=0 REPS="" DUR="" CONNS="" CPS_PAR=4 ROWS_ARG=$ALL_ROWS OUT="" SKIP_INSTALL=0 QUIET_WAIT=""
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --reps) REPS=${2:-}; shift ;;
    --dur) DUR=${2:-}; shift ;;
    --conns) CONNS=${2:-}; shift ;;
    --cps-par) CPS_PAR=${2:-}; shift ;;
    --rows) ROWS_ARG=${2:-}; shift ;;
    --out) OUT=${2:-}; shift ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --quiet-wait) QUIET_WAIT=${2:-}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'; see --help" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  REPS=${REPS:-1} DUR=${DUR:-2} CONNS=${CONNS:-300} QUIET_WAIT=${QUIET_WAIT:-0}
else
  REPS=${REPS:-3} DUR=${DUR:-5} CONNS=${CONNS:-5000} QUIET_WAIT=${QUIET_WAIT:-60}
fi
[[ $QUIET_WAIT =~ ^[0-9]+$ ]] || { echo "run.sh: --quiet-wait needs a whole number, got '$QUIET_WAIT'" >&2; exit 2; }
for pair in "reps:$REPS" "dur:$DUR" "conns:$CONNS" "cps-par:$CPS_PAR"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] && ((${pair#*:} >= 1)) \
    || { echo "run.sh: --${pair%%:*} needs a whole number >= 1, got '${pair#*:}'" >&2; exit 2; }
done
IFS=',' read -r -a ROWS <<<"$ROWS_ARG"
for r in "${ROWS[@]}"; do
  [[ ",$ALL_ROWS," == *",$r,"* ]] || { echo "run.sh: unknown row '$r'; rows are $ALL_ROWS" >&2; exit 2; }
done
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: needs root (it creates network namespaces); run it as root or with sudo" >&2
  exit 1
fi

WORK=$(mktemp -d /tmp/shoal-mesh-bench.XXXXXX)
chmod 700 "$WORK"
if [ -z "$OUT" ]; then
  if [ "$QUICK" = 1 ]; then OUT="$WORK/results-quick.md"; else OUT="$HERE/results-latest.md"; fi
fi
ARGS_TEXT="$([ "$QUICK" = 1 ] && echo '--quick ')--reps $REPS --dur $DUR --conns $CONNS --cps-par $CPS_PAR --rows $ROWS_ARG --quiet-wait $QUIET_WAIT"

# ----------------------------------------------------------------- the lab's names and addresses
# The contract every row (shoal's included) uses. lab_names sets LAB and the namespace names for
# a fresh lab; everything else is fixed.
ID=$$
LAB_N=0
LAB="" SW_NS="" CLIENT_NS=""
declare -a NODE_NS BACKEND_NS
NODES=3
NODE_ADDR=([1]=198.18.0.1 [2]=198.18.0.2 [3]=198.18.0.3)   # eth0, /24 (shoal lab's underlay)
CLIENT_ADDR=198.18.0.100                                    # eth0, /24, port pclient on br0
ENTRY=${NODE_ADDR[1]}                # the client measures through n1's published ports
MESH_SUBNET=198.19.64.0/24           # the overlay network the backends are on
BACKEND_ADDR=([1]=198.19.64.2 [2]=198.19.64.3)
BACKEND_NODE=([1]=2 [2]=3)           # b1 on n2, b2 on n3: neither on the entry node
NODE_OVL_ADDR=([1]=198.19.64.241 [2]=198.19.64.242 [3]=198.19.64.243)  # baselines: node on brm
PUB_TPUT=5201                        # published = target port; backend b1 only
PUB_CPS=8080                         # published = target port; backends b1 and b2
VNI=4097
WG_BASE=198.19.1                     # wireguard-go rows: node i is $WG_BASE.i/24

lab_names() {   # a fresh lab name and its namespaces (shoal lab's scheme: NAME-sw, NAME-nI)
  LAB_N=$((LAB_N + 1))
  LAB="mb${ID}r$LAB_N"
  SW_NS="$LAB-sw" CLIENT_NS="$LAB-client"
  local i
  for i in $(seq 1 $NODES); do NODE_NS[i]="$LAB-n$i"; done
  BACKEND_NS=([1]="$LAB-b1" [2]="$LAB-b2")
}
wg_if() { echo "mw${ID}r${LAB_N}n$1"; }   # userspace WireGuard: UAPI sockets are host-wide

PIDS=()        # processes of the current row (stopped by PID at its end and by the trap)
SHOAL_LABS=()  # `shoal lab` labs up (the trap takes them down)
T0=$SECONDS

log() { printf '[mesh-bench %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

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
NS_LIST="$WORK/ns.list"   # every namespace this run made, in order
: >"$NS_LIST"
mkns() {       # $1 name: a fresh namespace of ours, lo up
  ip netns add "$1" || return 1
  echo "$1" >>"$NS_LIST"
  ip -n "$1" link set lo up
}
lab_down() {   # everything of the current row: its processes, its namespaces
  local p ns l
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  PIDS=()
  for l in "${SHOAL_LABS[@]}"; do
    timeout 60 "$SHOAL_BIN" lab down --name "$l" >>"$WORK/shoal-lab.log" 2>&1 || log "shoal lab down $l failed"
  done
  SHOAL_LABS=()
  # newest first: backends and client before nodes, nodes before the switch
  while read -r ns; do
    ns_exists "$ns" || continue
    # anything still inside a namespace we made is ours (started by this script)
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
  done < <(tac "$NS_LIST")
  : >"$NS_LIST"
  rm -f /var/run/wireguard/mw"${ID}"r*.sock 2>/dev/null
  return 0
}
SAMPLER_PID=""
cleanup() {
  lab_down
  [ -n "$SAMPLER_PID" ] && stop_pid "$SAMPLER_PID"
  rm -f "$WORK"/*.key 2>/dev/null
  log "cleaned up (logs in $WORK)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------ installs
INSTALL_NOTES=()
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
row_wanted() { [[ ",$ROWS_ARG," == *",$1,"* ]]; }
apt_install() {   # packages -> installs the missing ones (bounded), notes failures
  local need=() p
  for p in "$@"; do pkg_installed "$p" || need+=("$p"); done
  ((${#need[@]})) || return 0
  have apt-get || { INSTALL_NOTES+=("no apt-get: could not install ${need[*]}"); return 0; }
  log "apt-get install ${need[*]}"
  timeout 300 apt-get update -qq >"$WORK/apt.log" 2>&1 || INSTALL_NOTES+=("apt-get update failed")
  for p in "${need[@]}"; do
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
      "$p" >>"$WORK/apt.log" 2>&1 || INSTALL_NOTES+=("apt-get install $p failed (see $WORK/apt.log)")
  done
}
if [ "$SKIP_INSTALL" != 1 ]; then
  pkgs=(iproute2 iperf3 iputils-ping jq)
  { row_wanted nft || row_wanted nft-wg; } && pkgs+=(nftables)
  { row_wanted haproxy || row_wanted haproxy-wg; } && pkgs+=(haproxy)
  { row_wanted haproxy-wg || row_wanted nft-wg; } && pkgs+=(wireguard-go wireguard-tools)
  apt_install "${pkgs[@]}"
fi
for t in ip iperf3 ping jq python3; do
  have "$t" || { log "$t is missing (scripts/setup.sh installs it): cannot measure anything"; exit 1; }
done
# the interpreter itself, not a pyenv shim: it runs inside namespaces, many times
PY=$(python3 -c 'import sys; print(sys.executable)')

# ------------------------------------------------------------------ load on a shared machine
# benches/networks/probe.py's sampler: once a second, the CPU time of processes that are not
# ours (not in this script's process group, not in a namespace named mb<PID>..., not kernel
# threads).
SAMPLER_ON=0
start_sampler() {
  [ -r "$PROBE" ] || return 0
  "$PY" "$PROBE" sampler --work "$WORK" --prefix "mb$ID" --pgid "$(ps -o pgid= -p $$ | tr -d ' ')" \
    >"$WORK/sampler.log" 2>&1 &
  SAMPLER_PID=$!
  SAMPLER_ON=1
  sleep 2
}
foreign_snap() { cat "$WORK/foreign.now" 2>/dev/null || echo "TOTAL 0"; }
foreign_note() {   # $1 snapshot file from the start, $2 seconds
  ((SAMPLER_ON)) || { echo "other work: not sampled"; return; }
  foreign_snap >"$WORK/foreign.end"
  "$PY" "$PROBE" foreign-note "$1" "$WORK/foreign.end" "$2"
}
LOAD_NOTE="not checked before measuring"
wait_quiet() {   # up to QUIET_WAIT s for other work < 10% of the machine over 5 s
  ((QUIET_WAIT > 0 && SAMPLER_ON)) || return 0
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

# ------------------------------------------------------------------------------ lab helpers
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

underlay_up() {   # the switch and the three nodes, as `shoal lab up` makes them (no agents)
  local i
  mkns "$SW_NS" && ip -n "$SW_NS" link add br0 type bridge && ip -n "$SW_NS" link set br0 up || return 1
  for i in $(seq 1 $NODES); do
    host_on_switch "${NODE_NS[i]}" "p$i" "${NODE_ADDR[i]}/24" || return 1
  done
}
host_on_switch() {   # $1 ns, $2 bridge port name, $3 cidr: a namespace with eth0 on br0
  mkns "$1" || return 1
  ip link add eth0 netns "$1" type veth peer name "$2" netns "$SW_NS" || return 1
  ip -n "$SW_NS" link set "$2" master br0 up && ip -n "$1" addr add "$3" dev eth0 \
    && ip -n "$1" link set eth0 up
}
client_up() {     # the client, outside the cluster, on the lab's bridge (shoal's row too)
  host_on_switch "$CLIENT_NS" pclient "$CLIENT_ADDR/24"
}

wait_ping() {     # $1 ns, $2 target: up to ~10 s
  for _ in $(seq 1 20); do
    timeout 3 ip netns exec "$1" ping -q -c 1 -W 1 "$2" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}
wait_listen() {   # $1 ns, $2 port: up to 5 s for a TCP listener
  for _ in $(seq 1 50); do
    ip netns exec "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
    sleep 0.1
  done
  return 1
}

# The overlay between the nodes: a bridge brm per node with a kernel VXLAN device, flooding to
# the other nodes (head-end replication), the node's own overlay address on brm.
# $1 = plain (VXLAN on the underlay) | wg (VXLAN between the nodes' wireguard-go addresses).
OVL_MTU=1450
overlay_up() {
  local mode=$1 i j self
  [ "$mode" = wg ] && { wg_up || return 1; }
  OVL_MTU=1450
  [ "$mode" = wg ] && OVL_MTU=1370   # wireguard-go's 1420 minus VXLAN's 50
  for i in $(seq 1 $NODES); do
    self=${NODE_ADDR[i]}
    [ "$mode" = wg ] && self="$WG_BASE.$i"
    ip -n "${NODE_NS[i]}" link add vxm type vxlan id "$VNI" dstport 4789 local "$self" \
      2>>"$WORK/setup.err" || return 1
    for j in $(seq 1 $NODES); do
      ((i == j)) && continue
      local peer=${NODE_ADDR[j]}
      [ "$mode" = wg ] && peer="$WG_BASE.$j"
      ip netns exec "${NODE_NS[i]}" bridge fdb append 00:00:00:00:00:00 dev vxm dst "$peer" || return 1
    done
    ip -n "${NODE_NS[i]}" link set vxm mtu "$OVL_MTU" || return 1
    ip -n "${NODE_NS[i]}" link add brm type bridge && ip -n "${NODE_NS[i]}" link set vxm master brm up \
      && ip -n "${NODE_NS[i]}" addr add "${NODE_OVL_ADDR[i]}/24" dev brm \
      && ip -n "${NODE_NS[i]}" link set brm up || return 1
    ip netns exec "${NODE_NS[i]}" sysctl -qw net.ipv4.ip_forward=1 || return 1
  done
}

wg_up() {         # wireguard-go on every node, a full mesh of peers, addresses $WG_BASE.i/24
  local i j ifn p
  have wireguard-go && have wg || { SETUP_SKIP="wireguard-go or wg missing"; return 1; }
  for i in $(seq 1 $NODES); do
    ( umask 077; wg genkey >"$WORK/n$i.key" ) || return 1
    wg pubkey <"$WORK/n$i.key" >"$WORK/n$i.pub" || return 1
  done
  for i in $(seq 1 $NODES); do
    ifn=$(wg_if "$i")
    ip netns exec "${NODE_NS[i]}" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error wireguard-go -f "$ifn" \
      >"$WORK/wggo-$LAB-n$i.out" 2>&1 &
    p=$!; PIDS+=("$p")
  done
  for i in $(seq 1 $NODES); do
    ifn=$(wg_if "$i")
    for _ in $(seq 1 100); do
      ip -n "${NODE_NS[i]}" link show "$ifn" >/dev/null 2>&1 && [ -S "/var/run/wireguard/$ifn.sock" ] && break
      sleep 0.1
    done
    local peers=()
    for j in $(seq 1 $NODES); do
      ((i == j)) && continue
      peers+=(peer "$(cat "$WORK/n$j.pub")" endpoint "${NODE_ADDR[j]}:$((51820 + j))" allowed-ips "$WG_BASE.$j/32")
    done
    ip netns exec "${NODE_NS[i]}" wg set "$ifn" listen-port $((51820 + i)) private-key "$WORK/n$i.key" \
      "${peers[@]}" 2>>"$WORK/setup.err" || return 1
    ip -n "${NODE_NS[i]}" addr add "$WG_BASE.$i/24" dev "$ifn" && ip -n "${NODE_NS[i]}" link set "$ifn" up || return 1
  done
  WG_NOTE="wireguard-go $(ver wireguard-go --version | awk '{print $NF}'), full mesh, VXLAN MTU 1370 inside wg's 1420"
}

backends_up() {   # baselines: each backend a namespace with eth0 on its node's brm
  local k n
  for k in 1 2; do
    n=${BACKEND_NODE[k]}
    mkns "${BACKEND_NS[k]}" || return 1
    ip link add "vb$k" netns "${NODE_NS[n]}" mtu "$OVL_MTU" type veth peer name eth0 netns "${BACKEND_NS[k]}" \
      mtu "$OVL_MTU" || return 1
    ip -n "${NODE_NS[n]}" link set "vb$k" master brm up && ip -n "${BACKEND_NS[k]}" addr add "${BACKEND_ADDR[k]}/24" dev eth0 \
      && ip -n "${BACKEND_NS[k]}" link set eth0 up \
      && ip -n "${BACKEND_NS[k]}" route add default via "${NODE_OVL_ADDR[n]}" || return 1
  done
}

# The servers in the backends (shoal's row too): mesh.py's accept-and-close server on PUB_CPS in
# both. The iperf3 server (one test, in b1) is started by tput_once for each run.
servers_up() {
  local k
  for k in 1 2; do
    ip netns exec "${BACKEND_NS[k]}" "$PY" "$MESH_PY" server --name "b$k" --port "$PUB_CPS" \
      >"$WORK/server-$LAB-b$k.log" 2>&1 &
    PIDS+=("$!")
  done
  for k in 1 2; do wait_listen "${BACKEND_NS[k]}" "$PUB_CPS" || { SETUP_ERR="server in b$k not listening"; return 1; }; done
}

# ------------------------------------------------------------------------------ measurements
TPUT_GBPS="" TPUT_RETR="" TPUT_ERR="" IPERF_RESIDENT=""
tput_once() {     # $1 tag: iperf3 client -> ENTRY:PUB_TPUT, server in b1 -> TPUT_GBPS, TPUT_RETR
  local tag=$1 spid json="$WORK/iperf-$1.json"
  TPUT_GBPS=FAIL TPUT_RETR=- TPUT_ERR=""
  if [ -z "$IPERF_RESIDENT" ]; then
    ip netns exec "${BACKEND_NS[1]}" iperf3 -s -1 -p "$PUB_TPUT" >"$WORK/iperf-server-$tag.log" 2>&1 &
    spid=$!
    PIDS+=("$spid")
  fi
  wait_listen "${BACKEND_NS[1]}" "$PUB_TPUT" || { TPUT_ERR="iperf3 server not listening"; return; }
  timeout $((DUR + 30)) ip netns exec "$CLIENT_NS" iperf3 -c "$ENTRY" -p "$PUB_TPUT" -t "$DUR" \
    -J --connect-timeout 3000 >"$json" 2>"$json.err"
  if [ -z "$IPERF_RESIDENT" ]; then
    for _ in $(seq 1 30); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$spid"
  fi
  local bps retr
  read -r bps retr < <(jq -r '[(.end.sum_received.bits_per_second // -1),
                               (.end.sum_sent.retransmits // -1)] | @tsv' "$json" 2>/dev/null)
  if [ -n "${bps:-}" ] && awk -v b="$bps" 'BEGIN {exit !(b > 0)}'; then
    TPUT_GBPS=$(awk -v b="$bps" 'BEGIN {printf "%.2f", b / 1e9}')
    [ "${retr:--1}" != -1 ] && TPUT_RETR=$retr
  else
    TPUT_ERR=$(jq -r '.error // empty' "$json" 2>/dev/null)
    TPUT_ERR=${TPUT_ERR:-$(tail -c 200 "$json.err" | tr '\n|' ' /')}
    TPUT_ERR=${TPUT_ERR:-no result}
  fi
}

median() {       # numbers as arguments (others ignored) -> median, 2 decimals, or "-"
  printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{v[NR] = $1} END {
    if (NR == 0) {print "-"; exit}
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.2f\n", m }'
}

declare -A LABEL TPUT RETR CPS SPLIT SEES NOTES STATUS SAMPLES
LABEL[nft]="nftables DNAT + masquerade, kernel VXLAN"
LABEL[haproxy]="HAProxy TCP, kernel VXLAN"
LABEL[haproxy-wg]="HAProxy TCP, VXLAN over wireguard-go"
LABEL[nft-wg]="nftables DNAT + masquerade, VXLAN over wireguard-go"
LABEL[shoal]="shoal routing mesh, plain network"
LABEL[shoal-enc]="shoal routing mesh, encrypted network"

# measure_row ID: the figures of one row, through the lab as it stands (every row calls it once
# its published ports answer on ENTRY). Fills TPUT, RETR, CPS, SPLIT, SEES, SAMPLES, STATUS.
measure_row() {
  local id=$1 r s=() rt=() errs=() json
  for r in $(seq 1 "$REPS"); do
    tput_once "$id-$r"
    s+=("$TPUT_GBPS") rt+=("$TPUT_RETR")
    [ -n "$TPUT_ERR" ] && errs+=("iperf3 run $r: $TPUT_ERR")
    log "$id: iperf3 run $r: $TPUT_GBPS Gbit/s, $TPUT_RETR retransmits"
  done
  TPUT[$id]=$(median "${s[@]}") RETR[$id]=$(median "${rt[@]}" | awk '/^[0-9.]+$/ {printf "%.0f\n", $1; next} {print}')
  local c cs=() b1=0 b2=0 seen="" ok failed x1 x2 sv cj=()
  # warm-up, not counted: neighbour entries, the proxies' first connections, page cache
  timeout 60 ip netns exec "$CLIENT_NS" "$PY" "$MESH_PY" client --target "$ENTRY" --port "$PUB_CPS" \
    --count 200 --par "$CPS_PAR" --timeout 2 >"$WORK/cps-$id-warmup.json" 2>&1
  for r in $(seq 1 "$REPS"); do
    json="$WORK/cps-$id-$r.json"
    timeout $((CONNS * 2 / CPS_PAR + 60)) ip netns exec "$CLIENT_NS" "$PY" "$MESH_PY" client \
      --target "$ENTRY" --port "$PUB_CPS" --count "$CONNS" --par "$CPS_PAR" --timeout 2 \
      >"$json" 2>"$json.err" || errs+=("conn/s run $r: exit $? $(tail -c 200 "$json.err" | tr '\n|' ' /')")
    if IFS=$'\t' read -r ok failed x1 x2 sv < <(jq -r '[.ok, .failed, (.by_backend.b1 // 0),
        (.by_backend.b2 // 0), (.seen | keys | join(","))] | @tsv' "$json" 2>/dev/null); then
      c=$(jq -r .cps "$json")
      ((ok > 0)) || c=FAIL
      ((failed > 0)) && errs+=("conn/s run $r: $failed of $CONNS connections failed $(jq -c .errors "$json")")
      b1=$((b1 + x1)) b2=$((b2 + x2))
      [[ ",$seen," == *",$sv,"* ]] || seen+="${seen:+,}$sv"
    else
      c=FAIL
    fi
    cs+=("$c") cj+=("$(jq -c '{ok, failed, seconds}' "$json" 2>/dev/null)")
    log "$id: conn/s run $r: $c, b1/b2 $x1/$x2, backends saw $sv"
  done
  CPS[$id]=$(median "${cs[@]}" | awk '/^[0-9.]+$/ {printf "%.0f\n", $1; next} {print}')
  SPLIT[$id]="$b1 / $b2"
  ((b1 + b2 > 0)) && ((b1 == 0 || b2 == 0)) && errs+=("a backend got no connection")
  if [ -z "$seen" ]; then SEES[$id]=-
  elif [ "$seen" = "$CLIENT_ADDR" ]; then SEES[$id]="yes ($seen)"
  else SEES[$id]="no (${seen//,/, })"; fi
  SAMPLES[$id]="iperf3 [${s[*]}] Gbit/s, retransmits [${rt[*]}]; conn/s [${cs[*]}] (${cj[*]})"
  ((${#errs[@]})) && NOTES[$id]+="; errors: ${errs[*]}"
  NOTES[$id]+="; $(foreign_note "$WORK/foreign.row" $((SECONDS - ROW_T0 > 0 ? SECONDS - ROW_T0 : 1)))"
  NOTES[$id]+="; load average after the row $(cut -d' ' -f1 /proc/loadavg)"
  if [ "${TPUT[$id]}" != - ] && [ "${CPS[$id]}" != - ]; then STATUS[$id]=ok; else STATUS[$id]=fail; fi
}

# ------------------------------------------------------------------------------ the rows
# Each row: lab_names, set up, check, measure_row, lab_down. On a failed set-up it sets
# SETUP_ERR (or SETUP_SKIP, when a tool is missing) and returns non-zero; run_row reports it.
SETUP_ERR="" SETUP_SKIP="" WG_NOTE=""

baseline_lab() {  # $1 plain|wg: underlay, client, overlay, backends, servers; connectivity checked
  : >"$WORK/setup.err"
  underlay_up && client_up || { SETUP_ERR="could not build the underlay"; return 1; }
  overlay_up "$1" || { SETUP_ERR=${SETUP_ERR:-overlay set-up failed: $(tail -c 200 "$WORK/setup.err")}; return 1; }
  backends_up || { SETUP_ERR="backends set-up failed: $(tail -c 200 "$WORK/setup.err")"; return 1; }
  local k
  for k in 1 2; do
    wait_ping "${NODE_NS[1]}" "${BACKEND_ADDR[k]}" || { SETUP_ERR="n1 cannot reach b$k over the overlay"; return 1; }
  done
  servers_up
}

# nftables, kube-proxy's nftables mode in miniature: DNAT in prerouting to a backend picked by
# numgen inc mod 2 (round robin), and masquerade of what was DNATed as it leaves for the overlay
# (kube-proxy masquerades too for external traffic with externalTrafficPolicy=Cluster): without
# it the backend's reply would leave its own node straight for the client, with the backend's
# address as its source, and never be un-DNATed. So the backend sees the entry node's overlay
# address, not the client's.
nft_rules() {   # $1 node index
  local i=$1
  ip netns exec "${NODE_NS[i]}" nft -f - <<EOF
table ip mesh {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr ${NODE_ADDR[i]} tcp dport $PUB_TPUT dnat to ${BACKEND_ADDR[1]}
    ip daddr ${NODE_ADDR[i]} tcp dport $PUB_CPS dnat to numgen inc mod 2 map { 0 : ${BACKEND_ADDR[1]}, 1 : ${BACKEND_ADDR[2]} }
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "brm" ct status dnat masquerade
  }
}
EOF
}
nft_row() {       # $1 row id, $2 plain|wg
  local id=$1 i
  have nft || { SETUP_SKIP="nft missing"; return 1; }
  baseline_lab "$2" || return 1
  for i in $(seq 1 $NODES); do nft_rules "$i" 2>>"$WORK/setup.err" || { SETUP_ERR="nft: $(tail -c 200 "$WORK/setup.err")"; return 1; }; done
  NOTES[$id]="nft $(nft --version | awk '{print $2}'), rules on all 3 nodes; overlay MTU $OVL_MTU"
  [ "$2" = wg ] && NOTES[$id]+="; $WG_NOTE"
  measure_row "$id"
}
row_nft() { nft_row nft plain; }
row_nft_wg() { nft_row nft-wg wg; }

haproxy_cfg() {   # $1 node index -> config file path
  local i=$1 f="$WORK/haproxy-$LAB-n$1.cfg"
  cat >"$f" <<EOF
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend tput
    bind ${NODE_ADDR[i]}:$PUB_TPUT
    default_backend tput
backend tput
    server b1 ${BACKEND_ADDR[1]}:$PUB_TPUT
frontend cps
    bind ${NODE_ADDR[i]}:$PUB_CPS
    default_backend cps
backend cps
    balance roundrobin
    server b1 ${BACKEND_ADDR[1]}:$PUB_CPS
    server b2 ${BACKEND_ADDR[2]}:$PUB_CPS
EOF
  echo "$f"
}
haproxy_row() {   # $1 row id, $2 plain|wg
  local id=$1 i cfg
  have haproxy || { SETUP_SKIP="haproxy missing"; return 1; }
  baseline_lab "$2" || return 1
  for i in $(seq 1 $NODES); do
    cfg=$(haproxy_cfg "$i")
    # -db: foreground, no daemon; `ip netns exec` execs it, so $! is haproxy itself
    ip netns exec "${NODE_NS[i]}" haproxy -db -f "$cfg" >"$WORK/haproxy-$LAB-n$i.log" 2>&1 &
    PIDS+=("$!")
  done
  for i in $(seq 1 $NODES); do
    wait_listen "${NODE_NS[i]}" "$PUB_CPS" || { SETUP_ERR="haproxy on n$i not listening: $(tail -c 200 "$WORK/haproxy-$LAB-n$i.log" | tr '\n' ' ')"; return 1; }
  done
  NOTES[$id]="$(ver haproxy -v | awk '{print $1, $3}'), $(nproc) threads (its default), on all 3 nodes; overlay MTU $OVL_MTU"
  [ "$2" = wg ] && NOTES[$id]+="; $WG_NOTE"
  measure_row "$id"
}
row_haproxy() { haproxy_row haproxy plain; }
row_haproxy_wg() { haproxy_row haproxy-wg wg; }

# ------------------------------------------------------------------------------ shoal's rows
# The real lab (`shoal lab up`, the same names and addresses as the baselines), a user network
# (plain, or encrypted for shoal-enc), two services as the baselines have them: `tput`
# publishing PUB_TPUT with b1 alone (iperf3's two connections must meet one server) and `cps`
# publishing PUB_CPS with b1 and b2. The backends join through shoal-cni with SHOAL_SERVICE,
# at the baselines' addresses. Nothing else: no nft, no proxy; the agents steer the ports.
SHOAL_BIN="" CNI_BIN=""
build_shoal() {   # once per run: the release binaries shoal's rows run
  [ -n "$SHOAL_BIN" ] && return 0
  log "cargo build --release -p shoal-control -p shoal-cni"
  if ! (cd "$REPO" && timeout 3600 cargo build --release -p shoal-control -p shoal-cni) >"$WORK/build.log" 2>&1; then
    SETUP_ERR="the build failed: $(tail -c 300 "$WORK/build.log" | tr '\n|' ' /')"
    return 1
  fi
  local td=${CARGO_TARGET_DIR:-$REPO/target}
  SHOAL_BIN="$td/release/shoal" CNI_BIN="$td/release/shoal-cni"
}
shoal_exec() {    # $1 node index, command...: a shoal command against that node's agent
  local i=$1; shift
  timeout 30 "$SHOAL_BIN" lab exec --name "$LAB" "n$i" -- "$SHOAL_BIN" "$@"
}
shoal_row() {     # $1 row id, $2 plain|encrypted
  local id=$1 k opt=() conf args i ok
  build_shoal || return 1
  SHOAL_LABS+=("$LAB")
  timeout 120 "$SHOAL_BIN" lab up --name "$LAB" --nodes 3 >>"$WORK/shoal-lab.log" 2>&1 \
    || { SETUP_ERR="shoal lab up failed: $(tail -c 200 "$WORK/shoal-lab.log" | tr '\n|' ' /')"; return 1; }
  client_up || { SETUP_ERR="could not add the client"; return 1; }
  [ "$2" = encrypted ] && opt=(--opt encrypted)
  shoal_exec 1 network create "${opt[@]}" --attachable --subnet "$MESH_SUBNET" mesh >>"$WORK/setup.err" 2>&1 \
    && shoal_exec 1 service create tput --network mesh --publish "$PUB_TPUT:$PUB_TPUT" >>"$WORK/setup.err" 2>&1 \
    && shoal_exec 1 service create cps --network mesh --publish "$PUB_CPS:$PUB_CPS" >>"$WORK/setup.err" 2>&1 \
    || { SETUP_ERR="network or service create failed: $(tail -c 200 "$WORK/setup.err" | tr '\n|' ' /')"; return 1; }
  for i in 2 3; do   # the backends' nodes must know the network and services first
    ok=0
    for _ in $(seq 1 100); do
      shoal_exec "$i" network ls 2>/dev/null | awk '{print $2}' | grep -qx mesh && { ok=1; break; }
      sleep 0.1
    done
    ((ok)) || { SETUP_ERR="n$i does not know network mesh after 10 s"; return 1; }
  done
  sleep 1
  for k in 1 2; do
    mkns "${BACKEND_NS[k]}" || { SETUP_ERR="could not make ${BACKEND_NS[k]}"; return 1; }
    args="IP=${BACKEND_ADDR[k]};SHOAL_SERVICE=cps"
    [ "$k" = 1 ] && args+=",tput"
    conf="{\"cniVersion\":\"1.1.0\",\"name\":\"mesh\",\"type\":\"shoal-cni\",\"network\":\"mesh\",\"socket\":\"/run/shoal/lab-$LAB/n${BACKEND_NODE[k]}.sock\"}"
    CNI_COMMAND=ADD CNI_CONTAINERID="${BACKEND_NS[k]}-0123456789abcdef" CNI_NETNS="/run/netns/${BACKEND_NS[k]}" \
      CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin CNI_ARGS="$args" timeout 30 "$CNI_BIN" <<<"$conf" \
      >>"$WORK/cni.out" 2>>"$WORK/setup.err" \
      || { SETUP_ERR="CNI ADD of b$k failed: $(tail -c 300 "$WORK/cni.out" | tr '\n|' ' /')"; return 1; }
  done
  servers_up || return 1
  # The iperf3 server stays up through the row: shoal health-checks its backends (a TCP
  # connect to each target), and a one-test server (`-s -1`) takes a check for its test and
  # exits. Baselines start one per run.
  ip netns exec "${BACKEND_NS[1]}" iperf3 -s -p "$PUB_TPUT" >"$WORK/iperf-server-$LAB.log" 2>&1 &
  PIDS+=("$!")
  IPERF_RESIDENT=1
  wait_listen "${BACKEND_NS[1]}" "$PUB_TPUT" || { SETUP_ERR="iperf3 server in b1 not listening"; return 1; }
  ok=0
  for _ in $(seq 1 100); do   # up to ~20 s for the ports to answer through n1
    timeout 3 ip netns exec "$CLIENT_NS" "$PY" "$MESH_PY" client --target "$ENTRY" --port "$PUB_CPS" \
      --count 1 --par 1 --timeout 1 2>/dev/null | jq -e '.ok == 1' >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.2
  done
  ((ok)) || { SETUP_ERR="the published port does not answer on $ENTRY after 20 s"; return 1; }
  NOTES[$id]="shoal $("$SHOAL_BIN" --version 2>/dev/null | awk '{print $2}'), $2 user network, agents' routing mesh on all 3 nodes (tc steering, no NAT table, no proxy)"
  measure_row "$id"
}
row_shoal() { shoal_row shoal plain; }
row_shoal_enc() { shoal_row shoal-enc encrypted; }

run_row() {      # $1 row id
  local id=$1 fn t=$SECONDS
  fn="row_${id//-/_}"
  STATUS[$id]=fail TPUT[$id]=- RETR[$id]=- CPS[$id]=- SPLIT[$id]=- SEES[$id]=- NOTES[$id]=""
  SETUP_ERR="" SETUP_SKIP="" WG_NOTE="" IPERF_RESIDENT=""
  lab_names
  log "row $id: ${LABEL[$id]} (lab $LAB)"
  foreign_snap >"$WORK/foreign.row"
  ROW_T0=$SECONDS
  if ! "$fn"; then
    if [ -n "$SETUP_SKIP" ]; then
      STATUS[$id]=skipped NOTES[$id]="$SETUP_SKIP"
    elif [ "${STATUS[$id]}" != ok ]; then
      NOTES[$id]="setup failed: $SETUP_ERR${NOTES[$id]:+; }${NOTES[$id]}"
    fi
    log "row $id: ${STATUS[$id]}: ${NOTES[$id]}"
  fi
  lab_down
  log "row $id: done in $((SECONDS - t)) s"
}

# ------------------------------------------------------------------------------------ report
ver() {   # a tool's version line (the first), or "TOOL not installed"
  have "$1" || { echo "$1 not installed"; return; }
  "$@" 2>/dev/null | awk 'NR == 1 {print}'
}
num() { [[ ${1:-} =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
ratio() { num "$1" && num "$2" && awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "-"}' || echo -; }
cell() { local v=${1//|//}; echo "${v//$'\n'/ }"; }

report() {
  local id cores model
  cores=$(nproc)
  model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
  echo "# shoal routing mesh: published-port load balancing, baselines ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Machine: $(uname -sr), $cores cores ($model), shared with other work; the lab's nodes,"
  echo "backends, client and every proxy share these cores. Machine load: $LOAD_NOTE; the notes"
  echo "give the CPU other work took during each row (sampled once a second, approximate); load"
  echo "average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Mode: $([ "$QUICK" = 1 ] && echo 'quick (CI short mode)' || echo full)."
  echo "Tools: $(ver iperf3 --version | awk '{print $1, $2}'); $("$PY" --version 2>&1); $(ver nft --version);" \
    "$(ver haproxy -v | awk '{print $1, $3}'); wireguard-go $(ver wireguard-go --version | awk '{print $NF}')."
  ((${#INSTALL_NOTES[@]})) && echo "Install problems: ${INSTALL_NOTES[*]}"
  echo
  echo "Lab: switch + 3 node namespaces on 198.18.0.1-3/24 (shoal lab's layout), a client at"
  echo "$CLIENT_ADDR outside the cluster, backends b1 (${BACKEND_ADDR[1]}, on n2) and b2 (${BACKEND_ADDR[2]}, on n3)"
  echo "on an overlay network $MESH_SUBNET. All through n1 ($ENTRY): TCP throughput = iperf3, 1 stream,"
  echo "$DUR s, median of $REPS, receiver Gbit/s, to port $PUB_TPUT (backend b1 only: iperf3's two connections"
  echo "must reach one server); conn/s = $CONNS short connections (connect, read one line, close) in"
  echo "$CPS_PAR client processes to port $PUB_CPS (both backends). Ratios are against the nftables row."
  echo
  echo "| system | TCP 1-stream Gbit/s | x nft | retransmits | conn/s | x nft | conns b1 / b2 | backend sees client address | notes |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for id in "${ROWS[@]}"; do
    echo "| ${LABEL[$id]} | ${TPUT[$id]} | $(ratio "${TPUT[$id]}" "${TPUT[nft]:--}") | ${RETR[$id]} | ${CPS[$id]} | $(ratio "${CPS[$id]}" "${CPS[nft]:--}") | ${SPLIT[$id]} | ${SEES[$id]} | $(cell "${STATUS[$id]}${NOTES[$id]:+: }${NOTES[$id]}") |"
  done
  echo
  echo "Raw samples:"
  echo
  for id in "${ROWS[@]}"; do
    [ -n "${SAMPLES[$id]:-}" ] && echo "- ${LABEL[$id]}: ${SAMPLES[$id]}"
  done
  echo
  echo "Command: benches/mesh/run.sh $ARGS_TEXT. Time: $((SECONDS - T0)) s. Logs: $WORK"
}

# -------------------------------------------------------------------------------------- main
start_sampler
wait_quiet
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for id in "${ROWS[@]}"; do run_row "$id"; done
mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"

FAILED=() MEASURED=0
for id in "${ROWS[@]}"; do
  case ${STATUS[$id]} in
    ok) MEASURED=$((MEASURED + 1)) ;;
    fail) FAILED+=("$id") ;;
  esac
done
if ((${#FAILED[@]})); then log "FAIL: rows ${FAILED[*]} could not be measured (see the notes)"; exit 1; fi
((MEASURED > 0)) || { log "FAIL: no row was measured"; exit 1; }
exit 0
