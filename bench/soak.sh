#!/usr/bin/env bash
# Soak: the whole box at a fixed rate for a set time — `clickgate run --ack disk` with
# Kafka (a real broker), Redis and the Parquet archive on — sampled once a second by
# clickgate-bench's soak mode: per stage the lag (Kafka forwarder, archive, Redis flush,
# store apply), RSS and CPU per thread group, during the load and after it until every
# stage caught up. Writes <out>/soak.{md,json,svg} and the load report.
#
#   bench/soak.sh [--events-per-sec 300000] [--duration 300s] [--connections 32]
#                 [--out bench/soak] [--catchup 120s]
#
# --events-per-sec 0 runs at full speed (closed loop). Needs a release build
# (cargo build --release -p clickgate -p clickgate-bench), a Kafka broker on
# $CLICKGATE_TEST_KAFKA (default 127.0.0.1:19092) and Redis on $CLICKGATE_TEST_REDIS
# (default redis://127.0.0.1:16379): scripts/services.sh starts both. Keys go under a
# fresh prefix and expire by their TTLs; the topic is new per run.
set -euo pipefail
cd "$(dirname "$0")/.."
EPS=300000
DURATION=300s
CONNS=32
CATCHUP=120s
OUT=bench/soak
BATCH=100
while [ $# -gt 0 ]; do
    case $1 in
    --events-per-sec) EPS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --catchup) CATCHUP=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
BROKERS=${CLICKGATE_TEST_KAFKA:-127.0.0.1:19092}
REDIS=${CLICKGATE_TEST_REDIS:-redis://127.0.0.1:16379}
CG=${CG:-target/release/clickgate}
BENCH=${BENCH:-target/release/clickgate-bench}
PIDS=()
# shellcheck source=bench/proc.sh
source bench/proc.sh
DIR=$(mktemp -d)
trap 'for p in "${PIDS[@]}"; do stop_pid "$p"; done; rm -rf "$DIR"' EXIT
mkdir -p "$OUT"
PORT=$(free_port 18580)
QPORT=$(free_port $((PORT + 1)))
RUN_ID=$(date +%s)
CLICKGATE_LOG=warn "$CG" run --data-dir "$DIR" --ingest-addr "127.0.0.1:$PORT" \
    --query-addr "127.0.0.1:$QPORT" --control-addr 127.0.0.1:0 --ack disk \
    --rate-limit-events-per-sec 100000000 --trusted-cidrs 127.0.0.0/8 \
    --kafka-brokers "$BROKERS" --kafka-topic "soak_$RUN_ID" \
    --redis-url "$REDIS" --redis-key-prefix "soak-$RUN_ID:" &
CG_PID=$!
PIDS+=("$CG_PID")
wait_port "$CG_PID" "$PORT" 60 || { echo "clickgate did not start" >&2; exit 1; }
wait_port "$CG_PID" "$QPORT" 30 || { echo "clickgate's query API did not start" >&2; exit 1; }
pid_of_port() { # the process listening on a TCP port (for its RSS / CPU), or nothing
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -oP 'pid=\K[0-9]+' | head -1
}
SOAK_PIDS="clickgate=$CG_PID"
RPORT=$(sed -E 's#.*:([0-9]+)/?$#\1#' <<<"$REDIS")
KPORT=${BROKERS##*:}
if p=$(pid_of_port "$RPORT"); [ -n "$p" ]; then SOAK_PIDS+=",redis=$p"; fi
if p=$(pid_of_port "$KPORT"); [ -n "$p" ]; then SOAK_PIDS+=",kafka-broker=$p"; fi
RATE_ARGS=()
if [ "$EPS" != 0 ]; then RATE_ARGS=(--rate "$((EPS / BATCH))"); fi
CMD=("$BENCH" --url "http://127.0.0.1:$PORT" --mode batch --batch-size "$BATCH"
    --connections "$CONNS" --threads 1 --pool 4096 --duration "$DURATION" --warmup 0s
    "${RATE_ARGS[@]}" --freshness-url "http://127.0.0.1:$QPORT" --label "soak ${EPS} ev/s"
    --soak-metrics "http://127.0.0.1:$PORT,http://127.0.0.1:$QPORT" --soak-pids "$SOAK_PIDS"
    --soak-catchup "$CATCHUP" --soak-json "$OUT/soak.json" --soak-table "$OUT/soak.md"
    --soak-svg "$OUT/soak.svg" --json "$OUT/load.json")
{
    echo "# $(date -u +%FT%TZ) $(nproc) vCPU$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
    echo "# bench/soak.sh --events-per-sec $EPS --duration $DURATION --connections $CONNS"
} | tee "$OUT/soak.txt"
nice -n 5 "${CMD[@]}" | tee -a "$OUT/soak.txt"
echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/soak.txt"
