"""``eventwire stats``: per-site numbers from a real server and Redis."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from eventwire.commands.stats import add_persist_rates, site_stats, table
from eventwire.gateway import EventwireServer
from eventwire.store import Keys, redis_client
from eventwire.store.survey import find_site, find_sites, partitions_found
from tests.conftest import SITES_TOML, MakeServer
from tests.procs import UNIT, RedisClusterProcess, RedisProcess, eventwire_command
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
    assert stats["backlog"] == length  # nothing acknowledged yet
    assert stats["persist_acked"] == 0
    await redis.xack(EVENTS, "persist", *ids)
    stats = await site_stats(redis, KEYS, "app")
    assert stats["persist_pending"] == 0
    assert stats["oldest_pending_s"] is None
    assert stats["persist_lag"] == length - 2
    assert (stats["backlog"], stats["persist_acked"]) == (length - 2, 2)


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
        "bots_per_s": 0.05,
        "open_sessions": 1,
        "persist_lag": None,
        "persist_pending": None,
        "oldest_pending_s": None,
    }
    lines = table({"sites": {"app": numbers}, "time": 0}).splitlines()
    assert lines[0].split()[:5] == ["site", "length", "events/s", "rejected/s", "bots/s"]
    assert lines[1].split() == [
        *("app", "12", "0.20", "0.00", "0.05", "-", "1"),
        *("-", "-", "-", "-", "-", "-"),
    ]
    assert len(lines[0]) == len(lines[1])


def test_persist_rate_and_time_until_the_cap() -> None:
    """Two looks give the persist rate; the cap (x partitions) and the rates, its time."""

    def look(time: int, acked: int, backlog: int, events_per_s: float) -> dict[str, Any]:
        numbers = {"persist_acked": acked, "backlog": backlog, "persist_lag": backlog}
        numbers |= {"events_per_s": events_per_s, "partitions": [{}, {}]}
        return {"sites": {"shop": numbers, "live": dict(numbers)}, "time": time}

    before = look(10_000, 1_000, 500, 300.0)
    now = look(12_000, 1_400, 900, 300.0)  # 200 acked/s while 300/s come in
    add_persist_rates(now, before, {"shop": 1_000, "live": 0})
    shop = now["sites"]["shop"]
    assert shop["persist_per_s"] == 200
    assert shop["max_backlog"] == 2_000  # per stream, two partitions
    assert shop["cap_in_s"] == 11.0  # (2000 - 900) / (300 - 200)
    live = now["sites"]["live"]  # on_backlog = "trim": no cap
    assert (live["max_backlog"], live["cap_in_s"]) == (None, None)
    caught_up = look(14_000, 2_400, 900, 300.0)  # 500 acked/s: shrinking
    add_persist_rates(caught_up, now, {"shop": 1_000})
    assert caught_up["sites"]["shop"]["cap_in_s"] is None
    full = look(16_000, 2_400, 2_000, 300.0)
    add_persist_rates(full, caught_up, {"shop": 1_000})
    assert full["sites"]["shop"]["cap_in_s"] == 0.0
    alone = look(0, 0, 0, 1.0)
    add_persist_rates(alone, None, {"shop": 1_000})
    assert alone["sites"]["shop"]["persist_per_s"] is None


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
    # The command adds the persist rate, the cap and the time until it (two looks).
    rates = {"persist_per_s", "max_backlog", "cap_in_s"}
    assert set(snap["sites"]["app"]) == set(await site_stats(redis, KEYS, "app")) | rates
    assert snap["sites"]["app"]["max_backlog"] == 1_000_000  # stream_maxlen by default


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


# -- sites found in Redis ---------------------------------------------------------------


async def add_entries(redis: Any, key: str, n: int = 1) -> None:
    """XADD ``n`` stored-looking events to ``key`` (a plain or a cluster client)."""
    site = key.split("{", 1)[1].split("}", 1)[0].split(":", 1)[0]
    for i in range(n):
        await redis.xadd(key, {"event": json.dumps({"site": site, "seq": i})})


async def test_find_sites_reads_stream_keys(redis: aioredis.Redis) -> None:
    """Sites and partitions from the prefix's events and rejected streams; nothing else counts."""
    for key in (
        "ew:{acc}:events",
        "ew:{acc}:rejected",
        "ew:{big:0}:events",
        "ew:{big:3}:rejected",  # partitions 1 and 2 have no stream yet: still counted
        "ew:{solo:0}:events",  # one partition stream still means a partitioned site
        "ew:{rej}:rejected",  # every event of it rejected so far
        "ew:{moved}:events",
        "ew:{moved:1}:events",  # both shapes (partitions changed): taken as partitioned
        "ew:{dead}:dead",  # not a site's stream
        "ew:{big:07}:events",  # not a partition eventwire writes
        "ew:{big:256}:events",  # above MAX_PARTITIONS
        "ew:{bad site}:events",  # not a site id
        "ew2:{other}:events",  # another key prefix
        "other:{zzz}:events",
    ):
        await add_entries(redis, key)
    await redis.set("ew:{text}:events", "not a stream")
    await redis.hset("ew:{acc}:sess:u1", "id", "s")
    expected = {"acc": 1, "big": 4, "moved": 2, "rej": 1, "solo": 2}
    found = await find_sites(redis, KEYS)
    assert found == expected
    assert list(found) == sorted(expected)
    for site, partitions in expected.items():
        assert await find_site(redis, KEYS, site) == partitions
    for site in ("text", "dead", "other", "nope", "bad site", "big:0"):
        assert await find_site(redis, KEYS, site) is None
    assert await find_sites(redis, Keys("ew2")) == {"other": 1}
    assert partitions_found([]) == 1
    assert partitions_found([None]) == 1
    assert partitions_found([0]) == 2
    assert partitions_found([None, 5, 2]) == 6


async def test_find_sites_walks_the_whole_keyspace(redis: aioredis.Redis) -> None:
    """Many SCAN calls (thousands of other keys): every site stream is found, each once."""
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(5000):
            pipe.set(f"ew:{{shop}}:producer:p{n}", n)
        await pipe.execute()
    sites = {f"s{n}": n % 3 + 1 for n in range(40)}
    for site, partitions in sites.items():
        for key in KEYS.streams(site, partitions):
            await add_entries(redis, key)
    assert await find_sites(redis, KEYS) == sites


async def test_stats_command_lists_sites_found_in_redis(
    server: EventwireServer, redis: aioredis.Redis, redis_proc: RedisProcess, sites_file: Path
) -> None:
    """``stats`` shows the sites file's sites and those only in Redis, partitioned ones summed."""
    async with peer(server.url, site="shop") as p:
        await p.hello("u-j")
        await p.track(event(1))
    await add_entries(redis, "ew:{acc}:events", 3)
    await add_entries(redis, "ew:{far:0}:events", 2)
    await add_entries(redis, "ew:{far:2}:events", 5)
    snap = await stats_command(redis_proc.url, sites_file)
    assert list(snap["sites"]) == ["shop", "app", "web", "acc", "far"]
    assert snap["sites"]["acc"]["length"] == 3
    assert "partitions" not in snap["sites"]["acc"]
    far = snap["sites"]["far"]
    assert far["length"] == 7
    assert [p["length"] for p in far["partitions"]] == [2, 0, 5]
    assert snap["sites"]["shop"]["length"] >= 2  # session.start and the event
    assert snap["sites"]["web"]["length"] == 0  # named by the file, nothing in Redis


async def test_find_sites_over_cluster(
    redis_cluster_proc: RedisClusterProcess, tmp_path: Path
) -> None:
    """A 3-master cluster: every primary is searched; ``stats`` and ``tail`` follow the finds."""
    for node in redis_cluster_proc.nodes:
        async with aioredis.Redis(host="127.0.0.1", port=node.port) as plain:
            await plain.flushall()
    cluster = redis_client(redis_cluster_proc.url)
    try:
        # Hash slots 3808, 6805 and 13556: one site per master; big's partitions spread too.
        sites = {"shop": 1, "app": 1, "docs": 1, "big": 4}
        for site, partitions in sites.items():
            for key in KEYS.streams(site, partitions):
                await add_entries(cluster, key, 2)
        assert isinstance(cluster, RedisCluster)
        masters = {cluster.get_node_from_key(KEYS.events(s)).name for s in ("shop", "app", "docs")}  # type: ignore[union-attr]
        assert len(masters) == 3
        assert await find_sites(cluster, KEYS) == dict(sorted(sites.items()))
        for site, partitions in sites.items():
            assert await find_site(cluster, KEYS, site) == partitions
        assert await find_site(cluster, KEYS, "nope") is None
    finally:
        await cluster.aclose()
    named = tmp_path / "one-site.toml"
    named.write_text("[sites.shop]\norigins = []\nallow_no_origin = true\n")
    snap = await stats_command(redis_cluster_proc.url, named)
    assert {s: n["length"] for s, n in snap["sites"].items()} == {
        "shop": 2, "app": 2, "big": 8, "docs": 2,
    }  # fmt: skip
    proc = await eventwire_command(
        "tail", "--redis", redis_cluster_proc.url, "--sites", str(named), "--site", "docs",
        "--site", "big", "--since", "0", "--json",
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(10 * UNIT):
            lines = [json.loads(await proc.stdout.readline()) for _ in range(10)]
    finally:
        proc.terminate()
        await proc.wait()
    assert Counter(ln["site"] for ln in lines) == {"docs": 2, "big": 8}
