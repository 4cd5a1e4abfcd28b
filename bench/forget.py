"""What ``eventwire forget`` costs on a big stream: one private redis-server, loopback only.

Fills one site's events stream with N stored events (``--entries``, default
1,000,000; ~330 bytes of JSON each, like the tracker's), ``--mine`` of them
(default 100) of the customer to forget, spread over the stream, then times
the Redis side of forget (the whole-stream search and the deletes) as
``eventwire forget`` runs it, and a dry run. Prints one line per figure and
the load of the machine (the other jobs' CPU). Bounded: the fill is
pipelined, the search reads pages of 1,000.

    PYTHONPATH=. .venv/bin/python bench/forget.py [--entries N] [--mine M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time

import redis.asyncio as aioredis

from eventwire.store import Keys
from eventwire.store.privacy import forget_customers
from tests.procs import RedisProcess

SITE = "bench"


def record(i: int, uuid: str) -> bytes:
    """A stored event as the server writes it (docs/protocol.md section 7)."""
    t = 1_764_160_000_000 + i
    return json.dumps(
        {
            "site": SITE,
            "uuid": uuid,
            "session": "dV5jp1rIGsHYmTw4",
            "producer": f"js-{i % 5000:024x}",
            "seq": i,
            "action": "product.view",
            "label": "Viewed product A-1",
            "time": t,
            "received": t,
            "params": {"sku": f"A-{i % 977}", "price": 15, "url": "https://shop.example/p/a-1"},
        }
    ).encode()


async def fill(client: aioredis.Redis, key: str, entries: int, mine: int) -> None:
    """N entries, every (N / mine)-th one the forgotten customer's."""
    every = max(1, entries // mine)
    batch = 5000
    for start in range(0, entries, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(entries, start + batch)):
            uuid = "cust-forget" if i % every == 0 else f"visitor-{i % 200_000}"
            pipe.xadd(key, {"event": record(i, uuid)})
        await pipe.execute()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--mine", type=int, default=100)
    args = parser.parse_args()
    proc = RedisProcess().start()
    try:
        client = aioredis.Redis.from_url(proc.url)
        keys = Keys("ew")
        key = keys.events(SITE)
        started = time.perf_counter()
        await fill(client, key, args.entries, args.mine)
        filled = time.perf_counter() - started
        memory = (await client.info("memory"))["used_memory"]
        mib = memory / 2**20
        print(f"filled {args.entries:,} entries in {filled:.1f} s; redis used_memory {mib:.0f} MiB")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        started = time.perf_counter()
        counts, _ = await forget_customers(client, keys, SITE, 1, ["cust-forget"], dry_run=True)
        dry = time.perf_counter() - started
        print(f"dry run: {counts['events']} entries found in {dry:.2f} s")
        started = time.perf_counter()
        counts, _ = await forget_customers(client, keys, SITE, 1, ["cust-forget"])
        took = time.perf_counter() - started
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        left = await client.xlen(key)
        print(
            f"forget: {counts['events']} entries deleted of {args.entries:,} in {took:.2f} s "
            f"({args.entries / took:,.0f} entries searched/s); stream now {left:,}; "
            f"client CPU {cpu:.1f} s for both passes"
        )
        load = os.getloadavg()[0]
        print(f"machine: load {load:.2f} on {os.cpu_count()} cores (other jobs included)")
        await client.aclose()
    finally:
        proc.stop()


if __name__ == "__main__":
    asyncio.run(main())
