# Process and port helpers shared by bench/compare.sh and bench/results.sh (sourced).
# The sourcing script owns the PIDS array of the processes it started.

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p=$1
    while port_busy "$p"; do p=$((p + 1)); done
    echo "$p"
}
wait_port() { # pid port seconds
    local i
    for i in $(seq $(($3 * 10))); do
        kill -0 "$1" 2>/dev/null || return 1
        port_busy "$2" && return 0
        sleep 0.1
    done
    return 1
}
stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p != "$1" ]] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}
