#!/usr/bin/env bash
# The main job on one box: `clickgate run` with embedded defaults (local log, in-process
# counter store), ten seconds of load from clickgate-bench, and the query API's numbers
# moving while it runs. Stops clickgate cleanly (SIGTERM) at the end.
#
#   DEMO_SECS=30 scripts/demo.sh      # longer load
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/host.sh
source scripts/host.sh
host_prepare

secs=${DEMO_SECS:-10}
data=${CLICKGATE_DATA_DIR:-./clickgate-data}
ingest=127.0.0.1:${DEMO_INGEST_PORT:-8080}

echo "== building (release)"
cargo build --release --locked -p clickgate -p clickgate-bench
bin=${CARGO_TARGET_DIR:-target}/release

echo "== starting clickgate run (data dir $data, ingest $ingest, query 127.0.0.1:8081)"
mkdir -p "$data"
rm -f "$data/run/query.addr" "$data/run/ingest.addr"
# The load generator sends far more than 1000 events/s from loopback: trust it, as a
# publisher network would be.
"$bin/clickgate" run --data-dir "$data" --ingest-addr "$ingest" \
    --trusted-cidrs 127.0.0.0/8 >"$data/clickgate.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
    [ -s "$data/run/ingest.addr" ] && [ -s "$data/run/query.addr" ] && break
    kill -0 $pid 2>/dev/null || { echo "clickgate failed to start:"; cat "$data/clickgate.log"; exit 1; }
    sleep 0.05
done
query=$(cat "$data/run/query.addr")

show() {
    local top
    top=$(curl -s "http://$query/v1/top?window=5m&n=3")
    echo "  top ads now: $top"
}

echo "== load: ${secs}s of 100-event batches (Zipf campaigns, 2% duplicates, 1% invalid lines)"
"$bin/clickgate-bench" --url "http://$ingest" --mode batch --batch-size 100 \
    --connections 16 --duration "${secs}s" --warmup 0s --dup-share 0.02 --invalid-share 0.01 -q \
    >"$data/bench.txt" &
bench=$!
while kill -0 $bench 2>/dev/null; do
    sleep 2
    show
done
wait $bench
cat "$data/bench.txt"
sleep 1
echo "== the query API (docs/api.md)"
show
now=$(( $(date +%s) * 1000 ))
echo "  campaign 1, 5m buckets of the last hour:"
curl -s "http://$query/v1/campaigns/1/metrics?window=5m&from=$((now - 3600000))&to=$((now + 1))"
echo
echo "== ingest metrics (excerpt)"
curl -s "http://$ingest/metrics" | grep -E '^clickgate_(ingest_events|ingest_requests|dedup_memory)' | head -12 || true
echo "== stopping (SIGTERM: drain, flush, exit 0); logs in $data/clickgate.log"
kill -TERM $pid
wait $pid
trap - EXIT
echo "clickgate stopped cleanly"
