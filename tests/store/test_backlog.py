"""store.lua's backpressure: with a persist group, nothing unacknowledged is trimmed.

Calls ``publish`` with builder output in a real Redis, a persist group on
the stream made as the worker makes it, and acks as the worker sends them.
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from eventwire.core.config import Settings
from eventwire.core.rules import SiteConfig, SiteRules
from eventwire.store import (
    EVENT,
    FN_PUBLISH,
    LIBRARY,
    Keys,
    PublishArgs,
    PublishFrameKeys,
    PublishItem,
    PublishKeys,
    PublishReply,
    frame_args,
    parse_publish,
    session_end_record,
)

KEYS = Keys("ew")
TAG = "bp"
STREAM = KEYS.events(TAG)


async def publish(
    redis: aioredis.Redis, producer: str, seqs: range, maxlen: int, max_backlog: int
) -> PublishReply:
    """One server-made frame (no session check) of ``seqs`` into the test stream."""
    head = PublishKeys(STREAM, KEYS.rejected(TAG), KEYS.due(TAG))
    args = PublishArgs(
        maxlen, 1000, 60_000, 60_000, 3_600_000, "sei", session_end_record(TAG), max_backlog
    )
    keys: list[Any] = [*head, *PublishFrameKeys(KEYS.producer(TAG, producer), "unused")]
    pad = b"x" * 64
    items = [
        x for seq in seqs for x in PublishItem(seq, EVENT, b'{"seq":%d,"pad":"%s"}' % (seq, pad))
    ]
    argv: list[Any] = [*args, *frame_args("", items)]
    reply = await redis.fcall(FN_PUBLISH, len(keys), *keys, *argv)  # type: ignore[no-untyped-call]
    return parse_publish(reply, 1)


async def stored_seqs(redis: aioredis.Redis) -> list[int]:
    """The seqs in the stream, oldest first."""
    return [int(f[b"event"].split(b",")[0][7:]) for _, f in await redis.xrange(STREAM)]


async def read_and_ack(redis: aioredis.Redis, count: int) -> None:
    """What one worker batch does: read ``count`` new entries for the group, ack them."""
    reply = await redis.xreadgroup("persist", "w", {STREAM: ">"}, count=count)
    ids = [entry_id for _, entries in reply for entry_id, _ in entries]
    if ids:
        await redis.xack(STREAM, "persist", *ids)


async def test_full_backlog_refuses_frames_and_trims_only_acknowledged(
    redis: aioredis.Redis,
) -> None:
    """At max_backlog frames are refused whole; the cap trims only what the group acked."""
    await redis.function_load(LIBRARY, replace=True)
    await redis.xgroup_create(STREAM, "persist", id="0", mkstream=True)
    maxlen, cap = 200, 300
    seq = 1
    for _ in range(3):  # 3 x 100: the backlog reaches the cap, nothing read yet
        done = await publish(redis, "p", range(seq, seq + 100), maxlen, cap)
        assert (done.frames[0].added, done.frames[0].full) == (100, False)
        seq += 100
    assert done.backlog == 300
    refused = await publish(redis, "p", range(seq, seq + 100), maxlen, cap)
    assert refused.frames[0].full
    assert refused.frames[0].added == 0
    assert await redis.get(KEYS.producer(TAG, "p")) == b"300"  # the seq did not move
    # Past stream_maxlen, yet every unacknowledged entry is still there.
    assert await stored_seqs(redis) == list(range(1, 301))
    await read_and_ack(redis, 250)  # the worker catches up on part of it
    done = await publish(redis, "p", range(seq, seq + 100), maxlen, cap)
    assert (done.frames[0].added, done.backlog) == (100, 150)
    left = await stored_seqs(redis)
    # Trimmed (over maxlen) but never an entry the group has not acknowledged.
    assert left[-150:] == list(range(251, 401))
    assert len(left) < 400


async def test_pending_entries_are_not_trimmed(redis: aioredis.Redis) -> None:
    """Entries delivered but not acked (a worker mid-batch, or crashed) count and are kept."""
    await redis.function_load(LIBRARY, replace=True)
    await redis.xgroup_create(STREAM, "persist", id="0", mkstream=True)
    await publish(redis, "p", range(1, 201), 50, 1000)
    await redis.xreadgroup("persist", "w", {STREAM: ">"}, count=200)  # delivered, never acked
    done = await publish(redis, "p", range(201, 301), 50, 1000)
    assert done.backlog == 300
    assert await stored_seqs(redis) == list(range(1, 301))


async def test_trim_mode_and_live_only_streams_keep_maxlen(redis: aioredis.Redis) -> None:
    """on_backlog = "trim" (max_backlog 0) and a stream without a group: MAXLEN ~ trims."""
    await redis.function_load(LIBRARY, replace=True)
    for _ in range(2):
        seq = 1
        for _ in range(10):
            done = await publish(redis, "p", range(seq, seq + 100), 100, 0)
            assert not done.frames[0].full
            assert done.backlog is None
            seq += 100
        assert await redis.xlen(STREAM) < 400  # trimmed, persisted or not
        await redis.delete(STREAM, KEYS.producer(TAG, "p"))
        await redis.xgroup_create(STREAM, "persist", id="0", mkstream=True)
    # on_backlog = "reject" but no persist group (the stream, and its group, deleted):
    # a live-only stream, trimmed as before.
    await redis.delete(STREAM, KEYS.producer(TAG, "p"))
    seq = 1
    for _ in range(10):
        done = await publish(redis, "p", range(seq, seq + 100), 100, 50)
        assert not done.frames[0].full
        assert done.backlog is None
        seq += 100
    assert await redis.xlen(STREAM) < 400


def test_backlog_limit_per_site_and_defaults() -> None:
    """max_backlog: the site's, else the setting's, else stream_maxlen; trim mode is 0."""
    settings = msgspec.convert({"stream_maxlen": 5000}, Settings)
    site = SiteRules("s", SiteConfig())
    assert site.backlog_limit(settings) == 5000
    assert site.backlog_limit(msgspec.structs.replace(settings, max_backlog=700)) == 700
    own = SiteRules("s", SiteConfig(max_backlog=90))
    assert own.backlog_limit(msgspec.structs.replace(settings, max_backlog=700)) == 90
    trim = SiteRules("s", SiteConfig(on_backlog="trim", max_backlog=90))
    assert trim.backlog_limit(settings) == 0
    assert site.backlog_limit(msgspec.structs.replace(settings, on_backlog="trim")) == 0
    back = SiteRules("s", SiteConfig(on_backlog="reject"))
    assert back.backlog_limit(msgspec.structs.replace(settings, on_backlog="trim")) == 5000


async def test_a_wrong_lag_counter_does_not_refuse_frames(redis: aioredis.Redis) -> None:
    """Redis' lag counter can be wrong (seen after an AOF reload): the entries are counted."""
    await redis.function_load(LIBRARY, replace=True)
    await redis.xgroup_create(STREAM, "persist", id="0", mkstream=True)
    await publish(redis, "p", range(1, 301), 10_000, 100)  # one frame: over the cap by itself
    await read_and_ack(redis, 300)
    last = (await redis.xinfo_stream(STREAM))["last-generated-id"]
    # Everything delivered and acked, but the counter says 300 entries were never read.
    await redis.execute_command("XGROUP", "SETID", STREAM, "persist", last, "ENTRIESREAD", 0)
    assert (await redis.xinfo_groups(STREAM))[0]["lag"] == 300
    done = await publish(redis, "p", range(301, 351), 10_000, 100)
    assert not done.frames[0].full
    assert done.backlog == 50
    # Truly undelivered entries still fill it.
    done = await publish(redis, "p", range(351, 401), 10_000, 100)
    assert done.backlog == 100
    assert (await publish(redis, "p", range(401, 411), 10_000, 100)).frames[0].full


async def test_a_wrong_lag_counter_is_not_reported(redis: aioredis.Redis) -> None:
    """The lag that stats and the worker's gauge report is 0 when the group has delivered
    the newest entry, whatever Redis' counter says, and counted when it has not."""
    from eventwire.store import group_lag, parse_groups, parse_stream_info
    from eventwire.store.survey import group_state

    await redis.function_load(LIBRARY, replace=True)
    await redis.xgroup_create(STREAM, "persist", id="0", mkstream=True)
    await publish(redis, "p", range(1, 101), 10_000, 100)
    await read_and_ack(redis, 100)
    last = (await redis.xinfo_stream(STREAM))["last-generated-id"]
    await redis.execute_command("XGROUP", "SETID", STREAM, "persist", last, "ENTRIESREAD", 0)
    (group,) = parse_groups(await redis.xinfo_groups(STREAM))
    assert group.lag == 100  # Redis' counter: wrong
    info = parse_stream_info(await redis.xinfo_stream(STREAM))
    assert group_lag(group, info.last_generated_id) == 0
    assert (await group_state(redis, STREAM, "persist")).lag == 0
    await publish(redis, "p", range(101, 111), 10_000, 100)  # 10 truly unread
    (group,) = parse_groups(await redis.xinfo_groups(STREAM))
    info = parse_stream_info(await redis.xinfo_stream(STREAM))
    assert group_lag(group, info.last_generated_id) == group.lag == 110  # still wrong
    assert (await group_state(redis, STREAM, "persist")).lag == 10  # counted
