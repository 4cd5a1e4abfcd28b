"""The HTTP ingest listener: routes, bodies, CORS, and the batch endpoint's answers.

:class:`HttpListener` serves ``http_listen`` with aiohttp's low-level server
(llhttp in C, keep-alive, no router: three prefixes are matched by hand). It
reads each body within ``max_frame_bytes`` (``413`` past it, also after
inflating ``Content-Encoding: gzip``, which is never inflated past the limit),
decodes it by ``Content-Type``, checks the site and ``Origin`` and hands the
batch to :class:`~eventwire.http.batch.BatchRun`, which judges and stores it
through the same protocol object as a socket (docs/protocol.md section 12).

Every answer is counted in ``eventwire_http_requests{route,status}``.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from eventwire import metrics
from eventwire.core.config import Settings
from eventwire.core.connection import Connection
from eventwire.core.frames import undecodable_record
from eventwire.core.peers import PeerLimits
from eventwire.core.protocol import JSON_CODEC
from eventwire.core.rules import SiteRules, SitesBook
from eventwire.core.visitor import Enrichment, Visitor
from eventwire.http.batch import Answer, BatchRun, Buckets, retry_after_header
from eventwire.sessions import Sessions, now_ms
from eventwire.store import Store

TRACK_PREFIX: Final = "/v1/track/"
TRACK_ROUTE: Final = "/v1/track/{site}"
#: Content types of a batch body; text/plain is what navigator.sendBeacon sends
#: without a CORS preflight, and is read as JSON.
JSON_TYPES: Final = frozenset({"", "application/json", "text/plain"})
MSGPACK_TYPES: Final = frozenset({"application/msgpack", "application/x-msgpack"})
#: How long a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE: Final = "86400"
#: Idle keep-alive connections are closed after this many seconds.
KEEPALIVE_TIMEOUT: Final = 75.0

log = structlog.get_logger("eventwire.http")

#: Answers one request of a route.
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Envelope(msgspec.Struct):
    """A batch body's fields; their rules are the hello's and the track frame's."""

    uuid: Any = None
    producer: Any = None
    token: Any = None
    context: Any = None
    events: msgspec.Raw = msgspec.Raw(b"")


class Refusal(Exception):
    """A request answered before any batch runs: status, error code, detail."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_body(code: str, detail: str) -> bytes:
    """The JSON of an ``error`` message, the body of every refusal."""
    return msgspec.json.encode({"type": "error", "code": code, "detail": detail})


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request's body, inflated if gzip, never more than ``limit`` bytes.

    Raises:
        Refusal: 413 past the limit, 415 for an unknown encoding, 400 for broken gzip.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise Refusal(413, "too_large", f"the body is {length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise Refusal(413, "too_large", f"the body is over the limit of {limit} bytes")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return bytes(body)
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise Refusal(415, "unsupported_encoding", f"Content-Encoding {encoding[:32]!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by header
    try:
        # max_length bounds what one call produces: a gzip bomb stops here.
        out = inflater.decompress(bytes(body), limit + 1)
    except zlib.error as exc:
        raise Refusal(400, "undecodable", f"the {encoding} body is broken: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Refusal(413, "too_large", f"the inflated body is over the limit of {limit} bytes")
    if not inflater.eof:
        raise Refusal(400, "undecodable", f"the {encoding} body is cut short")
    return out


def as_json(body: bytes, content_type: str) -> bytes:
    """The body as JSON bytes (MessagePack is converted once).

    Raises:
        Refusal: 415 for another content type; 400 for MessagePack that does not decode.
    """
    if content_type in JSON_TYPES:
        return body
    if content_type in MSGPACK_TYPES:
        try:
            return msgspec.json.encode(msgspec.msgpack.decode(body))
        except (msgspec.DecodeError, TypeError, ValueError, RecursionError) as exc:
            detail = f"the MessagePack body does not decode: {exc}"
            raise Refusal(400, "undecodable", detail) from None
    raise Refusal(
        415, "unsupported_type", "send application/json, text/plain or application/msgpack"
    )


class HttpListener:
    """The HTTP ingest listener of one server process.

    Args:
        settings: effective settings (``http_listen``, limits).
        book: the sites' current rules.
        store: the Redis room.
        sessions: the session room.
        draining: whether the server is shutting down.
        enrichment: the visitor lookups (the gateway's); None builds one.
        peers: the per-address limits (shared with the WebSocket listener);
            None makes this listener's own.
    """

    def __init__(
        self,
        settings: Settings,
        book: SitesBook,
        store: Store,
        sessions: Sessions,
        draining: Callable[[], bool],
        enrichment: Enrichment | None = None,
        peers: PeerLimits | None = None,
    ) -> None:
        self.settings = settings
        self.book = book
        self.store = store
        self.sessions = sessions
        #: Whether the server is shutting down (new batches get 503).
        self.draining = draining
        self.buckets = Buckets()
        self.enrichment = enrichment or Enrichment(settings.trusted_proxies, settings.geoip_db)
        self.peers = peers or PeerLimits(
            settings.max_connections_per_ip, settings.handshakes_per_ip, settings.handshake_burst
        )
        self._runner: web.ServerRunner | None = None
        self.port = 0
        #: Extra routes by path (the Segment API), each a handler of the request.
        self.routes: dict[str, Handler] = {}
        #: Extra routes by path prefix: prefix -> (route template for the metrics, handler)
        #: (the admin's privacy routes, which need a request body).
        self.prefix_routes: dict[str, tuple[str, Handler]] = {}

    async def start(self, host: str, port: int) -> None:
        """Bind and serve (``SO_REUSEPORT``, so workers share the port)."""
        server = web.Server(
            self._handle,
            auto_decompress=False,  # inflated here, within the limit
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
        )
        runner = web.ServerRunner(server, shutdown_timeout=self.settings.drain_timeout)
        await runner.setup()
        site = web.TCPSite(
            runner, host, port, reuse_port=True, backlog=self.settings.listen_backlog
        )
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop accepting; requests in flight finish (up to ``drain_timeout``)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- requests -------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        handler: Handler
        if path.startswith(TRACK_PREFIX):
            route, handler = TRACK_ROUTE, self._track
        else:
            extra = self.routes.get(path)
            if extra is not None:
                route, handler = path, extra
            else:
                found = next((r for p, r in self.prefix_routes.items() if path.startswith(p)), None)
                if found is None:
                    return self._count("other", _refusal(404, "not_found", "no such route"))
                route, handler = found
        address = self.enrichment.address_of(request.remote or "", request.headers)
        refused = self.peers.admit(address, now_ms())
        if refused is not None:
            refusal = _refusal(429, "too_many_requests", refused[0])
            refusal.headers["Retry-After"] = retry_after_header(refused[1])
            return self._count(route, refusal)
        self.peers.opened(address)
        try:
            response: web.StreamResponse = await handler(request)
        except Refusal as exc:
            response = _refusal(exc.status, exc.code, exc.detail)
            if exc.status == 503:
                wait = self.settings.retry_after_ms / 1000
                response.headers["Retry-After"] = retry_after_header(wait)
        finally:
            self.peers.closed(address)
        return self._count(route, response)

    def _count(self, route: str, response: web.StreamResponse) -> web.StreamResponse:
        metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
        return response

    async def _track(self, request: web.BaseRequest) -> web.StreamResponse:
        """``POST /v1/track/{site}``: eventwire's own batch; ``OPTIONS``: its preflight."""
        site = request.path[len(TRACK_PREFIX) :]
        rules = self.book.get(site)
        if rules is None:
            raise Refusal(404, "unknown_site", f"unknown site {site[:64]!r}")
        origin = request.headers.get("Origin")
        if not rules.origin_allowed(origin):
            raise Refusal(403, "origin_not_allowed", "origin not allowed for this site")
        cors = _cors(origin)
        if request.method == "OPTIONS":
            return web.Response(status=204, headers={**cors, **_PREFLIGHT})
        if request.method != "POST":
            raise Refusal(405, "method_not_allowed", "POST a batch here")
        if self.draining():
            raise Refusal(503, "shutting_down", "server shutting down")
        body = await read_body(request, self.settings.max_frame_bytes)
        content_type = request.content_type if "Content-Type" in request.headers else ""
        address = self.enrichment.address_of(request.remote or "", request.headers)
        visitor = (
            self.enrichment.visitor(address, request.headers)
            if self.settings.enrich_visitors
            else None
        )
        answer = await self.run_batch(site, rules, as_json(body, content_type), address, visitor)
        headers = dict(cors)
        if answer.retry_after is not None:
            headers["Retry-After"] = retry_after_header(answer.retry_after)
        return web.Response(
            status=answer.status, body=answer.body, content_type="application/json", headers=headers
        )

    async def run_batch(
        self,
        site: str,
        rules: SiteRules,
        body: bytes,
        remote: str | None,
        visitor: Visitor | None = None,
    ) -> Answer:
        """Judge and store one batch body (JSON) for ``site``; its answer.

        ``remote`` keys the rate bucket; ``visitor`` (the request's, None for
        Segment calls, which carry their own context) enriches the batch.
        """
        now = now_ms()
        try:
            envelope = msgspec.json.decode(body, type=Envelope)
        except (msgspec.DecodeError, RecursionError) as exc:
            # msgspec raises RecursionError for nesting deeper than it recurses.
            detail = f"the body is not a batch: {exc}"
            await self.store.record_rejected(
                site, None, undecodable_record(site, None, detail, body, now)
            )
            return Answer(400, error_body("undecodable", detail))
        if not envelope.events:
            return Answer(400, error_body("bad_batch", "a batch needs an events array"))
        hello: dict[str, Any] = {
            "type": "hello",
            "uuid": envelope.uuid,
            "producer": envelope.producer,
        }
        if envelope.token is not None:
            hello["token"] = envelope.token
        if envelope.context is not None:
            hello["context"] = envelope.context
        track = b'{"type":"track","events":' + bytes(envelope.events) + b"}"
        protocol = Connection(
            self.book, site, self.settings, JSON_CODEC, metrics.site_counts(site), visitor
        )
        who = remote or ""
        protocol.bucket = self.buckets.get(site, who)
        answer = await BatchRun(protocol, self.store, self.sessions).run(
            msgspec.json.encode(hello), track
        )
        self.buckets.keep(site, who, protocol.bucket)
        return answer


_PREFLIGHT: Final = {
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, Authorization",
    "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
}


def _cors(origin: str | None) -> dict[str, str]:
    """Headers that let the page at an allowed ``origin`` read the answer."""
    if origin is None:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _refusal(status: int, code: str, detail: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(code, detail), content_type="application/json"
    )
