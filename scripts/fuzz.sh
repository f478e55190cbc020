#!/usr/bin/env bash
# Bounded fuzzing (called by scripts/test.sh after `cargo test`): builds every libFuzzer
# target under fuzz/ and runs each one for FUZZ_SECONDS (default 10) from its committed
# seed corpus (fuzz/corpus/<target>/). Fails on any crash, failed assertion, timeout,
# leak or out-of-memory; the input that did it is left under fuzz/artifacts/<target>/.
#
# Needs only the stable toolchain: cargo-fuzz is built from crates.io once into
# $CLICKGATE_TOOLS (like the other tools of scripts/services.sh), and the targets are
# built with RUSTC_BOOTSTRAP=1 because libFuzzer's instrumentation and AddressSanitizer
# are passed to rustc as -Z flags. One target by hand: see docs/security.md, "Fuzzing".
#
#   scripts/fuzz.sh                  every target
#   scripts/fuzz.sh store_wal        some targets
#   FUZZ_SECONDS=300 scripts/fuzz.sh longer runs
set -euo pipefail
cd "$(dirname "$0")/.."

CLICKGATE_TOOLS=${CLICKGATE_TOOLS:-$HOME/.cache/clickgate-tools}
CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-10}
# Per-input limits: a slow input (10 s) or one that grows the process past 2 GiB, or
# asks for more than 512 MiB at once, is a failure.
FUZZ_ARGS=(-max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512
    -print_final_stats=1)

fuzz_log() { echo "fuzz: $*"; }

cargo_fuzz="$CLICKGATE_TOOLS/bin/cargo-fuzz"
if ! "$cargo_fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    fuzz_log "building cargo-fuzz $CARGO_FUZZ_VERSION into $CLICKGATE_TOOLS (once; ~2 min on 2 cores)"
    mkdir -p "$CLICKGATE_TOOLS"
    log="$CLICKGATE_TOOLS/cargo-fuzz-install.log"
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$CLICKGATE_TOOLS" \
        >"$log" 2>&1 || { cat "$log" >&2; echo "error: cargo install cargo-fuzz failed (log above)" >&2; exit 1; }
fi
"$cargo_fuzz" --version >/dev/null || { echo "error: $cargo_fuzz does not run" >&2; exit 1; }
export PATH="$CLICKGATE_TOOLS/bin:$PATH"
# libFuzzer's -Z flags on the stable toolchain.
export RUSTC_BOOTSTRAP=1

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "error: no fuzz targets found under fuzz/" >&2; exit 1; }

fuzz_log "building ${#targets[@]} targets (address sanitizer)"
cargo fuzz build

# New inputs a run finds go to a scratch directory, never into the committed corpus.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    [ -d "fuzz/corpus/$t" ] || { echo "error: no seed corpus fuzz/corpus/$t" >&2; exit 1; }
    fuzz_log "running $t for ${FUZZ_SECONDS}s"
    mkdir -p "$scratch/$t"
    if ! cargo fuzz run "$t" "$scratch/$t" "fuzz/corpus/$t" -- "${FUZZ_ARGS[@]}" \
        >"$scratch/$t.log" 2>&1; then
        tail -n 60 "$scratch/$t.log" >&2
        echo "error: fuzz target $t failed; the input is under fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^stat::number_of_executed_runs|^Done' "$scratch/$t.log" | tr '\n' ' ' || true
    echo
done
fuzz_log "all ${#targets[@]} targets ran ${FUZZ_SECONDS}s each without a failure"
