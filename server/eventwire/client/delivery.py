"""The client half of the delivery guarantee, without I/O (docs: docs/protocol.md sections 3-4).

:class:`Delivery` is the whole delivery state of one producer, synchronous:
it numbers events (``seq`` 1, 2, 3...), holds every event until the server
has answered it, batches events into ``track`` frames, keeps up to
``max_inflight`` frames in flight, and decides what each answer means. A
driver (:mod:`eventwire.client.connection`) moves bytes and time into it and
carries out what it returns; every other client implementation (the browser
tracker, a JS or React Native SDK) can be checked against the same rules:

- ``welcome``: drop every buffered event with ``seq <= acked`` (stored by an
  earlier connection) and send the rest in seq order with their original
  seqs. Frames hold at most ``min(batch_size, welcome.max_batch)`` events
  and ``max_frame_bytes`` bytes.
- ``ack``: the frame's events are answered: accepted, duplicate (stored
  before), or rejected. A rejection is final whatever its code; the event is
  never resent.
- ``nack``: nothing of the frame was stored. The server then nacks every
  frame sent before the client could see the nack
  (:class:`~eventwire.core.ordering.FrameOwner`), so the client sends nothing
  new until every frame in flight is answered, then resends all nacked events
  in seq order after the longest ``retry_after_ms``. Their first seq is at or
  below the server's barrier, which lets the server store again.
- a lost connection: every unanswered event goes back to the buffer, in seq
  order, to be resent after the next welcome.
- ``error``: recorded; the close that follows ends the connection as above.

:class:`Backoff` is the reconnect policy: the client reconnects after every
ending, with a random delay below a bound that doubles per failed attempt.
A welcome resets it, except after an ending a reconnect will meet again
(:func:`close_repeats`, :func:`status_repeats`), which keeps it growing so
that a misconfigured client does not spin.

Exceptions::

    EventwireClientError
    ├── BufferFull     ``max_buffer`` events held; the new event was not taken
    └── ClientClosed   the client is closed or not running
"""

from __future__ import annotations

import collections
from collections import deque
from collections.abc import Callable
from itertools import islice
from time import time_ns
from typing import Any, Final

import msgspec
import structlog

from eventwire.client.options import FRAME_OVERHEAD, ClientOptions
from eventwire.core.protocol import Ack, Error, Nack, Rejection, Track, Welcome, WireEvent

#: Close codes that a reconnect will meet again (policy, undecodable, too large).
POLICY_CLOSE_CODES: Final = frozenset({1007, 1008, 1009})

#: Handshake answers that a reconnect will meet again (origin refused, unknown site).
REFUSED_STATUSES: Final = frozenset({403, 404})

#: Exponent cap of the backoff: 2**32 * backoff_base exceeds any sane backoff_max.
_MAX_EXPONENT: Final = 32

log = structlog.get_logger("eventwire.client")


class EventwireClientError(Exception):
    """Root of the errors the client raises on purpose."""


class BufferFull(EventwireClientError):
    """``max_buffer`` events are held unacknowledged; the new event was not taken."""


class ClientClosed(EventwireClientError):
    """The client is closed, or was never started, so held events cannot be acked."""


def close_repeats(code: int | None) -> bool:
    """Whether a reconnect will meet this close code again (1007, 1008, 1009).

    1000, 1001, 1011, 1013 and a connection lost without a close frame are
    passing troubles: a welcome after them resets the backoff.
    """
    return code in POLICY_CLOSE_CODES


def status_repeats(status: int) -> bool:
    """Whether a reconnect will meet this refused handshake's HTTP status again (403, 404)."""
    return status in REFUSED_STATUSES


def _now_ms() -> int:
    return time_ns() // 1_000_000


class _Frame:
    """A track frame sent on the current connection and not answered yet."""

    __slots__ = ("events", "sent_at")

    def __init__(self, events: list[WireEvent], sent_at: float) -> None:
        self.events = events
        self.sent_at = sent_at


class Delivery:
    """The delivery state of one producer: the buffer, the frames in flight, the answers.

    Times passed in (``now``) are seconds of one monotonic clock, the
    driver's; event times are wall-clock milliseconds from ``wall_ms``.

    Args:
        options: the delivery limits and the encoding.
        wall_ms: the wall clock stamped on events tracked without a time.
    """

    __slots__ = (
        "_batch_size",
        "_codec",
        "_held",
        "_inflight",
        "_last_partial",
        "_limit",
        "_linger",
        "_max_buffer",
        "_max_frame_bytes",
        "_max_inflight",
        "_pending",
        "_probe",
        "_resume_at",
        "_retry",
        "_retry_after",
        "_seq",
        "_url",
        "_wall_ms",
        "accepted",
        "closed",
        "closed_error",
        "connects",
        "duplicate",
        "nack_codes",
        "nacks",
        "rejections",
        "skipped",
        "wake_on_track",
        "welcome",
    )

    def __init__(self, options: ClientOptions, wall_ms: Callable[[], int] = _now_ms) -> None:
        self._codec = options.codec
        self._probe: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.msgpack.Encoder() if self._codec.binary else msgspec.json.Encoder()
        )
        self._url = options.url
        self._batch_size = options.batch_size
        self._max_inflight = options.max_inflight
        self._linger = options.linger
        self._max_buffer = options.max_buffer
        self._max_frame_bytes = options.max_frame_bytes
        self._wall_ms = wall_ms

        #: The last welcome received.
        self.welcome: Welcome | None = None
        #: Welcomes received: connections that got past the hello.
        self.connects = 0
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
        #: Nacks by their code (``unavailable``, ...).
        self.nack_codes: collections.Counter[str] = collections.Counter()
        #: The last ``error`` message from the server.
        self.closed_error: Error | None = None
        #: Whether :meth:`close` was called; no event is taken after it.
        self.closed = False
        #: Called, and cleared, when the next event is tracked: a driver that
        #: waits for events sets it before waiting, so that a busy producer
        #: pays no wake-up per event.
        self.wake_on_track: Callable[[], object] | None = None

        self._seq = 0
        # Unacked events live in three places, in seq order across them:
        # _retry (nacked, waiting for the frames after them to be answered),
        # then _inflight (sent, unanswered), then _pending (not sent yet).
        self._retry: list[WireEvent] = []
        self._inflight: deque[_Frame] = deque()
        self._pending: deque[WireEvent] = deque()
        self._held = 0
        # Events per frame on the current connection; 0 until a welcome.
        self._limit = 0
        self._retry_after = 0.0
        self._resume_at = 0.0
        self._last_partial = float("-inf")

    # -- the producer's side ----------------------------------------------------

    @property
    def seq(self) -> int:
        """The seq of the last event taken; 0 before the first."""
        return self._seq

    @property
    def held(self) -> int:
        """Events tracked and not answered yet (what ``max_buffer`` bounds)."""
        return self._held

    def track(
        self,
        action: str,
        params: dict[str, Any] | None = None,
        label: str | None = None,
        time: int | None = None,
    ) -> int:
        """Number an event and buffer it; see ``EventwireClient.track``.

        Returns:
            The event's seq.

        Raises:
            ClientClosed: :meth:`close` was called.
            BufferFull: ``max_buffer`` events are held; the event is not
                taken and its seq not used.
            TypeError: ``params`` hold a value the encoding cannot carry.
            ValueError: the event alone is larger than ``max_frame_bytes``,
                or a value is out of the encoding's range.
        """
        if self.closed:
            raise ClientClosed("the client is closed")
        if self._held >= self._max_buffer:
            raise BufferFull(f"{self._held} events are unacknowledged (max_buffer)")
        event = WireEvent(
            seq=self._seq + 1,
            action=action,
            label=label,
            time=time if time is not None else self._wall_ms(),
            params=dict(params) if params is not None else None,
        )
        # Encode once here so that a bad event fails its caller, not the sender.
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
        wake = self.wake_on_track
        if wake is not None:
            self.wake_on_track = None
            wake()
        return self._seq

    def oldest_unacked(self) -> int:
        """The lowest seq not answered yet; every event below it is answered."""
        if self._retry:
            return self._retry[0].seq
        if self._inflight:
            return self._inflight[0].events[0].seq
        if self._pending:
            return self._pending[0].seq
        return self._seq + 1

    def close(self) -> None:
        """Take no more events (``track`` raises :class:`ClientClosed`)."""
        self.closed = True

    # -- the connection's side --------------------------------------------------

    def next_frame(self, now: float, hurry: bool = False) -> bytes | float | None:
        """What to send next on a welcomed connection.

        Args:
            now: the driver's monotonic clock, in seconds.
            hurry: someone waits for a flush; do not wait out the linger.

        Returns:
            An encoded track frame to send now (it is in flight from here); or
            the seconds to wait before asking again; or None: nothing to send
            until an event is tracked or a frame is answered.
        """
        pending = self._pending
        limit = self._limit
        if not pending or not limit or self._retry or len(self._inflight) >= self._max_inflight:
            return None
        if now < self._resume_at:
            return self._resume_at - now
        hold_until = self._last_partial + self._linger
        if len(pending) < limit and not hurry and now < hold_until:
            return hold_until - now
        codec = self._codec
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
        self._inflight.append(_Frame(events, now))
        return data

    def on_welcome(self, welcome: Welcome) -> None:
        """The connection is open: drop what ``welcome.acked`` covers, resend the rest."""
        self.welcome = welcome
        self.connects += 1
        self._limit = max(1, min(self._batch_size, welcome.max_batch))
        pending = self._pending
        dropped = 0
        while pending and pending[0].seq <= welcome.acked:
            pending.popleft()
            dropped += 1
        self._held -= dropped
        self.skipped += dropped
        self._retry_after = 0.0
        self._resume_at = 0.0
        self._last_partial = float("-inf")
        log.debug(
            "welcome",
            url=self._url,
            session=welcome.session,
            acked=welcome.acked,
            resend=len(pending),
        )

    def on_ack(self, ack: Ack, now: float) -> float | None:
        """The oldest frame in flight is answered; its events are done.

        Returns:
            The seconds since that frame was sent, or None for an ack with
            no frame in flight (logged and ignored).
        """
        if not self._inflight:
            log.warning("unexpected_ack", url=self._url, seq=ack.seq)
            return None
        frame = self._inflight.popleft()
        last = frame.events[-1].seq
        if ack.seq != last:
            log.warning("ack_seq_mismatch", url=self._url, expected=last, got=ack.seq)
        self._held -= len(frame.events)
        self.accepted += ack.accepted
        self.duplicate += ack.duplicate
        if ack.rejected:
            self.rejections.extend(ack.rejected)
        self._answered(now)
        return now - frame.sent_at

    def on_nack(self, nack: Nack, now: float) -> None:
        """Nothing of the oldest frame in flight was stored: hold it for a resend."""
        if not self._inflight:
            log.warning("unexpected_nack", url=self._url, seq=nack.seq)
            return
        frame = self._inflight.popleft()
        self.nacks += 1
        self.nack_codes[nack.code] += 1
        # The server nacks every later frame too (FrameOwner): stop sending,
        # collect them, and resend from here once all are answered.
        self._retry.extend(frame.events)
        self._retry_after = max(self._retry_after, nack.retry_after_ms / 1000)
        log.debug("nack", url=self._url, seq=nack.seq, code=nack.code)
        self._answered(now)

    def on_error(self, error: Error) -> None:
        """The server explains the close that follows; nothing held is dropped."""
        self.closed_error = error
        log.warning("server_error", url=self._url, code=error.code, detail=error.detail)

    def connection_lost(self) -> None:
        """The connection ended: every unanswered event goes back to be resent, in order."""
        events = list(self._retry)
        for frame in self._inflight:
            events.extend(frame.events)
        self._retry.clear()
        self._inflight.clear()
        self._pending.extendleft(reversed(events))
        self._retry_after = 0.0
        self._limit = 0

    def _answered(self, now: float) -> None:
        # After nacks, resume once the last frame in flight is answered.
        if self._retry and not self._inflight:
            self._pending.extendleft(reversed(self._retry))
            self._retry.clear()
            self._resume_at = now + self._retry_after
            self._retry_after = 0.0


class Backoff:
    """The reconnect delay bound after each ending of a connection.

    The bound is ``backoff_base * 2**attempt``, capped at ``backoff_max``;
    the driver sleeps a random time below it. A welcome resets the attempts;
    an ending that a reconnect will meet again keeps the bound growing even
    after a welcome (each such ending in a row counts one strike).

    Args:
        base: the first bound, in seconds.
        most: the largest bound, in seconds.
    """

    __slots__ = ("_attempt", "_base", "_most", "_strikes")

    def __init__(self, base: float, most: float) -> None:
        self._base = base
        self._most = most
        self._attempt = 0
        # Consecutive endings that a reconnect will meet again.
        self._strikes = 0

    def after(self, welcomed: bool, repeats: bool) -> float:
        """The delay bound before the next attempt, in seconds.

        Args:
            welcomed: the connection got a welcome.
            repeats: it ended in a way a reconnect will meet again
                (:func:`close_repeats`, :func:`status_repeats`, a refused
                subprotocol).
        """
        if welcomed:
            self._attempt = 0
        if repeats:
            self._attempt = max(self._attempt, self._strikes)
            self._strikes += 1
        elif welcomed:
            self._strikes = 0
        bound: float = min(self._most, self._base * 2 ** min(self._attempt, _MAX_EXPONENT))
        self._attempt += 1
        return bound
