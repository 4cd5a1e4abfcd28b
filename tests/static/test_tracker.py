"""eventwire/static/tracker.js in headless Chromium against a real server and Redis.

Pages live at ``https://shop.example`` (fulfilled by Playwright's routing, so
the browser sends that Origin); their script tag loads the real server's
``/tracker.js``, whose WebSocket goes to the real server. Every assertion
reads the events back from the Redis stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Route, WebSocket
from prometheus_client import REGISTRY

from eventwire.gateway import EventwireServer
from eventwire.pages import STATIC_DIR
from tests.conftest import MakeServer
from tests.keys import SECRET, SECRET_ENV, token
from tests.procs import UNIT
from tests.wire import stream

SHOP = "https://shop.example"
EVIL = "https://evil.example"

SITES = """
[sites.shop]
origins = ["https://shop.example"]
authenticated = []

[sites.members]
origins = ["https://shop.example"]
keys = [{ alg = "HS256", secret_env = "EVENTWIRE_TEST_JWT_SECRET" }]

[sites.slow]
origins = ["https://shop.example"]
rate = { events_per_second = 2, burst = 1 }
"""

Events = list[dict[str, Any]]


def metric(name: str, **labels: str) -> float:
    """A counter of the in-process server, 0 before its first increment."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def srv(make_server: MakeServer, monkeypatch: pytest.MonkeyPatch) -> EventwireServer:
    """A server with the sites shop, members (token keys) and slow (rate-limited)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return await make_server(sites=SITES)


class Pages:
    """HTML pages served at https://shop.example and https://evil.example by path."""

    def __init__(self, server: EventwireServer) -> None:
        self.server = server
        self.html: dict[str, str] = {}
        self.tracker_url = server.url.replace("ws://", "http://") + "/tracker.js"
        self.tracker_copy: bytes | None = None

    def add(
        self,
        path: str,
        title: str = "Home",
        body: str = "",
        head: str = "",
        site: str = "shop",
        **data: str,
    ) -> str:
        """Add a page with the tracker tag (``data`` become ``data-*`` attributes)."""
        attrs = "".join(f' data-{k.replace("_", "-")}="{v}"' for k, v in data.items())
        self.html[path] = (
            f"<!doctype html><html><head><title>{title}</title>{head}"
            f'<script src="{self.tracker_url}" data-site="{site}"{attrs} async></script>'
            f"</head><body>{body}</body></html>"
        )
        return path

    async def fulfil(self, route: Route) -> None:
        """Playwright route handler: the page of the request's path, else 404."""
        html = self.html.get(urlsplit(route.request.url).path)
        if html is None:
            await route.fulfill(status=404, body="no such page")
        else:
            await route.fulfill(status=200, content_type="text/html", body=html)

    async def tracker(self, route: Route) -> None:
        """The real server's /tracker.js; while it is stopped, the copy a browser cache would hold.

        Playwright turns the browser's HTTP cache off once routing is on, so
        this stands in for it when a test reloads a page with the server down.
        """
        try:
            response = await route.fetch()
        except Exception:
            if self.tracker_copy is None:
                await route.abort()
            else:
                await route.fulfill(
                    status=200, content_type="application/javascript", body=self.tracker_copy
                )
            return
        self.tracker_copy = await response.body()
        await route.fulfill(
            status=response.status, headers=response.headers, body=self.tracker_copy
        )


@pytest.fixture
async def pages(srv: EventwireServer) -> Pages:
    """The test pages, served by every context of the ``context`` fixture."""
    return Pages(srv)


@pytest.fixture
async def context(browser: Browser, pages: Pages) -> AsyncIterator[BrowserContext]:
    """A browser context (own storage) that reaches the pages and the loopback server."""
    ctx = await new_context(browser, pages)
    yield ctx
    await ctx.close()


async def new_context(browser: Browser, pages: Pages) -> BrowserContext:
    """A context whose pages at shop.example and evil.example may talk to the loopback server."""
    ctx = await browser.new_context()
    for origin in (SHOP, EVIL):
        # Chromium asks before a public origin reaches a loopback address.
        await ctx.grant_permissions(["local-network-access"], origin=origin)
        await ctx.route(origin + "/**", pages.fulfil)
    await ctx.route(pages.tracker_url, pages.tracker)
    return ctx


async def open_page(context: BrowserContext, url: str) -> tuple[Page, list[str]]:
    """A new tab at ``url``; returns it and the console lines it prints."""
    page = await context.new_page()
    console: list[str] = []

    def keep(msg: ConsoleMessage) -> None:
        console.append(f"{msg.type}: {msg.text}")

    page.on("console", keep)
    await page.goto(url)
    return page, console


async def events(redis: aioredis.Redis, site: str = "shop") -> Events:
    """Every event of a site's stream."""
    return await stream(redis, f"ew:{{{site}}}:events")


async def wait_events(
    redis: aioredis.Redis, done: Callable[[Events], bool], site: str = "shop", wait: float = 10
) -> Events:
    """Poll the stream until ``done(events)``; fail with what it holds otherwise."""
    deadline = asyncio.get_running_loop().time() + wait * UNIT
    while True:
        found = await events(redis, site)
        if done(found):
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"waited {wait * UNIT} s; stream: {summary(found)}")
        await asyncio.sleep(0.05)


def summary(found: Events) -> list[tuple[str, Any]]:
    """Actions and params, for failure messages."""
    return [(e["action"], e["params"]) for e in found]


def of(found: Events, action: str) -> Events:
    """The events of one action."""
    return [e for e in found if e["action"] == action]


def has(action: str, count: int = 1) -> Callable[[Events], bool]:
    """A ``done`` for :func:`wait_events`: at least ``count`` events of ``action``."""
    return lambda found: len(of(found, action)) >= count


async def settled(page: Page) -> dict[str, Any]:
    """Wait until the tab is connected and holds no unacked event; returns its status."""
    await page.wait_for_function(
        "() => { const s = window.eventwire && eventwire.status && eventwire.status();"
        " return s && s.connected && s.queued === 0 && s.adopted === 0; }",
        timeout=10_000 * UNIT,
    )
    status: dict[str, Any] = await page.evaluate("eventwire.status()")
    return status


def assert_once(found: Events) -> None:
    """No (producer, seq) is stored twice."""
    twice = [k for k, n in Counter((e["producer"], e["seq"]) for e in found).items() if n > 1]
    assert not twice, twice


async def test_page_load_sends_one_visit_and_starts_a_session(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """A page load gives exactly one page.visit (url, title, label) and one session.start."""
    pages.add("/home", title="Home")
    page, console = await open_page(context, SHOP + "/home")
    found = await wait_events(redis, has("page.visit"))
    status = await settled(page)
    found = await events(redis)
    (visit,) = of(found, "page.visit")
    assert visit["params"] == {
        "url": SHOP + "/home",
        "title": "Home",
        "referrer": "",
        "source": {"medium": "direct"},
    }
    assert visit["label"] == "Visited page Home"
    assert visit["producer"] == status["producer"]
    assert visit["producer"].startswith("js-")
    assert visit["uuid"] == status["uuid"]
    (start,) = of(found, "session.start")
    assert start["uuid"] == visit["uuid"]
    assert start["session"] == visit["session"]
    assert start["params"]["context"]["url"] == SHOP + "/home"
    # Headless Chromium driven by Playwright is a bot (its User-Agent and
    # navigator.webdriver): flagged, not dropped, under the default bots = "flag".
    client = start["params"]["client"]
    assert (client["bot"], client["device"]) == (True, "bot")
    assert start["params"]["context"]["webdriver"] is True
    assert visit["bot"] is True
    assert start["bot"] is True
    assert client["ip"] == "127.0.0.0"
    # The customer lives in a first-party cookie.
    cookies = {c["name"]: c["value"] for c in await context.cookies(SHOP)}
    assert cookies["ew_shop"] == visit["uuid"]
    assert not [line for line in console if line.startswith("error")], console


async def test_second_page_joins_the_session(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """A second page of the site joins the session, with the same producer and higher seqs."""
    pages.add("/one", title="One", body='<a id="next" href="/two">next</a>')
    pages.add("/two", title="Two")
    page, _ = await open_page(context, SHOP + "/one")
    await wait_events(redis, has("page.visit"))
    await page.click("#next")
    found = await wait_events(redis, has("page.visit", 2))
    await settled(page)
    first, second = of(found, "page.visit")
    assert second["params"]["url"] == SHOP + "/two"
    assert second["params"]["referrer"] == SHOP + "/one"
    assert second["params"]["source"]["medium"] == "internal"
    assert second["session"] == first["session"]
    assert second["uuid"] == first["uuid"]
    # sessionStorage keeps the tab's producer and the queue keeps its seq across loads.
    assert second["producer"] == first["producer"]
    assert second["seq"] > first["seq"]
    assert len(of(await events(redis), "session.start")) == 1


async def test_spa_navigation_gives_one_visit_per_route(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """With data-spa, pushState, replaceState to a new path and popstate each give one visit."""
    pages.add("/app", title="App", spa="true")
    page, _ = await open_page(context, SHOP + "/app")
    await wait_events(redis, has("page.visit"))
    await page.evaluate(
        """async () => {
          const tick = () => new Promise(r => setTimeout(r, 20));
          history.pushState({}, "", "/app/a"); document.title = "A"; await tick();
          history.pushState({}, "", "/app/a"); await tick();          // same route: none
          history.replaceState({}, "", "/app/a?tab=2"); await tick(); // same path: none
          history.pushState({}, "", "/app/a#top"); await tick();      // a hash only: none
          history.replaceState({}, "", "/app/c"); document.title = "C"; await tick();
          history.back();
        }"""
    )
    found = await wait_events(redis, has("page.visit", 4))
    await settled(page)
    visits = of(await events(redis), "page.visit")
    assert [urlsplit(v["params"]["url"]).path for v in visits] == [
        "/app",
        "/app/a",
        "/app/c",
        "/app/a",
    ]
    assert [v["params"]["title"] for v in visits[:3]] == ["App", "A", "C"]
    assert visits[1]["params"]["referrer"] == SHOP + "/app"
    assert visits[2]["params"]["referrer"] == SHOP + "/app/a"
    assert len({v["session"] for v in found}) == 1


async def test_track_custom_events_and_command_queue(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """track() arrives with params and label; queued calls run; bad calls are not sent."""
    head = (
        "<script>window.eventwire = window.eventwire || [];"
        'eventwire.push(["track", "cart.add", {sku: "B-2", quantity: 2}]);</script>'
    )
    pages.add("/p", title="P", head=head)
    page, console = await open_page(context, SHOP + "/p")
    await page.wait_for_function("() => !!(window.eventwire && eventwire.status)")
    sent = await page.evaluate(
        """() => [
          eventwire.track(
            "product.view", {sku: "A-1", price: 12.5, tags: ["new"], n: {x: 1}}, "Viewed A-1"),
          eventwire.track("view"),
          eventwire.track("bad action.x"),
          eventwire.track("product.view", [1, 2]),
          eventwire.track("product.view", {big: "x".repeat(40000)}),
          eventwire.track("product.like"),
        ]"""
    )
    assert sent == [True, False, False, False, False, True]
    found = await wait_events(redis, has("product.like"))
    await settled(page)
    found = await events(redis)
    (cart,) = of(found, "cart.add")
    assert cart["params"] == {"sku": "B-2", "quantity": 2}
    (view,) = of(found, "product.view")
    assert view["params"] == {"sku": "A-1", "price": 12.5, "tags": ["new"], "n": {"x": 1}}
    assert view["label"] == "Viewed A-1"
    assert of(found, "product.like")[0]["label"] == "product.like"
    assert not [e for e in found if e["action"] in ("view", "bad action.x")]
    errors = [line for line in console if line.startswith("error: eventwire")]
    assert len(errors) == 4, console
    assert 'invalid action "view"' in errors[0]
    # Every client event of the tab, in seq order, none twice.
    assert_once(found)


FORM = """
  <form id="f" data-ew-form="newsletter" action="/thanks" method="post">
    <input name="email" data-ew-field="email" value="a@b.example">
    <input type="password" name="pw" data-ew-field="password" value="hunter2">
    <input name="note" value="untagged">
    <input type="checkbox" data-ew-field="weekly" checked>
    <button id="go">go</button>
  </form>"""

BANNER_LATER = """
  <div style="height: 3000px">below the fold</div>
  <script>
    setTimeout(() => {
      const b = document.createElement("div");
      b.id = "promo"; b.textContent = "Spring sale";
      b.setAttribute("data-ew-banner", "promo-1");
      b.setAttribute("data-ew-hover-ms", "400");
      b.style.height = "200px";
      document.body.append(b);
    }, 100);
  </script>"""


async def test_form_sends_tagged_fields(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """A tagged form sends form.submit with its tagged fields, never a password field."""
    pages.add("/form", title="Form", body=FORM)
    pages.add("/thanks", title="Thanks")
    page, _ = await open_page(context, SHOP + "/form")
    await wait_events(redis, has("page.visit"))
    await settled(page)
    await page.click("#go")
    # The submit navigates away at once: the tracker flushes on pagehide.
    await page.wait_for_url("**/thanks")
    found = await wait_events(redis, has("page.visit", 2))
    (form,) = of(found, "form.submit")
    assert form["params"] == {"form": "newsletter", "email": "a@b.example", "weekly": True}
    assert form["label"] == "Submitted form newsletter"
    assert "hunter2" not in str(found)


async def test_banner_view_hover_click(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """A banner added later sends one view when half visible, hover only after the delay, click."""
    pages.add("/banner", title="Banner", body=BANNER_LATER)
    page, _ = await open_page(context, SHOP + "/banner")
    await page.wait_for_selector("#promo", state="attached")
    # Below the fold: not viewed until scrolled into view, then once only.
    await page.evaluate("eventwire.track('test.mark', {n: 1})")
    await wait_events(redis, has("test.mark"))
    assert not of(await events(redis), "banner.view")
    await page.locator("#promo").scroll_into_view_if_needed()
    await wait_events(redis, has("banner.view"))
    await page.evaluate("window.scrollTo(0, 0)")
    await page.locator("#promo").scroll_into_view_if_needed()

    # A short hover sends nothing, even after the delay has passed.
    await page.hover("#promo")
    await asyncio.sleep(0.1)
    await page.mouse.move(0, 0)
    await asyncio.sleep(0.6)
    await page.evaluate("eventwire.track('test.mark', {n: 2})")
    await wait_events(redis, has("test.mark", 2))
    assert not of(await events(redis), "banner.hover")
    # A long hover sends one banner.hover, no sooner than the delay.
    entered = await page.evaluate("Date.now()")
    await page.hover("#promo")
    await wait_events(redis, has("banner.hover"))
    await page.click("#promo")
    await wait_events(redis, has("banner.click"))
    await settled(page)
    found = await events(redis)
    (view,) = of(found, "banner.view")
    (hover,) = of(found, "banner.hover")
    (click,) = of(found, "banner.click")
    assert view["params"] == hover["params"] == click["params"] == {"banner": "promo-1"}
    assert hover["time"] - entered >= 400
    assert view["label"] == "Viewed banner promo-1"


async def test_offline_events_survive_a_reload(
    context: BrowserContext,
    pages: Pages,
    redis: aioredis.Redis,
    srv: EventwireServer,
    make_server: MakeServer,
) -> None:
    """Events tracked while the server is down survive a reload and arrive once it is back."""
    pages.add("/shop", title="Shop")
    page, _ = await open_page(context, SHOP + "/shop")
    await wait_events(redis, has("page.visit"))
    await settled(page)
    port = srv.port
    await srv.stop()
    await page.wait_for_function("() => !eventwire.status().connected")
    for n in range(3):
        await page.evaluate(f"eventwire.track('cart.add', {{n: {n}}})")
    await page.reload()
    await page.evaluate("eventwire.track('cart.add', {n: 3})")
    status = await page.evaluate("eventwire.status()")
    assert status["queued"] == 5  # three before the reload, the visit and one after it
    assert not status["connected"]
    await make_server(sites=SITES, listen=f"127.0.0.1:{port}")
    found = await wait_events(redis, has("cart.add", 4))
    await settled(page)
    found = await events(redis)
    assert sorted(e["params"]["n"] for e in of(found, "cart.add")) == [0, 1, 2, 3]
    assert len(of(found, "page.visit")) == 2
    clients = [e for e in found if e["producer"].startswith("js-")]
    assert len({e["producer"] for e in clients}) == 1
    seqs = [e["seq"] for e in clients]
    assert seqs == sorted(seqs)
    assert_once(found)


async def test_orphaned_queues_are_resent_by_another_tab(
    context: BrowserContext,
    pages: Pages,
    redis: aioredis.Redis,
    srv: EventwireServer,
    make_server: MakeServer,
) -> None:
    """A closed tab's queue is resent by a new tab under its own producer; a live tab's is not."""
    pages.add("/t", title="T")
    closing, _ = await open_page(context, SHOP + "/t")
    living, _ = await open_page(context, SHOP + "/t")
    await wait_events(redis, has("page.visit", 2))
    gone = (await settled(closing))["producer"]
    alive = (await settled(living))["producer"]
    assert gone != alive
    port = srv.port
    await srv.stop()
    await closing.evaluate("eventwire.track('cart.add', {tab: 'closed', n: 1})")
    await closing.evaluate("eventwire.track('cart.add', {tab: 'closed', n: 2})")
    await living.evaluate("eventwire.track('cart.add', {tab: 'living'})")
    await closing.close()
    await make_server(sites=SITES, listen=f"127.0.0.1:{port}")
    # The living tab delivers its own queue; nobody delivers the closed tab's yet.
    await living.evaluate("dispatchEvent(new Event('online'))")
    await wait_events(redis, lambda f: any(e["params"].get("tab") == "living" for e in f))
    await settled(living)
    # A new tab adopts the closed tab's queue at once (its tab said goodbye on pagehide).
    newcomer, _ = await open_page(context, SHOP + "/t")
    found = await wait_events(redis, has("cart.add", 3))
    await settled(newcomer)
    found = await events(redis)
    by_tab = {e["params"].get("tab", e["params"].get("n")): e for e in of(found, "cart.add")}
    assert len(of(found, "cart.add")) == 3
    assert by_tab["living"]["producer"] == alive
    assert [e["producer"] for e in of(found, "cart.add") if e["params"]["tab"] == "closed"] == [
        gone,
        gone,
    ]
    assert (await newcomer.evaluate("eventwire.status().producer")) not in (gone, alive)
    keys = await newcomer.evaluate("Object.keys(localStorage).filter(k => k.includes('.q.'))")
    assert f"ew.shop.q.{gone}" not in keys
    assert_once(found)


async def test_tab_with_copied_session_storage_takes_a_new_producer(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """A tab opened with a copy of sessionStorage (window.open) gets a producer of its own."""
    pages.add("/t", title="T")
    # What sessionStorage held before any script of the page ran.
    await context.add_init_script("window.inherited = sessionStorage.getItem('ew.shop.producer')")
    opener, _ = await open_page(context, SHOP + "/t")
    first = (await settled(opener))["producer"]
    async with context.expect_page() as popped:
        await opener.evaluate("window.open('/t')")
    popup = await popped.value
    second = (await settled(popup))["producer"]
    assert await popup.evaluate("window.inherited") == first
    assert second != first
    await opener.evaluate("eventwire.track('cart.add', {tab: 1})")
    await popup.evaluate("eventwire.track('cart.add', {tab: 2})")
    found = await wait_events(redis, has("cart.add", 2))
    assert {e["params"]["tab"]: e["producer"] for e in of(found, "cart.add")} == {
        1: first,
        2: second,
    }
    assert_once(found)


async def test_crashed_tab_queue_adopted_once_stale(
    context: BrowserContext,
    pages: Pages,
    redis: aioredis.Redis,
    srv: EventwireServer,
    make_server: MakeServer,
) -> None:
    """A crashed tab's queue is left alone while its heartbeat is fresh, then adopted."""
    pages.add("/t", title="T")
    crashing, _ = await open_page(context, SHOP + "/t")
    await wait_events(redis, has("page.visit"))
    gone = (await settled(crashing))["producer"]
    port = srv.port
    await srv.stop()
    await crashing.evaluate("eventwire.track('cart.add', {n: 1})")
    cdp = await context.new_cdp_session(crashing)
    # The renderer dies at once; the command itself never gets an answer.
    crashed = asyncio.get_running_loop().create_future()
    crashing.on("crash", lambda _: crashed.set_result(None))
    with contextlib.suppress(Exception):
        await asyncio.wait_for(cdp.send("Page.crash"), 0.5 * UNIT)
    await asyncio.wait_for(crashed, 5 * UNIT)
    await crashing.close()  # nothing runs in a dead renderer: no pagehide
    await make_server(sites=SITES, listen=f"127.0.0.1:{port}")
    early, _ = await open_page(context, SHOP + "/t")
    await settled(early)
    assert not of(await events(redis), "cart.add")
    await early.close()
    # Four minutes later (a faked clock), the heartbeat is stale: adopted.
    late = await context.new_page()
    await late.clock.install(time=datetime.datetime.now() + datetime.timedelta(minutes=4))
    await late.goto(SHOP + "/t")
    found = await wait_events(redis, has("cart.add"))
    await settled(late)
    (add,) = of(await events(redis), "cart.add")
    assert add["producer"] == gone
    assert_once(found)


async def test_nack_is_honoured(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """Frames nacked rate_limited are resent after retry_after_ms and stored once."""
    pages.add("/slow", title="Slow", site="slow")
    before = metric("eventwire_nacks_total", site="slow", code="rate_limited")
    page, _ = await open_page(context, SHOP + "/slow")
    await wait_events(redis, has("page.visit"), site="slow")
    for n in range(3):
        await page.evaluate(f"eventwire.track('cart.add', {{n: {n}}})")
        await asyncio.sleep(0.15)  # one frame each
    found = await wait_events(redis, has("cart.add", 3), site="slow")
    await settled(page)
    found = await events(redis, "slow")
    assert [e["params"]["n"] for e in of(found, "cart.add")] == [0, 1, 2]
    nacked = metric("eventwire_nacks_total", site="slow", code="rate_limited") - before
    # At 2 events/s and a burst of 1, frames every 150 ms are nacked; waiting
    # as told keeps the nacks few (resending at once would flood).
    assert 1 <= nacked <= 8, nacked
    assert_once(found)


async def test_identify_with_token_then_reset(
    context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """identify() moves later events to the customer (token-proven); reset() makes a new uuid."""
    pages.add("/m", title="M", site="members")
    page, _ = await open_page(context, SHOP + "/m")
    await wait_events(redis, has("page.visit"), site="members")
    anonymous = (await settled(page))["uuid"]
    proof = token("customer-42", "members")
    await page.evaluate(
        """(t) => {
          eventwire.track("product.view", {n: 1});
          eventwire.identify("customer-42", t);
          eventwire.track("form.submit", {form: "order"});
        }""",
        proof,
    )
    await wait_events(redis, has("form.submit"), site="members")
    await settled(page)
    await page.evaluate("eventwire.reset(); eventwire.track('product.view', {n: 2})")
    found = await wait_events(redis, has("product.view", 2), site="members")
    status = await settled(page)
    found = await events(redis, "members")
    before, after = of(found, "product.view")
    (form,) = of(found, "form.submit")
    assert before["uuid"] == anonymous
    assert form["uuid"] == "customer-42"
    assert form["authenticated"] is True
    assert after["uuid"] == status["uuid"] not in (anonymous, "customer-42")
    assert "authenticated" not in after
    moves = [e["params"]["previous_uuid"] for e in of(found, "client.identify")]
    assert moves == [anonymous, "customer-42"]


async def test_refused_origin(context: BrowserContext, pages: Pages, redis: aioredis.Redis) -> None:
    """A page on an origin the site does not allow is refused (403) and nothing is stored."""
    pages.add("/x", title="X")
    before = metric("eventwire_handshakes_refused_total", status="403")
    page, _ = await open_page(context, EVIL + "/x")
    await page.wait_for_function("() => !!(window.eventwire && eventwire.status)")
    deadline = asyncio.get_running_loop().time() + 10 * UNIT
    while metric("eventwire_handshakes_refused_total", status="403") == before:
        assert asyncio.get_running_loop().time() < deadline, "the tracker never tried"
        await asyncio.sleep(0.05)
    status = await page.evaluate("eventwire.status()")
    assert not status["connected"]
    assert status["queued"] == 1  # the visit stays, to be sent if the site is ever allowed
    assert await events(redis) == []


async def test_opt_out_and_do_not_track(
    browser: Browser, context: BrowserContext, pages: Pages, redis: aioredis.Redis
) -> None:
    """optOut() stops tracking and clears ids across reloads; a respected DNT opens no socket."""
    pages.add("/o", title="O")
    page, _ = await open_page(context, SHOP + "/o")
    await wait_events(redis, has("page.visit"))
    await settled(page)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    assert await page.evaluate("eventwire.optOut()") is True
    assert await page.evaluate("eventwire.track('cart.add')") is False
    await page.reload()
    await page.wait_for_function("() => !!(window.eventwire && eventwire.status)")
    assert await page.evaluate("eventwire.track('cart.add')") is False
    left = await page.evaluate("Object.keys(localStorage).concat(Object.keys(sessionStorage))")
    assert left == ["ew.shop.optout"]
    assert [c["name"] for c in await context.cookies(SHOP)] == []
    assert sockets == []

    dnt = await new_context(browser, pages)
    await dnt.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'})"
    )
    pages.add("/dnt", title="DNT", respect_dnt="true")
    pages.add("/plain", title="Plain")
    quiet = await dnt.new_page()
    opened = asyncio.Event()

    def on_socket(ws: WebSocket) -> None:
        sockets.append(ws.url)
        opened.set()

    quiet.on("websocket", on_socket)
    await quiet.goto(SHOP + "/dnt")
    await quiet.wait_for_function("() => !!(window.eventwire && eventwire.status)")
    assert await quiet.evaluate("eventwire.track('cart.add')") is False
    # Without data-respect-dnt the same browser is tracked: the switch is the site's.
    await quiet.goto(SHOP + "/plain")
    found = await wait_events(redis, has("page.visit", 2))
    assert [v["params"]["title"] for v in of(found, "page.visit")] == ["O", "Plain"]
    # Playwright may report the socket after its event is already in Redis.
    await asyncio.wait_for(opened.wait(), 5 * UNIT)
    assert len(sockets) == 1
    await dnt.close()


async def test_queue_cap_drops_oldest_and_counts(
    context: BrowserContext,
    pages: Pages,
    redis: aioredis.Redis,
    srv: EventwireServer,
    make_server: MakeServer,
) -> None:
    """Beyond 1000 unacked events the oldest are dropped and counted; the rest arrive once."""
    pages.add("/cap", title="Cap", auto="false")
    page = await context.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(SHOP + "/cap")
    await page.wait_for_function("() => !!(window.eventwire && eventwire.status)")
    # data-auto="false": no visit, and the socket opens only for a first event.
    assert sockets == []
    port = srv.port
    await srv.stop()
    await page.evaluate("for (let n = 0; n < 1005; n++) eventwire.track('cart.add', {n})")
    status = await page.evaluate("eventwire.status()")
    assert (status["queued"], status["dropped"]) == (1000, 5)
    await make_server(sites=SITES, listen=f"127.0.0.1:{port}")
    await page.evaluate("dispatchEvent(new Event('online'))")
    found = await wait_events(redis, has("cart.add", 1000))
    await settled(page)
    found = await events(redis)
    assert [e["params"]["n"] for e in of(found, "cart.add")] == list(range(5, 1005))
    assert_once(found)


def test_tracker_is_one_plain_script() -> None:
    """The tracker is a classic script (no module, no dependency), under 10 KB gzipped as served."""
    text = (STATIC_DIR / "tracker.js").read_text()
    assert not re.search(r"^\s*(import|export)\b|\brequire\(", text, re.M)
    assert len(gzip.compress(text.encode(), 9)) < 10 * 1024
