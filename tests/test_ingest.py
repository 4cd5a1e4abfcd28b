"""eventwire.ingest through a real server and Redis: hello, track, ack, reject, dedup."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from eventwire.gateway import EventwireServer
from tests.procs import RedisProcess
from tests.wire import client_events, event, now_ms, peer, producer_id, stream

BOTH = pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
STORED_FIELDS = {
    *("site", "uuid", "session", "producer", "seq"),
    *("action", "label", "time", "received", "params"),
}


@BOTH
async def test_events_land_with_every_field(
    server: EventwireServer, redis: aioredis.Redis, msgpack: bool
) -> None:
    """Accepted events of both subprotocols land in ew:{site}:events with the section 7 fields."""
    producer = producer_id()
    t = now_ms() - 1000
    async with peer(server.url, msgpack=msgpack) as p:
        welcome = await p.hello("cust-1", producer, context={"url": "https://a/"})
        assert welcome["acked"] == 0
        assert welcome["resumed"] is False
        assert welcome["max_batch"] == 500
        assert abs(welcome["server_time"] - now_ms()) < 5000
        ack = await p.track(
            {
                "seq": 1,
                "action": "page.visit",
                "time": t,
                "params": {"url": "https://a/", "title": "A"},
            },
            {
                "seq": 2,
                "action": "product.view",
                "label": "Saw",
                "params": {"sku": "X", "n": {"d": [1]}},
            },
        )
    assert ack == {"type": "ack", "seq": 2, "accepted": 2, "duplicate": 0, "rejected": []}
    events = await client_events(redis)
    assert [e["seq"] for e in events] == [1, 2]
    first, second = events
    assert set(first) == STORED_FIELDS
    assert first["site"] == "app"
    assert first["uuid"] == "cust-1"
    assert first["session"] == welcome["session"]
    assert first["producer"] == producer
    assert first["label"] == "Visited page A"
    assert first["time"] == t
    assert first["received"] >= t
    assert second["label"] == "Saw"
    assert second["params"] == {"sku": "X", "n": {"d": [1]}}


async def test_no_subprotocol_means_json(server: EventwireServer, redis: aioredis.Redis) -> None:
    """A client that offers no subprotocol is served JSON."""
    async with peer(server.url, subprotocol=None) as p:
        assert p.ws.subprotocol is None
        await p.hello()
        ack = await p.track(event(1))
    assert ack["accepted"] == 1


async def test_each_reject_code(server: EventwireServer, redis: aioredis.Redis) -> None:
    """Each reject code comes from a real bad event and lands in the rejected stream."""
    producer = producer_id()
    async with peer(server.url) as p:
        await p.hello("u-r", producer)
        ack = await p.track(
            event(1),
            event(2, action="nodot"),
            {"seq": 3, "action": "page.visit", "params": {"title": "no url"}},
            event(4, params={"blob": "x" * 40_000}),
            event(5, time=now_ms() - 8 * 86_400_000),
            event(6, label=42),
            event(6),
            event(7, params=[1, 2]),
            event(8),
        )
    codes = {r["seq"]: r["code"] for r in ack["rejected"]}
    assert codes == {
        2: "invalid_action",
        3: "missing_param",
        4: "too_large",
        5: "too_old",
        6: "invalid",
        7: "invalid",
    }
    assert len(ack["rejected"]) == 7  # seq 6 twice: a bad label, then a repeated seq
    assert ack["accepted"] == 2
    assert ack["seq"] == 8
    rejected = await stream(redis, "ew:{app}:rejected")
    assert sorted((r["seq"], r["code"]) for r in rejected) == sorted(
        (r["seq"], r["code"]) for r in ack["rejected"]
    )
    for r in rejected:
        assert r["site"] == "app"
        assert r["uuid"] == "u-r"
        assert r["producer"] == producer
        assert r["detail"]
        assert r["received"] > 0
        assert len(r["raw"]) <= 4096
    label_bad = next(r for r in ack["rejected"] if r["seq"] == 6 and "label" in r["detail"])
    assert "$.events[5].label" in label_bad["detail"]
    assert [e["seq"] for e in await client_events(redis)] == [1, 8]


async def test_resend_is_duplicate(server: EventwireServer, redis: aioredis.Redis) -> None:
    """Resending seqs on a new connection counts duplicate and stores nothing again."""
    producer = producer_id()
    async with peer(server.url) as p:
        await p.hello("u-d", producer)
        assert (await p.track(event(1), event(2), event(3)))["accepted"] == 3
    async with peer(server.url, msgpack=True) as p:
        welcome = await p.hello("u-d", producer)
        assert welcome["acked"] == 3
        ack = await p.track(event(2), event(3), event(4))
    assert (ack["accepted"], ack["duplicate"]) == (1, 2)
    assert [e["seq"] for e in await client_events(redis)] == [1, 2, 3, 4]


async def test_rejected_seq_is_final(server: EventwireServer, redis: aioredis.Redis) -> None:
    """A rejected seq counts as handled: welcome.acked covers it and a resend records it once."""
    producer = producer_id()
    async with peer(server.url) as p:
        await p.hello("u-f", producer)
        await p.track(event(1), event(2, action="bad"))
    async with peer(server.url) as p:
        assert (await p.hello("u-f", producer))["acked"] == 2
        ack = await p.track(event(1), event(2, action="bad"))
    assert ack["duplicate"] == 1
    assert [r["code"] for r in ack["rejected"]] == ["invalid_action"]
    assert len(await stream(redis, "ew:{app}:rejected")) == 1


async def test_pipelined_frames_acked_in_order(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """Frames sent back to back get one answer each, in frame order."""
    async with peer(server.url) as p:
        await p.hello()
        for f in range(30):
            await p.send({"type": "track", "events": [event(f * 10 + i + 1) for i in range(10)]})
        acks = [await p.recv() for _ in range(30)]
    assert [a["seq"] for a in acks] == [f * 10 + 10 for f in range(30)]
    assert all(a["accepted"] == 10 for a in acks)
    assert len(await client_events(redis)) == 300


async def test_concurrent_connections_one_producer(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """Two connections racing with one producer store each seq exactly once."""
    producer = producer_id()

    async def send_all() -> tuple[int, int]:
        async with peer(server.url) as p:
            await p.hello("u-race", producer)
            for s in range(1, 101, 5):
                await p.send({"type": "track", "events": [event(s + i) for i in range(5)]})
            acks = [await p.recv() for _ in range(20)]
        return sum(a["accepted"] for a in acks), sum(a["duplicate"] for a in acks)

    results = await asyncio.gather(send_all(), send_all())
    assert sum(r[0] for r in results) == 100
    assert sum(r[1] for r in results) == 100
    assert sorted(e["seq"] for e in await client_events(redis)) == list(range(1, 101))


async def test_identify_switches_customer(server: EventwireServer, redis: aioredis.Redis) -> None:
    """identify publishes client.identify and moves the connection to a new session."""
    async with peer(server.url) as p:
        welcome = await p.hello("anon-1")
        await p.track(event(1))
        await p.send({"type": "identify", "uuid": "customer-42"})
        ack = await p.track(event(2))
        assert ack["accepted"] == 1
    events = await client_events(redis)
    assert [(e["seq"], e["uuid"]) for e in events] == [(1, "anon-1"), (2, "customer-42")]
    assert events[1]["session"] != welcome["session"]
    made = [e for e in await stream(redis, "ew:{app}:events") if e["producer"].startswith("srv:")]
    actions = [(e["action"], e["uuid"]) for e in made]
    assert ("client.identify", "customer-42") in actions
    ident = next(e for e in made if e["action"] == "client.identify")
    assert ident["params"] == {"previous_uuid": "anon-1", "merged": True}
    ends = [e for e in made if e["action"] == "session.end"]
    assert ends[0]["params"]["reason"] == "identify"
    assert ends[0]["session"] == welcome["session"]


async def test_batch_limits(make_server, redis: aioredis.Redis) -> None:  # type: ignore[no-untyped-def]
    """A frame with more than max_batch events, or none, is undecodable: error, close 1007."""
    srv = await make_server(max_batch=3)
    for events in ([event(i) for i in range(1, 5)], []):
        async with peer(srv.url) as p:
            welcome = await p.hello()
            assert welcome["max_batch"] == 3
            await p.send({"type": "track", "events": events})
            err = await p.recv()
            assert err["type"] == "error"
            assert err["code"] == "undecodable"
            await p.ws.wait_closed()
            assert p.ws.close_code == 1007
    rejected = await stream(redis, "ew:{app}:rejected")
    assert [r["code"] for r in rejected] == ["undecodable", "undecodable"]
    assert json.loads(rejected[1]["raw"]) == {"type": "track", "events": []}


async def test_drain_with_several_waiters(
    make_server,
    redis_proc: RedisProcess,
    redis: aioredis.Redis,  # type: ignore[no-untyped-def]
) -> None:
    """Several tasks draining one connection at once all return (no waiter is lost)."""
    srv = await make_server(store_timeout=2)
    async with peer(srv.url) as p:
        await p.hello()
        ingest = next(iter(srv._connections.values()))
        redis_proc.pause()
        try:
            for f in range(5):
                await p.send({"type": "track", "events": [event(f + 1)]})
            while ingest.protocol.frames < 5:  # noqa: ASYNC110 - the server's state, not ours
                await asyncio.sleep(0.01)
            drains = asyncio.gather(*(ingest.drain() for _ in range(3)))
            await asyncio.sleep(0.05)
        finally:
            redis_proc.resume()
        await asyncio.wait_for(drains, 5)
        assert not ingest.protocol.unanswered
