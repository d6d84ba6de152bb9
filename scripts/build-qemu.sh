#!/usr/bin/env bash
# Build the QEMU programs qiotests needs from a QEMU source tree, out of tree.
#   scripts/build-qemu.sh SRC_DIR BUILD_DIR
# Configures x86_64-softmmu with the tools (no docs, UIs, guest agent or user mode) and builds
# only qemu-system-x86_64, qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon with ninja.
# Then makes the firmware findable when QEMU runs from BUILD_DIR (see link_firmware), so
# `pytest cases --qemu-build BUILD_DIR` works. Installs missing build dependencies with apt
# when root, otherwise prints the apt-get command and stops.
#
# Idempotent: BUILD_DIR keeps a stamp (.qiotests-build) naming the source tree and the
# configure flags. With a matching stamp, configure is skipped and ninja only rebuilds what
# changed (a few seconds when nothing did). When the source tree is a different one (other
# path, or the same path re-created) or the flags changed, BUILD_DIR is wiped and built from
# scratch. A non-empty BUILD_DIR without the stamp is never touched.
# Environment: JOBS (ninja -j, default nproc).
set -euo pipefail
usage="usage: scripts/build-qemu.sh SRC_DIR BUILD_DIR"
[ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }
src=$(realpath -e "$1" 2>/dev/null) || { echo "build-qemu: no source tree $1" >&2; exit 2; }
if [ ! -x "$src/configure" ] || [ ! -f "$src/meson.build" ]; then
    echo "build-qemu: $src is not a QEMU source tree (no configure/meson.build)" >&2; exit 2
fi
build=$(realpath -m "$2")
case "$build/" in "$src"/*) echo "build-qemu: BUILD_DIR must be outside the source tree" >&2; exit 2;; esac
jobs=${JOBS:-$(nproc)}

configure_flags=(
    --target-list=x86_64-softmmu --disable-docs --disable-werror --enable-kvm --enable-tcg
    --disable-gtk --disable-sdl --disable-vnc --disable-spice --disable-opengl --disable-xen
    --enable-tools --disable-guest-agent --disable-user --enable-slirp --disable-capstone
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
)
targets=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon)
# the x86 option ROMs that Debian's dfsg tarball strips from pc-bios/
roms=(kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin multiboot_dma.bin pvh.bin)
# what configure, ninja and the ROM build need; seabios and ipxe-qemu are the BIOS and NIC ROMs
deps=(gcc g++ make binutils pkg-config meson ninja-build flex bison python3 python3-venv
      libglib2.0-dev libpixman-1-dev zlib1g-dev libslirp-dev libfdt-dev libzstd-dev libaio-dev
      seabios ipxe-qemu)

log() { echo "build-qemu: $*" >&2; }

install_deps() {
    command -v dpkg-query >/dev/null || { log "not a Debian/Ubuntu machine; make sure these are installed: ${deps[*]}"; return 0; }
    local missing=() p
    for p in "${deps[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local cmd=(apt-get install -y -q --no-install-recommends "${missing[@]}")
    if [ "$(id -u)" != 0 ]; then
        log "missing build dependencies; run as root:"
        echo "  apt-get update && ${cmd[*]}" >&2
        exit 1
    fi
    log "installing ${missing[*]} with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive "${cmd[@]}" >/dev/null
    fi
}

# The stamp: which tree (path, and the root dir's inode and birth time, which change when the
# tree is re-created, so a hard-linked copy re-made with other edits never reuses stale
# objects whose sources kept their old mtimes) and which flags.
tree_id() {
    local id
    id=$(stat -c '%i %.9W' "$src")
    case "$id" in *" 0."*|*" 0"|*" -"*) id=$(stat -c '%i %.9Z' "$src");; esac  # no birth time
    echo "$id"
}
stamp_text() {
    printf 'src=%s\nsrc_id=%s\nversion=%s\nconfigure=%s\n' \
        "$src" "$(tree_id)" "$(cat "$src/VERSION" 2>/dev/null || echo '?')" "${configure_flags[*]}"
}

configure_if_needed() {
    local stamp="$build/.qiotests-build"
    if [ -f "$stamp" ] && [ -f "$build/build.ninja" ] && [ "$(cat "$stamp")" = "$(stamp_text)" ]; then
        log "reusing $build (configured for $src)"
        return 0
    fi
    if [ -d "$build" ] && [ -n "$(ls -A "$build")" ]; then
        [ -f "$stamp" ] || { log "$build is not empty and was not made by build-qemu.sh; give a new or empty dir"; exit 2; }
        log "other source tree, other flags or an interrupted configure: wiping $build"
        rm -rf "$build"
    fi
    mkdir -p "$build"
    # a stamp that matches nothing while configure runs: an interrupted configure is redone
    echo "configuring" > "$stamp"
    log "configuring $src in $build"
    (cd "$build" && "$src/configure" "${configure_flags[@]}")
    stamp_text > "$stamp"
}

build_option_roms() {
    # Debian's dfsg tree has no ROM blobs but has the makefile Debian builds them with.
    [ -f "$src/debian/optionrom.mak" ] || return 0
    local r absent=0
    for r in "${roms[@]}"; do [ -f "$src/pc-bios/$r" ] || absent=1; done
    [ $absent = 1 ] || return 0
    mkdir -p "$build/optionrom"
    make -s -f "$src/debian/optionrom.mak" -C "$build/optionrom" SRC_PATH="$src" all
}

# QEMU (7.2 and later) run from a build dir finds data and firmware under BUILD/qemu-bundle/
# plus the configured path: --firmwarepath /usr/share/seabios becomes
# BUILD/qemu-bundle/usr/share/seabios. Point those at the system's seabios/ipxe-qemu and put
# the option ROMs built above where /usr/share/qemu would have them. configure regenerates
# qemu-bundle, so this runs after every build.
link_firmware() {
    local b="$build/qemu-bundle" r
    mkdir -p "$b/usr/share/qemu" "$b/usr/lib/ipxe"
    [ -d /usr/share/seabios ] && ln -sfn /usr/share/seabios "$b/usr/share/seabios"
    [ -d /usr/lib/ipxe/qemu ] && ln -sfn /usr/lib/ipxe/qemu "$b/usr/lib/ipxe/qemu"
    for r in "${roms[@]}"; do
        [ -f "$build/optionrom/$r" ] && ln -sfn "../../../../optionrom/$r" "$b/usr/share/qemu/$r"
    done
    # the harness also looks for the storage daemon at the top of the build dir
    ln -sfn storage-daemon/qemu-storage-daemon "$build/qemu-storage-daemon"
}

check_programs() {
    local p
    for p in qemu-system-x86_64 qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
        [ -x "$build/$p" ] || { log "$build/$p is missing after the build"; exit 1; }
    done
    log "built $("$build/qemu-img" --version | head -1) in $build"
}

install_deps
configure_if_needed
t0=$(date +%s)
ninja -C "$build" -j"$jobs" "${targets[@]}"
log "ninja took $(( $(date +%s) - t0 )) s"
build_option_roms
link_firmware
check_programs
