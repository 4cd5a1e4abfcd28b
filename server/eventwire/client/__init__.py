"""The async Python client of the tracking protocol (PROTOCOL.md sections 2-4).

This module owns the client half of the delivery guarantee: it numbers events
(``seq``), holds every event until the server has answered it, batches events
into ``track`` frames, pipelines up to ``max_inflight`` frames, and resends
what was not stored after a ``nack`` or a lost connection, in seq order and
with the original seqs, so that the server's de-duplication makes delivery
exactly-once in the stream. Messages are the Structs and codecs of
:mod:`eventwire.core.protocol`; nothing here describes the wire by hand.

One :class:`EventwireClient` is one producer. Use it from the event loop that
started it; it is not thread-safe. Tests and the benchmark depend on its
public names.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import deque
from collections.abc import Callable
from itertools import islice
from time import perf_counter, time_ns
from types import TracebackType
from typing import Any, Final, Literal
from uuid import uuid4

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from eventwire.core.protocol import (
    CODECS,
    JSON_SUBPROTOCOL,
    MSGPACK_SUBPROTOCOL,
    Ack,
    Error,
    Hello,
    Nack,
    Rejection,
    ServerMessage,
    Track,
    Welcome,
    WireEvent,
)
from eventwire.tasks import cancel_and_wait

CLIENT_NAME: Final = "eventwire-py/0.1"

#: How long the opening handshake, and then the welcome, may take.
WELCOME_TIMEOUT: Final = 10.0

#: How long closing the socket may wait for the server's close frame.
CLOSE_TIMEOUT: Final = 5.0

#: Close codes that a reconnect will meet again (policy, undecodable, too large):
#: backoff keeps growing across them even when a welcome came first.
POLICY_CLOSE_CODES: Final = frozenset({1007, 1008, 1009})

#: Handshake answers that a reconnect will meet again (origin refused, unknown site).
REFUSED_STATUSES: Final = frozenset({403, 404})

#: Bytes a track frame adds around its events' encodings, rounded up; a single
#: event larger than ``max_frame_bytes`` minus this can never be sent.
FRAME_OVERHEAD: Final = 64

#: Exponent cap of the backoff: 2**32 * backoff_base exceeds any sane backoff_max.
_MAX_EXPONENT: Final = 32

log = structlog.get_logger("eventwire.client")


class EventwireClientError(Exception):
    """Root of the errors the client raises on purpose."""


class BufferFull(EventwireClientError):
    """``max_buffer`` events are held unacknowledged; the new event was not taken."""


class ClientClosed(EventwireClientError):
    """The client is closed, or was never started, so held events cannot be acked."""


class _Frame:
    """A track frame sent on the current connection and not answered yet."""

    __slots__ = ("events", "sent_at")

    def __init__(self, events: list[WireEvent], sent_at: float) -> None:
        self.events = events
        self.sent_at = sent_at


def _now_ms() -> int:
    return time_ns() // 1_000_000


class EventwireClient:
    """An async tracking client: ``track()`` buffers, a background task delivers.

    Args:
        url: the full track URL, ``ws://host:port/v1/track/{site}``.
        uuid: the customer reference; a random UUIDv4 string by default.
        producer: the producer id; by default ``py-`` and 24 random hex
            characters, kept for the client's lifetime. Seqs start at 1 for
            every client object, so a fixed producer must not be reused by a
            later client object within ``producer_ttl``: the server would
            report its events as already stored (``welcome.acked``).
        token: a JWT proving the customer, sent in the hello.
        encoding: ``json`` (text frames) or ``msgpack`` (binary frames).
        origin: an ``Origin`` header to send; none by default.
        context: free-form hints copied onto the server's ``session.start``.
        batch_size: the most events in one track frame (also capped by
            ``welcome.max_batch``).
        max_inflight: the most frames sent and not yet answered.
        linger: seconds to wait for more events after a partial frame before
            sending the next partial frame; a full frame goes at once.
        max_buffer: the most events held unacknowledged; ``track()`` raises
            :class:`BufferFull` beyond it.
        backoff_base: first reconnect delay bound, in seconds.
        backoff_max: reconnect delay bound, in seconds.
        on_ack: called with each ack and the seconds between sending its
            frame and receiving the ack. It runs in the receive loop: keep it
            short; an exception it raises is logged and ignored.
        max_frame_bytes: the most bytes of one encoded track frame; a larger
            batch is split. Keep it at or below the server's
            ``max_frame_bytes`` (default 256 KiB), which closes 1009 above it.

    Raises:
        ValueError: a URL, identifier or limit is not valid.
        TypeError: ``context`` holds a value the encoding cannot carry.
    """

    def __init__(
        self,
        url: str,
        uuid: str | None = None,
        *,
        producer: str | None = None,
        token: str | None = None,
        encoding: Literal["json", "msgpack"] = "json",
        origin: str | None = None,
        context: dict[str, Any] | None = None,
        batch_size: int = 100,
        max_inflight: int = 4,
        linger: float = 0.005,
        max_buffer: int = 100_000,
        backoff_base: float = 0.1,
        backoff_max: float = 10.0,
        on_ack: Callable[[Ack, float], None] | None = None,
        max_frame_bytes: int = 256 * 1024,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(str(exc)) from None
        if encoding == "json":
            self._codec = CODECS[JSON_SUBPROTOCOL]
            self._probe: msgspec.json.Encoder | msgspec.msgpack.Encoder = msgspec.json.Encoder()
        elif encoding == "msgpack":
            self._codec = CODECS[MSGPACK_SUBPROTOCOL]
            self._probe = msgspec.msgpack.Encoder()
        else:
            raise ValueError(f"encoding must be json or msgpack, got {encoding!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("max_inflight", max_inflight),
            ("max_buffer", max_buffer),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if linger < 0 or backoff_base <= 0 or backoff_max < backoff_base:
            raise ValueError("need linger >= 0 and 0 < backoff_base <= backoff_max")
        if max_frame_bytes < 2 * FRAME_OVERHEAD:
            raise ValueError(f"max_frame_bytes must be at least {2 * FRAME_OVERHEAD}")
        self.url = url
        self.uuid = uuid if uuid is not None else str(uuid4())
        self.producer = producer if producer is not None else "py-" + secrets.token_hex(12)
        self._hello = self._codec.encode_client(
            Hello(
                uuid=self.uuid,
                producer=self.producer,
                token=token,
                client=CLIENT_NAME,
                context=context,
            )
        )
        try:
            # The server's own decoder is the authority on what a valid hello is;
            # a bad one here would otherwise only show as endless 1008 closes.
            self._codec.decode(self._hello)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid hello: {exc}") from None
        self._origin = Origin(origin) if origin is not None else None
        self._batch_size = batch_size
        self._max_inflight = max_inflight
        self._linger = linger
        self._max_buffer = max_buffer
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._on_ack = on_ack
        self._max_frame_bytes = max_frame_bytes

        #: The last welcome received.
        self.welcome: Welcome | None = None
        #: Every rejection received, in order.
        self.rejections: list[Rejection] = []
        #: Events the server stored, per its acks.
        self.accepted = 0
        #: Events the server had already stored, per its acks.
        self.duplicate = 0
        #: Events dropped without an ack because ``welcome.acked`` covered them.
        self.skipped = 0
        #: Nacks received.
        self.nacks = 0
        #: Welcomes received: connections that got past the hello.
        self.connects = 0
        #: The last ``error`` message from the server.
        self.closed_error: Error | None = None
        #: Why the last connection was refused or closed by policy, for a person to read.
        self.last_problem: str | None = None

        self._seq = 0
        # Unacked events live in three places, in seq order across them:
        # _retry (nacked, waiting for the frames after them to be answered),
        # then _inflight (sent, unanswered), then _pending (not sent yet).
        self._retry: list[WireEvent] = []
        self._inflight: deque[_Frame] = deque()
        self._pending: deque[WireEvent] = deque()
        self._held = 0
        self._retry_after = 0.0
        self._resume_at = 0.0
        self._last_partial = float("-inf")
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None

    # -- public API -----------------------------------------------------------

    async def start(self) -> None:
        """Start the background task that connects and delivers; returns at once.

        Calling it again while the client runs does nothing.

        Raises:
            ClientClosed: the client was closed.
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"eventwire-client {self.producer}")

    async def __aenter__(self) -> EventwireClient:
        """Start the client (see :meth:`start`).

        Returns:
            The client itself.
        """
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client: flush first (see :meth:`close`) unless leaving on an exception.

        Raises:
            TimeoutError: the flush did not finish within close()'s default timeout.
        """
        # Leaving on an exception should not wait up to the flush timeout as well.
        await self.close(flush=exc_type is None)

    def track(
        self,
        action: str,
        params: dict[str, Any] | None = None,
        label: str | None = None,
        time: int | None = None,
    ) -> int:
        """Number an event, buffer it for delivery and return its seq.

        Args:
            action: ``context.activity``, e.g. ``page.visit``; the server
                judges its form (``invalid_action``).
            params: the event's parameters. The dict is copied shallowly:
                do not mutate nested values until the event is acked.
            label: a human-readable label; the server fills a default.
            time: milliseconds since the Unix epoch; default now, so that an
                event buffered through an outage keeps the time it happened.

        Returns:
            The event's seq: 1, 2, 3... for this client.

        Raises:
            ClientClosed: the client was closed.
            BufferFull: ``max_buffer`` events are held unacknowledged.
            TypeError: ``params`` hold a value the encoding cannot carry.
            ValueError: the event alone is larger than ``max_frame_bytes``,
                or a value is out of the encoding's range (an integer
                beyond 64 bits in MessagePack).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._held >= self._max_buffer:
            raise BufferFull(f"{self._held} events are unacknowledged (max_buffer)")
        event = WireEvent(
            seq=self._seq + 1,
            action=action,
            label=label,
            time=time if time is not None else _now_ms(),
            params=dict(params) if params is not None else None,
        )
        # Encode once here so that a bad event fails its caller, not the sender task.
        try:
            size = len(self._probe.encode(event))
        except (msgspec.EncodeError, OverflowError) as exc:
            raise ValueError(f"event cannot be encoded: {exc}") from None
        if size + FRAME_OVERHEAD > self._max_frame_bytes:
            raise ValueError(
                f"event encodes to {size} bytes; it cannot fit a frame of "
                f"max_frame_bytes={self._max_frame_bytes}"
            )
        self._seq += 1
        self._pending.append(event)
        self._held += 1
        self._wake.set()
        return self._seq

    # The timeout parameters are the public API the tests and the benchmark use.
    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until every event tracked so far is answered.

        Answered means stored, duplicate (stored before), or rejected. Events
        tracked while waiting are not waited for.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Raises:
            TimeoutError: some events were still unanswered after ``timeout``;
                they stay buffered and delivery goes on.
            ClientClosed: events are held but the client is not running.
        """
        target = self._seq
        if self._oldest_unacked() > target:
            return
        if self._task is None or self._closed:
            raise ClientClosed(f"{self._held} events are held but the client is not running")
        entry = (target, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        # A waiting flush must not also wait out the linger.
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await entry[1]
        except TimeoutError:
            raise TimeoutError(
                f"{self._held} events still unacknowledged after {timeout} s"
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def close(self, flush: bool = True, timeout: float | None = 10) -> None:  # noqa: ASYNC109
        """Optionally flush, then close the socket (1000) and stop the background task.

        Args:
            flush: wait for every tracked event to be answered first.
            timeout: seconds the flush may take; None waits for ever.

        Raises:
            TimeoutError: the flush did not finish in time. The client is
                closed anyway; events still held are dropped.
        """
        try:
            if flush and self._task is not None and not self._closed:
                await self.flush(timeout)
        finally:
            await self._shutdown()

    # -- background task ------------------------------------------------------

    async def _shutdown(self) -> None:
        self._closed = True
        self._stop.set()
        self._wake.set()
        ws = self._ws
        if ws is not None:
            await ws.close(1000, "client closing")
        task = self._task
        if task is not None:
            # Whatever the task waits on now (a handshake, a backoff) is not
            # worth waiting for: the socket is closed, events are not resent.
            await cancel_and_wait([task])
            self._task = None
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(ClientClosed("the client was closed"))

    async def _run(self) -> None:
        """Connect, converse, reconnect with backoff, until closed."""
        attempt = 0
        # Consecutive connections that ended in a way a reconnect will meet again.
        strikes = 0
        while not self._closed:
            try:
                welcomed, refused = await self._connect_once()
            except Exception:
                log.exception("client_failed", url=self.url, producer=self.producer)
                welcomed, refused = False, False
            if welcomed:
                attempt = 0
            if refused:
                # A welcome reset the attempts, but this will happen again: keep
                # the delay growing so a misconfigured client does not spin.
                attempt = max(attempt, strikes)
                strikes += 1
            elif welcomed:
                strikes = 0
            bound = min(self._backoff_max, self._backoff_base * 2 ** min(attempt, _MAX_EXPONENT))
            attempt += 1
            # Returns at once when closing; the loop condition then ends the task.
            await self._sleep(random.uniform(0, bound))

    async def _sleep(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _connect_once(self) -> tuple[bool, bool]:
        """One connection's life.

        Returns:
            Whether a welcome came, and whether the connection was refused or
            closed for a reason a reconnect will meet again.
        """
        welcomed = False
        try:
            async with connect(
                self.url,
                origin=self._origin,
                subprotocols=[Subprotocol(self._codec.name)],
                compression=None,
                proxy=None,
                open_timeout=WELCOME_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                user_agent_header=CLIENT_NAME,
            ) as ws:
                if ws.subprotocol != self._codec.name:
                    log.warning(
                        "subprotocol_refused",
                        url=self.url,
                        offered=self._codec.name,
                        got=ws.subprotocol,
                    )
                    return False, True
                self._ws = ws
                try:
                    welcomed = await self._converse(ws)
                finally:
                    self._ws = None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in REFUSED_STATUSES:
                body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                self.last_problem = f"HTTP {status}: {body}"
                log.warning(
                    "handshake_refused",
                    url=self.url,
                    status=status,
                    body=body,
                )
                return False, True
            log.debug("handshake_failed", url=self.url, status=status)
            return False, False
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self.last_problem = f"cannot connect: {exc or type(exc).__name__}"
            log.debug("connect_failed", url=self.url, error=str(exc) or type(exc).__name__)
            return False, False
        finally:
            self._requeue()
        code = ws.close_code
        if code in POLICY_CLOSE_CODES:
            error = self.closed_error
            self.last_problem = f"closed {code}: {error.detail if error else ws.close_reason}"
            log.warning(
                "closed_by_server",
                url=self.url,
                close_code=code,
                close_reason=ws.close_reason,
                error=error.code if error is not None else None,
            )
            return welcomed, True
        log.debug("disconnected", url=self.url, close_code=code)
        return welcomed, False

    async def _converse(self, ws: ClientConnection) -> bool:
        """Hello, welcome, then send and receive until the connection ends.

        Returns:
            Whether a welcome came.
        """
        welcome: Welcome | None = None
        try:
            await ws.send(self._hello, text=not self._codec.binary)
            welcome = await self._await_welcome(ws)
            if welcome is None:
                return False
            self._on_welcome(welcome)
            writer = asyncio.create_task(
                self._write_loop(ws, welcome.max_batch), name=f"eventwire-writer {self.producer}"
            )
            try:
                await self._read_loop(ws)
            finally:
                await cancel_and_wait([writer])
        except ConnectionClosed:
            pass
        return welcome is not None

    async def _await_welcome(self, ws: ClientConnection) -> Welcome | None:
        try:
            async with asyncio.timeout(WELCOME_TIMEOUT):
                while True:
                    msg = self._decode(await ws.recv(decode=False))
                    if isinstance(msg, Welcome):
                        return msg
                    if isinstance(msg, Error):
                        # The close follows and ends this loop with ConnectionClosed.
                        self._on_error(msg)
                    elif msg is not None:
                        log.warning("unexpected_message", url=self.url, message=type(msg).__name__)
        except TimeoutError:
            log.warning("no_welcome", url=self.url, timeout=WELCOME_TIMEOUT)
            return None

    async def _read_loop(self, ws: ClientConnection) -> None:
        while True:
            msg = self._decode(await ws.recv(decode=False))
            if isinstance(msg, Ack):
                self._on_ack_msg(msg)
            elif isinstance(msg, Nack):
                self._on_nack(msg)
            elif isinstance(msg, Error):
                self._on_error(msg)
            elif msg is not None:
                log.warning("unexpected_message", url=self.url, message=type(msg).__name__)

    async def _write_loop(self, ws: ClientConnection, max_batch: int) -> None:
        loop = asyncio.get_running_loop()
        codec = self._codec
        text = not codec.binary
        limit = max(1, min(self._batch_size, max_batch))
        pending = self._pending
        inflight = self._inflight
        try:
            while True:
                if not pending or self._retry or len(inflight) >= self._max_inflight:
                    await self._wait(None)
                    continue
                now = loop.time()
                if now < self._resume_at:
                    await self._wait(self._resume_at - now)
                    continue
                hold_until = self._last_partial + self._linger
                if len(pending) < limit and not self._waiters and now < hold_until:
                    await self._wait(hold_until - now)
                    continue
                count = min(limit, len(pending))
                events = list(islice(pending, count))
                data = codec.encode_client(Track(events=events))
                while len(data) > self._max_frame_bytes and count > 1:
                    # Shrink in proportion; track() made sure one event fits.
                    count = max(1, min(count - 1, count * self._max_frame_bytes // len(data)))
                    events = events[:count]
                    data = codec.encode_client(Track(events=events))
                for _ in range(count):
                    pending.popleft()
                if not pending and count < limit:
                    self._last_partial = now
                inflight.append(_Frame(events, perf_counter()))
                await ws.send(data, text=text)
        except ConnectionClosed:
            pass
        except Exception:
            # Without its writer the connection would sit idle for ever.
            log.exception("writer_failed", url=self.url, producer=self.producer)
            await ws.close(1011, "client error")

    async def _wait(self, delay: float | None) -> None:
        # No await between the caller's checks and this clear, so no wake-up is lost.
        self._wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    # -- answers --------------------------------------------------------------

    def _decode(self, data: bytes) -> ServerMessage | None:
        try:
            return self._codec.decode_server(data)
        except msgspec.DecodeError as exc:
            # Perhaps a newer server's message: skip it rather than drop the connection.
            log.warning("undecodable_message", url=self.url, error=str(exc))
            return None

    def _on_welcome(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self.connects += 1
        pending = self._pending
        dropped = 0
        while pending and pending[0].seq <= welcome.acked:
            pending.popleft()
            dropped += 1
        if dropped:
            self._held -= dropped
            self.skipped += dropped
            self._notify()
        self._retry_after = 0.0
        self._resume_at = 0.0
        self._last_partial = float("-inf")
        log.debug(
            "welcome",
            url=self.url,
            session=welcome.session,
            acked=welcome.acked,
            resend=len(pending),
        )

    def _on_ack_msg(self, ack: Ack) -> None:
        if not self._inflight:
            log.warning("unexpected_ack", url=self.url, seq=ack.seq)
            return
        frame = self._inflight.popleft()
        latency = perf_counter() - frame.sent_at
        last = frame.events[-1].seq
        if ack.seq != last:
            log.warning("ack_seq_mismatch", url=self.url, expected=last, got=ack.seq)
        self._held -= len(frame.events)
        self.accepted += ack.accepted
        self.duplicate += ack.duplicate
        if ack.rejected:
            self.rejections.extend(ack.rejected)
        self._answered()
        if self._on_ack is not None:
            try:
                self._on_ack(ack, latency)
            except Exception:
                log.exception("on_ack_failed", url=self.url)

    def _on_nack(self, nack: Nack) -> None:
        if not self._inflight:
            log.warning("unexpected_nack", url=self.url, seq=nack.seq)
            return
        frame = self._inflight.popleft()
        self.nacks += 1
        # The server nacks every later frame too (store.FrameOwner): stop
        # sending, collect them, and resend from here once all are answered.
        self._retry.extend(frame.events)
        self._retry_after = max(self._retry_after, nack.retry_after_ms / 1000)
        log.debug("nack", url=self.url, seq=nack.seq, code=nack.code)
        self._answered()

    def _on_error(self, error: Error) -> None:
        self.closed_error = error
        log.warning("server_error", url=self.url, code=error.code, detail=error.detail)

    def _answered(self) -> None:
        """A frame was answered: resume after nacks, wake the writer and flushes."""
        if self._retry and not self._inflight:
            self._pending.extendleft(reversed(self._retry))
            self._retry.clear()
            self._resume_at = asyncio.get_running_loop().time() + self._retry_after
            self._retry_after = 0.0
        self._wake.set()
        self._notify()

    def _requeue(self) -> None:
        """The connection ended: every unanswered event goes back to be resent, in order."""
        events = list(self._retry)
        for frame in self._inflight:
            events.extend(frame.events)
        self._retry.clear()
        self._inflight.clear()
        self._pending.extendleft(reversed(events))
        self._retry_after = 0.0

    def _oldest_unacked(self) -> int:
        if self._retry:
            return self._retry[0].seq
        if self._inflight:
            return self._inflight[0].events[0].seq
        if self._pending:
            return self._pending[0].seq
        return self._seq + 1

    def _notify(self) -> None:
        if not self._waiters:
            return
        oldest = self._oldest_unacked()
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._waiters:
            if target < oldest:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._waiters = waiting
