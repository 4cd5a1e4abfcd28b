"""The supervisor's admin listener: its own health and metrics, every other request to a child.

It answers three paths itself: ``/healthz`` (the supervisor runs),
``/readyz`` (some child listens and every listening child is ready) and
``/metrics`` (:mod:`eventwire.supervisor.scrape`; ``admin_token`` guards it
as it guards a child's). Every other request (the dashboard, ``/v1/...``,
the live relay's WebSocket) is passed through, bytes as they are, to one
listening child's admin listener, in turn: those routes read Redis, so any
child gives the same answer, and the child checks the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST

from eventwire.admin import warn_if_open
from eventwire.supervisor.scrape import CHILD_HTTP_TIMEOUT, WorkerState, child_get, scrape
from eventwire.tasks import cancel_and_wait

#: Longest request head (request line and headers) the admin listener reads.
ADMIN_HEAD_LIMIT: Final = 64 * 1024
#: How long a client of the admin listener may take to send its request head.
ADMIN_HEAD_TIMEOUT: Final = 10.0
#: Admin connections open at once (passed through ones hold two sockets and
#: two 64 KiB reads each, e.g. dashboard viewers); more are answered 503.
ADMIN_MAX_CONNECTIONS: Final = 256
#: The paths the supervisor answers itself; every other goes to a child.
OWN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


class AdminProxy:
    """The supervisor's admin listener.

    Args:
        workers: every child slot as it is now (called at each request).
        stopping: whether the supervisor is stopping (``/readyz`` says 503).
        token: the admin token (b"" if none).
    """

    def __init__(
        self,
        workers: Callable[[], Sequence[WorkerState]],
        stopping: Callable[[], bool],
        token: bytes,
    ) -> None:
        self._workers = workers
        self._stopping = stopping
        self._token = token
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._next_child = itertools.count()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one).

        Raises:
            OSError: the address cannot be bound.
        """
        warn_if_open(self._token, host, port)
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=ADMIN_HEAD_LIMIT
        )

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and end every open connection, passed through ones included."""
        if self._server is None:
            return
        self._server.close()
        await cancel_and_wait(self._connections)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One admin connection: answer /healthz, /readyz, /metrics; pass any other on."""
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= ADMIN_MAX_CONNECTIONS:
            await _respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, "too many admin connections\n")
            return
        self._connections.add(task)
        try:
            try:
                async with asyncio.timeout(ADMIN_HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await _respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                writer.close()
                return
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0].decode("latin-1")
            if path not in OWN_PATHS:
                await self._pass_through(head, reader, writer)
            elif method != b"GET":
                await _respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, "GET only\n")
            else:
                await self._answer(path, head, writer)
        finally:
            self._connections.discard(task)

    async def _answer(self, path: str, head: bytes, writer: asyncio.StreamWriter) -> None:
        """Answer one of :data:`OWN_PATHS`."""
        if path == "/healthz":
            await _respond(writer, HTTPStatus.OK, "ok\n")
        elif path == "/readyz":
            workers = self._workers()
            ready, listening = await _readiness(workers)
            text = f"{ready} of {len(workers)} workers ready, {listening} listening\n"
            if ready and ready == listening and not self._stopping():
                await _respond(writer, HTTPStatus.OK, "ready: " + text)
            else:
                await _respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, "not ready: " + text)
        elif self._token and not hmac.compare_digest(_bearer(head), self._token):
            # The same rule as a child's admin listener (eventwire.admin).
            await _respond(
                writer,
                HTTPStatus.UNAUTHORIZED,
                "admin token required\n",
                headers={"WWW-Authenticate": 'Bearer realm="eventwire-admin"'},
            )
        else:
            body = await scrape(self._workers(), self._token)
            await _respond(writer, HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    async def _pass_through(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Relay the connection to a listening child's admin listener, bytes as they are."""
        listening = [w for w in self._workers() if w.listening]
        child: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        if listening:
            w = listening[next(self._next_child) % len(listening)]
            try:
                async with asyncio.timeout(CHILD_HTTP_TIMEOUT):
                    child = await asyncio.open_connection("127.0.0.1", w.admin_port)
            except (OSError, TimeoutError):
                child = None
        if child is None:
            await _respond(writer, HTTPStatus.BAD_GATEWAY, "no worker answers\n")
            return
        child_reader, child_writer = child
        child_writer.write(head)
        pipes = [
            asyncio.create_task(_pipe(reader, child_writer)),
            asyncio.create_task(_pipe(child_reader, writer)),
        ]
        try:
            # Either side ending ends the exchange: a child closes after each
            # HTTP answer, and a WebSocket ends with its closing handshake.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(pipes)
            child_writer.close()
            writer.close()


async def _readiness(workers: Sequence[WorkerState]) -> tuple[int, int]:
    """How many children answer /readyz 200, and how many listen."""
    listening = [w for w in workers if w.listening]
    answers = await asyncio.gather(*(child_get(w.admin_port, "/readyz") for w in listening))
    return sum(1 for status, _ in answers if status == 200), len(listening)


async def _respond(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
) -> None:
    """Write one HTTP answer and close the connection."""
    data = body.encode()
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + data)
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file or an error."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass


def _bearer(head: bytes) -> bytes:
    """The token of an ``Authorization: Bearer`` header in a request head; b"" if none."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return b""
