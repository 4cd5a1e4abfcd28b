"""The SQLite sink's packed rows: bind values, and rollup deltas equal to counting row by row."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventwire.persist import rollups
from eventwire.persist.sinks import (
    EventRow,
    SqliteSink,
    pack_rows,
    rollup_delta,
    sqlite_binds,
    sqlite_values,
)


def reference(rows: list[rollups.NewRow]) -> rollups.Delta:
    """The rollups' counts row by row (the definition :func:`rollups.aggregate` must meet)."""
    counts: Counter[tuple[str, int, str]] = Counter()
    tops: dict[tuple[str, int, int, str], Counter[str]] = {}
    items = {"session.start": "started", "session.end": "ended"}
    for site, received, action, uuid, page, bot in rows:
        minute = received - received % 60_000
        counts[(site, minute, "accepted")] += 1
        if action in items:
            counts[(site, minute, items[action])] += 1
        if bot:
            counts[(site, minute, "bots")] += 1
        ten = received - received % 600_000
        for span, bucket in ((600, ten), (3600, ten - ten % 3_600_000)):
            for table, key in (("actions", action), ("customers", uuid), ("pages", page)):
                if key is not None:
                    tops.setdefault((site, span, bucket, table), Counter())[key] += 1
    return rollups.Delta(dict(counts), {k: dict(v) for k, v in tops.items()})


@pytest.mark.parametrize("spread", [0, 1_000, 60_000, 4_000_000, 10**9])
def test_aggregate_equals_row_by_row(spread: int) -> None:
    rng = random.Random(spread)
    for _ in range(200):
        base = rng.choice([0, 1_796_308_445_391, -123_456])
        rows: list[rollups.NewRow] = [
            (
                rng.choice("abc"[: rng.randint(1, 3)]),
                base + rng.randint(-spread, spread),
                rng.choice(["session.start", "session.end", "page.visit", "x.y"]),
                rng.choice(["u1", "u2", "u3"]),
                rng.choice([None, "/p", "/q"]),
                rng.choice([True, False]),
            )
            for _ in range(rng.randint(0, 60))
        ]
        assert rollups.aggregate(rows) == reference(rows)


def row(seq: int, **fields: Any) -> EventRow:
    base: dict[str, Any] = {
        "site": "s", "uuid": "u", "session": "x", "producer": "p", "seq": seq,
        "action": "page.visit", "label": "", "time": 5, "received": 1_796_308_445_391,
        "params": msgspec.Raw(b'{"url":"/a\\u00e9","n":1}'),
    }  # fmt: skip
    base.update(fields)
    return EventRow(**base)


def test_packed_rows_store_what_plain_rows_store(tmp_path: Path) -> None:
    rows = [
        row(1),
        row(2, original_time=-7, authenticated=True, bot=True),
        row(3, params=msgspec.Raw(b'{"bad":"\xff"}'), action="a.b"),
    ]
    values = sqlite_values(rows)
    assert [type(v[9]) for v in values] == [str, str, bytes]
    assert values[1] == (
        "s", "u", "x", "p", 2, "page.visit", "", 5, 1_796_308_445_391,
        '{"url":"/a\\u00e9","n":1}', -7, 1, 1,
    )  # fmt: skip
    assert values[2][9] == b'{"bad":"\xff"}'
    assert sqlite_values(rows[:2]) == values[:2]  # the batch without a bad row: the same values
    assert {type(v[11]) for v in values} == {int}
    assert pack_rows(rows).delta == rollup_delta(rows)
    assert rollup_delta(rows) == reference(
        [(r.site, r.received, r.action, r.uuid, rollups.page_of(r.action, r.params), r.bot)
         for r in rows]
    )  # fmt: skip

    async def stored(path: Path, batch: list[EventRow]) -> list[Any]:
        sink = SqliteSink(path)
        await sink.open()
        assert await sink.write(batch) == 3
        assert await sink.write(batch) == 0
        out = sink.db.execute(
            "SELECT original_time, authenticated, bot, hex(params), typeof(params) FROM events "
            "ORDER BY seq"
        ).fetchall()
        out += sink.db.execute("SELECT * FROM rollups ORDER BY 1, 2, 3, 4, 5").fetchall()
        await sink.close()
        return out

    plain = asyncio.run(stored(tmp_path / "a.db", rows))
    packed = asyncio.run(stored(tmp_path / "b.db", pack_rows(rows)))
    assert plain == packed
    assert plain[0][:3] == (None, 0, 0)
    assert plain[1][:3] == (-7, 1, 1)
    assert plain[0][3:] == (b'{"url":"/a\\u00e9","n":1}'.hex().upper(), "text")
    assert plain[2][4] == "text"


def test_binds_cut_a_batch_into_statements_in_order(tmp_path: Path) -> None:
    """A batch's rows go in by statements of 256, 16 and 1 rows, in the batch's order;
    a row twice in the batch, or stored already, is one row."""
    values = [(i,) for i in range(300)]
    binds = sqlite_binds(values)
    assert [(size, len(statements)) for size, statements in binds] == [(256, 1), (16, 2), (1, 12)]
    assert [v for _, statements in binds for flat in statements for v in flat] == list(range(300))
    assert sqlite_binds([]) == []
    assert sqlite_binds(values[:3]) == [(1, [(0,), (1,), (2,)])]

    async def stored(batches: list[list[EventRow]]) -> tuple[list[int], list[Any]]:
        sink = SqliteSink(tmp_path / "c.db")
        await sink.open()
        written = [await sink.write(pack_rows(batch)) for batch in batches]
        out = sink.db.execute("SELECT seq FROM events ORDER BY rowid").fetchall()
        await sink.close()
        return written, [seq for (seq,) in out]

    rows = [row(seq) for seq in range(1, 301)]
    again = [row(seq) for seq in (5, 301, 301, 302)]
    written, seqs = asyncio.run(stored([rows, rows[:20], again]))
    assert written == [300, 0, 2]
    assert seqs == [*range(1, 303)]
