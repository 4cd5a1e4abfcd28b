"""The demo shop (/demo, eventwire/static/demo.*) in headless Chromium: its events reach the stream.

The server runs with the project's own config/sites.toml, so the test also
shows that the shipped demo site accepts what the shipped demo page sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from playwright.async_api import ConsoleMessage, Page

from tests.conftest import MakeServer
from tests.procs import UNIT
from tests.wire import stream

SITES_FILE = Path(__file__).resolve().parents[2] / "config" / "sites.toml"
TITLE = " · eventwire demo shop"

Events = list[dict[str, Any]]


async def wait_events(redis: aioredis.Redis, done: Callable[[Events], bool]) -> Events:
    """Poll the demo stream until ``done(events)``; fail with what it holds otherwise."""
    deadline = asyncio.get_running_loop().time() + 10 * UNIT
    while True:
        found = await stream(redis, "ew:{demo}:events")
        if done(found):
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError([(e["action"], e["params"]) for e in found])
        await asyncio.sleep(0.05)


def of(found: Events, action: str) -> Events:
    """The events of one action."""
    return [e for e in found if e["action"] == action]


async def test_demo_shop_events_reach_the_stream(
    make_server: MakeServer, redis: aioredis.Redis, page: Page
) -> None:
    """Browsing the demo gives a visit per view, its shop, form and banner events, no CSP error."""
    server = await make_server(sites=SITES_FILE.read_text())
    base = server.url.replace("ws://", "http://")
    console: list[str] = []

    def keep(msg: ConsoleMessage) -> None:
        console.append(f"{msg.type}: {msg.text}")

    page.on("console", keep)
    await page.goto(base + "/demo")
    found = await wait_events(redis, lambda f: bool(of(f, "page.visit") and of(f, "banner.view")))
    (visit,) = of(found, "page.visit")
    assert visit["params"]["url"] == base + "/demo"
    assert visit["params"]["title"] == "Home" + TITLE
    assert of(found, "banner.view")[0]["params"] == {"banner": "spring-sale"}

    await page.click("nav >> text=Products")
    await page.click("#catalog .card:nth-child(2) >> text=View product")
    await page.click("#detail-add")
    await page.click("#detail-buy")
    await page.fill("input[name=email]", "reader@example.com")
    await page.click("text=Subscribe")
    found = await wait_events(
        redis, lambda f: bool(of(f, "order.purchase") and of(f, "form.submit"))
    )

    visits = [
        (v["params"]["url"][len(base) :], v["params"]["title"]) for v in of(found, "page.visit")
    ]
    assert visits == [
        ("/demo", "Home" + TITLE),
        ("/demo?view=products", "Products" + TITLE),
        ("/demo?view=product&sku=M-2", "Stoneware mug" + TITLE),
        ("/demo?view=cart", "Cart" + TITLE),
    ]
    (view,) = of(found, "product.view")
    assert view["params"] == {"sku": "M-2", "name": "Stoneware mug", "price": 12.5}
    assert [e["params"]["quantity"] for e in of(found, "cart.add")] == [1, 1]
    (order,) = of(found, "order.purchase")
    assert order["params"]["items"] == [{"sku": "M-2", "quantity": 2}]
    assert order["params"]["total"] == 25.0
    (form,) = of(found, "form.submit")
    assert form["params"] == {"form": "newsletter", "email": "reader@example.com", "weekly": True}
    assert len(of(found, "session.start")) == 1
    assert len({e["session"] for e in found}) == 1
    # The page keeps to its CSP (no inline script or style) and the tracker complains of nothing.
    assert not [line for line in console if line.startswith(("error", "warning"))], console
