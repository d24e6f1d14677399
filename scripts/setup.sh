#!/usr/bin/env bash
# Installs what shoal's tests, lab and benchmarks need on a fresh Debian machine, as root.
# Idempotent: it installs only what is missing.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"

need_apt=()
tools="ip:iproute2 tcpdump:tcpdump tshark:tshark ping:iputils-ping iperf3:iperf3 ethtool:ethtool python3:python3"
# User networks (issue 16): the podman test runs Debian's podman with its CNI backend and runc,
# on an image made from busybox-static; the CNI reference plugins sit where shoal-cni installs.
tools="$tools podman:podman runc:runc busybox:busybox-static /usr/lib/cni/bridge:containernetworking-plugins"
# The routing mesh's baselines (benches/mesh/run.sh): nftables DNAT, as kube-proxy's nftables
# mode, and HAProxy in TCP mode (the bench runs its own, in the foreground, with its own config).
tools="$tools nft:nftables haproxy:haproxy"
# The package (scripts/package.sh): lintian, dpkg-shlibdeps for cargo-deb's $auto depends,
# systemd-analyze to verify the unit, man to check its Documentation=, unshare and chroot for
# the install test.
if [ "${SHOAL_SETUP_PACKAGE:-0}" = 1 ]; then
  tools="$tools lintian:lintian dpkg-shlibdeps:dpkg-dev systemd-analyze:systemd man:man-db unshare:util-linux"
fi
for pair in $tools; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if [ "${cmd#/}" != "$cmd" ]; then
    [ -e "$cmd" ] || need_apt+=("$pkg")
  else
    command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
  fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need_apt[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}" >&2
  apt-get update -qq
  # tshark asks whether non-root users may capture; the default (no) is what we want.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ "${SHOAL_SETUP_FUZZ:-0}" = 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

if [ "${SHOAL_SETUP_PACKAGE:-0}" = 1 ] && ! cargo deb --version >/dev/null 2>&1; then
  echo "setup: installing cargo-deb" >&2
  cargo install cargo-deb --locked --quiet
fi
