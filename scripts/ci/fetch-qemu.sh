#!/usr/bin/env bash
# Check out COMMIT of REPO into DIR for a build, with the history a bisect needs: REF (the
# branch or tag the commit was found on) is fetched blobless (`--filter=blob:none`: every
# commit and tree, file contents only when checked out), so a later `git bisect` between
# the last passing commit and COMMIT works without a second clone. Reuses DIR when it is
# already a clone of REPO.
#   scripts/ci/fetch-qemu.sh REPO REF COMMIT DIR
set -euo pipefail
[ $# = 4 ] || { echo "usage: scripts/ci/fetch-qemu.sh REPO REF COMMIT DIR" >&2; exit 2; }
repo=$1 ref=$2 commit=$3 dir=$4
say() { echo "fetch-qemu: $*" >&2; }

if [ ! -d "$dir/.git" ]; then
    git init -q "$dir"
    git -C "$dir" remote add origin "$repo"
else
    git -C "$dir" remote set-url origin "$repo"
fi
if [[ $ref =~ ^[0-9a-f]{40}$ ]]; then
    spec=$ref
else
    spec="+$ref:refs/remotes/origin/$ref"
    git ls-remote --exit-code --tags "$repo" "refs/tags/$ref" >/dev/null 2>&1 \
        && spec="+refs/tags/$ref:refs/tags/$ref"
fi
say "fetching $ref from $repo"
git -C "$dir" fetch -q --filter=blob:none --no-tags origin "$spec" 2>&1 \
    | grep -v 'filtering not recognized by server' >&2 || true
if ! git -C "$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
    # the branch moved on and dropped COMMIT (a force push): ask for the commit itself
    git -C "$dir" fetch -q --filter=blob:none origin "$commit"
fi
git -C "$dir" -c advice.detachedHead=false checkout -q --force "$commit"
git -C "$dir" clean -qfdx
say "$dir is at $(git -C "$dir" log -1 --format='%h %s' "$commit")"
