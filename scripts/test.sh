#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a developer's: prepares the host limits and
# the services the tests need, runs every test of the workspace, then every fuzz target
# for a bounded time (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/host.sh
source scripts/host.sh
host_prepare
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start

cargo test --workspace --locked "$@"

scripts/fuzz.sh
