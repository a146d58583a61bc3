#!/usr/bin/env bash
# Inventory benchmark: builds the release binary, then enrolls 10,000
# machines through the REST API and times import and filtered listing on
# SQLite and PostgreSQL. See bench/inventory.py and BENCHMARKS.md.
#
#   bash bench/inventory.sh --write    # full run, records BENCHMARKS.md
#   bash bench/inventory.sh --quick    # 2,000 machines, correctness only (CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -p kiln
KILN_BENCH_WRAPPER=1 exec python3 bench/inventory.py "$@"
