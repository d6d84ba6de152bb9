#!/usr/bin/env bash
# Let the CI user open /dev/kvm. GitHub's Ubuntu runners have the device but only root and
# the kvm group may use it, so a udev rule gives it mode 0666 and udev re-applies it. Without
# /dev/kvm this says so and changes nothing: the harness's `--accel auto` then runs the cases
# under TCG and the pytest header says why.
#   scripts/ci/enable-kvm.sh [--dry-run]
# --dry-run prints what it would run. KVM_DEVICE and UDEV_RULES_DIR replace /dev/kvm and
# /etc/udev/rules.d (the self-tests use them).
set -euo pipefail
dry=0
case "${1:-}" in
    --dry-run) dry=1;;
    "") ;;
    *) echo "usage: scripts/ci/enable-kvm.sh [--dry-run]" >&2; exit 2;;
esac
dev=${KVM_DEVICE:-/dev/kvm}
rules=${UDEV_RULES_DIR:-/etc/udev/rules.d}/99-qiotests-kvm.rules
rule="KERNEL==\"$(basename "$dev")\", GROUP=\"kvm\", MODE=\"0666\", OPTIONS+=\"static_node=kvm\""

if [ ! -e "$dev" ]; then
    echo "enable-kvm: no $dev on this machine: the cases will run under TCG"
    exit 0
fi

as_root() {
    if [ $dry = 1 ]; then echo "+ $*"; return 0; fi
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

echo "enable-kvm: $dev exists; rule $rules: $rule"
if [ $dry = 1 ]; then
    echo "+ echo '$rule' > $rules"
else
    echo "$rule" | as_root tee "$rules" >/dev/null
fi
as_root udevadm control --reload-rules
as_root udevadm trigger --name-match="$(basename "$dev")"
[ $dry = 1 ] || ls -l "$dev"
