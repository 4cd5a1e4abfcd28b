"""HTTP ingest benchmark driver: keep-alive clients posting batches, then verify Redis.

C clients, each its own producer on its own keep-alive connection, each with
one batch of B events in flight (``POST /v1/track/{site}``: the next batch
goes when the answer of the last one came). After ``--warmup`` seconds (not
measured) it measures ``--duration`` seconds: events/s from the events the
answers accepted, p50/p99 answer latency, and the CPU% of the driver (and of
the server and Redis when their PIDs are given). Then every producer's seqs
1..N must be in the stream exactly once. ``scripts/bench --http`` runs it
right after the WebSocket driver (scripts/bench.py) against the same server
and prints both rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import redis.asyncio as aioredis


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (and its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


async def client(
    http: aiohttp.ClientSession,
    url: str,
    batch: int,
    stop: asyncio.Event,
    window: dict[str, Any],
    seqs: dict[str, int],
) -> None:
    """One producer: post batches of ``batch`` events until ``stop``."""
    producer = "bh-" + secrets.token_hex(8)
    uuid = "u-" + secrets.token_hex(6)
    seq = 0
    while not stop.is_set():
        events = [
            {"seq": seq + i + 1, "action": "product.view", "params": {"sku": f"S{seq + i}"}}
            for i in range(batch)
        ]
        body = json.dumps({"uuid": uuid, "producer": producer, "events": events})
        started = time.perf_counter()
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            answer = await r.json()
        if r.status != 200:
            # Retried as it is: de-duplication makes that safe.
            await asyncio.sleep(0.05)
            continue
        seq += batch
        seqs[producer] = seq
        if window["on"]:
            window["events"] += answer["accepted"] + answer["duplicate"]
            window["latencies"].append(time.perf_counter() - started)


async def run(args: argparse.Namespace) -> int:
    """Load, measure, verify; returns the exit code."""
    stop = asyncio.Event()
    window: dict[str, Any] = {"on": False, "events": 0, "latencies": []}
    seqs: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    redis = aioredis.Redis.from_url(args.redis_url)
    before = await redis.xlen(f"ew:{{{args.site}}}:events")
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [
            asyncio.create_task(client(http, args.url, args.batch, stop, window, seqs))
            for _ in range(args.connections)
        ]
        await asyncio.sleep(args.warmup)
        pids = {"driver": os.getpid(), "server": args.server_pid, "redis": args.redis_pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items() if p}
        t0 = time.perf_counter()
        window["on"] = True
        await asyncio.sleep(args.duration)
        window["on"] = False
        elapsed = time.perf_counter() - t0
        cpu = {k: 100 * (cpu_seconds(pids[k]) - v) / elapsed for k, v in cpu0.items()}
        stop.set()
        await asyncio.gather(*tasks)
    entries = await redis.xrange(f"ew:{{{args.site}}}:events", min="-", max="+")
    await redis.aclose()
    stored: Counter[tuple[str, int]] = Counter()
    for _id, fields in entries[before:]:
        event = json.loads(fields[b"event"])
        if event["producer"].startswith("bh-"):
            stored[(event["producer"], event["seq"])] += 1
    want = {(p, s) for p, n in seqs.items() for s in range(1, n + 1)}
    verified = set(stored) == want and all(n == 1 for n in stored.values())
    lat = sorted(window["latencies"])
    result = {
        "transport": "http",
        "connections": args.connections,
        "batch": args.batch,
        "events_per_s": round(window["events"] / elapsed),
        "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None,
        "cpu": {k: round(v) for k, v in cpu.items()},
        "verified": verified,
        "stored": sum(stored.values()),
    }
    print(json.dumps(result))
    if args.websocket_eps:
        ratio = result["events_per_s"] / args.websocket_eps
        print(
            f"C={args.connections} B={args.batch}: websocket {args.websocket_eps:,.0f} events/s, "
            f"http {result['events_per_s']:,} events/s, ratio {ratio:.2f}, "
            f"http verify={'ok' if verified else 'FAILED'}; load average {os.getloadavg()[0]:.2f}"
        )
    return 0 if verified else 1


def main() -> int:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://HOST:PORT/v1/track/SITE")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--site", default="bench")
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-b", "--batch", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--server-pid", type=int, default=0)
    parser.add_argument("--redis-pid", type=int, default=0)
    parser.add_argument("--websocket-eps", type=float, default=0, help="print the ratio to it")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
