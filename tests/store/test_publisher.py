"""The publisher's lanes with several calls in flight (``publish_depth``), against a real Redis.

Producers stream events through :meth:`Store.submit` the way a connection
does (:class:`FrameOwner` decides what a resend may pass, the client resends
everything unacked from its lowest unacked seq), while Redis is broken under
them: the lane's connection killed with calls in flight (some run by Redis,
their replies lost; some never run), and the function library flushed with
calls in flight. Then the stream must hold every producer's events exactly
once and in seq order, and every event the producer was told is stored must be
there.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from collections.abc import Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from eventwire.core.config import Settings
from eventwire.core.frames import EVENT
from eventwire.core.ordering import FrameOwner
from eventwire.core.rules import SitesBook
from eventwire.store import Store, connect_redis
from eventwire.store.publisher import Frame
from tests.procs import RedisProcess

SITE = "shop"


class Answers:
    """A FrameSink that resolves each frame's future with how it ended."""

    def frame_stored(self, frame: Frame, added: int, duplicate: int) -> None:
        frame.token.set_result(("stored", added, duplicate))

    def frame_failed(self, frame: Frame, why: str) -> None:
        frame.token.set_result(("failed", 0, 0))

    def frame_gone(self, frame: Frame) -> None:
        frame.token.set_result(("gone", 0, 0))


class Producer:
    """One connection's producer: frames of 1-3 events, up to ``window`` in flight, resends."""

    def __init__(self, store: Store, name: str, events: int, window: int) -> None:
        self.store = store
        self.name = name
        self.events = events
        self.window = window
        self.owner = FrameOwner()
        self.acked_high = 0
        self.nacked = 0
        self.sink = Answers()
        keys = store.keys
        self.producer_key = keys.producer(SITE, name)
        self.session_key = keys.session(SITE, "u-" + name)

    def frame(self, first: int, last: int) -> tuple[Frame | None, asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        if not self.owner.admit(first):  # what the Connection does before submitting
            done.set_result(("failed", 0, 0))
            return None, done
        items: list[Any] = []
        for seq in range(first, last + 1):
            items += [seq, EVENT, json.dumps({"p": self.name, "seq": seq}).encode()]
        # Session "" is a server-made frame's: no session check, the seq step only.
        frame = self.store.submit(
            SITE,
            SITE,
            self.producer_key,
            self.session_key,
            "",
            items,
            self.sink,
            done,
            self.owner,
            first,
        )
        return frame, done

    async def run(self) -> None:
        """Stream: a new frame as soon as one is answered; after a nack, resend what is unacked."""
        rng = random.Random(self.name)
        seq = 1
        sent: deque[tuple[int, asyncio.Future[Any]]] = deque()
        while self.acked_high < self.events:
            while len(sent) < self.window and seq <= self.events:
                last = min(self.events, seq + rng.randrange(3))
                sent.append((last, self.frame(seq, last)[1]))
                seq = last + 1
            last, done = sent.popleft()
            outcome, _, _ = await done
            if outcome == "stored":
                # Frames are answered in order: an ack after a nack would
                # move the acked seq past events that must be resent.
                assert last > self.acked_high
                self.acked_high = last
                continue
            assert outcome == "failed"
            self.nacked += 1
            for _, later in sent:  # the frames behind it are answered too
                await later
            sent.clear()
            seq = self.acked_high + 1  # the client resends everything unacked, in order
            await asyncio.sleep(0)


async def run_beside(
    producers: list[Producer], background: Coroutine[Any, Any, None], stop: asyncio.Event
) -> None:
    """Run the producers to their end (60 s at most) with a background task, then stop it."""
    task = asyncio.create_task(background)
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(p.run() for p in producers))
    finally:
        stop.set()
        await task


def depth_store(redis_proc: RedisProcess, **settings: Any) -> Store:
    """A store of one lane with four calls in flight, no wait before a resend."""
    s = Settings(
        redis_url=redis_proc.url, publish_depth=4, publish_lanes=1, retry_after_ms=0, **settings
    )
    return Store(connect_redis(redis_proc.url, s), s, SitesBook(None, {}))


async def test_depth_keeps_order_and_exactly_once_through_kills(
    redis_proc: RedisProcess, redis: aioredis.Redis
) -> None:
    """Kills and a lost library with several calls in flight lose, double and reorder nothing."""
    store = depth_store(redis_proc, publish_batch_events=12, store_timeout=2.0)
    lane = store._lanes[0]
    breaks = {"kill": 0, "paused kill": 0, "flush": 0}
    modes = list(breaks)
    #: Each break and the calls in flight when it came.
    tries: list[tuple[str, int]] = []
    stop = asyncio.Event()

    def check_lane() -> int:
        """A producer is in at most one call in flight; returns how many calls fly."""
        producers = [key for call in lane.inflight for key in call.producers]
        assert len(producers) == len(set(producers))
        ready = sum(f.n for key in lane.ready for f in lane.pending[key])
        assert lane.ready_events == ready
        return len(lane.inflight)

    async def breaker() -> None:
        rng = random.Random(7)
        admin = aioredis.Redis.from_url(redis_proc.url)
        try:
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.005, 0.03))
                mode = modes[len(tries) % len(modes)]
                if mode == "kill":
                    # Some calls in flight have run (their replies are lost), some not.
                    in_flight = check_lane()
                    await admin.client_kill_filter(_type="normal", skipme=True)
                else:
                    # Hold the calls in Redis until several are in flight.
                    await admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")
                    for _ in range(50):
                        await asyncio.sleep(0.002)
                        if check_lane() >= 3:
                            break
                    in_flight = check_lane()
                    if mode == "flush":
                        await admin.function_flush()
                    else:
                        await admin.client_kill_filter(_type="normal", skipme=True)
                    await admin.execute_command("CLIENT", "UNPAUSE")
                tries.append((mode, in_flight))
                if in_flight >= (1 if mode == "kill" else 2):
                    breaks[mode] += 1
        finally:
            await admin.aclose()

    producers = [Producer(store, f"p{i}", 1000, 6) for i in range(8)]
    async with store:
        await run_beside(producers, breaker(), stop)
    reader = aioredis.Redis.from_url(redis_proc.url)  # the fixture's client was killed too
    try:
        entries = await reader.xrange(store.keys.events(SITE))
    finally:
        await reader.aclose()
    stored: dict[str, list[int]] = {p.name: [] for p in producers}
    for _, fields in entries:
        event = json.loads(fields[b"event"])
        stored[event["p"]].append(event["seq"])
    for p in producers:
        assert stored[p.name] == list(range(1, p.events + 1)), p.name
    assert sum(p.nacked for p in producers) > 0  # the breaks did fail frames
    # Each way, with calls in flight (held in Redis by a pause: several).
    assert min(breaks.values()) >= 2, tries


async def test_depth_keeps_order_when_a_full_backlog_drains_between_calls(
    redis_proc: RedisProcess, redis: aioredis.Redis
) -> None:
    """A frame refused for a full backlog is never passed by its producer's next one.

    A persist group drains the stream while frames come: a call refused
    for the full backlog can be followed at once by one that finds room.
    A producer's later frames are never in a call flying beside the refused
    one, so they never get stored before it is resent.
    """
    store = depth_store(redis_proc, publish_batch_events=6, max_backlog=20)
    events = store.keys.events(SITE)
    await redis.xgroup_create(events, "persist", id="$", mkstream=True)
    stop = asyncio.Event()

    async def drainer() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            got = await redis.xreadgroup("persist", "w", {events: ">"}, count=rng.randrange(1, 8))
            ids = [entry_id for _, entries in got for entry_id, _ in entries]
            if ids:
                await redis.xack(events, "persist", *ids)
            await asyncio.sleep(rng.uniform(0, 0.002))

    producers = [Producer(store, f"p{i}", 300, 4) for i in range(8)]
    async with store:
        await run_beside(producers, drainer(), stop)
    stored: dict[str, list[int]] = {p.name: [] for p in producers}
    for _, fields in await redis.xrange(events):
        event = json.loads(fields[b"event"])
        stored[event["p"]].append(event["seq"])
    for p in producers:
        assert stored[p.name] == list(range(1, p.events + 1)), p.name
    assert sum(p.nacked for p in producers) > 0  # the backlog was full at times


async def test_close_answers_frames_whose_call_waits_for_the_library(
    redis_proc: RedisProcess, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing while a call's reply asks for the library: the lane loads it and settles first."""
    settings = Settings(redis_url=redis_proc.url, publish_depth=4)
    store = Store(connect_redis(redis_proc.url, settings), settings, SitesBook(None, {}))
    reloading, go_on = asyncio.Event(), asyncio.Event()
    reload = store._reload_missing

    async def slow_reload(commands: Any, results: list[Any]) -> None:
        if any(isinstance(r, Exception) for r in results):
            reloading.set()
            await go_on.wait()  # a slow FUNCTION LOAD, while the store closes
        await reload(commands, results)

    monkeypatch.setattr(store, "_reload_missing", slow_reload)
    producers = [Producer(store, f"p{i}", 3, 1) for i in range(4)]
    await store.__aenter__()
    await redis.function_flush()  # the first call finds no function: loaded, sent again
    answers = [p.frame(1, 3)[1] for p in producers]
    await reloading.wait()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.05)
    go_on.set()
    await closing
    assert [a.result() for a in answers] == [("stored", 3, 0)] * len(producers)
    assert await redis.xlen(store.keys.events(SITE)) == 3 * len(producers)


async def test_a_call_that_cannot_be_packed_is_nacked_and_the_lane_lives_on(
    redis_proc: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault while packing a call (a bug): its frames are nacked, the error is logged, and
    the next frames are stored as usual (the lane task must not die with frames unanswered)."""
    async with depth_store(redis_proc) as store:
        real_pack = store._pack_batch
        faults = iter([RuntimeError("injected")])

        def pack_once_faulty(by_tag: Any) -> Any:  # fault injection
            fault = next(faults, None)
            if fault is not None:
                raise fault
            return real_pack(by_tag)

        monkeypatch.setattr(store, "_pack_batch", pack_once_faulty)
        producer = Producer(store, "p-pack", events=1, window=1)
        with structlog.testing.capture_logs() as logs:
            _, first = producer.frame(1, 1)
            async with asyncio.timeout(5):
                assert (await first)[0] == "failed"
                _, again = producer.frame(1, 1)  # the client's resend
                assert await again == ("stored", 1, 0)
        (line,) = [e for e in logs if e["event"] == "publish_pack_failed"]
        assert (line["log_level"], line["frames"]) == ("error", 1)
        assert not [e for e in logs if e["event"] == "publisher_lane_failed"]
