"""``eventwire stats``: per-site numbers from a real server and Redis."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from eventwire.commands.stats import site_stats, table
from eventwire.gateway import EventwireServer
from eventwire.store import Keys
from tests.conftest import SITES_TOML, MakeServer
from tests.procs import UNIT, RedisProcess, eventwire_command
from tests.wire import event, peer

KEYS = Keys("ew")
EVENTS = "ew:{app}:events"
#: The test sites plus ``big``, whose events are split over four partitions.
P = 4
SPLIT_SITES = SITES_TOML + f"\n[sites.big]\nallow_no_origin = true\npartitions = {P}\n"


async def stats_command(redis_url: str, sites: Path) -> dict[str, Any]:
    """``python -m eventwire stats --json``'s snapshot."""
    proc = await eventwire_command("stats", "--redis", redis_url, "--sites", str(sites), "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 10 * UNIT)
    assert proc.returncode == 0, err
    snap: dict[str, Any] = json.loads(out)
    return snap


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
    """``python -m eventwire stats --json`` prints one JSON object with every site."""
    async with peer(server.url, site="shop") as p:
        await p.hello("u-j")
        await p.track(event(1))
        proc = await eventwire_command(
            "stats", "--redis", redis_proc.url, "--sites", str(sites_file), "--json"
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


async def test_site_stats_sums_partitions(
    make_server: MakeServer, redis: aioredis.Redis, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """A 4-partition site: lengths, rates and open sessions are sums; each partition is listed."""
    server = await make_server(sites=SPLIT_SITES)
    uuids = [f"u-p{n}" for n in range(12)]
    tags = Keys.tags("big", P)
    assert {Keys.tag("big", u, P) for u in uuids} == set(tags)
    async with AsyncExitStack() as stack:
        for uuid in uuids:
            p = await stack.enter_async_context(peer(server.url, site="big"))
            await p.hello(uuid)
            ack = await p.track(event(1), event(2), event(3, action="nodot"))
            assert ack["accepted"] == 2
        stats = await site_stats(redis, KEYS, "big", partitions=P)
        lengths = [await redis.xlen(KEYS.events(t)) for t in tags]
        sessions = [sum(1 for u in uuids if Keys.tag("big", u, P) == t) for t in tags]
        assert stats["length"] == sum(lengths) >= 3 * len(uuids)  # 2 events + session.start
        assert stats["events_per_s"] == round(sum(lengths) / 60, 3)
        assert stats["rejected_length"] == len(uuids)
        assert stats["rejected_per_s"] == round(len(uuids) / 60, 3)
        assert stats["open_sessions"] == len(uuids)
        assert [p["length"] for p in stats["partitions"]] == lengths
        assert [p["open_sessions"] for p in stats["partitions"]] == sessions
        assert [p["events_per_s"] for p in stats["partitions"]] == [
            round(n / 60, 3) for n in lengths
        ]
        assert stats["persist_lag"] is None
        assert {p["persist_lag"] for p in stats["partitions"]} == {None}
        # The command reads the partitions from the sites file; P = 1 sites say nothing of them.
        sites = tmp_path / "split.toml"
        sites.write_text(SPLIT_SITES)
        snap = await stats_command(redis_proc.url, sites)
    assert snap["sites"]["big"]["length"] == sum(lengths)
    assert snap["sites"]["big"]["open_sessions"] == len(uuids)
    assert [p["length"] for p in snap["sites"]["big"]["partitions"]] == lengths
    assert "partitions" not in snap["sites"]["app"]
    assert set(snap["sites"]["app"]) == set(await site_stats(redis, KEYS, "app"))


async def test_site_stats_persist_group_over_partitions(redis: aioredis.Redis) -> None:
    """The persist group on 4 partitions: lag and pending summed, the oldest pending of all."""
    streams = [KEYS.events(t) for t in Keys.tags("big", P)]
    now = int((await redis.time())[0]) * 1000
    added = [now - 1000, now - 5000, now - 20_000, now - 1000]  # ms of each stream's entries
    for n, key in enumerate(streams):
        for i in range(n + 1):  # 1, 2, 3, 4 entries: 10 in all
            body = {"site": "big", "seq": i}
            await redis.xadd(key, {"event": json.dumps(body)}, id=f"{added[n]}-{i + 1}")
    for key in streams[:3]:
        await redis.xgroup_create(key, "persist", id="0")
    # Partition 3's stream has entries but no group: what it lags is unknown.
    stats = await site_stats(redis, KEYS, "big", partitions=P)
    assert stats["persist_lag"] is None
    assert [p["persist_lag"] for p in stats["partitions"]] == [1, 2, 3, None]
    assert stats["persist_pending"] == 0
    await redis.xgroup_create(streams[3], "persist", id="0")
    stats = await site_stats(redis, KEYS, "big", partitions=P)
    assert stats["persist_lag"] == 10
    assert stats["oldest_pending_s"] is None
    first: Any = await redis.xreadgroup("persist", "w1", {streams[2]: ">"}, count=2)
    await redis.xreadgroup("persist", "w1", {streams[1]: ">"}, count=1)
    stats = await site_stats(redis, KEYS, "big", partitions=P)
    assert stats["persist_lag"] == 7
    assert stats["persist_pending"] == 3
    assert [p["persist_pending"] for p in stats["partitions"]] == [0, 1, 2, 0]
    assert 20 <= stats["oldest_pending_s"] < 20 + 5 * UNIT  # partition 2's entry
    await redis.xack(streams[2], "persist", *[i for i, _ in first[0][1]])
    stats = await site_stats(redis, KEYS, "big", partitions=P)
    assert stats["persist_pending"] == 1
    assert 5 <= stats["oldest_pending_s"] < 20  # now partition 1's


def test_table_partitions_column() -> None:
    """With a partitioned site the table gets a partitions column: P and the busiest's share."""
    plain = {
        "length": 12,
        "events_per_s": 0.2,
        "rejected_per_s": 0.0,
        "open_sessions": 1,
        "persist_lag": None,
        "persist_pending": None,
        "oldest_pending_s": None,
    }
    split = plain | {"length": 20, "partitions": [{"length": n} for n in (2, 4, 6, 8)]}
    lines = table({"sites": {"app": plain, "big": split}, "time": 0}).splitlines()
    assert lines[0].split()[-1] == "partitions"
    assert lines[1].split()[-1] == "1"
    assert lines[2].split()[-3:] == ["4", "(busiest", "40%)"]
    assert len({len(line) for line in lines}) == 1
