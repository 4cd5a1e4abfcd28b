"""eventwire/client/delivery.py: the client's delivery state, synchronously.

No server, no Redis, no event loop: frames go in and out as bytes, answers are
the protocol's Structs, time is a number passed in. Every server answer the
client handles is here; the last test runs the state against a model of the
server's ordering rule (core/ordering.FrameOwner) through nacks and lost
connections and checks that every event is stored once, in order.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest

from eventwire.client import BufferFull, ClientClosed, ClientOptions, Delivery
from eventwire.client.delivery import Backoff, close_repeats, status_repeats
from eventwire.core.ordering import FrameOwner
from eventwire.core.protocol import (
    JSON_CODEC,
    MSGPACK_CODEC,
    Ack,
    Error,
    Nack,
    NackCode,
    Rejection,
    Track,
    Welcome,
    WireEvent,
)

URL = "ws://127.0.0.1:9/v1/track/app"
NOW_MS = 1_764_160_000_123

#: Reject codes of docs/protocol.md section 3; every one is final.
REJECT_CODES = (
    "invalid",
    "invalid_action",
    "missing_param",
    "too_large",
    "too_old",
    "denied",
    "unauthorized",
)


def delivery(**options: Any) -> Delivery:
    """A delivery state with a fixed wall clock; options as ClientOptions takes them."""
    return Delivery(ClientOptions(url=URL, **options), wall_ms=lambda: NOW_MS)


def welcome(acked: int = 0, max_batch: int = 500, resumed: bool = False) -> Welcome:
    """A welcome as the server sends it."""
    return Welcome(
        session="s-1", resumed=resumed, acked=acked, server_time=NOW_MS, max_batch=max_batch
    )


def events_of(frame: bytes | float | None) -> list[WireEvent]:
    """The events of one track frame next_frame returned."""
    assert isinstance(frame, bytes), f"expected a frame, got {frame!r}"
    msg = JSON_CODEC.decode(frame)
    assert isinstance(msg, Track)
    return msg.events


def seqs_of(frame: bytes | float | None) -> list[int]:
    """The seqs of one track frame."""
    return [e.seq for e in events_of(frame)]


def send_all(state: Delivery, now: float = 0.0, hurry: bool = True) -> list[list[int]]:
    """Every frame the state sends now, as lists of seqs."""
    frames = []
    while isinstance(step := state.next_frame(now, hurry), bytes):
        frames.append(seqs_of(step))
    return frames


def ack_for(seqs: list[int], duplicate: int = 0, rejected: list[Rejection] | None = None) -> Ack:
    """The ack of a frame holding ``seqs``."""
    rejected = rejected or []
    return Ack(
        seq=seqs[-1],
        accepted=len(seqs) - duplicate - len(rejected),
        duplicate=duplicate,
        rejected=rejected,
    )


def track(state: Delivery, n: int) -> list[int]:
    """Track n valid events."""
    return [state.track("item.view", {"i": i}) for i in range(n)]


# -- numbering and buffering ------------------------------------------------------


def test_events_are_numbered_from_one_and_stamped() -> None:
    """Seqs are 1, 2, 3...; an event without a time gets the wall clock, params are copied."""
    state = delivery()
    params = {"url": "/a"}
    assert state.track("page.visit", params, "Home") == 1
    params["url"] = "/changed"
    assert state.track("page.visit", time=5) == 2
    assert (state.seq, state.held, state.oldest_unacked()) == (2, 2, 1)
    state.on_welcome(welcome())
    first, second = events_of(state.next_frame(0.0))
    assert (first.seq, first.label, first.time, first.params) == (1, "Home", NOW_MS, {"url": "/a"})
    assert (second.seq, second.time, second.params) == (2, 5, None)


def test_buffer_full_refuses_without_using_a_seq() -> None:
    """At max_buffer held events track raises BufferFull; an ack makes room again."""
    state = delivery(max_buffer=3, batch_size=2)
    assert track(state, 3) == [1, 2, 3]
    with pytest.raises(BufferFull):
        state.track("item.view")
    assert (state.seq, state.held) == (3, 3)
    state.on_welcome(welcome())
    frames = send_all(state)
    assert frames == [[1, 2], [3]]
    with pytest.raises(BufferFull):
        state.track("item.view")
    state.on_ack(ack_for(frames[0]), 0.0)
    assert state.track("item.view") == 4
    assert state.held == 2


def test_events_that_cannot_travel_are_refused_at_track() -> None:
    """Unencodable params, an event larger than a frame, a closed state: refused, no seq used."""
    state = delivery(max_frame_bytes=1024)
    with pytest.raises(TypeError):
        state.track("item.view", {"x": object()})
    with pytest.raises(ValueError, match="max_frame_bytes"):
        state.track("item.view", {"blob": "x" * 1024})
    packed = Delivery(ClientOptions(url=URL, encoding="msgpack"))
    with pytest.raises(ValueError, match="cannot be encoded"):
        packed.track("item.view", {"n": 2**64})
    assert (state.seq, state.held, packed.seq) == (0, 0, 0)
    state.close()
    with pytest.raises(ClientClosed):
        state.track("item.view")


# -- batching and the in-flight window ---------------------------------------------


def test_nothing_is_sent_before_a_welcome_or_after_a_loss() -> None:
    """next_frame says wait (None) until a welcome, and again once the connection is lost."""
    state = delivery()
    track(state, 3)
    assert state.next_frame(0.0, hurry=True) is None
    state.on_welcome(welcome())
    state.connection_lost()
    assert state.next_frame(0.0, hurry=True) is None


@pytest.mark.parametrize(
    ("batch_size", "max_batch", "sizes"), [(4, 500, [4, 4, 2]), (100, 3, [3, 3, 3, 1])]
)
def test_frames_hold_at_most_the_smaller_batch_limit(
    batch_size: int, max_batch: int, sizes: list[int]
) -> None:
    """A frame holds at most min(batch_size, welcome.max_batch) events, in seq order."""
    state = delivery(batch_size=batch_size, max_inflight=100)
    track(state, 10)
    state.on_welcome(welcome(max_batch=max_batch))
    frames = send_all(state)
    assert [len(f) for f in frames] == sizes
    assert [s for f in frames for s in f] == list(range(1, 11))


@pytest.mark.parametrize("codec", [JSON_CODEC, MSGPACK_CODEC], ids=["json", "msgpack"])
def test_a_batch_over_max_frame_bytes_is_split(codec: Any) -> None:
    """Frames stay within max_frame_bytes and still carry every event in order."""
    state = delivery(
        max_frame_bytes=4096, max_inflight=100, encoding="msgpack" if codec.binary else "json"
    )
    for i in range(40):
        state.track("item.view", {"i": i, "blob": "x" * 300})
    state.on_welcome(welcome())
    seqs = []
    while isinstance(frame := state.next_frame(0.0, True), bytes):
        assert len(frame) <= 4096
        msg = codec.decode(frame)
        assert isinstance(msg, Track)
        seqs.extend(e.seq for e in msg.events)
    assert seqs == list(range(1, 41))
    assert state.held == 40


def test_at_most_max_inflight_frames_are_unanswered() -> None:
    """With max_inflight frames unanswered nothing more goes; each ack lets one more go."""
    state = delivery(batch_size=2, max_inflight=3)
    track(state, 10)
    state.on_welcome(welcome())
    assert send_all(state) == [[1, 2], [3, 4], [5, 6]]
    assert state.next_frame(0.0, hurry=True) is None
    state.on_ack(ack_for([1, 2]), 0.0)
    assert send_all(state) == [[7, 8]]
    state.on_ack(ack_for([3, 4]), 0.0)
    state.on_ack(ack_for([5, 6]), 0.0)
    assert send_all(state) == [[9, 10]]


def test_partial_frames_linger_unless_hurried() -> None:
    """A partial frame waits out the linger after the last partial one; full or hurried ones go."""
    state = delivery(batch_size=3, linger=0.5, max_inflight=100)
    state.on_welcome(welcome())
    state.track("item.view")
    assert seqs_of(state.next_frame(10.0)) == [1]
    state.track("item.view")
    assert state.next_frame(10.2) == pytest.approx(0.3)
    assert seqs_of(state.next_frame(10.2, hurry=True)) == [2]
    track(state, 4)
    assert seqs_of(state.next_frame(10.3)) == [3, 4, 5]
    # The hurried frame at 10.2 was partial too: the linger counts from it.
    assert state.next_frame(10.3) == pytest.approx(0.4)
    assert seqs_of(state.next_frame(10.7)) == [6]
    assert state.next_frame(10.7) is None


# -- ack -------------------------------------------------------------------------


def test_ack_answers_the_oldest_frame() -> None:
    """An ack counts accepted and duplicate, frees its events and reports its latency."""
    state = delivery(batch_size=3)
    track(state, 6)
    state.on_welcome(welcome())
    assert [seqs_of(state.next_frame(1.0, True)), seqs_of(state.next_frame(1.5, True))] == [
        [1, 2, 3],
        [4, 5, 6],
    ]
    assert state.on_ack(ack_for([1, 2, 3], duplicate=1), 1.25) == pytest.approx(0.25)
    assert (state.accepted, state.duplicate, state.held, state.oldest_unacked()) == (2, 1, 3, 4)
    assert state.on_ack(ack_for([4, 5, 6]), 2.0) == pytest.approx(0.5)
    assert (state.accepted, state.held, state.oldest_unacked()) == (5, 0, 7)


def test_an_answer_with_nothing_in_flight_is_ignored() -> None:
    """An ack or nack with no frame in flight changes nothing."""
    state = delivery()
    track(state, 2)
    state.on_welcome(welcome())
    assert state.on_ack(Ack(seq=2, accepted=2, duplicate=0), 0.0) is None
    state.on_nack(Nack(seq=2, code="unavailable", retry_after_ms=100), 0.0)
    assert (state.accepted, state.nacks, state.held) == (0, 0, 2)
    assert send_all(state) == [[1, 2]]


@pytest.mark.parametrize("code", REJECT_CODES)
def test_a_rejected_event_is_final(code: str) -> None:
    """A rejection of any code is reported and never resent, even after a reconnect."""
    state = delivery()
    track(state, 3)
    state.on_welcome(welcome())
    [frame] = send_all(state)
    rejection = Rejection(seq=2, code=code, detail="no")
    state.on_ack(ack_for(frame, rejected=[rejection]), 0.0)
    assert state.rejections == [rejection]
    assert (state.accepted, state.held, state.oldest_unacked()) == (2, 0, 4)
    state.connection_lost()
    state.on_welcome(welcome(acked=1))
    assert send_all(state) == []


# -- nack ------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["unavailable", "rate_limited"])
def test_nack_holds_everything_until_all_frames_are_answered(code: NackCode) -> None:
    """After a nack nothing new goes; once all frames are answered, all nacked events go
    again after the longest retry_after_ms, in seq order with their seqs."""
    state = delivery(batch_size=2, max_inflight=3)
    track(state, 8)
    state.on_welcome(welcome())
    assert send_all(state, now=1.0) == [[1, 2], [3, 4], [5, 6]]
    state.on_ack(ack_for([1, 2]), 1.0)
    state.on_nack(Nack(seq=4, code=code, retry_after_ms=200), 1.1)
    # The frame behind is still unanswered: sending [7, 8] now would pass seq 3.
    assert state.next_frame(1.1, hurry=True) is None
    state.on_nack(Nack(seq=6, code=code, retry_after_ms=500), 1.2)
    assert state.nacks == 2
    assert (state.held, state.oldest_unacked()) == (6, 3)
    assert state.next_frame(1.3, hurry=True) == pytest.approx(0.4)
    assert send_all(state, now=1.7) == [[3, 4], [5, 6], [7, 8]]
    # The resend's first seq is the failed frame's: the server's FrameOwner lets it in.
    owner = FrameOwner()
    owner.fail(owner.epoch, 3, code)
    assert not owner.admit(5)
    assert owner.admit(3)


def test_an_ack_after_a_nack_still_waits_for_the_resend() -> None:
    """A frame acked after an earlier one was nacked counts; the nacked one still goes first."""
    state = delivery(batch_size=2, max_inflight=3)
    track(state, 6)
    state.on_welcome(welcome())
    send_all(state)
    state.on_nack(Nack(seq=2, code="unavailable", retry_after_ms=0), 0.0)
    state.on_ack(ack_for([3, 4], duplicate=2), 0.0)
    assert state.next_frame(0.0, hurry=True) is None
    state.on_nack(Nack(seq=6, code="unavailable", retry_after_ms=0), 0.0)
    assert send_all(state) == [[1, 2], [5, 6]]
    assert state.duplicate == 2


# -- welcome, error and reconnect ---------------------------------------------------


def test_reconnect_resends_in_seq_order_with_the_original_seqs() -> None:
    """Nacked, in-flight and unsent events all go again after a loss, in seq order."""
    state = delivery(batch_size=2, max_inflight=2)
    track(state, 9)
    state.on_welcome(welcome())
    send_all(state)
    state.on_nack(Nack(seq=2, code="unavailable", retry_after_ms=10_000), 0.0)
    state.connection_lost()
    assert state.held == 9
    state.on_welcome(welcome(acked=0, resumed=True))
    assert state.welcome is not None
    assert state.welcome.resumed
    # A new connection forgets the old one's retry delay.
    frames = send_all(state)
    assert frames == [[1, 2], [3, 4]]
    state.on_ack(ack_for(frames[0]), 0.0)
    state.on_ack(ack_for(frames[1]), 0.0)
    assert send_all(state) == [[5, 6], [7, 8]]
    assert state.connects == 2


def test_welcome_acked_drops_what_is_stored_and_resends_the_rest() -> None:
    """Events at or below welcome.acked are dropped as skipped; the rest go from acked + 1."""
    state = delivery(batch_size=4)
    track(state, 10)
    state.on_welcome(welcome())
    send_all(state)
    state.connection_lost()
    state.on_welcome(welcome(acked=6))
    assert (state.skipped, state.held, state.oldest_unacked()) == (6, 4, 7)
    events = events_of(state.next_frame(0.0, hurry=True))
    assert [(e.seq, e.params) for e in events] == [(s, {"i": s - 1}) for s in range(7, 11)]
    assert state.next_frame(0.0, hurry=True) is None


def test_welcome_acked_covering_everything_answers_all() -> None:
    """When welcome.acked covers every held event there is nothing left to send."""
    state = delivery()
    track(state, 5)
    state.on_welcome(welcome(acked=9))
    assert (state.skipped, state.held, state.oldest_unacked()) == (5, 0, 6)
    assert state.next_frame(0.0, hurry=True) is None


def test_an_error_is_recorded_and_nothing_held_is_lost() -> None:
    """An error before the close is kept in closed_error; its events go again after reconnect."""
    state = delivery()
    track(state, 3)
    state.on_welcome(welcome())
    send_all(state)
    state.on_error(Error(code="bad_frame", detail="frame too large"))
    state.connection_lost()
    assert state.closed_error == Error(code="bad_frame", detail="frame too large")
    assert state.held == 3
    state.on_welcome(welcome())
    assert send_all(state) == [[1, 2, 3]]


# -- reconnect policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "repeats"),
    [
        (None, False),
        (1000, False),
        (1001, False),
        (1006, False),
        (1011, False),
        (1013, False),
        (1007, True),
        (1008, True),
        (1009, True),
    ],
)
def test_close_codes_that_a_reconnect_meets_again(code: int | None, repeats: bool) -> None:
    """Policy closes (1007, 1008, 1009) repeat; shutdown, errors, overload are passing."""
    assert close_repeats(code) is repeats


def test_refused_handshakes_that_repeat() -> None:
    """403 (origin) and 404 (unknown site) repeat; other statuses are passing."""
    assert [status_repeats(s) for s in (403, 404, 400, 429, 500, 502, 503)] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]


def test_backoff_doubles_and_a_welcome_resets_it() -> None:
    """Failed attempts double the bound up to the cap; a welcome brings it back to base."""
    backoff = Backoff(0.1, 1.0)
    assert [backoff.after(False, False) for _ in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert backoff.after(True, False) == pytest.approx(0.1)
    assert backoff.after(False, False) == pytest.approx(0.2)


def test_backoff_keeps_growing_through_repeating_closes() -> None:
    """The client always retries, but welcomes followed by policy closes do not reset the bound."""
    backoff = Backoff(0.1, 10.0)
    assert [backoff.after(True, True) for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert backoff.after(True, False) == pytest.approx(0.1)
    assert backoff.after(True, True) == pytest.approx(0.1)
    assert [backoff.after(False, True) for _ in range(2)] == pytest.approx([0.2, 0.4])
    # Thousands of failures in a row must not overflow the exponent.
    patient = Backoff(0.01, 5.0)
    assert [patient.after(False, False) for _ in range(2000)][-1] == 5.0


# -- against the server's ordering rule ---------------------------------------------


class ModelServer:
    """One producer's side of the server, synchronous: FrameOwner admission, a store
    that may fail, answers in frame order, and a stream that de-duplicates by seq."""

    def __init__(self) -> None:
        self.stream: list[int] = []
        self.stored = 0
        self.connect()

    def connect(self) -> Welcome:
        """A new connection: a fresh FrameOwner and a welcome with the stored seq."""
        self.owner = FrameOwner()
        # Entries in frame order: [epoch, events, answer or None].
        self.answers: deque[list[Any]] = deque()
        return welcome(acked=self.stored, max_batch=7)

    def receive(self, frame: bytes, rng: random.Random) -> None:
        """A track frame arrives: admit it, nack it at once, or rate-limit it."""
        events = [e.seq for e in events_of(frame)]
        low, high = events[0], events[-1]
        if not self.owner.admit(low):
            self.answers.append([0, events, Nack(seq=high, code=self.owner.code, retry_after_ms=5)])
        elif rng.random() < 0.05:
            self.owner.epoch += 1
            self.owner.fail(self.owner.epoch, low, "rate_limited")
            self.answers.append([0, events, Nack(seq=high, code="rate_limited", retry_after_ms=20)])
        else:
            self.answers.append([self.owner.epoch, events, None])

    def store_next(self, rng: random.Random, fail: float = 0.1) -> None:
        """The oldest admitted frame is stored, or fails (poisoning its epoch)."""
        for entry in self.answers:
            if entry[2] is not None:
                continue
            epoch, events, _ = entry
            if epoch <= self.owner.failed_epoch:
                entry[2] = Nack(seq=events[-1], code=self.owner.code, retry_after_ms=5)
            elif rng.random() < fail:
                self.owner.fail(epoch, events[0])
                entry[2] = Nack(seq=events[-1], code="unavailable", retry_after_ms=10)
            else:
                new = [s for s in events if s > self.stored]
                self.stream.extend(new)
                self.stored = max(self.stored, events[-1])
                entry[2] = Ack(seq=events[-1], accepted=len(new), duplicate=len(events) - len(new))
            return

    def answer(self) -> Ack | Nack | None:
        """The next answer in frame order, if it is ready."""
        if self.answers and self.answers[0][2] is not None:
            answer: Ack | Nack = self.answers.popleft()[2]
            return answer
        return None

    def disconnect(self, rng: random.Random) -> None:
        """The connection drops; stores already under way may still complete."""
        while rng.random() < 0.5 and any(e[2] is None for e in self.answers):
            self.store_next(rng, fail=0.0)
        self.answers.clear()


@pytest.mark.parametrize("seed", range(8))
def test_every_event_is_stored_once_in_order_through_failures(seed: int) -> None:
    """Through FrameOwner nacks, rate limits and lost connections each event is stored once."""
    rng = random.Random(seed)
    state = delivery(batch_size=5, max_inflight=4, max_buffer=10_000, linger=0.01)
    server = ModelServer()
    state.on_welcome(server.connect())
    now = 0.0
    total = 1500
    connected = True
    for _ in range(200_000):
        if state.seq == total and state.oldest_unacked() > total:
            break
        roll = rng.random()
        now += 0.001
        if roll < 0.25 and state.seq < total:
            track(state, rng.randint(1, 9) if state.seq + 9 <= total else total - state.seq)
        elif roll < 0.5 and connected:
            step = state.next_frame(now, hurry=rng.random() < 0.3)
            if isinstance(step, bytes):
                server.receive(step, rng)
            elif isinstance(step, float):
                now += step
        elif roll < 0.7 and connected:
            server.store_next(rng)
        elif roll < 0.95 and connected:
            answer = server.answer()
            if isinstance(answer, Ack):
                state.on_ack(answer, now)
            elif isinstance(answer, Nack):
                state.on_nack(answer, now)
        elif roll < 0.97:
            if connected:
                server.disconnect(rng)
                state.connection_lost()
                connected = False
            else:
                state.on_welcome(server.connect())
                connected = True
        elif not connected:
            state.on_welcome(server.connect())
            connected = True
    assert state.seq == total
    assert state.held == 0
    assert server.stream == list(range(1, total + 1))
    assert state.accepted + state.duplicate + state.skipped == total
    assert state.nacks > 0
    assert state.connects > 1
    assert state.rejections == []
