"""Measure the persist worker: rows per second into a store.

Fills a site's events stream in a private Redis with N stored events (the
JSON the server writes), then runs one worker (server/persist) until every
row is in the store, and prints rows/s. Used by ``scripts/bench --persist N``.

With ``--workers K`` (K > 1) it starts K ``eventwire persist`` processes on
the same group instead (they share the stream), timed from the first entry
read until the group has acknowledged every entry.

usage: bench_persist.py --redis-url URL --dsn sqlite:///PATH|postgresql://... [-n 50000]
                        [--workers K] [--pg-writers W]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from eventwire.core.config import Settings
from eventwire.core.records import StoredEvent
from eventwire.core.rules import SiteConfig, SiteRules, SitesBook
from eventwire.heap import freeze_imports
from eventwire.persist.sinks import PostgresSink, open_sink
from eventwire.persist.worker import PersistOptions, Worker

SITE = "bench"
ROOT = Path(__file__).resolve().parents[1]


async def fill(redis: aioredis.Redis, n: int) -> None:
    """XADD n stored events of 50 customers, 1000 per pipeline (new producers each run)."""
    now = int(time.time() * 1000)
    run = secrets.token_hex(4)
    enc = msgspec.json.Encoder()
    for start in range(0, n, 1000):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            event = StoredEvent(
                site=SITE,
                uuid=f"cust-{i % 50}",
                session=f"s-{i % 50:014d}",
                producer=f"bench-{run}-{i % 50}",
                seq=i + 1,
                action="product.view",
                label="Viewed product",
                time=now,
                received=now,
                params={"url": f"https://shop.example/p/{i}", "sku": f"S{i}", "price": 12.5},
            )
            pipe.xadd(f"ew:{{{SITE}}}:events", {"event": enc.encode(event)})
        await pipe.execute()


async def processes(
    redis: aioredis.Redis, redis_url: str, dsn: str, workers: int, pg_writers: int
) -> float:
    """Seconds ``workers`` ``eventwire persist`` processes (a fresh group) take to store
    the whole stream, from the first entry read."""
    stream = f"ew:{{{SITE}}}:events"
    with contextlib.suppress(aioredis.ResponseError):
        await redis.xgroup_destroy(stream, "persist")
    sites = Path(tempfile.mkdtemp()) / "sites.toml"
    sites.write_text(f"[sites.{SITE}]\nallow_no_origin = true\n")
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started here, stopped below
            [
                sys.executable,
                "-m",
                "eventwire",
                "persist",
                "--sites",
                str(sites),
                "--redis",
                redis_url,
                "--dsn",
                dsn,
                "--pg-writers",
                str(pg_writers),
            ],
            cwd=ROOT,
            env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    started = None
    try:
        while True:
            groups = []
            with contextlib.suppress(aioredis.ResponseError):
                groups = await redis.xinfo_groups(stream)
            if groups:
                (group,) = groups
                if started is None and int(group["entries-read"] or 0) > 0:
                    started = time.perf_counter()
                if started is not None and group["lag"] == 0 and group["pending"] == 0:
                    return time.perf_counter() - started
            await asyncio.sleep(0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--pg-writers",
        type=int,
        default=PostgresSink.WRITERS,
        help="each worker's PostgreSQL writing connections (persist_pg_writers)",
    )
    args = parser.parse_args()
    redis = aioredis.Redis.from_url(args.redis_url)
    await redis.delete(f"ew:{{{SITE}}}:events")
    await fill(redis, args.n)
    store = args.dsn.split(":", 1)[0]
    if args.workers > 1:
        check = open_sink(args.dsn)
        await check.open()
        before = await check.count(SITE)
        elapsed = await processes(redis, args.redis_url, args.dsn, args.workers, args.pg_writers)
        stored = await check.count(SITE) - before
        await check.close()
        await redis.aclose()
        if stored != args.n:
            raise SystemExit(f"{stored} rows stored of {args.n}")
        print(
            f"persist into {store} ({args.workers} worker processes): {args.n} rows in "
            f"{elapsed:.2f} s: {args.n / elapsed:,.0f} rows/s; load {os.getloadavg()[0]:.2f}"
        )
        return
    settings = msgspec.convert({"redis_url": args.redis_url}, Settings)
    book = SitesBook(None, {SITE: SiteRules(SITE, SiteConfig(allow_no_origin=True))})
    options = PersistOptions(dsn=args.dsn, pg_writers=args.pg_writers)
    sink = open_sink(args.dsn, options.pg_writers)
    await sink.open()
    before = await sink.count(SITE)
    worker = Worker(settings, book, options, sink=sink)
    started, cpu = time.perf_counter(), time.process_time()
    await worker.start()
    freeze_imports()  # as `eventwire persist` does once started
    # The worker's own count: polling the store with count(*) would take the
    # sink's lock (and SQLite's file) from the worker it measures.
    while worker.rows_written < args.n:  # noqa: ASYNC110 - polling the worker is the point
        await asyncio.sleep(0.01)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await worker.stop()
    await redis.aclose()
    check = open_sink(args.dsn)
    await check.open()
    stored = await check.count(SITE) - before
    await check.close()
    if stored != args.n:
        raise SystemExit(f"{stored} rows stored of {args.n}")
    print(
        f"persist into {store}: {args.n} rows in {elapsed:.2f} s: {args.n / elapsed:,.0f} rows/s; "
        f"worker CPU {cpu:.2f} s = {args.n / cpu:,.0f} rows per CPU-s; "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
