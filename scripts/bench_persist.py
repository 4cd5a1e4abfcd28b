"""Measure the persist worker: rows per second into a store.

Fills a site's events stream in a private Redis with N stored events (the
JSON the server writes), then runs one worker (server/persist) until every
row is in the store, and prints rows/s. Used by ``scripts/bench --persist N``.

usage: bench_persist.py --redis-url URL --dsn sqlite:///PATH|postgresql://... [-n 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import msgspec
import redis.asyncio as aioredis

from eventwire.core.config import Settings
from eventwire.core.records import StoredEvent
from eventwire.core.rules import SiteConfig, SiteRules, SitesBook
from eventwire.persist.sinks import open_sink
from eventwire.persist.worker import PersistOptions, Worker

SITE = "bench"


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("-n", type=int, default=50_000)
    args = parser.parse_args()
    redis = aioredis.Redis.from_url(args.redis_url)
    await redis.delete(f"ew:{{{SITE}}}:events")
    await fill(redis, args.n)
    settings = msgspec.convert({"redis_url": args.redis_url}, Settings)
    book = SitesBook(None, {SITE: SiteRules(SITE, SiteConfig(allow_no_origin=True))})
    sink = open_sink(args.dsn)
    await sink.open()
    before = await sink.count(SITE)
    worker = Worker(settings, book, PersistOptions(dsn=args.dsn), sink=sink)
    started = time.perf_counter()
    await worker.start()
    # The worker's own count: polling the store with count(*) would take the
    # sink's lock (and SQLite's file) from the worker it measures.
    while worker.rows_written < args.n:  # noqa: ASYNC110 - polling the worker is the point
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await worker.stop()
    await redis.aclose()
    check = open_sink(args.dsn)
    await check.open()
    stored = await check.count(SITE) - before
    await check.close()
    if stored != args.n:
        raise SystemExit(f"{stored} rows stored of {args.n}")
    store = args.dsn.split(":", 1)[0]
    print(f"persist into {store}: {args.n} rows in {elapsed:.2f} s: {args.n / elapsed:,.0f} rows/s")


if __name__ == "__main__":
    asyncio.run(main())
