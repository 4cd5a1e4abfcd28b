"""The sinks' batch write: idempotent, one transaction, usable again after a failed batch."""

from __future__ import annotations

import msgspec
import pytest

from eventwire.persist.sinks import EventRow, open_sink
from tests.persist.test_worker import dsn  # noqa: F401 - the store fixture


def row(seq: int, params: str = '{"sku": "S1"}') -> EventRow:
    """One event row of site ``s``, producer ``p``."""
    return EventRow("s", "p", seq, "u", "sess", "product.view", "Viewed", 1, 2, None, params, False)


async def test_write_is_idempotent_and_survives_a_failed_batch(dsn: str) -> None:  # noqa: F811
    """Rows twice (and twice in one batch) are stored once; after a bad batch, writes go on."""
    sink = open_sink(dsn)
    await sink.open()
    try:
        assert await sink.write([row(1), row(2), row(2)]) == 2
        assert await sink.write([row(1), row(2), row(3)]) == 1
        bad = [row(4), msgspec.structs.replace(row(5), params="{not json")]
        if dsn.startswith("postgresql"):  # SQLite keeps TEXT as it comes
            with pytest.raises(Exception, match="json"):  # asyncpg's own error type
                await sink.write(bad)
            assert await sink.count() == 3  # the whole batch rolled back
        assert await sink.write([row(6)]) == 1
        assert [a.action for a in await sink.activity("s", "u", 10)] == ["product.view"] * (
            await sink.count()
        )
    finally:
        await sink.close()
