"""The admin listener: health, metrics, the dashboard and the live relay.

Routes (one websockets server; ``process_request`` answers every plain HTTP
request before any upgrade):

- ``GET /healthz``: 200 while the process runs. ``GET /readyz``: 200 when
  Redis answers PING and the server is not draining, else 503. Both stay
  open: load balancers probe them.
- ``GET /dashboard`` (and its ``.css``/``.js``): the live dashboard, plain
  files from ``server/static/``. The files hold no data, so they are served
  to anyone; the page asks for the token when the data routes answer 401.
- ``GET /metrics``: Prometheus' text format.
- ``GET /v1/sites``: the configured sites, for the dashboard's chooser.
- ``GET /v1/sites/{site}/summary``: open sessions, both streams' length and
  ends, and Redis' clock.
- ``GET /v1/sites/{site}/rollups?range=1h|24h|7d``: the stored per-minute
  rollups of a range (:mod:`eventwire.persist.ranges`), read from the store
  ``persist_dsn`` names (the persist worker's own setting).
- ``GET /v1/sites/{site}/customers/{uuid}``: what Redis knows of a uuid's
  merges (the dashboard's customer timeline follows the aliases).
- ``WS /v1/live?site=S...``: the live relay (:mod:`eventwire.live`).
- ``POST /v1/sites/{site}/forget`` and ``.../unsuppress`` (:meth:`AdminListener.privacy`):
  served on the HTTP listener, since this one (websockets) reads no request
  body; the admin token is required there, and without one set only a
  loopback peer may call them.

Access: with ``admin_token`` set, every route from ``/metrics`` on needs it, compared in constant
time: ``Authorization: Bearer <token>``, or, from a browser's WebSocket,
which cannot set headers, the subprotocol ``eventwire.token.<base64url of
the token>`` offered beside ``eventwire.live.v1``. Never in the URL: URLs
land in logs. Without a token they are open to whoever reaches the
listener, which binds 127.0.0.1 by default. Either way a browser may open
``/v1/live`` only from a page of this listener (``Origin`` must name the
``Host``), so another site open in the operator's browser cannot read the
streams.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Annotated, Final
from urllib.parse import parse_qsl, urlsplit

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from eventwire import privacy
from eventwire.core.config import is_loopback
from eventwire.core.errors import StoreUnavailable
from eventwire.live import LiveQuery, Relay, parse_query
from eventwire.pages import StaticFiles
from eventwire.persist.ranges import RANGES, RollupReader, RollupsUnavailable
from eventwire.store import Keys, SiteSnapshot, Store, StreamInfo
from eventwire.store.survey import find_site, group_state

log = structlog.get_logger("eventwire.admin")

#: The dashboard's files on the admin listener.
ADMIN_FILES: Final = {
    "/dashboard": "dashboard.html",
    "/dashboard/dashboard.css": "dashboard.css",
    "/dashboard/dashboard.js": "dashboard.js",
    "/dashboard/dashboard.svg": "dashboard.svg",
}
LIVE_PATH: Final = "/v1/live"
SITES_PATH: Final = "/v1/sites"
#: The privacy routes on the HTTP listener: POST {prefix}{site}/forget, .../unsuppress.
PRIVACY_PREFIX: Final = "/v1/sites/"
PRIVACY_ROUTE: Final = "/v1/sites/{site}/forget"
#: Peers that may call the privacy routes when no admin_token is set.
_LOOPBACK_PEERS: Final = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
#: The relay's subprotocol, and the prefix of the one that carries the token.
LIVE_SUBPROTOCOL: Final = "eventwire.live.v1"
TOKEN_SUBPROTOCOL: Final = "eventwire.token."
#: How long closing a viewer may wait for its close frame; a viewer that does
#: not read would otherwise hold the server's stop for websockets' default 10 s.
CLOSE_TIMEOUT: Final = 2.0


class ForgetRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/sites/{site}/forget`` (and ``unsuppress``, which takes the uuid)."""

    uuid: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
    suppress: bool = False
    dry_run: bool = False


def _set_type(response: Response, content_type: str) -> Response:
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


class _Stream(msgspec.Struct, kw_only=True):
    length: int
    first_id: str | None
    last_id: str


class _Summary(msgspec.Struct, kw_only=True):
    site: str
    now: int
    open_sessions: int
    events: _Stream | None
    rejected: _Stream | None
    #: [ext] Entries the persist group has not acknowledged (None: no group yet).
    backlog: int | None = None
    #: [ext] Where frames are refused (``max_backlog`` x partitions; 0: ``on_backlog = "trim"``).
    max_backlog: int = 0


class _Sites(msgspec.Struct, kw_only=True):
    sites: list[str]
    #: What the dashboard's per-second counts go by.
    time_basis: str = "stream id"
    stream_maxlen: int
    persist_retain: float


def _stream(info: StreamInfo | None) -> _Stream | None:
    if info is None:
        return None
    return _Stream(length=info.length, first_id=info.first_id, last_id=info.last_generated_id)


def warn_if_open(token: bytes | str, host: str, port: int) -> None:
    """Log ``admin_open`` when the admin routes listen beyond this machine without a token."""
    if not token and not is_loopback(host):
        log.warning(
            "admin_open",
            admin=f"{host}:{port}",
            hint="the dashboard, the live relay and /metrics are open to the network: "
            "set admin_token",
        )


def token_subprotocol(token: str) -> str:
    """The subprotocol that carries ``token`` (base64url without padding)."""
    return TOKEN_SUBPROTOCOL + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def _offered_token(request: Request) -> str | None:
    """The token a request carries: Bearer header, or the token subprotocol."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for line in request.headers.get_all("Sec-WebSocket-Protocol"):
        for offered in line.split(","):
            offered = offered.strip()
            if offered.startswith(TOKEN_SUBPROTOCOL):
                text = offered[len(TOKEN_SUBPROTOCOL) :]
                try:
                    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return None
    return None


def _same_origin(request: Request) -> bool:
    """Whether a browser's ``Origin`` names this listener (no Origin: not a browser)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    host = request.headers.get("Host", "")
    try:
        return urlsplit(origin).netloc.lower() == host.lower() and bool(host)
    except ValueError:
        return False


class AdminConnection(ServerConnection):
    """An admin connection that remembers the relay query its handshake checked."""

    live: LiveQuery | None = None


def _select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # The token subprotocol only carries the token; the relay's own name is the
    # one to answer with. Offering nothing is fine (non-browser viewers).
    return Subprotocol(LIVE_SUBPROTOCOL) if LIVE_SUBPROTOCOL in offered else None


class AdminListener:
    """Routes of the admin listener.

    Args:
        ready: a coroutine function telling whether the server can take events.
        store: Redis access, the settings and the sites.
    """

    def __init__(self, ready: Callable[[], Awaitable[bool]], store: Store) -> None:
        self._ready = ready
        self.store = store
        self.settings = store.settings
        self.relay = Relay(store)
        self.files = StaticFiles(ADMIN_FILES, max_age=0)
        self._token = self.settings.admin_token.encode()
        #: The stored rollups, read from the persist worker's store (connected on first use).
        self.rollups = RollupReader(self.settings.persist_dsn)

    async def start_tallies(self) -> None:
        """With ``live_tally_at_start``: every site's rollups, started now and kept."""
        if self.settings.live_tally_at_start:
            await self.relay.start_tallies(
                {site: rules.config.partitions for site, rules in self.store.book.sites.items()}
            )

    async def close(self) -> None:
        """Stop the relay's tallies and readers; release the store connection of the rollups."""
        await self.relay.close()
        await self.rollups.close()

    def authorized(self, request: Request) -> bool:
        """Whether a request may see data: no ``admin_token`` set, or it carries it."""
        if not self._token:
            return True
        offered = _offered_token(request)
        return offered is not None and hmac.compare_digest(offered.encode(), self._token)

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer an admin HTTP request; None lets ``/v1/live`` upgrade."""
        path, _, query = request.path.partition("?")
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if await self._ready():
                return connection.respond(HTTPStatus.OK, "ready\n")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path in self.files:
            return self.files.respond(path, request)
        if path not in ("/metrics", LIVE_PATH, SITES_PATH) and not path.startswith(
            SITES_PATH + "/"
        ):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not self.authorized(request):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "admin token required\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="eventwire-admin"'
            return response
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, generate_latest().decode())
            return _set_type(response, CONTENT_TYPE_LATEST)
        if path == SITES_PATH:
            sites = _Sites(
                sites=sorted(self.store.book.sites),
                stream_maxlen=self.settings.stream_maxlen,
                persist_retain=self.settings.persist_retain,
            )
            return _json(connection, HTTPStatus.OK, sites)
        if path.startswith(SITES_PATH + "/"):
            return await self._summary(connection, path[len(SITES_PATH) + 1 :], query)
        return await self._live(connection, request, query)

    async def _live(
        self, connection: ServerConnection, request: Request, query: str
    ) -> Response | None:
        if not _same_origin(request):
            return connection.respond(
                HTTPStatus.FORBIDDEN, "the live relay answers pages of this listener only\n"
            )
        # A site the sites file does not name is followed when Redis holds its
        # streams (another process' file may name it): its partitions are
        # those Redis shows.
        found: dict[str, int] = {}
        site = next((v for k, v in parse_qsl(query) if k == "site"), "")
        if site and self.store.book.get(site) is None:
            try:
                partitions = await find_site(self.store.redis, self.store.keys, site)
            except StoreUnavailable as exc:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n")
            if partitions is not None:
                found[site] = partitions
        parsed = parse_query(
            query,
            lambda s: s in found or self.store.book.get(s) is not None,
            lambda s: found.get(s) or self.store.partitions(s),
        )
        if not isinstance(parsed, LiveQuery):
            status, text = parsed
            return connection.respond(status, text + "\n")
        if self.relay.full():
            return connection.respond(
                HTTPStatus.SERVICE_UNAVAILABLE, "too many live viewers; try again later\n"
            )
        assert isinstance(connection, AdminConnection)
        connection.live = parsed
        return None

    async def _summary(self, connection: ServerConnection, rest: str, query: str) -> Response:
        site, _, tail = rest.partition("/")
        if tail.startswith("customers/"):
            return await self._customer(connection, site, tail[len("customers/") :])
        if tail not in ("summary", "rollups"):
            return connection.respond(
                HTTPStatus.NOT_FOUND,
                "not found; see /v1/sites/{site}/summary and /v1/sites/{site}/rollups\n",
            )
        if self.store.book.get(site) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown site {site[:64]!r}\n")
        if tail == "rollups":
            return await self._rollups(connection, site, query)
        try:
            snap: SiteSnapshot = await self.store.site_summary(site)
        except StoreUnavailable as exc:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n")
        rules = self.store.book.get(site)
        assert rules is not None
        tags = self.store.tags(site)
        try:
            groups = [
                await group_state(self.store.redis, self.store.keys.events(tag), Keys.PERSIST_GROUP)
                for tag in tags
            ]
        except StoreUnavailable as exc:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n")
        backlog = None
        if groups and all(g.grouped and g.lag is not None for g in groups):
            backlog = sum(g.pending + (g.lag or 0) for g in groups)
        summary = _Summary(
            site=site,
            now=snap.now_ms,
            open_sessions=snap.open_sessions,
            events=_stream(snap.events),
            rejected=_stream(snap.rejected),
            backlog=backlog,
            max_backlog=rules.backlog_limit(self.settings) * len(tags),
        )
        return _json(connection, HTTPStatus.OK, summary)

    async def _rollups(self, connection: ServerConnection, site: str, query: str) -> Response:
        """A range view of the stored rollups: 400 for a wrong range, 503 while the store
        cannot answer (missing, unreachable, not migrated yet)."""
        params = parse_qsl(query)
        unknown = sorted({k for k, _ in params} - {"range"})
        ranges = [v for k, v in params if k == "range"]
        if unknown or len(ranges) != 1 or ranges[0] not in RANGES:
            why = f"unknown parameter {unknown[0][:32]!r}; " if unknown else ""
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                f"{why}range must be one of {', '.join(RANGES)} (5 minutes: the live relay)\n",
            )
        try:
            view = await self.rollups.view(site, ranges[0], int(time.time() * 1000))
        except RollupsUnavailable as exc:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n")
        return _json(connection, HTTPStatus.OK, view)

    async def _customer(self, connection: ServerConnection, site: str, uuid: str) -> Response:
        """``GET /v1/sites/{site}/customers/{uuid}``: the uuid's merges as Redis holds them."""
        if self.store.book.get(site) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown site {site[:64]!r}\n")
        try:
            msgspec.convert({"uuid": uuid}, ForgetRequest)
        except msgspec.ValidationError:
            return connection.respond(
                HTTPStatus.BAD_REQUEST, "uuid must be 1-64 characters of [A-Za-z0-9._:-]\n"
            )
        try:
            found = await privacy.customer_links(
                self.store.redis, self.store.keys, site, self.store.partitions(site), uuid
            )
        except StoreUnavailable as exc:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n")
        response = connection.respond(HTTPStatus.OK, msgspec.json.encode(found).decode())
        response.headers["Cache-Control"] = "no-store"
        return _set_type(response, "application/json")

    async def privacy(self, request: web.BaseRequest) -> web.StreamResponse:
        """``POST /v1/sites/{site}/forget`` or ``/unsuppress`` (on the HTTP listener).

        Answers 401 without the admin token (403 from a non-loopback peer when
        none is set), 404 for another path or an unknown site, 405 for another
        method, 400 for a bad body, 503 when Redis or the store did not answer
        (with the counts of what was done, when some was), else 200 with the
        counts per place.
        """
        site, _, op = request.path[len(PRIVACY_PREFIX) :].partition("/")
        if op not in ("forget", "unsuppress"):
            return _problem(404, "not_found", "no such route")
        if not self._token:
            if request.remote not in _LOOPBACK_PEERS:
                return _problem(
                    403, "forbidden", "set admin_token to call this route from another machine"
                )
        else:
            auth = request.headers.get("Authorization", "")
            offered = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(offered.encode(), self._token):
                response = _problem(401, "unauthorized", "admin token required")
                response.headers["WWW-Authenticate"] = 'Bearer realm="eventwire-admin"'
                return response
        if request.method != "POST":
            return _problem(405, "method_not_allowed", f'POST {{"uuid": ...}} to {op}')
        if self.store.book.get(site) is None:
            return _problem(404, "unknown_site", f"unknown site {site[:64]!r}")
        try:
            body = msgspec.json.decode(await request.read(), type=ForgetRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _problem(400, "bad_request", f"invalid body: {exc}")
        store = self.store
        parts = store.partitions(site)
        try:
            if op == "unsuppress":
                done = await privacy.unsuppress(
                    store.redis, store.keys, store.subjects, site, parts, body.uuid
                )
                return web.json_response(done)
            sink = privacy.open_store(self.settings.persist_dsn)
            if sink is not None:
                await sink.open()
            try:
                done = await privacy.forget(
                    store.redis,
                    store.keys,
                    store.subjects,
                    sink,
                    site,
                    parts,
                    body.uuid,
                    suppress=body.suppress,
                    dry_run=body.dry_run,
                )
            finally:
                if sink is not None:
                    await sink.close()
        except privacy.ForgetIncomplete as exc:
            return web.json_response({**exc.counts, "error": str(exc)}, status=503)
        except StoreUnavailable as exc:
            return _problem(503, "unavailable", f"Redis did not answer: {exc}")
        except Exception as exc:  # the store's driver (sqlite3, asyncpg) failing to open
            log.exception("privacy_store_failed", site=site)
            return _problem(503, "unavailable", f"the store did not answer: {exc!r}")
        log.info("privacy_forget", site=site, subject=done["subject"], dry_run=body.dry_run)
        return web.json_response(done)

    async def handler(self, connection: ServerConnection) -> None:
        """Run a live viewer (the only WebSocket route)."""
        assert isinstance(connection, AdminConnection)
        if connection.live is None:  # process_request lets nothing else upgrade
            await connection.close(1008, "no such route")
            return
        await self.relay.serve(connection, connection.live)

    async def start(self, host: str, port: int) -> Server:
        """Start listening; warns when the data routes are open beyond this machine."""
        warn_if_open(self._token, host, port)
        return await serve(
            self.handler,
            host,
            port,
            process_request=self.process_request,
            select_subprotocol=_select_subprotocol,
            create_connection=AdminConnection,
            compression=None,
            server_header=None,
            close_timeout=CLOSE_TIMEOUT,
            # Viewers send nothing: one small queue of incoming frames is plenty.
            max_size=4096,
            max_queue=4,
        )


def _json(connection: ServerConnection, status: HTTPStatus, body: msgspec.Struct) -> Response:
    response = connection.respond(status, msgspec.json.encode(body).decode())
    response.headers["Cache-Control"] = "no-store"
    return _set_type(response, "application/json")


def _problem(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"type": "error", "code": code, "detail": detail}, status=status)
