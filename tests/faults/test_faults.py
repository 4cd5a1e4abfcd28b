"""Fault suite: crashes and outages under load, checked against a ledger.

Each test streams events with the real client, breaks a real part (SIGKILL of
the server process, SIGKILL or SIGSTOP of Redis), lets the client recover by
itself, and then checks the stream against what the client was told: every
acked seq is stored, and every seq is stored exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.client import EventwireClient
from server.protocol import Ack
from tests.procs import UNIT, RedisProcess, ServerProcess, free_port


class Ledger:
    """What the client was told: how many acks, and the highest acked seq."""

    def __init__(self, break_after: int) -> None:
        self.acked_high = 0
        self.acks = 0
        self.break_after = break_after
        self.time_to_break = asyncio.Event()

    def on_ack(self, ack: Ack, latency: float) -> None:
        self.acks += 1
        self.acked_high = max(self.acked_high, ack.seq)
        if self.acks >= self.break_after:
            self.time_to_break.set()


async def stored_seqs(redis_url: str, producer: str, site: str = "app") -> list[int]:
    """Seqs of one producer in the site's stream, in stream order."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(f"ew:{{{site}}}:events")
    finally:
        await client.aclose()
    events = (json.loads(fields[b"event"]) for _, fields in entries)
    return [e["seq"] for e in events if e["producer"] == producer]


def streaming_client(url: str, ledger: Ledger) -> EventwireClient:
    """A client that batches 20 events, keeps 4 frames in flight and reconnects fast."""
    return EventwireClient(
        url, batch_size=20, max_inflight=4, backoff_base=0.05, backoff_max=0.3, on_ack=ledger.on_ack
    )


async def stream_events(client: EventwireClient, total: int) -> None:
    """Track ``total`` events, ten at a time, while the test breaks things."""
    for i in range(1, total + 1):
        client.track("product.view", {"sku": f"S{i}", "i": i})
        if i % 10 == 0:
            await asyncio.sleep(0.002)


@pytest.fixture
async def aof_redis() -> AsyncIterator[RedisProcess]:
    """A private Redis with AOF and appendfsync always: nothing acked is lost in a crash."""
    proc = RedisProcess(appendonly=True, appendfsync="always").start()
    yield proc
    proc.stop()


async def test_server_sigkill_under_load(redis_proc: RedisProcess, sites_file: Path) -> None:
    """SIGKILL of the server mid-stream, then a restart: each seq is stored exactly once."""
    port = free_port()
    srv = ServerProcess(redis_proc.url, sites_file).start(port)
    ledger = Ledger(break_after=30)
    total = 3000
    client = streaming_client(f"ws://127.0.0.1:{port}/v1/track/app", ledger)
    try:
        async with client:
            producer = client.producer
            sending = asyncio.create_task(stream_events(client, total))
            await ledger.time_to_break.wait()
            acked_before = ledger.acked_high
            srv.kill()
            await asyncio.sleep(0.2)
            srv = ServerProcess(redis_proc.url, sites_file).start(port)
            await sending
            await client.flush(timeout=30 * UNIT)
            assert client.connects >= 2
    finally:
        srv.kill()
    seqs = await stored_seqs(redis_proc.url, producer)
    assert acked_before > 0
    assert sorted(seqs) == list(range(1, total + 1)), "a seq is missing or stored twice"
    assert seqs == sorted(seqs), "a producer's events are out of order in the stream"


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_redis_outage_under_load(aof_redis: RedisProcess, sites_file: Path, how: str) -> None:
    """Redis killed (AOF always) or frozen mid-stream: nacks, no crash, nothing acked lost."""
    srv = ServerProcess(
        aof_redis.url,
        sites_file,
        env={"EVENTWIRE_STORE_TIMEOUT": "0.3", "EVENTWIRE_RETRY_AFTER_MS": "100"},
    ).start()
    ledger = Ledger(break_after=20)
    total = 2000
    client = streaming_client(f"ws://127.0.0.1:{srv.port}/v1/track/app", ledger)
    try:
        async with client:
            producer = client.producer
            sending = asyncio.create_task(stream_events(client, total))
            await ledger.time_to_break.wait()
            acked_before = ledger.acked_high
            if how == "sigkill":
                aof_redis.kill()
                await asyncio.sleep(0.6)
                aof_redis.start()
            else:
                aof_redis.pause()
                await asyncio.sleep(0.8)
                aof_redis.resume()
            await sending
            await client.flush(timeout=30 * UNIT)
            nacks = client.nacks
        assert srv.proc is not None
        assert srv.proc.poll() is None, "the server died"
    finally:
        if aof_redis.proc is not None:
            aof_redis.resume()
        srv.kill()
    assert nacks > 0 or client.connects > 1
    seqs = await stored_seqs(aof_redis.url, producer)
    assert acked_before > 0
    assert sorted(seqs) == list(range(1, total + 1)), "a seq is missing or stored twice"
