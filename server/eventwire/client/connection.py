"""The async driver of the Python client: sockets, reconnects and timers.

:class:`EventwireClient` owns one background task that connects with
``websockets``, sends the hello, feeds every answer to its
:class:`~eventwire.client.delivery.Delivery` and sends the frames it returns,
sleeping when it says to wait; when a connection ends it reconnects after the
delay :class:`~eventwire.client.delivery.Backoff` bounds. What an answer
means, what to resend and when, is decided in ``delivery``, not here.

One client is one producer. Use it from the event loop that started it; it
is not thread-safe. Tests and the benchmark depend on its public names.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import fields
from types import TracebackType
from typing import Any, Final, Literal

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin, Subprotocol

from eventwire.client.delivery import (
    Backoff,
    ClientClosed,
    Delivery,
    close_repeats,
    status_repeats,
)
from eventwire.client.options import CLIENT_NAME, ClientOptions, random_producer, random_uuid
from eventwire.core.protocol import Ack, Error, Nack, Rejection, ServerMessage, Welcome
from eventwire.tasks import cancel_and_wait

#: How long the opening handshake, and then the welcome, may take.
WELCOME_TIMEOUT: Final = 10.0

#: How long closing the socket may wait for the server's close frame.
CLOSE_TIMEOUT: Final = 5.0

log = structlog.get_logger("eventwire.client")


class EventwireClient:
    """An async tracking client: ``track()`` buffers, a background task delivers.

    The arguments are the fields of :class:`~eventwire.client.options.ClientOptions`
    (documented there); :meth:`from_options` takes such an object whole.

    Raises:
        ValueError: a URL, identifier or limit is not valid, or ``context``
            has no JSON form (it is copied onto a JSON record).
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
        options = ClientOptions(
            url=url,
            uuid=uuid if uuid is not None else random_uuid(),
            producer=producer if producer is not None else random_producer(),
            token=token,
            encoding=encoding,
            origin=origin,
            context=context,
            batch_size=batch_size,
            max_inflight=max_inflight,
            linger=linger,
            max_buffer=max_buffer,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            on_ack=on_ack,
            max_frame_bytes=max_frame_bytes,
        )
        #: The options the client was built with.
        self.options = options
        self.url = options.url
        self.uuid = options.uuid
        self.producer = options.producer
        self._codec = options.codec
        self._hello = options.hello()
        self._origin = Origin(options.origin) if options.origin is not None else None
        self._on_ack = options.on_ack
        self._delivery = Delivery(options)
        #: Why the last connection was refused or closed by policy, for a person to read.
        self.last_problem: str | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None

    @classmethod
    def from_options(cls, options: ClientOptions) -> EventwireClient:
        """A client configured by one :class:`ClientOptions` object.

        Returns:
            A new client, not started.
        """
        return cls(**{f.name: getattr(options, f.name) for f in fields(options)})

    # -- what the server answered (read-only; see Delivery) ---------------------

    @property
    def welcome(self) -> Welcome | None:
        """The last welcome received."""
        return self._delivery.welcome

    @property
    def connects(self) -> int:
        """Welcomes received: connections that got past the hello."""
        return self._delivery.connects

    @property
    def rejections(self) -> list[Rejection]:
        """Every rejection received, in order."""
        return self._delivery.rejections

    @property
    def accepted(self) -> int:
        """Events the server stored, per its acks."""
        return self._delivery.accepted

    @property
    def duplicate(self) -> int:
        """Events the server had already stored, per its acks."""
        return self._delivery.duplicate

    @property
    def skipped(self) -> int:
        """Events dropped without an ack because ``welcome.acked`` covered them."""
        return self._delivery.skipped

    @property
    def nacks(self) -> int:
        """Nacks received."""
        return self._delivery.nacks

    @property
    def nack_codes(self) -> Mapping[str, int]:
        """Nacks received, by code."""
        return self._delivery.nack_codes

    @property
    def closed_error(self) -> Error | None:
        """The last ``error`` message from the server."""
        return self._delivery.closed_error

    # -- public API -----------------------------------------------------------

    async def start(self) -> None:
        """Start the background task that connects and delivers; returns at once.

        Calling it again while the client runs does nothing.

        Raises:
            ClientClosed: the client was closed.
        """
        if self._delivery.closed:
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
        return self._delivery.track(action, params, label, time)

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
        delivery = self._delivery
        target = delivery.seq
        if delivery.oldest_unacked() > target:
            return
        if self._task is None or delivery.closed:
            raise ClientClosed(f"{delivery.held} events are held but the client is not running")
        entry = (target, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        # A waiting flush must not also wait out the linger.
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await entry[1]
        except TimeoutError:
            raise TimeoutError(
                f"{delivery.held} events still unacknowledged after {timeout} s"
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
            if flush and self._task is not None and not self._delivery.closed:
                await self.flush(timeout)
        finally:
            await self._shutdown()

    # -- background task ------------------------------------------------------

    async def _shutdown(self) -> None:
        self._delivery.close()
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
        backoff = Backoff(self.options.backoff_base, self.options.backoff_max)
        while not self._delivery.closed:
            try:
                welcomed, repeats = await self._connect_once()
            except Exception:
                log.exception("client_failed", url=self.url, producer=self.producer)
                welcomed, repeats = False, False
            # Returns at once when closing; the loop condition then ends the task.
            await self._sleep(random.uniform(0, backoff.after(welcomed, repeats)))

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
            if status_repeats(status):
                body = exc.response.body.decode("utf-8", "replace").strip()[:200]
                self.last_problem = f"HTTP {status}: {body}"
                log.warning("handshake_refused", url=self.url, status=status, body=body)
                return False, True
            log.debug("handshake_failed", url=self.url, status=status)
            return False, False
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self.last_problem = f"cannot connect: {exc or type(exc).__name__}"
            log.debug("connect_failed", url=self.url, error=str(exc) or type(exc).__name__)
            return False, False
        finally:
            self._delivery.connection_lost()
        code = ws.close_code
        if close_repeats(code):
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
            self._delivery.on_welcome(welcome)
            self._notify()
            writer = asyncio.create_task(
                self._write_loop(ws), name=f"eventwire-writer {self.producer}"
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
                        self._delivery.on_error(msg)
                    elif msg is not None:
                        log.warning("unexpected_message", url=self.url, message=type(msg).__name__)
        except TimeoutError:
            log.warning("no_welcome", url=self.url, timeout=WELCOME_TIMEOUT)
            return None

    async def _read_loop(self, ws: ClientConnection) -> None:
        delivery = self._delivery
        loop = asyncio.get_running_loop()
        while True:
            msg = self._decode(await ws.recv(decode=False))
            if isinstance(msg, Ack):
                latency = delivery.on_ack(msg, loop.time())
                self._wake.set()
                self._notify()
                if latency is not None and self._on_ack is not None:
                    try:
                        self._on_ack(msg, latency)
                    except Exception:
                        log.exception("on_ack_failed", url=self.url)
            elif isinstance(msg, Nack):
                delivery.on_nack(msg, loop.time())
                self._wake.set()
                self._notify()
            elif isinstance(msg, Error):
                delivery.on_error(msg)
            elif msg is not None:
                log.warning("unexpected_message", url=self.url, message=type(msg).__name__)

    async def _write_loop(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        next_frame = self._delivery.next_frame
        text = not self._codec.binary
        try:
            while True:
                step = next_frame(loop.time(), bool(self._waiters))
                if isinstance(step, bytes):
                    await ws.send(step, text=text)
                else:
                    await self._wait(step)
        except ConnectionClosed:
            pass
        except Exception:
            # Without its writer the connection would sit idle for ever.
            log.exception("writer_failed", url=self.url, producer=self.producer)
            await ws.close(1011, "client error")

    async def _wait(self, delay: float | None) -> None:
        """Wait for a track, an answer, a flush or the delay, whichever comes first."""
        # No await between the caller's checks and this clear, so no wake-up is lost.
        self._wake.clear()
        self._delivery.wake_on_track = self._wake.set
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._delivery.wake_on_track = None

    def _decode(self, data: bytes) -> ServerMessage | None:
        try:
            return self._codec.decode_server(data)
        except msgspec.DecodeError as exc:
            # Perhaps a newer server's message: skip it rather than drop the connection.
            log.warning("undecodable_message", url=self.url, error=str(exc))
            return None

    def _notify(self) -> None:
        """Resolve the flushes whose events are all answered now."""
        if not self._waiters:
            return
        oldest = self._delivery.oldest_unacked()
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._waiters:
            if target < oldest:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._waiters = waiting
