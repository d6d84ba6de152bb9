#!/usr/bin/env bash
# Prove that the cases catch the planted QEMU bugs (docs/planted-bugs.md), with one command:
#   scripts/planted-bugs.sh [WORKDIR] [--only NAME...] [--jobs N]
# WORKDIR (default ../qemu-planted, next to the repo) receives Debian bookworm's QEMU source
# (`apt-get source qemu/bookworm`, adding the deb-src entry if apt has none), a pristine build
# and one build per bug (a hard-linked copy of the source with one file edited by the recipes
# in scripts/planted_bugs.py), then the pytest output of the cases against each build
# (results-NAME.txt) and the verdict table (summary.md). Exit 0 only when the pristine build
# passes and every bug is caught. About 25 minutes on 2 cores the first time; a second run
# reuses the source and the builds and only re-runs pytest.
# Environment: QEMU_SRC_SUITE (default bookworm), JOBS (ninja -j, default nproc).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=$repo/../qemu-planted
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then workdir=$1; shift; fi
workdir=$(realpath -m "$workdir")
suite=${QEMU_SRC_SUITE:-bookworm}
marker=$workdir/.qiotests-planted

log() { echo "planted-bugs: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else log "need root for: $*"; exit 1; fi
}

case "$workdir/" in "$repo"/*) log "WORKDIR must be outside the repo (QEMU sources stay out of it)"; exit 2;; esac
if [ -d "$workdir" ] && [ -n "$(ls -A "$workdir")" ] && [ ! -e "$marker" ]; then
    log "$workdir has files not made by this script; give a new or empty dir"; exit 2
fi
mkdir -p "$workdir/logs"
touch "$marker"
t0=$(date +%s)

# pytest and friends (quiet when the .venv is there)
"$repo/scripts/setup.sh" --no-qemu

# apt must know a deb-src for $suite: an entry in the sources and the downloaded index
ensure_deb_src() {
    apt-get source --print-uris -q "qemu/$suite" >/dev/null 2>&1 && return 0
    # shellcheck disable=SC2016  # $(URI) is apt's placeholder, not a shell expansion
    if ! apt-get indextargets --no-release-info --format '$(URI)' 'Created-By: Sources' 2>/dev/null \
            | grep -q "/dists/$suite/main/source/Sources"; then
        local parts
        eval "$(apt-config shell parts Dir::Etc::sourceparts/d)"
        local file=${parts%/}/qiotests-$suite-src.sources
        log "adding the $suite deb-src entry ($file)"
        printf '%s\n' "Types: deb-src" "URIs: http://deb.debian.org/debian" "Suites: $suite" \
            "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
            | as_root tee "$file" >/dev/null
    fi
    log "apt-get update"
    as_root apt-get update -q >/dev/null
    apt-get source --print-uris -q "qemu/$suite" >/dev/null 2>&1 \
        || { log "apt still has no source package qemu in $suite"; exit 1; }
}

# the pristine source: unpacked once by apt-get source, its dir name kept in WORKDIR/source
src=
if [ -f "$workdir/source" ] && [ -x "$workdir/$(cat "$workdir/source")/configure" ]; then
    src=$workdir/$(cat "$workdir/source")
    log "reusing the source in $src"
else
    command -v dpkg-source >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends dpkg-dev >/dev/null
    ensure_deb_src
    tmp=$workdir/.apt-source.partial
    rm -rf "$tmp" && mkdir -p "$tmp"
    log "apt-get source qemu/$suite into $workdir (log: $workdir/logs/apt-source.log)"
    (cd "$tmp" && apt-get source -q "qemu/$suite") > "$workdir/logs/apt-source.log" 2>&1 \
        || { tail -5 "$workdir/logs/apt-source.log" >&2; exit 1; }
    dirs=("$tmp"/*/)
    if [ ${#dirs[@]} != 1 ] || [ ! -x "${dirs[0]}configure" ]; then
        log "apt-get source did not unpack one QEMU tree in $tmp"; exit 1
    fi
    name=$(basename "${dirs[0]}")
    rm -rf "${workdir:?}/$name"
    mv "$tmp"/* "$workdir"/ && rmdir "$tmp"
    echo "$name" > "$workdir/source"
    src=$workdir/$name
fi

status=0
"$repo/.venv/bin/python" "$repo/scripts/planted_bugs.py" run --workdir "$workdir" --source "$src" "$@" || status=$?
log "finished in $(( ($(date +%s) - t0) / 60 )) min $(( ($(date +%s) - t0) % 60 )) s (exit $status)"
exit $status
