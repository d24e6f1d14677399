#!/usr/bin/env bash
# Builds the .deb (issue 19) and checks it: its contents (dpkg-deb -c), lintian (errors fail,
# warnings are printed), then installs it into an overlay of this machine, verifies the
# installed unit (systemd-analyze verify, with its man pages) and runs the lab with the
# installed binary (scripts/package-install-test.sh). Needs root for the last part. Prints the
# .deb's path last.
#   scripts/package.sh                # build, check, install test
#   SHOAL_PACKAGE_NO_INSTALL_TEST=1 scripts/package.sh    # build, contents and lintian only
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"
SHOAL_SETUP_PACKAGE=1 scripts/setup.sh
target="${CARGO_TARGET_DIR:-target}"
t0=$(date +%s)

# Completions and man pages from the CLI definition, where the package's assets expect them
# (control/Cargo.toml, [package.metadata.deb]): the same code the test
# control/tests/package.rs checks against `shoal --help`.
docs="$target/release/pkg-docs"
rm -rf "$docs"
cargo run --quiet -p shoal-control --example gen-docs -- "$docs"
gzip -9n "$docs"/man/*.1
cargo build --release --quiet -p shoal-control --bin shoal
cargo build --release --quiet -p shoal-cni
cargo deb --quiet --no-build --strip -p shoal-control >/dev/null
deb=$(ls -t "$target"/debian/shoal_*.deb | head -n 1)
echo "package: built $deb in $(($(date +%s) - t0)) s" >&2

# Contents: each path the issue names, and one man page per generated page.
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
fail=0
for path in ./usr/bin/shoal ./usr/lib/cni/shoal-cni ./usr/lib/systemd/system/shoal.service ./usr/share/doc/shoal/README \
  ./usr/share/doc/shoal/copyright ./usr/share/bash-completion/completions/shoal \
  ./usr/share/zsh/vendor-completions/_shoal ./usr/share/fish/vendor_completions.d/shoal.fish; do
  grep -qxF "$path" <<<"$contents" || { echo "package: $path is not in $deb" >&2; fail=1; }
done
for page in "$docs"/man/*.1.gz; do
  name=$(basename "$page")
  grep -qxF "./usr/share/man/man1/$name" <<<"$contents" ||
    { echo "package: man page $name is not in $deb" >&2; fail=1; }
done
[ "$fail" = 0 ] || exit 1
echo "package: contents ok ($(grep -c '^\./usr/share/man/man1/.' <<<"$contents") man pages)" >&2
dpkg-deb -I "$deb" | sed -n '/Package:/,$p' >&2

# lintian: an error fails; warnings are listed.
lintian --fail-on error --tag-display-limit 0 "$deb" >&2 || {
  echo "package: lintian found errors" >&2
  exit 1
}
echo "package: lintian ok (warnings, if any, above)" >&2

if [ "${SHOAL_PACKAGE_NO_INSTALL_TEST:-0}" != 1 ]; then
  scripts/package-install-test.sh "$deb"
fi
echo "package: done in $(($(date +%s) - t0)) s" >&2
echo "$deb"
