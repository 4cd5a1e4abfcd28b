"""server/admin.py: health, readiness and metrics on the admin listener."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import redis.asyncio as aioredis

from server.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.procs import RedisProcess
from tests.wire import event, peer


async def get(url: str) -> tuple[int, str, str]:
    """GET a URL in a thread; returns status, content type and body."""

    def fetch() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    return await asyncio.to_thread(fetch)


async def test_health_and_ready(server: EventwireServer) -> None:
    """healthz and readyz answer 200 while Redis answers; unknown paths 404."""
    assert (await get(server.admin_url + "/healthz"))[0] == 200
    assert (await get(server.admin_url + "/readyz"))[0] == 200
    assert (await get(server.admin_url + "/nope"))[0] == 404


async def test_not_ready_without_redis(make_server: MakeServer, redis_proc: RedisProcess) -> None:
    """readyz answers 503 while Redis does not answer; healthz stays 200."""
    srv = await make_server(store_timeout=0.3)
    redis_proc.pause()
    try:
        ready = await get(srv.admin_url + "/readyz")
        health = await get(srv.admin_url + "/healthz")
    finally:
        redis_proc.resume()
    assert ready[0] == 503
    assert health[0] == 200


async def test_metrics(server: EventwireServer, redis: aioredis.Redis) -> None:
    """/metrics counts events by outcome and rejects by code, in Prometheus format."""
    async with peer(server.url, site="shop") as p:
        await p.hello()
        await p.track(event(1), event(2, action="bad"))
        await p.track(event(1))
    status, ctype, body = await get(server.admin_url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    lines = dict(
        line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")
    )
    assert float(lines['eventwire_events_total{outcome="accepted",site="shop"}']) >= 1
    assert float(lines['eventwire_events_total{outcome="duplicate",site="shop"}']) >= 1
    assert float(lines['eventwire_rejects_total{code="invalid_action",site="shop"}']) >= 1
    assert float(lines['eventwire_connections_open{site="shop"}']) >= 0
    assert "eventwire_store_seconds_bucket" in body
