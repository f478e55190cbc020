# The real services the tests need, installed and started once per run (sourced, not run).
#
#   Kafka  tansu 0.6.0 (a Kafka-protocol broker, built from crates.io once into $CLICKGATE_TOOLS)
#          on 127.0.0.1:${CLICKGATE_TEST_KAFKA_PORT:-19092}, in-memory storage
#   Redis  Debian's redis-server: one node on ${CLICKGATE_TEST_REDIS_PORT:-16379} and a
#          three-node cluster on 17000-17002, no persistence
#   S3     moto's server mode (PyPI `moto[server]`, in a venv under $CLICKGATE_TOOLS) on
#          127.0.0.1:${CLICKGATE_TEST_S3_PORT:-19000}, in-memory, any credentials accepted
#   tools  pyarrow (independent Parquet reader), protobuf + grpcio-tools (a stock protobuf
#          runtime and protoc, to read raw_clicks), pyspark + Java (the billing Spark job),
#          xgboost + numpy (trains the models the tree-scoring test compares against),
#          promtool, systemd-analyze, Chromium + playwright-core, libfaketime (steps
#          the wall clock of a process under test), socat (a TLS endpoint in front of
#          the broker)
#
# Each service is started only if its port does not answer already, so a developer's
# running services are reused. The tests read the addresses from the CLICKGATE_TEST_*
# variables exported here and fail (never skip) when one is missing.

CLICKGATE_TOOLS=${CLICKGATE_TOOLS:-$HOME/.cache/clickgate-tools}
SERVICES_DIR=${SERVICES_DIR:-/tmp/clickgate-services}
export CLICKGATE_TOOLS

svc_log() { echo "services: $*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 what=$2 i
    for i in $(seq 1 300); do
        port_open "$port" && return 0
        sleep 0.2
    done
    echo "error: $what did not open 127.0.0.1:$port within 60 s (log under $SERVICES_DIR)" >&2
    exit 1
}

apt_install() {
    command -v apt-get >/dev/null || { echo "error: apt-get not found; install $* by hand" >&2; exit 1; }
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    svc_log "installing $* from Debian"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$SERVICES_DIR/apt.log" 2>&1 ||
        { $sudo apt-get update -q >/dev/null 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$SERVICES_DIR/apt.log" 2>&1; } ||
        { echo "error: apt-get install $* failed; see $SERVICES_DIR/apt.log" >&2; exit 1; }
}

ensure_redis() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
    export CLICKGATE_TEST_REDIS_SERVER
    CLICKGATE_TEST_REDIS_SERVER=$(command -v redis-server)
}

start_redis_node() {
    local port=$1 extra=("${@:2}")
    if ! port_open "$port"; then
        # A fresh node: no cluster state left over from an earlier run (a node that
        # remembers an old cluster refuses to join a new one).
        rm -rf "$SERVICES_DIR/redis-$port"
        mkdir -p "$SERVICES_DIR/redis-$port"
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --dir "$SERVICES_DIR/redis-$port" --daemonize yes \
            --logfile "$SERVICES_DIR/redis-$port/redis.log" "${extra[@]}" >/dev/null
        wait_port "$port" "redis-server"
    fi
}

start_redis() {
    ensure_redis
    local port=${CLICKGATE_TEST_REDIS_PORT:-16379}
    start_redis_node "$port"
    export CLICKGATE_TEST_REDIS="redis://127.0.0.1:$port"
    local p
    for p in 17000 17001 17002; do
        start_redis_node "$p" --cluster-enabled yes --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 5000
    done
    if ! redis-cli -p 17000 cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
        redis-cli --cluster create 127.0.0.1:17000 127.0.0.1:17001 127.0.0.1:17002 \
            --cluster-replicas 0 --cluster-yes >"$SERVICES_DIR/redis-cluster-create.log" 2>&1 ||
            { echo "error: redis cluster create failed; see $SERVICES_DIR/redis-cluster-create.log" >&2; exit 1; }
        local i
        for i in $(seq 1 100); do
            redis-cli -p 17000 cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
            sleep 0.2
        done
    fi
    export CLICKGATE_TEST_REDIS_CLUSTER="redis://127.0.0.1:17000,redis://127.0.0.1:17001,redis://127.0.0.1:17002"
    svc_log "redis $CLICKGATE_TEST_REDIS, cluster $CLICKGATE_TEST_REDIS_CLUSTER"
}

ensure_tansu() {
    export CLICKGATE_TEST_TANSU="$CLICKGATE_TOOLS/bin/tansu"
    if [ ! -x "$CLICKGATE_TEST_TANSU" ]; then
        svc_log "building tansu 0.6.0 into $CLICKGATE_TOOLS (once; ~18 min on 2 cores)"
        command -v cmake >/dev/null || apt_install cmake
        cargo install tansu --version 0.6.0 --locked --features dynostore,libsql \
            --root "$CLICKGATE_TOOLS" >"$SERVICES_DIR/tansu-install.log" 2>&1 ||
            { echo "error: cargo install tansu failed; see $SERVICES_DIR/tansu-install.log" >&2; exit 1; }
    fi
}

start_kafka() {
    ensure_tansu
    local port=${CLICKGATE_TEST_KAFKA_PORT:-19092}
    if ! port_open "$port"; then
        mkdir -p "$SERVICES_DIR/tansu"
        (cd "$SERVICES_DIR/tansu" && nohup "$CLICKGATE_TEST_TANSU" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine memory://tansu/ >"$SERVICES_DIR/tansu/broker.log" 2>&1 &)
        wait_port "$port" "tansu broker"
    fi
    export CLICKGATE_TEST_KAFKA="127.0.0.1:$port"
    svc_log "kafka (tansu) $CLICKGATE_TEST_KAFKA"
}

ensure_pyarrow() {
    local venv="$CLICKGATE_TOOLS/pyenv"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pyarrow, google.protobuf, grpc_tools.protoc' 2>/dev/null; then
        svc_log "installing pyarrow, protobuf and grpcio-tools from PyPI into $venv"
        { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } &&
            timeout 900 "$venv/bin/pip" install -q pyarrow protobuf grpcio-tools >"$SERVICES_DIR/pip.log" 2>&1 ||
            { echo "error: pip install pyarrow protobuf grpcio-tools failed; see $SERVICES_DIR/pip.log" >&2; exit 1; }
    fi
    export CLICKGATE_TEST_PYTHON="$venv/bin/python"
}

# Spark in local mode for the billing job's test: pyspark from PyPI into the same venv,
# a Java runtime from Debian.
ensure_pyspark() {
    local venv="$CLICKGATE_TOOLS/pyenv"
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    if ! "$venv/bin/python" -c 'import pyspark' 2>/dev/null; then
        svc_log "installing pyspark from PyPI into $venv"
        timeout 600 "$venv/bin/pip" install -q pyspark >"$SERVICES_DIR/pip-pyspark.log" 2>&1 ||
            { echo "error: pip install pyspark failed; see $SERVICES_DIR/pip-pyspark.log" >&2; exit 1; }
    fi
    export CLICKGATE_TEST_PYSPARK="$venv/bin/python"
}

# XGBoost for the model-scoring test (tests/gbt.rs): xgboost and numpy from PyPI into the
# same venv.
ensure_xgboost() {
    local venv="$CLICKGATE_TOOLS/pyenv"
    if ! "$venv/bin/python" -c 'import xgboost, numpy' 2>/dev/null; then
        svc_log "installing xgboost and numpy from PyPI into $venv"
        timeout 600 "$venv/bin/pip" install -q xgboost numpy >"$SERVICES_DIR/pip-xgboost.log" 2>&1 ||
            { echo "error: pip install xgboost numpy failed; see $SERVICES_DIR/pip-xgboost.log" >&2; exit 1; }
    fi
    export CLICKGATE_TEST_XGBOOST="$venv/bin/python"
}

start_s3() {
    local venv="$CLICKGATE_TOOLS/s3-venv"
    if [ ! -x "$venv/bin/moto_server" ]; then
        svc_log "installing moto[server] from PyPI into $venv"
        python3 -m venv "$venv" && timeout 900 "$venv/bin/pip" install -q "moto[server]" >"$SERVICES_DIR/pip-moto.log" 2>&1 ||
            { echo "error: pip install moto[server] failed; see $SERVICES_DIR/pip-moto.log" >&2; exit 1; }
    fi
    local port=${CLICKGATE_TEST_S3_PORT:-19000}
    if ! port_open "$port"; then
        mkdir -p "$SERVICES_DIR/moto"
        (cd "$SERVICES_DIR/moto" && nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" \
            >"$SERVICES_DIR/moto/server.log" 2>&1 &)
        wait_port "$port" "moto S3 server"
    fi
    export CLICKGATE_TEST_S3="http://127.0.0.1:$port"
    export CLICKGATE_TEST_MOTO="$venv/bin/moto_server"
    svc_log "s3 (moto) $CLICKGATE_TEST_S3"
}

ensure_promtool() {
    command -v promtool >/dev/null || apt_install prometheus
    export CLICKGATE_TEST_PROMTOOL
    CLICKGATE_TEST_PROMTOOL=$(command -v promtool)
}

ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null || apt_install systemd
    export CLICKGATE_TEST_SYSTEMD_ANALYZE
    CLICKGATE_TEST_SYSTEMD_ANALYZE=$(command -v systemd-analyze)
}

ensure_socat() {
    command -v socat >/dev/null || apt_install socat
    export CLICKGATE_TEST_SOCAT
    CLICKGATE_TEST_SOCAT=$(command -v socat)
}

ensure_faketime() {
    local lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
    [ -e "$lib" ] || apt_install faketime
    [ -e "$lib" ] || { echo "error: $lib missing after installing faketime" >&2; exit 1; }
    export CLICKGATE_TEST_FAKETIME_LIB="$lib"
}

ensure_browser() {
    command -v chromium >/dev/null || apt_install chromium chromium-driver
    local nm="$CLICKGATE_TOOLS/node"
    if [ ! -d "$nm/node_modules/playwright-core" ]; then
        svc_log "installing playwright-core from npm into $nm"
        mkdir -p "$nm" && (cd "$nm" && npm install --silent --no-audit --no-fund playwright-core@1 >"$SERVICES_DIR/npm.log" 2>&1) ||
            { echo "error: npm install playwright-core failed; see $SERVICES_DIR/npm.log" >&2; exit 1; }
    fi
    export CLICKGATE_TEST_CHROMIUM
    CLICKGATE_TEST_CHROMIUM=$(command -v chromium)
    export CLICKGATE_TEST_NODE_PATH="$nm/node_modules"
}

services_start() {
    mkdir -p "$SERVICES_DIR" "$CLICKGATE_TOOLS"
    start_redis
    start_kafka
    start_s3
    ensure_pyarrow
    ensure_pyspark
    ensure_xgboost
    ensure_promtool
    ensure_systemd_analyze
    ensure_faketime
    ensure_socat
    ensure_browser
}
