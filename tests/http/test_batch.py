"""eventwire.http: the native batch endpoint POST /v1/track/{site} (protocol section 12)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from eventwire.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.keys import SECRET, SECRET_ENV, token
from tests.procs import UNIT, RedisProcess
from tests.wire import client_events, event, peer, producer_id, stream

TIMEOUT = aiohttp.ClientTimeout(total=10 * UNIT)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A keep-alive HTTP client."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


def batch(uuid: str, producer: str, *events: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A batch body."""
    return {"uuid": uuid, "producer": producer, "events": list(events), **extra}


async def post(
    http: aiohttp.ClientSession,
    server: EventwireServer,
    site: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """POST a body (a dict is sent as JSON); the status, the JSON answer and the headers."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(f"{server.http_url}/v1/track/{site}", data=data, headers=hdrs) as r:
        return r.status, json.loads(await r.read() or b"{}"), r.headers


async def test_batch_acked_and_stored_once(
    server: EventwireServer, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """A batch answers like an ack; the same batch posted again is all duplicates."""
    body = batch("u-h1", producer_id(), event(1), event(2), event(3, "Bad Action"))
    status, ack, _ = await post(http, server, "app", body)
    assert status == 200
    assert ack["type"] == "ack"
    assert (ack["seq"], ack["accepted"], ack["duplicate"]) == (3, 2, 0)
    assert [r["code"] for r in ack["rejected"]] == ["invalid_action"]
    status, again, _ = await post(http, server, "app", body)
    assert (status, again["accepted"], again["duplicate"]) == (200, 0, 2)
    assert [r["code"] for r in again["rejected"]] == ["invalid_action"]
    stored = await client_events(redis)
    assert [(e["uuid"], e["seq"]) for e in stored] == [("u-h1", 1), ("u-h1", 2)]
    assert stored[0]["session"]
    rejected = await stream(redis, "ew:{app}:rejected")
    assert [r["code"] for r in rejected] == ["invalid_action"]


async def test_socket_then_http_stored_once(
    server: EventwireServer, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Events sent over the socket and again over HTTP (a beacon) are stored once, one session."""
    producer = producer_id()
    async with peer(server.url) as p:
        welcome = await p.hello("u-h2", producer)
        assert (await p.track(event(1), event(2)))["accepted"] == 2
        status, ack, _ = await post(
            http, server, "app", batch("u-h2", producer, event(1), event(2), event(3))
        )
        assert (status, ack["accepted"], ack["duplicate"]) == (200, 1, 2)
        ack = await p.track(event(3), event(4))
        assert (ack["accepted"], ack["duplicate"]) == (1, 1)
    stored = await client_events(redis)
    assert [e["seq"] for e in stored] == [1, 2, 3, 4]
    assert {e["session"] for e in stored} == {welcome["session"]}


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("text/plain;charset=UTF-8", lambda b: json.dumps(b).encode()),
        ("application/msgpack", msgspec.msgpack.encode),
    ],
)
async def test_body_types(
    server: EventwireServer,
    http: aiohttp.ClientSession,
    content_type: str,
    encode: Any,
) -> None:
    """Beacon-sized text/plain bodies (sendBeacon's, no preflight) and MessagePack are batches."""
    body = encode(batch("u-h3", producer_id(), event(1)))
    status, ack, _ = await post(http, server, "app", body, {"Content-Type": content_type})
    assert (status, ack["accepted"]) == (200, 1)


async def test_gzip_and_its_limit(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    """A gzip body is inflated; one inflating past max_frame_bytes is 413, never inflated."""
    srv = await make_server(max_frame_bytes=4096)
    body = gzip.compress(json.dumps(batch("u-h4", producer_id(), event(1))).encode())
    status, ack, _ = await post(http, srv, "app", body, {"Content-Encoding": "gzip"})
    assert (status, ack["accepted"]) == (200, 1)
    bomb = gzip.compress(b"[" + b" " * 3_500_000 + b"]")
    assert len(bomb) < 4096
    status, err, _ = await post(http, srv, "app", bomb, {"Content-Encoding": "gzip"})
    assert (status, err["code"]) == (413, "too_large")
    plain = json.dumps(batch("u-h4", producer_id(), event(1, label="x" * 5000))).encode()
    status, err, _ = await post(http, srv, "app", plain)
    assert (status, err["code"]) == (413, "too_large")
    status, err, _ = await post(http, srv, "app", b"\x1f\x8b junk", {"Content-Encoding": "gzip"})
    assert (status, err["code"]) == (400, "undecodable")


async def test_refusals(
    server: EventwireServer, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Unknown site 404, Origin 403, undecodable 400 (recorded), bad fields 400, bad type 415."""
    good = batch("u-h5", producer_id(), event(1))
    assert (await post(http, server, "nosuchsite", good))[0] == 404
    # web needs an Origin from its list.
    assert (await post(http, server, "web", good))[0] == 403
    assert (await post(http, server, "web", good, {"Origin": "https://evil.example"}))[0] == 403
    status, err, _ = await post(http, server, "app", b"{not json")
    assert (status, err["code"]) == (400, "undecodable")
    rejected = await stream(redis, "ew:{app}:rejected")
    assert [(r["code"], r["raw"]) for r in rejected] == [("undecodable", "{not json")]
    status, err, _ = await post(http, server, "app", {"producer": "p", "events": [event(1)]})
    assert (status, err["code"]) == (400, "bad_hello")
    assert "uuid" in err["detail"]
    status, err, _ = await post(http, server, "app", {"uuid": "u", "producer": "p"})
    assert (status, err["code"]) == (400, "bad_batch")
    status, err, _ = await post(http, server, "app", batch("u", producer_id()))  # no events
    assert (status, err["code"]) == (400, "undecodable")
    status, err, _ = await post(http, server, "app", b"a=1", {"Content-Type": "text/csv"})
    assert status == 415
    async with http.get(f"{server.http_url}/v1/track/app") as r:
        assert r.status == 405
    async with http.get(f"{server.http_url}/nothing") as r:
        assert r.status == 404


async def test_cors(server: EventwireServer, http: aiohttp.ClientSession) -> None:
    """Preflights are answered for the site's origins only; answers name the origin."""
    url = f"{server.http_url}/v1/track/web"
    headers = {"Origin": "https://web.example", "Access-Control-Request-Method": "POST"}
    async with http.options(url, headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "https://web.example"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
    async with http.options(url, headers={**headers, "Origin": "https://evil.example"}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    status, _, hdrs = await post(
        http, server, "web", batch("u-h6", producer_id(), event(1)), {"Origin": headers["Origin"]}
    )
    assert (status, hdrs["Access-Control-Allow-Origin"]) == (200, "https://web.example")


@pytest.fixture
def secret_env() -> Iterator[None]:
    """The HS256 secret in the environment."""
    os.environ[SECRET_ENV] = SECRET
    yield
    del os.environ[SECRET_ENV]


VAULT = """
[sites.vault]
allow_no_origin = true
auth = "token"
keys = [{ alg = "HS256", secret_env = "EVENTWIRE_TEST_JWT_SECRET" }]

[sites.busy]
allow_no_origin = true
rate = { events_per_second = 1, burst = 3 }
"""


async def test_token_and_rate(
    make_server: MakeServer, http: aiohttp.ClientSession, secret_env: None, tmp_path: Path
) -> None:
    """401 without a valid token where the site needs one; 429 Retry-After over the rate."""
    srv = await make_server(sites=VAULT)
    body = batch("cust-1", producer_id(), event(1))
    status, err, _ = await post(http, srv, "vault", body)
    assert (status, err["code"]) == (401, "unauthorized")
    status, ack, _ = await post(http, srv, "vault", {**body, "token": token("cust-1", "vault")})
    assert (status, ack["accepted"]) == (200, 1)
    producer = producer_id()
    status, _, _ = await post(http, srv, "busy", batch("u", producer, event(1), event(2)))
    assert status == 200
    # The bucket is the client address', kept across requests.
    status, nack, hdrs = await post(http, srv, "busy", batch("u", producer, event(3), event(4)))
    assert (status, nack["code"]) == (429, "rate_limited")
    assert int(hdrs["Retry-After"]) >= 1


async def test_redis_down_503(
    make_server: MakeServer, redis_proc: RedisProcess, http: aiohttp.ClientSession
) -> None:
    """Redis away: 503 with Retry-After; the same batch is stored once Redis is back."""
    srv = await make_server(store_timeout=0.3, retry_after_ms=1500)
    body = batch("u-h7", producer_id(), event(1))
    redis_proc.pause()
    try:
        status, err, hdrs = await post(http, srv, "app", body)
    finally:
        redis_proc.resume()
    assert (status, err["code"], hdrs["Retry-After"]) == (503, "unavailable", "2")
    status, ack, _ = await post(http, srv, "app", body)
    assert (status, ack["accepted"]) == (200, 1)


async def test_metrics_by_route_and_status(
    server: EventwireServer, http: aiohttp.ClientSession
) -> None:
    """/metrics counts the HTTP listener's requests by route template and status."""
    await post(http, server, "app", batch("u-h8", producer_id(), event(1)))
    await post(http, server, "nosuchsite", {})
    async with http.get(f"{server.admin_url}/metrics") as r:
        text = await r.text()
    assert 'eventwire_http_requests_total{route="/v1/track/{site}",status="200"}' in text
    assert 'eventwire_http_requests_total{route="/v1/track/{site}",status="404"}' in text


async def test_http_sessions(
    make_server: MakeServer, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Batches join one session within the grace; it ends once, reason closed, after the last."""
    srv = await make_server(session_grace=0.3, reap_interval=0.05)
    producer = producer_id()
    _, first, _ = await post(http, srv, "app", batch("u-s1", producer, event(1)))
    _, second, _ = await post(http, srv, "app", batch("u-s1", producer, event(2)))
    assert (first["accepted"], second["accepted"]) == (1, 1)
    stored = await client_events(redis)
    assert len({e["session"] for e in stored}) == 1
    deadline = asyncio.get_running_loop().time() + 5 * UNIT
    while True:
        made = await stream(redis, "ew:{app}:events")
        ends = [e for e in made if e["action"] == "session.end"]
        if ends or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a second end would have come by now
    made = await stream(redis, "ew:{app}:events")
    actions = [e["action"] for e in made]
    assert actions == ["session.start", "product.view", "product.view", "session.end"]
    assert made[-1]["params"]["reason"] == "closed"
    assert made[-1]["session"] == stored[0]["session"]


async def test_deep_nesting_is_400(server: EventwireServer, http: aiohttp.ClientSession) -> None:
    """A body nested deeper than the decoder recurses is undecodable (400), never a 500."""
    deep = b'{"uuid": "u", "producer": "p-deep-01", "events": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, err, _ = await post(http, server, "app", deep)
    assert (status, err["code"]) == (400, "undecodable")


async def test_tracker_knows_the_http_url(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """tracker.js is served with the listener's URL, or public_http_url behind a proxy."""
    for overrides, want in (
        ({}, None),
        ({"public_http_url": "https://collect.example/"}, "https://collect.example"),
    ):
        srv = await make_server(**overrides)
        base = srv.url.replace("ws://", "http://")
        async with http.get(f"{base}/tracker.js") as r:
            text = await r.text()
        expected = want or srv.http_url
        assert srv.http_url == expected
        assert f'var HTTP_URL = "{expected}";' in text
