"""Rollups in the store: written by the worker from the rows it inserted, read back by range."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from eventwire.persist import rollups
from eventwire.persist.ranges import RANGES, RangeView, RollupReader, RollupsUnavailable
from eventwire.persist.rollups import merge_table, true_bounds
from eventwire.persist.sinks import EventRow, Sink, open_sink
from tests.persist.test_worker import (  # noqa: F401 - dsn: the store fixture
    ForwardingSink,
    dsn,
    pending,
    start_worker,
    wait_rows,
)
from tests.procs import UNIT, RedisProcess
from tests.wire import now_ms

EVENTS = "ew:{app}:events"
MINUTE = 60_000


def record(seq: int, received: int, action: str, uuid: str, **params: Any) -> bytes:
    """A stored event as the server writes it, received at ``received`` (ms)."""
    return json.dumps(
        {
            "site": "app", "uuid": uuid, "session": f"s-{uuid}", "producer": "p-old",
            "seq": seq, "action": action, "label": action, "time": received,
            "received": received, "params": params,
        }
    ).encode()  # fmt: skip


def spread(now: int) -> list[tuple[int, str, str, dict[str, Any]]]:
    """Events over the last three hours (received, action, uuid, params), a known mix."""
    out = []
    for i in range(180):
        received = now - i * MINUTE - 1_000
        uuid = f"cust-{i % 4}"
        if i % 30 == 0:
            out.append((received, "session.start", uuid, {}))
        out.append((received, "page.visit", uuid, {"url": f"https://shop.example/{i % 3}"}))
        out.append((received, "product.view", uuid, {"sku": "A-1"}))
        if i % 30 == 29:
            out.append((received, "session.end", uuid, {"reason": "idle"}))
    return out


def expected(events: Sequence[tuple[int, str, str, dict[str, Any]]], name: str, now: int) -> Any:
    """The counts and top tables of a range, counted here from the events themselves."""
    spec = RANGES[name]
    step = spec.step * 1000
    since = now - now % step - spec.seconds * 1000 + step
    top_since = since - since % (spec.top_span * 1000)
    counted = [e for e in events if since <= e[0] <= now]
    buckets: dict[int, Counter[str]] = {}
    for received, action, _, _ in counted:
        b = buckets.setdefault(received - received % step, Counter())
        b["accepted"] += 1
        b["started"] += action == "session.start"
        b["ended"] += action == "session.end"
    topped = [e for e in events if top_since <= e[0] <= now]
    pages = Counter(p["url"] for _, a, _, p in topped if a == "page.visit")
    return (
        {t: {k: v for k, v in c.items() if v} for t, c in sorted(buckets.items())},
        Counter(a for _, a, _, _ in topped),
        pages,
        Counter(u for _, _, u, _ in topped),
    )


def tops_of(view: RangeView, table: str) -> Counter[str]:
    """A view's top table as exact counts (every row's error is 0 here: few keys)."""
    assert all(r.error == 0 for r in view.top[table].rows)
    return Counter({r.key: r.count for r in view.top[table].rows})


async def test_24h_view_after_the_worker_wrote_three_hours(
    redis_proc: RedisProcess,
    redis: aioredis.Redis,
    sites_file: Path,
    dsn: str,  # noqa: F811
) -> None:
    """Entries received over three hours (time injected in the records) make exact 1 h, 24 h
    and 7 d views: buckets, totals, sessions and top tables."""
    now = now_ms()
    events = spread(now)
    for seq, (received, action, uuid, params) in enumerate(sorted(events), 1):
        await redis.xadd(EVENTS, {"event": record(seq, received, action, uuid, **params)})
    worker = await start_worker(redis_proc, sites_file, dsn)
    try:
        await wait_rows(worker.sink, len(events))
    finally:
        await worker.stop()
    reader = RollupReader(dsn)
    try:
        for name in RANGES:
            view = await reader.view("app", name, now)
            buckets, actions, pages, customers = expected(events, name, now)
            assert {
                b.t: {k: v for k, v in (("accepted", b.accepted), ("started", b.started),
                                        ("ended", b.ended)) if v}
                for b in view.buckets
            } == buckets  # fmt: skip
            assert view.totals.accepted == sum(b["accepted"] for b in buckets.values())
            assert view.totals.started == sum(b.get("started", 0) for b in buckets.values())
            assert view.step == RANGES[name].step
            assert tops_of(view, "actions") == actions
            assert tops_of(view, "pages") == pages
            assert tops_of(view, "customers") == customers
            assert view.top["customers"].total == sum(customers.values())
            assert view.newest == (now - 1_000) - (now - 1_000) % MINUTE
        day = await reader.view("app", "24h", now)
        hour = await reader.view("app", "1h", now)
        assert day.totals.accepted == len(events)  # all three hours
        assert day.totals.ended == 6
        assert 0 < hour.totals.accepted < len(events) / 2
        # One a minute, as the worker wrote them (59 when now is within a second of a
        # minute's start: the newest event then falls in the minute before).
        assert len(hour.buckets) == len(expected(events, "1h", now)[0]) in (59, 60)
        assert (await reader.view("web", "24h", now)).totals.accepted == 0
    finally:
        await reader.close()


async def test_redelivery_never_counts_twice(
    redis_proc: RedisProcess,
    redis: aioredis.Redis,
    sites_file: Path,
    dsn: str,  # noqa: F811
) -> None:
    """A batch written again after its commit (its ack lost), and the same events delivered
    once more as new entries, add nothing to the rollups."""
    now = now_ms()
    events = spread(now)[:60]
    raws = [record(seq, r, a, u, **p) for seq, (r, a, u, p) in enumerate(sorted(events), 1)]
    for raw in raws:
        await redis.xadd(EVENTS, {"event": raw})
    sink = CommitsThenFails(open_sink(dsn))
    worker = await start_worker(redis_proc, sites_file, dsn, sink=sink)
    try:
        await wait_rows(sink, len(events))
        deadline = time.monotonic() + 30 * UNIT
        while await pending(redis):
            assert time.monotonic() < deadline, "the batch was never acked"
            await asyncio.sleep(0.02)
        assert sink.failed  # the batch was committed, then written again row by row
        for raw in raws:  # every event delivered again, as entries of their own
            await redis.xadd(EVENTS, {"event": raw})
        await redis.xadd(EVENTS, {"event": record(999, now - 1_000, "cart.add", "cust-9")})
        await wait_rows(sink, len(events) + 1)
    finally:
        await worker.stop()
    view = await view_of(dsn, "24h", now)
    assert view.totals.accepted == len(events) + 1
    assert view.top["actions"].total == len(events) + 1
    assert tops_of(view, "actions")["cart.add"] == 1


async def view_of(store: str, name: str, now: int) -> RangeView:
    """Site app's view of one range in the store ``store`` names, read as the route reads it."""
    reader = RollupReader(store)
    try:
        return await reader.view("app", name, now)
    finally:
        await reader.close()


class CommitsThenFails(ForwardingSink):
    """A sink whose first batch commits, then fails as if the answer was lost."""

    def __init__(self, inner: Sink) -> None:
        super().__init__(inner)
        self.failed = False

    async def write(self, rows: Sequence[EventRow]) -> int:
        written = await self.inner.write(rows)
        if not self.failed and len(rows) > 1:
            self.failed = True
            raise ConnectionResetError("the commit's answer was lost")
        return written


def row(
    seq: int, received: int, action: str, uuid: str, params: str = "{}", bot: bool = False
) -> EventRow:
    """An events row of site ``app`` (``bot``: stored as a bot's, docs/protocol.md section 18)."""
    return EventRow(
        site="app", producer="p", seq=seq, uuid=uuid, session="s", action=action, label=action,
        time=received, received=received, params=msgspec.Raw(params.encode()), bot=bot,
    )  # fmt: skip


async def test_sink_counts_only_rows_it_inserted(dsn: str) -> None:  # noqa: F811
    """Rows twice, overlapping batches and a failed batch: the counts are those of the rows."""
    now = now_ms()
    sink = open_sink(dsn)
    await sink.open()
    try:
        first = [row(i, now - i * 1000, "page.visit", "u1", '{"url": "/a"}') for i in range(1, 6)]
        assert await sink.write(first) == 5
        assert await sink.write([*first[2:], row(6, now, "session.start", "u2")]) == 1
        assert await sink.write([row(7, now, "page.visit", "u2", '{"url": 7}', bot=True)]) == 1
        # A batch partly stored already (SQLite reads its new rows back): its new page counts.
        assert await sink.write([first[0], row(10, now, "page.visit", "u2", '{"url": "/b"}')]) == 1
        if dsn.startswith("postgresql"):  # a batch that rolls back takes its counts back
            with pytest.raises(Exception, match="json"):
                await sink.write([row(8, now, "a.b", "u3"), row(9, now, "a.b", "u3", "{bad")])
    finally:
        await sink.close()
    view = await view_of(dsn, "1h", now)
    assert (view.totals.accepted, view.totals.started, view.totals.bots) == (8, 1, 1)
    assert tops_of(view, "actions") == {"page.visit": 7, "session.start": 1}
    assert tops_of(view, "pages") == {"/a": 5, "/b": 1}  # a url not a string is no page
    assert tops_of(view, "customers") == {"u1": 5, "u2": 3}


async def test_top_tables_stay_bounded_and_sound_for_a_skewed_stream(tmp_path: Path) -> None:
    """100,000 events over 20,000 customers (skewed): each stored table holds at most twice
    its capacity, every shown count bounds the truth, the heaviest customers lead, the
    total is exact."""
    store = f"sqlite:///{tmp_path / 'events.db'}"
    rng = random.Random(19)
    now = now_ms()
    truth: Counter[str] = Counter()
    sink = open_sink(store)
    await sink.open()
    try:
        for b in range(50):
            rows = []
            for i in range(2000):
                uuid = f"c{int(20_000 * rng.random() ** 4)}"
                truth[uuid] += 1
                rows.append(row(b * 2000 + i, now - rng.randrange(20 * MINUTE), "x.y", uuid))
            assert await sink.write(rows) == 2000
    finally:
        await sink.close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "events.db")
    held = db.execute(
        "SELECT span, bucket, count(*) FROM rollups WHERE kind = 'customers' AND item <> '' "
        "GROUP BY span, bucket"
    ).fetchall()
    db.close()
    assert held
    assert all(n <= 2 * rollups.TOP_CAPACITY for _, _, n in held)
    view = await view_of(store, "1h", now)
    table = view.top["customers"]
    assert table.total == 100_000 == view.totals.accepted
    for r in table.rows:
        assert r.count - r.error <= truth[r.key] <= r.count, r
    heaviest = [k for k, _ in truth.most_common(5)]
    assert [r.key for r in table.rows[:5]] == heaviest


def test_merge_table_keeps_sound_bounds() -> None:
    """A batch with more keys than the capacity raises every key it leaves out by its largest
    left-out count (the table's lift, no rewrite); eviction keeps the largest and raises the
    floor."""
    key = ("s", 3600, 0, "pages")

    def merged(held: list[tuple[Any, ...]], counts: dict[str, int]) -> Any:
        writes, drops = merge_table(key, held, counts, capacity=2)
        rows = {r[0]: r for r in held}
        rows.update({w[4]: w[4:] for w in writes})
        for d in drops:
            del rows[d[4]]
        return list(rows.values()), {w[4] for w in writes}, {d[4] for d in drops}

    held, written, dropped = merged([], {"a": 5, "b": 3, "c": 1})
    assert true_bounds(held) == {"": (9, 1), "a": (5, 0), "b": (3, 0)}
    assert (written, dropped) == ({"", "a", "b"}, set())
    held, written, dropped = merged(held, {"c": 4, "d": 2, "e": 2})
    # The batch keeps c (4) and d (2) exactly; e's 2 may be any left-out key's: a and b
    # rise by 2 through the lift, without a write of their rows.
    assert true_bounds(held) == {"": (17, 3), "a": (7, 2), "b": (5, 2), "c": (5, 1), "d": (3, 1)}
    assert written == {"", "c", "d"}
    held, written, dropped = merged(held, {"f": 1, "a": 1})
    # Five keys held: past twice the capacity the two largest stay (a, then b before c on
    # a tie); the floor is the largest dropped (c's 5); f came and went unwritten.
    assert true_bounds(held) == {"": (19, 5), "a": (8, 2), "b": (5, 2)}
    assert (written, dropped) == ({"", "a"}, {"c", "d"})


async def test_reader_says_why_the_store_cannot_answer(tmp_path: Path) -> None:
    """No file yet, or a store without the table: RollupsUnavailable saying what to do."""
    reader = RollupReader(f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(RollupsUnavailable, match="persist worker creates it"):
        await reader.view("app", "24h", now_ms())
    assert not (tmp_path / "none.db").exists()  # never created by a reader
    import sqlite3

    sqlite3.connect(tmp_path / "old.db").execute("CREATE TABLE events (x)").connection.close()
    reader = RollupReader(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        with pytest.raises(RollupsUnavailable, match="no rollups table"):
            await reader.view("app", "24h", now_ms())
    finally:
        await reader.close()


async def test_forget_takes_a_customer_out_of_the_stored_top_tables(
    dsn: str,  # noqa: F811
) -> None:
    """A forget deletes the customer's keys in the rollups' customer tables; totals stay."""
    from eventwire.persist.privacy import forget_in_store

    now = now_ms()
    sink = open_sink(dsn)
    await sink.open()
    try:
        rows = [row(i, now - 1000, "a.b", "gone" if i % 2 else "stays") for i in range(1, 9)]
        assert await sink.write(rows) == 8
        done = await forget_in_store(sink, "app", ["gone"])
        assert done["rollups"] == 2  # its key in the 10-minute table and in the hour's
    finally:
        await sink.close()
    view = await view_of(dsn, "1h", now)
    assert [r.key for r in view.top["customers"].rows] == ["stays"]
    assert view.top["customers"].total == 8
