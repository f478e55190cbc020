#!/usr/bin/env bash
# Side-by-side load comparison on this box: clickgate vs nginx answering a static 202
# (and optionally vs clickgate built from an older git revision), same load from
# clickgate-bench, runs alternating between the targets, N rounds per scenario.
#
# usage: bench/compare.sh [options] [-- extra clickgate-bench args]
#   --rounds N            rounds per scenario (default 3)
#   --duration D          measured time per run (default 10s)
#   --warmup D            warm-up per run (default 2s)
#   --connections N       connections (default 64)
#   --scenarios LIST      comma-separated: single,batch (default both)
#   --batch-size N        events per batch request (default 100)
#   --targets LIST        comma-separated: nginx,clickgate (default both)
#   --baseline-rev REV    also build REV's clickgate (worktree under target/bench/) and
#                         compare the current tree against it (regression ratio)
#   --cores N             dataplane cores = nginx workers (default: all online CPUs)
#   --out DIR             where the JSON reports go (default target/bench/<timestamp>)
#   --no-build            use the binaries already in target/release (no cargo build)
# Environment:
#   CLICKGATE_ARGS        extra flags for `clickgate run` (default: trusts 127.0.0.0/8 so the
#                         per-address rate limit does not turn the load into 429s, and binds
#                         the query/control APIs to free loopback ports)
#
# Every run is bounded by its duration; everything started here is killed on exit.
set -euo pipefail

ROUNDS=3
DURATION=10s
WARMUP=2s
CONNECTIONS=64
SCENARIOS=single,batch
BATCH_SIZE=100
TARGETS=nginx,clickgate
BASELINE_REV=
CORES=$(nproc)
OUT=
NO_BUILD=
EXTRA=()

die() { echo "compare.sh: error: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --batch-size) BATCH_SIZE=$2; shift 2 ;;
        --targets) TARGETS=$2; shift 2 ;;
        --baseline-rev) BASELINE_REV=$2; shift 2 ;;
        --cores) CORES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) NO_BUILD=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
OUT=${OUT:-target/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CLICKGATE_ARGS=${CLICKGATE_ARGS:---trusted-cidrs 127.0.0.0/8 --query-addr 127.0.0.1:0 --control-addr 127.0.0.1:0}

IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"
has_target() { local t; for t in "${TARGET_LIST[@]}"; do [[ $t == "$1" ]] && return 0; done; return 1; }
if [[ -n $BASELINE_REV ]] && ! has_target clickgate; then
    die "--baseline-rev compares against the current clickgate: keep clickgate in --targets"
fi

# --- cleanup: kill what we started, by pid -------------------------------------------
PIDS=()
WORKTREE=
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    if [[ -n $WORKTREE && -d $WORKTREE ]]; then
        git worktree remove --force "$WORKTREE" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/proc.sh
source "$ROOT/bench/proc.sh"

# --- tools ---------------------------------------------------------------------------
NGINX=
if has_target nginx; then
    NGINX=$(command -v nginx || true)
    [[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    if [[ -z $NGINX ]]; then
        echo "== installing nginx from Debian" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y nginx-light >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y nginx-light >/dev/null 2>&1; } \
            || apt-get install -y nginx >/dev/null \
            || die "could not install nginx"
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    fi
fi

BENCH=$ROOT/target/release/clickgate-bench
if [[ -z $NO_BUILD ]]; then
    echo "== building clickgate-bench (release)" >&2
    cargo build --release -p clickgate-bench >&2 || die "clickgate-bench did not build"
fi
[[ -x $BENCH ]] || die "no $BENCH (build it, or drop --no-build)"

CLICKGATE_BIN=
if has_target clickgate; then
    CLICKGATE_BIN=$ROOT/target/release/clickgate
    if [[ -z $NO_BUILD ]]; then
        echo "== building clickgate (release)" >&2
        if ! cargo build --release -p clickgate --bin clickgate >&2; then
            die "clickgate did not build; compare nginx alone with --targets nginx"
        fi
    fi
    [[ -x $CLICKGATE_BIN ]] || die "no $CLICKGATE_BIN (build it, or drop --no-build)"
fi

BASELINE_BIN=
if [[ -n $BASELINE_REV ]]; then
    sha=$(git rev-parse --verify "$BASELINE_REV^{commit}") || die "no such revision: $BASELINE_REV"
    WORKTREE=$ROOT/target/bench/worktree-${sha:0:12}
    rm -rf "$WORKTREE"
    git worktree prune
    git worktree add --detach "$WORKTREE" "$sha" >&2
    echo "== building clickgate at ${sha:0:12} (release, target/bench/baseline-target)" >&2
    (cd "$WORKTREE" && CARGO_TARGET_DIR=$ROOT/target/bench/baseline-target \
        cargo build --release -p clickgate --bin clickgate >&2) \
        || die "clickgate at $BASELINE_REV did not build"
    BASELINE_BIN=$ROOT/target/bench/baseline-target/release/clickgate
    TARGET_LIST+=(baseline)
fi

# --- one target up, one run, target down ---------------------------------------------
SERVER_PID=
SERVER_PORT=
start_nginx() {
    local prefix=$OUT/nginx
    mkdir -p "$prefix"
    SERVER_PORT=$(free_port 18080)
    sed -e "s/@PORT@/$SERVER_PORT/" -e "s/@WORKERS@/$CORES/" -e "s#@PREFIX@#$prefix#" \
        bench/nginx/nginx.conf >"$prefix/nginx.conf"
    "$NGINX" -p "$prefix" -c "$prefix/nginx.conf" >"$prefix/stdout.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$SERVER_PID" "$SERVER_PORT" 10 \
        || die "nginx did not start; see $prefix/error.log and $prefix/stdout.log"
}
start_clickgate() { # binary label
    local bin=$1 label=$2 data log
    data=$(mktemp -d "${TMPDIR:-/tmp}/clickgate-bench.XXXXXX")
    log=$OUT/$label-$RUN_ID.log
    SERVER_PORT=$(free_port 18180)
    # shellcheck disable=SC2086 # CLICKGATE_ARGS is a flag list
    (
        ulimit -l unlimited 2>/dev/null || echo "compare.sh: warning: cannot raise the locked-memory limit" >&2
        exec "$bin" run --data-dir "$data" --ingest-addr "127.0.0.1:$SERVER_PORT" --cores "$CORES" $CLICKGATE_ARGS
    ) >"$log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    DATA_DIRS+=("$data")
    if ! wait_port "$SERVER_PID" "$SERVER_PORT" 30; then
        echo "---- $log" >&2
        tail -n 20 "$log" >&2 || true
        die "$label did not start listening on 127.0.0.1:$SERVER_PORT (is \`clickgate run\` ready yet?)"
    fi
}
DATA_DIRS=()

# Prints: req_per_s events_per_s p99_us non202 conn_errors
summarize() {
    local j=$1 rps eps p99 st non202 cerr
    rps=$(grep -o '"req_per_s":[0-9.eE+-]*' "$j" | cut -d: -f2)
    eps=$(grep -o '"events_per_s":[0-9.eE+-]*' "$j" | cut -d: -f2)
    p99=$(grep -o '"p99":[0-9.eE+-]*' "$j" | cut -d: -f2)
    st=$(grep -o '"status":{[^}]*}' "$j" || true)
    non202=$(echo "$st" | grep -o '"[0-9]*":[0-9]*' | awk -F'[":]+' '$2 != "202" { s += $3 } END { print s + 0 }')
    cerr=$(grep -o '"connection_errors":[0-9]*' "$j" | cut -d: -f2)
    echo "$rps $eps $p99 $non202 $cerr"
}

RESULTS=$OUT/results.tsv
: >"$RESULTS"
run_one() { # scenario target round
    local scenario=$1 target=$2 round=$3 json args
    RUN_ID=$scenario-r$round
    case $target in
        nginx) start_nginx ;;
        clickgate) start_clickgate "$CLICKGATE_BIN" clickgate ;;
        baseline) start_clickgate "$BASELINE_BIN" baseline ;;
    esac
    json=$OUT/$scenario-$target-r$round.json
    args=(--url "http://127.0.0.1:$SERVER_PORT" --connections "$CONNECTIONS"
        --duration "$DURATION" --warmup "$WARMUP" --label "$target" --json "$json" --quiet)
    case $scenario in
        single) args+=(--mode single) ;;
        batch) args+=(--mode batch --batch-size "$BATCH_SIZE") ;;
        *) die "unknown scenario $scenario" ;;
    esac
    if ! "$BENCH" "${args[@]}" "${EXTRA[@]}" >"$OUT/$scenario-$target-r$round.txt"; then
        cat "$OUT/$scenario-$target-r$round.txt" >&2
        echo "compare.sh: warning: $target run failed ($scenario, round $round)" >&2
    fi
    stop_pid "$SERVER_PID"
    if [[ -f $json ]]; then
        read -r rps eps p99 non202 cerr < <(summarize "$json")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$target" "$round" \
            "$rps" "$eps" "$p99" "$non202" "$cerr" >>"$RESULTS"
        printf '   %-8s %-10s round %s: %12.0f req/s %14.0f events/s  p99 %8.0f µs  non-202 %s  conn-err %s\n' \
            "$scenario" "$target" "$round" "$rps" "$eps" "$p99" "$non202" "$cerr" >&2
    fi
}

echo "== machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r)" >&2
echo "== $ROUNDS round(s) x {${SCENARIO_LIST[*]}} x {${TARGET_LIST[*]}}, $CONNECTIONS connections, $DURATION (+$WARMUP warm-up) each; reports in $OUT" >&2
for scenario in "${SCENARIO_LIST[@]}"; do
    for round in $(seq "$ROUNDS"); do
        # Alternate the order between rounds so neither target always goes first.
        order=("${TARGET_LIST[@]}")
        if ((round % 2 == 0)); then
            rev=()
            for ((i = ${#order[@]} - 1; i >= 0; i--)); do rev+=("${order[i]}"); done
            order=("${rev[@]}")
        fi
        for target in "${order[@]}"; do
            run_one "$scenario" "$target" "$round"
        done
    done
done
for d in "${DATA_DIRS[@]}"; do rm -rf "$d"; done

# --- table -----------------------------------------------------------------------------
{
    echo
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); server cores $CORES; $CONNECTIONS connections; $DURATION per run"
    printf '%-8s %-10s %5s %12s %14s %10s %8s %8s\n' scenario target round 'req/s' 'events/s' 'p99 µs' non-202 conn-err
    sort -t$'\t' -k1,1 -k2,2 -k3,3n "$RESULTS" | awk -F'\t' '{ printf "%-8s %-10s %5s %12.0f %14.0f %10.0f %8s %8s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
    ratio() { # scenario numerator denominator column name
        awk -F'\t' -v s="$1" -v a="$2" -v b="$3" -v c="$4" -v name="$5" '
            $1 == s && $2 == a { num[$3] = $c }
            $1 == s && $2 == b { den[$3] = $c }
            END {
                n = 0
                for (r in num) if ((r in den) && den[r] > 0) v[++n] = num[r] / den[r]
                if (n == 0) exit
                for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
                med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
                printf "%-8s %-22s %-9s min %6.3f  median %6.3f  max %6.3f  (%d rounds)\n", s, a "/" b, name, v[1], med, v[n], n
            }' "$RESULTS"
    }
    echo
    echo "ratios per round (paired runs):"
    for scenario in "${SCENARIO_LIST[@]}"; do
        if has_target nginx && has_target clickgate; then
            ratio "$scenario" clickgate nginx 4 req/s
            ratio "$scenario" clickgate nginx 5 events/s
            ratio "$scenario" clickgate nginx 6 p99
        fi
        if [[ -n $BASELINE_REV ]]; then
            ratio "$scenario" clickgate baseline 4 req/s
            ratio "$scenario" clickgate baseline 6 p99
        fi
    done
} | tee "$OUT/summary.txt"
