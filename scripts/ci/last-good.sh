#!/usr/bin/env bash
# The last QEMU commit that passed the nightly run, kept between runs in STATE_DIR (the
# workflow restores and saves that directory with actions/cache, keyed by the branch).
#   scripts/ci/last-good.sh get STATE_DIR REPO BRANCH    prints the commit, or nothing
#   scripts/ci/last-good.sh set STATE_DIR REPO BRANCH COMMIT
# The record names the repository and branch, so a cache entry restored for another
# repository (a workflow_dispatch with another URL) is never taken for this one.
set -euo pipefail
usage="usage: scripts/ci/last-good.sh get STATE_DIR REPO BRANCH | set STATE_DIR REPO BRANCH COMMIT"
[ $# -ge 4 ] || { echo "$usage" >&2; exit 2; }
op=$1 dir=$2 repo=$3 branch=$4
file=$dir/last-good

case "$op" in
    get)
        [ $# = 4 ] || { echo "$usage" >&2; exit 2; }
        [ -f "$file" ] || exit 0
        awk -v r="$repo" -v b="$branch" '$1 == "repo" { rr = $2 } $1 == "branch" { bb = $2 }
            $1 == "commit" { c = $2 } END { if (rr == r && bb == b) print c }' "$file"
        ;;
    set)
        [ $# = 5 ] || { echo "$usage" >&2; exit 2; }
        commit=$5
        [[ $commit =~ ^[0-9a-f]{40}$ ]] || { echo "last-good: '$commit' is not a full commit hash" >&2; exit 2; }
        mkdir -p "$dir"
        printf 'repo %s\nbranch %s\ncommit %s\ndate %s\n' "$repo" "$branch" "$commit" \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$file.tmp"
        mv "$file.tmp" "$file"
        echo "last-good: $repo $branch passed at $commit" >&2
        ;;
    *) echo "$usage" >&2; exit 2;;
esac
