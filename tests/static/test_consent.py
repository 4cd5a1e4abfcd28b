# ruff: noqa: F811  (the fixtures of test_tracker are imported, then named as parameters)
"""tracker.js consent and cookieless modes in headless Chromium against a real server.

``data-consent="pending"``: no socket, no beacon, nothing in cookies,
localStorage or sessionStorage until ``eventwire.consent(true)``, after
which the calls held meanwhile arrive once, in order, with their own times;
``consent(false)`` drops them. ``data-cookieless="true"``: the customer lives
in sessionStorage only, so two tabs are two customers and nothing is left in
cookies or localStorage. Pages and helpers are those of ``test_tracker``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from playwright.async_api import BrowserContext, Page

from tests.static.test_tracker import (  # noqa: F401 (fixtures)
    SHOP,
    Pages,
    assert_once,
    context,
    events,
    has,
    of,
    open_page,
    pages,
    settled,
    srv,
    wait_events,
)

STORAGE = "Object.keys(localStorage).concat(Object.keys(sessionStorage))"


async def ready(page: Page) -> None:
    """Wait until the tracker ran (its API is in place and the page loaded)."""
    await page.wait_for_function(
        "() => !!(window.eventwire && eventwire.status && eventwire.status().site)"
    )
    await page.wait_for_load_state("load")


async def nothing_kept(context: BrowserContext, page: Page) -> None:
    """No cookie, no localStorage or sessionStorage key of the page's origin."""
    assert await page.evaluate(STORAGE) == []
    assert await context.cookies(SHOP) == []


async def barrier(context: BrowserContext, pages: Pages, redis: aioredis.Redis) -> Any:
    """A page without consent mode: once its visit is stored, anything sent before is too."""
    pages.add("/barrier", title="Barrier")
    page, _ = await open_page(context, SHOP + "/barrier")
    found = await wait_events(
        redis, lambda f: any(e["params"].get("title") == "Barrier" for e in of(f, "page.visit"))
    )
    await page.close()
    return found


async def test_pending_consent_keeps_nothing_and_sends_once_after_consent(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """Pending: no socket and empty storage and cookies while events are tracked; after
    consent(true) the held visit and events arrive once, in order, with their times."""
    pages.add("/p", title="Pending", consent="pending")
    sockets: list[str] = []
    page = await context.new_page()
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(SHOP + "/p")
    await ready(page)
    tracked_at = await page.evaluate(
        "() => { eventwire.track('product.view', {sku: 'A'});"
        " eventwire.track('cart.add', {sku: 'A'}); return Date.now(); }"
    )
    status = await page.evaluate("eventwire.status()")
    assert (status["consent"], status["held"], status["uuid"]) == ("pending", 3, None)
    # pagehide/visibility while pending: no beacon either (nothing is held by a queue).
    await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    await nothing_kept(context, page)
    assert sockets == []
    assert await events(redis) == []

    assert await page.evaluate("eventwire.consent(true)") is True
    found = await wait_events(redis, has("cart.add"))
    status = await settled(page)
    found = await events(redis)
    assert_once(found)
    client = [e for e in found if not e["action"].startswith("session.")]
    assert [e["action"] for e in client] == ["page.visit", "product.view", "cart.add"]
    assert [e["seq"] for e in client] == sorted(e["seq"] for e in client)
    assert all(e["time"] <= tracked_at for e in client)
    assert {e["uuid"] for e in client} == {status["uuid"]}
    assert len(sockets) == 1
    # Consented, the tracker keeps its ids as usual.
    assert {c["name"] for c in await context.cookies(SHOP)} == {"ew_shop"}
    # Calls after consent go straight out; nothing is held twice.
    assert await page.evaluate("eventwire.track('order.purchase')") is True
    found = await wait_events(redis, has("order.purchase"))
    assert len(of(found, "cart.add")) == 1


async def test_consent_false_drops_what_was_held_and_sends_nothing(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """consent(false): the held calls are dropped, later calls do nothing, nothing is stored
    in the browser or sent to the server."""
    pages.add("/n", title="No", consent="pending")
    sockets: list[str] = []
    page = await context.new_page()
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(SHOP + "/n")
    await ready(page)
    assert await page.evaluate("eventwire.track('product.view')") is True
    assert await page.evaluate("eventwire.identify('cust-n1')") is True
    assert await page.evaluate("eventwire.consent(false)") is True
    assert await page.evaluate("eventwire.track('cart.add')") is False
    assert await page.evaluate("eventwire.identify('cust-n1')") is False
    status = await page.evaluate("eventwire.status()")
    assert (status["consent"], status["held"]) == ("denied", 0)
    await nothing_kept(context, page)
    await page.close()
    found = await barrier(context, pages, redis)
    assert [e["params"]["title"] for e in of(found, "page.visit")] == ["Barrier"]
    assert not [e for e in found if e["uuid"] == "cust-n1"]
    assert sockets == []


async def test_cookieless_keeps_no_id_across_tabs(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """Cookieless: each tab is its own customer, kept in sessionStorage only; no cookie and
    no localStorage key, and the server sees two uuids."""
    pages.add("/c", title="Cookieless", cookieless="true")
    one, _ = await open_page(context, SHOP + "/c")
    two, _ = await open_page(context, SHOP + "/c")
    first, second = await asyncio.gather(settled(one), settled(two))
    assert first["uuid"] != second["uuid"]
    for page, status in ((one, first), (two, second)):
        assert await page.evaluate("Object.keys(localStorage)") == []
        stored = await page.evaluate("sessionStorage.getItem('ew.shop.uuid')")
        assert stored == status["uuid"]
    assert await context.cookies(SHOP) == []
    found = await wait_events(redis, has("page.visit", 2))
    assert {e["uuid"] for e in of(found, "page.visit")} == {first["uuid"], second["uuid"]}
    # A reload of a tab keeps its id (same tab session); a new tab would not.
    await one.reload()
    again = await settled(one)
    assert again["uuid"] == first["uuid"]
