"""The Python client against a real in-process server and a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from eventwire.client import BufferFull, ClientClosed, EventwireClient
from eventwire.core.protocol import Ack
from eventwire.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisProcess, free_port

EVENTS_KEY = "ew:{app}:events"


def track_url(server: EventwireServer, site: str = "app") -> str:
    """The track URL of a site on an in-process server."""
    return f"{server.url}/v1/track/{site}"


async def stored(redis: aioredis.Redis, producer: str) -> list[dict[str, Any]]:
    """The stored events of one producer, in stream order."""
    entries: Any = await redis.xrange(EVENTS_KEY)
    events = [json.loads(fields[b"event"]) for _, fields in entries]
    return [e for e in events if e["producer"] == producer]


async def wait_until(condition: Callable[[], bool], within: float) -> None:
    """Poll until ``condition()`` holds; fail the test after ``within`` seconds."""
    # A poll, not an Event: the counters polled have no notification to wait on.
    for _ in range(int(within / 0.01) + 1):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"condition not met within {within} s")


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_track_flush_stores_each_event_once_in_order(
    server: EventwireServer, redis: aioredis.Redis, encoding: Literal["json", "msgpack"]
) -> None:
    """Tracked events are stored once each, in order, with their params and labels."""
    async with EventwireClient(track_url(server), "cust-1", encoding=encoding) as client:
        seqs = [
            client.track("page.visit", {"url": f"/p{i}", "n": {"deep": [i, "é"]}}, f"Label {i}")
            for i in range(20)
        ]
        client.track("page.visit", {"url": "/home", "title": "Home"})
        await client.flush(timeout=2 * UNIT)
        assert seqs == list(range(1, 21))
        assert client.accepted == 21
        assert client.duplicate == 0
        assert client.rejections == []
        assert client.connects == 1
        assert client.welcome is not None
        assert client.welcome.acked == 0

    events = await stored(redis, client.producer)
    assert [e["seq"] for e in events] == list(range(1, 22))
    for i, event in enumerate(events[:20]):
        assert event["uuid"] == "cust-1"
        assert event["action"] == "page.visit"
        assert event["label"] == f"Label {i}"
        # params.source is the server's (docs/protocol.md section 18): no referrer, direct.
        assert event["params"] == {
            "url": f"/p{i}",
            "n": {"deep": [i, "é"]},
            "source": {"medium": "direct"},
        }
        assert event["session"] == client.welcome.session
    assert events[20]["label"] == "Visited page Home"


async def test_batching_sends_full_frames(server: EventwireServer, redis: aioredis.Redis) -> None:
    """250 events with batch_size 100 travel in 3 frames and are all stored."""
    acks: list[tuple[Ack, float]] = []
    client = EventwireClient(
        track_url(server), batch_size=100, on_ack=lambda ack, latency: acks.append((ack, latency))
    )
    for i in range(250):
        client.track("item.view", {"i": i})
    async with client:
        await client.flush(timeout=2 * UNIT)
    assert [ack.seq for ack, _ in acks] == [100, 200, 250]
    assert [ack.accepted for ack, _ in acks] == [100, 100, 50]
    assert all(latency >= 0 for _, latency in acks)
    assert [e["seq"] for e in await stored(redis, client.producer)] == list(range(1, 251))


async def test_single_tracks_are_batched_within_linger(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """Events tracked one by one shortly after a partial frame share the next frame."""
    acks: list[Ack] = []
    async with EventwireClient(
        track_url(server), linger=0.2 * UNIT, on_ack=lambda ack, _: acks.append(ack)
    ) as client:
        client.track("item.view")
        await client.flush(timeout=2 * UNIT)
        for _ in range(5):
            client.track("item.view")
            await asyncio.sleep(0)
        await wait_until(lambda: len(acks) == 2, 2 * UNIT)
    assert [ack.accepted for ack in acks] == [1, 5]
    assert len(await stored(redis, client.producer)) == 6


async def test_rejected_event_is_reported_and_final(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """A rejected event lands in `rejections` (invalid_action) and flush still returns."""
    async with EventwireClient(track_url(server)) as client:
        client.track("page.visit", {"url": "/a"})
        bad = client.track("bad")
        client.track("page.visit", {"url": "/b"})
        await client.flush(timeout=2 * UNIT)
        assert [(r.seq, r.code) for r in client.rejections] == [(bad, "invalid_action")]
        assert client.accepted == 2
    assert [e["seq"] for e in await stored(redis, client.producer)] == [1, 3]


async def test_oversized_batches_are_split_to_fit_frames(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """A batch larger than max_frame_bytes is sent in several frames, never closed 1009."""
    srv = await make_server(max_frame_bytes=4096)
    acks: list[Ack] = []
    async with EventwireClient(
        track_url(srv),
        encoding="msgpack",
        max_frame_bytes=4096,
        on_ack=lambda ack, _: acks.append(ack),
    ) as client:
        for i in range(40):
            client.track("item.view", {"i": i, "blob": "x" * 300})
        await client.flush(timeout=2 * UNIT)
        assert client.connects == 1
        with pytest.raises(ValueError, match="max_frame_bytes"):
            client.track("item.view", {"blob": "x" * 5000})
    assert len(acks) > 1
    assert [e["seq"] for e in await stored(redis, client.producer)] == list(range(1, 41))


async def test_reconnect_resends_buffered_events_once(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Events tracked while the server is down are sent after it returns, each stored once."""
    port = free_port()
    first = await make_server(listen=f"127.0.0.1:{port}")
    client = EventwireClient(
        f"ws://127.0.0.1:{port}/v1/track/app", backoff_base=0.02, backoff_max=0.1 * UNIT
    )
    async with client:
        for i in range(10):
            client.track("item.view", {"i": i})
        await client.flush(timeout=2 * UNIT)
        await first.stop()
        for i in range(10, 25):
            client.track("item.view", {"i": i})
        # Let the client meet a closed port a few times before the server returns.
        await asyncio.sleep(0.3 * UNIT)
        assert client.connects == 1
        await make_server(listen=f"127.0.0.1:{port}")
        await client.flush(timeout=3 * UNIT)
        assert client.connects == 2
        assert client.welcome is not None
        assert client.welcome.acked == 10
        assert client.duplicate == 0
        assert client.skipped == 0
        assert client.accepted == 25
    events = await stored(redis, client.producer)
    assert [e["seq"] for e in events] == list(range(1, 26))
    assert [e["params"]["i"] for e in events] == list(range(25))


async def test_redis_pause_nacks_then_delivers_everything_once(
    make_server: MakeServer, redis: aioredis.Redis, redis_proc: RedisProcess
) -> None:
    """While Redis is paused frames are nacked; after it resumes every event is stored once."""
    srv = await make_server(store_timeout=0.3 * UNIT, retry_after_ms=50)
    async with EventwireClient(track_url(srv), batch_size=10) as client:
        for i in range(5):
            client.track("item.view", {"i": i})
        await client.flush(timeout=2 * UNIT)
        redis_proc.pause()
        try:
            for i in range(5, 40):
                client.track("item.view", {"i": i})
            await wait_until(lambda: client.nacks > 0, 3 * UNIT)
            for i in range(40, 60):
                client.track("item.view", {"i": i})
            await asyncio.sleep(0.3 * UNIT)
        finally:
            redis_proc.resume()
        await client.flush(timeout=4 * UNIT)
        assert client.connects == 1
        assert client.rejections == []
        assert client.accepted + client.duplicate == 60
    events = await stored(redis, client.producer)
    assert [e["seq"] for e in events] == list(range(1, 61))
    assert [e["params"]["i"] for e in events] == list(range(60))


async def test_unknown_site_is_retried_with_a_warning(server: EventwireServer) -> None:
    """A handshake refused with 404 is logged as a warning and retried, never acked."""
    client = EventwireClient(track_url(server, "nosuch"), backoff_base=0.01, backoff_max=0.05)
    with capture_logs() as logs:
        await client.start()
        client.track("item.view")
        with pytest.raises(TimeoutError):
            await client.flush(timeout=0.3 * UNIT)
        await client.close(flush=False)
    refused = [e for e in logs if e["event"] == "handshake_refused"]
    assert refused
    assert refused[0]["status"] == 404
    assert refused[0]["log_level"] == "warning"
    assert client.connects == 0


async def test_buffer_full_and_closed_client_refuse_events() -> None:
    """track() refuses unencodable params, BufferFull at max_buffer, and anything after close."""
    client = EventwireClient("ws://127.0.0.1:9/v1/track/app", max_buffer=3)
    with pytest.raises(TypeError):
        client.track("item.view", {"x": object()})
    assert [client.track("item.view") for _ in range(3)] == [1, 2, 3]
    with pytest.raises(BufferFull):
        client.track("item.view")
    with pytest.raises(ClientClosed):
        await client.flush()
    await client.close(flush=False)
    with pytest.raises(ClientClosed):
        client.track("item.view")


def test_invalid_hello_fields_are_refused_early() -> None:
    """A uuid or producer the server would refuse raises ValueError at construction."""
    with pytest.raises(ValueError, match="invalid hello"):
        EventwireClient("ws://127.0.0.1:9/v1/track/app", "not a uuid!")
    with pytest.raises(ValueError, match="invalid hello"):
        EventwireClient("ws://127.0.0.1:9/v1/track/app", producer="short")
    with pytest.raises(ValueError, match="isn't a valid URI"):
        EventwireClient("http://127.0.0.1:9/v1/track/app")
