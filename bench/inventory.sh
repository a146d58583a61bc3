#!/usr/bin/env bash
# Inventory benchmark: builds the release binary, then enrolls 10,000
# machines through the REST API and times import and filtered listing on
# SQLite and PostgreSQL. See bench/inventory.py and BENCHMARKS.md.
#
#   bash bench/inventory.sh --write    # full run, records BENCHMARKS.md
#   bash bench/inventory.sh --quick    # 2,000 machines, correctness only (CI)
#
# --quick checks that the benchmark works and judges nothing, so it runs
# the debug binary the tests already built: a cold release build is
# minutes of CI for numbers nobody reads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ " $* " == *" --quick "* ]]; then
    cargo build --locked -p kiln
    set -- --kiln target/debug/kiln "$@"
else
    cargo build --release --locked -p kiln
fi
KILN_BENCH_WRAPPER=1 exec python3 bench/inventory.py "$@"
