"""The public WebSocket listener: routes, handshake checks, limits, graceful drain.

:class:`EventwireServer` owns the process' listeners and the store. For each
connection it checks the route (``/v1/track/{site}``, else 404), the site
(404), the ``Origin`` (403), the connection limit (503) and the subprotocol
before the upgrade, then hands the socket to an :class:`~eventwire.ingest.IngestConnection`
driving the connection's protocol (:class:`~eventwire.core.connection.Connection`),
which chooses every answer and close code. A frame over ``max_frame_bytes``
is closed 1009 by websockets itself (``max_size``).

Plain GET requests for :data:`PUBLIC_FILES` (the browser tracker and the demo
shop) are answered before any upgrade, by :class:`~eventwire.pages.StaticFiles`.

On :meth:`EventwireServer.stop` it stops accepting, lets in-flight frames be
acked (up to ``drain_timeout``), closes every connection 1001, publishes the
sessions' ends, then closes the store.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, Protocol, cast

import msgspec
import structlog
from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, OPEN, Event
from websockets.typing import Subprotocol

from eventwire import metrics
from eventwire.admin import PRIVACY_PREFIX, PRIVACY_ROUTE, AdminListener
from eventwire.core.config import Settings, mask_url
from eventwire.core.connection import Connection
from eventwire.core.errors import ConfigError
from eventwire.core.peers import PeerLimits
from eventwire.core.protocol import CODECS, JSON_SUBPROTOCOL, SUBPROTOCOLS
from eventwire.core.rules import SiteRules, SitesBook
from eventwire.core.visitor import Enrichment, Visitor
from eventwire.http import HttpListener, SegmentApi
from eventwire.http.batch import retry_after_header
from eventwire.ingest import IngestConnection
from eventwire.log import Episodes
from eventwire.pages import StaticFiles
from eventwire.sessions import Sessions
from eventwire.store import Store, connect_redis
from eventwire.tasks import cancel_and_wait

TRACK_PREFIX: Final = "/v1/track/"
#: Plain files on the public listener: the browser tracker and the demo shop.
PUBLIC_FILES: Final = {
    "/tracker.js": "tracker.js",
    "/demo": "demo.html",
    "/demo/demo.css": "demo.css",
    "/demo/demo.js": "demo.js",
}
#: Where tracker.js takes the HTTP listener's URL (its beacon endpoint), filled in at start.
TRACKER_HTTP_MARKER: Final = b'/*ew:http_url*/ ""'
#: How often the sites file's modification time is looked at.
SITES_POLL: Final = 1.0
#: At most one ``handshake_timeouts`` line in this many seconds (the metric counts each).
HANDSHAKE_TIMEOUTS_LOG_EVERY: Final = 10.0

log = structlog.get_logger("eventwire.gateway")
_ids = itertools.count(1)


class MessageReader(Protocol):
    """Who reads a tracking connection's messages (its ``IngestConnection``)."""

    def take(self, data: bytes) -> bool:
        """Carry out one message now, from ``data_received``; False: it must wait in the inbox."""

    def wake(self) -> None:
        """A message waits in the inbox, or the connection closed."""


#: What tracking connections have instead of websockets' message assembler: one
#: shared, closed assembler per event loop (``recv()`` on it raises
#: ConnectionClosed at once), as messages go to the connection's inbox. The
#: assembler it replaces holds a deque and futures: about 1 KiB for each of
#: 100,000 idle connections.
_NO_MESSAGES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Assembler] = (
    weakref.WeakKeyDictionary()
)


def _no_messages(loop: asyncio.AbstractEventLoop) -> Assembler:
    assembler = _NO_MESSAGES.get(loop)
    if assembler is None:
        assembler = _NO_MESSAGES[loop] = Assembler()
        assembler.close()
    return assembler


#: What an open tracking connection keeps as its handshake request: one empty
#: request for all (the library only looks whether there is one), its empty
#: headers shared by every request let go. The parsed request and response,
#: headers and all, are ~4 KiB a connection.
HANDSHAKE_DONE: Final = Request(path="", headers=Headers())

#: Messages waiting in a connection's inbox at which its socket stops being
#: read, and the level at which reading resumes (websockets' ``max_queue``).
INBOX_HIGH: Final = 16
INBOX_LOW: Final = 4


class HandshakeTimeouts:
    """The handshakes of one listener aborted at ``hello_timeout``: counted, and logged.

    The listener's connections bound their handshake with this (see
    :meth:`TrackConnection.handshake`) instead of websockets' ``open_timeout``,
    which aborts such a connection without a log line or a count. Each one is
    counted in ``eventwire_handshake_timeouts_total``; a warning
    ``handshake_timeouts`` comes with the first one after a quiet spell, then
    at most one per :data:`HANDSHAKE_TIMEOUTS_LOG_EVERY` seconds, with how
    many came since the previous line (those of the last seconds of an
    episode are only in the metric). Never the address.

    Args:
        timeout: seconds from the accept to the 101 (``hello_timeout``).
        open_connections: how many tracking connections are open now (in the line).
        clock: monotonic seconds (a test's own).
    """

    def __init__(
        self,
        timeout: float,
        open_connections: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._open_connections = open_connections
        self._lines = Episodes(
            log, "handshake_timeouts", HANDSHAKE_TIMEOUTS_LOG_EVERY, count_as="aborted", clock=clock
        )

    @property
    def total(self) -> int:
        """Handshakes aborted since the start."""
        return self._lines.total

    def timed_out(self, request_received: bool) -> None:
        """One handshake ran out of time (``request_received``: its HTTP request was read)."""
        metrics.HANDSHAKE_TIMEOUTS.inc()
        self._lines.note(
            hello_timeout=self.timeout,
            request_received=request_received,
            connections_open=self._open_connections(),
            hint="handshakes not answered with a 101 within hello_timeout were aborted "
            "(TCP closed): the process is too busy to open them in time, or clients stall",
        )


class TrackConnection(ServerConnection):
    """A websockets connection that hands its messages to a reader without a wait or a task.

    websockets parses the handshake and the frames and enforces every limit
    (``max_size`` also across fragments, control frames, ping and close); only
    the delivery of data messages differs. The library puts each message in
    an assembler that a ``recv()`` task awaits, which costs futures, a lock
    and a task switch per message, more than the rest of a small frame's
    work. Here a complete message goes from ``data_received`` straight to the
    :class:`MessageReader` (:meth:`MessageReader.take`), and when the reader
    cannot take it now (a session step runs, ``max_inflight_frames`` frames
    wait for Redis, the client does not read its answers) it waits in
    :attr:`inbox`, whose length pauses the socket's reading as the
    assembler's queue did (:data:`INBOX_HIGH`, :data:`INBOX_LOW`).
    """

    # This class' own attributes in slots: the library's 27 then fit the
    # keys CPython shares among a class' instance dicts (at most 30), which
    # makes each connection's dict ~0.3 KiB instead of ~1.6 KiB when the
    # attributes come in the usual order.
    __slots__ = (
        "_fragments",
        "_reading_paused",
        "address",
        "inbox",
        "reader",
        "site",
        "timeouts",
        "visitor",
    )

    def __init__(self, *args: Any, timeouts: HandshakeTimeouts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The listener's handshake deadline and its count (shared by its connections).
        self.timeouts = timeouts
        # The library only appends, removes and iterates: a list is 0.6 KiB
        # smaller than the deque per connection.
        self.drain_waiters = []  # type: ignore[assignment]
        self.site = ""
        #: The client address (after ``trusted_proxies``), raw: in memory only.
        self.address = ""
        #: What the handshake said of the visitor (None: enrichment is off), until the handler.
        self.visitor: Visitor | None = None
        #: Complete messages not yet taken, in arrival order.
        self.inbox: list[bytes] = []
        #: Who takes the messages, once the handler started; None before and after.
        self.reader: MessageReader | None = None
        self._fragments: list[bytes] | None = None
        self._reading_paused = False

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """The library's handshake, within ``hello_timeout``; one that runs out is counted.

        The TimeoutError goes on to the library's connection handler, which
        aborts the TCP connection as it does at its own ``open_timeout``.
        """
        try:
            async with asyncio.timeout(self.timeouts.timeout):
                await super().handshake(*args, **kwargs)
        except TimeoutError:
            self.timeouts.timed_out(self.request is not None)
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages = _no_messages(self.loop)

    def process_event(self, event: Event) -> None:
        if self.request is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not event.fin:
                self._fragments = [bytes(event.data)]
                return
            data = bytes(event.data)
        elif opcode is Opcode.CONT:
            # The protocol checked the order of fragments, and max_size over
            # the whole message (current_size).
            fragments = self._fragments
            assert fragments is not None
            fragments.append(bytes(event.data))
            if not event.fin:
                return
            self._fragments = None
            data = b"".join(fragments)
        else:
            super().process_event(event)  # ping, pong, close: the library's
            return
        reader = self.reader
        if reader is not None and not self.inbox and reader.take(data):
            return
        self.inbox.append(data)
        if len(self.inbox) >= INBOX_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        if reader is not None:
            reader.wake()

    def forget_handshake(self) -> tuple[str, Visitor | None]:
        """Let go of the handshake once the connection is open; returns its site and visitor.

        The request and response (with their headers) and the visitor are
        dropped: the visitor goes to the connection's protocol, which keeps
        it only until hello. What stays is the site and the raw address
        (for the per-address count until the connection closes).
        """
        visitor, self.visitor = self.visitor, None
        request, self.request = self.request, HANDSHAKE_DONE
        if request is not None and request is not HANDSHAKE_DONE:
            # websockets' parser keeps the request to the end (a local of its
            # generator): only its content can go.
            request.headers = HANDSHAKE_DONE.headers
        self.response = None
        return self.site, visitor

    def next_message(self) -> bytes:
        """The oldest message of the inbox (not empty); reading resumes below :data:`INBOX_LOW`."""
        data = self.inbox.pop(0)
        if self._reading_paused and len(self.inbox) <= INBOX_LOW:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return data

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (nothing more will arrive)."""
        return self.protocol.state is CLOSED

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.reader is not None:
            self.reader.wake()

    def ping_now(self) -> asyncio.Future[float]:
        """Send a ping now, without waiting: the future gets the latency when its pong comes.

        What ``ping()`` does, without its wait for the write buffer to drain
        (which would hold up :class:`Keepalive` on one client that does not
        read). The pong is matched by the library (``pending_pings``).
        """
        data = struct.pack("!I", random.getrandbits(32))
        while data in self.pending_pings:
            data = struct.pack("!I", random.getrandbits(32))
        pong: asyncio.Future[float] = self.loop.create_future()
        self.pending_pings[data] = (pong, self.loop.time())
        self.protocol.send_ping(data)
        self.send_data()
        return pong

    def send_now(self, data: bytes, text: bool) -> None:
        """Queue one message on the transport now; drop it if the connection is closing.

        ``send()`` is a coroutine with a context manager and a drain per call,
        which costs more than the rest of an ack. Acks are small and no
        message is taken while the transport is paused, so what is written
        here stays bounded by ``max_inflight_frames`` answers. A dropped
        answer is harmless: the client resends unanswered frames after
        reconnecting.
        """
        if self.protocol.state is not OPEN:
            return
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self.send_data()


class Keepalive:
    """Pings every tracking connection every ``interval`` seconds from one task.

    websockets' own keepalive is a task per connection (a coroutine, a
    sleep, a timer: about 1 KiB each of 100,000 idle connections). This one
    keeps two queues in time order: connections due for a ping, and pings
    waiting for their pong. The ping and the pong's matching are the
    library's (``ping()``); a pong later than ``timeout`` fails the
    connection as the library does, close code 1011 "keepalive ping timeout".

    Args:
        interval: seconds between a connection's pings (``ping_interval``).
        timeout: seconds a pong may take (``ping_timeout``; 0: never fails).
    """

    #: Seconds between looks at the queues.
    TICK: Final = 0.1

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        # Weak references: a closed connection is freed at once, not when its
        # next ping would have been due.
        self._due: deque[tuple[float, weakref.ref[TrackConnection]]] = deque()
        self._waiting: deque[tuple[float, weakref.ref[TrackConnection], asyncio.Future[float]]] = (
            deque()
        )
        #: Connections failed for a late pong, since the start.
        self.timed_out = 0
        self._failing: set[asyncio.Task[None]] = set()

    def add(self, ws: TrackConnection) -> None:
        """Ping ``ws`` every interval from now on, while it is open."""
        self._due.append((ws.loop.time() + self.interval, weakref.ref(ws)))

    async def run(self) -> None:
        """Send the pings that are due and fail the connections whose pong is late."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.TICK, self.interval))
            now = loop.time()
            due, waiting = self._due, self._waiting
            while waiting and waiting[0][0] <= now:
                _, late, pong = waiting.popleft()
                silent = late()
                if not pong.done() and silent is not None and silent.state is OPEN:
                    self.timed_out += 1
                    task = asyncio.create_task(_fail_keepalive(silent))
                    self._failing.add(task)
                    task.add_done_callback(self._failing.discard)
            while due and due[0][0] <= now:
                _, ref = due.popleft()
                ws = ref()
                if ws is None or ws.state is not OPEN:
                    continue  # closed (or closing): forgotten
                pong = ws.ping_now()
                pong.add_done_callback(_pong_seen)
                if self.timeout:
                    waiting.append((now + self.timeout, ref, pong))
                due.append((now + self.interval, ref))


def _pong_seen(pong: asyncio.Future[float]) -> None:
    # A connection closed with a ping out sets ConnectionClosed on it: retrieved here.
    if not pong.cancelled():
        pong.exception()


async def _fail_keepalive(ws: TrackConnection) -> None:
    """Fail a connection whose pong is late, as websockets' keepalive does."""
    try:
        async with ws.send_context():
            ws.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
    except ConnectionClosed:
        pass


class EventwireServer:
    """One server process: public listener, admin listener, store.

    Args:
        settings: effective settings.
        sites: compiled site rules by site id.
        sites_path: the file they came from, watched for changes (and read
            again on :meth:`reload_sites`); None for rules built in code.

    Use ``await start()`` then ``await stop()``, or ``async with``.
    """

    def __init__(
        self, settings: Settings, sites: dict[str, SiteRules], sites_path: Path | None = None
    ) -> None:
        self.settings = settings
        self.book = SitesBook(sites_path, sites)
        self._watcher: asyncio.Task[None] | None = None
        #: Pings every tracking connection (None when ``ping_interval`` is 0).
        self.keepalive: Keepalive | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.store: Store | None = None
        self.sessions: Sessions | None = None
        self.public: Server | None = None
        self.admin: Server | None = None
        #: The HTTP ingest listener (``http_listen``), once started; None when not served.
        self.http: HttpListener | None = None
        #: The admin routes (health, metrics, dashboard, live relay), once started.
        self.admin_routes: AdminListener | None = None
        self._connections: dict[TrackConnection, IngestConnection] = {}
        #: Tracking connections closed since the start.
        self.closed_connections = 0
        self._draining = False
        self._stopped = asyncio.Event()
        self.files = StaticFiles(PUBLIC_FILES)
        #: The visitor lookups (trusted proxies, country database), built once.
        self.enrichment = Enrichment(settings.trusted_proxies, settings.geoip_db)
        #: Per-address limits, shared by the WebSocket and HTTP listeners.
        self.peers = PeerLimits(
            settings.max_connections_per_ip, settings.handshakes_per_ip, settings.handshake_burst
        )
        #: Handshakes aborted at ``hello_timeout`` before the 101 (counted, logged).
        self.handshake_timeouts = HandshakeTimeouts(
            settings.hello_timeout, lambda: len(self._connections)
        )

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect the store and open both listeners."""
        settings = self.settings
        store = Store(
            connect_redis(settings.redis_url, settings),
            settings,
            self.book,
        )
        await store.__aenter__()
        self.store = store
        self.sessions = Sessions(store, settings)
        self.sessions.start()
        if self.book.path is not None:
            self._watcher = asyncio.create_task(self._watch_sites())
        if settings.ping_interval:
            self.keepalive = Keepalive(settings.ping_interval, settings.ping_timeout)
            self._pinger = asyncio.create_task(self.keepalive.run())
        host, port = settings.listen_addr
        self.public = await serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            # "a wrapper or a subclass" says its docstring; typed as a class only.
            create_connection=cast(
                type[ServerConnection],
                functools.partial(TrackConnection, timeouts=self.handshake_timeouts),
            ),
            compression=None,
            max_size=settings.max_frame_bytes,
            # Incoming frames queued per connection before TCP backpressure.
            max_queue=(16, 4),
            # One keepalive task for every connection (Keepalive), not one each.
            ping_interval=None,
            ping_timeout=None,
            # TrackConnection.handshake bounds the handshake by hello_timeout
            # itself, and counts the ones that run out (the library's is silent).
            open_timeout=None,
            server_header=None,
            reuse_port=True,
            backlog=self.settings.listen_backlog,
        )
        self.admin_routes = AdminListener(self.ready, store)
        self.admin = await self.admin_routes.start(*settings.admin_addr)
        await self.admin_routes.start_tallies()
        if settings.http_addr is not None:
            self.http = HttpListener(
                settings,
                self.book,
                store,
                self.sessions,
                self._is_draining,
                enrichment=self.enrichment,
                peers=self.peers,
            )
            SegmentApi(self.http)
            # Admin routes that take a body (websockets' listener reads none), token-guarded.
            self.http.prefix_routes[PRIVACY_PREFIX] = (PRIVACY_ROUTE, self.admin_routes.privacy)
            await self.http.start(*settings.http_addr)
            # The tracker beacons to this listener without an attribute of its own.
            url = msgspec.json.encode(self.http_url)
            self.files = StaticFiles(PUBLIC_FILES)
            self.files.substitute("/tracker.js", TRACKER_HTTP_MARKER, url)
        log.info(
            "listening",
            track=self.url,
            http=self.http_url,
            admin=self.admin_url,
            redis=mask_url(settings.redis_url),
        )

    async def stop(self) -> None:
        """Drain and stop: in-flight frames are acked, connections closed 1001."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        if self.public is not None:
            self.public.close(close_connections=False)
        connections = list(self._connections.items())
        if connections:
            drains = [asyncio.ensure_future(ingest.drain()) for _, ingest in connections]
            _, late = await asyncio.wait(drains, timeout=self.settings.drain_timeout)
            await cancel_and_wait(late)
            await asyncio.gather(
                *(ws.close(1001, "server shutting down") for ws, _ in connections),
                return_exceptions=True,
            )
        if self.public is not None:
            await self.public.wait_closed()
        if self.http is not None:
            # Batches in flight finish (up to drain_timeout) before the store closes.
            await self.http.stop()
        if self.admin is not None:
            self.admin.close()
            await self.admin.wait_closed()
        if self.admin_routes is not None:
            await self.admin_routes.close()
        if self._watcher is not None:
            await cancel_and_wait([self._watcher])
        if self._pinger is not None:
            await cancel_and_wait([self._pinger])
        if self.sessions is not None:
            await self.sessions.stop()
        if self.store is not None:
            await self.store.close()
        self.enrichment.close()
        self._stopped.set()
        log.info("stopped", connections_closed=len(connections))

    async def __aenter__(self) -> EventwireServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reload_sites(self) -> bool:
        """Read the sites file again (SIGHUP); a wrong file is refused and the old rules stay.

        Open connections get the new rules from their next frame.
        """
        if self.book.path is None:
            return False
        try:
            sites = self.book.reload()
        except ConfigError as exc:
            log.error("sites_reload_refused", error=str(exc))
            return False
        log.info("sites_reloaded", sites=sorted(sites))
        return True

    async def _watch_sites(self) -> None:
        while True:
            await asyncio.sleep(SITES_POLL)
            if self.book.changed():
                self.reload_sites()

    async def ready(self) -> bool:
        """Whether this process can take events now (Redis answers, not draining)."""
        return not self._draining and self.store is not None and await self.store.ping()

    @property
    def open_connections(self) -> int:
        """Tracking connections open now."""
        return len(self._connections)

    @property
    def port(self) -> int:
        """The public listener's bound port."""
        assert self.public is not None
        port: int = self.public.sockets[0].getsockname()[1]
        return port

    @property
    def admin_port(self) -> int:
        """The admin listener's bound port."""
        assert self.admin is not None
        port: int = self.admin.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL of the public listener."""
        return f"ws://{_urlhost(self.settings.listen_addr[0])}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """Base URL of the HTTP ingest listener (``public_http_url`` when set), or None."""
        if self.http is None or self.settings.http_addr is None:
            return None
        if self.settings.public_http_url:
            return self.settings.public_http_url.rstrip("/")
        return f"http://{_urlhost(self.settings.http_addr[0])}:{self.http.port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin listener."""
        return f"http://{_urlhost(self.settings.admin_addr[0])}:{self.admin_port}"

    # -- handshake ------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in self.files:
            return self.files.respond(path, request)
        if not path.startswith(TRACK_PREFIX):
            return _refuse(connection, HTTPStatus.NOT_FOUND, "not found; track at /v1/track/{site}")
        assert isinstance(connection, TrackConnection)
        address, visitor = self.connection_context(request.headers, connection.remote_address)
        refused = self.peers.admit(address, time.time_ns() // 1_000_000)
        if refused is not None:
            response = _refuse(connection, HTTPStatus.TOO_MANY_REQUESTS, refused[0])
            response.headers["Retry-After"] = retry_after_header(refused[1])
            return response
        site = path[len(TRACK_PREFIX) :]
        rules = self.book.get(site)
        if rules is None:
            return _refuse(connection, HTTPStatus.NOT_FOUND, f"unknown site {site[:64]!r}")
        if not rules.origin_allowed(request.headers.get("Origin")):
            return _refuse(connection, HTTPStatus.FORBIDDEN, "origin not allowed for this site")
        if self._draining:
            return _refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down")
        if len(self._connections) >= self.settings.max_connections:
            return _refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        connection.site = site
        connection.address = address
        connection.visitor = visitor
        return None

    def connection_context(
        self, headers: Mapping[str, str], peer: Any
    ) -> tuple[str, Visitor | None]:
        """The handshake's client address and visitor, read once per connection.

        Args:
            headers: the request's headers (User-Agent, Accept-Language, client
                hints, and Forwarded / X-Forwarded-For from trusted proxies).
            peer: the socket's peer address (``(host, port, ...)``), or None.

        Returns:
            The raw client address (kept in memory only; the site's ``ip``
            policy applies before anything is written) and the visitor, or
            None when ``enrich_visitors`` is off.
        """
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        address = self.enrichment.address_of(str(host), headers)
        if not self.settings.enrich_visitors:
            return address, None
        return address, self.enrichment.visitor(address, headers)

    # -- connection -----------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, TrackConnection)
        assert self.store is not None
        assert self.sessions is not None
        site, visitor = ws.forget_handshake()
        codec = CODECS[ws.subprotocol or JSON_SUBPROTOCOL]
        text = not codec.binary

        def send(data: bytes) -> None:
            ws.send_now(data, text)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(connection_id=next(_ids), site=site)
        protocol = Connection(
            self.book, site, self.settings, codec, metrics.site_counts(site), visitor
        )
        del visitor  # this frame lives as long as the connection: the protocol alone holds it
        ingest = IngestConnection(protocol, ws, send, self.store, self.sessions, self._is_draining)
        ws.reader = ingest
        if self.keepalive is not None:
            self.keepalive.add(ws)
        self._connections[ws] = ingest
        opened = time.monotonic()
        open_gauge = metrics.CONNECTIONS_OPEN.labels(site)
        open_gauge.inc()
        self.peers.opened(ws.address)
        try:
            await ingest.run()
        finally:
            ws.reader = None
            del self._connections[ws]
            self.closed_connections += 1
            self.peers.closed(ws.address)
            open_gauge.dec()
            code = ws.close_code if ws.close_code is not None else 1006
            log.info(
                "connection_closed",
                close_code=code,
                close_reason=ws.close_reason or ingest.close_detail,
                duration_ms=int((time.monotonic() - opened) * 1000),
                subprotocol=codec.name,
                # flagged, dropped or kept: what the site did with a bot (never its address).
                **({"bot": protocol.bot_outcome} if protocol.bot_outcome else {}),
                **ingest.stats(),
            )

    def _is_draining(self) -> bool:
        return self._draining


def _refuse(connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
    metrics.HANDSHAKES_REFUSED.labels(str(status.value)).inc()
    return connection.respond(status, text + "\n")


def _select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # websockets' stock negotiation refuses a client that offers none with
    # HTTP 400; docs/protocol.md says no subprotocol means JSON.
    if not offered:
        return None
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    raise NegotiationError(f"offer one of {', '.join(SUBPROTOCOLS)}")


def _urlhost(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
