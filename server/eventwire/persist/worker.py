"""The persistence worker: each site's events streams, via consumer group ``persist``, into a sink.

This module owns the Redis side of persistence: the consumer groups, the read
loop (``XREADGROUP COUNT 500 BLOCK 1000`` over all sites' streams), the ack
after each batch is committed, reclaiming entries of dead consumers
(``XAUTOCLAIM``), dead-lettering to ``{prefix}:{site}:dead``, retention
trimming, the trimming alarm, the lag gauge and picking up new sites. What a
row is, and the SQL, is :mod:`eventwire.persist.sinks`'.

A site with ``partitions = P`` above 1 has P events streams, ``{site:0}`` to
``{site:P-1}`` (PROTOCOL.md section 7). Each stream is a unit of its own here:
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
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import structlog
from prometheus_client import Counter, Gauge
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from eventwire.core.config import Settings
from eventwire.core.errors import ConfigError
from eventwire.core.rules import SitesBook
from eventwire.persist.sinks import DEFAULT_DSN, EventRow, Sink, decode_event, open_sink, to_row
from eventwire.store import (
    CLUSTER_READS,
    Keys,
    RedisClient,
    on_key_node,
    redis_client,
    redis_time_ms,
    reply_text,
    stream_id,
    xread_entries,
)

log = structlog.get_logger("eventwire.persist")

#: The consumer group every persistence worker shares.
GROUP: Final = "persist"
#: Entries per stream per read. A batch is one transaction of up to this many
#: rows per stream; larger means fewer commits (faster) but more to redo after a crash.
READ_COUNT: Final = 500
#: The most entries one read asks for over all streams: with more streams than
#: BATCH_MAX / READ_COUNT (many sites, or partitioned ones) each stream gets an
#: equal share. Bounds a batch's memory (~1 KiB per entry decoded) and transaction.
BATCH_MAX: Final = 10_000
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
LAG: Final = Gauge(
    "eventwire_persist_lag",
    "Entries of a site's events stream not yet read by the group.",
    ["site"],
)


@dataclass(frozen=True, kw_only=True)
class PersistOptions:
    """The worker's own settings (``EVENTWIRE_PERSIST_DSN``, ``_CLAIM_IDLE``, ``_MAX_DELIVERIES``).

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

    def __post_init__(self) -> None:
        if not self.claim_idle > 0:
            raise ConfigError(f"claim_idle must be above 0, got {self.claim_idle}")
        if self.max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be at least 1, got {self.max_deliveries}")
        if self.retain < 0:
            raise ConfigError(f"retain must be 0 or more, got {self.retain}")

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
Entries = Sequence[tuple[Any, Any]]
#: An entry that goes to its dead stream: its stream, id, raw event and why.
DeadEntry = tuple[Stream, str, bytes, str]


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
        self.sink: Sink = sink if sink is not None else open_sink(options.dsn)
        self.consumer = consumer or consumer_name()
        # A read blocks BLOCK_MS; the socket must wait longer than that.
        self.redis: RedisClient = redis_client(
            settings.redis_url, socket_timeout=BLOCK_MS / 1000 + 10, socket_connect_timeout=10
        )
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sites: list[str] = []
        self._streams: list[Stream] = []
        self._by_key: dict[str, Stream] = {}
        self._need_groups = False
        self._store_ok = True
        self._next_claim = 0.0
        self._next_info = 0.0
        #: The trimming alarm's last report, by stream key (each is reported once).
        self._reported_trim: dict[str, str] = {}
        #: Rows inserted by this worker (duplicates not counted).
        self.rows_written = 0
        #: Entries this worker moved to a dead stream.
        self.dead_lettered = 0

    def dead_key(self, tag: str) -> str:
        """The dead-letter stream of a site, or of one partition (``tag``, :meth:`Keys.tag`)."""
        return f"{self.keys.site_prefix(tag)}dead"

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
        await self._ensure_groups(self._streams)
        self._task = asyncio.create_task(self._run(), name=f"persist-{self.consumer}")
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
        await self._forget_self()
        await self.redis.aclose()
        await self.sink.close()
        log.info("persist_stopped", consumer=self.consumer, rows=self.rows_written)

    async def wait(self) -> None:
        """Return when the loop task ends (it ends only on stop, or raises)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    # -- the loop -----------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._step()
            except RedisError as exc:
                # redis-py wraps socket errors; a bare OSError comes from the store.
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

    async def _step(self) -> None:
        if not self._store_ok:
            await self.sink.ping()  # raises while the store is down
            self._store_ok = True
            log.info("persist_store_back")
        self._maybe_reload()
        if self._need_groups:
            await self._ensure_groups(self._streams)
            self._need_groups = False
        now = time.monotonic()
        if now >= self._next_info:
            self._next_info = now + INFO_INTERVAL
            await self._check_streams()
        if now >= self._next_claim:
            self._next_claim = now + self.options.claim_idle
            await self._claim()
        if self._stopping.is_set() or not self._streams:
            if not self._streams:
                await self._pause()
            return
        replies, error = await self._read_new()
        batch = [(self._by_key[key], entries) for key, entries in replies if key in self._by_key]
        if batch:
            await self._process(batch)
        if error is None:
            return
        if isinstance(error, ResponseError) and "NOGROUP" in str(error):
            # The stream or group was deleted under us: make them again.
            await self._ensure_groups(self._streams)
            return
        raise error

    def _read_count(self) -> int:
        """Entries asked of each stream per read (see :data:`BATCH_MAX`)."""
        return max(1, min(READ_COUNT, BATCH_MAX // max(1, len(self._streams))))

    async def _read_new(
        self,
    ) -> tuple[list[tuple[str, list[tuple[Any, Any]]]], BaseException | None]:
        """XREADGROUP of new entries of every stream, waiting up to BLOCK_MS.

        A cluster cannot read keys of several slots in one call: each stream
        is read on its own (see :meth:`_read_cluster`).

        Returns:
            The entries by stream key, and the first read's error (None if
            every read answered): entries that did come are processed
            before the error is raised.
        """
        count = self._read_count()
        keys = [s.key for s in self._streams]
        if not isinstance(self.redis, RedisCluster):
            streams: dict[Any, Any] = dict.fromkeys(keys, ">")
            try:
                reply = await self.redis.xreadgroup(
                    GROUP, self.consumer, streams, count=count, block=BLOCK_MS
                )
            except RedisError as exc:
                return [], exc
            return xread_entries(reply), None
        cluster = self.redis
        # Concurrent commands must not meet an uninitialised cluster client
        # (after a failover it is again): redis-py 8's first commands look up
        # keys and policies before initialising, which closes connections
        # they use. A no-op once initialised.
        try:
            await cluster.initialize()
        except RedisError as exc:
            return [], exc
        # A pass that does not block first: a busy stream must not wait for
        # idle ones' blocks. Only when every stream is idle do reads block.
        out, error = await self._read_cluster(cluster, keys, count, None)
        if error is None and not any(entries for _, entries in out):
            share = max(1, BLOCK_MS * CLUSTER_READS // len(keys))
            out, error = await self._read_cluster(cluster, keys, count, min(BLOCK_MS, share))
        return out, error

    async def _read_cluster(
        self, cluster: RedisCluster, keys: Sequence[str], count: int, block: int | None
    ) -> tuple[list[tuple[str, list[tuple[Any, Any]]]], BaseException | None]:
        """One XREADGROUP per stream on its node, up to ``store.CLUSTER_READS`` at once,
        each waited for (a cluster cannot read keys of several slots in one call).

        A read cancelled after Redis delivered would leave its entries pending
        until the next reclaim, so none is cancelled. ``block`` is each
        read's wait (None: none); with more streams than CLUSTER_READS the
        caller gives each a share of BLOCK_MS, so an idle pass over all of
        them still takes about BLOCK_MS. Once entries have come, the reads
        not yet sent do not block.
        """
        gate = asyncio.Semaphore(CLUSTER_READS)
        found = False

        async def read(key: str) -> list[tuple[str, list[tuple[Any, Any]]]]:
            nonlocal found
            wait = () if found or block is None else ("BLOCK", block)
            async with gate:
                reply = await on_key_node(
                    cluster, key, "XREADGROUP", "GROUP", GROUP, self.consumer,
                    "COUNT", count, *wait, "STREAMS", key, ">",
                )  # fmt: skip
            pairs = xread_entries(reply)
            if any(entries for _, entries in pairs):
                found = True
            return pairs

        results = await asyncio.gather(*(read(k) for k in keys), return_exceptions=True)
        out: list[tuple[str, list[tuple[Any, Any]]]] = []
        error: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                error = error or result
            else:
                out += result
        return out, error

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

    async def _ensure_groups(self, streams: Sequence[Stream]) -> None:
        for stream in streams:
            try:
                await self.redis.xgroup_create(stream.key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

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
        rows: list[EventRow] = []
        ids: dict[str, list[str]] = {}  # stream key -> ids of rows
        sources: list[tuple[Stream, str, bytes]] = []  # stream, id, raw of each row
        dead: list[DeadEntry] = []
        for stream, entries in batch:
            for raw_id, fields in entries:
                entry_id = reply_text(raw_id)
                raw = fields.get(b"event") if fields else None
                if raw is None:
                    dead.append((stream, entry_id, b"", "entry has no event field"))
                    continue
                times = deliveries.get((stream.key, entry_id), 0) if deliveries else 0
                if times > self.options.max_deliveries:
                    why = f"delivered {times} times without being written"
                    dead.append((stream, entry_id, raw, why))
                    continue
                try:
                    rows.append(to_row(stream.site, decode_event(raw)))
                except ValueError as exc:
                    dead.append((stream, entry_id, raw, str(exc)))
                    continue
                ids.setdefault(stream.key, []).append(entry_id)
                sources.append((stream, entry_id, raw))
        if dead:
            await self._dead_letter(dead)
        if not rows:
            return
        try:
            written = await self.sink.write(rows)
        except Exception as exc:
            # A store that does not answer: raise, the batch stays pending.
            await self.sink.ping()
            # One bad row fails the whole transaction: find it by writing one at a time.
            log.warning("persist_batch_failed", error=repr(exc), rows=len(rows))
            await self._write_one_by_one(rows, sources)
            return
        await self._ack(ids)
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
            await self._ack({stream.key: [entry_id]})
            self._count([row], written)
        if not failed:
            return
        # If the store answers, the failures are the entries' fault: retry them
        # (they stay pending) until they reach max_deliveries. If it does not,
        # this raises and the loop pauses; the entries stay pending either way.
        await self.sink.ping()
        counts = await self._deliveries(failed)
        dead = [f for f in failed if counts.get((f[0].key, f[1]), 0) >= self.options.max_deliveries]
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
            await self._dead_letter(dead)

    async def _deliveries(self, entries: Sequence[DeadEntry]) -> dict[tuple[str, str], int]:
        """The delivery count of each entry (XPENDING), by (stream key, id)."""
        out: dict[tuple[str, str], int] = {}
        for stream, entry_id, _raw, _why in entries:
            found = await self.redis.xpending_range(
                stream.key, GROUP, min=entry_id, max=entry_id, count=1
            )
            for item in found:
                out[stream.key, reply_text(item["message_id"])] = int(item["times_delivered"])
        return out

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

    async def _ack(self, ids: Mapping[str, Sequence[str]]) -> None:
        """XACK entries, by stream key."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, stream_ids in ids.items():
                pipe.xack(key, GROUP, *stream_ids)
            await pipe.execute()

    async def _dead_letter(self, dead: Sequence[DeadEntry]) -> None:
        """XADD each to its stream's dead stream and XACK it, atomically per entry.

        The dead stream shares the events stream's tag (a partition's entries go
        to that partition's dead stream), so both commands run in one MULTI on
        a cluster too. It is not trimmed: entries land there only when something
        is wrong, and an operator must see all of them (and delete them when done).
        """
        for stream, entry_id, raw, why in dead:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_key(stream.tag), {"event": raw, "error": why, "id": entry_id})
                pipe.xack(stream.key, GROUP, entry_id)
                await pipe.execute()
            DEAD_LETTERED.labels(stream.site).inc()
            self.dead_lettered += 1
            log.warning(
                "persist_dead_lettered", site=stream.site, stream=stream.key, id=entry_id, error=why
            )

    # -- crash safety -------------------------------------------------------

    async def _claim(self) -> None:
        """Take over entries idle longer than ``claim_idle`` (dead consumers') and process them."""
        idle_ms = int(self.options.claim_idle * 1000)
        count = self._read_count()
        for stream in self._streams:
            cursor = "0-0"
            while not self._stopping.is_set():
                reply = await self.redis.xautoclaim(
                    stream.key, GROUP, self.consumer, idle_ms, start_id=cursor, count=count
                )
                cursor = reply_text(reply[0])
                entries = [(i, f) for i, f in reply[1] if f]
                deleted = reply[2] if len(reply) > 2 else []
                if deleted:
                    # Trimmed while pending: XAUTOCLAIM already removed them from the PEL.
                    log.warning(
                        "persist_pending_trimmed",
                        site=stream.site,
                        stream=stream.key,
                        count=len(deleted),
                    )
                    TRIMMED_UNREAD.labels(stream.site).inc(len(deleted))
                if entries:
                    RECLAIMED.inc(len(entries))
                    log.info(
                        "persist_reclaimed", site=stream.site, stream=stream.key, count=len(entries)
                    )
                    first, last = reply_text(entries[0][0]), reply_text(entries[-1][0])
                    pending = await self.redis.xpending_range(
                        stream.key,
                        GROUP,
                        min=first,
                        max=last,
                        count=len(entries),
                        consumername=self.consumer,
                    )
                    counts = {
                        (stream.key, reply_text(p["message_id"])): int(p["times_delivered"])
                        for p in pending
                    }
                    await self._process([(stream, entries)], deliveries=counts)
                if cursor == "0-0":
                    break

    async def _check_streams(self) -> None:
        """Refresh the lag gauge; warn when entries were trimmed before the group read them.

        Also trims each stream to what is stored and older than ``retain``
        (:meth:`_trim`). The gauge is a site's lag summed over its streams, set
        only when Redis tells every one of them.
        """
        now_ms = await redis_time_ms(self.redis)
        lags: dict[str, int | None] = {}
        for stream in self._streams:
            try:
                info = await self.redis.xinfo_stream(stream.key)
                groups = await self.redis.xinfo_groups(stream.key)
            except ResponseError:
                continue  # no such stream (yet)
            group = next((g for g in groups if reply_text(g["name"]) == GROUP), None)
            if group is None:
                lags[stream.site] = None
                continue
            lag, known = group.get("lag"), lags.get(stream.site, 0)
            lags[stream.site] = None if lag is None or known is None else known + int(lag)
            deleted = reply_text(info.get("max-deleted-entry-id", "0-0"))
            delivered = reply_text(group.get("last-delivered-id", "0-0"))
            await self._trim(stream.key, delivered, now_ms)
            first = info.get("first-entry")
            first_id = reply_text(first[0]) if first else None
            entries_read = group.get("entries-read")
            if entries_read is None and delivered == "0-0":
                entries_read = 0  # the group has read nothing yet
            # All entries still in the stream are unread: whatever left the stream
            # beyond what the group read was trimmed (or deleted) unread.
            all_unread = first_id is None or stream_id(first_id) > stream_id(delivered)
            count: int | None = None
            if entries_read is not None and all_unread:
                count = int(info["entries-added"]) - int(entries_read) - int(info["length"])
            # Redis 7.0 moves max-deleted-entry-id on XDEL but not on XTRIM/MAXLEN,
            # so both signs are checked.
            if stream_id(deleted) <= stream_id(delivered) and not (count and count > 0):
                continue
            mark = f"{deleted}/{first_id}"
            if self._reported_trim.get(stream.key) == mark:
                continue
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
                hint="raise stream_maxlen or add persist workers: these events never reach "
                "the store",
            )
        for site, total in lags.items():
            if total is not None:
                LAG.labels(site).set(total)

    async def _trim(self, stream: str, delivered: str, now_ms: int) -> None:
        """Trim what the group has acknowledged and is older than ``retain``.

        Below both the group's last delivered id and its oldest pending entry,
        every entry is in the store: trimming there never destroys unpersisted
        data. The server's ``MAXLEN ~`` stays as the safety cap. Each stream is
        judged by its own group and ids; ``now_ms`` is Redis' clock.
        """
        safe = stream_id(delivered)
        summary = await self.redis.xpending(stream, GROUP)
        oldest = summary.get("min")
        if oldest:
            safe = min(safe, stream_id(reply_text(oldest)))
        cutoff = (now_ms - int(self.options.retain * 1000), 0)
        minid = min(safe, cutoff)
        if minid > (0, 0):
            await self.redis.xtrim(stream, minid=f"{minid[0]}-{minid[1]}", approximate=True)

    async def _forget_self(self) -> None:
        """Leave the groups if this consumer holds nothing (keeps XINFO CONSUMERS short)."""
        for stream in self._streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream.key, GROUP)
                mine = [c for c in consumers if reply_text(c["name"]) == self.consumer]
                if mine and int(mine[0]["pending"]) == 0:
                    await self.redis.xgroup_delconsumer(stream.key, GROUP, self.consumer)
            except (RedisError, OSError):
                continue
