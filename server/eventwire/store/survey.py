"""What operators read of Redis: the sites it holds, and each stream set's numbers.

This module owns the read side of ``eventwire tail`` and ``eventwire stats``,
and of any reader that must find sites the local sites file does not name:

- which sites Redis holds, with their partitions (:func:`find_sites` for all
  of them, :func:`find_site` for one): a site is there when it has an events
  or a rejected stream (docs/protocol.md section 7);
- one stream set's numbers (:func:`partition_numbers`): stream lengths, the
  rate over the last minute, open sessions (the ``due`` set), and a consumer
  group's lag, pending count and oldest pending entry;
- following streams (:func:`read_streams`): ``$`` made each stream's end,
  then one read of all of them;
- Redis' clock (:func:`clock_ms`), the clock stream ids come from.

It only reads. Every public function raises
:class:`~eventwire.core.errors.StoreUnavailable` when Redis cannot be
reached, so its callers need not know redis-py's exceptions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar

from eventwire.core.errors import StoreUnavailable
from eventwire.core.rules import MAX_PARTITIONS, SITE_ID_RE
from eventwire.store import (
    LAG_COUNTED,
    OUTAGE,
    Keys,
    RedisClient,
    ResponseError,
    StreamsReader,
    counted_lag,
    parse_groups,
    parse_pending_summary,
    redis_time_ms,
    reply_text,
    stream_end,
    stream_id,
)

#: Keys each SCAN call walks (a hint): about a millisecond of one node's time
#: per call, so a node of a million keys costs a thousand round trips.
SCAN_COUNT: Final = 1000
#: The window of :func:`stream_rate` (ms).
RATE_WINDOW_MS: Final = 60_000
#: Entries fetched per XREVRANGE while counting a window, and the most counted:
#: past that, the rate is measured over the newest RATE_MAX_COUNTED entries only.
RATE_CHUNK: Final = 500
RATE_MAX_COUNTED: Final = 5000

#: The streams that make a site (docs/protocol.md section 7); its dead-letter stream
#: only follows them.
_SITE_STREAMS: Final = ("events", "rejected")
_GLOB_SPECIAL: Final = re.compile(r"([*?\[\]\\])")

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _outage_is_unavailable(
    read: Callable[_P, Awaitable[_T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """``read``, raising StoreUnavailable (with redis-py's message) where Redis is unreachable."""

    @functools.wraps(read)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await read(*args, **kwargs)
        except OUTAGE as exc:
            raise StoreUnavailable(str(exc)) from exc

    return guarded


# -- sites found in Redis ---------------------------------------------------------------


def site_stream(prefix: str, key: str) -> tuple[str, int | None] | None:
    """The site and partition of a site's events or rejected stream key, or None.

    ``{prefix}:{site}:events`` gives ``(site, None)`` and
    ``{prefix}:{site:p}:events`` gives ``(site, p)`` (``rejected`` alike).
    Any other key, or one whose site or partition eventwire could not have
    written (see :data:`~eventwire.core.rules.SITE_ID_RE`,
    :data:`~eventwire.core.rules.MAX_PARTITIONS`), gives None.
    """
    head = f"{prefix}:{{"
    if not key.startswith(head):
        return None
    tag, closed, name = key[len(head) :].partition("}:")
    if not closed or name not in _SITE_STREAMS:
        return None
    site, split, part = tag.partition(":")
    if SITE_ID_RE.fullmatch(site) is None:
        return None
    if not split:
        return site, None
    if not (part.isascii() and part.isdigit()) or str(int(part)) != part:
        return None
    partition = int(part)
    return (site, partition) if partition < MAX_PARTITIONS else None


def partitions_found(partitions: Iterable[int | None]) -> int:
    """A site's ``partitions`` as its stream keys tell them (None: an unpartitioned stream).

    The rule: with no partition stream, 1; otherwise the highest partition
    found plus one, and at least 2 (a site of one partition has no
    partition streams). That is the number of partition streams found when
    every partition has one; a partition gets its streams with its first
    event or rejection, so one below the highest may have none yet and still
    counts (every stream found is then read). A partition above the highest
    found that has no stream yet cannot be seen: where that matters, the sites
    file names the site's partitions. A site that has both shapes (its
    partitions changed between restarts) is taken as partitioned.
    """
    numbers = [p for p in partitions if p is not None]
    return max(max(numbers) + 1, 2) if numbers else 1


def _glob_literal(text: str) -> str:
    """``text`` as a SCAN MATCH pattern that matches only itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


@_outage_is_unavailable
async def find_sites(client: RedisClient, keys: Keys) -> dict[str, int]:
    """Every site that has a stream in Redis, with its partitions, sorted by site.

    One ``SCAN MATCH {prefix}:{*}:* TYPE stream`` walk of the keyspace
    (:data:`SCAN_COUNT` keys a call); on a cluster redis-py's ``scan_iter``
    walks every primary, each with its own cursor, to its end. Partitions
    follow :func:`partitions_found`. A key SCAN returns twice (the keyspace
    grew during the walk) counts once.

    Args:
        client: one Redis or a cluster.
        keys: the key names (their prefix is searched).

    Returns:
        site -> partitions.
    """
    match = f"{_glob_literal(keys.prefix)}:{{*}}:*"
    found: dict[str, set[int | None]] = {}
    async for raw in client.scan_iter(match=match, count=SCAN_COUNT, _type="stream"):
        stream = site_stream(keys.prefix, reply_text(raw))
        if stream is not None:
            found.setdefault(stream[0], set()).add(stream[1])
    return {site: partitions_found(found[site]) for site in sorted(found)}


@_outage_is_unavailable
async def find_site(client: RedisClient, keys: Keys, site: str) -> int | None:
    """One site's partitions as Redis holds them (None: it has no stream there).

    The same answer as :func:`find_sites` gives for the site, at the cost of
    one ``TYPE`` per possible stream (events and rejected of the site's own
    tag and of up to :data:`~eventwire.core.rules.MAX_PARTITIONS`
    partitions: 514) in one pipeline, whatever the size of the keyspace:
    cheap enough for each request of a reader that meets a site its sites
    file does not name.
    """
    if SITE_ID_RE.fullmatch(site) is None:
        return None
    tags = [site, *Keys.tags(site, MAX_PARTITIONS)]
    async with client.pipeline(transaction=False) as pipe:
        for tag in tags:
            pipe.type(keys.events(tag))
            pipe.type(keys.rejected(tag))
        types = [reply_text(t) for t in await pipe.execute()]
    # Replies come two per tag; tags[0] is the site's own, tags[p + 1] partition p's.
    held = [
        None if n == 0 else n - 1
        for n in range(len(tags))
        if "stream" in (types[2 * n], types[2 * n + 1])
    ]
    return partitions_found(held) if held else None


# -- one stream set's numbers -----------------------------------------------------------


class GroupState(NamedTuple):
    """A consumer group on one stream, as :func:`group_state` found it."""

    #: The stream exists.
    exists: bool
    #: The stream has the group.
    grouped: bool
    #: Entries the group has not read yet (None: no group, or Redis cannot tell).
    lag: int | None
    #: Entries delivered and not acknowledged.
    pending: int
    #: The millisecond part of the oldest pending entry's id (None: nothing pending).
    oldest_pending_ms: int | None
    #: Entries the group has acknowledged since it was made (entries read less
    #: pending; None: Redis cannot tell): two looks give the persist rate.
    acked: int | None = None


class PartitionNumbers(NamedTuple):
    """One stream set's raw numbers (one partition, or a whole site of one partition)."""

    length: int
    rejected_length: int
    events_per_s: float
    rejected_per_s: float
    open_sessions: int
    group: GroupState
    #: Of ``events_per_s``: entries stored with ``"bot": true``.
    bots_per_s: float = 0.0


#: How an entry stored with ``"bot": true`` ends: ``bot`` is the last field
#: :class:`~eventwire.core.records.StoredEvent` writes, and only when true.
BOT_TAIL: Final = b',"bot":true}'


@_outage_is_unavailable
async def group_state(client: RedisClient, key: str, group: str) -> GroupState:
    """A consumer group's progress on one stream (``XINFO GROUPS``, then ``XPENDING``)."""
    try:
        groups = await client.xinfo_groups(key)
    except ResponseError:  # no such stream
        return GroupState(False, False, None, 0, None)
    entry = next((g for g in parse_groups(groups) if g.name == group), None)
    if entry is None:
        return GroupState(True, False, None, 0, None)
    pending = entry.pending
    lag = entry.lag
    if lag:  # Redis' counter can be wrong: count what follows the last delivered entry
        after = await client.xrange(key, f"({entry.last_delivered_id}", "+", count=LAG_COUNTED + 1)
        lag = counted_lag(entry, len(after or ()))
    oldest: int | None = None
    if pending:
        smallest = parse_pending_summary(await client.xpending(key, group)).min_id
        if smallest is not None:
            oldest = stream_id(smallest)[0]
    acked = None if entry.entries_read is None else entry.entries_read - pending
    return GroupState(True, True, lag, pending, oldest, acked)


@_outage_is_unavailable
async def stream_rate(client: RedisClient, key: str, now_ms: int) -> float:
    """Entries per second added to ``key`` over the :data:`RATE_WINDOW_MS` before ``now_ms``."""
    return (await stream_rates(client, key, now_ms))[0]


@_outage_is_unavailable
async def stream_rates(client: RedisClient, key: str, now_ms: int) -> tuple[float, float]:
    """Entries per second added to ``key`` over the :data:`RATE_WINDOW_MS` before ``now_ms``,
    and of those the bots' (entries that end with :data:`BOT_TAIL`).

    Counts newest first in chunks of :data:`RATE_CHUNK`; beyond
    :data:`RATE_MAX_COUNTED` entries the rate is that many over the time they
    span, so a busy stream costs a bounded read.
    """
    low = f"{now_ms - RATE_WINDOW_MS}-0"
    high = "+"
    counted = bots = 0
    oldest = now_ms
    while counted < RATE_MAX_COUNTED:
        chunk = await client.xrevrange(key, high, low, count=RATE_CHUNK)
        if not chunk:
            break
        counted += len(chunk)
        for _id, fields in chunk:
            event = fields.get(b"event") if isinstance(fields, dict) else None
            if isinstance(event, bytes) and event.endswith(BOT_TAIL):
                bots += 1
        oldest = stream_id(chunk[-1][0])[0]
        if len(chunk) < RATE_CHUNK:
            break
        high = f"({reply_text(chunk[-1][0])}"
    span = RATE_WINDOW_MS / 1000
    if counted >= RATE_MAX_COUNTED:
        span = max((now_ms - oldest) / 1000, 0.001)
    return counted / span, bots / span


@_outage_is_unavailable
async def partition_numbers(
    client: RedisClient, keys: Keys, tag: str, now_ms: int, group: str
) -> PartitionNumbers:
    """The numbers of one tag's streams and ``due`` set (see :meth:`Keys.tag`).

    Args:
        client: one Redis or a cluster.
        keys: the key names.
        tag: a site, or one partition of it.
        now_ms: Redis' clock (see :func:`clock_ms`), the end of the rates' window.
        group: the consumer group whose progress on the events stream is read.
    """
    events, rejected = keys.events(tag), keys.rejected(tag)
    events_per_s, bots_per_s = await stream_rates(client, events, now_ms)
    return PartitionNumbers(
        length=int(await client.xlen(events)),
        rejected_length=int(await client.xlen(rejected)),
        events_per_s=events_per_s,
        bots_per_s=bots_per_s,
        rejected_per_s=await stream_rate(client, rejected, now_ms),
        open_sessions=int(await client.zcard(keys.due(tag))),
        group=await group_state(client, events, group),
    )


@_outage_is_unavailable
async def dropped_bots(client: RedisClient, keys: Keys, site: str, partitions: int) -> int:
    """Bot events the site dropped (``bots = "drop"``), as the servers counted them."""
    value = await client.get(keys.bots_dropped(Keys.tags(site, partitions)[0]))
    return int(value or 0)


@_outage_is_unavailable
async def clock_ms(client: RedisClient) -> int:
    """Redis' clock in milliseconds (``TIME``): the clock stream ids come from."""
    return await redis_time_ms(client)


# -- following streams ------------------------------------------------------------------


@_outage_is_unavailable
async def read_streams(
    reader: StreamsReader, positions: dict[str, str]
) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """One read of every stream after its position, waiting as the reader does.

    A ``$`` position is first replaced, in ``positions``, by the id of the
    last entry its stream ever had (``0-0`` for a stream not there yet), so no
    entry slips between two reads: ``$`` would mean the end at each read.

    Args:
        reader: the reader (its client, count and block time).
        positions: stream key -> the id after which to read; ``$`` entries are resolved.

    Returns:
        The entries by key, as :meth:`StreamsReader.read` gives them.
    """
    for key, position in positions.items():
        if position == "$":
            positions[key] = await stream_end(reader.client, key)
    return await reader.read(positions)
