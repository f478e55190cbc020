#!/usr/bin/env bash
# Billing side by side: `clickgate billing` (every rule kind) vs DuckDB (the plain
# dedup-and-invoice query) on the same archive and day; figures go to bench/BILLING.md.
#
# usage: bench/billing.sh [options]
#   --events N        events to ingest (default 4000000)
#   --source S        ingest: `clickgate run` fed over HTTP by clickgate-bench (the real
#                     ingest path; the day billed is today, UTC) | archiver: the real
#                     archiver fed in memory by cg-archive-bench (day 2026-11-27)
#                     (default ingest)
#   --rounds N        alternating rounds (default 5)
#   --memory-mib M    clickgate billing --memory-mib (default 1024)
#   --work DIR        scratch directory (default /tmp/clickgate-billing-bench)
#   --reuse           bill the archive already in --work (no generation)
#   --no-build        use the binaries already in target/release
# Environment: PYTHON — a Python with duckdb (default: a venv under --work, created
# with `pip install duckdb` when missing).
#
# Each round runs clickgate then DuckDB (odd rounds) or DuckDB then clickgate (even
# rounds) under /usr/bin/time; the page quotes medians, the ratio of the medians and
# the load average (the box is shared). Rows/s = Parquet rows read (the day and the
# neighbouring hour each side, as both engines read them) / wall seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=4000000
SOURCE=ingest
ROUNDS=5
MEMORY_MIB=1024
WORK=/tmp/clickgate-billing-bench
REUSE=
NO_BUILD=
die() { echo "billing.sh: error: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --events) EVENTS=$2; shift 2 ;;
        --source) SOURCE=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --memory-mib) MEMORY_MIB=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --reuse) REUSE=1; shift ;;
        --no-build) NO_BUILD=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $EVENTS =~ ^[1-9][0-9]*$ ]] || die "--events must be a positive integer"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
[[ $SOURCE == ingest || $SOURCE == archiver ]] || die "--source must be ingest or archiver"
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/clickgate
mkdir -p "$WORK"

if [[ -z $NO_BUILD ]]; then
    cargo build --release --locked -p clickgate --bin clickgate \
        -p clickgate-bench --bin clickgate-bench -p clickgate-controlplane --bin cg-archive-bench
fi

PY=${PYTHON:-}
if [[ -z $PY ]]; then
    PY=$WORK/venv/bin/python
    if ! "$PY" -c 'import duckdb' 2>/dev/null; then
        python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q duckdb ||
            die "pip install duckdb failed"
    fi
fi
"$PY" -c 'import duckdb' || die "$PY has no duckdb"

# Every rule kind; the model reads the exact per-minute count among its features.
cat >"$WORK/rules.json" <<'EOF'
{"rules":[
  {"id":"blocklist","kind":"ip_block","cidrs":["198.18.0.0/24","203.0.113.0/24","2001:db8::/32"]},
  {"id":"bots","kind":"user_agent","patterns":["bot","crawler","HeadlessChrome"]},
  {"id":"honeypots","kind":"honeypot","ad_ids":[100,201,302,403,504]},
  {"id":"burst","kind":"ip_rate","max_clicks_per_minute":100},
  {"id":"risk","kind":"risk_model","threshold":0.9,"model":{"bias":-6.0,
    "weights":{"cost_units":2.0,"ip_rate":0.05,"ua_device_mismatch":1.5,"hour_night":0.5,
               "country_mismatch":2.0,"device_other":0.5},
    "geo":{"US":["10.0.0.0/9"],"DE":["10.128.0.0/9"]}}}
]}
EOF

if [[ -z $REUSE ]]; then
    rm -rf "$WORK/data" "$WORK/archive"
    if [[ $SOURCE == archiver ]]; then
        DAY=2026-11-27
        "$TARGET/release/cg-archive-bench" "$WORK/archive" "$EVENTS" "$DAY"
        mkdir -p "$WORK/data"
    else
        DAY=$(date -u +%F)
        # Stay clear of midnight: the events carry the time they are sent.
        now=$(date -u +%s); left=$(( 86400 - now % 86400 ))
        (( left > 900 )) || die "less than 15 minutes to midnight UTC; run later"
        mkdir -p "$WORK/data"
        "$BIN" run --data-dir "$WORK/data" --ingest-addr 127.0.0.1:0 --query-addr 127.0.0.1:0 \
            --control-addr 127.0.0.1:0 --trusted-cidrs 127.0.0.0/8 --archive-roll-secs 5 \
            >"$WORK/run.log" 2>&1 &
        pid=$!
        trap 'kill $pid 2>/dev/null || true' EXIT
        for _ in $(seq 600); do
            [[ -s $WORK/data/run/ingest.addr ]] && break
            sleep 0.1
        done
        [[ -s $WORK/data/run/ingest.addr ]] || die "clickgate run did not start (see $WORK/run.log)"
        addr=$(cat "$WORK/data/run/ingest.addr")
        # Open loop: EVENTS in about EVENTS / 200k seconds, 100 events per request.
        secs=$(( EVENTS / 200000 + 1 ))
        rate=$(( EVENTS / 100 / secs + 1 ))
        "$TARGET/release/clickgate-bench" --url "http://$addr" --mode batch --batch-size 100 \
            --connections 16 --threads 1 --rate "$rate" --warmup 0s --duration "${secs}s" \
            --dup-share 0.02 --bot-share 0.01 --burst-ips 64 --burst-share 0.01 \
            --late-share 0.01 --quiet >"$WORK/load.txt"
        tail -5 "$WORK/load.txt"
        kill -TERM $pid
        wait $pid || die "clickgate run did not stop cleanly (see $WORK/run.log)"
        trap - EXIT
        mv "$WORK/data/archive" "$WORK/archive"
    fi
    echo "$DAY" >"$WORK/day"
fi
DAY=$(cat "$WORK/day")
du -sb "$WORK/archive" | awk '{print "archive on disk: " $1 " bytes"}'

# DuckDB: the same hour partitions, the plain query a user writes first.
cat >"$WORK/duck.py" <<'EOF'
import datetime, glob, os, sys, duckdb
archive, day, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
files = []
for h in range(-1, 25):
    t = start + datetime.timedelta(hours=h)
    files += sorted(glob.glob(f"{archive}/year={t:%Y}/month={t:%m}/day={t:%d}/hour={t:%H}/*.parquet"))
end = start + datetime.timedelta(days=1)
con = duckdb.connect()
rows = con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
res = con.execute("""
    SELECT advertiser_id, campaign_id, count(*) AS clicks, sum(cost_micros) AS cost_micros
    FROM (SELECT advertiser_id, campaign_id, cost_micros, ts FROM read_parquet(?)
          QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY recv_ts, source, lsn) = 1)
    WHERE ts >= ? AND ts < ?
    GROUP BY ALL ORDER BY 1, 2""", [files, start, end]).fetchall()
with open(out, "w") as f:
    f.write("advertiser_id,campaign_id,clicks,cost_micros\n")
    f.writelines(f"{a},{c},{n},{s}\n" for a, c, n, s in res)
print(f"duckdb: {rows} rows read")
EOF

# Sanity: without rules clickgate's invoice equals DuckDB's (same semantics).
echo '{"rules":[]}' >"$WORK/norules.json"
"$BIN" billing --day "$DAY" --archive-url "$WORK/archive" --data-dir "$WORK/data" \
    --out "$WORK/out-norules" --rules "$WORK/norules.json" --memory-mib "$MEMORY_MIB" --no-progress
"$PY" "$WORK/duck.py" "$WORK/archive" "$DAY" "$WORK/duck-invoices.csv"
cmp "$WORK/out-norules/invoices.csv" "$WORK/duck-invoices.csv" ||
    die "without rules, clickgate's and DuckDB's invoices differ"
echo "without rules: clickgate and DuckDB invoices identical ($(wc -l <"$WORK/duck-invoices.csv") lines)"

ROWS=$("$BIN" billing --day "$DAY" --archive-url "$WORK/archive" --data-dir "$WORK/data" \
    --out "$WORK/out" --rules "$WORK/rules.json" --memory-mib "$MEMORY_MIB" --no-progress |
    tee /dev/stderr | sed -n 's/.* \([0-9]*\) rows read.*/\1/p')
[[ -n $ROWS ]] || die "no row count from clickgate billing"

run_cg() {
    /usr/bin/time -f "%e %M" -o "$WORK/t" "$BIN" billing --day "$DAY" --archive-url "$WORK/archive" \
        --data-dir "$WORK/data" --out "$WORK/out" --rules "$WORK/rules.json" \
        --memory-mib "$MEMORY_MIB" --no-progress >/dev/null
    echo "clickgate $(cat "$WORK/t")" >>"$WORK/results.txt"
}
run_duck() {
    /usr/bin/time -f "%e %M" -o "$WORK/t" "$PY" "$WORK/duck.py" "$WORK/archive" "$DAY" \
        "$WORK/duck-invoices.csv" >/dev/null
    echo "duckdb $(cat "$WORK/t")" >>"$WORK/results.txt"
}
: >"$WORK/results.txt"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then run_cg; run_duck; else run_duck; run_cg; fi
    echo "round $r: $(tail -2 "$WORK/results.txt" | tr '\n' ' ') load $(cut -d' ' -f1 /proc/loadavg)"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
awk -v rows="$ROWS" -v mem="$MEMORY_MIB" '
    { wall[$1] = wall[$1] " " $2; rss[$1] = rss[$1] " " $3 }
    function median(s,   a, n, i, j, t) {
        n = split(s, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
        cw = median(wall["clickgate"]); dw = median(wall["duckdb"])
        printf "rows read: %d\n", rows
        printf "clickgate billing (all rule kinds): median %.2f s = %.0f rows/s, peak RSS median %.0f MiB (setting %d MiB)\n", cw, rows / cw, median(rss["clickgate"]) / 1024, mem
        printf "duckdb (plain dedup + invoice):     median %.2f s = %.0f rows/s, peak RSS median %.0f MiB\n", dw, rows / dw, median(rss["duckdb"]) / 1024
        printf "ratio clickgate / duckdb rows/s: %.2fx\n", dw / cw
    }' "$WORK/results.txt"
