#!/usr/bin/env bash
# Unpack Debian bookworm-backports' QEMU (qemu-system-x86, -data, -common, qemu-utils)
# into DIR/<version>/ with dpkg-deb -x, beside the installed QEMU and without replacing it.
# Writes DIR/latest with the unpacked tree's path, for `make check QEMU_BUILD_DIR=...`.
#   scripts/qemu-versions.sh DIR
set -euo pipefail
dest=${1:?usage: scripts/qemu-versions.sh DIR}
suite=${QEMU_BACKPORTS_SUITE:-bookworm-backports}
pkgs="qemu-system-x86 qemu-system-data qemu-system-common qemu-utils"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q "$suite"; then
    list=/etc/apt/sources.list.d/qiotests-$suite.list
    echo "qemu-versions: adding $suite to apt sources ($list)" >&2
    echo "deb http://deb.debian.org/debian $suite main" | as_root tee "$list" >/dev/null
    as_root apt-get update -q >/dev/null
fi
# the version line comes first, then the lines naming the archives that carry it
version=$(apt-cache policy qemu-system-x86 | awk -v s="$suite" '
    / (https?|file):|\/var\/lib\/dpkg/ { if ($0 ~ s) { print v; exit } ; next }
    /^ +(\*\*\* )?[0-9]/ { v = ($1 == "***") ? $2 : $1 }')
[ -n "$version" ] || { echo "qemu-versions: no qemu-system-x86 in $suite" >&2; exit 1; }
short=$(echo "$version" | sed -E 's/^[0-9]+://; s/[+~].*//')
tree=$(realpath -m "$dest/$short")
if [ -x "$tree/usr/bin/qemu-system-x86_64" ]; then
    echo "qemu-versions: QEMU $short already unpacked in $tree" >&2
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    wanted=()
    for p in $pkgs; do wanted+=("$p=$version"); done
    (cd "$tmp" && apt-get download -q "${wanted[@]}" >/dev/null 2>&1) || {
        echo "qemu-versions: apt-get download of $pkgs=$version failed" >&2; exit 1; }
    mkdir -p "$tree.partial"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tree.partial"; done
    rm -rf "$tree" && mv "$tree.partial" "$tree"
    echo "qemu-versions: unpacked QEMU $short in $tree" >&2
fi
"$tree/usr/bin/qemu-system-x86_64" --version | head -1
echo "$tree" > "$dest/latest"
