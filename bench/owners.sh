#!/bin/sh
# The cost of noting campaign owners in Aggregator::add (bench/DASHBOARD.md): runs the
# `aggregate` criterion bench on this tree and on a throw-away worktree of HEAD without the
# owner lines, alternating, for ROUNDS rounds (default 2). Usage: bench/owners.sh [ROUNDS]
set -eu
cd "$(dirname "$0")/.."
root=$(pwd)
base=$(mktemp -d /tmp/cg-noowners.XXXXXX)
trap 'git -C "$root" worktree remove --force "$base"' EXIT
git worktree add -q --detach "$base" HEAD
python3 - "$base/core/src/agg.rs" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
start = s.index("        // `Dim::All` goes first, so if it created a key")
end = s.index("        }\n    }\n", start) + len("        }\n")
open(p, "w").write(s[:start] + "        let _ = keys_before;\n" + s[end:])
PY
for round in $(seq 1 "${1:-2}"); do
  for tree in "$base" "$root"; do
    echo "== $tree round $round"
    (cd "$tree" && CARGO_TARGET_DIR="$root/target/bench-owners" cargo bench -q -p clickgate-bench \
      --bench aggregate -- --warm-up-time 1 --measurement-time 4 'add_1m_then_drain|add_100k_then_drain' 2>&1 |
      grep -E "^aggregate|time:|thrpt:")
  done
done
