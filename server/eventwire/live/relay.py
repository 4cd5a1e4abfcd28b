"""The relay's fan-out: one Redis reader per (site, stream) per process, shared by its viewers.

The first viewer of a (site, stream) starts a reader task (its own Redis
connection, ``XREAD BLOCK``, ``live_batch`` entries a read); the last one to
leave stops it. The reader decodes and encodes each entry once and hands the
same frame to every viewer's queue (:class:`~eventwire.live.viewer.Viewer`).

A reader follows every partition of its stream: each read takes at most
``live_batch // P`` entries (at least one) of each partition and hands them
out merged by id (ties by partition). On one Redis all partitions are one
``XREAD``; on a cluster each key is read on its own node
(:class:`eventwire.store.StreamsReader`). Page reads (a reader behind, or
back from a failure) read each partition in its own ``MULTI``, with the
stream's info, to tell whether trimming overtook the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from typing import Final

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from eventwire import metrics
from eventwire.core.positions import cursor, id_text, resolve_since
from eventwire.live.messages import (
    Entry,
    Hello,
    Ready,
    StreamName,
    decode_entries,
    encode,
    merge_order,
    trimmed,
)
from eventwire.live.query import LiveQuery
from eventwire.live.tally import LINGER_S, TICK_S, WARM_WAIT, SiteTally, SummaryViewer
from eventwire.live.viewer import (
    VIEWER_SEND_BUFFER,
    Filter,
    Viewer,
    reader_ahead,
    replay,
    send_frames,
    send_queued,
)
from eventwire.store import (
    OUTAGE,
    RedisClient,
    RedisError,
    Store,
    StreamEntry,
    StreamInfo,
    StreamsReader,
    connect_stream_reader,
    read_page,
    redis_time_ms,
    stream_end,
    stream_entries,
    stream_id,
    trimmed_after,
)
from eventwire.tasks import cancel_and_wait

log = structlog.get_logger("eventwire.live")

#: How long one XREAD of a reader blocks (ms). Stopping a reader cancels the
#: read, so this only bounds how long a reader holds a dead connection.
READ_BLOCK_MS: Final = 1000
#: A reader's pause after Redis failed: first and longest (s).
RETRY_FIRST: Final = 0.2
RETRY_MAX: Final = 2.0
#: Close code and reason for a viewer refused after the handshake.
TRY_AGAIN_LATER: Final = 1013

#: Redis away, or an error answer: a reader retries, a viewer is told to come back later.
_REDIS_ERRORS: Final = (*OUTAGE, RedisError)

#: What one read of one partition gave: its index, its entries, and the
#: stream's info when it was a page read (None after an XREAD).
_Read = tuple[int, list[StreamEntry], StreamInfo | None]


def per_read(batch: int, partitions: int) -> int:
    """Entries of each partition a read takes: ``live_batch`` shared out, at least one.

    A read so hands out no more than ``live_batch`` entries (P if
    ``live_batch`` is smaller), the bound the viewer queues are set against.
    """
    return max(1, batch // partitions)


class _Reader:
    """The one Redis reader of a (site, stream) in this process, and its viewers.

    Args:
        relay: the relay it belongs to.
        site: the site.
        stream: which stream.
        keys: the stream's key in each partition, in partition order.
        positions: the id each partition starts after.
    """

    def __init__(
        self,
        relay: Relay,
        site: str,
        stream: StreamName,
        keys: list[str],
        positions: Sequence[str],
    ) -> None:
        self.relay = relay
        self.site = site
        self.stream: StreamName = stream
        self.keys = keys
        self.partitioned = len(keys) > 1
        self._index = {key: part for part, key in enumerate(keys)}
        self.count = per_read(relay.settings.live_batch, len(keys))
        #: Per partition, the last id handed to the viewers (or where the reader started).
        self.positions = list(positions)
        self.viewers: set[Viewer] = set()
        #: The site's tally, counting what this reader hands out (it keeps the reader running).
        self.tally: SiteTally | None = None
        self.task: asyncio.Task[None] | None = None
        #: Set before the task is cancelled: a cancellation that redis-py
        #: swallows (see eventwire.tasks) must not keep the loop going.
        self.stopping = False

    @property
    def ident(self) -> tuple[str, str, int]:
        """The reader's key among the relay's readers."""
        return self.site, self.stream, len(self.keys)

    async def run(self) -> None:
        """Read every partition and hand out what comes until stopped, retrying Redis failures."""
        settings = self.relay.settings
        client = connect_stream_reader(settings.redis_url, settings, READ_BLOCK_MS)
        reader = StreamsReader(client, self.count, READ_BLOCK_MS)
        # The first read, and every read after a full batch of any partition or
        # a failure, reads pages: they can tell whether trimming overtook the
        # reader. At the first, the viewer that started the reader has just
        # checked its own position; only later reads can find the reader
        # itself overtaken.
        behind = True
        first = True
        backoff = RETRY_FIRST
        failing = False
        try:
            while not self.stopping:
                try:
                    got = await (self._read_pages(client) if behind else self._read_new(reader))
                except Exception as exc:
                    # Redis being away is normal (retry); anything else is a
                    # bug, logged, and the reader must live on either way.
                    if not isinstance(exc, _REDIS_ERRORS):
                        log.exception("live_reader_failed", site=self.site, stream=self.stream)
                    elif not failing:
                        log.warning(
                            "live_reader_redis_failed",
                            site=self.site,
                            stream=self.stream,
                            error=str(exc),
                        )
                    failing = True
                    behind = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
                    continue
                if failing:
                    log.info("live_reader_redis_back", site=self.site, stream=self.stream)
                    failing = False
                    backoff = RETRY_FIRST
                # A partition that filled its share may have more waiting: all
                # are read in pages next, so none waits behind another.
                behind = any(len(raw) >= self.count for _, raw, _ in got)
                self._hand_out(got, tell_trimmed=not first)
                first = False
        finally:
            await reader.aclose()
            await client.aclose()

    async def _read_pages(self, client: RedisClient) -> list[_Read]:
        """One page of every partition, each with its stream's info."""
        out: list[_Read] = []
        for part, key in enumerate(self.keys):
            raw, info = await read_page(client, key, self.positions[part], self.count)
            out.append((part, raw, info))
        return out

    async def _read_new(self, reader: StreamsReader) -> list[_Read]:
        """What every partition added after its position, waiting for the first (XREAD BLOCK)."""
        streams = {key: self.positions[part] for part, key in enumerate(self.keys)}
        replies = await reader.read(streams)
        return [(self._index[key], stream_entries(raw), None) for key, raw in replies if raw]

    def _hand_out(self, got: Sequence[_Read], tell_trimmed: bool) -> None:
        """Give one read's entries, merged by id, to every viewer; move the positions.

        Synchronous: the positions move with the hand-out, with no await in
        between, so a viewer joining reads them to know what it missed.
        """
        entries: list[Entry] = []
        for part, raw, info in got:
            if tell_trimmed and trimmed_after(self.positions[part], info):
                assert info is not None
                self._tell_trimmed(part, info)
            if raw:
                entries += decode_entries(raw, self.stream, part if self.partitioned else None)
                self.positions[part] = raw[-1].id
        if not entries:
            return
        if self.partitioned:
            entries.sort(key=merge_order)
        if self.tally is not None:
            self.tally.take(self.stream, entries)
        for viewer in self.viewers:
            viewer.push(entries)

    def _tell_trimmed(self, part: int, info: StreamInfo) -> None:
        """Tell each viewer whose own position in ``part`` was trimmed, from that position."""
        for viewer in self.viewers:
            # A viewer that joined ahead of the reader replayed up to its floor itself.
            at = max(self.positions[part], id_text(viewer.floor[part]), key=stream_id)
            if trimmed_after(at, info):
                viewer.notice(trimmed(at, info.first_id, part if self.partitioned else None))


class Relay:
    """The live relay of one server process.

    Args:
        store: Redis access; its settings (``live_queue``, ``live_batch``,
            ``live_max_viewers``, ``store_timeout``) bound the relay.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.settings = store.settings
        self._readers: dict[tuple[str, str, int], _Reader] = {}
        self._viewers: set[Viewer] = set()
        self._tallies: dict[tuple[str, int], SiteTally] = {}
        #: Tallies kept without viewers (``live_tally_at_start``), by (site, partitions).
        self._pinned: set[tuple[str, int]] = set()

    @property
    def viewers(self) -> int:
        """Viewers connected now."""
        return len(self._viewers)

    @property
    def readers(self) -> int:
        """Redis readers running now (one per watched site and stream)."""
        return len(self._readers)

    def queued(self) -> int:
        """Frames queued for all viewers now."""
        return sum(len(v.queue) for v in self._viewers)

    def full(self) -> bool:
        """Whether ``live_max_viewers`` are connected."""
        return len(self._viewers) >= self.settings.live_max_viewers

    def stream_keys(self, site: str, stream: StreamName, partitions: int = 1) -> list[str]:
        """The Redis keys of a site's stream, one per partition, in partition order."""
        return self.store.keys.streams(site, partitions, rejected=stream == "rejected")

    async def serve(self, ws: ServerConnection, query: LiveQuery) -> None:
        """Run one viewer from hello until it leaves (or the server closes it)."""
        if self.full():
            await ws.close(TRY_AGAIN_LATER, "too many live viewers; try again later")
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, VIEWER_SEND_BUFFER)
        viewer = (
            SummaryViewer(self.settings.live_queue, query.partitions)
            if query.summary
            else Viewer(
                Filter(query.action, query.uuid), self.settings.live_queue, query.partitions
            )
        )
        self._viewers.add(viewer)
        gauge = metrics.LIVE_VIEWERS.labels("summary" if query.summary else query.stream)
        gauge.inc()
        watcher = asyncio.create_task(self._watch(ws, viewer))
        reader: _Reader | None = None
        try:
            if isinstance(viewer, SummaryViewer):
                await self._run_summary(ws, viewer, query)
                return
            reader = await self._run(ws, viewer, query)
        except ConnectionClosed:
            pass
        except _REDIS_ERRORS as exc:
            log.warning("live_viewer_redis_failed", site=query.site, error=str(exc))
            await ws.close(TRY_AGAIN_LATER, "redis unavailable; try again later")
        finally:
            await cancel_and_wait([watcher])
            self._viewers.discard(viewer)
            gauge.dec()
            for tally in self._tallies.values():
                tally.viewers.discard(viewer)
            if reader is None and not isinstance(viewer, SummaryViewer):
                reader = next((r for r in self._readers.values() if viewer in r.viewers), None)
            if reader is not None:
                await self._leave(reader, viewer)

    async def _run(self, ws: ServerConnection, viewer: Viewer, query: LiveQuery) -> _Reader:
        """Hello, the backlog, the handover to the reader, ready, then what the reader queues."""
        redis = self.store.redis
        keys = self.stream_keys(query.site, query.stream, query.partitions)
        batch = per_read(self.settings.live_batch, len(keys))
        async with asyncio.timeout(self.settings.store_timeout):
            now = await redis_time_ms(redis)
            since = resolve_since(query.since, now, len(keys))
            positions = since if since is not None else [await stream_end(redis, k) for k in keys]
        hello = Hello(
            site=query.site,
            stream=query.stream,
            id=cursor(positions),
            now=now,
            queue=self.settings.live_queue,
            partitions=len(keys),
        )
        await ws.send(encode(hello), text=True)
        if since is not None:
            await replay(ws, self.store, viewer, keys, query.stream, positions, batch)
        reader = self._join(query.site, query.stream, keys, viewer, positions)
        # The reader handed out (position, reader's position] of these
        # partitions before this viewer joined: read them here; what it reads
        # next is queued. Read now, before any await moves the reader on.
        ahead = reader_ahead(reader.positions, positions)
        if ahead:
            await replay(ws, self.store, viewer, keys, query.stream, positions, batch, ahead)
        await ws.send(encode(Ready(id=cursor(positions))), text=True)
        await send_queued(ws, viewer)
        return reader

    async def _run_summary(
        self, ws: ServerConnection, viewer: SummaryViewer, query: LiveQuery
    ) -> None:
        """Hello, the snapshot, the newest feed, ready, then ticks and the sampled feed."""
        tally = await self._tally(query.site, query.partitions)
        # A short backfill is waited for (a complete snapshot); a long one is
        # not: the snapshot says backfilling and the ticks bring the past.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.warm.wait(), WARM_WAIT)
        if tally.failed:
            await self._drop_tally(tally)
            await ws.close(TRY_AGAIN_LATER, "redis unavailable; try again later")
            return
        # Built and joined with no await between: every later count is in a tick.
        hello = Hello(
            site=query.site,
            stream="summary",
            id=tally.position(),
            now=tally.now_ms(),
            queue=self.settings.live_queue,
            partitions=query.partitions,
        )
        frames = [encode(hello), tally.snapshot(), *tally.rollup.feed]
        frames.append(encode(Ready(id=tally.position())))
        viewer.joined(["0-0"] * query.partitions)
        tally.viewers.add(viewer)
        tally.idle_since = None
        await send_frames(ws, frames)
        await send_queued(ws, viewer)
        if self._tallies.get((query.site, query.partitions)) is not tally:
            # Dropped under the viewer (its backfill failed): a new one starts on reconnect.
            await ws.close(TRY_AGAIN_LATER, "the site's counts restart; reconnect")
        elif viewer.stale:
            await ws.close(TRY_AGAIN_LATER, "fell behind the summary's ticks; reconnect")

    async def _tally(self, site: str, partitions: int) -> SiteTally:
        """The site's tally, started (readers joined, backfill and ticks running) if none."""
        ident = (site, partitions)
        tally = self._tallies.get(ident)
        if tally is not None:
            return tally
        redis = self.store.redis
        kinds: tuple[StreamName, StreamName] = ("events", "rejected")
        keys = {kind: self.stream_keys(site, kind, partitions) for kind in kinds}
        async with asyncio.timeout(self.settings.store_timeout):
            now = await redis_time_ms(redis)
            ends = {kind: [await stream_end(redis, k) for k in keys[kind]] for kind in kinds}
        tally = self._tallies.get(ident)
        if tally is not None:  # another viewer started it meanwhile
            return tally
        tally = self._tallies[ident] = SiteTally(self.store, site, partitions, now)
        positions: dict[StreamName, list[str]] = {}
        for kind in kinds:
            reader = self._reader(site, kind, keys[kind], ends[kind])
            # Where the reader is now: it hands the tally what comes after;
            # the backfill counts up to here.
            positions[kind] = list(reader.positions)
            reader.tally = tally
            tally.readers[kind] = reader
        for coro in (tally.backfill(positions, keys.__getitem__), self._tally_loop(tally)):
            task = asyncio.create_task(coro, name=f"eventwire-tally-{site}")
            tally.tasks.add(task)
            task.add_done_callback(tally.tasks.discard)
        return tally

    async def start_tallies(self, sites: dict[str, int]) -> None:
        """Start and keep the tally of each site (site -> partitions): ``live_tally_at_start``.

        A site whose start fails (Redis away) is logged and left to its first
        viewer; a tally whose backfill fails is dropped, and the next viewer
        starts one (not kept).
        """
        for site, partitions in sites.items():
            self._pinned.add((site, partitions))
            try:
                await self._tally(site, partitions)
            except (*OUTAGE, TimeoutError) as exc:
                self._pinned.discard((site, partitions))
                log.warning("live_tally_start_failed", site=site, error=repr(exc))

    async def _tally_loop(self, tally: SiteTally) -> None:
        """Tick once a second; stop the tally after :data:`LINGER_S` without viewers."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            if tally.failed:  # the backfill failed: its viewers reconnect to a new tally
                break
            tally.tick()
            if tally.viewers:
                tally.idle_since = None
            elif tally.idle_since is None:
                tally.idle_since = loop.time()
            elif (
                loop.time() - tally.idle_since > LINGER_S
                and (tally.site, tally.partitions) not in self._pinned
            ):
                break
        await self._drop_tally(tally, stop_loop=False)

    async def _drop_tally(self, tally: SiteTally, stop_loop: bool = True) -> None:
        """Forget a tally; its readers stop unless viewers of their own keep them."""
        if self._tallies.get((tally.site, tally.partitions)) is tally:
            del self._tallies[(tally.site, tally.partitions)]
        if stop_loop:
            await cancel_and_wait(list(tally.tasks))
        for viewer in tally.viewers:
            viewer.closed = True
            viewer.wake()
        for reader in tally.readers.values():
            reader.tally = None
            await self._leave(reader, None)

    def _join(
        self,
        site: str,
        stream: StreamName,
        keys: list[str],
        viewer: Viewer,
        positions: Sequence[str],
    ) -> _Reader:
        """Add a viewer to the reader of its stream, starting the reader if it is the first."""
        reader = self._reader(site, stream, keys, positions)
        viewer.joined(positions)
        reader.viewers.add(viewer)
        return reader

    def _reader(
        self, site: str, stream: StreamName, keys: list[str], positions: Sequence[str]
    ) -> _Reader:
        """The reader of a stream, started at ``positions`` if there is none."""
        ident = (site, stream, len(keys))
        reader = self._readers.get(ident)
        if reader is None:
            reader = _Reader(self, site, stream, keys, positions)
            reader.task = asyncio.create_task(reader.run(), name=f"eventwire-live-{site}-{stream}")
            self._readers[ident] = reader
            metrics.LIVE_READERS.inc()
        return reader

    async def _leave(self, reader: _Reader, viewer: Viewer | None) -> None:
        """Remove a viewer; the last one to leave (tally included) stops the reader."""
        if viewer is not None:
            reader.viewers.discard(viewer)
        if (
            reader.viewers
            or reader.tally is not None
            or self._readers.get(reader.ident) is not reader
        ):
            return
        del self._readers[reader.ident]
        metrics.LIVE_READERS.dec()
        reader.stopping = True
        if reader.task is not None:
            await cancel_and_wait([reader.task])

    async def _watch(self, ws: ServerConnection, viewer: Viewer) -> None:
        """Notice when the viewer leaves; a viewer has nothing to say, so a message ends it."""
        try:
            async for _ in ws:
                await ws.close(1008, "the live relay takes no messages")
                break
        except ConnectionClosed:
            pass
        finally:
            viewer.closed = True
            viewer.wake()

    async def close(self) -> None:
        """Stop every tally and reader (their viewers' handlers stop them too as they end)."""
        tallies = list(self._tallies.values())
        self._tallies.clear()
        await cancel_and_wait(t for tally in tallies for t in tally.tasks)
        readers = list(self._readers.values())
        self._readers.clear()
        for reader in readers:
            reader.stopping = True
        await cancel_and_wait(r.task for r in readers if r.task is not None)
        metrics.LIVE_READERS.dec(len(readers))
