"""The persist worker's care of its streams: reclaiming, dead letters, the lag gauge, trimming.

:class:`Upkeep` takes over entries that dead consumers left pending
(``XAUTOCLAIM``), moves entries that can never be written to their stream's
dead stream (``{prefix}:{site:p}:dead``, one MULTI with the XACK), and
every few seconds sets the lag gauge, warns when entries were trimmed
before the group read them, and trims what is stored and older than
``persist_retain``. Each stream (a site, or one partition of it) is judged
by its own group and ids. The Redis calls are
:class:`~eventwire.store.ConsumerGroup`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, NamedTuple

import structlog
from prometheus_client import Counter, Gauge

from eventwire.core.errors import StoreUnavailable
from eventwire.core.rules import SitesBook
from eventwire.persist.privacy import DAY_MS, RETAIN_BATCH, retain_batch
from eventwire.persist.sinks import Sink
from eventwire.store import (
    LAG_COUNTED,
    ConsumerGroup,
    Keys,
    StreamEntry,
    counted_lag,
    group_lag,
    stream_id,
)

log = structlog.get_logger("eventwire.persist")

RECLAIMED: Final = Counter(
    "eventwire_persist_reclaimed", "Entries taken over from idle consumers (XAUTOCLAIM)."
)
DEAD_LETTERED: Final = Counter(
    "eventwire_persist_dead_lettered", "Entries moved to the dead stream.", ["site"]
)
TRIMMED_UNREAD: Final = Counter(
    "eventwire_persist_trimmed_unread",
    "Entries trimmed from an events stream before the group read them (lost to the store).",
    ["site"],
)
RETAINED_DELETED: Final = Counter(
    "eventwire_persist_retention_deleted",
    "Rows the store deleted for being older than the site's retain_days.",
    ["site", "table"],
)
RETENTION_RUNS: Final = Counter(
    "eventwire_persist_retention_runs", "Retention passes over every site with retain_days."
)
LAG: Final = Gauge(
    "eventwire_persist_lag",
    "Entries of a site's events stream not yet read by the group.",
    ["site"],
)


class Stream(NamedTuple):
    """One events stream the worker reads: a site, or one partition of it."""

    site: str
    #: The stream's hash tag (:meth:`Keys.tag`): the site id, or ``site:p``.
    tag: str
    #: The stream's key.
    key: str


def streams_of(keys: Keys, partitions: Mapping[str, int]) -> list[Stream]:
    """Every events stream of the sites (site -> its ``partitions``), sites in name order."""
    return [
        Stream(site, tag, keys.events(tag))
        for site in sorted(partitions)
        for tag in Keys.tags(site, partitions[site])
    ]


#: A stream's entries as a read or claim gives them.
Entries = Sequence[StreamEntry]
#: An entry that goes to its dead stream: its stream, id, raw event and why.
DeadEntry = tuple[Stream, str, bytes, str]
#: Writes a batch of entries by stream; ``deliveries`` counts each entry's
#: deliveries by (stream key, id), for reclaimed ones.
Process = Callable[
    [Sequence[tuple[Stream, Entries]], Mapping[tuple[str, str], int]], Awaitable[None]
]


class Upkeep:
    """Reclaiming, dead letters and the periodic look at each stream, for one worker.

    Args:
        groups: the worker's consumer group.
        keys: the key names (dead streams).
        max_deliveries: deliveries after which a failing entry goes to the dead stream.
        retain: seconds of persisted events kept in each stream.
    """

    def __init__(
        self, groups: ConsumerGroup, keys: Keys, max_deliveries: int, retain: float
    ) -> None:
        self.groups = groups
        self.keys = keys
        self.max_deliveries = max_deliveries
        self.retain = retain
        #: Entries this worker moved to a dead stream.
        self.dead_lettered = 0
        #: The trimming alarm's last report, by stream key (each is reported once).
        self._reported_trim: dict[str, str] = {}

    # -- dead letters -----------------------------------------------------------

    async def dead_letter(self, dead: Sequence[DeadEntry]) -> None:
        """Move each entry to its stream's dead stream and ack it, atomically per entry.

        The dead stream shares the events stream's tag (a partition's entries go
        to that partition's dead stream), so both commands run in one MULTI on
        a cluster too. It is not trimmed: entries land there only when something
        is wrong, and an operator must see all of them (and delete them when done).
        """
        for stream, entry_id, raw, why in dead:
            await self.groups.dead_letter(
                stream.key, self.keys.dead(stream.tag), entry_id, raw, why
            )
            DEAD_LETTERED.labels(stream.site).inc()
            self.dead_lettered += 1
            log.warning(
                "persist_dead_lettered", site=stream.site, stream=stream.key, id=entry_id, error=why
            )

    async def deliveries(self, entries: Sequence[DeadEntry]) -> dict[tuple[str, str], int]:
        """The delivery count of each entry (XPENDING), by (stream key, id)."""
        out: dict[tuple[str, str], int] = {}
        for stream, entry_id, _raw, _why in entries:
            found = await self.groups.deliveries(stream.key, entry_id, entry_id, 1)
            for found_id, times in found.items():
                out[stream.key, found_id] = times
        return out

    async def settle_failed(self, failed: Sequence[DeadEntry]) -> None:
        """Entries the store refused one by one: dead-letter those at ``max_deliveries``.

        The others stay pending and are retried (reclaimed) until they reach it.
        """
        counts = await self.deliveries(failed)
        dead = [f for f in failed if counts.get((f[0].key, f[1]), 0) >= self.max_deliveries]
        for stream, entry_id, _raw, why in failed:
            log.warning(
                "persist_entry_failed",
                site=stream.site,
                stream=stream.key,
                id=entry_id,
                deliveries=counts.get((stream.key, entry_id)),
                error=why,
            )
        if dead:
            await self.dead_letter(dead)

    # -- crash safety -----------------------------------------------------------

    async def claim(
        self,
        streams: Sequence[Stream],
        idle_ms: int,
        count: int,
        process: Process,
        stopping: asyncio.Event,
    ) -> None:
        """Take over entries idle longer than ``idle_ms`` (dead consumers') and process them."""
        groups = self.groups
        for stream in streams:
            cursor = "0-0"
            while not stopping.is_set():
                claimed = await groups.claim(stream.key, idle_ms, cursor, count)
                cursor = claimed.cursor
                if claimed.deleted:
                    # Trimmed while pending: XAUTOCLAIM already removed them from the PEL.
                    log.warning(
                        "persist_pending_trimmed",
                        site=stream.site,
                        stream=stream.key,
                        count=claimed.deleted,
                    )
                    TRIMMED_UNREAD.labels(stream.site).inc(claimed.deleted)
                entries = claimed.entries
                if entries:
                    RECLAIMED.inc(len(entries))
                    log.info(
                        "persist_reclaimed", site=stream.site, stream=stream.key, count=len(entries)
                    )
                    pending = await groups.deliveries(
                        stream.key, entries[0].id, entries[-1].id, len(entries), mine=True
                    )
                    counts = {(stream.key, i): times for i, times in pending.items()}
                    await process([(stream, entries)], counts)
                if cursor == "0-0":
                    break

    # -- the periodic look ----------------------------------------------------------

    async def check_streams(self, streams: Sequence[Stream]) -> None:
        """Refresh the lag gauge; warn when entries were trimmed before the group read them.

        Also trims each stream to what is stored and older than ``retain``
        (:meth:`trim`). The gauge is a site's lag summed over its streams, set
        only when Redis tells every one of them.
        """
        now_ms = await self.groups.time_ms()
        lags: dict[str, int | None] = {}
        for stream in streams:
            progress = await self.groups.progress(stream.key)
            if progress is None:
                continue  # no such stream (yet)
            info, group = progress
            if group is None:
                lags[stream.site] = None
                continue
            known = lags.get(stream.site, 0)
            lag = group_lag(group, info.last_generated_id)
            if lag:  # Redis' counter can be wrong (an AOF reload): count, bounded
                after = await self.groups.undelivered(
                    stream.key, group.last_delivered_id, LAG_COUNTED + 1
                )
                lag = counted_lag(group, after)
            lags[stream.site] = None if lag is None or known is None else known + lag
            deleted, delivered = info.max_deleted_id, group.last_delivered_id
            await self.trim(stream.key, delivered, now_ms)
            first_id = info.first_id
            entries_read = group.entries_read
            if entries_read is None and delivered == "0-0":
                entries_read = 0  # the group has read nothing yet
            # All entries still in the stream are unread: whatever left the stream
            # beyond what the group read was trimmed (or deleted) unread.
            all_unread = first_id is None or stream_id(first_id) > stream_id(delivered)
            count: int | None = None
            if entries_read is not None and all_unread:
                count = info.entries_added - entries_read - info.length
            # Redis 7.0 moves max-deleted-entry-id on XDEL but not on XTRIM/MAXLEN,
            # so both signs are checked.
            if stream_id(deleted) <= stream_id(delivered) and not (count and count > 0):
                continue
            # A forget's XDEL of unread entries is no loss: its ids are noted.
            forgotten, last_forgotten = await self.groups.forgotten_after(
                self.keys.forgotten(stream.tag), delivered
            )
            if count is not None:
                count -= forgotten
            deleted_sign = stream_id(deleted) > stream_id(delivered) and deleted != last_forgotten
            if not deleted_sign and not (count and count > 0):
                continue
            self._report_trimmed(stream, count, deleted, first_id, delivered)
        for site, total in lags.items():
            if total is not None:
                LAG.labels(site).set(total)

    def _report_trimmed(
        self, stream: Stream, count: int | None, deleted: str, first_id: str | None, delivered: str
    ) -> None:
        mark = f"{deleted}/{first_id}"
        if self._reported_trim.get(stream.key) == mark:
            return
        self._reported_trim[stream.key] = mark
        if count is not None and count > 0:
            TRIMMED_UNREAD.labels(stream.site).inc(count)
        log.warning(
            "persist_entries_trimmed_unread",
            site=stream.site,
            stream=stream.key,
            count=count,
            max_deleted_entry_id=deleted,
            last_delivered_id=delivered,
            hint='on_backlog = "trim" (or the cap trimmed before the group existed): these '
            'events never reach the store; on_backlog = "reject" refuses frames instead',
        )

    async def trim(self, key: str, delivered: str, now_ms: int) -> None:
        """Trim what the group has acknowledged and is older than ``retain``.

        Below both the group's last delivered id and its oldest pending entry,
        every entry is in the store: trimming there never destroys unpersisted
        data. The server's cap (``stream_maxlen``) trims only below the same
        point while the stream has the group (``on_backlog = "reject"``). Each stream is
        judged by its own group and ids; ``now_ms`` is Redis' clock.
        """
        safe = stream_id(delivered)
        oldest = await self.groups.oldest_pending(key)
        if oldest:
            safe = min(safe, stream_id(oldest))
        cutoff = (now_ms - int(self.retain * 1000), 0)
        minid = min(safe, cutoff)
        if minid > (0, 0):
            await self.groups.trim_before(key, minid)

    async def forget_self(self, streams: Sequence[Stream]) -> None:
        """Leave the groups if this consumer holds nothing (keeps XINFO CONSUMERS short)."""
        groups = self.groups
        for stream in streams:
            try:
                consumers = await groups.consumers(stream.key)
                mine = [c for c in consumers if c.name == groups.consumer]
                if mine and mine[0].pending == 0:
                    await groups.forget(stream.key)
            except StoreUnavailable:
                continue


class Retention:
    """Deletes rows older than each site's ``retain_days``, at start and every ``interval``.

    Each statement deletes at most ``batch`` rows of one table in its own
    short transaction, then yields, so the worker's writes (same store, their
    own connection) wait for one batch at most. The store is opened at the
    first pass that needs it (a site with ``retain_days``).

    Args:
        make_sink: opens the store (a connection apart from the worker's writes).
        book: the sites and their ``retain_days``.
        interval: seconds between passes.
        now_ms: the clock (ms since the epoch; event ``time`` is compared with it).
        batch: rows per statement.
    """

    def __init__(
        self,
        make_sink: Callable[[], Sink],
        book: SitesBook,
        interval: float,
        now_ms: Callable[[], int],
        batch: int = RETAIN_BATCH,
    ) -> None:
        self.make_sink = make_sink
        self.sink: Sink | None = None
        self.book = book
        self.interval = interval
        self.now_ms = now_ms
        self.batch = batch
        #: Rows deleted by this worker, by table.
        self.deleted: dict[str, int] = {}

    async def _store(self) -> Sink:
        if self.sink is None:
            sink = self.make_sink()
            await sink.open()
            self.sink = sink
        return self.sink

    async def close(self) -> None:
        """Close the store if a pass opened it."""
        if self.sink is not None:
            sink, self.sink = self.sink, None
            await sink.close()

    async def run_once(self) -> dict[str, dict[str, int]]:
        """One pass over every site with ``retain_days``; rows deleted per site and table."""
        out: dict[str, dict[str, int]] = {}
        for site, rules in sorted(self.book.sites.items()):
            days = rules.config.retain_days
            if days is None:
                continue
            sink = await self._store()
            cutoff = self.now_ms() - int(days * DAY_MS)
            totals: dict[str, int] = {}
            while True:
                done = await retain_batch(sink, site, cutoff, self.batch)
                for table, n in done.items():
                    totals[table] = totals.get(table, 0) + n
                    self.deleted[table] = self.deleted.get(table, 0) + n
                    if n:
                        RETAINED_DELETED.labels(site, table).inc(n)
                if max(done.values(), default=0) < self.batch:
                    break
                await asyncio.sleep(0)  # let the worker's write in between
            out[site] = totals
            if any(totals.values()):
                log.info("persist_retention_deleted", site=site, cutoff=cutoff, **totals)
        RETENTION_RUNS.inc()
        return out

    async def loop(self, stopping: asyncio.Event) -> None:
        """Run a pass now and every ``interval`` until ``stopping``; failures are logged."""
        while not stopping.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                log.error("persist_retention_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval)
