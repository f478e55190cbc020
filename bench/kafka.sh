#!/usr/bin/env bash
# Kafka mode side by side: events/s and 202 latency into the local log (ack memory/disk,
# no Kafka) vs through the Kafka forwarder (ack disk/kafka), the broker on the same box.
#
#   bench/kafka.sh [--duration 10s] [--brokers 127.0.0.1:19092]
#
# Needs a release build (cargo build --release -p clickgate -p clickgate-bench) and a
# broker (scripts/services.sh start_kafka). Prints one line per mode; bench/KAFKA.md
# holds the figures and the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=10s
BROKERS=${CLICKGATE_TEST_KAFKA:-127.0.0.1:19092}
while [ $# -gt 0 ]; do
    case $1 in
    --duration) DURATION=$2; shift 2 ;;
    --brokers) BROKERS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PIDS=()
# shellcheck source=bench/proc.sh
source bench/proc.sh
trap 'for p in "${PIDS[@]}"; do stop_pid "$p"; done' EXIT
CG=${CG:-target/release/clickgate}
BENCH=${BENCH:-target/release/clickgate-bench}

run_mode() { # label ack kafka(yes|no) load-args...
    local label=$1 ack=$2 kafka=$3
    shift 3
    local dir port
    dir=$(mktemp -d)
    port=$(free_port 18480)
    local args=(dataplane --data-dir "$dir" --ingest-addr "127.0.0.1:$port" --cores 1 --ack "$ack"
        --rate-limit-events-per-sec 100000000)
    if [ "$kafka" = yes ]; then
        args+=(--kafka-brokers "$BROKERS" --kafka-topic "bench_$(date +%s%N)")
    fi
    CLICKGATE_LOG=warn "$CG" "${args[@]}" &
    PIDS+=($!)
    local pid=$!
    wait_port "$pid" "$port" 30 || { echo "clickgate ($label) did not start" >&2; exit 1; }
    local out
    out=$("$BENCH" --url "http://127.0.0.1:$port" --duration "$DURATION" --warmup 2s "$@" 2>&1)
    local eps p99
    eps=$(grep -m1 '^events ' <<<"$out" | awk '{print $(NF-1)}')
    p99=$(grep -m1 -oP 'p99 \K[0-9.]+' <<<"$out" || echo "?")
    local lag=""
    if [ "$kafka" = yes ]; then
        sleep 2
        lag=$(curl -s "127.0.0.1:$port/metrics" | grep -E '^clickgate_kafka_delivered_records_total' | awk '{print "delivered="$2}')
    fi
    printf '%-28s %-8s %12s events/s   p99 %10s µs   %s\n' "$label" "$ack" "$eps" "$p99" "$lag"
    stop_pid "$pid"
    rm -rf "$dir"
}

echo "# $(date -u +%FT%TZ) $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) load $(cut -d' ' -f1 /proc/loadavg)"
echo "# duration $DURATION, broker $BROKERS on this box, 1 dataplane core"
# Saturation (closed loop), then latency below saturation (open loop, 1000 requests/s).
for load in "--mode batch --batch-size 100 --connections 16" "--mode single --connections 32" \
    "--mode single --connections 16 --rate 1000"; do
    echo "## load: $load"
    # shellcheck disable=SC2086
    run_mode "local log" memory no $load
    # shellcheck disable=SC2086
    run_mode "local log" disk no $load
    # shellcheck disable=SC2086
    run_mode "local log + kafka forwarder" disk yes $load
    # shellcheck disable=SC2086
    run_mode "kafka (202 after broker ack)" kafka yes $load
done
