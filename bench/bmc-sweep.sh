#!/usr/bin/env bash
# BMC sweep benchmark: a power-status sweep of N simulated Redfish BMCs on
# loopback (issue 4). See BENCHMARKS.md ("BMC power-status sweep").
#
#   bash bench/bmc-sweep.sh                      # 5,000 BMCs, HTTPS, concurrency 256
#   bash bench/bmc-sweep.sh --bmcs 500 --concurrency 64
#   bash bench/bmc-sweep.sh --plain              # http:// instead of verified HTTPS
#
# WHAT IT MEASURES
#   `kiln-sim` serves N BMCs, one port each, HTTPS with a certificate from a
#   CA it makes (the sweep verifies against that CA), sessions on. Then the
#   sweeping process (crates/kiln-bmc/examples/redfish_sweep.rs) makes one
#   RedfishDriver per BMC and calls power_status on all of them, at most
#   CONCURRENCY at once. Each call is what the power-state reconciler does:
#   service root, create session, list systems, read the system, delete the
#   session (5 requests, one TLS handshake). Printed: wall time (first call
#   to last answer), BMCs/s, per-call p50/p99/max, the sweeping process's
#   peak RSS (VmHWM) and the answer counts; any failed call fails the run.
#   Target: under 10 s for 5,000. The simulator runs on the same machine
#   and competes for its cores, so the number is pessimistic.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bmcs=5000
concurrency=256
tls=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --bmcs) bmcs=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --plain) tls=0; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

# One descriptor per BMC port in the simulator, one per connection on both
# sides.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$((bmcs + concurrency + 100))
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $need ]]; then
    echo "bench/bmc-sweep.sh: the open-file limit $(ulimit -n) is below $need; raise it (ulimit -n)" >&2
    exit 1
fi

cargo build --release --locked -q -p kiln-sim --bin kiln-sim
cargo build --release --locked -q -p kiln-bmc --example redfish_sweep
tmp=$(mktemp -d)
sim_pid=""
cleanup() {
    if [[ -n $sim_pid ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

export KILN_SIM_PASSWORD=bench-$RANDOM$RANDOM
sim_args=(--bmcs "$bmcs" --urls "$tmp/urls")
sweep_args=(--concurrency "$concurrency")
if [[ $tls == 1 ]]; then
    sim_args+=(--tls --ca "$tmp/ca.pem")
    sweep_args+=(--ca "$tmp/ca.pem")
fi
target/release/kiln-sim "${sim_args[@]}" >"$tmp/sim.out" 2>"$tmp/sim.err" &
sim_pid=$!
for _ in $(seq 1 300); do
    grep -q ready "$tmp/sim.out" 2>/dev/null && break
    kill -0 "$sim_pid" 2>/dev/null || { cat "$tmp/sim.err" >&2; exit 1; }
    sleep 0.1
done
grep -q ready "$tmp/sim.out" || { echo "kiln-sim did not get ready" >&2; exit 1; }
echo "kiln-sim: $(cat "$tmp/sim.out")"
echo "simulator RSS after start: $(awk '/VmRSS/ {print int($2/1024) " MiB"}' /proc/$sim_pid/status)"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the sweep"
echo "TLS: $([[ $tls == 1 ]] && echo "verified HTTPS" || echo "plain HTTP")"
target/release/examples/redfish_sweep "$tmp/urls" "${sweep_args[@]}"
echo "simulator peak RSS: $(awk '/VmHWM/ {print int($2/1024) " MiB"}' /proc/$sim_pid/status)"
