#!/usr/bin/env bash
# scripts/debian-e2e.sh — by hand, for BENCHMARKS.md: the real Debian 12
# whole-disk image (scripts/make-debian-image.sh) reimaged onto the same
# QEMU VM under both firmwares, SeaBIOS and OVMF (UEFI), by
# crates/kiln/tests/debian_qemu.rs (CI runs its UEFI case). Prints, per
# firmware, the test's timing line (reimage start to stage 5 and its parts:
# ramdisk boot, image write, Debian's boot to stage 5), the image's bytes,
# and the write rate the agent measured; then the issue's target: stage 1
# to 5 within 1.5 x (bytes written / write rate + the two boots).
#
# Needs root (network namespaces), and what scripts/test installs. Run from
# the repository: scripts/debian-e2e.sh [bios|uefi ...] (default: both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export KILN_TEST_POSTGRES_URL=${KILN_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}

firmwares=("$@")
[[ ${#firmwares[@]} -gt 0 ]] || firmwares=(bios uefi)
scripts/make-debian-image.sh >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for fw in "${firmwares[@]}"; do
    echo "== $fw" >&2
    KILN_DEBIAN_FIRMWARE=$fw cargo test -q -p kiln --test debian_qemu -- --nocapture >"$log" 2>&1 || {
        tail -n 60 "$log" >&2
        echo "debian-e2e: the $fw run failed" >&2
        exit 1
    }
    line=$(grep -m1 '^debian e2e timings' "$log")
    echo "$line"
    # The parts, for the target: written bytes, the agent's rate, and the
    # two boots (ramdisk to stage 1, Debian from stage 4 to 5).
    python3 - "$line" <<'PY'
import re, sys
l = sys.argv[1]
num = lambda pat: float(re.search(pat, l).group(1))
ramdisk = num(r"to stage 1 \(ramdisk boot\) ([\d.]+) s")
image = num(r"stage 1 to 2 \(image\) ([\d.]+) s")
mid = num(r"2 to 4 ([\d.]+) s")
debian = num(r"4 to 5 \(Debian boot, cloud-init\) ([\d.]+) s")
written = num(r"(\d+) bytes written")
rate = num(r"\(([\d.]+) MiB/s\), sha256 checked")
total = num(r"reimage start to stage 5 ([\d.]+) s")
ideal = written / (rate * 1048576) + ramdisk + debian
print(f"  written {written/1048576:.0f} MiB at {rate:.1f} MiB/s = {written/1048576/rate:.1f} s; boots: ramdisk "
      f"{ramdisk:.1f} s + Debian {debian:.1f} s; ideal {ideal:.1f} s, 1.5x = {1.5*ideal:.1f} s; "
      f"measured {total:.1f} s: {'within' if total <= 1.5*ideal else 'NOT within'} target")
PY
done
