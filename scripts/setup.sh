#!/usr/bin/env bash
# Make this machine able to run qiotests: QEMU programs and a virtualenv with the Python
# deps. Idempotent and quiet when everything is there; used by `make check`/`selftest`.
#   scripts/setup.sh [--no-qemu] [--lint]
# --lint also installs shellcheck (apt), which `make lint` runs on the scripts and, through
# actionlint, on the workflows' run: steps.
set -euo pipefail
cd "$(dirname "$0")/.."

need_qemu=1
need_lint=0
for arg in "$@"; do
    case "$arg" in
        --no-qemu) need_qemu=0;;
        --lint) need_lint=1;;
        *) echo "usage: scripts/setup.sh [--no-qemu] [--lint]" >&2; exit 2;;
    esac
done

sudo_cmd() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi
}

apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "setup: $* are missing and this is not a Debian/Ubuntu machine; install them by hand" >&2
        exit 1
    fi
    echo "setup: installing $* with apt-get" >&2
    if ! sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; then
        sudo_cmd apt-get update -q >/dev/null || {
            echo "setup: need root to install $*; run: sudo apt-get install $*" >&2; exit 1; }
        sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    fi
}

# QEMU: only when none is configured and none is on PATH (a build dir or QEMU_PROG wins).
if [ $need_qemu = 1 ] && [ -z "${QEMU_PROG:-}" ] && [ -z "${QEMU_BUILD_DIR:-}" ] \
        && ! command -v qemu-system-x86_64 >/dev/null; then
    apt_install qemu-system-x86 qemu-utils
fi
if [ $need_qemu = 1 ] && [ -z "${QEMU_IMG_PROG:-}" ] && [ -z "${QEMU_BUILD_DIR:-}" ] \
        && ! command -v qemu-img >/dev/null; then
    apt_install qemu-utils
fi

if [ $need_lint = 1 ] && ! command -v shellcheck >/dev/null; then
    apt_install shellcheck
fi

# The virtualenv, rebuilt when pyproject.toml is newer than the stamp.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.stamp ]; then
    echo "setup: creating .venv with the Python dependencies" >&2
    rm -rf .venv
    "$PY" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    touch .venv/.stamp
fi
