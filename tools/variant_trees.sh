#!/usr/bin/env bash
# Trees for an A/B on the device (tools/run_h200.sh's BASE and TREES): `_base`, the tree of BASE
# (default HEAD), and for each COMMIT a tree `_v_<short sha>`, BASE with that commit's own change
# applied (its diff against its parent, not its branch's history), or for a PATCH file (a
# variant kept in docs/results: branches do not outlive a session's checkout) a tree
# `_p_<file name without .patch>`, BASE with it applied; each without docs/results.
# They are listed in .git/info/exclude here, so a device run carries them by name; the line to
# pass as TREES and the carry list are printed last.
# usage: tools/variant_trees.sh [-b BASE] [COMMIT_OR_PATCH...] (none: `_base` alone)
set -euo pipefail
base=HEAD
if [ "${1:-}" = "-b" ]; then base=$2; shift 2; fi
cd "$(git rev-parse --show-toplevel)"
tree() {  # tree DIR: BASE's files in DIR, docs/results left out, DIR excluded from git
  rm -rf "$1" && mkdir "$1" && git archive "$base" | tar -x -C "$1" && rm -rf "$1/docs/results"
  grep -qx "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >> .git/info/exclude; }
tree _base
names=(_base)
for c in "$@"; do
  if [ -f "$c" ]; then
    name=_p_$(basename "$c" .patch)
    tree "$name"
    git apply --directory="$name" --unsafe-paths --exclude='docs/results/*' "$c"
    echo "$name: $c"
  else
    name=_v_$(git rev-parse --short "$c")
    tree "$name"
    git diff "$c^" "$c" -- . ':!docs/results' | git apply --directory="$name" --unsafe-paths
    echo "$name: $(git log -1 --format=%s "$c" | cut -c1-90)"
  fi
  names+=("$name")
done
echo "TREES=\"${names[*]}\""
printf 'carry: [".whl"'; printf ', "%s"' "${names[@]}"; echo ']'
