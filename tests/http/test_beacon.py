"""tracker.js beacons (protocol section 14) in headless Chromium against a real server and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from playwright.async_api import Browser, BrowserContext

from eventwire.gateway import EventwireServer
from tests.conftest import MakeServer
from tests.static.test_tracker import (  # the tracker tests' pages, server and browser context
    SHOP,
    Pages,
    assert_once,
    context,
    events,
    has,
    metric,
    of,
    open_page,
    pages,
    settled,
    srv,
    wait_events,
)

__all__ = ["context", "pages", "srv"]  # fixtures, used by name

BEACONS = ("eventwire_http_requests_total", {"route": "/v1/track/{site}", "status": "200"})


LOCAL_SITES = """
[sites.local]
origins = ["http://127.0.0.1:*"]
"""


@pytest.fixture
async def local_pages() -> AsyncIterator[tuple[dict[str, str], str]]:
    """Pages served by a real HTTP server on 127.0.0.1 (no browser routing: a closing tab's
    requests would wait for a router that is gone); yields the pages by path and the base URL."""
    html: dict[str, str] = {}

    async def serve(request: web.Request) -> web.Response:
        body = html.get(request.path)
        if body is None:
            return web.Response(status=404)
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield html, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_tab_closed_before_its_socket_opened(
    browser: Browser,
    make_server: MakeServer,
    local_pages: tuple[dict[str, str], str],
    redis: aioredis.Redis,
) -> None:
    """A tab closed 100 ms after track(), its socket never open, has the event stored in 1 s."""
    server = await make_server(sites=LOCAL_SITES)
    html, base = local_pages
    tracker = server.url.replace("ws://", "http://") + "/tracker.js"
    # The socket goes nowhere (a port browsers refuse): only the beacon can deliver.
    html["/gone"] = (
        "<!doctype html><html><head><title>Gone</title>"
        f'<script src="{tracker}" data-site="local" data-endpoint="ws://127.0.0.1:9/v1/track/local">'
        "</script></head><body></body></html>"
    )
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(base + "/gone")
        await page.evaluate("eventwire.track('cart.add', {n: 1})")
        assert not (await page.evaluate("eventwire.status()"))["connected"]
        await asyncio.sleep(0.1)
        await page.close(run_before_unload=True)
        found = await wait_events(redis, has("cart.add"), site="local", wait=1)
    finally:
        await context.close()
    (added,) = of(found, "cart.add")
    assert added["params"] == {"n": 1}
    assert added["uuid"] == of(found, "page.visit")[0]["uuid"]
    assert_once(found)


async def test_beacon_and_socket_store_once(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis, srv: EventwireServer
) -> None:
    """Events sent by the socket and by a beacon at once are stored once; the queue empties."""
    pages.add("/both", title="Both")
    page, _ = await open_page(context, SHOP + "/both")
    await wait_events(redis, has("page.visit"))
    await settled(page)
    before = metric(BEACONS[0], **BEACONS[1])
    dup_before = metric("eventwire_events_total", site="shop", outcome="duplicate")
    # Queued and unsent (the batch delay), then pagehide: the socket and a beacon both send.
    await page.evaluate(
        "for (let n = 0; n < 5; n++) eventwire.track('cart.add', {n});"
        " window.dispatchEvent(new PageTransitionEvent('pagehide'));"
    )
    found = await wait_events(redis, has("cart.add", 5))
    await settled(page)
    deadline = asyncio.get_running_loop().time() + 5
    while metric(BEACONS[0], **BEACONS[1]) == before:
        assert asyncio.get_running_loop().time() < deadline, "no beacon arrived"
        await asyncio.sleep(0.05)
    # Whichever came second found every event stored already.
    while metric("eventwire_events_total", site="shop", outcome="duplicate") < dup_before + 5:
        assert asyncio.get_running_loop().time() < deadline, "both doors did not deliver"
        await asyncio.sleep(0.05)
    found = await events(redis)
    assert sorted(e["params"]["n"] for e in of(found, "cart.add")) == [0, 1, 2, 3, 4]
    assert_once(found)
