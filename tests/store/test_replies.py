"""eventwire/store/replies.py: every reply shape it parses, from a real Redis, RESP2 and RESP3."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from eventwire.core.errors import StoreUnavailable
from eventwire.store import OUTAGE
from eventwire.store.replies import (
    GroupInfo,
    busy_group,
    missing_group,
    no_such_key,
    parse_autoclaim,
    parse_consumers,
    parse_groups,
    parse_pending_range,
    parse_pending_summary,
    parse_stream_info,
    raw_xread_entries,
    stream_entries,
    stream_id,
    time_ms,
    xread_entries,
)
from tests.procs import RedisProcess


@pytest.fixture(params=[2, 3])
async def client(
    redis_proc: RedisProcess, request: pytest.FixtureRequest
) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis speaking RESP2 or RESP3, on an empty database."""
    conn = aioredis.Redis.from_url(redis_proc.url, protocol=request.param)
    await conn.flushall()
    yield conn
    await conn.aclose()


async def test_raw_xreadgroup_reply(client: aioredis.Redis) -> None:
    """XREADGROUP as Redis sent it: ids kept as bytes, the event field found first or
    later, an entry without one None; read as a sequence, StreamEntry values."""
    first = await client.xadd("s", {"event": b"a"})
    second = await client.xadd("s", {"other": b"b"})
    third = await client.xadd("s", {"other": b"c", "event": b"d"})
    await client.xgroup_create("s", "g", id="0")
    await client.xgroup_create("t", "g", id="0", mkstream=True)
    client.set_response_callback("XREADGROUP", lambda reply, **_: reply)  # as ConsumerGroup
    reply = await client.execute_command(
        "XREADGROUP", "GROUP", "g", "c1", "COUNT", 10, "STREAMS", "s", "t", ">", ">"
    )  # fmt: skip
    got = raw_xread_entries(reply)
    assert [key for key, _ in got] == ["s"]  # an empty stream is left out of the reply
    ((_, entries),) = got
    assert entries.ids == [first, second, third]
    assert entries.events == [b"a", None, b"d"]
    texts = [first.decode(), second.decode(), third.decode()]
    assert list(entries) == [(texts[0], b"a"), (texts[1], None), (texts[2], b"d")]
    assert len(entries) == 3
    assert entries[-1] == (texts[2], b"d")
    assert entries[1:] == [(texts[1], None), (texts[2], b"d")]
    assert raw_xread_entries(None) == []


async def test_stream_and_group_replies(client: aioredis.Redis) -> None:
    """XINFO, XREADGROUP, XPENDING and XAUTOCLAIM parse the same in both protocols."""
    first = (await client.xadd("s", {"event": b"a"})).decode()
    second = (await client.xadd("s", {"other": b"b"})).decode()
    await client.xgroup_create("s", "g", id="0")
    (group,) = parse_groups(await client.xinfo_groups("s"))
    assert group == GroupInfo("g", pending=0, last_delivered_id="0-0", entries_read=None, lag=2)
    assert parse_pending_summary(await client.xpending("s", "g")) == (0, None)

    ((key, raw),) = xread_entries(await client.xreadgroup("g", "c1", {"s": ">"}, count=10))
    assert key == "s"
    assert stream_entries(raw) == [(first, b"a"), (second, None)]
    summary = parse_pending_summary(await client.xpending("s", "g"))
    assert (summary.pending, summary.min_id) == (2, first)
    times = await client.xpending_range("s", "g", min="-", max="+", count=10)
    assert parse_pending_range(times) == {first: 1, second: 1}
    assert [
        (c.name, c.pending) for c in parse_consumers(await client.xinfo_consumers("s", "g"))
    ] == [("c1", 2)]
    (group,) = parse_groups(await client.xinfo_groups("s"))
    assert (group.pending, group.last_delivered_id, group.entries_read, group.lag) == (
        2,
        second,
        2,
        0,
    )

    await client.xdel("s", first)
    claimed = parse_autoclaim(await client.xautoclaim("s", "g", "c2", 0, start_id="0-0"))
    assert claimed.cursor == "0-0"
    assert claimed.entries == [(second, None)]
    assert claimed.deleted == 1

    info = parse_stream_info(await client.xinfo_stream("s"))
    assert (info.length, info.entries_added, info.first_id) == (1, 2, second)
    assert (info.last_generated_id, info.max_deleted_id) == (second, first)
    assert stream_id(first) < stream_id(second)


async def test_time_and_error_answers(client: aioredis.Redis) -> None:
    """TIME is milliseconds; the error answers that mean something are recognised."""
    now = time_ms(await client.time())
    assert now > 1_600_000_000_000
    with pytest.raises(ResponseError) as missing:
        await client.xinfo_stream("nothing")
    assert no_such_key(missing.value)
    await client.xgroup_create("s", "g", id="0", mkstream=True)
    with pytest.raises(ResponseError) as busy:
        await client.xgroup_create("s", "g", id="0")
    assert busy_group(busy.value)
    with pytest.raises(ResponseError) as gone:
        await client.xreadgroup("nogroup", "c", {"s": ">"})
    assert missing_group(gone.value)
    assert not isinstance(missing.value, OUTAGE)  # an error answer is not an outage
    assert isinstance(StoreUnavailable("x"), OUTAGE)
