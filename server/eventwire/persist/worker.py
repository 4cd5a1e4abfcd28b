"""The persistence worker: each site's events streams, via consumer group ``persist``, into a sink.

This module owns the read loop (``XREADGROUP COUNT 2000 BLOCK 1000`` over all
sites' streams), writing each batch in one transaction, the ack after it is
committed, and picking up new sites. The loop is pipelined: while one batch
is written (and then acked) the next is read and decoded, so Redis and the
store work at the same time; a read with a write in flight does not block.
Reclaiming entries of dead consumers,
dead-lettering to ``{prefix}:{site}:dead``, retention trimming, the trimming
alarm and the lag gauge are :mod:`eventwire.persist.upkeep`'s; what a row is,
and the SQL, is :mod:`eventwire.persist.sinks`'; every Redis call is
:class:`eventwire.store.ConsumerGroup`'s.

A site with ``partitions = P`` above 1 has P events streams, ``{site:0}`` to
``{site:P-1}`` (docs/protocol.md section 7). Each stream is a unit of its own here:
it has its own ``persist`` group, its entries are acked, reclaimed and
trimmed by their own stream's ids (ids of different streams are independent
and may be equal), and its dead letters go to its own tag's dead stream
(``{prefix}:{site:p}:dead``), which a MULTI with the XACK needs. Rows and
metrics carry the site, never the partition; the lag gauge is the site's sum.

Delivery: an entry is XACKed only after the transaction holding its row has
committed, so a crash at any point redelivers it (to another worker, after
``claim_idle``) and the store's ``ON CONFLICT DO NOTHING`` makes the second
write a no-op: every entry ends up as exactly one row, or in the dead stream.
The worker trims a stream only below what its group has acknowledged (so
only entries already stored), and only past ``persist_retain``. A row's
identity is the event's (site, producer, seq), never the stream entry id, so
equal ids in two partitions never collide in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
from prometheus_client import Counter

from eventwire.core.config import Settings
from eventwire.core.errors import ConfigError, StoreUnavailable
from eventwire.core.rules import SitesBook
from eventwire.persist.sinks import (
    DEFAULT_DSN,
    EventRow,
    PostgresSink,
    Sink,
    SqliteSink,
    decode_row,
    decode_rows,
    open_sink,
    pack_rows,
)
from eventwire.persist.upkeep import DeadEntry, Entries, Retention, Stream, Upkeep, streams_of
from eventwire.store import ConsumerGroup, GroupMissing, Keys, ReadEntries, StreamEntry

__all__ = ["GROUP", "PersistOptions", "Stream", "Worker", "consumer_name", "streams_of"]

log = structlog.get_logger("eventwire.persist")

#: The consumer group every persistence worker shares (:attr:`Keys.PERSIST_GROUP`).
GROUP: Final = Keys.PERSIST_GROUP
#: Entries per stream per read (:attr:`PersistOptions.read_count`). A batch is one
#: transaction of up to this many rows per stream; larger means fewer commits
#: (faster) but more to redo after a crash. 20000: with client times spread over
#: seconds, as they are (scripts/bench --pipeline's realistic row), a SQLite
#: commit writes every index page a batch touched, and most rows touch a page of
#: their own: the sink alone wrote 22,000 rows/s at 5000 a batch, 36,000 at
#: 10000, 42,000-45,000 at 20000 (with client times in order, 10000 was no
#: better than 5000).
READ_COUNT: Final = 20_000
#: The most entries one read asks for over all streams: with more streams than
#: BATCH_MAX / read_count (many sites, or partitioned ones) each stream gets an
#: equal share. Bounds a batch's memory (~1 KiB per entry decoded) and transaction.
BATCH_MAX: Final = 2 * READ_COUNT
#: How long one read waits for new entries (ms); also the longest a stop waits for it.
BLOCK_MS: Final = 1000
#: How often the lag gauge, the trimming alarm and retention trimming run: per
#: stream two XINFO calls, one XPENDING and one XTRIM.
INFO_INTERVAL: Final = 5.0
#: How long the loop waits after a Redis or store failure before trying again.
RETRY_DELAY: Final = 1.0

ROWS_WRITTEN: Final = Counter(
    "eventwire_persist_rows_written", "Event rows inserted (duplicates not counted).", ["site"]
)
BATCHES: Final = Counter("eventwire_persist_batches", "Batches committed and acked.")


@dataclass(slots=True)
class _Prepared:
    """A batch decoded: its rows, their entry ids by stream key (bytes, as the ack
    sends them; in row order, stream by stream), the entries they came from, and
    what goes to the dead stream."""

    rows: list[EventRow] = field(default_factory=list)
    ids: dict[str, Sequence[bytes]] = field(default_factory=dict)
    sources: list[tuple[Stream, Entries]] = field(default_factory=list)
    dead: list[DeadEntry] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PersistOptions:
    """The worker's own settings (``EVENTWIRE_PERSIST_DSN``, ``_CLAIM_IDLE``, ``_MAX_DELIVERIES``,
    ``_PERSIST_PG_WRITERS``).

    Attributes:
        dsn: the store; SQLite file (default ``data/events.db``) or ``postgresql://``.
        claim_idle: seconds an entry may sit unacked with a consumer before another
            worker takes it over; also how often each worker looks. Lower means a
            crashed worker's batch is redone sooner, but a batch that takes longer
            than this to write is taken over (and written twice, harmlessly).
        max_deliveries: deliveries after which an entry that still fails goes to the
            dead stream. Higher means more retries of a poisoned entry (each one
            ``claim_idle`` later).
    """

    dsn: str = DEFAULT_DSN
    claim_idle: float = 60.0
    max_deliveries: int = 5
    #: Seconds of persisted events kept in each stream for live readers (dashboard
    #: resume, ``tail --since``); older ones that the group has acknowledged are
    #: trimmed. Costs ~0.5 KiB of Redis memory per event kept.
    retain: float = 3600.0
    #: PostgreSQL connections the worker writes batches on at once, one batch
    #: each (it keeps that many in flight); each is a backend in PostgreSQL.
    #: SQLite ignores it.
    pg_writers: int = PostgresSink.WRITERS
    #: Entries asked of each stream per read, so the most rows a transaction holds
    #: per stream (:data:`READ_COUNT`; a smaller one only in tests).
    read_count: int = READ_COUNT

    def __post_init__(self) -> None:
        if not self.claim_idle > 0:
            raise ConfigError(f"claim_idle must be above 0, got {self.claim_idle}")
        if self.max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be at least 1, got {self.max_deliveries}")
        if self.retain < 0:
            raise ConfigError(f"retain must be 0 or more, got {self.retain}")
        if self.pg_writers < 1:
            raise ConfigError(f"pg_writers must be at least 1, got {self.pg_writers}")
        if not 1 <= self.read_count <= READ_COUNT:
            raise ConfigError(f"read_count must be 1 to {READ_COUNT}, got {self.read_count}")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        dsn: str | None = None,
        claim_idle: float | None = None,
        max_deliveries: int | None = None,
    ) -> PersistOptions:
        """Options from flags (given), else the settings (file, ``EVENTWIRE_*``, defaults)."""
        return cls(
            dsn=dsn or settings.persist_dsn,
            claim_idle=claim_idle if claim_idle is not None else settings.claim_idle,
            max_deliveries=max_deliveries
            if max_deliveries is not None
            else settings.max_deliveries,
            retain=settings.persist_retain,
            pg_writers=settings.persist_pg_writers,
        )


def consumer_name() -> str:
    """A consumer name unique to this worker: hostname-pid-random."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class Worker:
    """One persistence worker: ``await start()``, later ``await stop()`` (finishes its batch).

    Args:
        settings: ``redis_url`` and ``key_prefix`` are used.
        book: the sites; re-read when the file's modification time changes.
        options: store, reclaim and dead-letter settings.
        sink: a sink to use instead of opening ``options.dsn`` (tests); the worker
            opens and closes it either way.
        consumer: the consumer name (default: hostname-pid-random).
    """

    def __init__(
        self,
        settings: Settings,
        book: SitesBook,
        options: PersistOptions,
        sink: Sink | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.book = book
        self.options = options
        self.keys = Keys(settings.key_prefix)
        self.sink: Sink = sink if sink is not None else open_sink(options.dsn, options.pg_writers)
        self.consumer = consumer or consumer_name()
        #: Every Redis call of the worker (its own client).
        self.groups = ConsumerGroup(settings.redis_url, self.consumer, BLOCK_MS, GROUP)
        self.upkeep = Upkeep(self.groups, self.keys, options.max_deliveries, options.retain)
        #: Deletes rows past each site's retain_days (its own store connection).
        self.retention = Retention(
            lambda: open_sink(options.dsn),
            book,
            settings.retain_interval,
            lambda: time.time_ns() // 1_000_000,
        )
        self._retention_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sites: list[str] = []
        self._streams: list[Stream] = []
        self._by_key: dict[str, Stream] = {}
        self._need_groups = False
        self._store_ok = True
        self._next_claim = 0.0
        self._next_info = 0.0
        #: The writes (then acks) of the batches before, running while the next is read:
        #: as many as the sink writes at once (its ``writers``, else one), oldest first.
        self._inflight: list[asyncio.Task[None]] = []
        self._depth = max(1, int(getattr(self.sink, "writers", 1)))
        #: A batch read while the write before it failed: processed first once the store is back.
        self._carry: Sequence[tuple[Stream, Entries]] = ()
        #: Rows inserted by this worker (duplicates not counted).
        self.rows_written = 0

    @property
    def dead_lettered(self) -> int:
        """Entries this worker moved to a dead stream."""
        return self.upkeep.dead_lettered

    def _layout(self) -> list[Stream]:
        """The streams of the book's sites, every partition of each."""
        return streams_of(
            self.keys, {site: rules.config.partitions for site, rules in self.book.sites.items()}
        )

    def _use(self, streams: list[Stream]) -> None:
        self._streams = streams
        self._by_key = {s.key: s for s in streams}
        self._sites = sorted({s.site for s in streams})

    async def start(self) -> None:
        """Open the store, create missing groups, start the loop task.

        Raises:
            Exception: the store or Redis cannot be reached at start.
        """
        await self.sink.open()
        self._use(self._layout())
        await self._ensure_groups()
        self._task = asyncio.create_task(self._run(), name=f"persist-{self.consumer}")
        self._retention_task = asyncio.create_task(
            self.retention.loop(self._stopping), name=f"persist-retention-{self.consumer}"
        )
        log.info(
            "persist_started", consumer=self.consumer, sites=self._sites, streams=len(self._streams)
        )

    def stop_soon(self) -> None:
        """Ask the loop to stop after the batch in hand (for signal handlers)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Finish and ack the batch in hand, then close Redis and the store."""
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self._retention_task is not None:
            retention, self._retention_task = self._retention_task, None
            await retention
        await self.retention.close()
        await self.upkeep.forget_self(self._streams)
        await self.groups.aclose()
        await self.sink.close()
        log.info("persist_stopped", consumer=self.consumer, rows=self.rows_written)

    async def wait(self) -> None:
        """Return when the loop task ends (it ends only on stop, or raises)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    # -- the loop -----------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            # Stopping: the batch in hand is written and acked (or stays pending).
            with contextlib.suppress(Exception):
                await self._drain()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._step()
            except StoreUnavailable as exc:
                # Redis failed: ConsumerGroup raises nothing else for it, so
                # any other exception below is the store's.
                log.warning("persist_redis_failed", error=str(exc))
                await self._pause()
            except Exception as exc:
                # The batch stays pending; it is redone here or by another worker.
                # Until the store answers again, nothing is read or reclaimed:
                # every reclaim counts a delivery, and an outage must not push
                # good entries to the dead stream.
                log.error("persist_store_failed", error=repr(exc))
                self._store_ok = False
                await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), RETRY_DELAY)

    async def _drain(self, keep: int = 0) -> None:
        """Wait for the writes and acks in flight, oldest first, until ``keep`` are left;
        a failure is raised here."""
        while len(self._inflight) > keep:
            await self._inflight.pop(0)

    async def _step(self) -> None:
        if not self._store_ok:
            await self.sink.ping()  # raises while the store is down
            self._store_ok = True
            log.info("persist_store_back")
        if self._carry:
            carried, self._carry = self._carry, ()
            await self._process(carried)
        self._maybe_reload()
        if self._need_groups:
            await self._drain()
            await self._ensure_groups()
            self._need_groups = False
        now = time.monotonic()
        if now >= self._next_info:
            self._next_info = now + INFO_INTERVAL
            await self._drain()
            await self._check_streams()
        if now >= self._next_claim:
            self._next_claim = now + self.options.claim_idle
            await self._drain()
            await self.upkeep.claim(
                self._streams,
                int(self.options.claim_idle * 1000),
                self._read_count(),
                self._process,
                self._stopping,
            )
        if self._stopping.is_set() or not self._streams:
            if not self._streams:
                await self._pause()
            return
        # Pipelined: this read runs while the batches before are written and acked.
        # With a write in flight the read does not block, so an idle stream
        # never holds back the ack of the batch before.
        delivered, error = await self.groups.read_new(
            [s.key for s in self._streams], self._read_count(), block=not self._inflight
        )
        batch = [(self._by_key[key], entries) for key, entries in delivered if key in self._by_key]
        # Decoded while the batch before is still being written: the store's
        # thread and this loop work at the same time.
        prepared = self._prepare(batch) if batch else None
        try:
            # A sink that writes several batches at once (PostgreSQL) gets the
            # next one while the one before is still being written.
            await self._drain(keep=self._depth - 1 if prepared is not None else 0)
        except BaseException:
            self._carry = batch  # read, never written: written first when the store is back
            raise
        if prepared is not None:
            self._inflight.append(asyncio.create_task(self._commit(prepared)))
        if error is None:
            return
        await self._drain()
        if isinstance(error, GroupMissing):
            # The stream or group was deleted under us: make them again.
            await self._ensure_groups()
            return
        raise error

    async def _check_streams(self) -> None:
        """The lag gauge, the trimming alarm and retention trimming, now (see :class:`Upkeep`)."""
        await self.upkeep.check_streams(self._streams)

    def _read_count(self) -> int:
        """Entries asked of each stream per read (see :data:`BATCH_MAX`)."""
        return max(1, min(self.options.read_count, BATCH_MAX // max(1, len(self._streams))))

    def _maybe_reload(self) -> None:
        if not self.book.changed():
            return
        try:
            sites = self.book.reload()
        except ConfigError as exc:
            log.error("persist_sites_reload_failed", error=str(exc))
            return
        new = streams_of(self.keys, {s: r.config.partitions for s, r in sites.items()})
        if new != self._streams:
            self._use(new)
            log.info("persist_sites_changed", sites=self._sites, streams=len(new))
            self._need_groups = True  # created at the next step: that needs Redis

    async def _ensure_groups(self) -> None:
        await self.groups.create([s.key for s in self._streams])

    # -- batches ------------------------------------------------------------

    async def _process(
        self,
        batch: Sequence[tuple[Stream, Entries]],
        deliveries: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        """Write a batch in one transaction, then ack it; dead-letter what cannot be written.

        Args:
            batch: entries by stream.
            deliveries: times each entry was delivered, by (stream key, id), for
                reclaimed entries: past ``max_deliveries`` they go to the dead stream.
        """
        await self._commit(self._prepare(batch, deliveries))

    def _prepare(
        self,
        batch: Sequence[tuple[Stream, Entries]],
        deliveries: Mapping[tuple[str, str], int] | None = None,
    ) -> _Prepared:
        """Decode a batch into rows (each stream's entries in one decoder call when
        all are good, else one by one) and the entries that go to the dead stream."""
        prepared = _Prepared()
        for stream, entries in batch:
            # A read's entries come as their ids and events (ReadEntries): no
            # StreamEntry is made on the way to the row and the ack.
            if isinstance(entries, ReadEntries):
                raws, ids = entries.events, entries.ids
            else:
                raws = [raw for _, raw in entries]
                ids = [entry_id.encode() for entry_id, _ in entries]
            rows = None
            if not deliveries and None not in raws:
                rows = decode_rows(stream.site, raws)  # type: ignore[arg-type]
            if rows is not None:
                prepared.rows += rows
                prepared.ids[stream.key] = ids
                prepared.sources.append((stream, entries))
                continue
            good: list[StreamEntry] = []
            for entry_id, raw in entries:
                if raw is None:
                    prepared.dead.append((stream, entry_id, b"", "entry has no event field"))
                    continue
                times = deliveries.get((stream.key, entry_id), 0) if deliveries else 0
                if times > self.options.max_deliveries:
                    why = f"delivered {times} times without being written"
                    prepared.dead.append((stream, entry_id, raw, why))
                    continue
                try:
                    prepared.rows.append(decode_row(stream.site, raw))
                except ValueError as exc:
                    prepared.dead.append((stream, entry_id, raw, str(exc)))
                    continue
                good.append(StreamEntry(entry_id, raw))
            if good:
                prepared.ids[stream.key] = [entry_id.encode() for entry_id, _ in good]
                prepared.sources.append((stream, good))
        # What the SQLite sink's thread would compute from the rows, computed here
        # (while the batch before is written): that thread then holds the GIL for less.
        if prepared.rows and isinstance(self.sink, SqliteSink):
            prepared.rows = pack_rows(prepared.rows)
        return prepared

    async def _commit(self, prepared: _Prepared) -> None:
        """Dead-letter, then write the rows in one transaction and ack them."""
        if prepared.dead:
            await self.upkeep.dead_letter(prepared.dead)
        rows = prepared.rows
        if not rows:
            return
        try:
            written = await self.sink.write(rows)
        except Exception as exc:
            # A store that does not answer: raise, the batch stays pending.
            await self.sink.ping()
            # One bad row fails the whole transaction: find it by writing one at a time.
            log.warning("persist_batch_failed", error=repr(exc), rows=len(rows))
            sources = [
                (stream, entry_id, raw or b"")
                for stream, entries in prepared.sources
                for entry_id, raw in entries
            ]
            await self._write_one_by_one(rows, sources)
            return
        await self.groups.ack(prepared.ids)
        self._count(rows, written)

    async def _write_one_by_one(
        self,
        rows: Sequence[EventRow],
        sources: Sequence[tuple[Stream, str, bytes]],
    ) -> None:
        failed: list[DeadEntry] = []
        for (stream, entry_id, raw), row in zip(sources, rows, strict=True):
            try:
                written = await self.sink.write([row])
            except Exception as exc:
                failed.append((stream, entry_id, raw, repr(exc)))
                continue
            await self.groups.ack({stream.key: [entry_id.encode()]})
            self._count([row], written)
        if not failed:
            return
        # If the store answers, the failures are the entries' fault: retry them
        # (they stay pending) until they reach max_deliveries. If it does not,
        # this raises and the loop pauses; the entries stay pending either way.
        await self.sink.ping()
        await self.upkeep.settle_failed(failed)

    def _count(self, rows: Sequence[EventRow], written: int) -> None:
        self.rows_written += written
        BATCHES.inc()
        sites = {r.site for r in rows}
        if len(sites) == 1:
            ROWS_WRITTEN.labels(next(iter(sites))).inc(written)
        else:
            # The store reports one count per transaction; attribute it by share.
            for site in sites:
                share = sum(1 for r in rows if r.site == site)
                ROWS_WRITTEN.labels(site).inc(written * share / len(rows))
