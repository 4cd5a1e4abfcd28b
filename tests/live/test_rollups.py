"""eventwire.live.rollup and .tally: the summary viewers' exact counts and top tables."""

from __future__ import annotations

import json
import random
from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventwire.gateway import EventwireServer
from eventwire.live import Entry, tally
from eventwire.live import relay as live_relay
from eventwire.live.rollup import FEED_RATE, FeedSampler, Rollup, TopCounter, merge_top
from tests.conftest import MakeServer
from tests.live.test_live import eventually, send, viewer

EVENTS = "ew:{shop}:events"
REJECTED = "ew:{shop}:rejected"
CODES = ("invalid", "invalid_action", "missing_param", "too_old", "undecodable")


def _entry(ms: int, action: str, uuid: str = "u-1", **kw: Any) -> Entry:
    return Entry(f"{ms}-0", action, uuid, b"{}", **kw)


def test_rollup_counts_exactly_per_second() -> None:
    """Accepted, each reject code, sessions started and ended: exact, per second, in any order."""
    r = Rollup()
    events = [_entry(1_000_000 + i * 100, "page.visit", page="/a") for i in range(25)]
    events += [_entry(1_000_050, "session.start"), _entry(1_001_999, "session.end")]
    rejected = [_entry(1_000_010 + i * 200, "", code=CODES[i % 5]) for i in range(11)]
    random.Random(1).shuffle(events)
    r.add_events(events[:10])
    r.add_rejected(rejected)
    r.add_events(events[10:])
    seconds = {s.t: s for s in r.window()}
    assert seconds[1000].accepted == 11
    assert seconds[1000].started == 1
    assert seconds[1001].accepted == 11
    assert seconds[1001].ended == 1
    assert seconds[1002].accepted == 5
    by_code = Counter[str]()
    for s in seconds.values():
        by_code.update(s.rejected)
    assert by_code == Counter(CODES[i % 5] for i in range(11))
    tops = r.tops()
    assert tops["actions"].total == 27
    assert tops["pages"].total == 25
    assert [(c.key, c.count, c.error) for c in tops["pages"].rows] == [("/a", 25, 0)]
    r.expire(1_002_000 + 299_000)  # the window moves on: 1000 and 1001 leave it
    assert [s.t for s in r.window()] == [1002]


def test_top_counter_on_a_skewed_distribution() -> None:
    """Zipf-like keys over a small counter: the leaders come out right, every bound holds."""
    rng = random.Random(7)
    keys = [f"k{min(int(rng.paretovariate(1.1)), 5000)}" for _ in range(50_000)]
    truth = Counter(keys)
    minutes = [TopCounter(capacity=50) for _ in range(3)]
    for i, key in enumerate(keys):
        minutes[i % 3].add(key)
    assert max(len(c.counts) for c in minutes) <= 100, "memory stays bounded"
    top = merge_top(minutes, shown=10)
    assert top.total == len(keys)
    assert [c.key for c in top.rows] == [k for k, _ in truth.most_common(10)]
    for row in top.rows:
        assert row.count - row.error <= truth[row.key] <= row.count


def test_feed_sampler_keeps_a_readable_rate() -> None:
    """Above FEED_RATE a second the feed is every Nth entry; below, every entry."""
    sampler = FeedSampler()
    burst = [_entry(i, "x") for i in range(1000)]
    assert len(sampler.take(burst, 1)) == 1000  # the first second sets no rate yet
    assert len(sampler.take(burst, 2)) == FEED_RATE
    assert len(sampler.take(burst[:5], 3)) <= 1  # still every 50th: a quiet second follows
    assert len(sampler.take(burst[:5], 4)) == 5


async def _known_stream(redis: aioredis.Redis) -> tuple[int, Counter[str], Counter[str]]:
    """Writes a known mix into the shop's streams; returns accepted, actions, codes."""
    now_ms = int((await redis.time())[0]) * 1000
    actions = Counter[str]()
    codes = Counter[str]()
    for i in range(300):
        action = ("page.visit", "cart.add", "product.view")[i % 7 % 3]
        if i % 50 == 0:
            action = "session.start"
        actions[action] += 1
        record = {
            "site": "shop",
            "uuid": f"u-{i % 9}",
            "action": action,
            "seq": i,
            "params": {"url": f"/p{i % 4}"} if action == "page.visit" else {},
        }
        await redis.xadd(EVENTS, {"event": json.dumps(record)}, id=f"{now_ms - 60_000 + i}-0")
    for i in range(40):
        code = CODES[i % 4 if i % 10 else 4]
        codes[code] += 1
        record = {"site": "shop", "uuid": None, "code": code, "detail": "x", "raw": ""}
        await redis.xadd(REJECTED, {"event": json.dumps(record)}, id=f"{now_ms - 50_000 + i}-0")
    return 300, actions, codes


def totals(msgs: list[dict[str, Any]]) -> tuple[int, Counter[str], int]:
    """Accepted, rejected by code, and sessions started, from a snapshot and its ticks."""
    seconds: dict[int, dict[str, Any]] = {}
    for m in msgs:
        if m["type"] in ("snapshot", "tick"):
            seconds.update({s["t"]: s for s in m["seconds"]})
    codes = Counter[str]()
    for s in seconds.values():
        codes.update(s.get("rejected", {}))
    accepted = sum(s.get("accepted", 0) for s in seconds.values())
    return accepted, codes, sum(s.get("started", 0) for s in seconds.values())


async def test_summary_counts_a_known_stream(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """The snapshot counts the window's past exactly; ticks count what comes after exactly."""
    accepted, actions, codes = await _known_stream(redis)
    async with viewer(server, "site=shop&stream=summary") as v:
        await v.until(lambda m: m["type"] == "ready")
        snap = v.of("snapshot")[0]
        assert totals(v.messages) == (accepted, codes, actions["session.start"])
        top = {row[0]: row[1] for row in snap["top"]["actions"]["rows"]}
        assert top == {k: n for k, n in actions.items()}
        assert snap["top"]["pages"]["total"] == actions["page.visit"]
        feed = [m for m in v.messages if m["type"] in ("event", "rejected")]
        assert len(feed) == 300, "the newest few hundred entries of both streams"
        await send(server, 7, uuid="u-late")
        await v.until(lambda m: m["type"] == "tick" and totals(v.messages)[0] == accepted + 8)
    assert totals(v.messages)[2] == actions["session.start"] + 1  # u-late's session.start


async def test_two_viewers_two_processes_same_totals(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Two viewers of each of two server processes on one Redis: the same exact totals."""
    accepted, _, codes = await _known_stream(redis)
    servers = [await make_server(), await make_server()]
    got = []
    for srv in servers:
        for _ in range(2):
            async with viewer(srv, "site=shop&stream=summary") as v:
                await v.until(lambda m: m["type"] == "ready")
                got.append(totals(v.messages))
    assert got == [(accepted, codes, 6)] * 4


async def test_one_tally_for_many_viewers(server: EventwireServer) -> None:
    """Any number of summary viewers share one tally, which runs two readers, not one each."""
    relay = server.admin_routes.relay
    async with AsyncExitStack() as stack:
        views = [
            await stack.enter_async_context(viewer(server, "site=shop&stream=summary"))
            for _ in range(20)
        ]
        for v in views:
            await v.until(lambda m: m["type"] == "ready")
        assert relay.readers == 2
        assert len(relay._tallies) == 1
        await send(server, 3)
        for v in views:
            await v.until(lambda m, v=v: m["type"] == "tick" and totals(v.messages)[0] == 4)
    await eventually(lambda: relay.viewers == 0)
    assert relay.readers == 2, "the tally lingers with its readers for the next viewer"


def test_summary_queries() -> None:
    """stream=summary takes the site alone."""
    from eventwire.live import LiveQuery, parse_query

    ok = parse_query("site=shop&stream=summary", lambda s: s == "shop")
    assert isinstance(ok, LiveQuery)
    assert ok.summary
    bad = parse_query("site=shop&stream=summary&since=5m", lambda s: s == "shop")
    assert bad[0] == 400  # type: ignore[index]


async def test_summary_says_where_trimmed_counts_start(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """A window whose start was trimmed away: the snapshot's since is the oldest entry left."""
    await _known_stream(redis)
    await redis.xtrim(EVENTS, maxlen=100, approximate=False)
    first = (await redis.xrange(EVENTS, count=1))[0][0].decode()
    async with viewer(server, "site=shop&stream=summary") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert v.of("snapshot")[0]["since"] == int(first.split("-")[0])
    assert totals(v.messages)[0] == 100


async def test_snapshot_during_a_long_backfill(
    server: EventwireServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer need not wait for a long backfill: ticks bring the past; the totals end exact."""
    accepted, _, codes = await _known_stream(redis)
    monkeypatch.setattr(live_relay, "WARM_WAIT", 0)
    monkeypatch.setattr(tally, "BACKFILL_PAGE", 5)  # ~70 pages: the snapshot comes first
    async with viewer(server, "site=shop&stream=summary") as v:
        await v.until(lambda m: m["type"] == "ready")
        assert v.of("snapshot")[0]["backfilling"] is True
        await v.until(lambda m: m["type"] == "tick" and "backfilling" not in m)
    assert totals(v.messages) == (accepted, codes, 6)


def test_top_counter_exact_up_to_twice_its_capacity() -> None:
    """Until 2 x capacity keys are held, nothing is evicted and every count is exact."""
    c = TopCounter(capacity=10)
    for i in range(20):
        c.add(f"k{i}", i + 1)
    assert c.floor == 0
    assert all(error == 0 for _, error in c.counts.values())
    c.add("k20")  # the 21st key: the 10 largest stay, the new one starts above the floor
    assert len(c.counts) == 11
    assert c.counts["k20"] == [c.floor + 1, c.floor]
