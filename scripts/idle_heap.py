"""What an idle connection holds in the server's Python heap, by allocating line.

Starts a private redis-server and an in-process server (site ``bench``,
the per-address limits lifted), takes a tracemalloc snapshot, opens N
connections with scripts/bench_idle.py (browsers' headers and hello pages,
no trickle), takes another once all are open and prints the traced bytes
per connection and the lines that allocated the most of them. Small runs
only (N of a few thousand): tracemalloc slows the server several-fold.

usage: idle_heap.py [-n 2000] [--enrich true|false] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from pathlib import Path
from typing import TextIO

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "server")]

from eventwire.core.config import Settings  # noqa: E402
from eventwire.core.rules import SiteConfig, SiteRules  # noqa: E402
from eventwire.gateway import EventwireServer  # noqa: E402
from tests.procs import RedisProcess  # noqa: E402


async def measure(n: int, enrich: bool, top: int, report: TextIO) -> None:
    redis = RedisProcess().start()
    try:
        settings = msgspec.convert(
            {
                "listen": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "redis_url": redis.url,
                "max_connections_per_ip": 1_000_000,
                "handshakes_per_ip": 1e6,
                "handshake_burst": 1_000_000,
                "enrich_visitors": enrich,
            },
            Settings,
        )
        site = SiteConfig(origins=["http://localhost"], allow_no_origin=True)
        server = EventwireServer(settings, {"bench": SiteRules("bench", site)})
        await server.start()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        clients = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "scripts" / "bench_idle.py"),
            "--url",
            f"ws://127.0.0.1:{server.port}/v1/track/bench",
            "--server-pid",
            str(os.getpid()),
            "-n",
            str(n),
            "--trickle",
            "0",
            "--settle",
            "10",
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _ in range(3000):  # 10 min at most
            if server.open_connections >= n:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        ws = next(iter(server._connections))
        shared = sys.getsizeof(ws.__dict__)
        stats = after.compare_to(before, "lineno")
        total = sum(s.size_diff for s in stats)
        print(
            f"{n:,} connections, enrich_visitors = {enrich}: {total / n:,.0f} B each traced; "
            f"a websockets connection's instance dict {shared} B",
            file=report,
        )
        for s in stats[:top]:
            frame = s.traceback[0]
            where = frame.filename.split("site-packages/")[-1].split("/server/")[-1]
            print(
                f"{s.size_diff / n:7.0f} B {s.count_diff / n:5.1f} objects  {where}:{frame.lineno}",
                file=report,
            )
        await clients.wait()
        await server.stop()
    finally:
        redis.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--enrich", choices=("true", "false"), default="true")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    # The server's log (a line per closed connection, on stdout) would drown the figures.
    report = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        asyncio.run(measure(a.n, a.enrich == "true", a.top, report))
    finally:
        sys.stdout.close()
        sys.stdout = report


if __name__ == "__main__":
    main()
