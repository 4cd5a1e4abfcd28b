"""A site's rollups in one process: fed by the relay's readers, served to summary viewers.

One :class:`SiteTally` per (site, partitions) per process. It joins the
site's events and rejected readers (:mod:`eventwire.live.relay`; it starts
them if no viewer has), so its counts cost no Redis work beyond the reads
those readers make anyway, and nothing on the ingest path. When it starts it
counts the window's past once (:meth:`SiteTally.backfill`, ``XRANGE`` pages
up to where it joined the readers, so nothing is counted twice or missed);
then every entry the readers hand out.

Several processes behind one admin address: each keeps its own tally, and
each reads every entry of the site's streams from Redis, so each one's
counts are the exact counts of the site (not of the process): whichever
child the supervisor's proxy picks gives the same figures for the same
seconds.

A summary viewer (:class:`SummaryViewer`) gets the snapshot, the newest
feed entries, ``ready``, then one ``tick`` a second (never dropped) and the
feed sampled to about :data:`~eventwire.live.rollup.FEED_RATE` a second
(through its bounded queue: a full one drops feed entries, with ``lagged``).
A viewer that leaves ticks unread for :data:`TICKS_BEHIND` seconds is closed
(1013): reconnecting gives it a fresh snapshot. The last viewer to leave
starts :data:`LINGER_S`; a viewer within it gets the counts at once. A
viewer that comes while the backfill runs waits for it at most
:data:`WARM_WAIT`, then gets a snapshot marked ``backfilling``: the ticks
bring the past's seconds as they are counted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import structlog

from eventwire.core.positions import cursor, resolve_since
from eventwire.live.messages import Entry, Snapshot, StreamName, Tick, decode_entries, encode
from eventwire.live.rollup import FEED_KEEP, WINDOW_S, FeedSampler, Rollup
from eventwire.live.viewer import Filter, Viewer
from eventwire.store import Store, StreamEntry, read_page, stream_id, trimmed_after

if TYPE_CHECKING:
    from eventwire.live.relay import _Reader

log = structlog.get_logger("eventwire.live")

#: Seconds between ticks.
TICK_S: Final = 1.0
#: Ticks a viewer may leave unread before it is closed (it reconnects to a snapshot).
TICKS_BEHIND: Final = 60
#: How long a summary viewer waits for a running backfill before its snapshot (s).
WARM_WAIT: Final = 0.3
#: Entries of one backfill page (XRANGE COUNT): ~2 MB of reply at most.
BACKFILL_PAGE: Final = 5000
#: How long a tally outlives its last viewer (s): a reload within it is instant.
LINGER_S: Final = 600.0


class SummaryViewer(Viewer):
    """A viewer of ``stream=summary``: the sampled feed in its bounded queue, ticks beside it."""

    __slots__ = ("stale", "ticks_queued")

    def __init__(self, limit: int, partitions: int) -> None:
        super().__init__(Filter(None, None), limit, partitions)
        self.ticks_queued = 0
        #: Left :data:`TICKS_BEHIND` ticks unread: to be closed.
        self.stale = False

    def tick(self, frame: bytes) -> None:
        """Queue a tick past the queue's bound: counts are never dropped."""
        self.queue.append(frame)
        self.ticks_queued += 1
        self.wake()

    def take(self, most: int) -> list[bytes]:
        """As :meth:`Viewer.take`; an empty queue means its ticks were all sent."""
        out = super().take(most)
        if not self.queue:
            self.ticks_queued = 0
        return out


class SiteTally:
    """The rollups of one site in this process, and its summary viewers.

    Args:
        store: Redis access (the backfill's pages, ``store_timeout``).
        site: the site.
        partitions: its partitions.
        now_ms: Redis' clock when the tally starts; later times follow this
            process' monotonic clock from it.
    """

    def __init__(self, store: Store, site: str, partitions: int, now_ms: int) -> None:
        self.store = store
        self.site = site
        self.partitions = partitions
        self.rollup = Rollup()
        self.sampler = FeedSampler()
        self.viewers: set[SummaryViewer] = set()
        self.readers: dict[StreamName, _Reader] = {}
        self.warm = asyncio.Event()
        self.since_ms = now_ms - WINDOW_S * 1000
        self._start_ms = now_ms
        self._start_loop = asyncio.get_running_loop().time()
        self.idle_since: float | None = None
        #: The backfill failed (Redis away): the tally is dropped, viewers told to retry.
        self.failed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def now_ms(self) -> int:
        """Redis' clock, as of the tally's start plus this process' monotonic time since."""
        elapsed = asyncio.get_running_loop().time() - self._start_loop
        return self._start_ms + int(elapsed * 1000)

    def position(self) -> str:
        """The events stream's position the counts reach (a cursor)."""
        reader = self.readers.get("events")
        return cursor(reader.positions) if reader is not None else "0-0"

    def take(self, stream: StreamName, entries: Sequence[Entry]) -> None:
        """Count one hand-out of a reader; queue its sampled entries for every viewer."""
        if stream == "events":
            self.rollup.add_events(entries)
        else:
            self.rollup.add_rejected(entries)
        if self.viewers:
            sampled = self.sampler.take(entries, self.now_ms() // 1000)
            if sampled:
                for viewer in self.viewers:
                    viewer.push(sampled)

    async def backfill(self, positions: dict[StreamName, list[str]], keys: KeysOf) -> None:
        """Count each stream's window up to ``positions`` (where the tally joined its reader)."""
        try:
            start = resolve_since(f"{WINDOW_S}s", self._start_ms, self.partitions)
            assert start is not None
            older: list[Entry] = []
            for stream, until in positions.items():
                for part, key in enumerate(keys(stream)):
                    older += await self._backfill_one(stream, key, part, start[part], until[part])
                    del older[:-FEED_KEEP]
                    await asyncio.sleep(0)
            # The feed of a first load: the newest of the past, then what came live.
            older.sort(key=lambda e: e.key)
            live = list(self.rollup.feed)
            self.rollup.feed.clear()
            self.rollup.feed.extend(e.frame for e in older[-FEED_KEEP:])
            self.rollup.feed.extend(live)
        except Exception as exc:
            # Redis away or a bug: either way the counts would be short; the
            # relay drops this tally and its viewers come back to a new one.
            log.warning("live_tally_backfill_failed", site=self.site, error=repr(exc))
            self.failed = True
        finally:
            self.warm.set()

    async def _backfill_one(
        self, stream: StreamName, key: str, part: int, after: str, until: str
    ) -> list[Entry]:
        """Count one partition's stream in pages from ``after`` to ``until``; its newest entries."""
        settings = self.store.settings
        part_of = part if self.partitions > 1 else None
        # The raw newest entries: only these are encoded as frames, for the feed.
        newest: deque[StreamEntry] = deque(maxlen=FEED_KEEP)
        while True:
            async with asyncio.timeout(settings.store_timeout):
                raw, info = await read_page(self.store.redis, key, after, BACKFILL_PAGE, until)
            if info is not None and info.first_id and trimmed_after(after, info):
                # Trimming (stream_maxlen) took the window's start: the counts begin here.
                self.since_ms = max(self.since_ms, stream_id(info.first_id)[0])
            if not raw:
                break
            decoded = decode_entries(raw, stream, part_of, frames=False)
            if stream == "events":
                self.rollup.add_events(decoded, feed=False)
            else:
                self.rollup.add_rejected(decoded, feed=False)
            newest.extend(raw)
            after = raw[-1].id
            if len(raw) < BACKFILL_PAGE:
                break
        return decode_entries(list(newest), stream, part_of)

    def snapshot(self) -> bytes:
        """The snapshot frame of now."""
        now = self.now_ms()
        self.rollup.expire(now)
        return encode(
            Snapshot(
                id=self.position(),
                now=now,
                window=WINDOW_S,
                since=max(self.since_ms, now - WINDOW_S * 1000),
                seconds=self.rollup.window(),
                top=self.rollup.tops(),
                feed_every=self.sampler.every,
                backfilling=not self.warm.is_set(),
            )
        )

    def tick(self) -> list[SummaryViewer]:
        """Send every viewer this second's tick; the viewers too far behind, to close."""
        now = self.now_ms()
        self.rollup.expire(now)
        frame = encode(
            Tick(
                id=self.position(),
                now=now,
                seconds=self.rollup.changed(),
                top=self.rollup.tops(),
                feed_every=self.sampler.every,
                backfilling=not self.warm.is_set(),
            )
        )
        behind = []
        for viewer in self.viewers:
            if viewer.ticks_queued >= TICKS_BEHIND:
                viewer.stale = viewer.closed = True
                viewer.wake()
                behind.append(viewer)
            else:
                viewer.tick(frame)
        return behind


KeysOf = Callable[[StreamName], list[str]]
