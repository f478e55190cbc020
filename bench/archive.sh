#!/usr/bin/env bash
# Archive and billing bench: figures go to bench/ARCHIVE.md.
#
#   bench/archive.sh [EVENTS]                 default 2000000
#   BASE=<git rev> RUNS=5 bench/archive.sh [EVENTS]
#
# 1. cg-archive-bench generates a day of EVENTS raw records in memory (2% altered copies,
#    not timed), then times the real archiver writing them into a fresh directory:
#    rows/s per archiver thread, bytes per event, peak RSS.
# 2. `clickgate billing` bills that day under /usr/bin/time -v: events/s, peak RSS.
#
# With BASE, step 1 runs RUNS times alternating this tree's bench binary with the one
# built from BASE (a git worktree under $BENCH_WORK, same target directory), and prints
# each run, the medians and the ratio: on a shared, noisy box only alternated runs
# compare. Step 2 is skipped in that mode.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-2000000}
DAY=2026-11-27
WORK=${BENCH_WORK:-/tmp/clickgate-archive-bench}
TARGET=${CARGO_TARGET_DIR:-target}
NICE=${NICE:-nice -n 5}
rm -rf "$WORK/archive" "$WORK/out" "$WORK/data" && mkdir -p "$WORK"

rows_per_s() { sed -n 's/.* = \([0-9]*\) rows\/s.*/\1/p'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

if [ -n "${BASE:-}" ]; then
    RUNS=${RUNS:-5}
    cargo build --release --locked -p clickgate-controlplane --bin cg-archive-bench
    cp "$TARGET/release/cg-archive-bench" "$WORK/cg-archive-bench.head"
    rm -rf "$WORK/base-src"
    git worktree add --detach "$WORK/base-src" "$BASE" >/dev/null 2>&1 ||
        { git worktree prune; git worktree add --detach "$WORK/base-src" "$BASE" >/dev/null; }
    (cd "$WORK/base-src" && CARGO_TARGET_DIR="$(cd "$OLDPWD" && realpath "$TARGET")" \
        cargo build --release --locked -p clickgate-controlplane --bin cg-archive-bench)
    cp "$TARGET/release/cg-archive-bench" "$WORK/cg-archive-bench.base"
    git worktree remove --force "$WORK/base-src"
    : >"$WORK/head.txt"
    : >"$WORK/base.txt"
    for i in $(seq 1 "$RUNS"); do
        for which in base head; do
            rm -rf "$WORK/archive"
            line=$($NICE "$WORK/cg-archive-bench.$which" "$WORK/archive" "$EVENTS" "$DAY")
            echo "run $i $which: $line"
            echo "$line" | rows_per_s >>"$WORK/$which.txt"
        done
    done
    b=$(median <"$WORK/base.txt")
    h=$(median <"$WORK/head.txt")
    awk -v b="$b" -v h="$h" -v base="$BASE" -v n="$RUNS" \
        'BEGIN { printf "median of %d: base (%s) %.0f rows/s, head %.0f rows/s, head/base = %.2f\n", n, base, b, h, h / b }'
    exit 0
fi

cargo build --release --locked -p clickgate-controlplane --bin cg-archive-bench -p clickgate --bin clickgate
/usr/bin/time -v $NICE "$TARGET/release/cg-archive-bench" "$WORK/archive" "$EVENTS" "$DAY" 2>"$WORK/archive-time.txt"
grep -E "Maximum resident" "$WORK/archive-time.txt" | sed 's/^\s*/archive: /'
du -sb "$WORK/archive" | awk '{print "archive on disk: " $1 " bytes"}'
start=$(date +%s.%N)
/usr/bin/time -v $NICE "$TARGET/release/clickgate" billing --day "$DAY" --archive-url "$WORK/archive" \
    --data-dir "$WORK/data" --out "$WORK/out" --no-progress 2>"$WORK/time.txt"
end=$(date +%s.%N)
grep -E "Maximum resident|Elapsed" "$WORK/time.txt"
awk -v n="$EVENTS" -v s="$start" -v e="$end" 'BEGIN { printf "billing: %d rows in %.2f s = %.0f rows/s\n", n, e - s, n / (e - s) }'
wc -l "$WORK/out/invoices.csv"
