"""Consumer groups for the persist worker: every Redis call it makes.

:class:`ConsumerGroup` is one consumer of one group (``persist``) on many
streams: create the groups (``XGROUP CREATE MKSTREAM``), read new entries
(``XREADGROUP``, on a cluster stream by stream on each stream's node),
acknowledge (``XACK``), move an entry to its dead stream and acknowledge it
at once (``MULTI``), take over idle entries (``XAUTOCLAIM``), count
deliveries (``XPENDING``), describe a stream and its group (``XINFO``), trim
(``XTRIM MINID``) and leave (``XGROUP DELCONSUMER``). What is safe to trim,
what goes to the dead stream and when to retry stay the worker's decisions
(:mod:`eventwire.persist`).

Every failure of Redis, an outage or an error answer, comes out of these
methods as :class:`~eventwire.core.errors.StoreUnavailable` (with Redis'
own message), so the worker tells Redis' failures from its SQL store's by
type alone; :class:`GroupMissing` when the stream or group is gone (NOGROUP).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, NamedTuple

from redis.asyncio.cluster import RedisCluster

from eventwire.core.errors import StoreUnavailable
from eventwire.store.client import (
    OUTAGE,
    RedisClient,
    RedisError,
    ResponseError,
    exchange,
    redis_client,
)
from eventwire.store.cluster import CLUSTER_READS, on_key_node
from eventwire.store.keys import Keys
from eventwire.store.replies import (
    Claimed,
    ConsumerInfo,
    GroupInfo,
    StreamEntry,
    StreamInfo,
    busy_group,
    missing_group,
    parse_autoclaim,
    parse_consumers,
    parse_groups,
    parse_pending_range,
    parse_pending_summary,
    parse_stream_info,
    raw_xread_entries,
    reply_text,
    stream_entries,
    time_ms,
    xread_entries,
)
from eventwire.store.resp import pack_args, pack_bulks

#: New entries by stream key, as one read gives them (:class:`ReadEntries` from one
#: Redis, :class:`StreamEntry` lists from a cluster's nodes).
Delivered = list[tuple[str, Sequence[StreamEntry]]]

#: Seconds a connection may take to connect, and a reply may take beyond a read's block.
_SOCKET_SLACK: Final = 10.0


class GroupMissing(StoreUnavailable):
    """A stream or its consumer group was deleted (NOGROUP): the groups must be made again."""


def _failed(exc: BaseException) -> StoreUnavailable:
    """A Redis failure as the worker sees it, with Redis' own message."""
    if isinstance(exc, StoreUnavailable):
        return exc
    message = str(exc) or "timeout"
    return GroupMissing(message) if missing_group(exc) else StoreUnavailable(message)


@contextlib.contextmanager
def _redis_failures() -> Iterator[None]:
    try:
        yield
    except (*OUTAGE, RedisError) as exc:
        raise _failed(exc) from exc


class StreamProgress(NamedTuple):
    """A stream and the consumer group on it, read together."""

    stream: StreamInfo
    #: None: the stream has no such group.
    group: GroupInfo | None


class ConsumerGroup:
    """One consumer of a consumer group on many streams, with its own Redis client.

    Args:
        url: the ``redis_url``.
        consumer: this consumer's name, unique to the worker.
        block_ms: the longest one read waits for new entries; the client's
            socket waits that and :data:`_SOCKET_SLACK` more.
        group: the group's name.
    """

    def __init__(
        self, url: str, consumer: str, block_ms: int, group: str = Keys.PERSIST_GROUP
    ) -> None:
        self.consumer = consumer
        self.group = group
        self.block_ms = block_ms
        self.client: RedisClient = redis_client(
            url,
            socket_timeout=block_ms / 1000 + _SOCKET_SLACK,
            socket_connect_timeout=_SOCKET_SLACK,
        )
        if not isinstance(self.client, RedisCluster):
            # XREADGROUP's reply as Redis sent it (raw_xread_entries): redis-py's
            # parsing made a dict per entry, a tenth of the worker's time.
            self.client.set_response_callback("XREADGROUP", _as_sent)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Close the client."""
        await self.client.aclose()

    async def time_ms(self) -> int:
        """Redis' clock in milliseconds (stream ids come from it)."""
        with _redis_failures():
            return time_ms(await self.client.time())

    async def create(self, keys: Sequence[str]) -> None:
        """Make the group on each stream (and the stream), reading from its start; kept if there."""
        for key in keys:
            with _redis_failures():
                try:
                    await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
                except RedisError as exc:
                    if not busy_group(exc):
                        raise

    async def read_new(
        self, keys: Sequence[str], count: int, block: bool = True
    ) -> tuple[Delivered, BaseException | None]:
        """XREADGROUP of entries never delivered to the group, waiting up to ``block_ms``.

        ``block=False``: answer at once, with what there is (the worker reads
        so while it writes the batch before).

        A cluster cannot read keys of several slots in one call: each stream
        is read on its own node (see :meth:`_read_cluster`).

        Returns:
            The entries by stream key, and the first read's failure (None if
            every read answered): entries that did come must be processed
            before the failure is raised. A Redis failure is a
            :class:`StoreUnavailable` (:class:`GroupMissing` for NOGROUP).
        """
        client = self.client
        if not isinstance(client, RedisCluster):
            streams: dict[Any, Any] = dict.fromkeys(keys, ">")
            try:
                wait = ("BLOCK", self.block_ms) if block else ()
                reply = await client.execute_command(  # type: ignore[no-untyped-call]
                    "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, *wait,
                    "STREAMS", *streams, *streams.values(),
                )  # fmt: skip
            except (*OUTAGE, RedisError) as exc:
                return [], _failed(exc)
            return list(raw_xread_entries(reply)), None
        # Concurrent commands must not meet an uninitialised cluster client
        # (after a failover it is again): redis-py 8's first commands look up
        # keys and policies before initialising, which closes connections
        # they use. A no-op once initialised.
        try:
            await client.initialize()
        except (*OUTAGE, RedisError) as exc:
            return [], _failed(exc)
        # A pass that does not block first: a busy stream must not wait for
        # idle ones' blocks. Only when every stream is idle do reads block.
        out, error = await self._read_cluster(client, keys, count, None)
        if block and error is None and not any(entries for _, entries in out):
            share = max(1, self.block_ms * CLUSTER_READS // len(keys))
            out, error = await self._read_cluster(client, keys, count, min(self.block_ms, share))
        return out, error

    async def _read_cluster(
        self, cluster: RedisCluster, keys: Sequence[str], count: int, block: int | None
    ) -> tuple[Delivered, BaseException | None]:
        """One XREADGROUP per stream on its node, up to ``CLUSTER_READS`` at once, each waited for.

        A read cancelled after Redis delivered would leave its entries pending
        until the next reclaim, so none is cancelled. ``block`` is each
        read's wait (None: none); with more streams than CLUSTER_READS the
        caller gives each a share of ``block_ms``, so an idle pass over all
        of them still takes about ``block_ms``. Once entries have come, the
        reads not yet sent do not block.
        """
        gate = asyncio.Semaphore(CLUSTER_READS)
        found = False

        async def read(key: str) -> Delivered:
            nonlocal found
            wait = () if found or block is None else ("BLOCK", block)
            async with gate:
                reply = await on_key_node(
                    cluster, key, "XREADGROUP", "GROUP", self.group, self.consumer,
                    "COUNT", count, *wait, "STREAMS", key, ">",
                )  # fmt: skip
            pairs = _delivered(reply)
            if any(entries for _, entries in pairs):
                found = True
            return pairs

        results = await asyncio.gather(*(read(k) for k in keys), return_exceptions=True)
        out: Delivered = []
        error: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, (*OUTAGE, RedisError)):
                    result = _failed(result)
                error = error or result
            else:
                out += result
        return out, error

    async def ack(self, ids: Mapping[str, Sequence[bytes]]) -> None:
        """XACK entries (their ids as bytes, as a read gives them), by stream key, in one
        round trip.

        One XACK a stream, packed by hand (:func:`~eventwire.store.resp.pack_bulks`)
        and sent on a pooled connection: redis-py's pipeline encoded each id
        on its own. On a cluster, a pipeline (each stream's XACK on its node).
        """
        client = self.client
        if isinstance(client, RedisCluster):
            with _redis_failures():
                async with client.pipeline(transaction=False) as pipe:
                    for key, stream_ids in ids.items():
                        pipe.xack(key, self.group, *stream_ids)
                    await pipe.execute()
            return
        commands = [
            pack_args(("XACK", key, self.group), [pack_bulks(stream_ids)], len(stream_ids))
            for key, stream_ids in ids.items()
            if stream_ids
        ]
        if not commands:
            return
        pool: Any = client.connection_pool
        with _redis_failures():
            conn = await pool.get_connection()
            try:
                results = await exchange(conn, commands)
            except BaseException:
                # A reply that arrives late must never be read as another command's.
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        for result in results:
            if isinstance(result, Exception):
                raise _failed(result)

    async def dead_letter(
        self, key: str, dead_key: str, entry_id: str, event: bytes, why: str
    ) -> None:
        """XADD an entry to a dead stream and XACK it, in one MULTI.

        The dead stream must share the stream's tag (:meth:`Keys.dead`), so
        both commands run in one slot on a cluster too.
        """
        with _redis_failures():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(dead_key, {"event": event, "error": why, "id": entry_id})
                pipe.xack(key, self.group, entry_id)
                await pipe.execute()

    async def claim(self, key: str, idle_ms: int, cursor: str, count: int) -> Claimed:
        """XAUTOCLAIM: entries pending longer than ``idle_ms``, from ``cursor``, now this one's."""
        with _redis_failures():
            reply = await self.client.xautoclaim(
                key, self.group, self.consumer, idle_ms, start_id=cursor, count=count
            )
        return parse_autoclaim(reply)

    async def deliveries(
        self, key: str, first: str, last: str, count: int, mine: bool = False
    ) -> dict[str, int]:
        """XPENDING of entries ``first`` to ``last``: times each was delivered, by id.

        Args:
            mine: only entries pending with this consumer.
        """
        with _redis_failures():
            reply = await self.client.xpending_range(
                key,
                self.group,
                min=first,
                max=last,
                count=count,
                consumername=self.consumer if mine else None,
            )
        return parse_pending_range(reply)

    async def oldest_pending(self, key: str) -> str | None:
        """The id of the group's oldest pending entry on a stream (None: nothing pending)."""
        with _redis_failures():
            return parse_pending_summary(await self.client.xpending(key, self.group)).min_id

    async def progress(self, key: str) -> StreamProgress | None:
        """XINFO STREAM and XINFO GROUPS of a stream (None: Redis cannot tell: no stream yet)."""
        with _redis_failures():
            try:
                info = await self.client.xinfo_stream(key)
                groups = await self.client.xinfo_groups(key)
            except ResponseError as exc:
                if isinstance(exc, OUTAGE):  # a cluster slot moving
                    raise
                return None
        group = next((g for g in parse_groups(groups) if g.name == self.group), None)
        return StreamProgress(parse_stream_info(info), group)

    async def undelivered(self, key: str, after: str, limit: int) -> int:
        """How many entries follow ``after`` (the group's last delivered id), up to ``limit``."""
        with _redis_failures():
            return len(await self.client.xrange(key, f"({after}", "+", count=limit) or ())

    async def forgotten_after(self, forgotten_key: str, delivered: str) -> tuple[int, str | None]:
        """Of the ids a forget deleted (:meth:`Keys.forgotten`): how many are past ``delivered``
        (entries the group never read), and the largest (None: none). Those at or before
        ``delivered`` are dropped from the set: they can no longer look trimmed."""
        low = Keys.forgotten_member(delivered)
        with _redis_failures():
            await self.client.zremrangebylex(forgotten_key, "-", f"[{low}")
            after = int(await self.client.zlexcount(forgotten_key, f"({low}", "+"))
            last = await self.client.zrange(forgotten_key, -1, -1)
        if not last:
            return after, None
        ms, _, seq = reply_text(last[0]).partition("-")
        return after, f"{int(ms)}-{int(seq)}"

    async def trim_before(self, key: str, minid: tuple[int, int]) -> None:
        """XTRIM MINID ~: drop entries older than ``minid`` (whole nodes only)."""
        with _redis_failures():
            await self.client.xtrim(key, minid=f"{minid[0]}-{minid[1]}", approximate=True)

    async def consumers(self, key: str) -> list[ConsumerInfo]:
        """XINFO CONSUMERS of the group on a stream."""
        with _redis_failures():
            return parse_consumers(await self.client.xinfo_consumers(key, self.group))

    async def forget(self, key: str) -> None:
        """XGROUP DELCONSUMER: this consumer leaves the group on a stream."""
        with _redis_failures():
            await self.client.xgroup_delconsumer(key, self.group, self.consumer)


def _as_sent(reply: Any, **_: Any) -> Any:
    """A response callback that keeps the reply as Redis sent it."""
    return reply


def _delivered(reply: Any) -> Delivered:
    return [(key, stream_entries(entries)) for key, entries in xread_entries(reply)]
