"""One HTTP batch carried out through the WebSocket connection's own protocol.

A ``POST /v1/track/{site}`` body is a hello and one ``track`` frame in one
request (docs/protocol.md section 12). :class:`BatchRun` feeds both to a
:class:`~eventwire.core.connection.Connection` (the same sans-I/O object that
judges every socket), carries out the commands it returns, as ``ingest`` does
for a socket, and turns its answers into an HTTP status:

- the hello opens or joins the customer's session (a member of its own, so
  the session cannot end under the batch), the frame goes through
  :meth:`Store.submit` (the same atomic step, keyed by producer and seq, so
  an event sent over the socket and again over HTTP is stored once), and the
  batch leaves the session afterwards: the session ends ``session_grace``
  after the customer's last batch or connection, reason ``closed``;
- ``ack`` -> 200 with the ack's JSON; ``nack unavailable`` -> 503 and
  ``nack rate_limited`` -> 429, both with ``Retry-After``; an ``error`` ->
  the status of :data:`ERROR_STATUS`, its JSON as the body.

The rate limit is the site's, per client address (:class:`Buckets`): the
batch's connection borrows the address' bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict, deque
from typing import Final

import msgspec

from eventwire.core.commands import (
    Close,
    Command,
    LeaveSession,
    OpenSession,
    RecordUndecodable,
    ResubmitFrame,
    Send,
    SubmitFrame,
)
from eventwire.core.connection import Connection
from eventwire.core.errors import StoreUnavailable
from eventwire.core.ordering import TokenBucket
from eventwire.ingest import Carrier
from eventwire.sessions import Sessions, now_ms
from eventwire.store import Store

#: The HTTP status of each ``error.code`` that ends a batch.
ERROR_STATUS: Final = {
    "unauthorized": 401,
    "unknown_site": 404,
    "unavailable": 503,
    "shutting_down": 503,
    "flood": 429,
}

#: Client addresses whose rate buckets are kept per process (~200 bytes each).
MAX_BUCKETS: Final = 100_000


class Answer(msgspec.Struct, gc=False):
    """What the HTTP response says: status, JSON body, and seconds to wait (or None)."""

    status: int
    body: bytes
    retry_after: float | None = None


class Buckets:
    """Rate buckets by (site, client address), the least recently used dropped past a bound."""

    def __init__(self, limit: int = MAX_BUCKETS) -> None:
        self._limit = limit
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def get(self, site: str, who: str) -> TokenBucket | None:
        """The bucket of ``who`` on ``site``, if one was kept."""
        key = (site, who)
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
        return bucket

    def keep(self, site: str, who: str, bucket: TokenBucket | None) -> None:
        """Keep the bucket a batch of ``who`` used (None: the site has no rate)."""
        if bucket is None:
            return
        self._buckets[(site, who)] = bucket
        self._buckets.move_to_end((site, who))
        while len(self._buckets) > self._limit:
            self._buckets.popitem(last=False)


class BatchRun(Carrier):
    """Carries out one batch's hello and frame; a :class:`~eventwire.store.FrameSink`.

    What it shares with a socket (submitting, opening and leaving the session,
    the store's results) is :class:`~eventwire.ingest.Carrier`'s; every
    command is awaited here in turn, and the answers become the HTTP answer.

    Args:
        protocol: a fresh connection protocol for the batch's site (JSON codec).
        store: the Redis room.
        sessions: the session room.
    """

    def __init__(self, protocol: Connection, store: Store, sessions: Sessions) -> None:
        super().__init__(protocol, store, sessions)
        self._todo: deque[Command] = deque()
        self._woken = asyncio.Event()
        #: The frame's answer (ack or nack) once sent, and the error before a close.
        self._answer: Send | None = None
        self._error: bytes | None = None
        self._close: Close | None = None

    async def run(self, hello: bytes, track: bytes) -> Answer:
        """Feed the hello, then the frame once the session is open; the batch's answer."""
        protocol = self.protocol
        try:
            await self._drive(protocol.receive(hello, now_ms()))
            if protocol.state == "open":
                await self._drive(protocol.receive(track, now_ms()))
        except TimeoutError:
            # Answered 503: a frame stored later is a duplicate when resent.
            self._todo.clear()
        finally:
            protocol.connection_lost()
            with contextlib.suppress(StoreUnavailable):
                await self._drive(protocol.finish())
            self.sessions.note_dropped_bots(self.site, protocol.bots_dropped)
        return self._result()

    def _result(self) -> Answer:
        close, answer = self._close, self._answer
        if answer is not None and answer.nack is not None:
            wait = msgspec.json.decode(answer.data).get("retry_after_ms", 0) / 1000
            return Answer(503 if answer.nack == "unavailable" else 429, answer.data, wait)
        if answer is not None and close is None:
            return Answer(200, answer.data)
        if close is not None and close.error is not None:
            status = ERROR_STATUS.get(close.error, 400)
            wait = self.protocol.settings.retry_after_ms / 1000 if status in (429, 503) else None
            return Answer(status, self._error or b"{}", wait)
        # The frame was never answered (the store outlived its timeout): say so.
        return Answer(
            503,
            b'{"type":"error","code":"unavailable","detail":"the store did not answer"}',
            self.protocol.settings.retry_after_ms / 1000,
        )

    async def _drive(self, commands: list[Command]) -> None:
        """Carry out ``commands`` and those the store's results bring, until none is due."""
        todo = self._todo
        todo.extend(commands)
        limit = self.protocol.settings.store_timeout * 3
        async with asyncio.timeout(limit):
            while True:
                while todo:
                    await self._carry_out(todo.popleft())
                if not self.protocol.unanswered or self._close is not None:
                    return
                self._woken.clear()
                await self._woken.wait()

    async def _carry_out(self, command: Command) -> None:
        protocol = self.protocol
        match command:
            case Send(data=data):
                if protocol.state == "open" and protocol.frames and self._answer is None:
                    self._answer = command
                elif protocol.state in ("closing", "closed") and self._answer is None:
                    self._error = data
            case SubmitFrame():
                self._submit(command)
            case ResubmitFrame(frame=frame):
                self._resubmit(frame)
            case OpenSession():
                await self._open(command)
            case RecordUndecodable(uuid=uuid, record=record):
                await self.store.record_rejected(self.site, uuid, record)
            case Close():
                self._close = command
            case LeaveSession(uuid=uuid):
                await self._leave(uuid)
            case _:
                raise RuntimeError(f"a batch cannot carry out {command!r}")

    def _follow(self, commands: list[Command]) -> None:
        self._todo.extend(commands)

    def _results_in(self) -> None:
        self._woken.set()


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1 (HTTP has no fractions)."""
    return str(max(1, math.ceil(seconds)))
