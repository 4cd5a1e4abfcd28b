"""The admin listener: health, readiness and metrics over plain HTTP.

``GET /healthz`` answers 200 while the process runs; ``GET /readyz`` answers
200 when Redis answers PING and the server is not draining, else 503;
``GET /metrics`` serves Prometheus' text format. It is a websockets server
whose ``process_request`` answers these requests before any upgrade, so the
live relay can later share the listener.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response


def _set_type(response: Response, content_type: str) -> Response:
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


class AdminListener:
    """Routes of the admin listener.

    Args:
        ready: a coroutine function telling whether the server can take events.
    """

    def __init__(self, ready: Callable[[], Awaitable[bool]]) -> None:
        self._ready = ready

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer an admin HTTP request (every path here is plain HTTP)."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if await self._ready():
                return connection.respond(HTTPStatus.OK, "ready\n")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, generate_latest().decode())
            return _set_type(response, CONTENT_TYPE_LATEST)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def handler(self, connection: ServerConnection) -> None:
        """No WebSocket route exists yet; process_request answers every request."""
        await connection.close(1008, "no such route")

    async def start(self, host: str, port: int) -> Server:
        """Start listening."""
        return await serve(
            self.handler,
            host,
            port,
            process_request=self.process_request,
            compression=None,
            server_header=None,
        )
