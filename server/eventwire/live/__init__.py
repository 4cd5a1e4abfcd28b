"""The live relay: ``WS /v1/live`` on the admin listener streams a site's events from Redis.

This module owns the relay: its query, its messages, the per-viewer queue
and the fan-out from one Redis reader per (site, stream) per process.

URL: ``/v1/live?site=S[&stream=events|rejected][&action=GLOB][&uuid=U][&since=...]``.
``action`` is a glob over the action name matched in full (events only),
``uuid`` one customer, ``since`` where to start: ``now`` (the default), a
duration back on Redis' clock (``30s``, ``5m``, ``2h``), ``0`` (the start of
the stream), a stream id (entries after it), or a *cursor*: the position a
reconnecting viewer was at (see Partitions; with one partition a cursor is
one stream id, the id of the last message it saw).

Messages are JSON text frames with a ``type``; each carries ``id``, which a
viewer keeps to pass back as ``since`` and resume right after it:

- ``hello`` ``{site, stream, id, now, queue}``: ``id`` is the resolved start,
  ``now`` Redis' clock (ms; the clock of stream ids), ``queue`` the viewer's
  queue bound.
- ``event`` / ``rejected`` ``{id, event}``: one entry of the events or
  rejected stream, ``event`` being the stored JSON as it is
  (PROTOCOL.md section 7).
- ``trimmed`` ``{from, first, id}``: the stream no longer holds ``from``;
  entries between it and ``first`` (the oldest one left) may have been
  trimmed (``stream_maxlen``, ``persist_retain``) and are not sent.
- ``ready`` ``{id}``: the backlog after ``since`` is sent; live events follow.
- ``lagged`` ``{missed, first, id}``: the viewer did not read fast enough;
  ``missed`` matching events, ``first`` to ``id``, were dropped for it.

Fan-out: the first viewer of a (site, stream) starts a reader task (its own
Redis connection, ``XREAD BLOCK``, ``live_batch`` entries a read); the last
one to leave stops it. The reader decodes and encodes each entry once and
hands the same frame to every viewer's queue. A queue holds at most
``live_queue`` events: a viewer whose socket is full gets no more until it
drains, then one ``lagged`` notice with the count of what it missed.

Handover without a gap or a duplicate: a viewer with ``since`` replays the
backlog itself with ``XRANGE`` pages of ``live_batch`` (each page read in one
``MULTI`` with ``XINFO STREAM``, to tell a trimmed position). When a page
comes back short it joins the reader, whose position ``R`` is the last id it
has handed out. If ``R`` is ahead of the viewer's position ``V``, the viewer
replays ``(V, R]`` as well (the reader's next batch starts after ``R`` and
already lands in the viewer's queue); if ``R`` is behind, the viewer drops
the queued entries up to ``V``. Both checks are synchronous with the join,
so nothing the reader hands out in between is lost.

Partitions. A site with ``partitions = P`` above 1 keeps each stream as P
streams, ``ew:{site:0}:events`` to ``ew:{site:P-1}:events``; a customer's
entries all lie in one of them, in order. Their ids are independent (each
stream numbers its own; on a cluster they come from different machines'
clocks), so everything above holds per partition, and the relay follows all
of them at once:

- Position: a viewer's position is one id per partition. On the wire it is a
  *cursor*: the P ids in partition order joined by ``,``
  (``1764160000123-0,1764160000087-2,...``). With P = 1 the cursor is the one
  id, and the wire is exactly the one above: no field is added.
- ``since``: ``now`` starts at every partition's end; ``0``, a duration or
  one stream id is the same id in every partition, a cut in time on Redis'
  clock (one clock on one Redis; each node's own on a cluster); a cursor of
  exactly P ids starts at each. A cursor of another length is refused (400).
- Messages: ``hello`` adds ``partitions: P``; ``hello`` and ``ready`` carry
  the whole cursor in ``id``. ``event``, ``rejected``, ``trimmed`` and
  ``lagged`` add ``p``, the partition they concern, and their ``id`` (and
  ``from``, ``first``) are ids of that partition's stream. A viewer resumes
  by one rule: a message with ``p`` moves partition ``p``'s id to its
  ``id``; a message without ``p`` (hello, ready; every message when P = 1)
  sets the whole cursor to its ``id``. The cursor so kept, passed back as
  ``since``, gives no gap and no duplicate, as one id does for P = 1.
- Order: each read of the reader, and each step of a replay, takes entries
  from every partition and hands them out merged by id (ties by partition).
  Across reads there is no total order (``COUNT`` cuts each partition on its
  own, and cluster nodes' clocks differ), but one customer is in one
  partition, read in order: a customer's entries reach a viewer in order.
- Reads: a read takes at most ``live_batch // P`` entries (at least one) of
  each partition, so it hands out no more than ``live_batch`` (P if
  ``live_batch`` is smaller), the bound the viewer queues are set against.
  On one Redis all partitions are one ``XREAD``; on a cluster each key is
  read on its own node (:class:`eventwire.store.StreamsReader`). Page reads (a
  replay; a reader behind or back from a failure) read each partition in its
  own ``MULTI``.
- ``lagged`` and ``trimmed`` are counted per partition: a gap gives one
  ``lagged`` notice for each partition that lost entries, all of them before
  the next entry queued after the gap, each counting exactly the entries of
  its partition that were dropped; ``trimmed`` names the one partition whose
  position was trimmed. A viewer's queue holds at most ``live_queue`` events
  plus the notices of one gap (at most P + 1).
"""

from __future__ import annotations

import asyncio
import fnmatch
import heapq
import re
import socket
from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Final, Literal
from urllib.parse import parse_qsl

import msgspec
import structlog
from msgspec import Struct
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from eventwire import metrics
from eventwire.core.positions import start_id
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

StreamName = Literal["events", "rejected"]
STREAMS: Final = ("events", "rejected")

#: How long one XREAD of a reader blocks (ms). Stopping a reader cancels the
#: read, so this only bounds how long a reader holds a dead connection.
READ_BLOCK_MS: Final = 1000
#: A reader's pause after Redis failed: first and longest (s).
RETRY_FIRST: Final = 0.2
RETRY_MAX: Final = 2.0
#: Frames written to a viewer's socket before waiting for it to drain: at most
#: this many frames (each one stored event, up to ``max_event_bytes``) sit in
#: the socket's buffer above its 32 KiB limit.
SEND_CHUNK: Final = 64
#: Kernel send buffer of a viewer's socket (Linux doubles it). Autotuning would
#: let it grow to megabytes for a viewer that does not read; this bounds the
#: kernel memory a viewer holds, and caps one viewer's throughput at about this
#: much per round trip (256 KiB over 50 ms: ~5 MB/s, ~10,000 events/s).
VIEWER_SEND_BUFFER: Final = 256 * 1024
#: The largest stream id part (Redis' unsigned 64-bit counters).
MAX_ID_PART: Final = 2**64 - 1
#: Close code and reason for a viewer refused after the handshake.
TRY_AGAIN_LATER: Final = 1013
#: What joins a cursor's ids (one per partition).
CURSOR_SEP: Final = ","

_GLOB_RE: Final = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
_UUID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_ID_RE: Final = re.compile(r"\d{1,20}(-\d{1,20})?")
_QUERY_KEYS: Final = frozenset({"site", "stream", "action", "uuid", "since"})
#: Redis away, or an error answer: a reader retries, a viewer is told to come back later.
_REDIS_ERRORS: Final = (*OUTAGE, RedisError)


# ---- messages ------------------------------------------------------------------
#
# ``omit_defaults``: the fields partitions add (``partitions``, ``p``) are left
# out at their defaults, so a site of one partition keeps the wire it had.


class Hello(Struct, tag="hello", tag_field="type", kw_only=True, omit_defaults=True):
    """First message: where the viewer starts (a cursor), and Redis' clock."""

    site: str
    stream: str
    id: str
    now: int
    queue: int
    partitions: int = 1


class Event(Struct, tag="event", tag_field="type", kw_only=True, omit_defaults=True):
    """One entry of a site's events stream (of partition ``p``)."""

    id: str
    event: msgspec.Raw
    p: int | None = None


class Rejected(Struct, tag="rejected", tag_field="type", kw_only=True, omit_defaults=True):
    """One entry of a site's rejected stream (of partition ``p``)."""

    id: str
    event: msgspec.Raw
    p: int | None = None


class Trimmed(Struct, tag="trimmed", tag_field="type", kw_only=True, omit_defaults=True):
    """The stream (of partition ``p``) no longer holds ``from``; up to ``first`` is gone."""

    from_: str = msgspec.field(name="from")
    first: str | None
    id: str
    p: int | None = None


class Ready(Struct, tag="ready", tag_field="type", kw_only=True):
    """The backlog is sent; live events follow. ``id`` is the viewer's cursor."""

    id: str


class Lagged(Struct, tag="lagged", tag_field="type", kw_only=True, omit_defaults=True):
    """``missed`` matching events (of partition ``p``), ``first`` to ``id``, were dropped."""

    missed: int
    first: str
    id: str
    p: int | None = None


LiveMessage = Hello | Event | Rejected | Trimmed | Ready | Lagged

_encoder: Final = msgspec.json.Encoder()
#: Decodes relay messages (viewers written in Python, tests).
message_decoder: Final = msgspec.json.Decoder(LiveMessage)


class _Head(Struct):
    """The fields of a stored record the filters look at; the rest is passed on as it is."""

    action: str = ""
    uuid: str | None = None


_head_decoder: Final = msgspec.json.Decoder(_Head)


# ---- query ---------------------------------------------------------------------


class LiveQuery(Struct, frozen=True, kw_only=True):
    """What a viewer asked for in the URL, and the site's partitions it was checked against."""

    site: str
    stream: StreamName = "events"
    action: str | None = None
    uuid: str | None = None
    since: str = "now"
    partitions: int = 1


def _one_partition(_site: str) -> int:
    return 1


def parse_query(
    query: str,
    known: Callable[[str], bool],
    partitions: Callable[[str], int] = _one_partition,
) -> LiveQuery | tuple[HTTPStatus, str]:
    """Check the query string of ``/v1/live``.

    Args:
        query: the part of the path after ``?``.
        known: tells whether a site is configured.
        partitions: a configured site's ``partitions`` (a cursor in ``since``
            must hold that many ids).

    Returns:
        The query, or the HTTP status and text to refuse it with.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return HTTPStatus.BAD_REQUEST, "malformed query string"
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in _QUERY_KEYS:
            return HTTPStatus.BAD_REQUEST, f"unknown parameter {name[:32]!r}; use {_keys_text()}"
        if name in values:
            return HTTPStatus.BAD_REQUEST, f"parameter {name!r} given twice"
        values[name] = value
    site = values.get("site")
    if not site:
        return HTTPStatus.BAD_REQUEST, "site=S is required"
    if not known(site):
        return HTTPStatus.NOT_FOUND, f"unknown site {site[:64]!r}"
    stream = values.get("stream", "events")
    if stream not in STREAMS:
        return HTTPStatus.BAD_REQUEST, "stream must be events or rejected"
    action = values.get("action") or None
    if action is not None:
        if stream == "rejected":
            return HTTPStatus.BAD_REQUEST, "action filters the events stream only"
        if not _GLOB_RE.match(action):
            return HTTPStatus.BAD_REQUEST, "action must be a glob of 1-64 [A-Za-z0-9_.-*?[]!]"
    uuid = values.get("uuid") or None
    if uuid is not None and not _UUID_RE.match(uuid):
        return HTTPStatus.BAD_REQUEST, "uuid must be 1-64 characters of [A-Za-z0-9._:-]"
    since = values.get("since") or "now"
    count = partitions(site)
    refusal = _check_since(since, count)
    if refusal is not None:
        return HTTPStatus.BAD_REQUEST, refusal
    return LiveQuery(
        site=site,
        stream="rejected" if stream == "rejected" else "events",
        action=action,
        uuid=uuid,
        since=since,
        partitions=count,
    )


def _check_since(since: str, partitions: int) -> str | None:
    """Why ``since`` is refused for a site of ``partitions``, or None."""
    ids = since.split(CURSOR_SEP)
    if len(ids) > 1:
        if len(ids) != partitions:
            return (
                f"since: a cursor of {len(ids)} ids, but the site has {partitions} "
                f"partition{'s' if partitions > 1 else ''}"
            )
        if not all(_ID_RE.fullmatch(i) for i in ids):
            return "since: a cursor holds stream ids joined by ','"
    else:
        try:
            start = start_id(since, 0)
        except ValueError:
            return "since must be now, a duration (30s, 5m, 2h), 0 or a stream id"
        ids = [] if start == "$" else [start]
    if any(int(part) > MAX_ID_PART for i in ids for part in i.split("-")):
        return "since: not a stream id"
    return None


def _keys_text() -> str:
    return ", ".join(sorted(_QUERY_KEYS))


def _full_id(entry_id: str) -> str:
    return entry_id if "-" in entry_id else f"{entry_id}-0"


def resolve_since(since: str, now_ms: int, partitions: int = 1) -> list[str] | None:
    """The id each partition starts after, on Redis' clock; None for ``now`` (the streams' ends).

    A cursor gives one id per partition; any other ``since`` gives the same
    id to every partition (a cut in time).
    """
    if CURSOR_SEP in since:
        return [_full_id(i) for i in since.split(CURSOR_SEP)]
    start = start_id(since, now_ms)
    if start == "$":
        return None
    return [_full_id(start)] * partitions


def cursor(ids: Sequence[str]) -> str:
    """A position (one id per partition) as the ``id`` of hello and ready, and for ``since``."""
    return CURSOR_SEP.join(ids)


def _id_text(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


# ---- entries and viewers ---------------------------------------------------------


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


class Entry:
    """One decoded stream entry and its relay frame, encoded once for every viewer.

    ``part`` is the index of the partition whose stream holds it (0 for a
    site of one partition).
    """

    __slots__ = ("action", "frame", "id", "key", "part", "uuid")

    def __init__(
        self, entry_id: str, action: str, uuid: str | None, frame: bytes, part: int = 0
    ) -> None:
        self.id = entry_id
        self.key = stream_id(entry_id)
        self.action = action
        self.uuid = uuid
        self.frame = frame
        self.part = part


def _merge_order(entry: Entry) -> tuple[tuple[int, int], int]:
    return entry.key, entry.part


def decode_entries(
    raw: Sequence[StreamEntry], stream: StreamName, part: int | None = None
) -> list[Entry]:
    """Stream entries as relay entries; entries that are not eventwire records are skipped.

    Args:
        raw: entries of one stream, oldest first.
        stream: which of the site's streams they come from.
        part: the partition of a partitioned site (written in each frame as
            ``p``); None for a site of one partition.
    """
    out: list[Entry] = []
    message = Rejected if stream == "rejected" else Event
    for entry in raw:
        if entry.event is None:
            continue
        try:
            # Decoding the head also proves the record is JSON: it is sent on as it is.
            head = _head_decoder.decode(entry.event)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        frame = _encoder.encode(message(id=entry.id, event=msgspec.Raw(entry.event), p=part))
        out.append(Entry(entry.id, head.action, head.uuid, frame, part or 0))
    return out


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
            _encoder.encode(
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


#: What one read of one partition gave: its index, its entries, and the
#: stream's info when it was a page read (None after an XREAD).
_Read = tuple[int, list[StreamEntry], StreamInfo | None]


def per_read(batch: int, partitions: int) -> int:
    """Entries of each partition a read takes: ``live_batch`` shared out, at least one."""
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
            entries.sort(key=_merge_order)
        for viewer in self.viewers:
            viewer.push(entries)

    def _tell_trimmed(self, part: int, info: StreamInfo) -> None:
        """Tell each viewer whose own position in ``part`` was trimmed, from that position."""
        for viewer in self.viewers:
            # A viewer that joined ahead of the reader replayed up to its floor itself.
            at = max(self.positions[part], _id_text(viewer.floor[part]), key=stream_id)
            if trimmed_after(at, info):
                notice = Trimmed(
                    from_=at,
                    first=info.first_id,
                    id=at,
                    p=part if self.partitioned else None,
                )
                viewer.notice(_encoder.encode(notice))


async def _send(ws: ServerConnection, frames: Sequence[bytes]) -> None:
    """Write frames as text messages, then wait for the socket to drain below its limit.

    One write for a chunk of frames costs far less than one ``send()`` each.

    Raises:
        ConnectionClosed: the viewer is gone.
    """
    async with ws.send_context():
        for frame in frames:
            ws.protocol.send_text(frame)


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
        viewer = Viewer(
            Filter(query.action, query.uuid), self.settings.live_queue, query.partitions
        )
        self._viewers.add(viewer)
        gauge = metrics.LIVE_VIEWERS.labels(query.stream)
        gauge.inc()
        watcher = asyncio.create_task(self._watch(ws, viewer))
        reader: _Reader | None = None
        try:
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
            if reader is None:
                reader = next((r for r in self._readers.values() if viewer in r.viewers), None)
            if reader is not None:
                await self._leave(reader, viewer)

    async def _run(self, ws: ServerConnection, viewer: Viewer, query: LiveQuery) -> _Reader:
        redis = self.store.redis
        keys = self.stream_keys(query.site, query.stream, query.partitions)
        async with asyncio.timeout(self.settings.store_timeout):
            now = await redis_time_ms(redis)
            since = resolve_since(query.since, now, len(keys))
            positions = since if since is not None else [await stream_end(redis, k) for k in keys]
        await ws.send(
            _encoder.encode(
                Hello(
                    site=query.site,
                    stream=query.stream,
                    id=cursor(positions),
                    now=now,
                    queue=self.settings.live_queue,
                    partitions=len(keys),
                )
            ),
            text=True,
        )
        if since is not None:
            await self._replay(ws, viewer, keys, query.stream, positions)
        reader = self._join(query.site, query.stream, keys, viewer, positions)
        # The reader handed out (position, reader's position] of these
        # partitions before this viewer joined: read them here; what it reads
        # next is queued. Read now, before any await moves the reader on.
        ahead = {
            part: reader_at
            for part, (reader_at, at) in enumerate(zip(reader.positions, positions, strict=True))
            if stream_id(reader_at) > stream_id(at)
        }
        if ahead:
            await self._replay(ws, viewer, keys, query.stream, positions, ahead)
        await ws.send(_encoder.encode(Ready(id=cursor(positions))), text=True)
        while True:
            await viewer.wait()
            if viewer.closed:
                return reader
            frames = viewer.take(SEND_CHUNK)
            if frames:
                await _send(ws, frames)

    async def _replay(
        self,
        ws: ServerConnection,
        viewer: Viewer,
        keys: Sequence[str],
        stream: StreamName,
        positions: list[str],
        until: dict[int, str] | None = None,
    ) -> None:
        """Send the entries after ``positions`` (up to ``until``), merged by id; move ``positions``.

        Args:
            keys: the stream's key in each partition.
            positions: per partition, the id to start after; each replayed
                partition's entry becomes the last id read of it.
            until: the partitions to replay and the last id of each; None:
                every partition, to its end.

        Each partition is read in pages; one page per partition is held at a
        time, and the entry with the lowest id goes first. Every chunk waits
        for the viewer's socket to drain, so a slow viewer slows its own
        replay and nothing else.
        """
        parts = range(len(keys)) if until is None else sorted(until)
        partitioned = len(keys) > 1
        batch = per_read(self.settings.live_batch, len(keys))
        after = {part: positions[part] for part in parts}
        pending: dict[int, deque[Entry]] = {part: deque() for part in parts}
        done: set[int] = set()
        heads: list[tuple[tuple[int, int], int]] = []

        async def fill(part: int) -> None:
            # Until the partition has an entry to send or is read to its end.
            while not pending[part] and part not in done:
                last = "+" if until is None else until[part]
                async with asyncio.timeout(self.settings.store_timeout):
                    raw, info = await read_page(
                        self.store.redis, keys[part], after[part], batch, last
                    )
                if trimmed_after(after[part], info):
                    assert info is not None
                    notice = Trimmed(
                        from_=after[part],
                        first=info.first_id,
                        id=after[part],
                        p=part if partitioned else None,
                    )
                    await ws.send(_encoder.encode(notice), text=True)
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
            await _send(ws, frames)
            if empty is not None:
                await fill(empty)
        for part in parts:
            positions[part] = after[part]

    def _join(
        self,
        site: str,
        stream: StreamName,
        keys: list[str],
        viewer: Viewer,
        positions: Sequence[str],
    ) -> _Reader:
        """Add a viewer to the reader of its stream, starting the reader if it is the first."""
        ident = (site, stream, len(keys))
        reader = self._readers.get(ident)
        if reader is None:
            reader = _Reader(self, site, stream, keys, positions)
            reader.task = asyncio.create_task(reader.run(), name=f"eventwire-live-{site}-{stream}")
            self._readers[ident] = reader
            metrics.LIVE_READERS.inc()
        viewer.floor = [stream_id(p) for p in positions]
        reader.viewers.add(viewer)
        return reader

    async def _leave(self, reader: _Reader, viewer: Viewer) -> None:
        """Remove a viewer; the last one to leave stops the reader and waits for it."""
        reader.viewers.discard(viewer)
        if reader.viewers or self._readers.get(reader.ident) is not reader:
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
        """Stop every reader (their viewers' handlers stop them too as they end)."""
        readers = list(self._readers.values())
        self._readers.clear()
        for reader in readers:
            reader.stopping = True
        await cancel_and_wait(r.task for r in readers if r.task is not None)
        metrics.LIVE_READERS.dec(len(readers))
