#!/usr/bin/env bash
# Install what `qiotests build-qemu` needs on a CI runner, where the job is not root but
# has sudo (build-qemu itself only installs as root, else prints the apt-get command).
# The package list is the harness's own (harness.build.DEB_DEPS), plus git and ccache.
#   scripts/ci/build-deps.sh [--dry-run]
# --dry-run prints the apt-get command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/../.."
dry=0
case "${1:-}" in
    --dry-run) dry=1;;
    "") ;;
    *) echo "usage: scripts/ci/build-deps.sh [--dry-run]" >&2; exit 2;;
esac
scripts/setup.sh --no-qemu
read -r -a deps <<<"$(.venv/bin/python -c 'from harness.build import DEB_DEPS; print(*DEB_DEPS)') git ccache"
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then
    echo "build-deps: all of ${deps[*]} are installed"
    exit 0
fi
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo -n)
if [ $dry = 1 ]; then
    echo "+ ${sudo[*]} apt-get install -y -q --no-install-recommends ${missing[*]}"
    exit 0
fi
echo "build-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -q >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
