"""Partitioned sites (``partitions = P``): the ingest path, sessions and identify over P streams.

The readers that follow every partition are tested with their rooms
(test_tail, test_stats, test_persist, test_live); the whole path over a real
Redis Cluster is in test_cluster.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventwire.core.errors import ConfigError
from eventwire.core.rules import SitesBook, load_sites
from eventwire.store import Keys, StreamInfo, merge_stream_info
from tests.conftest import MakeServer
from tests.procs import UNIT
from tests.test_admin import fetch
from tests.wire import event, peer, producer_id, stream

P = 4
SITES = f"[sites.app]\nallow_no_origin = true\npartitions = {P}\n"
FAST = {"session_grace": 0.3, "reap_interval": 0.05}


def part(uuid: str) -> int:
    """The partition of a customer: crc32 of its uuid, mod P."""
    return zlib.crc32(uuid.encode()) % P


def uuid_in(partition: int, avoid: str = "") -> str:
    """A customer uuid that lands in ``partition``."""
    return next(u for n in range(1000) if part(u := f"c-{n}") == partition and u != avoid)


async def partition_events(redis: aioredis.Redis, partition: int) -> list[dict[str, Any]]:
    """Every record of one partition's events stream."""
    return await stream(redis, f"ew:{{app:{partition}}}:events")


async def all_events(redis: aioredis.Redis) -> dict[int, list[dict[str, Any]]]:
    """Every partition's events, by partition."""
    return {p: await partition_events(redis, p) for p in range(P)}


async def wait_for(redis: aioredis.Redis, action: str, count: int) -> list[dict[str, Any]]:
    """Wait until the partitions hold ``count`` events of ``action`` in all."""
    deadline = asyncio.get_running_loop().time() + 5 * UNIT
    while True:
        found = [
            e
            for events in (await all_events(redis)).values()
            for e in events
            if e["action"] == action
        ]
        if len(found) >= count or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.02)


def test_partition_is_crc32_of_the_uuid() -> None:
    """The partition function is pinned: readers in other languages compute the same."""
    assert Keys.tag("app", "u-1", 1) == "app"
    assert Keys.tags("app", 1) == ["app"]
    assert Keys.tags("app", 3) == ["app:0", "app:1", "app:2"]
    # crc32(b"customer-42") = 1241360405, crc32(b"u-4") = 2900745715
    assert Keys.tag("app", "customer-42", 4) == "app:1"
    assert Keys.tag("app", "u-4", 4) == "app:3"
    assert Keys.tag("app", "u-4", 7) == f"app:{2900745715 % 7}"
    assert Keys("ew").events("app:3") == "ew:{app:3}:events"


def test_merge_stream_info() -> None:
    """A partitioned site's streams read as one: sums, the oldest first id, the newest last id."""
    a = StreamInfo(length=3, entries_added=5, first_id="10-0", last_generated_id="30-1")
    b = StreamInfo(length=2, entries_added=2, first_id="9-5", last_generated_id="12-0")
    empty = StreamInfo(length=0, entries_added=4, first_id=None, last_generated_id="40-0")
    assert merge_stream_info([None, None]) is None
    assert merge_stream_info([None, a]) == a
    assert merge_stream_info([a, b, empty, None]) == StreamInfo(
        length=5, entries_added=11, first_id="9-5", last_generated_id="40-0"
    )


async def test_events_land_in_their_customers_partition(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Each customer's events, session.start included, are in its partition's stream, in order."""
    srv = await make_server(sites=SITES, **FAST)
    customers = [f"c-{n}" for n in range(16)]
    assert {part(u) for u in customers} == set(range(P))
    for uuid in customers:
        async with peer(srv.url) as p:
            await p.hello(uuid)
            ack = await p.track(*(event(s) for s in range(1, 6)))
            assert ack["accepted"] == 5, ack
    await wait_for(redis, "session.end", len(customers))
    assert await redis.exists("ew:{app}:events") == 0, "nothing in the unpartitioned stream"
    found = await all_events(redis)
    for uuid in customers:
        mine = [e for e in found[part(uuid)] if e["uuid"] == uuid]
        assert [e["action"] for e in mine] == [
            "session.start",
            *["product.view"] * 5,
            "session.end",
        ]
        assert [e["seq"] for e in mine if not e["producer"].startswith("srv:")] == [1, 2, 3, 4, 5]
        assert all(e["site"] == "app" for e in mine)
        others = [e for p, events in found.items() if p != part(uuid) for e in events]
        assert not any(e["uuid"] == uuid for e in others)
    # Each partition has its own session state, emptied once every session ended.
    for p in range(P):
        assert await redis.zcard(f"ew:{{app:{p}}}:due") == 0
        assert await redis.zcard(f"ew:{{app:{p}}}:live") == 0


async def test_welcome_acked_and_duplicates(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A producer's stored seq is kept in its customer's partition: acked and dedup are exact."""
    srv = await make_server(sites=SITES, **FAST)
    uuid, producer = uuid_in(2), producer_id()
    async with peer(srv.url) as p:
        assert (await p.hello(uuid, producer))["acked"] == 0
        assert (await p.track(event(1), event(2)))["accepted"] == 2
    async with peer(srv.url, msgpack=True) as p:
        assert (await p.hello(uuid, producer))["acked"] == 2
        ack = await p.track(event(2), event(3))
        assert (ack["accepted"], ack["duplicate"]) == (1, 1)
    assert await redis.get(f"ew:{{app:2}}:producer:{producer}") == b"3"
    seqs = [e["seq"] for e in await partition_events(redis, 2) if e["producer"] == producer]
    assert seqs == [1, 2, 3]


async def test_identify_moves_to_another_partition(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """identify across partitions: the old session ends in its partition, the new opens in its
    own, and the producer's stored seq follows, so acked and dedup stay as with one key."""
    srv = await make_server(sites=SITES, **FAST)
    a = uuid_in(0)
    b = uuid_in(3)
    producer = producer_id()
    async with peer(srv.url) as p:
        old = await p.hello(a, producer)
        assert (await p.track(event(1), event(2), event(3)))["accepted"] == 3
        await p.send({"type": "identify", "uuid": b})
        assert (await p.track(event(4)))["accepted"] == 1
        # A seq the producer stored in the old partition is a duplicate here too.
        ack = await p.track(event(2), event(5))
        assert (ack["accepted"], ack["duplicate"]) == (1, 1)
    async with peer(srv.url) as p:
        again = await p.hello(b, producer)
        assert again["acked"] == 5
        assert (await p.track(event(5), event(6)))["duplicate"] == 1
    await wait_for(redis, "session.end", 2)
    first = await partition_events(redis, 0)
    assert [e["action"] for e in first] == [
        "session.start",
        *["product.view"] * 3,
        "client.identify",
        "session.end",
    ]
    identify, end = first[-2:]
    # client.identify closes the old session, in the old partition, naming both customers.
    assert (identify["uuid"], identify["params"]["previous_uuid"]) == (b, a)
    assert identify["session"] == old["session"]
    assert end["params"]["reason"] == "identify"
    second = await partition_events(redis, 3)
    assert [e["action"] for e in second] == ["session.start", *["product.view"] * 3, "session.end"]
    assert [e["seq"] for e in second if e["producer"] == producer] == [4, 5, 6]
    assert {e["uuid"] for e in second} == {b}
    assert await redis.get(f"ew:{{app:0}}:producer:{producer}") == b"3"
    assert await redis.get(f"ew:{{app:3}}:producer:{producer}") == b"6"


async def test_identify_back_keeps_the_high_water_mark(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Moving back to a partition whose copy of the seq is behind raises it, never lowers it."""
    srv = await make_server(sites=SITES, **FAST)
    a, b = uuid_in(1), uuid_in(2)
    producer = producer_id()
    async with peer(srv.url) as p:
        await p.hello(a, producer)
        await p.track(event(1))
        await p.send({"type": "identify", "uuid": b})
        await p.track(event(10))
        await p.send({"type": "identify", "uuid": a})
        ack = await p.track(event(5), event(11))
        assert (ack["accepted"], ack["duplicate"]) == (1, 1)
    assert await redis.get(f"ew:{{app:1}}:producer:{producer}") == b"11"
    assert await redis.get(f"ew:{{app:2}}:producer:{producer}") == b"10"


async def test_same_partition_identify_needs_no_carry(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """identify between customers of one partition keeps the one producer key."""
    srv = await make_server(sites=SITES, **FAST)
    a = uuid_in(1)
    b = uuid_in(1, avoid=a)
    producer = producer_id()
    async with peer(srv.url) as p:
        await p.hello(a, producer)
        await p.track(event(1))
        await p.send({"type": "identify", "uuid": b})
        assert (await p.track(event(1), event(2)))["duplicate"] == 1
    events = await partition_events(redis, 1)
    assert [(e["uuid"], e["seq"]) for e in events if e["producer"] == producer] == [
        (a, 1),
        (b, 2),
    ]


async def test_rejected_and_undecodable_in_the_customers_partition(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Rejections and undecodable frames are recorded in the sender's partition."""
    srv = await make_server(sites=SITES, **FAST)
    uuid = uuid_in(3)
    async with peer(srv.url) as p:
        await p.hello(uuid)
        ack = await p.track(event(1, action="nodots"))
        assert ack["rejected"][0]["code"] == "invalid_action"
        await p.send("{not json")
        assert (await p.recv())["type"] == "error"
        await p.ws.wait_closed()
        assert p.ws.close_code == 1007
    records = await stream(redis, "ew:{app:3}:rejected")
    assert [r["code"] for r in records] == ["invalid_action", "undecodable"]
    assert all(r["uuid"] == uuid for r in records)


async def test_summary_sums_the_partitions(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """The admin summary reads a partitioned site as one: sessions and stream lengths summed."""
    srv = await make_server(sites=SITES)
    customers = [uuid_in(p) for p in range(P)]
    peers = [peer(srv.url) for _ in customers]
    opened = [await c.__aenter__() for c in peers]
    try:
        for p, uuid in zip(opened, customers, strict=True):
            await p.hello(uuid)
            await p.track(event(1), event(2))
        status, _, body = await fetch(srv.admin_url + "/v1/sites/app/summary")
    finally:
        for c in peers:
            await c.__aexit__(None, None, None)
    assert status == 200
    summary = json.loads(body)
    assert summary["open_sessions"] == P
    assert summary["events"]["length"] == 3 * P  # session.start and two events each
    ids = [i.decode() for p in range(P) for i, _ in await redis.xrange(f"ew:{{app:{p}}}:events")]
    key = lambda i: tuple(map(int, i.split("-")))  # noqa: E731
    assert summary["events"]["first_id"] == min(ids, key=key)
    assert summary["events"]["last_id"] == max(ids, key=key)


def test_partitions_cannot_change_on_reload(tmp_path: Path) -> None:
    """A reload that changes a site's partitions is refused and the rules in force stay."""
    path = tmp_path / "sites.toml"
    path.write_text(SITES)
    book = SitesBook(path, load_sites(path))
    path.write_text(SITES.replace(f"partitions = {P}", "partitions = 8"))
    with pytest.raises(ConfigError, match="partitions cannot change while running"):
        book.reload()
    assert book.sites["app"].config.partitions == P
    path.write_text(SITES + "[sites.new]\nallow_no_origin = true\npartitions = 2\n")
    assert book.reload()["new"].config.partitions == 2
    # A site removed keeps its layout: its open connections leave the keys they joined,
    # and it may come back only as it was.
    path.write_text("[sites.new]\nallow_no_origin = true\npartitions = 2\n")
    assert "app" not in book.reload()
    assert book.partitions("app") == P
    assert book.partitions("never") == 1
    path.write_text("[sites.app]\nallow_no_origin = true\npartitions = 2\n")
    with pytest.raises(ConfigError, match=f"{P} -> 2"):
        book.reload()
    path.write_text("[sites.app]\npartitions = 0\n")
    with pytest.raises(ConfigError, match="partitions"):
        book.reload()


async def test_resend_by_customer_after_reconnect(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """A client that resends each event for the customer it was first sent for (as the
    tracker does) stores each once, while its old connection is still open."""
    srv = await make_server(sites=SITES, **FAST)
    a, b = uuid_in(0), uuid_in(2)
    producer = producer_id()
    async with peer(srv.url) as old, peer(srv.url) as new:
        await old.hello(a, producer)
        assert (await old.track(event(1), event(2)))["accepted"] == 2
        await old.send({"type": "identify", "uuid": b})
        assert (await old.track(event(3), event(4)))["accepted"] == 2
        # The client lost the old connection's acks and reconnects, resending all.
        assert (await new.hello(a, producer))["acked"] == 2
        assert (await new.track(event(1), event(2)))["duplicate"] == 2
        await new.send({"type": "identify", "uuid": b})
        ack = await new.track(event(3), event(4), event(5))
        assert (ack["accepted"], ack["duplicate"]) == (1, 2)
        # The old connection, still open, sends its last frame late.
        assert (await old.track(event(5)))["duplicate"] == 1
    stored = {
        p: [e["seq"] for e in await partition_events(redis, p) if e["producer"] == producer]
        for p in (0, 2)
    }
    assert stored == {0: [1, 2], 2: [3, 4, 5]}
