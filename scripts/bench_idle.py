"""Measure the server's memory per idle connection.

Opens N connections to a running server, each saying hello and then staying
idle, and reads the server's resident memory (VmRSS) before and after. Prints
KiB per connection. Used by ``scripts/bench --idle N``.

usage: bench_idle.py --url ws://HOST:PORT/v1/track/SITE --server-pid PID [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import time
from contextlib import AsyncExitStack
from pathlib import Path

from websockets.asyncio.client import connect


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_idle(url: str, n: int, stack: AsyncExitStack) -> None:
    """Open n connections that say hello and wait, 200 at a time."""

    async def one() -> None:
        ws = await stack.enter_async_context(
            connect(url, compression=None, proxy=None, open_timeout=30, ping_interval=None)
        )
        hello = {
            "type": "hello",
            "uuid": "idle-" + secrets.token_hex(4),
            "producer": "idle-" + secrets.token_hex(8),
        }
        await ws.send(json.dumps(hello))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert welcome["type"] == "welcome", welcome

    for start in range(0, n, 200):
        await asyncio.gather(*(one() for _ in range(min(200, n - start))))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.n + 1024), hard))
    async with AsyncExitStack() as stack:
        # Warm up: one connection first, so one-off allocations are not counted.
        await open_idle(args.url, 1, stack)
        await asyncio.sleep(0.5)
        before = rss_kib(args.server_pid)
        started = time.monotonic()
        await open_idle(args.url, args.n, stack)
        opened = time.monotonic() - started
        await asyncio.sleep(args.settle)
        after = rss_kib(args.server_pid)
        per = (after - before) / args.n
        print(
            f"idle connections: {args.n} opened in {opened:.1f} s; server RSS "
            f"{before / 1024:.1f} MiB -> {after / 1024:.1f} MiB: {per:.1f} KiB per connection"
        )


if __name__ == "__main__":
    asyncio.run(main())
