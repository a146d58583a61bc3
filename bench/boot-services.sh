#!/usr/bin/env bash
# Boot-services benchmark: kiln's TFTP and HTTP file serving against the
# reference servers (tftpd-hpa, nginx), measured by the same clients in the
# same run, and the ratio. See BENCHMARKS.md ("Boot services").
#
#   bash bench/boot-services.sh --write   # full run, records BENCHMARKS.md
#   bash bench/boot-services.sh --quick   # small, correctness only (CI)
#
# WHAT IT MEASURES
#   TFTP: N clients (200) each fetch one 1 MiB file (ipxe.efi sized), all
#     started together (one curl process per client, xargs -P N), at blksize
#     1468 (UEFI PXE / iPXE) and 512 (RFC 1350, legacy BIOS PXE). The server
#     runs in a network namespace at 198.18.0.1:69, the clients in a second
#     one, across a veth pair. Target: kiln >= 1.2x tftpd-hpa's throughput
#     at blksize 1468 (the 512 row is informational).
#   HTTP: N clients (100) each GET one 50 MiB initrd; server and clients in
#     the server namespace over its own loopback (the copy-bandwidth ceiling
#     of the box; --http-path veth crosses the veth pair instead).
#     nginx serves /initrd, kiln /boot/file/initrd. Target: kiln >= 90 % of
#     nginx's throughput.
#   Per run: wall time (first start -> last finish), aggregate goodput
#   N*size/wall in MiB/s, per-client p50/p95/max, failures, server CPU
#   seconds (a cgroup per server start, so tftpd-hpa's per-transfer forks
#   and nginx's workers count). Every download's size, exit code (and HTTP
#   status) is checked, and client 1's file is compared by SHA-256 with the
#   original; a failed, short or corrupt download makes the run fail.
#   Each server is restarted per run; runs alternate reference and kiln
#   (A/B/A/B), 3 each, and the table shows medians.
#
# OPTIONS
#   --quick            20 TFTP clients x 1 MiB, 10 HTTP clients x 10 MiB, 1 run;
#                      checks correctness, never judges targets
#   --write            record the results in BENCHMARKS.md between
#                      <!-- boot-services:begin --> and <!-- boot-services:end -->
#   --runs N           runs per server and row (3; quick: 1)
#   --tftp-clients N   (200; quick: 20)      --blksizes "1468 512"
#   --http-clients N   (100; quick: 10)      --http-mib M (50; quick: 10)
#   --http-path loopback|veth (loopback)
#   --only tftp|http   run only that service's rows (both by default)
#   --kiln PATH        use this kiln binary instead of building
#                      (default: cargo build --release --locked -p kiln)
#   --out DIR          keep the raw per-run data (client results, server logs)
#
# EXIT CODE
#   0: the benchmark ran correctly (a missed target is reported, not fatal);
#   1: something broke (a server did not start or died, a download failed,
#      was short or corrupt); 2: bad usage or missing requirements.
#
# Everything happens inside two network namespaces created here and deleted on
# exit; servers are started in their own process group and stopped by its id;
# the scratch directory is removed. Needs root, iproute2, curl (with tftp),
# tftpd-hpa (in.tftpd; its system service is not needed), nginx, python3:
#   apt-get install tftpd-hpa nginx curl
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARGS=("$@")
QUICK=0; WRITE=0; RUNS=""; TFTP_N=""; HTTP_N=""; HTTP_MIB=""; BLKSIZES="1468 512"
HTTP_PATH=loopback; KILN=""; OUT=""; ONLY=""

usage() { awk 'NR>1 && /^#/{sub(/^# ?/, ""); print; next} NR>1{exit}' "$0"; }
die() { echo "boot-services: $*" >&2; exit 1; }
bad_usage() { echo "boot-services: $*" >&2; echo "(--help for the options)" >&2; exit 2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || bad_usage "$1 needs a positive integer, not '$2'"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; shift;;
    --write) WRITE=1; shift;;
    --runs) posint "$1" "${2-}"; RUNS=$2; shift 2;;
    --tftp-clients) posint "$1" "${2-}"; TFTP_N=$2; shift 2;;
    --http-clients) posint "$1" "${2-}"; HTTP_N=$2; shift 2;;
    --http-mib) posint "$1" "${2-}"; HTTP_MIB=$2; shift 2;;
    --blksizes) BLKSIZES=${2-}; shift 2;;
    --http-path) HTTP_PATH=${2-}; shift 2;;
    --kiln) KILN=${2-}; shift 2;;
    --only) ONLY=${2-}; shift 2;;
    --out) OUT=${2-}; shift 2;;
    -h|--help) usage; exit 0;;
    *) bad_usage "unknown argument '$1'";;
  esac
done
for b in $BLKSIZES; do
  [[ "$b" =~ ^[0-9]+$ ]] && [ "$b" -ge 512 ] && [ "$b" -le 65464 ] || bad_usage "blksize '$b' is not in 512..65464"
done
[ -n "$BLKSIZES" ] || bad_usage "--blksizes is empty"
case "$HTTP_PATH" in loopback|veth) ;; *) bad_usage "--http-path is loopback or veth";; esac
case "$ONLY" in ""|tftp|http) ;; *) bad_usage "--only is tftp or http";; esac
[ $QUICK = 1 ] && [ $WRITE = 1 ] && bad_usage "--write records full runs only; drop --quick"
[ -n "$ONLY" ] && [ $WRITE = 1 ] && bad_usage "--write records full runs only; drop --only"
if [ $QUICK = 1 ]; then
  : "${RUNS:=1}" "${TFTP_N:=20}" "${HTTP_N:=10}" "${HTTP_MIB:=10}"
else
  : "${RUNS:=3}" "${TFTP_N:=200}" "${HTTP_N:=100}" "${HTTP_MIB:=50}"
fi
TFTP_SIZE=1048576
HTTP_SIZE=$((HTTP_MIB * 1048576))
TFTP_MAXTIME=120
HTTP_MAXTIME=300
KILN_MAX_TRANSFERS=$(( TFTP_N * 2 > 1000 ? TFTP_N * 2 : 1000 ))

# ---------------------------------------------------------------- requirements
[ "$(id -u)" = 0 ] || { echo "boot-services: needs root (network namespaces, UDP port 69)" >&2; exit 2; }
missing=()
for req in ip:iproute2 ss:iproute2 setsid:util-linux pgrep:procps curl:curl in.tftpd:tftpd-hpa nginx:nginx \
           python3:python3 sha256sum:coreutils xargs:findutils; do
  command -v "${req%%:*}" >/dev/null 2>&1 || missing+=("${req%%:*} (package ${req#*:})")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "boot-services: missing: ${missing[*]}" >&2
  echo "  e.g. apt-get install tftpd-hpa nginx curl  (stop their system services; only the binaries are used)" >&2
  exit 2
fi
curl -V | grep -qw tftp || { echo "boot-services: this curl has no tftp support" >&2; exit 2; }

if [ -z "$KILN" ]; then
  echo "== building kiln (cargo build --release --locked -p kiln)" >&2
  (cd "$REPO" && cargo build --release --locked -p kiln) || die "the build failed"
  KILN=$REPO/target/release/kiln
fi
[ -x "$KILN" ] || die "no kiln binary at $KILN"
KILN=$(cd "$(dirname "$KILN")" && pwd)/$(basename "$KILN")

# ---------------------------------------------------------------- scratch, namespaces, cleanup
NS_S=kbench-srv-$$; NS_C=kbench-cli-$$; IF_S=kbs0; IF_C=kbc0
SERVER_IP=198.18.0.1; CLIENT_IP=198.18.0.2
TMP=""; SRV_PGID=""; SRV_WORK=""; CG=""; NETNS_MADE=0; CG_SEQ=0
HZ=$(getconf CLK_TCK)

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_server >/dev/null 2>&1
  if [ $NETNS_MADE = 1 ]; then
    ip netns del "$NS_C" 2>/dev/null; ip netns del "$NS_S" 2>/dev/null
  fi
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    if [ -n "$OUT" ]; then
      mkdir -p "$OUT" && cp -r "$TMP/results" "$OUT/" 2>/dev/null && echo "raw results kept in $OUT/results" >&2
    fi
    rm -rf "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "boot-services: interrupted" >&2; exit 130' INT TERM

TMP=$(mktemp -d /tmp/kiln-boot-bench.XXXXXX) || die "mktemp failed"
chmod 755 "$TMP"   # tftpd-hpa and nginx workers run as nobody
mkdir -p "$TMP/results" "$TMP/tftproot" "$TMP/httproot"
chmod 755 "$TMP/tftproot" "$TMP/httproot"
TFTP_FILE=ipxe.efi; HTTP_FILE=initrd
head -c $TFTP_SIZE /dev/urandom > "$TMP/tftproot/$TFTP_FILE"
head -c $HTTP_SIZE /dev/urandom > "$TMP/httproot/$HTTP_FILE"
chmod 644 "$TMP/tftproot/$TFTP_FILE" "$TMP/httproot/$HTTP_FILE"
TFTP_SUM=$(sha256sum < "$TMP/tftproot/$TFTP_FILE" | cut -d' ' -f1)
HTTP_SUM=$(sha256sum < "$TMP/httproot/$HTTP_FILE" | cut -d' ' -f1)   # also warms the page cache
JSONL=$TMP/results/runs.jsonl; : > "$JSONL"

NETNS_MADE=1
ip netns add "$NS_S" && ip netns add "$NS_C" \
  && ip link add name $IF_S netns "$NS_S" type veth peer name $IF_C netns "$NS_C" \
  && ip -n "$NS_S" addr add $SERVER_IP/24 dev $IF_S && ip -n "$NS_C" addr add $CLIENT_IP/24 dev $IF_C \
  && ip -n "$NS_S" link set lo up && ip -n "$NS_C" link set lo up \
  && ip -n "$NS_S" link set $IF_S up && ip -n "$NS_C" link set $IF_C up \
  || die "could not set up the network namespaces"
for i in $(seq 1 50); do
  ip -n "$NS_C" -o link show $IF_C | grep -q 'LOWER_UP' && break; sleep 0.1
done
if [ "$HTTP_PATH" = loopback ]; then HTTP_ADDR=127.0.0.1; HTTP_NS=$NS_S; else HTTP_ADDR=$SERVER_IP; HTTP_NS=$NS_C; fi
HTTP_PORT=8080

# ---------------------------------------------------------------- CPU accounting
# A cgroup per server start: catches tftpd-hpa's per-transfer forks (reaped
# by their parent, so not in its cutime) and every nginx worker.
CG_MODE=proc; CG_BASE=""
if [ -w /sys/fs/cgroup/cpuacct ] && [ -f /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then
  CG_MODE=cgroup-v1; CG_BASE=/sys/fs/cgroup/cpuacct
else
  m=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
  if [ -n "$m" ] && [ -w "$m" ] && mkdir "$m/kiln-boot-bench-probe-$$" 2>/dev/null; then
    [ -f "$m/kiln-boot-bench-probe-$$/cpu.stat" ] && { CG_MODE=cgroup-v2; CG_BASE=$m; }
    rmdir "$m/kiln-boot-bench-probe-$$"
  fi
fi
cg_join() {   # every process of the server's group; later forks inherit the cgroup
  CG=""
  [ $CG_MODE = proc ] && return 0
  CG_SEQ=$((CG_SEQ + 1)); CG=$CG_BASE/kiln-boot-bench-$$-$CG_SEQ
  mkdir "$CG" 2>/dev/null || { CG=""; return 0; }
  local p; for p in $(pgrep -g "$SRV_PGID"); do echo "$p" > "$CG/cgroup.procs" 2>/dev/null; done
}
cg_drop() { [ -n "$CG" ] && rmdir "$CG" 2>/dev/null; CG=""; }
srv_cpu_s() {
  case "$CG_MODE:$CG" in
    cgroup-v1:?*) awk '{printf "%.3f", $1/1e9}' "$CG/cpuacct.usage";;
    cgroup-v2:?*) awk '$1=="usage_usec"{printf "%.3f", $2/1e6}' "$CG/cpu.stat";;
    *) local t=0 p v   # fallback: utime+stime+cutime+cstime of the group's live processes
       for p in $(pgrep -g "$SRV_PGID"); do
         v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12+$13+$14+$15}')
         t=$((t + ${v:-0}))
       done
       awk -v t=$t -v hz="$HZ" 'BEGIN{printf "%.3f", t/hz}';;
  esac
}

# ---------------------------------------------------------------- servers
# start_server NAME: tftpd-hpa | kiln-tftp | nginx | kiln-http, in $NS_S,
# in its own process group (SRV_PGID = the server's pid).
start_server() {
  local name=$1 cmd ready=0 i
  SRV_WORK=$(mktemp -d "$TMP/srv.XXXXXX"); chmod 755 "$SRV_WORK"
  local W=$SRV_WORK
  case "$name" in
    tftpd-hpa)
      cmd="exec in.tftpd -L -4 -a $SERVER_IP:69 -u nobody -s $TMP/tftproot";;
    kiln-tftp)
      cat > "$W/kiln.toml" <<EOF
data_dir = "$W/data"
listen = "127.0.0.1:7070"
[tftp]
root = "$TMP/tftproot"
listen = "$SERVER_IP:69"
max_transfers = $KILN_MAX_TRANSFERS
# Every client runs in one namespace, from one address.
max_per_client = $KILN_MAX_TRANSFERS
EOF
      cmd="exec $KILN server --config $W/kiln.toml";;
    nginx)
      cat > "$W/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $W/nginx.pid;
error_log $W/error.log;
events { worker_connections 4096; }
http {
  access_log $W/access.log;
  sendfile on; tcp_nopush on; keepalive_timeout 65;
  types { application/octet-stream initrd; }
  client_body_temp_path $W; proxy_temp_path $W; fastcgi_temp_path $W; uwsgi_temp_path $W; scgi_temp_path $W;
  server { listen $HTTP_ADDR:$HTTP_PORT; root $TMP/httproot; }
}
EOF
      cmd="exec nginx -c $W/nginx.conf -e $W/error.log";;
    kiln-http)
      cat > "$W/kiln.toml" <<EOF
data_dir = "$W/data"
listen = "$HTTP_ADDR:$HTTP_PORT"
[boot]
artifacts = "$TMP/httproot"
EOF
      cmd="exec $KILN server --config $W/kiln.toml";;
    *) die "unknown server $name";;
  esac
  setsid ip netns exec "$NS_S" bash -c "ulimit -n \$(ulimit -Hn) 2>/dev/null; $cmd" > "$W/server.log" 2>&1 < /dev/null &
  SRV_PGID=$!
  for i in $(seq 1 150); do
    kill -0 "$SRV_PGID" 2>/dev/null || break
    case "$name" in
      tftpd-hpa) ip netns exec "$NS_S" ss -H -uln 'sport = :69' 2>/dev/null | grep -q . && ready=1;;
      kiln-tftp) sed 's/\x1b\[[0-9;]*m//g' "$W/server.log" | grep -q 'TFTP listening' && ready=1;;
      nginx) ip netns exec "$NS_S" curl -s -o /dev/null -r 0-0 -f "http://$HTTP_ADDR:$HTTP_PORT/$HTTP_FILE" && ready=1;;
      kiln-http) [ "$(ip netns exec "$NS_S" curl -s --max-time 2 "http://$HTTP_ADDR:$HTTP_PORT/healthz")" = ok ] && ready=1;;
    esac
    [ $ready = 1 ] && break
    sleep 0.1
  done
  if [ $ready != 1 ]; then
    echo "!! $name did not become ready within 15 s; its log:" >&2
    tail -n 20 "$W/server.log" >&2
    return 1
  fi
  sleep 0.2   # nginx: let every worker come up before joining the cgroup
  cg_join
}

# stop_server: SIGTERM to the server's process group, SIGKILL after 5 s;
# STOP_HOW says which ended it.
STOP_HOW=""
stop_server() {
  STOP_HOW=none
  [ -n "$SRV_PGID" ] || return 0
  local how=exited i
  kill -TERM -- "-$SRV_PGID" 2>/dev/null
  for i in $(seq 1 50); do
    pgrep -g "$SRV_PGID" >/dev/null || break; sleep 0.1
  done
  if pgrep -g "$SRV_PGID" >/dev/null; then kill -KILL -- "-$SRV_PGID" 2>/dev/null; how=killed; sleep 0.2; fi
  wait "$SRV_PGID" 2>/dev/null
  SRV_PGID=""
  cg_drop
  STOP_HOW=$how
}

# ---------------------------------------------------------------- one run
now() { echo "${EPOCHREALTIME/,/.}"; }

# storm NS URL N RESULT-PREFIX MAXTIME [curl options...]: N curl processes at
# once; client 1 keeps its file (RESULT-PREFIX.file) for the checksum.
storm() {
  local ns=$1 url=$2 n=$3 res=$4 maxt=$5; shift 5
  local opts="$*" w='%{size_download} %{time_total} %{exitcode} %{response_code}\n'
  ip netns exec "$ns" bash -c "
    curl -sS --max-time $maxt $opts -o '$res.file' -w '$w' '$url' > '$res.c1' 2> '$res.err1' &
    seq 2 $n | xargs -r -P $((n > 1 ? n - 1 : 1)) -I{} curl -sS --max-time $maxt $opts -o /dev/null -w '$w' '$url' > '$res.cn' 2> '$res.errn'
    wait"
  cat "$res.c1" "$res.cn" > "$res.clients" 2>/dev/null
  cat "$res.err1" "$res.errn" > "$res.stderr" 2>/dev/null
  rm -f "$res.c1" "$res.cn" "$res.err1" "$res.errn"
}

BROKEN=0
# one_run ROW SERVICE SERVER ROLE RUN N SIZE BLKSIZE
one_run() {
  local row=$1 service=$2 server=$3 role=$4 run=$5 n=$6 size=$7 bs=$8
  local res="$TMP/results/$row-$server-$run" url ns maxt sum opts=() started=yes alive=yes
  local t0 t1 c0 c1 checksum=missing stopped anomalies=0 sample=""
  if [ "$service" = tftp ]; then
    url="tftp://$SERVER_IP/$TFTP_FILE"; ns=$NS_C; maxt=$TFTP_MAXTIME; sum=$TFTP_SUM
    [ "$bs" != 512 ] && opts=(--tftp-blksize "$bs")
  else
    ns=$HTTP_NS; maxt=$HTTP_MAXTIME; sum=$HTTP_SUM
    if [ "$server" = nginx ]; then url="http://$HTTP_ADDR:$HTTP_PORT/$HTTP_FILE"
    else url="http://$HTTP_ADDR:$HTTP_PORT/boot/file/$HTTP_FILE"; fi
  fi
  if start_server "$server"; then
    c0=$(srv_cpu_s); t0=$(now)
    storm "$ns" "$url" "$n" "$res" "$maxt" "${opts[@]}"
    t1=$(now); c1=$(srv_cpu_s)
    kill -0 "$SRV_PGID" 2>/dev/null || alive=no
    if [ -f "$res.file" ]; then
      [ "$(sha256sum < "$res.file" | cut -d' ' -f1)" = "$sum" ] && checksum=ok || checksum=mismatch
      rm -f "$res.file"
    fi
  else
    started=no; alive=no; t0=0; t1=0; c0=0; c1=0; : > "$res.clients"
  fi
  stop_server; stopped=$STOP_HOW
  # server-side complaints: kiln WARN/ERROR lines, nginx [error]..[emerg]
  sed 's/\x1b\[[0-9;]*m//g' "$SRV_WORK/server.log" > "$res.server.log"
  [ -f "$SRV_WORK/error.log" ] && cat "$SRV_WORK/error.log" >> "$res.server.log"
  anomalies=$(grep -Ec ' (WARN|ERROR) |panicked|\[(error|crit|alert|emerg)\]' "$res.server.log")
  sample=$(grep -E ' (WARN|ERROR) |panicked|\[(error|crit|alert|emerg)\]' "$res.server.log" | head -n 3 | cut -c1-300)
  rm -rf "$SRV_WORK"; SRV_WORK=""
  python3 "$TMP/report.py" run --jsonl "$JSONL" --row "$row" --service "$service" --server "$server" \
    --role "$role" --run "$run" --n "$n" --size "$size" --blksize "$bs" --t0 "$t0" --t1 "$t1" \
    --cpu0 "$c0" --cpu1 "$c1" --clients "$res.clients" --stderr "$res.stderr" --checksum "$checksum" \
    --started "$started" --alive "$alive" --stopped "$stopped" --anomalies "$anomalies" --sample="$sample" \
    || BROKEN=1
}

# ---------------------------------------------------------------- report helper
cat > "$TMP/report.py" <<'PY'
import argparse, json, math, os, platform, re, statistics, subprocess, sys, time
from pathlib import Path

MiB = 1048576

def nearest_rank(vals, q):
    if not vals:
        return 0.0
    return vals[max(0, min(len(vals) - 1, math.ceil(q * len(vals)) - 1))]

def cmd_run(a):
    rows = []
    for line in Path(a.clients).read_text().splitlines() if Path(a.clients).exists() else []:
        f = line.split()
        if len(f) >= 4:
            rows.append(f)
    times = sorted(float(r[1]) for r in rows)
    def good(r):
        return (int(r[0]) == a.size and r[2] == "0"
                and (a.service != "http" or r[3] == "200"))
    ok = sum(1 for r in rows if good(r))
    failed = a.n - ok
    wall = a.t1 - a.t0
    errs = []
    if Path(a.stderr).exists():
        errs = [l.strip() for l in Path(a.stderr).read_text().splitlines() if l.strip()]
    bad_kinds = {}
    for r in rows:
        if not good(r):
            k = f"size {r[0]}, curl exit {r[2]}" + (f", HTTP {r[3]}" if a.service == "http" else "")
            bad_kinds[k] = bad_kinds.get(k, 0) + 1
    if len(rows) < a.n:
        bad_kinds["no result line"] = a.n - len(rows)
    problems = []
    if a.started != "yes":
        problems.append("server did not start")
    elif a.alive != "yes":
        problems.append("server died during the run")
    if failed:
        problems.append(f"{failed} of {a.n} downloads failed ({'; '.join(f'{v}x {k}' for k, v in bad_kinds.items())})")
    if a.started == "yes" and a.checksum != "ok":
        problems.append(f"client 1's file: checksum {a.checksum}")
    rec = dict(row=a.row, service=a.service, server=a.server, role=a.role, run=a.run, n=a.n, size=a.size,
               blksize=a.blksize, wall=round(wall, 4),
               mibps=(ok * a.size / wall / MiB) if wall > 0 else 0.0,
               p50=nearest_rank(times, 0.50), p95=nearest_rank(times, 0.95), max=times[-1] if times else 0.0,
               ok=ok, failed=failed, cpu=round(a.cpu1 - a.cpu0, 3), checksum=a.checksum,
               stopped=a.stopped, anomalies=a.anomalies, sample=a.sample, curl_errors=errs[:5],
               problems=problems, load1=os.getloadavg()[0])
    with open(a.jsonl, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    what = f"TFTP blksize {a.blksize}" if a.service == "tftp" else "HTTP"
    print(f"  {what:<17} {a.server:<10} run {a.run}: N={a.n} wall={wall:.2f}s {rec['mibps']:.1f} MiB/s "
          f"client p50={rec['p50']:.2f}s p95={rec['p95']:.2f}s max={rec['max']:.2f}s ok={ok}/{a.n} "
          f"cpu={rec['cpu']:.2f}s sha256={a.checksum} stop={a.stopped} load1={rec['load1']:.2f}", file=sys.stderr)
    if a.anomalies:
        print(f"    server log: {a.anomalies} warning/error line(s), e.g.:", file=sys.stderr)
        for l in a.sample.splitlines():
            print(f"      {l}", file=sys.stderr)
    for p in problems:
        print(f"    !! {p}", file=sys.stderr)
    for e in errs[:3]:
        print(f"    curl: {e}", file=sys.stderr)
    return 1 if problems else 0

def fmt_mib(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

def size_text(n):
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n:,} B"

def med(vals):
    return statistics.median(vals) if vals else 0.0

ROWS = {  # target: minimum kiln/reference ratio; None = informational
    "tftp": dict(ref="tftpd-hpa", kiln="kiln-tftp"),
    "http": dict(ref="nginx", kiln="kiln-http"),
}

def summarize(recs, quick):
    order = []
    for r in recs:
        if r["row"] not in order:
            order.append(r["row"])
    out = []
    for key in order:
        rr = [r for r in recs if r["row"] == key]
        svc = rr[0]["service"]
        ref = [r for r in rr if r["role"] == "reference"]
        kil = [r for r in rr if r["role"] == "kiln"]
        if svc == "tftp":
            bs = rr[0]["blksize"]
            label = f"TFTP, blksize {bs}"
            target = 1.2 if bs == 1468 else None
            target_text = "≥ 1.2× tftpd-hpa" if target else "— (informational)"
        else:
            label = "HTTP"
            target = 0.9
            target_text = "≥ 90 % of nginx"
        rm, km = med([r["mibps"] for r in ref]), med([r["mibps"] for r in kil])
        ratio = km / rm if rm > 0 else 0.0
        problems = [f"{r['server']} run {r['run']}: {p}" for r in rr for p in r["problems"]]
        if problems:
            verdict = "BROKEN"
        elif quick:
            verdict = "not judged (--quick)"
        elif target is None:
            verdict = "informational"
        else:
            verdict = "met" if ratio >= target else "missed"
        out.append(dict(key=key, service=svc, label=label, n=rr[0]["n"], size=rr[0]["size"],
                        ref_name=ref[0]["server"] if ref else "?", ref=ref, kiln=kil, ref_mibps=rm,
                        kiln_mibps=km, ratio=ratio, target=target, target_text=target_text, verdict=verdict,
                        problems=problems, ref_cpu=med([r["cpu"] for r in ref]),
                        kiln_cpu=med([r["cpu"] for r in kil])))
    return out

def ratio_text(s):
    if s["service"] == "http":
        return f"{s['ratio']:.2f}× ({s['ratio'] * 100:.0f} %)"
    return f"{s['ratio']:.2f}×"

def main_table(rows):
    lines = ["| service | clients × size | reference MiB/s | kiln MiB/s | kiln/reference | target | verdict "
             "| reference CPU (s) | kiln CPU (s) |",
             "|---|---|---:|---:|---:|---|---|---:|---:|"]
    for s in rows:
        lines.append(f"| {s['label']} | {s['n']} × {size_text(s['size'])} | {fmt_mib(s['ref_mibps'])} ({s['ref_name']}) "
                     f"| {fmt_mib(s['kiln_mibps'])} | {ratio_text(s)} | {s['target_text']} | {s['verdict']} "
                     f"| {s['ref_cpu']:.2f} | {s['kiln_cpu']:.2f} |")
    return "\n".join(lines)

def run_table(recs):
    lines = ["| service | server | run | wall (s) | MiB/s | client p50 / p95 / max (s) | failed | server CPU (s) |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in recs:
        svc = f"TFTP, blksize {r['blksize']}" if r["service"] == "tftp" else "HTTP"
        lines.append(f"| {svc} | {r['server']} | {r['run']} | {r['wall']:.2f} | {fmt_mib(r['mibps'])} "
                     f"| {r['p50']:.2f} / {r['p95']:.2f} / {r['max']:.2f} | {r['failed']} | {r['cpu']:.2f} |")
    return "\n".join(lines)

def verdict_line(rows, quick):
    broken = [s for s in rows if s["problems"]]
    if broken:
        return "Verdict: BROKEN — " + "; ".join(p for s in broken for p in s["problems"][:3]) + "."
    parts = []
    for s in rows:
        if s["target"] is None:
            continue
        if s["service"] == "tftp":
            parts.append(f"TFTP {s['ratio']:.2f}× tftpd-hpa's throughput (target ≥ 1.2×): "
                         + ("not judged" if quick else s["verdict"]))
        else:
            parts.append(f"HTTP {s['ratio'] * 100:.0f} % of nginx's throughput (target ≥ 90 %): "
                         + ("not judged" if quick else s["verdict"]))
    head = "Verdict (quick run, targets not judged): " if quick else (
        "Verdict: all targets met — " if all(s["verdict"] in ("met", "informational") for s in rows)
        else "Verdict: target missed — ")
    return head + "; ".join(parts) + "."

def facts(a):
    f = {}
    f["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    f["cpu"] = model
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            f["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    f["kernel"] = platform.release()
    f["load"] = f"{a.load_start} at the start, {os.getloadavg()[0]:.2f} at the end"
    return f

def render(a, rows, recs):
    f = facts(a)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(a.started_at))
    runs = max((r["run"] for r in recs), default=0)
    max_n = max((r["n"] for r in recs), default=0)
    http_where = ("the server namespace's loopback (clients in the server namespace)" if a.http_path == "loopback"
                  else "the veth pair (clients in the client namespace)")
    return f"""### Results ({when})

Command: `{a.command}`

- Machine: {f['nproc']} CPUs ({f['cpu']}), {f.get('memory', '?')} RAM, Linux {f['kernel']}; 1-minute load average {f['load']}
  (the end figure counts the bench's own client processes: up to {max_n} runnable at once).
- Commit: `{a.commit}`.
- References: {a.versions}. Clients: one `curl` process per client, all started at once (`xargs -P N`).
- TFTP across a veth pair between two network namespaces; HTTP over {http_where}.
  Each server restarted per run; runs alternate reference and kiln (A/B/A/B), {runs} each; medians shown.
  Goodput = N × size / wall time (first start to last finish). Server CPU: {a.cpu_mode}.
- Every download's size and exit status (and HTTP status) checked; client 1's file compared by SHA-256 in every run.

{main_table(rows)}

{verdict_line(rows, a.quick)}

Targets are judged against the reference measured in the same run. For scale, earlier measurements on the
machine the targets were set on gave tftpd-hpa about 111 MiB/s (1.8 s for 200 × 1 MiB at blksize 1468) and
nginx about 2,000 MiB/s (100 × 50 MiB).

Per run:

{run_table(recs)}"""

def cmd_report(a):
    recs = [json.loads(l) for l in Path(a.jsonl).read_text().splitlines() if l.strip()]
    if not recs:
        print("boot-services: no runs recorded", file=sys.stderr)
        return 1
    rows = summarize(recs, a.quick)
    section = render(a, rows, recs)
    print()
    print(section)
    print()
    if a.write:
        path = Path(a.benchmarks)
        begin, end = "<!-- boot-services:begin -->", "<!-- boot-services:end -->"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        block = f"{begin}\n{section}\n{end}"
        if begin in text and end in text and text.index(begin) < text.index(end):
            before, rest = text.split(begin, 1)
            text = before + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## Boot services: TFTP and HTTP\n\n" + block + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"recorded in {path}")
    broken = any(s["problems"] for s in rows)
    if broken:
        print("boot-services: BROKEN (see the problems above)", file=sys.stderr)
        return 1
    missed = [s for s in rows if s["verdict"] == "missed"]
    if missed:
        print("boot-services: target missed for " + ", ".join(s["label"] for s in missed)
              + " (reported; the run itself was correct)", file=sys.stderr)
    return 0

ap = argparse.ArgumentParser()
sub = ap.add_subparsers(dest="cmd", required=True)
r = sub.add_parser("run")
for name, typ in [("jsonl", str), ("row", str), ("service", str), ("server", str), ("role", str), ("run", int),
                  ("n", int), ("size", int), ("blksize", int), ("t0", float), ("t1", float), ("cpu0", float),
                  ("cpu1", float), ("clients", str), ("stderr", str), ("checksum", str), ("started", str),
                  ("alive", str), ("stopped", str), ("anomalies", int), ("sample", str)]:
    r.add_argument("--" + name, type=typ, required=True)
p = sub.add_parser("report")
for name, typ in [("jsonl", str), ("command", str), ("commit", str), ("versions", str), ("cpu_mode", str),
                  ("load_start", str), ("started_at", float), ("http_path", str), ("benchmarks", str)]:
    p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, required=True)
p.add_argument("--quick", action="store_true")
p.add_argument("--write", action="store_true")
a = ap.parse_args()
sys.exit(cmd_run(a) if a.cmd == "run" else cmd_report(a))
PY

# ---------------------------------------------------------------- the runs
STARTED_AT=$(date +%s)
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$REPO" status --porcelain -- . ':!bench' ':!BENCHMARKS.md' 2>/dev/null)" ] && COMMIT="$COMMIT (+ uncommitted changes)"
VERSIONS="tftpd-hpa $(in.tftpd -V 2>&1 | awk 'NR==1{print $2; exit}' | tr -d ,) (\`in.tftpd -L\`, a fork per transfer), \
$(nginx -v 2>&1 | sed 's/.*nginx\//nginx /') (worker_processes auto, sendfile, access log on), \
kiln max_transfers = $KILN_MAX_TRANSFERS, log level info; curl $(curl -V | awk 'NR==1{print $2}')"
case $CG_MODE in
  cgroup-v1) CPU_MODE="a cgroup (v1 cpuacct) per server start, forks and workers included";;
  cgroup-v2) CPU_MODE="a cgroup (v2 cpu.stat) per server start, forks and workers included";;
  *) CPU_MODE="utime+stime of the server's live processes (no writable cgroup; tftpd-hpa's exited forks may be missing)";;
esac

echo "== boot services: TFTP ${TFTP_N} clients x 1 MiB (blksizes $BLKSIZES), HTTP ${HTTP_N} clients x ${HTTP_MIB} MiB ($HTTP_PATH), $RUNS run(s) each, A/B alternating; kiln $KILN" >&2
echo "== machine: $(nproc) CPUs, $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo), load1 $LOAD_START; commit $COMMIT; CPU accounting: $CG_MODE" >&2
[ "$ONLY" = http ] && BLKSIZES=""
for bs in $BLKSIZES; do
  for run in $(seq 1 "$RUNS"); do
    one_run "tftp-$bs" tftp tftpd-hpa reference "$run" "$TFTP_N" $TFTP_SIZE "$bs"
    one_run "tftp-$bs" tftp kiln-tftp kiln "$run" "$TFTP_N" $TFTP_SIZE "$bs"
  done
done
[ "$ONLY" = tftp ] || for run in $(seq 1 "$RUNS"); do
  one_run http http nginx reference "$run" "$HTTP_N" $HTTP_SIZE 0
  one_run http http kiln-http kiln "$run" "$HTTP_N" $HTTP_SIZE 0
done

COMMAND="bash bench/boot-services.sh${ARGS[*]:+ ${ARGS[*]}}"
report_args=(report --jsonl "$JSONL" --command "$COMMAND" --commit "$COMMIT" --versions "$VERSIONS"
  --cpu-mode "$CPU_MODE" --load-start "$LOAD_START" --started-at "$STARTED_AT" --http-path "$HTTP_PATH"
  --benchmarks "$REPO/BENCHMARKS.md")
[ $QUICK = 1 ] && report_args+=(--quick)
[ $WRITE = 1 ] && report_args+=(--write)
python3 "$TMP/report.py" "${report_args[@]}"
rc=$?
[ $BROKEN = 1 ] && [ $rc = 0 ] && rc=1
exit $rc
