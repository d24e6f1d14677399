#!/usr/bin/env bash
# Installs the .deb with dpkg into a private view of this machine and runs the lab's
# walkthrough with the installed /usr/bin/shoal (issue 19):
#   scripts/package-install-test.sh target/debian/shoal_*.deb
# The view: a new mount namespace with an overlay whose lower layer is this machine's / and
# whose upper layer is a tmpfs, chrooted into, with /proc, /sys and /dev bound in and fresh
# /run and /tmp. dpkg, its maintainer scripts (the shoal group, /var/lib/shoal) and the lab
# write only to the tmpfs; the host's /etc, /usr, /var and dpkg database are untouched. When
# the namespace ends, so do the overlay, the lab's namespaces (their mounts live in the private
# /run) and the tmpfs. The lab's agents are killed by `shoal lab down` (by PID) on every exit.
# Then: reinstall (an upgrade keeps /var/lib/shoal), remove (keeps it), purge (removes it).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "$1")
[ "$(id -u)" = 0 ] || { echo "package-install-test: needs root" >&2; exit 1; }
t0=$(date +%s)
work=$(mktemp -d /tmp/shoal-pkg-root.XXXXXX)
trap 'rmdir "$work" 2>/dev/null || rm -rf "$work"' EXIT

# Bounded: the lab's own waits are bounded (20 s each); the whole run gets 5 minutes.
timeout --kill-after=10 300 unshare --mount --propagation private -- bash -s "$work" "$deb" <<'OUTER'
set -euo pipefail
work=$1 deb=$2
mount -t tmpfs -o size=1g shoal-pkg "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay shoal-pkg -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
root=$work/root
mount --rbind /proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs shoal-run "$root/run"
mount -t tmpfs shoal-tmp "$root/tmp"
cp "$deb" "$root/tmp/shoal.deb"
exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 bash -s <<'INNER'
set -euo pipefail
say() { echo "package-install-test: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
lab_down() { [ -x /usr/bin/shoal ] && /usr/bin/shoal lab down --name pkgtest >/dev/null 2>&1 || true; }
trap lab_down EXIT
[ ! -e /usr/bin/shoal ] || fail "/usr/bin/shoal exists before the install (the overlay leaks)"

DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/shoal.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log >&2; fail "dpkg -i"; }
say "installed: $(dpkg-query -W -f '${Package} ${Version} ${Status}' shoal)"
getent group shoal >/dev/null || fail "no shoal group after the install"
[ "$(stat -c %a /var/lib/shoal)" = 700 ] || fail "/var/lib/shoal is not there with mode 0700"
man -w shoal-node-ls >/dev/null || fail "man shoal-node-ls finds no page"
systemd-analyze verify /usr/lib/systemd/system/shoal.service 2>&1 | tee /tmp/verify.log >&2
[ ! -s /tmp/verify.log ] || fail "systemd-analyze verify (with man pages) complained"
/usr/bin/shoal --version >&2

# The lab's walkthrough, with the installed binary: `lab up` starts its agents from the
# program it runs as (current_exe), here /usr/bin/shoal.
out=$(/usr/bin/shoal lab up --name pkgtest --nodes 3) || fail "shoal lab up"
echo "$out" >&2
[ "$(grep -c ' Ready ' <<<"$out")" = 3 ] || fail "node ls does not show 3 Ready nodes"
grep -qE ' 0% packet loss' <<<"$out" || fail "no ping across the overlay"
want=$(stat -L -c %d:%i /usr/bin/shoal)
for pidfile in /run/shoal/lab-pkgtest/n*.pid; do
  pid=$(cat "$pidfile")
  # `ip netns exec` execs the agent in place, so the PID is the agent's; the same file as
  # /usr/bin/shoal (its path reads differently from the agent's own mount namespace).
  [ "$(stat -L -c %d:%i "/proc/$pid/exe" 2>/dev/null)" = "$want" ] ||
    fail "lab agent $pid runs $(readlink "/proc/$pid/exe"), not the installed /usr/bin/shoal"
done
/usr/bin/shoal lab exec --name pkgtest n2 -- shoal info >/dev/null || fail "lab exec n2 -- shoal info"
/usr/bin/shoal lab down --name pkgtest >/dev/null

# Upgrade (the same version reinstalled runs the upgrade path), remove, purge.
echo keep > /var/lib/shoal/marker
DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/shoal.deb >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log >&2; fail "dpkg -i (upgrade)"; }
[ -f /var/lib/shoal/marker ] || fail "an upgrade lost /var/lib/shoal"
dpkg -r shoal >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log >&2; fail "dpkg -r"; }
[ ! -e /usr/bin/shoal ] || fail "dpkg -r left /usr/bin/shoal"
[ -f /var/lib/shoal/marker ] || fail "dpkg -r removed /var/lib/shoal"
dpkg -P shoal >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log >&2; fail "dpkg -P"; }
[ ! -e /var/lib/shoal ] || fail "dpkg -P left /var/lib/shoal"
say "install, lab walkthrough (init, join, ping across the overlay), upgrade, remove, purge: ok"
INNER
OUTER
echo "package-install-test: done in $(($(date +%s) - t0)) s" >&2
