"""eventwire/admin.py: health, metrics, the dashboard's routes and access on the admin listener."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from eventwire.admin import LIVE_SUBPROTOCOL, token_subprotocol
from eventwire.client import EventwireClient
from eventwire.core.config import describe, load_settings
from eventwire.core.errors import ConfigError
from eventwire.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.procs import UNIT, RedisProcess
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


async def scrape(server: EventwireServer) -> dict[str, float]:
    """Every sample of ``/metrics``, by its name and labels as written."""
    status, ctype, body = await get(server.admin_url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    assert "eventwire_store_seconds_bucket" in body
    pairs = (line.rsplit(" ", 1) for line in body.splitlines() if line and line[0] != "#")
    return {name: float(value) for name, value in pairs}


async def test_metrics(server: EventwireServer, redis: aioredis.Redis) -> None:
    """/metrics counts events by outcome and rejects by code, and open connections by site."""
    accepted = 'eventwire_events_total{outcome="accepted",site="shop"}'
    duplicate = 'eventwire_events_total{outcome="duplicate",site="shop"}'
    invalid = 'eventwire_rejects_total{code="invalid_action",site="shop"}'
    opened = 'eventwire_connections_open{site="shop"}'
    # The registry is the process's: earlier tests' counts stay, so compare deltas.
    before = await scrape(server)
    async with peer(server.url, site="shop") as p, peer(server.url, site="shop") as idle:
        await p.hello()
        await idle.hello()
        await p.track(event(1), event(2, action="bad"))
        await p.track(event(1))
        during = await scrape(server)
    assert during.get(opened, 0) == before.get(opened, 0) + 2
    assert during[accepted] == before.get(accepted, 0) + 1
    assert during[duplicate] == before.get(duplicate, 0) + 1
    assert during[invalid] == before.get(invalid, 0) + 1
    # The server lowers the gauge when its handler sees the close, a moment later.
    deadline = asyncio.get_running_loop().time() + 5 * UNIT
    while (after := await scrape(server)).get(opened, 0) != before.get(opened, 0):
        assert asyncio.get_running_loop().time() < deadline, after.get(opened)
        await asyncio.sleep(0.02 * UNIT)


TOKEN = "admin-token-0123456789"


async def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], str]:
    """GET a URL with headers in a thread; returns status, headers and body."""

    def run() -> tuple[int, dict[str, str], str]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    return await asyncio.to_thread(run)


def live_url(server: EventwireServer, query: str = "site=shop") -> str:
    """The relay's WebSocket URL on a server's admin listener."""
    return server.admin_url.replace("http://", "ws://") + "/v1/live?" + query


async def test_sites_and_summary(server: EventwireServer, redis: aioredis.Redis) -> None:
    """The chooser's site list, and a site's open sessions and stream ends, as JSON."""
    status, headers, body = await fetch(server.admin_url + "/v1/sites")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    sites = json.loads(body)
    assert sites["sites"] == ["app", "shop", "web"]
    assert sites["time_basis"] == "stream id"
    url = f"{server.url}/v1/track/shop"
    async with EventwireClient(url, uuid="c-1") as one, EventwireClient(url, uuid="c-2") as two:
        one.track("page.visit", {"url": "https://shop.example/"})
        two.track("nodots")
        await one.flush(5)
        await two.flush(5)
        status, _, body = await fetch(server.admin_url + "/v1/sites/shop/summary")
    assert status == 200
    summary = json.loads(body)
    ids = [i.decode() for i, _ in await redis.xrange("ew:{shop}:events")]
    assert summary["site"] == "shop"
    assert summary["open_sessions"] == 2 == await redis.zcard("ew:{shop}:due")
    assert summary["events"] == {"length": len(ids), "first_id": ids[0], "last_id": ids[-1]}
    assert summary["rejected"]["length"] == 1
    seconds, _ = await redis.time()
    assert abs(summary["now"] - seconds * 1000) < 5000
    assert summary["backlog"] is None  # no persist group yet
    assert summary["max_backlog"] == server.settings.stream_maxlen  # the default cap
    # With the group: its unacknowledged entries, one read and left pending.
    await redis.xgroup_create("ew:{shop}:events", "persist", id="0")
    await redis.xreadgroup("persist", "w", {"ew:{shop}:events": ">"}, count=1)
    backlog = json.loads((await fetch(server.admin_url + "/v1/sites/shop/summary"))[2])
    assert backlog["backlog"] == len(ids)
    empty = json.loads((await fetch(server.admin_url + "/v1/sites/app/summary"))[2])
    assert (empty["open_sessions"], empty["events"], empty["rejected"]) == (0, None, None)
    assert (await fetch(server.admin_url + "/v1/sites/nope/summary"))[0] == 404
    assert (await fetch(server.admin_url + "/v1/sites/shop/other"))[0] == 404


async def test_dashboard_files(server: EventwireServer) -> None:
    """The dashboard is plain files with their types, and the page forbids inline code."""
    status, headers, body = await fetch(server.admin_url + "/dashboard")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "<script src=" in body
    assert "<script>" not in body, "scripts come from files only"
    assert "style=" not in body
    for path, kind in (
        ("/dashboard/dashboard.js", "javascript"),
        ("/dashboard/dashboard.css", "css"),
    ):
        status, headers, _ = await fetch(server.admin_url + path)
        assert status == 200
        assert kind in headers["Content-Type"]


async def test_open_without_token(server: EventwireServer) -> None:
    """Without admin_token, metrics, sites and the relay answer without credentials."""
    assert (await fetch(server.admin_url + "/metrics"))[0] == 200
    assert (await fetch(server.admin_url + "/v1/sites"))[0] == 200
    async with connect(live_url(server), proxy=None) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"


async def test_token_guards_data_routes(make_server: MakeServer) -> None:
    """With admin_token, data routes need it (Bearer or subprotocol); health and page stay open."""
    server = await make_server(admin_token=TOKEN)
    base = server.admin_url
    assert (await fetch(base + "/healthz"))[0] == 200
    assert (await fetch(base + "/dashboard"))[0] == 200
    for path in ("/metrics", "/v1/sites", "/v1/sites/shop/summary"):
        status, headers, _ = await fetch(base + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await fetch(base + path, Authorization="Bearer wrong-token-0123456789"))[0] == 401
        assert (await fetch(base + path, Authorization=f"Bearer {TOKEN}"))[0] == 200
    # The relay: no token, a wrong one, or one in the URL is refused before the upgrade.
    for query, headers, protocols in (
        ("site=shop", {}, None),
        ("site=shop", {"Authorization": "Bearer nope"}, None),
        (f"site=shop&token={TOKEN}", {}, None),
        ("site=shop", {}, [LIVE_SUBPROTOCOL, token_subprotocol("wrong-token-0123456789")]),
    ):
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                live_url(server, query),
                additional_headers=headers,
                subprotocols=[Subprotocol(p) for p in protocols] if protocols else None,
                proxy=None,
            ):
                pass
        assert info.value.response.status_code == 401
    async with connect(
        live_url(server), additional_headers={"Authorization": f"Bearer {TOKEN}"}, proxy=None
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
    # A browser cannot set headers: the token rides in a subprotocol of its own.
    async with connect(
        live_url(server),
        subprotocols=[Subprotocol(LIVE_SUBPROTOCOL), Subprotocol(token_subprotocol(TOKEN))],
        proxy=None,
    ) as ws:
        assert ws.subprotocol == LIVE_SUBPROTOCOL
        assert json.loads(await ws.recv())["type"] == "hello"


async def test_cross_origin_live_refused(server: EventwireServer) -> None:
    """A page of another origin cannot open the relay; the dashboard's own origin can."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(live_url(server), origin=Origin("https://evil.example"), proxy=None):
            pass
    assert info.value.response.status_code == 403
    own = Origin(server.admin_url)
    async with connect(live_url(server), origin=own, proxy=None) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"


async def test_token_setting_checked() -> None:
    """A short admin_token stops startup with the key named; check-config masks it."""
    with pytest.raises(ConfigError, match="admin_token"):
        load_settings(Path(os.devnull), env={"EVENTWIRE_ADMIN_TOKEN": "short"})
    loaded = load_settings(Path(os.devnull), env={"EVENTWIRE_ADMIN_TOKEN": TOKEN})
    assert TOKEN not in str(describe(loaded))
