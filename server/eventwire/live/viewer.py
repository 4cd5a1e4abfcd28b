"""One viewer of the live relay: its filters, its bounded queue, its backlog replay.

A reader (:mod:`eventwire.live.relay`) pushes every entry it reads to each of
its viewers; a viewer keeps what passes its filters, at most ``live_queue``
events. A viewer whose socket is full gets no more until it drains, then one
``lagged`` notice per partition that lost entries, each with the count of
what it missed there.

Handover without a gap or a duplicate: a viewer with ``since`` replays the
backlog itself (:func:`replay`) with ``XRANGE`` pages of ``live_batch``
(each page read in one ``MULTI`` with ``XINFO STREAM``, to tell a trimmed
position). When a page comes back short it joins the reader, whose position
``R`` is the last id it has handed out. If ``R`` is ahead of the viewer's
position ``V`` (:func:`reader_ahead`), the viewer replays ``(V, R]`` as well
(the reader's next batch starts after ``R`` and already lands in the
viewer's queue); if ``R`` is behind, the viewer's *floor* drops the queued
entries up to ``V``. Both are decided synchronously with the join, so
nothing the reader hands out in between is lost. All of this holds per
partition.
"""

from __future__ import annotations

import asyncio
import fnmatch
import heapq
import re
from collections import deque
from collections.abc import Sequence
from typing import Final

from websockets.asyncio.server import ServerConnection

from eventwire import metrics
from eventwire.live.messages import (
    Entry,
    Lagged,
    StreamName,
    decode_entries,
    encode,
    trimmed,
)
from eventwire.store import Store, read_page, stream_id, trimmed_after

#: Frames written to a viewer's socket before waiting for it to drain: at most
#: this many frames (each one stored event, up to ``max_event_bytes``) sit in
#: the socket's buffer above its 32 KiB limit.
SEND_CHUNK: Final = 64
#: Kernel send buffer of a viewer's socket (Linux doubles it). Autotuning would
#: let it grow to megabytes for a viewer that does not read; this bounds the
#: kernel memory a viewer holds, and caps one viewer's throughput at about this
#: much per round trip (256 KiB over 50 ms: ~5 MB/s, ~10,000 events/s).
VIEWER_SEND_BUFFER: Final = 256 * 1024


class Filter:
    """A viewer's ``action`` glob (matched in full, as ``eventwire tail``) and ``uuid``."""

    __slots__ = ("_action", "_uuid")

    def __init__(self, action: str | None, uuid: str | None) -> None:
        self._action = re.compile(fnmatch.translate(action)).match if action else None
        self._uuid = uuid

    def matches(self, entry: Entry) -> bool:
        """Whether an entry passes both filters."""
        if self._uuid is not None and entry.uuid != self._uuid:
            return False
        return self._action is None or self._action(entry.action) is not None


class _Gap:
    """Events of one partition dropped for a viewer since its last ``lagged`` notice."""

    __slots__ = ("first", "last", "missed")

    def __init__(self, first: str) -> None:
        self.first = first
        self.last = first
        self.missed = 0


class Viewer:
    """One viewer's bounded queue of frames, filled by a reader, emptied by its socket.

    Args:
        flt: the viewer's filters.
        limit: the most events queued (``live_queue``); the notices of one
            gap (a ``lagged`` per partition) or a ``trimmed`` may come on top.
        partitions: the site's partitions (P above 1 writes ``p`` in notices).
    """

    __slots__ = (
        "closed",
        "filter",
        "floor",
        "gaps",
        "limit",
        "missed",
        "missed_total",
        "partitioned",
        "peak",
        "queue",
        "waiter",
    )

    def __init__(self, flt: Filter, limit: int, partitions: int = 1) -> None:
        self.filter = flt
        self.limit = limit
        self.partitioned = partitions > 1
        self.queue: deque[bytes] = deque()
        #: Per partition, entries up to this id are already sent (the handover, see the module doc).
        self.floor: list[tuple[int, int]] = [(0, 0)] * partitions
        #: Events dropped since the last ``lagged`` notices: in all, and by partition.
        self.missed = 0
        self.gaps: dict[int, _Gap] = {}
        #: Events dropped in all, and the longest the queue has been.
        self.missed_total = 0
        self.peak = 0
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def joined(self, positions: Sequence[str]) -> None:
        """Set the floor as the viewer joins a reader: it has sent entries up to ``positions``."""
        self.floor = [stream_id(p) for p in positions]

    def push(self, entries: Sequence[Entry]) -> None:
        """Queue the entries this viewer wants; drop (and count) what does not fit."""
        queue = self.queue
        floor = self.floor
        dropped = 0
        for entry in entries:
            if entry.key <= floor[entry.part] or not self.filter.matches(entry):
                continue
            if len(queue) >= self.limit:
                gap = self.gaps.get(entry.part)
                if gap is None:
                    gap = self.gaps[entry.part] = _Gap(entry.id)
                gap.missed += 1
                gap.last = entry.id
                self.missed += 1
                dropped += 1
                continue
            if self.missed:
                queue.extend(self._lagged())
            queue.append(entry.frame)
        if dropped:
            self.missed_total += dropped
            metrics.LIVE_MISSED.inc(dropped)
        if len(queue) > self.peak:
            self.peak = len(queue)
        self.wake()

    def notice(self, frame: bytes) -> None:
        """Queue a notice (``trimmed``); dropped when the queue is full (a ``lagged`` follows)."""
        if len(self.queue) < self.limit:
            if self.missed:  # the gap came first
                self.queue.extend(self._lagged())
            self.queue.append(frame)
            self.wake()

    def take(self, most: int) -> list[bytes]:
        """Up to ``most`` frames, oldest first; the pending ``lagged`` once the queue is empty."""
        queue = self.queue
        out = [queue.popleft() for _ in range(min(most, len(queue)))]
        if not queue and self.missed:
            out += self._lagged()
        return out

    def _lagged(self) -> list[bytes]:
        """The ``lagged`` notices of the current gap, one per partition that lost entries."""
        frames = [
            encode(
                Lagged(
                    missed=gap.missed,
                    first=gap.first,
                    id=gap.last,
                    p=part if self.partitioned else None,
                )
            )
            for part, gap in self.gaps.items()
        ]
        self.gaps.clear()
        self.missed = 0
        return frames

    def wake(self) -> None:
        """Wake the viewer's sender."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        """Return when there is something to send, or the viewer left."""
        if self.queue or self.missed or self.closed:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


async def send_frames(ws: ServerConnection, frames: Sequence[bytes]) -> None:
    """Write frames as text messages, then wait for the socket to drain below its limit.

    One write for a chunk of frames costs far less than one ``send()`` each.

    Raises:
        ConnectionClosed: the viewer is gone.
    """
    async with ws.send_context():
        for frame in frames:
            ws.protocol.send_text(frame)


async def send_queued(ws: ServerConnection, viewer: Viewer) -> None:
    """Send what the reader queues for the viewer, a chunk at a time, until the viewer leaves.

    Raises:
        ConnectionClosed: the viewer is gone.
    """
    while True:
        await viewer.wait()
        if viewer.closed:
            return
        frames = viewer.take(SEND_CHUNK)
        if frames:
            await send_frames(ws, frames)


def reader_ahead(reader_at: Sequence[str], positions: Sequence[str]) -> dict[int, str]:
    """The partitions where a reader has handed out entries after a joining viewer's position.

    Returns:
        Each such partition and the reader's position in it: what the viewer
        replays itself (:func:`replay` with ``until``).
    """
    return {
        part: reader
        for part, (reader, at) in enumerate(zip(reader_at, positions, strict=True))
        if stream_id(reader) > stream_id(at)
    }


async def replay(
    ws: ServerConnection,
    store: Store,
    viewer: Viewer,
    keys: Sequence[str],
    stream: StreamName,
    positions: list[str],
    batch: int,
    until: dict[int, str] | None = None,
) -> None:
    """Send the entries after ``positions`` (up to ``until``), merged by id; move ``positions``.

    Args:
        ws: the viewer's socket.
        store: Redis access (its client, and ``store_timeout`` for each page).
        viewer: whose filters apply.
        keys: the stream's key in each partition.
        stream: which of the site's streams.
        positions: per partition, the id to start after; each replayed
            partition's entry becomes the last id read of it.
        batch: the entries of one page of one partition.
        until: the partitions to replay and the last id of each; None:
            every partition, to its end.

    Each partition is read in pages; one page per partition is held at a
    time, and the entry with the lowest id goes first. Every chunk waits
    for the viewer's socket to drain, so a slow viewer slows its own
    replay and nothing else.
    """
    parts = range(len(keys)) if until is None else sorted(until)
    redis, timeout = store.redis, store.settings.store_timeout
    partitioned = len(keys) > 1
    after = {part: positions[part] for part in parts}
    pending: dict[int, deque[Entry]] = {part: deque() for part in parts}
    done: set[int] = set()
    heads: list[tuple[tuple[int, int], int]] = []

    async def fill(part: int) -> None:
        # Until the partition has an entry to send or is read to its end.
        while not pending[part] and part not in done:
            last = "+" if until is None else until[part]
            async with asyncio.timeout(timeout):
                raw, info = await read_page(redis, keys[part], after[part], batch, last)
            if trimmed_after(after[part], info):
                assert info is not None
                frame = trimmed(after[part], info.first_id, part if partitioned else None)
                await ws.send(frame, text=True)
            if raw:
                decoded = decode_entries(raw, stream, part if partitioned else None)
                pending[part].extend(e for e in decoded if viewer.filter.matches(e))
                after[part] = raw[-1].id
            if len(raw) < batch:
                done.add(part)
        if pending[part]:
            heapq.heappush(heads, (pending[part][0].key, part))

    for part in parts:
        await fill(part)
    while heads:
        frames: list[bytes] = []
        empty: int | None = None
        while heads and len(frames) < SEND_CHUNK:
            _, part = heapq.heappop(heads)
            queue = pending[part]
            frames.append(queue.popleft().frame)
            if queue:
                heapq.heappush(heads, (queue[0].key, part))
            elif part not in done:
                # Its next page may hold the lowest id: read it first.
                empty = part
                break
        await send_frames(ws, frames)
        if empty is not None:
            await fill(empty)
    for part in parts:
        positions[part] = after[part]
