#!/usr/bin/env bash
# After a red nightly run of a QEMU branch: bisect between the last commit that passed
# (scripts/ci/last-good.sh, kept between runs) and the one that failed now, and put the
# verdict (the first bad commit, its subject, the failing tests and their diffs, the step
# table) in the job summary ($GITHUB_STEP_SUMMARY; printed when unset).
#   scripts/ci/nightly-bisect.sh STATE_DIR REPO BRANCH SRC BAD_COMMIT WORKDIR
# SRC is the QEMU clone the run built (scripts/ci/fetch-qemu.sh fetched its history).
# WORKDIR holds the bisect's logs (`qiotests bisect --workdir`); it builds in
# $QEMU_BUILD_DIR (the nightly build dir, reused) or else WORKDIR/build. Nothing to bisect
# (no passing commit recorded yet, the same commit passed before, or it is no longer in the
# branch's history) is said in the summary and exits 0; otherwise the exit status is
# `qiotests bisect`'s (0: first bad commit found).
set -euo pipefail
[ $# = 6 ] || { echo "usage: scripts/ci/nightly-bisect.sh STATE_DIR REPO BRANCH SRC BAD_COMMIT WORKDIR" >&2; exit 2; }
state=$1 repo=$2 branch=$3 src=$4 bad=$5 work=$6
here=$(cd "$(dirname "$0")/../.." && pwd)
qiotests=${QIOTESTS:-$here/.venv/bin/qiotests}  # the self-tests put a stand-in here
summary() {
    if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then cat >> "$GITHUB_STEP_SUMMARY"; else cat; fi
}
not_run() {
    printf '## bisect: not run\n\n%s\n\n' "$1" | summary
    exit 0
}

good=$("$here/scripts/ci/last-good.sh" get "$state" "$repo" "$branch")
if [ -z "$good" ]; then
    not_run "$repo $branch fails at \`$bad\`, and no earlier passing commit is recorded (first run, or the record expired from the cache): nothing to bisect."
fi
if [ "$good" = "$bad" ]; then
    not_run "\`$bad\` passed before and fails now: the failure is intermittent or comes from the runner, not from a QEMU commit."
fi
if ! git -C "$src" merge-base --is-ancestor "$good" "$bad" 2>/dev/null; then
    not_run "The last passing commit \`$good\` is not an ancestor of \`$bad\` (the branch was rewritten): nothing to bisect."
fi

echo "nightly-bisect: $branch passed at $good, fails at $bad: bisecting" >&2
mkdir -p "$work"
status=0
# the bisect's own pytest runs must not annotate this job or add their tables to its summary
env -u GITHUB_ACTIONS -u GITHUB_STEP_SUMMARY "$qiotests" bisect \
    --src "$src" --good "$good" --bad "$bad" --workdir "$work" \
    --build "${QEMU_BUILD_DIR:-$work/build}" -- -n "${JOBS:-2}" || status=$?
if [ -f "$work/last/summary.md" ]; then
    summary < "$work/last/summary.md"
else
    printf '## bisect: failed to start (exit status %s)\n\nsee the step log.\n\n' "$status" | summary
fi
exit "$status"
