"""The live relay: ``WS /v1/live`` on the admin listener streams a site's events from Redis.

This module owns the relay: its query, its messages, the per-viewer queue
and the fan-out from one Redis reader per (site, stream) per process.

URL: ``/v1/live?site=S[&stream=events|rejected][&action=GLOB][&uuid=U][&since=now|5m|0|ID]``.
``action`` is a glob over the action name matched in full (events only),
``uuid`` one customer, ``since`` where to start: ``now`` (the default), a
duration back on Redis' clock (``30s``, ``5m``, ``2h``), ``0`` (the start of
the stream) or a stream id (entries after it: the id of the last message a
reconnecting viewer saw).

Messages are JSON text frames with a ``type``; each carries ``id``, the
stream id a viewer passes back as ``since`` to resume right after it:

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
has handed out. If ``R`` is ahead of the viewer's position ``P``, the viewer
replays ``(P, R]`` as well (the reader's next batch starts after ``R`` and
already lands in the viewer's queue); if ``R`` is behind, the viewer drops
the queued entries up to ``P``. Both checks are synchronous with the join,
so nothing the reader hands out in between is lost.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import socket
from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Final, Literal
from urllib.parse import parse_qsl

import msgspec
import redis.exceptions
import structlog
from msgspec import Struct
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import metrics
from server.errors import StoreUnavailable
from server.store import (
    Store,
    StreamEntry,
    connect_stream_reader,
    read_new,
    read_page,
    redis_time_ms,
    stream_end,
    stream_id,
    trimmed_after,
)
from server.tail import start_id
from server.tasks import cancel_and_wait

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

_GLOB_RE: Final = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,64}$")
_UUID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUERY_KEYS: Final = frozenset({"site", "stream", "action", "uuid", "since"})
_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError, StoreUnavailable, TimeoutError)


# ---- messages ------------------------------------------------------------------


class Hello(Struct, tag="hello", tag_field="type", kw_only=True):
    """First message: where the viewer starts, and Redis' clock."""

    site: str
    stream: str
    id: str
    now: int
    queue: int


class Event(Struct, tag="event", tag_field="type", kw_only=True):
    """One entry of a site's events stream."""

    id: str
    event: msgspec.Raw


class Rejected(Struct, tag="rejected", tag_field="type", kw_only=True):
    """One entry of a site's rejected stream."""

    id: str
    event: msgspec.Raw


class Trimmed(Struct, tag="trimmed", tag_field="type", kw_only=True):
    """The stream no longer holds ``from``; what lay between it and ``first`` is gone."""

    from_: str = msgspec.field(name="from")
    first: str | None
    id: str


class Ready(Struct, tag="ready", tag_field="type", kw_only=True):
    """The backlog is sent; live events follow."""

    id: str


class Lagged(Struct, tag="lagged", tag_field="type", kw_only=True):
    """``missed`` matching events, ``first`` to ``id``, were dropped for a slow viewer."""

    missed: int
    first: str
    id: str


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
    """What a viewer asked for in the URL."""

    site: str
    stream: StreamName = "events"
    action: str | None = None
    uuid: str | None = None
    since: str = "now"


def parse_query(query: str, known: Callable[[str], bool]) -> LiveQuery | tuple[HTTPStatus, str]:
    """Check the query string of ``/v1/live``.

    Args:
        query: the part of the path after ``?``.
        known: tells whether a site is configured.

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
    try:
        start = start_id(since, 0)
    except ValueError:
        return (
            HTTPStatus.BAD_REQUEST,
            "since must be now, a duration (30s, 5m, 2h), 0 or a stream id",
        )
    if start != "$" and any(int(p) > MAX_ID_PART for p in start.split("-")):
        return HTTPStatus.BAD_REQUEST, "since: not a stream id"
    return LiveQuery(
        site=site,
        stream="rejected" if stream == "rejected" else "events",
        action=action,
        uuid=uuid,
        since=since,
    )


def _keys_text() -> str:
    return ", ".join(sorted(_QUERY_KEYS))


def resolve_since(since: str, now_ms: int) -> str | None:
    """The id a viewer starts after, on Redis' clock; None for ``now`` (the stream's end)."""
    start = start_id(since, now_ms)
    if start == "$":
        return None
    return start if "-" in start else f"{start}-0"


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
    """One decoded stream entry and its relay frame, encoded once for every viewer."""

    __slots__ = ("action", "frame", "id", "key", "uuid")

    def __init__(self, entry_id: str, action: str, uuid: str | None, frame: bytes) -> None:
        self.id = entry_id
        self.key = stream_id(entry_id)
        self.action = action
        self.uuid = uuid
        self.frame = frame


def decode_entries(raw: Sequence[StreamEntry], stream: StreamName) -> list[Entry]:
    """Stream entries as relay entries; entries that are not eventwire records are skipped."""
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
        frame = _encoder.encode(message(id=entry.id, event=msgspec.Raw(entry.event)))
        out.append(Entry(entry.id, head.action, head.uuid, frame))
    return out


class Viewer:
    """One viewer's bounded queue of frames, filled by a reader, emptied by its socket.

    Args:
        flt: the viewer's filters.
        limit: the most events queued (``live_queue``); a ``lagged`` or
            ``trimmed`` notice may come on top.
    """

    __slots__ = (
        "closed",
        "filter",
        "floor",
        "gap_first",
        "gap_last",
        "limit",
        "missed",
        "missed_total",
        "peak",
        "queue",
        "waiter",
    )

    def __init__(self, flt: Filter, limit: int) -> None:
        self.filter = flt
        self.limit = limit
        self.queue: deque[bytes] = deque()
        #: Entries up to this id are already sent (the handover, see the module doc).
        self.floor = (0, 0)
        #: Events dropped since the last ``lagged`` notice, and the ids of the first and last.
        self.missed = 0
        self.gap_first = ""
        self.gap_last = ""
        #: Events dropped in all, and the longest the queue has been.
        self.missed_total = 0
        self.peak = 0
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def push(self, entries: Sequence[Entry]) -> None:
        """Queue the entries this viewer wants; drop (and count) what does not fit."""
        queue = self.queue
        dropped = 0
        for entry in entries:
            if entry.key <= self.floor or not self.filter.matches(entry):
                continue
            if len(queue) >= self.limit:
                if not self.missed:
                    self.gap_first = entry.id
                self.missed += 1
                self.gap_last = entry.id
                dropped += 1
                continue
            if self.missed:
                queue.append(self._lagged())
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
                self.queue.append(self._lagged())
            self.queue.append(frame)
            self.wake()

    def take(self, most: int) -> list[bytes]:
        """Up to ``most`` frames, oldest first; the pending ``lagged`` once the queue is empty."""
        queue = self.queue
        out = [queue.popleft() for _ in range(min(most, len(queue)))]
        if not queue and self.missed:
            out.append(self._lagged())
        return out

    def _lagged(self) -> bytes:
        frame = _encoder.encode(Lagged(missed=self.missed, first=self.gap_first, id=self.gap_last))
        self.missed = 0
        return frame

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


class _Reader:
    """The one Redis reader of a (site, stream) in this process, and its viewers."""

    def __init__(self, relay: Relay, site: str, stream: StreamName, position: str) -> None:
        self.relay = relay
        self.site = site
        self.stream: StreamName = stream
        self.key = relay.stream_key(site, stream)
        #: The last id handed to the viewers (or where the reader started).
        self.position = position
        self.viewers: set[Viewer] = set()
        self.task: asyncio.Task[None] | None = None
        #: Set before the task is cancelled: a cancellation that redis-py
        #: swallows (see server.tasks) must not keep the loop going.
        self.stopping = False

    async def run(self) -> None:
        settings = self.relay.settings
        batch = settings.live_batch
        client = connect_stream_reader(settings.redis_url, settings, READ_BLOCK_MS)
        # The first read, and every read after a full batch or a failure, is a
        # page read: it can tell whether trimming overtook the reader. At the
        # first, the viewer that started the reader has just checked its own
        # position; only later reads can find the reader itself overtaken.
        behind = True
        first = True
        backoff = RETRY_FIRST
        failing = False
        try:
            while not self.stopping:
                try:
                    if behind:
                        raw, info = await read_page(client, self.key, self.position, batch)
                        if not first and trimmed_after(self.position, info):
                            assert info is not None
                            self._broadcast(
                                _encoder.encode(
                                    Trimmed(
                                        from_=self.position, first=info.first_id, id=self.position
                                    )
                                )
                            )
                    else:
                        raw = await read_new(client, self.key, self.position, batch, READ_BLOCK_MS)
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
                first = False
                if failing:
                    log.info("live_reader_redis_back", site=self.site, stream=self.stream)
                    failing = False
                    backoff = RETRY_FIRST
                behind = len(raw) >= batch
                if raw:
                    entries = decode_entries(raw, self.stream)
                    # The position moves with the hand-out, with no await in
                    # between: a viewer joining reads it to know what it missed.
                    self.position = raw[-1].id
                    for viewer in self.viewers:
                        viewer.push(entries)
        finally:
            await client.aclose()

    def _broadcast(self, frame: bytes) -> None:
        for viewer in self.viewers:
            viewer.notice(frame)


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
        self._readers: dict[tuple[str, str], _Reader] = {}
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

    def stream_key(self, site: str, stream: StreamName) -> str:
        """The Redis key of a site's stream."""
        keys = self.store.keys
        return keys.rejected(site) if stream == "rejected" else keys.events(site)

    async def serve(self, ws: ServerConnection, query: LiveQuery) -> None:
        """Run one viewer from hello until it leaves (or the server closes it)."""
        if self.full():
            await ws.close(TRY_AGAIN_LATER, "too many live viewers; try again later")
            return
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, VIEWER_SEND_BUFFER)
        viewer = Viewer(Filter(query.action, query.uuid), self.settings.live_queue)
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
        key = self.stream_key(query.site, query.stream)
        async with asyncio.timeout(self.settings.store_timeout):
            now = await redis_time_ms(redis)
            since = resolve_since(query.since, now)
            position = since if since is not None else await stream_end(redis, key)
        await ws.send(
            _encoder.encode(
                Hello(
                    site=query.site,
                    stream=query.stream,
                    id=position,
                    now=now,
                    queue=self.settings.live_queue,
                )
            ),
            text=True,
        )
        if since is not None:
            position = await self._replay(ws, viewer, key, query.stream, position)
        reader = self._join(query.site, query.stream, viewer, position)
        if stream_id(reader.position) > stream_id(position):
            # The reader handed out (position, reader.position] before this
            # viewer joined: read them here; what it reads next is queued.
            position = await self._replay(ws, viewer, key, query.stream, position, reader.position)
        await ws.send(_encoder.encode(Ready(id=position)), text=True)
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
        key: str,
        stream: StreamName,
        position: str,
        until: str = "+",
    ) -> str:
        """Send the entries after ``position`` (up to ``until``) page by page; returns the last id.

        Each page waits for the viewer's socket to drain, so a slow viewer
        slows its own replay and nothing else.
        """
        batch = self.settings.live_batch
        while True:
            async with asyncio.timeout(self.settings.store_timeout):
                raw, info = await read_page(self.store.redis, key, position, batch, until)
            if trimmed_after(position, info):
                assert info is not None
                notice = Trimmed(from_=position, first=info.first_id, id=position)
                await ws.send(_encoder.encode(notice), text=True)
            if raw:
                frames = [e.frame for e in decode_entries(raw, stream) if viewer.filter.matches(e)]
                for i in range(0, len(frames), SEND_CHUNK):
                    await _send(ws, frames[i : i + SEND_CHUNK])
                position = raw[-1].id
            if len(raw) < batch:
                return position

    def _join(self, site: str, stream: StreamName, viewer: Viewer, position: str) -> _Reader:
        """Add a viewer to the reader of its stream, starting the reader if it is the first."""
        reader = self._readers.get((site, stream))
        if reader is None:
            reader = _Reader(self, site, stream, position)
            reader.task = asyncio.create_task(reader.run(), name=f"eventwire-live-{site}-{stream}")
            self._readers[site, stream] = reader
            metrics.LIVE_READERS.inc()
        viewer.floor = stream_id(position)
        reader.viewers.add(viewer)
        return reader

    async def _leave(self, reader: _Reader, viewer: Viewer) -> None:
        """Remove a viewer; the last one to leave stops the reader and waits for it."""
        reader.viewers.discard(viewer)
        if reader.viewers or self._readers.get((reader.site, reader.stream)) is not reader:
            return
        del self._readers[reader.site, reader.stream]
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
