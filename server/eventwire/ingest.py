"""The async driver of one tracking connection: socket, store and sessions around its protocol.

Every decision is made by :class:`~eventwire.core.connection.Connection`
(sans I/O, in ``core``); this room only feeds it what happens and carries out
the commands it returns:

- frames read from the socket go to :meth:`Connection.receive`, with the time;
- :class:`~eventwire.core.commands.Send` and ``SubmitFrame`` are carried out
  at once, without a wait or a task: a frame goes to :meth:`Store.submit`,
  whose publisher task reports its end to this object (a
  :class:`~eventwire.store.FrameSink`), and the answers that are then due go
  out from there;
- session steps (hello, identify), the undecodable record and the close are
  awaited by the receive loop, which reads no frame meanwhile; a session
  renewed under frames on their way is the one step run in a task of its own
  (owned, cancelled when the connection ends), as the loop may be waiting for
  a frame then.

Frames need no task either: the gateway's connection hands each complete
message to :meth:`IngestConnection.take` from ``data_received``, which carries
it out at once when it may (the hot path: decode, judge, submit, in the
socket's callback). When it may not (before the welcome, while a session
step runs, while ``max_inflight_frames`` are unanswered, while the client
does not read its answers, while the server drains) the message waits in the
connection's inbox, which stops reading the socket when it fills, and the
receive loop takes it once it may; answers that free room take the waiting
messages at once too. A failure on the hot path is handed to the receive
loop, which raises it as before (websockets closes 1011).

What a socket shares with an HTTP batch (submitting a frame and a held one
again, the hello's session, leaving it, the store's results) is
:class:`Carrier`'s, the base of this driver and of
:class:`eventwire.http.batch.BatchRun`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Protocol

import structlog
from websockets.exceptions import ConnectionClosed

from eventwire import metrics
from eventwire.core.commands import (
    Close,
    Command,
    LeaveSession,
    OpenSession,
    RecordUndecodable,
    ResubmitFrame,
    Send,
    SubmitFrame,
    SwitchCustomer,
)
from eventwire.core.connection import Connection
from eventwire.core.errors import StoreUnavailable
from eventwire.core.frames import undecodable_record
from eventwire.core.validation import Identity
from eventwire.sessions import Sessions, now_ms
from eventwire.store import Frame, FrameIds, Store, pack_frame_ids
from eventwire.tasks import cancel_and_wait

# ``undecodable_record`` is imported from here by the fuzzers.
__all__ = ["Carrier", "IngestConnection", "undecodable_record"]

log = structlog.get_logger("eventwire.ingest")

#: Writes one encoded message to the client now, without waiting; never raises.
SendNow = Callable[[bytes], None]


class _Signal:
    """Wakes the tasks waiting on it: an ``asyncio.Event`` without the deque and the coroutine.

    :meth:`wait` returns a future resolved by the next :meth:`set` (what
    ``clear()`` then ``wait()`` does with an event). A connection holds two,
    and 100,000 idle connections hold them all: an event's empty deque alone
    is 0.6 KiB.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    def set(self) -> None:
        """Wake every task waiting now."""
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        """A future resolved by the next :meth:`set`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter


class Socket(Protocol):
    """What the driver needs of its connection (the gateway's ``TrackConnection``)."""

    #: Messages received and not yet taken, oldest first.
    inbox: list[bytes]
    #: Whether the transport's write buffer is over its limit (the client does not read).
    paused: bool

    @property
    def closed(self) -> bool:
        """Whether the connection is closed."""

    def next_message(self) -> bytes:
        """Remove and return the oldest message of the inbox."""

    async def drain(self) -> None:
        """Wait until the write buffer is under its limit."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with the closing handshake."""


class Carrier:
    """Carries out a connection protocol's commands against the store and the sessions.

    What a socket's driver (:class:`IngestConnection`) and an HTTP batch
    (:class:`eventwire.http.batch.BatchRun`) share: submitting a frame (its
    key names built once per customer), submitting a held frame again,
    opening the customer's session at the hello, leaving it, and the
    :class:`~eventwire.store.FrameSink` side, which hands the store's results
    to the protocol. A subclass says how it follows the commands the protocol
    answers with (:meth:`_follow`) and whom a result wakes (:meth:`_results_in`).

    Args:
        protocol: the connection's protocol state (sans I/O).
        store: the Redis room.
        sessions: the session room.
    """

    __slots__ = (
        "_held",
        "_ids",
        "_keys_uuid",
        "_producer_key",
        "_session_key",
        "_tag",
        "member",
        "protocol",
        "sessions",
        "settings",
        "site",
        "store",
    )

    def __init__(self, protocol: Connection, store: Store, sessions: Sessions) -> None:
        self.protocol = protocol
        self.site = protocol.site
        self.store = store
        self.sessions = sessions
        self.settings = protocol.settings
        #: The connection's member in its customer's session, while registered.
        self.member = ""
        #: Frames whose session ended, until they are sent again.
        self._held: dict[SubmitFrame, Frame] = {}
        self._keys_uuid = ""
        self._tag = ""
        self._producer_key = ""
        self._session_key = ""
        self._ids: FrameIds | None = None

    def _follow(self, commands: list[Command]) -> None:
        """Carry out (or queue) the commands the protocol answered a result with."""
        raise NotImplementedError

    def _results_in(self) -> None:
        """The store answered a frame: wake whoever waits for answers."""
        raise NotImplementedError

    def _submit(self, frame: SubmitFrame) -> None:
        uuid = frame.uuid
        if uuid != self._keys_uuid:
            # Key names change only with the customer: built once, not per frame.
            keys = self.store.keys
            self._keys_uuid = uuid
            self._tag = self.store.tag(self.site, uuid)
            self._producer_key = keys.producer(self._tag, self.protocol.producer)
            self._session_key = keys.session(self._tag, uuid)
            self._ids = None
        ids = self._ids
        if ids is None or ids.session != frame.session:
            # Packed for Redis once per customer and session, not per frame.
            ids = self._ids = pack_frame_ids(self._producer_key, self._session_key, frame.session)
        if frame.rejections:
            for r in frame.rejections:
                metrics.REJECTS.labels(self.site, r.code).inc()
        queued = self.store.submit(
            self.site,
            self._tag,
            self._producer_key,
            self._session_key,
            frame.session,
            frame.items,
            self,
            frame,
            self.protocol.owner,
            frame.low,
        )
        queued.ids = ids

    def _resubmit(self, frame: SubmitFrame) -> None:
        """Submit a held frame again, in the session opened for it."""
        held = self._held.pop(frame)
        held.args = frame.items
        held.session = frame.session
        self.store.resubmit(held)

    async def _open(self, command: OpenSession) -> bool:
        """Join or open the customer's session; False when Redis did not answer."""
        member = self.member or self.sessions.member(command.uuid)
        try:
            opened = await self.sessions.open(
                self.site,
                command.uuid,
                member,
                command.producer,
                command.context,
                start=command.start,
            )
        except StoreUnavailable as exc:
            self._follow(self.protocol.session_unavailable(str(exc)))
            return False
        if opened.suppressed:
            # Forgotten and suppressed: the member is registered no more.
            self.sessions.drop(self.site, command.uuid, member)
            self.member = ""
        else:
            self.member = member
        self._follow(
            self.protocol.session_opened(
                opened.session, opened.resumed, opened.acked, now_ms(), opened.suppressed
            )
        )
        return True

    async def _leave(self, uuid: str) -> None:
        if not self.member:
            return
        member, self.member = self.member, ""
        try:
            await self.sessions.leave(
                self.site, uuid, member, quiet=bool(self.protocol.bot_dropped)
            )
        except StoreUnavailable as exc:
            # The heartbeat lapses instead, and a reaper counts it as closed.
            self.sessions.leave_failed(exc)

    # -- FrameSink: called from the store's publisher task ----------------------------

    def frame_stored(self, frame: Frame, added: int, duplicate: int) -> None:
        """The frame's events are in Redis; its ack may go."""
        self._follow(self.protocol.frame_stored(frame.token, added, duplicate))
        self._results_in()

    def frame_failed(self, frame: Frame, why: str) -> None:
        """Nothing of the frame is stored; it is nacked."""
        self._follow(self.protocol.frame_failed(frame.token))
        self._results_in()

    def frame_gone(self, frame: Frame) -> None:
        """The session ended before the frame was stored; it is sent again in a new one."""
        self._held[frame.token] = frame
        self._follow(self.protocol.frame_gone(frame.token))
        self._forget_answered()
        self._results_in()

    def _forget_answered(self) -> None:
        """Drop the held frames that were nacked instead of sent again."""
        for token in [token for token in self._held if token.reply is not None]:
            del self._held[token]


class IngestConnection(Carrier):
    """Carries out one tracking connection's protocol over its socket.

    Args:
        protocol: the connection's protocol state (sans I/O).
        ws: the socket.
        send: writes one encoded message to the client without waiting.
        store: the Redis room.
        sessions: the session room.
        draining: whether the server is shutting down (asked before each frame).
    """

    __slots__ = (
        "_answered",
        "_arrived",
        "_bound",
        "_crash",
        "_draining",
        "_live",
        "_renewal",
        "_send",
        "_steps",
        "close_detail",
        "ws",
    )

    def __init__(
        self,
        protocol: Connection,
        ws: Socket,
        send: SendNow,
        store: Store,
        sessions: Sessions,
        draining: Callable[[], bool],
    ) -> None:
        super().__init__(protocol, store, sessions)
        self.ws = ws
        self._send = send
        self._draining = draining
        #: The detail of the error the connection was closed for, if any.
        self.close_detail = ""
        #: Session steps and the close, awaited by the receive loop in order.
        self._steps: list[Command] = []
        self._renewal: asyncio.Task[None] | None = None
        #: Set whenever answers went out or a step was queued; every waiter
        #: (room for a frame, a drain, several at once) wakes and looks again.
        self._answered = _Signal()
        #: Set when a message waits in the inbox, a step was queued, the
        #: customer changed or the connection closed: the idle receive loop looks.
        self._arrived = _Signal()
        #: The customer the log lines name now.
        self._bound: Identity | None = None
        #: Messages may be carried out from ``data_received`` (after the welcome).
        self._live = False
        #: A failure of the hot path, raised by the receive loop.
        self._crash: BaseException | None = None

    # -- the receive loop ---------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes, then leave its session."""
        protocol = self.protocol
        ws = self.ws
        try:
            try:
                async with asyncio.timeout(self.settings.hello_timeout):
                    data = await self._next()
            except TimeoutError:
                self._run(protocol.hello_timed_out())
            else:
                if data is None:
                    return
                self._run(protocol.receive(data, now_ms()))
            await self._settle()
            self._live = True
            # Steps queued by the hot path (a close among them) are carried
            # out even when the protocol says closed already.
            while protocol.state != "closed" or self._steps:
                if self._crash is not None:
                    raise self._crash
                if self._draining():
                    # Read no more, so a busy client cannot hold the drain
                    # open; what it sent meanwhile is unacked and will be resent.
                    self._live = False
                    self._run(protocol.shutdown())
                    await self._settle()
                    break
                if self._steps or not protocol.readable:
                    await self._settle()
                    continue
                if ws.paused:  # the client does not read its answers: wait for it
                    await ws.drain()
                    continue
                if ws.inbox:
                    self._pump()
                    continue
                if ws.closed:
                    break
                await self._arrived.wait()
                if protocol.who is not self._bound:
                    self._bind()
        except ConnectionClosed:
            pass
        finally:
            self._live = False
            await self._finish()

    async def _next(self) -> bytes | None:
        """The next message of the inbox, waited for; None once the connection closed."""
        ws = self.ws
        while not ws.inbox:
            if ws.closed:
                return None
            await self._arrived.wait()
        return ws.next_message()

    # -- the hot path: messages from data_received ---------------------------------

    def take(self, data: bytes) -> bool:
        """Carry out one message now if the connection may read it; False: it waits.

        Called by the connection from ``data_received`` with its inbox empty.
        """
        protocol = self.protocol
        if (
            not self._live
            or self._steps
            or not protocol.readable
            or self.ws.paused
            or self._draining()
        ):
            return False
        try:
            self._run(protocol.receive(data, now_ms()))
        except Exception as exc:
            self._crashed(exc)
            return True
        if protocol.who is not self._bound:
            # The receive loop names the customer in its log context.
            self._arrived.set()
        return True

    def wake(self) -> None:
        """A message waits in the inbox, or the connection closed: the receive loop looks."""
        self._arrived.set()
        self._answered.set()

    def _pump(self) -> None:
        """Carry out the waiting messages while the connection may read them."""
        ws = self.ws
        protocol = self.protocol
        try:
            while (
                ws.inbox
                and self._live
                and not self._steps
                and protocol.readable
                and not ws.paused
                and not self._draining()
            ):
                self._run(protocol.receive(ws.next_message(), now_ms()))
        except Exception as exc:
            self._crashed(exc)
        if protocol.who is not self._bound:
            self._arrived.set()

    def _crashed(self, exc: Exception) -> None:
        """A failure on the hot path: the receive loop raises it."""
        self._live = False
        self._crash = exc
        self.wake()

    async def _settle(self) -> None:
        """Carry out the queued steps and wait for answers until a frame may be read."""
        protocol = self.protocol
        while True:
            if self._crash is not None:
                raise self._crash
            if self._steps:
                await self._carry_out(self._steps.pop(0))
                continue
            if protocol.readable or protocol.state == "closed":
                break
            await self._answered.wait()
        if protocol.who is not self._bound:
            self._bind()

    def _bind(self) -> None:
        """Name the current customer in the connection's log lines."""
        who = self._bound = self.protocol.who
        if who is not None:
            structlog.contextvars.bind_contextvars(
                uuid=who.uuid, session=who.session, authenticated=who.authenticated
            )

    async def drain(self) -> None:
        """Wait until every received frame has been answered (any number may wait)."""
        while self.protocol.unanswered:
            await self._answered.wait()

    async def _finish(self) -> None:
        """Stop answering and leave the customer's session.

        Frames still in the store are waited for (up to two store timeouts),
        so that the session counts their events before its grace starts.
        """
        self.protocol.connection_lost()
        if self.protocol.unanswered:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.store_timeout * 2):
                    await self.drain()
        if self._renewal is not None:
            await cancel_and_wait([self._renewal])
        for command in self.protocol.finish():
            await self._carry_out(command)
        self.sessions.note_dropped_bots(self.site, self.protocol.bots_dropped)

    def stats(self) -> dict[str, int]:
        """Counts for the connection's closing log line."""
        return self.protocol.stats()

    # -- commands -------------------------------------------------------------------

    def _run(self, commands: list[Command]) -> None:
        """Carry out what needs no wait now; queue the rest for the receive loop.

        Once one command of ``commands`` is queued, the ones after it are
        queued too, so they are carried out in the order given.
        """
        queued = False
        for command in commands:
            # The commonest first: this runs for every frame and every answer.
            if queued:
                self._steps.append(command)
            elif isinstance(command, Send):
                self._send(command.data)
                if command.nack is not None:
                    metrics.NACKS.labels(self.site, command.nack).inc()
            elif isinstance(command, SubmitFrame):
                self._submit(command)
            elif isinstance(command, ResubmitFrame):
                self._resubmit(command.frame)
            elif isinstance(command, OpenSession) and command.renew:
                self._renewal = asyncio.create_task(self._renew(command))
            else:
                self._steps.append(command)
                self.wake()
                queued = True

    async def _carry_out(self, command: Command) -> None:
        """Carry out one step that waits (a session step, a record, the close)."""
        match command:
            case OpenSession(renew=False):
                await self._open(command)
            case SwitchCustomer():
                await self._switch(command)
            case RecordUndecodable(uuid=uuid, record=record):
                await self.store.record_rejected(self.site, uuid, record)
            case Close():
                await self._close(command)
            case LeaveSession(uuid=uuid):
                await self._leave(uuid)
            case _:
                self._run([command])

    _follow = _run

    def _results_in(self) -> None:
        """Answers went out: take a waiting message, and wake whoever waits for room."""
        if self._live and self.ws.inbox:
            self._pump()
        self._answered.set()

    async def _open(self, command: OpenSession) -> bool:
        """The hello's session; the connection counts once it is open."""
        if not await super()._open(command):
            return False
        metrics.CONNECTIONS.labels(self.site).inc()
        if self.protocol.bot_outcome:
            metrics.BOT_CONNECTIONS.labels(self.site, self.protocol.bot_outcome).inc()
        return True

    async def _renew(self, command: OpenSession) -> None:
        """Open a session again for frames whose session ended on their way."""
        try:
            opened = await self.sessions.open(
                self.site,
                command.uuid,
                self.member,
                command.producer,
                command.context,
                start=command.start,
            )
        except StoreUnavailable as exc:
            commands = self.protocol.session_unavailable(str(exc))
        else:
            if opened.suppressed:
                # Forgotten and suppressed under this connection: no member any more
                # (a heartbeat may have put it back since the forget: it leaves).
                member, self.member = self.member, ""
                self.sessions.drop(self.site, command.uuid, member)
                with contextlib.suppress(StoreUnavailable):
                    await self.sessions.leave(self.site, command.uuid, member)
            commands = self.protocol.session_opened(
                opened.session, opened.resumed, opened.acked, now_ms(), opened.suppressed
            )
        finally:
            self._renewal = None
        self._run(commands)
        self._forget_answered()
        self._answered.set()

    async def _switch(self, command: SwitchCustomer) -> None:
        """Identify: leave the old customer's session, join or open the new one's.

        On a partitioned site the new customer may live in another partition,
        whose copy of the producer's stored seq is behind. Every earlier frame
        is answered by now, so the old partition's seq is the producer's
        high-water mark; it is carried into the new partition, so
        ``welcome.acked`` and de-duplication go on as with one key.
        """
        site, old, new = self.site, command.old_uuid, command.new_uuid
        moves = self.store.tag(site, old) != self.store.tag(site, new)
        member = self.sessions.member(new)
        quiet = command.start is not None and command.start.quiet
        try:
            # A forgotten, suppressed customer gets no client.identify (it would
            # carry its uuid) and no merge: the connection just leaves.
            forgotten = await self.sessions.suppressed(site, new)
            leave = functools.partial(
                self.sessions.leave,
                site,
                old,
                self.member,
                identify_to="" if forgotten else new,
                producer=command.producer if moves else "",
                refused=command.refused,
                quiet=quiet,
            )
            left = await leave()
            if not left.found and not command.refused and not forgotten:
                # The session ended (idle, max) under the open connection: the
                # identify is the customer's next step, so it opens the session
                # again (its session.start) and the merge is stored with its
                # client.identify, as after any event. A rare, slower path.
                await self.sessions.open(
                    site, old, self.member, command.producer, command.context, start=command.start
                )
                left = await leave()
            self.member = ""
            opened = await self.sessions.open(
                site,
                new,
                member,
                command.producer,
                command.context,
                carry=left.stored,
                alias=old if left.merged else "",
                start=command.start,
            )
        except StoreUnavailable as exc:
            self._run(self.protocol.identify_failed(str(exc)))
            return
        self.member = "" if opened.suppressed else member
        self._run(self.protocol.identified(opened.session, opened.suppressed))

    async def _close(self, command: Close) -> None:
        if command.error is not None:
            metrics.PROTOCOL_ERRORS.labels(self.site, command.error).inc()
            self.close_detail = command.detail
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(command.code, command.reason)
