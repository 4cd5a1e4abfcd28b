"""server/live.py: the live relay on the admin listener, against a real server and Redis."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server import live
from server.client import EventwireClient
from server.gateway import EventwireServer
from server.live import Entry, Filter, Viewer, parse_query
from server.store import StreamEntry
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisProcess

EVENTS = "ew:{shop}:events"


class LiveViewer:
    """One raw viewer of /v1/live: every message decoded, kept in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []

    async def recv(self, wait: float = 5) -> dict[str, Any]:
        """The next message."""
        data = await asyncio.wait_for(self.ws.recv(), wait * UNIT)
        assert isinstance(data, str), "the relay sends text frames"
        msg: dict[str, Any] = json.loads(data)
        self.messages.append(msg)
        return msg

    async def until(self, done: Callable[[dict[str, Any]], bool], wait: float = 5) -> None:
        """Read until a message satisfies ``done``."""
        while not done(await self.recv(wait)):
            pass

    async def entries(self, n: int, wait: float = 5) -> None:
        """Read until ``n`` event or rejected messages have come in all."""
        while len(self.ids()) < n:
            await self.recv(wait)

    def ids(self) -> list[str]:
        """The stream ids of the event and rejected messages so far."""
        return [m["id"] for m in self.messages if m["type"] in ("event", "rejected")]

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The messages of one type."""
        return [m for m in self.messages if m["type"] == kind]


@asynccontextmanager
async def viewer(server: EventwireServer, query: str, **options: Any) -> AsyncIterator[LiveViewer]:
    """A viewer of ``/v1/live?query``; waits for its hello."""
    url = server.admin_url.replace("http://", "ws://") + "/v1/live?" + query
    async with connect(url, open_timeout=5 * UNIT, proxy=None, **options) as ws:
        v = LiveViewer(ws)
        assert (await v.recv())["type"] == "hello"
        yield v


async def stream_ids(redis: aioredis.Redis, key: str = EVENTS) -> list[str]:
    """Every id of a stream, oldest first."""
    return [i.decode() for i, _ in await redis.xrange(key)]


async def send(server: EventwireServer, n: int, uuid: str = "u-1", **params: Any) -> None:
    """Send ``n`` product.view events as one customer with the Python client; wait for the acks."""
    async with EventwireClient(f"{server.url}/v1/track/shop", uuid=uuid) as client:
        for i in range(n):
            client.track("product.view", {"sku": f"S{i}", **params})
        await client.flush(10 * UNIT)


async def eventually(check: Callable[[], bool], wait: float = 5) -> None:
    """Wait until ``check()`` is true."""
    async with asyncio.timeout(wait * UNIT):
        while not check():  # noqa: ASYNC110 - the server's state, not ours
            await asyncio.sleep(0.01)


# ---- sans-I/O parts ------------------------------------------------------------


def _entry(i: int, action: str = "page.visit", uuid: str | None = "u-1") -> Entry:
    return Entry(f"{1000 + i}-0", action, uuid, f"frame-{i}".encode())


def test_viewer_queue_is_bounded_and_reports_the_gap() -> None:
    """A full queue drops events and counts them; one lagged notice marks the gap in order."""
    v = Viewer(Filter(None, None), limit=3)
    v.push([_entry(i) for i in range(5)])
    assert list(v.queue) == [b"frame-0", b"frame-1", b"frame-2"]
    assert (v.missed, v.gap_first, v.gap_last) == (2, "1003-0", "1004-0")
    assert v.take(2) == [b"frame-0", b"frame-1"]
    v.push([_entry(5)])
    # The notice sits where the gap was: after what was queued, before what came next.
    taken = v.take(10)
    assert taken[0] == b"frame-2"
    assert json.loads(taken[1]) == {
        "type": "lagged",
        "missed": 2,
        "first": "1003-0",
        "id": "1004-0",
    }
    assert taken[2:] == [b"frame-5"]
    assert v.peak == 3
    assert v.missed_total == 2


def test_viewer_notice_when_drained() -> None:
    """A viewer that drains its queue after a gap hears of it at once, not at the next event."""
    v = Viewer(Filter(None, None), limit=1)
    v.push([_entry(0), _entry(1)])
    assert v.take(10)[1:] == [b'{"type":"lagged","missed":1,"first":"1001-0","id":"1001-0"}']
    assert v.take(10) == []


def test_notice_after_a_gap_comes_after_its_lagged() -> None:
    """A notice queued after events were dropped follows the lagged notice of that gap."""
    v = Viewer(Filter(None, None), limit=2)
    v.push([_entry(0), _entry(1), _entry(2)])
    assert v.take(1) == [b"frame-0"]
    v.notice(b"trimmed")
    assert v.take(10)[1:] == [
        b'{"type":"lagged","missed":1,"first":"1002-0","id":"1002-0"}',
        b"trimmed",
    ]


def test_filters_and_floor() -> None:
    """Glob matched in full, exact uuid; entries at or below the handover floor are dropped."""
    v = Viewer(Filter("product.*", "u-2"), limit=10)
    v.floor = (1001, 0)
    v.push(
        [
            _entry(1, "product.view", "u-2"),  # at the floor
            _entry(2, "product.view", "u-2"),
            _entry(3, "product.view", "u-1"),
            _entry(4, "page.visit", "u-2"),
            _entry(5, "product.view.x", "u-2"),
            _entry(6, "xproduct.view", "u-2"),
        ]
    )
    assert list(v.queue) == [b"frame-2", b"frame-5"]


def test_decode_entries_skips_foreign_records() -> None:
    """Entries without an event field or without a JSON object in it are not relayed."""
    good = b'{"action":"a.b","uuid":"u","params":{"x":[1,2]}}'
    out = live.decode_entries(
        [StreamEntry("1-0", good), StreamEntry("2-0", None), StreamEntry("3-0", b"[1")],
        "events",
    )
    assert [e.id for e in out] == ["1-0"]
    assert json.loads(out[0].frame) == {"type": "event", "id": "1-0", "event": json.loads(good)}


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 400),
        ("site=nope", 404),
        ("site=shop&stream=dead", 400),
        ("site=shop&since=yesterday", 400),
        ("site=shop&since=99999999999999999999999-0", 400),
        ("site=shop&uuid=a%20b", 400),
        ("site=shop&action=a%20b", 400),
        ("site=shop&stream=rejected&action=a.*", 400),
        ("site=shop&site=app", 400),
        ("site=shop&token=x", 400),
        ("site", 400),
    ],
)
def test_bad_queries_refused(query: str, status: int) -> None:
    """Every malformed query gets a status and a sentence saying what is wrong."""
    answer = parse_query(query, lambda s: s in ("shop", "app"))
    assert isinstance(answer, tuple)
    assert answer[0] == status
    assert answer[1]


# ---- the relay -------------------------------------------------------------------


async def test_events_arrive_live_in_stream_order(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """A viewer without since gets every new event, with its stream id, in stream order."""
    async with viewer(server, "site=shop") as v:
        await v.until(lambda m: m["type"] == "ready")
        await send(server, 5)
        await v.entries(6)  # session.start and five events
    assert v.ids() == await stream_ids(redis)
    kinds = [m["event"]["action"] for m in v.of("event")]
    assert kinds == ["session.start"] + ["product.view"] * 5
    hello = v.messages[0]
    assert hello["site"] == "shop"
    assert hello["stream"] == "events"
    assert hello["queue"] == server.settings.live_queue
    assert not v.of("trimmed")
    assert not v.of("lagged")


async def test_filters_by_action_and_customer(server: EventwireServer) -> None:
    """action globs and uuid narrow what a viewer gets; other viewers are not affected."""
    async with (
        viewer(server, "site=shop&action=product.*&uuid=u-2") as narrow,
        viewer(server, "site=shop") as wide,
    ):
        await narrow.until(lambda m: m["type"] == "ready")
        await wide.until(lambda m: m["type"] == "ready")
        await send(server, 3, uuid="u-1")
        await send(server, 2, uuid="u-2")
        await wide.entries(7)
        await narrow.entries(2)
        await asyncio.sleep(0.1)
    got = [(m["event"]["uuid"], m["event"]["action"]) for m in narrow.of("event")]
    assert got == [("u-2", "product.view")] * 2


async def test_rejected_stream_carries_reasons(server: EventwireServer) -> None:
    """stream=rejected relays rejected events with their code and detail."""
    async with viewer(server, "site=shop&stream=rejected") as v:
        await v.until(lambda m: m["type"] == "ready")
        async with EventwireClient(f"{server.url}/v1/track/shop", uuid="u-9") as client:
            client.track("nodots")
            client.track("page.visit", {})
            await client.flush(5 * UNIT)
        await v.entries(2)
    codes = [(m["type"], m["event"]["code"], m["event"]["uuid"]) for m in v.of("rejected")]
    assert codes == [("rejected", "invalid_action", "u-9"), ("rejected", "missing_param", "u-9")]
    assert "url" in v.of("rejected")[1]["event"]["detail"]


async def test_since_replays_backlog_then_live(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """since=0 replays the stream in pages, says ready, then goes live: no gap, no duplicate."""
    server = await make_server(live_batch=3, live_queue=50)
    await send(server, 10)
    async with viewer(server, "site=shop&since=0") as v:
        await v.until(lambda m: m["type"] == "ready")
        assert v.ids() == await stream_ids(redis)
        await send(server, 4, uuid="u-2")
        await v.entries(len(await stream_ids(redis)))
        await asyncio.sleep(0.1)
    assert v.ids() == await stream_ids(redis)
    assert v.messages[0]["id"] == "0-0"
    ready = v.of("ready")[0]
    assert ready["id"] == v.ids()[10]  # the last id of the backlog: session.start + 10


async def test_resume_after_an_id(server: EventwireServer, redis: aioredis.Redis) -> None:
    """A viewer passing the last id it saw gets exactly what came after it."""
    await send(server, 6)
    ids = await stream_ids(redis)
    async with viewer(server, f"site=shop&since={ids[3]}") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert v.ids() == ids[4:]


async def test_since_duration_on_redis_clock(
    server: EventwireServer, redis: aioredis.Redis
) -> None:
    """since=5m starts five minutes back on Redis' clock, the clock of the ids."""
    old = f"{(await redis.time())[0] * 1000 - 400_000}-0"
    await redis.xadd(EVENTS, {"event": b'{"action":"old.one","uuid":"u"}'}, id=old)
    await send(server, 2)
    async with viewer(server, "site=shop&since=5m") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert v.ids() == (await stream_ids(redis))[1:]
    hello = v.messages[0]
    (seconds, _micros) = await redis.time()
    assert abs(hello["now"] - seconds * 1000) < 5000


async def test_handover_under_traffic(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """Viewers joining a running reader while events flow see the stream exactly."""
    server = await make_server(live_batch=5, live_queue=1000)
    async with viewer(server, "site=shop") as first:
        await first.until(lambda m: m["type"] == "ready")
        sender = asyncio.create_task(send(server, 300))
        late: list[LiveViewer] = []
        async with (
            viewer(server, "site=shop&since=0") as a,
            viewer(server, "site=shop&since=0") as b,
        ):
            late += [a, b]
            await sender
            total = len(await stream_ids(redis))
            for v in (first, a, b):
                await v.entries(total, wait=10)
            await asyncio.sleep(0.1)
    expected = await stream_ids(redis)
    for v in (first, *late):
        assert v.ids() == expected
        assert not v.of("lagged")


async def test_handover_reader_ahead(
    server: EventwireServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries the reader handed out before a viewer joined are replayed to it, once."""
    async with viewer(server, "site=shop") as first:
        await first.until(lambda m: m["type"] == "ready")
        await send(server, 2)
        await first.entries(3)
        real = live.read_page
        relay = server.admin_routes.relay
        added_once: list[bool] = []

        async def page_then_more(client: Any, *args: Any) -> Any:
            out = await real(client, *args)
            if client is server.store.redis and args[-1] == "+" and not added_once:
                added_once.append(True)
                # After the viewer's last backlog page and before it joins,
                # the reader hands out new entries.
                added = (await redis.xadd(EVENTS, {"event": b'{"action":"x.y"}'})).decode()
                await eventually(lambda: next(iter(relay._readers.values())).position == added)
            return out

        monkeypatch.setattr(live, "read_page", page_then_more)
        async with viewer(server, "site=shop&since=0") as late:
            await late.until(lambda m: m["type"] == "ready")
            monkeypatch.setattr(live, "read_page", real)
            await send(server, 1)
            await late.entries(len(await stream_ids(redis)))
            await asyncio.sleep(0.1)
    assert late.ids() == await stream_ids(redis)


async def test_handover_reader_behind(
    server: EventwireServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries a slow reader hands out after a viewer replayed them are not sent twice."""
    gate = asyncio.Event()
    real = live.read_new

    async def held(*args: Any, **kwargs: Any) -> Any:
        out = await real(*args, **kwargs)
        if out:
            await gate.wait()
        return out

    monkeypatch.setattr(live, "read_new", held)
    async with viewer(server, "site=shop") as first:
        await first.until(lambda m: m["type"] == "ready")
        await send(server, 3)  # the reader has read these but holds them
        async with viewer(server, "site=shop&since=0") as late:
            await late.until(lambda m: m["type"] == "ready")
            assert late.ids() == await stream_ids(redis)
            gate.set()
            await send(server, 1)
            await first.entries(len(await stream_ids(redis)))
            await late.entries(len(await stream_ids(redis)))
            await asyncio.sleep(0.1)
    assert late.ids() == first.ids() == await stream_ids(redis)


async def test_trimmed_position_is_told(server: EventwireServer, redis: aioredis.Redis) -> None:
    """A viewer whose position was trimmed away is told from where, then gets what is left."""
    await send(server, 10)
    ids = await stream_ids(redis)
    await redis.xtrim(EVENTS, maxlen=4, approximate=False)
    async with viewer(server, f"site=shop&since={ids[2]}") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert v.of("trimmed") == [{"type": "trimmed", "from": ids[2], "first": ids[-4], "id": ids[2]}]
    assert v.ids() == ids[-4:]
    # A position still in the stream is not "trimmed".
    async with viewer(server, f"site=shop&since={ids[-3]}") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert not v.of("trimmed")
    assert v.ids() == ids[-2:]


async def _slow_socket(server: EventwireServer) -> socket.socket:
    """A connected socket with a tiny receive buffer: it fills after a few KiB unread."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.admin_port))
    return sock


async def test_slow_viewer_lags_fast_viewers_keep_up(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """A viewer that does not read gets lagged with the count it missed; others get everything.

    Memory stays bounded: no viewer's queue ever holds more than live_queue
    events (plus one notice), however far behind it is.
    """
    server = await make_server(live_queue=400, live_batch=100)
    relay = server.admin_routes.relay
    chunk, chunks = 300, 10
    n = chunk * chunks
    blob = "x" * 1000
    async with (
        viewer(server, "site=shop") as fast1,
        viewer(server, "site=shop") as fast2,
        viewer(server, "site=shop", sock=await _slow_socket(server), max_queue=1) as slow,
    ):
        for v in (fast1, fast2, slow):
            await v.until(lambda m: m["type"] == "ready")
        # The fast viewers read each chunk before the next is sent: they keep
        # up with the rate; the slow one reads nothing.
        for i in range(chunks):
            await send(server, chunk, uuid=f"u-{i}", blob=blob)
            await fast1.entries(chunk * (i + 1) + i + 1)
            await fast2.entries(chunk * (i + 1) + i + 1)
        # The slow viewer was held back by its own socket only.
        await eventually(lambda: any(v.missed_total for v in relay._viewers), wait=10)
        peaks = [v.peak for v in relay._viewers]
        # The kernel's share is bounded too: no send buffer autotuned to megabytes.
        assert server.admin is not None
        buffers = [
            c.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            for c in server.admin.connections
        ]
        assert len(buffers) == 3
        assert max(buffers) <= 2 * live.VIEWER_SEND_BUFFER
        # Now it reads: what it got plus what it was told it missed is everything.
        while True:
            msg = await slow.recv(10)
            if msg["type"] == "lagged" and not any(v.queue for v in relay._viewers):
                break
        await asyncio.sleep(0.2)
        while True:
            try:
                await slow.recv(0.2)
            except TimeoutError:
                break
    expected = await stream_ids(redis)
    assert len(expected) == n + chunks  # and a session.start per customer
    for v in (fast1, fast2):
        assert v.ids() == expected
        assert not v.of("lagged")
    lagged = slow.of("lagged")
    missed = sum(m["missed"] for m in lagged)
    assert missed > 0
    assert len(slow.ids()) + missed == len(expected)
    # Every lagged notice sits exactly on its gap.
    order = [m["id"] for m in slow.messages if m["type"] in ("event", "lagged")]
    seen = slow.ids()
    for m in lagged:
        at = order.index(m["id"])
        before = order[at - 1] if at else None
        skipped = expected[
            (expected.index(before) + 1 if before else 0) : expected.index(m["id"]) + 1
        ]
        assert skipped[0] == m["first"]
        assert len(skipped) == m["missed"]
        assert not set(skipped) & set(seen)
    assert max(peaks) <= 400 + 1
    assert relay.queued() == 0


async def test_one_reader_per_stream_stopped_by_last_viewer(server: EventwireServer) -> None:
    """Viewers of one site share one reader; it stops when the last one leaves."""
    relay = server.admin_routes.relay
    async with viewer(server, "site=shop") as a, viewer(server, "site=shop&uuid=u-1") as b:
        await a.until(lambda m: m["type"] == "ready")
        await b.until(lambda m: m["type"] == "ready")
        assert relay.readers == 1
        async with viewer(server, "site=shop&stream=rejected") as c:
            await c.until(lambda m: m["type"] == "ready")
            assert relay.readers == 2
        await eventually(lambda: relay.readers == 1)
    await eventually(lambda: relay.readers == 0 and relay.viewers == 0)


async def test_server_stop_closes_viewers(make_server: MakeServer) -> None:
    """Stopping the server closes viewers 1001 and leaves no reader behind."""
    server = await make_server()
    relay = server.admin_routes.relay
    async with viewer(server, "site=shop") as v:
        await v.until(lambda m: m["type"] == "ready")
        await server.stop()
        with pytest.raises(ConnectionClosed) as info:
            await v.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1001
    assert relay.readers == 0


async def test_viewer_messages_end_the_viewer(server: EventwireServer) -> None:
    """A viewer has nothing to say: a message from it closes it 1008 with a reason."""
    async with viewer(server, "site=shop") as v:
        await v.until(lambda m: m["type"] == "ready")
        await v.ws.send("hello?")
        with pytest.raises(ConnectionClosed) as info:
            await v.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (
        1008,
        "the live relay takes no messages",
    )


async def test_viewer_limit(make_server: MakeServer) -> None:
    """Beyond live_max_viewers, a viewer is refused with HTTP 503."""
    server = await make_server(live_max_viewers=1)
    async with viewer(server, "site=shop") as v:
        await v.until(lambda m: m["type"] == "ready")
        with pytest.raises(InvalidStatus, match="503"):
            async with viewer(server, "site=app"):
                pass


async def test_redis_down_at_connect(make_server: MakeServer, redis_proc: RedisProcess) -> None:
    """A viewer that arrives while Redis does not answer is closed 1013, try again later."""
    server = await make_server(store_timeout=0.3)
    url = server.admin_url.replace("http://", "ws://") + "/v1/live?site=shop"
    redis_proc.pause()
    try:
        async with connect(url, proxy=None) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5 * UNIT)
    finally:
        redis_proc.resume()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1013
