"""eventwire.live: the live relay on the admin listener, against a real server and Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page
from redis.asyncio.cluster import RedisCluster
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from eventwire import live
from eventwire.client import EventwireClient
from eventwire.core.positions import resolve_since
from eventwire.gateway import EventwireServer
from eventwire.live import Entry, Filter, Viewer, parse_query
from eventwire.live import relay as live_relay
from eventwire.live import viewer as live_viewer
from eventwire.live.rollup import FEED_RATE
from eventwire.store import StreamEntry, StreamsReader, stream_id
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisClusterProcess, RedisProcess
from tests.static.test_dashboard import MS, open_dashboard, wait_count, wait_rows

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
    assert v.missed == 2
    assert [(p, g.missed, g.first, g.last) for p, g in v.gaps.items()] == [
        (0, 2, "1003-0", "1004-0")
    ]
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
    v.floor = [(1001, 0)]
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
        await asyncio.sleep(0.1 * UNIT)
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
        await asyncio.sleep(0.1 * UNIT)
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


async def test_site_found_in_redis(server: EventwireServer, redis: aioredis.Redis) -> None:
    """A site the sites file does not name is relayed when Redis holds its streams.

    Its partitions are those Redis shows, so a partitioned site's viewer reads
    every partition; a site with no stream at all is still 404.
    """
    await redis.xadd("ew:{acc}:events", {"event": b'{"action":"a.one","uuid":"u"}'})
    for p in (0, 2):
        await redis.xadd(f"ew:{{far:{p}}}:events", {"event": b'{"action":"f.one","uuid":"u"}'})
    async with viewer(server, "site=acc&since=0") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert [m["event"]["action"] for m in v.of("event")] == ["a.one"]
    async with viewer(server, "site=far&since=0") as v:
        await v.until(lambda m: m["type"] == "ready")
    assert v.messages[0]["partitions"] == 3
    assert [(m["p"], m["event"]["action"]) for m in v.of("event")] == [(0, "f.one"), (2, "f.one")]
    url = server.admin_url.replace("http://", "ws://") + "/v1/live?site=none"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=5 * UNIT, proxy=None):
            pass
    assert refused.value.response.status_code == 404


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
            await asyncio.sleep(0.1 * UNIT)
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
        real = live_viewer.read_page
        relay = server.admin_routes.relay
        added_once: list[bool] = []

        async def page_then_more(client: Any, *args: Any) -> Any:
            out = await real(client, *args)
            if client is server.store.redis and args[-1] == "+" and not added_once:
                added_once.append(True)
                # After the viewer's last backlog page and before it joins,
                # the reader hands out new entries.
                added = (await redis.xadd(EVENTS, {"event": b'{"action":"x.y"}'})).decode()
                await eventually(lambda: next(iter(relay._readers.values())).positions == [added])
            return out

        monkeypatch.setattr(live_viewer, "read_page", page_then_more)
        async with viewer(server, "site=shop&since=0") as late:
            await late.until(lambda m: m["type"] == "ready")
            monkeypatch.setattr(live_viewer, "read_page", real)
            assert added_once, "the reader did not move on between the replay and the join"
            await send(server, 1)
            await late.entries(len(await stream_ids(redis)))
            await asyncio.sleep(0.1 * UNIT)
    assert late.ids() == await stream_ids(redis)


async def test_handover_reader_behind(
    server: EventwireServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries a slow reader hands out after a viewer replayed them are not sent twice."""
    gate = asyncio.Event()
    real = StreamsReader.read

    async def held(*args: Any, **kwargs: Any) -> Any:
        out = await real(*args, **kwargs)
        if out:
            await gate.wait()
        return out

    monkeypatch.setattr(StreamsReader, "read", held)
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
            await asyncio.sleep(0.1 * UNIT)
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
        await asyncio.sleep(0.2 * UNIT)
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


# ---- partitioned sites -------------------------------------------------------------

P = 4
#: The shop split over P partitions: its streams are ew:{shop:0}:events to ew:{shop:3}:events.
SPLIT_SITES = (
    f'[sites.shop]\norigins = ["http://localhost:*"]\nallow_no_origin = true\npartitions = {P}\n'
    "\n[sites.app]\norigins = []\nallow_no_origin = true\n"
)

Key = tuple[int, str]


def part_of(uuid: str) -> int:
    """A customer's partition: crc32 of its uuid, mod P."""
    return zlib.crc32(uuid.encode()) % P


def uuid_in(part: int, nth: int = 0) -> str:
    """The ``nth`` customer uuid (of ``c-0``, ``c-1``...) that lands in partition ``part``."""
    found = (u for n in range(10_000) if part_of(u := f"c-{n}") == part)
    for _ in range(nth):
        next(found)
    return next(found)


def split_key(part: int, stream: str = "events") -> str:
    """The key of one partition's stream of the shop."""
    return f"ew:{{shop:{part}}}:{stream}"


async def split_ids(
    redis: aioredis.Redis | RedisCluster, stream: str = "events"
) -> list[list[str]]:
    """Every id of every partition's stream, by partition, oldest first."""
    return [[i.decode() for i, _ in await redis.xrange(split_key(p, stream))] for p in range(P)]


def every_key(ids: list[list[str]]) -> list[Key]:
    """All (partition, id) pairs, merged by id as the relay merges them."""
    return sorted(((p, i) for p in range(P) for i in ids[p]), key=lambda k: (stream_id(k[1]), k[0]))


def keys_of(v: LiveViewer) -> list[Key]:
    """The (partition, id) of each event or rejected message, in the order they came."""
    return [(m.get("p", 0), m["id"]) for m in v.messages if m["type"] in ("event", "rejected")]


def position(v: LiveViewer) -> str:
    """The cursor a viewer resumes from, by the relay's rule (see eventwire.live).

    A message with ``p`` moves that partition's id; one without sets them all.
    """
    at: list[str] = []
    for m in v.messages:
        if "p" in m:
            at[m["p"]] = m["id"]
        elif isinstance(m.get("id"), str):
            at = m["id"].split(",")
    return ",".join(at)


def ready(m: dict[str, Any]) -> bool:
    """Whether a message is the viewer's ready."""
    return m["type"] == "ready"


def test_viewer_gap_over_partitions() -> None:
    """A gap over partitions: one lagged per partition, together, before the entry after it."""
    v = Viewer(Filter(None, None), limit=2, partitions=P)
    parts = [0, 2, 2, 0, 3, 2]
    entries = [
        Entry(f"{1000 + i}-0", "a.b", "u", f"f-{i}".encode(), p) for i, p in enumerate(parts)
    ]
    v.push(entries[:5])
    assert v.missed == 3
    assert v.take(1) == [b"f-0"]
    v.push(entries[5:])
    taken = v.take(10)
    assert taken[0] == b"f-1"
    # In the order the partitions first lost an entry; each counts its own.
    assert [json.loads(f) for f in taken[1:4]] == [
        {"type": "lagged", "missed": 1, "first": "1002-0", "id": "1002-0", "p": 2},
        {"type": "lagged", "missed": 1, "first": "1003-0", "id": "1003-0", "p": 0},
        {"type": "lagged", "missed": 1, "first": "1004-0", "id": "1004-0", "p": 3},
    ]
    assert taken[4:] == [b"f-5"]
    assert v.missed == 0
    assert v.missed_total == 3


def test_floor_per_partition() -> None:
    """The handover floor of one partition does not hide another partition's lower ids."""
    v = Viewer(Filter(None, None), limit=10, partitions=P)
    v.floor = [(1005, 0), (0, 0), (1001, 0), (0, 0)]
    v.push([Entry(f"{1000 + i}-0", "a.b", "u", f"f-{i}".encode(), i % 3) for i in range(7)])
    # Partition 0 holds 1000, 1003, 1006; 1 holds 1001, 1004; 2 holds 1002, 1005.
    assert list(v.queue) == [b"f-1", b"f-2", b"f-4", b"f-5", b"f-6"]


def test_partitioned_frames_name_their_partition() -> None:
    """Entries of a partitioned site carry p; those of a site of one partition do not."""
    raw = [StreamEntry("7-1", b'{"action":"a.b","uuid":"u"}')]
    (split,) = live.decode_entries(raw, "rejected", 3)
    assert split.part == 3
    assert json.loads(split.frame) == {
        "type": "rejected",
        "id": "7-1",
        "event": {"action": "a.b", "uuid": "u"},
        "p": 3,
    }
    (one,) = live.decode_entries(raw, "rejected")
    assert one.part == 0
    assert b'"p"' not in one.frame


@pytest.mark.parametrize(
    ("since", "parts", "refused"),
    [
        ("1-0,2-0,3,4-5", 4, False),
        ("5m", 4, False),
        ("17-3", 4, False),
        ("1-0,2-0,3-0", 4, True),
        ("1-0,2-0", 1, True),
        ("1-0,,3-0,4-0", 4, True),
        ("1-0,x,3-0,4-0", 4, True),
        ("1-0,2-0,3-0,99999999999999999999999-0", 4, True),
    ],
)
def test_cursor_queries(since: str, parts: int, refused: bool) -> None:
    """A cursor in since must hold one stream id per partition of the site."""
    answer = parse_query(f"site=shop&since={since}", lambda s: s == "shop", lambda s: parts)
    if refused:
        assert isinstance(answer, tuple)
        assert answer[0] == 400
    else:
        assert isinstance(answer, live.LiveQuery)
        assert answer.partitions == parts


def test_resolve_since_per_partition() -> None:
    """A cursor gives each partition its id; anything else is one cut in time for all."""
    assert resolve_since("1-0,2,3-4,5-6", 0, 4) == ["1-0", "2-0", "3-4", "5-6"]
    assert resolve_since("17", 0, 3) == ["17-0"] * 3
    assert resolve_since("1s", 5000, 2) == [f"3999-{2**64 - 1}"] * 2
    assert resolve_since("now", 5000, 4) is None


async def test_partitions_fan_out_live(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """Each new event of every partition reaches each viewer exactly once, from one reader.

    Each message names its partition (the customer's), a customer's events
    come in their order, and the past before since=now is not sent.
    """
    server = await make_server(sites=SPLIT_SITES)
    relay = server.admin_routes.relay
    await asyncio.gather(send(server, 1, uuid=uuid_in(1, 9)), send(server, 2, uuid=uuid_in(3, 9)))
    old = await split_ids(redis)
    uuids = [uuid_in(p, k) for p in range(P) for k in range(2)]
    async with (
        viewer(server, "site=shop") as a,
        viewer(server, "site=shop") as b,
        viewer(server, f"site=shop&uuid={uuids[5]}") as one,
    ):
        for v in (a, b, one):
            await v.until(ready)
        assert relay.readers == 1
        await asyncio.gather(*(send(server, 5, uuid=u) for u in uuids))
        for v in (a, b):
            await v.entries(len(uuids) * 6, wait=10)
        await one.entries(6)
        await asyncio.sleep(0.1 * UNIT)
    ids = await split_ids(redis)
    new = [k for k in every_key(ids) if k[1] not in old[k[0]]]
    for v in (a, b):
        got = keys_of(v)
        assert sorted(got) == sorted(new)
        assert len(set(got)) == len(got)
        for m in v.of("event"):
            assert m["p"] == part_of(m["event"]["uuid"])
        for uuid in uuids:
            seqs = [m["event"]["seq"] for m in v.of("event") if m["event"]["uuid"] == uuid]
            assert seqs[1:] == [1, 2, 3, 4, 5]  # after session.start, which has a seq of its own
        hello = v.messages[0]
        assert hello["partitions"] == P
        assert hello["id"] == ",".join(o[-1] if o else "0-0" for o in old)
        assert not v.of("lagged")
        assert not v.of("trimmed")
    assert {m["event"]["uuid"] for m in one.of("event")} == {uuids[5]}
    assert len(one.of("event")) == 6


async def test_partitions_since_replay_and_resume(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """since=0 replays every partition merged by id; resuming from the cursor kept, cut
    mid-replay or after events came in its absence, gives no gap and no duplicate."""
    # Pages of 2 entries per partition: the backlog takes many pages, unevenly.
    server = await make_server(sites=SPLIT_SITES, live_batch=8, live_queue=50)
    counts = {0: 12, 1: 6, 2: 3, 3: 1}
    await asyncio.gather(*(send(server, n, uuid=uuid_in(p)) for p, n in counts.items()))
    backlog = every_key(await split_ids(redis))
    async with viewer(server, "site=shop&since=0") as whole:
        await whole.until(ready)
    # On one Redis the ids of all partitions share one clock: merged, they are in order.
    assert keys_of(whole) == backlog
    assert whole.messages[0]["id"] == ",".join(["0-0"] * P)
    ends = await split_ids(redis)
    assert whole.of("ready")[0]["id"] == ",".join(i[-1] for i in ends)

    # A viewer that leaves after 9 entries of the replay.
    async with viewer(server, "site=shop&since=0") as first:
        await first.entries(9)
    cut = position(first)
    assert cut.count(",") == P - 1
    # While it is away, some partitions grow.
    await asyncio.gather(send(server, 3, uuid=uuid_in(1, 1)), send(server, 2, uuid=uuid_in(3, 1)))
    async with viewer(server, f"site=shop&since={cut}") as second:
        assert second.messages[0]["id"] == cut
        await second.until(ready)
        await send(server, 2, uuid=uuid_in(2, 1))  # and live, after ready
        total = len(every_key(await split_ids(redis)))
        await second.entries(total - len(keys_of(first)))
        await asyncio.sleep(0.1 * UNIT)
    seen = keys_of(first) + keys_of(second)
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(every_key(await split_ids(redis)))
    # Resuming from the last cursor now gives nothing more.
    async with viewer(server, f"site=shop&since={position(second)}") as again:
        await again.until(ready)
    assert keys_of(again) == []


async def test_partitions_since_one_id_is_a_cut_in_time(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """One stream id as since starts after it in every partition (ids share Redis' clock)."""
    server = await make_server(sites=SPLIT_SITES)
    await asyncio.gather(*(send(server, 2, uuid=uuid_in(p)) for p in range(P)))
    cut = (await redis.xadd(split_key(1), {"event": b'{"action":"x.y","uuid":"c"}'})).decode()
    await asyncio.gather(*(send(server, 2, uuid=uuid_in(p, 1)) for p in range(P)))
    async with viewer(server, f"site=shop&since={cut}") as v:
        await v.until(ready)
    assert v.messages[0]["id"] == ",".join([cut] * P)
    after = [k for k in every_key(await split_ids(redis)) if stream_id(k[1]) > stream_id(cut)]
    assert len(after) == P * 3
    assert keys_of(v) == after


async def test_partitions_one_clock_ahead(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A partition whose ids run far ahead (a cluster node with a fast clock) hides none of
    the other partitions' entries, in the replay, at the handover or live."""
    server = await make_server(sites=SPLIT_SITES)
    await send(server, 1, uuid=uuid_in(0))
    ahead = f"{(await redis.time())[0] * 1000 + 3_600_000}-0"
    await redis.xadd(split_key(2), {"event": b'{"action":"x.y","uuid":"c"}'}, id=ahead)
    async with viewer(server, "site=shop") as now, viewer(server, "site=shop&since=0") as v:
        for each in (now, v):
            await each.until(ready)
        await asyncio.gather(*(send(server, 2, uuid=uuid_in(p, 1)) for p in range(P)))
        total = len(every_key(await split_ids(redis)))
        await v.entries(total)
        await now.entries(total - 3)
        await asyncio.sleep(0.1 * UNIT)
    everything = every_key(await split_ids(redis))
    assert sorted(keys_of(v)) == sorted(everything)
    assert len(keys_of(v)) == len(everything)
    assert keys_of(v)[:3] == [everything[0], everything[1], (2, ahead)]
    assert now.messages[0]["id"].split(",")[2] == ahead
    # since=now: everything but the backlog of three.
    assert sorted(keys_of(now)) == sorted(set(everything) - set(keys_of(v)[:3]))
    # Partition 2's new ids follow its own last one, an hour ahead.
    assert all(stream_id(i) > stream_id(ahead) for q, i in keys_of(now) if q == 2)


async def test_partitions_handover_under_traffic(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """Viewers joining a running reader while every partition takes events see each once."""
    server = await make_server(sites=SPLIT_SITES, live_batch=8, live_queue=1000)
    async with viewer(server, "site=shop") as first:
        await first.until(ready)
        senders = [asyncio.create_task(send(server, 60, uuid=uuid_in(p))) for p in range(P)]
        async with (
            viewer(server, "site=shop&since=0") as a,
            viewer(server, "site=shop&since=0") as b,
        ):
            await asyncio.gather(*senders)
            total = len(every_key(await split_ids(redis)))
            for v in (first, a, b):
                await v.entries(total, wait=10)
            await asyncio.sleep(0.1 * UNIT)
    expected = every_key(await split_ids(redis))
    for v in (first, a, b):
        got = keys_of(v)
        assert sorted(got) == sorted(expected)
        assert len(set(got)) == len(got)
        for p in range(P):
            mine = [stream_id(i) for q, i in got if q == p]
            assert mine == sorted(mine)
        assert not v.of("lagged")


async def test_partitions_trimmed_position_is_told(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """A cursor whose id in one partition was trimmed away gets trimmed for that partition only."""
    server = await make_server(sites=SPLIT_SITES)
    await asyncio.gather(*(send(server, 5, uuid=uuid_in(p)) for p in range(P)))
    before = await split_ids(redis)
    start = [ids[1] for ids in before]
    await redis.xtrim(split_key(2), maxlen=3, approximate=False)
    after = await split_ids(redis)
    async with viewer(server, f"site=shop&since={','.join(start)}") as v:
        await v.until(ready)
    trimmed = {"type": "trimmed", "from": start[2], "first": after[2][0], "id": start[2], "p": 2}
    assert v.of("trimmed") == [trimmed]
    expected = [k for k in every_key(after) if stream_id(k[1]) > stream_id(start[k[0]])]
    assert keys_of(v) == expected
    # Told before any entry of its partition.
    at = v.messages.index(trimmed)
    assert all(m.get("p") != 2 for m in v.messages[:at] if m["type"] == "event")


async def test_partitions_reader_overtaken_by_trimming(
    make_server: MakeServer, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that trimming overtook in one partition tells its viewers, from their position."""
    # One entry of each partition a read: a read with one entry is full.
    server = await make_server(sites=SPLIT_SITES, live_batch=P)
    gate = asyncio.Event()
    held = asyncio.Event()

    def holding(real: Any, entries: Callable[[Any], Any]) -> Any:
        async def read(client: Any, *args: Any) -> Any:  # a client, or a StreamsReader
            out = await real(client, *args)
            # The reader's first read with an entry (a page or an XREAD) waits.
            if client is not server.store.redis and entries(out) and not gate.is_set():
                held.set()
                await gate.wait()
            return out

        return read

    monkeypatch.setattr(StreamsReader, "read", holding(StreamsReader.read, lambda out: out))
    monkeypatch.setattr(live_relay, "read_page", holding(live_relay.read_page, lambda out: out[0]))
    uuid = uuid_in(1)
    async with viewer(server, "site=shop") as v:
        await v.until(ready)
        await send(server, 1, uuid=uuid)
        # The reader holds session.start; meanwhile the stream grows and is trimmed.
        await asyncio.wait_for(held.wait(), 5 * UNIT)
        await send(server, 10, uuid=uuid)
        await redis.xtrim(split_key(1), maxlen=3, approximate=False)
        gate.set()
        await v.entries(4)
        await asyncio.sleep(0.1 * UNIT)
    ids = await split_ids(redis)
    start = v.of("event")[0]
    assert start["event"]["action"] == "session.start"
    assert v.of("trimmed") == [
        {"type": "trimmed", "from": start["id"], "first": ids[1][0], "id": start["id"], "p": 1}
    ]
    assert keys_of(v) == [(1, start["id"])] + [(1, i) for i in ids[1]]
    assert v.messages.index(v.of("trimmed")[0]) == v.messages.index(start) + 1


async def test_partitions_slow_viewer_lag_adds_up(
    make_server: MakeServer, redis: aioredis.Redis
) -> None:
    """A slow viewer of a partitioned site: what it got plus what each lagged notice says it
    missed is every entry of every partition, each notice exactly on its partition's gap."""
    server = await make_server(sites=SPLIT_SITES, live_queue=400, live_batch=100)
    relay = server.admin_routes.relay
    chunk, chunks = 300, 10
    blob = "x" * 1000
    async with (
        viewer(server, "site=shop") as fast,
        viewer(server, "site=shop", sock=await _slow_socket(server), max_queue=1) as slow,
    ):
        for v in (fast, slow):
            await v.until(ready)
        for i in range(chunks):
            # Two customers of two partitions at once: each read merges partitions.
            await asyncio.gather(
                send(server, chunk // 2, uuid=uuid_in(i % P, i), blob=blob),
                send(server, chunk // 2, uuid=uuid_in((i + 1) % P, i), blob=blob),
            )
            await fast.entries((chunk + 2) * (i + 1))
        await eventually(lambda: any(v.missed_total for v in relay._viewers), wait=10)
        while True:
            msg = await slow.recv(10)
            if msg["type"] == "lagged" and not any(v.queue or v.missed for v in relay._viewers):
                break
        await asyncio.sleep(0.2 * UNIT)
        while True:
            try:
                await slow.recv(0.2)
            except TimeoutError:
                break
    ids = await split_ids(redis)
    expected = every_key(ids)
    assert len(expected) == (chunk + 2) * chunks
    assert sorted(keys_of(fast)) == sorted(expected)
    assert not fast.of("lagged")
    lagged = slow.of("lagged")
    assert lagged
    assert sum(m["missed"] for m in lagged) + len(keys_of(slow)) == len(expected)
    for p in range(P):
        stream = ids[p]
        mine = [m for m in lagged if m["p"] == p]
        seen = {i for q, i in keys_of(slow) if q == p}
        assert len(seen) + sum(m["missed"] for m in mine) == len(stream)
        # Each notice sits exactly on its gap in its partition.
        order = [m["id"] for m in slow.messages if m["type"] in ("event", "lagged") and m["p"] == p]
        for m in mine:
            at = order.index(m["id"])
            start = stream.index(order[at - 1]) + 1 if at else 0
            skipped = stream[start : stream.index(m["id"]) + 1]
            assert skipped[0] == m["first"]
            assert len(skipped) == m["missed"]
            assert not set(skipped) & seen
    assert relay.queued() == 0


async def test_partitions_over_a_cluster(
    make_server: MakeServer, redis_cluster_proc: RedisClusterProcess
) -> None:
    """Over a real 3-master cluster, with the partitions on several masters: live, since=0
    and a resume from the cursor each give every entry exactly once."""
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_proc.nodes[0].port)
    await cluster.initialize()
    try:
        for node in redis_cluster_proc.nodes:
            async with aioredis.Redis(host="127.0.0.1", port=node.port) as client:
                await client.flushall()
        owners = set()
        for p in range(P):
            node = cluster.get_node_from_key(split_key(p))
            assert node is not None
            owners.add(node.name)
        assert len(owners) > 1, "the partitions' tags all land on one master"
        server = await make_server(
            sites=SPLIT_SITES, redis_url=redis_cluster_proc.url, live_batch=8
        )
        relay = server.admin_routes.relay
        async with viewer(server, "site=shop") as v:
            await v.until(ready)
            await asyncio.gather(*(send(server, 3, uuid=uuid_in(p)) for p in range(P)))
            await v.entries(P * 4)
            await asyncio.sleep(0.1 * UNIT)
        ids = await split_ids(cluster)
        assert sorted(keys_of(v)) == sorted(every_key(ids))
        assert len(keys_of(v)) == P * 4
        async with viewer(server, "site=shop&since=0") as first:
            await first.entries(7)
        async with viewer(server, f"site=shop&since={position(first)}") as second:
            await second.until(ready)
        seen = keys_of(first) + keys_of(second)
        assert len(seen) == len(set(seen))
        assert sorted(seen) == sorted(every_key(ids))
        await eventually(lambda: relay.readers == 0)
    finally:
        await cluster.aclose()


async def test_dashboard_follows_partitions(
    make_server: MakeServer, redis: aioredis.Redis, page: Page
) -> None:
    """The dashboard on a partitioned site shows and counts every entry once: with reads
    that cut the partitions unevenly, and across a restart (it resumes from its cursor)."""
    # One entry of each partition a read: ids of two partitions arrive interleaved.
    options: dict[str, Any] = {"sites": SPLIT_SITES, "live_batch": P}
    server = await make_server(**options)
    port = server.admin_port
    await open_dashboard(page, server)
    # Each server's entries (its events and two session starts) stay within the feed's
    # FEED_RATE: above it in one second the next second's feed is sampled, by design,
    # and the rows would miss entries that were not lost (with 35 entries: whenever a
    # second began after the 20th, likelier the slower the machine).
    first = (14, 3)
    assert sum(first) + 2 <= FEED_RATE
    await asyncio.gather(
        send(server, first[0], uuid=uuid_in(0)), send(server, first[1], uuid=uuid_in(2))
    )
    await wait_rows(page, "#feed tr.event", sum(first) + 2, within=10 * MS)
    await server.stop()
    await page.wait_for_selector('#status:not([data-state="live"])', timeout=5 * MS)
    # Events stored while no relay answers on the page's port; the port is held
    # (bound, not listening) so that the other server's listeners, on port 0,
    # cannot be given it.
    with socket.socket() as hold:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("127.0.0.1", port))
        other = await make_server(**options)
        await asyncio.gather(send(other, 4, uuid=uuid_in(1)), send(other, 2, uuid=uuid_in(3)))
        await other.stop()
    again = await make_server(admin=f"127.0.0.1:{port}", **options)
    await page.wait_for_selector('#status[data-state="live"]', timeout=10 * MS)
    await asyncio.gather(send(again, 5, uuid=uuid_in(2, 1)), send(again, 1, uuid=uuid_in(3, 1)))
    stored = [
        (i.decode(), json.loads(f[b"event"])["uuid"])
        for p in range(P)
        for i, f in await redis.xrange(split_key(p))
    ]
    await wait_rows(page, "#feed tr.event", len(stored), within=10 * MS)
    await asyncio.sleep(0.3 * UNIT)
    rows: list[list[str]] = await page.eval_on_selector_all(
        "#feed tr.event", "rows => rows.map(r => [r.dataset.id, r.dataset.uuid])"
    )
    assert Counter((i, u) for i, u in rows) == Counter(stored)
    await wait_count(page, "#total", len(stored))
    assert await page.locator(".notice").count() == 0
