#!/usr/bin/env bash
# Archive and billing bench (issue #7): figures go to bench/ARCHIVE.md.
#
#   bench/archive.sh [EVENTS]          default 2000000
#
# 1. cg-archive-bench writes a generated day of EVENTS raw records (2% altered copies)
#    through the real archiver into a fresh directory: rows/s, bytes per event.
# 2. `clickgate billing` bills that day under /usr/bin/time -v: events/s, peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-2000000}
DAY=2026-11-27
WORK=${BENCH_WORK:-/tmp/clickgate-archive-bench}
rm -rf "$WORK" && mkdir -p "$WORK"
cargo build --release -p clickgate-controlplane --bin cg-archive-bench -p clickgate --bin clickgate
target/release/cg-archive-bench "$WORK/archive" "$EVENTS" "$DAY"
du -sb "$WORK/archive" | awk '{print "archive on disk: " $1 " bytes"}'
start=$(date +%s.%N)
/usr/bin/time -v target/release/clickgate billing --day "$DAY" --archive-url "$WORK/archive" \
    --data-dir "$WORK/data" --out "$WORK/out" --no-progress 2>"$WORK/time.txt"
end=$(date +%s.%N)
grep -E "Maximum resident|Elapsed" "$WORK/time.txt"
awk -v n="$EVENTS" -v s="$start" -v e="$end" 'BEGIN { printf "billing: %d rows in %.2f s = %.0f rows/s\n", n, e - s, n / (e - s) }'
wc -l "$WORK/out/invoices.csv"
