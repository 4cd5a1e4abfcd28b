"""One tracking connection's state machine: hello -> welcome, track -> ack/nack.

This room turns decoded messages into store calls and answers; it never
touches a socket. ``gateway`` feeds it frames and gives it a ``send``
function. It applies the site's rules (``rules``) and the customer's proof
(``auth``) to every frame. Errors map to protocol answers here:

- a bad event -> a rejection inside the ack (final; in the rejected stream
  too, except ``denied`` events, which are stored nowhere);
- Redis down or slow -> ``nack unavailable``; over the site's rate ->
  ``nack rate_limited`` (nothing of the frame stored);
- a broken protocol -> :class:`~eventwire.core.errors.ProtocolViolation`, which the
  gateway turns into an ``error`` message and a close code.

Frames are answered in the order they arrived. Up to ``max_inflight_frames``
of them may wait for Redis at once, so a client that pipelines frames keeps
the server busy. The store reports each frame's end from its publisher task
(:class:`~eventwire.store.FrameSink`), and the answers that are due go out then,
without a task or a wait per frame; ``gateway`` applies backpressure when the
client does not read them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import msgspec
import structlog

from eventwire import metrics
from eventwire.core.auth import LEEWAY, Proof, TokenRefused, verify_token
from eventwire.core.config import Settings
from eventwire.core.errors import ProtocolViolation, StoreUnavailable, UndecodableFrame
from eventwire.core.ordering import FrameOwner, TokenBucket
from eventwire.core.protocol import (
    Ack,
    Codec,
    Hello,
    Identify,
    Nack,
    NackCode,
    RejectedRecord,
    Rejection,
    Track,
    Welcome,
    WireEvent,
    event_text,
    record_encoder,
)
from eventwire.core.rules import SiteRules, SitesBook
from eventwire.core.validation import (
    DENIED,
    INVALID,
    UNAUTHORIZED,
    Identity,
    Limits,
    Rejected,
    judge_event,
)
from eventwire.sessions import Sessions, now_ms
from eventwire.store import COUNT_ONLY, EVENT, REJECT, REJECT_ALWAYS, Frame, Store
from eventwire.tasks import cancel_and_wait

#: ``raw`` in the rejected stream is cut to this many characters (PROTOCOL.md section 7).
RAW_LIMIT: Final = 4096

log = structlog.get_logger("eventwire.ingest")

#: Writes one encoded message to the client now, without waiting; never raises.
Send = Callable[[bytes], None]


class _Pending:
    """A frame waiting for its answer, in arrival order."""

    __slots__ = ("rejections", "reply", "seq")

    def __init__(self, seq: int, rejections: list[Rejection], reply: bytes | None = None) -> None:
        self.seq = seq
        self.rejections = rejections
        self.reply = reply


class IngestConnection:
    """The state of one tracking connection.

    Args:
        book: the sites' current rules; each frame uses the rules current when it arrives.
        site: the connection's site.
        settings: server settings.
        store: the Redis room.
        sessions: the session room.
        codec: the negotiated subprotocol.
        send: writes one encoded message to the client without waiting.
    """

    def __init__(
        self,
        book: SitesBook,
        site: str,
        settings: Settings,
        store: Store,
        sessions: Sessions,
        codec: Codec,
        send: Send,
    ) -> None:
        self.book = book
        self.site = site
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.codec = codec
        self._send = send
        self.limits = Limits(
            max_event_bytes=settings.max_event_bytes,
            max_clock_skew_ms=int(settings.max_clock_skew * 1000),
            max_event_age_ms=int(settings.max_event_age * 1000),
        )
        self.who: Identity | None = None
        self._keys_for: Identity | None = None
        self._tag = ""
        self._producer_key = ""
        self._session_key = ""
        #: The verified token of the current customer, and why the last one was refused.
        self.proof: Proof | None = None
        self.token_problem = "no token was given"
        self.bucket: TokenBucket | None = None
        self.member = ""
        self.producer = ""
        self.context: dict[str, Any] | None = None
        self.owner = FrameOwner()
        #: Frames whose session ended while they were on their way, in order.
        self._gone: list[Frame] = []
        self._renewal: asyncio.Task[None] | None = None
        self._pending: deque[_Pending] = deque()
        #: Set whenever answers went out; every waiter (room for a frame, a
        #: drain, several at once) wakes and looks again.
        self._answered = asyncio.Event()
        self._closed = False
        self.frames = 0
        self.accepted = 0
        self.duplicate = 0
        self.rejected = 0
        self.nacked = 0
        self._counts = metrics.site_counts(site)

    def rules(self) -> SiteRules:
        """The site's current rules.

        Raises:
            ProtocolViolation: the site was removed from the sites file (1008).
        """
        rules = self.book.get(self.site)
        if rules is None:
            raise ProtocolViolation("unknown_site", f"site {self.site!r} is no longer configured")
        return rules

    def _prove(self, rules: SiteRules, uuid: str, token: str | None) -> None:
        """Verify the token of a hello or identify, as the site's ``auth`` asks.

        Raises:
            ProtocolViolation: the site needs a valid token and this is none (1008).
        """
        self.proof = None
        if token is None:
            self.token_problem = "no token was given"
        else:
            try:
                self.proof = verify_token(token, rules.keys, self.site, uuid)
            except TokenRefused as exc:
                self.token_problem = str(exc)
        if self.proof is None and rules.config.auth == "token":
            raise ProtocolViolation(
                "unauthorized", f"this site needs a valid token: {self.token_problem}"
            )

    # -- hello ------------------------------------------------------------------

    async def hello(self, data: bytes | str) -> None:
        """Handle the first frame: it must be a hello; answer with a welcome.

        Raises:
            ProtocolViolation: the frame is not a valid hello (1008) or not
                decodable (1007).
            StoreUnavailable: Redis could not open the session.
        """
        try:
            msg = self.codec.decode(data)
        except msgspec.ValidationError as exc:
            raise ProtocolViolation("bad_hello", f"invalid hello: {exc}") from None
        if not isinstance(msg, Hello):
            raise ProtocolViolation("bad_hello", "the first message must be a hello")
        rules = self.rules()
        self._prove(rules, msg.uuid, msg.token)
        member = self.sessions.member(msg.uuid)
        opened = await self.sessions.open(self.site, msg.uuid, member, msg.producer, msg.context)
        self.member, self.producer, self.context = member, msg.producer, msg.context
        self._become(msg.uuid, opened.session)
        welcome = Welcome(
            session=opened.session,
            resumed=opened.resumed,
            acked=opened.acked,
            server_time=now_ms(),
            max_batch=self.settings.max_batch,
        )
        self._send(self.codec.encode(welcome))

    # -- frames after hello -----------------------------------------------------

    async def receive(self, data: bytes | str) -> None:
        """Handle one frame after the hello.

        Returns once the frame is queued; its answer follows in order. Waits
        first while ``max_inflight_frames`` frames are unanswered.

        Raises:
            ProtocolViolation: the frame breaks the protocol.
        """
        limit = self.settings.max_inflight_frames
        await self._wait_answers(lambda: len(self._pending) < limit)
        try:
            msg: Any = self.codec.decode(data)
        except msgspec.ValidationError:
            msg = self.codec.split_track(data)
        if isinstance(msg, Track):
            self._track(msg.events)
        elif isinstance(msg, list):
            self._track(msg)
        elif isinstance(msg, Identify):
            await self._identify(msg)
        else:
            raise ProtocolViolation("bad_message", "hello was already received")

    def _track(self, events: list[WireEvent] | list[WireEvent | tuple[int, str, bytes]]) -> None:
        assert self.who is not None
        if not 1 <= len(events) <= self.settings.max_batch:
            raise UndecodableFrame(
                f"track holds {len(events)} events; it must hold 1 to {self.settings.max_batch}"
            )
        rules = self.rules()
        self.frames += 1
        self._counts.frames += 1
        received = now_ms()
        who = self._identity(received)
        if len(events) == 1:
            only = events[0]
            low = high = only.seq if isinstance(only, WireEvent) else only[0]
        else:
            seqs = [e.seq if isinstance(e, WireEvent) else e[0] for e in events]
            low, high = min(seqs), max(seqs)
        if not self.owner.admit(low):
            if self.owner.code == "rate_limited":
                self._check_flood(rules, received)
            self._answer_now(self._nack(high, self.owner.code))
            return
        wait_ms = self._rate_limited(rules, len(events), received)
        if wait_ms is not None:
            # Like a failed store: nothing stored, and the frames after it wait
            # for the resend (see FrameOwner), so the client's order holds.
            # A new epoch keeps the frames before it, already admitted, alive.
            self.owner.epoch += 1
            self.owner.fail(self.owner.epoch, low, "rate_limited")
            self._answer_now(self._nack(high, "rate_limited", wait_ms))
            return
        limits = self.limits
        items: list[Any] = []
        rejections: list[Rejection] = []
        denied = 0
        top = 0
        for event in events:
            if isinstance(event, WireEvent):
                seq = event.seq
                outcome: bytes | Rejected = (
                    # The verdict is looked up only for a well-formed action: a
                    # frame of long junk actions must not fill the verdict cache.
                    judge_event(event, who, received, limits, rules.verdict)
                    if seq > top
                    else Rejected(INVALID, f"seq {seq} is not above the seq before it ({top})")
                )
            else:
                seq, detail, raw = event
                outcome = Rejected(INVALID, detail)
            if isinstance(outcome, bytes):
                items += (seq, EVENT, outcome)
                top = seq
                continue
            detail = outcome.detail
            if outcome.code == UNAUTHORIZED and self.proof is None:
                detail = f"{detail}; {self.token_problem}"
            rejections.append(Rejection(seq=seq, code=outcome.code, detail=detail))
            if outcome.code == DENIED:
                # A deny list exists to keep that data out: counted, stored nowhere.
                denied += 1
                items += (seq, COUNT_ONLY, b"")
                top = max(top, seq)
                continue
            raw_text = (
                self.codec.to_json_text(raw)
                if not isinstance(event, WireEvent)
                else event_text(event)
            )
            record = record_encoder.encode(
                RejectedRecord(
                    site=self.site,
                    uuid=who.uuid,
                    producer=who.producer,
                    seq=seq,
                    code=outcome.code,
                    detail=detail,
                    received=received,
                    raw=raw_text[:RAW_LIMIT],
                )
            )
            if seq > top:
                items += (seq, REJECT, record)
                top = seq
            else:
                items += (seq, REJECT_ALWAYS, record)
        if rejections:
            self._count_rejections(rejections, denied)
        pending = _Pending(high, rejections)
        self._pending.append(pending)
        keys = self.store.keys
        if self._keys_for is not who:
            # Key names change only with the customer: built once, not per frame.
            self._keys_for = who
            self._tag = self.store.tag(self.site, who.uuid)
            self._producer_key = keys.producer(self._tag, who.producer)
            self._session_key = keys.session(self._tag, who.uuid)
        self.store.submit(
            self.site,
            self._tag,
            self._producer_key,
            self._session_key,
            who.uuid,
            who.session,
            items,
            self,
            pending,
            self.owner,
            low,
        )

    def _identity(self, now: int) -> Identity:
        """The sender as of now: a token that expired no longer proves the customer."""
        who = self.who
        assert who is not None
        if self.proof is not None and now > (self.proof.exp + LEEWAY) * 1000:
            self.proof = None
            self.token_problem = "the token expired; send identify with a fresh one"
            who = self._become(who.uuid, who.session)
        return who

    def _become(self, uuid: str, session: str) -> Identity:
        """Set who sends from now on: customer, session, and whether a token proves them."""
        self.who = Identity(
            site=self.site,
            uuid=uuid,
            session=session,
            producer=self.producer,
            authenticated=self.proof is not None,
        )
        structlog.contextvars.bind_contextvars(
            uuid=uuid, session=session, authenticated=self.proof is not None
        )
        return self.who

    def _rate_limited(self, rules: SiteRules, n: int, now: int) -> int | None:
        """Take ``n`` events from the connection's bucket; None, or how long to wait (ms).

        Raises:
            ProtocolViolation: the client kept sending for ``close_after``
                seconds without waiting as told (1008).
        """
        rate = rules.config.rate
        if rate is None:
            return None
        bucket = self.bucket
        if bucket is None or bucket.rate != rate:
            bucket = self.bucket = TokenBucket(rate, now)
        wait_ms = bucket.take(n, now)
        if wait_ms is not None:
            self._check_flood(rules, now)
        return wait_ms

    def _check_flood(self, rules: SiteRules, now: int) -> None:
        """Close a client whose frames have all been refused for ``close_after`` seconds.

        Raises:
            ProtocolViolation: the client kept sending without waiting as told (1008).
        """
        rate, bucket = rules.config.rate, self.bucket
        if rate is None or bucket is None:
            return
        if bucket.refused(now) > rate.close_after * 1000:
            raise ProtocolViolation(
                "rate_limited",
                f"over {rate.events_per_second:g} events/s for {rate.close_after:g} s "
                "without waiting retry_after_ms",
            )

    async def _identify(self, msg: Identify) -> None:
        """Switch the connection to another customer (PROTOCOL.md section 2).

        The old customer's session gets ``client.identify`` and ends (reason
        ``identify``) if this was its last connection; the connection then
        joins or opens the new customer's session. Frames already received
        are stored first, for the customer they were sent for.

        On a partitioned site the new customer may live in another partition,
        whose copy of the producer's stored seq is behind. Once every earlier
        frame is answered (the drain), the old partition's seq is the
        producer's high-water mark; it is carried into the new partition, so
        ``welcome.acked`` and de-duplication go on as with one key.
        """
        assert self.who is not None
        if msg.uuid == self.who.uuid and msg.token is None:
            return
        rules = self.rules()
        self._prove(rules, msg.uuid, msg.token)
        if msg.uuid == self.who.uuid:
            # A fresh token for the same customer: authenticated again, same session.
            self._become(msg.uuid, self.who.session)
            return
        await self.drain()
        old = self.who
        member = self.sessions.member(msg.uuid)
        moves = self.store.tag(self.site, old.uuid) != self.store.tag(self.site, msg.uuid)
        try:
            stored = await self.sessions.leave(
                self.site,
                old.uuid,
                self.member,
                identify_to=msg.uuid,
                producer=self.producer if moves else "",
            )
            self.member = ""
            opened = await self.sessions.open(
                self.site, msg.uuid, member, self.producer, self.context, carry=stored
            )
        except StoreUnavailable as exc:
            raise ProtocolViolation("unavailable", f"identify failed: {exc}", 1013) from None
        self.member = member
        self._become(msg.uuid, opened.session)

    def _count_rejections(self, rejections: list[Rejection], denied: int) -> None:
        self.rejected += len(rejections) - denied
        self._counts.rejected += len(rejections) - denied
        self._counts.denied += denied
        for r in rejections:
            metrics.REJECTS.labels(self.site, r.code).inc()

    def _nack(self, seq: int, code: NackCode = "unavailable", wait_ms: int | None = None) -> bytes:
        self.nacked += 1
        metrics.NACKS.labels(self.site, code).inc()
        if wait_ms is None:
            wait_ms = self.settings.retry_after_ms
        return self.codec.encode(Nack(seq=seq, code=code, retry_after_ms=wait_ms))

    def _answer_now(self, reply: bytes) -> None:
        """Queue an answer that needs no store step, behind those still due."""
        self._pending.append(_Pending(0, [], reply))
        self._flush()

    # -- answers, in order ------------------------------------------------------

    def frame_stored(self, frame: Frame, added: int, duplicate: int) -> None:
        """FrameSink: the frame's events are in Redis; its ack may go."""
        self.accepted += added
        self.duplicate += duplicate
        self._counts.accepted += added
        self._counts.duplicate += duplicate
        token: _Pending = frame.token
        token.reply = self.codec.encode(
            Ack(seq=token.seq, accepted=added, duplicate=duplicate, rejected=token.rejections)
        )
        self._flush()

    def frame_failed(self, frame: Frame, why: str) -> None:
        """FrameSink: nothing of the frame is stored; it is nacked."""
        token: _Pending = frame.token
        token.reply = self._nack(token.seq, self.owner.code)
        self._flush()

    def frame_gone(self, frame: Frame) -> None:
        """FrameSink: the session ended (idle or max) before the frame was stored.

        The customer's next events open a new session on this connection: the
        frame is re-encoded for the current session and sent again, behind the
        frames that came back before it, so the producer's order holds.
        """
        assert self.who is not None
        if self._gone or frame.session == self.who.session:
            self._gone.append(frame)
            if self._renewal is None:
                self._renewal = asyncio.create_task(self._renew())
        else:
            self._resend(frame)

    async def _renew(self) -> None:
        assert self.who is not None
        who = self.who
        opened = None
        why = "connection closed"
        try:
            # A closed connection has left (or is leaving) its session: opening
            # one now would register a connection that nobody ever closes.
            if not self._closed:
                opened = await self.sessions.open(
                    self.site, who.uuid, self.member, self.producer, self.context
                )
        except StoreUnavailable as exc:
            why = str(exc)
        finally:
            self._renewal = None
        gone, self._gone = self._gone, []
        if opened is None:
            for frame in gone:
                frame.fail(why)
            return
        if opened.session != who.session:
            self._become(who.uuid, opened.session)
        for frame in gone:
            self._resend(frame)

    def _resend(self, frame: Frame) -> None:
        """Re-encode a frame's events for the current session and queue it again."""
        assert self.who is not None
        old = f'"session":"{frame.session}"'.encode()
        new = f'"session":"{self.who.session}"'.encode()
        args = frame.args
        for i in range(0, len(args), 3):
            if args[i + 1] == EVENT:
                # The session is the third field of every stored event, and the
                # site and uuid before it cannot hold a quote: the first match is it.
                args[i + 2] = args[i + 2].replace(old, new, 1)
        frame.session = self.who.session
        self.store.resubmit(frame)

    def _flush(self) -> None:
        """Send every answer that is due, in frame order."""
        pending = self._pending
        while pending and pending[0].reply is not None:
            reply = pending.popleft().reply
            assert reply is not None
            if not self._closed:
                self._send(reply)
        self._answered.set()

    async def _wait_answers(self, enough: Callable[[], bool]) -> None:
        while not enough():
            self._answered.clear()
            await self._answered.wait()

    async def drain(self) -> None:
        """Wait until every received frame has been answered (any number may wait)."""
        await self._wait_answers(lambda: not self._pending)

    async def close(self) -> None:
        """Stop answering and leave the customer's session.

        Frames still in the store are waited for (up to two store timeouts),
        so that the session counts their events before its grace starts.
        """
        self._closed = True
        if self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.store_timeout * 2):
                    await self.drain()
        if self._renewal is not None:
            await cancel_and_wait([self._renewal])
        if self.who is None or not self.member:
            return
        try:
            await self.sessions.leave(self.site, self.who.uuid, self.member)
        except StoreUnavailable as exc:
            # The heartbeat lapses instead, and a reaper counts it as closed.
            log.warning("leave_failed", error=str(exc))

    def stats(self) -> dict[str, int]:
        """Counts for the connection's closing log line."""
        return {
            "frames": self.frames,
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "nacked": self.nacked,
        }


def undecodable_record(
    site: str, who: Identity | None, detail: str, data: bytes | str, received: int
) -> bytes:
    """The rejected-stream record of a frame that could not be decoded."""
    if isinstance(data, str):
        raw, b64 = data[:RAW_LIMIT], False
    else:
        try:
            raw, b64 = data.decode("utf-8")[:RAW_LIMIT], False
        except UnicodeDecodeError:
            raw, b64 = base64.b64encode(data[:3072]).decode(), True
    return record_encoder.encode(
        RejectedRecord(
            site=site,
            uuid=who.uuid if who else None,
            producer=who.producer if who else None,
            seq=None,
            code="undecodable",
            detail=detail,
            received=received,
            raw=raw,
            raw_base64=b64,
        )
    )
