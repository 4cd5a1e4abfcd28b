"""Reading the events and rejected streams: blocking reads over many streams, pages, ends.

The live relay and ``eventwire tail`` read with :class:`StreamsReader`
(``XREAD BLOCK`` over several streams, on a cluster key by key), judge
trimming with :func:`read_page` (entries and ``XINFO STREAM`` in one
``MULTI``), and start at :func:`stream_end`. :func:`read_site_summary` is
the admin's one round trip for a site's numbers. Replies are parsed by
:mod:`eventwire.store.replies`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from eventwire.core.errors import StoreUnavailable
from eventwire.store.client import OUTAGE, RedisClient, unreachable
from eventwire.store.cluster import CLUSTER_POLL_MS, CLUSTER_READS, on_key_node
from eventwire.store.keys import Keys
from eventwire.store.replies import (
    SiteSnapshot,
    StreamEntry,
    StreamInfo,
    merge_stream_info,
    no_such_key,
    parse_stream_info,
    stream_entries,
    time_ms,
    xread_entries,
)


def _info_or_none(reply: Any) -> StreamInfo | None:
    """An XINFO STREAM reply read with ``raise_on_error=False`` (None: no such stream)."""
    if isinstance(reply, ResponseError) and no_such_key(reply):
        return None
    if isinstance(reply, Exception):
        raise StoreUnavailable(f"redis error: {reply}")
    return parse_stream_info(reply)


async def read_page(
    client: RedisClient, key: str, after: str, count: int, until: str = "+"
) -> tuple[list[StreamEntry], StreamInfo | None]:
    """Entries after ``after`` (exclusive) up to ``until``, and the stream's info, at one moment.

    Both are read in one ``MULTI``, so
    :func:`~eventwire.store.replies.trimmed_after` judges the very snapshot
    the entries come from.

    Args:
        client: a redis.asyncio client.
        key: the stream.
        after: an entry id; entries after it are returned.
        count: the most entries returned.
        until: the last id that may be returned (``+``: the end).

    Returns:
        The entries, oldest first, and the info (None: the stream does not exist).

    Raises:
        redis.exceptions.RedisError, OSError: Redis is unreachable or failed.
    """
    async with client.pipeline(transaction=True) as pipe:
        pipe.xinfo_stream(key)
        pipe.xrange(key, f"({after}", until, count=count)
        info, entries = await pipe.execute(raise_on_error=False)
    if isinstance(entries, Exception):
        raise entries
    return stream_entries(entries), _info_or_none(info)


async def stream_end(client: RedisClient, key: str) -> str:
    """The id of the last entry ever added to a stream (``0-0`` if it does not exist)."""
    try:
        info = parse_stream_info(await client.xinfo_stream(key))
    except ResponseError as exc:
        if no_such_key(exc):
            return "0-0"
        raise
    return info.last_generated_id


async def redis_time_ms(client: RedisClient) -> int:
    """Redis' clock in milliseconds: the clock stream ids come from."""
    return time_ms(await client.time())


async def read_site_summary(
    client: RedisClient, keys: Keys, tags: Sequence[str], within: float
) -> SiteSnapshot:
    """A site's open sessions and both streams' ends, read in one round trip.

    Open sessions are the members of the ``due`` sets: the Lua steps add a
    customer there when its session opens and remove it when the session
    ends, so their size is the open session count (``ZCARD``, O(1)). A
    partitioned site's streams are summed as one (see
    :func:`~eventwire.store.replies.merge_stream_info`).

    Args:
        client: a redis.asyncio client.
        keys: the key names.
        tags: the site's tags, one per partition.
        within: the most the round trip may take (s).

    Raises:
        StoreUnavailable: Redis is unreachable, slow, or answered an error.
    """
    try:
        async with asyncio.timeout(within):
            async with client.pipeline(transaction=False) as pipe:
                if not isinstance(client, RedisCluster):
                    pipe.time()
                else:
                    # redis-py sends no keyless command in a cluster pipeline:
                    # TIME is asked of the site's own node.
                    pipe.eval("return redis.call('TIME')", 1, keys.due(tags[0]))
                for tag in tags:
                    pipe.zcard(keys.due(tag))
                    pipe.xinfo_stream(keys.events(tag))
                    pipe.xinfo_stream(keys.rejected(tag))
                now, *replies = await pipe.execute(raise_on_error=False)
    except OUTAGE as exc:
        raise StoreUnavailable(unreachable(exc)) from None
    for reply in (now, *replies[::3]):
        if isinstance(reply, Exception):
            raise StoreUnavailable(f"redis error: {reply}")
    return SiteSnapshot(
        now_ms=time_ms(now),
        open_sessions=sum(int(n) for n in replies[::3]),
        events=merge_stream_info([_info_or_none(r) for r in replies[1::3]]),
        rejected=merge_stream_info([_info_or_none(r) for r in replies[2::3]]),
    )


class StreamsReader:
    """``XREAD COUNT count BLOCK block_ms`` over several streams, call after call.

    One Redis reads every key in one call. A cluster cannot read keys of
    several slots in one call, so each key is read on its own, sent straight
    to its key's node (:func:`~eventwire.store.cluster.on_key_node`). Up to
    :data:`~eventwire.store.cluster.CLUSTER_READS` keys each get a blocking
    read, all at once; the first answers end a call, and the reads still
    waiting stay in flight for the next call rather than being cancelled:
    redis-py drops the connection of a cancelled command (a late reply must
    never be read as the next command's), which would cost a reconnect per
    key per call. A read in flight is kept while its key's position is the
    one it was sent with, and sent again when the caller moved it. With more
    keys, every key is read without blocking (that many at a time) and, when
    none had entries, the call waits
    :data:`~eventwire.store.cluster.CLUSTER_POLL_MS` before it returns.

    Args:
        client: a redis.asyncio client (one Redis or a cluster).
        count: the most entries per key and read.
        block_ms: how long a read waits for new entries.

    Use as ``async with StreamsReader(...) as reader``: the reads in flight
    are cancelled on exit.
    """

    def __init__(self, client: RedisClient, count: int, block_ms: int) -> None:
        self.client = client
        self.count = count
        self.block_ms = block_ms
        #: Per key on a cluster: the position a read was sent with, and the read.
        self._reads: dict[str, tuple[str, asyncio.Task[Any]]] = {}

    async def __aenter__(self) -> StreamsReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the reads in flight and wait for them."""
        reads = [task for _, task in self._reads.values()]
        self._reads.clear()
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)

    async def read(self, streams: Mapping[str, str]) -> list[tuple[str, list[tuple[Any, Any]]]]:
        """Entries after each key's position, waiting up to ``block_ms`` for the first.

        Args:
            streams: key -> the id after which to read.

        Returns:
            The entries by key, as
            :func:`~eventwire.store.replies.xread_entries` gives them (keys
            without new entries may be missing).

        Raises:
            redis.exceptions.RedisError, OSError: Redis is unreachable or failed.
        """
        client = self.client
        if not isinstance(client, RedisCluster):
            wanted: dict[Any, Any] = dict(streams)
            return xread_entries(await client.xread(wanted, count=self.count, block=self.block_ms))
        # Concurrent commands must not meet a cold cluster client (new, or
        # after a failover): redis-py's initialisation closes connections the
        # first commands use. A no-op once initialised.
        await client.initialize()
        if len(streams) > CLUSTER_READS:
            return await self._poll(client, streams)
        reads = self._reads
        for key in [k for k in reads if k not in streams]:
            reads.pop(key)[1].cancel()
        for key, pos in streams.items():
            sent = reads.get(key)
            if sent is not None and sent[0] != pos:
                sent[1].cancel()
                sent = None
            if sent is None:
                task = asyncio.ensure_future(self._read_one(client, key, pos, self.block_ms))
                reads[key] = (pos, task)
        await asyncio.wait([t for _, t in reads.values()], return_when=asyncio.FIRST_COMPLETED)
        merged: list[tuple[str, list[tuple[Any, Any]]]] = []
        failure: BaseException | None = None
        for key, (_, task) in list(reads.items()):
            if not task.done():
                continue
            del reads[key]
            if task.cancelled():
                continue
            if (error := task.exception()) is not None:
                failure = failure or error
                continue
            merged += xread_entries(task.result())
        if failure is not None:
            raise failure
        return merged

    async def _read_one(
        self, cluster: RedisCluster, key: str, pos: str, block_ms: int | None
    ) -> Any:
        """One key's XREAD, on the node serving its slot."""
        args: list[Any] = ["XREAD", "COUNT", self.count]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        return await on_key_node(cluster, key, *args, "STREAMS", key, pos)

    async def _poll(
        self, cluster: RedisCluster, streams: Mapping[str, str]
    ) -> list[tuple[str, list[tuple[Any, Any]]]]:
        await self.aclose()
        gate = asyncio.Semaphore(CLUSTER_READS)

        async def one(key: str, pos: str) -> Any:
            async with gate:
                return await self._read_one(cluster, key, pos, None)

        replies = await asyncio.gather(*(one(k, p) for k, p in streams.items()))
        merged = [pair for reply in replies for pair in xread_entries(reply)]
        if not any(entries for _, entries in merged):
            await asyncio.sleep(min(self.block_ms, CLUSTER_POLL_MS) / 1000)
        return merged
