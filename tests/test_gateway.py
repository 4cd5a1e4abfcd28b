"""eventwire.gateway: handshake checks, close codes, Redis faults, graceful drain."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from prometheus_client import REGISTRY
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.typing import Subprotocol

from eventwire.gateway import HANDSHAKE_TIMEOUTS_LOG_EVERY, EventwireServer, HandshakeTimeouts
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisProcess, ServerProcess
from tests.wire import client_events, event, peer, producer_id, stream


@pytest.mark.parametrize(
    ("path", "origin", "status"),
    [
        ("/v1/track/nosuchsite", None, 404),
        ("/v2/track/app", None, 404),
        ("/", None, 404),
        ("/v1/track/web", "https://evil.example", 403),
        ("/v1/track/web", None, 403),
        ("/v1/track/shop", "https://shop.example.evil.com", 403),
    ],
)
async def test_refused_before_upgrade(
    server: EventwireServer, path: str, origin: str | None, status: int
) -> None:
    """Unknown sites get 404 and wrong or missing origins 403, before the upgrade."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.url + path, origin=origin, proxy=None):  # type: ignore[arg-type]
            pass
    assert info.value.response.status_code == status


async def test_allowed_origin(server: EventwireServer, redis: aioredis.Redis) -> None:
    """An allowed browser origin connects (exact and port pattern) and its events are stored."""
    origins = ("https://shop.example", "http://localhost:5173")
    for i, origin in enumerate(origins):
        async with peer(server.url, site="shop", origin=origin) as p:
            assert p.ws.response is not None
            assert p.ws.response.status_code == 101
            welcome = await p.hello(f"u-origin-{i}")
            assert welcome["session"]
            assert (await p.track(event(1)))["accepted"] == 1
    stored = await client_events(redis, "shop")
    assert [e["uuid"] for e in stored] == ["u-origin-0", "u-origin-1"]


async def test_unknown_subprotocol_refused(server: EventwireServer) -> None:
    """A client offering only unknown subprotocols gets HTTP 400 naming ours."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            server.url + "/v1/track/app", subprotocols=[Subprotocol("chat")], proxy=None
        ):
            pass
    assert info.value.response.status_code == 400
    assert b"eventwire.v1.json" in info.value.response.body


async def test_hello_deadline(make_server: MakeServer) -> None:
    """No hello within hello_timeout: an error message, then close 1008."""
    srv = await make_server(hello_timeout=0.2)
    async with peer(srv.url) as p:
        err = await p.recv()
        assert err["code"] == "hello_timeout"
        await p.ws.wait_closed()
        assert p.ws.close_code == 1008


@pytest.mark.parametrize(
    "first",
    [
        {"type": "hello", "uuid": "has space", "producer": "p-12345678"},
        {"type": "hello", "uuid": "u", "producer": "short"},
        {"type": "track", "events": [{"seq": 1, "action": "a.b"}]},
    ],
)
async def test_bad_hello(server: EventwireServer, first: dict[str, object]) -> None:
    """A first message that is not a valid hello: error bad_hello, close 1008."""
    async with peer(server.url) as p:
        await p.send(first)
        err = await p.recv()
        assert err["type"] == "error"
        assert err["code"] == "bad_hello"
        await p.ws.wait_closed()
        assert p.ws.close_code == 1008


async def test_frame_too_large(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """A frame over max_frame_bytes closes 1009; earlier frames stay acked."""
    srv = await make_server(max_frame_bytes=4096)
    async with peer(srv.url) as p:
        await p.hello()
        assert (await p.track(event(1)))["accepted"] == 1
        await p.send({"type": "track", "events": [event(2, params={"x": "y" * 5000})]})
        await p.ws.wait_closed()
        assert p.ws.close_code == 1009
    assert [e["seq"] for e in await client_events(redis)] == [1]


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_undecodable_frame(
    server: EventwireServer, redis: aioredis.Redis, msgpack: bool
) -> None:
    """An undecodable frame: acks due first, then error, close 1007, raw bytes recorded."""
    garbage = b"\xc1\xff\x00garbage" if msgpack else '{"type": "track", "events": [{'
    async with peer(server.url, msgpack=msgpack) as p:
        await p.hello("u-x")
        await p.send({"type": "track", "events": [event(1)]})
        await p.send(garbage)
        ack = await p.recv()
        assert ack["type"] == "ack"
        err = await p.recv()
        assert err["type"] == "error"
        assert err["code"] == "undecodable"
        await p.ws.wait_closed()
        assert p.ws.close_code == 1007
    (record,) = await stream(redis, "ew:{app}:rejected")
    assert record["code"] == "undecodable"
    assert record["uuid"] == "u-x"
    assert record["seq"] is None
    if msgpack:
        assert record["raw_base64"] is True
        assert base64.b64decode(record["raw"]) == garbage
    else:
        assert record["raw"] == garbage


async def test_connection_limit(make_server: MakeServer) -> None:
    """Past max_connections the handshake gets HTTP 503."""
    srv = await make_server(max_connections=2)
    async with peer(srv.url) as a, peer(srv.url) as b:
        await a.hello()
        await b.hello()
        with pytest.raises(InvalidStatus) as info:
            async with peer(srv.url):
                pass
        assert info.value.response.status_code == 503


async def test_redis_paused_nacks_then_recovers(
    make_server: MakeServer, redis_proc: RedisProcess, redis: aioredis.Redis
) -> None:
    """Redis stopped: a frame and the ones after it get nack; the resend is stored after."""
    srv = await make_server(store_timeout=0.3, retry_after_ms=70)
    producer = producer_id()
    async with peer(srv.url) as p:
        await p.hello("u-n", producer)
        assert (await p.track(event(1)))["accepted"] == 1
        redis_proc.pause()
        try:
            await p.send({"type": "track", "events": [event(2), event(3)]})
            await asyncio.sleep(0.05)
            await p.send({"type": "track", "events": [event(4)]})
            first, second = await p.recv(), await p.recv()
        finally:
            redis_proc.resume()
        assert first == {"type": "nack", "seq": 3, "code": "unavailable", "retry_after_ms": 70}
        assert second["type"] == "nack"
        # A frame that skips the nacked seqs is nacked too: storing it would hide 2 and 3.
        assert (await p.track(event(5)))["type"] == "nack"
        await asyncio.sleep(0.1)  # the client waits retry_after_ms, as the nack asks
        ack = await p.track(event(2), event(3), event(4), event(5))
        assert ack["type"] == "ack"
        assert ack["accepted"] + ack["duplicate"] == 4
    assert [e["seq"] for e in await client_events(redis)] == [1, 2, 3, 4, 5]
    assert await srv.ready()


async def test_redis_down_at_hello(make_server: MakeServer, redis_proc: RedisProcess) -> None:
    """A hello while Redis is unavailable gets error unavailable and close 1013."""
    srv = await make_server(store_timeout=0.3)
    redis_proc.pause()
    try:
        async with peer(srv.url) as p:
            await p.send({"type": "hello", "uuid": "u", "producer": producer_id()})
            err = await p.recv()
            await p.ws.wait_closed()
    finally:
        redis_proc.resume()
    assert err["code"] == "unavailable"
    assert p.ws.close_code == 1013


async def test_stop_drains_in_flight_frames(make_server: MakeServer, redis: aioredis.Redis) -> None:
    """stop() acks the frames already received, then closes 1001."""
    srv = await make_server()
    async with peer(srv.url) as p:
        await p.hello()
        for f in range(20):
            await p.send({"type": "track", "events": [event(f * 5 + i + 1) for i in range(5)]})
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(srv.stop())
        answers = []

        async def read_answers() -> None:
            while True:
                answers.append(await p.recv())

        # The answers, then the close 1001 ends them (docs/protocol.md section 3);
        # a timeout or any other close fails the test.
        with pytest.raises(ConnectionClosedOK) as closed:
            await read_answers()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
        await stopping
        assert p.ws.close_code == 1001
    acked = sum(a["accepted"] for a in answers if a["type"] == "ack")
    assert acked == len(await client_events(redis))
    assert acked == 100


def test_sigterm_exits_zero(redis_proc: RedisProcess, sites_file: Path) -> None:
    """SIGTERM: the process closes connections 1001 and exits 0, logging each close."""

    async def scenario(srv: ServerProcess) -> int | None:
        async with peer(f"ws://127.0.0.1:{srv.port}") as p:
            await p.hello()
            assert (await p.track(event(1)))["accepted"] == 1
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGTERM)
            await p.ws.wait_closed()
            return p.ws.close_code

    srv = ServerProcess(redis_proc.url, sites_file).start()
    try:
        code = asyncio.run(scenario(srv))
        assert srv.proc is not None
        assert srv.proc.wait(10 * UNIT) == 0
    finally:
        srv.kill()
    assert code == 1001
    lines = srv.read_rest()
    closed = [line for line in lines if line.get("event") == "connection_closed"]
    assert len(closed) == 1
    assert closed[0]["close_code"] == 1001
    assert closed[0]["accepted"] == 1
    assert {"site", "uuid", "session", "duration_ms", "rejected"} <= set(closed[0])
    assert json.dumps(lines)  # every line was JSON


async def test_hello_storm(server: EventwireServer, redis: aioredis.Redis) -> None:
    """Hundreds of simultaneous hellos (a reconnect storm) all get a welcome."""

    async def one(i: int) -> str:
        async with peer(server.url) as p:
            welcome = await p.hello(f"storm-{i}")
            return str(welcome["session"])

    sessions = await asyncio.gather(*(one(i) for i in range(300)))
    assert len(set(sessions)) == 300


def _handshake_timeouts() -> float:
    return REGISTRY.get_sample_value("eventwire_handshake_timeouts_total") or 0.0


async def _aborted(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the TCP connection."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def test_handshake_timeout_counted_and_logged(make_server: MakeServer) -> None:
    """A handshake not finished within hello_timeout is aborted, counted and logged once."""
    srv = await make_server(hello_timeout=0.3)
    before = _handshake_timeouts()
    with structlog.testing.capture_logs() as logs:
        silent = await asyncio.open_connection("127.0.0.1", srv.port)
        partial = await asyncio.open_connection("127.0.0.1", srv.port)
        # A request whose headers never end (slowloris).
        partial[1].write(b"GET /v1/track/app HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):
            answers = await asyncio.gather(_aborted(silent[0]), _aborted(partial[0]))
        took = asyncio.get_running_loop().time() - started
        for _, writer in (silent, partial):
            writer.close()
    assert answers == [b"", b""]  # no HTTP answer: the TCP connection was closed
    assert 0.25 <= took < 3
    assert _handshake_timeouts() - before == 2
    assert srv.handshake_timeouts.total == 2
    lines = [e for e in logs if e["event"] == "handshake_timeouts"]
    assert len(lines) == 1, logs  # the second came within HANDSHAKE_TIMEOUTS_LOG_EVERY
    (line,) = lines
    assert (line["log_level"], line["aborted"], line["hello_timeout"]) == ("warning", 1, 0.3)
    assert "127.0.0.1" not in repr(line)


async def test_completed_handshake_not_a_handshake_timeout(make_server: MakeServer) -> None:
    """A 101 within hello_timeout is no handshake timeout; no hello after it is a protocol error."""
    srv = await make_server(hello_timeout=0.3)
    before = _handshake_timeouts()
    errors = "eventwire_protocol_errors_total"
    labels = {"site": "app", "code": "hello_timeout"}
    errors_before = REGISTRY.get_sample_value(errors, labels) or 0.0
    with structlog.testing.capture_logs() as logs:
        async with peer(srv.url) as p:
            assert (await p.recv())["code"] == "hello_timeout"
            await p.ws.wait_closed()
    assert p.ws.close_code == 1008
    assert _handshake_timeouts() == before
    assert srv.handshake_timeouts.total == 0
    assert not [e for e in logs if e["event"] == "handshake_timeouts"]
    assert (REGISTRY.get_sample_value(errors, labels) or 0.0) - errors_before == 1


def test_handshake_timeout_lines_rate_limited() -> None:
    """One line at the first timeout, then at most one per window, with the count since the last."""
    now = [100.0]
    timeouts = HandshakeTimeouts(0.3, lambda: 7, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for step in (0.0, 1.0, 2.0, HANDSHAKE_TIMEOUTS_LOG_EVERY, 0.5, 60.0):
            now[0] += step
            timeouts.timed_out(request_received=False)
    assert [(e["aborted"], e["total"]) for e in logs] == [(1, 1), (3, 4), (2, 6)]
    assert logs[0]["connections_open"] == 7
    assert timeouts.total == 6
