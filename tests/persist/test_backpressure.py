"""Backpressure end to end: a stopped worker, a full backlog, nacks, then every event once.

A real server (``max_backlog`` small), the Python client (which resends on
``nack unavailable``), a persist worker stopped and started again, and a
SQLite store.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from prometheus_client import REGISTRY

from eventwire.client import EventwireClient
from tests.conftest import MakeServer
from tests.persist.test_worker import client_rows, pending, start_worker, wait_rows
from tests.procs import UNIT, RedisProcess

STREAM = "ew:{app}:events"
N = 2000
MAX_BACKLOG = 300


def backlog_nacks(site: str) -> float:
    """``eventwire_backlog_nacks_total`` of a site in this process."""
    return REGISTRY.get_sample_value("eventwire_backlog_nacks_total", {"site": site}) or 0.0


async def unacknowledged(redis: aioredis.Redis) -> int:
    """Entries of the stream the persist group has not acknowledged (pending + lag)."""
    (group,) = await redis.xinfo_groups(STREAM)
    return int(group["pending"]) + int(group["lag"])


async def test_full_backlog_nacks_then_every_acked_event_is_stored_once(
    make_server: MakeServer,
    redis: aioredis.Redis,
    redis_proc: RedisProcess,
    sites_file: Path,
    tmp_path: Path,
) -> None:
    """Worker stopped: nacks at max_backlog, nothing unacknowledged trimmed; back: all once."""
    sqlite_dsn = f"sqlite:///{tmp_path / 'events.db'}"
    # stream_maxlen below max_backlog: under today's MAXLEN the cap would trim
    # acked, unpersisted events; with a persist group it must not.
    server = await make_server(stream_maxlen=100, max_backlog=MAX_BACKLOG, retry_after_ms=50)
    worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
    await worker.stop()  # the group exists; nobody reads it
    nacks_before = backlog_nacks("app")
    with structlog.testing.capture_logs() as logs:
        async with EventwireClient(f"{server.url}/v1/track/app", "cust-1", batch_size=50) as client:
            for i in range(N):
                client.track("product.view", {"sku": f"S{i}"}, f"Viewed S{i}")
            deadline = time.monotonic() + 20 * UNIT
            while backlog_nacks("app") == nacks_before or client.nacks == 0:
                assert time.monotonic() < deadline, "no backlog nack"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3 * UNIT)  # the client keeps resending meanwhile
            info = await redis.xinfo_stream(STREAM)
            held = info["length"]
            # Full (at most one frame and the session.start over), and every entry
            # ever added still there: nothing unacknowledged was trimmed.
            assert MAX_BACKLOG <= held <= MAX_BACKLOG + 50 + 1
            assert info["entries-added"] == held
            assert await unacknowledged(redis) == held
            assert client.accepted < N
            worker = await start_worker(redis_proc, sites_file, sqlite_dsn)
            try:
                await client.flush(timeout=60 * UNIT)
                assert client.accepted == N
                await wait_rows(worker.sink, N + 1)  # the events and the session.start
                deadline = time.monotonic() + 10 * UNIT
                while await pending(redis) or await unacknowledged(redis):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                # The next frame finds the backlog drained: the episode ends, logged.
                client.track("product.view", {"sku": "last"}, "Viewed last")
                await client.flush(timeout=10 * UNIT)
                await wait_rows(worker.sink, N + 2)
            finally:
                await worker.stop()
    total, from_client = await client_rows(sqlite_dsn)
    assert (total, from_client) == (N + 2, N + 1)  # each acked event exactly once
    full = [e for e in logs if e["event"] == "backlog_full"]
    resumed = [e for e in logs if e["event"] == "backlog_resumed"]
    assert len(full) == 1, full  # once per episode
    assert full[0]["max_backlog"] == MAX_BACKLOG
    assert len(resumed) == 1
    assert resumed[0]["refused"] > 0
    assert backlog_nacks("app") - nacks_before >= client.nacks > 0
    gauge = REGISTRY.get_sample_value
    assert gauge("eventwire_backlog_max", {"site": "app"}) == MAX_BACKLOG
    assert gauge("eventwire_backlog_entries", {"site": "app"}) < MAX_BACKLOG / 2
