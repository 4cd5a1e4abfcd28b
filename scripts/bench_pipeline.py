"""Ingest peak against persist rate, on one Redis: ``scripts/bench --pipeline``.

1. The ingest peak: scripts/bench.py (C=10 connections, B=100-event frames,
   W=4 frames in flight) against the running server, DURATION s measured.
2. The persist rate of what that left in the stream, per store: one
   in-process worker (a fresh ``persist`` group at 0) until every entry is a
   row, timed; printed with persist/ingest. With ``--persist-workers K`` (K > 1),
   then K ``eventwire persist`` processes sharing a fresh group, timed the same
   way (scripts/bench_persist.py).
3. The same with realistic events (:func:`realistic_fill`): the stream made
   again by ``bench/loadgen.py`` at full speed, then one worker per store.
4. The sustained row: Redis flushed, an ``eventwire persist`` process on the
   first store, ``bench/loadgen.py --ledger`` (10 connections, 100-event
   frames, 4 in flight, paced at half the peak; a nacked frame is resent
   after ``retry_after_ms``, as any v1 client does) for SUSTAIN s; the
   backlog (pending + lag) is sampled each second; at the end the worker
   drains and the store must hold exactly the acked events.

Every phase prints the machine's load (1-minute average) and the CPU% the
other jobs took (``other``), since figures under load are noise.

usage: bench_pipeline.py --url WS --redis-url URL --server-pid PID --redis-pid PID
                         --dsn DSN [--dsn DSN ...] [--duration 8] [--sustain 60]
                         [--persist-workers K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis
from bench_persist import processes

from eventwire.core.config import Settings
from eventwire.core.rules import SiteConfig, SiteRules, SitesBook
from eventwire.heap import freeze_imports
from eventwire.persist.sinks import PostgresSink, open_sink, sqlite_path
from eventwire.persist.worker import PersistOptions, Worker

SITE = "bench"
STREAM = f"ew:{{{SITE}}}:events"
ROOT = Path(__file__).resolve().parents[1]


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def load_note(since: tuple[float, float], own_pct: float | None) -> str:
    """The machine's load since ``since``: 1-min average, busy %, and others' share."""
    busy0, total0 = since
    busy1, total1 = cpu_busy()
    cores = os.cpu_count() or 1
    machine = 100 * cores * (busy1 - busy0) / max(1.0, total1 - total0)
    text = f"load {os.getloadavg()[0]:.2f}, machine {machine:.0f}% of {cores * 100}% busy"
    if own_pct is None:
        return text + " (this run included)"
    return text + f", other jobs ~{max(0.0, machine - own_pct):.0f}%"


def ingest_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Run scripts/bench.py at 10:100:4 and return its JSON result."""
    out = subprocess.run(
        [sys.executable, "scripts/bench.py", "--url", args.url, "--redis-url", args.redis_url,
         "-c", "10", "-b", "100", "-w", "4", "--duration", str(args.duration),
         "--server-pid", str(args.server_pid), "--redis-pid", str(args.redis_pid), "--json"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"bench.py failed:\n{out.stdout}\n{out.stderr}")
    return rows[-1]


async def persist_rate(redis_url: str, dsn: str) -> tuple[int, float, float]:
    """One worker writing the whole stream (fresh group at 0) into ``dsn``: rows, seconds,
    and this process' CPU seconds meanwhile (the worker's loop and store thread)."""
    redis = aioredis.Redis.from_url(redis_url)
    with contextlib.suppress(aioredis.ResponseError):
        await redis.xgroup_destroy(STREAM, "persist")
    n = await redis.xlen(STREAM)
    settings = msgspec.convert({"redis_url": redis_url}, Settings)
    book = SitesBook(None, {SITE: SiteRules(SITE, SiteConfig(allow_no_origin=True))})
    sink = open_sink(dsn)
    await sink.open()
    worker = Worker(settings, book, PersistOptions(dsn=dsn), sink=sink)
    started, cpu = time.perf_counter(), time.process_time()
    await worker.start()
    freeze_imports()  # as `eventwire persist` does once started
    while True:
        (group,) = await redis.xinfo_groups(STREAM)
        if group["lag"] == 0 and group["pending"] == 0:
            break
        # Not more often: the poll runs on the worker's own loop and GIL (every
        # 10 ms, it was a sixth of the loop's samples); 50 ms is 0.25 % of a 20 s row.
        await asyncio.sleep(0.05)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await worker.stop()
    await redis.aclose()
    return n, elapsed, cpu


@contextlib.asynccontextmanager
async def fresh_store(dsn: str) -> AsyncIterator[str]:
    """An empty store beside ``dsn`` for the K-process row (the rows of the 1-worker row
    are the same events: into the same store they would only conflict): for SQLite a
    new file next to it, for PostgreSQL a new schema of this run in its database, each
    removed afterwards."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        path = sqlite_path(dsn).with_suffix(".workers.db")
        try:
            yield f"sqlite:///{path}"
        finally:
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
        return
    import asyncpg  # type: ignore[import-untyped]

    schema = f"eventwire_bench_{os.getpid()}"
    parts = urlsplit(dsn)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("search_path="))
    empty = parts._replace(query=f"{query}&search_path={schema}".lstrip("&")).geturl()
    conn = await asyncpg.connect(empty)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield empty
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


async def realistic_fill(args: argparse.Namespace) -> str:
    """The stream made again by ``bench/loadgen.py`` (10:100:4, DURATION s, no persist
    group: trimmed at ``stream_maxlen``): its events are a shop's (page visits,
    products, carts, checkouts; ~265 bytes) and their client times up to 5 s behind,
    as real clients' are. scripts/bench.py's events come in time order, so every
    index insert lands at an index's end; these land anywhere in the last seconds,
    which is what costs a store (SQLite writes each index page a batch touched)."""
    redis = aioredis.Redis.from_url(args.redis_url)
    with contextlib.suppress(aioredis.ResponseError):
        await redis.xgroup_destroy(STREAM, "persist")
    await redis.delete(STREAM)
    work, url = Path(tempfile.mkdtemp()), urlsplit(args.url)
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "loadgen.py", "--host", url.hostname or "127.0.0.1",
         "--port", str(url.port), "--site", SITE, "-c", "10", "-b", "100", "-w", "4",
         "-n", "1000000000", "--duration", str(args.duration), "--verify", "none",
         "--json", str(work / "load.json")],
        cwd=ROOT / "bench", capture_output=True, text=True, check=False,
    )  # fmt: skip
    out = work / "load.json"
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    n = await redis.xlen(STREAM)
    await redis.aclose()
    if not rows:
        raise SystemExit("bench/loadgen.py failed")
    return (
        f"realistic events (bench/loadgen.py, client times up to 5 s behind): "
        f"{rows[-1]['events_per_s']:,} events/s for {args.duration:g} s, {n:,} in the stream"
    )


async def sample_backlog(redis_url: str, stop: asyncio.Event, seen: list[int]) -> None:
    """The group's backlog (pending + lag) once a second until ``stop``."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        while not stop.is_set():
            try:
                (group,) = await redis.xinfo_groups(STREAM)
                seen.append(int(group["pending"]) + int(group["lag"] or 0))
            except (aioredis.ResponseError, ValueError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await redis.aclose()


async def sustained(args: argparse.Namespace, rate: float, dsn: str) -> str:
    """Half the peak for ``args.sustain`` s with a persist process: backlog and rows = acked."""
    redis = aioredis.Redis.from_url(args.redis_url)
    await redis.flushall()
    sites = Path(tempfile.mkdtemp()) / "sites.toml"
    sites.write_text(f'[sites.{SITE}]\norigins = ["http://localhost"]\nallow_no_origin = true\n')
    sink = open_sink(dsn)
    await sink.open()
    before = await sink.count(SITE)
    await sink.close()
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited on here
        [sys.executable, "-m", "eventwire", "persist", "--sites", str(sites),
         "--redis", args.redis_url, "--dsn", dsn],
        cwd=ROOT, env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not await redis.exists(STREAM):  # noqa: ASYNC110 - the worker made its group
        await asyncio.sleep(0.05)
    stop, seen = asyncio.Event(), []
    sampler = asyncio.create_task(sample_backlog(args.redis_url, stop, seen))
    # A client that resends what is nacked, as every v1 client must: once the
    # backlog is full the row shows what such a client gets (the store's pace),
    # not what a generator that drops nacked frames would count.
    work, conns, url = Path(tempfile.mkdtemp()), 10, urlsplit(args.url)
    load = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "loadgen.py", "--host", url.hostname or "127.0.0.1",
         "--port", str(url.port), "--site", SITE, "-c", str(conns), "-b", "100", "-w", "4",
         "-n", "1000000000",
         "--rate", f"{rate / conns:.0f}", "--duration", str(args.sustain),
         "--timeout", str(args.sustain + 300), "--verify", "none",
         "--ledger", str(work / "ledger"), "--json", str(work / "load.json")],
        cwd=ROOT / "bench", capture_output=True, text=True, check=False,
    )  # fmt: skip
    out = work / "load.json"
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    drain_started = time.monotonic()
    while True:
        (group,) = await redis.xinfo_groups(STREAM)
        if group["lag"] == 0 and group["pending"] == 0:
            break
        await asyncio.sleep(0.05)
    drain = time.monotonic() - drain_started
    stop.set()
    await sampler
    worker.terminate()
    worker.wait(30)
    # Every entry ever added is an acked event (session events included); the
    # stream itself was trimmed of stored ones past stream_maxlen.
    in_stream = int((await redis.xinfo_stream(STREAM))["entries-added"])
    await redis.aclose()
    sink = open_sink(dsn)
    await sink.open()
    stored = await sink.count(SITE) - before
    await sink.close()
    if not rows:
        return f"sustained: loadgen.py failed: {load.stdout[-300:]} {load.stderr[-500:]}"
    row = rows[-1]
    with (work / "ledger").open() as ledger:
        acked = sum(1 for _ in ledger)
    # Every event sent was acked in the end (resent after nacks), the ledger
    # holds each once, and the store holds every entry ever added.
    ok = row["ok"] and acked == row["accepted"] == row["sent_events"] and stored == in_stream
    return (
        f"sustained {args.sustain:g} s at {int(rate):,} ev/s (half the peak) into "
        f"{dsn.split(':')[0]}: achieved {row['events_per_s']:,} ev/s over "
        f"{row['elapsed_s']:.0f} s, accepted {row['accepted']:,} of {row['sent_events']:,} sent, "
        f"nacks {row['nacks']} (resent), backlog max {max(seen, default=0):,} (sampled 1/s), "
        f"drained {drain:.1f} s after; rows {stored:,} vs entries added {in_stream:,} "
        f"(accepted + server-made): {'OK' if ok else 'MISMATCH'}"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--redis-pid", type=int, required=True)
    parser.add_argument("--dsn", action="append", required=True)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--sustain", type=float, default=60.0)
    parser.add_argument("--persist-workers", type=int, default=1)
    args = parser.parse_args()
    since = cpu_busy()
    peak = await asyncio.to_thread(ingest_peak, args)
    eps = peak["events_per_s"]
    own = (peak["driver_cpu"] or 0) + (peak["server_cpu"] or 0) + (peak["redis_cpu"] or 0)
    print(
        f"ingest peak (C=10 B=100 W=4, {args.duration:g} s): {eps:,} events/s; driver "
        f"{peak['driver_cpu']:.0f}%, server {peak['server_cpu']:.0f}%, redis "
        f"{peak['redis_cpu']:.0f}%; verified {'OK' if peak['ok'] else 'FAILED'}; "
        f"{load_note(since, own)}",
        flush=True,
    )
    for dsn in args.dsn:
        since = cpu_busy()
        n, elapsed, cpu = await persist_rate(args.redis_url, dsn)
        rate = n / elapsed
        # Per CPU second, which the other jobs' load moves far less than rows/s.
        server_eps = eps / max((peak["server_cpu"] or 0) / 100, 1e-9)
        print(
            f"persist into {dsn.split(':')[0]} (1 worker): {n:,} rows in {elapsed:.2f} s = "
            f"{rate:,.0f} rows/s = {rate / eps:.2f}x ingest; worker CPU {cpu:.1f} s = "
            f"{n / cpu:,.0f} rows per CPU-s against the server's {server_eps:,.0f} events per "
            f"CPU-s ({n / cpu / server_eps:.2f}x); {load_note(since, 100 * cpu / elapsed)}",
            flush=True,
        )
        if args.persist_workers > 1:
            since = cpu_busy()
            k = args.persist_workers
            async with fresh_store(dsn) as empty:
                redis = aioredis.Redis.from_url(args.redis_url)
                elapsed = await processes(redis, args.redis_url, empty, k, PostgresSink.WRITERS)
                n = await redis.xlen(STREAM)  # with the session ends that came after the peak
                await redis.aclose()
                check = open_sink(empty)
                await check.open()
                stored = await check.count(SITE)
                await check.close()
            if stored != n:
                raise SystemExit(f"{k} worker processes stored {stored:,} rows of {n:,}")
            print(
                f"persist into {dsn.split(':')[0]} ({k} worker processes): {n:,} rows in "
                f"{elapsed:.2f} s = {n / elapsed:,.0f} rows/s = {n / elapsed / eps:.2f}x ingest; "
                f"{load_note(since, None)}",
                flush=True,
            )
    since = cpu_busy()
    sent = await realistic_fill(args)
    print(f"{sent}; {load_note(since, None)}", flush=True)
    for dsn in args.dsn:
        since = cpu_busy()
        n, elapsed, cpu = await persist_rate(args.redis_url, dsn)
        print(
            f"persist of these into {dsn.split(':')[0]} (1 worker): {n:,} rows in "
            f"{elapsed:.2f} s = {n / elapsed:,.0f} rows/s = {n / elapsed / eps:.2f}x ingest; "
            f"worker CPU {cpu:.1f} s; {load_note(since, 100 * cpu / elapsed)}",
            flush=True,
        )
    if args.sustain > 0:
        since = cpu_busy()
        line = await sustained(args, eps / 2, args.dsn[0])
        print(f"{line}; {load_note(since, None)}", flush=True)
    return 0 if peak["ok"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
