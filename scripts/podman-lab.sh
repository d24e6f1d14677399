#!/usr/bin/env bash
# Podman on a `shoal lab` node: runs `podman ARGS` with Debian's podman and its CNI backend,
# configured so that every shoal network the node knows is a podman network served by
# `shoal-cni` through that node's agent. The image `shoal-bb` (busybox-static, made here: no
# registry needed) is imported on first use. Needs root and a lab that is up (scripts/lab.sh).
#   scripts/podman-lab.sh n1 run -d --name a --network web shoal-bb sleep 1d
#   scripts/podman-lab.sh n2 run -d --name b --network web shoal-bb sleep 1d
#   scripts/podman-lab.sh n1 exec a ping -c 3 10.0.0.16
#   scripts/podman-lab.sh n1 rm -f -t 0 a
# Podman's files live under /run/shoal/lab-NAME/podman (gone with `shoal lab down` and a
# reboot); LAB=NAME picks a lab other than the default one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
node=$1
shift
lab=${LAB:-shoal-lab}
case "$node" in
  n[0-9]*) ;;
  *) echo "podman-lab: the first argument is a lab node: n1, n2, ..." >&2; exit 2 ;;
esac
dir=/run/shoal/lab-$lab
socket=$dir/$node.sock
if [ ! -S "$socket" ]; then
  echo "podman-lab: no agent socket $socket: is the lab up (scripts/lab.sh) and $node in it?" >&2
  exit 1
fi
for cmd in podman runc busybox; do
  command -v "$cmd" >/dev/null || { echo "podman-lab: $cmd is missing; run scripts/setup.sh" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-target}
[ -x "$target/release/shoal-cni" ] || cargo build --release --quiet -p shoal-cni
[ -x "$target/release/shoal" ] || cargo build --release --quiet -p shoal-control --bin shoal
plugin=$(realpath "$target/release/shoal-cni")
shoal=$(realpath "$target/release/shoal")

base=$dir/podman
conf=$base/$node
mkdir -p "$base/plugins" "$conf/net.d"
ln -sf "$plugin" "$base/plugins/shoal-cni"
# One podman network per shoal network this node knows (not ingress: nothing attaches there).
rm -f "$conf"/net.d/*.conflist
"$shoal" lab exec --name "$lab" "$node" -- shoal network ls | awk 'NR > 1 && $2 != "ingress" { print $2 }' |
  while read -r net; do
    printf '{"cniVersion":"1.0.0","name":"%s","plugins":[{"type":"shoal-cni","network":"%s","socket":"%s"}]}\n' \
      "$net" "$net" "$socket" >"$conf/net.d/$net.conflist"
  done
# runc (crun refuses hybrid cgroups), cgroupfs, no default ulimits (they cannot be set in
# every container host), the CNI backend with the files above.
cat >"$conf/containers.conf" <<EOF
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["$base/plugins"]
network_config_dir = "$conf/net.d"
EOF
podman=(env CONTAINERS_CONF="$conf/containers.conf" podman --root "$base/root" --runroot "$base/run" --storage-driver vfs)
if ! "${podman[@]}" image exists shoal-bb; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  mkdir -p "$rootfs/bin" "$rootfs/tmp"
  cp "$(command -v busybox)" "$rootfs/bin/busybox"
  for tool in sh ping nc sleep ip cat echo ls wget; do ln -s busybox "$rootfs/bin/$tool"; done
  tar -C "$rootfs" -cf "$rootfs.tar" .
  "${podman[@]}" import "$rootfs.tar" shoal-bb >/dev/null 2>&1
  rm -f "$rootfs.tar"
fi
exec "${podman[@]}" "$@"
