#!/usr/bin/env python3
"""Inventory benchmark: enroll a fleet through kiln's REST API, then time
filtered listings, on SQLite and on PostgreSQL, in one run.

For each backend it starts `kiln server` (a fresh temporary data directory;
for PostgreSQL also a fresh database, dropped at the end), creates an admin
token offline, a site, racks and tenants, and then measures:

  * import: one `POST /api/v1/machines/bulk` carrying the whole fleet
    (10,000 machines, 100 per rack), wall clock from send to full response;
  * list: `GET /api/v1/machines?<filter>&limit=100` over one keep-alive
    connection, cycling over filters that each match at least 100 machines
    (tags, state, owner, rack, site with deep cursors, hostname substring);
    p50 / p99 / max after a warm-up;
  * get one: `GET /api/v1/machines/{hostname}`, p50 / p99.

Before timing, every filter is walked to its end and its count and contents
are checked against the generated fleet, so a fast wrong answer fails.

Targets (from the issue): import of 10,000 under 10 s; a filtered page of 100
out of 10,000 under 20 ms p99. Reference point: MAAS users report about 40 s
to list 100 machines.

    python3 bench/inventory.py [--quick] [--write] [--backends sqlite,postgres]

--quick: 2,000 machines and 100 list requests; checks correctness only and
never fails on targets (for CI). --write: record the results in
BENCHMARKS.md between `<!-- inventory:begin -->` and `<!-- inventory:end -->`.
On PostgreSQL the list is measured twice: as kiln leaves the database
after the import (no planner statistics unless autovacuum ran), and again
after the bench runs `ANALYZE` (full runs only).

A full run exits with code 3 when a target is missed (after printing and
writing the results); any failed step exits 1. Python 3.11 stdlib only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN = "<!-- inventory:begin -->"
END = "<!-- inventory:end -->"

IMPORT_TARGET_S = 10.0  # for 10,000 machines
LIST_TARGET_P99_MS = 20.0  # a page of 100 out of 10,000
MAAS_REFERENCE = "MAAS users report about 40 s to list 100 machines"

SITE = "bench"
MACHINES_PER_RACK = 100
OWNERS = ["acme", "globex", "initech"]  # machine i: OWNERS[i % 4], none when i % 4 == 3
STATES = ["ready", "deployed", "new"]  # machine i: STATES[i % 3]
DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432/postgres"
WARMUP = 20


class BenchError(Exception):
    """A step failed: the message says which and why."""


class Interrupted(BaseException):
    """A signal asked us to stop; cleanup still runs."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Fleet


def hostname(i: int) -> str:
    return f"node{i:05d}"


def rack_name(r: int) -> str:
    return f"r{r:02d}"


def machine(i: int) -> dict:
    rack = i // MACHINES_PER_RACK
    slot = i % MACHINES_PER_RACK
    hi, lo = divmod(i, 256)
    m = {
        "hostname": hostname(i),
        "rack": rack_name(rack),
        "site": SITE,
        "tags": ["gpu" if i % 10 == 0 else "cpu", "fleet"],
        "state": STATES[i % 3],
        "nics": [
            {
                "mac": f"02:00:00:00:{hi:02x}:{lo:02x}",
                "switch": f"asw-{rack_name(rack)}",
                "port": f"xe-0/0/{slot}",
                "vlan": 100,
            }
        ],
        "ipv4": f"10.0.{hi}.{lo}",
        "bmc": {
            "driver": "ipmi",
            "address": f"10.100.{hi}.{lo}",
            "username": "root",
            "password": "bench-pw",
        },
    }
    owner = i % 4
    if owner < len(OWNERS):
        m["owner"] = OWNERS[owner]
    return m


@dataclass
class Filter:
    """One listing the benchmark times: its query and how to check an item."""

    label: str
    query: dict
    match: Callable[[dict], bool]
    cursor_page: int = 0  # which page of the listing to time (0 = first)
    cursor: str | None = None  # filled in by the verification walk
    expected: int = 0  # machines that match, computed from the fleet


def make_filters(fleet: list[dict], racks: int) -> list[Filter]:
    n = len(fleet)
    last_rack = rack_name(racks - 1)
    filters = [
        Filter("tag=fleet", {"tag": "fleet"}, lambda m: "fleet" in m["tags"]),
        Filter("tag=gpu,fleet", {"tag": "gpu,fleet"}, lambda m: {"gpu", "fleet"} <= set(m["tags"])),
        Filter(
            "tag=cpu&state=ready",
            {"tag": "cpu", "state": "ready"},
            lambda m: "cpu" in m["tags"] and m["state"] == "ready",
        ),
        Filter(
            "owner=acme&state=deployed",
            {"owner": "acme", "state": "deployed"},
            lambda m: m.get("owner") == "acme" and m["state"] == "deployed",
        ),
        Filter("site=bench", {"site": SITE}, lambda m: m.get("site") == SITE),
        Filter(
            f"site=bench, page {n // 200 + 1}",
            {"site": SITE},
            lambda m: m.get("site") == SITE,
            cursor_page=n // 200,
        ),
        Filter(
            f"site=bench, page {n // 100} (last)",
            {"site": SITE},
            lambda m: m.get("site") == SITE,
            cursor_page=n // 100 - 1,
        ),
        Filter("q=node0", {"q": "node0"}, lambda m: "node0" in m["hostname"]),
        Filter("rack=r07", {"rack": "r07"}, lambda m: m.get("rack") == "r07"),
        Filter(
            f"rack={last_rack}&site=bench",
            {"rack": last_rack, "site": SITE},
            lambda m: m.get("rack") == last_rack and m.get("site") == SITE,
        ),
    ]
    for f in filters:
        f.expected = sum(1 for m in fleet if f.match(m))
        remaining = f.expected - f.cursor_page * 100
        if remaining < 100:
            raise BenchError(f"filter {f.label} leaves {remaining} machines on its page; the bench needs >= 100")
    return filters


# --------------------------------------------------------------------------
# HTTP


class Api:
    """A keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, token: str, timeout: float = 30.0):
        self.port = port
        self.token = token
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def raw(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None):
        """Sends one request; returns (status, body bytes, seconds from send to last byte)."""
        conn = self._connect()
        conn.sock.settimeout(timeout or self.timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        t0 = time.perf_counter()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise BenchError(f"{method} {path}: no answer from the server ({type(e).__name__}: {e})") from e
        elapsed = time.perf_counter() - t0
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        return resp.status, data, elapsed

    def call(self, method: str, path: str, doc=None, expect: int = 200, timeout: float | None = None):
        body = None if doc is None else json.dumps(doc).encode()
        status, data, elapsed = self.raw(method, path, body, timeout)
        if status != expect:
            text = data[:600].decode("utf-8", "replace")
            raise BenchError(f"{method} {path}: HTTP {status}, expected {expect}: {text}")
        try:
            return json.loads(data) if data else None, elapsed
        except json.JSONDecodeError as e:
            raise BenchError(f"{method} {path}: the answer is not JSON: {e}") from e


def list_path(query: dict, limit: int, cursor: str | None = None) -> str:
    q = dict(query, limit=limit)
    if cursor:
        q["cursor"] = cursor
    return "/api/v1/machines?" + urllib.parse.urlencode(q)


# --------------------------------------------------------------------------
# Processes, databases, cleanup


class Cleanup:
    """Undo actions, run last-in first-out, each at most once, whatever fails."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.actions.append((what, action))

    def run(self) -> bool:
        ok = True
        while self.actions:
            what, action = self.actions.pop()
            try:
                action()
            except BaseException as e:  # keep cleaning up
                ok = False
                log(f"cleanup: {what} failed: {e}")
        return ok


def child_env() -> dict:
    """Our environment without KILN_* variables, so that nothing from the
    caller's shell (KILN_DATABASE_URL, KILN_DATA_DIR, …) changes a run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.setdefault("RUST_BACKTRACE", "1")
    return env


def run_cmd(args: list[str], what: str, timeout: float = 120) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=child_env())
    except FileNotFoundError as e:
        raise BenchError(f"{what}: cannot run {args[0]}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: `{' '.join(args[:3])} …` did not finish in {timeout:.0f} s") from e
    if p.returncode != 0:
        raise BenchError(f"{what}: exit code {p.returncode}\n{p.stderr.strip()[-2000:]}")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_base_url() -> str:
    return os.environ.get("KILN_TEST_POSTGRES_URL") or DEFAULT_PG_URL


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def psql(url: str, sql: str, what: str) -> str:
    return run_cmd(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-qAt", "-d", url, "-c", sql], what, timeout=60).strip()


def create_pg_database(cleanup: Cleanup) -> str:
    base = pg_base_url()
    name = f"kiln_bench_{secrets.token_hex(4)}"
    psql(base, f'CREATE DATABASE "{name}"', f"creating PostgreSQL database {name} (at {redact(base)})")

    def drop() -> None:
        psql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"dropping database {name}")
        log(f"dropped database {name}")

    cleanup.push(f"drop database {name}", drop)
    log(f"created database {name}")
    return with_database(base, name)


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def start_server(kiln: Path, data_dir: Path, db_url: str | None, cleanup: Cleanup) -> Server:
    port = free_port()
    log_path = data_dir.parent / "server.log"
    args = [str(kiln), "server", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", "--log", "warn"]
    if db_url:
        args += ["--database-url", db_url]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=child_env())
    log_file.close()
    server = Server(proc, port, log_path)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to this PID: kiln shuts down gracefully
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log(f"server pid {proc.pid} ignored SIGTERM for 20 s; killing it")
                proc.kill()
                proc.wait(timeout=10)
        log(f"server pid {proc.pid} stopped (exit code {proc.returncode})")

    cleanup.push(f"stop server pid {proc.pid}", stop)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise BenchError(f"kiln server exited with code {proc.returncode} before answering /healthz:\n{server.log_tail()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200 and body.strip() == b"ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"kiln server on port {port} did not answer /healthz `ok` within 60 s:\n{server.log_tail()}")
        time.sleep(0.1)
    log(f"server pid {proc.pid} ready on 127.0.0.1:{port}")
    return server


# --------------------------------------------------------------------------
# Measurements


def pct(samples: list[float], p: int) -> float:
    """The p-th percentile (inclusive method; p in 1..99)."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


@dataclass
class Row:
    """One line of the results table: a backend in one database state."""

    backend: str
    label: str
    machines: int
    import_s: float | None = None  # None: same database as the row above
    list_ms: list[float] = field(default_factory=list)
    list_by_filter: dict[str, list[float]] = field(default_factory=dict)
    get_ms: list[float] = field(default_factory=list)
    note: str = ""


def verify_filter(api: Api, f: Filter) -> None:
    """Walks `f` to its end (pages of 1,000) and checks count and contents;
    records the cursor of the page the timing loop asks for."""
    seen = 0
    cursor = None
    last = ""
    while True:
        page, _ = api.call("GET", list_path(f.query, 1000, cursor))
        items = page["items"]
        for m in items:
            if not f.match(m):
                raise BenchError(f"filter {f.label}: machine {m.get('hostname')} does not match it: {json.dumps(m)[:400]}")
            if m["hostname"] <= last:
                raise BenchError(f"filter {f.label}: {m['hostname']} comes after {last}: not sorted by hostname")
            last = m["hostname"]
        seen += len(items)
        cursor = page.get("next_cursor")
        if not cursor:
            break
        if not items:
            raise BenchError(f"filter {f.label}: an empty page with a next_cursor")
    if seen != f.expected:
        raise BenchError(f"filter {f.label}: the listing has {seen} machines, expected {f.expected}")
    if f.cursor_page:
        # Reach the page the way a client does: following 100-item pages.
        cursor = None
        for _ in range(f.cursor_page):
            page, _ = api.call("GET", list_path(f.query, 100, cursor))
            cursor = page.get("next_cursor")
            if not cursor:
                raise BenchError(f"filter {f.label}: the listing ended before page {f.cursor_page + 1}")
        f.cursor = cursor


def measure(api: Api, row: Row, filters: list[Filter], n: int, list_requests: int, get_requests: int) -> None:
    """Times list pages and single gets on one keep-alive connection."""

    def list_once(i: int) -> tuple[Filter, float]:
        f = filters[i % len(filters)]
        path = list_path(f.query, 100, f.cursor)
        status, data, elapsed = api.raw("GET", path)
        if status != 200:
            raise BenchError(f"{row.label}: GET {path}: HTTP {status}: {data[:400].decode('utf-8', 'replace')}")
        items = json.loads(data)["items"]
        if len(items) != 100:
            raise BenchError(f"{row.label}: GET {path}: {len(items)} items, expected 100")
        if not all(f.match(m) for m in items):
            raise BenchError(f"{row.label}: GET {path}: an item does not match the filter")
        return f, elapsed * 1000

    for i in range(WARMUP):
        list_once(i)
    for i in range(list_requests):
        f, ms = list_once(i)
        row.list_ms.append(ms)
        row.list_by_filter.setdefault(f.label, []).append(ms)

    def get_once(i: int) -> float:
        h = hostname((i * 7919) % n)
        status, data, elapsed = api.raw("GET", f"/api/v1/machines/{h}")
        if status != 200:
            raise BenchError(f"{row.label}: GET /api/v1/machines/{h}: HTTP {status}: {data[:400].decode('utf-8', 'replace')}")
        if json.loads(data).get("hostname") != h:
            raise BenchError(f"{row.label}: GET /api/v1/machines/{h} answered another machine")
        return elapsed * 1000

    for i in range(WARMUP):
        get_once(i)
    row.get_ms = [get_once(WARMUP + i) for i in range(get_requests)]


STATS_TABLES = ("machines", "machine_tags", "nics")


def pg_analyzed(db_url: str) -> list[str]:
    """The inventory tables PostgreSQL has planner statistics for."""
    names = ", ".join(f"'{t}'" for t in STATS_TABLES)
    out = psql(
        db_url,
        f"SELECT relname FROM pg_stat_user_tables WHERE relname IN ({names}) "
        "AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL) ORDER BY relname",
        "asking PostgreSQL which tables have statistics",
    )
    return out.split()


def bench_backend(backend: str, kiln: Path, n: int, list_requests: int, get_requests: int, after_analyze: bool) -> list[Row]:
    cleanup = Cleanup()
    rows: list[Row] = []
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"kiln-bench-{backend}-"))
        cleanup.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
        data_dir = tmp / "data"
        db_url = None
        if backend == "postgres":
            db_url = create_pg_database(cleanup)
            version = psql(db_url, "SHOW server_version", "asking the PostgreSQL version").split()[0]
            autovacuum = psql(db_url, "SHOW autovacuum", "asking whether autovacuum runs")
            version_note = f"PostgreSQL {version} (autovacuum {autovacuum})"
        else:
            version_note = "SQLite (embedded, WAL)"

        token_args = [str(kiln), "token", "create", "--data-dir", str(data_dir), "--role", "admin", "--name", "bench"]
        if db_url:
            token_args += ["--database-url", db_url]
        token = run_cmd(token_args, f"{backend}: creating the admin token offline").strip()
        if not re.fullmatch(r"\S{16,}", token):
            raise BenchError(f"{backend}: `kiln token create` printed {token!r}, not a token")

        server = start_server(kiln, data_dir, db_url, cleanup)
        api = Api(server.port, token)
        cleanup.push("close the client connection", api.close)
        try:
            racks = n // MACHINES_PER_RACK
            api.call("POST", "/api/v1/sites", {"name": SITE}, expect=201)
            for r in range(racks):
                api.call("POST", "/api/v1/racks", {"name": rack_name(r), "site": SITE}, expect=201)
            for t in OWNERS:
                api.call("POST", "/api/v1/tenants", {"name": t}, expect=201)

            fleet = [machine(i) for i in range(n)]
            filters = make_filters(fleet, racks)
            body = json.dumps({"machines": fleet}).encode()
            log(f"{backend}: importing {n:,} machines in one request ({len(body) / 1e6:.1f} MB)")
            status, data, elapsed = api.raw("POST", "/api/v1/machines/bulk", body, timeout=600)
            if status != 201:
                raise BenchError(f"{backend}: bulk import: HTTP {status}, expected 201: {data[:800].decode('utf-8', 'replace')}")
            created = json.loads(data)
            if len(created) != n or len({m["hostname"] for m in created}) != n:
                raise BenchError(f"{backend}: bulk import answered {len(created)} machines, expected {n} distinct")
            log(f"{backend}: import took {elapsed:.2f} s")

            # Correctness before speed: every filter, walked to its end.
            for f in filters:
                verify_filter(api, f)
            log(f"{backend}: counts and contents of {len(filters)} filters check out")

            if backend == "sqlite":
                row = Row(backend, "sqlite", n, import_s=elapsed, note=version_note)
                measure(api, row, filters, n, list_requests, get_requests)
                rows.append(row)
            else:
                # As kiln leaves the database: PostgreSQL plans with whatever
                # statistics it has, which right after the import is none
                # unless autovacuum got there first.
                before = pg_analyzed(db_url)
                label = "postgres" if before else "postgres, no statistics"
                row = Row(backend, label, n, import_s=elapsed, note=version_note)
                measure(api, row, filters, n, list_requests, get_requests)
                after = pg_analyzed(db_url)
                if after != before:
                    row.note += f"; autovacuum analyzed {', '.join(sorted(set(after) - set(before)))} during this measurement"
                elif not after:
                    row.note += "; planner statistics: none (kiln does not ANALYZE after an import)"
                else:
                    row.note += f"; planner statistics for {', '.join(after)} (autovacuum)"
                rows.append(row)
                if after_analyze:
                    # What autovacuum would produce on a default setup.
                    psql(db_url, "ANALYZE", "running ANALYZE")
                    row = Row(backend, "postgres, after ANALYZE", n, note="same database after the bench ran `ANALYZE`")
                    measure(api, row, filters, n, list_requests, get_requests)
                    rows.append(row)
        except BenchError as e:
            if server.proc.poll() is not None:
                raise BenchError(f"{e}\nthe server exited with code {server.proc.returncode}:\n{server.log_tail()}") from e
            raise
        if server.proc.poll() is not None:
            raise BenchError(f"{backend}: the server died during the run:\n{server.log_tail()}")
        return rows
    finally:
        if not cleanup.run():
            raise BenchError(f"{backend}: cleanup failed (see above)")


# --------------------------------------------------------------------------
# Reporting


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def machine_facts(load_at_start: str) -> dict:
    facts = {}
    try:
        facts["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        facts["nproc"] = str(len(os.sched_getaffinity(0)))
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts["cpu"] = model
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    facts["kernel"] = platform.release()
    facts["load"] = f"{load_at_start} at the start, {loadavg()} at the end"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", ".", ":!bench", ":!BENCHMARKS.md"],
        cwd=REPO, capture_output=True, text=True,
    ).stdout.strip()
    facts["commit"] = (commit or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    return facts


def ratio(measured: float, target: float) -> str:
    return f"{measured / target:.2f}×"


def fmt_ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def tables(rows: list[Row], n: int) -> tuple[str, str]:
    main = [
        f"| backend | import {n:,} (s) | vs target 10 s | list 100 of {n:,} p50 (ms) | p99 (ms) | max (ms) "
        f"| vs target 20 ms p99 | get one p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p50, p99 = pct(r.list_ms, 50), pct(r.list_ms, 99)
        if r.import_s is None:
            imp = "| (same data) | |"
        else:
            imp = f"| {r.import_s:.2f} | {ratio(r.import_s, IMPORT_TARGET_S)} of target |"
        main.append(
            f"| {r.label} {imp} {fmt_ms(p50)} | {fmt_ms(p99)} | {fmt_ms(max(r.list_ms))} "
            f"| {ratio(p99, LIST_TARGET_P99_MS)} of target | {fmt_ms(pct(r.get_ms, 50))} / {fmt_ms(pct(r.get_ms, 99))} |"
        )
    detail = [
        "| filter (limit=100) | " + " | ".join(f"{r.label}: p50 / max (ms)" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for label in rows[0].list_by_filter:
        cells = []
        for r in rows:
            s = r.list_by_filter.get(label, [])
            cells.append(f"{fmt_ms(statistics.median(s))} / {fmt_ms(max(s))}" if s else "-")
        detail.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(main), "\n".join(detail)


def missed_targets(rows: list[Row]) -> list[str]:
    missed = []
    for r in rows:
        if r.import_s is not None and r.import_s > IMPORT_TARGET_S:
            missed.append(f"{r.label}: import of {r.machines:,} took {r.import_s:.2f} s (target {IMPORT_TARGET_S:.0f} s)")
        p99 = pct(r.list_ms, 99)
        if p99 > LIST_TARGET_P99_MS:
            missed.append(f"{r.label}: list p99 {p99:.1f} ms (target {LIST_TARGET_P99_MS:.0f} ms)")
    return missed


def notes(rows: list[Row]) -> list[str]:
    return [f"{r.label}: {r.note}" for r in rows if r.note]


HEADER = f"""# Benchmarks

What is measured, and how to reproduce it. Numbers depend on the machine;
each section says which one, and the commit it ran.

## Inventory: enroll and list

`bench/inventory.py` (run through `bench/inventory.sh`, which builds the
release binary first) starts `kiln server` on SQLite and then on PostgreSQL
(a fresh database, dropped afterwards), and through the REST API:

- **import**: enrolls 10,000 machines (100 racks of 100; tags, three states,
  three owners, a NIC with switch port, an IPv4 and an IPMI BMC with a
  password each) in one `POST /api/v1/machines/bulk`, timed from send to the
  full response. Target: under 10 s.
- **list**: `GET /api/v1/machines?…&limit=100` on one keep-alive connection,
  cycling over ten filters that each match at least 100 machines (tags,
  tag + state, owner + state, rack, site on the first, middle and last page,
  hostname substring); every answer must hold 100 machines. p50 / p99 / max
  after 20 warm-up requests. Target: p99 under 20 ms. For scale: {MAAS_REFERENCE}.
- **get one**: `GET /api/v1/machines/{{hostname}}`, p50 / p99.

Before anything is timed, each filter is walked to its end and its count and
contents are checked against the generated fleet.

PostgreSQL gets two rows. The first is the database as kiln leaves it right
after the import: kiln does not `ANALYZE`, so unless autovacuum has run the
planner has no statistics for the new rows. The second is the same database
after the bench runs `ANALYZE` (what autovacuum does on a default setup,
within about a minute). Targets apply to every row; a full run exits with
code 3 when one is missed, after printing and recording the results.

Reproduce (needs PostgreSQL; `KILN_TEST_POSTGRES_URL`, default
`{DEFAULT_PG_URL}`):

    bash bench/inventory.sh --write    # full run, updates the section below
    bash bench/inventory.sh --quick    # 2,000 machines, correctness only (CI)

"""


def render_section(rows: list[Row], n: int, list_requests: int, get_requests: int, facts: dict, command: str) -> str:
    main, detail = tables(rows, n)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    missed = missed_targets(rows)
    verdict = "all targets met." if not missed else "targets missed: " + "; ".join(missed) + "."
    row_notes = "\n".join(f"- {x}" for x in notes(rows))
    return f"""{BEGIN}
### Results ({now})

Command: `{command}`

- Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts.get('memory', '?')} RAM, Linux {facts['kernel']}; 1-minute load average {facts['load']}.
- Commit: `{facts['commit']}`.
- {n:,} machines; per row {list_requests} list and {get_requests} get requests after {WARMUP} warm-up requests each.
{row_notes}

{main}

Verdict: {verdict}
Reference point: {MAAS_REFERENCE}; there is no MAAS here to run, so that figure is theirs, not measured.

List latency by filter:

{detail}
{END}"""


def write_benchmarks(section: str) -> None:
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    if not text.endswith("\n"):
        text += "\n"
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)


# --------------------------------------------------------------------------


def on_signal(signum, _frame):
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 machines, 100 list requests; never fails on targets")
    ap.add_argument("--write", action="store_true", help="record the results in BENCHMARKS.md")
    ap.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres (default both)")
    ap.add_argument("--kiln", type=Path, default=REPO / "target/release/kiln", help="the kiln binary")
    args = ap.parse_args()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("sqlite", "postgres"):
            print(f"error: unknown backend `{b}`: use sqlite and/or postgres", file=sys.stderr)
            return 2
    if not args.kiln.is_file():
        print(f"error: no kiln binary at {args.kiln}: build it with `cargo build --release -p kiln`", file=sys.stderr)
        return 2
    n = 2_000 if args.quick else 10_000
    list_requests = 100 if args.quick else 300
    get_requests = 100 if args.quick else 300

    if os.environ.get("KILN_BENCH_WRAPPER"):
        command = "bash bench/inventory.sh " + " ".join(sys.argv[1:])
    else:
        command = "python3 bench/inventory.py " + " ".join(sys.argv[1:])
    command = command.strip()

    rows: list[Row] = []
    load_at_start = loadavg()
    try:
        for b in backends:
            log(f"--- {b}: {n:,} machines")
            rows += bench_backend(b, args.kiln, n, list_requests, get_requests, after_analyze=not args.quick)
    except BenchError as e:
        print(f"\nbench FAILED: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"\nbench interrupted: {e} (servers, databases and temp dirs were cleaned up)", file=sys.stderr)
        return 130

    facts = machine_facts(load_at_start)
    main_table, detail = tables(rows, n)
    print()
    print(f"kiln inventory benchmark: {n:,} machines, {list_requests} list requests per row")
    print(f"machine: nproc {facts['nproc']}, CPU {facts['cpu']}, {facts.get('memory', '?')} RAM, load average {facts['load']}")
    print(f"commit: {facts['commit']}")
    for x in notes(rows):
        print(x)
    print()
    print(main_table)
    print()
    print(detail)
    print()
    print(f"reference: {MAAS_REFERENCE} (not run here)")
    missed = missed_targets(rows)
    if args.quick:
        print("quick mode: counts checked; targets are for 10,000 machines and not enforced")
    if args.write:
        write_benchmarks(render_section(rows, n, list_requests, get_requests, facts, command))
        print(f"wrote {BENCHMARKS.relative_to(REPO)}")
    if missed and not args.quick:
        print("\nbench: TARGET MISSED (results above" + (" and in BENCHMARKS.md" if args.write else "") + "): "
              + "; ".join(missed), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
