"""The sinks' batch write: idempotent, one transaction, usable again after a failed batch."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from eventwire.core.records import StoredEvent, record_encoder
from eventwire.persist.sinks import (
    EventRow,
    decode_event,
    decode_row,
    decode_rows,
    open_sink,
    to_row,
)
from tests.persist.test_worker import dsn  # noqa: F401 - the store fixture


def row(seq: int, params: bytes = b'{"sku": "S1"}') -> EventRow:
    """One event row of site ``s``, producer ``p``."""
    return EventRow(
        site="s", uuid="u", session="sess", producer="p", seq=seq, action="product.view",
        label="Viewed", time=1, received=2, params=msgspec.Raw(params),
    )  # fmt: skip


async def test_write_is_idempotent_and_survives_a_failed_batch(dsn: str) -> None:  # noqa: F811
    """Rows twice (and twice in one batch) are stored once; after a bad batch, writes go on."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        assert await sink.write([row(1), row(2), row(2)]) == 2
        assert await sink.write([row(1), row(2), row(3)]) == 1
        bad = [row(4), row(5, params=b"{not json")]
        if dsn.startswith("postgresql"):  # SQLite keeps TEXT as it comes
            with pytest.raises(Exception, match="json"):  # asyncpg's own error type
                await sink.write(bad)
            assert await sink.count() == 3  # the whole batch rolled back
            with pytest.raises(Exception, match="UTF8"):  # params that are not UTF-8
                await sink.write([row(4), row(5, params=b'{"a": "\xff"}')])
            assert await sink.count() == 3
        assert await sink.write([row(6)]) == 1
        assert [a.action for a in await sink.activity("s", "u", 10)] == ["product.view"] * (
            await sink.count()
        )
    finally:
        await sink.close()


def test_decode_row_is_to_row_of_decode_event() -> None:
    """The worker's one-pass decoding makes the row the two-step one makes, and refuses alike."""
    events = [
        StoredEvent(
            site="s", uuid="u é", session="x", producer="p", seq=2**62, action="a.b", label="L",
            time=1, received=2, params={"n": [1, {"k": None}], "s": "é\u2028"},
            original_time=-5, authenticated=True,
        ),
        StoredEvent(
            site="s", uuid="u", session="x", producer="p", seq=1, action="a", label="a",
            time=1, received=2, params={},
        ),
    ]  # fmt: skip
    raws = [record_encoder.encode(event) for event in events]
    for raw in raws:
        assert decode_row("s", raw) == to_row("s", decode_event(raw))
    # A batch in one call makes the same rows, the stream's site included.
    assert decode_rows("s", raws) == [decode_row("s", raw) for raw in raws]
    assert decode_rows("t", raws) == [decode_row("t", raw) for raw in raws]
    assert {r.site for r in decode_rows("t", raws) or []} == {"t"}
    bad = [
        b"not json",
        b'{"site":"s"}',
        record_encoder.encode(events[1]).replace(b'"params":{}', b'"params":[1]'),
        record_encoder.encode(events[1]).replace(b'"params":{}', b'"params":"{}"'),
        record_encoder.encode(events[1]).replace(b'"seq":1', b'"seq":9223372036854775808'),
        record_encoder.encode(events[1]).replace(b'"params":{}', b'"params":{"a":}'),
    ]
    for raw in bad:
        with pytest.raises(ValueError, match="undecodable event"):
            decode_event(raw)
        with pytest.raises(ValueError, match="undecodable event"):
            decode_row("s", raw)
        assert decode_rows("s", [*raws, raw]) is None  # then decoded one by one


async def test_bot_column(dsn: str) -> None:  # noqa: F811
    """An event stored with "bot": true has bot true in its row; others false."""
    flagged = StoredEvent(
        site="s", uuid="u", session="x", producer="b", seq=1, action="page.visit",
        label="L", time=1, received=2, params={"url": "/"}, bot=True,
    )  # fmt: skip
    raw = record_encoder.encode(flagged)
    assert raw.endswith(b',"bot":true}')  # stats counts bots by this tail
    bot_row = decode_row("s", raw)
    assert bot_row.bot is True
    assert to_row("s", decode_event(raw)) == bot_row
    assert row(1).bot is False
    sink = open_sink(dsn)
    await sink.open()
    try:
        assert await sink.write([bot_row, row(1)]) == 2
        if dsn.startswith("sqlite"):
            import sqlite3

            path = dsn.removeprefix("sqlite:///")
            found = sqlite3.connect(path).execute("SELECT producer, bot FROM events").fetchall()
            assert sorted(found) == [("b", 1), ("p", 0)]
        else:
            import asyncpg  # type: ignore[import-untyped]

            conn = await asyncpg.connect(dsn)
            try:
                found = await conn.fetch("SELECT producer, bot FROM events")
            finally:
                await conn.close()
            assert sorted((r["producer"], r["bot"]) for r in found) == [("b", True), ("p", False)]
    finally:
        await sink.close()


async def test_two_writes_at_once_store_each_row_once(dsn: str) -> None:  # noqa: F811
    """Two overlapping batches written at the same time (PostgreSQL: on two connections,
    one of them waiting for the other's commit) store and report every row once."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        assert await sink.write([row(1)]) == 1
        first = [row(seq) for seq in range(1, 3001)]
        second = [row(seq) for seq in range(2001, 5001)]
        written = await asyncio.gather(sink.write(first), sink.write(second))
        assert sum(written) == 4999
        assert await sink.count() == 5000
    finally:
        await sink.close()
