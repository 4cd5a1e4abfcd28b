"""One tracking connection's protocol, without I/O: frames and results in, commands out.

:class:`Connection` is the state machine of docs/protocol.md sections 2, 3 and 6
for one socket. It never awaits, never reads a clock and never touches a
socket or Redis: the driver (``ingest``) feeds it the client's frames, the
store's and the sessions' results and the time, and carries out the commands
(:mod:`~eventwire.core.commands`) each input returns, in order::

    hello ──OpenSession──> session_opened ──> welcome          (state "open")
    track ──judge──SubmitFrame──> frame_stored  ──> ack        (in frame order)
                                  frame_failed  ──> nack unavailable
                                  frame_gone    ──OpenSession(renew)──> ResubmitFrame
    identify ──(earlier frames answered)──SwitchCustomer──> identified
    a broken rule ──(earlier frames answered)──> error, Close

The answers, by what causes them:

- a bad event -> a rejection inside the ack (final; in the rejected stream
  too, except ``denied`` events, which are stored nowhere);
- Redis down or slow -> ``nack unavailable``; over the site's rate ->
  ``nack rate_limited`` (nothing of the frame stored); after either, the
  frames behind it are nacked too until the client resends
  (:class:`~eventwire.core.ordering.FrameOwner`);
- a broken protocol -> an ``error`` message and a close: 1008 for a bad or
  late hello, a refused token, a removed site, a flood or a message out of
  place; 1007 for a frame that does not decode (recorded as rejected); 1013
  when Redis cannot open the session at hello or identify; 1001 when the
  server shuts down. 1009 (frame too large) is websockets' own.

Frames are answered in the order they arrived; up to ``max_inflight_frames``
of them may wait for the store at once (:attr:`Connection.readable`).
Identify and every close wait until the earlier frames are answered, so the
error is the last message and identify moves the customer only after its
frames are stored for the customer they were sent for.
"""

from __future__ import annotations

from typing import Any, Final, Literal, Protocol

import msgspec

from eventwire.core.auth import LEEWAY, Proof, TokenRefused, verify_token
from eventwire.core.commands import (
    Close,
    Command,
    LeaveSession,
    OpenSession,
    RecordUndecodable,
    ResubmitFrame,
    Send,
    SessionStart,
    SubmitFrame,
    SwitchCustomer,
)
from eventwire.core.config import Settings
from eventwire.core.errors import ProtocolViolation, UndecodableFrame
from eventwire.core.frames import deny_all, encode_for_session, judge_events, undecodable_record
from eventwire.core.ordering import FrameOwner, TokenBucket
from eventwire.core.protocol import (
    Ack,
    Codec,
    Error,
    Hello,
    Identify,
    Nack,
    NackCode,
    Rejection,
    Track,
    Welcome,
    WireEvent,
)
from eventwire.core.rules import SiteRules, SitesBook
from eventwire.core.source import origin_hosts, shared_source
from eventwire.core.validation import Identity, Limits
from eventwire.core.visitor import Visitor, client_info

#: Where a connection is; see the module docstring.
State = Literal["hello", "opening", "open", "identifying", "closing", "closed"]

#: A close reason must fit a control frame: 123 bytes of UTF-8.
REASON_BYTES: Final = 120

#: The detail of every event of a customer who was forgotten and suppressed.
FORGOTTEN_DETAIL: Final = "this customer asked to be forgotten: nothing of theirs is stored"


class Tally(Protocol):
    """Counts a connection adds to (``metrics.SiteCounts`` of its site, in the server)."""

    frames: int
    accepted: int
    duplicate: int
    rejected: int
    denied: int
    #: Events of bot connections by outcome: flagged, dropped, kept.
    bots: dict[str, int]


class Counts:
    """A :class:`Tally` of its own, for a connection that reports to nobody."""

    __slots__ = ("accepted", "bots", "denied", "duplicate", "frames", "rejected")

    def __init__(self) -> None:
        self.frames = self.accepted = self.duplicate = self.rejected = self.denied = 0
        self.bots = {"flagged": 0, "dropped": 0, "kept": 0}


class _Answer(msgspec.Struct, gc=False):
    """An answer known at once (a nack), queued behind the frames still due."""

    reply: bytes
    nack: NackCode | None = None


def close_reason(detail: str) -> str:
    """The detail cut to a close frame's reason (:data:`REASON_BYTES`, whole characters)."""
    return detail.encode()[:REASON_BYTES].decode("utf-8", "ignore")


class Connection:
    """The protocol state of one tracking connection.

    Args:
        book: the sites' current rules; each frame uses the rules current when it arrives.
        site: the connection's site.
        settings: server settings.
        codec: the negotiated subprotocol.
        tally: where the site's counts go (a :class:`Counts` of its own if None).
        visitor: what the handshake said of the visitor; None: the connection
            is not enriched (no ``client``, no ``params.source``, no bot check).
            It is let go at hello, once :attr:`start` holds what later
            sessions need: the raw address and User-Agent are kept no longer.
    """

    # One per open connection: no instance dict (~1.2 KiB of 19,500 idle ones).
    __slots__ = (
        "_bot_flag",
        "_ending",
        "_gone",
        "_hello_uuid",
        "_hosts",
        "_max_batch",
        "_max_inflight",
        "_new_uuid",
        "_queue",
        "_refused",
        "_renewing",
        "_switch_to",
        "accepted",
        "book",
        "bot_dropped",
        "bot_outcome",
        "bots_dropped",
        "bucket",
        "codec",
        "context",
        "duplicate",
        "frames",
        "limits",
        "lost",
        "nacked",
        "owner",
        "producer",
        "proof",
        "rejected",
        "settings",
        "site",
        "start",
        "state",
        "suppressed",
        "tally",
        "token_problem",
        "visitor",
        "who",
    )

    def __init__(
        self,
        book: SitesBook,
        site: str,
        settings: Settings,
        codec: Codec,
        tally: Tally | None = None,
        visitor: Visitor | None = None,
    ) -> None:
        self.book = book
        self.site = site
        self.settings = settings
        self.codec = codec
        self.tally: Tally = tally if tally is not None else Counts()
        self.limits = Limits(
            max_event_bytes=settings.max_event_bytes,
            max_clock_skew_ms=int(settings.max_clock_skew * 1000),
            max_event_age_ms=int(settings.max_event_age * 1000),
        )
        self._max_batch = settings.max_batch
        self._max_inflight = settings.max_inflight_frames
        self.state: State = "hello"
        #: Who sends, once the hello's session is open.
        self.who: Identity | None = None
        #: The verified token of the current customer, and why the last one was refused.
        self.proof: Proof | None = None
        self.token_problem = "no token was given"
        self.producer = ""
        self.context: dict[str, Any] | None = None
        self.visitor = visitor
        #: What the hello's session.start gets (None without a visitor).
        self.start: SessionStart | None = None
        #: Why this bot's events are dropped ('' when they are not).
        self.bot_dropped = ""
        #: Which bot count this connection's stored events go to ('' for a human).
        self.bot_outcome = ""
        #: This connection's dropped bot events, for the site's count in Redis.
        self.bots_dropped = 0
        self._bot_flag = False
        self._hosts: frozenset[str] | None = None
        self.bucket: TokenBucket | None = None
        self.owner = FrameOwner()
        #: Frames and answers not yet sent, in arrival order.
        self._queue: list[SubmitFrame | _Answer] = []
        #: Frames whose session ended on their way, in order, while a new one opens.
        self._gone: list[SubmitFrame] = []
        self._renewing = False
        #: The customer an identify moves to, until SwitchCustomer is asked for.
        self._switch_to = ""
        self._new_uuid = ""
        self._refused = ""
        self._hello_uuid = ""
        #: The error (or shutdown) a close waits to send.
        self._ending: ProtocolViolation | None = None
        #: The socket is gone: answers go nowhere and no session is opened any more.
        self.lost = False
        #: The customer was forgotten and suppressed: every event is denied, no session.
        self.suppressed = False
        self.frames = 0
        self.accepted = 0
        self.duplicate = 0
        self.rejected = 0
        self.nacked = 0

    # -- what the driver looks at ---------------------------------------------------

    @property
    def readable(self) -> bool:
        """Whether the driver may read the client's next frame now.

        False while the hello's session opens, an identify is carried out, a
        close waits, or ``max_inflight_frames`` frames wait for their answers.
        """
        return self.state == "open" and len(self._queue) < self._max_inflight

    @property
    def unanswered(self) -> int:
        """Frames received and not yet answered."""
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        """Counts for the connection's closing log line."""
        return {
            "frames": self.frames,
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "nacked": self.nacked,
        }

    # -- the client's frames ----------------------------------------------------------

    def receive(self, data: bytes | str, now: int) -> list[Command]:
        """Take one frame from the client.

        Args:
            data: the frame as received (text or binary).
            now: the receive time, ms since the epoch.

        Returns:
            The commands to carry out, in order.

        Raises:
            RuntimeError: the driver read a frame while :attr:`readable` was
                False for a session step (a bug in the driver).
        """
        state = self.state
        try:
            if state == "open":
                try:
                    msg: Any = self.codec.decode(data)
                except msgspec.ValidationError:
                    msg = self.codec.split_track(data)
                if isinstance(msg, Track):
                    return self._track(msg.events, now)
                if isinstance(msg, list):
                    return self._track(msg, now)
                if isinstance(msg, Identify):
                    return self._identify(msg, now)
                raise ProtocolViolation("bad_message", "hello was already received")
            if state == "hello":
                return self._hello(data)
        except UndecodableFrame as exc:
            record = undecodable_record(self.site, self.who, exc.detail, data, now)
            uuid = self.who.uuid if self.who is not None else None
            return [RecordUndecodable(uuid, record), *self._end(exc)]
        except ProtocolViolation as exc:
            return self._end(exc)
        if state in ("closing", "closed"):
            # Read while a close was on its way: never answered, resent by the client.
            return []
        raise RuntimeError(f"a frame was fed while the connection is {state!r} (see readable)")

    def hello_timed_out(self) -> list[Command]:
        """The hello did not arrive within ``hello_timeout``: error, close 1008."""
        if self.state != "hello":
            return []
        return self._end(
            ProtocolViolation("hello_timeout", f"no hello within {self.settings.hello_timeout:g} s")
        )

    def shutdown(self) -> list[Command]:
        """The server shuts down: answer the frames received, then close 1001."""
        if self.state not in ("hello", "open"):
            return []
        return self._end(ProtocolViolation("shutting_down", "server shutting down", 1001))

    def connection_lost(self) -> None:
        """The socket closed: answers go nowhere, and no session is opened for it any more."""
        self.lost = True
        self.state = "closed"

    def finish(self) -> list[Command]:
        """The connection is done: leave the customer's session (after :meth:`connection_lost`)."""
        self.lost = True
        self.state = "closed"
        who, self.who = self.who, None
        return [LeaveSession(who.uuid)] if who is not None else []

    # -- hello --------------------------------------------------------------------------

    def _hello(self, data: bytes | str) -> list[Command]:
        try:
            msg = self.codec.decode(data)
        except msgspec.ValidationError as exc:
            raise ProtocolViolation("bad_hello", f"invalid hello: {exc}") from None
        if not isinstance(msg, Hello):
            raise ProtocolViolation("bad_hello", "the first message must be a hello")
        rules = self._rules()
        self._prove(rules, msg.uuid, msg.token)
        self.producer, self.context = msg.producer, msg.context
        self._hello_uuid = msg.uuid
        self.state = "opening"
        if self.visitor is not None:
            self.start = self._visitor_start(rules, msg.context, self.visitor)
            self.visitor = None
        return [OpenSession(msg.uuid, msg.producer, msg.context, start=self.start)]

    def _visitor_start(
        self, rules: SiteRules, context: dict[str, Any] | None, visitor: Visitor
    ) -> SessionStart:
        """The visitor's ``client`` and attribution, and what the site does with a bot."""
        config = rules.config
        client = client_info(visitor, config.ip, context, not config.allow_no_origin)
        self._hosts = origin_hosts(config.origins)
        source = None
        url = context.get("url") if context is not None else None
        if isinstance(url, str) and url:
            referrer = context.get("referrer") if context is not None else None
            source = shared_source(url, referrer if isinstance(referrer, str) else "", self._hosts)
        mode = config.bots
        if client.bot:
            self.bot_outcome = {"flag": "flagged", "drop": "dropped", "keep": "kept"}[mode]
            if mode == "drop":
                self.bot_dropped = (
                    f"this site stores no bot traffic; this connection is a bot: "
                    f"{client.bot_reason}"
                )
        self._bot_flag = client.bot and mode == "flag"
        return SessionStart(client, source, self._bot_flag, bool(self.bot_dropped))

    def session_opened(
        self, session: str, resumed: bool, acked: int, now: int, suppressed: bool = False
    ) -> list[Command]:
        """Sessions: the connection is registered in ``session`` (after :class:`OpenSession`).

        Args:
            session: the session joined or opened.
            resumed: whether it was already open.
            acked: the producer's highest stored seq.
            now: the time, ms since the epoch (the welcome's ``server_time``).
            suppressed: the customer was forgotten and suppressed: nothing was
                registered, ``session`` is a fresh id stored nowhere, and every
                event is denied from now on.
        """
        self.suppressed = suppressed
        if self._renewing:
            return self._renewed(session)
        if self.state != "opening":
            return []
        self._become(self._hello_uuid, session)
        self.state = "open"
        welcome = Welcome(
            session=session,
            resumed=resumed,
            acked=acked,
            server_time=now,
            max_batch=self._max_batch,
        )
        return [Send(self.codec.encode(welcome))]

    def session_unavailable(self, why: str) -> list[Command]:
        """Sessions: Redis could not open the session (after :class:`OpenSession`).

        At hello: error unavailable, close 1013. For a renewal: the frames
        waiting for it are nacked ``unavailable``.
        """
        if self._renewing:
            self._renewing = False
            gone, self._gone = self._gone, []
            for frame in gone:
                self._fail(frame)
            return self._flush()
        if self.state != "opening":
            return []
        return self._end(ProtocolViolation("unavailable", why, 1013))

    # -- track --------------------------------------------------------------------------

    def _track(self, events: list[WireEvent] | list[Any], now: int) -> list[Command]:
        if not 1 <= len(events) <= self._max_batch:
            raise UndecodableFrame(
                f"track holds {len(events)} events; it must hold 1 to {self._max_batch}"
            )
        rules = self._rules()
        self.frames += 1
        self.tally.frames += 1
        who = self._identity(now)
        if len(events) == 1:
            only = events[0]
            low = high = only.seq if isinstance(only, WireEvent) else only[0]
        else:
            seqs = [e.seq if isinstance(e, WireEvent) else e[0] for e in events]
            low, high = min(seqs), max(seqs)
        owner = self.owner
        if not owner.admit(low):
            if owner.code == "rate_limited":
                self._check_flood(rules, now)
            return self._answer_now(high, owner.code)
        if self.suppressed:
            return self._deny_all(
                high, [e.seq if isinstance(e, WireEvent) else e[0] for e in events]
            )
        wait_ms = self._rate_limited(rules, len(events), now)
        if wait_ms is not None:
            # Like a failed store: nothing stored, and the frames after it wait
            # for the resend (see FrameOwner), so the client's order holds.
            # A new epoch keeps the frames before it, already admitted, alive.
            owner.epoch += 1
            owner.fail(owner.epoch, low, "rate_limited")
            return self._answer_now(high, "rate_limited", wait_ms)
        if self.bot_dropped:
            items, rejections = deny_all(events, self.bot_dropped)
            denied = len(rejections)
            self.tally.bots["dropped"] += denied
            self.bots_dropped += denied
        else:
            items, rejections, denied = judge_events(
                events,
                who,
                now,
                self.limits,
                rules.verdict,
                self.codec,
                None if self.proof is not None else self.token_problem,
            )
        if rejections:
            self.rejected += len(rejections) - denied
            self.tally.rejected += len(rejections) - denied
            self.tally.denied += denied
        frame = SubmitFrame(high, low, owner.epoch, who.uuid, who.session, items, rejections)
        self._queue.append(frame)
        return [frame]

    def _rate_limited(self, rules: SiteRules, n: int, now: int) -> int | None:
        """Take ``n`` events from the connection's bucket; None, or how long to wait (ms)."""
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
        """Refuse a client whose frames have all been refused for ``close_after`` seconds.

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

    # -- the store's results --------------------------------------------------------

    def frame_stored(self, frame: SubmitFrame, added: int, duplicate: int) -> list[Command]:
        """Store: the frame's events are in Redis (``added`` new, ``duplicate`` skipped)."""
        self.accepted += added
        self.duplicate += duplicate
        self.tally.accepted += added
        self.tally.duplicate += duplicate
        if self.bot_outcome:
            self.tally.bots[self.bot_outcome] += added
        frame.reply = self.codec.encode(
            Ack(seq=frame.seq, accepted=added, duplicate=duplicate, rejected=frame.rejections)
        )
        return self._flush()

    def frame_failed(self, frame: SubmitFrame) -> list[Command]:
        """Store: nothing of the frame is stored; it is nacked and the frames behind it wait."""
        self._fail(frame)
        return self._flush()

    def frame_gone(self, frame: SubmitFrame) -> list[Command]:
        """Store: the session ended (idle or max) before the frame was stored.

        The customer's next events open a new session on this connection: the
        frame is built again for it and sent again, behind the frames that
        came back before it, so the producer's order holds.
        """
        who = self.who
        if self.lost or who is None:
            # A closed connection has left (or is leaving) its session: opening
            # one now would register a connection that nobody ever closes.
            self._fail(frame)
            return self._flush()
        if self._gone or frame.session == who.session:
            self._gone.append(frame)
            if self._renewing:
                return []
            self._renewing = True
            return [OpenSession(who.uuid, self.producer, self.context, True, self.start)]
        return [self._resend(frame, who.session)]

    def _renewed(self, session: str) -> list[Command]:
        self._renewing = False
        who = self.who
        assert who is not None
        if session != who.session:
            who = self._become(who.uuid, session)
        gone, self._gone = self._gone, []
        if self.suppressed:
            # Forgotten while these were on their way: they are denied, stored nowhere.
            for frame in gone:
                self._deny_frame(frame)
            return self._flush()
        return [self._resend(frame, who.session) for frame in gone]

    def _deny_frame(self, frame: SubmitFrame) -> None:
        """Answer a frame of a suppressed customer: every event denied, its rejections kept."""
        items = frame.items
        judged = {r.seq for r in frame.rejections}
        denied = [
            Rejection(seq=items[i], code="denied", detail=FORGOTTEN_DETAIL)
            for i in range(0, len(items), 3)
            if items[i] not in judged
        ]
        self.tally.denied += len(denied)
        rejected = sorted([*frame.rejections, *denied], key=lambda r: r.seq)
        frame.reply = self.codec.encode(
            Ack(seq=frame.seq, accepted=0, duplicate=0, rejected=rejected)
        )

    def _deny_all(self, high: int, seqs: list[int]) -> list[Command]:
        """Answer a frame of a suppressed customer: each event denied, nothing stored."""
        self.tally.denied += len(seqs)
        rejected = [Rejection(seq=q, code="denied", detail=FORGOTTEN_DETAIL) for q in seqs]
        reply = self.codec.encode(Ack(seq=high, accepted=0, duplicate=0, rejected=rejected))
        if self._queue:
            self._queue.append(_Answer(reply))
            return []
        return [Send(reply)]

    def _resend(self, frame: SubmitFrame, session: str) -> ResubmitFrame:
        encode_for_session(frame.items, session)
        frame.session = session
        return ResubmitFrame(frame)

    def _fail(self, frame: SubmitFrame) -> None:
        # The store has poisoned the epoch already when it reports the
        # failure; doing it here as well (it is idempotent) keeps the order
        # right for failures the store never saw (a renewal that failed).
        self.owner.fail(frame.epoch, frame.low)
        code = self.owner.code
        frame.reply = self._nack(frame.seq, code)
        frame.nack = code

    # -- identify -------------------------------------------------------------------

    def _identify(self, msg: Identify, now: int) -> list[Command]:
        """Switch the connection to another customer (docs/protocol.md section 2).

        The old customer's session gets ``client.identify`` and ends (reason
        ``identify``) if this was its last connection; the connection then
        joins or opens the new customer's session. Frames already received
        are answered first, stored for the customer they were sent for; on a
        partitioned site the producer's stored seq then is its high-water
        mark, which the driver carries into the new customer's partition.
        """
        who = self.who
        assert who is not None
        if msg.uuid == who.uuid and msg.token is None:
            return []
        was_proven = self.proof is not None
        rules = self._rules()
        self._prove(rules, msg.uuid, msg.token)
        if msg.uuid == who.uuid:
            # A fresh token for the same customer: authenticated again, same session.
            self._become(msg.uuid, who.session)
            return []
        self.state = "identifying"
        self._switch_to = msg.uuid
        self._refused = (
            self._merge_refused(rules, msg.uuid, was_proven)
            if msg.merge
            else "the client asked not to merge (a log-out or reset)"
        )
        return self._flush()

    def _merge_refused(self, rules: SiteRules, uuid: str, was_proven: bool) -> str:
        """Why the uuid left must not merge into ``uuid`` ('' lets Redis decide).

        A site with token keys merges only into a customer its token proves
        (otherwise anyone could pour a history into another's feed), and never
        a uuid that a token proved (a customer, not an anonymous visitor).
        """
        if not rules.keys:
            return ""
        if self.proof is None:
            return f"the new uuid was not proven by a token ({self.token_problem})"
        if was_proven:
            return "the previous uuid was proven by a token: a customer is never merged"
        return ""

    def identified(self, session: str, suppressed: bool = False) -> list[Command]:
        """Sessions: the connection now belongs to the new customer, in ``session``.

        ``suppressed``: the new customer was forgotten and suppressed (see
        :meth:`session_opened`).
        """
        if self.state != "identifying":
            return []
        self.suppressed = suppressed
        self._become(self._new_uuid, session)
        self.state = "open"
        return []

    def identify_failed(self, why: str) -> list[Command]:
        """Sessions: Redis could not move the connection: error unavailable, close 1013."""
        if self.state != "identifying":
            return []
        return self._end(ProtocolViolation("unavailable", f"identify failed: {why}", 1013))

    # -- who sends --------------------------------------------------------------------

    def _rules(self) -> SiteRules:
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
            bot=self._bot_flag,
            hosts=self._hosts,
        )
        return self.who

    # -- answers, in order ------------------------------------------------------------

    def _nack(self, seq: int, code: NackCode, wait_ms: int | None = None) -> bytes:
        self.nacked += 1
        if wait_ms is None:
            wait_ms = self.settings.retry_after_ms
        return self.codec.encode(Nack(seq=seq, code=code, retry_after_ms=wait_ms))

    def _answer_now(self, seq: int, code: NackCode, wait_ms: int | None = None) -> list[Command]:
        """Answer a frame that needs no store step, behind the answers still due."""
        reply = self._nack(seq, code, wait_ms)
        if self._queue:
            self._queue.append(_Answer(reply, code))
            return []
        return [Send(reply, code)]

    def _flush(self) -> list[Command]:
        """Every answer that is due, in frame order; then what waited for them."""
        queue = self._queue
        out: list[Command] = []
        while queue:
            entry = queue[0]
            reply = entry.reply
            if reply is None:
                break
            queue.pop(0)
            out.append(Send(reply, entry.nack))
        if not queue and self.state in ("identifying", "closing"):
            out += self._after_answers()
        return out

    def _after_answers(self) -> list[Command]:
        """What waited for every earlier frame to be answered: a switch, or the close."""
        if self.state == "identifying":
            if not self._switch_to:
                return []  # asked for already
            assert self.who is not None
            self._new_uuid, self._switch_to = self._switch_to, ""
            return [
                SwitchCustomer(
                    self.who.uuid,
                    self._new_uuid,
                    self.producer,
                    self.context,
                    self._refused,
                    self.start,
                )
            ]
        ending = self._ending
        assert ending is not None
        self.state = "closed"
        reason = close_reason(ending.detail)
        if ending.close_code == 1001:
            return [Close(1001, reason)]
        error = self.codec.encode(Error(code=ending.code, detail=ending.detail))
        return [Send(error), Close(ending.close_code, reason, ending.code, ending.detail)]

    def _end(self, why: ProtocolViolation) -> list[Command]:
        """Close for ``why`` once the frames received before it are answered."""
        if self.state in ("closing", "closed"):
            return []
        self.state = "closing"
        self._ending = why
        return self._flush()
