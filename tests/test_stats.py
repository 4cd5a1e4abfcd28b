"""``eventwire stats``: per-site numbers from a real server and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from server.gateway import EventwireServer
from server.stats import site_stats, table
from server.store import Keys
from tests.procs import UNIT, RedisProcess
from tests.wire import event, peer

ROOT = Path(__file__).resolve().parent.parent
KEYS = Keys("ew")
EVENTS = "ew:{app}:events"


async def test_site_stats_counts_streams_and_sessions(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """Stream length, events/s, rejected/s and open sessions (one per connected customer)."""
    async with AsyncExitStack() as stack:
        for n in range(3):
            p = await stack.enter_async_context(peer(server.url))
            await p.hello(f"u-s{n}")
            ack = await p.track(event(1), event(2), event(3, action="nodot"))
            assert ack["accepted"] == 2
        stats = await site_stats(redis, KEYS, "app")
        assert stats["length"] == await redis.xlen(EVENTS)
        assert stats["length"] >= 6
        assert stats["events_per_s"] >= 6 / 60
        assert stats["rejected_length"] == 3
        assert stats["rejected_per_s"] == 3 / 60
        assert stats["open_sessions"] == 3
        assert stats["persist_lag"] is None
        assert stats["persist_pending"] is None
        assert stats["oldest_pending_s"] is None
    empty = await site_stats(redis, KEYS, "web")
    assert empty["length"] == 0
    assert empty["events_per_s"] == 0
    assert empty["open_sessions"] == 0


async def test_site_stats_persist_group(server: EventwireServer, redis: aioredis.Redis) -> None:
    """The persist group's lag and pending: read without ack, then acked."""
    async with peer(server.url) as p:
        await p.hello("u-g")
        await p.track(event(1), event(2), event(3))
    await redis.xgroup_create(EVENTS, "persist", id="0")
    length = await redis.xlen(EVENTS)
    stats = await site_stats(redis, KEYS, "app")
    assert stats["persist_lag"] == length
    assert stats["persist_pending"] == 0
    assert stats["oldest_pending_s"] is None
    reply: Any = await redis.xreadgroup("persist", "w1", {EVENTS: ">"}, count=2)
    ids = [entry_id for entry_id, _ in reply[0][1]]
    await asyncio.sleep(0.05)
    stats = await site_stats(redis, KEYS, "app")
    assert stats["persist_pending"] == 2
    assert stats["persist_lag"] == length - 2
    assert stats["oldest_pending_s"] >= 0.05
    await redis.xack(EVENTS, "persist", *ids)
    stats = await site_stats(redis, KEYS, "app")
    assert stats["persist_pending"] == 0
    assert stats["oldest_pending_s"] is None
    assert stats["persist_lag"] == length - 2


async def test_stats_command_json(
    server: EventwireServer, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """``python -m server stats --json`` prints one JSON object with every site."""
    async with peer(server.url, site="shop") as p:
        await p.hello("u-j")
        await p.track(event(1))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "stats",
            "--redis",
            redis_proc.url,
            "--sites",
            str(sites_file),
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "EVENTWIRE_CONFIG": os.devnull},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 10 * UNIT)
    assert proc.returncode == 0, err
    snap = json.loads(out)
    assert set(snap["sites"]) == {"app", "shop", "web"}
    assert snap["time"] > 0
    shop = snap["sites"]["shop"]
    assert shop["length"] >= 2
    assert shop["open_sessions"] == 1
    assert shop["persist_lag"] is None


def test_table_shows_dashes_for_unknowns() -> None:
    """The terminal table: one aligned row per site, '-' where a number is unknown."""
    numbers = {
        "length": 12,
        "events_per_s": 0.2,
        "rejected_per_s": 0.0,
        "open_sessions": 1,
        "persist_lag": None,
        "persist_pending": None,
        "oldest_pending_s": None,
    }
    lines = table({"sites": {"app": numbers}, "time": 0}).splitlines()
    assert lines[0].split()[:3] == ["site", "length", "events/s"]
    assert lines[1].split() == ["app", "12", "0.20", "0.00", "1", "-", "-", "-"]
    assert len(lines[0]) == len(lines[1])
