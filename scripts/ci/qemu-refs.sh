#!/usr/bin/env bash
# Which QEMU commits the nightly workflow tests: REF of REPO (default master) and the latest
# stable release tag (vX.Y.Z: no -rc), both found now with `git ls-remote`, the tag by a
# version sort. Prints the strategy matrix as a JSON list, e.g.
#   [{"name":"master","ref":"master","kind":"branch","commit":"<sha>"},
#    {"name":"v10.1.2","ref":"v10.1.2","kind":"tag","commit":"<sha>"}]
# and, under GitHub Actions, also writes `matrix=<that list>` to $GITHUB_OUTPUT.
# kind: branch (tracked between nightly runs, bisected when it turns red), tag, or commit
# (REF given as a full hash). REPO may be any git URL or a local path.
#   scripts/ci/qemu-refs.sh REPO [REF]
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: scripts/ci/qemu-refs.sh REPO [REF]" >&2; exit 2; fi
repo=$1
ref=${2:-master}
say() { echo "qemu-refs: $*" >&2; }

if ! [[ $ref =~ ^[A-Za-z0-9][A-Za-z0-9._/+-]*$ ]]; then
    say "ref '$ref' is not a branch, tag or commit name"; exit 2
fi
if ! refs=$(git ls-remote --heads --tags "$repo" 2>&1); then
    say "cannot list the refs of $repo: $(head -1 <<<"$refs")"; exit 1
fi

# the commit a ref names: a tag's peeled line ("^{}") wins over the tag object
commit_of() {
    awk -v r="$1" '$2 == r "^{}" { peeled = $1 } $2 == r { plain = $1 }
                   END { print (peeled != "" ? peeled : plain) }' <<<"$refs"
}

if [[ $ref =~ ^[0-9a-f]{40}$ ]]; then
    kind=commit; commit=$ref; name=${ref:0:12}
elif [ -n "$(commit_of "refs/heads/$ref")" ]; then
    kind=branch; commit=$(commit_of "refs/heads/$ref"); name=$ref
elif [ -n "$(commit_of "refs/tags/$ref")" ]; then
    kind=tag; commit=$(commit_of "refs/tags/$ref"); name=$ref
else
    say "$repo has no branch or tag '$ref'"; exit 1
fi

stable=$(awk '{ print $2 }' <<<"$refs" | sed -n 's|^refs/tags/\(v[0-9]*\.[0-9]*\.[0-9]*\)$|\1|p' \
    | sort -V | tail -1)
entry() { printf '{"name":"%s","ref":"%s","kind":"%s","commit":"%s"}' "$1" "$2" "$3" "$4"; }
matrix="[$(entry "$name" "$ref" "$kind" "$commit")"
if [ -z "$stable" ]; then
    say "$repo has no vX.Y.Z tag: testing $ref only"
elif [ "$stable" != "$ref" ]; then
    matrix+=",$(entry "$stable" "$stable" tag "$(commit_of "refs/tags/$stable")")"
fi
matrix+="]"
say "$ref is $kind $commit; latest stable tag: ${stable:-none}"
echo "$matrix"
if [ -n "${GITHUB_OUTPUT:-}" ]; then
    echo "matrix=$matrix" >> "$GITHUB_OUTPUT"
fi
