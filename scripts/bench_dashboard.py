"""Benchmark row of the dashboard at a busy site's rate: first-load bytes, time to counters, memory.

Starts a private ``redis-server`` and ``eventwire serve`` (free ports, site
``bench``), then:

1. relay memory: the server's RSS with no viewer, then its peak with
   ``--viewers`` summary viewers (a tenth of them never reading) while
   scripts/openloop.py loads it at ``--rate`` events/s for 30 s;
2. a fresh server and an empty Redis; the load at ``--rate`` for
   ``--duration`` s (the stream verified by openloop itself);
3. first load: Debian's Chromium (Playwright) opens ``/dashboard#site=bench``;
   bytes received (HTTP bodies and WebSocket frames) until the counters show,
   and the time from navigation to that, once cold (the server's first
   summary viewer: it counts the window from the streams) and once warm (a
   second page: the tally is kept);
4. counters checked against the stream: the page's 5-minute total and its
   per-second bars equal the events stream's own counts (XRANGE), exactly.

Printed: one line per measure and a markdown row; the machine's load
(``/proc/loadavg``, and the CPU% other processes took during the run).

usage: .venv/bin/python scripts/bench_dashboard.py [--rate 2000] [--duration 60] [--viewers 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from playwright.async_api import Page, WebSocket, async_playwright  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from tests.procs import RedisProcess, free_port  # noqa: E402

CHROMIUM: Final = "/usr/bin/chromium"
CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
]
SITES: Final = '[sites.bench]\norigins = ["http://localhost"]\nallow_no_origin = true\n'
EVENTS: Final = "ew:{bench}:events"


def rss_kb(pid: int) -> int:
    """Resident memory of a process (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def loadavg() -> str:
    """The machine's load averages and running processes (/proc/loadavg)."""
    return Path("/proc/loadavg").read_text().strip()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (jiffies)."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def load(
    args: argparse.Namespace, port: int, redis_url: str, server: int, redis: int, seconds: float
) -> str:
    """Run openloop at the rate for ``seconds``; its summary lines."""
    cmd = [
        sys.executable, str(ROOT / "scripts" / "openloop.py"),
        "--url", f"ws://127.0.0.1:{port}/v1/track/bench",
        "--rate", str(args.rate), "-c", "20", "-b", "10",
        "--duration", str(seconds), "--warmup", "1",
        "--redis-url", redis_url, "--server-pid", str(server), "--redis-pid", str(redis),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip()


async def first_load(page: Page, admin: str) -> dict[str, Any]:
    """Open the dashboard; bytes and time until the counters show."""
    got = {"http": 0, "ws": 0, "frames": 0}

    def on_ws(ws: WebSocket) -> None:
        def frame(payload: str | bytes) -> None:
            got["ws"] += len(payload.encode() if isinstance(payload, str) else payload)
            got["frames"] += 1

        ws.on("framereceived", frame)

    async def on_response(response: Any) -> None:
        # A redirect or an aborted response has no body.
        with contextlib.suppress(Exception):
            got["http"] += len(await response.body())

    page.on("websocket", on_ws)
    page.on("response", on_response)
    t0 = time.perf_counter()
    await page.goto(admin + "/dashboard#site=bench")
    await page.wait_for_function(
        "() => document.getElementById('status').dataset.state === 'live'"
        " && Number(document.getElementById('total').dataset.count) > 0",
        timeout=60_000,
    )
    shown = time.perf_counter() - t0
    snapshot = dict(got)
    # Complete: the server has counted the whole window (no backfill running).
    await page.wait_for_function(
        "() => document.getElementById('total').dataset.complete === 'true'", timeout=60_000
    )
    complete = time.perf_counter() - t0
    page.remove_listener("websocket", on_ws)
    page.remove_listener("response", on_response)
    return {"seconds": shown, "complete": complete, **snapshot}


async def check_counts(page: Page, redis: aioredis.Redis) -> tuple[int, int, bool]:
    """The page's total and bars against the stream's own counts (load stopped: nothing moves)."""
    await asyncio.sleep(2.5)  # the last tick of the load's last second
    per_second = Counter[int]()
    after = "-"
    while True:
        page_of = await redis.xrange(EVENTS, min=after, count=20_000)
        if after != "-":
            page_of = page_of[1:]
        if not page_of:
            break
        per_second.update(int(i.split(b"-")[0]) // 1000 for i, _ in page_of)
        after = page_of[-1][0].decode()
    ids = per_second.total()
    total = int(await page.get_attribute("#total", "data-count") or -1)
    bars = await page.eval_on_selector_all(
        "#chart rect.a", "rs => rs.map(r => [Number(r.dataset.s), Number(r.dataset.n)])"
    )
    return total, ids, dict(bars) == per_second


async def viewers_memory(admin: str, n: int) -> list[ClientConnection]:
    """Open ``n`` summary viewers; a tenth never read. Returns them (closed by the caller)."""
    url = admin.replace("http://", "ws://") + "/v1/live?site=bench&stream=summary"
    return [await connect(url, proxy=None, max_queue=None if i % 10 else 1) for i in range(n)]


async def drain(conns: list[ClientConnection], stop: asyncio.Event) -> None:
    """Read every viewer but each tenth until ``stop``."""

    async def read(ws: ClientConnection) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(ws.recv(), 1)
            except TimeoutError:
                continue
            except Exception:  # closed
                return

    async with asyncio.TaskGroup() as tg:
        for i, ws in enumerate(conns):
            if i % 10:
                tg.create_task(read(ws))


async def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit code."""
    redis_proc = RedisProcess().start()
    assert redis_proc.proc is not None
    work = Path(tempfile.mkdtemp(prefix="ew-bench-dash-"))
    (work / "sites.toml").write_text(SITES)
    port, admin_port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    log = (work / "server.log").open("wb")
    redis = aioredis.Redis.from_url(redis_proc.url)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(ROOT / ".venv/bin/eventwire"), "serve", "--listen", f"127.0.0.1:{port}",
             "--admin", f"127.0.0.1:{admin_port}", "--redis", redis_proc.url,
             "--sites", str(work / "sites.toml")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready() -> None:
        for _ in range(100):
            try:
                await redis.ping()
                with socket.create_connection(("127.0.0.1", admin_port), 0.2):
                    return
            except OSError:
                await asyncio.sleep(0.1)

    server = start()
    try:
        await wait_ready()
        print(f"loadavg before: {loadavg()}")
        base = rss_kb(server.pid)
        conns = await viewers_memory(admin, args.viewers)
        stop = asyncio.Event()
        reader = asyncio.create_task(drain(conns, stop))
        peak = base
        loading = asyncio.create_task(
            asyncio.to_thread(load, args, port, redis_proc.url, server.pid, redis_proc.proc.pid, 30)
        )
        while not loading.done():
            peak = max(peak, rss_kb(server.pid))
            await asyncio.sleep(0.5)
        stop.set()
        await reader
        for ws in conns:
            await ws.close()
        print("load beside the viewers: " + loading.result().splitlines()[0][:220])
        print(
            f"relay memory: RSS {base / 1024:.0f} MiB before {args.viewers} summary viewers, "
            f"peak {peak / 1024:.0f} MiB with them under {args.rate:g} events/s for 30 s "
            f"(+{(peak - base) / 1024:.0f} MiB, {(peak - base) / args.viewers:.0f} KiB a viewer)"
        )
        # A fresh server and Redis for the first-load measure.
        server.terminate()
        server.wait()
        await redis.flushall()
        server = start()
        await wait_ready()
        busy0, all0 = cpu_ticks()
        mine0 = proc_ticks(server.pid) + proc_ticks(redis_proc.proc.pid)
        t0 = time.monotonic()
        print(load(args, port, redis_proc.url, server.pid, redis_proc.proc.pid, args.duration))
        elapsed = time.monotonic() - t0
        busy1, all1 = cpu_ticks()
        mine1 = proc_ticks(server.pid) + proc_ticks(redis_proc.proc.pid)
        cores = os.cpu_count() or 1
        machine = 100 * (busy1 - busy0) / max(1, all1 - all0) * cores
        ours = 100 * (mine1 - mine0) / os.sysconf("SC_CLK_TCK") / elapsed
        print(
            f"machine CPU during load: {machine:.0f}% of {cores * 100}% (server+redis {ours:.0f}%)"
        )
        length = await redis.xlen(EVENTS)
        if not length:
            print("the load stored nothing: see the lines above")
            return 1
        print(f"events stream: {length} entries; server RSS {rss_kb(server.pid) / 1024:.0f} MiB")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            cold = await first_load(page, admin)
            total, stream_total, bars_ok = await check_counts(page, redis)
            warm_page = await browser.new_page()
            warm = await first_load(warm_page, admin)
            for name, m in (("cold", cold), ("warm", warm)):
                kb = (m["http"] + m["ws"]) / 1024
                print(
                    f"first load {name}: {kb:.0f} KiB ({m['http'] / 1024:.0f} KiB HTTP, "
                    f"{m['ws'] / 1024:.0f} KiB in {m['frames']} frames), "
                    f"counters in {m['seconds']:.2f} s, complete in {m['complete']:.2f} s"
                )
            print(
                f"counters: page total {total}, stream {stream_total}, "
                f"exact={total == stream_total}, bars per second equal the stream's: {bars_ok}"
            )
            await browser.close()
        print(f"loadavg after: {loadavg()}")
        ok = total == stream_total and bars_ok
        return 0 if ok else 1
    finally:
        await redis.aclose()
        server.terminate()
        server.wait()
        redis_proc.kill()
        log.close()


def main() -> int:
    """Parse the command line and run."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=2000.0, help="events/s of the load (2000)")
    p.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load before the page (60)"
    )
    p.add_argument(
        "--viewers", type=int, default=200, help="summary viewers for the memory measure (200)"
    )
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
