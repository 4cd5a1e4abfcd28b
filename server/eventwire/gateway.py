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
import itertools
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
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

log = structlog.get_logger("eventwire.gateway")
_ids = itertools.count(1)


class TrackConnection(ServerConnection):
    """A websockets connection that remembers its site and can answer without waiting."""

    site: str = ""
    #: The client address (after ``trusted_proxies``), raw: in memory only.
    address: str = ""
    #: What the handshake said of the visitor (None: enrichment is off).
    visitor: Visitor | None = None

    def send_now(self, data: bytes, text: bool) -> None:
        """Queue one message on the transport now; drop it if the connection is closing.

        ``send()`` is a coroutine with a context manager and a drain per call,
        which costs more than the rest of an ack. Acks are small and the
        receive loop reads no more frames while the transport is paused, so
        what is written here stays bounded by ``max_inflight_frames`` answers.
        A dropped answer is harmless: the client resends unanswered frames
        after reconnecting.
        """
        if self.protocol.state is not OPEN:
            return
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self.send_data()


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
        self.store: Store | None = None
        self.sessions: Sessions | None = None
        self.public: Server | None = None
        self.admin: Server | None = None
        #: The HTTP ingest listener (``http_listen``), once started; None when not served.
        self.http: HttpListener | None = None
        #: The admin routes (health, metrics, dashboard, live relay), once started.
        self.admin_routes: AdminListener | None = None
        self._connections: dict[TrackConnection, IngestConnection] = {}
        self._draining = False
        self._stopped = asyncio.Event()
        self.files = StaticFiles(PUBLIC_FILES)
        #: The visitor lookups (trusted proxies, country database), built once.
        self.enrichment = Enrichment(settings.trusted_proxies, settings.geoip_db)
        #: Per-address limits, shared by the WebSocket and HTTP listeners.
        self.peers = PeerLimits(
            settings.max_connections_per_ip, settings.handshakes_per_ip, settings.handshake_burst
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
        host, port = settings.listen_addr
        self.public = await serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            create_connection=TrackConnection,
            compression=None,
            max_size=settings.max_frame_bytes,
            # Incoming frames queued per connection before TCP backpressure.
            max_queue=(16, 4),
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            open_timeout=settings.hello_timeout,
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
        site = ws.site
        codec = CODECS[ws.subprotocol or JSON_SUBPROTOCOL]
        text = not codec.binary

        def send(data: bytes) -> None:
            ws.send_now(data, text)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(connection_id=next(_ids), site=site)
        protocol = Connection(
            self.book, site, self.settings, codec, metrics.site_counts(site), ws.visitor
        )
        ingest = IngestConnection(protocol, ws, send, self.store, self.sessions, self._is_draining)
        self._connections[ws] = ingest
        opened = time.monotonic()
        open_gauge = metrics.CONNECTIONS_OPEN.labels(site)
        open_gauge.inc()
        self.peers.opened(ws.address)
        try:
            await ingest.run()
        finally:
            del self._connections[ws]
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
